"""Trajectory Consistency Distillation: ``diffkern.diffusers.TCDScheduler`` (Level 1) against diffusers'
``TCDScheduler``.

Oracles and tolerances (the project rule, ``diffkern.testing.assert_matches_reference``):
- float64: diffusers' own step run in float64 (its module sees ``torch.float32`` as float64). The default dtype stays
  float32, so its intermediate timestep ``s = floor((1 - eta)*t')`` is the float32 product it is in real use (which
  ours reproduces; a float64 product floors differently for some t'). Our float64 step must match it to the float64
  floor; the generator's float64 draws are the same in both.
- float32: the truth above with float32 generator draws upcast, diffusers' float32 run as the yardstick: ours must be
  within twice diffusers' own float32 error (+ the 2e-6 relative floor).
Level 2: ``accelerate`` refuses TCD by name (no diffkern sampler gives its per-step sigma_down).
"""
import importlib
import math
import re

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.diffusers.schedulers_tcd import intermediate_timestep  # noqa: E402
from diffkern.testing import assert_matches_reference, make_tensor, usable_backends  # noqa: E402
from dropin_conformance import check_saved_scheduler  # noqa: E402
from dropin_consistency import (check_output_dtypes_and_add_noise, check_philox_loop,  # noqa: E402
                                check_zero_snr_epsilon_refused, consistency_parity, consistency_pipeline_runs,
                                float64_consistency)

TCD = importlib.import_module("diffusers.schedulers.scheduling_tcd")
SHAPE = (2, 4, 5, 3)
REF = "reference"
ETAS = (0.0, 0.3, 1.0)


def float64_tcd(float32_draws: bool):
    """diffusers' TCD module in float64 (see the module docstring); ``float32_draws``: its generator noise is the
    float32 normals of the same generator, upcast (as the float32 runs draw them)."""
    return float64_consistency(TCD, float32_draws)


def tcd_parity(config, kw, dtype, eta, begin=0, backend=REF):
    """Run ours (``dtype``) and diffusers' TCD step by step on the truth's states and fresh model outputs."""
    consistency_parity("TCDScheduler", float64_tcd, config, kw, dtype, second="pred_noised_sample", begin=begin,
                       backend=backend, step_kw={"eta": eta}, shape=SHAPE)


CASES = [
    ({}, {"num_inference_steps": 4}),
    ({"prediction_type": "v_prediction"}, {"num_inference_steps": 6}),
    ({"prediction_type": "sample", "timestep_scaling": 3.0}, {"num_inference_steps": 3}),
    ({"original_inference_steps": 20}, {"num_inference_steps": 5}),
    ({}, {"num_inference_steps": 5, "original_inference_steps": 20}),  # passed: every training timestep a candidate
    ({"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "set_alpha_to_one": False},
     {"num_inference_steps": 4, "strength": 0.6}),
    ({"beta_schedule": "squaredcos_cap_v2"}, {"timesteps": [999, 759, 499, 259]}),
    ({}, {"timesteps": [999, 800, 513, 100, 7], "strength": 0.5}),  # cut to 2: no step is the noise-free one
    ({}, {"timesteps": [999, 700, 350, 90]}),  # float32 and float64 floors of 0.7*t' differ at 700, 350, 90
    ({"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}, {"num_inference_steps": 4}),
    ({"prediction_type": "sample", "rescale_betas_zero_snr": True}, {"num_inference_steps": 2}),
    ({"original_inference_steps": 1000}, {"timesteps": [999, 499, 0]}),  # ends at t = 0
    ({"clip_sample": True, "thresholding": True}, {"num_inference_steps": 4}),  # ignored, as in diffusers
] + [({}, {"num_inference_steps": n}) for n in (1, 2, 3, 7, 8)]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("eta", ETAS)
@pytest.mark.parametrize("config, kw", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_step_matches_diffusers(config, kw, eta):
    for dtype in (torch.float64, torch.float32):
        tcd_parity(config, kw, dtype, eta)


@pytest.mark.parametrize("begin", [1, 3])
def test_set_begin_index(begin):
    for dtype in (torch.float64, torch.float32):
        tcd_parity({"prediction_type": "v_prediction"}, {"num_inference_steps": 5}, dtype, 0.3, begin=begin)


def test_every_backend(cpu_backend):
    for dtype in (torch.float64, torch.float32):
        tcd_parity({}, {"num_inference_steps": 4}, dtype, 0.3, backend=cpu_backend)


def test_intermediate_timestep_is_diffusers_float32_floor():
    """diffusers computes ``(1 - eta)*prev_timestep`` as a float32 tensor product; ours reproduces it exactly."""
    for eta in [k / 20 for k in range(21)] + [0.3, 1 / 3]:
        for t in range(0, 1000, 7):
            want = int(torch.floor((1 - eta) * torch.tensor(t)).to(torch.long))
            assert intermediate_timestep(t, eta) == want, (eta, t)
    assert intermediate_timestep(700, 0.3) == 490 and math.floor((1 - 0.3) * 700) == 489
    sched = dd.TCDScheduler()
    sched.set_timesteps(timesteps=[999, 700, 90])
    assert sched.intermediate_timesteps(0.3) == [490, 63, 0] and sched.intermediate_timesteps(0.0) == [700, 90, 0]


def test_eta_zero_draws_no_noise():
    sched = dd.TCDScheduler()
    sched.set_timesteps(4)
    gen, x = torch.Generator().manual_seed(3), make_tensor(SHAPE, seed=1)
    for k, t in enumerate(sched.timesteps):
        out = sched.step(make_tensor(SHAPE, seed=20 + k), t, x, eta=0.0, generator=gen)
        assert torch.equal(out.prev_sample, out.pred_noised_sample)
        x = out.prev_sample
    assert torch.equal(torch.randn(3, generator=gen), torch.randn(3, generator=torch.Generator().manual_seed(3)))


def test_philox_without_generator_is_seeded_and_equal_on_every_backend():
    loop = check_philox_loop(dd.TCDScheduler, SHAPE, eta=0.3)
    for backend in usable_backends("cpu"):
        assert torch.equal(loop(backend, torch.float32, 5, eta=1.0), loop(backend, torch.float32, 5, eta=1.0))


def test_timesteps_match_diffusers_over_many_settings():
    for original in (50, 30, 7, 1000):
        for passed in (False, True):
            for strength in (1.0, 0.5, 0.37):
                for n in (1, 2, 4, 8, 13):
                    kw = {"original_inference_steps": original} if passed else {}
                    theirs = diffusers.TCDScheduler(original_inference_steps=original)
                    ours = dd.TCDScheduler(original_inference_steps=original)
                    try:
                        theirs.set_timesteps(n, strength=strength, **kw)
                    except ValueError:
                        with pytest.raises(ValueError, match="num_inference_steps"):
                            ours.set_timesteps(n, strength=strength, **kw)
                        continue
                    ours.set_timesteps(n, strength=strength, **kw)
                    assert torch.equal(ours.timesteps, theirs.timesteps), (original, passed, strength, n)


@pytest.mark.parametrize("kw, named", [
    ({}, "num_inference_steps"), ({"num_inference_steps": 4, "timesteps": [999]}, "timesteps"),
    ({"num_inference_steps": 2000}, "num_inference_steps"), ({"num_inference_steps": 60}, "num_inference_steps"),
    ({"num_inference_steps": 30, "strength": 0.5}, "num_inference_steps"),
    ({"num_inference_steps": 30, "original_inference_steps": 20}, "num_inference_steps"),
    ({"timesteps": [500, 700]}, "timesteps"), ({"timesteps": [1000, 10]}, "timesteps"),
    ({"timesteps": [999, 10], "strength": 0.1}, "strength"), ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_inference_steps": 4, "strength": 0.0}, "strength"),
    ({"num_inference_steps": 4, "strength": 1.5, "original_inference_steps": 20}, "strength"),
    ({"num_inference_steps": 4, "original_inference_steps": 0}, "original_inference_steps")])
def test_impossible_schedules_raise_naming_the_argument(kw, named):
    with pytest.raises(ValueError, match=named):
        dd.TCDScheduler().set_timesteps(**kw)


def test_config_original_inference_steps_above_train_timesteps_is_refused():
    with pytest.raises(ValueError, match="original_inference_steps=2000"):
        dd.TCDScheduler(original_inference_steps=2000).set_timesteps(4)


def test_custom_timestep_warnings_name_tcd():
    with pytest.warns(UserWarning, match="TCDScheduler: the custom schedule starts at 979"):
        dd.TCDScheduler().set_timesteps(timesteps=[979, 499])
    with pytest.warns(UserWarning, match="not on the original"):
        dd.TCDScheduler().set_timesteps(timesteps=[999, 500])
    with pytest.warns(UserWarning, match="exceed original_inference_steps"):
        dd.TCDScheduler(original_inference_steps=2).set_timesteps(timesteps=[999, 499, 9])


@pytest.mark.parametrize("option, value", [("prediction_type", "flow"), ("beta_schedule", "sigmoid")])
def test_refused_options_name_the_key(option, value):
    with pytest.raises(ValueError, match=re.escape(f"{option}={value!r}")):
        dd.TCDScheduler(**{option: value})


@pytest.mark.parametrize("eta", [-0.1, 1.5, True, "0.3"])
def test_eta_outside_zero_one_is_refused(eta):
    sched = dd.TCDScheduler()
    sched.set_timesteps(2)
    with pytest.raises(ValueError, match="eta must be a number in \\[0, 1\\]"):
        sched.step(make_tensor(SHAPE), sched.timesteps[0], make_tensor(SHAPE, seed=1), eta=eta)


def test_zero_snr_with_epsilon_is_refused_where_diffusers_divides_by_zero():
    check_zero_snr_epsilon_refused(dd.TCDScheduler, "TCDScheduler: rescale_betas_zero_snr=True", SHAPE)


def test_outputs_dtypes_and_add_noise():
    check_output_dtypes_and_add_noise("TCDScheduler", "pred_noised_sample", SHAPE)


def test_save_and_load_round_trip(tmp_path):
    sched = dd.TCDScheduler(prediction_type="v_prediction", original_inference_steps=30, beta_schedule="linear")
    check_saved_scheduler(sched, tmp_path, {k: v for k, v in sched.config.items() if not k.startswith("_")})

#----------------------------------------------------------------------------
# A pipeline with tiny random components (its loop calls step(..., generator=...) with the default eta = 0.3).


def test_pipeline_level1_matches_diffusers_and_level2_refuses():
    ours, truth, eager, pipe = consistency_pipeline_runs("TCDScheduler", float64_tcd)
    assert_matches_reference(ours, truth, eager, "DDPMPipeline + TCDScheduler")
    for scheduler in (pipe.scheduler, diffusers.TCDScheduler.from_config(pipe.scheduler.config)):
        pipe.scheduler = scheduler
        with pytest.raises(ValueError, match="TCDScheduler is not supported by the fused loop"):
            dd.accelerate(pipe)
