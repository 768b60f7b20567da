"""Run-time CUDA backend: CuPy's NVRTC compiles the kernels of ``csrc/cuda/*.cu`` when ``diffkern._C`` was
built without CUDA (a CPU build of the package run on a GPU machine).

The same sources as the ahead-of-time build: the ``.cu`` files keep their host launchers behind
``#if !defined(__CUDACC_RTC__)``, so NVRTC sees only the templated ``__global__`` kernels, which take one
parameter struct by value (``csrc/cuda/kernels.h``, ``csrc/common/hold.h``). This module mirrors each
struct as a NumPy structured dtype, checks the layout inside the compiled program (field order, field
sizes and struct size; see :func:`layout_asserts`), picks the instantiation and the grid exactly as the C++
launchers do (:func:`plan`), and launches
on torch's current stream (so a launch is capturable in a CUDA graph). Arguments are validated first by
the checks of the C++ bindings, exported by ``diffkern._C`` (so both loaders reject the same inputs).

Compiled programs are cached on disk, one cubin per (source, dtype combination, architecture) in
``$DIFFKERN_CACHE_DIR`` (default ``~/.cache/diffkern/nvrtc``), keyed by a hash of the sources with their
layout checks, the CUDA headers, the options and the NVRTC version. :func:`register` binds the launchers as the CUDA implementations of the
``torch.ops.diffkern`` ops; the registry (:mod:`diffkern.ops.registry`) calls it when this loader is active.
Finding the tools (sources, CUDA headers, options, NVRTC, the cache folder, the stream wrapper) lives in
:mod:`diffkern.ops.cuda_toolchain`; its names are re-exported here.
"""
from __future__ import annotations

import functools
import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from .cuda_toolchain import (RtcUnavailable, _nvrtc, _sources_hash, cache_dir, csrc_dir,  # noqa: F401
                             cuda_include_dir, cupy_stream, options)

THREADS = 256  # kThreads of csrc/cuda/device_utils.cuh
OPS = ("sampler_step", "iadb_blend", "philox_normal", "hold_transition", "hold_perturb")
SOURCES = {"sampler_step": "cuda/sampler_step.cu", "iadb_blend": "cuda/iadb_blend.cu",
           "philox_normal": "cuda/philox_normal.cu", "hold_transition": "cuda/hold.cu", "hold_perturb": "cuda/hold.cu"}
CTYPES = {torch.float16: "__half", torch.bfloat16: "__nv_bfloat16", torch.float32: "float", torch.float64: "double"}
DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}  # dk::gpu::DType

_P, _I8, _I4 = np.uint64, np.int64, np.int32


def _struct(name, fields):
    return name, np.dtype(fields, align=True)  # align=True: the C layout rules (natural alignment, padding)


# Field for field the structs of csrc/cuda/kernels.h and csrc/common/hold.h (pointers as uint64).
STRUCTS = dict([
    _struct("SamplerStepParams", [(f, _P) for f in ("x", "model_out", "model_out_uncond", "history", "history2",
                                                    "history3", "noise", "coef", "seed", "out", "x0_out", "history_out")]
            + [(f, _I8) for f in ("numel", "num_seeds", "per_sample", "step")]
            + [("state_dtype", _I4), ("model_dtype", _I4)]),
    _struct("IadbBlendParams", [(f, _P) for f in ("x0", "x1", "alpha", "out", "target_out")]
            + [("numel", _I8), ("per_sample", _I8), ("state_dtype", _I4), ("alpha_dtype", _I4)]),
    _struct("PhiloxNormalParams", [("seed", _P), ("out", _P)]
            + [(f, _I8) for f in ("numel", "num_seeds", "per_sample", "step", "offset")] + [("out_dtype", _I4)]),
    _struct("HoldTransitionParams", [(f, _P) for f in ("z", "eps_hat", "noise", "coef", "seed", "out")]
            + [(f, _I8) for f in ("batch", "per_component", "num_seeds", "step")]
            + [(f, _I4) for f in ("n", "state_dtype", "model_dtype")]),
    _struct("HoldPerturbParams", [(f, _P) for f in ("z0", "mean_mat", "chol", "noise", "seed", "out", "eps_out")]
            + [(f, _I8) for f in ("batch", "per_component", "num_seeds", "step")]
            + [(f, _I4) for f in ("n", "m", "state_dtype")]),
])
_C_NAMES = {"SamplerStepParams": "dk::gpu::SamplerStepParams", "IadbBlendParams": "dk::gpu::IadbBlendParams",
            "PhiloxNormalParams": "dk::gpu::PhiloxNormalParams", "HoldTransitionParams": "dk::HoldTransitionParams",
            "HoldPerturbParams": "dk::HoldPerturbParams"}
_STRUCT_OF_SOURCE = {"cuda/sampler_step.cu": ["SamplerStepParams"], "cuda/iadb_blend.cu": ["IadbBlendParams"],
                     "cuda/philox_normal.cu": ["PhiloxNormalParams"],
                     "cuda/hold.cu": ["HoldTransitionParams", "HoldPerturbParams"]}


#----------------------------------------------------------------------------
# Sources, options, instantiations (no GPU needed: the tests compile every kernel on the CPU).


def vec_width(dtype: torch.dtype) -> int:
    """Elements per 16-byte access of a state tensor (``vec_width<S>()``)."""
    return 16 // dtype.itemsize


def hold_vec_width(dtype: torch.dtype) -> int:
    """Elements per thread of the packed HOLD kernels (``hold_vec_width<S>()``: 1 for float64)."""
    return 1 if dtype == torch.float64 else 4


def hold_kernel_order(n: int) -> int:
    """The order the packed HOLD kernels are compiled for (``hold_kernel_order`` of common/hold.h):
    n for 2, 3, 4, else 0 (any order, read at run time)."""
    return n if 2 <= n <= 4 else 0


def instantiations(op: str, dtypes: tuple[torch.dtype, ...], order: int | None = None) -> list[str]:
    """Name expressions of ``op``'s kernels for one dtype combination (the vector and the scalar variant).

    hold_transition and hold_perturb: with ``order`` (the process order n), the packed kernel of
    ``hold_kernel_order(n)`` and the scalar one; without, the packed kernels of every kernel order, then the
    scalar one."""
    t = [CTYPES[d] for d in dtypes]
    if op in ("sampler_step", "iadb_blend"):
        return [f"dk::gpu::{op}_kernel<{t[0]}, {t[1]}, {v}>" for v in (vec_width(dtypes[0]), 1)]
    if op == "philox_normal":
        return [f"dk::gpu::philox_normal_kernel<{t[0]}, {v}>" for v in (vec_width(dtypes[0]), 1)]
    if op in ("hold_transition", "hold_perturb"):
        kernel = f"dk::gpu::{op}_kernel<{', '.join(t)}"  # <S, M, V, N> and <S, V, N>
        v = hold_vec_width(dtypes[0])
        if order is None:  # every kernel order: the values hold_kernel_order takes over the valid orders
            from .hold import MAX_ORDER
            orders = sorted({hold_kernel_order(n) for n in range(1, MAX_ORDER + 1)})
        else:
            orders = [hold_kernel_order(order)]
        packed = [f"{kernel}, {v}, {k}>" for k in orders] if v > 1 else []
        return packed + [f"{kernel}, 1, 0>"]
    raise KeyError(f"op: no run-time CUDA kernel for {op!r}; expected one of {OPS}")


def layout_asserts(source: str) -> str:
    """Compile-time checks that the NumPy mirrors match the C structs of ``source``.

    NVRTC has no ``offsetof``, so the layout is pinned by what determines it: a C++20 designated
    initializer listing every field in the mirror's order (out of order does not compile), each field's
    size, and the struct's size (these scalar fields are aligned to their size, as ``align=True`` assumes).
    """
    lines = []
    for name in _STRUCT_OF_SOURCE[source]:
        dt = STRUCTS[name]
        init = ", ".join(f".{f} = {{}}" for f in dt.names)
        lines.append(f"constexpr {_C_NAMES[name]} dk_layout_{name}{{{init}}};  // cuda_rtc.STRUCTS[{name!r}] order")
        for f in dt.names:
            lines.append(f"static_assert(sizeof(dk_layout_{name}.{f}) == {dt.fields[f][0].itemsize}, "
                         f'"cuda_rtc.STRUCTS[{name!r}]: field {f} is not {dt.fields[f][0].itemsize} bytes");')
        lines.append(f'static_assert(sizeof({_C_NAMES[name]}) == {dt.itemsize}, '
                     f'"cuda_rtc.STRUCTS[{name!r}]: size is not {dt.itemsize}");')
    if source == SOURCES["hold_transition"]:  # the kernel order the C++ launcher picks, as plan() does
        from .hold import MAX_ORDER
        lines += [f'static_assert(dk::hold_kernel_order({n}) == {hold_kernel_order(n)}, '
                  f'"cuda_rtc.hold_kernel_order({n}) differs from common/hold.h");' for n in range(1, MAX_ORDER + 1)]
    return "\n".join(lines) + "\n"


@functools.lru_cache(maxsize=None)
def _headers_hash() -> str:
    """The CUDA headers the kernels include: an upgrade of the toolkit behind the same include path (a
    /usr/local/cuda symlink) changes the half/bfloat16 conversions without changing the options."""
    h = hashlib.sha256()
    inc = cuda_include_dir()
    for name in ("cuda_fp16.h", "cuda_fp16.hpp", "cuda_bf16.h", "cuda_bf16.hpp"):
        if (inc / name).is_file():
            h.update(name.encode() + b"\0" + (inc / name).read_bytes())
    return h.hexdigest()


def compile_cubin(source: str, names: list[str], arch: str) -> tuple[bytes, dict[str, str]]:
    """Compile ``csrc/<source>`` with NVRTC for ``sm_<arch>``: (cubin, name expression -> lowered name).

    Needs no GPU. Raises RuntimeError with NVRTC's log when the source does not compile."""
    nvrtc = _nvrtc()
    text = (csrc_dir() / source).read_text() + layout_asserts(source)
    prog = nvrtc.createProgram(text, str(csrc_dir() / source), (), ())
    try:
        for n in names:
            nvrtc.addNameExpression(prog, n)
        try:
            nvrtc.compileProgram(prog, options(arch))
        except nvrtc.NVRTCError as exc:
            raise RuntimeError(f"NVRTC failed to compile {source} for sm_{arch}:\n{nvrtc.getProgramLog(prog)}") from exc
        return nvrtc.getCUBIN(prog), {n: nvrtc.getLoweredName(prog, n) for n in names}
    finally:
        nvrtc.destroyProgram(prog)


def cached_cubin(source: str, names: list[str], arch: str) -> tuple[Path, dict[str, str]]:
    """Path of the cubin of ``names`` (compiled now unless cached) and its lowered names."""
    from diffkern._files import atomic_write

    # Everything the cubin depends on: the sources, the layout checks appended to them (a mirror edited in
    # STRUCTS must recompile, or a stale cubin would skip the check), the CUDA headers, options, NVRTC version.
    key = hashlib.sha256(json.dumps([_sources_hash(), layout_asserts(source), _headers_hash(), list(options(arch)),
                                     names, list(_nvrtc().getVersion())]).encode()).hexdigest()[:24]
    base = cache_dir() / f"{Path(source).stem}-sm{arch}-{key}"
    cubin, meta = base.with_suffix(".cubin"), base.with_suffix(".json")
    if cubin.is_file() and meta.is_file():
        return cubin, json.loads(meta.read_text())
    binary, lowered = compile_cubin(source, names, arch)
    atomic_write(str(cubin), lambda tmp: Path(tmp).write_bytes(binary))
    atomic_write(str(meta), lambda tmp: Path(tmp).write_text(json.dumps(lowered)))  # meta last: marks complete
    return cubin, lowered


#----------------------------------------------------------------------------
# Launch planning, as the C++ launchers (pure functions; tested on the CPU).


def grid_size(work: int, sm_count: int) -> int:
    """Blocks for ``work`` thread-iterations: at most 32 per SM, the grid-stride loop takes the rest."""
    return max(1, min(-(-work // THREADS), sm_count * 32))


def aligned(ptrs, nbytes: int) -> bool:
    """Every non-null pointer a multiple of ``nbytes`` (the packed kernels need it)."""
    return all(p == 0 or p % nbytes == 0 for p in ptrs)


def params(struct: str, **values) -> np.void:
    """One parameter struct as a NumPy structured scalar (unset fields are 0, i.e. null pointers)."""
    rec = np.zeros((), dtype=STRUCTS[struct])
    for k, v in values.items():
        if k not in rec.dtype.names:
            raise KeyError(f"{struct} has no field {k!r}")
        rec[k] = v
    return rec[()]


def ptr(t) -> int:
    return 0 if t is None else t.data_ptr()


def plan(op: str, dtypes: tuple[torch.dtype, ...], state_ptrs, model_ptrs, numel: int, sm_count: int, *,
         whole_packs: bool = True, order: int | None = None):
    """(name expression, grid) of one element-wise launch: the vector kernel when every pointer is aligned
    for it (and ``whole_packs``: the HOLD ops' need P % 4 == 0), else the scalar one. ``order``: the
    process order n of hold_transition and hold_perturb (picks their packed kernel)."""
    if op in ("hold_transition", "hold_perturb") and order is None:
        raise ValueError(f"order: {op}'s launch plan needs the process order n")
    names = instantiations(op, dtypes, order)
    if len(names) == 1:  # float64 HOLD ops: one element per thread-iteration
        return names[0], grid_size(numel, sm_count)
    v = hold_vec_width(dtypes[0]) if op.startswith("hold_") else vec_width(dtypes[0])
    el_m = dtypes[1].itemsize if op in ("sampler_step", "hold_transition") else 0
    if whole_packs and aligned(state_ptrs, v * dtypes[0].itemsize) and aligned(model_ptrs, v * el_m):
        return names[0], grid_size(numel // v, sm_count)
    return names[1], grid_size(numel, sm_count)


#----------------------------------------------------------------------------
# Loading and launching (needs a GPU and CuPy).


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


_functions: dict = {}


def _function(op: str, dtypes: tuple[torch.dtype, ...], name: str, index: int, order: int | None):
    key = (name, index)
    if key not in _functions:
        import cupy

        major, minor = torch.cuda.get_device_capability(index)
        arch = f"{major}{minor}"
        if major * 10 + minor not in _nvrtc().getSupportedArchs():
            raise RtcUnavailable(f"this NVRTC cannot compile for sm_{arch}; install a newer cupy/NVRTC")
        path, lowered = cached_cubin(SOURCES[op], instantiations(op, dtypes, order), arch)
        with cupy.cuda.Device(index):
            module = cupy.RawModule(path=str(path))
            for n, low in lowered.items():
                _functions[(n, index)] = module.get_function(low)
    return _functions[key]


def launch(op: str, dtypes, struct: str, values: dict, state_ptrs, model_ptrs, numel: int, device, *,
           whole_packs: bool = True, order: int | None = None) -> None:
    """Launch ``op``'s kernel for ``dtypes`` over ``numel`` elements on torch's current stream of ``device``."""
    import cupy

    index = device.index if device.index is not None else torch.cuda.current_device()
    name, grid = plan(op, dtypes, state_ptrs, model_ptrs, numel, _sm_count(index), whole_packs=whole_packs,
                      order=order)
    fn = _function(op, dtypes, name, index, order)
    with cupy.cuda.Device(index), cupy_stream(torch.cuda.current_stream(index).cuda_stream, index):
        fn((grid,), (THREADS,), (params(struct, **values),))


#----------------------------------------------------------------------------
# The op implementations (same arguments as the schemas in _lib.py).


def _checks():
    from .registry import _extension
    mod, why = _extension()
    if mod is None or not hasattr(mod, "check_sampler_step"):
        raise RtcUnavailable(f"the run-time CUDA backend validates with diffkern._C's checks: {why or 'rebuild it'}")
    return mod


def _on_cuda(t, name):
    if t.device.type != "cuda":
        raise ValueError(f"{name}: expected a CUDA tensor for the CUDA kernel, got {t.device}")


def sampler_step(x, model_out, model_out_uncond, history, noise, coef, step, seed, out, x0_out, history_out,
                 history2=None, history3=None):
    _checks().check_sampler_step(x, model_out, model_out_uncond, history, noise, coef, step, seed, out, x0_out,
                                 history_out, history2, history3)
    _on_cuda(x, "x")
    if x.numel() == 0:
        return
    state = [ptr(t) for t in (x, history, history2, history3, noise, out, x0_out, history_out)]
    model = [ptr(model_out), ptr(model_out_uncond)]
    values = dict(x=ptr(x), model_out=ptr(model_out), model_out_uncond=ptr(model_out_uncond), history=ptr(history),
                  history2=ptr(history2), history3=ptr(history3), noise=ptr(noise), coef=ptr(coef), seed=ptr(seed), out=ptr(out),
                  x0_out=ptr(x0_out), history_out=ptr(history_out), numel=x.numel(), num_seeds=seed.numel(),
                  per_sample=x.numel() // seed.numel(), step=step, state_dtype=DTYPE_CODES[x.dtype],
                  model_dtype=DTYPE_CODES[model_out.dtype])
    launch("sampler_step", (x.dtype, model_out.dtype), "SamplerStepParams", values, state, model, x.numel(),
           x.device)


def iadb_blend(x0, x1, alpha, out, target_out):
    _checks().check_iadb_blend(x0, x1, alpha, out, target_out)
    _on_cuda(x0, "x0")
    if x0.numel() == 0:
        return
    values = dict(x0=ptr(x0), x1=ptr(x1), alpha=ptr(alpha), out=ptr(out), target_out=ptr(target_out),
                  numel=x0.numel(), per_sample=x0.numel() // x0.shape[0], state_dtype=DTYPE_CODES[x0.dtype],
                  alpha_dtype=DTYPE_CODES[alpha.dtype])
    launch("iadb_blend", (x0.dtype, alpha.dtype), "IadbBlendParams", values,
           [ptr(t) for t in (x0, x1, out, target_out)], [], x0.numel(), x0.device)


def philox_normal(seed, step, offset, out):
    _checks().check_philox_normal(seed, step, offset, out)
    _on_cuda(out, "out")
    if out.numel() == 0:
        return
    values = dict(seed=ptr(seed), out=ptr(out), numel=out.numel(), num_seeds=seed.numel(),
                  per_sample=out.numel() // seed.numel(), step=step, offset=offset, out_dtype=DTYPE_CODES[out.dtype])
    launch("philox_normal", (out.dtype,), "PhiloxNormalParams", values, [ptr(out)], [], out.numel(), out.device)


def hold_transition(z, eps_hat, noise, coef, step, seed, out):
    _checks().check_hold_transition(z, eps_hat, noise, coef, step, seed, out)
    _on_cuda(z, "z")
    if z.numel() == 0:
        return
    n, batch = coef.shape[1], z.shape[0]
    per_component = z.numel() // (batch * n)
    values = dict(z=ptr(z), eps_hat=ptr(eps_hat), noise=ptr(noise), coef=ptr(coef), seed=ptr(seed), out=ptr(out),
                  batch=batch, per_component=per_component, num_seeds=seed.numel(), step=step, n=n,
                  state_dtype=DTYPE_CODES[z.dtype], model_dtype=DTYPE_CODES[eps_hat.dtype])
    launch("hold_transition", (z.dtype, eps_hat.dtype), "HoldTransitionParams", values,
           [ptr(t) for t in (z, noise, out)], [ptr(eps_hat)], batch * per_component, z.device,
           whole_packs=per_component % hold_vec_width(z.dtype) == 0, order=n)


def hold_perturb(z0, mean_mat, chol, noise, step, seed, out, eps_out):
    _checks().check_hold_perturb(z0, mean_mat, chol, noise, step, seed, out, eps_out)
    _on_cuda(z0, "z0")
    if out.numel() == 0:
        return
    n, m, batch = mean_mat.shape[1], mean_mat.shape[2], z0.shape[0]
    per_component = out.numel() // (batch * n)
    values = dict(z0=ptr(z0), mean_mat=ptr(mean_mat), chol=ptr(chol), noise=ptr(noise), seed=ptr(seed),
                  out=ptr(out), eps_out=ptr(eps_out), batch=batch, per_component=per_component,
                  num_seeds=seed.numel(), step=step, n=n, m=m, state_dtype=DTYPE_CODES[z0.dtype])
    launch("hold_perturb", (z0.dtype,), "HoldPerturbParams", values, [ptr(t) for t in (z0, noise, out, eps_out)], [],
           batch * per_component, z0.device, whole_packs=per_component % hold_vec_width(z0.dtype) == 0, order=n)


_registered = False


def register() -> None:
    """Bind these launchers as the CUDA implementations of the diffkern ops (once per process). Where an
    ahead-of-time CUDA build registered its own, they replace it (only when DIFFKERN_CUDA_LOADER=nvrtc)."""
    global _registered
    if _registered:
        return
    from ._lib import LIB
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel.*")
        for op in OPS:
            LIB.impl(op, globals()[op], "CUDA")
    _registered = True
