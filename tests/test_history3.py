"""The deeper history inputs of the fused step (``history2``, slot c2; ``history3``, slot c3) and depth-3 plans.

Op level, on every backend available here against the float64 reference (the tolerance rule of
``diffkern.testing``): the terms ``c2*H2`` and ``c3*H3`` after ``c*H``, awkward shapes and every dtype; each history
not read when its coefficient is 0; exact in-place use ``history_out is history2`` (``history3``); the argument checks of the Python front-end and of the
C++ bindings; the C++ kernels bitwise the eager float32 reference; the reserved slot 15; the run-time CUDA
loader passes history3 and includes it in the 16-byte alignment test (device-free: its launch is intercepted).

Loop level: the rotation of three buffers (:func:`coef_tables.history_slots`), the plan checks (no row reads a
value no earlier call wrote), a depth-3 plan with a corrector on its first step run by the sampling loop against
a float64 emulation of the same rows, and rerun on stale buffers (a graph replay); the schedulers' buffer group.
"""
from __future__ import annotations

import math
import re

import pytest
import torch

import diffkern.ops as dops
from diffkern import coef_tables, samplers
from diffkern.ops import coefs, cuda_rtc
from diffkern.ops.sampler_step import sampler_step, sampler_step_reference
from diffkern.testing import DTYPES, MIXED_DTYPES, SHAPES, check_sampler_step, sampler_step_inputs

REF = "reference"
F32, F64 = torch.float32, torch.float64
has_cpp = dops.backend_status("cpp", "cpu")[1] is None
needs_cpp = pytest.mark.skipif(not has_cpp, reason="C++ backend unavailable")

#----------------------------------------------------------------------------
# The op: every backend against the float64 reference, for each of the deeper histories (H2, slot c2; H3, slot c3).

DEEP = [("history2", "c2"), ("history3", "c3")]


def _inputs(shape, dtype, name, **kw):
    """sampler_step_inputs with every history up to ``name`` (H3 rows also read H2, as LMS and PLMS rows do)."""
    return sampler_step_inputs(shape, dtype, history2=True, history3=name == "history3", **kw)


@pytest.mark.parametrize("name,slot", DEEP)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(cpu_backend, shape, dtype, name, slot):
    check_sampler_step(cpu_backend, what=f"{shape} {dtype}", **_inputs(shape, dtype, name))


@pytest.mark.parametrize("name,slot", DEEP)
@pytest.mark.parametrize("state,model", MIXED_DTYPES, ids=str)
def test_mixed_dtypes_and_non_contiguous_inputs(cpu_backend, state, model, name, slot):
    kw = _inputs((3, 5, 7), state, name, model_dtype=model, contiguous=False, noise="explicit")
    check_sampler_step(cpu_backend, what=f"state {state} model {model}", **kw)


def test_table_layout_and_reserved_slots():
    """c2 took slot 11 and c3 slot 12, each once reserved (kept 0): rows written before them read the same."""
    assert (coefs.C2, coefs.C3, coefs.NCOEF) == (11, 12, 16)
    assert coefs.SLOT_NAMES[coefs.C2] == "c2" and coefs.SLOT_NAMES[coefs.C3] == "c3"
    assert coefs.row(a=0.5, c=0.25)[11:] == [0.0] * 5 and coefs.row(c2=-0.75, c3=0.5)[11:13] == [-0.75, 0.5]
    bad = coefs.table([coefs.row(a=1.0)] * 2)
    bad[1, 15] = 0.5  # bu and fu took slots 13 and 14 since
    with pytest.raises(ValueError, match=r"^coef\[1\]: reserved slot 15 must be 0"):
        coefs.validate(bad)


@pytest.mark.parametrize("name,slot", DEEP)
@pytest.mark.parametrize("dtype", [F32, torch.bfloat16, F64], ids=str)
def test_zero_coefficient_does_not_read_its_history(cpu_backend, dtype, name, slot):
    """c2 (c3) == 0: a NaN-filled history2 (history3) must not reach the output (the tensor is not read)."""
    kw = _inputs((3, 37), dtype, name, **{slot: 0.0})
    without = dict(kw)
    del without[name]
    kw[name] = torch.full_like(kw[name], math.nan)
    got = sampler_step(**kw, backend=cpu_backend)
    assert not torch.isnan(got).any()
    assert torch.equal(got, sampler_step(**without, backend=cpu_backend))


@pytest.mark.parametrize("name,slot", DEEP)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_in_place_history_out_is_the_oldest_history(cpu_backend, dtype, name, slot):
    """A loop writes the new history over the oldest one (history_out is history2 or history3) and x in place:
    every element is read before it is written, so the result is the out-of-place one, bit for bit."""
    kw = _inputs((2, 3, 41), dtype, name)
    outs = [torch.empty_like(kw["x"]) for _ in range(3)]
    sampler_step(**kw, out=outs[0], x0_out=outs[1], history_out=outs[2], backend=cpu_backend)
    x, oldest = kw.pop("x").clone(), kw.pop(name).clone()
    x0 = torch.empty_like(x)
    sampler_step(x, **kw, **{name: oldest}, out=x, x0_out=x0, history_out=oldest, backend=cpu_backend)
    for got, want, what in zip((x, x0, oldest), outs, ("out is x", "x0_out", f"history_out is {name}")):
        assert torch.equal(got, want), what


@pytest.mark.parametrize("name,slot", DEEP)
def test_missing_history_with_nonzero_coefficient_raises_naming_it(cpu_backend, name, slot):
    kw = _inputs((2, 9), F32, name)
    del kw[name]
    out = torch.zeros_like(kw["x"])
    with pytest.raises(ValueError, match=rf"^{name}: required, since coef\[2\] has a non-zero {slot}"):
        sampler_step(**kw, out=out, backend=cpu_backend)
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("name,slot", DEEP)
def test_front_end_checks_name_the_history(name, slot):
    kw = _inputs((2, 9), F32, name)
    with pytest.raises(ValueError, match=rf"^{name}: expected shape"):
        sampler_step(**dict(kw, **{name: torch.zeros(2, 8)}), backend=REF)
    with pytest.raises(TypeError, match=rf"^{name}: expected dtype torch.float32"):
        sampler_step(**dict(kw, **{name: kw[name].double()}), backend=REF)
    base = torch.zeros(40)
    with pytest.raises(ValueError, match=rf"history_out: overlaps {name} without being the same view"):
        sampler_step(**dict(kw, **{name: base[:18].view(2, 9)}), history_out=base[1:19].view(2, 9), backend=REF)

#----------------------------------------------------------------------------
# The C++ kernels: rounding, direct-call checks.


@needs_cpp
@pytest.mark.parametrize("state", DTYPES, ids=str)
def test_cpp_is_bitwise_the_eager_reference(state):
    """Explicit-noise rows round in the C++ kernels exactly as in torch's eager reference, the terms in the order
    c*H, c2*H2, c3*H3 (in float32 for 16-bit and float32 states)."""
    gen = torch.Generator().manual_seed(6)
    x, h, h2, h3, noise = (torch.randn(3, 1037, generator=gen, dtype=F64).to(state) for _ in range(5))
    m = torch.randn(3, 1037, generator=gen, dtype=F64).to(F32)
    table = coefs.table([coefs.row(a=0.7, b=0.2, g=0.05, c=0.3, c2=-0.45, c3=0.125, s=0.2, p=0.5, q=0.8, e=1.0,
                                   f=-0.25, clip=1.5),
                         coefs.row(a=0.9, b=0.1, c=0.0, c2=0.6, f=1.0),
                         coefs.row(a=0.9, b=0.1, c=0.0, c2=0.0, c3=-0.6, f=1.0)])
    for step in range(3):
        kw = dict(history=h, history2=h2, history3=h3, noise=noise)
        outs = [torch.empty_like(x) for _ in range(3)]
        sampler_step(x, m, table, step, out=outs[0], x0_out=outs[1], history_out=outs[2], backend="cpp", **kw)
        for got, want in zip(outs, sampler_step_reference(x, m, table, step, **kw)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@needs_cpp
@pytest.mark.parametrize("name,slot", DEEP)
def test_cpp_direct_calls_check_the_history(name, slot):
    """torch.ops.diffkern.sampler_step (history2 and history3 are its last arguments, appended: calls written before
    them still bind) validates them before writing anything."""
    x, out = torch.randn(3, 8), torch.full((3, 8), 7.0)
    table, seed = coefs.table([coefs.row(a=1.0, **{slot: 0.5})]), torch.zeros(1, dtype=torch.int64)
    base = torch.zeros(64)
    cases = [({name: torch.randn(3, 9)}, f"{name}: expected shape [3, 8] (that of x)"),
             ({name: torch.randn(3, 8).double()}, f"{name}: expected dtype Float (that of x)"),
             ({name: torch.randn(8, 3).t()}, f"{name}: expected a contiguous tensor"),
             ({name: base[1:25].view(3, 8), "out": base[:24].view(3, 8)},
              f"out: overlaps {name} without being the same tensor"),
             (dict(coef=torch.zeros(1, 12, dtype=F64)), "coef: expected shape (N, 16)")]
    for override, message in cases:
        args = dict(x=x, model_out=x, model_out_uncond=None, history=None, noise=None, coef=table, step=0,
                    seed=seed, out=out, x0_out=None, history_out=None, history2=None, history3=None)
        args.update(override)
        before = args["out"].clone()
        with pytest.raises(RuntimeError, match=re.escape(message)):
            torch.ops.diffkern.sampler_step(*args.values())
        assert torch.equal(args["out"], before), message
    deep = torch.randn(3, 8)
    args = [x, x, None, None, None, table, 0, seed, out, None, None] + ([deep] if name == "history2" else [None, deep])
    torch.ops.diffkern.sampler_step(*args)
    torch.testing.assert_close(out, x + 0.5 * deep, rtol=0, atol=0)
    torch.ops.diffkern.sampler_step(x, x, None, None, None, coefs.table([coefs.row(a=1.0)]), 0, seed, out, None, None)


@needs_cpp
def test_opcheck_with_every_history():
    kw = _inputs((2, 3, 5), F32, "history3", per_sample_seed=True)
    e = [torch.empty_like(kw["x"]) for _ in range(3)]
    args = (kw["x"], kw["model_out"], kw["model_out_uncond"], kw["history"], None, kw["coef"], kw["step"],
            kw["seed"], e[0], e[1], e[2], kw["history2"], kw["history3"])
    result = torch.library.opcheck(torch.ops.diffkern.sampler_step, args)
    assert all(v == "SUCCESS" for v in result.values()), result

#----------------------------------------------------------------------------
# The CUDA kernels, without a GPU: the NVRTC loader's arguments and the packed path's alignment test.


@pytest.mark.parametrize("name,slot", DEEP)
def test_nvrtc_loader_passes_the_history_and_aligns_on_it(monkeypatch, name, slot):
    from diffkern.ops import registry
    if registry._extension()[0] is None:
        pytest.skip("the NVRTC ops validate with diffkern._C's checks")
    launched = []
    monkeypatch.setattr(cuda_rtc, "_on_cuda", lambda t, name: None)
    monkeypatch.setattr(cuda_rtc, "launch", lambda *a, **k: launched.append(a))
    kw = _inputs((2, 64), F32, name)
    base = torch.zeros(129)
    kw[name] = base[1:].view(2, 64)  # 4 bytes off a 16-byte boundary: the scalar kernel must be picked
    out = torch.empty_like(kw["x"])
    cuda_rtc.sampler_step(kw["x"], kw["model_out"], kw["model_out_uncond"], kw["history"], None, kw["coef"],
                          kw["step"], kw["seed"], out, None, None, kw["history2"], kw.get("history3"))
    (op, dtypes, struct, values, state_ptrs, model_ptrs, numel, _), = launched
    assert values[name] == kw[name].data_ptr() and kw[name].data_ptr() in state_ptrs
    assert set(values) == set(cuda_rtc.STRUCTS[struct].names)
    name, _ = cuda_rtc.plan(op, dtypes, state_ptrs, model_ptrs, numel, 132)
    assert name.endswith(", 1>"), name


def test_cuda_launcher_aligns_on_every_history():
    """The ahead-of-time launcher picks the 16-byte packed kernel only when every state pointer is aligned."""
    text = (cuda_rtc.csrc_dir() / "cuda" / "sampler_step.cu").read_text()
    ptrs = re.search(r"const void\* ptrs_s\[\] = \{([^}]*)\};", text).group(1)
    assert all(f"p.{h}" in ptrs for h in ("history", "history2", "history3"))


@pytest.mark.cuda
@pytest.mark.parametrize("name,slot", DEEP)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_reference(dtype, name, slot):
    kw = _inputs((3, 1025), dtype, name)
    check_sampler_step("cuda", what=f"cuda {dtype}",
                       **{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kw.items()})

#----------------------------------------------------------------------------
# Depth-3 plans and the loop.


def test_history_slots_rotate_three_buffers():
    bufs = ["b0", "b1", "b2"]
    # step i reads D_{i-1}, D_{i-2}, D_{i-3} and writes D_i over D_{i-3} (buffer i % 3 holds D_i afterwards)
    for i in range(7):
        h, h2, h3, out = coef_tables.history_slots(bufs, i)
        assert (h, h2, h3, out) == (bufs[(i - 1) % 3], bufs[(i - 2) % 3], bufs[i % 3], bufs[i % 3])
    assert coef_tables.history_slots(["a", "b"], 4) == ("b", "a", None, "a")
    assert coef_tables.history_slots(["a"], 4) == ("a", None, None, "a")
    assert coef_tables.history_slots([], 4) == (None, None, None, None)


def _plan(rows, corrector=None, history=3):
    n = len(rows) - (sum(corrector) if corrector else 0)
    corrector = corrector or [False] * n
    sig = [3.0 / (i + 1) for i in range(len(rows))]
    return coef_tables.Plan(coefs.table(rows), sig, sig[:n], [False] * n, corrector, corrector_row=n, history=history)


def test_plan_refuses_reads_of_unwritten_history():
    ok = [coefs.row(a=1.0, e=1.0), coefs.row(a=1.0, c=0.5, e=1.0), coefs.row(a=1.0, c2=0.5, e=1.0),
          coefs.row(a=1.0, c3=0.5)]
    _plan(ok)
    with pytest.raises(ValueError, match=r"history: depth 2 is too small for the table \(non-zero c3 needs 3\)"):
        _plan(ok, history=2)
    for i, slot in ((2, "c3"), (1, "c2"), (0, "c")):
        rows = list(ok)
        rows[i] = coefs.row(a=1.0, **{slot: 0.25})
        with pytest.raises(ValueError, match=rf"^table: step {i} reads history \d \({slot} != 0 on its row\)"):
            _plan(rows)
    with pytest.raises(ValueError, match=r"history: expected a depth of 0, 1, 2 or 3, got 4"):
        _plan(ok, history=4)
    # a corrector on step 0 reads H = D_0 (its first call's) but not H2
    first = [coefs.row(a=1.0, e=1.0)] + ok[1:] + [coefs.row(a=1.0, c=0.5)]
    _plan(first, corrector=[True, False, False, False])
    with pytest.raises(ValueError, match=r"^table: step 0 reads history 2 \(c2 != 0 on its corrector row\)"):
        _plan(first[:-1] + [coefs.row(a=1.0, c2=0.5)], corrector=[True, False, False, False])


def _depth3_plan():
    """A depth-3 plan with a corrector on step 0 (PLMS's shape): AB-like rows on eps = (x - D)/sigma history."""
    sig = [4.0, 2.5, 1.5, 0.9, 0.5, 0.25]
    n = len(sig) - 1
    first = []
    for i in range(n):
        s, sn = sig[i], sig[i + 1]
        dt = sn - s
        w = [[1.0], [1.5, -0.5], [23 / 12, -16 / 12, 5 / 12], [55 / 24, -59 / 24, 37 / 24, -9 / 24]][min(i, 3)]
        # x' = x + dt*(w0*eps_i + w1*H + w2*H2 + w3*H3), eps_i = (x - D)/s
        first.append(coefs.row(a=1.0 + dt * w[0] / s, b=-dt * w[0] / s, e=1.0 / s, f=-1.0 / s,
                               **{k: dt * v for k, v in zip(("c", "c2", "c3"), w[1:])}))
    s, sn = sig[0], sig[1]
    # corrector of step 0 at sn: x1 = x0 + dt eps_0, so x' = x0 + dt (eps_0 + eps_1)/2 = x1 + dt (eps_1 - eps_0)/2
    corr = coefs.row(a=1.0 + (sn - s) / 2 / sn, b=-(sn - s) / 2 / sn, c=-(sn - s) / 2)
    plan = coef_tables.Plan(coefs.table(first + [corr]), sig[:-1] + [sn], sig[:-1], [False] * n,
                            [True] + [False] * (n - 1), corrector_row=n, history=3)
    return sig, plan


def _emulate(model, x, sig):
    """The same scheme written out in float64 (PNDM's skip-PRK order: e1 never enters the history)."""
    eps = []
    x = x.double()
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        e = (x - model(x, torch.full((x.shape[0],), s, dtype=F64))) / s
        if i == 0:
            x1 = x + (sn - s) * e
            e1 = (x1 - model(x1, torch.full((x.shape[0],), sn, dtype=F64))) / sn
            x = x + (sn - s) * (e + e1) / 2
            eps.append(e)
            continue
        eps.append(e)
        k = min(i, 3)
        w = [[1.0], [1.5, -0.5], [23 / 12, -16 / 12, 5 / 12], [55 / 24, -59 / 24, 37 / 24, -9 / 24]][k]
        x = x + (sn - s) * sum(wj * ej for wj, ej in zip(w, reversed(eps[-len(w):])))
    return x


def _model(x, sigma):
    return torch.tanh(x) * (1.0 / (1.0 + sigma.view(-1, *[1] * (x.dim() - 1)) ** 2))


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
def test_depth3_loop_matches_float64_emulation(backend):
    sig, plan = _depth3_plan()
    x = torch.randn(3, 2, 7, generator=torch.Generator().manual_seed(1), dtype=F64) * sig[0]
    loop = samplers._Loop(_model, x, torch.tensor(sig, dtype=F64), None, None, True, 0, backend, None)
    got = samplers._run(loop, plan)
    want = _emulate(_model, x, sig)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # float32 within the float64 answer's rounding budget
    loop = samplers._Loop(_model, x.float(), torch.tensor(sig, dtype=F64), None, None, True, 0, backend, None)
    torch.testing.assert_close(samplers._run(loop, plan).double(), want, rtol=1e-5, atol=1e-5)


def test_depth3_loop_rerun_on_stale_buffers_equals_eager():
    """A graph replay reruns the captured body (samplers.run_steps) on the buffers the last run left: no row may
    read a value this run has not written, so every rerun equals a fresh eager loop."""
    sig, plan = _depth3_plan()
    x = torch.randn(2, 9, generator=torch.Generator().manual_seed(2), dtype=F32) * sig[0]
    eager = samplers._run(samplers._Loop(_model, x, torch.tensor(sig, dtype=F64), None, None, True, 0, REF, None),
                          plan)
    loop = samplers._Loop(_model, x, torch.tensor(sig, dtype=F64), None, None, True, 0, REF, None)
    loop.begin(plan)
    state = x.clone()
    for _ in range(2):  # replay twice from the same start: the buffers rotate back to the same assignment
        loop.x.copy_(state)
        samplers.run_steps(loop, plan)
        assert torch.equal(loop.x, eager)


def test_scheduler_history_group_depth3():
    from diffkern.diffusers import DDIMScheduler
    sched = DDIMScheduler()
    x = torch.randn(2, 5)
    h, h2, h3, out = sched._history_slots(x, 0, True, 3)
    assert h is not h2 and h2 is not h3 and out is h3 and all(torch.count_nonzero(t) == 0 for t in (h, h2, h3))
    h_, h2_, h3_, out_ = sched._history_slots(x, 1, False, 3)
    assert (h_, h2_, h3_, out_) == (out, h, h2, h2)  # step 1 reads what step 0 wrote as H
    h, *_ = sched._history_slots(x, 0, True, 2)
    assert len(sched._history_group) == 2


def test_ve_row_to_vp_scales_every_history_term():
    """A VP drop-in's row: every output term, c3 included, is multiplied by alpha_out (H is the same value in both
    coordinates: its x weight e is divided by alpha_in)."""
    from diffkern.diffusers.schedulers import ve_row_to_vp
    row = coefs.row(a=0.9, b=0.1, c=0.3, c2=-0.2, c3=0.05, e=1.0, f=-1.0)
    vp = ve_row_to_vp(row, 2.0, 1.0)
    a_in, a_out = 1 / math.sqrt(5.0), 1 / math.sqrt(2.0)
    for k in (coefs.C, coefs.C2, coefs.C3):
        assert vp[k] == pytest.approx(row[k] * a_out, rel=1e-15)
    assert vp[coefs.E] == pytest.approx(1.0 / a_in, rel=1e-15)
