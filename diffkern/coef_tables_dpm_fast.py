"""DPM-Solver-fast (Lu et al. 2022: noise prediction, singlestep), k-diffusion's ``sample_dpm_fast``, as one fused row
per model call.

k-diffusion's ``DPMSolver.dpm_solver_fast`` spends n model calls on m = n//3 + 1 steps equal in t = -ln(sigma), from
sigma_max to sigma_min, of orders [3, ..., 3, 2, 1] when 3 divides n, else [3, ..., 3, n % 3] (:func:`orders`). In VE
coordinates (alpha = 1, lambda = t), with eps = (x - D)/sigma, a step from sigma to sigma_T of log length
h = ln(sigma/sigma_T) calls the model at sigma and at s_j = sigma e^{-r_j h}:

    order 1:  x' = x - (sigma - sigma_T) e0                                                        (DDIM)
    order 2:  u1 = x - (sigma - s1) e0;  x' = x - (sigma - sigma_T) e0 - (sigma - sigma_T)/(2 r1) (e1 - e0)
    order 3:  u1 = x - (sigma - s1) e0;  u2 = x - (sigma - s2) e0 - K2 (e1 - e0);
              x' = x - (sigma - sigma_T) e0 - K3 (e2 - e0)

with r1 = 1/2 at order 2, (r1, r2) = (1/3, 2/3) at order 3, K2 = s2 (r2/r1) (expm1(r2 h)/(r2 h) - 1),
K3 = (sigma_T/r2) (expm1(h)/h - 1), e_j the eps of the call at s_j (sigma_T expm1(h) = sigma - sigma_T is k-diffusion's
``sigma(t_next) * h.expm1()``).

Each call is one row over the state it sees (x, u1 or u2) and its own eps; the step's start x is eliminated through
u1 = x - (sigma - s1) e0 and u2 (no divisor: the eliminated terms keep the size they have in the update). Every row
writes its eps as history, so the second call reads H = e0, the third H = e1 and H2 = e0 (depth 2 when an order-3 step
exists, 1 for order 2).

eta > 0 is k-diffusion's ancestral variant: the grid step from sigma to sigma_next becomes the step to
sigma_T = max(sigma_down, sigma_min) ((sigma_down, sigma_up) = ancestral_step(sigma, sigma_next, eta)), its
intermediate points on that step, then s_noise*sqrt(sigma_next^2 - sigma_T^2)*xi on the step's last row (zero on the
last step, which ends at sigma_min). Noise enters only at the end of a step, so the elimination inside the next step
never needs it.
"""
from __future__ import annotations

import math
import numbers

from . import coef_tables as ct
from . import schedules
from .coef_tables_singlestep import _phi


def orders(n: int) -> list[int]:
    """k-diffusion's step orders for ``n`` model calls (an int >= 1): m = n//3 + 1 steps, [3]*(m - 2) + [2, 1] when
    3 divides n, else [3]*(m - 1) + [n % 3]. The orders sum to n."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n: expected an int >= 1 (the number of model calls), got {n!r}")
    n = int(n)
    m = n // 3 + 1
    return [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]


def check_range(sigma_min, sigma_max) -> tuple[float, float]:
    """(sigma_min, sigma_max) as floats: finite, > 0 and sigma_min < sigma_max (numbers or one-element tensors)."""
    lo = schedules._check_positive(sigma_min, "sigma_min")
    hi = schedules._check_positive(sigma_max, "sigma_max")
    if lo >= hi:
        raise ValueError(f"sigma_min: expected a value below sigma_max ({hi}), got {lo}")
    return lo, hi


def grid(sigma_min: float, sigma_max: float, m: int) -> list[float]:
    """The m + 1 sigmas of k-diffusion's grid, equal steps in t = -ln(sigma), endpoints exact."""
    t0, t1 = -math.log(sigma_max), -math.log(sigma_min)
    return [sigma_max] + [math.exp(-(t0 + (t1 - t0) * k / m)) for k in range(1, m)] + [sigma_min]


def from_sigmas(sigmas) -> tuple[float, float, int]:
    """(sigma_min, sigma_max, n) of a VE schedule (N + 1 host floats, strictly decreasing), as ComfyUI maps its
    schedule onto k-diffusion's ``sample_dpm_fast``: sigma_max = sigmas[0], sigma_min = the last non-zero sigma,
    n = N model calls (the other values are not used)."""
    n = len(sigmas) - 1
    lo = sigmas[-1] if sigmas[-1] > 0 else sigmas[-2]
    if lo >= sigmas[0]:
        raise ValueError(f"sigmas: dpm_fast runs from sigmas[0] to the last non-zero sigma, which must be smaller; "
                         f"got {list(sigmas)}")
    return lo, sigmas[0], n


def _eps_row(conv: ct.Conv, s: float, alpha: float, c: float = 0.0, c2: float = 0.0, noise: float = 0.0) -> list:
    """``out = u + alpha*eps + c*H + c2*H2 + noise*xi`` at a call at sigma s (eps = (u - D)/s), history_out = eps."""
    return ct._conv_row(conv, s, a=1.0 + alpha / s, b=-alpha / s, c=c, c2=c2, s=noise, e=1.0 / s, f=-1.0 / s)


def _ddim_row(conv: ct.Conv, s: float, r: float, h: float, noise: float = 0.0) -> list:
    """The first call of a step: DDIM from s to s e^{-r h} (``x - (s - s e^{-rh}) e0``), history_out = eps."""
    return ct._conv_row(conv, s, a=math.exp(-r * h), b=-math.expm1(-r * h), s=noise, e=1.0 / s, f=-1.0 / s)


def step_rows(conv: ct.Conv, sigma: float, target: float, order: int, noise: float = 0.0):
    """(rows, call sigmas) of one step of ``order`` (1-3) from sigma to target (0 < target < sigma), ``noise`` the
    standard deviation added on its last row. Differences of sigmas are written as products with expm1, exact to
    rounding however short the step."""
    h = math.log(sigma / target)
    if order == 1:
        return [_ddim_row(conv, sigma, 1.0, h, noise)], [sigma]
    drop = -sigma * math.expm1(-h)  # sigma - sigma_T
    if order == 2:
        r1 = 0.5
        s1 = sigma * math.exp(-r1 * h)
        k = drop / (2.0 * r1)
        # e0's coefficient: (sigma - s1) from x, -(sigma - sigma_T) + k from the update
        c = s1 * math.expm1(-(1.0 - r1) * h) + k  # sigma_T - s1 + k
        return [_ddim_row(conv, sigma, r1, h), _eps_row(conv, s1, -k, c=c, noise=noise)], [sigma, s1]
    r1, r2 = 1.0 / 3.0, 2.0 / 3.0
    s1, s2 = sigma * math.exp(-r1 * h), sigma * math.exp(-r2 * h)
    k2 = s2 * (r2 / r1) * (r2 * h) * _phi(2, r2 * h)  # expm1(x)/x - 1 = x phi_2(x)
    k3 = target / r2 * h * _phi(2, h)
    # u2 = u1 + (s2 - s1 + K2) e0 - K2 e1;  x' = u2 + (sigma_T - s2 - K2 + K3) e0 + K2 e1 - K3 e2
    second = _eps_row(conv, s1, -k2, c=s1 * math.expm1(-(r2 - r1) * h) + k2)
    third = _eps_row(conv, s2, -k3, c=k2, c2=s2 * math.expm1(-(1.0 - r2) * h) - k2 + k3, noise=noise)
    return [_ddim_row(conv, sigma, r1, h), second, third], [sigma, s1, s2]


def dpm_fast(sigma_min, sigma_max, n, *, eta: float = 0.0, s_noise: float = 1.0,
             conv: ct.Conv = ct._identity) -> ct.Plan:
    """k-diffusion's ``sample_dpm_fast`` from sigma_max to sigma_min in ``n`` model calls (module docstring), as a
    plan of n rows (row k: the k-th call, Philox counter k); ``eta`` and ``s_noise`` validated by the caller.
    Returns the plan, its row sigmas those of the calls (not monotone when eta > 0: a step to sigma_down can pass
    the next grid sigma)."""
    lo, hi = check_range(sigma_min, sigma_max)
    steps = orders(n)
    sig = grid(lo, hi, len(steps))
    rows, calls = [], []
    for k, p in enumerate(steps):
        s, sn = sig[k], sig[k + 1]
        target, noise = sn, 0.0
        if eta > 0:
            down, _ = ct.ancestral_step(s, sn, eta)
            target = max(down, lo)
            noise = s_noise * math.sqrt(max(sn * sn - target * target, 0.0))
        r, c = step_rows(conv, s, target, p, noise)
        rows += r
        calls += c
    depth = 2 if 3 in steps else 1 if 2 in steps else 0
    return ct._plan(rows, calls, calls, history=depth)
