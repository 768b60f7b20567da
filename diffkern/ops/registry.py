"""Backend registry: which implementation of an op family runs, chosen explicitly.

Backends: ``reference`` (pure PyTorch, any device, float64-capable: the spec), ``cpp`` (C++ CPU
kernels in ``diffkern._C``), ``triton`` (``diffkern.kernels``; on CPU only under
``TRITON_INTERPRET=1``), ``cuda`` (the CUDA C++ kernels of ``csrc/cuda``, loaded one of two ways: built
ahead of time into ``diffkern._C``, or compiled at run time by CuPy's NVRTC when ``_C`` was built without
CUDA; :func:`cuda_loader` says which, ``DIFFKERN_CUDA_LOADER=aot|nvrtc`` forces one).

Resolution order: the ``backend=`` argument, then ``DIFFKERN_BACKEND``, then ``auto``. A named backend
that is unavailable, or cannot run on the tensors' device, raises :class:`BackendUnavailable`. Only
``auto`` falls back along the device's preference list, and it warns once per (op, device) when it
has to skip a preferred backend (once more per set of backends a call excludes, see :func:`resolve`).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import warnings
from typing import Callable

BACKENDS = ("reference", "cpp", "triton", "cuda")
# auto: fastest first. Triton on CPU means the interpreter, a debugging tool, so auto never picks it.
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpp", "reference")}
_DEVICES = {"reference": None, "cpp": {"cpu"}, "cuda": {"cuda"}}


class BackendUnavailable(RuntimeError):
    """A requested backend is not built, not importable, or cannot run on the given device."""


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One op family: its name and, per backend, a loader returning the launcher callable.

    Loaders are called lazily (importing Triton or the extension happens on first use).
    """
    name: str
    loaders: dict[str, Callable[[], Callable]]


_OPS: dict[str, OpSpec] = {}
_warned: set[tuple[str, ...]] = set()


def register(spec: OpSpec) -> OpSpec:
    """Add an op family to the registry (called once by each family module)."""
    _OPS[spec.name] = spec
    return spec


def ops() -> list[str]:
    """Names of the registered op families."""
    return sorted(_OPS)


@functools.lru_cache(maxsize=None)
def _extension():
    """(module, None) if ``diffkern._C`` imports, else (None, reason)."""
    try:
        return importlib.import_module("diffkern._C"), None
    except ImportError as exc:
        return None, f"diffkern._C is not built ({exc}); run `pip install -e . --no-build-isolation`"


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_status() -> tuple[bool, str | None]:
    try:
        importlib.import_module("triton")
    except ImportError as exc:
        return False, f"triton is not installed ({exc})"
    return True, None


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


CUDA_LOADERS = ("aot", "nvrtc")


def cuda_loader() -> tuple[str | None, str | None]:
    """Which loader provides the ``cuda`` backend's kernels: ("aot" | "nvrtc", None), or (None, why neither).

    ``aot``: ``diffkern._C`` built with CUDA. ``nvrtc``: ``diffkern._C`` built without it, and CuPy with NVRTC
    importable (:mod:`diffkern.ops.cuda_rtc`). ``DIFFKERN_CUDA_LOADER`` (``auto`` | ``aot`` | ``nvrtc``)
    forces one; a forced loader that is unavailable gives its reason, never the other loader.
    """
    want = os.environ.get("DIFFKERN_CUDA_LOADER", "auto") or "auto"
    if want not in CUDA_LOADERS + ("auto",):
        raise ValueError(f"DIFFKERN_CUDA_LOADER: expected one of {CUDA_LOADERS + ('auto',)}, got {want!r}")
    mod, why = _extension()
    if mod is None:
        return None, why
    if want in ("auto", "aot") and mod.has_cuda():
        return "aot", None
    if want == "aot":
        return None, "diffkern._C was built without CUDA (no nvcc, or DIFFKERN_SKIP_CUDA_BUILD=1)"
    ok, why_rtc = _rtc_status()
    if ok:
        return "nvrtc", None
    prefix = "" if want == "nvrtc" else "diffkern._C was built without CUDA, and the run-time loader failed: "
    return None, prefix + why_rtc


@functools.lru_cache(maxsize=None)
def _rtc_status() -> tuple[bool, str | None]:
    from . import cuda_rtc
    try:
        cuda_rtc.csrc_dir()
        cuda_rtc.cuda_include_dir()
        cuda_rtc._nvrtc()
    except cuda_rtc.RtcUnavailable as exc:
        return False, str(exc)
    return True, None


def backend_status(backend: str, device_type: str | None = None) -> tuple[bool, str | None]:
    """(available, reason-if-not) for ``backend`` on ``device_type`` (None: on any device)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: unknown backend {backend!r}; expected one of {BACKENDS} or 'auto'")
    if backend == "reference":
        return True, None
    devs = _DEVICES.get(backend)
    if device_type is not None and devs is not None and device_type not in devs:
        return False, f"backend {backend!r} runs on {sorted(devs)} tensors, not {device_type!r}"
    if backend == "cpp":
        mod, why = _extension()
        return (mod is not None), why
    if backend == "cuda":
        # The device first: probing the loaders could open libnvrtc, which a CPU-only machine has no use for.
        if not _cuda_available():
            return False, "torch reports no CUDA device"
        loader, why = cuda_loader()
        return (loader is not None), why
    ok, why = _triton_status()
    if not ok:
        return False, why
    if device_type == "cpu" and not _triton_interpret():
        return False, "triton runs on CPU tensors only under TRITON_INTERPRET=1 (set before importing diffkern)"
    if device_type == "cuda" and _triton_interpret():
        return False, "TRITON_INTERPRET=1 is set, so triton cannot launch on CUDA tensors"
    if device_type == "cuda" and not _cuda_available():
        return False, "torch reports no CUDA device"
    if device_type not in (None, "cpu", "cuda"):
        return False, f"triton runs on CUDA tensors (CPU ones under TRITON_INTERPRET=1), not {device_type!r}"
    if device_type is None and not (_cuda_available() or _triton_interpret()):
        return False, "no CUDA device and TRITON_INTERPRET is not set"
    return True, None


def available(device_type=None) -> dict[str, str | None]:
    """Every backend mapped to None if usable here (on ``device_type`` if given), else the reason why not.

    ``device_type``: None (any device), a torch device string ("cpu", "cuda", "cuda:1": its type counts) or a
    :class:`torch.device`; a string torch does not accept as a device (e.g. "gpu") raises ValueError.
    """
    if device_type is not None:
        device_type = _device_type(device_type)
    return {b: backend_status(b, device_type)[1] for b in BACKENDS}


def _device_type(device) -> str:
    """The type of ``device`` (a torch device string or torch.device), validated by torch itself."""
    import torch
    if isinstance(device, torch.device):
        return device.type
    if not isinstance(device, str):
        raise TypeError(f"device_type: expected a torch device string such as 'cpu' or 'cuda', or a torch.device, "
                        f"got {type(device).__name__}")
    try:
        return torch.device(device).type
    except RuntimeError as exc:  # torch's message lists the device types it knows
        raise ValueError(f"device_type: {device!r} is not a torch device ({exc})") from None


def _load(spec: OpSpec, backend: str) -> Callable:
    if backend == "cuda" and cuda_loader()[0] == "nvrtc":
        from . import cuda_rtc
        cuda_rtc.register()  # the torch ops' CUDA implementations, before the loader hands one out
    return spec.loaders[backend]()


def resolve(op: str, device_type: str, backend: str | None = None,
            excluded: dict[str, str] | None = None, stacklevel: int = 3) -> tuple[str, Callable]:
    """Pick the implementation of ``op`` for tensors on ``device_type``; returns (backend, launcher).

    ``excluded`` maps backends that cannot run this particular call (e.g. HOLD above the fused kernels' order)
    to the reason, worded to follow the backend's name: a named one raises with it, ``auto`` skips it and warns
    once per (op, device, excluded set). ``stacklevel``: the warning's frame, counted from here (3: the caller of
    the op front end that calls resolve)."""
    if op not in _OPS:
        raise KeyError(f"op: unknown op family {op!r}; registered: {ops()}")
    spec = _OPS[op]
    excluded = excluded or {}
    if backend is not None and not isinstance(backend, str):  # 0 or False would read as "not given" below
        raise TypeError(f"backend: expected None or a backend name ({', '.join(sorted(spec.loaders))} or 'auto'; "
                        f"'' as None), got {backend!r}")
    requested = backend or os.environ.get("DIFFKERN_BACKEND") or "auto"
    if requested != "auto":
        who = "backend" if backend else "DIFFKERN_BACKEND"  # the argument, else the variable it came from
        if requested not in spec.loaders:
            raise BackendUnavailable(f"{who}: op {op!r} has no {requested!r} implementation "
                                     f"(it has {sorted(spec.loaders)})")
        if requested in excluded:
            raise BackendUnavailable(f"{who}: {requested!r} {excluded[requested]}")
        ok, why = backend_status(requested, device_type)
        if not ok:
            raise BackendUnavailable(f"backend {requested!r} requested for op {op!r} on {device_type} "
                                     f"but unavailable: {why}")
        return requested, _load(spec, requested)
    order = AUTO_ORDER.get(device_type, ("reference",))
    skipped = []
    for name in order:
        if name not in spec.loaders:
            continue
        ok, why = (False, excluded[name]) if name in excluded else backend_status(name, device_type)
        if ok:
            key = (op, device_type, *sorted(excluded))
            if skipped and key not in _warned:
                _warned.add(key)
                warnings.warn(f"diffkern: op {op!r} on {device_type} falls back to {name!r} "
                              f"({'; '.join(skipped)})", RuntimeWarning, stacklevel=stacklevel)
            return name, _load(spec, name)
        skipped.append(f"{name}: {why}")
    raise BackendUnavailable(f"no backend can run op {op!r} on {device_type}: {'; '.join(skipped)}")
