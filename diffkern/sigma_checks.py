"""Validation of sampling schedules (:func:`check_sigmas`, re-exported by :mod:`diffkern.schedules`) and the
distinct-values check of the schedule builders there."""
from __future__ import annotations

import torch

F64 = torch.float64


def check_real(value, name: str) -> None:
    """Raise TypeError, naming ``name``, for a complex or bool tensor or numpy array: a float64 cast would drop the
    imaginary part or read True/False as 1/0, silently."""
    dtype = getattr(value, "dtype", None)
    if isinstance(value, torch.Tensor):
        if value.is_complex() or dtype == torch.bool:
            raise TypeError(f"{name}: expected a real tensor, got dtype {dtype}")
    elif getattr(dtype, "kind", None) in ("c", "b"):  # numpy's complex and bool kinds
        raise TypeError(f"{name}: expected a real array, got dtype {dtype}")


def distinct(s: torch.Tensor, who: str, hint: str) -> torch.Tensor:
    """``s`` (a schedule builder's n decreasing float64 values, before its final 0) unless two neighbours round to
    the same float64 value: then ValueError naming ``who``, the index and the value, with ``hint`` (the builder's
    parameter to change). Such a schedule has a zero-length step, which the multistep samplers refuse."""
    same = (s[1:] >= s[:-1]).nonzero()
    if same.numel():
        i = int(same[0])
        raise ValueError(f"{who}: sigmas[{i}] and sigmas[{i + 1}] are the same float64 value {s[i].item()!r} ({hint}); "
                         "a repeated sigma is a zero-length step, which the multistep samplers refuse")
    return s


def check_sigmas(sigmas, name: str = "sigmas", steps: int | None = None, strict: bool = True) -> torch.Tensor:
    """Validate a sampling schedule and return it as a float64 CPU tensor (a copy).

    Requires a 1-D tensor/sequence of length >= 2 (== steps+1 when ``steps`` is given) of finite values
    >= 0 that decrease strictly (``strict=False`` allows repeated values, i.e. zero-length steps).
    Reads the values: call it on the host schedule before a sampling loop, never inside one.
    """
    check_real(sigmas, name)
    if isinstance(sigmas, torch.Tensor):
        if sigmas.is_meta:  # a meta tensor has a shape but no values to read
            raise ValueError(f"{name}: expected a schedule with values, got a tensor on the meta device")
        s = sigmas.detach().to("cpu", F64)
    else:
        try:
            s = torch.as_tensor(sigmas, dtype=F64)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{name}: expected a 1-D tensor or sequence of floats, "
                            f"got {type(sigmas).__name__}") from exc
    if s.dim() == 0:  # a step count or a single sigma, where the N+1 values of a schedule belong
        raise ValueError(f"{name}: expected a 1-D schedule of N+1 values, got a scalar ({s.item():g}); build one "
                         f"with diffkern.schedules.karras(n, sigma_min, sigma_max) (or edm, loglinear, "
                         f"polyexponential, vp)")
    if s.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D schedule, got shape {tuple(s.shape)}")
    if steps is not None and s.numel() != steps + 1:
        raise ValueError(f"{name}: expected length steps+1 = {steps + 1}, got {s.numel()}")
    if s.numel() < 2:
        raise ValueError(f"{name}: expected length >= 2 (N+1 values for N steps), got {s.numel()}")
    if torch.isnan(s).any():
        raise ValueError(f"{name}: contains NaN at index {int(torch.isnan(s).nonzero()[0])}")
    if not torch.isfinite(s).all():
        raise ValueError(f"{name}: contains inf at index {int((~torch.isfinite(s)).nonzero()[0])}")
    if (s < 0).any():
        raise ValueError(f"{name}: negative value at index {int((s < 0).nonzero()[0])}")
    step = s[1:] - s[:-1]
    bad = (step >= 0) if strict else (step > 0)
    if bad.any():
        i = int(bad.nonzero()[0])
        kind = "strictly decreasing" if strict else "non-increasing"
        raise ValueError(f"{name}: must be {kind}, but {name}[{i + 1}] = {s[i + 1].item():g} "
                         f">{'=' if strict else ''} {name}[{i}] = {s[i].item():g}")
    return s.clone()
