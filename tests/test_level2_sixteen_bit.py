"""GPU readiness of the Level 2 handlers in 16-bit pipelines, checked on CPU: a GPU's rounding of 0-d device tensors
in 16-bit multiplies, emulated (:class:`GpuScalarRule`). The ControlNet residuals the UNet receives, and the guided
output of ``guidance_rescale``, equal the stock pipeline's for the same inputs, bitwise, in bfloat16 and float16.
The capture side (second calls, host syncs) is ``test_level2_gpu_readiness.py``. Tiny random models only.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from test_diffusers_level2_controlnet import SD, _image, control_call, controlnet_pipe  # noqa: E402
from test_diffusers_pipelines import tiny_sd  # noqa: E402, F401  (a fixture)

_SIXTEEN = (torch.bfloat16, torch.float16)


class GpuScalarRule(TorchDispatchMode):
    """CUDA's rule for a multiply by a 0-d tensor, applied to CPU tensors. On a GPU only a CPU scalar (a Python
    number) is read in the op's math type (float32 for 16-bit tensors); a 0-d tensor on the device is an ordinary
    operand, loaded as the common dtype (ATen's ``opmath_symmetric_gpu_kernel_with_scalars``: ``BinaryFunctor<
    scalar_t, scalar_t, ...>``), so a float32 scale meeting bfloat16 residuals is rounded to bfloat16 first. CPU
    kernels read a 0-d right operand of a 16-bit multiply in float32, hiding the difference."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.mul.Tensor and all(isinstance(a, torch.Tensor) for a in args):
            common = torch.result_type(*args)
            if common in _SIXTEEN:
                args = tuple(a.to(common) for a in args)
        return func(*args, **(kwargs or {}))


def test_gpu_scalar_rule_rounds_device_scales_only():
    """The emulation itself: a Python float scale is exact in float32, a 0-d float32 tensor is rounded first."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)).bfloat16()
    exact = (x.float() * 0.7).bfloat16()
    with GpuScalarRule():
        by_float, by_tensor = x * 0.7, x * torch.tensor(0.7)
    torch.testing.assert_close(by_float, exact, rtol=0, atol=0)
    torch.testing.assert_close(by_tensor, x * torch.tensor(0.7).bfloat16(), rtol=0, atol=0)
    assert not torch.equal(by_tensor, exact)

#----------------------------------------------------------------------------
# ControlNet residuals in 16-bit pipelines: the stock pipeline's rounding.


def _record_unet_and_nets(pipe, log):
    """Forward pre-hooks: per UNet call its residuals, per ControlNetModel call its inputs (clones)."""
    nets = pipe.controlnet.nets if hasattr(pipe.controlnet, "nets") else [pipe.controlnet]

    def unet_hook(module, args, kwargs):
        log["unet"].append(([d.clone() for d in kwargs["down_block_additional_residuals"]],
                            kwargs["mid_block_additional_residual"].clone()))

    def net_hook(k):
        def hook(module, args, kwargs):
            x, t = args[:2]  # the fused loop passes sample and timestep by position
            log["nets"].append((k, x.clone(), t.clone(), kwargs["encoder_hidden_states"].clone(),
                                kwargs["controlnet_cond"].clone()))
        return hook
    handles = [pipe.unet.register_forward_pre_hook(unet_hook, with_kwargs=True)]
    handles += [net.register_forward_pre_hook(net_hook(k), with_kwargs=True) for k, net in enumerate(nets)]
    return handles


def _keep(i, n, start, end):
    """The stock pipeline's keep factor of loop iteration i of n (pipeline_controlnet.py, step 7.2)."""
    return 1.0 - float(i / n < start or (i + 1) / n > end)


SIXTEEN_CASES = [  # (nets, call kwargs)
    (1, {"controlnet_conditioning_scale": 0.7}),
    (1, {"controlnet_conditioning_scale": 1.3, "control_guidance_start": 0.25, "guidance_scale": 1.0,
         "negative_prompt": None}),
    (1, {"controlnet_conditioning_scale": 0.9, "guess_mode": True}),
    (2, {"controlnet_conditioning_scale": [0.7, 1.3], "control_guidance_end": [1.0, 0.5]}),
]


@pytest.mark.parametrize("dtype", _SIXTEEN, ids=str)
@pytest.mark.parametrize("nets, kw", SIXTEEN_CASES, ids=lambda v: str(v)[:60])
def test_sixteen_bit_residuals_round_as_the_pipeline(tiny_sd, dtype, nets, kw):
    """Under the GPU's rule, the residuals each UNet call of the fused loop receives are, bitwise, what the stock
    pipeline's ControlNet call makes from the same inputs with its Python float scale (scale times keep factor).
    Before the fix the fused loop gave the net a float32 0-d device tensor as its scale: rounded to 16 bits first,
    a bias of -1e-3 (bfloat16, 0.7) to -2.4e-3 (1.3) on every residual, against a stock mean rounding error of
    ~1e-5."""
    pipe = controlnet_pipe(tiny_sd, diffusers.EulerDiscreteScheduler(**SD), nets=nets).to(dtype)
    steps = 4
    image = [_image(2, seed=3), _image(1, seed=4)] if nets == 2 else _image()
    log = {"unet": [], "nets": []}
    handles = _record_unet_and_nets(pipe, log)
    try:
        with GpuScalarRule():
            control_call(dd.accelerate(pipe), torch.Generator().manual_seed(0), steps=steps, output_type="latent",
                         image=image, **kw)
    finally:
        for h in handles:
            h.remove()
    scales = kw["controlnet_conditioning_scale"]
    scales = scales if isinstance(scales, list) else [scales] * nets
    starts = kw.get("control_guidance_start", 0.0)
    ends = kw.get("control_guidance_end", 1.0)
    starts = starts if isinstance(starts, list) else [starts] * nets
    ends = ends if isinstance(ends, list) else [ends] * nets
    guess, cfg = kw.get("guess_mode", False), kw.get("guidance_scale", 4.0) > 1
    assert len(log["unet"]) == steps and len(log["nets"]) == steps * nets
    for i, (down, mid) in enumerate(log["unet"]):
        calls = log["nets"][i * nets:(i + 1) * nets]
        _, x, t, text, _ = calls[0]
        images = [c[4] for c in calls]
        cond_scale = [s * _keep(i, steps, a, b) for s, a, b in zip(scales, starts, ends)]
        with torch.no_grad(), GpuScalarRule():  # the stock pipeline's call (pipeline_controlnet.py, step 8)
            want_down, want_mid = pipe.controlnet(x, t, encoder_hidden_states=text,
                                                  controlnet_cond=images if nets > 1 else images[0],
                                                  conditioning_scale=cond_scale if nets > 1 else cond_scale[0],
                                                  guess_mode=guess, return_dict=False)
        if guess and cfg:
            want_down = [torch.cat([torch.zeros_like(d), d]) for d in want_down]
            want_mid = torch.cat([torch.zeros_like(want_mid), want_mid])
        for got, want in zip([*down, mid], [*want_down, want_mid]):
            assert got.dtype == dtype
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"call {i} {kw}")


#----------------------------------------------------------------------------
# guidance_rescale in 16-bit pipelines.


@pytest.mark.parametrize("dtype", _SIXTEEN, ids=str)
def test_sixteen_bit_rescaled_guidance_rounds_as_the_pipeline(tiny_sd, dtype):
    """guidance_rescale: each call's guided output is, bitwise, diffusers' ``rescale_noise_cfg`` of ``u + w*(c - u)``
    with Python float w and phi (each product in float32, rounded once) on the same UNet outputs. Before the fix the
    weights were cast to the UNet's dtype first (0.6 -> 0.6015625 in bfloat16, 1 - phi taken in bfloat16)."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
    from diffkern.diffusers.accelerate_text2img import RescaledCFGDenoiser

    pipe = tiny_sd(diffusers.EulerDiscreteScheduler(**SD)).to(dtype)
    outs, guided = [], []
    hook = pipe.unet.register_forward_hook(lambda module, args, out: outs.append(out[0].clone()))
    raw = RescaledCFGDenoiser.raw

    def recorded(self, *args, **kwargs):
        out = raw(self, *args, **kwargs)
        guided.append(out[0].clone())
        return out
    try:
        RescaledCFGDenoiser.raw = recorded
        with GpuScalarRule():
            dd.accelerate(pipe)(["a cat", "a dog"], guidance_scale=5.3, guidance_rescale=0.6, num_inference_steps=3,
                                output_type="latent", generator=torch.Generator().manual_seed(0))
    finally:
        RescaledCFGDenoiser.raw = raw
        hook.remove()
    assert len(outs) == len(guided) == 3
    for out, got in zip(outs, guided):
        uncond, text = out.chunk(2)
        with GpuScalarRule():
            want = rescale_noise_cfg(uncond + 5.3 * (text - uncond), text, guidance_rescale=0.6)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
