"""Checks and conversions of diffusers scheduler configs shared by every fused scheduler: the refusal message, the
config-key choices, the training betas, and the loading rules diffusers applies when one scheduler reads another's
config (an algorithm or solver type of a sibling scheduler loads as this scheduler's own).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .. import schedules


def unsupported(who: str, option: str, value, why: str) -> ValueError:
    """The error every scheduler raises for an option it does not implement."""
    return ValueError(f"{who}: {option}={value!r} is not supported by diffkern's fused scheduler ({why}); "
                      f"use diffusers' own scheduler for it")


def check_choice(who: str, option: str, value, allowed) -> None:
    """Refuse ``option=value`` unless ``value`` is one of ``allowed`` (the message lists them)."""
    if value not in allowed:
        raise unsupported(who, option, value, f"supported: {', '.join(map(repr, allowed))}")


def check_common(who: str, prediction_type: str, predictions, thresholding: bool, timestep_spacing=None) -> None:
    """The keys most schedulers share: a ``prediction_type`` among ``predictions``, no dynamic ``thresholding``, and
    (when given) a known ``timestep_spacing``."""
    check_choice(who, "prediction_type", prediction_type, predictions)
    if thresholding:
        raise unsupported(who, "thresholding", True, "dynamic thresholding needs a per-sample quantile pass")
    if timestep_spacing is not None:
        check_choice(who, "timestep_spacing", timestep_spacing, schedules.SPACINGS)


def check_one_conversion(who: str, **flags) -> None:
    """At most one sigma conversion (``use_karras_sigmas=...``, ``use_exponential_sigmas=...``, ...) is set, as
    diffusers requires."""
    if sum(map(bool, flags.values())) > 1:
        names = list(flags)
        listed = " and ".join([", ".join(names[:-1]), names[-1]])
        raise ValueError(f"{who}: only one of {listed} can be set")


def load_as(scheduler, key: str, value, siblings, own):
    """diffusers' loading rule for ``algorithm_type``/``solver_type``: a value of a sibling scheduler (one of
    ``siblings``) is replaced by this scheduler's ``own``, in the registered config too. Returns the value to use."""
    if value in siblings:
        scheduler.register_to_config(**{key: own})
        return own
    return value


def finite_mu(who: str, mu) -> float:
    """``mu`` of ``set_timesteps`` as a float: a finite real number (not a bool)."""
    if isinstance(mu, bool) or not isinstance(mu, (int, float, np.number)) or not math.isfinite(mu):
        raise ValueError(f"{who}: mu must be a finite number, got {mu!r}")
    return float(mu)


def dynamic_shift(who: str, config, mu) -> float:
    """The flow shift e^mu that ``set_timesteps(mu=...)`` sets on a DPM-Solver-family flow schedule: only with
    ``use_dynamic_shifting`` and the "exponential" ``time_shift_type``."""
    if not (config.use_dynamic_shifting and config.time_shift_type == "exponential"):
        raise ValueError(f"{who}: mu: needs use_dynamic_shifting=True and time_shift_type='exponential', got "
                         f"{config.use_dynamic_shifting!r} and {config.time_shift_type!r}")
    return math.exp(finite_mu(who, mu))


def training_betas(who: str, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                   rescale_betas_zero_snr=False) -> torch.Tensor:
    """The (T,) float64 betas of a diffusers config (schedule names as in diffusers; with
    ``rescale_betas_zero_snr`` rescaled to zero terminal SNR: the last beta is then 1)."""
    if trained_betas is not None:
        b = torch.as_tensor(np.asarray(trained_betas, dtype=np.float64))
        if b.dim() != 1 or b.numel() != num_train_timesteps:
            raise ValueError(f"{who}: trained_betas must be a 1-D sequence of num_train_timesteps="
                             f"{num_train_timesteps} values, got shape {tuple(b.shape)}")
    else:
        check_choice(who, "beta_schedule", beta_schedule, schedules.BETA_SCHEDULES)
        b = schedules.betas(num_train_timesteps, beta_start, beta_end, beta_schedule)
    return rescale_zero_terminal_snr(b) if rescale_betas_zero_snr else b


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. (2023), Algorithm 1, in betas' dtype (float64 here; float32 repeats diffusers' rounding, its ends
    kept as 0-d tensors as there): shift and scale sqrt(alpha_bar) so that it ends at 0 and keeps its first value,
    then convert back to betas."""
    root = torch.cumprod(1.0 - betas, 0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    ab = root * root
    return 1.0 - torch.cat([ab[:1], ab[1:] / ab[:-1]])
