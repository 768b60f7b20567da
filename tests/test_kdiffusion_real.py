"""diffkern's k-diffusion-signature samplers against k-diffusion itself (the released 0.1.1.post1, its
``sampling.py`` loaded by ``tests/_kdiffusion.py``): same model, same schedule, same noise -> same output, the same
callback calls (keys, ``i``, sigmas, ``x``, ``denoised``) and the same ``noise_sampler`` calls.

Noise: k-diffusion's samplers take a ``noise_sampler(sigma, sigma_next)``; both runs get their own copy of a
sampler that hands out precomputed normals in call order and records its arguments. Churn (``s_churn``) draws with
``torch.randn_like`` inside k-diffusion, which diffkern does not imitate (its noise is Philox keyed by ``seed``):
churn is compared at ``s_noise = 0``, where the churned sigma still changes every step.

Float64 runs use the two-dimensional Gaussian mixture (exact denoiser), float32 runs a single Gaussian (a linear
denoiser: the mixture amplifies float32 rounding chaotically near sigma_min, tests/test_kdiffusion_parity.py)."""
import inspect
import math
import warnings

import pytest
import torch

from _kdiffusion import sampling as kdiffusion
from diffkern import analytic, samplers, schedules
from diffkern.testing import assert_matches_reference

F64 = torch.float64
GMM = analytic.GaussianMixture.demo_2d()
GAUSS = analytic.GaussianMixture([1.0], [[0.5, -1.0]], [1.5])
SIGMAS = schedules.karras(9, 0.03, 12.0)


def start(dtype=F64, batch=5, seed=5):
    return (torch.randn(batch, 2, dtype=F64, generator=torch.Generator().manual_seed(seed)) * 12.0).to(dtype)


class Draws:
    """A noise_sampler handing out precomputed float64 normals (cast to x's dtype) in call order, recording calls."""

    def __init__(self, like, n=200, seed=9):
        self.dtype = like.dtype
        self.noise = torch.randn((n, *like.shape), dtype=F64, generator=torch.Generator().manual_seed(seed))
        self.calls = []

    def __call__(self, sigma, sigma_next):
        self.calls.append((float(sigma), float(sigma_next)))
        return self.noise[len(self.calls) - 1].to(self.dtype)


class Record:
    """A callback recording copies of what it is handed (and the objects themselves, for aliasing checks)."""

    def __init__(self):
        self.calls = []

    def __call__(self, d):
        self.calls.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in d.items()})


def model_for(denoiser):
    def model(x, sigma):
        assert sigma.shape == (x.shape[0],)
        return denoiser(x, sigma.to(x.dtype))
    return model


def assert_same_draws(ours, theirs, what, tol):
    """The noise_sampler calls: as many, at the same (sigma, sigma_next) to ``tol`` relative."""
    assert len(ours.calls) == len(theirs.calls), f"{what}: {len(ours.calls)} noise draws, k-diffusion's " \
                                                 f"{len(theirs.calls)}"
    for a, b in zip(ours.calls, theirs.calls):
        assert a == pytest.approx(b, rel=tol, abs=0), (what, a, b)


def as_float(v):
    return float(v) if torch.is_tensor(v) or isinstance(v, (int, float)) else v


def assert_same_callbacks(ours, theirs, what, tol):
    assert len(ours.calls) == len(theirs.calls), f"{what}: {len(ours.calls)} callback calls, k-diffusion's " \
                                                 f"{len(theirs.calls)}"
    for j, (a, b) in enumerate(zip(ours.calls, theirs.calls)):
        assert set(b) <= set(a), f"{what} call {j}: keys {sorted(a)} lack k-diffusion's {sorted(set(b) - set(a))}"
        for key, want in b.items():
            got = a[key]
            if torch.is_tensor(want) and want.dim() > 0:
                assert torch.allclose(got.to(F64), want.to(F64), rtol=tol, atol=tol), (what, j, key)
            elif key in ("i", "steps", "nfe", "n_accept", "n_reject"):
                assert got == want, (what, j, key, got, want)
            else:
                assert as_float(got) == pytest.approx(as_float(want), rel=tol, abs=tol), (what, j, key, got, want)


def run_both(name, kw, dtype=F64, denoiser=GMM, sigmas=SIGMAS, backend=None):
    """(ours, k-diffusion's, our callbacks, theirs, our noise draws, theirs) for ``sample_<name>``."""
    x = start(dtype)
    model = model_for(denoiser)
    ours_cb, theirs_cb = Record(), Record()
    ours_ns, theirs_ns = Draws(x), Draws(x)
    noisy = "noise_sampler" in inspect.signature(getattr(kdiffusion(), f"sample_{name}")).parameters
    extra = {"noise_sampler": ours_ns} if noisy else {}
    got = getattr(samplers, f"sample_{name}")(model, x.clone(), sigmas.to(dtype), callback=ours_cb, disable=True,
                                               backend=backend, **extra, **kw)
    extra = {"noise_sampler": theirs_ns} if noisy else {}
    want = getattr(kdiffusion(), f"sample_{name}")(model, x.clone(), sigmas.to(dtype), callback=theirs_cb,
                                                   disable=True, **extra, **kw)
    return got, want, ours_cb, theirs_cb, ours_ns, theirs_ns


CASES = [("euler", {}), ("euler", {"s_churn": 2.0, "s_noise": 0.0}),
         ("euler", {"s_churn": 5.0, "s_tmin": 0.1, "s_tmax": 3.0, "s_noise": 0.0}),
         ("euler_ancestral", {}), ("euler_ancestral", {"eta": 0.5, "s_noise": 0.7}),
         ("heun", {}), ("heun", {"s_churn": 3.0, "s_noise": 0.0}),
         ("dpm_2", {}), ("dpm_2", {"s_churn": 3.0, "s_tmin": 0.2, "s_noise": 0.0}),
         ("dpm_2_ancestral", {}), ("dpm_2_ancestral", {"eta": 0.3}),
         ("lms", {}), ("lms", {"order": 3}), ("lms", {"order": 2}),
         ("dpmpp_2s_ancestral", {}), ("dpmpp_2s_ancestral", {"eta": 0.0}),
         ("dpmpp_sde", {}), ("dpmpp_sde", {"eta": 0.4, "r": 0.3}),
         ("dpmpp_2m", {}),
         ("dpmpp_2m_sde", {}), ("dpmpp_2m_sde", {"solver_type": "heun"}), ("dpmpp_2m_sde", {"eta": 0.0}),
         ("dpmpp_3m_sde", {}), ("dpmpp_3m_sde", {"eta": 0.5, "s_noise": 1.3})]
IDS = [f"{n}-{kw}" for n, kw in CASES]


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_float64_is_kdiffusion(name, kw):
    got, want, ours_cb, theirs_cb, ours_ns, theirs_ns = run_both(name, kw)
    assert got.dtype == F64
    assert_matches_reference(got, want, want, f"{name} {kw} float64")
    assert_same_draws(ours_ns, theirs_ns, f"{name} {kw}", 1e-14)
    assert_same_callbacks(ours_cb, theirs_cb, f"{name} {kw}", 1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_low_precision_within_kdiffusions_own_error(name, kw, dtype):
    """k-diffusion runs in x's dtype throughout; ours keeps the state in it and computes in float32 at least."""
    if name == "lms" and dtype == torch.bfloat16:
        pytest.skip("k-diffusion's sample_lms reads the sigmas through numpy, which has no bfloat16")
    got, want_lowp, *_ = run_both(name, kw, dtype, GAUSS)
    want64 = run_both(name, kw, F64, GAUSS)[1]
    assert got.dtype == dtype
    assert_matches_reference(got, want64, want_lowp, f"{name} {kw} {dtype}")


@pytest.mark.parametrize("name,kw", [("euler_ancestral", {}), ("dpmpp_2m", {}), ("lms", {}), ("dpmpp_sde", {}),
                                     ("dpmpp_3m_sde", {})])
def test_every_backend_is_kdiffusion(name, kw, cpu_backend):
    got, want, *_ = run_both(name, kw, backend=cpu_backend)
    assert_matches_reference(got, want, want, f"{name} [{cpu_backend}] float64")
    got, want32, *_ = run_both(name, kw, torch.float32, GAUSS, backend=cpu_backend)
    want64 = run_both(name, kw, F64, GAUSS)[1]
    assert_matches_reference(got, want64, want32, f"{name} [{cpu_backend}] float32")


def test_callback_x_is_a_snapshot():
    """k-diffusion builds a new x every step, so a callback may keep ``d['x']``; ours must hand a value the loop
    does not overwrite afterwards (the fused step updates its state in place)."""
    kept = []
    samplers.sample_dpmpp_2m(model_for(GMM), start(), SIGMAS, callback=lambda d: kept.append(d), disable=True)
    theirs = Record()
    kdiffusion().sample_dpmpp_2m(model_for(GMM), start(), SIGMAS, callback=theirs, disable=True)
    for d, want in zip(kept, theirs.calls):
        assert torch.allclose(d["x"], want["x"], rtol=1e-10, atol=1e-10)
        assert torch.allclose(d["denoised"], want["denoised"], rtol=1e-10, atol=1e-10)


@pytest.fixture
def default_float64():
    """k-diffusion's dpm_fast/dpm_adaptive compute their times in the default dtype (``torch.linspace``,
    ``torch.tensor(sigma_max)``): under float64 its run is the float64 algorithm diffkern's tables hold."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    yield
    torch.set_default_dtype(saved)


def run_fast(n, eta):
    x, model = start(), model_for(GMM)
    ours_cb, theirs_cb, ours_ns, theirs_ns = Record(), Record(), Draws(x), Draws(x)
    got = samplers.sample_dpm_fast(model, x.clone(), 0.05, 10.0, n, callback=ours_cb, disable=True, eta=eta,
                                   noise_sampler=ours_ns)
    want = kdiffusion().sample_dpm_fast(model, x.clone(), 0.05, 10.0, n, callback=theirs_cb, disable=True, eta=eta,
                                        noise_sampler=theirs_ns)
    return got, want, ours_cb, theirs_cb, ours_ns, theirs_ns


@pytest.mark.parametrize("eta", [0.0, 0.6])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 10])
def test_dpm_fast_is_kdiffusion(n, eta, default_float64):
    got, want, ours_cb, theirs_cb, ours_ns, theirs_ns = run_fast(n, eta)
    assert_matches_reference(got, want, want, f"dpm_fast n={n} eta={eta}")
    assert_same_draws(ours_ns, theirs_ns, f"dpm_fast n={n}", 1e-13)
    assert_same_callbacks(ours_cb, theirs_cb, f"dpm_fast n={n}", 1e-10)


@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_dpm_fast_reports_kdiffusions_dtypes(eta):
    """Under the default float32, k-diffusion's grid is float32: ours reports its float64 grid rounded once to it."""
    got, want, ours_cb, theirs_cb, ours_ns, theirs_ns = run_fast(7, eta)
    assert_same_draws(ours_ns, theirs_ns, "dpm_fast float32 grid", 1e-6)
    assert_same_callbacks(ours_cb, theirs_cb, "dpm_fast float32 grid", 1e-5)
    for a, b in zip(ours_cb.calls, theirs_cb.calls):
        for key in ("sigma", "sigma_hat", "t", "t_up"):
            assert (a[key].dtype, a[key].shape, a[key].device) == (b[key].dtype, b[key].shape, b[key].device), key


@pytest.mark.parametrize("kw", [{}, {"order": 2}, {"rtol": 0.01, "atol": 0.001}, {"pcoeff": 0.2, "dcoeff": 0.1},
                                {"eta": 0.5}, {"h_init": 0.5, "accept_safety": 0.95}])
def test_dpm_adaptive_is_kdiffusion(kw, default_float64):
    x, model = start(), model_for(GMM)
    ours_cb, theirs_cb, ours_ns, theirs_ns = Record(), Record(), Draws(x), Draws(x)
    got, info = samplers.sample_dpm_adaptive(model, x.clone(), 0.05, 10.0, callback=ours_cb, disable=True,
                                             noise_sampler=ours_ns, return_info=True, **kw)
    want, want_info = kdiffusion().sample_dpm_adaptive(model, x.clone(), 0.05, 10.0, callback=theirs_cb,
                                                       disable=True, noise_sampler=theirs_ns, return_info=True, **kw)
    assert info == want_info, kw
    # t = s + h: the controller's h is a power of an error ratio each step, its rounding ~1e-12 after a few steps
    assert_same_draws(ours_ns, theirs_ns, f"dpm_adaptive {kw}", 1e-10)
    assert_same_callbacks(ours_cb, theirs_cb, f"dpm_adaptive {kw}", 1e-10)
    assert_matches_reference(got, want, want, f"dpm_adaptive {kw}")


@pytest.mark.parametrize("fn,ours,args", [
    ("get_sigmas_karras", schedules.karras, (10, 0.002, 80.0)),
    ("get_sigmas_karras", schedules.karras, (1, 0.1, 5.0)),
    ("get_sigmas_exponential", schedules.loglinear, (12, 0.03, 14.6)),
    ("get_sigmas_polyexponential", schedules.polyexponential, (8, 0.1, 20.0)),
    ("get_sigmas_polyexponential", schedules.polyexponential, (8, 0.1, 20.0, 2.5)),
    ("get_sigmas_vp", schedules.vp, (10,)),
    ("get_sigmas_vp", schedules.vp, (6, 12.0, 0.3, 1e-2)),
])
def test_schedules_are_kdiffusions(fn, ours, args, default_float64):
    """k-diffusion's schedules computed in float64 (its float32 VP schedule loses 2e-4 near eps_s to cancellation
    in exp(...) - 1; ours is float64 throughout)."""
    want = getattr(kdiffusion(), fn)(*args)
    got = ours(*args)
    assert got.shape == want.shape and got.dtype == F64
    assert torch.allclose(got, want, rtol=1e-12, atol=0), (fn, args)


def test_brownian_tree_noise_sampler_runs_through_ours():
    """k-diffusion's default noise for dpmpp_sde (a torchsde Brownian tree) handed to ours gives its output."""
    x, model = start(), model_for(GMM)
    lo, hi = float(SIGMAS[SIGMAS > 0].min()), float(SIGMAS.max())
    tree = lambda: kdiffusion().BrownianTreeNoiseSampler(x, torch.tensor(lo, dtype=F64), torch.tensor(hi, dtype=F64),
                                                       seed=3)
    got = samplers.sample_dpmpp_sde(model, x.clone(), SIGMAS, disable=True, noise_sampler=tree())
    want = kdiffusion().sample_dpmpp_sde(model, x.clone(), SIGMAS, disable=True, noise_sampler=tree())
    assert math.isfinite(float(got.abs().max()))
    assert_matches_reference(got, want, want, "dpmpp_sde with a Brownian tree")


@pytest.mark.parametrize("mixture", [analytic.GaussianMixture([0.3, 0.7], [[-1.0], [2.0]], [0.5, 0.8]),
                                     analytic.GaussianMixture([1.0], [[0.5, -1.0]], [1.5])])
def test_ode_log_likelihood_is_kdiffusions(mixture, default_float64):
    """k-diffusion's ``log_likelihood`` (dopri5 through torchdiffeq, Hutchinson with one Rademacher probe, prior
    N(0, sigma_max^2)) against ``diffkern.likelihood.ode_log_likelihood`` with that prior. One Rademacher probe is
    the exact trace where the Jacobian of D is diagonal: in one dimension, and for an isotropic Gaussian."""
    from diffkern import likelihood
    x = mixture.sample(6, torch.Generator().manual_seed(2))
    model = model_for(mixture)
    want, _ = kdiffusion().log_likelihood(model, x, 0.01, 40.0, atol=1e-9, rtol=1e-9)
    prior = lambda z, sigma: torch.distributions.Normal(0.0, sigma).log_prob(z).flatten(1).sum(1)
    got = likelihood.ode_log_likelihood(model, x, sigma_min=0.01, sigma_max=40.0, rtol=1e-9, atol=1e-9,
                                        terminal=prior)
    assert torch.allclose(got, want, rtol=0, atol=1e-6), (got - want).abs().max()


@pytest.mark.parametrize("kw", [{}, {"eta": 0.6, "r": 0.3}])
def test_dpmpp_sde_noise_law_is_the_brownian_trees(kw):
    """dpmpp_sde's two draws per step are increments of one Brownian path (correlated), which diffkern reproduces
    in law from Philox: the spread the noise adds to a three-step run on a Gaussian (output minus the noise-free
    run from the same start) against k-diffusion's default torchsde Brownian tree, within 5 standard errors; with
    independent draws k-diffusion's own spread is ~30% smaller (many standard errors away), so the test can tell."""
    gauss = analytic.GaussianMixture([1.0], [[0.5]], [0.3])
    model, sig, n = model_for(gauss), schedules.karras(3, 0.05, 5.0), 20000
    x = torch.randn(n, 1, dtype=F64, generator=torch.Generator().manual_seed(0)) * 5.0
    lo, hi = torch.tensor(0.05, dtype=F64), torch.tensor(5.0, dtype=F64)
    run = kdiffusion().sample_dpmpp_sde
    still = run(model, x.clone(), sig, disable=True, noise_sampler=lambda s, t: torch.zeros_like(x), **kw)
    with warnings.catch_warnings():  # torchsde: "Should have ta>=t0" at the tree's own end point (rounding)
        warnings.simplefilter("ignore", UserWarning)
        tree = run(model, x.clone(), sig, disable=True,
                   noise_sampler=kdiffusion().BrownianTreeNoiseSampler(x, lo, hi, seed=1), **kw) - still
    indep = run(model, x.clone(), sig, disable=True, noise_sampler=lambda s, t: torch.randn_like(x), **kw) - still
    ours = samplers.sample_dpmpp_sde(model, x.clone(), sig, disable=True, seed=3, **kw) - still
    se = math.sqrt(2 / n) * float(tree.var())
    assert abs(float(ours.var()) - float(tree.var())) < 5 * math.sqrt(2) * se, (ours.var(), tree.var())
    assert abs(float(indep.var()) - float(tree.var())) > 10 * math.sqrt(2) * se, (indep.var(), tree.var())
    assert abs(float(ours.mean())) < 5 * math.sqrt(float(tree.var()) / n)
