"""Samplers of ``diffkern.sample`` proven on exact Gaussian-mixture denoisers (``math-samplers.md`` 2, 3, 6, 7).

* convergence order against a fine RK4 solution of the same probability-flow ODE;
* the GE sampler beats DDIM at 10 steps (Permenter & Yuan's claim, here with exact denoisers);
* stochastic samplers reproduce the mixture (moments and KS tests on 1-D projections);
* the section 7 identities between sampler families hold to float64 precision;
* every sampler on every usable backend matches the float64 reference under the tolerance rule;
* the fused wrapper path (raw output, conversion and guidance in the step) equals the PyTorch conversion;
* no host sync inside the loop (CUDA).

The API (seeds, callback, record, progress, errors, knobs) is in ``test_samplers_api.py``.
"""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from diffkern import analytic, samplers, schedules
from diffkern.sampling import sample
from diffkern.testing import assert_matches_reference, usable_backends

REF = "reference"


def gmm3():
    return analytic.GaussianMixture([1.0, 2.0, 1.5], [[-1.0, 0.5], [1.0, 1.0], [0.3, -1.2]], [0.3, 0.5, 0.4])


def start(n, sigma_max, seed=0, dim=2, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, dim, generator=gen, dtype=torch.float64) * sigma_max).to(dtype)


def rk4_ode(gmm, x, sigma_max, sigma_min, n=200):
    """Independent reference: classical RK4 on dx/dt = x - D(x, e^t), t = log sigma (the PF-ODE), float64."""
    t0, t1 = math.log(sigma_max), math.log(sigma_min)
    h = (t1 - t0) / n

    def f(y, t):
        return y - gmm.denoise(y, math.exp(t))

    for i in range(n):
        t = t0 + i * h
        k1 = f(x, t)
        k2 = f(x + h / 2 * k1, t + h / 2)
        k3 = f(x + h / 2 * k2, t + h / 2)
        k4 = f(x + h * k3, t + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x

#----------------------------------------------------------------------------
# Convergence order (log-linear steps from sigma = 10 to 0.1; errors against RK4 with 200 steps, whose own
# error, 7e-9 against RK4 with 400 steps, is far below the smallest error fitted here, 3e-4).


@pytest.mark.parametrize("method,order", [("euler", 1), ("heun", 2), ("dpmpp_2m", 2), ("dpm_2", 2)])
def test_convergence_order(method, order):
    gmm, x = gmm3(), start(32, 10.0)
    ref = rk4_ode(gmm, x, 10.0, 0.1)
    ns = [32, 64, 128]
    errs = [float((sample(gmm, x, schedules.loglinear(n, 0.1, 10.0)[:-1], method, backend=REF) - ref)
                  .norm(dim=1).max()) for n in ns]
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    # Band: the asymptotic order p, minus 0.1 for the pre-asymptotic O(h) relative remainder (measured fits:
    # euler 1.00, heun 2.00, dpmpp_2m 2.02, dpm_2 2.00), plus 0.15 for an error constant still settling.
    assert order - 0.1 <= slope <= order + 0.15, f"{method}: fitted order {slope:.3f}, errors {errs}"

#----------------------------------------------------------------------------
# GE (gamma = 2) against DDIM at few steps: RMS distance to the exact ODE solution from the same start.

GE_TABLE_STEPS = (5, 10, 20)


def ge_vs_ddim_table(gmm, sigma_min=0.02, sigma_max=20.0, n=256):
    """{steps: (ddim_rms, ge_rms)} on a log-linear schedule (the paper's 'Linear' style), no final 0."""
    x = start(n, sigma_max, seed=1)
    ref = rk4_ode(gmm, x, sigma_max, sigma_min)
    out = {}
    for steps in GE_TABLE_STEPS:
        sig = schedules.loglinear(steps, sigma_min, sigma_max)[:-1]
        rms = [float((sample(gmm, x, sig, m, backend=REF, **kw) - ref).pow(2).sum(1).mean().sqrt())
               for m, kw in (("euler", {}), ("ge", {"gamma": 2.0}))]
        out[steps] = tuple(rms)
    return out


@pytest.mark.parametrize("mixture", ["gmm3", "demo_2d"])
def test_ge_beats_ddim_at_10_steps(mixture):
    gmm = gmm3() if mixture == "gmm3" else analytic.GaussianMixture.demo_2d()
    table = ge_vs_ddim_table(gmm)
    ddim, ge = table[10]
    # Measured: gmm3 0.196 -> 0.096, demo_2d 0.428 -> 0.171 (README, GE section).
    assert ge < 0.75 * ddim, table
    assert table[5][1] < table[5][0], table

#----------------------------------------------------------------------------
# Stochastic samplers reproduce the mixture: 2000 samples, 80 Karras steps from sigma = 20 (fixed seeds).

STOCHASTIC = [("euler_ancestral", {}), ("euler_ancestral", {"eta": 0.5}), ("euler", {"s_churn": 20.0}),
              ("heun", {"s_churn": 20.0}), ("ge", {"gamma": 1.0, "mu": 0.5}), ("ge", {"gamma": 2.0, "mu": 0.3}),
              ("sde", {"lam": 0.5}), ("sde", {"lam": 1.0, "integrator": "euler_maruyama"}), ("dpmpp_2m_sde", {}),
              ("dpmpp_2m_sde", {"eta": 0.5, "solver_type": "heun"}), ("dpm_2", {"s_churn": 20.0}),
              ("dpm_2_ancestral", {}), ("dpmpp_2s_ancestral", {"eta": 0.5}), ("dpmpp_3m_sde", {})]


def _moment_se(gmm, n):
    """Standard errors of the sample mean and covariance of n exact samples (from 4e5 exact samples)."""
    big = gmm.sample(400_000, generator=torch.Generator().manual_seed(9))
    c = big - gmm.mean
    prod = c[:, :, None] * c[:, None, :]
    return (gmm.covariance.diag() / n).sqrt(), (prod.var(0) / n).sqrt()


@pytest.mark.parametrize("method,kw", STOCHASTIC, ids=[f"{m}-{kw}" for m, kw in STOCHASTIC])
def test_stochastic_samplers_reproduce_mixture(method, kw):
    gmm, n = gmm3(), 2000
    gen = torch.Generator().manual_seed(1)
    exact = gmm.sample(n, generator=gen)
    y = sample(gmm, start(n, 20.0, seed=2), schedules.karras(80, 0.002, 20.0), method, backend=REF, seed=3, **kw)
    se_mean, se_cov = _moment_se(gmm, n)
    # 5 standard errors: a false alarm has probability ~6e-7 per entry; the largest measured deviation
    # (first-order samplers' covariance, discretisation bias included) is 3.4 standard errors.
    assert ((y.mean(0) - gmm.mean).abs() <= 5 * se_mean).all(), (y.mean(0), gmm.mean)
    assert ((torch.cov(y.T) - gmm.covariance).abs() <= 5 * se_cov).all(), (torch.cov(y.T), gmm.covariance)
    dirs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    for d in dirs / dirs.norm(dim=1, keepdim=True):
        p = stats.ks_2samp((y @ d).numpy(), (exact @ d).numpy()).pvalue
        assert p > 1e-3, f"{method} {kw}: KS p-value {p:.2e} on projection {d.tolist()}"

#----------------------------------------------------------------------------
# Section 7 identities, float64.


def _close64(a, b):
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("final_zero", [True, False], ids=["to0", "tosigmamin"])
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 3.0])
def test_mu_family_is_lambda_exponential_integrator(lam, final_zero):
    """smalldiffusion's mu step (gamma = 1) == McAllester's exponential integrator with mu = lam^2/(1+lam^2)."""
    gmm, x = gmm3(), start(16, 20.0)
    sig = schedules.karras(12, 0.01, 20.0)
    sig = sig if final_zero else sig[:-1]
    a = sample(gmm, x, sig, "ge", gamma=1.0, mu=lam * lam / (1 + lam * lam), backend=REF, seed=5)
    b = sample(gmm, x, sig, "sde", lam=lam, integrator="exponential", backend=REF, seed=5)
    _close64(a, b)


def test_ddpm_equals_ancestral_equals_lambda_one():
    gmm, x, sig = gmm3(), start(16, 20.0), schedules.karras(12, 0.01, 20.0)
    a = sample(gmm, x, sig, "euler_ancestral", eta=1.0, backend=REF, seed=2)
    _close64(a, sample(gmm, x, sig, "ge", gamma=1.0, mu=0.5, backend=REF, seed=2))
    _close64(a, sample(gmm, x, sig, "sde", lam=1.0, backend=REF, seed=2))


@pytest.mark.parametrize("final_zero", [True, False], ids=["to0", "tosigmamin"])
def test_deterministic_ddim_family(final_zero):
    """Euler == DDIM(eta = 0) == GE(gamma = 1, mu = 0) == the lam = 0 exponential integrator."""
    gmm, x = gmm3(), start(16, 20.0)
    sig = schedules.karras(12, 0.01, 20.0)
    sig = sig if final_zero else sig[:-1]
    a = sample(gmm, x, sig, "euler", backend=REF)
    _close64(a, sample(gmm, x, sig, "euler_ancestral", eta=0.0, backend=REF))
    _close64(a, sample(gmm, x, sig, "ge", gamma=1.0, mu=0.0, backend=REF))
    _close64(a, sample(gmm, x, sig, "sde", lam=0.0, backend=REF))
    _close64(sample(gmm, x, sig, "dpmpp_2m", backend=REF), sample(gmm, x, sig, "dpmpp_2m_sde", eta=0.0, backend=REF))


def test_heun_matches_textbook_form():
    """The fused corrector x~ + (s' - s_hat)/2 * (d~ - d) equals EDM Algorithm 2's average of slopes."""
    gmm, x = gmm3(), start(8, 20.0)
    sig = schedules.karras(6, 0.05, 20.0).tolist()
    y = x.clone()
    for s, sn in zip(sig[:-1], sig[1:]):
        d = (y - gmm.denoise(y, s)) / s
        y_pred = y + (sn - s) * d
        if sn == 0:
            y = y_pred
            continue
        d2 = (y_pred - gmm.denoise(y_pred, sn)) / sn
        y = y + (sn - s) * (d + d2) / 2
    _close64(sample(gmm, x, sig, "heun", backend=REF), y)

#----------------------------------------------------------------------------
# Every sampler on every usable backend: float32 against the float64 reference run (tolerance rule), and
# float64 tightly. Shapes: an odd batch and an odd dimension (5-D mixture).

EVERY = [("euler", {}), ("euler", {"s_churn": 2.0}), ("euler_ancestral", {"eta": 0.7}), ("heun", {}),
         ("heun", {"s_churn": 2.0, "s_tmin": 0.5, "s_tmax": 5.0}), ("dpmpp_2m", {}), ("ge", {}),
         ("ge", {"gamma": 1.0, "mu": 0.5}), ("sde", {"lam": 0.7}), ("sde", {"lam": 1.0, "integrator": "euler_maruyama"}),
         ("dpmpp_2m_sde", {}), ("dpmpp_2m_sde", {"eta": 0.3, "solver_type": "heun"}), ("dpm_2", {}),
         ("dpm_2", {"s_churn": 2.0, "s_tmin": 0.5}), ("dpm_2_ancestral", {"eta": 0.7}), ("dpmpp_2s_ancestral", {}),
         ("dpmpp_sde", {}), ("dpmpp_sde", {"eta": 0.6, "r": 0.3}), ("dpmpp_3m_sde", {}), ("dpmpp_3m_sde", {"eta": 0.0}),
         ("dpmsolver_3m", {}), ("dpmsolver_3m", {"eta": 1.0, "solver_type": "heun", "lower_order_final": False}),
         ("lcm", {}), ("unipc", {}), ("unipc", {"order": 1, "solver_type": "bh1", "predict_x0": False}),
         ("deis", {}), ("deis", {"order": 2, "lower_order_final": False}), ("plms", {}), ("ipndm", {}), ("ipndm", {"max_order": 2}), ("lms", {}),
         ("lms", {"order": 2}), ("unipc", {"order": 3, "lower_order_final": False}),
         ("dpmsolver_single", {}), ("dpmsolver_single", {"order": 3, "solver_type": "heun", "predict_x0": False}),
         ("ipndm_v", {}), ("ipndm_v", {"max_order": 3}), ("dpm_fast", {}), ("dpm_fast", {"eta": 0.8, "s_noise": 0.9}),
         ("res_multistep", {}), ("res_multistep_ancestral", {"eta": 0.6, "s_noise": 0.9}), ("er_sde", {}),
         ("er_sde", {"max_stage": 2, "s_noise": 0.5}), ("sa_solver", {}),
         ("sa_solver", {"predictor_order": 3, "corrector_order": 4, "predict_x0": False, "tau": 0.0}),
         ("heun_flow", {})]


def gmm5():
    gen = torch.Generator().manual_seed(4)
    return analytic.GaussianMixture([1.0, 2.0], torch.randn(2, 5, generator=gen, dtype=torch.float64), [0.6, 0.8])


# (method, repr(kw)) -> (float64 truth, float32 eager) of the test below: the same for every backend, so computed
# once per case and process instead of once per backend parametrization.
_REFERENCE_RUNS = {}


@pytest.mark.parametrize("backend", usable_backends("cpu"))
@pytest.mark.parametrize("method,kw", EVERY, ids=[f"{m}-{kw}" for m, kw in EVERY])
def test_every_backend_matches_reference(backend, method, kw):
    gmm, sig = gmm5(), schedules.karras(6, 0.05, 5.0)
    x = start(3, 5.0, seed=7, dim=5)
    if (method, repr(kw)) not in _REFERENCE_RUNS:
        _REFERENCE_RUNS[method, repr(kw)] = (sample(gmm, x, sig, method, backend=REF, seed=11, **kw),
                                             sample(gmm, x.float(), sig, method, backend=REF, seed=11, **kw))
    ref64, eager = _REFERENCE_RUNS[method, repr(kw)]
    actual = sample(gmm, x.float(), sig, method, backend=backend, seed=11, **kw)
    assert_matches_reference(actual, ref64, eager, f"{method} {kw} [{backend}]")
    # float64 on the backend: the floor alone (1e-12 relative), the reference being its own eager run.
    assert_matches_reference(sample(gmm, x, sig, method, backend=backend, seed=11, **kw), ref64, ref64,
                             f"{method} {kw} [{backend}] float64")

#----------------------------------------------------------------------------
# The fused conversion path: a wrapper's raw output, conversion (p, q) and guidance go into the step.


class _EpsGMM:
    """A fused-path model: eps-prediction with classifier-free guidance between two mixtures."""
    guidance_scale = 3.0

    def __init__(self):
        self.cond, self.uncond = gmm3(), analytic.GaussianMixture([1.0], [[0.5, 0.0]], [1.0])

    def raw(self, x, sigma):
        return self.cond.eps(x, sigma), self.uncond.eps(x, sigma)

    def conversion(self, sigma):
        return 1.0, -sigma

    def __call__(self, x, sigma):
        c, u = self.raw(x, sigma)
        return x - sigma[:, None] * (u + self.guidance_scale * (c - u))


@pytest.mark.parametrize("method,kw", EVERY[::2], ids=[f"{m}-{kw}" for m, kw in EVERY[::2]])
def test_fused_conversion_matches_pytorch_conversion(method, kw):
    model, sig, x = _EpsGMM(), schedules.karras(6, 0.05, 10.0), start(5, 10.0)
    fused = sample(model, x, sig, method, backend=REF, seed=4, **kw)
    plain = sample(model.__call__, x, sig, method, backend=REF, seed=4, **kw)
    _close64(fused, plain)


def test_fused_path_with_diffkern_wrapper():
    wrappers = pytest.importorskip("diffkern.wrappers")
    gmm, x, sig = gmm3(), start(5, 10.0), schedules.karras(6, 0.05, 10.0)

    class Eps(wrappers.ModelWrapper):
        prediction_type = "epsilon"

        def model_input(self, x, sigma):
            return x, sigma

    wrapped = Eps(lambda x, s: gmm.eps(x, s))
    assert samplers._is_fused(wrapped)
    for method in ("euler", "dpmpp_2m", "heun"):
        _close64(sample(wrapped, x, sig, method, backend=REF), sample(gmm, x, sig, method, backend=REF))

#----------------------------------------------------------------------------
# No host synchronisation inside the loop (CUDA only: torch's sync debug mode turns a sync into an error).


@pytest.mark.cuda
@pytest.mark.parametrize("method,kw", EVERY, ids=[f"{m}-{kw}" for m, kw in EVERY])
def test_no_host_sync_in_loop_cuda(method, kw):
    gmm, sig = gmm3(), schedules.karras(6, 0.05, 10.0)
    x = start(64, 10.0).float().cuda()
    sample(gmm, x, sig, method, backend="auto", seed=1, **kw)  # warm up: first-use loads, allocations
    first = []

    def model(x, sigma):
        if not first:
            first.append(True)
            torch.cuda.set_sync_debug_mode("error")  # from the first model call on: setup is done
        return gmm.denoise(x, sigma)

    try:
        y = sample(model, x, sig, method, backend="auto", seed=1, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref64 = sample(gmm, x.cpu().double(), sig, method, backend=REF, seed=1, **kw)
    eager = sample(gmm, x.cpu(), sig, method, backend=REF, seed=1, **kw)
    assert_matches_reference(y.cpu(), ref64, eager, f"{method} {kw} [cuda auto]")
