"""Fused Euler, Euler-ancestral and Heun schedulers (k-diffusion family): the sample is the VE state x.

Rows come from :mod:`diffkern.coef_tables` with the prediction type's conversion fused (``D = p*x + q*m``);
``scale_model_input`` divides by ``sqrt(sigma^2 + 1)`` as diffusers does. Timesteps (float32, fractional for
"linspace") and sigmas follow diffusers' definitions on diffkern's float64 training table.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config

from .. import coef_tables, schedules, wrappers
from ..ops import coefs
from . import scheduler_custom, timestep_labels
from .config_checks import check_choice, check_one_conversion, unsupported
from .scheduler_default import DeferredSchedule
from .schedulers import FusedScheduler, sigma_to_t
from .scheduler_lookup import check_step_args
from .scheduler_utils import check_steps

_K_PREDICTIONS = ("epsilon", "v_prediction", "sample", "original_sample")


def _conversion(prediction_type: str, sigma: float, clip: float = math.inf) -> dict:
    p, q = wrappers.conversion("sample" if prediction_type == "original_sample" else prediction_type, sigma)
    return {"p": p, "q": q, "clip": clip}


class _KScheduler(FusedScheduler):
    """Shared set-up: VE sigmas at diffusers' timesteps, Karras/exponential options, input scaling."""

    _vp_state = False
    _train_timesteps_dtype = torch.float32  # before set_timesteps, as diffusers (Euler-ancestral: float64)
    _locate_start = True  # no set_begin_index: the first step's timestep gives its index, as diffusers

    def _init_k(self, who, prediction_type, timestep_spacing, use_karras_sigmas, use_exponential_sigmas,
                use_beta_sigmas, final_sigmas_type="zero", interpolation_type="linear", timestep_type="discrete"):
        check_choice(who, "prediction_type", prediction_type, _K_PREDICTIONS)
        check_choice(who, "timestep_spacing", timestep_spacing, schedules.SPACINGS)
        check_choice(who, "final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        check_choice(who, "interpolation_type", interpolation_type, ("linear",))
        check_choice(who, "timestep_type", timestep_type, ("discrete", "continuous"))
        if use_beta_sigmas:
            raise unsupported(who, "use_beta_sigmas", True, "not implemented")
        check_one_conversion(who, use_karras_sigmas=use_karras_sigmas, use_exponential_sigmas=use_exponential_sigmas)
        self.sigmas_host = self.train_sigmas.flip(0).tolist() + [0.0]

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        """Standard deviation of the initial latents: max sigma ("linspace"/"trailing"), else sqrt(max^2 + 1); a 0-d
        float32 CPU tensor computed as diffusers' k-diffusion classes compute it (from their float32 ``sigmas``)."""
        top = torch.tensor(max(self.sigmas_host), dtype=torch.float32)
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return top
        return (top ** 2 + 1) ** 0.5

    def _k_schedule(self, num_inference_steps, sigma_min=None, sigma_max=None, final_zero=True, float64=False):
        """(timesteps float32 (N,), sigmas host list (N+1,)) as diffusers' Euler/Heun ``set_timesteps``; ``float64``:
        timesteps kept float64 throughout, the "linspace" ones unrounded (diffusers' DPMSolverSDE)."""
        who = type(self).__name__
        cfg = self.config
        T = cfg.num_train_timesteps
        N = num_inference_steps
        check_steps(who, N)
        if N > T and cfg.timestep_spacing != "linspace":  # (fractional "linspace" timesteps may outnumber T)
            raise unsupported(who, "timestep_spacing", cfg.timestep_spacing,
                              f"with num_inference_steps={N} > num_train_timesteps={T} it repeats timesteps "
                              "(steps of length 0); use 'linspace'")
        if cfg.timestep_spacing == "linspace":  # fractional: numpy's float64 linspace rounded to float32
            ts = np.linspace(0, T - 1, N)[::-1]
            ts = torch.from_numpy((ts if float64 else ts.astype(np.float32)).copy()).double()
        elif cfg.timestep_spacing == "leading":
            # steps_offset may push the first timesteps past T - 1 (N close to T): diffusers' K-schedulers take them,
            # at the largest training sigma (the interpolation below clamps), and so do we
            ts = torch.arange(N - 1, -1, -1, dtype=torch.float64) * (T // N) + cfg.steps_offset
        else:
            ts = schedules.timesteps(N, T, cfg.timestep_spacing, cfg.steps_offset).double()
        sig = torch.from_numpy(np.interp(ts.numpy(), np.arange(T), self.train_sigmas.numpy()))
        lo = sigma_min if sigma_min is not None else self._k_lowest(N, float(sig[-1]))
        hi = sigma_max if sigma_max is not None else float(sig[0])
        karras, exponential = self._option("use_karras_sigmas", False), self._option("use_exponential_sigmas", False)
        if (karras or exponential) and N == 1:  # both formulas give [sigma_max] whatever sigma_min is
            sig = torch.tensor([hi], dtype=torch.float64)
        elif karras or exponential:
            if not 0 < lo <= hi:
                raise ValueError(f"{who}: sigma_min={lo!r} must be in (0, sigma_max], sigma_max={hi!r} (the config's "
                                 "sigma_max, else the schedule's largest sigma)")
            sig = (schedules.karras if karras else schedules.loglinear)(N, lo, hi)[:-1]
        if karras or exponential:  # diffusers' own values where they are repeated (timestep_labels; not DPMSolverSDE)
            kind = "karras" if karras else "exponential"
            labels = None if float64 else timestep_labels.k_timesteps(self, N, kind, sigma_min, sigma_max)
            ts = sigma_to_t(self.alphas_cumprod, sig) if labels is None else torch.from_numpy(labels)
        final = 0.0 if final_zero else float(self.train_sigmas[0])
        return ts.to(torch.float64 if float64 else torch.float32), sig.tolist() + [final]

    def _k_lowest(self, num_inference_steps: int, last: float) -> float:
        """The smallest sigma diffusers' Karras/exponential/beta conversion starts from (its ``in_sigmas[-1]``):
        ``last``, the sigma of the schedule's last timestep, except where its float "trailing" ``arange`` overshoots to
        N + 1 timesteps (T = 1000: N = 61, 103, 121, 122), whose last, t = -1, ours drops: its sigma is the
        interpolation clamped at t = 0, the table's first (the conversion still makes N sigmas)."""
        T, N = self.config.num_train_timesteps, num_inference_steps
        if self.config.timestep_spacing == "trailing" and len(np.arange(T, 0, -T / N)) > N:
            return float(self.train_sigmas[0])
        return last

    def _conv(self, sigma: float) -> dict:
        return _conversion(self.config.prediction_type, sigma, self._clip())

    def _clip(self) -> float:
        cfg = self.config
        return cfg.clip_sample_range if self._option("clip_sample", False) else math.inf

    def _conv_fixed(self):
        """:meth:`_conv` with the config read once: for a table build, which calls it once per sigma."""
        return functools.partial(_conversion, self.config.prediction_type, clip=self._clip())

    is_scale_input_called = False  # diffusers' flag (its step warns when False); set by scale_model_input

    def _last_call(self):
        """Index of this loop's last ``step()`` call, None before its first (for attributes diffusers' step sets)."""
        k, start = self._step_index, getattr(self, "_loop_start", None)
        return None if k is None or start is None or k <= start else k - 1

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """``sample / sqrt(sigma^2 + 1)`` at the current step (sigma from the host schedule)."""
        sigma = self._sigma_at(self._index(timestep))
        self.is_scale_input_called = True
        return sample / math.sqrt(sigma * sigma + 1.0)


class EulerDiscreteScheduler(_KScheduler):
    """Drop-in for ``diffusers.EulerDiscreteScheduler``; one fused op per step (two on churn steps, where the
    sample is perturbed first, exactly as diffusers' ``s_churn``).

    Unsupported: ``use_beta_sigmas``, ``interpolation_type="log_linear"``.
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 interpolation_type: str = "linear", use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False, sigma_min: float = None,
                 sigma_max: float = None, timestep_spacing: str = "linspace", timestep_type: str = "discrete",
                 steps_offset: int = 0, rescale_betas_zero_snr: bool = False, final_sigmas_type: str = "zero"):
        self._init_training(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                            rescale_betas_zero_snr)
        self._init_k("EulerDiscreteScheduler", prediction_type, timestep_spacing, use_karras_sigmas,
                     use_exponential_sigmas, use_beta_sigmas, final_sigmas_type, interpolation_type, timestep_type)
        if timestep_type == "continuous" and prediction_type == "v_prediction":  # diffusers' training labels then
            self.timesteps = (0.25 * self.train_sigmas.flip(0).log()).float()
        self._host_timesteps = self.timesteps.tolist()  # diffusers' step() runs on it before set_timesteps too

    def set_timesteps(self, num_inference_steps: int = None, device=None, timesteps=None, sigmas=None):
        """diffusers' schedule of ``num_inference_steps``, or a custom one: training ``timesteps`` (N, float; the
        sigmas interpolated at them, then the final sigma) or ``sigmas`` (N+1 VE sigmas, the final one included; the
        timesteps from them), as diffusers (the same argument checks)."""
        cfg = self.config
        if scheduler_custom.euler_checks(cfg, num_inference_steps, timesteps, sigmas):
            final = 0.0 if cfg.final_sigmas_type == "zero" else float(self.train_sigmas[0])
            ts, self.sigmas_host = scheduler_custom.from_sigmas(self, sigmas) if sigmas is not None \
                else scheduler_custom.from_timesteps(self, timesteps, np.float32, final)
            ts, num_inference_steps = ts.to(torch.float32), len(self.sigmas_host) - 1
        else:
            ts, self.sigmas_host = self._k_schedule(num_inference_steps, cfg.sigma_min, cfg.sigma_max,
                                                    cfg.final_sigmas_type == "zero")
        if cfg.timestep_type == "continuous" and cfg.prediction_type == "v_prediction":
            # the network takes 0.25*ln(sigma) (EDM's c_noise), from diffusers' float32 sigmas
            ts = 0.25 * torch.tensor(self.sigmas_host[:-1], dtype=torch.float32).log()
        self._set_schedule(ts, device, num_inference_steps)
        self._warm(device, ("euler", 0.0, 0.0, math.inf, 1.0))

    def _build(self, key):
        _, s_churn, s_tmin, s_tmax, s_noise = key
        sig = self.sigmas_host
        hat = coef_tables.churn_sigmas(sig, s_churn, s_tmin, s_tmax)
        # diffusers converts a v-prediction with the pre-churn sigma but an eps-prediction with sigma_hat
        pre = dict(zip(hat, sig[:-1]))
        v_pred = self.config.prediction_type == "v_prediction"
        plan = coef_tables.euler(sig, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise,
                                 conv=lambda s: self._conv(pre[s] if v_pred else s))
        return plan.table, plan

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             return_dict: bool = True):
        """One Euler step (with Karras churn when ``s_churn > 0``); returns (prev_sample, pred_original_sample)."""
        i = self._index(timestep)
        key = ("euler", float(s_churn), float(s_tmin), float(s_tmax), float(s_noise))
        _, plan = self._plan(key)
        x = self._state_in(sample, model_output)
        if plan.sigma_hat[i] > self.sigmas_host[i]:  # diffusers draws churn noise whenever gamma > 0
            noise = self._draw(generator, model_output, x)
            if plan.churn[i]:
                x, _ = self._fused(key, plan.churn_row + i, x, x, noise=noise, x0=False)
        prev, x0 = self._fused(key, i, x, model_output)
        self._advance()
        return self._output(return_dict, prev, x0)


class EulerAncestralDiscreteScheduler(_KScheduler):
    """Drop-in for ``diffusers.EulerAncestralDiscreteScheduler`` (eta = 1); one fused op per step. Unlike diffusers
    it also takes ``prediction_type="sample"`` (x0 prediction), where diffusers raises NotImplementedError."""

    _train_timesteps_dtype = torch.float64  # before set_timesteps, as diffusers

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 timestep_spacing: str = "linspace", steps_offset: int = 0, rescale_betas_zero_snr: bool = False):
        self._init_training(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                            rescale_betas_zero_snr)
        self._init_k("EulerAncestralDiscreteScheduler", prediction_type, timestep_spacing, False, False, False)
        self._host_timesteps = self.timesteps.tolist()  # diffusers' step() runs on it before set_timesteps too

    def set_timesteps(self, num_inference_steps: int, device=None):
        ts, self.sigmas_host = self._k_schedule(num_inference_steps)
        self._set_schedule(ts, device, num_inference_steps)
        self._warm(device, ("ancestral",))

    def _build(self, key):
        plan = coef_tables.euler_ancestral(self.sigmas_host, eta=1.0, conv=self._conv)
        return plan.table, plan

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """One ancestral step; noise from ``generator`` as diffusers draws it (every step), else Philox."""
        i = self._index(timestep)
        x = self._state_in(sample, model_output)
        noise = self._draw(generator, model_output, x)
        prev, x0 = self._fused(("ancestral",), i, x, model_output, noise=noise)
        self._advance()
        return self._output(return_dict, prev, x0)


def stored_sample_rows(plan) -> torch.Tensor:
    """``plan``'s table with each second-call row rewritten to read the first call's sample x_i from history2, as
    diffusers' Heun/KDPM2 step does (it keeps ``self.sample`` and ignores the sample passed to the second call but for
    that call's slope). The plan's rows eliminate x_i through the stored slope d (history), assuming the second call
    gets the first call's output ``s = x_i + h1*d``; with ``h1 = b/f`` of the first call's row (its output ``a x + b D``
    and slope ``e x + f D``, f = -1/sigma), ``a s + b D~ + c d`` is ``x_i + (a - 1) s + b D~ + (c + h1) d``, which is
    diffusers' update for any s. Shapes: (rows, NCOEF) float64, as ``plan.table``."""
    table = plan.table.clone()
    # whole columns at once, in numpy on the clone's memory (a Python loop over 0-d tensor reads and writes took
    # ~0.7 ms for 50 steps at the first step() of each loop, torch's indexing ~40 us, numpy's ~10 us): the same
    # float64 operations, so the same bits
    t = table.numpy()
    first = np.flatnonzero(plan.corrector)
    rows = first + plan.corrector_row
    t[rows, coefs.A] -= 1.0
    t[rows, coefs.C] += t[first, coefs.B] / t[first, coefs.F]
    t[rows, coefs.C2] = 1.0
    return table


class _TwoCallScheduler(_KScheduler):
    """Base of the order-2 schedulers (Heun, KDPM2): ``step()`` alternates a step's first and second call over
    interleaved timesteps ``[t0, t1, t1, t2, t2, ...]`` and sigmas ``[s0, s1, s1, s2, s2, ...]``."""

    order = 2

    @property
    def state_in_first_order(self) -> bool:
        """True when the next ``step()`` is a predictor (the first call of a step)."""
        return (self._step_index or self._begin_index or 0) % 2 == 0

    def _predictor_call(self):
        """Index of the predictor call whose corrector comes next (None when the next call is a predictor)."""
        return None if self.state_in_first_order or self._step_index is None else self._step_index - 1

    @property
    def sample(self):
        """diffusers' ``sample``: the predictor's sample (B, ...) between a step's two calls, else None."""
        return None if self._predictor_call() is None else self._first_sample

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the next loop at ``timesteps[begin_index]``, the first call of a step: an even index.

        diffusers takes an odd index and runs a predictor there with the next step's sigma, feeding the network the
        previous step's second timestep (Heun: every step then has length 0 and the sample comes back unchanged;
        KDPM2-ancestral: NaN at the last step); pipelines pass ``t_start * order``, which is even."""
        if isinstance(begin_index, int) and not isinstance(begin_index, bool) and begin_index % 2:
            raise ValueError(f"{type(self).__name__}: begin_index: expected an even index (the first call of a step; "
                             f"an order-2 scheduler's loop starts at t_start * order), got {begin_index}")
        super().set_begin_index(begin_index)

    def _index(self, timestep) -> int:
        k = super()._index(timestep)
        if k % 2 and k == self._loop_start:  # found from a midpoint timestep (KDPM2, DPMSolverSDE): no predictor ran
            raise ValueError(f"timestep: a loop of {type(self).__name__} cannot start at timesteps[{k}], the second "
                             "call of a step; start at a step's first call (an even index)")
        return k

    def _state_in(self, sample: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        # diffusers' two-call steps (Heun, KDPM2, DPMSolverSDE) compute in their inputs' promoted dtype and do not
        # cast back (Euler does): a float32 sample with a float16 model output stays float32
        check_step_args(model_output, sample)
        dtype = torch.promote_types(sample.dtype, model_output.dtype)
        return sample if sample.dtype == dtype else sample.to(dtype)

    def _sigma_at(self, k: int) -> float:
        # a second call's position holds the next step's sigma
        return self.sigmas_host[(k + 1) // 2]


class HeunDiscreteScheduler(DeferredSchedule, _TwoCallScheduler):
    """Drop-in for ``diffusers.HeunDiscreteScheduler`` (``order = 2``: timesteps interleaved, ``step()`` called
    for the predictor and then the corrector of each step but the last); one fused op per call.

    Unsupported: ``use_beta_sigmas``, beta schedules other than linear/scaled_linear/squaredcos_cap_v2.
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 clip_sample: bool = False, clip_sample_range: float = 1.0, timestep_spacing: str = "linspace",
                 steps_offset: int = 0):
        self._init_training(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self._init_k("HeunDiscreteScheduler", prediction_type, timestep_spacing, use_karras_sigmas,
                     use_exponential_sigmas, use_beta_sigmas)
        self._defer_default_schedule()  # diffusers' __init__ runs set_timesteps(T)

    def set_timesteps(self, num_inference_steps: int = None, device=None, num_train_timesteps: int = None,
                      timesteps=None):
        """Timesteps ``[t0, t1, t1, t2, t2, ...]`` (2N - 1 values): predictor at t_i, corrector at t_{i+1}; t_i from
        ``num_inference_steps`` or custom training ``timesteps`` (N, float; the sigmas interpolated at them), as
        diffusers (the same argument checks). ``num_train_timesteps``: only the config's (None or equal)."""
        cfg = self.config
        if num_train_timesteps not in (None, cfg.num_train_timesteps):
            raise unsupported(type(self).__name__, "num_train_timesteps", num_train_timesteps,
                              f"set_timesteps uses the config's {cfg.num_train_timesteps}")
        if scheduler_custom.heun_checks(cfg, num_inference_steps, timesteps):
            ts, self.sigmas_host = scheduler_custom.from_timesteps(self, timesteps, np.float32, 0.0)
            ts, num_inference_steps = ts.to(torch.float32), len(self.sigmas_host) - 1
        else:
            # diffusers reads sigma_min/sigma_max whenever the config has them (a config loaded from Euler's)
            ts, self.sigmas_host = self._k_schedule(num_inference_steps, cfg.get("sigma_min"), cfg.get("sigma_max"))
        self._set_schedule(torch.cat([ts[:1], ts[1:].repeat_interleave(2)]), device, num_inference_steps)
        self._warm(device, ("heun",))

    def _build(self, key):
        # a loop on the last one's schedule and conversion reuses its tables (a pipeline calls set_timesteps(N) for
        # every image; the build was ~5 us of each of 2N - 1 steps at N = 50): host tables are never written in
        # place once built (steps copy them to the device), so two loops can share them
        conv = self._conv_fixed()
        memo = (tuple(self.sigmas_host), conv.args, tuple(conv.keywords.items()))
        last = getattr(self, "_last_build", None)
        if last is not None and last[0] == memo:
            return last[1]
        plan = coef_tables.heun(self.sigmas_host, conv=conv)
        built = stored_sample_rows(plan), plan
        self._last_build = (memo, built)
        return built

    @property
    def prev_derivative(self):
        """diffusers' ``prev_derivative``: the predictor's slope ``(x - D)/sigma`` (B, ...), in the sample's dtype,
        between a step's two calls, else None. The scheduler's own buffer (written by the next predictor), not a copy:
        diffusers' is a new tensor per step, and keeping one here would cost a copy at every predictor."""
        return None if self._predictor_call() is None else self._history

    @property
    def dt(self):
        """diffusers' ``dt``: ``sigmas[k + 1] - sigmas[k]`` of the predictor call k (0-d float32 CPU tensor, from
        :attr:`sigmas` as diffusers computes it) between a step's two calls, else None."""
        k = self._predictor_call()
        if k is None:
            return None
        sigmas = self.sigmas
        return sigmas[k + 1] - sigmas[k]

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """Predictor (even calls: Euler, stores D) or corrector (odd calls: trapezoid from the stored D);
        returns (prev_sample, pred_original_sample)."""
        k = self._index(timestep)
        _, plan = self._plan(("heun",))
        x = self._state_in(sample, model_output)
        i, corrector = k // 2, k % 2 == 1
        history = self._history_for(x, first=k == self._loop_start)
        if corrector:  # from the predictor's own sample, whatever sample is passed now (as diffusers)
            prev, x0 = self._fused(("heun",), plan.corrector_row + i, x, model_output, history=history,
                                   history2=self._first_sample)
        else:
            self._first_sample = x
            prev, x0 = self._fused(("heun",), i, x, model_output, history_out=history)
        self._advance()
        return self._output(return_dict, prev, x0)
