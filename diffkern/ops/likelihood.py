"""Fused accumulation of McAllester's likelihood integrand (``math-samplers.md`` 3.3, eps form).

Per sample b of a batch of points y (noised as ``x = y + sigma*eps`` and denoised by the model into D)::

    eps_hat = (x - D)/sigma
    acc[b] += w[b] * sum over the elements of sample b of [ (eps - eps_hat)^2 - c[b]*eps^2 ]

``c`` weights the control variate ``||eps||^2`` (mean d, so the caller adds ``-(1 - c)*w*d``): c = 1
is the integrand of the eps form; ``diffkern.likelihood`` lowers c at large sigma, where
``eps_hat ~ eps`` and c = 1 would leave a variance of 2d per level.

The kernels read y, D and eps (a tensor, or the Philox stream at counter ``step``, redrawn in-kernel
so it is never stored) and write B floats. The element term is evaluated as
``e*(e - 2*eps)`` with ``e = eps_hat = (y - D)/sigma + eps``: algebraically the same, but it avoids
both the rounding of ``x`` (``(x - D)/sigma`` loses ``ulp(y)/sigma``) and the cancellation of the
two O(1) squares when sigma is small and ``eps_hat ~ 0``; the control-variate term is then
``(1 - c)*eps^2`` (exactly 0 for c = 1).

Backends: reference (this file), cpp (``csrc/cpu/likelihood.cpp``), triton (``kernels/likelihood.py``).
"""
from __future__ import annotations

import numbers

import torch

from . import _checks, _lib, philox
from .registry import OpSpec, register, resolve

#----------------------------------------------------------------------------
# Reference: pure PyTorch, any device; with float64 inputs it is the test oracle.


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulator dtype for points of ``dtype``: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def likelihood_accum_reference(y, denoised, sigma, weight, step: int = 0, *, cv=None, noise=None, seed=None,
                               acc=None):
    """Float64-capable reference. Returns the updated accumulator, (B,) in :func:`acc_dtype` of y.

    Math runs in float64 for float64 ``y``, otherwise in float32. ``sigma``, ``weight``, ``cv``: (1,) or
    (B,) tensors (cv None: 1); ``seed``: int64 (1,) or (B,), required when ``noise`` is None; ``acc``: (B,) start value
    (zeros if None; not modified).
    """
    cdt = acc_dtype(y.dtype)
    batch = y.shape[0]
    per_sample = y[0].numel() if batch > 0 else 0
    yv = y.to(cdt).reshape(batch, per_sample)
    eps = noise.to(cdt) if noise is not None else philox.noise_like(y, seed, step, cdt)
    eps = eps.reshape(batch, per_sample)
    e = (yv - denoised.to(cdt).reshape(batch, per_sample)) / sigma.to(cdt).reshape(-1, 1) + eps
    one_minus_c = 0.0 if cv is None else 1 - cv.to(cdt).reshape(-1, 1)
    total = (e * (e - 2 * eps) + one_minus_c * eps * eps).sum(1) * weight.to(cdt).reshape(-1)
    if acc is not None:
        total = acc.to(cdt) + total
    return total.to(cdt)


def _launch_reference(y, denoised, noise, sigma, weight, cv, step, seed, acc):
    acc.copy_(likelihood_accum_reference(y, denoised, sigma, weight, step, cv=cv, noise=noise, seed=seed, acc=acc))

#----------------------------------------------------------------------------
# Fake kernel (shape checks only) for torch.compile and opcheck.


def _fake(y, denoised, noise, sigma, weight, cv, step, seed, acc):
    torch._check(acc.dim() == 1 and acc.shape[0] == y.shape[0], lambda: "acc: expected shape (B,)")


_lib.register_fake("likelihood_accum", _fake)

#----------------------------------------------------------------------------
# Registry entry.


def _load_cpp():
    return torch.ops.diffkern.likelihood_accum


def _load_triton():
    from diffkern.kernels import likelihood as k
    return _lib.triton_op("likelihood_accum", k.likelihood_accum_launch)


SPEC = register(OpSpec("likelihood_accum", {"reference": lambda: _launch_reference, "cpp": _load_cpp,
                                            "triton": _load_triton}))

#----------------------------------------------------------------------------
# Public front-end.


def _per_sample(t, name: str, y: torch.Tensor) -> torch.Tensor:
    _checks.tensor(t, name)
    if t.dtype != torch.float64:
        raise TypeError(f"{name}: expected dtype torch.float64 (host-computed, like the coefficient tables), "
                        f"got {t.dtype}")
    if t.device != y.device:
        raise ValueError(f"{name}: expected device {y.device} (that of y), got {t.device}")
    if t.numel() != 1 and (t.dim() != 1 or t.shape[0] != y.shape[0]):
        raise ValueError(f"{name}: expected shape (1,) or (B,) with B = y.shape[0] = {y.shape[0]}, "
                         f"got {tuple(t.shape)}")
    return t.reshape(-1).contiguous()


def likelihood_accum(y, denoised, sigma, weight, acc, *, cv=None, step: int = 0, noise=None, seed=None,
                     backend=None):
    """``acc[b] += weight[b] * sum_elements[(eps - eps_hat)^2 - cv[b]*eps^2]`` in place; returns ``acc``.

    Args:
        y: the points, ``(B, ...)`` float16/bfloat16/float32/float64 (dtype S).
        denoised: the model's ``D(y + sigma*eps, sigma)``, shape and dtype of y.
        sigma: float64 ``(1,)`` or ``(B,)`` on y's device, values > 0 (not checked: no host sync).
        weight: float64 ``(1,)`` or ``(B,)`` quadrature weight of this noise level.
        acc: ``(B,)`` accumulator, float64 for float64 y, else float32 (:func:`acc_dtype`).
        cv: float64 ``(1,)`` or ``(B,)`` control-variate coefficient; None: 1 (the plain eps form).
        step: Python int in [0, 2**32), the Philox counter of eps (the noise level's index).
        noise: explicit eps (shape and dtype of y) instead of the Philox stream.
        seed: int64 tensor (1,) or (B,) on y's device; default zeros(1). With ``noise=None`` eps is
            ``diffkern.ops.randn(y.shape, seed, step=step)``, drawn again inside the kernel.
        backend: "reference" | "cpp" | "triton" | "auto" | None (DIFFKERN_BACKEND, then auto).
    """
    _checks.float_tensor(y, "y")
    if y.dim() == 0:
        raise ValueError("y: expected a batched tensor (B, ...), got a 0-d tensor")
    _checks.like(denoised, "denoised", y, "y")
    if noise is not None:
        _checks.like(noise, "noise", y, "y")
    sigma = _per_sample(sigma, "sigma", y)
    weight = _per_sample(weight, "weight", y)
    cv = _per_sample(torch.ones(1, dtype=torch.float64, device=y.device) if cv is None else cv, "cv", y)
    _checks.tensor(acc, "acc")
    if acc.dtype != acc_dtype(y.dtype):
        raise TypeError(f"acc: expected dtype {acc_dtype(y.dtype)} (for y of dtype {y.dtype}), got {acc.dtype}")
    if acc.device != y.device:
        raise ValueError(f"acc: expected device {y.device} (that of y), got {acc.device}")
    if acc.shape != (y.shape[0],):
        raise ValueError(f"acc: expected shape ({y.shape[0]},) (one per sample of y), got {tuple(acc.shape)}")
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):  # numpy ints too
        raise TypeError(f"step: expected a Python int, got {type(step).__name__}")
    step = int(step)
    if not 0 <= step < 2**32:
        raise ValueError(f"step: expected 0 <= step < 2**32, got {step}")
    seed = _checks.seed_tensor(torch.zeros(1, dtype=torch.int64, device=y.device) if seed is None else seed, y)
    _checks.no_partial_overlap({"acc": acc}, {"y": y, "denoised": denoised, "noise": noise},
                               {"sigma": sigma, "weight": weight, "cv": cv, "seed": seed})
    _, launch = resolve("likelihood_accum", y.device.type, backend)
    work = acc if acc.is_contiguous() else acc.contiguous()
    launch(y.contiguous(), denoised.contiguous(), None if noise is None else noise.contiguous(), sigma, weight, cv,
           step, seed, work)
    if work is not acc:
        acc.copy_(work)
    return acc
