"""Level 2 for the PixArt DiT text-to-image pipelines: ``PixArtAlphaPipeline`` and ``PixArtSigmaPipeline`` calls whose
denoising loop runs in diffkern (:func:`diffkern.diffusers.accelerate` routes a pipeline with a
``PixArtTransformer2DModel`` here).

Everything around the loop is the pipeline's own code, called as the pipeline calls it: the resolution binning
(``use_resolution_binning``: the image processor's ``classify_height_width_bin`` on the pipeline's aspect-ratio
table, ``resize_and_crop_tensor`` after the decode), ``check_inputs``, ``encode_prompt`` (T5 embeddings and their
attention masks), the VAE decode and the image processor. The loop is one :meth:`AcceleratedPipeline._run` call on
the pipeline's VP scheduler (DPM-Solver++ by default; DDIM, Euler, UniPC, ...), with the transformer wrapped as
:class:`PixArtDenoiser`: ``encoder_hidden_states`` and ``encoder_attention_mask`` go in as extra args, their
negatives as ``uncond_<name>`` (one batched call on ``[uncond; cond]``, CFG fused into the step), PixArt-alpha's
micro-conditions (``resolution``, ``aspect_ratio``: only for a ``sample_size`` 128 transformer, as the pipeline)
as ``added_cond_kwargs``, the same for both halves. All are tensors, so a new prompt replays a captured loop.

PixArt-alpha's one-step loop (``num_inference_steps=1``) returns the second output of ``scheduler.step``, its x0
estimate, rather than the step's sample: the fused loop then runs one Euler step to sigma 0, whose result is the
denoiser's estimate D at the first timestep (the boundary-conditioned one for LCM). Schedulers whose step returns
no x0 estimate make the stock pipeline fail (IndexError): refused by name.
"""
from __future__ import annotations

import dataclasses

import torch

from .accelerate import AcceleratedPipeline, _check_call_arguments, _default, _steps, _reject
from .accelerate_args import _keywords, uncompiled
from .accelerate_text2img import _initial_latents, _prompt_batch, unet_extra
from .schedule_denoiser import ScheduleDenoiser

# Schedulers whose step(..., return_dict=False) is (prev_sample,) only, in diffusers and in diffkern alike.
_NO_X0_OUTPUT = frozenset({"DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler",
                           "DEISMultistepScheduler", "PNDMScheduler", "SASolverScheduler", "IPNDMScheduler",
                           "EDMDPMSolverMultistepScheduler"})


class PixArtDenoiser(ScheduleDenoiser):
    """:class:`ScheduleDenoiser` on a ``PixArtTransformer2DModel``, called as the PixArt pipelines call it: the
    timestep by keyword (the transformer's second positional argument is ``encoder_hidden_states``), and with learned
    sigma (``out_channels // 2`` = the latent channels) the first half of the output channels kept."""

    def call_model(self, x_in, t, **extra):
        model = self.model
        out = model(x_in.to(model.dtype), timestep=t, return_dict=False, **extra)[0]
        return out.chunk(2, dim=1)[0] if model.out_channels // 2 == x_in.shape[1] else out


class PixArtAcceleratedPipeline(AcceleratedPipeline):
    """:class:`~diffkern.diffusers.accelerate.AcceleratedPipeline` of a PixArt-alpha or PixArt-sigma pipeline."""

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        """The pipeline's call with its usual arguments (``prompt``, ``negative_prompt``, ``num_inference_steps``,
        ``guidance_scale``, ``num_images_per_prompt``, ``height``, ``width``, ``eta``, ``generator``, ``latents``,
        the prompt embeddings and attention masks and their negatives, ``output_type``, ``return_dict``,
        ``clean_caption``, ``use_resolution_binning``, ``max_sequence_length``). Callbacks and custom
        timesteps/sigmas raise."""
        return call_pixart(self, **_keywords(self.pipe, args, kwargs))  # positionals as the pipeline's


def _aspect_ratio_bins(pipe, sigma: bool):
    """The pipeline's aspect-ratio table for its transformer's ``sample_size`` (PixArt-sigma also has 2048 px)."""
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha as alpha, pipeline_pixart_sigma as sig

    bins = {128: alpha.ASPECT_RATIO_1024_BIN, 64: alpha.ASPECT_RATIO_512_BIN, 32: alpha.ASPECT_RATIO_256_BIN}
    if sigma:
        bins[256] = sig.ASPECT_RATIO_2048_BIN
    size = pipe.transformer.config.sample_size
    if size not in bins:  # the pipeline raises "Invalid sample size"
        raise ValueError(f"use_resolution_binning: {type(pipe).__name__} has aspect-ratio bins for transformer "
                         f"sample sizes {sorted(bins)}, not {size}; pass use_resolution_binning=False")
    return bins[size]


def _micro_conditions(pipe, sigma: bool, n: int, height: int, width: int, dtype, device) -> dict:
    """The ``added_cond_kwargs`` of the conditional half: PixArt-alpha's resolution and aspect ratio for a
    ``sample_size`` 128 transformer, as the pipeline builds them (the guidance batch repeats them), else None."""
    if sigma or pipe.transformer.config.sample_size != 128:
        return {"resolution": None, "aspect_ratio": None}
    resolution = torch.tensor([height, width]).repeat(n, 1).to(dtype=dtype, device=device)
    aspect_ratio = torch.tensor([float(height / width)]).repeat(n, 1).to(dtype=dtype, device=device)
    return {"resolution": resolution, "aspect_ratio": aspect_ratio}


def _one_step_x0(pipe, spec):
    """PixArt-alpha's one-step loop: the x0 estimate at the first timestep, i.e. one Euler step to sigma 0."""
    name = type(pipe.scheduler).__name__
    if name in _NO_X0_OUTPUT:
        raise ValueError(f"num_inference_steps: {type(pipe).__name__} with num_inference_steps=1 returns the second "
                         f"output of {name}.step (an x0 estimate), which that scheduler does not return (diffusers "
                         "raises IndexError); use 2 steps or more, or a scheduler whose step returns "
                         "pred_original_sample (DDIM, Euler, LCM, ...)")
    calls = spec.call_timesteps
    return dataclasses.replace(spec, method="euler", sigmas=[spec.sigmas[0], 0.0], timesteps=spec.timesteps[:1],
                               knobs={}, call_timesteps=None if calls is None else calls[:1])


def call_pixart(acc, prompt=None, negative_prompt="", num_inference_steps=None, guidance_scale=None,
                num_images_per_prompt=1, height=None, width=None, eta=None, generator=None, latents=None,
                prompt_embeds=None, prompt_attention_mask=None, negative_prompt_embeds=None,
                negative_prompt_attention_mask=None, output_type="pil", return_dict=True, callback_steps=1,
                clean_caption=True, use_resolution_binning=True, max_sequence_length=None, mask_feature=None,
                **unsupported):
    """``PixArtAlphaPipeline.__call__`` / ``PixArtSigmaPipeline.__call__`` through the fused loop of ``acc``
    (``mask_feature``: PixArt-alpha's deprecated no-op keyword, ignored as the pipeline does)."""
    from diffusers import PixArtSigmaPipeline
    from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
    from diffusers.utils.torch_utils import maybe_adjust_dtype_for_device

    _reject(unsupported)
    pipe = acc.pipe
    transformer = pipe.transformer
    sigma = isinstance(pipe, PixArtSigmaPipeline)
    steps = _steps(pipe, num_inference_steps, 20)
    w = guidance_scale if guidance_scale is not None else _default(pipe, "guidance_scale", 4.5)
    max_len = max_sequence_length or _default(pipe, "max_sequence_length", 300 if sigma else 120)
    height = height or transformer.config.sample_size * pipe.vae_scale_factor
    width = width or transformer.config.sample_size * pipe.vae_scale_factor
    if use_resolution_binning:
        orig_height, orig_width = height, width
        height, width = pipe.image_processor.classify_height_width_bin(height, width,
                                                                       ratios=_aspect_ratio_bins(pipe, sigma))
    pipe.check_inputs(prompt, height, width, negative_prompt, callback_steps, prompt_embeds, negative_prompt_embeds,
                      prompt_attention_mask, negative_prompt_attention_mask)
    n = _prompt_batch(prompt, prompt_embeds) * num_images_per_prompt
    device = pipe._execution_device
    cfg = w > 1.0  # the pipeline's do_classifier_free_guidance
    embeds, mask, negative_embeds, negative_mask = pipe.encode_prompt(
        prompt, cfg, negative_prompt=negative_prompt, num_images_per_prompt=num_images_per_prompt, device=device,
        prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
        prompt_attention_mask=prompt_attention_mask, negative_prompt_attention_mask=negative_prompt_attention_mask,
        clean_caption=clean_caption, max_sequence_length=max_len)
    if not sigma:  # PixArt-alpha's mask dtype for devices without int64 (a no-op elsewhere)
        mask = mask.to(maybe_adjust_dtype_for_device(mask.dtype, mask.device))
        if cfg:
            negative_mask = negative_mask.to(maybe_adjust_dtype_for_device(negative_mask.dtype, negative_mask.device))
    ours, spec = acc._schedule(steps, eta)
    if steps == 1 and not sigma:
        spec = _one_step_x0(pipe, spec)
    shape = (n, transformer.config.in_channels, int(height) // pipe.vae_scale_factor,
             int(width) // pipe.vae_scale_factor)
    latents = _initial_latents(ours, shape, generator, device, embeds.dtype, latents)
    cond = {"encoder_hidden_states": embeds, "encoder_attention_mask": mask,
            "added_cond_kwargs": _micro_conditions(pipe, sigma, n, height, width, embeds.dtype, device)}
    uncond = {"encoder_hidden_states": negative_embeds, "encoder_attention_mask": negative_mask} if cfg else None
    latents = acc._run(ours, spec, latents, generator, guidance_scale=w if cfg else 1.0,
                       extra=unet_extra(cond, uncond, None), denoiser=PixArtDenoiser, network=transformer)
    if output_type == "latent":
        image = latents
    else:  # PixArt-sigma decodes in the VAE's dtype, PixArt-alpha in the latents'
        latents = latents.to(pipe.vae.dtype) if sigma else latents
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        if use_resolution_binning:
            image = pipe.image_processor.resize_and_crop_tensor(image, orig_width, orig_height)
        image = pipe.image_processor.postprocess(image, output_type=output_type)
    pipe.maybe_free_model_hooks()
    return ImagePipelineOutput(images=image) if return_dict else (image,)


def pixart_kind(pipe, who: str):
    """"pixart_alpha" / "pixart_sigma" for a ``PixArtAlphaPipeline`` / ``PixArtSigmaPipeline`` (a
    ``PixArtTransformer2DModel``, a VAE, a scheduler and the pipeline's call arguments); None for a pipeline without
    a ``PixArtTransformer2DModel``; raises TypeError naming what the fused loop cannot run (PAG, ...)."""
    from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel

    if not isinstance(uncompiled(pipe.transformer), PixArtTransformer2DModel):  # (torch.compile's: its module)
        return None
    kind = ("pixart_sigma" if isinstance(pipe, PixArtSigmaPipeline)
            else "pixart_alpha" if isinstance(pipe, PixArtAlphaPipeline) else None)
    if kind is None or getattr(pipe, "vae", None) is None or getattr(pipe, "scheduler", None) is None:
        raise TypeError(f"accelerate: unsupported pipeline {who} with a PixArtTransformer2DModel: expected a "
                        "PixArtAlphaPipeline or PixArtSigmaPipeline with a vae and a scheduler")
    _check_call_arguments(pipe, who, call_pixart)
    return kind


CLASSES = {"pixart_alpha": PixArtAcceleratedPipeline, "pixart_sigma": PixArtAcceleratedPipeline}
