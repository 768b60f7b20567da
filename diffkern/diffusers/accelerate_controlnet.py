"""Level 2 for ``StableDiffusionControlNetPipeline`` (one ``ControlNetModel`` or a ``MultiControlNetModel`` of
them): its denoising loop runs in diffkern (:class:`diffkern.diffusers.accelerate.AcceleratedPipeline` dispatches
here).

Each model call of the fused loop is the pipeline's: the ControlNet(s) on the UNet's scaled latents, timestep and
text embeddings with the control image(s), then the UNet with the residuals added (:class:`ControlNetDenoiser`).
With CFG the denoiser's batch is ``[uncond; cond]`` and the control image is stacked twice, as the pipeline stacks
it; in guess mode (``guess_mode=True`` or a ControlNet with ``global_pool_conditions``) the ControlNet sees the
conditional half only and the unconditional half gets zero residuals, as in the pipeline.

The conditioning scale of each call is table data: the pipeline multiplies ``controlnet_conditioning_scale`` by a
keep factor per loop iteration, 1 while ``control_guidance_start <= i/n`` and ``(i+1)/n <= control_guidance_end``
(n: the length of the pipeline's timesteps, one per model call), else 0. The denoiser holds these products in a
device buffer (one row per model call, one column per ControlNet) and counts its calls on the device, so a
CUDA-graph replay takes new scales, windows and control images without a host sync. A window other than [0, 1]
needs the fused loop to make the pipeline's model calls in its order (the scheduler's own method, as many calls as
timesteps); otherwise it is refused by name. Everything outside the loop is the pipeline's own code:
``check_inputs``, ``encode_prompt``, ``prepare_image``, the initial latents, the VAE decode and safety checker.
``StableDiffusionXLControlNetPipeline`` (:mod:`.accelerate_sdxl_controlnet`) shares the denoiser and the helpers
(:func:`conditioning_scales`, :func:`control_images`, :func:`control_table`, :func:`control_run`).
"""
from __future__ import annotations

import dataclasses

import torch

from .accelerate import ScheduleDenoiser, _default, _steps, _reject
from .accelerate_img2img import check_plain_sd
from .accelerate_text2img import _initial_latents, _prompt_batch, _sd_images, sd_encode, sd_output, unet_extra


class ControlNetDenoiser(ScheduleDenoiser):
    """:class:`~.accelerate.ScheduleDenoiser` of a UNet with a ``controlnet`` (a ``ControlNetModel`` or a
    ``MultiControlNetModel``). Extra arg ``controlnet_cond``: the control image(s), (B, 3, H, W) in the ControlNet's
    dtype (a list of them, one per net, for a MultiControlNetModel); ``cross_attention_kwargs`` reach the UNet only
    (as in the pipeline), SDXL's ``added_cond_kwargs`` both (the nets get the conditional half in guess mode, as in
    ``StableDiffusionXLControlNetPipeline``). ``control_scale`` (calls, nets) float64 holds the conditioning scale of
    each model call (:meth:`set_control`), ``control_k`` counts the calls (zeroed by :meth:`restart`)."""

    def __init__(self, *args, controlnet, calls: int, nets: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.controlnet = controlnet
        self.multi = type(controlnet).__name__ == "MultiControlNetModel"
        self.guess_mode = False  # a plain attribute: part of a capture's key (it changes the batch of the call)
        self.register_buffer("control_scale", torch.ones(calls, nets, dtype=torch.float64), persistent=False)
        self.register_buffer("control_k", torch.zeros(1, dtype=torch.int64), persistent=False)

    def set_control(self, scales: torch.Tensor, guess_mode: bool) -> None:
        """The next loop's (calls, nets) float64 conditioning scales (a copy ordered before a replay) and mode."""
        if tuple(scales.shape) != tuple(self.control_scale.shape):
            raise ValueError(f"scales: expected shape {tuple(self.control_scale.shape)}, got {tuple(scales.shape)}")
        self.control_scale.copy_(scales)
        self.guess_mode = bool(guess_mode)

    def restart(self) -> None:
        super().restart()
        self.control_k.zero_()

    def call_model(self, x_in, t, controlnet_cond=None, cross_attention_kwargs=None, **extra):
        if controlnet_cond is None or "encoder_hidden_states" not in extra:
            raise ValueError("ControlNetDenoiser: expected the extra args controlnet_cond and encoder_hidden_states")
        dtype = self.controlnet.dtype
        row = self.control_scale.index_select(0, self.control_k)[0]
        self.control_k.add_(1).remainder_(self.control_scale.shape[0])
        scales = list(row.to(torch.promote_types(dtype, torch.float32)).unbind())  # 0-d device tensors
        x_c, t_c, text, image = x_in, t, extra["encoder_hidden_states"], controlnet_cond
        added = extra.get("added_cond_kwargs")  # SDXL's pooled embeddings and time ids (None in SD)
        half = self.guess_mode and self.guidance_scale != 1.0  # the CFG batch: ControlNet on the cond half only
        if half:
            b = x_in.shape[0] // 2
            x_c, t_c, text = x_c[b:], t_c[b:], text[b:]
            image = [i[b:] for i in image] if self.multi else image[b:]
            added = None if added is None else {k: v[b:] for k, v in added.items()}
        x_c, down, mid = x_c.to(dtype), None, None
        for net, img, scale in zip(self.controlnet.nets if self.multi else [self.controlnet],
                                   image if self.multi else [image], scales):
            d, m = self._residuals(net, x_c, t_c, text, img, scale, added)
            # MultiControlNetModel's sum, in its order
            down, mid = (d, m) if down is None else ([p + c for p, c in zip(down, d)], mid + m)
        if half:
            down = [torch.cat([torch.zeros_like(d), d]) for d in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        if cross_attention_kwargs is not None:
            extra["cross_attention_kwargs"] = cross_attention_kwargs
        return super().call_model(x_in, t, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                                  **extra)

    def _residuals(self, net, x, t, text, image, scale, added=None):
        """One ControlNetModel's residuals times ``scale`` (a 0-d device tensor), rounded as the pipeline's Python
        float scale rounds them: the product in float32 (the opmath of a 16-bit multiply by a Python scalar), then
        once to the residuals' dtype. A 16-bit net given the tensor as its ``conditioning_scale`` would, on a GPU,
        load it as an ordinary 16-bit operand and round it first (0.7 -> 0.69921875 in bfloat16: every residual
        biased by -1.1e-3), so it gets 1.0 and the product is made here. A float32 or float64 net multiplies by the
        tensor exactly as by the float. In guess mode the net multiplies by its own device tensor of scales (logspace
        times the scale, in the pipeline too), and a pooled net averages after scaling: the net scales there."""
        own = not self.guess_mode and net.dtype in (torch.float16, torch.bfloat16)
        down, mid = net(x, t, encoder_hidden_states=text, controlnet_cond=image,
                        conditioning_scale=1.0 if own else scale, guess_mode=self.guess_mode,
                        added_cond_kwargs=added, return_dict=False)
        if own:
            down = [(d.float() * scale).to(d.dtype) for d in down]
            mid = (mid.float() * scale).to(mid.dtype)
        return down, mid


@dataclasses.dataclass(frozen=True)
class _Factory:
    """Builds a :class:`ControlNetDenoiser` as :meth:`AcceleratedPipeline._run` builds its denoiser; hashable by the
    ControlNet's identity and the table shape, so it keys the model wrapper (and a capture) like a class does."""

    controlnet: torch.nn.Module
    calls: int
    nets: int

    def __call__(self, *args, **kwargs) -> ControlNetDenoiser:
        return ControlNetDenoiser(*args, controlnet=self.controlnet, calls=self.calls, nets=self.nets, **kwargs)


def _nets(pipe, who: str) -> list:
    """The pipeline's ControlNetModels (one, or a MultiControlNetModel's); raises TypeError naming another kind."""
    from diffusers import ControlNetModel
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    controlnet = pipe.controlnet
    nets = controlnet.nets if isinstance(controlnet, MultiControlNetModel) else [controlnet]
    for net in nets:
        if type(net) is not ControlNetModel:  # ControlNetUnionModel, a compiled module, ...
            raise TypeError(f"accelerate: unsupported pipeline {who} with a {type(net).__name__}: the fused loop "
                            "runs ControlNetModel (one, or a MultiControlNetModel of them)")
    return list(nets)


def _window(start, end, nets: int) -> tuple[list, list]:
    """``control_guidance_start``/``_end`` as the pipeline aligns them: a float beside a list is repeated to its
    length, two floats to one per net."""
    if not isinstance(start, list) and isinstance(end, list):
        start = len(end) * [start]
    elif not isinstance(end, list) and isinstance(start, list):
        end = len(start) * [end]
    elif not isinstance(start, list) and not isinstance(end, list):
        start, end = nets * [start], nets * [end]
    return start, end


def _fused_calls(acc, spec):
    """The number of model calls of the fused loop, or None when it runs another method than the scheduler's
    (whose calls are not the pipeline's iterations)."""
    from .. import sampler_plans
    from ..sampling import host_plan

    if acc.method is not None or spec.method not in sampler_plans.PLANS:
        return None
    plan = host_plan(spec.method, spec.knobs, spec.sigmas)
    return plan.steps + sum(plan.corrector)


def _scale_table(scales, starts, ends, calls: int) -> torch.Tensor:
    """(calls, nets) float64: the pipeline's ``conditioning_scale * keep`` of each loop iteration."""
    keep = [[1.0 - float(i / calls < s or (i + 1) / calls > e) for s, e in zip(starts, ends)] for i in range(calls)]
    return torch.tensor([[c * k for c, k in zip(scales, row)] for row in keep], dtype=torch.float64)


def conditioning_scales(value, starts, nets: int) -> list[float]:
    """``controlnet_conditioning_scale`` as one float per net (a float repeated, as the pipeline repeats it for a
    MultiControlNetModel); raises naming the arguments unless it and the aligned ``starts`` have one per net."""
    scales = [float(s) for s in value] if isinstance(value, (list, tuple)) else [float(value)] * nets
    if len(scales) != nets or len(starts) != nets:
        raise ValueError(f"controlnet_conditioning_scale, control_guidance_start: expected one value per ControlNet "
                         f"({nets}), got {value!r} and {starts!r}")
    return scales


def control_images(pipe, image, multi: bool, n: int, num_images_per_prompt: int, width, height, device,
                   guess: bool) -> list:
    """The pipeline's ``prepare_image`` of each net's control image (a list of one for a single ControlNet), without
    the CFG duplication: the fused wrapper stacks the batch halves itself."""
    return [pipe.prepare_image(image=i, width=width, height=height, batch_size=n,
                               num_images_per_prompt=num_images_per_prompt, device=device,
                               dtype=pipe.controlnet.dtype, do_classifier_free_guidance=False, guess_mode=guess)
            for i in (image if multi else [image])]


def control_table(acc, spec, scales, starts, ends, calls: int, ran: int | None = None) -> torch.Tensor:
    """(calls, nets) float64 conditioning scale of each model call (:func:`_scale_table`): ``calls`` the length of the
    pipeline's timesteps (its keep factors count them), ``ran`` the iterations its loop runs (fewer with SDXL's
    ``denoising_end``; default ``calls``). Raises naming the window when it switches a net within the loop and the
    fused loop's model calls are not the pipeline's first iterations."""
    table = _scale_table(scales, starts, ends, calls)
    ran = calls if ran is None else ran
    if (table[:ran] != table[:1]).any():
        fused = _fused_calls(acc, spec)
        # Fewer fused calls: the loop spec dropped identity steps at the end (a last step from a sigma to itself, as
        # DDIM's to alpha-bar(0) without set_alpha_to_one), where the output does not depend on the model; call k is
        # still iteration k before them.
        if fused is None or fused > ran:
            why = (f"method={acc.method!r} replaces the scheduler's loop" if acc.method is not None else
                   f"the fused loop makes {fused} model calls where the pipeline makes {ran}")
            raise ValueError(f"control_guidance_start/control_guidance_end: a window other than [0, 1] ({starts}, "
                             f"{ends}) switches the ControlNet per pipeline iteration, and {why}")
    return table


def control_run(acc, ours, spec, latents, generator, guidance_scale: float, extra: dict, table, guess: bool):
    """:meth:`AcceleratedPipeline._run` with a :class:`ControlNetDenoiser` of the pipeline's ControlNet, its
    per-call scales ``table`` and guess mode written before the loop."""
    return acc._run(ours, spec, latents, generator, guidance_scale=guidance_scale, extra=extra,
                    denoiser=_Factory(acc.pipe.controlnet, *table.shape),
                    prepare=lambda model: model.set_control(table, guess))


def call_sd_controlnet(acc, prompt=None, image=None, height=None, width=None, num_inference_steps=None,
                       guidance_scale=None, negative_prompt=None, num_images_per_prompt=1, eta=None, generator=None,
                       latents=None, prompt_embeds=None, negative_prompt_embeds=None, output_type="pil",
                       return_dict=True, cross_attention_kwargs=None, controlnet_conditioning_scale=1.0,
                       guess_mode=False, control_guidance_start=0.0, control_guidance_end=1.0, clip_skip=None,
                       **unsupported):
    """``StableDiffusionControlNetPipeline.__call__`` through the fused loop of ``acc``: ``image`` the control
    image (a list of them, one per net, for a MultiControlNetModel), ``controlnet_conditioning_scale`` a float (or
    a list per net), ``control_guidance_start``/``_end`` the fractions of the loop the ControlNet acts on."""
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
    _reject(unsupported)
    pipe, who = acc.pipe, type(acc.pipe).__name__
    unet, controlnet = pipe.unet, pipe.controlnet
    nets = _nets(pipe, who)  # the ControlNet may have been swapped since accelerate()
    multi = isinstance(controlnet, MultiControlNetModel)
    steps = _steps(pipe, num_inference_steps, 50)
    w = guidance_scale if guidance_scale is not None else _default(pipe, "guidance_scale", 7.5)
    starts, ends = _window(control_guidance_start, control_guidance_end, len(nets))
    pipe.check_inputs(prompt, image, None, negative_prompt, prompt_embeds, negative_prompt_embeds, None, None,
                      controlnet_conditioning_scale, starts, ends, None)
    scales = conditioning_scales(controlnet_conditioning_scale, starts, len(nets))
    guess = bool(guess_mode or nets[0].config.global_pool_conditions)
    batch = _prompt_batch(prompt, prompt_embeds)
    n = batch * num_images_per_prompt
    device = pipe._execution_device
    cfg = w > 1
    prompt_embeds, negative_prompt_embeds = sd_encode(pipe, prompt, device, num_images_per_prompt, cfg, negative_prompt,
                                                      prompt_embeds, negative_prompt_embeds, cross_attention_kwargs,
                                                      clip_skip)
    if multi and isinstance(image[0], list):  # [[canny_1, pose_1], [canny_2, pose_2]]: one list per net
        image = [list(images) for images in zip(*image)]
    images = control_images(pipe, image, multi, n, num_images_per_prompt, width, height, device, guess)
    height, width = images[0].shape[-2:]
    ours, spec = acc._schedule(steps, eta)
    pipe.scheduler.set_timesteps(steps, device=device)  # the pipeline's keep factors count its timesteps
    table = control_table(acc, spec, scales, starts, ends, len(pipe.scheduler.timesteps))
    shape = (n, unet.config.in_channels, int(height) // pipe.vae_scale_factor, int(width) // pipe.vae_scale_factor)
    latents = _initial_latents(ours, shape, generator, device, prompt_embeds.dtype, latents)
    cond = {"encoder_hidden_states": prompt_embeds, "controlnet_cond": images if multi else images[0]}
    extra = unet_extra(cond, {"encoder_hidden_states": negative_prompt_embeds} if cfg else None, cross_attention_kwargs)
    latents = control_run(acc, ours, spec, latents, generator, w if cfg else 1.0, extra, table, guess)
    image, nsfw = _sd_images(pipe, latents, output_type, device, prompt_embeds.dtype, generator)
    return sd_output(pipe, image, nsfw, return_dict)


CALLS = {"controlnet": call_sd_controlnet}  # AcceleratedPipeline.__call__'s handler of the kind below


def controlnet_kind(pipe, who: str, unet):
    """"controlnet" for a ``StableDiffusionControlNetPipeline`` the fused loop runs ("sdxl_controlnet" for a
    ``StableDiffusionXLControlNetPipeline``: :mod:`.accelerate_sdxl_controlnet`), None for pipelines without a
    ControlNet; raises TypeError naming what it cannot run (other ControlNet pipelines: img2img, inpainting, ...;
    ControlNet kinds other than ``ControlNetModel``; added conditioning or guidance-embedding UNets; other
    ``__call__`` arguments or image processors)."""
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

    if getattr(pipe, "controlnet", None) is None:
        return None
    if type(pipe) is StableDiffusionXLControlNetPipeline:
        from .accelerate_sdxl_controlnet import sdxl_controlnet_kind  # (imports this module)
        return sdxl_controlnet_kind(pipe, who, unet)
    if type(pipe) is not StableDiffusionControlNetPipeline:
        raise TypeError(f"accelerate: unsupported pipeline {who}: the fused ControlNet loop runs "
                        "StableDiffusionControlNetPipeline only (text-to-image with an SD UNet; SDXL: "
                        "StableDiffusionXLControlNetPipeline); run this pipeline with a diffkern.diffusers scheduler "
                        "(Level 1) instead")
    _nets(pipe, who)
    check_plain_sd(pipe, who, unet, "ControlNet loop runs a plain text-conditioned UNet", call_sd_controlnet,
                   ("image_processor", "control_image_processor"))
    return "controlnet"
