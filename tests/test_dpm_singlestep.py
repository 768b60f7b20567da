"""Singlestep DPM-Solver: ``diffkern.diffusers.DPMSolverSinglestepScheduler`` (Level 1) and its pipelines (Level 1 and
``accelerate``, Level 2) against diffusers' own ``DPMSolverSinglestepScheduler``; the ``dpmsolver_single`` sampler
itself is tested in ``test_dpm_singlestep_sampler.py``.

Oracles and tolerances. Level 1 float32: diffusers run in float64 is the truth and the project's rule applies (at most
twice diffusers' own float32 error, + the float32 floor; ``test_diffusers_schedulers``). The truth gets our float64
sigmas after ``set_timesteps`` (diffusers rounds its own to float32, which flow sigmas near t = 1 amplify; those are
checked against ours to float32 rounding first). The SDE's noise is the generator's, drawn as diffusers draws it.
Float64: ours against diffusers in float64 on the same sigmas, the float64 floor (1e-12 relative). Pipelines: the
tiny random models of ``test_diffusers_pipelines``, by the same rule.
"""
from __future__ import annotations

import importlib
import random

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.testing import assert_matches_reference, make_tensor  # noqa: E402
from dropin_conformance import (check_add_noise_and_scale_model_input, check_pipeline,  # noqa: E402
                                check_saved_pipeline, check_saved_scheduler, float64_parity, step_parity,
                                three_schedulers)
from test_diffusers_pipelines import text2image, tiny_sd, tiny_unet, unconditional  # noqa: E402, F401
from test_diffusers_schedulers import SHAPE  # noqa: E402

NAME = "DPMSolverSinglestepScheduler"
MODULE = importlib.import_module("diffusers.schedulers.scheduling_dpmsolver_singlestep")
O3 = {"solver_order": 3}
FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
NOISE = {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}
SDE = {"algorithm_type": "sde-dpmsolver++"}
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # diffusers deprecates "dpmsolver"

#----------------------------------------------------------------------------
# Level 1: step by step against diffusers.


def _schedulers(config, steps, timesteps=None):
    """(truth, eager, ours) after set_timesteps; the truth on our float64 sigmas (checked first)."""
    kw = {"timesteps": timesteps} if timesteps is not None else {"num_inference_steps": steps}
    truth, eager, ours = three_schedulers(NAME, MODULE, config, kw)
    assert ours.order_list == eager.order_list and ours.config.lower_order_final == eager.config.lower_order_final
    return truth, eager, ours


def check_steps(config, steps, begin=0, shape=SHAPE, backend=None, model_dtype=torch.float32, timesteps=None):
    """diffusers float64 (truth), diffusers float32 and ours on the same inputs at every step (the truth's state,
    fresh model outputs, generators of one seed); the project rule on prev_sample."""
    truth, eager, ours = _schedulers(config, steps, timesteps)
    ours.backend = backend
    for sched in (truth, eager, ours):  # as pipelines do (a repeated first timestep would start at the second)
        sched.set_begin_index(begin)
    channels = 6 if config.get("variance_type") else shape[1]  # learned variances: 3 more channels, ignored
    step_parity(truth, eager, ours, MODULE, f"{config} [{backend}]", begin=begin, shape=shape,
                model_shape=(shape[0], channels) + tuple(shape[2:]), model_dtype=model_dtype, generators=True)


CASES = [  # (config, steps)
    ({}, 1), ({}, 2), ({}, 7), ({}, 16), (O3, 1), (O3, 2), (O3, 3), (O3, 8), (O3, 10), (O3, 20),
    ({"solver_order": 1}, 5), ({"solver_type": "heun"}, 9), (dict(O3, solver_type="heun"), 11),
    (dict(O3, prediction_type="v_prediction", final_sigmas_type="sigma_min", lower_order_final=False), 9),
    (dict(O3, prediction_type="sample", solver_type="heun"), 8),
    (dict(NOISE, solver_order=3), 9), (dict(NOISE, solver_type="heun", prediction_type="v_prediction"), 8),
    (dict(NOISE, solver_order=3, solver_type="heun", prediction_type="sample"), 10),
    (dict(SDE, solver_order=3), 9), (dict(SDE, solver_type="heun", prediction_type="v_prediction"), 7),
    (dict(SDE, solver_order=3, solver_type="heun", use_karras_sigmas=True), 10),
    (dict(O3, use_karras_sigmas=True, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), 10),
    (dict(O3, use_karras_sigmas=True, final_sigmas_type="sigma_min"), 9),
    ({"use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "solver_type": "heun"}, 10),
    ({"use_exponential_sigmas": True}, 8), (dict(O3, use_beta_sigmas=True, beta_schedule="scaled_linear"), 7),
    (dict(O3, beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1), 12),
    (dict(O3, **FLOW, flow_shift=3.0), 10), (dict(FLOW, final_sigmas_type="sigma_min", solver_type="heun"), 8),
    (dict(O3, prediction_type="flow_prediction"), 9),  # diffusers' x0 = z - sigma*v with the VE sigma
    (dict(O3, use_flow_sigmas=True, prediction_type="v_prediction", **NOISE), 9),
    (dict(O3, **SDE, use_flow_sigmas=True, prediction_type="epsilon"), 7),
    ({"algorithm_type": "deis", "solver_type": "logrho", "final_sigmas_type": "sigma_min"}, 6),
]


@pytest.mark.parametrize("config, steps", CASES, ids=[str(i) for i in range(len(CASES))])
def test_steps_match_diffusers(config, steps):
    check_steps(config, steps)


@pytest.mark.parametrize("config, begin", [(O3, 1), (O3, 2), (O3, 4), ({}, 3), (dict(SDE, solver_order=3), 5),
                                           (dict(NOISE, solver_order=3, use_karras_sigmas=True), 2)])
def test_set_begin_index(config, begin):
    """A loop begun mid-group starts a group (diffusers lowers the order while its model-output list has holes)."""
    check_steps(config, 10, begin=begin)


def test_awkward_shapes_dtypes_and_learned_variance(cpu_backend):
    check_steps(dict(O3, prediction_type="v_prediction"), 6, shape=(3, 1, 7, 5), backend=cpu_backend)
    check_steps(dict(O3, **SDE), 4, shape=(1, 13), backend=cpu_backend)
    check_steps(dict(O3, variance_type="learned_range"), 5, backend=cpu_backend)
    check_steps(dict(O3, solver_type="heun"), 7, model_dtype=torch.float16, backend=cpu_backend)
    check_steps(O3, None, timesteps=[950, 700, 511, 300, 120, 40, 3], backend=cpu_backend)


FLOAT64_CASES = [({}, 16), (O3, 20), ({"solver_order": 1, "prediction_type": "sample"}, 6),
                 (dict(O3, solver_type="heun", prediction_type="v_prediction", final_sigmas_type="sigma_min",
                       lower_order_final=False), 12),
                 (dict(NOISE, solver_order=3, solver_type="heun"), 11), (dict(NOISE, prediction_type="sample"), 8),
                 (dict(O3, prediction_type="sample", use_karras_sigmas=True, final_sigmas_type="sigma_min"), 16),
                 (dict(O3, use_exponential_sigmas=True, solver_type="heun"), 10), (dict(O3, **FLOW), 9),
                 (dict(FLOW, prediction_type="v_prediction", solver_type="heun"), 6)]


@pytest.mark.parametrize("config, steps", FLOAT64_CASES, ids=[str(i) for i in range(len(FLOAT64_CASES))])
def test_float64_steps_match_diffusers(config, steps):
    """Ours in float64 on diffusers' sigmas is diffusers in float64 to rounding: the float64 floor at every step."""
    truth, _, ours = _schedulers(config, steps)
    float64_parity(truth, ours, MODULE, f"{config}")


def test_sde_philox_noise():
    """Without a generator the SDE draws Philox noise keyed by the seed: reproducible, and the only difference from
    a generator's run is the noise (the same run with zero-scale noise is the ODE-free part)."""
    def run(seed, gen=None):
        sched = dd.DPMSolverSinglestepScheduler(solver_order=3, **SDE)
        sched.set_timesteps(7)
        sched.set_seed(seed)
        x = make_tensor(SHAPE, seed=2)
        for k, t in enumerate(sched.timesteps):
            x = sched.step(make_tensor(SHAPE, seed=30 + k) * 0.5, t, x, generator=gen).prev_sample
        return x
    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.isfinite(a).all()
    assert not torch.equal(a, run(3, torch.Generator().manual_seed(3)))


def test_rows_read_only_what_their_group_wrote():
    sched = dd.DPMSolverSinglestepScheduler(solver_order=3, final_sigmas_type="sigma_min")
    sched.set_timesteps(9)
    table, meta = sched._plan(("single", 0))
    assert meta == [(1, "start"), (2, None), (3, None)] * 3
    for i, (order, _) in enumerate(meta):
        assert (table[i, 3] != 0) == (order > 1) and (table[i, 11] != 0) == (order > 1)  # c, c2
        assert table[i, 12] == 0 and table[i, 5] == 0 and table[i, 6] == 1  # c3 (midpoint: M_{g+1} unused); raw D
    begun, meta = sched._plan(("single", 4))
    assert [m[0] for m in meta[4:]] == [1, 2, 1, 2, 3]
    heun = dd.DPMSolverSinglestepScheduler(solver_order=3, solver_type="heun", final_sigmas_type="sigma_min")
    heun.set_timesteps(6)
    table, meta = heun._plan(("single", 0))
    assert meta == [(1, "start"), (2, "model"), (3, None)] * 2 and (table[2::3, 12] != 0).all()

#----------------------------------------------------------------------------
# Pipelines (Level 1 and 2).


PIPELINE_CASES = [({}, 1), ({}, 2), (O3, 1), (O3, 2), (dict(O3, solver_type="heun"), 2),
                  (dict(NOISE, solver_order=3, prediction_type="v_prediction"), 1),
                  (dict(NOISE, solver_order=3, prediction_type="v_prediction"), 2),
                  (dict(SDE, solver_order=2), 1), (dict(O3, use_karras_sigmas=True), 2)]


@pytest.mark.parametrize("config, level", PIPELINE_CASES, ids=[str(i) for i in range(len(PIPELINE_CASES))])
def test_ddpm_pipeline(config, level):
    check_pipeline(lambda s: diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=s), NAME, config, unconditional,
                   level, f"{config} level {level}")


@pytest.mark.parametrize("config, level", [(O3, 1), (O3, 2), ({"prediction_type": "v_prediction"}, 2)])
def test_text2image_pipeline_with_cfg(tiny_sd, config, level):
    config = dict(config, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    check_pipeline(tiny_sd, NAME, config, text2image, level, f"text2image {config} level {level}")


@pytest.mark.parametrize("config, kw", [(O3, {"strength": 0.7, "steps": 7}), ({}, {"strength": 0.6})])
def test_img2img_level2_matches_stock_pipeline(tiny_sd, monkeypatch, config, kw):
    """The tail starts a group at the begin step (mid-group in diffusers' order list: lowered there)."""
    from test_diffusers_img2img_level2 import _three_runs

    ours, truth, eager = _three_runs(tiny_sd, monkeypatch, NAME, config, **kw)
    assert_matches_reference(ours, truth, eager, f"img2img {config} {kw}")


#----------------------------------------------------------------------------
# Persistence, noise, refusals, fuzz.


def test_save_load_and_foreign_configs(tmp_path):
    config = dict(O3, use_karras_sigmas=True, prediction_type="v_prediction", solver_type="heun")
    sched = dd.DPMSolverSinglestepScheduler(**config)
    check_saved_scheduler(sched, tmp_path / "s", config)
    for foreign in (diffusers.DPMSolverMultistepScheduler(solver_order=3, final_sigmas_type="sigma_min"),
                    diffusers.UniPCMultistepScheduler(), diffusers.EulerDiscreteScheduler(use_karras_sigmas=True),
                    diffusers.DEISMultistepScheduler(solver_order=3)):  # deis/logrho load as dpmsolver++/midpoint
        ours = dd.DPMSolverSinglestepScheduler.from_config(foreign.config)
        want = diffusers.DPMSolverSinglestepScheduler.from_config(foreign.config)
        assert (ours.config.algorithm_type, ours.config.solver_type) == (want.config.algorithm_type,
                                                                         want.config.solver_type)
        for s in (ours, want):
            s.set_timesteps(6)
        assert ours.timesteps.tolist() == want.timesteps.tolist() and ours.order_list == want.order_list
    check_saved_pipeline(diffusers.DDPMPipeline, sched, tmp_path / "p")


@pytest.mark.parametrize("config", [{}, FLOW])
def test_add_noise_and_scale_model_input_match_diffusers(config):
    check_add_noise_and_scale_model_input(diffusers.DPMSolverSinglestepScheduler(**config),
                                          dd.DPMSolverSinglestepScheduler(**config), begin_index=True)


def test_dynamic_shift_mu_matches_diffusers():
    config = dict(FLOW, use_dynamic_shifting=True)
    theirs, ours = diffusers.DPMSolverSinglestepScheduler(**config), dd.DPMSolverSinglestepScheduler(**config)
    for mu in (0.8, None):  # as diffusers, a call without mu is back to flow_shift
        for s in (theirs, ours):
            s.set_timesteps(7, mu=mu)
        assert ours.timesteps.tolist() == theirs.timesteps.tolist()
        torch.testing.assert_close(ours.sigmas, theirs.sigmas, rtol=2e-6, atol=0)
    with pytest.raises(ValueError, match="mu"):
        dd.DPMSolverSinglestepScheduler().set_timesteps(4, mu=0.5)


@pytest.mark.parametrize("config, key", [
    ({"thresholding": True}, "thresholding=True"), ({"solver_order": 4}, "solver_order=4"),
    ({"algorithm_type": "sde-dpmsolver"}, "algorithm_type='sde-dpmsolver'"), ({"solver_type": "bh3"}, "solver_type"),
    ({"prediction_type": "x0"}, "prediction_type"), ({"algorithm_type": "dpmsolver"}, "final_sigmas_type='zero'"),
    (dict(NOISE, prediction_type="flow_prediction"), "prediction_type='flow_prediction'"),
    ({"use_flow_sigmas": True, "use_karras_sigmas": True}, "use_flow_sigmas=True"),
    ({"use_karras_sigmas": True, "use_beta_sigmas": True}, "only one of"),
    ({"beta_schedule": "sigmoid"}, "beta_schedule")])
def test_refused_options_name_the_key(config, key):
    with pytest.raises(ValueError, match=key):
        dd.DPMSolverSinglestepScheduler(**config)


def test_refused_at_set_timesteps():
    dd.DPMSolverSinglestepScheduler(solver_order=1).set_timesteps(1200)  # repeated sigmas: first order, finite
    for config, kw, key in (({}, {"num_inference_steps": 1200}, "num_inference_steps=1200"),
                            ({}, {"num_inference_steps": 0}, "num_inference_steps"),
                            ({}, {"timesteps": [500, 600]}, "timesteps"),
                            ({"use_karras_sigmas": True}, {"timesteps": [500, 100]}, "timesteps"),
                            ({}, {"num_inference_steps": 4, "timesteps": [500, 100]}, "exactly one")):
        with pytest.raises(ValueError, match=key):
            dd.DPMSolverSinglestepScheduler(**config).set_timesteps(**kw)


FUZZ_SPACE = {
    "solver_order": [1, 2, 3], "algorithm_type": ["dpmsolver++", "sde-dpmsolver++", "dpmsolver", "deis"],
    "solver_type": ["midpoint", "heun", "bh2"], "prediction_type": ["epsilon", "v_prediction", "sample"],
    "lower_order_final": [True, False], "final_sigmas_type": ["zero", "sigma_min"],
    "beta_schedule": ["linear", "scaled_linear", "squaredcos_cap_v2"], "lambda_min_clipped": [-float("inf"), -4.0],
    "sigmas": [None, "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas"],
}


@pytest.mark.parametrize("seed", range(14))
def test_config_fuzz(seed):
    """Random configs, step counts and begin steps: where diffusers accepts the config ours matches it by the rule;
    where diffusers refuses, ours refuses with a ValueError."""
    rng = random.Random(seed)
    config = {k: rng.choice(v) for k, v in FUZZ_SPACE.items()}
    conversion = config.pop("sigmas")
    if conversion:
        config[conversion] = True
    if conversion == "use_flow_sigmas" and rng.random() < 0.5 and config["algorithm_type"] != "dpmsolver":
        config["prediction_type"] = "flow_prediction"
    steps = rng.choice([1, 2, 3, 5, 8, 11])
    if config["algorithm_type"] == "deis" and config["final_sigmas_type"] == "zero":
        # diffusers maps "deis" to "dpmsolver++" but checks final_sigmas_type against the unmapped name and raises:
        # ours loads it as the mapped config
        dd.DPMSolverSinglestepScheduler(**config).set_timesteps(steps)
        config["algorithm_type"] = "dpmsolver++"
    try:
        diffusers.DPMSolverSinglestepScheduler(**config).set_timesteps(steps)
    except (ValueError, NotImplementedError):
        with pytest.raises(ValueError):
            dd.DPMSolverSinglestepScheduler(**config).set_timesteps(steps)
        return
    check_steps(config, steps, begin=rng.randrange(steps))
