"""Level 2 (``accelerate``) with diffusers' EDM schedulers (``EDMEulerScheduler``, ``EDMDPMSolverMultistepScheduler``:
Playground v2.5, CosXL) in the stock SD and SDXL pipelines.

The project's rule on whole pipelines (``test_diffusers_pipelines.py``): the truth is the stock pipeline in float64
(every module in float64, diffusers' scheduler and pipeline modules under ``diffusers_float64``, the same float32
random draws), the yardstick the stock float32 run; the fused loop runs with diffusers' scheduler and with
diffkern's EDM drop-in as the pipeline's scheduler. The SDE ("sde-dpmsolver++") draws Philox noise at Level 2, so
it is checked against diffkern's Level-1 scheduler on the same Philox seed, in float64 and float32.
"""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.testing import assert_matches_reference  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402
from test_diffusers_edm import MODULES  # noqa: E402
from test_diffusers_pipelines import pipeline_modules, tiny_sd  # noqa: E402, F401  (tiny_sd: a fixture)
from test_lcm_accelerate import float64_copy  # noqa: E402  (every module in float64)
from test_diffusers_schedulers import _randn32, diffusers_float64  # noqa: E402
from test_diffusers_sdxl import tiny_sdxl  # noqa: E402, F401  (a fixture)

EULER, DPM = "EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"
V = {"prediction_type": "v_prediction"}
EXP = {"sigma_schedule": "exponential"}
# exponential sigmas whose float32 end is sigma_min itself: a last step from sigma_min to itself (dropped)
EXP_END = dict(EXP, sigma_min=0.25, final_sigmas_type="sigma_min")


def edm_runs(pipe, monkeypatch, name, config, call):
    """{"truth", "eager", "diffusers", "diffkern"}: ``call(pipe, generator)`` on the float64 and float32 stock
    pipeline with diffusers' ``name`` scheduler of ``config``, and through ``accelerate`` with diffusers' scheduler
    and with diffkern's drop-in as the pipeline's scheduler."""
    import diffusers.models.autoencoders.vae as vae_module

    theirs = getattr(diffusers, name)
    pipe.scheduler = theirs.from_config(config)
    with diffusers_float64(MODULES[name], *pipeline_modules(pipe)), monkeypatch.context() as m:
        m.setattr(vae_module, "randn_tensor", _randn32(vae_module.randn_tensor))  # img2img: the posterior's draw
        truth = call(float64_copy(pipe, theirs.from_config(config)), torch.Generator().manual_seed(5))
    out = {"truth": truth, "eager": call(pipe, torch.Generator().manual_seed(5))}
    out["diffusers"] = call(dd.accelerate(pipe), torch.Generator().manual_seed(5))
    pipe.scheduler = getattr(dd, name).from_config(config)
    out["diffkern"] = call(dd.accelerate(pipe), torch.Generator().manual_seed(5))
    return out


def check(out, what):
    assert 0.1 < float(((out["eager"] > 0) & (out["eager"] < 1)).float().mean()), "images saturated"
    for level in ("diffusers", "diffkern"):
        assert out[level].shape == out["eager"].shape and out[level].dtype == out["eager"].dtype
        assert_matches_reference(out[level], out["truth"], out["eager"], f"{what} (accelerate, {level} scheduler)")


def text2image(steps, **kw):
    """Two prompts with CFG, one with a negative prompt; images as a (2, 3, 16, 16) tensor."""
    def call(pipe, generator):
        return pipe(["a cat", "a dog"], generator=generator, num_inference_steps=steps, guidance_scale=4.0,
                    negative_prompt=["blurry", ""], output_type="pt", **kw).images
    return call


CASES = [  # (scheduler, config, steps)
    (EULER, {}, 1), (EULER, {}, 2), (EULER, {}, 5),
    (EULER, dict(V, sigma_data=1.0, **EXP), 5),  # CosXL-like
    (EULER, V, 2), (EULER, EXP, 1),
    (EULER, {"final_sigmas_type": "sigma_min", "sigma_min": 0.03}, 5),  # a last step sigma_min -> itself, dropped
    (DPM, {}, 1), (DPM, {}, 2), (DPM, {}, 5),
    (DPM, dict(V, **EXP), 5),
    (DPM, {"solver_order": 1}, 5), (DPM, dict(V, solver_order=1), 2),
    (DPM, {"solver_order": 3}, 5), (DPM, dict(EXP, solver_order=3, lower_order_final=False), 5),
    (DPM, {"solver_order": 3}, 2), (DPM, dict(V, solver_order=3), 1),
    (DPM, {"solver_type": "heun"}, 5), (DPM, dict(V, solver_type="heun", **EXP), 2),
    (DPM, {"euler_at_final": True}, 5),
    (DPM, dict(EXP_END, euler_at_final=True), 5), (DPM, dict(EXP_END, solver_type="heun"), 2),
]
IDS = [f"{n[3:-9]}-{c}-{s}" for n, c, s in CASES]


@pytest.mark.parametrize("name, config, steps", CASES, ids=IDS)
def test_sdxl_level2_matches_the_pipeline(tiny_sdxl, monkeypatch, name, config, steps):
    out = edm_runs(tiny_sdxl(getattr(diffusers, name)()), monkeypatch, name, config, text2image(steps))
    check(out, f"SDXL {name} {config} {steps} steps")


@pytest.mark.parametrize("name, config, steps", [(EULER, {}, 2), (EULER, dict(V, **EXP), 5), (DPM, {}, 5),
                                                 (DPM, dict(V, solver_order=3, solver_type="heun"), 5),
                                                 (DPM, dict(EXP, solver_order=1), 1)], ids=str)
def test_sd_level2_matches_the_pipeline(tiny_sd, monkeypatch, name, config, steps):
    out = edm_runs(tiny_sd(getattr(diffusers, name)()), monkeypatch, name, config, text2image(steps))
    check(out, f"SD {name} {config} {steps} steps")


@pytest.mark.parametrize("name, config", [(EULER, V), (DPM, {"solver_order": 3})], ids=str)
def test_sdxl_level2_guidance_rescale_and_no_cfg(tiny_sdxl, monkeypatch, name, config):
    """``guidance_rescale`` (the raw outputs combined in PyTorch before the EDM conversion) and a run without CFG."""
    pipe = tiny_sdxl(getattr(diffusers, name)())
    check(edm_runs(pipe, monkeypatch, name, config, text2image(5, guidance_rescale=0.7)), f"SDXL {name} rescale")

    def no_cfg(p, generator):
        return p("a cat", generator=generator, num_inference_steps=3, guidance_scale=1.0, output_type="pt").images
    check(edm_runs(pipe, monkeypatch, name, config, no_cfg), f"SDXL {name} without CFG")


def _image():
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name, config, strength", [(EULER, {}, 0.6), (DPM, {}, 0.6), (DPM, {"solver_order": 3}, 0.7),
                                                    (DPM, dict(V, **EXP), 1.0)], ids=str)
def test_sdxl_img2img_level2(tiny_sdxl, monkeypatch, name, config, strength):
    """The SDXL img2img tail: the pipeline's ``add_noise`` at the begin step's sigma, the loop from there."""
    base = tiny_sdxl(getattr(diffusers, name)())
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline(**base.components)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.register_to_config(force_upcast=False)  # (image.float() would feed float32 to the float64 twin's VAE)
    out = edm_runs(pipe, monkeypatch, name, config, text2image(6, image=_image(), strength=strength))
    check(out, f"SDXL img2img {name} {config} strength {strength}")


def test_sd_img2img_level2(tiny_sd, monkeypatch):
    pipe = diffusers.StableDiffusionImg2ImgPipeline(**tiny_sd(diffusers.EDMEulerScheduler()).components)
    pipe.set_progress_bar_config(disable=True)
    out = edm_runs(pipe, monkeypatch, EULER, V, text2image(5, image=_image(), strength=0.5))
    check(out, "SD img2img EDMEuler strength 0.5")

#----------------------------------------------------------------------------
# The SDE: Level 2's Philox noise against diffkern's Level-1 scheduler on the same seed.


def _level1_sd_loop(pipe, config, steps, dtype):
    """StableDiffusionPipeline's loop (CFG 4.0, two prompts), written out, with diffkern's EDM DPM scheduler drawing
    Philox noise keyed by the seed accelerate draws from the generator right after the initial latents."""
    pipe = float64_copy(pipe, None) if dtype == torch.float64 else pipe
    sched = dd.EDMDPMSolverMultistepScheduler(**config)
    gen = torch.Generator().manual_seed(5)
    embeds, negative = pipe.encode_prompt(["a cat", "a dog"], "cpu", 1, True, ["blurry", ""])
    latents = randn_tensor((2, 4, 8, 8), generator=gen, dtype=torch.float32).to(dtype) * sched.init_noise_sigma
    sched.set_seed(int(torch.randint(0, 2 ** 62, (1,), generator=gen)))
    sched.set_timesteps(steps)
    for t in sched.timesteps:
        x_in = sched.scale_model_input(torch.cat([latents] * 2), t)
        uncond, cond = pipe.unet(x_in, t, encoder_hidden_states=torch.cat([negative, embeds])).sample.chunk(2)
        latents = sched.step(uncond + 4.0 * (cond - uncond), t, latents).prev_sample
    return latents


@pytest.mark.parametrize("config", [{"algorithm_type": "sde-dpmsolver++"},
                                    {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun", **V, **EXP},
                                    {"algorithm_type": "sde-dpmsolver++", "solver_order": 1}], ids=str)
def test_sde_level2_matches_level1_philox(tiny_sd, config):
    pipe = tiny_sd(diffusers.EDMDPMSolverMultistepScheduler(**config))
    fast = dd.accelerate(pipe)

    def level2():
        return fast(["a cat", "a dog"], generator=torch.Generator().manual_seed(5), num_inference_steps=5,
                    guidance_scale=4.0, negative_prompt=["blurry", ""], output_type="latent").images
    ours = level2()
    torch.testing.assert_close(level2(), ours, rtol=0, atol=0)
    assert_matches_reference(ours, _level1_sd_loop(pipe, config, 5, torch.float64),
                             _level1_sd_loop(pipe, config, 5, torch.float32), f"EDM SDE {config} level 2 vs level 1")

#----------------------------------------------------------------------------
# Refusals, by name.


def test_refusals(tiny_sdxl, tiny_sd):
    pipe = tiny_sdxl(diffusers.EDMDPMSolverMultistepScheduler(final_sigmas_type="sigma_min"))
    with pytest.raises(ValueError, match="EDMDPMSolverMultistepScheduler with final_sigmas_type='sigma_min'"):
        dd.accelerate(pipe)  # its last step rises from the float32 schedule end to sigma_min
    pipe.scheduler = diffusers.EDMEulerScheduler(final_sigmas_type="sigma_min")
    fast = dd.accelerate(pipe)
    with pytest.raises(ValueError, match="EDMEulerScheduler with final_sigmas_type='sigma_min'"):
        text2image(1)(fast, torch.Generator().manual_seed(0))  # its one step goes from its sigma to itself
    from diffkern.diffusers.edm_denoiser import edm_denoiser
    with pytest.raises(ValueError, match="EDMEulerScheduler in StableDiffusionInpaintPipeline"):
        edm_denoiser("StableDiffusionInpaintPipeline", EULER, object, False)  # a handler's own UNet wrapper
