"""Where the run-time CUDA backend (:mod:`diffkern.ops.cuda_rtc`) finds its tools: the kernel sources, the CUDA
headers NVRTC needs, the NVRTC options matching the ahead-of-time build, NVRTC itself (through CuPy), the disk
cache folder, and the CuPy wrapper of torch's CUDA stream. Nothing here needs a GPU; ``cuda_rtc`` re-exports
every name, so callers keep using ``cuda_rtc.csrc_dir()`` and so on.
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path


class RtcUnavailable(RuntimeError):
    """CuPy, NVRTC or the kernel sources cannot be found."""


def csrc_dir() -> Path:
    """The kernel sources: ``csrc/`` of a source checkout, else the copy installed as ``diffkern/_csrc``."""
    here = Path(__file__).resolve().parent.parent
    for cand in (here.parent / "csrc", here / "_csrc"):
        if (cand / "cuda" / "kernels.h").is_file():
            return cand
    raise RtcUnavailable(f"the CUDA kernel sources were not found (looked in {here.parent / 'csrc'} and "
                         f"{here / '_csrc'}); reinstall diffkern")


def cuda_include_dir() -> Path:
    """A directory holding ``cuda_fp16.h`` (NVRTC does not ship it): CUDA_HOME/CUDA_PATH, /usr/local/cuda, or
    the pip-installed CUDA headers."""
    cands = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")] + ["/usr/local/cuda"]
    cands = [Path(c) / "include" for c in cands if c]
    import site
    for sp in site.getsitepackages() + [site.getusersitepackages()]:
        cands += [Path(sp) / "nvidia" / "cu13" / "include", Path(sp) / "nvidia" / "cuda_runtime" / "include"]
    for c in cands:
        if (c / "cuda_fp16.h").is_file():
            return c
    raise RtcUnavailable("cuda_fp16.h was not found: set CUDA_HOME to a CUDA toolkit (or pip install "
                         "nvidia-cuda-runtime)")


def options(arch: str) -> tuple[str, ...]:
    """NVRTC options matching the ahead-of-time nvcc build (setup.py and torch's CUDAExtension defines)."""
    return (f"-I{csrc_dir()}", f"-I{cuda_include_dir()}", f"--gpu-architecture=sm_{arch}", "-std=c++20",
            "-lineinfo", "-D__CUDA_NO_HALF_OPERATORS__",
            "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__")


def _nvrtc():
    """CuPy's NVRTC bindings, or :class:`RtcUnavailable` saying what to install."""
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
    except Exception as exc:  # ImportError, or the NVRTC library not found
        raise RtcUnavailable(f"CuPy with NVRTC is needed for the run-time CUDA backend ({exc}); "
                             "pip install cupy-cuda13x (or cupy-cuda12x)") from exc
    return nvrtc


@functools.lru_cache(maxsize=None)
def _sources_hash() -> str:
    """Hash of every kernel source and csrc header (part of the disk cache key)."""
    h = hashlib.sha256()
    root = csrc_dir()
    for p in sorted(list((root / "cuda").glob("*")) + list((root / "common").glob("*"))):
        if p.suffix in (".cu", ".cuh", ".h"):
            h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def cache_dir() -> Path:
    """The NVRTC cubin cache: ``$DIFFKERN_CACHE_DIR/nvrtc`` (default ``~/.cache/diffkern/nvrtc``)."""
    return Path(os.environ.get("DIFFKERN_CACHE_DIR") or Path.home() / ".cache" / "diffkern") / "nvrtc"


class _StreamHandle:
    """A raw cudaStream_t under the CUDA stream protocol (what ``cupy.cuda.Stream.from_external`` takes)."""

    def __init__(self, handle: int):
        self.handle = handle

    def __cuda_stream__(self):
        return 0, self.handle


def cupy_stream(handle: int, index: int):
    """A CuPy stream object for torch's stream ``handle`` on device ``index``: ``Stream.from_external``
    (CuPy >= 14, where ``ExternalStream`` is deprecated and warns at every launch), else ``ExternalStream``."""
    import cupy

    if hasattr(cupy.cuda.Stream, "from_external"):
        return cupy.cuda.Stream.from_external(_StreamHandle(handle))
    return cupy.cuda.ExternalStream(handle, index)
