"""Fused ``UniPCMultistepScheduler``: diffusers' UniPC (B(h) predictor and corrector, orders 1-3) with one fused op per
step. The corrector of step k and the predictor that follows are one row of :func:`diffkern.coef_tables_unipc.unipc`
(VE) rewritten for the VP state; the previous ``solver_order`` model values stay on the device in rotating buffers.
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config

from .. import coef_tables_unipc, schedules, wrappers
from ..ops import coefs
from . import scheduler_tables, timestep_labels
from .config_checks import check_choice, check_one_conversion, load_as, unsupported
from .schedulers import FusedScheduler, ve_row_to_vp
from .schedulers_vp import DPMSolverMultistepScheduler, _check_common
from .scheduler_utils import check_steps

_WHO = "UniPCMultistepScheduler"


def _spaced_timesteps(spacing: str, N: int, T: int, offset: int) -> np.ndarray:
    """diffusers' UniPC timesteps, in its own numpy arithmetic: N+1 points, the last dropped ("linspace", "leading"
    plus ``offset``), or its float ``arange`` ("trailing": N values, or N + 1 where it overshoots, the last t = -1).
    N >= T repeats timesteps."""
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, N + 1).round()[::-1][:-1]
    elif spacing == "leading":
        ts = (np.arange(0, N + 1) * (T // (N + 1))).round()[::-1][:-1] + offset
    else:
        ts = np.arange(T, 0, -T / N).round() - 1
    return np.ascontiguousarray(ts.astype(np.int64))


def _native(row: list) -> list:
    """The row with its conversion folded in: the fused op's D slot reads the raw model output (P = 0, Q = 1) and A,
    B, E, F absorb P and Q in float64. Same maths, fewer float32 roundings: the round trip through the denoised
    estimate cancels sigma-fold for the noise-prediction solver (``predict_x0=False``) fed an epsilon model at large
    sigma (the kernel formed D = x - sigma*eps, the row then eps = (x - D)/sigma: 130x diffusers' own float32 error
    at sigma ~6e3, where diffusers uses eps as it is). Only for the scheduler, whose step returns no x0 estimate
    (the ``unipc`` sampler keeps D for its callbacks)."""
    r = list(row)
    p, q = r[coefs.P], r[coefs.Q]
    for out, slot in ((coefs.A, coefs.B), (coefs.A, coefs.G), (coefs.E, coefs.F)):
        r[out] += r[slot] * p
        r[slot] *= q
    r[coefs.P], r[coefs.Q] = 0.0, 1.0
    return r


class UniPCMultistepScheduler(scheduler_tables.LogSNRTables, FusedScheduler):
    """Drop-in for ``diffusers.UniPCMultistepScheduler`` (every config key; ``solver_order`` 1 to 3, ``solver_type``
    "bh1"/"bh2", ``predict_x0``, ``lower_order_final``, ``disable_corrector``, Karras/exponential sigmas,
    ``final_sigmas_type``, zero-terminal-SNR betas, ``set_begin_index``); ``step()`` is one fused op.

    Unsupported (ValueError naming the key): thresholding, ``solver_p``, beta/flow sigmas and flow
    prediction, dynamic shifting; and where diffusers' own samples are not finite: with ``final_sigmas_type="zero"``,
    ``predict_x0=False`` or ``solver_type="bh1"`` (NaN), ``solver_order`` >= 2 with ``lower_order_final=False`` over
    two steps or more (inf); ``solver_order`` >= 2 on a schedule that repeats a sigma (``timestep_spacing``: N >= T with
    "linspace"/"leading", N > T with "trailing"; ``steps_offset``: "leading" timesteps clamped to T - 1), where the
    second-order step after that step of length 0 divides by 0. Timesteps are diffusers' to the last quirk ("trailing"
    can give N + 1 of them, the last t = -1).
    """

    _locate_start = True  # no set_begin_index: the first step's timestep gives its index, as diffusers
    _missing_is_last = True  # index_for_timestep/add_noise: a timestep not in the schedule is the last one's
    _train_timesteps_dtype, _train_sigmas_before = torch.float32, True  # before set_timesteps, as diffusers

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, solver_order: int = 2,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0, predict_x0: bool = True,
                 solver_type: str = "bh2", lower_order_final: bool = True,
                 disable_corrector: list = [],  # noqa: B006  (diffusers' default; never mutated)
                 solver_p=None, use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False,
                 use_beta_sigmas: bool = False, use_flow_sigmas: bool = False, flow_shift: float = 1.0,
                 timestep_spacing: str = "linspace", steps_offset: int = 0, final_sigmas_type: str = "zero",
                 rescale_betas_zero_snr: bool = False, use_dynamic_shifting: bool = False,
                 time_shift_type: str = "exponential", sigma_min: float = None, sigma_max: float = None,
                 shift_terminal: float = None):
        if prediction_type == "flow_prediction":
            raise unsupported(_WHO, "prediction_type", prediction_type, "flow matching (use_flow_sigmas) is not "
                              "implemented")
        _check_common(_WHO, prediction_type, thresholding, timestep_spacing)
        # as diffusers: DPM-Solver/DEIS configs load as bh2
        solver_type = load_as(self, "solver_type", solver_type, ("midpoint", "heun", "logrho"), "bh2")
        check_choice(_WHO, "solver_type", solver_type, coef_tables_unipc.SOLVER_TYPES)
        check_choice(_WHO, "solver_order", solver_order, (1, 2, 3))
        check_choice(_WHO, "final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        check_one_conversion(_WHO, use_karras_sigmas=use_karras_sigmas, use_exponential_sigmas=use_exponential_sigmas,
                             use_beta_sigmas=use_beta_sigmas)
        for option, value in (("solver_p", solver_p), ("use_beta_sigmas", use_beta_sigmas),
                              ("use_flow_sigmas", use_flow_sigmas), ("use_dynamic_shifting", use_dynamic_shifting),
                              ("shift_terminal", shift_terminal)):
            if value:
                raise unsupported(_WHO, option, value, "not implemented")
        if not predict_x0 and final_sigmas_type == "zero":
            raise unsupported(_WHO, "predict_x0", False, "with final_sigmas_type='zero' diffusers' noise-prediction "
                              "step to sigma = 0 multiplies 0 by inf (NaN samples); use final_sigmas_type='sigma_min'")
        if solver_type == "bh1" and final_sigmas_type == "zero":
            raise unsupported(_WHO, "solver_type", "bh1", "with final_sigmas_type='zero' diffusers' step to sigma = 0 "
                              "multiplies B(h) = -inf by 0 (NaN samples); use 'bh2' or final_sigmas_type='sigma_min'")
        self.disable_corrector = list(coef_tables_unipc._step_indices(disable_corrector))
        if not isinstance(disable_corrector, list):  # a tuple saves as a JSON list: keep the config round-trippable
            self.register_to_config(disable_corrector=list(disable_corrector))
        self.predict_x0 = predict_x0
        self._init_training(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                            rescale_betas_zero_snr)
        self.init_noise_sigma = 1.0

    def set_timesteps(self, num_inference_steps: int = None, device=None, sigmas=None, mu=None):
        """diffusers' UniPC timesteps: N+1 point spacings ("leading" with ``steps_offset``), or Karras/exponential
        sigmas (``sigma_min``/``sigma_max`` from the config when set) snapped to timesteps (Karras: rounded)."""
        cfg = self.config
        T, N = cfg.num_train_timesteps, num_inference_steps
        if sigmas is not None:
            raise unsupported(_WHO, "sigmas", "custom", "custom sigmas need use_flow_sigmas, which is not implemented")
        check_steps(_WHO, N)
        table = self.train_sigmas
        if cfg.use_karras_sigmas or cfg.use_exponential_sigmas:
            lo = float(table[0]) if cfg.sigma_min is None else cfg.sigma_min
            hi = float(table[-1]) if cfg.sigma_max is None else cfg.sigma_max
            sig = (schedules.karras if cfg.use_karras_sigmas else schedules.loglinear)(N, lo, hi)[:-1]
            t_frac = timestep_labels.dpm_fractional(self, N, sig)  # diffusers' own values
            ts = (t_frac.round() if cfg.use_karras_sigmas else t_frac).long()  # exponential: truncated, as diffusers
            final = float(sig[-1])  # "sigma_min": the schedule's own last sigma (a last step of length 0)
        else:
            ts = torch.from_numpy(_spaced_timesteps(cfg.timestep_spacing, N, T, cfg.steps_offset))
            sig = torch.from_numpy(np.interp(ts.double().numpy(), np.arange(T), table.numpy()))
            if cfg.solver_order >= 2 and (sig[1:] == sig[:-1]).any():
                # N >= T repeats timesteps; "leading" offsets clamp the first ones to T - 1 (tables may be
                # non-monotonic, zero terminal SNR: only equal sigmas are steps of length 0)
                key = "steps_offset" if cfg.timestep_spacing == "leading" and N < T else "timestep_spacing"
                raise unsupported(_WHO, key, cfg[key], f"with {N} {cfg.timestep_spacing!r} steps over "
                                  f"num_train_timesteps={T} a sigma repeats, and diffusers' multistep step after "
                                  "that step of length 0 divides by 0 (inf/NaN samples); use solver_order=1, fewer "
                                  "steps, 'trailing' spacing or Karras sigmas")
            final = float(table[0])
        n = len(ts)  # diffusers' float arange can make N + 1 "trailing" timesteps
        if not cfg.lower_order_final and cfg.final_sigmas_type == "zero" and cfg.solver_order >= 2 and n >= 2:
            raise unsupported(_WHO, "lower_order_final", False, "with final_sigmas_type='zero' diffusers' multistep "
                              "step to sigma = 0 divides by 0 (inf samples); use final_sigmas_type='sigma_min'")
        self._set_schedule(ts.to(torch.int64), device, n)
        self.sigmas_host = sig.tolist() + [0.0 if cfg.final_sigmas_type == "zero" else final]
        self._warm(device, self._key(0))

    def _key(self, begin: int) -> tuple:
        # disable_corrector is read at each step, as diffusers reads its attribute
        return ("unipc", begin, coef_tables_unipc._step_indices(self.disable_corrector))

    def _build(self, key):
        cfg = self.config
        _, begin, disabled = key
        sig = self.sigmas_host
        n = len(sig) - 1

        def conv(s):
            p, q = wrappers.conversion(cfg.prediction_type, s)
            return {"p": p, "q": q}

        orders = coef_tables_unipc.unipc_orders(n, order=cfg.solver_order, lower_order_final=cfg.lower_order_final,
                                                begin=begin)
        correct = coef_tables_unipc.unipc_correctors(n, disabled, begin=begin)
        plan = coef_tables_unipc.unipc(sig, orders, correct, predict_x0=bool(cfg.predict_x0),
                                       solver_type=cfg.solver_type, conv=conv)
        rows = [_native(ve_row_to_vp(r, sig[i], sig[i + 1])) for i, r in enumerate(plan.table.tolist())]
        return coefs.table(rows), None

    add_noise = DPMSolverMultistepScheduler.add_noise

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One UniPC step: the corrector of the previous prediction (but on the loop's first step and where
        ``disable_corrector`` says) and the next prediction, as one fused op; returns (prev_sample,)."""
        i = self._index(timestep)
        x = self._state_in(sample, model_output)
        begin = self._loop_start  # set_begin_index's, or where a loop without it started
        first = i == begin
        # order p's corrector reads M_{i-p}: p history buffers
        history, history2, history3, history_out = self._history_slots(x, i, first, self.config.solver_order)
        prev, _ = self._fused(self._key(begin), i, x, model_output, history=history, history2=history2,
                              history3=history3, history_out=history_out, x0=False)
        self._advance()
        # diffusers computes in the promoted dtype and returns the sample's (a float16 sample with a float32 model
        # output stays float16); the history above keeps the promoted dtype, as diffusers' model_outputs do
        prev = prev if prev.dtype == sample.dtype else prev.to(sample.dtype)
        return self._output_prev_only(return_dict, prev)

    def loop_knobs(self) -> dict:
        """The ``unipc`` sampler's knobs of this config (:mod:`diffkern.diffusers.loop_spec`)."""
        cfg = self.config
        return {"order": int(cfg.solver_order), "solver_type": cfg.solver_type,
                "lower_order_final": bool(cfg.lower_order_final), "predict_x0": bool(cfg.predict_x0),
                "disable_corrector": coef_tables_unipc._step_indices(self.disable_corrector)}

