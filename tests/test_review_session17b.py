"""Review of session 17's changes (344d10b..HEAD) against independent oracles: stock diffusers 0.42.1 side by side for
the deferred default schedule of the Level-1 Heun/KDPM2/LMS/DPMSolverSDE schedulers (assignment before the first
read, copies, config round trips, begin index, subclasses); the Heun table reuse against fresh schedulers, bitwise;
the dpm_adaptive reported-sigma dtype of numpy-scalar limits against k-diffusion's ``torch.tensor`` rule; the Euler
HOLD ODE warning's growth against the exact spectral norm of its matrix product, and the line it points at; the names
in the extended-precision HOLD path's small-time refusal."""
import copy
import math
import pickle
import sys
import warnings

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
import diffkern.diffusers as dd  # noqa: E402
from diffkern import hold_sampling as hs  # noqa: E402
from diffkern.hold import HOLD  # noqa: E402
from diffkern.hold_stability import EulerODEStabilityWarning, fastest_rotation, log_growth  # noqa: E402
from diffkern.samplers_adaptive import report_specs  # noqa: E402

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_heun_build import equal_runs, run_loop, same_bits  # noqa: E402
from test_kdiff_report_dtypes import adaptive, kd_adaptive_specs  # noqa: E402

F64 = torch.float64
STOCK_PAIRS = ["HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
               "LMSDiscreteScheduler"]  # diffusers' DPMSolverSDEScheduler needs torchsde (not installed)


def pair(name, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(dd, name)(**config), getattr(diffusers, name)(**config)


def same_schedule(got, ours, stock):
    """``got`` on the default schedule: stock's timesteps and step count; the sigmas of a fresh scheduler of ours,
    bitwise (ours' values against diffusers' in float64: tests/test_level1_parity17.py)."""
    assert got.num_inference_steps == stock.num_inference_steps
    assert got.timesteps.dtype == stock.timesteps.dtype and torch.equal(got.timesteps, stock.timesteps)
    assert got.sigmas.shape == stock.sigmas.shape and got.sigmas.dtype == stock.sigmas.dtype
    assert torch.equal(got.sigmas, ours.sigmas)
    assert got.sigmas_host == ours.sigmas_host

#----------------------------------------------------------------------------
# DeferredSchedule


@pytest.mark.parametrize("name", STOCK_PAIRS)
def test_assignment_before_the_first_read_is_kept_as_stock(name):
    """diffusers' default schedule exists from __init__: a pipeline's or user's assignment replaces it for good.
    (Ours ran the pending set_timesteps(T) at the next read, overwriting the assigned value.)"""
    ours, stock = pair(name)
    ours.num_inference_steps = stock.num_inference_steps = 7
    assert ours.num_inference_steps == stock.num_inference_steps == 7
    assert torch.equal(ours.timesteps, stock.timesteps)
    ours, stock = pair(name)
    ts = torch.tensor([5.0, 3.0])
    ours.timesteps, stock.timesteps = ts.clone(), ts.clone()
    assert ours.num_inference_steps == stock.num_inference_steps == 1000
    assert torch.equal(ours.timesteps, ts) and torch.equal(stock.timesteps, ts)


def test_assignment_before_the_first_read_dpmsolver_sde():
    s = dd.DPMSolverSDEScheduler()
    s.num_inference_steps = 7
    assert s.num_inference_steps == 7 and len(s.timesteps) == 2 * 1000 - 1


@pytest.mark.parametrize("name", STOCK_PAIRS)
def test_copies_and_config_round_trips_hold_the_default_schedule(name, tmp_path):
    """pickle, deepcopy, from_config and a save_config/from_pretrained round trip of a scheduler never read: the
    stock class's default schedule (the pending one runs in the copy)."""
    ours, stock = pair(name)
    ours.save_config(tmp_path)
    copies = [pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours), type(ours).from_config(ours.config),
              type(ours).from_pretrained(tmp_path)]
    fresh = getattr(dd, name)()
    for c in copies + [ours]:
        same_schedule(c, fresh, stock)


@pytest.mark.parametrize("name", STOCK_PAIRS)
def test_begin_index_before_the_first_read(name):
    ours, stock = pair(name)
    ours.set_begin_index(4)
    stock.set_begin_index(4)
    same_schedule(ours, getattr(dd, name)(), stock)
    assert ours.begin_index == stock.begin_index == 4 and ours.step_index is None and stock.step_index is None


def test_subclass_overriding_set_timesteps():
    """A subclass's set_timesteps runs for the default schedule (as diffusers' __init__ calls it) and cancels it."""
    class Logged(dd.HeunDiscreteScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, **kw):
            super().set_timesteps(num_inference_steps, device, **kw)
            self.calls = getattr(self, "calls", []) + [num_inference_steps]

    s = Logged()
    assert s.num_inference_steps == 1000 and s.calls == [1000]
    s = Logged()
    s.set_timesteps(5)
    assert s.calls == [5] and len(s.timesteps) == 9 and s.num_inference_steps == 5

#----------------------------------------------------------------------------
# Heun table reuse: bitwise a fresh scheduler's outputs


def loop_on(sched, seed=0):
    """run_loop's loop on the scheduler's current schedule (no set_timesteps)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 5, 7, generator=gen) * sched.init_noise_sigma
    outs = []
    for t in sched.timesteps:
        out = sched.step(torch.randn(2, 3, 5, 7, generator=gen) * 0.5 + 0.1 * sched.scale_model_input(x, t), t, x)
        x = out.prev_sample
        outs += [out.prev_sample, out.pred_original_sample]
    return outs


def test_heun_reuse_after_inference_mode_and_config_toggles():
    s = dd.HeunDiscreteScheduler()
    with torch.inference_mode():
        run_loop(s, 5)
    assert equal_runs(run_loop(s, 5), run_loop(dd.HeunDiscreteScheduler(), 5))
    s.register_to_config(use_karras_sigmas=True)
    assert equal_runs(run_loop(s, 5), run_loop(dd.HeunDiscreteScheduler(use_karras_sigmas=True), 5))
    s.register_to_config(prediction_type="v_prediction")
    fresh = dd.HeunDiscreteScheduler(use_karras_sigmas=True, prediction_type="v_prediction")
    assert equal_runs(run_loop(copy.deepcopy(s), 5), run_loop(fresh, 5))


def test_heun_reuse_sees_sigmas_edited_in_place():
    s, fresh = dd.HeunDiscreteScheduler(), dd.HeunDiscreteScheduler()
    run_loop(s, 6)
    for sched in (s, fresh):
        sched.set_timesteps(6)
        sched.sigmas_host[3] *= 0.9
    assert equal_runs(loop_on(s), loop_on(fresh))
    table = s._plan(("heun",))[0]
    assert same_bits(table, fresh._plan(("heun",))[0])

#----------------------------------------------------------------------------
# dpm_adaptive: numpy-scalar limits


NUMPY_LIMITS = [(np.float64(0.05), np.float64(10.0)), (np.float32(0.05), 10.0), (0.05, np.float32(10.0)),
                (np.float64(0.05), torch.tensor(10.0, dtype=torch.float16)), (np.int64(1), np.float64(10.0))]


@pytest.mark.parametrize("limits", NUMPY_LIMITS, ids=["f64", "f32-num", "num-f32", "f64-f16", "int-f64"])
def test_numpy_scalar_limits_report_kdiffusions_dtype(limits):
    """k-diffusion's ``torch.tensor(np.float64(v))`` is float64 (ours took the default dtype for every non-tensor)."""
    before, after = kd_adaptive_specs(*limits)
    assert report_specs(*limits) == (before, after)
    _, info, seen, calls = adaptive(*limits, h_init=4.0)
    first_accept = next(k for k in range(len(seen)) if seen[k]["n_accept"] == 1)
    for k, d in enumerate(seen):
        assert (d["sigma"].dtype, d["sigma"].device) == (before if k < first_accept else after)
    assert all((sn.dtype, sn.device) == after for _, sn in calls)


def test_fraction_limits_keep_the_default_dtype():
    from fractions import Fraction
    assert report_specs(Fraction(1, 20), 10.0) == ((torch.get_default_dtype(), torch.device("cpu")),) * 2

#----------------------------------------------------------------------------
# HOLD Euler ODE warning


@pytest.mark.parametrize("n,beta,steps,spacing", [(2, 1.0, 10, "linear"), (3, 1.0, 20, "linear"),
                                                  (4, 1.0, 60, "quadratic"), (6, (0.1, 2.0), 60, "linear"),
                                                  (9, 1.0, 200, "linear")])
def test_euler_growth_is_the_exact_spectral_norm(n, beta, steps, spacing):
    """At the stationary score (eps_hat = L_nn L z_n) the sampler's step K z + k eps_hat is I - b S_k; the product of
    these commuting normal matrices has spectral norm prod sqrt(1 + (b omega_max)^2): the warning's growth, exactly."""
    proc = HOLD(n, beta=beta)
    b, lnn = hs._steps(proc, hs.time_grid(proc, steps, spacing=spacing))
    K, k = hs.euler_rows(proc, b, lnn, 1.0)
    M = K.clone()
    M[:, :, n - 1] += k * (lnn * proc.L)[:, None]
    S = proc.F.clone()
    S[n - 1, n - 1] += proc.xi
    assert torch.equal(S, -S.T)
    bS = b[:, None, None] * S
    assert torch.allclose(M, torch.eye(n, dtype=F64) - bS, rtol=0, atol=4 * torch.finfo(F64).eps * (1 + bS.abs().max()))
    P = torch.eye(n, dtype=F64)
    for Mi in M:
        P = Mi @ P
    exact = float(torch.linalg.matrix_norm(P, 2))
    lg = log_growth(fastest_rotation(proc.F, proc.xi), b)
    assert abs(math.log(exact) - lg) <= 1e-12 * max(1.0, lg) + 1e-13


def zero_eps(z, t):
    return torch.zeros(z.shape[0], 1, dtype=z.dtype)


def test_euler_warning_points_at_the_callers_line():
    """Through hold_sampling.sample (behind torch.no_grad's wrapper) and sampler_table, the warning's frame is this
    file (it was hold_sampling.py for sample)."""
    proc = HOLD(6)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        hs.sample(zero_eps, proc, (4, 1), sampler="ode", num_steps=30)
        hs.sampler_table(proc, hs.time_grid(proc, 30), "ode")
    hits = [w for w in got if issubclass(w.category, EulerODEStabilityWarning)]
    assert len(hits) == 2 and all(w.filename == __file__ for w in hits), [(w.filename, w.lineno) for w in hits]

#----------------------------------------------------------------------------
# HOLD extended path: the small-time refusal names the caller's argument


def test_small_time_refusal_names_b_or_t():
    proc = HOLD(12, delta=0.0)  # HSM without jitter: integrated times below Law.min_time() (1.4e-41) refused
    tiny = 1e-80
    for method in (proc.chol, proc.score_scale, proc.x0_coefficients):  # only the factor needs the extra digits
        with pytest.raises(ValueError, match=r"^t: expected an integrated time b >= "):
            method(tiny)
    with pytest.raises(ValueError, match=r"^b: expected an integrated time b >= "):
        proc._ext_law().batch(torch.tensor([tiny], dtype=torch.float64), "L", "b")
    for method in (proc.transition_b, proc.gramian_b, proc.transition, proc.gramian, proc.cov, proc.a_chol):
        assert torch.isfinite(method(tiny)).all()  # E, Q and the A-part need no extra digits


def test_float64_orders_do_not_read_device_times():
    """At n <= 8 with the default jitter nothing is routed to the extended path: a tensor t is never checked on the
    host (a negative one is not refused; it would be, by name, where the path reads it)."""
    proc = HOLD(4)
    assert not proc._xparts
    t = torch.tensor([-0.5, 0.3], dtype=F64)
    for method in (proc.transition, proc.gramian, proc.cov, proc.chol, proc.int_beta):
        method(t)
