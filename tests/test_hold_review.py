"""Regression tests from the HOLD maths review: the small-t Cholesky, time/grid/shape validation, and the
samplers against the continuous reverse SDE / probability-flow ODE integrated independently (scipy, float64)."""

import mpmath
import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.integrate import solve_ivp

from diffkern.hold import HOLD, chol_rows
from diffkern.hold_sampling import GaussianMixture, GaussianMixtureScore, sample, sampler_table, time_grid

F64 = torch.float64


def mp_chol(proc: HOLD, t: float, dps: int = 110) -> np.ndarray:
    """chol(E Sigma_0 E^T + Q + delta I) with E, Q from Van Loan's block exponential in ``dps``-digit arithmetic."""
    n = proc.order
    F, GG = proc.F.numpy(), (proc.G @ proc.G.T).numpy()
    M = np.block([[F, GG], [np.zeros((n, n)), -F.T]])
    with mpmath.workdps(dps):
        Phi = mpmath.expm(mpmath.matrix(M.tolist()) * mpmath.mpf(t))
        E, Q = Phi[:n, :n], Phi[:n, n:] * Phi[:n, :n].T
        S = E * mpmath.matrix(proc.cov0().tolist()) * E.T + Q + proc.delta * mpmath.eye(n)
        return np.array(mpmath.cholesky(S).tolist(), dtype=float)

#----------------------------------------------------------------------------
# L_t at small t: Sigma_t (HSM) is singular to float64 precision, its Cholesky lost every digit of L_nn.


@pytest.mark.parametrize("n", (3, 4, 5, 6))
@pytest.mark.parametrize("delta", (0.0, 1e-9))
def test_chol_at_small_t_against_high_precision(n, delta):
    """Before the fix, delta = 0: L_nn 5x off at n = 5, t = 1e-3, and exactly 0 (an infinite score) at some t.
    chol_rows is backward stable in the rows of [E Sigma_0^1/2, chol(Q), sqrt(delta) I], so L_nn inherits
    the accuracy of E and of the Gramian series (normalized <= 5e-12 for n <= 6, test_hold_math): 1e-10."""
    proc = HOLD(n, L=2.0, alpha=0.08, delta=delta)
    for t in (1e-6, 1e-4, 1e-3, 1e-2, 0.1, 1.0):
        ref = mp_chol(proc, t)
        got = proc.chol(t).numpy()
        assert abs(got[-1, -1] - ref[-1, -1]) <= 1e-10 * ref[-1, -1], (t, got[-1, -1], ref[-1, -1])
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-10 * np.abs(ref).max())


def test_chol_is_batched_and_factors_the_jittered_cov():
    proc = HOLD(4, L=2.0, delta=1e-9, beta=(0.5, 1.0), T=2.0)
    t = torch.tensor([[0.0, 1e-5, 0.02], [0.3, 1.0, 2.0]], dtype=F64)
    Lt, S = proc.chol(t), proc.cov(t, jitter=True)
    assert Lt.shape == (2, 3, 4, 4) and torch.equal(Lt, Lt.tril())
    d = torch.sqrt(torch.diagonal(S, dim1=-2, dim2=-1))
    assert float(((Lt @ Lt.transpose(-1, -2) - S).abs() / (d[..., :, None] * d[..., None, :])).max()) < 1e-13
    torch.testing.assert_close(Lt[0, 0], torch.diag(torch.tensor([1e-9, *[0.04 + 1e-9] * 3], dtype=F64).sqrt()),
                               rtol=1e-15, atol=0)  # t = 0: Sigma_0 + delta I
    torch.testing.assert_close(proc.chol(0.3), Lt[1, 0], rtol=0, atol=0)


def test_chol_rows():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(3, 4, 9, dtype=F64, generator=g)
    torch.testing.assert_close(chol_rows(M), torch.linalg.cholesky(M @ M.transpose(-1, -2)), rtol=1e-12, atol=1e-14)
    R = torch.randn(4, 3, dtype=F64, generator=g)
    R[1] = 0.0
    R[3] = 2 * R[0]  # rank 2: a zero row and a dependent row give zero columns, not NaN
    Lc = chol_rows(R)
    assert torch.isfinite(Lc).all() and (torch.diagonal(Lc) >= 0).all()
    torch.testing.assert_close(Lc @ Lc.T, R @ R.T, rtol=0, atol=1e-14 * float((R @ R.T).abs().max()))
    for bad in (torch.ones(3), torch.ones(2, 2, dtype=torch.int64), [[1.0]]):
        with pytest.raises(ValueError, match=r"^M: expected a floating tensor of shape \(\.\.\., n, k\)"):
            chol_rows(bad)

#----------------------------------------------------------------------------
# Bad arguments name themselves.


def test_time_arguments_are_validated():
    proc = HOLD(3)
    for bad, exc in ((-1.0, ValueError), (float("nan"), ValueError), (float("inf"), ValueError), ("0.5", TypeError),
                     (True, TypeError)):
        for f in (proc.transition, proc.gramian, proc.cov, proc.chol, proc.score_scale):
            with pytest.raises(exc, match="^t:"):
                f(bad)
    with pytest.raises(ValueError, match="^b:"):
        proc.a_cov(-0.1)
    with pytest.raises(ValueError, match="^t:.*t > 0"):  # z_n does not depend on x0 at t = 0: 0/0 weights
        proc.x0_coefficients(0.0)
    w_z, w_e = HOLD(1).x0_coefficients(0.0)  # n = 1: z = x0 + sqrt(delta) eps, well defined
    assert float(w_z[0]) == 1.0 and torch.isfinite(w_e)
    x0 = torch.zeros(2, 1, 3)
    for t in (torch.rand(3), torch.rand(2, 1), torch.tensor(0.5), 0.5):
        with pytest.raises(ValueError, match="^t: expected a tensor of shape \\(2,\\)"):
            proc.perturb(x0, t)


def test_sampler_table_grid():
    proc = HOLD(3)
    g32 = time_grid(proc, 20, spacing="quadratic").float()
    # b_i = int beta over a step is a difference of times: it was computed in float32 for a float32 grid
    assert torch.equal(sampler_table(proc, g32, "sscs"), sampler_table(proc, g32.double(), "sscs"))
    for bad in (torch.tensor([1.0, 2.0], dtype=F64), torch.tensor([5.0, 0.0], dtype=F64),
                torch.tensor([5.0, float("nan"), 1.0], dtype=F64), torch.tensor([5.0], dtype=F64),
                torch.tensor([[5.0, 1.0]], dtype=F64), [5.0, 1.0]):
        with pytest.raises(ValueError, match="^grid:"):
            sampler_table(proc, bad)


def test_sample_shape_and_empty_batch():
    proc = HOLD(3)
    model = GaussianMixtureScore(proc, GaussianMixture([1.0], [0.5], [0.2]), elementwise=True)
    x = sample(model, proc, (0, 1, 4), num_steps=3, backend="reference")
    assert x.shape == (0, 1, 4)
    for shape in ((4,), (2, 1.0, 4), (2, -1, 4)):
        with pytest.raises(ValueError, match="^shape:"):
            sample(model, proc, shape, num_steps=3, backend="reference")
    with pytest.raises(ValueError, match="^t_min:"):
        sample(model, proc, (1, 1, 4), num_steps=3, t_min=True, backend="reference")

#----------------------------------------------------------------------------
# The samplers against the continuous processes, integrated independently (scipy, float64).

DATA_MEAN, DATA_STD, L_INV, ALPHA = 0.5, 0.2, 0.5, 0.08


def marginal(F: np.ndarray, gg: float, b: float):
    """(a, V) of z_b for data N(m, s^2), HSM, from scipy: Van Loan for r b <= 2 (exact there), else the
    stationary form I/L + E (Sigma_0 - I/L) E^T, which is exact at large b (``math-hold.md`` 3.3)."""
    n = F.shape[0]
    s0 = np.diag([0.0] + [ALPHA * L_INV] * (n - 1))
    r = -F[-1, -1] / n
    if r * b <= 2:
        GG = np.zeros((n, n))
        GG[-1, -1] = gg
        Phi = scipy.linalg.expm(np.block([[F, GG], [np.zeros((n, n)), -F.T]]) * b)
        E = Phi[:n, :n]
        S = E @ s0 @ E.T + Phi[:n, n:] @ E.T
    else:
        E = scipy.linalg.expm(F * b)
        S = L_INV * np.eye(n) + E @ (s0 - L_INV * np.eye(n)) @ E.T
    a = E[:, 0]
    return a, DATA_STD**2 * np.outer(a, a) + S


def score_row(F, gg, t):
    """s_n(z) = row @ z + c for Gaussian data."""
    a, V = marginal(F, gg, t)
    Vi = np.linalg.inv(V)
    return -Vi[-1], float(Vi[-1] @ a) * DATA_MEAN


def discrete_law(proc: HOLD, sampler: str, steps: int, T: float, t_min: float):
    """(mean, cov) of the state after the loop (no denoise) of the fused table, from N(0, I/L)."""
    F, gg, n = proc.F.numpy(), 2 * proc.xi / proc.L, proc.order
    grid = time_grid(proc, steps, t_min=t_min)
    tab = sampler_table(proc, grid, sampler, denoise=False).numpy()
    lnn = proc.score_scale(grid[:-1]).numpy()
    mu, P = np.zeros(n), np.eye(n) / proc.L
    for i, t in enumerate(grid[:-1].tolist()):
        row, c = score_row(F, gg, t)  # eps_hat = -L_nn s_n: the network convention, L_nn cancels
        K, k, C = tab[i, :, :n], tab[i, :, n], tab[i, :, n + 1:]
        M = K - lnn[i] * np.outer(k, row)
        mu, P = M @ mu - lnn[i] * c * k, M @ P @ M.T + C @ C.T
    return mu, P


def continuous_law(proc: HOLD, kind: str, T: float, t_min: float, mu0: np.ndarray, P0: np.ndarray):
    """Reverse SDE (score weight 2, noise) or probability-flow ODE (weight 1) from N(mu0, P0) at T to t_min."""
    F, gg, n = proc.F.numpy(), 2 * proc.xi / proc.L, proc.order
    w = 1.0 if kind == "ode" else 2.0

    def rhs(tau, y):
        row, c = score_row(F, gg, T - tau)
        A = -F.copy()
        A[-1] += w * gg / 2 * row
        P = y[n:].reshape(n, n)
        dP = A @ P + P @ A.T
        if kind == "sde":
            dP[-1, -1] += gg
        return np.concatenate([A @ y[:n] + w * gg / 2 * c * np.eye(n)[-1], dP.ravel()])

    y0 = np.concatenate([mu0, P0.ravel()])
    y = solve_ivp(rhs, (0.0, T - t_min), y0, method="DOP853", rtol=1e-11, atol=1e-13).y[:, -1]
    return y[:n], y[n:].reshape(n, n)


@pytest.mark.parametrize("n", (2, 3))
def test_samplers_converge_to_the_continuous_processes(n):
    """Started from the exact p_T, both continuous processes (the drift formulas of ``math-hold.md`` 5) land on
    the exact forward marginal at t_min, to the integrator's tolerance (rtol 1e-11: asserted 1e-8). Started
    from the samplers' prior N(0, I/L), the discrete law -> the continuous law at first order in the step
    (4x steps: error / ~4, measured 4.1-4.9 from 1000 steps on; asserted <= / 3). At 250 steps the Euler ODE
    is still pre-asymptotic for n = 3 (its skew part rotates fast), hence 1000 and 4000."""
    T, t_min = 5.0, 1e-2
    proc = HOLD(n, L=1 / L_INV, alpha=ALPHA, T=T)
    F, gg = proc.F.numpy(), 2 * proc.xi / proc.L
    a, V = marginal(F, gg, t_min)
    aT, VT = marginal(F, gg, T)
    for kind, samplers in (("ode", ("ode",)), ("sde", ("em", "sscs"))):
        mu_c, P_c = continuous_law(proc, kind, T, t_min, aT * DATA_MEAN, VT)
        np.testing.assert_allclose(mu_c, a * DATA_MEAN, rtol=0, atol=1e-8)
        np.testing.assert_allclose(P_c, V, rtol=0, atol=1e-8)
        mu_c, P_c = continuous_law(proc, kind, T, t_min, np.zeros(n), np.eye(n) / proc.L)
        for sampler in samplers:
            errs = []
            for steps in (1000, 4000):
                mu, P = discrete_law(proc, sampler, steps, T, t_min)
                errs.append(max(np.abs(mu - mu_c).max(), np.abs(P - P_c).max()))
            assert errs[1] <= errs[0] / 3 and errs[1] < 0.1 * np.abs(P_c).max(), (kind, sampler, errs)
