"""HOLD's extended path at small integrated times without a jitter, the routing of its refusals, and old pickles.

Under HSM with delta = 0, chol(Sigma_t) needs (2n - 1) log10(1/b) extra digits and is refused below
``Law.min_time()``; E and Q alone need only the base digits (no Hilbert-like factor), so ``transition_b``/``gramian_b``
(and cov) work at any b >= 0. Oracles: the mpmath paper form of tests/test_hold_math_review.py (``mp_law``: expm,
Sigma_inf + E(Sigma_0 - Sigma_inf)E^T with Sigma_0 = 0, i.e. Q) at the digits its cancellation needs, and below 1e-100
the leading terms E_pq = b^k (N^k)_pq / k! (|p - q| = k) and
Q_pq = b^(m+1)/(m+1) sum_{j+k=m} (N^j g)_p (N^k g)_q / (j! k!) (m = 2n - 2 - p - q) from mpmath's drift (relative
corrections O(b), far below rounding).
"""
import copy
import math
import pickle

import mpmath
import numpy as np
import pytest
import torch

from diffkern import hold_mp
from diffkern.hold import HOLD, chol_psd
from diffkern.hold_mp import Law
from test_hold_any_order import EPS, oracle_dps
from test_hold_math_review import ALPHA, L_INV, mp_drift, mp_law, to_np

F64 = torch.float64
TINY = 2.0 ** -1074  # the smallest subnormal: the oracle's rounding and ours may differ by it where entries underflow


def assert_rounded(got: np.ndarray, ref: np.ndarray):
    """Correctly rounded entrywise: within 1 ulp of the oracle's float64 rounding (2 eps relative), or one subnormal."""
    bad = np.abs(got - ref) > 2 * EPS * np.abs(ref) + TINY
    assert not bad.any(), (np.argwhere(bad)[:3], got[bad][:3], ref[bad][:3])


def mp_leading(n: int, b: float):
    """(E, Q) at tiny b from their leading terms in b (mpmath, 60 digits), rounded to float64."""
    with mpmath.workdps(60):
        F, r = mp_drift(n)
        N = F + r * mpmath.eye(n)
        b = mpmath.mpf(b)
        pw = [mpmath.eye(n)]
        for k in range(1, n):
            pw.append(pw[-1] * N / k)  # N^k / k!
        E = mpmath.matrix(n, n)
        for p in range(n):
            for q in range(n):
                k = abs(p - q)
                E[p, q] = b ** k * pw[k][p, q]
        g = mpmath.sqrt(2 * n * r * mpmath.mpf(L_INV))  # sqrt(2 xi / L)
        vec = [[pw[j][p, n - 1] * g for p in range(n)] for j in range(n)]  # N^j g e_n / j!
        Q = mpmath.matrix(n, n)
        for p in range(n):
            for q in range(n):
                m = 2 * n - 2 - p - q
                Q[p, q] = b ** (m + 1) / (m + 1) * sum(vec[j][p] * vec[m - j][q] for j in range(m + 1)
                                                       if j < n and m - j < n)
        return to_np(E), to_np(Q)


def proc_of(n: int, **kw) -> HOLD:
    return HOLD(n, L=1 / L_INV, alpha=ALPHA, delta=0.0, **kw)


@pytest.mark.parametrize("n,b", [(12, 1e-45), (12, 1e-80), (16, 1e-40)])
def test_e_and_q_below_min_time_against_mpmath(n, b):
    """Below min_time (1.4e-41 at n = 12, 1e-30 at n = 16) E and Q are the correctly rounded exact ones, through
    transition_b/gramian_b and through t (beta = 1: t = b); the factor stays refused, naming t."""
    proc = proc_of(n)
    assert b < proc._ext_law().min_time()
    E_ref, Q_ref = (to_np(M) for M in mp_law(n, b, hsm=False, dps=oracle_dps(n, b)))
    for E, Q in ((proc.transition_b(b), proc.gramian_b(b)), (proc.transition(b), proc.gramian(b))):
        assert_rounded(E.numpy(), E_ref)
        assert_rounded(Q.numpy(), Q_ref)
    S = proc.cov(torch.tensor([b, 0.5], dtype=F64))[0]  # E Sigma_0 E^T + Q in float64, as at any order
    assert torch.equal(S, proc.transition_b(b) @ proc.cov0() @ proc.transition_b(b).T + proc.gramian_b(b))
    with pytest.raises(ValueError, match=r"^t: expected an integrated time b >= .* got b = 1e-"):
        proc.chol(b)


@pytest.mark.parametrize("n", (12, 20))
@pytest.mark.parametrize("b", (1e-150, 1e-300))
def test_e_and_q_at_tiny_b_are_their_leading_terms(n, b):
    proc = proc_of(n)
    E_ref, Q_ref = mp_leading(n, b)
    got = proc.transition_b(torch.tensor([b, b], dtype=F64)), proc.gramian_b(torch.tensor([[b]], dtype=F64))
    assert_rounded(got[0][1].numpy(), E_ref)
    assert_rounded(got[1][0, 0].numpy(), Q_ref)
    assert got[1][0, 0, -1, -1] > 0  # Q_nn = b 2 xi / L: not underflowed


def test_e_and_q_unchanged_where_the_factor_is_computed():
    """Between min_time and 1 E and Q now come from the base digits (part "e") instead of the factor's (part "t"): the
    same float64 values, bitwise (both are correctly rounded). With a jitter or at b >= 1 they still come with the
    factor (one cache entry)."""
    law = Law(12, None, 1 / L_INV, ALPHA, 0.0, True)
    for b in np.geomspace(law.min_time() * 1.01, 0.9, 9):
        full, alone = law.get(b, "t"), law.get(b, "e")
        assert set(alone) == {"E", "Q"}
        assert np.array_equal(full["E"], alone["E"]) and np.array_equal(full["Q"], alone["Q"]), b
    law.batch(torch.tensor([0.3, 2.0], dtype=F64), "E")
    assert (0.3, "e") in law._cache and (2.0, "t") in law._cache and (0.3, "t") not in law._cache
    jit = Law(12, None, 1 / L_INV, ALPHA, 1e-9, True)
    jit.batch(torch.tensor([0.3], dtype=F64), "Q")
    assert list(jit._cache) == [(0.3, "t")]


def test_refusal_names_the_argument_passed_down():
    """The small-time refusal names the argument the caller passes (no renaming of a message afterwards)."""
    law = Law(12, None, 2.0, 0.08, 0.0, True)
    for arg in ("t", "b", "sigma"):
        with pytest.raises(ValueError, match=rf"^{arg}: expected an integrated time b >= "):
            law.batch(torch.tensor([0.5, 1e-300], dtype=F64), "L", arg)
        with pytest.raises(ValueError, match=rf"^{arg}: expected an integrated time b >= "):
            law.get(1e-300, "t", arg)
    with pytest.raises(ValueError, match=r"^t: expected an integrated time b >= "):
        law.get(1e-300, "t")
    assert np.isfinite(law.get(1e-300, "e")["Q"]).all() and np.isfinite(law.get(1e-300, "a")["LA"]).all()


@pytest.mark.parametrize("n", (3, 6, 11, 12))
def test_one_routing_function_names_b_or_t(n):
    """b-taking methods name b, t-taking ones t, whichever path computes the part (n = 6, 11: chol Q_A extended; n = 12:
    every law); the float64 parts are the closed forms' values, bitwise."""
    proc = HOLD(n)
    neg = torch.tensor([-1.0], dtype=F64)
    for method in (proc.transition_b, proc.gramian_b, proc.a_cov, proc.a_chol):
        part = {proc.transition_b: "E", proc.gramian_b: "Q", proc.a_cov: "QA", proc.a_chol: "LA"}[method]
        if part in proc._xparts:
            with pytest.raises(ValueError, match=r"^b: expected finite times >= 0"):
                method(neg)
    if "E" in proc._xparts:
        for method in (proc.transition, proc.gramian, proc.cov):
            with pytest.raises(ValueError, match=r"^t: expected finite times >= 0"):
                method(neg)
    b = torch.tensor([0.0, 1e-3, 0.4, 3.0, 200.0], dtype=F64)
    if n <= 11:
        assert torch.equal(proc.transition_b(b), proc._law(b, None)[0])
        assert torch.equal(proc.gramian_b(b), proc._law(b, "_cm")[1])
        assert torch.equal(proc.a_cov(b), proc._law(b, "_cm_a", transpose=True)[1])
        if "LA" not in proc._xparts:
            assert torch.equal(proc.a_chol(b), chol_psd(proc._law(b, "_cm_a", transpose=True)[1]))
    assert torch.equal(proc.transition(b), proc.transition_b(b))  # beta = 1: t = b
    assert torch.equal(proc.gramian(b), proc.gramian_b(b))


def _old_pickle(proc: HOLD) -> HOLD:
    """``proc`` as pickled before ``_rate_arg`` existed (cda18e0): its state without it."""
    state = dict(proc.__dict__)
    del state["_rate_arg"]
    old = copy.copy(proc)
    old.__dict__ = state
    return pickle.loads(pickle.dumps(old))


@pytest.mark.parametrize("n,rate,want", [(3, None, None), (5, 2.5, 2.5), (5, math.sqrt(7), None), (6, 2.5, 2.5),
                                         (9, 2.0, 2.0), (12, 3.0, 3.0), (12, None, None)])
def test_unpickling_state_without_rate_arg(n, rate, want):
    """The rate the lazily built Law gets: the built Law's own (n >= 6: built at construction for chol Q_A), else
    (n <= 5: no Law yet) None where r is
    the default's float (r = sqrt(2n - 3) exactly, indistinguishable from rate=None), else r. The x0 weights at far
    times (which build the Law at n <= 11) then equal a fresh object's, bitwise."""
    proc = proc_of(n, rate=rate) if n != 9 else HOLD(n, rate=rate)
    old = _old_pickle(proc)
    assert "_rate_arg" in old.__dict__ and old._rate_arg == want
    fresh = HOLD(n, L=proc.L, alpha=proc.alpha, delta=proc.delta, rate=want)
    t = torch.tensor([12.0 / proc.r, 30.0 / proc.r], dtype=F64)  # r b = 12, 30: routed to the extended path
    got, ref = old.x0_coefficients(t), fresh.x0_coefficients(t)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert hold_mp.Law is type(old._xp)
