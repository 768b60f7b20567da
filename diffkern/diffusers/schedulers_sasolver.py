"""Fused ``SASolverScheduler``: diffusers' SA-Solver (stochastic Adams predictor-corrector, Xue et al. 2023) with one
fused op per step. The corrector of step i and the predictor that follows are one row of
:func:`diffkern.coef_tables_sasolver.rows` (VP state); the previous converted model outputs stay on the device in
rotating buffers (up to three).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config

from .. import coef_tables_sasolver
from ..ops import coefs
from . import scheduler_tables, timestep_labels
from .config_checks import check_choice, check_common, check_one_conversion, unsupported
from .schedulers import FusedScheduler
from .schedulers_flow import convert_sigmas
from .schedulers_unipc import _native
from .schedulers_vp import _VPScheduler
from .scheduler_utils import check_steps

_WHO = "SASolverScheduler"
PREDICTIONS = ("epsilon", "sample", "v_prediction", "flow_prediction")
_CONVERSIONS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def default_tau(t) -> int:
    """diffusers' default stochasticity: 1 for 200 <= t <= 800, else 0."""
    return 1 if 200 <= t <= 800 else 0


def conversion(prediction_type: str, predict_x0: bool, alpha: float, sigma: float, raw_sigma: float):
    """(p, q) of diffusers' ``convert_model_output`` in the VP state z (``M = p*z + q*m``): x0 for
    ``predict_x0`` ("data_prediction"), else eps; ``raw_sigma`` is diffusers' ``sigmas[i]`` ("flow_prediction"
    reads it as it is: the VE sigma, or the flow time with flow sigmas)."""
    if predict_x0:
        return {"epsilon": (1.0 / alpha, -sigma / alpha), "sample": (0.0, 1.0),
                "v_prediction": (alpha, -sigma), "flow_prediction": (1.0, -raw_sigma)}[prediction_type]
    return {"epsilon": (0.0, 1.0), "sample": (1.0 / sigma, -alpha / sigma),
            "v_prediction": (sigma, alpha)}[prediction_type]


class SASolverScheduler(scheduler_tables.LogSNRTables, FusedScheduler):
    """Drop-in for ``diffusers.SASolverScheduler`` (every config key; ``predictor_order`` 1-3, ``corrector_order``
    1-4, both ``algorithm_type`` values, any ``tau_func`` (evaluated on the host at each timestep, as a CPU int64
    scalar tensor, in ``set_timesteps``: set it through the config, not on a scheduler mid-loop), every
    ``prediction_type``, ``lower_order_final``, Karras/exponential/beta/flow sigmas, ``lambda_min_clipped``,
    ``set_begin_index``); ``step()`` is one fused op, no host sync. With a torch
    ``generator`` the noise is diffusers' own draw (one ``randn_tensor`` per step, as diffusers).

    The corrector starts from the sample passed to ``step()`` (the previous prediction, in which the previous noise
    already lies); diffusers recomputes it from the previous step's input, the same value unless the loop changes
    the sample between steps (an inpainting blend, for one), where diffusers discards the change for the corrector.

    Unsupported (ValueError naming the key): ``thresholding``; ``predictor_order`` 4 (history of four model outputs,
    the fused op reads three); learned ``variance_type`` (diffusers' own step fails on the noise's shape);
    "flow_prediction" with "noise_prediction" (diffusers raises); ``use_flow_sigmas`` with a Karras/exponential/beta
    conversion (diffusers takes log of negative alphas); a schedule that repeats a sigma with an order >= 2
    (diffusers divides by 0).
    """

    _locate_start = True  # no set_begin_index: the first step's timestep gives its index, as diffusers
    _missing_is_last = True  # index_for_timestep/add_noise: a timestep not in the schedule is the last one's
    _train_timesteps_dtype, _train_sigmas_before = torch.float32, True  # before set_timesteps, as diffusers

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, predictor_order: int = 2,
                 corrector_order: int = 2, prediction_type: str = "epsilon", tau_func=None,
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 algorithm_type: str = "data_prediction", lower_order_final: bool = True,
                 use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 use_flow_sigmas: bool = False, flow_shift: float = 1.0, lambda_min_clipped: float = -float("inf"),
                 variance_type: str = None, timestep_spacing: str = "linspace", steps_offset: int = 0):
        check_common(_WHO, prediction_type, PREDICTIONS, thresholding, timestep_spacing)
        check_choice(_WHO, "algorithm_type", algorithm_type, ("data_prediction", "noise_prediction"))
        for key, value, allowed in (("predictor_order", predictor_order, (1, 2, 3)),
                                    ("corrector_order", corrector_order, (1, 2, 3, 4))):
            if isinstance(value, bool) or value not in allowed:
                why = "a history of four model outputs; the fused op reads three" if value == 4 else \
                    f"supported: {', '.join(map(str, allowed))}"
                raise unsupported(_WHO, key, value, why)
        if variance_type in ("learned", "learned_range"):
            raise unsupported(_WHO, "variance_type", variance_type, "diffusers' own step draws noise of the model "
                              "output's doubled shape and fails")
        if prediction_type == "flow_prediction" and algorithm_type == "noise_prediction":
            raise unsupported(_WHO, "prediction_type", prediction_type, "with algorithm_type='noise_prediction' "
                              "diffusers raises")
        check_one_conversion(_WHO, use_karras_sigmas=use_karras_sigmas, use_exponential_sigmas=use_exponential_sigmas,
                             use_beta_sigmas=use_beta_sigmas)
        if use_flow_sigmas and (use_karras_sigmas or use_exponential_sigmas or use_beta_sigmas):
            raise unsupported(_WHO, "use_flow_sigmas", True, "with a Karras/exponential/beta conversion diffusers "
                              "takes VE sigmas as flow times (log of a negative alpha)")
        if tau_func is not None and not callable(tau_func):
            raise ValueError(f"{_WHO}: tau_func must be a callable of the timestep or None, got {tau_func!r}")
        self._init_training(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self.init_noise_sigma = 1.0
        self.tau_func = default_tau if tau_func is None else tau_func
        self.predict_x0 = algorithm_type == "data_prediction"

    def _spaced(self, N: int) -> np.ndarray:
        """diffusers' timesteps for the spacings, below ``lambda_min_clipped``."""
        cfg = self.config
        T = cfg.num_train_timesteps
        ab = self.alphas_cumprod
        lam = 0.5 * (ab.log() - (1.0 - ab).log())
        last = T - int((lam < cfg.lambda_min_clipped).sum())
        if cfg.timestep_spacing == "linspace":
            ts = np.linspace(0, last - 1, N + 1).round()[::-1][:-1]
        elif cfg.timestep_spacing == "leading":
            ts = (np.arange(0, N + 1) * (last // (N + 1))).round()[::-1][:-1] + cfg.steps_offset
        else:
            ts = np.arange(last, 0, -T / N).round() - 1
        return np.ascontiguousarray(ts.astype(np.int64))

    def set_timesteps(self, num_inference_steps: int = None, device=None):
        """diffusers' SA-Solver timesteps: N+1 point spacings (below ``lambda_min_clipped``; "leading" plus
        ``steps_offset``), Karras/exponential/beta sigmas snapped to timesteps (Karras: rounded, else truncated;
        the last step from sigma_min to itself), or flow sigmas (``flow_shift``); then ``tau_func`` at each."""
        cfg = self.config
        T, N = cfg.num_train_timesteps, num_inference_steps
        check_steps(_WHO, N)
        table = self.train_sigmas
        conversion_key = next((key for key in _CONVERSIONS if cfg[key]), None)
        if conversion_key:
            ends = np.array([float(table[-1])] + [float(table[0])] * (N - 1))
            raw = convert_sigmas(cfg, ends)
            t_frac = timestep_labels.dpm_fractional(self, N, torch.from_numpy(raw))  # diffusers' own values
            ts = (t_frac.round() if cfg.use_karras_sigmas else t_frac).long()
            raw = raw.tolist() + [float(raw[-1])]
        elif cfg.use_flow_sigmas:
            s = 1.0 - np.linspace(1, 1 / T, N + 1)
            s = np.flip(cfg.flow_shift * s / (1 + (cfg.flow_shift - 1) * s))[:-1].copy()
            ts = torch.from_numpy(s * T).long()  # float64 products truncated, as diffusers
            raw = s.tolist() + [float(s[-1])]
        else:
            ts = torch.from_numpy(self._spaced(N))
            raw = np.interp(ts.double().numpy(), np.arange(T), table.numpy()).tolist() + [float(table[0])]
        # diffusers keeps its sigmas in float32 and computes every coefficient from those values: where alpha is
        # small (flow sigmas near 1: alpha = 1 - sigma) their rounding moves the step by far more than float32's 6e-8
        raw = np.asarray(raw, dtype=np.float32).astype(np.float64).tolist()
        n = len(ts)
        if max(cfg.predictor_order, cfg.corrector_order) >= 2 and any(a == b for a, b in zip(raw[:n - 1], raw[1:n])):
            key = conversion_key or ("steps_offset" if cfg.timestep_spacing == "leading" and N < T
                                     else "timestep_spacing")
            raise unsupported(_WHO, key, cfg[key], f"with {N} steps over num_train_timesteps={T} a sigma repeats, and "
                              "diffusers' higher-order step over it divides by 0 (inf/NaN samples); use "
                              "predictor_order=corrector_order=1, fewer steps or another spacing")
        if cfg.use_flow_sigmas:
            self._points = [(1.0 - s, s) for s in raw]
        else:
            self._points = [(1.0 / math.sqrt(s * s + 1.0), s / math.sqrt(s * s + 1.0)) for s in raw]
        self._set_schedule(ts.to(torch.int64), device, n)
        self.sigmas_host = raw
        self._taus = [float(self.tau_func(torch.tensor(t))) for t in self._host_timesteps]
        self._warm(device, ("sasolver", 0))

    def _build(self, key):
        cfg = self.config
        begin = key[1]
        alpha, sigma = (list(v) for v in zip(*self._points))
        n = len(alpha) - 1
        step_orders = coef_tables_sasolver.orders(n, cfg.predictor_order, cfg.corrector_order,
                                                  cfg.lower_order_final, begin)
        folded = coef_tables_sasolver.rows(alpha, sigma, self._taus, step_orders, self.predict_x0, begin)
        rows = [coefs.row()] * begin  # steps before the loop's start are never run
        for i, (a, m, noise) in zip(range(begin, n), folded):
            p, q = conversion(cfg.prediction_type, self.predict_x0, alpha[i], sigma[i], self.sigmas_host[i])
            rows.append(_native(coefs.row(a=a, b=m[0], c=m[1], c2=m[2], c3=m[3], s=noise, p=p, q=q, f=1.0)))
        return coefs.table(rows), None

    @property
    def sigmas(self) -> torch.Tensor:
        """diffusers' ``sigmas`` (float32, CPU): the VE sigmas of ``timesteps`` and the final one, or with
        ``use_flow_sigmas`` the flow times; before set_timesteps the training VE sigmas, increasing, as diffusers."""
        if self.__dict__.get("sigmas_host") is None:
            return self.train_sigmas.float()
        return torch.tensor(self.sigmas_host, dtype=torch.float32)

    def _sigma_at(self, i: int) -> float:
        return self.sigmas_host[i]

    add_noise = _VPScheduler.add_noise  # diffusers' SA-Solver adds noise as DDPM does, from alpha-bar at t
    _vp_coefficients = _VPScheduler._vp_coefficients

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """One SA-Solver step (the corrector of the previous prediction, but on the loop's first step, then the
        next prediction) as one fused op; returns (prev_sample,).

        model_output, sample: (B, ...) float tensors of one shape; generator: torch.Generator or None (Philox)."""
        i = self._index(timestep)
        x = self._state_in(sample, model_output)
        begin = self._loop_start  # set_begin_index's, or where a loop without it started
        noise = self._draw(generator, model_output, x)  # every step, as diffusers (the generator advances alike)
        depth = max(self.config.predictor_order, self.config.corrector_order - 1)
        history, history2, history3, history_out = self._history_slots(x, i, i == begin, depth)
        prev, _ = self._fused(("sasolver", begin), i, x, model_output, noise=noise, history=history,
                              history2=history2, history3=history3, history_out=history_out, x0=False)
        self._advance()
        # diffusers returns the sample's dtype, computed in the promoted one (as UniPC)
        prev = prev if prev.dtype == sample.dtype else prev.to(sample.dtype)
        return self._output_prev_only(return_dict, prev)
