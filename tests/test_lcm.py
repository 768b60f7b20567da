"""Latent Consistency Models: ``diffkern.diffusers.LCMScheduler`` (Level 1) against diffusers' ``LCMScheduler``, and the
``lcm`` sampler against k-diffusion's ``sample_lcm`` loop and an exact denoiser.

Oracles and tolerances (the project rule, ``diffkern.testing.assert_matches_reference``):
- float64: diffusers' own step run in float64 (its module sees ``torch.float32`` as float64, and the default dtype is
  float64 so that its ``c_skip``/``c_out``, computed from an int64 timestep tensor times a Python float, are float64
  too). Our float64 step must match it to the float64 floor (1e-12 relative); the generator's float64 draws are the
  same in both.
- float32: the truth above with float32 generator draws upcast, diffusers' float32 run as the yardstick: ours must be
  within twice diffusers' own float32 error (+ the 2e-6 relative floor).
"""
import importlib
import re

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern import analytic, samplers, schedules  # noqa: E402
from diffkern.ops import philox  # noqa: E402
from diffkern.sampling import knobs, sample  # noqa: E402
from diffkern.testing import assert_matches_reference, make_tensor  # noqa: E402
from dropin_conformance import check_saved_scheduler  # noqa: E402
from dropin_consistency import (check_output_dtypes_and_add_noise, check_philox_loop,  # noqa: E402
                                check_zero_snr_epsilon_refused, consistency_parity, consistency_pipeline_runs,
                                float64_consistency)

LCM = importlib.import_module("diffusers.schedulers.scheduling_lcm")
SHAPE = (2, 4, 5, 3)
REF = "reference"


def float64_lcm(float32_draws: bool):
    """diffusers' LCM module in float64 (see the module docstring); ``float32_draws``: its generator noise is the
    float32 normals of the same generator, upcast (as the float32 runs draw them)."""
    return float64_consistency(LCM, float32_draws, default_dtype=torch.float64)


def lcm_parity(config, kw, dtype, begin=0, backend=REF):
    """Run ours (``dtype``) and diffusers' LCM step by step on the truth's states and fresh model outputs."""
    consistency_parity("LCMScheduler", float64_lcm, config, kw, dtype, second="denoised", begin=begin,
                       backend=backend, shape=SHAPE)


CASES = [
    ({}, {"num_inference_steps": 4}),
    ({"prediction_type": "v_prediction"}, {"num_inference_steps": 6}),
    ({"prediction_type": "sample", "timestep_scaling": 3.0}, {"num_inference_steps": 3}),
    ({}, {"num_inference_steps": 5, "original_inference_steps": 20}),
    ({"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "set_alpha_to_one": False},
     {"num_inference_steps": 4, "strength": 0.6}),
    ({"beta_schedule": "squaredcos_cap_v2"}, {"timesteps": [999, 759, 499, 259]}),
    ({}, {"timesteps": [999, 800, 513, 100, 7], "strength": 0.5}),  # cut to 2: no step is the noise-free one
    ({"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}, {"num_inference_steps": 4}),
    ({"original_inference_steps": 1000}, {"timesteps": [999, 499, 0]}),  # ends at t = 0: c_skip = 1, c_out = 0
] + [({}, {"num_inference_steps": n}) for n in (1, 2, 3, 7, 8)]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("config, kw", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_step_matches_diffusers(config, kw, dtype):
    lcm_parity(config, kw, dtype)


@pytest.mark.parametrize("begin", [1, 3])
def test_set_begin_index(begin):
    for dtype in (torch.float64, torch.float32):
        lcm_parity({"prediction_type": "v_prediction"}, {"num_inference_steps": 5}, dtype, begin=begin)


def test_every_backend(cpu_backend):
    for dtype in (torch.float64, torch.float32):
        lcm_parity({}, {"num_inference_steps": 4}, dtype, backend=cpu_backend)


def test_philox_without_generator_is_seeded_and_equal_on_every_backend():
    check_philox_loop(dd.LCMScheduler, SHAPE)


def test_timesteps_match_diffusers_over_many_settings():
    for original in (50, 30, 7, 1000):
        for strength in (1.0, 0.5, 0.37):
            for n in (1, 2, 4, 8, 13):
                theirs, ours = diffusers.LCMScheduler(original_inference_steps=original), dd.LCMScheduler()
                try:
                    theirs.set_timesteps(n, original_inference_steps=original, strength=strength)
                except ValueError:
                    with pytest.raises(ValueError, match="num_inference_steps"):
                        ours.set_timesteps(n, original_inference_steps=original, strength=strength)
                    continue
                ours.set_timesteps(n, original_inference_steps=original, strength=strength)
                assert torch.equal(ours.timesteps, theirs.timesteps), (original, strength, n)


@pytest.mark.parametrize("kw, named", [
    ({}, "num_inference_steps"), ({"num_inference_steps": 4, "timesteps": [999]}, "timesteps"),
    ({"num_inference_steps": 4, "original_inference_steps": 2000}, "original_inference_steps"),
    ({"num_inference_steps": 2000}, "num_inference_steps"), ({"num_inference_steps": 60}, "num_inference_steps"),
    ({"num_inference_steps": 30, "strength": 0.5}, "num_inference_steps"),
    ({"timesteps": [500, 700]}, "timesteps"), ({"timesteps": [1000, 10]}, "timesteps"),
    ({"timesteps": [999, 10], "strength": 0.1}, "strength"), ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_inference_steps": 4, "strength": 0.0}, "strength"),
    ({"num_inference_steps": 4, "original_inference_steps": 0}, "original_inference_steps")])
def test_impossible_schedules_raise_naming_the_argument(kw, named):
    with pytest.raises(ValueError, match=named):
        dd.LCMScheduler().set_timesteps(**kw)


def test_custom_timestep_warnings():
    with pytest.warns(UserWarning, match="not num_train_timesteps - 1"):
        dd.LCMScheduler().set_timesteps(timesteps=[979, 499])
    with pytest.warns(UserWarning, match="not on the original"):
        dd.LCMScheduler().set_timesteps(timesteps=[999, 500])
    with pytest.warns(UserWarning, match="exceed original_inference_steps"):
        dd.LCMScheduler(original_inference_steps=2).set_timesteps(timesteps=[999, 499, 9])


@pytest.mark.parametrize("option, value", [("clip_sample", True), ("thresholding", True),
                                           ("prediction_type", "flow"), ("beta_schedule", "sigmoid")])
def test_refused_options_name_the_key(option, value):
    with pytest.raises(ValueError, match=re.escape(f"{option}={value!r}")):
        dd.LCMScheduler(**{option: value})


def test_zero_snr_with_epsilon_is_refused_where_diffusers_divides_by_zero():
    check_zero_snr_epsilon_refused(dd.LCMScheduler, "rescale_betas_zero_snr=True", SHAPE)


def test_outputs_dtypes_and_add_noise():
    check_output_dtypes_and_add_noise("LCMScheduler", "denoised", SHAPE)


def test_save_and_load_round_trip(tmp_path):
    sched = dd.LCMScheduler(prediction_type="v_prediction", original_inference_steps=30, timestep_scaling=5.0)
    check_saved_scheduler(sched, tmp_path, {k: v for k, v in sched.config.items() if not k.startswith("_")})

#----------------------------------------------------------------------------
# A pipeline with tiny random components.


def test_pipeline_level1_matches_diffusers():
    """(Level 2, ``accelerate``: tests/test_lcm_accelerate.py.)"""
    ours, truth, eager, pipe = consistency_pipeline_runs("LCMScheduler", float64_lcm)
    assert_matches_reference(ours, truth, eager, "DDPMPipeline + LCMScheduler")

#----------------------------------------------------------------------------
# The lcm sampler.


def _k_diffusion_lcm(model, x, sigmas, noises, s_noise):
    """k-diffusion's ``sample_lcm`` loop as published (with ``s_noise``), in float64, given each step's noise."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * x.new_ones([x.shape[0]]))
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + s_noise * sigmas[i + 1] * noises[i]
    return x


@pytest.mark.parametrize("sigmas, s_noise", [(schedules.karras(4, 0.05, 10.0), 1.0),
                                             (schedules.loglinear(6, 0.1, 8.0)[:-1], 0.7)])
def test_sample_lcm_matches_k_diffusion_loop(sigmas, s_noise):
    gmm = analytic.GaussianMixture([0.3, 0.7], [[-1.0, 0.5, 0.0], [1.5, -0.5, 1.0]], [0.4, 0.6])
    host = sigmas.tolist()
    x = make_tensor((5, 3), torch.float64, seed=2) * host[0]
    seed = torch.tensor([9])
    noises = [philox.noise_like(x, seed, i, torch.float64) for i in range(len(host) - 1)]
    ref64 = _k_diffusion_lcm(gmm, x, host, noises, s_noise)
    noises32 = [philox.noise_like(x.float(), seed, i, torch.float32) for i in range(len(host) - 1)]
    eager = _k_diffusion_lcm(gmm, x.float(), host, noises32, s_noise)
    assert_matches_reference(sample(gmm, x, sigmas, "lcm", seed=seed, backend=REF, s_noise=s_noise), ref64, ref64,
                             "lcm float64")
    got = samplers.sample_lcm(gmm, x.float(), sigmas, disable=True, seed=seed, backend=REF, s_noise=s_noise)
    assert_matches_reference(got, ref64, eager, "lcm float32")
    assert knobs("lcm") == {"s_noise": 1.0, "s_noise_end": None}


def test_sample_lcm_every_backend(cpu_backend):
    gmm, sig = analytic.GaussianMixture([1.0, 1.0], [[0.0, 1.0], [2.0, -1.0]], [0.3, 0.5]), schedules.karras(5, 0.05, 5.0)
    x = make_tensor((6, 2), torch.float64, seed=7) * 5.0
    ref64 = sample(gmm, x, sig, "lcm", backend=REF, seed=11)
    eager = sample(gmm, x.float(), sig, "lcm", backend=REF, seed=11)
    assert_matches_reference(sample(gmm, x.float(), sig, "lcm", backend=cpu_backend, seed=11), ref64, eager,
                             f"lcm [{cpu_backend}]")


def test_sample_lcm_law_with_an_exact_denoiser():
    """p0 = N(mu, s^2) in 1-D, exact D(x, sigma) = mu + s^2/(s^2 + sigma^2)*(x - mu). If x_i ~ N(mu, V_i) then
    D ~ N(mu, r_i^2 V_i) with r_i = s^2/(s^2 + sigma_i^2), and x_{i+1} = D + sigma_{i+1}*xi has V_{i+1} =
    r_i^2 V_i + sigma_{i+1}^2: the sampler's output law is exactly known. 40000 samples, 5 standard errors."""
    mu, s = 0.7, 0.5
    gmm = analytic.GaussianMixture([1.0], [[mu]], [s])
    sig = schedules.karras(4, 0.1, 8.0).tolist()
    n = 40000
    x = mu + make_tensor((n, 1), torch.float64, seed=3) * (s * s + sig[0] ** 2) ** 0.5
    out = sample(gmm, x, sig, "lcm", seed=4, backend=REF)[:, 0]
    v = s * s + sig[0] ** 2
    for i in range(len(sig) - 1):
        v = (s * s / (s * s + sig[i] ** 2)) ** 2 * v + sig[i + 1] ** 2
    assert abs(float(out.mean()) - mu) < 5 * (v / n) ** 0.5
    assert abs(float(out.var()) - v) < 5 * v * (2 / (n - 1)) ** 0.5
