"""k-diffusion parity of what dpm_fast and dpm_adaptive report (session 18).

Oracle: k-diffusion's ``DPMSolver.dpm_solver_fast`` as published (k_diffusion/sampling.py), written out here in float64
(k-diffusion is not installed): per step of its grid ``ts = linspace(t_start, t_end, m + 1)``, the first eps, then
``info_callback({'x', 'i', 't': ts[i], 't_up': t, 'denoised'})`` wrapped by ``sample_dpm_fast`` as
``callback({'sigma': sigma(t), 'sigma_hat': sigma(t_up), **info})``, the step, then
``x + su*s_noise*noise_sampler(sigma(t), sigma(t_next))``. Its grid is a ``torch.linspace`` with no dtype: the default
dtype on x's device, whatever the schedule's dtype (checked here on torch itself).
"""
import math

import pytest
import torch

import diffkern
from diffkern import analytic, samplers, schedules
from diffkern.samplers_adaptive import error_tensor, sample_dpm_adaptive

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
REF = "reference"
GMM = analytic.GaussianMixture.demo_2d()
KD_FAST_KEYS = ["sigma", "sigma_hat", "x", "i", "t", "t_up", "denoised"]
KD_ADAPTIVE_KEYS = KD_FAST_KEYS + ["error", "h", "steps", "nfe", "n_accept", "n_reject"]


def start(batch=5, dtype=F64):
    return (torch.randn(batch, 2, dtype=F64, generator=torch.Generator().manual_seed(3)) * 10.0).to(dtype)


class Draws:
    """A noise_sampler returning fixed float64 normals in call order (cast to x's dtype), logging into ``log``."""

    def __init__(self, like, log):
        self.gen, self.like, self.log = torch.Generator().manual_seed(7), like, log

    def __call__(self, sigma, sigma_next):
        self.log.append(("noise", sigma, sigma_next))
        return torch.randn(self.like.shape, generator=self.gen, dtype=F64).to(self.like.dtype)


def kd_dpm_fast(model, x, sigma_min, sigma_max, n, eta, noise_sampler, callback):
    """k-diffusion's sample_dpm_fast in float64 (see the module docstring); returns x."""
    sig = lambda t: math.exp(-t)  # noqa: E731
    t_start, t_end = -math.log(sigma_max), -math.log(sigma_min)
    m = n // 3 + 1
    ts = torch.linspace(t_start, t_end, m + 1, dtype=F64).tolist()
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]

    def eps(u, t):
        return (u - model(u, torch.full((u.shape[0],), sig(t), dtype=u.dtype))) / sig(t)
    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        if eta:
            s, sn = sig(t), sig(t_next)
            up = min(sn, eta * math.sqrt(sn * sn * (s * s - sn * sn) / (s * s)))
            t_next_ = min(t_end, -math.log(math.sqrt(sn * sn - up * up)))
            su = (sig(t_next) ** 2 - sig(t_next_) ** 2) ** 0.5
        else:
            t_next_, su = t_next, 0.0
        e0 = eps(x, t)
        callback({"sigma": sig(ts[i]), "sigma_hat": sig(t), "x": x, "i": i, "t": ts[i], "t_up": t,
                  "denoised": x - sig(t) * e0})
        h = t_next_ - t
        if order == 1:
            x = x - sig(t_next_) * math.expm1(h) * e0
        elif order == 2:
            s1 = t + h / 2
            e1 = eps(x - sig(s1) * math.expm1(h / 2) * e0, s1)
            x = x - sig(t_next_) * math.expm1(h) * e0 - sig(t_next_) * math.expm1(h) * (e1 - e0)
        else:
            r1, r2 = 1 / 3, 2 / 3
            s1, s2 = t + r1 * h, t + r2 * h
            e1 = eps(x - sig(s1) * math.expm1(r1 * h) * e0, s1)
            u2 = (x - sig(s2) * math.expm1(r2 * h) * e0
                  - sig(s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (e1 - e0))
            e2 = eps(u2, s2)
            x = x - sig(t_next_) * math.expm1(h) * e0 - sig(t_next_) / r2 * (math.expm1(h) / h - 1) * (e2 - e0)
        x = x + su * noise_sampler(torch.tensor(sig(t)), torch.tensor(sig(t_next)))
    return x

#----------------------------------------------------------------------------
# 1. dpm_fast's callback: once per step of k-diffusion's grid.


@pytest.mark.parametrize("n", [8, 7, 9, 2, 1])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_dpm_fast_callback_is_kdiffusions(n, eta):
    """Calls, keys (in k-diffusion's order), i, x (the step's start), denoised, sigma/t within float64 rounding of
    the oracle (the float64 state: 1e-10, the elimination's rounding over a few steps); sigmas and t 0-d tensors in
    the default dtype on x's device, their values the float64 ones rounded once."""
    x = start()
    ours, theirs, log_ours, log_kd = [], [], [], []
    out = samplers.sample_dpm_fast(GMM, x, 0.05, 10.0, n, callback=ours.append, disable=True, eta=eta,
                                   noise_sampler=Draws(x, log_ours), backend=REF)
    want = kd_dpm_fast(GMM, x, 0.05, 10.0, n, eta, Draws(x, log_kd), theirs.append)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    assert len(ours) == len(theirs) == n // 3 + 1 and len(log_ours) == len(log_kd)
    half_ulp = torch.finfo(torch.get_default_dtype()).eps / 2
    for d, k in zip(ours, theirs):
        assert list(d) == KD_FAST_KEYS and d["i"] == k["i"]
        torch.testing.assert_close(d["x"], k["x"], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(d["denoised"], k["denoised"], rtol=1e-10, atol=1e-10)
        for key in ("sigma", "sigma_hat", "t", "t_up"):
            v = d[key]
            assert isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype == torch.get_default_dtype()
            assert v.device == x.device
            assert abs(float(v) - k[key]) <= half_ulp * abs(k[key]) + 1e-15, (key, float(v), k[key])
    for (_, s, sn), (_, ks, ksn) in zip(log_ours, log_kd):
        assert s.dtype == sn.dtype == torch.get_default_dtype() and s.device == x.device
        assert abs(float(s) - float(ks)) <= half_ulp * float(ks) * 1.001
        assert abs(float(sn) - float(ksn)) <= half_ulp * float(ksn) * 1.001


def test_dpm_fast_callback_keeps_its_tensors_and_leaves_the_result():
    """x and denoised of every report are the caller's to keep (later steps do not write them); a callback changes
    no bit of the result."""
    x = start(dtype=F32)
    seen = []
    out = diffkern.sample(GMM, x, schedules.karras(8, 0.05, 10.0), "dpm_fast", backend=REF, seed=1, eta=1.0,
                          callback=lambda d: seen.append({k: (v.clone() if isinstance(v, torch.Tensor) else v)
                                                          for k, v in d.items()} | {"kept": d}))
    assert torch.equal(out, diffkern.sample(GMM, x, schedules.karras(8, 0.05, 10.0), "dpm_fast", backend=REF, seed=1,
                                            eta=1.0))
    assert torch.equal(seen[0]["x"], x)
    for d in seen:
        assert torch.equal(d["kept"]["x"], d["x"]) and torch.equal(d["kept"]["denoised"], d["denoised"])


@pytest.mark.parametrize("given", ["f64", "f16", "list"])
def test_dpm_fast_schedule_reports_in_the_default_dtype(given):
    """diffkern.sample's dpm_fast as ComfyUI calls k-diffusion's (``sample_dpm_fast(model, x, sigmas[-2], sigmas[0],
    N)``): whatever the schedule's dtype (a list too), the default dtype on x's device (its linspace); torch's
    default dtype followed."""
    sig = schedules.karras(6, 0.05, 10.0)
    sig = {"f64": sig.to(F64), "f16": sig.to(F16), "list": sig.tolist()}[given]
    t0 = -torch.tensor(10.0, dtype=F64 if given == "f64" else F32).log()
    assert torch.linspace(t0, t0 + 1, 3).dtype == torch.get_default_dtype()  # k-diffusion's grid: no dtype given
    for default in (F32, F64):
        old = torch.get_default_dtype()
        torch.set_default_dtype(default)
        try:
            seen, log = [], []
            x = start(dtype=F32)
            diffkern.sample(GMM, x, sig, "dpm_fast", backend=REF, eta=1.0, callback=seen.append,
                            noise_sampler=Draws(x, log))
        finally:
            torch.set_default_dtype(old)
        assert len(seen) == 3 and len(log) == 3
        tensors = [d[k] for d in seen for k in ("sigma", "sigma_hat", "t", "t_up")] + [v for e in log for v in e[1:]]
        assert all(v.dtype == default and v.device == x.device and v.dim() == 0 for v in tensors)


def test_dpm_fast_callback_and_noise_sampler_order():
    """k-diffusion: callback(i) then noise_sampler(i) per grid step. Steps of 2 or 3 calls report at their first call
    and draw at their last: k-diffusion's order. A last step of one call draws before it reports (the draw enters the
    fused launch that writes the callback's denoised; README, sampler_compat)."""
    for n, want in ((8, ["cb", "noise"] * 3), (7, ["cb", "noise", "cb", "noise", "noise", "cb"])):
        log = []
        x = start()
        samplers.sample_dpm_fast(GMM, x, 0.05, 10.0, n, callback=lambda d: log.append(("cb",)), disable=True,
                                 eta=1.0, noise_sampler=Draws(x, log), backend=REF)
        assert [e[0] for e in log] == want, n

#----------------------------------------------------------------------------
# 2. dpm_adaptive: once per attempt, k-diffusion's keys, error in x's dtype.


@pytest.mark.parametrize("dtype", [F64, F32, F16, BF16])
def test_dpm_adaptive_callback_per_attempt_and_error_dtype(dtype):
    """k-diffusion calls info_callback after every attempt (accepted or rejected), with its keys in its order; its
    error is computed in x's dtype (0-d float atol/rtol tensors promote to x's): ours is the float32 value (at least)
    rounded once to x's dtype, on x's device."""
    x = start(dtype=dtype)
    seen = []
    _, info = sample_dpm_adaptive(GMM, x, 0.05, 10.0, callback=seen.append, disable=True, rtol=0.01, atol=0.001,
                                  h_init=0.5, return_info=True, backend=REF)
    assert info["n_reject"] > 0, "the run should reject some attempts, so that per attempt is tested"
    assert len(seen) == info["steps"] == info["n_accept"] + info["n_reject"]
    assert [d["i"] for d in seen] == list(range(info["steps"]))
    for d in seen:
        assert list(d) == KD_ADAPTIVE_KEYS
        assert d["error"].dtype == dtype and d["error"].device == x.device and d["error"].dim() == 0
        assert isinstance(d["h"], float)
    kd_error = torch.linalg.norm((x - 2 * x) / torch.maximum(torch.tensor(0.0078), torch.tensor(0.05) * x.abs()))
    assert kd_error.dtype == dtype  # k-diffusion's promotion, on torch itself
    assert error_tensor(x, 2 * x, x, 0.0078, 0.05).dtype == torch.promote_types(dtype, F32)  # what the controller reads
