"""Fused ``DPMSolverSinglestepScheduler``: diffusers' singlestep DPM-Solver / DPM-Solver++ (orders 1-3, its SDE) with
one fused op per step. The rows are :func:`diffkern.coef_tables_singlestep.scheduler_rows`: a group's first call stores
its start sample and raw model output (history and x0 outputs of the op), the later calls of the group read them (and,
"heun" order 3, the order-2 call's model value) from three device buffers.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config

from .. import coef_tables_singlestep as css
from ..ops import coefs, sampler_step
from . import scheduler_tables, timestep_labels
from .config_checks import check_choice, check_common, check_one_conversion, dynamic_shift, load_as, unsupported
from .schedulers import FusedScheduler
from .schedulers_deis import DEISMultistepScheduler
from .schedulers_flow import convert_sigmas
from .scheduler_utils import check_steps

_WHO = "DPMSolverSinglestepScheduler"
PREDICTIONS = ("epsilon", "sample", "v_prediction", "flow_prediction")
_CONVERSIONS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def model_conversion(algorithm: str, prediction_type: str, alpha: float, sigma_t: float, raw_sigma: float):
    """(p, q) of diffusers' ``convert_model_output`` in the state z: M = p z + q m, M the denoised estimate
    ("dpmsolver++" and its SDE) or eps ("dpmsolver"), at a step with alpha_t, sigma_t (VP, or flow 1 - t and t) and
    diffusers' ``sigmas[step]`` (``raw_sigma``: the VE sigma, or the flow time t), which its flow conversion reads."""
    if algorithm == "dpmsolver":
        return {"epsilon": (0.0, 1.0), "sample": (1.0 / sigma_t, -alpha / sigma_t),
                "v_prediction": (sigma_t, alpha)}[prediction_type]
    return {"epsilon": (1.0 / alpha, -sigma_t / alpha), "sample": (0.0, 1.0), "v_prediction": (alpha, -sigma_t),
            "flow_prediction": (1.0, -raw_sigma)}[prediction_type]


class DPMSolverSinglestepScheduler(scheduler_tables.LogSNRTables, FusedScheduler):
    """Drop-in for ``diffusers.DPMSolverSinglestepScheduler`` (every config key; ``solver_order`` 1-3,
    ``algorithm_type`` "dpmsolver++", "dpmsolver" and "sde-dpmsolver++", ``solver_type`` "midpoint"/"heun", every
    ``prediction_type``, ``lower_order_final``, ``final_sigmas_type``, ``lambda_min_clipped``, Karras/exponential/beta
    sigmas, flow sigmas with ``flow_shift`` or the dynamic ``mu``, learned variances, custom ``timesteps``,
    ``set_begin_index``); ``step()`` is one fused op, no host sync. DEIS/UniPC algorithm and solver types load as
    "dpmsolver++"/"midpoint", as diffusers.

    Unsupported (ValueError naming the key): ``thresholding`` (a per-sample quantile); ``solver_order`` above 3
    (diffusers raises too); flow sigmas with a Karras/exponential/beta conversion (diffusers then takes VE sigmas as
    flow times: NaN); flow prediction with "dpmsolver" (diffusers raises); custom ``timesteps`` that do not strictly
    decrease inside [0, num_train_timesteps); and a schedule where a step of order >= 2 spans a repeated sigma
    (``num_inference_steps`` >= num_train_timesteps, or equal Karras ends), where diffusers divides by 0.
    """

    _locate_start = True  # no set_begin_index: the first step's timestep gives its index, as diffusers
    _missing_is_last = True  # index_for_timestep/add_noise: a timestep not in the schedule is the last one's
    _train_timesteps_dtype, _train_sigmas_before = torch.float32, True  # before set_timesteps, as diffusers

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, solver_order: int = 2,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 algorithm_type: str = "dpmsolver++", solver_type: str = "midpoint", lower_order_final: bool = False,
                 use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 use_flow_sigmas: bool = False, flow_shift: float = 1.0, final_sigmas_type: str = "zero",
                 lambda_min_clipped: float = -float("inf"), variance_type: str = None,
                 use_dynamic_shifting: bool = False, time_shift_type: str = "exponential"):
        check_common(_WHO, prediction_type, PREDICTIONS, thresholding)
        # as diffusers: DEIS configs load as DPM-Solver++ (midpoint)
        algorithm_type = load_as(self, "algorithm_type", algorithm_type, ("deis",), "dpmsolver++")
        solver_type = load_as(self, "solver_type", solver_type, ("logrho", "bh1", "bh2"), "midpoint")
        check_choice(_WHO, "algorithm_type", algorithm_type, css.ALGORITHMS)
        check_choice(_WHO, "solver_type", solver_type, css.SOLVER_TYPES)
        check_choice(_WHO, "final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        if solver_order not in (1, 2, 3) or isinstance(solver_order, bool):
            raise unsupported(_WHO, "solver_order", solver_order, "supported: 1, 2, 3 (diffusers raises above 3)")
        if algorithm_type == "dpmsolver" and final_sigmas_type == "zero":
            raise ValueError(f"{_WHO}: final_sigmas_type='zero' is not supported with algorithm_type='dpmsolver' (as "
                             "diffusers: its step to sigma 0 multiplies 0 by inf); use final_sigmas_type='sigma_min'")
        if algorithm_type == "dpmsolver" and prediction_type == "flow_prediction":
            raise unsupported(_WHO, "prediction_type", prediction_type,
                              "diffusers' 'dpmsolver' conversion raises for it")
        check_one_conversion(_WHO, use_karras_sigmas=use_karras_sigmas, use_exponential_sigmas=use_exponential_sigmas,
                             use_beta_sigmas=use_beta_sigmas)
        if use_flow_sigmas and (use_karras_sigmas or use_exponential_sigmas or use_beta_sigmas):
            raise unsupported(_WHO, "use_flow_sigmas", True, "with a Karras/exponential/beta conversion diffusers "
                              "takes VE sigmas above 1 as flow times (alpha = 1 - sigma < 0: NaN samples)")
        self._init_training(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self.init_noise_sigma = 1.0
        self.order_list = []

    def set_timesteps(self, num_inference_steps: int = None, device=None, mu: float = None, timesteps=None):
        """diffusers' singlestep timesteps: N+1 linspace points below ``lambda_min_clipped`` (the last dropped),
        custom ``timesteps``, Karras/exponential/beta sigmas snapped to timesteps (Karras: rounded, else truncated),
        or flow sigmas (``flow_shift``, or e^mu for this call). As diffusers, ``lower_order_final`` is switched on
        (in the config) when N is no multiple of ``solver_order`` or the schedule ends at sigma 0."""
        cfg = self.config
        T = cfg.num_train_timesteps
        shift = cfg.flow_shift
        if mu is not None:
            shift = dynamic_shift(_WHO, cfg, mu)
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError(f"{_WHO}: pass exactly one of num_inference_steps and timesteps")
        conversion = next((key for key in _CONVERSIONS if cfg[key]), None)
        table = self.train_sigmas
        if timesteps is not None:
            if conversion:
                raise ValueError(f"{_WHO}: timesteps: custom timesteps cannot be used with {conversion}=True")
            ts = torch.as_tensor(np.asarray(timesteps).astype(np.int64))
            if ts.dim() != 1 or ts.numel() == 0 or (ts[1:] >= ts[:-1]).any() or ts[0] >= T or ts[-1] < 0:
                raise unsupported(_WHO, "timesteps", list(timesteps), f"expected a strictly decreasing list of ints in "
                                  f"[0, {T})")
            N = len(ts)
        else:
            N = num_inference_steps
            check_steps(_WHO, N)
        if conversion:
            ends = np.array([float(table[-1])] + [float(table[0])] * (N - 1))
            sig = convert_sigmas(cfg, ends)
            t_frac = timestep_labels.dpm_fractional(self, N, torch.from_numpy(sig))  # diffusers' own values
            ts = (t_frac.round() if cfg.use_karras_sigmas else t_frac).long()  # else truncated, as diffusers
            sig = sig.tolist()
        elif cfg.use_flow_sigmas:
            t = 1.0 - np.linspace(1, 1 / T, N + 1)
            t = np.flip(shift * t / (1 + (shift - 1) * t))[:-1].copy()
            ts = torch.from_numpy(t * T).long()  # float64 products truncated, as diffusers
            sig = (t / (1.0 - t)).tolist()  # flow time t is the VE sigma t/(1 - t)
        else:
            if timesteps is None:  # timesteps below the first t whose log-SNR is under lambda_min_clipped
                clipped = int((self._log_snr() < cfg.lambda_min_clipped).sum())
                ts = torch.from_numpy(np.linspace(0, T - 1 - clipped, N + 1).round()[::-1][:-1].astype(np.int64))
            sig = np.interp(ts.double().numpy(), np.arange(T), table.numpy()).tolist()
        final = 0.0 if cfg.final_sigmas_type == "zero" else float(table[0])  # diffusers' sigma_min: table[0]
        if cfg.use_flow_sigmas and final:  # ... which it takes as a flow time
            final = final / (1.0 - final)
        if not cfg.lower_order_final and (N % cfg.solver_order or cfg.final_sigmas_type == "zero"):
            self.register_to_config(lower_order_final=True)  # as diffusers (which warns)
        sigmas = sig + [final]
        orders = css.order_list(N, cfg.solver_order, self.config.lower_order_final, cfg.final_sigmas_type == "zero")
        for k, q in enumerate(orders):
            if q > 1 and any(sigmas[j] == sigmas[j + 1] for j in range(k - q + 1, k)):
                key = conversion or ("timesteps" if timesteps is not None else "num_inference_steps")
                value = cfg[key] if conversion else N if timesteps is None else list(timesteps)
                raise unsupported(_WHO, key, value, f"step {k} of order {q} spans a repeated sigma (a step of length "
                                  "0 inside its group, where diffusers divides by 0); use solver_order=1 or fewer "
                                  "steps")
        self._set_schedule(ts.to(torch.int64), device, N)
        self.sigmas_host = sigmas
        self.order_list = orders
        self._warm(device, ("single", 0))

    sigmas = DEISMultistepScheduler.sigmas
    _alpha = DEISMultistepScheduler._alpha
    add_noise = DEISMultistepScheduler.add_noise

    def _build(self, key):
        cfg = self.config
        sig = self.sigmas_host
        orders = css.effective_orders(self.order_list, key[1])
        alphas = [float(self._alpha(s)) for s in sig]
        flow = cfg.use_flow_sigmas

        def conv(i):
            sigma_t = alphas[i] * sig[i]
            return model_conversion(cfg.algorithm_type, cfg.prediction_type, alphas[i], sigma_t,
                                    sigma_t if flow else sig[i])

        rows, writes = css.scheduler_rows(sig, orders, alphas, conv, cfg.algorithm_type, cfg.solver_type)
        return coefs.table(rows), list(zip(orders, writes))

    def _buffers(self, x: torch.Tensor, first: bool) -> list:
        """The group's start sample, its raw model output and the order-2 call's model value (zeros at a loop's first
        step; same shape all loop)."""
        bufs = self.__dict__.get("_group")
        if first or bufs is None:
            bufs = self._group = [torch.zeros_like(x, memory_format=torch.contiguous_format) for _ in range(3)]
        elif bufs[0].shape != x.shape or bufs[0].dtype != x.dtype or bufs[0].device != x.device:
            raise ValueError(f"sample: shape/dtype/device changed during the loop (now {tuple(x.shape)} {x.dtype} "
                             f"{x.device}, was {tuple(bufs[0].shape)} {bufs[0].dtype} {bufs[0].device}); call "
                             "set_timesteps again")
        return bufs

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """One singlestep DPM-Solver step of diffusers' order at this step (``order_list``, lowered at the start of a
        loop begun mid-group) as one fused op; returns (prev_sample,). "sde-dpmsolver++" draws its noise from
        ``generator`` as diffusers does, else from the Philox stream (:meth:`set_seed`).

        model_output, sample: (B, ...) float tensors of one shape (learned variances: the first 3 channels of
        model_output are the prediction, as diffusers)."""
        cfg = self.config
        i = self._index(timestep)
        if cfg.variance_type in ("learned", "learned_range") and cfg.prediction_type == "epsilon":
            model_output = model_output[:, :3]
        x = self._state_in(sample, model_output)
        begin = self._loop_start  # set_begin_index's, or where a loop without it started
        key = ("single", begin)
        host, meta = self._plan(key)
        order, write = meta[i]
        xs, rs, m1 = self._buffers(x, i == begin)
        noise = None
        if cfg.algorithm_type == "sde-dpmsolver++":  # drawn in the converted output's dtype, as diffusers
            plain = (cfg.prediction_type == "sample")
            dtype = model_output.dtype if plain else torch.promote_types(sample.dtype, model_output.dtype)
            noise = self._draw(generator, model_output, x, dtype)
        slots = {}
        if order > 1:
            slots = {"history": xs, "history2": rs, "history3": m1 if order == 3 else None}
        if write == "start":
            slots.update(history_out=xs, x0_out=rs)
        elif write == "model":
            slots["history_out"] = m1
        noisy = float(host[i, coefs.S]) != 0.0  # host table: no device read
        seed = self._seed_for(x) if noisy and noise is None else None
        self._check_grad(x, model_output, stacklevel=3)
        prev = sampler_step(x, model_output, self._device_table(key, x.device), i, noise=noise if noisy else None,
                            seed=seed, backend=self.backend, **slots)
        self._advance()
        return self._output_prev_only(return_dict, prev)

    def loop_spec(self, begin: int = 0):
        """The fused loop (Level 2, :mod:`diffkern.diffusers.loop_spec`) of this schedule from step ``begin``:
        ``dpmsolver_single`` with diffusers' orders of those steps (a loop begun mid-group starts it anew), or for the
        SDE at first order every step ``sde(lam=1)``. A last first-order step from sigma_min to itself (Karras ends,
        ``final_sigmas_type="sigma_min"``) is the identity and is dropped."""
        from .loop_spec import LoopSpec, _unsupported

        cfg = self.config
        if cfg.use_flow_sigmas:
            raise _unsupported(_WHO, "use_flow_sigmas", True, "the UNet pipelines' loop runs VP schedules")
        if cfg.prediction_type == "flow_prediction":
            raise _unsupported(_WHO, "prediction_type", "flow_prediction", "on a VP schedule diffusers takes "
                               "x0 = z - sigma*v with the VE sigma, which no wrapper conversion gives")
        orders = css.effective_orders(self.order_list, begin)[begin:]
        ts, sig = list(self._host_timesteps)[begin:], list(self.sigmas_host)[begin:]
        conversion = next((key for key in _CONVERSIONS if cfg[key]), None)
        if math.isclose(sig[-1], sig[-2], rel_tol=1e-9):
            if orders[-1] > 1 or len(ts) == 1:
                raise _unsupported(_WHO, "final_sigmas_type", "sigma_min", f"its last step (order {orders[-1]}) ends "
                                   "at the sigma it starts from; the fused loop needs strictly decreasing sigmas")
            orders, ts, sig = orders[:-1], ts[:-1], sig[:-1]
        for i, (a, b) in enumerate(zip(sig[:-1], sig[1:])):
            if b >= a:
                key = conversion or "num_inference_steps"
                raise _unsupported(_WHO, key, cfg[key] if conversion else self.num_inference_steps,
                                   f"step {i} goes from sigma {a:.6g} to {b:.6g}; the fused loop needs strictly "
                                   "decreasing sigmas")
        if cfg.algorithm_type == "sde-dpmsolver++":
            if max(orders) > 1:
                raise _unsupported(_WHO, "algorithm_type", cfg.algorithm_type, f"with solver_order="
                                   f"{cfg.solver_order} its later calls of a group restart from the group's first "
                                   "sample with fresh noise, which a row over the previous state cannot undo; use "
                                   "solver_order=1 or the drop-in scheduler")
            return LoopSpec("sde", sig, ts, {"lam": 1.0}, vp=True)
        knobs = {"solver_type": cfg.solver_type, "predict_x0": cfg.algorithm_type == "dpmsolver++",
                 "orders": tuple(orders)}
        return LoopSpec("dpmsolver_single", sig, ts, knobs, vp=True)
