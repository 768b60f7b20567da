"""DEIS (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator"): diffusers'
``DEISMultistepScheduler`` (``algorithm_type="deis"``, ``solver_type="logrho"``, orders 1-3) as one fused row per
model call (history depth 0-2).

Notation (VE coordinates, state x = z/alpha, rho = sigma = diffusers' sigma_t/alpha_t): the probability-flow ODE is
dx/drho = eps(x, rho), eps = (x - D)/rho. DEIS ("logrho") integrates it exactly over the polynomial that interpolates
the last q noise estimates in log rho. Step k goes from s = sigma_k to t = sigma_{k+1} with eps_k and, at order q,
eps_{k-1} (at sigma_{k-1}) and eps_{k-2} (at sigma_{k-2}). With u = ln(rho/s), nodes u_j = ln(sigma_{k-j}/s)
(u_0 = 0) and the Lagrange basis L_j(u) over u_0..u_{q-1},

    x' = x + sum_j w_j eps_{k-j},   w_j = int_s^t L_j(ln(rho/s)) drho = s int_0^y L_j(u) e^u du,   y = ln(t/s) = -h.

These w_j are diffusers' ``coef1..coef3`` (its ``ind_fn(rho_t) - ind_fn(rho_s0)``: the antiderivative in rho of the
same basis), and its VP update ``alpha_t (z/alpha_s0 + sum coef m)`` divided by alpha_t is x'. Writing
L_j(u) = sum_d l_jd u^d, w_j = s sum_d l_jd I_d(y) with the moments I_d(y) = int_0^y u^d e^u du (:func:`moments`).
diffusers subtracts two antiderivative values of size ~ s (ln s)^2/h^2 to get a coefficient of size ~ s h, losing
~3 log10(1/h) digits; the moments are accurate to rounding for every h (series below |y| = 1).

The fused row: eps_k = (x - D_k)/s from the step's denoised estimate, H = eps_{k-1}, H2 = eps_{k-2}, and every row
writes its eps (history_out = x/s - D/s). Since L_0(0) = 1, w_0/s = I_0 + delta with I_0 = e^y - 1, so

    a = t/s + delta,   b = -(e^y - 1) - delta,   c = w_1,   c2 = w_2,   delta = sum_{d>=1} l_0d I_d(y)

(order 1: delta = 0, Euler/DDIM ``x' = (t/s) x + (1 - t/s) D``). A step of h = 0 is the identity (every I_d(0) = 0:
diffusers' last Karras step, sigma_min to itself). A step to t = 0 is the jump x' = D, the first-order step's limit:
diffusers' DEIS never steps to 0 (its schedules end at the training table's sigma_min), and the order-q weights there
(finite: I_d(-inf) = -(-1)^d d!) would extrapolate the log-rho polynomial over an infinite range.
"""
from __future__ import annotations

import math
import numbers

from . import coef_tables as ct
from . import coef_tables_3m

ORDERS = (1, 2, 3)


def deis_orders(n: int, *, order: int = 3, lower_order_final: bool = True, begin: int = 0) -> list[int]:
    """The order of each of ``n`` steps as diffusers' ``DEISMultistepScheduler.step`` picks it: DPM-Solver's rule
    (:func:`~diffkern.coef_tables_3m.dpmsolver_orders` without ``euler_at_final``): first order on the loop's first
    step (``begin``), at most second on its second; with ``lower_order_final`` below 15 steps, first order on the
    last step and at most second on the one before."""
    return coef_tables_3m.dpmsolver_orders(n, solver_order=order, lower_order_final=lower_order_final, begin=begin)


def moments(y: float, count: int = 3) -> list[float]:
    """[I_0(y), ..., I_{count-1}(y)], I_d(y) = int_0^y u^d e^u du, for a finite y (y = ln(t/s) <= 0 on a step down).

    Below |y| = 1 the series I_d = sum_{n>=0} y^(n+d+1)/(n! (n+d+1)) (the recursion cancels ~(d+1) log10(1/|y|)
    digits there; 30 terms: |y|^31/30! < 1e-32); above it the recursion I_0 = expm1(y), I_d = y^d e^y - d I_{d-1},
    which loses under one digit for |y| >= 1."""
    if abs(y) < 1.0:
        out = []
        for d in range(count):
            total, term = 0.0, y ** (d + 1)  # y^(n+d+1)/n! at n = 0
            for n in range(30):
                total += term / (n + d + 1)
                term *= y / (n + 1)
            out.append(total)
        return out
    out, ey = [math.expm1(y)], math.exp(y)
    for d in range(1, count):
        out.append(y ** d * ey - d * out[-1])
    return out


def _lagrange(nodes: list[float]) -> list[list[float]]:
    """Power-basis coefficients [l_j0, l_j1, ...] of each Lagrange basis polynomial L_j over ``nodes``."""
    basis = []
    for j, uj in enumerate(nodes):
        poly = [1.0]
        for m, um in enumerate(nodes):
            if m == j:
                continue
            scale = 1.0 / (uj - um)  # poly *= (u - um)/(uj - um)
            new = [0.0] * (len(poly) + 1)
            for d, c in enumerate(poly):
                new[d + 1] += c * scale
                new[d] -= c * um * scale
            poly = new
        basis.append(poly)
    return basis


def weights(sigmas, k: int, order: int) -> tuple[float, list[float]]:
    """(delta, [w_1, ..., w_{order-1}]) of step k (module docstring) on ``sigmas``, t = sigmas[k+1] > 0: the basis
    terms of degree >= 1 of w_0/s (L_0's constant term is exactly 1: nodes u_0 = 0), and the weights of the earlier
    estimates (their basis polynomials vanish at u_0 = 0: no constant term)."""
    s, t = sigmas[k], sigmas[k + 1]
    nodes = [math.log(sigmas[k - j] / s) for j in range(order)]
    if len(set(nodes)) < order:  # a basis polynomial over two equal nodes divides by 0 (diffusers: inf/NaN)
        raise ValueError(f"sigmas: a step of order {order} needs distinct sigmas at its nodes, got "
                         f"{[sigmas[k - j] for j in range(order)]} (a step of length 0 before step {k})")
    mom = moments(math.log(t / s), order)
    basis = _lagrange(nodes)
    delta = math.fsum(c * i for c, i in zip(basis[0][1:], mom[1:]))
    return delta, [s * math.fsum(c * i for c, i in zip(poly, mom)) for poly in basis[1:]]


def deis(sigmas, orders, *, conv: ct.Conv = ct._identity) -> ct.Plan:
    """diffusers' DEIS loop (module docstring) in VE coordinates, step i of order ``orders[i]`` (1, 2 or 3).
    History depth: the largest order minus 1 (H = eps_{i-1}, H2 = eps_{i-2}; every row writes its eps when there is
    one). ``sigmas``: N+1 values, decreasing, a last 0 allowed (the jump to D) and steps of length 0 allowed where
    no later step of order >= 2 interpolates across them."""
    n = len(sigmas) - 1
    if len(orders) != n:
        raise ValueError(f"orders: expected one per step ({n}), got {len(orders)}")
    if any(q not in ORDERS for q in orders):
        raise ValueError(f"orders: expected 1, 2 or 3 per step, got {orders}")
    depth = max(orders, default=1) - 1
    rows = []
    for k in range(n):
        s, t = sigmas[k], sigmas[k + 1]
        hist = {"e": 1.0 / s, "f": -1.0 / s} if depth else {}
        if t == 0:
            rows.append(ct._conv_row(conv, s, a=0.0, b=1.0, **hist))
            continue
        delta, earlier = weights(sigmas, k, orders[k])
        row = {"a": t / s + delta, "b": -math.expm1(math.log(t / s)) - delta}
        row.update(zip(("c", "c2"), earlier))
        rows.append(ct._conv_row(conv, s, **row, **hist))
    return ct._plan(rows, sigmas[:-1], sigmas[:-1], history=depth)


def plan(sigmas, conv: ct.Conv = ct._identity, *, order=3, lower_order_final=True) -> ct.Plan:
    """The ``deis`` sampler's plan on a VE schedule (knobs validated): diffusers' orders for a loop over all of
    ``sigmas`` (:func:`deis_orders`), then :func:`deis`."""
    if isinstance(order, bool) or not isinstance(order, numbers.Integral) or order not in ORDERS:
        raise ValueError(f"order: expected 1, 2 or 3, got {order!r}")
    if not isinstance(lower_order_final, bool):
        raise TypeError(f"lower_order_final: expected a bool, got {lower_order_final!r}")
    orders = deis_orders(len(sigmas) - 1, order=order, lower_order_final=lower_order_final)
    return deis(sigmas, orders, conv=conv)
