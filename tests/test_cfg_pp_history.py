"""CFG++ samplers that also keep an unconditional history, as ComfyUI runs them (the commit and conventions of
``tests/test_cfg_pp.py``, whose model, wrappers and restated Euler and gradient-estimation loops this file shares):
``sample_dpmpp_2m_cfg_pp`` (history: the previous D_u), ``sample_dpmpp_2s_ancestral_cfg_pp`` (two calls a step, the
second reading x + D_cfg - D_u) and ``sample_gradient_estimation(cfg_pp=True)`` at any ge_gamma (history: the previous
unconditional slope), rows of the fused step's bu and fu slots (:mod:`diffkern.samplers_cfgpp`).
"""
import inspect
import math

import pytest
import torch

from diffkern import samplers, wrappers
from diffkern.ops import philox
from diffkern.sampler_loop import Trajectory
from diffkern.testing import assert_matches_reference
from test_cfg_pp import (F64, REF, SCHEDULES, W, WRAPPERS, ancestral_step, both, check_float64_run,
                         check_low_precision_run, comfy_gradient_estimation_cfg_pp, eps_net, guided, labels,
                         run_pair, start)
from test_kdiffusion_parity import Draws

def comfy_dpmpp_2m_cfg_pp(x, sig, w=W, calls=None):
    """ComfyUI's ``sample_dpmpp_2m_cfg_pp`` (t = -log sigma; h = inf on the step to 0, where exp(-h) = 0)."""
    old_du = None
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        den, d_u = guided(x, s, w, i, calls)
        h = math.log(s / sn) if sn > 0 else math.inf
        if old_du is None or sn == 0:
            mix = -math.exp(-h) * d_u
        else:
            r = math.log(sig[i - 1] / s) / h
            mix = -math.exp(-h) * d_u - math.expm1(-h) * (1 / (2 * r)) * (den - old_du)
        x = den + mix + math.exp(-h) * x
        old_du = d_u
    return x


def comfy_dpmpp_2s_ancestral_cfg_pp(x, sig, w=W, ns=None, eta=1.0, s_noise=1.0, calls=None):
    """ComfyUI's ``sample_dpmpp_2s_ancestral_cfg_pp`` (r = 1/2; sigma_fn(t) = exp(-t), t_fn(sigma) = -log sigma)."""
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        den, d_u = guided(x, s, w, i, calls)
        down, up = ancestral_step(s, sn, eta)
        if down == 0:
            x = den + (x - d_u) / s * down
        else:
            t, t_next = -math.log(s), -math.log(down)
            h = t_next - t
            mid = math.exp(-(t + h / 2))
            x_2 = (mid / s) * (x + (den - d_u)) - math.expm1(-h / 2) * den
            d_c2, d_u2 = both(x_2, mid)
            x = (math.exp(-t_next) / math.exp(-t)) * (x + (den - d_u)) - math.expm1(-h) * (d_u2 + w * (d_c2 - d_u2))
        if sn > 0:
            x = x + ns(s, sn).to(x.dtype) * s_noise * up
    return x


#----------------------------------------------------------------------------
# Every CPU backend against the restated loops.


def ours_hist(method, x, sig, *, pred="eps", w=W, backend=REF, **kw):
    model = WRAPPERS[pred](w)
    if method == "dpmpp_2m":
        return samplers.sample_dpmpp_2m_cfg_pp(model, x, sig, labels(x), disable=True, backend=backend, **kw)
    if method == "2s":
        return samplers.sample_dpmpp_2s_ancestral_cfg_pp(model, x, sig, labels(x), disable=True, backend=backend,
                                                         **kw)
    return samplers.sample_gradient_estimation(model, x, sig, labels(x), disable=True, cfg_pp=True, backend=backend,
                                               **kw)


def theirs_hist(method, x, sig, calls=None, ns=None, **kw):
    if method == "dpmpp_2m":
        return comfy_dpmpp_2m_cfg_pp(x, sig, calls=calls)
    if method == "2s":
        return comfy_dpmpp_2s_ancestral_cfg_pp(x, sig, ns=ns, calls=calls, **kw)
    return comfy_gradient_estimation_cfg_pp(x, sig, kw["ge_gamma"], calls=calls)


HIST_CASES = [("dpmpp_2m", {}), ("ge", {"ge_gamma": 2.0}), ("ge", {"ge_gamma": 0.3}), ("2s", {}),
              ("2s", {"eta": 0.5, "s_noise": 0.8}), ("2s", {"eta": 3.0})]
HIST_IDS = ["dpmpp_2m", "ge2", "ge0.3", "2s", "2s-eta0.5-s0.8", "2s-eta3-down0"]


def run_hist(method, kw, sig, dtype=F64, pred="eps", backend=REF):
    """:func:`test_cfg_pp.run_pair` of the history samplers (2S noisy)."""
    return run_pair(ours_hist, theirs_hist, method == "2s", method, kw, sig, dtype, pred, backend)


@pytest.mark.parametrize("pred", sorted(WRAPPERS))
@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("method,kw", HIST_CASES, ids=HIST_IDS)
def test_history_samplers_float64_are_comfyuis_loops(method, kw, name, pred, cpu_backend):
    check_float64_run(run_hist, method, kw, name, pred, cpu_backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method,kw", HIST_CASES[:5], ids=HIST_IDS[:5])
def test_history_samplers_low_precision_within_comfyuis_own_error(method, kw, dtype, cpu_backend):
    """ComfyUI's loop runs in x's dtype throughout; ours keeps the state and history in it, computes in float32."""
    check_low_precision_run(run_hist, method, kw, dtype, cpu_backend)


@pytest.mark.parametrize("method,kw", HIST_CASES, ids=HIST_IDS)
def test_history_samplers_trajectory_records_the_guided_denoised(method, kw):
    sig = SCHEDULES["karras"]
    x = start()
    traj = Trajectory(x, len(sig) - 1)
    calls = []
    extra = {"noise_sampler": Draws(x)} if method == "2s" else {}
    got = ours_hist(method, x, sig, trajectory=traj, **extra, **kw)
    want = theirs_hist(method, x, sig, calls=calls, ns=Draws(x), **kw)
    assert_matches_reference(got, want, want, "final")
    assert_matches_reference(traj.x[-1], want, want, "trajectory end")
    for i, c in enumerate(calls):
        assert_matches_reference(traj.x[i], c["x"], c["x"], f"trajectory x[{i}]")
        assert_matches_reference(traj.denoised[i], c["denoised"], c["denoised"], f"trajectory denoised[{i}]")


@pytest.mark.parametrize("window", [None, (2, 9)])
@pytest.mark.parametrize("eta", [1.0, 3.0])
def test_dpmpp_2s_ancestral_cfg_pp_philox_noise_is_the_rows_stream(window, eta):
    """The noise of step i is the Philox draw of the row it is added on: the second call's (row total + begin + i of
    the window's layout), or the first's (begin + i) where sigma_down = 0 and there is no second call."""
    sig = SCHEDULES["to-zero"]
    x = start()
    begin, total = window or (0, len(sig) - 1)
    rows = [begin + i if ancestral_step(s, sn, eta)[0] == 0 else total + begin + i
            for i, (s, sn) in enumerate(zip(sig[:-1], sig[1:])) if sn > 0]
    draws = iter([philox.noise_like(x, torch.tensor([11]), row, F64) for row in rows])
    want = comfy_dpmpp_2s_ancestral_cfg_pp(x, sig, ns=lambda s, sn: next(draws), eta=eta)
    got = ours_hist("2s", x, sig, eta=eta, seed=11, window=window)
    assert_matches_reference(got, want, want, f"Philox window={window}")


def test_history_samplers_guidance_one_is_the_plain_sampler():
    """At w = 1 the wrapper runs one prediction (D_u = D_c): DPM++ 2M CFG++ is DPM++ 2M, gradient estimation CFG++
    the plain one (to rounding: the rows differ)."""
    sig = SCHEDULES["karras"]
    x = start()
    model = wrappers.VEDenoiser(eps_net, "epsilon")
    extra = {"label": torch.ones(x.shape[0], dtype=F64)}
    for cfgpp, plain in ((lambda: samplers.sample_dpmpp_2m_cfg_pp(model, x, sig, extra, backend=REF),
                          lambda: samplers.sample_dpmpp_2m(model, x, sig, extra, backend=REF)),
                         (lambda: samplers.sample_gradient_estimation(model, x, sig, extra, None, True, 2.5, True),
                          lambda: samplers.sample_gradient_estimation(model, x, sig, extra, None, True, 2.5))):
        want = plain()
        assert_matches_reference(cfgpp(), want, want, "guidance 1")


def test_history_samplers_settings_positional_in_comfyuis_order():
    for fn, want in ((samplers.sample_dpmpp_2m_cfg_pp, []),
                     (samplers.sample_dpmpp_2s_ancestral_cfg_pp,
                      [("eta", 1.0), ("s_noise", 1.0), ("noise_sampler", None)])):
        params = list(inspect.signature(fn).parameters.values())
        assert [p.name for p in params[:6]] == ["model", "x", "sigmas", "extra_args", "callback", "disable"]
        assert [(p.name, p.default) for p in params[6:] if p.kind == p.POSITIONAL_OR_KEYWORD] == want


#----------------------------------------------------------------------------
# Zero-length steps.


def test_repeated_sigma_in_gradient_estimation_cfg_pp_is_comfyuis_step():
    """A zero-length step (r = 1) is x' = x + D_cfg - D_u in ComfyUI's loop, and in the rows (bu = -1)."""
    sig, x = [5.0, 2.0, 2.0, 0.7, 0.0], start()
    want = comfy_gradient_estimation_cfg_pp(x, sig, 2.0)
    assert_matches_reference(ours_hist("ge", x, sig, ge_gamma=2.0), want, want, "repeated sigma")


def test_repeated_sigma_raises():
    """DPM++ 2M CFG++'s multistep ratio h_last/h divides by the step; DPM++ 2S ancestral CFG++ is not a
    sampler_compat.REPEATS_OK name (those are diffkern.sample names)."""
    for method in ("dpmpp_2m", "2s"):
        with pytest.raises(ValueError, match="^sigmas: must be strictly decreasing for sampler 'dpmpp_"):
            ours_hist(method, start(), [5.0, 2.0, 2.0, 0.0])
