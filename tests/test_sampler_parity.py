"""Parity with independent implementations: diffusers' DDIM, DDPM and "sde-dpmsolver++" schedulers, k-diffusion's
DPM-Solver++(2M) SDE loop (written here as published) and smalldiffusion's ``samples``.

Each oracle runs twice, in float64 (the reference: its scheduler tables promoted to float64) and in float32
(its own eager error). diffkern must match the float64 oracle to 1e-12 relative in float64 and, in float32,
obey the project's tolerance rule against it (at most twice the oracle's own float32 error plus a floor).
Stochastic runs feed the oracle diffkern's Philox noise of each step (same noise, same output).

Models: a tiny randomly initialised ``UNet2DModel`` (sample_size 8, no download) through
``diffkern.wrappers.DiffusersUNetDenoiser`` (the fused eps -> D conversion), and the exact eps of a
Gaussian mixture for smalldiffusion.
"""
import importlib.util
import math
import os
import sys
import types

import pytest
import torch

from diffkern import analytic, schedules, wrappers
from diffkern.ops import philox
from diffkern.sampling import sample
from diffkern.testing import assert_matches_reference

REF = "reference"
STEPS = 10
SEED = 21


def noises(x, n, dtype):
    """The standard normals diffkern's one-row-per-step samplers draw at rows 0..n-1 for ``seed=SEED``."""
    seed = torch.tensor([SEED], dtype=torch.int64)
    return [philox.noise_like(x, seed, i, dtype).to(dtype) for i in range(n)]


def assert_parity(ours64, ours32, ref64, ref32, what):
    assert_matches_reference(ours64, ref64, ref64, f"{what} float64")
    assert_matches_reference(ours32, ref64, ref32, f"{what} float32")

#----------------------------------------------------------------------------
# diffusers: DDIM (eta = 0 and eta > 0) and DDPM on a tiny random UNet, trailing spacing.

UNET_CONFIG = dict(sample_size=8, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(8, 16),
                   down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                   norm_num_groups=4)


@pytest.fixture(scope="module")
def unets():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    u32 = UNet2DModel(**UNET_CONFIG).eval()
    u64 = UNet2DModel(**UNET_CONFIG).eval()
    u64.load_state_dict(u32.state_dict())
    return {torch.float32: u32, torch.float64: u64.double()}


def make_scheduler(kind, dtype):
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    if kind.startswith("sde-dpmsolver++"):  # "sde-dpmsolver++/<solver_type>"
        s = DPMSolverMultistepScheduler(num_train_timesteps=1000, timestep_spacing="trailing",
                                        algorithm_type="sde-dpmsolver++", solver_type=kind.split("/")[1],
                                        final_sigmas_type="zero")
    elif kind == "ddim":
        s = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing", clip_sample=False,
                          set_alpha_to_one=False)
    else:
        s = DDPMScheduler(num_train_timesteps=1000, timestep_spacing="trailing", clip_sample=False)
    s.set_timesteps(STEPS)
    if dtype == torch.float64:  # the oracle in float64: its tables too
        s.alphas_cumprod = s.alphas_cumprod.double()
        if kind == "ddim":
            s.final_alpha_cumprod = s.final_alpha_cumprod.double()
    return s


def diffusers_run(kind, unet, z, dtype, noise=None, eta=0.0, monkeypatch=None):
    """The standard diffusers loop in VP coordinates; ``noise[i]`` is step i's variance noise."""
    s = make_scheduler(kind, dtype)
    z = z.to(dtype)
    if kind == "ddpm":  # DDPMScheduler.step has no variance_noise argument: feed ours through randn_tensor
        queue = [n.to(dtype) for n in noise]
        monkeypatch.setattr("diffusers.schedulers.scheduling_ddpm.randn_tensor", lambda *a, **k: queue.pop(0))
    with torch.no_grad():
        for i, t in enumerate(s.timesteps):
            eps = unet(z, t).sample
            if kind == "ddim":
                z = s.step(eps, t, z, eta=eta, variance_noise=None if eta == 0 else noise[i].to(dtype)).prev_sample
            elif kind.startswith("sde"):
                z = s.step(eps, t, z, variance_noise=noise[i].to(dtype)).prev_sample
            else:
                z = s.step(eps, t, z).prev_sample
    return z


def diffkern_run(kind, unet, z, dtype, method, **kw):
    """The same run in VE coordinates: x = z/sqrt(ab) = z*sqrt(1 + sigma^2), the wrapper's fused conversion."""
    s = make_scheduler(kind, torch.float32)
    sig = schedules.vp_sigmas(s.alphas_cumprod, s.timesteps.long(), final="sigma_min" if kind == "ddim" else "zero")
    x = (z * (1 + sig[0] ** 2) ** 0.5).to(dtype)
    y = sample(wrappers.DiffusersUNetDenoiser(unet, s), x, sig, method, backend=REF, seed=SEED, **kw)
    return y / (1 + sig[-1] ** 2) ** 0.5


def vp_noise(z, dtype):
    """Step i's VE noise xi_i is also the VP variance noise: sqrt(ab')*sigma_up == DDIM's std (math 5)."""
    return noises(z.to(dtype), STEPS, dtype)


def start_z():
    return torch.randn(2, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def test_ddim_eta0_is_euler(unets):
    z = start_z()
    ref = {dt: diffusers_run("ddim", unets[dt], z, dt) for dt in unets}
    ours = {dt: diffkern_run("ddim", unets[dt], z, dt, "euler") for dt in unets}
    assert_parity(ours[torch.float64], ours[torch.float32], ref[torch.float64], ref[torch.float32], "DDIM eta=0")


@pytest.mark.parametrize("eta", [0.6, 1.0])
def test_ddim_eta_is_euler_ancestral(unets, eta):
    z = start_z()
    ref = {dt: diffusers_run("ddim", unets[dt], z, dt, noise=vp_noise(z, dt), eta=eta) for dt in unets}
    ours = {dt: diffkern_run("ddim", unets[dt], z, dt, "euler_ancestral", eta=eta) for dt in unets}
    assert_parity(ours[torch.float64], ours[torch.float32], ref[torch.float64], ref[torch.float32], f"DDIM eta={eta}")


@pytest.mark.parametrize("method,kw", [("ge", {"gamma": 1.0, "mu": 0.5}), ("euler_ancestral", {"eta": 1.0}),
                                       ("sde", {"lam": 1.0})])
def test_ddpm_is_mu_half(unets, monkeypatch, method, kw):
    z = start_z()
    ref = {dt: diffusers_run("ddpm", unets[dt], z, dt, noise=vp_noise(z, dt), monkeypatch=monkeypatch) for dt in unets}
    ours = {dt: diffkern_run("ddpm", unets[dt], z, dt, method, **kw) for dt in unets}
    assert_parity(ours[torch.float64], ours[torch.float32], ref[torch.float64], ref[torch.float32], f"DDPM {method}")

def kdiff_dpmpp_2m_sde(model, x, sigmas, noise, eta, solver_type):
    """k-diffusion's ``sample_dpmpp_2m_sde`` loop as published (VE, D = model(x, sigma)); ``noise[i]`` replaces its
    Brownian-tree draw of step i."""
    old, h_last = None, None
    for i, (s, sn) in enumerate(zip(sigmas[:-1].tolist(), sigmas[1:].tolist())):
        denoised = model(x, torch.full((x.shape[0],), s, dtype=x.dtype))
        if sn == 0:
            x = denoised
        else:
            h = math.log(s / sn)
            eta_h = eta * h
            x = sn / s * math.exp(-eta_h) * x + -math.expm1(-h - eta_h) * denoised
            if old is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + (-math.expm1(-h - eta_h) / (-h - eta_h) + 1) * (1 / r) * (denoised - old)
                else:
                    x = x + 0.5 * -math.expm1(-h - eta_h) * (1 / r) * (denoised - old)
            x = x + noise[i].to(x.dtype) * sn * math.sqrt(-math.expm1(-2 * eta_h))
            h_last = h
        old = denoised
    return x


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("eta", [1.0, 0.4])
def test_dpmpp_2m_sde_is_k_diffusions(solver_type, eta):
    gmm = analytic.GaussianMixture([1.0, 2.0], [[-1.0, 0.5], [1.0, 1.0]], [0.3, 0.5])
    sig = schedules.karras(STEPS, 0.02, 20.0)
    x = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 20.0
    ref = {dt: kdiff_dpmpp_2m_sde(gmm.denoise, x.to(dt), sig, noises(x, STEPS, dt), eta, solver_type)
           for dt in (torch.float64, torch.float32)}
    ours = {dt: sample(gmm.denoise, x.to(dt), sig, "dpmpp_2m_sde", backend=REF, seed=SEED, eta=eta,
                       solver_type=solver_type) for dt in (torch.float64, torch.float32)}
    assert_parity(ours[torch.float64], ours[torch.float32], ref[torch.float64], ref[torch.float32],
                  f"dpmpp_2m_sde eta={eta} {solver_type}")


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_sde_dpmsolver_pp_is_dpmpp_2m_sde(unets, solver_type):
    """diffusers' second-order "sde-dpmsolver++" (its noise fed from ours) is DPM-Solver++(2M) SDE at eta = 1 in VP
    coordinates. diffusers computes in float32 whatever the input dtype, so the float64 reference is k-diffusion's
    loop through the same float64 network, and diffusers' float32 error must be of the size of ours."""
    z, kind = start_z(), f"sde-dpmsolver++/{solver_type}"
    theirs32 = diffusers_run(kind, unets[torch.float32], z, torch.float32, noise=vp_noise(z, torch.float32))
    ours = {dt: diffkern_run(kind, unets[dt], z, dt, "dpmpp_2m_sde", solver_type=solver_type) for dt in unets}
    s = make_scheduler(kind, torch.float32)
    sig = schedules.vp_sigmas(s.alphas_cumprod, s.timesteps.long(), final="zero")
    model = wrappers.DiffusersUNetDenoiser(unets[torch.float64], s)
    x = z * (1 + sig[0] ** 2) ** 0.5
    with torch.no_grad():  # the published loop has no decorator here: no autograd graph through the UNet
        ref64 = kdiff_dpmpp_2m_sde(model, x, sig, noises(x, STEPS, torch.float64), 1.0, solver_type)
    assert_parity(ours[torch.float64], ours[torch.float32], ref64, theirs32, f"sde-dpmsolver++ {solver_type}")
    assert_matches_reference(theirs32, ref64, ours[torch.float32], f"diffusers sde-dpmsolver++ {solver_type}")

#----------------------------------------------------------------------------
# smalldiffusion's generalised sampler samples(gam, mu). Its package imports torchvision and accelerate at
# import time, so only its ``diffusion.py`` is loaded, from its file, with a stub ``accelerate``.


@pytest.fixture(scope="module")
def smalldiffusion():
    spec = importlib.util.find_spec("smalldiffusion")
    if spec is None or spec.origin is None:
        raise RuntimeError("smalldiffusion is a test dependency: pip install --no-deps smalldiffusion "
                           "(its own dependencies would replace the CPU torch)")
    path = os.path.join(os.path.dirname(spec.origin), "diffusion.py")
    stub = types.ModuleType("accelerate")
    stub.Accelerator = type("Accelerator", (), {"device": torch.device("cpu")})
    saved = sys.modules.get("accelerate")
    sys.modules["accelerate"] = saved or stub
    try:
        mod_spec = importlib.util.spec_from_file_location("_smalldiffusion_diffusion", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    finally:
        if saved is None:
            del sys.modules["accelerate"]
    return module


class EpsModel:
    """smalldiffusion's model protocol around the exact eps of a mixture; noise comes from a queue."""

    def __init__(self, gmm, queue):
        self.gmm, self.queue = gmm, queue

    def eval(self):
        return self

    def predict_eps_cfg(self, x, sigma, cond, cfg_scale):
        return self.gmm.eps(x, sigma)

    def rand_input(self, batchsize):
        return self.queue.pop(0)


def gmm_and_schedule():
    gmm = analytic.GaussianMixture([1.0, 2.0, 1.5], [[-1.0, 0.5], [1.0, 1.0], [0.3, -1.2]], [0.3, 0.5, 0.4])
    train = torch.logspace(-2, 1, 1000, dtype=torch.float64)  # ScheduleLogLinear(1000, 0.01, 10)
    return gmm, schedules.sample_sigmas(train, STEPS)  # trailing, ends at sigma_min (no final 0)


@pytest.mark.parametrize("gam,mu", [(2.0, 0.0), (1.0, 0.0), (1.5, 0.0), (1.0, 0.5), (2.0, 0.3)])
def test_smalldiffusion_samples(smalldiffusion, gam, mu):
    gmm, sig = gmm_and_schedule()
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * float(sig[0])
    ref, ours = {}, {}
    for dt in (torch.float64, torch.float32):
        model = EpsModel(gmm, noises(x.to(dt), STEPS, dt))
        *_, ref[dt] = smalldiffusion.samples(model, sig.to(dt), gam=gam, mu=mu, xt=x.to(dt))
        ours[dt] = sample(gmm, x.to(dt), sig, "ge", gamma=gam, mu=mu, backend=REF, seed=SEED)
    assert_parity(ours[torch.float64], ours[torch.float32], ref[torch.float64], ref[torch.float32],
                  f"smalldiffusion gam={gam} mu={mu}")


@pytest.mark.parametrize("gam,mu", [(2.0, 0.0), (1.0, 0.5)])
def test_smalldiffusion_eps_model_runs_fused(smalldiffusion, gam, mu):
    """The same runs with the eps network behind ``wrappers.VEDenoiser``: its ``D = x - sigma*eps`` is converted
    inside the fused step; eager (unfused) and fused runs agree, and both match smalldiffusion."""
    gmm, sig = gmm_and_schedule()
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * float(sig[0])
    ref, ours = {}, {}
    for dt in (torch.float64, torch.float32):
        *_, ref[dt] = smalldiffusion.samples(EpsModel(gmm, noises(x.to(dt), STEPS, dt)), sig.to(dt), gam=gam, mu=mu,
                                             xt=x.to(dt))
        model = wrappers.VEDenoiser(lambda x, sigma: gmm.eps(x, sigma).to(x.dtype))
        ours[dt] = sample(model, x.to(dt), sig, "ge", gamma=gam, mu=mu, backend=REF, seed=SEED)
    assert_parity(ours[torch.float64], ours[torch.float32], ref[torch.float64], ref[torch.float32],
                  f"smalldiffusion via VEDenoiser gam={gam} mu={mu}")
    plain = sample(lambda x, s: x - s[:, None] * gmm.eps(x, s), x, sig, "ge", gamma=gam, mu=mu, backend=REF,
                   seed=SEED)
    torch.testing.assert_close(ours[torch.float64], plain, rtol=1e-12, atol=1e-12)
