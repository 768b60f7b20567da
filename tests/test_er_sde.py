"""ER-SDE-Solver-3 (``er_sde``) against ComfyUI's ``sample_er_sde`` written below in float64 from its published
formulas (VE path: lambda = sigma), driven by the exact denoiser of a Gaussian mixture and fed diffkern's Philox draws
(step i's noise is the stream of row i); every CPU backend within the project's tolerance rule; and, as a sampler of
the right distribution, the variance of a Gaussian recovered from noise.
"""
import math

import pytest
import torch

from diffkern import analytic, schedules
from diffkern.ops import philox
from diffkern.sampling import knobs, sample
from diffkern.testing import assert_matches_reference
from sampler_checks import AWKWARD, AWKWARD_IDS, check_awkward_shape, check_backend

F64 = torch.float64
REF = "reference"
SEED = 29


def gmm(dim=2, seed=6):
    gen = torch.Generator().manual_seed(seed)
    return analytic.GaussianMixture([1.0, 1.6, 0.5], torch.randn(3, dim, generator=gen, dtype=F64), [0.4, 0.7, 0.3])


def start(shape=(6, 2), sigma=10.0, seed=2):
    return torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(seed)) * sigma


def comfy_er_sde(model, x, sigmas, s_noise=1.0, max_stage=3, seed=SEED):
    """ComfyUI's ``sample_er_sde`` (default noise scaler, 200 integration points) with lambda = sigma; its noise
    sampler replaced by the Philox draw of row i."""
    scaler = lambda v: v * (math.exp(v ** 0.3) + 10.0)  # noqa: E731
    lams = [float(s) for s in sigmas]
    old_denoised = old_denoised_d = None
    for i in range(len(lams) - 1):
        denoised = model(x, torch.full((x.shape[0],), lams[i], dtype=x.dtype))
        stage = min(max_stage, i + 1)
        if lams[i + 1] == 0:
            x = denoised
        else:
            lam_s, lam_t = lams[i], lams[i + 1]
            r = scaler(lam_t) / scaler(lam_s)
            x = r * x + (1 - r) * denoised
            if stage >= 2:
                dt = lam_t - lam_s
                step = -dt / 200
                pos = [lam_t + k * step for k in range(200)]
                s = sum(1 / scaler(p) for p in pos) * step
                denoised_d = (denoised - old_denoised) / (lam_s - lams[i - 1])
                x = x + (dt + s * scaler(lam_t)) * denoised_d
                if stage >= 3:
                    s_u = sum((p - lam_s) / scaler(p) for p in pos) * step
                    denoised_u = (denoised_d - old_denoised_d) / ((lam_s - lams[i - 2]) / 2)
                    x = x + (dt ** 2 / 2 + s_u * scaler(lam_t)) * denoised_u
                old_denoised_d = denoised_d
            if s_noise > 0:
                xi = philox.noise_like(x, torch.tensor([seed]), i, F64).to(x.dtype)
                x = x + xi * s_noise * math.sqrt(max(lam_t ** 2 - lam_s ** 2 * r ** 2, 0.0))
        old_denoised = denoised
    return x


CASES = [{}, {"s_noise": 0.0}, {"s_noise": 0.7, "max_stage": 2}, {"max_stage": 1}]


@pytest.mark.parametrize("kw", CASES, ids=[str(c) for c in CASES])
@pytest.mark.parametrize("steps", [1, 2, 3, 8])
def test_is_comfyui_loop_in_float64(steps, kw):
    x = start()
    for sig in (schedules.karras(steps, 0.05, 10.0), schedules.karras(steps + 1, 0.05, 10.0)[:-1]):
        want = comfy_er_sde(gmm(), x, sig, **kw)
        got = sample(gmm(), x, sig, "er_sde", backend=REF, seed=SEED, **kw)
        assert_matches_reference(got, want, want, f"{steps} steps {kw}")


def test_knobs_and_history_depth():
    from diffkern import coef_tables_er_sde as ce

    assert knobs("er_sde") == {"s_noise": 1.0, "noise_scaler": None, "max_stage": 3}
    sig = schedules.karras(6, 0.05, 10.0).tolist()
    assert [ce.er_sde(sig, max_stage=k).history for k in (1, 2, 3)] == [0, 1, 2]
    assert ce.er_sde(sig[:2] + [0.0]).history == 1  # two steps read at most one earlier D


@pytest.mark.parametrize("kw", [{}, {"max_stage": 2, "s_noise": 0.5}], ids=["default", "stage2"])
def test_every_backend_matches_reference(cpu_backend, kw):
    check_backend(gmm(), start((5, 2)), schedules.karras(8, 0.05, 10.0), "er_sde", cpu_backend, seed=SEED, **kw)


@pytest.mark.parametrize("shape, contiguous", AWKWARD, ids=AWKWARD_IDS)
def test_awkward_shapes(cpu_backend, shape, contiguous):
    check_awkward_shape(lambda dim: gmm(dim, seed=9), shape, contiguous, schedules.karras(6, 0.05, 10.0), "er_sde",
                        cpu_backend, seed=SEED)


def test_samples_a_gaussian():
    """From pure noise at sigma_max = 40 to 0 in 60 Karras steps, 40,000 samples of N(0.3, 0.5^2) under its exact
    denoiser have its standard deviation within 2% (5.7 standard errors; over 20 noise seeds the measured spread is
    0.4%) and its mean within 0.015 (6 standard errors). A sampler of the wrong SDE misses the spread: Euler-ancestral
    on the same schedule gives 0.46, 8% low."""
    mean, std, n = 0.3, 0.5, 40_000
    model = analytic.GaussianMixture([1.0], [[mean]], [std])
    x = torch.randn(n, 1, dtype=F64, generator=torch.Generator().manual_seed(7)) * 40.0
    out = sample(model, x, schedules.karras(60, 0.01, 40.0), "er_sde", backend=REF, seed=11)
    assert abs(float(out.std()) / std - 1) < 0.02, float(out.std())
    assert abs(float(out.mean()) - mean) < 0.015, float(out.mean())


@pytest.mark.parametrize("kw, err, match", [
    ({"max_stage": 0}, ValueError, "max_stage: expected 1, 2 or 3"), ({"max_stage": 4}, ValueError, "max_stage"),
    ({"max_stage": 2.0}, ValueError, "max_stage"), ({"max_stage": True}, ValueError, "max_stage"),
    ({"s_noise": -0.5}, ValueError, "s_noise: expected"), ({"s_noise": torch.tensor(1.0)}, TypeError, "s_noise"),
])
def test_bad_knobs_name_the_argument(kw, err, match):
    with pytest.raises(err, match=match):
        sample(gmm(), start(), schedules.karras(4, 0.05, 10.0), "er_sde", backend=REF, **kw)
