"""ComfyUI parity of the samplers from its k-diffusion fork: the settings positional in ComfyUI's order, the
``noise_sampler`` of res_multistep(_ancestral) and er_sde called where ComfyUI calls it, er_sde's ``noise_scaler``,
and the zero-length steps (repeated sigmas) of ipndm, plms and heun_flow, each against its loop written out below in
float64 (ComfyUI is not installed), on the exact denoiser of a Gaussian mixture.
"""
import inspect
import math

import pytest
import torch

import diffkern
from diffkern import samplers
from diffkern.testing import assert_matches_reference
from sampler_checks import ancestral_step
from test_kdiffusion_parity import GMM, Draws, model, start

F64 = torch.float64
REF = "reference"
SIG = [12.0, 6.0, 3.0, 1.5, 0.7, 0.3, 0.0]

# ComfyUI's comfy/k_diffusion/sampling.py: the settings after (model, x, sigmas, extra_args, callback, disable)
COMFY = {"ipndm": ["max_order"], "ipndm_v": ["max_order"], "deis": ["max_order", "deis_mode"],
         "res_multistep": ["s_noise", "noise_sampler"], "res_multistep_ancestral": ["eta", "s_noise", "noise_sampler"],
         "er_sde": ["s_noise", "noise_sampler", "noise_scaler", "max_stage"]}
OURS = {**COMFY, "deis": ["order"]}  # deis: another method than ComfyUI's (no alias, no deis_mode; README)


@pytest.mark.parametrize("method", sorted(COMFY))
def test_positional_settings_in_comfyuis_order(method):
    params = list(inspect.signature(samplers.SAMPLERS[method]).parameters.values())
    positional = [p.name for p in params[6:] if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert positional == OURS[method]
    assert all(p.kind == p.KEYWORD_ONLY for p in params[6 + len(positional):])


def test_positional_calls_are_the_keyword_calls():
    x = start()
    fn = samplers.SAMPLERS
    calls = [("ipndm", (3,), {"max_order": 3}), ("ipndm_v", (2,), {"max_order": 2}), ("deis", (2,), {"order": 2}),
             ("res_multistep", (0.5, None), {"s_noise": 0.5}),
             ("res_multistep_ancestral", (0.7, 0.5, None), {"eta": 0.7, "s_noise": 0.5}),
             ("er_sde", (0.5, None, None, 2), {"s_noise": 0.5, "max_stage": 2})]
    for method, args, kw in calls:
        pos = fn[method](GMM, x, SIG, None, None, True, *args, seed=3, backend=REF)
        assert torch.equal(pos, fn[method](GMM, x, SIG, disable=True, seed=3, backend=REF, **kw)), method
    with pytest.raises(TypeError):  # ComfyUI's deis_mode: refused, not taken for lower_order_final
        fn["deis"](GMM, x, SIG, None, None, True, 3, "tab")
    with pytest.raises(TypeError, match="max_order"):
        fn["deis"](GMM, x, SIG, disable=True, max_order=3)

#----------------------------------------------------------------------------
# noise_sampler and noise_scaler: ComfyUI's loops (VE: alpha = 1, lambda = sigma).


def comfy_res_multistep(x, sig, ns, eta=0.0, s_noise=1.0):
    """ComfyUI's ``res_multistep`` (cfg_pp off) as published: the noise_sampler called on every step to sigma > 0."""
    t_fn = lambda s: -math.log(s)  # noqa: E731
    phi1 = lambda t: math.expm1(t) / t  # noqa: E731
    phi2 = lambda t: (phi1(t) - 1.0) / t  # noqa: E731
    old_down = old_den = None
    for i in range(len(sig) - 1):
        den = model(x, sig[i])
        down, up = ancestral_step(sig[i], sig[i + 1], eta)
        if down == 0 or old_den is None:
            x = x + (x - den) / sig[i] * (down - sig[i])
        else:
            h = t_fn(down) - t_fn(sig[i])
            c2 = (t_fn(sig[i - 1]) - t_fn(old_down)) / h
            b1, b2 = phi1(-h) - phi2(-h) / c2, phi2(-h) / c2
            x = math.exp(-h) * x + h * (b1 * den + b2 * old_den)
        if sig[i + 1] > 0:
            x = x + ns(sig[i], sig[i + 1]).to(x.dtype) * s_noise * up
        old_den, old_down = den, down
    return x


def comfy_er_sde(x, sig, ns, s_noise=1.0, noise_scaler=None, max_stage=3):
    """ComfyUI's ``sample_er_sde`` as published (200 integration points), its noise_scaler on float64 tensors."""
    scaler = noise_scaler or (lambda v: v * ((v ** 0.3).exp() + 10.0))
    lam = torch.tensor(sig, dtype=F64)
    pts = torch.arange(0, 200.0, dtype=F64)
    old_den = old_den_d = None
    for i in range(len(sig) - 1):
        den = model(x, sig[i])
        stage = min(max_stage, i + 1)
        if sig[i + 1] == 0:
            x = den
        else:
            ls, lt = lam[i], lam[i + 1]
            r = float(scaler(lt) / scaler(ls))
            x = r * x + (1 - r) * den
            if stage >= 2:
                dt = float(lt - ls)
                pos = lt + pts * (-dt / 200)
                s = float(torch.sum(1 / scaler(pos)) * (-dt / 200))
                den_d = (den - old_den) / float(ls - lam[i - 1])
                x = x + (dt + s * float(scaler(lt))) * den_d
                if stage >= 3:
                    s_u = float(torch.sum((pos - ls) / scaler(pos)) * (-dt / 200))
                    den_u = (den_d - old_den_d) / (float(ls - lam[i - 2]) / 2)
                    x = x + (dt ** 2 / 2 + s_u * float(scaler(lt))) * den_u
                old_den_d = den_d
            if s_noise > 0:
                std = float((lt ** 2 - ls ** 2 * r ** 2).sqrt().nan_to_num(nan=0.0))
                x = x + ns(sig[i], sig[i + 1]).to(x.dtype) * s_noise * std
        old_den = den
    return x


def _check(method, textbook, kw, ours_kw=None):
    outs = {}
    for dtype in (F64, torch.float32):
        ns_ours, ns_ref = Draws(start()), Draws(start())
        ours = samplers.SAMPLERS[method](GMM, start(dtype), SIG, disable=True, noise_sampler=ns_ours, backend=REF,
                                         **(ours_kw or kw))
        outs[dtype] = ours, textbook(start(dtype), SIG, ns_ref, **kw)
        assert ns_ours.calls == ns_ref.calls, (method, kw)
    (ours64, ref64), (ours32, ref32) = outs[F64], outs[torch.float32]
    assert_matches_reference(ours64, ref64, ref64, f"{method} {kw} float64")
    assert_matches_reference(ours32, ref64, ref32, f"{method} {kw} float32")
    return ns_ours.calls


@pytest.mark.parametrize("kw", [{}, {"eta": 0.6, "s_noise": 0.8}, {"eta": 1.0}], ids=["ode", "eta0.6", "eta1"])
def test_res_multistep_noise_sampler_is_comfyuis(kw):
    calls = _check("res_multistep", comfy_res_multistep, kw)
    assert len(calls) == len(SIG) - 2  # every step to sigma > 0, eta = 0 too (its draw times 0)
    if "eta" in kw:
        anc = samplers.SAMPLERS["res_multistep_ancestral"]
        ns = Draws(start())
        got = anc(GMM, start(), SIG, None, None, True, kw["eta"], kw.get("s_noise", 1.0), ns, backend=REF)
        assert_matches_reference(got, comfy_res_multistep(start(), SIG, Draws(start()), **kw),
                                 comfy_res_multistep(start(), SIG, Draws(start()), **kw), "ancestral")


def _scaler(v):
    return v * (v.sqrt() + 2.0)


@pytest.mark.parametrize("kw", [{}, {"s_noise": 0.0}, {"s_noise": 0.7, "max_stage": 2},
                                {"noise_scaler": _scaler}, {"noise_scaler": _scaler, "max_stage": 1}],
                         ids=["default", "no-noise", "stage2", "scaler", "scaler-stage1"])
def test_er_sde_noise_sampler_and_scaler_are_comfyuis(kw):
    calls = _check("er_sde", comfy_er_sde, kw)
    assert len(calls) == (0 if kw.get("s_noise", 1.0) == 0 else len(SIG) - 2)


def test_er_sde_default_scaler_given_as_a_callable_is_the_default():
    comfy = lambda v: v * ((v ** 0.3).exp() + 10.0)  # noqa: E731
    a = diffkern.sample(GMM, start(), SIG, "er_sde", backend=REF, noise_scaler=comfy)
    b = diffkern.sample(GMM, start(), SIG, "er_sde", backend=REF)
    assert_matches_reference(a, b, b, "default scaler as a callable")


@pytest.mark.parametrize("scaler, err, match", [
    (3.0, TypeError, "noise_scaler: expected None or a callable"),
    (lambda v: 1.0, TypeError, "noise_scaler: expected it to return a tensor"),
    (lambda v: -v, ValueError, "noise_scaler: expected finite values > 0"),
    (lambda v: v * math.nan, ValueError, "noise_scaler: expected finite values > 0"),
])
def test_bad_noise_scaler_names_it(scaler, err, match):
    with pytest.raises(err, match=f"^{match}"):
        diffkern.sample(GMM, start(), SIG, "er_sde", noise_scaler=scaler)


#----------------------------------------------------------------------------
# Zero-length steps: ipndm (ComfyUI's loop), plms and heun_flow (x unchanged, the history advanced).

AB = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def comfy_ipndm(x, sig, ns=None, max_order=4):
    """ComfyUI's ``sample_ipndm``: its buffer takes every step's d, a zero-length step's too."""
    buf = []
    for i in range(len(sig) - 1):
        den = model(x, sig[i])
        d = (x - den) / sig[i]
        order = min(max_order, i + 1)
        w = AB[order]
        x = den if sig[i + 1] == 0 else x + (sig[i + 1] - sig[i]) * sum(
            wj * dj for wj, dj in zip(w, [d] + buf[::-1][:order - 1]))
        buf = (buf + [d])[-(max_order - 1):] if max_order > 1 else []
    return x


def textbook_plms(x, sig, ns=None):
    """PLMS: Heun in eps on the first step, then Euler with the Adams-Bashforth eps of order <= 4 (diffusers' ets:
    one eps per step, a zero-length step's too)."""
    eps = [(x - model(x, sig[0])) / sig[0]]
    x1 = x + (sig[1] - sig[0]) * eps[0]
    if sig[1] > 0:
        x1 = x + (sig[1] - sig[0]) * (eps[0] + (x1 - model(x1, sig[1])) / sig[1]) / 2
    x = x1
    for i in range(1, len(sig) - 1):
        eps.append((x - model(x, sig[i])) / sig[i])
        w = AB[min(len(eps), 4)]
        x = x + (sig[i + 1] - sig[i]) * sum(wj * e for wj, e in zip(w, reversed(eps)))
    return x


def textbook_heun_flow(x, sig, ns=None):
    """Heun in flow time t = sigma/(1 + sigma) on x_t = x/(1 + sigma), velocity (x_t - D)/t; Euler to 0."""
    for s, sn in zip(sig[:-1], sig[1:]):
        t, tn = s / (1 + s), sn / (1 + sn)
        xt = x / (1 + s)
        v1 = (xt - model(x, s)) / t
        xe = xt + (tn - t) * v1
        if sn > 0:
            v2 = (xe - model(xe * (1 + sn), sn)) / tn
            xe = xt + (tn - t) * (v1 + v2) / 2
        x = xe * (1 + sn)
    return x


ZERO_STEP_TEXTBOOK = {"ipndm": comfy_ipndm, "plms": textbook_plms, "heun_flow": textbook_heun_flow}
"""The loops of the samplers whose zero-length step this file established (test_kdiffusion_repeats runs them)."""


@pytest.mark.parametrize("method", sorted(ZERO_STEP_TEXTBOOK))
def test_zero_length_step_is_the_identity(method):
    seen = []
    diffkern.sample(GMM, start(), [6.0, 3.0, 3.0, 1.0, 0.0], method, backend=REF, callback=seen.append)
    assert torch.equal(seen[2]["x"], seen[1]["x"]) or method == "heun_flow"  # heun_flow: x' = x to rounding
    torch.testing.assert_close(seen[2]["x"], seen[1]["x"], rtol=0, atol=1e-14)
    got = diffkern.sample(GMM, start(), [3.0, 3.0], method, backend=REF)
    torch.testing.assert_close(got, start(), rtol=0, atol=1e-14)


@pytest.mark.parametrize("max_order", [1, 2, 4])
def test_ipndm_repeats_at_every_order(max_order):
    sig = [12.0, 6.0, 6.0, 2.0, 2.0, 2.0, 0.5, 0.0]
    want = comfy_ipndm(start(), sig, max_order=max_order)
    got = diffkern.sample(GMM, start(), sig, "ipndm", backend=REF, max_order=max_order)
    assert_matches_reference(got, want, want, f"ipndm max_order={max_order}")


def test_ipndm_v_still_refuses_repeats():
    with pytest.raises(ValueError, match=r"^sigmas: must be strictly decreasing for sampler 'ipndm_v'"):
        diffkern.sample(GMM, start(), [6.0, 3.0, 3.0, 0.0], "ipndm_v")
