"""The counter-based noise stream (``diffkern/ops/philox.py``): the generator, the ``philox_normal`` op on
every usable backend (``diffkern.ops.randn``), and the statistics of its normals.
"""
import math

import pytest
import torch

import diffkern.ops as dops
from diffkern.ops import philox
from diffkern.testing import DTYPES, SHAPES, assert_matches_reference, noncontiguous, usable_backends

scipy_stats = pytest.importorskip("scipy.stats")


def _id(v):
    return str(v).replace("torch.", "")


def _seed(*values):
    return torch.tensor(values, dtype=torch.int64)


def _stream64(shape, seed, step=0, offset=0):
    return dops.randn(shape, seed, step=step, offset=offset, dtype=torch.float64, backend="reference")


def _check_stream(backend, shape, seed, step=0, offset=0, dtype=torch.float32, what=""):
    """``randn`` on ``backend`` against the float64 reference stream (eager: the reference in ``dtype``)."""
    out = dops.randn(shape, seed, step=step, offset=offset, dtype=dtype, backend=backend)
    eager = dops.randn(shape, seed, step=step, offset=offset, dtype=dtype, backend="reference")
    assert_matches_reference(out, _stream64(shape, seed, step, offset), eager, f"[{backend}] {what}")
    return out


def _uncorrelated(a, b, what):
    """|Pearson r| below 5 standard errors of r under independence (fails with probability < 1e-6)."""
    a, b = a.flatten().double(), b.flatten().double()
    r = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    assert abs(r) < 5 / math.sqrt(a.numel()), f"{what}: correlation {r:.4f} over {a.numel()} pairs"

#----------------------------------------------------------------------------
# The generator: Philox4x32-10 known-answer vectors (Random123's kat_vectors, Salmon et al. 2011).


@pytest.mark.parametrize("counter,key,expected", [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
], ids=["zeros", "ones", "pi"])
def test_philox4x32_10_known_answers(counter, key, expected):
    words = philox.philox4x32(*[torch.tensor([v], dtype=torch.int64) for v in counter + key])
    assert tuple(int(w) for w in words) == expected

#----------------------------------------------------------------------------
# The op on every backend: same seed, step and offset give the same normals (to float rounding).


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_matches_reference(cpu_backend, dtype, shape):
    _check_stream(cpu_backend, shape, _seed(2024), step=3, dtype=dtype, what=f"{shape} {dtype}")


@pytest.mark.parametrize("shape", [(4, 3, 5, 7), (3, 1025), (5,), (0, 4)], ids=_id)
def test_per_sample_seeds_match_reference(cpu_backend, shape):
    seed = torch.arange(shape[0], dtype=torch.int64) * 1000003 - 7
    _check_stream(cpu_backend, shape, seed, step=1, what=f"per-sample {shape}")


@pytest.mark.parametrize("offset", [2**32 - 5, 2**32, 2**32 + 1, 2**40 + 12345, 2**62 + 3], ids=hex)
def test_64bit_offsets_agree(cpu_backend, offset):
    """The element index is 64-bit (low and high words of the counter): offsets past 2**32 agree too."""
    _check_stream(cpu_backend, (3, 41), _seed(11), step=2, offset=offset, what=f"offset {offset:#x}")


@pytest.mark.parametrize("offset", range(8))
@pytest.mark.parametrize("shape", [(1,), (3,), (2, 5), (3, 9), (4, 4)], ids=_id)
def test_every_group_alignment(cpu_backend, shape, offset):
    """Four normals share one Philox call (group idx >> 2): runs that start or end inside a group, with one
    stream or per-sample streams of any length, match the reference."""
    _check_stream(cpu_backend, shape, _seed(31), step=6, offset=offset, what=f"offset {offset}")
    seeds = torch.arange(shape[0], dtype=torch.int64) + 100
    _check_stream(cpu_backend, shape, seeds, step=6, offset=offset, what=f"per-sample, offset {offset}")


def test_group_layout():
    """The spec of ``philox.normal``: lanes 0, 1 are (rho cos, rho sin) of the words r0, r1 of the group's
    Philox call, lanes 2, 3 those of r2, r3."""
    seed, step, group = 12345, 3, 2**33 + 7
    words = philox.philox4x32(*[torch.tensor([v], dtype=torch.int64)
                                for v in (group & 0xFFFFFFFF, group >> 32, step, 0, seed, 0)])
    u = [philox._to_uniform(w, torch.float64) for w in words]
    got = philox.normal(torch.tensor(seed), step, torch.arange(4 * group, 4 * group + 4), torch.float64)
    for pair in (0, 1):
        rho = torch.sqrt(-2 * torch.log(u[2 * pair].clamp(min=1e-7)))
        theta = 2 * math.pi * u[2 * pair + 1]
        torch.testing.assert_close(got[2 * pair:2 * pair + 2], torch.cat([rho * torch.cos(theta), rho * torch.sin(theta)]))


def test_offset_shifts_the_stream(cpu_backend):
    """Element i at offset o is element i + k at offset o - k, across the 2**32 boundary."""
    base = 2**32 - 40
    long = dops.randn((100,), _seed(5), offset=base, backend=cpu_backend)
    for k in (1, 39, 40, 41):
        shifted = dops.randn((100 - k,), _seed(5), offset=base + k, backend=cpu_backend)
        torch.testing.assert_close(shifted, long[k:], rtol=0, atol=0, msg=lambda m: f"shift {k}: {m}")


def test_per_sample_seed_independent_of_batch(cpu_backend):
    """Sample b of a batch with seeds (B,) is the one-sample stream of seed[b], whatever the rest of the batch."""
    seeds = _seed(3, 1, 4, 1, 5)
    batch = dops.randn((5, 2, 3, 7), seeds, step=4, backend=cpu_backend)
    for b in range(5):
        alone = dops.randn((1, 2, 3, 7), seeds[b:b + 1], step=4, backend=cpu_backend)
        torch.testing.assert_close(batch[b:b + 1], alone, rtol=0, atol=0, msg=lambda m: f"sample {b}: {m}")
    torch.testing.assert_close(batch[1], batch[3], rtol=0, atol=0)  # equal seeds, equal samples


def test_streams_differ(cpu_backend):
    """Different seeds (low or high word), steps and non-overlapping offsets give unrelated streams."""
    n = 8192
    ref = dops.randn((n,), _seed(1), backend=cpu_backend)
    others = {"seed 2": dops.randn((n,), _seed(2), backend=cpu_backend),
              "seed 1 + 2**32": dops.randn((n,), _seed(1 + 2**32), backend=cpu_backend),
              "seed -1": dops.randn((n,), _seed(-1), backend=cpu_backend),
              "step 1": dops.randn((n,), _seed(1), step=1, backend=cpu_backend),
              "step 2**31": dops.randn((n,), _seed(1), step=2**31, backend=cpu_backend),
              "offset n": dops.randn((n,), _seed(1), offset=n, backend=cpu_backend),
              "offset 2**32": dops.randn((n,), _seed(1), offset=2**32, backend=cpu_backend)}
    for what, other in others.items():
        _uncorrelated(ref, other, what)
    _uncorrelated(ref[:-1], ref[1:], "lag 1")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
def test_noncontiguous_out(cpu_backend, dtype):
    out = noncontiguous(torch.full((6, 9), float("nan"), dtype=dtype))
    assert dops.randn(None, _seed(8), step=1, out=out, backend=cpu_backend) is out
    expected = dops.randn((6, 9), _seed(8), step=1, dtype=dtype, backend="reference")
    assert_matches_reference(out, _stream64((6, 9), _seed(8), 1), expected, "non-contiguous out")


def test_sampler_step_draws_the_same_stream(cpu_backend):
    """The fused step's xi (offset 0, counter step = table row) is ``randn`` at that step."""
    from diffkern.ops import coefs

    x = torch.zeros(3, 4, 5)
    table = coefs.table([coefs.row(s=1.0, q=0.0)] * 3)
    for seed in (_seed(77), _seed(7, 8, 9)):
        out = dops.sampler_step(x, x, table, 2, seed=seed, backend=cpu_backend)
        torch.testing.assert_close(out, dops.randn((3, 4, 5), seed, step=2, backend=cpu_backend))

#----------------------------------------------------------------------------
# Statistics of 1e6 draws. Thresholds are fixed before looking at the data: 5 standard errors for the
# moments (a correct generator fails with probability < 1e-6) and p >= 1e-3 for the KS test. The seed is
# fixed, so the outcome is deterministic; no threshold was tuned to pass.


def test_normal_statistics():
    backend = "cpp" if "cpp" in usable_backends("cpu") else "reference"
    n = 10**6
    draws = dops.randn((n,), _seed(20240229), step=7, backend=backend).double()
    mean, var = float(draws.mean()), float(draws.var())
    assert abs(mean) < 5 / math.sqrt(n), f"mean {mean}"
    assert abs(var - 1) < 5 * math.sqrt(2 / n), f"variance {var}"
    assert scipy_stats.kstest(draws.numpy(), "norm").pvalue >= 1e-3
    _uncorrelated(draws[:-1], draws[1:], "lag 1")
    _uncorrelated(draws[:-1].abs(), draws[1:].abs(), "lag 1 of |xi|")  # the two Box-Muller words are coupled

#----------------------------------------------------------------------------
# Bad input: an error naming the argument, and nothing written into ``out``.


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"seed": _seed(1).int()}, TypeError, r"^seed: expected dtype torch.int64"),
    ({"seed": torch.tensor([1.0])}, TypeError, r"^seed: expected dtype torch.int64"),
    ({"seed": [1]}, TypeError, r"^seed: expected a torch.Tensor"),
    ({"seed": _seed(1, 2, 3)}, ValueError, r"^seed: expected shape \(1,\) or \(B,\)"),
    ({"seed": _seed(1).to("meta")}, ValueError, r"^seed: expected device"),
    ({"offset": -1}, ValueError, r"^offset: expected 0 <= offset"),
    ({"offset": 2**63}, ValueError, r"^offset: expected 0 <= offset"),
    ({"offset": 1.0}, TypeError, r"^offset: expected a Python int"),
    ({"step": -1}, ValueError, r"^step: expected 0 <= step < 2\*\*32"),
    ({"step": 2**32}, ValueError, r"^step: expected 0 <= step < 2\*\*32"),
    ({"step": torch.tensor(1)}, TypeError, r"^step: expected a Python int"),
    ({"out": torch.zeros(2, 4, dtype=torch.int32)}, TypeError, r"^out: expected a floating dtype"),
], ids=str)
def test_bad_input_raises_and_writes_nothing(cpu_backend, kwargs, exc, match):
    kwargs = dict(kwargs)  # the parametrised dict is shared by every backend's case
    out = kwargs.pop("out", None)
    out = torch.full((2, 4), 7.0) if out is None else out
    before = out.clone()
    args = {"seed": _seed(1), **kwargs}
    with pytest.raises(exc, match=match):
        dops.randn(None, args.pop("seed"), out=out, backend=cpu_backend, **args)
    torch.testing.assert_close(out, before, rtol=0, atol=0)

#----------------------------------------------------------------------------
# CUDA (skipped without a GPU).


@pytest.mark.cuda
@pytest.mark.parametrize("backend", usable_backends("cuda"))
@pytest.mark.parametrize("offset", [0, 2**32 - 5, 2**40 + 12345], ids=hex)
def test_cuda_matches_reference(backend, offset):
    for dtype in DTYPES:
        for seed in (_seed(9), _seed(1, 2, 3)):
            seed = seed.cuda()
            out = dops.randn((3, 1025), seed, step=5, offset=offset, dtype=dtype, backend=backend)
            eager = dops.randn((3, 1025), seed, step=5, offset=offset, dtype=dtype, backend="reference")
            assert_matches_reference(out.cpu(), _stream64((3, 1025), seed.cpu(), 5, offset), eager.cpu(), str(dtype))
