"""RES multistep (ComfyUI's ``res_multistep`` / ``res_multistep_ancestral``): the second-order multistep
exponential integrator of Zhang et al. (2023, "Improving the training of rectified flows"/RES, arXiv 2308.02157) in
data prediction, with k-diffusion's ancestral split, as one fused row per step (history = the previous D).

With t = -ln(sigma), step i goes from sigma_i to sigma_down ((sigma_down, sigma_up) = ``ancestral_step(sigma_i,
sigma_{i+1}, eta)``), h = ln(sigma_i/sigma_down) > 0:

- the first step, and a step whose sigma_down is 0: Euler, ``x' = (sd/s) x + (1 - sd/s) D`` (the jump x' = D when
  sd = 0);
- else ``x' = e^-h x + h (b1 D + b2 D_prev)`` with phi1 = -expm1(-h)/h, phi2 = (1 - phi1)/h (phi_k at -h),
  c2 = (t(sigma_{i-1}) - t(sd_{i-1}))/h (the previous step's node relative to this one, in units of h; ComfyUI's
  rule, which takes the previous step's own target sd_{i-1}), b2 = phi2/c2, b1 = phi1 - b2;
- then ``s_noise * sigma_up * xi`` where sigma_up > 0.

At eta = 0 (``res_multistep``), c2 = -h_prev/h and the update is ``x' = e^-h x + (1 - e^-h) D + h^2 phi2 (D -
D_prev)/h_prev``; DPM-Solver++(2M) has (1 - e^-h) h/2 where RES has h^2 phi2 = h - (1 - e^-h), equal to second order
in h (both methods are of order 2).
"""
from __future__ import annotations

import math

from .coef_tables import Conv, Plan, _conv_row, _identity, _plan, _ratio, ancestral_step


def _phis(h: float) -> tuple[float, float]:
    """(phi1(-h), phi2(-h)) for h > 0, accurate for small h (series below 1e-4)."""
    if h < 1e-4:
        return 1.0 - h / 2.0 + h * h / 6.0, 0.5 - h / 6.0 + h * h / 24.0
    phi1 = -math.expm1(-h) / h
    return phi1, (1.0 - phi1) / h


def res_multistep(sigmas, *, eta: float = 0.0, s_noise: float = 1.0, conv: Conv = _identity) -> Plan:
    """RES multistep rows on the N+1 decreasing VE ``sigmas`` (the last may be 0); every row writes D as history."""
    rows, prev_down = [], None
    for i, (s, sn) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        down, up = ancestral_step(s, sn, eta)
        noise = s_noise * up if up > 0 else 0.0
        if down == 0 or prev_down is None:
            r, one_minus_r = _ratio(s, down)
            rows.append(_conv_row(conv, s, a=r, b=one_minus_r, s=noise, f=1.0))
        else:
            h = math.log(s / down)
            c2 = (math.log(prev_down) - math.log(sigmas[i - 1])) / h  # t(sigma_{i-1}) - t(sd_{i-1}), over h
            phi1, phi2 = _phis(h)
            b2 = phi2 / c2
            rows.append(_conv_row(conv, s, a=math.exp(-h), b=h * (phi1 - b2), c=h * b2, s=noise, f=1.0))
        prev_down = down
    return _plan(rows, sigmas[:-1], sigmas[:-1], history=1)
