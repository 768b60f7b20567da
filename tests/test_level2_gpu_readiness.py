"""GPU readiness of the Level 2 pipeline handlers (ControlNet, img2img, inpainting, SDXL img2img), checked on CPU.
The 16-bit rounding of their scales is checked in test_level2_sixteen_bit.py.

1. Second calls of a captured loop (CPU stand-in of test_graphs.py) that change per-call data (images, masks,
   strength's begin step, scales, prompts, seeds, num_images_per_prompt with guess mode): bitwise the eager fused
   loop, and the stock pipeline by the project's rule.
2. Host syncs inside the captured loop: a stricter capture stand-in (1. runs under it) also refuses tensors
   made from host data and ``Tensor.cpu``/``numpy``/``tolist``/``item``/``__bool__`` (on a GPU each is a host-device
   copy or sync that a capture refuses, or whose values it freezes); every Level 2 handler's loop passes it.

Oracles: diffusers' stock pipelines (same seeds; float64 truth for the parity rule); the eager fused loop bitwise.
Tiny random models only (the fixtures of test_diffusers_pipelines, _sdxl, _sd3, _flux and test_lcm_pipeline).
"""
import contextlib
import copy
import importlib

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import diffkern.diffusers as dd  # noqa: E402
import test_graphs  # noqa: E402
from diffkern import graphs  # noqa: E402
from diffkern.testing import assert_matches_reference  # noqa: E402
from test_diffusers_flux import DEV, flux_text  # noqa: E402, F401  (flux_text: a fixture)
from test_diffusers_level2_controlnet import SD, _image, controlnet_pipe  # noqa: E402
from test_diffusers_pipelines import pipeline_modules, tiny_sd  # noqa: E402, F401  (tiny_sd: a fixture)
from test_diffusers_schedulers import _randn32, diffusers_float64  # noqa: E402
from test_diffusers_sd3 import tiny_sd3_text  # noqa: E402, F401  (a fixture)
from test_diffusers_sdxl import SDXL_SCHEDULER, tiny_sdxl  # noqa: E402, F401  (tiny_sdxl: a fixture)
from test_lcm_pipeline import lcm_call, tiny_lcm  # noqa: E402, F401  (tiny_lcm: a fixture)
from test_graphs import fresh_cache  # noqa: E402, F401  (autouse)

#----------------------------------------------------------------------------
# 1. Second calls of a captured loop: per-call data replays one capture, bitwise the eager loop and by the project's
#    rule the stock pipeline.


class _StrictRecordedGraph(test_graphs.RecordedGraph):
    """test_graphs' capture stand-in (a host read of a device value or a data-dependent shape already fails it),
    also refusing a tensor made from host data inside the captured loop (``torch.tensor(...)``, ``as_tensor`` of a
    list: on a GPU, a copy from pageable host memory, which a capture refuses, or whose values it freezes) and the
    Tensor methods that leave the device (``.cpu()``, ``.numpy()``: no-ops on CPU tensors, so no op to see)."""

    def __init__(self, body):
        with _NoHostData(), _no_host_methods():
            super().__init__(body)


_HOST_METHODS = ("cpu", "numpy", "tolist", "item", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def _no_host_methods():
    saved = {name: getattr(torch.Tensor, name) for name in _HOST_METHODS}

    def refusing(name):
        def method(self, *args, **kwargs):
            if test_graphs._validating_cpu_table():
                return saved[name](self, *args, **kwargs)
            raise RuntimeError(f"Tensor.{name} inside the captured loop: on a GPU a host sync")
        return method
    try:
        for name in _HOST_METHODS:
            setattr(torch.Tensor, name, refusing(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


class _NoHostData(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.lift_fresh.default and not test_graphs._validating_cpu_table():
            raise RuntimeError(f"a tensor made from host data inside the captured loop ({func}): on a GPU a "
                               "host-device copy")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def strict(monkeypatch):
    """``fake`` of test_graphs with :class:`_StrictRecordedGraph` captures."""
    monkeypatch.setattr(graphs, "_device_ok", lambda x: True)
    monkeypatch.setattr(graphs, "_record", lambda body, device: _StrictRecordedGraph(body))


def test_strict_capture_refuses_host_data_and_syncs(strict):
    """The stand-in refuses what a CUDA capture refuses: a model that reads a device value, or makes a tensor of
    host data per call."""
    from diffkern import analytic
    from diffkern.sampling import sample

    gmm = analytic.GaussianMixture.demo_2d()
    x = torch.randn(8, 2, dtype=torch.float64) * 10.0
    sigmas = torch.tensor([10.0, 1.0, 0.0], dtype=torch.float64)
    sample(gmm, x, sigmas, "euler", backend="reference", graph=True)  # a clean model captures

    def host_data(x, sigma):
        return gmm(x, sigma) * torch.tensor([1.0], dtype=x.dtype)

    def host_read(x, sigma):
        return gmm(x, sigma) * float(sigma[0] > 0)

    def host_copy(x, sigma):
        return gmm(x.cpu(), sigma)

    for model in (host_data, host_read, host_copy):
        with pytest.raises(graphs.GraphCaptureError):
            sample(model, x, sigmas, "euler", backend="reference", graph=True)


def graphed(pipe):
    acc = dd.accelerate(pipe, graph=False)
    acc.__dict__["graph"] = True  # accelerate refuses graph=True without CUDA; the fixture captures on CPU
    return acc


def _truth(pipe, call, monkeypatch, *args, **kw):
    """The stock pipeline in float64 (modules, scheduler and pipeline module; float32 draws, the VAE encoder's
    posterior draw included) for ``call(pipe64, *args, **kw)``."""
    import diffusers.models.autoencoders.vae as vae_module

    twin = copy.deepcopy(pipe)
    for module in twin.components.values():
        if isinstance(module, torch.nn.Module):
            module.double()
    twin.vae.register_to_config(force_upcast=False)  # SDXL's prepare_latents: .float() for a force_upcast VAE
    module = importlib.import_module(type(pipe.scheduler).__module__)
    with diffusers_float64(module, *pipeline_modules(pipe)), monkeypatch.context() as m:
        m.setattr(vae_module, "randn_tensor", _randn32(vae_module.randn_tensor))
        twin.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        return call(twin, *args, **kw).to(torch.float64)


def _second_calls(pipe, call, cases, monkeypatch, captures):
    """Each case ``(seed, kwargs)`` through the captured loop: bitwise its eager fused loop; the replays (every case
    after the first) also against the stock pipeline by the project's rule."""
    fast, eager = graphed(pipe), dd.accelerate(pipe, graph=False)
    for k, (seed, kw) in enumerate(cases):
        got = call(fast, torch.Generator().manual_seed(seed), **kw)
        want = call(eager, torch.Generator().manual_seed(seed), **kw)
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=str(kw))
        if k:
            truth = _truth(pipe, call, monkeypatch, torch.Generator().manual_seed(seed), **kw)
            stock = call(pipe, torch.Generator().manual_seed(seed), **kw)
            assert_matches_reference(got, truth, stock, f"replay {kw}")
    assert graphs.info()["captures"] == captures, graphs.info()
    assert graphs.info()["replays"] == len(cases)


def _pixels(batch, seed, channels=3):
    return torch.rand(batch, channels, 16, 16, generator=torch.Generator().manual_seed(seed))


def _images(out):
    out = out.images
    return out if isinstance(out, torch.Tensor) else torch.as_tensor(np.asarray(out))


def _controlnet(pipe, generator, prompt=("a cat", "a dog"), **kw):
    kw = {"image": _image(), "guidance_scale": 4.0, "num_inference_steps": 4, "output_type": "pt", **kw}
    return _images(pipe(list(prompt), generator=generator, **kw))


def test_graph_controlnet_second_calls(tiny_sd, strict, monkeypatch):
    """Prompts, control images, scales and windows of later calls, num_images_per_prompt=2 with guess mode (the
    ControlNet on the conditional half of a larger batch), guidance_scale <= 1 (no CFG batch)."""
    pipe = controlnet_pipe(tiny_sd, diffusers.DPMSolverMultistepScheduler(**SD))
    per2 = {"num_images_per_prompt": 2, "guess_mode": True}
    cases = [(0, {}),
             (1, {"prompt": ("a red car", "sky"), "image": _image(seed=21), "controlnet_conditioning_scale": 0.6,
                  "control_guidance_start": 0.25, "negative_prompt": ["x", "y"]}),
             (2, dict(per2, image=_image(2, seed=22), controlnet_conditioning_scale=0.8)),
             (3, dict(per2, image=_image(2, seed=23), control_guidance_end=0.5, prompt=("a", "b"))),
             (4, {"guidance_scale": 1.0, "image": _image(seed=24), "control_guidance_end": 0.75}),
             (5, {"guidance_scale": 0.5, "image": _image(seed=25), "controlnet_conditioning_scale": 1.4})]
    _second_calls(pipe, _controlnet, cases, monkeypatch, captures=3)  # plain, guess mode x 2 images, no CFG


def test_graph_multi_controlnet_second_calls(tiny_sd, strict, monkeypatch):
    pipe = controlnet_pipe(tiny_sd, diffusers.HeunDiscreteScheduler(**SD), nets=2)
    cases = [(0, {"image": [_image(seed=3), _image(seed=4)]}),
             (1, {"image": [_image(seed=5), _image(seed=6)], "controlnet_conditioning_scale": [0.3, 1.2],
                  "control_guidance_start": [0.0, 0.5], "control_guidance_end": [0.5, 1.0]}),
             (2, {"image": [_image(seed=7), _image(seed=8)], "guess_mode": True, "prompt": ("sun", "moon")})]
    _second_calls(pipe, _controlnet, cases, monkeypatch, captures=2)


def _img2img(pipe, generator, prompt=("a cat", "a dog"), **kw):
    kw = {"image": _pixels(2, 3), "strength": 0.6, "guidance_scale": 4.0, "num_inference_steps": 5,
          "output_type": "pt", **kw}
    return _images(pipe(list(prompt), generator=generator, **kw))


def test_graph_img2img_second_calls(tiny_sd, strict, monkeypatch):
    """StableDiffusionImg2ImgPipeline: strength and num_inference_steps pick the begin step, so the schedule (a
    model wrapper, a capture, each); a schedule met again replays its capture with new images and prompts. KDPM2:
    two calls per step, timesteps from a device counter."""
    pipe = diffusers.StableDiffusionImg2ImgPipeline(**tiny_sd(diffusers.KDPM2DiscreteScheduler(**SD)).components)
    pipe.set_progress_bar_config(disable=True)
    cases = [(0, {}), (1, {"image": _pixels(2, 31), "prompt": ("a red car", "sky")}),
             (2, {"strength": 0.5, "num_inference_steps": 6, "guidance_scale": 6.0}),
             (3, {"strength": 0.8}), (4, {"image": _pixels(2, 32), "strength": 0.6})]
    _second_calls(pipe, _img2img, cases, monkeypatch, captures=3)


def test_graph_img2img_dpm_solver_second_calls(tiny_sd, strict, monkeypatch):
    pipe = diffusers.StableDiffusionImg2ImgPipeline(
        **tiny_sd(diffusers.DPMSolverMultistepScheduler(**SD)).components)
    pipe.set_progress_bar_config(disable=True)
    cases = [(0, {}), (1, {"image": _pixels(2, 33), "strength": 0.5, "num_inference_steps": 6}),
             (2, {"num_images_per_prompt": 2, "image": _pixels(4, 34)}), (3, {"prompt": ("a", "b")})]
    _second_calls(pipe, _img2img, cases, monkeypatch, captures=3)  # two schedules; 2 and 4 images


def _inpaint(pipe, generator, prompt=("a cat", "a dog"), **kw):
    kw = {"image": _pixels(2, 3), "mask_image": _pixels(2, 4, channels=1), "guidance_scale": 4.0,
          "num_inference_steps": 5, "output_type": "pt", **kw}
    return _images(pipe(list(prompt), generator=generator, **kw))


def test_graph_inpaint_second_calls(tiny_sd, strict, monkeypatch):
    """Strength's begin step (0.6 of 5, 0.5 of 6: two schedules), masks, images and prompts of later calls."""
    base = tiny_sd(diffusers.UniPCMultistepScheduler(**SD))
    torch.manual_seed(7)
    unet = diffusers.UNet2DConditionModel.from_config(dict(base.unet.config, in_channels=9)).eval()
    pipe = diffusers.StableDiffusionInpaintPipeline(**dict(base.components, unet=unet))
    pipe.set_progress_bar_config(disable=True)
    cases = [(0, {"strength": 0.6}),
             (1, {"strength": 0.5, "num_inference_steps": 6, "mask_image": _pixels(2, 41, channels=1)}),
             (2, {"strength": 0.6, "image": _pixels(2, 42), "prompt": ("a red car", "sky")})]
    _second_calls(pipe, _inpaint, cases, monkeypatch, captures=2)


def _sdxl_img2img(pipe, generator, prompt=("a cat", "a dog"), **kw):
    kw = {"image": _pixels(2, 3), "strength": 0.6, "guidance_scale": 4.0, "num_inference_steps": 5,
          "output_type": "pt", "negative_prompt": ["blurry", ""], **kw}
    return _images(pipe(list(prompt), generator=generator, **kw))


def test_graph_sdxl_img2img_second_calls(tiny_sdxl, strict, monkeypatch):
    """SDXL img2img: strength's begin step, images, prompts and time ids of later calls."""
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
        **tiny_sdxl(diffusers.EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)).components,
        add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    cases = [(0, {}), (1, {"strength": 0.5, "num_inference_steps": 6, "image": _pixels(2, 51)}),
             (2, {"prompt": ("a red car", "sky"), "original_size": (12, 20)})]
    _second_calls(pipe, _sdxl_img2img, cases, monkeypatch, captures=2)

#----------------------------------------------------------------------------
# 2. The other Level 2 handlers under the strict stand-in: two calls of one capture, bitwise the eager loop.


def _twice(pipe, call):
    fast, eager = graphed(pipe), dd.accelerate(pipe, graph=False)
    for seed in (0, 1):
        torch.testing.assert_close(call(fast, seed), call(eager, seed), rtol=0, atol=0, msg=str(seed))
    assert graphs.info()["captures"] == 1 and graphs.info()["replays"] == 2


def test_strict_sd_text2img_rescaled_guidance(tiny_sd, strict):
    pipe = tiny_sd(diffusers.KDPM2AncestralDiscreteScheduler(**SD))
    _twice(pipe, lambda p, seed: _images(p(["a cat", "a dog"], guidance_scale=5.0, guidance_rescale=0.5,
                                           num_inference_steps=4, output_type="pt",
                                           generator=torch.Generator().manual_seed(seed))))


def test_strict_sdxl_lcm_sd3_flux(tiny_sdxl, tiny_lcm, tiny_sd3_text, flux_text, strict):
    from test_level2_review import sd3_call, sdxl_call

    _twice(tiny_sdxl(diffusers.UniPCMultistepScheduler.from_config(SDXL_SCHEDULER)), sdxl_call)
    graphs.clear()
    _twice(tiny_lcm(diffusers.LCMScheduler(timestep_scaling=0.002)),
           lambda p, seed: lcm_call(p, torch.Generator().manual_seed(seed), 3))
    graphs.clear()
    _twice(tiny_sd3_text(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)), sd3_call)
    graphs.clear()
    _twice(flux_text(diffusers.FlowMatchEulerDiscreteScheduler(**DEV)),
           lambda p, seed: _images(p(["a cat", "a dog"], num_inference_steps=3, height=16, width=16,
                                     guidance_scale=3.5, max_sequence_length=6, output_type="pt",
                                     generator=torch.Generator().manual_seed(seed))))
