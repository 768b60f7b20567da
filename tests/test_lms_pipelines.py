"""``diffkern.diffusers.LMSDiscreteScheduler`` in pipelines (Level 1) and ``accelerate`` (Level 2, the ``lms`` sampler)
against the stock pipelines with diffusers' own ``LMSDiscreteScheduler``; persistence.

Tolerance: the project rule of ``test_diffusers_pipelines.py`` (the stock pipeline in float64 is the truth, ours within
twice the stock float32 run's distance to it, + the float32 floor).
"""
from __future__ import annotations

import importlib

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.diffusers.loop_spec import loop_spec, tail_spec  # noqa: E402
from diffkern.testing import assert_matches_reference  # noqa: E402
from dropin_conformance import KPipeline, check_pipeline, check_saved_pipeline, check_saved_scheduler  # noqa: E402
from test_diffusers_pipelines import text2image, tiny_sd, tiny_unet, unconditional  # noqa: E402, F401
from test_diffusers_schedulers import diffusers_float64  # noqa: E402

NAME = "LMSDiscreteScheduler"
MODULE = importlib.import_module("diffusers.schedulers.scheduling_lms_discrete")
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1}


@pytest.mark.filterwarnings("ignore:accelerate")  # its note that DDPMPipeline's own loop scales nothing
@pytest.mark.parametrize("config, level", [({}, 1), ({}, 2), ({"use_karras_sigmas": True}, 2)])
def test_unconditional_pipeline(config, level):
    check_pipeline(lambda s: KPipeline(unet=tiny_unet(), scheduler=s), NAME, config, unconditional, level,
                   f"{config} level {level}")


@pytest.mark.parametrize("level", [1, 2])
def test_text2image_pipeline_with_cfg(tiny_sd, level):
    check_pipeline(tiny_sd, NAME, SD, text2image, level, f"text2image level {level}")


def test_level2_spec():
    sched = dd.LMSDiscreteScheduler(**SD)
    sched.set_timesteps(6)
    spec = loop_spec(sched)
    assert spec.method == "lms" and not spec.vp and spec.knobs == {"order": 4}
    assert spec.sigmas == sched.sigmas_host and spec.timesteps == sched.timesteps.tolist()
    assert tail_spec(sched, spec, 0) == spec
    with pytest.raises(ValueError, match="LMSDiscreteScheduler with strength < 1"):
        tail_spec(sched, spec, 2)
    clamped = dd.LMSDiscreteScheduler(timestep_spacing="leading", steps_offset=250)
    clamped.set_timesteps(10)
    with pytest.raises(ValueError, match="steps_offset=250"):
        loop_spec(clamped)


def test_img2img(tiny_sd, monkeypatch):
    """Level 1 runs the stock img2img loop as diffusers' LMS does (a partial loop's first steps weight the derivatives
    they have with the weights of the whole schedule's nodes); Level 2 runs strength 1 and refuses a partial loop."""
    import diffusers.models.autoencoders.vae as vae_module
    from test_diffusers_img2img_level2 import _call as img2img_call, _img2img, _three_runs
    from test_diffusers_pipelines import float64_copy, pipeline_modules
    from test_diffusers_schedulers import _randn32

    ours, truth, eager = _three_runs(tiny_sd, monkeypatch, NAME, SD, strength=1.0, steps=4, w=1.0)
    assert_matches_reference(ours, truth, eager, "img2img level 2, strength 1")
    stock = _img2img(tiny_sd, diffusers.LMSDiscreteScheduler(**SD))
    config = {k: v for k, v in stock.scheduler.config.items() if not k.startswith("_")}
    with diffusers_float64(MODULE, *pipeline_modules(stock)), monkeypatch.context() as m:
        m.setattr(vae_module, "randn_tensor", _randn32(vae_module.randn_tensor))  # the encoder's posterior draw
        truth = img2img_call(float64_copy(stock, diffusers.LMSDiscreteScheduler(**config)),
                             torch.Generator().manual_seed(5), 0.6, steps=8)
    eager = img2img_call(stock, torch.Generator().manual_seed(5), 0.6, steps=8)
    stock.scheduler = dd.LMSDiscreteScheduler(**config)
    ours = img2img_call(stock, torch.Generator().manual_seed(5), 0.6, steps=8)
    assert_matches_reference(ours, truth, eager, "img2img level 1, strength 0.6")
    with pytest.raises(ValueError, match="strength < 1"):
        img2img_call(dd.accelerate(stock), torch.Generator().manual_seed(5), 0.6, steps=8)


def test_save_and_load(tmp_path):
    config = dict(SD, use_beta_sigmas=True, prediction_type="v_prediction", timestep_spacing="trailing")
    sched = dd.LMSDiscreteScheduler(**config)
    check_saved_scheduler(sched, tmp_path / "s", config)
    check_saved_pipeline(KPipeline, sched, tmp_path / "p")
