"""Two parity items (session 17c).

dpm_adaptive with 1 < accept_safety < 1 + pi/2: k-diffusion's PID controller steers the error towards 1, where its
limited factor is about 1, while an attempt is accepted only when the factor is at least accept_safety > 1; h settles
on a fixed point or cycle and the loop never ends. Reproduced below with the textbook float64 loop
(test_kdiff_adaptive's, which would run forever: a model call budget stops it) and refused by diffkern with a
RuntimeError naming accept_safety (:class:`diffkern.coef_tables_dpm_adaptive.StallWatch`). Runs that end (with
accept_safety > 1 too) are still k-diffusion's.

Level-1 Euler, Euler-ancestral and EDM-Euler before ``set_timesteps``: diffusers' classes step on the schedule their
``__init__`` holds (all training timesteps; ``num_inference_steps`` stays None), and so do ours, side by side with
diffusers in float64 (truth) and float32 under the project's rule.
"""
import math
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.coef_tables_dpm_adaptive import STALL_LIMIT, StallWatch  # noqa: E402
from diffkern.samplers_adaptive import sample_dpm_adaptive  # noqa: E402
from diffkern.testing import assert_matches_reference, make_tensor  # noqa: E402
from test_diffusers_schedulers import diffusers_float64  # noqa: E402
from test_kdiff_adaptive import SEED, gmm, kdiff_adaptive, start  # noqa: E402
from test_level1_parity17 import _module, _three  # noqa: E402
from test_review_session16 import deadline  # noqa: E402,F401  (fixture)

F64 = torch.float64
REF = "reference"

# ---------------------------------------------------------------------------------------------------------------------
# dpm_adaptive: the accept_safety > 1 stall


class _Budget(Exception):
    pass


def _spy(limit):
    """A gmm() denoiser recording its call sigmas that raises _Budget after ``limit`` calls."""
    model, calls = gmm(), []

    def call(x, sigma):
        if len(calls) >= limit:
            raise _Budget
        calls.append(float(sigma[0]))
        return model(x, sigma)
    return call, calls


STALLS = [({"accept_safety": 1.05}, F64, (0.02, 12.0)),
          ({"accept_safety": 1.01, "order": 2}, F64, (0.02, 12.0)),
          ({"accept_safety": 2.0, "eta": 0.7}, F64, (0.02, 12.0)),
          ({"accept_safety": 1.3, "pcoeff": 0.2, "icoeff": 0.6, "dcoeff": 0.1}, F64, (0.02, 12.0)),
          ({"accept_safety": 1.05}, F64, (8.0, 0.1)),  # reverse: h < 0
          ({"accept_safety": 1.2}, torch.float32, (0.02, 12.0))]


@pytest.mark.parametrize("kw, dtype, limits", STALLS, ids=[f"{k}-{d}-{l}" for k, d, l in STALLS])
def test_stall_is_kdiffusions_endless_loop_and_is_refused(deadline, kw, dtype, limits):  # noqa: F811
    order = kw.get("order", 3)
    x = start(sigma=0.5 if limits[0] > limits[1] else 10.0, dtype=dtype)
    budget = 400 * order
    model, theirs = _spy(budget)
    with pytest.raises(_Budget):  # k-diffusion's loop: still running after 400 attempts
        kdiff_adaptive(model, x, *limits, **kw)
    starts = theirs[::order]  # each attempt's first call is at its start sigma
    assert len(set(starts[-300:])) == 1  # the last 300 attempts all rejected: no progress at all
    model, ours = _spy(budget)
    seen = []
    with pytest.raises(RuntimeError, match=rf"^dpm_adaptive: accept_safety {kw['accept_safety']!r} > 1 stalled the "
                                           rf"step-size controller at sigma .*: {STALL_LIMIT} attempts in a row were "
                                           r"rejected .* use accept_safety <= 1 \(default 0\.81\)$"):
        sample_dpm_adaptive(model, x, *limits, None, seen.append, True, backend=REF, seed=SEED, **kw)
    # recognised soon after it sets in; in float64, on the same attempts as k-diffusion's (in float32 the two loops'
    # error estimates differ by rounding, which the controller turns into other step lengths: both still stall)
    assert len(seen) < 120 and seen[-1]["n_reject"] > STALL_LIMIT
    if dtype == F64:
        torch.testing.assert_close(torch.tensor(ours, dtype=F64), torch.tensor(theirs[:len(ours)], dtype=F64),
                                   rtol=1e-9, atol=0)


# accept_safety > 1 and rejections, yet the loop ends: found by the sweep quoted at STALL_LIMIT
ENDING = [{"accept_safety": 2.0, "rtol": 2.0, "atol": 1.0, "pcoeff": 1.0, "icoeff": 2.0},
          {"accept_safety": 1.3, "rtol": 0.005, "atol": 0.001, "pcoeff": 1.0, "icoeff": 2.0},
          {"accept_safety": 1.05, "icoeff": 2.5}]


@pytest.mark.parametrize("kw", ENDING, ids=[str(k) for k in ENDING])
def test_runs_that_end_with_accept_safety_above_one_are_kdiffusions(deadline, kw):  # noqa: F811
    want, want_info, _ = kdiff_adaptive(gmm(), start(), 0.02, 12.0, **kw)
    got, info = sample_dpm_adaptive(gmm(), start(), 0.02, 12.0, disable=True, backend=REF, return_info=True, **kw)
    assert info == want_info and info["n_reject"] > 0
    assert_matches_reference(got, want, want, f"{kw}")


def _feed(watch, hs, factors):
    """Rejections of lengths hs[k] proposing hs[k + 1] with factors[k]; the index of the first stall or None."""
    for k, factor in enumerate(factors):
        if watch.rejected(hs[k], hs[k + 1], factor):
            return k
    return None


def test_stall_watch_progress_rule():
    n = 10 * STALL_LIMIT
    # a fixed point (factor 1 < accept_safety): the first rejection is progress, the next STALL_LIMIT are not
    assert _feed(StallWatch(1.05), [1.5] * (n + 1), [1.0] * n) == STALL_LIMIT
    # a 2-cycle, and a damped oscillation towards a fixed point
    assert _feed(StallWatch(1.5), [1.0, 1.2] * n, [1.2, 1 / 1.2] * n) is not None
    damped = [1.5 + 0.1 * (-0.5) ** k for k in range(n + 1)]
    # (its first two rejections progress: the second's factor, the first above 1, beats the first's)
    assert _feed(StallWatch(1.5), damped, [damped[k + 1] / damped[k] for k in range(n)]) == STALL_LIMIT + 1
    # the clipped last step: a factor in (1, accept_safety) that grows h without end
    grow = [1.1 ** k for k in range(n + 1)]
    assert _feed(StallWatch(1.2), grow, [1.1] * n) == STALL_LIMIT
    # progress: an oscillation whose low point's factor grows towards accept_safety, h shrinking towards the
    # step-length guard, and accept_safety <= 1 (a rejected factor < 1 always shortens h)
    amp = [0.01 * 1.01 ** k for k in range(n)]
    hs = [1.0]
    for k in range(n):
        hs.append(hs[-1] * (1 + amp[k] if k % 2 else 1 - amp[k]))
    assert _feed(StallWatch(2.0), hs, [hs[k + 1] / hs[k] for k in range(n)]) is None
    assert _feed(StallWatch(1.5), [0.9 ** k for k in range(n + 1)], [0.9] * n) is None
    assert _feed(StallWatch(1.0), [1.5] * (n + 1), [1.0] * n) is None
    assert _feed(StallWatch(0.81), [1.5] * (n + 1), [0.8] * n) is None
    # an accepted attempt starts a new run
    watch = StallWatch(1.05)
    assert _feed(watch, [1.5] * STALL_LIMIT, [1.0] * (STALL_LIMIT - 1)) is None
    watch.accepted()
    assert _feed(watch, [1.5] * STALL_LIMIT, [1.0] * (STALL_LIMIT - 1)) is None

# ---------------------------------------------------------------------------------------------------------------------
# Level-1 Euler, Euler-ancestral, EDM-Euler before set_timesteps


SHAPE = (2, 3, 5, 4)
BEFORE = [
    ("EulerDiscreteScheduler", {}, {}, 0),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True, "timestep_spacing": "leading", "steps_offset": 1,
                                "final_sigmas_type": "sigma_min", "prediction_type": "v_prediction"}, {}, 0),
    ("EulerDiscreteScheduler", {"timestep_type": "continuous", "prediction_type": "v_prediction"}, {}, 0),
    ("EulerDiscreteScheduler", {"prediction_type": "sample"}, {"s_churn": 8.0, "s_tmax": 5.0}, 6),
    ("EulerAncestralDiscreteScheduler", {}, {}, 0),
    ("EulerAncestralDiscreteScheduler", {"prediction_type": "v_prediction", "beta_schedule": "scaled_linear"}, {}, 3),
    ("EDMEulerScheduler", {}, {}, 0),
    ("EDMEulerScheduler", {"sigma_schedule": "exponential", "final_sigmas_type": "sigma_min",
                           "prediction_type": "v_prediction"}, {"s_churn": 10.0}, 2),
]


def _step(sched, m, t, x, kw, gen):
    return sched.step(m, t, x, generator=gen, **kw)


@pytest.mark.parametrize("name, config, kw, begin", BEFORE, ids=[f"{b[0]}-{i}" for i, b in enumerate(BEFORE)])
def test_steps_on_the_init_schedule_as_diffusers(name, config, kw, begin):
    """Every call of the schedule diffusers' __init__ holds (T = 40), from ``begin`` (found from the first timestep,
    as diffusers' index_for_timestep), then one step past its end (IndexError in both)."""
    truth, eager, ours = _three(name, {"num_train_timesteps": 40, **config})
    assert ours.num_inference_steps is eager.num_inference_steps is None
    gens = [torch.Generator().manual_seed(7) for _ in range(3)]
    x = make_tensor(SHAPE, F64, seed=11) * float(truth.init_noise_sigma)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(begin, len(eager.timesteps)):
            t64, t32, t = truth.timesteps[k], eager.timesteps[k], ours.timesteps[k]
            m = make_tensor(SHAPE, F64, seed=100 + k)
            with diffusers_float64(_module(name)):
                scaled = truth.scale_model_input(x, t64)
                ref = _step(truth, m, t64, x, kw, gens[0])
            assert_matches_reference(ours.scale_model_input(x.float(), t), scaled,
                                     eager.scale_model_input(x.float(), t32), f"{name} scale_model_input {k}")
            out = _step(eager, m.float(), t32, x.float(), kw, gens[1])
            got = _step(ours, m.float(), t, x.float(), kw, gens[2])
            at = f"{name} {config} {kw} call {k}"
            assert_matches_reference(got.prev_sample, ref.prev_sample, out.prev_sample, at)
            assert_matches_reference(got.pred_original_sample, ref.pred_original_sample, out.pred_original_sample, at)
            x = ref.prev_sample
        assert ours.step_index == eager.step_index == len(eager.timesteps)
        assert ours.num_inference_steps is eager.num_inference_steps is None
        m = make_tensor(SHAPE, torch.float32, seed=1)
        with pytest.raises(IndexError):
            eager.step(m, eager.timesteps[-1], x.float())
        with pytest.raises(IndexError, match=r"past the end of the schedule .* call set_timesteps again"):
            ours.step(m, ours.timesteps[-1], x.float())


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "EDMEulerScheduler"])
def test_default_config_steps_then_set_timesteps_replaces(name):
    """The default T = 1000: three calls as diffusers'; a later set_timesteps(N) runs as on a fresh scheduler."""
    truth, eager, ours = _three(name)
    x = make_tensor(SHAPE, F64, seed=2) * float(truth.init_noise_sigma)
    gens = [torch.Generator().manual_seed(3) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(3):
            m = make_tensor(SHAPE, F64, seed=20 + k)
            with diffusers_float64(_module(name)):
                ref = truth.step(m, truth.timesteps[k], x, generator=gens[0])
            out = eager.step(m.float(), eager.timesteps[k], x.float(), generator=gens[1])
            got = ours.step(m.float(), ours.timesteps[k], x.float(), generator=gens[2])
            assert_matches_reference(got.prev_sample, ref.prev_sample, out.prev_sample, f"{name} call {k}")
            x = ref.prev_sample
    fresh = dd.SCHEDULERS[name]()
    for sched in (ours, fresh):
        sched.set_timesteps(4)
    assert ours.num_inference_steps == 4 and torch.equal(ours.timesteps, fresh.timesteps)
    y = [x.float(), x.float()]
    for k in range(4):
        m = make_tensor(SHAPE, torch.float32, seed=40 + k)
        y = [s.step(m, s.timesteps[k], yk, generator=torch.Generator().manual_seed(k)).prev_sample
             for s, yk in zip((ours, fresh), y)]
        assert torch.equal(*y)


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "EDMEulerScheduler"])
def test_add_noise_after_set_begin_index_before_set_timesteps(name):
    """diffusers noises to sigmas[begin_index] of its __init__ schedule; so does ours."""
    theirs, ours = getattr(diffusers, name)(num_train_timesteps=40), dd.SCHEDULERS[name](num_train_timesteps=40)
    x, noise = make_tensor(SHAPE, torch.float32, seed=5), make_tensor(SHAPE, torch.float32, seed=6)
    for sched in (theirs, ours):
        sched.set_begin_index(7)
    want = theirs.add_noise(x, noise, theirs.timesteps[[10, 20]])
    got = ours.add_noise(x, noise, ours.timesteps[[10, 20]])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5 * math.sqrt(float(theirs.sigmas[7]) ** 2 + 1))
