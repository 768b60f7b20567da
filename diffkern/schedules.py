"""Noise schedules and coordinate conversions, built in float64 on the CPU.

Every sigma schedule is a decreasing float64 CPU tensor of length ``n + 1`` for ``n`` steps, in VE
coordinates (``x = x0 + sigma*eps``); samplers mirror it once to a device table. VP (DDPM) tables follow
diffusers' definitions (``DDIMScheduler``/``EulerDiscreteScheduler``) but are computed in float64; to
reproduce a diffusers run bit-for-bit pass that scheduler's own ``alphas_cumprod`` to :func:`vp_sigmas`.

Conventions (``math-samplers.md`` section 0): ``sigma = sqrt((1 - alpha_bar)/alpha_bar)``;
IADB ``alpha = 1/(1 + sigma)``; rectified-flow time ``t = sigma/(1 + sigma)``.
"""
from __future__ import annotations

import math
import numbers
from typing import Union

import torch

from .sigma_checks import check_real, check_sigmas, distinct  # noqa: F401 (check_sigmas: public here)

Number = Union[float, torch.Tensor]
SPACINGS = ("leading", "trailing", "linspace")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
F64 = torch.float64


def _check_int(value, name: str, minimum: int) -> int:
    # numbers.Integral admits numpy ints (np.arange, sweeps); returned as a Python int, so the callers' arithmetic
    # is Python's (no int64 wrap-around)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return int(value)


def _check_positive(value, name: str) -> float:
    # A one-element real tensor is read as its value: k-diffusion-style wrappers keep sigma_min/sigma_max as
    # 0-d tensors (``karras(n, model.sigma_min, model.sigma_max)``); numbers.Real admits numpy scalars.
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex() \
            and value.dtype != torch.bool and not value.is_meta:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return float(value)


def _sigma_range(sigma_min, sigma_max, who: str) -> tuple[float, float]:
    lo = _check_positive(sigma_min, f"{who}: sigma_min")
    hi = _check_positive(sigma_max, f"{who}: sigma_max")
    if lo > hi:
        raise ValueError(f"{who}: sigma_min ({lo}) must be <= sigma_max ({hi})")
    return lo, hi


def _too_close(lo: float, hi: float, n: int) -> str:
    """Why n values on [lo, hi] repeat in float64: the hint of a builder's :func:`distinct` error."""
    if lo == hi:
        return "sigma_min == sigma_max: n >= 2 values cannot decrease"
    return f"n = {n} is too large for the range"


def _append_zero(s: torch.Tensor) -> torch.Tensor:
    return torch.cat([s, s.new_zeros(1)])


def host_float64(value, name: str) -> torch.Tensor:
    """float64 CPU copy of a tensor (any device, shape and dtype), array or (nested) sequence of numbers; a
    sequence of Python floats is read as float64 (``torch.as_tensor`` alone would round it through the float32
    default dtype). ``name``: the argument, for the TypeError raised on anything else."""
    check_real(value, name)
    if isinstance(value, torch.Tensor):
        if value.is_meta:  # a meta tensor has a shape but no values to read
            raise ValueError(f"{name}: expected a tensor with values, got a tensor on the meta device")
        return value.detach().to("cpu", F64)
    try:
        return torch.as_tensor(value, dtype=F64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name}: expected a tensor or a sequence of numbers, got {type(value).__name__}") from exc

#----------------------------------------------------------------------------
# VE sigma schedules (k-diffusion conventions: n sigmas then 0).


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) polynomial schedule: ``(max^(1/rho) + i/(n-1)*(min^(1/rho) - max^(1/rho)))^rho``
    for i = 0..n-1, then 0 (as k-diffusion's ``get_sigmas_karras``). Returns (n+1,) float64 CPU."""
    n = _check_int(n, "karras: n", 1)
    lo, hi = _sigma_range(sigma_min, sigma_max, "karras")
    rho = _check_positive(rho, "karras: rho")
    # sigma^(1/rho) must stay a normal float64: a tiny rho overflows it (OverflowError) or flushes
    # sigma_min^(1/rho) to 0, which would end the schedule at 0 instead of sigma_min
    if max(math.log(hi), -math.log(lo)) / rho > 700:
        raise ValueError(f"karras: rho: {rho!r} is too small for sigma range [{lo}, {hi}]: sigma**(1/rho) leaves "
                         f"float64's range (need rho >= {max(math.log(hi), -math.log(lo)) / 700:.3g})")
    ramp = torch.linspace(0, 1, n, dtype=F64)
    inv_hi, inv_lo = hi ** (1 / rho), lo ** (1 / rho)
    # the weighted sum of two positive terms, not k-diffusion's max + ramp*(min - max): that form cancels near
    # ramp = 1 when min^(1/rho) << max^(1/rho) (small rho), e.g. 5.6e-8 relative at sigma_min for rho = 0.5 on
    # [0.002, 80], and the cancellation is then raised to the power rho
    return _append_zero(distinct(((1 - ramp) * inv_hi + ramp * inv_lo) ** rho, "karras", _too_close(lo, hi, n)))


def edm(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """:func:`karras` with the EDM paper's defaults (0.002, 80, rho=7). Returns (n+1,) float64 CPU."""
    return karras(n, sigma_min, sigma_max, rho)


def loglinear(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Geometric (log-linear) schedule from sigma_max to sigma_min in n values, then 0 (k-diffusion's
    ``get_sigmas_exponential``). Returns (n+1,) float64 CPU."""
    n = _check_int(n, "loglinear: n", 1)
    lo, hi = _sigma_range(sigma_min, sigma_max, "loglinear")
    return _append_zero(distinct(torch.linspace(math.log(hi), math.log(lo), n, dtype=F64).exp(), "loglinear",
                                 _too_close(lo, hi, n)))


def polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    """Polynomial in log sigma: ``exp(ramp^rho * (ln max - ln min) + ln min)``, ramp from 1 to 0 over n values,
    then 0 (k-diffusion's ``get_sigmas_polyexponential``; rho = 1 is :func:`loglinear`). (n+1,) float64 CPU."""
    n = _check_int(n, "polyexponential: n", 1)
    lo, hi = _sigma_range(sigma_min, sigma_max, "polyexponential")
    rho = _check_positive(rho, "polyexponential: rho")
    ramp = torch.linspace(1, 0, n, dtype=F64) ** rho
    # k-diffusion's exp(ramp*(ln max - ln min) + ln min) as min*exp(ramp*(ln max - ln min)): the same to 2 ulp, it
    # ends at sigma_min exactly and resolves steps of 1e-16 relative near it (the sum rounds ln min to 4e-16 at
    # sigma_min = 0.002). Steps below that (a large rho flattens ramp**rho near 0) are refused, not rounded apart.
    hint = _too_close(lo, hi, n) if lo == hi else f"rho = {rho:g} is too large for n = {n}: use a smaller rho"
    return _append_zero(distinct(lo * torch.exp(ramp * (math.log(hi) - math.log(lo))), "polyexponential", hint))


def vp(n: int, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3) -> torch.Tensor:
    """The continuous VP SDE's sigmas ``sqrt(exp(beta_d t^2/2 + beta_min t) - 1)`` at t from 1 to eps_s over n
    values, then 0 (k-diffusion's ``get_sigmas_vp``, Song et al.'s defaults). (n+1,) float64 CPU."""
    n = _check_int(n, "vp: n", 1)
    beta_d, eps_s = _check_positive(beta_d, "vp: beta_d"), _check_positive(eps_s, "vp: eps_s")
    if isinstance(beta_min, bool) or not isinstance(beta_min, numbers.Real) or not 0 <= beta_min < math.inf:
        raise ValueError(f"vp: beta_min: expected a finite number >= 0, got {beta_min!r}")
    beta_min = float(beta_min)  # a numpy float32 would otherwise run the arithmetic below in float32
    if not eps_s < 1:
        raise ValueError(f"vp: eps_s: expected 0 < eps_s < 1, got {eps_s!r}")
    t = torch.linspace(1, eps_s, n, dtype=F64)
    return _append_zero(distinct(torch.expm1(beta_d * t ** 2 / 2 + beta_min * t).sqrt(), "vp",
                                 f"n = {n} is too large for t in [{eps_s:g}, 1]"))


def sample_sigmas(train_sigmas, steps: int) -> torch.Tensor:
    """smalldiffusion's ``Schedule.sample_sigmas``: "trailing" subsampling of an increasing table of N training
    sigmas, ``idx_k = round(N*(1 - k/steps)) - 1`` for k < steps, then index 0. The schedule ends at
    ``train_sigmas[0]``, not 0. train_sigmas: (N,) increasing; returns (steps+1,) float64 CPU.
    For steps above about 2N/3 the last index is already 0, so the last two values repeat (as smalldiffusion's,
    whose loop then takes a zero-length step); :func:`diffkern.sample` runs it with the samplers of
    :data:`diffkern.sampler_compat.REPEATS_OK` (the one-step ones, ``ge`` among them, and the multistep ``ipndm`` and
    ``plms``) and refuses it for the others."""
    table = host_float64(train_sigmas, "train_sigmas")
    if table.dim() != 1 or table.numel() == 0:
        raise ValueError(f"sample_sigmas: train_sigmas must be a non-empty 1-D table, got shape {tuple(table.shape)}")
    # a decreasing table would come back as an increasing "schedule"
    if not torch.isfinite(table).all() or (table < 0).any() or (table[1:] < table[:-1]).any():
        raise ValueError("sample_sigmas: train_sigmas must be finite, >= 0 and increasing (smalldiffusion's order)")
    steps = _check_int(steps, "sample_sigmas: steps", 1)
    n = table.numel()
    if steps > n:
        raise ValueError(f"sample_sigmas: steps ({steps}) must be <= len(train_sigmas) ({n})")
    idx = torch.round(n * (1 - torch.arange(steps, dtype=F64) / steps)).long() - 1
    return table[torch.cat([idx, idx.new_zeros(1)])]

#----------------------------------------------------------------------------
# VP (DDPM) tables, diffusers definitions.


def betas(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
          schedule: str = "linear", max_beta: float = 0.999) -> torch.Tensor:
    """diffusers' beta schedules in float64: "linear" (linspace), "scaled_linear" (linspace of sqrt, squared;
    Stable Diffusion uses 0.00085..0.012), "squaredcos_cap_v2" (Nichol & Dhariwal cosine, capped at
    ``max_beta``; ignores beta_start/beta_end). Returns (num_train_timesteps,) float64 CPU."""
    T = _check_int(num_train_timesteps, "betas: num_train_timesteps", 1)
    # betas must lie in [0, 1) (alphas_cumprod's domain); checked here so that a bad endpoint is named,
    # not reported later as a complex sqrt or a torch.linspace signature error
    used = {"max_beta": max_beta} if schedule == "squaredcos_cap_v2" else {"beta_start": beta_start,
                                                                           "beta_end": beta_end}
    for name, value in used.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1 \
                or (name == "max_beta" and value == 0):
            raise ValueError(f"betas: {name}: expected a number in {'(0' if name == 'max_beta' else '[0'}, 1), "
                             f"got {value!r}")
        used[name] = float(value)  # numpy scalars as Python floats (np.float32 ** 0.5 would stay float32)
    if schedule == "linear":
        return torch.linspace(used["beta_start"], used["beta_end"], T, dtype=F64)
    if schedule == "scaled_linear":
        return torch.linspace(used["beta_start"] ** 0.5, used["beta_end"] ** 0.5, T, dtype=F64) ** 2
    if schedule == "squaredcos_cap_v2":
        t = torch.arange(T + 1, dtype=F64) / T
        ab = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.clamp(1 - ab[1:] / ab[:-1], max=used["max_beta"])
    raise ValueError(f"betas: unknown schedule {schedule!r}; expected one of {BETA_SCHEDULES}")


def alphas_cumprod(beta: torch.Tensor) -> torch.Tensor:
    """``alpha_bar[t] = prod_{s<=t} (1 - beta[s])``. beta: (T,) with values in [0, 1); returns (T,) float64 CPU."""
    b = host_float64(beta, "beta")
    if b.dim() != 1 or b.numel() == 0:
        raise ValueError(f"alphas_cumprod: betas must be a non-empty 1-D tensor, got shape {tuple(b.shape)}")
    if not torch.isfinite(b).all() or (b < 0).any() or (b >= 1).any():
        raise ValueError("alphas_cumprod: betas must be finite and in [0, 1)")
    return torch.cumprod(1 - b, dim=0)


def timesteps(num_inference_steps: int, num_train_timesteps: int = 1000, spacing: str = "leading",
              steps_offset: int = 0) -> torch.Tensor:
    """Decreasing integer timesteps as ``DDIMScheduler.set_timesteps`` makes them (Table 2 of arXiv
    2305.08891): "leading" ``arange(N)*(T//N) + steps_offset``, reversed; "trailing" ``round(T - k*T/N) - 1`` (N values
    even where diffusers' float ``arange`` yields N+1);
    "linspace" ``round(linspace(0, T-1, N))``, reversed (ties round half to even, as numpy).
    ``steps_offset`` applies to "leading" only, as in diffusers. Returns (N,) int64 CPU."""
    N = _check_int(num_inference_steps, "timesteps: num_inference_steps", 1)
    T = _check_int(num_train_timesteps, "timesteps: num_train_timesteps", 1)
    steps_offset = _check_int(steps_offset, "timesteps: steps_offset", 0)
    if N > T:
        raise ValueError(f"timesteps: num_inference_steps ({N}) must be <= num_train_timesteps ({T})")
    k = torch.arange(N, dtype=F64)
    if spacing == "leading":
        t = (k * (T // N)).flip(0) + steps_offset
        if t[0] >= T:
            raise ValueError(f"timesteps: steps_offset {steps_offset} pushes the first timestep past {T - 1}")
    elif spacing == "trailing":
        # numpy's arange(T, 0, -T/N) evaluates T + k*((T - T/N) - T); the same rounding picks the same ties
        t = torch.round(T + k * ((T - T / N) - T)) - 1
    elif spacing == "linspace":
        # numpy's linspace (k*step, exact end point): torch.linspace computes its upper half from the end point,
        # which can land on the other side of a .5 tie (499.50000000000006 for N = 27, T = 1000 -> 500, not 499)
        t = k * ((T - 1) / max(N - 1, 1))
        if N > 1:
            t[-1] = T - 1
        t = torch.round(t).flip(0)
    else:
        raise ValueError(f"timesteps: unknown spacing {spacing!r}; expected one of {SPACINGS}")
    return t.long()


def vp_sigmas(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, final: str = "zero") -> torch.Tensor:
    """VE sigmas ``sqrt((1 - ab[t])/ab[t])`` at decreasing integer ``timesteps``, plus a final sigma:

    - ``final="zero"``: 0, i.e. diffusers' ``set_alpha_to_one=True`` (DDIM) / ``final_sigmas_type="zero"``
      (Euler), the k-diffusion convention: the last step jumps to the denoised estimate.
    - ``final="sigma_min"``: ``sigma(0)``, i.e. ``set_alpha_to_one=False`` / ``final_sigmas_type="sigma_min"``.

    Matches a diffusers ``DDIMScheduler`` run step for step when consecutive timesteps differ by T//N (always for
    "leading", for "trailing" when N divides T): DDIM steps from t to ``t - T//N`` whatever the spacing.
    alphas_cumprod: (T,) any float dtype (float32 diffusers tables are converted exactly); timesteps: (N,) ints
    in [0, T). Returns (N+1,) float64 CPU.
    """
    ab = host_float64(alphas_cumprod, "alphas_cumprod")
    ts = torch.as_tensor(timesteps).detach().to("cpu")
    if ab.dim() != 1 or ab.numel() == 0 or not ((ab > 0) & (ab <= 1)).all():
        raise ValueError("vp_sigmas: alphas_cumprod must be a non-empty 1-D tensor with values in (0, 1]")
    # bool is refused too: a bool tensor would index as a mask, silently selecting entries
    if ts.dim() != 1 or ts.numel() == 0 or ts.is_floating_point() or ts.is_complex() or ts.dtype == torch.bool:
        raise ValueError(f"vp_sigmas: timesteps must be a non-empty 1-D integer tensor, "
                         f"got {ts.dtype} {tuple(ts.shape)}")
    if (ts < 0).any() or (ts >= ab.numel()).any():
        raise ValueError(f"vp_sigmas: timesteps must lie in [0, {ab.numel()})")
    sig = alpha_bar_to_sigma(ab[ts])
    if final == "zero":
        last = sig.new_zeros(1)
    elif final == "sigma_min":
        last = alpha_bar_to_sigma(ab[:1])
    else:
        raise ValueError(f"vp_sigmas: final must be 'zero' or 'sigma_min', got {final!r}")
    return torch.cat([sig, last])


def ge_schedule(n: int, alphas_cumprod: torch.Tensor, start: float = 8.35, end: float = 0.02,
                style: str = "linear", factor: float = 0.0, return_timesteps: bool = False):
    """Permenter & Yuan's schedule as ``GEScheduler.set_timesteps`` builds it (``math-samplers.md`` 2.5).

    Sigma values are snapped to DDPM timesteps with ``t = searchsorted(sigma_table, s)`` (first t with
    sigma(t) >= s up to 1e-12 relative, clamped to T-1). Styles:
    - "linear" (the paper's): n sigmas geometric from ``start`` to ``exp(factor*log sigma(t(end)) +
      (1-factor)*log sigma(T//n))``, snapped, then t = 0: the last step goes to sigma(0), not 0.
    - "ddim": ``linspace(t(start), t(end), n+1)`` truncated to integers.
    - "edm": n+1 Karras (rho=7) sigmas from start to end, snapped.
    With large n the snapped timesteps can repeat (zero-length steps), as in the original.
    Returns (n+1,) float64 CPU sigmas, and the (n+1,) int64 timesteps when ``return_timesteps``.
    """
    n = _check_int(n, "ge_schedule: n", 1)
    lo, hi = _sigma_range(end, start, "ge_schedule (end, start)")
    if not 0 <= factor <= 1:
        raise ValueError(f"ge_schedule: factor must lie in [0, 1], got {factor}")
    if isinstance(factor, numbers.Real):  # a numpy float32 would otherwise round end_sigma's arithmetic to float32
        factor = float(factor)
    ab = host_float64(alphas_cumprod, "alphas_cumprod")
    if ab.dim() != 1 or ab.numel() < 2 or not ((ab > 0) & (ab <= 1)).all():
        raise ValueError("ge_schedule: alphas_cumprod must be a 1-D tensor of length >= 2 with values in (0, 1]")
    T = ab.numel()
    if n > T:
        raise ValueError(f"ge_schedule: n ({n}) must be <= len(alphas_cumprod) ({T})")
    table = alpha_bar_to_sigma(ab)

    def snap(s: torch.Tensor) -> torch.Tensor:
        # 1e-12 relative slack so that exp(log(sigma(t))) snaps to t, not t+1, whatever the rounding
        return torch.searchsorted(table, s * (1 - 1e-12)).clamp(max=T - 1)

    if style == "linear":
        end_sigma = math.exp(factor * math.log(table[snap(torch.tensor([lo], dtype=F64))].item())
                             + (1 - factor) * math.log(table[min(T // n, T - 1)].item()))
        geo = torch.linspace(math.log(hi), math.log(end_sigma), n, dtype=F64).exp()
        ts = torch.cat([snap(geo), torch.zeros(1, dtype=torch.long)])
    elif style == "ddim":
        t_start, t_end = snap(torch.tensor([hi, lo], dtype=F64)).tolist()
        # numpy's linspace (start + i*step, exact end point), then truncation, as the original
        grid = t_start + torch.arange(n + 1, dtype=F64) * ((t_end - t_start) / n)
        grid[-1] = t_end
        ts = grid.long()
    elif style == "edm":
        ts = snap(karras(n + 1, lo, hi)[:-1])
    else:
        raise ValueError(f"ge_schedule: unknown style {style!r}; expected 'linear', 'ddim' or 'edm'")
    sig = table[ts]
    return (sig, ts) if return_timesteps else sig

#----------------------------------------------------------------------------
# IADB.


def iadb_alphas(n: int) -> torch.Tensor:
    """Uniform IADB blending parameters ``alpha_k = k/n``, k = 0..n (alpha = 0 is pure noise, 1 is data).
    Returns (n+1,) float64 CPU, increasing."""
    n = _check_int(n, "iadb_alphas: n", 1)
    return torch.arange(n + 1, dtype=F64) / n

#----------------------------------------------------------------------------
# Conversions: a float in gives a float out; a tensor in gives a tensor (same dtype and device) out.


def _map(fn, value: Number, name: str, hi: float = math.inf) -> Number:
    # a number is range-checked against the map's domain [0, hi]; a tensor is not (its values may live on a device)
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy scalars too
        raise TypeError(f"{name}: expected a float or a tensor, got {type(value).__name__}")
    if not 0 <= value <= hi:
        raise ValueError(f"{name}: expected a number in [0, {hi}], got {value!r}")
    return float(fn(torch.tensor(float(value), dtype=F64)))


def sigma_to_alpha_bar(sigma: Number) -> Number:
    """``alpha_bar = 1/(1 + sigma^2)`` (VE -> VP)."""
    return _map(lambda s: 1 / (1 + s * s), sigma, "sigma_to_alpha_bar")


def alpha_bar_to_sigma(alpha_bar: Number) -> Number:
    """``sigma = sqrt((1 - alpha_bar)/alpha_bar)`` (VP -> VE; inf at alpha_bar = 0)."""
    return _map(lambda a: ((1 - a) / a).sqrt(), alpha_bar, "alpha_bar_to_sigma", 1.0)


def sigma_to_iadb_alpha(sigma: Number) -> Number:
    """IADB blending parameter ``alpha = 1/(1 + sigma)`` (``x_alpha = alpha * x_VE``)."""
    return _map(lambda s: 1 / (1 + s), sigma, "sigma_to_iadb_alpha")


def iadb_alpha_to_sigma(alpha: Number) -> Number:
    """``sigma = (1 - alpha)/alpha`` (inf at alpha = 0, 0 at alpha = 1)."""
    return _map(lambda a: (1 - a) / a, alpha, "iadb_alpha_to_sigma", 1.0)


def sigma_to_flow_t(sigma: Number) -> Number:
    """Rectified-flow time ``t = sigma/(1 + sigma)`` (``x_t = (1-t)*data + t*noise = (1-t)*x_VE``; 1 at sigma = inf,
    the inverse of :func:`flow_t_to_sigma` at t = 1)."""
    return _map(lambda s: torch.where(torch.isposinf(s), torch.ones_like(s), s / (1 + s)), sigma, "sigma_to_flow_t")


def flow_t_to_sigma(t: Number) -> Number:
    """``sigma = t/(1 - t)`` (inf at t = 1)."""
    return _map(lambda u: u / (1 - u), t, "flow_t_to_sigma", 1.0)
