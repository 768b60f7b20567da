"""Level 2 for ``StableDiffusionControlNetPipeline``: ``dd.accelerate(pipe)`` runs the ControlNet and the UNet in
each call of the fused loop (CFG batch with the control image stacked twice, guess mode's conditional-only
ControlNet, the per-iteration conditioning scale of ``control_guidance_start``/``_end`` as table data, a
MultiControlNetModel's list of images and scales).

Oracle: the project rule (``diffkern.testing.assert_matches_reference``, as test_diffusers_level2_sdxl_inpaint.py):
the truth is the stock pipeline in float64 (every module in float64, diffusers' scheduler and pipeline module under
``diffusers_float64``, the same float32 random draws), the yardstick the stock float32 run. CUDA-graph replays (CPU
stand-in of test_graphs.py) bitwise against the eager fused loop. Tiny random models only: test_diffusers_pipelines'
``tiny_sd`` and a ``ControlNetModel.from_unet`` of its UNet whose zero-initialised output convolutions are randomised
(so the residuals are not zero and the parity tests test them).
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
from test_diffusers_schedulers import diffusers_float64  # noqa: E402
from test_graphs import fake, fresh_cache  # noqa: E402, F401  (fresh_cache: autouse)

PROMPTS = ["a cat", "a dog"]
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1}


def tiny_controlnet(unet, seed=11, **config):
    """``ControlNetModel.from_unet(unet)`` with a 2x control-image embedding (16x16 pixels to the 8x8 latents) and
    random output convolutions (zero at initialisation)."""
    net = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8)).eval()
    net.register_to_config(**config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.3)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen) * 0.1)
    return net


def controlnet_pipe(make, scheduler, nets=1, **config):
    """``StableDiffusionControlNetPipeline`` on the tiny SD's modules with ``nets`` random ControlNets (a list of
    them, so a MultiControlNetModel, when nets > 1)."""
    base = make(scheduler)
    controlnets = [tiny_controlnet(base.unet, seed=11 + k, **config) for k in range(nets)]
    parts = {k: v for k, v in base.components.items() if k != "image_encoder"}
    pipe = diffusers.StableDiffusionControlNetPipeline(**parts, controlnet=controlnets[0] if nets == 1 else controlnets)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(batch=1, seed=3):
    return torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _tensor(out):
    out = out.images
    return out if isinstance(out, torch.Tensor) else torch.as_tensor(np.asarray(out))


def control_call(pipe, generator, steps=4, output_type="pt", **kw):
    kw = {"image": _image(), "guidance_scale": 4.0, "negative_prompt": ["blurry", ""], **kw}
    if "latents" in kw:
        kw["latents"] = kw["latents"].to(pipe.unet.dtype)  # the pipeline does not cast given latents
    return _tensor(pipe(PROMPTS, generator=generator, num_inference_steps=steps, output_type=output_type, **kw))


def _twin64(pipe):
    """The pipeline with float64 modules and a fresh scheduler of the pipeline's config (build inside
    ``diffusers_float64``)."""
    twin = copy.deepcopy(pipe)
    for module in twin.components.values():
        if isinstance(module, torch.nn.Module):
            module.double()
    twin.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    return twin


def three_runs(pipe, call, **kw):
    """(Level 2, float64 truth, stock float32) of ``call(pipe, generator, **kw)``."""
    module = importlib.import_module(type(pipe.scheduler).__module__)
    with diffusers_float64(module, *pipeline_modules(pipe)):
        truth = call(_twin64(pipe), torch.Generator().manual_seed(5), **kw)
    eager = call(pipe, torch.Generator().manual_seed(5), **kw)
    ours = call(dd.accelerate(pipe), torch.Generator().manual_seed(5), **kw)
    return ours, truth.to(torch.float64), eager

#----------------------------------------------------------------------------
# Parity with the stock pipeline.


def test_the_controlnet_contributes(tiny_sd):
    """The random ControlNet's residuals are not zero, and the control image, its scale and the guidance window
    change the fused loop's result (so the parity below tests them)."""
    pipe = controlnet_pipe(tiny_sd, diffusers.EulerDiscreteScheduler(**SD))
    with torch.no_grad():
        down, mid = pipe.controlnet(torch.randn(2, 4, 8, 8), torch.tensor(500), torch.randn(2, 8, 32), _image(2),
                                    return_dict=False)
    assert all(float(d.abs().max()) > 1e-2 for d in down)
    assert float(mid.abs().max()) > 1e-2
    fast = dd.accelerate(pipe)
    assert fast.kind == "controlnet"
    base = control_call(fast, torch.Generator().manual_seed(0), output_type="latent")
    for kw in ({"image": _image(seed=9)}, {"controlnet_conditioning_scale": 0.5}, {"control_guidance_end": 0.5},
               {"guess_mode": True}, {"controlnet_conditioning_scale": 0.0}):
        other = control_call(fast, torch.Generator().manual_seed(0), output_type="latent", **kw)
        assert not torch.allclose(other, base, rtol=1e-4, atol=1e-5), kw
    again = control_call(fast, torch.Generator().manual_seed(0), output_type="latent")
    torch.testing.assert_close(again, base, rtol=0, atol=0)


PARITY = [  # (scheduler, config, call kwargs)
    ("EulerDiscreteScheduler", SD, {}),
    ("EulerDiscreteScheduler", SD, {"guidance_scale": 1.0, "negative_prompt": None,
                                    "controlnet_conditioning_scale": 0.6}),
    # the control image resized to the requested size, which then gives the latents' (12 x 16)
    ("EulerDiscreteScheduler", SD, {"height": 24, "width": 32, "image": _image(2, seed=7)}),
    ("DPMSolverMultistepScheduler", SD, {"steps": 8, "num_images_per_prompt": 2, "image": _image(2, seed=6),
                                         "output_type": "latent"}),
    ("DPMSolverMultistepScheduler", dict(SD, use_karras_sigmas=True), {"controlnet_conditioning_scale": 1.7}),
    ("DDIMScheduler", dict(SD, clip_sample=False, set_alpha_to_one=False), {"guess_mode": True}),
    ("DDIMScheduler", dict(SD, clip_sample=False), {"guess_mode": True, "guidance_scale": 1.0,
                                                    "negative_prompt": None}),
    # ending at t = 0 without set_alpha_to_one: the fused loop drops the identity last step, the window still fits
    ("DDIMScheduler", dict(SD, steps_offset=0, clip_sample=False, set_alpha_to_one=False),
     {"control_guidance_end": 0.5}),
    ("DDIMScheduler", dict(SD, steps_offset=0, clip_sample=False, set_alpha_to_one=False),
     {"control_guidance_start": 0.25, "control_guidance_end": 0.75, "steps": 8}),
    ("UniPCMultistepScheduler", SD, {"steps": 6, "control_guidance_start": 0.3, "control_guidance_end": 0.8}),
    ("UniPCMultistepScheduler", SD, {"latents": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)),
                                     "controlnet_conditioning_scale": 0.8, "guess_mode": True,
                                     "control_guidance_end": 0.6}),
    ("HeunDiscreteScheduler", SD, {"control_guidance_start": 0.25, "control_guidance_end": 0.7}),
    ("HeunDiscreteScheduler", SD, {"num_images_per_prompt": 2, "guess_mode": True}),
    ("KDPM2DiscreteScheduler", SD, {"steps": 5, "control_guidance_start": 0.4}),
    ("PNDMScheduler", dict(SD, skip_prk_steps=True), {"steps": 5, "control_guidance_end": 0.5}),
    ("LMSDiscreteScheduler", SD, {"control_guidance_start": 0.5}),
]


@pytest.mark.parametrize("name, config, kw", PARITY, ids=lambda v: str(v)[:48])
def test_controlnet_matches_the_stock_pipeline(tiny_sd, name, config, kw):
    ours, truth, eager = three_runs(controlnet_pipe(tiny_sd, getattr(diffusers, name)(**config)), control_call, **kw)
    assert ours.shape[0] == 2 * kw.get("num_images_per_prompt", 1)
    if kw.get("output_type") != "latent":
        assert 0.1 < float(((eager > 0) & (eager < 1)).float().mean()), "images saturated"
    assert_matches_reference(ours, truth, eager, f"ControlNet {name} {kw}")


MULTI = [  # (scheduler, config, call kwargs) with two ControlNets
    ("EulerDiscreteScheduler", SD, {"controlnet_conditioning_scale": [0.7, 1.3]}),
    ("DPMSolverMultistepScheduler", SD, {"control_guidance_start": [0.0, 0.5], "control_guidance_end": [0.5, 1.0],
                                         "steps": 6}),
    ("HeunDiscreteScheduler", SD, {"guess_mode": True, "control_guidance_end": 0.75,
                                   "controlnet_conditioning_scale": 0.9}),
]


@pytest.mark.parametrize("name, config, kw", MULTI, ids=lambda v: str(v)[:48])
def test_multi_controlnet_matches_the_stock_pipeline(tiny_sd, name, config, kw):
    pipe = controlnet_pipe(tiny_sd, getattr(diffusers, name)(**config), nets=2)
    images = [_image(2, seed=3), _image(1, seed=4)]
    ours, truth, eager = three_runs(pipe, control_call, image=images, **kw)
    assert_matches_reference(ours, truth, eager, f"MultiControlNet {name} {kw}")


def test_global_pool_conditions_runs_guess_mode(tiny_sd):
    """A ControlNet with ``global_pool_conditions`` (shuffle ControlNets) runs the pipeline's guess mode."""
    pipe = controlnet_pipe(tiny_sd, diffusers.EulerDiscreteScheduler(**SD), global_pool_conditions=True)
    ours, truth, eager = three_runs(pipe, control_call)
    assert_matches_reference(ours, truth, eager, "global_pool_conditions")

def test_stochastic_scheduler_is_reproducible_per_seed(tiny_sd):
    """Euler-ancestral draws its step noise from diffkern's Philox stream keyed by the generator."""
    fast = dd.accelerate(controlnet_pipe(tiny_sd, diffusers.EulerAncestralDiscreteScheduler(**SD)))
    a, b, c = (control_call(fast, torch.Generator().manual_seed(seed), output_type="latent",
                            control_guidance_start=0.5) for seed in (1, 1, 2))
    assert torch.isfinite(a).all()
    torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert not torch.allclose(c, a)

#----------------------------------------------------------------------------
# Refusals.


def test_controlnet_refusals(tiny_sd):
    pipe = controlnet_pipe(tiny_sd, diffusers.EulerDiscreteScheduler(**SD))
    fast = dd.accelerate(pipe)
    kw = {"image": _image(), "num_inference_steps": 4, "output_type": "latent"}
    for bad in ({"timesteps": [999, 500]}, {"sigmas": [14.0, 1.0]}, {"callback_on_step_end": lambda *a: {}},
                {"ip_adapter_image_embeds": [torch.zeros(1, 1, 8)]}):
        with pytest.raises(TypeError, match=next(iter(bad))):
            fast("a cat", **kw, **bad)
    with pytest.raises(TypeError, match="controlnet_conditioning_scale. must be type .float"):
        fast("a cat", controlnet_conditioning_scale=1, **kw)  # the pipeline's own check_inputs
    with pytest.raises(ValueError, match="control guidance start: 0.6 cannot be larger or equal to control guidance"):
        fast("a cat", control_guidance_start=0.6, control_guidance_end=0.4, **kw)
    # another method's calls are not the pipeline's iterations: a guidance window cannot be placed on them
    other = dd.accelerate(pipe, method="heun")
    other("a cat", **kw)  # the whole loop is fine
    with pytest.raises(ValueError, match=r"control_guidance_start/control_guidance_end: a window other than \[0, 1\] "
                                         r".*method='heun' replaces the scheduler's loop"):
        other("a cat", control_guidance_end=0.5, **kw)
    multi = dd.accelerate(controlnet_pipe(tiny_sd, diffusers.EulerDiscreteScheduler(**SD), nets=2))
    with pytest.raises(ValueError, match="controlnet_conditioning_scale, control_guidance_start: expected one value "
                                         r"per ControlNet \(2\)"):
        multi("a cat", controlnet_conditioning_scale=[1.0, 1.0, 1.0], **dict(kw, image=[_image(), _image()]))


def test_other_controlnet_pipelines_are_refused_by_name(tiny_sd):
    pipe = controlnet_pipe(tiny_sd, diffusers.EulerDiscreteScheduler(**SD))
    for cls in (diffusers.StableDiffusionControlNetImg2ImgPipeline, diffusers.StableDiffusionControlNetInpaintPipeline):
        other = cls(**pipe.components)
        with pytest.raises(TypeError, match=f"unsupported pipeline {cls.__name__}: the fused ControlNet loop runs "
                                            "StableDiffusionControlNetPipeline only"):
            dd.accelerate(other)
    pipe.controlnet = diffusers.ControlNetUnionModel(
        in_channels=4, block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        layers_per_block=1, cross_attention_dim=32, norm_num_groups=4, attention_head_dim=2,
        conditioning_embedding_out_channels=(4, 8), addition_time_embed_dim=8, num_trans_channel=16, num_trans_head=2,
        num_trans_layer=1, num_proj_channel=16)
    with pytest.raises(TypeError, match="StableDiffusionControlNetPipeline with a ControlNetUnionModel"):
        dd.accelerate(pipe)
    torch.manual_seed(0)
    lcm_unet = diffusers.UNet2DConditionModel.from_config(pipe.unet.config, time_cond_proj_dim=8)
    lcm = controlnet_pipe(tiny_sd, diffusers.EulerDiscreteScheduler(**SD))
    lcm.unet = lcm_unet
    with pytest.raises(TypeError, match="StableDiffusionControlNetPipeline: its UNet has time_cond_proj_dim=8"):
        dd.accelerate(lcm)

#----------------------------------------------------------------------------
# The loop as a captured graph (CPU stand-in): new control images, scales and windows are data of one capture.


def graphed(pipe):
    acc = dd.accelerate(pipe, graph=False)
    acc.__dict__["graph"] = True  # accelerate refuses graph=True without CUDA; the fake fixture captures on CPU
    return acc


def test_graph_replays_new_control_images_and_scales(tiny_sd, fake):
    pipe = controlnet_pipe(tiny_sd, diffusers.DPMSolverMultistepScheduler(**SD))
    fast, eager = graphed(pipe), dd.accelerate(pipe, graph=False)
    cases = ((0, {}), (1, {"image": _image(seed=12)}), (0, {"controlnet_conditioning_scale": 0.4}),
             (2, {"control_guidance_start": 0.25, "control_guidance_end": 0.75, "guidance_scale": 6.0}),
             (0, {"guess_mode": True}), (3, {"guess_mode": True, "image": _image(seed=13)}))
    for seed, kw in cases:
        want = control_call(eager, torch.Generator().manual_seed(seed), **kw)
        got = control_call(fast, torch.Generator().manual_seed(seed), **kw)
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=str(kw))
    assert graphs.info()["captures"] == 2 and graphs.info()["replays"] == 6  # guess mode changes the batch


@pytest.mark.cuda
def test_cuda_graph_replays_match_eager(tiny_sd):
    """Real CUDA graphs: new control images, scales and windows replay one capture, bitwise the eager fused loop."""
    pipe = controlnet_pipe(tiny_sd, diffusers.UniPCMultistepScheduler(**SD)).to("cuda")
    fast, eager = dd.accelerate(pipe, graph=True), dd.accelerate(pipe, graph=False)
    graphs.clear()
    for kw in ({}, {"image": _image(seed=12)}, {"controlnet_conditioning_scale": 0.4},
               {"control_guidance_start": 0.25, "control_guidance_end": 0.75}):
        want = control_call(eager, torch.Generator("cuda").manual_seed(0), **kw)
        got = control_call(fast, torch.Generator("cuda").manual_seed(0), **kw)
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=str(kw))
    assert graphs.info()["captures"] == 1
