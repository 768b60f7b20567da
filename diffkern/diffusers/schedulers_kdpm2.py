"""Fused KDPM2 and KDPM2-ancestral schedulers (k-diffusion's DPM-Solver-2): two model calls per step, the second
at the log-midpoint sigma, as diffusers' ``KDPM2DiscreteScheduler`` / ``KDPM2AncestralDiscreteScheduler``.

diffusers interleaves the calls: ``timesteps = [t_0, tm_0, t_1, tm_1, ..., t_{N-1}]``, where ``tm_j`` is the
(fractional) training timestep of step j's midpoint sigma; the step to sigma = 0 is Euler (one call). Call k of the
loop is step ``k // 2``: a predictor (even k, row ``k // 2`` of :func:`diffkern.coef_tables.dpm_2`, storing its
slope in the history buffer) or a corrector (odd k, row ``N + k // 2``, which eliminates the predictor's input x
through the stored slope, so nothing but the history buffer is kept between the two calls). The midpoint sigmas
are the table's own (the rows :func:`diffkern.diffusers.accelerate`'s loop runs), and that loop feeds each UNet
call the timestep of the same call here (``LoopSpec.call_timesteps``).
"""
from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import register_to_config

from .. import coef_tables
from . import timestep_labels
from .config_checks import check_choice, unsupported
from .scheduler_tables import LogSigmaTable
from .scheduler_default import DeferredSchedule
from .schedulers import sigma_to_t
from .schedulers_k import _TwoCallScheduler, stored_sample_rows

_PREDICTIONS = ("epsilon", "v_prediction")  # diffusers' KDPM2 classes raise for the others


class _KDPM2Scheduler(LogSigmaTable, DeferredSchedule, _TwoCallScheduler):
    """Shared loop of the two classes: interleaved schedule, predictor/corrector calls, input scaling."""

    _key = ("dpm_2",)

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "linear", trained_betas=None, use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 prediction_type: str = "epsilon", timestep_spacing: str = "linspace", steps_offset: int = 0):
        """diffusers' KDPM2 config, the same for both classes."""
        self._init_training(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        who = type(self).__name__
        check_choice(who, "prediction_type", prediction_type, _PREDICTIONS)
        self._init_k(who, prediction_type, timestep_spacing, use_karras_sigmas, use_exponential_sigmas,
                     use_beta_sigmas)
        self._mids = []
        self._defer_default_schedule()  # diffusers' __init__ runs set_timesteps(T)

    def _table(self, sigmas):
        """The coefficient plan of ``sigmas`` (defined by each class)."""
        raise NotImplementedError

    def _build(self, key):
        plan = self._table(self.sigmas_host)
        return stored_sample_rows(plan), plan

    def set_timesteps(self, num_inference_steps: int = None, device=None, num_train_timesteps: int = None):
        """Timesteps ``[t_0, tm_0, t_1, tm_1, ..., t_{N-1}]`` (2N - 1 calls): float32, or float64 with Karras or
        exponential sigmas (Karras ones rounded to integers but for the midpoints), as diffusers makes them."""
        who = type(self).__name__
        cfg = self.config
        if num_train_timesteps not in (None, cfg.num_train_timesteps):
            raise unsupported(who, "num_train_timesteps", num_train_timesteps,
                              f"set_timesteps uses the config's {cfg.num_train_timesteps}")
        # diffusers reads sigma_min/sigma_max whenever the config has them (a config loaded from Euler's)
        ts, self.sigmas_host = self._k_schedule(num_inference_steps, cfg.get("sigma_min"), cfg.get("sigma_max"))
        karras = self._option("use_karras_sigmas", False)
        wide = karras or self._option("use_exponential_sigmas", False)
        if wide:  # diffusers keeps these float64; Karras ones rounded
            kind = "karras" if karras else "exponential"
            labels = timestep_labels.k_timesteps(self, num_inference_steps, kind, cfg.get("sigma_min"),
                                                 cfg.get("sigma_max"))
            ts = sigma_to_t(self.alphas_cumprod, torch.tensor(self.sigmas_host[:-1], dtype=torch.float64)) \
                if labels is None else torch.from_numpy(labels)
            ts = ts.round() if karras else ts
        built = self._build(self._key)
        plan = built[1]
        n = num_inference_steps
        if plan.corrector != [True] * (n - 1) + [False]:  # every step but the one to 0 has a midpoint call
            raise RuntimeError(f"{who}: steps with a midpoint call {plan.corrector}, expected all but the last")
        mids = plan.row_sigma[plan.corrector_row:plan.corrector_row + n - 1]
        kind = "karras" if karras else "exponential" if wide else None
        # diffusers' own values where they can be repeated, bit for bit (timestep_labels)
        mid_t = timestep_labels.kdpm2_midpoint_timesteps(self, n, kind, cfg.get("sigma_min"), cfg.get("sigma_max"),
                                                          ancestral=self._noisy)
        if mid_t is None or len(mid_t) != n - 1:
            mid_t = sigma_to_t(self.alphas_cumprod, torch.tensor(mids, dtype=torch.float64))
        dtype = torch.float64 if wide else torch.float32
        calls = torch.cat([torch.stack([ts[:-1].to(dtype), mid_t.to(dtype)], 1).flatten(), ts[-1:].to(dtype)])
        self._set_schedule(calls, device, n)
        self._mids = list(mids)
        self._built[self._key] = built  # (_set_schedule forgets the previous loop's tables)
        self._warm(device, self._key)

    @property
    def sigmas(self) -> torch.Tensor:
        """diffusers' ``sigmas``: ``[s0, s1, s1, ..., s_{N-1}, s_{N-1}, 0, 0, 0]`` (float32, CPU; 2N + 2 values)."""
        out = super().sigmas
        if self._host_timesteps is None:
            return out
        return torch.cat([out, out[-1:].repeat(2)])

    @property
    def sigmas_interpol(self) -> torch.Tensor:
        """diffusers' ``sigmas_interpol``: the midpoint sigma of each call's step, laid out like :attr:`sigmas`
        (float32, CPU; 0 where a call has no midpoint). Computed in float64 from the schedule."""
        return _interleave(self._interpol(torch.tensor(self.sigmas_host, dtype=torch.float64)))

    def _interpol(self, s: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """``sample / sqrt(sigma^2 + 1)``, sigma the step's sigma (predictor) or its midpoint sigma (corrector)."""
        k = self._index(timestep)
        sigma = self._mids[k // 2] if k % 2 else self.sigmas_host[k // 2]
        return sample / math.sqrt(sigma * sigma + 1.0)

    def _call(self, model_output, timestep, sample, generator, return_dict):
        k = self._index(timestep)
        _, plan = self._plan(self._key)
        x = self._state_in(sample, model_output)
        i = k // 2
        history = self._history_for(x, first=k == self._loop_start)
        if k % 2:  # from the predictor's own sample, whatever sample is passed now (as diffusers)
            noise = self._draw(generator, model_output, x) if self._noisy else None
            prev, x0 = self._fused(self._key, plan.corrector_row + i, x, model_output, history=history,
                                   history2=self._first_sample, noise=noise)
        else:
            self._first_sample = x
            prev, x0 = self._fused(self._key, i, x, model_output, history_out=history)
        self._advance()
        return self._output(return_dict, prev, x0)


def _interleave(v: torch.Tensor) -> torch.Tensor:
    """diffusers' layout of a per-step vector (N+1,) over the 2N - 1 calls: ``[v0, v1, v1, ..., vN, vN, vN]``
    (2N + 2 values), in float32."""
    return torch.cat([v[:1], v[1:].repeat_interleave(2), v[-1:]]).to(torch.float32)


def _log_mid(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The log-midpoint ``exp(lerp(ln a, ln b, 1/2))`` as diffusers evaluates it (torch's lerp), down to its edge
    values: 0 where a > 0 = b, NaN where a = 0 < b (KDPM2's unused first entry)."""
    return a.log().lerp(b.log(), 0.5).exp()


class KDPM2DiscreteScheduler(_KDPM2Scheduler):
    """Drop-in for ``diffusers.KDPM2DiscreteScheduler`` (``order = 2``: ``step()`` is called at t_i, then at the
    midpoint timestep of each step but the last); one fused op per call.

    Unsupported: ``use_beta_sigmas``, ``prediction_type="sample"`` (diffusers raises for it too).
    """

    _noisy = False

    def _table(self, sigmas):
        return coef_tables.dpm_2(sigmas, conv=self._conv)

    def _interpol(self, s):
        # diffusers pairs sigma i with sigma i-1 (sigmas.roll(1)): entry i + 1 is step i's midpoint, entry 0 is 0
        return _log_mid(s, s.roll(1))

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """Predictor (even calls: Euler to the midpoint sigma) or corrector (odd calls: the DPM-Solver-2 step from
        the midpoint's slope); returns (prev_sample, pred_original_sample)."""
        return self._call(model_output, timestep, sample, None, return_dict)


class KDPM2AncestralDiscreteScheduler(_KDPM2Scheduler):
    """Drop-in for ``diffusers.KDPM2AncestralDiscreteScheduler`` (eta = 1: the DPM-Solver-2 step to sigma_down,
    then ``+ sigma_up*noise`` on the corrector call); one fused op per call.

    Unsupported: ``use_beta_sigmas``, ``prediction_type="sample"`` (diffusers raises for it too).
    """

    _key = ("dpm_2_ancestral",)
    _noisy = True

    def _table(self, sigmas):
        return coef_tables.dpm_2_ancestral(sigmas, eta=1.0, conv=self._conv)

    def _up_down(self, s):
        """diffusers' per-step (sigma_up, sigma_down) (N+1,) float64 (sigma_up's last entry is 0/0 = NaN there too)."""
        nxt = s.roll(-1)
        nxt[-1] = 0.0
        up = (nxt ** 2 * (s ** 2 - nxt ** 2) / s ** 2) ** 0.5
        down = (nxt ** 2 - up ** 2) ** 0.5
        down[-1] = 0.0
        return up, down

    def _interpol(self, s):
        out = _log_mid(s, self._up_down(s)[1])
        out[-2:] = 0.0
        return out

    @property
    def sigmas_up(self) -> torch.Tensor:
        """diffusers' ``sigmas_up`` (the noise added by each step's second call), laid out like :attr:`sigmas`."""
        return _interleave(self._up_down(torch.tensor(self.sigmas_host, dtype=torch.float64))[0])

    @property
    def sigmas_down(self) -> torch.Tensor:
        """diffusers' ``sigmas_down`` (each step's deterministic target), laid out like :attr:`sigmas`."""
        return _interleave(self._up_down(torch.tensor(self.sigmas_host, dtype=torch.float64))[1])

    @property
    def dt(self):
        """diffusers' ``dt``: ``sigmas_interpol[k] - sigmas[k]`` of this loop's last predictor call k (0-d float32
        CPU tensor), kept after its corrector as diffusers keeps it; None before the loop's first step."""
        last = self._last_call()
        if last is None:
            return None
        k = last - last % 2  # the predictor: the last call, or the one before its corrector
        return self.sigmas_interpol[k] - self.sigmas[k]

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """Predictor (even calls) or corrector plus noise (odd calls; from ``generator`` as diffusers draws it,
        else Philox); returns (prev_sample, pred_original_sample)."""
        return self._call(model_output, timestep, sample, generator, return_dict)
