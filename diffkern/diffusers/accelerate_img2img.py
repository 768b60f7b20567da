"""Level 2 for image-to-image pipelines: ``StableDiffusionImg2ImgPipeline`` calls whose denoising loop runs in
diffkern (:class:`diffkern.diffusers.accelerate.AcceleratedPipeline` dispatches here).

img2img is a partial schedule. The pipeline sets the scheduler's timesteps, keeps the last ``strength`` fraction of
them (``get_timesteps``, which calls ``set_begin_index``), encodes the image with the VAE and noises its latents to
the first kept timestep (``prepare_latents``: ``scheduler.add_noise`` with noise drawn from the pipeline's
generator), then runs the usual loop from there. Everything but the loop is the pipeline's own code, called on the
pipeline's own scheduler as the pipeline calls it, so the starting latents (and the generator's state after them)
are the pipeline's. They are the scheduler's state at the first kept sigma: VP ``z = sqrt(ab)*x0 + sqrt(1-ab)*n``
for DDIM/DPM-Solver/UniPC, VE ``x0 + sigma*n`` for the Euler family; :meth:`AcceleratedPipeline._run` maps either
to the VE state as it does a text-to-image start. The loop is the scheduler's :class:`~.loop_spec.LoopSpec` from
the begin index on (:func:`~.loop_spec.tail_spec`).
"""
from __future__ import annotations

from .accelerate import _check_call_arguments, _default, _steps, _reject
from .accelerate_text2img import _prompt_batch, _sd_images, sd_encode, sd_output, unet_extra
from .loop_spec import tail_spec


def call_sd_img2img(acc, prompt=None, image=None, strength=0.8, num_inference_steps=None, guidance_scale=None,
                    negative_prompt=None, num_images_per_prompt=1, eta=None, generator=None, prompt_embeds=None,
                    negative_prompt_embeds=None, output_type="pil", return_dict=True, cross_attention_kwargs=None,
                    clip_skip=None, **unsupported):
    """``StableDiffusionImg2ImgPipeline.__call__`` through the fused loop of ``acc``: ``image`` (pixels in [0, 1]
    or 4-channel latents, as the pipeline takes it) noised to the first of the last ``strength`` fraction of the
    ``num_inference_steps`` timesteps, then denoised over those."""
    _reject(unsupported)
    pipe = acc.pipe
    if image is None:
        raise ValueError("image: expected the image (or image latents) to start from, got None")
    steps = _steps(pipe, num_inference_steps, 50)
    w = guidance_scale if guidance_scale is not None else _default(pipe, "guidance_scale", 7.5)
    pipe.check_inputs(prompt, strength, None, negative_prompt, prompt_embeds, negative_prompt_embeds)
    batch = _prompt_batch(prompt, prompt_embeds)
    device = pipe._execution_device
    cfg = w > 1
    prompt_embeds, negative_prompt_embeds = sd_encode(pipe, prompt, device, num_images_per_prompt, cfg, negative_prompt,
                                                      prompt_embeds, negative_prompt_embeds, cross_attention_kwargs,
                                                      clip_skip)
    image = pipe.image_processor.preprocess(image)
    ours, spec = acc._schedule(steps, eta)
    begin = _begin(pipe, steps, strength, device)
    spec = tail_spec(ours, spec, begin)
    first = pipe.scheduler.timesteps[begin * pipe.scheduler.order:][:1].repeat(batch * num_images_per_prompt)
    latents = pipe.prepare_latents(image, first, batch, num_images_per_prompt, prompt_embeds.dtype, device,
                                   generator)
    extra = unet_extra({"encoder_hidden_states": prompt_embeds},
                       {"encoder_hidden_states": negative_prompt_embeds} if cfg else None, cross_attention_kwargs)
    latents = acc._run(ours, spec, latents, generator, guidance_scale=w if cfg else 1.0, extra=extra)
    image, nsfw = _sd_images(pipe, latents, output_type, device, prompt_embeds.dtype, generator)
    return sd_output(pipe, image, nsfw, return_dict)


def _begin(pipe, steps: int, strength: float, device) -> int:
    """The first step the pipeline runs: its own ``set_timesteps`` and ``get_timesteps`` on its own scheduler
    (which sets the scheduler's begin index, read by its ``add_noise``). Raises when no step is left."""
    pipe.scheduler.set_timesteps(steps, device=device)
    _, left = pipe.get_timesteps(steps, strength, device)
    if left < 1:
        raise ValueError(f"strength: {strength} with num_inference_steps={steps} leaves no denoising step (expected "
                         "strength * num_inference_steps >= 1)")
    return steps - left


CALLS = {"img2img": call_sd_img2img}  # AcceleratedPipeline.__call__'s handlers of the kinds below


def check_plain_sd(pipe, who: str, unet, loop: str, handler, processors=("image_processor",)) -> None:
    """Raise TypeError naming what the fused ``loop`` (a phrase: "img2img loop runs a plain text-conditioned UNet")
    cannot run: a UNet with added conditioning or a guidance embedding, ``__call__`` arguments beyond ``handler``'s,
    or ``processors`` other than the VaeImageProcessor whose processing the loop reproduces."""
    from diffusers.image_processor import VaeImageProcessor

    for option in ("addition_embed_type", "class_embed_type", "encoder_hid_dim_type", "time_cond_proj_dim"):
        if unet.config.get(option) is not None:
            raise TypeError(f"accelerate: unsupported pipeline {who}: its UNet has {option}="
                            f"{unet.config.get(option)!r} (the fused {loop})")
    _check_call_arguments(pipe, who, handler)
    for name in processors:
        if type(getattr(pipe, name, None)) is not VaeImageProcessor:
            raise TypeError(f"accelerate: unsupported pipeline {who}: its {name} is not the VaeImageProcessor "
                            "whose processing the fused loop reproduces")


def img2img_kind(pipe, who: str, unet):
    """"img2img" for a ``StableDiffusionImg2ImgPipeline`` the fused loop runs, None for other pipelines; raises
    TypeError naming what it cannot run (added conditioning, guidance-embedding UNets, other ``__call__``
    arguments, another image processor)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    if not isinstance(pipe, StableDiffusionImg2ImgPipeline):
        return None
    check_plain_sd(pipe, who, unet, "img2img loop runs a plain text-conditioned UNet", call_sd_img2img)
    return "img2img"
