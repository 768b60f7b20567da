"""Argument checks shared by the op front-ends: every message names the argument and what was expected.

All checks run before anything is launched, so an op that raises has written nothing.
"""
from __future__ import annotations

import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def float_tensor(t, name: str) -> torch.Tensor:
    tensor(t, name)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype in {[str(d) for d in FLOAT_DTYPES]}, got {t.dtype}")
    return t


def like(t, name: str, ref: torch.Tensor, ref_name: str, *, dtype: bool = True, shape: bool = True):
    """``t`` must be a tensor on ``ref``'s device, with its shape and (optionally) its dtype."""
    float_tensor(t, name)
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (that of {ref_name}), got {t.device}")
    if shape and t.shape != ref.shape:
        raise ValueError(f"{name}: expected shape {tuple(ref.shape)} (that of {ref_name}), got {tuple(t.shape)}")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (that of {ref_name}), got {t.dtype}")
    return t


def seed_tensor(seed, x: torch.Tensor, x_name: str = "x") -> torch.Tensor:
    """int64 seed of shape (1,) or () (one stream) or (B,) with B = x.shape[0] (per-sample streams).

    ``x_name`` names the tensor whose batch the seeds follow, in the error messages."""
    tensor(seed, "seed")
    if seed.dtype != torch.int64:
        raise TypeError(f"seed: expected dtype torch.int64, got {seed.dtype}")
    if seed.device != x.device:
        raise ValueError(f"seed: expected device {x.device} (that of {x_name}), got {seed.device}")
    batch = x.shape[0] if x.dim() > 0 else 1
    if seed.numel() != 1 and (seed.dim() != 1 or seed.numel() != batch):
        where = "shape[0]" if x_name == "shape" else f"{x_name}.shape[0]"
        raise ValueError(f"seed: expected shape (1,) or (B,) with B = {where} = {batch}, "
                         f"got {tuple(seed.shape)}")
    return seed.reshape(-1).contiguous()


def step_index(step, table: torch.Tensor, name: str = "step") -> int:
    """``step`` as a Python int row of ``table`` (numpy ints too: numbers.Integral; bool and tensors refused)."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"{name}: expected a Python int (a row of the coefficient table), got {type(step).__name__}")
    if not 0 <= step < table.shape[0]:
        raise IndexError(f"{name}: {step} is out of range for a coefficient table of {table.shape[0]} rows")
    return int(step)


def _span(t: torch.Tensor) -> tuple[int, int]:
    if t.numel() == 0:
        return 0, 0
    start = t.data_ptr()
    extent = sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1
    return start, start + extent * t.element_size()


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    (alo, ahi), (blo, bhi) = _span(a), _span(b)
    return alo < bhi and blo < ahi


def same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


def no_partial_overlap(outputs: dict, inputs: dict, shared: dict | None = None) -> None:
    """Outputs may be exactly an input (in-place) but may not partially overlap any input or each other, and
    may not overlap a ``shared`` input at all (one read by many elements: a table, seeds, a per-sample
    matrix, a dataset), which a kernel writing the output in parallel would change under other readers.
    Nor may an output overlap itself (an expanded view).

    Skipped while ``torch.compile`` traces: fake tensors have no addresses, and the op's fake kernel still
    checks the shapes."""
    if torch.compiler.is_compiling():
        return
    outs = [(n, t) for n, t in outputs.items() if t is not None and t.numel() > 0]
    for on, o in outs:
        # Several elements at one address (a stride-0 dimension, e.g. from expand()): torch's copy into it
        # would fail only after the launch, with a message that names no argument.
        if any(size > 1 and stride == 0 for size, stride in zip(o.shape, o.stride())):
            raise ValueError(f"{on}: several of its elements share one memory location (a stride-0 dimension of "
                             f"shape {tuple(o.shape)}, strides {o.stride()}, e.g. from expand()); "
                             f"pass an output of its own")
    ins = [(n, t) for n, t in inputs.items() if t is not None and t.numel() > 0]
    for on, o in outs:
        for n, t in (shared or {}).items():
            if t is not None and t.numel() > 0 and _overlap(o, t):
                raise ValueError(f"{on}: overlaps {n}, which every element reads; pass an output of its own")
    for i, (on, o) in enumerate(outs):
        for n, t in ins + outs[i + 1:]:
            if _overlap(o, t) and not (same_view(o, t) and (n, t) in ins):
                raise ValueError(f"{on}: overlaps {n} without being the same view; only exact in-place use is allowed")
