"""ComfyUI's ``sample_gradient_estimation`` (comfyanonymous/ComfyUI at 02159d814dee609acc27994c1bf25fc5b40e2aaa,
cfg_pp off) is Permenter & Yuan's ``ge(gamma=ge_gamma, mu=0)``: with d = (x - D)/sigma and dt = sigma_next - sigma it
steps ``x + dt*d`` and from the second step on adds ``(ge_gamma - 1)*(d - d_prev)*dt``, i.e.
``x + dt*(ge_gamma*d + (1 - ge_gamma)*d_prev)``, the ge row; a step to 0 is the jump x = D in both. Its loop is restated
below in float64 (ComfyUI is GPL and not installed) on the exact denoiser of a Gaussian mixture; convergence orders on
the exact PF-ODE of a Gaussian: 1 for ge_gamma = 2 (the extrapolation to sigma_next overshoots the step's midpoint) and
2 for ge_gamma = 1.5 (Adams-Bashforth 2 in the limit of small steps).
"""
import inspect
import math

import pytest
import torch

import diffkern
from diffkern import analytic, samplers, schedules
from diffkern.testing import assert_matches_reference, usable_backends
from test_kdiffusion_parity import GMM, model, start

F64 = torch.float64
REF = "reference"
SCHEDULES = {"to-zero": [12.0, 6.0, 3.0, 1.5, 0.7, 0.3, 0.0], "karras": schedules.karras(7, 0.03, 12.0).tolist(),
             "loglinear-no-zero": schedules.loglinear(6, 0.05, 10.0).tolist()[:-1], "one-step": [5.0, 0.0],
             "two-steps": [5.0, 1.0, 0.2], "repeated": [5.0, 2.0, 2.0, 0.5, 0.0], "repeated-first": [5.0, 5.0, 2.0, 0.3]}
# (a repeated sigma is a zero-length step ComfyUI's loop takes: x unchanged, the previous slope that of the repeat)


def comfy_gradient_estimation(x, sig, ge_gamma=2.0, calls=None):
    """The gradient-estimation loop as ComfyUI states it (cfg_pp off), sigmas as Python floats."""
    d_prev = None
    for i in range(len(sig) - 1):
        den = model(x, sig[i])
        d = (x - den) / sig[i]
        if calls is not None:
            calls.append({"x": x, "i": i, "sigma": sig[i], "sigma_hat": sig[i], "denoised": den})
        dt = sig[i + 1] - sig[i]
        if sig[i + 1] == 0:
            x = den
        else:
            x = x + d * dt
            if i >= 1:
                x = x + (ge_gamma - 1) * (d - d_prev) * dt
        d_prev = d
    return x


@pytest.mark.parametrize("backend", [b for b in (REF, "cpp") if b in usable_backends("cpu")])
@pytest.mark.parametrize("ge_gamma", [2.0, 1.0, 1.5, 2.8, -0.5])
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_is_comfyuis_loop(name, ge_gamma, backend):
    sig = SCHEDULES[name]
    ref64 = comfy_gradient_estimation(start(), sig, ge_gamma)
    got64 = samplers.sample_gradient_estimation(GMM, start(), sig, None, None, True, ge_gamma, backend=backend)
    assert_matches_reference(got64, ref64, ref64, f"{name} gamma={ge_gamma} float64")  # 1e-12*max(1, |ref|)
    eager32 = comfy_gradient_estimation(start(torch.float32), sig, ge_gamma)
    got32 = samplers.sample_gradient_estimation(GMM, start(torch.float32), sig, disable=True, ge_gamma=ge_gamma,
                                                backend=backend)
    assert_matches_reference(got32, ref64, eager32, f"{name} gamma={ge_gamma} float32")


@pytest.mark.parametrize("ge_gamma", [2.0, 1.3])
def test_runs_the_ge_plan(ge_gamma):
    sig = SCHEDULES["karras"]
    got = samplers.sample_gradient_estimation(GMM, start(torch.float32), sig, disable=True, ge_gamma=ge_gamma,
                                              seed=0, backend=REF)
    want = diffkern.sample(GMM, start(torch.float32), sig, "ge", gamma=ge_gamma, mu=0.0, seed=0, backend=REF)
    assert torch.equal(got, want)


def test_callback_gets_comfyuis_values():
    sig = SCHEDULES["to-zero"]
    ours, theirs = [], []
    samplers.sample_gradient_estimation(GMM, start(), sig, callback=ours.append, disable=True, backend=REF)
    comfy_gradient_estimation(start(), sig, calls=theirs)
    assert len(ours) == len(theirs) == len(sig) - 1
    for a, b in zip(ours, theirs):
        assert set(a) == set(b) and a["i"] == b["i"]
        assert float(a["sigma"]) == b["sigma"] and float(a["sigma_hat"]) == b["sigma_hat"]
        for key in ("x", "denoised"):
            assert_matches_reference(a[key], b[key], b[key], f"callback {key} at step {a['i']}")


def test_settings_positional_in_comfyuis_order():
    params = list(inspect.signature(samplers.sample_gradient_estimation).parameters.values())
    positional = [p for p in params[6:] if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert [(p.name, p.default) for p in positional] == [("ge_gamma", 2.0), ("cfg_pp", False)]
    assert all(p.kind == p.KEYWORD_ONLY for p in params[6 + len(positional):])
    sig = SCHEDULES["to-zero"]
    pos = samplers.sample_gradient_estimation(GMM, start(), sig, None, None, True, 1.7, False, backend=REF)
    kw = samplers.sample_gradient_estimation(GMM, start(), sig, disable=True, ge_gamma=1.7, backend=REF)
    assert torch.equal(pos, kw)


def test_cfg_pp_refused_with_the_reason():
    """CFG++ (any ge_gamma: tests/test_cfg_pp.py) needs a guided wrapper's unconditional output."""
    with pytest.raises(TypeError, match="^model: expected a diffkern.wrappers wrapper.*unconditional"):
        samplers.sample_gradient_estimation(GMM, start(), SCHEDULES["to-zero"], cfg_pp=True)
    with pytest.raises(TypeError, match="^cfg_pp: expected a bool"):
        samplers.sample_gradient_estimation(GMM, start(), SCHEDULES["to-zero"], cfg_pp="no")


@pytest.mark.parametrize("bad, err", [(math.nan, ValueError), (math.inf, ValueError), (torch.tensor(2.0), TypeError),
                                      ("2", TypeError)])
def test_bad_ge_gamma_names_it(bad, err):
    with pytest.raises(err, match="^ge_gamma: expected"):
        samplers.sample_gradient_estimation(GMM, start(), SCHEDULES["to-zero"], ge_gamma=bad)


def test_convergence_order_on_a_gaussian_flow():
    """Error at sigma_min against the exact PF-ODE solution of a Gaussian, ``m + (x - m)*sqrt((s1^2 + v)/(s0^2 + v))``,
    on log-linear and Karras schedules from 10 to 0.05 at 32 -> 64 -> 128 steps."""
    gauss = analytic.GaussianMixture([1.0], [[0.5, -1.0]], [[0.8, 1.3]])
    x0 = torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(1)) * 10.0
    m, v = gauss.means, gauss.stds ** 2

    def slopes(make, ge_gamma):
        errs = []
        for n in (32, 64, 128):
            sig = make(n, 0.05, 10.0).tolist()[:-1]  # ends at sigma_min: no jump to 0
            out = samplers.sample_gradient_estimation(gauss, x0, sig, None, None, True, ge_gamma, backend=REF)
            exact = m + (x0 - m) * torch.sqrt((sig[-1] ** 2 + v) / (sig[0] ** 2 + v))
            errs.append(float((out - exact).abs().max()))
        return [math.log2(a / b) for a, b in zip(errs, errs[1:])]

    for make in (schedules.loglinear, schedules.karras):
        assert all(0.85 < s < 1.15 for s in slopes(make, 2.0)), make   # measured 0.91-0.97
        assert all(1.9 < s < 2.2 for s in slopes(make, 1.5)), make    # measured 2.02-2.06

#----------------------------------------------------------------------------
# README: ComfyUI's _RF ancestral samplers of a flow (CONST) model, restated in flow time t (z = (1 - t) x0 + t eps,
# the model's D at (z, t) is the VE denoiser's at (z/(1 - t), t/(1 - t))), are the VE ancestral steps to
# sigma_down = t_down/(1 - t_down) plus sqrt(sigma_next^2 - sigma_down^2) noise; diffkern's VE split is another.

TS = [0.92, 0.8, 0.6, 0.45, 0.3, 0.15, 0.05, 0.0]
XI = torch.randn(len(TS), 6, 2, dtype=F64, generator=torch.Generator().manual_seed(1))


def _flow_d(z, t):
    return model(z / (1 - t), t / (1 - t))


def _rf_split(t, tn, eta):
    """ComfyUI's _RF split: (t_down, the flow-state scale, the noise coefficient)."""
    td = tn * (1 + (tn / t - 1) * eta)
    return td, (1 - tn) / (1 - td), math.sqrt(max(tn ** 2 - td ** 2 * (1 - tn) ** 2 / (1 - td) ** 2, 0.0))


def comfy_rf(z, eta, second_order):
    """euler_ancestral_RF (second_order False) or dpmpp_2s_ancestral_RF (True), eta > 0, noise XI[i]."""
    lam = lambda t: math.log((1 - t) / t)  # noqa: E731
    for i in range(len(TS) - 1):
        t, tn = TS[i], TS[i + 1]
        den = _flow_d(z, t)
        if tn == 0:
            z = den
            continue
        td, scale, noise = _rf_split(t, tn, eta)
        if second_order:
            ts = 1 / (math.exp(0.5 * (lam(t) + lam(td))) + 1)
            den = _flow_d((ts / t) * z + (1 - ts / t) * den, ts)
        z = scale * ((td / t) * z + (1 - td / t) * den) + noise * XI[i]
    return z


def ve_ancestral(x, eta, second_order, down_of):
    """The VE ancestral step (DDIM, or DPM-Solver++(2S) at the log-midpoint) to down_of(sigma, sigma_next)."""
    for i in range(len(TS) - 1):
        s, sn = TS[i] / (1 - TS[i]), TS[i + 1] / (1 - TS[i + 1])
        den = model(x, s)
        if sn == 0:
            x = den
            continue
        sd = down_of(i, s, sn)
        if second_order:
            sm = math.sqrt(s * sd)
            den = model(sm / s * x + (1 - sm / s) * den, sm)
        x = sd / s * x + (1 - sd / s) * den + math.sqrt(sn ** 2 - sd ** 2) * XI[i]
    return x


@pytest.mark.parametrize("second_order", [False, True], ids=["euler_ancestral", "dpmpp_2s_ancestral"])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_comfyuis_rf_split_is_the_ve_step_to_another_sigma_down(eta, second_order):
    z = start() / 12.0 * TS[0]
    rf = comfy_rf(z, eta, second_order)
    t_down = lambda i: _rf_split(TS[i], TS[i + 1], eta)[0]  # noqa: E731
    ve_rf = ve_ancestral(z / (1 - TS[0]), eta, second_order, lambda i, s, sn: t_down(i) / (1 - t_down(i)))
    assert_matches_reference(ve_rf, rf, rf, "RF split in VE coordinates")  # final t = 0: x = z
    ve_kd = ve_ancestral(z / (1 - TS[0]), eta, second_order, lambda i, s, sn: math.sqrt(
        sn ** 2 - min(sn, eta * sn * math.sqrt(1 - sn ** 2 / s ** 2)) ** 2))
    assert float((ve_kd - rf).abs().max()) > 1e-3  # diffkern's (k-diffusion's) VE split: other samples
    draws = iter(XI)
    ours = samplers.SAMPLERS["dpmpp_2s_ancestral" if second_order else "euler_ancestral"](
        GMM, z / (1 - TS[0]), [t / (1 - t) for t in TS], disable=True, eta=eta, backend=REF,
        noise_sampler=lambda sigma, sigma_next: next(draws))
    assert_matches_reference(ours, ve_kd, ve_kd, "diffkern's split on the flow schedule")
    if eta == 1.0:  # README's closed form, and its example t 0.8 -> 0.5
        for t, tn in zip(TS[:-2], TS[1:-1]):
            s, sn, td = t / (1 - t), tn / (1 - tn), tn * tn / t
            assert math.isclose(td / (1 - td), sn ** 2 * (1 + s) / (s * (1 + 2 * sn) - sn ** 2), rel_tol=1e-13)
            assert td / (1 - td) >= sn ** 2 / s
        assert round(0.25 / 0.8 / (1 - 0.25 / 0.8), 3) == 0.455
