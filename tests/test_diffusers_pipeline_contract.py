"""Pipelines with diffkern schedulers and ``diffkern.diffusers.accelerate``: the contract (persistence, reuse,
scheduler swaps, bad input, explicit method and backend, CUDA graphs). Split from test_diffusers_pipelines.py, whose
helpers and tiny models these tests use."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from test_diffusers_pipelines import text2image, tiny_sd, tiny_unet, unconditional  # noqa: E402, F401  (tiny_sd: a fixture)

from diffusers import DDIMPipeline, DDPMPipeline, UNet2DModel  # noqa: E402

#----------------------------------------------------------------------------
# Contract: persistence, reuse, bad input.


def test_pipeline_save_and_load_keeps_diffkern_scheduler(tmp_path):
    pipe = DDPMPipeline(unet=tiny_unet(UNet2DModel), scheduler=dd.DDPMScheduler(timestep_spacing="trailing"))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path)
    loaded = DDPMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler) is dd.DDPMScheduler
    assert loaded.scheduler.config.timestep_spacing == "trailing"
    a = unconditional(pipe, torch.Generator().manual_seed(0))
    b = unconditional(loaded, torch.Generator().manual_seed(0))
    torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_accelerated_pipeline_forwards_and_follows_scheduler_swaps():
    pipe = DDIMPipeline(unet=tiny_unet(), scheduler=diffusers.DDIMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    fast = dd.accelerate(pipe)
    assert fast.unet is pipe.unet and "DDIMPipeline" in repr(fast) and fast.to("cpu") is fast
    a = unconditional(fast, torch.Generator().manual_seed(0))
    pipe.scheduler = dd.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    b = unconditional(fast, torch.Generator().manual_seed(0))
    assert not torch.equal(a, b)
    out = fast(batch_size=1, num_inference_steps=2, output_type="np", return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == (1, 8, 8, 3)


def test_accelerate_bad_input():
    pipe = DDIMPipeline(unet=tiny_unet(), scheduler=diffusers.DDIMScheduler(clip_sample=False))
    with pytest.raises(TypeError, match="unsupported pipeline object"):
        dd.accelerate(object())
    with pytest.raises(ValueError, match="graph: expected"):
        dd.accelerate(pipe, graph="yes")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="graph=True"):
            dd.accelerate(pipe, graph=True)
    with pytest.raises(ValueError, match="backend"):
        dd.accelerate(pipe, backend="fortran")
    with pytest.raises(TypeError, match="knobs"):
        dd.accelerate(pipe, s_churn=1.0)
    fast = dd.accelerate(pipe)
    with pytest.raises(TypeError, match="callback_on_step_end"):
        fast(callback_on_step_end=lambda *a: {})
    pipe.scheduler = diffusers.LCMScheduler(clip_sample=True)  # (DDIM's and DDPM's: tests/test_level2_clip18.py)
    with pytest.raises(ValueError, match="clip_sample=True"):
        dd.accelerate(pipe)
    pipe.scheduler = diffusers.DDIMScheduler(clip_sample=False, timestep_spacing="trailing")
    with pytest.raises(ValueError, match="timestep_spacing='trailing'"):
        fast(num_inference_steps=3)
    pipe.scheduler = diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=False)
    with pytest.raises(ValueError, match="set_alpha_to_one=False"):
        fast(num_inference_steps=1)
    pipe.scheduler = diffusers.PNDMScheduler()  # the class default runs Runge-Kutta steps first: Level 1 only
    with pytest.raises(ValueError, match="skip_prk_steps"):
        dd.accelerate(pipe)
    pipe.scheduler = diffusers.UnCLIPScheduler()  # no diffkern drop-in
    with pytest.raises(ValueError, match="unsupported scheduler UnCLIPScheduler; supported: DDIMScheduler"):
        dd.accelerate(pipe)
    pipe.scheduler = diffusers.DDIMScheduler(thresholding=True)
    with pytest.raises(ValueError, match="thresholding=True"):
        dd.accelerate(pipe)


def test_accelerate_explicit_method_and_every_backend(cpu_backend, tiny_sd):
    config = {"beta_start": 0.0002, "beta_end": 0.015}  # explicit: from_config swaps unset keys for defaults
    pipe = tiny_sd(diffusers.EulerDiscreteScheduler(**config))
    fast = dd.accelerate(pipe, method="heun", backend=cpu_backend)
    heun = dd.accelerate(tiny_sd(diffusers.HeunDiscreteScheduler(**config)), backend=cpu_backend)
    a = text2image(fast, torch.Generator().manual_seed(0), output_type="latent")
    b = text2image(heun, torch.Generator().manual_seed(0), output_type="latent")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_accelerate_cuda_graph_matches_eager(tiny_sd):
    pipe = tiny_sd(diffusers.DPMSolverMultistepScheduler()).to("cuda")
    eager = text2image(dd.accelerate(pipe, graph=False), torch.Generator("cuda").manual_seed(0))
    fast = dd.accelerate(pipe, graph=True)
    for _ in range(2):  # capture, then replay
        graph = text2image(fast, torch.Generator("cuda").manual_seed(0))
        torch.testing.assert_close(graph, eager, rtol=0, atol=0)


@pytest.mark.cuda
def test_accelerate_cuda_graph_calls_from_two_streams(tiny_sd):
    """Calls alternating between two streams, with guidance_rescale (a per-call device write before the replay,
    ordered after the previous replay by graphs.order_after_last_replay): each equals its eager run."""
    pipe = tiny_sd(diffusers.KDPM2DiscreteScheduler()).to("cuda")
    calls = [{"guidance_rescale": 0.3}, {"guidance_rescale": 0.7}]
    eager = [text2image(dd.accelerate(pipe, graph=False), torch.Generator("cuda").manual_seed(0), **kw)
             for kw in calls]
    fast = dd.accelerate(pipe, graph=True)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for _ in range(3):
        got = []
        for stream, kw in zip(streams, calls):
            with torch.cuda.stream(stream):
                got.append(text2image(fast, torch.Generator("cuda").manual_seed(0), **kw))
        torch.cuda.synchronize()
        for g, e in zip(got, eager):
            torch.testing.assert_close(g, e, rtol=0, atol=0)
