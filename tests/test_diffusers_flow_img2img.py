"""Level 2 flow-matching image-to-image: ``dd.accelerate(StableDiffusion3Img2ImgPipeline / FluxImg2ImgPipeline)``
runs the last ``strength`` fraction of the flow schedule (from the pipeline's own ``scale_noise`` start) in the fused
loop (:mod:`diffkern.diffusers.accelerate_flow_img2img`).

Tiny random models, no downloads: the SD3 and Flux pipelines of test_diffusers_flow.py / test_diffusers_flux.py with
pre-computed embeddings (and negatives), 16x16 images. Deterministic schedulers (FlowMatchEuler, SD3's FlowMatchHeun)
compare with the stock pipeline by the project's rule: the truth is the stock pipeline in float64 (modules, scheduler
and pipeline module; the same float32 draws, the VAE encoder's posterior sample included), ours within twice the
stock float32 run's distance to it. ``stochastic_sampling`` draws Philox noise: it is compared with diffkern's
Level-1 scheduler on the same seed and the tail's schedule. Second calls run under the strict CPU capture stand-in
of test_level2_gpu_readiness.py.
"""
import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import diffkern.diffusers as dd  # noqa: E402
import test_diffusers_flux as flux  # noqa: E402
import test_diffusers_sd3 as sd3  # noqa: E402
from diffkern.diffusers.loop_spec import FLOW_TOP  # noqa: E402
from diffkern.testing import assert_matches_reference  # noqa: E402
from test_diffusers_flow import tiny_sd3  # noqa: E402
from test_graphs import fresh_cache  # noqa: E402, F401  (autouse)
from test_level2_gpu_readiness import _second_calls, _truth, strict  # noqa: E402, F401  (strict: a fixture)

EULER, HEUN = diffusers.FlowMatchEulerDiscreteScheduler, diffusers.FlowMatchHeunDiscreteScheduler
SD3 = {"shift": 3.0}
DYNAMIC = {"use_dynamic_shifting": True, "base_image_seq_len": 16, "max_image_seq_len": 256}


def _pixels(seed, batch=2):
    return torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def sd3_img2img(scheduler):
    pipe = diffusers.StableDiffusion3Img2ImgPipeline(**tiny_sd3(scheduler).components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_img2img(scheduler, guidance_embeds=True):
    pipe = diffusers.FluxImg2ImgPipeline(**flux.tiny_flux(scheduler, guidance_embeds).components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_call(pipe, generator, output_type="pt", image=None, **kw):
    """Two prompts' embeddings with CFG (test_diffusers_sd3's), ``image`` (default: pixels of seed 3)."""
    out = sd3.embeds_call(pipe, generator, output_type, image=_pixels(3) if image is None else image, **kw)
    return torch.as_tensor(out)


def flux_call(pipe, generator, output_type="pt", image=None, **kw):
    """Two prompts' embeddings and negatives (test_diffusers_flux's), ``image`` (default: pixels of seed 3)."""
    out = flux.embeds_call(pipe, generator, output_type, image=_pixels(3) if image is None else image, **kw)
    return torch.as_tensor(out)


def _parity(pipe, call, monkeypatch, what, **kw):
    truth = _truth(pipe, call, monkeypatch, torch.Generator().manual_seed(5), **kw)
    eager = call(pipe, torch.Generator().manual_seed(5), **kw)
    ours = call(dd.accelerate(pipe), torch.Generator().manual_seed(5), **kw)
    assert ours.shape == eager.shape and ours.dtype == eager.dtype
    if kw.get("output_type", "pt") != "latent":
        assert 0.1 < float(((eager > 0) & (eager < 1)).float().mean()), "images saturated"
    assert_matches_reference(ours, truth, eager, what)


STRENGTHS = [(s, n) for s in (1.0, 0.75, 0.3) for n in (2, 5)]  # N = 2 at 0.75: t_start = int(0.5) = 0, t = 1


@pytest.mark.parametrize("strength, n", STRENGTHS)
def test_sd3_euler_matches_the_pipeline(monkeypatch, strength, n):
    _parity(sd3_img2img(EULER(**SD3)), sd3_call, monkeypatch, f"SD3 img2img {strength} {n}", strength=strength,
            num_inference_steps=n)


@pytest.mark.parametrize("config, kw", [
    (DYNAMIC, {"strength": 0.6, "output_type": "latent"}),
    (DYNAMIC, {"strength": 0.5, "mu": 0.3, "image": _pixels(4, batch=1)}),
    (SD3, {"strength": 0.7, "sigmas": [1.0, 0.8, 0.45, 0.2], "guidance_scale": 1.0, "output_type": "np"}),
    (dict(SD3, use_karras_sigmas=True), {"strength": 0.9, "num_inference_steps": 4}),
], ids=lambda v: str(v)[:40])
def test_sd3_euler_options_match_the_pipeline(monkeypatch, config, kw):
    """Dynamic shift (the pipeline's mu from height/width, or given), one image for two prompts, custom sigmas, no
    CFG, Karras sigmas. (Not num_images_per_prompt: with pre-computed pooled embeddings the stock pipeline's
    encode_prompt repeats the embeddings but not the pooled ones, and its transformer call fails.)"""
    _parity(sd3_img2img(EULER(**config)), sd3_call, monkeypatch, f"SD3 img2img {config} {kw}", **kw)


@pytest.mark.parametrize("strength, n", [(1.0, 2), (1.0, 5), (0.75, 2), (0.75, 5), (0.2, 5)])
def test_sd3_heun_matches_the_pipeline(monkeypatch, strength, n):
    """The begin index is t_start*2 of the 2N - 1 calls: 0.75 of 5 steps begins at step int(5 - 3.75) = 1, 0.2 at
    step 4 (the last: Euler to 0)."""
    pipe = sd3_img2img(HEUN(**SD3))
    _parity(pipe, sd3_call, monkeypatch, f"SD3 img2img heun {strength} {n}", strength=strength,
            num_inference_steps=n)


@pytest.mark.parametrize("strength, n", STRENGTHS)
def test_flux_euler_matches_the_pipeline(monkeypatch, strength, n):
    _parity(flux_img2img(EULER(**flux.DEV)), flux_call, monkeypatch, f"Flux img2img {strength} {n}",
            strength=strength, num_inference_steps=n)


@pytest.mark.parametrize("guidance_embeds, config, kw", [
    (False, flux.DEV, {"strength": 0.6, "true_cfg_scale": 2.5}),
    (True, flux.SCHNELL, {"strength": 0.8, "sigmas": [1.0, 0.6, 0.25], "output_type": "latent"}),
    (True, flux.DEV, {"strength": 0.6, "image": _pixels(4, batch=1)}),
], ids=lambda v: str(v)[:40])
def test_flux_options_match_the_pipeline(monkeypatch, guidance_embeds, config, kw):
    """True CFG with negatives, custom sigmas (FLUX.1-schnell's shift), one image for two prompts."""
    _parity(flux_img2img(EULER(**config), guidance_embeds), flux_call, monkeypatch, f"Flux img2img {kw}", **kw)


def test_begin_step_is_the_pipelines():
    """strength 1 begins at t = 1 (FLOW_TOP); strength 0.3 of 5 steps at step int(5 - 1.5) = 3, the scheduler's own
    sigmas and timesteps from there."""
    fast = dd.accelerate(sd3_img2img(EULER(**SD3)))
    from diffkern.diffusers.accelerate_flow_img2img import flow_tail

    whole, _ = flow_tail(fast, 5, 1.0, 2)
    tail, first = flow_tail(fast, 5, 0.3, 2)
    assert whole.sigmas[0] == FLOW_TOP and len(whole.timesteps) == 5
    assert tail.sigmas == whole.sigmas[3:] and tail.timesteps == whole.timesteps[3:]
    torch.testing.assert_close(first, fast.pipe.scheduler.timesteps[3:4].repeat(2))
    assert fast.pipe.scheduler.begin_index == 3


def _level1_on_tail(pipe, call, config, seed, latents, sigmas, dtype, strength=1.0):
    """diffkern's Level-1 stochastic scheduler in the stock pipeline from ``latents``, keyed by ``seed``, on the
    flow ``sigmas`` of the whole schedule (shift 1: they run as given) from ``strength``'s begin step."""
    ours = dd.FlowMatchEulerDiscreteScheduler(**dict(config, shift=1.0, use_dynamic_shifting=False))
    ours.set_seed(seed)
    pipe = pipe.to(dtype)
    pipe.scheduler = ours
    return call(pipe, None, latents=latents.to(dtype), strength=strength, sigmas=sigmas)


@pytest.mark.parametrize("which, strength, n", [("sd3", 1.0, 3), ("sd3", 0.6, 5), ("flux", 0.6, 5),
                                                ("flux", 0.3, 2)])
def test_stochastic_level2_matches_level1_philox(which, strength, n):
    """stochastic_sampling is lcm on the tail's VE sigmas with Philox noise keyed by a seed drawn from the generator
    after the starting latents (here given, so the first draw): diffkern's Level-1 scheduler on that seed, from the
    begin step of the whole schedule (set_begin_index: the tail draws the whole loop's noise rows there)."""
    make, call, config = ((sd3_img2img, sd3_call, SD3), (flux_img2img, flux_call, flux.DEV))[which == "flux"]
    config = dict(config, stochastic_sampling=True)
    fast = dd.accelerate(make(EULER(**config)))
    shape = (2, 4, 8, 8) if which == "sd3" else (2, 16, 16)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    ours = call(fast, torch.Generator().manual_seed(3), latents=latents, strength=strength, num_inference_steps=n)
    again = call(fast, torch.Generator().manual_seed(3), latents=latents, strength=strength, num_inference_steps=n)
    torch.testing.assert_close(again, ours, rtol=0, atol=0)
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=torch.Generator().manual_seed(3)))
    from diffkern.diffusers.accelerate_flow_img2img import flow_tail
    from diffkern.diffusers.accelerate_flux import flux_mu

    kw = {"sigmas": np.linspace(1.0, 1 / n, n), "mu": flux_mu(fast.pipe, 16)} if which == "flux" else {}
    spec, _ = flow_tail(fast, n, 1.0, 2, **kw)  # the whole schedule
    assert spec.method == "lcm"
    ts = [s / (1.0 + s) if s != FLOW_TOP else 1.0 for s in spec.sigmas[:-1]]
    runs = [_level1_on_tail(make(EULER(**config)), call, config, seed, latents, ts, dtype, strength)
            for dtype in (torch.float64, torch.float32)]
    assert_matches_reference(ours, *runs, f"{which} stochastic img2img {strength} {n}: level 2 vs level 1")


def test_graph_sd3_img2img_second_calls(strict, monkeypatch):
    """Later calls with other images and strengths (0.6 and 0.3 of 5 steps: two schedules, two captures; 0.6 met
    again replays its capture), bitwise the eager fused loop and by the rule the stock pipeline."""
    cases = [(0, {"strength": 0.6, "num_inference_steps": 5}),
             (1, {"strength": 0.3, "num_inference_steps": 5, "image": _pixels(31)}),
             (2, {"strength": 0.6, "num_inference_steps": 5, "image": _pixels(32), "guidance_scale": 5.0})]
    _second_calls(sd3_img2img(EULER(**SD3)), sd3_call, cases, monkeypatch, captures=2)


def test_graph_sd3_heun_and_flux_img2img_second_calls(strict, monkeypatch):
    from diffkern import graphs

    cases = [(0, {"strength": 0.75, "num_inference_steps": 5}),
             (1, {"strength": 0.75, "num_inference_steps": 5, "image": _pixels(33)})]
    _second_calls(sd3_img2img(HEUN(**SD3)), sd3_call, cases, monkeypatch, captures=1)
    graphs.clear()
    cases = [(0, {"strength": 0.6, "num_inference_steps": 4}),
             (1, {"strength": 0.9, "num_inference_steps": 4, "image": _pixels(34), "guidance_scale": 2.0}),
             (2, {"strength": 0.6, "num_inference_steps": 4, "image": _pixels(35), "true_cfg_scale": 1.0})]
    _second_calls(flux_img2img(EULER(**flux.DEV)), flux_call, cases, monkeypatch, captures=2)


def test_kinds_and_refusals():
    sd3_fast = dd.accelerate(sd3_img2img(EULER(**SD3)))
    flux_fast = dd.accelerate(flux_img2img(EULER(**flux.DEV)))
    assert (sd3_fast.kind, flux_fast.kind) == ("sd3_img2img", "flux_img2img")
    g = torch.Generator().manual_seed(0)
    for fast, call in ((sd3_fast, sd3_call), (flux_fast, flux_call)):
        with pytest.raises(ValueError, match=r"strength: 0\.0 with num_inference_steps=4 leaves no denoising step"):
            call(fast, g, strength=0.0, num_inference_steps=4)
        with pytest.raises(ValueError, match="strength"):  # the pipeline's own check_inputs
            call(fast, g, strength=1.5)
        for bad in ({"callback_on_step_end": lambda *a: {}}, {"ip_adapter_image_embeds": [torch.zeros(2, 1, 4)]},
                    {"joint_attention_kwargs": {"scale": 1.0, "attention_mask": None}}):
            with pytest.raises(TypeError, match=next(iter(bad))):
                call(fast, g, strength=0.6, **bad)
    with pytest.raises(ValueError, match="image: expected"):
        sd3_fast(prompt_embeds=torch.zeros(1, 7, 32), pooled_prompt_embeds=torch.zeros(1, 64), height=16, width=16)
    heun = dd.accelerate(sd3_img2img(HEUN(**SD3)))
    with pytest.raises(ValueError, match=r"strength: 1e-17 with num_inference_steps=5 leaves no denoising step"):
        sd3_call(heun, g, strength=1e-17, num_inference_steps=5)  # 5 - 5e-17 rounds to 5: t_start = 5
    with pytest.raises(ValueError, match="sigmas: FlowMatchHeunDiscreteScheduler takes no custom sigmas"):
        sd3_call(heun, g, strength=0.6, sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="mu: FlowMatchHeunDiscreteScheduler takes no dynamic shift"):
        sd3_call(heun, g, strength=0.6, mu=0.5)
    with pytest.raises(ValueError, match="FluxImg2ImgPipeline with a FlowMatchHeunDiscreteScheduler"):
        dd.accelerate(flux_img2img(HEUN(**SD3)))
    with pytest.raises(ValueError, match="invert_sigmas"):
        dd.accelerate(sd3_img2img(EULER(shift=2.0, invert_sigmas=True)))
