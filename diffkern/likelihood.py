"""Log-likelihood of given points under a denoiser (McAllester, ``math-samplers.md`` 3.3).

The non-variational identity, in eps form with sigma the VE noise level and ``x = y + sigma*eps``::

    -ln p(y) = E[-ln p_{sigma_max}(y + sigma_max*eps)]
               + int_{sigma_min}^{sigma_max} E[ ||eps - eps_hat(x, sigma)||^2 - ||eps||^2 ] dsigma/sigma

with ``eps_hat = (x - D(x, sigma))/sigma``. For the exact denoiser it is an equality (no variational
gap) up to the part of the integral below sigma_min, which is O(sigma_min^2) for smooth densities:
the estimate is then of ``E ln p_{sigma_min}(y + sigma_min*eps)``.

Variance: ``||eps||^2`` (mean d) is a control variate. The eps form subtracts all of it, which is
right at small sigma (``eps_hat ~ 0``) but leaves a variance of 2d per level at large sigma, where
``eps_hat ~ eps`` (the sigma form, which subtracts the constant d, is right there). The integrand used
is ``||eps - eps_hat||^2 - c*||eps||^2 - (1 - c)*d`` with ``c = (s^2/(sigma^2 + s^2))^2``,
``s = data_std``: for Gaussian data of variance s^2, ``eps - eps_hat = c^(1/2)*eps - sigma*y/(sigma^2 + s^2)``,
so c is the coefficient of ``||eps||^2`` there. Any c is unbiased. On the 2-D demo mixture this c cuts
the mean per-level variance from 2.1 to 0.6 at a mode (3.6 to 2.2 between modes).

:func:`log_likelihood` estimates it by Monte Carlo in ``log sigma`` with the fused accumulation op
(:func:`diffkern.ops.likelihood_accum`) and reports a standard error from independent repeats.
:func:`ode_log_likelihood` is the probability-flow-ODE estimate (exact divergence, low dimension),
an independent check. :func:`bits_per_dim` and :func:`dequantize` (from :mod:`diffkern.likelihood_bpd`) turn
a log-density of scaled 8-bit data into bits per dimension of the discrete data.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple, Optional

import torch

from . import ops
from .schedules import _check_int
from .likelihood_bpd import bits_per_dim, dequantize  # noqa: F401  (re-exported: the bpd of a log_prob)
from .likelihood_trace import check_trace_args, draw_probes, hutchinson_trace

GRIDS = ("fixed", "random")
_LOG_2PI = math.log(2 * math.pi)


class LogLikelihood(NamedTuple):
    """Result of :func:`log_likelihood`: float64 CPU tensors.

    log_prob: (B,) the estimate of ``ln p(x_b)`` in nats (the mean of the repeats), a density in the units of x:
        bits per dimension are ``-log_prob/(d*ln 2)``; for points stored as ``x = a*raw + b`` (images mapped to
        [-1, 1]: a = 2/255) the density of the raw values is ``log_prob + d*ln|a|``: :func:`bits_per_dim`
        converts, and for discrete data at points from :func:`dequantize` it bounds the discrete bpd.
    stderr: (B,) its standard error (sample standard deviation of the repeats / sqrt(n_samples)).
    repeats: (n_samples, B) the independent estimates.
    """
    log_prob: torch.Tensor
    stderr: torch.Tensor
    repeats: torch.Tensor


def _check_range(sigma_min, sigma_max) -> tuple[float, float]:
    for name, v in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name}: expected a finite float > 0, got {v!r}")
    if not sigma_max > sigma_min:
        raise ValueError(f"sigma_max: expected > sigma_min = {sigma_min}, got {sigma_max}")
    return float(sigma_min), float(sigma_max)


def _check_points(model, x) -> None:
    if not callable(model):
        raise TypeError(f"model: expected a callable model(x, sigma) -> denoised, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x: expected a floating torch.Tensor of points (B, ...), got "
                        f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x: expected shape (B, ...) with at least 2 dims (B points), got {tuple(x.shape)}")


def gaussian_terminal(x: torch.Tensor, sigma_max: float, data_mean: float = 0.0, data_std: float = 1.0) -> torch.Tensor:
    """``E[-ln N(x + sigma_max*eps; data_mean, (sigma_max^2 + data_std^2) I)]`` in closed form, (B,) float64.

    ``p_{sigma_max} = p_data * N(0, sigma_max^2 I)`` tends to this Gaussian for large sigma_max; a wrong
    data_std changes the result by O(d * data_std^2 * |.| / sigma_max^4), a wrong mean by
    O(|y - mean| * |d mean| / sigma_max^2).
    """
    # numpy scalars as Python floats (np.float32 arithmetic would stay float32); a tensor mean broadcasts as before
    sigma_max, data_mean, data_std = (float(v) if isinstance(v, numbers.Real) else v
                                      for v in (sigma_max, data_mean, data_std))
    y = x.detach().reshape(x.shape[0], -1).to(torch.float64)
    d = y.shape[1]
    var = sigma_max ** 2 + data_std ** 2
    return 0.5 * d * (_LOG_2PI + math.log(var)) + (((y - data_mean) ** 2).sum(1) + d * sigma_max ** 2) / (2 * var)


def _gaussian_log_prob(z: torch.Tensor, sigma_max: float, data_mean: float, data_std: float) -> torch.Tensor:
    var = sigma_max ** 2 + data_std ** 2
    zf = z.reshape(z.shape[0], -1).to(torch.float64)
    return -0.5 * (zf.shape[1] * (_LOG_2PI + math.log(var)) + ((zf - data_mean) ** 2).sum(1) / var)


def sigma_grid(n_levels: int, n_rows: int, sigma_min: float, sigma_max: float, grid: str,
               generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, float]:
    """(sigmas (n_levels, n_rows) float64, weight) of the quadrature in ``u = ln sigma``.

    The range of ln sigma is cut into ``n_levels`` equal strata of width ``weight``. "fixed": every row
    uses the strata midpoints (midpoint rule: deterministic, bias O(weight^2)). "random": every row
    draws one uniform point per stratum (stratified Monte Carlo: unbiased for the integral above
    sigma_min, and each row's grid is independent of the others).
    """
    span = math.log(sigma_max / sigma_min)
    k = torch.arange(n_levels, dtype=torch.float64)[:, None]
    if grid == "fixed":
        u = (k + 0.5).expand(n_levels, n_rows)
    else:
        u = k + torch.rand(n_levels, n_rows, generator=generator, dtype=torch.float64)
    return sigma_min * torch.exp(u * (span / n_levels)), span / n_levels


def log_likelihood(model: Callable, x: torch.Tensor, *, sigma_min: float = 1e-3, sigma_max: float = 80.0,
                   n_levels: int = 64, grid: str = "random", n_samples: int = 16, seed: int = 0,
                   data_mean: float = 0.0, data_std: float = 1.0, terminal: Optional[Callable] = None,
                   batch_size: Optional[int] = None, backend: Optional[str] = None) -> LogLikelihood:
    """McAllester's estimate of ``ln p(x_b)`` for each point, with its standard error.

    Args:
        model: the denoiser ``model(x, sigma) -> D`` (k-diffusion contract: x ``(rows, ...)`` in x's
            dtype, sigma a ``(rows,)`` tensor in x's dtype promoted to at least float32), e.g.
            :class:`diffkern.analytic.GaussianMixture`.
        x: ``(B, ...)`` points, float16/bfloat16/float32/float64; the model sees this dtype, so a noised point
            is rounded to it: keep sigma_min well above the dtype's spacing at the points (bfloat16: |x|/128),
            else the rounding, not sigma, sets the small-sigma noise and biases the estimate (a 2-D Gaussian in
            bfloat16 at sigma_min = 1e-3: +0.48 nats, 6 standard errors; none at 0.03).
        sigma_min, sigma_max: the integration range of sigma (the part below sigma_min is dropped).
        n_levels: strata of ln sigma (model calls per repeat).
        grid: "random" (stratified, unbiased) or "fixed" (midpoints; the standard error then covers the
            noise only, not the quadrature bias).
        n_samples: independent repeats (>= 2), each with fresh eps (and, for "random", fresh sigmas).
        seed: int in [0, 2**31); eps comes from the Philox stream keyed per row by
            ``seed * 2**32 + row``, redrawn inside the fused op.
        data_mean, data_std: the Gaussian used for the terminal term ``p_{sigma_max}`` (a wrong value
            biases it by O(1/sigma_max^2)); data_std also sets the control variate (never a bias).
        terminal: optional ``log_p(z, sigma) -> (rows,)``, the exact log-density of the noised data
            (e.g. ``GaussianMixture.log_prob``); then the terminal term is estimated by Monte Carlo
            with the Gaussian as control variate. None: the Gaussian in closed form.
        batch_size: rows (points x repeats) per model call; None: all at once.
        backend: backend of the fused ops (see :mod:`diffkern.ops.registry`).

    Returns:
        :class:`LogLikelihood` (log_prob, stderr, repeats), float64 CPU tensors.
    """
    _check_points(model, x)
    sigma_min, sigma_max = _check_range(sigma_min, sigma_max)
    n_levels = _check_int(n_levels, "n_levels", 1)
    n_samples = _check_int(n_samples, "n_samples", 2)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2 ** 31:
        raise ValueError(f"seed: expected an int in [0, 2**31), got {seed!r}")
    seed = int(seed)  # a numpy int would key the Philox rows through int64 arithmetic
    if grid not in GRIDS:
        raise ValueError(f"grid: expected one of {GRIDS}, got {grid!r}")
    if terminal is not None and not callable(terminal):
        raise TypeError(f"terminal: expected None or a callable log_p(z, sigma), got {type(terminal).__name__}")
    for name, v in (("data_mean", data_mean), ("data_std", data_std)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"{name}: expected a finite float, got {v!r}")
    data_mean, data_std = float(data_mean), float(data_std)  # np.float32 arithmetic would stay float32
    if not data_std >= 0:
        raise ValueError(f"data_std: expected >= 0, got {data_std}")
    batch = x.shape[0]
    rows = batch * n_samples
    if batch_size is not None:
        batch_size = _check_int(batch_size, "batch_size", 1)
    chunk = rows if batch_size is None else batch_size
    if rows == 0:
        empty = torch.empty(0, dtype=torch.float64)
        return LogLikelihood(empty, empty, torch.empty(n_samples, 0, dtype=torch.float64))

    device, dtype = x.device, x.dtype
    y = x.detach().unsqueeze(0).expand(n_samples, *x.shape).reshape(rows, *x.shape[1:]).contiguous()
    keys = seed * 2 ** 32 + torch.arange(rows, dtype=torch.int64, device=device)
    gen = torch.Generator().manual_seed(seed)
    sigmas, weight = sigma_grid(n_levels, rows, sigma_min, sigma_max, grid, gen)
    cvs = (data_std ** 2 / (sigmas ** 2 + data_std ** 2)) ** 2 if data_std > 0 else torch.zeros_like(sigmas)
    offset = -weight * (1 - cvs).sum(0) * math.prod(x.shape[1:])  # the -(1 - c)*d of every level, (rows,)
    sigmas, cvs = sigmas.to(device), cvs.to(device)               # one host-to-device copy of the grid
    weight_t = torch.full((1,), weight, dtype=torch.float64, device=device)
    acc = torch.zeros(rows, dtype=ops.likelihood.acc_dtype(dtype), device=device)
    extra = torch.zeros(rows, dtype=torch.float64, device=device)
    bcast = (-1,) + (1,) * (x.dim() - 1)
    sigma_dtype = torch.promote_types(dtype, torch.float32)
    with torch.no_grad():
        for lo in range(0, rows, chunk):
            hi = min(rows, lo + chunk)
            y_c, key_c = y[lo:hi], keys[lo:hi]
            for level in range(n_levels):
                sig = sigmas[level, lo:hi]
                eps = ops.randn(y_c.shape, key_c, step=level, dtype=dtype, backend=backend)
                x_noisy = (y_c.to(torch.float64) + sig.reshape(bcast) * eps.to(torch.float64)).to(dtype)
                denoised = model(x_noisy, sig.to(sigma_dtype)).to(dtype)
                ops.likelihood_accum(y_c, denoised, sig, weight_t, acc[lo:hi], cv=cvs[level, lo:hi], step=level,
                                     seed=key_c, backend=backend)
            if terminal is not None:
                eps = ops.randn(y_c.shape, key_c, step=n_levels, dtype=torch.float64, backend=backend)
                z = y_c.to(torch.float64) + sigma_max * eps
                log_p = terminal(z, sigma_max).to(torch.float64).reshape(-1)
                extra[lo:hi] = _gaussian_log_prob(z, sigma_max, data_mean, data_std) - log_p
    nll = gaussian_terminal(y, sigma_max, data_mean, data_std) + extra + offset.to(device) + acc.to(torch.float64)
    reps = -nll.reshape(n_samples, batch).cpu()
    return LogLikelihood(reps.mean(0), reps.std(0, correction=1) / math.sqrt(n_samples), reps)

#----------------------------------------------------------------------------
# Probability-flow ODE estimate (the independent check; exact divergence by autograd).

# Dormand-Prince 5(4) tableau (Dormand & Prince 1980): nodes, stages, 5th-order weights (= last stage
# row, so the last stage is the next step's first: FSAL) and the 5th-minus-4th-order error weights.
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = ((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
         (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
         (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
         (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
_DP_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)


def _ode_field(model, shape, u: torch.Tensor, s: float, probes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """d/ds of the state ``u = [z, logdet]`` (B, d+1): ``[z - D, d - tr(dD/dz)]`` at sigma = e^s.

    probes None: the trace is exact, all d vector-Jacobian products in one batched backward pass.
    probes (n, B, d): Hutchinson's estimate with these fixed probes, one VJP per probe."""
    batch, dim = u.shape[0], u.shape[1] - 1
    with torch.enable_grad():
        z = u[:, :dim].detach().requires_grad_(True)
        sig = torch.full((batch,), math.exp(s), dtype=u.dtype, device=u.device)
        denoised = model(z.reshape(shape), sig).reshape(batch, dim).to(u.dtype)
        if probes is not None:
            trace = hutchinson_trace(denoised, z, probes)
        else:
            basis = torch.eye(dim, dtype=u.dtype, device=u.device)[:, None, :].expand(dim, batch, dim)
            (jac_rows,) = torch.autograd.grad(denoised, z, grad_outputs=basis, is_grads_batched=True)
            trace = torch.diagonal(jac_rows, dim1=0, dim2=2).sum(-1)  # sum_j dD_j/dz_j, (B,)
    return torch.cat([(z - denoised).detach(), (dim - trace).detach()[:, None]], dim=1)


def ode_log_likelihood(model: Callable, x: torch.Tensor, *, sigma_min: float = 1e-3, sigma_max: float = 80.0,
                       rtol: float = 1e-6, atol: float = 1e-6, terminal: Optional[Callable] = None,
                       data_mean: float = 0.0, data_std: float = 1.0, max_dim: int = 64,
                       max_steps: int = 10000, trace: str = "exact", probes: int = 1,
                       probe: str = "rademacher", seed: int = 0) -> torch.Tensor:
    """Probability-flow-ODE estimate of ``ln p_{sigma_min}(x_b)``, (B,) float64 on the CPU.

    Integrates ``dz/ds = z - D(z, e^s)`` and ``d(logdet)/ds = d - tr(dD/dz)`` (the divergence of the
    velocity) from ``s = ln sigma_min`` (z = x) to ``ln sigma_max`` in float64 with the adaptive
    Dormand-Prince 5(4) method (one step size for the batch; error per component below
    ``atol + rtol*|u|``), then ``ln p(x) = ln p_{sigma_max}(z_T) + logdet``. Points between modes make
    the ODE stiff around sigma ~ their distance to the modes, hence the adaptive steps. The trace is
    exact (autograd), so ``model`` must be differentiable in float64 and the dimension at most ``max_dim``.
    ``terminal``: ``log_p(z, sigma) -> (B,)``; None: the Gaussian ``N(data_mean, sigma_max^2 + data_std^2)``,
    evaluated at the one end point z_T, whose bias shrinks only like 1/sigma_max for a wrong data_mean (0.067,
    0.018, 0.0047 nats at sigma_max = 20, 80, 320), not like the 1/sigma_max^2 of :func:`log_likelihood`'s
    closed form, which averages over the noise.

    ``trace="hutchinson"`` replaces the exact divergence by Hutchinson's estimate ``mean_k eps_k^T (dD/dz) eps_k``
    over ``probes`` vectors per point (``probe``: "rademacher" entries +-1 or "gaussian" N(0, 1)), drawn once per
    call from ``seed`` and fixed for the whole solve, one VJP each per evaluation instead of d: ``max_dim`` does
    not apply, so images work (the model still runs in float64). The step control still covers z and the
    logdet. Since the logdet is linear in the trace and the path z(s) does not depend on the probes, the
    estimate of ``ln p`` (and of the bpd, linear in it) is unbiased up to the solver's error (controlled by
    rtol/atol; exp of it, p itself, is not). Its variance over seeds is that of ``eps^T M eps`` with
    ``M = int dD/dz ds`` along the path, divided by ``probes``: ``2*||S||_F^2`` for Gaussian probes and
    ``2*(||S||_F^2 - sum_i S_ii^2)`` for Rademacher (``S = (M + M^T)/2``; never larger, zero for a diagonal
    Jacobian), so prefer Rademacher. Use "exact" up to a few dozen dimensions (deterministic, d VJPs per
    evaluation in one batched pass), "hutchinson" above, averaging points, seeds or probes until the standard
    error (the spread over seeds over sqrt(seeds)) is small enough. Rows of a batch get independent probes.
    """
    _check_points(model, x)
    check_trace_args(trace, probes, probe, seed)
    if torch.is_inference_mode_enabled():  # enable_grad cannot undo it: autograd would fail in the first step
        raise RuntimeError("ode_log_likelihood: the divergence needs autograd, which torch.inference_mode "
                           "disables; call it outside inference_mode (torch.no_grad is fine)")
    sigma_min, sigma_max = _check_range(sigma_min, sigma_max)
    for name, v in (("rtol", rtol), ("atol", atol)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not v > 0:
            raise ValueError(f"{name}: expected a float > 0, got {v!r}")
    rtol, atol, probes, seed = float(rtol), float(atol), int(probes), int(seed)  # numpy scalars as Python's
    # data_mean/data_std are not checked here (a tensor mean broadcasts); numpy scalars only are read as floats
    data_mean, data_std = (float(v) if isinstance(v, numbers.Real) else v for v in (data_mean, data_std))
    max_steps = _check_int(max_steps, "max_steps", 1)
    dim = math.prod(x.shape[1:])  # not reshape(B, -1): that fails for an empty batch
    if trace == "exact" and dim > max_dim:
        raise ValueError(f"x: the exact-divergence ODE estimate handles at most {max_dim} dimensions, got "
                         f"{dim}; use trace=\"hutchinson\" or log_likelihood for high-dimensional points")
    if x.shape[0] == 0:
        return torch.empty(0, dtype=torch.float64)
    z0 = x.detach().reshape(x.shape[0], dim).to(torch.float64)
    shape = (x.shape[0], *x.shape[1:])
    u = torch.cat([z0, torch.zeros(x.shape[0], 1, dtype=torch.float64, device=z0.device)], dim=1)
    s, s_end = math.log(sigma_min), math.log(sigma_max)
    h = (s_end - s) / 100
    eps = draw_probes(probes, x.shape[0], dim, probe, seed, z0.device) if trace == "hutchinson" else None
    try:
        k_first = _ode_field(model, shape, u, s, eps)
    except Exception as exc:  # typically a float32 network's matmul refusing float64 input
        exc.add_note("ode_log_likelihood calls the model on float64 inputs (x and sigma, for the divergence): "
                     "a float32 network needs model.double()")
        raise
    attempts = 0  # accepted and rejected steps; a run that ends on the last allowed step has converged
    while s < s_end:
        if attempts == max_steps:
            raise RuntimeError(f"ode_log_likelihood: no convergence in max_steps={max_steps} steps")
        attempts += 1
        h = min(h, s_end - s)
        ks = [k_first]
        for i in range(1, 7):
            ui = u + h * sum(a * k for a, k in zip(_DP_A[i], ks) if a != 0.0)
            ks.append(_ode_field(model, shape, ui, s + _DP_C[i] * h, eps))
        u_new = ui  # stage 7 is evaluated at the 5th-order solution
        err = h * sum(e * k for e, k in zip(_DP_E, ks) if e != 0.0)
        ratio = float((err.abs() / (atol + rtol * torch.maximum(u.abs(), u_new.abs()))).max())
        if math.isnan(ratio):  # else every step is rejected and the loop ends in a misleading "no convergence"
            raise FloatingPointError(f"model: the ODE state turned NaN at sigma = {math.exp(s):.6g} (x finite? "
                                     f"the denoiser's output finite there?)")
        if ratio <= 1.0:
            s, u, k_first = s + h, u_new, ks[6]
        h = h * min(5.0, max(0.2, 0.9 * ratio ** -0.2)) if ratio > 0 else h * 5.0
    z_t = u[:, :dim]
    if terminal is None:
        log_p_t = _gaussian_log_prob(z_t, sigma_max, data_mean, data_std)
    else:
        log_p_t = terminal(z_t.reshape(shape), sigma_max).to(torch.float64).reshape(-1)
    return (log_p_t + u[:, dim]).cpu()
