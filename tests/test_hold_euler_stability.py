"""The Euler probability-flow ODE sampler ``"ode"`` warns where its step inflates the drift's fastest rotation
(:mod:`diffkern.hold_stability`), computed on the host from the schedule and the drift's eigenvalues.

The divergence itself is shown two ways, independently of the warning's formula: the exact output law of the
sampler's table on Gaussian data (test_hold_review's recursion, no Monte Carlo) against the continuous ODE's law
(solve_ivp), and the real ``sample`` loop on a mixture's exact score. The growth formula is checked against the
spectral norm of the product of Euler matrices (numpy), which it equals for the normal S_k.
"""
import math
import re
import warnings

import numpy as np
import pytest
import torch

from diffkern.hold import HOLD
from diffkern.hold_sampling import GaussianMixture, GaussianMixtureScore, sample, sampler_table, time_grid
from diffkern.hold_stability import (GROWTH_LIMIT, EulerODEStabilityWarning, check_euler_ode, fastest_rotation,
                                     log_growth, stable_steps)
from test_hold_review import ALPHA, L_INV, continuous_law, discrete_law

F64 = torch.float64
T, T_MIN = 5.0, 1e-3


def steps_b(proc: HOLD, steps: int, spacing: str = "linear") -> torch.Tensor:
    grid = time_grid(proc, steps, t_min=T_MIN, spacing=spacing)
    return proc.int_beta(grid[:-1]) - proc.int_beta(grid[1:])


def stability_warnings(fn):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fn()
    return out, [w for w in rec if issubclass(w.category, EulerODEStabilityWarning)]


def test_growth_is_the_norm_of_the_euler_product():
    """prod_i sqrt(1 + (b_i omega)^2) = ||prod_i (I - b_i S_k)||_2 (S_k skew: normal, commuting factors), and omega
    is S_k's largest |eigenvalue| (numpy): the two numbers the warning rests on."""
    for n, beta, spacing in ((2, 1.0, "linear"), (6, 1.0, "linear"), (5, (0.1, 2.0), "quadratic")):
        proc = HOLD(n, beta=beta)
        S = proc.F.numpy().copy()
        S[-1, -1] += proc.xi
        omega = np.abs(np.linalg.eigvals(S)).max()
        assert abs(fastest_rotation(proc.F, proc.xi) - omega) <= 1e-12 * omega
        b = steps_b(proc, 40, spacing)
        M = np.eye(n)
        for bi in b.tolist():
            M = (np.eye(n) - bi * S) @ M
        want = math.log(np.linalg.norm(M, 2))
        assert abs(log_growth(omega, b) - want) <= 1e-12 * max(1.0, want), (n, want)


def test_warns_once_at_order_6_and_60_steps_where_euler_diverges():
    proc = HOLD(6, L=1 / L_INV, alpha=ALPHA, T=T)
    model = GaussianMixtureScore(proc, GaussianMixture([1.0], [0.5], [0.2]), elementwise=True)
    run = dict(sampler="ode", t_min=T_MIN, dtype=F64, backend="reference")
    x, got = stability_warnings(lambda: sample(model, proc, (1, 1, 64), num_steps=61, **run))
    assert len(got) == 1  # once per call, not per step
    msg = str(got[0].message)
    assert "sampler='ode'" in msg and "n = 6" in msg and "'ode_exp'" in msg and "'sscs'" in msg
    suggested = int(re.search(r"About (\d+) steps", msg).group(1))
    omega = fastest_rotation(proc.F, proc.xi)
    assert suggested == stable_steps(omega, steps_b(proc, 60)) and 600 < suggested < 800
    # the divergence: data N(0.5, 0.2^2) comes out with |x| up to ~6e5 (float64, exact score)
    assert x.abs().max() > 1e4, x.abs().max()
    # and in the exact output law of the table: x's variance is > 1e9 times the continuous ODE's (measured 1.7e12)
    mu_c, P_c = continuous_law(proc, "ode", T, T_MIN, np.zeros(6), np.eye(6) / proc.L)
    (_, P), _ = stability_warnings(lambda: discrete_law(proc, "ode", 60, T, T_MIN))
    assert P[0, 0] > 1e9 * P_c[0, 0]
    # at the suggested number of steps: no warning, and the law within 10% of the continuous one (measured 8%)
    _, none = stability_warnings(lambda: sampler_table(proc, time_grid(proc, suggested, t_min=T_MIN), "ode"))
    assert none == []
    mu, P = discrete_law(proc, "ode", suggested, T, T_MIN)
    assert abs(P[0, 0] / P_c[0, 0] - 1) < 0.1 and abs(mu[0] - mu_c[0]) < 0.01, (mu[0], P[0, 0], mu_c[0], P_c[0, 0])
    # one step fewer is over the limit (the number is the fewest)
    assert log_growth(omega, steps_b(proc, suggested - 1)) > math.log(GROWTH_LIMIT)


def test_no_warning_where_stable():
    """n = 2 with the sampler defaults (500 steps), and n <= 3 at 60 steps (growth 1.23 and 6.2): no warning; the
    exponential-Euler sampler never warns; n = 1 has no rotation."""
    proc = HOLD(2)
    model = GaussianMixtureScore(proc, GaussianMixture([0.4, 0.6], [-0.5, 0.7], [0.2, 0.3]), elementwise=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EulerODEStabilityWarning)
        x = sample(model, proc, (2, 1, 8), sampler="ode", backend="reference")
        assert torch.isfinite(x).all() and x.abs().max() < 5
        for n in (1, 2, 3):
            sampler_table(HOLD(n), time_grid(HOLD(n), 60), "ode")
        for n in (6, 9):
            sampler_table(HOLD(n), time_grid(HOLD(n), 20), "ode_exp")
    assert fastest_rotation(HOLD(1).F, HOLD(1).xi) == 0


@pytest.mark.parametrize("beta,spacing", [(1.0, "quadratic"), ((0.1, 2.0), "linear"), ((0.1, 2.0), "quadratic")])
def test_suggested_steps_for_other_schedules(beta, spacing):
    """The suggestion refines the schedule evenly in b; a fresh grid of that many steps is within a few percent of
    the limit (its steps are not exactly the refined ones), and the warning is on the grid it was given."""
    proc = HOLD(6, beta=beta)
    omega = fastest_rotation(proc.F, proc.xi)
    b = steps_b(proc, 60, spacing)
    _, got = stability_warnings(lambda: check_euler_ode(proc.F, proc.xi, b))
    assert len(got) == 1
    n_ok = stable_steps(omega, b)
    assert f"About {n_ok} steps" in str(got[0].message)
    assert log_growth(omega, steps_b(proc, n_ok, spacing)) <= math.log(1.05 * GROWTH_LIMIT)
    assert log_growth(omega, steps_b(proc, math.ceil(0.9 * n_ok), spacing)) > math.log(GROWTH_LIMIT)


def test_helpers_refuse_bad_arguments_by_name():
    """The public helpers check their arguments (a user sizing a schedule calls them directly); valid ones give the
    values as before (float64 growth of a float32 schedule, an empty schedule: no growth, 0 steps)."""
    proc = HOLD(4)
    omega, b = fastest_rotation(proc.F, proc.xi), steps_b(proc, 60)
    bad_calls = [
        (lambda: fastest_rotation(proc.F[:3], proc.xi), r"^F: expected a real square \(n, n\) tensor"),
        (lambda: fastest_rotation(proc.F.numpy(), proc.xi), r"^F: expected a real square"),
        (lambda: fastest_rotation(proc.F.to(torch.complex128), proc.xi), r"^F: expected a real square"),
        (lambda: fastest_rotation(torch.full((3, 3), math.nan, dtype=F64), 1.0), r"^F: expected finite entries"),
        (lambda: fastest_rotation(proc.F, math.inf), r"^xi: expected a finite value"),
        (lambda: log_growth(-1.0, b), r"^omega: expected a finite value >= 0"),
        (lambda: log_growth(math.nan, b), r"^omega: expected a finite value"),
        (lambda: log_growth(omega, b[None]), r"^b: expected a real 1-D tensor"),
        (lambda: log_growth(omega, b.tolist()), r"^b: expected a real 1-D tensor of integrated-time steps, got list"),
        (lambda: log_growth(omega, torch.tensor([0.1, -0.2], dtype=F64)), r"^b: expected finite steps >= 0"),
        (lambda: log_growth(omega, torch.tensor([0.1, math.inf], dtype=F64)), r"^b: expected finite steps >= 0"),
        (lambda: log_growth(omega, b, 0.0), r"^refine: expected a finite value > 0"),
        (lambda: stable_steps(omega, b, 1.0), r"^limit: expected a finite value > 1"),
        (lambda: stable_steps(omega, b, math.inf), r"^limit: expected a finite value > 1"),
        (lambda: stable_steps(omega, torch.tensor([[0.1]], dtype=F64)), r"^b: expected a real 1-D tensor"),
    ]
    for call, msg in bad_calls:
        with pytest.raises(ValueError, match=msg):
            call()
    with pytest.raises(TypeError, match=r"^omega: expected a real number"):
        log_growth("3", b)
    want = 0.5 * float(torch.log1p((b * omega) ** 2).sum())
    assert log_growth(omega, b) == want and log_growth(omega, b.float()) == log_growth(omega, b.float().double())
    assert log_growth(omega, b[:0]) == 0.0 and stable_steps(omega, b[:0]) == 0
    assert stable_steps(omega, b) == 156  # the README's n = 4 at 60 steps
