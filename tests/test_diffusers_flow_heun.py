"""diffkern.diffusers.FlowMatchHeunDiscreteScheduler against diffusers' own: step by step (Level 1), in the SD3
pipeline, and as Level 2 (``accelerate``) on SD3.

Oracle and tolerance: those of test_diffusers_schedulers.py / test_diffusers_flow.py. The truth is diffusers' class
run in float64 (``diffusers_float64``); at every call the three schedulers get the truth's state, and ours must be at
most twice as far from the truth as diffusers' float32 run, plus the float32 floor; ours in float64 must equal the
truth to the float64 floor (there diffusers draws its churn noise natively in float64, as ours does with a float64
model output). Pipelines: the stock pipeline in float64 is the truth, its float32 run the yardstick.

diffusers' FluxPipeline cannot run this scheduler (it passes ``sigmas`` and ``mu`` to ``set_timesteps``, which takes
neither), and accelerate refuses it there too.
"""
import contextlib
import importlib
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.diffusers.loop_spec import FLOW_TOP  # noqa: E402
from diffkern.testing import FLOORS, assert_matches_reference, make_tensor  # noqa: E402
from dropin_conformance import flow_runs  # noqa: E402
from test_diffusers_flow import tiny_sd3  # noqa: E402
from test_diffusers_schedulers import diffusers_float64  # noqa: E402

THEIRS = diffusers.FlowMatchHeunDiscreteScheduler
OURS = dd.FlowMatchHeunDiscreteScheduler
MODULE = importlib.import_module(THEIRS.__module__)
SD3_MODULE = importlib.import_module(diffusers.StableDiffusion3Pipeline.__module__)
SHAPE = (2, 3, 4, 5)
CHURN = {"s_churn": 1.5}
WINDOW = {"s_churn": 6.0, "s_tmin": 0.2, "s_tmax": 0.8, "s_noise": 1.05}


@contextlib.contextmanager
def float64_native_noise():
    """diffusers' module in float64 drawing its noise in the model output's dtype (float64), as ours does."""
    with diffusers_float64(MODULE):
        patched, MODULE.randn_tensor = MODULE.randn_tensor, diffusers.utils.torch_utils.randn_tensor
        try:
            yield
        finally:
            MODULE.randn_tensor = patched

#----------------------------------------------------------------------------
# Level 1: step by step.


def run_case(config, n, knobs, begin=0, dtype=torch.float32, model_dtype=None, backend=None):
    """Truth, diffusers in ``dtype`` and ours on the truth's states, every call from ``begin``; then ours in float64
    against the float64 truth (native float64 noise)."""
    model_dtype = model_dtype or dtype
    with diffusers_float64(MODULE):
        truth = THEIRS(**config)
        truth.set_timesteps(n)
    eager = THEIRS(**config)
    eager.set_timesteps(n)
    ours = OURS.from_config(eager.config)
    ours.backend = backend
    ours.set_timesteps(n)
    what = f"{config} n={n} {knobs} begin={begin} [{backend}]"
    # diffusers rounds sigma_min to float32 before its linspace, ours not: timesteps equal to float32 rounding
    assert ours.timesteps.dtype == torch.float32 and len(ours.timesteps) == 2 * n - 1
    assert_matches_reference(ours.timesteps, truth.timesteps, eager.timesteps, what + " timesteps")
    assert ours.sigmas.dtype == torch.float32 and ours.sigmas.shape == eager.sigmas.shape == (2 * n,)
    assert_matches_reference(ours.sigmas, truth.sigmas, eager.sigmas, what + " sigmas")
    for sched in (truth, eager, ours):
        sched.set_begin_index(begin)
    gens = [torch.Generator().manual_seed(7) for _ in range(3)]
    x = make_tensor(SHAPE, torch.float64, seed=11)
    for k in range(begin, len(eager.timesteps)):
        assert ours.state_in_first_order == eager.state_in_first_order == (k % 2 == 0)
        m = make_tensor(SHAPE, torch.float64, seed=100 + k)
        with diffusers_float64(MODULE):
            ref = truth.step(m, truth.timesteps[k], x, generator=gens[0], **knobs).prev_sample
        xs, ms = x.to(dtype), m.to(model_dtype)
        out = eager.step(ms, eager.timesteps[k], xs, generator=gens[1], **knobs).prev_sample
        got = ours.step(ms, ours.timesteps[k], xs, generator=gens[2], **knobs).prev_sample
        assert_matches_reference(got, ref, out, f"{what} call {k}")
        x = ref
    assert ours.step_index == len(ours.timesteps)
    check_float64(config, n, knobs, begin, backend)


def check_float64(config, n, knobs, begin, backend):
    with float64_native_noise():
        truth = THEIRS(**config)
        truth.set_timesteps(n)
        truth.set_begin_index(begin)
    ours = OURS(**config)
    ours.backend = backend
    ours.set_timesteps(n)
    ours.set_begin_index(begin)
    g_truth, g_ours = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x = make_tensor(SHAPE, torch.float64, seed=1)
    for k in range(begin, len(truth.timesteps)):
        m = make_tensor(SHAPE, torch.float64, seed=50 + k)
        with float64_native_noise():
            ref = truth.step(m, truth.timesteps[k], x, generator=g_truth, **knobs).prev_sample
        got = ours.step(m, ours.timesteps[k], x, generator=g_ours, **knobs).prev_sample
        assert got.dtype == torch.float64
        assert_matches_reference(got, ref, ref, f"{config} n={n} {knobs} call {k} float64 [{backend}]")
        x = ref


CASES = [({}, n, {}, 0) for n in (1, 2, 3, 7, 28)] + [
    ({"shift": 3.0}, 28, {}, 0),  # SD3's
    ({"shift": 3.0}, 7, CHURN, 0),
    ({"shift": 0.3}, 3, CHURN, 0),
    ({"shift": 2.0}, 7, WINDOW, 2),
    ({"shift": 3.0}, 1, CHURN, 0),
    ({"num_train_timesteps": 37, "shift": 1.7}, 2, WINDOW, 0),
    ({"shift": 3.0}, 7, {}, 4),
]


@pytest.mark.parametrize("config, n, knobs, begin", CASES, ids=[str(i) for i in range(len(CASES))])
def test_matches_diffusers(config, n, knobs, begin):
    run_case(config, n, knobs, begin)


@pytest.mark.parametrize("dtype, model_dtype", [(torch.bfloat16, None), (torch.float32, torch.bfloat16),
                                                (torch.float16, torch.float32)])
def test_sixteen_bit(dtype, model_dtype):
    """16-bit states and mixed dtypes: output in the model output's dtype, computed in float32 as diffusers does."""
    run_case({"shift": 3.0}, 5, {}, dtype=dtype, model_dtype=model_dtype)
    run_case({"shift": 3.0}, 3, CHURN, dtype=dtype, model_dtype=model_dtype)


def test_every_backend(cpu_backend):
    for config, n, knobs, begin in (CASES[3], CASES[8], CASES[10]):
        run_case(config, n, knobs, begin, backend=cpu_backend)


def test_philox_churn_without_generator(cpu_backend):
    """Without a generator the churn noise is Philox: seeded, the same on every backend (to the rule)."""
    def loop(backend, seed, dtype=torch.float32):
        sched = OURS(shift=3.0)
        sched.backend = backend
        sched.set_seed(seed)
        sched.set_timesteps(3)
        x = make_tensor(SHAPE, dtype, seed=1)
        for k, t in enumerate(sched.timesteps):
            x = sched.step(make_tensor(SHAPE, dtype, seed=20 + k), t, x, **CHURN).prev_sample
        return x
    a = loop(cpu_backend, 5)
    torch.testing.assert_close(loop(cpu_backend, 5), a, rtol=0, atol=0)
    assert not torch.equal(loop(cpu_backend, 6), a)
    assert_matches_reference(a, loop("reference", 5, torch.float64), loop("reference", 5), cpu_backend)

#----------------------------------------------------------------------------
# API contract.


def test_api_matches_diffusers():
    ours, theirs = OURS(shift=3.0), THEIRS(shift=3.0)
    assert OURS.order == THEIRS.order == 2 and OURS._compatibles == [] == THEIRS._compatibles and len(ours) == 1000
    torch.testing.assert_close(ours.timesteps, theirs.timesteps)  # before set_timesteps: the training schedule
    torch.testing.assert_close(ours.sigmas, theirs.sigmas)
    assert math.isclose(ours.sigma_min, theirs.sigma_min, rel_tol=1e-6) and ours.sigma_max == theirs.sigma_max
    for sched in (ours, theirs):
        sched.set_timesteps(4)
    torch.testing.assert_close(ours.sigmas, theirs.sigmas, rtol=FLOORS[torch.float32], atol=0)
    x = make_tensor(SHAPE, seed=1)
    res = ours.step(x, ours.timesteps[0], x)
    assert type(res) is diffusers.schedulers.scheduling_flow_match_heun_discrete.FlowMatchHeunDiscreteSchedulerOutput
    out = ours.step(x.bfloat16(), ours.timesteps[1], x, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1 and out[0].dtype == torch.bfloat16
    assert ours.step(x.double(), ours.timesteps[2], x.half()).prev_sample.dtype == torch.float64


def test_scale_noise_matches_diffusers():
    x, noise = make_tensor(SHAPE, seed=1), make_tensor(SHAPE, seed=2)
    for k in (0, 1, 2, 5, 6):
        ours, theirs = OURS(shift=3.0), THEIRS(shift=3.0)
        for sched in (ours, theirs):
            sched.set_timesteps(4)
        torch.testing.assert_close(ours.scale_noise(x, ours.timesteps[k], noise),
                                   theirs.scale_noise(x, theirs.timesteps[k], noise))
    for sched in (ours, theirs):  # img2img: set_begin_index, then that call's sigma for every sample
        sched.set_timesteps(4)
        sched.set_begin_index(4)
    t = torch.tensor([1000.0, 500.0])
    torch.testing.assert_close(ours.scale_noise(x, t, noise), theirs.scale_noise(x, t[:1], noise))
    torch.testing.assert_close(ours.add_noise(x, noise, t), ours.scale_noise(x, t, noise))


@pytest.mark.parametrize("call, match", [
    (lambda s, x: s.step(x, 1000, x), "timestep: .*integer"),
    (lambda s, x: s.step(x, torch.tensor(1000), x), "timestep: .*integer"),
    (lambda s, x: s.step(x, s.timesteps[0] * 0.5, x), "timestep: expected 1000"),
    (lambda s, x: s.step(x, s.timesteps[0], x, s_churn="a"), "s_churn must be a number"),
    (lambda s, x: s.scale_noise(x, s.timesteps[0]), "noise: required"),
    (lambda s, x: s.set_begin_index(1), "begin_index: expected an even index"),
    (lambda s, x: s.set_timesteps(0), "num_inference_steps: expected an int >= 1"),
])
def test_refused_arguments_name_themselves(call, match):
    sched = OURS()
    sched.set_timesteps(3)
    with pytest.raises(ValueError, match=match):
        call(sched, make_tensor(SHAPE, seed=1))


@pytest.mark.parametrize("config, match", [({"shift": 0.0}, "shift"), ({"shift": math.inf}, "shift"),
                                           ({"num_train_timesteps": 0}, "num_train_timesteps")])
def test_refused_configs_name_the_option(config, match):
    with pytest.raises(ValueError, match=match):
        OURS(**config)


def _public(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}


def test_save_load_and_from_config(tmp_path):
    config = {"num_train_timesteps": 500, "shift": 3.0}
    OURS(**config).save_pretrained(tmp_path / "ours")
    loaded = OURS.from_pretrained(tmp_path / "ours")
    assert type(loaded) is OURS and _public(loaded.config) == config
    theirs = THEIRS.from_pretrained(tmp_path / "ours")  # diffusers loads ours, and we load theirs
    assert _public(theirs.config) == config and _public(OURS.from_config(theirs.config).config) == config
    assert dd.SCHEDULERS["FlowMatchHeunDiscreteScheduler"] is OURS and OURS.__module__ == "diffkern.diffusers"
    assert "FlowMatchHeunDiscreteScheduler" in dd.__all__
    euler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).config  # SD3's config
    assert _public(OURS.from_config(euler).config) == _public(THEIRS.from_config(euler).config)
    assert OURS.from_config(euler).config.shift == 3.0

#----------------------------------------------------------------------------
# Pipelines.


def _sd3_call(pipe, generator, output_type="pt", **kw):
    dtype = pipe.transformer.dtype
    g = torch.Generator().manual_seed(0)
    e = [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for shape in ((2, 7, 32), (2, 64)) * 2]
    kw = {"guidance_scale": 3.0, "num_inference_steps": 5, **kw}
    return pipe(prompt_embeds=e[0], pooled_prompt_embeds=e[1], negative_prompt_embeds=e[2],
                negative_pooled_prompt_embeds=e[3], height=16, width=16, generator=generator,
                output_type=output_type, **kw).images


@pytest.mark.parametrize("config", [{"shift": 3.0}, {}])
def test_level1_sd3_pipeline_matches_diffusers(config):
    with diffusers_float64(MODULE, SD3_MODULE):
        truth = _sd3_call(tiny_sd3(THEIRS(**config)).to(torch.float64), torch.Generator().manual_seed(1))
    eager = _sd3_call(tiny_sd3(THEIRS(**config)), torch.Generator().manual_seed(1))
    ours = _sd3_call(tiny_sd3(OURS(**config)), torch.Generator().manual_seed(1))
    assert ours.shape == (2, 3, 16, 16) and float(ours.std()) > 0.01
    assert_matches_reference(ours, truth, eager, f"SD3 level 1 {config}")


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("ours_cls", [THEIRS, OURS], ids=["theirs", "ours"])
def test_level2_sd3_matches_the_pipeline(n, ours_cls):
    config = {"shift": 3.0}
    fast = dd.accelerate(tiny_sd3(ours_cls(**config)))
    spec = fast._schedule(n)[1]
    assert spec.method == "heun_flow" and spec.sigmas[0] == FLOW_TOP and spec.sigmas[-1] == 0 and spec.flow
    assert len(spec.timesteps) == n and spec.timesteps[0] == 1000.0
    ours, truth, eager = flow_runs(tiny_sd3(THEIRS(**config)), config, (MODULE, SD3_MODULE), _sd3_call, ours_cls,
                                   num_inference_steps=n)
    assert ours.shape == (2, 3, 16, 16) and float(ours.std()) > 0.01
    assert_matches_reference(ours, truth, eager, f"SD3 level 2 heun n={n}")


def test_level2_sd3_refuses_mu():
    """The pipeline would pass mu to set_timesteps, which takes none (diffusers raises a TypeError): a caller's mu,
    or the pipeline's own for a config with use_dynamic_shifting (loaded from a dynamically shifted Euler's)."""
    with pytest.raises(TypeError, match="mu"):
        _sd3_call(tiny_sd3(THEIRS()), torch.Generator().manual_seed(1), mu=0.5)
    with pytest.raises(ValueError, match="mu: FlowMatchHeunDiscreteScheduler takes no dynamic shift"):
        _sd3_call(dd.accelerate(tiny_sd3(THEIRS())), torch.Generator().manual_seed(1), mu=0.5)
    dynamic = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config
    with pytest.raises(ValueError, match="mu: FlowMatchHeunDiscreteScheduler takes no dynamic shift"):
        _sd3_call(dd.accelerate(tiny_sd3(THEIRS.from_config(dynamic))), torch.Generator().manual_seed(1))


def _flux_pipe(scheduler):
    from test_diffusers_flux import tiny_flux
    return tiny_flux(scheduler, guidance_embeds=True)


def _flux_call(pipe, generator, output_type="pt", **kw):
    from test_diffusers_flux import embeds_call
    return embeds_call(pipe, generator, output_type, **kw)


def test_flux_refuses_the_scheduler_as_diffusers_does():
    """diffusers' FluxPipeline cannot call this scheduler (it passes sigmas and mu to set_timesteps); accelerate
    refuses it by name at wrapping time rather than run a schedule without Flux's mu."""
    with pytest.raises(ValueError, match="does not support custom sigmas"):
        _flux_call(_flux_pipe(THEIRS(shift=3.0)), torch.Generator().manual_seed(5))
    for sched in (THEIRS(shift=3.0), OURS(shift=3.0)):
        with pytest.raises(ValueError, match="FluxPipeline with a FlowMatchHeunDiscreteScheduler is not supported"):
            dd.accelerate(_flux_pipe(sched))
