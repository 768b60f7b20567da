"""Linear algebra and state layout of :mod:`diffkern.hold`: batched sync-free Cholesky factors (of a PSD matrix and
of a square root M M^T), the batch-invariant matrix product of the closed forms, and the CLD <-> HOLD state maps."""
from __future__ import annotations

import math

import torch


def _mm(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """A @ B for (..., n, n) by a broadcast sum: BLAS's batched and single products round differently, and a
    time's law must not depend on the batch it is computed in (bitwise)."""
    return (A[..., :, :, None] * B[..., None, :, :]).sum(-2)


def chol_psd(S: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of symmetric PSD ``S`` (..., n, n), batched, without a host sync.

    Non-positive pivots (a rank-deficient S, e.g. Sigma_0 at t = 0 without jitter) give a zero column
    instead of NaN; otherwise this is the textbook Cholesky-Banachiewicz recursion.
    """
    n = S.shape[-1]
    cols = []  # column j of L, (..., n): built out of place, so autograd can differentiate through S
    for j in range(n):
        prev = torch.stack(cols, -1) if cols else S[..., :, :0]  # L[..., :, :j]
        piv = S[..., j, j] - (prev[..., j, :] ** 2).sum(-1)
        d = torch.sqrt(piv.clamp(min=0.0))
        num = S[..., j + 1:, j] - (prev[..., j + 1:, :] * prev[..., j:j + 1, :]).sum(-1)
        safe = torch.where(d > 0, d, torch.ones_like(d))
        below = torch.where(d[..., None] > 0, num / safe[..., None], 0.0)
        cols.append(torch.cat([torch.zeros_like(S[..., :j, j]), d[..., None], below], -1))
    return torch.stack(cols, -1) if cols else torch.zeros_like(S)


def chol_rows(M: torch.Tensor) -> torch.Tensor:
    """Lower-triangular L (..., n, n), non-negative diagonal, with L L^T = M M^T for M (..., n, k); batched, no sync.

    Gram-Schmidt on the rows of M (each orthogonalised twice, so the factor is as accurate as Householder QR's):
    L[i, j] = <m_i, q_j>, L[i, i] = |residual of m_i|. Working on the square root M instead of forming M M^T
    squares nothing: for HSM at small t, Sigma_t = M M^T is singular to float64 precision (``math-hold.md``
    3.3), so its Cholesky loses every digit of L_t[n, n] (n = 5, t = 1e-3: off by 5x; n >= 4: 0 at some t),
    while this factor stays accurate to the rounding of M. A zero residual gives a zero column, never NaN.
    M: a floating tensor (float64 for HOLD's factors); L has its dtype and device.
    """
    if not isinstance(M, torch.Tensor) or not M.is_floating_point() or M.dim() < 2:
        got = f"{M.dtype} of shape {tuple(M.shape)}" if isinstance(M, torch.Tensor) else type(M).__name__
        raise ValueError(f"M: expected a floating tensor of shape (..., n, k), got {got}")
    n = M.shape[-2]
    Lc = M.new_zeros(*M.shape[:-1], n)
    qs = []
    for i in range(n):
        r = M[..., i, :]
        for _ in range(2):
            for j, q in enumerate(qs):
                c = (r * q).sum(-1)
                r = r - c[..., None] * q
                Lc[..., i, j] += c
        d = torch.linalg.vector_norm(r, dim=-1)
        Lc[..., i, i] = d
        qs.append(torch.where(d[..., None] > 0, r / torch.where(d > 0, d, torch.ones_like(d))[..., None], 0.0))
    return Lc


def split_components(z: torch.Tensor, n: int) -> list[torch.Tensor]:
    """The n components of a state (B, n*C, ...) as views (B, C, ...), component-major along dim 1."""
    if z.dim() < 2 or z.shape[1] % n:
        raise ValueError(f"z: expected a state (B, n*C, ...) with n = {n}, got shape {tuple(z.shape)}")
    return list(torch.chunk(z, n, dim=1)) if z.shape[1] else [z] * n


def cld_to_hold_state(z: torch.Tensor, m_inv: float) -> torch.Tensor:
    """CLD state (x, v) (B, 2C, ...) -> HOLD n = 2 state (x, v / sqrt(M)) = (x, v sqrt(m_inv))."""
    x, v = split_components(z, 2)
    return torch.cat([x, v * math.sqrt(m_inv)], dim=1)


def hold_to_cld_state(z: torch.Tensor, m_inv: float) -> torch.Tensor:
    """Inverse of :func:`cld_to_hold_state`."""
    x, v = split_components(z, 2)
    return torch.cat([x, v / math.sqrt(m_inv)], dim=1)
