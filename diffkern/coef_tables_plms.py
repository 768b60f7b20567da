"""PLMS, the pseudo linear multistep method of PNDM (Liu et al. 2022), as a plan on a VE schedule.

diffusers' ``PNDMScheduler`` with ``skip_prk_steps=True`` (the Stable Diffusion 1.x default; crowsonkb's PLMS) moves
the sample with ``_get_prev_sample``: DDIM's deterministic update in eps form, which in VE coordinates
(``x = z/sqrt(abar)``, ``sigma = sqrt((1 - abar)/abar)``) is Euler in sigma on ``eps = (x - D)/sigma``:
``x' = x + (sigma' - sigma)*eps``. Its model calls run at [t0, t1, t1, t2, ..., t_{N-1}]:

- step 0, two calls: Euler to sigma_1 with e0, then again from the start with the mean (e0 + e1)/2, which is
  Heun's method in eps (the corrector row eliminates the start state through the stored e0, as
  :func:`diffkern.coef_tables.heun`);
- step i >= 1, one call: ``x' = x + (sigma_{i+1} - sigma_i)*AB_k``, Adams-Bashforth of order k = min(i + 1, 4)
  with the equal-step weights of :data:`AB_WEIGHTS`, over the eps of steps i, i-1, i-2, i-3, each step's first
  call's (diffusers' ``ets`` never holds the corrector's).

The weights assume equal steps in the timestep, not in sigma; on a schedule that is not linear in sigma the method
is of order 2 (``tests/test_pndm.py`` measures it). :func:`ipndm` is the same multistep without the Heun start,
:func:`ipndm_v` ComfyUI's variant with weights from the actual steps.
"""
from __future__ import annotations

import math
import numbers

from . import coef_tables
from .coef_tables import _NO_MODEL, Conv, Plan, _identity
from .ops import coefs

# Adams-Bashforth weights of order k (index 0: the newest value), for equal steps.
AB_WEIGHTS = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
              4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def _ab_rows(sigmas, max_order: int, conv: Conv) -> list:
    """Row i: ``x' = x + dt*(w0*e_i + w1*H + w2*H2 + w3*H3)``, AB weights of order min(i + 1, max_order), history
    ``e_i = (x - D)/sigma_i``: a = 1 - w0*(1 - r), b = w0*(1 - r) (r = sigma_{i+1}/sigma_i), c, c2, c3 = dt*w1..3."""
    rows = []
    for i, (s, sn) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        r, one_minus_r = coef_tables._ratio(s, sn)
        w = AB_WEIGHTS[min(i + 1, max_order)]
        dt = sn - s
        hist = dict(zip(("c", "c2", "c3"), (dt * wj for wj in w[1:])))
        eps = {"e": 1.0 / s, "f": -1.0 / s}
        rows.append(coef_tables._conv_row(conv, s, a=1.0 - w[0] * one_minus_r, b=w[0] * one_minus_r, **hist, **eps))
    return rows


def _jump_row(conv: Conv, sigma: float) -> list:
    """ComfyUI's iPNDM "denoising step", a step to sigma 0: x' = D (the eps it writes is read by no later step)."""
    return coef_tables._conv_row(conv, sigma, a=0.0, b=1.0, e=1.0 / sigma, f=-1.0 / sigma)


def ipndm(sigmas, *, max_order: int = 4, conv: Conv = _identity) -> Plan:
    """iPNDM (Zhang & Chen 2023, the improved PNDM of the DEIS paper) as ComfyUI's ``ipndm`` runs it: PLMS without
    the Heun start, its first steps Adams-Bashforth of the orders the history allows (Euler, AB2, AB3, then AB
    ``max_order``), one model call per step, and a step to sigma 0 the jump x' = D; history = eps, depth
    ``max_order - 1`` (at most the steps taken)."""
    if isinstance(max_order, bool) or not isinstance(max_order, numbers.Integral) or max_order not in AB_WEIGHTS:
        raise ValueError(f"max_order: expected 1, 2, 3 or 4, got {max_order!r}")
    n = len(sigmas) - 1
    rows = [_jump_row(conv, s) if sn == 0 else row
            for s, sn, row in zip(sigmas[:-1], sigmas[1:], _ab_rows(sigmas, max_order, conv))]
    return coef_tables._plan(rows, sigmas[:-1], sigmas[:-1], history=min(max_order, n) - 1)


def plms(sigmas, *, conv: Conv = _identity) -> Plan:
    """PLMS on the N+1 decreasing VE ``sigmas`` (history = eps, ``history_out = (x - D)/sigma``, depth 3).

    Row i (step i, model at sigma_i): step 0 ``x' = x + dt*e0`` (dt = sigma_1 - sigma_0); step i >= 1
    ``x' = x + dt*(w0*e_i + w1*H + w2*H2 + w3*H3)`` with AB weights of order min(i + 1, 4): a = 1 - w0*(1 - r),
    b = w0*(1 - r) (r = sigma_{i+1}/sigma_i), c, c2, c3 = dt*w1, dt*w2, dt*w3. Row N (step 0's corrector, model at
    sigma_1 > 0): ``x'' = x' + dt/2*(e1 - H)``, H = e0 just written. A step to sigma = 0 is the same formula (no
    jump: diffusers' PLMS with ``set_alpha_to_one=True`` ends so); with N = 1 and sigma_1 = 0 there is no corrector.
    """
    n = len(sigmas) - 1
    rows = _ab_rows(sigmas, 4, conv)
    s0, s1 = sigmas[0], sigmas[1]
    if s1 > 0:
        dt = s1 - s0
        k = dt / (2.0 * s1)
        corr, second = coef_tables._conv_row(conv, s1, a=1.0 + k, b=-k, c=-dt / 2.0), s1
    else:
        corr, second = coefs.row(**_NO_MODEL), math.nan
    # corrector rows N..2N-1 as in every two-call plan (coef_tables.fold_second_calls reads them all); only step 0
    # has a second call
    filler = [coefs.row(**_NO_MODEL)] * (n - 1)
    return coef_tables._plan(rows + [corr] + filler, list(sigmas[:-1]) + [second] + [math.nan] * (n - 1),
                             sigmas[:-1], corrector=[not math.isnan(second)] + [False] * (n - 1), corrector_row=n,
                             history=3)


def ipndm_v_weights(sigmas, i: int, order: int) -> tuple:
    """ComfyUI's ``ipndm_v`` weights (zju-pi's diff-sampler) of step i at ``order`` (1 to 4, at most i + 1) on the
    actual steps h = sigma_{i+1} - sigma_i, h1 = sigma_i - sigma_{i-1}, h2, h3 (index 0: the newest eps). Order 2 is
    the exact variable-step Adams-Bashforth rule; orders 3 and 4 are ComfyUI's formula as published, which reduces to
    AB3 on equal steps but is not the variable-step AB3/AB4 (its order-4 weights sum to 1 only where the last step
    ratios are equal, and give (57, -65, 43, -11)/24 on equal steps): ``tests/test_ipndm_v.py`` measures the order."""
    if order == 1:
        return (1.0,)
    hs = [sigmas[i + 1] - sigmas[i]] + [sigmas[i - j] - sigmas[i - j - 1] for j in range(order - 1)]
    h, h1 = hs[0], hs[1]
    q = h / h1
    if order == 2:
        return (1.0 + q / 2.0, -q / 2.0)
    h2 = hs[2]
    a = h1 / h2
    t1 = (1.0 - h * h / (3.0 * h1 * (h1 + h2))) / 2.0
    if order == 3:
        return (1.0 + q / 2.0 + t1, -q / 2.0 - (1.0 + a) * t1, a * t1)
    h3 = hs[3]
    b = h1 * (h1 + h2) / (h2 * (h2 + h3))
    s1, s2 = h + h1, h + h1 + h2
    t2 = (((1.0 - h / (3.0 * s1)) / 2.0 + (1.0 - h / (2.0 * s1)) * h / (6.0 * s2))
          * h * s1 * s2 / (h1 * (h1 + h2) * (h1 + h2 + h3)))
    return (1.0 + q / 2.0 + t1 + t2, -q / 2.0 - (1.0 + a) * t1 - (1.0 + a + b) * t2,
            a * t1 + (a + b * (1.0 + h2 / h3)) * t2, -a * b * t2)


def ipndm_v(sigmas, *, max_order: int = 4, conv: Conv = _identity) -> Plan:
    """ComfyUI's ``ipndm_v`` on VE ``sigmas``: step i ``x' = x + dt*(w0*e_i + w1*H + w2*H2 + w3*H3)`` with
    :func:`ipndm_v_weights` of order min(i + 1, ``max_order``) (1 to 4), history = eps (depth ``max_order - 1``, at
    most the steps taken); a step to sigma 0 is the jump x' = D (ComfyUI's "denoising step")."""
    if isinstance(max_order, bool) or not isinstance(max_order, numbers.Integral) or max_order not in AB_WEIGHTS:
        raise ValueError(f"max_order: expected 1, 2, 3 or 4, got {max_order!r}")
    rows = []
    for i, (s, sn) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        if sn == 0:
            rows.append(_jump_row(conv, s))
            continue
        eps = {"e": 1.0 / s, "f": -1.0 / s}
        r, one_minus_r = coef_tables._ratio(s, sn)
        w = ipndm_v_weights(sigmas, i, min(i + 1, int(max_order)))
        hist = dict(zip(("c", "c2", "c3"), ((sn - s) * wj for wj in w[1:])))
        rows.append(coef_tables._conv_row(conv, s, a=1.0 - w[0] * one_minus_r, b=w[0] * one_minus_r, **hist, **eps))
    n = len(sigmas) - 1
    return coef_tables._plan(rows, sigmas[:-1], sigmas[:-1], history=min(int(max_order), n) - 1)
