"""DPM-Solver-12 and DPM-Solver-23 with adaptive steps (Lu et al. 2022, k-diffusion's ``sample_dpm_adaptive``): the
rows of one attempted step and the PID step-size controller, all on the host in float64.

k-diffusion's ``DPMSolver.dpm_solver_adaptive`` works in t = -ln(sigma). An attempt from sigma to sigma_T (log length
h = ln(sigma/sigma_T)) runs an embedded pair on shared model calls, in noise prediction eps = (x - D)/sigma:

    order 2:  x_low = DPM-Solver-1 (DDIM) and x_high = DPM-Solver-2 (r1 = 1/2): calls at sigma and s1 = sigma e^{-h/2}
    order 3:  x_low = DPM-Solver-2 with r1 = 1/3 and x_high = DPM-Solver-3 (r1, r2 = 1/3, 2/3): calls at sigma,
              s1 = sigma e^{-h/3} and s2 = sigma e^{-2h/3} (the second-order solution reuses the first two calls)

(formulas in :mod:`diffkern.coef_tables_dpm_fast`). The error estimate compares x_low with x_high; accepted, the state
becomes x_high (plus, for eta > 0, k-diffusion's ancestral noise). Each launch of the fused op is a row over the
state the call sees (x, u1 or u2) and its own eps; the row writing x_low is a second launch on a call's model output.
"""
from __future__ import annotations

import math
import numbers

from . import coef_tables as ct
from .coef_tables_dpm_fast import _ddim_row, _eps_row, step_rows
from .ops import coefs

ORDERS = (2, 3)
ACCEPT_MAX = 1.0 + math.pi / 2.0
"""The limited step factor ``1 + atan(f - 1)`` stays below this, so an ``accept_safety`` at or above it accepts no
attempt."""


def attempt(conv: ct.Conv, sigma: float, target: float, order: int) -> tuple[list, list, list]:
    """(rows, call sigmas, launches) of one attempt of ``order`` (2 or 3) from sigma to target (0 < target < sigma).

    ``launches``: per model call, the rows launched on its output as ``(row, state, out, history, history2,
    history_out)`` with buffer names: states "x", "u1", "u2"; outputs "u1", "u2", "low", "high"; histories "e0", "e1"
    (the eps of the first and second call). The rows of x_high are :func:`coef_tables_dpm_fast.step_rows`'."""
    high, calls = step_rows(conv, sigma, target, order)
    h = math.log(sigma / target)
    drop = -sigma * math.expm1(-h)  # sigma - sigma_T
    if order == 2:
        low = _ddim_row(conv, sigma, 1.0, h)  # DDIM over the whole step, on the first call's output
        rows = [high[0], low, high[1]]
        launches = [[(0, "x", "u1", None, None, "e0"), (1, "x", "low", None, None, None)],
                    [(2, "u1", "high", "e0", None, None)]]
        return rows, calls, launches
    r1 = 1.0 / 3.0
    s1 = calls[1]
    k = drop / (2.0 * r1)
    # x_low = x - drop e0 - k (e1 - e0) with x = u1 + (sigma - s1) e0: e0's coefficient is sigma_T - s1 + k
    low = _eps_row(conv, s1, -k, c=s1 * math.expm1(-(1.0 - r1) * h) + k)
    rows = [high[0], high[1], low, high[2]]
    launches = [[(0, "x", "u1", None, None, "e0")],
                [(1, "u1", "u2", "e0", None, "e1"), (2, "u1", "low", "e0", None, None)],
                [(3, "u2", "high", "e1", "e0", None)]]
    return rows, calls, launches


def noise_row(std: float) -> list:
    """``x' = x + std*xi`` (the model output is not read)."""
    return coefs.row(a=1.0, s=std, **ct._NO_MODEL)


def target(s: float, t: float, t_end: float, eta: float) -> tuple[float, float]:
    """(t_, su) of k-diffusion's attempt from t-time s to t: t_ = t, su = 0 for eta = 0; else t_ = min(t_end,
    -ln sigma_down) and su = sqrt(sigma(t)^2 - sigma(t_)^2), (sigma_down, sigma_up) = ancestral_step(sigma(s),
    sigma(t), eta)."""
    if not eta:
        return t, 0.0
    down, _ = ct.ancestral_step(math.exp(-s), math.exp(-t), eta)
    t_ = t_end if down == 0 else min(t_end, -math.log(down))
    return t_, math.sqrt(max(math.exp(-2.0 * t) - math.exp(-2.0 * t_), 0.0))


class PID:
    """k-diffusion's ``PIDStepSizeController``: proposes the next step length h (in t) from the scaled error of the
    last attempt and says whether to accept it (the factor, after the limiter 1 + atan(f - 1), at least
    ``accept_safety``). ``order``: the error's order (1.5 for eta > 0, else the solver's)."""

    def __init__(self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float, accept_safety: float,
                 eps: float = 1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2.0 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.errs: list[float] = []
        self.factor = math.nan  # the last limited factor (what :class:`StallWatch` follows)

    def propose(self, error: float) -> bool:
        """Scale h by the limited factor; True when the attempt is accepted."""
        inv = 1.0 / (error + self.eps)
        if not self.errs:
            self.errs = [inv, inv, inv]
        self.errs[0] = inv
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = self.factor = 1.0 + math.atan(factor - 1.0)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


STALL_LIMIT = 50
"""Rejected attempts in a row without progress (:class:`StallWatch`) after which dpm_adaptive raises. Measured on
a float64 sweep (3 analytic denoisers, 4 tolerances, orders 2 and 3, eta 0.7, PID gains, h_init, accept_safety 1.001
to 2.0; 336 runs): the runs that end had at most 19 rejections in a row, save one with 94 (eta > 0: an oscillation of
h about the fixed point that grows until its low point is accepted). Counted by this rule, on the same sweep with
8 noise seeds for eta > 0 (its last rows cut by a time limit): no rejection without progress in any run that
ended; a stall reaches the limit ~50 attempts after it sets in (tests/test_parity17c.py)."""


class StallWatch:
    """Detects the stall of k-diffusion's controller with ``accept_safety`` > 1. While attempts are rejected the
    controller's history is frozen and x and sigma stay put, so h follows a fixed map; the PID factor steers the
    error towards 1, where the factor is ~1 < accept_safety: h settles on a fixed point or cycle (or, at the clipped
    last step, grows without end) and no attempt is ever accepted. A rejection makes progress when its factor beats
    every factor of the rejections in a row before it (nearer accept_safety) or h falls below every earlier h of
    them (towards the step-length guard); :data:`STALL_LIMIT` rejections in a row without progress are a stall.
    Inactive for accept_safety <= 1: there a rejected factor is < 1, so every rejection shortens h."""

    def __init__(self, accept_safety: float, limit: int = STALL_LIMIT):
        self.active = accept_safety > 1.0
        self.limit = limit
        self.accepted()

    def accepted(self) -> None:
        """An accepted attempt ends the run of rejections."""
        self.best, self.shortest, self.idle = -math.inf, math.inf, 0

    def rejected(self, h_tried: float, h_next: float, factor: float) -> bool:
        """Record a rejected attempt of length ``h_tried`` whose factor proposed ``h_next``; True on a stall."""
        if not self.active:
            return False
        shortest = min(self.shortest, abs(h_tried))
        progress = factor > self.best or abs(h_next) < shortest
        self.best, self.shortest = max(self.best, factor), min(shortest, abs(h_next))
        self.idle = 0 if progress else self.idle + 1
        return self.idle >= self.limit


def _number(value, name: str, *, nonnegative: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numbers.Real: numpy scalars too
        hint = " (a tensor: pass .item())" if hasattr(value, "item") and not isinstance(value, numbers.Real) else ""
        raise TypeError(f"{name}: expected a number{hint}, got {value!r}")
    if not math.isfinite(value) or (nonnegative and value < 0):
        raise ValueError(f"{name}: expected a finite number{' >= 0' if nonnegative else ''}, got {value!r}")
    return float(value)


def check_knobs(order, rtol, atol, h_init, pcoeff, icoeff, dcoeff, accept_safety) -> dict:
    """The controller's knobs validated (errors name the knob): ``order`` 2 or 3; rtol, atol >= 0, not both 0 (the
    error divides by max(atol, rtol*|x|)); h_init finite and non-zero (k-diffusion takes its absolute value); the PID
    coefficients finite; accept_safety finite and below :data:`ACCEPT_MAX`."""
    if isinstance(order, bool) or not isinstance(order, numbers.Integral) or order not in ORDERS:
        raise ValueError(f"order: expected 2 or 3, got {order!r}")
    out = {"order": int(order), "rtol": _number(rtol, "rtol", nonnegative=True),
           "atol": _number(atol, "atol", nonnegative=True), "h_init": abs(_number(h_init, "h_init"))}
    if out["rtol"] == 0 and out["atol"] == 0:
        raise ValueError("atol: rtol and atol are both 0; the error is scaled by max(atol, rtol*|x|), so one must be "
                         "> 0")
    if out["h_init"] == 0:
        raise ValueError("h_init: expected a non-zero first step length in t = -ln(sigma), got 0")
    for name, value in (("pcoeff", pcoeff), ("icoeff", icoeff), ("dcoeff", dcoeff),
                        ("accept_safety", accept_safety)):
        out[name] = _number(value, name)
    if out["accept_safety"] >= ACCEPT_MAX:
        raise ValueError(f"accept_safety: expected a value below {ACCEPT_MAX} (1 + pi/2, the supremum of the limited "
                         f"step factor 1 + atan(f - 1): no attempt could be accepted and the loop would never end), "
                         f"got {out['accept_safety']!r}")
    return out
