"""Review session 12: regression tests for today's drop-ins (DPMSolverSDE, FlowMatchHeun, DDIMInverse)."""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from test_dpmsolver_sde_scheduler import scheduling_dpmsolver_sde  # noqa: E402  (imported without torchsde)
from test_diffusers_schedulers import diffusers_float64  # noqa: E402

import diffkern.diffusers as dd  # noqa: E402


@pytest.mark.parametrize("conversion", ["use_karras_sigmas", "use_exponential_sigmas"])
def test_dpmsolver_sde_from_euler_config_with_sigma_bounds(conversion):
    """An Euler config with sigma_min/sigma_max set (kept by from_config): diffusers' DPMSolverSDE reads them for
    exponential sigmas only; its Karras conversion (copied from LMS) spans the schedule's own ends. Before the fix
    ours applied them to Karras too (sigmas [10, 2.93, ...] instead of [25.1, 4.98, ...])."""
    euler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", sigma_min=0.1, sigma_max=10.0,
                                             **{conversion: True})
    ours = dd.DPMSolverSDEScheduler.from_config(euler.config)
    ours.set_timesteps(4)
    stock = scheduling_dpmsolver_sde.DPMSolverSDEScheduler.from_config(euler.config)
    stock.set_timesteps(4)
    assert torch.equal(ours.timesteps, stock.timesteps)  # labels: diffusers' own (timestep_labels)
    with diffusers_float64(scheduling_dpmsolver_sde):
        theirs = scheduling_dpmsolver_sde.DPMSolverSDEScheduler.from_config(euler.config)
        theirs.set_timesteps(4)
    torch.testing.assert_close(ours.sigmas.double(), theirs.sigmas.double(), rtol=2 ** -23, atol=0)


class _Net(torch.nn.Module):
    """A network taking (x, time) at module level, so that wrappers around it can be pickled."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3, dtype=torch.float64)

    def forward(self, x, t, **extra):
        return self.lin(x) * (1 + t.reshape(-1, 1).to(x.dtype))


def _wrappers():
    from diffkern import wrappers
    net = _Net()
    return [wrappers.VPContinuousDenoiser(net), wrappers.VPContinuousDenoiser(net, time="cosine"),
            wrappers.KarrasDenoiser(net), wrappers.KarrasDenoiser(net, c_noise="sigma"), wrappers.FlowDenoiser(net),
            wrappers.VEDenoiser(net)]


@pytest.mark.parametrize("index", range(6))
def test_continuous_wrappers_survive_torch_save(index, tmp_path):
    """torch.save / torch.load of every continuous-time wrapper with its built-in time map. Before the fix the
    'cosine' time map and KarrasDenoiser's c_noise maps were lambdas: PicklingError / AttributeError."""
    wrapper = _wrappers()[index]
    torch.save(wrapper, tmp_path / "w.pt")
    back = torch.load(tmp_path / "w.pt", weights_only=False)
    x = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.5, 3.0], dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(back(x, sigma), wrapper(x, sigma))


def test_dpmsolver_sde_noise_has_the_brownian_tree_law():
    """float64, 4 x 1M samples: with D = 0 on both calls, xi1 = x_mid/su1 and xi2 = x'/su2 must be standard normals
    with covariance rho = sqrt((sigma - sigma_mid)/(sigma - sigma_next)), as diffusers' tree increments
    noise(sigma, sigma_mid) and noise(sigma, sigma_next); independent of the next step's draws. 6-sigma bounds."""
    import math
    stats = []
    for seed in range(4):
        s = dd.DPMSolverSDEScheduler(use_karras_sigmas=True, noise_sampler_seed=seed)
        s.set_timesteps(4)
        sig, mid = s.sigmas_host, s._mids
        x = torch.zeros(2, 500_000, dtype=torch.float64)
        draws = []
        for i in range(2):
            s0, s1, sm = sig[i], sig[i + 1], mid[i]
            su1 = min(sm, math.sqrt(sm ** 2 * (s0 ** 2 - sm ** 2) / s0 ** 2))
            su2 = min(s1, math.sqrt(s1 ** 2 * (s0 ** 2 - s1 ** 2) / s0 ** 2))
            sd1, sd2 = math.sqrt(sm ** 2 - su1 ** 2), math.sqrt(s1 ** 2 - su2 ** 2)
            x2 = s.step(x / s0, s.timesteps[2 * i], x).prev_sample  # eps = x/sigma: D = 0
            xn = s.step(x2 / sm, s.timesteps[2 * i + 1], x2).prev_sample
            draws += [(x2 - sd1 / s0 * x).flatten() / su1, (xn - sd2 / s0 * x).flatten() / su2]
            x = xn
        stats.append(torch.stack(draws))
    n = sum(d.shape[1] for d in stats)
    cov = sum(d @ d.T for d in stats) / n
    want = torch.eye(4, dtype=torch.float64)
    for i in range(2):
        s0, s1, sm = sig[i], sig[i + 1], mid[i]
        want[2 * i, 2 * i + 1] = want[2 * i + 1, 2 * i] = math.sqrt((s0 - sm) / (s0 - s1))
    assert (cov - want).abs().max() < 6 * math.sqrt(2.0 / n), (cov, want)


def test_dpmsolver_sde_mixed_dtype_output_as_diffusers(monkeypatch):
    """float32 sample, float16 model output: diffusers' step has no cast, its prev_sample is float32 (ours was float16,
    the state rounded to 16 bits every call, before the two-call drop-ins promoted as diffusers does)."""
    from test_dpmsolver_sde_scheduler import _ZeroTree
    monkeypatch.setattr(scheduling_dpmsolver_sde, "BrownianTreeNoiseSampler", _ZeroTree)
    theirs, ours = scheduling_dpmsolver_sde.DPMSolverSDEScheduler(), dd.DPMSolverSDEScheduler()
    theirs.set_timesteps(3)
    ours.set_timesteps(3)
    x, m = torch.randn(1, 4), torch.randn(1, 4).half()
    want = theirs.step(m, theirs.timesteps[0], x, s_noise=0.0).prev_sample.dtype
    assert ours.step(m, ours.timesteps[0], x, s_noise=0.0).prev_sample.dtype == want == torch.float32


@pytest.mark.parametrize("name", ["HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
                                  "KDPM2AncestralDiscreteScheduler"])
def test_two_call_drop_ins_keep_the_promoted_dtype(name):
    """As DPMSolverSDE: diffusers' Heun and KDPM2 steps do not cast back, so a float32 sample with a float16 model
    output stays float32 on every call (predictor and corrector)."""
    theirs, ours = getattr(diffusers, name)(), getattr(dd, name)()
    for s in (theirs, ours):
        s.set_timesteps(3)
    x_t, x_o = torch.randn(1, 4, generator=torch.Generator().manual_seed(0)), None
    x_o = x_t.clone()
    for k in range(len(ours.timesteps)):
        m = torch.randn(1, 4, generator=torch.Generator().manual_seed(k)).half()
        kw = {"generator": torch.Generator().manual_seed(9)} if "Ancestral" in name else {}
        x_t = theirs.step(m, theirs.timesteps[k], x_t, **kw).prev_sample
        x_o = ours.step(m, ours.timesteps[k], x_o, **kw).prev_sample
        assert x_o.dtype == x_t.dtype == torch.float32, (name, k)
        assert torch.isfinite(x_o).all()


def test_noise_sampler_seed_of_another_class_is_not_read(monkeypatch):
    """A config carrying DPMSolverSDE's noise_sampler_seed (kept by from_config) does not fix another stochastic
    scheduler's Level 2 noise: the pipeline's generator keys it (accelerate draws the Philox seed from it)."""
    import importlib
    acc_module = importlib.import_module("diffkern.diffusers.accelerate")  # (the package exports the function)

    drawn = []
    seed_of = acc_module._seed
    monkeypatch.setattr(acc_module, "_seed", lambda generator, batch: drawn.append(1) or seed_of(generator, batch))
    config = dd.DPMSolverSDEScheduler(noise_sampler_seed=5).config
    sched = dd.EulerAncestralDiscreteScheduler.from_config(config)
    assert sched.config.get("noise_sampler_seed") == 5
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 8),
                                 layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2)
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    fast = dd.accelerate(pipe)
    latents = [fast(batch_size=1, num_inference_steps=3, output_type="pt",
                    generator=torch.Generator().manual_seed(seed)).images for seed in (1, 1, 2)]
    assert torch.equal(latents[0], latents[1]) and not torch.equal(latents[0], latents[2])
    assert len(drawn) == 3  # (before the fix: none, every call keyed by seed 5)


@pytest.mark.parametrize("name", ["KDPM2DiscreteScheduler", "DPMSolverSDEScheduler"])
def test_a_loop_cannot_start_at_a_midpoint_call(name):
    """Without set_begin_index the first timestep locates the loop's start; a midpoint timestep (odd index) would run
    a second call with no predictor before it (diffusers: a zero-length step): refused by name."""
    sched = getattr(dd, name)()
    sched.set_timesteps(4)
    x = torch.zeros(1, 4)
    with pytest.raises(ValueError, match=r"timestep: a loop of .* cannot start at timesteps\[1\]"):
        sched.scale_model_input(x, sched.timesteps[1])
    sched.set_timesteps(4)
    assert sched.step(x, sched.timesteps[2], x).prev_sample.shape == x.shape  # a first call: fine
