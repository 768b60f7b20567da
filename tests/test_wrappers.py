"""Model wrappers: D(x, sigma) from eps/v/x0/flow networks, against diffusers' own formulas and exact networks."""
import math

import pytest
import torch
from diffusers import (DDIMScheduler, EDMEulerScheduler, EulerDiscreteScheduler, UNet2DConditionModel,
                       UNet2DModel)

from diffkern import schedules as S
from diffkern import wrappers as W
from diffkern.analytic import GaussianMixture
from diffkern.ops import coefs, sampler_step_reference
from diffkern.testing import assert_matches_reference

F64 = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(8, 16),
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()


@pytest.fixture(scope="module")
def cond_unet():
    torch.manual_seed(1)
    return UNet2DConditionModel(sample_size=8, in_channels=2, out_channels=2, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=12,
                                attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()


def _ve(sch, t, z):
    """VE state and sigma of VP sample z at integer timestep t: x = z/sqrt(ab), sigma = sqrt((1-ab)/ab)."""
    ab = sch.alphas_cumprod[t].double()
    return z.double() / ab.sqrt(), ((1 - ab) / ab).sqrt()


def _ddim_x0_64(sch, out, t, z):
    """diffusers' DDIMScheduler.step pred_original_sample formulas, in float64."""
    ab, z, m = sch.alphas_cumprod[t].double(), z.double(), out.double()
    pt = sch.config.prediction_type
    if pt == "epsilon":
        return (z - (1 - ab).sqrt() * m) / ab.sqrt()
    if pt == "v_prediction":
        return ab.sqrt() * z - (1 - ab).sqrt() * m
    return m


def _fused_d(wrapper, x, sigma, out, out_uncond):
    """D from the fused step kernel's reference: a table row with b=1 and the wrapper's (p, q, w)."""
    p, q = wrapper.conversion(sigma)
    row = coefs.table([dict(b=1.0, p=p, q=q, w=wrapper.guidance_scale)])
    res, d, _ = sampler_step_reference(x, out, row, 0, model_out_uncond=out_uncond, noise=torch.zeros_like(x))
    torch.testing.assert_close(res, d, rtol=0, atol=0)
    return d

#----------------------------------------------------------------------------
# Conversions.


@pytest.mark.parametrize("sigma", [0.0, 0.05, 1.0, 14.6])
def test_conversion_table(sigma):
    s = sigma
    want = {"epsilon": (1.0, -s), "sample": (0.0, 1.0), "v_prediction": (1 / (1 + s * s), -s / math.sqrt(1 + s * s)),
            "flow": (1 / (1 + s), -s / (1 + s)), "edm": (0.25 / (s * s + 0.25), 0.5 * s / math.sqrt(s * s + 0.25))}
    for kind, (p, q) in want.items():
        got = W.conversion(kind, sigma, sigma_data=0.5)
        assert got == pytest.approx((p, q), rel=1e-15, abs=1e-300)
        pt, qt = W.conversion(kind, torch.tensor([sigma, sigma], dtype=torch.float32), sigma_data=0.5)
        assert pt.dtype == F64 and pt.shape == (2,)
        torch.testing.assert_close(torch.stack([pt, qt]), torch.tensor([[p, p], [q, q]], dtype=F64),
                                   rtol=1e-7, atol=1e-12)  # the float32 sigma is rounded
    assert W.canonical_prediction_type("x0") == "sample" and W.canonical_prediction_type("eps") == "epsilon"
    with pytest.raises(ValueError, match="unknown 'noise'"):
        W.conversion("noise", 1.0)

#----------------------------------------------------------------------------
# Exact networks: built from an analytic mixture and the forward process of each parameterisation.


def _gm():
    return GaussianMixture([1.0, 2.0, 0.7], [[-1.0, 0.5, 0.0], [1.0, 1.0, 2.0], [0.3, -1.2, 0.1]], [0.3, 0.5, 0.4])


def test_vp_discrete_exact_networks():
    gm, ab = _gm(), S.alphas_cumprod(S.betas(1000))
    table = S.alpha_bar_to_sigma(ab)

    def net(kind):
        def f(z, t):  # VP input z = sqrt(ab)*x at integer timesteps t
            a = ab[t].view(-1, 1)
            x, sig = z.double() / a.sqrt(), table[t]
            eps, x0 = gm.eps(x, sig), gm.denoise(x, sig)
            return {"epsilon": eps, "sample": x0, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}[kind]
        return f

    x = torch.randn(4, 3, dtype=F64) * 5
    for kind in ("epsilon", "sample", "v_prediction"):
        w = W.VPDiscreteDenoiser(net(kind), ab, prediction_type=kind, quantize=True)
        for t in (0, 10, 400, 999):
            torch.testing.assert_close(w(x, table[t]), gm.denoise(x, table[t]), rtol=1e-10, atol=1e-10)


def test_continuous_flow_and_edm_exact_networks():
    gm = _gm()
    x, sig = torch.randn(5, 3, dtype=F64) * 3, torch.tensor([0.02, 0.3, 1.0, 4.0, 40.0], dtype=F64)
    # VP continuous, cosine time: the network sees z = x/sqrt(1+sigma^2) and t = 2/pi*atan(sigma)
    def cosine_net(z, t):
        s = torch.tan(t.double() * math.pi / 2)
        return gm.eps(z * (1 + s.view(-1, 1) ** 2).sqrt(), s)
    vp = W.VPContinuousDenoiser(cosine_net, time="cosine")
    # rectified flow: x_t = (1-t)*x0 + t*noise, v = noise - x0 = (x_t - x0)/t, and x_t = (1-t)*x_VE
    flow = W.FlowDenoiser(lambda xt, t: (xt - gm.denoise(xt / (1 - t.view(-1, 1)), t / (1 - t))) / t.view(-1, 1))
    # EDM: F = (D - c_skip*x)/c_out with c_noise = sigma ("sigma" mode)
    sd = 0.5

    def edm_net(x_in, s):
        s = s.double().view(-1, 1)
        xx = x_in * (s * s + sd * sd).sqrt()
        return (gm.denoise(xx, s.view(-1)) - sd ** 2 / (s * s + sd ** 2) * xx) / (s * sd / (s * s + sd ** 2).sqrt())
    edm = W.KarrasDenoiser(edm_net, sigma_data=sd, c_noise="sigma")
    # VE networks (smalldiffusion): called on x and sigma themselves, eps or the sample
    ve_eps = W.VEDenoiser(lambda x_in, s: gm.eps(x_in, s))
    ve_x0 = W.VEDenoiser(lambda x_in, s: gm.denoise(x_in, s), prediction_type="x0")
    for w in (vp, flow, edm, ve_eps, ve_x0):
        torch.testing.assert_close(w(x, sig), gm.denoise(x, sig), rtol=1e-9, atol=1e-9, msg=type(w).__name__)
        out, _ = w.raw(x, sig)
        p, q = w.conversion(sig)
        torch.testing.assert_close(p.view(-1, 1) * x + q.view(-1, 1) * out, gm.denoise(x, sig), rtol=1e-9, atol=1e-9)


def test_time_maps():
    sig = torch.tensor([0.01, 0.5, 3.0, 80.0], dtype=F64)
    seen = {}
    w = W.VPContinuousDenoiser(lambda z, t: seen.setdefault("t", t) is None or z, time="vp", t_scale=1000.0)
    w(torch.zeros(4, 1, dtype=F64), sig)
    t = seen["t"] / 1000  # k-diffusion get_sigmas_vp: sigma(t) = sqrt(exp(beta_d*t^2/2 + beta_min*t) - 1)
    torch.testing.assert_close(torch.sqrt(torch.exp(19.9 * t ** 2 / 2 + 0.1 * t) - 1), sig, rtol=1e-12, atol=0)

#----------------------------------------------------------------------------
# diffusers UNets against the schedulers' own formulas.


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_unet2d_matches_ddim(unet, kind, dtype):
    sch = DDIMScheduler(prediction_type=kind, clip_sample=False)
    sch.set_timesteps(10)
    wrapper = W.DiffusersUNetDenoiser(unet, sch, quantize=True)
    assert wrapper.prediction_type == kind
    g = torch.Generator().manual_seed(2)
    for t in sch.timesteps[[0, 9]]:
        z = torch.randn(3, 2, 8, 8, generator=g)
        x64, sigma = _ve(sch, t, z)
        x = x64.to(dtype)
        with torch.no_grad():
            out = unet(z, t).sample
            eager = sch.step(out, t, z).pred_original_sample           # diffusers, float32 arithmetic
            d = wrapper(x, sigma.expand(3))
            raw, uncond = wrapper.raw(x, sigma)
        assert uncond is None and d.dtype == dtype
        ref = _ddim_x0_64(sch, out, t, z)                              # diffusers' formula in float64
        if dtype == F64:  # the UNet sees exactly z, so only the float64 conversion differs
            assert torch.equal(raw, out)
            torch.testing.assert_close(d, ref, rtol=1e-12, atol=1e-12)
        else:
            assert_matches_reference(d, ref, eager, f"{kind} t={int(t)}")
        torch.testing.assert_close(_fused_d(wrapper, x, float(sigma), raw, None), d, rtol=0, atol=0)


def test_unet2d_condition_cfg_one_batched_call(cond_unet):
    sch = DDIMScheduler(clip_sample=False)
    sch.set_timesteps(10)
    wrapper = W.DiffusersUNetDenoiser(cond_unet, sch, quantize=True, guidance_scale=5.0)
    g = torch.Generator().manual_seed(3)
    cond, uncond = torch.randn(3, 5, 12, generator=g), torch.randn(3, 5, 12, generator=g)
    calls = []
    hook = cond_unet.register_forward_pre_hook(lambda mod, args, kw: calls.append(args[0].shape[0]), with_kwargs=True)
    try:
        for t in sch.timesteps[[1, 8]]:
            z = torch.randn(3, 2, 8, 8, generator=g)
            x, sigma = _ve(sch, t, z)
            x = x.float()
            with torch.no_grad():
                calls.clear()
                d = wrapper(x, sigma.expand(3), encoder_hidden_states=cond, uncond_encoder_hidden_states=uncond)
                assert calls == [6]  # one UNet call on [uncond; cond]
                # the pipeline's CFG, then the scheduler's x0 formula
                both = cond_unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
                out_u, out_c = both.chunk(2)
                eager = sch.step(out_u + 5.0 * (out_c - out_u), t, z).pred_original_sample
                c, u = wrapper.raw(x, sigma, encoder_hidden_states=cond, uncond_encoder_hidden_states=uncond)
            ref = _ddim_x0_64(sch, out_u.double() + 5.0 * (out_c.double() - out_u.double()), t, z)
            assert_matches_reference(d, ref, eager, f"cfg t={int(t)}")
            torch.testing.assert_close(_fused_d(wrapper, x, float(sigma), c, u), d, rtol=0, atol=0)
            # guidance 1 ignores the uncond inputs: one call on B samples
            calls.clear()
            with torch.no_grad():
                W.DiffusersUNetDenoiser(cond_unet, sch)(x, sigma, encoder_hidden_states=cond,
                                                         uncond_encoder_hidden_states=uncond)
            assert calls == [3]
    finally:
        hook.remove()


def test_unet2d_matches_euler_karras(unet):
    # Euler works in VE coordinates with fractional timesteps: checks sigma -> t interpolation too
    sch = EulerDiscreteScheduler(use_karras_sigmas=True, prediction_type="v_prediction")
    sch.set_timesteps(6)
    wrapper = W.DiffusersUNetDenoiser(unet, sch)
    t_mine = wrapper.sigma_to_t(sch.sigmas[:-1].double())
    torch.testing.assert_close(t_mine.float(), sch.timesteps, rtol=1e-5, atol=2e-3)  # diffusers interpolates in float32
    # round trip inside the table (the end points are clamped to sigma(0), sigma(T-1) of the float64 table)
    torch.testing.assert_close(wrapper.t_to_sigma(t_mine[1:-1]), sch.sigmas[1:-2].double(), rtol=1e-12, atol=0)
    g = torch.Generator().manual_seed(4)
    for i in (0, 3, 5):
        sigma, t = sch.sigmas[i], sch.timesteps[i]
        x = torch.randn(2, 2, 8, 8, generator=g) * float(sigma)
        with torch.no_grad():
            sch._step_index = i
            out = unet(sch.scale_model_input(x, t), t).sample
            eager = sch.step(out, t, x).pred_original_sample
            d = wrapper(x, sigma.double())
            raw, _ = wrapper.raw(x, sigma.double())
        s = sigma.double()
        ref = raw.double() * (-s / (s ** 2 + 1).sqrt()) + x.double() / (s ** 2 + 1)
        assert_matches_reference(d, ref, eager, f"euler step {i}")
        torch.testing.assert_close(raw, out, rtol=1e-3, atol=1e-4)  # t differs by diffusers' float32 rounding


def test_edm_matches_diffusers_preconditioning():
    sch = EDMEulerScheduler(sigma_data=0.5)
    seen = {}

    def net(x_in, c_noise):
        seen.update(x_in=x_in, c_noise=c_noise)
        return torch.sin(x_in)
    w = W.KarrasDenoiser(net, sigma_data=0.5)
    x, sigma = torch.randn(3, 4, dtype=F64) * 5, torch.tensor([0.01, 1.0, 60.0], dtype=F64)
    d = w(x, sigma)
    col = sigma.view(-1, 1)
    torch.testing.assert_close(seen["x_in"], sch.precondition_inputs(x, col), rtol=1e-14, atol=0)
    torch.testing.assert_close(seen["c_noise"], sch.precondition_noise(sigma), rtol=1e-14, atol=0)
    torch.testing.assert_close(d, sch.precondition_outputs(x, torch.sin(seen["x_in"]), col), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_follows_the_kernel_rule(unet, dtype):
    sch = DDIMScheduler(prediction_type="v_prediction")
    wrapper = W.DiffusersUNetDenoiser(unet, sch, quantize=True)
    x = (torch.randn(2, 2, 8, 8) * 3).to(dtype)
    sigma = S.alpha_bar_to_sigma(sch.alphas_cumprod[500].double())
    with torch.no_grad():
        d = wrapper(x, sigma)
        raw, _ = wrapper.raw(x, sigma)
    p, q = wrapper.conversion(float(sigma))
    ref = p * x.double() + q * raw.double()
    assert d.dtype == dtype
    assert_matches_reference(d, ref, (p * x.double() + q * raw.double()).to(dtype), f"{dtype}")

#----------------------------------------------------------------------------
# Errors.


def test_wrapper_errors(unet):
    ab = S.alphas_cumprod(S.betas(100))
    eps = W.VPDiscreteDenoiser(lambda z, t: z, ab)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"sigma must be a float, a 0-d tensor or a \(2,\) tensor"):
        eps(x, torch.ones(3))
    with pytest.raises(ValueError, match="sigma must be a finite float >= 0"):
        eps(x, -1.0)
    with pytest.raises(ValueError, match=r"model must return a floating tensor of shape \(2, 3\)"):
        W.VPDiscreteDenoiser(lambda z, t: z[:, :2], ab)(x, 1.0)
    with pytest.raises(ValueError, match="prediction_type must be epsilon, v_prediction or sample"):
        W.VPDiscreteDenoiser(lambda z, t: z, ab, prediction_type="flow")
    with pytest.raises(ValueError, match="strictly decreasing"):
        W.VPDiscreteDenoiser(lambda z, t: z, ab.flip(0))
    with pytest.raises(ValueError, match=r"values in \(0, 1\)"):
        W.VPDiscreteDenoiser(lambda z, t: z, torch.tensor([1.0, 0.5]))
    # a list of Python floats is read in float64 (float32 would round 1 - 1e-9 to 1, outside (0, 1))
    listed = W.VPDiscreteDenoiser(lambda z, t: z, [1 - 1e-9, 0.5])
    assert listed.sigmas.dtype == torch.float64 and float(listed.sigmas[0]) == pytest.approx(math.sqrt(1e-9 / (1 - 1e-9)))
    cfg = W.VPDiscreteDenoiser(lambda z, t, c=None: z, ab, guidance_scale=3.0)
    with pytest.raises(ValueError, match="needs the unconditional inputs as uncond_<name>"):
        cfg(x, 1.0, c=torch.zeros(2))
    with pytest.raises(ValueError, match="uncond_c given without its conditional c"):
        cfg(x, 1.0, uncond_c=torch.zeros(2))
    with pytest.raises(ValueError, match=r"expected a tensor of shape \(2,\)"):
        cfg(x, 1.0, c=torch.zeros(2), uncond_c=torch.zeros(3))
    with pytest.raises(ValueError, match="pass a scheduler"):
        W.DiffusersUNetDenoiser(unet)
    with pytest.raises(ValueError, match="guidance_scale must be a finite float"):
        W.FlowDenoiser(lambda z, t: z, guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="sigma_data must be a finite float > 0"):
        W.KarrasDenoiser(lambda z, t: z, sigma_data=0.0)
    with pytest.raises(TypeError, match="model must be callable"):
        W.FlowDenoiser(3)
    with pytest.raises(ValueError, match="VEDenoiser: prediction_type must be 'epsilon' or 'sample'"):
        W.VEDenoiser(lambda z, s: z, prediction_type="v")
    with pytest.raises(ValueError, match="time must be 'vp', 'cosine' or a callable"):
        W.VPContinuousDenoiser(lambda z, t: z, time="linear")
