"""Linear multistep sampling (LMS): k-diffusion's ``sample_lms`` and diffusers' ``LMSDiscreteScheduler`` as one fused
row per model call (history depth up to 3).

The probability-flow ODE in VE coordinates is dx/dsigma = d(x, sigma), d = (x - D)/sigma. LMS of order q integrates it
over the polynomial in sigma through the last q slopes: from sigma_i to sigma_{i+1},

    x_{i+1} = x_i + sum_{j<q} c_ij d_{i-j},   c_ij = int_{sigma_i}^{sigma_{i+1}} L_ij(tau) dtau,

L_ij the Lagrange basis polynomial of node sigma_{i-j} over the nodes sigma_i, ..., sigma_{i-q+1}, and
q = min(i + 1, order) (the first steps have fewer slopes). A final step to sigma = 0 is the same formula (the
polynomial extrapolated to 0; k-diffusion and diffusers do so).

Closed form (:func:`weights`). With h = sigma_{i+1} - sigma_i and tau = sigma_i + h v, the nodes are
v_k = (sigma_{i-k} - sigma_i)/h and

    c_ij = h * int_0^1 prod_{k != j} (v - v_k) dv / prod_{k != j} (v_j - v_k).

On a decreasing schedule every v_k <= 0, so the numerator's power-basis coefficients (elementary symmetric functions of
the -v_k) are all >= 0 and its integral sum_d e_d/(d + 1) adds positive terms: no cancellation. Each denominator factor
is one sigma difference over h. The weights are thus accurate to a few float64 ulps for any step sizes (k-diffusion
and diffusers integrate the same cubic with scipy's ``quad``, diffusers in float32 arithmetic).

The fused row (step i, model at s = sigma_i): the slope d_i = (x - D)/s from the step's denoised estimate, H_j = d_{i-j}
(``history``, ``history2``, ``history3``), and every row writes its slope (``history_out = x/s - D/s``):

    a = 1 + c_i0/s,   b = -c_i0/s,   c = c_i1,   c2 = c_i2,   c3 = c_i3.
"""
from __future__ import annotations

import math
import numbers

from . import coef_tables as ct

ORDERS = (1, 2, 3, 4)


def weights(sigmas, i: int, q: int) -> list[float]:
    """[c_i0, ..., c_i(q-1)]: the LMS weights of step i (from ``sigmas[i]`` to ``sigmas[i+1]``) over the q nodes
    ``sigmas[i]``, ..., ``sigmas[i-q+1]`` (module docstring). ``sigmas``: a host sequence of floats; needs
    0 <= q - 1 <= i and distinct nodes (ValueError naming ``sigmas`` otherwise). A step of length 0 has weights 0."""
    if not 1 <= q <= i + 1:
        raise ValueError(f"q: expected 1 <= q <= i + 1 = {i + 1} (the nodes sigmas[i], ..., sigmas[i-q+1]), got {q}")
    s, t = float(sigmas[i]), float(sigmas[i + 1])
    nodes = [float(sigmas[i - k]) for k in range(q)]
    if len(set(nodes)) < q:  # a basis polynomial over two equal nodes divides by 0 (diffusers: inf/NaN)
        raise ValueError(f"sigmas: a step of order {q} needs distinct sigmas at its nodes, got {nodes} (a step of "
                         f"length 0 before step {i})")
    h = t - s
    if h == 0:
        return [0.0] * q
    v = [(n - s) / h for n in nodes]
    out = []
    for j in range(q):
        poly = [1.0]  # power-basis coefficients of prod_{k != j} (v - v_k), lowest degree first
        denom = 1.0
        for k in range(q):
            if k == j:
                continue
            poly = [(poly[d - 1] if d > 0 else 0.0) - (v[k] * poly[d] if d < len(poly) else 0.0)
                    for d in range(len(poly) + 1)]
            denom *= (nodes[j] - nodes[k]) / h
        out.append(h * math.fsum(c / (d + 1) for d, c in enumerate(poly)) / denom)
    return out


def lms_row(sigmas, i: int, q: int, used: int, conv: ct.Conv = ct._identity, history: bool = True) -> list[float]:
    """The fused row of step i with the weights of ``q`` nodes applied to the newest ``used`` slopes (``used`` < q:
    diffusers' first steps of a loop that starts past step 0, whose derivative list is shorter than its order);
    ``history``: write the slope (``history_out``)."""
    return weights_row(weights(sigmas, i, q)[:used], float(sigmas[i]), conv, history)


def weights_row(c, s: float, conv: ct.Conv = ct._identity, history: bool = True) -> list[float]:
    """The fused row ``x' = x + c[0]*(x - D)/s + c[1]*H + c[2]*H2 + c[3]*H3`` of a step whose model call is at
    sigma ``s`` (1 to 4 weights ``c``); ``history``: write the slope (x - D)/s."""
    row = {"a": 1.0 + c[0] / s, "b": -c[0] / s}
    row.update(zip(("c", "c2", "c3"), c[1:]))
    if history:
        row.update(e=1.0 / s, f=-1.0 / s)
    return ct._conv_row(conv, s, **row)


def lms(sigmas, *, order: int = 4, conv: ct.Conv = ct._identity) -> ct.Plan:
    """k-diffusion's ``sample_lms`` on the N+1 decreasing VE ``sigmas``: row i of order min(i + 1, ``order``) (1 to 4),
    history depth min(order, N) - 1 (the slopes of the previous steps; every row writes its own when there is one)."""
    if isinstance(order, bool) or not isinstance(order, numbers.Integral) or order not in ORDERS:
        raise ValueError(f"order: expected an int 1, 2, 3 or 4, got {order!r}")
    order, n = int(order), len(sigmas) - 1
    depth = min(order, n) - 1
    rows = []
    for i in range(n):
        q = min(i + 1, order)
        rows.append(lms_row(sigmas, i, q, q, conv, history=depth > 0))
    return ct._plan(rows, sigmas[:-1], sigmas[:-1], history=depth)

