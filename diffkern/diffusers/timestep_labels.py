"""diffusers' own ``timesteps`` values, bit for bit, for the drop-ins whose timesteps come from sigmas.

A timestep is the label the network and the lookups (``index_for_timestep``, ``add_noise``, ``step``'s check) see.
diffusers derives the fractional ones (Karras/exponential/beta schedules, KDPM2's midpoints) from its float32
training table through float64 and float32 numpy/torch arithmetic, so a float64 derivation from diffkern's float64
table lands 1 to a few hundred float32 ulp away, and a rounded one can land on the neighbouring integer. A user who
passes diffusers' timesteps to ours (or a pipeline that takes them from another scheduler) would then miss. The
functions here repeat diffusers' arithmetic, with its dtypes and its order of operations, for the labels only: the
coefficient tables keep coming from diffkern's float64 sigmas.

Bitwise equality also depends on which log kernel runs: diffusers passes one sigma at a time to ``np.log`` (numpy's
kernel even for a tensor, whose result numpy wraps back into one), where torch's log can differ in the last bit, so
:func:`sigma_to_t` does the same.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .. import schedules
from . import scheduler_utils
from .config_checks import rescale_zero_terminal_snr


def alphas_cumprod32(sched) -> torch.Tensor | None:
    """diffusers' float32 ``alphas_cumprod`` (T,) for ``sched``'s config (a DDPM-family drop-in with float64
    ``betas``), or None for a beta schedule this module does not repeat (callers then keep their float64 labels)."""
    cfg = sched.config
    T = cfg.num_train_timesteps
    if cfg.get("trained_betas") is not None:
        betas = torch.tensor(np.asarray(cfg.trained_betas, dtype=np.float64), dtype=torch.float32)
    elif cfg.beta_schedule == "squaredcos_cap_v2":  # diffusers evaluates the cosine in Python floats, then rounds
        betas = schedules.betas(T, cfg.beta_start, cfg.beta_end, cfg.beta_schedule).to(torch.float32)
    elif cfg.beta_schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float32)
    elif cfg.beta_schedule == "scaled_linear":
        betas = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, T, dtype=torch.float32) ** 2
    else:
        return None
    zero_snr = cfg.get("rescale_betas_zero_snr", False)
    if zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    ab = torch.cumprod(1.0 - betas, dim=0)
    if zero_snr:
        floor = getattr(sched, "_zero_snr_floor", None)
        if floor is None:  # a class that keeps alpha-bar's 0: its sigma table is infinite there, no labels
            return None
        ab[-1] = floor
    return ab


def train_sigmas32(ab32: torch.Tensor) -> np.ndarray:
    """diffusers' float32 training sigmas ``sqrt((1 - ab)/ab)`` (T,), increasing with t, as a numpy array."""
    return np.array(((1 - ab32) / ab32) ** 0.5)


def spacing32(cfg, n: int) -> np.ndarray:
    """The K-schedulers' (Euler, Heun, LMS, KDPM2) float32 timesteps of ``n`` steps before any sigma conversion;
    "trailing" may give n + 1 of them (its float ``arange`` overshoots), whose last one only sets sigma_min."""
    T = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    if cfg.timestep_spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].astype(np.float32) + cfg.steps_offset
    return np.arange(T, 0, -T / n).round().astype(np.float32) - 1


def convert(kind: str, n: int, lo: float, hi: float) -> np.ndarray:
    """diffusers' ``_convert_to_karras`` / ``_convert_to_exponential`` / ``_convert_to_beta``: ``n`` float64 sigmas
    from ``hi`` down to ``lo``, with its formulas (Karras' rho = 7, beta's alpha = beta = 0.6)."""
    ramp = np.linspace(0, 1, n)
    if kind == "karras":
        lo_r, hi_r = lo ** (1 / 7.0), hi ** (1 / 7.0)
        return (hi_r + ramp * (lo_r - hi_r)) ** 7.0
    if kind == "exponential":
        return np.exp(np.linspace(math.log(hi), math.log(lo), n))
    import scipy.stats  # only beta sigmas need scipy (diffusers requires it there too)
    return np.array([lo + p * (hi - lo) for p in (scipy.stats.beta.ppf(u, 0.6, 0.6) for u in 1 - ramp)])


def sigma_to_t(sigmas, log_table):
    """diffusers' ``_sigma_to_t`` of each sigma (n,) against ``log_table`` (T,): float64 numpy for float64 numpy
    sigmas and a float32 numpy table, float32 torch for float32 torch sigmas and table (KDPM2's midpoints). The
    interval starts at the last table entry at or below log(sigma) (before T - 2); the weight is clipped to [0, 1].

    The log is numpy's, one value at a time, even for tensors (diffusers passes each one to ``np.log``, which
    computes in numpy and wraps the result back into a tensor); the arithmetic after it is exactly rounded, but in
    torch for tensors, where float32 times int64 stays float32 (numpy would widen it to float64)."""
    as_torch = isinstance(sigmas, torch.Tensor)
    s = sigmas.numpy() if as_torch else np.asarray(sigmas)
    log_s = np.concatenate([np.log(np.maximum(s[i:i + 1], 1e-10)) for i in range(len(s))]) if len(s) else s
    return scheduler_utils.interpolate_t(torch.from_numpy(log_s) if as_torch else log_s, log_table)


def k_timesteps(sched, n: int, kind: str, lo_cfg=None, hi_cfg=None) -> np.ndarray | None:
    """The float64 timesteps (n,) of a K-scheduler's (Euler, Heun, LMS, KDPM2) ``kind`` sigmas ("karras",
    "exponential", "beta") as diffusers computes them (before its rounding or float32 cast): converted between the
    config's bounds ``lo_cfg``/``hi_cfg`` where given, else the ends of the spacing's float32-table sigmas. None where
    :func:`alphas_cumprod32` cannot repeat the training table."""
    sig = k_sigmas(sched, n, kind, lo_cfg, hi_cfg)
    return None if sig is None else sigma_to_t(sig, np.log(train_sigmas32(alphas_cumprod32(sched))))


def k_sigmas(sched, n: int, kind: str | None, lo_cfg=None, hi_cfg=None) -> np.ndarray | None:
    """diffusers' float64 sigmas (n,) of a K-scheduler before its float32 cast (``kind`` None: the spacing's,
    interpolated in the float32 table); None as :func:`k_timesteps`."""
    ab32 = alphas_cumprod32(sched)
    if ab32 is None:
        return None
    table = train_sigmas32(ab32)
    ts = spacing32(sched.config, n)
    sig = np.interp(ts, np.arange(len(table)), table)
    if kind is None:
        return sig
    lo = lo_cfg if lo_cfg is not None else sig[-1].item()
    hi = hi_cfg if hi_cfg is not None else sig[0].item()
    return convert(kind, n, lo, hi)


def kdpm2_midpoint_timesteps(sched, n: int, kind: str | None, lo_cfg=None, hi_cfg=None,
                             ancestral: bool = False) -> torch.Tensor | None:
    """KDPM2's (``ancestral``: KDPM2-ancestral's) n - 1 midpoint timesteps as diffusers computes them: the float32
    log-midpoint of its float32 sigmas and their predecessor (ancestral: the step's sigma_down), mapped through the
    float32 log table in float32 (float32 tensor). None as :func:`k_timesteps`."""
    sig = k_sigmas(sched, n, kind, lo_cfg, hi_cfg)
    if sig is None:
        return None
    s = torch.from_numpy(np.concatenate([sig, [0.0]]).astype(np.float32))
    if ancestral:
        nxt = s.roll(-1)
        nxt[-1] = 0.0
        up = (nxt ** 2 * (s ** 2 - nxt ** 2) / s ** 2) ** 0.5
        down = (nxt ** 2 - up ** 2) ** 0.5
        down[-1] = 0.0
        mids = s.log().lerp(down.log(), 0.5).exp()[:-2]
    else:
        mids = s.log().lerp(s.roll(1).log(), 0.5).exp()[1:-1]
    log_table = torch.from_numpy(np.log(train_sigmas32(alphas_cumprod32(sched))))
    return sigma_to_t(mids, log_table)


def dpmsolver_sde_timesteps(sched, n: int, kind: str | None, lo_cfg=None, hi_cfg=None) -> torch.Tensor | None:
    """DPMSolverSDE's 2n - 1 timesteps ``[t_0, tm_0, t_1, ..., tm_{n-2}, t_{n-1}]`` (float64) as diffusers computes
    them: its spacing in float64 (the other K-schedulers' is float32), sigmas interpolated in the float32 table,
    converted for ``kind`` ("karras" between the schedule's own ends, "exponential" between the config's bounds where
    set), the midpoints ``exp(-(t + diff(t)/2))`` of ``t = -log(sigma)`` in float64 numpy, each mapped through the
    float32 log table. None as :func:`k_timesteps`, or where the spacing does not give n values."""
    ab32 = alphas_cumprod32(sched)
    if ab32 is None:
        return None
    cfg, T = sched.config, sched.config.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        ts = np.linspace(0, T - 1, n, dtype=float)[::-1].copy()
    elif cfg.timestep_spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(float) + cfg.steps_offset
    else:
        ts = np.arange(T, 0, -T / n).round().copy().astype(float) - 1
    if len(ts) != n:
        return None
    table = train_sigmas32(ab32)
    log_table = np.log(table)
    sig = np.interp(ts, np.arange(len(table)), table)
    if kind is not None:
        lo = lo_cfg if lo_cfg is not None and kind == "exponential" else sig[-1].item()
        hi = hi_cfg if hi_cfg is not None and kind == "exponential" else sig[0].item()
        sig = convert(kind, n, lo, hi)
        ts = sigma_to_t(sig, log_table)
    t = -np.log(sig)
    mid_t = sigma_to_t(np.exp(-(t[:-1] + np.diff(t) * 0.5)), log_table)
    calls = np.empty(2 * n - 1)
    calls[0::2], calls[1::2] = ts, mid_t
    return torch.from_numpy(calls)


def dpm_fractional(sched, n: int, sig) -> torch.Tensor:
    """The fractional timesteps (n,) float64 of a DPM-family drop-in's (DPM-Solver multistep and singlestep, DEIS,
    UniPC, SA-Solver) Karras/exponential/beta sigmas as diffusers computes them, before its rounding or truncation:
    converted between the config's sigma_min/sigma_max where set, else the float32 table's ends. Where the table
    cannot be repeated: diffkern's float64 derivation from ``sig``, its own float64 sigmas (n,)."""
    cfg = sched.config
    kind = next((k for k in ("karras", "exponential", "beta") if cfg.get(f"use_{k}_sigmas", False)), None)
    ab32 = alphas_cumprod32(sched) if kind else None
    if ab32 is None:
        return scheduler_utils.sigma_to_t(sched.alphas_cumprod, torch.as_tensor(sig, dtype=torch.float64))
    table = train_sigmas32(ab32)
    lo, hi = cfg.get("sigma_min"), cfg.get("sigma_max")
    lo = table[0].item() if lo is None else lo
    hi = table[-1].item() if hi is None else hi
    return torch.from_numpy(sigma_to_t(convert(kind, n, lo, hi), np.log(table)))


def flow_bounds(num_train_timesteps: int, shift: float | None) -> tuple[float, float]:
    """diffusers' flow-matching ``(sigma_min, sigma_max)``: the ends of its float32 training schedule t/T, shifted
    by the config's ``shift`` (None: dynamic shifting, unshifted), as Python floats."""
    T = num_train_timesteps
    s = torch.tensor([float(T), 1.0]) / T
    if shift is not None:
        s = shift * s / (1 + (shift - 1) * s)
    return s[1].item(), s[0].item()
