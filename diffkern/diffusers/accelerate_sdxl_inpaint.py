"""Level 2 for SDXL inpainting: ``StableDiffusionXLInpaintPipeline`` calls with a 9-channel inpainting UNet whose
denoising loop runs in diffkern (:class:`diffkern.diffusers.accelerate.AcceleratedPipeline` dispatches here).

It is SD inpainting's loop (:mod:`.accelerate_inpaint`: the UNet input ``cat([scaled latents, mask,
masked_image_latents])``, the mask and masked-image latents tensor extra args of :class:`InpaintDenoiser`, so a
captured CUDA-graph loop replays with a new image or mask) on SDXL img2img's schedule window and conditioning
(:mod:`.accelerate_sdxl_img2img`): ``strength`` or ``denoising_start`` pick the begin step, ``denoising_end`` the
end, and the UNet gets the pooled text embeddings and ``add_time_ids`` (aesthetic scores with
``requires_aesthetics_score``) as ``added_cond_kwargs``. Everything else is the pipeline's own code, called as it
calls it: the image and mask processors (``padding_mask_crop``'s crop region and final overlay included),
``get_timesteps``, ``prepare_latents`` (pure noise at ``strength=1``, else the image latents noised to the first kept
timestep, or with ``denoising_start`` the image latents as they are), ``prepare_mask_latents``, the decode and the
watermark. ``guidance_rescale`` runs in :class:`RescaledInpaintDenoiser`.

The legacy 4-channel variant (a plain UNet) blends the known region back after every step, re-noised to the next
timestep with the initial noise: a per-step operation outside the fused step, so it is refused by name.
"""
from __future__ import annotations

from .accelerate import _reject
from .accelerate_inpaint import (InpaintDenoiser, _channels_refusal, inpaint_images, inpaint_settings,
                                 mask_latents)
from .accelerate_sdxl_img2img import _window, check_sdxl, img2img_extra
from .accelerate_text2img import RescaledCFGDenoiser, _prompt_batch, _sdxl_decode, sdxl_encode


class RescaledInpaintDenoiser(InpaintDenoiser, RescaledCFGDenoiser):
    """:class:`~.accelerate_inpaint.InpaintDenoiser` with the pipeline's ``guidance_rescale``: the batched
    ``[uncond; cond]`` call of :class:`~.accelerate_text2img.RescaledCFGDenoiser` (mask and masked-image latents
    duplicated for both halves, as the pipeline's CFG batch has them), each call's input the 9-channel
    concatenation."""


def call_sdxl_inpaint(acc, prompt=None, prompt_2=None, image=None, mask_image=None, masked_image_latents=None,
                      height=None, width=None, padding_mask_crop=None, strength=None, num_inference_steps=None,
                      denoising_start=None, denoising_end=None, guidance_scale=None, negative_prompt=None,
                      negative_prompt_2=None, num_images_per_prompt=1, eta=None, generator=None, latents=None,
                      prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                      negative_pooled_prompt_embeds=None, output_type="pil", return_dict=True,
                      cross_attention_kwargs=None, guidance_rescale=0.0, original_size=None,
                      crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
                      negative_crops_coords_top_left=(0, 0), negative_target_size=None, aesthetic_score=None,
                      negative_aesthetic_score=None, clip_skip=None, **unsupported):
    """``StableDiffusionXLInpaintPipeline.__call__`` through the fused loop of ``acc``: ``image`` repainted where
    ``mask_image`` is white (>= 0.5), over the window that ``strength`` or ``denoising_start`` and ``denoising_end``
    keep of the schedule."""
    from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput

    _reject(unsupported)
    pipe = acc.pipe
    steps, strength, w, height, width = inpaint_settings(pipe, num_inference_steps, strength, guidance_scale, height,
                                                         width)
    pipe.check_inputs(prompt, prompt_2, image, mask_image, height, width, strength, None, output_type,
                      negative_prompt, negative_prompt_2, prompt_embeds, negative_prompt_embeds,
                      padding_mask_crop=padding_mask_crop)
    n = _prompt_batch(prompt, prompt_embeds) * num_images_per_prompt
    device = pipe._execution_device
    cfg = w > 1
    encoded = sdxl_encode(
        pipe, device, num_images_per_prompt, cfg, cross_attention_kwargs, prompt=prompt, prompt_2=prompt_2,
        negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2, prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
        negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, clip_skip=clip_skip)
    dtype = encoded[0].dtype
    ours, spec = acc._schedule(steps, eta)
    spec, timesteps = _window(pipe, ours, spec, steps, strength, denoising_start, denoising_end, device)
    init_image, mask_condition, crops = inpaint_images(pipe, image, mask_image, height, width, padding_mask_crop)
    if masked_image_latents is not None:
        masked = masked_image_latents
    elif init_image.shape[1] == 4:  # the pipeline cannot mask latents, and its 9-channel UNet needs them masked
        raise ValueError("masked_image_latents: expected them with an image given as 4-channel latents (which the "
                         "pipeline cannot mask), got None")
    else:
        masked = init_image * (mask_condition < 0.5)
    # the pipeline's rule: no noise whenever denoising_start is given (valid or not)
    latents, _ = pipe.prepare_latents(n, pipe.vae.config.latent_channels, height, width, dtype, device, generator,
                                      latents, image=init_image, timestep=timesteps[:1].repeat(n),
                                      is_strength_max=strength == 1.0, add_noise=denoising_start is None,
                                      return_noise=True)
    mask, masked = mask_latents(pipe, mask_condition, masked, latents, n, height, width, dtype, generator)
    extra = img2img_extra(pipe, latents, n, cfg, encoded, cross_attention_kwargs, original_size=original_size,
                          crops_coords_top_left=crops_coords_top_left, target_size=target_size,
                          negative_original_size=negative_original_size,
                          negative_crops_coords_top_left=negative_crops_coords_top_left,
                          negative_target_size=negative_target_size, aesthetic_score=aesthetic_score,
                          negative_aesthetic_score=negative_aesthetic_score)
    extra.update(mask=mask, masked_image_latents=masked)
    rescale = guidance_rescale if cfg and guidance_rescale > 0 else 0.0  # the pipeline's rule
    latents = acc._run(ours, spec, latents, generator, guidance_scale=w if cfg else 1.0, extra=extra,
                       guidance_rescale=rescale, denoiser=RescaledInpaintDenoiser if rescale else InpaintDenoiser)
    if output_type == "latent":  # the pipeline returns them so, whatever return_dict, without watermark or hooks
        return StableDiffusionXLPipelineOutput(images=latents)
    out = _sdxl_decode(pipe, latents)
    if getattr(pipe, "watermark", None) is not None:
        out = pipe.watermark.apply_watermark(out)
    out = pipe.image_processor.postprocess(out, output_type=output_type)
    if padding_mask_crop is not None:  # the repainted crop pasted back into the original image
        out = [pipe.image_processor.apply_overlay(mask_image, image, i, crops) for i in out]
    pipe.maybe_free_model_hooks()
    return StableDiffusionXLPipelineOutput(images=out) if return_dict else (out,)


CALLS = {"sdxl_inpaint": call_sdxl_inpaint}  # AcceleratedPipeline.__call__'s handler of the kind below


def sdxl_inpaint_kind(pipe, who: str, unet):
    """"sdxl_inpaint" for a ``StableDiffusionXLInpaintPipeline`` with a 9-channel UNet, None for other pipelines;
    raises TypeError naming what the fused loop cannot run (a 4-channel UNet or another non-9-channel one, and
    what :func:`~.accelerate_sdxl_img2img.check_sdxl` refuses)."""
    from diffusers import StableDiffusionXLInpaintPipeline

    if not isinstance(pipe, StableDiffusionXLInpaintPipeline):
        return None
    if unet.config.in_channels != 9:
        raise _channels_refusal(who, unet.config.in_channels)
    check_sdxl(pipe, who, unet, call_sdxl_inpaint, ("image_processor", "mask_processor"))
    return "sdxl_inpaint"
