"""Level 2 image-to-image: ``dd.accelerate(StableDiffusionImg2ImgPipeline)`` runs the partial schedule (the last
``strength`` fraction of the timesteps, from the pipeline's own ``add_noise`` start) in the fused loop.

Deterministic schedulers compare with the stock pipeline by the project's rule (test_diffusers_pipelines.py): the
truth is the stock pipeline in float64 (its scheduler via ``diffusers_float64``, the same float32 random draws, the
VAE encoder's posterior sample included), ours within twice the stock float32 run's distance to it. Stochastic
schedulers draw their per-step noise from diffkern's Philox stream: reproducible per seed.
"""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.testing import assert_matches_reference  # noqa: E402
from test_diffusers_pipelines import float64_copy, pipeline_modules, tiny_sd  # noqa: E402, F401  (tiny_sd: a fixture)
from test_diffusers_schedulers import _randn32, diffusers_float64, scheduler_module  # noqa: E402

STEPS = 4
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1}


def _img2img(make, scheduler):
    pipe = diffusers.StableDiffusionImg2ImgPipeline(**make(scheduler).components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(batch=1):
    return torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def _call(pipe, generator, strength, w=4.0, per_prompt=1, output_type="pt", **kw):
    out = pipe(["a cat", "a dog"], image=_image(2), strength=strength, num_inference_steps=kw.pop("steps", STEPS),
               guidance_scale=w, negative_prompt=["blurry", ""], num_images_per_prompt=per_prompt,
               output_type=output_type, generator=generator, **kw).images
    return out if isinstance(out, torch.Tensor) else torch.as_tensor(out)


def _three_runs(make, monkeypatch, name, config, **kw):
    """(ours, truth, stock float32) for a diffusers ``name`` scheduler."""
    import diffusers.models.autoencoders.vae as vae_module

    pipe = _img2img(make, getattr(diffusers, name)(**config))
    run_config = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    with diffusers_float64(scheduler_module(name), *pipeline_modules(pipe)), monkeypatch.context() as m:
        m.setattr(vae_module, "randn_tensor", _randn32(vae_module.randn_tensor))  # the encoder's posterior draw
        twin = float64_copy(pipe, getattr(diffusers, name)(**run_config))
        truth = _call(twin, torch.Generator().manual_seed(5), **kw)
    eager = _call(pipe, torch.Generator().manual_seed(5), **kw)
    ours = _call(dd.accelerate(pipe), torch.Generator().manual_seed(5), **kw)
    return ours, truth, eager


PARITY = [  # (scheduler, config, call kwargs)
    ("DDIMScheduler", dict(SD, clip_sample=False, set_alpha_to_one=False), {"strength": 0.6}),
    ("DDIMScheduler", dict(SD, clip_sample=False), {"strength": 1.0, "w": 1.0, "output_type": "latent"}),
    ("EulerDiscreteScheduler", dict(SD, timestep_spacing="leading"), {"strength": 0.3}),
    ("EulerDiscreteScheduler", {}, {"strength": 1.0, "per_prompt": 2}),
    ("DPMSolverMultistepScheduler", {}, {"strength": 0.6, "per_prompt": 2, "output_type": "latent"}),
    ("DPMSolverMultistepScheduler", {"prediction_type": "v_prediction"}, {"strength": 1.0, "w": 1.0}),
    ("DPMSolverMultistepScheduler", {"solver_order": 3}, {"strength": 0.7, "steps": 7}),
    # 16 steps: no lower_order_final in diffusers, which the 8-step tail must not get either
    ("DPMSolverMultistepScheduler", {"solver_order": 3}, {"strength": 0.5, "steps": 16, "w": 1.0}),
    # a first-order last step to sigma_min: dpmsolver_3m(solver_order=2), orders restarting at the begin step
    ("DPMSolverMultistepScheduler", {"final_sigmas_type": "sigma_min"}, {"strength": 0.6}),
    ("DPMSolverMultistepScheduler", {"final_sigmas_type": "sigma_min", "euler_at_final": True},
     {"strength": 0.5, "steps": 16, "w": 1.0}),
    ("UniPCMultistepScheduler", dict(SD), {"strength": 0.6, "w": 1.0}),
    ("UniPCMultistepScheduler", {"disable_corrector": [3]}, {"strength": 0.5, "steps": 6}),
    ("UniPCMultistepScheduler", {}, {"strength": 1.0, "output_type": "latent"}),
    ("HeunDiscreteScheduler", {}, {"strength": 0.6}),
    ("KDPM2DiscreteScheduler", {}, {"strength": 0.6}),
]


@pytest.mark.parametrize("name, config, kw", PARITY, ids=lambda v: str(v)[:40])
def test_img2img_level2_matches_stock_pipeline(tiny_sd, monkeypatch, name, config, kw):
    ours, truth, eager = _three_runs(tiny_sd, monkeypatch, name, config, **kw)
    assert ours.shape[0] == 2 * kw.get("per_prompt", 1)
    assert_matches_reference(ours, truth, eager, f"img2img {name} {config} {kw}")


def test_img2img_level2_stochastic_is_reproducible(tiny_sd):
    fast = dd.accelerate(_img2img(tiny_sd, diffusers.EulerAncestralDiscreteScheduler()))
    runs = [_call(fast, torch.Generator().manual_seed(seed), 0.6) for seed in (1, 1, 2)]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    assert not torch.equal(runs[0], runs[2])


def test_img2img_level2_kind_and_refusals(tiny_sd):
    pipe = _img2img(tiny_sd, diffusers.EulerDiscreteScheduler())
    fast = dd.accelerate(pipe)
    assert fast.kind == "img2img"
    kw = {"image": _image(), "num_inference_steps": STEPS, "output_type": "latent"}
    with pytest.raises(ValueError, match=r"strength: 0\.1 with num_inference_steps=4 leaves no denoising step"):
        fast("a cat", strength=0.1, **kw)
    with pytest.raises(ValueError, match="strength"):  # the pipeline's own check_inputs
        fast("a cat", strength=1.5, **kw)
    with pytest.raises(ValueError, match="image: expected"):
        fast("a cat", num_inference_steps=STEPS)
    for bad in ({"timesteps": [999, 500]}, {"sigmas": [14.0, 1.0]}, {"callback_on_step_end": lambda *a: {}},
                {"ip_adapter_image_embeds": [torch.zeros(1, 1, 8)]}):
        with pytest.raises(TypeError, match=next(iter(bad))):
            fast("a cat", **kw, **bad)
    # legacy (4-channel) inpainting blends the known region back after every step: refused by name
    with pytest.raises(TypeError, match=r"StableDiffusionInpaintPipeline with a 4-channel UNet .legacy inpainting"):
        dd.accelerate(diffusers.StableDiffusionInpaintPipeline(**pipe.components))
