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
import contextlib
import importlib
import math
import re

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.diffusers.schedulers_tcd import intermediate_timestep  # noqa: E402
from diffkern.testing import assert_matches_reference, make_tensor, usable_backends  # noqa: E402
from test_diffusers_schedulers import _Torch64, diffusers_float64  # noqa: E402

TCD = importlib.import_module("diffusers.schedulers.scheduling_tcd")
SHAPE = (2, 4, 5, 3)
REF = "reference"
ETAS = (0.0, 0.3, 1.0)


@contextlib.contextmanager
def float64_tcd(float32_draws: bool):
    """diffusers' TCD module in float64 (see the module docstring); ``float32_draws``: its generator noise is the
    float32 normals of the same generator, upcast (as the float32 runs draw them)."""
    if float32_draws:
        with diffusers_float64(TCD):
            yield
        return
    module_torch, TCD.torch = TCD.torch, _Torch64()
    try:
        yield
    finally:
        TCD.torch = module_torch


def _set(sched, kw, begin):
    sched.set_timesteps(**kw)
    if begin:
        sched.set_begin_index(begin)


def tcd_parity(config, kw, dtype, eta, begin=0, backend=REF):
    """Run ours (``dtype``) and diffusers' TCD step by step on the truth's states and fresh model outputs."""
    with float64_tcd(dtype == torch.float32):
        truth = diffusers.TCDScheduler(**config)
        _set(truth, kw, begin)
    eager = diffusers.TCDScheduler(**config)
    _set(eager, kw, begin)
    ours = dd.TCDScheduler.from_config(eager.config)
    ours.backend = backend
    _set(ours, kw, begin)
    assert torch.equal(ours.timesteps, eager.timesteps) and ours.timesteps.dtype == eager.timesteps.dtype
    assert ours.num_inference_steps == eager.num_inference_steps
    gens = [torch.Generator().manual_seed(7) for _ in range(3)]
    x = make_tensor(SHAPE, torch.float64, seed=11)
    for k in range(begin, len(eager.timesteps)):
        t = eager.timesteps[k]
        m = make_tensor(SHAPE, torch.float64, seed=100 + k)
        assert torch.equal(ours.scale_model_input(x.to(dtype), t), x.to(dtype))
        with float64_tcd(dtype == torch.float32):
            ref = truth.step(m, t, x, eta=eta, generator=gens[0])
        what = f"{config} {kw} eta={eta} begin={begin} [{backend}] step {k} (t={int(t)})"
        got = ours.step(m.to(dtype), t, x.to(dtype), eta=eta, generator=gens[2])
        if dtype == torch.float64:
            for a, b, name in ((got.prev_sample, ref.prev_sample, "prev"),
                               (got.pred_noised_sample, ref.pred_noised_sample, "noised")):
                assert_matches_reference(a, b, b, f"{what} {name}")
        else:
            out = eager.step(m.float(), t, x.float(), eta=eta, generator=gens[1])
            assert_matches_reference(got.prev_sample, ref.prev_sample, out.prev_sample, what + " prev")
            assert_matches_reference(got.pred_noised_sample, ref.pred_noised_sample, out.pred_noised_sample,
                                     what + " noised")
        x = ref.prev_sample
    assert ours.step_index == len(ours.timesteps)
    # the generators advanced identically (noise drawn on the same steps, a zero-weight draw included)
    assert torch.equal(torch.randn(3, generator=gens[0]), torch.randn(3, generator=gens[2]))


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
    def loop(backend, dtype, seed, eta=0.3):
        sched = dd.TCDScheduler()
        sched.backend = backend
        sched.set_seed(seed)
        sched.set_timesteps(4)
        x = make_tensor(SHAPE, dtype, seed=1)
        for k, t in enumerate(sched.timesteps):
            x = sched.step(make_tensor(SHAPE, dtype, seed=20 + k), t, x, eta=eta).prev_sample
        return x

    ref64, eager = loop(REF, torch.float64, 5), loop(REF, torch.float32, 5)
    assert torch.equal(eager, loop(REF, torch.float32, 5))
    assert not torch.allclose(eager, loop(REF, torch.float32, 6))
    for backend in usable_backends("cpu"):
        assert_matches_reference(loop(backend, torch.float32, 5), ref64, eager, f"philox [{backend}]")
        assert_matches_reference(loop(backend, torch.float64, 5), ref64, ref64, f"philox [{backend}] float64")
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
    sched = dd.TCDScheduler(rescale_betas_zero_snr=True)
    with pytest.raises(ValueError, match="TCDScheduler: rescale_betas_zero_snr=True"):
        sched.set_timesteps(4)  # starts at t = 999, alpha-bar 0
    sched.set_timesteps(timesteps=[979, 499])  # skips it: fine
    assert torch.isfinite(sched.step(make_tensor(SHAPE), 979, make_tensor(SHAPE, seed=1)).prev_sample).all()


def test_outputs_dtypes_and_add_noise():
    for s_dtype, m_dtype in ((torch.float32, torch.float16), (torch.float16, torch.float16),
                             (torch.bfloat16, torch.float32)):
        theirs, ours = diffusers.TCDScheduler(), dd.TCDScheduler()
        theirs.set_timesteps(2)
        ours.set_timesteps(2)
        x, m = make_tensor(SHAPE, s_dtype, seed=1), make_tensor(SHAPE, m_dtype, seed=2)
        a = theirs.step(m, theirs.timesteps[0], x, generator=torch.Generator().manual_seed(0))
        b = ours.step(m, ours.timesteps[0], x, generator=torch.Generator().manual_seed(0))
        assert type(b) is type(a) and b.prev_sample.dtype == a.prev_sample.dtype
        assert b.pred_noised_sample.dtype == a.pred_noised_sample.dtype
    prev, noised = ours.step(m, ours.timesteps[1], x, return_dict=False)
    assert torch.equal(prev, noised)  # the last step returns the noised sample at s = 0
    x0, noise, t = make_tensor(SHAPE, seed=3), make_tensor(SHAPE, seed=4), torch.tensor([999, 19])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t))


def test_save_and_load_round_trip(tmp_path):
    sched = dd.TCDScheduler(prediction_type="v_prediction", original_inference_steps=30, beta_schedule="linear")
    sched.save_pretrained(tmp_path)
    loaded = dd.TCDScheduler.from_pretrained(tmp_path)
    public = {k: v for k, v in sched.config.items() if not k.startswith("_")}
    assert type(loaded) is dd.TCDScheduler and {k: loaded.config[k] for k in public} == public
    theirs = diffusers.TCDScheduler.from_pretrained(tmp_path)
    assert {k: theirs.config[k] for k in public} == public
    assert {k: dd.TCDScheduler.from_config(theirs.config).config[k] for k in public} == public
    assert dd.SCHEDULERS["TCDScheduler"] is dd.TCDScheduler and "TCDScheduler" in dd.__all__

#----------------------------------------------------------------------------
# A pipeline with tiny random components (its loop calls step(..., generator=...) with the default eta = 0.3).


def _ddpm_pipeline_runs():
    from test_diffusers_pipelines import STEPS, pipeline_modules, tiny_unet

    config = {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "original_inference_steps": 20}

    def call(pipe):
        return pipe(batch_size=2, generator=torch.Generator().manual_seed(5), num_inference_steps=STEPS,
                    output_type="pt").images

    pipe = diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=diffusers.TCDScheduler(**config))
    pipe.set_progress_bar_config(disable=True)
    with diffusers_float64(TCD, *pipeline_modules(pipe)):
        twin = diffusers.DDPMPipeline(unet=tiny_unet().double(), scheduler=diffusers.TCDScheduler(**config))
        twin.set_progress_bar_config(disable=True)
        truth = call(twin)
    eager = call(pipe)
    pipe.scheduler = dd.TCDScheduler.from_config(pipe.scheduler.config)
    return call(pipe), truth, eager, pipe


def test_pipeline_level1_matches_diffusers_and_level2_refuses():
    ours, truth, eager, pipe = _ddpm_pipeline_runs()
    assert_matches_reference(ours, truth, eager, "DDPMPipeline + TCDScheduler")
    for scheduler in (pipe.scheduler, diffusers.TCDScheduler.from_config(pipe.scheduler.config)):
        pipe.scheduler = scheduler
        with pytest.raises(ValueError, match="TCDScheduler is not supported by the fused loop"):
            dd.accelerate(pipe)
