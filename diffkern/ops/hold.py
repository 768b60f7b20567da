"""HOLD fused ops (``math-hold.md`` 6, 9): the per-step transition and the forward perturbation.

State layout: (B, n*C, *rest), component-major along dim 1: component k of data element (b, c, *r)
sits at channel k*C + c. An element's n components are read once and written once.

``hold_transition``: ``z <- K z + k * eps_hat + C * eta`` per element, with K, C (n x n, C lower
triangular) and k (n) read from row ``step`` of a float64 device table
``coef`` of shape (N, n, 2n+1): ``coef[i, :, :n] = K_i``, ``coef[i, :, n] = k_i``,
``coef[i, :, n+1:] = C_i`` (build it with :func:`transition_table`). eps_hat is the network output
(B, C, *rest).

``hold_perturb``: ``z_t = M z0 + L_t eps`` per element with per-sample float64 matrices
M (B, n, m) (m = 1: z0 = x0 only, the HSM case; m = n: a full initial state) and L_t (B, n, n) lower
triangular; optionally writes eps_n (the network's regression target) to ``eps_out`` (B, C, *rest).

Noise (both ops): eta / eps is the counter-based normal of :mod:`diffkern.ops.philox` at the flat
index of the OUTPUT STATE entry it perturbs, i.e. eta_k of element (b, c, *r) is the normal at the
index of state entry (b, k*C + c, *r) (within the sample under per-sample seeds), at counter
``step``: exactly ``philox.noise_like(z, seed, step)``. A column j of C that is all zero makes eta_j
irrelevant, so kernels may skip drawing it (EM needs 1 normal per element, not n).

Math runs in float32 for float16/bfloat16/float32 states and in float64 for float64 states; the
tables are cast to that compute dtype. Backends: reference (here), cpp (``csrc/cpu/hold.cpp``),
triton (``kernels/hold.py``), cuda (``csrc/cuda/hold.cu``).
"""
from __future__ import annotations

import math
import numbers

import torch

from . import _checks, _lib, philox
from .registry import BACKENDS, OpSpec, register, resolve

MAX_ORDER = 8  # kernels unroll over n; n <= 8 covers every published HOLD order (CIFAR-10 up to n = 6)
# The reference backend runs any order n >= 1 (the ops are affine maps; nothing in them loses precision with n).
# F64_MAX_ORDER is where diffkern.hold's float64 host maths stops: E(t), Sigma_t and Q_A stay within 1e-13
# (normalized, vs 200 digits) up to n = 20, but their Cholesky factors (L_t, the SSCS noise factor chol Q_A) fall
# off a cliff after n = 11 (HSM, delta = 1e-9; earlier without jitter, under DSM and for Q_A): normalized L L^T
# error 4e-14 at n = 11, 2e-2 at n = 12 (the conditional covariances' correlations approach +-1 faster than float64
# resolves), L_t[n, n] 2e-9 -> 0.2. Above it diffkern.hold_mp computes the same closed forms and factors in extended
# precision and rounds them to float64. Up to it, the factors float64 cannot carry for a given (hsm, delta) come from
# there too: see f64_factor_orders.
F64_MAX_ORDER = 11


def f64_factor_orders(hsm: bool, delta: float) -> tuple[int, int]:
    """(highest order whose float64 L_t and x0 weights, highest order whose float64 chol Q_A) diffkern.hold trusts.

    Measured against the extended path on b in [1e-6, 10] (relative error of L_t[n, n]; L_t per row scale and the x0
    weight w_eps, b <= 4, are alike): without a jitter the small-b correlation matrix of Q is Hilbert-like (condition
    ~34^n), so DSM's L_t[n, n] is off by 4e-12 at n = 4, 1.3e-10 at n = 5, 4e-2 at n = 11, and HSM's by 4e-11 at n = 8,
    3e-10 at n = 9; a jitter 0 < delta < 1e-9 does no worse. delta >= 1e-9 bounds the conditioning: L_t to 2e-11 at
    n = 11, w_eps 6e-12 (HSM) but 2e-10 from n = 8 (DSM). chol Q_A does not depend on Sigma_0 or delta: 1e-11 at n = 5,
    6e-10 at n = 6, 1e-2 at n = 11. Above these orders HOLD computes those factors in extended precision (host sync).
    """
    if delta >= 1e-9:
        return (F64_MAX_ORDER if hsm else 7), 5
    return (8 if hsm else 4), 5


#----------------------------------------------------------------------------
# Table layout.


def transition_table(K: torch.Tensor, k: torch.Tensor, C: torch.Tensor, device=None) -> torch.Tensor:
    """Pack per-step K (N, n, n), k (N, n), C (N, n, n, lower) into a validated float64 (N, n, 2n+1) table."""
    K, k, C = (torch.as_tensor(a, dtype=torch.float64) for a in (K, k, C))
    if K.dim() != 3 or K.shape[1] != K.shape[2]:
        raise ValueError(f"K: expected shape (N, n, n), got {tuple(K.shape)}")
    N, n = K.shape[0], K.shape[1]
    if k.shape != (N, n):
        raise ValueError(f"k: expected shape ({N}, {n}), got {tuple(k.shape)}")
    if C.shape != (N, n, n):
        raise ValueError(f"C: expected shape ({N}, {n}, {n}), got {tuple(C.shape)}")
    t = torch.cat([K, k[..., None], C], dim=-1).contiguous()
    validate_table(t)
    return t.to(device) if device is not None else t


def validate_table(coef: torch.Tensor, name: str = "coef") -> int:
    """Raise unless ``coef`` is a finite float64 (N, n, 2n+1) table, n >= 1, C lower triangular.

    Reads values only for CPU tables (device tables are validated when built: no sync). Returns n.
    """
    n = table_order(coef, name)
    if coef.device.type == "cpu":
        if not torch.isfinite(coef).all():
            bad = (~torch.isfinite(coef)).nonzero()[0].tolist()
            raise ValueError(f"{name}: non-finite entry at {bad}")
        upper = torch.triu(coef[..., n + 1:], diagonal=1)
        if (upper != 0).any():
            raise ValueError(f"{name}: the noise factor C = {name}[..., {n + 1}:] must be lower triangular")
    return n


def table_order(coef, name: str = "coef") -> int:
    """n of a (N, n, 2n+1) float64 table (shape and dtype checks only)."""
    _checks.tensor(coef, name)
    if coef.dim() != 3 or coef.shape[2] != 2 * coef.shape[1] + 1:
        raise ValueError(f"{name}: expected shape (N, n, 2n+1), got {tuple(coef.shape)}")
    if coef.dtype != torch.float64:
        raise TypeError(f"{name}: expected dtype torch.float64, got {coef.dtype}")
    n = coef.shape[1]
    if n < 1:
        raise ValueError(f"{name}: order n = {n} is outside the supported n >= 1")
    return n


def _launcher(op: str, device_type: str, backend, n: int):
    """The launcher of ``op`` for order n. The fused backends unroll over n up to MAX_ORDER, so above it only
    reference runs: a named fused backend raises, ``auto`` picks reference and warns once (the registry's rules)."""
    excluded = {} if n <= MAX_ORDER else {
        name: f"runs op {op!r} only up to order n = MAX_ORDER = {MAX_ORDER} (its kernels unroll over n), got order "
              f"n = {n}; the 'reference' backend runs every order"
        for name in BACKENDS if name != "reference"}
    return resolve(op, device_type, backend, excluded, stacklevel=4)[1]  # warns from the op's caller


#----------------------------------------------------------------------------
# References: pure PyTorch, any device; float64 inputs give the test oracle.


def _cdt(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _affine(mat, comps, acc=None):
    """acc + sum_j mat[..., i, j] * comps[j] for each row i, accumulated left to right (the kernels' order).

    mat: (B|1, n, m) compute-dtype tensor; comps: m tensors (B, P). Returns n tensors (B, P).
    """
    rows = []
    for i in range(mat.shape[1]):
        a = acc[i] if acc is not None else None
        for j, c in enumerate(comps):
            term = mat[:, i, j, None] * c
            a = term if a is None else a + term
        rows.append(a)
    return rows


def _noise_terms(C, eta, acc):
    """acc_i + C[i, j] eta_j for j <= i, left to right; a column of C that is all zero adds nothing."""
    out = []
    for i in range(len(acc)):
        a = acc[i]
        for j in range(i + 1):
            used = (C[:, :, j] != 0).any(dim=1, keepdim=True)  # (B|1, 1): column j drawn at all
            a = a + torch.where(used, C[:, i, j, None] * eta[j], 0.0)
        out.append(a)
    return out


def hold_transition_reference(z, eps_hat, coef, step, *, noise=None, seed=None):
    """``K z + k eps_hat + C eta`` (row ``step`` of ``coef``) in z's dtype; reads the row on the device.

    Per element and output component i, in this order (compute dtype, each op rounded):
    ``acc = K[i,0] z_0 + ... + K[i,n-1] z_{n-1};  acc += k_i eps_hat;  acc += C[i,j] eta_j, j = 0..i``.
    """
    cdt = _cdt(z)
    n, B = coef.shape[1], z.shape[0]
    row = coef[step].to(cdt)[None]  # (1, n, 2n+1)
    P = math.prod(z.shape[1:]) // n
    zs = z.to(cdt).reshape(B, n, P).unbind(1)  # n x (B, P)
    eta = (noise.to(cdt) if noise is not None else philox.noise_like(z, seed, step, cdt)).reshape(B, n, P).unbind(1)
    e = eps_hat.to(cdt).reshape(B, P)
    acc = _affine(row[:, :, :n], zs)
    acc = [a + row[:, i, n, None] * e for i, a in enumerate(acc)]
    out = _noise_terms(row[:, :, n + 1:], eta, acc)
    return torch.stack(out, 1).reshape(z.shape).to(z.dtype)


def hold_perturb_reference(z0, mean_mat, chol, n_channels, *, noise=None, seed=None, step=0):
    """``(M z0 + L eps, eps_n)`` per sample; returns the state (B, n_channels, *rest) and eps_n (B, C, *rest).

    Order per element and component i: ``acc = M[i,0] z0_0 + ... ;  acc += L[i,j] eps_j, j = 0..i``.
    """
    cdt = _cdt(z0)
    B, n, m = mean_mat.shape
    shape = (B, n_channels, *z0.shape[2:])
    P = math.prod(z0.shape[1:]) // m
    zs = z0.to(cdt).reshape(B, m, P).unbind(1)
    if noise is not None:
        eps = noise.to(cdt)
    else:
        eps = philox.noise_like(torch.empty(shape, dtype=z0.dtype, device=z0.device), seed, step, cdt)
    eps = eps.reshape(B, n, P).unbind(1)
    acc = _affine(mean_mat.to(cdt), zs)
    Lc = chol.to(cdt)
    out = []
    for i in range(n):
        a = acc[i]
        for j in range(i + 1):
            a = a + Lc[:, i, j, None] * eps[j]
        out.append(a)
    eps_n = eps[n - 1].reshape(B, n_channels // n, *z0.shape[2:])
    return torch.stack(out, 1).reshape(shape).to(z0.dtype), eps_n.to(z0.dtype)


def _launch_transition_reference(z, eps_hat, noise, coef, step, seed, out):
    out.copy_(hold_transition_reference(z, eps_hat, coef, step, noise=noise, seed=seed))


def _launch_perturb_reference(z0, mean_mat, chol, noise, step, seed, out, eps_out):
    res, eps_n = hold_perturb_reference(z0, mean_mat, chol, out.shape[1], noise=noise, seed=seed, step=step)
    if eps_out is not None:
        eps_out.copy_(eps_n)
    out.copy_(res)

#----------------------------------------------------------------------------
# Fakes (shape checks only) for torch.compile and opcheck.


def _fake_transition(z, eps_hat, noise, coef, step, seed, out):
    torch._check(out.shape == z.shape, lambda: "out: shape must match z")
    torch._check(coef.dim() == 3 and coef.shape[2] == 2 * coef.shape[1] + 1, lambda: "coef: expected (N, n, 2n+1)")


def _fake_perturb(z0, mean_mat, chol, noise, step, seed, out, eps_out):
    torch._check(mean_mat.dim() == 3 and chol.dim() == 3, lambda: "mean_mat, chol: expected (B, n, m), (B, n, n)")
    torch._check(out.shape[0] == z0.shape[0], lambda: "out: batch must match z0")


_lib.register_fake("hold_transition", _fake_transition)
_lib.register_fake("hold_perturb", _fake_perturb)

#----------------------------------------------------------------------------
# Registry entries.


def _load_triton(name):
    def load():
        from diffkern.kernels import hold as k
        return _lib.triton_op(name, getattr(k, name + "_launch"))
    return load


TRANSITION_SPEC = register(OpSpec("hold_transition", {
    "reference": lambda: _launch_transition_reference, "cpp": lambda: torch.ops.diffkern.hold_transition,
    "cuda": lambda: torch.ops.diffkern.hold_transition, "triton": _load_triton("hold_transition")}))
PERTURB_SPEC = register(OpSpec("hold_perturb", {
    "reference": lambda: _launch_perturb_reference, "cpp": lambda: torch.ops.diffkern.hold_perturb,
    "cuda": lambda: torch.ops.diffkern.hold_perturb, "triton": _load_triton("hold_perturb")}))

#----------------------------------------------------------------------------
# Public front-ends.


def _state_channels(z, name: str, n: int) -> int:
    if z.dim() < 2:
        raise ValueError(f"{name}: expected a state (B, n*C, ...) with at least 2 dims, got shape {tuple(z.shape)}")
    if z.shape[1] % n:
        raise ValueError(f"{name}: channel count {z.shape[1]} is not a multiple of the order n = {n} "
                         f"(layout (B, n*C, ...), component-major)")
    return z.shape[1] // n


def _data_like(t, name: str, z, C: int, *, dtype: bool):
    _checks.float_tensor(t, name)
    want = (z.shape[0], C, *z.shape[2:])
    if t.device != z.device:
        raise ValueError(f"{name}: expected device {z.device} (that of the state), got {t.device}")
    if tuple(t.shape) != want:
        raise ValueError(f"{name}: expected shape {want} (the state's (B, C, ...)), got {tuple(t.shape)}")
    if dtype and t.dtype != z.dtype:
        raise TypeError(f"{name}: expected dtype {z.dtype} (that of the state), got {t.dtype}")


def _run(launch, args, outs: dict):
    work = {k: (v if v is None or v.is_contiguous() else torch.empty_like(v, memory_format=torch.contiguous_format))
            for k, v in outs.items()}
    launch(*args, *work.values())
    for k, v in outs.items():
        if v is not None and work[k] is not v:
            v.copy_(work[k])


def hold_transition(z, eps_hat, coef, step, *, noise=None, seed=None, out=None, backend=None):
    """One fused HOLD sampler step ``z <- K z + k eps_hat + C eta``; returns ``out`` (new unless given).

    Args:
        z: state (B, n*C, ...), float16/bfloat16/float32/float64 (dtype S); n = coef.shape[1].
        eps_hat: network output (B, C, ...), any float dtype.
        coef: float64 (N, n, 2n+1) table on z's device (:func:`transition_table`), 1 <= n <= MAX_ORDER on
            every backend, n > MAX_ORDER on reference only (``auto`` picks it, warning once).
        step: Python int, the table row; also the Philox step counter.
        noise: explicit standard normals shaped and typed like z instead of the Philox stream.
        seed: int64 tensor (1,) or (B,) on z's device, read inside the kernel; default zeros(1).
        out: output like z; may be ``z`` itself (in place).
        backend: "reference" | "cpp" | "triton" | "cuda" | "auto" | None.
    """
    _checks.float_tensor(z, "z")
    n = table_order(coef)
    C = _state_channels(z, "z", n)
    _data_like(eps_hat, "eps_hat", z, C, dtype=False)
    for name, t in (("noise", noise), ("out", out)):
        if t is not None:
            _checks.like(t, name, z, "z")
    if coef.device != z.device:
        raise ValueError(f"coef: expected device {z.device} (that of z), got {coef.device}")
    step = _checks.step_index(step, coef)  # a Python int for the op's schema (numpy ints accepted)
    if coef.device.type == "cpu":
        validate_table(coef[step:step + 1], f"coef[{step}]")
    if step >= 2**32:
        raise ValueError(f"step: expected < 2**32 (the Philox step counter), got {step}")
    seed = _checks.seed_tensor(torch.zeros(1, dtype=torch.int64, device=z.device) if seed is None else seed, z)
    _checks.no_partial_overlap({"out": out}, {"z": z, "eps_hat": eps_hat, "noise": noise}, {"coef": coef, "seed": seed})
    launch = _launcher("hold_transition", z.device.type, backend, n)
    out = out if out is not None else torch.empty_like(z, memory_format=torch.contiguous_format)
    c = [None if t is None else t.contiguous() for t in (z, eps_hat, noise)]
    _run(launch, (c[0], c[1], c[2], coef.contiguous(), step, seed), {"out": out})
    return out


def hold_perturb(z0, mean_mat, chol, *, noise=None, seed=None, step: int = 0, out=None, eps_out=None, backend=None):
    """Forward perturbation ``z_t = M z0 + L_t eps`` with per-sample matrices; returns ``out``.

    Args:
        z0: (B, m*C, ...) float tensor (dtype S): x0 (m = 1) or a full initial state (m = n).
        mean_mat: float64 (B, n, m) on z0's device, e.g. E(t)[:, :, :1] (:meth:`HOLD.perturb_matrices`); orders
            as in :func:`hold_transition` (n > MAX_ORDER: reference only).
        chol: float64 (B, n, n) lower-triangular L_t on z0's device (its upper triangle is not read).
        noise: explicit eps (B, n*C, ...) of dtype S instead of the Philox stream.
        seed, step: Philox key (int64 (1,) or (B,)) and counter (Python int).
        out: (B, n*C, ...) output of dtype S; eps_out: optional (B, C, ...) output for eps_n.
    """
    _checks.float_tensor(z0, "z0")
    if z0.dim() < 2:
        raise ValueError(f"z0: expected (B, m*C, ...) with at least 2 dims, got shape {tuple(z0.shape)}")
    for name, t in (("mean_mat", mean_mat), ("chol", chol)):
        _checks.tensor(t, name)
        if t.dtype != torch.float64:
            raise TypeError(f"{name}: expected dtype torch.float64, got {t.dtype}")
        if t.device != z0.device:
            raise ValueError(f"{name}: expected device {z0.device} (that of z0), got {t.device}")
    if mean_mat.dim() != 3 or mean_mat.shape[0] != z0.shape[0]:
        raise ValueError(f"mean_mat: expected shape (B={z0.shape[0]}, n, m), got {tuple(mean_mat.shape)}")
    B, n, m = mean_mat.shape
    if n < 1 or m not in (1, n):
        raise ValueError(f"mean_mat: expected (B, n, m) with n >= 1 and m in (1, n), got {tuple(mean_mat.shape)}")
    if tuple(chol.shape) != (B, n, n):
        raise ValueError(f"chol: expected shape ({B}, {n}, {n}), got {tuple(chol.shape)}")
    C = _state_channels(z0, "z0", m)
    state_shape = (B, n * C, *z0.shape[2:])
    if z0.device.type == "cpu":
        for name, t in (("mean_mat", mean_mat), ("chol", chol)):
            if not torch.isfinite(t).all():
                raise ValueError(f"{name}: non-finite entry")
    # The order and exception types of _checks.like: device and shape ValueError, dtype TypeError.
    for name, t in (("noise", noise), ("out", out)):
        if t is not None:
            _checks.float_tensor(t, name)
            if t.device != z0.device:
                raise ValueError(f"{name}: expected device {z0.device} (that of z0), got {t.device}")
            if tuple(t.shape) != state_shape:
                raise ValueError(f"{name}: expected shape {state_shape} (the state (B, n*C, ...) of z0 and mean_mat), "
                                 f"got {tuple(t.shape)}")
            if t.dtype != z0.dtype:
                raise TypeError(f"{name}: expected dtype {z0.dtype} (that of z0), got {t.dtype}")
    if eps_out is not None:
        _data_like(eps_out, "eps_out", z0, C, dtype=True)
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or not 0 <= step < 2**32:
        raise ValueError(f"step: expected a Python int in [0, 2**32), got {step!r}")
    step = int(step)  # numpy ints accepted, passed on as Python's
    seed = _checks.seed_tensor(torch.zeros(1, dtype=torch.int64, device=z0.device) if seed is None else seed, z0)
    _checks.no_partial_overlap({"out": out, "eps_out": eps_out}, {"z0": z0, "noise": noise},
                               {"mean_mat": mean_mat, "chol": chol, "seed": seed})
    launch = _launcher("hold_perturb", z0.device.type, backend, n)
    out = out if out is not None else torch.empty(state_shape, dtype=z0.dtype, device=z0.device)
    c = [None if t is None else t.contiguous() for t in (z0, mean_mat, chol, noise)]
    _run(launch, (*c, step, seed), {"out": out, "eps_out": eps_out})
    return out
