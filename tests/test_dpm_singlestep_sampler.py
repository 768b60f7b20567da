"""The ``dpmsolver_single`` sampler (:mod:`diffkern.coef_tables_singlestep`, one fused row per model call, the group's
start sample eliminated) and the Level 2 translation of ``DPMSolverSinglestepScheduler`` (``loop_spec``).

Oracles and tolerances. The coefficient tables: diffusers' ``get_order_list`` itself, the phi functions against 50-digit
mpmath. The sampler: diffusers' loop in float64 driven by an exact analytic denoiser on the sampler's own VE schedule
(the float64 floor); in float32 the sampler against diffusers' float32 loop by the project's rule (at most twice
diffusers' own float32 error, + the float32 floor); every CPU backend against the float64 reference run; its empirical
convergence order. The pipelines of Level 2 are in ``test_dpm_singlestep.py``.
"""
from __future__ import annotations

import contextlib
import importlib
import math

import mpmath
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern import analytic, coef_tables_singlestep as css, schedules  # noqa: E402
from diffkern.diffusers.loop_spec import loop_spec, tail_spec  # noqa: E402
from diffkern.sampling import sample  # noqa: E402
from diffkern.testing import assert_matches_reference, make_tensor  # noqa: E402
from test_diffusers_schedulers import diffusers_float64  # noqa: E402
from test_dpm_singlestep import FLOW, NOISE, O3, SDE  # noqa: E402
from test_unipc import gmm3  # noqa: E402

MODULE = importlib.import_module("diffusers.schedulers.scheduling_dpmsolver_singlestep")
REF = "reference"
F64 = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # diffusers deprecates "dpmsolver"

#----------------------------------------------------------------------------
# Coefficient tables.


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 6, 9, 10, 11])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("low, final", [(True, "zero"), (False, "sigma_min"), (True, "sigma_min")])
def test_order_list_is_diffusers(order, steps, low, final):
    theirs = diffusers.DPMSolverSinglestepScheduler(solver_order=order, lower_order_final=low, final_sigmas_type=final)
    theirs.set_timesteps(steps)  # may switch lower_order_final on
    want = theirs.order_list
    assert css.order_list(steps, order, theirs.config.lower_order_final, final == "zero") == want
    if order > 1 and steps % order:  # diffusers switches lower_order_final on there; the sampler refuses
        with pytest.raises(ValueError, match="lower_order_final"):
            css.order_list(steps, order, False, False)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("x", [-40.0, -3.0, -2.0, -1.0, -0.3, -1e-9, 0.0, 1e-6, 0.7, 1.0, 1.999, 2.5])
def test_phi_is_exact(k, x):
    with mpmath.workdps(50):
        xm = mpmath.mpf(x)
        want = sum(xm ** m / mpmath.factorial(m + k) for m in range(200))
    assert math.isclose(css._phi(k, x), float(want), rel_tol=1e-15, abs_tol=0)


#----------------------------------------------------------------------------
# The sampler.


def _diffusers_loop(gmm, x, sigmas, config, dtype=F64):
    """diffusers' loop on the VE schedule ``sigmas`` (its sigmas replaced) in float64 (``dtype``: float32, the stock
    scheduler), the exact denoiser as a "sample"-prediction model on the VP state; returns the VE state and the
    scheduler (its orders, its lower_order_final after set_timesteps)."""
    wide = dtype == F64
    with diffusers_float64(MODULE) if wide else contextlib.nullcontext():
        sched = diffusers.DPMSolverSinglestepScheduler(prediction_type="sample", **config)
        sched.set_timesteps(len(sigmas) - 1)
        sched.sigmas = torch.tensor(sigmas, dtype=dtype)
        z = (x / math.sqrt(sigmas[0] ** 2 + 1)).to(dtype)
        for k, t in enumerate(sched.timesteps):
            s = sigmas[k]
            z = sched.step(gmm.denoise(z * math.sqrt(s * s + 1), s).to(dtype), t, z).prev_sample
    return z * math.sqrt(sigmas[-1] ** 2 + 1), sched


LOOPS = [({"solver_order": o, "solver_type": st}, True, end) for o in (1, 2, 3) for st in ("midpoint", "heun")
         for end in (True, False)] + [
    (dict(NOISE, solver_order=o, solver_type=st), False, False) for o in (2, 3) for st in ("midpoint", "heun")] + [
    ({"solver_order": 3, "lower_order_final": False, "final_sigmas_type": "sigma_min"}, True, False)]


@pytest.mark.parametrize("config, x0, to_zero", LOOPS, ids=[str(i) for i in range(len(LOOPS))])
def test_sampler_is_diffusers_loop_in_float64(config, x0, to_zero):
    gmm, x = gmm3(), make_tensor((6, 2), F64, seed=2) * 10.0
    sig = schedules.karras(10, 0.1, 10.0).tolist()
    if not to_zero:  # 9 steps
        config = dict(config, final_sigmas_type="sigma_min")
        sig = sig[:-1]
    want, sched = _diffusers_loop(gmm, x, sig, config)
    low, orders = sched.config.lower_order_final, sched.order_list
    knobs = {"order": config["solver_order"], "solver_type": config["solver_type"] if "solver_type" in config
             else "midpoint", "predict_x0": x0}
    got = sample(gmm, x, sig, "dpmsolver_single", backend=REF, lower_order_final=low, **knobs)
    assert_matches_reference(got, want, want, f"{config}")
    explicit = sample(gmm, x, sig, "dpmsolver_single", backend=REF, orders=orders, **knobs)
    assert_matches_reference(explicit, want, want, f"{config} explicit orders")


@pytest.mark.parametrize("config", [{"solver_order": 3}, {"solver_order": 3, "solver_type": "heun"},
                                    dict(NOISE, solver_order=3), {"solver_order": 2}])
def test_sampler_float32_elimination_is_sound(config):
    """The sampler's rows eliminate the group's start sample through the previous state (a divisor
    sigma_k/sigma_g or 1): in float32 it stays within the rule of diffusers' own float32 loop, 30 Karras steps down
    from sigma 80."""
    gmm, x = gmm3(), make_tensor((64, 2), F64, seed=5) * 80.0
    sig = schedules.karras(30, 0.03, 80.0).tolist()
    if config.get("algorithm_type") == "dpmsolver":
        sig = sig[:-1]
    truth, sched = _diffusers_loop(gmm, x, sig, config)
    eager, _ = _diffusers_loop(gmm, x, sig, config, dtype=torch.float32)
    got = sample(gmm, x.float(), sig, "dpmsolver_single", backend=REF, orders=sched.order_list,
                 predict_x0=config.get("algorithm_type") != "dpmsolver",
                 solver_type=config.get("solver_type", "midpoint"))
    assert_matches_reference(got, truth, eager, f"{config} float32")


def test_convergence_order():
    """Against a 1536-step run, ``orders`` all full groups: singlestep DPM-Solver++ of order q converges at order q
    (groups of q steps; measured slopes over 48 -> 96 -> 192 steps printed on failure)."""
    gmm = gmm3()
    x = torch.randn(16, 2, dtype=F64, generator=torch.Generator().manual_seed(3)) * 20.0

    def run(n, order, solver_type="midpoint"):
        return sample(gmm, x, schedules.loglinear(n + 1, 0.1, 20.0)[:-1], "dpmsolver_single", backend=REF, order=order,
                      lower_order_final=False, solver_type=solver_type)

    fine = run(1536, 3, "heun")
    for order, st in ((1, "midpoint"), (2, "midpoint"), (2, "heun"), (3, "heun")):
        errs = [float((run(n, order, st) - fine).abs().max()) for n in (48, 96, 192)]
        slopes = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
        assert all(order - 0.3 < s < order + 0.4 for s in slopes), (order, st, errs, slopes)


def test_every_backend_matches_reference(cpu_backend):
    gen = torch.Generator().manual_seed(4)
    gmm = analytic.GaussianMixture([1.0, 2.0], torch.randn(2, 5, generator=gen, dtype=F64), [0.6, 0.8])
    x = make_tensor((3, 5), F64, seed=7) * 5.0
    for knobs in ({}, {"order": 3, "solver_type": "heun"}, {"order": 3, "predict_x0": False}, {"order": 1}):
        sig = schedules.karras(7, 0.05, 5.0)
        if knobs.get("predict_x0") is False:
            sig = sig[:-1]
        ref64 = sample(gmm, x, sig, "dpmsolver_single", backend=REF, **knobs)
        eager = sample(gmm, x.float(), sig, "dpmsolver_single", backend=REF, **knobs)
        got = sample(gmm, x.float(), sig, "dpmsolver_single", backend=cpu_backend, **knobs)
        assert_matches_reference(got, ref64, eager, f"{knobs} [{cpu_backend}]")


def test_step_to_zero_is_the_jump():
    gmm, x = gmm3(), make_tensor((5, 2), F64, seed=3) * 10.0
    for x0 in (True, False):
        seen = []
        got = sample(gmm, x, schedules.karras(7, 0.1, 10.0), "dpmsolver_single", backend=REF, order=3, predict_x0=x0,
                     callback=lambda d: seen.append((d["x"].clone(), d["sigma"])))
        torch.testing.assert_close(got, gmm.denoise(*seen[-1]), rtol=0, atol=1e-13)


def test_sampler_knobs_are_checked():
    gmm, x, sig = gmm3(), torch.randn(2, 2, dtype=F64), schedules.karras(4, 0.1, 10.0)
    for knobs, error, match in (({"order": 4}, ValueError, "order: expected 1, 2 or 3"),
                                ({"order": True}, ValueError, "order"),
                                ({"lower_order_final": 1}, TypeError, "lower_order_final"),
                                ({"predict_x0": "yes"}, TypeError, "predict_x0"),
                                ({"solver_type": "bh2"}, ValueError, "solver_type"),
                                ({"order": 3, "lower_order_final": False}, ValueError, "lower_order_final"),
                                ({"orders": [1, 2, 3]}, ValueError, "orders: expected one order per step"),
                                ({"orders": [1, 3, 1, 1]}, ValueError, "orders: step 1"),
                                ({"orders": [1, 2, 1, 2]}, ValueError, "sigma 0 and must be first order"),
                                ({"orders": 3}, TypeError, "orders")):
        with pytest.raises(error, match=match):
            sample(gmm, x, sig, "dpmsolver_single", backend=REF, **knobs)
    with pytest.raises(ValueError, match="repeated sigma"):
        css.singlestep([2.0, 1.0, 1.0, 0.5], [1, 2, 3])

#----------------------------------------------------------------------------
# Level 2 translation.


def test_level2_spec():
    sched = dd.DPMSolverSinglestepScheduler(solver_order=3, solver_type="heun")
    sched.set_timesteps(8)
    spec = loop_spec(sched)
    assert spec.method == "dpmsolver_single" and spec.vp and spec.sigmas == sched.sigmas_host
    assert spec.timesteps == sched.timesteps.tolist()
    assert spec.knobs == {"solver_type": "heun", "predict_x0": True, "orders": (1, 2, 3, 1, 2, 3, 1, 1)}
    tail = tail_spec(sched, spec, 4)
    assert tail.sigmas == sched.sigmas_host[4:] and tail.knobs["orders"] == (1, 2, 1, 1)
    karras = dd.DPMSolverSinglestepScheduler(solver_order=2, use_karras_sigmas=True, final_sigmas_type="sigma_min")
    karras.set_timesteps(7)  # [1, 2, 1, 2, 1, 2, 1]: the identity last step is dropped
    assert loop_spec(karras).sigmas == karras.sigmas_host[:-1] and loop_spec(karras).knobs["orders"] == (1, 2) * 3
    sde = dd.DPMSolverSinglestepScheduler(solver_order=1, **SDE)
    sde.set_timesteps(5)
    assert (loop_spec(sde).method, loop_spec(sde).knobs) == ("sde", {"lam": 1.0})
    for config, steps, key in ((dict(O3, **SDE), 6, "algorithm_type='sde-dpmsolver\\+\\+'"),
                               (FLOW, 6, "use_flow_sigmas=True"),
                               ({"prediction_type": "flow_prediction"}, 6, "prediction_type='flow_prediction'"),
                               (dict(use_karras_sigmas=True, final_sigmas_type="sigma_min"), 8,
                                "final_sigmas_type='sigma_min'"),
                               ({"solver_order": 1}, 1200, "num_inference_steps=1200")):
        sched = dd.DPMSolverSinglestepScheduler(**config)
        sched.set_timesteps(steps)
        with pytest.raises(ValueError, match=key):
            loop_spec(sched)
