"""Triton launchers of ``diffkern::hold_transition_triton`` and ``diffkern::hold_perturb_triton``.

Spec and reference: ``diffkern/ops/hold.py``. A program owns BLOCK positions p of one sample b and
keeps all n components of its elements as an [NP2, BLOCK] tile (rows = components, padded to a
power of two), so each component is read once and written once. Per output component i the sums
run left to right in the order of the reference (``acc = K[i,0] z_0``, ``+= K[i,j] z_j``, ``+= k_i
eps``, ``+= C[i,j] eta_j`` for j <= i); a noise column of C that is all zero is not drawn. The
table row and the seed are read on the device. Every load precedes every store, so out may be z.
A noise draw covers the entries ``start .. start + BLOCK - 1`` of one component (start = j*P plus a
multiple of BLOCK, plus b*n*P with one seed): whole groups of four of the stream, one Philox call
each, iff P % 4 == 0; the launcher then takes that path (``ALIGNED``) unless a thread holds a single
position (see :func:`_aligned`); otherwise the elementwise path.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .philox import MIN_BLOCK, compute_dtype, interpreting, launch_config, load_as, philox_normal_run


def _config(per_sample: int, n: int) -> tuple[int, dict]:
    """(NP2, launch options). A tile holds NP2 rows: about GPU_BLOCK values per program, and few enough warps
    that a thread holds 8 positions (4 for NP2 = 8): whole groups of four of the noise stream per thread
    (a thread holding part of a group computes all of the group's Philox call, logs and sin/cos), and
    16-bit loads of 8 elements without threads holding copies of each other's elements. sm_90 SASS, all
    noise columns drawn, per element (``bench/sass_triton.py``; not timed): n = 3 float32 269 instructions
    against 614 with 8 warps (2 positions a thread), bfloat16 273 against 550; n = 8 float32 956 against
    2390 (1 position a thread: the elementwise stream). 8 positions at NP2 = 8 spill registers (320 local
    loads/stores), so there 16-bit states draw each group twice (bfloat16 n = 8: 1477)."""
    block, options = launch_config(per_sample)
    np2 = triton.next_power_of_2(n)
    if not interpreting():
        block = max(MIN_BLOCK, block // np2)
        per_thread = 8 if np2 <= 4 else 4
        options = dict(options, BLOCK=block, num_warps=max(1, min(options["num_warps"], block // (32 * per_thread))))
    return np2, options


def _aligned(P: int, noise, options: dict) -> bool:
    """Whether the kernels draw noise a group of four at a time (``ALIGNED``): every block starts at a
    multiple of P plus a multiple of BLOCK (>= 16), so on groups of four iff P % 4 == 0. Only where each
    thread holds whole groups (BLOCK >= 4 positions per thread; :func:`_config` sees to it but for tiny P):
    otherwise the threads sharing a group would each compute its 2 logs and 2 sin/cos. False with an
    explicit noise tensor (no second variant)."""
    return noise is None and P % 4 == 0 and options["BLOCK"] >= 4 * 32 * options["num_warps"]


@triton.jit
def _noise(noise_ptr, seed_ptr, b, step, start, mask, base, HAS_NOISE: tl.constexpr, PER_SAMPLE: tl.constexpr,
           ALIGNED: tl.constexpr, CDT: tl.constexpr, BLOCK: tl.constexpr):
    """Normals of state entries ``base + start + i``, i < BLOCK (explicit tensor or the Philox stream, whose
    index is ``start + i`` with per-sample seeds, else the flat ``base + start + i``)."""
    if HAS_NOISE:
        v = load_as(noise_ptr + base + start + tl.arange(0, BLOCK), mask, CDT)
    else:
        if PER_SAMPLE:
            seed = tl.load(seed_ptr + b)
            first = start
        else:
            seed = tl.load(seed_ptr)
            first = base + start
        v = philox_normal_run(seed, step, first, BLOCK, ALIGNED, CDT)
    return v


@triton.jit(do_not_specialize=["step"])  # step changes every launch (see sampler_step.py)
def _hold_transition_kernel(z_ptr, eps_ptr, noise_ptr, coef_ptr, seed_ptr, out_ptr,
                            step, P, blocks_per_sample,
                            N: tl.constexpr, NP2: tl.constexpr, HAS_NOISE: tl.constexpr, PER_SAMPLE: tl.constexpr,
                            ALIGNED: tl.constexpr, CDT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // blocks_per_sample
    p0 = (pid - b * blocks_per_sample).to(tl.int64) * BLOCK  # the program's first position
    p = p0 + tl.arange(0, BLOCK)  # (BLOCK,)
    pmask = p < P
    rows = tl.arange(0, NP2)  # output components i
    rmask = rows < N
    base = b.to(tl.int64) * N * P  # the sample's first state entry
    P64 = tl.cast(P, tl.int64)  # j * P in int64: a sample may hold >= 2**31 entries with P < 2**31 (an i32 P)
    W: tl.constexpr = 2 * N + 1
    row_ptr = coef_ptr + tl.cast(step, tl.int64) * (N * W)

    acc = tl.zeros([NP2, BLOCK], CDT)
    for j in tl.static_range(N):
        zj = load_as(z_ptr + base + j * P64 + p, pmask, CDT)
        kij = tl.load(row_ptr + rows * W + j, mask=rmask, other=0.0).to(CDT)
        if j == 0:
            acc = kij[:, None] * zj[None, :]
        else:
            acc = acc + kij[:, None] * zj[None, :]
    e = load_as(eps_ptr + b.to(tl.int64) * P + p, pmask, CDT)
    ki = tl.load(row_ptr + rows * W + N, mask=rmask, other=0.0).to(CDT)
    acc = acc + ki[:, None] * e[None, :]
    for j in tl.static_range(N):
        cij64 = tl.load(row_ptr + rows * W + N + 1 + j, mask=rmask & (rows >= j), other=0.0)
        if tl.max(tl.abs(cij64), axis=0) != 0:  # column j used at all: draw eta_j
            eta = _noise(noise_ptr, seed_ptr, b, step, j * P64 + p0, pmask, base, HAS_NOISE, PER_SAMPLE, ALIGNED, CDT,
                         BLOCK)
            term = cij64.to(CDT)[:, None] * eta[None, :]
            acc = acc + tl.where((rows >= j)[:, None], term, 0.0)
    offs = base + rows[:, None].to(tl.int64) * P + p[None, :]
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & pmask[None, :])


def hold_transition_launch(z, eps_hat, noise, coef, step, seed, out) -> None:
    """Schema of ``diffkern::hold_transition``: contiguous z/out (B, n*C, ...), eps_hat (B, C, ...),
    coef float64 (N, n, 2n+1), seed int64 (1,) or (B,); writes out."""
    if z.numel() == 0:
        return
    n = coef.shape[1]
    B = z.shape[0]
    P = z.numel() // (B * n)
    np2, options = _config(P, n)
    blocks = triton.cdiv(P, options["BLOCK"])
    _hold_transition_kernel[(B * blocks,)](
        z, eps_hat, z if noise is None else noise, coef, seed, out, step, P, blocks,
        N=n, NP2=np2, HAS_NOISE=noise is not None, PER_SAMPLE=seed.numel() > 1, ALIGNED=_aligned(P, noise, options),
        CDT=compute_dtype(z.dtype), **options)


@triton.jit(do_not_specialize=["step"])  # step changes every launch (see sampler_step.py)
def _hold_perturb_kernel(z0_ptr, mean_ptr, chol_ptr, noise_ptr, seed_ptr, out_ptr, eps_out_ptr,
                         step, P, blocks_per_sample,
                         N: tl.constexpr, M: tl.constexpr, NP2: tl.constexpr, HAS_NOISE: tl.constexpr,
                         HAS_EPS_OUT: tl.constexpr, PER_SAMPLE: tl.constexpr, ALIGNED: tl.constexpr,
                         CDT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // blocks_per_sample
    p0 = (pid - b * blocks_per_sample).to(tl.int64) * BLOCK
    p = p0 + tl.arange(0, BLOCK)
    pmask = p < P
    rows = tl.arange(0, NP2)
    rmask = rows < N
    b64 = b.to(tl.int64)
    base = b64 * N * P
    P64 = tl.cast(P, tl.int64)  # j * P in int64 (see _hold_transition_kernel)
    mean_row = mean_ptr + b64 * N * M
    chol_row = chol_ptr + b64 * N * N

    acc = tl.zeros([NP2, BLOCK], CDT)
    for j in tl.static_range(M):
        zj = load_as(z0_ptr + b64 * M * P + j * P64 + p, pmask, CDT)
        mij = tl.load(mean_row + rows * M + j, mask=rmask, other=0.0).to(CDT)
        if j == 0:
            acc = mij[:, None] * zj[None, :]
        else:
            acc = acc + mij[:, None] * zj[None, :]
    for j in tl.static_range(N):
        eps = _noise(noise_ptr, seed_ptr, b, step, j * P64 + p0, pmask, base, HAS_NOISE, PER_SAMPLE, ALIGNED, CDT,
                     BLOCK)
        lij = tl.load(chol_row + rows * N + j, mask=rmask & (rows >= j), other=0.0).to(CDT)
        acc = acc + tl.where((rows >= j)[:, None], lij[:, None] * eps[None, :], 0.0)
        if HAS_EPS_OUT and j == N - 1:
            tl.store(eps_out_ptr + b64 * P + p, eps.to(eps_out_ptr.dtype.element_ty), mask=pmask)
    offs = base + rows[:, None].to(tl.int64) * P + p[None, :]
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & pmask[None, :])


def hold_perturb_launch(z0, mean_mat, chol, noise, step, seed, out, eps_out) -> None:
    """Schema of ``diffkern::hold_perturb``: contiguous z0 (B, m*C, ...), float64 mean_mat (B, n, m) and
    chol (B, n, n), out (B, n*C, ...), optional eps_out (B, C, ...); writes out [, eps_out]."""
    if out.numel() == 0:
        return
    B, n, m = mean_mat.shape
    P = out.numel() // (B * n)
    np2, options = _config(P, n)
    blocks = triton.cdiv(P, options["BLOCK"])
    _hold_perturb_kernel[(B * blocks,)](
        z0, mean_mat, chol, out if noise is None else noise, seed, out, out if eps_out is None else eps_out,
        step, P, blocks,
        N=n, M=m, NP2=np2, HAS_NOISE=noise is not None, HAS_EPS_OUT=eps_out is not None,
        PER_SAMPLE=seed.numel() > 1, ALIGNED=_aligned(P, noise, options), CDT=compute_dtype(z0.dtype), **options)
