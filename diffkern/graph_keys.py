"""What a captured sampling loop bakes in, and the static copies of a call's inputs (:mod:`diffkern.graphs`).

A capture's key holds everything a replay cannot change: the model (:func:`model_key`), the plan's launch
structure (:func:`plan_structure`), the structure of the extra args (:func:`flatten`) and the seed kind; the
values a replay may change (x, the seed, tensor extra args, the coefficient tables) are copied into static
buffers before each replay. :class:`Call` derives both from an entry point's arguments.
"""
from __future__ import annotations

import collections
import copy
import functools
import itertools
import operator
import os
import struct
import types
import weakref

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
        state, first = _module_state(model, fused)
    cfg = model.guidance_scale != 1.0 if fused else None
    return id(model), state, first, cfg, _settings(model) if fused else None


_SCALARS = (bool, int, float, str)
_TORCH_LAYER = {}  # class -> whether it is one of torch.nn's own layers
_PLANS = {}  # id(model) -> its _Plan, dropped when the model is (weakref callback)
# What every call reads of each submodule's __dict__, in one C call per submodule
_ROW = operator.itemgetter("training", "_parameters", "_buffers", "_modules", "_forward_pre_hooks", "_forward_hooks")
_VALUES, _KEYS, _CHAIN = dict.values, dict.keys, itertools.chain.from_iterable
# torch's own data_ptr (what a capture reads, whatever a tensor subclass says), called at C speed
_NOT_NONE, _DATA_PTR = functools.partial(operator.is_not, None), torch.Tensor.data_ptr
_SIMPLE = (bool, int, str, type(None))  # keyed as they are; floats by their bits, the rest by _attr


def _is_layer(cls) -> bool:
    layer = _TORCH_LAYER.get(cls)
    if layer is None:
        layer = _TORCH_LAYER[cls] = cls.__module__.startswith("torch.nn.modules.")
    return layer


def _picker(positions):
    """A C-speed getter of ``positions`` of a sequence or keys of a dict that always returns a tuple."""
    if not positions:
        return lambda seq: ()
    if len(positions) == 1:
        return lambda seq, p=positions[0]: (seq[p],)
    return operator.itemgetter(*positions)


def _split(dicts):
    """Pickers of the non-empty and the empty ones of ``dicts`` (by position)."""
    return (_picker([i for i, d in enumerate(dicts) if d]), _picker([i for i, d in enumerate(dicts) if not d]))


def _module_state(model: torch.nn.Module, fused: bool) -> tuple:
    """(state, address of the first parameter or None). Per submodule, its class, its place in the tree, its
    training flag, its hooks and, but for torch.nn's own layers (whose sizes and eps nobody changes after
    construction) and a fused wrapper itself (:func:`_settings`; its guidance_scale is table data), its public
    attributes (:func:`_attr`: numbers and strings by value, an attention processor by type): what a forward
    reads as constants (a capture replays them as they were); then the address of every parameter and buffer, and
    torch's global module hooks. Not keyed (document, don't rely on): private attributes, values inside other objects
    than those :func:`_attr` reads, global Python state a forward reads.

    What does not change between calls (the module list, which modules are layers, the attribute names, their
    types) is a per-model :class:`_Plan`, checked on every call and rebuilt when any of it changed; the values are
    read on every call. About 0.19 ms per call for diffusers' 36M-parameter CIFAR-10 UNet (288 modules) on this
    project's 2-core CI machine, 0.55 ms for the walk of every call without the plan (``bench/graph_key_cost.py``,
    minimum of 2000 calls; a rebuilt plan costs about one walk)."""
    plan = _PLANS.get(id(model))
    state = None if plan is None or plan.fused != fused else plan.read(model)
    if state is None:
        plan = _Plan.build(model, fused)
        state = None if plan is None else plan.read(model)
    # A model the plan cannot describe, or cannot read once built (a non-tensor parameter): the walk, which
    # raises what a forward would
    return _walk_state(model, fused) if state is None else state


class _Plan:
    """The static part of a model's key: its modules (weakly: a plan never keeps a model alive), their classes,
    the tree (each module's children as indices into the module list), which modules' attributes are read, their
    names and their values' types. :meth:`read` checks all of it against the model at C speed (maps over the
    submodules' ``__dict__``) and returns the key, or None when any of it changed (the caller builds a new plan)."""

    __slots__ = ("fused", "refs", "classes", "kids", "no_kids", "kid_ids", "params", "buffers", "no_tensors",
                 "attr_pick", "keysets", "getters", "types", "static", "simple", "floats", "fmt", "others")

    @classmethod
    def build(cls, model, fused: bool):
        """The plan of ``model`` as it is now, registered in ``_PLANS``; None for a model whose module
        bookkeeping is not torch's plain dicts (read by :func:`_walk_state` instead)."""
        mods = list(model.modules())
        ds = [vars(m) for m in mods]
        try:
            rows = [_ROW(d) for d in ds]
            ref = weakref.ref(model, functools.partial(_forget, id(model)))
        except (KeyError, TypeError):
            return None
        if not all(type(x) in (dict, collections.OrderedDict) for row in rows for x in row[1:]):
            return None
        self = cls()
        self.fused, self.refs = fused, (ref,) + tuple(weakref.ref(m) for m in mods[1:])
        self.classes = tuple(map(type, mods))
        kids = list(_CHAIN(row[3].values() for row in rows))
        self.kid_ids = tuple(map(id, kids))
        # Most submodules are leaves and hold no tensors: those dicts are checked to be still empty (one C call),
        # the others are read (a dict's values: a view and an iterator each)
        self.kids, self.no_kids = _split([row[3] for row in rows])
        self.params, no_params = _split([row[1] for row in rows])
        self.buffers, no_buffers = _split([row[2] for row in rows])
        self.no_tensors = no_params, no_buffers
        where = {id(m): i for i, m in enumerate(mods)}
        tree = tuple(where.get(id(k), -1) for k in kids), tuple(len(row[3]) for row in rows)
        attr_idx = tuple(i for i, m in enumerate(mods) if not _is_layer(type(m)) and not (fused and m is model))
        self.attr_pick = _picker(attr_idx)
        self.keysets = tuple(frozenset(ds[i]) for i in attr_idx)
        names = tuple(tuple(k for k in ds[i] if k[:1] != "_") for i in attr_idx)
        self.getters = tuple(map(_picker, names))
        self.types = tuple(type(v) for g, i in zip(self.getters, attr_idx) for v in g(ds[i]))
        kinds = [0 if t in _SIMPLE else 1 if t is float else 2 for t in self.types]
        self.simple, self.floats, self.others = (_picker([i for i, k in enumerate(kinds) if k == kind])
                                                 for kind in (0, 1, 2))
        self.fmt = f"<{kinds.count(1)}d"
        self.static = _Frozen((self.classes, tree, attr_idx, names, self.types))
        _PLANS[id(model)] = self
        return self

    def read(self, model):
        """(state, first parameter's address) of ``model``, or None when the plan no longer describes it."""
        try:
            mods = list(map(operator.call, self.refs))  # a collected submodule: None, and vars(None) raises
            ds = list(map(vars, mods))
            training, params, buffers, kids, pre, post = zip(*map(_ROW, ds))
            if (mods[0] is not model or any(self.no_kids(kids)) or tuple(map(type, mods)) != self.classes
                    or tuple(map(id, _CHAIN(map(_VALUES, self.kids(kids))))) != self.kid_ids):
                return None
            attr_ds = self.attr_pick(ds)
            if not all(map(operator.eq, map(_KEYS, attr_ds), self.keysets)):
                return None  # an attribute added or removed
            vals = tuple(_CHAIN(map(operator.call, self.getters, attr_ds)))
            if tuple(map(type, vals)) != self.types:
                return None
            # Its tensors' memory (a parameter or buffer reassigned, not written in place, leaves the capture
            # reading the old one) and its hooks (handle ids are never reused): what the captured launches read,
            # and Python a replay would not run.
            if any(self.no_tensors[0](params)) or any(self.no_tensors[1](buffers)):
                return None  # a parameter or buffer registered where there was none
            ptrs = tuple(map(_DATA_PTR, filter(_NOT_NONE, _CHAIN(map(_VALUES, self.params(params))))))
            bufs = tuple(map(_DATA_PTR, filter(_NOT_NONE, _CHAIN(map(_VALUES, self.buffers(buffers))))))
        except (TypeError, KeyError):  # a dict replaced by another type, a key gone: not this plan's model
            return None
        hooks = ()
        if any(pre) or any(post):
            hooks = tuple((i, tuple(a), tuple(b)) for i, (a, b) in enumerate(zip(pre, post)) if a or b)
        module = torch.nn.modules.module
        state = (self.static, training, self.simple(vals), struct.pack(self.fmt, *self.floats(vals)),
                 tuple(map(_attr, self.others(vals))), ptrs, bufs, hooks,
                 tuple(module._global_forward_pre_hooks), tuple(module._global_forward_hooks))
        return state, ptrs[0] if ptrs else None


class _Frozen:
    """A plan's static tuple with its hash computed once: graphs.run hashes the whole key a few times a call."""

    __slots__ = ("value", "hash")

    def __init__(self, value: tuple):
        self.value, self.hash = value, hash(value)

    def __hash__(self):
        return self.hash

    def __eq__(self, other):
        return self is other or (type(other) is _Frozen and self.hash == other.hash and self.value == other.value)


def _forget(key, ref) -> None:
    """A model was collected: drop its plan (unless its id already has a newer one)."""
    plan = _PLANS.get(key)
    if plan is not None and plan.refs[0] is ref:
        del _PLANS[key]


def _walk_state(model: torch.nn.Module, fused: bool) -> tuple:
    """:func:`_module_state` by a walk of every submodule, for models a :class:`_Plan` cannot describe."""
    state, memory = [], []
    for m in model.modules():
        memory += [t.data_ptr() for t in m._parameters.values() if t is not None]
        memory += [t.data_ptr() for t in m._buffers.values() if t is not None]
        if m._forward_pre_hooks or m._forward_hooks:
            state.append((tuple(m._forward_pre_hooks), tuple(m._forward_hooks)))
        state.append((type(m), len(m._modules), m.training))
        if not _is_layer(type(m)) and not (fused and m is model):
            state.append(tuple([(k, v.hex() if type(v) is float else v) if type(v) in _SCALARS or v is None
                                else (k, _attr(v)) for k, v in m.__dict__.items() if k[:1] != "_"]))
    module = torch.nn.modules.module
    hooks = tuple(module._global_forward_pre_hooks), tuple(module._global_forward_hooks)
    first = next(model.parameters(), None)
    return (tuple(state), tuple(memory), hooks), None if first is None else first.data_ptr()


_FUNCTIONS = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, functools.partial)


def _attr(v):
    """What a captured forward bakes in of a submodule's public attribute: numbers, strings and None by value,
    lists, tuples and dicts of them item by item, a plain tensor by its memory, a function by identity (the key holds
    it), any other object (diffusers' attention processors) by its type and its own public numbers and strings."""
    t = type(v)
    if t is float:
        return v.hex()  # exact, and NaN equals itself
    if t in _SCALARS or v is None:
        return v
    if isinstance(v, torch.Tensor):
        return "tensor", v.data_ptr(), tuple(v.shape), v.dtype
    if t is list or t is tuple:
        return t.__name__, tuple([_attr(u) for u in v])
    if t is dict:
        return "dict", tuple([(k, _attr(u)) for k, u in v.items()])
    if isinstance(v, _FUNCTIONS):
        return v
    if isinstance(v, (int, float)) or (hasattr(v, "item") and getattr(v, "ndim", None) == 0):
        return t, _attr(v.item() if hasattr(v, "item") else float(v) if isinstance(v, float) else int(v))  # numpy
    own = getattr(v, "__dict__", None)
    return t, tuple([(k, _attr(u)) for k, u in own.items() if type(u) in _SCALARS and k[:1] != "_"]) if own else ()


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
            plan.step_row, plan.history)


def flatten(obj, tensors: list, objects: list, device=None):
    """Hashable structure of extra args; tensors (appended to ``tensors``) enter by shape, stride, dtype and
    device, and by value too when on the CPU but not on ``device`` (x's: a CPU tensor beside a CUDA x is read on
    the host by the ops that take it, a 0-dim one as a kernel argument, so a capture bakes its values in; a tensor
    on another device or the meta device has no host values to key); numbers and strings by value; other objects
    by identity (appended to ``objects``)."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        key = "tensor", tuple(obj.shape), obj.stride(), obj.dtype, obj.device
        if device is not None and obj.device != device and obj.device.type == "cpu":  # others have no host values
            key += (_contents(obj),)
        return key
    if isinstance(obj, dict):
        return "dict", tuple((k, flatten(v, tensors, objects, device)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj).__name__, tuple(flatten(v, tensors, objects, device) for v in obj)
    if isinstance(obj, float):
        return "float", obj.hex()  # exact, and NaN equals itself
    if obj is None or isinstance(obj, (bool, int, str, torch.dtype, torch.device)):
        return type(obj).__name__, obj
    objects.append(obj)
    return "object", id(obj)


def _contents(t: torch.Tensor) -> tuple:
    """A host tensor's values, exactly (bitwise: NaN equals itself)."""
    flat = t.detach().reshape(-1).contiguous()
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def rebuild(obj, statics):
    """``obj`` with every tensor replaced by the next of ``statics`` (the order of :func:`flatten`); containers
    keep their type (a named tuple, an ``OrderedDict`` or diffusers' ``BaseOutput``)."""
    if isinstance(obj, torch.Tensor):
        return next(statics)
    if isinstance(obj, dict):
        items = [(k, rebuild(v, statics)) for k, v in obj.items()]
        if type(obj) is dict:
            return dict(items)
        out = copy.copy(obj)
        for k, v in items:
            out[k] = v
        return out
    if isinstance(obj, (list, tuple)):
        items = [rebuild(v, statics) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj


def _flag(read):
    """A backend flag's value, or the error torch raises when its legacy and new precision APIs were mixed."""
    try:
        return read()
    except RuntimeError as e:
        return f"unreadable: {str(e)[:60]}"


# scaled_dot_product_attention's backend choice (torch.nn.attention.sdpa_kernel toggles these) and cuBLAS/cuBLASLt
_SDPA_READS = tuple((lambda name=name: getattr(torch.backends.cuda, name, lambda: None)()) for name in
                    ("flash_sdp_enabled", "mem_efficient_sdp_enabled", "math_sdp_enabled", "cudnn_sdp_enabled",
                     "preferred_blas_library"))


def math_mode() -> tuple:
    """The global numerics settings that pick the kernels a captured model call runs (TF32 and reduced-precision
    matmul/convolution, cuDNN's algorithm choice): a capture replays the kernels chosen when it was made, so a
    change after it must capture again. So do the enabled scaled-dot-product-attention backends and the preferred
    BLAS library. Both torch's legacy flags (``allow_tf32``) and its newer
    ``fp32_precision`` attributes (absent on older torch) are read; a read torch refuses (the two APIs mixed)
    keys by its message."""
    cuda, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    reads = (torch.get_float32_matmul_precision, lambda: cuda.allow_tf32, lambda: cudnn.allow_tf32,
             lambda: getattr(torch.backends, "fp32_precision", None), lambda: getattr(cuda, "fp32_precision", None),
             lambda: getattr(getattr(cudnn, "conv", None), "fp32_precision", None),
             lambda: cuda.allow_fp16_reduced_precision_reduction, lambda: cuda.allow_bf16_reduced_precision_reduction,
             lambda: cudnn.enabled, lambda: cudnn.benchmark, lambda: cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled, *_SDPA_READS)
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
        extra_key = flatten(self.extra_args, self.tensors, self.objects, x.device)
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
