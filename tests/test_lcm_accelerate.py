"""LCM at Level 2: ``diffkern.diffusers.accelerate`` on pipelines whose scheduler is ``LCMScheduler`` (the fused ``lcm``
sampler on the boundary-conditioned denoiser, :class:`diffkern.diffusers.accelerate.ScheduleDenoiser`).

Oracles (the project rule, ``diffkern.testing.assert_matches_reference``):
- one step (no re-noising): the stock pipeline with diffusers' ``LCMScheduler``, run in float64 (``float64_lcm``) as
  the truth and in float32 as the yardstick;
- several steps: LCM re-noises every step, with the generator in diffusers and with Philox in the fused loop, so
  the reference is the same pipeline driven by diffkern's Level-1 ``LCMScheduler`` keyed by the seed that Level 2
  draws from the generator (float64 truth, float32 yardstick).
- the conversion itself: the wrapper's D against the LCM step's ``c_skip*z + c_out*x0`` in float64.
"""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.diffusers.accelerate import ScheduleDenoiser  # noqa: E402
from diffkern.diffusers.schedulers_lcm import boundary_scalings, x0_conversion  # noqa: E402
from diffkern.testing import assert_matches_reference  # noqa: E402
from test_diffusers_pipelines import pipeline_modules, tiny_sd, tiny_unet  # noqa: E402, F401
from test_diffusers_schedulers import diffusers_float64  # noqa: E402
from test_diffusers_sdxl import tiny_sdxl  # noqa: E402, F401
from test_lcm import float64_lcm  # noqa: E402

PREDICTIONS = ("epsilon", "v_prediction", "sample")
# scaled_linear betas (eps images from t = 999 stay in (0, 1)); a small timestep_scaling gives the boundary condition
# weight (c_skip = 0.06 at t = 999, 0.98 at t = 39; LCM's 10 gives c_skip < 1e-5 at every t >= 19)
UNCOND = {"original_inference_steps": 25, "timestep_scaling": 0.002}


def float64_copy(pipe, scheduler):
    twin = copy.deepcopy(pipe)
    for module in twin.components.values():
        if isinstance(module, torch.nn.Module):
            module.double()
    twin.scheduler = scheduler
    return twin


def unconditional(pipe, generator, steps, **kw):
    return pipe(batch_size=2, generator=generator, num_inference_steps=steps, output_type="pt", **kw).images


def text2image(pipe, generator, steps, **kw):
    """Two prompts with CFG (LCM-LoRA's small guidance), one with a negative prompt; images as a tensor."""
    return pipe(["a cat", "a dog"], generator=generator, num_inference_steps=steps, guidance_scale=1.5,
                negative_prompt=["blurry", ""], output_type="pt", **kw).images


def one_step_runs(pipe, call):
    """(Level 2, float64 truth, float32 stock pipeline) of a one-step ``call(pipe, generator, 1)``."""
    config = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    with float64_lcm(True), diffusers_float64(*pipeline_modules(pipe)):
        truth = call(float64_copy(pipe, diffusers.LCMScheduler(**config)), torch.Generator().manual_seed(5), 1)
    eager = call(pipe, torch.Generator().manual_seed(5), 1)
    ours = call(dd.accelerate(pipe), torch.Generator().manual_seed(5), 1)
    assert 0.1 < float(((eager > 0) & (eager < 1)).float().mean()), "images saturated: the comparison would be void"
    return ours, truth, eager


def philox_runs(pipe, call, steps, latents=None):
    """(Level 2, Level 1 float64, Level 1 float32) of ``call``: Level 1 is diffkern's LCMScheduler with Philox noise
    keyed by the seed Level 2 draws from the generator right after the initial latents (given as ``latents``, else
    drawn by the generator: then Level 1 is DDPMPipeline's loop written out, as the pipeline would pass its generator
    to step(), which would draw diffusers' noise)."""
    fast = dd.accelerate(pipe)
    kw = {} if latents is None else {"latents": latents}
    ours = call(fast, torch.Generator().manual_seed(3), steps, **kw)
    torch.testing.assert_close(call(fast, torch.Generator().manual_seed(3), steps, **kw), ours, rtol=0, atol=0)
    assert not torch.allclose(call(fast, torch.Generator().manual_seed(4), steps, **kw), ours)
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(ours.shape, generator=gen) if latents is None else latents
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen))

    def level1(p, dtype):
        sched = dd.LCMScheduler.from_config(pipe.scheduler.config)
        sched.set_seed(seed)
        if latents is not None:
            p.scheduler = sched
            return call(p, None, steps, latents=latents.to(dtype))
        sched.set_timesteps(steps)
        image = noise.to(dtype)
        for t in sched.timesteps:
            image = sched.step(p.unet(image, t).sample, t, image).prev_sample
        return (image / 2 + 0.5).clamp(0, 1)
    with diffusers_float64(*pipeline_modules(pipe)):
        truth = level1(float64_copy(pipe, None), torch.float64)
    eager = level1(pipe, torch.float32)
    assert float((eager - truth).abs().max()) < 1e-3, "Level 1 float32 far from float64: the comparison would be void"
    return ours, truth, eager

#----------------------------------------------------------------------------
# The conversion: the denoiser is the LCM step's denoised estimate, in VE coordinates.


@pytest.mark.parametrize("pred", PREDICTIONS)
def test_denoiser_is_the_consistency_function(pred):
    """D(x, sigma) = c_skip(t)*z + c_out(t)*x0(z, m), z = x/sqrt(sigma^2 + 1), at the schedule's timestep t: the
    float (table) and tensor (device) conversions agree, on the schedule and off it (interpolated t)."""
    sched = dd.LCMScheduler(prediction_type=pred)
    sched.set_timesteps(4)
    ts = sched._host_timesteps
    sigmas = sched.train_sigmas[ts].tolist()
    net = lambda x, t, **kw: (torch.sin(x + t[:, None, None, None].to(x.dtype) / 100),)  # noqa: E731
    den = ScheduleDenoiser(net, sched.alphas_cumprod, pred, sigmas, ts, timestep_scaling=10.0)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    for t, s in zip(ts, sigmas):
        ab = float(sched.alphas_cumprod[t])
        z, m = x * ab ** 0.5, net(x * ab ** 0.5, torch.full((3,), float(t)))[0]
        c_skip, c_out = boundary_scalings(t, 10.0)
        p, q = x0_conversion(pred, ab)
        want = c_skip * z + c_out * (p * z + q * m)
        torch.testing.assert_close(den(x, s), want, rtol=1e-12, atol=1e-12)
    for s in sigmas + [0.5 * (sigmas[0] + sigmas[1]), 1e-3, 1e4]:
        host = den.conversion(s)
        dev = den.conversion(torch.tensor([s], dtype=torch.float64))
        torch.testing.assert_close(torch.tensor(host, dtype=torch.float64), torch.cat(dev), rtol=1e-6, atol=0)

#----------------------------------------------------------------------------
# Unconditional UNet2DModel pipelines.


@pytest.mark.parametrize("pred", PREDICTIONS)
def test_unconditional_one_step_equals_the_pipeline(pred):
    pipe = diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=diffusers.LCMScheduler(**UNCOND, prediction_type=pred))
    pipe.set_progress_bar_config(disable=True)
    ours, truth, eager = one_step_runs(pipe, unconditional)
    assert_matches_reference(ours, truth, eager, f"LCM {pred} one step")
    # another method on the LCM schedule runs on the same boundary-conditioned denoiser: one Euler step to 0 is D
    euler = unconditional(dd.accelerate(pipe, method="euler"), torch.Generator().manual_seed(5), 1)
    assert_matches_reference(euler, truth, eager, f"LCM {pred} one Euler step")


@pytest.mark.parametrize("pred", PREDICTIONS)
def test_unconditional_multistep_matches_level1_philox(pred):
    pipe = diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=diffusers.LCMScheduler(**UNCOND, prediction_type=pred))
    pipe.set_progress_bar_config(disable=True)
    ours, truth, eager = philox_runs(pipe, unconditional, 4)
    assert_matches_reference(ours, truth, eager, f"LCM {pred} level 2 vs level 1")


def test_method_overrides_and_knobs_run_on_the_consistency_function():
    """Other samplers (here with off-schedule calls: KDPM2's midpoints) and lcm's s_noise run; s_noise=0 is
    deterministic (no seed drawn), so two generators give the same images."""
    pipe = diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=diffusers.LCMScheduler(**UNCOND))
    pipe.set_progress_bar_config(disable=True)
    out = unconditional(dd.accelerate(pipe, method="dpm_2"), torch.Generator().manual_seed(0), 3)
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()
    calm = dd.accelerate(pipe, method="lcm", s_noise=0.0)
    a, b = (unconditional(calm, torch.Generator().manual_seed(k), 3) for k in (0, 0))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_refusals_name_the_cause():
    pipe = diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=diffusers.LCMScheduler(
        prediction_type="v_prediction", rescale_betas_zero_snr=True))
    with pytest.raises(ValueError, match="LCMScheduler with rescale_betas_zero_snr=True .*infinite VE sigma"):
        dd.accelerate(pipe)
    pipe.scheduler = diffusers.LCMScheduler(clip_sample=True)
    with pytest.raises(ValueError, match="clip_sample"):
        dd.accelerate(pipe)

#----------------------------------------------------------------------------
# Text-to-image: the stock StableDiffusionPipeline / StableDiffusionXLPipeline with LCMScheduler (LCM-LoRA usage).


@pytest.mark.parametrize("pred, scaling", [("epsilon", 10.0), ("v_prediction", 0.002)])
def test_stable_diffusion(tiny_sd, pred, scaling):
    pipe = tiny_sd(diffusers.LCMScheduler(prediction_type=pred, timestep_scaling=scaling))
    ours, truth, eager = one_step_runs(pipe, text2image)
    assert_matches_reference(ours, truth, eager, f"SD LCM {pred} one step")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    ours, truth, eager = philox_runs(pipe, text2image, 3, latents=latents)
    assert_matches_reference(ours, truth, eager, f"SD LCM {pred} level 2 vs level 1")


def test_stable_diffusion_xl(tiny_sdxl):
    pipe = tiny_sdxl(diffusers.LCMScheduler())
    ours, truth, eager = one_step_runs(pipe, text2image)
    assert_matches_reference(ours, truth, eager, "SDXL LCM one step")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    ours, truth, eager = philox_runs(pipe, text2image, 2, latents=latents)
    assert_matches_reference(ours, truth, eager, "SDXL LCM level 2 vs level 1")


def test_guidance_embedding_unets_outside_the_lcm_pipeline_stay_refused(tiny_sd):
    """A guidance-embedding UNet (time_cond_proj_dim) runs in LatentConsistencyModelPipeline only (its tests:
    test_lcm_pipeline.py), which needs one: elsewhere it is refused by name, pointing to Level 1."""
    sd = tiny_sd(diffusers.LCMScheduler())
    config = {k: v for k, v in sd.unet.config.items() if not k.startswith("_")}
    unet = diffusers.UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": 8})
    parts = {k: sd.components[k] for k in ("vae", "text_encoder", "tokenizer", "scheduler")}
    lcm = diffusers.LatentConsistencyModelPipeline(**parts, unet=unet, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    assert dd.accelerate(lcm).kind == "lcm"
    lcm.unet, sd.unet = sd.unet, unet
    with pytest.raises(TypeError, match="LatentConsistencyModelPipeline: guidance-embedding UNets .*needs one"):
        dd.accelerate(lcm)
    with pytest.raises(TypeError, match="StableDiffusionPipeline: guidance-embedding UNets "
                                        r"\(time_cond_proj_dim.*diffkern.diffusers.LCMScheduler"):
        dd.accelerate(sd)


@pytest.mark.cuda
def test_cuda_graph_matches_eager(tiny_sd):
    """The per-step boundary condition is table data: a new step count or timestep_scaling replays or recaptures
    with the eager loop's values, bitwise."""
    pipe = tiny_sd(diffusers.LCMScheduler(timestep_scaling=0.002)).to("cuda")
    for steps in (3, 4, 3):
        eager = text2image(dd.accelerate(pipe, graph=False), torch.Generator("cuda").manual_seed(0), steps)
        graph = text2image(dd.accelerate(pipe, graph=True), torch.Generator("cuda").manual_seed(0), steps)
        torch.testing.assert_close(graph, eager, rtol=0, atol=0)
