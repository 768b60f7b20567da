"""Custom schedules of ``set_timesteps(timesteps=...)`` / ``set_timesteps(sigmas=...)`` (Euler, Heun, DPM-Solver
multistep): diffusers' argument checks, with its own messages, and the (timesteps, VE sigmas) they give, built on
diffkern's float64 training table. The fused tables need steps of positive length, so a custom schedule whose sigmas
do not strictly decrease is refused, naming the argument (diffusers runs it)."""
from __future__ import annotations

import numpy as np
import torch

from . import timestep_labels
from .scheduler_utils import sigma_to_t


def _values(who: str, name: str, values, dtype, at_least: int) -> np.ndarray:
    """A user's ``timesteps``/``sigmas`` (list, array or tensor) as a 1-D array cast to ``dtype`` as diffusers casts
    it (``np.array(values).astype(dtype)``: float timesteps truncate to int64), of at least ``at_least`` finite
    values."""
    if isinstance(values, torch.Tensor):  # (float64 first: numpy has no bfloat16; the upcast is exact)
        values = values.detach().cpu()
        values = (values.double() if values.is_floating_point() else values).numpy()
    try:
        raw = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{who}: {name}: expected a 1-D sequence of numbers, got {type(values).__name__}") from None
    if raw.ndim != 1 or raw.size < at_least or not np.isfinite(raw).all():
        raise ValueError(f"{who}: {name}: expected a 1-D sequence of at least {at_least} finite numbers, got "
                         f"{values!r}")
    return raw.astype(dtype)


def _check_decreasing(who: str, name: str, sigmas: list, shown) -> None:
    if any(b >= a for a, b in zip(sigmas, sigmas[1:])) or sigmas[-1] < 0:
        raise ValueError(f"{who}: {name}: expected a schedule whose sigmas strictly decrease (to a final sigma >= 0): "
                         f"the fused step tables need steps of positive length; got {name}={list(shown)!r} "
                         f"(sigmas {[round(s, 6) for s in sigmas]})")


def from_timesteps(sched, timesteps, dtype, final: float) -> tuple[torch.Tensor, list]:
    """(float64 timesteps (N,), VE sigmas (N+1,) host list) of custom training ``timesteps`` (``dtype``: np.float32
    for Euler/Heun, np.int64 for DPM-Solver, as diffusers casts them): the training sigma interpolated at each,
    then ``final`` (outside [0, T-1] the interpolation clamps, as diffusers')."""
    who = type(sched).__name__
    ts = _values(who, "timesteps", timesteps, dtype, 1)
    T = sched.config.num_train_timesteps
    sig = np.interp(ts.astype(np.float64), np.arange(T), sched.train_sigmas.numpy()).tolist() + [final]
    _check_decreasing(who, "timesteps", sig, ts.tolist())
    return torch.from_numpy(ts.astype(np.float64)), sig


def int_timesteps(who: str, timesteps, num_train_timesteps: int) -> torch.Tensor:
    """DDPM's custom ``timesteps`` (list, array or tensor) as an int64 tensor (N,), floats truncated as diffusers
    casts them; non-numbers raise TypeError (as diffusers' comparisons of them do), a schedule that is not strictly
    decreasing in [0, num_train_timesteps) ValueError."""
    if not isinstance(timesteps, torch.Tensor):
        try:
            numeric = np.asarray(timesteps).dtype.kind in "biuf"
        except ValueError:  # ragged nesting
            numeric = False
        if not numeric:  # (numpy would read None as nan and "900" as 900; diffusers' comparisons refuse them)
            raise TypeError(f"{who}: timesteps: expected a 1-D sequence of numbers, got {timesteps!r}")
    ts = torch.from_numpy(_values(who, "timesteps", timesteps, np.int64, 1))
    if (ts[1:] >= ts[:-1]).any() or ts[0] >= num_train_timesteps or ts[-1] < 0:
        raise ValueError(f"{who}: timesteps must be a non-empty strictly decreasing list of ints in "
                         f"[0, {num_train_timesteps})")
    return ts


def from_sigmas(sched, sigmas) -> tuple[torch.Tensor, list]:
    """(float64 timesteps (N,), VE sigmas (N+1,) host list) of custom ``sigmas`` (N+1 values, the final one
    included), rounded to float32 as diffusers' Euler holds them; each timestep is diffusers' ``_sigma_to_t``."""
    who = type(sched).__name__
    sig = _values(who, "sigmas", sigmas, np.float32, 2).astype(np.float64)
    _check_decreasing(who, "sigmas", sig.tolist(), sig.tolist())
    # the labels are diffusers' own bit for bit where its float32 table can be repeated (timestep_labels), so its
    # timesteps index ours; the steps keep the float64 sigmas
    ab32 = timestep_labels.alphas_cumprod32(sched)
    if ab32 is None:
        return sigma_to_t(sched.alphas_cumprod, torch.from_numpy(sig[:-1])), sig.tolist()
    ts = timestep_labels.sigma_to_t(sig[:-1].astype(np.float32), np.log(timestep_labels.train_sigmas32(ab32)))
    return torch.from_numpy(ts), sig.tolist()


def _refuse_with(cfg, name: str, options: tuple, wording: str = "set") -> None:
    for option in options:
        if cfg.get(option):
            # (diffusers' "Cannot use" messages end without a full stop, its "Cannot set" ones with one)
            stop = "." if wording == "set" else ""
            raise ValueError(f"Cannot {wording} `{name}` with `config.{option} = True`{stop}")


def euler_checks(cfg, num_inference_steps, timesteps, sigmas) -> bool:
    """diffusers' EulerDiscreteScheduler.set_timesteps argument checks (its messages); whether a custom schedule
    (``timesteps`` or ``sigmas``) is given."""
    if timesteps is not None and sigmas is not None:
        raise ValueError("Only one of `timesteps` or `sigmas` should be set.")
    if num_inference_steps is None and timesteps is None and sigmas is None:
        raise ValueError("Must pass exactly one of `num_inference_steps` or `timesteps` or `sigmas.")
    if num_inference_steps is not None and (timesteps is not None or sigmas is not None):
        raise ValueError("Can only pass one of `num_inference_steps` or `timesteps` or `sigmas`.")
    if timesteps is not None:
        _refuse_with(cfg, "timesteps", ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"))
        if cfg.timestep_type == "continuous" and cfg.prediction_type == "v_prediction":
            raise ValueError("Cannot set `timesteps` with `config.timestep_type = 'continuous'` and "
                             "`config.prediction_type = 'v_prediction'`.")
    return timesteps is not None or sigmas is not None


def heun_checks(cfg, num_inference_steps, timesteps) -> bool:
    """diffusers' HeunDiscreteScheduler.set_timesteps argument checks (its messages); whether ``timesteps`` is
    given."""
    if num_inference_steps is None and timesteps is None:
        raise ValueError("Must pass exactly one of `num_inference_steps` or `custom_timesteps`.")
    if num_inference_steps is not None and timesteps is not None:
        raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
    if timesteps is not None:
        _refuse_with(cfg, "timesteps", ("use_karras_sigmas",), "use")
        _refuse_with(cfg, "timesteps", ("use_exponential_sigmas", "use_beta_sigmas"))
    return timesteps is not None


def dpm_checks(cfg, num_inference_steps, timesteps) -> bool:
    """diffusers' DPMSolverMultistepScheduler.set_timesteps argument checks (its messages); whether ``timesteps``
    is given."""
    if num_inference_steps is None and timesteps is None:
        raise ValueError("Must pass exactly one of `num_inference_steps` or `timesteps`.")
    if num_inference_steps is not None and timesteps is not None:
        raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
    if timesteps is not None:
        _refuse_with(cfg, "timesteps", ("use_karras_sigmas", "use_lu_lambdas"), "use")
        _refuse_with(cfg, "timesteps", ("use_exponential_sigmas", "use_beta_sigmas"))
    return timesteps is not None
