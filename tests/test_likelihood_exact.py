"""McAllester's likelihood (``math-samplers.md`` 3.3) against closed forms and an independent ODE solver.

For Gaussian data ``N(mu, s^2 I)`` and the point y (``r = y - mu``) everything is known in closed form:
with the control variate c = (s^2/(s^2 + sigma^2))^2 the integrand of a level is
``||eps - eps_hat||^2 - c||eps||^2 - (1 - c)d = sigma^2 ||r||^2/(s^2 + sigma^2)^2 - (1 - c)d
- 2 (s^2/(s^2 + sigma^2)) sigma r.eps/(s^2 + sigma^2)``: a known mean plus noise linear in eps. The
estimator targets ``E[-ln p_{sigma_min}(y + sigma_min*eps)]`` (closed form too), so on the fixed grid its
only bias is the midpoint rule's, and its only noise has a known variance.

The probability-flow ODE estimate is checked against scipy's ``solve_ivp`` on the same ODE, with the
mixture's denoiser and the trace of its Jacobian written out here in NumPy (not autograd).
"""
import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from diffkern import analytic
from diffkern.likelihood import log_likelihood, ode_log_likelihood, sigma_grid
from diffkern.testing import usable_backends

F64 = torch.float64
S, MU = 0.7, 0.4                       # data std and mean (every coordinate)
SIGMA_MIN, SIGMA_MAX, LEVELS = 1e-2, 40.0, 32


def _gaussian(dim):
    return analytic.GaussianMixture([1.0], torch.full((1, dim), MU, dtype=F64), [S])


def _target(y, sigma):
    """E[-ln N(y + sigma*eps; mu, (s^2 + sigma^2) I)], (B,) float64."""
    d = y.shape[1]
    var = S * S + sigma * sigma
    return 0.5 * d * math.log(2 * math.pi * var) + (((y - MU) ** 2).sum(1) + d * sigma * sigma) / (2 * var)


def _quadrature(y, levels):
    """(mean, standard deviation) of one repeat of the fixed-grid estimate of -ln p, from the closed form."""
    d, r2 = y.shape[1], ((y - MU) ** 2).sum(1)
    sig, w = sigma_grid(levels, 1, SIGMA_MIN, SIGMA_MAX, "fixed")
    sig = sig[:, 0]
    shrink = S * S / (S * S + sig * sig)                                   # sqrt(c)
    mean = (sig ** 2 / (S * S + sig * sig) ** 2)[:, None] * r2[None] - ((1 - shrink ** 2) * d)[:, None]
    var = (4 * shrink ** 2 * sig ** 2 / (S * S + sig * sig) ** 2)[:, None] * r2[None]
    return _target(y, SIGMA_MAX) + w * mean.sum(0), w * var.sum(0).sqrt()


def _midpoint_error_bound(y, levels=LEVELS):
    """The midpoint rule's error at ``levels`` levels, bounded by Richardson: the rule is at least second
    order, so |E_n| <= (4/3)|M_n - M_2n|; doubled for safety."""
    coarse, fine = _quadrature(y, levels)[0], _quadrature(y, 2 * levels)[0]
    return 2 * (4 / 3) * (coarse - fine).abs()


def _levels(backend):
    """Triton's interpreter costs ~0.3 s per launch (two per level): 8 levels keep a test under 5 s."""
    return 8 if backend == "triton" else LEVELS


def _estimate(y, dtype, backend, n_samples, seed=0):
    return log_likelihood(_gaussian(y.shape[1]), y.to(dtype), sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX,
                          n_levels=_levels(backend), grid="fixed", n_samples=n_samples, seed=seed, data_mean=MU,
                          data_std=S, backend=backend)


def test_closed_form_quadrature_converges_to_the_target():
    """The host-side identity itself: the fixed-grid sum of the exact integrand plus the terminal term is
    -ln p_{sigma_min}, to within the midpoint rule's error (which is tiny: the integrand is flat at both ends)."""
    y = torch.tensor([[MU, MU, MU], [1.3, -0.2, 0.5], [3.0, MU, -2.0]], dtype=F64)
    mean, _ = _quadrature(y, LEVELS)
    bound = _midpoint_error_bound(y)
    assert ((mean - _target(y, SIGMA_MIN)).abs() <= bound + 1e-12).all(), (mean - _target(y, SIGMA_MIN), bound)
    assert (bound < 1e-3).all()  # and the grid is fine enough for the bound to mean something


@pytest.mark.parametrize("backend", usable_backends("cpu"))
def test_at_the_mean_the_estimate_is_deterministic_and_exact(backend):
    """At y = mu the noise term vanishes: the float64 estimate equals the closed-form quadrature to rounding,
    whatever the noise drawn, and ln p_{sigma_min}(y) within the midpoint rule's error."""
    y = torch.full((2, 4), MU, dtype=F64)
    res = _estimate(y, F64, backend, n_samples=3)
    mean, sd = _quadrature(y, _levels(backend))
    assert (sd == 0).all()
    torch.testing.assert_close(-res.repeats, mean.expand(3, 2), rtol=0, atol=1e-10)
    bound = _midpoint_error_bound(y, _levels(backend))
    assert ((res.log_prob + _target(y, SIGMA_MIN)).abs() <= bound + 1e-10).all()


# 500 repeats are too slow for Triton's interpreter (one program per row and level); the backends' agreement
# on the same rows is test_likelihood.py's test_backends_agree_and_seed_reproduces.
@pytest.mark.parametrize("backend", [b for b in usable_backends("cpu") if b != "triton"])
def test_away_from_the_mean_the_noise_has_the_closed_form_variance(backend):
    """Away from the mean the repeats are the closed-form mean plus noise of the closed-form standard
    deviation: their average lies within 5 of its standard errors (known, not estimated) of the mean, and
    their sample standard deviation within 15% of the closed form (the spread of a 500-sample estimate is 3%)."""
    y = torch.tensor([[1.3, -0.2, 0.5], [MU + 0.05, MU, MU - 0.1]], dtype=F64)
    n = 500
    res = _estimate(y, F64, backend, n_samples=n, seed=2)
    mean, sd = _quadrature(y, LEVELS)
    assert ((-res.log_prob - mean).abs() <= 5 * sd / math.sqrt(n)).all(), ((-res.log_prob - mean) / (sd / n ** 0.5))
    ratio = res.repeats.std(0) / sd
    assert ((ratio - 1).abs() < 0.15).all(), ratio
    torch.testing.assert_close(res.stderr, sd / math.sqrt(n), rtol=0.15, atol=0)


@pytest.mark.parametrize("backend", usable_backends("cpu"))
def test_float32_points_at_the_mean(backend):
    """Float32 points (float32 model inputs, element terms and accumulator): the deterministic case again,
    within float32 rounding. Each element term (size ~eps^2, mean <= 4 in magnitude) is rounded a few times
    and weighted by w, over all levels and elements (sum of w = span), and the accumulator rounds once per
    level: at most 8 ulps of ``4*span*d + levels``."""
    y = torch.full((2, 4), MU, dtype=F64)
    res = _estimate(y, torch.float32, backend, n_samples=3)
    mean, _ = _quadrature(y, _levels(backend))
    atol = 8 * 2 ** -24 * (4 * math.log(SIGMA_MAX / SIGMA_MIN) * y.shape[1] + _levels(backend))
    torch.testing.assert_close(-res.repeats, mean.expand(3, 2), rtol=0, atol=atol)

#----------------------------------------------------------------------------
# Probability-flow ODE: ode_log_likelihood against scipy.integrate.solve_ivp with a closed-form divergence.

WEIGHTS = np.array([0.3, 0.7])
MEANS = np.array([[-1.0, 0.5], [1.2, -0.4]])
STDS = np.array([[0.4, 0.6], [0.5, 0.3]])


def _denoiser_and_trace(z, sigma):
    """D(z, sigma) and tr(dD/dz) of the 2-component diagonal mixture, in NumPy, for one point z (d,).

    Component k noised: N(mu_k, v_k), v_k = s_k^2 + sigma^2; posterior means m_k = mu_k + (s_k^2/v_k)(z - mu_k);
    responsibilities r_k with d r_k/dz_i = r_k (g_ki - sum_j r_j g_ji), g_k = -(z - mu_k)/v_k. Then
    D = sum_k r_k m_k and tr = sum_k r_k sum_i s_ki^2/v_ki + sum_k r_k sum_i m_ki (g_ki - gbar_i)."""
    v = STDS ** 2 + sigma ** 2
    log_n = np.log(WEIGHTS) - 0.5 * (((z - MEANS) ** 2) / v + np.log(2 * np.pi * v)).sum(1)
    r = np.exp(log_n - log_n.max())
    r /= r.sum()
    m = MEANS + STDS ** 2 / v * (z - MEANS)
    g = -(z - MEANS) / v
    gbar = r @ g
    trace = (r * (STDS ** 2 / v).sum(1)).sum() + (r[:, None] * m * (g - gbar)).sum()
    return r @ m, trace


def _scipy_log_prob(x, sigma_min, sigma_max, rtol):
    """ln p_{sigma_min}(x) by solving dz/ds = z - D, dl/ds = d - tr(dD/dz) in s = ln sigma with scipy."""
    d = x.shape[0]

    def rhs(s, u):
        den, tr = _denoiser_and_trace(u[:d], math.exp(s))
        return np.concatenate([u[:d] - den, [d - tr]])

    sol = solve_ivp(rhs, (math.log(sigma_min), math.log(sigma_max)), np.concatenate([x, [0.0]]), method="DOP853",
                    rtol=rtol, atol=rtol)
    assert sol.success, sol.message
    z, logdet = sol.y[:d, -1], sol.y[d, -1]
    v = STDS ** 2 + sigma_max ** 2
    log_pt = np.log((WEIGHTS * np.exp(-0.5 * (((z - MEANS) ** 2) / v + np.log(2 * np.pi * v)).sum(1))).sum())
    return log_pt + logdet


def test_trace_formula_matches_finite_differences():
    """The closed-form divergence of the oracle, against central differences of its own D (1e-6 steps)."""
    z, sig, h = np.array([0.1, 0.2]), 0.8, 1e-6
    _, trace = _denoiser_and_trace(z, sig)
    fd = sum((_denoiser_and_trace(z + h * e, sig)[0][i] - _denoiser_and_trace(z - h * e, sig)[0][i]) / (2 * h)
             for i, e in enumerate(np.eye(2)))
    assert abs(trace - fd) < 1e-8


def test_ode_estimate_matches_scipy_and_the_exact_density():
    """Tolerances: both solvers run at rtol = atol = 1e-9 on an O(10) solution; the log-density error of such
    a run is ~1e-8 (checked against the closed form below), so they must agree to 1e-6."""
    gmm = analytic.GaussianMixture(torch.tensor(WEIGHTS), torch.tensor(MEANS), torch.tensor(STDS))
    x = torch.tensor([[-0.9, 0.4], [1.0, -0.2], [0.1, 0.0]], dtype=F64)
    smin, smax = 1e-2, 20.0
    ours = ode_log_likelihood(gmm, x, sigma_min=smin, sigma_max=smax, rtol=1e-9, atol=1e-9, terminal=gmm.log_prob)
    oracle = torch.tensor([_scipy_log_prob(p.numpy(), smin, smax, 1e-9) for p in x], dtype=F64)
    torch.testing.assert_close(ours, oracle, rtol=0, atol=1e-6)
    # The ODE carries ln p_{sigma_min} exactly to sigma_max: both equal the closed form at sigma_min.
    torch.testing.assert_close(oracle, gmm.log_prob(x, smin), rtol=0, atol=1e-6)


def test_mcallester_estimate_matches_the_scipy_oracle():
    """The Monte Carlo estimator (random grid, exact terminal) and the independent ODE oracle estimate the same
    ln p_{sigma_min}: within 4 of the estimator's standard errors."""
    gmm = analytic.GaussianMixture(torch.tensor(WEIGHTS), torch.tensor(MEANS), torch.tensor(STDS))
    x = torch.tensor([[-0.9, 0.4], [1.0, -0.2]], dtype=F64)
    smin, smax = 1e-2, 20.0
    oracle = torch.tensor([_scipy_log_prob(p.numpy(), smin, smax, 1e-8) for p in x], dtype=F64)
    res = log_likelihood(gmm, x, sigma_min=smin, sigma_max=smax, n_levels=48, n_samples=400, seed=5,
                         data_std=0.8, terminal=gmm.log_prob)
    assert (res.stderr < 0.05).all(), res.stderr
    assert ((res.log_prob - oracle).abs() <= 4 * res.stderr).all(), ((res.log_prob - oracle) / res.stderr)
