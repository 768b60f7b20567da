"""Fused DDIM, DDPM and DPM-Solver++ schedulers: the sample is the VP state ``z`` (as in diffusers).

DDIM rows are :func:`diffkern.ops.ddim_row` (the diffusers-exact VP step). DDPM's posterior step is the
DDIM(eta=1) row on the clipped x0 (``math-samplers.md`` 5: same mean and, for "fixed_small", the same
variance), with the noise scale replaced for "fixed_large". DPM-Solver++(2M) rows are
:func:`diffkern.coef_tables.dpmpp_2m` (VE) rewritten for the VP state, third-order ones
:func:`diffkern.coef_tables_3m.dpmsolver_multistep`.
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config

from .. import coef_tables, coef_tables_3m, schedules, wrappers
from ..ops import coefs, ddim_row
from . import scheduler_custom, scheduler_tables, timestep_labels
from .config_checks import check_choice, check_common, check_one_conversion, dynamic_shift, load_as, unsupported
from .schedulers import FusedScheduler, ve_row_to_vp
from .scheduler_lookup import previous_timestep
from .scheduler_utils import check_steps

_VP_PREDICTIONS = ("epsilon", "v_prediction", "sample")


def _check_common(who, prediction_type, thresholding, timestep_spacing):
    check_common(who, prediction_type, _VP_PREDICTIONS, thresholding, timestep_spacing)


class _VPScheduler(FusedScheduler):
    """DDIM/DDPM: integer timesteps; DDIM steps from ``t`` to ``t - T//N``, DDPM to the next timestep."""
    _locate_start = True  # no set_begin_index: the first step's timestep gives its index, as diffusers

    _next_is_prev = False
    _zero_snr_floor = None  # zero terminal SNR: alpha-bar(T-1) = 0, as diffusers' DDIM/DDPM

    def _check_zero_snr(self) -> None:
        """An epsilon prediction cannot give x0 where alpha-bar is 0 (zero terminal SNR at t = T-1): diffusers
        divides by 0 there (inf/NaN samples); refuse the schedule instead."""
        cfg = self.config
        if cfg.prediction_type == "epsilon" and any(float(self.alphas_cumprod[int(t)]) == 0.0
                                                    for t in self._host_timesteps):
            raise unsupported(type(self).__name__, "rescale_betas_zero_snr", True,
                              "with prediction_type='epsilon' the step at t = num_train_timesteps - 1, where alpha-bar "
                              "is 0, divides by 0; use v_prediction, or a spacing that skips that timestep")

    def _alpha_pairs(self, final: float) -> list[tuple[float, float]]:
        """(alpha-bar at t, alpha-bar at the step's target) per step, as diffusers' ``previous_timestep``."""
        ab = self.alphas_cumprod
        pairs = []
        for i, t in enumerate(self._host_timesteps):
            prev = self._prev[i]
            pairs.append((float(ab[int(t)]), float(ab[prev]) if prev >= 0 else final))
        return pairs

    def _set_vp_timesteps(self, num_inference_steps, device, custom=None):
        who = type(self).__name__
        T = self.config.num_train_timesteps
        if custom is not None:
            ts = scheduler_custom.int_timesteps(who, custom, T)
            self._set_schedule(ts, device, None)
            self._prev = ts.tolist()[1:] + [-1]
            return
        check_steps(who, num_inference_steps, T)
        cfg = self.config
        if cfg.timestep_spacing == "leading" and (num_inference_steps - 1) * (T // num_inference_steps) \
                + cfg.steps_offset >= T:
            raise unsupported(who, "steps_offset", cfg.steps_offset,
                              f"with {num_inference_steps} 'leading' steps it pushes the first timestep past {T - 1} "
                              "(diffusers fails there)")
        ts = schedules.timesteps(num_inference_steps, T, cfg.timestep_spacing, cfg.steps_offset)
        self._set_schedule(ts, device, num_inference_steps)
        if self._next_is_prev:  # diffusers' DDPM steps to the next timestep of the list (-1 after the last)
            self._prev = ts.tolist()[1:] + [-1]
        else:  # diffusers' DDIM steps from t to t - T//N whatever the spacing
            self._prev = [int(t) - T // num_inference_steps for t in ts]

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """``sqrt(ab[t])*x0 + sqrt(1 - ab[t])*noise`` with per-sample timesteps (B,) or one timestep (a number or a
        (1,) tensor) (a device gather, no sync)."""
        signal, noise_level = self._vp_coefficients(original_samples, timesteps)
        return signal * original_samples + noise_level * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """The v-prediction target ``sqrt(ab[t])*noise - sqrt(1 - ab[t])*sample`` (diffusers' ``get_velocity``, what
        v-prediction training scripts regress on). sample, noise: (B, ...) float; timesteps as :meth:`add_noise`
        takes them ((B,) or one timestep); returns (B, ...) in sample's dtype, the coefficients rounded once from
        the float64 table (a device gather, no sync)."""
        signal, noise_level = self._vp_coefficients(sample, timesteps)
        return signal * noise - noise_level * sample

    def _vp_coefficients(self, like: torch.Tensor, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(ab[t]), sqrt(1 - ab[t])) at per-sample timesteps (B,) or one timestep, shaped to broadcast against
        ``like`` (B, ...) and rounded once from the float64 table to its dtype (a device gather, no sync)."""
        t = torch.as_tensor(timesteps).to(like.device).reshape(-1).long()
        ab = self.alphas_cumprod.to(like.device)[t]
        view = (-1,) + (1,) * (like.dim() - 1)
        return ab.sqrt().to(like.dtype).view(view), (1 - ab).sqrt().to(like.dtype).view(view)


class DDIMScheduler(_VPScheduler):
    """Drop-in for ``diffusers.DDIMScheduler`` (same config, timesteps and outputs); one fused op per step.

    Unsupported: ``thresholding=True``; ``rescale_betas_zero_snr=True`` with epsilon prediction on a schedule that
    reaches t = T-1 (where diffusers divides by 0).
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, clip_sample: bool = True,
                 set_alpha_to_one: bool = True, steps_offset: int = 0, prediction_type: str = "epsilon",
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading",
                 rescale_betas_zero_snr: bool = False):
        _check_common("DDIMScheduler", prediction_type, thresholding, timestep_spacing)
        self._init_training(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                            rescale_betas_zero_snr)
        self._final_alpha_cumprod = 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])
        self.init_noise_sigma = 1.0

    final_alpha_cumprod = scheduler_tables.final_alpha_cumprod

    def set_timesteps(self, num_inference_steps: int, device=None):
        """``timesteps`` as diffusers' DDIM makes them ("leading", "trailing", "linspace", ``steps_offset``)."""
        self._set_vp_timesteps(num_inference_steps, device)
        self._check_zero_snr()
        self._warm(device, ("ddim", 0.0, False))

    def _build(self, key):
        _, eta, clipped = key
        cfg = self.config
        rows = [ddim_row(ab, ab_prev, eta=eta, prediction_type=cfg.prediction_type, clip_sample=cfg.clip_sample,
                         clip_sample_range=cfg.clip_sample_range, use_clipped_model_output=clipped)
                for ab, ab_prev in self._alpha_pairs(self._final_alpha_cumprod)]
        return coefs.table(rows), None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise: torch.Tensor = None,
             return_dict: bool = True):
        """One DDIM(eta) step from ``timesteps[step_index]``; returns (prev_sample, pred_original_sample).

        model_output, sample: (B, ...) float tensors of one shape. Noise (eta > 0): ``variance_noise``, else
        drawn from ``generator`` as diffusers does, else the Philox stream (:meth:`set_seed`).
        """
        i = self._index(timestep)
        if eta > 0 and variance_noise is not None and generator is not None:
            raise ValueError("Cannot pass both generator and variance_noise. Please make sure that either "
                             "`generator` or `variance_noise` stays `None`.")
        x = self._state_in(sample, model_output)
        noise = None
        if eta > 0:
            noise = variance_noise.to(x.dtype) if variance_noise is not None else self._draw(generator, model_output, x)
        prev, x0 = self._fused(("ddim", float(eta), bool(use_clipped_model_output)), i, x, model_output, noise=noise)
        self._advance()
        return self._output(return_dict, prev, x0)


_DDPM_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", None)  # None acts as fixed_small


class DDPMScheduler(_VPScheduler):
    """Drop-in for ``diffusers.DDPMScheduler``; one fused op per step.

    Unsupported: learned variances and "fixed_large_log" (``variance_type``), ``thresholding=True``,
    ``rescale_betas_zero_snr=True`` with epsilon prediction on a schedule reaching t = T-1, beta schedules other
    than linear/scaled_linear/squaredcos_cap_v2.
    """

    _next_is_prev = True
    previous_timestep = previous_timestep  # diffusers' public helper: the timestep the step at t targets

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, variance_type: str = "fixed_small",
                 clip_sample: bool = True, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False):
        _check_common("DDPMScheduler", prediction_type, thresholding, timestep_spacing)
        check_choice("DDPMScheduler", "variance_type", variance_type, _DDPM_VARIANCES)
        self._init_training(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                            rescale_betas_zero_snr)
        self.init_noise_sigma = 1.0
        self.custom_timesteps = False
        self.variance_type = variance_type
        self.one = torch.tensor(1.0)  # diffusers' attribute: the alpha-bar before t = 0 (ours: a host float)

    def set_timesteps(self, num_inference_steps: int = None, device=None, timesteps=None):
        """diffusers' DDPM timesteps, or custom decreasing ``timesteps`` (each step then targets the next one)."""
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        self.custom_timesteps = timesteps is not None
        self._set_vp_timesteps(num_inference_steps, device, custom=timesteps)
        self._check_zero_snr()
        self._warm(device, ("ddpm",))

    def _build(self, key):
        cfg = self.config
        rows = []
        for ab, ab_prev in self._alpha_pairs(1.0):
            row = ddim_row(ab, ab_prev, eta=1.0, prediction_type=cfg.prediction_type, clip_sample=cfg.clip_sample,
                           clip_sample_range=cfg.clip_sample_range, use_clipped_model_output=True)
            beta_t = 1.0 - ab / ab_prev
            if cfg.variance_type == "fixed_large":
                row[coefs.S] = beta_t ** 0.5
            else:  # diffusers clamps the posterior variance at 1e-20 before its square root
                row[coefs.S] = max((1 - ab_prev) / (1 - ab) * beta_t, 1e-20) ** 0.5
            rows.append(row)
        # diffusers adds noise only while t > 0
        noisy = [t > 0 for t in self._host_timesteps]
        for row, on in zip(rows, noisy):
            if not on:
                row[coefs.S] = 0.0
        return coefs.table(rows), noisy

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """One DDPM posterior step; returns (prev_sample, pred_original_sample). Noise while t > 0, from
        ``generator`` as diffusers draws it, else the Philox stream (:meth:`set_seed`)."""
        i = self._index(timestep)
        x = self._state_in(sample, model_output)
        _, noisy = self._plan(("ddpm",))
        noise = self._draw(generator, model_output, x) if noisy[i] else None
        prev, x0 = self._fused(("ddpm",), i, x, model_output, noise=noise)
        self._advance()
        return self._output(return_dict, prev, x0)


class DPMSolverMultistepScheduler(scheduler_tables.LogSNRTables, FusedScheduler):
    """Drop-in for ``diffusers.DPMSolverMultistepScheduler`` with ``algorithm_type="dpmsolver++"`` or
    ``"sde-dpmsolver++"`` (orders 1, 2 and 3, ``solver_type`` "midpoint" or "heun"): the rows of
    :func:`~diffkern.coef_tables.dpmpp_2m_sde` at eta = 0 or 1 (order 3:
    :func:`~diffkern.coef_tables_3m.dpmsolver_multistep`); the history (previous x0 estimate; order 3: the two
    previous, in two buffers that swap roles) stays on the device. The SDE's noise is diffusers' (``variance_noise``,
    else ``generator``) or, with neither, Philox.

    Unsupported: the dpmsolver (non-++) algorithm types, thresholding, learned variances, Lu
    lambdas, beta/flow sigmas, ``lambda_min_clipped`` with "trailing" spacing, dynamic shifting.
    """
    _locate_start = True  # no set_begin_index: the first step's timestep gives its index, as diffusers
    _missing_is_last = True  # index_for_timestep/add_noise: a timestep not in the schedule is the last one's
    _train_timesteps_dtype, _train_sigmas_before = torch.float32, True  # before set_timesteps, as diffusers

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, solver_order: int = 2,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995,
                 sample_max_value: float = 1.0, algorithm_type: str = "dpmsolver++", solver_type: str = "midpoint",
                 lower_order_final: bool = True, euler_at_final: bool = False, use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False, use_lu_lambdas: bool = False,
                 use_flow_sigmas: bool = False, flow_shift: float = 1.0, final_sigmas_type: str = "zero",
                 lambda_min_clipped: float = -float("inf"), variance_type=None, timestep_spacing: str = "linspace",
                 steps_offset: int = 0, rescale_betas_zero_snr: bool = False, use_dynamic_shifting: bool = False,
                 time_shift_type: str = "exponential"):
        who = "DPMSolverMultistepScheduler"
        _check_common(who, prediction_type, thresholding, timestep_spacing)
        # as diffusers: DEIS/UniPC configs load as DPM-Solver++ (midpoint)
        algorithm_type = load_as(self, "algorithm_type", algorithm_type, ("deis",), "dpmsolver++")
        solver_type = load_as(self, "solver_type", solver_type, ("logrho", "bh1", "bh2"), "midpoint")
        check_choice(who, "algorithm_type", algorithm_type, ("dpmsolver++", "sde-dpmsolver++"))
        check_choice(who, "solver_order", solver_order, (1, 2, 3))
        check_choice(who, "solver_type", solver_type, coef_tables.SOLVER_TYPES)
        check_choice(who, "final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        # any variance_type loads, as in diffusers (a DDPM config's "fixed_small"); learned ones are sliced in step()
        check_one_conversion(who, use_karras_sigmas=use_karras_sigmas, use_exponential_sigmas=use_exponential_sigmas)
        for option, value in (("use_beta_sigmas", use_beta_sigmas),
                              ("use_lu_lambdas", use_lu_lambdas), ("use_flow_sigmas", use_flow_sigmas),
                              ("use_dynamic_shifting", use_dynamic_shifting)):
            if value:
                raise unsupported(who, option, value, "not implemented")
        if lambda_min_clipped != -float("inf") and timestep_spacing == "trailing":
            raise unsupported(who, "lambda_min_clipped", lambda_min_clipped,
                              "with 'trailing' spacing (there diffusers' clipped arange can end at t = -1)")
        self._init_training(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                            rescale_betas_zero_snr)
        self.init_noise_sigma = 1.0

    def set_timesteps(self, num_inference_steps: int = None, device=None, mu: float = None, timesteps=None):
        """diffusers' DPM-Solver timesteps (N+1 point spacings, Karras sigmas snapped to rounded timesteps), or custom
        integer training ``timesteps`` (N; the sigmas interpolated at them), as diffusers (the same argument checks).
        ``mu`` needs ``use_dynamic_shifting``, which is not implemented: passing it raises, naming it."""
        cfg = self.config
        T = cfg.num_train_timesteps
        N = num_inference_steps
        who = "DPMSolverMultistepScheduler"
        if mu is not None:
            dynamic_shift(who, cfg, mu)
        custom = scheduler_custom.dpm_checks(cfg, N, timesteps)
        table = self.train_sigmas
        karras, exponential = cfg.use_karras_sigmas, cfg.use_exponential_sigmas
        if custom:
            final = 0.0 if cfg.final_sigmas_type == "zero" else float(table[0])  # (checked: sigmas must decrease)
            ts, sig = scheduler_custom.from_timesteps(self, timesteps, np.int64, final)
            ts, sig, N = ts.long(), torch.tensor(sig[:-1], dtype=torch.float64), len(sig) - 1
        elif check_steps(who, N) and (karras or exponential):
            # the spacing plays no part: timesteps come from the sigmas
            # diffusers reads sigma_min/sigma_max whenever the config has them (one loaded from an Euler config)
            lo, hi = cfg.get("sigma_min"), cfg.get("sigma_max")
            lo, hi = float(table[0]) if lo is None else lo, float(table[-1]) if hi is None else hi
            sig = (schedules.karras if karras else schedules.loglinear)(N, lo, hi)[:-1]
            t_frac = timestep_labels.dpm_fractional(self, N, sig)  # diffusers' own values
            # Karras timesteps rounded (but for the cosine schedule), then truncated to int64 as diffusers casts
            ts = t_frac.round() if karras and cfg.beta_schedule != "squaredcos_cap_v2" else t_frac
            ts = ts.long()
        else:
            if N > T or (N == T and cfg.timestep_spacing != "trailing"):  # N (+1) points over T timesteps
                raise unsupported(who, "timestep_spacing", cfg.timestep_spacing,
                                  f"with num_inference_steps={N} and num_train_timesteps={T} it repeats a timestep "
                                  "(diffusers then returns NaN or fails); use 'trailing' (N <= T) or Karras sigmas")
            # lambda_min_clipped: the timesteps stop below the first t whose log-SNR lambda(t) is under it
            last = T - int((self._log_snr().flip(0) < cfg.lambda_min_clipped).sum())
            if cfg.timestep_spacing == "trailing":
                ts = schedules.timesteps(N, T, "trailing")
            elif cfg.timestep_spacing == "leading":  # N+1 points, the last (t = 0) dropped, then the offset
                # (which may push the first ones past T - 1: diffusers takes them at the largest training sigma)
                ts = torch.arange(N, 0, -1, dtype=torch.int64) * (last // (N + 1)) + cfg.steps_offset
            elif last == T:  # N+1 points, the last (t = 0) dropped
                ts = schedules.timesteps(N + 1, T, cfg.timestep_spacing)[:-1]
            else:  # numpy's linspace, rounded half to even, as diffusers
                ts = torch.from_numpy(np.linspace(0, last - 1, N + 1).round()[::-1][:-1].astype(np.int64))
            sig = torch.from_numpy(np.interp(ts.double().numpy(), np.arange(T), table.numpy()))
            if (sig[1:] >= sig[:-1]).any():  # a step of length 0: a repeated timestep, or two clamped past T - 1
                past = cfg.timestep_spacing == "leading" and int((ts >= T - 1).sum()) > 1
                key = "steps_offset" if past else "timestep_spacing"
                raise unsupported(who, key, cfg[key], f"with {N} steps it repeats a sigma (timesteps "
                                  f"{ts.tolist()[:4]}...): a step of length 0, where diffusers divides by 0")
        final = 0.0 if cfg.final_sigmas_type == "zero" else float(table[0])
        self._set_schedule(ts.to(torch.int64), device, N)
        self.sigmas_host = sig.tolist() + [final]
        self._warm(device, ("dpm", 0))

    def _build(self, key):
        cfg = self.config
        sig = self.sigmas_host
        n = len(sig) - 1
        begin = key[1]

        def conv(s):
            p, q = wrappers.conversion(cfg.prediction_type, s)
            return {"p": p, "q": q}

        def rows_from(i, j):  # the rows of steps i..j-1 as a loop starting at step i (first order there)
            return coef_tables.dpmpp_2m_sde(sig[i:j + 1], eta=self.eta, solver_type=cfg.solver_type,
                                            conv=conv).table[:j - i].tolist()

        if cfg.solver_order == 3:  # diffusers' order of each step (its lower-order rules), then its update
            orders = coef_tables_3m.dpmsolver_orders(n, lower_order_final=cfg.lower_order_final,
                                                     euler_at_final=cfg.euler_at_final, begin=begin)
            rows = coef_tables_3m.dpmsolver_multistep(sig, orders, sde=bool(self.eta), solver_type=cfg.solver_type,
                                                      conv=conv).table.tolist()
        elif cfg.solver_order == 1:
            rows = [rows_from(i, i + 1)[0] for i in range(n)]
        else:
            rows = rows_from(0, n)
            last_first_order = cfg.euler_at_final or (cfg.lower_order_final and n < 15)
            if n > 1 and last_first_order and sig[-1] > 0:
                rows[-1] = rows_from(n - 1, n)[0]
            if begin > 0:  # a loop started with set_begin_index has no history yet: first order, as diffusers
                rows[begin] = rows_from(begin, begin + 1)[0]
        rows = [ve_row_to_vp(r, sig[i], sig[i + 1]) for i, r in enumerate(rows)]  # history: each row's x0 (f = 1)
        return coefs.table(rows), None

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """``alpha*x0 + alpha*sigma*noise`` with ``alpha = 1/sqrt(sigma^2 + 1)`` (the VP state), the VE ``sigma``
        picked as diffusers' DPM-Solver picks it (:meth:`FusedScheduler._noise_sigma`)."""
        sigma = self._noise_sigma(original_samples, timesteps)
        alpha = 1.0 / (sigma * sigma + 1.0).sqrt()
        dtype = original_samples.dtype
        return alpha.to(dtype) * original_samples + (alpha * sigma).to(dtype) * noise

    @property
    def eta(self) -> float:
        """The noise scale of :func:`~diffkern.coef_tables.dpmpp_2m_sde`: 1 for "sde-dpmsolver++", else 0."""
        return 1.0 if self.config.algorithm_type == "sde-dpmsolver++" else 0.0

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             variance_noise: torch.Tensor = None, return_dict: bool = True):
        """One DPM-Solver++ step (first order on the first and, as configured, the last step); returns
        (prev_sample,). "sde-dpmsolver++" adds ``variance_noise``, else noise drawn from ``generator`` as diffusers
        draws it (float32), else Philox noise; "dpmsolver++" ignores both, as diffusers does."""
        i = self._index(timestep)
        if self.config.variance_type in ("learned", "learned_range") and self.config.prediction_type == "epsilon":
            model_output = model_output[:, :3]  # the predicted mean's channels, as diffusers (which assumes 3)
        x = self._state_in(sample, model_output)
        begin = self._loop_start  # set_begin_index's, or where a loop without it started
        first = i == begin
        history, history2, _, history_out = self._history_slots(x, i, first, 2 if self.config.solver_order == 3 else 1)
        noise = None
        if self.eta:
            noise = variance_noise.to(device=x.device, dtype=x.dtype) if variance_noise is not None \
                else self._draw(generator, model_output, x, torch.float32)
        prev, _ = self._fused(("dpm", begin), i, x, model_output, noise=noise, history=history, history2=history2,
                              history_out=history_out, x0=False)
        self._advance()
        return self._output_prev_only(return_dict, prev)
