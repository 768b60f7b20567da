"""The DDIM-like sampler ``"ode_flow"`` (``diffkern.hold_flow``): the x0 prediction frozen over a step and z moved by
the exact probability-flow map A of the conditional Gaussian N(E(t)(x0, 0, ..), Sigma_t + delta I).

Checked: A against scipy's solve_ivp of the matrix ODE dA/dt = beta (F + 1/2 G~G~^T Sigma~^{-1}) A (n = 1..5,
constant and time-varying beta); A Sigma~_cur A^T = Sigma~_next down to t = 0; n = 1 is DDIM; with data a single
point the sampler is exact at every step count; on Gaussian data it converges at first order to the continuous
ODE's law, with bounded velocities at 20 steps where ``"ode_exp"``'s blow up. Through ``sample`` and the graph
runner: test_hold_exp_ode.py's determinism test, which runs both samplers.
"""
import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from diffkern.hold import HOLD
from diffkern.hold_flow import chol_b, flow_map, flow_rows
from diffkern.hold_mp import Law
from diffkern.hold_sampling import sampler_table, time_grid
from test_hold_review import ALPHA, L_INV, continuous_law, discrete_law

F64 = torch.float64


def flow_ode(proc: HOLD, t0: float, t1: float, mu0: np.ndarray, P0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The law N(mu, P) at t1 of the conditional probability-flow ODE of the jittered path for the point x0 = 1,
    z' = beta (F z + 1/2 G~G~^T Sigma~^{-1}(z - m_t)), from N(mu0, P0) at t0 (DOP853, rtol 1e-13, beta(t) explicit):
    Sigma~ = Sigma_t + delta I solves Lyapunov with G~G~^T = (2 xi / L)(1 + delta L) E_nn."""
    n, F = proc.order, proc.F.numpy()
    gg = 2 * proc.xi / proc.L * (1 + proc.delta * proc.L)

    def rhs(t, y):
        row = np.linalg.solve(proc.cov(t, jitter=True).numpy(), np.eye(n)[-1])  # e_n^T Sigma~^{-1}
        M = F.copy()
        M[-1] += 0.5 * gg * row
        mu, P = y[:n], y[n:].reshape(n, n)
        m_t = proc.transition(t).numpy()[:, 0]
        dmu = M @ mu - 0.5 * gg * float(row @ m_t) * np.eye(n)[-1]
        return proc.beta(t) * np.concatenate([dmu, (M @ P + P @ M.T).ravel()])

    y = solve_ivp(rhs, (t0, t1), np.concatenate([mu0, P0.ravel()]), method="DOP853", rtol=1e-13, atol=1e-14).y[:, -1]
    return y[:n], y[n:].reshape(n, n)


def flow_maps_ode(proc: HOLD, t0: np.ndarray, t1: np.ndarray) -> np.ndarray:
    """The flow map of the ODE of :func:`flow_ode`, i.e. the matrix ODE dA/dt = beta (F + 1/2 G~G~^T Sigma~^{-1}) A from
    A = I, over each interval [t0[i], t1[i]] (k of them), as one DOP853 run in s = (t - t0) / (t1 - t0) from 0 to 1,
    each interval's Sigma~ from one batched ``proc.cov``: one k-fold system instead of k runs (fewer evaluations of
    Sigma~, which cost most of the time: 44 -> 27 s for the test below). The integrator's error norm is an RMS over
    all components, so rtol and atol (1e-13, 1e-14 per interval) are divided by sqrt(k): one interval's error cannot
    hide behind the others'. Measured: within 4e-13 of k separate runs, and no further from ``flow_map`` than they
    are. Returns (k, n, n)."""
    n, k, F = proc.order, len(t0), proc.F.numpy()
    gg = 2 * proc.xi / proc.L * (1 + proc.delta * proc.L)
    h = t1 - t0

    def rhs(s, y):
        t = t0 + s * h
        Sigma = proc.cov(torch.from_numpy(t), jitter=True).numpy()
        M = np.repeat(F[None], k, axis=0)
        M[:, -1] += 0.5 * gg * np.linalg.solve(Sigma, np.repeat(np.eye(n)[-1:, :, None], k, axis=0))[..., 0]
        return ((h * proc.beta(t))[:, None, None] * (M @ y.reshape(k, n, n))).ravel()

    y0 = np.repeat(np.eye(n)[None], k, axis=0).ravel()
    tol = np.sqrt(k)
    return solve_ivp(rhs, (0.0, 1.0), y0, method="DOP853", rtol=1e-13 / tol, atol=1e-14 / tol).y[:, -1].reshape(k, n, n)


def point_law(proc: HOLD, table: torch.Tensor, grid: torch.Tensor, x0: float, mu, P):
    """Exact output law of the table for data = the point x0, whose exact denoiser is eps_hat = e_n^T L_t^{-1}(z - m_t)
    (the network convention: z_t = m_t + L_t eps); propagated from N(mu, P) without Monte Carlo. m_t and L_t are the
    correctly rounded ones of diffkern.hold_mp, as the table's x0 weights are at r b > 8: float64 E(t)'s first column
    is off by ~1e-11 relatively at r b ~ 30, an error the float64 weights used to share (test_hold_x0_far.py)."""
    n = proc.order
    law = Law(n, None, proc.L, proc.alpha, proc.delta, proc.hsm)
    ts = grid.tolist() + [grid[-1].item()]
    for i in range(table.shape[0]):
        K, k = table[i, :, :n], table[i, :, n]
        b = proc.int_beta(torch.tensor(ts[i], dtype=F64))
        ell = torch.linalg.inv(law.batch(b, "L"))[n - 1]
        M = K + torch.outer(k, ell)
        mu, P = M @ mu - k * float(ell @ law.batch(b, "E")[:, 0]) * x0, M @ P @ M.T
    return mu, P


def test_chol_b_is_the_network_factor():
    for proc in (HOLD(5, beta=(0.5, 1.5), T=2.0), HOLD(3, hsm=False, delta=0.0)):
        t = torch.tensor([0.0, 1e-3, 0.1, 1.7], dtype=F64)
        assert torch.equal(chol_b(proc, proc.int_beta(t)), proc.chol(t))


@pytest.mark.parametrize("n", range(1, 6))  # n = 6..8: minutes each for DOP853 here; n = 8 is in the tests below
def test_flow_map_against_solve_ivp(n):
    """Each step's A equals DOP853 (rtol 1e-13) of the matrix ODE, for delta = 0 (the process itself) and the
    default delta with time-varying beta and DSM, down to t = 0.05 (n <= 3) or 0.5 (the explicit oracle is stiff
    below: Sigma~^{-1} ~ 1/delta; lower t is covered by the covariance and point tests). Measured <= 2e-12 for
    n <= 5, relative to max(1, |A|). n = 8 is limited by its Gramian series (E, Sigma ~1e-10, ``hold.py``)."""
    tol = 1e-10
    for proc, spacing in ((HOLD(n, L=2.0, delta=0.0), "linear"), (HOLD(n, L=1.0, beta=(0.5, 1.5), T=2.0), "quadratic"),
                          (HOLD(n, hsm=False, beta=(2.0, -0.3)), "linear")):
        grid = time_grid(proc, 3, t_min=0.05 if n <= 3 else 0.5, spacing=spacing)
        A = flow_map(proc, proc.int_beta(grid[:-1]), proc.int_beta(grid[1:])).numpy()
        wants = flow_maps_ode(proc, grid[:-1].numpy(), grid[1:].numpy())
        for i in range(3):
            np.testing.assert_allclose(A[i], wants[i], rtol=0, atol=tol * max(1.0, np.abs(wants[i]).max()))


@pytest.mark.parametrize("n", (1, 2, 3, 5, 8))
def test_flow_map_transports_the_covariance(n):
    """A Sigma~_cur A^T = Sigma~_next (normalised by the diagonal) on 20- and 200-step grids down to t_min = 1e-3 and
    on to t = 0 (the denoising row), where Sigma_t is singular to float64 precision without the jitter."""
    proc = HOLD(n)
    for steps in (20, 200):
        grid = time_grid(proc, steps)
        t_cur, t_next = torch.cat([grid[:-1], grid[-1:]]), torch.cat([grid[1:], grid.new_zeros(1)])
        A = flow_map(proc, proc.int_beta(t_cur), proc.int_beta(t_next))
        S_cur, S_next = proc.cov(t_cur, jitter=True), proc.cov(t_next, jitter=True)
        d = torch.diagonal(S_next, dim1=-2, dim2=-1).sqrt()
        err = (A @ S_cur @ A.transpose(-1, -2) - S_next) / (d[:, :, None] * d[:, None, :])
        assert float(err.abs().max()) < (1e-10 if n <= 5 else 1e-9), float(err.abs().max())


def test_order_one_is_ddim():
    """n = 1: A = L_next / L_cur, so z_next = c_next x0_hat + L_next eps_hat with x0_hat = (z - L_cur eps_hat) / c_cur,
    DDIM's update (c = alpha, L = sigma), including the last row to t = 0 (x = x0_hat)."""
    proc = HOLD(1, L=2.0, beta=(0.3, 2.0))
    grid = time_grid(proc, 9, spacing="quadratic")
    tab = sampler_table(proc, grid, "ode_flow")
    t_cur, t_next = torch.cat([grid[:-1], grid[-1:]]), torch.cat([grid[1:], grid.new_zeros(1)])
    c_cur, c_next = proc.transition(t_cur)[:, 0, 0], proc.transition(t_next)[:, 0, 0]
    s_cur, s_next = proc.chol(t_cur)[:, 0, 0], proc.chol(t_next)[:, 0, 0]
    torch.testing.assert_close(tab[:, 0, 0], c_next / c_cur, rtol=1e-13, atol=0)
    torch.testing.assert_close(tab[:, 0, 1], s_next - c_next * s_cur / c_cur, rtol=1e-12, atol=1e-15)
    assert not tab[:, :, 2:].any()


@pytest.mark.parametrize("n", (1, 2, 3, 5, 8))
def test_exact_for_a_point_at_any_step_count(n):
    """Data = one point, exact denoiser: from the exact prior N(m_T, Sigma~_T) the output law is exactly the
    conditional law at the last grid time (N(m_0, Sigma~_0) after the denoising row, x = x0 up to sqrt(delta)),
    for 1, 2, 7 and 40 network evaluations, both grids: measured <= 2e-11 for n <= 5, 5e-10 at n = 8 (the
    accuracy of E and Sigma there)."""
    proc, x0, tol = HOLD(n, beta=(0.5, 1.5), T=3.0), 0.7, (1e-10 if n <= 5 else 5e-9)
    mT, PT = proc.transition(proc.T)[:, 0] * x0, proc.cov(proc.T, jitter=True)
    for steps, spacing in ((1, "linear"), (2, "quadratic"), (7, "linear"), (40, "quadratic")):
        grid = time_grid(proc, steps, spacing=spacing)
        for denoise, t_end in ((False, grid[-1].item()), (True, 0.0)):
            mu, P = point_law(proc, sampler_table(proc, grid, "ode_flow", denoise=denoise), grid, x0, mT, PT)
            torch.testing.assert_close(mu, proc.transition(t_end)[:, 0] * x0, rtol=0, atol=tol)
            torch.testing.assert_close(P, proc.cov(t_end, jitter=True), rtol=0, atol=tol)


@pytest.mark.parametrize("n", (2, 3))
def test_point_from_the_sampler_prior_matches_the_continuous_ode(n):
    """From N(0, I/L) (not the exact prior) the law after the loop is the continuous conditional ODE's (solve_ivp),
    the same for 1 and 25 steps: the map is exact, not merely convergent (x0 = 1; measured <= 1e-9)."""
    proc = HOLD(n, beta=(0.5, 1.5), T=3.0)
    mu0, P0 = torch.zeros(n, dtype=F64), torch.eye(n, dtype=F64) / proc.L
    mu_c, P_c = flow_ode(proc, proc.T, 1e-2, mu0.numpy(), P0.numpy())
    for steps in (1, 25):
        grid = time_grid(proc, steps, t_min=1e-2)
        mu, P = point_law(proc, sampler_table(proc, grid, "ode_flow", denoise=False), grid, 1.0, mu0, P0)
        np.testing.assert_allclose(mu.numpy(), mu_c, rtol=0, atol=1e-8)
        np.testing.assert_allclose(P.numpy(), P_c, rtol=0, atol=1e-8)


@pytest.mark.parametrize("n", (3, 5))
def test_gaussian_data_first_order_and_bounded_velocities(n):
    """Gaussian data N(0.5, 0.2^2), exact score, from N(0, I/L) (the setup of test_hold_exp_ode): the x output
    converges to the continuous ODE's law at first order (640/320 steps: 0.51 at n = 3 and 5; error x N 0.71, 0.49,
    vs "ode_exp"'s 0.12, 0.113). At 20 steps the velocities stay bounded: largest relative error of Var(v_k)
    0.77 (n = 3), 0.83 (n = 5; Var(v_4) 0.016 vs 0.052), all too small, where "ode_exp" is off by 70x and
    1.9e3x (Var(v_4) 99)."""
    T, t_min = 5.0, 1e-3
    proc = HOLD(n, L=1 / L_INV, alpha=ALPHA, T=T)
    mu_c, P_c = continuous_law(proc, "ode", T, t_min, np.zeros(n), np.eye(n) / proc.L)
    errs = {}
    for N in (320, 640):
        mu, P = discrete_law(proc, "ode_flow", N, T, t_min)
        errs[N] = max(abs(mu[0] - mu_c[0]), abs(P[0, 0] - P_c[0, 0]))
    assert abs(errs[640] / errs[320] - 0.5) < 0.05, errs

    def vel_err(sampler):
        P = discrete_law(proc, sampler, 20, T, t_min)[1]
        return float(np.max(np.abs(np.diag(P) - np.diag(P_c)) / np.diag(P_c)))

    assert vel_err("ode_flow") < 0.9 and vel_err("ode_exp") > 50


def test_dsm_without_jitter_cannot_flow_to_zero():
    """DSM with delta = 0: Sigma_0 = 0 and W ~ 1/b as b -> 0 (the whitened rotation winds without limit), so the
    denoising row to t = 0 raises a ValueError naming ``tol`` instead of returning an unconverged table; the loop
    rows alone are finite. (n = 4: above it DSM without jitter is refused, ``ops.hold.f64_factor_orders``.)"""
    proc = HOLD(4, hsm=False, delta=0.0)
    grid = time_grid(proc, 4, t_min=1e-3)
    with pytest.raises(ValueError, match="^tol: the flow rotation did not converge"):
        flow_rows(proc, grid)
    K, k = flow_rows(proc, grid, denoise=False)
    assert torch.isfinite(K).all() and torch.isfinite(k).all()
