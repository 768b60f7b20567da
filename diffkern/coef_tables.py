"""Host-side float64 coefficient tables of every sampler (``math-samplers.md`` sections 2, 3, 6, 7).

Each builder resolves all of its sampler's branches (first step, last step to sigma_next = 0, churn
window, eta = 0) on the host copy of the schedule and returns a :class:`Plan`: a table of rows for
:func:`diffkern.ops.sampler_step` (slot semantics in :mod:`diffkern.ops.coefs`) plus the host facts the
loop needs. The loop then only indexes rows; it never branches on a device value.

Conventions: ``sigmas`` is a host list of N+1 floats, strictly decreasing; ``conv(sigma)`` gives the
model-output conversion of a row that reads the model at ``sigma`` (``{}`` for a model returning D,
``{"p": ..., "q": ..., "w": ...}`` for the fused conversion of a raw network output). Every row index
is also the Philox step counter of that row, so no two noise draws of one call share counters.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping

import torch

from . import coef_columns
from .ops import coefs

Conv = Callable[[float], Mapping[str, float]]
_NO_MODEL = {"p": 0.0, "q": 0.0}  # rows that do not read the model output (churn noise)


def _identity(sigma: float) -> dict:
    return {}


@dataclasses.dataclass
class Plan:
    """A sampler's host-resolved schedule.

    table: float64 (R, NCOEF) CPU table; row k is one fused step (Philox step counter k).
    row_sigma: length R, the sigma at which row k reads the model (nan where it does not).
    sigma_hat: length N, the sigma of step i's first model call (after churn).
    churn: length N, True where step i adds churn noise (row ``churn_row + i``) before its model call.
    corrector: length N, True where step i has a second model call (row ``corrector_row + i``, at its row_sigma:
        sigma_next for Heun, a midpoint for the DPM-Solver-2 family).
    history: how many previous values the loop keeps (0 to 3): H, H2, H3 = the values written by the first calls
        of the previous one, two, three steps (slots c, c2, c3). A corrector call reads H = the value its own
        step's first call wrote, H2 the previous step's, H3 the one before, and writes none.
    step_row: the row of step 0's first call (step i's is ``step_row + i``); 0 but in a window of a longer loop
        (:func:`diffkern.sampler_loop.windowed`).
    """
    table: torch.Tensor
    row_sigma: list
    sigma_hat: list
    churn: list
    corrector: list
    churn_row: int = 0
    corrector_row: int = 0
    history: int = 0
    step_row: int = 0

    def __post_init__(self):
        if self.history not in (0, 1, 2, 3) or isinstance(self.history, bool):
            raise ValueError(f"history: expected a depth of 0, 1, 2 or 3, got {self.history!r}")
        # The loop allocates `history` buffers only, and a device table is not checked per call (a CUDA kernel
        # given no history2 drops a c2 term silently); rows that read a value no earlier step wrote would read
        # zeros eagerly but the previous run's values in a CUDA-graph replay.
        for depth, slot in enumerate((coefs.C, coefs.C2, coefs.C3), start=1):
            used = (self.table[:, slot] != 0).tolist()
            if any(used) and self.history < depth:
                raise ValueError(f"history: depth {self.history} is too small for the table (non-zero "
                                 f"{coefs.SLOT_NAMES[slot]} needs {depth})")
            # H_depth of step i is written by step i - depth (a corrector's by step i - depth + 1)
            for i in range(self.steps):
                reads = i < depth and self.step_row + i < len(used) and used[self.step_row + i]
                reads_c = i + 1 < depth and self.corrector[i] and used[self.corrector_row + i]
                if reads or reads_c:
                    raise ValueError(f"table: step {i} reads history {depth} ({coefs.SLOT_NAMES[slot]} != 0 on its "
                                     f"{'corrector ' if reads_c else ''}row), which no earlier call has written")

    @property
    def steps(self) -> int:
        return len(self.sigma_hat)


def history_slots(buffers, i: int) -> tuple:
    """``(history, history2, history3, history_out)`` of step i's first call over a plan's ``history`` buffers
    (0 to 4 of them; absent ones are None; the op reads at most three: a fourth, LMS's, keeps one more D alive).

    With depth n, step i reads H_j = D_{i-j} from buffer (i - j) % n (j = 1..n) and writes D_i over the oldest,
    buffer i % n (read as H_n in the same pass: the op allows exact in-place use). The buffers rotate without a
    copy, and the assignment depends on i alone, so a captured graph replays the one an eager loop uses. A
    corrector call of step i reads ``history_slots(buffers, i + 1)[:3]``: H = D_i, just written."""
    n = len(buffers)
    if n == 0:
        return None, None, None, None
    hs = [buffers[(i - j) % n] for j in range(1, n + 1)] + [None] * (3 - n)
    return hs[0], hs[1], hs[2], buffers[i % n]


def _plan(rows, row_sigma, sigma_hat, **kw) -> Plan:
    n = len(sigma_hat)
    kw.setdefault("churn", [False] * n)
    kw.setdefault("corrector", [False] * n)
    return Plan(coefs.table(rows), list(row_sigma), list(sigma_hat), **kw)


def _conv_row(conv: Conv, sigma: float, **c: float) -> list[float]:
    return coefs.row(**c, **conv(sigma))


def _ratio(sigma: float, sigma_next: float) -> tuple[float, float]:
    """(r, 1 - r) for r = sigma_next/sigma, with 1 - r as -expm1(-h) (h = ln(sigma/sigma_next)) for accuracy."""
    if sigma_next == 0:
        return 0.0, 1.0
    return sigma_next / sigma, -math.expm1(math.log(sigma_next / sigma))

#----------------------------------------------------------------------------
# Churn (Karras et al. 2022, Algorithm 2): one helper for Euler and Heun.


def churn_sigmas(sigmas, s_churn: float, s_tmin: float, s_tmax: float) -> list[float]:
    """sigma_hat_i = sigma_i*(1 + gamma_i), gamma_i = min(s_churn/N, sqrt(2)-1) inside [s_tmin, s_tmax], else 0."""
    n = len(sigmas) - 1
    gamma = min(s_churn / n, math.sqrt(2.0) - 1.0)
    return [s * (1.0 + gamma) if gamma > 0 and s_tmin <= s <= s_tmax else s for s in sigmas[:-1]]


def _churn_rows(sigmas, sigma_hat, s_noise: float) -> tuple[list, list[bool]]:
    """Noise rows ``x += s_noise*sqrt(sigma_hat^2 - sigma^2)*xi`` (a=1, b=q=p=0) and where they apply; no rows
    where none applies: rows that would never run (a third of Heun's table, which a diffusers scheduler builds at its
    first step) are not built; the rows before them, hence their Philox counters, stay the same."""
    stds = [s_noise * math.sqrt(max(sh * sh - s * s, 0.0)) for s, sh in zip(sigmas[:-1], sigma_hat)]
    on = [sh > s and std > 0 for s, sh, std in zip(sigmas[:-1], sigma_hat, stds)]
    return ([coefs.row(a=1.0, s=std, **_NO_MODEL) for std in stds] if any(on) else []), on

#----------------------------------------------------------------------------
# Samplers. Rows: step i at row i; extra rows (churn, corrector) in blocks after the N step rows.


def euler(sigmas, *, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0, conv: Conv = _identity) -> Plan:
    """Euler (= deterministic DDIM in VE coordinates) with optional churn: ``x' = r*x + (1-r)*D``,
    ``r = sigma_next/sigma_hat``; rows 0..N-1 steps, N..2N-1 churn noise (none when no step churns)."""
    n = len(sigmas) - 1
    sigma_hat = churn_sigmas(sigmas, s_churn, s_tmin, s_tmax)
    steps = []
    for i in range(n):
        r, one_minus_r = _ratio(sigma_hat[i], sigmas[i + 1])
        steps.append(_conv_row(conv, sigma_hat[i], a=r, b=one_minus_r))
    churn_rows, churn = _churn_rows(sigmas, sigma_hat, s_noise)
    return _plan(steps + churn_rows, sigma_hat + [math.nan] * len(churn_rows), sigma_hat, churn=churn, churn_row=n)


def ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of k-diffusion's ``get_ancestral_step`` (DDIM(eta) in VE coordinates)."""
    if eta == 0 or sigma_next == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2))
    return math.sqrt(sigma_next ** 2 - up ** 2), up


def euler_ancestral(sigmas, *, eta=1.0, s_noise=1.0, conv: Conv = _identity, down_up=ancestral_step) -> Plan:
    """Euler-ancestral (= DDIM(eta)): ``x' = (sd/sigma)*x + (1 - sd/sigma)*D + s_noise*su*xi``; ``down_up(sigma,
    sigma_next, eta) -> (sd, su)`` the split (:func:`ancestral_step`, or :mod:`diffkern.coef_tables_flow`'s)."""
    rows = []
    for s, sn in zip(sigmas[:-1], sigmas[1:]):
        down, up = down_up(s, sn, eta)
        r, one_minus_r = _ratio(s, down)
        rows.append(_conv_row(conv, s, a=r, b=one_minus_r, s=s_noise * up))
    return _plan(rows, sigmas[:-1], sigmas[:-1])


def heun(sigmas, *, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0, conv: Conv = _identity) -> Plan:
    """EDM Algorithm 2 (Heun with churn). Predictor (row i): Euler to sigma_next, storing its slope
    d = (x_hat - D)/sigma_hat in history. Corrector (row N+i, model at sigma_next): with x~ the predictor and
    d~ = (x~ - D~)/sigma_next, ``x' = x~ + dt/2 * (d~ - d)``, dt = sigma_next - sigma_hat, which equals Heun's
    average of slopes ``x_hat + (d + d~)/2 * dt`` exactly (x_hat is eliminated through the predictor). The
    stored slope, not the predictor's D: its rounding in a 16-bit history enters times dt/2 (as in diffusers'
    stored derivative), where D's would enter times dt/(2 sigma_next), large when sigma_next << sigma_hat.
    No corrector on a step to sigma_next = 0. Churn rows 2N..3N-1 (none when no step churns).
    Built column by column (:mod:`diffkern.coef_columns`: the rows of :func:`_slope_row` and ``_conv_row(conv, sn,
    a=1 + k, b=-k, c=-dt/2)``, bitwise): a diffusers Heun builds this at the first step() of every loop."""
    n = len(sigmas) - 1
    sigma_hat = churn_sigmas(sigmas, s_churn, s_tmin, s_tmax)
    nexts = sigmas[1:]
    ratios = [_ratio(sh, sn) for sh, sn in zip(sigma_hat, nexts)]
    dts = [sn - sh for sh, sn in zip(sigma_hat, nexts)]
    ks = [dt / (2.0 * sn) if sn > 0 else 0.0 for dt, sn in zip(dts, nexts)]
    has = [sn > 0 for sn in nexts]  # a corrector; else its row reads no model and does nothing
    zeros = [0.0] * n
    conv_at = {}  # conv once per sigma: sigma_next is the next predictor's sigma too (without churn)
    for v in sigma_hat + nexts:
        if v > 0 and v not in conv_at:
            conv_at[v] = conv(v)
    convs = [conv_at[sh] for sh in sigma_hat] + [conv_at[sn] if h else _NO_MODEL for sn, h in zip(nexts, has)]
    columns = {"a": [r for r, _ in ratios] + [1.0 + k if h else 0.0 for k, h in zip(ks, has)],
               "b": [m for _, m in ratios] + [-k if h else 0.0 for k, h in zip(ks, has)],
               "c": zeros + [-dt / 2.0 if h else 0.0 for dt, h in zip(dts, has)],
               "e": [1.0 / sh for sh in sigma_hat] + zeros, "f": [-1.0 / sh for sh in sigma_hat] + zeros}
    churn_rows, churn = _churn_rows(sigmas, sigma_hat, s_noise)
    seconds = [sn if h else math.nan for sn, h in zip(nexts, has)]
    return Plan(coef_columns.table(2 * n, columns, convs, churn_rows), sigma_hat + seconds + [math.nan] *
                len(churn_rows), list(sigma_hat), churn=churn, churn_row=2 * n, corrector=has, corrector_row=n,
                history=1)


def _slope_row(conv: Conv, sigma: float, target: float, noise: float = 0.0) -> list:
    """Euler/DDIM from sigma to target (``r x + (1 - r) D``, + noise), storing the slope d = (x - D)/sigma in
    history: the first call of the two-call steps (heun and the DPM-Solver-2 family below)."""
    r, one_minus_r = _ratio(sigma, target)
    return _conv_row(conv, sigma, a=r, b=one_minus_r, s=noise, e=1.0 / sigma, f=-1.0 / sigma)


def fold_second_calls(plan: Plan) -> Plan:
    """``plan`` with each second-call row's conversion folded into its update, for loops that never read such a
    row's x0 (:mod:`diffkern.samplers`; diffusers' Heun/KDPM2 ``step`` does, and keeps the unfolded rows).

    ``out = a x + b (p x + q m)`` becomes ``(a + b p) x + (b q) m`` where the row has no clip and no g term. For
    an eps network (p = 1, q = -sigma) Heun's ``(1 + k) x2 - k D2`` turns into ``x2 + k sigma eps``: float32 no
    longer rounds two products |k| times the result (k = -2e4 on 2 Karras steps 80 -> 0.002, where this cut
    the float32 error from 2.4e-3 to 2.8e-5)."""
    table = plan.table.clone()
    for i, second in enumerate(plan.corrector):
        r = table[plan.corrector_row + i]
        a, b, p, q, g, clip = (float(r[k]) for k in (coefs.A, coefs.B, coefs.P, coefs.Q, coefs.G, coefs.CLIP))
        if second and p != 0 and g == 0 and math.isinf(clip):
            r[coefs.A], r[coefs.B], r[coefs.P], r[coefs.Q] = a + b * p, b * q, 0.0, 1.0
    return dataclasses.replace(plan, table=table)


def _two_eval_plan(pred, corr, seconds, sigma_hat, churn_rows=(), churn=None) -> Plan:
    """Plan of N first-call rows, N second-call rows whose model sigma is ``seconds`` (nan: no second call) and
    optional churn rows: rows 0..N-1, N..2N-1, 2N..3N-1."""
    n = len(pred)
    corrector = [not math.isnan(m) for m in seconds]
    return _plan(pred + corr + list(churn_rows), list(sigma_hat) + seconds + [math.nan] * len(churn_rows), sigma_hat,
                 churn=churn or [False] * n, churn_row=2 * n, corrector=corrector, corrector_row=n, history=1)


def dpmpp_2m(sigmas, *, conv: Conv = _identity) -> Plan:
    """DPM-Solver++(2M) (Lu et al. 2022) as k-diffusion's ``sample_dpmpp_2m``; history = previous D.
    First step and the step to 0: Euler/DDIM. Else ``D_bar = (1 + 1/(2 rho))*D - D_prev/(2 rho)``,
    ``rho = h_last/h``, ``x' = r*x + (1-r)*D_bar``."""
    rows = []
    for i, (s, sn) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        r, one_minus_r = _ratio(s, sn)
        if i == 0 or sn == 0:
            rows.append(_conv_row(conv, s, a=r, b=one_minus_r, f=1.0))
            continue
        rho = math.log(sigmas[i - 1] / s) / math.log(s / sn)
        rows.append(_conv_row(conv, s, a=r, b=one_minus_r * (1 + 1 / (2 * rho)), c=-one_minus_r / (2 * rho), f=1.0))
    return _plan(rows, sigmas[:-1], sigmas[:-1], history=1)


SOLVER_TYPES = ("midpoint", "heun")


def dpmpp_2m_sde(sigmas, *, eta=1.0, s_noise=1.0, solver_type="midpoint", conv: Conv = _identity) -> Plan:
    """DPM-Solver++(2M) SDE (k-diffusion's ``sample_dpmpp_2m_sde``; diffusers' "sde-dpmsolver++" at eta = 1),
    history = previous D. With h = ln(sigma/sigma_next), H = (1 + eta) h, phi = 1 - e^-H:
    ``x' = e^-H x + phi D + k/rho (D - D_prev) + s_noise sigma_next sqrt(1 - e^(-2 eta h)) xi``, k = phi/2
    (midpoint) or 1 - phi/H (heun), rho = h_last/h; the first step has no D_prev term, the step to 0 is the
    jump x' = D. eta = 0 with midpoint is DPM-Solver++(2M)."""
    rows = []
    for i, (s, sn) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        if sn == 0:
            rows.append(_conv_row(conv, s, a=0.0, b=1.0, f=1.0))
            continue
        h = math.log(s / sn)
        if h == 0:  # a scheduler's last step from sigma_min to itself: the identity (diffusers' heun: 0/0)
            rows.append(_conv_row(conv, s, a=1.0, f=1.0))
            continue
        big_h = (1.0 + eta) * h
        phi = -math.expm1(-big_h)
        noise = s_noise * sn * math.sqrt(max(-math.expm1(-2.0 * eta * h), 0.0))
        row = dict(a=math.exp(-big_h), b=phi, s=noise, f=1.0)
        if i > 0:
            rho = math.log(sigmas[i - 1] / s) / h
            k = 0.5 * phi if solver_type == "midpoint" else 1.0 - phi / big_h
            row.update(b=phi + k / rho, c=-k / rho)
        rows.append(_conv_row(conv, s, **row))
    return _plan(rows, sigmas[:-1], sigmas[:-1], history=1)


def ge(sigmas, *, gamma=2.0, mu=0.0, conv: Conv = _identity) -> Plan:
    """Permenter & Yuan's family (smalldiffusion ``samples(gam, mu)``), history = previous eps:
    ``x' = x + (sigma_p - sigma)*(gamma*eps + (1-gamma)*eps_prev) + sqrt(sigma_next^2 - sigma_p^2)*xi``,
    ``sigma_p = (sigma_next/sigma^mu)^(1/(1-mu))``, eps = (x - D)/sigma; gamma = 1 on the first step.
    A step to sigma_next = 0 is the jump x' = D (as ComfyUI's gradient-estimation sampler)."""
    rows = []
    for i, (s, sn) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        eps = {"e": 1.0 / s, "f": -1.0 / s}  # history_out = eps = (x - D)/sigma
        if sn == 0:
            rows.append(_conv_row(conv, s, a=0.0, b=1.0, **eps))
            continue
        g = 1.0 if i == 0 else gamma
        sigma_p = (sn / s ** mu) ** (1.0 / (1.0 - mu))
        dt = sigma_p - s
        rows.append(_conv_row(conv, s, a=1.0 + g * dt / s, b=-g * dt / s, c=dt * (1.0 - g),
                              s=math.sqrt(max(sn * sn - sigma_p * sigma_p, 0.0)), **eps))
    return _plan(rows, sigmas[:-1], sigmas[:-1], history=1)


INTEGRATORS = ("exponential", "euler_maruyama")


def sde(sigmas, *, lam=0.0, integrator="exponential", conv: Conv = _identity) -> Plan:
    """McAllester's reverse-SDE family with noise level lam (section 3.2); lam = 0 is the PF-ODE.
    exponential: ``a = r^(1+lam^2)``, ``b = 1-a``, ``s = sigma_next*sqrt(1 - r^(2 lam^2))``.
    euler_maruyama: ``a = 1 - c(1-r^2)``, ``b = c(1-r^2)``, ``s = lam*sqrt(sigma^2 - sigma_next^2)``,
    ``c = (1+lam^2)/2``. A step to sigma_next = 0 is the jump x' = D."""
    rows = []
    c_lam = (1.0 + lam * lam) / 2.0
    for s, sn in zip(sigmas[:-1], sigmas[1:]):
        r = sn / s
        if sn == 0:
            rows.append(_conv_row(conv, s, a=0.0, b=1.0))
        elif integrator == "exponential":
            a = r ** (1.0 + lam * lam)
            b = -math.expm1((1.0 + lam * lam) * math.log(r))
            rows.append(_conv_row(conv, s, a=a, b=b, s=sn * math.sqrt(max(-math.expm1(2 * lam * lam * math.log(r)), 0.0))))
        else:
            k = c_lam * (1.0 - r * r)
            rows.append(_conv_row(conv, s, a=1.0 - k, b=k, s=lam * math.sqrt(s * s - sn * sn)))
    return _plan(rows, sigmas[:-1], sigmas[:-1])

#----------------------------------------------------------------------------
# Two model calls per step at a midpoint sigma (k-diffusion's dpm_2, dpm_2_ancestral, dpmpp_2s_ancestral).
# Predictor (row i, model at sigma): Euler/DDIM to the log-midpoint sigma_mid = sqrt(sigma*target), storing the
# slope d = (x - D)/sigma in history. Corrector (row N+i, model at sigma_mid): x is eliminated through the
# predictor output x2 = x + (sigma_mid - sigma)*d, i.e. x = x2 + (sigma - sigma_mid)*H. The stored slope (as
# heun's): its 16-bit rounding enters times sigma - sigma_mid (dpm_2) or target*(1 - sigma_mid/sigma) (2S),
# i.e. scaled by the noise level like the state's own rounding, where a stored D would enter times
# sqrt(sigma/target) - 1 at any noise level.


def _midpoint_rows(conv: Conv, sigma: float, target: float) -> tuple[list, float]:
    """Predictor row (Euler to sigma_mid, history = slope) and sigma_mid = sqrt(sigma*target), target > 0."""
    mid = math.exp(0.5 * (math.log(sigma) + math.log(target)))
    return _slope_row(conv, sigma, mid), mid


def _dpm_2_rows(conv: Conv, sigma: float, target: float, noise: float):
    """k-diffusion's DPM-Solver-2 step from sigma to target, x' = x + d2*(target - sigma) (+ noise), with
    d2 = (x2 - D2)/sigma_mid: ``x' = (1 + k) x2 - k D2 + (sigma - sigma_mid) H``, k = (target - sigma)/sigma_mid.
    Returns (predictor row, corrector row, sigma_mid or nan)."""
    if target == 0:  # k-diffusion's Euler branch: no noise there
        return _slope_row(conv, sigma, 0.0), coefs.row(**_NO_MODEL), math.nan
    pred, mid = _midpoint_rows(conv, sigma, target)
    k = (target - sigma) / mid
    return pred, _conv_row(conv, mid, a=1.0 + k, b=-k, c=sigma - mid, s=noise), mid


def dpm_2(sigmas, *, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0, conv: Conv = _identity) -> Plan:
    """k-diffusion's ``sample_dpm_2`` (DPM-Solver-2 in sigma, midpoint in log sigma) with EDM churn: from sigma_hat,
    Euler to sigma_mid = sqrt(sigma_hat*sigma_next), then ``x' = x_hat + d(x2, sigma_mid)*(sigma_next - sigma_hat)``.
    The step to sigma_next = 0 is Euler (one model call). Rows: predictors 0..N-1, correctors N..2N-1, churn
    noise 2N..3N-1 (none when no step churns)."""
    n = len(sigmas) - 1
    sigma_hat = churn_sigmas(sigmas, s_churn, s_tmin, s_tmax)
    pred, corr, mids = map(list, zip(*(_dpm_2_rows(conv, sigma_hat[i], sigmas[i + 1], 0.0) for i in range(n))))
    churn_rows, churn = _churn_rows(sigmas, sigma_hat, s_noise)
    return _two_eval_plan(pred, corr, mids, sigma_hat, churn_rows, churn)


def _ancestral_rows(step_rows, sigmas, eta: float, s_noise: float, conv: Conv, down_up=ancestral_step):
    """(predictor rows, corrector rows, sigma_mids) of ``step_rows(conv, sigma, sigma_down, s_noise*sigma_up)``."""
    rows = []
    for s, sn in zip(sigmas[:-1], sigmas[1:]):
        down, up = down_up(s, sn, eta)
        rows.append(step_rows(conv, s, down, s_noise * up))
    return tuple(map(list, zip(*rows)))


def dpm_2_ancestral(sigmas, *, eta=1.0, s_noise=1.0, conv: Conv = _identity) -> Plan:
    """k-diffusion's ``sample_dpm_2_ancestral``: the DPM-Solver-2 step from sigma to sigma_down, then
    ``+ s_noise*sigma_up*xi`` (on the corrector row). As k-diffusion, a step whose sigma_down is 0 (the step to 0,
    or eta large enough) is Euler to 0 and adds no noise."""
    return _two_eval_plan(*_ancestral_rows(_dpm_2_rows, sigmas, eta, s_noise, conv), sigmas[:-1])


def _dpmpp_2s_rows(conv: Conv, sigma: float, down: float, noise: float):
    """DPM-Solver++(2S) from sigma to sigma_down (> 0), or Euler to 0 plus the noise: (pred, corr, sigma_mid)."""
    if down == 0:
        return _slope_row(conv, sigma, 0.0, noise), coefs.row(**_NO_MODEL), math.nan
    pred, mid = _midpoint_rows(conv, sigma, down)
    r, one_minus_r = _ratio(sigma, down)
    # H's coefficient sd*(1 - sigma_mid/sigma), as -sd*expm1(ln(sigma_mid/sigma)) for accuracy
    return pred, _conv_row(conv, mid, a=r, b=one_minus_r, c=-down * math.expm1(math.log(mid / sigma)), s=noise), mid


def dpmpp_2s_ancestral(sigmas, *, eta=1.0, s_noise=1.0, conv: Conv = _identity) -> Plan:
    """k-diffusion's ``sample_dpmpp_2s_ancestral`` (DPM-Solver++(2S), r = 1/2, to sigma_down, then
    ``+ s_noise*sigma_up*xi``): x2 = DDIM to sigma_mid = sqrt(sigma*sigma_down) (the predictor), D2 = D(x2, sigma_mid),
    ``x' = (sd/sigma) x + (1 - sd/sigma) D2`` = ``(sd/sigma) x2 + (1 - sd/sigma) D2 + sd (1 - sigma_mid/sigma) H``.
    sigma_down = 0: Euler to 0 plus the noise (as k-diffusion, whose noise is added whenever sigma_next > 0)."""
    return _two_eval_plan(*_ancestral_rows(_dpmpp_2s_rows, sigmas, eta, s_noise, conv), sigmas[:-1])
