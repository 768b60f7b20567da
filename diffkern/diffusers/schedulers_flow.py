"""Fused drop-in for diffusers' ``FlowMatchEulerDiscreteScheduler`` (SD3, Flux, and most rectified-flow models).

The network predicts the velocity ``v = noise - x0`` of the path ``x = (1 - sigma)*x0 + sigma*noise``. One step:

- deterministic: ``prev = x + (sigma_next - sigma)*v``. The row is ``a = 1, g = dt, p = 0, q = 1``: the raw model
  output goes through the ``g*D_raw`` term untouched, so the only roundings are those of ``dt*v`` and the sum (the
  same as diffusers' float32 upcast; one fewer where the backend fuses the multiply-add). Converting to an x0
  estimate first (``D = x - sigma*v``, then ``prev = (sigma_next/sigma)*x + (1 - sigma_next/sigma)*D``) would round
  x0 and cancel when dt is small, which costs accuracy in float32 and bfloat16 states.
- ``stochastic_sampling``: ``prev = (1 - sigma_next)*x0 + sigma_next*noise`` with ``x0 = x - sigma*v`` (row
  ``p = 1, q = -sigma, b = 1 - sigma_next, s = sigma_next``), diffusers' formula and rounding order.

Sigmas are computed in float64 on the host from diffusers' definitions (shift or dynamic ``mu`` shift, terminal
stretch, Karras / exponential / beta conversions, inversion); the step uses them. diffusers derives sigma_min (and,
for custom sigmas/timesteps, the whole schedule) in float32, so its sigmas can differ from ours by their float32
rounding. Timesteps are the float32 sigmas times T in float32, as diffusers computes them: bitwise diffusers' wherever
the float32 sigmas agree, otherwise a few float32 ulps apart.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

from ..ops import coefs
from . import timestep_labels
from .config_checks import check_one_conversion, finite_mu
from .schedulers import FusedScheduler, match_schedule
from .scheduler_lookup import check_step_args
from .scheduler_utils import check_steps

_WHO = "FlowMatchEulerDiscreteScheduler"


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{_WHO}: {name} must be an int >= 1, got {value!r}")
    return int(value)


def _vector(name: str, values) -> np.ndarray:
    """A user's sigmas/timesteps list as a float64 (n,) array, n >= 1."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0 or not np.isfinite(arr).all():
        raise ValueError(f"{_WHO}: {name} must be a non-empty 1-D sequence of finite numbers, got {values!r}")
    return arr


def time_shift(kind: str, mu: float, t: np.ndarray) -> np.ndarray:
    """Resolution-dependent shift of sigmas ``t``: ``e^mu/(e^mu + 1/t - 1)`` ("exponential") or
    ``mu/(mu + 1/t - 1)`` ("linear"), written ``k*t/(k*t + 1 - t)`` so that t = 0 maps to 0 without dividing by 0."""
    k = math.exp(mu) if kind == "exponential" else mu
    return k * t / (k * t + (1.0 - t))


def stock_time_shift(kind: str, mu: float, t: np.ndarray) -> np.ndarray:
    """:func:`time_shift` in diffusers' form ``k/(k + (1/t - 1))``, for its timesteps bit for bit (t = 0 gives 0
    through 1/0 = inf, as there)."""
    k = math.exp(mu) if kind == "exponential" else mu
    with np.errstate(divide="ignore"):
        return k / (k + (1 / t - 1))


def _bounds(config, sig: np.ndarray, name: str, positive: bool = False) -> tuple[float, float]:
    """(sigma_min, sigma_max) of a conversion: >= 0 (Karras' fractional powers), > 0 if ``positive`` (logs)."""
    # diffusers reads sigma_min/sigma_max from the config whenever it has them (a config loaded from Euler's)
    lo, hi = config.get("sigma_min"), config.get("sigma_max")
    lo = float(sig[-1]) if lo is None else float(lo)
    hi = float(sig[0]) if hi is None else float(hi)
    if min(lo, hi) < 0 or (positive and min(lo, hi) == 0):
        raise ValueError(f"{_WHO}: {name}=True needs sigma_min and sigma_max {'> 0' if positive else '>= 0'}, got "
                         f"sigma_min={lo!r}, sigma_max={hi!r} (the config's, else the schedule's ends)")
    return lo, hi


def convert_sigmas(config, sig: np.ndarray) -> np.ndarray:
    """The Karras (rho = 7), exponential or beta (alpha = beta = 0.6) schedule between the ends of ``sig``
    (or the config's sigma_min/sigma_max), with ``len(sig)`` values, as diffusers converts them."""
    n = len(sig)
    ramp = np.linspace(0.0, 1.0, n)
    if config.use_karras_sigmas:
        lo, hi = _bounds(config, sig, "use_karras_sigmas")
        rho = 7.0
        return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    if config.use_exponential_sigmas:
        lo, hi = _bounds(config, sig, "use_exponential_sigmas", True)
        return np.exp(np.linspace(math.log(hi), math.log(lo), n))
    if config.use_beta_sigmas:
        import scipy.stats  # only this option needs scipy (diffusers requires it there too)
        lo, hi = _bounds(config, sig, "use_beta_sigmas")
        return lo + scipy.stats.beta.ppf(1.0 - ramp, 0.6, 0.6) * (hi - lo)
    return sig


class FlowForwardProcess:
    """``scale_noise``/``add_noise`` of the flow-matching drop-ins, on the sigma of each timestep of their schedule
    (``_timestep_sigmas()``, one per entry of ``timesteps``)."""

    def _timestep_sigmas(self) -> list:
        raise NotImplementedError

    def _noise_sigma(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """Per-sample sigma (float64, shaped to broadcast against ``sample``, on its device), chosen as diffusers
        chooses it: after ``set_begin_index`` the current call's; otherwise each timestep's position in the schedule
        (the second one where it occurs twice). A timestep outside the schedule, where diffusers raises, gets
        ``t / num_train_timesteps``. The matching runs on the device: no synchronisation."""
        dev = sample.device
        t = torch.as_tensor(timestep).to(dev).reshape(-1)
        view = (-1,) + (1,) * (sample.dim() - 1)
        if self._begin_index is not None:
            k = self._step_index if self._step_index is not None else self._begin_index
            return torch.full(t.shape, self._timestep_sigmas()[k], dtype=torch.float64, device=dev).view(view)
        t = t.to(torch.float64)
        schedule = self._host_timesteps if self._host_timesteps is not None else self.timesteps.tolist()
        return match_schedule(t, schedule, self._timestep_sigmas(), t / self.config.num_train_timesteps).view(view)

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor = None) -> torch.Tensor:
        """Forward process ``sigma*noise + (1 - sigma)*sample`` at ``timestep`` ((B,), (1,) or a number; sigma
        picked as diffusers picks it, see :meth:`_noise_sigma`), in ``sample``'s dtype."""
        if noise is None:
            raise ValueError(f"{type(self).__name__}: scale_noise: noise: required (a tensor shaped like sample)")
        sigma = self._noise_sigma(sample, timestep).to(sample.dtype)
        return sigma * noise + (1.0 - sigma) * sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """:meth:`scale_noise` under the name and argument order of the other schedulers' ``add_noise`` (diffusers'
        flow-matching classes have only ``scale_noise``)."""
        return self.scale_noise(original_samples, timesteps, noise)


class FlowMatchEulerDiscreteScheduler(FlowForwardProcess, FusedScheduler):
    """Drop-in for ``diffusers.FlowMatchEulerDiscreteScheduler``: same config keys, ``set_timesteps`` (``sigmas``,
    ``timesteps``, ``mu``), ``scale_noise``, ``set_shift``; ``step()`` is one fused op (no host sync).

    Refused at ``step()`` (each names the argument): integer timesteps (as diffusers), ``per_token_timesteps`` (a
    per-token sigma does not fit a per-step coefficient row), and ``s_churn != 0`` / ``s_noise != 1``, which
    diffusers' class silently ignores (it has no churn): a caller passing them expects an effect it would not get.
    """

    _compatibles = []  # as diffusers: this class shares no config family with the Karras schedulers
    order = 1
    _vp_state = False
    _locate_start = True  # no set_begin_index: the first step's timestep gives its index, as diffusers

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, use_dynamic_shifting: bool = False,
                 base_shift: float = 0.5, max_shift: float = 1.15, base_image_seq_len: int = 256,
                 max_image_seq_len: int = 4096, invert_sigmas: bool = False, shift_terminal: float = None,
                 use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 time_shift_type: str = "exponential", stochastic_sampling: bool = False):
        T = _positive_int("num_train_timesteps", num_train_timesteps)
        check_one_conversion(_WHO, use_karras_sigmas=use_karras_sigmas, use_exponential_sigmas=use_exponential_sigmas,
                             use_beta_sigmas=use_beta_sigmas)
        if time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"{_WHO}: time_shift_type must be 'exponential' or 'linear', got {time_shift_type!r}")
        self._check_shift("shift", shift)
        self._init_state()
        self._shift = float(shift)
        # the training schedule t/T, t = T..1 (shifted unless the shift is dynamic): diffusers' initial sigmas
        train = np.arange(T, 0, -1, dtype=np.float64) / T
        if not use_dynamic_shifting:
            train = self._shift * train / (1.0 + (self._shift - 1.0) * train)
        self.sigmas_host = train.tolist()
        self._sigma_lo, self._sigma_hi = float(train[-1]), float(train[0])  # float64 ends: the schedule's maths
        # the attributes as diffusers' (its float32 ends as Python floats)
        self.sigma_min, self.sigma_max = timestep_labels.flow_bounds(T, None if use_dynamic_shifting else self._shift)
        self._sigmas_tensor = torch.from_numpy(train).float()
        self.timesteps = self._sigmas_tensor * T

    @staticmethod
    def _check_shift(name: str, shift) -> None:
        if isinstance(shift, bool) or not isinstance(shift, (int, float, np.number)) or not 0 < shift < math.inf:
            raise ValueError(f"{_WHO}: {name} must be a finite number > 0, got {shift!r}")

    # -- schedule ---------------------------------------------------------------------------------

    @property
    def shift(self) -> float:
        """The static shift used by the next ``set_timesteps`` (the config's, or :meth:`set_shift`'s)."""
        return self._shift

    def set_shift(self, shift: float) -> None:
        """Shift for the next ``set_timesteps`` (``sigma_min``/``sigma_max`` keep the config's shift, as diffusers)."""
        self._check_shift("shift", shift)
        self._shift = float(shift)

    @property
    def sigmas(self) -> torch.Tensor:
        """float32 sigmas: the schedule plus its terminal value (0, or 1 with ``invert_sigmas``) on the
        ``set_timesteps`` device; before it, the training sigmas (CPU), as diffusers' attribute."""
        return self._sigmas_tensor

    def _schedule(self, num_inference_steps, sigmas, mu, timesteps):
        """(float64 sigmas (N+1,) as a list, float32 timesteps (N,)) as diffusers' ``set_timesteps``."""
        cfg = self.config
        T = cfg.num_train_timesteps
        if cfg.use_dynamic_shifting and mu is None:
            raise ValueError(f"{_WHO}: mu: required when use_dynamic_shifting=True (the pipeline computes it from "
                             "the image sequence length)")
        sig = None if sigmas is None else _vector("sigmas", sigmas)
        ts = None if timesteps is None else _vector("timesteps", timesteps).astype(np.float32)
        if sig is not None and ts is not None and len(sig) != len(ts):
            raise ValueError(f"{_WHO}: sigmas and timesteps must have the same length, got {len(sig)} and {len(ts)}")
        if num_inference_steps is None:
            if sig is None and ts is None:
                raise ValueError(f"{_WHO}: num_inference_steps: required when neither sigmas nor timesteps is given")
            num_inference_steps = len(sig) if sig is not None else len(ts)
        n = check_steps(_WHO, num_inference_steps)
        for name, given in (("sigmas", sig), ("timesteps", ts)):
            if given is not None and len(given) != n:
                raise ValueError(f"{_WHO}: {name} must have num_inference_steps={n} values, got {len(given)}")
        # diffusers' timesteps, bit for bit: its pipeline again from its float32-rounded inputs (its own sigma bounds,
        # or the user's sigmas or timesteps cast to float32), in its order of operations (timestep_labels). Given
        # timesteps are kept, but for invert_sigmas, where the network takes the inverted schedule's.
        if ts is None or cfg.invert_sigmas:
            lo, hi = timestep_labels.flow_bounds(T, None if cfg.use_dynamic_shifting else float(cfg.shift))
            label = sig.astype(np.float32) if sig is not None else ts / T if ts is not None else \
                np.linspace(hi * T, lo * T, n) / T
            label = self._shape(label, mu, stock=True)
            out_ts = torch.from_numpy(label).float()
            out_ts = (1.0 - out_ts if cfg.invert_sigmas else out_ts) * T
        else:
            out_ts = torch.from_numpy(ts.copy())
        if sig is None:
            base = ts.astype(np.float64) if ts is not None else np.linspace(self._sigma_hi * T, self._sigma_lo * T, n)
            sig = base / T
        sig = self._shape(sig, mu)
        if cfg.invert_sigmas:  # Mochi: the network takes the inverted schedule's timesteps too
            sig = 1.0 - sig
        return sig.tolist() + [1.0 if cfg.invert_sigmas else 0.0], out_ts

    def _shape(self, sig: np.ndarray, mu, stock: bool = False) -> np.ndarray:
        """The static or dynamic shift, the terminal stretch and the Karras/exponential/beta conversion of ``sig``,
        in its dtype (diffusers' custom sigmas are float32). ``stock``: the dynamic shift in diffusers' form
        ``k/(k + 1/t - 1)`` (diffkern's own, ``k*t/(k*t + 1 - t)``, has no division by t = 0)."""
        cfg = self.config
        if cfg.use_dynamic_shifting:
            sig = (stock_time_shift if stock else time_shift)(cfg.time_shift_type, finite_mu(_WHO, mu), sig)
        else:
            sig = self._shift * sig / (1.0 + (self._shift - 1.0) * sig)
        if cfg.shift_terminal:  # stretch 1 - sigma so that the last sigma becomes shift_terminal
            one_minus, last = 1.0 - sig, 1.0 - sig[-1]
            if last != 0 and stock:  # diffusers' order of operations
                sig = 1.0 - one_minus / (last / (1.0 - cfg.shift_terminal))
            elif last != 0:
                sig = 1.0 - one_minus * ((1.0 - cfg.shift_terminal) / last)
            elif (one_minus == 0).all():  # every sigma is the last one (1): the stretch's limit, shift_terminal
                sig = np.full_like(sig, float(cfg.shift_terminal))
            else:
                raise ValueError(f"{_WHO}: shift_terminal={cfg.shift_terminal!r} cannot stretch a schedule that ends "
                                 f"at sigma 1 from below ({sig.tolist()}): the stretch is infinite")
        sig = convert_sigmas(cfg, sig)
        if not np.isfinite(sig).all():
            raise ValueError(f"{_WHO}: the configuration gives non-finite sigmas {sig.tolist()} (shift={self._shift}, "
                             f"mu={mu!r}, shift_terminal={cfg.shift_terminal!r})")
        return sig

    def set_timesteps(self, num_inference_steps: int = None, device=None, sigmas=None, mu: float = None,
                      timesteps=None) -> None:
        """The schedule as diffusers': ``num_inference_steps`` evenly spaced sigmas from sigma_max to sigma_min, or
        custom ``sigmas`` / ``timesteps`` lists (either gives the step count); then the static shift, or the
        dynamic one with ``mu`` (``use_dynamic_shifting``), the terminal stretch, the Karras/exponential/beta
        conversion and the inversion the config asks for."""
        self.sigmas_host, ts = self._schedule(num_inference_steps, sigmas, mu, timesteps)
        self._set_schedule(ts, device, len(ts))
        sig = torch.tensor(self.sigmas_host, dtype=torch.float32)
        self._sigmas_tensor = sig.to(device) if device is not None else sig
        self._warm(device, ("flow",))

    def _build(self, key):
        sig = self.sigmas_host
        if self.config.stochastic_sampling:
            rows = [coefs.row(p=1.0, q=-s, b=1.0 - sn, s=sn) for s, sn in zip(sig[:-1], sig[1:])]
        else:
            rows = [coefs.row(a=1.0, g=sn - s, p=0.0, q=1.0) for s, sn in zip(sig[:-1], sig[1:])]
        return coefs.table(rows), None

    # -- step ---------------------------------------------------------------------------------------

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             per_token_timesteps=None, return_dict: bool = True):
        """One flow-matching Euler step; returns ``(prev_sample,)`` (or diffusers' output class) in
        ``model_output``'s dtype, computed in float32 at least (float64 when either input is float64)."""
        if per_token_timesteps is not None:
            raise ValueError(f"{_WHO}: per_token_timesteps is not supported by diffkern's fused scheduler (one sigma "
                             "per step); use diffusers' own scheduler for it")
        if s_churn != 0:
            raise ValueError(f"{_WHO}: s_churn={s_churn!r}: expected 0 (diffusers' flow-matching Euler has no churn "
                             "and ignores it)")
        if s_noise != 1:
            raise ValueError(f"{_WHO}: s_noise={s_noise!r}: expected 1 (diffusers' flow-matching Euler ignores it)")
        if isinstance(timestep, (int, np.integer)) or (isinstance(timestep, torch.Tensor)
                                                       and not timestep.dtype.is_floating_point):
            raise ValueError(f"{_WHO}: timestep: expected one of scheduler.timesteps (a float), got an integer "
                             f"{timestep!r} (an index from enumerate(timesteps)?)")
        i = self._index(timestep)
        check_step_args(model_output, sample)
        drawn = self.config.stochastic_sampling and generator is not None
        x = sample
        if sample.dtype != model_output.dtype or drawn:
            # diffusers computes in float32 from the sample's own values (and float32 noise): upcast, never round
            # the sample to a 16-bit model dtype first
            work = torch.promote_types(torch.promote_types(sample.dtype, model_output.dtype), torch.float32)
            x = sample.to(work)
        noise = self._draw(generator, model_output, x, torch.float32) if self.config.stochastic_sampling else None
        prev, _ = self._fused(("flow",), i, x, model_output, noise=noise, x0=False)
        self._advance()
        prev = prev.to(model_output.dtype)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def _timestep_sigmas(self) -> list:
        return self.sigmas_host
