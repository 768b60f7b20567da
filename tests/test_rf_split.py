"""ComfyUI's ``_RF`` ancestral samplers (comfyanonymous/ComfyUI at 02159d814dee609acc27994c1bf25fc5b40e2aaa,
comfy/k_diffusion/sampling.py: ``sample_euler_ancestral_RF``, ``sample_dpmpp_2s_ancestral_RF``,
``sample_dpm_2_ancestral_RF``, which ComfyUI runs for a flow (CONST) model) as ``split="rf"`` of diffkern's
euler_ancestral, dpmpp_2s_ancestral and dpm_2_ancestral; and ``diffkern.sample``'s "gradient_estimation" alias.

ComfyUI's loops are restated below in float64 in its own coordinates (flow sigma t, state z = (1 - t) x0 + t eps, the
model's denoised ``z - t*v``), on the exact velocity of a Gaussian mixture (posterior written in flow coordinates, so
that t = 1 is exact), with one noise_sampler handing out precomputed draws in call order. diffkern runs the same
velocity network through :class:`~diffkern.wrappers.FlowDenoiser` on the VE state x = z/(1 - t) at sigma = t/(1 - t)
(t = 1 at ``FLOW_TOP``). ComfyUI is GPL and not installed: the loops are the maths, written here, not its code.
"""
import math
import os

import pytest
import torch

import diffkern
from diffkern import analytic, coef_tables, coef_tables_flow, samplers, wrappers
from diffkern.diffusers.loop_spec import FLOW_TOP
from diffkern.testing import assert_matches_reference
from test_gradient_estimation18 import comfy_gradient_estimation
from test_kdiffusion_parity import GMM as VE_GMM
from test_kdiffusion_parity import start

F64 = torch.float64
REF = "reference"
GMM = analytic.GaussianMixture.demo_2d()
METHODS = {"euler": "euler_ancestral", "dpmpp_2s": "dpmpp_2s_ancestral", "dpm_2": "dpm_2_ancestral"}
# flow schedules t (1.0: FLOW_TOP in VE); "shift3": SD3's shifted 8 steps from t = 1
SCHEDULES = {"shift3": [3 * u / (1 + 2 * u) for u in [1 - k / 8 for k in range(9)]],
             "from-0.92": [0.92, 0.8, 0.6, 0.45, 0.3, 0.15, 0.05, 0.0],
             "no-zero": [0.9, 0.7, 0.5, 0.3, 0.1], "repeated": [0.9, 0.6, 0.6, 0.3, 0.0], "one-step": [0.8, 0.0]}


def flow_x0(z, t):
    """E[x0 | (1 - t) x0 + t eps = z] for the mixture, float64, in z's dtype (per component: mean (1 - t) m_k,
    variance (1 - t)^2 s_k^2 + t^2). t: a float or (B,) tensor."""
    tt = torch.as_tensor(t, dtype=F64).reshape(-1, 1, 1)
    zd, a = z.double(), 1.0 - tt
    var = a * a * GMM.stds[None] ** 2 + tt ** 2                              # (B, K, D)
    diff = zd[:, None, :] - a * GMM.means[None]                               # (B, K, D)
    log_comp = GMM.weights.log()[None] - 0.5 * (diff ** 2 / var + var.log()).sum(-1)
    post = GMM.means[None] + a * GMM.stds[None] ** 2 / var * diff
    return torch.einsum("bk,bkd->bd", torch.softmax(log_comp, dim=1), post).to(z.dtype)


def velocity(z, t):
    """The flow network v = (z - x0)/t, given z (B, 2) and t (B,) as FlowDenoiser calls it."""
    return ((z.double() - flow_x0(z, t).double()) / t.double()[:, None]).to(z.dtype)


FLOW = wrappers.FlowDenoiser(velocity)


def ve_sigmas(ts):
    return [FLOW_TOP if t == 1.0 else t / (1.0 - t) for t in ts]


class Draws:
    """A noise_sampler handing out precomputed float64 normals in call order (cast to the run's dtype), recording
    the pairs it was called with as floats."""

    def __init__(self, dtype=F64, n=32, seed=9):
        self.noise = torch.randn((n, 6, 2), dtype=F64, generator=torch.Generator().manual_seed(seed)).to(dtype)
        self.calls = []

    def __call__(self, sigma, sigma_next):
        self.calls.append((float(sigma), float(sigma_next)))
        return self.noise[len(self.calls) - 1]


def z_start(dtype=F64):
    return torch.randn(6, 2, dtype=F64, generator=torch.Generator().manual_seed(5)).to(dtype)

#----------------------------------------------------------------------------
# ComfyUI's _RF loops (z in the run's dtype, t as Python floats, the model in float64 returning z's dtype).


def _rf_split(t, tn, eta):
    """(t_down, 1 - t_next, 1 - t_down, renoise coefficient) of ComfyUI's loops. The renoise coefficient
    sqrt(tn^2 - td^2 a1^2/ad^2) is evaluated as sqrt((tn - td)/ad*(tn + td*a1/ad)), tn - td = tn*eta*(1 - tn/t): the
    same value without ComfyUI's cancellation, which at eta = 0 leaves about sqrt(ulp)*tn of noise (2e-9 in float64
    on t 0.3 -> 0.1) where the maths has none, and a relative error of ulp/eta at small eta."""
    td = tn * (1 + (tn / t - 1) * eta)
    a1, ad = 1 - tn, 1 - td
    return td, a1, ad, ((tn * eta * (1 - tn / t)) / ad * (tn + td * a1 / ad)) ** 0.5


def comfy_euler_ancestral_rf(z, ts, ns, eta=1.0, s_noise=1.0):
    for i in range(len(ts) - 1):
        t, tn = ts[i], ts[i + 1]
        den = flow_x0(z, t)
        if tn == 0:
            z = den
            continue
        td, a1, ad, renoise = _rf_split(t, tn, eta)
        z = (td / t) * z + (1 - td / t) * den
        if eta > 0:
            z = (a1 / ad) * z + ns(t, tn) * s_noise * renoise
    return z


def comfy_dpmpp_2s_ancestral_rf(z, ts, ns, eta=1.0, s_noise=1.0):
    lam = lambda t: math.log((1 - t) / t)  # noqa: E731
    for i in range(len(ts) - 1):
        t, tn = ts[i], ts[i + 1]
        den = flow_x0(z, t)
        td, a1, ad, renoise = _rf_split(t, tn, eta)
        if tn == 0:
            z = z + (z - den) / t * (td - t)
        else:
            t_s = 0.9999 if t == 1.0 else 1 / (math.exp(0.5 * (lam(t) + lam(td))) + 1)
            d_i = flow_x0((t_s / t) * z + (1 - t_s / t) * den, t_s)
            z = (td / t) * z + (1 - td / t) * d_i
        if tn > 0 and eta > 0:
            z = (a1 / ad) * z + ns(t, tn) * s_noise * renoise
    return z


def comfy_dpm_2_ancestral_rf(z, ts, ns, eta=1.0, s_noise=1.0):
    for i in range(len(ts) - 1):
        t, tn = ts[i], ts[i + 1]
        den = flow_x0(z, t)
        td, a1, ad, renoise = _rf_split(t, tn, eta)
        d = (z - den) / t
        if td == 0:
            z = z + d * (td - t)
        else:
            t_mid = math.exp(0.5 * (math.log(t) + math.log(td)))
            z_2 = z + d * (t_mid - t)
            d_2 = (z_2 - flow_x0(z_2, t_mid)) / t_mid
            z = z + d_2 * (td - t)
            z = (a1 / ad) * z + ns(t, tn) * s_noise * renoise
    return z


COMFY = {"euler": comfy_euler_ancestral_rf, "dpmpp_2s": comfy_dpmpp_2s_ancestral_rf, "dpm_2": comfy_dpm_2_ancestral_rf}


def run_pair(kind, ts, dtype, backend=REF, **kw):
    """(ours as ComfyUI's z, ComfyUI's z), each with its own Draws in ``dtype``; asserts the noise_sampler calls
    (same steps, ours at the VE sigmas of ComfyUI's t)."""
    sig = ve_sigmas(ts)
    ours_ns, comfy_ns = Draws(dtype), Draws(dtype)
    x = z_start(dtype) * (1.0 + sig[0])  # at FLOW_TOP a power of two: exact
    got = samplers.SAMPLERS[METHODS[kind]](FLOW, x, sig, disable=True, noise_sampler=ours_ns, backend=backend,
                                           split="rf", **kw)
    want = COMFY[kind](z_start(dtype), ts, comfy_ns, **kw)
    assert len(ours_ns.calls) == len(comfy_ns.calls), (kind, ours_ns.calls, comfy_ns.calls)
    for (s, sn), (t, tn) in zip(ours_ns.calls, comfy_ns.calls):
        assert s / (1 + s) == pytest.approx(t, rel=1e-15) and sn / (1 + sn) == pytest.approx(tn, rel=1e-15, abs=0)
    return got / (1.0 + sig[-1]), want  # z = x/(1 + sigma); the identity at a final 0

#----------------------------------------------------------------------------
# ComfyUI parity.

KWS = [{}, {"eta": 0.5}, {"eta": 1.3, "s_noise": 0.8}, {"eta": 0.0}]
KW_IDS = ["eta1", "eta0.5", "eta1.3-s_noise0.8", "eta0"]


@pytest.mark.parametrize("kw", KWS, ids=KW_IDS)
@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("kind", sorted(METHODS))
def test_rf_split_is_comfyuis_loop_float64(kind, name, kw):
    got, want = run_pair(kind, SCHEDULES[name], F64, **kw)
    assert_matches_reference(got, want, want, f"{kind} rf {name} {kw} float64")  # 1e-12*max(1, |ref|)


@pytest.mark.parametrize("kind", sorted(METHODS))
def test_rf_split_every_backend(kind, cpu_backend):
    """Every CPU backend: float64 to the floor and float32 by the tolerance rule against ComfyUI's loops (its float32
    loop the yardstick: 0 failures in 180 measured seed x schedule x method runs); 16-bit by the rule with diffkern's
    reference backend in that dtype as the yardstick. ComfyUI's own 16-bit loop is no yardstick here: the mixture's
    sharp denoiser amplifies each loop's roundings differently, and the ratio of the two loops' 16-bit errors ranged
    from 0.1 to 23 over seeds (either side worse; 13 of 300 runs outside the rule), as test_kdiffusion_parity found
    for k-diffusion's loops (16-bit: :func:`test_rf_split_16_bit`)."""
    for name in ("shift3", "from-0.92"):
        got64, want64 = run_pair(kind, SCHEDULES[name], F64, backend=cpu_backend, eta=0.8)
        assert_matches_reference(got64, want64, want64, f"{kind} rf {name} [{cpu_backend}] float64")
        got32, eager32 = run_pair(kind, SCHEDULES[name], torch.float32, backend=cpu_backend, eta=0.8)
        assert_matches_reference(got32, want64, eager32, f"{kind} rf {name} [{cpu_backend}] float32")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", sorted(METHODS))
def test_rf_split_16_bit(kind, dtype, cpu_backend):
    if cpu_backend == "triton" and dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the Triton interpreter rounds float32 -> bfloat16 toward zero (the GPU: to nearest even), "
                    "a drift this bound sees (as test_sixteen_bit)")
    # float16 cannot hold the VE state at FLOW_TOP (z*2^70): its schedules start below t = 1
    for name in ("shift3", "no-zero") if dtype == torch.bfloat16 else ("from-0.92", "no-zero"):
        _, want64 = run_pair(kind, SCHEDULES[name], F64, eta=0.8)
        eager, _ = run_pair(kind, SCHEDULES[name], dtype, eta=0.8)
        got, _ = run_pair(kind, SCHEDULES[name], dtype, backend=cpu_backend, eta=0.8)
        assert got.dtype == dtype
        assert_matches_reference(got, want64, eager, f"{kind} rf {name} [{cpu_backend}] {dtype}")


@pytest.mark.parametrize("kind", sorted(METHODS))
def test_rf_split_philox_and_sample(kind):
    """With Philox noise (no noise_sampler) the rf run is the loop fed the same draws; ``diffkern.sample`` takes the
    knob and gives the sampler's output; the default is k-diffusion's split, another run."""
    method, ts = METHODS[kind], SCHEDULES["shift3"]
    sig = ve_sigmas(ts)
    x = z_start() * (1.0 + sig[0])
    ours = diffkern.sample(FLOW, x, sig, method, seed=7, backend=REF, split="rf", eta=0.9)
    assert torch.equal(ours, samplers.SAMPLERS[method](FLOW, x, sig, disable=True, seed=7, backend=REF, split="rf",
                                                       eta=0.9))
    assert diffkern.knobs(method)["split"] == "ve"
    ve = diffkern.sample(FLOW, x, sig, method, seed=7, backend=REF, eta=0.9)
    assert float((ve - ours).abs().max()) > 1e-3


@pytest.mark.parametrize("kind", sorted(METHODS))
def test_rf_at_eta_0_is_the_deterministic_step_and_draws_as_comfyui(kind):
    """At eta = 0 t_down = t_next: euler's and 2S's rf rows are their VE rows (ComfyUI's loops then call no
    noise_sampler); dpm_2's rf step stays the DPM-Solver-2 step in flow time, another step (ComfyUI's loop calls the
    noise_sampler on every step to t_next > 0, times 0)."""
    method, sig = METHODS[kind], ve_sigmas(SCHEDULES["from-0.92"])
    rf = samplers.SAMPLERS[method](FLOW, z_start() * (1 + sig[0]), sig, disable=True, eta=0.0, split="rf",
                                   noise_sampler=(ns := Draws()), backend=REF)
    ve = samplers.SAMPLERS[method](FLOW, z_start() * (1 + sig[0]), sig, disable=True, eta=0.0, backend=REF)
    if kind == "dpm_2":
        assert float((rf - ve).abs().max()) > 1e-3 and len(ns.calls) == len(sig) - 2
    else:
        assert torch.equal(rf, ve) and ns.calls == []


def test_rf_sigma_down_closed_form():
    """rf_ancestral_step against ComfyUI's t_down and renoise coefficient mapped to VE, and README's eta = 1 form."""
    for ts in SCHEDULES.values():
        for t, tn in zip(ts[:-1], ts[1:]):
            for eta in (0.0, 0.3, 1.0, 1.4):
                s, sn = ve_sigmas([t, tn])
                down, up = coef_tables_flow.rf_ancestral_step(s, sn, eta)
                td, a1, ad, renoise = _rf_split(t, tn, eta) if tn > 0 else (0.0, 1.0, 1.0, 0.0)
                assert down == pytest.approx(td / (1 - td), rel=1e-13)
                assert up == pytest.approx(renoise / a1, rel=1e-12, abs=1e-15)
                if eta == 1.0 and tn > 0 and t < 1:
                    assert down == pytest.approx(sn ** 2 * (1 + s) / (s * (1 + 2 * sn) - sn ** 2), rel=1e-13)
    assert coef_tables_flow.rf_ancestral_step(4.0, 1.0, 0.0) == coef_tables.ancestral_step(4.0, 1.0, 0.0)

#----------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("bad", ["RF", "flow", "", None, 1, b"rf", ("rf",)])
@pytest.mark.parametrize("method", sorted(METHODS.values()))
def test_bad_split_names_it(method, bad):
    sig = ve_sigmas(SCHEDULES["from-0.92"])
    with pytest.raises(ValueError, match=r"^split: expected 've' .* or 'rf' .*, got "):
        samplers.SAMPLERS[method](FLOW, z_start(), sig, disable=True, split=bad)
    with pytest.raises(ValueError, match=r"^split: expected"):
        diffkern.sample(FLOW, z_start(), sig, method, split=bad)


@pytest.mark.parametrize("method", sorted(METHODS.values()))
def test_rf_refuses_an_eta_that_puts_t_down_below_0(method):
    """t_down = t_next*(1 + eta*(t_next/t - 1)) <= 0 for eta >= t/(t - t_next) (here 0.8/0.3 = 2.67): refused,
    naming eta (ComfyUI's loops step past the data there, or take a NaN square root); the VE split clamps, as
    k-diffusion's."""
    sig = ve_sigmas([0.8, 0.5, 0.0])
    with pytest.raises(ValueError, match=r"^eta: split='rf' needs t_down"):
        samplers.SAMPLERS[method](FLOW, z_start(), sig, disable=True, eta=2.7, split="rf")
    assert torch.isfinite(samplers.SAMPLERS[method](FLOW, z_start(), sig, disable=True, eta=2.6, split="rf")).all()
    assert torch.isfinite(samplers.SAMPLERS[method](FLOW, z_start(), sig, disable=True, eta=3.0)).all()

#----------------------------------------------------------------------------
# diffkern.sample's "gradient_estimation": ComfyUI's name of ge at mu = 0.

GE_SIG = [12.0, 6.0, 3.0, 1.5, 0.7, 0.3, 0.0]


@pytest.mark.parametrize("kw, gamma", [({}, 2.0), ({"ge_gamma": 1.5}, 1.5), ({"gamma": 2.8}, 2.8)])
def test_gradient_estimation_alias_is_ge_at_mu_0(kw, gamma):
    got = diffkern.sample(VE_GMM, start(), GE_SIG, "gradient_estimation", backend=REF, **kw)
    assert torch.equal(got, diffkern.sample(VE_GMM, start(), GE_SIG, "ge", backend=REF, gamma=gamma, mu=0.0))
    assert torch.equal(got, samplers.sample_gradient_estimation(VE_GMM, start(), GE_SIG, disable=True, ge_gamma=gamma,
                                                                backend=REF))
    want = comfy_gradient_estimation(start(), GE_SIG, gamma)
    assert_matches_reference(got, want, want, f"gradient_estimation {kw}")


@pytest.mark.parametrize("kw, err, match", [
    ({"mu": 0.5}, TypeError, r"^gradient_estimation: unknown knob\(s\) \['mu'\]"),
    ({"cfg_pp": False}, TypeError, r"^gradient_estimation: unknown knob\(s\) \['cfg_pp'\]"),
    ({"ge_gamma": 2.0, "gamma": 2.0}, TypeError, r"^gradient_estimation: give ge_gamma or gamma, not both"),
    ({"ge_gamma": "2"}, TypeError, r"^ge_gamma: expected a number"),
    ({"ge_gamma": math.nan}, ValueError, r"^ge_gamma: expected a finite value"),
    ({"gamma": math.inf}, ValueError, r"^gamma: expected a finite value")])
def test_gradient_estimation_alias_bad_knobs_name_them(kw, err, match):
    with pytest.raises(err, match=match):
        diffkern.sample(VE_GMM, start(), GE_SIG, "gradient_estimation", **kw)
