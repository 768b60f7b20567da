"""Fused drop-in for diffusers' ``FlowMatchHeunDiscreteScheduler``: Heun's method in flow time.

Schedule (as diffusers): N sigmas ``linspace(sigma_max, sigma_min)`` of the training table, shifted by ``shift``, then
interleaved for two calls per step, sigmas ``[s0, s1, s1, ..., s_{N-1}, s_{N-1}, 0]`` and timesteps
``[t0, t1, t1, ..., t_{N-1}, t_{N-1}]`` (2N - 1 calls: the last step, to 0, has no corrector). One fused op per call:

- predictor (even call, model output v1 at sigma): ``prev = x_hat + (sigma_next - sigma_hat)*(sigma/sigma_hat)*v1``,
  writing the derivative ``(sigma/sigma_hat)*v1`` to a history buffer (``f`` slot; ``p = 0, q = 1`` pass the raw
  model output, as the flow-matching Euler drop-in). ``x_hat`` is the sample, kept for the corrector as diffusers
  keeps ``self.sample``;
- corrector (odd call, v2 at sigma_next): ``prev = x_hat + dt/2*v2 + dt/2*H``, diffusers' ``sample + derivative*dt``
  on its stored sample, with the exact v2 where diffusers recovers it as ``(x - (x - v2*sigma_next))/sigma_next``;
- churn (``s_churn > 0`` inside ``[s_tmin, s_tmax]``, ``gamma = min(s_churn/(2N - 1), sqrt(2) - 1)`` as diffusers,
  whose sigma list has 2N entries): one more op before the predictor, ``x_hat = x + s_noise*sqrt(sigma_hat^2 -
  sigma^2)*xi``, VE-style noise on the flow state. diffusers draws noise (``randn_tensor`` in the model output's
  dtype) on both calls of a churned step and uses only the predictor's; with a ``generator`` ours draws the same,
  so the generator advances identically. Without one the noise is diffkern's Philox stream.

Sigmas are float64 on the host (diffusers rounds sigma_min to float32 first: its schedule can differ from ours by
float32 rounding); timesteps are the float32 sigmas times T in float32, as diffusers computes them.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_flow_match_heun_discrete import FlowMatchHeunDiscreteSchedulerOutput

from ..ops import coefs
from . import timestep_labels
from .schedulers import FusedScheduler
from .schedulers_flow import FlowForwardProcess
from .scheduler_lookup import check_step_args
from .scheduler_utils import check_steps

_WHO = "FlowMatchHeunDiscreteScheduler"
_PLAIN = ("flow_heun", 0.0, 0.0, math.inf, 1.0)  # the knobs pipelines pass (none): no churn


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{_WHO}: {name} must be an int >= 1, got {value!r}")
    return int(value)


def _knob(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or math.isnan(value):
        raise ValueError(f"{_WHO}: {name} must be a number, got {value!r}")
    return float(value)


class FlowMatchHeunDiscreteScheduler(FlowForwardProcess, FusedScheduler):
    """Drop-in for ``diffusers.FlowMatchHeunDiscreteScheduler`` (config ``num_train_timesteps``, ``shift``; ``order =
    2``; ``set_timesteps(num_inference_steps, device)``, ``set_begin_index``, ``scale_noise``,
    ``state_in_first_order``);
    ``step()`` is one fused op per call (two on a churned predictor), with no host synchronisation."""

    _compatibles = []  # as diffusers
    order = 2
    _vp_state = False
    _locate_start = True  # no set_begin_index: the first step's timestep gives its index, as diffusers

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0):
        T = _positive_int("num_train_timesteps", num_train_timesteps)
        if isinstance(shift, bool) or not isinstance(shift, (int, float, np.number)) or not 0 < shift < math.inf:
            raise ValueError(f"{_WHO}: shift must be a finite number > 0, got {shift!r}")
        self._init_state()
        train = np.arange(T, 0, -1, dtype=np.float64) / T
        train = shift * train / (1.0 + (shift - 1.0) * train)
        self.sigmas_host = train.tolist()
        self._call_sigmas = self.sigmas_host
        self._sigma_lo, self._sigma_hi = float(train[-1]), float(train[0])  # float64 ends: the schedule's maths
        self.sigma_min, self.sigma_max = timestep_labels.flow_bounds(T, shift)  # diffusers' float32 ends (floats)
        self._sigmas_tensor = torch.from_numpy(train).float()
        self.timesteps = self._sigmas_tensor * T

    def _reset_loop(self) -> None:
        super()._reset_loop()
        self._x_hat = None  # the predictor's sample, which its corrector steps from (diffusers' self.sample)
        self._pred_key = None

    # -- schedule ---------------------------------------------------------------------------------

    @property
    def sigmas(self) -> torch.Tensor:
        """float32 sigmas of the calls plus the final 0 (2N values, on the ``set_timesteps`` device); before it, the
        training sigmas (CPU), as diffusers' attribute."""
        return self._sigmas_tensor

    @property
    def state_in_first_order(self) -> bool:
        """True when the next ``step()`` is a predictor (the first call of a step)."""
        k = self._step_index if self._step_index is not None else (self._begin_index or 0)
        return k % 2 == 0

    @property
    def sample(self):
        """diffusers' ``sample``: the predictor's (churned) sample between a step's two calls, else None."""
        return self._x_hat

    @property
    def prev_derivative(self):
        """diffusers' ``prev_derivative``: the predictor's slope (B, ...) between a step's two calls, else None; the
        scheduler's own buffer (written by the next predictor), not a copy per step as diffusers'."""
        return None if self._x_hat is None else self._history

    @property
    def dt(self):
        """diffusers' ``dt``: ``sigma_next - sigma_hat`` of the predictor between a step's two calls (0-d float32,
        on :attr:`sigmas`' device), else None."""
        if self._x_hat is None:
            return None
        i = (self._step_index - 1) // 2
        ends = torch.tensor([self.sigmas_host[i + 1], self._plan(self._pred_key)[1][i]], dtype=torch.float32,
                            device=self.sigmas.device)
        return ends[0] - ends[1]

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the next loop at ``timesteps[begin_index]``, the first call of a step: an even index (pipelines pass
        ``t_start * order``; from an odd one diffusers runs a predictor with the previous step's timestep)."""
        if isinstance(begin_index, int) and not isinstance(begin_index, bool) and begin_index % 2:
            raise ValueError(f"{_WHO}: begin_index: expected an even index (the first call of a step), got "
                             f"{begin_index}")
        super().set_begin_index(begin_index)

    def set_timesteps(self, num_inference_steps: int = None, device=None) -> None:
        """N = ``num_inference_steps`` shifted sigmas from sigma_max to sigma_min, interleaved: 2N - 1 timesteps."""
        n = check_steps(_WHO, num_inference_steps)
        T = self.config.num_train_timesteps
        shift = float(self.config.shift)
        sig = np.linspace(self._sigma_hi * T, self._sigma_lo * T, n) / T
        sig = shift * sig / (1.0 + (shift - 1.0) * sig)
        self.sigmas_host = sig.tolist() + [0.0]
        # diffusers' float32 timesteps, bit for bit: from its own float32-rounded sigma bounds (timestep_labels)
        lo, hi = timestep_labels.flow_bounds(T, shift)
        label = np.linspace(hi * T, lo * T, n) / T
        ts = torch.from_numpy(shift * label / (1.0 + (shift - 1.0) * label)).float() * T
        self._set_schedule(torch.cat([ts[:1], ts[1:].repeat_interleave(2)]), device, n)
        s = self.sigmas_host
        self._call_sigmas = s[:1] + [v for v in s[1:-1] for _ in range(2)] + [0.0]
        calls = torch.tensor(self._call_sigmas, dtype=torch.float32)
        self._sigmas_tensor = calls.to(device) if device is not None else calls
        self._warm(device, _PLAIN)

    def _build(self, key):
        """Rows 0..N-1 predictors, N..2N-1 correctors, 2N..3N-1 churn noise; meta: the sigma_hat of each step."""
        _, s_churn, s_tmin, s_tmax, s_noise = key
        sig = self.sigmas_host
        n = len(sig) - 1
        gamma = min(s_churn / (2 * n - 1), math.sqrt(2.0) - 1.0)  # 2N - 1: len(diffusers' sigmas) - 1
        hats = [s * (1.0 + gamma) if gamma > 0 and s_tmin <= s <= s_tmax else s for s in sig[:-1]]
        pred, corr, churn = [], [], []
        for s, sh, sn in zip(sig[:-1], hats, sig[1:]):
            dt = sn - sh
            pred.append(coefs.row(a=1.0, g=dt * (s / sh), p=0.0, q=1.0, f=s / sh))
            corr.append(coefs.row(a=1.0, g=dt / 2.0, p=0.0, q=1.0, c=dt / 2.0))
            churn.append(coefs.row(a=1.0, p=0.0, q=0.0, s=s_noise * math.sqrt(max(sh * sh - s * s, 0.0))))
        return coefs.table(pred + corr + churn), hats

    def loop_spec(self):
        """The churn-free loop as diffkern's ``heun_flow`` sampler (:mod:`diffkern.coef_tables_flow`) on the VE sigmas
        ``t/(1 - t)`` of the N+1 flow sigmas (t = 1 at ``loop_spec.FLOW_TOP``), with the N distinct timesteps: a
        ``flow`` :class:`~diffkern.diffusers.loop_spec.LoopSpec` (state ``x_t = x/(1 + sigma)``, velocity network)."""
        from .loop_spec import FLOW_TOP, LoopSpec

        ts = list(self.sigmas_host)
        if self._host_timesteps is None:
            raise ValueError(f"{_WHO}: call set_timesteps(num_inference_steps) before accelerate's loop_spec")
        if any(not 0.0 <= t <= 1.0 for t in ts) or any(b >= a for a, b in zip(ts[:-1], ts[1:])):
            raise ValueError(f"accelerate: {_WHO} with num_train_timesteps={self.config.num_train_timesteps} and "
                             f"{len(ts) - 1} steps gives the flow sigmas {ts}; the fused loop needs sigmas in [0, 1] "
                             "that decrease strictly; run the pipeline with diffkern.diffusers."
                             f"{_WHO} as its scheduler instead")
        sigmas = [FLOW_TOP if t == 1.0 else t / (1.0 - t) for t in ts]
        calls = self._host_timesteps
        return LoopSpec("heun_flow", sigmas, calls[:1] + calls[1::2], {}, vp=False, flow=True)

    # -- step ---------------------------------------------------------------------------------------

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             return_dict: bool = True):
        """A predictor (even calls) or corrector (odd calls); returns ``(prev_sample,)`` (or diffusers' output class)
        in ``model_output``'s dtype, computed in float32 at least (float64 when either input is float64)."""
        if isinstance(timestep, (int, np.integer)) or (isinstance(timestep, torch.Tensor)
                                                       and not timestep.dtype.is_floating_point):
            raise ValueError(f"{_WHO}: timestep: expected one of scheduler.timesteps (a float), got an integer "
                             f"{timestep!r} (an index from enumerate(timesteps)?)")
        key = ("flow_heun", _knob("s_churn", s_churn), _knob("s_tmin", s_tmin), _knob("s_tmax", s_tmax),
               _knob("s_noise", s_noise))
        k = self._index(timestep)
        check_step_args(model_output, sample)
        n = len(self.sigmas_host) - 1
        i, corrector = divmod(k, 2)
        hats = self._plan(key)[1]
        work = torch.promote_types(torch.promote_types(sample.dtype, model_output.dtype), torch.float32)
        x = sample if sample.dtype == work else sample.to(work)
        # diffusers draws whenever gamma > 0 in the window, on both calls of the step (the corrector's goes unused)
        noise = self._draw(generator, model_output, x) if hats[i] > self.sigmas_host[i] else None
        if not corrector:
            if float(self._plan(key)[0][2 * n + i, coefs.S]) != 0.0:  # host table: no device read
                x, _ = self._fused(key, 2 * n + i, x, x, noise=noise, x0=False)
            history = self._history
            if history is None or history.shape != x.shape or history.dtype != x.dtype or history.device != x.device:
                # each predictor writes the whole buffer: a new one for a new shape/dtype, nothing carried over
                history = self._history = torch.empty_like(x, memory_format=torch.contiguous_format)
            prev, _ = self._fused(key, i, x, model_output, history_out=history, x0=False)
            self._x_hat, self._pred_key = x, key
        else:
            if self._x_hat is None:
                raise ValueError(f"{_WHO}: timestep: timesteps[{k}] is a corrector call, but no predictor call of its "
                                 "step came before it in this loop")
            prev, _ = self._fused(self._pred_key, n + i, self._x_hat, model_output, history=self._history, x0=False)
            self._x_hat = None
        self._advance()
        prev = prev.to(model_output.dtype)
        return FlowMatchHeunDiscreteSchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    # -- forward process ------------------------------------------------------------------------------

    def _timestep_sigmas(self) -> list:
        return self._call_sigmas
