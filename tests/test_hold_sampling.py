"""HOLD samplers (``math-hold.md`` 6, 10.2-10.4): time grids, fused tables against the unfused moment
recursion, Monte Carlo of the real fused-op path against that recursion, and end-to-end Gaussian-
mixture sampling with the exact score.

The Monte Carlo tests run on the fastest usable CPU backend (cpp when built); every backend is tied to
the reference by tests/test_hold_ops.py. Seeds are fixed.
"""
import math

import pytest
import torch

from diffkern.hold import HOLD
from diffkern.hold_sampling import (GaussianMixture, GaussianMixtureScore, sample, sampler_table, time_grid)
from diffkern.ops.hold import hold_transition
from diffkern.testing import usable_backends

F64 = torch.float64
FAST = "cpp" if "cpp" in usable_backends("cpu") else "reference"
DATA_MEAN, DATA_STD = 0.5, 0.2  # 10.3/10.4 toy data N(0.5, 0.2^2)


def hsm_marginal(proc: HOLD, t: float, data_var: float):
    """(a, V): z_t ~ N(a m, V) per element for data N(m, data_var) (10.2, one component)."""
    E = proc.transition(t)
    d_alpha = torch.full((proc.order,), proc.alpha / proc.L, dtype=F64)
    d_alpha[0] = 0.0
    a = E[:, 0]
    return a, data_var * torch.outer(a, a) + E @ torch.diag(d_alpha) @ E.T + proc.gramian(t)


def unfused_recursion(proc: HOLD, sampler: str, grid: torch.Tensor, m: float, sigma: float, denoise: bool = True):
    """Exact output law (mean, cov) of the discrete sampler for Gaussian data, written from 10.3 (unfused
    SSCS: A(b/2) -> S(b) -> A(b/2) per step, first half-step included), starting from N(0, I/L)."""
    n = proc.order
    eye, en = torch.eye(n, dtype=F64), torch.eye(n, dtype=F64)[:, n - 1]
    c = 2 * proc.xi / proc.L
    mu, P = torch.zeros(n, dtype=F64), eye / proc.L
    ts = grid.tolist()

    def score(t):  # s_n(z) = row . z + s0
        a, V = hsm_marginal(proc, t, sigma**2)
        Vi = torch.linalg.inv(V)
        return -Vi[n - 1], float((Vi @ a)[n - 1] * m)

    def affine(M, b, Q=None):
        nonlocal mu, P
        mu, P = M @ mu + b, M @ P @ M.T + (0 if Q is None else Q)

    for s, s_next in zip(ts[:-1], ts[1:]):
        h = proc.int_beta(s) - proc.int_beta(s_next)
        row, s0 = score(s)
        if sampler == "em":
            affine(eye - h * proc.F + h * c * torch.outer(en, row), h * c * s0 * en, h * c * torch.outer(en, en))
        elif sampler == "ode":
            affine(eye - h * proc.F + h * c / 2 * torch.outer(en, row), h * c / 2 * s0 * en)
        else:
            A, QA = proc.a_transition(h / 2), proc.a_cov(h / 2)
            affine(A, 0.0, QA)
            affine(eye + h * c * torch.outer(en, row + proc.L * en), h * c * s0 * en)
            affine(A, 0.0, QA)
    if denoise:
        h = proc.int_beta(ts[-1])
        row, s0 = score(ts[-1])
        affine(eye - h * proc.F + h * c * torch.outer(en, row), h * c * s0 * en)
    return mu, P


def fused_recursion(proc: HOLD, table: torch.Tensor, grid: torch.Tensor, m: float, sigma: float):
    """The same law propagated through the fused (K, k, C) table rows: eps_hat = L_nn (V^-1 (z - a m))_n."""
    n = proc.order
    mu, P = torch.zeros(n, dtype=F64), torch.eye(n, dtype=F64) / proc.L
    ts = grid.tolist() + [grid[-1].item()] * (table.shape[0] - grid.numel() + 1)
    for i in range(table.shape[0]):
        K, k, C = table[i, :, :n], table[i, :, n], table[i, :, n + 1:]
        a, V = hsm_marginal(proc, ts[i], sigma**2)
        Vi, lnn = torch.linalg.inv(V), float(proc.score_scale(ts[i]))
        M = K + lnn * torch.outer(k, Vi[n - 1])
        mu, P = M @ mu - lnn * float((Vi @ a)[n - 1] * m) * k, M @ P @ M.T + C @ C.T
    return mu, P

#----------------------------------------------------------------------------
# Time grids and tables.


def test_time_grids():
    proc = HOLD(3, T=5.0)
    lin, quad = time_grid(proc, 10, t_min=1e-3), time_grid(proc, 10, t_min=1e-3, spacing="quadratic")
    for g in (lin, quad):
        assert g.dtype == F64 and g.shape == (11,) and g[0] == 5.0 and g[-1] == pytest.approx(1e-3, abs=1e-15)
        assert (g[1:] < g[:-1]).all()
    torch.testing.assert_close(lin[1:] - lin[:-1], torch.full((10,), -(5.0 - 1e-3) / 10, dtype=F64))
    i = torch.arange(11, dtype=F64)
    torch.testing.assert_close(quad, 1e-3 + (5.0 - 1e-3) * (1 - i / 10) ** 2)
    for bad in ({"steps": 0}, {"t_min": 0.0}, {"t_min": 5.0}, {"spacing": "log"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            time_grid(proc, **{"steps": 10, **bad})


@pytest.mark.parametrize("sampler", ("em", "sscs", "ode"))
@pytest.mark.parametrize("n", (1, 2, 3, 4, 5, 6))
def test_fused_tables_reproduce_the_unfused_sampler(sampler, n):
    """The one-kernel-per-step tables (first A half-step skipped, half-steps merged) give exactly the law of
    the unfused sampler of 10.3 (no Monte Carlo); also with time-varying beta and quadratic striding."""
    for proc, spacing in ((HOLD(n, L=1.0), "linear"), (HOLD(n, L=2.0, beta=(0.5, 1.5), T=2.0), "quadratic")):
        grid = time_grid(proc, 12, spacing=spacing)
        mu_f, P_f = fused_recursion(proc, sampler_table(proc, grid, sampler), grid, DATA_MEAN, DATA_STD)
        mu_u, P_u = unfused_recursion(proc, sampler, grid, DATA_MEAN, DATA_STD)
        scale = float(P_u.abs().max())  # EM expands for n >= 5 at 12 steps (10.4): compare relative to the size
        torch.testing.assert_close(mu_f, mu_u, rtol=1e-9, atol=1e-12 * max(1.0, float(mu_u.abs().max())))
        torch.testing.assert_close(P_f, P_u, rtol=1e-9, atol=1e-12 * max(1.0, scale))


def test_recursion_matches_published_numbers():
    """10.3 cross-check: n = 3, 30 NFE, L^-1 = 1, alpha = 0.08, T = 5, t_min = 1e-3, linear grid."""
    proc = HOLD(3, L=1.0, alpha=0.08, T=5.0)
    grid = time_grid(proc, 29)
    for sampler, mean, var in (("sscs", 0.5200, 0.02286), ("em", 0.5315, 0.07928)):
        mu, P = unfused_recursion(proc, sampler, grid, DATA_MEAN, DATA_STD)
        assert float(mu[0]) == pytest.approx(mean, abs=5e-5) and float(P[0, 0]) == pytest.approx(var, abs=5e-6)

#----------------------------------------------------------------------------
# Monte Carlo of the real kernel path against the exact recursion (10.3).


@pytest.mark.parametrize("sampler,n,spacing", [("em", 2, "linear"), ("em", 3, "linear"), ("em", 5, "quadratic"),
                                               ("sscs", 2, "quadratic"), ("sscs", 3, "linear"),
                                               ("sscs", 5, "linear"), ("ode", 3, "linear")])
def test_sampler_moments_monte_carlo(sampler, n, spacing):
    proc, nfe, samples = HOLD(n, L=1.0), 30, 100_000
    model = GaussianMixtureScore(proc, GaussianMixture([1.0], [DATA_MEAN], [DATA_STD]), elementwise=True)
    z = sample(model, proc, (1, 1, samples), sampler=sampler, num_steps=nfe, spacing=spacing, seed=n * 7 + 1,
               backend=FAST, return_state=True).reshape(n, samples).double()
    mu, P = unfused_recursion(proc, sampler, time_grid(proc, nfe - 1, spacing=spacing), DATA_MEAN, DATA_STD)
    var = torch.diagonal(P)
    mean_err = (z.mean(1) - mu).abs() / torch.sqrt(var / samples)  # in standard errors
    var_err = (z.var(1) - var).abs() / (var * math.sqrt(2 / (samples - 1)))
    assert (mean_err < 4).all() and (var_err < 4).all(), (mean_err, var_err)

#----------------------------------------------------------------------------
# End-to-end Gaussian-mixture sampling with the exact score (10.2, 10.5 #5).

MIXTURE = GaussianMixture([0.3, 0.7], [-1.0, 0.8], [0.15, 0.25])


def test_exact_mixture_score_matches_autograd():
    proc = HOLD(3, L=2.0)
    mix2d = GaussianMixture([0.25, 0.75], [[1.0, -1.0], [-0.5, 0.5]], [0.3, 0.5])
    z = torch.randn(7, 6, dtype=F64, generator=torch.Generator().manual_seed(0))
    for t in (1e-3, 0.2, 2.0):
        a, V = GaussianMixtureScore(proc, mix2d).marginal(t)
        zz = z.clone().requires_grad_(True)
        logp = torch.logsumexp(torch.stack([
            torch.distributions.MultivariateNormal((a[:, None] * mix2d.means[k][None]).reshape(-1),
                                                   torch.kron(V[k], torch.eye(2, dtype=F64))).log_prob(zz)
            + math.log(float(mix2d.weights[k])) for k in range(2)]), 0).sum()
        (grad,) = torch.autograd.grad(logp, zz)
        expected = -grad[:, 4:] * proc.score_scale(t)  # eps_hat = -L_nn * (score of the last component)
        torch.testing.assert_close(GaussianMixtureScore(proc, mix2d)(z, t), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sampler", ("sscs", "em"))
def test_mixture_end_to_end(sampler):
    """n = 3, 500 NFE, 100k draws: KS distance to the mixture CDF <= 0.01 and the left-mode mass within 0.01."""
    proc, samples = HOLD(3, L=1.0), 100_000
    x = sample(GaussianMixtureScore(proc, MIXTURE, elementwise=True), proc, (1, 1, samples), sampler=sampler,
               num_steps=500, seed=11, backend=FAST).reshape(-1).double()
    xs, _ = torch.sort(x)
    cdf = MIXTURE.cdf(xs)
    i = torch.arange(1, samples + 1, dtype=F64)
    ks = max(float((i / samples - cdf).max()), float((cdf - (i - 1) / samples).max()))
    assert ks <= 0.01
    assert abs(float((x < 0).double().mean()) - 0.3) <= 0.01

#----------------------------------------------------------------------------
# Bad input.


def test_sample_bad_input():
    proc = HOLD(2)
    model = GaussianMixtureScore(proc, MIXTURE, elementwise=True)
    with pytest.raises(ValueError, match="sampler"):
        sample(model, proc, (1, 1, 4), sampler="heun", num_steps=3, backend="reference")
    with pytest.raises(ValueError, match="num_steps"):
        sample(model, proc, (1, 1, 4), num_steps=1, backend="reference")
    with pytest.raises(ValueError, match="t_min"):
        sample(model, proc, (1, 1, 4), num_steps=3, t_min=-1.0, backend="reference")
    with pytest.raises(ValueError, match="z: expected shape"):
        sample(model, proc, (1, 1, 4), num_steps=3, z=torch.zeros(1, 3, 4), backend="reference")
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture([0.5, 0.6], [0.0, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="multiple of the order n = 2"):  # a state of 3 channels at n = 2
        hold_transition(torch.zeros(1, 3, 4), torch.zeros(1, 1, 4), sampler_table(proc, time_grid(proc, 2)), 0)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", [b for b in ("cuda", "triton") if b in usable_backends("cuda")])
def test_sampler_moments_cuda(backend):
    """The 10.3 oracle on the GPU kernels: fused SSCS, n = 3, 1e6 draws."""
    proc, nfe, samples, n = HOLD(3, L=1.0), 30, 1_000_000, 3
    model = GaussianMixtureScore(proc, GaussianMixture([1.0], [DATA_MEAN], [DATA_STD]), elementwise=True)
    z = sample(model, proc, (1, 1, samples), sampler="sscs", num_steps=nfe, seed=5, device="cuda", backend=backend,
               return_state=True).reshape(n, samples).double().cpu()
    mu, P = unfused_recursion(proc, "sscs", time_grid(proc, nfe - 1), DATA_MEAN, DATA_STD)
    var = torch.diagonal(P)
    assert ((z.mean(1) - mu).abs() < 4 * torch.sqrt(var / samples)).all()
    assert ((z.var(1) - var).abs() < 4 * var * math.sqrt(2 / (samples - 1))).all()
