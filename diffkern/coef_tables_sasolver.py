"""SA-Solver (Xue et al. 2023, "SA-Solver: Stochastic Adams Solver for Fast Sampling of Diffusion Models") as
coefficient rows of the fused step, in float64 on the host, with diffusers' ``SASolverScheduler`` conventions.

A step from point i to point i+1 of the schedule (each point is (alpha, sigma) of the VP state ``z = alpha*x0 +
sigma*eps``, log-SNR ``lambda = log(alpha/sigma)``, h = lambda_{i+1} - lambda_i) is

    predictor:  z_{i+1} = A_i*z_i + sum_k P_{i,k}*M_{i-k} + N_i*xi_i
    corrector:  z_i^c   = A_{i-1}*z_{i-1} + sum_k C_{i,k}*M_{i-k} + N_{i-1}*xi_{i-1}

with M the converted model outputs (x0 for "data_prediction", eps for "noise_prediction"). The corrector of step i
integrates the same interval with the same tau and the same noise as the predictor of step i-1, so it equals that
prediction plus ``sum_k (C_{i,k} - P_{i-1,k-1})*M_{i-k}``: corrector and predictor fold into one row whose
history terms reach M_{i-max(p, c-1)} (p, c the predictor and corrector orders).

Weights are integrals of the Lagrange interpolant of M over lambda against the exponential kernel: data prediction
``k*alpha_t * int_{-h}^0 e^{k u} L_j(u) du`` with k = 1 + tau^2, noise prediction ``-k*sigma_t * int_{-h}^0 e^{-u}
L_j(u) du`` (u = lambda - lambda_t; the shift keeps the moments well conditioned).
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from . import coef_tables as ct
from .ops import coefs

MAX_DEPTH = 3  # history inputs of the fused op


def _moments(h: float, k: float, m_max: int) -> list[float]:
    """J_m = int_{-h}^0 e^{k u} u^m du for m = 0..m_max (float64). A power series where |k h| is small (the
    closed form's integration by parts cancels there), else the recursion J_m = (-e^{-kh}(-h)^m - m J_{m-1})/k."""
    kh = k * h
    if abs(kh) < 0.5:
        out = []
        for m in range(m_max + 1):
            total, term = 0.0, 1.0  # term = k^n / n!
            for n in range(40):
                total += term * (-1) ** (n + m) * h ** (n + m + 1) / (n + m + 1)
                term *= k / (n + 1)
            out.append(total)
        return out
    out = [-math.expm1(-kh) / k]
    for m in range(1, m_max + 1):
        out.append((-math.exp(-kh) * (-h) ** m - m * out[-1]) / k)
    return out


def _integral_weights(nodes: list[float], h: float, k: float) -> list[float]:
    """int_{-h}^0 e^{k u} L_j(u) du for the Lagrange basis L_j of ``nodes`` (u coordinates)."""
    J = _moments(h, k, len(nodes) - 1)
    weights = []
    for j, uj in enumerate(nodes):
        others = [u for l, u in enumerate(nodes) if l != j]
        poly = np.polynomial.polynomial.polyfromroots(others) if others else np.ones(1)  # ascending powers
        denom = math.prod(uj - u for u in others)
        weights.append(float(sum(c * J[m] for m, c in enumerate(poly))) / denom)
    return weights


def _phi2_gap(h: float, k: float) -> float:
    """h^2/2 - (k h - 1 + e^{-k h})/k^2: diffusers' second-order adjustment (an O(h^3) term)."""
    return h * h / 2 - (k * h + math.expm1(-k * h)) / (k * k)


def step_weights(lam: list[float], alpha: list[float], sigma: list[float], start: int, nodes: list[int],
                 tau: float, predict_x0: bool) -> tuple[float, list[float], float]:
    """(sample factor A, weights on M at the points ``nodes``, noise coefficient N) of one SA step from point
    ``start`` to ``start + 1``; the weights are the raw Lagrange ones (no order-2 adjustment)."""
    t = start + 1
    h = lam[t] - lam[start]
    tau2 = tau * tau
    k = 1.0 + tau2
    u = [lam[j] - lam[t] for j in nodes]
    if predict_x0:
        w = [k * alpha[t] * v for v in _integral_weights(u, h, k)]
        a = math.exp(-tau2 * h) * sigma[t] / sigma[start]
        noise = sigma[t] * math.sqrt(-math.expm1(-2.0 * tau2 * h))
    else:
        w = [-k * sigma[t] * v for v in _integral_weights(u, h, -1.0)]
        a = alpha[t] / alpha[start]
        noise = tau * sigma[t] * math.sqrt(math.expm1(2.0 * h))
    return a, w, noise


def predictor(lam, alpha, sigma, i: int, order: int, tau: float, predict_x0: bool):
    """Step i's SA-Predictor of ``order`` (nodes i, i-1, ...): (A, weights on M_i, M_{i-1}, ..., N)."""
    a, w, noise = step_weights(lam, alpha, sigma, i, [i - j for j in range(order)], tau, predict_x0)
    if predict_x0 and order == 2:
        k = 1.0 + tau * tau
        h = lam[i + 1] - lam[i]
        d = k * alpha[i + 1] * _phi2_gap(h, k) / (lam[i] - lam[i - 1])
        w[0] += d
        w[1] -= d
    return a, w, noise


def corrector(lam, alpha, sigma, i: int, order: int, tau: float, predict_x0: bool) -> list[float]:
    """Step i's SA-Corrector of ``order`` over (i-1, i) with step i-1's tau (nodes i, i-1, ...): weights on M_i,
    M_{i-1}, ... (A and N are the predictor's of step i-1)."""
    _, w, _ = step_weights(lam, alpha, sigma, i - 1, [i - j for j in range(order)], tau, predict_x0)
    if predict_x0 and order == 2:
        k = 1.0 + tau * tau
        h = lam[i] - lam[i - 1]
        d = k * alpha[i] * _phi2_gap(h, k) / h
        w[0] += d
        w[1] -= d
    return w


def orders(n: int, predictor_order: int, corrector_order: int, lower_order_final: bool, begin: int = 0):
    """Per step i of a loop over ``n`` timesteps starting at ``begin``: (predictor order, order of the corrector
    run at step i, None on the loop's first step), with diffusers' warm-up and ``lower_order_final``."""
    out, corr_next = [], None
    cap = max(predictor_order, corrector_order - 1)
    for i in range(begin, n):
        done = min(i - begin, cap)  # diffusers' lower_order_nums before this step
        p = min(predictor_order, n - i) if lower_order_final else predictor_order
        c = min(corrector_order, n - i + 1) if lower_order_final else corrector_order
        out.append((min(p, done + 1), corr_next))
        corr_next = min(c, done + 2)
    return out


def rows(alpha: list[float], sigma: list[float], taus: list[float], step_orders, predict_x0: bool, begin: int = 0):
    """Folded rows of steps begin..n-1 over points 0..n: per step (A, [weights on M_i, M_{i-1}, M_{i-2}, M_{i-3}],
    N). ``taus[i]`` is step i's tau; ``step_orders`` from :func:`orders`."""
    lam = [math.log(a) - math.log(s) for a, s in zip(alpha, sigma)]
    out, prev_w = [], None
    for i, (p, c) in zip(range(begin, begin + len(step_orders)), step_orders):
        a, pw, noise = predictor(lam, alpha, sigma, i, p, taus[i], predict_x0)
        m = pw + [0.0] * (MAX_DEPTH + 2 - len(pw))  # one slot past the op's depth, to catch deeper rows
        if c is not None:
            cw = corrector(lam, alpha, sigma, i, c, taus[i - 1], predict_x0)
            for j, v in enumerate(cw):
                m[j] += a * v
            for j, v in enumerate(prev_w):  # the previous prediction, on M_{i-1-j}
                m[j + 1] -= a * v
        if m[MAX_DEPTH + 1]:
            raise ValueError(f"rows: step {i} reads M_{{i-{MAX_DEPTH + 1}}}, deeper than the fused op's "
                             f"{MAX_DEPTH} history inputs")
        out.append((a, m[:MAX_DEPTH + 1], noise))
        prev_w = pw
    return out


def plan(sigmas, conv=None, *, predictor_order: int = 3, corrector_order: int = 4, tau=1.0,
         predict_x0: bool = True, lower_order_final: bool = True):
    """SA-Solver on N+1 decreasing VE ``sigmas`` as a :class:`~diffkern.coef_tables.Plan` (one fused row per step,
    the corrector folded into the next step's row; history = D, or eps = (x - D)/sigma with ``predict_x0=False``).

    The VP rows of :func:`rows` on the points alpha = 1/sqrt(1 + sigma^2), alpha*sigma are rewritten for the VE state
    x = z/alpha (the weights are integrals in lambda = -ln sigma, so the rows are those of any parametrisation with
    these log-SNRs: flow matching's too). ``tau``: a number, or one per step (diffusers' ``tau_func`` at each
    timestep). A step to sigma 0 is the jump x' = D (the correction it would fold in moves a state it discards)."""
    conv = conv or ct._identity
    n = len(sigmas) - 1
    values = [tau] * n if isinstance(tau, numbers.Real) else list(tau)
    if len(values) != n or any(isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0
                               for t in values):
        raise ValueError(f"tau: expected a finite number >= 0 or one per step ({n}), got {tau!r}")
    taus = [float(t) for t in values]
    steps = n - 1 if sigmas[-1] == 0 else n  # the jump to 0 is no SA step
    alpha = [1.0 / math.sqrt(s * s + 1.0) for s in sigmas[:steps + 1]]
    sigma_vp = [s * a for s, a in zip(sigmas, alpha)]
    step_orders = orders(steps, predictor_order, corrector_order, lower_order_final)
    out = []
    for i, (a, m, noise) in enumerate(rows(alpha, sigma_vp, taus, step_orders, predict_x0)):
        s, scale = sigmas[i], 1.0 / alpha[i + 1]  # z' = alpha' x'
        hist = {"c": m[1] * scale, "c2": m[2] * scale, "c3": m[3] * scale, "s": noise * scale}
        a_ve = a * alpha[i] * scale
        if predict_x0:
            out.append(ct._conv_row(conv, s, a=a_ve, b=m[0] * scale, f=1.0, **hist))
        else:  # M = eps = (x - D)/sigma
            k = m[0] * scale / s
            out.append(ct._conv_row(conv, s, a=a_ve + k, b=-k, e=1.0 / s, f=-1.0 / s, **hist))
    if steps < n:
        jump = {"f": 1.0} if predict_x0 else {"e": 1.0 / sigmas[-2], "f": -1.0 / sigmas[-2]}
        out.append(ct._conv_row(conv, sigmas[-2], a=0.0, b=1.0, **jump))
    depth = max((k for k, slot in enumerate((coefs.C, coefs.C2, coefs.C3), start=1) if any(r[slot] for r in out)),
                default=0)
    return ct._plan(out, sigmas[:-1], sigmas[:-1], history=depth)
