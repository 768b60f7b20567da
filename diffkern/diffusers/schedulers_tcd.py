"""Fused Trajectory Consistency Distillation scheduler (Zheng et al. 2024, strategic stochastic sampling;
diffusers' ``TCDScheduler``, for the SD/SDXL TCD LoRAs).

The sample is the VP state ``z``. One step at timestep t, with ``t'`` the next timestep of the schedule (0 after the
last) and the intermediate timestep ``s = floor((1 - eta)*t')``; ``ab`` is alpha-bar:

    x0  = p*z + q*m,  eps = pe*z + qe*m                (by prediction type, at ab(t))
    x_s = sqrt(ab(s))*x0 + sqrt(1 - ab(s))*eps         (deterministic DDIM jump from t to s: "pred_noised_sample")
    z'  = sqrt(ab(t')/ab(s))*x_s + sqrt(1 - ab(t')/ab(s))*xi    (forward noise from s to t'; z' = x_s when eta = 0
                                                                  or on step num_inference_steps - 1)

``x_s`` is linear in (z, m), so the step is one row of :func:`diffkern.ops.sampler_step`: ``P``, ``Q`` make the
fused x0 output ``x_s`` (the second output diffusers returns), ``B``, ``S`` re-noise it. eta is an argument of
``step``, not of the config: its table is built on the host in float64 once per eta value and schedule.

``s`` is computed as diffusers computes it in its default float32 world: ``(1 - eta)`` (a Python float) times the
int64 timestep tensor is a float32 product, floored; it differs from the float64 ``floor`` for some (eta, t'), e.g.
eta = 0.3, t' = 90 gives 63 in float32 and 62 in float64 (:func:`intermediate_timestep`).

Refused, naming the key: a prediction type other than epsilon, sample, v_prediction; an unknown beta schedule; eta
outside [0, 1]; epsilon prediction at a timestep whose alpha-bar is 0 (``rescale_betas_zero_snr``, where diffusers
divides by 0). ``clip_sample``, ``thresholding`` (and their ranges), ``set_alpha_to_one``, ``steps_offset``,
``timestep_spacing`` and ``timestep_scaling`` are kept in the config and, as in diffusers' TCD step, play no part.

Level 2 (:func:`diffkern.diffusers.accelerate`) refuses it: in VE coordinates the step is ancestral Euler whose
sigma_down is sigma(s), a per-step choice that no diffkern sampler's knobs give (``loop_spec``).
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_tcd import TCDSchedulerOutput

from ..ops import coefs
from .config_checks import check_choice
from .schedulers import FusedScheduler
from .schedulers_lcm import LCMScheduler, _int_at_least, _strength, x0_conversion
from .schedulers_vp import _VPScheduler
from .scheduler_lookup import previous_timestep

_PREDICTIONS = ("epsilon", "sample", "v_prediction")
_WHO = "TCDScheduler"
DEFAULT_ETA = 0.3  # diffusers' default of step(eta=...); pipelines pass their own eta (0.0 by default)


def intermediate_timestep(prev_timestep: int, eta: float) -> int:
    """diffusers' ``s = floor((1 - eta)*prev_timestep)``, with its float32 rounding (see the module docstring)."""
    return int(np.floor(np.float32(np.float32(1.0 - eta) * np.float32(prev_timestep))))


def eps_conversion(prediction_type: str, alpha_bar: float) -> tuple[float, float]:
    """``(pe, qe)`` of ``eps = pe*z + qe*model_output`` for the VP state z at alpha-bar ``alpha_bar``."""
    sa, sb = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    if prediction_type == "epsilon":
        return 0.0, 1.0
    if prediction_type == "v_prediction":
        return sb, sa
    return 1.0 / sb, -sa / sb


def _check_eta(eta) -> float:
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"{_WHO}: eta must be a number in [0, 1], got {eta!r}")
    return float(eta)


class TCDScheduler(FusedScheduler):
    """Drop-in for ``diffusers.TCDScheduler`` (same config, ``set_timesteps``, ``step(..., eta=0.3, ...)`` and
    outputs); one fused op per step.

    ``step`` returns ``(prev_sample, pred_noised_sample)`` (diffusers' ``TCDSchedulerOutput``). ``clip_sample``,
    ``thresholding``, ``set_alpha_to_one``, ``steps_offset``, ``timestep_spacing`` and ``timestep_scaling`` are kept
    in the config but, as in diffusers' TCD step, play no part.

    Unsupported: ``rescale_betas_zero_snr=True`` with epsilon prediction on a schedule that reaches t = T-1
    (diffusers divides by 0 there).
    """

    _zero_snr_floor = None  # zero terminal SNR: alpha-bar(T-1) = 0, as diffusers' TCD
    _locate_start = True  # no set_begin_index: the first step's timestep gives its index, as diffusers
    previous_timestep = previous_timestep  # diffusers' public helper: the timestep after t in the schedule
    _custom = LCMScheduler._custom  # same custom-timestep rules (validation, warnings, strength cut)
    _standard = LCMScheduler._standard  # same evenly-spaced pick among the candidates
    _check_zero_snr = LCMScheduler._check_zero_snr
    _init_consistency = LCMScheduler._init_consistency
    final_alpha_cumprod = LCMScheduler.final_alpha_cumprod

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", trained_betas=None, original_inference_steps: int = 50,
                 clip_sample: bool = False, clip_sample_range: float = 1.0, set_alpha_to_one: bool = True,
                 steps_offset: int = 0, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 timestep_spacing: str = "leading", timestep_scaling: float = 10.0,
                 rescale_betas_zero_snr: bool = False):
        check_choice(_WHO, "prediction_type", prediction_type, _PREDICTIONS)
        _int_at_least("original_inference_steps", original_inference_steps, 1, _WHO)
        self._init_consistency(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                               rescale_betas_zero_snr, set_alpha_to_one)

    # -- schedule -----------------------------------------------------------------------------------

    def set_timesteps(self, num_inference_steps: int = None, device=None, original_inference_steps: int = None,
                      timesteps=None, strength: float = 1.0):
        """diffusers' TCD schedule: ``num_inference_steps`` evenly spaced (by index) among the candidate timesteps,
        or custom decreasing ``timesteps`` (cut to the last ``int(len*strength)`` for image-to-image). The
        candidates are the skipping-step timesteps ``k*j - 1`` (``k = T // config.original_inference_steps``,
        ``j <= original*strength``) when ``original_inference_steps`` is not passed, and every training timestep
        below ``T*strength`` when it is (diffusers' rule; the passed value then only bounds the step count)."""
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError(f"{_WHO}: num_inference_steps / timesteps: pass exactly one of them")
        T = self.config.num_train_timesteps
        passed = original_inference_steps is not None
        original = _int_at_least("original_inference_steps", original_inference_steps if passed
                                 else self.config.original_inference_steps, 1, _WHO)
        _strength(strength, _WHO)
        if passed:
            origin = np.arange(0, int(T * strength), dtype=np.int64)
        else:
            if original > T:
                raise ValueError(f"{_WHO}: original_inference_steps={original} cannot exceed num_train_timesteps={T}")
            origin = np.arange(1, int(original * strength) + 1, dtype=np.int64) * (T // original) - 1
        if timesteps is not None:
            ts, total = self._custom(timesteps, origin, original, strength)
        else:
            ts, total = self._standard(num_inference_steps, origin, original, strength), num_inference_steps
        self._set_schedule(torch.from_numpy(np.ascontiguousarray(ts)).to(torch.long), device, total)
        self._check_zero_snr()
        self._warm(device, ("tcd", DEFAULT_ETA), ("tcd", 0.0))

    def intermediate_timesteps(self, eta: float = DEFAULT_ETA) -> list[int]:
        """The intermediate timestep ``s`` of each step for ``eta`` (host ints)."""
        eta = _check_eta(eta)
        ts = self._host_timesteps
        return [intermediate_timestep(ts[i + 1] if i + 1 < len(ts) else 0, eta) for i in range(len(ts))]

    def _build(self, key):
        _, eta = key
        ab, ts, kind = self.alphas_cumprod, self._host_timesteps, self.config.prediction_type
        rows, noisy = [], []
        for i, (t, s) in enumerate(zip(ts, self.intermediate_timesteps(eta))):
            ab_t, ab_s = float(ab[t]), float(ab[s])
            ab_prev = float(ab[ts[i + 1]]) if i + 1 < len(ts) else float(ab[0])
            p, q = x0_conversion(kind, ab_t)
            pe, qe = eps_conversion(kind, ab_t)
            root_s, root_1s = math.sqrt(ab_s), math.sqrt(1.0 - ab_s)
            # diffusers' test: step index against num_inference_steps - 1, not "last of the list" (strength cut)
            on = eta > 0 and i != self.num_inference_steps - 1
            ratio = min(ab_prev / ab_s, 1.0)  # s <= t' and alpha-bar decreases: ratio <= 1 (min: rounding)
            noise = {"b": math.sqrt(ratio), "s": math.sqrt(1.0 - ratio)} if on else {"b": 1.0}
            rows.append(coefs.row(p=root_s * p + root_1s * pe, q=root_s * q + root_1s * qe, **noise))
            noisy.append(on)
        return coefs.table(rows), noisy

    # -- step ---------------------------------------------------------------------------------------

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = DEFAULT_ETA,
             generator=None, return_dict: bool = True):
        """One TCD step; returns ``(prev_sample, pred_noised_sample)``. model_output, sample: (B, ...) of one shape.
        ``eta`` in [0, 1] (the paper's gamma). The noise is drawn from ``generator`` as diffusers draws it
        (``randn_tensor`` in the output dtype, on every step with eta > 0 but step ``num_inference_steps - 1``),
        else it is the Philox stream (:meth:`set_seed`)."""
        key = ("tcd", _check_eta(eta))
        i = self._index(timestep)
        x = self._state_in(sample, model_output)
        _, noisy = self._plan(key)
        noise = self._draw(generator, model_output, x, x.dtype) if noisy[i] else None
        prev, noised = self._fused(key, i, x, model_output, noise=noise)
        self._advance()
        if not return_dict:
            return (prev, noised)
        return TCDSchedulerOutput(prev_sample=prev, pred_noised_sample=noised)

    add_noise = _VPScheduler.add_noise
    get_velocity = _VPScheduler.get_velocity
    _vp_coefficients = _VPScheduler._vp_coefficients
