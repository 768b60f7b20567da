"""Host-side float64 tables of Heun's method in flow time (diffusers' ``FlowMatchHeunDiscreteScheduler``), and of
ComfyUI's ``_RF`` ancestral samplers (its split in flow time, :func:`rf_ancestral_step`; below).

The flow-matching state ``x_t = (1 - t)*x0 + t*n`` is the VE state ``x = x_t*(1 + sigma)`` at ``sigma = t/(1 - t)``
(:func:`diffkern.diffusers.loop_spec.flow_spec`), and the flow velocity of a denoiser D is ``v = (x_t - D)/t``. Flow
Euler ``x_t' = x_t + (t' - t)*v`` is VE Euler on those sigmas, but Heun is not invariant under the time-dependent
change of variables: flow-time Heun averages the velocities ``x_t' = x_t + (t' - t)*(v1 + v2)/2``, which is not the
average of the VE slopes (``coef_tables.heun``). In VE coordinates, with ``t = sigma/(1 + sigma)``:

- predictor (row i, model at sigma): VE Euler to sigma', ``x^E = D + sigma'*(x - D)/sigma``, storing
  ``H = v1 = x/sigma - (1 + sigma)/sigma*D`` (``x_t = x/(1 + sigma)``);
- corrector (row N + i, model at sigma'): ``v2 = (x^E - (1 + sigma')*D2)/sigma'`` and
  ``x' = (1 + sigma')*(x_t^E + (t' - t)/2*(v2 - v1)) = x^E + K*(v2 - H)`` with ``K = (1 + sigma')*(t' - t)/2``:
  ``a = 1 + K/sigma'``, ``b = -K*(1 + sigma')/sigma'``, ``c = -K``; no corrector on a step to sigma' = 0.

``K`` is computed as ``(sigma' - sigma)/(2*(1 + sigma))`` (the same value, no cancellation of t' - t), so the top of a
flow schedule, t = 1 at the finite stand-in ``sigma = 2^70`` (``loop_spec.FLOW_TOP``), gives ``e = 2^-70``,
``f = -1`` and ``K = -1/2`` to float64 rounding: ``H = x_t - D = v`` exactly, the velocity at t = 1.
"""
from __future__ import annotations

import math

from .coef_tables import (Conv, Plan, _ancestral_rows, _conv_row, _dpm_2_rows, _identity, _NO_MODEL, _ratio, _slope_row,
                          _two_eval_plan, euler_ancestral)
from .ops import coefs


def _check_sigmas(sigmas) -> list[float]:
    sig = [float(s) for s in sigmas]
    if len(sig) < 2 or any(not math.isfinite(s) or s < 0 for s in sig) or sig[0] <= 0:
        raise ValueError(f"sigmas: expected N+1 >= 2 finite values >= 0 with sigmas[0] > 0, got {sig}")
    # a repeated sigma > 0 is a zero-length step (rows of the identity: r = 1, K = 0); a repeated 0 is no step
    if any(b > a or b == a == 0 for a, b in zip(sig[:-1], sig[1:])):
        raise ValueError(f"sigmas: expected non-increasing values (repeats only above 0), got {sig}")
    return sig


def heun_flow(sigmas, *, conv: Conv = _identity) -> Plan:
    """Heun in flow time t = sigma/(1 + sigma) on VE ``sigmas`` (host list of N+1 floats, decreasing, possibly
    ending in 0; a repeated value is a zero-length step, x unchanged): rows 0..N-1 predictors (Euler, storing the flow velocity v1 in history), rows N..2N-1
    correctors at sigma_next (none where sigma_next = 0). ``conv(sigma)``: the model-output conversion of a row."""
    sig = _check_sigmas(sigmas)
    pred, corr, seconds = [], [], []
    for s, sn in zip(sig[:-1], sig[1:]):
        r, one_minus_r = _ratio(s, sn)
        pred.append(_conv_row(conv, s, a=r, b=one_minus_r, e=1.0 / s, f=-(1.0 + s) / s))
        if sn > 0:
            k = (sn - s) / (2.0 * (1.0 + s))  # (1 + sigma')*(t' - t)/2
            corr.append(_conv_row(conv, sn, a=1.0 + k / sn, b=-k * (1.0 + sn) / sn, c=-k))
            seconds.append(sn)
        else:
            corr.append(coefs.row(**_NO_MODEL))
            seconds.append(math.nan)
    return _two_eval_plan(pred, corr, seconds, sig[:-1])

#----------------------------------------------------------------------------
# ComfyUI's _RF ancestral samplers (comfy/k_diffusion/sampling.py: sample_euler_ancestral_RF, sample_dpm_2_ancestral_RF,
# sample_dpmpp_2s_ancestral_RF), which ComfyUI runs for a flow (CONST) model on its flow sigmas t: with
# t_down = t_next*(1 + eta*(t_next/t - 1)), a step to t_down, then z *= (1 - t_next)/(1 - t_down) plus
# sqrt(t_next^2 - t_down^2 (1 - t_next)^2/(1 - t_down)^2) noise. On the VE state x = z/(1 - t) at sigma = t/(1 - t)
# the rescale and noise are exactly the VE ancestral noise sqrt(sigma_next^2 - sigma_down^2) at
# sigma_down = t_down/(1 - t_down), so euler and DPM-Solver++(2S) are k-diffusion's VE rows with that sigma_down;
# DPM-Solver-2 takes its midpoint (geometric in t) and slope (the velocity (z - D)/t) in flow time: other rows.


def rf_ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of ComfyUI's ``_RF`` split in VE coordinates (``sigma_up = sqrt(sigma_next^2 -
    sigma_down^2)``). With ``u = eta*(1 - t_next/t) = eta*(sigma - sigma_next)/(sigma*(1 + sigma_next))``,
    ``t_down = t_next*(1 - u)`` and ``sigma_down = sigma_next*(1 - u)/(1 + sigma_next*u)``, computed so (no 1 - t
    cancels near t = 1, nor sigma_next - sigma_down at small eta). Raises ValueError naming eta where t_down <= 0
    (u >= 1, only for eta > 1; ComfyUI's loop then leaves the model's range or takes a NaN square root)."""
    if eta == 0 or sigma_next == 0:
        return sigma_next, 0.0
    u = eta * (sigma - sigma_next) / (sigma * (1.0 + sigma_next))
    if u >= 1.0:
        t, tn = sigma / (1.0 + sigma), sigma_next / (1.0 + sigma_next)
        raise ValueError(f"eta: split='rf' needs t_down = t_next*(1 + eta*(t_next/t - 1)) > 0 on every step to "
                         f"t_next > 0 (t = sigma/(1 + sigma)), i.e. eta < t/(t - t_next) = {t / (t - tn)!r} on the "
                         f"step t = {t!r} -> {tn!r}; got eta = {eta!r}")
    down = sigma_next * (1.0 - u) / (1.0 + sigma_next * u)
    gap = sigma_next * u * (1.0 + sigma_next) / (1.0 + sigma_next * u)  # sigma_next - sigma_down
    return down, math.sqrt(gap * (sigma_next + down))


def euler_ancestral_rf(sigmas, *, eta=1.0, s_noise=1.0, conv: Conv = _identity) -> Plan:
    """ComfyUI's ``sample_euler_ancestral_RF`` on VE ``sigmas``: :func:`diffkern.coef_tables.euler_ancestral` with the
    ``_RF`` split (:func:`rf_ancestral_step`)."""
    return euler_ancestral(sigmas, eta=eta, s_noise=s_noise, conv=conv, down_up=rf_ancestral_step)


_T_TOP_MID = 0.9999  # ComfyUI's second-call flow time of a DPM-Solver++(2S) step from t = 1 (its midpoint is 1 there)


def _rf_2s_rows(conv: Conv, sigma: float, down: float, noise: float):
    """``coef_tables._dpmpp_2s_rows`` at ComfyUI's midpoint: geometric in sigma (its log-SNR midpoint) but for a step
    from t = 1 (sigma/(1 + sigma) rounding to 1, e.g. ``loop_spec.FLOW_TOP``), where it takes t = 0.9999."""
    if down == 0:
        return _slope_row(conv, sigma, 0.0, noise), coefs.row(**_NO_MODEL), math.nan
    top = sigma / (1.0 + sigma) == 1.0
    mid = _T_TOP_MID / (1.0 - _T_TOP_MID) if top else math.exp(0.5 * (math.log(sigma) + math.log(down)))
    r, one_minus_r = _ratio(sigma, down)
    return (_slope_row(conv, sigma, mid),
            _conv_row(conv, mid, a=r, b=one_minus_r, c=-down * math.expm1(math.log(mid / sigma)), s=noise), mid)


def dpmpp_2s_ancestral_rf(sigmas, *, eta=1.0, s_noise=1.0, conv: Conv = _identity) -> Plan:
    """ComfyUI's ``sample_dpmpp_2s_ancestral_RF`` on VE ``sigmas``: k-diffusion's DPM-Solver++(2S) rows
    (:func:`diffkern.coef_tables.dpmpp_2s_ancestral`) to the ``_RF`` sigma_down, second call at the log-midpoint
    (ComfyUI's lambda = log((1 - t)/t) = -log sigma midpoint), or at t = 0.9999 on a step from t = 1."""
    return _two_eval_plan(*_ancestral_rows(_rf_2s_rows, sigmas, eta, s_noise, conv, down_up=rf_ancestral_step),
                          sigmas[:-1])


def _rf_dpm_2_rows(conv: Conv, sigma: float, down: float, noise: float):
    """ComfyUI's DPM-Solver-2 step in flow time from t to t_down, then its rescale and noise, on the VE state.

    Flow: ``z2 = z + (t_m - t)*v``, ``t_m = sqrt(t*t_down)``, v = (z - D)/t; ``z' = z + (t_down - t)*(z2 - D2)/t_m``;
    then ``(1 - t_next)/(1 - t_down)*z' + noise``. The predictor is VE DDIM to ``sigma_m = t_m/(1 - t_m)`` storing
    H = (x - D)/sigma (x = x2 + (sigma - sigma_m)*H); with c_t = 1 - t = 1/(1 + sigma) the corrector is
    ``x' = c_t*((1 + sd) + (sd - sigma)/sigma_m)*x2 - c_t*(sd - sigma)/t_m*D2 + c_t*(sigma - sigma_m)*(1 + sd)*H``.
    sigma_down = 0 (the step to 0): Euler to 0, no noise (ComfyUI's branch)."""
    if down == 0:
        return _dpm_2_rows(conv, sigma, 0.0, 0.0)
    ct, t, td = 1.0 / (1.0 + sigma), sigma / (1.0 + sigma), down / (1.0 + down)
    tm = math.sqrt(t * td)
    mid = tm * (1.0 + tm) / (ct + t / (1.0 + down))  # t_m/(1 - t_m), 1 - t*t_down = c_t + t*(1 - t_down)
    corr = _conv_row(conv, mid, a=ct * ((1.0 + down) + (down - sigma) / mid), b=-ct * (down - sigma) / tm,
                     c=ct * (sigma - mid) * (1.0 + down), s=noise)
    return _slope_row(conv, sigma, mid), corr, mid


def dpm_2_ancestral_rf(sigmas, *, eta=1.0, s_noise=1.0, conv: Conv = _identity) -> Plan:
    """ComfyUI's ``sample_dpm_2_ancestral_RF`` on VE ``sigmas`` (:func:`_rf_dpm_2_rows`, ``_RF`` split): rows
    0..N-1 predictors, N..2N-1 correctors (none on a step to 0, which is Euler)."""
    return _two_eval_plan(*_ancestral_rows(_rf_dpm_2_rows, sigmas, eta, s_noise, conv, down_up=rf_ancestral_step),
                          sigmas[:-1])
