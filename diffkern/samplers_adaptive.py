"""k-diffusion's adaptive DPM-Solver (``sample_dpm_adaptive``: DPM-Solver-12 and DPM-Solver-23 with a PID step-size
controller) on the fused step.

Each attempted step is an embedded pair of solutions from shared model calls (:mod:`diffkern.coef_tables_dpm_adaptive`):
its rows are built on the host in float64 from the attempt's sigmas and run as fused launches, then the scaled error
``||(x_low - x_high)/max(atol, rtol*max(|x_low|, |x_low_prev|))||_2/sqrt(numel)`` (over the whole batch, as
k-diffusion's) is read on the host, and the controller accepts or rejects the attempt and proposes the next step.
That read is a host synchronisation per attempt, inherent in the method: it runs eagerly only (``graph=True``
refuses it) and keeps no trajectory (its number of steps is decided as it runs).

Noise (eta > 0): accepted step k adds ``s_noise*su*xi`` with xi the Philox stream of ``seed`` at step counter k
(:func:`diffkern.ops.randn`), or k-diffusion's ``noise_sampler(sigma(s), sigma(t))``, which, as k-diffusion's, is
called on every accepted step (eta = 0 too, where its draw is multiplied by 0).

The sigmas handed to the callback (``sigma``, ``sigma_hat``, ``t``, ``t_up``) and to the noise_sampler are 0-d tensors
as k-diffusion's: its s and t are tensors made by ``torch.tensor(sigma_max)`` (a number: the default dtype on the CPU;
a tensor: its dtype, or the default dtype for an integer one, on its device), then ``torch.minimum(t_end, s + h)``
from the first accepted step on (both limits' dtypes promoted, on a non-CPU device where either is)
(:func:`report_specs`). Their values are diffkern's float64 ones rounded once to that dtype; they travel to the device
with the attempt's model-call sigmas, in the one host-to-device copy an attempt makes anyway.
"""
from __future__ import annotations

import inspect
import math

import torch

from . import coef_tables_dpm_adaptive as cda
from . import sampler_compat, schedules
from .ops import coefs, randn, sampler_step
from .sampler_loop import _check_output, _Loop, check_input_kept, host_sigmas, input_version, tracked
from .sampler_plans import _knob

EAGER_ONLY = frozenset({"dpm_adaptive"})
"""Methods of :func:`diffkern.sample` whose steps are decided on the host as they run: no CUDA graph."""


def check_graph(graph, method: str):
    """``graph`` for ``method``: as given unless the method is in :data:`EAGER_ONLY`, where True raises (naming
    graph) and "auto" says once that it runs eagerly and returns False."""
    if method not in EAGER_ONLY or graph is False:
        return graph
    why = (f"{method} accepts or rejects each step from an error norm read on the host, so its loop cannot be "
           "captured as a CUDA graph")
    if graph is True:
        raise ValueError(f"graph: {why} (graph=True); use graph=False")
    if graph != "auto":
        raise ValueError(f"graph: expected False, True or 'auto', got {graph!r}")
    from . import graphs  # here: graphs imports samplers, which imports this module

    graphs.warn_once(f"graph='auto' runs eager: {why}", stacklevel=4)
    return False


def _call(loop: _Loop, state: torch.Tensor, sigma_dev: torch.Tensor):
    """One model call on ``state`` at the device scalar ``sigma_dev``: (model_out, model_out_uncond or None)."""
    sigma = sigma_dev.expand(state.shape[0])
    version, sigma_version = input_version(state), input_version(sigma_dev)
    if loop.fused:
        out = loop.model.raw(state, sigma, **loop.extra)
        m, u = out if isinstance(out, tuple) else (out, None)
    else:
        m, u = loop.model(state, sigma, **loop.extra), None
    check_input_kept(state, version)
    check_input_kept(sigma_dev, sigma_version, "sigma")
    _check_output(m, state, "output")
    if u is not None:
        _check_output(u, state, "unconditional output")
        if u.dtype != m.dtype:
            raise TypeError(f"model: unconditional output dtype {u.dtype} != conditional {m.dtype}")
    return m, u


def error_tensor(low: torch.Tensor, high: torch.Tensor, prev: torch.Tensor, atol: float,
                 rtol: float) -> torch.Tensor:
    """k-diffusion's error of an attempt, ``||(low - high)/max(atol, rtol*max(|low|, |prev|))||_2/sqrt(numel)``: a 0-d
    tensor on x's device in x's dtype promoted to float32 at least; 0 for an empty batch. k-diffusion computes it in
    x's dtype, where for a 16-bit x the quotient (atol 0.0078: a difference above ~511 overflows float16) or the norm
    before the division by sqrt(numel) (above 65504: an error of 256 on a 4x128x128 latent) overflows to inf; the
    controller here reads this finite float32 value instead (and refuses a non-finite one as a broken model), and
    the callback gets it rounded once to x's dtype, k-diffusion's dtype."""
    dtype = torch.promote_types(low.dtype, torch.float32)
    if low.numel() == 0:
        return torch.zeros((), dtype=dtype, device=low.device)
    lo, hi, pv = low.to(dtype), high.to(dtype), prev.to(dtype)
    delta = torch.clamp_min(rtol * torch.maximum(lo.abs(), pv.abs()), atol)
    return torch.linalg.vector_norm((lo - hi) / delta) / math.sqrt(low.numel())


def _spec(value) -> tuple[torch.dtype, torch.device]:
    """(dtype, device) of k-diffusion's ``t(torch.tensor(value))`` = ``-torch.tensor(value).log()``."""
    if isinstance(value, torch.Tensor):
        return (value.dtype if value.is_floating_point() else torch.get_default_dtype()), value.device
    try:  # k-diffusion's torch.tensor(value): a numpy floating scalar keeps its dtype there (np.float64: float64)
        dtype = torch.tensor(value).dtype
    except (TypeError, RuntimeError):  # a real torch cannot hold (fractions.Fraction): the default dtype
        dtype = torch.get_default_dtype()
    return (dtype if dtype.is_floating_point else torch.get_default_dtype()), torch.device("cpu")


def report_specs(sigma_min, sigma_max) -> tuple:
    """((dtype, device) of the sigmas k-diffusion's dpm_adaptive reports before its first accepted step, those from
    it on), from the limits as the caller passed them (numbers or one-element tensors): s = t_start =
    ``t(torch.tensor(sigma_max))``, then s = t = ``torch.minimum(t_end, s + h)`` (0-d tensors: the two limits'
    dtypes promoted; a CPU 0-d tensor joins a CUDA one on the CUDA device)."""
    lo, hi = _spec(sigma_min), _spec(sigma_max)
    device = hi[1] if hi[1].type != "cpu" else lo[1]
    return hi, (torch.promote_types(lo[0], hi[0]), device)


def _reporter(host: torch.Tensor, dev: torch.Tensor, first: int):
    """``get(k, spec) -> 0-d tensor``: the attempt's value ``host[first + k]`` (float64) in ``spec``'s dtype on its
    device, taken from ``dev`` (host's copy on x's device) where spec is on that device: no copy of its own."""
    def get(k: int, spec) -> torch.Tensor:
        dtype, device = spec
        src = dev if device == dev.device else host
        return src[first + k].to(device, dtype)
    return get


def run(loop: _Loop, sigma_min: float, sigma_max: float, knobs: dict, eta: float, s_noise: float, specs=None):
    """k-diffusion's ``DPMSolver.dpm_solver_adaptive`` from sigma_max to sigma_min (t = -ln sigma, forward when
    sigma_min < sigma_max) on the loop's state; ``knobs`` from :func:`cda.check_knobs`; ``specs``: the reported
    sigmas' (dtype, device) before and from the first accepted step (:func:`report_specs`; None: those of two
    numbers). Returns (x, info) with info = {"steps", "nfe", "n_accept", "n_reject"}."""
    start_spec, stepped_spec = report_specs(sigma_min, sigma_max) if specs is None else specs
    spec = start_spec
    x, order = loop.x, knobs["order"]
    t_start, t_end = -math.log(sigma_max), -math.log(sigma_min)
    forward = t_end > t_start
    if not forward and eta:
        raise ValueError(f"eta: must be 0 for reverse sampling (sigma_min {sigma_min} >= sigma_max {sigma_max}), "
                         f"got {eta}")
    pid = cda.PID(knobs["h_init"] if forward else -knobs["h_init"], knobs["pcoeff"], knobs["icoeff"],
                  knobs["dcoeff"], 1.5 if eta else order, knobs["accept_safety"])
    stall = cda.StallWatch(knobs["accept_safety"])
    names = ("u1", "low", "high", "e0") + (("u2", "e1") if order == 3 else ())
    bufs = {name: tracked(torch.empty_like, x) for name in names}  # the model reads u1, u2 and the state
    prev = x.clone()  # k-diffusion's x_prev: the last accepted x_low, at first the start
    sig_dtype = torch.float64 if loop.fused else torch.promote_types(x.dtype, torch.float32)
    info = {"steps": 0, "nfe": 0, "n_accept": 0, "n_reject": 0}
    s, resolution = t_start, torch.finfo(x.dtype).eps
    from tqdm.auto import tqdm
    with tqdm(disable=loop.disable) as pbar:
        while (s < t_end - 1e-5) if forward else (s > t_end + 1e-5):
            t = min(t_end, s + pid.h) if forward else max(t_end, s + pid.h)
            # A step below the state's resolution (or lost to rounding in t) moves x by at most rounding, so x_low and
            # x_high agree only by luck: k-diffusion's loop then runs forever (t == s) or all but (~1/h attempts)
            if t == s or abs(pid.h) < resolution:
                raise RuntimeError(f"dpm_adaptive: the step length h = {pid.h!r} in t = -ln(sigma) fell below what "
                                   f"x's dtype {x.dtype} resolves ({resolution:.3g}) at sigma {math.exp(-s)!r} after "
                                   f"{info['steps']} attempts: the error cannot meet rtol {knobs['rtol']} / atol "
                                   f"{knobs['atol']} in this precision; raise rtol or atol")
            t_, su = cda.target(s, t, t_end, eta)
            rows, calls, launches = cda.attempt(loop.conv, math.exp(-s), math.exp(-t_), order)
            std = s_noise * su
            table = coefs.table(rows + [cda.noise_row(std)]).to(x.device)
            # the values reported to the callback and the noise_sampler (sigma(s), sigma(t), s, t) join the model
            # calls' sigmas in one host-to-device copy
            host = torch.tensor(calls + [math.exp(-s), math.exp(-t), s, t], dtype=torch.float64)
            dev = host.to(x.device)
            sig_dev = dev[:len(calls)].to(sig_dtype)
            reported = _reporter(host, dev, len(calls))
            denoised = torch.empty_like(x) if loop.callback is not None else None
            bufs["x"] = x
            for k, group in enumerate(launches):
                m, u = _call(loop, bufs[group[0][1]], sig_dev[k])
                pbar.update(1)
                for row, state, out, h1, h2, h_out in group:
                    sampler_step(bufs[state], m, table, row, model_out_uncond=u, history=bufs.get(h1),
                                 history2=bufs.get(h2), history_out=bufs.get(h_out), out=bufs[out],
                                 x0_out=denoised if row == 0 else None, seed=loop.seed, backend=loop.backend)
            error_dev = error_tensor(bufs["low"], bufs["high"], prev, knobs["atol"], knobs["rtol"])
            error = float(error_dev)
            if not math.isfinite(error):
                raise RuntimeError(f"dpm_adaptive: the error estimate of attempt {info['steps']} (sigma "
                                   f"{math.exp(-s)!r} -> {math.exp(-t_)!r}) is {error}: a non-finite state or model "
                                   "output, or atol = 0 where the state is 0")
            h_tried = pid.h
            accept = pid.propose(error)
            stalled = not accept and stall.rejected(h_tried, pid.h, pid.factor)
            if accept:
                stall.accepted()
                prev, bufs["low"] = bufs["low"], prev
                high = bufs["high"]
                noise = None
                if loop.noise_sampler is not None:  # called on every accepted step, as k-diffusion's
                    noise = sampler_compat.draw(loop.noise_sampler, (reported(0, spec), reported(1, stepped_spec)),
                                                x)
                if std != 0:
                    if noise is None:
                        noise = randn(x.shape, loop.seed, step=info["n_accept"], dtype=x.dtype, backend=loop.backend)
                    sampler_step(high, high, table, len(rows), noise=noise, out=high, seed=loop.seed,
                                 backend=loop.backend)
                x, bufs["high"] = high, x
                s, spec, now = t, stepped_spec, 1
                info["n_accept"] += 1
            else:
                now = 0
                info["n_reject"] += 1
            info["nfe"] += order
            info["steps"] += 1
            if loop.callback is not None:  # sigma(s) and s after the attempt: index 0, 2 (rejected) or 1, 3
                sig, t_now = reported(now, spec), reported(2 + now, spec)
                loop.callback({"sigma": sig, "sigma_hat": sig.clone(), "x": x.clone(), "i": info["steps"] - 1,
                               "t": t_now, "t_up": t_now.clone(), "denoised": denoised, "error": error_dev.to(x.dtype),
                               "h": pid.h, **info})
            if stalled:
                raise RuntimeError(f"dpm_adaptive: accept_safety {knobs['accept_safety']!r} > 1 stalled the step-size "
                                   f"controller at sigma {math.exp(-s)!r}: {stall.limit} attempts in a row were "
                                   f"rejected without their factor nearing accept_safety or h shrinking (last factor "
                                   f"{pid.factor:.6g}, h = {pid.h!r}). The controller steers the error towards 1, "
                                   "where its factor is about 1 < accept_safety, so no attempt would be accepted and "
                                   "k-diffusion's loop would never end; use accept_safety <= 1 (default 0.81)")
    return x, info


def check_sample_knobs(values: dict) -> None:
    """Raise as a call would on dpm_adaptive's knobs ``values`` (by name; the others at their defaults), without
    sampling (the CLI checks its flags so before loading a model)."""
    params = inspect.signature(sample_dpm_adaptive_sigmas).parameters
    get = {name: values.get(name, p.default) for name, p in params.items() if p.kind == p.KEYWORD_ONLY}
    cda.check_knobs(*(get[k] for k in ("order", "rtol", "atol", "h_init", "pcoeff", "icoeff", "dcoeff",
                                       "accept_safety")))
    _knob(get["eta"], "eta")
    _knob(get["s_noise"], "s_noise")


def _refuse_window(trajectory, window) -> None:
    if trajectory is not None:
        raise ValueError("trajectory: dpm_adaptive decides its number of steps as it runs, so there is no trajectory "
                         "of fixed size to record (record=True); use a callback")
    if window is not None:
        raise ValueError(f"window: dpm_adaptive runs no fixed schedule to take a window of; expected None, got "
                         f"{window!r}")


@torch.no_grad()
def sample_dpm_adaptive(model, x, sigma_min, sigma_max, extra_args=None, callback=None, disable=None, order=3,
                        rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0, accept_safety=0.81,
                        eta=0.0, s_noise=1.0, noise_sampler=None, return_info=False, *, seed=None, backend=None):
    """k-diffusion's ``sample_dpm_adaptive`` (its signature; ``noise_sampler`` None: Philox noise keyed by ``seed``):
    DPM-Solver-12 (``order=2``) or DPM-Solver-23 (``order=3``) from sigma_max to sigma_min (numbers or one-element
    tensors > 0; sigma_min > sigma_max runs the ODE backwards, eta = 0 only) with steps chosen by a PID controller on
    the scaled error (``rtol``, ``atol``; first step ``h_init`` in t = -ln sigma; ``pcoeff``, ``icoeff``,
    ``dcoeff``; a step is accepted when its factor is at least ``accept_safety``). ``eta`` > 0: k-diffusion's
    ancestral variant. x: (B, ...) float; returns the final state in x's dtype, and with ``return_info`` also
    ``{"steps", "nfe", "n_accept", "n_reject"}``. The callback gets k-diffusion's dict after every attempt (sigma,
    sigma_hat, x, i, t, t_up, denoised, error, h and the counts; sigma, sigma_hat, t, t_up and the noise_sampler's
    two sigmas are 0-d tensors in k-diffusion's dtype and device, :func:`report_specs`; error a 0-d tensor on x's
    device in x's dtype, computed in float32 at least, :func:`error_tensor`).
    Raises RuntimeError where k-diffusion's loop would not end: the controller's step h below x's dtype's resolution
    (rtol/atol beyond its precision), or accept_safety > 1 stalling the controller
    (:class:`~diffkern.coef_tables_dpm_adaptive.StallWatch`)."""
    lo = schedules._check_positive(sigma_min, "sigma_min")
    hi = schedules._check_positive(sigma_max, "sigma_max")
    knobs = cda.check_knobs(order, rtol, atol, h_init, pcoeff, icoeff, dcoeff, accept_safety)
    eta, s_noise = _knob(eta, "eta"), _knob(s_noise, "s_noise")
    if not isinstance(return_info, bool):
        raise TypeError(f"return_info: expected a bool, got {return_info!r}")
    # the loop for its checks and state (x, seed, model, noise_sampler); its schedule is a stand-in, never run
    loop = _Loop(model, x, [1.0, 0.0], extra_args, callback, disable, seed, backend, None, method="dpm_adaptive",
                 noise_sampler=noise_sampler)
    out, info = run(loop, lo, hi, knobs, eta, s_noise, report_specs(sigma_min, sigma_max))
    return (out, info) if return_info else out


@torch.no_grad()
def sample_dpm_adaptive_sigmas(model, x, sigmas, extra_args=None, callback=None, disable=None, *, order=3, rtol=0.05,
                               atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0, accept_safety=0.81,
                               eta=0.0, s_noise=1.0, noise_sampler=None, seed=None, backend=None, trajectory=None,
                               window=None):
    """dpm_adaptive on a schedule, as ComfyUI's ``dpm_adaptive`` calls k-diffusion's (``diffkern.sample``'s
    "dpm_adaptive"): from sigmas[0] to the last non-zero sigma (the other sigmas are not used; no jump to 0; a
    schedule [sigma, 0] runs no step), the knobs as :func:`sample_dpm_adaptive`'s. Eager only: no ``trajectory``
    (record=True), no ``window``. x: (B, ...) float; returns the final state in x's dtype."""
    _refuse_window(trajectory, window)
    host = host_sigmas(sigmas, "dpm_adaptive")
    j = len(host) - 1 if host[-1] > 0 else len(host) - 2
    if sampler_compat.floating_tensor(sigmas):  # ComfyUI passes sigmas[j], sigmas[0]: reported in their dtype
        lo, hi = sigmas.detach()[j], sigmas.detach()[0]
    else:  # any other schedule reports float64 CPU tensors, as every other sampler's
        lo, hi = (torch.tensor(host[k], dtype=torch.float64) for k in (j, 0))
    return sample_dpm_adaptive(model, x, lo, hi, extra_args, callback, disable, order, rtol, atol, h_init,
                               pcoeff, icoeff, dcoeff, accept_safety, eta, s_noise, noise_sampler, seed=seed,
                               backend=backend)
