"""Extended-precision host maths of :class:`diffkern.hold.HOLD` for orders above F64_MAX_ORDER.

Above n = 11 float64 cannot carry HOLD's Cholesky factors: at small times the correlation matrices of Sigma_t and Q_A
are Hilbert-like (condition number ~ 34^n), so every float64 route to L_t = chol(Sigma_t + delta I) or chol Q_A loses
all digits of the small pivots, and the series of E and Q cancel among terms that grow like |N|^k / k!. Here the same
closed forms (``math-hold.md`` 3.2: E = e^{-r b} sum_k b^k N^k / k!, Q = sum_m C_m m!/(2r)^{m+1} P(m+1, 2 r b)) and
the Cholesky factors are evaluated in decimal floating point at ``digits(n)`` significant digits (the standard library's
C ``decimal``: floating exponents, so b^(2n-1) never underflows) and rounded to float64 once, at the end.

Times are read on the host (a device tensor is copied to the CPU: one sync) and each distinct integrated time b is
computed once per HOLD object (its Law) and kept in a bounded, thread-safe cache (a sampler's table and its exact-score
model share their times when they share the HOLD).
Cost: O(n^3) decimal operations per distinct b, O(n^4) per working precision for the constants (CPU time on one core,
with the default jitter: part "t" ~1.8 / 3.7 / 14 / 38 ms per b, the A-part ~0.8 / 1.8 / 7 / 18 ms, the constants
5 / 13 / 57 / 170 ms at n = 12 / 16 / 24 / 32). The products skip the exact zeros of their banded and triangular
factors and keep the dense products' order, so every Decimal value is the dense evaluation's. Without a jitter under
HSM small b need (2n - 1) log10(1/b) more digits for the factors (each new precision rebuilds the constants): b below
``Law.min_time()`` (MAX_DIGITS working digits) is refused for them; E and Q alone take the base digits at every b.
"""
from __future__ import annotations

import decimal
import math
import threading
from collections import OrderedDict

import numpy as np
import torch

_CACHE_SIZE = 1 << 14  # distinct b kept per Law (a 1000-step table needs ~2000)
# ... and at most this many bytes of them: an entry holds about six n x n float64 matrices (49 KB at n = 32, where
# 16384 entries were ~800 MB); 256 MB keeps 5461 entries at n = 32, every one (16384) up to n = 18
_CACHE_BYTES = 1 << 28
_CONSTS_KEPT = 32  # precisions whose constants a Law keeps (16-50 MB each at n = 32): a 100-step table without
# a jitter at n = 32 visits 20, twice over (4 kept rebuilt 11 of them, +20% time); was unbounded (up to 91 levels)
# Working digits at most: without a jitter under HSM the digits grow like (2n - 1) log10(1/b), and the cost of a new
# precision like n^4 digits^1.6 (measured, one core, constants and one b: 1.8 s at n = 24 and 5 s at n = 32 with 800
# extra digits, 17 s at n = 32 with 1600; at this bound 0.2 / 0.55 / 2.4 / 6.5 s at n = 12 / 16 / 24 / 32, reached
# at b = 1.4e-41 / 1e-30 / 2.7e-20 / 5.2e-15; n = 32 at b = 1e-300 needs 19000 digits, ~20 min extrapolated).
MAX_DIGITS = 1000
_B_INF = 1e300  # b = inf is computed here: e^{-r b} underflows to 0, P(m+1, 2 r b) = 1 (exact to rounding)


def digits(n: int) -> int:
    """Base working precision (significant decimal digits) for order n. Measured need (float64 results exact to
    rounding, against 8n + 20 digits): ~1.4 n + 18 (the series cancel among |N^k| / k! terms and the factors of Q, Q_A
    are Hilbert-like); this leaves ~n / 2 + 12 digits of margin."""
    return 2 * n + 30


def extra_digits(n: int, b: float, delta: float, hsm: bool) -> int:
    """Digits added for L_t = chol(Sigma_t + delta I) at integrated time b: under HSM without jitter Sigma_t's smallest
    eigenvalue falls like b^(2n-1) (``math-hold.md`` 3.3), so its factor needs (2n - 1) log10(1/b) more digits, at most
    log10(1/delta) with a jitter delta > 0 (which bounds the conditioning). Rounded up to tens (constants per level)."""
    if not hsm or b >= 1:
        return 0
    need = (2 * n - 1) * (-math.log10(b)) if b > 0 else math.inf
    if delta > 0:
        need = min(need, -math.log10(delta) if delta < 1 else 0.0)
    return 0 if need == math.inf and delta > 0 else (10 * math.ceil(need / 10) if math.isfinite(need) else 0)


class _Consts:
    """The process constants at one precision: N^k / k! (flattened rows), C_m of Q and of Q_A, m!/(2r)^{m+1}."""

    def __init__(self, n: int, rate, L: float, alpha: float, delta: float, hsm: bool, prec: int):
        self.ctx = decimal.Context(prec=prec, Emin=-(10**8), Emax=10**8)
        with decimal.localcontext(self.ctx):
            D = decimal.Decimal
            r = (D(2 * n - 3).sqrt() if n > 1 else D(1)) if rate is None else D(float(rate))
            self.r, self.L, self.delta = r, D(float(L)), D(float(delta))
            self.s0 = D(float(alpha)) / self.L if hsm else D(0)  # Sigma_0 = diag(0, s0, ..., s0)
            xi = n * r
            N = np.full((n, n), D(0), dtype=object)
            for j in range(1, n):  # gamma_j^2 = r^2 j (2n - j) / ((2n - 2j - 1)(2n - 2j + 1))
                g = r * (D(j * (2 * n - j)) / D((2 * n - 2 * j - 1) * (2 * n - 2 * j + 1))).sqrt()
                N[j - 1, j], N[j, j - 1] = g, -g
            for i in range(n):
                N[i, i] = r
            N[n - 1, n - 1] = r - xi  # N = F + r I, F[n, n] = -xi
            P = _powers(N)
            self.P = P.reshape(n, n * n)  # row k: N^k / k!, flattened
            g = (2 * xi / self.L).sqrt()
            self.cm = _gram_coefs(P, g).reshape(2 * n - 1, n * n)
            self.cm_a = _gram_coefs(P.transpose(0, 2, 1), g).reshape(2 * n - 1, n * n)
            # the supports, as index lists per term (see _banded_sum): N^k has bandwidth k, and N^j e_n / j! is zero
            # above entry n-1-j, so C_m[p, q] vanishes unless p + q >= 2n - 2 - m
            p, q = np.divmod(np.arange(n * n), n)
            self.e_idx = [np.flatnonzero(np.abs(p - q) <= k) for k in range(n)]
            self.q_idx = [np.flatnonzero(p + q >= 2 * n - 2 - m) for m in range(2 * n - 1)]
            self.P_sub = [self.P[k, i] for k, i in enumerate(self.e_idx)]
            self.cm_sub = [self.cm[m, i] for m, i in enumerate(self.q_idx)]
            self.cm_a_sub = [self.cm_a[m, i] for m, i in enumerate(self.q_idx)]
            self.scale = [D(math.factorial(m)) / (2 * r) ** (m + 1) for m in range(2 * n - 1)]  # m! / (2r)^{m+1}


def _powers(N: np.ndarray) -> np.ndarray:
    """N^k / k! for k = 0..n-1 of the tridiagonal N (object (n, n) of Decimal): (n, n, n). Each entry of N^k N is the
    sum of its three terms next to the diagonal, added in the order of the dense product, so the values are those of
    ``(N^k @ N) / (k + 1)`` (the dense product only adds exact zeros) in O(n^2) per power instead of O(n^3)."""
    n = N.shape[0]
    sup = np.array([N[q - 1, q] for q in range(1, n)], dtype=object)  # N[q-1, q], multiplies column q-1 into q
    dia = np.array([N[q, q] for q in range(n)], dtype=object)
    sub = np.array([N[q + 1, q] for q in range(n - 1)], dtype=object)  # N[q+1, q]
    pw, out = np.eye(n, dtype=int).astype(object) * decimal.Decimal(1), []
    for k in range(n):
        out.append(pw)
        acc = pw * dia
        acc[:, 1:] = pw[:, :-1] * sup + acc[:, 1:]  # Decimal addition is commutative: the dense order's values
        acc[:, :-1] = acc[:, :-1] + pw[:, 1:] * sub
        pw = acc / (k + 1)  # N^{k+1} / (k+1)!
    return np.stack(out)


def _gram_coefs(P: np.ndarray, g) -> np.ndarray:
    """C_m = sum_{j+k=m} (P_j g e_n)(P_k g e_n)^T: (2n-1, n, n) object array. P_j e_n (bandwidth j) is zero above entry
    n-1-j, so each outer product only touches its (j+1, k+1) corner; added in the same (j, k) order as the dense sum.
    The (k, j) product is the transpose of the (j, k) one (a rounded product does not depend on the factors' order), so
    each is multiplied once: n^4 / 8 products instead of n^4."""
    n = P.shape[0]
    vecs = P[:, :, n - 1] * g  # (n, n): row j is N^j g / j!
    cm = np.full((2 * n - 1, n, n), decimal.Decimal(0), dtype=object)
    later = {}  # (j, k) -> product block, j < k, kept until (k, j) uses its transpose
    for j in range(n):
        for k in range(n):
            if j <= k:
                blk = np.outer(vecs[j, n - 1 - j:], vecs[k, n - 1 - k:])
                if j < k:
                    later[j, k] = blk
            else:
                blk = later.pop((k, j)).T
            cm[j + k, n - 1 - j:, n - 1 - k:] += blk
    return cm


def _banded_sum(w, rows: list, idx: list, size: int) -> np.ndarray:
    """sum_k w[k] rows[k] over each row's support idx[k] (flat indices, growing with k), as the dense product w @ R
    adds them (k ascending; the terms skipped are exact zeros, which change no nonzero sum; a zero result may differ
    in sign only): object (size,)."""
    acc = np.full(size, decimal.Decimal(0), dtype=object)
    for wk, r, i in zip(w, rows, idx):
        acc[i] = acc[i] + wk * r
    return acc


class Law:
    """E, Q, Q_A, Sigma_t and their Cholesky factors of one HOLD process in extended precision, rounded to float64.

    Args: order n, ``rate`` (None: r = sqrt(2n - 3) exactly, r = 1 at n = 1; else the float r), L, alpha, delta, hsm as
    in :class:`diffkern.hold.HOLD`; floats enter exactly (Decimal(float) is exact).
    """

    def __init__(self, order: int, rate, L: float, alpha: float, delta: float, hsm: bool):
        self.n = int(order)
        self._args = (self.n, rate, float(L), float(alpha), float(delta), bool(hsm))
        self._consts: OrderedDict = OrderedDict()
        self._cache: OrderedDict = OrderedDict()
        self._lock = threading.Lock()  # guards the two caches' bookkeeping (not the computations)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_lock"]  # a lock cannot be pickled; the copy gets its own
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._consts = OrderedDict(self._consts)  # a plain dict in pickles of earlier versions
        self._lock = threading.Lock()

    def consts(self, prec: int) -> _Consts:
        """The constants at ``prec`` digits, built on first use (two threads may both build them: same values)."""
        return self._cached(self._consts, prec, lambda: _Consts(*self._args, prec), _CONSTS_KEPT)

    def _cached(self, cache: OrderedDict, key, make, limit: int):
        """``cache[key]``, made by ``make()`` on a miss, keeping the ``limit`` most recently used entries. Thread-safe:
        the lock guards the bookkeeping only, so two threads missing one key both make it (to the same value)."""
        with self._lock:
            hit = cache.get(key)
            if hit is not None:
                cache.move_to_end(key)
                return hit
        made = make()
        with self._lock:
            hit = cache.setdefault(key, made)
            while len(cache) > limit:
                cache.popitem(last=False)
        return hit

    def min_time(self) -> float:
        """Smallest integrated time b > 0 that part "t" computes: 0.0 with a jitter or under DSM (the extra digits are
        bounded), else the b whose extra digits (2n - 1) log10(1/b) reach MAX_DIGITS (b = 0 itself is exact)."""
        n, delta, hsm = self._args[0], self._args[4], self._args[5]
        if not hsm or delta > 0:
            return 0.0
        room = max(MAX_DIGITS - digits(n), 0) // 10 * 10  # extra_digits are whole tens
        return 10.0 ** (-room / (2 * n - 1)) * (1 + 1e-12)  # just inside: extra_digits rounds up

    # ------------------------------------------------------------------ one b, in the working precision
    def _extra(self, b: float, part: str) -> int:
        """Digits part ``part`` adds to ``digits(n)`` at b: only part "t" holds a factor of Sigma_t
        (:func:`extra_digits`); E and Q alone ("e") and the A-part ("a") have no Hilbert-like factor: base digits."""
        return extra_digits(self.n, b, self._args[4], self._args[5]) if part == "t" else 0

    def _check(self, b: float, part: str, arg: str) -> None:
        """Refuse (ValueError naming ``arg``, the caller's time argument) a b whose part needs more than MAX_DIGITS."""
        n, extra = self.n, self._extra(b, part)
        if extra and self._args[4] == 0 and digits(n) + extra > MAX_DIGITS:
            raise ValueError(
                f"{arg}: expected an integrated time b >= {self.min_time():.3g} for order n = {n} with hsm=True and "
                f"delta=0, got b = {b!r}: without a jitter Sigma_t's smallest eigenvalue falls like b^(2n-1), so its "
                f"factor needs {digits(n) + extra} digits there (MAX_DIGITS = {MAX_DIGITS}); pass a jitter delta > 0 "
                f"(the default 1e-9 needs 10 extra digits at most) or larger times")

    def _one(self, b: float, part: str) -> dict:
        """Float64 results at integrated time b (exact Decimal(b)), checked by :meth:`get`. part "t": E, Q,
        S = Sigma_t + delta I, L = chol S and the x0 weights (w_z, w_eps); part "e": E and Q only, in the base digits
        (:meth:`batch` serves E and Q from it where "t" would add unbounded digits for the factor); part "a": the SSCS
        A-part's QA = Q_A and LA = chol Q_A."""
        n, D = self.n, decimal.Decimal
        c = self.consts(digits(n) + self._extra(b, part))
        with decimal.localcontext(c.ctx):
            bd = D(float(b))
            I = np.array([s * p for s, p in zip(c.scale, _lower_gamma(2 * c.r * bd, 2 * n - 1, c.ctx.prec))],
                         dtype=object)
            if part == "a":
                QA = _banded_sum(I, c.cm_a_sub, c.q_idx, n * n).reshape(n, n)
                return {"QA": _f64(QA), "LA": _f64(_chol(QA))}
            pows = np.array([D(1)] + [bd**k for k in range(1, n)], dtype=object)  # decimal's 0**0 is an error
            E = _banded_sum(pows, c.P_sub, c.e_idx, n * n).reshape(n, n) * (-c.r * bd).exp()
            Q = _banded_sum(I, c.cm_sub, c.q_idx, n * n).reshape(n, n)
            if part == "e":
                return {"E": _f64(E), "Q": _f64(Q)}
            S = Q + _sym_gram(E[:, 1:]) * c.s0 if c.s0 else Q.copy()  # E Sigma_0 E^T without the x column
            for i in range(n):
                S[i, i] += c.delta
            Lt = _chol(S)
            w_z, w_eps = _x0_weights(E[:, 0], Lt)
            return {"E": _f64(E), "Q": _f64(Q), "S": _f64(S), "L": _f64(Lt), "w_z": _f64(w_z), "w_eps": float(w_eps)}

    def get(self, b: float, part: str, arg: str = "t") -> dict:
        """Float64 results of ``_one`` at b, cached (thread-safe; a miss computes outside the lock, so two threads
        missing one b both compute it, to the same values). A b the part cannot compute is refused naming ``arg``."""
        b = float(b)
        self._check(b, part, arg)
        limit = min(_CACHE_SIZE, _CACHE_BYTES // (48 * self.n * self.n))
        return self._cached(self._cache, (b, part), lambda: self._one(b, part), limit)

    def batch(self, b: torch.Tensor, name: str, arg: str = "t") -> torch.Tensor:
        """Result ``name`` (E, Q, S, L, w_z, w_eps; QA, LA) stacked over the float64 integrated times b (...), read on
        the host (a sync for a device tensor); float64 (..., [n, [n]]) on b's device. ``arg``: the caller's argument
        that a small-time refusal names (t, or b for HOLD's b-taking methods). E and Q come with the factor's results
        (part "t": one cache entry for a table's E, Q and L) but without a jitter, where the factor's extra digits are
        unbounded (b < 1 under HSM), alone in the base digits (part "e"): E and Q do not need them, and have no
        :meth:`min_time` (correctly rounded either way: ``tests/test_hold_mp_small_b.py``)."""
        if b.requires_grad:  # the values are host constants: a silent detach would drop the gradient
            raise ValueError(f"b: expected times without autograd history (the extended path computes order n = "
                             f"{self.n}'s laws on the host, not differentiably); pass b.detach()")
        flat = b.detach().to("cpu", torch.float64).reshape(-1).tolist()
        for i, v in enumerate(flat):
            if math.isnan(v) or v < 0:
                raise ValueError(f"b: expected finite integrated times >= 0, got {v} (the extended path reads them "
                                 f"on the host)")
            if v == math.inf:  # a huge t's integrated time overflowed (or t = inf): the stationary law, as in float64
                flat[i] = _B_INF
        part = "a" if name in ("QA", "LA") else "t"
        parts = [("e" if name in ("E", "Q") and not self._args[4] and self._extra(v, part) else part) for v in flat]
        rows = [self.get(v, p, arg)[name] for v, p in zip(flat, parts)]
        shape = () if name == "w_eps" else (self.n,) if name == "w_z" else (self.n, self.n)
        out = torch.tensor(np.array(rows, dtype=np.float64).reshape(tuple(b.shape) + shape), dtype=torch.float64)
        return out.to(b.device)


def _lower_gamma(x, M: int, prec: int) -> list:
    """[P(m+1, x) for m = 0..M-1], the regularized lower incomplete gamma at integer order, without cancellation:
    e^{-x} sum_{i > m} x^i / i! (positive terms) where x < m + 1, else 1 - e^{-x} sum_{i <= m} x^i / i!."""
    D = decimal.Decimal
    terms, t, i = [], D(1), 0
    while i <= M:
        terms.append(t)
        i += 1
        t = t * x / i
    small = terms[M] / D(10) ** (prec + 2)  # past i = M > x the terms fall geometrically
    while x < M and t > small:
        terms.append(t)
        i += 1
        t = t * x / i
    head, acc = [], D(0)
    for m in range(M):
        acc += terms[m]
        head.append(acc)  # sum_{i <= m}
    tail = sum(terms[M:][::-1], D(0))
    ex, out = (-x).exp(), [D(0)] * M
    for m in range(M - 1, -1, -1):  # tail = sum_{i > m}
        out[m] = ex * tail if x < m + 1 else 1 - ex * head[m]
        tail += terms[m]
    return out


def _sym_gram(A: np.ndarray) -> np.ndarray:
    """A @ A.T (object (n, m) of Decimal) from its lower triangle: entry (q, p) adds the same products in the same
    order as (p, q), so the mirror is the dense product's value."""
    n = A.shape[0]
    G = np.empty((n, n), dtype=object)
    for p in range(n):
        G[p, :p + 1] = A[:p + 1] @ A[p]
        G[:p, p] = G[p, :p]
    return G


def _f64(A) -> np.ndarray:
    return np.array([float(v) for v in np.asarray(A).reshape(-1)], dtype=np.float64).reshape(np.shape(A))


def _chol(S: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor of symmetric PSD S (object array of Decimal); a non-positive pivot gives a zero column."""
    n = S.shape[0]
    Lc = np.full((n, n), decimal.Decimal(0), dtype=object)
    for j in range(n):
        piv = S[j, j] - (Lc[j, :j] @ Lc[j, :j] if j else 0)
        if piv <= 0:
            continue
        d = piv.sqrt()
        Lc[j, j] = d
        if j + 1 < n:
            Lc[j + 1:, j] = (S[j + 1:, j] - (Lc[j + 1:, :j] @ Lc[j, :j] if j else 0)) / d
    return Lc


def _x0_weights(c: np.ndarray, Lt: np.ndarray):
    """(w_z (n,), w_eps) with x0_hat = w_z . z + w_eps eps_hat (``math-hold.md`` 4.4): u = L_<^{-T} l,
    den = c_n - u . c_<n; w_z = (-u, 1) / den, w_eps = -L_nn / den. Infinite weights where den = 0 (b = 0)."""
    n = c.shape[0]
    D = decimal.Decimal
    u = np.full(n - 1, D(0), dtype=object)
    if any(Lt[i, i] == 0 for i in range(n - 1)):  # a singular L_< (b = 0 without jitter): no x0 prediction
        return np.full(n, D("NaN"), dtype=object), D("NaN")
    for i in range(n - 2, -1, -1):  # back substitution with L_<^T (upper)
        acc = Lt[n - 1, i] - (Lt[i + 1:n - 1, i] @ u[i + 1:] if i + 1 < n - 1 else 0)
        u[i] = acc / Lt[i, i]
    den = c[n - 1] - (u @ c[:n - 1] if n > 1 else 0)
    if den == 0:  # b = 0: z_n does not depend on x0 yet
        return np.full(n, D("Infinity"), dtype=object), D("-Infinity")
    w_z = np.concatenate([-u, np.array([D(1)], dtype=object)]) / den
    return w_z, -Lt[n - 1, n - 1] / den
