"""Triton launcher of ``diffkern::sampler_step_triton``: the generic fused sampler step in one pass.

Per element, in the order fixed by :mod:`diffkern.ops.coefs` (math in float32, float64 for float64 state):

    m = u + W*(model_out - u) | model_out;   Draw = P*x + Q*m;   D = clamp(Draw, -CLIP, CLIP);   Du = P*x + Q*u
    out = ((A*x + B*D) + G*Draw) [+ C*H] [+ C2*H2] [+ C3*H3] [+ S*xi] [+ BU*Du];   x0_out = D
    history_out = E*x + F*D [+ FU*Du]                (u = model_out where there is no unconditional output)

Which optional tensors exist is a compile-time flag (``HAS_*``), so absent terms compile away; the
``C*H``, ``C2*H2``, ``C3*H3``, ``S*xi``, ``BU*Du`` and ``FU*Du`` terms are skipped at run time when their
coefficient is exactly 0 (the history is then not read, so an uninitialised buffer cannot inject NaN; a table without
bu and fu gives the bits it gave before they existed). The coefficient row ``step`` is
read from the float64 table inside the kernel, and the seed from device memory, so a captured launch
stays valid when either is rewritten in place. Every load precedes every store of a block, which
makes exact in-place use (``out`` is ``x``, ``history_out`` is any history input) safe.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .philox import compute_dtype, launch_config, load_as, philox_normal_block

NCOEF = tl.constexpr(16)  # diffkern.ops.coefs.NCOEF
(SLOT_A, SLOT_B, SLOT_G, SLOT_C, SLOT_S, SLOT_P, SLOT_Q, SLOT_W, SLOT_E, SLOT_F, SLOT_CLIP, SLOT_C2, SLOT_C3, SLOT_BU,
 SLOT_FU) = (tl.constexpr(i) for i in range(15))  # diffkern.ops.coefs slot order


@triton.jit
def _coef(coef_row_ptr, slot, CDT: tl.constexpr):
    return tl.load(coef_row_ptr + slot).to(CDT)


# step (a table row / noise counter) changes every launch: specialising it (== 1, a multiple of 16) would
# compile each variant three times over a sampling run for no gain.
@triton.jit(do_not_specialize=["step"])
def _sampler_step_kernel(
        x_ptr, model_out_ptr, uncond_ptr, history_ptr, history2_ptr, history3_ptr, noise_ptr, coef_ptr, seed_ptr,
        out_ptr, x0_out_ptr, history_out_ptr,
        step, per_sample, blocks_per_sample,
        HAS_UNCOND: tl.constexpr, HAS_HISTORY: tl.constexpr, HAS_HISTORY2: tl.constexpr, HAS_HISTORY3: tl.constexpr,
        HAS_NOISE: tl.constexpr,
        HAS_X0_OUT: tl.constexpr, HAS_HISTORY_OUT: tl.constexpr,
        CDT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    sample = pid // blocks_per_sample
    block = pid - sample * blocks_per_sample
    idx = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # index inside the sample
    mask = idx < per_sample
    offs = sample.to(tl.int64) * per_sample + idx

    row = coef_ptr + step * NCOEF
    a = _coef(row, SLOT_A, CDT)
    b = _coef(row, SLOT_B, CDT)
    g = _coef(row, SLOT_G, CDT)
    c = _coef(row, SLOT_C, CDT)
    s = _coef(row, SLOT_S, CDT)
    p = _coef(row, SLOT_P, CDT)
    q = _coef(row, SLOT_Q, CDT)
    clip = _coef(row, SLOT_CLIP, CDT)

    x = load_as(x_ptr + offs, mask, CDT)
    m = load_as(model_out_ptr + offs, mask, CDT)
    u = m  # the CFG++ terms' u without an unconditional output
    if HAS_UNCOND:
        u = load_as(uncond_ptr + offs, mask, CDT)
        m = u + _coef(row, SLOT_W, CDT) * (m - u)
    d_raw = p * x + q * m
    d = tl.minimum(tl.maximum(d_raw, -clip, propagate_nan=tl.PropagateNan.ALL), clip,
                   propagate_nan=tl.PropagateNan.ALL)
    acc = a * x + b * d
    acc = acc + g * d_raw
    if HAS_HISTORY:
        if c != 0:
            acc = acc + c * load_as(history_ptr + offs, mask, CDT)
    if HAS_HISTORY2:
        c2 = _coef(row, SLOT_C2, CDT)
        if c2 != 0:
            acc = acc + c2 * load_as(history2_ptr + offs, mask, CDT)
    if HAS_HISTORY3:
        c3 = _coef(row, SLOT_C3, CDT)
        if c3 != 0:
            acc = acc + c3 * load_as(history3_ptr + offs, mask, CDT)
    if s != 0:
        if HAS_NOISE:
            xi = load_as(noise_ptr + offs, mask, CDT)
        else:
            # The block starts at a multiple of BLOCK (>= 16) inside the sample: whole groups of four.
            xi = philox_normal_block(tl.load(seed_ptr + sample), step, block.to(tl.int64) * BLOCK, BLOCK, CDT)
        acc = acc + s * xi
    bu = _coef(row, SLOT_BU, CDT)
    if bu != 0:
        acc = acc + bu * (p * x + q * u)

    if HAS_X0_OUT:
        tl.store(x0_out_ptr + offs, d.to(x0_out_ptr.dtype.element_ty), mask=mask)
    if HAS_HISTORY_OUT:
        h_new = _coef(row, SLOT_E, CDT) * x + _coef(row, SLOT_F, CDT) * d
        fu = _coef(row, SLOT_FU, CDT)
        if fu != 0:
            h_new = h_new + fu * (p * x + q * u)
        tl.store(history_out_ptr + offs, h_new.to(history_out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def sampler_step_launch(x, model_out, model_out_uncond, history, noise, coef, step, seed, out, x0_out,
                        history_out, history2=None, history3=None) -> None:
    """Run one fused step (schema of ``diffkern::sampler_step``); writes ``out`` [, x0_out, history_out].

    All tensors contiguous on one device. ``x``, the histories, ``noise`` and the outputs share the
    state dtype S; ``model_out`` / ``model_out_uncond`` the model dtype M (each float16, bfloat16,
    float32 or float64). ``coef``: float64 (N, 16); ``step``: its row; ``seed``: int64 (1,) or (B,).
    """
    n = x.numel()
    if n == 0:
        return
    samples = seed.numel() if seed.numel() > 1 else 1
    per_sample = n // samples
    block, options = launch_config(per_sample)
    blocks_per_sample = triton.cdiv(per_sample, block)

    def ptr(t):
        return x if t is None else t  # any valid pointer: its HAS_* flag is False, so it is never read

    _sampler_step_kernel[(samples * blocks_per_sample,)](
        x, model_out, ptr(model_out_uncond), ptr(history), ptr(history2), ptr(history3), ptr(noise), coef, seed,
        out, ptr(x0_out), ptr(history_out),
        step, per_sample, blocks_per_sample,
        HAS_UNCOND=model_out_uncond is not None, HAS_HISTORY=history is not None,
        HAS_HISTORY2=history2 is not None, HAS_HISTORY3=history3 is not None, HAS_NOISE=noise is not None,
        HAS_X0_OUT=x0_out is not None, HAS_HISTORY_OUT=history_out is not None,
        CDT=compute_dtype(x.dtype), **options)
