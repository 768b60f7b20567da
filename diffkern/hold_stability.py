"""Stability of the Euler probability-flow ODE sampler ``"ode"`` of :mod:`diffkern.hold_sampling` (host, float64).

With F = S_k - xi E_nn (S_k skew-symmetric, eigenvalues 0 and +-i omega_j) the reverse-time probability-flow drift
is -S_k z + (xi / L)(s_n + L z_n) e_n, and its second term vanishes where the score is the stationary one, s = -L z.
There (on data distributed as the prior, where the exact flow is the rotation exp(-S_k b) and keeps every norm) the
Euler step I - b S_k multiplies the mode of frequency omega by |1 - i b omega| = sqrt(1 + (b omega)^2) > 1: explicit
Euler has no stable step for an imaginary eigenvalue, so the inflation only shrinks with the step, as
prod_i sqrt(1 + (b_i omega)^2) ~ exp(omega^2 sum_i b_i^2 / 2) over a schedule. omega_max grows with the order
(1 at n = 2, 3 at n = 3, 11.2 at n = 6, 22 at n = 9; defaults b = 5 / steps): at n = 6 and 60 steps the fastest mode
grows 1e8-fold and the sampler's output diverges. The exponential-Euler ``"ode_exp"`` integrates the rotation
exactly and has no such limit.
"""
from __future__ import annotations

import math
import sys
import warnings

import torch

from .hold_params import finite

GROWTH_LIMIT = 10.0  # spurious growth of the fastest mode over the schedule beyond which "ode" warns


class EulerODEStabilityWarning(RuntimeWarning):
    """The ``"ode"`` (explicit Euler) HOLD sampler inflates the drift's fastest rotation beyond GROWTH_LIMIT."""


def _steps(b, name: str = "b") -> torch.Tensor:
    """The schedule ``b`` checked: a real 1-D tensor of finite steps >= 0 (read on the host), as float64."""
    if not isinstance(b, torch.Tensor) or b.dtype == torch.bool or b.is_complex() or b.dim() != 1:
        got = f"shape {tuple(b.shape)}, dtype {b.dtype}" if isinstance(b, torch.Tensor) else type(b).__name__
        raise ValueError(f"{name}: expected a real 1-D tensor of integrated-time steps, got {got}")
    b = b.detach().to("cpu", torch.float64)
    if not bool((torch.isfinite(b) & (b >= 0)).all()):
        raise ValueError(f"{name}: expected finite steps >= 0, got {b.tolist()}")
    return b


def fastest_rotation(F: torch.Tensor, xi: float) -> float:
    """omega_max: the largest |eigenvalue| of the skew part S_k = F + xi E_nn of the drift F (n, n) float64 (a HOLD's
    ``F`` and ``xi``). Raises ValueError (TypeError where one is not a number or tensor) unless F is a finite real
    square matrix (n >= 1) and xi finite."""
    xi = finite("xi", xi, low=-math.inf)
    if not isinstance(F, torch.Tensor) or F.dtype == torch.bool or F.is_complex() or F.dim() != 2 \
            or F.shape[0] != F.shape[1] or not F.numel():
        got = f"shape {tuple(F.shape)}, dtype {F.dtype}" if isinstance(F, torch.Tensor) else type(F).__name__
        raise ValueError(f"F: expected a real square (n, n) tensor, n >= 1, got {got}")
    S = F.detach().to("cpu", torch.float64).clone()
    if not bool(torch.isfinite(S).all()):
        raise ValueError("F: expected finite entries")
    S[-1, -1] += xi
    return float(torch.linalg.eigvals(S).abs().max())


def _log_growth(omega: float, b: torch.Tensor, refine: float = 1.0) -> float:
    return 0.5 * refine * float(torch.log1p((b.double() * (omega / refine)) ** 2).sum())


def log_growth(omega: float, b: torch.Tensor, refine: float = 1.0) -> float:
    """log prod_i sqrt(1 + (b_i omega)^2) over the steps b (N,) float64 (CPU), each cut into ``refine`` equal ones.
    Raises ValueError (TypeError where one is not a number or tensor) unless omega is finite >= 0, b a real 1-D
    tensor of finite steps >= 0 and refine finite > 0."""
    return _log_growth(finite("omega", omega), _steps(b), finite("refine", refine, strict=True))


def stable_steps(omega: float, b: torch.Tensor, limit: float = GROWTH_LIMIT) -> int:
    """The fewest steps, refining the schedule b (N,) evenly, whose growth (:func:`log_growth`) is <= ``limit``.
    Raises ValueError (TypeError where one is not a number or tensor) unless omega is finite >= 0, b as in
    :func:`log_growth` and limit finite > 1 (growth 1 is reached only in the limit of infinitely many steps)."""
    omega, b, limit = finite("omega", omega), _steps(b), finite("limit", limit, low=1.0, strict=True)
    target, N = math.log(limit), b.numel()
    if _log_growth(omega, b) <= target:
        return N
    lo, hi = 1.0, 2.0
    while _log_growth(omega, b, hi) > target:  # decreasing in the refinement, to 0
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _log_growth(omega, b, mid) > target else (lo, mid)
    return math.ceil(hi * N)


def _caller_stacklevel() -> int:
    """``warnings.warn``'s stacklevel, for a warn in the function that calls this, of the first frame outside
    diffkern and torch's decorator wrappers (``torch.no_grad`` on :func:`diffkern.hold_sampling.sample`): the user's
    line through any entry point (``hold_sampling.sample``, ``graphs.sample_hold``, ``sampler_table``)."""
    frame, level = sys._getframe(1), 1  # the warning function's frame: stacklevel 1
    while frame is not None and (frame.f_globals.get("__name__", "").partition(".")[0] == "diffkern"
                                 or frame.f_globals.get("__name__") == "torch.utils._contextlib"):
        frame, level = frame.f_back, level + 1
    return level


def check_euler_ode(F: torch.Tensor, xi: float, b: torch.Tensor, *, stacklevel: int | None = None) -> None:
    """Warn (:class:`EulerODEStabilityWarning`, once per call) if the Euler ODE steps b (N,) float64 (CPU) of a drift
    F (n, n) with friction xi inflate its fastest rotation more than GROWTH_LIMIT-fold. Host data only: no sync.
    ``stacklevel`` None: the first caller outside diffkern (:func:`_caller_stacklevel`)."""
    omega = fastest_rotation(F, xi)
    lg = log_growth(omega, b)
    if lg <= math.log(GROWTH_LIMIT):
        return
    bmax = float(b.max())
    warnings.warn(
        f"sampler='ode' (explicit Euler) is unstable on this schedule at order n = {F.shape[-1]}: the drift's fastest "
        f"rotation (omega = {omega:.4g}) times the largest step (b = {bmax:.4g}) is {bmax * omega:.3g}, and each step "
        f"inflates that mode by sqrt(1 + (b omega)^2): {math.exp(min(lg, 700.0)):.3g}x over the {b.numel()} steps, "
        f"where the exact flow keeps its size, so the samples are inflated (diverging as this grows). About "
        f"{stable_steps(omega, b)} steps keep the growth below "
        f"{GROWTH_LIMIT:g}x; or use sampler='ode_exp' (the rotation integrated exactly: no step limit) or 'sscs'.",
        EulerODEStabilityWarning, stacklevel=_caller_stacklevel() if stacklevel is None else stacklevel)
