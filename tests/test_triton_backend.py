"""Triton-specific checks of ``diffkern.kernels`` (the every-backend checks, which cover triton too, are
in test_sampler_step.py, test_iadb.py and test_philox.py; Triton's side of the noise stream is in
test_triton_philox.py).

On CPU the kernels run under Triton's interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1``);
the GPU code path is still compiled here for sm_90, without a GPU, in a subprocess. With a GPU the
``cuda`` tests run the compiled kernels, including under CUDA-graph capture.
"""
import math

import pytest
import torch

import diffkern.ops as dops
from diffkern.ops import philox
from diffkern.ops.registry import backend_status, resolve
from diffkern.testing import (DTYPES, assert_matches_reference, check_iadb_blend, check_sampler_step, gpu_compile_report,
                              make_tensor, random_table, sampler_step_inputs)

triton = pytest.importorskip("triton")

from diffkern.kernels import iadb_blend as k_iadb  # noqa: E402
from diffkern.kernels import philox as k_philox  # noqa: E402
from diffkern.kernels import philox_normal as k_normal  # noqa: E402
from diffkern.kernels import sampler_step as k_step  # noqa: E402

INTERPRETING = k_philox.interpreting()
interpreter = pytest.mark.skipif(not INTERPRETING, reason="CPU tests of the triton backend need TRITON_INTERPRET=1")
NAN = float("nan")


def _id(v):
    return str(v).replace("torch.", "")


def _cuda(kw):
    return {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}

#----------------------------------------------------------------------------
# The interpreter path and the launch configuration.


@interpreter
def test_cpu_tensors_run_the_interpreted_kernels():
    assert backend_status("triton", "cpu") == (True, None)
    for mod, kernel in ((k_step, "_sampler_step_kernel"), (k_iadb, "_iadb_blend_kernel"),
                        (k_normal, "_philox_normal_kernel")):
        assert isinstance(getattr(mod, kernel), triton.runtime.interpreter.InterpretedFunction), kernel
    for name in ("sampler_step", "iadb_blend", "philox_normal"):
        assert resolve(name, "cpu", "triton")[1] is getattr(torch.ops.diffkern, name + "_triton")


def test_launch_config(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert k_philox.launch_config(1)[0] == k_philox.MIN_BLOCK
    assert k_philox.launch_config(1000)[0] == 1024
    assert k_philox.launch_config(10**7)[0] == k_philox.INTERPRET_BLOCK
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    block, options = k_philox.launch_config(10**7)
    assert block == options["BLOCK"] == k_philox.GPU_BLOCK
    assert options["num_warps"] == 8 and options["enable_fp_fusion"] is False
    assert k_philox.launch_config(200)[1]["num_warps"] == 1


def test_empty_tensors_launch_nothing(monkeypatch):
    """numel 0 returns before touching the kernel (a launch with an empty grid is an error on GPUs)."""
    for mod, kernel in ((k_step, "_sampler_step_kernel"), (k_iadb, "_iadb_blend_kernel"),
                        (k_normal, "_philox_normal_kernel")):
        monkeypatch.setattr(mod, kernel, None)  # subscripting None would raise
    x = torch.empty(0, 3)
    seed = torch.empty(0, dtype=torch.int64)  # per-sample seeds of an empty batch
    coef = random_table(1)
    assert k_step.sampler_step_launch(x, x, x, x, None, coef, 0, seed, x, x, x) is None
    assert k_iadb.iadb_blend_launch(x, x, torch.empty(0), x, x) is None
    assert k_normal.philox_normal_launch(seed, 0, 0, x) is None

#----------------------------------------------------------------------------
# Block edges: a small interpreter block so samples span several programs (per-sample seeds included).


@interpreter
@pytest.mark.parametrize("per_sample", [1, 15, 16, 17, 48])
@pytest.mark.parametrize("per_sample_seed", [False, True], ids=["seed1", "seedB"])
def test_block_edges(monkeypatch, per_sample, per_sample_seed):
    monkeypatch.setattr(k_philox, "INTERPRET_BLOCK", 16)
    shape = (3, per_sample)
    what = f"per_sample={per_sample} seedB={per_sample_seed}"
    kw = sampler_step_inputs(shape, torch.float32, per_sample_seed=per_sample_seed)
    check_sampler_step("triton", what=what, **kw)
    check_iadb_blend("triton", make_tensor(shape, seed=1), make_tensor(shape, seed=2), torch.rand(3), what=what)
    seed = torch.tensor([5, -7, 2**40 + 3]) if per_sample_seed else torch.tensor([11])
    out = dops.randn(shape, seed, step=2, offset=9, dtype=torch.float64, backend="triton")
    ref = philox.philox_normal_reference(seed, 2, 9, shape, torch.float64)
    assert_matches_reference(out, ref, ref, what)


@interpreter
def test_sample_one_past_the_interpreter_block():
    shape = (1, k_philox.INTERPRET_BLOCK + 1)
    seed = torch.tensor([3])
    out = dops.randn(shape, seed, step=1, dtype=torch.float64, backend="triton")
    ref = philox.philox_normal_reference(seed, 1, 0, shape, torch.float64)
    assert_matches_reference(out, ref, ref, "two programs")

#----------------------------------------------------------------------------
# Rounding: no FMA contraction, so float32 results equal the eager float32 reference bit for bit (the
# interpreter computes with numpy, IEEE operation by operation). NaN and inf in the model output
# propagate through the clamp as torch.maximum / torch.minimum do.


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=_id)
def test_rounds_like_the_eager_reference(dtype):
    kw = sampler_step_inputs((3, 5, 7), dtype, noise="explicit", clip=1.0)
    kw["model_out"][0, 0, :3] = torch.tensor([NAN, math.inf, -math.inf], dtype=dtype)
    outs = [torch.empty_like(kw["x"]) for _ in range(3)]
    dops.sampler_step(**kw, out=outs[0], x0_out=outs[1], history_out=outs[2], backend="triton")
    eager = dops.sampler_step_reference(kw.pop("x"), kw.pop("model_out"), kw.pop("coef"), kw.pop("step"), **kw)
    for name, actual, expected in zip(("out", "x0_out", "history_out"), outs, eager):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{name}: {m}")
    assert torch.isnan(outs[0][0, 0, 0]) and torch.isfinite(outs[1][0, 0, 1:3]).all()
    x0, x1, alpha = make_tensor((4, 33), dtype, seed=1), make_tensor((4, 33), dtype, seed=2), torch.rand(4)
    blended = dops.iadb_blend(x0, x1, alpha, backend="triton")
    torch.testing.assert_close(blended, dops.iadb_blend_reference(x0, x1, alpha)[0], rtol=0, atol=0)

#----------------------------------------------------------------------------
# Registration: torch.library.opcheck on the ops bound by _lib.triton_op (Library.impl).


def _opcheck_cases(device):
    """(family, op arguments): every optional tensor present, then absent (and per-sample vs one seed)."""
    kw = sampler_step_inputs((2, 3, 5), torch.float32, per_sample_seed=True)
    kw = _cuda(kw) if device == "cuda" else kw
    x, m, seed = kw["x"], kw["model_out"], kw["seed"]

    def e():
        return torch.empty_like(x)
    full = (x, m, kw["model_out_uncond"], kw["history"], None, kw["coef"], kw["step"], seed, e(), e(), e())
    bare = (x, m, None, None, torch.randn_like(x), kw["coef"], 0, seed[:1], e(), None, None)
    alpha = torch.rand(2, device=device)
    return [("sampler_step", full), ("sampler_step", bare), ("iadb_blend", (x, m, alpha, e(), e())),
            ("iadb_blend", (x, m, alpha, e(), None)), ("philox_normal", (seed, 3, 2**40, e()))]


def _opcheck(device):
    for name, args in _opcheck_cases(device):
        op = resolve(name, device, "triton")[1]
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (name, result)


@interpreter
def test_opcheck():
    _opcheck("cpu")

#----------------------------------------------------------------------------
# The GPU code path compiles (for sm_90, no GPU needed) and its loads/stores are 128-bit vectors.

_COMPILE_SCRIPT = r"""
import json, re, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from diffkern.kernels import iadb_blend, philox_normal, sampler_step

def compile_ptx(fn, ptr_types, constexprs):
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        sig[name] = "constexpr" if name in constexprs else "*" + ptr_types[name] if name in ptr_types else "i32"
        if name in ptr_types or name == "per_sample":
            attrs[(i,)] = [["tt.divisibility", 16]]  # what the launcher specialises for aligned tensors
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    opts = {"num_warps": constexprs["BLOCK"] // 256, "enable_fp_fusion": False}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm["ptx"]

def widths(ptx):
    return sorted(set(re.findall(r"\b(?:ld|st)\.global(?:\.nc)?\.v[24]\.b\d+", ptx)))

report = {}
# (state, model dtype, noise tensor or Philox, specialised ints): each state dtype, both noise paths, and
# step == 1, which the launcher turns into a constexpr.
for s, m, noise, ints in (("fp32", "fp32", False, {"step": 1}), ("fp32", "fp32", True, {}),
                          ("fp16", "bf16", False, {}), ("fp64", "fp16", True, {})):
    cdt = tl.float64 if s == "fp64" else tl.float32
    state = dict.fromkeys(["x_ptr", "history_ptr", "history2_ptr", "history3_ptr", "noise_ptr", "out_ptr",
                           "x0_out_ptr", "history_out_ptr"], s)
    types = dict(state, model_out_ptr=m, uncond_ptr=m, coef_ptr="fp64", seed_ptr="i64")
    flags = dict(HAS_UNCOND=True, HAS_HISTORY=True, HAS_HISTORY2=True, HAS_HISTORY3=True, HAS_NOISE=noise,
                 HAS_X0_OUT=True, HAS_HISTORY_OUT=True)
    ptx = compile_ptx(sampler_step._sampler_step_kernel, types, dict(flags, CDT=cdt, BLOCK=2048, **ints))
    report[f"sampler_step {s}/{m} noise={noise} {ints}"] = widths(ptx)
for s, cdt in (("bf16", tl.float32), ("fp64", tl.float64)):
    types = dict(x0_ptr=s, x1_ptr=s, alpha_ptr="fp32", out_ptr=s, target_out_ptr=s)
    ptx = compile_ptx(iadb_blend._iadb_blend_kernel, types, dict(HAS_TARGET_OUT=True, CDT=cdt, BLOCK=2048))
    report[f"iadb_blend {s}"] = widths(ptx)
    ptx = compile_ptx(philox_normal._philox_normal_kernel, dict(seed_ptr="i64", out_ptr=s),
                      dict(ALIGNED=True, CDT=cdt, BLOCK=2048))
    report[f"philox_normal {s}"] = widths(ptx)
json.dump(report, sys.stdout)
"""


def test_gpu_path_compiles_with_vector_accesses(tmp_path):
    report = gpu_compile_report(_COMPILE_SCRIPT, tmp_path)
    assert len(report) == 8
    for what, found in report.items():  # philox_normal loads only its scalar seed
        assert any(w.startswith("st.") for w in found), (what, found)
        assert what.startswith("philox_normal") or any(w.startswith("ld.") for w in found), (what, found)

#----------------------------------------------------------------------------
# GPU: the compiled kernels (skipped without CUDA).


@pytest.mark.cuda
def test_cuda_runs_the_compiled_kernels():
    assert isinstance(k_step._sampler_step_kernel, triton.runtime.jit.JITFunction)
    kw = _cuda(sampler_step_inputs((3, 5, 7), torch.float32, noise="explicit"))
    out = dops.sampler_step(**kw, backend="triton")
    eager = dops.sampler_step_reference(kw.pop("x"), kw.pop("model_out"), kw.pop("coef"), kw.pop("step"), **kw)
    torch.testing.assert_close(out, eager[0], rtol=0, atol=0)  # no FMA contraction on either side


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_cuda_stream_matches_cpu_reference(dtype):
    seed = torch.tensor([-3, 2**33 + 1])
    out = dops.randn((2, 4099), seed.cuda(), step=1, offset=2**32 - 2000, dtype=dtype, backend="triton")
    ref64 = philox.philox_normal_reference(seed, 1, 2**32 - 2000, (2, 4099), torch.float64)
    eager = philox.philox_normal_reference(seed, 1, 2**32 - 2000, (2, 4099), dtype)
    assert_matches_reference(out.cpu(), ref64, eager, f"cuda stream {dtype}")


@pytest.mark.cuda
def test_cuda_graph_rereads_seed_and_table():
    """A captured launch reads the seed and the coefficient row at replay time, not at capture time."""
    kw = _cuda(sampler_step_inputs((2, 4, 33, 33), torch.float16, per_sample_seed=True))
    out = torch.empty_like(kw["x"])
    dops.sampler_step(**kw, out=out, backend="triton")  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dops.sampler_step(**kw, out=out, backend="triton")
    kw["seed"].copy_(torch.tensor([77, 78]))
    kw["coef"].copy_(random_table(3, seed=5, clip=0.5))
    graph.replay()
    torch.cuda.synchronize()
    expected = dops.sampler_step(**kw, backend="reference")
    ref64 = dops.sampler_step(**{k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point()
                                     and k != "coef" else v) for k, v in kw.items()}, backend="reference")
    assert_matches_reference(out, ref64, expected, "graph replay")


@pytest.mark.cuda
def test_cuda_opcheck():
    _opcheck("cuda")


def test_interpreter_compat_is_a_no_op_where_triton_is_fixed():
    """kernels/_interpreter_compat.py patches only the interpreters that convert a (1,)-array loop bound with
    ``int(array)`` (Triton < 3.7 under NumPy >= 2.4); elsewhere it leaves Triton alone."""
    import inspect

    import numpy as np
    from triton.runtime import interpreter

    from diffkern.kernels import _interpreter_compat as compat
    assert compat.apply() is False  # already applied at import where needed; never twice
    if not getattr(interpreter._patch_lang_tensor, "diffkern_fixed", False):  # left alone: must not need it
        assert compat.BROKEN not in inspect.getsource(interpreter._patch_lang_tensor)

    class Handle:
        data = np.array([7], dtype=np.int64)

    class Tensor:
        handle = Handle()

    assert compat._index(Tensor()) == 7
