"""Leftovers 16b: the ``noise_sampler(sigma, sigma_next)`` arguments on a tensor schedule's device and dtype
(k-diffusion's ``sigmas[i]``, ``sigmas[i + 1]``: views, with no host sync; a computed sigma rounded once),
``sample_dpm_fast``'s (callback too: x's device, the default dtype, whatever its limits), and the CLI bounds of
``sample --batch`` (and --batch x --steps), ``trajectory --n`` and ``demo --n x --steps``, refused before any work."""
import math

import numpy as np
import pytest
import torch

import diffkern
from diffkern import analytic, demo, sampler_compat, samplers, schedules
from diffkern.commands import (MAX_DEMO_POINT_STEPS, MAX_DEMO_POINTS, MAX_IMAGE_STEPS, MAX_SAMPLE_BATCH, MAX_STEPS,
                               MAX_TRAJECTORIES, check_product)
import _cuda_nosync
from test_cli_review import _one_error_line, _run

F64, F32 = torch.float64, torch.float32
REF = "reference"
GMM = analytic.GaussianMixture.demo_2d()
# float32 values, so the float64 list of the same floats is the same schedule exactly (bitwise the same samples)
SIG32 = schedules.karras(6, 0.05, 10.0).to(F32)
NOISY = sorted(set(sampler_compat.NOISE_SAMPLERS) - {"dpm_adaptive"})  # dpm_adaptive: see the report
F64_SLACK = 8 * torch.finfo(F64).eps  # a few float64 roundings of exp/log
R = 0.5  # dpmpp_sde's default r


def start(batch=5):
    return torch.randn(batch, 2, dtype=F64, generator=torch.Generator().manual_seed(3)).to(F32) * 10.0


def recorder():
    """A noise_sampler recording its arguments and returning noise that does not depend on them (so the samples of
    two schedules holding the same values must be bitwise the same)."""
    calls, gen = [], torch.Generator().manual_seed(11)

    def noise_sampler(sigma, sigma_next):
        calls.append((sigma, sigma_next))
        return torch.randn(5, 2, generator=gen, dtype=F64).to(F32)
    return calls, noise_sampler


def run(method, sigmas, **kw):
    calls, ns = recorder()
    out = diffkern.sample(GMM, start(), sigmas, method, backend=REF, noise_sampler=ns, **kw)
    return out, calls


def kd_calls(method: str, sig: list) -> list:
    """Textbook float64 oracle of where k-diffusion's (and ComfyUI's) sample_<method> calls its noise_sampler, with
    ``(value, index into sigmas or None)`` for each argument: (sigmas[i], sigmas[i + 1]) on every step to a sigma > 0
    at eta = 1 (res_multistep at its eta = 0 too), dpmpp_sde's two (sigma_fn(t), sigma_fn(s)) and (sigma_fn(t),
    sigma_fn(t_next)), dpm_fast one per group of its own log-linear grid between sigmas[0] and the last sigma > 0."""
    if method == "dpm_fast":
        nfe, top, low = len(sig) - 1, sig[0], sig[-1] or sig[-2]
        m = nfe // 3 + 1
        orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
        ts = [-math.log(top) + k * (math.log(top) - math.log(low)) / m for k in range(m + 1)]
        return [((math.exp(-ts[k]), None), (math.exp(-ts[k + 1]), None)) for k in range(len(orders))]
    calls = []
    for i in range(len(sig) - 1):
        if sig[i + 1] == 0:
            continue
        if method == "dpmpp_sde":  # t = -log sigma; s = t + r h; sigma_fn(s) = exp(-s)
            t, t_next = -math.log(sig[i]), -math.log(sig[i + 1])
            calls.append(((sig[i], i), (math.exp(-(t + R * (t_next - t))), None)))
        calls.append(((sig[i], i), (sig[i + 1], i + 1)))
    return calls


def close(got: torch.Tensor, truth: float, dtype=F32) -> bool:
    """One rounding to ``dtype`` (half an ulp) of a float64 value computed two ways (exp/log in diffkern's and this
    oracle's order: a few float64 ulps, F64_SLACK, apart)."""
    return abs(float(got) - truth) <= (torch.finfo(dtype).eps / 2 + F64_SLACK) * truth

#----------------------------------------------------------------------------
# 1. The noise_sampler's sigma and sigma_next.


@pytest.mark.parametrize("method", [m for m in NOISY if m != "dpm_fast"])  # dpm_fast: test_kdiff_callbacks18.py
def test_noise_sampler_sigmas_follow_a_float32_schedule(method):
    """Every sampler taking a noise_sampler: 0-d float32 CPU tensors; sigmas[i] / sigmas[i + 1] themselves (views)
    where k-diffusion passes them, else the float32 rounding of the float64 sigma it computes; the list path keeps
    its float64 CPU tensors; the samples are bitwise those of the list path (same values, same noise)."""
    out32, ours = run(method, SIG32)
    out64, listed = run(method, SIG32.tolist())
    assert torch.equal(out32, out64)
    truth = kd_calls(method, SIG32.tolist())
    assert len(ours) == len(listed) == len(truth) > 0
    for pair, pair64, kd in zip(ours, listed, truth):
        for got, got64, (value, j) in zip(pair, pair64, kd):
            assert isinstance(got, torch.Tensor) and got.dim() == 0 and got.dtype == F32 and got.device.type == "cpu"
            assert got64.dim() == 0 and got64.dtype == F64 and got64.device.type == "cpu"
            assert torch.equal(got, got64.to(F32))
            assert abs(float(got64) - value) <= F64_SLACK * value, (float(got64), value)
            if j is None:
                assert close(got, value), (float(got), value)
            else:
                assert float(got64) == value and got.data_ptr() == SIG32[j].data_ptr(), "k-diffusion's sigmas[j]"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, F64])
def test_noise_sampler_sigmas_in_the_schedules_dtype(dtype):
    """float16, bfloat16, float64 schedules: the arguments in that dtype; dpmpp_sde's midpoint rounded once to it."""
    sig = SIG32.to(dtype)
    host = sig.tolist()
    _, ours = run("dpmpp_sde", sig)
    truth = kd_calls("dpmpp_sde", host)
    assert len(ours) == len(truth)
    for pair, kd in zip(ours, truth):
        for got, (value, j) in zip(pair, kd):
            assert got.dtype == dtype and got.dim() == 0
            if j is None:
                assert close(got, value, dtype), (float(got), value)
            else:
                assert got.data_ptr() == sig[j].data_ptr()


def test_noise_sampler_sigmas_of_awkward_schedules():
    """A non-contiguous float32 view is indexed as given; a schedule requiring grad is passed detached; an integer
    tensor, a numpy array and a list keep the float64 CPU tensors (fresh at each call)."""
    long = schedules.karras(12, 0.05, 10.0).to(F32)
    strided = long[::2]
    assert not strided.is_contiguous()
    _, ours = run("euler_ancestral", strided)
    for i, (s, sn) in enumerate(ours):
        assert s.data_ptr() == strided[i].data_ptr() and sn.data_ptr() == strided[i + 1].data_ptr()
        assert torch.equal(s, long[2 * i])
    grad = SIG32.clone().requires_grad_(True)
    _, ours = run("euler_ancestral", grad)
    assert all(not s.requires_grad and not sn.requires_grad for s, sn in ours)
    for given in (torch.tensor([8, 4, 2, 1, 0]), np.array([8.0, 4.0, 2.0, 1.0, 0.0]), [8.0, 4.0, 2.0, 1.0, 0.0]):
        _, seen = run("euler_ancestral", given)
        assert [(float(s), float(sn)) for s, sn in seen] == [(8.0, 4.0), (4.0, 2.0), (2.0, 1.0)]
        assert all(s.dtype == sn.dtype == F64 and s.device.type == "cpu" for s, sn in seen)
        assert len({id(t) for pair in seen for t in pair}) == 2 * len(seen)


def test_noise_sampler_sigmas_of_a_window_and_the_direct_sampler():
    """A window moves the noise counters, not the steps: the same views, from the k-diffusion-style function too;
    each call gets its own tensors (two views of one element are two tensors)."""
    calls, ns = recorder()
    samplers.sample_dpmpp_sde(GMM, start(), SIG32, disable=True, backend=REF, noise_sampler=ns, window=(1, 9))
    truth = kd_calls("dpmpp_sde", SIG32.tolist())
    assert len(calls) == len(truth)
    for (s, sn), ((_, i), (value, j)) in zip(calls, truth):
        assert s.data_ptr() == SIG32[i].data_ptr()
        assert sn.data_ptr() == SIG32[j].data_ptr() if j is not None else close(sn, value)
    assert len({id(t) for pair in calls for t in pair}) == 2 * len(calls)


def test_noise_sigmas_helper():
    """Non-floating schedules: the calls as they are; a floating one: views, and one table only when a value is not
    the schedule's own (then in its dtype); draw still takes two floats (float64 CPU tensors: dpm_adaptive's)."""
    host = SIG32.tolist()
    calls = {(0, True): (host[0], host[1]), (1, False): (host[1], host[2])}
    assert sampler_compat.noise_sigmas(host, host, calls) is calls
    assert sampler_compat.noise_sigmas(torch.tensor([3, 2, 1]), host, calls) is calls
    pairs = sampler_compat.noise_sigmas(SIG32, host, calls)
    assert [tuple(t.data_ptr() for t in pairs[k]) for k in calls] == [(SIG32[0].data_ptr(), SIG32[1].data_ptr()),
                                                                      (SIG32[1].data_ptr(), SIG32[2].data_ptr())]
    mid = host[0] * 0.75
    pairs = sampler_compat.noise_sigmas(SIG32.to(torch.float16), host, {(0, True): (host[0], mid)})
    s, m = pairs[(0, True)]
    assert s.dtype == m.dtype == torch.float16 and float(m) == float(torch.tensor(mid, dtype=F64).half())
    seen = []
    x = start()
    sampler_compat.draw(lambda a, b: seen.append((a, b)) or torch.zeros_like(x), (2.0, 1.0), x)
    assert [(a.dtype, b.dtype, float(a), float(b)) for a, b in seen] == [(F64, F64, 2.0, 1.0)]

#----------------------------------------------------------------------------
# 2. sample_dpm_fast with tensor sigma_min / sigma_max.


def dpm_fast(sigma_min, sigma_max, n=7, eta=1.0):
    calls, ns = recorder()
    seen = []
    out = samplers.sample_dpm_fast(GMM, start(), sigma_min, sigma_max, n, callback=lambda d: seen.append(
        (d["sigma"], d["sigma_hat"])), disable=True, eta=eta, noise_sampler=ns, backend=REF)
    return out, seen, calls


@pytest.mark.parametrize("shape", [(), (1,)])
def test_dpm_fast_tensor_range_reports_in_the_default_dtype(shape):
    """float32 tensors (0-d or one element) and the same two numbers: the callback's and noise_sampler's sigmas are
    0-d tensors on x's device in the default dtype (k-diffusion's linspace grid), bitwise the same both ways, within
    one float32 rounding of the textbook grid; the samples bitwise the same (the same two values)."""
    lo, hi = torch.tensor(0.05, dtype=F32).reshape(shape), torch.tensor(10.0, dtype=F32).reshape(shape)
    out32, seen, calls = dpm_fast(lo, hi)
    out64, seen64, calls64 = dpm_fast(float(lo), float(hi))
    assert torch.equal(out32, out64)
    assert len(seen) == len(seen64) == 3 and len(calls) == len(calls64) == 3  # once per grid step
    for got, got64 in zip([t for p in seen + calls for t in p], [t for p in seen64 + calls64 for t in p]):
        assert got.dim() == got64.dim() == 0 and got.dtype == got64.dtype == F32 and got.device.type == "cpu"
        assert torch.equal(got, got64)
    truth = kd_calls("dpm_fast", [float(hi)] + [0.0] * 6 + [float(lo)])
    for (s, sn), ((v, _), (vn, _)) in zip(calls, truth):
        assert close(s, v) and close(sn, vn)
    assert float(seen[0][0]) == float(hi), "the first call runs at sigma_max itself"


def test_dpm_fast_mixed_range_reports_in_the_default_dtype():
    """float16, bfloat16, float64 and integer tensors among the limits: still the default dtype (k-diffusion's
    linspace takes no dtype from its limits)."""
    for lo, hi in ((0.05, torch.tensor(10.0, dtype=torch.float16)), (torch.tensor(0.05, dtype=torch.bfloat16), 10.0),
                   (torch.tensor(0.05, dtype=F64), torch.tensor(10.0, dtype=F64)), (0.05, torch.tensor(10))):
        _, seen, calls = dpm_fast(lo, hi)
        assert all(t.dtype == F32 and t.device.type == "cpu" and t.dim() == 0 for p in seen + calls for t in p)

#----------------------------------------------------------------------------
# 3. On the GPU: no host sync from the first noise_sampler call on.


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["euler_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "dpm_fast", "er_sde"])
def test_noise_sampler_sigmas_on_cuda_make_no_host_sync(method):
    sig, x = _cuda_nosync.on_cuda(SIG32, start())
    seen = []

    def noise_sampler(sigma, sigma_next):
        _cuda_nosync.forbid_syncs()
        seen.append((sigma, sigma_next))
        return torch.randn_like(x)
    with _cuda_nosync.syncs_restored():
        diffkern.sample(_cuda_nosync.model, x, sig, method, noise_sampler=noise_sampler)
    # restored between the calls: sample_dpm_fast reads its tensor limits on the host before its loop
    with _cuda_nosync.syncs_restored():
        samplers.sample_dpm_fast(_cuda_nosync.model, x, sig[-2], sig[0], 6, disable=True, eta=1.0,
                                 noise_sampler=noise_sampler, callback=lambda d: seen.append((d["sigma"],
                                                                                              d["sigma_hat"])))
    assert seen and all(t.device == sig.device and t.dtype == F32 for p in seen for t in p)

#----------------------------------------------------------------------------
# 4. CLI: sample --batch (and x --steps), trajectory --n, demo --n x --steps: bounded, inclusive, before any work.


def _boom(*args, **kwargs):
    raise AssertionError("work started before the arguments were checked")


def _stop(got):
    def fake(*args, **kw):
        got.append((args, kw))
        raise RuntimeError("stop here")
    return fake


@pytest.mark.parametrize("batch,steps,message", [
    (MAX_SAMPLE_BATCH + 1, 1, f"--batch: expected an integer in [1, {MAX_SAMPLE_BATCH}], got {MAX_SAMPLE_BATCH + 1}"),
    (10 ** 9, 20, "--batch: expected an integer in [1, "),
    (0, 20, f"--batch: expected an integer in [1, {MAX_SAMPLE_BATCH}], got 0"),
    (MAX_SAMPLE_BATCH, 245, f"--batch x --steps: {MAX_SAMPLE_BATCH} x 245 = {MAX_SAMPLE_BATCH * 245} image-steps, "
                            f"over the {MAX_IMAGE_STEPS} allowed; use fewer --batch or --steps"),
    (101, MAX_STEPS, "--batch x --steps: 101 x 10000 = 1010000 image-steps"),
])
def test_sample_batch_bounded_before_any_work(tmp_path, capsys, monkeypatch, batch, steps, message):
    from diffkern.models import builtin
    monkeypatch.setattr(builtin, "generate", _boom)
    monkeypatch.setattr(builtin, "load_builtin", _boom)
    out = tmp_path / "g.png"
    rc, stdout, err = _run(["sample", "--batch", str(batch), "--steps", str(steps), "--out", str(out),
                            "--no-progress", "--device", "cpu"], capsys)
    assert rc == 2 and stdout == ""
    _one_error_line(err, "sample", message)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("batch,steps", [(MAX_SAMPLE_BATCH, MAX_IMAGE_STEPS // MAX_SAMPLE_BATCH), (64, MAX_STEPS),
                                         (100, MAX_STEPS)])
def test_sample_bounds_are_inclusive(tmp_path, capsys, monkeypatch, batch, steps):
    from diffkern.models import builtin
    got = []
    monkeypatch.setattr(builtin, "generate", _stop(got))
    rc, _, err = _run(["sample", "--batch", str(batch), "--steps", str(steps), "--out", str(tmp_path / "g.png"),
                       "--no-progress", "--device", "cpu"], capsys)
    assert rc == 2 and "stop here" in err and got[0][0][1] == batch and got[0][0][3] == steps


@pytest.mark.parametrize("n,reached", [(MAX_TRAJECTORIES + 1, False), (10 ** 9, False), (MAX_TRAJECTORIES, True)])
def test_trajectory_n_bounded_before_any_work(tmp_path, capsys, monkeypatch, n, reached):
    from diffkern.commands import trajectory
    got = []
    monkeypatch.setattr(trajectory, "trajectories", _stop(got))
    monkeypatch.setattr(trajectory, "plot", _boom)
    out = tmp_path / "t.png"
    rc, stdout, err = _run(["trajectory", "--n", str(n), "--out", str(out)], capsys)
    assert rc == 2 and stdout == "" and not out.exists()
    if reached:
        assert got[0][0][2] == n and "stop here" in err
    else:
        assert got == []
        _one_error_line(err, "trajectory", f"--n: expected an integer in [1, {MAX_TRAJECTORIES}], got {n}")


@pytest.mark.parametrize("n,steps,reached", [
    (MAX_DEMO_POINTS, MAX_DEMO_POINT_STEPS // MAX_DEMO_POINTS, True),
    (MAX_DEMO_POINTS, MAX_DEMO_POINT_STEPS // MAX_DEMO_POINTS + 1, False),
    (4000, MAX_STEPS, True),
    (MAX_DEMO_POINTS, MAX_STEPS, False),
])
def test_demo_points_times_steps_bounded_before_any_work(tmp_path, capsys, monkeypatch, n, steps, reached):
    got = []
    monkeypatch.setattr(demo, "sample_demo", _stop(got))
    monkeypatch.setattr(demo, "plot", _boom)
    out = tmp_path / "d.png"
    rc, stdout, err = _run(["demo", "--n", str(n), "--steps", str(steps), "--out", str(out)], capsys)
    assert rc == 2 and stdout == "" and not out.exists()
    if reached:
        assert got[0][1]["n"] == n and got[0][1]["steps"] == steps and "stop here" in err
    else:
        assert got == []
        _one_error_line(err, "demo", f"--n x --steps: {n} x {steps} = {n * steps} point-steps, over the "
                                     f"{MAX_DEMO_POINT_STEPS} allowed; use fewer --n or --steps")


def test_bounds_admit_the_defaults_at_the_other_flags_most():
    """Each product bound admits every flag's default times the other's bound (no real use is refused)."""
    assert 64 * MAX_STEPS <= MAX_IMAGE_STEPS and MAX_SAMPLE_BATCH * 20 <= MAX_IMAGE_STEPS
    assert 4000 * MAX_STEPS <= MAX_DEMO_POINT_STEPS and MAX_DEMO_POINTS * 20 <= MAX_DEMO_POINT_STEPS
    assert MAX_SAMPLE_BATCH >= 64 * 64 and MAX_TRAJECTORIES >= 64 * 16
    check_product({"--a": 3, "--b": 4}, 12, "things")
    with pytest.raises(ValueError, match=r"^--a x --b: 3 x 5 = 15 things, over the 12 allowed; use fewer --a or --b$"):
        check_product({"--a": 3, "--b": 5}, 12, "things")
