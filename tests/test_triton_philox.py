"""Triton's side of the noise stream (``kernels/philox.py``): the Philox rounds against Triton's own
``tl.philox``, 64-bit counters, and the two ways a kernel draws the stream (elementwise for any indices, a
block of whole groups of four where the launcher knows the block is aligned), in the HOLD and likelihood
kernels too. The every-backend checks of the stream are in test_philox.py.
"""
import pytest
import torch

import diffkern.ops as dops
from diffkern.ops import philox
from diffkern.testing import assert_matches_reference, make_tensor

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from diffkern.kernels import philox as k_philox  # noqa: E402

INTERPRETING = k_philox.interpreting()
interpreter = pytest.mark.skipif(not INTERPRETING, reason="CPU tests of the triton backend need TRITON_INTERPRET=1")


def _id(v):
    return str(v).replace("torch.", "")



@triton.jit
def _rounds_kernel(c_ptr, seed_ptr, out_ptr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    c0 = tl.load(c_ptr + 4 * i).to(tl.uint32)
    c1 = tl.load(c_ptr + 4 * i + 1).to(tl.uint32)
    c2 = tl.load(c_ptr + 4 * i + 2).to(tl.uint32)
    c3 = tl.load(c_ptr + 4 * i + 3).to(tl.uint32)
    seed = tl.load(seed_ptr)
    r0, r1, r2, r3 = k_philox.philox4x32_10(c0, c1, c2, c3, seed.to(tl.uint32), (seed >> 32).to(tl.uint32))
    t0, t1, t2, t3 = tl.philox(seed, c0, c1, c2, c3, 10)
    row = out_ptr + 8 * i
    tl.store(row, r0.to(tl.int64))
    tl.store(row + 1, r1.to(tl.int64))
    tl.store(row + 2, r2.to(tl.int64))
    tl.store(row + 3, r3.to(tl.int64))
    tl.store(row + 4, t0.to(tl.int64))
    tl.store(row + 5, t1.to(tl.int64))
    tl.store(row + 6, t2.to(tl.int64))
    tl.store(row + 7, t3.to(tl.int64))


@pytest.mark.parametrize("seed", [0, 12345, -1, 2**62 + 2**33 + 7])
def test_rounds_match_tl_philox(seed):
    if not INTERPRETING and not torch.cuda.is_available():
        pytest.skip("triton needs TRITON_INTERPRET=1 or a CUDA device")
    device = "cpu" if INTERPRETING else "cuda"
    gen = torch.Generator().manual_seed(seed & 0xFFFF)
    counters = torch.randint(0, 2**32, (64, 4), generator=gen, dtype=torch.int64).to(device)
    out = torch.empty(64, 8, dtype=torch.int64, device=device)
    _rounds_kernel[(1,)](counters, torch.tensor([seed], device=device), out, BLOCK=64)
    ours = out[:, :4] & 0xFFFFFFFF
    torch.testing.assert_close(ours, out[:, 4:] & 0xFFFFFFFF, rtol=0, atol=0)
    ref = philox.philox4x32(*counters.cpu().T, torch.tensor(seed & 0xFFFFFFFF), torch.tensor((seed >> 32) & 0xFFFFFFFF))
    torch.testing.assert_close(ours.cpu(), torch.stack(ref, dim=1), rtol=0, atol=0)


@interpreter
@pytest.mark.parametrize("offset", [2**32 - 40, 2**63 - 2**20], ids=["lo-word-wraps", "near-2**63"])
@pytest.mark.parametrize("step", [0, 1, 2**32 - 1])
def test_64bit_counters(offset, step):
    seed = torch.tensor([-3, 2**33 + 1])
    for dtype in (torch.float64, torch.float32):
        out = dops.randn((2, 80), seed, step=step, offset=offset, dtype=dtype, backend="triton")
        ref64 = philox.philox_normal_reference(seed, step, offset, (2, 80), torch.float64)
        eager = philox.philox_normal_reference(seed, step, offset, (2, 80), dtype)
        assert_matches_reference(out, ref64, eager, f"offset {offset} step {step} {dtype}")

#----------------------------------------------------------------------------
# The two ways a kernel draws the stream (kernels/philox.py): elementwise for any indices, and a block of
# whole groups of four (one Philox call per group) where the launcher knows the block is aligned.


@triton.jit
def _both_paths_kernel(seed_ptr, elem_ptr, block_ptr, step, base, CDT: tl.constexpr, BLOCK: tl.constexpr):
    # The first index is computed in the kernel, as the launchers do: the interpreter hands an int argument
    # in [2**31, 2**32) over as int64 whose scalar >> is wrong there; int64 arithmetic on it first is right.
    first = tl.program_id(0).to(tl.int64) * BLOCK + base
    seed = tl.load(seed_ptr)
    i = tl.arange(0, BLOCK)
    tl.store(elem_ptr + tl.program_id(0) * BLOCK + i, k_philox.philox_normal(seed, step, first + i, CDT))
    tl.store(block_ptr + tl.program_id(0) * BLOCK + i, k_philox.philox_normal_block(seed, step, first, BLOCK, CDT))


@pytest.mark.parametrize("seed,step,base", [(7, 0, 0), (-3, 5, 2**32 - 8), (2**40 + 3, 2**32 - 1, 2**62 + 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=_id)
def test_block_helper_equals_elementwise(seed, step, base, dtype):
    """philox_normal_block gives bit for bit what philox_normal gives on the same indices (group j, pair k,
    cos/sin m at flat 4j + 2k + m), and both the reference stream."""
    if not INTERPRETING and not torch.cuda.is_available():
        pytest.skip("triton needs TRITON_INTERPRET=1 or a CUDA device")
    device = "cpu" if INTERPRETING else "cuda"
    block, programs = 64, 3
    elem, blk = (torch.empty(programs * block, dtype=dtype, device=device) for _ in range(2))
    _both_paths_kernel[(programs,)](torch.tensor([seed], device=device), elem, blk, step, base,
                                    CDT=k_philox.compute_dtype(dtype), BLOCK=block, enable_fp_fusion=False)
    torch.testing.assert_close(blk, elem, rtol=0, atol=0)
    idx = torch.arange(programs * block) + base
    ref64 = philox.normal(torch.tensor(seed), step, idx, torch.float64)
    assert_matches_reference(elem.cpu(), ref64, philox.normal(torch.tensor(seed), step, idx, dtype), "elementwise")


class _AlignedSpy:
    """Stands in for a kernel object: records the ALIGNED flag of each launch, then launches."""

    def __init__(self, kernel):
        self.kernel, self.flags = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.flags.append(kwargs["ALIGNED"])
            return self.kernel[grid](*args, **kwargs)
        return launch


@interpreter
@pytest.mark.parametrize("P,aligned", [(128, True), (66, False), (64, False)], ids=["P128", "P66", "P64-two-per-thread"])
@pytest.mark.parametrize("per_sample_seed", [False, True], ids=["seed1", "seedB"])
def test_hold_draws_the_stream_on_both_paths(monkeypatch, P, aligned, per_sample_seed):
    """HOLD's noise is the stream on the block path (P % 4 == 0 and >= 4 positions per thread: BLOCK = P on one
    warp here) and off it."""
    from diffkern.kernels import hold as k_hold
    from diffkern.ops.hold import hold_perturb, hold_transition, transition_table

    spies = {name: _AlignedSpy(getattr(k_hold, name)) for name in ("_hold_transition_kernel", "_hold_perturb_kernel")}
    for name, spy in spies.items():
        monkeypatch.setattr(k_hold, name, spy)
    n, B = 2, 3
    seed = torch.tensor([3, -1, 2**40] if per_sample_seed else [31])
    z = make_tensor((B, n, P))
    eye = torch.eye(n, dtype=torch.float64).expand(2, n, n)
    table = transition_table(torch.zeros(2, n, n, dtype=torch.float64), torch.zeros(2, n, dtype=torch.float64), eye)
    out = hold_transition(z, make_tensor((B, 1, P)), table, 1, seed=seed, backend="triton")  # = eta
    assert_matches_reference(out, philox.noise_like(z.double(), seed, 1), philox.noise_like(z, seed, 1), "eta")
    eps_out = torch.empty(B, 1, P)
    out = hold_perturb(z[:, :1], torch.zeros(B, n, 1, dtype=torch.float64), eye[:1].expand(B, n, n).contiguous(),
                       seed=seed, step=4, eps_out=eps_out, backend="triton")  # = eps
    assert_matches_reference(out, philox.noise_like(z.double(), seed, 4), philox.noise_like(z, seed, 4), "eps")
    torch.testing.assert_close(eps_out, out[:, n - 1:], rtol=0, atol=0)
    assert [spy.flags for spy in spies.values()] == [[aligned], [aligned]]


@interpreter
@pytest.mark.parametrize("shape,per_sample_seed,aligned", [
    ((3, 36), False, True), ((3, 35), False, False), ((1, 35), False, True), ((3, 35), True, True)],
    ids=["one-stream-36", "one-stream-35", "one-sample-35", "per-sample-35"])
def test_likelihood_draws_the_stream_on_both_paths(monkeypatch, shape, per_sample_seed, aligned):
    """likelihood_accum's in-kernel eps is randn's stream on the block path and off it: with y = D and cv = 1 the
    accumulated term is -eps**2, so acc = -weight * sum(eps**2) per sample."""
    from diffkern.kernels import likelihood as k_like

    spy = _AlignedSpy(k_like._likelihood_accum_kernel)
    monkeypatch.setattr(k_like, "_likelihood_accum_kernel", spy)
    seed = torch.arange(shape[0]) * 7 + 5 if per_sample_seed else torch.tensor([5])
    y = make_tensor(shape, torch.float64)
    one = torch.ones(1, dtype=torch.float64)
    acc = dops.likelihood_accum(y, y.clone(), one, one, torch.zeros(shape[0], dtype=torch.float64), cv=one, step=2,
                                seed=seed, backend="triton")
    eps = philox.philox_normal_reference(seed, 2, 0, shape, torch.float64)
    torch.testing.assert_close(acc, -(eps * eps).sum(dim=1), rtol=1e-12, atol=0)
    assert spy.flags == [aligned]
