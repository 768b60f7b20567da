"""HOLD above the fused kernels' MAX_ORDER = 8: orders 9..F64_MAX_ORDER (float64 host maths) on the reference backend.

Oracles are independent of ``diffkern.hold``: the mpmath drift and law of tests/test_hold_math_review.py (paper form
at enough digits that its cancellation is harmless), and explicit float64 affine maps for the ops."""
import math
import warnings

import mpmath
import numpy as np
import pytest
import torch

from diffkern.hold import HOLD, chol_psd
from diffkern.hold_sampling import GaussianMixture, GaussianMixtureScore, sample, sampler_table, time_grid
from diffkern.ops import BackendUnavailable
from diffkern.ops import registry
from diffkern.ops.hold import F64_MAX_ORDER, MAX_ORDER, hold_perturb, hold_transition, transition_table
from test_hold_math_review import ALPHA, L_INV, moment_check, mp_law, normalized, to_np

F64 = torch.float64
HIGH = tuple(range(MAX_ORDER + 1, F64_MAX_ORDER + 1))
REF = "reference"
# Measured float64 errors vs 200 digits for n <= 11 (2 r b in [1e-3, 10n] for the laws, t in [1e-4, 3] for L_t):
# normalized covariance and Q_A <= 1e-13, E <= 2e-14, L_t <= 5e-13 |L_t| (delta = 1e-9), L_t[n, n] <= 2e-9
# relative (delta = 0); the bounds below leave a factor 5 to 10. n = 12 breaks the float64 factors (F64_MAX_ORDER;
# above it diffkern.hold_mp computes them in extended precision: tests/test_hold_any_order.py).
COV_TOL, E_TOL, CHOL_TOL, LNN_TOL = 1e-12, 2e-13, 5e-12, 1e-8


def dps_for(n: int, b: float) -> int:
    """Digits for mp_law: the paper form cancels down to Sigma_11 ~ b^(2n-1) against O(1) terms."""
    return 30 + int((2 * n - 1) * max(0.0, -math.log10(b)))


@pytest.mark.parametrize("n", HIGH)
def test_closed_forms_against_mpmath(n):
    """E, Sigma_t (HSM) and the SSCS A-part Q_A at 2 r b = 0.1 (series), 2n (where the series alone lost 1e-8 at
    n = 10) and 5n (doubling), batched in one call."""
    proc = HOLD(n, L=1 / L_INV, alpha=ALPHA, T=1e3)
    bs = [x / (2 * proc.r) for x in (0.1, 2.0 * n, 5.0 * n)]
    bt = torch.tensor(bs, dtype=F64)
    E_all, S_all, QA_all = proc.transition(bt), proc.cov(bt), proc.a_cov(bt)  # beta = 1: t = b
    for i, b in enumerate(bs):
        dps = dps_for(n, b)
        E, S = mp_law(n, b, dps=dps)
        with mpmath.workdps(dps):
            QA = to_np(mpmath.eye(n) * mpmath.mpf(L_INV) - E.T * E * mpmath.mpf(L_INV))
        np.testing.assert_allclose(E_all[i].numpy(), to_np(E), rtol=0, atol=E_TOL)
        assert normalized(S_all[i].numpy(), to_np(S)) <= COV_TOL, (b, normalized(S_all[i].numpy(), to_np(S)))
        assert normalized(QA_all[i].numpy(), QA) <= COV_TOL


@pytest.mark.parametrize("n", HIGH)
@pytest.mark.parametrize("delta", (0.0, 1e-9))
def test_cholesky_factor_against_mpmath(n, delta):
    """L_t = chol(Sigma_t + delta I), the network's factor and the limit of the order: small t (Sigma_t singular to
    float64 without jitter) to the stationary range."""
    proc = HOLD(n, L=1 / L_INV, alpha=ALPHA, delta=delta)
    ts = (1e-4, 0.05, 0.6, 3.0)
    got = proc.chol(torch.tensor(ts, dtype=F64)).numpy()
    for i, t in enumerate(ts):
        dps = dps_for(n, t) + 10
        _, S = mp_law(n, t, delta=delta, dps=dps)
        with mpmath.workdps(dps):
            ref = to_np(mpmath.cholesky(S))
        assert abs(got[i][-1, -1] - ref[-1, -1]) <= LNN_TOL * ref[-1, -1], (t, got[i][-1, -1], ref[-1, -1])
        if delta:
            assert np.abs(got[i] - ref).max() <= CHOL_TOL * np.abs(ref).max(), t
        assert normalized(got[i] @ got[i].T, to_np(S)) <= COV_TOL, t


@pytest.mark.parametrize("n", (9, F64_MAX_ORDER))
def test_reference_ops_are_the_affine_maps(n):
    """With explicit noise, float64: K z + k eps_hat + C eta and M z0 + L eps written as plain matrix products."""
    g = torch.Generator().manual_seed(n)
    B, C, P = 2, 3, 5
    K, k = torch.randn(4, n, n, dtype=F64, generator=g), torch.randn(4, n, dtype=F64, generator=g)
    Cm = torch.randn(4, n, n, dtype=F64, generator=g).tril()
    table = transition_table(K, k, Cm)
    z, noise = (torch.randn(B, n * C, P, dtype=F64, generator=g) for _ in range(2))
    eps = torch.randn(B, C, P, dtype=F64, generator=g)
    out = hold_transition(z, eps, table, 2, noise=noise, backend=REF)
    zc, nc = z.reshape(B, n, C * P), noise.reshape(B, n, C * P)
    want = K[2] @ zc + k[2][:, None] * eps.reshape(B, 1, C * P) + Cm[2] @ nc
    torch.testing.assert_close(out.reshape(B, n, C * P), want, rtol=1e-13, atol=1e-13)
    M, Lt = torch.randn(B, n, n, dtype=F64, generator=g), torch.randn(B, n, n, dtype=F64, generator=g).tril()
    eps_out = torch.empty(B, C, P, dtype=F64)
    zt = hold_perturb(z, M, Lt, noise=noise, eps_out=eps_out, backend=REF)
    torch.testing.assert_close(zt.reshape(B, n, C * P), M @ zc + Lt @ nc, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(eps_out, noise[:, (n - 1) * C:])


@pytest.mark.parametrize("n", HIGH)
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=("f64", "f32"))
def test_perturb_and_transition_reproduce_the_marginal(n, dtype):
    """x0 ~ N(m, s^2) per element, perturbed to t1 (HOLD.perturb, m = 1), carried to t2 by hold_perturb with the
    full state (m = n) and on to t3 by one hold_transition row (K = E, k = 0, C = chol Q): the moments at t2 and t3
    are those of the mpmath marginal N(a m, s^2 a a^T + Sigma(t)), a = E(t) e_1, within 5 standard errors."""
    proc = HOLD(n, L=1 / L_INV, alpha=ALPHA, delta=0.0)
    mean0, s0, S = 0.4, 0.3, 20011
    g = torch.Generator().manual_seed(100 + n)
    x0 = (mean0 + s0 * torch.randn(1, 1, S, dtype=F64, generator=g)).to(dtype)
    t1, t2, t3 = 0.05, 0.6, 1.5
    z1, _ = proc.perturb(x0, torch.tensor([t1], dtype=F64), seed=torch.tensor([3 * n]), backend=REF)
    db = torch.tensor([t2 - t1], dtype=F64)
    z2 = hold_perturb(z1, proc.transition_b(db), chol_psd(proc.gramian_b(db)), seed=torch.tensor([7]), step=1,
                      backend=REF)
    db = torch.tensor([t3 - t2], dtype=F64)
    row = transition_table(proc.transition_b(db), torch.zeros(1, n, dtype=F64), chol_psd(proc.gramian_b(db)))
    z3 = hold_transition(z2, torch.zeros_like(x0), row, 0, seed=torch.tensor([9]), backend=REF)
    for z, t in ((z2, t2), (z3, t3)):
        assert z.dtype == dtype and z.shape == (1, n, S)
        E, Sig = mp_law(n, t, dps=dps_for(n, t))
        a = to_np(E)[:, 0]
        moment_check(z.reshape(n, -1), a * mean0, to_np(Sig) + s0**2 * np.outer(a, a))


def test_sample_end_to_end_at_order_10():
    """hold_sampling.sample (SSCS, fused table, reference op through auto) with the exact score of N(0.5, 0.2^2):
    x matches the sampler's exact discrete law (the code's table driven by an mpmath score, within 5 standard
    errors), and that law approaches the data law as the steps grow (coarse: first order in the step)."""
    n, m0, s0 = 10, 0.5, 0.2
    proc = HOLD(n, L=1 / L_INV, alpha=ALPHA)
    model = GaussianMixtureScore(proc, GaussianMixture([1.0], [[m0]], [s0]), elementwise=True)
    laws = {}
    for steps in (12, 48):
        grid = time_grid(proc, steps)
        table = sampler_table(proc, grid, "sscs")
        times = grid.tolist() + [grid.tolist()[-1]]  # the denoising row's score time is t_min
        mu, P = np.zeros(n), np.eye(n) * L_INV
        for i in range(table.shape[0]):
            t = times[i]
            E, S = mp_law(n, t, delta=proc.delta, dps=dps_for(n, t))
            a = to_np(E)[:, 0]
            with mpmath.workdps(dps_for(n, t)):
                lnn = float(mpmath.cholesky(S)[n - 1, n - 1])
            _, S0 = mp_law(n, t, dps=dps_for(n, t))
            V = to_np(S0) + s0**2 * np.outer(a, a)
            Vi = np.linalg.inv(V)
            row, c = -Vi[-1], float((Vi @ a)[-1] * m0)  # s_n = row . z + c
            K, k, C = (table[i, :, :n].numpy(), table[i, :, n].numpy(), table[i, :, n + 1:].numpy())
            M = K - lnn * np.outer(k, row)  # eps_hat = -L_nn s_n
            mu, P = M @ mu - lnn * c * k, M @ P @ M.T + C @ C.T
        laws[steps] = (mu[0], P[0, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # auto falls back to reference at n = 10 (tested below)
        x = sample(model, proc, (1, 2, 3001), num_steps=49, seed=torch.tensor([5])).double().reshape(-1)
    mu, var = laws[48]
    S = x.numel()
    assert abs(float(x.mean()) - mu) <= 5 * math.sqrt(var / S), (float(x.mean()), mu)
    assert abs(float(x.var()) - var) <= 5 * var * math.sqrt(2 / S), (float(x.var()), var)
    errs = [abs(laws[s][0] - m0) + abs(math.sqrt(laws[s][1]) - s0) for s in (12, 48)]
    assert errs[1] < errs[0] / 2 and errs[1] < 0.1, errs

#----------------------------------------------------------------------------
# Backends and limits.


def _order9():
    table = transition_table(torch.eye(9, dtype=F64)[None], torch.zeros(1, 9, dtype=F64), torch.zeros(1, 9, 9, dtype=F64))
    return torch.randn(2, 9, 4), torch.randn(2, 1, 4), table


@pytest.mark.parametrize("backend", ("cpp", "triton", "cuda"))
def test_fused_backends_refuse_orders_above_8(backend, monkeypatch):
    z, eps, table = _order9()
    msg = f"backend: '{backend}' runs op 'hold_transition' only up to order n = MAX_ORDER = 8.*got order n = 9.*" \
          "'reference' backend runs every order"
    with pytest.raises(BackendUnavailable, match=msg):
        hold_transition(z, eps, table, 0, backend=backend)
    with pytest.raises(BackendUnavailable, match="'hold_perturb' only up to order n = MAX_ORDER = 8.*got order n = 9"):
        hold_perturb(eps, torch.ones(2, 9, 1, dtype=F64), torch.eye(9, dtype=F64).expand(2, 9, 9), backend=backend)
    monkeypatch.setenv("DIFFKERN_BACKEND", backend)  # the variable names itself
    with pytest.raises(BackendUnavailable, match=f"DIFFKERN_BACKEND: '{backend}' runs op 'hold_transition' only"):
        hold_transition(z, eps, table, 0)


def test_auto_picks_reference_and_warns_once(monkeypatch):
    monkeypatch.delenv("DIFFKERN_BACKEND", raising=False)
    monkeypatch.setattr(registry, "_warned", set())
    z, eps, table = _order9()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [hold_transition(z, eps, table, 0, seed=torch.tensor([4])) for _ in range(3)]
    hits = [w for w in caught if "falls back to 'reference'" in str(w.message)]
    assert len(hits) == 1, [str(w.message) for w in caught]
    assert "op 'hold_transition' on cpu falls back" in str(hits[0].message) and "got order n = 9" in str(hits[0].message)
    assert hits[0].filename == __file__  # from the op's caller
    ref = hold_transition(z, eps, table, 0, seed=torch.tensor([4]), backend=REF)
    assert all(torch.equal(o, ref) for o in outs)


def test_orders_above_the_float64_limit_run_on_reference():
    """Above F64_MAX_ORDER nothing is refused: HOLD takes its laws from diffkern.hold_mp, the reference ops any n."""
    n = F64_MAX_ORDER + 1
    assert "E" in HOLD(n)._xparts and "E" not in HOLD(F64_MAX_ORDER)._xparts
    table = transition_table(torch.eye(n, dtype=F64)[None], torch.zeros(1, n, dtype=F64), torch.zeros(1, n, n, dtype=F64))
    z = torch.randn(1, n, 2, dtype=F64)
    assert torch.equal(hold_transition(z, torch.zeros(1, 1, 2, dtype=F64), table, 0, backend=REF), z)
    out = hold_perturb(torch.ones(1, 1, 2, dtype=F64), torch.ones(1, n, 1, dtype=F64), torch.zeros(1, n, n, dtype=F64),
                       backend=REF)
    assert torch.equal(out, torch.ones(1, n, 2, dtype=F64))
