"""ER-SDE-Solver-3 (Cui et al. 2023, "Elucidating the solution space of extended reverse-time SDEs", arXiv
2309.06169), as ComfyUI's ``sample_er_sde`` runs it, as one fused row per step (history = the previous two D).

In VE coordinates the solver's lambda is sigma itself (ComfyUI's VP/VE path; its rectified-flow path, lambda =
sigma/(1 - sigma) with alpha = 1 - sigma, is the same update in these coordinates). With the noise scaler
``ns(l) = l (e^(l^0.3) + 10)`` (ComfyUI's default) and r = ns(sigma')/ns(sigma), step i (stage k = min(max_stage,
i + 1)):

    x' = r x + (1 - r) D
         + (dt + S1 ns(sigma')) Dd                  (k >= 2; dt = sigma' - sigma, Dd = (D - D_1)/(sigma - sigma_{-1}))
         + (dt^2/2 + S2 ns(sigma')) Du              (k = 3;  Du = (Dd - Dd_1)/((sigma - sigma_{-2})/2))
         + s_noise sqrt(sigma'^2 - sigma^2 r^2) xi

S1 = sum_k 1/ns(l_k) dl and S2 = sum_k (l_k - sigma)/ns(l_k) dl are ComfyUI's left Riemann sums on 200 points
l_k = sigma' + k dl, dl = (sigma - sigma')/200 (the solver as published, not the exact integrals). Dd and Du are
linear in D, D_1 = the previous step's D and D_2 the one before, so the row reads them as H and H2. A step to
sigma' = 0 is the jump x' = D.
"""
from __future__ import annotations

import math
import numbers

import torch

from .coef_tables import Conv, Plan, _conv_row, _identity, _plan

POINTS = 200  # ComfyUI's num_integration_points
STAGES = (1, 2, 3)


def log_noise_scaler(lam: float) -> float:
    """ln of ComfyUI's default ER-SDE noise scaler ``ns(l) = l (e^(l^0.3) + 10)``, finite for any finite l > 0 (ns
    itself overflows from l ~ 4e8: the VE sigma 2^70 of a flow schedule's t = 1 is 2^70)."""
    u = lam ** 0.3
    return math.log(lam) + u + math.log1p(10.0 * math.exp(-u))


def noise_scaler(lam: float) -> float:
    """ComfyUI's default ER-SDE noise scaler ``l (e^(l^0.3) + 10)`` (inf where it overflows)."""
    log_ns = log_noise_scaler(lam)
    return math.exp(log_ns) if log_ns < 709.0 else math.inf


def custom_log_scaler(noise_scaler):
    """ln of a ComfyUI-style ``noise_scaler(lambda_tensor) -> tensor`` (called on float64 CPU tensors, one value or
    a vector, as ComfyUI calls it on its sigma tensors), checked finite and > 0 where it is evaluated."""
    if not callable(noise_scaler):
        raise TypeError(f"noise_scaler: expected None or a callable noise_scaler(lambda) -> tensor, got "
                        f"{type(noise_scaler).__name__}")

    def log_ns(lams):
        lam = torch.tensor(lams, dtype=torch.float64)
        out = noise_scaler(lam)
        if not isinstance(out, torch.Tensor) or out.shape != lam.shape:
            raise TypeError(f"noise_scaler: expected it to return a tensor of its input's shape {tuple(lam.shape)}, "
                            f"got {out!r}")
        out = out.to(torch.float64)
        if not bool(torch.isfinite(out).all()) or bool((out <= 0).any()):
            raise ValueError(f"noise_scaler: expected finite values > 0, got {out.tolist()} at {lam.tolist()}")
        return out.log().tolist()
    return log_ns


def _default_log(lams):
    return [log_noise_scaler(v) for v in lams]


def _sums(sigma: float, sigma_next: float, log_ns=_default_log) -> tuple[float, float]:
    """(S1, S2): ComfyUI's Riemann sums of 1/ns and (l - sigma)/ns over [sigma', sigma)."""
    dl = (sigma - sigma_next) / POINTS
    pos = [sigma_next + k * dl for k in range(POINTS)]
    inv = [math.exp(-v) for v in log_ns(pos)]
    return sum(inv) * dl, sum((p - sigma) * w for p, w in zip(pos, inv)) * dl


def er_sde(sigmas, *, s_noise: float = 1.0, max_stage: int = 3, conv: Conv = _identity, noise_scaler=None) -> Plan:
    """ER-SDE rows on the N+1 decreasing VE ``sigmas`` (the last may be 0); every row writes D as history (depth
    ``max_stage - 1``, at most the steps taken). ``noise_scaler``: None (ComfyUI's default, :func:`noise_scaler`) or
    ComfyUI's callable (:func:`custom_log_scaler`)."""
    if isinstance(max_stage, bool) or not isinstance(max_stage, numbers.Integral) or max_stage not in STAGES:
        raise ValueError(f"max_stage: expected 1, 2 or 3, got {max_stage!r}")
    log_ns = _default_log if noise_scaler is None else custom_log_scaler(noise_scaler)
    rows = []
    for i, (s, sn) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        if sn == 0:
            rows.append(_conv_row(conv, s, a=0.0, b=1.0, f=1.0))
            continue
        stage = min(int(max_stage), i + 1)
        log_sn, log_s = log_ns([sn, s])
        log_r = log_sn - log_s
        r = math.exp(log_r)
        coef = {"a": r, "b": 1.0 - r, "c": 0.0, "c2": 0.0}  # on x, D, D_1, D_2
        if stage >= 2:
            dt = sn - s
            s1, s2 = _sums(s, sn, log_ns)
            ns_next = math.exp(log_sn) if log_sn < 709.0 else math.inf
            k2 = (dt + s1 * ns_next) / (s - sigmas[i - 1])  # times (D - D_1)
            coef["b"] += k2
            coef["c"] -= k2
            if stage == 3:
                k3 = (dt * dt / 2.0 + s2 * ns_next) * 2.0 / (s - sigmas[i - 2])  # times (Dd - Dd_1)
                d_prev = 1.0 / (sigmas[i - 1] - sigmas[i - 2])  # Dd_1 = (D_1 - D_2) * d_prev
                coef["b"] += k3 / (s - sigmas[i - 1])
                coef["c"] -= k3 / (s - sigmas[i - 1]) + k3 * d_prev
                coef["c2"] += k3 * d_prev
        sigma_r = math.exp(math.log(s) + log_r)  # sigma*r without overflow
        std = s_noise * math.sqrt(max(sn * sn - sigma_r * sigma_r, 0.0))
        rows.append(_conv_row(conv, s, s=std, f=1.0, **coef))
    n = len(sigmas) - 1
    return _plan(rows, sigmas[:-1], sigmas[:-1], history=min(int(max_stage), n) - 1)
