"""``variance_type`` in DPMSolverMultistepScheduler configs: diffusers loads any value (a DDPM config's "fixed_small"
or "fixed_large" when a pipeline swaps its scheduler with ``from_config``) and, for learned variances with epsilon
prediction, keeps the first 3 channels of the model output; so must the drop-in. Level 2 refuses learned variances
by name (the fused loop has no channels to drop)."""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.testing import assert_matches_reference, make_tensor  # noqa: E402
from test_diffusers_schedulers import diffusers_float64, scheduler_module  # noqa: E402

NAME = "DPMSolverMultistepScheduler"
F32, F64 = torch.float32, torch.float64


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "fixed_small_log", "learned_range"])
def test_a_ddpm_config_loads_as_diffusers_loads_it(variance_type):
    config = diffusers.DDPMScheduler(variance_type=variance_type).config
    ours = dd.DPMSolverMultistepScheduler.from_config(config)
    theirs = diffusers.DPMSolverMultistepScheduler.from_config(config)
    assert ours.config.variance_type == theirs.config.variance_type == variance_type


@pytest.mark.parametrize("variance_type", ["learned", "learned_range", "fixed_large"])
@pytest.mark.parametrize("solver_order", [2, 3])
def test_learned_variance_steps_keep_the_first_three_channels(variance_type, solver_order):
    """A 6-channel epsilon output (mean and variance channels) on a 3-channel sample: step for step diffusers' own
    update (run in float64 as the truth), within the float32 rule."""
    config = {"variance_type": variance_type, "solver_order": solver_order}
    with diffusers_float64(scheduler_module(NAME)):
        truth = diffusers.DPMSolverMultistepScheduler(**config)
        truth.set_timesteps(6)
    ours = dd.DPMSolverMultistepScheduler(**config)
    eager = diffusers.DPMSolverMultistepScheduler(**config)
    ours.set_timesteps(6)
    eager.set_timesteps(6)
    x = make_tensor((2, 3, 4, 4), F64, seed=1)
    channels = 6 if variance_type.startswith("learned") else 3
    for k, t in enumerate(truth.timesteps):
        m = make_tensor((2, channels, 4, 4), F64, seed=20 + k)
        with diffusers_float64(scheduler_module(NAME)):
            ref = truth.step(m, t, x).prev_sample
        want32 = eager.step(m.float(), t, x.float()).prev_sample
        got = ours.step(m.float(), t, x.float()).prev_sample
        assert got.shape == x.shape
        assert_matches_reference(got, ref, want32, f"{config} step {k}")
        x = ref


def test_level2_refuses_learned_variances_by_name():
    from test_diffusers_pipelines import NoiseLikeUNet, tiny_unet
    pipe = diffusers.DDPMPipeline(unet=tiny_unet(NoiseLikeUNet), scheduler=diffusers.DDPMScheduler())
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler(variance_type="learned_range")
    with pytest.raises(ValueError, match="variance_type='learned_range'"):
        dd.accelerate(pipe)(num_inference_steps=2, output_type="pt")
