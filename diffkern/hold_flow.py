"""The HOLD analogue of DDIM, sampler ``"ode_flow"``: freeze the x0 prediction over a step and move z by the
exact probability-flow map of the conditional Gaussian p_t(z | x0) = N(m_t, Sigma_t), m_t = E(t)(x0, 0, ..., 0).

The probability-flow ODE of that Gaussian path is affine, dz/dt = m' + beta (F + 1/2 G G^T Sigma^{-1})(z - m), so
one step is z_next = m_next + A (z - m_cur) with A = S_next S_cur^{-1} for any square root path S S^T = Sigma
solving dS/dt = beta (F + 1/2 G G^T Sigma^{-1}) S. In whitened coordinates y = L^{-1}(z - m) (L = L_t the
Cholesky factor) the flow is a rotation, dy/dt = beta W y with W = -L^{-1}L'/beta + L^{-1} F L
+ 1/2 L^{-1} G G^T L^{-T} skew-symmetric (W + W^T = L^{-1}(Sigma'/beta - F Sigma - Sigma F^T - G G^T) L^{-T} = 0
by Lyapunov). L^{-1}L' is lower triangular and L^{-1} G G^T L^{-T} = (2 xi / L) / L_nn^2 E_nn is diagonal, so
W's strict upper triangle is that of U = L^{-1} F L and

    W = triu(U, 1) - triu(U, 1)^T,        A = L_next R L_cur^{-1},   dR/db = W(b) R,   R(b_cur) = I,

which needs neither L' nor G, and depends on the times only through b = int beta (beta(t) reparametrises).
L is the jittered factor chol(Sigma_t + delta I) of the network convention: Sigma_t + delta I is exactly the
conditional covariance of the same process with G G^T scaled by 1 + delta L from Sigma_0 + delta I, and W does
not involve G, so A is the exact probability-flow map of the Gaussian path the network was trained on
(delta = 0: of the HSM/DSM process itself).

R is integrated by the sixth-order Magnus method (three Gauss-Legendre nodes) over substeps uniform in log b
(W ~ b^{-1/2} under HSM, b^{-1} under DSM without jitter: smooth in log b), doubling the substeps of each step
until two levels agree to ``tol``. The final denoising row flows from t_min to t = 0 in the variable sqrt(b)
(W b^{1/2} stays bounded there), the DDIM last step: its x output is the x0 prediction (plus sqrt(delta) times a
whitened component when delta > 0), the velocities keep the flow.

With x0_hat = w_z . z + w_eps eps_hat (:meth:`HOLD.x0_coefficients`) and c(b) = E(b) e_1 the step is
z_next = K z + k eps_hat with K = A + g w_z^T, k = w_eps g, g = c_next - A c_cur, and no noise (C = 0).
"""
from __future__ import annotations

import math

import torch

from .hold import HOLD, chol_psd, chol_rows
from .ops.hold import F64_MAX_ORDER, f64_factor_orders

_F64 = torch.float64
_GL = (0.5 - math.sqrt(15) / 10, 0.5, 0.5 + math.sqrt(15) / 10)  # Gauss-Legendre nodes on [0, 1]
MAX_SUBSTEPS = 1 << 12


def chol_b(proc: HOLD, b: torch.Tensor) -> torch.Tensor:
    """L = chol(Sigma + delta I) at integrated time b (...) float64 -> (..., n, n); equals ``proc.chol(t)`` at b(t).

    Refused above the order whose float64 L_t diffkern trusts (``ops.hold.f64_factor_orders``: F64_MAX_ORDER = 11
    for HSM with the default jitter, less for DSM or delta < 1e-9): the flow needs W(b) at thousands of times (every
    Magnus node), the float64 factor loses its digits there and the extended-precision one (:mod:`diffkern.hold_mp`)
    costs milliseconds per time.
    """
    limit = f64_factor_orders(proc.hsm, proc.delta)[0]
    if proc.order > limit:
        raise ValueError(f"proc: the 'ode_flow' flow map supports orders n <= {limit} for hsm={proc.hsm}, "
                         f"delta={proc.delta:g} (F64_MAX_ORDER = {F64_MAX_ORDER} for HSM with delta >= 1e-9), got "
                         f"order n = {proc.order} (its float64 Cholesky factors lose their digits above; use 'sscs', "
                         f"'em', 'ode' or 'ode_exp')")
    E, Lq = proc.transition_b(b), chol_psd(proc.gramian_b(b))
    jit = math.sqrt(proc.delta) * torch.eye(proc.order, dtype=_F64, device=b.device)
    return chol_rows(torch.cat([E @ proc.cov0(b.device).sqrt(), Lq, jit.expand_as(Lq)], dim=-1))


def generator(proc: HOLD, b: torch.Tensor) -> torch.Tensor:
    """The whitened flow's skew generator W(b) = triu(U, 1) - triu(U, 1)^T, U = L^{-1} F L; b (...) -> (..., n, n)."""
    Lb = chol_b(proc, b)
    U = torch.linalg.solve_triangular(Lb, proc.F.to(b.device) @ Lb, upper=False).triu(1)
    return U - U.transpose(-1, -2)


def _magnus6(proc: HOLD, u0: torch.Tensor, u1: torch.Tensor, m: int, sqrt_var: bool):
    """Propagator (S, n, n) of dR/du = W(b(u)) b'(u) R from u0 to u1 (S,) in m equal substeps, Magnus order 6,
    and the largest substep angle |h f(midpoint)| (S,) (Frobenius norm).

    u = log b (b = e^u), or u = sqrt(b) (b = u^2) with ``sqrt_var``; Omega = a1 + a3/12
    + [-20 a1 - a3 + C1, a2 + C2]/240, C1 = [a1, a2], C2 = -[a1, 2 a3 + C1]/60 (Blanes, Casas, Oteo, Ros 2009).
    """
    h = (u1 - u0) / m  # (S,)
    j = torch.arange(m, dtype=_F64)
    nodes = torch.stack([u0[:, None] + (j + c) * h[:, None] for c in _GL], -1)  # (S, m, 3)
    b = nodes**2 if sqrt_var else nodes.exp()
    f = generator(proc, b) * (2 * nodes if sqrt_var else b)[..., None, None]  # (S, m, 3, n, n)
    hh = h[:, None, None, None]
    a1 = hh * f[:, :, 1]
    a2 = hh * (math.sqrt(15) / 3) * (f[:, :, 2] - f[:, :, 0])
    a3 = hh * (10 / 3) * (f[:, :, 2] - 2 * f[:, :, 1] + f[:, :, 0])

    def com(x, y):
        return x @ y - y @ x

    c1 = com(a1, a2)
    c2 = com(a1, 2 * a3 + c1) / -60
    expo = torch.linalg.matrix_exp(a1 + a3 / 12 + com(-20 * a1 - a3 + c1, a2 + c2) / 240)  # (S, m, n, n)
    while expo.shape[1] > 1:  # R = e_{m-1} ... e_1 e_0 as a pairwise tree (m is a power of 2): log2(m) launches
        expo = expo[:, 1::2] @ expo[:, 0::2]
    return expo[:, 0], torch.linalg.matrix_norm(a1).amax(-1)


def _adaptive(proc: HOLD, u0: torch.Tensor, u1: torch.Tensor, sqrt_var: bool, tol: float) -> torch.Tensor:
    """Propagators (S, n, n) from u0 to u1 (S,): substeps double until two levels agree (see :func:`rotation`)."""
    out = torch.empty(u0.numel(), proc.order, proc.order, dtype=_F64)
    idx, prev, last, m = torch.arange(u0.numel()), None, None, 1
    while idx.numel():
        R, angle = _magnus6(proc, u0[idx], u1[idx], m, sqrt_var)
        if prev is not None:
            diff = (R - prev).abs().amax((-1, -2))
            done = diff <= tol
            if last is not None:
                done |= (diff > last / 8) & (angle <= 0.5)
            out[idx[done]] = R[done]
            idx, R, last = idx[~done], R[~done], diff[~done]
        if idx.numel() and 2 * m > MAX_SUBSTEPS:
            raise ValueError(f"tol: the flow rotation did not converge to {tol} with {MAX_SUBSTEPS} substeps "
                             f"(u = {u0[idx].tolist()} -> {u1[idx].tolist()})")
        prev, m = R, 2 * m
    return out


def rotation(proc: HOLD, b_cur: torch.Tensor, b_next: torch.Tensor, *, tol: float = 1e-12,
             piece: float = 0.25) -> torch.Tensor:
    """The whitened flow's rotation R (N, n, n) float64 from b_cur to b_next (N,) (float64, CPU, b_cur > b_next >= 0).

    A step is cut into pieces of length <= ``piece`` in b (W is O(1) at large b, up to 18 rad per unit b at
    n = 8), each integrated in log b (b^{1/2} W stays bounded as b -> 0), or in sqrt(b) for a piece ending at
    b = 0. Each piece's substeps double until two levels differ by <= ``tol`` (max entry), so the result (the
    finer level; Magnus 6: about tol / 60 from the exact R) is orthogonal to rounding. A piece also stops once
    the difference no longer falls 8x per doubling while every substep angle is <= 1/2 (sixth order gives 64x:
    the rest is the rounding of W, whose inputs E and Sigma carry ~1e-10 at n = 8, see ``hold.py``).
    Raises ValueError if a piece needs > MAX_SUBSTEPS substeps.
    """
    N, n = b_cur.numel(), proc.order
    cuts = ((b_cur - b_next) / piece).ceil().long().clamp(min=1)  # pieces per step
    owner = torch.repeat_interleave(torch.arange(N), cuts)
    j = torch.arange(owner.numel()) - torch.repeat_interleave(cuts.cumsum(0) - cuts, cuts)  # piece index in its step
    frac = (b_cur - b_next)[owner] / cuts[owner]
    p0 = b_cur[owner] - j * frac
    p1 = torch.where(j + 1 == cuts[owner], b_next[owner], p0 - frac)
    R = torch.empty(owner.numel(), n, n, dtype=_F64)
    at0 = p1 == 0
    for kind in (False, True):  # the two variables: separate batches
        sel = (at0 == kind).nonzero()[:, 0]
        if sel.numel():
            u0 = p0[sel].sqrt() if kind else p0[sel].log()
            u1 = p1[sel] if kind else p1[sel].log()
            R[sel] = _adaptive(proc, u0, u1, kind, tol)
    out = torch.eye(n, dtype=_F64).repeat(N, 1, 1)
    for i in range(int(cuts.max())):  # pieces in time order: out <- R_piece out
        sel = (j == i).nonzero()[:, 0]
        out[owner[sel]] = R[sel] @ out[owner[sel]]
    return out


def flow_map(proc: HOLD, b_cur: torch.Tensor, b_next: torch.Tensor, *, tol: float = 1e-12) -> torch.Tensor:
    """A = L_next R L_cur^{-1} (N, n, n) float64: z - m_cur -> z_next - m_next under the conditional flow; b (N,)."""
    L_cur, L_next = chol_b(proc, b_cur), chol_b(proc, b_next)
    if not (torch.diagonal(L_cur, dim1=-2, dim2=-1) > 0).all():
        raise ValueError(f"b_cur: Sigma + delta I is singular to float64 precision at b = {b_cur.tolist()} "
                         f"(raise t_min or delta = {proc.delta})")
    R = rotation(proc, b_cur, b_next, tol=tol)
    # L_cur^{-1} by a triangular solve: A^T = L_cur^{-T} (L_next R)^T
    return torch.linalg.solve_triangular(L_cur.transpose(-1, -2), (L_next @ R).transpose(-1, -2),
                                         upper=True).transpose(-1, -2)


def first_column(proc: HOLD, b: torch.Tensor) -> torch.Tensor:
    """c(b) = E(b) e_1 (N, n) float64 at host times b (N,): where r b > 8 the extended path's correctly rounded column,
    as for the x0 weights it meets in K and k (``HOLD._far``; one cache entry serves both at b_cur). Float64's falls
    like e^{-r b} b^(n-1) and keeps less of it: g = c_next - A c_cur was off by 1.2e-12 of max |g| at n = 11 on the
    default first step (b = 5), 1.5e-9 at b = 10.1 (beta = (0.1, 20), T = 1), 3.9e-12 at n = 6; 2e-16 now (vs mpmath,
    same A)."""
    return proc._far(b, "E", proc.transition_b(b))[:, :, 0]


def flow_rows(proc: HOLD, grid: torch.Tensor, *, denoise: bool = True, tol: float = 1e-12):
    """(K (N [+1], n, n), k (N [+1], n)) float64 of ``"ode_flow"`` on the forward-time grid (N + 1,) float64 (CPU).

    Row i: the x0 prediction at s_i frozen, the conditional flow from s_i to s_{i+1}; with ``denoise`` one more
    row from s_N = t_min to t = 0 (its network call is at t_min, like the other samplers' denoising step).
    """
    t_cur = grid[:-1]
    t_next = torch.cat([grid[1:], grid.new_zeros(1)]) if denoise else grid[1:]
    if denoise:
        t_cur = torch.cat([t_cur, grid[-1:]])
    b_cur, b_next = proc.int_beta(t_cur), proc.int_beta(t_next)
    A = flow_map(proc, b_cur, b_next, tol=tol)
    w_z, w_e = proc.x0_coefficients(t_cur)  # (N, n), (N,): x0_hat = w_z . z + w_e eps_hat
    g = first_column(proc, b_next) - (A @ first_column(proc, b_cur)[:, :, None])[:, :, 0]
    K = A + g[:, :, None] * w_z[:, None, :]
    k = g * w_e[:, None]
    if not (torch.isfinite(K).all() and torch.isfinite(k).all()):
        raise ValueError(f"grid: the flow map is singular on {grid.tolist()} (Sigma_t + delta I not positive "
                         f"definite at some step: raise t_min or delta = {proc.delta})")
    return K, k
