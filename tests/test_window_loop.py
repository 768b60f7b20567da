"""``window=(begin, total)`` carried by the sampling loop (``sampler_loop._Loop``, applied by ``_run``), so every public
sampler takes it and ``diffkern.sample`` only passes it on; and Level-1 schedulers' device tables under
``torch.inference_mode``.

Oracles:
- the previous ``sample`` path, written out here: the method's plan (``sampler_plans.PLANS``) run by hand as
  ``sampler_loop._run(loop, sampler_loop.windowed(plan, window))`` on a loop built without a window (dpm_fast reporting
  its unwindowed plan's sigmas), which must agree bitwise;
- a textbook float64 Euler-ancestral loop whose noise at step i is ``philox.noise_like(x, seed, begin + i)`` (the whole
  loop's rows), for the public sampler function called directly;
- the table checks are counted as ``test_session_review.test_inference_mode_loop_checks_its_table_once`` counts them.
"""
import pytest
import torch

import diffkern
from diffkern import (analytic, coef_tables, coef_tables_dpm_fast, sampler_compat, sampler_loop, sampler_plans,
                      samplers, samplers_adaptive, schedules)
from diffkern.ops import coefs, philox
from diffkern.sampling import knobs

GMM = analytic.GaussianMixture.demo_2d()
REF = "reference"
# knobs that make a method draw noise where its defaults do not
NOISY = {"euler": {"s_churn": 2.0}, "heun": {"s_churn": 2.0}, "dpm_2": {"s_churn": 2.0},
         "dpmsolver_3m": {"eta": 1.0}, "dpm_fast": {"eta": 1.0}, "res_multistep": {"eta": 1.0}, "ge": {"mu": 0.5}}
# methods with no noise at all: a window changes nothing
DETERMINISTIC = {"dpmpp_2m", "unipc", "deis", "plms", "ipndm", "lms", "dpmsolver_single", "ipndm_v", "heun_flow"}


def _start(batch=8, sigma=10.0, dtype=torch.float64):
    return (torch.randn(batch, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * sigma).to(dtype)


def _old_path(method, x, sig, window, seed, backend, knob_values, callback=None):
    """``sample``'s former window branch: the plan run by hand on the rows of the window."""
    loop = samplers._Loop(GMM, x, sig, None, callback, True, seed, backend, None)
    plan = sampler_plans.PLANS[method](loop.sigmas, loop.conv, **{**knobs(method), **knob_values})
    if method == "dpm_fast":
        loop.report = sampler_compat.DpmFastReport(loop.sigmas, loop.x)
    with torch.no_grad():
        return sampler_loop._run(loop, sampler_loop.windowed(plan, window)), plan

#----------------------------------------------------------------------------
# Every sampler: the window through the loop is the hand-built windowed plan, bitwise.


@pytest.mark.parametrize("method", sorted(set(samplers.SAMPLERS) - samplers_adaptive.EAGER_ONLY))  # no plan, no window
def test_every_sampler_window_is_the_hand_built_windowed_plan(method):
    sig = schedules.karras(5, 0.05, 10.0).tolist()
    x = _start(sigma=sig[0])
    kw = NOISY.get(method, {})
    for window in ((2, 9), (0, 5), (4, 9)):
        want, plan = _old_path(method, x, sig, window, 7, REF, kw)
        draws = bool((plan.table[:, coefs.S] != 0).any())
        assert draws == (method not in DETERMINISTIC), f"{method}: draws noise {draws}"
        direct = samplers.SAMPLERS[method](GMM, x, sig, seed=7, backend=REF, window=window, **kw)
        assert torch.equal(direct, want), (method, window)
        assert torch.equal(diffkern.sample(GMM, x, sig, method, seed=7, backend=REF, window=window, **kw), want)
    alone = diffkern.sample(GMM, x, sig, method, seed=7, backend=REF, **kw)
    assert torch.equal(samplers.SAMPLERS[method](GMM, x, sig, seed=7, backend=REF, window=None, **kw), alone)
    moved = diffkern.sample(GMM, x, sig, method, seed=7, backend=REF, window=(2, 9), **kw)
    assert torch.equal(moved, alone) == (method in DETERMINISTIC)  # a noisy loop draws other noise in the window


@pytest.mark.parametrize("method", ["dpm_2_ancestral", "dpmpp_sde", "sa_solver", "heun"])
def test_window_on_cpp_float32_is_the_hand_built_plan(method):
    if diffkern.available("cpu").get("cpp") is not None:
        pytest.skip(f"cpp: {diffkern.available('cpu')['cpp']}")
    sig = schedules.karras(6, 0.05, 10.0).tolist()[1:]
    x = _start(16, sig[0], torch.float32)
    kw = NOISY.get(method, {})
    want, _ = _old_path(method, x, sig, (1, 6), 3, "cpp", kw)
    got = diffkern.sample(GMM, x, sig, method, seed=3, backend="cpp", window=(1, 6), **kw)
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_window_is_a_common_knob_not_a_method_knob():
    import inspect
    for method in samplers.SAMPLERS:
        assert "window" not in knobs(method), method
    for fn in list(samplers.SAMPLERS.values()) + [samplers.sample_dpm_fast]:
        p = inspect.signature(fn).parameters["window"]
        assert p.kind is p.KEYWORD_ONLY and p.default is None, fn.__name__

#----------------------------------------------------------------------------
# The public sampler called directly, against a textbook loop.


@pytest.mark.parametrize("begin", [0, 1, 3])
def test_public_euler_ancestral_window_is_the_whole_loops_noise(begin):
    total, seed = 7, 11
    tail = schedules.karras(total, 0.05, 10.0).tolist()[begin:]
    x = _start(32, tail[0])
    want, key = x.clone(), torch.tensor([seed])
    for i, (s, sn) in enumerate(zip(tail[:-1], tail[1:])):
        d = GMM(want, torch.full((x.shape[0],), s, dtype=torch.float64))
        down, up = coef_tables.ancestral_step(s, sn, 1.0)
        want = want + (down - s) * (want - d) / s + up * philox.noise_like(want, key, begin + i, torch.float64)
    got = samplers.sample_euler_ancestral(GMM, x, tail, seed=seed, backend=REF, window=(begin, total))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_public_sampler_window_with_trajectory_and_callback():
    sig = schedules.karras(5, 0.05, 10.0).tolist()
    x = _start(8, sig[0])
    traj, seen = samplers.Trajectory(x, 5), []
    out = samplers.sample_dpmpp_2m_sde(GMM, x, sig, None, lambda d: seen.append(d["i"]), seed=1, backend=REF,
                                       trajectory=traj, window=(2, 7))
    assert seen == list(range(5)) and torch.equal(traj.x[-1], out)
    assert torch.equal(out, samplers.sample_dpmpp_2m_sde(GMM, x, sig, seed=1, backend=REF, window=(2, 7)))


def test_kdiffusion_dpm_fast_signature_takes_the_window():
    x = _start(8, 14.6)
    got = samplers.sample_dpm_fast(GMM, x, 0.03, 14.6, 5, eta=1.0, seed=2, backend=REF, window=(1, 8))
    grid = coef_tables_dpm_fast.grid(0.03, 14.6, 5)
    assert torch.equal(got, diffkern.sample(GMM, x, grid, "dpm_fast", eta=1.0, seed=2, backend=REF, window=(1, 8)))
    assert not torch.equal(got, samplers.sample_dpm_fast(GMM, x, 0.03, 14.6, 5, eta=1.0, seed=2, backend=REF))

#----------------------------------------------------------------------------
# dpm_fast in a window: the callback reports k-diffusion's grid steps, as without one.


def test_dpm_fast_callback_sigmas_under_a_window():
    sig = schedules.karras(4, 0.1, 10.0).tolist()
    x = _start(3, 10.0)
    seen = {}
    for window in (None, (1, 6), (2, 6)):
        got = seen[window] = []
        samplers.sample_dpm_fast_sigmas(GMM, x, sig, None, lambda d, got=got: got.append((d["i"], d["sigma"],
                                                                                          d["sigma_hat"])),
                                        eta=1.0, seed=2, backend=REF, window=window)
    assert seen[(1, 6)] == seen[(2, 6)] == seen[None]
    grid = coef_tables_dpm_fast.grid(sig[-2], sig[0], 2)  # 4 calls: orders [3, 1]
    assert [i for i, _, _ in seen[None]] == [0, 1]
    assert [float(s) for _, s, _ in seen[None]] == [float(torch.tensor(v, dtype=torch.float64).float())
                                                     for v in grid[:2]]
    hand = []
    _old_path("dpm_fast", x, sig, (1, 6), 2, REF, {"eta": 1.0}, lambda d: hand.append((d["i"], d["sigma"],
                                                                                       d["sigma_hat"])))
    assert hand == seen[(1, 6)]

#----------------------------------------------------------------------------
# Errors name the window, before any model call.


def _no_call(x, sigma):
    raise AssertionError("the model was called before the window was checked")


@pytest.mark.parametrize("window, err, match", [
    ((1,), TypeError, "window: expected None or a pair of ints"),
    ((1.5, 8), TypeError, "window: expected None or a pair of ints"),
    ((False, 8), TypeError, "window: expected None or a pair of ints"),
    ((-1, 8), ValueError, r"window: expected 0 <= begin and begin \+ 5"),
    ((4, 8), ValueError, r"window: expected 0 <= begin and begin \+ 5 .* got \(begin, total\) = \(4, 8\)"),
    ((0, 2 ** 16 + 1), ValueError, "window: total must be at most 65536"),
])
@pytest.mark.parametrize("method", ["euler_ancestral", "heun", "dpm_fast"])
def test_public_sampler_bad_window_is_named(window, err, match, method):
    sig = schedules.karras(5, 0.05, 10.0)
    with pytest.raises(err, match=match):
        samplers.SAMPLERS[method](_no_call, _start(4), sig, seed=0, backend=REF, window=window)
    with pytest.raises(err, match=match):
        diffkern.sample(_no_call, _start(4), sig, method, backend=REF, window=window)


def test_loop_checks_the_window_against_its_own_steps():
    sig = schedules.karras(5, 0.05, 10.0)
    assert samplers._Loop(GMM, _start(4), sig, None, None, True, 0, REF, None, window=[2, 7]).window == (2, 7)
    with pytest.raises(ValueError, match=r"window: expected 0 <= begin and begin \+ 5 \(the steps of this loop\)"):
        samplers._Loop(GMM, _start(4), sig, None, None, True, 0, REF, None, window=(3, 7))
    with pytest.raises(ValueError, match=r"window: expected 0 <= begin and begin \+ 3 "):
        samplers.sample_dpm_fast(_no_call, _start(4), 0.1, 10.0, 3, window=(1, 3))

#----------------------------------------------------------------------------
# Level-1 schedulers under torch.inference_mode: the CPU table is checked once, not at every step().


@pytest.mark.parametrize("device", ["cpu", None])  # warmed by set_timesteps, or built at the first step()
# Euler reads its host plan before its device table in step(): the host table is then an inference tensor
@pytest.mark.parametrize("name", ["EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
                                  "EulerDiscreteScheduler"])
def test_level1_inference_mode_table_is_checked_once(monkeypatch, name, device):
    dd = pytest.importorskip("diffkern.diffusers")
    m = torch.randn(2, 4, 5, 3, generator=torch.Generator().manual_seed(1))
    x0 = torch.randn(2, 4, 5, 3, generator=torch.Generator().manual_seed(2))

    def run(n):
        sched = getattr(dd, name)()
        sched.backend = REF
        sched.set_timesteps(n, device=device)
        sched.set_seed(5)
        x = x0
        for t in sched.timesteps:
            x = sched.step(m, t, x).prev_sample
        return x

    calls, real = [], coefs.validate
    monkeypatch.setattr(coefs, "validate", lambda t, name="coef": (calls.append(name), real(t, name))[1])
    with torch.no_grad():
        want = run(12)
    checked, calls[:] = len(calls), []
    with torch.inference_mode():
        got = run(12)
    assert torch.equal(got, want)
    # as under no_grad: as the host table is built (once or twice), once at the first step() (12 more if every step
    # re-checked)
    assert checked <= 3 and len(calls) == checked, f"{name}: {len(calls)} table checks for 12 steps, {checked} eagerly"
