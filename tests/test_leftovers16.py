"""Leftovers 16: the callback's ``sigma``/``sigma_hat`` on a tensor schedule's device and dtype (k-diffusion's
``sigmas[i]``, a view, with no host sync); ``trajectory --method dpm_adaptive`` and ``host_plan("dpm_adaptive")``
refused by name; the repeated-sigma sentence of ``schedules.sample_sigmas``; ``train --batch`` and ``demo --n``
bounded before any work."""
import numpy as np
import pytest
import torch

import diffkern
from diffkern import analytic, demo, sampler_compat, sampler_plans, samplers, schedules, train
from diffkern.commands import MAX_DEMO_POINTS, MAX_TRAIN_BATCH
from diffkern.sampling import host_plan

import _cuda_nosync
from test_cli_review import _one_error_line, _run

F64, F32 = torch.float64, torch.float32
REF = "reference"
GMM = analytic.GaussianMixture.demo_2d()
# float32 values, so the float64 list of the same floats is the same schedule exactly
SIG32 = schedules.karras(6, 0.05, 10.0).to(F32)
METHODS = sorted(set(samplers.SAMPLERS) - {"dpm_adaptive"})  # dpm_adaptive reports per attempt: see the report
CHURN = {"s_churn": 2.0, "s_tmin": 0.2, "s_tmax": 5.0}


def start(batch=5):
    return torch.randn(batch, 2, dtype=F64, generator=torch.Generator().manual_seed(3)).to(F32) * 10.0


def schedule_for(method, dtype=F32):
    if method == "heun_flow":  # flow matching: sigma in [0, 1]
        return (SIG32 / 10.0).to(dtype)
    return SIG32.to(dtype)


def run(method, sigmas, **kw):
    seen = []

    def callback(d):
        seen.append((d["i"], d["sigma"], d["sigma_hat"]))
    diffkern.sample(GMM, start(), sigmas, method, backend=REF, callback=callback, **kw)
    return seen


def kd_sigma_hat(sig: list, i: int, s_churn: float, s_tmin: float, s_tmax: float) -> float:
    """k-diffusion's sample_euler/heun/dpm_2 churn, in float64: sigmas[i]*(gamma + 1)."""
    n = len(sig) - 1
    gamma = min(s_churn / n, 2 ** 0.5 - 1) if s_tmin <= sig[i] <= s_tmax else 0.0
    return sig[i] * (gamma + 1)

#----------------------------------------------------------------------------
# 1. The callback's sigma and sigma_hat.


@pytest.mark.parametrize("method", [m for m in METHODS if m != "dpm_fast"])  # dpm_fast: test_kdiff_callbacks18.py
def test_callback_sigmas_follow_a_float32_schedule(method):
    """Every sampler: 0-d float32 CPU tensors; sigma is the schedule's own element (a view of its storage) wherever
    the step runs at it, and both are bitwise the float64 values of the list path rounded to float32."""
    sig = schedule_for(method)
    ours, listed = run(method, sig), run(method, sig.tolist())
    assert [i for i, *_ in ours] == [i for i, *_ in listed] == list(range(len(listed)))
    reported = listed  # float64 CPU, fresh tensors: the list path as before
    for (i, s, h), (_, s64, h64) in zip(ours, reported):
        for t in (s, h):
            assert isinstance(t, torch.Tensor) and t.dim() == 0 and t.dtype == F32 and t.device.type == "cpu"
        assert s64.dtype == h64.dtype == F64 and s64.device.type == "cpu"
        assert torch.equal(s, s64.to(F32)) and torch.equal(h, h64.to(F32))
        if float(s64) == float(sig[i]):
            assert s.data_ptr() == sig[i].data_ptr(), "sigma is sigmas[i] itself (k-diffusion's view)"
    assert [float(s) for _, s, _ in ours] == sig[:-1].tolist()


@pytest.mark.parametrize("method", ["euler", "heun", "dpm_2"])
@pytest.mark.parametrize("dtype", [F32, torch.float16, F64])
def test_callback_sigma_hat_of_churn_in_the_schedules_dtype(method, dtype):
    """Churn's sigma_hat: k-diffusion's sigmas[i]*(gamma + 1) (float64 here) rounded once to the schedule's dtype
    (the tolerance of one rounding: half an ulp); sigma_hat is sigma itself's value outside the churn window."""
    sig = SIG32.to(dtype)
    host = sig.tolist()
    seen = run(method, sig, **CHURN)
    assert len(seen) == len(host) - 1
    half_ulp = torch.finfo(dtype).eps / 2
    churned = 0
    for i, s, h in seen:
        assert s.dtype == h.dtype == dtype and s.data_ptr() == sig[i].data_ptr()
        truth = kd_sigma_hat(host, i, **CHURN)
        assert abs(float(h) - truth) <= half_ulp * truth * (1 + 1e-9), (i, float(h), truth)
        if truth == host[i]:
            assert torch.equal(h, sig[i])
        churned += truth > host[i]
    assert 0 < churned < len(seen), "the window has steps with churn and without"


def test_callback_sigmas_of_awkward_schedules():
    """A non-contiguous float32 view (every other element of a longer schedule) is indexed as given; an integer
    tensor, a numpy array and a list keep the float64 CPU tensors (made fresh at each step)."""
    long = schedules.karras(12, 0.05, 10.0).to(F32)
    strided = long[::2]
    assert not strided.is_contiguous()
    seen = run("euler", strided)
    for i, s, _ in seen:
        assert s.data_ptr() == strided[i].data_ptr() and torch.equal(s, long[2 * i])
    for given in (torch.tensor([8, 4, 2, 1, 0]), np.array([8.0, 4.0, 2.0, 1.0, 0.0]), [8.0, 4.0, 2.0, 1.0, 0.0]):
        seen = run("euler", given)
        assert [float(s) for _, s, _ in seen] == [8.0, 4.0, 2.0, 1.0]
        assert all(s.dtype == h.dtype == F64 and s.device.type == "cpu" for _, s, h in seen)
        assert len({id(s) for _, s, _ in seen}) == len(seen)


def test_callback_sigmas_of_a_window_and_the_direct_sampler():
    """A window moves the noise counters, not the steps: the same views; the k-diffusion-style sampler function
    (not only diffkern.sample) reports them too, and a schedule that requires grad is reported detached."""
    sig = SIG32.clone().requires_grad_(True)
    seen = []
    samplers.sample_euler_ancestral(GMM, start(), sig, callback=lambda d: seen.append((d["i"], d["sigma"])),
                                    disable=True, backend=REF, window=(2, 10))
    assert len(seen) == len(sig) - 1
    for i, s in seen:
        assert s.dtype == F32 and not s.requires_grad and torch.equal(s, sig.detach()[i])
        assert s.data_ptr() == sig[i].data_ptr()


def test_callback_sigmas_helper_makes_one_table_only_when_needed():
    """No table at all when every value is the schedule's own (the usual case); otherwise one, in its dtype."""
    given = SIG32
    host = given.tolist()
    pair = sampler_compat.callback_sigmas(given, host, host[:-1])
    assert all(pair(i)[0].data_ptr() == pair(i)[1].data_ptr() == given[i].data_ptr() for i in range(len(host) - 1))
    hat = [v * 1.25 for v in host[:-1]]
    pair = sampler_compat.callback_sigmas(given, host, hat)
    for i in range(len(host) - 1):
        s, h = pair(i)
        assert s.data_ptr() == given[i].data_ptr() and h.dtype == F32 and h.data_ptr() != given[i].data_ptr()
        assert float(h) == float(torch.tensor(hat[i], dtype=F64).to(F32))


@pytest.mark.cuda
@pytest.mark.parametrize("method,kw", [("euler", CHURN), ("heun", {}), ("dpm_fast", {}), ("dpmpp_2m", {})])
def test_callback_sigmas_on_cuda_make_no_host_sync(method, kw):
    """sigmas on the GPU: the callback's tensors are on it, in its dtype, and no step syncs with the host (the
    mode is switched to "error" from the first callback on: the host read of the schedule comes before the loop)."""
    sig, x = _cuda_nosync.on_cuda(SIG32, start())
    seen = []

    def callback(d):
        _cuda_nosync.forbid_syncs()
        seen.append((d["i"], d["sigma"], d["sigma_hat"]))
    with _cuda_nosync.syncs_restored():
        diffkern.sample(_cuda_nosync.model, x, sig, method, callback=callback, **kw)
    assert len(seen) == (len(sig) - 1 if method != "dpm_fast" else (len(sig) - 1) // 3 + 1)  # dpm_fast: its grid
    for i, s, h in seen:
        assert s.device == h.device == sig.device and s.dtype == h.dtype == F32
    if method != "dpm_fast":
        assert all(s.data_ptr() == sig[i].data_ptr() for i, s, _ in seen)

#----------------------------------------------------------------------------
# 2. dpm_adaptive has no plan and no trajectory of fixed size.


def test_trajectory_refuses_dpm_adaptive_naming_method(tmp_path, capsys, monkeypatch):
    from diffkern.commands import trajectory

    def boom(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")
    monkeypatch.setattr(trajectory, "trajectories", boom)
    out = tmp_path / "t.png"
    rc, stdout, err = _run(["trajectory", "--method", "dpm_adaptive", "--out", str(out)], capsys)
    assert rc == 2 and stdout == ""
    _one_error_line(err, "trajectory", "--method: dpm_adaptive decides its number of steps as it runs")
    assert not out.exists()


def test_host_plan_refuses_dpm_adaptive_by_name():
    with pytest.raises(ValueError, match=r"^method: 'dpm_adaptive' has no plan to build before sampling"):
        host_plan("dpm_adaptive", {}, [1.0, 0.5, 0.0])
    with pytest.raises(ValueError, match=r"^method: unknown sampler 'nope'"):
        host_plan("nope", {}, [1.0, 0.5, 0.0])
    assert host_plan("euler", {}, [1.0, 0.5, 0.0]).steps == 2
    assert set(sampler_plans.PLANS) == set(samplers.SAMPLERS) - {"dpm_adaptive"}

#----------------------------------------------------------------------------
# 3. sample_sigmas' repeated tail: what its docstring says, every REPEATS_OK sampler runs it, the others refuse.


def test_sample_sigmas_repeated_tail_runs_with_ipndm_and_plms():
    sig = schedules.sample_sigmas(torch.linspace(0.05, 10.0, 12, dtype=F64), 10)
    assert sig[-1] == sig[-2]  # the repeated tail (steps above ~2N/3)
    doc = schedules.sample_sigmas.__doc__
    assert "multistep ones" not in doc and "ipndm" in doc and "plms" in doc
    for method in ("ipndm", "plms", "ge"):
        assert method in sampler_compat.REPEATS_OK
        out = diffkern.sample(GMM, start(), sig, method, backend=REF)
        assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="sigmas"):
        diffkern.sample(GMM, start(), sig, "dpmpp_2m", backend=REF)

#----------------------------------------------------------------------------
# 4. train --batch and demo --n: bounded, inclusive, refused before any work.


def _boom(*args, **kwargs):
    raise AssertionError("work started before the arguments were checked")


@pytest.mark.parametrize("target,work", [("denoiser", "train_denoiser"), ("classifier", "train_classifier")])
def test_train_huge_batch_refused_before_any_work(tmp_path, capsys, monkeypatch, target, work):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train, work, _boom)
    big = MAX_TRAIN_BATCH + 1
    rc, out, err = _run(["train", "--target", target, "--batch", str(big), "--no-progress"], capsys)
    assert rc == 2 and out == ""
    _one_error_line(err, "train", f"--batch: expected an integer in [1, {MAX_TRAIN_BATCH}], got {big}")
    assert list(tmp_path.iterdir()) == []


def test_train_batch_bound_is_inclusive(tmp_path, capsys, monkeypatch):
    got = []

    def fake(**kw):
        got.append(kw["batch"])
        raise RuntimeError("stop here")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train, "train_denoiser", fake)
    rc, _, err = _run(["train", "--batch", str(MAX_TRAIN_BATCH), "--no-progress"], capsys)
    assert rc == 2 and got == [MAX_TRAIN_BATCH] and "stop here" in err


@pytest.mark.parametrize("n,reached", [(MAX_DEMO_POINTS + 1, False), (10 ** 12, False), (MAX_DEMO_POINTS, True)])
def test_demo_n_bounded_before_any_work(tmp_path, capsys, monkeypatch, n, reached):
    got = []

    def fake(**kw):
        got.append(kw["n"])
        raise RuntimeError("stop here")
    monkeypatch.setattr(demo, "sample_demo", fake)
    monkeypatch.setattr(demo, "plot", _boom)
    out = tmp_path / "d.png"
    rc, stdout, err = _run(["demo", "--n", str(n), "--out", str(out)], capsys)
    assert rc == 2 and stdout == ""
    if reached:
        assert got == [n] and "stop here" in err
    else:
        assert got == []
        _one_error_line(err, "demo", f"--n: expected an integer in [1, {MAX_DEMO_POINTS}], got {n}")
    assert not out.exists()


def test_bounds_have_their_documented_headroom():
    """The bounds sit well past the defaults (train 64 / classifier 128 images, demo 4000 points), so no real use
    is refused: at least 16 and 250 times."""
    assert MAX_TRAIN_BATCH >= 16 * 128 and MAX_DEMO_POINTS >= 250 * 4000
