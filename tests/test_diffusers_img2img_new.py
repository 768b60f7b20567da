"""UniPC, LCM and flow-matching drop-ins (Level 1) in diffusers' image-to-image and inpainting pipelines: the paths of
``set_begin_index``, ``add_noise`` / ``scale_noise`` (before the loop and, in 4-channel inpainting, inside it),
``strength`` and partial schedules, which the text-to-image tests do not reach.

Oracle and tolerance: the project rule on whole pipelines (``test_diffusers_pipelines.py``): the truth is the pipeline
run in float64 with diffusers' scheduler of the same name (every module in float64, the scheduler and pipeline
modules under ``diffusers_float64``, the same float32 random draws upcast), the yardstick diffusers' float32 run, and
diffkern's scheduler (from the same config, same generator) must be within twice the yardstick's distance to the
truth, plus the float32 floor.
"""
import copy
import importlib

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.testing import assert_matches_reference  # noqa: E402
from test_diffusers_flow import tiny_sd3  # noqa: E402
from test_diffusers_pipelines import pipeline_modules, tiny_sd  # noqa: E402, F401  (tiny_sd: a fixture)
from test_diffusers_sdxl import MODULES as SDXL_MODULES  # noqa: E402
from test_diffusers_sdxl import SDXL_SCHEDULER, tiny_sdxl  # noqa: E402, F401  (tiny_sdxl: a fixture)
from test_diffusers_schedulers import diffusers_float64  # noqa: E402

STEPS = 4
STRENGTHS = (0.3, 0.6, 1.0)  # 1, 2 and 4 of the 4 steps
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1}
UNIPC = [  # orders 1 and 2, bh1 and bh2 (bh1 needs final_sigmas_type="sigma_min": diffusers' bh1 step to 0 is NaN)
    dict(SD, solver_order=1),
    dict(SD, solver_order=2),
    dict(SD, solver_order=2, solver_type="bh1", final_sigmas_type="sigma_min"),
    dict(SD, solver_order=1, solver_type="bh1", final_sigmas_type="sigma_min", timestep_spacing="trailing"),
]
LCM = [{}, {"prediction_type": "v_prediction", "timestep_scaling": 0.002}]
CASES = [("UniPCMultistepScheduler", c) for c in UNIPC] + [("LCMScheduler", c) for c in LCM]
IDS = [f"{name[:5]}{i}" for i, (name, _) in enumerate(CASES)]

#----------------------------------------------------------------------------
# Runs.


def _image():
    """One image per prompt, values in [0, 1] (the image processor's range for tensors)."""
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def _mask():
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 2:10] = 1.0  # repaint a block, keep the rest
    return mask


def _float64_twin(pipe, scheduler, modules):
    twin = copy.deepcopy(pipe)
    for name in modules:
        getattr(twin, name).double()
    twin.scheduler = scheduler
    return twin


def runs(pipe, name, config, call, modules=("unet", "vae", "text_encoder")):
    """(ours, truth, diffusers32) of ``call(pipe, generator)`` with diffusers' ``name`` scheduler of ``config`` (truth:
    float64; yardstick: float32) and diffkern's class of the same name loaded from the same config."""
    theirs = getattr(diffusers, name)
    pipe.scheduler = theirs.from_config(config)
    with diffusers_float64(importlib.import_module(theirs.__module__), *pipeline_modules(pipe)):
        truth = call(_float64_twin(pipe, theirs.from_config(config), modules), torch.Generator().manual_seed(5))
    eager = call(pipe, torch.Generator().manual_seed(5))
    pipe.scheduler = getattr(dd, name).from_config(pipe.scheduler.config)
    ours = call(pipe, torch.Generator().manual_seed(5))
    assert 0.1 < float(((eager > 0) & (eager < 1)).float().mean()), "images saturated: the comparison would be void"
    return ours, truth, eager


def img2img(pipe, generator, **kw):
    """Two prompts with CFG, one with a negative prompt, from one image; images as a (2, 3, 16, 16) tensor."""
    return pipe(["a cat", "a dog"], generator=generator, num_inference_steps=STEPS, guidance_scale=3.0,
                negative_prompt=["blurry", ""], output_type="pt", **kw).images


def _pipeline(cls, base, **components):
    pipe = cls(**{**base.components, **components})
    pipe.set_progress_bar_config(disable=True)
    return pipe

#----------------------------------------------------------------------------
# Stable Diffusion img2img and inpainting.


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("name, config", CASES, ids=IDS)
def test_sd_img2img(tiny_sd, name, config, strength):
    pipe = _pipeline(diffusers.StableDiffusionImg2ImgPipeline, tiny_sd(diffusers.UniPCMultistepScheduler(steps_offset=1)))
    ours, truth, eager = runs(pipe, name, config, lambda p, g: img2img(p, g, image=_image(), strength=strength))
    assert_matches_reference(ours, truth, eager, f"img2img {name} {config} strength {strength}")


def _inpaint_unet(base, channels):
    """tiny_sd's UNet with ``channels`` input channels (9: latents, mask, masked-image latents), random weights."""
    config = {k: v for k, v in base.unet.config.items() if not k.startswith("_")}
    torch.manual_seed(4)
    return diffusers.UNet2DConditionModel.from_config({**config, "in_channels": channels}).eval()


INPAINT = [(name, config, channels, STRENGTHS[(i + channels) % 3])  # each case, both UNets, strengths in turn
           for i, (name, config) in enumerate(CASES) for channels in (9, 4)]


@pytest.mark.parametrize("name, config, channels, strength", INPAINT,
                         ids=[f"{IDS[i // 2]}-{c}ch-{s}" for i, (_, _, c, s) in enumerate(INPAINT)])
def test_sd_inpaint(tiny_sd, name, config, channels, strength):
    """9 channels: the UNet sees the mask; 4 channels: the pipeline re-noises the kept region with ``add_noise`` at
    the next timestep inside the loop (after set_begin_index, at the step index)."""
    base = tiny_sd(diffusers.UniPCMultistepScheduler(steps_offset=1))
    pipe = _pipeline(diffusers.StableDiffusionInpaintPipeline, base, unet=_inpaint_unet(base, channels))
    ours, truth, eager = runs(pipe, name, config,
                              lambda p, g: img2img(p, g, image=_image(), mask_image=_mask(), strength=strength))
    assert_matches_reference(ours, truth, eager, f"inpaint {channels}ch {name} {config} strength {strength}")

#----------------------------------------------------------------------------
# LCM's own img2img pipeline: ``strength`` goes to LCMScheduler.set_timesteps (the skipping-step schedule is cut).


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("config", LCM, ids=["eps", "v"])
def test_lcm_img2img_pipeline(tiny_sd, config, strength):
    base = tiny_sd(diffusers.LCMScheduler(steps_offset=1))
    unet_config = {k: v for k, v in base.unet.config.items() if not k.startswith("_")}
    torch.manual_seed(2)
    unet = diffusers.UNet2DConditionModel.from_config({**unet_config, "time_cond_proj_dim": 8}).eval()
    pipe = _pipeline(diffusers.LatentConsistencyModelImg2ImgPipeline, base, unet=unet)

    def call(p, g):
        return p(["a cat", "a dog"], image=_image(), strength=strength, generator=g, num_inference_steps=2,
                 original_inference_steps=10, guidance_scale=3.0, output_type="pt").images
    ours, truth, eager = runs(pipe, "LCMScheduler", config, call)
    assert_matches_reference(ours, truth, eager, f"LCM img2img pipeline {config} strength {strength}")

#----------------------------------------------------------------------------
# SD3 img2img (flow matching: scale_noise at the begin index).


def _sd3_img2img(pipe, generator, strength, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    embeds = [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for shape in ((2, 7, 32), (2, 64)) * 2]
    return pipe(image=_image(), strength=strength, prompt_embeds=embeds[0], pooled_prompt_embeds=embeds[1],
                negative_prompt_embeds=embeds[2], negative_pooled_prompt_embeds=embeds[3], guidance_scale=3.0,
                num_inference_steps=STEPS, height=16, width=16, generator=generator, output_type="pt").images


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("config", [{"shift": 3.0}, {"use_dynamic_shifting": True, "base_image_seq_len": 16,
                                                      "max_image_seq_len": 256}, {"stochastic_sampling": False,
                                                                                   "use_karras_sigmas": True}],
                         ids=["shift", "dynamic", "karras"])
def test_sd3_img2img(config, strength):
    pipe = _pipeline(diffusers.StableDiffusion3Img2ImgPipeline, tiny_sd3(diffusers.FlowMatchEulerDiscreteScheduler()))

    def call(p, g):
        if p.transformer.dtype == torch.float64:
            return _sd3_img2img(p, g, strength, torch.float64)
        return _sd3_img2img(p, g, strength)
    ours, truth, eager = runs(pipe, "FlowMatchEulerDiscreteScheduler", config, call, modules=("transformer", "vae"))
    assert_matches_reference(ours, truth, eager, f"SD3 img2img {config} strength {strength}")

#----------------------------------------------------------------------------
# Pipelines that never call set_begin_index (Kandinsky img2img, AnimateDiff video-to-video, the deprecated SD img2img
# and legacy inpainting): diffusers' schedulers find the first step's index from its timestep; ours must too.


def _no_begin_index(cls):
    """``cls`` with the ``get_timesteps`` of the pipelines above: the schedule is sliced, no ``set_begin_index``."""
    class Legacy(cls):
        def get_timesteps(self, num_inference_steps, strength, device):
            init = min(int(num_inference_steps * strength), num_inference_steps)
            t_start = max(num_inference_steps - init, 0)
            return self.scheduler.timesteps[t_start * self.scheduler.order:], num_inference_steps - t_start
    Legacy.__name__ = Legacy.__qualname__ = f"{cls.__name__}WithoutBeginIndex"
    Legacy.__module__ = cls.__module__  # (diffusers_float64 patches the pipeline's module)
    return Legacy


@pytest.mark.parametrize("name, config", [CASES[1], CASES[2], CASES[4]], ids=[IDS[1], IDS[2], IDS[4]])
@pytest.mark.parametrize("inpaint", [False, True], ids=["img2img", "inpaint4ch"])
def test_pipelines_without_set_begin_index(tiny_sd, name, config, inpaint):
    strength = 0.6
    base = tiny_sd(diffusers.UniPCMultistepScheduler(steps_offset=1))
    if inpaint:  # add_noise inside the loop, by timestep value (no begin index)
        pipe = _pipeline(_no_begin_index(diffusers.StableDiffusionInpaintPipeline), base,
                         unet=_inpaint_unet(base, 4))
        kw = {"mask_image": _mask()}
    else:
        pipe = _pipeline(_no_begin_index(diffusers.StableDiffusionImg2ImgPipeline), base)
        kw = {}
    ours, truth, eager = runs(pipe, name, config, lambda p, g: img2img(p, g, image=_image(), strength=strength, **kw))
    assert_matches_reference(ours, truth, eager, f"no set_begin_index {inpaint} {name} {config} strength {strength}")


@pytest.mark.parametrize("strength", [0.3, 0.6])
def test_sd3_img2img_without_set_begin_index(strength):
    pipe = _pipeline(_no_begin_index(diffusers.StableDiffusion3Img2ImgPipeline),
                     tiny_sd3(diffusers.FlowMatchEulerDiscreteScheduler()))

    def call(p, g):
        return _sd3_img2img(p, g, strength, p.transformer.dtype)
    ours, truth, eager = runs(pipe, "FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, call,
                              modules=("transformer", "vae"))
    assert_matches_reference(ours, truth, eager, f"SD3 img2img without set_begin_index, strength {strength}")


#----------------------------------------------------------------------------
# SDXL img2img (UniPC from SDXL's own scheduler config): strength, and the refiner's hand-off (denoising_start).


@pytest.mark.parametrize("kw", [{"strength": 0.6}, {"strength": 1.0}, {"denoising_start": 0.5}],
                         ids=["0.6", "1.0", "start0.5"])
def test_sdxl_img2img_unipc(tiny_sdxl, kw):
    pipe = _pipeline(diffusers.StableDiffusionXLImg2ImgPipeline, tiny_sdxl(diffusers.EulerDiscreteScheduler()))
    pipe.vae.register_to_config(force_upcast=False)  # (image.float() would feed float32 to the float64 twin's VAE)
    ours, truth, eager = runs(pipe, "UniPCMultistepScheduler", SDXL_SCHEDULER,
                              lambda p, g: img2img(p, g, image=_image(), **kw), modules=SDXL_MODULES)
    assert_matches_reference(ours, truth, eager, f"SDXL img2img UniPC {kw}")

#----------------------------------------------------------------------------
# The first step's index without set_begin_index, step by step.

LOCATE = [("UniPCMultistepScheduler", UNIPC[1]), ("LCMScheduler", {}), ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0})]


def _steps(sched, begin, name, dtype=torch.float32):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    gen = torch.Generator().manual_seed(2)
    for k in range(begin, len(sched.timesteps)):
        m = torch.randn(x.shape, generator=torch.Generator().manual_seed(10 + k), dtype=torch.float64).to(dtype)
        kw = {} if name == "UniPCMultistepScheduler" else {"generator": gen}
        x = sched.step(m, sched.timesteps[k], x, **kw).prev_sample
        if k == begin and hasattr(sched, "step_index"):  # (diffusers' DDIM/DDPM keep no step index)
            assert sched.step_index == begin + 1 and sched.begin_index is None
    return x


# the older classes whose diffusers counterparts also start where the first timestep is (Heun and KDPM2: interleaved
# schedules, where diffusers picks the second of two equal timesteps, are covered by the pipeline tests above)
LOCATE_OLD = [("EulerDiscreteScheduler", {}), ("EulerAncestralDiscreteScheduler", {}),
              ("DPMSolverMultistepScheduler", {}), ("DPMSolverMultistepScheduler", {"solver_order": 3}),
              ("DDIMScheduler", {}), ("DDPMScheduler", {})]


@pytest.mark.parametrize("begin", [1, 3])
@pytest.mark.parametrize("name, config", LOCATE + LOCATE_OLD,
                         ids=["unipc", "lcm", "flow", "euler", "euler_a", "dpm2", "dpm3", "ddim", "ddpm"])
def test_loop_without_begin_index_starts_at_its_timestep(name, config, begin):
    module = importlib.import_module(getattr(diffusers, name).__module__)
    with diffusers_float64(module):
        truth = getattr(diffusers, name)(**config)
        truth.set_timesteps(5)
        ref = _steps(truth, begin, name, torch.float64)
    eager, ours = getattr(diffusers, name)(**config), getattr(dd, name)(**config)
    for sched in (eager, ours):
        sched.set_timesteps(5)
    assert_matches_reference(_steps(ours, begin, name), ref, _steps(eager, begin, name), f"{name} from step {begin}")


def test_device_timestep_is_located_by_its_storage_offset(monkeypatch):
    """A timestep whose value the host cannot read (stand-in: host_value returns None, as for a CUDA tensor) is
    located by its position when it is a view into ``scheduler.timesteps``, and taken as the start otherwise."""
    import diffkern.diffusers.schedulers as base
    monkeypatch.setattr(base, "host_value", lambda timestep: None)
    for name, config in LOCATE:
        sched = getattr(dd, name)(**config)
        sched.set_timesteps(5)
        assert sched._locate(sched.timesteps[3]) == 3
        assert sched._locate(sched.timesteps[2:][1]) == 3
        assert sched._locate(sched.timesteps[3].clone()) == 0


def test_duplicate_and_foreign_timesteps():
    """Two equal timesteps: the second, as diffusers' index_for_timestep; a timestep not in the schedule still raises
    (diffusers' UniPC would silently take the last step)."""
    sched = dd.UniPCMultistepScheduler(solver_order=1, num_train_timesteps=10)
    sched.set_timesteps(12)  # N > T repeats timesteps
    theirs = diffusers.UniPCMultistepScheduler(solver_order=1, num_train_timesteps=10)
    theirs.set_timesteps(12)
    t = sched.timesteps[5]
    assert sched._locate(t) == theirs.index_for_timestep(theirs.timesteps[5])
    lcm = dd.LCMScheduler()
    lcm.set_timesteps(4)
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="timestep: expected"):
        lcm.step(x, 500, x)
