"""diffkern's model wrappers against k-diffusion's own (``k_diffusion.external``, the released 0.1.1.post1 loaded by
``tests/_kdiffusion.py``): ``VPDiscreteDenoiser`` against ``DiscreteEpsDDPMDenoiser`` / ``DiscreteVDDPMDenoiser``
(sigma <-> t through the log-sigma table, plain and quantized; the denoised output), ``VPContinuousDenoiser(time=
"cosine", "v_prediction")`` against ``VDenoiser``, and whole sampling runs of each pair: k-diffusion's sampler on its
wrapper, diffkern's (the fused eps/v -> D conversion) on ours.

The network is a fixed smooth function of its input and its timestep. diffkern hands a discrete network float32 t
(as a scheduler's timesteps), k-diffusion the t of sigma's dtype: its network rounds t to float32 too, so both see
the same inputs."""
import math

import pytest
import torch

from _kdiffusion import external, sampling
from diffkern import samplers, schedules, wrappers, wrappers_continuous
from diffkern.testing import assert_matches_reference

F64 = torch.float64
AB = schedules.alphas_cumprod(schedules.betas(1000, 0.00085, 0.012, "scaled_linear"))


def net(x_in, t):
    """A fixed 'network' of the scaled state and the timestep (t rounded to float32, as diffkern passes it)."""
    t = t.to(torch.float32).to(x_in.dtype).reshape(-1, *([1] * (x_in.dim() - 1)))
    return torch.tanh(x_in) * (1.0 + 1e-3 * t) + 0.1 * torch.sin(t / 97.0)


def sigmas_probe():
    """Sigmas inside the table, at its entries, between them and past both ends (float64, (B,))."""
    table = schedules.alpha_bar_to_sigma(AB)
    inside = torch.exp(torch.linspace(math.log(float(table[0])), math.log(float(table[-1])), 23, dtype=F64))
    return torch.cat([inside, table[[0, 1, 500, 998, 999]], torch.tensor([1e-4, 200.0], dtype=F64)])


@pytest.mark.parametrize("quantize", [False, True])
def test_sigma_to_t_is_kdiffusions(quantize):
    theirs = external().DiscreteEpsDDPMDenoiser(net, AB, quantize)
    ours = wrappers.VPDiscreteDenoiser(net, AB, "epsilon", quantize=quantize)
    s = sigmas_probe()
    got, want = ours.sigma_to_t(s), theirs.sigma_to_t(s)
    if quantize:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


def test_t_to_sigma_and_get_sigmas_are_kdiffusions():
    """k-diffusion's t_to_sigma rounds t to float32 first (``t.float()``), so its ``get_sigmas`` is ours at float32 t."""
    theirs = external().DiscreteEpsDDPMDenoiser(net, AB, False)
    ours = wrappers.VPDiscreteDenoiser(net, AB, "epsilon")
    t = torch.linspace(999, 0, 17, dtype=F64).float()
    torch.testing.assert_close(ours.t_to_sigma(t.double()), theirs.t_to_sigma(t), rtol=1e-12, atol=0)
    want = theirs.get_sigmas(17)
    got = torch.cat([ours.t_to_sigma(torch.linspace(999, 0, 17).double()), want.new_zeros(1)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_discrete_denoised_is_kdiffusions(kind, quantize):
    cls = external().DiscreteEpsDDPMDenoiser if kind == "epsilon" else external().DiscreteVDDPMDenoiser
    theirs = cls(net, AB, quantize)
    ours = wrappers.VPDiscreteDenoiser(net, AB, kind, quantize=quantize)
    s = sigmas_probe()
    x = torch.randn(len(s), 3, 4, 5, dtype=F64, generator=torch.Generator().manual_seed(1)) * s.view(-1, 1, 1, 1)
    assert_matches_reference(ours(x, s), theirs(x, s), theirs(x, s), f"{kind} quantize={quantize}")


def test_v_denoiser_is_kdiffusions():
    theirs = external().VDenoiser(net)
    ours = wrappers_continuous.VPContinuousDenoiser(net, "v_prediction", time="cosine")
    s = torch.exp(torch.linspace(math.log(0.01), math.log(150.0), 19, dtype=F64))
    x = torch.randn(len(s), 2, 7, dtype=F64, generator=torch.Generator().manual_seed(2)) * s.view(-1, 1, 1)
    assert_matches_reference(ours(x, s), theirs(x, s), theirs(x, s), "VDenoiser")


@pytest.mark.parametrize("method", ["euler", "dpmpp_2m", "heun", "euler_ancestral"])
@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_sampling_through_the_wrappers_is_kdiffusions(kind, method):
    """A whole run: k-diffusion's sampler on its wrapper, diffkern's on ours (the conversion fused into the step),
    on the wrapper's own Karras schedule; the ancestral one on a shared noise_sampler."""
    cls = external().DiscreteEpsDDPMDenoiser if kind == "epsilon" else external().DiscreteVDDPMDenoiser
    theirs = cls(net, AB, False)
    ours = wrappers.VPDiscreteDenoiser(net, AB, kind)
    sig = sampling().get_sigmas_karras(8, float(theirs.sigma_min), float(theirs.sigma_max), device="cpu").double()
    x = torch.randn(2, 3, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(3)) * sig[0]
    noise = torch.randn(8, *x.shape, dtype=F64, generator=torch.Generator().manual_seed(4))
    kw = ({"noise_sampler": lambda s, sn, it=iter(noise): next(it)} if method == "euler_ancestral" else {})
    want = getattr(sampling(), f"sample_{method}")(theirs, x.clone(), sig, disable=True, **kw)
    kw = ({"noise_sampler": lambda s, sn, it=iter(noise): next(it)} if method == "euler_ancestral" else {})
    got = getattr(samplers, f"sample_{method}")(ours, x.clone(), sig, disable=True, **kw)
    assert_matches_reference(got, want, want, f"{method} through {kind} wrappers")
