"""Fused ``PNDMScheduler`` (Liu et al. 2022, pseudo numerical methods): every ``step()`` is one fused op.

diffusers moves the VP sample z with ``_get_prev_sample(S, t, t_prev, m)``, DDIM's deterministic update in eps form,
``A*S - K*eps`` (``A = sqrt(ab'/ab)``, ``K = (ab' - ab)/(ab*sqrt(1 - ab') + sqrt(ab*(1 - ab)*ab'))``), where eps is a
weighted sum of model outputs (its ``ets`` for PLMS, the Runge-Kutta sums for PRK; for v-prediction the sum of the
raw outputs v, then ``eps = sqrt(ab)*v + sqrt(1 - ab)*S``). Both are linear in S and the model outputs, so each call
is ``A'*S - K'*sum_j w_j m_j`` with ``A' = A - K*sqrt(1 - ab)``, ``K' = K*sqrt(ab)`` for v (else A, K). Where diffusers
restarts from the sample stored at an earlier call (PLMS's second call, the last three calls of each Runge-Kutta
step), that sample S is eliminated through the sample passed in, which is the previous call's output
``A'_p*S - K'_p*sum w'_j m_j``: the row reads ``x`` and up to three earlier model outputs from device buffers.

:func:`pndm_calls` replays diffusers' ``step`` control flow on the host (which timesteps, which stored sample, which
model outputs with which weights); :func:`pndm_rows` turns it into fused rows and routes the stored model outputs
through a few buffers (3 for PLMS, 5 while the Runge-Kutta steps keep their first outputs for PLMS).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config

from .. import schedules
from ..coef_tables_plms import AB_WEIGHTS
from ..ops import coefs
from . import scheduler_tables
from .config_checks import check_choice, unsupported
from .schedulers import FusedScheduler
from .schedulers_vp import _VPScheduler
from .scheduler_utils import check_steps

_WHO = "PNDMScheduler"
_PREDICTIONS = ("epsilon", "v_prediction")
_RK_WEIGHTS = (1 / 6, 1 / 3, 1 / 3, 1 / 6)
PNDM_ORDER = 4  # diffusers' pndm_order: the Runge-Kutta steps come from the last 4 timesteps


@dataclasses.dataclass
class PNDMCall:
    """One ``step()`` of diffusers' PNDM: ``_get_prev_sample`` from timestep ``t`` to ``prev`` (< 0: the final
    alpha-bar) on the sample passed in, or (``restart``) on the one stored at this group's first call, with the
    model outputs of the loop's calls ``combo`` (call index -> weight; the current call's included)."""

    t: int
    prev: int
    restart: bool
    combo: dict


def pndm_calls(timesteps, prk_timesteps, ratio: int, skip_prk_steps: bool) -> list[PNDMCall]:
    """diffusers' ``PNDMScheduler.step`` over one loop whose calls get ``timesteps`` (its counter starts at 0 on the
    first). ``prk_timesteps``: the scheduler's Runge-Kutta timesteps (diffusers reads their group starts by counter);
    ``ratio``: ``num_train_timesteps // num_inference_steps``."""
    calls, ets = [], []
    n_prk = 0 if skip_prk_steps else len(prk_timesteps)
    for k, t in enumerate(int(v) for v in timesteps):
        if k < n_prk:  # step_prk: RK4 in eps over 4 calls from the sample of the group's first call
            phase, start = k % 4, k - k % 4
            if phase == 0:
                ets.append(k)
            combo = {start + j: w for j, w in enumerate(_RK_WEIGHTS)} if phase == 3 else {k: 1.0}
            calls.append(PNDMCall(int(prk_timesteps[start]), t - (0 if k % 2 else ratio // 2), phase > 0, combo))
            continue
        if k == 1:  # the second call restarts from the first call's sample with the mean of both outputs
            calls.append(PNDMCall(t + ratio, t, True, {k: 0.5, ets[-1]: 0.5}))
            continue
        ets = ets[-3:] + [k]
        weights = AB_WEIGHTS[len(ets)]
        calls.append(PNDMCall(t, t - ratio, False, {j: w for j, w in zip(reversed(ets), weights)}))
    return calls


def _update(ab_t: float, ab_prev: float, prediction_type: str) -> tuple[float, float]:
    """(A', K') of ``_get_prev_sample`` = ``A'*S - K'*sum w_j m_j`` (float64)."""
    a = math.sqrt(ab_prev / ab_t)
    k = (ab_prev - ab_t) / (ab_t * math.sqrt(1.0 - ab_prev) + math.sqrt(ab_t * (1.0 - ab_t) * ab_prev))
    if prediction_type == "v_prediction":
        return a - k * math.sqrt(1.0 - ab_t), k * math.sqrt(ab_t)
    return a, k


def pndm_rows(calls, alpha_bar, prediction_type: str) -> tuple[list, list, int]:
    """(rows, routes, buffers): one fused row per call (D is the raw model output: p = 0, q = 1), and per call
    ``(reads, write)``, the buffer indices of its history inputs (slots c, c2, c3, newest first) and of its
    ``history_out`` (None: not kept). ``alpha_bar(t)``: float64 alpha-bar, the final one for t < 0."""
    terms = []  # per call: (coefficient of x, {call index: coefficient of its model output})
    for k, call in enumerate(calls):
        a_new, k_new = _update(alpha_bar(call.t), alpha_bar(call.prev), prediction_type)
        coef = {j: -k_new * w for j, w in call.combo.items()}
        a = a_new
        if call.restart:  # S = (x + K'_p*sum w'_j m_j)/A'_p through the previous call's output x
            prev = calls[k - 1]
            a_p, k_p = _update(alpha_bar(prev.t), alpha_bar(prev.prev), prediction_type)
            a = a_new / a_p
            for j, w in prev.combo.items():
                coef[j] = coef.get(j, 0.0) + a * k_p * w
        terms.append((a, coef))
    last_use = {j: k for k, (_, coef) in enumerate(terms) for j in coef if j != k}
    rows, routes, where, free, count = [], [], {}, [], 0
    for k, (a, coef) in enumerate(terms):
        reads = sorted((j for j in coef if j != k), reverse=True)
        if len(reads) > 3:
            raise AssertionError(f"PNDM call {k} reads {len(reads)} stored outputs; the fused op holds 3")
        read_bufs = [where[j] for j in reads]
        free += [where[j] for j in reads if last_use[j] == k]  # free now: may take this call's output in place
        write = None
        if k in last_use:
            write = free.pop(0) if free else count
            count += write == count
            where[k] = write
        hist = dict(zip(("c", "c2", "c3"), (coef[j] for j in reads)))
        rows.append(coefs.row(a=a, b=coef[k], p=0.0, q=1.0, f=1.0 if write is not None else 0.0, **hist))
        routes.append((tuple(read_bufs) + (None,) * (3 - len(read_bufs)), write))
    return rows, routes, count


class PNDMScheduler(FusedScheduler):
    """Drop-in for ``diffusers.PNDMScheduler`` (every config key: ``skip_prk_steps`` True, the PLMS of Stable
    Diffusion 1.x, or False, 3 Runge-Kutta steps of 4 calls then PLMS; ``set_alpha_to_one``, ``steps_offset``,
    epsilon or v prediction, the three spacings, beta schedules and trained betas); ``step()`` is one fused op.

    As diffusers, a call that restarts from an earlier sample (PLMS's second call, Runge-Kutta calls 2-4) assumes
    the sample passed in is the previous call's output (a pipeline's loop does that); it reads that sample instead of
    keeping a copy of the earlier one. Unsupported (ValueError naming the key): ``skip_prk_steps=False`` with fewer
    than 4 steps and "leading" timesteps pushed past ``num_train_timesteps - 1`` by ``steps_offset`` (diffusers fails
    on both). Where diffusers' float "trailing" arange makes N + 1 timesteps (the last t = -1, which it reads as
    t = T - 1), ours has N, as the DDIM drop-in.
    """

    _locate_start = True  # no set_begin_index in diffusers: a loop starts where its first timestep is
    _train_timesteps_dtype = None  # no timesteps before set_timesteps, as diffusers

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, skip_prk_steps: bool = False,
                 set_alpha_to_one: bool = False, prediction_type: str = "epsilon", timestep_spacing: str = "leading",
                 steps_offset: int = 0):
        check_choice(_WHO, "prediction_type", prediction_type, _PREDICTIONS)
        check_choice(_WHO, "timestep_spacing", timestep_spacing, schedules.SPACINGS)
        self._init_training(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self._final_alpha_cumprod = 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])
        self.init_noise_sigma = 1.0
        self.pndm_order = PNDM_ORDER
        self.prk_timesteps = self.plms_timesteps = None

    final_alpha_cumprod = scheduler_tables.final_alpha_cumprod

    @property
    def counter(self) -> int:
        """diffusers' counter: the number of ``step()`` calls of the current loop."""
        return 0 if self._step_index is None else self._step_index - self._loop_start

    def set_timesteps(self, num_inference_steps: int, device=None):
        """diffusers' PNDM timesteps: with ``skip_prk_steps`` [t0, t1, t1, t2, ..., t_{N-1}] (N+1 calls), else 12
        Runge-Kutta calls over the 4 largest timesteps (half steps at ``(T//N)//2``), then the other N-3."""
        cfg = self.config
        T, N = cfg.num_train_timesteps, num_inference_steps
        check_steps(_WHO, N, T)
        if not cfg.skip_prk_steps and N < PNDM_ORDER:
            raise unsupported(_WHO, "skip_prk_steps", False, f"the Runge-Kutta steps need num_inference_steps >= "
                              f"{PNDM_ORDER}, got {N} (diffusers fails there); use skip_prk_steps=True")
        if cfg.timestep_spacing == "leading" and (N - 1) * (T // N) + cfg.steps_offset >= T:
            raise unsupported(_WHO, "steps_offset", cfg.steps_offset, f"with {N} 'leading' steps it pushes the first "
                              f"timestep past {T - 1} (diffusers fails there)")
        d = schedules.timesteps(N, T, cfg.timestep_spacing, cfg.steps_offset).tolist()  # decreasing
        ratio = T // N
        if cfg.skip_prk_steps:
            prk, plms = [], d[:2] + d[1:] if N > 1 else d
        else:  # step s: [d_s, d_{s+1} + half, d_{s+1} + half, d_{s+1}] for s = 0, 1, 2
            half = ratio // 2
            prk = [v for s in range(PNDM_ORDER - 1) for v in (d[s], d[s + 1] + half, d[s + 1] + half, d[s + 1])]
            plms = d[PNDM_ORDER - 1:]
        self.prk_timesteps, self.plms_timesteps = np.array(prk, dtype=np.int64), np.array(plms, dtype=np.int64)
        calls = prk + plms
        self._ratio = ratio
        self._set_schedule(torch.tensor(calls, dtype=torch.int64), device, N)
        self._plan(("pndm", 0))  # built now: a schedule diffusers cannot step raises here, not at the first step
        self._warm(device, ("pndm", 0))

    def _alpha_bar(self, t: int) -> float:
        if t >= self.config.num_train_timesteps:
            raise unsupported(_WHO, "timestep_spacing", self.config.timestep_spacing,
                              f"a step starts at t={t}, past num_train_timesteps - 1 (diffusers fails there)")
        return float(self.alphas_cumprod[t]) if t >= 0 else self._final_alpha_cumprod

    def _build(self, key):
        begin = key[1]
        calls = pndm_calls(self._host_timesteps[begin:], self.prk_timesteps, self._ratio, self.config.skip_prk_steps)
        rows, routes, count = pndm_rows(calls, self._alpha_bar, self.config.prediction_type)
        return coefs.table(rows), (routes, count)

    def _buffers(self, x: torch.Tensor, first: bool, count: int) -> list:
        """The loop's model-output buffers (zeros at its first call; same shape all loop)."""
        head = self._history_for(x, first=first)
        group = self.__dict__.get("_pndm_buffers")
        if first or group is None or group[0] is not head or len(group) != max(count, 1):
            group = self._pndm_buffers = [head] + [torch.zeros_like(head) for _ in range(count - 1)]
        return group

    add_noise = _VPScheduler.add_noise
    _vp_coefficients = _VPScheduler._vp_coefficients

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One PNDM call (Runge-Kutta or PLMS, as diffusers' counter says); returns (prev_sample,).

        model_output, sample: (B, ...) float tensors of one shape; sample must be the previous call's output where
        diffusers restarts from a stored sample (see the class docstring)."""
        i = self._index(timestep)
        x = self._state_in(sample, model_output)
        begin = self._loop_start  # set_begin_index's, or where a loop without it started
        key = ("pndm", begin)
        routes, count = self._plan(key)[1]
        reads, write = routes[i - begin]
        group = self._buffers(x, i == begin, count)
        h = [None if b is None else group[b] for b in reads]
        prev, _ = self._fused(key, i - begin, x, model_output, history=h[0], history2=h[1], history3=h[2],
                              history_out=None if write is None else group[write], x0=False)
        self._advance()
        return self._output_prev_only(return_dict, prev)
