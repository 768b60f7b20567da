"""Independent review of the core (non-diffusers) methods: each check rebuilds the method from the math notes
(``math-samplers.md`` 1.6, 2.4, 3.2, 5; ``math-hold.md`` 6.1, 6.2, 6.4) in float64 with scipy/NumPy, sharing no
code with the implementation but the Philox noise it is fed, plus the regression of the one bug found.
"""
import math

import numpy as np
import pytest
import scipy.linalg as sl
import torch
from scipy.integrate import quad_vec

from diffkern import analytic, schedules
from diffkern import hold_sampling as hs
from diffkern.hold import HOLD
from diffkern.ops import philox
from diffkern.ops.ddim import ddim_row, ddim_step
from diffkern.sampling import sample, sample_iadb

F64 = torch.float64
SEED = 7
TOL = 1e-12  # float64 against float64: rounding only


def _xi(x, i):
    """The standard normals the fused op draws for row i (Philox at counter i)."""
    return philox.noise_like(x, torch.tensor([SEED], dtype=torch.int64), i, F64)

#----------------------------------------------------------------------------
# Regression: ddim_row(alpha_prod_t = 1) raised ZeroDivisionError (1/sqrt(1 - ab)) instead of naming the argument.


@pytest.mark.parametrize("ab_prev", [1.0, 0.5])
def test_ddim_row_refuses_noise_free_alpha_prod_t(ab_prev):
    with pytest.raises(ValueError, match="alpha_prod_t"):
        ddim_row(1.0, ab_prev)
    with pytest.raises(ValueError, match="alpha_prod_t"):
        ddim_step(torch.zeros(1, 2), torch.zeros(1, 2), 1.0, ab_prev, prediction_type="sample", backend="reference")

#----------------------------------------------------------------------------
# GE (Permenter & Yuan / smalldiffusion samples(gam, mu)) and McAllester's lam family, textbook loops.


def _mixture():
    gen = torch.Generator().manual_seed(1)
    return analytic.GaussianMixture([1.0, 2.0], torch.randn(2, 3, generator=gen, dtype=F64), [0.6, 0.8])


def _ge_loop(gmm, x, sig, gam, mu):
    x, eps_prev = x.clone(), None
    for i, (s, sn) in enumerate(zip(sig[:-1], sig[1:])):
        d = gmm(x, torch.full((x.shape[0],), s, dtype=F64))
        eps = (x - d) / s
        if sn == 0:
            return d
        eps_av = eps if i == 0 else gam * eps + (1 - gam) * eps_prev
        sigma_p = (sn / s ** mu) ** (1 / (1 - mu))
        x = x - (s - sigma_p) * eps_av + math.sqrt(max(sn * sn - sigma_p * sigma_p, 0.0)) * _xi(x, i)
        eps_prev = eps
    return x


def _sde_loop(gmm, x, sig, lam, integrator):
    x = x.clone()
    for i, (s, sn) in enumerate(zip(sig[:-1], sig[1:])):
        d = gmm(x, torch.full((x.shape[0],), s, dtype=F64))
        if sn == 0:
            return d
        r = sn / s
        if integrator == "exponential":
            x = d + r ** (1 + lam * lam) * (x - d) + sn * math.sqrt(1 - r ** (2 * lam * lam)) * _xi(x, i)
        else:
            x = x + (1 + lam * lam) / 2 * (1 - r * r) * (d - x) + lam * math.sqrt(s * s - sn * sn) * _xi(x, i)
    return x


@pytest.mark.parametrize("final_zero", [True, False])
def test_ge_and_sde_match_textbook_loops(final_zero):
    gmm = _mixture()
    sig = schedules.karras(10, 0.02, 20.0).tolist()
    sig = sig if final_zero else sig[:-1]
    x = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(2)) * sig[0]
    for gam, mu in ((1.0, 0.0), (2.0, 0.0), (2.0, 0.5), (1.5, 0.3)):
        out = sample(gmm, x, sig, "ge", gamma=gam, mu=mu, seed=SEED, backend="reference")
        torch.testing.assert_close(out, _ge_loop(gmm, x, sig, gam, mu), rtol=TOL, atol=TOL)
    for lam in (0.0, 0.5, 1.0, 2.0):
        for integrator in ("exponential", "euler_maruyama"):
            out = sample(gmm, x, sig, "sde", lam=lam, integrator=integrator, seed=SEED, backend="reference")
            torch.testing.assert_close(out, _sde_loop(gmm, x, sig, lam, integrator), rtol=TOL, atol=TOL)
    # limits: lam = 0 is the PF-ODE's Euler/DDIM step; lam = 1 (and mu = 1/2) is the ancestral eta = 1 step
    euler = sample(gmm, x, sig, "euler", backend="reference")
    torch.testing.assert_close(sample(gmm, x, sig, "sde", lam=0.0, backend="reference"), euler, rtol=TOL, atol=TOL)
    ancestral = sample(gmm, x, sig, "euler_ancestral", eta=1.0, seed=SEED, backend="reference")
    torch.testing.assert_close(sample(gmm, x, sig, "sde", lam=1.0, seed=SEED, backend="reference"), ancestral,
                               rtol=TOL, atol=TOL)

#----------------------------------------------------------------------------
# IADB: every variant against its textbook loop, with the exact posterior means of Gaussian data N(m, s^2).

M_DATA, S2_DATA = 0.7, 0.09


def _iadb_means(x, alpha):
    """(E[x0 | x_alpha], E[x1 | x_alpha]) for noise x0 ~ N(0, 1) and data x1 ~ N(M_DATA, S2_DATA)."""
    a = alpha.to(F64).reshape(-1, *([1] * (x.dim() - 1)))
    var = (1 - a) ** 2 + a * a * S2_DATA
    centred = x.to(F64) - a * M_DATA
    return ((1 - a) / var * centred).to(x.dtype), (M_DATA + a * S2_DATA / var * centred).to(x.dtype)


def _iadb_loop(x, alphas, variant, lam):
    x = x.clone()
    for i, (a, an) in enumerate(zip(alphas[:-1], alphas[1:])):
        x0b, x1b = _iadb_means(x, torch.full((x.shape[0],), a, dtype=F64))
        if variant == "euler":
            x = x + (an - a) * (x1b - x0b)
            continue
        if variant == "stochastic":  # single head: the means recovered from D alone
            d = x1b - x0b
            x1b, x0b = x + (1 - a) * d, x - a * d
        k = (0.0 if lam > 0 else 1.0) if a == 0 else (((1 - an) / an) / ((1 - a) / a)) ** (lam * lam)
        x = an * x1b + (1 - an) * (k * x0b + math.sqrt(max(1 - k * k, 0.0)) * _xi(x, i))
    return x


@pytest.mark.parametrize("alphas", [[0.0, 1.0], [0.0, 0.1, 0.5, 0.9, 0.97, 1.0], [0.0, 0.2, 0.6], [0.3, 0.5, 1.0]])
@pytest.mark.parametrize("variant, lam", [("euler", 0.0), ("two_head", 0.0), ("two_head", 1.0), ("stochastic", 0.0),
                                          ("stochastic", 0.5), ("stochastic", 1.0)])
def test_iadb_variants_match_textbook_loop(alphas, variant, lam):
    x0 = torch.randn(16, 3, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    if variant == "two_head":
        model = _iadb_means
    else:
        def model(x, a):
            x0b, x1b = _iadb_means(x, a)
            return x1b - x0b
    out = sample_iadb(model, x0, alphas, variant, lam=lam, seed=SEED, backend="reference")
    torch.testing.assert_close(out, _iadb_loop(x0, alphas, variant, lam), rtol=TOL, atol=TOL)

#----------------------------------------------------------------------------
# HOLD: the em / sscs / ode tables against a construction from scipy's expm and quadrature.


def _hold_rows(p, grid, sampler):
    n, F, xi, L = p.order, p.F.numpy(), p.xi, p.L
    gg = (p.G @ p.G.T).numpy()
    en = np.eye(n)[-1]

    def gram(mat, b):  # int_0^b expm(mat s) G G^T expm(mat s)^T ds
        return quad_vec(lambda s: sl.expm(mat * s) @ gg @ sl.expm(mat * s).T, 0, b, epsabs=1e-16, epsrel=1e-13)[0]

    def lnn(t):  # L_t[n, n] = chol(E Sigma_0 E^T + Q + delta I)[n, n]
        b = p.int_beta(t)
        E = sl.expm(F * b)
        return np.linalg.cholesky(E @ p.cov0().numpy() @ E.T + gram(F, b) + p.delta * np.eye(n))[-1, -1]

    ts = grid.tolist()
    bs = [p.int_beta(ts[i]) - p.int_beta(ts[i + 1]) for i in range(len(ts) - 1)]
    rows = []
    for i, b in enumerate(bs):
        if sampler in ("em", "ode"):
            w = 2.0 if sampler == "em" else 1.0
            K, k, C = np.eye(n) - b * F, -b * w * xi / L / lnn(ts[i]) * en, np.zeros((n, n))
            if sampler == "em":
                C[-1, -1] = math.sqrt(2 * xi * b / L)
        else:  # S step of length b, then the two merged A half-steps (the first half-step is skipped)
            post = b / 2 + (bs[i + 1] / 2 if i + 1 < len(bs) else 0.0)
            A = sl.expm(F.T * post)
            D = np.eye(n)
            D[-1, -1] += 2 * xi * b
            K, k, C = A @ D, A @ (-(2 * xi * b / L) / lnn(ts[i]) * en), np.linalg.cholesky(gram(F.T, post))
        rows.append((K, k, C))
    bt = p.int_beta(ts[-1])  # denoising: EM of length t_min, mean only
    rows.append((np.eye(n) - bt * F, -bt * 2 * xi / L / lnn(ts[-1]) * en, np.zeros((n, n))))
    return rows


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("beta", [1.0, (0.3, 1.5)])
def test_hold_tables_match_scipy_construction(n, beta):
    p = HOLD(n, L=2.0, beta=beta, T=2.0)
    grid = hs.time_grid(p, 4, t_min=1e-2, spacing="quadratic")
    for sampler in ("em", "sscs", "ode"):
        table = hs.sampler_table(p, grid, sampler).numpy()
        for i, (K, k, C) in enumerate(_hold_rows(p, grid, sampler)):
            np.testing.assert_allclose(table[i, :, :n], K, rtol=0, atol=1e-12)
            np.testing.assert_allclose(table[i, :, n], k, rtol=0, atol=1e-12)
            np.testing.assert_allclose(table[i, :, n + 1:], C, rtol=0, atol=1e-12)
