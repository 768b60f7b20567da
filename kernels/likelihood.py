"""Triton launcher of ``diffkern::likelihood_accum_triton`` (spec: ``diffkern/ops/likelihood.py``).

One program per sample walks the sample's elements in blocks, keeps a block of partial sums in the
compute dtype and reduces it once at the end: deterministic (no atomics), and the per-lane partial
sums hold ``per_sample / BLOCK`` terms each, so the float32 rounding stays below that of a flat sum.
Per element: ``e = (y - D)/sigma + eps`` (eps_hat), term ``e*(e - 2*eps) + (1 - c)*eps^2``; then
``acc[b] += w[b] * sum(term)``. A likelihood evaluation is dominated by the model, so one program
per sample (no split of a sample across programs) is enough. A block of the Philox eps starts at a
multiple of BLOCK (>= 16) inside the sample, plus ``b * per_sample`` with one seed: it holds whole
groups of four of the stream (one Philox call each) unless one seed meets ``per_sample % 4 != 0`` in a
batch of several (``ALIGNED``, chosen by the launcher; the elementwise path then).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .philox import block_config, compute_dtype, load_as, philox_normal_run


@triton.jit(do_not_specialize=["step"])  # step changes every launch (see sampler_step.py)
def _likelihood_accum_kernel(
        y_ptr, denoised_ptr, noise_ptr, sigma_ptr, weight_ptr, cv_ptr, seed_ptr, acc_ptr,
        step, per_sample,
        HAS_NOISE: tl.constexpr, PER_SAMPLE_SIGMA: tl.constexpr, PER_SAMPLE_WEIGHT: tl.constexpr,
        PER_SAMPLE_CV: tl.constexpr, PER_SAMPLE_SEED: tl.constexpr, ALIGNED: tl.constexpr, CDT: tl.constexpr,
        BLOCK: tl.constexpr):
    sample = tl.program_id(0)
    base = sample.to(tl.int64) * per_sample
    if PER_SAMPLE_SIGMA:
        sigma = tl.load(sigma_ptr + sample).to(CDT)
    else:
        sigma = tl.load(sigma_ptr).to(CDT)
    if PER_SAMPLE_WEIGHT:
        weight = tl.load(weight_ptr + sample).to(CDT)
    else:
        weight = tl.load(weight_ptr).to(CDT)
    if PER_SAMPLE_CV:
        one_minus_c = 1.0 - tl.load(cv_ptr + sample).to(CDT)
    else:
        one_minus_c = 1.0 - tl.load(cv_ptr).to(CDT)
    if not HAS_NOISE:
        if PER_SAMPLE_SEED:
            seed = tl.load(seed_ptr + sample)
            stream_base = 0  # per-sample stream: index inside the sample
        else:
            seed = tl.load(seed_ptr)
            stream_base = base  # one stream: the flat index
    partial = tl.zeros([BLOCK], dtype=CDT)
    # An int64 loop counter: with an i32 per_sample within BLOCK of 2**31, the i32 counter would wrap past it.
    for start in range(0, tl.cast(per_sample, tl.int64), BLOCK):
        idx = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = idx < per_sample
        y = load_as(y_ptr + base + idx, mask, CDT)
        d = load_as(denoised_ptr + base + idx, mask, CDT)
        if HAS_NOISE:
            eps = load_as(noise_ptr + base + idx, mask, CDT)
        else:
            eps = philox_normal_run(seed, step, stream_base + start, BLOCK, ALIGNED, CDT)
        if CDT == tl.float32:  # float32 `/` compiles to div.full.f32 (2 ulp) on GPUs: round as the reference
            e = tl.fdiv(y - d, sigma, ieee_rounding=True) + eps
        else:  # float64 `/` is IEEE already (and precise_divf takes float32 only)
            e = (y - d) / sigma + eps
        partial += tl.where(mask, e * (e - 2.0 * eps) + one_minus_c * eps * eps, 0.0)
    total = tl.sum(partial, axis=0)
    old = tl.load(acc_ptr + sample).to(CDT)
    tl.store(acc_ptr + sample, (old + weight * total).to(acc_ptr.dtype.element_ty))


def likelihood_accum_launch(y, denoised, noise, sigma, weight, cv, step, seed, acc) -> None:
    """Accumulate into ``acc`` (schema of ``diffkern::likelihood_accum``); all tensors contiguous.

    ``y``, ``denoised``, ``noise``: (B, ...) of one float dtype; ``sigma``, ``weight``, ``cv``: float64
    (1,) or (B,); ``seed``: int64 (1,) or (B,); ``acc``: (B,) float32 (float64 for float64 y).
    """
    batch = y.shape[0]
    if batch == 0:
        return
    per_sample = y.numel() // batch
    block, num_warps = block_config(per_sample)
    _likelihood_accum_kernel[(batch,)](
        y, denoised, y if noise is None else noise, sigma, weight, cv, seed, acc, step, per_sample,
        HAS_NOISE=noise is not None, PER_SAMPLE_SIGMA=sigma.numel() > 1, PER_SAMPLE_WEIGHT=weight.numel() > 1,
        PER_SAMPLE_CV=cv.numel() > 1, PER_SAMPLE_SEED=seed.numel() > 1,
        ALIGNED=noise is None and (seed.numel() > 1 or batch == 1 or per_sample % 4 == 0),
        CDT=compute_dtype(y.dtype), BLOCK=block, num_warps=num_warps,
        enable_fp_fusion=False)  # every product and sum rounded, as the reference and the other kernels
