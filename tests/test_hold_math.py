"""HOLD++ process algebra (``math-hold.md`` 10.1): float64, no randomness except test inputs."""
import math

import mpmath
import numpy as np
import pytest
import scipy.linalg
import torch

from diffkern.hold import HOLD, chol_psd, cld_to_hold_state, critical_damping, hold_to_cld_state

ORDERS = (1, 2, 3, 4, 5, 6)
F64 = torch.float64


def charpoly(F: np.ndarray) -> np.ndarray:
    """Coefficients of det(lambda I - F), highest first, by Faddeev-LeVerrier (traces only, no eigenvalues)."""
    n = F.shape[0]
    coefs = [1.0]
    M = np.zeros_like(F)
    for k in range(1, n + 1):
        M = F @ M + coefs[-1] * np.eye(n)
        coefs.append(-np.trace(F @ M) / k)
    return np.array(coefs)


def normalized_err(A: torch.Tensor, ref: torch.Tensor) -> float:
    d = torch.sqrt(torch.diagonal(ref, dim1=-2, dim2=-1).clamp(min=1e-300))
    return float(((A - ref).abs() / (d[..., :, None] * d[..., None, :])).max())


def van_loan(proc: HOLD, t: float, dps: int | None = None) -> torch.Tensor:
    """Q(t) = Phi_12 Phi_11^T of expm([[F, G G^T], [0, -F^T]] t) (float64 scipy, or mpmath at ``dps``)."""
    n = proc.order
    F, GG = proc.F.numpy(), (proc.G @ proc.G.T).numpy()
    M = np.block([[F, GG], [np.zeros((n, n)), -F.T]])
    if dps is None:
        Phi = scipy.linalg.expm(M * t)
        return torch.from_numpy(Phi[:n, n:] @ Phi[:n, :n].T)
    with mpmath.workdps(dps):
        Phi = mpmath.expm(mpmath.matrix(M.tolist()) * mpmath.mpf(t))
        Q = Phi[:n, n:] * Phi[:n, :n].T
        return torch.tensor([[float(Q[i, j]) for j in range(n)] for i in range(n)], dtype=F64)

#----------------------------------------------------------------------------
# 2.2: critical damping.


@pytest.mark.parametrize("n", ORDERS + (7, 8))
def test_characteristic_polynomial_is_a_single_root(n):
    p = HOLD(n)
    binom = np.array([math.comb(n, k) * p.r**k for k in range(n + 1)])  # (lambda + r)^n
    np.testing.assert_allclose(charpoly(p.F.numpy()), binom, rtol=1e-10, atol=1e-10 * binom.max())
    N = p.F + p.r * torch.eye(n, dtype=F64)
    assert float(torch.linalg.matrix_power(N, n).abs().max()) < 1e-9 * max(1.0, p.r**n)
    assert float(torch.linalg.matrix_power(N, n - 1).abs().max()) > 1e-3  # one Jordan block
    assert p.xi == pytest.approx(n * p.r, rel=1e-15)
    if n > 1:
        assert p.gammas[0] == pytest.approx(1.0, rel=1e-15)


def test_parameter_table():
    table = {2: (1.0, [1]), 3: (math.sqrt(3), [1, 8]), 4: (math.sqrt(5), [1, 4, 25]),
             5: (math.sqrt(7), [1, 16 / 5, 49 / 5, 56]), 6: (3.0, [1, 20 / 7, 243 / 35, 96 / 5, 105])}
    for n, (r, g2) in table.items():
        rr, xi, gammas = critical_damping(n)
        assert rr == pytest.approx(r, rel=1e-15) and xi == pytest.approx(n * r, rel=1e-15)
        np.testing.assert_allclose(np.square(gammas), g2, rtol=1e-13)
    assert critical_damping(1) == (1.0, 1.0, [])
    F3 = HOLD(3).F
    torch.testing.assert_close(F3, torch.tensor([[0, 1, 0], [-1, 0, 2 * 2**0.5], [0, -2 * 2**0.5, -3 * 3**0.5]],
                                                dtype=F64), rtol=0, atol=1e-14)  # TOLD++ (2.3)


#----------------------------------------------------------------------------
# 3.1: E(t).


@pytest.mark.parametrize("n", ORDERS + (7, 8))
def test_transition_matches_expm(n):
    p = HOLD(n)
    for t in (0.0, 1e-6, 0.01, 0.3, 1.0, 2.5, 5.0):
        ref = torch.from_numpy(scipy.linalg.expm(p.F.numpy() * t))
        torch.testing.assert_close(p.transition(t), ref, rtol=0, atol=1e-10)


def test_transition_is_batched_over_t_and_uses_integrated_beta():
    p = HOLD(3, beta=(0.5, 2.0), T=1.0)
    t = torch.tensor([[0.1, 0.5], [0.9, 1.0]], dtype=F64)
    E = p.transition(t)
    assert E.shape == (2, 2, 3, 3)
    b = 0.5 * 0.9 + 0.5 * 2.0 * 0.9**2
    torch.testing.assert_close(E[1, 0], torch.from_numpy(scipy.linalg.expm(p.F.numpy() * b)), rtol=0, atol=1e-12)
    torch.testing.assert_close(p.cov(t)[0, 1], p.cov(0.5), rtol=0, atol=1e-15)


#----------------------------------------------------------------------------
# 3.2: Lyapunov, semigroup, Q(t) three ways.


@pytest.mark.parametrize("n", ORDERS)
def test_lyapunov_stationary_covariance(n):
    p = HOLD(n, L=2.0)
    S, GG = p.stationary_cov(), p.G @ p.G.T
    torch.testing.assert_close(p.F @ S + S @ p.F.T + GG, torch.zeros(n, n, dtype=F64), rtol=0, atol=1e-13)
    FA = S @ p.F.T @ torch.linalg.inv(S)
    torch.testing.assert_close(FA @ S + S @ FA.T + GG, torch.zeros(n, n, dtype=F64), rtol=0, atol=1e-13)
    torch.testing.assert_close(p.cov(200.0), S, rtol=0, atol=1e-15)
    torch.testing.assert_close(p.a_cov(200.0), S, rtol=0, atol=1e-15)


@pytest.mark.parametrize("n", ORDERS)
def test_semigroup(n):
    p = HOLD(n, L=1.5, alpha=0.1)
    for s, t in ((0.01, 0.02), (0.3, 1.1), (2.0, 3.0)):
        Es, Et = p.transition(s), p.transition(t)
        torch.testing.assert_close(p.transition(s + t), Et @ Es, rtol=0, atol=1e-13)
        assert normalized_err(p.cov(s + t), Et @ p.cov(s) @ Et.T + p.gramian(t)) < 1e-11
        A2 = p.a_transition(t)
        assert normalized_err(p.a_cov(s + t), A2 @ p.a_cov(s) @ A2.T + p.a_cov(t)) < 1e-11
        torch.testing.assert_close(p.a_transition(s), p.transition(s).T, rtol=0, atol=0)


@pytest.mark.parametrize("n", ORDERS)
def test_gramian_against_van_loan_and_paper_form(n):
    p = HOLD(n, L=1.0)
    # float64 Van Loan (scipy expm) is trustworthy for 0.05 <= t r <= 2; below, it loses digits for
    # n >= 5 (1.6e-5 at n = 6, t r = 0.02) while the series does not (high-precision test below).
    for t in (0.05 / p.r, 0.5 / p.r, 2.0 / p.r):
        assert normalized_err(p.gramian(t), van_loan(p, t)) < 1e-11
    for t in (10.0 / p.r, 20.0):  # the paper form L^-1 (I - E E^T) is exact to rounding at large t r
        E = p.transition(t)
        paper = (torch.eye(n, dtype=F64) - E @ E.T) / p.L
        assert normalized_err(p.gramian(t), paper) < 1e-12
        assert normalized_err(p.a_cov(t), (torch.eye(n, dtype=F64) - E.T @ E) / p.L) < 1e-12


@pytest.mark.parametrize("n", ORDERS)
def test_gramian_against_high_precision(n):
    """The series in float64 against Van Loan in 45-digit arithmetic, including where float64 formulas fail."""
    p = HOLD(n, L=1.0)
    for t in (1e-5, 0.7, 3.0 / p.r, 12.0):  # 3 / r: worst case of the series, 2.1e-12 at n = 6
        assert normalized_err(p.gramian(t), van_loan(p, t, dps=45)) < 5e-12


def test_golden_values():
    """``math-hold.md`` 3.3: L^-1 = 1, alpha = 0.08, HSM, delta = 0 (mpmath, 10 significant digits)."""
    def close(a, b):
        torch.testing.assert_close(a, torch.tensor(b, dtype=F64), rtol=2e-9, atol=2e-10)

    p2 = HOLD(2, L=1.0, alpha=0.08, delta=0.0)
    close(p2.transition(1.0), [[0.7357588823, 0.3678794412], [-0.3678794412, 0]])
    close(p2.cov(1.0), [[0.3341504065, 0.2706705665], [0.2706705665, 0.8646647168]])
    close(p2.chol(1.0), [[0.5780574422, 0], [0.468241643, 0.8033769231]])
    p3 = HOLD(3, L=1.0, alpha=0.08, delta=0.0)
    close(p3.transition(0.5), [[0.8900426605, 0.392443827, 0.1487116364],
                               [-0.392443827, 0.4694226344, 0.3372704356],
                               [0.1487116364, -0.3372704356, -0.09760521673]])
    S = [[0.04578693907, 0.1336639386, 0.002765052939], [0.1336639386, 0.5386076028, 0.2343033556],
         [0.002765052939, 0.2343033556, 0.8644689742]]
    close(p3.cov(0.5), S)
    close(p3.chol(0.5), [[0.2139788286, 0, 0], [0.6246596429, 0.3852375024, 0],
                         [0.01292208654, 0.5872518855, 0.7207199295]])
    close(p3.transition(1.0), [[0.6602789309, 0.4833577246, 0.2502043694],
                               [-0.4833577246, -0.04740589436, 0.06704205874],
                               [0.2502043694, -0.06704205874, -0.0821094176]])
    close(p3.chol(1.0)[2, 2], 0.8484890165)
    close(p2.a_transition(0.05), [[0.9987908957, -0.04756147123], [0.04756147123, 0.9036679533]])
    close(chol_psd(p2.a_cov(0.05)), [[0.01243595876, 0], [-0.3637988174, 0.2208450976]])
    close(p3.a_transition(0.05), [[0.9987522384, -0.04982298173, 0.003242231352],
                                  [0.04982298173, 0.9895818233, -0.1240735447],
                                  [0.003242231352, 0.1240735447, 0.7627904689]])
    close(chol_psd(p3.a_cov(0.05)), [[0.001060556216, 0, 0], [-0.05150343446, 0.01409387468, 0],
                                     [0.4435266587, -0.3872035758, 0.236861643]])
    # 3.4: prior mismatch max|E(5)| (two significant digits)
    for n, v in zip(ORDERS, (6.7e-3, 4.0e-2, 1.1e-2, 7.7e-3, 7.2e-3, 8.8e-3)):
        assert float(HOLD(n).transition(5.0).abs().max()) == pytest.approx(v, abs=0.05 * 10 ** math.floor(math.log10(v)))


def test_n2_closed_form_covariance():
    p = HOLD(2, L=2.0, alpha=0.3, delta=0.0)
    ell, a = 1 / p.L, 0.3 / p.L
    for t in (1e-3, 0.4, 3.0):
        e = math.exp(-2 * t)
        ref = [[ell + e * ((a - ell) * t * t - ell * (1 + t) ** 2), e * (ell * t * (1 + t) + (a - ell) * t * (1 - t))],
               [0.0, ell + e * ((a - ell) * (1 - t) ** 2 - ell * t * t)]]
        ref[1][0] = ref[0][1]
        torch.testing.assert_close(p.cov(t), torch.tensor(ref, dtype=F64), rtol=1e-12, atol=1e-15)


#----------------------------------------------------------------------------
# Cholesky, score and x0 conventions (4.2, 4.4).


def test_chol_psd():
    A = torch.randn(5, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    S = A @ A.transpose(-1, -2) + 0.1 * torch.eye(4, dtype=F64)
    torch.testing.assert_close(chol_psd(S), torch.linalg.cholesky(S), rtol=1e-12, atol=1e-14)
    Lz = chol_psd(torch.diag(torch.tensor([0.0, 2.0, 0.0], dtype=F64)))
    assert torch.isfinite(Lz).all() and float(Lz[1, 1]) == pytest.approx(2**0.5)


@pytest.mark.parametrize("n", (1, 2, 3, 5))
def test_score_convention_and_x0_prediction(n):
    p = HOLD(n, L=2.0, alpha=0.08)
    g = torch.Generator().manual_seed(n)
    for t in (1e-3, 0.3, 2.0):
        x0 = torch.randn(3, 4, dtype=F64, generator=g)
        eps = torch.randn(3, n, 4, dtype=F64, generator=g)
        Lt, E = p.chol(t), p.transition(t)
        z = E[:, :1] * x0[:, None] + torch.einsum("ij,bjp->bip", Lt, eps)  # (3, n, 4)
        S = Lt @ Lt.T  # the jittered Sigma_t the network was trained against
        score = -torch.einsum("ij,bjp->bip", torch.linalg.inv(S), z - E[:, :1] * x0[:, None])
        torch.testing.assert_close(p.eps_to_score(eps[:, -1], t), score[:, -1], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(p.score_to_eps(score[:, -1], t), eps[:, -1], rtol=1e-9, atol=1e-9)
        x0_hat = p.predict_x0(z.reshape(3, n * 4), eps[:, -1], t)
        torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-9)


#----------------------------------------------------------------------------
# 2.3: CLD in its own coordinates.


def test_cld_mapping():
    m_inv, gamma, beta = 4.0, 0.04, 4.0
    p = HOLD.from_cld(m_inv, gamma, beta)
    M, Gam = 1 / m_inv, 2 / math.sqrt(m_inv)
    g = 1 / Gam
    D = torch.diag(torch.tensor([1.0, math.sqrt(M)], dtype=F64))  # z_cld = D z_hold
    S_inf = torch.diag(torch.tensor([1.0, M], dtype=F64))
    F_cld = beta * torch.tensor([[0.0, m_inv], [-1.0, -Gam * m_inv]], dtype=F64)  # dz = F_cld z dt (beta const)
    for t in (1e-3, 0.1, 0.7):
        B = beta * t
        e = math.exp(-2 * g * B)
        E_cld = torch.tensor([[e * (1 + 2 * g * B), e * 4 * g * g * B], [-e * B, e * (1 - 2 * g * B)]], dtype=F64)
        torch.testing.assert_close(D @ p.transition(t) @ torch.linalg.inv(D), E_cld, rtol=1e-13, atol=1e-14)
        S0 = torch.diag(torch.tensor([0.0, gamma * M], dtype=F64))
        var_cld = S_inf + E_cld @ (S0 - S_inf) @ E_cld.T
        torch.testing.assert_close(D @ p.cov(t) @ D, var_cld, rtol=1e-10, atol=1e-12)
        FA = S_inf @ F_cld.T @ torch.linalg.inv(S_inf)  # SSCS analytic part in CLD coordinates
        A_cld = torch.from_numpy(scipy.linalg.expm(FA.numpy() * t))
        b = p.int_beta(t)
        torch.testing.assert_close(D @ p.a_transition(b) @ torch.linalg.inv(D), A_cld, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(D @ p.a_cov(b) @ D, S_inf - A_cld @ S_inf @ A_cld.T, rtol=1e-9, atol=1e-12)
    z = torch.randn(2, 6, 3, dtype=F64)
    torch.testing.assert_close(hold_to_cld_state(cld_to_hold_state(z, m_inv), m_inv), z)
    torch.testing.assert_close(cld_to_hold_state(z, m_inv)[:, 3:], z[:, 3:] * 2.0)


#----------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("kwargs, match", [
    ({"order": 0}, "order"), ({"order": -2}, "order"), ({"order": 2.0}, "order"), ({"order": True}, "order"),
    ({"L": -1.0}, "L"), ({"L": 0.0}, "L"), ({"L": float("nan")}, "L"), ({"alpha": -0.1}, "alpha"),
    ({"alpha": float("inf")}, "alpha"), ({"T": float("inf")}, "T"), ({"delta": -1e-9}, "delta"),
    ({"beta": -1.0}, "beta"), ({"beta": (1.0, 2.0, 3.0)}, "beta"), ({"beta": "1"}, "beta"), ({"beta": (0.0, 0.0)}, "beta"), ({"beta": (1.0, float("nan"))}, "beta"),
    ({"rate": 0.0}, "rate"), ({"rate": float("nan")}, "rate"),
])
def test_bad_hyperparameters(kwargs, match):
    kw = {"order": 3, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        HOLD(kw.pop("order"), **kw)


def test_bad_cld_mass():
    with pytest.raises(ValueError, match="m_inv"):
        HOLD.from_cld(m_inv=0.0)
