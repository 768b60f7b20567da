"""Small helpers of :class:`~diffkern.diffusers.accelerate.AcceleratedPipeline` at the pipeline's boundary: a call's
positional arguments bound as the pipeline binds them, its defaults and step count, the unconditional pipelines' numpy images, and the module
under a ``torch.compile`` wrapper (what the pipeline-kind checks look at); the refusal of arguments the fused loop does
not implement (:func:`_reject`, :func:`_check_call_arguments`: moved from :mod:`.accelerate`, which re-exports them)."""
from __future__ import annotations

import inspect
import numbers

import torch


def _keywords(pipe, args: tuple, kwargs: dict) -> dict:
    """``kwargs`` with the positional ``args`` of a call bound by name as the pipeline's ``__call__`` binds them
    (``DDPMPipeline``'s first is ``batch_size``, a text pipeline's ``prompt``)."""
    if not args:
        return kwargs
    params = list(inspect.signature(type(pipe).__call__).parameters.values())[1:]  # after self
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(names):
        raise TypeError(f"{type(pipe).__name__}.__call__ takes at most {len(names)} positional argument(s) "
                        f"({', '.join(names)}), got {len(args)}")
    both = sorted(set(names[:len(args)]) & set(kwargs))
    if both:
        raise TypeError(f"{type(pipe).__name__}.__call__: argument(s) {both} given both by position and by name")
    return {**dict(zip(names, args)), **kwargs}


def numpy_images(image: torch.Tensor):
    """NCHW image tensor -> NHWC numpy array on the host, in the tensor's dtype (the stock ``DDPMPipeline``'s) but
    bfloat16, which numpy lacks: float32 (exact), as diffusers' ``VaeImageProcessor.pt_to_numpy`` makes it."""
    image = image.cpu().permute(0, 2, 3, 1)
    return (image.float() if image.dtype == torch.bfloat16 else image).numpy()


def uncompiled(module):
    """The module a ``torch.compile`` wrapper (``pipe.unet = torch.compile(pipe.unet)``) compiles, else ``module``:
    what the pipeline-kind checks look at; the loop calls the compiled module."""
    return getattr(module, "_orig_mod", module)


def _default(pipe, name: str, fallback):
    param = inspect.signature(type(pipe).__call__).parameters.get(name)
    return fallback if param is None or param.default is inspect.Parameter.empty else param.default


def _steps(pipe, num_inference_steps, fallback: int) -> int:
    """The call's step count: the pipeline's default for None, else an int >= 1 (0 would otherwise read as 'not
    given' and run the default count; the stock pipelines raise for it or return the undenoised latents)."""
    if num_inference_steps is None:
        return _default(pipe, "num_inference_steps", fallback)
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, numbers.Integral) \
            or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps: expected an int >= 1, got {num_inference_steps!r}")
    return int(num_inference_steps)


def _reject(unsupported: dict) -> None:
    given = {k: v for k, v in unsupported.items() if v is not None}
    if given.get("callback_on_step_end") is None:  # the tensors a callback would get: harmless without one
        given.pop("callback_on_step_end_tensor_inputs", None)
    if given:
        raise TypeError(f"accelerate: argument(s) {sorted(given)} not supported by the fused loop (per-step hooks, "
                        "schedule overrides and guidance variants need the pipeline's own loop)")


# Pipeline arguments the fused loop refuses when given (AcceleratedPipeline._call_* take the others).
_REFUSED_IF_GIVEN = {"timesteps", "sigmas", "ip_adapter_image", "ip_adapter_image_embeds", "callback_on_step_end",
                     "callback_on_step_end_tensor_inputs", "callback", "callback_steps"}


def _check_call_arguments(pipe, who: str, handler) -> None:
    """Raise unless every argument of the pipeline's ``__call__`` is one ``handler`` implements (or refuses when
    given). A pipeline with more (inpainting's ``mask_image``, PAG's ``pag_scale``, ControlNet's ...) runs a
    different loop, which the fused one would silently replace by plain text-to-image sampling."""
    known = (set(inspect.signature(handler).parameters) | _REFUSED_IF_GIVEN | {"self"}) - {"unsupported"}
    params = inspect.signature(type(pipe).__call__).parameters.values()
    extra = sorted(p.name for p in params
                   if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in known)
    if extra:
        raise TypeError(f"accelerate: unsupported pipeline {who}: its __call__ takes {extra}, which the fused loop "
                        "does not implement (it runs plain unconditional or text-to-image sampling)")
