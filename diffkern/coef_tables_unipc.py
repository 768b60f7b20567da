"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework"), diffusers' ``UniPCMultistepScheduler``
with its B(h) predictor UniP and corrector UniC, as one fused row per model call (history depth 2, or 3 at order 3).

Notation (VE coordinates, state x = z/alpha): step k reads the model at x_k = the predictor's output of step k-1 (the
loop's first step: the initial state), sigma s_k, lambda_k = -ln s_k, and M_k the model's value in the solver's
parametrisation: the denoised D_k (``predict_x0``, the data-prediction UniPC) or eps_k = (x_k - D_k)/s_k. On a step
s -> t with h = lambda_t - lambda_s, hh = -h (data) or h (noise), B(h) = hh ("bh1") or e^hh - 1 ("bh2") and
kappa = B(h) (data) or s_t B(h) (noise), diffusers' updates divided by alpha_t read

    base(x, M_s)  = (s_t/s_s) x + (1 - s_t/s_s) M_s          (data)   x - (s_s - s_t) M_s   (noise)
    UniP-p:  x_t  = base(x, M_s) - kappa sum_i rho_p_i D1_i
    UniC-p:  x_t^c = base(x, M_s) - kappa (sum_i rho_c_i D1_i + rho_c_p (M_t - M_s))

with D1_i = (M_{s-i} - M_s)/r_i, r_i = (lambda_{s-i} - lambda_s)/h (i = 1..p-1), rho_p = 1/2 at p = 2, else
rho_p solving sum_i rho_p_i r_i^(j-1) = g_j (j = 1..p-1); rho_c = 1/2 at p = 1, else rho_c solving
sum_i rho_c_i r_i^(j-1) = g_j (j = 1..p, r_p = 1), g_j = j! phi_{j+1}(hh) hh / B(h) (:func:`_g`). Step k of diffusers' loop: the corrector UniC-p (p = step k-1's order) rebuilds the corrected state of
step k from the corrected state of step k-1 (``last_sample``) and M_{k-1}, M_{k-2}, M_k; then UniP-q (q = step k's
order) predicts x_{k+1} from it. UniC and the UniP of step k-1 share their base and their D1's, so

    x_k^c = x_k + kappa_{k-1} (sum_i (rho_p_i - rho_c_i) D1_i - rho_c_p (M_k - M_{k-1}))

and x_{k+1} is linear in (x_k, D_k, M_{k-1}, M_{k-2}, M_{k-3}): the fused row (a, b, c, c2, c3), with H = M_{k-1},
H2 = M_{k-2}, H3 = M_{k-3} (read by order 3's corrector only) and history_out = M_k (f = 1, or e = 1/s_k, f = -1/s_k
for eps). Each vector is kept as its float64 coefficients over that basis and the maps are composed on the host.

Steps: a step to sigma = 0 is the jump x' = D_k (data; diffusers' first-order step there, its only finite one) or its
limit x_k^c - s_k eps_k (noise; diffusers divides 0 by 0 there); a step of h = 0 (Karras' sigma_min to itself) is the
identity on x_k^c, as diffusers'.
"""
from __future__ import annotations

import math
import numbers

from . import coef_tables as ct

SOLVER_TYPES = ("bh1", "bh2")


def unipc_orders(n: int, *, order: int = 2, lower_order_final: bool = True, begin: int = 0) -> list[int]:
    """The predictor order of each of ``n`` steps as diffusers' UniPC picks it: ``order``, at most 1 + the number of
    steps this loop (starting at ``begin``) took before, and with ``lower_order_final`` at most the number of steps
    left (whatever n: no 15-step threshold here). Steps before ``begin`` are ordered as if the loop started at 0."""
    orders = []
    for i in range(n):
        taken = i - begin if i >= begin else i
        q = min(order, n - i) if lower_order_final else order
        orders.append(min(q, taken + 1))
    return orders


def unipc_correctors(n: int, disable_corrector=(), *, begin: int = 0) -> list[bool]:
    """Whether step i starts with UniC: not on the loop's first step (no previous state), nor where i - 1 is in
    ``disable_corrector`` (diffusers' convention: the index of the step whose prediction is left uncorrected)."""
    off = set(disable_corrector)
    return [i > (begin if i >= begin else 0) and (i - 1) not in off for i in range(n)]


def _g(hh: float, j: int) -> float:
    """j! (e^hh - sum_{m<=j} hh^m/m!)/hh^j = j! hh phi_{j+1}(hh): the series below |hh| = 1 (the closed form cancels
    about -j log10|hh| digits there), else the closed form with expm1."""
    if abs(hh) < 1.0:  # sum_{l>=1} j! hh^l/(j+l)!; 30 terms: below 1/31! < 1e-33 relative
        total, term = 0.0, 1.0
        for ell in range(1, 31):
            term *= hh / (j + ell)
            total += term
        return total
    tail = math.expm1(hh) - sum(hh ** m / math.factorial(m) for m in range(1, j + 1))
    return math.factorial(j) * tail / hh ** j


def _b_of(hh: float, solver_type: str) -> float:
    return hh if solver_type == "bh1" else math.expm1(hh)


_DIM = 5  # the basis (x_k, D_k, M_{k-1}, M_{k-2}, M_{k-3})


def _lin(*terms) -> list[float]:
    """sum of coef * vector over (coef, vector) pairs (vectors: _DIM float64 coefficients)."""
    out = [0.0] * _DIM
    for coef, vec in terms:
        for j in range(_DIM):
            out[j] += coef * vec[j]
    return out


def _solve_vandermonde(nodes, rhs) -> list[float]:
    """w with sum_i w_i nodes_i^j = rhs_j (j = 0..n-1): diffusers' R w = b, for n <= 3 distinct nodes, by Gaussian
    elimination in float64 (the nodes are ratios of log-sigma steps, O(1) and distinct on a decreasing schedule)."""
    n = len(nodes)
    a = [[nodes[i] ** j for i in range(n)] + [rhs[j]] for j in range(n)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(a[r][col]))
        a[col], a[piv] = a[piv], a[col]
        for r in range(col + 1, n):
            f = a[r][col] / a[col][col]
            for c in range(col, n + 1):
                a[r][c] -= f * a[col][c]
    w = [0.0] * n
    for r in reversed(range(n)):
        w[r] = (a[r][n] - sum(a[r][c] * w[c] for c in range(r + 1, n))) / a[r][r]
    return w


class _Step:
    """The quantities of one step s -> t shared by its UniP and the next step's UniC; ``s_old``: the sigmas of the
    p - 1 earlier model calls it uses, newest first."""

    def __init__(self, s: float, t: float, s_old, predict_x0: bool, solver_type: str):
        self.h = math.log(s / t)
        hh = -self.h if predict_x0 else self.h
        self.hh = hh
        big_b = _b_of(hh, solver_type)
        self.kappa = big_b if predict_x0 else t * big_b
        self.big_b = big_b
        self.r = [math.log(s / so) / self.h for so in s_old]  # r_i = (lambda_{s-i} - lambda_s)/h

    def rhos_p(self, p: int) -> list[float]:
        """UniP-p's weights (rho_p_1..rho_p_{p-1}); diffusers' 1/2 at p = 2."""
        if p == 2:
            return [0.5]
        return _solve_vandermonde(self.r, [_g(self.hh, j) / self.big_b for j in range(1, p)])

    def rhos_c(self, p: int) -> list[float]:
        """UniC-p's weights (rho_c_1..rho_c_p, the last on M_t - M_s); diffusers' 1/2 at p = 1."""
        if p == 1:
            return [0.5]
        return _solve_vandermonde(self.r + [1.0], [_g(self.hh, j) / self.big_b for j in range(1, p + 1)])


def unipc(sigmas, orders, correct, *, predict_x0: bool = True, solver_type: str = "bh2",
          conv: ct.Conv = ct._identity) -> ct.Plan:
    """diffusers' UniPC loop (module docstring) in VE coordinates, step i with predictor order ``orders[i]`` (1 to 3)
    and a corrector where ``correct[i]`` (its order: ``orders[i-1]``); history depth 2, or 3 where an order-3 step is
    corrected (H = M_{i-1}, H2 = M_{i-2}, H3 = M_{i-3}; every row writes its M). ``sigmas`` strictly decreasing but for
    a last step of h = 0."""
    n = len(sigmas) - 1
    if len(orders) != n or len(correct) != n:
        raise ValueError(f"orders, correct: expected one per step ({n}), got {len(orders)} and {len(correct)}")
    if any(q not in (1, 2, 3) or q > k + 1 for k, q in enumerate(orders)):
        raise ValueError(f"orders: expected 1, 2 or 3 per step, at most the step's index + 1, got {orders}")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type: expected one of {SOLVER_TYPES}, got {solver_type!r}")
    X, D, H1, H2, H3 = ([1.0 if j == k else 0.0 for j in range(_DIM)] for k in range(_DIM))
    hist = [H1, H2, H3]  # M_{k-1}, M_{k-2}, M_{k-3}
    rows = []
    for k in range(n):
        s, t = sigmas[k], sigmas[k + 1]
        m_k = D if predict_x0 else [1.0 / s, -1.0 / s, 0.0, 0.0, 0.0]
        xc = X
        if correct[k]:
            p = orders[k - 1]
            prev = _Step(sigmas[k - 1], s, [sigmas[k - 1 - i] for i in range(1, p)], predict_x0, solver_type)
            rho_c = prev.rhos_c(p)
            terms = [(-rho_c[-1], m_k), (rho_c[-1], H1)]
            rho_p = prev.rhos_p(p) if p > 1 else []
            for i in range(1, p):  # D1_i = (M_{k-1-i} - M_{k-1})/r_i, weighted by rho_p_i - rho_c_i
                w = (rho_p[i - 1] - rho_c[i - 1]) / prev.r[i - 1]
                terms += [(w, hist[i]), (-w, H1)]
            xc = _lin((1.0, X), *((prev.kappa * c, v) for c, v in terms))
        if t == 0:
            out = m_k if predict_x0 else _lin((1.0, xc), (-s, m_k))
        elif t == s:
            out = xc
        else:
            q = orders[k]
            step = _Step(s, t, [sigmas[k - i] for i in range(1, q)], predict_x0, solver_type)
            if predict_x0:
                out = _lin((t / s, xc), (-math.expm1(-step.h), m_k))
            else:
                out = _lin((1.0, xc), (t - s, m_k))
            rho_p = step.rhos_p(q) if q > 1 else []
            for i in range(1, q):  # - kappa * rho_p_i * (M_{k-i} - M_k)/r_i
                w = -step.kappa * rho_p[i - 1] / step.r[i - 1]
                out = _lin((1.0, out), (w, hist[i - 1]), (-w, m_k))
        writes = {"f": 1.0} if predict_x0 else {"e": 1.0 / s, "f": -1.0 / s}
        rows.append(ct._conv_row(conv, s, a=out[0], b=out[1], c=out[2], c2=out[3], c3=out[4], **writes))
    depth = 3 if any(correct[k] and orders[k - 1] == 3 for k in range(n)) else 2
    return ct._plan(rows, sigmas[:-1], sigmas[:-1], history=depth)


def _step_indices(value) -> tuple[int, ...]:
    """``disable_corrector`` as a sorted tuple of step indices (ints >= 0, in any iterable)."""
    try:
        items = list(value)
    except TypeError:
        raise TypeError(f"disable_corrector: expected a sequence of step indices, got {value!r}") from None
    for k in items:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
            raise ValueError(f"disable_corrector: expected step indices (ints >= 0), got {k!r}")
    return tuple(sorted({int(k) for k in items}))


def plan(sigmas, conv: ct.Conv = ct._identity, *, order=2, solver_type="bh2", lower_order_final=True,
         disable_corrector=(), predict_x0=True) -> ct.Plan:
    """The ``unipc`` sampler's plan on a VE schedule (knobs validated): diffusers' orders and correctors for a loop
    over all of ``sigmas`` (:func:`unipc_orders`, :func:`unipc_correctors`), then :func:`unipc`. ``order``: 1, 2
    or 3."""
    if isinstance(order, bool) or not isinstance(order, numbers.Integral) or order not in (1, 2, 3):
        raise ValueError(f"order: expected 1, 2 or 3, got {order!r}")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type: expected one of {SOLVER_TYPES}, got {solver_type!r}")
    for name, value in (("lower_order_final", lower_order_final), ("predict_x0", predict_x0)):
        if not isinstance(value, bool):
            raise TypeError(f"{name}: expected a bool, got {value!r}")
    n = len(sigmas) - 1
    orders = unipc_orders(n, order=order, lower_order_final=lower_order_final)
    return unipc(sigmas, orders, unipc_correctors(n, _step_indices(disable_corrector)), predict_x0=predict_x0,
                 solver_type=solver_type, conv=conv)
