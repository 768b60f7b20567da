"""Denoiser wrappers for networks conditioned on a continuous time or sigma: continuous VP time
(:class:`VPContinuousDenoiser`), the VE state itself (:class:`VEDenoiser`), rectified flow (:class:`FlowDenoiser`)
and EDM preconditioning (:class:`KarrasDenoiser`). All are reached as ``diffkern.wrappers.*``; the conventions (VE
coordinates, the raw/guidance/conversion split) are :mod:`diffkern.wrappers`'.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Union

import torch

from .wrappers import ModelWrapper, _compute_dtype, _scale_input, canonical_prediction_type

#----------------------------------------------------------------------------
# VP, continuous time.


def _vp_sde_t(sigma: torch.Tensor, beta_d: float = 19.9, beta_min: float = 0.1) -> torch.Tensor:
    # inverts sigma(t) = sqrt(exp(beta_d*t^2/2 + beta_min*t) - 1) (Song et al. VP-SDE; k-diffusion get_sigmas_vp):
    # the root (sqrt(b^2 + 2 d L) - b)/d of d t^2/2 + b t = L, written as 2L/(b + sqrt(b^2 + 2 d L)) so that small
    # sigma does not cancel (the difference form loses 4e-5 relative at sigma = 1e-8)
    log_ab = torch.log1p(sigma * sigma)
    return 2 * log_ab / (beta_min + torch.sqrt(beta_min ** 2 + 2 * beta_d * log_ab))


def _cosine_t(sigma: torch.Tensor) -> torch.Tensor:
    # alpha_bar = cos^2(pi*t/2) (module level, not a lambda: wrappers holding it must pickle)
    return torch.atan(sigma) * (2 / math.pi)


_TIME_MAPS = {"vp": _vp_sde_t, "cosine": _cosine_t}


def _check_t_scale(value, who: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{who}: t_scale must be a finite float > 0, got {value!r}")
    return float(value)


class VPContinuousDenoiser(ModelWrapper):
    """Network trained on continuous VP time, called as ``model(x*c_in, t_scale*t(sigma), **extra)`` with
    ``c_in = 1/sqrt(sigma^2 + 1)``.

    ``time``: "vp" (VP-SDE, beta_min=0.1, beta_d=19.9, t in [0, 1]), "cosine" (``t = 2/pi*atan(sigma)``,
    i.e. ``alpha_bar = cos^2(pi*t/2)``, k-diffusion's VDenoiser), or a callable (B,) float64 sigma -> t.
    ``prediction_type``: "epsilon", "v_prediction" or "sample".
    """

    def __init__(self, model: Callable, prediction_type: str = "epsilon", time: Union[str, Callable] = "vp",
                 t_scale: float = 1.0, guidance_scale: float = 1.0):
        super().__init__(model, guidance_scale)
        kind = canonical_prediction_type(prediction_type)
        if kind not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"VPContinuousDenoiser: prediction_type must be epsilon, v_prediction or sample, "
                             f"got {prediction_type!r}")
        if not callable(time) and time not in _TIME_MAPS:
            raise ValueError(f"VPContinuousDenoiser: time must be 'vp', 'cosine' or a callable, got {time!r}")
        self.prediction_type = kind
        self.time = _TIME_MAPS.get(time, time) if isinstance(time, str) else time
        self.t_scale = _check_t_scale(t_scale, "VPContinuousDenoiser")

    def model_input(self, x, sigma):
        t = (self.t_scale * self.time(sigma)).to(_compute_dtype(x))
        return _scale_input(x, 1 / torch.sqrt(sigma * sigma + 1)), t

#----------------------------------------------------------------------------
# Networks on the VE state itself (smalldiffusion, score-SDE VE models).


class VEDenoiser(ModelWrapper):
    """A network called on the VE state and sigma, ``model(x, sigma, **extra)`` with sigma a (B,) tensor in x's
    compute dtype, predicting eps (smalldiffusion's ``predict_eps``; ``D = x - sigma*eps``) or the sample."""

    def __init__(self, model: Callable, prediction_type: str = "epsilon", guidance_scale: float = 1.0):
        super().__init__(model, guidance_scale)
        kind = canonical_prediction_type(prediction_type)
        if kind not in ("epsilon", "sample"):
            raise ValueError(f"VEDenoiser: prediction_type must be 'epsilon' or 'sample', got {prediction_type!r}")
        self.prediction_type = kind

    def model_input(self, x, sigma):
        return x, sigma.to(_compute_dtype(x))

#----------------------------------------------------------------------------
# Rectified flow.


class FlowDenoiser(ModelWrapper):
    """Velocity network of ``x_t = (1-t)*data + t*noise`` (v = noise - data), called as
    ``model((1-t)*x, t_scale*t, **extra)`` with ``t = sigma/(1+sigma)``; ``D = (1-t)*x - t*v``.
    ``t_scale=1000`` for networks conditioned on 1000*t (SD3/Flux-style)."""

    prediction_type = "flow"

    def __init__(self, model: Callable, t_scale: float = 1.0, guidance_scale: float = 1.0):
        super().__init__(model, guidance_scale)
        self.t_scale = _check_t_scale(t_scale, "FlowDenoiser")

    def model_input(self, x, sigma):
        # the input scale 1 - t is computed as 1/(1 + sigma): 1 - t cancels at large sigma (5e-11 at sigma = 1e6)
        t = sigma / (1 + sigma)
        return _scale_input(x, 1 / (1 + sigma)), (self.t_scale * t).to(_compute_dtype(x))

#----------------------------------------------------------------------------
# EDM / Karras preconditioning.


def _edm_c_noise(sigma: torch.Tensor) -> torch.Tensor:
    return 0.25 * sigma.log()


def _sigma_c_noise(sigma: torch.Tensor) -> torch.Tensor:
    return sigma


_C_NOISE_MAPS = {"edm": _edm_c_noise, "sigma": _sigma_c_noise}  # module level: wrappers holding them must pickle


class KarrasDenoiser(ModelWrapper):
    """EDM preconditioning (Karras et al. 2022, ``EDMPrecond``): ``D = c_skip*x + c_out*F(c_in*x, c_noise)`` with
    ``c_skip = sd^2/(sigma^2+sd^2)``, ``c_out = sigma*sd/sqrt(sigma^2+sd^2)``, ``c_in = 1/sqrt(sigma^2+sd^2)``.

    ``c_noise``: "edm" (``ln(sigma)/4``), "sigma" (sigma itself, k-diffusion's ``layers.Denoiser``) or a callable.
    Undefined at sigma = 0 with "edm" (ln 0); samplers never evaluate there.
    """

    prediction_type = "edm"

    def __init__(self, model: Callable, sigma_data: float = 0.5, c_noise: Union[str, Callable] = "edm",
                 guidance_scale: float = 1.0):
        super().__init__(model, guidance_scale)
        if isinstance(sigma_data, bool) or not isinstance(sigma_data, numbers.Real) or not sigma_data > 0 \
                or not math.isfinite(sigma_data):
            raise ValueError(f"KarrasDenoiser: sigma_data must be a finite float > 0, got {sigma_data!r}")
        maps = _C_NOISE_MAPS
        if not callable(c_noise) and c_noise not in maps:
            raise ValueError(f"KarrasDenoiser: c_noise must be 'edm', 'sigma' or a callable, got {c_noise!r}")
        self.sigma_data = float(sigma_data)
        self.c_noise = maps.get(c_noise, c_noise) if isinstance(c_noise, str) else c_noise

    def model_input(self, x, sigma):
        c_in = 1 / torch.sqrt(sigma * sigma + self.sigma_data ** 2)
        return _scale_input(x, c_in), self.c_noise(sigma).to(_compute_dtype(x))
