"""The optimal denoiser of a finite dataset as one op (Chen et al., ``math-samplers.md`` 4.4).

For data points ``y_1..y_N`` (dimension D) and per-sample noise level sigma::

    D(x, sigma) = sum_i w_i y_i,   w = softmax_i( (x.y_i - ||y_i||^2/2) / sigma^2 )

(``||x||^2`` cancels in the softmax). This is single-query attention with ``q = x/sigma^2``,
``K = V = data`` and a per-key bias ``-||y_i||^2/(2 sigma^2)``; sigma = 0 returns x.

Backends: reference (this file: a direct softmax in float64 for float64 inputs, float32 otherwise; it
materialises the (B, N) weights, so it is the spec, not the fast path) and triton
(``kernels/optimal_denoiser.py``: flash-attention-style online softmax over N, float32
accumulation, float16/bfloat16/float32 inputs, never forms (B, N)). The chunked PyTorch version
for any device and dtype is :class:`diffkern.analytic.EmpiricalDenoiser`.

Precision: the logits are formed as ``x.y_i - ||y_i||^2/2``, which rounds at the scale of ``|x||y_i|``
(not of ``||x - y_i||^2``) and the error is multiplied by ``1/sigma^2``: in float32, data with a large
common offset (e.g. 1000 with unit spread) gets weights off by ~10% at sigma = 1. Pass data centred on
its mean (and x shifted alike; D is translation-equivariant), as ``EmpiricalDenoiser(backend=...)`` does.
"""
from __future__ import annotations

import math
import numbers

import torch

from . import _checks, _lib
from .registry import OpSpec, register, resolve

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def half_sq_norms(data: torch.Tensor) -> torch.Tensor:
    """``||y_i||^2 / 2`` of (N, ...) ``data`` as an (N,) tensor in the compute dtype (float64 for float64
    data, float32 otherwise). Compute it once per dataset and pass it as ``data_half_sq``."""
    y = data.reshape(data.shape[0], -1).to(compute_dtype(data.dtype))
    return 0.5 * (y * y).sum(1)

#----------------------------------------------------------------------------
# Reference: pure PyTorch, any device; with float64 inputs it is the test oracle.


def optimal_denoiser_reference(x, data, sigma, data_half_sq=None):
    """Float64-capable reference. Returns ``D(x, sigma)`` with x's shape and dtype.

    ``x``: (B, ...); ``data``: (N, ...) with the same elements per sample; ``sigma``: (B,) or (1,)
    tensor. Math in float64 for float64 x, else float32.
    """
    cdt = compute_dtype(x.dtype)
    batch = x.shape[0]
    y = data.reshape(data.shape[0], -1).to(cdt)
    xf = x.reshape(batch, y.shape[1]).to(cdt)  # not reshape(B, -1): that fails for an empty batch
    h = half_sq_norms(data) if data_half_sq is None else data_half_sq.to(cdt)
    s = sigma.to(cdt).reshape(-1, 1).expand(batch, 1)
    logits = xf @ y.T - h
    # Shifted to <= 0 before the scale: then no finite 1/sigma^2 can overflow them to +inf (inf - inf = nan).
    logits = logits - logits.amax(dim=1, keepdim=True)
    w = torch.softmax(logits * inv_sq(s), dim=1)
    return torch.where(s > 0, w @ y, xf).to(x.dtype).reshape(x.shape)


def inv_sq(sigma: torch.Tensor) -> torch.Tensor:
    """``1/sigma^2`` clamped to the finite positive range of sigma's dtype (1 where sigma = 0: those rows
    return x). Unclamped, it overflows to inf below sigma ~ 1e-19 in float32 (1e-154 in float64) and the
    softmax turns to nan; the clamped scale still makes the weights one-hot on the nearest data point
    (the sigma -> 0 limit), and at huge sigma uniform (the data mean)."""
    info = torch.finfo(sigma.dtype)
    return (1.0 / torch.where(sigma > 0, sigma, 1.0) ** 2).clamp(info.tiny, info.max)


def _launch_reference(x, data, data_half_sq, sigma, out):
    out.copy_(optimal_denoiser_reference(x, data, sigma, data_half_sq))

#----------------------------------------------------------------------------
# Fake kernel (shape checks only) for torch.compile and opcheck.


def _fake(x, data, data_half_sq, sigma, out):
    torch._check(out.shape == x.shape, lambda: "out: shape must match x")
    torch._check(data_half_sq.shape[0] == data.shape[0], lambda: "data_half_sq: expected shape (N,)")


_lib.register_fake("optimal_denoiser", _fake)

#----------------------------------------------------------------------------
# Registry entry.


def _load_triton():
    from diffkern.kernels import optimal_denoiser as k
    return _lib.triton_op("optimal_denoiser", k.optimal_denoiser_launch)


SPEC = register(OpSpec("optimal_denoiser", {"reference": lambda: _launch_reference, "triton": _load_triton}))

#----------------------------------------------------------------------------
# Public front-end.


def _sigma_vector(sigma, x: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
    batch = x.shape[0]
    if isinstance(sigma, torch.Tensor):
        _checks.float_tensor(sigma, "sigma")
        if sigma.device != x.device:
            raise ValueError(f"sigma: expected device {x.device} (that of x), got {sigma.device}")
        if sigma.numel() != 1 and (sigma.dim() != 1 or sigma.shape[0] != batch):
            raise ValueError(f"sigma: expected a float, a 0-d or (1,) tensor, or shape ({batch},) "
                             f"(one per sample of x), got {tuple(sigma.shape)}")
        # A sigma > 0 below cdt's smallest normal would round to 0 (or a subnormal a GPU flushes to 0) and
        # return x; kept positive, it gives the sigma -> 0 limit (the nearest data point). No host sync.
        s = sigma.reshape(-1)
        s = torch.where(s > 0, s.clamp_min(torch.finfo(cdt).tiny), s)
        return s.to(cdt).expand(batch).contiguous()
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):  # numpy scalars too
        raise TypeError(f"sigma: expected a float or a tensor, got {type(sigma).__name__}")
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma: expected a finite value >= 0, got {sigma}")
    if sigma > 0:
        sigma = max(float(sigma), torch.finfo(cdt).tiny)
    return torch.full((batch,), float(sigma), dtype=cdt, device=x.device)


def optimal_denoiser(x, data, sigma, *, data_half_sq=None, out=None, backend=None):
    """The empirical optimal denoiser ``D(x, sigma)`` over ``data``; returns ``out`` (new unless given).

    Args:
        x: ``(B, D)`` or ``(B, *shape)``, float16/bfloat16/float32/float64 (the triton backend takes
            float16/bfloat16/float32 and accumulates in float32).
        data: ``(N, D)`` or ``(N, *shape)`` with the same number of elements per row as x, N >= 1,
            x's dtype and device.
        sigma: float >= 0, a 0-d or (1,) tensor, or a (B,) tensor (values not checked: no host sync).
        data_half_sq: optional precomputed :func:`half_sq_norms` of data ((N,), compute dtype).
        out: optional output, x's shape and dtype.
        backend: "reference" | "triton" | "auto" | None (DIFFKERN_BACKEND, then auto: triton on CUDA,
            reference on CPU).
    """
    _checks.float_tensor(x, "x")
    if x.dim() < 1:
        raise ValueError("x: expected a batched tensor (B, ...), got a 0-d tensor")
    _checks.float_tensor(data, "data")
    if data.device != x.device:
        raise ValueError(f"data: expected device {x.device} (that of x), got {data.device}")
    if data.dtype != x.dtype:
        raise TypeError(f"data: expected dtype {x.dtype} (that of x), got {data.dtype}")
    dim = math.prod(x.shape[1:])
    if data.dim() < 1 or data.shape[0] == 0 or math.prod(data.shape[1:]) != dim:
        raise ValueError(f"data: expected shape (N, ...) with N >= 1 and {dim} elements per row (as x), "
                         f"got {tuple(data.shape)}")
    cdt = compute_dtype(x.dtype)
    sig = _sigma_vector(sigma, x, cdt)
    if data_half_sq is None:
        data_half_sq = half_sq_norms(data)
    else:
        _checks.tensor(data_half_sq, "data_half_sq")
        if data_half_sq.shape != (data.shape[0],) or data_half_sq.dtype != cdt or data_half_sq.device != x.device:
            raise ValueError(f"data_half_sq: expected a ({data.shape[0]},) {cdt} tensor on {x.device}, "
                             f"got {tuple(data_half_sq.shape)} {data_half_sq.dtype} on {data_half_sq.device}")
    if out is not None:
        _checks.like(out, "out", x, "x")
        _checks.no_partial_overlap({"out": out}, {"x": x}, {"data": data, "data_half_sq": data_half_sq})
    used, launch = resolve("optimal_denoiser", x.device.type, backend)
    if used == "triton" and x.dtype not in TRITON_DTYPES:
        raise TypeError(f"x: the triton backend takes {[str(d) for d in TRITON_DTYPES]} (float32 accumulation), "
                        f"got {x.dtype}; use backend='reference' for float64")
    result = out if out is not None else torch.empty_like(x, memory_format=torch.contiguous_format)
    work = result if result.is_contiguous() else torch.empty_like(result, memory_format=torch.contiguous_format)
    launch(x.reshape(x.shape[0], dim).contiguous(), data.reshape(data.shape[0], dim).contiguous(),
           data_half_sq.contiguous(), sig, work.view(x.shape[0], dim))
    if work is not result:
        result.copy_(work)
    return result
