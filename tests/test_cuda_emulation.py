"""The CUDA kernels of csrc/cuda run on the CPU through a host emulation (tests/cuda_emulation.cpp), no GPU.

g++ compiles the kernel files as NVRTC sees them, with blocks of 256 host threads (a std::barrier for
__syncthreads), the CUDA headers' own float16/bfloat16 conversions and the host path of the shared
per-element code, and -fsanitize=alignment, which reports every 16-byte access through a misaligned pointer
(a GPU faults with "misaligned address"). Each launch takes the kernel and grid that the run-time loader's
plan (cuda_rtc.plan, the C++ launchers' twin) picks for the actual pointers, or a smaller grid, which every
grid-stride kernel must accept. What a first GPU run would otherwise be the first to check:

* every kernel equals the C++ CPU kernel bitwise with explicit noise (the same per-element code, so any
  difference is indexing: packs, tails, sample crossings, grid strides, in-place order, misaligned views);
* the Philox noise of every kernel is the specification's element by element (seed[i // per_sample], index
  offset + i % per_sample; group and per-element paths alike), and the specification is the Python
  reference's stream to float rounding;
* a float16/bfloat16 state gives exactly the float32 state's result rounded once to nearest even.
"""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

import diffkern.ops as dops
from diffkern.ops import coefs, cuda_rtc, philox
from test_cuda_launcher_host import host_toolchain

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = torch.ops.diffkern
pytestmark = pytest.mark.skipif(dops.backend_status("cpp", "cpu")[1] is not None,
                                reason="the C++ CPU kernels are the comparison")
FLAGS = ["-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-ffp-contract=off", "-fsanitize=alignment",
         "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas", "-D__CUDA_NO_HALF_OPERATORS__",
         "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]


def _build() -> str:
    """The emulation library, built once per source version (a file lock serialises pytest workers)."""
    cxx, inc = host_toolchain()
    src = os.path.join(ROOT, "tests", "cuda_emulation.cpp")
    h = hashlib.sha256(open(src, "rb").read() + cuda_rtc._sources_hash().encode() + " ".join(FLAGS).encode())
    lib = os.path.join(tempfile.gettempdir(), f"diffkern-cuda-emulation-{h.hexdigest()[:16]}.so")
    with open(lib + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(lib):
            tmp = f"{lib}.{os.getpid()}.tmp"
            cmd = [cxx, *FLAGS, f"-I{os.path.join(ROOT, 'csrc')}", f"-I{inc}", src, "-o", tmp]
            res = subprocess.run(cmd, capture_output=True, text=True)
            assert res.returncode == 0, f"the host emulation does not compile:\n{res.stderr[-6000:]}"
            os.replace(tmp, lib)
    return lib


@pytest.fixture(scope="module")
def emu():
    return ctypes.CDLL(_build())


def _struct(name: str, values: dict) -> np.ndarray:
    rec = np.zeros((), dtype=cuda_rtc.STRUCTS[name])
    for k, v in values.items():
        rec[k] = v
    return rec


def run(emu, op: str, dtypes, struct: str, values: dict, state, model, numel: int, *, grid_cap=None,
        whole_packs=True, order=None, force=None):
    """Launch ``op`` in the emulation with the kernel plan() picks (``force``: the name of another) and its grid
    (at most ``grid_cap`` blocks)."""
    name, grid = cuda_rtc.plan(op, dtypes, [cuda_rtc.ptr(t) for t in state], [cuda_rtc.ptr(t) for t in model],
                               numel, 1, whole_packs=whole_packs, order=order)
    name = force or name
    targs = [int(a) for a in re.findall(r"\d+", name[name.index("<"):].split(",", len(dtypes))[-1])]
    grid = min(grid, grid_cap) if grid_cap else grid
    rec = _struct(struct, values)
    codes = [cuda_rtc.DTYPE_CODES[d] for d in dtypes]
    rc = getattr(emu, f"emu_{op}")(ctypes.c_void_p(rec.ctypes.data), *codes, *targs, ctypes.c_uint(grid))
    assert rc == 0, f"{name}: not instantiated by the kernel files (code {rc})"
    return name


def view(t: torch.Tensor, shift: int) -> torch.Tensor:
    """A contiguous copy of t starting ``shift`` elements into its storage (shift 1: misaligned for packs)."""
    buf = torch.zeros(t.numel() + shift, dtype=t.dtype)
    out = buf[shift:].view(t.shape)
    out.copy_(t)
    return out


def spec_noise(emu, seed: torch.Tensor, step: int, offset: int, numel: int, cdt) -> torch.Tensor:
    out = torch.empty(numel, dtype=cdt)
    rc = emu.emu_philox_spec(ctypes.c_void_p(seed.data_ptr()), ctypes.c_longlong(seed.numel()),
                             ctypes.c_longlong(numel), ctypes.c_longlong(offset), ctypes.c_longlong(step),
                             cuda_rtc.DTYPE_CODES[cdt], ctypes.c_void_p(out.data_ptr()))
    assert rc == 0
    return out


def cdt_of(dtype):
    return F64 if dtype == F64 else F32


def bitwise(actual, expected, what):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    bad = actual.view(-1).float().ne(expected.view(-1).float()) & ~(actual.isnan() & expected.isnan()).view(-1)
    assert not bool(bad.any()), f"{what}: {int(bad.sum())} elements differ, first at {int(bad.nonzero()[0])}"


@pytest.fixture(autouse=True)
def no_misaligned_access(capfd):
    """-fsanitize=alignment writes 'runtime error: ... misaligned address' to stderr."""
    yield
    err = capfd.readouterr().err
    assert "misaligned" not in err and "runtime error" not in err, err[-3000:]

#----------------------------------------------------------------------------
# philox_normal


SHAPES = [(1,), (3,), (2, 5), (4, 6), (3, 37), (2, 4100)]


@pytest.mark.parametrize("dtype", [F16, BF16, F32, F64])
@pytest.mark.parametrize("shape", SHAPES)
def test_philox_normal_is_the_spec_element_by_element(emu, dtype, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    for per_sample_seeds in (False, True):
        B = shape[0] if per_sample_seeds else 1
        seed = torch.randint(-2**62, 2**62, (B,), generator=gen, dtype=torch.int64)
        for offset, shift, cap in ((0, 0, None), (4, 0, 1), (1, 0, 2), (6, 1, None), (2**33 + 3, 0, None)):
            out = view(torch.full(shape, float("nan"), dtype=dtype), shift)
            step = 2**32 - 1 if shift else 7
            vals = dict(seed=seed.data_ptr(), out=out.data_ptr(), numel=out.numel(), num_seeds=B,
                        per_sample=out.numel() // B, step=step, offset=offset, out_dtype=cuda_rtc.DTYPE_CODES[dtype])
            name = run(emu, "philox_normal", (dtype,), "PhiloxNormalParams", vals, [out], [], out.numel(), grid_cap=cap)
            want = spec_noise(emu, seed, step, offset, out.numel(), cdt_of(dtype)).to(dtype).view(shape)
            bitwise(out, want, f"{name} B={B} offset={offset} shift={shift}")


@pytest.mark.parametrize("cdt", [F32, F64])
def test_spec_stream_is_the_reference_stream(emu, cdt):
    seed = torch.tensor([12345, -99], dtype=torch.int64)
    got = spec_noise(emu, seed, 3, 5, 2 * 3000, cdt)
    ref = philox.philox_normal_reference(seed, 3, 5, (2, 3000), torch.float64).reshape(-1)
    tol = 64 * torch.finfo(cdt).eps * float(ref.abs().max())  # a few ulps of log/cos/sin at |xi| <~ 5.7
    assert float((got.double() - ref).abs().max()) <= tol

#----------------------------------------------------------------------------
# sampler_step


ROW = coefs.row(a=0.7, b=0.2, g=0.05, c=0.3, c2=-0.1, c3=0.02, s=0.4, p=0.5, q=0.8, w=3.0, e=1.0, f=-0.25, clip=1.5,
                bu=-0.35, fu=0.6)
DET_ROW = coefs.row(a=0.9, b=0.1, c=0.3, p=1.3, q=-0.4, e=0.5, f=0.5)
COMBOS = [(F32, F32), (F64, F64), (F16, F16), (BF16, BF16), (F16, F32), (BF16, F32), (F32, BF16), (F64, F16)]


def _sampler_inputs(shape, S, M, gen, shift):
    def r(dtype, k=1.0):
        return view((torch.randn(shape, generator=gen, dtype=F64) * k).to(dtype), shift)
    return dict(x=r(S, 2.0), model_out=r(M), model_out_uncond=r(M), history=r(S), history2=r(S), history3=r(S),
                noise=r(S))


def _sampler_emu(emu, t, coef, step, seed, *, grid_cap=None, force=None):
    x, m = t["x"], t["model_out"]
    names = ("x", "model_out", "model_out_uncond", "history", "history2", "history3", "noise", "out", "x0_out",
             "history_out")
    vals = {k: cuda_rtc.ptr(t.get(k)) for k in names}
    vals.update(coef=coef.data_ptr(), seed=seed.data_ptr(), numel=x.numel(), num_seeds=seed.numel(),
                per_sample=x.numel() // seed.numel(), step=step, state_dtype=cuda_rtc.DTYPE_CODES[x.dtype],
                model_dtype=cuda_rtc.DTYPE_CODES[m.dtype])
    state = [t.get(k) for k in ("x", "history", "history2", "history3", "noise", "out", "x0_out", "history_out")]
    return run(emu, "sampler_step", (x.dtype, m.dtype), "SamplerStepParams", vals, state,
               [m, t.get("model_out_uncond")], x.numel(), grid_cap=grid_cap, force=force)


def _with_outputs(t, shift, inplace):
    t = dict(t)
    x = t["x"]
    t["out"] = x if inplace else view(torch.full_like(x, float("nan")), shift)
    t["x0_out"] = view(torch.full_like(x, float("nan")), shift)
    t["history_out"] = t["history"] if inplace else view(torch.full_like(x, float("nan")), shift)
    return t


def _cpu_step(t, coef, step, seed):
    outs = {k: torch.empty_like(t["x"]) for k in ("out", "x0_out", "history_out")}
    OPS.sampler_step(t["x"].clone(), t["model_out"], t.get("model_out_uncond"), t.get("history"), t.get("noise"),
                     coef, step, seed, outs["out"], outs["x0_out"], outs["history_out"], t.get("history2"),
                     t.get("history3"))
    return outs


@pytest.mark.parametrize("S,M", COMBOS)
@pytest.mark.parametrize("shape", [(3,), (2, 7), (3, 12), (2, 9000)])
def test_sampler_step_with_explicit_noise_is_the_cpu_kernel(emu, S, M, shape):
    gen = torch.Generator().manual_seed(COMBOS.index((S, M)) * 1000 + shape[-1])
    coef = torch.stack([torch.tensor(DET_ROW, dtype=F64), torch.tensor(ROW, dtype=F64)])
    seed = torch.tensor([5], dtype=torch.int64)
    for shift, inplace, cap in ((0, False, None), (1, False, 1), (0, True, 2), (3, True, None)):
        t = _sampler_inputs(shape, S, M, gen, shift)
        if shift == 3:  # no unconditional output: the bu, fu terms read model_out
            del t["model_out_uncond"]
        step = 1
        want = _cpu_step(t, coef, step, seed)
        t = _with_outputs(t, shift, inplace)
        name = _sampler_emu(emu, t, coef, step, seed, grid_cap=cap)
        for k in ("out", "x0_out", "history_out"):
            bitwise(t[k], want[k], f"{name} {k} shift={shift} inplace={inplace}")


@pytest.mark.parametrize("shape,B", [((4, 6), 4), ((3, 5), 3), ((2, 16), 2), ((5, 1), 5), ((1, 4099), 1), ((2, 4100), 1)])
@pytest.mark.parametrize("S", [F32, F64])
def test_sampler_step_philox_noise_is_the_spec(emu, shape, B, S):
    """Philox noise drawn in the kernel (group path for packs of whole groups, per element otherwise) is the
    spec's: the same step with that noise passed explicitly (exact, S being the compute dtype) is bitwise equal."""
    gen = torch.Generator().manual_seed(B)
    coef = torch.tensor(ROW, dtype=F64)[None]
    seed = torch.randint(-2**62, 2**62, (B,), generator=gen, dtype=torch.int64)
    for shift, cap in ((0, None), (1, 1), (2, 2)):
        t = _sampler_inputs(shape, S, S, gen, shift)
        t.pop("noise")
        t = _with_outputs(t, shift, False)
        name = _sampler_emu(emu, t, coef, 0, seed, grid_cap=cap)
        t2 = _with_outputs(dict(t, noise=spec_noise(emu, seed, 0, 0, t["x"].numel(), S).view(shape)), 0, False)
        _sampler_emu(emu, t2, coef, 0, seed, force=name.replace(name.split(",")[-1], " 1>"))
        for k in ("out", "x0_out", "history_out"):
            bitwise(t[k], t2[k], f"{name} {k} B={B} shift={shift}")


@pytest.mark.parametrize("S", [F16, BF16])
@pytest.mark.parametrize("shape,B", [((4, 6), 4), ((3, 37), 1), ((2, 4100), 2)])
def test_16_bit_state_is_the_float32_result_rounded_once(emu, S, shape, B):
    gen = torch.Generator().manual_seed(7)
    coef = torch.tensor(ROW, dtype=F64)[None]
    seed = torch.randint(0, 2**62, (B,), generator=gen, dtype=torch.int64)
    t = _with_outputs({k: v for k, v in _sampler_inputs(shape, S, F16, gen, 0).items() if k != "noise"}, 0, False)
    t32 = _with_outputs({k: (v.to(F32) if v.dtype == S else v) for k, v in t.items()
                         if k not in ("out", "x0_out", "history_out")}, 0, False)
    _sampler_emu(emu, t, coef, 0, seed)
    _sampler_emu(emu, t32, coef, 0, seed)
    for k in ("out", "x0_out", "history_out"):
        bitwise(t[k], t32[k].to(S), f"{S} {k}")


_MISALIGNED = """
import ctypes, sys, torch
sys.path.insert(0, {tests!r})
import test_cuda_emulation as t
emu = ctypes.CDLL({lib!r})
x = t._with_outputs(t._sampler_inputs((64,), t.F32, t.F32, torch.Generator().manual_seed(0), 1), 1, False)
coef = torch.tensor(t.DET_ROW, dtype=t.F64)[None]
t._sampler_emu(emu, x, coef, 0, torch.tensor([1]), force="dk::gpu::sampler_step_kernel<float, float, 4>")
"""


def test_misaligned_packed_access_is_detected(emu):
    """Control: the packed kernel forced onto a view one element off alignment faults (an aligned SSE load, as
    the GPU's vector load) or is reported by the sanitizer, so the plan's scalar fallback is what the tests see."""
    code = _MISALIGNED.format(tests=os.path.join(ROOT, "tests"), lib=emu._name)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode != 0 or "misaligned" in res.stderr, res.stderr[-2000:]

#----------------------------------------------------------------------------
# iadb_blend


@pytest.mark.parametrize("S,A", [(F32, F32), (F16, F32), (BF16, F64), (F64, F16)])
@pytest.mark.parametrize("shape", [(1, 3), (5, 3), (3, 8), (2, 4099)])
def test_iadb_blend_is_the_cpu_kernel(emu, S, A, shape):
    gen = torch.Generator().manual_seed(shape[1])
    for shift, inplace, cap in ((0, False, None), (1, False, 1), (0, True, 1)):
        x0 = view(torch.randn(shape, generator=gen, dtype=F64).to(S), shift)
        x1 = view(torch.randn(shape, generator=gen, dtype=F64).to(S), shift)
        alpha = torch.rand(shape[0], generator=gen, dtype=F64).to(A)
        out, target = torch.empty_like(x0), torch.empty_like(x0)
        OPS.iadb_blend(x0, x1, alpha, out, target)
        o = x0 if inplace else view(torch.full_like(x0, float("nan")), shift)
        tg = view(torch.full_like(x0, float("nan")), shift)
        vals = dict(x0=x0.data_ptr(), x1=x1.data_ptr(), alpha=alpha.data_ptr(), out=o.data_ptr(),
                    target_out=tg.data_ptr(), numel=x0.numel(), per_sample=x0.numel() // shape[0],
                    state_dtype=cuda_rtc.DTYPE_CODES[S], alpha_dtype=cuda_rtc.DTYPE_CODES[A])
        name = run(emu, "iadb_blend", (S, A), "IadbBlendParams", vals, [x0, x1, o, tg], [], x0.numel(),
                   grid_cap=cap)
        bitwise(o, out, f"{name} out shift={shift} inplace={inplace}")
        bitwise(tg, target, f"{name} target shift={shift} inplace={inplace}")

#----------------------------------------------------------------------------
# hold_transition and hold_perturb


def _hold_table(n, gen, zero_col):
    K = torch.randn(n, n, generator=gen, dtype=F64) * 0.5
    k = torch.randn(n, generator=gen, dtype=F64)
    L = torch.randn(n, n, generator=gen, dtype=F64).tril()
    if zero_col is not None and zero_col < n:
        L[:, zero_col] = 0.0  # eta_j not drawn
    return torch.cat([K, k[:, None], L], 1)[None]


def _hold_transition(emu, z, eps, noise, coef, seed, out, *, cap=None):
    n, B = coef.shape[1], z.shape[0]
    P = z.numel() // (B * n)
    vals = dict(z=z.data_ptr(), eps_hat=eps.data_ptr(), noise=cuda_rtc.ptr(noise), coef=coef.data_ptr(),
                seed=seed.data_ptr(), out=out.data_ptr(), batch=B, per_component=P, num_seeds=seed.numel(), step=0,
                n=n, state_dtype=cuda_rtc.DTYPE_CODES[z.dtype], model_dtype=cuda_rtc.DTYPE_CODES[eps.dtype])
    return run(emu, "hold_transition", (z.dtype, eps.dtype), "HoldTransitionParams", vals, [z, noise, out], [eps],
               B * P, grid_cap=cap, whole_packs=P % cuda_rtc.hold_vec_width(z.dtype) == 0, order=n)


HOLD_CASES = [(1, (2, 1, 5)), (2, (2, 2, 8)), (3, (3, 3, 4)), (3, (1, 6, 7)), (4, (2, 4, 300)), (5, (2, 5, 12)),
              (8, (1, 8, 4))]


@pytest.mark.parametrize("S,M", [(F32, F32), (F64, F32), (BF16, F16), (F16, F32)])
@pytest.mark.parametrize("n,shape", HOLD_CASES)
def test_hold_transition_is_the_cpu_kernel(emu, S, M, n, shape):
    gen = torch.Generator().manual_seed(n * 100 + shape[-1])
    coef = _hold_table(n, gen, zero_col=1)
    B = shape[0]
    seed = torch.tensor([3], dtype=torch.int64)
    for shift, inplace, cap in ((0, False, None), (1, False, 1), (0, True, 1)):
        z = view(torch.randn(shape, generator=gen, dtype=F64).to(S), shift)
        eps = view(torch.randn((B, shape[1] // n, shape[2]), generator=gen, dtype=F64).to(M), shift)
        noise = view(torch.randn(shape, generator=gen, dtype=F64).to(S), shift)
        want = torch.empty_like(z)
        OPS.hold_transition(z, eps, noise, coef, 0, seed, want)
        out = z if inplace else view(torch.full_like(z, float("nan")), shift)
        name = _hold_transition(emu, z, eps, noise, coef, seed, out, cap=cap)
        bitwise(out, want, f"{name} shift={shift} inplace={inplace}")


@pytest.mark.parametrize("S", [F32, F64])
@pytest.mark.parametrize("n,shape", HOLD_CASES)
def test_hold_transition_philox_noise_is_the_spec(emu, S, n, shape):
    gen = torch.Generator().manual_seed(n)
    coef = _hold_table(n, gen, zero_col=0)
    B = shape[0]
    for seed in (torch.tensor([11], dtype=torch.int64), torch.arange(B, dtype=torch.int64) * 977 - 5):
        z = torch.randn(shape, generator=gen, dtype=F64).to(S)
        eps = torch.randn((B, shape[1] // n, shape[2]), generator=gen, dtype=F64).to(S)
        got, want = torch.full_like(z, float("nan")), torch.full_like(z, float("nan"))
        name = _hold_transition(emu, z, eps, None, coef, seed, got, cap=2)
        noise = spec_noise(emu, seed, 0, 0, z.numel(), S).view(shape)
        _hold_transition(emu, z, eps, noise, coef, seed, want)
        bitwise(got, want, f"{name} seeds={seed.numel()}")


def _hold_perturb(emu, z0, mean_mat, chol, noise, seed, out, eps_out, *, cap=None):
    B, n, m = mean_mat.shape
    P = out.numel() // (B * n)
    vals = dict(z0=z0.data_ptr(), mean_mat=mean_mat.data_ptr(), chol=chol.data_ptr(), noise=cuda_rtc.ptr(noise),
                seed=seed.data_ptr(), out=out.data_ptr(), eps_out=cuda_rtc.ptr(eps_out), batch=B, per_component=P,
                num_seeds=seed.numel(), step=2, n=n, m=m, state_dtype=cuda_rtc.DTYPE_CODES[z0.dtype])
    return run(emu, "hold_perturb", (z0.dtype,), "HoldPerturbParams", vals, [z0, noise, out, eps_out], [], B * P,
               grid_cap=cap, whole_packs=P % cuda_rtc.hold_vec_width(z0.dtype) == 0, order=n)


@pytest.mark.parametrize("S", [F32, F64, BF16])
@pytest.mark.parametrize("n,m,C,H", [(1, 1, 1, 5), (2, 1, 2, 8), (3, 3, 1, 12), (4, 1, 3, 7), (5, 5, 1, 4)])
def test_hold_perturb_is_the_cpu_kernel_and_the_spec(emu, S, n, m, C, H):
    gen = torch.Generator().manual_seed(n * 10 + m)
    B = 3
    mean_mat = torch.randn(B, n, m, generator=gen, dtype=F64)
    chol = torch.randn(B, n, n, generator=gen, dtype=F64).tril()
    seeds = torch.tensor([8, -8, 2**40], dtype=torch.int64)
    for shift, cap, seed in ((0, None, seeds[:1]), (1, 1, seeds), (0, 2, seeds)):
        z0 = view(torch.randn(B, m * C, H, generator=gen, dtype=F64).to(S), shift)
        noise = view(torch.randn(B, n * C, H, generator=gen, dtype=F64).to(S), shift)
        want, want_eps = torch.empty(B, n * C, H, dtype=S), torch.empty(B, C, H, dtype=S)
        OPS.hold_perturb(z0, mean_mat, chol, noise, 2, seed, want, want_eps)
        out = z0 if m == n and shift == 0 else view(torch.full_like(want, float("nan")), shift)
        eps_out = view(torch.full_like(want_eps, float("nan")), shift)
        name = _hold_perturb(emu, z0, mean_mat, chol, noise, seed, out, eps_out, cap=cap)
        bitwise(out, want, f"{name} out shift={shift}")
        bitwise(eps_out, want_eps, f"{name} eps_out shift={shift}")
        if S == BF16:
            continue
        z0 = view(torch.randn(B, m * C, H, generator=gen, dtype=F64).to(S), shift)
        got, got_eps = view(torch.full_like(want, float("nan")), shift), view(torch.full_like(want_eps, 0.0), shift)
        _hold_perturb(emu, z0, mean_mat, chol, None, seed, got, got_eps, cap=cap)
        noise = spec_noise(emu, seed, 2, 0, want.numel(), S).view(want.shape)
        ref, ref_eps = torch.empty_like(want), torch.empty_like(want_eps)
        _hold_perturb(emu, z0, mean_mat, chol, noise, seed, ref, ref_eps)
        bitwise(got, ref, f"{name} Philox out shift={shift}")
        bitwise(got_eps, ref_eps, f"{name} Philox eps_out shift={shift}")
