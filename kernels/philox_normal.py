"""Triton launcher of ``diffkern::philox_normal_triton``: the counter-based normal stream as an op.

Element i of ``out`` is the normal at index ``offset + i`` under ``seed[0]``; with per-sample seeds
(``seed`` of numel B > 1) it is the normal at index ``offset + i % per_sample`` under
``seed[i // per_sample]``. Programs are laid out sample-major, so a program reads one seed and
needs no per-element division. A block starts at ``offset`` plus a multiple of BLOCK, so it holds
whole groups of four (one Philox call each, :func:`philox_normal_block`) iff ``offset % 4 == 0``; the
launcher picks the path at compile time (``ALIGNED``), the other offsets take the elementwise one.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .philox import compute_dtype, launch_config, philox_normal_run


@triton.jit(do_not_specialize=["step"])  # step changes every launch (see sampler_step.py)
def _philox_normal_kernel(seed_ptr, out_ptr, step, offset, per_sample, blocks_per_sample,
                          ALIGNED: tl.constexpr, CDT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    sample = pid // blocks_per_sample
    block = pid - sample * blocks_per_sample
    start = block.to(tl.int64) * BLOCK  # first index of the block inside the sample
    idx = start + tl.arange(0, BLOCK)
    mask = idx < per_sample
    seed = tl.load(seed_ptr + sample)
    xi = philox_normal_run(seed, step, start + offset, BLOCK, ALIGNED, CDT)
    tl.store(out_ptr + sample.to(tl.int64) * per_sample + idx, xi.to(out_ptr.dtype.element_ty), mask=mask)


def philox_normal_launch(seed: torch.Tensor, step: int, offset: int, out: torch.Tensor) -> None:
    """Fill the contiguous float tensor ``out`` with the stream (schema of ``diffkern::philox_normal``).

    ``seed``: int64 (1,) or (B,) with B = out.shape[0], on out's device. ``step`` < 2**32, ``offset`` >= 0.
    """
    n = out.numel()
    if n == 0:
        return
    samples = seed.numel() if seed.numel() > 1 else 1
    per_sample = n // samples
    block, options = launch_config(per_sample)
    blocks_per_sample = triton.cdiv(per_sample, block)
    _philox_normal_kernel[(samples * blocks_per_sample,)](
        seed, out, step, offset, per_sample, blocks_per_sample,
        ALIGNED=offset % 4 == 0, CDT=compute_dtype(out.dtype), **options)
