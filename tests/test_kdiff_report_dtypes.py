"""The dtype and device of the sigmas k-diffusion's ``sample_dpm_adaptive`` and ``sample_dpm_fast`` hand to their
callback and noise_sampler, against k-diffusion's own tensor construction run here (k-diffusion is not installed; the
few torch lines that decide the dtype are copied as it writes them):

    dpm_adaptive:  s = -torch.tensor(sigma_max).log();  t = torch.minimum(t_end, s + h) (s = t once accepted);
                   callback sigma = exp(-s), noise_sampler(exp(-s), exp(-t))
    dpm_fast:      ts = torch.linspace(t_start, t_end, m + 1, device=x.device);  sigma = exp(-ts[i])

The values are diffkern's float64 ones rounded once to that dtype (within one rounding of a float64 oracle).
"""
import math
import warnings

import pytest
import torch

import diffkern
from diffkern import analytic, samplers
from diffkern.samplers_adaptive import report_specs, sample_dpm_adaptive

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
REF = "reference"
GMM = analytic.GaussianMixture.demo_2d()


def start(batch=5, dtype=F32):
    return (torch.randn(batch, 2, dtype=F64, generator=torch.Generator().manual_seed(3)) * 10.0).to(dtype)


def kd_tensor(value):
    """k-diffusion's ``torch.tensor(sigma)`` (copy-constructing a tensor warns; it is what k-diffusion does)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.tensor(value)


def kd_adaptive_specs(sigma_min, sigma_max):
    """(dtype, device) of k-diffusion's exp(-s) before its first accepted step and from it on, by its own ops."""
    t_start, t_end = -kd_tensor(sigma_max).log(), -kd_tensor(sigma_min).log()
    t = torch.minimum(t_end, t_start + 0.1)
    first, then = t_start.neg().exp(), t.neg().exp()
    return (first.dtype, first.device), (then.dtype, then.device)


def kd_fast_spec(sigma_min, sigma_max, x):
    ts = torch.linspace(-kd_tensor(sigma_max).log(), -kd_tensor(sigma_min).log(), 4, device=x.device)
    sig = ts.neg().exp()
    return sig.dtype, sig.device


class Recorder:
    """A noise_sampler recording its arguments, returning float64 normals in call order cast to x's dtype, on x's
    device (drawn on the CPU, so a CUDA x gets the same numbers)."""

    def __init__(self, like):
        self.gen, self.like, self.calls = torch.Generator().manual_seed(11), like, []

    def __call__(self, sigma, sigma_next):
        self.calls.append((sigma, sigma_next))
        return torch.randn(self.like.shape, generator=self.gen, dtype=F64).to(self.like.device, self.like.dtype)


def adaptive(sigma_min, sigma_max, **kw):
    x = start()
    seen, ns = [], Recorder(x)
    out, info = sample_dpm_adaptive(GMM, x, sigma_min, sigma_max, None, seen.append, True, noise_sampler=ns,
                                    return_info=True, backend=REF, **kw)
    return out, info, seen, ns.calls


def half_ulp(dtype):
    return torch.finfo(dtype).eps / 2 * (1 + 1e-9)

#----------------------------------------------------------------------------
# dpm_adaptive


LIMITS = [
    (0.05, 10.0),
    (torch.tensor(0.05, dtype=F64), torch.tensor(10.0, dtype=F64)),
    (torch.tensor(0.05, dtype=F32), torch.tensor(10.0, dtype=F32)),
    (torch.tensor(0.05, dtype=F64), torch.tensor(10.0, dtype=F16)),  # sigma_max's first, then promoted
    (0.05, torch.tensor(10.0, dtype=BF16)),
    (torch.tensor(0.05, dtype=F16), 10.0),
    (0.05, torch.tensor(10)),  # an integer tensor: its log is in the default dtype
    (torch.tensor([0.05], dtype=F64), torch.tensor([10.0], dtype=F64)),  # one element: reported 0-d
]
IDS = ["numbers", "f64", "f32", "f64-f16", "num-bf16", "f16-num", "num-int", "f64-1elem"]


def test_report_specs_are_kdiffusions():
    for lo, hi in LIMITS[:-1]:
        assert report_specs(lo, hi) == kd_adaptive_specs(lo, hi), (lo, hi)
    assert report_specs(0.05, 10.0) == ((F32, torch.device("cpu")),) * 2


@pytest.mark.parametrize("limits", LIMITS, ids=IDS)
def test_dpm_adaptive_reports_in_kdiffusions_dtype(limits):
    """h_init = 4 makes the first attempts fail: those report sigma_max's dtype, the rest the promoted one; every
    value is the float64 run's rounded once (the same attempts: the limits' values decide the run, not their
    dtype); the noise_sampler's first call pairs the two dtypes, as k-diffusion's (exp(-s) before s = t)."""
    lo, hi = limits
    before, after = kd_adaptive_specs(lo.reshape(()) if torch.is_tensor(lo) else lo,
                                      hi.reshape(()) if torch.is_tensor(hi) else hi)
    values = [float(v) for v in limits]
    kw = {"h_init": 4.0, "eta": 0.5}
    out, info, seen, calls = adaptive(*limits, **kw)
    out64, info64, seen64, calls64 = adaptive(torch.tensor(values[0], dtype=F64), torch.tensor(values[1], dtype=F64),
                                              **kw)
    assert torch.equal(out, out64) and info == info64 and info["n_reject"] > 0
    first_accept = next(k for k in range(1, len(seen)) if seen[k]["n_accept"] == 1)
    assert seen[first_accept - 1]["n_accept"] == 0 and first_accept >= 1
    for k, (d, d64) in enumerate(zip(seen, seen64)):
        dtype, device = before if k < first_accept else after
        for key in ("sigma", "sigma_hat", "t", "t_up"):
            got = d[key]
            assert isinstance(got, torch.Tensor) and got.dim() == 0, key
            assert got.dtype == dtype and got.device == device, (k, key, got.dtype)
            assert torch.equal(got, d64[key].to(dtype)), (k, key)
        assert torch.equal(d["sigma"], d["sigma_hat"]) and d["sigma"] is not d["sigma_hat"]
        assert d["error"].dtype == F32 and d["error"].device.type == "cpu" and d["error"].dim() == 0
    assert len(calls) == info["n_accept"] > 1
    for j, ((s, sn), (s64, sn64)) in enumerate(zip(calls, calls64)):
        spec_s = before if j == 0 else after
        assert (s.dtype, s.device) == spec_s and (sn.dtype, sn.device) == after and s.dim() == sn.dim() == 0
        assert torch.equal(s, s64.to(s.dtype)) and torch.equal(sn, sn64.to(sn.dtype))


def test_dpm_adaptive_default_dtype_follows_torch():
    """Numbers: k-diffusion's ``torch.tensor(float)`` is in torch's default dtype, float64 when so set."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        _, _, seen, calls = adaptive(0.05, 10.0)
    finally:
        torch.set_default_dtype(old)
    assert all(d["sigma"].dtype == d["t"].dtype == F64 for d in seen)
    assert all(s.dtype == sn.dtype == F64 for s, sn in calls)


def test_dpm_adaptive_float64_values_are_its_s_and_t():
    """float64 limits: each callback's sigma is exp(-t) of its t; the noise_sampler's k-th pair is (the sigma of the
    last accepted step, or sigma_max, then the sigma this step accepts), as k-diffusion's (sigma(s), sigma(t))."""
    lo, hi = torch.tensor(0.05, dtype=F64), torch.tensor(10.0, dtype=F64)
    _, info, seen, calls = adaptive(lo, hi, h_init=4.0)
    for d in seen:
        assert abs(float(d["sigma"]) - math.exp(-float(d["t"]))) <= 4 * torch.finfo(F64).eps * float(d["sigma"])
    accepted = [float(d["sigma"]) for k, d in enumerate(seen)
                if d["n_accept"] > (seen[k - 1]["n_accept"] if k else 0)]
    assert len(accepted) == len(calls) == info["n_accept"] > 1
    assert [float(sn) for _, sn in calls] == accepted
    # sigma(t_start) = exp(ln 10) is k-diffusion's first sigma(s): 10 to within float64 rounding, not 10 itself
    assert [float(s) for s, _ in calls] == [math.exp(math.log(10.0))] + accepted[:-1]
    assert float(calls[0][0]) == float(torch.tensor(10.0, dtype=F64).log().neg().neg().exp())


def test_sample_dpm_adaptive_schedule_follows_the_schedule():
    """diffkern.sample's "dpm_adaptive" (ComfyUI's call: sigmas[j], sigmas[0] as the limits): a floating tensor
    schedule's dtype; a list, float64 CPU as every other sampler's list schedule."""
    for given, dtype in ((torch.tensor([10.0, 1.0, 0.05, 0.0], dtype=F32), F32),
                         (torch.tensor([10.0, 1.0, 0.05, 0.0], dtype=F16), F16), ([10.0, 1.0, 0.05, 0.0], F64)):
        seen, ns = [], Recorder(start())
        diffkern.sample(GMM, start(), given, "dpm_adaptive", backend=REF, callback=seen.append, noise_sampler=ns,
                        eta=0.5)
        assert seen and ns.calls
        assert all(d["sigma"].dtype == dtype and d["sigma"].device.type == "cpu" for d in seen)
        assert all(s.dtype == sn.dtype == dtype for s, sn in ns.calls)

#----------------------------------------------------------------------------
# dpm_fast


FAST_LIMITS = [(0.05, 10.0), (torch.tensor(0.05, dtype=F64), torch.tensor(10.0, dtype=F64)),
               (torch.tensor(0.05, dtype=F16), torch.tensor(10.0, dtype=F16)),
               (torch.tensor(0.05, dtype=F64), 10.0), (0.05, torch.tensor(10))]


@pytest.mark.parametrize("limits", FAST_LIMITS, ids=["numbers", "f64", "f16", "f64-num", "num-int"])
def test_dpm_fast_reports_in_kdiffusions_dtype(limits):
    """Whatever the limits: x's device, the default dtype (k-diffusion's linspace); the values within one
    rounding of the float64 grid, and within a few float32 ulps of k-diffusion's own float32 grid."""
    x = start()
    dtype, device = kd_fast_spec(*limits, x)
    assert dtype == torch.get_default_dtype() and device == x.device
    seen, ns = [], Recorder(x)
    n = 7
    samplers.sample_dpm_fast(GMM, x, *limits, n, callback=seen.append, disable=True, eta=1.0, noise_sampler=ns,
                             backend=REF)
    lo, hi = (float(v) for v in limits)
    m = n // 3 + 1
    t0, t1 = -math.log(hi), -math.log(lo)
    grid64 = [math.exp(-(t0 + (t1 - t0) * k / m)) for k in range(m + 1)]
    kd_grid = torch.linspace(-kd_tensor(limits[1]).log(), -kd_tensor(limits[0]).log(), m + 1).neg().exp()
    assert len(ns.calls) == 3 and len(seen) == m  # once per step of k-diffusion's grid
    for k, (s, sn) in enumerate(ns.calls):
        for got, truth, kd in ((s, grid64[k], kd_grid[k]), (sn, grid64[k + 1], kd_grid[k + 1])):
            assert got.dtype == dtype and got.device == device and got.dim() == 0
            assert abs(float(got) - truth) <= (half_ulp(dtype) + 8 * torch.finfo(F64).eps) * truth
            # k-diffusion rounds t, not sigma: its sigma is off by up to |t| ulps of t (f16 limits: rounded first)
            if limits[1] is not FAST_LIMITS[2][1]:
                assert abs(float(got) - float(kd)) <= 4 * torch.finfo(F32).eps * (1 + abs(math.log(truth))) * truth
    for d in seen:
        for key in ("sigma", "sigma_hat", "t", "t_up"):
            assert d[key].dtype == dtype and d[key].device == device and d[key].dim() == 0
    assert float(seen[0]["sigma"]) == float(torch.tensor(hi, dtype=F64).to(dtype))


def test_dpm_fast_default_dtype_follows_torch():
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        seen, ns = [], Recorder(start())
        samplers.sample_dpm_fast(GMM, start(), torch.tensor(0.05, dtype=F32), 10.0, 5, callback=seen.append,
                                 disable=True, eta=1.0, noise_sampler=ns, backend=REF)
    finally:
        torch.set_default_dtype(old)
    assert all(d["sigma"].dtype == F64 for d in seen) and all(s.dtype == F64 for p in ns.calls for s in p)
    assert float(seen[0]["sigma"]) == 10.0


@pytest.mark.cuda
def test_reported_sigmas_on_cuda():
    """x on the GPU: dpm_fast reports there (whatever the limits' device); dpm_adaptive where its limits are (CPU
    numbers: the CPU; CUDA tensors: the GPU, promoted with a CPU one on the GPU)."""
    dev = torch.device("cuda")
    x = start().to(dev)

    def model(x, sigma):
        return x / (1 + sigma[:, None] ** 2)
    seen = []
    samplers.sample_dpm_fast(model, x, 0.05, 10.0, 5, callback=seen.append, disable=True)
    assert seen and all(d["sigma"].device == x.device and d["sigma"].dtype == F32 for d in seen)
    on_gpu = (torch.tensor(0.05, device=dev), torch.tensor(10.0, device=dev), "cuda")
    for lo, hi, device in ((0.05, 10.0, "cpu"), on_gpu, (0.05, torch.tensor(10.0, dtype=F64, device=dev), "cuda")):
        seen, ns = [], Recorder(x)
        sample_dpm_adaptive(model, x, lo, hi, None, seen.append, True, noise_sampler=ns)
        (_, dev_before), (dtype, dev_after) = kd_adaptive_specs(lo, hi)
        assert dev_after.type == device
        assert all(d["sigma"].device.type == device and d["t"].device.type == device for d in seen)
        assert all(sn.device.type == device and sn.dtype == dtype for _, sn in ns.calls)
        assert all(d["error"].device == x.device for d in seen)
