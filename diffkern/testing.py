"""Test helpers shared by the suite: input makers and the tolerance rule (``style-study.md`` 11.3).

The rule: a backend's error against the float64 reference may be at most twice the error of the
reference itself run in the low dtype (the eager error), plus a small per-dtype floor scaled by the
output's magnitude. Tolerances are never loosened to make a test pass.
"""
from __future__ import annotations

import torch

# Floors (relative to max(1, |reference|)). bfloat16 allows one ulp (2**-7): Triton's interpreter
# truncates float32 -> bfloat16 where torch rounds to nearest even.
FLOORS = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 2 ** -7}
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Awkward shapes: odd sizes, size 1, empty, a non-power-of-two last dimension, 1-D.
SHAPES = ((2, 3, 5, 7), (1, 1, 1, 1), (0, 3, 4, 4), (3, 1025), (1, 123), (4, 2, 9, 17), (5,))


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    diff = (a.double() - b.double()).abs()
    diff = torch.where(torch.isnan(a.double()) & torch.isnan(b.double()), 0.0, diff)
    return float(diff.max())


def assert_matches_reference(actual: torch.Tensor, ref64: torch.Tensor, eager: torch.Tensor, what: str = "") -> None:
    """``max|actual - ref64| <= 2*max|eager - ref64| + floor[dtype]*max(1, max|ref64|)``."""
    assert actual.shape == ref64.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    assert actual.dtype == eager.dtype, f"{what}: dtype {actual.dtype} != {eager.dtype}"
    err = max_err(actual, ref64)
    err_eager = max_err(eager, ref64)
    scale = max(1.0, float(ref64.abs().max())) if ref64.numel() else 1.0
    bound = 2 * err_eager + FLOORS[actual.dtype] * scale
    assert err <= bound, f"{what}: max error {err:.3e} > bound {bound:.3e} (eager error {err_eager:.3e}, {actual.dtype})"


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """A non-contiguous view with t's values (transposed storage), for stride tests."""
    if t.dim() < 2:
        return torch.stack([t, t], dim=-1)[..., 0]
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)
