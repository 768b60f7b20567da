"""Level 2 (``diffkern.diffusers.accelerate``) gaps: a text-to-image pipeline with DDIM's ``clip_sample=True``, and
the asymmetric-VAE refusal of inpainting.

- ``StableDiffusionPipeline.__init__`` rewrites ``clip_sample=True`` to False on the scheduler it is given, so a
  clipping DDIM reaches a text-to-image loop only when assigned afterwards (``pipe.scheduler = ...``). With CFG the
  clip applies to the guided x0 (``clip_denoised`` on the fused step's guided D). Oracle: the project rule
  (``assert_matches_reference``): the stock pipeline in float64 is the truth, its float32 run the yardstick.
  ``StableDiffusionPipeline.__call__`` takes no ``use_clipped_model_output`` (its step gets eta and the generator
  only), so only the default (False) runs: the stock pipeline's ``**kwargs`` swallows the argument, the fused loop
  refuses it by name.
- ``AsymmetricAutoencoderKL``: ``StableDiffusionInpaintPipeline`` decodes with the image and mask as conditions,
  which the fused loop's decode does not pass: refused by name, at accelerate() and at a call after
  ``pipe.vae = ...`` swaps one in (diffusers loads it that way). Text-to-image decodes it with no conditions, as the
  stock pipeline does: accepted there, and equal to the stock images.
Tiny random models only (the fixtures of test_diffusers_pipelines.py), no downloads.
"""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.testing import assert_matches_reference  # noqa: E402
from test_diffusers_level2_sdxl_inpaint import _image, _mask, inpaint_pipe  # noqa: E402
from test_diffusers_pipelines import float64_copy, pipeline_modules, text2image, tiny_sd  # noqa: E402, F401
from test_diffusers_schedulers import diffusers_float64, scheduler_module  # noqa: E402

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1}


def _runs(pipe, make_scheduler, **kw):
    """(ours, truth, eager) text-to-image images of ``pipe`` with ``make_scheduler()`` assigned after construction:
    ours through accelerate(), the truth the stock pipeline in float64, eager the stock float32 run."""
    pipe.scheduler = make_scheduler()
    name = type(pipe.scheduler).__name__
    with diffusers_float64(scheduler_module(name), *pipeline_modules(pipe)):
        truth = text2image(float64_copy(pipe, make_scheduler()), torch.Generator().manual_seed(5), **kw)
    eager = text2image(pipe, torch.Generator().manual_seed(5), **kw)
    ours = text2image(dd.accelerate(pipe), torch.Generator().manual_seed(5), **kw)
    assert 0.1 < float(((eager > 0) & (eager < 1)).float().mean()), "images saturated: the comparison would be void"
    return ours, truth, eager

#----------------------------------------------------------------------------
# DDIM clip_sample=True in a text-to-image pipeline with CFG.


@pytest.mark.parametrize("config, kw", [
    ({}, {}),  # clip_sample_range 1, set_alpha_to_one True, leading spacing from t=750
    (dict(SD, set_alpha_to_one=False), {}),  # SD's schedule, ending at t=1
    (dict(SD, clip_sample_range=0.5), {"eta": -0.4}),  # eta < 0: the |eta| direction, no noise (deterministic)
    (dict(SD, clip_sample_range=0.5, prediction_type="v_prediction", timestep_spacing="trailing"), {}),
], ids=str)
def test_text2img_ddim_clip_sample_matches_the_stock_pipeline(tiny_sd, config, kw):
    make = lambda: diffusers.DDIMScheduler(clip_sample=True, **config)  # noqa: E731
    pipe = tiny_sd(diffusers.DDIMScheduler())
    ours, truth, eager = _runs(pipe, make, **kw)
    assert pipe.scheduler.config.clip_sample  # not rewritten: assigned after construction
    assert_matches_reference(ours, truth, eager, f"text2image DDIM clip_sample {config} {kw}")


def test_text2img_ddim_clip_matters_here(tiny_sd):
    """The comparisons above are not void: on the tiny SD clipping changes the images."""
    pipe = tiny_sd(diffusers.DDIMScheduler())
    runs = []
    for clip in (True, False):
        pipe.scheduler = diffusers.DDIMScheduler(clip_sample=clip, clip_sample_range=0.5, **SD)
        runs.append(text2image(dd.accelerate(pipe), torch.Generator().manual_seed(5)))
    assert (runs[0] - runs[1]).abs().max() > 1e-2


def test_text2img_ddim_clip_refusals(tiny_sd):
    """``use_clipped_model_output`` is no StableDiffusionPipeline argument: the stock pipeline ignores it (its
    ``**kwargs``), the fused loop refuses it by name; and a clipped last step from t=0 to itself
    (``set_alpha_to_one=False`` with timesteps ending at 0) moves x by clip(x0) - x0: refused by name at accelerate()."""
    pipe = tiny_sd(diffusers.DDIMScheduler())
    pipe.scheduler = diffusers.DDIMScheduler(clip_sample=True, **SD)
    ignored = [text2image(pipe, torch.Generator().manual_seed(5), **kw) for kw in ({"use_clipped_model_output": True},
                                                                                  {})]
    torch.testing.assert_close(ignored[0], ignored[1], rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"\['use_clipped_model_output'\] not supported by the fused loop"):
        text2image(dd.accelerate(pipe), torch.Generator().manual_seed(5), use_clipped_model_output=True)
    pipe.scheduler = diffusers.DDIMScheduler(clip_sample=True, set_alpha_to_one=False)  # steps_offset 0: ends at t=0
    with pytest.raises(ValueError, match="DDIMScheduler with set_alpha_to_one=False.*clip_sample moves x"):
        dd.accelerate(pipe)

#----------------------------------------------------------------------------
# AsymmetricAutoencoderKL.


def _asymmetric_vae():
    """A tiny random AsymmetricAutoencoderKL with the tiny SD's latent shape (4 channels, 8x8 for 16x16 pixels)."""
    torch.manual_seed(3)
    return diffusers.AsymmetricAutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, down_block_out_channels=(8, 8),
        up_block_types=("UpDecoderBlock2D",) * 2, up_block_out_channels=(8, 8), latent_channels=4, norm_num_groups=4,
        sample_size=16).eval()


def test_inpaint_refuses_an_asymmetric_vae(tiny_sd):
    pipe = inpaint_pipe(tiny_sd, diffusers.EulerDiscreteScheduler())
    fast = dd.accelerate(pipe)  # a plain AutoencoderKL: accepted
    pipe.vae = _asymmetric_vae()  # as diffusers loads one: into a built pipeline
    message = "StableDiffusionInpaintPipeline with an AsymmetricAutoencoderKL: its decode takes the image and mask"
    with pytest.raises(TypeError, match=message):
        dd.accelerate(pipe)
    kw = {"image": _image(1), "mask_image": _mask(1), "num_inference_steps": 3, "output_type": "pt"}
    with pytest.raises(TypeError, match=message):  # swapped in after accelerate(): refused at the call
        fast("a cat", generator=torch.Generator().manual_seed(1), **kw)
    stock = pipe("a cat", generator=torch.Generator().manual_seed(1), **kw).images  # the stock pipeline runs it
    assert stock.shape == (1, 3, 16, 16) and torch.isfinite(stock).all()


def test_text2img_with_an_asymmetric_vae_matches_the_stock_pipeline(tiny_sd):
    """Text-to-image decodes an AsymmetricAutoencoderKL with no conditions, as the stock pipeline: not refused."""
    pipe = tiny_sd(diffusers.EulerDiscreteScheduler())
    pipe.vae = _asymmetric_vae()
    ours, truth, eager = _runs(pipe, lambda: diffusers.EulerDiscreteScheduler(**SD))
    assert_matches_reference(ours, truth, eager, "text2image with an AsymmetricAutoencoderKL")
