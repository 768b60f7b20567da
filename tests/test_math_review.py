"""Independent float64 review of three op families against ``math-samplers.md`` (sections 1, 3.3, 4.4-4.6).

Every oracle here is re-derived from the notes and written out in NumPy/SciPy, not taken from diffkern:

* McAllester's likelihood (3.3): for Gaussian data ``N(mu, s^2 I)`` at ``y = mu`` the eps-form integrand is
  deterministic, ``-(1 - c)d`` with ``c = (s^2/(s^2 + sigma^2))^2``, so the fixed grid is a plain midpoint rule
  in ``ln sigma`` converging at order 2 to ``E[-ln p_{sigma_min}(y + sigma_min eps)]`` (closed form). For a 1-D
  Gaussian mixture the identity is checked by quadrature over eps and ``ln sigma`` (SciPy), then the Monte Carlo
  estimator and the probability-flow ODE against it. A change of units ``x = a*raw`` shifts ln p by ``-d ln a``.
* Chen et al.'s optimal denoiser (4.4): the softmax in the distance form ``-||x - y_i||^2/(2 sigma^2)`` (not the
  dot-product form the ops use), with derived float32/bfloat16 error bounds; memorisation from small sigma; the
  ODE-jump as a truncated schedule and the Euler step as a convex combination (4.2, 4.6).
* IADB (1.3, 1.6): for Gaussian data ``N(m, s^2)`` and Gaussian noise the posterior means are affine in x_alpha,
  so the deterministic sampler is an affine map whose slope is a product written out here; with the exact
  deblender the mean is exact at every N and the standard deviation converges to s at order 1. The stochastic
  variants' moments follow a float64 recursion (derived from 1.6's formula with the posterior means).
"""
import math

import numpy as np
import pytest
import torch
from scipy import integrate

from diffkern import analytic, schedules
from diffkern.likelihood import log_likelihood, ode_log_likelihood
from diffkern.ops import iadb_blend
from diffkern.ops.optimal_denoiser import optimal_denoiser
from diffkern.sampling import sample, sample_iadb

F64 = torch.float64
REF = "reference"

#----------------------------------------------------------------------------
# 1. McAllester's likelihood.

S, MU, DIM = 0.7, 0.4, 3


def _gauss_target(d, s, sigma_min, r2=0.0):
    """E[-ln N(y + sigma_min*eps; mu, (s^2 + sigma_min^2) I)] with ||y - mu||^2 = r2 (nats)."""
    v = s * s + sigma_min * sigma_min
    return 0.5 * d * math.log(2 * math.pi * v) + (r2 + d * sigma_min ** 2) / (2 * v)


def _gauss_midpoint(d, s, sigma_min, sigma_max, n):
    """Terminal term plus the midpoint rule (n strata of ln sigma) of -(1 - c)d: -ln p at y = mu."""
    span = math.log(sigma_max / sigma_min)
    u = np.log(sigma_min) + (np.arange(n) + 0.5) * span / n
    c = (s * s / (s * s + np.exp(2 * u))) ** 2
    return _gauss_target(d, s, sigma_max) - (span / n) * d * float((1 - c).sum())


@pytest.mark.parametrize("sigma_min, sigma_max", [(1e-3, 80.0), (1e-2, 10.0), (0.1, 3.0)])
def test_gaussian_at_the_mean_is_the_midpoint_rule_of_order_two(sigma_min, sigma_max):
    """The estimator reproduces the independent quadrature to rounding (the integrand is deterministic at the
    mean), and the quadrature converges to the closed form at order 2 (error ratio 4 per doubling)."""
    gauss = analytic.GaussianMixture([1.0], torch.full((1, DIM), MU, dtype=F64), [S])
    y = torch.full((2, DIM), MU, dtype=F64)
    for n in (8, 32):
        res = log_likelihood(gauss, y, sigma_min=sigma_min, sigma_max=sigma_max, n_levels=n, grid="fixed",
                             n_samples=2, data_mean=MU, data_std=S, backend=REF)
        torch.testing.assert_close(-res.repeats, torch.full((2, 2), _gauss_midpoint(DIM, S, sigma_min, sigma_max, n),
                                                            dtype=F64), rtol=0, atol=1e-11)
    target = _gauss_target(DIM, S, sigma_min)
    errs = [_gauss_midpoint(DIM, S, sigma_min, sigma_max, n) - target for n in (128, 256, 512)]
    for coarse, fine in zip(errs, errs[1:]):
        assert 3.8 < coarse / fine < 4.2, errs
    # and E[-ln p_{sigma_min}(y + sigma_min eps)] is ln p(y) up to O(sigma_min^2)
    assert abs(target - _gauss_target(DIM, S, 0.0)) <= DIM * sigma_min ** 2 / S ** 2


def test_gaussian_away_from_the_mean_within_standard_errors():
    """Away from the mean: the random (stratified, unbiased) grid is within 5 standard errors of the closed form."""
    gauss = analytic.GaussianMixture([1.0], torch.full((1, DIM), MU, dtype=F64), [S])
    y = torch.tensor([[1.3, -0.2, 0.5], [MU, MU + 1.0, MU]], dtype=F64)
    res = log_likelihood(gauss, y, sigma_min=1e-3, sigma_max=40.0, n_levels=32, grid="random", n_samples=400,
                         seed=7, data_mean=MU, data_std=S, backend="cpp")
    target = torch.tensor([_gauss_target(DIM, S, 1e-3, float(((p - MU) ** 2).sum())) for p in y], dtype=F64)
    assert (res.stderr < 0.06).all(), res.stderr  # sharp enough for the check to mean something
    assert ((-res.log_prob - target).abs() <= 5 * res.stderr).all(), ((-res.log_prob - target) / res.stderr)


def test_change_of_units_shifts_by_d_log_scale():
    """Points stored as x = a*raw (data std a*s, sigmas scaled by a): ln p_x(a*y) = ln p_raw(y) - d ln a, exactly
    for the estimator (the integrand depends on sigma/s only; the terminal carries the Jacobian)."""
    a = 127.5
    raw = log_likelihood(analytic.GaussianMixture([1.0], torch.full((1, DIM), MU, dtype=F64), [S]),
                         torch.full((1, DIM), MU, dtype=F64), sigma_min=1e-2, sigma_max=20.0, n_levels=16,
                         grid="fixed", n_samples=2, data_mean=MU, data_std=S, backend=REF)
    scaled = log_likelihood(analytic.GaussianMixture([1.0], torch.full((1, DIM), a * MU, dtype=F64), [a * S]),
                            torch.full((1, DIM), a * MU, dtype=F64), sigma_min=a * 1e-2, sigma_max=a * 20.0,
                            n_levels=16, grid="fixed", n_samples=2, data_mean=a * MU, data_std=a * S, backend=REF)
    torch.testing.assert_close(scaled.log_prob, raw.log_prob - DIM * math.log(a), rtol=0, atol=1e-10)


# A 1-D two-component mixture, in NumPy.
MW, MM, MS = np.array([0.4, 0.6]), np.array([-1.0, 1.5]), np.array([0.3, 0.5])
EPS = np.linspace(-12.0, 12.0, 24001)                     # trapezoid nodes for E over eps ~ N(0, 1)
PHI = np.exp(-0.5 * EPS ** 2) / math.sqrt(2 * math.pi) * (EPS[1] - EPS[0])


def _mix_log_p(x, sigma):
    v = MS ** 2 + sigma ** 2
    comp = np.log(MW) - 0.5 * ((x[..., None] - MM) ** 2 / v + np.log(2 * np.pi * v))
    top = comp.max(-1, keepdims=True)
    return (top + np.log(np.exp(comp - top).sum(-1, keepdims=True)))[..., 0]


def _mix_denoise(x, sigma):
    """E[y | y + sigma*eps = x]: responsibilities times the components' posterior means."""
    v = MS ** 2 + sigma ** 2
    comp = np.log(MW) - 0.5 * ((x[..., None] - MM) ** 2 / v + np.log(v))
    r = np.exp(comp - comp.max(-1, keepdims=True))
    r /= r.sum(-1, keepdims=True)
    return (r * (MM + MS ** 2 / v * (x[..., None] - MM))).sum(-1)


def _mix_nll_identity(y, sigma_min, sigma_max):
    """Right-hand side of 3.3 in sigma form: E[-ln p_max] + int (E(y - D)^2/sigma^2 - d) d ln sigma."""
    def integrand(u):
        sig = math.exp(u)
        return float((PHI * (y - _mix_denoise(y + sig * EPS, sig)) ** 2).sum()) / sig ** 2 - 1.0
    body, _ = integrate.quad(integrand, math.log(sigma_min), math.log(sigma_max), epsabs=1e-11, epsrel=1e-11,
                             limit=400)
    terminal = -float((PHI * _mix_log_p(y + sigma_max * EPS, sigma_max)).sum())
    return terminal + body


@pytest.mark.parametrize("sigma_min, sigma_max", [(1e-2, 20.0), (1e-3, 80.0)])
def test_mixture_identity_estimator_and_ode(sigma_min, sigma_max):
    """The identity holds for the mixture (quadrature, to 1e-7); the Monte Carlo estimator (random grid, exact
    terminal) is within 5 standard errors of it; the ODE estimate converges to ln p_{sigma_min}(y) as rtol falls."""
    ys = np.array([-1.0, 0.3, 2.0])                       # a mode, between the modes, the tail of the wide one
    lhs = np.array([-float((PHI * _mix_log_p(y + sigma_min * EPS, sigma_min)).sum()) for y in ys])
    rhs = np.array([_mix_nll_identity(y, sigma_min, sigma_max) for y in ys])
    np.testing.assert_allclose(rhs, lhs, rtol=0, atol=1e-7)

    gmm = analytic.GaussianMixture(torch.tensor(MW), torch.tensor(MM)[:, None], torch.tensor(MS))
    pts = torch.tensor(ys, dtype=F64)[:, None]
    res = log_likelihood(gmm, pts, sigma_min=sigma_min, sigma_max=sigma_max, n_levels=32, n_samples=600, seed=3,
                         data_std=1.3, terminal=gmm.log_prob, backend="cpp")
    z = (res.log_prob + torch.tensor(lhs)) / res.stderr
    assert (res.stderr < 0.06).all() and (z.abs() <= 5).all(), (res.stderr, z)

    exact = torch.tensor(_mix_log_p(ys, sigma_min))
    errs = [float((ode_log_likelihood(gmm, pts, sigma_min=sigma_min, sigma_max=sigma_max, rtol=tol, atol=tol,
                                      terminal=gmm.log_prob) - exact).abs().max()) for tol in (1e-4, 1e-8)]
    assert errs[1] < 1e-6 and errs[1] < errs[0], errs

def test_ode_estimate_names_a_nan_state():
    """A NaN model output used to reject every step until max_steps, then report "no convergence"."""
    with pytest.raises(FloatingPointError, match="model: the ODE state turned NaN"):
        ode_log_likelihood(lambda z, s: z * float("nan"), torch.zeros(2, 2, dtype=F64))

#----------------------------------------------------------------------------
# 2. The optimal denoiser over a dataset (Chen et al.).


def _posterior_mean(x, data, sigma):
    """sum_i w_i y_i with w = softmax(-||x - y_i||^2/(2 sigma^2)), the distance form, float64 NumPy."""
    x, y = np.asarray(x, np.float64), np.asarray(data, np.float64)
    logits = -((x[:, None, :] - y[None]) ** 2).sum(-1) / (2 * sigma * sigma)
    w = np.exp(logits - logits.max(1, keepdims=True))
    return torch.from_numpy((w / w.sum(1, keepdims=True)) @ y)


def _bound(x, data, sigma, dtype):
    """Error bound of a float32-accumulated softmax on inputs rounded to ``dtype``: each logit
    ``x.y - ||y||^2/2`` is a sum of D products and D squares (error <= D*u*(|x||y| + ||y||^2/2) by the standard
    dot-product bound, u = 2^-24), scaled by 1/sigma^2; a logit error delta moves D by at most
    delta*max_i ||y_i - D|| per coordinate (softmax derivative); plus one rounding of the output."""
    x, y = x.double(), data.double()
    u = 2.0 ** -24
    dim = x.shape[1]
    logit = dim * u * (float(x.abs().max() * y.abs().max()) * dim + 0.5 * float((y * y).sum(1).max())) / sigma ** 2
    spread = float((y[None] - y.mean(0)).abs().max()) * 2
    out_ulp = (2.0 ** -8 if dtype == torch.bfloat16 else u) * float(y.abs().max())
    return 2 * spread * logit + 2 * out_ulp


@pytest.mark.parametrize("offset", [0.0, 1000.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_optimal_denoiser_is_the_posterior_mean(dtype, offset):
    """D(x; sigma) = E[x0 | x] for the empirical distribution, on 3000 points (several chunks): float64 paths to
    1e-10; float32/bfloat16 inputs through the fused path within the derived bound (with the data offset by 1000,
    the bound uses the centred magnitudes: the fused path must centre the data to meet it)."""
    g = torch.Generator().manual_seed(0)
    data = torch.randn(3000, 6, generator=g, dtype=F64) + offset
    x = data[:4] + 0.4 * torch.randn(4, 6, generator=g, dtype=F64)
    for sigma in (2.0, 0.5, 0.1):
        truth = _posterior_mean(x, data, sigma)
        torch.testing.assert_close(analytic.EmpiricalDenoiser(data, chunk_size=512)(x, sigma), truth,
                                   rtol=0, atol=1e-10 * max(1.0, offset))
        torch.testing.assert_close(optimal_denoiser(x, data, sigma, backend=REF), truth, rtol=0,
                                   atol=1e-10 * max(1.0, offset))
        xl, dl = x.to(dtype), data.to(dtype)
        truth_l = _posterior_mean(xl.double(), dl.double(), sigma)   # the exact answer for the rounded inputs
        out = analytic.EmpiricalDenoiser(dl.double(), backend=REF)(xl, sigma)
        assert out.dtype == dtype
        centred = dl.double() - dl.double().mean(0)
        bound = _bound(xl.double() - dl.double().mean(0), centred, sigma, dtype) + \
            (2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -24) * 2 * offset
        err = float((out.double() - truth_l).abs().max())
        assert err <= bound, (sigma, err, bound)


@pytest.mark.parametrize("sigma", [1e-4, 1e-30, 1e-200])
def test_tiny_sigma_is_the_nearest_point_and_no_nan(sigma):
    """As sigma -> 0 the weights become one-hot on the nearest point (no inf - inf = nan)."""
    g = torch.Generator().manual_seed(1)
    data = torch.randn(500, 5, generator=g, dtype=F64)
    x = torch.randn(6, 5, generator=g, dtype=F64)
    nearest = data[((x[:, None] - data[None]) ** 2).sum(-1).argmin(1)]
    torch.testing.assert_close(analytic.EmpiricalDenoiser(data, chunk_size=64)(x, sigma), nearest, rtol=0, atol=0)
    torch.testing.assert_close(optimal_denoiser(x, data, sigma, backend=REF), nearest, rtol=0, atol=0)
    # A sigma > 0 that underflows the compute dtype (float32 below ~1e-38) still means the nearest point, not x.
    for dtype in (torch.float32, torch.bfloat16):
        xl, dl = x.to(dtype).double(), data.to(dtype).double()
        for sig in (sigma, torch.tensor([sigma], dtype=F64)):
            out = optimal_denoiser(x.to(dtype), data.to(dtype), sig, backend=REF)
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out.double(), dl[((xl[:, None] - dl[None]) ** 2).sum(-1).argmin(1)],
                                       rtol=0, atol=0)


@pytest.mark.parametrize("method", ["euler", "heun", "dpmpp_2m"])
def test_sampling_the_optimal_denoiser_memorises(method):
    """Chen et al.: the ODE with the optimal denoiser ends on a training point, both from sigma_max = 80 and
    from a small sigma (0.05, started next to a training point: it returns that very point)."""
    g = torch.Generator().manual_seed(2)
    data = torch.randn(40, 4, generator=g, dtype=F64)
    den = analytic.EmpiricalDenoiser(data, chunk_size=16)
    x = torch.randn(8, 4, generator=g, dtype=F64) * 80.0
    out = sample(den, x, schedules.karras(25, 0.002, 80.0), method, backend=REF)
    dist = ((out[:, None] - data[None]) ** 2).sum(-1).sqrt().min(1).values
    assert float(dist.max()) < 1e-12, dist
    start = data[:8] + 0.05 * torch.randn(8, 4, generator=g, dtype=F64)
    out = sample(den, start, schedules.karras(10, 0.002, 0.05), method, backend=REF)
    torch.testing.assert_close(out, data[:8], rtol=0, atol=1e-12)


def test_euler_is_a_convex_combination_and_ode_jump_returns_the_denoised_estimate():
    """4.2: x_{n+1} = (t_{n+1}/t_n) x_n + (1 - t_{n+1}/t_n) r_n on the recorded trajectories; 4.6: the schedule
    cut after step n and ended in 0 returns r(x_n; t_n) (checked with the distance-form denoiser)."""
    g = torch.Generator().manual_seed(4)
    data = torch.randn(30, 3, generator=g, dtype=F64)
    den = analytic.EmpiricalDenoiser(data)
    x = torch.randn(5, 3, generator=g, dtype=F64) * 20.0
    sig = schedules.karras(12, 0.01, 20.0)
    _, rec = sample(den, x, sig, "euler", backend=REF, record=True)
    for n in range(12):
        r = _posterior_mean(rec["x"][n], data, float(sig[n])) if sig[n] > 0 else rec["x"][n]
        torch.testing.assert_close(rec["denoised"][n], r, rtol=0, atol=1e-12)
        ratio = float(sig[n + 1] / sig[n])
        torch.testing.assert_close(rec["x"][n + 1], ratio * rec["x"][n] + (1 - ratio) * r, rtol=0, atol=1e-12)
    for n in (3, 8):
        jump = sample(den, x, torch.cat([sig[:n + 1], torch.zeros(1, dtype=F64)]), "euler", backend=REF)
        torch.testing.assert_close(jump, _posterior_mean(rec["x"][n], data, float(sig[n])), rtol=0, atol=1e-12)

#----------------------------------------------------------------------------
# 3. IADB with the exact deblender of a Gaussian pair: x1 ~ N(M1, S1^2) (data), x0 ~ N(0, 1) (noise).

M1, S1 = 0.7, 0.4


def _means(x, a):
    """(E[x0 | x_a], E[x1 | x_a]) for x_a = (1-a) x0 + a x1: Gaussian conditioning, V = Var(x_a)."""
    v = (1 - a) ** 2 + a * a * S1 * S1
    return (1 - a) / v * (x - a * M1), M1 + a * S1 * S1 / v * (x - a * M1)


def _d_model(x, alpha):
    a = alpha.double().reshape(-1, *[1] * (x.dim() - 1))
    x0b, x1b = _means(x.double(), a)
    return (x1b - x0b).to(x.dtype)


def _two_head_model(x, alpha):
    a = alpha.double().reshape(-1, *[1] * (x.dim() - 1))
    return tuple(t.to(x.dtype) for t in _means(x.double(), a))


def _euler_slope(alphas):
    """The Euler map is x -> intercept + slope*x; slope = prod_t (1 + (a'-a) g(a)), g = d(x1_bar - x0_bar)/dx."""
    slope = 1.0
    for a, an in zip(alphas[:-1], alphas[1:]):
        slope *= 1 + (an - a) * (a * S1 * S1 - (1 - a)) / ((1 - a) ** 2 + a * a * S1 * S1)
    return slope


@pytest.mark.parametrize("variant", ["euler", "two_head"])
def test_iadb_euler_on_a_gaussian_pair(variant):
    """x' = x + (a'-a) D with the exact deblender: the mean is exact at every N, the slope is the product above
    (uniform and non-uniform grids) and converges to S1 at order 1; two_head at lam = 0 is the same step."""
    model = _d_model if variant == "euler" else _two_head_model
    basis = torch.tensor([[0.0], [1.0]], dtype=F64)
    errs = []
    for n in (64, 128, 256):
        out = sample_iadb(model, basis, steps=n, variant=variant, backend=REF)
        assert abs(float(out[0]) - M1) < 1e-13
        slope = float(out[1] - out[0])
        assert abs(slope - _euler_slope([k / n for k in range(n + 1)])) < 1e-13
        errs.append(slope - S1)
    assert 1.9 < errs[0] / errs[1] < 2.1 and 1.9 < errs[1] / errs[2] < 2.1, errs
    alphas = [(k / 40) ** 2 for k in range(41)]
    out = sample_iadb(model, basis, alphas, variant=variant, backend=REF)
    assert abs(float(out[0]) - M1) < 1e-13 and abs(float(out[1] - out[0]) - _euler_slope(alphas)) < 1e-13


def _stochastic_moments(n, lam):
    """Mean and variance after n uniform steps of 1.6's step x' = a' x1_bar + (1-a')(k x0_bar + sqrt(1-k^2) xi),
    k = (sigma'/sigma)^(lam^2), sigma = (1-a)/a (k = 0 at a = 0): an affine map of x plus independent noise."""
    mean, var = 0.0, 1.0
    for t in range(n):
        a, an = t / n, (t + 1) / n
        k = 0.0 if a == 0 else (((1 - an) / an) / ((1 - a) / a)) ** (lam * lam)
        v = (1 - a) ** 2 + a * a * S1 * S1
        slope = an * a * S1 * S1 / v + (1 - an) * k * (1 - a) / v
        mean = an * M1 + slope * (mean - a * M1)
        var = slope * slope * var + (1 - an) ** 2 * (1 - k * k)
    return mean, var


@pytest.mark.parametrize("variant, lam", [("stochastic", 0.5), ("stochastic", 1.0), ("two_head", 1.0),
                                          ("stochastic", 2.0)])
def test_iadb_stochastic_moments_on_a_gaussian_pair(variant, lam):
    """The stochastic variants keep the mean exact and their variance follows the recursion (Monte Carlo, 1e5
    samples, 5 standard errors); the recursion's variance tends to S1^2 at order 1 as N grows."""
    n_samples, steps = 100_000, 16
    x0 = torch.randn(n_samples, 1, generator=torch.Generator().manual_seed(5), dtype=F64)
    model = _d_model if variant == "stochastic" else _two_head_model
    out = sample_iadb(model, x0, steps=steps, variant=variant, lam=lam, backend="cpp", seed=9)
    mean, var = _stochastic_moments(steps, lam)
    assert abs(mean - M1) < 1e-12
    assert abs(float(out.mean()) - mean) < 5 * math.sqrt(var / n_samples)
    assert abs(float(out.var()) / var - 1) < 5 * math.sqrt(2 / n_samples)
    errs = [_stochastic_moments(n, lam)[1] - S1 * S1 for n in (1024, 2048)]
    assert 1.8 < errs[0] / errs[1] < 2.2, errs


def test_iadb_blend_is_the_convex_combination():
    g = torch.Generator().manual_seed(6)
    x0, x1 = torch.randn(3, 2, 5, generator=g, dtype=F64), torch.randn(3, 2, 5, generator=g, dtype=F64)
    alpha = torch.tensor([0.0, 0.3, 1.0], dtype=F64)
    target = torch.empty_like(x0)
    for backend in (REF, "cpp"):
        out = iadb_blend(x0, x1, alpha, target_out=target, backend=backend)
        a = alpha[:, None, None]
        torch.testing.assert_close(out, (1 - a) * x0 + a * x1, rtol=0, atol=1e-15)
        torch.testing.assert_close(target, x1 - x0, rtol=0, atol=0)
