"""What a captured sampling loop bakes in, and the static copies of a call's inputs (:mod:`diffkern.graphs`).

A capture's key holds everything a replay cannot change: the model (:func:`model_key`), the plan's launch
structure (:func:`plan_structure`), the structure of the extra args (:func:`flatten`) and the seed kind; the
values a replay may change (x, the seed, tensor extra args, the coefficient tables) are copied into static
buffers before each replay. :class:`Call` derives both from an entry point's arguments.
"""
from __future__ import annotations

import os

import torch

from . import samplers


def model_key(model) -> tuple:
    """What of the model a capture bakes in (besides its code): identity, the state of all its submodules
    (:func:`_module_state`: ``model.train()`` on a wrapper's inner network leaves the wrapper's own flag alone; a
    plain attribute such as ``model.scale = 2.0`` is a Python constant of the captured forward), the address of
    its first parameter (moves and dtype casts change it) and, for a fused wrapper, whether it runs CFG and its own
    settings (:func:`_settings`)."""
    first, state = None, getattr(model, "training", None)
    fused = samplers._is_fused(model)
    if isinstance(model, torch.nn.Module):
        p = next(model.parameters(), None)
        first = None if p is None else p.data_ptr()
        state = _module_state(model, fused)
    cfg = model.guidance_scale != 1.0 if fused else None
    return id(model), state, first, cfg, _settings(model) if fused else None


_SCALARS = (bool, int, float, str)
_TORCH_LAYER = {}  # class -> whether it is one of torch.nn's own layers


def _module_state(model: torch.nn.Module, fused: bool) -> tuple:
    """Per submodule, its training flag and, but for torch.nn's own layers (whose sizes and eps nobody changes after
    construction) and a fused wrapper itself (:func:`_settings`; its guidance_scale is table data), its public
    attributes of exact type bool, int, float or str, by value: what a forward reads as constants (a capture replays
    them as they were). 0.32 to 0.38 ms per call for diffusers' 36M-parameter CIFAR-10 UNet (288 modules, 46 of them
    diffusers') on this project's 2-core CI machine, against 0.18 to 0.20 ms for the training flags alone."""
    state = []
    for m in model.modules():
        cls = type(m)
        layer = _TORCH_LAYER.get(cls)
        if layer is None:
            layer = _TORCH_LAYER[cls] = cls.__module__.startswith("torch.nn.modules.")
        if layer or (fused and m is model):
            state.append((m.training, ()))
        else:
            state.append((m.training, tuple([(k, v.hex() if type(v) is float else v) for k, v in m.__dict__.items()
                                             if type(v) in _SCALARS and k[:1] != "_"])))  # hex: NaN equals itself
    return tuple(state)


def _settings(model) -> tuple:
    """A fused wrapper's public attributes (sigma_data, t_scale, quantize, c_noise, time, ...): its model input
    is computed inside the capture from them. Numbers and strings by value, other objects by identity (the
    wrapper holds them); guidance_scale is table data (whether it is 1 is keyed apart)."""
    items = []
    for k, v in sorted(getattr(model, "__dict__", {}).items()):
        if k.startswith("_") or k in ("guidance_scale", "training"):
            continue
        items.append((k, flatten(v, [], []) if isinstance(v, (bool, int, float, str)) else id(v)))
    return tuple(items)


def plan_structure(plan) -> tuple:
    """The launch structure of a :class:`~diffkern.coef_tables.Plan` (its values are table data)."""
    return (tuple(plan.table.shape), tuple(plan.churn), tuple(plan.corrector), plan.churn_row, plan.corrector_row,
            plan.history)


def flatten(obj, tensors: list, objects: list):
    """Hashable structure of extra args; tensors (appended to ``tensors``) enter by shape, stride, dtype and
    device; numbers and strings by value; other objects by identity (appended to ``objects``)."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return "tensor", tuple(obj.shape), obj.stride(), obj.dtype, obj.device
    if isinstance(obj, dict):
        return "dict", tuple((k, flatten(v, tensors, objects)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj).__name__, tuple(flatten(v, tensors, objects) for v in obj)
    if isinstance(obj, float):
        return "float", obj.hex()  # exact, and NaN equals itself
    if obj is None or isinstance(obj, (bool, int, str, torch.dtype, torch.device)):
        return type(obj).__name__, obj
    objects.append(obj)
    return "object", id(obj)


def rebuild(obj, statics):
    """``obj`` with every tensor replaced by the next of ``statics`` (the order of :func:`flatten`)."""
    if isinstance(obj, torch.Tensor):
        return next(statics)
    if isinstance(obj, dict):
        return {k: rebuild(v, statics) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(rebuild(v, statics) for v in obj)
    return obj


def _flag(read):
    """A backend flag's value, or the error torch raises when its legacy and new precision APIs were mixed."""
    try:
        return read()
    except RuntimeError as e:
        return f"unreadable: {str(e)[:60]}"


def math_mode() -> tuple:
    """The global numerics settings that pick the kernels a captured model call runs (TF32 and reduced-precision
    matmul/convolution, cuDNN's algorithm choice): a capture replays the kernels chosen when it was made, so a
    change after it must capture again. Both torch's legacy flags (``allow_tf32``) and its newer
    ``fp32_precision`` attributes (absent on older torch) are read; a read torch refuses (the two APIs mixed)
    keys by its message."""
    cuda, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    reads = (torch.get_float32_matmul_precision, lambda: cuda.allow_tf32, lambda: cudnn.allow_tf32,
             lambda: getattr(torch.backends, "fp32_precision", None), lambda: getattr(cuda, "fp32_precision", None),
             lambda: getattr(getattr(cudnn, "conv", None), "fp32_precision", None),
             lambda: cuda.allow_fp16_reduced_precision_reduction, lambda: cuda.allow_bf16_reduced_precision_reduction,
             lambda: cudnn.enabled, lambda: cudnn.benchmark, lambda: cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled)
    return tuple(_flag(r) for r in reads)


def seed_kind(seed_v) -> int:
    """What of the seed a capture bakes in: the length of its stream vector (an int seed is one stream)."""
    return seed_v.numel() if isinstance(seed_v, torch.Tensor) else 1


def write_seed(static: torch.Tensor, seed_v) -> None:
    """Write a call's seed (an int or an int64 tensor) into a capture's static seed buffer, without a host sync."""
    if isinstance(seed_v, torch.Tensor):
        static.copy_(seed_v.reshape(-1))
    else:
        static.fill_(seed_v)  # a kernel argument, no host-device copy


class Call:
    """What every entry point derives from its arguments: the validated seed, the extra args (``tensors`` in
    :func:`flatten` order, other ``objects`` held by the capture) and the common part of the key."""

    def __init__(self, model, x, seed, backend, extra_args, record=False):
        self.seed, self.extra_args = samplers.seed_value(seed, x.shape[0]), dict(extra_args or {})
        self.tensors, self.objects = [], []
        extra_key = flatten(self.extra_args, self.tensors, self.objects)
        self.key = (model_key(model), tuple(x.shape), x.dtype, x.device, seed_kind(self.seed), bool(record),
                    backend, os.environ.get("DIFFKERN_BACKEND"), extra_key, math_mode())

    def static_seed(self, device) -> torch.Tensor:
        static = torch.empty(seed_kind(self.seed), dtype=torch.int64, device=device)
        write_seed(static, self.seed)
        return static

    def static_extra(self):
        """(static copies of the tensor extra args, the extra args dict with them in place)."""
        statics = [t.clone() for t in self.tensors]  # clone keeps the strides the key records
        return statics, rebuild(self.extra_args, iter(statics))

    def keep(self, model) -> tuple:
        tensors = tuple(model.parameters()) + tuple(model.buffers()) if isinstance(model, torch.nn.Module) else ()
        return model, tensors, tuple(self.objects)
