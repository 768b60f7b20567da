"""Public sampling entry points: :func:`sample` (VE / k-diffusion convention) and :func:`sample_iadb`.

Both resolve every branch of the sampler on the host, build a float64 coefficient table once, and run
one model call plus one fused :func:`diffkern.ops.sampler_step` per step with no host synchronisation
inside the loop. Trajectories (``record=True``) go to preallocated device buffers.
"""
from __future__ import annotations

import inspect

import torch

from . import coef_tables, samplers
from .ops import sampler_step
from .samplers import SAMPLERS, Trajectory, make_seed

_COMMON = ("seed", "backend", "trajectory")


def knobs(method: str) -> dict:
    """The knobs of ``method`` with their defaults, e.g. ``knobs("heun")["s_churn"] == 0.0``."""
    if method not in SAMPLERS:
        raise ValueError(f"method: unknown sampler {method!r}; expected one of {sorted(SAMPLERS)}")
    params = inspect.signature(SAMPLERS[method]).parameters.values()
    return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name not in _COMMON}


def sample(model, x, sigmas, method, *, backend="auto", seed=0, callback=None, progress=False, record=False,
           extra_args=None, **knob_values):
    """Sample with ``method`` from ``x`` (already scaled by ``sigmas[0]``) along ``sigmas``.

    Args:
        model: ``model(x, sigma_batch, **extra_args) -> denoised`` (k-diffusion convention; sigma_batch is
            a (B,) tensor on x's device), or a :mod:`diffkern.wrappers` wrapper, whose raw output and
            guidance are converted inside the fused step.
        x: (B, ...) float16/bfloat16/float32/float64 initial state; not modified.
        sigmas: decreasing schedule of N+1 values (tensor or sequence, any device; read once on the host).
            A final 0 ends with the jump to the denoised estimate.
        method: "euler", "euler_ancestral", "heun", "dpmpp_2m", "ge" or "sde" (see :func:`knobs`).
        backend: fused-op backend ("auto", "reference", "cpp", "triton", "cuda").
        seed: int or int64 tensor (1,)/(B,) keying the Philox noise: same seed, same output.
        callback: called once per step with a dict ``x`` (state before the update), ``i``, ``sigma``,
            ``sigma_hat`` (host floats) and ``denoised``; the tensors are working buffers that later steps
            overwrite (clone what you keep).
        progress: show a tqdm bar.
        record: also return ``{"x": (N+1, *x.shape), "denoised": (N, *x.shape)}`` trajectories.
        **knob_values: the method's knobs (eta, s_churn, s_tmin, s_tmax, s_noise, gamma, mu, lam, integrator).

    Returns:
        The final state (x's shape and dtype), or ``(x, trajectories)`` when ``record``.
    """
    valid = knobs(method)
    unknown = sorted(set(knob_values) - set(valid))
    if unknown:
        raise TypeError(f"{method}: unknown knob(s) {unknown}; valid knobs: {sorted(valid) or 'none'}")
    steps = len(samplers.host_sigmas(sigmas)) - 1
    trajectory = Trajectory(x, steps) if record else None
    out = SAMPLERS[method](model, x, sigmas, extra_args, callback, not progress, seed=seed, backend=backend,
                           trajectory=trajectory, **knob_values)
    return (out, trajectory.as_dict()) if record else out

#----------------------------------------------------------------------------
# IADB in its own coordinates (Heitz et al. 2023): x_alpha = (1-alpha)*noise + alpha*data.


def iadb_alphas(alphas, steps: int) -> list[float]:
    """Validated host copy of an IADB schedule: increasing, in [0, 1], N+1 values (default uniform)."""
    if alphas is None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
        return (torch.arange(steps + 1, dtype=torch.float64) / steps).tolist()
    a = torch.as_tensor(alphas).detach().to("cpu", torch.float64)
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


@torch.no_grad()
def sample_iadb(model, x0, alphas=None, variant="euler", *, steps=128, lam=None, backend="auto", seed=0,
                callback=None, progress=False, record=False, extra_args=None):
    """IADB deblending from noise ``x0`` (alpha = 0) to data (alpha = 1), ``math-samplers.md`` section 1.

    Args:
        model: ``model(x_alpha, alpha_batch, **extra_args)``; returns D = x1_bar - x0_bar (variants
            "euler", "stochastic") or the pair (x0_bar, x1_bar) (variant "two_head"). alpha_batch: (B,).
        x0: (B, ...) float noise (the paper's x0); not modified.
        alphas: increasing blending schedule of N+1 values in [0, 1]; default uniform ``k/steps``.
        variant: "euler" (the official step ``x + (alpha'-alpha)*D``), "two_head" (deblend to the two
            means and reblend, stochastic for lam > 0), "stochastic" (section 1.6 from a single-head D).
        lam: noise level of the stochastic steps (default 0 for two_head, 1 for stochastic; lam = 1 is the
            DDPM posterior step); must be 0/None for "euler".
        callback: per-step dict ``x``, ``i``, ``alpha``, ``alpha_next``, ``denoised`` (= x1_bar, the data estimate).
        record: also return ``{"x": (N+1, ...), "denoised": (N, ...)}`` with denoised = x1_bar.

    Returns:
        The final state x_1 (x0's shape and dtype), or ``(x, trajectories)`` when ``record``.
    """
    if variant not in coef_tables.IADB_VARIANTS:
        raise ValueError(f"variant: expected one of {coef_tables.IADB_VARIANTS}, got {variant!r}")
    if lam is None:
        lam = 1.0 if variant == "stochastic" else 0.0
    lam = samplers._knob(lam, "lam")
    if variant == "euler" and lam != 0:
        raise ValueError("lam: the euler variant is deterministic; use variant='stochastic' for lam > 0")
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point() or x0.dim() == 0:
        raise TypeError("x0: expected a floating tensor of shape (B, ...)")
    host = iadb_alphas(alphas, steps)
    n = len(host) - 1
    x = x0.detach().clone(memory_format=torch.contiguous_format)
    table = coef_tables.iadb(host, variant=variant, lam=lam).to(x.device)
    alpha_dev = torch.tensor(host, dtype=torch.float64).to(x.device, torch.promote_types(x.dtype, torch.float32))
    seed_t = make_seed(seed, x)
    extra = dict(extra_args or {})
    trajectory = Trajectory(x, n) if record else None
    want_x1 = record or callback is not None
    x1_bar = None if record or callback is None else torch.empty_like(x)
    if trajectory is not None:
        trajectory.x[0].copy_(x)
    from tqdm.auto import trange
    for i in trange(n, disable=not progress):
        out = model(x, alpha_dev[i].expand(x.shape[0]), **extra)
        if i == 0:
            _check_iadb_output(out, x, variant)
        if variant == "two_head":
            m, h = out[1], out[0].to(x.dtype)
        else:
            m, h = out, None
        if want_x1:
            dst = trajectory.denoised[i] if trajectory is not None else x1_bar
            if variant == "two_head":
                dst.copy_(m)
            else:
                torch.add(x, m.to(x.dtype), alpha=1.0 - host[i], out=dst)  # x1_bar = x + (1-alpha)*D
            if callback is not None:
                callback({"x": x, "i": i, "alpha": host[i], "alpha_next": host[i + 1], "denoised": dst})
        sampler_step(x, m, table, i, history=h, seed=seed_t, out=x, backend=backend)
        if trajectory is not None:
            trajectory.x[i + 1].copy_(x)
    return (x, trajectory.as_dict()) if record else x


__all__ = ["knobs", "sample", "sample_iadb", "iadb_alphas"]
