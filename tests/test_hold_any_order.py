"""HOLD above F64_MAX_ORDER = 11: laws and Cholesky factors from diffkern.hold_mp (decimal, rounded to float64).

Oracles: the mpmath paper form of tests/test_hold_math_review.py (mp_law: expm and Sigma_inf + E(Sigma_0 - Sigma_inf)E^T,
a different formulation and library from hold_mp's series in decimal), mpmath's Cholesky of it, and invariants the
oracle does not share (Chapman-Kolmogorov, stationarity, L L^T = Sigma, more digits changing nothing)."""
import math
import warnings

import mpmath
import numpy as np
import pytest
import torch

from diffkern import hold_mp
from diffkern.hold import HOLD, chol_psd
from diffkern.hold_sampling import GaussianMixture, GaussianMixtureScore, exp_ode_rows, sample, sampler_table, time_grid
from diffkern.ops import BackendUnavailable
from diffkern.ops.hold import F64_MAX_ORDER, f64_factor_orders, hold_transition, transition_table
from test_hold_math_review import ALPHA, L_INV, mp_drift, mp_law, moment_check, normalized, to_np

F64 = torch.float64
EPS = float(np.finfo(np.float64).eps)
# Correctly rounded results differ from the exact value by <= 1/2 ulp; against a float64 rounding of the oracle that is
# <= 1 ulp of the entry, i.e. <= 2 eps relative to the row scale sqrt(S_ii) (entries of L are <= it): 4 eps of slack.
ROUND_TOL = 4 * EPS


def oracle_dps(n: int, b: float) -> int:
    """Digits for mp_law: its paper form cancels down to b^(2n-1), and the factors need the Hilbert-like conditioning."""
    return 40 + 3 * n + int((2 * n - 1) * max(0.0, -math.log10(b)))


def mp_factor_and_weights(n: int, t: float, hsm: bool = True, delta: float = 0.0):
    """(E, L = chol(Sigma_t + delta I), Sigma_t + delta I, w_z, w_eps) rounded to float64 from mpmath (beta = 1:
    b = t); w_z, w_eps are the x0 weights through L's last row (the x0 of z and the network's eps_hat)."""
    dps = oracle_dps(n, t)
    E, S = mp_law(n, t, hsm=hsm, delta=delta, dps=dps)
    with mpmath.workdps(dps):
        Lm = mpmath.cholesky(S)
        c = E[:, 0]
        u = mpmath.lu_solve(Lm[: n - 1, : n - 1].T, Lm[n - 1, : n - 1].T)
        den = c[n - 1] - sum(u[i] * c[i] for i in range(n - 1))
        w_z = to_np(mpmath.matrix([-u[i] for i in range(n - 1)] + [1]) / den)[:, 0]
        return to_np(E), to_np(Lm), to_np(S), w_z, float(-Lm[n - 1, n - 1] / den)


def mp_a_chol(n: int, b: float):
    """(chol Q_A(b), Q_A(b)) rounded to float64 from mpmath, Q_A = (I - E^T E) / L (L = 1 / L_INV)."""
    dps = oracle_dps(n, b)
    E, _ = mp_law(n, b, dps=dps)
    with mpmath.workdps(dps):
        QA = (mpmath.eye(n) - E.T * E) * mpmath.mpf(L_INV)
        return to_np(mpmath.cholesky(QA)), to_np(QA)


@pytest.mark.parametrize("n,t,delta", [(12, 1e-3, 0.0), (12, 0.7, 1e-9), (16, 0.05, 1e-9), (24, 0.3, 0.0)])
def test_factors_are_the_rounded_exact_ones(n, t, delta):
    """chol(Sigma_t + delta I), E, Sigma and the x0 weights against mpmath at n = 12..24 (float64 lost every digit of
    L_t[n, n] here: 0.2 relative at n = 12)."""
    proc = HOLD(n, L=1 / L_INV, alpha=ALPHA, delta=delta)
    E, Lr, Sr, w_ref, we_ref = mp_factor_and_weights(n, t, delta=delta)
    got = proc.chol(torch.tensor([t], dtype=F64))[0].numpy()
    scale = np.sqrt(np.diag(Sr))[:, None]
    assert (np.abs(got - Lr) <= ROUND_TOL * scale).all(), np.abs(got - Lr).max()
    assert abs(got[-1, -1] - Lr[-1, -1]) <= 2 * EPS * Lr[-1, -1]  # the score scale, relative
    assert normalized(proc.cov(t, jitter=True).numpy(), Sr) <= ROUND_TOL
    np.testing.assert_allclose(proc.transition(t).numpy(), E, rtol=0, atol=ROUND_TOL)
    w_z, w_e = proc.x0_coefficients(t)
    np.testing.assert_allclose(w_z.numpy(), w_ref, rtol=ROUND_TOL, atol=ROUND_TOL * np.abs(w_ref).max())
    assert abs(float(w_e) - we_ref) <= ROUND_TOL * abs(we_ref)


@pytest.mark.parametrize("n", (12, 24))
def test_a_part_factor_against_mpmath(n):
    """The SSCS noise factor chol Q_A(b), Q_A = (I - E^T E) / L, at a small and a moderate half-step."""
    proc = HOLD(n, L=1 / L_INV, alpha=ALPHA)
    for b in (2e-3, 0.4):
        ref, QAr = mp_a_chol(n, b)
        got = proc.a_chol(torch.tensor(b, dtype=F64)).numpy()
        assert (np.abs(got - ref) <= ROUND_TOL * np.sqrt(np.diag(QAr))[:, None]).all(), b
        assert normalized(proc.a_cov(b).numpy(), QAr) <= ROUND_TOL


def test_more_digits_change_nothing(monkeypatch):
    """The working precision is enough: 40 more digits change no result by more than 1e-30 of its row's scale (entries
    far below it, e.g. off-diagonals ~ e^{-2 r b} at large b, are rounding noise of the series at that level), for DSM
    and for HSM without jitter at small b (where extra_digits grows with log 1/b)."""
    cases = [(12, dict(delta=0.0)), (20, dict(delta=1e-9, hsm=False))]
    bs = (1e-5, 0.02, 1.0, 9.0, 300.0)
    for n, kw in cases:
        base = HOLD(n, **kw)
        want = {k: base._xp.batch(torch.tensor(bs, dtype=F64), k) for k in ("L", "LA", "E", "Q", "w_z")}
        digits = hold_mp.digits
        monkeypatch.setattr(hold_mp, "digits", lambda m: digits(m) + 40)
        more = HOLD(n, **kw)
        for k, v in want.items():
            got = more._xp.batch(torch.tensor(bs, dtype=F64), k)
            row = v.abs().amax(-1, keepdim=True)  # the row's scale (|w_z| per time)
            fin = torch.isfinite(row)  # w_z overflows float64 at b = 300 (E(b) ~ e^{-r b}: x0 is unobservable)
            assert torch.equal(fin, torch.isfinite(got).all(-1, keepdim=True)), (n, k)
            assert ((got - v).abs()[fin.expand_as(v)] <= 1e-30 * row.expand_as(v)[fin.expand_as(v)]).all(), (n, k)
        monkeypatch.setattr(hold_mp, "digits", digits)


def test_invariants_at_order_16():
    """Chapman-Kolmogorov E(b1 + b2) = E(b2) E(b1), Q(b1 + b2) = E(b2) Q(b1) E(b2)^T + Q(b2) (float64 products of
    rounded values: a few eps), L L^T = Sigma + delta I, and the stationary law at large b."""
    n = 16
    proc = HOLD(n, L=1 / L_INV, alpha=ALPHA)
    for b1, b2 in ((0.01, 0.03), (0.5, 1.25)):
        E1, E2, E12 = (proc.transition_b(b) for b in (b1, b2, b1 + b2))
        Q1, Q2, Q12 = (proc.gramian_b(b) for b in (b1, b2, b1 + b2))
        torch.testing.assert_close(E2 @ E1, E12, rtol=0, atol=64 * EPS)
        assert normalized((E2 @ Q1 @ E2.T + Q2).numpy(), Q12.numpy()) <= 64 * EPS
        Lt, S = proc.chol(b2), proc.cov(b2, jitter=True)
        assert normalized((Lt @ Lt.T).numpy(), S.numpy()) <= 16 * EPS
    far = torch.tensor(400.0, dtype=F64)
    torch.testing.assert_close(proc.a_cov(far), torch.eye(n, dtype=F64) * L_INV, rtol=0, atol=4 * EPS)
    assert proc.transition_b(far).abs().max() == 0
    # the drift itself: exact sqrt rationals, as mp_drift solves them from the characteristic polynomial
    with mpmath.workdps(40):
        np.testing.assert_allclose(proc.F.numpy(), to_np(mp_drift(n)[0]), rtol=2 * EPS, atol=0)


def test_float64_path_unchanged_up_to_f64_max_order():
    proc = HOLD(F64_MAX_ORDER)
    assert "E" not in proc._xparts and "E" in HOLD(F64_MAX_ORDER + 1)._xparts
    b = torch.tensor([1e-3, 0.2, 3.0], dtype=F64)
    low = HOLD(f64_factor_orders(True, 1e-9)[1])  # chol Q_A is float64 up to there (tests/test_hold_f64_accuracy.py)
    assert torch.equal(low.a_chol(b), chol_psd(low.a_cov(b)))


@pytest.mark.parametrize("n", (12, 16))
def test_sscs_samples_the_data_law(n):
    """hold_sampling.sample (SSCS, reference op through auto) with the exact score of N(0.5, 0.2^2): x matches the
    sampler's exact discrete law (the table driven by the affine exact score, within 5 standard errors), which is close
    to the data law."""
    m0, s0, steps = 0.5, 0.2, 40
    proc = HOLD(n, L=1 / L_INV, alpha=ALPHA)
    grid = time_grid(proc, steps)
    table = sampler_table(proc, grid, "sscs")
    times = grid.tolist() + [grid.tolist()[-1]]
    mu, P = np.zeros(n), np.eye(n) * L_INV
    for i in range(table.shape[0]):
        t = times[i]
        E = proc.transition(t).numpy()
        a = E[:, 0]
        V = proc.cov(t).numpy() + s0**2 * np.outer(a, a)  # marginal of z_t for x0 ~ N(m0, s0^2)
        Vi = np.linalg.inv(V)
        row, c = -Vi[-1], float((Vi @ a)[-1] * m0)  # s_n = row . z + c
        lnn = float(proc.score_scale(t))
        K, k, C = (table[i, :, :n].numpy(), table[i, :, n].numpy(), table[i, :, n + 1:].numpy())
        M = K - lnn * np.outer(k, row)  # eps_hat = -L_nn s_n
        mu, P = M @ mu - lnn * c * k, M @ P @ M.T + C @ C.T
    model = GaussianMixtureScore(proc, GaussianMixture([1.0], [[m0]], [s0]), elementwise=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # auto falls back to reference above MAX_ORDER
        x = sample(model, proc, (1, 2, 2001), num_steps=steps + 1, seed=torch.tensor([n])).double().reshape(-1)
    S, var = x.numel(), P[0, 0]
    assert abs(float(x.mean()) - mu[0]) <= 5 * math.sqrt(var / S), (float(x.mean()), mu[0])
    assert abs(float(x.var()) - var) <= 5 * var * math.sqrt(2 / S), (float(x.var()), var)
    assert abs(mu[0] - m0) + abs(math.sqrt(var) - s0) < 0.1, (mu[0], var)


def test_other_samplers_run_and_ode_flow_is_refused():
    n = 12
    proc = HOLD(n)
    grid = time_grid(proc, 6)
    for sampler in ("em", "ode", "ode_exp"):
        table = sampler_table(proc, grid, sampler)
        assert table.shape == (7, n, 2 * n + 1) and torch.isfinite(table).all()
    with pytest.raises(ValueError, match=r"proc: the 'ode_flow' flow map supports orders n <= 11 for hsm=True, "
                                         r"delta=1e-09 \(F64_MAX_ORDER = 11 .*got order n = 12"):
        sampler_table(proc, grid, "ode_flow")
    # below F64_MAX_ORDER too where float64's L_t is not trusted (DSM without jitter: n <= 4)
    dsm = HOLD(5, hsm=False, delta=0.0)
    with pytest.raises(ValueError, match="supports orders n <= 4 for hsm=False, delta=0 .*got order n = 5"):
        sampler_table(dsm, time_grid(dsm, 4), "ode_flow")
    ok = HOLD(4, hsm=False, delta=0.0)
    assert torch.isfinite(sampler_table(ok, time_grid(ok, 4), "ode_flow", denoise=False)).all()
    # ode_exp's rotation at a high order: a float64 matrix exponential of a skew matrix, checked against mpmath
    b = torch.tensor([0.3], dtype=F64)
    K, _ = exp_ode_rows(HOLD(16), b, torch.ones(1, dtype=F64))
    with mpmath.workdps(40):
        F, r = mp_drift(16)
        Sk = F.copy()
        Sk[15, 15] = 0  # S_k = F + xi E_nn
        R = to_np(mpmath.expm(-Sk * mpmath.mpf(0.3)))
    xi = HOLD(16).xi
    # K = R + xi psi e_n^T: its other columns are R's (float64 expm of a norm-~40 skew matrix: ~1e-14 absolute)
    assert xi > 0
    np.testing.assert_allclose(K[0].numpy()[:, :-1], R[:, :-1], rtol=0, atol=1e-13)


def test_perturb_reads_times_on_the_host():
    """HOLD.perturb at n = 13 (per-sample t, reference op): the moments of z_t are the mpmath marginal's; a negative
    time is refused by name (the float64 path would give NaN)."""
    n, mean0, s0, S = 13, 0.4, 0.3, 20011
    proc = HOLD(n, L=1 / L_INV, alpha=ALPHA, delta=0.0)
    g = torch.Generator().manual_seed(7)
    x0 = mean0 + s0 * torch.randn(1, 1, S, dtype=F64, generator=g)
    t = 0.4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        z, _ = proc.perturb(x0, torch.tensor([t], dtype=F64), seed=torch.tensor([3]))
    E, Sig = mp_law(n, t, dps=oracle_dps(n, t))
    a = to_np(E)[:, 0]
    moment_check(z.reshape(n, -1), a * mean0, to_np(Sig) + s0**2 * np.outer(a, a))
    with pytest.raises(ValueError, match="t: expected finite times >= 0, got -0.5"):
        proc.perturb_matrices(torch.tensor([0.1, -0.5], dtype=F64))


@pytest.mark.parametrize("backend", ("cpp", "triton", "cuda"))
def test_ops_run_any_order_on_reference(backend):
    n = 24
    g = torch.Generator().manual_seed(1)
    K, k = torch.randn(1, n, n, dtype=F64, generator=g), torch.randn(1, n, dtype=F64, generator=g)
    Cm = torch.randn(1, n, n, dtype=F64, generator=g).tril()
    table = transition_table(K, k, Cm)
    z, noise = torch.randn(2, n * 3, 4, dtype=F64, generator=g), torch.randn(2, n * 3, 4, dtype=F64, generator=g)
    eps = torch.randn(2, 3, 4, dtype=F64, generator=g)
    out = hold_transition(z, eps, table, 0, noise=noise, backend="reference")
    want = K[0] @ z.reshape(2, n, 12) + k[0][:, None] * eps.reshape(2, 1, 12) + Cm[0] @ noise.reshape(2, n, 12)
    torch.testing.assert_close(out.reshape(2, n, 12), want, rtol=1e-13, atol=1e-13)
    with pytest.raises(BackendUnavailable, match="MAX_ORDER = 8.*got order n = 24.*'reference' backend runs every"):
        hold_transition(z, eps, table, 0, backend=backend)
