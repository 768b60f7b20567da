"""Triton launcher of ``diffkern::optimal_denoiser_triton`` (spec: ``diffkern/ops/optimal_denoiser.py``).

``D(x, sigma) = softmax_i((x.y_i - h_i)/sigma^2) @ Y`` with ``h_i = ||y_i||^2/2``: single-query
attention with a per-key bias, computed flash-attention style in two launches.

1. Split kernel, grid (row blocks of x, splits of the N data points). Each program walks its split
   in blocks of BLOCK_N keys: the logits block ``x_blk @ Y_blk^T`` is a K-loop over D in BLOCK_D
   slices (float32 accumulation), then the online softmax (running max m of the unscaled logits s and
   sum l, base 2, scale c = log2(e)/sigma^2) rescales the partial output ``O = sum_i exp2((s_i - m)*c) y_i``
   and adds ``P @ Y_blk``. Scaling the differences (<= 0), never s itself, keeps every finite c free of
   overflow, so tiny sigma gives the nearest data point (the sigma -> 0 limit), not nan. D is far larger than an
   attention head (3072 for CIFAR-10), so the (BLOCK_M, D) partial output cannot live in registers:
   it lives in a float32 workspace (splits, B, D), read and written once per key block, instead of
   recomputing the logits once per output slice of D (D/BLOCK_D times the GEMM work).
2. Combine kernel, grid (row blocks, D slices): merges the splits with the usual log-sum-exp
   weights ``exp2((m_s - M)*c)`` and writes ``O/L`` in x's dtype (x itself where sigma = 0).

Neither launch forms the (B, N) weights. Inputs: float16/bfloat16/float32; float32 logits and
accumulators. For bfloat16/float16 inputs P is rounded to the input dtype before ``P @ Y`` (as
flash-attention does: tensor-core inputs) while L sums the unrounded weights: a weight that float16
flushes to 0 (below ~3e-8) drops its point from O only, i.e. counts it at the origin, which on
zero-mean data is closer than dropping it from L too. float32 inputs use IEEE float32 dots, never
TF32, because TF32's 10-bit mantissa would put errors of ~1e-3 into the logits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .philox import interpreting

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): the softmax runs in base 2 (exp2)


@triton.jit
def _load_tile(ptrs, row_ok, col_ok, EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr):
    """A 2-D tile, zero outside the masks; a mask known at compile time to be all-true is dropped
    (fewer live registers: the masks are per element)."""
    if EVEN_ROWS and EVEN_COLS:
        return tl.load(ptrs)
    elif EVEN_ROWS:
        return tl.load(ptrs, mask=col_ok[None, :], other=0.0)
    elif EVEN_COLS:
        return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        return tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def _store_tile(ptrs, value, row_ok, col_ok, EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr):
    if EVEN_ROWS and EVEN_COLS:
        tl.store(ptrs, value)
    elif EVEN_ROWS:
        tl.store(ptrs, value, mask=col_ok[None, :])
    elif EVEN_COLS:
        tl.store(ptrs, value, mask=row_ok[:, None])
    else:
        tl.store(ptrs, value, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _log2_scale(sigma):
    """``log2(e)/sigma^2`` clamped to the finite positive float32 range (the reference's ``inv_sq``): 1/sigma^2
    overflows below sigma ~ 1e-19 and underflows above ~1e19. sigma = 0 rows (x is returned) get log2(e)."""
    scale = LOG2E / tl.where(sigma > 0, sigma * sigma, 1.0)
    return tl.minimum(tl.maximum(scale, 1.1754943508222875e-38), 3.4028234663852886e38)


@triton.jit
def _optimal_denoiser_split_kernel(
        x_ptr, y_ptr, half_sq_ptr, sigma_ptr, ws_ptr, m_ptr, l_ptr,
        B, N, D, keys_per_split,
        PRECISION: tl.constexpr, DOT_F32: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
        EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    row_block = tl.program_id(0)
    split = tl.program_id(1)
    r = tl.arange(0, BLOCK_M)
    k = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    rows = row_block * BLOCK_M + r
    row_ok = rows < B
    scale = _log2_scale(tl.load(sigma_ptr + rows, mask=row_ok, other=1.0).to(tl.float32))
    # 64-bit scalar bases and 32-bit tile offsets (BLOCK * D < 2**31): a tile of 64-bit pointers would
    # cost two registers per element, and ptxas then spilled every configuration at 255 registers.
    x_base = x_ptr + (row_block * BLOCK_M).to(tl.int64) * D
    ws_base = ws_ptr + (split.to(tl.int64) * B + row_block * BLOCK_M) * D
    row_offs = r[:, None] * D + d[None, :]                   # (BLOCK_M, BLOCK_D) in x and the workspace
    key_offs = k[:, None] * D + d[None, :]                   # (BLOCK_N, BLOCK_D) in the data

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    key_begin = split * keys_per_split
    key_end = tl.minimum(N, key_begin + keys_per_split)
    for key0 in range(key_begin, key_end, BLOCK_N):
        key_ok = key0 + k < key_end
        y_base = y_ptr + tl.cast(key0, tl.int64) * D
        s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dim_ok = d0 + d < D
            xt = _load_tile(x_base + d0 + row_offs, row_ok, dim_ok, EVEN_M, EVEN_D)
            yt = _load_tile(y_base + d0 + key_offs, key_ok, dim_ok, EVEN_N, EVEN_D)
            if DOT_F32:
                xt = xt.to(tl.float32)
                yt = yt.to(tl.float32)
            s = tl.dot(xt, tl.trans(yt), s, input_precision=PRECISION)
        h = tl.load(half_sq_ptr + key0 + k, mask=key_ok, other=0.0).to(tl.float32)
        s = tl.where(key_ok[None, :], s - h[None, :], float("-inf"))
        # m_i and s stay unscaled: the differences (<= 0) are scaled, so no finite scale overflows them to +inf.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2((m_i - m_new) * scale)  # 0 on the first block (m_i = -inf; scale > 0)
        p = tl.exp2((s - m_new[:, None]) * scale[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p_in = p.to(y_ptr.dtype.element_ty)
        if DOT_F32:
            p_in = p_in.to(tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dim_ok = d0 + d < D
            if key0 == key_begin:  # the workspace is uninitialised: never read it on the first block
                o = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            else:
                o = _load_tile(ws_base + d0 + row_offs, row_ok, dim_ok, EVEN_M, EVEN_D) * alpha[:, None]
            yv = _load_tile(y_base + d0 + key_offs, key_ok, dim_ok, EVEN_N, EVEN_D)
            if DOT_F32:
                yv = yv.to(tl.float32)
            o = tl.dot(p_in, yv, o, input_precision=PRECISION)
            _store_tile(ws_base + d0 + row_offs, o, row_ok, dim_ok, EVEN_M, EVEN_D)
        m_i = m_new
    tl.store(m_ptr + split * B + rows, m_i, mask=row_ok)
    tl.store(l_ptr + split * B + rows, l_i, mask=row_ok)


@triton.jit
def _optimal_denoiser_combine_kernel(
        x_ptr, sigma_ptr, ws_ptr, m_ptr, l_ptr, out_ptr, B, D, splits,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < B
    tile_ok = row_ok[:, None] & (dims < D)[None, :]
    sigma = tl.load(sigma_ptr + rows, mask=row_ok, other=1.0)
    scale = _log2_scale(sigma)
    m_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for sp in range(0, splits):
        m_max = tl.maximum(m_max, tl.load(m_ptr + sp * B + rows, mask=row_ok, other=0.0))
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for sp in range(0, splits):
        w = tl.exp2((tl.load(m_ptr + sp * B + rows, mask=row_ok, other=0.0) - m_max) * scale)
        total += w * tl.load(l_ptr + sp * B + rows, mask=row_ok, other=0.0)
        o = tl.load(ws_ptr + (sp * B + rows).to(tl.int64)[:, None] * D + dims[None, :], mask=tile_ok, other=0.0)
        acc += o * w[:, None]
    res = acc / tl.where(row_ok, total, 1.0)[:, None]
    offs = rows.to(tl.int64)[:, None] * D + dims[None, :]
    x = tl.load(x_ptr + offs, mask=tile_ok, other=0.0).to(tl.float32)
    res = tl.where((sigma > 0)[:, None], res, x)
    tl.store(out_ptr + offs, res.to(out_ptr.dtype.element_ty), mask=tile_ok)


# GPU configurations. Each key block costs a read and a write of the (BLOCK_M, D) float32 partial
# output for 4*BLOCK_M*BLOCK_N*D flops, i.e. BLOCK_N/2 flop per workspace byte, so BLOCK_N is large.
# Not yet tuned on a GPU: bench/bench_optimal_denoiser.py --sweep times the alternatives.
GPU_CONFIGS = {
    "float32": {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_D": 32, "num_warps": 8, "num_stages": 2},
    "16bit": {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_D": 64, "num_warps": 8, "num_stages": 3},
}
SWEEP_CONFIGS = [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_D=d, num_warps=w, num_stages=s)
                 for m, n, d, w, s in ((64, 64, 64, 4, 3), (64, 128, 64, 8, 3), (64, 256, 64, 8, 2),
                                       (128, 128, 64, 8, 3), (64, 128, 32, 4, 4))]


def config(dtype: torch.dtype) -> dict:
    """Block sizes and launch options (``programs``: the grid size to aim for). The interpreter gets
    the smallest tl.dot tiles so the small test shapes still cross several key blocks, D slices and
    splits."""
    if interpreting():
        return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 16, "num_warps": 1, "num_stages": 1, "programs": 6}
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return {**GPU_CONFIGS["float32" if dtype == torch.float32 else "16bit"], "programs": 2 * sms}


def _check_32bit_limits(batch: int, n: int, dim: int, cfg: dict, keys_per_split: int, splits: int,
                        dim_blocks: int) -> None:
    """Raise where a launch would overflow the kernels' 32-bit offsets or CUDA's grid: tile offsets
    ``row * D + d`` within BLOCK_M (BLOCK_N) rows, key indices (loop counters reach ``N + keys_per_split``),
    the ``split * B + row`` statistics, and the combine grid's second axis (at most 65535 slices of D)."""
    tile_rows = max(cfg["BLOCK_M"], cfg["BLOCK_N"])
    if dim * tile_rows >= 2**31 or dim_blocks > 65535:
        limit = min((2**31 - 1) // tile_rows, 65535 * 128)
        raise ValueError(f"x: expected at most {limit} elements per row for the triton backend "
                         f"(32-bit tile offsets and grid), got {dim}")
    if n + keys_per_split >= 2**31 or splits * batch >= 2**31:
        raise ValueError(f"data: expected fewer than {2**31 - keys_per_split} rows, and batch * splits < 2**31 "
                         f"for the triton backend, got N = {n}, batch {batch}, {splits} splits")


def optimal_denoiser_launch(x, data, data_half_sq, sigma, out, cfg: dict | None = None) -> None:
    """Write ``D(x, sigma)`` into ``out`` (schema of ``diffkern::optimal_denoiser``).

    ``x``, ``out``: contiguous (B, D); ``data``: contiguous (N, D), x's dtype (float16, bfloat16 or
    float32); ``data_half_sq``: (N,) float32; ``sigma``: (B,) float32. ``cfg``: block sizes to use
    instead of :func:`config` (benchmark sweeps; not part of the op).
    """
    batch, dim = x.shape
    n = data.shape[0]
    if batch == 0 or dim == 0:
        return
    cfg = {**config(x.dtype), **(cfg or {})}
    row_blocks = triton.cdiv(batch, cfg["BLOCK_M"])
    key_blocks = triton.cdiv(n, cfg["BLOCK_N"])
    # Enough programs to fill the device; every split gets whole key blocks and none is empty. The
    # workspace is at most programs*BLOCK_M*D floats: 207 MB for D = 3072 on a 132-SM H100.
    splits = max(1, min(key_blocks, triton.cdiv(cfg["programs"], row_blocks)))
    keys_per_split = triton.cdiv(key_blocks, splits) * cfg["BLOCK_N"]
    splits = triton.cdiv(n, keys_per_split)
    combine_m, combine_d = 16, min(128, max(16, triton.next_power_of_2(dim)))
    _check_32bit_limits(batch, n, dim, cfg, keys_per_split, splits, triton.cdiv(dim, combine_d))
    ws = torch.empty((splits, batch, dim), dtype=torch.float32, device=x.device)
    m = torch.empty((splits, batch), dtype=torch.float32, device=x.device)
    l = torch.empty((splits, batch), dtype=torch.float32, device=x.device)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # tf32 only matters for float32 inputs
    # Triton 3.9's interpreter multiplies bfloat16 tl.dot operands as raw bits (max error 2e10 on a
    # 16x16 product of normals), so there the exactly-converted operands go through a float32 dot.
    dot_f32 = interpreting() and x.dtype == torch.bfloat16
    _optimal_denoiser_split_kernel[(row_blocks, splits)](
        x, data, data_half_sq, sigma, ws, m, l, batch, n, dim, keys_per_split,
        PRECISION=precision, DOT_F32=dot_f32, EVEN_M=batch % cfg["BLOCK_M"] == 0,
        EVEN_N=n % cfg["BLOCK_N"] == 0, EVEN_D=dim % cfg["BLOCK_D"] == 0,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    _optimal_denoiser_combine_kernel[(triton.cdiv(batch, combine_m), triton.cdiv(dim, combine_d))](
        x, sigma, ws, m, l, out, batch, dim, splits, BLOCK_M=combine_m, BLOCK_D=combine_d, num_warps=4)
