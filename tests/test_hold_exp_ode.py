"""The exponential-integrator probability-flow ODE sampler ``"ode_exp"`` (``math-hold.md`` 5): one step is the
exact rotation exp(-S_k b) plus the exponential-Euler integral of the frozen term (xi / L)(s_n + L z_n) e_n.

Checked against scipy's solve_ivp of the frozen-term linear ODE over each step (independent of the
matrix exponential), against the continuous probability-flow ODE's law on Gaussian data with the exact
score (first-order convergence, and stability at 20 steps where the Euler ODE sampler blows up), and
through the real sampling paths (``sample``, ``graphs.sample_hold``) as a deterministic map.
"""
import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from diffkern import graphs
from diffkern.hold import HOLD
from diffkern.hold_sampling import (GaussianMixture, GaussianMixtureScore, denoise_row, sample, sampler_table,
                                    time_grid)
from test_graphs import fake, fresh_cache  # noqa: F401  (fixtures: fake, autouse fresh_cache)
from test_hold_review import ALPHA, L_INV, continuous_law, discrete_law

F64 = torch.float64


def skew_part(proc: HOLD) -> np.ndarray:
    """S_k = F + xi E_nn, the skew-symmetric part of the drift."""
    S = proc.F.numpy().copy()
    S[-1, -1] += proc.xi
    return S


def frozen_step(proc: HOLD, s: float, s_next: float, z0: np.ndarray, eps: float) -> np.ndarray:
    """z at forward time s_next from z0 at s: dz/dtau = beta (-S_k z + g0 e_n) with the frozen
    g0 = (xi / L)(s_n + L z0_n), s_n = -eps / L_nn(s), integrated by DOP853 in forward time (beta(t) explicit)."""
    S, lnn = skew_part(proc), float(proc.score_scale(s))
    g0 = proc.xi / proc.L * (-eps / lnn + proc.L * z0[-1])

    def rhs(t, z):
        d = -S @ z
        d[-1] += g0
        return -proc.beta(t) * d  # dtau = -dt

    return solve_ivp(rhs, (s, s_next), z0, method="DOP853", rtol=1e-13, atol=1e-15).y[:, -1]


@pytest.mark.parametrize("n", (1, 2, 3, 5, 8))
def test_row_is_the_exponential_euler_step(n):
    """Every row (K, k) maps (z0, eps_hat) to the frozen-term ODE solution over its step, to 1e-10 relative to
    the entry size, with large steps (b up to 3.0, rotation angles up to 54 rad at n = 8) and time-varying beta."""
    for proc, spacing, steps in ((HOLD(n, L=2.0), "linear", 4),
                                 (HOLD(n, L=1.0, beta=(0.5, 1.5), T=2.0), "quadratic", 3)):
        grid = time_grid(proc, steps, spacing=spacing)
        tab = sampler_table(proc, grid, "ode_exp", denoise=False).numpy()
        assert not tab[:, :, n + 1:].any()
        for i, (s, s_next) in enumerate(zip(grid[:-1].tolist(), grid[1:].tolist())):
            K, k = tab[i, :, :n], tab[i, :, n]
            cases = [(np.eye(n)[j], 0.0) for j in range(n)] + [(np.zeros(n), 1.0), (np.linspace(-1, 1, n), 0.7)]
            for z0, eps in cases:
                want = frozen_step(proc, s, s_next, z0, eps)
                np.testing.assert_allclose(K @ z0 + k * eps, want, rtol=0, atol=1e-10 * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("n", range(1, 9))
def test_tables_for_every_order_grid_schedule_and_denoise(n):
    """Finite tables of the right shape for n = 1..8, both grids, constant and linear beta, CLD's scaling and
    DSM; K - xi psi e_n^T is the rotation exp(-S_k b) (orthogonal, det 1); the denoising row is appended."""
    procs = [HOLD(n), HOLD(n, L=1.0, beta=(0.1, 6.9), T=1.0), HOLD(n, hsm=False, beta=(2.0, -0.3))]
    if n == 2:
        procs.append(HOLD.from_cld())
    for proc in procs:
        for spacing in ("linear", "quadratic"):
            grid = time_grid(proc, 7, spacing=spacing)
            tab = sampler_table(proc, grid, "ode_exp")
            assert tab.dtype == F64 and tab.shape == (8, n, 2 * n + 1) and torch.isfinite(tab).all()
            assert not tab[:, :, n + 1:].any()  # C = 0: no noise columns
            Kd, kd, _ = denoise_row(proc, float(grid[-1]))
            assert torch.equal(tab[-1, :, :n], Kd[0]) and torch.equal(tab[-1, :, n], kd[0])
            lnn = proc.score_scale(grid[:-1])
            psi = -tab[:-1, :, n] * (proc.L * lnn / proc.xi)[:, None]  # k = -(xi / L) / L_nn psi
            R = tab[:-1, :, :n].clone()
            R[:, :, n - 1] -= proc.xi * psi
            eye = torch.eye(n, dtype=F64).expand_as(R)
            torch.testing.assert_close(R @ R.transpose(-1, -2), eye, rtol=0, atol=1e-12)
            torch.testing.assert_close(torch.linalg.det(R), torch.ones(7, dtype=F64), rtol=0, atol=1e-12)
            if n == 1:  # S_k = 0: the exponential step is the Euler step
                torch.testing.assert_close(tab, sampler_table(proc, grid, "ode"), rtol=1e-14, atol=0)


def x_error(proc: HOLD, sampler: str, steps: int, mu_c: np.ndarray, P_c: np.ndarray, T: float, t_min: float):
    """max(|mean error|, |variance error|) of the sampler's x output vs the continuous ODE law (no Monte Carlo)."""
    mu, P = discrete_law(proc, sampler, steps, T, t_min)
    return max(abs(mu[0] - mu_c[0]), abs(P[0, 0] - P_c[0, 0]))


@pytest.mark.parametrize("n", (3, 5))
def test_gaussian_data_first_order_and_stable_at_20_steps(n):
    """Gaussian data N(0.5, 0.2^2), exact score, from the samplers' prior N(0, I/L): the exact output law of the
    discrete sampler (10.3 recursion) -> the probability-flow ODE's law (solve_ivp) at first order: doubling
    the steps halves the error (measured 640/320 steps: 0.48 at n = 3, 0.50 at n = 5). The constant
    c = N err(N) at N = 640 bounds the error at 20 steps: err(20) <= 4 c / 20 (measured err(20) N / c:
    3.1 at n = 3, 1.03 at n = 5), while Euler's error at 20 steps is > 1000x that bound (measured 611 and 2e10)."""
    T, t_min = 5.0, 1e-3
    proc = HOLD(n, L=1 / L_INV, alpha=ALPHA, T=T)
    mu_c, P_c = continuous_law(proc, "ode", T, t_min, np.zeros(n), np.eye(n) / proc.L)
    errs = {N: x_error(proc, "ode_exp", N, mu_c, P_c, T, t_min) for N in (20, 320, 640)}
    assert abs(errs[640] / errs[320] - 0.5) < 0.05, errs
    bound = 4 * 640 * errs[640] / 20
    assert errs[20] <= bound, (errs, bound)
    assert x_error(proc, "ode", 20, mu_c, P_c, T, t_min) > 1000 * bound


@pytest.mark.parametrize("sampler", ["ode_exp", "ode_flow"])
def test_deterministic_through_sample_and_graphs(fake, sampler):  # noqa: F811
    """No noise is drawn: two seeds give the same output; ``sample`` applies exactly the table rows (K | k | C = 0;
    float64, reference op) to a mixture's exact score; the CUDA-graph runner (CPU stand-in) equals the eager
    sampler."""
    proc = HOLD(3, L=1.0)
    model = GaussianMixtureScore(proc, GaussianMixture([0.3, 0.7], [-1.0, 0.8], [0.15, 0.25]), elementwise=True)
    z0 = torch.randn(2, 3, 5, dtype=F64, generator=torch.Generator().manual_seed(0))
    run = dict(sampler=sampler, num_steps=8, spacing="quadratic", backend="reference", return_state=True)
    a = sample(model, proc, (2, 1, 5), z=z0.clone(), seed=1, **run)
    assert torch.equal(a, sample(model, proc, (2, 1, 5), z=z0.clone(), seed=2, **run))
    grid = time_grid(proc, 7, spacing="quadratic")
    tab, ts, z = sampler_table(proc, grid, sampler), grid.tolist() + [grid[-1].item()], z0.clone()
    assert (tab[:, :, 4:] == 0).all()
    for i in range(tab.shape[0]):
        eps = model(z, ts[i])  # (2, 1, 5)
        z = torch.einsum("ij,bjp->bip", tab[i, :, :3], z) + tab[i, :, 3][None, :, None] * eps
    torch.testing.assert_close(a, z, rtol=1e-12, atol=1e-12)

    def net(z, t):
        return torch.tanh(z[:, :1] * (0.5 + t)) - 0.1 * z[:, 1:2]

    g = graphs.sample_hold(net, proc, (3, 1, 4), sampler=sampler, num_steps=6, seed=3)
    assert torch.equal(g, sample(net, proc, (3, 1, 4), sampler=sampler, num_steps=6, seed=3))
    assert graphs.info()["captures"] == 1  # the graph path ran, not the eager fallback
