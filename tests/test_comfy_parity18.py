"""ComfyUI parity, re-read against ComfyUI's current ``comfy/k_diffusion/sampling.py`` (comfyanonymous/ComfyUI at
02159d814dee609acc27994c1bf25fc5b40e2aaa, the version with ``sample_ar_video``): its ``sample_lcm`` now takes
``s_noise`` and ``s_noise_end`` positionally after ``noise_sampler`` (the per-step multiplier ramps linearly from the
first to the last step; ``noise_clip_std`` is not offered here), and its ``ipndm_v``, ``dpmpp_2m_sde`` (midpoint and
heun) and ``dpmpp_3m_sde`` loops, restated below in float64 on a VE model (alpha = 1, half-logSNR = -log sigma), are
what diffkern runs. ComfyUI is GPL and not installed: the loops are the maths, written here, not its code.
"""
import inspect
import math

import pytest
import torch

import diffkern
from diffkern import samplers, schedules
from diffkern.ops import philox
from diffkern.testing import assert_matches_reference
from test_kdiff_comfy_parity import SIG, _check
from test_kdiffusion_parity import GMM, Draws, model, start

F64 = torch.float64
REF = "reference"


def comfy_lcm(x, sig, ns, s_noise=1.0, s_noise_end=None):
    """ComfyUI's ``sample_lcm`` on a VE model (``noise_scaling(sigma, n, D) = D + sigma*n``): the multiplier of
    step i is s_noise + (s_noise_end - s_noise)*i/(N - 1)."""
    n = max(1, len(sig) - 1)
    end = s_noise if s_noise_end is None else s_noise_end
    for i in range(len(sig) - 1):
        x = model(x, sig[i])
        if sig[i + 1] > 0:
            t = i / (n - 1) if n > 1 else 0.0
            x = x + sig[i + 1] * (s_noise + (end - s_noise) * t) * ns(sig[i], sig[i + 1]).to(x.dtype)
    return x


@pytest.mark.parametrize("kw", [{}, {"s_noise": 0.6}, {"s_noise": 1.2, "s_noise_end": 0.3},
                                {"s_noise_end": 0.0}], ids=["default", "const", "ramp", "to-zero"])
def test_lcm_is_comfyuis_with_its_noise_ramp(kw):
    calls = _check("lcm", comfy_lcm, kw)
    assert len(calls) == len(SIG) - 2


def test_lcm_settings_positional_in_comfyuis_order():
    params = list(inspect.signature(samplers.sample_lcm).parameters.values())[6:]
    assert [p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD] == ["noise_sampler", "s_noise",
                                                                               "s_noise_end"]
    pos = samplers.sample_lcm(GMM, start(), SIG, None, None, True, None, 1.1, 0.4, seed=2, backend=REF)
    kw = samplers.sample_lcm(GMM, start(), SIG, disable=True, s_noise=1.1, s_noise_end=0.4, seed=2, backend=REF)
    assert torch.equal(pos, kw)
    assert diffkern.knobs("lcm") == {"s_noise": 1.0, "s_noise_end": None}


def test_lcm_ramp_on_the_philox_stream():
    sig = schedules.karras(6, 0.05, 8.0).tolist()
    x = start()
    noises = [philox.noise_like(x, torch.tensor([4]), i, F64) for i in range(len(sig) - 1)]
    it = iter(noises)
    want = comfy_lcm(x, sig, lambda s, sn: next(it), s_noise=0.9, s_noise_end=0.2)
    got = diffkern.sample(GMM, x, sig, "lcm", seed=4, backend=REF, s_noise=0.9, s_noise_end=0.2)
    assert_matches_reference(got, want, want, "lcm ramp, Philox")


def test_lcm_one_step_uses_s_noise():
    ns = Draws(start())
    got = samplers.sample_lcm(GMM, start(), [5.0, 2.0], disable=True, noise_sampler=ns, s_noise=0.7,
                              s_noise_end=3.0, backend=REF)
    want = comfy_lcm(start(), [5.0, 2.0], Draws(start()), s_noise=0.7, s_noise_end=3.0)
    assert_matches_reference(got, want, want, "lcm one step")


@pytest.mark.parametrize("bad, err", [(-0.5, ValueError), (math.nan, ValueError), ("1", TypeError)])
def test_lcm_bad_s_noise_end_names_it(bad, err):
    with pytest.raises(err, match="^s_noise_end: expected"):
        diffkern.sample(GMM, start(), SIG, "lcm", s_noise_end=bad)

#----------------------------------------------------------------------------
# ipndm_v: ComfyUI's variable-step weights, restated in its own variables (h_n = t_next - t_cur, h_n_1, ...).


def comfy_ipndm_v(x, sig, ns=None, max_order=4):
    buf = []
    for i in range(len(sig) - 1):
        den = model(x, sig[i])
        d = (x - den) / sig[i]
        order = min(max_order, i + 1)
        hn = sig[i + 1] - sig[i]
        if sig[i + 1] == 0:
            x = den
        elif order == 1:
            x = x + hn * d
        else:
            h1 = sig[i] - sig[i - 1]
            q = hn / h1
            c = [(2 + q) / 2, -q / 2, 0.0, 0.0]
            if order >= 3:
                h2 = sig[i - 1] - sig[i - 2]
                t1 = (1 - hn / (3 * (hn + h1)) * (hn * (hn + h1)) / (h1 * (h1 + h2))) / 2
                c = [c[0] + t1, c[1] - (1 + h1 / h2) * t1, t1 * h1 / h2, 0.0]
            if order == 4:
                h3 = sig[i - 2] - sig[i - 3]
                t2 = (((1 - hn / (3 * (hn + h1))) / 2 + (1 - hn / (2 * (hn + h1))) * hn / (6 * (hn + h1 + h2)))
                      * (hn * (hn + h1) * (hn + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3)))
                b = h1 * (h1 + h2) / (h2 * (h2 + h3))
                c = [c[0] + t2, c[1] - (1 + h1 / h2 + b) * t2, c[2] + (h1 / h2 + b * (1 + h2 / h3)) * t2,
                     -t2 * b * h1 / h2]
            x = x + hn * (c[0] * d + sum(cj * bj for cj, bj in zip(c[1:order], buf[::-1])))
        buf = (buf + [d])[-(max_order - 1):]
    return x


@pytest.mark.parametrize("max_order", [2, 3, 4])
def test_ipndm_v_is_comfyuis(max_order):
    sig = schedules.karras(9, 0.03, 12.0).tolist()
    for dtype in (F64, torch.float32):
        want = comfy_ipndm_v(start(), sig, max_order=max_order)
        eager = comfy_ipndm_v(start(dtype), sig, max_order=max_order)
        got = diffkern.sample(GMM, start(dtype), sig, "ipndm_v", backend=REF, max_order=max_order)
        assert_matches_reference(got, want, eager, f"ipndm_v max_order={max_order} {dtype}")

#----------------------------------------------------------------------------
# dpmpp_2m_sde / dpmpp_3m_sde: ComfyUI's loops (half-logSNR lambda = -log sigma, alpha_t = 1 on a VE model).


def comfy_2m_sde(x, sig, ns, eta=1.0, s_noise=1.0, solver_type="midpoint"):
    old, h_last = None, None
    for i in range(len(sig) - 1):
        den = model(x, sig[i])
        h = None
        if sig[i + 1] == 0:
            x = den
        else:
            h = math.log(sig[i]) - math.log(sig[i + 1])
            he = h * (eta + 1)
            x = sig[i + 1] / sig[i] * math.exp(-h * eta) * x - math.expm1(-he) * den
            if old is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + (-math.expm1(-he) / (-he) + 1) / r * (den - old)
                else:
                    x = x + 0.5 * -math.expm1(-he) / r * (den - old)
            if eta > 0 and s_noise > 0:
                x = x + ns(sig[i], sig[i + 1]).to(x.dtype) * sig[i + 1] * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
        old, h_last = den, h
    return x


def comfy_3m_sde(x, sig, ns, eta=1.0, s_noise=1.0):
    d_1 = d_2 = h_1 = h_2 = None
    for i in range(len(sig) - 1):
        den = model(x, sig[i])
        h = None
        if sig[i + 1] == 0:
            x = den
        else:
            h = math.log(sig[i]) - math.log(sig[i + 1])
            he = h * (eta + 1)
            x = sig[i + 1] / sig[i] * math.exp(-h * eta) * x - math.expm1(-he) * den
            phi_2 = math.expm1(-he) / he + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (den - d_1) / r0, (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / he - 0.5) * d2
            elif h_1 is not None:
                x = x + phi_2 * (den - d_1) / (h_1 / h)
            if eta > 0 and s_noise > 0:
                x = x + ns(sig[i], sig[i + 1]).to(x.dtype) * sig[i + 1] * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
        d_1, d_2, h_1, h_2 = den, d_1, h, h_1
    return x


@pytest.mark.parametrize("kw", [{}, {"solver_type": "heun"}, {"eta": 0.5, "s_noise": 0.8},
                                {"eta": 0.0, "solver_type": "heun"}], ids=["midpoint", "heun", "eta0.5", "ode-heun"])
def test_dpmpp_2m_sde_is_comfyuis(kw):
    _check("dpmpp_2m_sde", comfy_2m_sde, kw)


@pytest.mark.parametrize("kw", [{}, {"eta": 0.4, "s_noise": 1.3}, {"eta": 0.0}], ids=["eta1", "eta0.4", "ode"])
def test_dpmpp_3m_sde_is_comfyuis(kw):
    _check("dpmpp_3m_sde", comfy_3m_sde, kw)


@pytest.mark.parametrize("method, comfy", [("dpmpp_2m_sde", comfy_2m_sde), ("dpmpp_3m_sde", comfy_3m_sde)])
def test_sde_without_noise_is_comfyuis_result(method, comfy):
    """s_noise = 0: ComfyUI skips the noise_sampler (``eta > 0 and s_noise > 0``); diffkern calls it as
    k-diffusion does (``if eta``) and multiplies the draw by 0, so the state is ComfyUI's all the same."""
    ns = Draws(start())
    got = samplers.SAMPLERS[method](GMM, start(), SIG, disable=True, noise_sampler=ns, s_noise=0.0, backend=REF)
    want = comfy(start(), SIG, Draws(start()), s_noise=0.0)
    assert_matches_reference(got, want, want, f"{method} s_noise=0")
    assert len(ns.calls) == len(SIG) - 2  # k-diffusion's calls; ComfyUI's loop makes none


def test_sde_settings_positional_in_comfyuis_order():
    for method, names in (("dpmpp_2m_sde", ["eta", "s_noise", "noise_sampler", "solver_type"]),
                          ("dpmpp_3m_sde", ["eta", "s_noise", "noise_sampler"]),
                          ("dpmpp_sde", ["eta", "s_noise", "noise_sampler", "r"])):
        params = list(inspect.signature(samplers.SAMPLERS[method]).parameters.values())[6:]
        assert [p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD] == names, method

#----------------------------------------------------------------------------
# The callback: ComfyUI's dict for every one of these samplers.


@pytest.mark.parametrize("method", ["lcm", "ipndm", "ipndm_v", "res_multistep", "res_multistep_ancestral", "er_sde",
                                    "dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_callback_dict_has_comfyuis_keys(method):
    seen = []
    diffkern.sample(GMM, start(), SIG, method, backend=REF, seed=1, callback=seen.append)
    assert [d["i"] for d in seen] == list(range(len(SIG) - 1))
    assert all({"x", "i", "sigma", "sigma_hat", "denoised"} <= set(d) for d in seen)
    assert all(float(d["sigma"]) == s and float(d["sigma_hat"]) == s for d, s in zip(seen, SIG))
