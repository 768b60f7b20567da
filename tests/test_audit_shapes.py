"""Awkward inputs the per-op test files leave out, on every usable backend against the float64 reference
(the project's tolerance rule, ``diffkern.testing.assert_matches_reference``):

* ``ddim_step`` over every dtype and the awkward shapes (its own tests use one float32 shape);
* non-contiguous and strided layouts of every output (``x0_out``, ``history_out``, ``target_out``, ``acc``)
  and of per-sample inputs (``alpha``), in every dtype; outputs aliased crosswise to inputs;
* ``likelihood_accum`` non-contiguous in every dtype, and its device errors;
* the Triton ``optimal_denoiser`` on an empty batch, 1-D and non-contiguous inputs, and its bad input;
* outputs that overlap themselves (expanded views), refused by every op before anything is written;
* CUDA: ``likelihood_accum`` and ``ddim_step`` on every usable CUDA backend (skipped without a GPU).

Outputs are pre-filled with NaN, so an element a backend does not write fails the comparison.
"""
import math
import re

import pytest
import torch

import diffkern.ops as dops
from diffkern.ops.hold import hold_perturb, hold_transition
from diffkern.ops.likelihood import SPEC as LIKELIHOOD_SPEC
from diffkern.ops.likelihood import acc_dtype, likelihood_accum_reference
from diffkern.ops.optimal_denoiser import optimal_denoiser_reference
from diffkern.testing import (DTYPES, SHAPES, assert_matches_reference, check_sampler_step, make_tensor, noncontiguous,
                              random_table, sampler_step_inputs, usable_backends)

F64 = torch.float64
NAN = float("nan")
TRITON_CPU = "triton" in usable_backends("cpu")
needs_triton = pytest.mark.skipif(not TRITON_CPU, reason="triton is not usable on CPU (TRITON_INTERPRET unset?)")
LAYOUTS = ("transposed", "strided")


def _id(v):
    return str(v).replace("torch.", "")


def _nan_out(shape, dtype, layout="contiguous", device="cpu"):
    """A NaN-filled output: contiguous, ``transposed`` (noncontiguous) or ``strided`` (every other element)."""
    if layout == "strided":
        return torch.full((*shape[:-1], 2 * shape[-1]), NAN, dtype=dtype, device=device)[..., ::2]
    t = torch.full(shape, NAN, dtype=dtype, device=device)
    return noncontiguous(t) if layout == "transposed" else t

#----------------------------------------------------------------------------
# ddim_step: a coefficient row of sampler_step, checked over dtypes and awkward shapes.

DDIM_ROW = {"alpha_prod_t": 0.3, "alpha_prod_t_prev": 0.45, "eta": 0.7, "prediction_type": "v_prediction",
            "clip_sample": True, "clip_sample_range": 1.0}


def _check_ddim(backend, shape, dtype, contiguous=True, device="cpu"):
    z = make_tensor(shape, dtype, seed=1, contiguous=contiguous, device=device)
    m = make_tensor(shape, dtype, seed=2, scale=2.0, contiguous=contiguous, device=device)
    seed = torch.arange(shape[0], dtype=torch.int64, device=device) * 7919 + 5  # per-sample streams
    row = dict(DDIM_ROW)
    ab, ab_prev = row.pop("alpha_prod_t"), row.pop("alpha_prod_t_prev")
    ref64 = dops.ddim_step(z.double(), m.double(), ab, ab_prev, seed=seed, step=2, backend="reference", **row)
    eager = dops.ddim_step(z, m, ab, ab_prev, seed=seed, step=2, backend="reference", **row)
    layout = "contiguous" if contiguous else "transposed"
    out, x0_out = _nan_out(shape, dtype, layout, device), _nan_out(shape, dtype, layout, device)
    prev, x0 = dops.ddim_step(z, m, ab, ab_prev, seed=seed, step=2, out=out, x0_out=x0_out, backend=backend, **row)
    assert prev is out and x0 is x0_out
    what = f"ddim [{backend}] {shape} {dtype} {layout}"
    assert_matches_reference(prev.cpu(), ref64[0].cpu(), eager[0].cpu(), what + " prev_sample")
    assert_matches_reference(x0.cpu(), ref64[1].cpu(), eager[1].cpu(), what + " pred_original_sample")


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", SHAPES + ("noncontiguous",), ids=_id)
def test_ddim_step_dtypes_and_shapes(cpu_backend, dtype, shape):
    contiguous = shape != "noncontiguous"
    _check_ddim(cpu_backend, (3, 5, 7) if not contiguous else shape, dtype, contiguous)


def test_ddim_step_broadcast_sample(cpu_backend):
    """An expanded (stride-0) sample is a valid input; its default x0 buffer is then an ordinary tensor."""
    z = make_tensor((1, 9), seed=3).expand(4, 9)
    m = make_tensor((4, 9), seed=4)
    prev, x0 = dops.ddim_step(z, m, 0.5, 0.6, backend=cpu_backend)
    want = dops.ddim_step(z.contiguous(), m, 0.5, 0.6, backend="reference")
    torch.testing.assert_close(prev, want[0], rtol=0, atol=0)
    torch.testing.assert_close(x0, want[1], rtol=0, atol=0)

#----------------------------------------------------------------------------
# sampler_step: every output non-contiguous, and outputs aliased crosswise onto inputs.


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sampler_step_every_output_noncontiguous(cpu_backend, dtype, layout):
    shape = (3, 5, 7)
    kw = sampler_step_inputs(shape, dtype, per_sample_seed=True, seed=2)
    x, m, coef, step = kw.pop("x"), kw.pop("model_out"), kw.pop("coef"), kw.pop("step")
    ref64 = dops.sampler_step_reference(x.double(), m.double(), coef, step, seed=kw["seed"],
                                        **{k: v.double() for k, v in kw.items() if k != "seed"})
    eager = dops.sampler_step_reference(x, m, coef, step, **kw)
    outs = [_nan_out(shape, dtype, layout) for _ in range(3)]
    res = dops.sampler_step(x, m, coef, step, out=outs[0], x0_out=outs[1], history_out=outs[2], backend=cpu_backend,
                            **kw)
    assert res is outs[0] and not any(o.is_contiguous() for o in outs)
    for name, actual, r64, e in zip(("out", "x0_out", "history_out"), outs, ref64, eager):
        assert_matches_reference(actual, r64, e, f"[{cpu_backend}] {layout} {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "noncontiguous"])
def test_sampler_step_outputs_crossed_onto_inputs(cpu_backend, dtype, contiguous):
    """out = history, history_out = x, x0_out = model_out: exact views of inputs, so allowed; every element
    of every input must be read before any output over it is written."""
    kw = sampler_step_inputs((3, 4, 33), dtype, contiguous=contiguous, seed=3)
    x, m, coef, step = kw.pop("x"), kw.pop("model_out"), kw.pop("coef"), kw.pop("step")
    ref64 = dops.sampler_step_reference(x.double(), m.double(), coef, step, seed=kw["seed"],
                                        **{k: v.double() for k, v in kw.items() if k != "seed"})
    eager = dops.sampler_step_reference(x, m, coef, step, **kw)
    history = kw["history"]
    dops.sampler_step(x, m, coef, step, out=history, x0_out=m, history_out=x, backend=cpu_backend, **kw)
    assert_matches_reference(history, ref64[0], eager[0], "out=history")
    assert_matches_reference(m, ref64[1], eager[1], "x0_out=model_out")
    assert_matches_reference(x, ref64[2], eager[2], "history_out=x")

@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_zero_dim_state(cpu_backend, dtype):
    """A 0-d state is one sample of one element (sampler_step and randn accept it; SHAPES has none)."""
    check_sampler_step(cpu_backend, what=f"0-d {dtype}", **sampler_step_inputs((), dtype))
    seed = torch.tensor([5])
    out = dops.randn((), seed, step=1, dtype=dtype, backend=cpu_backend)
    ref64 = dops.randn((), seed, step=1, dtype=F64, backend="reference")
    assert_matches_reference(out, ref64, dops.randn((), seed, step=1, dtype=dtype, backend="reference"), "0-d randn")

#----------------------------------------------------------------------------
# iadb_blend: a strided alpha, non-contiguous outputs in every dtype, both outputs in place.


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_iadb_blend_strided_alpha_and_outputs(cpu_backend, dtype, layout):
    shape = (5, 3, 7)
    x0, x1 = make_tensor(shape, dtype, seed=4), make_tensor(shape, dtype, seed=5, contiguous=False)
    alpha = torch.rand(10, generator=torch.Generator().manual_seed(6), dtype=F64).to(dtype)[::2]
    assert not alpha.is_contiguous()
    ref64 = dops.iadb_blend_reference(x0.double(), x1.double(), alpha.double())
    eager = dops.iadb_blend_reference(x0, x1, alpha)
    out, target = _nan_out(shape, dtype, layout), _nan_out(shape, dtype, layout)
    assert dops.iadb_blend(x0, x1, alpha, out=out, target_out=target, backend=cpu_backend) is out
    assert_matches_reference(out, ref64[0], eager[0], f"[{cpu_backend}] {layout} out")
    assert_matches_reference(target, ref64[1], eager[1], f"[{cpu_backend}] {layout} target_out")


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_iadb_blend_both_outputs_in_place(cpu_backend, dtype):
    """out = x1 and target_out = x0 at once."""
    x0, x1, alpha = make_tensor((3, 65), dtype, seed=7), make_tensor((3, 65), dtype, seed=8), torch.rand(3)
    ref64 = dops.iadb_blend_reference(x0.double(), x1.double(), alpha.double())
    eager = dops.iadb_blend_reference(x0, x1, alpha)
    dops.iadb_blend(x0, x1, alpha, out=x1, target_out=x0, backend=cpu_backend)
    assert_matches_reference(x1, ref64[0], eager[0], "out=x1")
    assert_matches_reference(x0, ref64[1], eager[1], "target_out=x0")

#----------------------------------------------------------------------------
# philox_normal: a non-contiguous out in every dtype, one stream and per-sample streams.


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("per_sample", [False, True], ids=["seed1", "seedB"])
def test_randn_noncontiguous_out_every_dtype(cpu_backend, dtype, layout, per_sample):
    shape = (5, 7)
    seed = torch.arange(5, dtype=torch.int64) * 31 - 2 if per_sample else torch.tensor([2**40 + 1])
    out = _nan_out(shape, dtype, layout)
    assert dops.randn(None, seed, step=3, offset=5, out=out, backend=cpu_backend) is out
    ref64 = dops.randn(shape, seed, step=3, offset=5, dtype=F64, backend="reference")
    eager = dops.randn(shape, seed, step=3, offset=5, dtype=dtype, backend="reference")
    assert_matches_reference(out, ref64, eager, f"[{cpu_backend}] randn {layout}")

#----------------------------------------------------------------------------
# likelihood_accum: non-contiguous inputs and accumulator in every dtype; device errors.


def _likelihood_inputs(shape, dtype, contiguous=True, device="cpu"):
    batch = shape[0]
    gen = torch.Generator().manual_seed(batch + 11)
    y = make_tensor(shape, dtype, seed=12, contiguous=contiguous, device=device)
    denoised = make_tensor(shape, dtype, seed=13, scale=0.7, contiguous=contiguous, device=device)
    sigma, weight, cv = (lo + torch.rand(max(batch, 1), generator=gen, dtype=F64)[:batch].to(device)
                         for lo in (0.2, 0.1, 0.0))
    seed = torch.arange(batch, dtype=torch.int64, device=device) * 7919 + 3
    return y, denoised, sigma, weight, {"cv": cv, "seed": seed, "step": 4}


def _check_likelihood(backend, y, denoised, sigma, weight, kw, acc, what):
    acc0 = make_tensor(acc.shape, acc.dtype, seed=14, device=acc.device)
    noise = kw.get("noise")
    ref64 = likelihood_accum_reference(y.double(), denoised.double(), sigma, weight, kw["step"], cv=kw["cv"],
                                       seed=kw["seed"], noise=None if noise is None else noise.double(),
                                       acc=acc0.double())
    eager = likelihood_accum_reference(y, denoised, sigma, weight, kw["step"], cv=kw["cv"], seed=kw["seed"],
                                       noise=noise, acc=acc0)
    acc.copy_(acc0)
    assert dops.likelihood_accum(y, denoised, sigma, weight, acc, backend=backend, **kw) is acc
    assert_matches_reference(acc.cpu(), ref64.cpu(), eager.cpu(), f"{what} [{backend}]")


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("noise", ["philox", "explicit"])
def test_likelihood_noncontiguous_every_dtype(cpu_backend, dtype, noise):
    y, denoised, sigma, weight, kw = _likelihood_inputs((4, 3, 9), dtype, contiguous=False)
    kw["cv"] = torch.rand(8, dtype=F64)[::2]  # strided per-sample scalars
    if noise == "explicit":
        kw["noise"] = make_tensor((4, 3, 9), dtype, seed=15, contiguous=False)
    buf = torch.full((8,), NAN, dtype=acc_dtype(dtype))
    _check_likelihood(cpu_backend, y, denoised, sigma, weight, kw, buf[::2], f"non-contiguous {dtype}")
    assert torch.isnan(buf[1::2]).all()


def _likelihood_bad_cases():
    meta = torch.device("meta")
    return {
        "denoised-device": (lambda k: k.update(denoised=k["denoised"].to(meta)), ValueError,
                            r"^denoised: expected device"),
        "noise-device": (lambda k: k.update(noise=torch.empty(3, 5, device=meta)), ValueError,
                         r"^noise: expected device"),
        "noise-dtype": (lambda k: k.update(noise=k["y"].double()), TypeError, r"^noise: expected dtype"),
        "sigma-device": (lambda k: k.update(sigma=k["sigma"].to(meta)), ValueError, r"^sigma: expected device"),
        "weight-not-tensor": (lambda k: k.update(weight=1.0), TypeError, r"^weight: expected a torch.Tensor"),
        "cv-device": (lambda k: k.update(cv=k["cv"].to(meta)), ValueError, r"^cv: expected device"),
        "seed-device": (lambda k: k.update(seed=k["seed"].to(meta)), ValueError, r"^seed: expected device"),
        "acc-device": (lambda k: k.update(acc=torch.zeros(3, device=meta)), ValueError, r"^acc: expected device"),
        "acc-not-tensor": (lambda k: k.update(acc=[0.0] * 3), TypeError, r"^acc: expected a torch.Tensor"),
        "step-too-large": (lambda k: k.update(step=2**32), ValueError, r"^step: expected 0 <= step < 2\*\*32"),
        "acc-over-y": (lambda k: k.update(acc=k["y"].view(-1)[1:4]), ValueError, r"^acc: overlaps y"),
    }


@pytest.mark.parametrize("case", list(_likelihood_bad_cases()), ids=str)
def test_likelihood_bad_input_raises_and_writes_nothing(cpu_backend, case):
    mutate, exc, match = _likelihood_bad_cases()[case]
    y, denoised, sigma, weight, kw = _likelihood_inputs((3, 5), torch.float32)
    kw.update(y=y, denoised=denoised, sigma=sigma, weight=weight, acc=torch.full((3,), 7.0))
    mutate(kw)
    before = {k: (v, v.clone()) for k, v in kw.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}
    args = dict(kw)
    with pytest.raises(exc, match=match):
        dops.likelihood_accum(args.pop("y"), args.pop("denoised"), args.pop("sigma"), args.pop("weight"),
                              args.pop("acc"), backend=cpu_backend, **args)
    for k, (now, then) in before.items():
        assert torch.equal(now, then), f"{k} was written by a call that raised"


#----------------------------------------------------------------------------
# optimal_denoiser (triton): empty batch, 1-D points, non-contiguous inputs, sigma as 0-d / (1,) / 16-bit.

OD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_od(x, data, sigma, what, out=None):
    sig64 = sigma.double() if isinstance(sigma, torch.Tensor) else sigma
    ref64 = optimal_denoiser_reference(x.double(), data.double(), torch.as_tensor(sig64, dtype=F64))
    eager = optimal_denoiser_reference(x, data, torch.as_tensor(sigma, dtype=torch.float32))
    res = dops.optimal_denoiser(x, data, sigma, out=out, backend="triton")
    assert out is None or res is out
    assert_matches_reference(res, ref64, eager, f"{what} {x.dtype}")


@needs_triton
@pytest.mark.parametrize("dtype", OD_DTYPES, ids=_id)
@pytest.mark.parametrize("case", ["empty-batch", "1d-points", "zero-dim", "noncontiguous", "sigma-0d", "sigma-1",
                                  "sigma-16bit"])
def test_optimal_denoiser_triton_awkward(dtype, case):
    x_shape, n, sigma = (5, 3, 3), 23, 0.8
    if case == "empty-batch":
        x_shape = (0, 3, 3)
    elif case == "1d-points":
        x_shape = (6,)
    elif case == "zero-dim":
        x_shape = (4, 0)
    elif case == "sigma-0d":
        sigma = torch.tensor(0.6)
    elif case == "sigma-1":
        sigma = torch.tensor([1.7], dtype=F64)
    elif case == "sigma-16bit":
        sigma = (torch.rand(5, generator=torch.Generator().manual_seed(1)) + 0.3).to(dtype)
    contiguous = case != "noncontiguous"
    x = make_tensor(x_shape, dtype, seed=20, contiguous=contiguous)
    data = make_tensor((n, *x_shape[1:]), dtype, seed=21, contiguous=contiguous)
    out = _nan_out(x_shape, dtype, "contiguous" if contiguous or not x_shape[0] else "transposed")
    _check_od(x, data, sigma, case, out=out)


def _od_bad_cases():
    meta = torch.device("meta")
    return {
        "data-device": (lambda k: k.update(data=k["data"].to(meta)), ValueError, r"^data: expected device"),
        "data-not-tensor": (lambda k: k.update(data=k["data"].tolist()), TypeError, r"^data: expected a torch.Tensor"),
        "data-dtype": (lambda k: k.update(data=k["data"].half()), TypeError, r"^data: expected dtype"),
        "data-empty": (lambda k: k.update(data=k["data"][:0]), ValueError, r"^data: expected shape"),
        "sigma-device": (lambda k: k.update(sigma=torch.ones(2, device=meta)), ValueError, r"^sigma: expected device"),
        "sigma-int": (lambda k: k.update(sigma=torch.ones(2, dtype=torch.int64)), TypeError,
                      r"^sigma: expected a float"),
        "sigma-bool": (lambda k: k.update(sigma=True), TypeError, r"^sigma: expected a float or a tensor"),
        "sigma-inf": (lambda k: k.update(sigma=math.inf), ValueError, r"^sigma: expected a finite value"),
        "out-device": (lambda k: k.update(out=torch.empty(2, 6, device=meta)), ValueError, r"^out: expected device"),
        "out-dtype": (lambda k: k.update(out=torch.full((2, 6), 7.0, dtype=F64)), TypeError, r"^out: expected dtype"),
        "out-over-x": (lambda k: k.update(x=k["buf"][1:].view(2, 6), out=k["buf"][:12].view(2, 6)), ValueError,
                       r"^out: overlaps x"),
        "data_half_sq-dtype": (lambda k: k.update(data_half_sq=torch.zeros(7, dtype=F64)), ValueError,
                               r"^data_half_sq: expected"),
    }


@pytest.mark.parametrize("backend", ["reference"] + (["triton"] if TRITON_CPU else []))
@pytest.mark.parametrize("case", list(_od_bad_cases()), ids=str)
def test_optimal_denoiser_bad_input_raises_and_writes_nothing(backend, case):
    mutate, exc, match = _od_bad_cases()[case]
    buf = make_tensor((13,), seed=22)
    kw = {"x": make_tensor((2, 6), seed=23), "data": make_tensor((7, 6), seed=24), "sigma": 0.5,
          "out": torch.full((2, 6), 7.0), "buf": buf}
    mutate(kw)
    before = {k: (v, v.clone()) for k, v in kw.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}
    args = {k: v for k, v in kw.items() if k != "buf"}
    with pytest.raises(exc, match=match):
        dops.optimal_denoiser(args.pop("x"), args.pop("data"), args.pop("sigma"), backend=backend, **args)
    for k, (now, then) in before.items():
        assert torch.equal(now, then), f"{k} was written by a call that raised"

#----------------------------------------------------------------------------
# Outputs that overlap themselves (expanded views): refused, naming the output, before anything is written.


def _self_overlap_calls(backend):
    """Per op and output: (output name, shape of one sample, call(output)); the test passes a one-sample
    buffer expanded over a batch of 3."""
    kw = sampler_step_inputs((3, 5), torch.float32)
    x0, x1, alpha = make_tensor((3, 5), seed=1), make_tensor((3, 5), seed=2), torch.rand(3)
    y, denoised, sigma, weight, lkw = _likelihood_inputs((3, 5), torch.float32)
    data = make_tensor((4, 5), seed=3)
    n = 2
    K = torch.rand(2, n, n, dtype=F64)
    table = dops.hold.transition_table(K, torch.rand(2, n, dtype=F64), torch.tril(torch.rand(2, n, n, dtype=F64)))
    z, eps_hat = make_tensor((3, 2 * n, 5), seed=4), make_tensor((3, 2, 5), seed=5)
    z0, mean_mat = make_tensor((3, 2, 5), seed=6), torch.rand(3, n, 1, dtype=F64)
    chol = torch.tril(torch.rand(3, n, n, dtype=F64)) + torch.eye(n, dtype=F64)
    return {
        "sampler_step out": ("out", (1, 5), lambda o: dops.sampler_step(**kw, out=o, backend=backend)),
        "sampler_step x0_out": ("x0_out", (1, 5), lambda o: dops.sampler_step(**kw, x0_out=o, backend=backend)),
        "sampler_step history_out": ("history_out", (1, 5),
                                     lambda o: dops.sampler_step(**kw, history_out=o, backend=backend)),
        "iadb_blend out": ("out", (1, 5), lambda o: dops.iadb_blend(x0, x1, alpha, out=o, backend=backend)),
        "iadb_blend target_out": ("target_out", (1, 5),
                                  lambda o: dops.iadb_blend(x0, x1, alpha, target_out=o, backend=backend)),
        "randn out": ("out", (1, 5), lambda o: dops.randn(None, torch.tensor([1]), out=o, backend=backend)),
        "likelihood_accum acc": ("acc", (1,), lambda o: dops.likelihood_accum(y, denoised, sigma, weight, o,
                                                                               backend=backend, **lkw)),
        "hold_transition out": ("out", (1, 2 * n, 5),
                                lambda o: hold_transition(z, eps_hat, table, 1, out=o, backend=backend)),
        "hold_perturb out": ("out", (1, 2 * n, 5), lambda o: hold_perturb(z0, mean_mat, chol, out=o, backend=backend)),
        "hold_perturb eps_out": ("eps_out", (1, 2, 5),
                                 lambda o: hold_perturb(z0, mean_mat, chol, eps_out=o, backend=backend)),
        "optimal_denoiser out": ("out", (1, 5), lambda o: dops.optimal_denoiser(
            x0, data, 0.5, out=o, backend="triton" if backend == "triton" else "reference")),
    }


@pytest.mark.parametrize("case", list(_self_overlap_calls("reference")), ids=str)
def test_self_overlapping_output_is_refused(cpu_backend, case):
    name, one, call = _self_overlap_calls(cpu_backend)[case]
    buf = torch.full(one, 7.0)
    out = buf.expand(3, *one[1:])
    with pytest.raises(ValueError, match=rf"^{re.escape(name)}: several of its elements share one memory location"):
        call(out)
    assert (buf == 7.0).all(), "a refused call wrote its output"


def test_size_one_stride_zero_output_is_accepted(cpu_backend):
    """A stride-0 dimension of size 1 (``expand`` of a size-1 dim onto itself) shares nothing."""
    out = torch.full((1, 5), NAN).as_strided((1, 5), (0, 1))
    x, m = make_tensor((1, 5), seed=1), make_tensor((1, 5), seed=2)
    seed = torch.zeros(1, dtype=torch.int64)
    table = random_table(1, c=0.0)
    dops.sampler_step(x, m, table, 0, out=out, backend=cpu_backend)
    want = dops.sampler_step_reference(x, m, table, 0, seed=seed)[0]
    ref64 = dops.sampler_step_reference(x.double(), m.double(), table, 0, seed=seed)[0]
    assert_matches_reference(out, ref64, want, "stride-0 size-1 out")

#----------------------------------------------------------------------------
# CUDA (skipped without a GPU): likelihood_accum and ddim_step on every backend usable on CUDA tensors.


@pytest.mark.cuda
@pytest.mark.parametrize("backend", usable_backends("cuda"))
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_cuda_likelihood_and_ddim_awkward_shapes(backend, dtype):
    for shape in SHAPES:
        if backend in LIKELIHOOD_SPEC.loaders:  # likelihood_accum has no CUDA C++ kernel (triton runs it there)
            y, denoised, sigma, weight, kw = _likelihood_inputs(shape, dtype, device="cuda")
            acc = torch.full((shape[0],), NAN, dtype=acc_dtype(dtype), device="cuda")
            _check_likelihood(backend, y, denoised, sigma, weight, kw, acc, f"cuda likelihood {shape} {dtype}")
        _check_ddim(backend, shape, dtype, device="cuda")
    _check_ddim(backend, (3, 5, 7), dtype, contiguous=False, device="cuda")
