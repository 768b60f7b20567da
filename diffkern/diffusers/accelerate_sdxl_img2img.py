"""Level 2 for SDXL image-to-image: ``StableDiffusionXLImg2ImgPipeline`` calls whose denoising loop runs in diffkern
(:class:`diffkern.diffusers.accelerate.AcceleratedPipeline` dispatches here), and the head of a schedule that
``denoising_end`` keeps (:func:`head_spec`, also used by SDXL text-to-image).

The loop runs a window of the pipeline's schedule, as diffusers computes it on the pipeline's own scheduler:

- its start is ``get_timesteps``: the last ``strength`` fraction of the steps, or with ``denoising_start`` (the
  refiner of an ensemble of expert denoisers) the timesteps below ``round(T*(1 - denoising_start))``, a second-order
  scheduler's entries rounded up to a whole step. ``prepare_latents`` (VAE encode, ``add_noise`` to the first kept
  timestep, or with ``denoising_start`` no noise: the image is the base model's noisy latents) gives the start state,
  and the fused loop runs the schedule from there (:func:`~.loop_spec.tail_spec`);
- its end is ``denoising_end`` (the base of an ensemble): the kept timesteps at or above
  ``round(T*(1 - denoising_end))``. The loop stops at the next step's sigma and returns the noisy latents there.

Prompt encoding (both encoders, pooled embeddings), the time ids (``_get_add_time_ids``: with
``requires_aesthetics_score`` the aesthetic scores replace the target size), the decode and the watermark are the
pipeline's own code. Unlike the text-to-image pipeline, this one repeats the negative and positive time ids per
image separately, so each half of the CFG batch gets its own ids.
"""
from __future__ import annotations

import dataclasses

from .. import coef_tables_3m, coef_tables_deis, coef_tables_sasolver, coef_tables_unipc
from .accelerate import _check_call_arguments, _default, _steps, _reject
from .accelerate_text2img import _prompt_batch, _sdxl_decode, sdxl_encode, unet_extra
from .loop_spec import LoopSpec, tail_spec


def denoising_value_valid(value) -> bool:
    """diffusers' rule for ``denoising_start``/``denoising_end``: a float strictly between 0 and 1 (else ignored)."""
    return isinstance(value, float) and 0 < value < 1


def _matching(orders_of, want: list, options, name: str, value, why: str):
    """The first option whose orders (``orders_of(option)``) are ``want``, else ValueError naming ``name``."""
    for option in options:
        if orders_of(option) == want:
            return option
    raise ValueError(f"accelerate: {name}={value!r} is not supported by the fused loop ({why}: diffusers' orders "
                     f"{want} are not those of a {len(want)}-step loop)")


def head_spec(ours, spec: LoopSpec, steps: int, denoising_end: float) -> LoopSpec:
    """``spec``'s first ``steps`` steps: the loop a pipeline's ``denoising_end`` keeps. The state after them is the
    pipeline's (the sampler rows of a prefix are those of the whole loop), provided the kept steps have diffusers'
    orders: UniPC, DEIS and third-order DPM-Solver lower the orders of the whole schedule's last steps, which a
    shorter loop must not (or must, when the head keeps them); singlestep DPM-Solver keeps its per-step orders."""
    n = len(spec.timesteps)
    if steps >= n:
        return spec
    name = type(ours).__name__
    knobs = dict(spec.knobs)
    why = f"{name} stopped after {steps} of its {n} steps"
    if spec.method == "unipc":
        k = knobs
        want = coef_tables_unipc.unipc_orders(n, order=k["order"], lower_order_final=k["lower_order_final"])[:steps]
        knobs["lower_order_final"] = _matching(
            lambda low: coef_tables_unipc.unipc_orders(steps, order=k["order"], lower_order_final=low), want,
            (False, True), "denoising_end", denoising_end, why)
        knobs["disable_corrector"] = tuple(i for i in k["disable_corrector"] if i < steps)
    elif spec.method == "dpmsolver_3m":
        order = knobs["solver_order"]
        want = coef_tables_3m.dpmsolver_orders(n, solver_order=order, lower_order_final=knobs["lower_order_final"],
                                               euler_at_final=knobs["euler_at_final"])[:steps]
        knobs["lower_order_final"], knobs["euler_at_final"] = _matching(
            lambda o: coef_tables_3m.dpmsolver_orders(steps, solver_order=order, lower_order_final=o[0],
                                                      euler_at_final=o[1]), want,
            ((False, False), (True, False), (False, True), (True, True)), "denoising_end", denoising_end, why)
    elif spec.method == "deis":
        want = coef_tables_deis.deis_orders(n, order=knobs["order"], lower_order_final=knobs["lower_order_final"])
        knobs["lower_order_final"] = _matching(
            lambda low: coef_tables_deis.deis_orders(steps, order=knobs["order"], lower_order_final=low),
            want[:steps], (False, True), "denoising_end", denoising_end, why)
    elif spec.method == "dpmsolver_single":
        knobs["orders"] = tuple(knobs["orders"])[:steps]
    elif spec.method == "sa_solver":
        p, c = knobs["predictor_order"], knobs["corrector_order"]
        want = coef_tables_sasolver.orders(n, p, c, knobs["lower_order_final"])[:steps]
        knobs["lower_order_final"] = _matching(lambda low: coef_tables_sasolver.orders(steps, p, c, low), want,
                                               (False, True), "denoising_end", denoising_end, why)
        knobs["tau"] = tuple(knobs["tau"])[:steps]
    calls = spec.call_timesteps
    if calls is not None:  # KDPM2: two model calls per kept step
        calls = calls[:2 * steps]
    # the noise stays the whole loop's: a two-call method's second-call rows follow all n steps' first-call rows
    return dataclasses.replace(spec, sigmas=spec.sigmas[:steps + 1], timesteps=spec.timesteps[:steps], knobs=knobs,
                               call_timesteps=calls, window=spec.window or (0, n))


def end_steps(scheduler, timesteps, denoising_end):
    """How many steps of the loop over ``timesteps`` (the pipeline's scheduler's, ``scheduler.order`` entries per
    step) a valid ``denoising_end`` keeps, as diffusers counts them (timesteps >= ``round(T*(1 -
    denoising_end))``); None for all of them or an ignored value. Raises where the count ends inside a step of a
    second-order scheduler (diffusers stops after the step's first model call) or keeps no step."""
    if not denoising_value_valid(denoising_end):
        return None
    total = scheduler.config.num_train_timesteps
    cutoff = int(round(total - denoising_end * total))
    count = int((timesteps >= cutoff).sum())
    if count == len(timesteps):
        return None
    if count == 0:
        raise ValueError(f"denoising_end: {denoising_end} keeps no denoising step (every timestep of the loop is "
                         f"below the cutoff {cutoff}); expected a larger value")
    name, order = type(scheduler).__name__, int(scheduler.order)
    if name == "PNDMScheduler":  # its timesteps repeat the second one (step 0's corrector): a count is no step count
        raise ValueError("accelerate: denoising_end with PNDMScheduler is not supported by the fused loop (its "
                         "timestep list repeats t_1 for the first step's second call, so diffusers' cut can end "
                         "inside a step); run the pipeline with diffkern.diffusers.PNDMScheduler as its scheduler")
    if count % order:
        raise ValueError(f"accelerate: denoising_end={denoising_end} is not supported by the fused loop with {name} "
                         f"(a second-order scheduler: diffusers keeps {count} of its model calls, which ends inside "
                         f"step {count // order}, after that step's first call); run the pipeline with "
                         f"diffkern.diffusers.{name} as its scheduler instead")
    return count // order


def text2img_head(pipe, ours, spec: LoopSpec, steps: int, denoising_end, device) -> LoopSpec:
    """SDXL text-to-image's ``spec`` cut at a valid ``denoising_end`` (the base of an ensemble of expert denoisers;
    counted on the pipeline's own scheduler's timesteps, as the pipeline counts them), else ``spec``."""
    if not denoising_value_valid(denoising_end):
        return spec
    pipe.scheduler.set_timesteps(steps, device=device)
    kept = end_steps(pipe.scheduler, pipe.scheduler.timesteps, denoising_end)
    return spec if kept is None else head_spec(ours, spec, kept, denoising_end)


def _window(pipe, ours, spec, steps, strength, denoising_start, denoising_end, device):
    """(loop spec, pipeline timesteps of the loop) of the pipeline's ``get_timesteps`` window and ``denoising_end``
    head, computed on the pipeline's own scheduler (which sets its begin index, read by its ``add_noise``)."""
    start = denoising_start if denoising_value_valid(denoising_start) else None
    if start is not None and denoising_value_valid(denoising_end) and start >= denoising_end:
        raise ValueError(f"denoising_start: {start} cannot be larger than or equal to denoising_end: {denoising_end}")
    pipe.scheduler.set_timesteps(steps, device=device)
    timesteps, _ = pipe.get_timesteps(steps, strength, device, denoising_start=start)
    index, order = len(pipe.scheduler.timesteps) - len(timesteps), int(pipe.scheduler.order)
    if len(timesteps) == 0 or index // order >= len(spec.timesteps):
        which, value = ("denoising_start", start) if start is not None else ("strength", strength)
        raise ValueError(f"{which}: {value} with num_inference_steps={steps} leaves no denoising step")
    if index % order:
        raise ValueError(f"accelerate: denoising_start={start} is not supported by the fused loop with "
                         f"{type(pipe.scheduler).__name__} (the loop would start at its timestep entry {index}, "
                         "inside a second-order step)")
    spec = tail_spec(ours, spec, index // order)
    kept = end_steps(pipe.scheduler, timesteps, denoising_end)
    if kept is not None:
        spec = head_spec(ours, spec, kept, denoising_end)
    return spec, timesteps


def img2img_extra(pipe, latents, n: int, cfg: bool, encoded, cross_attention_kwargs, original_size=None,
                  crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
                  negative_crops_coords_top_left=(0, 0), negative_target_size=None, aesthetic_score=None,
                  negative_aesthetic_score=None) -> dict:
    """The UNet extra args of SDXL img2img's and inpainting's fused loop (their pipelines build them alike):
    ``encoded`` is :func:`~.accelerate_text2img.sdxl_encode`'s tuple, the sizes default to the start latents' pixel
    size, the time ids are ``_get_add_time_ids``'s (aesthetic scores with ``requires_aesthetics_score``; None: the
    pipeline's defaults), the negative and positive ids each repeated per image (``n`` of them)."""
    embeds, negative_embeds, pooled, negative_pooled = encoded
    device = pipe._execution_device
    height, width = (size * pipe.vae_scale_factor for size in latents.shape[-2:])
    original_size = original_size or (height, width)
    target_size = target_size or (height, width)
    projection_dim = (int(pooled.shape[-1]) if pipe.text_encoder_2 is None
                      else pipe.text_encoder_2.config.projection_dim)
    time_ids, negative_time_ids = pipe._get_add_time_ids(
        original_size, crops_coords_top_left, target_size,
        aesthetic_score if aesthetic_score is not None else _default(pipe, "aesthetic_score", 6.0),
        negative_aesthetic_score if negative_aesthetic_score is not None
        else _default(pipe, "negative_aesthetic_score", 2.5),
        negative_original_size or original_size, negative_crops_coords_top_left, negative_target_size or target_size,
        dtype=embeds.dtype, text_encoder_projection_dim=projection_dim)
    return unet_extra(
        {"encoder_hidden_states": embeds.to(device),
         "added_cond_kwargs": {"text_embeds": pooled.to(device), "time_ids": time_ids.repeat(n, 1).to(device)}},
        {"encoder_hidden_states": negative_embeds.to(device),
         "added_cond_kwargs": {"text_embeds": negative_pooled.to(device),
                               "time_ids": negative_time_ids.repeat(n, 1).to(device)}} if cfg else None,
        cross_attention_kwargs)


def call_sdxl_img2img(acc, prompt=None, prompt_2=None, image=None, strength=None, num_inference_steps=None,
                      denoising_start=None, denoising_end=None, guidance_scale=None, negative_prompt=None,
                      negative_prompt_2=None, num_images_per_prompt=1, eta=None, generator=None, latents=None,
                      prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                      negative_pooled_prompt_embeds=None, output_type="pil", return_dict=True,
                      cross_attention_kwargs=None, guidance_rescale=0.0, original_size=None,
                      crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
                      negative_crops_coords_top_left=(0, 0), negative_target_size=None, aesthetic_score=None,
                      negative_aesthetic_score=None, clip_skip=None, **unsupported):
    """``StableDiffusionXLImg2ImgPipeline.__call__`` through the fused loop of ``acc``: ``image`` (pixels, or
    4-channel latents: a base model's output for ``denoising_start``) noised to the first kept timestep (none with
    ``denoising_start``; ``latents`` replace the start state), then denoised over the window."""
    from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput

    _reject(unsupported)
    pipe = acc.pipe
    if image is None:
        raise ValueError("image: expected the image (or image latents) to start from, got None")
    steps = _steps(pipe, num_inference_steps, 50)
    strength = strength if strength is not None else _default(pipe, "strength", 0.3)
    w = guidance_scale if guidance_scale is not None else _default(pipe, "guidance_scale", 5.0)
    pipe.check_inputs(prompt, prompt_2, strength, steps, None, negative_prompt, negative_prompt_2, prompt_embeds,
                      negative_prompt_embeds)
    batch = _prompt_batch(prompt, prompt_embeds)
    n = batch * num_images_per_prompt
    device = pipe._execution_device
    cfg = w > 1
    embeds, negative_embeds, pooled, negative_pooled = sdxl_encode(
        pipe, device, num_images_per_prompt, cfg, cross_attention_kwargs, prompt=prompt, prompt_2=prompt_2,
        negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2, prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
        negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, clip_skip=clip_skip)
    image = pipe.image_processor.preprocess(image)
    ours, spec = acc._schedule(steps, eta)
    spec, timesteps = _window(pipe, ours, spec, steps, strength, denoising_start, denoising_end, device)
    if latents is None:  # the pipeline's rule: no noise whenever denoising_start is given (valid or not)
        latents = pipe.prepare_latents(image, timesteps[:1].repeat(n), batch, num_images_per_prompt, embeds.dtype,
                                       device, generator, denoising_start is None)
    extra = img2img_extra(pipe, latents, n, cfg, (embeds, negative_embeds, pooled, negative_pooled),
                          cross_attention_kwargs, original_size=original_size,
                          crops_coords_top_left=crops_coords_top_left, target_size=target_size,
                          negative_original_size=negative_original_size,
                          negative_crops_coords_top_left=negative_crops_coords_top_left,
                          negative_target_size=negative_target_size, aesthetic_score=aesthetic_score,
                          negative_aesthetic_score=negative_aesthetic_score)
    latents = acc._run(ours, spec, latents, generator, guidance_scale=w if cfg else 1.0, extra=extra,
                       guidance_rescale=guidance_rescale)
    image = latents if output_type == "latent" else _sdxl_decode(pipe, latents)
    if getattr(pipe, "watermark", None) is not None:  # this pipeline watermarks "latent" outputs too
        image = pipe.watermark.apply_watermark(image)
    image = pipe.image_processor.postprocess(image, output_type=output_type)
    pipe.maybe_free_model_hooks()
    return StableDiffusionXLPipelineOutput(images=image) if return_dict else (image,)


CALLS = {"sdxl_img2img": call_sdxl_img2img}  # AcceleratedPipeline.__call__'s handler of the kind below


def sdxl_img2img_kind(pipe, who: str, unet):
    """"sdxl_img2img" for a ``StableDiffusionXLImg2ImgPipeline`` the fused loop runs, None for other pipelines;
    raises TypeError naming what it cannot run (:func:`check_sdxl`)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    if not isinstance(pipe, StableDiffusionXLImg2ImgPipeline):
        return None
    check_sdxl(pipe, who, unet, call_sdxl_img2img)
    return "sdxl_img2img"


def check_sdxl(pipe, who: str, unet, handler, processors=("image_processor",)) -> None:
    """Raise TypeError naming what the fused SDXL loop of ``handler`` (img2img, inpainting) cannot run: added
    conditioning other than SDXL's text_time, guidance-embedding UNets, ``__call__`` arguments beyond ``handler``'s,
    ``processors`` other than the VaeImageProcessor."""
    from diffusers.image_processor import VaeImageProcessor

    if unet.config.get("addition_embed_type") != "text_time":
        raise TypeError(f"accelerate: unsupported pipeline {who}: its UNet has addition_embed_type="
                        f"{unet.config.get('addition_embed_type')!r}, expected SDXL's 'text_time'")
    for option in ("class_embed_type", "encoder_hid_dim_type", "time_cond_proj_dim"):
        if unet.config.get(option) is not None:
            raise TypeError(f"accelerate: unsupported pipeline {who}: its UNet has {option}="
                            f"{unet.config.get(option)!r} (the fused SDXL loop runs SDXL's text_time "
                            "conditioning only)")
    _check_call_arguments(pipe, who, handler)
    for name in processors:
        if type(getattr(pipe, name, None)) is not VaeImageProcessor:
            raise TypeError(f"accelerate: unsupported pipeline {who}: its {name} is not the VaeImageProcessor "
                            "whose processing the fused loop reproduces")
