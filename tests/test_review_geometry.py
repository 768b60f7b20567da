"""Review of the geometric-perspective ops (Chen et al., ``math-samplers.md`` 4.4) and of IADB's sampler
(Heitz et al. 2023, section 1) against closed forms: the optimal denoiser at extreme noise levels and at
tile-aligned shapes, and IADB with a model that is exact (point data, where D is known in closed form).
"""
import math

import pytest
import torch

import diffkern.ops as dops
from diffkern import analytic
from diffkern.ops.optimal_denoiser import optimal_denoiser_reference
from diffkern.sampling import sample_iadb
from diffkern.testing import assert_matches_reference, make_tensor, usable_backends

F64 = torch.float64
CPU_BACKENDS = usable_backends("cpu")
TRITON_CPU = "triton" in CPU_BACKENDS
OD_BACKENDS = ["reference"] + (["triton"] if TRITON_CPU else [])


def _id(v):
    return str(v).replace("torch.", "")

#----------------------------------------------------------------------------
# Optimal denoiser: sigma -> 0 is the nearest neighbour, sigma -> inf the mean, never nan.


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:divide by zero:RuntimeWarning")
@pytest.mark.parametrize("backend", OD_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_id)
@pytest.mark.parametrize("sigma", [1e-6, 1e-20, 1e-30, 1e-45])
def test_tiny_sigma_is_the_nearest_neighbour_not_nan(backend, dtype, sigma):
    """Regression: below sigma ~ 1e-19 (float32 compute), 1/sigma^2 overflowed to inf and the logits
    became inf - inf = nan on the reference and the Triton kernel; the sigma -> 0 limit is the nearest
    data point. Data of norm ~30 also overflowed (x.y - h)/sigma^2 itself at larger sigma."""
    data = (make_tensor((37, 19), F64, seed=1) * 8).to(dtype)
    idx = [3, 36, 0]
    x = (data[idx].double() + 0.05 * make_tensor((3, 19), F64, seed=2)).to(dtype)
    out = dops.optimal_denoiser(x, data, sigma, backend=backend)
    torch.testing.assert_close(out, data[idx], rtol=0, atol=0)


def test_tiny_sigma_float64_paths():
    """The float64 reference and the chunked EmpiricalDenoiser (denoise, score, eps, log_prob) at a sigma
    whose 1/sigma^2 overflows float64 (1e-170): the nearest neighbour, and finite derived quantities."""
    data = make_tensor((50, 5), F64, seed=3)
    x = data[[7, 49]] + 1e-3 * make_tensor((2, 5), F64, seed=4)
    sig = 1e-170
    torch.testing.assert_close(dops.optimal_denoiser(x, data, sig, backend="reference"), data[[7, 49]], rtol=0, atol=0)
    ed = analytic.EmpiricalDenoiser(data, chunk_size=16)  # the nearest points sit in different chunks
    torch.testing.assert_close(ed(x, sig), data[[7, 49]], rtol=0, atol=0)
    # At a sigma where everything is finite, the clamp changes nothing: the score of the KDE is exact.
    s = 1e-3
    torch.testing.assert_close(ed.score(x, s), (data[[7, 49]] - x) / s ** 2, rtol=1e-9, atol=0)
    brute = torch.logsumexp(-((x[:, None] - data[None]) ** 2).sum(-1) / (2 * s * s), 1) - math.log(50) \
        - 2.5 * math.log(2 * math.pi * s * s)
    # log_prob subtracts ||x||^2/(2 sigma^2) from the logsumexp: float64 rounding of that size, no more.
    atol = 64 * torch.finfo(F64).eps * float((x ** 2).sum(1).max()) / (2 * s * s)
    torch.testing.assert_close(ed.log_prob(x, s), brute, rtol=0, atol=atol)


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
@pytest.mark.parametrize("backend", OD_BACKENDS)
def test_huge_sigma_is_the_data_mean(backend):
    """1/sigma^2 underflows to 0 in float32 above sigma ~ 1e19 (and is clamped to the smallest normal):
    every weight is 1/N."""
    data = make_tensor((29, 7), seed=5)
    x = make_tensor((3, 7), seed=6) * 10
    out = dops.optimal_denoiser(x, data, 1e30, backend=backend)
    torch.testing.assert_close(out, data.mean(0).expand(3, 7), rtol=0, atol=2e-6)


@pytest.mark.skipif(not TRITON_CPU, reason="triton is not usable on CPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=_id)
@pytest.mark.parametrize("batch,n,dim", [(16, 48, 32), (16, 37, 19), (5, 32, 16), (32, 16, 33), (1, 16, 16)])
def test_triton_tile_aligned_shapes(dtype, batch, n, dim):
    """The interpreter's tiles are 16x16x16: these shapes take the EVEN_M / EVEN_N / EVEN_D branches (masks
    dropped), which the non-multiple shapes of test_optimal_denoiser.py never reach."""
    x = make_tensor((batch, dim), dtype, seed=batch)
    data = make_tensor((n, dim), dtype, seed=n)
    sigma = torch.logspace(-0.7, 0.7, batch)
    ref64 = optimal_denoiser_reference(x.double(), data.double(), sigma.double())
    eager = optimal_denoiser_reference(x, data, sigma)
    out = dops.optimal_denoiser(x, data, sigma, backend="triton")
    assert_matches_reference(out, ref64, eager, f"B={batch} N={n} D={dim} {dtype}")


@pytest.mark.parametrize("backend", OD_BACKENDS)
def test_empty_batch_and_one_point(backend):
    data = make_tensor((1, 6), seed=7)
    assert dops.optimal_denoiser(torch.zeros(0, 6), data, 1.0, backend=backend).shape == (0, 6)
    x = make_tensor((4, 6), seed=8)
    out = dops.optimal_denoiser(x, data, torch.tensor([1e-3, 1.0, 1e3, 0.0]), backend=backend)
    torch.testing.assert_close(out[:3], data.expand(3, 6), rtol=0, atol=0)  # one point: D = y for any sigma > 0
    torch.testing.assert_close(out[3], x[3], rtol=0, atol=0)  # sigma = 0 returns x

#----------------------------------------------------------------------------
# IADB: the paper's deterministic algorithm, and an exact model on point data.

Y = torch.tensor([[0.3, -1.7, 2.5, 0.0, -0.25]], dtype=F64)  # the whole data set: one point


def point_d(x, alpha):
    """Exact D = E[x1 - x0 | x_alpha] for the data set {Y}: x1 = Y, x0 = (x - alpha*Y)/(1 - alpha)."""
    a = alpha.double()[:, None]
    return ((Y - x.double()) / (1 - a)).to(x.dtype)


def point_two_head(x, alpha):
    a = alpha.double()[:, None]
    return ((x.double() - a * Y) / (1 - a)).to(x.dtype), Y.expand(x.shape[0], -1).to(x.dtype)


ALPHAS = [0.0, 0.02, 0.1, 0.25, 0.5, 0.61, 0.8, 0.95, 0.99, 1.0]


def test_euler_is_the_papers_algorithm():
    """``x_{alpha_{t+1}} = x_{alpha_t} + (alpha_{t+1} - alpha_t) D(x_{alpha_t}, alpha_t)`` written out as a
    loop, with a nonlinear D (a Gaussian mixture's posterior means) and a non-uniform schedule."""
    gmm = analytic.GaussianMixture([1.0, 2.0], [[-1.0, 0.5], [1.0, 1.0]], [0.3, 0.5])

    def model(x, alpha):
        a = alpha.double()[:, None]
        safe = torch.where(a > 0, a, torch.ones_like(a))
        x1 = torch.where(a > 0, gmm.denoise(x / safe, ((1 - safe) / safe)[:, 0]), gmm.mean.expand_as(x))
        return x1 - (x - a * x1) / (1 - a)

    x0 = make_tensor((6, 2), F64, seed=9)
    x = x0.clone()
    for a, a_next in zip(ALPHAS[:-1], ALPHAS[1:]):
        x = x + (a_next - a) * model(x, torch.full((6,), a, dtype=F64))
    torch.testing.assert_close(sample_iadb(model, x0, ALPHAS, backend="reference"), x, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("variant,lam", [("euler", None), ("stochastic", 1.0), ("two_head", 0.0), ("two_head", 0.7)])
def test_exact_model_on_point_data_follows_the_blend(backend, variant, lam):
    """With the exact D of one data point, every state is the blend ``(1-alpha)*x0 + alpha*Y`` (deterministic
    variants; the stochastic ones replace x0 by fresh noise but still reach Y) and the last lands on Y."""
    x0 = make_tensor((4, 5), F64, seed=10)
    model = point_two_head if variant == "two_head" else point_d
    out, traj = sample_iadb(model, x0, ALPHAS, variant=variant, lam=lam, backend=backend, seed=3, record=True)
    torch.testing.assert_close(out, Y.expand(4, 5), rtol=0, atol=1e-13)
    torch.testing.assert_close(traj["denoised"], Y.expand(9, 4, 5), rtol=0, atol=1e-12)  # x1_bar = Y at every step
    if variant == "euler" or lam == 0.0:
        alphas = torch.tensor(ALPHAS, dtype=F64)[:, None, None]
        torch.testing.assert_close(traj["x"], dops.iadb_blend_reference(x0.expand(10, 4, 5), Y.expand(10, 4, 5),
                                                                        alphas.reshape(-1))[0], rtol=0, atol=1e-13)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=_id)
@pytest.mark.parametrize("variant,lam", [("euler", None), ("stochastic", 1.0), ("two_head", 0.5)])
def test_exact_model_on_point_data_low_precision(backend, dtype, variant, lam):
    """The same run in 16/32-bit states reaches Y within the tolerance rule (float64 reference: Y itself)."""
    x0 = make_tensor((4, 5), F64, seed=11)
    model = point_two_head if variant == "two_head" else point_d
    kw = dict(variant=variant, lam=lam, steps=12, seed=4)
    eager = sample_iadb(model, x0.to(dtype), backend="reference", **kw)
    out = sample_iadb(model, x0.to(dtype), backend=backend, **kw)
    assert_matches_reference(out, Y.expand(4, 5), eager, f"iadb {variant} point data [{backend}] {dtype}")


def test_two_head_is_reblending_even_for_inconsistent_heads():
    """Variant (a) is ``(1-alpha')*x0_bar + alpha'*x1_bar`` whatever the heads; for heads that do not satisfy
    ``x = (1-alpha)*x0_bar + alpha*x1_bar`` it differs from Euler by that consistency residual."""
    def heads(x, alpha):
        a = alpha.double()[:, None]
        return torch.sin(x) + a, 0.5 * x - 1.0

    x0 = make_tensor((3, 4), F64, seed=12)
    x = x0.clone()
    for a, a_next in zip(ALPHAS[:-1], ALPHAS[1:]):
        h0, h1 = heads(x, torch.full((3,), a, dtype=F64))
        x = (1 - a_next) * h0 + a_next * h1
    torch.testing.assert_close(sample_iadb(heads, x0, ALPHAS, variant="two_head", backend="reference"), x,
                               rtol=1e-13, atol=1e-13)

#----------------------------------------------------------------------------
# Trajectories (4.2, 4.6) with the optimal denoiser of a small data set.


def test_euler_step_is_the_convex_combination_and_ode_jump_is_a_truncated_schedule():
    """4.2: every recorded Euler step is ``x' = (s'/s) x + (1 - s'/s) D(x, s)`` with the recorded D (the
    denoising trajectory). 4.6: ODE-jump at step j is the same run on ``sigmas[:j+1]`` followed by 0. With the
    optimal denoiser the run ends on a data point (memorisation) from which D no longer moves."""
    from diffkern import schedules
    from diffkern.sampling import sample

    data = make_tensor((40, 2, 3), F64, seed=13)
    den = analytic.EmpiricalDenoiser(data, backend="reference")
    sigmas = torch.as_tensor(schedules.karras(12, 0.002, 80.0), dtype=F64)
    x0 = make_tensor((5, 2, 3), F64, seed=14) * 80.0
    out, rec = sample(den, x0, sigmas, "euler", backend="reference", record=True)
    ratio = (sigmas[1:] / sigmas[:-1]).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(rec["x"][1:], ratio * rec["x"][:-1] + (1 - ratio) * rec["denoised"], rtol=0,
                               atol=1e-12 * 80)
    jump = 7
    truncated = torch.cat([sigmas[:jump + 1], sigmas.new_zeros(1)])
    torch.testing.assert_close(sample(den, x0, truncated, "euler", backend="reference"), rec["denoised"][jump],
                               rtol=0, atol=1e-12)
    nearest = ((out.reshape(5, 1, 6) - data.reshape(1, 40, 6)) ** 2).sum(-1).argmin(1)
    torch.testing.assert_close(out, data[nearest], rtol=0, atol=1e-9)
