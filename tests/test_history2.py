"""DPM-Solver++(3M) SDE, the first sampler on the fused step's second history input (the op's history2 and history3
are tested in test_history3.py).

Sampler level: float64 equality with k-diffusion's ``sample_dpmpp_3m_sde`` loop written below as published
(noise: diffkern's Philox draw of each step, as test_sampler_parity.py feeds the 2M SDE); the loop's two
history buffers; convergence on an analytic mixture; the graph runner on its CPU stand-in (test_graphs.py).
"""
from __future__ import annotations

import math

import pytest
import torch

from diffkern import analytic, coef_tables_3m, graphs, sampler_loop, schedules
from diffkern.ops import coefs
from diffkern.sampling import sample
from diffkern.testing import assert_matches_reference
from test_graphs import fake, fresh_cache  # noqa: F401  (fixtures: the CPU stand-in of a CUDA graph)
from test_sampler_parity import SEED, STEPS, assert_parity, noises

REF = "reference"
F32, F64 = torch.float32, torch.float64

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
    real = sampler_loop.LoopStep.step  # the fused op as the loop binds it

    def spy(self, x, m, row, **kw):
        calls.append((kw["history"], kw["history2"], kw["history_out"]))
        assert kw["history3"] is None
        return real(self, x, m, row, **kw)

    monkeypatch.setattr(sampler_loop.LoopStep, "step", spy)
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
