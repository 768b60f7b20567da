"""Review session 12b regressions.

DanceDiffusionPipeline (the pipeline IPNDMScheduler is diffusers' scheduler of) casts the scheduler's timesteps to its
UNet's dtype before its loop (``scheduler.timesteps = scheduler.timesteps.to(dtype)``) and passes those to ``step``.
With a 16-bit UNet on the CPU every timestep it passes is the schedule's rounded to 16 bits; diffusers' IPNDM indexes by
its step counter and runs, diffkern's drop-in refused the second step ("timestep: expected 0.651114 ..., got
0.652344"). Oracle: the project rule (diffkern.testing.assert_matches_reference): truth the stock pipeline with a
float64 UNet and diffusers' IPNDM under float64 default dtype, yardstick the stock 16-bit run, all from one initial
noise.
"""
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.testing import assert_matches_reference  # noqa: E402
from test_ipndm_scheduler import float64_default  # noqa: E402



def _tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet1DModel(
        block_out_channels=(32, 32, 64), extra_in_channels=64, sample_size=512, sample_rate=16_000, in_channels=2,
        out_channels=2, flip_sin_to_cos=True, use_timestep_embedding=False, time_embedding_type="fourier",
        mid_block_type="UNetMidBlock1D", down_block_types=("DownBlock1DNoSkip", "DownBlock1D", "AttnDownBlock1D"),
        up_block_types=("AttnUpBlock1D", "UpBlock1D", "UpBlock1DNoSkip")).eval()


def _dance(unet, scheduler, dtype, noise, monkeypatch, steps):
    from diffusers.pipelines.deprecated.dance_diffusion import pipeline_dance_diffusion as module

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.DanceDiffusionPipeline(unet=unet.to(dtype), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    with monkeypatch.context() as m:  # one initial noise for every run, in the run's dtype
        m.setattr(module, "randn_tensor", lambda shape, generator=None, device=None, dtype=None: noise.to(dtype))
        return torch.as_tensor(pipe(num_inference_steps=steps, audio_length_in_s=512 / 16_000,
                                    return_dict=False)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("steps", [4, 12])
def test_ipndm_in_dance_diffusion_with_a_16_bit_unet(monkeypatch, dtype, steps):
    unet = _tiny_unet()
    noise = torch.randn(1, 2, 512, generator=torch.Generator().manual_seed(1))
    with float64_default():
        truth = _dance(unet, diffusers.IPNDMScheduler(), torch.float64, noise, monkeypatch, steps)
    eager = _dance(unet, diffusers.IPNDMScheduler(), dtype, noise, monkeypatch, steps)
    ours = _dance(unet, dd.IPNDMScheduler(), dtype, noise, monkeypatch, steps)
    assert_matches_reference(ours, truth.to(torch.float64), eager, f"Dance Diffusion IPNDM {dtype} {steps} steps")


def test_a_16_bit_timestep_must_still_be_the_next_one():
    """The relaxation accepts the next timestep rounded to the tensor's 16-bit dtype, nothing else."""
    sched = dd.IPNDMScheduler()
    sched.set_timesteps(8)
    x = torch.randn(1, 2, 16, dtype=torch.bfloat16)
    ts = sched.timesteps.to(torch.bfloat16)
    x = sched.step(x, ts[0], x).prev_sample
    with pytest.raises(ValueError, match=r"timesteps\[1\]"):
        sched.step(x, ts[2], x)
    sched.step(x, ts[1], x)


def test_img2img_left_with_only_an_identity_step_says_so():
    """img2img whose begin step leaves only the identity last step (EDMEuler with final_sigmas_type='sigma_min'):
    refused with a message naming that cause, not a bare range error."""
    from diffkern.diffusers.loop_spec import loop_spec, tail_spec

    ours = dd.EDMEulerScheduler(final_sigmas_type="sigma_min")
    ours.set_timesteps(4)
    spec = loop_spec(ours)
    assert len(spec.timesteps) == 3  # the identity last step dropped
    with pytest.raises(ValueError, match="strength: the partial schedule starts at step 3, where only identity steps"):
        tail_spec(ours, spec, 3)
