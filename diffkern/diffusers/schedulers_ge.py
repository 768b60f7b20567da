"""Fused schedulers without a diffusers counterpart: Permenter & Yuan's gradient-estimation sampler (the
``GEScheduler`` of their diffusers integration, ``math-samplers.md`` 2.5) and IADB deblending (section 1).
"""
from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import register_to_config

from .. import coef_tables, schedules
from ..ops import coefs
from ..ops import iadb as iadb_ops
from .config_checks import check_choice
from .schedulers import FusedScheduler
from .scheduler_utils import check_steps

_GE_STYLES = {"linear": "linear", "ddim": "ddim", "edm": "edm"}


class GEScheduler(FusedScheduler):
    """Gradient-estimation sampler (Permenter & Yuan 2024) on an eps-prediction DDPM network.

    The sample is the VE state ``x = z/sqrt(ab)``: ``init_noise_sigma = sqrt(sigma_0^2 + 1)`` and
    ``scale_model_input`` multiplies by ``sqrt(ab(t))``. Per step (t -> t'), with the eps re-derived from the
    clipped x0 when ``clip_sample``::

        eps_bar = gamma*eps + (1 - gamma)*eps_prev    (eps on the first step)
        x'      = x + (sigma_p - sigma)*eps_bar + sqrt(sigma'^2 - sigma_p^2)*xi
        pred_original_sample = x - sigma*eps_bar

    with ``sigma_p = (sigma'/sigma^mu)^(1/(1-mu))`` (sigma' itself, and no noise, at mu = 0).
    ``mu`` (default 0, the paper's sampler) is smalldiffusion's stochasticity knob (0.5: DDPM). The schedule
    (``style`` "Linear"/"DDIM"/"EDM", ``start``, ``end``, ``factor``) is :func:`diffkern.schedules.ge_schedule`;
    its last step goes to sigma(t=0), not 0.
    """

    _vp_state = False

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, clip_sample: bool = True,
                 clip_sample_range: float = 1.0, prediction_type: str = "epsilon", gamma: float = 2.0,
                 mu: float = 0.0, style: str = "Linear", start: float = 8.35, end: float = 0.02, factor: float = 0.0,
                 steps_offset: int = 0):
        who = "GEScheduler"
        check_choice(who, "prediction_type", prediction_type, ("epsilon",))
        check_choice(who, "style", str(style).lower(), tuple(_GE_STYLES))
        if not (math.isfinite(gamma) and 0.0 <= mu < 1.0):
            raise ValueError(f"{who}: gamma must be finite and mu in [0, 1), got gamma={gamma!r}, mu={mu!r}")
        self._init_training(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self.sigmas_host = None

    @property
    def init_noise_sigma(self) -> float:
        """``1/sqrt(ab(t_0))``: the initial VE latents have standard deviation sqrt(sigma_0^2 + 1). sigma_0 is the
        config's ``start`` snapped to the training table whatever the number of steps, so before ``set_timesteps``
        it is the value every schedule will start from (the official class gives sigma(T - 1) there instead)."""
        top = self.sigmas_host[0] if self.sigmas_host else float(self._schedule(1)[0])
        return math.sqrt(top * top + 1.0)

    def _schedule(self, n: int, **kw):
        """:func:`diffkern.schedules.ge_schedule` of ``n`` steps for this config."""
        cfg = self.config
        return schedules.ge_schedule(n, self.alphas_cumprod, cfg.start, cfg.end, _GE_STYLES[str(cfg.style).lower()],
                                     cfg.factor, **kw)

    def set_timesteps(self, num_inference_steps: int, device=None):
        """N timesteps snapped to the training table; the N+1 sigmas end at sigma(0)."""
        # checked here so that the error names this argument, not ge_schedule's n (numpy ints arrive as Python's)
        check_steps("GEScheduler", num_inference_steps)
        sig, ts = self._schedule(num_inference_steps, return_timesteps=True)
        self.sigmas_host = sig.tolist()
        self._set_schedule(ts[:-1].to(torch.int64), device, num_inference_steps)
        self._warm(device, ("ge", 0), ("ge_pred", 0))

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """``sample * sqrt(ab(t))`` (the VP input the network was trained on)."""
        sigma = self.sigmas_host[self._index(timestep)]
        return sample / math.sqrt(sigma * sigma + 1.0)

    def _conv(self, sigma: float) -> dict:
        cfg = self.config
        return {"p": 1.0, "q": -sigma, "clip": cfg.clip_sample_range if cfg.clip_sample else math.inf}

    def _build(self, key):
        kind, begin = key
        cfg = self.config
        sig = self.sigmas_host
        if kind == "ge_pred":  # pred_original_sample = x - sigma*eps_bar = (1-g)*x + g*D - sigma*(1-g)*eps_prev
            rows = []
            for i, s in enumerate(sig[:-1]):
                g = 1.0 if i == begin else cfg.gamma
                rows.append(coefs.row(a=1.0 - g, b=g, c=-s * (1.0 - g), **self._conv(s)))
            return coefs.table(rows), None
        table = coef_tables.ge(sig, gamma=cfg.gamma, mu=cfg.mu, conv=self._conv).table
        if begin > 0:  # a loop started by set_begin_index has no eps_prev: its first row is a first step
            table = torch.cat([table[:begin], coef_tables.ge(sig[begin:], gamma=cfg.gamma, mu=cfg.mu,
                                                             conv=self._conv).table])
        return table, None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """One GE step; returns (prev_sample, pred_original_sample). The first step of a loop is one fused op;
        later steps run a second one for pred_original_sample (it mixes in eps_prev, which the step overwrites)."""
        i = self._index(timestep)
        begin = self._begin_index or 0
        x = self._state_in(sample, model_output)
        history = self._history_for(x, first=i == begin)
        noise = self._draw(generator, model_output, x) if self.config.mu > 0 else None
        pred = None
        if i != begin:
            pred, _ = self._fused(("ge_pred", begin), i, x, model_output, history=history, x0=False)
        prev, d = self._fused(("ge", begin), i, x, model_output, noise=noise, history=history, history_out=history,
                              x0=pred is None)
        self._advance()
        return self._output(return_dict, prev, d if pred is None else pred)


_IADB_VARIANTS = ("euler", "stochastic")


class IADBScheduler(FusedScheduler):
    """IADB deblending (Heitz et al. 2023) for a network predicting ``D = x1 - x0`` from ``(x_alpha, alpha)``.

    ``x_alpha = (1-alpha)*noise + alpha*data``: ``init_noise_sigma = 1``, no input scaling, and the timesteps
    handed to the network are ``alpha*timestep_scale`` for alpha = 0, 1/N, ..., (N-1)/N (float32; the official
    code conditions a diffusers UNet on alpha itself, ``timestep_scale = 1``). ``variant`` "euler" is the
    official step ``x + (alpha' - alpha)*D``; "stochastic" is ``math-samplers.md`` 1.6 with noise level
    ``lam``. ``pred_original_sample`` is the data estimate ``x + (1 - alpha)*D``.
    """

    _vp_state = False

    @register_to_config
    def __init__(self, variant: str = "euler", lam: float = 1.0, timestep_scale: float = 1.0):
        check_choice("IADBScheduler", "variant", variant, _IADB_VARIANTS)
        if not (math.isfinite(lam) and lam >= 0 and math.isfinite(timestep_scale) and timestep_scale > 0):
            raise ValueError(f"IADBScheduler: lam must be finite >= 0 and timestep_scale finite > 0, got lam={lam!r}, "
                             f"timestep_scale={timestep_scale!r}")
        self.init_noise_sigma = 1.0
        self.alphas_host = None
        self.timesteps = torch.zeros(0)
        self._init_state()

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Uniform alphas k/N; ``timesteps`` = alpha*timestep_scale for the N steps (float32)."""
        check_steps("IADBScheduler", num_inference_steps)
        self.alphas_host = schedules.iadb_alphas(num_inference_steps).tolist()
        ts = torch.tensor(self.alphas_host[:-1], dtype=torch.float64) * self.config.timestep_scale
        self._set_schedule(ts.to(torch.float32), device, num_inference_steps)
        self._warm(device, ("iadb",))

    def _build(self, key):
        cfg = self.config
        lam = cfg.lam if cfg.variant == "stochastic" else 0.0
        table = iadb_ops.sampler_table(self.alphas_host, variant=cfg.variant, lam=lam)
        table[:, coefs.E] = 1.0  # history_out = x + (1 - alpha)*D, the data estimate (history is never read)
        table[:, coefs.F] = 1.0 - torch.tensor(self.alphas_host[:-1], dtype=torch.float64)
        return table, None

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """``x_alpha = (1 - alpha)*noise + alpha*original_samples`` with ``alpha = timestep/timestep_scale``
        (per sample (B,), or one timestep)."""
        t = torch.as_tensor(timesteps).to(original_samples.device).reshape(-1).to(torch.float64)
        alpha = (t / self.config.timestep_scale).view((-1,) + (1,) * (original_samples.dim() - 1))
        dtype = original_samples.dtype
        return (1 - alpha).to(dtype) * noise + alpha.to(dtype) * original_samples

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """One deblending step; returns (prev_sample, pred_original_sample = x1 estimate)."""
        i = self._index(timestep)
        x = self._state_in(sample, model_output)
        noise = self._draw(generator, model_output, x) if self.config.variant == "stochastic" else None
        x1 = torch.empty_like(x, memory_format=torch.contiguous_format)
        prev, _ = self._fused(("iadb",), i, x, model_output, noise=noise, history_out=x1, x0=False)
        self._advance()
        return self._output(return_dict, prev, x1)

    def __len__(self) -> int:
        return self.num_inference_steps or 0
