"""The loop every k-diffusion-style sampler of :mod:`diffkern.samplers` runs: seeds, trajectories, the model call
and the fused update over a :class:`diffkern.coef_tables.Plan` (also captured whole by :mod:`diffkern.graphs`)."""
from __future__ import annotations

import numbers
import warnings
from collections.abc import Mapping

import torch

from . import coef_tables, sampler_compat, schedules
from .ops._checks import _overlap, same_view
from .ops.sampler_step_fast import LoopStep
from .sampler_window import check_window, windowed  # (moved there; importable from here as before)

#----------------------------------------------------------------------------
# Seeds and trajectories: the only places a call creates device state besides the state itself.

_U64 = 2 ** 64


def seed_value(seed, batch: int):
    """A validated seed: a Python int in [-2**63, 2**63) (the int64 value) or an int64 tensor (1,)/(batch,).

    ``seed``: None (drawn from torch's global CPU generator), an int (Python or numpy) in [-2**63, 2**64)
    (values >= 2**63 are their two's-complement int64), or an int64 tensor of shape (), (1,) or (batch,).
    """
    if seed is None:
        seed = int(torch.randint(0, 2 ** 62, (1,)).item())  # host generator: no device sync
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64:
            raise TypeError(f"seed: expected an int or an int64 tensor, got a tensor of dtype {seed.dtype}")
        if seed.is_meta:  # a meta tensor has no values, so no noise stream to key
            raise ValueError("seed: expected an int or an int64 tensor with values, got a tensor on the meta device")
        if seed.dim() == 0:  # torch.tensor(7): one stream, as the int 7
            seed = seed.reshape(1)
        if seed.dim() != 1 or seed.numel() not in (1, batch):
            raise ValueError(f"seed: expected shape (1,) or ({batch},) (one seed per sample), got {tuple(seed.shape)}")
        return seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):  # Integral: numpy ints too
        raise TypeError(f"seed: expected an int or an int64 tensor, got {type(seed).__name__}")
    seed = int(seed)
    check_seed_range(seed)
    return seed - _U64 if seed >= 2 ** 63 else seed


def check_seed_range(seed: int, name: str = "seed") -> None:
    """Raise ValueError naming ``name`` unless the int ``seed`` is in [-2**63, 2**64): the int64 values and their
    unsigned reading, the range of torch's generators and of the 64-bit Philox key."""
    if not -2 ** 63 <= seed < _U64:
        raise ValueError(f"{name}: expected an int in [-2**63, 2**64), got {seed}")


def make_seed(seed, x: torch.Tensor) -> torch.Tensor:
    """The int64 seed tensor of one sampling call, on x's device (see :func:`seed_value` for ``seed``)."""
    seed = seed_value(seed, x.shape[0])
    if isinstance(seed, torch.Tensor):
        return seed.to(x.device).contiguous()
    return torch.tensor([seed], dtype=torch.int64, device=x.device)


class Trajectory:
    """Preallocated device buffers for Chen et al.'s two trajectories of one call.

    x: (N+1, *x.shape) sampling trajectory (initial state then the state after each step);
    denoised: (N, *x.shape) denoising trajectory (the denoised estimate of each step's first model
    call). Both in x's dtype on x's device, filled with ``copy_``/kernel outputs (no host work per step).
    """

    def __init__(self, x: torch.Tensor, steps: int):
        self.x = torch.empty((steps + 1, *x.shape), dtype=x.dtype, device=x.device)
        self.denoised = torch.empty((steps, *x.shape), dtype=x.dtype, device=x.device)

    def as_dict(self) -> dict:
        return {"x": self.x, "denoised": self.denoised}

#----------------------------------------------------------------------------
# The loop shared by every sampler.


def _is_fused(model) -> bool:
    """A ``diffkern.wrappers`` model: its raw output and conversion go into the fused step."""
    return all(hasattr(model, k) for k in ("raw", "conversion", "guidance_scale"))


_warned_compiled = False


def _warn_compiled_wrapper(model) -> None:
    """Say once that ``torch.compile(wrapper)`` runs uncompiled here: the loop calls the wrapper's ``raw`` (network
    output before the conversion, which the fused step applies), and a compiled module hands attribute lookups such as
    ``raw`` to the module it wraps, so only its ``forward`` would run compiled."""
    global _warned_compiled
    if _warned_compiled or not (hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule"):
        return
    _warned_compiled = True
    warnings.warn(f"diffkern: model is torch.compile of a diffkern wrapper ({type(model._orig_mod).__name__}); the "
                  "sampler calls the wrapper's .raw network output, which runs uncompiled. Compile the network "
                  "inside the wrapper instead, e.g. wrappers.VEDenoiser(torch.compile(net))", UserWarning, stacklevel=4)


def _plain(sigma: float) -> dict:
    return {}


def conversion_rows(model):
    """``conv(sigma)`` for :mod:`diffkern.coef_tables`: the row slots converting the model output at
    ``sigma``: (p, q, w) for a fused wrapper (read from the model on every call), {} for a plain D model."""
    if not _is_fused(model):
        return _plain

    def conv(sigma: float) -> dict:
        p, q = model.conversion(sigma)
        w = model.guidance_scale
        return {"p": float(p), "q": float(q), "w": 1.0 if w is None else float(w)}
    return conv


def host_sigmas(sigmas, method: str | None = None) -> list[float]:
    """Validated host float64 copy of a schedule (read once, before any loop): decreasing, with repeated values
    (zero-length steps) only where ``method`` can take them (:func:`diffkern.sampler_compat.check_repeats`)."""
    try:
        host = schedules.check_sigmas(sigmas, "sigmas", strict=False).tolist()
    except ValueError:  # raised again worded for the method: "strictly decreasing" unless it takes repeats
        schedules.check_sigmas(sigmas, "sigmas", strict=method not in sampler_compat.REPEATS_OK)
        raise
    sampler_compat.check_repeats(host, method)
    return host


def check_call(model, extra_args) -> None:
    """Raise TypeError naming the argument unless ``model`` is callable and ``extra_args`` is None or a dict
    of keyword arguments (checked before any work: either would otherwise fail inside the first step)."""
    if not callable(model):
        raise TypeError(f"model: expected a callable model(x, sigma, **extra_args), got {type(model).__name__}")
    if extra_args is None:
        return
    if not isinstance(extra_args, Mapping):
        raise TypeError(f"extra_args: expected a dict of keyword arguments for the model or None, "
                        f"got {type(extra_args).__name__}")
    bad = [k for k in extra_args if not isinstance(k, str)]
    if bad:
        raise TypeError(f"extra_args: keys must be str (the model's keyword names), got {bad[0]!r}")


def check_state(x, name: str = "x") -> None:
    """Raise TypeError naming ``name`` unless ``x`` is a floating tensor with a batch dimension (ValueError for
    one on the meta device: it has no values to sample from)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0:
        raise TypeError(f"{name}: expected a floating tensor of shape (B, ...)")
    if x.is_meta:
        raise ValueError(f"{name}: expected a tensor with values, got a tensor on the meta device")


def check_callback(callback) -> None:
    """Raise unless ``callback`` is None or callable (checked up front: it would otherwise fail only after the first
    step's work)."""
    if callback is not None and not callable(callback):
        raise TypeError(f"callback: expected a callable or None, got {type(callback).__name__}")


def input_version(x: torch.Tensor):
    """x's version counter before a model call (None for an inference tensor, which keeps none)."""
    return None if x.is_inference() else x._version


def tracked(make, *args, **kwargs) -> torch.Tensor:
    """``make(*args, **kwargs)`` (a state buffer: a clone, an ``empty_like``) made outside inference mode: a normal
    tensor keeps its version counter under ``torch.inference_mode`` too (ComfyUI samples in it), so
    :func:`check_input_kept` sees a model writing into the state; in-place updates of it stay allowed there."""
    with torch.inference_mode(False):
        return make(*args, **kwargs)


_KEPT_WHY = {"x": "x is the sampler's state, which the update after the call reads",
             "z": "z is the sampler's state, which the step after the call reads",
             "sigma": "sigma is a view of the loop's table of noise levels, which later steps (and graph replays) read"}


def check_input_kept(x: torch.Tensor, version, name: str = "x") -> None:
    """Raise unless the model call since :func:`input_version` left its input ``name`` (x or z, the sampler's state,
    or sigma, a view of the device table of noise levels) as it was: a model writing into either would silently corrupt
    the steps that read it next."""
    if version is not None and x._version != version:
        raise RuntimeError(f"model: modified its input {name} in place; {_KEPT_WHY[name]}: clone {name} inside the "
                           "model before writing to it")


def _check_output(t, x: torch.Tensor, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"model: {what} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"model: {what} must have a floating dtype, got {t.dtype}")
    if t.shape != x.shape:
        raise ValueError(f"model: {what} must have the shape of x {tuple(x.shape)}, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"model: {what} must be on x's device {x.device}, got {t.device}")


class _Loop:
    """State of one sampling call: working copy of x, device tables, seed, histories, outputs; ``window`` (see
    :func:`check_window`) places its steps in a longer loop, which :func:`_run` applies to the plan it runs."""

    def __init__(self, model, x, sigmas, extra_args, callback, disable, seed, backend, trajectory, *, window=None,
                 method=None, noise_sampler=None):
        check_state(x)
        check_call(model, extra_args)
        check_callback(callback)
        self.model, self.extra = model, dict(extra_args or {})
        self.callback, self.disable, self.backend = callback, disable, backend
        self.method, self.sigmas = method, host_sigmas(sigmas, method)
        self.given = (sigmas, self.sigmas)  # the callback reports the schedule's own elements (k-diffusion's sigmas[i])
        self.window = check_window(window, len(self.sigmas) - 1)
        self.x = tracked(x.detach().clone, memory_format=torch.contiguous_format)
        self.seed = make_seed(seed, self.x)
        # noise_calls: {(step, first): (sigma, sigma_next)}, set by the sampler (sampler_compat.noise_calls)
        self.noise_sampler, self.noise_calls = sampler_compat.check_noise_sampler(noise_sampler, self.x), {}
        self.fused = _is_fused(model)
        if self.fused:
            _warn_compiled_wrapper(model)
        self.conv = conversion_rows(model)
        self.trajectory = trajectory
        # None: the callback runs at every step's first call with k-diffusion's sample_<method> dict; else the
        # sampler's own (dpm_fast: once per step of its grid, sampler_compat.DpmFastReport), its noise pairs too
        self.report = None
        if trajectory is not None and trajectory.denoised.shape[0] != len(self.sigmas) - 1:
            raise ValueError("trajectory: its buffers do not match the number of steps")
        self._checked = False

    def begin(self, plan: coef_tables.Plan, *, rewritten: bool = False) -> None:
        """Device tables, histories and the bound fused op for ``plan``. ``rewritten``: the tables will be rewritten
        in place between runs of :func:`run_steps` that replay its launches (a CUDA graph's), so no launch may
        depend on this plan's values (the reference backend then draws noise on every row)."""
        self.plan = plan
        if self.noise_sampler is not None:
            sampler_compat.check_covered(plan, self.noise_calls)
            self.noise_pairs = (self.report.noise_pairs(self.noise_calls) if self.report is not None else
                                sampler_compat.noise_sigmas(*self.given, self.noise_calls))  # as k-diffusion's; no sync
        # Not an inference tensor, even under torch.inference_mode: the bound op (LoopStep) reads its version counter
        # to notice an in-place rewrite (the front-end caches its CPU table check on it: 200 cpp euler_ancestral
        # steps, 64 2-D points: 70 ms per call re-checking against 53 ms under no_grad)
        with torch.inference_mode(False):
            self.table = plan.table.to(self.x.device, copy=True)
        # A plain model gets sigma in its input's precision (float32 at least) so nets see one dtype; a
        # wrapper gets float64 so its sigma -> timestep lookup is exact at the schedule's table values.
        sig_dtype = torch.float64 if self.fused else torch.promote_types(self.x.dtype, torch.float32)
        self.sig_dev = torch.tensor(plan.row_sigma, dtype=torch.float64).to(self.x.device, sig_dtype)
        self.histories = [torch.zeros_like(self.x) for _ in range(plan.history)]
        # the fused op bound to these buffers: validated (and its backend resolved) once, not at every step
        x0_buffer = None if self.trajectory is None else self.trajectory.denoised
        self.op = LoopStep(self.x, self.table, None if rewritten else plan.table, self.seed, histories=self.histories,
                           x0_buffer=x0_buffer, backend=self.backend)
        if self.callback is not None and self.report is None:
            self.callback_sigmas = sampler_compat.callback_sigmas(*self.given, plan.sigma_hat)

    def start(self) -> None:
        if self.trajectory is not None:
            self.trajectory.x[0].copy_(self.x)

    def steps(self):
        from tqdm.auto import trange
        return trange(self.plan.steps, disable=self.disable)

    def _model(self, row: int):
        """One model call at row's sigma: (model_out, model_out_uncond or None), checked on the first call."""
        sigma = self.sig_dev[row].expand(self.x.shape[0])
        version, sigma_version = input_version(self.x), input_version(self.sig_dev)
        if self.fused:
            out = self.model.raw(self.x, sigma, **self.extra)
            m, u = out if isinstance(out, tuple) else (out, None)
        else:
            m, u = self.model(self.x, sigma, **self.extra), None
        check_input_kept(self.x, version)
        check_input_kept(self.sig_dev, sigma_version, "sigma")
        # an output that is a view of x other than x itself (x.T, a broadcast slice) would be overwritten while the
        # in-place update reads it; its own copy is what k-diffusion's out-of-place update reads
        m, u = (t.clone() if isinstance(t, torch.Tensor) and _overlap(t, self.x) and not same_view(t, self.x) else t
                for t in (m, u))
        if not self._checked:
            _check_output(m, self.x, "output")
            if u is not None:
                _check_output(u, self.x, "unconditional output")
                if u.dtype != m.dtype:
                    raise TypeError(f"model: unconditional output dtype {u.dtype} != conditional {m.dtype}")
            self._checked = True
        return m, u

    def churn(self, i: int) -> None:
        """x += s_noise*sqrt(sigma_hat^2 - sigma^2)*xi (a noise-only row; the model output is not read)."""
        if self.plan.churn[i]:
            row = self.plan.churn_row + i
            self.op.launch(self.x, self.x, row, out=self.x)

    def step(self, i: int, row: int, *, first: bool = True, write_history: bool = False) -> None:
        """One model call and one fused update of x (in place; ping-pong when a callback wants the old x)."""
        m, u = self._model(row)
        report = first and self.callback is not None and (self.report is None or self.report.wants(i))
        x0 = None
        if first and self.trajectory is not None:
            x0 = self.trajectory.denoised[i]
        elif report:
            x0 = torch.empty_like(self.x)
        # with a callback, a fresh state each step: the tensors it got are the caller's to keep (as k-diffusion's)
        out = tracked(torch.empty_like, self.x) if report else self.x
        # a corrector reads the value its step's first call just wrote as H (coef_tables.history_slots)
        h, h2, h3, h_out = coef_tables.history_slots(self.histories, i if first else i + 1)
        h_out = h_out if write_history else None
        pair = self.noise_pairs.get((i, first)) if self.noise_sampler is not None else None
        noise = None if pair is None else sampler_compat.draw(self.noise_sampler, pair, self.x)
        self.op.step(self.x, m, row, model_out_uncond=u, history=h, history2=h2, history3=h3, history_out=h_out,
                     noise=noise, out=out, x0_out=x0)
        if report:
            if self.report is not None:
                self.callback(self.report.info(i, self.x, x0))
            else:  # sigma, sigma_hat: 0-d tensors, as k-diffusion's sigmas[i] (sampler_compat.callback_sigmas; no sync)
                sigma, sigma_hat = self.callback_sigmas(i)
                self.callback({"x": self.x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": x0})
            self.x = out

    def end(self, i: int) -> None:
        if self.trajectory is not None:
            self.trajectory.x[i + 1].copy_(self.x)


def _run(loop: _Loop, plan: coef_tables.Plan) -> torch.Tensor:
    """Every sampler's call: ``plan`` on the loop's window (:func:`windowed`), device tables and buffers, then the
    loop."""
    if loop.window is not None:  # None: the plan as given (a caller may have laid it out as a window itself)
        plan = windowed(plan, loop.window)
    loop.begin(plan)
    run_steps(loop, plan)
    return loop.x


def run_noisy(loop: _Loop, plan: coef_tables.Plan, eta: float = 1.0) -> torch.Tensor:
    """:func:`_run`, with the loop's ``noise_sampler`` (if any) called where k-diffusion calls it
    (:func:`sampler_compat.noise_calls`; ``eta`` the method's, which decides where it draws)."""
    if loop.noise_sampler is not None:
        loop.noise_calls = sampler_compat.noise_calls(loop.method, loop.sigmas, plan, eta)
    return _run(loop, plan)


def run_steps(loop: _Loop, plan: coef_tables.Plan) -> None:
    """Every sampler's loop: churn, first call and update, optional Heun corrector. It only launches work
    on buffers :meth:`_Loop.begin` allocated, so :mod:`diffkern.graphs` captures exactly this function."""
    loop.start()
    for i in loop.steps():
        loop.churn(i)
        loop.step(i, plan.step_row + i, write_history=plan.history > 0)
        if plan.corrector[i]:
            loop.step(i, plan.corrector_row + i, first=False)
        loop.end(i)
