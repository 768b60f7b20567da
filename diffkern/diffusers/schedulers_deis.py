"""Fused ``DEISMultistepScheduler``: diffusers' DEIS ("logrho", orders 1-3) with one fused op per step. Each step is
one row of :func:`diffkern.coef_tables_deis.deis` (VE) rewritten for the pipeline's state (VP, or flow matching with
``use_flow_sigmas``); the previous noise estimates stay on the device (order 3: two buffers that rotate).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config

from .. import coef_tables_deis
from ..ops import coefs
from . import scheduler_tables, timestep_labels
from .config_checks import check_choice, check_common, check_one_conversion, dynamic_shift, load_as, unsupported
from .schedulers import FusedScheduler, ve_row_to_vp
from .schedulers_flow import convert_sigmas
from .schedulers_unipc import _native, _spaced_timesteps
from .scheduler_utils import check_steps

_WHO = "DEISMultistepScheduler"
PREDICTIONS = ("epsilon", "sample", "v_prediction", "flow_prediction")
_CONVERSIONS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def x0_conversion(prediction_type: str, sigma: float, flow: bool) -> tuple[float, float]:
    """(p, q) of diffusers' DEIS ``convert_model_output`` in VE coordinates (``D = p*x + q*m``, x = z/alpha) at VE
    sigma: its x0 formulas in the state z with alpha = 1/sqrt(sigma^2 + 1) (VP) or 1/(1 + sigma) (``flow``), where
    diffusers' sigma_t = alpha*sigma. "flow_prediction" is ``x0 = z - t*m``, t = alpha*sigma the flow time (the
    scheduler refuses it on a VP schedule)."""
    alpha = 1.0 / (1.0 + sigma) if flow else 1.0 / math.sqrt(sigma * sigma + 1.0)
    if prediction_type == "epsilon":  # (z - sigma_t*eps)/alpha
        return 1.0, -sigma
    if prediction_type == "sample":
        return 0.0, 1.0
    if prediction_type == "v_prediction":  # alpha*z - sigma_t*v
        return alpha * alpha, -alpha * sigma
    return alpha, -alpha * sigma


class DEISMultistepScheduler(scheduler_tables.LogSNRTables, FusedScheduler):
    """Drop-in for ``diffusers.DEISMultistepScheduler`` (every config key; ``solver_order`` 1-3, every
    ``prediction_type``, ``lower_order_final``, Karras/exponential/beta sigmas, flow sigmas with ``flow_shift`` or
    the dynamic ``mu``, ``set_begin_index``); ``step()`` is one fused op, no host sync. DPM-Solver algorithm and solver
    types load as "deis"/"logrho", as diffusers.

    Unsupported (ValueError naming the key): ``thresholding``; ``solver_order`` above 3 (diffusers runs it as 3);
    ``use_flow_sigmas`` together with a Karras/exponential/beta conversion (diffusers then mixes VE sigmas with flow
    coefficients); "flow_prediction" without ``use_flow_sigmas`` (diffusers' noise estimate is then alpha times the
    true one); and ``solver_order`` >= 2 on a schedule that repeats a sigma (``timestep_spacing``: N+1 points
    over fewer timesteps; ``steps_offset``: "leading" timesteps clamped to T - 1; equal ``sigma_min``/``sigma_max``),
    where diffusers' step after that step of length 0 divides by 0.
    """

    _locate_start = True  # no set_begin_index: the first step's timestep gives its index, as diffusers
    _missing_is_last = True  # index_for_timestep/add_noise: a timestep not in the schedule is the last one's
    _train_timesteps_dtype, _train_sigmas_before = torch.float32, True  # before set_timesteps, as diffusers

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, solver_order: int = 2,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 algorithm_type: str = "deis", solver_type: str = "logrho", lower_order_final: bool = True,
                 use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 use_flow_sigmas: bool = False, flow_shift: float = 1.0, timestep_spacing: str = "linspace",
                 steps_offset: int = 0, use_dynamic_shifting: bool = False, time_shift_type: str = "exponential"):
        check_common(_WHO, prediction_type, PREDICTIONS, thresholding, timestep_spacing)
        # as diffusers: DPM-Solver configs load as DEIS
        algorithm_type = load_as(self, "algorithm_type", algorithm_type, ("dpmsolver", "dpmsolver++"), "deis")
        solver_type = load_as(self, "solver_type", solver_type, ("midpoint", "heun", "bh1", "bh2"), "logrho")
        check_choice(_WHO, "algorithm_type", algorithm_type, ("deis",))
        check_choice(_WHO, "solver_type", solver_type, ("logrho",))
        if solver_order not in coef_tables_deis.ORDERS or isinstance(solver_order, bool):
            raise unsupported(_WHO, "solver_order", solver_order, "supported: 1, 2, 3 (diffusers runs higher orders as "
                              "3)")
        check_one_conversion(_WHO, use_karras_sigmas=use_karras_sigmas, use_exponential_sigmas=use_exponential_sigmas,
                             use_beta_sigmas=use_beta_sigmas)
        if use_flow_sigmas and (use_karras_sigmas or use_exponential_sigmas or use_beta_sigmas):
            raise unsupported(_WHO, "use_flow_sigmas", True, "with a Karras/exponential/beta conversion diffusers "
                              "takes VE sigmas but flow-matching coefficients")
        if prediction_type == "flow_prediction" and not use_flow_sigmas:
            raise unsupported(_WHO, "prediction_type", prediction_type, "without use_flow_sigmas diffusers divides "
                              "its noise estimate by the VE sigma instead of sigma_t (a factor alpha off); use "
                              "use_flow_sigmas=True")
        self._init_training(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self.init_noise_sigma = 1.0
        self._mu_shift = None  # diffusers writes exp(mu) over config.flow_shift: later calls without mu keep it

    def set_timesteps(self, num_inference_steps: int = None, device=None, mu: float = None):
        """diffusers' DEIS timesteps: N+1 point spacings ("leading" with ``steps_offset``), Karras/exponential/beta
        sigmas (the config's ``sigma_min``/``sigma_max`` when it has them) snapped to timesteps (Karras: rounded,
        else truncated), or flow sigmas (``flow_shift``, or e^mu with ``use_dynamic_shifting``)."""
        cfg = self.config
        T, N = cfg.num_train_timesteps, num_inference_steps
        check_steps(_WHO, N)
        if mu is not None:
            self._mu_shift = dynamic_shift(_WHO, cfg, mu)
        table = self.train_sigmas
        conversion = next((key for key in _CONVERSIONS if cfg[key]), None)
        if conversion:
            # convert_sigmas reads the ends of its input (or the config's sigma_min/sigma_max) and its length
            ends = np.array([float(table[-1])] + [float(table[0])] * (N - 1))
            sig = convert_sigmas(cfg, ends)
            t_frac = timestep_labels.dpm_fractional(self, N, torch.from_numpy(sig))  # diffusers' own values
            ts = (t_frac.round() if cfg.use_karras_sigmas else t_frac).long()  # else truncated, as diffusers
            sig, final = sig.tolist(), float(sig[-1])  # the last step: sigma_min to itself
        elif cfg.use_flow_sigmas:
            shift = self._mu_shift if self._mu_shift is not None else cfg.flow_shift
            t = 1.0 - np.linspace(1, 1 / T, N + 1)
            t = np.flip(shift * t / (1 + (shift - 1) * t))[:-1].copy()
            ts = torch.from_numpy(t * T).long()  # float64 products truncated, as diffusers
            sig = (t / (1.0 - t)).tolist()  # flow time t is the VE sigma t/(1 - t)
            final = sig[-1]
        else:
            ts = torch.from_numpy(_spaced_timesteps(cfg.timestep_spacing, N, T, cfg.steps_offset))
            sig = np.interp(ts.double().numpy(), np.arange(T), table.numpy()).tolist()
            final = float(table[0])
        if cfg.solver_order >= 2 and any(a == b for a, b in zip(sig[:-1], sig[1:])):
            clamped = cfg.timestep_spacing == "leading" and int((ts >= T - 1).sum()) > 1 and N < T
            key = conversion or ("steps_offset" if clamped else "timestep_spacing")
            raise unsupported(_WHO, key, cfg[key], f"with {N} steps over num_train_timesteps={T} a sigma repeats, and "
                              "diffusers' higher-order step after that step of length 0 divides by 0 (inf/NaN "
                              "samples); use solver_order=1, fewer steps or another spacing")
        self._set_schedule(ts.to(torch.int64), device, len(ts))
        self.sigmas_host = sig + [final]
        self._warm(device, ("deis", 0))

    @property
    def sigmas(self) -> torch.Tensor:
        """diffusers' ``sigmas`` (float32, CPU): the VE sigmas of ``timesteps`` and the final one, or with
        ``use_flow_sigmas`` the flow times t = sigma/(1 + sigma)."""
        sig = FusedScheduler.sigmas.fget(self)  # before set_timesteps the training VE sigmas, as diffusers' ones
        return sig / (1.0 + sig) if self.config.use_flow_sigmas and self._host_timesteps is not None else sig

    def _alpha(self, sigma):
        """The state's scale at VE sigma (a float or a float64 tensor): 1/(1 + sigma) (flow), else
        1/sqrt(sigma^2 + 1)."""
        return 1.0 / (1.0 + sigma) if self.config.use_flow_sigmas else 1.0 / (sigma * sigma + 1.0) ** 0.5

    def _build(self, key):
        cfg = self.config
        begin = key[1]
        sig = self.sigmas_host
        orders = coef_tables_deis.deis_orders(len(sig) - 1, order=cfg.solver_order,
                                              lower_order_final=cfg.lower_order_final, begin=begin)

        def conv(s):
            p, q = x0_conversion(cfg.prediction_type, s, cfg.use_flow_sigmas)
            return {"p": p, "q": q}

        plan = coef_tables_deis.deis(sig, orders, conv=conv)
        rows = [_native(ve_row_to_vp(r, sig[i], sig[i + 1], alphas=(self._alpha(sig[i]), self._alpha(sig[i + 1]))))
                for i, r in enumerate(plan.table.tolist())]
        return coefs.table(rows), None

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """``alpha*x0 + alpha*sigma*noise`` (the state at VE sigma; alpha as :meth:`_alpha`), the sigma picked as
        diffusers picks it (:meth:`FusedScheduler._noise_sigma`); ``timesteps`` (B,), (1,) or a number."""
        sigma = self._noise_sigma(original_samples, timesteps)
        alpha = self._alpha(sigma)
        dtype = original_samples.dtype
        return alpha.to(dtype) * original_samples + (alpha * sigma).to(dtype) * noise

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One DEIS step of diffusers' order at this step (first order on the loop's first step, lowered at the end
        with ``lower_order_final`` below 15 steps) as one fused op; returns (prev_sample,).

        model_output, sample: (B, ...) float tensors of one shape."""
        i = self._index(timestep)
        x = self._state_in(sample, model_output)
        begin = self._loop_start  # set_begin_index's, or where a loop without it started
        depth = self.config.solver_order - 1  # order q reads the q - 1 previous noise estimates
        slots = {}
        if depth:
            *hs, h_out = self._history_slots(x, i, i == begin, depth)
            slots = {"history": hs[0], "history2": hs[1], "history_out": h_out}
        prev, _ = self._fused(("deis", begin), i, x, model_output, x0=False, **slots)
        self._advance()
        return self._output_prev_only(return_dict, prev)

    def loop_knobs(self) -> dict:
        """The ``deis`` sampler's knobs of this config (:mod:`diffkern.diffusers.loop_spec`)."""
        return {"order": int(self.config.solver_order), "lower_order_final": bool(self.config.lower_order_final)}
