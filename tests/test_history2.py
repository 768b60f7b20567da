"""The second history input of the fused step (``history2``, slot c2) and DPM-Solver++(3M) SDE, built on it.

Op level, on every backend available here against the float64 reference (the tolerance rule of
``diffkern.testing``): the term ``c2*H2`` after ``c*H``, awkward shapes and every dtype; H2 not read when
c2 == 0; exact in-place use ``history_out is history2``; the argument checks of both the Python front-end
and the C++ bindings; the C++ kernels bitwise the eager float32 reference; the run-time CUDA loader passes
history2 and includes it in the 16-byte alignment test (device-free: its launch is intercepted).

Sampler level: float64 equality with k-diffusion's ``sample_dpmpp_3m_sde`` loop written below as published
(noise: diffkern's Philox draw of each step, as test_sampler_parity.py feeds the 2M SDE); the loop's two
history buffers; convergence on an analytic mixture; the graph runner on its CPU stand-in (test_graphs.py).
"""
from __future__ import annotations

import math
import re

import pytest
import torch

import diffkern.ops as dops
from diffkern import analytic, coef_tables, coef_tables_3m, graphs, sampler_loop, samplers, schedules
from diffkern.ops import coefs, cuda_rtc
from diffkern.ops.sampler_step import sampler_step, sampler_step_reference
from diffkern.sampling import sample
from diffkern.testing import (DTYPES, MIXED_DTYPES, SHAPES, assert_matches_reference, check_sampler_step,
                              sampler_step_inputs)
from test_graphs import fake, fresh_cache  # noqa: F401  (fixtures: the CPU stand-in of a CUDA graph)
from test_sampler_parity import SEED, STEPS, assert_parity, noises

REF = "reference"
F32, F64 = torch.float32, torch.float64
has_cpp = dops.backend_status("cpp", "cpu")[1] is None
needs_cpp = pytest.mark.skipif(not has_cpp, reason="C++ backend unavailable")

#----------------------------------------------------------------------------
# The op: every backend against the float64 reference.


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(cpu_backend, shape, dtype):
    kw = sampler_step_inputs(shape, dtype, history2=True)
    check_sampler_step(cpu_backend, what=f"{shape} {dtype}", **kw)


@pytest.mark.parametrize("state,model", MIXED_DTYPES, ids=str)
def test_mixed_dtypes_and_non_contiguous_inputs(cpu_backend, state, model):
    kw = sampler_step_inputs((3, 5, 7), state, model_dtype=model, history2=True, contiguous=False,
                             noise="explicit")
    check_sampler_step(cpu_backend, what=f"state {state} model {model}", **kw)


def test_table_slot_11_is_c2_and_older_tables_are_unchanged():
    assert coefs.SLOT_NAMES[coefs.C2] == "c2" and coefs.C2 == 11
    assert coefs.row(a=0.5, c=0.25)[coefs.C2] == 0.0  # rows written before c2 existed keep slot 11 at 0
    assert coefs.row(c2=-0.75)[11] == -0.75


@pytest.mark.parametrize("dtype", [F32, torch.bfloat16, F64], ids=str)
def test_zero_c2_does_not_read_history2(cpu_backend, dtype):
    """c2 == 0: a NaN-filled history2 must not reach the output (the tensor is not read), as for c and H."""
    kw = sampler_step_inputs((3, 37), dtype, history2=True, c2=0.0)
    without = dict(kw)
    del without["history2"]
    kw["history2"] = torch.full_like(kw["history2"], math.nan)
    got = sampler_step(**kw, backend=cpu_backend)
    assert not torch.isnan(got).any()
    assert torch.equal(got, sampler_step(**without, backend=cpu_backend))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_in_place_history_out_is_history2(cpu_backend, dtype):
    """The loop writes the new history over the oldest one (history_out is history2) and x in place: every
    element is read before it is written, so the result is the out-of-place one, bit for bit."""
    kw = sampler_step_inputs((2, 3, 41), dtype, history2=True)
    outs = [torch.empty_like(kw["x"]) for _ in range(3)]
    sampler_step(**kw, out=outs[0], x0_out=outs[1], history_out=outs[2], backend=cpu_backend)
    x, h2 = kw.pop("x").clone(), kw.pop("history2").clone()
    x0 = torch.empty_like(x)
    sampler_step(x, **kw, history2=h2, out=x, x0_out=x0, history_out=h2, backend=cpu_backend)
    for got, want, what in zip((x, x0, h2), outs, ("out is x", "x0_out", "history_out is history2")):
        assert torch.equal(got, want), what


def test_missing_history2_with_nonzero_c2_raises_naming_it(cpu_backend):
    kw = sampler_step_inputs((2, 9), F32, history2=True)
    del kw["history2"]
    out = torch.zeros_like(kw["x"])
    with pytest.raises(ValueError, match=r"^history2: required, since coef\[2\] has a non-zero c2"):
        sampler_step(**kw, out=out, backend=cpu_backend)
    assert torch.count_nonzero(out) == 0


def test_front_end_checks_name_history2():
    kw = sampler_step_inputs((2, 9), F32, history2=True)
    with pytest.raises(ValueError, match=r"^history2: expected shape"):
        sampler_step(**dict(kw, history2=torch.zeros(2, 8)), backend=REF)
    with pytest.raises(TypeError, match=r"^history2: expected dtype torch.float32"):
        sampler_step(**dict(kw, history2=kw["history2"].double()), backend=REF)
    base = torch.zeros(40)
    with pytest.raises(ValueError, match=r"history_out: overlaps history2 without being the same view"):
        sampler_step(**dict(kw, history2=base[:18].view(2, 9)), history_out=base[1:19].view(2, 9), backend=REF)

#----------------------------------------------------------------------------
# The C++ kernels: rounding, direct-call checks.


@needs_cpp
@pytest.mark.parametrize("state", DTYPES, ids=str)
def test_cpp_is_bitwise_the_eager_reference(state):
    """Noise-free or explicit-noise rows round in the C++ kernels exactly as in torch's eager reference, with
    the c2*H2 term after c*H (in float32 for 16-bit and float32 states)."""
    gen = torch.Generator().manual_seed(5)
    x, h, h2, noise = (torch.randn(3, 1037, generator=gen, dtype=F64).to(state) for _ in range(4))
    m = torch.randn(3, 1037, generator=gen, dtype=F64).to(F32)
    table = coefs.table([coefs.row(a=0.7, b=0.2, g=0.05, c=0.3, c2=-0.45, s=0.2, p=0.5, q=0.8, e=1.0, f=-0.25,
                                   clip=1.5),
                         coefs.row(a=0.9, b=0.1, c=0.0, c2=0.6, f=1.0)])
    for step in range(2):
        kw = dict(history=h, history2=h2, noise=noise)
        outs = [torch.empty_like(x) for _ in range(3)]
        sampler_step(x, m, table, step, out=outs[0], x0_out=outs[1], history_out=outs[2], backend="cpp", **kw)
        for got, want in zip(outs, sampler_step_reference(x, m, table, step, **kw)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@needs_cpp
def test_cpp_direct_calls_check_history2():
    """torch.ops.diffkern.sampler_step (history2 is its last argument) validates it before writing anything."""
    x, out = torch.randn(3, 8), torch.full((3, 8), 7.0)
    table, seed = coefs.table([coefs.row(a=1.0, c2=0.5)]), torch.zeros(1, dtype=torch.int64)
    base = torch.zeros(64)
    cases = [(dict(history2=torch.randn(3, 9)), "history2: expected shape [3, 8] (that of x)"),
             (dict(history2=torch.randn(3, 8).double()), "history2: expected dtype Float (that of x)"),
             (dict(history2=torch.randn(8, 3).t()), "history2: expected a contiguous tensor"),
             (dict(history2=base[1:25].view(3, 8), out=base[:24].view(3, 8)),
              "out: overlaps history2 without being the same tensor")]
    for override, message in cases:
        args = dict(x=x, model_out=x, model_out_uncond=None, history=None, noise=None, coef=table, step=0,
                    seed=seed, out=out, x0_out=None, history_out=None, history2=None)
        args.update(override)
        before = args["out"].clone()
        with pytest.raises(RuntimeError, match=re.escape(message)):
            torch.ops.diffkern.sampler_step(*args.values())
        assert torch.equal(args["out"], before), message
    h2 = torch.randn(3, 8)
    torch.ops.diffkern.sampler_step(x, x, None, None, None, table, 0, seed, out, None, None, h2)
    torch.testing.assert_close(out, x + 0.5 * h2, rtol=0, atol=0)
    torch.ops.diffkern.sampler_step(x, x, None, None, None, table, 0, seed, out, None, None)  # appended: optional


@needs_cpp
def test_opcheck_with_history2():
    kw = sampler_step_inputs((2, 3, 5), F32, history2=True, per_sample_seed=True)
    e = [torch.empty_like(kw["x"]) for _ in range(3)]
    args = (kw["x"], kw["model_out"], kw["model_out_uncond"], kw["history"], None, kw["coef"], kw["step"],
            kw["seed"], e[0], e[1], e[2], kw["history2"])
    result = torch.library.opcheck(torch.ops.diffkern.sampler_step, args)
    assert all(v == "SUCCESS" for v in result.values()), result

#----------------------------------------------------------------------------
# The CUDA kernels, without a GPU: the NVRTC loader's arguments and the packed path's alignment test.


def test_nvrtc_loader_passes_history2_and_aligns_on_it(monkeypatch):
    from diffkern.ops import registry
    if registry._extension()[0] is None:
        pytest.skip("the NVRTC ops validate with diffkern._C's checks")
    launched = []
    monkeypatch.setattr(cuda_rtc, "_on_cuda", lambda t, name: None)
    monkeypatch.setattr(cuda_rtc, "launch", lambda *a, **k: launched.append(a))
    kw = sampler_step_inputs((2, 64), F32, history2=True)
    base = torch.zeros(129)
    h2 = base[1:].view(2, 64)  # 4 bytes off a 16-byte boundary: the scalar kernel must be picked
    out = torch.empty_like(kw["x"])
    cuda_rtc.sampler_step(kw["x"], kw["model_out"], kw["model_out_uncond"], kw["history"], None, kw["coef"],
                          kw["step"], kw["seed"], out, None, None, h2)
    (op, dtypes, struct, values, state_ptrs, model_ptrs, numel, _), = launched
    assert values["history2"] == h2.data_ptr() and h2.data_ptr() in state_ptrs
    assert set(values) == set(cuda_rtc.STRUCTS[struct].names)
    name, _ = cuda_rtc.plan(op, dtypes, state_ptrs, model_ptrs, numel, 132)
    assert name.endswith(", 1>"), name


def test_cuda_launcher_aligns_on_history2():
    """The ahead-of-time launcher picks the 16-byte packed kernel only when every state pointer is aligned."""
    text = (cuda_rtc.csrc_dir() / "cuda" / "sampler_step.cu").read_text()
    ptrs = re.search(r"const void\* ptrs_s\[\] = \{([^}]*)\};", text).group(1)
    assert "p.history2" in ptrs and "p.history" in ptrs


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_reference(dtype):
    kw = sampler_step_inputs((3, 1025), dtype, history2=True)
    check_sampler_step("cuda", what=f"cuda {dtype}",
                       **{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kw.items()})

#----------------------------------------------------------------------------
# DPM-Solver++(3M) SDE: k-diffusion's loop, as published, with explicit noise.


def kdiff_dpmpp_3m_sde(model, x, sigmas, noise, eta, s_noise=1.0):
    """k-diffusion's ``sample_dpmpp_3m_sde`` loop (VE, D = model(x, sigma)); ``noise[i]`` replaces its Brownian-tree
    draw of step i."""
    denoised_1 = denoised_2 = None
    h = h_1 = h_2 = None
    for i, (s, sn) in enumerate(zip(sigmas[:-1].tolist(), sigmas[1:].tolist())):
        denoised = model(x, torch.full((x.shape[0],), s, dtype=x.dtype))
        if sn == 0:
            x = denoised
        else:
            h = math.log(s / sn)
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x + -math.expm1(-h_eta) * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = math.expm1(-h_eta) / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                r = h_1 / h
                d = (denoised - denoised_1) / r
                phi_2 = math.expm1(-h_eta) / h_eta + 1
                x = x + phi_2 * d
            if eta:
                x = x + noise[i].to(x.dtype) * sn * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


def gmm2():
    return analytic.GaussianMixture([1.0, 2.0], [[-1.0, 0.5], [1.0, 1.0]], [0.3, 0.5])


SCHEDULES = {"karras": lambda: schedules.karras(STEPS, 0.02, 20.0),  # ends in 0: the last step is the jump
             "loglinear-to-0.05": lambda: schedules.loglinear(STEPS + 1, 0.05, 20.0)[:-1]}  # third order to the end


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("eta,s_noise", [(0.0, 1.0), (1.0, 1.0), (0.5, 0.7)])
def test_dpmpp_3m_sde_is_k_diffusions(schedule, eta, s_noise):
    gmm, sig = gmm2(), SCHEDULES[schedule]()
    assert len(sig) == STEPS + 1
    x = torch.randn(6, 2, dtype=F64, generator=torch.Generator().manual_seed(3)) * 20.0
    ref = {dt: kdiff_dpmpp_3m_sde(gmm.denoise, x.to(dt), sig, noises(x, STEPS, dt), eta, s_noise) for dt in (F64, F32)}
    ours = {dt: sample(gmm.denoise, x.to(dt), sig, "dpmpp_3m_sde", backend=REF, seed=SEED, eta=eta, s_noise=s_noise)
            for dt in (F64, F32)}
    assert_parity(ours[F64], ours[F32], ref[F64], ref[F32], f"dpmpp_3m_sde {schedule} eta={eta}")


def test_every_backend_matches_the_float64_run(cpu_backend):
    gmm, sig = gmm2(), schedules.karras(8, 0.05, 10.0)
    x = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(4)) * 10.0
    ref64 = sample(gmm, x, sig, "dpmpp_3m_sde", backend=REF, seed=3)
    eager = sample(gmm, x.float(), sig, "dpmpp_3m_sde", backend=REF, seed=3)
    got = sample(gmm, x.float(), sig, "dpmpp_3m_sde", backend=cpu_backend, seed=3)
    assert_matches_reference(got, ref64, eager, f"dpmpp_3m_sde [{cpu_backend}] float32")
    assert_matches_reference(sample(gmm, x, sig, "dpmpp_3m_sde", backend=cpu_backend, seed=3), ref64, ref64,
                             f"dpmpp_3m_sde [{cpu_backend}] float64")


def test_plan_rows_and_orders():
    """One row per step with history depth 2: the first step first order (c = c2 = 0), the second second order
    (c2 = 0), then third order; the jump to 0 is x' = D; every row writes D to the history."""
    plan = coef_tables_3m.dpmpp_3m_sde(schedules.karras(6, 0.1, 10.0).tolist(), eta=0.0)
    t = plan.table
    assert plan.history == 2 and t.shape == (6, coefs.NCOEF) and not any(plan.corrector) and not any(plan.churn)
    assert (t[:, coefs.F] == 1).all() and (t[:, coefs.E] == 0).all() and (t[:, coefs.S] == 0).all()
    assert t[0, coefs.C] == 0 and t[0, coefs.C2] == 0 and t[1, coefs.C] != 0 and t[1, coefs.C2] == 0
    assert (t[2:5, coefs.C] != 0).all() and (t[2:5, coefs.C2] != 0).all()
    assert t[5].tolist() == coefs.row(a=0.0, b=1.0, f=1.0)
    # each row reproduces a constant D exactly: sum of x, D, H, H2 weights = 1 on a constant trajectory
    weights = t[:, coefs.A] + t[:, coefs.B] + t[:, coefs.C] + t[:, coefs.C2]
    torch.testing.assert_close(weights, torch.ones(6, dtype=F64), rtol=0, atol=1e-15)


def test_bracket_is_exact_for_linear_D_and_halves_the_quadratic_term():
    """k-diffusion's bracket phi_2 d1 - phi_3 d2 (DPM-Solver's and diffusers' multistep third-order update too)
    integrates a D linear in t = -ln(sigma) exactly, but weights the second difference by half of what a third-order
    Taylor match needs (d2 estimates h^2 D''/2, -phi_3 multiplies h^2 D''): for D = t^2/2 its bracket is half the
    exact integral. So the method is second order in h, with a smaller constant than 2M (next test)."""
    h, h_1, h_2 = 0.3, 0.25, 0.4
    _, phi_2, phi_3 = coef_tables_3m.phis(h)
    w = coef_tables_3m._multistep(h, h_1, h_2, phi_2, phi_3)
    cases = ((lambda t: t, h - (1 - math.exp(-h)), 1.0),  # int_0^h e^(u-h) u du
             (lambda t: t * t / 2, h * h / 2 - h + 1 - math.exp(-h), 0.5))  # int_0^h e^(u-h) u^2/2 du
    for g, exact, share in cases:  # D(t) = g(t - t_i): D = g(0), H = g(-h_1), H2 = g(-h_1 - h_2)
        bracket = w["b"] * g(0.0) + w["c"] * g(-h_1) + w["c2"] * g(-h_1 - h_2)
        assert bracket == pytest.approx(share * exact, rel=1e-12)


def test_convergence_on_an_analytic_mixture():
    """eta = 0 (deterministic DPM-Solver++(3M)) against a fine run: the error falls at order about 2 or more
    (second order in h, see above) and stays well below DPM-Solver++(2M)'s at equal steps."""
    gmm = analytic.GaussianMixture([1.0, 2.0, 1.5], [[-1.0, 0.5], [1.0, 1.0], [0.3, -1.2]], [0.3, 0.5, 0.4])
    x = torch.randn(16, 2, dtype=F64, generator=torch.Generator().manual_seed(3)) * 20.0

    def run(method, n, **kw):
        return sample(gmm, x, schedules.loglinear(n + 1, 0.1, 20.0)[:-1], method, backend=REF, **kw)

    fine = run("dpmpp_3m_sde", 512, eta=0.0)
    err3 = [float((run("dpmpp_3m_sde", n, eta=0.0) - fine).abs().max()) for n in (16, 32, 64)]
    err2 = [float((run("dpmpp_2m", n) - fine).abs().max()) for n in (32, 64)]
    orders = [math.log2(a / b) for a, b in zip(err3, err3[1:])]
    assert min(orders) > 1.8, (err3, orders)
    assert err3[1] < err2[0] and err3[2] < err2[1] / 2, (err3, err2)  # measured: 1.9 and 3.0 times lower

#----------------------------------------------------------------------------
# The loop's two history buffers and the graph runner.


def test_loop_rotates_two_buffers_without_copies(monkeypatch):
    """Step i reads H = D_{i-1} and H2 = D_{i-2} and writes D_i over H2: two buffers that swap roles, no copy."""
    calls = []
    real = sampler_loop.sampler_step

    def spy(x, m, table, row, **kw):
        calls.append((kw["history"], kw["history2"], kw["history_out"]))
        assert kw["history3"] is None
        return real(x, m, table, row, **kw)

    monkeypatch.setattr(sampler_loop, "sampler_step", spy)
    sample(gmm2(), torch.randn(3, 2, dtype=F64) * 10, schedules.karras(5, 0.1, 10.0), "dpmpp_3m_sde", backend=REF)
    assert len(calls) == 5 and len({id(t) for c in calls for t in c}) == 2
    for i, (h, h2, out) in enumerate(calls):
        assert out is h2 and h is not h2
        if i:
            assert h is calls[i - 1][2], "H of step i is what step i-1 wrote"
        if i > 1:
            assert h2 is calls[i - 2][2], "H2 of step i is what step i-2 wrote"


def test_graph_runner_equals_eager(fake):  # noqa: F811
    gmm, sig = gmm2(), schedules.karras(6, 0.05, 10.0)
    for i, seed in enumerate((1, 2)):  # the first call captures, the second replays with a new x and seed
        x = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(i)) * 10.0
        y, traj = sample(gmm, x, sig, "dpmpp_3m_sde", backend=REF, seed=seed, record=True, graph=True, eta=0.8)
        y_eager, traj_eager = sample(gmm, x, sig, "dpmpp_3m_sde", backend=REF, seed=seed, record=True, eta=0.8)
        assert torch.equal(y, y_eager) and all(torch.equal(traj[k], traj_eager[k]) for k in traj)
    assert graphs.info()["captures"] == 1 and graphs.info()["replays"] == 2
    assert graphs.plan_structure(coef_tables_3m.dpmpp_3m_sde(sig.tolist()))[-1] == 2  # the depth is in the key
