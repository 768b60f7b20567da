"""Level 2 for Flux: ``FluxPipeline`` calls whose denoising loop runs in diffkern (:func:`diffkern.diffusers.accelerate`
builds a :class:`FluxAcceleratedPipeline` for them).

The loop is SD3's (:mod:`.accelerate_sd3`): the ``FlowMatchEulerDiscreteScheduler`` becomes a VE loop on the sigmas
``t/(1 - t)`` (t = 1 at ``FLOW_TOP``), the velocity network the "flow" denoiser ``D = x_t - t*v``, flow Euler ``euler``
and ``stochastic_sampling`` ``lcm``. What differs is Flux's own and is the pipeline's code, called as it calls it:

- the schedule: the pipeline passes the sigmas ``linspace(1, 1/N, N)`` (or the caller's ``sigmas``) with the dynamic
  shift ``mu = calculate_shift(image_seq_len)`` (Flux's defaults: 256, 4096, 0.5, 1.15) to ``set_timesteps``;
- the network: packed latents (``prepare_latents``: 2x2 patches, ``(B, h*w/4, 4*C)``), the position ids
  ``txt_ids``/``img_ids`` (one per token, not per sample: :class:`FluxTransformerDenoiser` keeps them out of the
  guidance batch), the timestep divided by 1000 in the latents' dtype (the transformer multiplies it back), and the
  distilled guidance embedding ``guidance`` (a tensor extra arg, so a CUDA-graph replay takes a new
  ``guidance_scale``);
- ``true_cfg_scale`` with a negative prompt: the pipeline's second transformer call is the unconditional half of
  the fused CFG batch ``[uncond; cond]`` (the same weighting ``u + w*(c - u)``);
- the decode: ``_unpack_latents``, ``latents/scaling_factor + shift_factor``, the VAE and the image processor.
"""
from __future__ import annotations

import numpy as np
import torch

from .accelerate import _check_call_arguments, _default, _steps
from .accelerate_args import _keywords, uncompiled
from .accelerate_sd3 import (FlowAcceleratedPipeline, FlowTransformerDenoiser, check_flow_scheduler,
                             check_image_processor, flow_images, reject_flow_call)
from .accelerate_text2img import _prompt_batch
from .loop_spec import diffkern_scheduler, loop_spec

# Per-token (not per-sample) inputs of the Flux transformer: the same for both halves of the guidance batch.
_IDS = ("txt_ids", "img_ids")


class FluxTransformerDenoiser(FlowTransformerDenoiser):
    """A ``FluxTransformer2DModel`` as D(x, sigma): :class:`~.accelerate_sd3.FlowTransformerDenoiser` with Flux's
    timestep ``t/1000`` in ``timestep_dtype`` (the pipeline's latents dtype), and the position ids ``txt_ids`` and
    ``img_ids`` taken as extra args but passed to every call unbatched (the guidance batch would stack or
    duplicate them along their token axis)."""

    def __init__(self, transformer, sigmas, timesteps, num_train_timesteps: int, timestep_dtype: torch.dtype):
        super().__init__(transformer, sigmas, timesteps, num_train_timesteps)
        self.timestep_dtype = timestep_dtype
        self._ids = {}

    def raw(self, x, sigma, txt_ids=None, img_ids=None, **extra):
        """:meth:`~diffkern.wrappers.ModelWrapper.raw` with the position ids set aside for :meth:`call_model`."""
        self._ids = {"txt_ids": txt_ids, "img_ids": img_ids}
        try:
            return super().raw(x, sigma, **extra)
        finally:
            self._ids = {}  # the call's tensors are not kept alive by the wrapper

    def call_model(self, x_in, t, **extra):
        model = self.model
        # the pipeline's timestep: t in the latents' dtype over 1000 (not num_train_timesteps)
        return model(hidden_states=x_in.to(model.dtype), timestep=t.to(self.timestep_dtype) / 1000,
                     return_dict=False, **self._ids, **extra)[0]


def flux_mu(pipe, image_seq_len: int) -> float:
    """The dynamic shift as ``FluxPipeline`` computes it (always; the scheduler ignores it without
    ``use_dynamic_shifting``): ``calculate_shift`` of the packed sequence length with Flux's defaults."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    cfg = pipe.scheduler.config
    return calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                           cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))


class FluxAcceleratedPipeline(FlowAcceleratedPipeline):
    """:class:`~.accelerate_sd3.FlowAcceleratedPipeline` of a ``FluxPipeline``."""

    def _schedule(self, num_inference_steps, eta=0.0, mu=None, sigmas=None):
        """(diffkern FlowMatchEulerDiscreteScheduler after set_timesteps, its flow LoopSpec) with the pipeline's
        sigmas (``linspace(1, 1/N, N)`` unless given, none with ``use_flow_sigmas``) and ``mu`` (without it: the
        default image size's). A FlowMatchHeunDiscreteScheduler, whose ``set_timesteps`` takes neither, is refused."""
        pipe = self.pipe
        ours = diffkern_scheduler(pipe.scheduler)
        check_flow_scheduler(pipe, ours)
        if type(ours).__name__ == "FlowMatchHeunDiscreteScheduler":
            # running its own (shift-only) schedule would silently drop the resolution-dependent mu Flux asks for
            raise ValueError(f"accelerate: {type(pipe).__name__} with a FlowMatchHeunDiscreteScheduler is not "
                             "supported: the pipeline passes sigmas and mu to set_timesteps, which this scheduler "
                             "does not take (diffusers' own pipeline raises there too); use a "
                             "FlowMatchEulerDiscreteScheduler")
        if sigmas is None:
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if pipe.scheduler.config.get("use_flow_sigmas", False):
            sigmas = None
        if mu is None:
            side = pipe.default_sample_size // 2  # default height/width in 2x2 latent patches
            mu = flux_mu(pipe, side * side)
        if sigmas is None:
            ours.set_timesteps(num_inference_steps, mu=mu)
        else:  # as retrieve_timesteps: the sigmas give the step count
            ours.set_timesteps(sigmas=sigmas, mu=mu)
        return ours, loop_spec(ours, eta)

    def _flow_model(self, spec, latents, cfg: bool):
        """The transformer as a :class:`FluxTransformerDenoiser` on ``spec``'s schedule (one per schedule, reused)."""
        transformer = self.pipe.transformer
        T = self.pipe.scheduler.config.num_train_timesteps
        key = ("flux", id(transformer), tuple(spec.sigmas), tuple(spec.timesteps), cfg, latents.device,
               latents.dtype)
        return self._model(key, lambda: FluxTransformerDenoiser(transformer, spec.sigmas[:-1], spec.timesteps, T,
                                                                latents.dtype).to(latents.device))

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        """The pipeline's call with its usual arguments (``prompt``, ``prompt_2``, their negatives, pre-computed
        (pooled) embeddings, ``true_cfg_scale``, ``guidance_scale``, ``num_images_per_prompt``, ``height``,
        ``width``, ``num_inference_steps``, ``sigmas``, ``generator``, ``latents``, ``output_type``,
        ``return_dict``, ``max_sequence_length``, ``joint_attention_kwargs`` with a LoRA ``scale`` only).
        Callbacks and IP-adapters raise."""
        return call_flux(self, **_keywords(self.pipe, args, kwargs))  # positionals as the pipeline's


def _negative_like(name: str, negative, positive) -> None:
    """The fused guidance batch stacks the negative and positive inputs: they need one shape."""
    if negative.shape != positive.shape:
        raise ValueError(f"true_cfg_scale: the negative {name} has shape {tuple(negative.shape)} and the prompt's "
                         f"{tuple(positive.shape)}; the fused loop runs both in one batch, which needs one shape "
                         "(pad the prompts to one max_sequence_length)")


def call_flux(acc, prompt=None, prompt_2=None, negative_prompt=None, negative_prompt_2=None, true_cfg_scale=1.0,
              height=None, width=None, num_inference_steps=None, sigmas=None, guidance_scale=None,
              num_images_per_prompt=1, generator=None, latents=None, prompt_embeds=None, pooled_prompt_embeds=None,
              ip_adapter_image=None, ip_adapter_image_embeds=None, negative_ip_adapter_image=None,
              negative_ip_adapter_image_embeds=None, negative_prompt_embeds=None,
              negative_pooled_prompt_embeds=None, output_type="pil", return_dict=True, joint_attention_kwargs=None,
              max_sequence_length=None, **unsupported):
    """``FluxPipeline.__call__`` through the fused loop of ``acc``."""
    pipe = acc.pipe
    unsupported.update(ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds,
                       negative_ip_adapter_image=negative_ip_adapter_image,
                       negative_ip_adapter_image_embeds=negative_ip_adapter_image_embeds)
    reject_flow_call(unsupported, joint_attention_kwargs)
    steps = _steps(pipe, num_inference_steps, 28)
    w = guidance_scale if guidance_scale is not None else _default(pipe, "guidance_scale", 3.5)
    max_len = max_sequence_length or _default(pipe, "max_sequence_length", 512)
    num_images_per_prompt = num_images_per_prompt or 1
    height = height or pipe.default_sample_size * pipe.vae_scale_factor
    width = width or pipe.default_sample_size * pipe.vae_scale_factor
    pipe.check_inputs(prompt, prompt_2, height, width, negative_prompt=negative_prompt,
                      negative_prompt_2=negative_prompt_2, prompt_embeds=prompt_embeds,
                      negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                      negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, max_sequence_length=max_len)
    batch = _prompt_batch(prompt, prompt_embeds)
    device = pipe._execution_device
    cfg, extra = flux_prompts(pipe, true_cfg_scale, num_images_per_prompt, max_len, joint_attention_kwargs,
                              prompt=prompt, prompt_2=prompt_2, prompt_embeds=prompt_embeds,
                              pooled_prompt_embeds=pooled_prompt_embeds, negative_prompt=negative_prompt,
                              negative_prompt_2=negative_prompt_2, negative_prompt_embeds=negative_prompt_embeds,
                              negative_pooled_prompt_embeds=negative_pooled_prompt_embeds)
    latents, image_ids = pipe.prepare_latents(batch * num_images_per_prompt, pipe.transformer.config.in_channels // 4,
                                              height, width, extra["encoder_hidden_states"].dtype, device, generator,
                                              latents)
    _, spec = acc._schedule(steps, mu=flux_mu(pipe, latents.shape[1]), sigmas=sigmas)
    return flux_loop(acc, spec, latents, image_ids, generator, w, float(true_cfg_scale) if cfg else 1.0, extra,
                     height, width, output_type, return_dict)


def flux_prompts(pipe, true_cfg_scale, num_images_per_prompt, max_len, joint_attention_kwargs, negative_prompt=None,
                 negative_prompt_2=None, negative_prompt_embeds=None, negative_pooled_prompt_embeds=None, **prompts):
    """(the pipeline's ``do_true_cfg``, the transformer's text extra args) from its ``encode_prompt`` of ``prompts``
    (prompt, prompt_2 and their embeddings) and, with true CFG, of the negatives (the guidance batch's
    unconditional half, whose text ids equal the prompt's: zeros of the same length, checked here)."""
    has_negative = negative_prompt is not None or (negative_prompt_embeds is not None
                                                   and negative_pooled_prompt_embeds is not None)
    cfg = true_cfg_scale > 1 and has_negative
    encode = dict(device=pipe._execution_device, num_images_per_prompt=num_images_per_prompt,
                  max_sequence_length=max_len, lora_scale=(joint_attention_kwargs or {}).get("scale"))
    embeds, pooled, text_ids = pipe.encode_prompt(**prompts, **encode)
    extra = {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids}
    if cfg:
        negative_embeds, negative_pooled, _ = pipe.encode_prompt(
            prompt=negative_prompt, prompt_2=negative_prompt_2, prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=negative_pooled_prompt_embeds, **encode)
        _negative_like("prompt embeddings", negative_embeds, embeds)
        _negative_like("pooled prompt embeddings", negative_pooled, pooled)
        extra.update(uncond_encoder_hidden_states=negative_embeds, uncond_pooled_projections=negative_pooled)
    if joint_attention_kwargs is not None:
        extra["joint_attention_kwargs"] = joint_attention_kwargs
    return cfg, extra


def flux_loop(acc, spec, latents, image_ids, generator, guidance_scale, cfg_scale, extra, height, width, output_type,
              return_dict):
    """The fused loop on ``spec`` from the packed ``latents`` (distilled ``guidance_scale`` as the transformer's
    ``guidance`` tensor: table-free, so a captured loop takes a new scale; true CFG at ``cfg_scale``), then the
    pipeline's decode and output."""
    from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput

    pipe = acc.pipe
    extra = dict(extra, img_ids=image_ids)
    if pipe.transformer.config.guidance_embeds:
        extra["guidance"] = torch.full((latents.shape[0],), guidance_scale, device=latents.device,
                                       dtype=torch.float32)
    latents = acc._run_flow(spec, latents, generator, cfg_scale, extra)
    image = flow_images(pipe, latents, output_type,
                        unpack=lambda z: pipe._unpack_latents(z, height, width, pipe.vae_scale_factor))
    pipe.maybe_free_model_hooks()
    return FluxPipelineOutput(images=image) if return_dict else (image,)


def flux_kind(pipe, who: str) -> str:
    """"flux" for a ``FluxPipeline`` (a ``FluxTransformer2DModel``, ``encode_prompt``, a VAE, a scheduler and
    ``FluxPipeline``'s call arguments), "flux_img2img" for a ``FluxImg2ImgPipeline``
    (:mod:`.accelerate_flow_img2img`); raises TypeError naming what the fused loop cannot run (inpainting,
    ControlNet, Kontext, Fill: their calls take more arguments)."""
    from diffusers import FluxTransformer2DModel

    transformer = uncompiled(pipe.transformer)  # (torch.compile's wrapper: its module is checked)
    if not (isinstance(transformer, FluxTransformer2DModel) and hasattr(pipe, "encode_prompt")
            and hasattr(pipe, "prepare_latents") and hasattr(pipe, "_unpack_latents")
            and getattr(pipe, "vae", None) is not None and getattr(pipe, "scheduler", None) is not None):
        raise TypeError(f"accelerate: unsupported pipeline {who} with a {type(transformer).__name__}: expected a "
                        "FluxPipeline (a FluxTransformer2DModel, encode_prompt, prepare_latents, a vae and a "
                        "scheduler)")
    from .accelerate_flow_img2img import img2img_handler

    kind, handler = img2img_handler(pipe) or ("flux", call_flux)  # FluxImg2ImgPipeline: "flux_img2img"
    _check_call_arguments(pipe, who, handler)
    check_image_processor(pipe, who)
    return kind
