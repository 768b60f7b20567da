"""Critically-damped higher-order Langevin dynamics (HOLD++), the process object.

Order n >= 1 (n = 1: VP-like OU, n = 2: CLD, n = 3: TOLD++). Per data element the state is an
n-vector z = (x, v_1, ..., v_{n-1}); the forward SDE in forward time t is

    dz = beta(t) F z dt + sqrt(beta(t)) G dW,
    F  = sum_i gamma_i (E_{i,i+1} - E_{i+1,i}) - xi E_{n,n},     G = sqrt(2 xi / L) E_{n,n}

with the critically-damped choice r = sqrt(2n - 3) (r = 1 for n = 1), xi = n r and
gamma_j^2 = r^2 j (2n - j) / ((2n - 2j - 1)(2n - 2j + 1)), so that det(lambda I - F) = (lambda + r)^n
(``math-hold.md`` 2.2; the authors' code ``bensterl15/MIAHOLDCIFAR``). F is constant, so every
transition depends only on the integrated time b = int_0^t beta; beta(t) = beta0 + beta1 t here.

All host maths is float64. Methods take t as a Python float or a float64 tensor of any shape
(...) and return (..., n, n) tensors on t's device, so per-sample t for training needs no host sync
(orders n <= F64_MAX_ORDER = 11, but for the factors ``ops.hold.f64_factor_orders`` routes; above it the same
closed forms and the factors are computed in extended precision by :mod:`diffkern.hold_mp`, which reads the times
on the host, and rounded to float64):

    transition(t)  E(t) = exp(F b) = e^{-r b} sum_k b^k N^k / k!         (N = F + r I, nilpotent)
    gramian(t)     Q(t) = sum_m C_m m!/(2r)^{m+1} P(m+1, 2 r b)           (cancellation-free, 3.2)
    cov(t)         Sigma_t = E Sigma_0 E^T + Q  (+ delta I with jitter=True)
    chol(t)        L_t = chol(Sigma_t + delta I), the factor the network's epsilon refers to

Network convention (``math-hold.md`` 4): the network sees z_t and t and outputs eps_hat ~ eps_n, the
last component's noise; the score is s_n = -eps_hat / L_t[n, n].
"""
from __future__ import annotations

import math
import numbers

import torch

from .hold_linalg import _mm, chol_psd, chol_rows
# the state maps live beside the factors, the coefficients beside the argument checks; importable from here as before
from .hold_linalg import cld_to_hold_state, hold_to_cld_state, split_components  # noqa: F401
from .hold_params import as_time, beta_pair, check_host_times, critical_damping, finite, process_matrices
from .ops.hold import F64_MAX_ORDER, f64_factor_orders

_F64 = torch.float64
_BASE_X = 0.25  # the closed-form series run at 2 r b <= _BASE_X, then double (HOLD._law)
_DOUBLINGS = 13  # 2 r b <= 1600 (b clamped at r b = 800) needs ceil(log2(1600 / 0.25)) = 13
# Past r b = 8 the x0 weights of host times come from the extended path (HOLD._x0_far): E(b)'s first column, which
# they divide by, falls like e^{-r b} b^(n-1) and float64 keeps less and less of it relatively. Float64 weights vs the
# extended path, relative, max over n <= 11: <= 4e-14 up to r b = 8 (n <= 9; n = 10, 11 have their moderate-b 9e-14,
# 4e-13), 4e-13 at 16, 3e-12 at 20, 1e-10 at 30, 4e-9 at 40, 3e-6 at 60, O(1) at 100 (n = 6: 7e-12 at b = 10)
_X0_FAR_RB = 8.0


class HOLD:
    """Critically-damped HOLD process of order ``order`` (``math-hold.md`` 2-4).

    Args:
        order: n >= 1 (Python int).
        L: inverse temperature; the stationary covariance is I / L (authors' default 1/L = 0.5).
        alpha: auxiliary initial variance factor: v_k(0) ~ N(0, alpha / L).
        T: horizon (authors: 5 with beta = 1).
        delta: jitter added to Sigma_t's diagonal before the Cholesky (a model hyperparameter: use the
            same value for training and sampling, ``math-hold.md`` 4.3).
        beta: beta(t) as a constant or a pair (beta0, beta1) for beta0 + beta1 t (> 0 on (0, T]).
        rate: r, default sqrt(2n - 3).
        hsm: Sigma_0 = diag(0, alpha/L, ...) (hybrid score matching, default) or 0 (DSM).
    """

    def __init__(self, order: int, *, L: float = 2.0, alpha: float = 0.08, T: float = 5.0, delta: float = 1e-9,
                 beta: float | tuple[float, float] = 1.0, rate: float | None = None, hsm: bool = True):
        self.r, self.xi, self.gammas = critical_damping(order, rate)
        self.order = n = int(order)  # critical_damping checked it (numpy ints too)
        self.L = finite("L", L, strict=True)
        self.alpha = finite("alpha", alpha)
        self.T = finite("T", T, strict=True)
        self.delta = finite("delta", delta)
        b0, b1 = beta_pair(beta)
        self.beta0 = finite("beta (beta0)", b0)
        if isinstance(b1, bool) or not isinstance(b1, numbers.Real) or not math.isfinite(b1):
            raise ValueError(f"beta (beta1): expected a finite real number, got {b1!r}")
        self.beta1 = float(b1)
        if not self.beta0 + self.beta1 * self.T > 0 or (self.beta0 == 0 and self.beta1 <= 0):
            raise ValueError(f"beta: beta(t) = {self.beta0} + {self.beta1} t must be > 0 on (0, T={self.T}]")
        if hsm not in (True, False):  # bool("False") is True: a config string would silently pick HSM
            raise TypeError(f"hsm: expected a bool (True: hybrid score matching, False: DSM), got {hsm!r}")
        self.hsm = bool(hsm)
        # F, G and N = F + r I (n, n); N^k / k! (n, n, n); the Gramian coefficients C_m of E and of E^T (2n-1, n, n)
        self.F, self.G, self.N, self._npow, self._cm, self._cm_a = process_matrices(
            self.gammas, self.xi, self.r, self.L)
        self._cache: dict = {}
        # The parts float64 cannot carry come from diffkern.hold_mp's extended precision (one Law, reading its times
        # on the host): above F64_MAX_ORDER every law ("E", "Q", "QA") and factor, below it only the factors that
        # f64_factor_orders routes for this (hsm, delta): "L" (L_t and the x0 weights) and/or "LA" (chol Q_A)
        lim_t, lim_a = f64_factor_orders(self.hsm, self.delta)
        laws = ("E", "Q", "QA") if n > F64_MAX_ORDER else ()
        self._xparts = frozenset(laws + tuple(p for p, lim in (("L", lim_t), ("LA", lim_a)) if n > lim))
        self._rate_arg, self._xp = rate, None  # the Law's r: sqrt(2n - 3) exactly when rate is None
        if self._xparts:
            self._ext_law()

    def __repr__(self) -> str:
        return (f"HOLD(order={self.order}, L={self.L}, alpha={self.alpha}, T={self.T}, delta={self.delta}, "
                f"beta=({self.beta0}, {self.beta1}), rate={self.r}, hsm={self.hsm})")

    @classmethod
    def from_cld(cls, m_inv: float = 4.0, gamma: float = 0.04, beta: float | tuple[float, float] = 4.0,
                 T: float = 1.0, delta: float = 1e-9, hsm: bool = True) -> "HOLD":
        """Critically-damped CLD (Dockhorn et al. 2022; mass M = 1/m_inv, Gamma = 2 sqrt(M)) as HOLD n = 2.

        CLD's dx = beta M^-1 v dt, dv = (-beta x - Gamma beta M^-1 v) dt + sqrt(2 Gamma beta) dW becomes,
        with v = sqrt(M) v~, the n = 2 HOLD++ process with L = 1, alpha = gamma and beta scaled by
        sqrt(m_inv) (CIFAR-10 config: m_inv = 4, beta = 4 -> beta 8). Convert states with
        :func:`cld_to_hold_state` / :func:`hold_to_cld_state`; eps_hat means the same in both.
        """
        s = math.sqrt(finite("m_inv", m_inv, strict=True))
        b = beta_pair(beta)
        return cls(2, L=1.0, alpha=gamma, T=T, delta=delta, beta=(b[0] * s, b[1] * s), hsm=hsm)

    # ---------------------------------------------------------------- time
    def beta(self, t):
        """beta(t) for float or tensor t."""
        return self.beta0 + self.beta1 * t

    def int_beta(self, t):
        """b = int_0^t beta(s) ds for float or tensor t (a tensor checked on the host above F64_MAX_ORDER, see _b)."""
        return self._b(t, "E")

    def _b(self, t, part: str):
        """b(t) for forward times t that feed ``part``. Where the extended path computes that part it reads the times
        on the host, and checks them there first: b(t) > 0 for some t < 0 with beta1 > 0 would hide them from it."""
        if part in self._xparts and isinstance(t, torch.Tensor):
            check_host_times(t, "t", self.order)
        if not self.beta1:  # 0 * t * t would be NaN at t = inf (or t * t overflowing) for a constant beta
            return self.beta0 * t
        return self.beta0 * t + 0.5 * self.beta1 * t * t

    def _ext_law(self):
        """The extended-precision :class:`diffkern.hold_mp.Law` of this process, built on first use (lazily: decimal
        maths only where float64 cannot carry; two threads may both build one, to the same values)."""
        if self._xp is None:
            from .hold_mp import Law

            self._xp = Law(self.order, self._rate_arg, self.L, self.alpha, self.delta, self.hsm)
        return self._xp

    def __setstate__(self, state: dict) -> None:
        """Pickles from before the lazily built Law (cda18e0) lack ``_rate_arg``: their Law's, if they built one, else
        None (r = sqrt(2n - 3) exactly) where r is the default's float, else r itself (as ``rate=r`` would give)."""
        self.__dict__.update(state)
        if "_rate_arg" not in state:
            xp = state.get("_xp")
            self._rate_arg = xp._args[1] if xp is not None else (
                None if self.r == critical_damping(self.order)[0] else self.r)

    def _ext(self, part: str, b: torch.Tensor, arg: str = "b") -> torch.Tensor:
        """Result ``part`` ("E", "Q", "QA", "LA") of the extended path at the integrated times ``b`` (float64, ...) the
        caller passed, on b's device; checked by their name first, on the host (where the path reads them anyway).
        ``arg``: the caller's argument that errors name (b, or t where b comes from forward times)."""
        check_host_times(b, arg, self.order)
        return self._xp.batch(b.detach(), part, arg)  # history under no_grad only: nothing to keep

    def _at(self, part: str, b: torch.Tensor, arg: str = "b") -> torch.Tensor:
        """Law ``part`` ("E", "Q", "QA", "LA": E, Q, Q_A, chol Q_A) at the integrated times b (float64, ...), from the
        extended path where it computes that part, errors naming ``arg`` (b, or t where b = b(t)); (..., n, n)."""
        if part in self._xparts:
            return self._ext(part, b, arg)
        if part == "LA":
            return chol_psd(self._at("QA", b, arg))
        M, Q = self._law(b, {"E": None, "Q": "_cm", "QA": "_cm_a"}[part], transpose=part == "QA")
        return M if part == "E" else Q

    def _const(self, name: str, device) -> torch.Tensor:
        key = (name, str(device))
        if key not in self._cache:
            self._cache[key] = getattr(self, name).to(device)
        return self._cache[key]

    # ---------------------------------------------------------------- closed forms in integrated time b
    def _poly_exp(self, b: torch.Tensor, npow: str) -> torch.Tensor:
        """E(b) = sum_k N^k b^k / k! e^{-r b} by its series, for b already clamped and halved by :meth:`_law`."""
        k = torch.arange(self.order, dtype=_F64, device=b.device)
        pows = b[..., None] ** k  # (..., n); 0**0 = 1
        return torch.einsum("...k,kij->...ij", pows, self._const(npow, b.device)) * torch.exp(-self.r * b)[..., None, None]

    def _gram(self, b: torch.Tensor, cm: str, *, high: bool = False) -> torch.Tensor:
        """Q = sum_m C_m m!/(2r)^{m+1} P(m+1, 2 r b), or with ``high`` the same as I/L - sum_m C_m m!/(2r)^{m+1}
        Q(m+1, 2 r b) (sum_m C_m m!/(2r)^{m+1} = Sigma_inf, Lyapunov). The first is accurate at small 2 r b, the
        second at 2 r b > 8n (normalized error < 1e-23 vs 200 digits for n <= 20); :meth:`_law` covers between."""
        m = torch.arange(2 * self.order - 1, dtype=_F64, device=b.device)
        scale = torch.exp(torch.lgamma(m + 1) - (m + 1) * math.log(2 * self.r))  # m! / (2r)^{m+1}
        x = (2 * self.r * b)[..., None].expand(*b.shape, m.numel())
        cm = self._const(cm, b.device)
        if not high:
            return torch.einsum("...m,mij->...ij", scale * torch.special.gammainc(m + 1, x), cm)
        return torch.eye(self.order, dtype=_F64, device=b.device) / self.L - torch.einsum(
            "...m,mij->...ij", scale * torch.special.gammaincc(m + 1, x), cm)

    def _law(self, b: torch.Tensor, cm: str | None, transpose: bool = False):
        """(M, Q) at integrated time b: M = E(b) (E(b)^T if ``transpose``) and, unless ``cm`` is None, its Gramian.

        Both series cancel among terms that grow with n (N^k / k!, C_m): at 2 r b ~ 2n their float64 error was
        2e-10 at n = 8, 1e-8 at n = 10 and O(1) at n = 14 (normalized, vs 200 digits), whatever the switch to the
        complementary form (exact only beyond 2 r b = 8n, used there). So below it they are evaluated only at
        h = b / 2^k with 2 r h <= 1/4, where they are accurate to ~1e-13 up to n = 20, and doubled k times:
        E(2h) = E(h)^2, Q(2h) = Q(h) + M(h) Q(h) M(h)^T, sums of PSD terms that do not cancel (normalized error
        <= 1e-13 for n <= 20 at every b). k is per element (no host sync); the loop runs _DOUBLINGS times.
        """
        # e^{-r b} is 0 beyond r b = 745: E = 0, Q = Sigma_inf from there on. The clamp also keeps the series'
        # b^k finite (it overflowed to inf * 0 = NaN from b ~ 1e44 at n = 8, and at b = inf)
        b = b.clamp(max=800.0 / self.r)
        # b <= 0 (log2 -inf, or NaN for an invalid negative b): no doubling, the series as before
        k = torch.ceil(torch.log2((2 * self.r * b).clamp(min=0) / _BASE_X)).clamp(min=0, max=_DOUBLINGS)
        h = b / torch.exp2(k)
        M = self._poly_exp(h, "_npow")
        M = M.transpose(-1, -2) if transpose else M
        Q = self._gram(h, cm) if cm is not None else None
        for i in range(_DOUBLINGS):
            go = (k > i)[..., None, None]
            if Q is not None:
                Q = torch.where(go, Q + _mm(_mm(M, Q), M.transpose(-1, -2)), Q)
            M = torch.where(go, _mm(M, M), M)
        M = torch.where((self.r * b >= 800.0)[..., None, None], 0.0, M)  # |E| < 1e-300 there (n <= 20): exactly 0
        if Q is not None:  # near the stationary law the complementary form is exact; doubling would add rounding
            Q = torch.where((2 * self.r * b > 8 * self.order)[..., None, None], self._gram(b, cm, high=True), Q)
        return M, Q

    def transition_b(self, b) -> torch.Tensor:
        """E = exp(F b) at integrated time b; (..., n, n) float64."""
        return self._at("E", as_time(b, "b"))

    def gramian_b(self, b) -> torch.Tensor:
        """Q = int_0^b E(s) G G^T E(s)^T ds at integrated time b; (..., n, n) float64."""
        return self._at("Q", as_time(b, "b"))

    def a_transition(self, b) -> torch.Tensor:
        """SSCS A-part transition A(b) = exp(F^T b) = E(b)^T (``math-hold.md`` 6.2); (..., n, n)."""
        return self.transition_b(b).transpose(-1, -2)

    def a_cov(self, b) -> torch.Tensor:
        """SSCS A-part covariance Q_A(b) = Sigma_inf - A Sigma_inf A^T, by the series with N^T; (..., n, n)."""
        return self._at("QA", as_time(b, "b"))

    def a_chol(self, b) -> torch.Tensor:
        """chol Q_A(b), the SSCS noise factor (lower, zero columns where Q_A is singular); (..., n, n) float64.
        Extended precision from n = 6 (float64 loses its digits: ``ops.hold.f64_factor_orders``)."""
        return self._at("LA", as_time(b, "b"))

    # ---------------------------------------------------------------- closed forms in forward time t
    def cov0(self, device=None) -> torch.Tensor:
        """Sigma_0: diag(0, alpha/L, ..., alpha/L) (HSM) or 0 (DSM); (n, n) float64."""
        d = torch.full((self.order,), self.alpha / self.L if self.hsm else 0.0, dtype=_F64, device=device)
        d[0] = 0.0
        return torch.diag(d)

    def stationary_cov(self, device=None) -> torch.Tensor:
        """Sigma_inf = I / L; (n, n) float64."""
        return torch.eye(self.order, dtype=_F64, device=device) / self.L

    def transition(self, t) -> torch.Tensor:
        """E(t) = exp(F int_0^t beta); (..., n, n) float64 on t's device."""
        return self._at("E", self._b(as_time(t, "t"), "E"), "t")

    def gramian(self, t) -> torch.Tensor:
        """Q(t), the covariance of z_t given z_0 = 0; (..., n, n) float64."""
        return self._at("Q", self._b(as_time(t, "t"), "Q"), "t")

    def cov(self, t, *, jitter: bool = False) -> torch.Tensor:
        """Sigma_t = E Sigma_0 E^T + Q(t) (+ delta I if ``jitter``), cancellation-free; (..., n, n) float64."""
        if jitter not in (True, False):
            raise TypeError(f"jitter: expected a bool, got {jitter!r}")
        b = self._b(as_time(t, "t"), "E")
        E = self._at("E", b, "t")
        S = E @ self.cov0(b.device) @ E.transpose(-1, -2) + self._at("Q", b, "t")
        if jitter:
            S = S + self.delta * torch.eye(self.order, dtype=_F64, device=b.device)
        return S

    def chol(self, t) -> torch.Tensor:
        """L_t = chol(Sigma_t + delta I), lower-triangular; (..., n, n) float64.

        Computed from the square root [E Sigma_0^{1/2}, chol(Q), sqrt(delta) I] by :func:`chol_rows`, never
        from Sigma_t itself, which is too ill-conditioned at small t under HSM (``delta = 0`` stays exact). Orders
        above ``f64_factor_orders(hsm, delta)[0]`` (without jitter DSM n >= 5, HSM n >= 9) take L_t from the extended
        path instead (``ops.hold.f64_factor_orders``; the times are read on the host: one sync for a device tensor).
        """
        b = self._b(as_time(t, "t"), "L")
        if "L" in self._xparts:  # t checked by _b
            return self._xp.batch(b, "L")
        E, Lq = self._at("E", b, "t"), chol_psd(self._at("Q", b, "t"))
        jit = math.sqrt(self.delta) * torch.eye(self.order, dtype=_F64, device=b.device)
        return chol_rows(torch.cat([E @ self.cov0(b.device).sqrt(), Lq, jit.expand_as(Lq)], dim=-1))

    def score_scale(self, t) -> torch.Tensor:
        """L_t[n, n]: the score is s_n = -eps_hat / L_t[n, n]; shape (...) float64."""
        return self.chol(t)[..., -1, -1]

    # ---------------------------------------------------------------- network conventions
    def eps_to_score(self, eps_hat: torch.Tensor, t: float) -> torch.Tensor:
        """s_n = -eps_hat / L_t[n, n] (``math-hold.md`` 4.2) for a scalar forward time t."""
        return eps_hat / -float(self.score_scale(t))

    def score_to_eps(self, score_n: torch.Tensor, t: float) -> torch.Tensor:
        """eps_hat = -L_t[n, n] s_n: the network output that an exact score corresponds to."""
        return score_n * -float(self.score_scale(t))

    def x0_coefficients(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights (w_z (..., n), w_eps (...)) with x0_hat = sum_k w_z[k] z_k + w_eps eps_hat (``math-hold.md`` 4.4).

        With c = E(t) e_1 and u = L_<^{-T} l (l = L_t[n, <n]):
        x0_hat = (z_n - L_nn eps_hat - u^T z_<n) / (c_n - u^T c_<n).
        For n >= 2 the denominator vanishes at t = 0 (z_n does not depend on x0 yet): a number t must be > 0
        (a tensor t = 0 gives non-finite weights). Times on the host (a number, a CPU tensor) with r b(t) > 8 take the
        extended path's correctly rounded weights (:meth:`_x0_far`); a device t is not read (no sync) and, like a t
        with autograd history, keeps the float64 weights, relative error <= 4e-14 up to r b = 8 (n <= 9), 4e-13 at 16,
        3e-12 at 20, 1e-10 at 30, 3e-6 at 60, O(1) at 100 (n <= 11; ``tests/test_hold_x0_far.py``).
        """
        tt = as_time(t, "t")
        if self.order > 1 and not isinstance(t, torch.Tensor) and float(t) == 0:
            raise ValueError("t: x0 prediction from eps_hat needs t > 0 for order >= 2 (z_n is independent of x0 at t = 0)")
        if "L" in self._xparts:  # the triangular solve below would lose the small pivots' digits
            b = self._b(tt, "L")
            return self._xp.batch(b, "w_z"), self._xp.batch(b, "w_eps")
        c = self.transition(tt)[..., :, 0]  # (..., n)
        Lt = self.chol(tt)
        n = self.order
        if n > 1:
            l_row = Lt[..., n - 1, : n - 1]
            u = torch.linalg.solve_triangular(Lt[..., : n - 1, : n - 1].transpose(-1, -2), l_row[..., None],
                                              upper=True)[..., 0]  # (..., n-1)
            den = c[..., n - 1] - (u * c[..., : n - 1]).sum(-1)
            w_z = torch.cat([-u, torch.ones_like(den)[..., None]], -1) / den[..., None]
        else:
            den = c[..., 0]
            w_z = (1.0 / den)[..., None]
        return self._x0_far(tt, w_z, -Lt[..., n - 1, n - 1] / den)

    def _x0_far(self, t: torch.Tensor, w_z: torch.Tensor, w_eps: torch.Tensor):
        """(w_z, w_eps) of :meth:`x0_coefficients` with the entries at r b(t) > _X0_FAR_RB replaced by the extended
        path's, where t is on the host and without autograd history (the extended values are constants); the others
        are returned as computed, bitwise. A device t is not read: it would cost a sync the float64 path does not."""
        if t.device.type != "cpu" or (t.requires_grad and torch.is_grad_enabled()):
            return w_z, w_eps
        b = self._b(t, "E").detach()
        return self._far(b, "w_z", w_z), self._far(b, "w_eps", w_eps)

    def _far(self, b: torch.Tensor, name: str, value: torch.Tensor) -> torch.Tensor:
        """``value`` (b's shape, then result ``name``'s) with its entries at r b > _X0_FAR_RB (host float64 b) the
        extended path's ``name``; the others bitwise, and ``value`` itself where none is that far."""
        far = self.r * b > _X0_FAR_RB  # NaN compares False; b = inf is the extended path's stationary limit
        if not bool(far.any()):
            return value
        value = value.detach().clone()
        value[far] = self._ext_law().batch(b[far], name)
        return value

    def predict_x0(self, z: torch.Tensor, eps_hat: torch.Tensor, t: float) -> torch.Tensor:
        """x0_hat = E[x_0 | z_t] when eps_hat = E[eps_n | z_t]; z (B, n*C, ...), eps_hat (B, C, ...) -> (B, C, ...)."""
        w_z, w_e = self.x0_coefficients(float(t))
        zs = split_components(z, self.order)
        acc = w_e.item() * eps_hat.double()
        for k in range(self.order):
            acc = acc + w_z[k].item() * zs[k].double()
        return acc.to(z.dtype)

    # ---------------------------------------------------------------- forward perturbation (training)
    def perturb_matrices(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample (mean_mat (B, n, 1), chol (B, n, n)) float64 for :meth:`perturb`; t (B,) on any device.

        Orders n <= F64_MAX_ORDER compute on t's device without a host sync, unless L_t is routed to the extended
        path (``ops.hold.f64_factor_orders``: without jitter DSM n >= 5, HSM n >= 9; with it DSM n >= 8), which syncs
        as above F64_MAX_ORDER. Above it the matrices come from :mod:`diffkern.hold_mp` on the host: t is copied to
        the CPU (one sync per call) and each new time costs O(n^3) extended-precision operations (~ms; times seen
        before are cached), so per-sample training times at such orders are host-bound.
        """
        t = as_time(t, "t")
        return self.transition(t)[..., :, :1].contiguous(), self.chol(t).contiguous()

    def perturb(self, x0: torch.Tensor, t: torch.Tensor, *, seed=None, step: int = 0, noise=None, backend=None):
        """Training perturbation z_t = E(t)(x0, 0, ..., 0) + L_t eps with per-sample t, through ``hold_perturb``.

        x0: (B, C, ...) data; t: (B,) forward times on x0's device. Returns (z_t (B, n*C, ...), eps_n (B, C, ...)),
        eps_n being the regression target of the network output eps_hat. eps is Philox noise keyed by ``seed`` (an
        int, or an int64 tensor (1,) or (B,)) at counter ``step``; seed None draws one from torch's global CPU
        generator, so each call of a training loop gets fresh noise (a fixed default would repeat the same eps every
        batch); ``noise``: explicit eps (B, n*C, ...) instead.
        """
        from diffkern.ops.hold import hold_perturb
        from diffkern.sampler_loop import seed_value

        if isinstance(x0, torch.Tensor) and (not isinstance(t, torch.Tensor) or t.shape != (x0.shape[0],)
                                              or t.device != x0.device):
            got = f"shape {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"t: expected a tensor of shape ({x0.shape[0]},) (one time per sample) on {x0.device}, got {got}")
        if noise is None and isinstance(x0, torch.Tensor):
            seed = seed_value(seed, x0.shape[0])  # validated; None: drawn on the host
            if not isinstance(seed, torch.Tensor):
                seed = torch.tensor([seed], dtype=torch.int64, device=x0.device)
        mean_mat, lt = self.perturb_matrices(t)
        eps_n = torch.empty_like(x0)
        z = hold_perturb(x0, mean_mat, lt, seed=seed, step=step, noise=noise, eps_out=eps_n, backend=backend)
        return z, eps_n
