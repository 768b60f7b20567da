"""RES multistep (ComfyUI's ``res_multistep`` / ``res_multistep_ancestral``) against ComfyUI's loop written below in
float64 from its published formulas, driven by the exact denoiser of a Gaussian mixture and, for eta > 0, fed
diffkern's Philox draws (step i's noise is the stream of row i). diffkern must match the float64 loop to the float64
floor, obey the project's tolerance rule in float32 on every CPU backend, and converge with order 2.
"""
import math

import pytest
import torch

from diffkern import analytic, coef_tables_res, schedules
from diffkern.ops import philox
from diffkern.sampling import knobs, sample
from diffkern.testing import assert_matches_reference
from sampler_checks import AWKWARD, AWKWARD_IDS, ancestral_step, check_awkward_shape, check_backend

F64 = torch.float64
REF = "reference"
SEED = 23


def gmm(dim=2, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return analytic.GaussianMixture([1.0, 1.8, 0.6], torch.randn(3, dim, generator=gen, dtype=F64), [0.5, 0.9, 0.3])


def start(shape=(6, 2), sigma=10.0, seed=1):
    return torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(seed)) * sigma


def comfy_res_multistep(model, x, sigmas, eta=0.0, s_noise=1.0, seed=SEED):
    """ComfyUI's ``res_multistep`` (cfg_pp off) as published, in Python floats for the step sizes; the noise sampler
    replaced by the Philox draw of row i."""
    t_fn = lambda s: -math.log(s)  # noqa: E731
    phi1 = lambda t: math.expm1(t) / t  # noqa: E731
    phi2 = lambda t: (phi1(t) - 1.0) / t  # noqa: E731
    sigmas = [float(s) for s in sigmas]
    old_down, old_denoised = None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, torch.full((x.shape[0],), sigmas[i], dtype=x.dtype))
        down, up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if down == 0 or old_denoised is None:
            x = x + (x - denoised) / sigmas[i] * (down - sigmas[i])
        else:
            t, t_old, t_next, t_prev = t_fn(sigmas[i]), t_fn(old_down), t_fn(down), t_fn(sigmas[i - 1])
            h = t_next - t
            c2 = (t_prev - t_old) / h
            b1 = phi1(-h) - phi2(-h) / c2
            b2 = phi2(-h) / c2
            x = math.exp(-h) * x + h * (b1 * denoised + b2 * old_denoised)
        if up > 0:
            x = x + philox.noise_like(x, torch.tensor([seed]), i, F64).to(x.dtype) * s_noise * up
        old_denoised, old_down = denoised, down
    return x


CASES = [{}, {"eta": 0.5, "s_noise": 0.8}, {"eta": 1.0}, {"eta": 4.0}]  # eta 4: sigma_up = sigma_next, sd = 0


@pytest.mark.parametrize("kw", CASES, ids=[str(c) for c in CASES])
@pytest.mark.parametrize("steps", [1, 2, 3, 7])
def test_is_comfyui_loop_in_float64(steps, kw):
    x = start()
    for sig in (schedules.karras(steps, 0.05, 10.0), schedules.karras(steps + 1, 0.05, 10.0)[:-1]):
        want = comfy_res_multistep(gmm(), x, sig, **kw)
        got = sample(gmm(), x, sig, "res_multistep", backend=REF, seed=SEED, **kw)
        assert_matches_reference(got, want, want, f"{steps} steps {kw}")


def test_ancestral_is_eta_one_and_knobs():
    assert knobs("res_multistep") == {"eta": 0.0, "s_noise": 1.0}
    assert knobs("res_multistep_ancestral") == {"eta": 1.0, "s_noise": 1.0}
    x, sig = start(), schedules.karras(6, 0.05, 10.0)
    assert torch.equal(sample(gmm(), x, sig, "res_multistep_ancestral", backend=REF, seed=3),
                       sample(gmm(), x, sig, "res_multistep", backend=REF, seed=3, eta=1.0))
    assert torch.equal(sample(gmm(), x, sig, "res_multistep", backend=REF, seed=1),
                       sample(gmm(), x, sig, "res_multistep", backend=REF, seed=2))  # eta = 0: no noise
    assert not torch.equal(sample(gmm(), x, sig, "res_multistep_ancestral", backend=REF, seed=1),
                           sample(gmm(), x, sig, "res_multistep_ancestral", backend=REF, seed=2))


@pytest.mark.parametrize("kw", [{}, {"eta": 0.7}], ids=["ode", "eta"])
def test_every_backend_matches_reference(cpu_backend, kw):
    check_backend(gmm(), start((5, 2)), schedules.karras(8, 0.05, 10.0), "res_multistep", cpu_backend, seed=SEED,
                  **kw)


@pytest.mark.parametrize("shape, contiguous", AWKWARD, ids=AWKWARD_IDS)
def test_awkward_shapes(cpu_backend, shape, contiguous):
    check_awkward_shape(lambda dim: gmm(dim, seed=9), shape, contiguous, schedules.karras(5, 0.05, 10.0),
                        "res_multistep", cpu_backend, seed=SEED, eta=0.6)


def test_small_steps_use_the_series():
    """phi1, phi2 at -h below the series threshold agree with the closed forms to float64 rounding of the latter."""
    for h in (1e-5, 5e-5, 9.9e-5):
        p1, p2 = coef_tables_res._phis(h)
        assert math.isclose(p1, -math.expm1(-h) / h, rel_tol=1e-11)
        assert math.isclose(p2, (1 + math.expm1(-h) / h) / h, rel_tol=1e-6)  # the closed form loses digits here
    for h in (1e-4, 0.3, 5.0):
        p1, p2 = coef_tables_res._phis(h)
        assert p1 == -math.expm1(-h) / h and p2 == (1 - p1) / h


def test_convergence_order():
    """Second order on log-linear sigmas without the final jump (measured slopes, 16 -> 32 -> 64 steps against 1024:
    2.01, 1.96; errors 0.67-0.86x DPM-Solver++(2M)'s on the same schedules)."""
    model, x = gmm(4, seed=11), start((16, 4), seed=3)

    def run(n):
        sig = torch.exp(torch.linspace(math.log(10.0), math.log(0.1), n + 1, dtype=F64))
        return sample(model, x, sig, "res_multistep", backend=REF)

    fine = run(1024)
    ms = (16, 32, 64)
    errs = [float((run(m) - fine).abs().max()) for m in ms]
    slopes = [math.log(a / b, 2) for a, b in zip(errs, errs[1:])]
    assert all(1.8 < s < 2.3 for s in slopes), (errs, slopes)


@pytest.mark.parametrize("kw, err, match", [
    ({"eta": -0.1}, ValueError, "eta: expected"), ({"s_noise": -1.0}, ValueError, "s_noise: expected"),
    ({"eta": torch.tensor(0.5)}, TypeError, "eta: expected a number"), ({"eta": True}, TypeError, "eta: expected"),
    ({"s_noise": math.nan}, ValueError, "s_noise: expected a finite value"),
])
def test_bad_knobs_name_the_argument(kw, err, match):
    with pytest.raises(err, match=match):
        sample(gmm(), start(), schedules.karras(4, 0.05, 10.0), "res_multistep", backend=REF, **kw)
