"""Fused drop-in for diffusers' ``DDIMInverseScheduler``: DDIM inversion (data towards noise along the probability-flow
ODE, for null-text inversion, DiffEdit, pix2pix-zero, ...), one fused :func:`diffkern.ops.sampler_step` per step.

diffusers' step at timestep ``t`` (its ``timesteps`` increase) goes from the alpha-bar of ``s = t - T//N`` (the
initial alpha-bar, 1 or ``alphas_cumprod[0]`` by ``set_alpha_to_one``, where ``s < 0``) to the alpha-bar of ``t``,
whatever the spacing (so with "trailing" spacing, where consecutive timesteps need not differ by T//N, a step need
not start where the previous one ended: diffusers' rule, kept)::

    x0  = the model output converted at alpha-bar(s)        (clipped with clip_sample)
    eps = the noise estimate from the raw model output       (never from the clipped x0)
    out = sqrt(ab(t))*x0 + sqrt(1 - ab(t))*eps

The rows (:func:`inverse_row`) keep that structure, so their float32 rounding is diffusers' own: x0 is the fused op's
D (so ``pred_original_sample`` is its x0 output), and for epsilon / v prediction eps is read from the model output
itself through the history slot, since eliminating it through x0 (as :func:`diffkern.ops.ddim_row` does) multiplies
by ``1/sqrt(1 - ab(s))``, 100 at the first step, and cancels (and at ``ab(s) = 1`` divides by 0).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config

from .. import schedules
from ..ops import coefs
from . import scheduler_tables
from .config_checks import check_choice, unsupported
from .schedulers_vp import _VP_PREDICTIONS, _VPScheduler
from .scheduler_utils import check_steps

_WHO = "DDIMInverseScheduler"
_SPACINGS = ("leading", "trailing")  # diffusers' DDIMInverseScheduler.set_timesteps raises for any other


def inverse_row(alpha_prod_s: float, alpha_prod_t: float, prediction_type: str = "epsilon",
                clip_sample_range: float = math.inf) -> list[float]:
    """The row of diffusers' ``DDIMInverseScheduler.step`` from alpha-bar ``alpha_prod_s`` to ``alpha_prod_t``.

    float64 host arithmetic. The fused op then computes ``D = clamp(p*x + q*m, +-clip_sample_range)`` (diffusers'
    ``pred_original_sample``) and ``out = a*x + b*D + g*(p*x + q*m) + c*H``, where H must be the model output m
    itself (in x's dtype) whenever ``c`` is non-zero (epsilon and v prediction). Raises ValueError where diffusers
    divides by 0: epsilon from alpha-bar 0, "sample" from alpha-bar 1.
    """
    check_choice(_WHO, "prediction_type", prediction_type, _VP_PREDICTIONS)
    for name, v in (("alpha_prod_s", alpha_prod_s), ("alpha_prod_t", alpha_prod_t)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name}: expected a value in [0, 1], got {v!r}")
    if not clip_sample_range > 0:
        raise ValueError(f"clip_sample_range: expected > 0 (math.inf: no clipping), got {clip_sample_range!r}")
    sa, sb = math.sqrt(alpha_prod_s), math.sqrt(1.0 - alpha_prod_s)
    ra, rk = math.sqrt(alpha_prod_t), math.sqrt(1.0 - alpha_prod_t)
    if prediction_type == "epsilon":  # x0 = (x - sb*m)/sa, eps = m
        if sa == 0:
            raise ValueError("alpha_prod_s: 0 (zero SNR) cannot be inverted from with epsilon prediction "
                             "(x0 = (sample - sqrt(1 - alpha-bar)*eps)/0)")
        return coefs.row(p=1.0 / sa, q=-sb / sa, b=ra, c=rk, clip=clip_sample_range)
    if prediction_type == "v_prediction":  # x0 = sa*x - sb*m, eps = sa*m + sb*x
        return coefs.row(p=sa, q=-sb, b=ra, a=rk * sb, c=rk * sa, clip=clip_sample_range)
    if sb == 0:  # "sample": x0 = m, eps = (x - sa*m)/sb
        raise ValueError("alpha_prod_s: 1 (a noise-free sample) cannot be inverted from with 'sample' prediction "
                         "(eps = (sample - x0)/sqrt(1 - alpha-bar) divides by 0)")
    return coefs.row(p=0.0, q=1.0, b=ra, a=rk / sb, g=-rk * sa / sb, clip=clip_sample_range)


class DDIMInverseScheduler(_VPScheduler):
    """Drop-in for ``diffusers.DDIMInverseScheduler`` (same config, timesteps, outputs and ``from_config`` rules:
    ``set_alpha_to_zero``, its deprecated name, sets the initial alpha-bar as in diffusers); one fused op per step.

    Unsupported (ValueError naming the key): ``timestep_spacing`` other than "leading"/"trailing" (diffusers raises
    too, at ``set_timesteps``); a "leading" ``steps_offset`` that pushes the last timestep past T-1, and "trailing"
    step counts for which diffusers' float ``arange`` makes N+1 timesteps starting at t = -1 (diffusers indexes
    alpha-bar out of range or from its end there); ``prediction_type="sample"`` from alpha-bar 1 (the first step with
    ``set_alpha_to_one=True``), where diffusers divides by 0.
    """

    ignore_for_config = ["kwargs"]
    _deprecated_kwargs = ["set_alpha_to_zero"]

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, clip_sample: bool = True,
                 set_alpha_to_one: bool = True, steps_offset: int = 0, prediction_type: str = "epsilon",
                 clip_sample_range: float = 1.0, timestep_spacing: str = "leading",
                 rescale_betas_zero_snr: bool = False, **kwargs):
        if kwargs.get("set_alpha_to_zero") is not None:
            # diffusers' rule, kept: the old name's value is used as set_alpha_to_one's (the config keeps both keys)
            warnings.warn("The `set_alpha_to_zero` argument is deprecated. Please use `set_alpha_to_one` instead.",
                          FutureWarning, stacklevel=2)
            set_alpha_to_one = kwargs["set_alpha_to_zero"]
        check_choice(_WHO, "prediction_type", prediction_type, _VP_PREDICTIONS)
        self._init_training(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                            rescale_betas_zero_snr)
        self.timesteps = torch.arange(num_train_timesteps, dtype=torch.int64)  # increasing, as diffusers'
        self._initial_alpha_cumprod = 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])
        self.init_noise_sigma = 1.0

    initial_alpha_cumprod = scheduler_tables.initial_alpha_cumprod

    def _inverse_timesteps(self, n: int) -> torch.Tensor:
        """diffusers' increasing timesteps (n,) int64 for this config, or ValueError naming the key it refuses."""
        cfg = self.config
        T = cfg.num_train_timesteps
        if cfg.timestep_spacing not in _SPACINGS:
            raise ValueError(f"{_WHO}: timestep_spacing={cfg.timestep_spacing!r} is not supported (diffusers' "
                             f"DDIMInverseScheduler takes {' or '.join(map(repr, _SPACINGS))})")
        if cfg.timestep_spacing == "trailing":
            # numpy's arange(T, 0, -T/n) can hold n+1 values; diffusers' first timestep is then round(~0) - 1 = -1
            made = len(np.arange(T, 0, -T / n))
            if made != n:
                raise unsupported(_WHO, "timestep_spacing", "trailing",
                                  f"with num_inference_steps={n} and num_train_timesteps={T} diffusers' float arange "
                                  f"makes {made} timesteps, the first t = -1, which indexes alpha-bar from its end")
            return schedules.timesteps(n, T, "trailing").flip(0)
        offset = cfg.steps_offset
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"{_WHO}: steps_offset must be an int >= 0, got {offset!r}")
        ts = torch.arange(n, dtype=torch.int64) * (T // n) + offset
        if int(ts[-1]) >= T:
            raise unsupported(_WHO, "steps_offset", offset, f"with {n} 'leading' steps it pushes the last timestep "
                              f"to {int(ts[-1])}, past {T - 1} (diffusers indexes alpha-bar past its end)")
        return ts

    def set_timesteps(self, num_inference_steps: int, device=None):
        """diffusers' increasing timesteps ("leading" with ``steps_offset``, or "trailing") and the float64 rows of
        every step, moved to ``device`` once."""
        T = self.config.num_train_timesteps
        n = num_inference_steps
        n = check_steps(_WHO, n, T)
        ts = self._inverse_timesteps(n)
        ab, initial = self.alphas_cumprod, self._initial_alpha_cumprod
        # each step starts at s = t - T//n (diffusers also caps s at T - 1, which t <= T - 1 never reaches)
        pairs = [(float(ab[s]) if s >= 0 else initial, float(ab[t]))
                 for t, s in ((t, t - T // n) for t in ts.tolist())]
        if self.config.prediction_type == "sample" and any(a_s == 1.0 for a_s, _ in pairs):
            raise unsupported(_WHO, "prediction_type", "sample", "with set_alpha_to_one=True the first step starts "
                              "at alpha-bar 1, where diffusers' eps = (sample - x0)/sqrt(1 - alpha-bar) divides by 0")
        self._set_schedule(ts, device, n)
        self._pairs = pairs
        self._warm(device, ("inverse",))

    def _build(self, key):
        cfg = self.config
        clip = cfg.clip_sample_range if cfg.clip_sample else math.inf
        rows = [inverse_row(a_s, a_t, cfg.prediction_type, clip) for a_s, a_t in self._pairs]
        table = coefs.table(rows)
        return table, (table[:, coefs.C] != 0).tolist()  # meta: the rows that read the model output as H

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One inversion step from ``timesteps[step_index]``; returns (prev_sample, pred_original_sample).

        model_output, sample: (B, ...) float tensors of one shape (any strides; the result is in their promoted
        dtype, as diffusers'). No host synchronisation: the row is picked by the host step index.
        """
        i = self._index(timestep)
        x = self._state_in(sample, model_output)
        _, reads_model = self._plan(("inverse",))
        history = None
        if reads_model[i]:  # eps is the model output itself (epsilon, v): the fused op reads it as H
            history = model_output if model_output.dtype == x.dtype else model_output.to(x.dtype)
        prev, x0 = self._fused(("inverse",), i, x, model_output, history=history)
        self._advance()
        return self._output(return_dict, prev, x0)
