"""Singlestep DPM-Solver / DPM-Solver++ (Lu et al. 2022), diffusers' ``DPMSolverSinglestepScheduler``, orders 1-3, as
one fused row per model call.

diffusers cuts the schedule into groups (:func:`order_list`: [1, 2, 3], [1, 2], [1], ...). Inside a group starting at
step g, step k = g + p - 1 (order p) updates from the group's start sample x_g with the model values of the group so
far, M_g .. M_k (the denoised estimate for "dpmsolver++"/"sde-dpmsolver++", eps for "dpmsolver"). In VE coordinates
(state x = z/alpha, lambda = -ln sigma, h = lambda_{k+1} - lambda_g) every step is

    x_{k+1} = A x_g + sum_i B_i M_{g+i} (+ S xi)                                       (:func:`update`)

with diffusers' coefficients: A = e^-h, e^-2h (SDE) or 1 ("dpmsolver"); its D0, D1 (and D1_0, D1_1, D2 at order 3)
expanded over the M's; the phi-type factors evaluated without cancellation (:func:`_phi`).

Two ways to make that one fused row (:mod:`diffkern.ops.coefs`):

- :func:`scheduler_rows` (the diffusers drop-in): the group's start is kept. The order-1 row writes x_g as its
  history output (e = 1) and the raw model output R_g as its x0 output (the conversion folded into the row: D is the
  raw output); later rows read H = x_g, H2 = R_g (M_g = p_g x_g + q_g R_g) and, at order 3 "heun", H3 = M_{g+1}
  (written by the order-2 row; diffusers' "midpoint" order 3 does not use M_{g+1}). Nothing is divided, the SDE's
  noise needs no bookkeeping, and a pipeline that edits the sample between the calls of a group (inpainting) gets
  diffusers' result, which reads the sample only for the conversion.
- :func:`singlestep` (the sampler, ODE only): x_g is eliminated. Step k > g reads x_k = A' x_g + sum_i B'_i M_{g+i}
  (the previous row's output), so x_g = (x_k - sum_i B'_i M_{g+i})/A' and the row is linear in (x_k, M_k, M_{k-1},
  M_{k-2}) over the usual rotating history. The divisor is harmless: A/A' = sigma_{k+1}/sigma_k <= 1
  ("dpmsolver++") or 1 ("dpmsolver"), so x_k's rounding enters at most once, as in any one-step update. With noise
  the elimination would need the previous step's xi, hence no SDE there.
"""
from __future__ import annotations

import math
import numbers

from . import coef_tables as ct
from .ops import coefs

ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++")
SOLVER_TYPES = ("midpoint", "heun")


def order_list(n: int, order: int, lower_order_final: bool, final_zero: bool) -> list[int]:
    """diffusers' ``get_order_list``: the order of each of ``n`` steps, groups [1, 2, 3] (order 3) or [1, 2] (order 2)
    with, under ``lower_order_final``, a shorter last group; ``final_zero`` (a last step to sigma 0) makes the last
    step first order. Without ``lower_order_final`` n must be a multiple of ``order`` (diffusers' set_timesteps
    forces the flag otherwise)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:  # numpy ints too
        raise ValueError(f"n: expected an int >= 1, got {n!r}")
    n = int(n)
    if isinstance(order, bool) or not isinstance(order, numbers.Integral) or order not in (1, 2, 3):
        raise ValueError(f"order: expected 1, 2 or 3, got {order!r}")
    group = list(range(1, order + 1))
    if not lower_order_final:
        if n % order:
            raise ValueError(f"lower_order_final: False needs a step count that is a multiple of order={order}, got "
                             f"{n} steps")
        orders = group * (n // order)
    elif order == 3:
        tail = {0: [1, 2, 1], 1: [1], 2: [1, 2]}[n % 3]
        orders = group * (n // 3 - (n % 3 == 0)) + tail
    elif order == 2:
        orders = group * (n // 2 - (n % 2 == 0)) + ([1, 1] if n % 2 == 0 else [1])
    else:
        orders = [1] * n
    if final_zero:
        orders[-1] = 1
    return orders


def effective_orders(orders, begin: int = 0) -> list[int]:
    """The orders diffusers runs in a loop that starts at step ``begin`` (``set_begin_index``): its model-output list
    starts empty, so step i's order is at most i - begin + 1. Steps before ``begin`` are ordered as if the loop
    started at 0 (their rows are never used)."""
    return [min(q, i - (begin if i >= begin else 0) + 1) for i, q in enumerate(orders)]


def check_orders(orders, n: int) -> list[int]:
    """``orders`` validated: one per step (n), each 1, 2 or 3, a step of order p > 1 following one of order p - 1 (the
    same group)."""
    try:
        orders = list(orders)
    except TypeError:
        raise TypeError(f"orders: expected a sequence of step orders, got {orders!r}") from None
    if len(orders) != n:
        raise ValueError(f"orders: expected one order per step ({n}), got {len(orders)}")
    for i, q in enumerate(orders):
        if isinstance(q, bool) or not isinstance(q, numbers.Integral) or q not in (1, 2, 3):
            raise ValueError(f"orders: expected 1, 2 or 3 per step, got {q!r} at step {i}")
        if q > 1 and (i == 0 or orders[i - 1] != q - 1):
            raise ValueError(f"orders: step {i} has order {q}, so step {i - 1} must have order {q - 1} (the same "
                             f"group), got {orders}")
    return [int(q) for q in orders]


def _phi(k: int, x: float) -> float:
    """phi_k(x) = sum_{m>=0} x^m/(m+k)!, i.e. (e^x - sum_{m<k} x^m/m!)/x^k: the series below |x| = 2 (the closed
    form cancels there), else the closed form with expm1."""
    if abs(x) < 2.0:  # 40 terms: the last below 2^40/42! ~ 1e-39 of the sum
        total, term = 0.0, 1.0 / math.factorial(k)
        for m in range(40):
            total += term
            term *= x / (m + k + 1)
        return total
    tail = math.expm1(x) - sum(x ** m / math.factorial(m) for m in range(1, k))
    return tail / x ** k


def _factors(h: float, t: float, algorithm: str) -> tuple[float, float, float, float, float]:
    """(A, k0, k1, k2, S) of a step of log-SNR length h to VE sigma t > 0: x_t = A x_g + k0 D0 + k1 D1 + k2 D2 + S xi,
    where k1 is the heun/order-3 weight of D1 (diffusers' midpoint order 2 uses k0/2) and k2 heun order 3's of D2."""
    if algorithm == "dpmsolver++":  # diffusers' alpha_t factors divided by alpha_t (VE state)
        return math.exp(-h), -math.expm1(-h), h * _phi(2, -h), h * _phi(3, -h), 0.0
    if algorithm == "dpmsolver":  # sigma_t(e^h - 1)/alpha_t = t(e^h - 1)
        return 1.0, -t * math.expm1(h), -t * h * _phi(2, h), -t * h * _phi(3, h), 0.0
    # sde-dpmsolver++: (sigma_t/sigma_s) e^-h = e^-2h; diffusers' D2 weight (1 - e^-2h - 2h)/(2h)^2 - 1/2 is
    # -phi_2(-2h) - 1/2 (kept as diffusers writes it)
    two = 2.0 * h
    return (math.exp(-two), -math.expm1(-two), two * _phi(2, -two), -_phi(2, -two) - 0.5,
            t * math.sqrt(-math.expm1(-two)))


def update(sigmas, k: int, p: int, algorithm: str = "dpmsolver++", solver_type: str = "midpoint"):
    """diffusers' step k of order p on VE ``sigmas`` (N+1 host floats): ``x_{k+1} = A x_g + sum_i B[i] M_{g+i} + S xi``
    with g = k - p + 1 (VE state; M the denoised estimate, or eps for "dpmsolver"). Returns (A, B, S), B of length p.
    A step to sigma 0 must be first order: x' = M_g ("dpmsolver++" and its SDE), x_g - sigma_g eps_g ("dpmsolver": the
    limit, where diffusers multiplies 0 by inf)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm: expected one of {ALGORITHMS}, got {algorithm!r}")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type: expected one of {SOLVER_TYPES}, got {solver_type!r}")
    g = k - p + 1
    s, t = sigmas[g], sigmas[k + 1]
    if t == 0:
        if p != 1:
            raise ValueError(f"orders: step {k} goes to sigma 0 and must be first order, got order {p}")
        return (1.0, [-s], 0.0) if algorithm == "dpmsolver" else (0.0, [1.0], 0.0)
    h = math.log(s / t)
    A, k0, k1, k2, S = _factors(h, t, algorithm)
    if p == 1:
        return A, [k0], S
    if h == 0 or any(sigmas[j] == sigmas[j + 1] for j in range(g, k)):
        raise ValueError(f"sigmas: step {k} of order {p} spans a repeated sigma (a step of length 0 inside its group, "
                         "where diffusers divides by 0)")
    r0 = math.log(s / sigmas[k]) / h
    if p == 2:
        k1 = 0.5 * k0 if solver_type == "midpoint" else k1
        return A, [k0 - k1 / r0, k1 / r0], S
    r1 = math.log(s / sigmas[k - 1]) / h
    d1_0, d1_1 = [-1.0 / r1, 1.0 / r1, 0.0], [-1.0 / r0, 0.0, 1.0 / r0]
    b = [k0, 0.0, 0.0]
    if solver_type == "midpoint":
        terms = [(k1, d1_1)]
    else:  # D1 = (r0 D1_0 - r1 D1_1)/(r0 - r1), D2 = 2 (D1_1 - D1_0)/(r0 - r1)
        den = r0 - r1
        terms = [(k1 * r0 / den, d1_0), (-k1 * r1 / den, d1_1), (-2.0 * k2 / den, d1_0), (2.0 * k2 / den, d1_1)]
    for w, vec in terms:
        for j in range(3):
            b[j] += w * vec[j]
    return A, b, S


def scheduler_rows(sigmas, orders, alphas, conv, algorithm: str = "dpmsolver++", solver_type: str = "midpoint"):
    """The drop-in's rows (module docstring: the group's start kept) in the pipeline's state z = alpha x.

    sigmas: N+1 VE sigmas; orders: N (:func:`effective_orders`); alphas: N+1 state scales; ``conv(i)`` -> (p, q),
    diffusers' conversion at step i in the state (M_i = p z_i + q R_i, R the raw model output). Returns (rows, writes):
    float64 rows whose D slot is R (p = 0, q = 1), and per step what it stores for the next: "start" (history output
    z_k, e = 1, and x0 output R_k), "model" (history output M_k) or None. Step k of order p reads H = z_g, H2 = R_g
    (p >= 2) and H3 = M_{g+1} (p = 3, heun: midpoint skips M_{g+1})."""
    n = len(sigmas) - 1
    rows, writes = [], []
    for k in range(n):
        p = orders[k]
        g = k - p + 1
        A, B, S = update(sigmas, k, p, algorithm, solver_type)
        at = alphas[k + 1]
        a_z, b_z = A * at / alphas[g], [b * at for b in B]
        pk, qk = conv(k)
        c = {"a": b_z[-1] * pk, "b": b_z[-1] * qk, "s": S * at, "p": 0.0, "q": 1.0}
        if p == 1:
            c["a"] += a_z  # z_k is z_g
        else:
            pg, qg = conv(g)
            c.update(c=a_z + b_z[0] * pg, c2=b_z[0] * qg, c3=b_z[1] if p == 3 else 0.0)
        rows.append(c)
        writes.append((pk, qk))
    for k, c in enumerate(rows):  # what the next call of the group reads (midpoint order 3 never reads M_{g+1})
        nxt = rows[k + 1] if k + 1 < n and orders[k + 1] == orders[k] + 1 else None
        if nxt is None or (orders[k] == 2 and nxt["c3"] == 0):
            writes[k] = None
        elif orders[k] == 1:
            c["e"], writes[k] = 1.0, "start"
        else:
            (c["e"], c["f"]), writes[k] = writes[k], "model"
    return [coefs.row(**c) for c in rows], writes


def singlestep(sigmas, orders, *, predict_x0: bool = True, solver_type: str = "midpoint",
               conv: ct.Conv = ct._identity) -> ct.Plan:
    """The sampler's plan on VE ``sigmas`` (module docstring: x_g eliminated): step k of order ``orders[k]`` (checked
    by :func:`check_orders`; a step to 0 must be first order) reads H = M_{k-1}, H2 = M_{k-2} and writes M_k, the
    denoised estimate (``predict_x0``, DPM-Solver++) or eps = (x - D)/sigma (DPM-Solver)."""
    n = len(sigmas) - 1
    orders = check_orders(orders, n)
    algorithm = "dpmsolver++" if predict_x0 else "dpmsolver"
    depth = 2 if 3 in orders else 1 if 2 in orders else 0
    rows = []
    prev = None
    for k in range(n):
        p, s = orders[k], sigmas[k]
        A, B, _ = update(sigmas, k, p, algorithm, solver_type)
        m_x, m_d = (0.0, 1.0) if predict_x0 else (1.0 / s, -1.0 / s)  # M_k over (x_k, D_k)
        a, hist = A, [0.0, 0.0]  # the x_k coefficient; those of H = M_{k-1}, H2 = M_{k-2}
        if p > 1:  # x_g = (x_k - sum_i B'_i M_{g+i})/A'
            a_prev, b_prev = prev
            a = A / a_prev
            for i in range(p - 1):  # M_{g+i} = M_{k-(p-1-i)}: H for i = p - 2, H2 for i = p - 3
                hist[p - 2 - i] += B[i] - a * b_prev[i]
        prev = (A, B)
        writes = {"e": m_x, "f": m_d} if depth else {}
        rows.append(ct._conv_row(conv, s, a=a + B[-1] * m_x, b=B[-1] * m_d, c=hist[0], c2=hist[1], **writes))
    return ct._plan(rows, sigmas[:-1], sigmas[:-1], history=depth)


def plan(sigmas, conv: ct.Conv = ct._identity, *, order=2, solver_type="midpoint", lower_order_final=True,
         predict_x0=True, orders=None) -> ct.Plan:
    """The ``dpmsolver_single`` sampler's plan (knobs validated): diffusers' orders for ``order`` (1-3) and
    ``lower_order_final`` (a last step to 0 first order), or the explicit per-step ``orders``; then
    :func:`singlestep`."""
    for name, value in (("lower_order_final", lower_order_final), ("predict_x0", predict_x0)):
        if not isinstance(value, bool):
            raise TypeError(f"{name}: expected a bool, got {value!r}")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type: expected one of {SOLVER_TYPES}, got {solver_type!r}")
    n = len(sigmas) - 1
    if orders is None:
        orders = order_list(n, order, lower_order_final, sigmas[-1] == 0)
    elif isinstance(order, bool) or not isinstance(order, numbers.Integral) or order not in (1, 2, 3):
        raise ValueError(f"order: expected 1, 2 or 3, got {order!r}")
    return singlestep(sigmas, orders, predict_x0=predict_x0, solver_type=solver_type, conv=conv)
