"""The CUDA sources compile, and (on a GPU) the CUDA ops match the reference.

Compile checks run wherever nvcc exists, GPU or not: every pure-kernel ``csrc/cuda/*.cu`` for sm_80
and sm_90 with warnings as errors, and every torch binding ``csrc/cuda/*.cpp`` with the host compiler
(syntax only: linking needs a CUDA build of torch). The pure kernels must not include torch, so that
NVRTC can compile them as they are.
"""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sysconfig

import pytest
import torch

from diffkern.ops import coefs, philox
from diffkern.ops.iadb import iadb_blend, iadb_blend_reference
from diffkern.ops.sampler_step import sampler_step, sampler_step_reference
from diffkern.testing import assert_matches_reference

ROOT = pathlib.Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
KERNELS = sorted((CSRC / "cuda").glob("*.cu"))  # pure kernels: CUDA runtime and csrc headers only
BINDINGS = sorted((CSRC / "cuda").glob("*.cpp"))  # their torch bindings, host compiler
ARCHS = ("80", "90")


def _nvcc() -> str | None:
    for cand in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.exists(cand):
            return cand
    return None


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, $CUDA_HOME/bin): CUDA sources not compiled")


def _local_includes(path: pathlib.Path, seen: set[pathlib.Path]) -> set[pathlib.Path]:
    """``path`` and every csrc header it includes with quotes, transitively."""
    if path in seen:
        return seen
    seen.add(path)
    for name in re.findall(r'#include\s+"([^"]+)"', path.read_text()):
        for base in (path.parent, CSRC):
            if (base / name).exists():
                _local_includes((base / name).resolve(), seen)
                break
    return seen


@pytest.fixture(scope="module")
def nvcc_results(tmp_path_factory):
    """Compile every kernel file for every arch at once (two cores: the jobs overlap); name -> (rc, log)."""
    out_dir = tmp_path_factory.mktemp("nvcc")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    procs = {}
    for src in KERNELS:
        cmd = [NVCC, "-std=c++20", "-O3", "-I", str(CSRC), "--Werror", "all-warnings", *gencode, "-c", str(src),
               "-o", str(out_dir / (src.stem + ".o"))]
        procs[src.name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return {name: (p.wait(), p.stdout.read()) for name, p in procs.items()}


def test_kernel_files_exist():
    assert {p.stem for p in KERNELS} >= {"sampler_step", "iadb_blend", "philox_normal"}


@pytest.mark.parametrize("src", KERNELS, ids=lambda p: p.name)
def test_pure_kernels_include_no_torch(src):
    for path in _local_includes(src.resolve(), set()):
        system = re.findall(r"#include\s+<([^>]+)>", path.read_text())
        bad = [h for h in system if h.split("/")[0] in ("torch", "ATen", "c10", "pybind11")]
        assert not bad, f"{path.relative_to(ROOT)} includes {bad}: pure kernels must compile without torch (NVRTC)"


@needs_nvcc
@pytest.mark.parametrize("src", KERNELS, ids=lambda p: p.name)
def test_kernel_compiles_sm80_sm90(src, nvcc_results):
    rc, log = nvcc_results[src.name]
    assert rc == 0, f"nvcc failed on {src.name} for sm_{'/sm_'.join(ARCHS)}:\n{log}"


def _cuda_include_dir() -> pathlib.Path | None:
    # nvcc's toolkit first; then CUDA_HOME and /usr/local/cuda, for an nvcc on PATH that is a wrapper script
    # (its resolved path is not inside the toolkit).
    cands = [pathlib.Path(NVCC).resolve().parent.parent] if NVCC else []
    cands += [pathlib.Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")), pathlib.Path("/usr/local/cuda")]
    return next((c / "include" for c in cands if (c / "include" / "cuda_runtime_api.h").exists()), None)


@pytest.mark.skipif(shutil.which("g++") is None or _cuda_include_dir() is None,
                    reason="needs g++ and the CUDA runtime headers")
@pytest.mark.parametrize("src", BINDINGS, ids=lambda p: p.name)
def test_binding_compiles(src, tmp_path):
    """The torch bindings (csrc/cuda/*.cpp), syntax only. A CPU wheel of torch ships c10/cuda without the
    generated cuda_cmake_macros.h; a stand-in (the one macro it defines) lets the rest be checked."""
    from torch.utils.cpp_extension import include_paths

    incs = [CSRC, *map(pathlib.Path, include_paths()), _cuda_include_dir(), sysconfig.get_paths()["include"]]
    if not any((pathlib.Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in incs):
        shim = tmp_path / "c10" / "cuda" / "impl"
        shim.mkdir(parents=True)
        (shim / "cuda_cmake_macros.h").write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
        incs.insert(0, tmp_path)
    cmd = ["g++", "-std=c++20", "-fsyntax-only", "-DDIFFKERN_WITH_CUDA", *[f"-I{p}" for p in incs], str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"g++ failed on {src.relative_to(ROOT)}:\n{res.stderr[-4000:]}"

#----------------------------------------------------------------------------
# On a GPU: the CUDA impls of torch.ops.diffkern.* against the reference.

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _table(device):
    return coefs.table([coefs.row(a=0.9, b=0.1, p=1.3, q=-0.4),  # deterministic (DDIM-like)
                        coefs.row(a=0.7, b=0.2, g=0.05, c=0.3, s=0.4, p=0.5, q=0.8, w=3.0, e=1.0, clip=1.5),
                        coefs.row(a=0.5, b=0.5, c=0.0, s=0.0, f=1.0)], device=device)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 1025), (2, 3, 5, 7), (1, 1), (4, 2, 9, 17)])
def test_cuda_sampler_step_matches_reference(dtype, shape):
    gen = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    m = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    u = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    h = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    seed = torch.arange(7, 7 + shape[0], device="cuda", dtype=torch.int64)
    table = _table("cuda")
    for step in range(table.shape[0]):
        kw = dict(model_out_uncond=u, history=h, seed=seed)
        x0, hn = torch.empty_like(x), torch.empty_like(x)
        out = sampler_step(x, m, table, step, x0_out=x0, history_out=hn, backend="cuda", **kw)
        ref = sampler_step_reference(x.double(), m.double(), table, step, model_out_uncond=u.double(),
                                     history=h.double(), seed=seed)
        eager = sampler_step_reference(x, m, table, step, **kw)
        for got, r, e, what in zip((out, x0, hn), ref, eager, ("out", "x0_out", "history_out")):
            assert_matches_reference(got, r, e, f"{what} step {step} {dtype} {shape}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_deterministic_step_is_bitwise_the_cpu_step(dtype):
    """No fused multiply-add on either side (csrc/common/hd.h): a noise-free row rounds identically."""
    gen = torch.Generator().manual_seed(1)
    x, m, u = (torch.randn(5, 333, generator=gen).to(dtype) for _ in range(3))
    table = coefs.table([coefs.row(a=0.9, b=0.1, g=0.3, p=1.3, q=-0.4, w=2.5, clip=1.0, e=0.5, f=0.5)])
    cpu = sampler_step(x, m, table, 0, model_out_uncond=u, backend="cpp")
    gpu = sampler_step(x.cuda(), m.cuda(), table.cuda(), 0, model_out_uncond=u.cuda(), backend="cuda")
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_iadb_blend_matches_reference(dtype):
    gen = torch.Generator("cuda").manual_seed(2)
    x0 = torch.randn(3, 4, 37, device="cuda", generator=gen).to(dtype)
    x1 = torch.randn(3, 4, 37, device="cuda", generator=gen).to(dtype)
    alpha = torch.rand(3, device="cuda", generator=gen)
    target = torch.empty_like(x0)
    out = iadb_blend(x0, x1, alpha, target_out=target, backend="cuda")
    ref = iadb_blend_reference(x0.double(), x1.double(), alpha.double())
    eager = iadb_blend_reference(x0, x1, alpha)
    assert_matches_reference(out, ref[0], eager[0], "out")
    assert_matches_reference(target, ref[1], eager[1], "target_out")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [0, 2**32 - 5, 2**40 + 3])
def test_cuda_philox_normal_matches_reference(dtype, offset):
    seed = torch.tensor([3, 2**40 + 17], device="cuda", dtype=torch.int64)
    out = philox.randn((2, 1001), seed, step=5, offset=offset, dtype=dtype, backend="cuda")
    ref = philox.philox_normal_reference(seed, 5, offset, (2, 1001), torch.float64)
    eager = philox.philox_normal_reference(seed, 5, offset, (2, 1001), dtype)
    assert_matches_reference(out, ref, eager, f"philox_normal {dtype} offset {offset}")

