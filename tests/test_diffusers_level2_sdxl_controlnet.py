"""Level 2 for ``StableDiffusionXLControlNetPipeline``: ``dd.accelerate(pipe)`` runs the SD ControlNet denoiser with
SDXL's pooled embeddings and time ids as ``added_cond_kwargs`` of the UNet and of the ControlNet(s) (guess mode: the
conditional half), the per-call scales of ``control_guidance_start``/``_end`` as table data, a MultiControlNetModel's
images and scales, SDXL's size conditioning and ``denoising_end``.

Oracle: the project rule (``diffkern.testing.assert_matches_reference``): the truth is the stock pipeline in float64
(every module in float64, diffusers' scheduler and pipeline module under ``diffusers_float64``, the same float32
random draws), the yardstick the stock float32 run; the ControlNet calls themselves (timestep, scale, batch, added
conditioning) equal the stock pipeline's call by call. Captured loops (the strict CPU stand-in of
test_level2_gpu_readiness.py) bitwise their eager loop; 16-bit residuals bitwise the stock pipeline's under a GPU's
scalar rule (test_level2_sixteen_bit.py). Tiny random models only: test_diffusers_sdxl's ``tiny_sdxl`` and
``ControlNetModel.from_unet`` of its UNet with random output convolutions (test_diffusers_level2_controlnet.py).
"""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.testing import assert_matches_reference  # noqa: E402
from test_diffusers_level2_controlnet import _image, control_call, three_runs, tiny_controlnet  # noqa: E402
from test_diffusers_sdxl import SDXL_SCHEDULER, tiny_sdxl  # noqa: E402, F401  (tiny_sdxl: a fixture)
from test_graphs import fresh_cache  # noqa: E402, F401  (autouse)
from test_level2_gpu_readiness import _second_calls, strict  # noqa: E402, F401  (strict: a fixture)
from test_level2_sixteen_bit import GpuScalarRule  # noqa: E402

EULER, DPM, UNIPC, HEUN = ("EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                           "HeunDiscreteScheduler")


@pytest.fixture
def sdxl_controlnet(tiny_sdxl):
    """A factory ``(scheduler name, nets=1, **ControlNet config) -> StableDiffusionXLControlNetPipeline`` on the tiny
    SDXL's modules (SDXL's scheduler config) with ``nets`` random ControlNets (a MultiControlNetModel when > 1)."""
    def make(name, nets=1, config=None, **net_config):
        base = tiny_sdxl(getattr(diffusers, name).from_config(config or SDXL_SCHEDULER))
        controlnets = [tiny_controlnet(base.unet, seed=11 + k, **net_config) for k in range(nets)]
        parts = {k: v for k, v in base.components.items() if k not in ("image_encoder", "feature_extractor")}
        pipe = diffusers.StableDiffusionXLControlNetPipeline(**parts, add_watermarker=False,
                                                             controlnet=controlnets[0] if nets == 1 else controlnets)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    return make


#----------------------------------------------------------------------------
# Parity with the stock pipeline.


def test_the_controlnet_and_its_conditioning_contribute(sdxl_controlnet):
    """The ControlNet's residuals are not zero, and the control image, its scale, the window, guess mode and SDXL's
    size conditioning change the fused loop's result (so the parity below tests them)."""
    fast = dd.accelerate(sdxl_controlnet(EULER))
    assert fast.kind == "sdxl_controlnet"
    base = control_call(fast, torch.Generator().manual_seed(0), output_type="latent")
    for kw in ({"image": _image(seed=9)}, {"controlnet_conditioning_scale": 0.5}, {"control_guidance_end": 0.5},
               {"guess_mode": True}, {"controlnet_conditioning_scale": 0.0}, {"original_size": (8, 8)},
               {"crops_coords_top_left": (1, 0)}, {"negative_original_size": (8, 8), "negative_target_size": (16, 16)},
               {"prompt_2": ["blurry", "cat"]}):
        other = control_call(fast, torch.Generator().manual_seed(0), output_type="latent", **kw)
        assert not torch.allclose(other, base, rtol=1e-4, atol=1e-5), kw
    again = control_call(fast, torch.Generator().manual_seed(0), output_type="latent")
    torch.testing.assert_close(again, base, rtol=0, atol=0)


PARITY = [  # (scheduler, steps, call kwargs): each scheduler at N = 1, 2, 4
    (EULER, 1, {}),
    (EULER, 2, {"controlnet_conditioning_scale": 0.6, "control_guidance_end": 0.5}),
    (EULER, 4, {"guess_mode": True, "num_images_per_prompt": 2, "image": _image(2, seed=6),
                "negative_original_size": (12, 20), "negative_crops_coords_top_left": (2, 3),
                "negative_target_size": (16, 8)}),
    (EULER, 4, {"guidance_scale": 1.0, "negative_prompt": None, "original_size": (32, 24),
                "crops_coords_top_left": (4, 0), "target_size": (24, 16)}),
    (DPM, 1, {"guess_mode": True}),
    (DPM, 2, {"num_images_per_prompt": 2, "output_type": "latent", "prompt_2": ["blurry dog", "cat"]}),
    (DPM, 4, {"control_guidance_start": 0.25, "control_guidance_end": 0.75, "controlnet_conditioning_scale": 1.7}),
    (DPM, 4, {"denoising_end": 0.6, "control_guidance_end": 0.3, "output_type": "latent"}),
    (UNIPC, 1, {"controlnet_conditioning_scale": 0.8, "negative_prompt_2": ["dog", "a"]}),
    (UNIPC, 2, {"guess_mode": True, "guidance_scale": 1.0, "negative_prompt": None, "control_guidance_start": 0.5}),
    (UNIPC, 4, {"height": 24, "width": 32, "image": _image(2, seed=7), "control_guidance_start": 0.5}),
    (HEUN, 1, {"control_guidance_end": 0.5}),
    (HEUN, 2, {"control_guidance_start": 0.3, "num_images_per_prompt": 2}),
    (HEUN, 4, {"guess_mode": True, "controlnet_conditioning_scale": 0.7, "control_guidance_end": 0.6,
               "latents": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))}),
]


@pytest.mark.parametrize("name, steps, kw", PARITY, ids=lambda v: str(v)[:40])
def test_sdxl_controlnet_matches_the_stock_pipeline(sdxl_controlnet, name, steps, kw):
    ours, truth, eager = three_runs(sdxl_controlnet(name), control_call, steps=steps, **kw)
    assert ours.shape[0] == 2 * kw.get("num_images_per_prompt", 1)
    if kw.get("output_type") != "latent":
        assert 0.1 < float(((eager > 0) & (eager < 1)).float().mean()), "images saturated"
    assert_matches_reference(ours, truth, eager, f"SDXL ControlNet {name} N={steps} {kw}")


MULTI = [  # (scheduler, steps, call kwargs) with two ControlNets
    (EULER, 4, {"controlnet_conditioning_scale": [0.7, 1.3]}),
    (DPM, 4, {"control_guidance_start": [0.0, 0.5], "control_guidance_end": [0.5, 1.0]}),
    (UNIPC, 2, {"guess_mode": True, "controlnet_conditioning_scale": 0.9, "num_images_per_prompt": 2}),
    (HEUN, 4, {"control_guidance_end": 0.75, "controlnet_conditioning_scale": [1.2, 0.4]}),
]


@pytest.mark.parametrize("name, steps, kw", MULTI, ids=lambda v: str(v)[:40])
def test_sdxl_multi_controlnet_matches_the_stock_pipeline(sdxl_controlnet, name, steps, kw):
    ours, truth, eager = three_runs(sdxl_controlnet(name, nets=2), control_call, steps=steps,
                                    image=[_image(2, seed=3), _image(1, seed=4)], **kw)
    assert_matches_reference(ours, truth, eager, f"SDXL MultiControlNet {name} N={steps} {kw}")


def test_global_pool_conditions_runs_guess_mode(sdxl_controlnet):
    ours, truth, eager = three_runs(sdxl_controlnet(EULER, global_pool_conditions=True), control_call)
    assert_matches_reference(ours, truth, eager, "SDXL global_pool_conditions")


def _log_calls(monkeypatch, net, log: list) -> None:
    """Record (timestep, scale, batch, text_embeds, time_ids) of each call of ``net``."""
    forward = net.forward

    def logged(sample, timestep, *args, conditioning_scale=1.0, added_cond_kwargs=None, **kwargs):
        t = timestep.reshape(-1)[0] if isinstance(timestep, torch.Tensor) else timestep
        log.append((round(float(t), 2), float(conditioning_scale), sample.shape[0],
                    added_cond_kwargs["text_embeds"].clone(), added_cond_kwargs["time_ids"].clone()))
        return forward(sample, timestep, *args, conditioning_scale=conditioning_scale,
                       added_cond_kwargs=added_cond_kwargs, **kwargs)
    monkeypatch.setattr(net, "forward", logged)


@pytest.mark.parametrize("kw", [
    {"control_guidance_start": 0.2, "control_guidance_end": 0.7, "controlnet_conditioning_scale": 0.75},
    {"guess_mode": True, "num_images_per_prompt": 2, "image": _image(2, seed=6), "control_guidance_end": 0.5,
     "negative_original_size": (12, 20), "negative_target_size": (16, 8)},
], ids=("window", "guess_mode"))
def test_controlnet_calls_are_the_pipelines(sdxl_controlnet, monkeypatch, kw):
    """Each ControlNet call (Heun: two per step) gets the stock pipeline's timestep, scale, batch and SDXL added
    conditioning: in guess mode with two images per prompt, the conditional half of the CFG batch, whose time ids
    alternate negative and positive as the pipeline's ``chunk(2)[1]`` of its repeated pairs."""
    pipe = sdxl_controlnet(HEUN)
    stock, ours = [], []
    for target, log in ((pipe, stock), (dd.accelerate(pipe, graph=False), ours)):
        with monkeypatch.context() as m:
            _log_calls(m, pipe.controlnet, log)
            control_call(target, torch.Generator().manual_seed(0), steps=5, output_type="latent", **kw)
    assert len(stock) == len(pipe.scheduler.timesteps) == len(ours)
    assert {c[1] for c in stock} == {0.0, kw.get("controlnet_conditioning_scale", 1.0)}  # the window acts
    for k, (want, got) in enumerate(zip(stock, ours)):
        assert got[:3] == want[:3], k
        torch.testing.assert_close(got[3], want[3], rtol=0, atol=0)
        torch.testing.assert_close(got[4], want[4], rtol=0, atol=0)

#----------------------------------------------------------------------------
# Second calls of a captured loop (the strict CPU stand-in): new images, scales, windows and sizes replay.


def test_graph_second_calls(sdxl_controlnet, strict, monkeypatch):
    """Prompts, control images, scales, windows and size conditioning of later calls replay one capture; guess mode
    with two images per prompt and no CFG capture their own batches."""
    pipe = sdxl_controlnet(DPM)
    per2 = {"num_images_per_prompt": 2, "guess_mode": True}
    cases = [(0, {}),
             (1, {"image": _image(seed=21), "controlnet_conditioning_scale": 0.6, "control_guidance_start": 0.25,
                  "negative_prompt": ["x", "y"], "original_size": (24, 24), "crops_coords_top_left": (2, 1)}),
             (2, dict(per2, image=_image(2, seed=22), controlnet_conditioning_scale=0.8)),
             (3, dict(per2, image=_image(2, seed=23), control_guidance_end=0.5, target_size=(8, 24))),
             (4, {"guidance_scale": 1.0, "negative_prompt": None, "image": _image(seed=24),
                  "control_guidance_end": 0.75}),
             (5, {"guidance_scale": 1.0, "negative_prompt": None, "image": _image(seed=25),
                  "controlnet_conditioning_scale": 1.4})]
    _second_calls(pipe, control_call, cases, monkeypatch, captures=3)


def test_graph_multi_controlnet_second_calls(sdxl_controlnet, strict, monkeypatch):
    pipe = sdxl_controlnet(HEUN, nets=2)
    cases = [(0, {"image": [_image(seed=3), _image(seed=4)]}),
             (1, {"image": [_image(seed=5), _image(seed=6)], "controlnet_conditioning_scale": [0.3, 1.2],
                  "control_guidance_start": [0.0, 0.5], "control_guidance_end": [0.5, 1.0]})]
    _second_calls(pipe, control_call, cases, monkeypatch, captures=1)


@pytest.mark.cuda
def test_cuda_graph_replays_match_eager(sdxl_controlnet):
    """Real CUDA graphs: new control images, scales, windows and sizes replay one capture, bitwise the eager loop."""
    from diffkern import graphs

    pipe = sdxl_controlnet(UNIPC).to("cuda")
    fast, eager = dd.accelerate(pipe, graph=True), dd.accelerate(pipe, graph=False)
    graphs.clear()
    for kw in ({}, {"image": _image(seed=12)}, {"controlnet_conditioning_scale": 0.4, "original_size": (24, 8)},
               {"control_guidance_start": 0.25, "control_guidance_end": 0.75}):
        want = control_call(eager, torch.Generator("cuda").manual_seed(0), **kw)
        got = control_call(fast, torch.Generator("cuda").manual_seed(0), **kw)
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=str(kw))
    assert graphs.info()["captures"] == 1

#----------------------------------------------------------------------------
# 16-bit pipelines: the residuals round as the stock pipeline's Python float scales.


def _keep(i, n, start, end):
    """The stock pipeline's keep factor of loop iteration i of n (pipeline_controlnet_sd_xl.py, step 7.1)."""
    return 1.0 - float(i / n < start or (i + 1) / n > end)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("nets, kw", [
    (1, {"controlnet_conditioning_scale": 0.7, "control_guidance_start": 0.25}),
    (1, {"controlnet_conditioning_scale": 0.9, "guess_mode": True}),
    (2, {"controlnet_conditioning_scale": [0.7, 1.3], "control_guidance_end": [1.0, 0.5]}),
], ids=lambda v: str(v)[:50])
def test_sixteen_bit_residuals_round_as_the_pipeline(sdxl_controlnet, dtype, nets, kw):
    """Under the GPU's scalar rule, the residuals of each UNet call of the fused loop are, bitwise, the stock
    pipeline's ControlNet call on the same inputs (added conditioning included) with its Python float scale."""
    pipe = sdxl_controlnet(EULER, nets=nets).to(dtype)
    steps, log = 4, {"unet": [], "nets": []}
    all_nets = pipe.controlnet.nets if nets > 1 else [pipe.controlnet]

    def unet_hook(module, args, kwargs):
        log["unet"].append([*kwargs["down_block_additional_residuals"], kwargs["mid_block_additional_residual"]])

    def net_hook(module, args, kwargs):
        log["nets"].append((args[0].clone(), args[1].clone(), kwargs["encoder_hidden_states"].clone(),
                            kwargs["controlnet_cond"].clone(),
                            {k: v.clone() for k, v in kwargs["added_cond_kwargs"].items()}))
    handles = [pipe.unet.register_forward_pre_hook(unet_hook, with_kwargs=True)]
    handles += [net.register_forward_pre_hook(net_hook, with_kwargs=True) for net in all_nets]
    try:
        with GpuScalarRule():
            control_call(dd.accelerate(pipe), torch.Generator().manual_seed(0), steps=steps, output_type="latent",
                    image=[_image(2, seed=3), _image(1, seed=4)] if nets == 2 else _image(), **kw)
    finally:
        for h in handles:
            h.remove()
    one = (lambda v: v if isinstance(v, list) else [v] * nets)
    scales, starts = one(kw["controlnet_conditioning_scale"]), one(kw.get("control_guidance_start", 0.0))
    ends, guess = one(kw.get("control_guidance_end", 1.0)), kw.get("guess_mode", False)
    assert len(log["unet"]) == steps and len(log["nets"]) == steps * nets
    for i, got in enumerate(log["unet"]):
        calls = log["nets"][i * nets:(i + 1) * nets]
        x, t, text, _, added = calls[0]
        images = [c[3] for c in calls]
        cond_scale = [s * _keep(i, steps, a, b) for s, a, b in zip(scales, starts, ends)]
        with torch.no_grad(), GpuScalarRule():  # the stock pipeline's call (pipeline_controlnet_sd_xl.py, step 8)
            down, mid = pipe.controlnet(x, t, encoder_hidden_states=text,
                                        controlnet_cond=images if nets > 1 else images[0],
                                        conditioning_scale=cond_scale if nets > 1 else cond_scale[0],
                                        guess_mode=guess, added_cond_kwargs=added, return_dict=False)
        want = [*down, mid]
        if guess:
            want = [torch.cat([torch.zeros_like(d), d]) for d in want]
        for g, w in zip(got, want):
            assert g.dtype == dtype
            torch.testing.assert_close(g, w, rtol=0, atol=0, msg=f"call {i} {kw}")

#----------------------------------------------------------------------------
# Refusals.


def test_refusals_name_the_argument(sdxl_controlnet):
    pipe = sdxl_controlnet(EULER)
    fast = dd.accelerate(pipe)
    kw = {"image": _image(), "num_inference_steps": 4, "output_type": "latent"}
    for bad in ({"timesteps": [999, 500]}, {"sigmas": [14.0, 1.0]}, {"callback_on_step_end": lambda *a: {}},
                {"ip_adapter_image_embeds": [torch.zeros(1, 1, 8)]}, {"guidance_rescale": 0.5}):
        with pytest.raises(TypeError, match=next(iter(bad))):
            fast("a cat", **kw, **bad)
    with pytest.raises(TypeError, match="controlnet_conditioning_scale. must be type .float"):
        fast("a cat", controlnet_conditioning_scale=1, **kw)  # the pipeline's own check_inputs
    with pytest.raises(ValueError, match="control guidance start: 0.6 cannot be larger or equal to control guidance"):
        fast("a cat", control_guidance_start=0.6, control_guidance_end=0.4, **kw)
    other = dd.accelerate(pipe, method="heun")
    other("a cat", **kw)  # the whole loop is fine
    with pytest.raises(ValueError, match=r"control_guidance_start/control_guidance_end: a window other than \[0, 1\] "
                                         r".*method='heun' replaces the scheduler's loop"):
        other("a cat", control_guidance_end=0.5, **kw)
    pipe.scheduler = diffusers.HeunDiscreteScheduler.from_config(SDXL_SCHEDULER)
    with pytest.raises(ValueError, match="denoising_end=0.6 is not supported by the fused loop with "
                                         "HeunDiscreteScheduler"):
        fast("a cat", denoising_end=0.6, **kw)  # diffusers stops inside a Heun step
    multi = dd.accelerate(sdxl_controlnet(EULER, nets=2))
    with pytest.raises(ValueError, match="controlnet_conditioning_scale, control_guidance_start: expected one value "
                                         r"per ControlNet \(2\)"):
        multi("a cat", controlnet_conditioning_scale=[1.0, 1.0, 1.0], **dict(kw, image=[_image(), _image()]))


def test_unsupported_pipelines_are_refused_by_name(sdxl_controlnet):
    pipe = sdxl_controlnet(EULER)
    for cls in (diffusers.StableDiffusionXLControlNetImg2ImgPipeline,
                diffusers.StableDiffusionXLControlNetInpaintPipeline):
        other = cls(**pipe.components)
        with pytest.raises(TypeError, match=f"unsupported pipeline {cls.__name__}: the fused ControlNet loop runs "
                                            "StableDiffusionControlNetPipeline only .*SDXL: "
                                            "StableDiffusionXLControlNetPipeline"):
            dd.accelerate(other)
    union = sdxl_controlnet(EULER)
    union.controlnet = diffusers.ControlNetUnionModel(
        in_channels=4, block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        layers_per_block=1, cross_attention_dim=32, norm_num_groups=4, attention_head_dim=2,
        conditioning_embedding_out_channels=(4, 8), addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=6 * 4 + 8, num_trans_channel=16, num_trans_head=2,
        num_trans_layer=1, num_proj_channel=16)
    with pytest.raises(TypeError, match="StableDiffusionXLControlNetPipeline with a ControlNetUnionModel"):
        dd.accelerate(union)
    torch.manual_seed(0)
    lcm = sdxl_controlnet(EULER)
    lcm.unet = diffusers.UNet2DConditionModel.from_config(lcm.unet.config, time_cond_proj_dim=8)
    with pytest.raises(TypeError, match="StableDiffusionXLControlNetPipeline: its UNet has time_cond_proj_dim=8"):
        dd.accelerate(lcm)
    plain = sdxl_controlnet(EULER)
    plain.unet = diffusers.UNet2DConditionModel.from_config(plain.unet.config, addition_embed_type=None)
    with pytest.raises(TypeError, match="StableDiffusionXLControlNetPipeline: its UNet has addition_embed_type=None"):
        dd.accelerate(plain)
