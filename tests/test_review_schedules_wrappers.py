"""Review of schedules.py, wrappers.py and wrappers_continuous.py against oracles the older tests do not use:
diffusers' own float64 helpers (``_convert_to_karras``/``_convert_to_exponential``/``_sigma_to_t``), k-diffusion's
DiscreteSchedule written out here, mpmath, and two separate network calls for CFG. Regression tests for the fixes
are marked "regression"."""
import math

import mpmath
import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from diffkern import schedules as S
from diffkern import wrappers as W
from diffkern.testing import assert_matches_reference

F64 = torch.float64
EPS = torch.finfo(F64).eps
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _sd_table():
    sch = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return sch, S.alpha_bar_to_sigma(sch.alphas_cumprod.double())

#----------------------------------------------------------------------------
# VE schedules.


@pytest.mark.parametrize("n", [1, 2, 5, 33])
def test_karras_matches_diffusers_float64_and_mpmath(n):
    # diffusers' _convert_to_karras (numpy float64, rho = 7): the same formula, so agreement to a few ulps
    sch = EulerDiscreteScheduler(sigma_min=0.002, sigma_max=80.0)
    want = torch.from_numpy(sch._convert_to_karras(torch.tensor([80.0, 0.002]), n))
    got = S.karras(n, 0.002, 80.0)
    torch.testing.assert_close(got[:-1], want, rtol=8 * 7 * EPS, atol=0)
    assert got[-1] == 0
    # mpmath: the formula's float64 rounding is amplified by rho (sigma = u^rho), so rho*eps is the scale.
    # Regression: k-diffusion's form max + ramp*(min - max) cancelled near sigma_min at small rho (rho = 0.5:
    # 1e-9 relative at sigma_min = 0.01 here, 5.6e-8 on [0.002, 80])
    for rho in (0.5, 1.0, 3.0, 7.0, 20.0):
        s = S.karras(n, 0.01, 50.0, rho)
        with mpmath.workdps(40):
            a, b = mpmath.mpf(50.0) ** (1 / mpmath.mpf(rho)), mpmath.mpf(0.01) ** (1 / mpmath.mpf(rho))
            ref = [float((a + mpmath.mpf(i) / max(n - 1, 1) * (b - a)) ** rho) for i in range(n)]
        torch.testing.assert_close(s[:-1], torch.tensor(ref, dtype=F64), rtol=8 * max(rho, 1) * EPS, atol=0)


def test_karras_tiny_rho_is_refused_by_name():
    # regression: rho = 0.001 raised a bare OverflowError from 80.0 ** 1000; with sigma_max <= 1 a tiny rho
    # flushed sigma_min**(1/rho) to 0 and the schedule ended [..., 0, 0] instead of [..., sigma_min, 0]
    with pytest.raises(ValueError, match=r"^karras: rho: 0.001 is too small for sigma range \[0.002, 80.0\]"):
        S.karras(5, 0.002, 80.0, rho=0.001)
    with pytest.raises(ValueError, match="karras: rho: 0.005 is too small"):
        S.karras(5, 0.002, 1.0, rho=0.005)
    # just inside the range it still ends at sigma_min (the cancelling form gave [..., 0.986, 0.0, 0.0] here)
    s = S.karras(5, 0.002, 1.0, rho=0.01)
    torch.testing.assert_close(s[[0, -2]], torch.tensor([1.0, 0.002], dtype=F64), rtol=1e-12, atol=0)
    assert (s[1:] < s[:-1]).all()


def test_karras_and_loglinear_edge_values():
    assert S.karras(1, 0.1, 10.0).tolist() == pytest.approx([10.0, 0.0], rel=8 * EPS)  # n = 1: sigma_max, 0
    assert S.loglinear(1, 0.1, 10.0).tolist() == pytest.approx([10.0, 0.0], rel=4 * EPS)  # exp(log 10)
    assert S.polyexponential(1, 0.1, 10.0, 2.0).tolist() == pytest.approx([10.0, 0.0], rel=1e-15)
    with pytest.raises(ValueError, match="sigma_min == sigma_max"):  # repeated sigmas: test_kdiffusion_repeats
        S.karras(3, 2.0, 2.0)
    assert S.karras(4, torch.tensor(0.1), torch.tensor(10.0, dtype=F64)).dtype == F64  # 0-d tensors accepted
    sch = EulerDiscreteScheduler(sigma_min=0.03, sigma_max=14.0)
    want = torch.from_numpy(sch._convert_to_exponential(torch.tensor([14.0, 0.03]), 11))
    # torch.linspace and numpy's differ by ulps of log sigma (|log sigma| < 4): a few eps relative after exp
    torch.testing.assert_close(S.loglinear(11, 0.03, 14.0)[:-1], want, rtol=8 * EPS, atol=0)

#----------------------------------------------------------------------------
# VP tables and argument errors.


@pytest.mark.parametrize("call, match", [
    # regression: these reached torch (a complex sqrt, a linspace signature error) or passed silently
    (lambda: S.betas(10, -1e-4, 0.02, "scaled_linear"), r"betas: beta_start: expected a number in \[0, 1\)"),
    (lambda: S.betas(10, 1e-4, 1.5, "linear"), r"betas: beta_end: expected a number in \[0, 1\)"),
    (lambda: S.betas(10, "a", 0.02), "betas: beta_start"),
    (lambda: S.betas(10, schedule="squaredcos_cap_v2", max_beta=-1.0), r"betas: max_beta: expected a number in \(0"),
    (lambda: S.betas(10, schedule="squaredcos_cap_v2", max_beta=1.0), "betas: max_beta"),
    (lambda: S.vp_sigmas(torch.tensor([0.9, 0.5]), torch.tensor([True, False])), "integer tensor, got torch.bool"),
    (lambda: S.sample_sigmas(torch.tensor([3.0, 2.0, 1.0]), 2), "train_sigmas must be finite, >= 0 and increasing"),
    (lambda: S.sigma_to_alpha_bar(-1.0), r"sigma_to_alpha_bar: expected a number in \[0, inf\], got -1.0"),
    (lambda: S.alpha_bar_to_sigma(1.5), r"alpha_bar_to_sigma: expected a number in \[0, 1.0\]"),
    (lambda: S.flow_t_to_sigma(float("nan")), "flow_t_to_sigma: expected a number"),
    (lambda: S.iadb_alpha_to_sigma(-0.5), "iadb_alpha_to_sigma"),
])
def test_bad_arguments_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_betas_beta_start_zero_and_cosine_ignore_endpoints():
    b = S.betas(5, 0.0, 0.5)
    assert b[0] == 0 and S.alphas_cumprod(b)[0] == 1
    # squaredcos_cap_v2 ignores beta_start/beta_end (as diffusers), so they are not checked there
    torch.testing.assert_close(S.betas(50, -1.0, 9.0, "squaredcos_cap_v2"), S.betas(50, schedule="squaredcos_cap_v2"))


def test_flow_time_at_infinite_sigma():
    # regression: sigma_to_flow_t(inf) was inf/inf = nan, though flow_t_to_sigma(1) = inf by definition
    assert S.sigma_to_flow_t(math.inf) == 1.0 and S.flow_t_to_sigma(1.0) == math.inf
    s = torch.tensor([0.0, 1e-300, 0.5, 1e300, math.inf], dtype=F64)
    t = S.sigma_to_flow_t(s)
    torch.testing.assert_close(t, torch.tensor([0.0, 1e-300, 1 / 3, 1.0, 1.0], dtype=F64), rtol=EPS, atol=0)
    assert S.sigma_to_flow_t(torch.tensor([1, 3])).dtype == torch.get_default_dtype()  # int tensors divide

#----------------------------------------------------------------------------
# VPDiscreteDenoiser's sigma <-> t against diffusers' _sigma_to_t and k-diffusion's DiscreteSchedule.


def _kdiff_t_to_sigma(log_sigmas, t):
    """k-diffusion DiscreteSchedule.t_to_sigma: log-linear between floor(t) and ceil(t)."""
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


def test_sigma_to_t_matches_diffusers_and_kdiffusion():
    sch, table = _sd_table()
    w = W.VPDiscreteDenoiser(lambda z, t: z, sch.alphas_cumprod)
    log_sigmas = table.log()
    q = torch.cat([torch.logspace(-4, 3, 3001, dtype=F64), table, (table[1:] * table[:-1]).sqrt(),
                   torch.tensor([0.0, table[0] / 2, table[-1] * 2], dtype=F64)])
    want = torch.from_numpy(sch._sigma_to_t(q.numpy(), log_sigmas.numpy()))
    torch.testing.assert_close(w.sigma_to_t(q), want, rtol=0, atol=1e-12)
    # quantize: nearest table entry in log space (k-diffusion: argmin |log sigma - log_sigmas|), int64
    got_q = w.sigma_to_t(q, quantize=True)
    assert got_q.dtype == torch.int64
    assert torch.equal(got_q, (q.log()[None] - log_sigmas[:, None]).abs().argmin(0))
    # t -> sigma inside the table, and round trips both ways
    t = torch.rand(5000, dtype=F64, generator=torch.Generator().manual_seed(0)) * 999
    torch.testing.assert_close(w.t_to_sigma(t), _kdiff_t_to_sigma(log_sigmas, t), rtol=4 * EPS, atol=0)
    torch.testing.assert_close(w.sigma_to_t(w.t_to_sigma(t)), t, rtol=0, atol=1e-10)
    torch.testing.assert_close(w.t_to_sigma(torch.arange(1000)), table, rtol=2 * EPS, atol=0)  # int t accepted
    assert w.sigma_to_t(torch.tensor(0.5)).shape == () and w.sigma_to_t(torch.ones(2, 3)).shape == (2, 3)


def test_t_to_sigma_clamps_outside_the_table():
    # regression: t outside [0, T-1] was extrapolated (t = 1000 gave sigma 14.70 > sigma_max 14.61), which
    # sigma_to_t then mapped back to 999; now both clamp to the table's ends, as diffusers' np.interp does
    sch, table = _sd_table()
    w = W.VPDiscreteDenoiser(lambda z, t: z, sch.alphas_cumprod)
    got = w.t_to_sigma(torch.tensor([-1.0, 0.0, 999.0, 999.5, 1000.0, 5000.0], dtype=F64))
    want = torch.from_numpy(np.interp([-1.0, 0.0, 999.0, 999.5, 1000.0, 5000.0], np.arange(1000), table.numpy()))
    torch.testing.assert_close(got, want, rtol=2 * EPS, atol=0)

#----------------------------------------------------------------------------
# Continuous-time maps.


def test_vp_sde_time_map_against_mpmath():
    # regression: (sqrt(b^2 + 2dL) - b)/d cancelled at small sigma: 3.8e-5 relative error at sigma = 1e-8,
    # 5.6e-8 at 1e-6 (now ~1e-16 everywhere)
    seen = {}

    def net(z, t):
        seen["t"] = t
        return z
    w = W.VPContinuousDenoiser(net, time="vp")
    sig = torch.tensor([1e-8, 1e-6, 1e-4, 1e-2, 1.0, 80.0, 1e5], dtype=F64)
    w(torch.zeros(7, 1, dtype=F64), sig)
    with mpmath.workdps(50):
        ref = []
        for s in sig.tolist():
            big_l = mpmath.log1p(mpmath.mpf(s) ** 2)
            b, d = mpmath.mpf("0.1"), mpmath.mpf("19.9")
            ref.append(float((mpmath.sqrt(b * b + 2 * d * big_l) - b) / d))
    torch.testing.assert_close(seen["t"], torch.tensor(ref, dtype=F64), rtol=8 * EPS, atol=0)
    # and it inverts schedules.vp (same beta_d, beta_min): t runs 1 -> eps_s
    seen.clear()
    s = S.vp(9)[:-1]
    w(torch.zeros(9, 1, dtype=F64), s)
    torch.testing.assert_close(seen["t"], torch.linspace(1, 1e-3, 9, dtype=F64), rtol=1e-13, atol=0)


def test_flow_input_scale_at_large_sigma():
    # regression: the network input was (1 - t)*x, which cancels at large sigma (5e-11 relative at sigma = 1e6)
    seen = {}
    fw = W.FlowDenoiser(lambda xt, t: seen.update(xt=xt, t=t) or torch.zeros_like(xt))
    sig = torch.tensor([1e-3, 1.0, 1e3, 1e6, 1e9], dtype=F64)
    fw(torch.ones(5, 1, dtype=F64), sig)
    with mpmath.workdps(40):
        want_x = [float(1 / (1 + mpmath.mpf(s))) for s in sig.tolist()]
        want_t = [float(mpmath.mpf(s) / (1 + mpmath.mpf(s))) for s in sig.tolist()]
    torch.testing.assert_close(seen["xt"][:, 0], torch.tensor(want_x, dtype=F64), rtol=2 * EPS, atol=0)
    torch.testing.assert_close(seen["t"], torch.tensor(want_t, dtype=F64), rtol=2 * EPS, atol=0)


def test_flow_denoiser_matches_diffusers_flow_match_euler_to_zero():
    # FlowMatchEulerDiscreteScheduler.step from flow time t to 0 is x_t + (0 - t)*v, the x0 estimate; it steps in
    # float32 whatever the input dtype, so it fixes the convention (sign of v, t <-> sigma) to float32 accuracy
    g = torch.Generator().manual_seed(1)
    xt, v = torch.randn(3, 4, generator=g, dtype=F64), torch.randn(3, 4, generator=g, dtype=F64)
    for t in (0.0625, 0.5, 0.96875):  # exact in float32, the scheduler's sigma dtype
        sch = FlowMatchEulerDiscreteScheduler(shift=1.0)
        sch.set_timesteps(sigmas=[t])
        eager = sch.step(v, sch.timesteps[0], xt).prev_sample.double()
        d = W.FlowDenoiser(lambda x_in, tt: v)(xt / (1 - t), t / (1 - t))
        torch.testing.assert_close(d, xt - t * v, rtol=4 * EPS, atol=4 * EPS)
        torch.testing.assert_close(eager, d, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), 0.0, -1.0, True, "1000"])
def test_t_scale_is_checked(bad):
    # regression: float(t_scale) let nan, 0, negatives and True through (nan timesteps at every call)
    with pytest.raises(ValueError, match="FlowDenoiser: t_scale must be a finite float > 0"):
        W.FlowDenoiser(lambda x, t: x, t_scale=bad)
    with pytest.raises(ValueError, match="VPContinuousDenoiser: t_scale must be a finite float > 0"):
        W.VPContinuousDenoiser(lambda x, t: x, t_scale=bad)

#----------------------------------------------------------------------------
# Classifier-free guidance against two separate network calls.


def _cond_net(calls):
    """An eps network whose output depends on x, t and every kind of conditioning (tensor, dict, list, labels)."""
    def net(z, t, emb=None, extra=None, labels=None, scale=1.0):
        calls.append(z.shape[0])
        out = torch.sin(z) * (1 + t.double().view(-1, 1)) * scale
        out = out + emb.sum(-1, keepdim=True) + extra["a"] * extra["b"][0]
        return out + labels.double().view(-1, 1)
    return net


@pytest.mark.parametrize("scale", [0.0, 1.0, 2.5, -0.5])
def test_cfg_matches_two_separate_calls(scale):
    calls = []
    net = _cond_net(calls)
    ab = S.alphas_cumprod(S.betas(1000))
    w = W.VPDiscreteDenoiser(net, ab, quantize=True, guidance_scale=scale)
    g = torch.Generator().manual_seed(2)
    x, sig = torch.randn(3, 5, generator=g, dtype=F64) * 4, torch.tensor([0.3, 2.0, 9.0], dtype=F64)
    emb, u_emb = torch.randn(3, 7, generator=g, dtype=F64), torch.randn(3, 7, generator=g, dtype=F64)
    extra = {"a": torch.randn(3, 1, generator=g, dtype=F64), "b": [torch.randn(3, 1, generator=g, dtype=F64)]}
    u_extra = {"a": torch.randn(3, 1, generator=g, dtype=F64), "b": [torch.randn(3, 1, generator=g, dtype=F64)]}
    labels = torch.tensor([1, 4, 2])  # not paired: reaches both halves (duplicated along the batch)
    d = w(x, sig, emb=emb, uncond_emb=u_emb, extra=extra, uncond_extra=u_extra, labels=labels, scale=2.0,
          uncond_scale=2.0)
    assert calls == ([3] if scale == 1.0 else [6])  # one batched call, or none of the uncond inputs at w = 1
    # the oracle: k-diffusion's DiscreteEpsDDPMDenoiser by hand, two calls, then u + w*(c - u)
    t = w.sigma_to_t(sig, quantize=True)
    z = x / (sig.view(-1, 1) ** 2 + 1).sqrt()
    c = net(z, t, emb=emb, extra=extra, labels=labels, scale=2.0)
    u = net(z, t, emb=u_emb, extra=u_extra, labels=labels, scale=2.0)
    m = u + scale * (c - u)
    torch.testing.assert_close(d, x - sig.view(-1, 1) * m, rtol=1e-13, atol=1e-13)
    if scale == 0.0:  # w = 0 is the unconditional model alone
        torch.testing.assert_close(d, x - sig.view(-1, 1) * u, rtol=1e-13, atol=1e-13)


def test_cfg_float32_follows_the_tolerance_rule():
    net = _cond_net([])
    w = W.KarrasDenoiser(lambda xi, cn, **kw: net(xi, cn, **kw), sigma_data=0.5, guidance_scale=4.0)
    g = torch.Generator().manual_seed(3)
    x, sig = torch.randn(4, 6, generator=g, dtype=F64) * 3, torch.tensor([0.05, 0.5, 5.0, 50.0], dtype=F64)
    kw = dict(emb=torch.randn(4, 2, generator=g, dtype=F64), extra={"a": torch.zeros(4, 1), "b": [torch.ones(1)]},
              labels=torch.zeros(4))
    ukw = dict(uncond_emb=torch.randn(4, 2, generator=g, dtype=F64))
    ref = w(x, sig, **kw, **ukw)
    f32 = {k: v.float() for k, v in {**kw, **ukw}.items() if isinstance(v, torch.Tensor)}
    got = w(x.float(), sig.float(), **{**kw, **ukw, **f32})
    # eager: the same formulas in float32 arithmetic by hand (EDM Table 1, sigma_data = 0.5)
    xs, ss = x.float(), sig.float().view(-1, 1)
    cin, cskip, cout = 1 / (ss ** 2 + 0.25).sqrt(), 0.25 / (ss ** 2 + 0.25), ss * 0.5 / (ss ** 2 + 0.25).sqrt()
    cn = ss.view(-1).log() / 4
    c = net(xs * cin, cn, emb=f32["emb"], extra=kw["extra"], labels=f32["labels"]).float()
    u = net(xs * cin, cn, emb=f32["uncond_emb"], extra=kw["extra"], labels=f32["labels"]).float()
    eager = cskip * xs + cout * (u + 4.0 * (c - u))
    assert_matches_reference(got, ref, eager, "cfg float32")
