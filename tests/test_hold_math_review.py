"""Independent float64 review of the HOLD++ maths (``math-hold.md`` 2-6, 10): every oracle here is built from
the notes, not from ``diffkern.hold``: the drift by the Euclid recursion on (lambda + r)^n in mpmath, E(t) and
Sigma_t at 200 digits (where the paper form Sigma_inf + E (Sigma_0 - Sigma_inf) E^T cannot cancel), the
sampler oracle from scipy's Van Loan block exponential, and Monte Carlo through the real fused ops."""
import math

import mpmath
import numpy as np
import pytest
import scipy.linalg
import torch

from diffkern.hold import HOLD, chol_psd
from diffkern.hold_sampling import GaussianMixture, GaussianMixtureScore, sample, sampler_table, time_grid
from diffkern.ops.hold import hold_perturb

F64 = torch.float64
DPS = 200  # Sigma_11 ~ t^(2n-1): 1e-120 at n = 8, t = 1e-8, against O(1) terms in the paper form
ORDERS = tuple(range(1, 9))
L_INV, ALPHA = 0.5, 0.08  # the authors' defaults: L = 2
# Normalized float64 error of the closed forms (|err_ij| / sqrt(S_ii S_jj)), measured against 200 digits: the
# incomplete-gamma series cancels among its C_m terms, whose size grows with n (n = 8: 2e-10 near 2 r b = 2n).
COV_TOL = {1: 1e-14, 2: 1e-14, 3: 1e-13, 4: 1e-12, 5: 1e-12, 6: 1e-11, 7: 3e-11, 8: 1e-9}
TIMES = (1e-6, 1e-4, 1e-3, 1e-2, 0.1, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0)


def mp_drift(n: int):
    """(F, r) in mpmath from det(lambda I - F) = (lambda + r)^n alone: Q_n is the part of (lambda + r)^n with
    n's parity, xi Q_{n-1} the rest; then Q_k - lambda Q_{k-1} = gamma_{k-1}^2 Q_{k-2} downwards (notes 2.2)."""
    r = mpmath.sqrt(2 * n - 3) if n > 1 else mpmath.mpf(1)
    full = [mpmath.binomial(n, k) * r ** (n - k) for k in range(n + 1)]  # coefficient of lambda^k
    Qk = [c if (k - n) % 2 == 0 else 0 for k, c in enumerate(full)]
    rest = [c if (k - n) % 2 else 0 for k, c in enumerate(full)]
    xi = rest[n - 1]
    Qk1 = [c / xi for c in rest[:n]]
    gam2 = []
    for k in range(n, 1, -1):  # Q_k - lambda Q_{k-1}: degree k - 2, leading coefficient gamma_{k-1}^2
        diff = [Qk[i] - (Qk1[i - 1] if i else 0) for i in range(k - 1)]
        g2 = diff[k - 2]
        gam2.append(g2)
        Qk, Qk1 = Qk1, [c / g2 for c in diff]
    gam2 = gam2[::-1]
    F = mpmath.zeros(n, n)
    for j, g2 in enumerate(gam2):
        F[j, j + 1], F[j + 1, j] = mpmath.sqrt(g2), -mpmath.sqrt(g2)
    F[n - 1, n - 1] = -xi
    return F, r


def mp_law(n: int, b: float, *, hsm: bool = True, delta: float = 0.0, dps: int = DPS):
    """(E(b), Sigma(b) + delta I) at DPS digits by the paper form, which only cancels in float64; b a float or mpf."""
    with mpmath.workdps(dps):
        F, _ = mp_drift(n)
        E = mpmath.expm(F * mpmath.mpf(b))
        S0 = mpmath.diag([0] + [mpmath.mpf(ALPHA) * mpmath.mpf(L_INV)] * (n - 1)) if hsm else mpmath.zeros(n, n)
        Sinf = mpmath.eye(n) * mpmath.mpf(L_INV)
        S = Sinf + E * (S0 - Sinf) * E.T + mpmath.eye(n) * mpmath.mpf(delta)
        return E, S


def to_np(M) -> np.ndarray:
    return np.array(M.tolist(), dtype=float)


def normalized(A: np.ndarray, ref: np.ndarray) -> float:
    d = np.sqrt(np.diag(ref))
    return float((np.abs(A - ref) / np.outer(d, d)).max())

#----------------------------------------------------------------------------
# 2.2: the drift and its critical damping.


@pytest.mark.parametrize("n", ORDERS)
def test_drift_from_the_characteristic_polynomial(n):
    proc = HOLD(n, L=1 / L_INV)
    with mpmath.workdps(60):
        F, r = mp_drift(n)
        np.testing.assert_allclose(proc.F.numpy(), to_np(F), rtol=2e-15, atol=0)
        assert abs(proc.r - float(r)) <= 1e-15 * proc.r and abs(proc.xi - n * float(r)) <= 1e-15 * proc.xi
        if n > 1:
            assert abs(proc.gammas[0] - 1) < 1e-15  # the authors' normalisation gamma_1 = 1
        # one Jordan block: N = F + r I nilpotent of index exactly n (checked in exact-enough arithmetic)
        N = mpmath.matrix(proc.F.tolist()) + r * mpmath.eye(n)
        Nk = mpmath.eye(n)
        for _ in range(n - 1):
            Nk = Nk * N
        assert mpmath.mnorm(Nk, 1) > 0.1 and mpmath.mnorm(Nk * N, 1) <= 1e-12 * mpmath.mnorm(N, 1) ** n
    G = proc.G.numpy()
    np.testing.assert_allclose(G @ G.T, np.diag([0] * (n - 1) + [2 * proc.xi * L_INV]), rtol=1e-15, atol=0)

#----------------------------------------------------------------------------
# 3: mean and covariance of the forward process.


@pytest.mark.parametrize("n", ORDERS)
@pytest.mark.parametrize("hsm", (True, False), ids=("hsm", "dsm"))
def test_mean_and_covariance_against_200_digits(n, hsm):
    beta = (0.3, 1.4)  # b = 0.3 t + 0.7 t^2: everything depends on t only through b
    proc = HOLD(n, L=1 / L_INV, alpha=ALPHA, hsm=hsm, beta=beta, T=40.0)
    ts = torch.tensor(TIMES, dtype=F64)
    E_all, S_all = proc.transition(ts), proc.cov(ts)
    for i, t in enumerate(TIMES):
        b = 0.3 * t + 0.7 * t * t
        E, S = (to_np(M) for M in mp_law(n, b, hsm=hsm))
        np.testing.assert_allclose(E_all[i].numpy(), E, rtol=0, atol=1e-12)
        got = S_all[i].numpy()
        assert normalized(got, S) <= COV_TOL[n], (t, normalized(got, S))
        assert normalized(got.T, got) <= 2 * COV_TOL[n]  # symmetric to the rounding of the series, not bitwise
    np.testing.assert_allclose(proc.cov(0.0).numpy(), np.diag([0] + [ALPHA * L_INV * hsm] * (n - 1)), atol=0)
    np.testing.assert_array_equal(proc.transition(0.0).numpy(), np.eye(n))


@pytest.mark.parametrize("n", ORDERS)
def test_stationary_covariance(n):
    proc = HOLD(n, L=1 / L_INV, delta=0.0)
    F, GG = proc.F.numpy(), (proc.G @ proc.G.T).numpy()
    S = proc.stationary_cov().numpy()
    np.testing.assert_allclose(F @ S + S @ F.T + GG, 0, atol=1e-14 * np.abs(F).max())
    np.testing.assert_allclose(S, np.eye(n) * L_INV, rtol=0, atol=0)
    for t in (60.0, 1e3, 1e6):  # E(t) ~ 0: Sigma_t = I / L, L_t = I / sqrt(L)
        np.testing.assert_allclose(proc.cov(t).numpy(), S, rtol=1e-15, atol=1e-15)
        np.testing.assert_allclose(proc.chol(t).numpy(), np.eye(n) * math.sqrt(L_INV), rtol=1e-15, atol=1e-15)


def test_huge_times_give_the_stationary_law_not_nan():
    """b^k e^{-r b} was inf * 0 = NaN once b^(n-1) overflowed (t = 1e300, or an infinite tensor time)."""
    proc = HOLD(8, L=1 / L_INV)
    t = torch.tensor([1e45, 1e300, math.inf], dtype=F64)
    assert torch.equal(proc.transition(t), torch.zeros(3, 8, 8, dtype=F64))
    torch.testing.assert_close(proc.cov(t), torch.eye(8, dtype=F64).expand(3, 8, 8) * L_INV, rtol=1e-15, atol=0)
    assert torch.isfinite(proc.chol(t)).all()


@pytest.mark.parametrize("n", ORDERS)
@pytest.mark.parametrize("delta", (0.0, 1e-9))
def test_cholesky_factor_at_small_and_large_t(n, delta):
    """L_t = chol(Sigma_t + delta I) (the network's factor) against a 200-digit Cholesky. Without jitter Sigma_t
    is numerically singular at small t (cond ~ t^(1-2n)); the code factors its square root, never Sigma_t."""
    proc = HOLD(n, L=1 / L_INV, alpha=ALPHA, delta=delta)
    ts = (1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 3.0, 10.0)
    got = proc.chol(torch.tensor(ts, dtype=F64)).numpy()
    for i, t in enumerate(ts):
        _, S = mp_law(n, t, delta=delta)
        with mpmath.workdps(DPS):
            ref = to_np(mpmath.cholesky(S))
        assert np.array_equal(got[i], np.tril(got[i])) and (np.diag(got[i]) > 0).all()
        tol = 5 * COV_TOL[n]
        assert abs(got[i][-1, -1] - ref[-1, -1]) <= tol * ref[-1, -1], (t, got[i][-1, -1], ref[-1, -1])
        assert np.abs(got[i] - ref).max() <= tol * np.abs(ref).max(), t

#----------------------------------------------------------------------------
# Transition between two times, and the SSCS A-part.


@pytest.mark.parametrize("n", ORDERS)
def test_transition_between_two_times(n):
    """Phi = E(b2 - b1), Q = Sigma(b2) - Phi Sigma(b1) Phi^T (both HSM and from 0), A-part Q_A = Sigma_inf - A A^T / L."""
    proc = HOLD(n, L=1 / L_INV, alpha=ALPHA, beta=(0.5, 2.0), T=4.0)
    for t1, t2 in ((1e-4, 2e-3), (0.01, 0.3), (0.5, 0.55), (1.0, 3.0)):
        b1, b2 = proc.int_beta(t1), proc.int_beta(t2)
        db = proc.int_beta(torch.tensor(t2, dtype=F64)) - proc.int_beta(torch.tensor(t1, dtype=F64))
        Phi, Q = proc.transition_b(db).numpy(), proc.gramian_b(db).numpy()
        with mpmath.workdps(DPS):
            E1, S1 = mp_law(n, b1)
            E2, S2 = mp_law(n, b2)
            Pm, _ = mp_law(n, mpmath.mpf(b2) - mpmath.mpf(b1))  # exact: S2 - Pm S1 Pm^T cancels to ~t^(2n-1)
            Qm = to_np(S2 - Pm * S1 * Pm.T)
            A = Pm.T
            QA = to_np(mpmath.eye(n) * mpmath.mpf(L_INV) - A * A.T * mpmath.mpf(L_INV))
        np.testing.assert_allclose(Phi, to_np(Pm), rtol=0, atol=1e-12)
        np.testing.assert_allclose(Phi @ to_np(E1), to_np(E2), rtol=0, atol=1e-12)
        assert normalized(Q, Qm) <= COV_TOL[n]
        assert normalized(proc.a_cov(db).numpy(), QA) <= COV_TOL[n]
        np.testing.assert_allclose(proc.a_transition(db).numpy(), to_np(A), rtol=0, atol=1e-12)


def moment_check(x: torch.Tensor, mean: np.ndarray, cov: np.ndarray, k: float = 5.0):
    """x (n, S) samples: every mean and covariance entry within k standard errors of (mean, cov)."""
    S = x.shape[1]
    x = x.double()
    m = x.mean(1).numpy()
    se_m = np.sqrt(np.diag(cov) / S)
    assert (np.abs(m - mean) <= k * se_m).all(), (m, mean, se_m)
    c = x - torch.from_numpy(mean)[:, None]
    emp = (c @ c.T / S).numpy()
    d = np.diag(cov)
    se_c = np.sqrt((np.outer(d, d) + cov**2) / S)  # Var of a product of two centred Gaussians
    assert (np.abs(emp - cov) <= k * se_c).all(), np.abs(emp - cov) / se_c


@pytest.mark.parametrize("n", (1, 2, 3, 5, 8))
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=("f64", "f32"))
def test_sampling_the_transition_reproduces_the_marginal(n, dtype):
    """x0 ~ N(m, s^2) per element; perturb to t1 (per-sample t, batch of 1 and odd sizes), then the exact
    transition t1 -> t2 through hold_perturb with a full initial state (m = n): the moments of z_t2 are those
    of the 200-digit marginal N(a m, s^2 a a^T + Sigma(t2)), a = E(t2) e_1, within 5 standard errors."""
    proc = HOLD(n, L=1 / L_INV, alpha=ALPHA, delta=0.0)
    mean0, s0 = 0.4, 0.3
    g = torch.Generator().manual_seed(n)
    for t1, t2, shape in ((0.02, 0.4, (1, 1, 60001)), (0.7, 2.5, (1, 3, 7, 2857))):
        x0 = (mean0 + s0 * torch.randn(shape, dtype=F64, generator=g)).to(dtype)
        z1, _ = proc.perturb(x0, torch.full((1,), t1, dtype=F64), seed=torch.tensor([11 * n]))
        db = torch.tensor([t2 - t1], dtype=F64)
        z2 = hold_perturb(z1, proc.transition_b(db), chol_psd(proc.gramian_b(db)), seed=torch.tensor([7]), step=3)
        assert z2.dtype == dtype and z2.shape == (1, n * shape[1], *shape[2:])
        E2, S2 = mp_law(n, t2)
        a = to_np(E2)[:, 0]
        moment_check(z2.reshape(n, -1), a * mean0, to_np(S2) + s0**2 * np.outer(a, a))


@pytest.mark.parametrize("n", (1, 3, 6, 8))
def test_forward_perturbation_per_sample_times(n):
    """perturb with a different t per sample (tiny to stationary) against the jittered 120-digit marginal, and
    eps_n is the network target: with delta = 0, (Sigma_t^-1 (z - mu))_n = eps_n / L_t[n, n] exactly."""
    proc = HOLD(n, L=1 / L_INV, alpha=ALPHA, delta=1e-9)
    ts = (1e-3, 0.05, 1.0, 40.0)
    x0 = torch.full((4, 1, 5, 4001), -0.7, dtype=torch.float32)
    z, eps_n = proc.perturb(x0, torch.tensor(ts, dtype=F64), seed=torch.tensor([1, 2, 3, 4]))
    assert z.shape == (4, n, 5, 4001) and eps_n.shape == x0.shape and z.dtype == torch.float32
    for i, t in enumerate(ts):
        E, S = mp_law(n, t, delta=1e-9)
        moment_check(z[i].reshape(n, -1), to_np(E)[:, 0] * -0.7, to_np(S))
    exact = HOLD(n, L=1 / L_INV, alpha=ALPHA, delta=0.0)
    x0 = torch.randn(1, 2, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    for t in (0.8, 3.0):  # cond(L_t) <= 1e4 here: at small t, L_t^-1 (z - mu) amplifies z's rounding by t^(1/2-n)
        z, eps_n = exact.perturb(x0, torch.tensor([t], dtype=F64), seed=torch.tensor([5]))
        E, S = mp_law(n, t)
        with mpmath.workdps(DPS):
            Lm = to_np(mpmath.cholesky(S))
        dev = z.reshape(n, -1).numpy() - to_np(E)[:, :1] * x0.reshape(1, -1).numpy()
        white = scipy.linalg.solve_triangular(Lm, dev, lower=True)  # = eps, whose last row is the target
        np.testing.assert_allclose(white[-1], eps_n.reshape(-1).numpy(), rtol=0, atol=1e-10)
        # and the network's score convention s_n = -eps_n / L_t[n, n] is the conditional score (Sigma^-1 dev)_n
        np.testing.assert_allclose(-np.linalg.solve(to_np(S), dev)[-1], -eps_n.reshape(-1).numpy() / Lm[-1, -1],
                                   rtol=0, atol=1e-8)


#----------------------------------------------------------------------------
# 6, 10.3: the reverse samplers with the exact score of Gaussian data.


def vl_law(F: np.ndarray, gg: float, b: float):
    """(exp(F b), int_0^b exp(F s) g g^T exp(F s)^T ds) by Van Loan's block exponential (float64; torch's
    Pade expm: scipy.linalg.expm takes ~10 ms per 10 x 10 call here, too slow for a few thousand steps)."""
    n = F.shape[0]
    GG = np.zeros((n, n))
    GG[-1, -1] = gg
    Phi = torch.linalg.matrix_exp(torch.from_numpy(np.block([[F, GG], [np.zeros((n, n)), -F.T]]) * b)).numpy()
    return Phi[:n, :n], Phi[:n, n:] @ Phi[:n, :n].T


class Oracle:
    """Exact output law of the discrete samplers for data N(m, s^2) per element, unfused (notes 6.1, 6.2, 6.4):
    EM z <- (I - hF) z + h (2 xi / L) s_n e_n + noise; SSCS A(h/2) -> S(h) -> A(h/2) with every half-step,
    A = exp(F^T h/2) and its Van Loan covariance; score s_n(z) = -(V^-1 (z - a m))_n at the step's start."""

    def __init__(self, n: int, m: float, s: float, T: float):
        with mpmath.workdps(30):
            F, r = mp_drift(n)
        self.n, self.F, self.m, self.s, self.T = n, to_np(F), m, s, T
        self.c = 2 * n * float(r) / (1 / L_INV)  # 2 xi / L

    def marginal(self, t: float):
        E, Q = vl_law(self.F, self.c, t)
        D = np.diag([0] + [ALPHA * L_INV] * (self.n - 1))
        a = E[:, 0]
        return a, self.s**2 * np.outer(a, a) + E @ D @ E.T + Q

    def score_row(self, t: float):
        a, V = self.marginal(t)
        Vi = np.linalg.inv(V)
        return -Vi[-1], float((Vi @ a)[-1] * self.m)  # s_n = row . z + const

    def run(self, sampler: str, grid, denoise: bool):
        n, c = self.n, self.c
        I, en = np.eye(n), np.eye(n)[-1]
        mu, P = np.zeros(n), np.eye(n) * L_INV
        steps = list(zip(grid[:-1], grid[1:])) + ([(grid[-1], 0.0)] if denoise else [])
        for i, (s, s_next) in enumerate(steps):
            h = s - s_next
            row, s0 = self.score_row(s)
            if sampler == "em" or i == len(grid) - 1:  # the denoising step: EM, mean only
                M = I - h * self.F + h * c * np.outer(en, row)
                mu, P = M @ mu + h * c * s0 * en, M @ P @ M.T + (h * c * np.outer(en, en) if i < len(grid) - 1 else 0)
            else:
                A, QA = vl_law(self.F.T, c, h / 2)
                Sm = I + h * c * np.outer(en, row + en / L_INV)
                mu, P = A @ mu, A @ P @ A.T + QA
                mu, P = Sm @ mu + h * c * s0 * en, Sm @ P @ Sm.T
                mu, P = A @ mu, A @ P @ A.T + QA
        return mu, P


def table_law(proc: HOLD, table: torch.Tensor, grid, oracle: Oracle):
    """The law through the code's fused rows z <- K z + k eps_hat + C eta, eps_hat = L_nn s_n with the
    120-digit jittered L_nn (not the code's), from the prior N(0, I / L)."""
    n = proc.order
    mu, P = np.zeros(n), np.eye(n) * L_INV
    for i in range(table.shape[0]):
        t = grid[i]  # the denoising row's score time is t_min = grid[-1]
        with mpmath.workdps(50):  # t >= 1e-3, n <= 5: Sigma_11 >= 1e-27
            lnn = float(mpmath.cholesky(mp_law(n, t, delta=proc.delta, dps=50)[1])[n - 1, n - 1])
        row, s0 = oracle.score_row(t)
        K, k, C = (table[i, :, :n].numpy(), table[i, :, n].numpy(), table[i, :, n + 1:].numpy())
        M = K - lnn * np.outer(k, row)  # eps_hat = -L_nn s_n
        mu, P = M @ mu - lnn * s0 * k, M @ P @ M.T + C @ C.T
    return mu, P


@pytest.mark.parametrize("n", (1, 2, 3, 5))
@pytest.mark.parametrize("sampler", ("em", "sscs"))
def test_fused_tables_are_the_unfused_samplers(n, sampler):
    """Skipping SSCS's first half-step on the stationary prior and merging half-steps is exact in law."""
    proc = HOLD(n, L=1 / L_INV, alpha=ALPHA)
    grid = [5.0 - i * (5.0 - 1e-3) / 30 for i in range(31)]
    np.testing.assert_allclose(time_grid(proc, 30, t_min=1e-3).numpy(), grid, rtol=0, atol=4e-15)
    oracle = Oracle(n, 0.5, 0.2, 5.0)
    table = sampler_table(proc, torch.tensor(grid, dtype=F64), sampler, denoise=True)
    mu, P = table_law(proc, table, grid, oracle)
    mu_o, P_o = oracle.run(sampler, grid, denoise=True)
    np.testing.assert_allclose(mu, mu_o, rtol=0, atol=1e-10)
    np.testing.assert_allclose(P, P_o, rtol=0, atol=1e-10 * np.abs(P_o).max())


@pytest.mark.parametrize("n", (2, 3, 5))
@pytest.mark.parametrize("sampler", ("em", "sscs"))
def test_samplers_converge_to_the_forward_marginal(n, sampler):
    """T = 12 (prior mismatch ~1e-7), quadratic striding, no denoising: the end law at t_min tends to the exact
    forward marginal there, first order in the step (mean and covariance errors quarter from 80 to 320 steps;
    on a linear grid EM's velocity covariance is still off by 50 at 100 steps for n = 5, as 10.4 warns)."""
    T, t_min = 12.0, 1e-2
    proc = HOLD(n, L=1 / L_INV, alpha=ALPHA, T=T)
    oracle = Oracle(n, 0.5, 0.2, T)
    a, V = oracle.marginal(t_min)
    errs = []
    for N in (80, 320):
        grid = time_grid(proc, N, t_min=t_min, spacing="quadratic").tolist()
        mu, P = oracle.run(sampler, grid, denoise=False)
        errs.append(max(np.abs(mu - 0.5 * a).max(), np.abs(P - V).max()))
    assert errs[1] < errs[0] / 3 and errs[1] < 0.02, errs


@pytest.mark.parametrize("sampler", ("em", "sscs"))
def test_sampler_monte_carlo_matches_the_exact_law(sampler):
    """The real path (prior draw, fused op, GaussianMixtureScore as the network) in float32 on an odd shape:
    x's mean and variance within 5 standard errors of the oracle's discrete law."""
    n, steps = 3, 25
    proc = HOLD(n, L=1 / L_INV, alpha=ALPHA)
    model = GaussianMixtureScore(proc, GaussianMixture([1.0], [[0.5]], [0.2]), elementwise=True)
    x = sample(model, proc, (3, 2, 101, 103), sampler=sampler, num_steps=steps + 1, seed=torch.tensor([4]))
    grid = time_grid(proc, steps).tolist()
    mu, P = Oracle(n, 0.5, 0.2, 5.0).run(sampler, grid, denoise=True)
    x = x.double().reshape(-1)
    S = x.numel()
    assert abs(float(x.mean()) - mu[0]) <= 5 * math.sqrt(P[0, 0] / S)
    assert abs(float(x.var()) - P[0, 0]) <= 5 * P[0, 0] * math.sqrt(2 / S)


@pytest.mark.parametrize("n", (1, 3, 5))
def test_exact_score_model(n):
    """GaussianMixtureScore (2 components, d = 2) against the score written from the notes (10.2) in float64."""
    proc = HOLD(n, L=1 / L_INV, alpha=ALPHA, delta=0.0)
    mix = GaussianMixture([0.3, 0.7], [[-1.0, 0.2], [0.8, 0.5]], [0.15, 0.25])
    z = torch.randn(5, 2 * n, dtype=F64, generator=torch.Generator().manual_seed(n))
    t = 0.3
    E, S = (to_np(M) for M in mp_law(n, t))
    a = E[:, 0]
    got = GaussianMixtureScore(proc, mix)(z, t).numpy()
    for i in range(5):
        zi = z[i].reshape(n, 2).numpy()  # component-major: (n, d)
        logw, parts = [], []
        for w, mk, sk in zip((0.3, 0.7), ((-1.0, 0.2), (0.8, 0.5)), (0.15, 0.25)):
            V = sk**2 * np.outer(a, a) + S
            dev = zi - np.outer(a, mk)
            y = np.linalg.solve(V, dev)
            logw.append(math.log(w) - 0.5 * (dev * y).sum() - np.linalg.slogdet(V)[1])  # d = 2: 2 x (1/2) logdet
            parts.append(-y[-1])
        wts = np.exp(np.array(logw) - max(logw))
        s_n = (wts[:, None] * np.array(parts)).sum(0) / wts.sum()
        lnn = to_np(mpmath.cholesky(mp_law(n, t)[1]))[-1, -1]
        np.testing.assert_allclose(got[i], -lnn * s_n, rtol=1e-9, atol=1e-12)

#----------------------------------------------------------------------------
# Bad input.


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="order"):
        HOLD(0)
    with pytest.raises(TypeError, match="order"):
        HOLD(3.0)
    proc = HOLD(3)
    for t in (-1e-3, math.nan, math.inf):
        with pytest.raises(ValueError, match="t: expected a finite time >= 0"):
            proc.cov(t)
    with pytest.raises(ValueError, match=r"t: expected a tensor of shape \(2,\)"):
        proc.perturb(torch.zeros(2, 1, 4), torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match="z0"):
        proc.perturb(torch.zeros(2), torch.zeros(2, dtype=F64))
    with pytest.raises(ValueError, match="proc: the 'ode_flow' flow map supports orders n <= 11 for hsm=True"):
        sampler_table(HOLD(12), time_grid(HOLD(12), 4), "ode_flow")  # other samplers: tests/test_hold_any_order.py
    with pytest.raises(ValueError, match="chol: non-finite"):  # a negative tensor time is not read on the host
        proc.perturb(torch.zeros(1, 1, 4), torch.tensor([-0.5], dtype=F64))
