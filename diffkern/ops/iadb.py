"""IADB (Heitz et al. 2023) alpha-blending and deblending, ``math-samplers.md`` section 1.

IADB's x0 is the NOISE and x1 the DATA: ``x_alpha = (1-alpha)*x0 + alpha*x1``.

* ``iadb_blend`` (its own fused op; backends reference / cpp / triton / cuda): per-sample alpha, and
  optionally the training target ``x1 - x0`` in the same pass.
* The deblending steps are coefficient rows of the generic fused step (``sampler_step``), tested as
  such: Euler ``x + (alpha_next - alpha)*D``, two-head ``(1-alpha_next)*x0_bar + alpha_next*x1_bar``
  and the stochastic variant of section 1.6.
"""
from __future__ import annotations

import math
import numbers

import torch

from . import _checks, _lib, coefs
from .registry import OpSpec, register, resolve
from .sampler_step import sampler_step

#----------------------------------------------------------------------------
# Blend: reference, fake, registry, front-end.


def iadb_blend_reference(x0, x1, alpha):
    """``((1-alpha)*x0 + alpha*x1, x1 - x0)`` in x0's dtype; alpha (B,) broadcast over the sample dims."""
    cdt = torch.float64 if x0.dtype == torch.float64 else torch.float32
    a = alpha.to(cdt).reshape(-1, *([1] * (x0.dim() - 1)))
    x0c, x1c = x0.to(cdt), x1.to(cdt)
    return ((1 - a) * x0c + a * x1c).to(x0.dtype), (x1c - x0c).to(x0.dtype)


def _launch_reference(x0, x1, alpha, out, target_out):
    blended, target = iadb_blend_reference(x0, x1, alpha)
    if target_out is not None:
        target_out.copy_(target)
    out.copy_(blended)


def _fake(x0, x1, alpha, out, target_out):
    torch._check(out.shape == x0.shape, lambda: "out: shape must match x0")


_lib.register_fake("iadb_blend", _fake)


def _load_triton():
    from diffkern.kernels import iadb_blend as k
    return _lib.triton_op("iadb_blend", k.iadb_blend_launch)


SPEC = register(OpSpec("iadb_blend", {"reference": lambda: _launch_reference,
                                      "cpp": lambda: torch.ops.diffkern.iadb_blend,
                                      "cuda": lambda: torch.ops.diffkern.iadb_blend, "triton": _load_triton}))


def iadb_blend(x0, x1, alpha, *, out=None, target_out=None, backend=None):
    """Blend noise ``x0`` and data ``x1`` at per-sample ``alpha``; returns ``out``.

    Args:
        x0, x1: ``(B, ...)`` tensors of one float dtype, same shape and device.
        alpha: ``(B,)`` float tensor (any float dtype) on the same device, values in [0, 1].
        out: optional output for ``(1-alpha)*x0 + alpha*x1``; may be ``x0`` or ``x1`` (in place).
        target_out: optional output for the training target ``x1 - x0`` (the deblending direction).
    """
    _checks.float_tensor(x0, "x0")
    if x0.dim() == 0:
        raise ValueError("x0: expected a batched tensor (B, ...), got a 0-d tensor")
    _checks.like(x1, "x1", x0, "x0")
    _checks.float_tensor(alpha, "alpha")
    if alpha.device != x0.device:
        raise ValueError(f"alpha: expected device {x0.device} (that of x0), got {alpha.device}")
    if alpha.dim() != 1 or alpha.shape[0] != x0.shape[0]:
        raise ValueError(f"alpha: expected shape ({x0.shape[0]},) (one per sample of x0), got {tuple(alpha.shape)}")
    for name, t in (("out", out), ("target_out", target_out)):
        if t is not None:
            _checks.like(t, name, x0, "x0")
    _checks.no_partial_overlap({"out": out, "target_out": target_out}, {"x0": x0, "x1": x1, "alpha": alpha})
    _, launch = resolve("iadb_blend", x0.device.type, backend)
    outs = {"out": out if out is not None else torch.empty_like(x0, memory_format=torch.contiguous_format),
            "target_out": target_out}
    work = {k: (v if v is None or v.is_contiguous() else torch.empty_like(v, memory_format=torch.contiguous_format))
            for k, v in outs.items()}
    launch(x0.contiguous(), x1.contiguous(), alpha.contiguous(), work["out"], work["target_out"])
    for k, v in outs.items():
        if v is not None and work[k] is not v:
            v.copy_(work[k])
    return outs["out"]

#----------------------------------------------------------------------------
# Deblending steps as rows of the generic fused step.


def euler_row(alpha: float, alpha_next: float) -> list[float]:
    """Official IADB step ``x' = x + (alpha_next - alpha)*D`` with the network's D as model_out."""
    return coefs.row(a=1.0, b=alpha_next - alpha, p=0.0, q=1.0)


def two_head_row(alpha_next: float, lam: float = 0.0, alpha: float | None = None) -> list[float]:
    """Two-head step ``x' = alpha'*x1_bar + (1-alpha')*(k*x0_bar + sqrt(1-k^2)*xi)``.

    model_out = x1_bar, history = x0_bar. ``lam = 0`` is the deterministic variant (a) (k = 1); lam > 0
    is the stochastic variant of ``math-samplers.md`` 1.6 with ``k = (sigma'/sigma)**(lam**2)``,
    ``sigma = (1-alpha)/alpha``, which needs ``alpha``.
    """
    k = 1.0
    if lam > 0:
        if alpha is None:
            raise ValueError("alpha: required for the stochastic two-head step (lam > 0)")
        sig = math.inf if alpha <= 0 else (1 - alpha) / alpha
        sig_next = math.inf if alpha_next <= 0 else (1 - alpha_next) / alpha_next
        k = 0.0 if not math.isfinite(sig) else (sig_next / sig) ** (lam ** 2) if sig > 0 else 0.0
    return coefs.row(a=0.0, b=alpha_next, c=(1 - alpha_next) * k, s=(1 - alpha_next) * math.sqrt(max(0.0, 1 - k * k)),
                     p=0.0, q=1.0)


def _blend_value(v, name: str) -> float:
    # named here: a bad value would otherwise surface as a non-finite slot of the one-row coefficient table
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):  # numpy scalars too
        raise ValueError(f"{name}: expected a finite number (a blending value), got {v!r}")
    return float(v)


def _pair(a, a_name: str, b, b_name: str, *, dtype: bool) -> None:
    # the fused op would name its own arguments (x, model_out, history), not the caller's
    _checks.float_tensor(a, a_name)
    if a.dim() == 0:
        raise ValueError(f"{a_name}: expected a batched tensor (B, ...), got a 0-d tensor")
    _checks.like(b, b_name, a, a_name, dtype=dtype)


def iadb_deblend(x, d, alpha: float, alpha_next: float, *, out=None, backend=None):
    """Deterministic IADB step ``x + (alpha_next - alpha)*d`` through the fused op; returns ``out``.

    ``x``, ``d``: same shape (B, ...) (d may have another float dtype); host floats alpha, alpha_next
    (alpha_next < alpha steps back towards the noise). For loops, build the table once with
    :func:`euler_row` and call :func:`sampler_step` per row instead.
    """
    _pair(x, "x", d, "d", dtype=False)
    alpha, alpha_next = _blend_value(alpha, "alpha"), _blend_value(alpha_next, "alpha_next")
    table = coefs.table([euler_row(alpha, alpha_next)], device=x.device)
    return sampler_step(x, d, table, 0, out=out, backend=backend)


def iadb_deblend_two_head(x0_bar, x1_bar, alpha_next: float, *, out=None, backend=None):
    """Deterministic two-head step ``(1-alpha_next)*x0_bar + alpha_next*x1_bar``; returns ``out``.

    ``x0_bar``, ``x1_bar``: same shape (B, ...), dtype and device; alpha_next a host float."""
    _pair(x1_bar, "x1_bar", x0_bar, "x0_bar", dtype=True)
    alpha_next = _blend_value(alpha_next, "alpha_next")
    table = coefs.table([two_head_row(alpha_next)], device=x1_bar.device)
    return sampler_step(x1_bar, x1_bar, table, 0, history=x0_bar, out=out, backend=backend)


#----------------------------------------------------------------------------
# Sampler tables (diffkern.sampling.sample_iadb, the IADBScheduler drop-in), in IADB's own coordinates:
# x_alpha = (1-alpha)*noise + alpha*data.

VARIANTS = ("euler", "two_head", "stochastic")


def stochastic_row(alpha: float, alpha_next: float, lam: float) -> list[float]:
    """Section 1.6 step for a single-head network (model_out = D = x1_bar - x0_bar): with
    ``x1_bar = x + (1-alpha)*D`` and ``x0_bar = x - alpha*D`` (exact for posterior means),
    ``x' = alpha'*x1_bar + (1-alpha')*(k*x0_bar + sqrt(1-k^2)*xi)``, ``k = (sigma'/sigma)^(lam^2)``."""
    if alpha <= 0:
        k = 0.0 if lam > 0 else 1.0
    else:
        sig, sig_next = (1 - alpha) / alpha, (1 - alpha_next) / alpha_next
        k = (sig_next / sig) ** (lam * lam) if sig > 0 else 0.0
    return coefs.row(a=alpha_next + (1 - alpha_next) * k, b=alpha_next * (1 - alpha) - (1 - alpha_next) * k * alpha,
                     s=(1 - alpha_next) * math.sqrt(max(1.0 - k * k, 0.0)), p=0.0, q=1.0)


def sampler_table(alphas, *, variant="euler", lam=0.0) -> torch.Tensor:
    """Table of N rows for increasing alphas (N+1 values). euler: ``x' = x + (alpha'-alpha)*D``;
    two_head: ``x' = alpha'*x1_bar + (1-alpha')*(k*x0_bar + sqrt(1-k^2)*xi)`` (model_out = x1_bar,
    history = x0_bar; lam = 0 is deterministic); stochastic: the same step from a single-head D."""
    pairs = list(zip(alphas[:-1], alphas[1:]))
    if variant == "euler":
        rows = [euler_row(a, an) for a, an in pairs]
    elif variant == "two_head":
        rows = [two_head_row(an, lam, a) for a, an in pairs]
    else:
        rows = [stochastic_row(a, an, lam) for a, an in pairs]
    return coefs.table(rows)
