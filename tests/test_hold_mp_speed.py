"""diffkern.hold_mp's cheaper evaluation, its thread-safe caches and its bound on small times without a jitter.

The sparse products (tridiagonal powers of N, the triangular support of C_m, the bands of N^k / k!, the symmetric
E Sigma_0 E^T) skip exact zeros and keep the dense products' order, so their Decimal values are the dense ones: checked
here against the dense forms written out, and end to end against digests of the float64 results that the code before
the change gave on a grid of (n, b, hsm, delta) (zeros compared without their sign). Correct rounding itself is tested
against mpmath in tests/test_hold_any_order.py."""
import decimal
import hashlib
import math
import sys
import threading

import numpy as np
import pytest
import torch

from diffkern import hold_mp
from diffkern.hold import HOLD
from diffkern.hold_mp import Law
from test_hold_any_order import ROUND_TOL, mp_factor_and_weights

F64 = torch.float64
D = decimal.Decimal
# (rate, L, alpha, delta, hsm)
CONFIGS = {"hsm": (None, 2.0, 0.08, 1e-9, True), "hsm0": (None, 2.0, 0.08, 0.0, True),
           "dsm0": (None, 2.0, 0.08, 0.0, False), "dsm": (None, 2.0, 0.08, 1e-9, False),
           "odd": (0.7, 3.0, 0.3, 1e-6, True)}
BS = (0.0, 1e-6, 1e-3, 0.0371, 0.5, 1.0, 2.75, 9.5, 60.0, 1e300)
# sha256 (first 24 hex digits) of E, Q, S, L, w_z, w_eps, QA, LA over BS, from hold_mp before the sparse products
DIGESTS = {
    (2, 'hsm'): '7c3721989b1d9051debd8ca3', (2, 'hsm0'): 'c9853f96b60d7a61f7cddeb7',
    (2, 'dsm0'): '781185fdea353e280f62b0e4', (2, 'dsm'): '914f767a6f11606fdb5d7c52',
    (2, 'odd'): '46fecc3002702235a4af3e7f', (3, 'hsm'): '5f9c31c86260bb806f8c9a89',
    (3, 'hsm0'): '360e832491b91c829e9be5c1', (3, 'dsm0'): '2f7db6ff18ba869c5a67a1f6',
    (3, 'dsm'): '9691d7af53fd5748b149ce57', (3, 'odd'): '641f79404a8fb851bef0670a',
    (5, 'hsm'): 'b182c110d89ccffe3831040b', (5, 'hsm0'): '51400540c647c5257ed491a3',
    (5, 'dsm0'): '4870db7d8ec5e991e7aad453', (5, 'dsm'): 'dace7ef0a5762725410e70e0',
    (5, 'odd'): 'f901b98d8afc9083a496976e', (8, 'hsm'): 'fba73e0d4897f8495f6c7e33',
    (8, 'hsm0'): '9deb583c7ff2a7321abb4208', (8, 'dsm0'): 'e4053f01e2073947df5b2d12',
    (8, 'dsm'): 'd3a5a5539f7fb4e7cac01df4', (8, 'odd'): '6d2c1108d56c9939e98dbd83',
    (11, 'hsm'): '6cfc7d63460eab78181333e1', (11, 'hsm0'): '02f97ed37428b5931d2fca78',
    (11, 'dsm0'): '2afd92432f56a1a4b23a10d7', (11, 'dsm'): 'b47e9af7427b86205979fc5f',
    (11, 'odd'): '27e751826764281c5be3d888', (12, 'hsm'): '31579d7bd4c10ba99e3cd642',
    (12, 'hsm0'): '0e9bca6904d8352b1f3f13dc', (12, 'dsm0'): 'd16371d2766d3a08b0510d3a',
    (12, 'dsm'): 'aeadf2835b7512ab7241a356', (12, 'odd'): 'd0ac3dcaf3b98c7566e7abdd',
    (13, 'hsm'): '7c32b8395b0b9505c8c091db', (13, 'hsm0'): 'a72e1d2427705d6b9b0da5f1',
    (13, 'dsm0'): '5300cde453dd832c92eb385b', (13, 'dsm'): '2b17a525d720135c0671e5ac',
    (13, 'odd'): 'a7f27ae5e6ee81249af632e7', (16, 'hsm'): '6b044b7c10c02eeb02c858de',
    (16, 'hsm0'): '647a71c00d93703bcd23710d', (16, 'dsm0'): '92b411533af5e5bd22100ba8',
    (16, 'dsm'): '68319040bba640ede46aee4d', (16, 'odd'): 'c38106eddb1e4211b1790039',
    (24, 'hsm'): '87acd9f0e7ac8fba89619d11', (24, 'hsm0'): '81780657b1162286429cab77',
    (24, 'dsm0'): 'f430d6fb2ae1dad0bb350b21', (24, 'dsm'): '3eaac0dd0e6723098c52b205',
    (24, 'odd'): '39a5bd73d07a13d650d4fc2e', (32, 'hsm'): '5a1d09b554c686009b4e9557',
    (32, 'hsm0'): '74e3938332be59ec2dbfb8e3', (32, 'dsm0'): '5db626e5aa78c3029a224837',
    (32, 'dsm'): '6c21ba9461a86fb05e0c6861', (32, 'odd'): '04dc2f3a742e5265eef01494',
}


def digest(law: Law) -> str:
    h = hashlib.sha256()
    for b in BS:
        t, a = law.get(b, "t"), law.get(b, "a")
        for k in ("E", "Q", "S", "L", "w_z", "w_eps"):
            h.update(np.ascontiguousarray(np.asarray(t[k], dtype=np.float64) + 0.0).tobytes())  # + 0.0: -0 -> 0
        for k in ("QA", "LA"):
            h.update(np.ascontiguousarray(np.asarray(a[k], dtype=np.float64) + 0.0).tobytes())
    return h.hexdigest()[:24]


@pytest.mark.parametrize("n", sorted({n for n, _ in DIGESTS}))
def test_float64_results_bitwise_unchanged(n):
    for name, args in CONFIGS.items():
        assert digest(Law(n, *args)) == DIGESTS[n, name], (n, name)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and all(x == y for x, y in zip(a.reshape(-1), b.reshape(-1)))


@pytest.mark.parametrize("n", (1, 2, 3, 7, 12, 17))
def test_sparse_products_are_the_dense_ones(n):
    """Decimal values (at 40 digits) of each sparse helper against the dense product it replaces."""
    with decimal.localcontext(decimal.Context(prec=40, Emin=-(10**8), Emax=10**8)):
        c = hold_mp._Consts(n, 0.9 if n > 7 else None, 1.7, 0.2, 0.0, True, 40)
        N = np.full((n, n), D(0), dtype=object)
        for j in range(1, n):
            N[j - 1, j], N[j, j - 1] = D(j) / 3, -D(j) / 3 - D(1) / 7
        for i in range(n):
            N[i, i] = D(2).sqrt() - i
        pw, dense = np.eye(n, dtype=int).astype(object) * D(1), []
        for k in range(n):
            dense.append(pw)
            pw = (pw @ N) / (k + 1)
        P = hold_mp._powers(N)
        assert _same(P, np.stack(dense))
        g = D(3).sqrt()
        vecs = P[:, :, n - 1] * g
        cm = np.full((2 * n - 1, n * n), D(0), dtype=object)
        for j in range(n):
            for k in range(n):
                cm[j + k] += np.outer(vecs[j], vecs[k]).reshape(-1)
        assert _same(hold_mp._gram_coefs(P, g).reshape(2 * n - 1, n * n), cm)
        w = np.array([D(1) / D(k + 3) for k in range(2 * n - 1)], dtype=object)
        assert _same(hold_mp._banded_sum(w, c.cm_sub, c.q_idx, n * n), w @ c.cm)
        assert _same(hold_mp._banded_sum(w[:n], c.P_sub, c.e_idx, n * n), w[:n] @ c.P)
        A = P.sum(0)[:, 1:] * D(-1.3)
        assert _same(hold_mp._sym_gram(A), A @ A.T)


def _hammer(work, threads: int) -> None:
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, inside the cache bookkeeping too
    try:
        ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for th in ts:
            th.start()
        for th in ts:
            th.join()
    finally:
        sys.setswitchinterval(old)


def test_cache_is_thread_safe(monkeypatch):
    """Threads sharing one Law with a cache of 2 times (every miss evicts): no error, each key's own value. Before the
    lock, a hit's move_to_end raced another thread's popitem (KeyError in 3 of 3 runs of the first part)."""
    monkeypatch.setattr(hold_mp, "_CACHE_SIZE", 2)
    monkeypatch.setattr(hold_mp, "_CONSTS_KEPT", 1)
    errors, bad = [], []
    # 1. the bookkeeping alone, hammered (a cheap stand-in for the computation, so that hits and evictions interleave)
    fast = Law(12, None, 2.0, 0.08, 0.0, True)
    monkeypatch.setattr(fast, "_one", lambda b, part: {"v": (b, part)})
    keys = (0.1, 0.2, 0.3)

    def hammer(seed):
        rng = np.random.default_rng(seed)
        try:
            for _ in range(20000):
                b = keys[rng.integers(3)]
                if fast.get(b, "t")["v"] != (b, "t"):
                    bad.append(b)
        except Exception as e:  # noqa: BLE001 -- any exception is the failure under test
            errors.append(repr(e))

    _hammer(hammer, 4)
    assert not errors and not bad, (errors[:3], bad[:3])
    # 2. the real computation (consts evicted too): the serial values
    n, bs = 12, (0.01, 0.2, 0.7, 1.5, 4.0)
    want = {(b, p): Law(n, None, 2.0, 0.08, 0.0, True)._one(b, p) for b in bs for p in ("t", "a")}
    law = Law(n, None, 2.0, 0.08, 0.0, True)

    def work(seed):
        rng = np.random.default_rng(seed)
        try:
            for _ in range(60):
                b, p = bs[rng.integers(len(bs))], ("t", "a")[rng.integers(2)]
                got = law.get(b, p)
                if not all(np.array_equal(got[k], v, equal_nan=True) for k, v in want[b, p].items()):
                    bad.append((b, p))
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    _hammer(work, 6)
    assert not errors and not bad, (errors[:3], bad[:3])
    assert len(law._cache) <= 2 and len(law._consts) <= 1


def test_cache_is_bounded_in_bytes(monkeypatch):
    """The time cache keeps at most _CACHE_BYTES // (48 n^2) entries (about six n x n float64 matrices each): at n = 32
    the 16384 of _CACHE_SIZE would be ~800 MB."""
    assert hold_mp._CACHE_BYTES // (48 * 32 * 32) < hold_mp._CACHE_SIZE <= hold_mp._CACHE_BYTES // (48 * 18 * 18)
    law = Law(12, None, 2.0, 0.08, 0.0, True)
    monkeypatch.setattr(law, "_one", lambda b, part: {"v": (b, part)})
    monkeypatch.setattr(hold_mp, "_CACHE_BYTES", 48 * 12 * 12 * 3)
    for i in range(10):
        assert law.get(0.1 * i, "t")["v"] == (0.1 * i, "t")
    assert list(law._cache) == [(0.1 * i, "t") for i in (7, 8, 9)]  # the three most recent


@pytest.mark.parametrize("n", (9, 12, 32))
def test_small_times_without_jitter_are_bounded(n):
    """HSM with delta = 0 needs (2n - 1) log10(1/b) extra digits: refused by name below Law.min_time (at most
    MAX_DIGITS digits), correctly rounded just above it (n <= 12, against mpmath); a jitter bounds the digits, so tiny
    times are fine with one."""
    law = Law(n, None, 2.0, 0.08, 0.0, True)
    b_min = law.min_time()
    assert hold_mp.digits(n) + hold_mp.extra_digits(n, b_min, 0.0, True) <= hold_mp.MAX_DIGITS
    assert hold_mp.digits(n) + hold_mp.extra_digits(n, b_min * 0.999, 0.0, True) > hold_mp.MAX_DIGITS
    with pytest.raises(ValueError, match=rf"t: expected an integrated time b >= {b_min:.3g} for order n = {n} with "
                                         r"hsm=True and delta=0, got b = 1e-300.*pass a jitter delta > 0"):
        law.get(1e-300, "t")
    assert law.get(0.0, "t")["L"][0, 0] == 0  # b = 0 is exact (the initial law), not refused
    assert np.isfinite(law.get(1e-300, "a")["LA"]).all()  # the A-part needs no extra digits
    for other in (Law(n, None, 2.0, 0.08, 1e-9, True), Law(n, None, 2.0, 0.08, 0.0, False)):
        assert other.min_time() == 0.0 and np.isfinite(other.get(1e-300, "t")["L"]).all()
    if n <= 12:  # through HOLD, t named; the bound itself against mpmath (~1000 digits)
        proc = HOLD(n, L=2.0, alpha=0.08, delta=0.0)
        with pytest.raises(ValueError, match="t: expected an integrated time b >= "):
            proc.chol(torch.tensor([0.5, 1e-300], dtype=F64))
        t = law.min_time() * 1.5
        E, Lr, Sr, _, _ = mp_factor_and_weights(n, t, hsm=True, delta=0.0)
        got = proc.chol(torch.tensor([t], dtype=F64))[0].numpy()
        assert (np.abs(got - Lr) <= ROUND_TOL * np.sqrt(np.diag(Sr))[:, None]).all()
        assert abs(got[-1, -1] - Lr[-1, -1]) <= 2 * ROUND_TOL * Lr[-1, -1]


def test_law_pickles_without_its_lock():
    import copy
    import pickle

    law = Law(12, None, 2.0, 0.08, 1e-9, True)
    want = law.get(0.3, "t")["L"]
    for q in (pickle.loads(pickle.dumps(law)), copy.deepcopy(law)):
        assert q._lock is not law._lock and np.array_equal(q.get(0.3, "t")["L"], want)
        assert math.isfinite(q.get(0.4, "a")["LA"][0, 0])
