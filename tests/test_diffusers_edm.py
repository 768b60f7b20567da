"""diffkern.diffusers' EDM schedulers against diffusers' ``EDMEulerScheduler`` and ``EDMDPMSolverMultistepScheduler``.

Same oracle and rule as ``test_diffusers_schedulers.py``: diffusers' own scheduler run in float64 is the truth, and at
every step ours must be at most twice as far from it as diffusers' float32 run (plus a float32 floor), on the same
per-step inputs and the same generator draws.
"""
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.diffusers.loop_spec import loop_spec  # noqa: E402
from diffkern.testing import assert_matches_reference, make_tensor  # noqa: E402
from test_diffusers_schedulers import diffusers_float64  # noqa: E402
from test_diffusers_sdxl import runs, tiny_sdxl  # noqa: E402, F401  (tiny_sdxl: a fixture)

SHAPE = (2, 3, 5, 7)
EULER, DPM = "EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"
MODULES = {EULER: diffusers.schedulers.scheduling_edm_euler,
           DPM: diffusers.schedulers.scheduling_edm_dpmsolver_multistep}


def _step(sched, m, t, x, kw, generator):
    return sched.step(m, t, x, generator=generator, **kw)


def check_parity(name, config, kw=None, steps=7, begin=None, backend=None):
    """Truth (diffusers float64), diffusers float32 and ours step by step on the truth's states; also checks the
    schedule, ``scale_model_input`` and that the generators advanced alike."""
    kw = kw or {}
    with diffusers_float64(MODULES[name]):
        truth = getattr(diffusers, name)(**config)
        truth.set_timesteps(steps)
    eager = getattr(diffusers, name)(**config)
    eager.set_timesteps(steps)
    ours = getattr(dd, name).from_config(eager.config)
    ours.backend = backend
    ours.set_timesteps(steps)
    if begin is not None:
        for sched in (truth, eager, ours):
            sched.set_begin_index(begin)
    assert ours.timesteps.dtype == eager.timesteps.dtype == torch.float32
    assert_matches_reference(ours.timesteps.double(), truth.timesteps.double(), eager.timesteps.double(), "timesteps")
    assert_matches_reference(ours.sigmas.double(), truth.sigmas.double(), eager.sigmas.double(), "sigmas")
    assert math.isclose(ours.init_noise_sigma, eager.init_noise_sigma, rel_tol=1e-12)
    gens = [torch.Generator().manual_seed(7) for _ in range(3)]
    x = make_tensor(SHAPE, torch.float64, seed=11) * float(truth.init_noise_sigma)
    for k in range(begin or 0, steps):
        t64, t32, t = truth.timesteps[k], eager.timesteps[k], ours.timesteps[k]
        m = make_tensor(SHAPE, torch.float64, seed=100 + k)
        x32, m32 = x.float(), m.float()
        what = f"{name} {config} {kw} [{backend}] step {k}"
        with diffusers_float64(MODULES[name]):
            assert_matches_reference(ours.scale_model_input(x32, t), truth.scale_model_input(x, t64),
                                     eager.scale_model_input(x32, t32), what + " scale_model_input")
            ref = _step(truth, m, t64, x, kw, gens[0])
        out = _step(eager, m32, t32, x32, kw, gens[1])
        got = _step(ours, m32, t, x32, kw, gens[2])
        assert_matches_reference(got.prev_sample, ref.prev_sample, out.prev_sample, what + " prev_sample")
        if name == EULER:
            assert_matches_reference(got.pred_original_sample.to(out.pred_original_sample.dtype),
                                     ref.pred_original_sample, out.pred_original_sample, what + " x0")
        x = ref.prev_sample
    assert ours.step_index == steps
    assert torch.equal(gens[1].get_state(), gens[2].get_state()), "the generator advanced differently"


EULER_CASES = [
    ({}, {}, 7),
    ({"sigma_schedule": "exponential"}, {}, 5),
    ({"rho": 5.0, "sigma_data": 1.0, "prediction_type": "v_prediction", "sigma_max": 120.0}, {}, 6),
    ({"final_sigmas_type": "sigma_min", "sigma_min": 0.03}, {}, 4),
    ({}, {"s_churn": 2.0, "s_tmin": 0.1, "s_tmax": 20.0}, 8),
    ({"sigma_schedule": "exponential", "prediction_type": "v_prediction"}, {"s_churn": 40.0, "s_noise": 1.003}, 5),
    ({}, {}, 1),
    ({"rho": 3.0}, {"s_churn": 1.0}, 2),
    ({}, {}, 12),
]
DPM_CASES = [
    ({}, 7),
    ({"solver_order": 1}, 4),
    ({"solver_order": 3}, 12),
    ({"solver_order": 3, "lower_order_final": False, "sigma_schedule": "exponential"}, 9),
    ({"solver_type": "heun", "prediction_type": "v_prediction", "sigma_data": 1.0}, 6),
    ({"algorithm_type": "sde-dpmsolver++"}, 7),
    ({"algorithm_type": "sde-dpmsolver++", "solver_type": "heun", "rho": 5.0}, 5),
    ({"algorithm_type": "sde-dpmsolver++", "solver_order": 1, "sigma_schedule": "exponential"}, 4),
    ({"final_sigmas_type": "sigma_min", "sigma_schedule": "exponential", "prediction_type": "v_prediction"}, 6),
    ({"euler_at_final": True, "final_sigmas_type": "sigma_min"}, 5),
    ({"lower_order_final": False, "solver_order": 2}, 12),
    ({}, 1),
    ({"solver_order": 3}, 2),
    ({"solver_order": 3, "algorithm_type": "sde-dpmsolver++"}, 3),  # lower_order_final: no third-order step
]


@pytest.mark.parametrize("config, kw, steps", EULER_CASES)
def test_euler_matches_diffusers(config, kw, steps):
    check_parity(EULER, config, kw, steps)


@pytest.mark.parametrize("config, steps", DPM_CASES)
def test_dpm_matches_diffusers(config, steps):
    check_parity(DPM, config, {}, steps)


@pytest.mark.parametrize("name, config, begin", [
    (EULER, {}, 3), (EULER, {"sigma_schedule": "exponential"}, 5), (DPM, {}, 2),
    (DPM, {"solver_order": 3, "lower_order_final": False}, 3), (DPM, {"algorithm_type": "sde-dpmsolver++"}, 4)])
def test_set_begin_index(name, config, begin):
    check_parity(name, config, {}, steps=8, begin=begin)


@pytest.mark.parametrize("name, config, kw", [(EULER, {}, {"s_churn": 3.0}),
                                              (DPM, {"algorithm_type": "sde-dpmsolver++"}, {}),
                                              (DPM, {"solver_order": 3}, {})])
def test_every_cpu_backend(cpu_backend, name, config, kw):
    check_parity(name, config, kw, steps=4, backend=cpu_backend)


@pytest.mark.parametrize("name, config, kw", [(EULER, {}, {"s_churn": 3.0}),
                                              (DPM, {"algorithm_type": "sde-dpmsolver++"}, {})])
def test_philox_noise_on_every_cpu_backend(cpu_backend, name, config, kw):
    """Without a generator the noise is the Philox stream of the seed: the same on every backend, new per seed."""
    def run(backend, seed):
        sched = getattr(dd, name)(**config)
        sched.backend = backend
        sched.set_seed(seed)
        sched.set_timesteps(3)
        x = make_tensor(SHAPE, seed=1) * 80.0
        for k, t in enumerate(sched.timesteps):
            x = sched.step(make_tensor(SHAPE, seed=20 + k), t, x, **kw).prev_sample
        return x

    ref = run("reference", 5)
    torch.testing.assert_close(run(cpu_backend, 5), ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(run(cpu_backend, 6), ref)


def test_custom_sigmas_ramp_and_pred_original_sample():
    """Euler's ``sigmas=`` is diffusers' ramp; a given ``pred_original_sample`` replaces the preconditioned output."""
    ramp = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=torch.float64)
    theirs, ours = diffusers.EDMEulerScheduler(), dd.EDMEulerScheduler()
    theirs.set_timesteps(sigmas=ramp)
    ours.set_timesteps(sigmas=ramp)
    torch.testing.assert_close(ours.sigmas, theirs.sigmas)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps)
    x, m, d = (make_tensor(SHAPE, seed=s) for s in (1, 2, 3))
    x = x * 80
    for t in theirs.timesteps:
        a = theirs.step(m, t, x, pred_original_sample=d)
        b = ours.step(m, t, x, pred_original_sample=d)
        torch.testing.assert_close(b.prev_sample, a.prev_sample, rtol=1e-5, atol=1e-5)
        assert b.pred_original_sample is d
        x = a.prev_sample


def test_add_noise_and_state_before_set_timesteps():
    for name in (EULER, DPM):
        theirs, ours = getattr(diffusers, name)(), getattr(dd, name)()
        torch.testing.assert_close(ours.timesteps, theirs.timesteps)
        torch.testing.assert_close(ours.sigmas, theirs.sigmas.float())
        x, n = make_tensor(SHAPE, seed=1), make_tensor(SHAPE, seed=2)
        for sched in (theirs, ours):
            sched.set_timesteps(10)
        t = theirs.timesteps[[2, 6]]
        torch.testing.assert_close(ours.add_noise(x, n, t), theirs.add_noise(x, n, t))
        for sched in (theirs, ours):
            sched.set_begin_index(4)
        torch.testing.assert_close(ours.add_noise(x, n, t[:1]), theirs.add_noise(x, n, t[:1]))


def test_save_and_load(tmp_path):
    for name, config in ((EULER, {"sigma_schedule": "exponential", "rho": 5.0, "final_sigmas_type": "sigma_min"}),
                         (DPM, {"solver_order": 3, "algorithm_type": "sde-dpmsolver++", "sigma_data": 1.0})):
        cls = getattr(dd, name)
        sched = cls(**config)
        sched.save_pretrained(tmp_path / name)
        loaded = cls.from_pretrained(tmp_path / name)
        public = {k: v for k, v in sched.config.items() if not k.startswith("_")}
        assert type(loaded) is cls and {k: v for k, v in loaded.config.items() if not k.startswith("_")} == public
        theirs = getattr(diffusers, name).from_pretrained(tmp_path / name)
        assert {k: v for k, v in cls.from_config(theirs.config).config.items() if not k.startswith("_")} == public
        assert dd.SCHEDULERS[name] is cls and cls.__module__ == "diffkern.diffusers"


@pytest.mark.parametrize("cls, config, key", [
    (dd.EDMEulerScheduler, {"sigma_schedule": "linear"}, "sigma_schedule"),
    (dd.EDMEulerScheduler, {"prediction_type": "sample"}, "prediction_type"),
    (dd.EDMEulerScheduler, {"final_sigmas_type": "one"}, "final_sigmas_type"),
    (dd.EDMEulerScheduler, {"sigma_min": 0.0}, "sigma_min"),
    (dd.EDMEulerScheduler, {"sigma_max": 0.001}, "sigma_max"),
    (dd.EDMEulerScheduler, {"sigma_data": 0.0}, "sigma_data"),
    (dd.EDMDPMSolverMultistepScheduler, {"thresholding": True}, "thresholding"),
    (dd.EDMDPMSolverMultistepScheduler, {"prediction_type": "sample"}, "prediction_type"),
    (dd.EDMDPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver"}, "algorithm_type"),
    (dd.EDMDPMSolverMultistepScheduler, {"solver_order": 4}, "solver_order"),
    (dd.EDMDPMSolverMultistepScheduler, {"rho": -1.0}, "rho"),
])
def test_refusals_name_the_key(cls, config, key):
    with pytest.raises(ValueError, match=f"{key}="):
        cls(**config)


def test_refusals_at_set_timesteps_and_level2():
    sched = dd.EDMDPMSolverMultistepScheduler(solver_order=3, algorithm_type="sde-dpmsolver++")
    with pytest.raises(ValueError, match="solver_order=3"):
        sched.set_timesteps(8)
    sched = dd.EDMDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", final_sigmas_type="sigma_min")
    with pytest.raises(ValueError, match="final_sigmas_type='sigma_min'"):  # diffusers: NaN
        sched.set_timesteps(5)
    euler = dd.EDMEulerScheduler()
    with pytest.raises(ValueError, match="sigmas="):
        euler.set_timesteps(sigmas=[0.0, 2.0])  # the Karras ramp past 1 gives a negative sigma
    euler.set_timesteps(4)
    with pytest.raises(ValueError, match="integer"):
        euler.step(make_tensor(SHAPE), 1, make_tensor(SHAPE))
    for sched in (euler, dd.EDMDPMSolverMultistepScheduler()):  # Level 2: test_diffusers_edm_level2.py
        sched.set_timesteps(4)
        assert loop_spec(sched).edm == sched.config.sigma_data
    sched = dd.EDMDPMSolverMultistepScheduler(final_sigmas_type="sigma_min")
    sched.set_timesteps(4)
    with pytest.raises(ValueError, match="final_sigmas_type='sigma_min'"):  # rises from the float32 end: Level 2
        loop_spec(sched)


@pytest.mark.parametrize("name, config", [
    (EULER, {}), (DPM, {"algorithm_type": "sde-dpmsolver++", "prediction_type": "v_prediction"}),
    (DPM, {"solver_order": 3, "sigma_schedule": "exponential", "sigma_max": 20.0})])
def test_tiny_sdxl_pipeline_float32(tiny_sdxl, name, config):
    """The SDXL pipeline with an EDM scheduler: ours (float32) against diffusers' float64 and float32 runs."""
    full = dict(getattr(diffusers, name)().config, **config)
    out = runs(tiny_sdxl, name, (1,), full)
    assert torch.isfinite(out[1]).all()
    assert_matches_reference(out[1], out["truth"], out["eager"], f"SDXL {name} {config}")
