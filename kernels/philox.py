"""Philox4x32-10 and the Box-Muller normals of ``diffkern.ops.philox``, as ``@triton.jit`` helpers.

The rounds are written here (uint32 math, ``tl.umulhi``) rather than taken from ``tl.philox`` /
``tl.randn``, whose counter layout changed across Triton versions (64-bit offsets, PR #6832): the
stream must be the same on every install and equal to the C++/CUDA one. Layout, as documented in
``diffkern/ops/philox.py`` (one Philox call gives the four normals of a group of four indices):

    key      = (seed_lo, seed_hi)
    g, l     = idx >> 2, idx & 3
    counter  = (g_lo, g_hi, step, 0)
    u_k      = float(int32(r_k) < 0 ? ~int32(r_k) : int32(r_k)) * 4.6566127342e-10
    (ua, ub) = (u_0, u_1) for lanes 0, 1;  (u_2, u_3) for lanes 2, 3
    xi       = sqrt(-2 ln max(1e-7, ua)) * (cos | sin)(2 pi ub)   cos for even lanes, sin for odd

Two entry points, bitwise equal on a GPU (the same operations on the same words):
:func:`philox_normal` gives the normals of any block of indices (a Philox call, a log and a sin and
cos per element, the unused ones discarded); :func:`philox_normal_block` gives those of BLOCK
consecutive indices from a multiple of 4 with a quarter of the Philox calls and half of the logs,
sines and cosines, which matters where a noisy step is otherwise memory-bound.

The float constants are built with ``tl.full(..., CDT)`` so a float64 stream gets them in double
precision (a bare Python float may be materialised as float32 before the cast on older Triton).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

ROUND_A = tl.constexpr(0xD2511F53)
ROUND_B = tl.constexpr(0xCD9E8D57)
KEY_A = tl.constexpr(0x9E3779B9)
KEY_B = tl.constexpr(0xBB67AE85)
UNIFORM_SCALE = tl.constexpr(4.6566127342e-10)
MIN_UNIFORM = tl.constexpr(1e-7)
TWO_PI = tl.constexpr(2.0 * math.pi)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten Philox4x32 rounds on uint32 counters (c0..c3) and key (k0, k1); returns (r0, r1, r2, r3)."""
    for _ in tl.static_range(10):
        prev_c0 = c0
        prev_c2 = c2
        c0 = tl.umulhi(ROUND_B, prev_c2) ^ c1 ^ k0
        c2 = tl.umulhi(ROUND_A, prev_c0) ^ c3 ^ k1
        c1 = prev_c2 * ROUND_B  # low word: uint32 multiplication wraps modulo 2**32
        c3 = prev_c0 * ROUND_A
        k0 = k0 + KEY_A
        k1 = k1 + KEY_B
    return c0, c1, c2, c3


@triton.jit
def _uniform(r, CDT: tl.constexpr):
    """uint32 word -> uniform in [0, 1) in the compute dtype, as ``philox._to_uniform``."""
    s = r.to(tl.int32, bitcast=True)
    s = tl.where(s < 0, ~s, s)
    return s.to(CDT) * tl.full([], UNIFORM_SCALE, CDT)


@triton.jit
def _philox_words(seed, step, group):
    """The four Philox words of the int64 group indices ``group`` (a block) under the int64 scalar ``seed``."""
    k0 = seed.to(tl.uint32)  # int64 -> uint32 truncates: the low word
    k1 = (seed >> 32).to(tl.uint32)
    c0 = group.to(tl.uint32)
    c1 = (group >> 32).to(tl.uint32)
    c2 = c0 * 0 + tl.cast(step, tl.int64).to(tl.uint32)
    c3 = c0 * 0
    return philox4x32_10(c0, c1, c2, c3, k0, k1)


@triton.jit
def _box_muller(ra, rb, CDT: tl.constexpr):
    """(rho cos theta, rho sin theta) of the word pairs (ra, rb), in the operation order of the reference."""
    ua = tl.maximum(_uniform(ra, CDT), tl.full([], MIN_UNIFORM, CDT))
    ub = _uniform(rb, CDT)
    radius = -2.0 * tl.log(ua)
    if CDT == tl.float32:
        radius = tl.sqrt_rn(radius)  # tl.sqrt is the approximate instruction for float32 on GPUs
    else:
        radius = tl.sqrt(radius)
    theta = tl.full([], TWO_PI, CDT) * ub
    return radius * tl.cos(theta), radius * tl.sin(theta)


@triton.jit
def philox_normal(seed, step, idx, CDT: tl.constexpr):
    """Standard normals for int64 element indices ``idx`` (a block of any indices) under the int64 scalar ``seed``.

    ``step`` is the table row (a scalar < 2**32); ``CDT`` is tl.float32 or tl.float64. Returns a block
    shaped like ``idx`` in ``CDT``. Each element runs its group's Philox call and its pair's Box-Muller.
    """
    idx = idx.to(tl.int64)
    r0, r1, r2, r3 = _philox_words(seed, step, idx >> 2)
    first_pair = (idx & 2) == 0
    xi_cos, xi_sin = _box_muller(tl.where(first_pair, r0, r2), tl.where(first_pair, r1, r3), CDT)
    return tl.where((idx & 1) == 0, xi_cos, xi_sin)


@triton.jit
def philox_normal_block(seed, step, base, BLOCK: tl.constexpr, CDT: tl.constexpr):
    """The normals of indices ``base .. base + BLOCK - 1`` (a (BLOCK,) block in ``CDT``) for ``base % 4 == 0``.

    Bitwise equal to ``philox_normal(seed, step, base + tl.arange(0, BLOCK), CDT)`` with BLOCK // 4
    Philox calls and BLOCK // 2 logs, sines and cosines. ``base``: an integer scalar (int64 inside).
    """
    group = (tl.cast(base, tl.int64) >> 2) + tl.arange(0, BLOCK // 4)  # tl.cast: base may be a Python int
    r0, r1, r2, r3 = _philox_words(seed, step, group)
    # [BLOCK // 4, 2] tiles (group j, pair k), then [j, k, m] with m = 0 cos, 1 sin: flat 4j + 2k + m.
    xi_cos, xi_sin = _box_muller(tl.join(r0, r2), tl.join(r1, r3), CDT)
    return tl.reshape(tl.join(xi_cos, xi_sin), [BLOCK])

@triton.jit
def philox_normal_run(seed, step, first, BLOCK: tl.constexpr, ALIGNED: tl.constexpr, CDT: tl.constexpr):
    """The normals of indices ``first .. first + BLOCK - 1`` (a (BLOCK,) block in ``CDT``): the group path
    (:func:`philox_normal_block`) where the launcher's ``ALIGNED`` promises ``first % 4 == 0``, else the
    elementwise one; bitwise the same values either way."""
    if ALIGNED:
        xi = philox_normal_block(seed, step, first, BLOCK, CDT)
    else:
        xi = philox_normal(seed, step, first + tl.arange(0, BLOCK), CDT)
    return xi

#----------------------------------------------------------------------------
# Helpers shared by the elementwise kernels of this package (sampler_step, iadb_blend, philox_normal).


@triton.jit
def load_as(ptrs, mask, CDT: tl.constexpr):
    """Load (a block or a scalar) and convert it to the compute dtype. bfloat16 goes through float32:
    the interpreter has no direct bfloat16 -> float64 conversion (it would convert the raw bits)."""
    v = tl.load(ptrs, mask=mask)
    if v.dtype == tl.bfloat16:
        v = v.to(tl.float32)
    return v.to(CDT)


# The interpreter runs programs one after another at ~1 ms each (ecosystem-and-performance.md B.4:
# 1 M elements took ~1.1 s with BLOCK=1024, 0.16 s with 8192), so it gets large blocks.
INTERPRET_BLOCK = 16384
# 2048 elements over 8 warps: 8 per thread, one or two 16-byte vectors per tensor (see the PTX check in
# tests/test_triton_backend.py). Not tuned on a GPU yet: bench/ should sweep it.
GPU_BLOCK = 2048
MIN_BLOCK = 16


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def block_config(per_sample: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of ``per_sample`` elements: BLOCK a power of two no larger than needed."""
    cap = INTERPRET_BLOCK if interpreting() else GPU_BLOCK
    block = max(MIN_BLOCK, min(cap, triton.next_power_of_2(max(per_sample, 1))))
    return block, max(1, min(8, block // 256))


def launch_config(per_sample: int) -> tuple[int, dict]:
    """(BLOCK, launch keywords) for rows of ``per_sample`` elements. FMA contraction is off: each mul
    and add rounds as in the reference (an FMA saves nothing in a memory-bound kernel), and Triton 3.9
    warns when the option is left to its default."""
    block, num_warps = block_config(per_sample)
    return block, {"BLOCK": block, "num_warps": num_warps, "enable_fp_fusion": False}


def compute_dtype(dtype: torch.dtype):
    """The math dtype for state dtype ``dtype``: float64 stays float64, everything else runs in float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32
