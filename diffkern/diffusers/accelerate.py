"""Level 2: run the whole denoising loop of a diffusers pipeline in diffkern.

:func:`accelerate` wraps an unconditional ``UNet2DModel`` pipeline (``DDPMPipeline``, ``DDIMPipeline``, ...) or a
text-to-image ``UNet2DConditionModel`` pipeline with ``encode_prompt`` and a VAE (``StableDiffusionPipeline``, and
``StableDiffusionXLPipeline`` with its pooled text embeddings and ``add_time_ids``: :mod:`.accelerate_text2img`).
Its ``__call__`` keeps the pipeline's prompt encoding, initial latents and decoding, and replaces the loop
``for t: unet -> CFG -> scheduler.step`` by one :func:`diffkern.sampling.sample` call (or
:func:`diffkern.sampling.sample_iadb`): the pipeline's scheduler becomes a VE sigma schedule plus a sampler
method, the UNet a :class:`diffkern.wrappers.DiffusersUNetDenoiser` fed the scheduler's own timesteps, and CFG
happens inside the fused step (one batched UNet call on ``[uncond; cond]``, as the pipeline does).

Equivalences used (``math-samplers.md`` 5-7): DDIM(eta) = Euler-ancestral(eta) in VE coordinates (eta = 0:
Euler), DDPM ("fixed_small") = DDIM(eta = 1), DPM-Solver++(2M) = k-diffusion's ``dpmpp_2m``, DPM-Solver++ with
``solver_order=3`` (or a first-order last step) = ``dpmsolver_3m`` (diffusers' orders per step,
:mod:`diffkern.diffusers.loop_spec`), LCM = ``lcm`` (``x' = D + sigma'*xi``) on the denoiser with LCM's boundary
condition at each step's timestep as its conversion (:meth:`ScheduleDenoiser.conversion`: table data, no host sync).
Deterministic schedulers give the pipeline's images at float32 tolerance for the same generator (only the initial
latents are random). Stochastic ones draw their per-step noise from diffkern's Philox stream keyed by a seed taken
from the generator, so images are reproducible per seed but not equal to diffusers' (which draws each step's noise
from the generator).
"""
from __future__ import annotations

import inspect
import math
import warnings

import torch
from diffusers.utils.torch_utils import randn_tensor

from .. import graphs
from ..ops import backend_status
from .accelerate_args import _default, _keywords, _steps, numpy_images, uncompiled  # noqa: F401 (re-exported)
from .accelerate_args import _REFUSED_IF_GIVEN, _check_call_arguments, _reject  # noqa: F401 (re-exported)
from .loop_spec import decreasing_prefix, diffkern_scheduler, loop_spec
from .schedule_denoiser import AlphaUNet, ScheduleDenoiser

_MAX_MODELS = 8  # model wrappers (one per schedule) kept by an AcceleratedPipeline


def _stochastic(method: str, knobs: dict, sigmas) -> bool:
    """Whether ``method`` with ``knobs`` on ``sigmas`` draws noise (a row of its plan has a noise coefficient: so
    it needs a seed), read from the plan itself, so every sampler's knobs (eta, s_churn, s_noise, tau, ...) count."""
    from ..ops import coefs
    from ..sampling import host_plan

    if method == "iadb":
        return knobs["variant"] == "stochastic"
    return bool((host_plan(method, knobs, sigmas).table[:, coefs.S] != 0).any())


def _seed(generator, batch: int):
    """Philox seed(s) for stochastic methods: from the generator(s) (one per sample for a list), else None
    (drawn from torch's global generator by the sampler)."""
    def draw(g):
        return int(torch.randint(0, 2 ** 62, (1,), generator=g, device=g.device))  # once, before the loop
    if generator is None:
        return None
    if isinstance(generator, list):
        if len(generator) != batch:
            raise ValueError(f"generator: a list of {len(generator)} generators for a batch of {batch}")
        return torch.tensor([draw(g) for g in generator], dtype=torch.int64)
    return draw(generator)


class AcceleratedPipeline:
    """A pipeline whose denoising loop runs in diffkern; other attributes forward to the wrapped pipeline."""

    def __init__(self, pipe, method, backend, graph, progress, knobs, kind):
        self.__dict__.update(pipe=pipe, method=method, backend=backend, graph=graph, progress=progress,
                             knobs=dict(knobs), kind=kind)

    def __getattr__(self, name):
        if "pipe" not in self.__dict__:  # an instance being copied or unpickled: nothing to forward to yet
            raise AttributeError(name)
        return getattr(self.__dict__["pipe"], name)

    def __setattr__(self, name, value):
        """Own settings (method, graph, ...) and methods stay here; any other attribute is set on the wrapped
        pipeline, as its reads forward there: ``fast.scheduler = ...`` must change the scheduler the loop reads."""
        if name in self.__dict__ or hasattr(type(self), name):
            self.__dict__[name] = value
        else:
            setattr(self.pipe, name, value)

    def __getstate__(self) -> dict:
        """A copy shares no model wrappers: their cache keys hold the identity of this pipeline's networks."""
        state = dict(self.__dict__)
        state.pop("_models", None)
        return state

    def to(self, *args, **kwargs) -> "AcceleratedPipeline":
        """Move the wrapped pipeline (``pipe.to``); returns this accelerated pipeline."""
        self.pipe.to(*args, **kwargs)
        return self

    def __repr__(self) -> str:
        return (f"AcceleratedPipeline({type(self.pipe).__name__}, kind={self.kind!r}, method={self.method!r}, "
                f"backend={self.backend!r}, graph={self.graph!r})")

    def _schedule(self, num_inference_steps, eta=None, clipped=False):
        """(diffkern scheduler after set_timesteps, its LoopSpec) for the pipeline's current scheduler; ``eta``
        None: the pipeline's default (0 where its ``__call__`` takes none); ``clipped``: DDIM's
        use_clipped_model_output."""
        ours = diffkern_scheduler(self.pipe.scheduler)
        ours.set_timesteps(num_inference_steps)
        spec = loop_spec(ours, eta if eta is not None else _default(self.pipe, "eta", 0.0), bool(clipped))
        if spec.flow:  # a velocity network and no init_noise_sigma: the UNet pipelines cannot run it either
            raise ValueError(f"accelerate: {type(ours).__name__} runs in flow-matching transformer pipelines only")
        return ours, spec

    def _graph_mode(self, device: torch.device):
        """What ``graph`` means for this call: CUDA-graph capture only for CUDA tensors."""
        if self.graph is True:
            return True
        return "auto" if self.graph == "auto" and device.type == "cuda" else False

    def _model(self, key, build):
        """One model wrapper per schedule, reused across calls: a CUDA-graph capture is keyed by model identity."""
        models = self.__dict__.setdefault("_models", {})
        if key not in models:
            if len(models) >= _MAX_MODELS:
                models.pop(next(iter(models)))
            models[key] = build()
        return models[key]

    def _run(self, ours, spec, latents, generator, guidance_scale=1.0, extra=None, guidance_rescale=0.0,
             denoiser=None, prepare=None, network=None):
        """The loop: initial latents (already times init_noise_sigma) -> final latents, in latents' dtype.
        ``guidance_rescale`` (with CFG): :class:`~.accelerate_text2img.RescaledCFGDenoiser`. ``denoiser``: a
        :class:`ScheduleDenoiser` subclass (or a hashable factory of one: it is part of the model's key) to wrap the
        UNet with instead (inpainting's input channels, ControlNet; with rescale only one that has ``set_guidance``,
        as :class:`~.accelerate_text2img.RescaledCFGDenoiser`). ``prepare(model)``: called before
        the loop, for a denoiser's per-call device data (ControlNet's conditioning scales). ``network``: the
        denoising network to wrap (default the pipeline's UNet; PixArt's transformer)."""
        from ..sampling import sample, sample_iadb

        if self.method is not None and spec.method == "iadb":
            raise ValueError(f"method: {self.method!r} cannot run an IADBScheduler pipeline (IADB has its own loop); "
                             "use accelerate(pipe) without method=")
        method = self.method or spec.method
        knobs = dict(spec.knobs if self.method is None else {}, **self.knobs)
        if "clip_denoised" in spec.knobs and "clip_denoised" not in knobs:  # another method would drop the clip
            raise ValueError(f"method: {method!r} does not clip x0 as {type(ours).__name__}'s clip_sample=True does; "
                             "pass clip_denoised= (euler_ancestral, ge) or use clip_sample=False")
        # deterministic loops touch neither the generator nor torch's global generator; DPMSolverSDE's noise is
        # keyed by its noise_sampler_seed when set (diffusers' Brownian tree is), else by the generator
        fixed = ours._option("noise_sampler_seed", None) if method == spec.method else None  # its own key only
        seed = 0
        if _stochastic(method, knobs, spec.sigmas):
            seed = int(fixed) if fixed is not None else _seed(generator, latents.shape[0])
        graph = self._graph_mode(latents.device)
        if method == "iadb":
            if extra:  # sample_iadb's model(x_alpha, alpha) takes no conditioning, hence no CFG either
                raise ValueError(f"accelerate: IADBScheduler in the text-to-image {type(self.pipe).__name__} is not "
                                 "supported by the fused loop (the IADB loop runs unconditional pipelines only); "
                                 "run the pipeline with diffkern.diffusers.IADBScheduler as its scheduler instead")
            model = self._model(("iadb", id(self.pipe.unet), ours.config.timestep_scale),
                                lambda: AlphaUNet(self.pipe.unet, ours.config.timestep_scale))
            out = sample_iadb(model, latents, spec.sigmas, knobs["variant"], lam=knobs["lam"], backend=self.backend,
                              seed=seed, progress=self.progress, graph=graph)
            return out.to(latents.dtype)
        pred = "sample" if ours.config.prediction_type == "original_sample" else ours.config.prediction_type
        calls = spec.call_timesteps if method == spec.method else None  # another method calls at other sigmas
        rescale = float(guidance_rescale) if guidance_scale != 1.0 else 0.0  # the pipelines' rule: with CFG only
        net = self.pipe.unet if network is None else network
        key = (id(net), type(ours).__name__, tuple(spec.sigmas), tuple(spec.timesteps), pred,
               guidance_scale != 1.0, latents.device, calls is not None, rescale != 0, spec.boundary, denoiser,
               spec.edm)
        if spec.edm is not None:  # EDM preconditioning: no training table; sigma_data takes the table's place
            from .edm_denoiser import edm_denoiser
            cls = edm_denoiser(type(self.pipe).__name__, type(ours).__name__, denoiser, rescale)
        elif rescale:
            if denoiser is not None and not hasattr(denoiser, "set_guidance"):  # a handler's wrapper without rescale
                raise ValueError(f"guidance_rescale: not supported by the fused loop of {type(self.pipe).__name__}")
            from .accelerate_text2img import RescaledCFGDenoiser
            cls = denoiser or RescaledCFGDenoiser
        else:
            cls = denoiser or ScheduleDenoiser
        # LCM: every method runs on the boundary-conditioned denoiser (the consistency function), as the model is one
        table = decreasing_prefix(ours.alphas_cumprod) if spec.edm is None else spec.edm
        model = self._model(key, lambda: cls(net, table, pred, spec.sigmas[:-1], spec.timesteps,
                                             call_timesteps=calls,
                                             timestep_scaling=spec.boundary).to(latents.device))
        # the device writes below (guidance, ControlNet scales, the call counter) wait for the previous replay,
        # which may still be running on another stream
        graphs.order_after_last_replay(latents.device)
        if rescale:
            model.set_guidance(guidance_scale, rescale)  # device data: a captured loop stays valid
        else:
            model.guidance_scale = float(guidance_scale)  # a table value: a captured loop stays valid
        if prepare is not None:
            prepare(model)
        model.restart()
        x = latents if latents.dtype == torch.float64 else latents.to(torch.float32)  # the state stays >= float32
        if spec.vp:
            x = x * math.sqrt(spec.sigmas[0] ** 2 + 1.0)
        out = sample(model, x, spec.sigmas, method, backend=self.backend, seed=seed, progress=self.progress,
                     extra_args=extra, graph=graph, window=spec.window, **knobs)
        if spec.vp:
            out = out / math.sqrt(spec.sigmas[-1] ** 2 + 1.0)
        return out.to(latents.dtype)

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        """The wrapped pipeline's call with its usual arguments (``num_inference_steps``, ``generator``,
        ``output_type``, ``return_dict``, ``eta``; text-to-image: ``prompt``, ``negative_prompt``,
        ``guidance_scale``, ``num_images_per_prompt``, ``height``, ``width``, ``latents``, ``prompt_embeds``,
        ``negative_prompt_embeds``, ``cross_attention_kwargs``, ``guidance_rescale``, ``clip_skip``; SDXL also
        ``prompt_2``, ``negative_prompt_2``, the pooled embeddings and the ``add_time_ids`` sizes). Per-step hooks
        and schedule overrides (callbacks, custom timesteps/sigmas but for the LCM pipeline's timesteps,
        IP-adapters) raise. img2img and inpainting: :mod:`.accelerate_img2img`, :mod:`.accelerate_sdxl_img2img`,
        :mod:`.accelerate_inpaint`, :mod:`.accelerate_sdxl_inpaint`, :mod:`.accelerate_controlnet`,
        :mod:`.accelerate_sdxl_controlnet`."""
        kwargs = _keywords(self.pipe, args, kwargs)  # positional arguments as the pipeline binds them
        if self.kind == "unconditional":
            if kwargs.get("prompt") is not None:
                raise TypeError("prompt: this is an unconditional pipeline")
            return self._call_unconditional(**kwargs)
        from . import accelerate_img2img as img2img, accelerate_inpaint as inpaint, accelerate_text2img as text2img
        from . import accelerate_controlnet as controlnet, accelerate_sdxl_img2img as sdxl_img2img
        from . import accelerate_sdxl_controlnet as sdxl_controlnet, accelerate_sdxl_inpaint as sdxl_inpaint

        call = {"sdxl": text2img.call_sdxl, "lcm": text2img.call_lcm, **img2img.CALLS, **sdxl_img2img.CALLS,
                **inpaint.CALLS, **controlnet.CALLS, **sdxl_controlnet.CALLS,
                **sdxl_inpaint.CALLS}.get(self.kind, text2img.call_sd)
        return call(self, **kwargs)

    def _call_unconditional(self, batch_size=1, generator=None, num_inference_steps=None, eta=None,
                            use_clipped_model_output=None, output_type="pil", return_dict=True, **unsupported):
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

        _reject(unsupported)
        pipe = self.pipe
        for name, value in (("eta", eta), ("use_clipped_model_output", use_clipped_model_output)):
            if value is not None and name not in inspect.signature(type(pipe).__call__).parameters:
                # (DDPMPipeline takes neither: the stock call raises this TypeError)
                raise TypeError(f"{type(pipe).__name__}.__call__() got an unexpected keyword argument '{name}'")
        for name, value in (("eta", eta), ("use_clipped_model_output", use_clipped_model_output)):
            # DDIMPipeline hands both to step(), which raises in the stock loop: the fused loop would drop them
            if value is not None and name not in inspect.signature(type(pipe.scheduler).step).parameters:
                raise TypeError(f"{name}: {type(pipe.scheduler).__name__}.step() takes no {name} (DDIMScheduler's "
                                "does)")
        steps = _steps(pipe, num_inference_steps, 1000)
        size = pipe.unet.config.sample_size
        shape = (batch_size, pipe.unet.config.in_channels, *((size, size) if isinstance(size, int) else size))
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"generator: a list of {len(generator)} generators for batch_size={batch_size}")
        ours, spec = self._schedule(steps, eta, use_clipped_model_output)
        self._warn_unscaled(ours)
        image = randn_tensor(shape, generator=generator, device=pipe._execution_device, dtype=pipe.unet.dtype)
        image = self._run(ours, spec, image * float(ours.init_noise_sigma), generator)
        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = numpy_images(image)
            if output_type == "pil":
                image = pipe.numpy_to_pil(image)
        if hasattr(pipe, "maybe_free_model_hooks"):  # as the pipeline: offloaded models go back to the CPU
            pipe.maybe_free_model_hooks()
        return ImagePipelineOutput(images=image) if return_dict else (image,)

    def _warn_unscaled(self, ours) -> None:
        """Say once per scheduler class that an unconditional pipeline's own loop cannot run a VE scheduler:
        ``DDPMPipeline`` neither multiplies its initial noise by ``init_noise_sigma`` nor calls
        ``scale_model_input``, so with Euler, Heun or GE it feeds the UNet unscaled inputs; the fused loop does
        both, as the scheduler's contract asks, and its images differ from that pipeline's."""
        name = type(self.pipe.scheduler).__name__
        warned = self.__dict__.setdefault("_warned_unscaled", set())
        if float(ours.init_noise_sigma) != 1.0 and name not in warned:
            warned.add(name)
            warnings.warn(f"accelerate: {type(self.pipe).__name__}'s own loop does not scale its initial noise by "
                          f"init_noise_sigma nor its UNet input by scale_model_input, which {name} needs; the "
                          "fused loop does both, so its images differ from the pipeline's own (which are not "
                          "samples of the model)", stacklevel=3)


def _pipeline_kind(pipe) -> str:
    from diffusers import UNet2DConditionModel, UNet2DModel

    who = type(pipe).__name__
    if getattr(pipe, "transformer", None) is not None:  # flow-matching transformer pipelines (SD3, Flux); PixArt
        from .accelerate_pixart import pixart_kind
        from .accelerate_sd3 import transformer_kind
        return pixart_kind(pipe, who) or transformer_kind(pipe, who)
    unet = uncompiled(getattr(pipe, "unet", None))
    if unet is None or getattr(pipe, "scheduler", None) is None:
        raise TypeError(f"accelerate: unsupported pipeline {who}: expected a pipeline with a `unet` and a `scheduler`")
    if isinstance(unet, UNet2DModel):
        # the loop decodes nothing: a latent pipeline (LDMPipeline's vqvae) would return undecoded latents
        others = sorted(set(getattr(pipe, "components", {})) - {"unet", "scheduler"})
        if others:
            raise TypeError(f"accelerate: unsupported pipeline {who}: an unconditional UNet2DModel pipeline must have "
                            f"only a unet and a scheduler, this one also has {others}")
        _check_call_arguments(pipe, who, AcceleratedPipeline._call_unconditional)
        return "unconditional"
    if isinstance(unet, UNet2DConditionModel) and hasattr(pipe, "encode_prompt") and hasattr(pipe, "vae"):
        from .accelerate_controlnet import controlnet_kind
        from .accelerate_img2img import img2img_kind
        from .accelerate_inpaint import inpaint_kind
        from .accelerate_sdxl_img2img import sdxl_img2img_kind
        from .accelerate_sdxl_inpaint import sdxl_inpaint_kind
        from .accelerate_text2img import text2img_kind

        return (controlnet_kind(pipe, who, unet) or img2img_kind(pipe, who, unet) or sdxl_img2img_kind(pipe, who, unet)
                or inpaint_kind(pipe, who, unet) or sdxl_inpaint_kind(pipe, who, unet)
                or text2img_kind(pipe, who, unet))
    raise TypeError(f"accelerate: unsupported pipeline {who} with a {type(unet).__name__}: expected an unconditional "
                    "UNet2DModel pipeline or a text-to-image UNet2DConditionModel pipeline with encode_prompt and vae")


def accelerate(pipe, method=None, backend="auto", graph="auto", progress=False, **knobs) -> AcceleratedPipeline:
    """Wrap ``pipe`` so that its denoising loop runs in diffkern.

    Args:
        pipe: an unconditional ``UNet2DModel`` pipeline; ``StableDiffusionPipeline``, its img2img pipeline, its
            inpainting pipeline with a 9-channel UNet, ``StableDiffusionControlNetPipeline`` (one ControlNetModel
            or a MultiControlNetModel: :mod:`.accelerate_controlnet`; SDXL's ``StableDiffusionXLControlNetPipeline``:
            :mod:`.accelerate_sdxl_controlnet`), ``StableDiffusionXLPipeline`` or its img2img pipeline (pooled
            embeddings and ``add_time_ids`` as ``added_cond_kwargs``; ``denoising_start``/``denoising_end`` run a
            window of the schedule) or its inpainting pipeline with a 9-channel UNet
            (:mod:`.accelerate_sdxl_inpaint`); ``LatentConsistencyModelPipeline`` (guidance
            embedding as ``timestep_cond``); the flow-matching ``StableDiffusion3Pipeline`` / ``FluxPipeline`` or
            their img2img pipelines (:mod:`.accelerate_flow_img2img`); or the DiT ``PixArtAlphaPipeline`` /
            ``PixArtSigmaPipeline`` (:mod:`.accelerate_pixart`).
            ``guidance_rescale`` is applied in PyTorch between the batched UNet call and the fused step. Its
            scheduler (diffusers' or diffkern's DDIM, DDPM, DPM-Solver++ multistep and singlestep, UniPC, DEIS,
            PNDM, LMS, SA-Solver, Euler, Euler-ancestral, Heun, KDPM2, KDPM2-ancestral, DPM-Solver SDE, LCM,
            FlowMatch Euler and Heun, EDM Euler and DPM-Solver++ (:mod:`.edm_denoiser`); diffkern's GE, or IADB in
            unconditional pipelines) gives the schedule; it is read at each call, so a later
            ``pipe.scheduler = ...`` applies. A pipeline whose ``__call__`` takes arguments beyond those of these
            pipelines (other ControlNet pipelines, PAG, ...), legacy 4-channel inpainting (SD or SDXL), or a UNet
            with other added conditioning, raises TypeError naming them. Unsupported schedulers and scheduler
            options raise ValueError naming them.
        method: a :func:`diffkern.sampling.sample` method to use instead of the scheduler's own (on its schedule).
            With an LCMScheduler every method runs on the consistency function (the boundary-conditioned denoiser
            ``c_skip(t)*z + c_out(t)*x0``, interpolated t between schedule sigmas), the model's own denoiser.
        backend: fused-op backend ("auto", "reference", "cpp", "triton", "cuda").
        graph: "auto" (the whole loop as one CUDA graph for CUDA pipelines, :mod:`diffkern.graphs`, falling back to
            the fused eager loop with a warning when it cannot be captured; eager on other devices), True (requires
            CUDA; raises when the loop cannot be captured), or False (fused eager loop).
        progress: show a progress bar.
        **knobs: sampler knobs for ``method`` (e.g. ``s_churn``).

    Returns:
        An :class:`AcceleratedPipeline` callable like the pipeline.
    """
    if isinstance(pipe, AcceleratedPipeline):  # its forwarded attributes would pass the checks below by halves
        raise TypeError("pipe: already an AcceleratedPipeline; accelerate its diffusers pipeline (`.pipe`) instead")
    if graph not in (True, False, "auto"):
        raise ValueError(f"graph: expected True, False or 'auto', got {graph!r}")
    if graph is True and not torch.cuda.is_available():
        raise RuntimeError("graph=True: CUDA-graph capture needs a CUDA device and none is available "
                           "(use graph='auto' or False for the fused eager loop)")
    if backend not in (None, "auto"):
        backend_status(backend)  # raises ValueError for an unknown backend name
    if method is not None:
        from ..sampling import knobs as method_knobs
        valid = method_knobs(method)
        unknown = sorted(set(knobs) - set(valid))
        if unknown:
            raise TypeError(f"{method}: unknown knob(s) {unknown}; valid knobs: {sorted(valid) or 'none'}")
    elif knobs:
        raise TypeError(f"accelerate: knobs {sorted(knobs)} need an explicit method=")
    kind = _pipeline_kind(pipe)
    from .accelerate_flow_img2img import CLASSES as FLOW_IMG2IMG
    from .accelerate_flux import FluxAcceleratedPipeline
    from .accelerate_pixart import CLASSES as PIXART
    from .accelerate_sd3 import FlowAcceleratedPipeline
    cls = {"sd3": FlowAcceleratedPipeline, "flux": FluxAcceleratedPipeline, **FLOW_IMG2IMG, **PIXART}.get(
        kind, AcceleratedPipeline)
    acc = cls(pipe, method, backend, graph, progress, knobs, kind)
    # An unsupported scheduler or config fails now, not at the first call. Some limits depend on the step count
    # (diffusers' lower_order_final below 15 steps with an identity last step, DEIS or third-order DPM-Solver): a
    # config that runs at 10 or at 16 steps is accepted, and a call with an unsupported count raises then.
    eta = _default(pipe, "eta", 0.0)
    try:
        acc._schedule(10, eta)
    except ValueError as first:
        try:
            acc._schedule(16, eta)
        except ValueError:
            raise first from None
    return acc
