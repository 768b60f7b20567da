"""``LatentConsistencyModelPipeline`` at Level 2: ``diffkern.diffusers.accelerate`` on a distilled-LCM pipeline (a UNet
with ``time_cond_proj_dim`` fed the guidance embedding as ``timestep_cond``, no CFG batch).

Oracles (the project rule, ``diffkern.testing.assert_matches_reference``, via the helpers of ``test_lcm_accelerate``):
- one step (no re-noising): the stock pipeline with diffusers' ``LCMScheduler``, in float64 as the truth and in float32
  as the yardstick, same generator;
- several steps: the stock pipeline driven by diffkern's Level-1 ``LCMScheduler`` keyed by the Philox seed that Level
  2 draws from the generator (float64 truth, float32 yardstick).
"""
import functools

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.testing import assert_matches_reference  # noqa: E402
from test_diffusers_pipelines import tiny_sd  # noqa: E402, F401
from test_lcm_accelerate import one_step_runs, philox_runs  # noqa: E402

PROMPTS = ["a cat", "a dog"]
LATENTS = (2, 4, 8, 8)


@pytest.fixture
def tiny_lcm(tiny_sd):  # noqa: F811
    """A factory ``scheduler -> LatentConsistencyModelPipeline`` of tiny_sd's text encoder and VAE and a random UNet of
    the same shape with an 8-dim guidance embedding (the same weights at each call)."""
    def make(scheduler):
        sd = tiny_sd(diffusers.LCMScheduler(steps_offset=1))  # steps_offset=1: no SD-pipeline warning
        config = {k: v for k, v in sd.unet.config.items() if not k.startswith("_")}
        torch.manual_seed(2)
        unet = diffusers.UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": 8}).eval()
        pipe = diffusers.LatentConsistencyModelPipeline(
            vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    return make


def lcm_call(pipe, generator, steps, guidance_scale=3.0, output_type="pt", **kw):
    """Two prompts (a guidance embedding each), images (or latents) as a tensor ("np": NHWC)."""
    if "timesteps" in kw:
        steps = None
    out = pipe(PROMPTS, generator=generator, num_inference_steps=steps, guidance_scale=guidance_scale,
               output_type=output_type, **kw).images
    return out if isinstance(out, torch.Tensor) else torch.as_tensor(out)


@pytest.mark.parametrize("pred, scaling", [("epsilon", 10.0), ("v_prediction", 0.002)])
def test_one_step_equals_the_pipeline(tiny_lcm, pred, scaling):
    pipe = tiny_lcm(diffusers.LCMScheduler(prediction_type=pred, timestep_scaling=scaling))
    ours, truth, eager = one_step_runs(pipe, lcm_call)
    assert_matches_reference(ours, truth, eager, f"LCM pipeline {pred} one step")


@pytest.mark.parametrize("kw", [{}, {"original_inference_steps": 20}, {"timesteps": [999, 759, 399]}])
def test_multistep_matches_level1_philox(tiny_lcm, kw):
    """The fused loop against the pipeline's own loop with diffkern's Level-1 LCMScheduler on the same Philox seed,
    with the default, an explicit original_inference_steps and custom timesteps."""
    pipe = tiny_lcm(diffusers.LCMScheduler(timestep_scaling=0.002))
    latents = torch.randn(LATENTS, generator=torch.Generator().manual_seed(9))
    ours, truth, eager = philox_runs(pipe, functools.partial(lcm_call, **kw), 3, latents=latents)
    assert_matches_reference(ours, truth, eager, f"LCM pipeline level 2 vs level 1 {kw}")


def test_guidance_scale_outputs_and_batch(tiny_lcm):
    """One accelerated pipeline (one model wrapper): a new guidance scale changes the images, each as the stock
    pipeline makes them; num_images_per_prompt, output types and return_dict=False as the pipeline returns them."""
    pipe = tiny_lcm(diffusers.LCMScheduler(timestep_scaling=0.002))
    fast = dd.accelerate(pipe)

    def both(**kw):
        stock, ours = (lcm_call(p, torch.Generator().manual_seed(1), 1, **kw) for p in (pipe, fast))
        assert ours.shape == stock.shape and ours.dtype == stock.dtype, kw
        torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-5)
        return ours
    low, high = both(guidance_scale=1.5), both(guidance_scale=8.5)
    assert float((low - high).abs().max()) > 1e-3, "the guidance embedding did not reach the UNet"
    assert both(num_images_per_prompt=2).shape == (4, 3, 16, 16)
    assert both(output_type="latent").shape == LATENTS
    assert both(output_type="np").shape == (2, 16, 16, 3)
    out = fast(PROMPTS, num_inference_steps=2, generator=torch.Generator().manual_seed(1), output_type="np",
               return_dict=False)
    assert isinstance(out, tuple) and isinstance(out[0], np.ndarray) and out[1] is None
    embeds = pipe.encode_prompt(PROMPTS, "cpu", 1, False)[0]
    by_embeds = fast(prompt_embeds=embeds, num_inference_steps=1, guidance_scale=3.0,
                     generator=torch.Generator().manual_seed(1), output_type="pt").images
    torch.testing.assert_close(by_embeds, lcm_call(fast, torch.Generator().manual_seed(1), 1), rtol=0, atol=0)


def test_refusals_name_the_argument(tiny_lcm):
    pipe = tiny_lcm(diffusers.LCMScheduler())
    fast = dd.accelerate(pipe)
    for kw in ({"ip_adapter_image_embeds": [torch.zeros(2, 1, 8)]}, {"callback_on_step_end": lambda *a: {}},
               {"callback": lambda *a: None}, {"negative_prompt": "blurry"}):
        with pytest.raises(TypeError, match=f"argument\\(s\\) \\['{next(iter(kw))}'\\] not supported"):
            fast("a cat", num_inference_steps=1, **kw)
    with pytest.raises(ValueError, match=r"LCMScheduler: num_inference_steps=8 exceeds the 4 candidate timesteps \(original_inference_steps"):
        fast("a cat", num_inference_steps=8, original_inference_steps=4)
    pipe.scheduler = diffusers.EulerDiscreteScheduler()
    with pytest.raises(TypeError, match="LatentConsistencyModelPipeline with a EulerDiscreteScheduler"):
        fast("a cat", num_inference_steps=1)
    with pytest.raises(TypeError, match="LatentConsistencyModelPipeline with a EulerDiscreteScheduler"):
        dd.accelerate(pipe)


@pytest.mark.cuda
def test_cuda_graph_replays_a_new_guidance_scale(tiny_lcm):
    """The guidance embedding is a tensor extra arg: a new guidance scale replays the capture, bitwise as eager."""
    from diffkern import graphs

    pipe = tiny_lcm(diffusers.LCMScheduler(timestep_scaling=0.002)).to("cuda")
    graphed, eager = dd.accelerate(pipe, graph=True), dd.accelerate(pipe, graph=False)
    graphs.clear()
    for w in (2.0, 6.0, 2.0):
        want = lcm_call(eager, torch.Generator("cuda").manual_seed(0), 3, guidance_scale=w)
        got = lcm_call(graphed, torch.Generator("cuda").manual_seed(0), 3, guidance_scale=w)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert graphs.info()["captures"] == 1 and graphs.info()["replays"] >= 2
