"""diffkern.diffusers.DPMSolverSDEScheduler ("DPM++ SDE") against diffusers' class and against diffkern's own
``dpmpp_sde`` sampler.

diffusers draws this scheduler's noise from a torchsde Brownian tree (diffkern does not depend on torchsde: it
draws the same law from Philox instead), so the comparison with diffusers runs at ``s_noise=0`` with the tree
replaced by a stub: that pins the timesteps, sigmas, midpoints, input scaling, predictions and every deterministic
coefficient. The noise is then pinned against diffkern's ``dpmpp_sde`` sampler on the same sigmas and seed, whose
Brownian-tree law is tested in ``tests/test_dpmpp_sde.py``.
"""
from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch

diffusers = pytest.importorskip("diffusers")


def _import_without_torchsde():
    """diffusers' module imports torchsde at the top but uses it only inside the noise sampler the tests replace:
    import it with a placeholder in sys.modules (removed again, so nothing else sees a fake torchsde)."""
    name = "diffusers.schedulers.scheduling_dpmsolver_sde"
    if "torchsde" in sys.modules or importlib.util.find_spec("torchsde") is not None:
        return importlib.import_module(name)
    sys.modules["torchsde"] = types.ModuleType("torchsde")
    try:
        return importlib.import_module(name)
    finally:
        del sys.modules["torchsde"]


scheduling_dpmsolver_sde = _import_without_torchsde()

import diffkern.diffusers as dd  # noqa: E402
from diffkern import samplers  # noqa: E402
from diffkern.testing import assert_matches_reference, make_tensor  # noqa: E402
from test_diffusers_schedulers import check_parity, diffusers_float64  # noqa: E402

NAME = "DPMSolverSDEScheduler"


class _ZeroTree:
    """Stands in for diffusers' BrownianTreeNoiseSampler (torchsde): zero increments."""

    def __init__(self, x, sigma_min, sigma_max, seed=None, transform=lambda s: s):
        self.x = x

    def __call__(self, sigma, sigma_next):
        return torch.zeros_like(self.x)


@pytest.fixture
def zero_tree(monkeypatch):
    monkeypatch.setattr(scheduling_dpmsolver_sde, "BrownianTreeNoiseSampler", _ZeroTree)
    # without torchsde, diffusers exports a placeholder class that raises: the tests reach the real one
    monkeypatch.setattr(diffusers, NAME, scheduling_dpmsolver_sde.DPMSolverSDEScheduler)


CASES = [
    ({}, {"steps": 7}),
    ({"prediction_type": "v_prediction", "use_karras_sigmas": True, "beta_schedule": "scaled_linear"}, {"steps": 9}),
    ({"use_exponential_sigmas": True, "timestep_spacing": "trailing"}, {"steps": 5}),
    ({"timestep_spacing": "leading", "steps_offset": 1}, {"steps": 1}),
    ({"timestep_spacing": "leading", "steps_offset": 1, "beta_schedule": "squaredcos_cap_v2"}, {"steps": 2}),
    ({"use_karras_sigmas": True, "num_train_timesteps": 37}, {"steps": 3}),
    ({"trained_betas": torch.linspace(1e-4, 0.03, 50).tolist(), "num_train_timesteps": 50}, {"steps": 28}),
]


@pytest.mark.parametrize("config, kw", CASES, ids=[str(i) for i in range(len(CASES))])
def test_deterministic_part_matches_diffusers(zero_tree, config, kw):
    check_parity(NAME, config, dict(kw, s_noise=0.0))


def test_every_backend(zero_tree, cpu_backend):
    check_parity(NAME, {"use_karras_sigmas": True}, {"steps": 6, "s_noise": 0.0}, backend=cpu_backend)


def test_set_begin_index(zero_tree):
    check_parity(NAME, {"use_karras_sigmas": True}, {"steps": 8, "s_noise": 0.0}, begin=6)


def _denoiser(x, sigma):
    """A smooth denoiser: the posterior mean of N(0.3, 0.5^2) data at noise level sigma."""
    s = sigma.reshape(-1, *([1] * (x.dim() - 1)))
    return 0.3 + 0.25 / (0.25 + s * s) * (x - 0.3)


@pytest.mark.parametrize("config", [{}, {"use_karras_sigmas": True, "prediction_type": "v_prediction"}])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_noise_is_the_dpmpp_sde_sampler_s(config, dtype):
    """The whole loop, noise included, equals diffkern's dpmpp_sde sampler (eta 1, r 1/2) on the scheduler's sigmas
    with the scheduler's seed: the model is fed exactly what the pipeline would feed it."""
    ours = dd.DPMSolverSDEScheduler(noise_sampler_seed=1234, **config)
    ours.set_timesteps(6)
    x = make_tensor((3, 5, 7), dtype, seed=2) * float(ours.init_noise_sigma)
    ref = samplers.sample_dpmpp_sde(_denoiser, x.clone(), torch.tensor(ours.sigmas_host, dtype=torch.float64),
                                    eta=1.0, s_noise=1.0, r=0.5, seed=1234)
    sample = x
    for k, t in enumerate(ours.timesteps):
        sigma = ours._mids[k // 2] if k % 2 else ours.sigmas_host[k // 2]
        scaled = ours.scale_model_input(sample, t)
        d = _denoiser(sample, torch.tensor([sigma], dtype=torch.float64)).to(dtype)
        if config.get("prediction_type") == "v_prediction":  # the v that gives this D at sigma
            c = (sigma * sigma + 1) ** 0.5
            model_output = (scaled * c / (sigma * sigma + 1) - d) * c / sigma
        else:
            model_output = (scaled * (sigma * sigma + 1) ** 0.5 - d) / sigma
        sample = ours.step(model_output, t, sample).prev_sample
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-5}
    torch.testing.assert_close(sample, ref, **tol)


def test_seeding():
    """noise_sampler_seed fixes the noise; without it every set_timesteps draws a fresh seed from torch's global
    generator (diffusers: a fresh tree)."""
    def run(sched, seed_global=None):
        if seed_global is not None:
            torch.manual_seed(seed_global)
        sched.set_timesteps(4)
        x = make_tensor((2, 3), torch.float32, seed=1) * float(sched.init_noise_sigma)
        for t in sched.timesteps:
            x = sched.step(torch.zeros_like(x), t, x).prev_sample
        return x

    a, b = dd.DPMSolverSDEScheduler(noise_sampler_seed=5), dd.DPMSolverSDEScheduler(noise_sampler_seed=5)
    assert torch.equal(run(a), run(b)) and torch.equal(run(a), run(a))
    assert not torch.equal(run(a), run(dd.DPMSolverSDEScheduler(noise_sampler_seed=6)))
    free = dd.DPMSolverSDEScheduler()
    assert torch.equal(run(free, 3), run(free, 3)) and not torch.equal(run(free, 3), run(free, 4))


def _public(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}


def test_config_round_trip_and_conversions(tmp_path):
    theirs = scheduling_dpmsolver_sde.DPMSolverSDEScheduler(use_karras_sigmas=True, noise_sampler_seed=3,
                                             beta_schedule="scaled_linear")
    ours = dd.DPMSolverSDEScheduler.from_config(theirs.config)
    assert _public(ours.config) == _public(theirs.config)
    ours.save_pretrained(tmp_path)
    back = dd.DPMSolverSDEScheduler.from_pretrained(tmp_path)
    assert type(back) is dd.DPMSolverSDEScheduler and _public(back.config) == _public(ours.config)
    assert back.noise_sampler_seed == 3
    # from another scheduler's config, as pipe.scheduler = X.from_config(pipe.scheduler.config) does
    sd = diffusers.PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    ours = dd.DPMSolverSDEScheduler.from_config(sd.config)
    ours.set_timesteps(10)
    stock = scheduling_dpmsolver_sde.DPMSolverSDEScheduler.from_config(sd.config)
    stock.set_timesteps(10)
    assert torch.equal(ours.timesteps, stock.timesteps)  # labels: diffusers' own (timestep_labels)
    with diffusers_float64(scheduling_dpmsolver_sde):  # the truth (diffusers' float32 sigma table is off 1e-5)
        theirs = scheduling_dpmsolver_sde.DPMSolverSDEScheduler.from_config(sd.config)
        theirs.set_timesteps(10)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps, rtol=1e-5, atol=0)
    torch.testing.assert_close(ours.sigmas.double(), theirs.sigmas.double(), rtol=2 ** -23, atol=0)
    assert ours.order == theirs.order == 2 and len(ours) == len(theirs)


@pytest.mark.parametrize("option, value", [("prediction_type", "sample"), ("use_beta_sigmas", True),
                                           ("noise_sampler_seed", 1.5)])
def test_bad_config_raises_by_name(option, value):
    with pytest.raises(ValueError, match=option):
        dd.DPMSolverSDEScheduler(**{option: value})


def test_bad_s_noise_raises_by_name():
    sched = dd.DPMSolverSDEScheduler(noise_sampler_seed=0)
    sched.set_timesteps(3)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="s_noise: expected a finite number"):
        sched.step(x, sched.timesteps[0], x, s_noise=-1.0)
    sched.step(x, sched.timesteps[0], x, s_noise=0.5)
    with pytest.raises(ValueError, match="s_noise: the second call"):
        sched.step(x, sched.timesteps[1], x, s_noise=1.0)

#----------------------------------------------------------------------------
# Level 2: accelerate(pipe) runs the scheduler as diffkern's dpmpp_sde loop.

from diffusers import DDPMPipeline  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402
from test_diffusers_pipelines import (STEPS, _level1_philox_loop, float64_copy, pipeline_modules,  # noqa: E402
                                      text2image, tiny_sd, tiny_unet)  # noqa: F401  (tiny_sd: a fixture)


@pytest.mark.parametrize("config", [{"noise_sampler_seed": 77},
                                    {"use_karras_sigmas": True, "prediction_type": "v_prediction"}])
@pytest.mark.filterwarnings("ignore:accelerate. DDPMPipeline's own loop does not scale:UserWarning")
def test_level2_matches_level1_noise_included(config):
    """The fused loop is the Level-1 scheduler's loop, noise included: keyed by noise_sampler_seed when the config
    sets it, else by a seed drawn from the pipeline's generator right after the initial latents."""
    pipe = DDPMPipeline(unet=tiny_unet(), scheduler=dd.DPMSolverSDEScheduler(**config))
    pipe.set_progress_bar_config(disable=True)
    fast = dd.accelerate(pipe)

    def level2(seed):
        return fast(batch_size=2, generator=torch.Generator().manual_seed(seed), num_inference_steps=STEPS,
                    output_type="pt").images

    ours = level2(3)
    torch.testing.assert_close(level2(3), ours, rtol=0, atol=0)
    if "noise_sampler_seed" in config:
        seed = config["noise_sampler_seed"]
    else:
        gen = torch.Generator().manual_seed(3)
        randn_tensor((2, 3, 8, 8), generator=gen)
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen))

    def level1(dtype):
        return _level1_philox_loop(tiny_unet(), NAME, config, seed, torch.Generator().manual_seed(3), dtype)

    assert_matches_reference(ours, level1(torch.float64), level1(torch.float32), f"{config} level 2 vs level 1")


@pytest.mark.filterwarnings("ignore:accelerate. DDPMPipeline's own loop does not scale:UserWarning")
def test_level2_feeds_the_unet_diffusers_timesteps(zero_tree):
    """Every UNet call of the fused loop gets the timestep diffusers' scheduler feeds at that call (the midpoint
    calls' fractional ones included), on every call of the accelerated pipeline."""
    unet = tiny_unet()
    seen = []
    forward = unet.forward

    def spy(sample, timestep, *args, **kwargs):
        seen.append(torch.as_tensor(timestep).reshape(-1)[0].double())
        return forward(sample, timestep, *args, **kwargs)

    unet.forward = spy
    theirs = scheduling_dpmsolver_sde.DPMSolverSDEScheduler(use_karras_sigmas=True)
    theirs.set_timesteps(STEPS)
    fast = dd.accelerate(DDPMPipeline(unet=unet, scheduler=theirs))
    for _ in range(2):
        seen.clear()
        fast(batch_size=1, num_inference_steps=STEPS, output_type="pt", generator=torch.Generator().manual_seed(0))
        assert len(seen) == 2 * STEPS - 1
        # as the UNet's float32 time embedding reads them; diffusers' float32 log-sigma table moves the Karras
        # timesteps by up to ~1e-3 near t = 0 (Level 1's own difference)
        torch.testing.assert_close(torch.stack(seen).float(), theirs.timesteps.float(), rtol=0, atol=2e-3)


@pytest.mark.parametrize("config", [{}, {"use_karras_sigmas": True, "prediction_type": "v_prediction"}])
def test_text2image_level2_matches_diffusers_without_noise(zero_tree, tiny_sd, config):
    """With CFG, against the stock StableDiffusionPipeline running diffusers' own DPMSolverSDEScheduler (float64 as
    the truth), noise off on both sides: diffusers' by the zero Brownian tree, ours by s_noise=0 (the scheduler's
    method with that knob, on its schedule and midpoint timesteps)."""
    theirs = scheduling_dpmsolver_sde.DPMSolverSDEScheduler(beta_schedule="scaled_linear", **config)
    pipe = tiny_sd(theirs)
    run_config = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    with diffusers_float64(scheduling_dpmsolver_sde, *pipeline_modules(pipe)):
        twin = float64_copy(pipe, scheduling_dpmsolver_sde.DPMSolverSDEScheduler(**run_config))
        truth = text2image(twin, torch.Generator().manual_seed(5))
    eager = text2image(pipe, torch.Generator().manual_seed(5))
    fast = dd.accelerate(pipe, method="dpmpp_sde", eta=1.0, s_noise=0.0, r=0.5)
    assert_matches_reference(text2image(fast, torch.Generator().manual_seed(5)), truth, eager, f"{config}")


def test_add_noise_and_begin_index():
    """add_noise picks diffusers' sigma: by timestep (midpoint timesteps included), and after set_begin_index the
    begin step's; an odd begin index (a second call) is refused, as for the other order-2 schedulers."""
    theirs = scheduling_dpmsolver_sde.DPMSolverSDEScheduler(use_karras_sigmas=True)
    ours = dd.DPMSolverSDEScheduler.from_config(theirs.config)
    for s in (theirs, ours):
        s.set_timesteps(10)
    x0, noise = make_tensor((3, 4, 5), seed=3), make_tensor((3, 4, 5), seed=4)
    pick = [0, 3, 8]  # each scheduler's own timesteps (the fractional midpoints differ in the last bits)
    torch.testing.assert_close(ours.add_noise(x0, noise, ours.timesteps[pick]),
                               theirs.add_noise(x0, noise, theirs.timesteps[pick]), rtol=2e-5, atol=2e-5)
    for s in (theirs, ours):
        s.set_begin_index(4)
    torch.testing.assert_close(ours.add_noise(x0, noise, ours.timesteps[:1]),
                               theirs.add_noise(x0, noise, theirs.timesteps[:1]), rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="begin_index: expected an even index"):
        ours.set_begin_index(3)
