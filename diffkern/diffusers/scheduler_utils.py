"""Module-level helpers of the fused drop-in schedulers (:mod:`diffkern.diffusers.schedulers`): host timestep
values, the sigma -> timestep map of a VP training table, matching a timestep to a schedule, VE rows rewritten for
scaled states, and NumPy scalar arguments as Python scalars."""
from __future__ import annotations

import functools
import math
from typing import Optional

import numpy as np
import torch

from ..ops import coefs


def host_value(timestep) -> Optional[float]:
    """The timestep as a float when reading it costs no device synchronisation (a number or a CPU
    scalar tensor), else None."""
    if isinstance(timestep, torch.Tensor):
        if timestep.device.type != "cpu" or timestep.numel() != 1:
            return None
        return timestep.item()  # a CPU tensor: a host read, no device synchronisation
    if isinstance(timestep, (int, float, np.integer, np.floating)) and not isinstance(timestep, bool):
        return float(timestep)
    return None


def _rounded(timestep, want: float, got: float) -> bool:
    """Whether ``timestep`` is a 16-bit float tensor holding ``want`` rounded to its dtype (DanceDiffusionPipeline
    casts the scheduler's timesteps to its UNet's dtype before its loop)."""
    return isinstance(timestep, torch.Tensor) and timestep.dtype in (torch.float16, torch.bfloat16) \
        and torch.tensor(want, dtype=timestep.dtype).item() == got


def sigma_to_t(alphas_cumprod: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Fractional training timestep of each sigma (n,): diffusers' ``_sigma_to_t`` (Karras/exponential schedules) on
    diffkern's float64 table. Its rule, kept exactly because tables need not be monotonic (zero terminal SNR floors
    the last alpha-bar at 2**-24, above its neighbour's): the interval starts at the last table entry whose log-sigma
    is <= log(sigma) (before T-2), and the weight is clipped to [0, 1]."""
    ab = alphas_cumprod.to(torch.float64)
    log_table = (((1 - ab) / ab) ** 0.5).log()  # (T,)
    return interpolate_t(sigma.to(torch.float64).clamp(min=1e-10).log(), log_table)


def interpolate_t(log_sigma, log_table):
    """The fractional timestep of each log-sigma (n,) in ``log_table`` (T,), both torch tensors or both numpy arrays
    (the arithmetic in their dtype): :func:`sigma_to_t`'s interval and clipped weight."""
    at_or_above = log_sigma[None, :] - log_table[:, None] >= 0  # (T, n)
    at_or_above = at_or_above.long() if isinstance(at_or_above, torch.Tensor) else at_or_above.astype(np.int64)
    low = at_or_above.cumsum(0).argmax(0).clip(max=len(log_table) - 2)
    lo, hi = log_table[low], log_table[low + 1]
    w = ((lo - log_sigma) / (lo - hi)).clip(0, 1)
    return (1 - w) * low + w * (low + 1)


def match_schedule(t: torch.Tensor, schedule: list, sigmas: list, fallback: torch.Tensor) -> torch.Tensor:
    """For float64 timesteps ``t`` (B,): ``sigmas[k]`` where ``t`` is ``schedule[k]`` (the host timesteps; the second
    of two equal ones, as diffusers' ``index_for_timestep``), else ``fallback`` (B,). On ``t``'s device, no sync."""
    dev = t.device
    sched = torch.tensor(schedule, dtype=torch.float64, device=dev)
    sig = torch.tensor(sigmas[:len(schedule)], dtype=torch.float64, device=dev)
    hit = sched[None, :] == t[:, None]
    count = hit.sum(1)
    pick = hit & (hit.cumsum(1) == count.clamp(max=2)[:, None])
    return torch.where(count > 0, sig[pick.int().argmax(1)], fallback)


def ve_row_to_vp(row, sigma_in: float, sigma_out: float, alphas=None) -> list[float]:
    """Rewrite a VE-coordinate row (state ``x = z/alpha``) for the VP state z (``alpha = 1/sqrt(sigma^2+1)``), or
    for another scaled state given its ``alphas = (alpha_in, alpha_out)`` (flow matching: ``1/(1 + sigma)``).

    With ``x = z/alpha_in`` and ``z' = alpha_out*x'``: the x coefficients a, e and the conversion slot p are
    divided by alpha_in, every output term (a, b, g, c, c2, c3, s) is multiplied by alpha_out; q, w, f and clip act on
    model outputs and x0 estimates, which are the same in both coordinates.
    """
    a_in, a_out = alphas if alphas is not None else (1.0 / math.sqrt(sigma_in * sigma_in + 1.0),
                                                     1.0 / math.sqrt(sigma_out * sigma_out + 1.0))
    r = list(row)
    r[coefs.A] *= a_out / a_in
    for k in (coefs.B, coefs.G, coefs.C, coefs.C2, coefs.C3, coefs.S):
        r[k] *= a_out
    r[coefs.P] /= a_in
    r[coefs.E] /= a_in
    return r


def _python_scalar(value):
    """A NumPy scalar as the equal Python scalar (np.int64(4) -> 4, np.float32(0.1) -> 0.10000000149011612,
    np.bool_ -> bool); anything else (tensors, arrays, sequences) as it is."""
    return value.item() if isinstance(value, np.generic) else value


def _python_scalars(method):
    """``method`` called with its NumPy scalar arguments as Python scalars (:func:`_python_scalar`). The wrapper is
    one more frame: a warning raised in ``method`` names its caller with one more ``stacklevel``."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        return method(self, *map(_python_scalar, args), **{k: _python_scalar(v) for k, v in kwargs.items()})
    return wrapper


def check_steps(who: Optional[str], value, hi: Optional[int] = None, name: str = "num_inference_steps") -> int:
    """``value`` (``num_inference_steps`` by default) as an int >= 1, and <= ``hi`` (num_train_timesteps) when given.
    NumPy ints are ints, bools are not. The one check of every Level-1 ``set_timesteps``; raises ValueError
    ``"{who}: num_inference_steps: expected an int >= 1, got 0"`` (``"... an int in [1, num_train_timesteps=1000]
    ..."`` with ``hi``)."""
    value = _python_scalar(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (hi is not None and value > hi):
        want = "an int >= 1" if hi is None else f"an int in [1, num_train_timesteps={hi}]"
        raise ValueError(f"{who + ': ' if who else ''}{name}: expected {want}, got {value!r}")
    return value
