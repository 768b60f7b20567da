"""HOLD's factors at orders n <= F64_MAX_ORDER where float64 cannot carry them (``ops.hold.f64_factor_orders``).

Without a jitter, the small-time correlation matrix of Sigma_t is Hilbert-like, so the float64 L_t = chol(Sigma_t)
lost up to 12% of L_t[n, n] under DSM at n = 11 (1.3e-10 at n = 5), 3e-10 under HSM at n = 9, and chol Q_A (the SSCS
noise factor) 1e-2 at n = 11. Those factors now come from the extended path, correctly rounded; elsewhere the float64
path is unchanged. Oracle: the paper form of the law at ample mpmath digits (tests/test_hold_math_review.py,
tests/test_hold_any_order.py).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffkern.hold import HOLD
from diffkern.hold_linalg import chol_psd, chol_rows
from diffkern.ops.hold import F64_MAX_ORDER, f64_factor_orders
import test_hold_any_order as any_order
from test_hold_any_order import EPS, ROUND_TOL
from test_hold_math_review import ALPHA, L_INV

F64 = torch.float64


def mp_factor_and_weights(n: int, t: float, hsm: bool, delta: float):
    """(L = chol(Sigma_t + delta I), Sigma_t + delta I, w_z, w_eps) rounded to float64 from mpmath (beta = 1: b = t)."""
    return any_order.mp_factor_and_weights(n, t, hsm, delta)[1:]


# the worst (n, mode, delta, t) of a sweep over t in [1e-6, 10] per order; t = 1e-3 is the samplers' default t_min
ROUTED = [(11, False, 0.0, 2e-6), (5, False, 0.0, 6e-6), (10, False, 0.0, 1e-3), (6, False, 0.0, 1e-4),
          (9, True, 0.0, 2e-6), (11, True, 0.0, 2e-2), (9, False, 1e-12, 2e-6), (11, False, 1e-9, 0.6),
          (8, False, 1e-9, 5.0)]


@pytest.mark.parametrize("n,hsm,delta,t", ROUTED)
def test_routed_factors_are_correctly_rounded(n, hsm, delta, t):
    proc = HOLD(n, L=1 / L_INV, alpha=ALPHA, hsm=hsm, delta=delta)
    assert n > f64_factor_orders(hsm, delta)[0] and "E" not in proc._xparts and "L" in proc._xparts
    Lr, Sr, w_ref, we_ref = mp_factor_and_weights(n, t, hsm, delta)
    got = proc.chol(torch.tensor([t], dtype=F64))[0].numpy()
    assert (np.abs(got - Lr) <= ROUND_TOL * np.sqrt(np.diag(Sr))[:, None]).all(), np.abs(got - Lr).max()
    assert abs(got[-1, -1] - Lr[-1, -1]) <= 2 * EPS * Lr[-1, -1]  # the score scale, relative
    assert float(proc.score_scale(t)) == got[-1, -1]
    w_z, w_e = proc.x0_coefficients(t)
    np.testing.assert_allclose(w_z.numpy(), w_ref, rtol=ROUND_TOL, atol=ROUND_TOL * np.abs(w_ref).max())
    assert abs(float(w_e) - we_ref) <= ROUND_TOL * abs(we_ref)


# float64 kept: the worst time of the sweep at the highest float64 order of each case, within 1e-10 relative
KEPT = [(4, False, 0.0, 2e-6), (8, True, 0.0, 3e-5), (11, True, 1e-9, 0.6), (7, False, 1e-9, 1.0)]


@pytest.mark.parametrize("n,hsm,delta,t", KEPT)
def test_float64_factors_kept_where_accurate(n, hsm, delta, t):
    proc = HOLD(n, L=1 / L_INV, alpha=ALPHA, hsm=hsm, delta=delta)
    assert n == f64_factor_orders(hsm, delta)[0] and "L" not in proc._xparts
    tt = torch.tensor([t], dtype=F64)
    E, Lq = proc.transition(tt), chol_psd(proc.gramian(tt))
    jit = delta ** 0.5 * torch.eye(n, dtype=F64)
    want = chol_rows(torch.cat([E @ proc.cov0().sqrt(), Lq, jit.expand_as(Lq)], dim=-1))
    got = proc.chol(tt)
    assert torch.equal(got, want)  # the float64 path, bitwise as before
    Lr, Sr, w_ref, we_ref = mp_factor_and_weights(n, t, hsm, delta)
    got = got[0].numpy()
    assert (np.abs(got - Lr) <= 1e-10 * np.sqrt(np.diag(Sr))[:, None]).all()
    assert abs(got[-1, -1] - Lr[-1, -1]) <= 1e-10 * Lr[-1, -1]
    assert abs(float(proc.x0_coefficients(t)[1]) - we_ref) <= 1e-10 * abs(we_ref)


@pytest.mark.parametrize("n,b", [(6, 1e-3), (11, 1e-3), (11, 0.2)])
def test_a_part_factor_routed_above_order_5(n, b):
    """chol Q_A, Q_A = (I - E^T E) / L: float64 lost 6e-10 (n = 6) to 1e-2 (n = 11) of it; now correctly rounded."""
    proc = HOLD(n, L=1 / L_INV, alpha=ALPHA)
    assert n > f64_factor_orders(True, proc.delta)[1] and "LA" in proc._xparts
    ref, QAr = any_order.mp_a_chol(n, b)
    got = proc.a_chol(torch.tensor(b, dtype=F64)).numpy()
    assert (np.abs(got - ref) <= ROUND_TOL * np.sqrt(np.diag(QAr))[:, None]).all()


def test_routing_table_and_checks():
    assert f64_factor_orders(True, 1e-9) == (F64_MAX_ORDER, 5) and f64_factor_orders(True, 0.0) == (8, 5)
    assert f64_factor_orders(False, 0.0) == (4, 5) and f64_factor_orders(False, 1e-6) == (7, 5)
    assert HOLD(4, hsm=False, delta=0.0)._xp is None and HOLD(5, hsm=False, delta=0.0)._xparts == {"L"}
    assert HOLD(6)._xparts == {"LA"}
    # the routed factor reads its times on the host: bad times are refused by name, as above F64_MAX_ORDER
    proc = HOLD(7, hsm=False, delta=0.0, beta=(0.1, 1.0))
    with pytest.raises(ValueError, match="t: expected finite times >= 0"):
        proc.chol(torch.tensor([-0.05, 0.5], dtype=F64))  # b(-0.05) < 0 here, but b(t) > 0 for some t < 0 in general
    with pytest.raises(ValueError, match="t: expected finite times >= 0"):
        proc.x0_coefficients(torch.tensor([float("nan")], dtype=F64))
    # per-sample perturbation matrices agree with chol at each time (batch-invariant values)
    t = torch.tensor([1e-3, 0.4, 2.0], dtype=F64)
    m, lt = proc.perturb_matrices(t)
    assert torch.equal(lt[1], proc.chol(t[1:2])[0]) and m.shape == (3, 7, 1)
