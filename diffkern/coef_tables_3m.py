"""Third-order multistep rows: DPM-Solver++(3M) SDE, k-diffusion's ``sample_dpmpp_3m_sde``, as a depth-2 plan; and
diffusers' ``DPMSolverMultistepScheduler`` update with its order rules (:func:`dpmsolver_multistep`, at the end).

In t = -ln(sigma), step i goes from sigma to sigma_next with h = ln(sigma/sigma_next), h_eta = (1 + eta) h and

    phi_1 = 1 - e^-h_eta,   phi_2 = 1 - phi_1/h_eta,   phi_3 = phi_2/h_eta - 1/2
    x' = e^-h_eta x + phi_1 D + [phi_2 d1 - phi_3 d2] + s_noise sigma_next sqrt(1 - e^(-2 eta h)) xi

with D, D_1, D_2 the denoised estimates of this step and the two before, h_1, h_2 their steps, r0 = h_1/h,
r1 = h_2/h and the divided differences

    d1_0 = (D - D_1)/r0,   d1_1 = (D_1 - D_2)/r1,
    d1 = d1_0 + (d1_0 - d1_1) r0/(r0 + r1),   d2 = (d1_0 - d1_1)/(r0 + r1)

(the bracket is ``phi_2 (D - D_1)/r0`` on the second step, absent on the first). Written as one row of the fused
step, the bracket is linear in D, H = D_1 and H2 = D_2: b = phi_1 + c_D, c = c_1, c2 = c_2 below, history_out = D.
The step to sigma_next = 0 is the jump x' = D. eta = 0 is the deterministic DPM-Solver++(3M).

Order: d1 estimates h D' and d2 estimates h^2 D''/2 (D as a function of t), while -phi_3 is the weight of h^2 D''
in the exact integral; so the bracket (k-diffusion's, as DPM-Solver's and diffusers' multistep third-order update)
carries half the D'' term: exact for D linear in t, not for quadratic D, i.e. second order in h, with a smaller
error constant than 2M (tests/test_history2.py measures both). The rows here are k-diffusion's, not a corrected
third-order variant.
"""
from __future__ import annotations

import math

from . import coef_tables as ct


def phis(x: float) -> tuple[float, float, float]:
    """(phi_1, phi_2, phi_3)(x) = (1 - e^-x, 1 - phi_1/x, phi_2/x - 1/2) for x > 0.

    Below x = 1/2 the last two come from their Taylor series (phi_2 = sum_{n>=2} (-x)^n/(n! x),
    phi_3 = sum_{n>=3} (-x)^n/(n! x^2)): the closed forms lose about -log10(x) and -2 log10(x) digits to
    cancellation there (k-diffusion evaluates them in closed form; at x = 1/2 both are within ~1e-15 relative).
    """
    phi_1 = -math.expm1(-x)
    if x >= 0.5:
        phi_2 = 1.0 - phi_1 / x
        return phi_1, phi_2, phi_2 / x - 0.5
    phi_2 = phi_3 = 0.0
    term = x / 2.0  # (-x)^n/(n! x) at n = 2
    for n in range(2, 30):  # x^28/29! < 1e-38: the series has converged to double precision
        phi_2 += term
        if n >= 3:
            phi_3 += term / x
        term *= -x / (n + 1)
    return phi_1, phi_2, phi_3


def _multistep(h: float, h_1, h_2, phi_2: float, phi_3: float) -> dict:
    """Coefficients of D (added to b), D_1 (c) and D_2 (c2) of the bracket; h_1/h_2 None or 0: not usable."""
    if not h_1:
        return {}
    r0 = h_1 / h
    if not h_2:  # second order: phi_2 (D - D_1)/r0
        return {"b": phi_2 / r0, "c": -phi_2 / r0}
    r1 = h_2 / h
    k, m = r0 / (r0 + r1), 1.0 / (r0 + r1)  # d1 = (1 + k) d1_0 - k d1_1, d2 = m (d1_0 - d1_1)
    return {"b": (phi_2 * (1.0 + k) - phi_3 * m) / r0,
            "c": -phi_2 * ((1.0 + k) / r0 + k / r1) + phi_3 * m * (1.0 / r0 + 1.0 / r1),
            "c2": (phi_2 * k - phi_3 * m) / r1}


def dpmpp_3m_sde(sigmas, *, eta=1.0, s_noise=1.0, conv: ct.Conv = ct._identity) -> ct.Plan:
    """k-diffusion's ``sample_dpmpp_3m_sde`` (module docstring): one row per step, history depth 2 (H = the previous
    D, H2 = the one before; every row writes its D). The first step is first order, the second second order, as
    k-diffusion's; a step whose h is 0 (sigma_next == sigma) is the identity and, as its h, cannot weight a later
    step's differences: those steps drop to the order the remaining history allows."""
    rows = []
    h, h_1, h_2 = None, None, None  # as k-diffusion's: h keeps its value over the jump to 0
    for s, sn in zip(sigmas[:-1], sigmas[1:]):
        if sn == 0:
            rows.append(ct._conv_row(conv, s, a=0.0, b=1.0, f=1.0))
        else:
            h = math.log(s / sn)
            if h == 0:
                rows.append(ct._conv_row(conv, s, a=1.0, f=1.0))
            else:
                h_eta = (1.0 + eta) * h
                phi_1, phi_2, phi_3 = phis(h_eta)
                row = {"a": math.exp(-h_eta), "b": phi_1, "f": 1.0,
                       "s": s_noise * sn * math.sqrt(max(-math.expm1(-2.0 * eta * h), 0.0))}
                extra = _multistep(h, h_1, h_2, phi_2, phi_3)
                row.update(extra, b=phi_1 + extra.get("b", 0.0))
                rows.append(ct._conv_row(conv, s, **row))
        h_1, h_2 = h, h_1
    return ct._plan(rows, sigmas[:-1], sigmas[:-1], history=2)

#----------------------------------------------------------------------------
# diffusers' DPMSolverMultistepScheduler (DPM-Solver++, orders 1-3, ODE and SDE), as a depth-2 plan.


def dpmsolver_orders(n: int, *, solver_order: int = 3, lower_order_final: bool = True,
                     euler_at_final: bool = False, begin: int = 0) -> list[int]:
    """The order of each of the ``n`` steps as diffusers' ``DPMSolverMultistepScheduler.step`` picks it: first
    order on the loop's first step (``begin``) and, with ``euler_at_final`` or ``lower_order_final`` below 15
    steps, on the last; at most second order on the loop's second step and (``lower_order_final``, below 15
    steps) on the last but one. Steps before ``begin`` are ordered as if the loop started at 0 (never run). A
    step to sigma = 0 is first order too in diffusers (``final_sigmas_type="zero"``): the rows make it the jump."""
    low = lower_order_final and n < 15
    orders = []
    for i in range(n):
        k = i - begin if i >= begin else i  # steps this loop has taken before step i
        if solver_order == 1 or k < 1 or (i == n - 1 and (euler_at_final or low)):
            orders.append(1)
        elif solver_order == 2 or k < 2 or (i == n - 2 and low):
            orders.append(2)
        else:
            orders.append(3)
    return orders


def dpmsolver_multistep(sigmas, orders, *, sde: bool = False, solver_type: str = "midpoint",
                        conv: ct.Conv = ct._identity) -> ct.Plan:
    """diffusers' DPM-Solver++ multistep update (``algorithm_type`` "dpmsolver++", or "sde-dpmsolver++" with
    ``sde``) in VE coordinates, step i of order ``orders[i]``; history depth 2 (H = D_1, H2 = D_2; every row writes
    its D). With h = ln(sigma/sigma_next) (diffusers' lambda_t - lambda_s0: lambda = -ln(sigma) in VE) and
    h_eta = h (ODE) or 2h (SDE), diffusers' VP update divided by alpha_t (the VE state x = z/alpha) reads

        x' = e^-h_eta x + phi_1 D0 + k1 D1 + k2 D2 + [SDE: sigma_next sqrt(1 - e^-2h) xi]

    with phi_k = :func:`phis` (h_eta) and diffusers' D0 = D, D1, D2 (its ``D1_0``, ``D1_1``, ``r0``, ``r1`` are
    :func:`_multistep`'s d1_0, d1_1, r0, r1). Order 1: no D1, D2 (``dpm_solver_first_order_update``). Order 2
    (``multistep_dpm_solver_second_order_update``, D1 = (D - D_1)/r0): k1 = phi_1/2 ("midpoint": diffusers'
    ``-0.5 alpha_t (e^-h - 1)``, SDE ``0.5 alpha_t (1 - e^-2h)``) or phi_2 ("heun": ``(e^-h - 1)/h + 1``, SDE
    ``(1 - e^-2h)/(-2h) + 1``). Order 3 (``multistep_dpm_solver_third_order_update``, any solver_type):
    k1 = phi_2, and k2 = -phi_3 for the ODE (diffusers' ``-((e^-h - 1 + h)/h^2 - 1/2)``) but -phi_3 - 1 for the SDE
    (diffusers' ``(1 - e^-2h - 2h)/(2h)^2 - 1/2``, where k-diffusion's 3M SDE has ``+ 1/2``): diffusers' rows,
    kept as they are. A step to sigma_next = 0 is the jump x' = D; a step of h = 0 the identity (diffusers: the
    same at orders 1-2, 0/0 at order 3)."""
    if len(orders) != len(sigmas) - 1:
        raise ValueError(f"orders: expected one per step ({len(sigmas) - 1}), got {len(orders)}")
    rows = []
    for i, (s, sn) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        if sn == 0:
            rows.append(ct._conv_row(conv, s, a=0.0, b=1.0, f=1.0))
            continue
        h = math.log(s / sn)
        if h == 0:
            rows.append(ct._conv_row(conv, s, a=1.0, f=1.0))
            continue
        h_eta = 2.0 * h if sde else h
        phi_1, phi_2, phi_3 = phis(h_eta)
        row = {"a": math.exp(-h_eta), "b": phi_1, "f": 1.0}
        if sde:
            row["s"] = sn * math.sqrt(-math.expm1(-2.0 * h))
        order = orders[i]
        h_1 = math.log(sigmas[i - 1] / s) if order >= 2 else None
        h_2 = math.log(sigmas[i - 2] / sigmas[i - 1]) if order >= 3 else None
        if order == 2:
            extra = _multistep(h, h_1, None, 0.5 * phi_1 if solver_type == "midpoint" else phi_2, 0.0)
        else:  # _multistep weights d2 by -phi_3: pass diffusers' -k2
            extra = _multistep(h, h_1, h_2, phi_2, phi_3 + 1.0 if sde else phi_3)
        row.update(extra, b=phi_1 + extra.get("b", 0.0))
        rows.append(ct._conv_row(conv, s, **row))
    return ct._plan(rows, sigmas[:-1], sigmas[:-1], history=2)
