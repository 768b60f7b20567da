"""SA-Solver (Xue et al. 2023): ``diffkern.diffusers.SASolverScheduler`` (Level 1, :mod:`diffkern.coef_tables_sasolver`:
the corrector folded into the next step's row) against diffusers' own ``SASolverScheduler``.

Oracles and tolerances. Float32: diffusers run in float64 is the truth and the project's rule applies (at most twice
diffusers' own float32 error, + the float32 floor; ``test_diffusers_schedulers.check_parity``), with the noise of the
same torch generator. Float64: diffusers in float64 on the very sigmas it uses (its float32-rounded schedule, which
ours takes too) and the same float64 noise: the same mathematics, so only rounding separates them and the float64 floor of
``diffkern.testing`` (1e-12 relative) applies. That run checks the folding (corrector = previous prediction plus
weight differences, its noise already inside the state) with diffusers' own corrector, which recomputes from the
previous input and reuses the previous noise.
"""
from __future__ import annotations

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern import coef_tables_sasolver  # noqa: E402
from diffkern.ops import coefs  # noqa: E402
from diffkern.testing import FLOORS, make_tensor, max_err  # noqa: E402
from test_diffusers_pipelines import DDPMPipeline, three_runs, tiny_unet, unconditional  # noqa: E402
from test_diffusers_schedulers import SHAPE, _Torch64, check_parity, scheduler_module  # noqa: E402
from dropin_conformance import check_add_noise_and_scale_model_input  # noqa: E402

NAME = "SASolverScheduler"
MODULE = scheduler_module(NAME)
F64 = torch.float64
NO_TAU = {"tau_func": lambda t: 0}  # the ODE: no noise on any step
ALL_TAU = {"tau_func": lambda t: 1}  # the SDE on every step


def _tau_ramp(t):
    return 0.3 + 0.7 * float(t < 500)  # a custom, non-constant stochasticity (diffusers passes it the timestep)


CASES = [  # (config, steps)
    ({}, 1), ({}, 2), ({}, 8), ({}, 20),
    (NO_TAU, 7), (ALL_TAU, 9), ({"tau_func": _tau_ramp}, 10),
    ({"predictor_order": 1, "corrector_order": 1}, 6), ({"predictor_order": 1, "corrector_order": 4}, 9),
    ({"predictor_order": 3, "corrector_order": 1}, 8), ({"predictor_order": 3, "corrector_order": 3}, 12),
    ({"predictor_order": 3, "corrector_order": 4}, 10), ({"predictor_order": 2, "corrector_order": 3}, 3),
    ({"predictor_order": 3, "corrector_order": 4, "lower_order_final": False}, 10),
    ({"algorithm_type": "noise_prediction"}, 8),
    ({"algorithm_type": "noise_prediction", "prediction_type": "v_prediction", "predictor_order": 3,
      "corrector_order": 3}, 10),
    (dict(NO_TAU, algorithm_type="noise_prediction", prediction_type="sample", corrector_order=4), 7),
    ({"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 10),
    ({"prediction_type": "sample", "timestep_spacing": "leading", "steps_offset": 1}, 8),
    ({"prediction_type": "flow_prediction"}, 6),
    ({"use_karras_sigmas": True}, 10), ({"use_karras_sigmas": True, "predictor_order": 3, "corrector_order": 3}, 12),
    ({"use_exponential_sigmas": True, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}, 8),
    ({"use_beta_sigmas": True, "algorithm_type": "noise_prediction"}, 8),
    ({"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0}, 8),
    ({"use_flow_sigmas": True, "prediction_type": "v_prediction", "algorithm_type": "noise_prediction"}, 6),
    ({"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1}, 9),
    ({"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1, "timestep_spacing": "leading"}, 5),
    ({"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1, "timestep_spacing": "trailing"}, 7),
    ({"trained_betas": torch.linspace(1e-4, 0.03, 1000).tolist(), "variance_type": "fixed_small"}, 5),
]


@pytest.mark.parametrize("config, steps", CASES, ids=[str(i) for i in range(len(CASES))])
def test_steps_match_diffusers(config, steps):
    check_parity(NAME, config, {"steps": steps})


@pytest.mark.parametrize("config, begin", [({}, 3), ({"predictor_order": 3, "corrector_order": 4}, 2),
                                           (dict(ALL_TAU, algorithm_type="noise_prediction"), 1),
                                           ({"use_karras_sigmas": True}, 5)])
def test_set_begin_index(config, begin):
    check_parity(NAME, config, {"steps": 9}, begin=begin)


def test_every_backend(cpu_backend):
    check_parity(NAME, {"predictor_order": 3, "corrector_order": 4, **ALL_TAU}, {"steps": 6}, backend=cpu_backend)

#----------------------------------------------------------------------------
# Float64: the same mathematics.


def _float64_run(config, steps, begin=0, locate=False):
    """max |ours - diffusers| / max(1, |diffusers|) over the steps, both in float64 on the same sigmas and noise; the
    loop starts at ``begin`` by ``set_begin_index``, or (``locate``) from the first timestep's value, as an img2img
    pipeline that never calls it."""
    saved = MODULE.torch
    MODULE.torch = _Torch64(wide_numpy=True)
    try:
        truth = diffusers.SASolverScheduler(**config)
        truth.set_timesteps(steps)
    finally:
        MODULE.torch = saved
    ours = dd.SASolverScheduler(**config)
    ours.set_timesteps(steps)
    assert torch.equal(truth.sigmas, torch.tensor(ours.sigmas_host, dtype=F64))  # both float32-rounded
    for s in (truth, ours):
        if not locate:
            s.set_begin_index(begin)
    gens = [torch.Generator().manual_seed(3) for _ in range(2)]
    x, worst = make_tensor(SHAPE, F64, seed=5), 0.0
    for k in range(begin, len(ours.timesteps)):
        m = make_tensor(SHAPE, F64, seed=50 + k)
        MODULE.torch = _Torch64(wide_numpy=True)
        try:
            ref = truth.step(m, truth.timesteps[k], x, generator=gens[0]).prev_sample
        finally:
            MODULE.torch = saved
        got = ours.step(m, ours.timesteps[k], x, generator=gens[1]).prev_sample
        worst = max(worst, max_err(got, ref) / max(1.0, float(ref.abs().max())))
        x = ref
    return worst


F64_CASES = [({}, 10), (ALL_TAU, 8), ({"predictor_order": 3, "corrector_order": 4}, 12),
             ({"predictor_order": 1, "corrector_order": 1, "tau_func": _tau_ramp}, 6),
             (dict(ALL_TAU, algorithm_type="noise_prediction", predictor_order=3, corrector_order=3), 10),
             ({"algorithm_type": "noise_prediction", "prediction_type": "sample", "corrector_order": 4}, 9),
             ({"use_karras_sigmas": True, "prediction_type": "v_prediction"}, 10),
             ({"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0}, 8)]


@pytest.mark.parametrize("config, steps", F64_CASES, ids=[str(i) for i in range(len(F64_CASES))])
def test_float64_steps_match_diffusers(config, steps):
    assert _float64_run(config, steps) <= FLOORS[F64]
    assert _float64_run(config, steps, begin=2) <= FLOORS[F64]
    assert _float64_run(config, steps, begin=3, locate=True) <= FLOORS[F64]


def test_orders_are_diffusers():
    for p, c, lof, n in ((2, 2, True, 6), (3, 4, True, 9), (3, 1, False, 5), (1, 4, True, 3), (3, 3, True, 1)):
        theirs = diffusers.SASolverScheduler(predictor_order=p, corrector_order=c, lower_order_final=lof)
        theirs.set_timesteps(n)
        x, seen, corr = torch.zeros(1, 3, 2, 2), [], None
        for t in theirs.timesteps:
            x = theirs.step(torch.zeros_like(x), t, x).prev_sample
            seen.append((theirs.this_predictor_order, corr))
            corr = theirs.this_corrector_order
        assert coef_tables_sasolver.orders(n, p, c, lof) == seen


def test_first_rows_read_no_history():
    sched = dd.SASolverScheduler(predictor_order=3, corrector_order=4)
    sched.set_timesteps(8)
    for begin in (0, 3):
        table = sched._plan(("sasolver", begin))[0]
        for j, slot in enumerate((coefs.C, coefs.C2, coefs.C3)):  # step begin + k reads M_{i-1..i-k} only
            assert (table[begin:begin + j + 1, slot] == 0).all()
            assert (table[begin + j + 1:-1, slot] != 0).all()  # (the last step is of lower order)


def test_folding_matches_the_two_step_form():
    # corrector of step i = prediction of step i-1 + sum (C - P) M: same A and noise as the predictor of step i-1
    lam_alpha = [(1.0 / math.sqrt(s * s + 1), s / math.sqrt(s * s + 1)) for s in (14.0, 6.0, 2.5, 1.1, 0.4)]
    alpha, sigma = (list(v) for v in zip(*lam_alpha))
    lam = [math.log(a / s) for a, s in lam_alpha]
    for x0 in (True, False):
        a_prev, p_prev, n_prev = coef_tables_sasolver.predictor(lam, alpha, sigma, 2, 2, 0.8, x0)
        w = coef_tables_sasolver.corrector(lam, alpha, sigma, 3, 3, 0.8, x0)
        a_c, w_raw, n_c = coef_tables_sasolver.step_weights(lam, alpha, sigma, 2, [3, 2, 1], 0.8, x0)
        assert (a_c, n_c) == (a_prev, n_prev)
        assert w == w_raw  # order 3: no second-order adjustment
        # exact interpolation: constant M is integrated to the closed form
        k = 1 + 0.64
        h = lam[3] - lam[2]
        closed = alpha[3] * -math.expm1(-k * h) if x0 else -k * sigma[3] * math.expm1(h)
        assert math.isclose(sum(w), closed, rel_tol=1e-12)

#----------------------------------------------------------------------------
# Noise without a generator, pipelines, configs.


def _loop(sched, seed=None):
    sched.set_timesteps(8)
    if seed is not None:
        sched.set_seed(seed)
    x = make_tensor(SHAPE, seed=1)
    for k, t in enumerate(sched.timesteps):
        x = sched.step(make_tensor(SHAPE, seed=10 + k), t, x).prev_sample
    return x


def test_philox_noise_without_generator():
    a, b, c = (_loop(dd.SASolverScheduler(), seed) for seed in (4, 4, 5))
    assert torch.equal(a, b) and not torch.equal(a, c)
    state = torch.get_rng_state()
    x = _loop(dd.SASolverScheduler(**NO_TAU))  # no noisy step: no seed drawn from torch's generator
    assert torch.equal(torch.get_rng_state(), state) and torch.isfinite(x).all()
    theirs = diffusers.SASolverScheduler(**NO_TAU)
    torch.testing.assert_close(x, _loop(theirs), rtol=1e-4, atol=1e-4)


# (the tiny model's images saturate with Karras sigmas or "noise_prediction" at 6 steps: those run step by step above)
@pytest.mark.parametrize("config", [{}, {"predictor_order": 3, "corrector_order": 4}, {"prediction_type": "v_prediction"},
                                    dict(ALL_TAU, timestep_spacing="trailing")],
                         ids=["default", "order3-4", "v", "sde-trailing"])
def test_ddpm_pipeline(config):
    ours, truth, eager = three_runs(lambda s: DDPMPipeline(unet=tiny_unet(), scheduler=s), NAME, config,
                                    unconditional, 1)
    assert 0.1 < float(((eager > 0) & (eager < 1)).float().mean()), "images saturated: the comparison would be void"
    from diffkern.testing import assert_matches_reference
    assert_matches_reference(ours, truth, eager, f"{config}")


def test_save_and_load(tmp_path):
    config = {"predictor_order": 3, "corrector_order": 4, "algorithm_type": "noise_prediction",
              "use_exponential_sigmas": True, "lower_order_final": False}
    sched = dd.SASolverScheduler(**config)
    sched.save_pretrained(tmp_path / "s")
    loaded = dd.SASolverScheduler.from_pretrained(tmp_path / "s")
    theirs = diffusers.SASolverScheduler.from_pretrained(tmp_path / "s")  # the config is diffusers' too
    for other in (loaded, dd.SASolverScheduler.from_config(theirs.config)):
        assert {k: other.config[k] for k in config} == config
    pipe = DDPMPipeline(unet=tiny_unet(diffusers.UNet2DModel), scheduler=dd.SASolverScheduler())
    pipe.save_pretrained(tmp_path / "p")
    again = DDPMPipeline.from_pretrained(tmp_path / "p")
    assert type(again.scheduler) is dd.SASolverScheduler
    a, b = (unconditional(p, torch.Generator().manual_seed(0)) for p in (pipe, again))
    torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("other", ["DDPMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler",
                                   "UniPCMultistepScheduler"])
def test_foreign_configs_load_as_diffusers_does(other):
    config = getattr(diffusers, other)(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config
    theirs, ours = diffusers.SASolverScheduler.from_config(config), dd.SASolverScheduler.from_config(config)
    for s in (theirs, ours):
        s.set_timesteps(7)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    # diffusers forms its sigmas from float32 alpha-bar, where 1 - alpha-bar cancels near t = 0 (1e-5 relative)
    torch.testing.assert_close(ours.sigmas, theirs.sigmas, rtol=3e-5, atol=0)


def test_add_noise_and_scale_model_input_match_diffusers():
    check_add_noise_and_scale_model_input(diffusers.SASolverScheduler(), dd.SASolverScheduler(), begin_index=True)


@pytest.mark.parametrize("config, key", [
    ({"predictor_order": 4}, "predictor_order=4"), ({"predictor_order": 0}, "predictor_order=0"),
    ({"corrector_order": 5}, "corrector_order=5"), ({"thresholding": True}, "thresholding=True"),
    ({"variance_type": "learned_range"}, "variance_type='learned_range'"),
    ({"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
    ({"algorithm_type": "noise_prediction", "prediction_type": "flow_prediction"}, "prediction_type"),
    ({"use_flow_sigmas": True, "use_karras_sigmas": True}, "use_flow_sigmas=True"),
    ({"use_karras_sigmas": True, "use_beta_sigmas": True}, "use_exponential_sigmas and use_beta_sigmas"),
    ({"timestep_spacing": "middle"}, "timestep_spacing"), ({"tau_func": 1.0}, "tau_func")])
def test_refused_options_name_the_key(config, key):
    with pytest.raises(ValueError, match=key):
        dd.SASolverScheduler(**config)


def test_refused_at_set_timesteps():
    sched = dd.SASolverScheduler(num_train_timesteps=10)
    with pytest.raises(ValueError, match="timestep_spacing='linspace'"):
        sched.set_timesteps(12)  # repeats timesteps: diffusers' second-order weights divide by 0
    one = dd.SASolverScheduler(num_train_timesteps=10, predictor_order=1, corrector_order=1)
    one.set_timesteps(12)  # first order: a step of length 0 is the identity, as in diffusers
    with pytest.raises(ValueError, match="num_inference_steps"):
        sched.set_timesteps(0)


def test_accelerate_refuses_karras_by_name():
    """Level 2 (tests/test_sasolver_level2.py) refuses the schedules whose last step goes from sigma_min to itself."""
    pipe = DDPMPipeline(unet=tiny_unet(), scheduler=dd.SASolverScheduler(use_karras_sigmas=True))
    with pytest.raises(ValueError, match="SASolverScheduler with use_karras_sigmas=True .*diffkern.diffusers.SASolver"):
        dd.accelerate(pipe)


def test_step_does_not_read_device_timesteps():
    sched = dd.SASolverScheduler(predictor_order=3, corrector_order=3)
    sched.set_timesteps(5)
    x = make_tensor(SHAPE, seed=1)
    for k in range(len(sched.timesteps)):
        x = sched.step(make_tensor(SHAPE, seed=k), torch.empty((), device="meta"), x).prev_sample
    assert torch.isfinite(x).all()


@pytest.mark.cuda
@pytest.mark.parametrize("generator", [False, True])
def test_step_loop_never_synchronises(generator):
    dev = torch.device("cuda")
    sched = dd.SASolverScheduler(predictor_order=3, corrector_order=4)
    sched.set_timesteps(8, device=dev)
    gen = torch.Generator(dev).manual_seed(0) if generator else None
    x = torch.randn(SHAPE, device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in sched.timesteps:
            x = sched.step(torch.randn_like(x), t, x, generator=gen).prev_sample
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(x).all()


@pytest.mark.cuda
@pytest.mark.parametrize("config", [{}, {"predictor_order": 3, "corrector_order": 4, **ALL_TAU}])
def test_matches_diffusers_on_cuda(config):
    check_parity(NAME, config, {"steps": 8}, device="cuda")
