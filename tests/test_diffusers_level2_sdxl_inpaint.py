"""Level 2 for ``StableDiffusionXLImg2ImgPipeline`` (strength, ``denoising_start``/``denoising_end`` windows, the
refiner's aesthetic-score time ids, negative time ids, ``guidance_rescale``), SDXL text-to-image's ``denoising_end``
(the base of an ensemble of expert denoisers) and ``StableDiffusionInpaintPipeline`` with a 9-channel UNet.

Oracle: the project rule (``diffkern.testing.assert_matches_reference``, as test_diffusers_img2img_level2.py): the
truth is the stock pipeline in float64 (every module in float64, diffusers' scheduler and pipeline module under
``diffusers_float64``, the same float32 random draws, the VAE encoder's posterior sample included), the yardstick
the stock float32 run. CUDA-graph replays (CPU stand-in of test_graphs.py) bitwise against the eager fused loop.
Tiny random models only (the fixtures of test_diffusers_sdxl.py and test_diffusers_pipelines.py).
"""
import copy
import importlib

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern import graphs  # noqa: E402
from diffkern.testing import assert_matches_reference  # noqa: E402
from test_diffusers_pipelines import pipeline_modules, tiny_sd  # noqa: E402, F401  (tiny_sd: a fixture)
from test_diffusers_schedulers import _randn32, diffusers_float64  # noqa: E402
from test_diffusers_sdxl import SDXL_SCHEDULER, tiny_sdxl  # noqa: E402, F401
from test_graphs import fake, fresh_cache  # noqa: E402, F401  (fresh_cache: autouse)

PROMPTS = ["a cat", "a dog"]
KARRAS = dict(SDXL_SCHEDULER, use_karras_sigmas=True)


def _image(batch=2, seed=3):
    return torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _mask(batch=2, seed=4):
    return torch.rand(batch, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def _tensor(out):
    out = out.images
    return out if isinstance(out, torch.Tensor) else torch.as_tensor(np.asarray(out))


def _scheduler(name, config):
    cls = getattr(diffusers, name)
    return cls.from_config(config) if config is not None else cls()


def _twin64(pipe, name):
    """The pipeline with float64 modules and a fresh ``name`` scheduler of the pipeline's config (build inside
    ``diffusers_float64``)."""
    twin = copy.deepcopy(pipe)
    for module in twin.components.values():
        if isinstance(module, torch.nn.Module):
            module.double()
    twin.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)
    # SDXL's prepare_latents casts the image with .float() for a force_upcast VAE (a no-op in float32): float32 here
    twin.vae.register_to_config(force_upcast=False)
    return twin


def three_runs(pipe, monkeypatch, call, **kw):
    """(Level 2, float64 truth, stock float32) of ``call(pipe, generator, **kw)``."""
    import diffusers.models.autoencoders.vae as vae_module

    name = type(pipe.scheduler).__name__
    module = importlib.import_module(type(pipe.scheduler).__module__)
    with diffusers_float64(module, *pipeline_modules(pipe)), monkeypatch.context() as m:
        m.setattr(vae_module, "randn_tensor", _randn32(vae_module.randn_tensor))  # the encoder's posterior draw
        truth = call(_twin64(pipe, name), torch.Generator().manual_seed(5), **kw)
    eager = call(pipe, torch.Generator().manual_seed(5), **kw)
    ours = call(dd.accelerate(pipe), torch.Generator().manual_seed(5), **kw)
    return ours, truth.to(torch.float64), eager

#----------------------------------------------------------------------------
# SDXL img2img.


def sdxl_img2img(make, scheduler, refiner=False):
    """``StableDiffusionXLImg2ImgPipeline`` on the tiny SDXL's modules; ``refiner``: SDXL refiner-style (the second
    text encoder only, a UNet with cross-attention width 16 and aesthetic-score time ids)."""
    base = make(scheduler)
    parts = dict(base.components)
    if refiner:
        torch.manual_seed(6)
        parts["unet"] = diffusers.UNet2DConditionModel.from_config(
            dict(base.unet.config, cross_attention_dim=16, projection_class_embeddings_input_dim=5 * 4 + 8)).eval()
        parts.update(text_encoder=None, tokenizer=None)
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline(**parts, requires_aesthetics_score=refiner,
                                                      add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_dtype(pipe, kw):
    """Given latents in the pipeline's dtype (it does not cast them)."""
    return {k: v.to(pipe.unet.dtype) if k in ("latents", "masked_image_latents") else v for k, v in kw.items()}


def sdxl_call(pipe, generator, steps=4, output_type="pt", **kw):
    kw = {"image": _image(), "strength": 0.6, "guidance_scale": 4.0, "negative_prompt": ["blurry", ""], **kw}
    kw = _pipeline_dtype(pipe, kw)
    return _tensor(pipe(PROMPTS, generator=generator, num_inference_steps=steps, output_type=output_type, **kw))


SDXL_PARITY = [  # (scheduler, config, call kwargs)
    ("EulerDiscreteScheduler", SDXL_SCHEDULER, {"strength": 0.3, "steps": 10}),
    ("EulerDiscreteScheduler", SDXL_SCHEDULER, {"strength": 1.0, "num_images_per_prompt": 2,
                                                "output_type": "latent"}),
    ("DPMSolverMultistepScheduler", KARRAS, {"strength": 0.6, "guidance_rescale": 0.5}),
    # third order below 15 steps: the whole schedule's last two steps are lower order, a 4-step head's are not
    ("DPMSolverMultistepScheduler", dict(SDXL_SCHEDULER, solver_order=3), {"strength": 1.0, "steps": 8,
                                                                           "denoising_end": 0.6}),
    # second order with a first-order last step to sigma_min (dpmsolver_3m): a head that stops before it
    ("DPMSolverMultistepScheduler", dict(SDXL_SCHEDULER, final_sigmas_type="sigma_min"),
     {"strength": 1.0, "steps": 8, "denoising_end": 0.6}),
    ("DDIMScheduler", SDXL_SCHEDULER, {"strength": 0.5, "negative_original_size": (12, 20),
                                       "negative_crops_coords_top_left": (2, 3), "negative_target_size": (16, 8),
                                       "original_size": (32, 24), "crops_coords_top_left": (4, 0)}),
    ("DDIMScheduler", SDXL_SCHEDULER, {"strength": 1.0, "guidance_scale": 1.0, "negative_prompt": None,
                                       "prompt_2": ["blurry dog", "cat"]}),
    ("UniPCMultistepScheduler", SDXL_SCHEDULER, {"strength": 0.75, "steps": 8, "num_images_per_prompt": 2}),
    ("UniPCMultistepScheduler", dict(SDXL_SCHEDULER, solver_order=3), {"strength": 1.0, "steps": 6,
                                                                       "denoising_end": 0.7}),
    ("HeunDiscreteScheduler", SDXL_SCHEDULER, {"strength": 0.5}),
    # given latents replace the noised image (the schedule's window stays strength's)
    ("EulerDiscreteScheduler", SDXL_SCHEDULER, {"latents": torch.randn(2, 4, 8, 8,
                                                                       generator=torch.Generator().manual_seed(1))}),
    ("DEISMultistepScheduler", dict(SDXL_SCHEDULER, solver_order=3), {"strength": 0.9, "steps": 8,
                                                                      "denoising_end": 0.7}),
]


@pytest.mark.parametrize("name, config, kw", SDXL_PARITY, ids=lambda v: str(v)[:40])
def test_sdxl_img2img_matches_the_stock_pipeline(tiny_sdxl, monkeypatch, name, config, kw):
    ours, truth, eager = three_runs(sdxl_img2img(tiny_sdxl, _scheduler(name, config)), monkeypatch, sdxl_call,
                                    **kw)
    assert ours.shape[0] == 2 * kw.get("num_images_per_prompt", 1)
    if kw.get("output_type") != "latent":
        assert 0.1 < float(((eager > 0) & (eager < 1)).float().mean()), "images saturated"
    assert_matches_reference(ours, truth, eager, f"SDXL img2img {name} {kw}")


REFINER = [  # (scheduler, config, call kwargs): the refiner's window of a schedule, on the base's latents
    ("EulerDiscreteScheduler", SDXL_SCHEDULER, {"denoising_start": 0.6, "aesthetic_score": 7.0,
                                                "negative_aesthetic_score": 2.0}),
    ("DPMSolverMultistepScheduler", SDXL_SCHEDULER, {"denoising_start": 0.3, "steps": 8}),
    # a middle expert: from denoising_start to denoising_end
    ("DDIMScheduler", SDXL_SCHEDULER, {"denoising_start": 0.25, "denoising_end": 0.75, "steps": 8}),
    # second order: diffusers rounds the start up to a whole step
    ("HeunDiscreteScheduler", SDXL_SCHEDULER, {"denoising_start": 0.5, "steps": 5}),
    ("KDPM2DiscreteScheduler", KARRAS, {"denoising_start": 0.4, "steps": 5}),
    ("UniPCMultistepScheduler", SDXL_SCHEDULER, {"denoising_start": 0.5, "steps": 6, "guidance_rescale": 0.7}),
]


@pytest.mark.parametrize("name, config, kw", REFINER, ids=lambda v: str(v)[:40])
def test_sdxl_refiner_window_matches_the_stock_pipeline(tiny_sdxl, monkeypatch, name, config, kw):
    """Aesthetic-score time ids (requires_aesthetics_score), one text encoder, 4-channel latents as the image."""
    pipe = sdxl_img2img(tiny_sdxl, _scheduler(name, config), refiner=True)
    start = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(8)) * 3
    ours, truth, eager = three_runs(pipe, monkeypatch, sdxl_call, image=start, **kw)
    assert_matches_reference(ours, truth, eager, f"SDXL refiner {name} {kw}")


def test_sdxl_ensemble_of_experts(tiny_sdxl, monkeypatch):
    """The base (text-to-image, denoising_end) hands its noisy latents to the refiner (denoising_start): each stage
    matches the stock one, the refiner's started from the stock base's latents."""
    def base_call(pipe, generator):
        return _tensor(pipe(PROMPTS, generator=generator, num_inference_steps=8, guidance_scale=4.0,
                            negative_prompt=["blurry", ""], denoising_end=0.7, output_type="latent"))
    base = tiny_sdxl(diffusers.DPMSolverMultistepScheduler.from_config(KARRAS))
    ours, truth, eager = three_runs(base, monkeypatch, base_call)
    assert_matches_reference(ours, truth, eager, "SDXL base with denoising_end")
    refiner = sdxl_img2img(tiny_sdxl, diffusers.DPMSolverMultistepScheduler.from_config(KARRAS), refiner=True)
    ours, truth, eager = three_runs(refiner, monkeypatch, sdxl_call, image=eager, steps=8, denoising_start=0.7)
    assert_matches_reference(ours, truth, eager, "SDXL refiner with denoising_start")
    assert 0.1 < float(((eager > 0) & (eager < 1)).float().mean()), "images saturated"


def test_sdxl_img2img_options_reach_the_unet(tiny_sdxl):
    """Each option changes the result (so the parity above tests it); the same call twice is bitwise the same."""
    fast = dd.accelerate(sdxl_img2img(tiny_sdxl, diffusers.EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
                                      refiner=True))
    assert fast.kind == "sdxl_img2img"
    base = sdxl_call(fast, torch.Generator().manual_seed(0), output_type="latent")
    for kw in ({"aesthetic_score": 3.0}, {"negative_aesthetic_score": 5.0}, {"original_size": (8, 8)},
               {"negative_original_size": (8, 8)}, {"crops_coords_top_left": (1, 0)}, {"image": _image(seed=9)},
               {"strength": 0.8}, {"denoising_end": 0.8}, {"guidance_rescale": 0.5}):
        other = sdxl_call(fast, torch.Generator().manual_seed(0), output_type="latent", **kw)
        assert not torch.allclose(other, base, rtol=1e-4, atol=1e-5), kw
    again = sdxl_call(fast, torch.Generator().manual_seed(0), output_type="latent")
    torch.testing.assert_close(again, base, rtol=0, atol=0)


def test_sdxl_img2img_refusals(tiny_sdxl):
    pipe = sdxl_img2img(tiny_sdxl, diffusers.HeunDiscreteScheduler.from_config(SDXL_SCHEDULER))
    fast = dd.accelerate(pipe)
    kw = {"image": _image(1), "num_inference_steps": 4, "output_type": "latent"}
    with pytest.raises(ValueError, match="denoising_end=0.5 is not supported.*HeunDiscreteScheduler.*second-order"):
        fast("a cat", denoising_end=0.5, strength=1.0, **kw)
    with pytest.raises(ValueError, match="denoising_start: 0.6 cannot be larger than or equal to denoising_end"):
        fast("a cat", denoising_start=0.6, denoising_end=0.4, **kw)
    with pytest.raises(ValueError, match=r"strength: 0\.1 with num_inference_steps=4 leaves no denoising step"):
        fast("a cat", strength=0.1, **kw)
    with pytest.raises(ValueError, match="denoising_end: 0.01 keeps no denoising step"):
        fast("a cat", denoising_end=0.01, **kw)
    with pytest.raises(ValueError, match="image: expected"):
        fast("a cat", num_inference_steps=4)
    for bad in ({"timesteps": [999, 500]}, {"sigmas": [14.0, 1.0]}, {"callback_on_step_end": lambda *a: {}},
                {"ip_adapter_image_embeds": [torch.zeros(1, 1, 8)]}):
        with pytest.raises(TypeError, match=next(iter(bad))):
            fast("a cat", **kw, **bad)
    # a 7-step head of 8 third-order steps keeps diffusers' second-order last but one step: no 7-step loop has it
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(SDXL_SCHEDULER, solver_order=3)
    with pytest.raises(ValueError, match=r"denoising_end=0.85 is not supported .*orders \[1, 2, 3, 3, 3, 3, 2\]"):
        fast("a cat", denoising_end=0.85, strength=1.0, **dict(kw, num_inference_steps=8))
    pipe.scheduler = diffusers.PNDMScheduler.from_config(SDXL_SCHEDULER)
    with pytest.raises(ValueError, match="denoising_end with PNDMScheduler"):
        fast("a cat", denoising_end=0.5, strength=1.0, **kw)
    with pytest.raises(TypeError, match="StableDiffusionXLImg2ImgPipeline: its UNet has time_cond_proj_dim=8"):
        dd.accelerate(sdxl_img2img(lambda s: tiny_sdxl(s, time_cond_proj_dim=8), diffusers.EulerDiscreteScheduler()))
    with pytest.raises(TypeError, match=r"StableDiffusionXLInpaintPipeline with a 4-channel UNet .legacy"):
        dd.accelerate(diffusers.StableDiffusionXLInpaintPipeline(**pipe.components))


def test_sdxl_text2img_denoising_end_refusal(tiny_sdxl):
    fast = dd.accelerate(tiny_sdxl(diffusers.HeunDiscreteScheduler.from_config(SDXL_SCHEDULER)))
    with pytest.raises(ValueError, match="denoising_end=0.5 is not supported.*second-order"):
        fast("a cat", num_inference_steps=4, denoising_end=0.5, output_type="latent")

#----------------------------------------------------------------------------
# Inpainting.


def inpaint_pipe(make, scheduler, in_channels=9):
    """``StableDiffusionInpaintPipeline`` on the tiny SD's modules with a fresh UNet of ``in_channels``."""
    base = make(scheduler)
    torch.manual_seed(7)
    unet = diffusers.UNet2DConditionModel.from_config(dict(base.unet.config, in_channels=in_channels)).eval()
    pipe = diffusers.StableDiffusionInpaintPipeline(**dict(base.components, unet=unet))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inpaint_call(pipe, generator, steps=4, output_type="pt", **kw):
    kw = {"image": _image(), "mask_image": _mask(), "guidance_scale": 4.0, "negative_prompt": ["blurry", ""], **kw}
    kw = _pipeline_dtype(pipe, kw)
    return _tensor(pipe(PROMPTS, generator=generator, num_inference_steps=steps, output_type=output_type, **kw))


SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1}
INPAINT_PARITY = [  # (scheduler, config, call kwargs)
    ("EulerDiscreteScheduler", SD, {}),
    ("EulerDiscreteScheduler", SD, {"strength": 0.5, "num_images_per_prompt": 2}),
    ("DPMSolverMultistepScheduler", SD, {"strength": 0.75, "steps": 8, "output_type": "latent"}),
    ("DPMSolverMultistepScheduler", dict(SD, use_karras_sigmas=True), {"guidance_scale": 1.0,
                                                                      "negative_prompt": None}),
    ("DDIMScheduler", dict(SD, clip_sample=False, set_alpha_to_one=False), {"strength": 0.6}),
    ("UniPCMultistepScheduler", SD, {"strength": 0.9, "steps": 6}),
    ("UniPCMultistepScheduler", SD, {"latents": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)),
                                     "masked_image_latents": torch.randn(2, 4, 8, 8)}),
]


@pytest.mark.parametrize("name, config, kw", INPAINT_PARITY, ids=lambda v: str(v)[:40])
def test_inpaint_matches_the_stock_pipeline(tiny_sd, monkeypatch, name, config, kw):
    ours, truth, eager = three_runs(inpaint_pipe(tiny_sd, getattr(diffusers, name)(**config)), monkeypatch,
                                    inpaint_call, **kw)
    assert ours.shape[0] == 2 * kw.get("num_images_per_prompt", 1)
    if kw.get("output_type") != "latent":
        assert 0.1 < float(((eager > 0) & (eager < 1)).float().mean()), "images saturated"
    assert_matches_reference(ours, truth, eager, f"inpaint {name} {kw}")


def test_inpaint_padding_mask_crop_pil(tiny_sd, monkeypatch):
    check_padding_mask_crop(inpaint_pipe(tiny_sd, diffusers.EulerDiscreteScheduler(**SD)), monkeypatch, inpaint_call)


def check_padding_mask_crop(pipe, monkeypatch, call):
    """``padding_mask_crop`` of an inpainting ``call``: the crop region, "fill" resizing and the final overlay on PIL
    images."""
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8))
    mask = np.zeros((24, 20), dtype=np.uint8)
    mask[6:14, 5:12] = 255
    kw = {"image": image, "mask_image": Image.fromarray(mask), "padding_mask_crop": 2, "output_type": "pil"}
    ours, truth, eager = three_runs(pipe, monkeypatch, call, **kw)
    assert ours.shape == (2, 24, 20, 3)
    # uint8 pixels: a rounding boundary may flip a value by 1 in either pipeline
    assert float((ours.double() - eager.double()).abs().max()) <= 1
    assert float((ours.double() - truth).abs().max()) <= 2 * float((eager.double() - truth).abs().max()) + 1


def test_inpaint_mask_reaches_the_unet(tiny_sd):
    fast = dd.accelerate(inpaint_pipe(tiny_sd, diffusers.EulerDiscreteScheduler(**SD)))
    assert fast.kind == "inpaint"
    base = inpaint_call(fast, torch.Generator().manual_seed(0), output_type="latent")
    for kw in ({"mask_image": _mask(seed=11)}, {"image": _image(seed=12)}):
        assert not torch.allclose(inpaint_call(fast, torch.Generator().manual_seed(0), output_type="latent", **kw),
                                  base, rtol=1e-4, atol=1e-5), kw


def test_stochastic_schedulers_are_reproducible_per_seed(tiny_sd, tiny_sdxl):
    """Euler-ancestral draws its step noise from diffkern's Philox stream keyed by the generator: the same seed
    gives the same images, another one others."""
    for fast, call in ((dd.accelerate(inpaint_pipe(tiny_sd, diffusers.EulerAncestralDiscreteScheduler(**SD))),
                        inpaint_call),
                       (dd.accelerate(sdxl_img2img(tiny_sdxl, diffusers.EulerAncestralDiscreteScheduler.from_config(
                           SDXL_SCHEDULER))), sdxl_call)):
        a, b, c = (call(fast, torch.Generator().manual_seed(seed), output_type="latent") for seed in (1, 1, 2))
        assert torch.isfinite(a).all()
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        assert not torch.allclose(c, a)


def test_inpaint_refusals(tiny_sd):
    with pytest.raises(TypeError, match="StableDiffusionInpaintPipeline with a 4-channel UNet .legacy inpainting"):
        dd.accelerate(inpaint_pipe(tiny_sd, diffusers.EulerDiscreteScheduler(), in_channels=4))
    pipe = inpaint_pipe(tiny_sd, diffusers.EulerDiscreteScheduler())
    fast = dd.accelerate(pipe)
    kw = {"image": _image(1), "mask_image": _mask(1), "num_inference_steps": 4, "output_type": "latent"}
    with pytest.raises(ValueError, match=r"strength: 0\.1 with num_inference_steps=4 leaves no denoising step"):
        fast("a cat", strength=0.1, **kw)
    with pytest.raises(TypeError, match="StableDiffusionInpaintPipeline: its UNet has in_channels=8, expected 9"):
        dd.accelerate(inpaint_pipe(tiny_sd, diffusers.EulerDiscreteScheduler(), in_channels=8))
    for bad in ({"timesteps": [999, 500]}, {"callback_on_step_end": lambda *a: {}}):
        with pytest.raises(TypeError, match=next(iter(bad))):
            fast("a cat", **kw, **bad)
    pipe.vae.register_to_config(latent_channels=3)  # noise of 3 channels beside 4-channel masked-image latents
    with pytest.raises(ValueError, match=r"vae: the UNet takes 9 input channels.* 3 \+ 1 \+ 4 = 8"):
        fast("a cat", **kw)
    pipe.unet = tiny_sd(diffusers.EulerDiscreteScheduler()).unet  # swapped after accelerate()
    with pytest.raises(TypeError, match="StableDiffusionInpaintPipeline with a 4-channel UNet"):
        fast("a cat", **kw)

#----------------------------------------------------------------------------
# The loop as a captured graph (CPU stand-in): new images, masks and time ids are data of one capture.


def graphed(pipe):
    acc = dd.accelerate(pipe, graph=False)
    acc.__dict__["graph"] = True  # accelerate refuses graph=True without CUDA; the fake fixture captures on CPU
    return acc


def test_graph_inpaint_replays_new_images_and_masks(tiny_sd, fake):
    pipe = inpaint_pipe(tiny_sd, diffusers.DPMSolverMultistepScheduler(**SD))
    fast, eager = graphed(pipe), dd.accelerate(pipe, graph=False)
    for seed, kw in ((0, {}), (1, {"mask_image": _mask(seed=11)}), (2, {"image": _image(seed=12), "strength": 1.0}),
                     (0, {"guidance_scale": 6.0, "mask_image": _mask(seed=13)})):
        want = inpaint_call(eager, torch.Generator().manual_seed(seed), **kw)
        got = inpaint_call(fast, torch.Generator().manual_seed(seed), **kw)
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=str(kw))
    assert graphs.info()["captures"] == 1 and graphs.info()["replays"] == 4


def test_graph_sdxl_img2img_replays_new_images_and_time_ids(tiny_sdxl, fake):
    pipe = sdxl_img2img(tiny_sdxl, diffusers.UniPCMultistepScheduler.from_config(SDXL_SCHEDULER), refiner=True)
    fast, eager = graphed(pipe), dd.accelerate(pipe, graph=False)
    for seed, kw in ((0, {}), (1, {"image": _image(seed=9), "aesthetic_score": 3.0}),
                     (0, {"negative_aesthetic_score": 1.0, "guidance_scale": 6.0}), (2, {"guidance_rescale": 0.5})):
        want = sdxl_call(eager, torch.Generator().manual_seed(seed), **kw)
        got = sdxl_call(fast, torch.Generator().manual_seed(seed), **kw)
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=str(kw))
    assert graphs.info()["captures"] == 2  # plain CFG and rescaled CFG


@pytest.mark.cuda
def test_cuda_graph_replays_match_eager(tiny_sd, tiny_sdxl):
    """Real CUDA graphs: new masks, images and aesthetic scores replay one capture, bitwise the eager fused loop."""
    cases = [(inpaint_pipe(tiny_sd, diffusers.DPMSolverMultistepScheduler(**SD)), inpaint_call,
              ({}, {"mask_image": _mask(seed=11)}, {"image": _image(seed=12)})),
             (sdxl_img2img(tiny_sdxl, diffusers.UniPCMultistepScheduler.from_config(SDXL_SCHEDULER), refiner=True),
              sdxl_call, ({}, {"image": _image(seed=9)}, {"aesthetic_score": 3.0}))]
    for pipe, call, kws in cases:
        pipe = pipe.to("cuda")
        fast, eager = dd.accelerate(pipe, graph=True), dd.accelerate(pipe, graph=False)
        graphs.clear()
        for kw in kws:
            want = call(eager, torch.Generator("cuda").manual_seed(0), **kw)
            got = call(fast, torch.Generator("cuda").manual_seed(0), **kw)
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=str(kw))
        assert graphs.info()["captures"] == 1
