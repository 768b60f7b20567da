"""Parameters and time arguments of :class:`diffkern.hold.HOLD`: the critically-damped coefficients, the drift matrix
and the process's other constant matrices (:func:`process_matrices`), and the checks of its numbers and times (host
side; a time tensor is read only where the extended path reads it)."""
from __future__ import annotations

import math
import numbers

import torch

_F64 = torch.float64


def finite(name: str, v, *, low: float = 0.0, strict: bool = False) -> float:
    """``v`` as a Python float, raising unless it is a real number >= ``low`` (> with ``strict``) and finite."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):  # numpy scalars too (returned as a Python float)
        raise TypeError(f"{name}: expected a real number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v) or v < low or (strict and v == low):
        raise ValueError(f"{name}: expected a finite value {'>' if strict else '>='} {low}, got {v}")
    return v


def beta_pair(beta) -> tuple:
    """beta as (beta0, beta1): a number is constant, a pair is beta0 + beta1 t. Numbers come back as Python floats
    (HOLD.from_cld scales them: np.float32 arithmetic would stay float32); anything else is left to the checks."""
    if isinstance(beta, numbers.Real) and not isinstance(beta, bool):
        return float(beta), 0.0
    if not isinstance(beta, (tuple, list)) or len(beta) != 2:
        raise ValueError(f"beta: expected a number or a pair (beta0, beta1), got {beta!r}")
    return tuple(float(b) if isinstance(b, numbers.Real) and not isinstance(b, bool) else b for b in beta)


def critical_damping(order: int, rate: float | None = None) -> tuple[float, float, list[float]]:
    """(r, xi, [gamma_1, ..., gamma_{n-1}]) of the critically-damped order-n process.

    ``rate`` defaults to the authors' normalisation r = sqrt(2n - 3) (gamma_1 = 1), r = 1 for n = 1;
    another r is the same process with time scaled by r / sqrt(2n - 3).
    """
    if isinstance(order, bool) or not isinstance(order, numbers.Integral):  # numpy ints too
        raise TypeError(f"order: expected a Python int >= 1, got {type(order).__name__}")
    if order < 1:
        raise ValueError(f"order: expected an int >= 1, got {order}")
    n = int(order)
    r = finite("rate", rate, strict=True) if rate is not None else (math.sqrt(2 * n - 3) if n > 1 else 1.0)
    gammas = [r * math.sqrt(j * (2 * n - j) / ((2 * n - 2 * j - 1) * (2 * n - 2 * j + 1))) for j in range(1, n)]
    return r, n * r, gammas


def drift_matrix(gammas: list[float], xi: float) -> torch.Tensor:
    """F (n x n float64): skew-symmetric tridiagonal couplings plus friction -xi on the last component."""
    n = len(gammas) + 1
    F = torch.zeros(n, n, dtype=_F64)
    for i, g in enumerate(gammas):
        F[i, i + 1], F[i + 1, i] = g, -g
    F[n - 1, n - 1] = -xi
    return F



def _gram_coefs(npow: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """C_m = sum_{j+k=m} (N^j g / j!)(N^k g / k!)^T, m = 0..2n-2; shape (2n-1, n, n)."""
    n = npow.shape[0]
    vecs = npow @ g  # (n, n): row j is N^j g / j!
    cm = torch.zeros(2 * n - 1, n, n, dtype=_F64)
    for j in range(n):
        for k in range(n):
            cm[j + k] += torch.outer(vecs[j], vecs[k])
    return cm


def process_matrices(gammas: list[float], xi: float, r: float, L: float) -> tuple[torch.Tensor, ...]:
    """The constant float64 matrices of the process: (F, G, N = F + r I) (n, n), the series terms N^k / k! (n, n, n)
    and the Gramian coefficients :func:`_gram_coefs` of E and of E^T (2n-1, n, n)."""
    n = len(gammas) + 1
    F = drift_matrix(gammas, xi)  # (n, n)
    G = torch.zeros(n, n, dtype=_F64)
    G[n - 1, n - 1] = math.sqrt(2 * xi / L)
    N = F + r * torch.eye(n, dtype=_F64)
    npow = torch.stack([torch.linalg.matrix_power(N, k) / float(math.factorial(k)) for k in range(n)])
    g = G[:, n - 1]
    return F, G, N, npow, _gram_coefs(npow, g), _gram_coefs(npow.transpose(-1, -2), g)

def as_time(v, name: str) -> torch.Tensor:
    """The time argument ``name`` (a forward time t or an integrated time b) as float64: a number must be finite and
    >= 0; a tensor must be real and is not read (no host sync), so keeps its device and shape."""
    if isinstance(v, torch.Tensor):
        if v.dtype == torch.bool or v.is_complex():
            raise TypeError(f"{name}: expected a real tensor, got dtype {v.dtype}")
        return v.to(_F64)
    # numpy scalars read as their value; numpy bools (as bools) and arrays of several values are refused
    if isinstance(v, (bool, str)) or not hasattr(v, "__float__") or getattr(v, "dtype", None) == bool \
            or getattr(v, "size", 1) != 1:
        raise TypeError(f"{name}: expected a real number or a tensor, got {type(v).__name__}")
    x = float(v)
    if not math.isfinite(x) or x < 0:
        raise ValueError(f"{name}: expected a finite time >= 0, got {x}")
    return torch.tensor(x, dtype=_F64)


def check_host_times(v: torch.Tensor, name: str, order: int) -> None:
    """Raise unless the times ``v`` (a float64 tensor of any shape, argument ``name``) are >= 0, not NaN and, with grad
    mode on, without autograd history. For the extended path of an order-``order`` process, which reads its times on
    the host anyway (one sync for a device tensor) and returns host constants: a gradient would be dropped silently."""
    if v.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name}: expected times without autograd history (order n = {order} computes this in "
                         f"extended precision on the host, not differentiably); pass {name}.detach()")
    d = v.detach()
    bad = d[(d < 0) | d.isnan()]
    if bad.numel():
        raise ValueError(f"{name}: expected finite times >= 0, got {bad.reshape(-1)[0].item()} (order n = {order} "
                         f"reads them on the host for its extended-precision path)")
