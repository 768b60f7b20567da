"""Review (session 17) of the mission's maths paths through the public API, each against an independent float64
oracle written here: the gradient-estimation sampler (Permenter & Yuan; ``math-samplers.md`` 2.4) at its knob
bounds, McAllester's lam family (3.2) and likelihood (3.3) on Gaussian data with a closed-form log-density, the
empirical optimal denoiser (Chen et al., 4.4) against a direct softmax, and IADB's blend/deblend ops (section 1).
"""
import math

import pytest
import torch

import diffkern.ops as dops
from diffkern import analytic, likelihood, schedules
from diffkern.ops import iadb as iadb_ops
from diffkern.ops import philox
from diffkern.sampling import sample, sample_iadb
from diffkern.testing import assert_matches_reference, make_tensor, noncontiguous, usable_backends

F64 = torch.float64
SEED = 3
TOL = 1e-12  # float64 against float64: rounding only
CPU = usable_backends("cpu")
ELEMENTWISE = [b for b in ("reference", "cpp") if b in CPU]


def _xi(x, i):
    return philox.noise_like(x, torch.tensor([SEED], dtype=torch.int64), i, F64)


def _gaussian_data(dim, mean=0.3, std=0.7):
    """Data N(mean, std^2 I): its exact denoiser as a one-component mixture."""
    return analytic.GaussianMixture([1.0], torch.full((1, dim), mean, dtype=F64), [std])

#----------------------------------------------------------------------------
# GE (smalldiffusion samples(gam, mu)): gamma = 1 is DDIM exactly, mu = 1/2 is DDPM, mu -> 1 stays finite.


def _ge_oracle(model, x, sig, gam, mu):
    """smalldiffusion's loop, with sigma_p in the overflow-free form sigma' (sigma'/sigma)^(mu/(1-mu))."""
    x, eps_prev = x.clone(), None
    for i, (s, sn) in enumerate(zip(sig[:-1], sig[1:])):
        d = model(x, torch.full((x.shape[0],), s, dtype=F64))
        eps = (x - d) / s
        if sn == 0:
            return d
        eps_av = eps if i == 0 else gam * eps + (1 - gam) * eps_prev
        sigma_p = sn * (sn / s) ** (mu / (1 - mu))
        x = x - (s - sigma_p) * eps_av + math.sqrt(sn * sn - sigma_p * sigma_p) * _xi(x, i)
        eps_prev = eps
    return x


@pytest.mark.parametrize("final_zero", [True, False])
def test_ge_gamma_one_is_ddim_and_mu_half_is_ddpm(final_zero):
    gmm = _gaussian_data(3)
    sig = schedules.karras(7, 0.01, 30.0).tolist()
    sig = sig if final_zero else sig[:-1]
    x = make_tensor((4, 3), F64, seed=1) * sig[0]
    ddim = sample(gmm, x, sig, "euler", backend="reference")
    torch.testing.assert_close(sample(gmm, x, sig, "ge", gamma=1.0, mu=0.0, backend="reference"), ddim,
                               rtol=TOL, atol=TOL)
    ddpm = sample(gmm, x, sig, "euler_ancestral", eta=1.0, seed=SEED, backend="reference")
    torch.testing.assert_close(sample(gmm, x, sig, "ge", gamma=1.0, mu=0.5, seed=SEED, backend="reference"), ddpm,
                               rtol=TOL, atol=TOL)


@pytest.mark.parametrize("mu", [0.0, 0.3, 0.9, 0.999, 1 - 1e-9])
@pytest.mark.parametrize("gamma", [-0.5, 1.0, 2.0, 3.0])
def test_ge_knob_range_against_smalldiffusion_loop(mu, gamma):
    gmm = _gaussian_data(2)
    sig = schedules.loglinear(6, 0.05, 12.0).tolist()[:-1]
    x = make_tensor((5, 2), F64, seed=2) * sig[0]
    out = sample(gmm, x, sig, "ge", gamma=gamma, mu=mu, seed=SEED, backend="reference")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, _ge_oracle(gmm, x, sig, gamma, mu), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("knobs, name", [({"mu": 1.0}, "mu"), ({"mu": -0.1}, "mu"), ({"gamma": math.nan}, "gamma"),
                                         ({"gamma": math.inf}, "gamma")])
def test_ge_bad_knobs_are_named(knobs, name):
    gmm = _gaussian_data(2)
    with pytest.raises((ValueError, TypeError), match=name):
        sample(gmm, torch.zeros(2, 2, dtype=F64), [2.0, 1.0, 0.0], "ge", backend="reference", **knobs)


def test_ge_one_step_and_empty_batch():
    gmm = _gaussian_data(2)
    x = make_tensor((3, 2), F64, seed=4) * 5
    torch.testing.assert_close(sample(gmm, x, [5.0, 0.0], "ge", backend="reference"),
                               gmm(x, torch.full((3,), 5.0, dtype=F64)), rtol=TOL, atol=TOL)
    for method in ("ge", "sde"):
        empty = sample(gmm, torch.zeros(0, 2, dtype=F64), [5.0, 1.0, 0.0], method, backend="reference")
        assert empty.shape == (0, 2)
    assert sample_iadb(lambda x, a: x, torch.zeros(0, 2, dtype=F64), [0.0, 0.5, 1.0], "stochastic",
                       backend="reference").shape == (0, 2)

#----------------------------------------------------------------------------
# McAllester's lam family: lam = 0 is the PF-ODE's DDIM step, lam large keeps finite coefficients.


@pytest.mark.parametrize("lam", [0.0, 1e-8, 0.7, 5.0, 40.0])
def test_sde_exponential_integrator_at_the_knob_bounds(lam):
    gmm = _gaussian_data(3)
    sig = schedules.karras(6, 0.02, 20.0).tolist()
    x = make_tensor((4, 3), F64, seed=5) * sig[0]
    ref = x.clone()
    for i, (s, sn) in enumerate(zip(sig[:-1], sig[1:])):
        d = gmm(ref, torch.full((4,), s, dtype=F64))
        if sn == 0:
            ref = d
            break
        a = math.exp((1 + lam * lam) * math.log(sn / s))
        noise = sn * math.sqrt(-math.expm1(2 * lam * lam * math.log(sn / s)))
        ref = d + a * (ref - d) + noise * _xi(ref, i)
    out = sample(gmm, x, sig, "sde", lam=lam, seed=SEED, backend="reference")
    torch.testing.assert_close(out, ref, rtol=TOL, atol=TOL)
    if lam == 0.0:
        torch.testing.assert_close(out, sample(gmm, x, sig, "euler", backend="reference"), rtol=TOL, atol=TOL)

#----------------------------------------------------------------------------
# McAllester's likelihood: Gaussian data N(m, s^2 I) has p_sigma = N(m, (s^2 + sigma^2) I) in closed form, so the
# estimate of E ln p_{sigma_min}(y + sigma_min*eps) is known exactly.


def _gaussian_expected_log_p(y, m, s, sigma_min):
    """E[ln N(y + sigma_min*eps; m, (s^2 + sigma_min^2) I)], (B,) float64."""
    yf = y.reshape(y.shape[0], -1).to(F64)
    d = yf.shape[1]
    v = s * s + sigma_min * sigma_min
    return -0.5 * d * math.log(2 * math.pi * v) - (((yf - m) ** 2).sum(1) + d * sigma_min ** 2) / (2 * v)


@pytest.mark.parametrize("shape", [(3, 1), (2, 5), (2, 2, 3, 2)])
@pytest.mark.parametrize("data", [(0.0, 1.0), (0.4, 0.3), (-1.5, 2.5)])
def test_likelihood_of_gaussian_data_across_dims_and_shapes(shape, data):
    m, s = data
    dim = math.prod(shape[1:])
    gmm = _gaussian_data(dim, m, s)

    def model(x, sigma):
        return gmm(x.reshape(x.shape[0], dim), sigma).reshape(x.shape)

    y = m + s * make_tensor(shape, F64, seed=len(shape) + dim) * 1.5
    res = likelihood.log_likelihood(model, y, sigma_min=1e-3, sigma_max=50.0, n_levels=48, n_samples=16,
                                    data_mean=m, data_std=s, backend="reference")
    truth = _gaussian_expected_log_p(y, m, s, 1e-3)
    z = (res.log_prob - truth) / res.stderr.clamp_min(1e-12)
    assert z.abs().max() < 5, (res.log_prob, truth, res.stderr)


def test_likelihood_noncontiguous_chunked_and_per_point_independent():
    """A non-contiguous batch, chunking (batch_size not dividing the rows) and a point's place in the batch do
    not change its estimate beyond float64 rounding (the noise is keyed per row)."""
    dim = 4
    gmm = _gaussian_data(dim, 0.2, 0.8)
    y = make_tensor((5, dim), F64, seed=11)
    base = likelihood.log_likelihood(gmm, y, n_levels=16, n_samples=3, data_mean=0.2, data_std=0.8,
                                     backend="reference")
    nc = noncontiguous(y)
    assert not nc.is_contiguous()
    for kw in ({"batch_size": 4}, {"batch_size": 1}, {}):
        again = likelihood.log_likelihood(gmm, nc, n_levels=16, n_samples=3, data_mean=0.2, data_std=0.8,
                                          backend="reference", **kw)
        torch.testing.assert_close(again.repeats, base.repeats, rtol=1e-13, atol=1e-11)


def test_likelihood_fixed_grid_is_the_exact_integral_for_gaussian_data_at_its_mean():
    """y at the data mean with the exact control variate: every level's integrand is the deterministic
    -(1 - c(sigma))*d, so the fixed grid's error is the midpoint rule's; 4096 levels bring it below 1e-6."""
    dim, m, s = 3, 0.5, 0.6
    gmm = _gaussian_data(dim, m, s)
    y = torch.full((2, dim), m, dtype=F64)
    res = likelihood.log_likelihood(gmm, y, sigma_min=1e-2, sigma_max=30.0, n_levels=4096, grid="fixed",
                                    n_samples=2, data_mean=m, data_std=s, backend="reference")
    torch.testing.assert_close(res.log_prob, _gaussian_expected_log_p(y, m, s, 1e-2), rtol=0, atol=1e-6)
    assert res.stderr.max() < 1e-9

#----------------------------------------------------------------------------
# Optimal denoiser (one Gaussian mean-shift step) against a direct float64 softmax.


def _direct(x, data, sigma):
    xf = x.reshape(x.shape[0], -1).to(F64)
    y = data.reshape(data.shape[0], -1).to(F64)
    logits = -((xf[:, None, :] - y[None]) ** 2).sum(-1) / (2 * sigma * sigma)
    return (torch.softmax(logits, 1) @ y).reshape(x.shape)


@pytest.mark.parametrize("sigma", [0.05, 0.5, 3.0, 1e3])
@pytest.mark.parametrize("dim", [1, 7, 3072])
def test_optimal_denoiser_against_direct_softmax_float64(sigma, dim):
    data = make_tensor((9, dim), F64, seed=dim)
    data = torch.cat([data, data[:2]])  # duplicated points: their weights add up
    x = data[[0, 4, 8]] + 0.3 * make_tensor((3, dim), F64, seed=dim + 1)
    out = dops.optimal_denoiser(x, data, sigma, backend="reference")
    torch.testing.assert_close(out, _direct(x, data, sigma), rtol=1e-10, atol=1e-10)
    ed = analytic.EmpiricalDenoiser(data, chunk_size=4)
    torch.testing.assert_close(ed(x, sigma), _direct(x, data, sigma), rtol=1e-10, atol=1e-10)


def test_optimal_denoiser_one_point_and_per_sample_sigma():
    data = make_tensor((1, 2, 3), F64, seed=9)
    x = make_tensor((4, 2, 3), F64, seed=10) * 4
    sig = torch.tensor([1e-3, 1.0, 10.0, 0.0], dtype=F64)
    out = dops.optimal_denoiser(x, data, sig, backend="reference")
    torch.testing.assert_close(out[:3], data.expand(3, 2, 3), rtol=0, atol=0)
    torch.testing.assert_close(out[3], x[3], rtol=0, atol=0)  # sigma = 0 returns x


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_optimal_denoiser_16_bit_storage(dtype):
    """Low-precision storage: within the storage rounding of the float64 answer on the rounded inputs (the
    weights are softmax of logits that round at |x||y|*eps(float32)/sigma^2, negligible here)."""
    data = make_tensor((40, 64), F64, seed=12).to(dtype)
    x = (data[:5].double() + 0.5 * make_tensor((5, 64), F64, seed=13)).to(dtype)
    for sigma in (0.3, 2.0, 50.0):
        truth = _direct(x, data, sigma)
        out = dops.optimal_denoiser(x, data, sigma, backend="reference")
        err = (out.double() - truth).abs().max().item()
        assert err <= 2 * torch.finfo(dtype).eps * truth.abs().max().item() + 1e-6, (sigma, err)

#----------------------------------------------------------------------------
# IADB: blend and deblend ops against their formulas in float64, per-sample alpha, awkward shapes.


@pytest.mark.parametrize("backend", ELEMENTWISE)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5, 7), (0, 4)])
def test_iadb_blend_and_deblend_formulas(backend, shape):
    x0, x1 = make_tensor(shape, F64, seed=14), make_tensor(shape, F64, seed=15)
    alpha = torch.linspace(0, 1, shape[0], dtype=F64) if shape[0] else torch.zeros(0, dtype=F64)
    target = torch.empty_like(x1)
    blend = iadb_ops.iadb_blend(noncontiguous(x0), x1, alpha, target_out=target, backend=backend)
    a = alpha.reshape(-1, *([1] * (len(shape) - 1)))
    torch.testing.assert_close(blend, (1 - a) * x0 + a * x1, rtol=TOL, atol=TOL)
    torch.testing.assert_close(target, x1 - x0, rtol=0, atol=0)
    d = make_tensor(shape, F64, seed=16)
    torch.testing.assert_close(iadb_ops.iadb_deblend(x0, d, 0.25, 0.5, backend=backend), x0 + 0.25 * d,
                               rtol=TOL, atol=TOL)
    torch.testing.assert_close(iadb_ops.iadb_deblend_two_head(x0, x1, 0.75, backend=backend),
                               0.25 * x0 + 0.75 * x1, rtol=TOL, atol=TOL)


def test_iadb_euler_is_ddim_on_the_mapped_schedule():
    """``math-samplers.md`` 1.5: IADB Euler on alphas = DDIM (euler) on sigma = (1-alpha)/alpha with x_VE = x/alpha
    (first alpha > 0, so sigma is finite)."""
    gmm = _gaussian_data(3, 0.1, 0.5)
    alphas = [0.05, 0.2, 0.5, 0.8, 1.0]
    sig = [(1 - a) / a for a in alphas]

    def iadb_model(x, alpha):  # D = x1_bar - x0_bar = (x - eps_hat)/alpha with the VE denoiser
        a = alpha.reshape(-1, 1)
        s = (1 - a) / a
        xve = x / a
        eps = (xve - gmm(xve, s.reshape(-1))) / s
        return (x - eps) / a

    x = make_tensor((6, 3), F64, seed=17) * 0.5
    out = sample_iadb(iadb_model, x, alphas, "euler", backend="reference")
    ve = sample(gmm, x / alphas[0], sig, "euler", backend="reference")
    torch.testing.assert_close(out, ve, rtol=1e-11, atol=1e-11)

#----------------------------------------------------------------------------
# 16-bit states of the stochastic members (sde at both integrators, ge with mu > 0, stochastic IADB): against the
# textbook loop in float32 with the state rounded to 16 bits once per model call, both measured against float64
# (the project's rule, diffkern.testing.assert_matches_reference). Non-contiguous inputs throughout.


def _one_gaussian(dtype):
    gmm = _gaussian_data(2, 0.4, 0.5)
    return lambda x, sigma: gmm(x.double(), sigma).to(dtype)


def _xi_state(x, i, dtype):
    return philox.noise_like(x, torch.tensor([SEED], dtype=torch.int64), i, dtype)


def _eager_stochastic(method, knobs, model, x, sig, cdt):
    """The sde (exponential / Euler-Maruyama) and ge(gamma, mu) loops, computed in ``cdt`` with the state kept in
    x's dtype."""
    dtype, eps_prev = x.dtype, None
    for i, (s, sn) in enumerate(zip(sig[:-1], sig[1:])):
        d = model(x, torch.full((x.shape[0],), s, dtype=F64)).to(cdt)
        xf = x.to(cdt)
        if sn == 0:
            x = d.to(dtype)
            continue
        xi = _xi_state(x, i, cdt)
        r = sn / s
        if method == "sde" and knobs["integrator"] == "exponential":
            lam2 = knobs["lam"] ** 2
            new = d + r ** (1 + lam2) * (xf - d) + sn * math.sqrt(1 - r ** (2 * lam2)) * xi
        elif method == "sde":
            lam = knobs["lam"]
            new = xf + (1 + lam * lam) / 2 * (1 - r * r) * (d - xf) + lam * math.sqrt(s * s - sn * sn) * xi
        else:
            gam, mu = knobs["gamma"], knobs["mu"]
            eps = (xf - d) / s
            eps_av = eps if eps_prev is None else gam * eps + (1 - gam) * eps_prev
            sigma_p = sn * r ** (mu / (1 - mu))
            new = xf - (s - sigma_p) * eps_av + math.sqrt(sn * sn - sigma_p * sigma_p) * xi
            eps_prev = eps
        x = new.to(dtype)
    return x


@pytest.mark.parametrize("backend", ELEMENTWISE)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("method, knobs", [("sde", {"lam": 1.0, "integrator": "exponential"}),
                                           ("sde", {"lam": 0.5, "integrator": "euler_maruyama"}),
                                           ("ge", {"gamma": 2.0, "mu": 0.3})])
def test_sixteen_bit_stochastic_samplers(backend, dtype, method, knobs):
    sig = schedules.karras(8, 0.02, 20.0).tolist()
    x64 = make_tensor((64, 2), F64, seed=21) * sig[0]
    ref = _eager_stochastic(method, knobs, _one_gaussian(F64), x64, sig, F64)
    eager = _eager_stochastic(method, knobs, _one_gaussian(dtype), x64.to(dtype), sig, torch.float32)
    out = sample(_one_gaussian(dtype), noncontiguous(x64.to(dtype)), sig, method, seed=SEED, backend=backend, **knobs)
    torch.testing.assert_close(sample(_one_gaussian(F64), x64, sig, method, seed=SEED, backend="reference", **knobs),
                               ref, rtol=TOL, atol=TOL)
    assert_matches_reference(out, ref, eager, f"{method} {knobs} {dtype} {backend}")


@pytest.mark.parametrize("grid, n_levels", [("fixed", 256), ("random", 8)])
@pytest.mark.parametrize("sigma_range", [(1e-3, 5.0), (1e-2, 400.0)])
def test_likelihood_exact_terminal_removes_a_wrong_gaussian_guess(grid, n_levels, sigma_range):
    """With the exact log-density of the noised data as ``terminal``, a wrong data_mean/data_std (the Gaussian
    guess) only changes the control variates: the estimate stays on the closed form, at a short sigma_max
    (where the Gaussian guess alone would be biased) as at a long one, on either grid."""
    dim, m, s = 3, 1.2, 0.4
    gmm = _gaussian_data(dim, m, s)
    y = m + s * make_tensor((4, dim), F64, seed=31) * 1.7
    lo, hi = sigma_range
    res = likelihood.log_likelihood(gmm, y, sigma_min=lo, sigma_max=hi, n_levels=n_levels, grid=grid, n_samples=24,
                                    data_mean=-0.5, data_std=2.0, terminal=gmm.log_prob, backend="reference")
    truth = _gaussian_expected_log_p(y, m, s, lo)
    z = (res.log_prob - truth) / res.stderr
    assert z.abs().max() < 5, (res.log_prob, truth, res.stderr)
