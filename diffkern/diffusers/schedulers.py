"""Base of the diffusers-compatible schedulers whose ``step()`` is one fused :func:`diffkern.ops.sampler_step`.

Every scheduler here is a ``SchedulerMixin + ConfigMixin`` that loads from any diffusers scheduler config
(``X.from_config(pipe.scheduler.config)``) and survives ``save_pretrained``/``from_pretrained``. How a step runs:

- ``set_timesteps`` resolves the schedule on the host in float64 (training table from
  :mod:`diffkern.schedules`, rows from :mod:`diffkern.coef_tables` / :mod:`diffkern.ops.ddim`); the
  coefficient table is built once per set of ``step()`` knobs (eta, churn, ...) and moved to the device once.
- ``step()`` keeps a host-side step index (``set_begin_index`` sets where it starts) and launches one fused
  op on row ``index``. It never reads a device value: the device timestep ``t`` is only compared with the
  expected one when it lives on the host (a Python number or a CPU tensor), to catch out-of-order calls.
- noise: with a torch ``generator`` it is drawn exactly as diffusers draws it (``randn_tensor``, same shape,
  dtype and call sites, so the generator advances identically) and passed as ``noise=``; without one it is
  diffkern's counter-based Philox stream keyed by :meth:`FusedScheduler.set_seed` (default: a seed drawn from
  torch's global CPU generator at the first noisy step after ``set_timesteps``).

Training tables are float64 (diffusers holds them in float32), so our per-step coefficients are at least as
accurate as diffusers'; tests compare both against diffusers' own algorithm run in float64.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Optional

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .. import schedules
from ..ops import coefs, sampler_step
from ..ops.sampler_step_fast import LoopStep
from ..samplers import make_seed
from .config_checks import training_betas
from .scheduler_history import HistoryBuffers
from .scheduler_lookup import TimestepLookup, check_step_args, check_timestep
from .scheduler_utils import (_python_scalar, _python_scalars, _rounded, host_value, match_schedule,  # noqa: F401
                              sigma_to_t, ve_row_to_vp)

_INIT_KEYS: dict = {}  # scheduler class -> the names its __init__ takes (FusedScheduler._option)

# Any diffusers scheduler config loads silently (keys of these classes that we do not take are dropped).
COMPATIBLES = [e.name for e in KarrasDiffusionSchedulers]


@dataclasses.dataclass
class FusedSchedulerOutput(BaseOutput):
    """``prev_sample`` (the state for the next step) and ``pred_original_sample`` (the x0 estimate), both (B, ...)."""

    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None


class FusedScheduler(TimestepLookup, HistoryBuffers, SchedulerMixin, ConfigMixin):
    """Shared machinery: training table, host step index, cached device tables, noise, fused launch.

    Attributes:
        backend: the fused-op backend for ``step()`` (None: ``DIFFKERN_BACKEND``, then auto). Not part of
            the config, so it is not saved.
        timesteps: the schedule (device tensor), as the diffusers scheduler of the same name makes it.
    """

    _compatibles = COMPATIBLES
    order = 1
    _vp_state = True  # the sample is the VP state z (DDIM/DDPM/DPM) rather than the VE state x
    # alpha-bar at t = T-1 with rescale_betas_zero_snr: diffusers' Euler and DPM-Solver floor it at 2**-24 (a finite
    # largest sigma, ~4096); DDIM and DDPM keep 0 (None)
    _zero_snr_floor = 2.0 ** -24
    _locate_start = False  # see _locate
    # Before set_timesteps, as the diffusers class of the same name: the dtype of the training timesteps T-1, ..., 0
    # (None: no timesteps, PNDM), and whether ``sigmas`` is the training table's VE sigmas, increasing (the
    # DPM-Solver family)
    _train_timesteps_dtype = torch.int64
    _train_sigmas_before = False

    def __init_subclass__(cls, **kwargs):
        # NumPy scalars (np.int64 from np.arange or a sweep, np.float32 from a config parsed by numpy) reach every
        # scheduler's __init__ (hence its config, which stays JSON-serialisable), set_timesteps and set_begin_index
        # as the equal Python scalars: the checks and the float64 tables see exactly what a Python caller passes (the
        # same results bit for bit), and np.bool_ is a bool (refused where a bool is). step() is left as it is (its
        # knobs take numbers.Real and are read with float(); callers introspect its code for a generator argument)
        super().__init_subclass__(**kwargs)
        for name in ("__init__", "set_timesteps", "set_begin_index"):
            if name in cls.__dict__:
                setattr(cls, name, _python_scalars(cls.__dict__[name]))

    def _init_training(self, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                       rescale_betas_zero_snr=False) -> None:
        who = type(self).__name__
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
            raise ValueError(f"{who}: num_train_timesteps must be an int >= 2, got {num_train_timesteps!r}")
        betas = training_betas(who, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                               rescale_betas_zero_snr)
        if rescale_betas_zero_snr:  # the last beta is 1: alpha-bar ends at 0
            self.alphas_cumprod = torch.cumprod(1.0 - betas, 0)
            if self._zero_snr_floor is not None:
                self.alphas_cumprod[-1] = self._zero_snr_floor
        else:
            self.alphas_cumprod = schedules.alphas_cumprod(betas)  # float64 CPU, (T,)
        # float32 as diffusers' (pipelines read them); every coefficient comes from the float64 alphas_cumprod
        self.betas = betas.float()
        self.alphas = (1.0 - betas).float()
        self.train_sigmas = schedules.alpha_bar_to_sigma(self.alphas_cumprod)  # VE sigma(t), increasing
        dtype = self._train_timesteps_dtype
        self.timesteps = None if dtype is None else torch.arange(num_train_timesteps - 1, -1, -1, dtype=dtype)
        self._init_state()

    def _init_state(self) -> None:
        self.num_inference_steps = None
        self.backend = None
        self._seed = None
        self._host_timesteps = None
        self._step_index = None
        self._begin_index = None
        self._reset_loop()

    def _reset_loop(self) -> None:
        self._built = {}  # key -> (host float64 table, meta)
        self._device_tables = {}
        self._seed_tensors = {}
        self._steps = {}  # (key, x's device, dtype and shape, seeded, backend) -> LoopStep (see _fused)
        self._history = None

    def __getstate__(self) -> dict:
        """Pickle and deepcopy leave out the bound steps (a LoopStep holds its launch, a compiled op that does not
        pickle); the copy binds its own at its next step(), on the same tables and seed."""
        state = dict(self.__dict__)
        state["_steps"] = {}
        return state

    # -- step index -------------------------------------------------------------------------------

    @property
    def step_index(self) -> Optional[int]:
        """Index of the next ``step()`` call into ``timesteps`` (None before the first call)."""
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        """Index the first ``step()`` starts from (``set_begin_index``); None means 0."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the next loop at ``timesteps[begin_index]`` (image-to-image pipelines call this)."""
        begin_index = _python_scalar(begin_index)  # numpy ints too (subclasses' overrides convert them already)
        if isinstance(begin_index, bool) or not isinstance(begin_index, int) or begin_index < 0:
            raise ValueError(f"begin_index: expected an int >= 0, got {begin_index!r}")
        self._begin_index = begin_index

    def set_seed(self, seed) -> None:
        """Key of the Philox noise used when ``step()`` gets no generator: an int, an int64 tensor (1,)/(B,),
        or None (a fresh seed from torch's global CPU generator after each ``set_timesteps``)."""
        self._seed = seed
        self._seed_tensors = {}
        self._steps = {}

    def _set_schedule(self, timesteps: torch.Tensor, device, num_inference_steps: int) -> None:
        """Install a new schedule (host timesteps list and device tensor) and forget the previous loop."""
        self.num_inference_steps = num_inference_steps
        self._host_timesteps = timesteps.tolist()
        self.timesteps = timesteps.to(device) if device is not None else timesteps
        self._step_index = None
        self._begin_index = None
        self._reset_loop()

    def _warm(self, device, *keys) -> None:
        """Upload the tables of ``keys`` (the knobs pipelines pass) and, if they draw noise, the Philox seed to
        ``device`` now, so that the loop's steps copy nothing from the host (a host-to-device copy waits for the
        device). Deterministic schedules draw no seed: torch's global generator is left alone for the pipeline."""
        if device is None:
            return
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        noisy = False
        for key in keys:
            self._device_table(key, device)
            noisy = noisy or bool((self._plan(key)[0][:, coefs.S] != 0).any())
        if noisy and not isinstance(self._seed, torch.Tensor):
            self._seed_tensors[device] = make_seed(self._seed, torch.empty(1, device=device))

    def _index(self, timestep) -> int:
        """The current step index (initialised from ``begin_index``), checked against a host ``timestep``."""
        who = type(self).__name__
        check_timestep(timestep)
        if self._host_timesteps is None:
            raise ValueError(f"{who}: call set_timesteps(num_inference_steps) before scale_model_input/step")
        if self._step_index is None:
            self._step_index = self._loop_start = self._begin_index if self._begin_index is not None \
                else self._locate(timestep)
        i = self._step_index
        n = len(self._host_timesteps)
        if i >= n:
            raise IndexError(f"{who}: step index {i} is past the end of the schedule ({n} timesteps); "
                             "call set_timesteps again to start a new loop")
        got = host_value(timestep)
        if got is not None and got != self._host_timesteps[i] and not _rounded(timestep, self._host_timesteps[i], got):
            raise ValueError(f"timestep: expected {self._host_timesteps[i]:g} (timesteps[{i}], the next step of the "
                             f"schedule), got {got:g}; steps must follow scheduler.timesteps in order "
                             "(set_begin_index(k) starts a loop at timesteps[k])")
        return i

    def _locate(self, timestep) -> int:
        """Index of a loop's first step when no begin index is set: 0, or (``_locate_start``: the classes whose
        diffusers counterpart runs ``index_for_timestep``, so that pipelines that never call ``set_begin_index`` can
        start mid-schedule) the position of ``timestep`` in the schedule, the second of two equal ones, as diffusers.
        Found on the host: from the value of a host timestep, or from the storage offset of a device timestep that is
        a view into ``self.timesteps`` (a pipeline iterating a slice of it). Any other device timestep gives 0, as
        before: reading its value would synchronise. A value not in the schedule gives 0 (the check then raises)."""
        host = self._host_timesteps
        value = host_value(timestep) if self._locate_start else None
        ts = self.timesteps
        if self._locate_start and value is None and isinstance(timestep, torch.Tensor) and timestep.numel() == 1 \
                and timestep.device == ts.device and timestep.dtype == ts.dtype and ts.dim() == 1 \
                and timestep.device.type != "meta" \
                and timestep.untyped_storage().data_ptr() == ts.untyped_storage().data_ptr():
            pos, rem = divmod(timestep.storage_offset() - ts.storage_offset(), ts.stride(0) or 1)
            value = host[pos] if rem == 0 and 0 <= pos < len(host) else None
        hits = [k for k, v in enumerate(host) if v == value] if value is not None else []
        return hits[1] if len(hits) > 1 else hits[0] if hits else 0

    def _advance(self) -> None:
        self._step_index += 1

    # -- tables, noise, launch --------------------------------------------------------------------

    def _build(self, key):
        """(host float64 table, meta) for the knobs ``key``; defined by each scheduler."""
        raise NotImplementedError

    def _plan(self, key):
        """Host table and meta for ``key`` (built once per schedule)."""
        if key not in self._built:
            self._built[key] = self._build(key)
        return self._built[key]

    def _device_table(self, key, device) -> torch.Tensor:
        dev = self._device_tables.get((key, device))
        if dev is None:
            # A copy that is not an inference tensor, even when built under torch.inference_mode (on the CPU .to would
            # return the host table itself, an inference tensor if built there): the fused op's CPU table check is
            # then cached on its version counter, not re-run at every step() (as sampler_loop._Loop.begin)
            with torch.inference_mode(False):
                dev = self._device_tables[(key, device)] = self._plan(key)[0].to(device, copy=True)
        return dev

    def _seed_for(self, x: torch.Tensor) -> torch.Tensor:
        t = self._seed_tensors.get(x.device)
        if t is None:
            t = self._seed_tensors[x.device] = make_seed(self._seed, x)
        return t

    @staticmethod
    def _draw(generator, model_output: torch.Tensor, x: torch.Tensor, dtype: torch.dtype = None):
        """diffusers' noise for one step (``randn_tensor`` with model_output's shape and device, in ``dtype``,
        default model_output's: DPM-Solver draws float32) in x's dtype, or None without a generator (the fused op
        then draws Philox noise)."""
        if generator is None:
            return None
        noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                             dtype=dtype or model_output.dtype)
        return noise if noise.dtype == x.dtype else noise.to(x.dtype)

    def _check_grad(self, *tensors: torch.Tensor, stacklevel: int = 4) -> None:
        """Warn, once per scheduler, where autograd would record through ``step()``: the fused op has no backward, so
        its output is detached where diffusers' step is differentiable (guidance or fine-tuning through the loop
        would silently get no gradient from it). Not an error: a loop that only forgot ``torch.no_grad()`` works.
        ``stacklevel`` names the caller of ``step()`` (4: called from :meth:`_fused`)."""
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors) \
                and not self.__dict__.get("_warned_grad", False):
            self._warned_grad = True
            warnings.warn(f"{type(self).__name__}.step: model_output/sample require grad, but diffkern's fused step "
                          "is not differentiable: its outputs are detached (no gradient reaches model_output or "
                          "sample). Run the loop under torch.no_grad(), or use diffusers' own scheduler to "
                          "backpropagate through step()", UserWarning, stacklevel=stacklevel)

    def _fused(self, key, row: int, x, model_output, *, noise=None, history=None, history2=None, history3=None,
               history_out=None, x0=True):
        """One fused step on ``row`` of the table for ``key``; returns (out, x0_out or None)."""
        self._check_grad(x, model_output)
        if x.device.type not in ("cpu", "cuda") or torch.compiler.is_compiling():  # no addresses to compare
            table = self._device_table(key, x.device)
            noisy = float(self._plan(key)[0][row, coefs.S]) != 0.0  # host table: no device read
            seed = self._seed_for(x) if noisy and noise is None else None
            x0_out = torch.empty_like(x, memory_format=torch.contiguous_format) if x0 else None
            out = sampler_step(x, model_output, table, row, history=history, history2=history2, history3=history3,
                               history_out=history_out, noise=noise if noisy else None, seed=seed, x0_out=x0_out,
                               backend=self.backend)
            return out, x0_out
        # The table, seed and backend are the scheduler's own and out/x0_out are new: they are checked once, when a
        # LoopStep is bound (per key, x's device, dtype and shape, until set_timesteps/set_seed), and each call checks
        # only the caller's tensors (LoopStep.fresh, falling back to the checked front-end). Measured ((1, 4, 16, 16)
        # float32, cpp, torch on one thread, shared 2-core CPU, interleaved medians): this call ~33 -> ~11 us (Euler,
        # DDIM; Heun's predictor 37 -> 14 us); a 50-step loop of scale_model_input + step, Euler 90 -> 53, DDIM
        # 75 -> 47, Heun (99 calls, its tables built at the first) 219 -> 110 us per step.
        step = self._bound(key, x, False)
        noisy = step.draws(row)  # from the host table: no device read
        if noisy and noise is None:
            step = self._bound(key, x, True)
        return step.fresh(x, model_output, row, noise=noise if noisy else None, history=history, history2=history2,
                          history3=history3, history_out=history_out, x0=x0)

    def _bound(self, key, x: torch.Tensor, seeded: bool) -> LoopStep:
        """The fused step on ``key``'s table for x's device, dtype and shape, with the Philox seed (``seeded``; drawn
        here at the first noisy step without explicit noise, as before) or zeros (a row without noise reads none)."""
        ck = (key, x.device, x.dtype, x.shape, seeded, self.backend, os.environ.get("DIFFKERN_BACKEND"))
        step = self._steps.get(ck)
        if step is None:
            seed = self._seed_for(x) if seeded else torch.zeros(1, dtype=torch.int64, device=x.device)
            # bound on a template of x (the caller's x may be any layout, and LoopStep takes its x as the loop's own)
            step = self._steps[ck] = LoopStep(torch.empty_like(x, memory_format=torch.contiguous_format),
                                              self._device_table(key, x.device), self._plan(key)[0], seed,
                                              backend=self.backend, stacklevel=4)
        return step

    def _state_in(self, sample: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        """The sample in the dtype diffusers returns (promotion for VP schedulers, model_output's dtype for the
        k-diffusion family, which computes in float32 and casts back), after checking both step() inputs."""
        check_step_args(model_output, sample)
        dtype = torch.promote_types(sample.dtype, model_output.dtype) if self._vp_state else model_output.dtype
        return sample if sample.dtype == dtype else sample.to(dtype)

    @staticmethod
    def _output(return_dict: bool, prev, x0):
        if not return_dict:
            return (prev, x0)
        return FusedSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    @staticmethod
    def _output_prev_only(return_dict: bool, prev):
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    # -- diffusers API defaults -------------------------------------------------------------------

    def _option(self, name: str, default):
        """Config value of ``name`` if this class takes it, else ``default``. ``from_config`` also keeps keys that
        only a compatible class takes (Heun's ``clip_sample`` in an Euler config, Euler's ``use_karras_sigmas`` in
        an Euler-ancestral one); diffusers' class ignores them, and so must we."""
        keys = _INIT_KEYS.get(type(self))
        if keys is None:  # diffusers' _get_init_keys runs inspect.signature: ~130 us, once per row built
            keys = _INIT_KEYS[type(self)] = frozenset(self._get_init_keys(type(self)))
        return self.config.get(name, default) if name in keys else default

    def _sigma_at(self, i: int) -> float:
        """VE sigma of ``timesteps[i]``."""
        return self.sigmas_host[i]

    @property
    def sigmas(self) -> torch.Tensor:
        """The VE sigmas of ``timesteps`` plus the final one (float32, CPU), as diffusers' Euler/Heun/DPM-Solver
        ``sigmas`` (Heun: interleaved like its timesteps). Schedulers without VE sigmas (DDIM, DDPM, IADB) have
        none, like diffusers' classes."""
        host = self.__dict__.get("sigmas_host")
        if host is None and self._train_sigmas_before:
            return self.train_sigmas.float()
        if host is None:  # (GE before set_timesteps) AttributeError: ConfigMixin.__getattr__ words the message
            raise AttributeError("sigmas")
        if self._host_timesteps is None:
            return torch.tensor(host, dtype=torch.float32)
        n = len(self._host_timesteps)
        return torch.tensor([self._sigma_at(k) for k in range(n)] + [host[-1]], dtype=torch.float32)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """``original_samples + sigma*noise`` (VE state; ``sigma`` as :meth:`_noise_sigma` picks it), as
        diffusers' Euler/Heun ``add_noise``; ``timesteps`` (B,), (1,) or a number."""
        sigma = self._noise_sigma(original_samples, timesteps).to(original_samples.dtype)
        return original_samples + noise * sigma

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Identity (the network takes the sample as it is)."""
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps
