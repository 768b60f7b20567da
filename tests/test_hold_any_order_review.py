"""Review of HOLD above F64_MAX_ORDER (diffkern.hold_mp): the edges of the time domain (t = 0, an integrated time
that overflows to inf, times with autograd history), non-default parameters against an mpmath oracle of the paper
form (a different formulation and library), the boundary with the float64 path at n = 11, copies and threads."""
import copy
import math
import pickle
import threading

import mpmath
import numpy as np
import pytest
import torch

from diffkern.hold import HOLD
from diffkern.hold_mp import Law
from test_hold_math_review import mp_drift, normalized, to_np

F64 = torch.float64
EPS = float(np.finfo(np.float64).eps)
ROUND_TOL = 4 * EPS  # as tests/test_hold_any_order.py: correctly rounded vs a float64 rounding of the oracle
F64_LAW_TOL = 1e-13  # the float64 path's documented normalized accuracy of E, Sigma and L L^T (n <= 20)


def oracle(n: int, b: float, proc: HOLD):
    """(E, Sigma + delta I, Q_A) of ``proc`` at integrated time b in mpmath: expm of the drift solved from (l + r)^n,
    scaled to proc's rate, and Sigma_inf + E (Sigma_0 - Sigma_inf) E^T at enough digits for its cancellation."""
    dps = 40 + 3 * n + int((2 * n - 1) * max(0.0, -math.log10(b)))
    with mpmath.workdps(dps):
        F, r0 = mp_drift(n)
        F = F * (mpmath.mpf(proc.r) / r0) if proc.r != math.sqrt(2 * n - 3) else F
        E = mpmath.expm(F * mpmath.mpf(b))
        s_inf = 1 / mpmath.mpf(proc.L)
        s0 = mpmath.mpf(proc.alpha) * s_inf if proc.hsm else 0
        S = (mpmath.eye(n) * s_inf + E * (mpmath.diag([0] + [s0] * (n - 1)) - mpmath.eye(n) * s_inf) * E.T
             + mpmath.eye(n) * mpmath.mpf(proc.delta))
        QA = (mpmath.eye(n) - E.T * E) * s_inf
        return to_np(E), to_np(S), to_np(mpmath.cholesky(S)), to_np(mpmath.cholesky(QA)), to_np(QA)


@pytest.mark.parametrize("kw", [dict(delta=1e-9), dict(delta=0.0), dict(hsm=False, delta=0.0)])
def test_time_zero_is_the_initial_law(kw):
    """t = 0 (a number, a tensor, -0.0) was decimal.InvalidOperation (0 ** 0): E = I, Q = 0, L_0 = (Sigma_0 +
    delta I)^{1/2}, as the float64 path gives at n = 11; x0 weights are non-finite there, a number t = 0 refused."""
    n = 12
    proc = HOLD(n, **kw)
    d = torch.full((n,), proc.alpha / proc.L if proc.hsm else 0.0, dtype=F64)
    d[0] = 0.0
    for t in (0.0, torch.tensor(0.0, dtype=F64), torch.tensor([-0.0, 0.0], dtype=torch.float32)):
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else ()
        eye = torch.eye(n, dtype=F64).expand(*shape, n, n)
        assert torch.equal(proc.transition(t), eye) and torch.equal(proc.gramian(t), 0 * eye)
        torch.testing.assert_close(proc.chol(t), torch.diag((d + proc.delta).sqrt()).expand(*shape, n, n),
                                   rtol=ROUND_TOL, atol=0)
        assert torch.equal(proc.a_chol(t), 0 * eye)
    w_z, w_e = proc.x0_coefficients(torch.zeros(2, dtype=F64))
    assert not torch.isfinite(w_e).any() and not torch.isfinite(w_z).any()
    with pytest.raises(ValueError, match="t: x0 prediction from eps_hat needs t > 0"):
        proc.x0_coefficients(0.0)
    # the extended path forced at n = 11 gives the float64 path's values bitwise there
    f = HOLD(11, **kw)
    lw = Law(11, None, f.L, f.alpha, f.delta, f.hsm)
    z = torch.zeros(1, dtype=F64)
    assert torch.equal(lw.batch(z, "L"), f.chol(z)) and torch.equal(lw.batch(z, "E"), f.transition(z))


def test_perturb_with_a_zero_time():
    n = 12
    proc = HOLD(n, delta=0.0)  # no jitter: x_0 carries no noise
    x0 = torch.randn(3, 2, 5, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(3, 2 * n, 5, dtype=torch.float32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.0, 0.3, 2.0])
    z, eps = proc.perturb(x0, t, noise=noise, backend="reference")
    mm, lt = proc.perturb_matrices(t)
    want = mm @ x0.double().reshape(3, 1, 10) + lt @ noise.double().reshape(3, n, 10)
    # float32 state: |z| <= sum of |terms|; the op rounds once per product, so a few float32 eps of that sum
    bound = (mm.abs() @ x0.double().abs().reshape(3, 1, 10) + lt.abs() @ noise.double().abs().reshape(3, n, 10))
    assert ((z.double().reshape(3, n, 10) - want).abs() <= 4 * n * torch.finfo(torch.float32).eps * bound).all()
    assert torch.equal(z.reshape(3, n, 10)[0, 0], x0.reshape(3, 10)[0])  # t = 0: x is the data exactly
    assert torch.equal(eps, noise[:, (n - 1) * 2:])


def test_overflowing_integrated_time_is_the_stationary_law():
    """A finite t whose b = beta0 t + beta1 t^2 / 2 overflows (and a tensor t = inf) gave "expected finite times ...
    got inf"; the float64 path returns the stationary law there, and so does the extended path now."""
    n = 12
    proc = HOLD(n, beta=(0.1, 2.0), delta=1e-6)
    for t in (1e200, torch.tensor([math.inf, 1e200], dtype=F64)):
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else ()
        assert proc.transition(t).abs().max() == 0
        s = 1 / proc.L + proc.delta
        torch.testing.assert_close(proc.cov(t, jitter=True), s * torch.eye(n, dtype=F64).expand(*shape, n, n),
                                   rtol=0, atol=ROUND_TOL * s)
        torch.testing.assert_close(proc.chol(t), math.sqrt(s) * torch.eye(n, dtype=F64).expand(*shape, n, n),
                                   rtol=0, atol=ROUND_TOL * math.sqrt(s))
    for bad in (torch.tensor([0.2, math.nan], dtype=F64), torch.tensor([-1.0], dtype=F64)):
        with pytest.raises(ValueError, match="t: expected finite times >= 0, got"):
            proc.chol(bad)


def test_times_with_autograd_history_are_refused():
    """The float64 path is differentiable in t; the extended one returns host constants, which would drop the gradient
    silently: refused by name, accepted detached or under no_grad."""
    proc = HOLD(12)
    t = torch.tensor([0.3], dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match="t: expected times without autograd history .* pass t.detach"):
        proc.transition(t)
    with torch.no_grad():
        a = proc.chol(t)
    assert torch.equal(a, proc.chol(t.detach()))


@pytest.mark.parametrize("n,kw,ts", [
    (12, dict(rate=0.7, L=3.0, alpha=0.3, delta=0.0, beta=(0.1, 2.0), T=2.0), (1e-4, 0.9)),
    (13, dict(rate=2.5, L=0.5, alpha=0.0, delta=1e-6, beta=3.0), (1e-3, 4.0)),
    (12, dict(L=1.0, alpha=1.0, delta=0.0, hsm=False), (1e-3, 0.3)),
])
def test_non_default_parameters_against_mpmath(n, kw, ts):
    """rate, L, alpha, delta (0 too), a beta pair, T, DSM: E, Sigma, L_t, chol Q_A correctly rounded; a second process
    differing only in L, evaluated first at the same b, does not leak into the first's results (per-process cache)."""
    proc = HOLD(n, **kw)
    other = HOLD(n, **{**kw, "L": 2 * proc.L})
    for t in ts:
        b = proc.int_beta(t)
        other.chol(t), other.a_chol(b)
        E, S, Lr, LAr, QA = oracle(n, b, proc)
        assert (np.abs(proc.chol(t).numpy() - Lr) <= ROUND_TOL * np.sqrt(np.diag(S))[:, None]).all(), t
        assert (np.abs(proc.a_chol(b).numpy() - LAr) <= ROUND_TOL * np.sqrt(np.diag(QA))[:, None]).all(), t
        assert normalized(proc.cov(t, jitter=True).numpy(), S) <= ROUND_TOL
        np.testing.assert_allclose(proc.transition(t).numpy(), E, rtol=0, atol=ROUND_TOL)


def test_boundary_with_the_float64_path():
    """The extended path forced at n = 11 against the float64 path there: E, Sigma and L L^T agree within the float64
    path's documented accuracy (1e-13 normalized); entries of L itself need not (float64's factor is backward stable
    only), so they are compared through L L^T."""
    n = 11
    b = torch.tensor([1e-4, 0.05, 0.5, 2.0, 30.0], dtype=F64)
    for kw in (dict(), dict(delta=0.0), dict(rate=0.9, L=1.0, alpha=0.3)):
        f = HOLD(n, **kw)
        lw = Law(n, kw.get("rate"), f.L, f.alpha, f.delta, f.hsm)
        S = lw.batch(b, "S").numpy()
        Lf = f.chol(b)
        for i in range(b.numel()):
            assert normalized((Lf[i] @ Lf[i].T).numpy(), S[i]) <= F64_LAW_TOL
            assert normalized(f.cov(b[i], jitter=True).numpy(), S[i]) <= F64_LAW_TOL
        assert (f.transition_b(b) - lw.batch(b, "E")).abs().max() <= F64_LAW_TOL


def test_copies_and_threads():
    """pickle / deepcopy keep the values and the cache; threads sharing one process get the serial results (each
    computation runs in its own copy of the decimal context)."""
    proc = HOLD(12, delta=1e-6)
    want = {t: proc.chol(t) for t in (0.05, 0.1, 0.2, 0.4)}
    for q in (pickle.loads(pickle.dumps(proc)), copy.deepcopy(proc)):
        assert len(q._xp._cache) == len(want)
        assert all(torch.equal(q.chol(t), v) for t, v in want.items())
    fresh, bad = HOLD(12, delta=1e-6), []

    def work(t):
        for _ in range(2):
            if not torch.equal(fresh.chol(t), want[t]):
                bad.append(t)

    threads = [threading.Thread(target=work, args=(t,)) for t in want]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not bad


@pytest.mark.parametrize("n", (3, 6, 12))  # float64, chol Q_A routed to the extended path, every law extended
def test_a_chol_bad_input_names_b(n):
    proc = HOLD(n)
    with pytest.raises(ValueError, match="b: expected a finite time >= 0, got -1.0"):
        proc.a_chol(-1.0)
    with pytest.raises(TypeError, match="b: expected a real number or a tensor, got str"):
        proc.a_chol("x")
