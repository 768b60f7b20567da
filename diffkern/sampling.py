"""Public sampling entry points: :func:`sample` (VE / k-diffusion convention) and :func:`sample_iadb`.

Both resolve every branch of the sampler on the host, build a float64 coefficient table once, and run
one model call plus one fused :func:`diffkern.ops.sampler_step` per step with no host synchronisation
inside the loop. Trajectories (``record=True``) go to preallocated device buffers.
"""
from __future__ import annotations

import functools
import inspect
import math
import numbers

import torch

from . import coef_tables, graphs, sampler_compat, sampler_loop, sampler_plans, samplers, samplers_adaptive, schedules
from .ops import iadb as iadb_ops
from .ops import sampler_step
from .samplers import SAMPLERS, Trajectory, make_seed

_COMMON = ("seed", "backend", "trajectory", "window", "noise_sampler")
ALIASES = {"gradient_estimation": "ge"}
"""Other projects' names of :func:`sample` methods: ComfyUI's ``gradient_estimation`` is ``ge`` at ``mu=0``, its
``ge_gamma`` (or ``gamma``) the gamma (:func:`diffkern.samplers.sample_gradient_estimation`). Not in
:data:`~diffkern.samplers.SAMPLERS`: a name :func:`sample` resolves before anything else (:func:`knobs` lists its
``ge_gamma``)."""


def _resolve_alias(method, knob_values: dict) -> tuple:
    """``(method, knob_values)`` of the :data:`ALIASES` target; other methods unchanged."""
    if not isinstance(method, str) or method not in ALIASES:
        return method, knob_values
    unknown = sorted(set(knob_values) - {"ge_gamma", "gamma"})
    if unknown:
        raise TypeError(f"{method}: unknown knob(s) {unknown}; valid knobs: ['ge_gamma'] (or its ge name 'gamma'); "
                        "for mu or clip_denoised use method 'ge'")
    if "ge_gamma" in knob_values and "gamma" in knob_values:
        raise TypeError(f"{method}: give ge_gamma or gamma, not both")
    name = "gamma" if "gamma" in knob_values else "ge_gamma"
    gamma = sampler_plans._knob(knob_values.get(name, knobs("ge")["gamma"]), name, -math.inf)
    return ALIASES[method], {"gamma": gamma, "mu": 0.0}


def knobs(method: str) -> dict:
    """The knobs of ``method`` with their defaults, e.g. ``knobs("heun")["s_churn"] == 0.0``; an alias
    (:data:`ALIASES`) lists its own, e.g. ``knobs("gradient_estimation") == {"ge_gamma": 2.0}``."""
    if method == "gradient_estimation":
        return {"ge_gamma": knobs("ge")["gamma"]}
    if method not in SAMPLERS:
        raise ValueError(f"method: unknown sampler {method!r}; expected one of {sorted(SAMPLERS)}")
    # after k-diffusion's six (model, x, sigmas, extra_args, callback, disable): its knobs are positional there too
    params = list(inspect.signature(SAMPLERS[method]).parameters.values())[6:]
    return {p.name: p.default for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.name not in _COMMON}


@functools.lru_cache(maxsize=32)
def _cached_plan(method: str, knob_items: tuple, sigmas: tuple):
    return sampler_plans.PLANS[method](list(sigmas), coef_tables._identity, **dict(knob_items))


def host_plan(method: str, knobs_: dict, sigmas) -> coef_tables.Plan:
    """The :class:`~diffkern.coef_tables.Plan` of ``method`` with ``knobs_`` (its defaults filled in) on the host
    ``sigmas`` (a sequence of N+1 floats), without a model's conversion: the loop's structure and noise, for
    questions asked before sampling (does it draw noise, how many model calls). Cached, as a pipeline asks on every
    call (a 50-step plan costs 0.4 ms for euler_ancestral to 4.5 ms for er_sde to build on a CI core); a list-valued
    knob is not hashable and builds it afresh. Bad knobs raise as :func:`sample` does."""
    items = tuple(sorted(dict(knobs(method), **knobs_).items()))
    if method not in sampler_plans.PLANS:  # dpm_adaptive: its steps are decided as it runs
        raise ValueError(f"method: {method!r} has no plan to build before sampling (it decides its steps as it runs); "
                         f"expected one of {sorted(sampler_plans.PLANS)}")
    sig = tuple(float(s) for s in sigmas)
    try:
        hash(items)
    except TypeError:
        return _cached_plan.__wrapped__(method, items, sig)
    return _cached_plan(method, items, sig)


def sample(model, x, sigmas, method, *, backend=None, seed=0, callback=None, progress=False, record=False,
           extra_args=None, graph=False, window=None, noise_sampler=None, **knob_values):
    """Sample with ``method`` from ``x`` (already scaled by ``sigmas[0]``) along ``sigmas``.

    Args:
        model: ``model(x, sigma_batch, **extra_args) -> denoised`` (k-diffusion convention; sigma_batch is
            a (B,) tensor on x's device), or a :mod:`diffkern.wrappers` wrapper, whose raw output and
            guidance are converted inside the fused step.
        x: (B, ...) float16/bfloat16/float32/float64 initial state; not modified.
        sigmas: decreasing schedule of N+1 values (tensor or sequence, any device; read once on the host).
            A final 0 ends with the jump to the denoised estimate.
        method: "euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m",
            "dpmpp_2m_sde", "dpmpp_3m_sde", "dpmsolver_3m", "dpmpp_sde", "lcm", "ge", "sde", "unipc", "deis", "plms",
            "ipndm", "lms", "dpmsolver_single", "ipndm_v", "dpm_fast", "res_multistep", "res_multistep_ancestral",
            "er_sde", "sa_solver", "heun_flow" or "dpm_adaptive" (see :func:`knobs`; dpm_adaptive is eager only, with
            no record); or an alias (:data:`ALIASES`): "gradient_estimation", ComfyUI's name of "ge" at mu=0, its
            gamma given as ``ge_gamma`` or ``gamma``.
        backend: fused-op backend ("auto", "reference", "cpp", "triton", "cuda"); None (default):
            ``DIFFKERN_BACKEND``, else "auto".
        seed: int or int64 tensor (1,)/(B,) keying the Philox noise: same seed, same output. The default 0
            makes repeated calls identical; ``seed=None`` draws one from torch's global CPU generator.
        callback: called once per step with a dict ``x`` (state before the update), ``i``, ``sigma``,
            ``sigma_hat`` and ``denoised``. ``sigma``/``sigma_hat``: 0-d tensors as k-diffusion's ``sigmas[i]``, on
            a floating tensor ``sigmas``' device in its dtype (no host sync), else float64 CPU
            (:func:`diffkern.sampler_compat.callback_sigmas`); ``x`` and ``denoised`` fresh each step, which later
            steps never overwrite (a callback may keep them, as k-diffusion's). dpm_fast and dpm_adaptive report as
            k-diffusion's: once per step of dpm_fast's own grid (with ``t`` and ``t_up``, in the default dtype on
            x's device; :class:`diffkern.sampler_compat.DpmFastReport`), after every dpm_adaptive attempt.
        progress: show a tqdm bar.
        record: also return ``{"x": (N+1, *x.shape), "denoised": (N, *x.shape)}`` trajectories.
        graph: False (eager), True (capture the whole N-step loop as one CUDA graph on the first call, replay it
            on later calls; needs x on a CUDA device, no callback, no progress bar) or "auto" (the graph when it
            can be used, else eager, with one :class:`diffkern.graphs.GraphFallbackWarning` saying why). The
            output is bitwise the eager output for the same seed. See :mod:`diffkern.graphs`.
        window: None, or ``(begin, total)``: ``sigmas`` are steps ``begin .. begin + N - 1`` of a ``total``-step
            schedule (an img2img tail from ``begin``, diffusers' ``set_begin_index``; a ``denoising_end`` head), and
            each step draws the Philox noise it draws in the whole loop (as diffkern's Level-1 schedulers do): the
            counters move, not the coefficients (:func:`diffkern.sampler_loop.windowed`). No effect on a method
            that draws no noise; None and ``(0, N)`` are the loop on its own.
        noise_sampler: None (Philox noise), or k-diffusion's ``noise_sampler(sigma, sigma_next) -> tensor like x``
            for the methods whose k-diffusion sampler takes one (:data:`diffkern.sampler_compat.NOISE_SAMPLERS`);
            eager only (refused by ``graph=True``). Its sigmas: 0-d tensors as the callback's (dpm_adaptive's: float64
            CPU; :func:`diffkern.sampler_compat.noise_sigmas`).
        **knob_values: the method's knobs; :func:`knobs` lists each method's with its defaults, and an unknown one
            raises TypeError. Churn: s_churn, s_tmin, s_tmax (euler, heun, dpm_2). Noise: s_noise (those and the
            stochastic methods), s_noise_end (lcm: the last step's s_noise), eta (the ancestral, SDE and
            res_multistep methods, dpm_fast, dpmsolver_3m), r (dpmpp_sde), tau (sa_solver), lam and integrator
            (sde), gamma and mu (ge). Clipping:
            clip_denoised (euler_ancestral, ge: D clamped to [-r, r], diffusers' clipped x0), clipped_eps
            (euler_ancestral: False keeps the unclipped D in the direction, as DDIM). Order: order (deis, lms,
            unipc, dpmsolver_single), orders (dpmsolver_single), solver_order (dpmsolver_3m), max_order (ipndm,
            ipndm_v), predictor_order and corrector_order (sa_solver), max_stage (er_sde). Variants: solver_type
            (dpmpp_2m_sde, dpmsolver_3m, dpmsolver_single, unipc), split (euler_ancestral, dpm_2_ancestral,
            dpmpp_2s_ancestral: "ve" k-diffusion's ancestral split, "rf" ComfyUI's for flow models), predict_x0
            (dpmsolver_single, sa_solver, unipc), lower_order_final (deis, dpmsolver_3m, dpmsolver_single, sa_solver,
            unipc), euler_at_final (dpmsolver_3m), disable_corrector (unipc), noise_scaler (er_sde). Adaptive steps
            (dpm_adaptive): order, rtol, atol, h_init, pcoeff, icoeff, dcoeff, accept_safety.

    Returns:
        The final state (x's shape and dtype), or ``(x, trajectories)`` when ``record``.
    """
    method, knob_values = _resolve_alias(method, knob_values)
    valid = knobs(method)
    unknown = sorted(set(knob_values) - set(valid))
    if unknown:
        raise TypeError(f"{method}: unknown knob(s) {unknown}; valid knobs: {sorted(valid) or 'none'}")
    samplers.check_state(x)  # before record= allocates from it
    _check_record(record)
    samplers.check_call(model, extra_args)
    sampler_loop.check_callback(callback)
    steps = len(samplers.host_sigmas(sigmas, method)) - 1
    window = sampler_loop.check_window(window, steps)
    if noise_sampler is not None:
        if method not in sampler_compat.NOISE_SAMPLERS:
            raise ValueError(f"noise_sampler: {method!r} takes none; the methods that do: "
                             f"{sampler_compat.NOISE_SAMPLERS}")
        knob_values["noise_sampler"] = noise_sampler
    graph = samplers_adaptive.check_graph(graph, method)
    if graphs.wanted(graph, x, callback, progress, noise_sampler=noise_sampler):
        try:
            return _sample_graph(model, x, sigmas, method, {**valid, **knob_values}, seed, backend, record,
                                 extra_args, window)
        except graphs.GraphCaptureError as exc:
            if graph is True:
                raise
            graphs.fall_back(exc)
    trajectory = Trajectory(x, steps) if record else None
    out = SAMPLERS[method](model, x, sigmas, extra_args, callback, not progress, seed=seed, backend=backend,
                           trajectory=trajectory, window=window, **knob_values)
    return (out, trajectory.as_dict()) if record else out


def _check_record(record) -> None:
    if not isinstance(record, bool):  # "no" or a tensor would be truthy (or ambiguous) and record
        raise TypeError(f"record: expected a bool, got {record!r}")


@torch.no_grad()
def _sample_graph(model, x, sigmas, method, knob_values, seed, backend, record, extra_args, window=None):
    """:func:`sample` as a CUDA graph (:mod:`diffkern.graphs`): the captured body is ``samplers.run_steps``."""
    host = samplers.host_sigmas(sigmas, method)
    plan = sampler_plans.PLANS[method](host, samplers.conversion_rows(model), **knob_values)
    # windowed here, not by the loop's _run as eagerly: the key (step_row is part of plan_structure) and the host
    # tables fed to a replay are needed before the loop, which only a cache miss builds
    plan = sampler_loop.windowed(plan, window)
    call = graphs.Call(model, x, seed, backend, extra_args, record)
    hosts = [plan.table, torch.tensor(plan.row_sigma, dtype=torch.float64)]

    def build() -> graphs.Entry:
        statics, extra = call.static_extra()
        trajectory = Trajectory(x, plan.steps) if record else None
        loop = samplers._Loop(model, x, host, extra, None, True, call.static_seed(x.device), backend, trajectory,
                              method=method)
        loop.begin(plan, rewritten=True)  # replays feed other tables: no launch may bake this one's values
        outputs = (lambda: (loop.x, trajectory.as_dict())) if record else (lambda: loop.x)
        return graphs.Entry(loop, loop.x, loop.seed, statics, [[loop.table, hosts[0]], [loop.sig_dev, hosts[1]]],
                            outputs, call.keep(model))

    return graphs.run(call.key + ("ve", method, graphs.plan_structure(plan)), build,
                      lambda e: graphs.feed(e, x, call.seed, call.tensors, hosts),
                      lambda e: samplers.run_steps(e.state, plan), x.device, f"{method} sampling")

#----------------------------------------------------------------------------
# IADB in its own coordinates (Heitz et al. 2023): x_alpha = (1-alpha)*noise + alpha*data.


IADB_STEPS = 128  # sample_iadb's default step count (the paper's)


def iadb_alphas(alphas, steps) -> list[float]:
    """Validated host copy of an IADB schedule: increasing, in [0, 1], N+1 values (default uniform, ``steps``
    of them; None: :data:`IADB_STEPS`). Giving both ``alphas`` and ``steps`` is an error (one would be ignored)."""
    if isinstance(alphas, numbers.Integral) and not isinstance(alphas, bool):  # sample_iadb(m, x0, 64): meant steps
        raise TypeError(f"alphas: expected a schedule of N+1 blending values, got the int {alphas}; "
                        f"for {alphas} uniform steps pass steps={alphas}")
    if alphas is not None and steps is not None:
        raise ValueError(f"steps: give either alphas (a schedule) or steps (uniform), not both (steps={steps!r})")
    if alphas is None:
        steps = IADB_STEPS if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:  # numpy ints too
            raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
        steps = int(steps)
        return (torch.arange(steps + 1, dtype=torch.float64) / steps).tolist()
    a = schedules.host_float64(alphas, "alphas")
    if a.dim() != 1 or a.numel() < 2:
        raise ValueError(f"alphas: expected a 1-D schedule of N+1 >= 2 values, got shape {tuple(a.shape)}")
    if not torch.isfinite(a).all() or (a < 0).any() or (a > 1).any():
        raise ValueError("alphas: values must be finite and in [0, 1]")
    if (a[1:] <= a[:-1]).any():
        i = int((a[1:] <= a[:-1]).nonzero()[0])
        raise ValueError(f"alphas: must be strictly increasing, but alphas[{i + 1}] <= alphas[{i}]")
    return a.tolist()


def _check_iadb_output(out, x, variant):
    if variant == "two_head":
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise TypeError("model: the two_head variant expects the model to return (x0_bar, x1_bar)")
        for name, t in zip(("x0_bar", "x1_bar"), out):
            samplers._check_output(t, x, name)
    else:
        samplers._check_output(out, x, "output")


def alpha_dtype(x: torch.Tensor) -> torch.dtype:
    """dtype of the alpha a model receives: x's precision, float32 at least."""
    return torch.promote_types(x.dtype, torch.float32)


class IadbLoop:
    """State of one IADB call: working copy of x, device tables, seed, outputs (the graph runner captures
    :meth:`run`, which only launches work on the buffers allocated here)."""

    def __init__(self, model, x0, host, variant, lam, seed, backend, extra_args, record, callback):
        self.model, self.host, self.variant, self.backend, self.callback = model, host, variant, backend, callback
        self.x = sampler_loop.tracked(x0.detach().clone, memory_format=torch.contiguous_format)
        self.table = iadb_ops.sampler_table(host, variant=variant, lam=lam).to(self.x.device)
        self.alpha_dev = torch.tensor(host, dtype=torch.float64).to(self.x.device, alpha_dtype(self.x))
        self.seed = make_seed(seed, self.x)
        self.extra = dict(extra_args or {})
        self.trajectory = Trajectory(self.x, len(host) - 1) if record else None

    def run(self, progress: bool = False) -> None:
        x, host, trajectory, callback = self.x, self.host, self.trajectory, self.callback
        if trajectory is not None:
            trajectory.x[0].copy_(x)
        from tqdm.auto import trange
        for i in trange(len(host) - 1, disable=not progress):
            version = sampler_loop.input_version(x)
            out = self.model(x, self.alpha_dev[i].expand(x.shape[0]), **self.extra)
            sampler_loop.check_input_kept(x, version)
            if i == 0:
                _check_iadb_output(out, x, self.variant)
            if self.variant == "two_head":
                m, h = out[1], out[0].to(x.dtype)
            else:
                m, h = out, None
            if trajectory is not None or callback is not None:
                # a fresh x1_bar each step, and a copy of x (updated in place below): the callback may keep both
                dst = trajectory.denoised[i] if trajectory is not None else torch.empty_like(x)
                if self.variant == "two_head":
                    dst.copy_(m)
                else:
                    torch.add(x, m.to(x.dtype), alpha=1.0 - host[i], out=dst)  # x1_bar = x + (1-alpha)*D
                if callback is not None:
                    callback({"x": x.clone(), "i": i, "alpha": host[i], "alpha_next": host[i + 1], "denoised": dst})
            sampler_step(x, m, self.table, i, history=h, seed=self.seed, out=x, backend=self.backend)
            if trajectory is not None:
                trajectory.x[i + 1].copy_(x)


def iadb_lam(variant: str, lam) -> float:
    """Validated noise level of an IADB variant (None: 0 for euler and two_head, 1 for stochastic)."""
    if variant not in iadb_ops.VARIANTS:
        raise ValueError(f"variant: expected one of {iadb_ops.VARIANTS}, got {variant!r}")
    if lam is None:
        lam = 1.0 if variant == "stochastic" else 0.0
    lam = sampler_plans._knob(lam, "lam")
    if variant == "euler" and lam != 0:
        raise ValueError("lam: the euler variant is deterministic; use variant='stochastic' for lam > 0")
    return lam


@torch.no_grad()
def sample_iadb(model, x0, alphas=None, variant="euler", *, steps=None, lam=None, backend=None, seed=0,
                callback=None, progress=False, record=False, extra_args=None, graph=False):
    """IADB deblending from noise ``x0`` (alpha = 0) to data (alpha = 1), ``math-samplers.md`` section 1.

    Args:
        model: ``model(x_alpha, alpha_batch, **extra_args)``; returns D = x1_bar - x0_bar (variants
            "euler", "stochastic") or the pair (x0_bar, x1_bar) (variant "two_head"). alpha_batch: (B,).
        x0: (B, ...) float noise (the paper's x0); not modified.
        alphas: increasing blending schedule of N+1 values in [0, 1]; default uniform ``k/steps``.
        steps: the number of uniform steps when ``alphas`` is None (default 128); not both.
        variant: "euler" (the official step ``x + (alpha'-alpha)*D``), "two_head" (deblend to the two
            means and reblend, stochastic for lam > 0), "stochastic" (section 1.6 from a single-head D).
        lam: noise level of the stochastic steps (default 0 for two_head, 1 for stochastic; lam = 1 is the
            DDPM posterior step); must be 0/None for "euler".
        backend, seed, progress, extra_args: as in :func:`sample`.
        callback: per-step dict ``x``, ``i``, ``alpha``, ``alpha_next``, ``denoised`` (= x1_bar, the data estimate).
        record: also return ``{"x": (N+1, ...), "denoised": (N, ...)}`` with denoised = x1_bar.
        graph: False, True or "auto", as in :func:`sample`.

    Returns:
        The final state x_1 (x0's shape and dtype), or ``(x, trajectories)`` when ``record``.
    """
    lam = iadb_lam(variant, lam)
    samplers.check_state(x0, "x0")
    _check_record(record)
    samplers.check_call(model, extra_args)
    sampler_loop.check_callback(callback)
    host = iadb_alphas(alphas, steps)
    if graphs.wanted(graph, x0, callback, progress, name="x0"):
        try:
            return _sample_iadb_graph(model, x0, host, variant, lam, seed, backend, record, extra_args)
        except graphs.GraphCaptureError as exc:
            if graph is True:
                raise
            graphs.fall_back(exc)
    loop = IadbLoop(model, x0, host, variant, lam, seed, backend, extra_args, record, callback)
    loop.run(progress)
    return (loop.x, loop.trajectory.as_dict()) if record else loop.x


@torch.no_grad()
def _sample_iadb_graph(model, x0, host, variant, lam, seed, backend, record, extra_args):
    """:func:`sample_iadb` as a CUDA graph (:mod:`diffkern.graphs`): the captured body is ``IadbLoop.run``."""
    call = graphs.Call(model, x0, seed, backend, extra_args, record)
    hosts = [iadb_ops.sampler_table(host, variant=variant, lam=lam), torch.tensor(host, dtype=torch.float64)]
    # With record, single-head variants compute x1_bar = x + (1-alpha)*D with alpha a Python float: baked.
    baked = tuple(host) if record and variant != "two_head" else len(host)

    def build() -> graphs.Entry:
        statics, extra = call.static_extra()
        loop = IadbLoop(model, x0, host, variant, lam, call.static_seed(x0.device), backend, extra, record, None)
        outputs = (lambda: (loop.x, loop.trajectory.as_dict())) if record else (lambda: loop.x)
        return graphs.Entry(loop, loop.x, loop.seed, statics,
                            [[loop.table, hosts[0]], [loop.alpha_dev, hosts[1]]], outputs, call.keep(model))

    return graphs.run(call.key + ("iadb", variant, baked), build,
                      lambda e: graphs.feed(e, x0, call.seed, call.tensors, hosts), lambda e: e.state.run(),
                      x0.device, f"IADB {variant}")


__all__ = ["knobs", "sample", "sample_iadb", "iadb_alphas"]
