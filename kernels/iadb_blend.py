"""Triton launcher of ``diffkern::iadb_blend_triton``: IADB's blend and training target in one pass.

Per element of sample b (math in float32, float64 for float64 tensors):

    out        = (1 - alpha[b])*x0 + alpha[b]*x1
    target_out = x1 - x0

Programs are laid out sample-major, so each reads its alpha once as a scalar (no per-element
division), and every load precedes every store, so ``out`` may be ``x0`` or ``x1``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .philox import compute_dtype, launch_config, load_as


@triton.jit
def _iadb_blend_kernel(x0_ptr, x1_ptr, alpha_ptr, out_ptr, target_out_ptr, per_sample, blocks_per_sample,
                       HAS_TARGET_OUT: tl.constexpr, CDT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    sample = pid // blocks_per_sample
    block = pid - sample * blocks_per_sample
    idx = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < per_sample
    offs = sample.to(tl.int64) * per_sample + idx
    alpha = load_as(alpha_ptr + sample, None, CDT)
    x0 = load_as(x0_ptr + offs, mask, CDT)
    x1 = load_as(x1_ptr + offs, mask, CDT)
    if HAS_TARGET_OUT:
        tl.store(target_out_ptr + offs, (x1 - x0).to(target_out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + offs, ((1 - alpha) * x0 + alpha * x1).to(out_ptr.dtype.element_ty), mask=mask)


def iadb_blend_launch(x0: torch.Tensor, x1: torch.Tensor, alpha: torch.Tensor, out: torch.Tensor,
                      target_out: torch.Tensor | None) -> None:
    """Blend (schema of ``diffkern::iadb_blend``): writes ``out`` [and ``target_out``].

    ``x0``, ``x1``, outputs: contiguous ``(B, ...)`` of one float dtype; ``alpha``: contiguous ``(B,)``
    of any float dtype, on the same device.
    """
    n = x0.numel()
    if n == 0:
        return
    samples = alpha.numel()
    per_sample = n // samples
    block, options = launch_config(per_sample)
    blocks_per_sample = triton.cdiv(per_sample, block)
    _iadb_blend_kernel[(samples * blocks_per_sample,)](
        x0, x1, alpha, out, x0 if target_out is None else target_out, per_sample, blocks_per_sample,
        HAS_TARGET_OUT=target_out is not None, CDT=compute_dtype(x0.dtype), **options)
