"""IADB (``math-samplers.md`` section 1): the ``iadb_blend`` op on every usable backend, and the deblending
steps (rows of the fused ``sampler_step``) against their closed forms.

IADB's x0 is the NOISE and x1 the DATA: ``x_alpha = (1-alpha)*x0 + alpha*x1``.
"""
import math

import pytest
import torch

import diffkern.ops as dops
from diffkern.ops import coefs, iadb
from diffkern.testing import (DTYPES, SHAPES, assert_matches_reference, check_iadb_blend, make_tensor, noncontiguous,
                              usable_backends)

SEED0 = torch.zeros(1, dtype=torch.int64)  # the front-ends' default seed


def _id(v):
    return str(v).replace("torch.", "")


def _alpha(batch, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, generator=gen, dtype=torch.float64).to(dtype)

#----------------------------------------------------------------------------
# iadb_blend: the op against its float64 reference.


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", SHAPES + ("noncontiguous",), ids=_id)
def test_blend_matches_reference(cpu_backend, dtype, shape):
    contiguous = shape != "noncontiguous"
    shape = (4, 2, 9, 17) if not contiguous else shape
    x0 = make_tensor(shape, dtype, seed=1, contiguous=contiguous)
    x1 = make_tensor(shape, dtype, seed=2, contiguous=contiguous)
    check_iadb_blend(cpu_backend, x0, x1, _alpha(shape[0]), what=f"{shape} {dtype}")


@pytest.mark.parametrize("alpha_dtype", DTYPES, ids=_id)
def test_blend_alpha_dtype(cpu_backend, alpha_dtype):
    x0, x1 = make_tensor((3, 1025), seed=3), make_tensor((3, 1025), seed=4)
    check_iadb_blend(cpu_backend, x0, x1, _alpha(3, alpha_dtype), target=False)


def test_blend_endpoints_are_exact(cpu_backend):
    """alpha = 0 gives the noise x0 and alpha = 1 the data x1, bit for bit."""
    x0, x1 = make_tensor((2, 3, 33), seed=5), make_tensor((2, 3, 33), seed=6)
    out = dops.iadb_blend(x0, x1, torch.tensor([0.0, 1.0]), backend=cpu_backend)
    torch.testing.assert_close(out[0], x0[0], rtol=0, atol=0)
    torch.testing.assert_close(out[1], x1[1], rtol=0, atol=0)


@pytest.mark.parametrize("into", ["x0", "x1"])
def test_blend_in_place(cpu_backend, into):
    x0, x1 = make_tensor((3, 5, 7), seed=7), make_tensor((3, 5, 7), seed=8)
    alpha = _alpha(3)
    ref64 = dops.iadb_blend_reference(x0.double(), x1.double(), alpha.double())
    eager = dops.iadb_blend_reference(x0, x1, alpha)
    target = torch.empty_like(x0)
    out = x0 if into == "x0" else x1
    assert dops.iadb_blend(x0, x1, alpha, out=out, target_out=target, backend=cpu_backend) is out
    assert_matches_reference(out, ref64[0], eager[0], f"out={into}")
    assert_matches_reference(target, ref64[1], eager[1], "target_out (with in-place out)")


def test_blend_noncontiguous_outputs(cpu_backend):
    x0, x1 = make_tensor((4, 6, 10), seed=9), make_tensor((4, 6, 10), seed=10)
    out, target = noncontiguous(torch.empty(4, 6, 10)), noncontiguous(torch.empty(4, 6, 10))
    dops.iadb_blend(x0, x1, _alpha(4), out=out, target_out=target, backend=cpu_backend)
    ref64 = dops.iadb_blend_reference(x0.double(), x1.double(), _alpha(4).double())
    eager = dops.iadb_blend_reference(x0, x1, _alpha(4))
    assert_matches_reference(out, ref64[0], eager[0], "non-contiguous out")
    assert_matches_reference(target, ref64[1], eager[1], "non-contiguous target_out")


def _blend_bad_cases():
    meta = torch.device("meta")
    return {
        "x0-int": (lambda k: k.update(x0=k["x0"].long()), TypeError, r"^x0: expected a floating dtype"),
        "x0-0d": (lambda k: k.update(x0=k["x0"][0, 0, 0], x1=k["x1"][0, 0, 0]), ValueError, r"^x0: expected a batched"),
        "x1-shape": (lambda k: k.update(x1=k["x1"][:, :2]), ValueError, r"^x1: expected shape \(2, 3, 5\)"),
        "x1-dtype": (lambda k: k.update(x1=k["x1"].double()), TypeError, r"^x1: expected dtype torch.float32"),
        "x1-device": (lambda k: k.update(x1=k["x1"].to(meta)), ValueError, r"^x1: expected device cpu"),
        "alpha-shape": (lambda k: k.update(alpha=torch.rand(3)), ValueError, r"^alpha: expected shape \(2,\)"),
        "alpha-2d": (lambda k: k.update(alpha=torch.rand(2, 1)), ValueError, r"^alpha: expected shape \(2,\)"),
        "alpha-int": (lambda k: k.update(alpha=torch.ones(2, dtype=torch.int64)), TypeError,
                      r"^alpha: expected a floating dtype"),
        "alpha-device": (lambda k: k.update(alpha=k["alpha"].to(meta)), ValueError, r"^alpha: expected device cpu"),
        "out-dtype": (lambda k: k.update(out=torch.zeros(2, 3, 5, dtype=torch.float16)), TypeError,
                      r"^out: expected dtype"),
        "target_out-shape": (lambda k: k.update(target_out=torch.zeros(2, 15)), ValueError,
                             r"^target_out: expected shape"),
        "target_out-device": (lambda k: k.update(target_out=torch.empty(2, 3, 5, device=meta)), ValueError,
                              r"^target_out: expected device"),
    }


@pytest.mark.parametrize("case", list(_blend_bad_cases()), ids=str)
def test_blend_bad_input_raises_and_writes_nothing(cpu_backend, case):
    mutate, exc, match = _blend_bad_cases()[case]
    kw = {"x0": make_tensor((2, 3, 5), seed=11), "x1": make_tensor((2, 3, 5), seed=12), "alpha": _alpha(2),
          "out": torch.full((2, 3, 5), 7.0), "target_out": torch.full((2, 3, 5), 7.0)}
    mutate(kw)
    before = {k: kw[k].clone() for k in ("out", "target_out", "x0", "x1") if kw[k].device.type != "meta"}
    with pytest.raises(exc, match=match):
        dops.iadb_blend(**kw, backend=cpu_backend)
    for k, v in before.items():
        torch.testing.assert_close(kw[k], v, rtol=0, atol=0, msg=lambda m: f"{k} written by a call that raised: {m}")


@pytest.mark.parametrize("which", ["out-x0", "target_out-x1", "target_out-out"])
def test_blend_partial_overlap_raises_and_writes_nothing(cpu_backend, which):
    buf = torch.randn(2 * 15 + 1)
    kw = {"x0": make_tensor((2, 3, 5), seed=13), "x1": make_tensor((2, 3, 5), seed=14), "alpha": _alpha(2),
          "out": torch.zeros(2, 3, 5), "target_out": torch.zeros(2, 3, 5)}
    first, second = which.split("-")
    kw[first], kw[second] = buf[1:].view(2, 3, 5), buf[:-1].view(2, 3, 5)
    before = buf.clone()
    with pytest.raises(ValueError, match=rf"^({first}: overlaps {second}|{second}: overlaps {first})"):
        dops.iadb_blend(**kw, backend=cpu_backend)
    torch.testing.assert_close(buf, before, rtol=0, atol=0)

#----------------------------------------------------------------------------
# Deblending steps as sampler_step rows, against the closed forms of math-samplers.md 1.3, 1.4, 1.6:
# truth is the closed form in float64, "eager" the fused reference run in the low dtype.


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("alphas", [(0.0, 1 / 128), (0.25, 0.5), (127 / 128, 1.0)], ids=str)
def test_euler_deblend_closed_form(cpu_backend, dtype, alphas):
    """Section 1.3: ``x' = x + (alpha' - alpha)*D`` (the official IADB sampler)."""
    alpha, alpha_next = alphas
    x, d = make_tensor((3, 4, 9), dtype, seed=15), make_tensor((3, 4, 9), dtype, seed=16)
    closed = x.double() + (alpha_next - alpha) * d.double()
    table = coefs.table([iadb.euler_row(alpha, alpha_next)])
    eager = dops.sampler_step_reference(x, d, table, 0, seed=SEED0)[0]
    assert_matches_reference(dops.iadb_deblend(x, d, alpha, alpha_next, backend=cpu_backend), closed, eager, "Euler")


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("alpha_next", [0.0, 0.3, 1.0])
def test_two_head_deblend_closed_form(cpu_backend, dtype, alpha_next):
    """Section 1.4 (a): ``x' = (1-alpha')*x0_bar + alpha'*x1_bar``."""
    x0_bar, x1_bar = make_tensor((2, 3, 17), dtype, seed=17), make_tensor((2, 3, 17), dtype, seed=18)
    closed = (1 - alpha_next) * x0_bar.double() + alpha_next * x1_bar.double()
    table = coefs.table([iadb.two_head_row(alpha_next)])
    eager = dops.sampler_step_reference(x1_bar, x1_bar, table, 0, history=x0_bar, seed=SEED0)[0]
    out = dops.iadb_deblend_two_head(x0_bar, x1_bar, alpha_next, backend=cpu_backend)
    assert_matches_reference(out, closed, eager, "two-head")


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("alphas", [(0.3, 0.4), (0.0, 0.1), (0.9, 1.0), (0.5, 0.95)], ids=str)
def test_stochastic_two_head_closed_form(cpu_backend, lam, alphas):
    """Section 1.6: ``x' = alpha'*x1_bar + (1-alpha')*(k*x0_bar + sqrt(1-k^2)*xi)``, ``k = (sigma'/sigma)^(lam^2)``.

    sigma = (1-alpha)/alpha, so k = 0 at alpha = 0 (sigma infinite) and at alpha' = 1 (sigma' = 0).
    """
    alpha, alpha_next = alphas
    sigma = math.inf if alpha == 0 else (1 - alpha) / alpha
    sigma_next = (1 - alpha_next) / alpha_next
    k = 1.0 if lam == 0 else (0.0 if math.isinf(sigma) else (sigma_next / sigma) ** (lam * lam))
    shape = (2, 3, 11)
    x0_bar, x1_bar, xi = (make_tensor(shape, seed=s) for s in (19, 20, 21))
    closed = alpha_next * x1_bar.double() + (1 - alpha_next) * (k * x0_bar.double() + math.sqrt(1 - k * k) * xi.double())
    table = coefs.table([iadb.two_head_row(alpha_next, lam=lam, alpha=alpha)])
    kw = {"history": x0_bar, "noise": xi}
    eager = dops.sampler_step_reference(x1_bar, x1_bar, table, 0, **kw)[0]
    out = dops.sampler_step(x1_bar, x1_bar, table, 0, **kw, backend=cpu_backend)
    assert_matches_reference(out, closed, eager, f"stochastic two-head lam={lam}")


def test_stochastic_two_head_needs_alpha():
    with pytest.raises(ValueError, match=r"^alpha: required"):
        iadb.two_head_row(0.5, lam=1.0)


@pytest.mark.parametrize("alphas", [(0.1, 0.2), (0.5, 0.75)], ids=str)
def test_two_head_equals_euler_for_consistent_heads(cpu_backend, alphas):
    """Section 1.4: if ``x = (1-alpha)*x0_bar + alpha*x1_bar`` then (a) two-head == (b) Euler with D = x1_bar - x0_bar."""
    alpha, alpha_next = alphas
    x0_bar, x1_bar = make_tensor((2, 5, 7), torch.float64, seed=22), make_tensor((2, 5, 7), torch.float64, seed=23)
    x = (1 - alpha) * x0_bar + alpha * x1_bar
    euler = dops.iadb_deblend(x, x1_bar - x0_bar, alpha, alpha_next, backend=cpu_backend)
    two_head = dops.iadb_deblend_two_head(x0_bar, x1_bar, alpha_next, backend=cpu_backend)
    torch.testing.assert_close(two_head, euler, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("alphas", [(0.2, 0.3), (0.5, 0.625), (0.9, 0.95)], ids=str)
def test_euler_step_is_deterministic_ddim(cpu_backend, alphas):
    """Section 1.5: with ``ab = alpha^2/(alpha^2 + (1-alpha)^2)`` and ``x_alpha = z/(sqrt(ab) + sqrt(1-ab))``,
    one IADB Euler step (D = x0_hat - eps_hat) equals one deterministic DDIM step (float64)."""
    alpha, alpha_next = alphas
    ab = alpha ** 2 / (alpha ** 2 + (1 - alpha) ** 2)
    ab_next = alpha_next ** 2 / (alpha_next ** 2 + (1 - alpha_next) ** 2)
    x0_hat, eps_hat = make_tensor((2, 3, 8), torch.float64, seed=24), make_tensor((2, 3, 8), torch.float64, seed=25)
    z = math.sqrt(ab) * x0_hat + math.sqrt(1 - ab) * eps_hat
    z_next, _ = dops.ddim_step(z, eps_hat, ab, ab_next, prediction_type="epsilon", backend=cpu_backend)
    x_alpha = z / (math.sqrt(ab) + math.sqrt(1 - ab))
    iadb_next = dops.iadb_deblend(x_alpha, x0_hat - eps_hat, alpha, alpha_next, backend=cpu_backend)
    torch.testing.assert_close(z_next / (math.sqrt(ab_next) + math.sqrt(1 - ab_next)), iadb_next,
                               rtol=1e-12, atol=1e-12)

#----------------------------------------------------------------------------
# CUDA (skipped without a GPU).


@pytest.mark.cuda
@pytest.mark.parametrize("backend", usable_backends("cuda"))
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_cuda_blend_matches_reference(backend, dtype, shape):
    x0 = make_tensor(shape, dtype, seed=1, device="cuda")
    x1 = make_tensor(shape, dtype, seed=2, device="cuda")
    check_iadb_blend(backend, x0, x1, _alpha(shape[0]).cuda(), what=f"cuda {shape} {dtype}")
