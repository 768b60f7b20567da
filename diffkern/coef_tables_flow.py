"""Host-side float64 tables of Heun's method in flow time (diffusers' ``FlowMatchHeunDiscreteScheduler``).

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

from .coef_tables import Conv, Plan, _conv_row, _identity, _NO_MODEL, _ratio, _two_eval_plan
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
