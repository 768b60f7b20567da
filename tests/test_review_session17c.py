"""Review of the changes after addc64d (session 17c): HOLD's far x0 weights (``HOLD._x0_far``, ``_ext_law``),
chol_psd out of place, dpm_adaptive's StallWatch and Level-1 Euler stepping before ``set_timesteps``.

Oracles: the extended path (``diffkern.hold_mp.Law``, correctly rounded) for the weights and, through central
differences of it, for their t-derivative; k-diffusion's controller as a plain map (the PID of the published loop
with the error a given function of h) and the loop itself with the watch disabled, for StallWatch; diffusers 0.42.1's
classes side by side, for the schedulers.
"""
import contextlib
import copy
import math
import pickle
import random
import threading
import warnings

import pytest
import torch

import diffkern.coef_tables_dpm_adaptive as cda
from diffkern.hold import HOLD
from diffkern.samplers_adaptive import sample_dpm_adaptive
from test_kdiff_adaptive import SEED, gmm, kdiff_adaptive, start

F64 = torch.float64

# ---------------------------------------------------------------------------------------------------------------------
# HOLD x0 weights past r b = 8


def _far_t(proc, rb):
    """The forward time t with r b(t) = rb (constant beta)."""
    return rb / (proc.r * proc.beta0)


@pytest.mark.parametrize("n", (3, 6))
def test_far_weights_any_batch_shape_are_the_scalar_calls(n):
    """0-d, (2, 3), (0,), (2, 0) times mixing entries either side of r b = 8 and a NaN: each entry is what a scalar
    call gives (far ones the extended path's, bitwise; near ones float64's), a NaN stays NaN alone."""
    proc = HOLD(n)
    ts = [_far_t(proc, rb) for rb in (0.5, 7.9, 8.5, 12.0, 20.0, 3.0)]
    grid = torch.tensor(ts, dtype=F64).reshape(2, 3)
    w_z, w_e = proc.x0_coefficients(grid)
    assert w_z.shape == (2, 3, n) and w_e.shape == (2, 3)
    for k, (t, rb) in enumerate(zip(ts, (0.5, 7.9, 8.5, 12.0, 20.0, 3.0))):
        s_z, s_e = proc.x0_coefficients(t)
        if rb > 8:  # the extended path's constants: bitwise
            assert torch.equal(w_z.reshape(6, n)[k], s_z) and torch.equal(w_e.reshape(6)[k], s_e)
        else:  # float64 linear algebra, batched vs one matrix: rounding of the same formula (~1e-15 relative)
            torch.testing.assert_close(w_z.reshape(6, n)[k], s_z, rtol=1e-13, atol=0)
            torch.testing.assert_close(w_e.reshape(6)[k], s_e, rtol=1e-13, atol=0)
    zero_d = proc.x0_coefficients(torch.tensor(ts[3], dtype=F64))
    assert zero_d[0].shape == (n,) and zero_d[1].shape == () and torch.equal(zero_d[0], w_z[1, 0])
    law = proc._ext_law()
    b_far = torch.tensor([ts[2], ts[3], ts[4]], dtype=F64) * proc.beta0
    assert torch.equal(w_z.reshape(6, n)[2:5], law.batch(b_far, "w_z"))
    for shape in ((0,), (2, 0)):
        e_z, e_e = proc.x0_coefficients(torch.empty(shape, dtype=F64))
        assert e_z.shape == shape + (n,) and e_e.shape == shape
    m_z, m_e = proc.x0_coefficients(torch.tensor([math.nan, ts[3]], dtype=F64))
    assert m_z[0].isnan().all() and m_e[0].isnan() and torch.equal(m_z[1], w_z[1, 0])


def test_far_weights_autograd_under_grad_and_no_grad():
    """A t with history keeps float64 (differentiable: d w / dt matches central differences of the correctly
    rounded weights); under no_grad the same t takes the extended values, without history."""
    proc = HOLD(6)
    t0 = _far_t(proc, 10.0)
    t = torch.tensor([t0, _far_t(proc, 2.0)], dtype=F64, requires_grad=True)
    w_z, w_e = proc.x0_coefficients(t)
    assert w_z.grad_fn is not None
    grad_z = torch.autograd.grad(w_z[0].sum(), t, retain_graph=True)[0][0]
    grad_e = torch.autograd.grad(w_e[0], t)[0][0]
    h = 1e-5 * t0
    hi, lo = proc.x0_coefficients(t0 + h), proc.x0_coefficients(t0 - h)
    fd_z, fd_e = float((hi[0] - lo[0]).sum()) / (2 * h), float(hi[1] - lo[1]) / (2 * h)
    # central differences: truncation ~ (h/t)^2 ~ 1e-10, rounding ~ 1e-15 * |w| / 1e-5: 1e-7 relative covers both
    assert grad_z.item() == pytest.approx(fd_z, rel=1e-7)
    assert grad_e.item() == pytest.approx(fd_e, rel=1e-7)
    with torch.no_grad():
        n_z, n_e = proc.x0_coefficients(t)
    d_z, d_e = proc.x0_coefficients(t.detach())
    assert n_z.grad_fn is None and torch.equal(n_z, d_z) and torch.equal(n_e, d_e)
    # float64 vs correctly rounded at r b = 10: within the documented 4e-13 (r b = 16) bound
    torch.testing.assert_close(w_z.detach(), d_z, rtol=4e-13, atol=0)


def test_device_times_are_not_read_meta():
    """A non-CPU t (meta: reading it raises) takes the float64 path without a read."""
    proc = HOLD(6)
    t = torch.tensor([_far_t(proc, 10.0), 0.3], dtype=F64, device="meta")
    w_z, w_e = proc.x0_coefficients(t)
    assert w_z.device.type == "meta" and w_z.shape == (2, 6) and w_e.shape == (2,)


def test_pickle_copy_and_threads_build_the_same_law():
    """The lazily built Law (``_rate_arg``) survives pickling and deepcopy before and after it is built; four threads
    building it at once get the same weights."""
    ts = None
    for rate in (None, 2.5):
        proc = HOLD(6, rate=rate)
        ts = torch.tensor([_far_t(proc, 9.0), _far_t(proc, 25.0)], dtype=F64)
        fresh = [pickle.loads(pickle.dumps(proc)), copy.deepcopy(proc)]
        want = proc.x0_coefficients(ts)
        built = [pickle.loads(pickle.dumps(proc)), copy.deepcopy(proc)]
        for other in fresh + built:
            got = other.x0_coefficients(ts)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    proc, outs = HOLD(6), []
    threads = [threading.Thread(target=lambda: outs.append(proc.x0_coefficients(ts)[0])) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(outs) == 4 and all(torch.equal(o, outs[0]) for o in outs)


# ---------------------------------------------------------------------------------------------------------------------
# StallWatch: no false positives


def _controller_run(accept_safety, icoeff, pcoeff, k, order, C, h0, wiggle, freq, limit=2000):
    """k-diffusion's PID on rejections from a fixed state: error = C |h|^k (1 + wiggle sin(freq ln|h|)). Returns the
    longest run without progress (StallWatch's count) before the first acceptance, or None without one."""
    pid = cda.PID(h0, pcoeff, icoeff, 0.0, order, accept_safety)
    pid.propose(0.3)  # a first accepted attempt sets the history
    pid.h = h0
    watch, idle = cda.StallWatch(accept_safety, limit=10 ** 9), 0
    for _ in range(limit):
        h = pid.h
        if pid.propose(C * abs(h) ** k * (1 + wiggle * math.sin(freq * math.log(abs(h))))):
            return idle
        watch.rejected(h, pid.h, pid.factor)
        idle = max(idle, watch.idle)
    return None


def test_controller_map_runs_that_accept_never_look_stalled():
    """Random gains (sums up to 6: chaotic h maps), error laws (monotone or not) and accept_safety in (1, 1.5):
    every rejection run that k-diffusion's controller ends has far fewer than STALL_LIMIT idle rejections."""
    rng = random.Random(17)
    ended = 0
    for _ in range(1500):
        idle = _controller_run(1 + 10 ** rng.uniform(-4, -0.3), rng.uniform(0.2, 6), rng.uniform(0, 2),
                               rng.choice((1.5, 2, 3)), rng.choice((1.5, 2, 3)), 10 ** rng.uniform(-2, 4),
                               10 ** rng.uniform(-3, 0.5), rng.choice((0.0, rng.uniform(0, 0.99))),
                               rng.uniform(1, 30))
        if idle is not None:
            ended += 1
            assert idle < cda.STALL_LIMIT // 2
    assert ended > 500


class _NoWatch(cda.StallWatch):
    def __init__(self, accept_safety, limit=10 ** 9):
        super().__init__(accept_safety, limit)


class _Budget(Exception):
    pass


def _budgeted(calls):
    model, seen = gmm(), [0]

    def call(x, sigma):
        seen[0] += 1
        if seen[0] > calls:
            raise _Budget
        return model(x, sigma)
    return call


CASES = [({"accept_safety": 1.0001}, F64, (0.02, 12.0)),
         ({"accept_safety": 1.0001, "icoeff": 2.5}, F64, (0.02, 12.0)),
         ({"accept_safety": 1.001, "eta": 0.5, "icoeff": 2.0, "pcoeff": 0.5}, F64, (0.02, 12.0)),
         ({"accept_safety": 1.01, "icoeff": 2.5}, torch.float32, (0.02, 12.0)),
         ({"accept_safety": 1.05, "icoeff": 2.5, "rtol": 0.2}, torch.float16, (0.02, 12.0)),
         ({"accept_safety": 1.001, "icoeff": 2.5}, F64, (8.0, 0.1)),
         ({"accept_safety": 1.2, "order": 2, "icoeff": 3.0}, torch.float32, (8.0, 0.1))]


@pytest.mark.parametrize("kw, dtype, limits", CASES, ids=[f"{k}-{d}-{l}" for k, d, l in CASES])
def test_watch_raises_only_where_the_loop_would_not_end(monkeypatch, kw, dtype, limits):
    """Each case with the watch and without it (a model-call budget stopping the latter): the watch raises only
    where the loop without it is still running at the budget; where it ends, both end alike (in float64 also as
    k-diffusion's loop)."""
    x = start(sigma=0.5 if limits[0] > limits[1] else 10.0, dtype=dtype)
    run = dict(disable=True, return_info=True, seed=SEED, **kw)
    try:
        got, info = sample_dpm_adaptive(_budgeted(10 ** 6), x, *limits, **run)
    except RuntimeError as e:
        assert "stalled the step-size controller" in str(e)
        got = None
    monkeypatch.setattr(cda, "StallWatch", _NoWatch)
    try:
        free, free_info = sample_dpm_adaptive(_budgeted(6000), x, *limits, **run)
    except _Budget:
        assert got is None, f"{kw}: the loop without the watch runs on, yet it ended"
        return
    assert got is not None, f"{kw} {dtype}: the watch raised in a run that ends ({free_info})"
    assert info == free_info and torch.equal(got, free)
    if dtype == F64 and not kw.get("eta"):
        want, want_info, _ = kdiff_adaptive(gmm(), x, *limits, **kw)
        assert want_info == info


# ---------------------------------------------------------------------------------------------------------------------
# Euler family before set_timesteps, beyond test_parity17c's


diffusers = pytest.importorskip("diffusers")
import diffkern.diffusers as dd  # noqa: E402

EULERS = ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "EDMEulerScheduler"]


@pytest.mark.parametrize("name", EULERS)
def test_begin_index_then_set_timesteps_and_add_noise_after_a_step(name):
    """set_begin_index before set_timesteps starts the loop there (step_index as diffusers); a later set_timesteps
    clears step_index and begin_index, as diffusers; add_noise after a step without set_begin_index looks each
    timestep up in the __init__ schedule, as diffusers. Values: the project rule, against stock run in float64
    (truth) with stock float32 as the baseline."""
    from diffkern.testing import assert_matches_reference
    from test_diffusers_schedulers import diffusers_float64
    from test_level1_parity17 import _module, _three

    x = torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    m = torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    scheds = list(_three(name, {"num_train_timesteps": 40}))  # truth (stock in float64), stock float32, ours
    outs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k, s in enumerate(scheds):
            s.set_begin_index(5)
            xs, ms = (x, m) if k == 0 else (x.float(), m.float())
            with diffusers_float64(_module(name)) if k == 0 else contextlib.nullcontext():
                outs.append(s.step(ms, s.timesteps[5], xs, generator=torch.Generator().manual_seed(3)).prev_sample)
    assert scheds[0].step_index == scheds[2].step_index == 6
    assert_matches_reference(outs[2], outs[0], outs[1], f"{name} step from begin index 5")
    for s in scheds:
        s.set_timesteps(4)
    assert scheds[1].step_index is scheds[2].step_index is None and scheds[1].begin_index is scheds[2].begin_index \
        is None
    scheds = list(_three(name, {"num_train_timesteps": 40}))
    noised = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k, s in enumerate(scheds):
            xs, ms = (x, m) if k == 0 else (x.float(), m.float())
            with diffusers_float64(_module(name)) if k == 0 else contextlib.nullcontext():
                s.step(ms, s.timesteps[2], xs, generator=torch.Generator().manual_seed(3))
                noised.append(s.add_noise(xs, ms, s.timesteps[[7, 30]]))
    assert_matches_reference(noised[2], noised[0], noised[1], f"{name} add_noise after a step")
