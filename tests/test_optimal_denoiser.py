"""The empirical optimal denoiser as one op (Chen et al., ``math-samplers.md`` 4.4).

The Triton kernel runs under ``TRITON_INTERPRET=1`` on CPU, where every program is a Python loop:
the shapes here are small but cross several key blocks, D slices and N-splits (the interpreter
config has 16x16x16 tiles and up to 6 programs), with N and D never multiples of the tiles.
"""
import math
import os

import pytest
import torch

import diffkern.ops as dops
from diffkern import analytic
from diffkern.ops import BackendUnavailable
from diffkern.ops.optimal_denoiser import half_sq_norms, optimal_denoiser_reference
from diffkern.testing import (assert_matches_reference, gpu_compile_report, make_tensor, noncontiguous,
                              usable_backends)

F64 = torch.float64
TRITON_CPU = "triton" in usable_backends("cpu")
needs_triton = pytest.mark.skipif(not TRITON_CPU, reason="triton is not usable on CPU (TRITON_INTERPRET unset?)")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _id(v):
    return str(v).replace("torch.", "")


def _sigma_vector(sigma, batch):
    return sigma.double() if isinstance(sigma, torch.Tensor) else torch.full((batch,), float(sigma), dtype=F64)


def _check(backend, x, data, sigma, what=""):
    """The op on ``backend`` against the float64 reference, with the project's tolerance rule."""
    sig = _sigma_vector(sigma, x.shape[0])
    ref64 = optimal_denoiser_reference(x.double(), data.double(), sig)
    eager = optimal_denoiser_reference(x, data, sig.float())
    out = dops.optimal_denoiser(x, data, sigma, backend=backend)
    assert_matches_reference(out, ref64, eager, f"{what} [{backend}] {x.dtype}")
    return out, ref64


@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=_id)
@pytest.mark.parametrize("batch,n,dim", [(5, 37, 19), (1, 1, 1), (3, 1, 5), (7, 50, 33), (2, 70, 40), (17, 20, 3)])
def test_triton_matches_reference(dtype, batch, n, dim):
    gen = torch.Generator().manual_seed(batch * 1000 + n)
    x = make_tensor((batch, dim), dtype, seed=n)
    data = make_tensor((n, dim), dtype, seed=n + 1)
    sigma = torch.exp(torch.randn(batch, generator=gen, dtype=F64)).float() * 0.8  # per sample, 0.1 .. 10
    _check("triton", x, data, sigma, f"B={batch} N={n} D={dim}")


@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=_id)
def test_triton_tiny_sigma_is_nearest_neighbour(dtype):
    """sigma -> 0: the softmax is one-hot on the nearest data point, returned exactly."""
    data = make_tensor((45, 24), dtype, seed=1)
    x = (data[[3, 17, 44, 0]].double() + 0.05 * make_tensor((4, 24), F64, seed=2)).to(dtype)
    out, _ = _check("triton", x, data, 1e-3, "tiny sigma")
    torch.testing.assert_close(out, data[[3, 17, 44, 0]], rtol=0, atol=0)


@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=_id)
def test_triton_large_sigma_is_the_data_mean(dtype):
    data = make_tensor((40, 21), dtype, seed=3)
    x = make_tensor((6, 21), dtype, seed=4)
    out, ref64 = _check("triton", x, data, 1e4, "large sigma")
    # At sigma = 1e4 the weights differ from 1/N by ~|x||y|/sigma^2 = 1e-7.
    torch.testing.assert_close(ref64, data.double().mean(0).expand(6, 21), rtol=0, atol=1e-5)


@needs_triton
def test_triton_sigma_zero_returns_x_and_image_shapes():
    x = make_tensor((4, 2, 3, 5), torch.float32, seed=5)
    data = make_tensor((30, 2, 3, 5), torch.float32, seed=6)
    sigma = torch.tensor([0.0, 0.5, 0.0, 3.0])
    out, _ = _check("triton", x, data, sigma, "sigma 0 and (B, C, H, W)")
    assert out.shape == x.shape
    torch.testing.assert_close(out[[0, 2]], x[[0, 2]], rtol=0, atol=0)


@needs_triton
def test_triton_outputs_in_place_and_noncontiguous():
    x = make_tensor((5, 18), torch.float32, seed=7)
    data = make_tensor((33, 18), torch.float32, seed=8)
    expected = dops.optimal_denoiser(x, data, 0.7, backend="triton")
    out = noncontiguous(torch.full((5, 18), float("nan")))
    assert dops.optimal_denoiser(x, data, 0.7, out=out, backend="triton") is out
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    x_in = x.clone()
    assert dops.optimal_denoiser(x_in, data, 0.7, out=x_in, backend="triton") is x_in  # exactly in place
    torch.testing.assert_close(x_in, expected, rtol=0, atol=0)
    precomputed = dops.optimal_denoiser(x, data, 0.7, data_half_sq=half_sq_norms(data), backend="triton")
    torch.testing.assert_close(precomputed, expected, rtol=0, atol=0)


def test_reference_equals_the_chunked_empirical_denoiser():
    """The op's float64 reference (direct softmax) and ``analytic.EmpiricalDenoiser`` (streaming
    logsumexp over chunks) are independent implementations of 4.4."""
    data = make_tensor((300, 7), F64, seed=9)
    x = make_tensor((11, 7), F64, seed=10) * 2
    sigma = torch.logspace(-1.5, 1.5, 11, dtype=F64)
    out = dops.optimal_denoiser(x, data, sigma, backend="reference")
    torch.testing.assert_close(out, analytic.EmpiricalDenoiser(data, chunk_size=64).denoise(x, sigma),
                               rtol=1e-12, atol=1e-12)


def test_reference_takes_an_empty_batch():
    """Regression: the reference (the CPU default) reshaped x with -1, which fails for B = 0."""
    data = make_tensor((5, 3, 2), F64, seed=1)
    assert dops.optimal_denoiser(torch.zeros(0, 3, 2, dtype=F64), data, 1.0, backend="reference").shape == (0, 3, 2)
    fused = analytic.EmpiricalDenoiser(data, backend="reference")
    assert fused(torch.zeros(0, 6, dtype=F64), torch.zeros(0, dtype=F64)).shape == (0, 6)


def test_auto_on_cpu_is_the_reference_and_triton_refuses_float64():
    x, data = make_tensor((2, 4), F64), make_tensor((3, 4), F64, seed=1)
    torch.testing.assert_close(dops.optimal_denoiser(x, data, 1.0, backend="auto"),
                               dops.optimal_denoiser(x, data, 1.0, backend="reference"), rtol=0, atol=0)
    if TRITON_CPU:
        with pytest.raises(TypeError, match="x: the triton backend"):
            dops.optimal_denoiser(x, data, 1.0, backend="triton")
    with pytest.raises(BackendUnavailable, match="cpp"):
        dops.optimal_denoiser(x, data, 1.0, backend="cpp")


@pytest.mark.parametrize("case,name", [
    (lambda x, d: dops.optimal_denoiser(x, d.double(), 1.0), "data"),
    (lambda x, d: dops.optimal_denoiser(x, d[:, :5], 1.0), "data"),
    (lambda x, d: dops.optimal_denoiser(x, d[:0], 1.0), "data"),
    (lambda x, d: dops.optimal_denoiser(x, d, -1.0), "sigma"),
    (lambda x, d: dops.optimal_denoiser(x, d, math.nan), "sigma"),
    (lambda x, d: dops.optimal_denoiser(x, d, torch.ones(3)), "sigma"),
    (lambda x, d: dops.optimal_denoiser(x, d, "1"), "sigma"),
    (lambda x, d: dops.optimal_denoiser(x, d, 1.0, data_half_sq=torch.zeros(7, dtype=F64)), "data_half_sq"),
    (lambda x, d: dops.optimal_denoiser(x, d, 1.0, out=torch.empty(2, 7)), "out"),
    (lambda x, d: dops.optimal_denoiser(x.long(), d, 1.0), "x"),
    (lambda x, d: dops.optimal_denoiser(torch.tensor(1.0), d, 1.0), "x"),
])
def test_bad_input_raises(case, name):
    x, data = make_tensor((2, 6)), make_tensor((7, 6), seed=1)
    with pytest.raises((TypeError, ValueError), match=name):
        case(x, data)

#----------------------------------------------------------------------------
# The GPU code path compiles for sm_90 (no GPU needed) and the 16-bit logits and P @ Y run on tensor cores.

_COMPILE_SCRIPT = r"""
import json, re, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from diffkern.kernels import likelihood, optimal_denoiser as od

def compile_ptx(fn, ptr_types, constexprs, num_warps, num_stages=1):
    sig = {n: "constexpr" if n in constexprs else "*" + ptr_types[n] if n in ptr_types else "i32"
           for n in fn.arg_names}
    opts = {"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": False}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm["ptx"]

cfg = od.GPU_CONFIGS["16bit"]
f32 = dict.fromkeys(["half_sq_ptr", "sigma_ptr", "ws_ptr", "m_ptr", "l_ptr"], "fp32")
ptx = compile_ptx(od._optimal_denoiser_split_kernel, dict(f32, x_ptr="bf16", y_ptr="bf16"),
                  dict(PRECISION="tf32", DOT_F32=False, EVEN_M=False, EVEN_N=False, EVEN_D=False,
                       **{k: v for k, v in cfg.items() if k.startswith("BLOCK")}), cfg["num_warps"], cfg["num_stages"])
report = {"split": sorted(set(re.findall(r"\b(wgmma\.mma_async\S*|mma\.sync\S*)", ptx)))}
compile_ptx(od._optimal_denoiser_combine_kernel, dict(f32, x_ptr="bf16", out_ptr="bf16"),
            dict(BLOCK_M=16, BLOCK_D=128), 4)
types = dict(y_ptr="fp32", denoised_ptr="fp32", noise_ptr="fp32", sigma_ptr="fp64", weight_ptr="fp64",
             cv_ptr="fp64", seed_ptr="i64", acc_ptr="fp32")
compile_ptx(likelihood._likelihood_accum_kernel, types, dict(HAS_NOISE=False, PER_SAMPLE_SIGMA=True,
            PER_SAMPLE_WEIGHT=False, PER_SAMPLE_CV=True, PER_SAMPLE_SEED=True, CDT=tl.float32, BLOCK=2048), 8)
json.dump(report, sys.stdout)
"""


def test_gpu_path_compiles_with_tensor_core_dots(tmp_path):
    mma = gpu_compile_report(_COMPILE_SCRIPT, tmp_path)["split"]
    assert any(op.startswith("wgmma.mma_async") and "bf16" in op for op in mma), mma

def test_bench_quick_run(tmp_path, monkeypatch, capsys):
    """``bench/bench_optimal_denoiser.py --quick`` runs on CPU and writes its CSV, PNG and table (no timing
    is asserted)."""
    monkeypatch.syspath_prepend(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench import bench_optimal_denoiser as bench

    threads = torch.get_num_threads()
    assert bench.main(["--quick", "--out", str(tmp_path), "--threads", "1"]) == 0
    assert torch.get_num_threads() == threads
    table = capsys.readouterr().out
    assert "| impl |" in table and "frac_peak" in table and "chunked" in table
    assert (tmp_path / "optimal_denoiser.csv").stat().st_size > 0 and (tmp_path / "optimal_denoiser.png").exists()
    full = bench.get_configs(device="cuda", backends=["triton"], sweep=True)
    assert {(c.batch, c.n, c.dim) for c in full} == {(256, 50_000, 3072)}  # the size
    assert {c.dtype for c in full if c.impl == "triton"} == {"bfloat16", "float32"}

#----------------------------------------------------------------------------
# GPU: realistic sizes (CIFAR-10-like D = 3072).


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
@pytest.mark.parametrize("batch,n", [(64, 5000), (3, 4097), (129, 1)])
def test_cuda_realistic_sizes(dtype, batch, n):
    dim = 3072
    data = (make_tensor((n, dim), torch.float32, seed=11) * 0.5).to(dtype).cuda()
    x = (data[torch.arange(batch) % n].float() + 0.3 * make_tensor((batch, dim), seed=12).cuda()).to(dtype)
    sigma = torch.logspace(-1, 2, batch).float().cuda()
    sig64 = sigma.double()
    ref64 = optimal_denoiser_reference(x.double(), data.double(), sig64)
    eager = optimal_denoiser_reference(x, data, sigma)
    out = dops.optimal_denoiser(x, data, sigma, backend="triton")
    assert_matches_reference(out, ref64, eager, f"cuda B={batch} N={n} {dtype}")
