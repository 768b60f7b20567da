"""Level 2 for inpainting: ``StableDiffusionInpaintPipeline`` calls with a 9-channel inpainting UNet whose denoising
loop runs in diffkern (:class:`diffkern.diffusers.accelerate.AcceleratedPipeline` dispatches here).

The inpainting UNet sees ``cat([scaled latents, mask, masked_image_latents])`` at every call, with the same mask
and masked-image latents all loop long: :class:`InpaintDenoiser` takes them as tensor extra args and concatenates
them after the input scaling, so a captured CUDA-graph loop replays with a new image or mask (the CFG batch
duplicates them, as the pipeline does). Everything else is the pipeline's own code, called as it calls it: the
image and mask processors (``padding_mask_crop``'s crop region and final overlay included), ``get_timesteps``
(``strength``), ``prepare_latents`` (pure noise at ``strength=1``, else the image latents noised to the first kept
timestep) and ``prepare_mask_latents`` (the masked image encoded with the generator), the decode and the safety
checker. The loop runs the schedule from the begin step (:func:`~.loop_spec.tail_spec`).

The legacy 4-channel variant (a plain UNet) blends the known region back after every step, re-noised to the next
timestep with the initial noise: a per-step operation outside the fused step, so it is refused by name.
"""
from __future__ import annotations

import torch

from .accelerate import ScheduleDenoiser, _default, _reject
from .accelerate_img2img import _begin, check_plain_sd
from .accelerate_text2img import _prompt_batch, _sd_images, sd_encode, sd_output, unet_extra
from .loop_spec import tail_spec


class InpaintDenoiser(ScheduleDenoiser):
    """:class:`~.accelerate.ScheduleDenoiser` of a 9-channel inpainting UNet: each call's UNet input is
    ``cat([x_in, mask, masked_image_latents], dim=1)``, with ``x_in`` the scaled (B, 4, h, w) latents and the extra
    args ``mask`` (B, 1, h, w) and ``masked_image_latents`` (B, 4, h, w) in any float dtype (the pipeline's)."""

    def call_model(self, x_in, t, mask=None, masked_image_latents=None, **extra):
        if mask is None or masked_image_latents is None:
            raise ValueError("InpaintDenoiser: expected the extra args mask and masked_image_latents")
        x_in = torch.cat([x_in, mask.to(x_in.dtype), masked_image_latents.to(x_in.dtype)], dim=1)
        return super().call_model(x_in, t, **extra)


def _channels_refusal(who: str, channels: int) -> TypeError:
    """The refusal of a UNet with ``channels`` input channels: 4 (legacy inpainting) or another number."""
    if channels == 4:
        return TypeError(f"accelerate: unsupported pipeline {who} with a 4-channel UNet (legacy inpainting): its loop "
                         "blends the known region back after every step, re-noised to the next timestep, which is "
                         "outside the fused step; use a 9-channel inpainting UNet (latents, mask, masked-image "
                         "latents), or the pipeline with a diffkern.diffusers scheduler (Level 1)")
    return TypeError(f"accelerate: unsupported pipeline {who}: its UNet has in_channels={channels}, expected 9 "
                     "(latents, mask, masked-image latents)")


def _check_vae(pipe, who: str) -> None:
    """Raise for an ``AsymmetricAutoencoderKL``, at accelerate() and at each call (``pipe.vae = ...`` swaps one in
    afterwards, as diffusers loads it): its decode takes the image and mask as conditions, which ours does not pass."""
    from diffusers import AsymmetricAutoencoderKL

    if isinstance(pipe.vae, AsymmetricAutoencoderKL):
        raise TypeError(f"accelerate: unsupported pipeline {who} with an AsymmetricAutoencoderKL: its decode takes "
                        "the image and mask as conditions, which the fused loop's decode does not pass")


def inpaint_settings(pipe, steps, strength, guidance_scale, height, width):
    """(steps, strength, guidance scale, height, width) of an inpainting call (SD and SDXL alike), the pipeline's
    defaults where None; raises unless the UNet, which may have been swapped since accelerate(), has 9 channels."""
    unet = pipe.unet
    if unet.config.in_channels != 9:
        raise _channels_refusal(type(pipe).__name__, unet.config.in_channels)
    return (steps or _default(pipe, "num_inference_steps", 50),
            strength if strength is not None else _default(pipe, "strength", 1.0),
            guidance_scale if guidance_scale is not None else _default(pipe, "guidance_scale", 7.5),
            height or unet.config.sample_size * pipe.vae_scale_factor,
            width or unet.config.sample_size * pipe.vae_scale_factor)


def inpaint_images(pipe, image, mask_image, height, width, padding_mask_crop):
    """(image, mask, crop region or None) as the inpainting pipelines preprocess them (SD and SDXL alike): with
    ``padding_mask_crop`` the mask's padded bounding box, resized to (height, width) in "fill" mode; the image in
    float32."""
    crops, resize_mode = None, "default"
    if padding_mask_crop is not None:
        crops = pipe.mask_processor.get_crop_region(mask_image, width, height, pad=padding_mask_crop)
        resize_mode = "fill"
    init_image = pipe.image_processor.preprocess(image, height=height, width=width, crops_coords=crops,
                                                 resize_mode=resize_mode).to(dtype=torch.float32)
    mask = pipe.mask_processor.preprocess(mask_image, height=height, width=width, resize_mode=resize_mode,
                                          crops_coords=crops)
    return init_image, mask, crops


def mask_latents(pipe, mask, masked, latents, n, height, width, dtype, generator):
    """The pipeline's ``prepare_mask_latents`` (the masked image encoded with ``generator``, or ``masked`` given as
    latents) for ``n`` images, without CFG duplication (the fused wrapper stacks the batch halves itself); raises
    unless latents, mask and masked-image latents make the UNet's input channels."""
    unet = pipe.unet
    mask, masked = pipe.prepare_mask_latents(mask, masked, n, height, width, dtype, pipe._execution_device, generator,
                                             False)
    channels = latents.shape[1] + mask.shape[1] + masked.shape[1]
    if channels != unet.config.in_channels:
        raise ValueError(f"vae: the UNet takes {unet.config.in_channels} input channels, and the latents (the VAE's "
                         f"latent_channels), mask and masked-image latents have {latents.shape[1]} + {mask.shape[1]} + "
                         f"{masked.shape[1]} = {channels}")
    return mask, masked


def call_sd_inpaint(acc, prompt=None, image=None, mask_image=None, masked_image_latents=None, height=None, width=None,
                    padding_mask_crop=None, strength=None, num_inference_steps=None, guidance_scale=None,
                    negative_prompt=None, num_images_per_prompt=1, eta=None, generator=None, latents=None,
                    prompt_embeds=None, negative_prompt_embeds=None, output_type="pil", return_dict=True,
                    cross_attention_kwargs=None, clip_skip=None, **unsupported):
    """``StableDiffusionInpaintPipeline.__call__`` through the fused loop of ``acc``: ``image`` repainted where
    ``mask_image`` is white (>= 0.5), from pure noise (``strength=1``) or from the image noised to the first of the
    last ``strength`` fraction of the timesteps."""
    _reject(unsupported)
    pipe = acc.pipe
    _check_vae(pipe, type(pipe).__name__)
    steps, strength, w, height, width = inpaint_settings(pipe, num_inference_steps, strength, guidance_scale, height,
                                                         width)
    pipe.check_inputs(prompt, image, mask_image, height, width, strength, None, output_type, negative_prompt,
                      prompt_embeds, negative_prompt_embeds, padding_mask_crop=padding_mask_crop)
    n = _prompt_batch(prompt, prompt_embeds) * num_images_per_prompt
    device = pipe._execution_device
    cfg = w > 1
    prompt_embeds, negative_prompt_embeds = sd_encode(pipe, prompt, device, num_images_per_prompt, cfg, negative_prompt,
                                                      prompt_embeds, negative_prompt_embeds, cross_attention_kwargs,
                                                      clip_skip)
    dtype = prompt_embeds.dtype
    ours, spec = acc._schedule(steps, eta)
    begin = _begin(pipe, steps, strength, device)
    spec = tail_spec(ours, spec, begin)
    first = pipe.scheduler.timesteps[begin * pipe.scheduler.order:][:1].repeat(n)
    init_image, mask_condition, crops = inpaint_images(pipe, image, mask_image, height, width, padding_mask_crop)
    latents, _ = pipe.prepare_latents(n, pipe.vae.config.latent_channels, height, width, dtype, device, generator,
                                      latents, image=init_image, timestep=first, is_strength_max=strength == 1.0,
                                      return_noise=True)
    masked = init_image * (mask_condition < 0.5) if masked_image_latents is None else masked_image_latents
    mask, masked = mask_latents(pipe, mask_condition, masked, latents, n, height, width, dtype, generator)
    extra = unet_extra({"encoder_hidden_states": prompt_embeds, "mask": mask, "masked_image_latents": masked},
                       {"encoder_hidden_states": negative_prompt_embeds} if cfg else None, cross_attention_kwargs)
    latents = acc._run(ours, spec, latents, generator, guidance_scale=w if cfg else 1.0, extra=extra,
                       denoiser=InpaintDenoiser)
    images, nsfw = _sd_images(pipe, latents, output_type, device, dtype, generator)
    if padding_mask_crop is not None:
        images = [pipe.image_processor.apply_overlay(mask_image, image, i, crops) for i in images]
    return sd_output(pipe, images, nsfw, return_dict)


CALLS = {"inpaint": call_sd_inpaint}  # AcceleratedPipeline.__call__'s handler of the kind below


def inpaint_kind(pipe, who: str, unet):
    """"inpaint" for a ``StableDiffusionInpaintPipeline`` with a 9-channel UNet, None for other pipelines; raises
    TypeError naming what the fused loop cannot run (a 4-channel UNet or another non-9-channel one, added
    conditioning, guidance-embedding UNets, an asymmetric VAE, other ``__call__`` arguments or image processors)."""
    from diffusers import StableDiffusionInpaintPipeline

    if not isinstance(pipe, StableDiffusionInpaintPipeline):
        return None
    if unet.config.in_channels != 9:
        raise _channels_refusal(who, unet.config.in_channels)
    _check_vae(pipe, who)
    check_plain_sd(pipe, who, unet, "inpainting loop runs a plain text-conditioned 9-channel UNet", call_sd_inpaint,
                   ("image_processor", "mask_processor"))
    return "inpaint"
