"""Generic fused sampler step: ``x_next = a*x + b*D + g*D_raw + c*H + c2*H2 + c3*H3 + s*xi + bu*D_u`` in one pass.

D is the denoised estimate converted inside the kernel from the raw model output of any prediction
type (an affine map with per-step scalars, optionally after classifier-free guidance and clipping), D_u the same
map of the unconditional output (CFG++);
H, H2 and H3 are history tensors (the previous one, two and three D, eps or slopes; H2 for third-order multistep
samplers, H3 for fourth-order ones) and
xi counter-based normal noise. The exact per-element
arithmetic and the coefficient slots are specified in :mod:`diffkern.ops.coefs`; the noise in
:mod:`diffkern.ops.philox`. ``math-samplers.md`` section 7 tabulates the coefficients per sampler.

Backends: reference (this file), cpp (``csrc/cpu/sampler_step.cpp``), triton
(``kernels/sampler_step.py``), cuda (``csrc/cuda/sampler_step.cu``).
"""
from __future__ import annotations

import torch

from . import _checks, _lib, coefs, philox
from .registry import OpSpec, register, resolve

#----------------------------------------------------------------------------
# Reference: pure PyTorch, any device; with float64 inputs it is the test oracle.


def sampler_step_reference(x, model_out, coef, step, *, model_out_uncond=None, history=None, history2=None,
                           history3=None, noise=None, seed=None, skip_noise=False):
    """Float64-capable reference. Returns ``(out, x0, history_new)`` in x's dtype.

    Math runs in float64 for float64 ``x``, otherwise in float32. Reads the table row as device
    tensors (no host sync). ``seed``: int64 tensor (1,) or (B,); required when ``noise`` is None.
    ``skip_noise``: True when the caller knows on the host that ``coef[step]``'s s slot is 0 (a loop deciding from
    its float64 host table): the noise is then neither drawn nor read, with a bitwise identical result.
    """
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    r = coef[step].to(cdt)
    xv = x.to(cdt)
    m = model_out.to(cdt)
    u = m  # without an unconditional output D_u is the unclipped D
    if model_out_uncond is not None:
        u = model_out_uncond.to(cdt)
        m = u + r[coefs.W] * (m - u)
    d_raw = r[coefs.P] * xv + r[coefs.Q] * m
    d_u = r[coefs.P] * xv + r[coefs.Q] * u
    d = torch.minimum(torch.maximum(d_raw, -r[coefs.CLIP]), r[coefs.CLIP])
    acc = r[coefs.A] * xv + r[coefs.B] * d
    acc = acc + r[coefs.G] * d_raw
    if history is not None:
        acc = acc + torch.where(r[coefs.C] != 0, r[coefs.C] * history.to(cdt), 0.0)
    if history2 is not None:
        acc = acc + torch.where(r[coefs.C2] != 0, r[coefs.C2] * history2.to(cdt), 0.0)
    if history3 is not None:
        acc = acc + torch.where(r[coefs.C3] != 0, r[coefs.C3] * history3.to(cdt), 0.0)
    if skip_noise:  # the masked term below is then +0.0 everywhere; adding it keeps -0.0 + 0.0 = +0.0 as it was
        acc = acc + 0.0
    else:  # the Philox draw is most of this function's cost, hence the host hint above
        xi = noise.to(cdt) if noise is not None else philox.noise_like(x, seed, step, cdt)
        acc = acc + torch.where(r[coefs.S] != 0, r[coefs.S] * xi, 0.0)
    # CFG++ terms: a zero slot leaves the result bitwise as it was (as the kernels skip the term)
    acc = torch.where(r[coefs.BU] != 0, acc + r[coefs.BU] * d_u, acc)
    h_new = r[coefs.E] * xv + r[coefs.F] * d
    h_new = torch.where(r[coefs.FU] != 0, h_new + r[coefs.FU] * d_u, h_new)
    return acc.to(x.dtype), d.to(x.dtype), h_new.to(x.dtype)


def _launch_reference(x, model_out, model_out_uncond, history, noise, coef, step, seed, out, x0_out, history_out,
                      history2=None, history3=None, skip_noise=False):
    res, d, h = sampler_step_reference(x, model_out, coef, step, model_out_uncond=model_out_uncond,
                                       history=history, history2=history2, history3=history3, noise=noise, seed=seed,
                                       skip_noise=skip_noise)
    if x0_out is not None:
        x0_out.copy_(d)
    if history_out is not None:
        history_out.copy_(h)
    out.copy_(res)

#----------------------------------------------------------------------------
# Fake kernel (shape checks only) for torch.compile and opcheck.


def _fake(x, model_out, model_out_uncond, history, noise, coef, step, seed, out, x0_out, history_out, history2=None,
          history3=None):
    torch._check(out.shape == x.shape, lambda: "out: shape must match x")
    torch._check(coef.dim() == 2 and coef.shape[1] == coefs.NCOEF, lambda: "coef: expected (N, NCOEF)")


_lib.register_fake("sampler_step", _fake)

#----------------------------------------------------------------------------
# Registry entry.


def _load_cpp():
    return torch.ops.diffkern.sampler_step


def _load_triton():
    from diffkern.kernels import sampler_step as k
    return _lib.triton_op("sampler_step", k.sampler_step_launch)


SPEC = register(OpSpec("sampler_step", {"reference": lambda: _launch_reference, "cpp": _load_cpp,
                                        "cuda": _load_cpp, "triton": _load_triton}))

#----------------------------------------------------------------------------
# Public front-end.


def check_coef(coef, x: torch.Tensor) -> None:
    """Raise naming ``coef`` unless it is a float64 ``(N, NCOEF)`` tensor on x's device (its values are checked by
    :func:`coefs.validate_once` where they can be read on the host)."""
    _checks.tensor(coef, "coef")
    if coef.dim() != 2 or coef.shape[1] != coefs.NCOEF:
        raise ValueError(f"coef: expected shape (N, {coefs.NCOEF}), got {tuple(coef.shape)}")
    if coef.dtype != torch.float64:
        raise TypeError(f"coef: expected dtype torch.float64, got {coef.dtype}")
    if coef.device != x.device:
        raise ValueError(f"coef: expected device {x.device} (that of x), got {coef.device}")


def check_histories(uses: tuple, step: int, history, history2, history3) -> None:
    """Raise naming the missing history unless every history ``coef[step]`` reads is given (``uses``: whether the
    row's c, c2, c3 are non-zero, from :func:`coefs.validate_once`)."""
    if history is None and uses[0]:
        raise ValueError(f"history: required, since coef[{step}] has a non-zero history coefficient c")
    if history2 is None and uses[1]:
        raise ValueError(f"history2: required, since coef[{step}] has a non-zero c2")
    if history3 is None and uses[2]:
        raise ValueError(f"history3: required, since coef[{step}] has a non-zero c3")


def sampler_step(x, model_out, coef, step, *, model_out_uncond=None, history=None, history2=None, history3=None,
                 noise=None, seed=None, out=None, x0_out=None, history_out=None, backend=None):
    """One fused sampler update; returns ``out`` (a new tensor unless given).

    Args:
        x: state, any shape ``(B, ...)``, float16/bfloat16/float32/float64 (dtype S).
        model_out: raw model output, shape of x, any float dtype M (the prediction type is encoded
            in the table's p, q slots).
        coef: float64 ``(N, coefs.NCOEF)`` table on x's device (see :func:`coefs.table`).
        step: Python int, the row to read; also the Philox step counter.
        model_out_uncond: unconditional output for guidance ``u + w*(c - u)`` (dtype M), or None (then the bu and
            fu terms read model_out as u).
        history: H, shape and dtype of x, or None (then c must be 0; checked for CPU tables).
        history2: H2, the history before H (shape and dtype of x), or None (then c2 must be 0).
        history3: H3, the history before H2 (shape and dtype of x), or None (then c3 must be 0).
        noise: explicit standard-normal noise (shape and dtype of x) instead of the Philox stream.
        seed: int64 tensor (1,) or (B,) on x's device, read inside the kernel; default zeros(1).
        out, x0_out, history_out: optional outputs (shape and dtype of x); ``out`` may be ``x`` and
            ``history_out`` may be any history input (in place: a multistep loop writes the new history over
            the oldest one).
        backend: "reference" | "cpp" | "triton" | "cuda" | "auto" | None (DIFFKERN_BACKEND, then auto).
    """
    _checks.float_tensor(x, "x")
    _checks.like(model_out, "model_out", x, "x", dtype=False)
    if model_out_uncond is not None:
        _checks.like(model_out_uncond, "model_out_uncond", model_out, "model_out")
    for name, t in (("history", history), ("history2", history2), ("history3", history3), ("noise", noise),
                    ("out", out), ("x0_out", x0_out), ("history_out", history_out)):
        if t is not None:
            _checks.like(t, name, x, "x")
    check_coef(coef, x)
    step = _checks.step_index(step, coef)  # a Python int for the op's schema (numpy ints accepted)
    # Cheap for CPU tables; device tables are validated when built (no sync in loops). Under torch.compile the
    # check would read tensor values on the host, which a trace cannot do: compiled callers validate beforehand.
    if coef.device.type == "cpu" and not torch.compiler.is_compiling():
        check_histories(coefs.validate_once(coef)[step], step, history, history2, history3)
    seed = _checks.seed_tensor(torch.zeros(1, dtype=torch.int64, device=x.device) if seed is None else seed, x)
    _checks.no_partial_overlap({"out": out, "x0_out": x0_out, "history_out": history_out},
                               {"x": x, "model_out": model_out, "model_out_uncond": model_out_uncond,
                                "history": history, "history2": history2, "history3": history3, "noise": noise},
                               {"coef": coef, "seed": seed})
    if torch.compiler.is_compiling():  # the registry's lookup is host code: done once, while tracing
        from . import _traced
        launch = SPEC.loaders[_traced.backend("sampler_step", x.device.type, backend)]()
    else:
        _, launch = resolve("sampler_step", x.device.type, backend)

    def c(t):
        return None if t is None else t.contiguous()

    outs = {"out": out if out is not None else torch.empty_like(x, memory_format=torch.contiguous_format),
            "x0_out": x0_out, "history_out": history_out}
    work = {k: (v if v is None or v.is_contiguous() else torch.empty_like(v, memory_format=torch.contiguous_format))
            for k, v in outs.items()}
    launch(c(x), c(model_out), c(model_out_uncond), c(history), c(noise), coef.contiguous(), step, seed,
           work["out"], work["x0_out"], work["history_out"], c(history2), c(history3))
    for k, v in outs.items():
        if v is not None and work[k] is not v:
            v.copy_(work[k])
    return outs["out"]
