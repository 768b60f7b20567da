"""Level 2 for flow-matching image-to-image: ``StableDiffusion3Img2ImgPipeline`` and ``FluxImg2ImgPipeline`` calls
whose denoising loop runs in diffkern (:func:`diffkern.diffusers.accelerate` builds the classes below for them).

img2img is a partial schedule, as for the UNet pipelines (:mod:`.accelerate_img2img`). Everything but the loop is
the pipeline's own code on its own scheduler, called as the pipeline calls it: ``retrieve_timesteps`` (with its
``sigmas`` and ``mu``), ``get_timesteps`` (``init_timestep = min(N*strength, N)``, ``t_start = int(N -
init_timestep)``, ``set_begin_index(t_start*order)``), the VAE encoding of the image and ``prepare_latents``, whose
``scheduler.scale_noise(image_latents, t_start's timestep, noise)`` draws the noise from the pipeline's generator.
So the starting latents (and the generator's state after them) are the pipeline's. They are the flow state x_t at
the begin step's t; the loop is the flow :class:`~.loop_spec.LoopSpec` from there on (:func:`~.loop_spec.tail_spec`:
the VE sigmas ``t/(1 - t)`` of the kept steps, Euler ``euler``, ``stochastic_sampling`` ``lcm`` and SD3's Heun
``heun_flow`` all one-step methods, so the tail is the same method on fewer sigmas). At strength 1 the begin step is
t = 1 (``FLOW_TOP``), where ``scale_noise`` returns the noise itself: text-to-image from a drawn start.

FlowMatchHeunDiscreteScheduler's begin index is ``t_start*2`` of its 2N - 1 calls: the predictor call of step
``t_start``. A strength leaving no step (0, or so small that ``N - N*strength`` rounds to N; the stock pipelines
then noise an empty batch or raise) is refused. A ``stochastic_sampling`` tail draws the Philox noise the whole
loop draws at its steps (``LoopSpec.window``: the Level-1 scheduler's after ``set_begin_index``), keyed by a seed
drawn from the generator after the starting latents.
"""
from __future__ import annotations

import numpy as np
import torch

from .accelerate import _default, _steps
from .accelerate_args import _keywords
from .accelerate_flux import FluxAcceleratedPipeline, flux_loop, flux_mu, flux_prompts
from .accelerate_sd3 import FlowAcceleratedPipeline, flow_images, reject_flow_call, sd3_mu, sd3_prompts
from .accelerate_text2img import _prompt_batch
from .loop_spec import tail_spec


def flow_tail(acc, steps: int, strength: float, batch: int, sigmas=None, mu=None):
    """(the LoopSpec from the begin step, the pipeline's ``latent_timestep``: the begin step's timestep for each of
    ``batch`` latents). Ours from ``acc._schedule``; the begin step from the pipeline's own ``retrieve_timesteps``
    and ``get_timesteps`` on its own scheduler, which set the begin index its ``scale_noise`` reads."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img import retrieve_timesteps

    pipe = acc.pipe
    ours, spec = acc._schedule(steps, mu=mu, sigmas=sigmas)
    device = pipe._execution_device
    kw = {} if mu is None else {"mu": mu}
    if sigmas is not None:
        kw["sigmas"] = sigmas
    _, n = retrieve_timesteps(pipe.scheduler, steps, device, **kw)  # custom sigmas give the step count
    timesteps, left = pipe.get_timesteps(n, strength, device)
    if len(timesteps) == 0:  # a host shape: no sync
        raise ValueError(f"strength: {strength} with num_inference_steps={n} leaves no denoising step (the "
                         f"pipeline's get_timesteps starts at step int(N - N*strength) = {n - left} of {n})")
    return tail_spec(ours, spec, n - left), timesteps[:1].repeat(batch)


def _defaults(pipe, image, steps, strength, guidance_scale, max_len, height, width) -> tuple:
    """(steps, strength, guidance scale, max sequence length, height, width) of a call: the given ones, else the
    pipeline's ``__call__`` defaults (the default image size: ``default_sample_size*vae_scale_factor``); raises
    without an ``image``."""
    if image is None:
        raise ValueError("image: expected the image (or image latents) to start from, got None")
    size = pipe.default_sample_size * pipe.vae_scale_factor
    return (_steps(pipe, steps, None),
            strength if strength is not None else _default(pipe, "strength", None),
            guidance_scale if guidance_scale is not None else _default(pipe, "guidance_scale", None),
            max_len or _default(pipe, "max_sequence_length", None), height or size, width or size)


class FlowImg2ImgAcceleratedPipeline(FlowAcceleratedPipeline):
    """:class:`~.accelerate_sd3.FlowAcceleratedPipeline` of a ``StableDiffusion3Img2ImgPipeline``."""

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        """The pipeline's call with its usual arguments (those of SD3's text-to-image call, ``image``,
        ``strength`` and ``sigmas``). Callbacks and IP-adapters raise."""
        return call_sd3_img2img(self, **_keywords(self.pipe, args, kwargs))  # positionals as the pipeline's


class FluxImg2ImgAcceleratedPipeline(FluxAcceleratedPipeline):
    """:class:`~.accelerate_flux.FluxAcceleratedPipeline` of a ``FluxImg2ImgPipeline``."""

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        """The pipeline's call with its usual arguments (those of Flux's text-to-image call, ``image`` and
        ``strength``). Callbacks and IP-adapters raise."""
        return call_flux_img2img(self, **_keywords(self.pipe, args, kwargs))  # positionals as the pipeline's


def call_sd3_img2img(acc, prompt=None, prompt_2=None, prompt_3=None, height=None, width=None, image=None,
                     strength=None, num_inference_steps=None, sigmas=None, guidance_scale=None, negative_prompt=None,
                     negative_prompt_2=None, negative_prompt_3=None, num_images_per_prompt=1, generator=None,
                     latents=None, prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                     negative_pooled_prompt_embeds=None, output_type="pil", return_dict=True,
                     joint_attention_kwargs=None, clip_skip=None, max_sequence_length=None, mu=None, **unsupported):
    """``StableDiffusion3Img2ImgPipeline.__call__`` through the fused loop of ``acc``."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput

    arguments = dict(locals())  # the prompt arguments, passed on by name (sd3_prompts)
    pipe = acc.pipe
    reject_flow_call(unsupported, joint_attention_kwargs)
    steps, strength, w, max_len, height, width = _defaults(pipe, image, num_inference_steps, strength, guidance_scale,
                                                           max_sequence_length, height, width)
    pipe.check_inputs(prompt, prompt_2, prompt_3, height, width, strength, negative_prompt=negative_prompt,
                      negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3,
                      prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                      pooled_prompt_embeds=pooled_prompt_embeds,
                      negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, max_sequence_length=max_len)
    batch = _prompt_batch(prompt, prompt_embeds)
    cfg = w > 1  # the pipeline's do_classifier_free_guidance
    extra = sd3_prompts(pipe, cfg, num_images_per_prompt, max_len, clip_skip, joint_attention_kwargs, arguments)
    image = pipe.image_processor.preprocess(image, height=height, width=width)
    if pipe.scheduler.config.get("use_dynamic_shifting", None) and mu is None:
        mu = sd3_mu(pipe, int(height) // pipe.vae_scale_factor, int(width) // pipe.vae_scale_factor)
    spec, first = flow_tail(acc, steps, strength, batch * num_images_per_prompt, sigmas=sigmas, mu=mu)
    if latents is None:  # given latents are the pipeline's start as they are
        latents = pipe.prepare_latents(image, first, batch, num_images_per_prompt, extra["encoder_hidden_states"].dtype,
                                       pipe._execution_device, generator)
    image = flow_images(pipe, acc._run_flow(spec, latents, generator, w if cfg else 1.0, extra), output_type)
    pipe.maybe_free_model_hooks()
    return StableDiffusion3PipelineOutput(images=image) if return_dict else (image,)


def call_flux_img2img(acc, prompt=None, prompt_2=None, negative_prompt=None, negative_prompt_2=None,
                      true_cfg_scale=1.0, image=None, height=None, width=None, strength=None, num_inference_steps=None,
                      sigmas=None, guidance_scale=None, num_images_per_prompt=1, generator=None, latents=None,
                      prompt_embeds=None, pooled_prompt_embeds=None, ip_adapter_image=None,
                      ip_adapter_image_embeds=None, negative_ip_adapter_image=None,
                      negative_ip_adapter_image_embeds=None, negative_prompt_embeds=None,
                      negative_pooled_prompt_embeds=None, output_type="pil", return_dict=True,
                      joint_attention_kwargs=None, max_sequence_length=None, **unsupported):
    """``FluxImg2ImgPipeline.__call__`` through the fused loop of ``acc``."""
    pipe = acc.pipe
    unsupported.update(ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds,
                       negative_ip_adapter_image=negative_ip_adapter_image,
                       negative_ip_adapter_image_embeds=negative_ip_adapter_image_embeds)
    reject_flow_call(unsupported, joint_attention_kwargs)
    steps, strength, w, max_len, height, width = _defaults(pipe, image, num_inference_steps, strength, guidance_scale,
                                                           max_sequence_length, height, width)
    num_images_per_prompt = num_images_per_prompt or 1
    pipe.check_inputs(prompt, prompt_2, strength, height, width, negative_prompt=negative_prompt,
                      negative_prompt_2=negative_prompt_2, prompt_embeds=prompt_embeds,
                      negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                      negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, max_sequence_length=max_len)
    init_image = pipe.image_processor.preprocess(image, height=height, width=width).to(dtype=torch.float32)
    batch = _prompt_batch(prompt, prompt_embeds) * num_images_per_prompt
    cfg, extra = flux_prompts(pipe, true_cfg_scale, num_images_per_prompt, max_len, joint_attention_kwargs,
                              prompt=prompt, prompt_2=prompt_2, prompt_embeds=prompt_embeds,
                              pooled_prompt_embeds=pooled_prompt_embeds, negative_prompt=negative_prompt,
                              negative_prompt_2=negative_prompt_2, negative_prompt_embeds=negative_prompt_embeds,
                              negative_pooled_prompt_embeds=negative_pooled_prompt_embeds)
    sigmas = np.linspace(1.0, 1 / steps, steps) if sigmas is None else sigmas
    tokens = (int(height) // pipe.vae_scale_factor // 2) * (int(width) // pipe.vae_scale_factor // 2)
    spec, first = flow_tail(acc, steps, strength, batch, sigmas=sigmas, mu=flux_mu(pipe, tokens))
    latents, image_ids = pipe.prepare_latents(init_image, first, batch, pipe.transformer.config.in_channels // 4,
                                              height, width, extra["encoder_hidden_states"].dtype,
                                              pipe._execution_device, generator, latents)
    return flux_loop(acc, spec, latents, image_ids, generator, w, float(true_cfg_scale) if cfg else 1.0, extra,
                     height, width, output_type, return_dict)


def img2img_handler(pipe):
    """("sd3_img2img", :func:`call_sd3_img2img`) for a ``StableDiffusion3Img2ImgPipeline`` (SD3's checks:
    :func:`~.accelerate_sd3.transformer_kind`), ("flux_img2img", :func:`call_flux_img2img`) for a
    ``FluxImg2ImgPipeline`` (:func:`~.accelerate_flux.flux_kind`), None for other pipelines."""
    from diffusers import FluxImg2ImgPipeline, StableDiffusion3Img2ImgPipeline

    if isinstance(pipe, StableDiffusion3Img2ImgPipeline):
        return "sd3_img2img", call_sd3_img2img
    if isinstance(pipe, FluxImg2ImgPipeline):
        return "flux_img2img", call_flux_img2img
    return None


# accelerate's classes of the kinds above
CLASSES = {"sd3_img2img": FlowImg2ImgAcceleratedPipeline, "flux_img2img": FluxImg2ImgAcceleratedPipeline}
