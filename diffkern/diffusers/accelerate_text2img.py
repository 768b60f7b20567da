"""Level 2 for text-to-image pipelines: ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline`` and
``LatentConsistencyModelPipeline`` calls whose denoising loop runs in diffkern
(:class:`diffkern.diffusers.accelerate.AcceleratedPipeline` dispatches here).

Everything around the loop is the pipeline's own code, called as the pipeline calls it: ``encode_prompt`` (SDXL: both
text encoders, pooled embeddings, ``force_zeros_for_empty_prompt``), ``check_inputs`` and ``_get_add_time_ids``
(SDXL), the VAE decode (SDXL: its float16 ``force_upcast`` and ``latents_mean``/``latents_std``), the watermark and
the image processor. The loop is one :meth:`AcceleratedPipeline._run` call: the conditioning goes in as extra args
of the denoiser (``encoder_hidden_states``; SDXL also ``added_cond_kwargs`` with ``text_embeds`` and ``time_ids``),
the unconditional half as ``uncond_<name>`` (one batched UNet call on ``[uncond; cond]``, CFG fused into the step);
LCM's guidance embedding as ``timestep_cond`` (no CFG batch).
Tensor extra args are data of a captured CUDA-graph loop (:func:`diffkern.graph_keys.flatten`), so a new prompt or
size replays the same capture.

``guidance_rescale`` (Lin et al. 2023, diffusers' ``rescale_noise_cfg``) is not affine in the two UNet outputs, so
it cannot be fused: :class:`RescaledCFGDenoiser` combines them in PyTorch, as the pipeline does, and hands the fused
step the guided output with weight 1.
"""
from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor

from .. import wrappers
from .accelerate import ScheduleDenoiser, _check_call_arguments, _default, _steps, _reject


class RescaledCFGDenoiser(ScheduleDenoiser):
    """:class:`ScheduleDenoiser` whose :meth:`raw` returns ``rescale_noise_cfg(u + w*(c - u), c, phi)``: the guided
    output rescaled to the per-sample standard deviation of the conditional one, mixed with weight ``phi``. ``w`` and
    ``phi`` live in a device buffer (:meth:`set_guidance`), so a captured loop stays valid when they change; the
    fused step sees ``guidance_scale = 1`` (one output, no further guidance)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # w, phi and 1 - phi (taken in float64, as the pipeline's Python floats)
        self.register_buffer("cfg_rescale", torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64), persistent=False)

    def set_guidance(self, guidance_scale: float, guidance_rescale: float) -> None:
        """The CFG weight and the rescale factor of the next loop (a device write, ordered before a replay)."""
        self.guidance_scale = 1.0
        self.cfg_rescale[0].fill_(float(guidance_scale))  # kernel arguments: no host-device copy
        self.cfg_rescale[1].fill_(float(guidance_rescale))
        self.cfg_rescale[2].fill_(1.0 - float(guidance_rescale))

    def raw(self, x, sigma, **extra):
        s = self._sigma(x, sigma)
        x_in, t = self.model_input(x, s)
        batch = x.shape[0]
        cond = {k: v for k, v in extra.items() if not k.startswith("uncond_")}
        both = {k: (wrappers._pair(extra["uncond_" + k], v, k) if "uncond_" + k in extra else wrappers._dup(v, batch))
                for k, v in cond.items()}
        out = self.call_model(torch.cat([x_in, x_in]), torch.cat([t, t]), **both)
        uncond, text = self._checked(out, torch.Size([2 * batch, *x_in.shape[1:]])).chunk(2)
        # In the UNet's dtype, as the pipeline computes it; its Python float weights multiply in float32 (a 16-bit
        # multiply's math type) and round once, so the products are made so here: weights cast to 16 bits, or used
        # as 16-bit operands (a 0-d device tensor on a GPU), would bias every output (0.6 -> 0.6015625 in bfloat16).
        wide = torch.promote_types(out.dtype, torch.float32)
        w, phi, rest = self.cfg_rescale.to(wide).unbind()

        def times(v, k):
            return (v.to(wide) * k).to(v.dtype)
        guided = uncond + times(text - uncond, w)
        dims = list(range(1, guided.dim()))
        rescaled = guided * (text.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
        return times(rescaled, phi) + times(guided, rest), None


def unet_extra(cond: dict, uncond, cross_attention_kwargs) -> dict:
    """The UNet's extra args of the fused loop: the conditional keyword arguments, the unconditional ones (``uncond``,
    None without CFG) under "uncond_" names, which the CFG denoiser pairs with them, and ``cross_attention_kwargs``."""
    extra = dict(cond)
    if uncond is not None:
        extra.update({"uncond_" + key: value for key, value in uncond.items()})
    if cross_attention_kwargs is not None:
        extra["cross_attention_kwargs"] = cross_attention_kwargs
    return extra


def sd_encode(pipe, prompt, device, num_images_per_prompt, cfg, negative_prompt, prompt_embeds, negative_prompt_embeds,
              cross_attention_kwargs, clip_skip):
    """Stable Diffusion's ``encode_prompt`` as its pipelines call it (the LoRA scale from ``cross_attention_kwargs``):
    (prompt_embeds, negative_prompt_embeds), the second None without ``cfg``."""
    return pipe.encode_prompt(prompt, device, num_images_per_prompt, cfg, negative_prompt, prompt_embeds=prompt_embeds,
                              negative_prompt_embeds=negative_prompt_embeds,
                              lora_scale=(cross_attention_kwargs or {}).get("scale"), clip_skip=clip_skip)


def sdxl_encode(pipe, device, num_images_per_prompt, cfg, cross_attention_kwargs, **prompts):
    """Stable Diffusion XL's ``encode_prompt`` as its pipelines call it (the LoRA scale from
    ``cross_attention_kwargs``; ``prompts``: its prompt, embedding and ``clip_skip`` keywords): (prompt_embeds,
    negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds), the negatives None without
    ``cfg``."""
    return pipe.encode_prompt(device=device, num_images_per_prompt=num_images_per_prompt,
                              do_classifier_free_guidance=cfg,
                              lora_scale=(cross_attention_kwargs or {}).get("scale"), **prompts)


def sd_output(pipe, images, nsfw, return_dict: bool):
    """A Stable Diffusion pipeline's return value after its loop: the model hooks freed, then ``(images, nsfw)`` or
    a ``StableDiffusionPipelineOutput``."""
    from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput

    if hasattr(pipe, "maybe_free_model_hooks"):
        pipe.maybe_free_model_hooks()
    if not return_dict:
        return (images, nsfw)
    return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=nsfw)


def _prompt_batch(prompt, prompt_embeds) -> int:
    if prompt is not None:
        return 1 if isinstance(prompt, str) else len(prompt)
    if prompt_embeds is not None:
        return prompt_embeds.shape[0]
    raise ValueError("prompt: pass a prompt (str or list) or prompt_embeds")


def _initial_latents(ours, shape, generator, device, dtype, latents):
    """The pipeline's ``prepare_latents`` with the diffkern scheduler's ``init_noise_sigma``."""
    if isinstance(generator, list) and len(generator) != shape[0]:
        raise ValueError(f"generator: a list of {len(generator)} generators for a batch of {shape[0]}")
    if latents is None:
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    else:  # the stock pipelines fail deep in the UNet or VAE for these: name the argument instead
        if latents.dim() != 4 or tuple(latents.shape[:2]) != tuple(shape[:2]):
            raise ValueError(f"latents: expected shape ({shape[0]}, {shape[1]}, H, W) (batch = prompts x "
                             f"num_images_per_prompt, the UNet's input channels), got {tuple(latents.shape)}")
        if latents.dtype != dtype and not torch.is_autocast_enabled(torch.device(device).type):
            raise ValueError(f"latents: expected dtype {dtype} (the pipeline's), got {latents.dtype}")
        latents = latents.to(device)
    return latents * float(ours.init_noise_sigma)


def _sd_images(pipe, latents, output_type, device, dtype, generator=None):
    """(images, nsfw flags or None) as ``StableDiffusionPipeline`` makes them from its final latents: the VAE decode
    (``generator`` goes to it, as that pipeline passes its own), the safety checker, the image processor; "latent"
    returns the latents through the processor untouched."""
    nsfw = None
    if output_type == "latent":
        image = latents
    else:
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
        if hasattr(pipe, "run_safety_checker"):
            image, nsfw = pipe.run_safety_checker(image, device, dtype)
    denormalize = [True] * image.shape[0] if nsfw is None else [not flag for flag in nsfw]
    return pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize), nsfw


# deprecated pipelines that default each missing size on its own (StableDiffusionPipeline drops a lone one)
_EACH_SIZE_ALONE = frozenset({"AltDiffusionPipeline", "StableDiffusionModelEditingPipeline"})


def call_sd(acc, prompt=None, height=None, width=None, num_inference_steps=None, guidance_scale=None,
            negative_prompt=None, num_images_per_prompt=1, eta=None, generator=None, latents=None, prompt_embeds=None,
            negative_prompt_embeds=None, output_type="pil", return_dict=True, cross_attention_kwargs=None,
            guidance_rescale=0.0, clip_skip=None, **unsupported):
    """``StableDiffusionPipeline.__call__`` (and pipelines with its arguments) through the fused loop of ``acc``."""
    _reject(unsupported)
    pipe = acc.pipe
    unet = pipe.unet
    steps = _steps(pipe, num_inference_steps, 50)
    w = guidance_scale if guidance_scale is not None else _default(pipe, "guidance_scale", 7.5)
    vae_scale = getattr(pipe, "vae_scale_factor", 2 ** (len(pipe.vae.config.block_out_channels) - 1))
    size = unet.config.sample_size
    default_h, default_w = ((size, size) if isinstance(size, int) else size[:2])
    if type(pipe).__name__ in _EACH_SIZE_ALONE:
        height, width = height or default_h * vae_scale, width or default_w * vae_scale
    elif not height or not width:  # StableDiffusionPipeline's rule: one size alone is dropped, both default
        height, width = default_h * vae_scale, default_w * vae_scale
    # sizes divisible by 8, prompt xor prompt_embeds, matching embeddings: raise as the pipeline raises
    pipe.check_inputs(prompt, height, width, None, negative_prompt, prompt_embeds, negative_prompt_embeds)
    batch = _prompt_batch(prompt, prompt_embeds)
    device = pipe._execution_device
    cfg = w > 1 and unet.config.time_cond_proj_dim is None
    prompt_embeds, negative_prompt_embeds = sd_encode(pipe, prompt, device, num_images_per_prompt, cfg, negative_prompt,
                                                      prompt_embeds, negative_prompt_embeds, cross_attention_kwargs,
                                                      clip_skip)
    shape = (batch * num_images_per_prompt, unet.config.in_channels, int(height) // vae_scale, int(width) // vae_scale)
    ours, spec = acc._schedule(steps, eta)
    latents = _initial_latents(ours, shape, generator, device, prompt_embeds.dtype, latents)
    extra = unet_extra({"encoder_hidden_states": prompt_embeds},
                       {"encoder_hidden_states": negative_prompt_embeds} if cfg else None, cross_attention_kwargs)
    latents = acc._run(ours, spec, latents, generator, guidance_scale=w if cfg else 1.0, extra=extra,
                       guidance_rescale=guidance_rescale)
    image, nsfw = _sd_images(pipe, latents, output_type, device, prompt_embeds.dtype, generator)
    return sd_output(pipe, image, nsfw, return_dict)


def _check_lcm_scheduler(pipe, who: str) -> None:
    """LatentConsistencyModelPipeline's loop takes ``(latents, denoised)`` from an LCM step: LCMScheduler only."""
    name = type(pipe.scheduler).__name__
    if name != "LCMScheduler":
        raise TypeError(f"accelerate: {who} with a {name}: its loop runs LCMScheduler's multistep consistency "
                        "sampling (diffusers' or diffkern.diffusers.LCMScheduler), not another scheduler")


def call_lcm(acc, prompt=None, height=None, width=None, num_inference_steps=None, original_inference_steps=None,
             timesteps=None, guidance_scale=None, num_images_per_prompt=1, generator=None, latents=None,
             prompt_embeds=None, output_type="pil", return_dict=True, cross_attention_kwargs=None, clip_skip=None,
             **unsupported):
    """``LatentConsistencyModelPipeline.__call__`` through the fused loop of ``acc``. No CFG batch: the guidance
    scale w reaches the UNet as ``timestep_cond``, the pipeline's ``get_guidance_scale_embedding(w - 1)``, a tensor
    extra arg (a new w replays a captured loop). The pipeline returns the last step's denoised estimate, which is
    the loop's final state (LCM's last step is noise-free: sigma 0). ``timesteps``: a custom LCM schedule."""
    from .loop_spec import diffkern_scheduler, loop_spec

    _reject(unsupported)
    pipe = acc.pipe
    unet = pipe.unet
    _check_lcm_scheduler(pipe, type(pipe).__name__)
    w = guidance_scale if guidance_scale is not None else _default(pipe, "guidance_scale", 8.5)
    height = height or unet.config.sample_size * pipe.vae_scale_factor
    width = width or unet.config.sample_size * pipe.vae_scale_factor
    pipe.check_inputs(prompt, height, width, None, prompt_embeds)
    n = _prompt_batch(prompt, prompt_embeds) * num_images_per_prompt
    device = pipe._execution_device
    # LCMs are distilled with CFG on the empty prompt: the pipeline takes no negative prompt and encodes no uncond
    prompt_embeds, _ = pipe.encode_prompt(prompt, device, num_images_per_prompt, False, prompt_embeds=prompt_embeds,
                                          lora_scale=(cross_attention_kwargs or {}).get("scale"), clip_skip=clip_skip)
    ours = diffkern_scheduler(pipe.scheduler)
    if timesteps is None:
        steps = _steps(pipe, num_inference_steps, 4)
        ours.set_timesteps(steps, original_inference_steps=original_inference_steps)
    else:  # the pipeline's retrieve_timesteps: custom timesteps replace num_inference_steps
        ours.set_timesteps(original_inference_steps=original_inference_steps, timesteps=timesteps)
    spec = loop_spec(ours)
    shape = (n, unet.config.in_channels, int(height) // pipe.vae_scale_factor, int(width) // pipe.vae_scale_factor)
    latents = _initial_latents(ours, shape, generator, device, prompt_embeds.dtype, latents)
    embedding = pipe.get_guidance_scale_embedding(torch.tensor(w - 1).repeat(n),
                                                  embedding_dim=unet.config.time_cond_proj_dim)
    cond = {"encoder_hidden_states": prompt_embeds, "timestep_cond": embedding.to(device=device, dtype=latents.dtype)}
    extra = unet_extra(cond, None, cross_attention_kwargs)
    denoised = acc._run(ours, spec, latents, generator, extra=extra).to(prompt_embeds.dtype)
    image, nsfw = _sd_images(pipe, denoised, output_type, device, prompt_embeds.dtype)
    return sd_output(pipe, image, nsfw, return_dict)


def _sdxl_time_ids(pipe, n, cfg, device, dtype, projection_dim, sizes, negative_sizes):
    """(time ids, negative time ids) of the UNet batch, as the pipeline builds them: ``_get_add_time_ids`` of
    (original_size, crops_coords_top_left, target_size), the negative triple's when its sizes are given (else the
    same ids). With CFG the pipeline repeats the [negative; positive] pair once per image, so for more than one
    image each half of its [uncond; cond] batch gets negative and positive ids alternately: reproduced as it is."""
    ids = pipe._get_add_time_ids(*sizes, dtype=dtype, text_encoder_projection_dim=projection_dim)
    negative = ids
    if negative_sizes[0] is not None and negative_sizes[2] is not None:
        negative = pipe._get_add_time_ids(*negative_sizes, dtype=dtype, text_encoder_projection_dim=projection_dim)
    if not cfg:
        return ids.to(device).repeat(n, 1), None
    negative, ids = torch.cat([negative, ids]).to(device).repeat(n, 1).chunk(2)
    return ids, negative


def sdxl_unet_extra(pipe, encoded, n: int, cfg: bool, device, sizes, negative_sizes, cross_attention_kwargs,
                    **cond_more) -> dict:
    """SDXL's UNet extra args: ``encoded`` = (embeds, negative_embeds, pooled, negative_pooled) of the pipeline's
    ``encode_prompt``, the size time ids of ``sizes``/``negative_sizes`` ((original, crops, target) each), the
    negative half for CFG; ``cond_more`` joins the conditional half (ControlNet's ``controlnet_cond``)."""
    embeds, negative_embeds, pooled, negative_pooled = encoded
    projection_dim = (int(pooled.shape[-1]) if pipe.text_encoder_2 is None
                      else pipe.text_encoder_2.config.projection_dim)
    time_ids, negative_time_ids = _sdxl_time_ids(pipe, n, cfg, device, embeds.dtype, projection_dim, sizes,
                                                 negative_sizes)
    uncond = {"encoder_hidden_states": negative_embeds.to(device),
              "added_cond_kwargs": {"text_embeds": negative_pooled.to(device), "time_ids": negative_time_ids}} \
        if cfg else None
    cond = {"encoder_hidden_states": embeds.to(device), **cond_more,
            "added_cond_kwargs": {"text_embeds": pooled.to(device), "time_ids": time_ids}}
    return unet_extra(cond, uncond, cross_attention_kwargs)


def sdxl_output(pipe, latents, output_type: str, return_dict: bool):
    """SDXL text-to-image's output: the latents as they are ("latent"), else decoded, watermarked and postprocessed."""
    from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput

    if output_type == "latent":
        image = latents  # the pipeline returns them as they are, without the image processor
    else:
        image = _sdxl_decode(pipe, latents)
        if getattr(pipe, "watermark", None) is not None:
            image = pipe.watermark.apply_watermark(image)
        image = pipe.image_processor.postprocess(image, output_type=output_type)
    pipe.maybe_free_model_hooks()
    return StableDiffusionXLPipelineOutput(images=image) if return_dict else (image,)


def _sdxl_decode(pipe, latents):
    """The pipeline's decode: a float16 VAE with ``force_upcast`` runs in float32 (and goes back to float16), the
    latents are denormalised with ``latents_mean``/``latents_std`` when the VAE config has both."""
    from diffusers.utils.torch_utils import get_module_execution_device

    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and vae.config.force_upcast
    if upcast:  # the pipeline's (deprecated) upcast_vae
        vae.to(dtype=torch.float32)
        latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        latents = latents * std / vae.config.scaling_factor + mean
    else:
        latents = latents / vae.config.scaling_factor
    image = vae.decode(latents.to(get_module_execution_device(vae)), return_dict=False)[0]
    if upcast:
        vae.to(dtype=torch.float16)
    return image


def call_sdxl(acc, prompt=None, prompt_2=None, height=None, width=None, num_inference_steps=None,
              denoising_end=None, guidance_scale=None, negative_prompt=None, negative_prompt_2=None,
              num_images_per_prompt=1, eta=None, generator=None, latents=None, prompt_embeds=None,
              negative_prompt_embeds=None, pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None,
              output_type="pil", return_dict=True, cross_attention_kwargs=None, guidance_rescale=0.0,
              original_size=None, crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
              negative_crops_coords_top_left=(0, 0), negative_target_size=None, clip_skip=None, **unsupported):
    """``StableDiffusionXLPipeline.__call__`` through the fused loop of ``acc``. ``denoising_end`` (the hand-off of
    an ensemble of expert denoisers to a refiner) runs the schedule's head and returns its noisy latents
    (:func:`~.accelerate_sdxl_img2img.head_spec`)."""
    _reject(unsupported)
    pipe = acc.pipe
    unet = pipe.unet
    steps = _steps(pipe, num_inference_steps, 50)
    w = guidance_scale if guidance_scale is not None else _default(pipe, "guidance_scale", 5.0)
    height = height or pipe.default_sample_size * pipe.vae_scale_factor
    width = width or pipe.default_sample_size * pipe.vae_scale_factor
    original_size = original_size or (height, width)
    target_size = target_size or (height, width)
    pipe.check_inputs(prompt, prompt_2, height, width, None, negative_prompt=negative_prompt,
                      negative_prompt_2=negative_prompt_2, prompt_embeds=prompt_embeds,
                      negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                      negative_pooled_prompt_embeds=negative_pooled_prompt_embeds)
    n = _prompt_batch(prompt, prompt_embeds) * num_images_per_prompt
    device = pipe._execution_device
    cfg = w > 1 and unet.config.time_cond_proj_dim is None
    embeds, negative_embeds, pooled, negative_pooled = sdxl_encode(
        pipe, device, num_images_per_prompt, cfg, cross_attention_kwargs, prompt=prompt, prompt_2=prompt_2,
        negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2, prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
        negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, clip_skip=clip_skip)
    ours, spec = acc._schedule(steps, eta)
    from .accelerate_sdxl_img2img import text2img_head  # (imports this module)
    spec = text2img_head(pipe, ours, spec, steps, denoising_end, device)
    shape = (n, unet.config.in_channels, int(height) // pipe.vae_scale_factor, int(width) // pipe.vae_scale_factor)
    latents = _initial_latents(ours, shape, generator, device, embeds.dtype, latents)
    extra = sdxl_unet_extra(pipe, (embeds, negative_embeds, pooled, negative_pooled), n, cfg, device,
                            (original_size, crops_coords_top_left, target_size),
                            (negative_original_size, negative_crops_coords_top_left, negative_target_size),
                            cross_attention_kwargs)
    latents = acc._run(ours, spec, latents, generator, guidance_scale=w if cfg else 1.0, extra=extra,
                       guidance_rescale=guidance_rescale)
    return sdxl_output(pipe, latents, output_type, return_dict)


def text2img_kind(pipe, who: str, unet) -> str:
    """"lcm", "sdxl" or "text2img" for a ``UNet2DConditionModel`` pipeline with ``encode_prompt`` and a VAE that the
    fused loop runs; raises TypeError naming what it cannot run (other added conditioning, guidance-embedding UNets
    outside LatentConsistencyModelPipeline, other ``__call__`` arguments, schedulers or image processors)."""
    from diffusers import LatentConsistencyModelPipeline, StableDiffusionXLPipeline
    from diffusers.image_processor import VaeImageProcessor

    # SDXL's added conditioning (pooled text embeddings and add_time_ids) is what call_sdxl builds
    sdxl = unet.config.get("addition_embed_type") == "text_time" and hasattr(pipe, "_get_add_time_ids")
    for option in ("addition_embed_type", "class_embed_type", "encoder_hid_dim_type"):
        if unet.config.get(option) is not None and not (sdxl and option == "addition_embed_type"):
            raise TypeError(f"accelerate: unsupported pipeline {who}: its UNet has {option}="
                            f"{unet.config.get(option)!r} (added conditioning is supported only as "
                            "StableDiffusionXLPipeline's addition_embed_type='text_time')")
    lcm = isinstance(pipe, LatentConsistencyModelPipeline)
    if lcm != (unet.config.get("time_cond_proj_dim") is not None):
        raise TypeError(f"accelerate: unsupported pipeline {who}: guidance-embedding UNets (time_cond_proj_dim, fed "
                        "timestep_cond) are supported in LatentConsistencyModelPipeline only, and that pipeline "
                        "needs one; run the pipeline with diffkern.diffusers.LCMScheduler as its scheduler instead "
                        "(LCM-LoRA in the stock StableDiffusionPipeline / StableDiffusionXLPipeline with an "
                        "LCMScheduler is supported)")
    if lcm:
        _check_lcm_scheduler(pipe, who)
    _check_call_arguments(pipe, who, call_lcm if lcm else call_sdxl if sdxl else call_sd)
    if sdxl and not isinstance(pipe, StableDiffusionXLPipeline):
        raise TypeError(f"accelerate: unsupported pipeline {who}: its UNet's addition_embed_type='text_time' is "
                        "supported as StableDiffusionXLPipeline builds it, and this is not one")
    processor = type(getattr(pipe, "image_processor", None))
    if processor is not VaeImageProcessor:  # LDM3D's returns (rgb, depth) and the pipeline another output class
        raise TypeError(f"accelerate: unsupported pipeline {who}: its image_processor is a {processor.__name__}, "
                        "not the VaeImageProcessor whose postprocessing the fused loop reproduces")
    return "lcm" if lcm else "sdxl" if sdxl else "text2img"
