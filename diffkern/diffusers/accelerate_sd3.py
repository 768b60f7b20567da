"""Level 2 for flow-matching transformer pipelines: ``StableDiffusion3Pipeline`` calls whose denoising loop runs in
diffkern (:func:`diffkern.diffusers.accelerate` builds a :class:`FlowAcceleratedPipeline` for them).

The pipeline's ``FlowMatchEulerDiscreteScheduler`` (diffusers' or diffkern's) becomes a VE loop
(:func:`diffkern.diffusers.loop_spec.flow_spec`): the flow state ``x_t`` at time t is the VE state
``x = x_t*(1 + sigma)`` at ``sigma = t/(1 - t)``, the velocity network a "flow" denoiser ``D = x_t - t*v``, the flow
Euler step ``euler`` on those sigmas and ``stochastic_sampling`` ``lcm``. The top of the schedule, t = 1 (pure noise,
an infinite VE sigma), is the finite ``FLOW_TOP = 2^70``, at which every quantity the loop uses is exact in float64.

Everything around the loop is the pipeline's own code, called as the pipeline calls it: ``check_inputs``,
``encode_prompt`` (three text encoders, pooled embeddings, negatives, pre-computed embeddings), ``prepare_latents``,
the dynamic shift ``mu`` (``calculate_shift`` on the image sequence length), the VAE decode
(``latents/scaling_factor + shift_factor``) and the image processor. Classifier-free guidance is one batched
transformer call on ``[uncond; cond]``, fused into the step.
"""
from __future__ import annotations

import torch

from .. import wrappers
from .accelerate import AcceleratedPipeline, _check_call_arguments, _default, _steps, _reject, _seed, _stochastic
from .accelerate_args import _keywords, uncompiled
from .accelerate_text2img import _prompt_batch
from .loop_spec import FLOW_TOP, diffkern_scheduler, loop_spec

# Methods whose step from sigma to sigma' takes a slope (x - D)/sigma'' at another sigma'' times sigma' - sigma: from
# FLOW_TOP (t = 1) that is 2^70 times a difference of slopes, the discretisation of an infinite step.
_NO_INFINITE_FIRST_STEP = ("heun", "dpm_2", "dpm_2_ancestral")

# The flow-matching schedulers the fused loop runs: Euler (``euler``/``lcm``) and Heun in flow time (``heun_flow``).
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")

# SD3's skip-layer guidance (an extra transformer call on some steps) has no fused counterpart.
_SKIP_LAYER_GUIDANCE = ("skip_guidance_layers", "skip_layer_guidance_scale", "skip_layer_guidance_stop",
                        "skip_layer_guidance_start")


class FlowTransformerDenoiser(wrappers.ModelWrapper):
    """A flow-matching transformer (velocity ``v = n - x0``) as D(x, sigma) in VE coordinates: called on
    ``hidden_states = x/(1 + sigma)`` (the flow state x_t) with the scheduler's own timestep for each schedule sigma
    (matched exactly on the device, no sync), ``num_train_timesteps*t`` (``t = sigma/(1 + sigma)``) for any other
    sigma (another method's midpoints, churn)."""

    prediction_type = "flow"

    def __init__(self, transformer, sigmas, timesteps, num_train_timesteps: int, guidance_scale: float = 1.0):
        super().__init__(transformer, guidance_scale)
        self.register_buffer("schedule_sigmas", torch.tensor(sigmas, dtype=torch.float64), persistent=False)
        self.register_buffer("schedule_t", torch.tensor(timesteps, dtype=torch.float32), persistent=False)
        self.num_train_timesteps = float(num_train_timesteps)

    def model_input(self, x, sigma):
        hit = self.schedule_sigmas[None, :] == sigma[:, None]
        t_off = (self.num_train_timesteps * (sigma / (1 + sigma))).to(torch.float32)
        t = torch.where(hit.any(1), self.schedule_t[hit.int().argmax(1)], t_off)
        # 1/(1 + sigma) in float64: at FLOW_TOP exactly 2^-70, so the input is exactly the initial noise
        return wrappers._scale_input(x, 1 / (1 + sigma)), t

    def call_model(self, x_in, t, **extra):
        model = self.model
        return model(hidden_states=x_in.to(model.dtype), timestep=t, return_dict=False, **extra)[0]


class FlowAcceleratedPipeline(AcceleratedPipeline):
    """:class:`~diffkern.diffusers.accelerate.AcceleratedPipeline` of a flow-matching transformer pipeline (SD3)."""

    def _schedule(self, num_inference_steps, eta=0.0, mu=None, sigmas=None):
        """(diffkern FlowMatchEuler/HeunDiscreteScheduler after set_timesteps, its flow LoopSpec). Without ``mu`` a
        dynamically shifted schedule takes the pipeline's default image size's (the check at ``accelerate``).
        ``sigmas`` (the img2img pipeline's custom flow sigmas) give the step count, as ``retrieve_timesteps``."""
        pipe = self.pipe
        ours = diffkern_scheduler(pipe.scheduler)
        check_flow_scheduler(pipe, ours)
        if type(ours).__name__ == "FlowMatchHeunDiscreteScheduler":
            if mu is not None:  # the pipeline would pass it to set_timesteps, which takes none (diffusers raises)
                raise ValueError(f"mu: FlowMatchHeunDiscreteScheduler takes no dynamic shift (its set_timesteps has "
                                 f"no mu; the pipeline computes one when the config has use_dynamic_shifting), got "
                                 f"mu={mu!r}")
            if sigmas is not None:  # as mu: diffusers' retrieve_timesteps raises
                raise ValueError(f"sigmas: FlowMatchHeunDiscreteScheduler takes no custom sigmas (its set_timesteps "
                                 f"has none), got sigmas={sigmas!r}")
            ours.set_timesteps(num_inference_steps)
            return ours, loop_spec(ours, eta)
        if ours.config.get("use_dynamic_shifting") and mu is None:
            size = pipe.default_sample_size
            mu = sd3_mu(pipe, size, size)
        ours.set_timesteps(num_inference_steps if sigmas is None else None, sigmas=sigmas, mu=mu)
        return ours, loop_spec(ours, eta)

    def _run_flow(self, spec, latents, generator, guidance_scale, extra):
        """The loop: initial flow latents x_t (the pipeline's) -> final latents, in latents' dtype."""
        from ..sampling import sample

        method = self.method or spec.method
        if self.method is not None and spec.sigmas[0] == FLOW_TOP and method in _NO_INFINITE_FIRST_STEP:
            raise ValueError(f"method: {method!r} cannot start at flow time t = 1 (an infinite VE sigma; its first "
                             "step would weigh a slope difference by it); use heun_flow, euler, euler_ancestral, "
                             "lcm, dpmpp_2m, dpmpp_2m_sde, dpmpp_3m_sde, dpmsolver_3m, dpmpp_2s_ancestral, dpmpp_sde, "
                             "sde, ge or unipc")
        knobs = dict(spec.knobs if self.method is None else {}, **self.knobs)
        seed = _seed(generator, latents.shape[0]) if _stochastic(method, knobs, spec.sigmas) else 0
        model = self._flow_model(spec, latents, guidance_scale != 1.0)
        model.guidance_scale = float(guidance_scale)  # a table value: a captured loop stays valid
        x = latents if latents.dtype == torch.float64 else latents.to(torch.float32)  # the state stays >= float32
        x = x * (1.0 + spec.sigmas[0])  # VE state; at FLOW_TOP a power of two: exact
        out = sample(model, x, spec.sigmas, method, backend=self.backend, seed=seed, progress=self.progress,
                     extra_args=extra, graph=self._graph_mode(latents.device), window=spec.window, **knobs)
        return (out / (1.0 + spec.sigmas[-1])).to(latents.dtype)

    def _flow_model(self, spec, latents, cfg: bool):
        """The transformer as a :class:`FlowTransformerDenoiser` on ``spec``'s schedule (one per schedule, reused)."""
        transformer = self.pipe.transformer
        T = self.pipe.scheduler.config.num_train_timesteps
        key = ("flow", id(transformer), tuple(spec.sigmas), tuple(spec.timesteps), cfg, latents.device)
        return self._model(key, lambda: FlowTransformerDenoiser(transformer, spec.sigmas[:-1], spec.timesteps,
                                                                T).to(latents.device))

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        """The pipeline's call with its usual arguments (``prompt``, ``prompt_2``, ``prompt_3``, their negatives,
        pre-computed (pooled) embeddings, ``guidance_scale``, ``num_images_per_prompt``, ``height``, ``width``,
        ``num_inference_steps``, ``generator``, ``latents``, ``output_type``, ``return_dict``, ``clip_skip``,
        ``max_sequence_length``, ``mu``, ``joint_attention_kwargs`` with a LoRA ``scale`` only). Skip-layer
        guidance, callbacks, custom sigmas and IP-adapters raise."""
        return call_sd3(self, **_keywords(self.pipe, args, kwargs))  # positionals as the pipeline's


def check_flow_scheduler(pipe, ours) -> None:
    """Raise unless ``ours`` (the pipeline scheduler's diffkern twin) is one of :data:`FLOW_SCHEDULERS`."""
    if type(ours).__name__ not in FLOW_SCHEDULERS:
        names = " or a ".join(sorted(FLOW_SCHEDULERS, reverse=True))
        raise ValueError(f"accelerate: {type(pipe).__name__} with a {type(pipe.scheduler).__name__}: the fused loop "
                         f"runs this flow-matching pipeline with a {names} only")


def sd3_mu(pipe, latent_height: int, latent_width: int) -> float:
    """The dynamic shift of SD3's schedule, as the pipeline computes it: ``calculate_shift`` of the image sequence
    length (latent patches) and the scheduler config's base/max lengths and shifts."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    cfg, patch = pipe.scheduler.config, pipe.transformer.config.patch_size
    return calculate_shift((latent_height // patch) * (latent_width // patch), cfg.get("base_image_seq_len", 256),
                           cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))


def call_sd3(acc, prompt=None, prompt_2=None, prompt_3=None, height=None, width=None, num_inference_steps=None,
             guidance_scale=None, negative_prompt=None, negative_prompt_2=None, negative_prompt_3=None,
             num_images_per_prompt=1, generator=None, latents=None, prompt_embeds=None, negative_prompt_embeds=None,
             pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None, output_type="pil", return_dict=True,
             joint_attention_kwargs=None, clip_skip=None, max_sequence_length=None, skip_guidance_layers=None,
             skip_layer_guidance_scale=None, skip_layer_guidance_stop=None, skip_layer_guidance_start=None, mu=None,
             sigmas=None, **unsupported):
    """``StableDiffusion3Pipeline.__call__`` through the fused loop of ``acc`` (custom ``sigmas`` give the step
    count, as the pipeline's ``retrieve_timesteps``)."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput

    arguments = dict(locals())  # the prompt arguments, passed on by name (sd3_prompts)
    pipe = acc.pipe
    given = dict(zip(_SKIP_LAYER_GUIDANCE, (skip_guidance_layers, skip_layer_guidance_scale,
                                            skip_layer_guidance_stop, skip_layer_guidance_start)))
    # the skip-layer knobs at the pipeline's defaults do nothing without skip_guidance_layers: accepted
    unsupported.update({k: v for k, v in given.items() if v is not None and v != _default(pipe, k, None)})
    reject_flow_call(unsupported, joint_attention_kwargs)
    steps = _steps(pipe, num_inference_steps, 28)
    w = guidance_scale if guidance_scale is not None else _default(pipe, "guidance_scale", 7.0)
    max_len = max_sequence_length or _default(pipe, "max_sequence_length", 256)
    height = height or pipe.default_sample_size * pipe.vae_scale_factor
    width = width or pipe.default_sample_size * pipe.vae_scale_factor
    pipe.check_inputs(prompt, prompt_2, prompt_3, height, width, negative_prompt=negative_prompt,
                      negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3,
                      prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                      pooled_prompt_embeds=pooled_prompt_embeds,
                      negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, max_sequence_length=max_len)
    batch = _prompt_batch(prompt, prompt_embeds)
    device = pipe._execution_device
    cfg = w > 1  # the pipeline's do_classifier_free_guidance
    extra = sd3_prompts(pipe, cfg, num_images_per_prompt, max_len, clip_skip, joint_attention_kwargs, arguments)
    latents = pipe.prepare_latents(batch * num_images_per_prompt, pipe.transformer.config.in_channels, height, width,
                                   extra["encoder_hidden_states"].dtype, device, generator, latents)
    if pipe.scheduler.config.get("use_dynamic_shifting", None) and mu is None:
        mu = sd3_mu(pipe, latents.shape[2], latents.shape[3])
    _, spec = acc._schedule(steps, mu=mu, sigmas=sigmas)
    image = flow_images(pipe, acc._run_flow(spec, latents, generator, w if cfg else 1.0, extra), output_type)
    pipe.maybe_free_model_hooks()
    return StableDiffusion3PipelineOutput(images=image) if return_dict else (image,)


def reject_flow_call(unsupported: dict, joint_attention_kwargs) -> None:
    """Raise for the given arguments of ``unsupported`` and for attention-processor options other than a LoRA
    ``scale`` in ``joint_attention_kwargs`` (unknown effects on the loop)."""
    if set(joint_attention_kwargs or {}) - {"scale"}:
        unsupported["joint_attention_kwargs"] = joint_attention_kwargs
    _reject(unsupported)


# encode_prompt's prompt arguments, which the SD3 handlers take under the same names
SD3_PROMPTS = ("prompt", "prompt_2", "prompt_3", "negative_prompt", "negative_prompt_2", "negative_prompt_3",
               "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")


def sd3_prompts(pipe, cfg: bool, num_images_per_prompt, max_len, clip_skip, joint_attention_kwargs, arguments: dict):
    """The transformer's extra args from the pipeline's ``encode_prompt`` of the :data:`SD3_PROMPTS` in
    ``arguments`` (a handler's call arguments): the (pooled) embeddings, with ``cfg`` the negatives as the guidance
    batch's unconditional half, and ``joint_attention_kwargs`` (its LoRA scale also goes to the text encoders)."""
    embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
        **{name: arguments[name] for name in SD3_PROMPTS}, do_classifier_free_guidance=cfg,
        device=pipe._execution_device, clip_skip=clip_skip, num_images_per_prompt=num_images_per_prompt,
        max_sequence_length=max_len,
        lora_scale=(joint_attention_kwargs or {}).get("scale"))
    extra = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
    if cfg:
        extra.update(uncond_encoder_hidden_states=negative_embeds, uncond_pooled_projections=negative_pooled)
    if joint_attention_kwargs is not None:
        extra["joint_attention_kwargs"] = joint_attention_kwargs
    return extra


def flow_images(pipe, latents, output_type: str, unpack=None):
    """The pipeline's output from the loop's final latents: as they are ("latent"), else (after ``unpack``, Flux's
    ``_unpack_latents``) ``latents/scaling_factor + shift_factor`` decoded by the VAE and postprocessed."""
    if output_type == "latent":
        return latents
    if unpack is not None:
        latents = unpack(latents)
    latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    image = pipe.vae.decode(latents, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type=output_type)


def check_image_processor(pipe, who: str) -> None:
    """Raise unless the pipeline postprocesses with the VaeImageProcessor that :func:`flow_images` calls."""
    from diffusers.image_processor import VaeImageProcessor

    processor = type(getattr(pipe, "image_processor", None))
    if processor is not VaeImageProcessor:
        raise TypeError(f"accelerate: unsupported pipeline {who}: its image_processor is a {processor.__name__}, "
                        "not the VaeImageProcessor whose postprocessing the fused loop reproduces")


def transformer_kind(pipe, who: str) -> str:
    """"sd3" for a ``StableDiffusion3Pipeline`` (an ``SD3Transformer2DModel``, ``encode_prompt``, a VAE and
    ``StableDiffusion3Pipeline``'s call arguments), "sd3_img2img" for its img2img pipeline
    (:mod:`.accelerate_flow_img2img`), "flux"/"flux_img2img" for Flux's (:func:`.accelerate_flux.flux_kind`);
    raises TypeError naming what the fused loop cannot run."""
    from diffusers import SD3Transformer2DModel

    from .accelerate_flow_img2img import img2img_handler

    transformer = uncompiled(pipe.transformer)  # (torch.compile's wrapper: its module is checked)
    if type(pipe).__name__.startswith("Flux") or type(transformer).__name__.startswith("Flux"):
        from .accelerate_flux import flux_kind
        return flux_kind(pipe, who)
    if not (isinstance(transformer, SD3Transformer2DModel) and hasattr(pipe, "encode_prompt")
            and getattr(pipe, "vae", None) is not None and getattr(pipe, "scheduler", None) is not None):
        raise TypeError(f"accelerate: unsupported pipeline {who} with a {type(transformer).__name__}: expected a "
                        "StableDiffusion3Pipeline (an SD3Transformer2DModel, encode_prompt, a vae and a scheduler)")
    kind, handler = img2img_handler(pipe) or ("sd3", call_sd3)  # StableDiffusion3Img2ImgPipeline: "sd3_img2img"
    _check_call_arguments(pipe, who, handler)
    check_image_processor(pipe, who)
    return kind
