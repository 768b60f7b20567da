"""Property tests (hypothesis): every usable backend against the float64 reference over random shapes,
strides (non-contiguous and broadcast views), dtypes and coefficient values (finite, moderate).

Runtime is bounded: at most 4 dims of at most 7 elements, and a fixed ``max_examples`` per test.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import diffkern.ops as dops
from diffkern.ops import coefs
from diffkern.testing import DTYPES, assert_matches_reference, check_iadb_blend, check_sampler_step, noncontiguous
from diffkern.testing import usable_backends

BACKENDS = usable_backends("cpu")
SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

shapes = st.lists(st.integers(0, 7), min_size=1, max_size=4).map(tuple)
dtypes = st.sampled_from(DTYPES)
layouts = st.sampled_from(["contiguous", "transposed", "strided", "broadcast"])
out_layouts = st.sampled_from(["contiguous", "transposed", "strided"])
coef_value = st.one_of(st.just(0.0), st.floats(-3.0, 3.0, allow_nan=False, allow_infinity=False))


def _tensor(shape, dtype, seed, layout="contiguous", scale=1.0):
    """Values from a seeded generator, laid out as asked (``broadcast``: one sample expanded over the batch)."""
    gen = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    if layout == "transposed":
        return noncontiguous(t)
    if layout == "strided":  # every other element of a buffer twice as long in the last dim
        buf = torch.full((*shape[:-1], 2 * shape[-1]), float("nan"), dtype=dtype)
        view = buf[..., ::2]
        view.copy_(t)
        return view
    if layout == "broadcast" and shape[0] > 0:
        return t[:1].expand(shape)
    return t


def _empty_out(shape, dtype, layout):
    return _tensor(shape, dtype, 0, layout if layout != "broadcast" else "contiguous")


@st.composite
def tables(draw, rows, history, clip):
    out = []
    for _ in range(rows):
        named = {name: draw(coef_value) for name in ("a", "b", "g", "s", "p", "q", "e", "f")}
        named["c"] = draw(coef_value) if history else 0.0  # no history tensor: c must be 0
        named["w"] = draw(st.floats(0.0, 8.0))
        named["clip"] = draw(st.floats(0.1, 4.0)) if clip else math.inf
        out.append(coefs.row(**named))
    return coefs.table(out)


@st.composite
def sampler_step_cases(draw):
    shape, dtype, model_dtype = draw(shapes), draw(dtypes), draw(dtypes)
    cfg, history, clip = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    noise = draw(st.sampled_from(["philox", "philox-per-sample", "explicit"]))
    rows = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31))

    def t(k, dt):
        return _tensor(shape, dt, seed + k, draw(layouts))

    kw = {"x": t(0, dtype), "model_out": t(1, model_dtype), "coef": draw(tables(rows, history, clip)),
          "step": draw(st.integers(0, rows - 1))}
    if cfg:
        kw["model_out_uncond"] = t(2, model_dtype)
    if history:
        kw["history"] = t(3, dtype)
    if noise == "explicit":
        kw["noise"] = t(4, dtype)
    else:
        n_seeds = shape[0] if noise == "philox-per-sample" else 1
        kw["seed"] = torch.tensor(draw(st.lists(st.integers(-2**63, 2**63 - 1), min_size=n_seeds, max_size=n_seeds)),
                                  dtype=torch.int64)
    kw["out"] = _empty_out(shape, dtype, draw(out_layouts))
    kw["x0"], kw["history_new"] = draw(st.booleans()), draw(st.booleans())
    return kw


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(case=sampler_step_cases())
def test_sampler_step_property(backend, case):
    check_sampler_step(backend, what="property", **case)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(shape=shapes, dtype=dtypes, alpha_dtype=dtypes, layout=layouts, seed=st.integers(0, 2**31),
       target=st.booleans(), alpha=st.lists(st.floats(0.0, 1.0), min_size=7, max_size=7))
def test_iadb_blend_property(backend, shape, dtype, alpha_dtype, layout, seed, target, alpha):
    x0, x1 = _tensor(shape, dtype, seed, layout), _tensor(shape, dtype, seed + 1, layout)
    check_iadb_blend(backend, x0, x1, torch.tensor(alpha[:shape[0]], dtype=alpha_dtype), target=target)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(shape=shapes, dtype=dtypes, layout=out_layouts, step=st.integers(0, 2**32 - 1),
       offset=st.one_of(st.integers(0, 2**33), st.integers(0, 2**62)), per_sample=st.booleans(),
       seeds=st.lists(st.integers(-2**63, 2**63 - 1), min_size=7, max_size=7))
def test_randn_property(backend, shape, dtype, layout, step, offset, per_sample, seeds):
    seed = torch.tensor(seeds[:shape[0]] if per_sample else seeds[:1], dtype=torch.int64)
    out = dops.randn(None, seed, step=step, offset=offset, out=_empty_out(shape, dtype, layout), backend=backend)
    ref64 = dops.randn(shape, seed, step=step, offset=offset, dtype=torch.float64, backend="reference")
    eager = dops.randn(shape, seed, step=step, offset=offset, dtype=dtype, backend="reference")
    assert_matches_reference(out, ref64, eager, f"[{backend}] randn")
