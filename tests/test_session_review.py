"""Regression tests of the fresh-eyes review of the 6233c11.. changes (window, graph keys).

Oracles: textbook float64 loops written here (EDM Algorithm 2 Heun with churn, Euler-ancestral with k-diffusion's
ancestral split), whose Philox draws are ``philox.noise_like`` at the row the whole ``total``-step loop gives each
draw (step rows ``0..T-1``, Heun's churn rows after two blocks of ``T``: ``2T + step``); the unwindowed loop for the
callback's sigmas.
"""
import math

import pytest
import torch

import diffkern
from diffkern import analytic, graph_keys, schedules
from diffkern.ops import philox

GMM = analytic.GaussianMixture.demo_2d()


def _start(batch, sigma, seed=4):
    return torch.randn(batch, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * sigma


def _denoise(x, sigma):
    return GMM(x, torch.full((x.shape[0],), sigma, dtype=torch.float64))


def _ancestral(s, sn, eta=1.0):
    """k-diffusion's get_ancestral_step, written out: (sigma_down, sigma_up)."""
    up = min(sn, eta * math.sqrt(sn * sn * (s * s - sn * sn) / (s * s)))
    return math.sqrt(sn * sn - up * up), up

#----------------------------------------------------------------------------
# dpm_fast in a window reported the schedule's (unused) sigmas to the callback, not each call's.


def test_windowed_dpm_fast_reports_each_calls_sigma_to_the_callback():
    sig = schedules.karras(4, 0.1, 10.0)
    x = _start(3, 10.0)
    reported = {}
    for window in (None, (1, 6)):
        seen = reported[window] = []
        diffkern.sample(GMM, x, sig, "dpm_fast", eta=1.0, seed=2, window=window,
                        callback=lambda d, seen=seen: seen.append((d["i"], d["sigma"])))
    assert reported[(1, 6)] == reported[None]
    assert [s for _, s in reported[None]] != sig.tolist()[:4]  # dpm_fast's own grid: the test can tell them apart

#----------------------------------------------------------------------------
# Graph keys: a tensor extra arg on neither x's device nor the CPU has no host values to key by.


def test_flatten_keys_only_cpu_tensors_by_value():
    cuda0 = torch.device("cuda", 0)
    meta = torch.empty(3, device="meta")
    key = graph_keys.flatten({"a": meta}, [], [], cuda0)  # raised TypeError (numpy of a meta tensor)
    assert key == ("dict", (("a", ("tensor", (3,), (1,), torch.float32, meta.device)),))
    one, two = torch.ones(2), torch.full((2,), 2.0)
    assert graph_keys.flatten(one, [], [], cuda0) != graph_keys.flatten(two, [], [], cuda0)  # CPU: by value
    assert graph_keys.flatten(one, [], [], torch.device("cpu")) == graph_keys.flatten(two, [], [], torch.device("cpu"))

#----------------------------------------------------------------------------
# Windows at the edges: one step at the very end of the whole loop; churn and a corrector in the window.


def test_single_step_window_at_the_very_end_draws_the_last_row():
    total, seed = 6, 9
    whole = schedules.karras(total, 0.05, 10.0).tolist()
    tail = [whole[total - 1], whole[total - 1] * 0.5]  # a last step that ends above 0, so it draws noise
    x = _start(32, tail[0])
    down, up = _ancestral(*tail)
    d = _denoise(x, tail[0])
    want = x + (down - tail[0]) * (x - d) / tail[0] + up * philox.noise_like(x, torch.tensor([seed]), total - 1,
                                                                             torch.float64)
    got = diffkern.sample(GMM, x, tail, "euler_ancestral", seed=seed, window=(total - 1, total), backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("begin", [0, 2, 4])
def test_heun_churn_window_to_the_end_matches_a_textbook_loop(begin):
    """EDM Algorithm 2 over steps ``begin..T-1`` of a T-step schedule (gamma from the tail's own N, as the
    window moves counters, not coefficients); churn noise of step i at row ``2T + begin + i``."""
    total, seed, s_churn, s_noise = 7, 3, 2.0, 1.1
    tail = schedules.karras(total, 0.05, 10.0).tolist()[begin:]
    n = len(tail) - 1
    x = _start(16, tail[0])
    want, key = x.clone(), torch.tensor([seed])
    gamma = min(s_churn / n, math.sqrt(2.0) - 1.0)
    for i, (s, sn) in enumerate(zip(tail[:-1], tail[1:])):
        sh = s * (1.0 + gamma)
        xi = philox.noise_like(want, key, 2 * total + begin + i, torch.float64)
        x_hat = want + s_noise * math.sqrt(sh * sh - s * s) * xi
        d = (x_hat - _denoise(x_hat, sh)) / sh
        want = x_hat + (sn - sh) * d
        if sn > 0:
            d2 = (want - _denoise(want, sn)) / sn
            want = x_hat + (sn - sh) * (d + d2) / 2
    got = diffkern.sample(GMM, x, tail, "heun", seed=seed, window=(begin, total), backend="reference",
                          s_churn=s_churn, s_noise=s_noise)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_inference_mode_loop_checks_its_table_once(monkeypatch):
    """Under torch.inference_mode the loop's table is still an ordinary tensor: the fused op's CPU table check is
    cached on its version counter (once per call), not re-run at each of the N steps; the output is no_grad's."""
    from diffkern.ops import coefs

    gmm = analytic.GaussianMixture.demo_2d()
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 20
    sig = schedules.karras(12, 0.05, 20.0)
    with torch.no_grad():
        want = diffkern.sample(gmm, x, sig, "euler_ancestral", backend="reference", seed=3)
    calls, real = [], coefs.validate
    monkeypatch.setattr(coefs, "validate", lambda t, name="coef": (calls.append(name), real(t, name))[1])
    with torch.inference_mode():
        got = diffkern.sample(gmm, x, sig, "euler_ancestral", backend="reference", seed=3)
    assert torch.equal(got, want)
    # once when the plan's table is built, once at the loop's first step (13 if every step re-checked)
    assert len(calls) == 2, f"the table was checked {len(calls)} times for 12 steps"
