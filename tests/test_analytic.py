"""Exact analytic denoisers: GaussianMixture and EmpiricalDenoiser against independent computations."""
import math

import numpy as np
import pytest
import torch
from scipy import special, stats
from torch.utils._python_dispatch import TorchDispatchMode

from diffkern.analytic import EmpiricalDenoiser, GaussianMixture
from diffkern.testing import assert_matches_reference

F64 = torch.float64


def _mixture_3d(diagonal: bool) -> GaussianMixture:
    g = torch.Generator().manual_seed(1)
    means = torch.randn(4, 3, generator=g, dtype=F64) * 2
    stds = (torch.rand(4, 3, generator=g, dtype=F64) + 0.2) if diagonal else torch.tensor([0.3, 0.5, 0.2, 1.0])
    return GaussianMixture(torch.tensor([1.0, 2.0, 0.5, 3.0]), means, stds)


class _Recorder(TorchDispatchMode):
    """Records the ops dispatched and the largest tensor numel produced."""

    def __init__(self):
        super().__init__()
        self.ops, self.max_numel = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(str(func.overloadpacket))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:  # skip views
                self.max_numel = max(self.max_numel, t.numel())
        return out

#----------------------------------------------------------------------------
# GaussianMixture.


@pytest.mark.parametrize("diagonal", [False, True])
def test_log_prob_matches_scipy(diagonal):
    gm = _mixture_3d(diagonal)
    x = torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(2)) * 3
    for sigma in (0.0, 0.4, 3.0):
        comps = [stats.multivariate_normal(m.numpy(), np.diag((s ** 2 + sigma ** 2).numpy())) for m, s in
                 zip(gm.means, gm.stds)]
        dens = sum(float(w) * c.pdf(x.numpy()) for w, c in zip(gm.weights, comps))
        torch.testing.assert_close(gm.log_prob(x, sigma), torch.from_numpy(np.log(dens)), rtol=1e-12, atol=1e-12)


def test_denoise_matches_quadrature_1d():
    # E[x0 | x] by brute-force integration over a fine grid (the integrand is a smooth Gaussian product, for
    # which the trapezoid rule converges spectrally), with the weights normalised in log space
    gm = GaussianMixture([0.3, 0.7], [[-1.0], [2.0]], [0.2, 0.5])
    x = torch.tensor([[-3.0], [-0.5], [0.4], [1.7], [5.0]], dtype=F64)
    y = np.linspace(-12.0, 12.0, 400_001)
    log_p0 = np.logaddexp(np.log(0.3) + stats.norm(-1.0, 0.2).logpdf(y), np.log(0.7) + stats.norm(2.0, 0.5).logpdf(y))
    for sigma in (0.1, 0.8, 4.0):
        logw = log_p0[None, :] + stats.norm(y[None, :], sigma).logpdf(x.numpy())      # (B, grid)
        w = np.exp(logw - special.logsumexp(logw, axis=1, keepdims=True))
        want = torch.from_numpy((w * y).sum(1) / w.sum(1))
        torch.testing.assert_close(gm.denoise(x, sigma)[:, 0], want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("diagonal", [False, True])
def test_tweedie_score_is_grad_log_prob(diagonal):
    gm = _mixture_3d(diagonal)
    x = (torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(3)) * 2).requires_grad_(True)
    for sigma in (0.0, 0.3, 2.5):
        (grad,) = torch.autograd.grad(gm.log_prob(x, sigma).sum(), x)
        torch.testing.assert_close(gm.score(x, sigma), grad, rtol=1e-10, atol=1e-12)
        if sigma > 0:
            xd = x.detach()
            torch.testing.assert_close(gm.denoise(xd, sigma), xd + sigma ** 2 * grad, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(gm.eps(xd, sigma), (xd - gm.denoise(xd, sigma)) / sigma, rtol=1e-10, atol=1e-12)


def test_sigma_forms_shapes_and_dtypes():
    gm = GaussianMixture.demo_2d()
    x = torch.randn(4, 1, 2, dtype=F64, generator=torch.Generator().manual_seed(4)) * 2  # (B, *shape), D = 2
    sig = torch.tensor([0.0, 0.1, 1.0, 10.0], dtype=torch.float32)
    per_sample = gm(x, sig)
    assert per_sample.shape == x.shape and per_sample.dtype == F64
    for i in range(4):
        torch.testing.assert_close(per_sample[i], gm.denoise(x[i:i + 1], float(sig[i]))[0], rtol=0, atol=0)
        one = x[i:i + 1]
        torch.testing.assert_close(gm.denoise(one, sig[i]), gm.denoise(one, float(sig[i])), rtol=0, atol=0)
    assert torch.equal(per_sample[0], x[0])  # sigma = 0 returns x
    assert torch.equal(gm.denoise(x, 0.0), x)
    assert gm.log_prob(x, sig).shape == (4,) and gm.denoise(x[:0], 0.5).shape == (0, 1, 2)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        xl = x.to(dtype)
        ref = gm.denoise(xl.double(), 0.7)
        assert_matches_reference(gm.denoise(xl, 0.7), ref, ref.to(dtype), f"denoise {dtype}")


def test_large_sigma_gives_the_mean():
    gm = _mixture_3d(True)
    x = torch.randn(3, 3, dtype=F64)
    torch.testing.assert_close(gm.denoise(x, 1e5), gm.mean.expand(3, 3), rtol=0, atol=1e-8)


def test_demo_2d_and_moments():
    gm = GaussianMixture.demo_2d()
    assert (gm.dim, gm.num_components) == (2, 9)
    torch.testing.assert_close(gm.weights.sum(), torch.tensor(1.0, dtype=F64))
    s = gm.sample(200_000, generator=torch.Generator().manual_seed(5))
    assert s.shape == (200_000, 2) and s.dtype == F64
    # standard errors of the mean are sqrt(1.6/2e5) ~ 3e-3: 5 sigma is 1.5e-2
    torch.testing.assert_close(s.mean(0), gm.mean, rtol=0, atol=1.5e-2)
    torch.testing.assert_close(torch.cov(s.T), gm.covariance, rtol=0, atol=3e-2)
    again = [gm.sample(10, generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(again[0], again[1])
    assert gm.sample(0).shape == (0, 2)


def test_denoise_does_no_host_sync():
    gm = GaussianMixture.demo_2d()
    x, sig = torch.randn(5, 2), torch.full((5,), 0.7)
    with _Recorder() as rec:
        gm(x, sig)
        gm.score(x, sig)
    assert "aten._local_scalar_dense" not in rec.ops


@pytest.mark.parametrize("bad, match", [
    (dict(weights=[-1.0, 2.0]), "weights must be >= 0"),
    (dict(weights=[0.0, 0.0]), "not all zero"),
    (dict(weights=[1.0, float("nan")]), "finite"),
    (dict(weights=[[1.0, 1.0]]), "weights: expected 1-d"),
    (dict(means=[[0.0, 0.0]]), r"means must have shape \(2, D\)"),
    (dict(stds=[0.1, 0.0]), "stds must be > 0"),
    (dict(stds=[[0.1, 0.2, 0.3]] * 2), r"stds must have shape \(2,\) or \(2, 2\)"),
])
def test_gaussian_mixture_rejects_bad_parameters(bad, match):
    args = dict(weights=[1.0, 2.0], means=[[0.0, 0.0], [1.0, 1.0]], stds=[0.1, 0.2])
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        GaussianMixture(**args)


def test_gaussian_mixture_rejects_bad_inputs():
    gm = GaussianMixture.demo_2d()
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2\)"):
        gm.denoise(torch.zeros(3, 3), 0.5)
    with pytest.raises(ValueError, match=r"x must have shape"):
        gm.denoise(torch.zeros(2), 0.5)
    with pytest.raises(TypeError, match="floating"):
        gm.denoise(torch.zeros(3, 2, dtype=torch.long), 0.5)
    with pytest.raises(ValueError, match="sigma must be finite and >= 0"):
        gm.denoise(torch.zeros(3, 2), -1.0)
    with pytest.raises(ValueError, match=r"tensor of shape \(3,\)"):
        gm.denoise(torch.zeros(3, 2), torch.ones(2))
    with pytest.raises(ValueError, match="n must be an int"):
        gm.sample(-1)

#----------------------------------------------------------------------------
# EmpiricalDenoiser.


def _brute_force(data, x, sigma):
    d2 = ((x[:, None, :] - data[None]) ** 2).sum(-1)                 # (B, N)
    logits = -d2 / (2 * sigma ** 2)
    w = torch.softmax(logits, dim=1)
    n, dim = data.shape
    log_kde = torch.logsumexp(logits, 1) - math.log(n) - 0.5 * dim * math.log(2 * math.pi * sigma ** 2)
    return w @ data, log_kde


@pytest.mark.parametrize("chunk", [1, 7, 50, 4096])
def test_empirical_matches_brute_force(chunk):
    g = torch.Generator().manual_seed(6)
    data = torch.randn(50, 2, 3, generator=g, dtype=F64)
    x = torch.randn(9, 2, 3, generator=g, dtype=F64) * 1.5
    ed = EmpiricalDenoiser(data, chunk_size=chunk)
    for sigma in (0.05, 0.5, 5.0):
        want, want_lp = _brute_force(data.reshape(50, 6), x.reshape(9, 6), sigma)
        torch.testing.assert_close(ed(x, sigma), want.reshape(9, 2, 3), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ed.log_prob(x, sigma), want_lp, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ed.score(x, sigma), (want.reshape(x.shape) - x) / sigma ** 2, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(ed.eps(x, sigma), (x - want.reshape(x.shape)) / sigma, rtol=1e-9, atol=1e-9)
    assert torch.equal(ed.denoise(x, 0.0), x)


def test_empirical_equals_mixture_with_tiny_stds():
    g = torch.Generator().manual_seed(7)
    data = torch.randn(30, 4, generator=g, dtype=F64)
    gm = GaussianMixture(torch.ones(30), data, 1e-7)
    ed = EmpiricalDenoiser(data, chunk_size=8)
    x = torch.randn(6, 4, generator=g, dtype=F64)
    sig = torch.tensor([0.05, 0.1, 0.3, 1.0, 3.0, 30.0], dtype=F64)
    torch.testing.assert_close(ed(x, sig), gm(x, sig), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ed.log_prob(x, sig), gm.log_prob(x, sig), rtol=1e-9, atol=1e-9)


def test_empirical_streams_in_chunks_without_syncs():
    data = torch.randn(1000, 16, dtype=F64)
    x, sig = torch.randn(4, 16), torch.full((4,), 0.5)
    ed = EmpiricalDenoiser(data, chunk_size=100)
    with _Recorder() as rec:
        ed(x, sig)
    assert "aten._local_scalar_dense" not in rec.ops
    # largest intermediate: B x chunk logits, B x D or the chunk x D centred data, far below B x N x D = 64000
    # (and B x N = 4000)
    assert rec.max_numel <= max(4 * 100, 100 * 16)


def test_empirical_low_precision_and_small_sigma():
    g = torch.Generator().manual_seed(8)
    data = torch.randn(200, 8, generator=g, dtype=F64)
    x = data[:3] + 1e-3 * torch.randn(3, 8, generator=g, dtype=F64)
    ed = EmpiricalDenoiser(data, chunk_size=64)
    # at sigma = 2e-3 the nearest data point dominates; logits reach ~1e7 without overflow
    torch.testing.assert_close(ed(x, 2e-3), data[:3], rtol=0, atol=1e-6)
    for dtype in (torch.float32, torch.bfloat16):
        xl = x.to(dtype)
        ref = ed(xl.double(), 0.3)
        assert_matches_reference(ed(xl, 0.3), ref, ref.to(dtype), f"empirical {dtype}")


def test_empirical_rejects_bad_input():
    with pytest.raises(ValueError, match=r"data must have shape \(N, D\)"):
        EmpiricalDenoiser(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="finite"):
        EmpiricalDenoiser(torch.tensor([[0.0, float("inf")]]))
    with pytest.raises(ValueError, match="chunk_size"):
        EmpiricalDenoiser(torch.zeros(3, 2), chunk_size=0)
    ed = EmpiricalDenoiser(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
        ed.log_prob(torch.zeros(1, 2), 0.0)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2\)"):
        ed(torch.zeros(1, 3), 1.0)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    gm = GaussianMixture.demo_2d()
    ed = EmpiricalDenoiser(gm.sample(500, generator=torch.Generator().manual_seed(9)), chunk_size=64)
    x = torch.randn(7, 2)
    sig = torch.linspace(0.01, 5, 7)
    for den in (gm, ed):
        torch.testing.assert_close(den(x.cuda(), sig.cuda()).cpu(), den(x, sig), rtol=1e-6, atol=1e-6)


def test_empirical_denoiser_fused_backend_matches_chunked_path():
    """``backend=`` routes denoise through the fused optimal-denoiser op; same answer as the float64 path."""
    from diffkern.analytic import EmpiricalDenoiser
    g = torch.Generator().manual_seed(3)
    data = torch.randn(37, 2, 3, generator=g)
    x = torch.randn(5, 2, 3, generator=g)
    sigma = torch.tensor([0.0, 0.05, 0.5, 2.0, 40.0])
    ref = EmpiricalDenoiser(data.double(), chunk_size=8).denoise(x.double(), sigma.double())
    fused = EmpiricalDenoiser(data, backend="reference").denoise(x, sigma)
    assert fused.shape == x.shape and fused.dtype == x.dtype
    torch.testing.assert_close(fused.double(), ref, rtol=1e-5, atol=1e-5)
