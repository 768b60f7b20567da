"""diffusers' ``DPMSolverMultistepScheduler(solver_order=3)``: Level 1 (``diffkern.diffusers`` scheduler, one fused op
per step, two history buffers) and Level 2 (``accelerate``: the ``dpmsolver_3m`` loop of ``diffkern.sample``).

The truth is diffusers run in float64 (``test_diffusers_schedulers.diffusers_float64``), the rule the project's
float32 tolerance (``diffkern.testing.assert_matches_reference``); the rows themselves are checked against diffusers'
third-order update in float64 to rounding.
"""
from __future__ import annotations

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern import coef_tables_3m  # noqa: E402
from diffkern.diffusers.schedulers import ve_row_to_vp  # noqa: E402
from diffkern.ops import coefs  # noqa: E402
from test_diffusers_config_fuzz import draw_case, run_case  # noqa: E402
from test_diffusers_pipelines import test_stochastic_level2_matches_level1_philox as level2_is_level1  # noqa: E402
from test_diffusers_pipelines import DDPMPipeline, three_runs, tiny_unet, unconditional  # noqa: E402
from test_diffusers_schedulers import check_parity, diffusers_float64, scheduler_module  # noqa: E402
from diffkern.testing import assert_matches_reference  # noqa: E402

NAME = "DPMSolverMultistepScheduler"
SDE = {"algorithm_type": "sde-dpmsolver++"}

#----------------------------------------------------------------------------
# Step-by-step parity (Level 1): diffusers' generator noise for the SDE.

CASES = [  # (config, steps)
    ({}, 1), ({}, 2), ({}, 3), ({}, 7), ({}, 16),
    ({"lower_order_final": False}, 5), ({"lower_order_final": False}, 14), ({"euler_at_final": True}, 16),
    ({"prediction_type": "v_prediction", "use_karras_sigmas": True}, 10),
    ({"prediction_type": "sample", "solver_type": "heun", "timestep_spacing": "trailing"}, 6),
    ({"final_sigmas_type": "sigma_min", "timestep_spacing": "trailing"}, 8),
    ({"final_sigmas_type": "sigma_min", "lower_order_final": False, "timestep_spacing": "leading"}, 9),
    ({"final_sigmas_type": "sigma_min", "use_karras_sigmas": True, "prediction_type": "v_prediction",
      "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}, 6),
    (SDE, 1), (SDE, 2), (SDE, 3), (SDE, 7), (SDE, 16),
    (dict(SDE, lower_order_final=False, prediction_type="v_prediction"), 5),
    (dict(SDE, use_karras_sigmas=True, solver_type="heun", prediction_type="sample"), 9),
    (dict(SDE, final_sigmas_type="sigma_min", timestep_spacing="trailing", euler_at_final=True), 16),
]


@pytest.mark.parametrize("config, steps", CASES, ids=[f"{i}" for i in range(len(CASES))])
def test_steps_match_diffusers(config, steps):
    check_parity(NAME, dict(config, solver_order=3), {"steps": steps})


@pytest.mark.parametrize("config, begin", [({}, 2), (SDE, 3), ({"lower_order_final": False}, 1)])
def test_set_begin_index(config, begin):
    check_parity(NAME, dict(config, solver_order=3), {"steps": 8}, begin=begin)


def test_orders_are_diffusers():
    """diffusers' order rule: first order first, second order second; the last two lowered below 15 steps."""
    orders = coef_tables_3m.dpmsolver_orders
    assert orders(1) == [1] and orders(2) == [1, 1] and orders(3) == [1, 2, 1]
    assert orders(6) == [1, 2, 3, 3, 2, 1]
    assert orders(6, lower_order_final=False) == [1, 2, 3, 3, 3, 3]
    assert orders(16) == [1, 2] + [3] * 14
    assert orders(16, euler_at_final=True) == [1, 2] + [3] * 13 + [1]
    assert orders(8, begin=3)[3:] == [1, 2, 3, 2, 1]
    assert orders(16, begin=3)[3:] == [1, 2] + [3] * 11


def test_rows_are_diffusers_update_in_float64():
    """Each third- and second-order row, rewritten for the VP state, is diffusers' update on the same sigmas to
    float64 rounding (model outputs taken as x0 predictions: D = m)."""
    gen = torch.Generator().manual_seed(0)
    rand = lambda: torch.randn(4, generator=gen, dtype=torch.float64)  # noqa: E731
    for algorithm in ("dpmsolver++", "sde-dpmsolver++"):
        for solver_type in ("midpoint", "heun"):
            with diffusers_float64(scheduler_module(NAME)):
                sched = diffusers.DPMSolverMultistepScheduler(solver_order=3, algorithm_type=algorithm,
                                                              solver_type=solver_type, use_karras_sigmas=True,
                                                              final_sigmas_type="sigma_min")
                sched.set_timesteps(9)
                sched.sigmas = sched.sigmas.double()  # numpy's float32 sigmas: the update then runs in float64
                sig = sched.sigmas.tolist()
                orders = [1, 2] + [3] * 7
                plan = coef_tables_3m.dpmsolver_multistep(sig, orders, sde=algorithm != "dpmsolver++",
                                                          solver_type=solver_type)
                for i in range(1, 8):  # (step 8, Karras' sigma_min to itself: diffusers' order 3 is 0/0 there)
                    m0, m1, m2, x, xi = rand(), rand(), rand(), rand(), rand()
                    sched._step_index = i
                    if orders[i] == 2:
                        ref = sched.multistep_dpm_solver_second_order_update([m1, m0], sample=x, noise=xi)
                    else:
                        ref = sched.multistep_dpm_solver_third_order_update([m2, m1, m0], sample=x, noise=xi)
                    r = ve_row_to_vp(plan.table[i].tolist(), sig[i], sig[i + 1])
                    got = r[coefs.A] * x + r[coefs.B] * m0 + r[coefs.C] * m1 + r[coefs.C2] * m2 + r[coefs.S] * xi
                    assert ref.dtype == torch.float64
                    err = float((got - ref).abs().max())
                    assert err < 1e-12, f"{algorithm} {solver_type} step {i} (order {orders[i]}): {err:.3g}"


def test_sde_third_order_is_not_k_diffusions():
    """diffusers' SDE third-order D2 weight is k-diffusion's 3M one minus 1 (the rows follow diffusers); the ODE's
    third-order rows are k-diffusion's (its heun-form second step included)."""
    sig = [14.6, 6.1, 2.9, 1.3, 0.55, 0.2]
    ode = coef_tables_3m.dpmsolver_multistep(sig, [1, 2, 3, 3, 3], solver_type="heun").table
    kd = coef_tables_3m.dpmpp_3m_sde(sig, eta=0.0).table
    torch.testing.assert_close(ode, kd, rtol=1e-13, atol=1e-13)
    sde = coef_tables_3m.dpmsolver_multistep(sig, [1, 2, 3, 3, 3], sde=True, solver_type="heun").table
    kd1 = coef_tables_3m.dpmpp_3m_sde(sig, eta=1.0).table
    assert not torch.allclose(sde[2:, coefs.C2], kd1[2:, coefs.C2])
    torch.testing.assert_close(sde[:, coefs.A], kd1[:, coefs.A], rtol=1e-13, atol=0)


def test_solver_order_knob():
    """``dpmsolver_3m(solver_order=2)`` is diffusers' second-order loop: without the lowering its rows are
    ``dpmpp_2m``'s (the midpoint form), with ``euler_at_final`` the last row is first order (a DDIM step); a bad
    order is refused by name."""
    from diffkern import coef_tables, sampler_plans

    sig = [14.6, 6.1, 2.9, 1.3, 0.55, 0.2]
    plan = lambda **kw: sampler_plans._plan_dpmsolver_3m(  # noqa: E731
        sig, coef_tables._identity, eta=0, solver_type="midpoint", **kw).table
    full = plan(solver_order=2, lower_order_final=False, euler_at_final=False)
    torch.testing.assert_close(full, coef_tables.dpmpp_2m(sig).table, rtol=1e-13, atol=1e-13)
    last = plan(solver_order=2, lower_order_final=False, euler_at_final=True)
    torch.testing.assert_close(last[:-1], full[:-1], rtol=0, atol=0)
    step = [coefs.A, coefs.B, coefs.C, coefs.C2]
    ddim = torch.tensor([[s_next / s, 1 - s_next / s, 0.0, 0.0] for s, s_next in zip(sig, sig[1:])],
                        dtype=torch.float64)  # Euler on the PF-ODE: x' = (s'/s) x + (1 - s'/s) D
    torch.testing.assert_close(last[-1:, step], ddim[-1:], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(plan(solver_order=1, lower_order_final=True, euler_at_final=False)[:, step], ddim,
                               rtol=1e-13, atol=1e-13)
    for bad in (0, 4, 2.0, True, "2"):
        with pytest.raises(ValueError, match="solver_order: expected 1, 2 or 3"):
            plan(solver_order=bad, lower_order_final=True, euler_at_final=False)


@pytest.mark.parametrize("k", range(6))
def test_fuzzed_order3_configs(k):
    """The config fuzz's draws forced to solver_order=3 (a refused draw must name the option it refuses)."""
    config, steps, begin, step_kw = draw_case(NAME, 500 + k)
    config = {key: value for key, value in config.items() if key not in ("thresholding", "variance_type")}
    run_case(NAME, dict(config, solver_order=3), steps, begin, step_kw)

#----------------------------------------------------------------------------
# Pipelines: DDPMPipeline on the tiny random UNet2DModel.

PIPELINE_CASES = [({}, 1), ({}, 2), ({"prediction_type": "v_prediction", "use_karras_sigmas": True}, 2),
                  ({"lower_order_final": False, "final_sigmas_type": "sigma_min", "timestep_spacing": "trailing"}, 2),
                  ({"solver_type": "heun", "euler_at_final": True}, 2), (SDE, 1)]


@pytest.mark.parametrize("config, level", PIPELINE_CASES, ids=[str(i) for i in range(len(PIPELINE_CASES))])
def test_ddpm_pipeline(config, level):
    ours, truth, eager = three_runs(lambda s: DDPMPipeline(unet=tiny_unet(), scheduler=s), NAME,
                                    dict(config, solver_order=3), unconditional, level)
    assert 0.1 < float(((eager > 0) & (eager < 1)).float().mean()), "images saturated: the comparison would be void"
    assert_matches_reference(ours, truth, eager, f"{config} level {level}")


def test_sde_level2_matches_level1_philox():
    level2_is_level1(NAME, dict(SDE, solver_order=3))


def test_level2_spec():
    """accelerate's loop: ``dpmsolver_3m`` with diffusers' knobs; an identity last step (Karras ending at
    sigma_min) is dropped when the kept steps keep diffusers' orders, else refused naming final_sigmas_type."""
    from diffkern.diffusers.loop_spec import loop_spec

    def spec(steps, **config):
        ours = dd.DPMSolverMultistepScheduler(solver_order=3, **config)
        ours.set_timesteps(steps)
        return loop_spec(ours)

    s = spec(10, algorithm_type="sde-dpmsolver++", solver_type="heun")
    assert s.method == "dpmsolver_3m" and s.vp and s.sigmas[-1] == 0
    assert s.knobs == {"eta": 1.0, "solver_order": 3, "solver_type": "heun", "lower_order_final": True,
                       "euler_at_final": False}
    karras_min = {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}
    s = spec(15, **karras_min)  # 15 steps: no lowering; 14 kept steps must not be lowered either
    assert len(s.sigmas) == 15 and not s.knobs["lower_order_final"]
    with pytest.raises(ValueError, match="final_sigmas_type='sigma_min'"):
        spec(10, **karras_min)
    assert math.isclose(spec(10, **karras_min, lower_order_final=False).sigmas[-1], s.sigmas[-1])
