"""The counter-based normal noise every backend draws (reference implementation, pure PyTorch).

Generator (identical in ``csrc/common/philox.h`` and ``kernels/philox.py``). One Philox call gives the
four normals of a group of four consecutive indices (like cuRAND's ``curand_normal4``):

    key     = (seed_lo, seed_hi)                 the 64-bit seed read from a device tensor
    g, l    = idx >> 2, idx & 3                  group and lane of the 64-bit element index idx
    counter = (g_lo, g_hi, step, 0)              step = table row
    (r0, r1, r2, r3) = Philox4x32-10(counter, key)   (Salmon et al. 2011; the same rounds as
                                                       Triton's ``tl.philox`` and cuRAND's Philox4_32_10)
    u_k = float(int32(r_k) < 0 ? ~int32(r_k) : int32(r_k)) * 4.6566127342e-10     in [0, 1)
    (ua, ub) = (u_0, u_1) for lanes 0, 1;  (u_2, u_3) for lanes 2, 3
    rho = sqrt(-2 ln max(1e-7, ua)),  theta = 2 pi ub                              Box-Muller
    xi  = rho * cos(theta) for lanes 0, 2;  rho * sin(theta) for lanes 1, 3

Both Box-Muller outputs of a pair are used, so a normal costs a quarter of a Philox call and half a
log (the earlier layout drew one normal per call, from r0 and r1: about twice the instructions per
element on a GPU, where a noisy step is otherwise memory-bound). The arithmetic of the last three
lines runs in the compute dtype (float32, or float64 for float64 tensors), so backends agree to float
rounding. With per-sample seeds (``seed`` of shape (B,)) the key is ``seed[b]`` and idx is the
element's index inside its sample, so a sample's noise does not depend on the rest of the batch.
"""
from __future__ import annotations

import math
import numbers

import torch

_MASK = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
UNIFORM_SCALE = 4.6566127342e-10
ROUNDS = 10


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a*b for a 32-bit constant a and int64 tensor b holding uint32 values."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p1, p0 = a * b_hi, a * b_lo  # each < 2**48: exact in int64
    hi = (p1 + (p0 >> 16)) >> 16
    lo = (((p1 & 0xFFFF) << 16) + p0) & _MASK
    return hi, lo


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = ROUNDS):
    """Philox4x32 on int64 tensors holding uint32 values; returns the four output words."""
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK
        k1 = (k1 + _KEY_B) & _MASK
    return c0, c1, c2, c3


def _to_uniform(r: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    signed = torch.where(r >= 2**31, r - 2**32, r)  # reinterpret as int32
    signed = torch.where(signed < 0, -signed - 1, signed)  # ~x for negative x
    return signed.to(dtype) * UNIFORM_SCALE


def normal(seed: torch.Tensor, step: int, idx: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normals for element indices ``idx`` (int64) at table row ``step``.

    ``seed`` is an int64 tensor broadcastable against ``idx`` (one key per element). Returns a tensor
    of ``idx.shape`` in ``dtype`` (float32 or float64: the compute dtype).
    """
    seed = seed.to(torch.int64)
    k0 = seed & _MASK
    k1 = (seed >> 32) & _MASK
    idx = idx.to(torch.int64)
    group, lane = idx >> 2, idx & 3
    c0 = group & _MASK
    c1 = (group >> 32) & _MASK
    c2 = torch.full_like(idx, int(step) & _MASK)
    c3 = torch.zeros_like(idx)
    k0, k1 = torch.broadcast_tensors(k0, c0)[0], torch.broadcast_tensors(k1, c0)[0]
    r0, r1, r2, r3 = philox4x32(c0, c1, c2, c3, k0, k1)
    first_pair = lane < 2
    ua = torch.clamp(_to_uniform(torch.where(first_pair, r0, r2), dtype), min=1e-7)
    ub = _to_uniform(torch.where(first_pair, r1, r3), dtype)
    rho = torch.sqrt(-2.0 * torch.log(ua))
    theta = 2.0 * math.pi * ub
    return torch.where((lane & 1) == 0, rho * torch.cos(theta), rho * torch.sin(theta))


def noise_like(x: torch.Tensor, seed: torch.Tensor, step: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The noise tensor ``xi`` a fused op draws for state ``x`` at row ``step``.

    ``seed``: int64 tensor of shape (1,) (one stream) or (B,) with B = x.shape[0] (per-sample streams).
    Returns a contiguous tensor shaped like ``x`` in ``dtype`` (default: the compute dtype of x).
    """
    if dtype is None:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    n = x.numel()
    idx = torch.arange(n, device=x.device, dtype=torch.int64)
    seed = seed.reshape(-1).to(x.device)
    if seed.numel() > 1 and n > 0:
        per = n // seed.numel()
        key = seed.repeat_interleave(per)
        idx = idx % per
    else:
        key = seed[:1].expand(n) if n > 0 else seed[:0]
    return normal(key, step, idx, dtype).reshape(x.shape)

#----------------------------------------------------------------------------
# The stream as an op of its own: initial latents and tests of the counter (64-bit offsets) on
# every backend. Element i of ``out`` gets the normal of index ``offset + i`` (with per-sample
# seeds: index ``offset + i % per_sample`` under key ``seed[i // per_sample]``).

from . import _checks, _lib  # noqa: E402
from .registry import OpSpec, register, resolve  # noqa: E402


def philox_normal_reference(seed: torch.Tensor, step: int, offset: int, shape, dtype=torch.float32, device=None):
    """Reference stream: a tensor of ``shape`` whose flat element i is the normal at index offset + i."""
    out = torch.empty(shape, dtype=dtype, device=device if device is not None else seed.device)
    n = out.numel()
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    idx = torch.arange(n, device=out.device, dtype=torch.int64)
    seed = seed.reshape(-1)
    if seed.numel() > 1 and n > 0:
        per = n // seed.numel()
        key, idx = seed.repeat_interleave(per), idx % per
    else:
        key = seed[:1].expand(n)
    return normal(key, step, idx + offset, cdt).to(dtype).reshape(shape)


def _launch_reference(seed, step, offset, out):
    out.copy_(philox_normal_reference(seed, step, offset, out.shape, out.dtype, out.device))


def _fake(seed, step, offset, out):
    torch._check(seed.dtype == torch.int64, lambda: "seed: expected int64")


_lib.register_fake("philox_normal", _fake)


def _load_triton():
    from diffkern.kernels import philox_normal as k
    return _lib.triton_op("philox_normal", k.philox_normal_launch)


SPEC = register(OpSpec("philox_normal", {"reference": lambda: _launch_reference,
                                         "cpp": lambda: torch.ops.diffkern.philox_normal,
                                         "cuda": lambda: torch.ops.diffkern.philox_normal, "triton": _load_triton}))


def randn(shape, seed, *, step: int = 0, offset: int = 0, dtype=torch.float32, out=None, backend=None):
    """Standard normals from diffkern's counter-based stream; returns ``out`` (new unless given).

    Args:
        shape: output shape ``(B, ...)`` (ignored when ``out`` is given).
        seed: int64 tensor (1,) or (B,) (per-sample streams, B = shape[0]); its device is the output's.
        step, offset: counter coordinates (Python ints, offset >= 0 and < 2**63).
        dtype: float16/bfloat16/float32/float64.
    """
    _checks.tensor(seed, "seed")
    batch_name = "out" if out is not None else "shape"
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=seed.device)
    _checks.float_tensor(out, "out")
    seed = _checks.seed_tensor(seed, out, batch_name)
    _checks.no_partial_overlap({"out": out}, {}, {"seed": seed})
    for name, v in (("step", step), ("offset", offset)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):  # numpy ints too
            raise TypeError(f"{name}: expected a Python int, got {type(v).__name__}")
    step, offset = int(step), int(offset)
    if not 0 <= offset < 2**63 - max(out.numel(), 1):
        raise ValueError(f"offset: expected 0 <= offset < 2**63 - numel, got {offset}")
    if not 0 <= step < 2**32:
        raise ValueError(f"step: expected 0 <= step < 2**32, got {step}")
    _, launch = resolve("philox_normal", out.device.type, backend)
    work = out if out.is_contiguous() else torch.empty_like(out, memory_format=torch.contiguous_format)
    launch(seed, step, offset, work)
    if work is not out:
        out.copy_(work)
    return out
