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
from diffusers import DDPMPipeline  # noqa: E402
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402
from test_diffusers_pipelines import text2image, three_runs, tiny_sd, tiny_unet, unconditional  # noqa: E402, F401
from test_diffusers_schedulers import diffusers_float64  # noqa: E402

NAME = "LMSDiscreteScheduler"
MODULE = importlib.import_module("diffusers.schedulers.scheduling_lms_discrete")
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1}

class KPipeline(DDPMPipeline):
    """``DDPMPipeline``'s loop as a K-scheduler needs it: the initial noise times ``init_noise_sigma``, the UNet input
    through ``scale_model_input``, no ``generator`` in ``step()``. The noise is drawn in float32 and cast, so the
    float64 truth starts from the same numbers (and ``accelerate``'s loop too)."""

    @torch.no_grad()
    def __call__(self, batch_size=1, generator=None, num_inference_steps=1000, output_type="pt", return_dict=True):
        size = self.unet.config.sample_size
        image = randn_tensor((batch_size, self.unet.config.in_channels, size, size), generator=generator,
                             dtype=torch.float32).to(self.unet.dtype)
        self.scheduler.set_timesteps(num_inference_steps)
        image = image * self.scheduler.init_noise_sigma
        for t in self.scheduler.timesteps:
            out = self.unet(self.scheduler.scale_model_input(image, t), t).sample
            image = self.scheduler.step(out, t, image).prev_sample
        return ImagePipelineOutput(images=(image / 2 + 0.5).clamp(0, 1))


@pytest.mark.filterwarnings("ignore:accelerate")  # its note that DDPMPipeline's own loop scales nothing
@pytest.mark.parametrize("config, level", [({}, 1), ({}, 2), ({"use_karras_sigmas": True}, 2)])
def test_unconditional_pipeline(config, level):
    ours, truth, eager = three_runs(lambda s: KPipeline(unet=tiny_unet(), scheduler=s), NAME, config, unconditional,
                                    level)
    assert 0.1 < float(((eager > 0) & (eager < 1)).float().mean()), "images saturated: the comparison would be void"
    assert_matches_reference(ours, truth, eager, f"{config} level {level}")


@pytest.mark.parametrize("level", [1, 2])
def test_text2image_pipeline_with_cfg(tiny_sd, level):
    ours, truth, eager = three_runs(tiny_sd, NAME, SD, text2image, level)
    assert 0.1 < float(((eager > 0) & (eager < 1)).float().mean()), "images saturated: the comparison would be void"
    assert_matches_reference(ours, truth, eager, f"text2image level {level}")


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
    sched.save_pretrained(tmp_path / "s")
    theirs = diffusers.LMSDiscreteScheduler.from_pretrained(tmp_path / "s")  # the config is diffusers' too
    for other in (dd.LMSDiscreteScheduler.from_pretrained(tmp_path / "s"),
                  dd.LMSDiscreteScheduler.from_config(theirs.config)):
        assert {k: other.config[k] for k in config} == config
    pipe = KPipeline(unet=tiny_unet(diffusers.UNet2DModel), scheduler=sched)
    pipe.save_pretrained(tmp_path / "p")
    again = KPipeline.from_pretrained(tmp_path / "p")
    assert type(again.scheduler) is dd.LMSDiscreteScheduler
    a, b = (unconditional(p, torch.Generator().manual_seed(0)) for p in (pipe, again))
    torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert dd.SCHEDULERS[NAME] is dd.LMSDiscreteScheduler and NAME in dd.__all__
