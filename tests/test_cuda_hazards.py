"""GPU-only hazards of the CUDA C++ kernels (csrc/cuda) that the CPU tests cannot show, checked without a GPU.

NVRTC (the run-time loader's compiler, with its options) and nvcc (with setup.py's flags) compile the kernels
to PTX for sm_90, and the tests read facts off it:

* every kernel is compiled for the block size the launchers use (``.maxntid 256``, so no launch fails for
  too many registers), and its global thread index and grid stride are 64-bit products;
* IEEE arithmetic: no fast-math instruction (approximate division, sqrt, log, sin/cos, flushed denormals),
  float16/bfloat16 stores round to nearest even, the clamp keeps NaN (no min/max), the Box-Muller angle is
  rounded before sincos as on the CPU, and the per-element formulas shared with the C++ CPU kernels
  (csrc/common) are never contracted into FMAs (a control shows NVRTC would contract a plain ``a*b + c``);
* the run-time loader: its disk cache never serves a cubin whose layout checks were not compiled, the
  CUDA-stream wrapper is CuPy's non-deprecated one and never destroys torch's stream, zero-size calls launch
  nothing, and the launch plan reads the storage offset.

The ``cuda``-marked tests at the end need a GPU: indices past 2**31, a tensor on another device than the
current one, graph capture of the NVRTC launch, misaligned views.
"""
from __future__ import annotations

import gc
import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from diffkern.ops import coefs, cuda_rtc
from test_cuda_rtc import _nvrtc_missing, needs_nvrtc

ROOT = pathlib.Path(__file__).resolve().parents[1]
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
# Every state dtype (the model dtype equal, then two mixed pairs): each kernel body the launchers can pick.
COMBOS2 = [(s, s) for s in (F16, BF16, F32, F64)] + [(BF16, F32), (F16, F64)]
COMBOS = {"sampler_step": COMBOS2, "iadb_blend": COMBOS2, "hold_transition": COMBOS2,
          "philox_normal": [(d,) for d in (F16, BF16, F32, F64)], "hold_perturb": [(d,) for d in (F16, BF16, F32, F64)]}


NVCC = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)


def nvrtc_ptx(text: str, names=(), arch: str = "90") -> str:
    """PTX of ``text`` compiled by NVRTC with the run-time loader's options (for compute_<arch>)."""
    nvrtc = cuda_rtc._nvrtc()
    opts = [o for o in cuda_rtc.options(arch) if not o.startswith("--gpu-architecture")]
    prog = nvrtc.createProgram(text, "probe.cu", (), ())
    try:
        for n in names:
            nvrtc.addNameExpression(prog, n)
        try:
            nvrtc.compileProgram(prog, opts + [f"--gpu-architecture=compute_{arch}"])
        except nvrtc.NVRTCError as exc:
            raise RuntimeError(nvrtc.getProgramLog(prog)) from exc
        ptx = nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    return ptx.decode() if isinstance(ptx, bytes) else ptx


def entries(ptx: str) -> dict[str, str]:
    """Kernel name -> the PTX of its body."""
    heads = list(re.finditer(r"\.entry\s+(\w+)\(", ptx))
    return {m.group(1): ptx[m.start():(heads[i + 1].start() if i + 1 < len(heads) else len(ptx))]
            for i, m in enumerate(heads)}


@pytest.fixture(scope="module")
def kernel_ptx():
    """Source -> PTX of every kernel instantiation of COMBOS, as the run-time loader compiles it."""
    if _nvrtc_missing():
        pytest.skip(_nvrtc_missing())
    out = {}
    for source in sorted(set(cuda_rtc.SOURCES.values())):
        names = [n for op, src in cuda_rtc.SOURCES.items() if src == source for d in COMBOS[op]
                 for n in cuda_rtc.instantiations(op, d)]
        text = (cuda_rtc.csrc_dir() / source).read_text() + cuda_rtc.layout_asserts(source)
        out[source] = nvrtc_ptx(text, names)
    return out


#----------------------------------------------------------------------------
# Launch geometry.


def _regs(body: str, special: str) -> set[str]:
    return set(re.findall(rf"mov\.u32\s+(%r\d+), %{special};", body))


def _products(body: str, a: set[str], b: set[str], kinds: str) -> list[str]:
    """The multiply(-add) instructions of ``kinds`` with one operand from ``a`` and one from ``b``."""
    found = []
    for line in re.findall(rf"\b(?:mul|mad)\.{kinds}\s+[^;]+;", body):
        ops = re.findall(r"%r\d+", line.split(",", 1)[1])[:2]
        if len(ops) == 2 and ((ops[0] in a and ops[1] in b) or (ops[0] in b and ops[1] in a)):
            found.append(line)
    return found


def _widened(body: str, a: set[str], b: set[str]) -> bool:
    """a*b is computed in 64 bits: one widening multiply, or both operands extended to 64 bits first."""
    ext = set(re.findall(r"cvt\.u64\.u32\s+%rd\d+, (%r\d+);", body))
    return bool(_products(body, a, b, "wide.u32")) or bool(a & ext and b & ext)


def test_block_size_is_the_launchers_and_the_kernels_bound(kernel_ptx):
    """A launch of more threads than ``__launch_bounds__`` fails on the GPU only; the bound, kThreads and the
    NVRTC launcher's THREADS are one number."""
    text = (ROOT / "csrc/cuda/device_utils.cuh").read_text()
    assert re.search(r"constexpr int kThreads = (\d+);", text).group(1) == str(cuda_rtc.THREADS)
    for source, ptx in kernel_ptx.items():
        for name, body in entries(ptx).items():
            assert f".maxntid {cuda_rtc.THREADS}, 1, 1" in body, f"{source}: {name} has no 256-thread bound"


def test_thread_index_and_grid_stride_are_64_bit(kernel_ptx):
    """blockIdx.x * blockDim.x (and gridDim.x * blockDim.x) is a widening multiply: a 32-bit one wraps past
    2**31 elements (or 2**31 / V packs) on a GPU, which no CPU test reaches."""
    for source, ptx in kernel_ptx.items():
        for name, body in entries(ptx).items():
            ctaid, nctaid, ntid = (_regs(body, s) for s in ("ctaid.x", "nctaid.x", "ntid.x"))
            assert ctaid and nctaid and ntid, f"{source}: {name} reads no grid geometry"
            assert _widened(body, ctaid, ntid), f"{name}: blockIdx.x*blockDim.x is not a 64-bit product"
            assert _widened(body, nctaid, ntid), f"{name}: gridDim.x*blockDim.x is not a 64-bit product"
            narrow = _products(body, ctaid | nctaid, ntid, r"lo\.[su]32")
            assert not narrow, f"{name}: 32-bit grid products {narrow}"


def test_grid_stays_within_launch_limits():
    """One grid dimension (x <= 2**31 - 1), at least one block, at most 32 per SM, for any work size."""
    for work in (0, 1, 255, 256, 257, 2**31, 2**40, 2**62):
        for sms in (1, 132, 1000):
            g = cuda_rtc.grid_size(work, sms)
            assert 1 <= g <= min(2**31 - 1, 32 * sms), (work, sms, g)
    text = (ROOT / "csrc/cuda/device_utils.cuh").read_text()  # the C++ launcher's rule, mirrored
    assert "static_cast<long long>(sms) * 32" in text and "(wanted > 0 ? wanted : 1)" in text


@pytest.mark.parametrize("offset_elems", [0, 1, 3])
def test_launch_plan_reads_the_storage_offset(offset_elems):
    """The vector kernel's alignment test must see a view's storage offset (data_ptr includes it)."""
    buf = torch.zeros(64, dtype=F32)
    view = buf[offset_elems:offset_elems + 32]
    assert cuda_rtc.ptr(view) == buf.data_ptr() + 4 * offset_elems
    aligned = (buf.data_ptr() + 4 * offset_elems) % 16 == 0
    name, _ = cuda_rtc.plan("philox_normal", (F32,), [cuda_rtc.ptr(view)], [], 32, 132)
    assert name.endswith(", 4>" if aligned else ", 1>")


@pytest.mark.parametrize("binding", ["ops.cpp", "hold_ops.cpp"])
def test_bindings_skip_empty_tensors_then_guard_the_device_before_the_stream(binding):
    """Each op returns on an empty tensor before any CUDA call, then sets the tensors' device (CUDAGuard) before
    it reads the current stream and launches: getCurrentCUDAStream() is the *current* device's stream, so
    without the guard a tensor on cuda:1 would launch on cuda:0's stream."""
    text = (ROOT / "csrc/cuda" / binding).read_text()
    bodies = re.findall(r"\nvoid (\w+_cuda)\((.*?)\n}\n", text, flags=re.S)
    assert len(bodies) == (3 if binding == "ops.cpp" else 2)
    for name, body in bodies:
        empty, guard = body.find(".numel() == 0) return;"), body.find("c10::cuda::CUDAGuard guard(")
        launch = body.find("_launch(")
        assert 0 <= empty < guard < launch, f"{binding}: {name} must return on empty, guard, then launch"


def test_zero_size_calls_launch_nothing(monkeypatch):
    """An empty tensor must not reach a launch (a grid of 0 blocks is an invalid launch on a GPU)."""
    from diffkern.ops import registry
    if registry._extension()[0] is None:
        pytest.skip("the NVRTC ops validate with diffkern._C's checks")
    launched = []
    monkeypatch.setattr(cuda_rtc, "_on_cuda", lambda t, name: None)
    monkeypatch.setattr(cuda_rtc, "launch", lambda *a, **k: launched.append(a[0]))
    x, seed = torch.zeros(0, 3), torch.zeros(1, dtype=torch.int64)
    table = torch.zeros(1, coefs.NCOEF, dtype=F64)
    cuda_rtc.sampler_step(x, x, None, None, None, table, 0, seed, x, None, None)
    cuda_rtc.iadb_blend(x, x, torch.zeros(0), x, None)
    cuda_rtc.philox_normal(seed, 0, 0, torch.zeros(0))
    z = torch.zeros(0, 2, 3)
    cuda_rtc.hold_transition(z, torch.zeros(0, 1, 3), None, torch.zeros(1, 2, 5, dtype=F64), 0, seed, z)
    cuda_rtc.hold_perturb(z, torch.zeros(0, 2, 2, dtype=F64), torch.zeros(0, 2, 2, dtype=F64), None, 0, seed, z, None)
    assert launched == []

#----------------------------------------------------------------------------
# Floating point: what the GPU rounds must be what the CPU build rounds.

FAST_MATH = [r"\.approx\.(?:ftz\.)?f32", r"\.ftz\.f32", r"\bdiv\.full\.", r"\b(?:ex2|lg2|sin|cos|tanh)\.approx",
             r"\b(?:sqrt|rsqrt)\.approx", r"\bcvt\.r[zmp]\.b?f16\.f32"]


def assert_ieee(ptx: str, what: str) -> None:
    # rcp.approx.ftz.f64 stays allowed: libdevice's double log seeds a Newton iteration with it.
    bad = sorted({m.group(0) for pat in FAST_MATH for m in re.finditer(pat, ptx)})
    assert not bad, f"{what}: fast-math instructions {bad} (use IEEE division/sqrt/logf/sincosf, no -ftz)"
    assert not re.search(r"\b(?:min|max)(?:\.NaN)?(?:\.ftz)?\.f(?:16|32|64)\b", ptx), (
        f"{what}: a float min/max drops NaN where the CPU's comparisons keep it (clamp_sym)")


@needs_nvrtc
def test_kernels_use_ieee_arithmetic_only(kernel_ptx):
    for source, ptx in kernel_ptx.items():
        assert_ieee(ptx, source)
        assert "sqrt.rn.f32" in ptx or source == "cuda/iadb_blend.cu"
    stores = kernel_ptx["cuda/philox_normal.cu"]
    assert "cvt.rn.f16.f32" in stores and "cvt.rn.bf16.f32" in stores  # round to nearest even, as torch's .to()


@needs_nvrtc
def test_box_muller_angle_is_rounded_before_sincos(kernel_ptx):
    """theta = C(2 pi) * ub is one rounded product on the CPU (libm sincos of it); folded into an FMA inside
    sincosf on the GPU it would be another angle."""
    for source in ("cuda/philox_normal.cu", "cuda/sampler_step.cu", "cuda/hold.cu"):
        ptx = kernel_ptx[source]
        uses32 = re.findall(r"^\s*(\S+)[^\n]*\b0f40C90FDB\b", ptx, flags=re.M)  # float(2 pi)
        uses64 = re.findall(r"^\s*(\S+)[^\n]*\b0d401921FB54442D18\b", ptx, flags=re.M)
        assert uses32 and set(uses32) <= {"mul.f32", "mul.rn.f32"}, (source, set(uses32))
        assert uses64 and set(uses64) <= {"mul.f64", "mul.rn.f64"}, (source, set(uses64))


PROBE = r"""
#include "common/sampler_step.h"
#include "common/iadb_blend.h"
#include "common/hold.h"
template <class C>
__global__ void shared_formulas(const double* row, const C* v, C* o, int flags) {
  const dk::StepRow<C> r = dk::load_step_row<C>(row);
  dk::sampler_step_element<C>(r, flags & 1, flags & 2, flags & 2, flags & 2, flags & 4, v[0], v[1], v[2], v[3], v[39],
                              v[40], v[4], o[0], o[1]);
  o[2] = dk::history_element(r, v[0], o[1]);
  dk::iadb_blend_element<C>(v[5], v[6], v[7], o[3], o[4]);
  dk::HoldRow<C> hr;
  dk::load_hold_row(row, 3, hr);
  dk::hold_transition_element<C, 3>(hr, 3, v + 8, v[11], v + 12, o + 5);
  C M[3][3], L[3][3];
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) M[i][j] = v[15 + 3 * i + j], L[i][j] = v[24 + 3 * i + j];
  dk::hold_perturb_element<C, 3>(3, flags >> 3, M, L, v + 33, v + 36, o + 8);
}
template __global__ void shared_formulas<float>(const double*, const float*, float*, int);
template __global__ void shared_formulas<double>(const double*, const double*, double*, int);
__global__ void control(const float* v, float* o) { o[0] = v[0] * v[1] + v[2]; }
"""


@needs_nvrtc
def test_shared_formulas_are_never_contracted_into_fma():
    """The CPU build passes -ffp-contract=off; NVRTC/nvcc contract by default (--fmad=true: the control's
    a*b + c becomes fma.rn.f32), so the formulas of csrc/common must round every product and sum on their own
    (mul_rn/add_rn: __fmul_rn, __fadd_rn, __dmul_rn, ...) to equal the CPU kernels bit for bit."""
    found = entries(nvrtc_ptx(PROBE))
    control = next(body for name, body in found.items() if "control" in name)
    assert "fma.rn.f32" in control, "NVRTC no longer contracts by default: the control proves nothing"
    formulas = {name: body for name, body in found.items() if "shared_formulas" in name}
    assert len(formulas) == 2
    for name, body in formulas.items():
        assert not re.search(r"\b(?:fma|mad)\.[a-z.]*f(?:32|64)\b", body), f"{name}: contracted into FMA"
        assert re.search(r"\bmul\.rn\.f(?:32|64)\b", body) and re.search(r"\badd\.rn\.f(?:32|64)\b", body)


def _setup_module():
    spec = importlib.util.spec_from_file_location("diffkern_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # main() runs only as a script
    return mod


def test_build_flags_keep_ieee_and_embed_ptx():
    flags = _setup_module().nvcc_flags(["80", "90"])
    bad = [f for f in flags if re.search(r"fast.?math|ftz=true|prec-(?:div|sqrt)=false", f)]
    assert not bad, bad
    # PTX of the newest architecture, so a newer GPU JIT-compiles the kernels instead of failing every launch
    assert "-gencode=arch=compute_90,code=compute_90" in flags
    assert "-gencode=arch=compute_80,code=sm_80" in flags and "-gencode=arch=compute_90,code=sm_90" in flags


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("source", ["sampler_step.cu", "philox_normal.cu"])
def test_nvcc_build_flags_give_ieee_ptx(source, tmp_path):
    """The ahead-of-time build (setup.py's device flags and torch's defines) compiles the same IEEE code."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    flags = [f for f in _setup_module().nvcc_flags(["90"]) if not f.startswith("-gencode")]
    out = tmp_path / "k.ptx"
    cmd = [NVCC, "-O3", *flags, *COMMON_NVCC_FLAGS, "-I", str(ROOT / "csrc"), "-arch=compute_90", "-ptx",
           str(ROOT / "csrc/cuda" / source), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    assert_ieee(out.read_text(), f"nvcc {source}")

#----------------------------------------------------------------------------
# The run-time loader's cache and stream.


@needs_nvrtc
def test_cache_never_serves_a_cubin_whose_layout_checks_changed(tmp_path, monkeypatch):
    """A mirror in STRUCTS edited out of step with the C struct must fail to compile, not load the cubin
    cached before the edit (the launch would pass misplaced fields to the kernel)."""
    monkeypatch.setenv("DIFFKERN_CACHE_DIR", str(tmp_path))
    names = cuda_rtc.instantiations("philox_normal", (F32,))
    cuda_rtc.cached_cubin("cuda/philox_normal.cu", names, "90")
    fields = dict(cuda_rtc.STRUCTS["PhiloxNormalParams"].fields)
    order = ["out", "seed"] + [f for f in cuda_rtc.STRUCTS["PhiloxNormalParams"].names if f not in ("seed", "out")]
    swapped = __import__("numpy").dtype([(f, fields[f][0]) for f in order], align=True)
    monkeypatch.setitem(cuda_rtc.STRUCTS, "PhiloxNormalParams", swapped)
    with pytest.raises(RuntimeError, match="NVRTC failed"):
        cuda_rtc.cached_cubin("cuda/philox_normal.cu", names, "90")


@needs_nvrtc
def test_cache_key_covers_the_cuda_headers(tmp_path, monkeypatch):
    """The include path can stay the same while the toolkit behind it changes (a /usr/local/cuda symlink)."""
    monkeypatch.setenv("DIFFKERN_CACHE_DIR", str(tmp_path))
    names = cuda_rtc.instantiations("philox_normal", (F32,))
    first, _ = cuda_rtc.cached_cubin("cuda/philox_normal.cu", names, "90")
    assert len(cuda_rtc._headers_hash()) == 64
    monkeypatch.setattr(cuda_rtc, "_headers_hash", lambda: "another toolkit")
    second, _ = cuda_rtc.cached_cubin("cuda/philox_normal.cu", names, "90")
    assert first != second


@pytest.mark.skipif(torch.cuda.is_available(), reason="wraps a fake handle: on a GPU see the cuda tests")
def test_stream_wrapper_is_not_deprecated_and_never_owns_the_stream(monkeypatch):
    """CuPy 14 deprecates ExternalStream (a warning per launch); Stream.from_external wraps torch's stream
    without owning it: dropping the wrapper must not destroy the stream (here, with no driver, a destroy
    attempt would raise inside __del__ and reach sys.unraisablehook)."""
    pytest.importorskip("cupy")
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        s = cuda_rtc.cupy_stream(0x5EED, 0)
    assert s.ptr == 0x5EED
    del s
    gc.collect()
    assert unraisable == []

#----------------------------------------------------------------------------
# On a GPU.


def _loaders():
    from diffkern.ops import registry
    out = [pytest.param(cuda_rtc, id="nvrtc", marks=needs_nvrtc)]
    if registry._extension()[0] is not None and registry._extension()[0].has_cuda():
        out.append(pytest.param(torch.ops.diffkern, id="aot"))
    return out


@pytest.mark.cuda
@pytest.mark.parametrize("ops", _loaders())
def test_cuda_philox_indices_past_2_31(ops):
    """Elements past 2**31 get the normals of their own 64-bit index (no wrapped offsets or counters)."""
    from diffkern.ops import philox
    n = 2**31 + 37
    if torch.cuda.get_device_properties(0).total_memory < 2 * 4 * n:
        pytest.skip("needs about 17 GB of GPU memory")
    seed = torch.tensor([11], dtype=torch.int64, device="cuda")
    out = torch.empty(n, dtype=F32, device="cuda")
    ops.philox_normal(seed, 3, 0, out)
    start = 2**31 - 5
    ref = philox.philox_normal_reference(seed.cpu(), 3, start, (n - start,), F32)
    tail = out[start:].cpu()
    del out
    torch.testing.assert_close(tail, ref, rtol=1e-5, atol=1e-5)  # libm vs CUDA logf/sincosf: a few ulp


@pytest.mark.cuda
@pytest.mark.parametrize("ops", _loaders())
def test_cuda_launch_follows_the_tensors_device(ops):
    """A tensor on cuda:1 while cuda:0 is current: the launch goes to cuda:1 (device guard, that device's
    stream and module), with the same values as on cuda:0."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    outs = []
    for dev in ("cuda:0", "cuda:1"):
        seed = torch.tensor([5, 6], dtype=torch.int64, device=dev)
        out = torch.empty(2, 1001, device=dev)
        with torch.cuda.device(0):
            ops.philox_normal(seed, 2, 7, out)
        outs.append(out.cpu())
    assert torch.equal(outs[0], outs[1])


@pytest.mark.cuda
@needs_nvrtc
def test_cuda_nvrtc_launch_is_captured_on_torchs_stream():
    """A launch on another stream than torch's current one would fail the capture (or run outside it)."""
    seed = torch.tensor([9], dtype=torch.int64, device="cuda")
    out = torch.empty(4099, device="cuda")
    cuda_rtc.philox_normal(seed, 1, 0, out)  # compile and load before capturing
    eager = out.clone()
    out.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cuda_rtc.philox_normal(seed, 1, 0, out)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


@pytest.mark.cuda
@pytest.mark.parametrize("ops", _loaders())
@pytest.mark.parametrize("dtype", [F16, F32, F64])
def test_cuda_misaligned_views_take_the_scalar_kernel(ops, dtype):
    """Views one element off a 16-byte boundary (storage offset) give the aligned launch's values."""
    from diffkern.testing import make_tensor, random_table
    n = 3 * 1031
    x, m = (make_tensor((n + 1,), dtype, seed=s, device="cuda")[1:] for s in (0, 1))  # misaligned views
    table, seed = random_table(1).cuda(), torch.tensor([4], dtype=torch.int64, device="cuda")
    results = []
    for xv, mv, out in ((x.clone(), m.clone(), torch.empty(n, dtype=dtype, device="cuda")),
                        (x, m, torch.empty(n + 1, dtype=dtype, device="cuda")[1:])):
        ops.sampler_step(xv, mv, None, None, None, table, 0, seed, out, None, None)
        results.append(out.cpu())
    assert torch.equal(results[0], results[1])


@pytest.mark.cuda
@needs_nvrtc
def test_cuda_stream_wrapper_leaves_torchs_stream_alive():
    stream = torch.cuda.Stream()
    wrapper = cuda_rtc.cupy_stream(stream.cuda_stream, torch.cuda.current_device())
    assert wrapper.ptr == stream.cuda_stream
    del wrapper
    gc.collect()
    with torch.cuda.stream(stream):
        y = torch.ones(1000, device="cuda") * 2
    stream.synchronize()  # fails on a destroyed stream
    assert float(y.sum()) == 2000
