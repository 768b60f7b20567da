"""Review of the two-history machinery: the plan's history depth against its table, the diffusers order-3
scheduler across loops (abandoned loops, another batch, N or dtype, an odd begin index), the graph runner with
depth-2 plans and per-sample seeds, and dpmpp_sde's corner cases (callback, record, s_noise = 0, r = 1, a repeated
sigma, 16-bit)."""
from __future__ import annotations

import math

import pytest
import torch

from diffkern import coef_tables, coef_tables_3m, coef_tables_dpmpp_sde, graphs, schedules
from diffkern.ops import coefs
from diffkern.sampling import sample
from test_graphs import fake, fresh_cache  # noqa: F401  (fixtures: the CPU stand-in of a CUDA graph)
from test_two_eval_samplers import gmm2, start

REF = "reference"
F64 = torch.float64

#----------------------------------------------------------------------------
# Plan: the depth must cover the table, and the first step reads no history.


def _plan(rows, history):
    n = len(rows)
    return coef_tables.Plan(coefs.table(rows), [1.0] * n, [1.0] * n, [False] * n, [False] * n, history=history)


def test_plan_depth_must_cover_the_table():
    ok = [coefs.row(a=1.0, f=1.0), coefs.row(a=1.0, c=0.5, f=1.0), coefs.row(a=1.0, c=0.5, c2=0.1, f=1.0)]
    assert _plan(ok, 2).history == 2
    with pytest.raises(ValueError, match="history: depth 1 is too small"):
        _plan(ok, 1)  # a CUDA loop would give no history2 and its kernel would drop the c2 term silently
    with pytest.raises(ValueError, match="history: depth 0 is too small"):
        _plan(ok[:2], 0)


@pytest.mark.parametrize("rows, depth", [([coefs.row(a=1.0, c=0.5, f=1.0)], 1),
                                         ([coefs.row(a=1.0, f=1.0), coefs.row(a=1.0, c=0.2, c2=0.1, f=1.0)], 2)])
def test_plan_first_step_reads_no_history(rows, depth):
    """Eagerly the buffers start at zero, but a graph replay keeps the previous run's values in them."""
    with pytest.raises(ValueError, match=r"table: step \d reads history \d \(c2? != 0 on its row\), which no earlier"):
        _plan(rows, depth)


def test_every_builtin_plan_passes_the_depth_checks():
    from diffkern import sampler_plans, samplers
    import inspect
    sig = [10.0, 5.0, 2.0, 1.0, 0.5, 0.1, 0.0]
    for name, build in sampler_plans.PLANS.items():
        params = inspect.signature(samplers.SAMPLERS[name]).parameters
        knobs = {k: p.default for k, p in list(params.items())[6:]  # k-diffusion's knobs follow its six arguments
                 if k not in ("seed", "backend", "trajectory", "window", "noise_sampler")}
        assert build(sig, coef_tables._identity, **knobs).history in (0, 1, 2, 3), name


def test_depth2_corrector_reading_unwritten_history_is_refused():
    rows = [coefs.row(a=1.0, f=1.0), coefs.row(a=1.0, c2=0.5)]
    with pytest.raises(ValueError, match=r"step 0 reads history 2 \(c2 != 0 on its corrector row\)"):
        coef_tables.Plan(coefs.table(rows), [1.0] * 2, [1.0], [False], [True], corrector_row=1, history=2)

#----------------------------------------------------------------------------
# diffusers' DPMSolverMultistepScheduler(solver_order=3) across loops.


def _loop(s, x, n, begin=None, stop=None, model_dtype=None):
    s.set_timesteps(n)
    if begin:
        s.set_begin_index(begin)
    for k, t in enumerate(s.timesteps[begin or 0:]):
        if stop is not None and k == stop:
            break
        m = torch.sin(1.3 * x + float(t) / 100.0)
        x = s.step(m if model_dtype is None else m.to(model_dtype), t, x).prev_sample
    return x


@pytest.mark.parametrize("config", [{}, {"algorithm_type": "sde-dpmsolver++"}], ids=["ode", "sde"])
@pytest.mark.parametrize("begin", [0, 3, 4])
def test_order3_loops_do_not_see_earlier_loops(config, begin):
    """An abandoned loop (other batch size and N), then one in float64, leave no state: the next loop (odd or
    even begin index) equals a fresh scheduler's, bitwise."""
    dd = pytest.importorskip("diffkern.diffusers")
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))

    def fresh():
        s = dd.DPMSolverMultistepScheduler(solver_order=3, **config)
        s.set_seed(5)
        return s

    want = _loop(fresh(), x, 9, begin=begin)
    s = fresh()
    _loop(s, torch.randn(5, 3, 4, 4), 12, stop=5)
    _loop(s, x.double(), 9, begin=1)
    got = _loop(s, x, 9, begin=begin)
    assert torch.equal(got, want)
    assert torch.isfinite(got).all()


def test_order3_rejects_a_batch_change_mid_loop():
    dd = pytest.importorskip("diffkern.diffusers")
    s = dd.DPMSolverMultistepScheduler(solver_order=3)
    s.set_timesteps(6)
    x = torch.randn(2, 4)
    for t in s.timesteps[:3]:
        x = s.step(torch.tanh(x), t, x).prev_sample
    with pytest.raises(ValueError, match="sample: shape/dtype/device changed during the loop"):
        s.step(torch.zeros(3, 4), s.timesteps[3], torch.zeros(3, 4))


def test_order3_half_model_output_on_a_float32_sample():
    """The state is promoted (float32), as diffusers' for epsilon prediction; the float16 model output is read
    as it is: equal to the loop fed the same output cast to float32."""
    dd = pytest.importorskip("diffkern.diffusers")
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))

    def run(model_dtype):
        s = dd.DPMSolverMultistepScheduler(solver_order=3)
        s.set_timesteps(7)
        y = x
        for t in s.timesteps:
            m = torch.sin(1.3 * y + float(t) / 100.0).half()
            y = s.step(m if model_dtype is torch.float16 else m.float(), t, y).prev_sample
        return y

    got = run(torch.float16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, run(torch.float32), rtol=0, atol=0)

#----------------------------------------------------------------------------
# The graph runner with depth-2 plans.


@pytest.mark.parametrize("method, knobs", [("dpmsolver_3m", {"eta": 1.0}), ("dpmpp_3m_sde", {"eta": 0.5})])
def test_graph_replays_depth2_with_per_sample_seeds_and_a_new_schedule(fake, method, knobs):  # noqa: F811
    """Replays keep the last run's values in the two history buffers; rows that would read them (step 0, H2 of
    step 1) have zero coefficients, so each replay equals the eager loop, whatever the schedule's values."""
    gmm = gmm2()
    for k, sig in enumerate((schedules.karras(6, 0.05, 10.0), schedules.karras(6, 0.1, 20.0),
                             schedules.karras(6, 0.05, 10.0))):
        x = start(4, seed=k)
        seed = torch.tensor([3, 1, 4, 1 + k], dtype=torch.int64)
        y, traj = sample(gmm, x, sig, method, backend=REF, seed=seed, record=True, graph=True, **knobs)
        y_e, traj_e = sample(gmm, x, sig, method, backend=REF, seed=seed, record=True, **knobs)
        assert torch.equal(y, y_e) and all(torch.equal(traj[n], traj_e[n]) for n in traj)
    assert graphs.info()["captures"] == 1 and graphs.info()["replays"] == 3

#----------------------------------------------------------------------------
# dpmpp_sde corner cases.


def test_dpmpp_sde_callback_sees_x_before_and_first_denoised():
    gmm, x, sig = gmm2(), start(), schedules.karras(5, 0.1, 20.0)
    seen = []
    y_cb = sample(gmm, x, sig, "dpmpp_sde", backend=REF, seed=7, eta=0.9,
                  callback=lambda d: seen.append((d["i"], d["x"].clone(), d["denoised"].clone())))
    y, traj = sample(gmm, x, sig, "dpmpp_sde", backend=REF, seed=7, eta=0.9, record=True)
    assert torch.equal(y_cb, y) and [i for i, _, _ in seen] == list(range(5))
    for i, xi, di in seen:
        assert torch.equal(xi, traj["x"][i])
        assert torch.equal(di, traj["denoised"][i])
        torch.testing.assert_close(di, gmm(xi, torch.full((xi.shape[0],), sig[i].item(), dtype=F64)))


def test_dpmpp_sde_zero_s_noise_is_deterministic():
    gmm, x, sig = gmm2(), start(), schedules.karras(5, 0.1, 20.0)
    a = sample(gmm, x, sig, "dpmpp_sde", backend=REF, seed=1, eta=1.5, s_noise=0.0)
    b = sample(gmm, x, sig, "dpmpp_sde", backend=REF, seed=2, eta=1.5, s_noise=0.0)
    assert torch.equal(a, b) and torch.isfinite(a).all()
    plan = coef_tables_dpmpp_sde.dpmpp_sde(sig.tolist(), eta=1.5, s_noise=0.0)
    assert (plan.table[:, coefs.S] == 0).all()


@pytest.mark.parametrize("eta", [0.7, 50.0])
def test_dpmpp_sde_r_one_and_large_eta_rows(eta):
    """r = 1: sigma_s = sigma_next, the tree's second increment is the first (no fresh noise on the second row);
    large eta: sigma_down = 0 on both calls, x' = (1 - fac) D + fac D2 + noise, no x term at all."""
    sig = [10.0, 3.0, 1.0, 0.2]
    _, second, _ = coef_tables_dpmpp_sde._dpmpp_sde_rows(coef_tables._identity, 3.0, 1.0, eta, 1.0, 1.0)
    assert second[coefs.S] == 0.0
    plan = coef_tables_dpmpp_sde.dpmpp_sde(sig, eta=50.0, s_noise=1.0, r=0.5)
    n = len(sig) - 1
    for i in range(n):
        f, s = plan.table[i], plan.table[n + i]
        assert f[coefs.A] == 0.0 and f[coefs.E] == 0.0  # sigma_down = 0: x drops out of x2 and of H
        # x' = k x2 + fac D2 + H with x2 = D + su1 xi1: the D weights sum to 1 - fac + fac
        assert math.isclose(s[coefs.A] * f[coefs.B] + f[coefs.F] + s[coefs.B], 1.0, rel_tol=1e-12)


def test_repeated_sigma_is_an_identity_step_for_the_new_samplers():
    """sample() refuses a repeated sigma; the plans themselves make that step the identity (finite rows)."""
    sig = [20.0, 5.0, 5.0, 1.0, 0.3, 0.0]
    with pytest.raises(ValueError, match="sigmas: must be strictly decreasing"):
        sample(gmm2(), start(), torch.tensor(sig, dtype=F64), "dpmpp_3m_sde", backend=REF)
    orders = coef_tables_3m.dpmsolver_orders(len(sig) - 1)
    for plan in (coef_tables_dpmpp_sde.dpmpp_sde(sig), coef_tables_3m.dpmpp_3m_sde(sig),
                 coef_tables_3m.dpmsolver_multistep(sig, orders, sde=True)):
        t = plan.table
        assert torch.isfinite(t[:, [k for k in range(coefs.NCOEF) if k != coefs.CLIP]]).all()
        if plan.history == 2:
            assert t[1, coefs.A] == 1.0 and t[1, coefs.F] == 1.0
            assert (t[1, [coefs.B, coefs.S, coefs.C, coefs.C2]] == 0).all()
        else:  # dpmpp_sde: the first call writes H = x, the second gives x' = H (its x2 and D2 weighted 0)
            n = len(sig) - 1
            assert t[1, coefs.E] == 1.0 and t[1, coefs.F] == 0.0 and t[1, coefs.S] == 0.0
            assert t[n + 1, coefs.C] == 1.0 and (t[n + 1, [coefs.A, coefs.B, coefs.S]] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_dpmpp_sde_16_bit_state_tracks_float64(dtype):
    gmm, x, sig = gmm2(), start(sigma_max=10.0), schedules.karras(8, 0.1, 10.0)
    want = sample(gmm, x, sig, "dpmpp_sde", backend=REF, seed=4, eta=0.0)
    got = sample(gmm, x.to(dtype), sig, "dpmpp_sde", backend="cpp", seed=4, eta=0.0)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=0.05, atol=0.05)


def test_dpmsolver_3m_first_rows_read_no_history_for_any_begin():
    sig = schedules.karras(10, 0.1, 10.0).tolist()
    for begin in range(4):
        orders = coef_tables_3m.dpmsolver_orders(10, begin=begin)
        t = coef_tables_3m.dpmsolver_multistep(sig, orders).table
        assert t[begin, coefs.C] == 0 and t[begin, coefs.C2] == 0 and t[begin + 1, coefs.C2] == 0


def test_heun_second_call_is_folded_for_eps_networks():
    """Heun on 2 Karras steps 80 -> 0.002 (k = (sigma_next - sigma)/(2 sigma_next) = -2e4 on the corrector): with an
    eps network the corrector row computes ``x2 + k sigma eps`` (``coef_tables.fold_second_calls``), so float32
    stays within the project's rule of the textbook loop written on eps (d = eps, no x - D cancellation); the
    unfolded ``(1 + k) x2 - k D2`` was 90 times worse (2.4e-3 against 2.8e-5)."""
    from diffkern import analytic, schedules, wrappers
    from diffkern.sampling import sample
    from diffkern.testing import assert_matches_reference

    gmm = analytic.GaussianMixture([1.0, 2.0], [[-1.0, 0.5], [1.0, 1.0]], [0.3, 0.5])
    eps = lambda x, s: gmm.eps(x.double(), s.double()).to(x.dtype)  # noqa: E731
    sig = schedules.karras(2, 0.002, 80.0).tolist()
    x = torch.randn(4096, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 80

    def textbook(x):
        for s, sn in zip(sig[:-1], sig[1:]):
            d = eps(x, torch.full((x.shape[0],), s, dtype=x.dtype))
            x2 = x + (sn - s) * d
            if sn > 0:
                d = (d + eps(x2, torch.full((x.shape[0],), sn, dtype=x.dtype))) / 2
            x = x + (sn - s) * d
        return x

    model = wrappers.VEDenoiser(eps)
    ref64 = sample(model, x, sig, "heun", backend="reference")
    torch.testing.assert_close(textbook(x), ref64, rtol=1e-12, atol=1e-12)
    for backend in ("reference", "cpp"):
        assert_matches_reference(sample(model, x.float(), sig, "heun", backend=backend), ref64, textbook(x.float()),
                                 f"heun eps 2 steps [{backend}]")
