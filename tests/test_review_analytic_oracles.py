"""Review of analytic.py (the exact denoisers every sampler test trusts) against oracles the older tests do not use:
torch.distributions' mixture density differentiated by autograd (Tweedie), the per-component posterior means in
mpmath, 2-D quadrature for anisotropic components, and brute-force |x - y|^2 softmax for offset datasets."""
import math

import mpmath
import pytest
import torch
from torch import distributions as dist

from diffkern.analytic import EmpiricalDenoiser, GaussianMixture

F64 = torch.float64
EPS = torch.finfo(F64).eps


def _anisotropic():
    g = torch.Generator().manual_seed(11)
    weights = torch.tensor([0.5, 1.5, 1.0, 0.2], dtype=F64)
    means = torch.randn(4, 2, generator=g, dtype=F64) * 2
    stds = torch.tensor([[0.2, 0.9], [0.6, 0.15], [0.35, 0.35], [1.2, 0.05]], dtype=F64)
    return weights, means, stds


def _torch_mixture(weights, means, stds, sigma):
    comp = dist.Independent(dist.Normal(means, (stds ** 2 + sigma ** 2).sqrt()), 1)
    return dist.MixtureSameFamily(dist.Categorical(probs=weights / weights.sum()), comp)


@pytest.mark.parametrize("sigma", [1e-3, 0.05, 0.4, 2.0, 80.0])
def test_tweedie_with_an_independent_mixture_density(sigma):
    # D = x + sigma^2 grad log p_sigma(x), the density built by torch.distributions, differentiated by autograd
    weights, means, stds = _anisotropic()
    gm = GaussianMixture(weights, means, stds)
    g = torch.Generator().manual_seed(12)
    x = (torch.randn(16, 2, generator=g, dtype=F64) * (2 + sigma)).requires_grad_(True)
    log_p = _torch_mixture(weights, means, stds, sigma).log_prob(x)
    (grad,) = torch.autograd.grad(log_p.sum(), x)
    x = x.detach()
    # both sides round at the scale of x + sigma^2*score: eps*|x| absolute, |x| up to ~4*(2 + sigma)
    tol = 16 * EPS * max(1.0, float(x.abs().max()))
    torch.testing.assert_close(gm.denoise(x, sigma), x + sigma ** 2 * grad, rtol=0, atol=tol)
    torch.testing.assert_close(gm.score(x, sigma), grad, rtol=1e-12, atol=1e-12 / sigma ** 2)
    torch.testing.assert_close(gm.eps(x, sigma), -sigma * grad, rtol=1e-12, atol=1e-12 / sigma)
    torch.testing.assert_close(gm.log_prob(x, sigma), log_p.detach(), rtol=1e-13, atol=1e-13)


def _posterior_mean_mp(weights, means, stds, x, sigma):
    """E[x0 | x] as the responsibility-weighted per-component posterior means (x*v + mu*s^2)/(v + s^2), in
    mpmath: a different formula from Tweedie's x + s^2*score, free of its cancellation."""
    with mpmath.workdps(50):
        s2 = mpmath.mpf(sigma) ** 2
        logs, means_post = [], []
        for w, mu, sd in zip(weights, means, stds):
            lw, post = mpmath.log(mpmath.mpf(w)), []
            for xi, m, s in zip(x, mu, sd):
                v = mpmath.mpf(s) ** 2
                lw += mpmath.log(mpmath.npdf(mpmath.mpf(xi), mpmath.mpf(m), mpmath.sqrt(v + s2)))
                post.append((mpmath.mpf(xi) * v + mpmath.mpf(m) * s2) / (v + s2))
            logs.append(lw)
            means_post.append(post)
        top = max(logs)
        r = [mpmath.exp(lw - top) for lw in logs]
        return [float(sum(ri * p[d] for ri, p in zip(r, means_post)) / sum(r)) for d in range(len(x))]


@pytest.mark.parametrize("x, sigma", [((40.0, -3.0), 0.05), ((-30.0, 25.0), 0.01), ((0.4, 0.3), 1e-6),
                                      ((300.0, -120.0), 80.0), ((5.0, 2.0), 1e3), ((9.0, -7.0), 3.0)])
def test_denoise_against_per_component_posterior_means(x, sigma):
    # far from every component (responsibilities underflow for all but one), tiny and huge sigma
    weights, means, stds = _anisotropic()
    gm = GaussianMixture(weights, means, stds)
    got = gm.denoise(torch.tensor([x], dtype=F64), sigma)[0]
    want = torch.tensor(_posterior_mean_mp(weights.tolist(), means.tolist(), stds.tolist(), x, sigma), dtype=F64)
    # Tweedie's form x + s^2*score rounds at eps*|x| (2e-14 relative at x = 300, sigma = 80): the bound
    torch.testing.assert_close(got, want, rtol=4 * EPS, atol=8 * EPS * max(abs(v) for v in x))


@pytest.mark.parametrize("sigma", [0.1, 0.7, 3.0])
def test_denoise_matches_2d_quadrature(sigma):
    # E[x0 | x] = int y p0(y) N(x; y, s^2) dy / int p0(y) N(x; y, s^2) dy on a 2-D grid: the integrand is a smooth
    # Gaussian product (narrowest std ~ 0.05), for which the trapezoid rule converges spectrally
    weights, means, stds = _anisotropic()
    gm = GaussianMixture(weights, means, stds)
    xs = torch.tensor([[-2.0, 1.0], [0.5, -0.3], [3.0, 2.5]], dtype=F64)
    h = 0.02  # trapezoid error ~ exp(-2 pi^2 (0.05/h)^2) = exp(-123); the range covers p0's tails beyond 1e-30
    grid = torch.arange(-16.0, 16.0 + h / 2, h, dtype=F64)
    y = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    log_p0 = _torch_mixture(weights, means, stds, 0.0).log_prob(y)
    for x in xs:
        logw = log_p0 - ((x - y) ** 2).sum(1) / (2 * sigma ** 2)
        w = torch.softmax(logw, 0)
        torch.testing.assert_close(gm.denoise(x[None], sigma)[0], w @ y, rtol=1e-10, atol=1e-10)

#----------------------------------------------------------------------------
# EmpiricalDenoiser with a data offset.


def _brute(data, x, sigma):
    d2 = ((x[:, None, :] - data[None]) ** 2).sum(-1)  # exact differences: no |x||y| rounding
    logits = -d2 / (2 * sigma ** 2)
    n, dim = data.shape
    lp = torch.logsumexp(logits, 1) - math.log(n) - 0.5 * dim * math.log(2 * math.pi * sigma ** 2)
    return torch.softmax(logits, 1) @ data, lp


@pytest.mark.parametrize("offset, sigma", [(0.0, 0.05), (1e3, 0.05), (1e3, 0.01), (1e4, 0.01)])
def test_empirical_float64_path_with_offset_data(offset, sigma):
    # regression: the float64 path formed x.y - |y|^2/2 uncentred, rounding at |x||y| ~ offset^2: at offset 1e3,
    # sigma = 0.01 log_prob was off by 2.2e-6 and D by 2.5e-9; at offset 1e4, 4.1e-4 and 7.8e-8
    g = torch.Generator().manual_seed(13)
    data = torch.randn(200, 2, generator=g, dtype=F64) + offset
    x = data[:8] + 0.03 * torch.randn(8, 2, generator=g, dtype=F64)
    ed = EmpiricalDenoiser(data, chunk_size=64)
    want, want_lp = _brute(data, x, sigma)
    # x - y, x - c and y - c are exact (Sterbenz), so both sides round at the data's spread, not its offset:
    # logits to eps*|x - c|^2/sigma^2, D to that times the spread, the score to D's error over sigma^2
    c = data.mean(0)
    tol_logits = 16 * EPS * (1 + float(((x - c) ** 2).sum(1).max())) / sigma ** 2
    tol_d = tol_logits * float((data - c).norm(dim=1).max())
    torch.testing.assert_close(ed(x, sigma), want, rtol=0, atol=tol_d)
    torch.testing.assert_close(ed.log_prob(x, sigma), want_lp, rtol=0, atol=tol_logits)
    torch.testing.assert_close(ed.score(x, sigma), (want - x) / sigma ** 2, rtol=0, atol=tol_d / sigma ** 2)


def test_empirical_tiny_sigma_returns_a_data_point_bit_for_bit_with_offset():
    # the logits are centred but the average is of the uncentred data: one-hot weights give y_i exactly
    g = torch.Generator().manual_seed(14)
    data = torch.randn(50, 3, generator=g, dtype=F64) * 0.1 + 12345.678
    ed = EmpiricalDenoiser(data, chunk_size=16)
    x = data[[3, 17, 44]] + 1e-9
    assert torch.equal(ed(x, 1e-12), data[[3, 17, 44]])
    assert torch.equal(ed(x, torch.tensor([1e-200, 1e-12, 1e-30], dtype=F64)), data[[3, 17, 44]])
