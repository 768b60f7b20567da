"""dpm_fast (k-diffusion's ``sample_dpm_fast``: DPM-Solver, noise prediction, n model calls on steps of orders 3, ..., 3
then 2 or 1, equal in t = -ln sigma) against k-diffusion's ``DPMSolver.dpm_solver_fast`` written below in float64.

The loop is driven by the exact denoiser of a Gaussian mixture and, for eta > 0, fed diffkern's Philox draws: a step's
noise is the stream of the row of its last model call. diffkern must match the float64 loop to the float64 floor and
obey the project's tolerance rule in float32 on every CPU backend. The schedule form ("dpm_fast" in
:func:`diffkern.sample`) is ComfyUI's mapping: sigma_max = sigmas[0], sigma_min = the last non-zero sigma, n = N.
"""
import math

import pytest
import torch

from diffkern import analytic, coef_tables_dpm_fast as cdf, samplers, schedules
from diffkern.ops import philox
from diffkern.sampling import knobs, sample
from diffkern.testing import assert_matches_reference
from sampler_checks import AWKWARD, AWKWARD_IDS, ancestral_step, check_awkward_shape, check_backend

F64 = torch.float64
REF = "reference"
SEED = 17


def gmm(dim=2, seed=4):
    gen = torch.Generator().manual_seed(seed)
    return analytic.GaussianMixture([1.0, 2.0, 0.7], torch.randn(3, dim, generator=gen, dtype=F64), [0.6, 0.8, 0.3])


def start(shape=(6, 2), sigma=10.0, seed=3):
    return torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(seed)) * sigma


def kdiff_dpm_fast(model, x, sigma_min, sigma_max, n, eta=0.0, s_noise=1.0, seed=SEED):
    """k-diffusion's ``sample_dpm_fast`` (``DPMSolver.dpm_solver_fast`` and its ``dpm_solver_{1,2,3}_step``) as
    published, in Python floats for t; ``randn`` replaced by the Philox draw of the step's last call's row."""
    sigma_fn = lambda t: math.exp(-t)  # noqa: E731
    t_fn = lambda s: -math.log(s) if s > 0 else math.inf  # noqa: E731
    calls = []

    def eps(x, t):
        calls.append(sigma_fn(t))
        return (x - model(x, torch.full((x.shape[0],), sigma_fn(t), dtype=x.dtype))) / sigma_fn(t)

    t_start, t_end = t_fn(sigma_max), t_fn(sigma_min)
    m = math.floor(n / 3) + 1
    ts = torch.linspace(t_start, t_end, m + 1, dtype=F64).tolist()
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        if eta:
            sd, su = ancestral_step(sigma_fn(t), sigma_fn(t_next), eta)
            t_next_ = min(t_end, t_fn(sd))
            su = (sigma_fn(t_next) ** 2 - sigma_fn(t_next_) ** 2) ** 0.5
        else:
            t_next_, su = t_next, 0.0
        h = t_next_ - t
        e0 = eps(x, t)
        if order == 1:
            x = x - sigma_fn(t_next_) * math.expm1(h) * e0
        elif order == 2:
            r1 = 1 / 2
            s1 = t + r1 * h
            u1 = x - sigma_fn(s1) * math.expm1(r1 * h) * e0
            e1 = eps(u1, s1)
            x = x - sigma_fn(t_next_) * math.expm1(h) * e0 - sigma_fn(t_next_) / (2 * r1) * math.expm1(h) * (e1 - e0)
        else:
            r1, r2 = 1 / 3, 2 / 3
            s1, s2 = t + r1 * h, t + r2 * h
            u1 = x - sigma_fn(s1) * math.expm1(r1 * h) * e0
            e1 = eps(u1, s1)
            u2 = (x - sigma_fn(s2) * math.expm1(r2 * h) * e0
                  - sigma_fn(s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (e1 - e0))
            e2 = eps(u2, s2)
            x = (x - sigma_fn(t_next_) * math.expm1(h) * e0
                 - sigma_fn(t_next_) / r2 * (math.expm1(h) / h - 1) * (e2 - e0))
        xi = philox.noise_like(x, torch.tensor([seed]), len(calls) - 1, F64).to(x.dtype)
        x = x + su * s_noise * xi
    assert len(calls) == n
    return x, calls


def test_orders_are_kdiffusions():
    for n in range(1, 14):
        m = n // 3 + 1
        want = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
        assert cdf.orders(n) == want and sum(want) == n and len(want) == m


CASES = [{}, {"eta": 0.5, "s_noise": 0.8}, {"eta": 1.0}, {"eta": 2.5}]  # eta 2.5: sigma_down 0 on the big steps


@pytest.mark.parametrize("kw", CASES, ids=[str(c) for c in CASES])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 8, 10])
def test_is_kdiffusion_loop_in_float64(n, kw):
    x = start()
    for sig in (schedules.karras(n, 0.05, 10.0), schedules.karras(n + 1, 0.05, 10.0)[:-1]):
        lo = float(sig[-1]) if sig[-1] > 0 else float(sig[-2])
        if n == 1 and sig[-1] == 0:
            continue  # [sigma_max, 0]: no sigma_min below sigma_max (refused, test_bad_inputs)
        want, _ = kdiff_dpm_fast(gmm(), x, lo, float(sig[0]), n, **kw)
        got = sample(gmm(), x, sig, "dpm_fast", backend=REF, seed=SEED, **kw)
        assert_matches_reference(got, want, want, f"n={n} {kw}")


@pytest.mark.parametrize("kw", CASES[:2], ids=[str(c) for c in CASES[:2]])
def test_kdiffusion_signature(kw):
    x = start()
    want, _ = kdiff_dpm_fast(gmm(), x, 0.03, 14.6, 7, **kw)
    got = samplers.sample_dpm_fast(gmm(), x, 0.03, 14.6, 7, seed=SEED, backend=REF, **kw)
    assert_matches_reference(got, want, want, f"kdiffusion signature {kw}")
    # positional as k-diffusion's (extra_args, callback, disable, eta, s_noise), 0-d tensor sigmas as wrappers keep
    lo, hi = torch.tensor(0.03, dtype=F64), torch.tensor(14.6, dtype=F64)
    pos = samplers.sample_dpm_fast(gmm(), x, lo, hi, 7, None, None, True, kw.get("eta", 0.0), kw.get("s_noise", 1.0),
                                   seed=SEED, backend=REF)
    assert torch.equal(pos, got)
    # the schedule form on the grid it builds (its inner sigmas are not used)
    sig = cdf.grid(0.03, 14.6, 7)
    assert torch.equal(sample(gmm(), x, sig, "dpm_fast", backend=REF, seed=SEED, **kw), got)
    other = [14.6, 5.0, 2.0, 1.0, 0.5, 0.2, 0.03, 0.0]
    assert torch.equal(sample(gmm(), x, other, "dpm_fast", backend=REF, seed=SEED, **kw), got)


def test_knobs_and_seeds():
    assert knobs("dpm_fast") == {"eta": 0.0, "s_noise": 1.0}
    x, sig = start(), schedules.karras(6, 0.05, 10.0)
    assert torch.equal(sample(gmm(), x, sig, "dpm_fast", backend=REF, seed=1),
                       sample(gmm(), x, sig, "dpm_fast", backend=REF, seed=2))  # eta = 0: no noise
    a = sample(gmm(), x, sig, "dpm_fast", backend=REF, seed=1, eta=1.0)
    assert not torch.equal(a, sample(gmm(), x, sig, "dpm_fast", backend=REF, seed=2, eta=1.0))


@pytest.mark.parametrize("kw", [{}, {"eta": 0.7}], ids=["ode", "eta"])
def test_every_backend_matches_reference(cpu_backend, kw):
    check_backend(gmm(), start((5, 2)), schedules.karras(8, 0.05, 10.0), "dpm_fast", cpu_backend, seed=SEED, **kw)


@pytest.mark.parametrize("shape, contiguous", AWKWARD, ids=AWKWARD_IDS)
def test_awkward_shapes(cpu_backend, shape, contiguous):
    check_awkward_shape(lambda dim: gmm(dim, seed=9), shape, contiguous, schedules.karras(5, 0.05, 10.0), "dpm_fast",
                        cpu_backend, seed=SEED, eta=0.6)


def test_callback_once_per_grid_step_and_trajectory_each_call():
    """The callback as k-diffusion's (once per step of its grid, at the step's first call: tests/
    test_kdiff_callbacks18.py); the model calls and the trajectory: one per call."""
    n, kw, seen, called = 8, {"eta": 1.0}, [], []
    model = gmm()

    def spy(x, sigma):
        called.append(float(sigma[0]))
        return model(x, sigma)

    sig = schedules.karras(n, 0.05, 10.0)
    _, calls = kdiff_dpm_fast(model, start(), float(sig[-2]), float(sig[0]), n, **kw)
    sample(spy, start(), sig, "dpm_fast", backend=REF, seed=SEED, callback=seen.append, **kw)
    firsts = [0, 3, 6]  # orders [3, 3, 2]: each step's first call
    assert len(seen) == 3 and [d["i"] for d in seen] == [0, 1, 2]
    half_ulp = torch.finfo(torch.get_default_dtype()).eps / 2
    for d, k in zip(seen, firsts):
        assert abs(float(d["sigma"]) - calls[k]) <= half_ulp * calls[k]
    assert all(d["sigma"] == d["sigma_hat"] for d in seen)
    torch.testing.assert_close(torch.tensor(called, dtype=F64), torch.tensor(calls, dtype=F64), rtol=1e-13, atol=0)
    out, traj = sample(model, start(), sig, "dpm_fast", backend=REF, seed=SEED, record=True, **kw)
    assert traj["x"].shape == (n + 1, 6, 2) and traj["denoised"].shape == (n, 6, 2)
    assert torch.equal(traj["x"][-1], out)


def test_plan_structure():
    plan = cdf.dpm_fast(0.1, 10.0, 7)  # orders [3, 3, 1]
    assert plan.steps == 7 and plan.history == 2 and plan.table.shape[0] == 7
    assert cdf.dpm_fast(0.1, 10.0, 2).history == 1 and cdf.dpm_fast(0.1, 10.0, 1).history == 0
    # the calls of a step decrease; a new step starts at the next grid sigma
    grid = cdf.grid(0.1, 10.0, 3)
    assert plan.row_sigma[0] == grid[0] and plan.row_sigma[3] == grid[1] and plan.row_sigma[6] == grid[2]
    assert plan.row_sigma == sorted(plan.row_sigma, reverse=True)


def test_convergence_order():
    """Steps of order 3 then a last one of order 2 (n = 3m + 2): order 3 (measured slopes, 17 -> 33 -> 65 steps
    against 513: 3.07, 3.02); a last step of order 1 (n = 3m) costs one order (2.06, 2.04)."""
    model = gmm(5, seed=11)
    x = start((16, 5), seed=3)

    def run(n):
        return samplers.sample_dpm_fast(model, x, 0.1, 10.0, n, backend=REF)

    fine = run(3 * 512 + 2)
    for rest, lo, hi in ((2, 2.7, 3.5), (0, 1.8, 2.4)):
        ms = (16, 32, 64)
        errs = [float((run(3 * m + rest) - fine).abs().max()) for m in ms]
        slopes = [math.log(a / b) / math.log((m2 + 1) / (m1 + 1)) for a, b, m1, m2 in zip(errs, errs[1:], ms, ms[1:])]
        assert all(lo < s < hi for s in slopes), (rest, errs, slopes)


@pytest.mark.parametrize("kw, err, match", [
    ({"n": 0}, ValueError, "n: expected an int >= 1"), ({"n": -2}, ValueError, "n: expected an int >= 1"),
    ({"n": 3.0}, ValueError, "n: expected an int >= 1"), ({"n": True}, ValueError, "n: expected an int >= 1"),
    ({"sigma_min": 5.0, "sigma_max": 5.0}, ValueError, "sigma_min: expected a value below sigma_max"),
    ({"sigma_min": 6.0}, ValueError, "sigma_min: expected a value below sigma_max"),
    ({"sigma_min": 0.0}, ValueError, "sigma_min: expected a finite number > 0"),
    ({"sigma_max": math.inf}, ValueError, "sigma_max: expected a finite number > 0"),
    ({"eta": -0.1}, ValueError, "eta: expected"), ({"s_noise": -1.0}, ValueError, "s_noise: expected"),
    ({"eta": torch.tensor(0.5)}, TypeError, "eta: expected a number"),
])
def test_bad_inputs_name_the_argument(kw, err, match):
    args = {"sigma_min": 0.1, "sigma_max": 5.0, "n": 4, **kw}
    with pytest.raises(err, match=match):
        samplers.sample_dpm_fast(gmm(), start(), backend=REF, **args)


def test_bad_schedule_names_sigmas():
    with pytest.raises(ValueError, match="sigmas: dpm_fast runs from sigmas"):
        sample(gmm(), start(), [5.0, 0.0], "dpm_fast", backend=REF)
    with pytest.raises(ValueError, match="eta: expected"):
        sample(gmm(), start(), [5.0, 1.0, 0.0], "dpm_fast", backend=REF, eta=-1.0)
