"""Level 2 for ``StableDiffusionXLInpaintPipeline`` with a 9-channel inpainting UNet: strength's begin step,
``denoising_start``/``denoising_end`` windows, the refiner's aesthetic-score time ids, ``masked_image_latents``,
``padding_mask_crop``, CFG with ``guidance_rescale``, ``num_images_per_prompt`` and the output types.

Oracle: the project rule (``diffkern.testing.assert_matches_reference``): the truth is the stock pipeline in float64
(every module in float64, diffusers' scheduler and pipeline module under ``diffusers_float64``, the same float32
random draws, the VAE encoder's posterior sample included), the yardstick the stock float32 run. Second calls of a
captured loop (the strict CPU stand-in of test_level2_gpu_readiness.py) bitwise against the eager fused loop.
Tiny random models only (the fixture of test_diffusers_sdxl.py).
"""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern import graphs  # noqa: E402
from diffkern.testing import assert_matches_reference  # noqa: E402
from test_diffusers_level2_sdxl_inpaint import (KARRAS, PROMPTS, _image, _mask, _pipeline_dtype,  # noqa: E402
                                                _scheduler, _tensor, check_padding_mask_crop, three_runs)
from test_diffusers_sdxl import SDXL_SCHEDULER, tiny_sdxl  # noqa: E402, F401  (tiny_sdxl: a fixture)
from test_graphs import fresh_cache  # noqa: E402, F401  (autouse)
from test_level2_gpu_readiness import _second_calls, strict  # noqa: E402, F401  (strict: a fixture)


def sdxl_inpaint(make, scheduler, refiner=False, in_channels=9):
    """``StableDiffusionXLInpaintPipeline`` on the tiny SDXL's modules with a fresh UNet of ``in_channels``;
    ``refiner``: SDXL refiner-style (the second text encoder only, cross-attention width 16, aesthetic-score time
    ids)."""
    base = make(scheduler)
    parts = dict(base.components)
    config = dict(base.unet.config, in_channels=in_channels)
    if refiner:
        config.update(cross_attention_dim=16, projection_class_embeddings_input_dim=5 * 4 + 8)
        parts.update(text_encoder=None, tokenizer=None)
    torch.manual_seed(7)
    parts["unet"] = diffusers.UNet2DConditionModel.from_config(config).eval()
    pipe = diffusers.StableDiffusionXLInpaintPipeline(**parts, requires_aesthetics_score=refiner,
                                                      add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inpaint_call(pipe, generator, steps=4, output_type="pt", prompt=PROMPTS, **kw):
    kw = {"image": _image(), "mask_image": _mask(), "guidance_scale": 4.0, "negative_prompt": ["blurry", ""], **kw}
    kw = _pipeline_dtype(pipe, kw)
    return _tensor(pipe(list(prompt), generator=generator, num_inference_steps=steps, output_type=output_type, **kw))


SCHEDULERS = [  # (scheduler, config): the brief's six, each a different fused method
    ("EulerDiscreteScheduler", SDXL_SCHEDULER),
    ("DPMSolverMultistepScheduler", SDXL_SCHEDULER),  # DPM-Solver++ 2M
    ("DDIMScheduler", SDXL_SCHEDULER),
    ("UniPCMultistepScheduler", SDXL_SCHEDULER),
    ("HeunDiscreteScheduler", SDXL_SCHEDULER),
    ("KDPM2DiscreteScheduler", KARRAS),
]


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("steps", [2, 4])
@pytest.mark.parametrize("name, config", SCHEDULERS, ids=[name for name, _ in SCHEDULERS])
def test_sdxl_inpaint_matches_the_stock_pipeline(tiny_sdxl, monkeypatch, name, config, steps, strength):
    pipe = sdxl_inpaint(tiny_sdxl, _scheduler(name, config))
    ours, truth, eager = three_runs(pipe, monkeypatch, inpaint_call, steps=steps, strength=strength)
    assert 0.1 < float(((eager > 0) & (eager < 1)).float().mean()), "images saturated"
    assert_matches_reference(ours, truth, eager, f"SDXL inpaint {name} N={steps} strength={strength}")


OPTIONS = [  # (scheduler, config, call kwargs)
    ("EulerDiscreteScheduler", SDXL_SCHEDULER, {}),  # the pipeline's default strength 0.9999: from step 1
    ("DPMSolverMultistepScheduler", KARRAS, {"strength": 0.75, "guidance_rescale": 0.7}),
    ("UniPCMultistepScheduler", SDXL_SCHEDULER, {"strength": 1.0, "guidance_rescale": 0.5, "steps": 6,
                                                 "num_images_per_prompt": 2}),
    ("EulerDiscreteScheduler", SDXL_SCHEDULER, {"strength": 0.5, "num_images_per_prompt": 2,
                                                "output_type": "latent"}),
    ("DDIMScheduler", SDXL_SCHEDULER, {"guidance_scale": 1.0, "negative_prompt": None, "prompt_2": ["x", "y"],
                                       "output_type": "np"}),
    ("DPMSolverMultistepScheduler", SDXL_SCHEDULER, {"strength": 1.0, "steps": 8, "denoising_end": 0.6,
                                                     "output_type": "latent"}),
    ("DDIMScheduler", SDXL_SCHEDULER, {"denoising_start": 0.25, "denoising_end": 0.75, "steps": 8}),
    ("HeunDiscreteScheduler", SDXL_SCHEDULER, {"denoising_start": 0.5, "steps": 5}),
    ("UniPCMultistepScheduler", SDXL_SCHEDULER, {"latents": torch.randn(2, 4, 8, 8,
                                                                        generator=torch.Generator().manual_seed(2)),
                                                 "masked_image_latents": torch.randn(2, 4, 8, 8), "strength": 1.0}),
    ("EulerDiscreteScheduler", SDXL_SCHEDULER, {"strength": 0.6, "original_size": (32, 24),
                                                "crops_coords_top_left": (4, 0), "negative_target_size": (16, 8)}),
]


@pytest.mark.parametrize("name, config, kw", OPTIONS, ids=lambda v: str(v)[:40])
def test_sdxl_inpaint_options_match_the_stock_pipeline(tiny_sdxl, monkeypatch, name, config, kw):
    ours, truth, eager = three_runs(sdxl_inpaint(tiny_sdxl, _scheduler(name, config)), monkeypatch, inpaint_call,
                                    **kw)
    assert ours.shape[0] == 2 * kw.get("num_images_per_prompt", 1)
    assert_matches_reference(ours, truth, eager, f"SDXL inpaint {name} {kw}")


@pytest.mark.parametrize("kw", [{"strength": 0.6, "aesthetic_score": 7.0, "negative_aesthetic_score": 2.0},
                                {"denoising_start": 0.6, "steps": 5, "masked_image_latents": torch.randn(2, 4, 8, 8),
                                 "image": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(8)) * 3}],
                         ids=["aesthetic", "refiner-window"])
def test_sdxl_inpaint_refiner_matches_the_stock_pipeline(tiny_sdxl, monkeypatch, kw):
    """Aesthetic-score time ids (requires_aesthetics_score) with one text encoder; a refiner's window started from
    a base model's latents (which need their masked-image latents given)."""
    pipe = sdxl_inpaint(tiny_sdxl, diffusers.EulerDiscreteScheduler.from_config(SDXL_SCHEDULER), refiner=True)
    ours, truth, eager = three_runs(pipe, monkeypatch, inpaint_call, **kw)
    assert_matches_reference(ours, truth, eager, f"SDXL inpaint refiner {kw}")


def test_sdxl_inpaint_padding_mask_crop_pil(tiny_sdxl, monkeypatch):
    """``padding_mask_crop``: the crop region, "fill" resizing and the final overlay on PIL images."""
    pipe = sdxl_inpaint(tiny_sdxl, diffusers.EulerDiscreteScheduler.from_config(SDXL_SCHEDULER))
    check_padding_mask_crop(pipe, monkeypatch, inpaint_call)


def test_sdxl_inpaint_inputs_reach_the_unet(tiny_sdxl):
    """Each input changes the result (so the parity above tests it); the same call twice is bitwise the same; the
    return value is the stock pipeline's (a "latent" output ignores return_dict, as the pipeline's)."""
    fast = dd.accelerate(sdxl_inpaint(tiny_sdxl, diffusers.EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
                                      refiner=True))
    assert fast.kind == "sdxl_inpaint"
    base = inpaint_call(fast, torch.Generator().manual_seed(0), output_type="latent")
    for kw in ({"mask_image": _mask(seed=11)}, {"image": _image(seed=12)}, {"aesthetic_score": 3.0},
               {"masked_image_latents": torch.randn(2, 4, 8, 8)}, {"guidance_rescale": 0.5}, {"strength": 0.6}):
        other = inpaint_call(fast, torch.Generator().manual_seed(0), output_type="latent", **kw)
        assert not torch.allclose(other, base, rtol=1e-4, atol=1e-5), kw
    again = inpaint_call(fast, torch.Generator().manual_seed(0), output_type="latent")
    torch.testing.assert_close(again, base, rtol=0, atol=0)
    out = fast("a cat", image=_image(1), mask_image=_mask(1), num_inference_steps=2, output_type="latent",
               return_dict=False)
    assert isinstance(out, diffusers.pipelines.stable_diffusion_xl.pipeline_output.StableDiffusionXLPipelineOutput)
    out = fast("a cat", image=_image(1), mask_image=_mask(1), num_inference_steps=2, output_type="pt",
               return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == (1, 3, 16, 16)


def test_sdxl_inpaint_refusals(tiny_sdxl):
    with pytest.raises(TypeError, match="StableDiffusionXLInpaintPipeline with a 4-channel UNet .legacy inpainting"):
        dd.accelerate(sdxl_inpaint(tiny_sdxl, diffusers.EulerDiscreteScheduler(), in_channels=4))
    with pytest.raises(TypeError, match="StableDiffusionXLInpaintPipeline: its UNet has in_channels=8, expected 9"):
        dd.accelerate(sdxl_inpaint(tiny_sdxl, diffusers.EulerDiscreteScheduler(), in_channels=8))
    pipe = sdxl_inpaint(tiny_sdxl, diffusers.HeunDiscreteScheduler.from_config(SDXL_SCHEDULER))
    fast = dd.accelerate(pipe)
    kw = {"image": _image(1), "mask_image": _mask(1), "num_inference_steps": 4, "output_type": "latent"}
    with pytest.raises(ValueError, match=r"strength: 0\.1 with num_inference_steps=4 leaves no denoising step"):
        fast("a cat", strength=0.1, **kw)
    with pytest.raises(ValueError, match="denoising_end=0.5 is not supported.*HeunDiscreteScheduler.*second-order"):
        fast("a cat", denoising_end=0.5, strength=1.0, **kw)
    with pytest.raises(ValueError, match="denoising_start: 0.6 cannot be larger than or equal to denoising_end"):
        fast("a cat", denoising_start=0.6, denoising_end=0.4, **kw)
    with pytest.raises(ValueError, match="masked_image_latents: expected them with an image given as 4-channel"):
        fast("a cat", **dict(kw, image=torch.randn(1, 4, 8, 8)), denoising_start=0.5)
    for bad in ({"timesteps": [999, 500]}, {"sigmas": [14.0, 1.0]}, {"callback_on_step_end": lambda *a: {}},
                {"ip_adapter_image_embeds": [torch.zeros(1, 1, 8)]}):
        with pytest.raises(TypeError, match=next(iter(bad))):
            fast("a cat", **kw, **bad)
    pipe.scheduler = diffusers.EDMEulerScheduler()
    with pytest.raises(ValueError, match="EDMEulerScheduler in StableDiffusionXLInpaintPipeline is not supported"):
        fast("a cat", **kw)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)
    pipe.vae.register_to_config(latent_channels=3)  # noise of 3 channels beside 4-channel masked-image latents
    with pytest.raises(ValueError, match=r"vae: the UNet takes 9 input channels.* 3 \+ 1 \+ 4 = 8"):
        fast("a cat", strength=1.0, **kw)
    pipe.unet = tiny_sdxl(diffusers.EulerDiscreteScheduler()).unet  # swapped after accelerate()
    with pytest.raises(TypeError, match="StableDiffusionXLInpaintPipeline with a 4-channel UNet"):
        fast("a cat", **kw)
    with pytest.raises(TypeError, match="StableDiffusionXLInpaintPipeline: its UNet has time_cond_proj_dim=8"):
        dd.accelerate(sdxl_inpaint(lambda s: tiny_sdxl(s, time_cond_proj_dim=8), diffusers.EulerDiscreteScheduler()))

#----------------------------------------------------------------------------
# Second calls of a captured loop (strict CPU stand-in): new images, masks, strengths and time ids.


def test_graph_sdxl_inpaint_second_calls(tiny_sdxl, strict, monkeypatch):
    """Strength's begin step (0.6 and 1.0 of 4: two schedules), images, masks, prompts and rescaled guidance (its own
    denoiser: a third capture) of later calls: bitwise the eager loop, and the stock pipeline by the project's rule."""
    pipe = sdxl_inpaint(tiny_sdxl, diffusers.DPMSolverMultistepScheduler.from_config(SDXL_SCHEDULER))
    cases = [(0, {"strength": 0.6}),
             (1, {"strength": 0.6, "image": _image(seed=21), "mask_image": _mask(seed=22)}),
             (2, {"strength": 1.0, "mask_image": _mask(seed=23), "prompt": ("a red car", "sky")}),
             (3, {"strength": 0.6, "image": _image(seed=24), "guidance_scale": 6.0}),
             (4, {"strength": 0.6, "guidance_rescale": 0.5, "mask_image": _mask(seed=25)}),
             (5, {"strength": 0.6, "guidance_rescale": 0.7, "image": _image(seed=26)})]
    _second_calls(pipe, inpaint_call, cases, monkeypatch, captures=3)


def test_graph_sdxl_inpaint_refiner_second_calls(tiny_sdxl, strict, monkeypatch):
    """KDPM2 (two calls per step, timesteps from a device counter) with aesthetic scores and new masks."""
    pipe = sdxl_inpaint(tiny_sdxl, diffusers.KDPM2DiscreteScheduler.from_config(KARRAS), refiner=True)
    cases = [(0, {"strength": 0.6}),
             (1, {"strength": 0.6, "aesthetic_score": 3.0, "mask_image": _mask(seed=31)}),
             (2, {"strength": 0.6, "negative_aesthetic_score": 1.0, "image": _image(seed=32)})]
    _second_calls(pipe, inpaint_call, cases, monkeypatch, captures=1)


@pytest.mark.cuda
def test_cuda_graph_replays_match_eager(tiny_sdxl):
    """Real CUDA graphs: new masks, images and aesthetic scores replay one capture, bitwise the eager fused loop."""
    pipe = sdxl_inpaint(tiny_sdxl, diffusers.DPMSolverMultistepScheduler.from_config(SDXL_SCHEDULER),
                        refiner=True).to("cuda")
    fast, eager = dd.accelerate(pipe, graph=True), dd.accelerate(pipe, graph=False)
    graphs.clear()
    for kw in ({}, {"mask_image": _mask(seed=11)}, {"image": _image(seed=12), "aesthetic_score": 3.0}):
        want = inpaint_call(eager, torch.Generator("cuda").manual_seed(0), strength=0.6, **kw)
        got = inpaint_call(fast, torch.Generator("cuda").manual_seed(0), strength=0.6, **kw)
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=str(kw))
    assert graphs.info()["captures"] == 1
