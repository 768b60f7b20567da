"""HOLD's x0 weights at large integrated time b (``HOLD.x0_coefficients``, ``HOLD._x0_far``).

E(b)'s first column, which the weights divide by, falls like e^{-r b} b^(n-1), and float64 kept less and less of it
relatively: the float64 weights were off by 7e-12 (n = 6), 2.4e-10 (n = 8), 6e-9 (n = 11) at b = 10 (beta = (0.1, 20)
at T = 1 reaches b = 10.05). Host times with r b > 8 now take the extended path's correctly rounded weights; below
that, and for a device t or a t with autograd history, the float64 path is unchanged. Oracle: the mpmath paper form of
the law and its Cholesky factor (``tests/test_hold_any_order.py::mp_factor_and_weights``, checked here to be stable
under 60 more digits at the largest b).
"""
import math

import mpmath
import numpy as np
import pytest
import torch

import diffkern.hold as hold_module
from diffkern.hold import HOLD
from diffkern.hold_flow import first_column, flow_map, flow_rows
import test_hold_any_order as any_order
from test_hold_math_review import mp_drift
from test_hold_any_order import EPS, ROUND_TOL
from test_hold_math_review import ALPHA, L_INV

F64 = torch.float64
MODES = [(True, 1e-9), (True, 0.0), (False, 1e-9), (False, 0.0)]  # (hsm, delta): HSM/DSM, default jitter or none


def mp_weights(n: int, b: float, hsm: bool, delta: float):
    """(w_z (n,), w_eps) rounded to float64 from mpmath at integrated time b (the oracle's beta = 1: t = b). n = 1 (an
    OU process, r = 1, which the oracle's solve does not take): z = e^{-b} x0 + sqrt((1 - e^{-2b}) / L + delta) eps."""
    if n > 1:
        return any_order.mp_factor_and_weights(n, b, hsm, delta)[3:]
    with mpmath.workdps(50):
        b = mpmath.mpf(b)
        sd = mpmath.sqrt((1 - mpmath.exp(-2 * b)) * mpmath.mpf(L_INV) + mpmath.mpf(delta))
        return np.array([float(mpmath.exp(b))]), float(-sd * mpmath.exp(b))


def proc_of(n: int, hsm: bool, delta: float, **kw) -> HOLD:
    return HOLD(n, L=1 / L_INV, alpha=ALPHA, hsm=hsm, delta=delta, **kw)


def assert_rounded(w_z, w_e, w_ref, we_ref, tol=ROUND_TOL):
    """Correctly rounded weights: within ``tol`` of the oracle's float64 rounding (entries of w_z against the largest,
    as in test_hold_any_order; w_eps relative)."""
    np.testing.assert_allclose(np.asarray(w_z), w_ref, rtol=tol, atol=tol * np.abs(w_ref).max())
    assert abs(float(w_e) - we_ref) <= tol * abs(we_ref), (float(w_e), we_ref)


@pytest.mark.parametrize("hsm,delta", MODES)
@pytest.mark.parametrize("n", (6, 8, 11))
def test_far_weights_are_correctly_rounded(n, hsm, delta):
    """b in {5, 8, 10, 12, 20} (r b >= 15 at n >= 6: every one routed), a number t and a batch of CPU times alike."""
    proc = proc_of(n, hsm, delta)
    bs = (5.0, 8.0, 10.0, 12.0, 20.0)
    w_zb, w_eb = proc.x0_coefficients(torch.tensor(bs, dtype=F64))
    for i, b in enumerate(bs):
        w_ref, we_ref = mp_weights(n, b, hsm, delta)
        w_z, w_e = proc.x0_coefficients(b)
        assert_rounded(w_z.numpy(), w_e, w_ref, we_ref)
        assert torch.equal(w_zb[i], w_z) and torch.equal(w_eb[i], w_e)  # batch-invariant


def test_float64_weights_were_off_at_large_b(monkeypatch):
    """The measurement behind the routing: without it (threshold at infinity) the float64 weights miss the oracle by
    far more than rounding at b = 10, n = 6 (7e-12) and n = 11 (6e-9), and stay within 1e-13 at r b <= 8."""
    monkeypatch.setattr(hold_module, "_X0_FAR_RB", math.inf)
    for n, b, worse in ((6, 10.0, 1e-12), (11, 10.0, 1e-9)):
        proc = proc_of(n, True, 1e-9)
        w_ref, we_ref = mp_weights(n, b, True, 1e-9)
        assert abs(float(proc.x0_coefficients(b)[1]) - we_ref) > worse * abs(we_ref)
    for n in (3, 6, 9):  # just below the threshold
        proc = proc_of(n, True, 1e-9)
        b = 8.0 / proc.r * (1 - 1e-12)
        w_z, w_e = proc.x0_coefficients(b)
        assert_rounded(w_z.numpy(), w_e, *mp_weights(n, b, True, 1e-9), tol=1e-13)


@pytest.mark.parametrize("n", (1, 3, 6, 9))
def test_below_threshold_and_autograd_keep_the_float64_path(monkeypatch, n):
    """A batch straddling r b = 8: entries below it are the float64 path's, bitwise; those above are the extended
    path's (to rounding vs mpmath). A t with autograd history keeps the float64 path and its graph, as before (the
    extended values are constants: a gradient would be dropped)."""
    proc = proc_of(n, True, 1e-9)
    cut = 8.0 / proc.r
    t = torch.tensor([[0.3, cut, 2 * cut], [cut * (1 + 1e-12), 0.5 * cut, 10.0]], dtype=F64)
    got_z, got_e = proc.x0_coefficients(t)
    tg = t.clone().requires_grad_(True)
    grad_z, grad_e = proc.x0_coefficients(tg)
    assert grad_z.requires_grad and grad_e.requires_grad and "L" not in proc._xparts
    monkeypatch.setattr(hold_module, "_X0_FAR_RB", math.inf)
    f64_z, f64_e = proc.x0_coefficients(t)
    assert torch.equal(f64_z, grad_z.detach()) and torch.equal(f64_e, grad_e.detach())
    far = proc.r * t > 8.0
    assert far.tolist() == [[False, False, True], [True, False, True]]
    assert torch.equal(got_z[~far], f64_z[~far]) and torch.equal(got_e[~far], f64_e[~far])
    for i, j in far.nonzero().tolist():
        assert_rounded(got_z[i, j].numpy(), got_e[i, j], *mp_weights(n, float(t[i, j]), True, 1e-9))


def test_constant_and_time_dependent_beta_and_rate():
    """b = int beta: the routing reads b(t), not t (beta = (0.1, 20): b(1) = 10.1); a rate given as a float is the
    Law's too (r = 2.5 at n = 6)."""
    proc = proc_of(6, True, 1e-9, beta=(0.1, 20.0), T=1.0)
    t = torch.tensor([0.2, 0.9, 1.0], dtype=F64)  # b = 0.42 (float64), 8.19, 10.1 (routed)
    w_z, w_e = proc.x0_coefficients(t)
    b = proc.int_beta(t)
    for i in (1, 2):
        assert_rounded(w_z[i].numpy(), w_e[i], *mp_weights(6, float(b[i]), True, 1e-9))
    rated = proc_of(6, True, 1e-9, rate=2.5)
    w_z, w_e = rated.x0_coefficients(5.0)  # r b = 12.5
    law = rated._ext_law()
    assert torch.equal(w_z, law.batch(torch.tensor(5.0, dtype=F64), "w_z"))
    assert torch.equal(w_e, law.batch(torch.tensor(5.0, dtype=F64), "w_eps"))


def test_callers_on_the_host_get_the_routed_weights():
    """``"ode_flow"``'s table (k = w_eps g per step) and ``predict_x0`` read their weights at host times: at
    b = 10.1 (beta = (0.1, 20), t = 1) both carry the correctly rounded weights."""
    n = 6
    proc = proc_of(n, True, 1e-9, beta=(0.1, 20.0), T=1.0)
    grid = torch.tensor([1.0, 0.9, 0.5], dtype=F64)
    b = proc.int_beta(grid)
    K, k = flow_rows(proc, grid, denoise=False)
    # g = c_next - A c_cur as flow_rows forms it (the same float64 operations), so that k = fl(g w_eps) exposes w_eps
    A = flow_map(proc, b[:-1], b[1:])
    g = first_column(proc, b[1:]) - (A @ first_column(proc, b[:-1])[:, :, None])[:, :, 0]
    for i in (0, 1):  # b = 10.1, 8.19
        w_ref, we_ref = mp_weights(n, float(b[i]), True, 1e-9)
        j = int(g[i].abs().argmax())
        # k_j / g_j is w_eps within one more rounding of each
        assert abs(float(k[i, j] / g[i, j]) - we_ref) <= (ROUND_TOL + 2 * EPS) * abs(we_ref)
    z = torch.randn(3, n * 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    eps_hat = torch.randn(3, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    w_ref, we_ref = mp_weights(n, float(b[0]), True, 1e-9)
    want = we_ref * eps_hat + sum(w_ref[m] * z[:, m * 2:(m + 1) * 2] for m in range(n))
    scale = abs(we_ref) * eps_hat.abs() + sum(abs(w_ref[m]) * z[:, m * 2:(m + 1) * 2].abs() for m in range(n))
    # n + 1 weights, each within ROUND_TOL, summed in float64 (n + 1 more roundings)
    assert ((proc.predict_x0(z, eps_hat, 1.0) - want).abs() <= (ROUND_TOL + (n + 2) * EPS) * scale).all()


@pytest.mark.cuda  # gpu_suite.sh's pytest_cuda selects by this mark (conftest skips it without a GPU)
def test_device_times_are_not_read():
    """A CUDA t keeps the float64 path: no Law is built (nothing read on the host), values as the CPU float64 path's
    to float64 rounding of the same operations on the device."""
    proc = proc_of(5, True, 1e-9)  # nothing routed at n = 5: no Law unless x0_coefficients builds one
    t = torch.tensor([1.0, 10.0], dtype=F64, device="cuda")
    w_z, w_e = proc.x0_coefficients(t)
    assert proc._xp is None and w_z.device == t.device
    w_ref, we_ref = mp_weights(5, 10.0, True, 1e-9)
    assert abs(float(w_e[1]) - we_ref) <= 1e-10 * abs(we_ref)  # the documented float64 bound up to r b = 30


def mp_first_column(n: int, b: float) -> np.ndarray:
    """E(b) e_1 from mpmath's expm of its own drift at 60 digits (the column is O(e^{-r b} b^(n-1)) with O(1) entries
    of N^k: expm's scaling and squaring loses no more than ~15 of them), rounded to float64."""
    with mpmath.workdps(60):
        F, _ = mp_drift(n)
        E = mpmath.expm(F * mpmath.mpf(b))
        return np.array([float(E[i, 0]) for i in range(n)])


@pytest.mark.parametrize("n", (3, 6, 8, 11))
def test_flow_first_column_is_correctly_rounded_far(n):
    """``"ode_flow"``'s c(b) = E(b) e_1 at r b > 8 is the extended path's, correctly rounded (float64's was off by
    1e-12 relative at n = 11, b = 5; 1.5e-9 of max |g| at b = 10.1); at r b <= 8 it is float64's, bitwise; and g is
    within a few roundings of the exact-c g for the same A (float64's c: up to 1.5e-9 of max |g|)."""
    proc = HOLD(n, beta=(0.1, 20.0), T=1.0)
    grid = torch.tensor([1.0, 0.95, 0.9, 0.5, 0.1], dtype=F64)
    b = proc.int_beta(grid)  # 10.1, 9.12, 8.19, 2.55, 0.11
    c = first_column(proc, b)
    far = proc.r * b > 8.0
    assert far[:3].all() and not far[-1]
    f64 = proc.transition_b(b)[:, :, 0]
    assert torch.equal(c[~far], f64[~far])
    for i in far.nonzero()[:, 0].tolist():
        ref = mp_first_column(n, float(b[i]))
        assert (np.abs(c[i].numpy() - ref) <= ROUND_TOL * np.abs(ref).max()).all(), i
    A = flow_map(proc, b[:2], b[1:3])
    g = c[1:3] - (A @ c[:2, :, None])[:, :, 0]
    with mpmath.workdps(60):
        for i in range(2):
            mc, mn = mp_first_column(n, float(b[i])), mp_first_column(n, float(b[i + 1]))
            g_ref = mn - A[i].numpy() @ mc  # float64 products: ~n roundings of the terms
            scale = np.abs(mn).max() + np.abs(A[i].numpy()).max(1) @ np.abs(mc)
            assert (np.abs(g[i].numpy() - g_ref) <= (n + 4) * EPS * scale).all()


def test_flow_rows_unchanged_below_the_threshold():
    """A grid with every r b <= 8 (n = 3, T = 1, beta = 1: r b <= 1.7) takes float64's E e_1, as before: K and k
    bitwise those of the former g = E(b_next) e_1 - A E(b_cur) e_1."""
    proc = HOLD(3, T=1.0)
    grid = torch.linspace(1.0, 1e-3, 9, dtype=F64)
    K, k = flow_rows(proc, grid)
    t_cur, t_next = torch.cat([grid[:-1], grid[-1:]]), torch.cat([grid[1:], grid.new_zeros(1)])
    b_cur, b_next = proc.int_beta(t_cur), proc.int_beta(t_next)
    A = flow_map(proc, b_cur, b_next)
    w_z, w_e = proc.x0_coefficients(t_cur)
    g = proc.transition_b(b_next)[:, :, 0] - (A @ proc.transition_b(b_cur)[:, :, :1])[:, :, 0]
    assert torch.equal(K, A + g[:, :, None] * w_z[:, None, :]) and torch.equal(k, g * w_e[:, None])
