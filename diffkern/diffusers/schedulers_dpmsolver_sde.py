"""Fused DPM-Solver++ SDE scheduler ("DPM++ SDE", k-diffusion's ``sample_dpmpp_sde`` with r = 1/2, eta = 1), as
diffusers' ``DPMSolverSDEScheduler``: two model calls per step, the second at the log-midpoint sigma.

diffusers interleaves the calls: ``timesteps = [t_0, tm_0, t_1, tm_1, ..., t_{N-1}]`` (float64; ``tm_j`` the
fractional training timestep of step j's midpoint sigma ``sqrt(s_j s_{j+1})``), the step to sigma = 0 is Euler (one
call). Call k is a row of :func:`diffkern.coef_tables_dpmpp_sde.dpmpp_sde`: the first call (even k, row ``k // 2``)
steps to the midpoint with its share of the noise and writes the history buffer, the second (odd k, row
``N + k // 2``) finishes the step from it.

Noise. diffusers draws both calls' noise from a ``torchsde`` Brownian tree in sigma seeded by ``noise_sampler_seed``
(the two increments of a step overlap, so they are correlated); this scheduler draws the same joint law from
diffkern's Philox stream (the coefficient tables put the correlation in: :mod:`diffkern.coef_tables_dpmpp_sde`),
keyed by ``noise_sampler_seed`` when it is set, else by a fresh seed from torch's global generator per
``set_timesteps`` (diffusers: per noise sampler, created at the first step). Same law, not the same draws; it needs
no ``torchsde``. ``step()`` takes no generator, as diffusers'.
"""
from __future__ import annotations

import math
import numbers

import torch
from diffusers.configuration_utils import register_to_config

from .. import coef_tables_dpmpp_sde
from . import timestep_labels
from .config_checks import check_choice, unsupported
from .scheduler_default import DeferredSchedule
from .schedulers import sigma_to_t
from .schedulers_k import _TwoCallScheduler

_PREDICTIONS = ("epsilon", "v_prediction")  # diffusers' step raises for "sample"


def _check_s_noise(s_noise) -> float:
    if isinstance(s_noise, bool) or not isinstance(s_noise, numbers.Real) or not math.isfinite(s_noise) \
            or s_noise < 0:
        raise ValueError(f"s_noise: expected a finite number >= 0, got {s_noise!r}")
    return float(s_noise)


class DPMSolverSDEScheduler(DeferredSchedule, _TwoCallScheduler):
    """Drop-in for ``diffusers.DPMSolverSDEScheduler`` (``order = 2``: ``step()`` is called at t_i, then at the
    midpoint timestep of each step but the last); one fused op per call, Philox noise (module docstring).

    Unsupported: ``use_beta_sigmas``, ``prediction_type="sample"`` (diffusers raises for it too).
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 noise_sampler_seed=None, timestep_spacing: str = "linspace", steps_offset: int = 0):
        who = type(self).__name__
        self._init_training(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        check_choice(who, "prediction_type", prediction_type, _PREDICTIONS)
        self._init_k(who, prediction_type, timestep_spacing, use_karras_sigmas, use_exponential_sigmas,
                     use_beta_sigmas)
        if noise_sampler_seed is not None and (isinstance(noise_sampler_seed, bool)
                                               or not isinstance(noise_sampler_seed, int)):
            raise ValueError(f"noise_sampler_seed: expected an int or None, got {noise_sampler_seed!r}")
        self._mids = []
        self._s_noise = 1.0
        self.set_seed(noise_sampler_seed)
        self._defer_default_schedule()  # diffusers' __init__ runs set_timesteps(T)

    @property
    def noise_sampler_seed(self):
        """The config's ``noise_sampler_seed`` (diffusers keeps it as an attribute too)."""
        return self.config.noise_sampler_seed

    @property
    def state_in_first_order(self) -> bool:
        """True when the next ``step()`` is a step's first call, and after the loop's last call (an Euler step to 0
        with no second call), as diffusers' (its ``sample`` is None there)."""
        done = self._host_timesteps is not None and (self._step_index or 0) >= len(self._host_timesteps)
        return done or super().state_in_first_order

    def set_timesteps(self, num_inference_steps: int = None, device=None, num_train_timesteps: int = None):
        """Timesteps ``[t_0, tm_0, t_1, tm_1, ..., t_{N-1}]`` (2N - 1 calls, float64) as diffusers makes them."""
        who = type(self).__name__
        cfg = self.config
        if num_train_timesteps not in (None, cfg.num_train_timesteps):
            raise unsupported(who, "num_train_timesteps", num_train_timesteps,
                              f"set_timesteps uses the config's {cfg.num_train_timesteps}")
        # diffusers reads the config's sigma_min/sigma_max (a config loaded from Euler's) for exponential sigmas only:
        # its Karras conversion (copied from LMS) spans the schedule's own ends
        exponential = cfg.use_exponential_sigmas
        ts, self.sigmas_host = self._k_schedule(num_inference_steps, cfg.get("sigma_min") if exponential else None,
                                                cfg.get("sigma_max") if exponential else None, float64=True)
        n = num_inference_steps
        plan = self._build(("dpmpp_sde", 1.0))[1]
        mids = plan.row_sigma[plan.corrector_row:plan.corrector_row + n - 1]
        kind = "karras" if cfg.use_karras_sigmas else "exponential" if exponential else None
        # diffusers' own values where they can be repeated, bit for bit (timestep_labels)
        calls = timestep_labels.dpmsolver_sde_timesteps(self, n, kind, cfg.get("sigma_min"), cfg.get("sigma_max"))
        if calls is None:
            mid_t = sigma_to_t(self.alphas_cumprod, torch.tensor(mids, dtype=torch.float64))
            calls = torch.cat([torch.stack([ts[:-1], mid_t], 1).flatten(), ts[-1:]])
        self._set_schedule(calls, device, n)
        self._mids = list(mids)
        self._warm(device, ("dpmpp_sde", 1.0))

    def _build(self, key):
        plan = coef_tables_dpmpp_sde.dpmpp_sde(self.sigmas_host, eta=1.0, s_noise=key[1], r=0.5, conv=self._conv)
        return plan.table, plan

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """``sample / sqrt(sigma^2 + 1)``, sigma the step's sigma (first call) or its midpoint sigma (second)."""
        k = self._index(timestep)
        sigma = self._mids[k // 2] if k % 2 else self.sigmas_host[k // 2]
        return sample / math.sqrt(sigma * sigma + 1.0)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True,
             s_noise: float = 1.0):
        """First call (even k: to the midpoint sigma, with its noise) or second call (odd k: the step's end, with
        the rest of the noise); returns (prev_sample, pred_original_sample). ``s_noise`` scales the noise; a step's
        two calls must take the same value (their noises are one Brownian path)."""
        s_noise = _check_s_noise(s_noise)
        k = self._index(timestep)
        if k % 2 and s_noise != self._s_noise:
            raise ValueError(f"s_noise: the second call of a step must take its first call's value "
                             f"{self._s_noise}, got {s_noise}")
        self._s_noise = s_noise
        key = ("dpmpp_sde", s_noise)
        _, plan = self._plan(key)
        x = self._state_in(sample, model_output)
        i = k // 2
        history = self._history_for(x, first=k == self._loop_start)
        if k % 2:
            prev, x0 = self._fused(key, plan.corrector_row + i, x, model_output, history=history)
        else:
            # diffusers' `sample` between the two calls (a reference, no copy); none where no second call follows
            # (the last step, an Euler step to sigma = 0: diffusers stores nothing there)
            self._first_sample = x if plan.corrector[i] else None
            prev, x0 = self._fused(key, i, x, model_output, history_out=history)
        self._advance()
        return self._output(return_dict, prev, x0)
