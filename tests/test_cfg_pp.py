"""CFG++ (Chung et al. 2024) as ComfyUI runs it (comfyanonymous/ComfyUI at 02159d814dee609acc27994c1bf25fc5b40e2aaa,
``comfy/k_diffusion/sampling.py``): ``sample_euler_ancestral_cfg_pp``, ``sample_euler_cfg_pp`` (the former at eta = 0,
s_noise = 0) and ``sample_gradient_estimation(cfg_pp=True)`` (at any ge_gamma, with ``sample_dpmpp_2m_cfg_pp`` and
``sample_dpmpp_2s_ancestral_cfg_pp``, in ``tests/test_cfg_pp_history.py``). Their loops are restated below in the
run's dtype with sigmas as Python floats (ComfyUI is GPL and not installed: the maths, written here), on a model
whose conditional and unconditional predictions are the exact denoisers of two Gaussians. diffkern runs them
through a :mod:`diffkern.wrappers` wrapper whose guidance batch gives both, as the fused rows of
:mod:`diffkern.samplers_cfgpp` (the op's bu and fu slots).
"""
import inspect
import math

import pytest
import torch

from diffkern import samplers, schedules, wrappers
from diffkern.ops import philox
from diffkern.sampler_loop import Trajectory
from diffkern.testing import assert_matches_reference
from test_kdiffusion_parity import Draws

F64 = torch.float64
REF = "reference"
W = 3.5  # guidance scale: large enough that D_cfg, D_u and the plain sampler's D_c differ clearly
COND, UNCOND = ((1.5, -0.5), 0.8), ((-1.0, 0.7), 1.3)  # (mean, std) of the two Gaussians
SCHEDULES = {"to-zero": [12.0, 6.0, 3.0, 1.5, 0.7, 0.3, 0.0], "karras": schedules.karras(7, 0.03, 12.0).tolist(),
             "loglinear-no-zero": schedules.loglinear(6, 0.05, 10.0).tolist()[:-1], "one-step": [5.0, 0.0],
             "two-steps": [5.0, 1.0, 0.2]}


def gauss(x, sigma, which):
    """Exact denoiser of N(mean, std^2 I) at sigma (a float or a (B, 1) tensor), in x's dtype."""
    (mean, std) = which
    s2 = sigma * sigma
    return (std * std * x + s2 * torch.tensor(mean, dtype=x.dtype)) / (std * std + s2)


def both(x, sigma):
    """(D_c, D_u) at sigma, in x's dtype: what ComfyUI's CFG hands its post-cfg function (cond and uncond)."""
    return gauss(x, sigma, COND), gauss(x, sigma, UNCOND)


def guided(x, sigma, w, i=None, calls=None):
    """(D_cfg, D_u) at sigma, as a restated ComfyUI step reads them; with ``calls``, ComfyUI's callback of step i
    (its guided denoised) appended first."""
    d_c, d_u = both(x, sigma)
    den = d_u + w * (d_c - d_u)
    if calls is not None:
        calls.append({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": den})
    return den, d_u


def start(dtype=F64, batch=5):
    return (torch.randn(batch, 2, dtype=F64, generator=torch.Generator().manual_seed(3)) * 12.0).to(dtype)


def ancestral_step(s, sn, eta):
    """k-diffusion's ``get_ancestral_step`` as ComfyUI states it."""
    if not eta:
        return sn, 0.0
    up = min(sn, eta * (sn ** 2 * (s ** 2 - sn ** 2) / s ** 2) ** 0.5)
    return (sn ** 2 - up ** 2) ** 0.5, up


def comfy_euler_ancestral_cfg_pp(x, sig, w=W, ns=None, eta=1.0, s_noise=1.0, calls=None):
    """ComfyUI's ``sample_euler_ancestral_cfg_pp`` on a VE model (half-logSNR -log sigma, so alpha = 1)."""
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        den, d_u = guided(x, s, w, i, calls)
        if sn == 0:
            x = den
        else:
            d = (x - d_u) / s
            down, up = ancestral_step(s, sn, eta)
            x = den + down * d
            if eta > 0 and s_noise > 0:
                x = x + ns(s, sn).to(x.dtype) * s_noise * up
    return x


def comfy_euler_cfg_pp(x, sig, w=W, calls=None):
    return comfy_euler_ancestral_cfg_pp(x, sig, w, None, 0.0, 0.0, calls)


def comfy_gradient_estimation_cfg_pp(x, sig, ge_gamma, w=W, calls=None):
    """ComfyUI's ``sample_gradient_estimation`` with ``cfg_pp=True``."""
    old_d = None
    for i in range(len(sig) - 1):
        den, d_u = guided(x, sig[i], w, i, calls)
        d = (x - d_u) / sig[i]
        dt = sig[i + 1] - sig[i]
        if sig[i + 1] == 0:
            x = den
        else:
            x = den + d * sig[i + 1]
            if i >= 1:
                x = x + (ge_gamma - 1) * (d - old_d) * dt
        old_d = d
    return x

#----------------------------------------------------------------------------
# The network behind the wrappers: label 1 is the conditional half of the guidance batch, 0 the unconditional.


def _denoised(x_ve, sigma, label):
    s = sigma[:, None]  # not rounded to x's dtype: the wrappers pass sigma in the compute dtype
    return torch.where(label[:, None] > 0.5, gauss(x_ve, s, COND), gauss(x_ve, s, UNCOND))


def eps_net(x, sigma, label):
    return (x - _denoised(x, sigma, label)) / sigma[:, None]


def sample_net(x, sigma, label):
    return _denoised(x, sigma, label)


def edm_net(x_in, sigma, label, sd=0.5):
    """F of EDM's preconditioning (c_noise = sigma): x = x_in/c_in, F = (D - c_skip x)/c_out."""
    s = sigma[:, None]
    x = x_in * torch.sqrt(s * s + sd * sd)
    c_skip, c_out = sd * sd / (s * s + sd * sd), s * sd / torch.sqrt(s * s + sd * sd)
    return (_denoised(x, sigma, label) - c_skip * x) / c_out


def flow_net(x_in, t, label):
    """Velocity v = noise - data of x_t = (1-t) data + t noise: x_in = (1-t) x_ve, D = x_in - t v."""
    sigma = t / (1 - t)
    x_ve = x_in / (1 - t[:, None])
    return (x_in - _denoised(x_ve, sigma, label)) / t[:, None]


WRAPPERS = {"eps": lambda w: wrappers.VEDenoiser(eps_net, "epsilon", guidance_scale=w),
            "sample": lambda w: wrappers.VEDenoiser(sample_net, "sample", guidance_scale=w),
            "edm": lambda w: wrappers.KarrasDenoiser(edm_net, sigma_data=0.5, c_noise="sigma", guidance_scale=w)}


def labels(x):
    return {"label": torch.ones(x.shape[0], dtype=F64), "uncond_label": torch.zeros(x.shape[0], dtype=F64)}


def ours(method, x, sig, *, pred="eps", w=W, **kw):
    fn = {"euler": samplers.sample_euler_cfg_pp, "ancestral": samplers.sample_euler_ancestral_cfg_pp}[method]
    kw.setdefault("backend", REF)
    return fn(WRAPPERS[pred](w), x, sig, labels(x), disable=True, **kw)


def theirs(method, x, sig, **kw):
    return (comfy_euler_cfg_pp if method == "euler" else comfy_euler_ancestral_cfg_pp)(x, sig, **kw)


CASES = [("euler", {}), ("ancestral", {}), ("ancestral", {"eta": 0.5, "s_noise": 0.8}),
         ("ancestral", {"eta": 3.0}), ("ancestral", {"s_noise": 0.0})]
IDS = ["euler", "ancestral", "eta0.5-s0.8", "eta3-down0", "s_noise0"]


def run_pair(ours_fn, theirs_fn, noisy: bool, method, kw, sig, dtype=F64, pred="eps", backend=REF):
    """(ours, ComfyUI's, our callbacks, theirs, our noise_sampler calls, theirs) in ``dtype``: ``ours_fn`` and
    ``theirs_fn`` run ``method``, each with a noise_sampler of the same draws where ``noisy``."""
    x = start(dtype)
    cb_ours, cb_theirs = [], []
    ns_ours, ns_theirs = Draws(x), Draws(x)
    extra = {"noise_sampler": ns_ours} if noisy else {}
    got = ours_fn(method, x, sig, pred=pred, callback=cb_ours.append, backend=backend, **extra, **kw)
    extra = {"ns": ns_theirs} if noisy else {}
    want = theirs_fn(method, x, sig, calls=cb_theirs, **extra, **kw)
    return got, want, cb_ours, cb_theirs, ns_ours.calls, ns_theirs.calls


def run_both(method, kw, sig, dtype=F64, pred="eps", backend=REF):
    """:func:`run_pair` of the Euler CFG++ samplers (the ancestral one noisy)."""
    return run_pair(ours, theirs, method != "euler", method, kw, sig, dtype, pred, backend)


def check_float64_run(run, method, kw, name, pred, backend):
    """``run`` (:func:`run_both` or a twin) in float64 on schedule ``name``: the result, the noise_sampler calls and
    every callback (x and the guided D_cfg, as ComfyUI's) equal ComfyUI's loop to the float64 floor."""
    sig = SCHEDULES[name]
    got, want, cb_ours, cb_theirs, ns_ours, ns_theirs = run(method, kw, sig, pred=pred, backend=backend)
    assert got.dtype == F64
    assert_matches_reference(got, want, want, f"{method} {kw} {name} {pred} float64")
    assert ns_ours == ns_theirs  # same calls, same (sigma, sigma_next), as floats of the schedule's values
    assert len(cb_ours) == len(cb_theirs) == len(sig) - 1
    for a, b in zip(cb_ours, cb_theirs):
        assert set(a) == set(b) and a["i"] == b["i"]
        assert float(a["sigma"]) == b["sigma"] and float(a["sigma_hat"]) == b["sigma_hat"]
        for key in ("x", "denoised"):
            assert_matches_reference(a[key], b[key], b[key], f"callback {key} at step {a['i']}")


def check_low_precision_run(run, method, kw, dtype, backend):
    """ComfyUI's loop runs in x's dtype throughout; ours keeps the state (and history) in it and computes in float32:
    within the tolerance rule of ComfyUI's own error against float64."""
    sig = SCHEDULES["karras"]
    got, want_lowp, *_ = run(method, kw, sig, dtype, backend=backend)
    want64 = run(method, kw, sig, F64)[1]
    assert got.dtype == dtype
    assert_matches_reference(got, want64, want_lowp, f"{method} {kw} {dtype} [{backend}]")


@pytest.mark.parametrize("pred", sorted(WRAPPERS))
@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("method,kw", CASES, ids=IDS)
def test_float64_is_comfyuis_loop(method, kw, name, pred, cpu_backend):
    check_float64_run(run_both, method, kw, name, pred, cpu_backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method,kw", CASES[:3], ids=IDS[:3])
def test_low_precision_within_comfyuis_own_error(method, kw, dtype, cpu_backend):
    """ComfyUI's loop runs in x's dtype throughout; ours keeps the state in it and computes in float32."""
    check_low_precision_run(run_both, method, kw, dtype, cpu_backend)


@pytest.mark.parametrize("eta", [0.0, 1.0, 0.6])
def test_flow_model_is_comfyuis_const_loop(eta):
    """ComfyUI runs a flow (CONST) model's CFG++ in flow coordinates, alpha = 1 - t, the ancestral split on
    t/alpha; diffkern runs FlowDenoiser in VE coordinates, x_ve = x/(1 - t), sigma = t/(1 - t): the same steps."""
    ts = [0.92, 0.8, 0.6, 0.35, 0.15, 0.05, 0.0]
    xf = start()
    ns_theirs = Draws(xf)
    x = xf
    for i in range(len(ts) - 1):
        t, tn = ts[i], ts[i + 1]
        den, d_u = guided(x / (1 - t), t / (1 - t), W)
        if tn == 0:
            x = den
            continue
        alpha_s = t * math.exp(math.log((1 - t) / t))
        alpha_t = tn * math.exp(math.log((1 - tn) / tn))
        d = (x - alpha_s * d_u) / t
        down, up = ancestral_step(t / alpha_s, tn / alpha_t, eta)
        x = alpha_t * den + alpha_t * down * d
        if eta > 0:
            x = x + alpha_t * ns_theirs(t, tn) * up
    model = wrappers.FlowDenoiser(flow_net, guidance_scale=W)
    sig = [t / (1 - t) for t in ts]
    got = samplers.sample_euler_ancestral_cfg_pp(model, xf / (1 - ts[0]), sig, labels(xf), None, True, eta,
                                                 noise_sampler=Draws(xf), backend=REF)
    assert_matches_reference(got, x, x, f"flow eta={eta}")  # sigma_N = 0: the VE state is the flow state


@pytest.mark.parametrize("window", [None, (2, 9)])
def test_philox_noise_is_the_rows_stream(window):
    sig = SCHEDULES["to-zero"]
    x = start()
    begin = 0 if window is None else window[0]
    draws = iter([philox.noise_like(x, torch.tensor([11]), begin + i, F64) for i in range(len(sig) - 1)])
    want = comfy_euler_ancestral_cfg_pp(x, sig, ns=lambda s, sn: next(draws), eta=0.7)
    got = ours("ancestral", x, sig, eta=0.7, seed=11, window=window)
    assert_matches_reference(got, want, want, f"Philox window={window}")


@pytest.mark.parametrize("method", ["euler", "ancestral"])
def test_trajectory_records_the_guided_denoised(method):
    sig = SCHEDULES["karras"]
    x = start()
    traj = Trajectory(x, len(sig) - 1)
    calls, kept = [], []
    got = ours(method, x, sig, trajectory=traj, seed=4, callback=kept.append)
    draws = iter([philox.noise_like(x, torch.tensor([4]), i, F64) for i in range(len(sig) - 1)])
    want = theirs(method, x, sig, calls=calls, **({} if method == "euler" else {"ns": lambda s, sn: next(draws)}))
    assert_matches_reference(got, want, want, "final")
    assert_matches_reference(traj.x[-1], want, want, "trajectory end")
    for i, c in enumerate(calls):
        assert_matches_reference(traj.x[i], c["x"], c["x"], f"trajectory x[{i}]")
        assert_matches_reference(traj.denoised[i], c["denoised"], c["denoised"], f"trajectory denoised[{i}]")
        assert torch.equal(kept[i]["denoised"], traj.denoised[i])


def test_guidance_one_without_uncond_is_the_plain_sampler():
    """At w = 1 the wrapper runs one prediction (D_u = D_c): CFG++ is the plain sampler, bitwise."""
    sig = SCHEDULES["karras"]
    x = start(torch.float32)
    model = wrappers.VEDenoiser(eps_net, "epsilon")
    extra = {"label": torch.ones(x.shape[0], dtype=F64)}
    got = samplers.sample_euler_cfg_pp(model, x, sig, extra, backend=REF)
    assert torch.equal(got, samplers.sample_euler(model, x, sig, extra, backend=REF))
    got = samplers.sample_euler_ancestral_cfg_pp(model, x, sig, extra, None, True, 0.8, seed=2, backend=REF)
    assert torch.equal(got, samplers.sample_euler_ancestral(model, x, sig, extra, None, True, 0.8, seed=2,
                                                            backend=REF))


def test_guidance_changes_the_result():
    sig = SCHEDULES["karras"]
    assert not torch.allclose(ours("euler", start(), sig), ours("euler", start(), sig, w=1.5))

#----------------------------------------------------------------------------
# ComfyUI's signatures and the gradient-estimation flag.


def test_settings_positional_in_comfyuis_order():
    for fn, want in ((samplers.sample_euler_cfg_pp, []),
                     (samplers.sample_euler_ancestral_cfg_pp, [("eta", 1.0), ("s_noise", 1.0), ("noise_sampler", None)])):
        params = list(inspect.signature(fn).parameters.values())
        assert [p.name for p in params[:6]] == ["model", "x", "sigmas", "extra_args", "callback", "disable"]
        positional = [(p.name, p.default) for p in params[6:] if p.kind == p.POSITIONAL_OR_KEYWORD]
        assert positional == want
        assert all(p.kind == p.KEYWORD_ONLY for p in params[6 + len(want):])
    sig, x = SCHEDULES["to-zero"], start()
    model = WRAPPERS["eps"](W)
    pos = samplers.sample_euler_ancestral_cfg_pp(model, x, sig, labels(x), None, True, 0.4, 0.9, seed=1, backend=REF)
    kw = samplers.sample_euler_ancestral_cfg_pp(model, x, sig, labels(x), disable=True, eta=0.4, s_noise=0.9, seed=1,
                                                backend=REF)
    assert torch.equal(pos, kw)


@pytest.mark.parametrize("name", ["to-zero", "karras", "two-steps"])
def test_gradient_estimation_cfg_pp_at_gamma_one_is_euler_cfg_pp(name, cpu_backend):
    sig, x = SCHEDULES[name], start()
    want = comfy_gradient_estimation_cfg_pp(x, sig, 1.0)
    got = samplers.sample_gradient_estimation(WRAPPERS["eps"](W), x, sig, labels(x), None, True, 1.0, True,
                                              backend=cpu_backend)
    assert_matches_reference(got, want, want, f"gradient_estimation cfg_pp {name}")
    assert torch.equal(got, ours("euler", x, sig, backend=cpu_backend))


#----------------------------------------------------------------------------
# Bad input.


def _plain(x, sigma):
    return gauss(x, sigma[:, None], COND)


@pytest.mark.parametrize("fn", [samplers.sample_euler_cfg_pp, samplers.sample_euler_ancestral_cfg_pp,
                                samplers.sample_dpmpp_2m_cfg_pp, samplers.sample_dpmpp_2s_ancestral_cfg_pp])
def test_plain_model_raises_naming_model(fn):
    with pytest.raises(TypeError, match="^model: expected a diffkern.wrappers wrapper.*unconditional"):
        fn(_plain, start(), SCHEDULES["to-zero"])
    with pytest.raises(TypeError, match="^model: expected a diffkern.wrappers wrapper"):
        samplers.sample_gradient_estimation(_plain, start(), SCHEDULES["to-zero"], ge_gamma=1.0, cfg_pp=True)


def test_uncond_args_at_guidance_one_raise():
    """ComfyUI's CFG++ at cfg 1 still steps along the unconditional prediction; a wrapper at 1 runs none."""
    x = start()
    with pytest.raises(ValueError, match="^extra_args: uncond_label given with guidance_scale 1"):
        samplers.sample_euler_cfg_pp(WRAPPERS["eps"](1.0), x, SCHEDULES["to-zero"], labels(x))


@pytest.mark.parametrize("method", ["euler", "ancestral"])
def test_repeated_sigma_raises(method):
    """The samplers outside sampler_compat.REPEATS_OK (diffkern.sample names only) refuse a zero-length step."""
    with pytest.raises(ValueError, match="^sigmas: must be strictly decreasing for sampler 'euler_"):
        ours(method, start(), [5.0, 2.0, 2.0, 0.0])


@pytest.mark.parametrize("kw, err, match", [({"eta": -0.5}, ValueError, "^eta: expected"),
                                            ({"s_noise": math.nan}, ValueError, "^s_noise: expected"),
                                            ({"eta": "1"}, TypeError, "^eta: expected a number"),
                                            ({"noise_sampler": 3}, TypeError, "^noise_sampler: expected"),
                                            ({"callback": 3}, TypeError, "^callback: expected")])
def test_bad_knobs_name_themselves(kw, err, match):
    with pytest.raises(err, match=match):
        ours("ancestral", start(), SCHEDULES["to-zero"], **kw)
