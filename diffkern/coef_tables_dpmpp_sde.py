"""DPM-Solver++ (stochastic), k-diffusion's ``sample_dpmpp_sde``, as a two-call plan of table rows.

Step from sigma to sigma_next > 0, in t = -ln(sigma) with h = ln(sigma/sigma_next), r in (0, 1], fac = 1/(2r):

    sigma_s = sigma*exp(-r h)                                       the second call's noise level
    x2 = (sd1/sigma) x + (1 - sd1/sigma) D + s_noise*su1*xi1        (sd1, su1) = ancestral_step(sigma, sigma_s, eta)
    D2 = D(x2, sigma_s)
    x' = (sd2/sigma) x + (1 - sd2/sigma) ((1 - fac) D + fac D2) + s_noise*su2*xi2
                                                                    (sd2, su2) = ancestral_step(sigma, sigma_next, eta)

k-diffusion draws xi1 and xi2 from a Brownian tree in sigma: xi(a, b) = (W(b) - W(a))/sqrt|b - a|. Both increments
start at sigma, so with rho = sqrt((sigma - sigma_s)/(sigma - sigma_next)):  xi2 = rho xi1 + sqrt(1 - rho^2) xi',
xi' independent (the increment over [sigma_next, sigma_s]). diffkern draws xi1 on the first call's row and xi' on
the second's, which gives the tree's joint law exactly; increments of different steps do not overlap, so they are
independent there too.

The second call cannot see x, D or xi1 separately, only x2, D2 and one history tensor H = e x + f D written by
the first call. xi1 enters through x2 alone: its coefficient on the second row, k, must satisfy k*s_noise*su1 =
s_noise*su2*rho; the rest of x' goes into H:

    x' = k x2 + fac (1 - sd2/sigma) D2 + H + s_noise*su2*sqrt(1 - rho^2) xi'
    H  = (sd2/sigma - k sd1/sigma) x + ((1 - sd2/sigma)(1 - fac) - k (1 - sd1/sigma)) D

Every term of x' keeps the size it has in x' itself (|k| <= 1 on decreasing schedules), so rounding a 16-bit H or
x2 is not amplified. The step to sigma_next = 0 is Euler to 0 (one call), as k-diffusion.
"""
from __future__ import annotations

import math

from . import coef_tables as ct
from .ops import coefs


def _dpmpp_sde_rows(conv: ct.Conv, sigma: float, sigma_next: float, eta: float, s_noise: float, r: float,
                    explicit: bool = False):
    """(first-call row, second-call row, sigma_s or nan) of one step; ``explicit``: the second row's noise is xi2
    itself (a noise_sampler's draw at (sigma, sigma_next)), so x2 carries none of it (k = 0)."""
    if sigma_next == 0:
        return ct._slope_row(conv, sigma, 0.0), coefs.row(**ct._NO_MODEL), math.nan
    h = math.log(sigma / sigma_next)
    sigma_s = sigma * math.exp(-r * h)
    fac = 1.0 / (2.0 * r)
    sd1, su1 = ct.ancestral_step(sigma, sigma_s, eta)
    sd2, su2 = ct.ancestral_step(sigma, sigma_next, eta)
    a1, b1 = ct._ratio(sigma, sd1)
    a2, b2 = ct._ratio(sigma, sd2)
    noise1, noise2 = s_noise * su1, s_noise * su2
    # rho^2 = (sigma - sigma_s)/(sigma - sigma_next) and 1 - rho^2 = (sigma_s - sigma_next)/(sigma - sigma_next),
    # each difference through expm1: exact 0 at r = 1 (sigma_s = sigma_next), where a rounded difference of
    # 1e-15 would put a 3e-8 multiple of xi' under the square root
    span = -math.expm1(-h)
    rho = math.sqrt(-math.expm1(-r * h) / span) if span > 0 else 0.0
    rest = math.sqrt(sigma_next / sigma * math.expm1((1.0 - r) * h) / span) if span > 0 else 0.0
    k = noise2 * rho / noise1 if noise1 > 0 and not explicit else 0.0
    rest = 1.0 if explicit else rest
    first = ct._conv_row(conv, sigma, a=a1, b=b1, s=noise1, e=a2 - k * a1, f=b2 * (1.0 - fac) - k * b1)
    second = ct._conv_row(conv, sigma_s, a=k, b=fac * b2, c=1.0, s=noise2 * rest)
    return first, second, sigma_s


def dpmpp_sde(sigmas, *, eta=1.0, s_noise=1.0, r=0.5, conv: ct.Conv = ct._identity, explicit_noise=False) -> ct.Plan:
    """k-diffusion's ``sample_dpmpp_sde`` (DPM-Solver++ stochastic, intermediate call at t + r h) with its
    Brownian-tree noise law. Rows: first calls 0..N-1 (noise xi1), second calls N..2N-1 (noise xi'; with
    ``explicit_noise``, xi2 = the noise at (sigma, sigma_next) itself, as a noise_sampler gives it)."""
    n = len(sigmas) - 1
    first, second, mids = map(list, zip(*(_dpmpp_sde_rows(conv, sigmas[i], sigmas[i + 1], eta, s_noise, r,
                                                          explicit_noise)
                                          for i in range(n))))
    return ct._two_eval_plan(first, second, mids, sigmas[:-1])
