"""Properties specific to the C++ CPU kernels (``csrc/cpu``); the every-backend comparisons against
the reference live in test_sampler_step.py, test_iadb.py and test_philox.py.

* Without noise, the kernels round exactly like the eager float32 (or float64) reference: both
  round each product and sum separately (csrc/common/hd.h), and the dtype conversions are torch's.
* Results do not depend on the thread count (the noise is counter-based, the blocks independent).
* 64-bit indexing: a float16 state of more than 2**31 elements is updated in place to its end.
* Direct calls through torch.ops.diffkern.* validate every argument and write nothing on error.
"""
from __future__ import annotations

import re

import pytest
import torch

import diffkern.ops as dops
from diffkern.ops import coefs, philox
from diffkern.ops.iadb import iadb_blend_reference
from diffkern.ops.sampler_step import sampler_step, sampler_step_reference
from diffkern.testing import DTYPES, assert_matches_reference

pytestmark = pytest.mark.skipif(dops.backend_status("cpp", "cpu")[1] is not None,
                                reason=f"C++ backend unavailable: {dops.backend_status('cpp', 'cpu')[1]}")

OPS = torch.ops.diffkern

# Rows exercising every term: deterministic, guidance + clip + history + g, zero c and s (skipped
# terms), explicit noise, and the history outputs e, f.
ROWS = {
    "ddim": coefs.row(a=0.9, b=0.1, p=1.3, q=-0.4),
    "explicit_noise": coefs.row(a=0.9, b=0.05, c=0.1, s=0.3, p=1.0, q=0.5),
    "all_terms": coefs.row(a=0.7, b=0.2, g=0.05, c=0.3, p=0.5, q=0.8, w=3.0, e=1.0, f=-0.25, clip=1.5),
    "zero_c": coefs.row(a=0.5, b=0.5, c=0.0, e=0.0, f=1.0, clip=0.3),
}


def _rand(shape, dtype, gen, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def _outputs(x):
    return torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)

#----------------------------------------------------------------------------
# Bitwise agreement with the eager reference (noise-free rows, explicit noise).


@pytest.mark.parametrize("state", DTYPES, ids=str)
@pytest.mark.parametrize("model", DTYPES, ids=str)
@pytest.mark.parametrize("row", sorted(ROWS))
def test_step_is_bitwise_the_eager_reference(state, model, row):
    gen = torch.Generator().manual_seed(0)
    shape = (3, 1037)  # 3111 elements: partial blocks of 256
    x, h, noise = (_rand(shape, state, gen) for _ in range(3))
    m, u = _rand(shape, model, gen), _rand(shape, model, gen)
    table = coefs.table([ROWS[row]])
    kw = dict(model_out_uncond=u if row == "all_terms" else None, history=h, noise=noise)
    out, x0, hn = _outputs(x)
    sampler_step(x, m, table, 0, out=out, x0_out=x0, history_out=hn, backend="cpp", **kw)
    for got, want, what in zip((out, x0, hn), sampler_step_reference(x, m, table, 0, **kw), ("out", "x0", "h")):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda s: f"{what}: {s}")


@pytest.mark.parametrize("state", DTYPES, ids=str)
def test_in_place_and_large_parallel_step(state):
    """out is x and history_out is history, over several parallel tasks (grain 32K elements)."""
    gen = torch.Generator().manual_seed(1)
    x, h, noise = (_rand((5, 20011), state, gen) for _ in range(3))
    m = _rand((5, 20011), torch.float32, gen)
    table = coefs.table([ROWS["all_terms"], coefs.row(a=1.0, s=0.5, c=-0.5, e=0.3, f=0.7)])
    for step in range(2):
        want = sampler_step_reference(x, m, table, step, history=h, noise=noise)
        x0 = torch.empty_like(x)
        sampler_step(x, m, table, step, history=h, noise=noise, out=x, x0_out=x0, history_out=h, backend="cpp")
        for got, ref in zip((x, x0, h), want):
            torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.parametrize("state", DTYPES, ids=str)
def test_iadb_blend_is_bitwise_the_eager_reference(state):
    gen = torch.Generator().manual_seed(2)
    x0, x1 = _rand((4, 3, 333), state, gen), _rand((4, 3, 333), state, gen)
    for alpha in (torch.rand(4, generator=gen, dtype=torch.float64), torch.rand(4, generator=gen).half()):
        out, target = torch.empty_like(x0), torch.empty_like(x0)
        OPS.iadb_blend(x0, x1, alpha, out, target)
        want = iadb_blend_reference(x0, x1, alpha)
        torch.testing.assert_close(out, want[0], rtol=0, atol=0)
        torch.testing.assert_close(target, want[1], rtol=0, atol=0)


def test_conversions_are_torchs():
    """float32 -> float16/bfloat16 rounds to nearest even like torch, including subnormals, overflow to
    inf and NaN; float16/bfloat16 -> float32 is exact for every bit pattern. Seen through x0_out = m
    (row p=0, q=1, clip=inf), which stores the model output converted to the state dtype."""
    table = coefs.table([coefs.row(a=0.0, b=1.0, p=0.0, q=1.0)])
    gen = torch.Generator().manual_seed(3)
    size = (1 << 18,)
    exponent = torch.randint(95, 145, size, generator=gen)  # 2**-32 .. 2**17: float16's range and past it
    mantissa = torch.randint(0, 2**23, size, generator=gen)
    bits = (torch.randint(0, 2, size, generator=gen) << 31) | (exponent << 23) | mantissa
    f32 = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)
    specials = torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 2**-24, 2**-25, 3 * 2**-26, 2**-14 - 2**-26,
                             float("inf"), -float("inf"), float("nan"), 3.4e38, 1e-45])
    f32 = torch.cat([f32, specials])
    for state in (torch.float16, torch.bfloat16):
        x = torch.ones_like(f32, dtype=state)
        x0 = torch.empty_like(x)
        sampler_step(x, f32, table, 0, x0_out=x0, backend="cpp")
        torch.testing.assert_close(x0, f32.to(state), rtol=0, atol=0, equal_nan=True)
    for model in (torch.float16, torch.bfloat16):
        every = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(model)
        x = torch.ones_like(every, dtype=torch.float32)
        x0 = torch.empty_like(x)
        sampler_step(x, every, table, 0, x0_out=x0, backend="cpp")
        torch.testing.assert_close(x0, every.float(), rtol=0, atol=0, equal_nan=True)

#----------------------------------------------------------------------------
# Philox noise: against the reference, and independent of the thread count.


@pytest.mark.parametrize("state", DTYPES, ids=str)
def test_philox_noise_per_sample_seeds(state):
    gen = torch.Generator().manual_seed(4)
    x, m = _rand((3, 5, 67), state, gen), _rand((3, 5, 67), state, gen)
    seed = torch.tensor([5, -1, 2**62 + 3], dtype=torch.int64)
    table = coefs.table([coefs.row(a=0.8, b=0.1, s=0.6)] * 4)
    out = sampler_step(x, m, table, 3, seed=seed, backend="cpp")
    ref = sampler_step_reference(x.double(), m.double(), table, 3, seed=seed)[0]
    assert_matches_reference(out, ref, sampler_step_reference(x, m, table, 3, seed=seed)[0], f"noise {state}")


def test_results_do_not_depend_on_thread_count():
    gen = torch.Generator().manual_seed(5)
    x, m = _rand((7, 30011), torch.float32, gen), _rand((7, 30011), torch.bfloat16, gen)
    seed = torch.arange(7, dtype=torch.int64) * 1000003
    table = coefs.table([coefs.row(a=0.8, b=0.1, s=0.6, e=1.0)])
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            hn = torch.empty_like(x)
            out = sampler_step(x, m, table, 0, seed=seed, history_out=hn, backend="cpp")
            noise = philox.randn((7, 30011), seed, step=2, offset=2**33, backend="cpp")
            results.append((out, hn, noise))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        torch.testing.assert_close(one, two, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_philox_normal_64bit_counter(dtype):
    """Offsets across the 2**32 boundary of the counter's low word, one stream and per-sample."""
    for seed in (torch.tensor([2**40 + 9]), torch.tensor([1, 2, 3])):
        out = torch.empty(3, 2000, dtype=dtype)
        OPS.philox_normal(seed, 7, 2**32 - 1000, out)
        ref = philox.philox_normal_reference(seed, 7, 2**32 - 1000, out.shape, torch.float64)
        eager = philox.philox_normal_reference(seed, 7, 2**32 - 1000, out.shape, dtype)
        assert_matches_reference(out, ref, eager, f"philox_normal {dtype}")

#----------------------------------------------------------------------------
# 64-bit indexing.


def _available_gib() -> float:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) / 2**20


@pytest.mark.skipif(_available_gib() < 5, reason="needs 4.4 GiB of free memory (a float16 state of 2**31+ elements)")
def test_float16_state_over_2_31_elements_in_place():
    """x (float16, 2**31 + 4099 elements, 4 GiB) is its own model output and output: every index past
    2**31 must be read and written at its place. Measured on the 2-core CPU: 2.5 s (16 s with the
    machine shared), peak RSS 4.4 GiB."""
    n = 2**31 + 4099
    x = torch.full((n,), 0.5, dtype=torch.float16)
    gen = torch.Generator().manual_seed(6)
    slices = [slice(0, 4096), slice(2**31 - 3000, 2**31 + 3000), slice(n - 4096, n)]
    for sl in slices:
        x[sl] = torch.randn(sl.stop - sl.start, generator=gen).half()
    saved = [x[sl].clone() for sl in slices]
    table = coefs.table([coefs.row(a=0.5, b=1.0, p=1.0, q=1.0)])  # out = 0.5*x + 2*x
    sampler_step(x, x, table, 0, out=x, backend="cpp")
    seed = torch.zeros(1, dtype=torch.int64)
    for sl, before in zip(slices, saved):
        want = sampler_step_reference(before, before, table, 0, seed=seed)[0]
        torch.testing.assert_close(x[sl], want, rtol=0, atol=0)
    spread = x[:: 2**20 + 7]
    untouched_fill = (spread == 0.5).sum().item()
    assert untouched_fill == 0, f"{untouched_fill} sampled elements were not updated"
    del x

#----------------------------------------------------------------------------
# Direct calls: every argument validated, nothing written on error.


def _step_args(**override):
    x = torch.randn(3, 8)
    args = dict(x=x, model_out=torch.randn(3, 8), model_out_uncond=None, history=None, noise=None,
                coef=coefs.table([coefs.row(a=1.0)] * 2), step=1, seed=torch.zeros(1, dtype=torch.int64),
                out=torch.full((3, 8), 7.0), x0_out=None, history_out=None)
    args.update(override)
    return args


STEP_ERRORS = {
    "x non-contiguous": (dict(x=torch.randn(8, 3).t()), "x: expected a contiguous tensor"),
    "x integer": (dict(x=torch.zeros(3, 8, dtype=torch.int32)), "x: expected dtype float16, bfloat16"),
    "model_out shape": (dict(model_out=torch.randn(3, 9)), "model_out: expected shape [3, 8] (that of x)"),
    "uncond dtype": (dict(model_out_uncond=torch.randn(3, 8).half()), "model_out_uncond: expected dtype Float"),
    "history dtype": (dict(history=torch.randn(3, 8).double()), "history: expected dtype Float (that of x)"),
    "noise shape": (dict(noise=torch.randn(24)), "noise: expected shape [3, 8]"),
    "out dtype": (dict(out=torch.zeros(3, 8).half()), "out: expected dtype Float"),
    "x0_out shape": (dict(x0_out=torch.zeros(3, 7)), "x0_out: expected shape"),
    "coef dtype": (dict(coef=torch.zeros(2, 12)), "coef: expected dtype float64"),
    "coef shape": (dict(coef=torch.zeros(2, 11, dtype=torch.float64)), "coef: expected shape (N, 16)"),
    "step past end": (dict(step=2), "step: 2 is out of range for a coefficient table of 2 rows"),
    "step negative": (dict(step=-1), "step: -1 is out of range"),
    "seed dtype": (dict(seed=torch.zeros(1, dtype=torch.int32)), "seed: expected dtype int64"),
    "seed numel": (dict(seed=torch.zeros(2, dtype=torch.int64)),
                   "seed: expected shape (1,) or (B,) with B = x.shape[0] = 3"),
    "outputs overlap": (dict(x0_out="out"), "out: overlaps x0_out; outputs must be distinct"),
    "partial overlap": (dict(history="out_shifted"), "out: overlaps history without being the same tensor"),
}


@pytest.mark.parametrize("case", sorted(STEP_ERRORS))
def test_sampler_step_direct_call_errors(case):
    override, message = STEP_ERRORS[case]
    args = _step_args(**{k: v for k, v in override.items() if not isinstance(v, str)})
    base = torch.zeros(64)
    if override.get("x0_out") == "out":
        args["x0_out"] = args["out"]
    if override.get("history") == "out_shifted":
        args["out"], args["history"] = base[:24].view(3, 8), base[1:25].view(3, 8)
        base.fill_(7.0)
    before = args["out"].clone()
    with pytest.raises(RuntimeError, match=re.escape(message)):
        OPS.sampler_step(*args.values())
    torch.testing.assert_close(args["out"], before, rtol=0, atol=0, msg="a failed call wrote its output")


def test_iadb_blend_direct_call_errors():
    x0, x1, out = torch.randn(3, 5), torch.randn(3, 5), torch.full((3, 5), 7.0)
    cases = [((x0, x1, torch.rand(2), out, None), "alpha: expected shape (3,) (one per sample of x0)"),
             ((torch.randn(()), torch.randn(()), torch.rand(1), torch.zeros(()), None), "x0: expected a batched"),
             ((x0, x1.double(), torch.rand(3), out, None), "x1: expected dtype Float (that of x0)"),
             ((x0, x1, torch.rand(3), out, torch.zeros(3, 4)), "target_out: expected shape"),
             ((x0, x1, torch.rand(3).int(), out, None), "alpha: expected dtype float16")]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=re.escape(message)):
            OPS.iadb_blend(*args)
    torch.testing.assert_close(out, torch.full((3, 5), 7.0), rtol=0, atol=0)


def test_philox_normal_direct_call_errors():
    out, seed = torch.full((2, 5), 7.0), torch.zeros(1, dtype=torch.int64)
    cases = [((seed, -1, 0, out), "step: expected 0 <= step < 2**32"),
             ((seed, 2**32, 0, out), "step: expected 0 <= step < 2**32"),
             ((seed, 0, -3, out), "offset: expected 0 <= offset < 2**63 - numel"),
             ((seed, 0, 2**63 - 10, out), "offset: expected 0 <= offset < 2**63 - numel"),
             ((torch.zeros(3, dtype=torch.int64), 0, 0, out), "seed: expected shape (1,) or (B,)"),
             ((seed, 0, 0, torch.zeros(2, 5, dtype=torch.int64)), "out: expected dtype float16")]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=re.escape(message)):
            OPS.philox_normal(*args)
    torch.testing.assert_close(out, torch.full((2, 5), 7.0), rtol=0, atol=0)


def test_empty_tensors_are_a_no_op():
    x = torch.empty(0, 3)
    OPS.sampler_step(x, x, None, None, None, coefs.table([coefs.row(s=1.0)]), 0, torch.zeros(1, dtype=torch.int64),
                     torch.empty(0, 3), None, None)
    OPS.iadb_blend(x, x, torch.empty(0), torch.empty(0, 3), None)
    OPS.philox_normal(torch.zeros(1, dtype=torch.int64), 0, 0, torch.empty(0, 4))


def test_direct_calls_refuse_outputs_over_shared_inputs():
    """The binding's own check (the front-end has one too): no output may overlap the table or the seeds."""
    base = torch.zeros(2 * coefs.NCOEF, dtype=torch.float64)
    coef, out = base.view(2, coefs.NCOEF), base.view(torch.float32)[:24].view(3, 8)
    coef.copy_(coefs.table([coefs.row(a=1.0)] * 2))
    before = coef.clone()
    with pytest.raises(RuntimeError, match="out: overlaps coef, which every element reads"):
        OPS.sampler_step(*_step_args(coef=coef, out=out).values())
    assert torch.equal(coef, before)
    seed = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="out: overlaps seed, which every element reads"):
        OPS.philox_normal(seed, 0, 0, seed.view(torch.float32).view(2, 2))
    assert not seed.any()
