"""``sampler_step`` on every usable backend against the float64 reference (spec: ``diffkern/ops/coefs.py``).

Every comparison uses the project's tolerance rule (``diffkern.testing.assert_matches_reference``): a
backend's error against the float64 reference is at most twice the error of the reference run in the
low dtype, plus a per-dtype floor.
"""
import math

import pytest
import torch

import diffkern.ops as dops
from diffkern.ops import coefs, philox
from diffkern.testing import (DTYPES, MIXED_DTYPES, SHAPES, assert_matches_reference, check_sampler_step,
                              noncontiguous, random_table, sampler_step_inputs, usable_backends)

NAN = float("nan")


def _id(v):
    return str(v).replace("torch.", "")

#----------------------------------------------------------------------------
# The full op (guidance, history, clip, Philox noise, every output) over dtypes and awkward shapes.


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", SHAPES + ("noncontiguous",), ids=_id)
def test_matches_reference(cpu_backend, dtype, shape):
    contiguous = shape != "noncontiguous"
    shape = (4, 2, 9, 17) if not contiguous else shape
    kw = sampler_step_inputs(shape, dtype, contiguous=contiguous)
    check_sampler_step(cpu_backend, what=f"{shape} {dtype}", **kw)


@pytest.mark.parametrize("dtype,model_dtype", MIXED_DTYPES, ids=_id)
def test_model_dtype_differs_from_state(cpu_backend, dtype, model_dtype):
    kw = sampler_step_inputs((3, 1025), dtype, model_dtype=model_dtype)
    check_sampler_step(cpu_backend, what=f"state {dtype} model {model_dtype}", **kw)


@pytest.mark.parametrize("cfg", [False, True], ids=["cond", "cfg"])
@pytest.mark.parametrize("history", [False, True], ids=["nohist", "hist"])
@pytest.mark.parametrize("noise", ["philox", "explicit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
def test_feature_combinations(cpu_backend, cfg, history, noise, dtype):
    kw = sampler_step_inputs((2, 3, 5, 7), dtype, cfg=cfg, history=history, noise=noise, seed=1)
    if not history:  # c must be 0 without a history tensor
        kw["coef"][:, coefs.C] = 0.0
    check_sampler_step(cpu_backend, what=f"cfg={cfg} history={history} noise={noise}", **kw)


def test_guidance_scale_is_applied(cpu_backend):
    """w = 1 equals no guidance; w != 1 moves the result (so the uncond tensor is really read)."""
    kw = sampler_step_inputs((2, 33), torch.float32, w=1.0, history=False, c=0.0, noise="explicit", clip=math.inf,
                             bu=0.0)  # bu*D_u reads u itself (test_cfg_pp_slots_add_the_unconditional_denoised)
    with_uncond = dops.sampler_step(**kw, backend=cpu_backend)
    kw_plain = dict(kw)
    del kw_plain["model_out_uncond"]
    torch.testing.assert_close(with_uncond, dops.sampler_step(**kw_plain, backend=cpu_backend))
    kw["coef"][:, coefs.W] = 7.5
    assert not torch.allclose(dops.sampler_step(**kw, backend=cpu_backend), with_uncond)


@pytest.mark.parametrize("cfg", [False, True], ids=["cond", "cfg"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=_id)
def test_cfg_pp_slots_add_the_unconditional_denoised(cpu_backend, cfg, dtype):
    """bu adds bu*D_u to out and fu adds fu*D_u to history_out, D_u = p*x + q*u unclipped (u = model_out without an
    unconditional output); with both 0 the outputs are bitwise those of the row without them (the terms skipped)."""
    kw = sampler_step_inputs((3, 1, 7, 5), dtype, cfg=cfg, noise="explicit", clip=0.5, bu=-0.75, fu=1.25)
    x, m, coef, step = kw.pop("x"), kw.pop("model_out"), kw.pop("coef"), kw.pop("step")
    u = kw.get("model_out_uncond", m)
    plain = coef.clone()
    plain[:, coefs.BU] = plain[:, coefs.FU] = 0.0
    p, q, bu, fu = (float(coef[step, k]) for k in (coefs.P, coefs.Q, coefs.BU, coefs.FU))
    d_u = p * x.double() + q * u.double()
    out64, x064, h64 = dops.sampler_step_reference(x.double(), m.double(), plain, step,
                                                   **{k: v.double() for k, v in kw.items()})
    eager = dops.sampler_step_reference(x, m, coef, step, **kw)
    got = [torch.empty_like(x) for _ in range(3)]
    dops.sampler_step(x, m, coef, step, **kw, out=got[0], x0_out=got[1], history_out=got[2], backend=cpu_backend)
    for name, g, want, e in zip(("out", "x0_out", "history_out"), got, (out64 + bu * d_u, x064, h64 + fu * d_u),
                                eager):
        assert_matches_reference(g, want, want if dtype == torch.float64 else e, f"{name} [{cpu_backend}]")
    got = [torch.empty_like(x) for _ in range(3)]
    dops.sampler_step(x, m, plain, step, **kw, out=got[0], x0_out=got[1], history_out=got[2], backend=cpu_backend)
    if cpu_backend != "triton":  # zero slots: bitwise the reference without them (Triton may contract to FMA)
        for g, want in zip(got, dops.sampler_step_reference(x, m, plain, step, **kw)):
            assert torch.equal(g, want)


def test_clip_bounds_x0(cpu_backend):
    kw = sampler_step_inputs((4, 257), torch.float32, clip=0.75)
    x0_out = torch.empty_like(kw["x"])
    check_sampler_step(cpu_backend, **kw)
    dops.sampler_step(**kw, x0_out=x0_out, backend=cpu_backend)
    assert x0_out.abs().max() <= 0.75
    assert (x0_out.abs() == 0.75).float().mean() > 0.1, "the case must clip a good share of elements"


#----------------------------------------------------------------------------
# Skipped terms: a coefficient of exactly 0 means the tensor is not read (NaN must not leak).


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_zero_coefficients_skip_their_tensor(cpu_backend, dtype):
    kw = sampler_step_inputs((3, 5, 7), dtype, noise="explicit", c=0.0, s=0.0)
    poison = torch.tensor([NAN, math.inf, -math.inf], dtype=dtype).repeat(35)[:35].reshape(5, 7)
    kw["history"] = poison.expand(3, 5, 7).clone()
    kw["noise"] = poison.expand(3, 5, 7).clone()
    out = check_sampler_step(cpu_backend, **kw)
    assert torch.isfinite(out).all()


def test_zero_noise_coefficient_with_philox(cpu_backend):
    """s == 0: the result does not depend on the seed."""
    kw = sampler_step_inputs((2, 65), torch.float32, s=0.0)
    a = dops.sampler_step(**kw, backend=cpu_backend)
    kw["seed"] = torch.tensor([987654321], dtype=torch.int64)
    torch.testing.assert_close(dops.sampler_step(**kw, backend=cpu_backend), a, rtol=0, atol=0)


def test_first_step_with_uninitialised_history(cpu_backend):
    """Multistep samplers pass an empty (garbage) history with c == 0 on step 0, then c != 0 on step 1."""
    kw = sampler_step_inputs((2, 3, 8), torch.float32, rows=2)
    kw["coef"][0, coefs.C] = 0.0
    kw["history"] = torch.full_like(kw["x"], NAN)
    hist = torch.full_like(kw["x"], NAN)
    out0 = dops.sampler_step(**dict(kw, step=0), history_out=hist, backend=cpu_backend)
    assert torch.isfinite(out0).all() and torch.isfinite(hist).all()
    check_sampler_step(cpu_backend, what="step 1", **dict(kw, history=hist))


#----------------------------------------------------------------------------
# Outputs: in place, non-contiguous, empty; the table row is read at launch time.


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "noncontiguous"])
def test_in_place(cpu_backend, dtype, contiguous):
    """out=x and history_out=history: each element is read before it is written."""
    kw = sampler_step_inputs((3, 5, 67), dtype, contiguous=contiguous)
    ref64 = dops.sampler_step_reference(kw["x"].double(), kw["model_out"].double(), kw["coef"], kw["step"],
                                        model_out_uncond=kw["model_out_uncond"].double(),
                                        history=kw["history"].double(), seed=kw["seed"])
    eager = dops.sampler_step_reference(kw["x"], kw["model_out"], kw["coef"], kw["step"], seed=kw["seed"],
                                        model_out_uncond=kw["model_out_uncond"], history=kw["history"])
    x, history = kw["x"], kw["history"]
    res = dops.sampler_step(**kw, out=x, history_out=history, backend=cpu_backend)
    assert res is x
    assert_matches_reference(x, ref64[0], eager[0], "out=x")
    assert_matches_reference(history, ref64[2], eager[2], "history_out=history")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_id)
@pytest.mark.parametrize("shape", [(4, 2, 9, 17), (5,)], ids=_id)
def test_noncontiguous_out(cpu_backend, dtype, shape):
    out = noncontiguous(torch.empty(shape, dtype=dtype))
    assert not out.is_contiguous()
    check_sampler_step(cpu_backend, out=out, **sampler_step_inputs(shape, dtype))


def test_noncontiguous_inputs_and_outputs(cpu_backend):
    kw = sampler_step_inputs((3, 6, 11), torch.float32, contiguous=False, noise="explicit")
    assert not kw["x"].is_contiguous() and not kw["noise"].is_contiguous()
    check_sampler_step(cpu_backend, out=noncontiguous(torch.empty(3, 6, 11)), **kw)


@pytest.mark.parametrize("per_sample_seed", [False, True], ids=["seed1", "seedB"])
def test_numel_zero(cpu_backend, per_sample_seed):
    kw = sampler_step_inputs((0, 3, 4), torch.float32, per_sample_seed=per_sample_seed)
    assert kw["seed"].shape == ((0,) if per_sample_seed else (1,))
    out = check_sampler_step(cpu_backend, **kw)
    assert out.shape == (0, 3, 4)


def test_table_is_read_at_launch(cpu_backend):
    """Rewriting the table in place changes the next launch (what a captured CUDA graph relies on)."""
    kw = sampler_step_inputs((2, 40), torch.float32, noise="explicit")
    check_sampler_step(cpu_backend, what="before", **dict(kw))
    kw["coef"].copy_(random_table(3, seed=99, clip=0.5))
    check_sampler_step(cpu_backend, what="after", **kw)


#----------------------------------------------------------------------------
# Noise: explicit tensor, the Philox stream with one seed or per-sample seeds.


def _noise_only(shape, rows=1, **kw):
    """Inputs whose result is exactly s*xi (a = b = g = c = 0), s = 1."""
    return sampler_step_inputs(shape, torch.float32, cfg=False, history=False, rows=rows, a=0.0, b=0.0, g=0.0,
                               c=0.0, s=1.0, bu=0.0, **kw)


@pytest.mark.parametrize("per_sample_seed", [False, True], ids=["seed1", "seedB"])
def test_philox_noise_matches_the_stream(cpu_backend, per_sample_seed):
    """With only the noise term the step returns the Philox stream of ``philox.noise_like`` at its row."""
    kw = _noise_only((3, 5, 7), rows=4, per_sample_seed=per_sample_seed)
    out = dops.sampler_step(**kw, backend=cpu_backend)
    ref64 = philox.noise_like(kw["x"].double(), kw["seed"], kw["step"])
    assert_matches_reference(out, ref64, philox.noise_like(kw["x"], kw["seed"], kw["step"]).float(), "noise")


def test_explicit_noise_equals_stream_noise(cpu_backend):
    kw = sampler_step_inputs((2, 3, 17), torch.float32)
    from_seed = dops.sampler_step(**kw, backend=cpu_backend)
    kw["noise"] = philox.noise_like(kw["x"], kw["seed"], kw["step"])
    torch.testing.assert_close(dops.sampler_step(**kw, backend=cpu_backend), from_seed)


def test_per_sample_seeds_independent_of_batch(cpu_backend):
    """Sample b of a batch equals that sample run alone with its seed (full op, all terms on)."""
    kw = sampler_step_inputs((4, 3, 5, 7), torch.float32, per_sample_seed=True)
    batch = dops.sampler_step(**kw, backend=cpu_backend)
    for b in range(4):
        alone = {k: (v[b:b + 1] if isinstance(v, torch.Tensor) and k not in ("coef",) else v) for k, v in kw.items()}
        torch.testing.assert_close(dops.sampler_step(**alone, backend=cpu_backend), batch[b:b + 1],
                                   msg=lambda m: f"sample {b}: {m}")


def test_per_sample_seeds_give_distinct_streams(cpu_backend):
    kw = _noise_only((3, 4096), per_sample_seed=True)
    out = dops.sampler_step(**kw, backend=cpu_backend)
    corr = torch.corrcoef(out.double())
    assert (corr - torch.eye(3, dtype=torch.float64)).abs().max() < 5 / math.sqrt(4096)
    kw["seed"] = torch.full((3,), 42, dtype=torch.int64)  # equal seeds: equal samples
    out = dops.sampler_step(**kw, backend=cpu_backend)
    torch.testing.assert_close(out[1:], out[:1].expand(2, 4096), rtol=0, atol=0)


def test_philox_step_counter(cpu_backend):
    """Rows with equal coefficients still draw different noise: the row index is the Philox step."""
    kw = _noise_only((2, 2048), rows=2)
    kw["coef"][1] = kw["coef"][0]
    a = dops.sampler_step(**dict(kw, step=0), backend=cpu_backend)
    b = dops.sampler_step(**dict(kw, step=1), backend=cpu_backend)
    assert abs(float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])) < 5 / math.sqrt(4096)


#----------------------------------------------------------------------------
# Bad input: a clear error naming the argument, and nothing written.


def _bad_cases():
    meta = torch.device("meta")
    cases = {
        "x-int": (lambda k: k.update(x=k["x"].to(torch.int32)), TypeError, r"^x: expected a floating dtype"),
        "model_out-shape": (lambda k: k.update(model_out=k["model_out"][..., :-1]), ValueError,
                            r"^model_out: expected shape"),
        "model_out-device": (lambda k: k.update(model_out=k["model_out"].to(meta)), ValueError,
                             r"^model_out: expected device"),
        "uncond-dtype": (lambda k: k.update(model_out_uncond=k["model_out_uncond"].half()), TypeError,
                         r"^model_out_uncond: expected dtype"),
        "history-shape": (lambda k: k.update(history=k["history"][:1]), ValueError, r"^history: expected shape"),
        "history-dtype": (lambda k: k.update(history=k["history"].double()), TypeError, r"^history: expected dtype"),
        "noise-device": (lambda k: k.update(noise=torch.empty_like(k["x"], device=meta)), ValueError,
                         r"^noise: expected device"),
        "out-shape": (lambda k: k.update(out=torch.zeros(2, 3, 6)), ValueError, r"^out: expected shape"),
        "out-dtype": (lambda k: k.update(out=torch.zeros(2, 3, 5, dtype=torch.float64)), TypeError,
                      r"^out: expected dtype"),
        "x0_out-dtype": (lambda k: k.update(x0_out=torch.zeros(2, 3, 5, dtype=torch.float16)), TypeError,
                         r"^x0_out: expected dtype"),
        "history_out-device": (lambda k: k.update(history_out=torch.empty(2, 3, 5, device=meta)), ValueError,
                               r"^history_out: expected device"),
        "coef-not-tensor": (lambda k: k.update(coef=k["coef"].tolist()), TypeError, r"^coef: expected a torch.Tensor"),
        "coef-shape": (lambda k: k.update(coef=k["coef"][:, :11]), ValueError, r"^coef: expected shape \(N, 16\)"),
        "coef-1d": (lambda k: k.update(coef=k["coef"][0]), ValueError, r"^coef: expected shape"),
        "coef-dtype": (lambda k: k.update(coef=k["coef"].float()), TypeError, r"^coef: expected dtype torch.float64"),
        "coef-device": (lambda k: k.update(coef=k["coef"].to(meta)), ValueError, r"^coef: expected device"),
        "coef-nan": (lambda k: k["coef"].__setitem__((2, coefs.A), NAN), ValueError,
                     r"^coef\[2\]: non-finite coefficient"),
        "coef-inf": (lambda k: k["coef"].__setitem__((2, coefs.S), math.inf), ValueError,
                     r"^coef\[2\]: non-finite coefficient"),
        "coef-clip-zero": (lambda k: k["coef"].__setitem__((2, coefs.CLIP), 0.0), ValueError,
                           r"^coef\[2\]: clip slot must be > 0"),
        "coef-clip-nan": (lambda k: k["coef"].__setitem__((2, coefs.CLIP), NAN), ValueError,
                          r"^coef\[2\]: clip slot must be > 0"),
        "step-past-end": (lambda k: k.update(step=3), IndexError, r"^step: 3 is out of range .* 3 rows"),
        "step-negative": (lambda k: k.update(step=-1), IndexError, r"^step: -1 is out of range"),
        "step-float": (lambda k: k.update(step=1.0), TypeError, r"^step: expected a Python int"),
        "step-bool": (lambda k: k.update(step=True), TypeError, r"^step: expected a Python int"),
        "step-tensor": (lambda k: k.update(step=torch.tensor(1)), TypeError, r"^step: expected a Python int"),
        "seed-dtype": (lambda k: k.update(seed=k["seed"].int()), TypeError, r"^seed: expected dtype torch.int64"),
        "seed-float": (lambda k: k.update(seed=k["seed"].double()), TypeError, r"^seed: expected dtype torch.int64"),
        "seed-shape": (lambda k: k.update(seed=torch.zeros(3, dtype=torch.int64)), ValueError,
                       r"^seed: expected shape \(1,\) or \(B,\) with B = x.shape\[0\] = 2"),
        "seed-2d": (lambda k: k.update(seed=torch.zeros(2, 1, dtype=torch.int64)), ValueError, r"^seed: expected shape"),
        "seed-device": (lambda k: k.update(seed=k["seed"].to(meta)), ValueError, r"^seed: expected device"),
    }
    return cases


def _overlap_cases():
    """(name, make(kw) -> buffer whose contents must survive, match)."""
    def out_over_x(k):
        buf = torch.randn(31)
        k["x"], k["out"] = buf[1:].view(2, 3, 5), buf[:-1].view(2, 3, 5)
        return buf

    def x0_over_out(k):
        buf = torch.randn(40)
        k["out"], k["x0_out"] = buf[:30].view(2, 3, 5), buf[10:].view(2, 3, 5)
        return buf

    def history_out_over_history(k):
        buf = torch.randn(32)
        k["history"], k["history_out"] = buf[:30].view(2, 3, 5), buf[2:].view(2, 3, 5)
        return buf

    def out_is_x0_out(k):
        buf = torch.randn(2, 3, 5)
        k["out"] = k["x0_out"] = buf
        return buf

    def out_over_noise_transposed(k):
        buf = torch.randn(2, 5, 3)
        k["noise"], k["out"] = buf.transpose(1, 2), buf.view(2, 3, 5)
        return buf

    return {"out-x": (out_over_x, r"^out: overlaps x "), "x0_out-out": (x0_over_out, r"^out: overlaps x0_out"),
            "history_out-history": (history_out_over_history, r"^history_out: overlaps history "),
            "out-is-x0_out": (out_is_x0_out, r"^out: overlaps x0_out"),
            "out-noise-other-view": (out_over_noise_transposed, r"^out: overlaps noise")}


def _valid_inputs():
    kw = sampler_step_inputs((2, 3, 5), torch.float32)
    for name in ("out", "x0_out", "history_out"):
        kw[name] = torch.full((2, 3, 5), 7.0)
    return kw


def _snapshot(kw):
    return {k: v.clone() for k, v in kw.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}


def _assert_unchanged(kw, before):
    for k, v in before.items():
        if k in ("out", "x0_out", "history_out", "x", "history"):
            torch.testing.assert_close(kw[k], v, rtol=0, atol=0, equal_nan=True,
                                       msg=lambda m: f"{k} was written by a call that raised: {m}")


@pytest.mark.parametrize("case", list(_bad_cases()), ids=str)
def test_bad_input_raises_and_writes_nothing(cpu_backend, case):
    mutate, exc, match = _bad_cases()[case]
    kw = _valid_inputs()
    mutate(kw)
    before = _snapshot(kw)
    with pytest.raises(exc, match=match):
        dops.sampler_step(**kw, backend=cpu_backend)
    _assert_unchanged(kw, before)


@pytest.mark.parametrize("write", ["item", "view"])
def test_table_made_non_finite_after_a_call_is_caught(cpu_backend, write):
    """A table that passed once is checked again after an in-place write (directly or through a view)."""
    kw = _valid_inputs()
    dops.sampler_step(**kw, backend=cpu_backend)
    if write == "item":
        kw["coef"][1, coefs.Q] = math.inf
    else:
        kw["coef"][1:2].fill_(NAN)
    before = _snapshot(kw)
    with pytest.raises(ValueError, match=r"^coef\[1\]: non-finite coefficient"):
        dops.sampler_step(**kw, backend=cpu_backend)
    _assert_unchanged(kw, before)


@pytest.mark.parametrize("case", list(_overlap_cases()), ids=str)
def test_partial_overlap_raises_and_writes_nothing(cpu_backend, case):
    make, match = _overlap_cases()[case]
    kw = _valid_inputs()
    buf = make(kw)
    before = buf.clone()
    with pytest.raises(ValueError, match=match):
        dops.sampler_step(**kw, backend=cpu_backend)
    assert torch.equal(buf, before), "a call that raised wrote into the overlapping buffer"


#----------------------------------------------------------------------------
# CUDA: the same checks on every backend usable on CUDA tensors (skipped without a GPU).


@pytest.mark.cuda
@pytest.mark.parametrize("backend", usable_backends("cuda"))
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_cuda_matches_reference(backend, dtype, shape):
    kw = sampler_step_inputs(shape, dtype, per_sample_seed=True)
    kw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    check_sampler_step(backend, what=f"cuda {shape} {dtype}", **kw)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", usable_backends("cuda"))
def test_cuda_mixed_and_in_place(backend):
    for dtype, model_dtype in MIXED_DTYPES:
        kw = sampler_step_inputs((3, 1025), dtype, model_dtype=model_dtype)
        kw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        check_sampler_step(backend, what=f"cuda {dtype}/{model_dtype}", **kw)
    kw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in _noise_only((2, 999)).items()}
    x = kw["x"]
    ref64 = philox.noise_like(x.double(), kw["seed"], kw["step"])  # the step is exactly s*xi, s = 1
    eager = philox.noise_like(x, kw["seed"], kw["step"]).float()
    assert dops.sampler_step(**kw, out=x, backend=backend) is x
    assert_matches_reference(x, ref64, eager, f"cuda in place [{backend}]")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", [b for b in usable_backends("cuda") if b != "reference"])
def test_cuda_graph_capture_and_replay(backend):
    """A captured step has no host sync; replay reads the current x, seed and table row."""
    kw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v)
          for k, v in sampler_step_inputs((4, 3, 17, 9), torch.float32, per_sample_seed=True).items()}
    static_x, out = kw.pop("x").clone(), torch.empty(4, 3, 17, 9, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (lazy loading, Triton compilation) outside the capture
        dops.sampler_step(static_x, **kw, out=out, backend=backend)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dops.sampler_step(static_x, **kw, out=out, backend=backend)
    for rewrite in ("none", "x", "table"):
        if rewrite == "x":
            static_x.copy_(torch.randn_like(static_x))
        if rewrite == "table":
            kw["coef"].copy_(random_table(3, seed=5).cuda())
        graph.replay()
        torch.testing.assert_close(out, dops.sampler_step(static_x, **kw, backend=backend), rtol=0, atol=0,
                                   msg=lambda m: f"after rewriting {rewrite}: {m}")
