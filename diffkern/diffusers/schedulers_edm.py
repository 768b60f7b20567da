"""Fused drop-ins for diffusers' EDM schedulers (Karras et al. 2022 preconditioning): ``EDMEulerScheduler`` and
``EDMDPMSolverMultistepScheduler`` (Playground v2.5, CosXL and other EDM-trained models).

The state is the VE sample x itself (no alpha). The network gets ``c_in*x`` (:meth:`scale_model_input`) and the
timestep ``c_noise = log(sigma)/4`` (``timesteps``); its output m becomes the denoised sample through diffusers'
``precondition_outputs``, ``D = c_skip x + c_out m``, which is the fused op's conversion slot pair (p, q). Each
step is then one fused row: Euler (:func:`diffkern.coef_tables.euler`, churn as diffusers' ``s_churn``) or
DPM-Solver++ orders 1-3, ODE or SDE (:func:`diffkern.coef_tables_3m.dpmsolver_multistep`, orders picked by
:func:`~diffkern.coef_tables_3m.dpmsolver_orders`), with no VP rewrite.

Sigmas follow diffusers' formulas with its intermediate dtypes (Euler's Karras ramp in float64, the DPM one and
both exponential schedules in float32) but are kept in float64 where diffusers rounds them to float32.
"""
from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import register_to_config

from .. import coef_tables, coef_tables_3m, wrappers
from .config_checks import check_choice, check_common, load_as, unsupported
from .schedulers import FusedScheduler
from .scheduler_utils import check_steps


class _EDMScheduler(FusedScheduler):
    """Shared EDM machinery: config checks, sigma schedule, preconditioning, ``add_noise``."""

    _locate_start = True  # no set_begin_index: the first step's timestep gives its index, as diffusers
    _predictions = ("epsilon", "v_prediction")
    _karras_ramp_dtype = torch.float64

    def _init_edm(self, init_ramp: torch.Tensor, init_final_zero: bool) -> None:
        who, cfg = type(self).__name__, self.config
        check_choice(who, "sigma_schedule", cfg.sigma_schedule, ("karras", "exponential"))
        check_choice(who, "prediction_type", cfg.prediction_type, self._predictions)
        check_choice(who, "final_sigmas_type", cfg.final_sigmas_type, ("zero", "sigma_min"))
        if not 0 < cfg.sigma_min < cfg.sigma_max:
            key = "sigma_min" if cfg.sigma_min <= 0 else "sigma_max"
            raise unsupported(who, key, cfg[key], f"need 0 < sigma_min={cfg.sigma_min!r} < sigma_max={cfg.sigma_max!r}")
        if not cfg.rho > 0:
            raise unsupported(who, "rho", cfg.rho, "need rho > 0")
        if not cfg.sigma_data > 0:
            raise unsupported(who, "sigma_data", cfg.sigma_data, "need sigma_data > 0")
        self._init_state()
        # before set_timesteps: diffusers' training-length schedule (its timesteps and sigmas)
        sig = self._edm_sigmas(init_ramp)
        self.timesteps = self._c_noise(sig)
        self._init_t = self.timesteps.tolist()
        self.sigmas_host = sig.tolist() + [0.0 if init_final_zero else float(sig[-1])]

    @property
    def init_noise_sigma(self) -> float:
        """``sqrt(sigma_max^2 + 1)``, as diffusers' EDM schedulers."""
        return (self.config.sigma_max ** 2 + 1) ** 0.5

    def _edm_sigmas(self, ramp: torch.Tensor) -> torch.Tensor:
        """Decreasing float64 sigmas (n,) of a ramp in [0, 1] (Karras) or of its length (exponential: diffusers' float32
        log-linear schedule ignores the ramp's values)."""
        cfg = self.config
        if cfg.sigma_schedule == "karras":
            lo, hi = cfg.sigma_min ** (1 / cfg.rho), cfg.sigma_max ** (1 / cfg.rho)
            return ((hi + ramp.to(self._karras_ramp_dtype) * (lo - hi)) ** cfg.rho).double()
        return torch.linspace(math.log(cfg.sigma_min), math.log(cfg.sigma_max), len(ramp)).exp().flip(0).double()

    @staticmethod
    def _c_noise(sigmas: torch.Tensor) -> torch.Tensor:
        """The network timesteps ``log(sigma)/4`` of the float32-rounded sigmas, in float32 throughout: diffusers'
        ``precondition_noise`` bit for bit (a user may pass its timesteps to ours)."""
        return 0.25 * sigmas.to(torch.float32).log()

    def _install(self, sig: torch.Tensor, final: float, device, num_inference_steps) -> None:
        who = type(self).__name__
        if not bool((sig > 0).all()) or not bool(torch.isfinite(sig).all()):
            raise unsupported(who, "sigmas", sig.tolist()[:4], "the schedule's sigmas must be positive and finite "
                              "(c_noise = log(sigma)/4)")
        self._set_schedule(self._c_noise(sig), device, num_inference_steps)
        self.sigmas_host = sig.tolist() + [final]

    def _edm_conv(self, sigma: float) -> dict:
        """diffusers' ``precondition_outputs`` at ``sigma`` as the fused conversion ``D = p x + q m``."""
        cfg = self.config
        p, q = wrappers.conversion("edm", sigma, cfg.sigma_data)
        return {"p": p, "q": -q if cfg.prediction_type == "v_prediction" else q}

    # -- diffusers' preconditioning helpers ----------------------------------------------------------------

    def precondition_inputs(self, sample: torch.Tensor, sigma) -> torch.Tensor:
        """``sample * c_in``, ``c_in = 1/sqrt(sigma^2 + sigma_data^2)``."""
        return sample * (1 / ((sigma ** 2 + self.config.sigma_data ** 2) ** 0.5))

    def precondition_noise(self, sigma) -> torch.Tensor:
        """``log(sigma)/4`` as a tensor (diffusers' c_noise)."""
        return 0.25 * torch.log(sigma if isinstance(sigma, torch.Tensor) else torch.tensor([sigma]))

    def precondition_outputs(self, sample: torch.Tensor, model_output: torch.Tensor, sigma) -> torch.Tensor:
        """The denoised sample ``c_skip*sample + c_out*model_output`` (eager; ``step`` fuses it)."""
        sd = self.config.sigma_data
        c_out = sigma * sd / (sigma ** 2 + sd ** 2) ** 0.5
        c_out = -c_out if self.config.prediction_type == "v_prediction" else c_out
        return sd ** 2 / (sigma ** 2 + sd ** 2) * sample + c_out * model_output

    is_scale_input_called = False  # diffusers' flag; set by scale_model_input

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """``c_in * sample`` at the current step's sigma (from the host schedule)."""
        sigma = self.sigmas_host[self._index(timestep)]
        self.is_scale_input_called = True
        return sample * (1.0 / math.sqrt(sigma * sigma + self.config.sigma_data ** 2))

    # -- add_noise -------------------------------------------------------------------------------------------

    _missing_is_last = False  # a timestep not in the schedule: the last step's sigma (DPM), else exp(4 t)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """``original_samples + sigma*noise``, sigma picked as diffusers picks it: after ``set_begin_index`` the
        current step's; else that of each timestep's position in ``timesteps`` (the second of two equal ones). A
        timestep not in the schedule gets ``exp(4 t)`` (the sigma whose c_noise it is; diffusers' Euler raises) or,
        for DPM-Solver, the last step's sigma as diffusers. Matched on the device, no synchronisation."""
        dev, dtype = original_samples.device, original_samples.dtype
        view = (-1,) + (1,) * (original_samples.dim() - 1)
        t = torch.as_tensor(timesteps).to(dev).reshape(-1)
        host_t = self._host_timesteps if self._host_timesteps is not None else self._init_t
        sig = torch.tensor(self.sigmas_host[:len(host_t)], dtype=torch.float64, device=dev)
        if self._host_timesteps is not None and self._begin_index is not None:
            k = self._step_index if self._step_index is not None else self._begin_index
            sigma = sig[k].expand(t.shape)
        else:
            sched = torch.tensor(host_t, dtype=torch.float32, device=dev)
            hit = sched[None, :] == t.to(torch.float32)[:, None]
            count = hit.sum(1)
            pick = hit & (hit.cumsum(1) == count.clamp(max=2)[:, None])
            missing = sig[-1].expand(t.shape) if self._missing_is_last else (4.0 * t.to(torch.float64)).exp()
            sigma = torch.where(count > 0, sig[pick.int().argmax(1)], missing)
        return original_samples + noise * sigma.to(dtype).view(view)


class EDMEulerScheduler(_EDMScheduler):
    """Drop-in for ``diffusers.EDMEulerScheduler``: one fused op per step (two on churn steps, where the sample is
    perturbed first, as diffusers' ``s_churn``). ``step`` also takes diffusers' ``pred_original_sample`` (a
    denoised sample that replaces the preconditioned model output)."""

    _vp_state = False  # diffusers computes in float32 and returns the model output's dtype

    @register_to_config
    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5,
                 sigma_schedule: str = "karras", num_train_timesteps: int = 1000, prediction_type: str = "epsilon",
                 rho: float = 7.0, final_sigmas_type: str = "zero"):
        T = num_train_timesteps
        self._init_edm(torch.arange(T + 1, dtype=torch.float64) / T, final_sigmas_type == "zero")
        self._host_timesteps = self._init_t  # diffusers' step() runs on it before set_timesteps too

    def set_timesteps(self, num_inference_steps: int = None, device=None, sigmas=None):
        """``timesteps`` (c_noise, float32) and ``sigmas`` of ``num_inference_steps`` steps, or of ``sigmas``: as in
        diffusers, a ramp in [0, 1] that the Karras schedule maps to sigmas (the exponential one takes its length)."""
        who = "EDMEulerScheduler"
        if sigmas is None:
            N = num_inference_steps
            check_steps(who, N)
            ramp = torch.linspace(0, 1, N, dtype=torch.float64)
        else:
            ramp = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1).cpu()
            if ramp.numel() == 0:
                raise ValueError(f"{who}: sigmas must be a non-empty 1-D sequence (a ramp in [0, 1])")
        sig = self._edm_sigmas(ramp)
        final = 0.0 if self.config.final_sigmas_type == "zero" else float(sig[-1])
        self._install(sig, final, device, num_inference_steps)
        self._warm(device, ("euler", 0.0, 0.0, math.inf, 1.0, False))

    def _build(self, key):
        _, s_churn, s_tmin, s_tmax, s_noise, given_x0 = key
        # a given pred_original_sample is D itself: the identity conversion
        plan = coef_tables.euler(self.sigmas_host, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise,
                                 conv=(lambda s: {}) if given_x0 else self._edm_conv)
        return plan.table, plan

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             return_dict: bool = True, pred_original_sample: torch.Tensor = None):
        """One EDM Euler step (churn as diffusers when ``s_churn > 0``, its noise from ``generator`` as diffusers draws
        it, else Philox); returns (prev_sample, pred_original_sample)."""
        if (isinstance(timestep, int) and not isinstance(timestep, bool)) or \
                (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError("timestep: expected one of scheduler.timesteps (a float c_noise value), got an integer; "
                             "integer step indices are not timesteps")
        i = self._index(timestep)
        given = pred_original_sample is not None
        key = ("euler", float(s_churn), float(s_tmin), float(s_tmax), float(s_noise), given)
        _, plan = self._plan(key)
        x = self._state_in(sample, model_output)
        if plan.sigma_hat[i] > self.sigmas_host[i]:  # diffusers draws churn noise whenever gamma > 0
            noise = self._draw(generator, model_output, x)
            if plan.churn[i]:
                x, _ = self._fused(key, plan.churn_row + i, x, x, noise=noise, x0=False)
        m = pred_original_sample.to(x.dtype) if given else model_output
        prev, x0 = self._fused(key, i, x, m, x0=not given)
        self._advance()
        return self._output(return_dict, prev, pred_original_sample if given else x0)


class EDMDPMSolverMultistepScheduler(_EDMScheduler):
    """Drop-in for ``diffusers.EDMDPMSolverMultistepScheduler``: DPM-Solver++ orders 1-3 (``solver_type`` midpoint or
    heun) and its SDE ("sde-dpmsolver++", orders 1-2), ``lower_order_final``, ``euler_at_final``,
    ``final_sigmas_type``; one fused op per step, the previous denoised samples on the device.

    Unsupported: ``thresholding``, ``prediction_type="sample"`` (diffusers' preconditioning raises for it), and a
    third-order SDE step (diffusers has none: its third-order update is undefined there)."""

    _missing_is_last = True
    _karras_ramp_dtype = torch.float32  # diffusers' DPM ramp is float32 linspace

    @register_to_config
    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5,
                 sigma_schedule: str = "karras", num_train_timesteps: int = 1000, prediction_type: str = "epsilon",
                 rho: float = 7.0, solver_order: int = 2, thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 algorithm_type: str = "dpmsolver++", solver_type: str = "midpoint", lower_order_final: bool = True,
                 euler_at_final: bool = False, final_sigmas_type: str = "zero"):
        who = "EDMDPMSolverMultistepScheduler"
        # as diffusers: DEIS/UniPC configs load as DPM-Solver++ (midpoint)
        load_as(self, "algorithm_type", algorithm_type, ("deis",), "dpmsolver++")
        load_as(self, "solver_type", solver_type, ("logrho", "bh1", "bh2"), "midpoint")
        cfg = self.config
        check_choice(who, "algorithm_type", cfg.algorithm_type, ("dpmsolver++", "sde-dpmsolver++"))
        check_choice(who, "solver_type", cfg.solver_type, coef_tables.SOLVER_TYPES)
        check_choice(who, "solver_order", solver_order, (1, 2, 3))
        check_common(who, cfg.prediction_type, self._predictions, thresholding)
        self._init_edm(torch.linspace(0, 1, num_train_timesteps), True)
        # diffusers' scale_model_input (and index_for_timestep) run on it before set_timesteps; its step() raises
        self._host_timesteps = self._init_t

    def set_timesteps(self, num_inference_steps: int = None, device=None):
        """``timesteps`` (c_noise, float32) and ``sigmas`` of ``num_inference_steps`` steps, as diffusers."""
        who = "EDMDPMSolverMultistepScheduler"
        cfg = self.config
        N = num_inference_steps
        check_steps(who, N)
        sig = self._edm_sigmas(torch.linspace(0, 1, N))
        self._install(sig, 0.0 if cfg.final_sigmas_type == "zero" else float(cfg.sigma_min), device, N)
        if self.eta and 3 in self._orders(0):
            raise unsupported(who, "solver_order", 3, f"with algorithm_type='sde-dpmsolver++' and {N} steps a step "
                              "is of third order, where diffusers' update is undefined; use solver_order=2")
        if self.eta and self.sigmas_host[-1] > self.sigmas_host[-2]:
            raise unsupported(who, "final_sigmas_type", "sigma_min", f"with algorithm_type='sde-dpmsolver++' the last "
                              f"step rises from sigma {self.sigmas_host[-2]!r} (the schedule's float32 end) to "
                              f"sigma_min={cfg.sigma_min!r}: the SDE noise std is the root of a negative number "
                              "(diffusers returns NaN)")
        self._warm(device, ("dpm", 0))

    @property
    def eta(self) -> float:
        """1 for "sde-dpmsolver++" (the SDE), else 0."""
        return 1.0 if self.config.algorithm_type == "sde-dpmsolver++" else 0.0

    def _orders(self, begin: int) -> list[int]:
        cfg = self.config
        return coef_tables_3m.dpmsolver_orders(len(self.sigmas_host) - 1, solver_order=cfg.solver_order,
                                               lower_order_final=cfg.lower_order_final,
                                               euler_at_final=cfg.euler_at_final, begin=begin)

    def _build(self, key):
        cfg = self.config
        # a step to sigma = 0 is the jump x' = D at any order: diffusers' first order there (final_sigmas_type="zero")
        plan = coef_tables_3m.dpmsolver_multistep(self.sigmas_host, self._orders(key[1]), sde=bool(self.eta),
                                                  solver_type=cfg.solver_type, conv=self._edm_conv)
        return plan.table, None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """One DPM-Solver++ step (first order on the loop's first step and as configured at the end); returns
        (prev_sample,). The SDE's noise is drawn from ``generator`` as diffusers draws it (every step, in the model
        output's dtype), else Philox."""
        if self.num_inference_steps is None:  # as diffusers' (its training schedule is for scale_model_input only)
            raise ValueError("EDMDPMSolverMultistepScheduler: call set_timesteps(num_inference_steps) before step")
        i = self._index(timestep)
        x = self._state_in(sample, model_output)
        begin = self._loop_start  # set_begin_index's, or where a loop without it started
        history, history2, _, history_out = self._history_slots(x, i, i == begin, 2 if self.config.solver_order == 3
                                                             else 1)
        noise = self._draw(generator, model_output, x) if self.eta else None
        prev, _ = self._fused(("dpm", begin), i, x, model_output, noise=noise, history=history, history2=history2,
                              history_out=history_out, x0=False)
        self._advance()
        return self._output_prev_only(return_dict, prev)
