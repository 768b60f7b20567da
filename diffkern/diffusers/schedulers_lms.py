"""Fused ``LMSDiscreteScheduler``: diffusers' linear multistep scheduler (k-diffusion's ``sample_lms``), one fused op
per step. The sample is the VE state x; each step is a row of :mod:`diffkern.coef_tables_lms` with the prediction
type's conversion fused, and the previous derivatives d = (x - D)/sigma stay on the device in three buffers that
rotate.

diffusers' ``step(..., order=4)`` takes the order per call and keeps a list of derivatives: each call appends its own
and drops the oldest one when the list is longer than this call's order (one at most), then weights the newest
``min(q, len)`` of them with the Lagrange weights of q = min(step_index + 1, order) nodes. A loop that starts past
step 0 (``set_begin_index``, img2img) therefore weights its first derivatives with the weights of nodes before its
start (the others' terms are missing). ``step()`` replays that bookkeeping on the host (a count), and the table holds
a row for every (step, q, used) it can give: ten per step, all built and uploaded at ``set_timesteps``.
"""
from __future__ import annotations

import numbers

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config

from .. import coef_tables_lms
from ..ops import coefs
from . import timestep_labels
from .config_checks import check_choice, check_one_conversion, unsupported
from .scheduler_default import DeferredSchedule
from .schedulers import sigma_to_t
from .schedulers_k import _KScheduler
from .scheduler_lookup import check_step_args

_WHO = "LMSDiscreteScheduler"
PREDICTIONS = ("epsilon", "v_prediction", "sample")  # diffusers' LMS raises for the others
# The (q, used) pairs of a call: q nodes, the newest `used` <= q derivatives; row i*len(COMBOS) + index of the pair.
COMBOS = tuple((q, k) for q in coef_tables_lms.ORDERS for k in range(1, q + 1))
_KEY = ("lms",)


class LMSDiscreteScheduler(DeferredSchedule, _KScheduler):
    """Drop-in for ``diffusers.LMSDiscreteScheduler`` (every config key: beta schedules and trained betas,
    Karras/exponential/beta sigmas, epsilon/v/sample prediction, the three spacings and ``steps_offset``);
    ``step(model_output, timestep, sample, order=4)`` is one fused op, no host sync, with diffusers' per-call order.

    Unsupported (ValueError naming it): ``order`` above 4 in ``step()`` (the fused rows read at most three previous
    derivatives); ``timestep_spacing`` other than "linspace" with more steps than ``num_train_timesteps`` (as the
    other K-schedulers); and a call of order >= 2 whose nodes repeat a sigma ("leading" timesteps clamped by
    ``steps_offset``), where diffusers divides by 0.
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 prediction_type: str = "epsilon", timestep_spacing: str = "linspace", steps_offset: int = 0):
        check_one_conversion(_WHO, use_karras_sigmas=use_karras_sigmas, use_exponential_sigmas=use_exponential_sigmas,
                             use_beta_sigmas=use_beta_sigmas)
        check_choice(_WHO, "prediction_type", prediction_type, PREDICTIONS)
        self._init_training(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        # beta sigmas are converted here (set_timesteps), not by the shared K-schedule
        self._init_k(_WHO, prediction_type, timestep_spacing, use_karras_sigmas, use_exponential_sigmas, False)
        self.use_karras_sigmas = use_karras_sigmas  # as diffusers' attribute
        self._held = 0
        self._defer_default_schedule()  # diffusers' __init__ runs set_timesteps(T)

    def set_timesteps(self, num_inference_steps: int, device=None):
        """diffusers' LMS schedule: the spacing's timesteps and their interpolated sigmas, or Karras sigmas between
        their ends, exponential/beta sigmas between the config's ``sigma_min``/``sigma_max`` when it has them (else
        the ends), at fractional timesteps; then the final 0. Builds and uploads every row the steps can use."""
        cfg = self.config
        exponential = cfg.use_exponential_sigmas  # diffusers' LMS reads the config's bounds there, not for Karras
        ts, sig = self._k_schedule(num_inference_steps, cfg.get("sigma_min") if exponential else None,
                                   cfg.get("sigma_max") if exponential else None)
        if cfg.use_beta_sigmas:
            import scipy.stats  # only this option needs scipy (diffusers requires it there too)
            lo, hi = cfg.get("sigma_min"), cfg.get("sigma_max")
            lo = self._k_lowest(num_inference_steps, sig[-2]) if lo is None else float(lo)
            hi = sig[0] if hi is None else float(hi)
            ramp = 1.0 - np.linspace(0.0, 1.0, num_inference_steps)
            beta = lo + scipy.stats.beta.ppf(ramp, 0.6, 0.6) * (hi - lo)
            labels = timestep_labels.k_timesteps(self, num_inference_steps, "beta", cfg.get("sigma_min"),
                                                 cfg.get("sigma_max"))  # diffusers' own values (bit for bit)
            ts = sigma_to_t(self.alphas_cumprod, torch.from_numpy(beta)) if labels is None else torch.from_numpy(labels)
            ts = ts.to(torch.float32)
            sig = beta.tolist() + [0.0]
        self._set_schedule(ts, device, num_inference_steps)
        self.sigmas_host = sig
        self._warm(device, _KEY)

    def _build(self, key):
        """(table, the (step, q) pairs whose nodes repeat a sigma): row ``i*len(COMBOS) + c`` is step i with the
        pair ``COMBOS[c]``; pairs no call can take (q > i + 1) and repeated nodes hold a row that reads nothing."""
        sig = self.sigmas_host
        rows, repeated = [], set()
        for i in range(len(sig) - 1):
            w = {}
            for q in coef_tables_lms.ORDERS:
                if q <= i + 1:
                    try:
                        w[q] = coef_tables_lms.weights(sig, i, q)
                    except ValueError:
                        repeated.add((i, q))
            for q, k in COMBOS:
                rows.append(coef_tables_lms.weights_row(w[q][:k], sig[i], self._conv) if q in w
                            else coefs.row(p=0.0, q=0.0))
        return coefs.table(rows), repeated

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        """The weight of the derivative at ``sigmas[t - current_order]`` in step t of an ``order``-node LMS (diffusers'
        method; here in closed form on the float64 sigmas)."""
        return coef_tables_lms.weights(self.sigmas_host, t, order)[current_order]

    @property
    def derivatives(self) -> list:
        """diffusers' ``derivatives``: the slopes ``(x - D)/sigma`` (B, ...) of this loop's last steps, oldest first,
        as many as diffusers keeps (at most ``order``). The scheduler's rotating buffers (a later step writes over
        them), not copies: diffusers' list holds a new tensor per step."""
        last = self._last_call()
        if last is None:
            return []
        group = self._history_group
        return [group[(last - self._held + 1 + r) % len(group)] for r in range(self._held)]

    def _state_in(self, sample: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        # diffusers' LMS computes in the promoted dtype of its inputs (no float32 upcast, unlike its Euler)
        check_step_args(model_output, sample)
        dtype = torch.promote_types(sample.dtype, model_output.dtype)
        return sample if sample.dtype == dtype else sample.to(dtype)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, order: int = 4,
             return_dict: bool = True):
        """One LMS step of ``order`` (1 to 4; diffusers' default 4) as one fused op: returns (prev_sample,
        pred_original_sample). model_output, sample: (B, ...) float tensors of one shape."""
        if isinstance(order, bool) or not isinstance(order, numbers.Integral) or not 1 <= order <= 4:
            raise ValueError(f"order: expected an int from 1 to 4 (the fused rows read at most three previous "
                             f"derivatives), got {order!r}")
        i = self._index(timestep)
        first = i == self._loop_start
        held = 0 if first else self._held
        held = held + 1 if held < order else held  # diffusers appends, then drops one when longer than order
        q = min(i + 1, int(order))
        _, repeated = self._plan(_KEY)
        if (i, q) in repeated:
            cfg = self.config
            key = "steps_offset" if cfg.timestep_spacing == "leading" else "timestep_spacing"
            raise unsupported(_WHO, key, cfg[key], f"with {self.num_inference_steps} steps a sigma repeats and the "
                              f"order-{q} step {i} over it divides by 0 in diffusers; use order=1 or another spacing")
        x = self._state_in(sample, model_output)
        # four rotating slope buffers where the rows read three: the one written over is D_{i-4}, so D_{i-3}..D_i
        # outlive the step for `derivatives` (one more buffer, no copy)
        h, h2, h3, h_out = self._history_slots(x, i, first, 4)
        row = i * len(COMBOS) + COMBOS.index((q, min(q, held)))
        prev, x0 = self._fused(_KEY, row, x, model_output, history=h, history2=h2, history3=h3, history_out=h_out)
        self._held = held
        self._advance()
        return self._output(return_dict, prev, x0)

