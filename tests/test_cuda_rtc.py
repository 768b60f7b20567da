"""The run-time CUDA loader (diffkern/ops/cuda_rtc.py): NVRTC compiles every kernel of csrc/cuda for sm_80
and sm_90 without a GPU, the parameter structs match the C layout, the launch plan matches the C++
launchers, the disk cache, and the registry's choice of loader. On a GPU: every op launched through NVRTC
against the float64 reference and against the ahead-of-time build (bench/gpu_suite.sh also runs the
whole CUDA op suite with DIFFKERN_CUDA_LOADER=nvrtc).
"""
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import diffkern.ops as dops
from diffkern.ops import cuda_rtc, registry

ALL = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _nvrtc_missing():
    try:
        cuda_rtc._nvrtc()
        cuda_rtc.cuda_include_dir()
    except cuda_rtc.RtcUnavailable as exc:
        return str(exc)
    return None


needs_nvrtc = pytest.mark.skipif(_nvrtc_missing() is not None, reason=f"no NVRTC here: {_nvrtc_missing()}")


def _combos(op):
    if op in ("sampler_step", "iadb_blend", "hold_transition"):
        return list(itertools.product(ALL, ALL))
    return [(d,) for d in ALL]


#----------------------------------------------------------------------------
# Device-free: layout, plan, sources.


def test_struct_sizes_match_the_c_layout():
    # 8-byte pointers and long longs, 4-byte enums, the struct padded to 8 bytes.
    assert {k: v.itemsize for k, v in cuda_rtc.STRUCTS.items()} == {
        "SamplerStepParams": 136, "IadbBlendParams": 64, "PhiloxNormalParams": 64, "HoldTransitionParams": 96,
        "HoldPerturbParams": 104}


def test_params_fill_fields_and_reject_unknown_ones():
    p = cuda_rtc.params("PhiloxNormalParams", seed=16, out=2**40, numel=7, step=3, out_dtype=2)
    assert (int(p["seed"]), int(p["out"]), int(p["numel"]), int(p["step"]), int(p["out_dtype"])) == (16, 2**40, 7, 3, 2)
    assert int(p["offset"]) == 0
    with pytest.raises(KeyError, match="no field 'sed'"):
        cuda_rtc.params("PhiloxNormalParams", sed=1)


@pytest.mark.parametrize("struct", sorted(cuda_rtc.STRUCTS))
def test_cupy_packs_the_struct_byte_for_byte(struct):
    """The bytes CuPy hands to cuLaunchKernel for a structured scalar are the struct's bytes."""
    import ctypes
    scalar = pytest.importorskip("cupy._core._scalar")
    values = {f: i + 1 for i, f in enumerate(cuda_rtc.STRUCTS[struct].names)}
    p = cuda_rtc.params(struct, **values)
    packed = scalar.CScalar(p)
    seen = np.frombuffer(ctypes.string_at(packed.ptr, p.dtype.itemsize), dtype=p.dtype)[0]  # padding ignored
    assert seen.tolist() == p.tolist() == tuple(values.values())


def test_grid_size_as_the_cpp_launcher():
    assert cuda_rtc.grid_size(1, 132) == 1
    assert cuda_rtc.grid_size(0, 132) == 1
    assert cuda_rtc.grid_size(257, 132) == 2
    assert cuda_rtc.grid_size(10**12, 132) == 132 * 32


def test_plan_picks_the_vector_kernel_only_when_every_pointer_is_aligned():
    f32, bf16 = torch.float32, torch.bfloat16
    name, grid = cuda_rtc.plan("sampler_step", (f32, bf16), [256, 512, 0], [1024], 4096, 132)
    assert name == "dk::gpu::sampler_step_kernel<float, __nv_bfloat16, 4>" and grid == 4
    name, grid = cuda_rtc.plan("sampler_step", (f32, bf16), [256, 516], [1024], 4096, 132)  # x offset by 1 element
    assert name.endswith(", 1>") and grid == 16
    name, _ = cuda_rtc.plan("sampler_step", (f32, bf16), [256], [1032], 4096, 132)  # model_out: 8 B, needs 4*2
    assert name.endswith(", 4>")
    name, _ = cuda_rtc.plan("sampler_step", (f32, bf16), [256], [1028], 4096, 132)
    assert name.endswith(", 1>")
    assert cuda_rtc.plan("philox_normal", (torch.float16,), [16], [], 80, 132)[0].endswith("<__half, 8>")
    assert cuda_rtc.plan("hold_perturb", (torch.float64,), [256], [], 300, 132, order=3) == (
        "dk::gpu::hold_perturb_kernel<double, 1, 0>", 2)
    # hold_transition: four elements per thread when P % 4 == 0 and z, noise, out, eps_hat are 4-element aligned
    name, grid = cuda_rtc.plan("hold_transition", (bf16, f32), [256, 0, 512], [1024], 4096, 132, order=5)
    assert name == "dk::gpu::hold_transition_kernel<__nv_bfloat16, float, 4, 0>" and grid == 4
    assert cuda_rtc.plan("hold_transition", (bf16, f32), [256, 0, 516], [1024], 4096, 132, order=5)[0].endswith(
        ", 1, 0>")
    assert cuda_rtc.plan("hold_transition", (bf16, f32), [256], [1032], 4096, 132, order=3)[0].endswith(", 1, 0>")
    assert cuda_rtc.plan("hold_transition", (bf16, f32), [256], [1024], 4096, 132, whole_packs=False,
                         order=3)[1] == 16
    assert cuda_rtc.plan("hold_transition", (torch.float64, f32), [256], [1024], 4096, 132, order=3) == (
        "dk::gpu::hold_transition_kernel<double, float, 1, 0>", 16)
    for op, dtypes in (("hold_transition", (f32, f32)), ("hold_perturb", (f32,))):
        with pytest.raises(ValueError, match=f"order: {op}"):
            cuda_rtc.plan(op, dtypes, [256], [1024], 4096, 132)
    with pytest.raises(KeyError, match="no run-time CUDA kernel"):
        cuda_rtc.instantiations("likelihood_accum", (torch.float32,))


@pytest.mark.parametrize("op, model", [("hold_transition", "float, "), ("hold_perturb", "")])
def test_hold_kernels_per_order(op, model):
    """The packed kernel of orders 2, 3, 4 is compiled for that order (common/hold.h hold_kernel_order; the
    NVRTC program asserts the mirror), every other order takes the any-order kernel (N = 0)."""
    f32 = torch.float32
    dtypes = (f32, f32) if model else (f32,)
    for n in range(1, 9):
        name, _ = cuda_rtc.plan(op, dtypes, [256], [1024] if model else [], 4096, 132, order=n)
        assert name == f"dk::gpu::{op}_kernel<float, {model}4, {n if n in (2, 3, 4) else 0}>"
        names = cuda_rtc.instantiations(op, dtypes, n)
        assert names == [name, f"dk::gpu::{op}_kernel<float, {model}1, 0>"]
    every = cuda_rtc.instantiations(op, dtypes[:-1] + (torch.float16,) if model else (torch.float16,))
    assert [s.split(", ")[-2:] for s in every] == [["4", "0>"], ["4", "2>"], ["4", "3>"], ["4", "4>"], ["1", "0>"]]


def test_hold_perturb_plan_packs_only_aligned_whole_groups():
    """hold_perturb takes four elements per thread when P % 4 == 0 and z0, noise, out, eps_out are aligned to 4."""
    bf16 = torch.bfloat16
    assert cuda_rtc.plan("hold_perturb", (bf16,), [256, 0, 512, 1024], [], 4096, 132, order=3) == (
        "dk::gpu::hold_perturb_kernel<__nv_bfloat16, 4, 3>", 4)
    assert cuda_rtc.plan("hold_perturb", (bf16,), [256, 0, 512, 1026], [], 4096, 132, order=3)[0].endswith(", 1, 0>")
    assert cuda_rtc.plan("hold_perturb", (bf16,), [256], [], 4096, 132, whole_packs=False, order=3) == (
        "dk::gpu::hold_perturb_kernel<__nv_bfloat16, 1, 0>", 16)


def test_sources_are_found_and_hashed():
    root = cuda_rtc.csrc_dir()
    for src in set(cuda_rtc.SOURCES.values()):
        assert (root / src).is_file()
    assert len(cuda_rtc._sources_hash()) == 64


def test_layout_asserts_name_every_field():
    text = cuda_rtc.layout_asserts("cuda/hold.cu")
    for name in ("HoldTransitionParams", "HoldPerturbParams"):
        for field in cuda_rtc.STRUCTS[name].names:
            assert f"dk_layout_{name}.{field})" in text and f".{field} = {{}}" in text


#----------------------------------------------------------------------------
# NVRTC without a device.


@needs_nvrtc
@pytest.mark.parametrize("op", cuda_rtc.OPS)
def test_nvrtc_compiles_every_instantiation_for_sm90(op):
    names = [n for combo in _combos(op) for n in cuda_rtc.instantiations(op, combo)]
    cubin, lowered = cuda_rtc.compile_cubin(cuda_rtc.SOURCES[op], names, "90")
    assert cubin[:4] == b"\x7fELF"
    assert set(lowered) == set(names) and all(v.startswith("_ZN2dk3gpu") for v in lowered.values())


@needs_nvrtc
@pytest.mark.parametrize("op", cuda_rtc.OPS)
def test_nvrtc_compiles_for_sm80(op):
    combo = (torch.bfloat16, torch.float32)[: len(_combos(op)[0])]
    cubin, _ = cuda_rtc.compile_cubin(cuda_rtc.SOURCES[op], cuda_rtc.instantiations(op, combo), "80")
    assert cubin[:4] == b"\x7fELF"


@needs_nvrtc
@pytest.mark.parametrize("change", ["order", "size"])
def test_a_layout_mismatch_fails_to_compile(monkeypatch, change):
    bad = dict(cuda_rtc.STRUCTS)
    fields = [(n, bad["PhiloxNormalParams"].fields[n][0]) for n in bad["PhiloxNormalParams"].names]
    if change == "order":
        fields[0], fields[1] = fields[1], fields[0]  # seed <-> out: same size, wrong offsets
    else:
        fields[-1] = (fields[-1][0], np.int64)  # out_dtype is a 4-byte enum
    bad["PhiloxNormalParams"] = np.dtype(fields, align=True)
    monkeypatch.setattr(cuda_rtc, "STRUCTS", bad)
    with pytest.raises(RuntimeError, match=r"(?s)NVRTC failed.*dk_layout_PhiloxNormalParams"):
        cuda_rtc.compile_cubin("cuda/philox_normal.cu", cuda_rtc.instantiations("philox_normal", (torch.float32,)), "90")


@needs_nvrtc
def test_a_kernel_order_mismatch_fails_to_compile(monkeypatch):
    monkeypatch.setattr(cuda_rtc, "hold_kernel_order", lambda n: 0)  # plan() would run order 3 on the N = 0 kernel
    with pytest.raises(RuntimeError, match=r"(?s)NVRTC failed.*hold_kernel_order\(2\) differs"):
        cuda_rtc.compile_cubin("cuda/hold.cu", ["dk::gpu::hold_transition_kernel<float, float, 1, 0>"], "90")


@needs_nvrtc
def test_disk_cache_compiles_once(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFKERN_CACHE_DIR", str(tmp_path))
    calls = []
    real = cuda_rtc.compile_cubin
    monkeypatch.setattr(cuda_rtc, "compile_cubin", lambda *a: calls.append(a) or real(*a))
    names = cuda_rtc.instantiations("philox_normal", (torch.float32,))
    path, lowered = cuda_rtc.cached_cubin("cuda/philox_normal.cu", names, "90")
    path2, lowered2 = cuda_rtc.cached_cubin("cuda/philox_normal.cu", names, "90")
    assert len(calls) == 1 and path == path2 and lowered == lowered2
    assert path.parent == tmp_path / "nvrtc" and path.read_bytes()[:4] == b"\x7fELF"
    cuda_rtc.cached_cubin("cuda/philox_normal.cu", names, "80")  # another architecture: another entry
    assert len(calls) == 2


#----------------------------------------------------------------------------
# The registry's choice of loader.


class _FakeC:
    def __init__(self, cuda):
        self._cuda = cuda

    def has_cuda(self):
        return self._cuda


@pytest.mark.parametrize("built_with_cuda, env, rtc_ok, expected", [
    (True, "auto", True, "aot"), (True, "aot", False, "aot"), (False, "auto", True, "nvrtc"),
    (False, "aot", True, None), (False, "auto", False, None), (True, "nvrtc", True, "nvrtc"),
    (True, "nvrtc", False, None)])
def test_cuda_loader_choice(monkeypatch, built_with_cuda, env, rtc_ok, expected):
    monkeypatch.setattr(registry, "_extension", lambda: (_FakeC(built_with_cuda), None))
    monkeypatch.setattr(registry, "_rtc_status", lambda: (rtc_ok, None if rtc_ok else "no cupy here"))
    monkeypatch.setenv("DIFFKERN_CUDA_LOADER", env)
    loader, why = registry.cuda_loader()
    assert loader == expected
    assert (why is None) == (expected is not None)
    if expected is None and env == "aot":
        assert "built without CUDA" in why
    if expected is None and env != "aot":
        assert "no cupy here" in why


def test_cuda_loader_rejects_an_unknown_setting(monkeypatch):
    monkeypatch.setenv("DIFFKERN_CUDA_LOADER", "jit")
    with pytest.raises(ValueError, match="DIFFKERN_CUDA_LOADER"):
        registry.cuda_loader()


def test_cuda_backend_needs_a_device_whatever_the_loader(monkeypatch):
    monkeypatch.setattr(registry, "cuda_loader", lambda: ("nvrtc", None))
    monkeypatch.setattr(registry, "_cuda_available", lambda: False)
    assert registry.backend_status("cuda") == (False, "torch reports no CUDA device")


def test_extension_exports_the_binding_checks():
    mod, why = registry._extension()
    if mod is None:
        pytest.skip(why)
    x = torch.zeros(2, 3)
    table = torch.zeros(1, dops.coefs.NCOEF, dtype=torch.float64)
    seed = torch.zeros(1, dtype=torch.int64)
    mod.check_sampler_step(x, x, None, None, None, table, 0, seed, torch.empty_like(x), None, None)
    with pytest.raises(RuntimeError, match="step"):
        mod.check_sampler_step(x, x, None, None, None, table, 5, seed, torch.empty_like(x), None, None)
    with pytest.raises(RuntimeError, match="out"):
        mod.check_philox_normal(seed, 0, 0, torch.empty(3, 2).t())


def test_register_binds_the_cuda_implementations():
    # In a subprocess: registering replaces CUDA kernels process-wide.
    code = ("import torch, diffkern.ops\nfrom diffkern.ops import cuda_rtc\ncuda_rtc.register()\ncuda_rtc.register()\n"
            "print(all(torch._C._dispatch_has_kernel_for_dispatch_key(f'diffkern::{o}', 'CUDA') for o in cuda_rtc.OPS))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONWARNINGS": "error::UserWarning"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "True"


#----------------------------------------------------------------------------
# On a GPU.


@pytest.mark.cuda
@needs_nvrtc
@pytest.mark.parametrize("dtype", ALL)
def test_nvrtc_launch_equals_the_aot_kernels(dtype):
    """Same sources, same options: the NVRTC launch matches the ahead-of-time build bit for bit."""
    if registry.cuda_loader()[0] != "aot":
        pytest.skip("no ahead-of-time CUDA build to compare with")
    from diffkern.testing import make_tensor, random_table
    x = make_tensor((3, 5, 77), dtype, device="cuda")
    m = make_tensor((3, 5, 77), dtype, seed=1, device="cuda")
    h = make_tensor((3, 5, 77), dtype, seed=2, device="cuda")
    table = random_table(2).cuda()
    seed = torch.tensor([3, 4, 5], dtype=torch.int64, device="cuda")
    outs = []
    for fn in (torch.ops.diffkern.sampler_step, cuda_rtc.sampler_step):
        o, x0, ho = (torch.empty_like(x) for _ in range(3))
        fn(x, m, m, h, None, table, 1, seed, o, x0, ho)
        noise = torch.empty(4, 33, dtype=dtype, device="cuda")
        (torch.ops.diffkern.philox_normal if fn is torch.ops.diffkern.sampler_step else cuda_rtc.philox_normal)(
            seed[:1], 2, 5, noise)
        outs.append((o, x0, ho, noise))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
