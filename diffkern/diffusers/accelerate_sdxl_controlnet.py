"""Level 2 for ``StableDiffusionXLControlNetPipeline`` (one ``ControlNetModel`` or a ``MultiControlNetModel`` of
them): its denoising loop runs in diffkern (:class:`diffkern.diffusers.accelerate.AcceleratedPipeline` dispatches
here).

Each model call is the SD ControlNet handler's (:class:`~.accelerate_controlnet.ControlNetDenoiser`: the nets, then
the UNet with their residuals; guess mode; the per-call conditioning scales of ``control_guidance_start``/``_end`` on
the device counter) with SDXL's conditioning: the pooled text embeddings and ``add_time_ids`` reach the UNet and the
nets as ``added_cond_kwargs``, as the pipeline passes them (in guess mode the nets get the conditional half, the
pipeline's ``chunk(2)[1]``). Everything else is the pipeline's own code, called as it calls it: ``check_inputs``,
``encode_prompt`` (both encoders), ``prepare_image``, ``_get_add_time_ids`` (``original_size`` defaults to the
prepared control image's size, ``target_size`` to the latents'), the initial latents, the decode and the watermark.

``denoising_end`` runs the schedule's head as in SDXL text-to-image (:func:`~.accelerate_sdxl_img2img.head_spec`);
the pipeline's keep factors count the whole schedule's timesteps (computed before its cut), and so does the scale
table. The pipeline's UNet has no guidance embedding here (``time_cond_proj_dim`` is refused) and it takes no
``guidance_rescale``.
"""
from __future__ import annotations

from .accelerate import _check_call_arguments, _default, _steps, _reject
from .accelerate_controlnet import (_nets, _window, conditioning_scales, control_images, control_run,
                                    control_table)
from .accelerate_sdxl_img2img import end_steps, head_spec
from .accelerate_text2img import _initial_latents, _prompt_batch, sdxl_encode, sdxl_output, sdxl_unet_extra


def call_sdxl_controlnet(acc, prompt=None, prompt_2=None, image=None, height=None, width=None,
                         num_inference_steps=None, denoising_end=None, guidance_scale=None, negative_prompt=None,
                         negative_prompt_2=None, num_images_per_prompt=1, eta=None, generator=None, latents=None,
                         prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                         negative_pooled_prompt_embeds=None, output_type="pil", return_dict=True,
                         cross_attention_kwargs=None, controlnet_conditioning_scale=1.0, guess_mode=False,
                         control_guidance_start=0.0, control_guidance_end=1.0, original_size=None,
                         crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
                         negative_crops_coords_top_left=(0, 0), negative_target_size=None, clip_skip=None,
                         **unsupported):
    """``StableDiffusionXLControlNetPipeline.__call__`` through the fused loop of ``acc``: ``image`` the control
    image (a list of them, one per net, for a MultiControlNetModel), ``controlnet_conditioning_scale`` a float (or a
    list per net), ``control_guidance_start``/``_end`` the fractions of the loop the ControlNet acts on, and
    SDXL's prompts, pooled embeddings and size conditioning."""
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    _reject(unsupported)
    pipe, who = acc.pipe, type(acc.pipe).__name__
    nets = _nets(pipe, who)  # the ControlNet may have been swapped since accelerate()
    multi = isinstance(pipe.controlnet, MultiControlNetModel)
    steps = _steps(pipe, num_inference_steps, 50)
    w = guidance_scale if guidance_scale is not None else _default(pipe, "guidance_scale", 5.0)
    starts, ends = _window(control_guidance_start, control_guidance_end, len(nets))
    pipe.check_inputs(prompt, prompt_2, image, None, negative_prompt, negative_prompt_2, prompt_embeds,
                      negative_prompt_embeds, pooled_prompt_embeds, None, None, negative_pooled_prompt_embeds,
                      controlnet_conditioning_scale, starts, ends, None)
    scales = conditioning_scales(controlnet_conditioning_scale, starts, len(nets))
    guess = bool(guess_mode or nets[0].config.global_pool_conditions)
    n = _prompt_batch(prompt, prompt_embeds) * num_images_per_prompt
    device = pipe._execution_device
    cfg = w > 1  # (no guidance-embedding UNet: refused by sdxl_controlnet_kind)
    embeds, negative_embeds, pooled, negative_pooled = sdxl_encode(
        pipe, device, num_images_per_prompt, cfg, cross_attention_kwargs, prompt=prompt, prompt_2=prompt_2,
        negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2, prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
        negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, clip_skip=clip_skip)
    images = control_images(pipe, image, multi, n, num_images_per_prompt, width, height, device, guess)
    height, width = images[0].shape[-2:]
    ours, spec = acc._schedule(steps, eta)
    pipe.scheduler.set_timesteps(steps, device=device)  # the pipeline's keep factors count all its timesteps
    calls = len(pipe.scheduler.timesteps)
    kept = end_steps(pipe.scheduler, pipe.scheduler.timesteps, denoising_end)
    if kept is not None:
        spec = head_spec(ours, spec, kept, denoising_end)
    ran = calls if kept is None else kept * int(pipe.scheduler.order)  # the loop's iterations (end_steps checks)
    table = control_table(acc, spec, scales, starts, ends, calls, ran)
    shape = (n, pipe.unet.config.in_channels, int(height) // pipe.vae_scale_factor,
             int(width) // pipe.vae_scale_factor)
    latents = _initial_latents(ours, shape, generator, device, embeds.dtype, latents)
    original_size = original_size or images[0].shape[-2:]
    target_size = target_size or (height, width)
    extra = sdxl_unet_extra(pipe, (embeds, negative_embeds, pooled, negative_pooled), n, cfg, device,
                            (original_size, crops_coords_top_left, target_size),
                            (negative_original_size, negative_crops_coords_top_left, negative_target_size),
                            cross_attention_kwargs, controlnet_cond=images if multi else images[0])
    latents = control_run(acc, ours, spec, latents, generator, w if cfg else 1.0, extra, table, guess)
    return sdxl_output(pipe, latents, output_type, return_dict)


CALLS = {"sdxl_controlnet": call_sdxl_controlnet}  # AcceleratedPipeline.__call__'s handler of the kind below


def sdxl_controlnet_kind(pipe, who: str, unet) -> str:
    """"sdxl_controlnet" for a ``StableDiffusionXLControlNetPipeline`` the fused loop runs (called by
    :func:`~.accelerate_controlnet.controlnet_kind`); raises TypeError naming what it cannot run: ControlNet kinds
    other than ``ControlNetModel``, a UNet without SDXL's ``text_time`` conditioning or with other added
    conditioning or a guidance embedding, other ``__call__`` arguments or image processors."""
    from diffusers.image_processor import VaeImageProcessor

    _nets(pipe, who)
    if unet.config.get("addition_embed_type") != "text_time":
        raise TypeError(f"accelerate: unsupported pipeline {who}: its UNet has addition_embed_type="
                        f"{unet.config.get('addition_embed_type')!r}, not SDXL's 'text_time' (pooled text embeddings "
                        "and add_time_ids), which the fused SDXL ControlNet loop builds")
    for option in ("class_embed_type", "encoder_hid_dim_type", "time_cond_proj_dim"):
        if unet.config.get(option) is not None:
            raise TypeError(f"accelerate: unsupported pipeline {who}: its UNet has {option}="
                            f"{unet.config.get(option)!r} (the fused SDXL ControlNet loop runs a UNet with SDXL's "
                            "text_time conditioning only)")
    _check_call_arguments(pipe, who, call_sdxl_controlnet)
    for name in ("image_processor", "control_image_processor"):
        if type(getattr(pipe, name, None)) is not VaeImageProcessor:
            raise TypeError(f"accelerate: unsupported pipeline {who}: its {name} is not the VaeImageProcessor "
                            "whose processing the fused loop reproduces")
    return "sdxl_controlnet"
