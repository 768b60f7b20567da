"""Fused Latent Consistency Model scheduler (Luo et al. 2023, multistep sampling; diffusers' ``LCMScheduler``).

The sample is the VP state ``z``. One step at timestep t, with alpha-bar ``ab`` there and ``ab'`` at the next
timestep of the schedule:

    x0       = p*z + q*m                             (epsilon: p = 1/sqrt(ab), q = -sqrt(1-ab)/sqrt(ab); v: p = sqrt(ab),
                                                      q = -sqrt(1-ab); sample: p = 0, q = 1)
    denoised = c_skip(t)*z + c_out(t)*x0             (the consistency function's boundary condition)
    z'       = sqrt(ab')*denoised + sqrt(1-ab')*xi   (fresh noise; z' = denoised on the last step)

with ``c_skip = sd^2/(s^2 + sd^2)``, ``c_out = s/sqrt(s^2 + sd^2)``, ``s = t*timestep_scaling``, ``sd = 0.5``.
``denoised`` is linear in (z, m), so the whole step is one row of :func:`diffkern.ops.sampler_step`:
``P = c_skip + c_out*p``, ``Q = c_out*q`` make the fused x0 output the denoised estimate, and ``B = sqrt(ab')``,
``S = sqrt(1-ab')`` re-noise it. The step after the last timestep of the list targets that timestep itself
(diffusers' ``prev_timestep = timestep``), and only step ``num_inference_steps - 1`` is noise-free, so a custom
schedule cut by ``strength < 1`` re-noises its last step too, as diffusers does.

Refused: ``clip_sample=True`` (diffusers clamps x0 before the boundary condition; the fused op can only clamp the
denoised estimate it returns, which differs because c_skip > 0) and ``thresholding=True`` (a per-sample quantile).
"""
from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_lcm import LCMSchedulerOutput

from ..ops import coefs
from . import scheduler_tables
from .config_checks import check_common, unsupported
from .schedulers import FusedScheduler
from .schedulers_vp import _VPScheduler
from .scheduler_utils import check_steps
from .scheduler_lookup import previous_timestep

SIGMA_DATA = 0.5  # diffusers' (and the LCM checkpoints') sigma_data of the boundary condition
_PREDICTIONS = ("epsilon", "sample", "v_prediction")
_WHO = "LCMScheduler"


def _int_at_least(name: str, value, lo: int, who: str = _WHO) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
        raise ValueError(f"{who}: {name} must be an int >= {lo}, got {value!r}")
    return int(value)


def _strength(strength, who: str = _WHO) -> float:
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not strength > 0 \
            or not math.isfinite(strength):
        raise ValueError(f"{who}: strength must be a finite number > 0, got {strength!r}")
    return float(strength)


def boundary_scalings(timestep: float, timestep_scaling: float) -> tuple[float, float]:
    """``(c_skip, c_out)`` of the LCM boundary condition at a (discrete) timestep, in float64."""
    s = float(timestep) * float(timestep_scaling)
    d2 = SIGMA_DATA * SIGMA_DATA
    return d2 / (s * s + d2), s / math.sqrt(s * s + d2)


def x0_conversion(prediction_type: str, alpha_bar: float) -> tuple[float, float]:
    """``(p, q)`` of ``x0 = p*z + q*model_output`` for the VP state z at alpha-bar ``alpha_bar``."""
    sa, sb = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    if prediction_type == "epsilon":
        return 1.0 / sa, -sb / sa
    if prediction_type == "v_prediction":
        return sa, -sb
    return 0.0, 1.0


class LCMScheduler(FusedScheduler):
    """Drop-in for ``diffusers.LCMScheduler`` (same config, ``set_timesteps`` and outputs); one fused op per step.

    ``step`` returns ``(prev_sample, denoised)`` (diffusers' ``LCMSchedulerOutput``). ``set_alpha_to_one``,
    ``steps_offset`` and ``timestep_spacing`` are kept in the config but, as in diffusers, play no part.

    Unsupported: ``clip_sample=True``, ``thresholding=True``; ``rescale_betas_zero_snr=True`` with epsilon
    prediction on a schedule that reaches t = T-1 (diffusers divides by 0 there).
    """

    _zero_snr_floor = None  # zero terminal SNR: alpha-bar(T-1) = 0, as diffusers' LCM
    _locate_start = True  # no set_begin_index: the first step's timestep gives its index, as diffusers
    previous_timestep = previous_timestep  # diffusers' public helper: the timestep after t in the schedule
    sigma_data = SIGMA_DATA  # diffusers' attribute (its step sets it)

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", trained_betas=None, original_inference_steps: int = 50,
                 clip_sample: bool = False, clip_sample_range: float = 1.0, set_alpha_to_one: bool = True,
                 steps_offset: int = 0, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 timestep_spacing: str = "leading", timestep_scaling: float = 10.0,
                 rescale_betas_zero_snr: bool = False):
        check_common(_WHO, prediction_type, _PREDICTIONS, thresholding)
        if clip_sample:
            raise unsupported(_WHO, "clip_sample", True, "diffusers clamps x0 before the boundary condition "
                              "c_skip*sample + c_out*x0, and the fused step can clamp only the denoised estimate it "
                              "returns, which differs wherever c_skip > 0")
        _int_at_least("original_inference_steps", original_inference_steps, 1)
        if isinstance(timestep_scaling, bool) or not isinstance(timestep_scaling, numbers.Real) \
                or not math.isfinite(timestep_scaling):
            raise ValueError(f"{_WHO}: timestep_scaling must be a finite number, got {timestep_scaling!r}")
        self._init_consistency(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                               rescale_betas_zero_snr, set_alpha_to_one)

    final_alpha_cumprod = scheduler_tables.final_alpha_cumprod

    def _init_consistency(self, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                          rescale_betas_zero_snr, set_alpha_to_one) -> None:
        """Training table and the attributes diffusers' consistency schedulers (LCM, TCD) expose."""
        self._init_training(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                            rescale_betas_zero_snr)
        # diffusers keeps it, but a step never targets a negative timestep (LCM's last one targets itself, TCD's t = 0)
        self._final_alpha_cumprod = 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])
        self.init_noise_sigma = 1.0
        self.custom_timesteps = False

    # -- schedule -----------------------------------------------------------------------------------

    def set_timesteps(self, num_inference_steps: int = None, device=None, original_inference_steps: int = None,
                      timesteps=None, strength: float = 1.0):
        """diffusers' LCM schedule: ``num_inference_steps`` evenly spaced (by index) among the skipping-step
        timesteps ``k*j - 1`` (``k = T // original_inference_steps``, ``j <= original_inference_steps*strength``),
        or custom decreasing ``timesteps`` (cut to the last ``int(len*strength)`` for image-to-image)."""
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError(f"{_WHO}: num_inference_steps / timesteps: pass exactly one of them")
        T = self.config.num_train_timesteps
        original = self.config.original_inference_steps if original_inference_steps is None \
            else original_inference_steps
        original = _int_at_least("original_inference_steps", original, 1)
        if original > T:
            raise ValueError(f"{_WHO}: original_inference_steps={original} cannot exceed num_train_timesteps={T}")
        _strength(strength)
        k = T // original
        origin = np.arange(1, int(original * strength) + 1, dtype=np.int64) * k - 1  # the skipping-step timesteps
        if timesteps is not None:
            ts, total = self._custom(timesteps, origin, original, strength)
        else:
            ts, total = self._standard(num_inference_steps, origin, original, strength), num_inference_steps
        self._set_schedule(torch.from_numpy(np.ascontiguousarray(ts)).to(torch.long), device, total)
        self._check_zero_snr()
        self._warm(device, ("lcm",))

    def _standard(self, num_inference_steps, origin, original: int, strength: float) -> np.ndarray:
        """``num_inference_steps`` of the candidate timesteps ``origin``, evenly spaced by index (validated)."""
        T, who = self.config.num_train_timesteps, type(self).__name__  # TCDScheduler reuses it
        n = check_steps(who, num_inference_steps)
        if n > T:
            raise ValueError(f"{who}: num_inference_steps={n} cannot exceed num_train_timesteps={T}")
        if len(origin) // n < 1:
            raise ValueError(f"{who}: num_inference_steps={n} exceeds the {len(origin)} candidate timesteps "
                             f"(original_inference_steps={original}, strength={strength}): lower num_inference_steps "
                             "or raise strength")
        if n > original:
            raise ValueError(f"{who}: num_inference_steps={n} cannot exceed original_inference_steps={original}")
        if int(origin[-1]) >= T:
            raise ValueError(f"{who}: strength={strength} puts timesteps past num_train_timesteps - 1 = {T - 1}")
        # numpy's float linspace, floored, defines the schedule (exact integer division differs from it)
        idx = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
        self.custom_timesteps = False
        return origin[::-1][idx]

    def _custom(self, timesteps, origin, original: int, strength: float):
        """Validated custom timesteps (cut by ``strength``) and diffusers' ``num_inference_steps`` for them."""
        T, who = self.config.num_train_timesteps, type(self).__name__  # TCDScheduler reuses it
        values = timesteps.tolist() if isinstance(timesteps, (torch.Tensor, np.ndarray)) else list(timesteps)
        if not values or any(isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)
                             for v in values):
            raise ValueError(f"{who}: timesteps must be a non-empty sequence of finite numbers, got {timesteps!r}")
        if any(b >= a for a, b in zip(values, values[1:])):
            raise ValueError(f"{who}: timesteps must be in descending order, got {values}")
        if values[0] >= T or values[-1] <= -1:
            raise ValueError(f"{who}: timesteps must lie in (-1, num_train_timesteps={T}), got {values}")
        # diffusers truncates them to integers (np.int64) after its checks and warnings, which see the given values
        ints = [int(v) for v in values]
        if any(b >= a for a, b in zip(ints, ints[1:])):
            raise ValueError(f"{who}: timesteps {values} truncate to the integers {ints}, which repeat (a step of "
                             "length 0, where diffusers would start its loop at the second); pass distinct integers")
        train = set(origin.tolist())
        # stacklevel 4 names the caller of set_timesteps (frames: this method, set_timesteps, FusedScheduler's wrapper)
        if strength == 1.0 and values[0] != T - 1:
            warnings.warn(f"{who}: the custom schedule starts at {values[0]}, not num_train_timesteps - 1 = {T - 1}; "
                          "results may be unexpected", stacklevel=4)
        off = [v for v in values[1:] if v not in train]
        if off:
            warnings.warn(f"{who}: custom timesteps {off} are not on the original (distillation) schedule; results "
                          "may be unexpected", stacklevel=4)
        if len(values) > original:
            warnings.warn(f"{who}: {len(values)} custom timesteps exceed original_inference_steps={original}; "
                          "results may be unexpected", stacklevel=4)
        n = len(values)
        start = max(n - min(int(n * strength), n), 0)
        if start >= n:
            raise ValueError(f"{who}: strength={strength} leaves none of the {n} custom timesteps")
        self.custom_timesteps = True
        return np.asarray(ints[start:], dtype=np.int64), n

    def _check_zero_snr(self) -> None:
        """Epsilon prediction cannot give x0 where alpha-bar is 0 (zero terminal SNR at t = T-1): diffusers divides
        by 0 there (inf/NaN samples); refuse the schedule instead."""
        if self.config.prediction_type == "epsilon" and any(float(self.alphas_cumprod[t]) == 0.0
                                                            for t in self._host_timesteps):
            raise unsupported(type(self).__name__, "rescale_betas_zero_snr", True,
                              "with prediction_type='epsilon' a step at t = num_train_timesteps - 1, where alpha-bar "
                              "is 0, divides by 0; use v_prediction, or timesteps that skip that one")

    def boundary(self, i: int) -> tuple[float, float]:
        """``(c_skip, c_out)`` of step i (float64)."""
        return boundary_scalings(self._host_timesteps[i], self.config.timestep_scaling)

    def _targets(self) -> list[float]:
        """alpha-bar each step re-noises to: the next timestep's, the step's own after the last timestep."""
        ab, ts = self.alphas_cumprod, self._host_timesteps
        return [float(ab[ts[i + 1]]) if i + 1 < len(ts) else float(ab[t]) for i, t in enumerate(ts)]

    def _build(self, key):
        cfg = self.config
        rows, noisy = [], []
        for i, (t, ab_next) in enumerate(zip(self._host_timesteps, self._targets())):
            c_skip, c_out = self.boundary(i)
            p, q = x0_conversion(cfg.prediction_type, float(self.alphas_cumprod[t]))
            on = i != self.num_inference_steps - 1  # diffusers' test: step index, not "last of the list"
            noise = {"b": math.sqrt(ab_next), "s": math.sqrt(1.0 - ab_next)} if on else {"b": 1.0}
            rows.append(coefs.row(p=c_skip + c_out * p, q=c_out * q, **noise))
            noisy.append(on)
        return coefs.table(rows), noisy

    # -- step ---------------------------------------------------------------------------------------

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """One LCM step; returns ``(prev_sample, denoised)``. model_output, sample: (B, ...) of one shape. The
        re-noising noise is drawn from ``generator`` as diffusers draws it (``randn_tensor`` in the output dtype),
        else it is the Philox stream (:meth:`set_seed`)."""
        i = self._index(timestep)
        x = self._state_in(sample, model_output)
        _, noisy = self._plan(("lcm",))
        noise = self._draw(generator, model_output, x, x.dtype) if noisy[i] else None
        prev, denoised = self._fused(("lcm",), i, x, model_output, noise=noise)
        self._advance()
        if not return_dict:
            return (prev, denoised)
        return LCMSchedulerOutput(prev_sample=prev, denoised=denoised)

    add_noise = _VPScheduler.add_noise
    get_velocity = _VPScheduler.get_velocity
    _vp_coefficients = _VPScheduler._vp_coefficients
