"""Regression tests from a review of the C++ CPU kernels (csrc/cpu, csrc/common).

Direct calls of the compiled ops (torch.ops.diffkern.*), past the Python front-ends: the bindings must
validate on their own, and the stream and the dtype conversions must match the references bitwise or
to float rounding at the edges (64-bit Philox counters, runs that start mid-group, float16/bfloat16
rounding, subnormals, inf and NaN).
"""
import pytest
import torch

import diffkern.ops  # noqa: F401  (registers torch.ops.diffkern.*)
from diffkern.ops import coefs, philox

F64 = torch.float64
ops = torch.ops.diffkern


def _likelihood_args(y):
    one = torch.ones(1, dtype=F64)
    return dict(denoised=torch.zeros_like(y), noise=None, sigma=one, weight=one, cv=one, step=0,
                seed=torch.zeros(1, dtype=torch.int64))


def _likelihood(y, acc, **kw):
    a = {**_likelihood_args(y), **kw}
    ops.likelihood_accum(y, a["denoised"], a["noise"], a["sigma"], a["weight"], a["cv"], a["step"], a["seed"], acc)


def test_likelihood_op_rejects_acc_overlapping_points():
    """acc written per sample while other samples' tasks read y: a partial overlap must raise, not race."""
    buf = torch.randn(4 * 8)
    y = buf.view(4, 8)
    with pytest.raises(RuntimeError, match="acc: overlaps y"):
        _likelihood(y, buf[3:7])


def test_likelihood_op_rejects_acc_overlapping_shared_scalars():
    y = torch.randn(4, 8, dtype=F64)
    for name in ("sigma", "weight", "cv"):
        shared = torch.ones(4, dtype=F64)
        with pytest.raises(RuntimeError, match=f"acc: overlaps {name}"):
            _likelihood(y, shared, **{name: shared})


def test_likelihood_op_exact_inplace_matches_out_of_place():
    """acc may be exactly y (one element per sample): each sample reads y[b] before writing acc[b]."""
    y = torch.randn(5, dtype=torch.float32)
    noise = torch.randn(5)
    expected = torch.zeros(5)
    _likelihood(y.clone(), expected, noise=noise)
    work = y.clone()
    _likelihood(work, work, noise=noise)
    torch.testing.assert_close(work, y + expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("offset", [4 * 2**32 - 6, 4 * 2**32 - 1, 4 * (2**32 - 9) + 3, 2**62 + 1])
def test_philox_normal_counter_crosses_2pow32(offset):
    """Groups whose low counter word wraps (carry into the high word, also inside an 8-lane vector),
    from a start that is not a multiple of 4, across several 256-element blocks."""
    seed = torch.tensor([0x1234_5678_9ABC_DEF], dtype=torch.int64)
    for dtype, tol in ((torch.float32, 2e-5), (F64, 1e-12)):
        out = torch.empty(777, dtype=dtype)
        ops.philox_normal(seed, 3, offset, out)
        ref = philox.philox_normal_reference(seed, 3, offset, out.shape, dtype)
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


def test_philox_normal_per_sample_runs_cross_groups():
    """Per-sample streams whose sample length is not a multiple of 4 restart at offset under each key."""
    seed = torch.tensor([7, -3, 2**40 + 5], dtype=torch.int64)
    offset = 2**34 - 2
    out = torch.empty(3, 37, 11)
    ops.philox_normal(seed, 9, offset, out)
    ref = philox.philox_normal_reference(seed, 9, offset, out.shape, torch.float32)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)


def _conversion_values():
    """float32 values at the float16/bfloat16 rounding edges, plus random bit patterns."""
    edges = [0.0, -0.0, 65504.0, 65519.99, 65520.0, -65520.0, 2.0**-14, 2.0**-24, 2.0**-25, 3 * 2.0**-26,
             2.0**-25 + 2.0**-40, 6.1e-5, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8,
             3.3895314e38, float("inf"), float("-inf"), 1e-45, -1e-40]
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31, (4093,), generator=g, dtype=torch.int64).to(torch.int32)
    return torch.cat([torch.tensor(edges, dtype=torch.float32), bits.view(torch.float32)])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_storage_conversion_matches_torch(dtype):
    """x0_out = half/bf16(model_out) through sampler_step (p = 0, q = 1, clip = inf), at every position of a
    length that is not a multiple of 8, so both the F16C body and the bit-level tail convert each value."""
    vals = _conversion_values()
    # No NaN (its bits are not specified) and no -0.0: d_raw = 0*x + 1*m is +0.0 for m = -0.0.
    vals = vals[~vals.isnan() & ~((vals == 0) & vals.signbit())]
    coef = torch.zeros(1, coefs.NCOEF, dtype=F64)
    coef[0, coefs.Q] = 1.0
    coef[0, coefs.CLIP] = float("inf")
    seed = torch.zeros(1, dtype=torch.int64)
    for shift in range(8):
        m = torch.roll(vals, shift)[: 8 * (vals.numel() // 8) - 1 - shift]
        x = torch.zeros(m.shape, dtype=dtype)
        out, x0 = torch.empty_like(x), torch.empty_like(x)
        ops.sampler_step(x, m, None, None, None, coef, 0, seed, out, x0, None)
        expected = m.to(dtype)
        assert torch.equal(x0.view(torch.int16), expected.view(torch.int16)), f"shift {shift}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_storage_nan_stays_nan(dtype):
    vals = torch.tensor([float("nan")] * 13 + [1.0] * 3, dtype=torch.float32)
    coef = torch.zeros(1, coefs.NCOEF, dtype=F64)
    coef[0, coefs.Q] = 1.0
    coef[0, coefs.CLIP] = float("inf")
    x = torch.zeros(vals.shape, dtype=dtype)
    out, x0 = torch.empty_like(x), torch.empty_like(x)
    ops.sampler_step(x, vals, None, None, None, coef, 0, torch.zeros(1, dtype=torch.int64), out, x0, None)
    assert torch.equal(x0.float().isnan(), vals.isnan())
