"""Linear multistep (LMS): the ``lms`` sampler (:mod:`diffkern.coef_tables_lms`, depth-3 slope history at order 4) and
``diffkern.diffusers.LMSDiscreteScheduler`` (Level 1) / ``accelerate`` (Level 2) against k-diffusion's loop and
diffusers' own ``LMSDiscreteScheduler``.

Oracles and tolerances. The sampler: k-diffusion's ``sample_lms`` written out here in float64 (its weights by scipy's
adaptive quadrature of the Lagrange basis, as k-diffusion computes them), against the fused rows both as a pure float64
emulation of the row formula and as the sampler on the reference backend (the float64 floor of ``diffkern.testing``);
every CPU backend in float32 against the float64 reference run (the project rule); the empirical convergence order.
Level 1 float32: diffusers run in float64 is the truth and the project's rule applies
(``test_diffusers_schedulers.check_parity``: at most twice diffusers' own float32 error + the float32 floor). Float64:
ours on diffusers' float32-rounded sigmas against diffusers in float64 on the same inputs (the float64 floor).
Pipelines, Level 2 and persistence: ``test_lms_pipelines.py``.
"""
from __future__ import annotations

import importlib
import math
import random

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
integrate = pytest.importorskip("scipy.integrate")

import diffkern.diffusers as dd  # noqa: E402
from diffkern import analytic, coef_tables_lms, schedules  # noqa: E402
from diffkern.ops import coefs  # noqa: E402
from diffkern.sampling import sample  # noqa: E402
from diffkern.testing import assert_matches_reference, make_tensor  # noqa: E402
from test_diffusers_schedulers import SHAPE, _call, check_parity, diffusers_float64  # noqa: E402
from test_unipc import gmm3  # noqa: E402

NAME = "LMSDiscreteScheduler"
MODULE = importlib.import_module("diffusers.schedulers.scheduling_lms_discrete")
REF = "reference"
F64 = torch.float64
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1}
# diffusers' step warns when its own scale_model_input was not called first (the step-by-step checks skip it)
pytestmark = pytest.mark.filterwarnings("ignore:The `scale_model_input` function should be called")

#----------------------------------------------------------------------------
# The weights and rows against k-diffusion's loop.


def kdiffusion_coeff(order, t, i, j):
    """k-diffusion's ``linear_multistep_coeff``: scipy's quadrature of the Lagrange basis polynomial (tighter
    tolerance)."""
    def fn(tau):
        prod = 1.0
        for k in range(order):
            if k != j:
                prod *= (tau - t[i - k]) / (t[i - j] - t[i - k])
        return prod
    return integrate.quad(fn, t[i], t[i + 1], epsrel=1e-13, epsabs=0.0)[0]


def kdiffusion_lms(model, x, sigmas, order):
    """k-diffusion's ``sample_lms`` in float64 (``model(x, sigma) -> D``)."""
    ds = []
    for i in range(len(sigmas) - 1):
        ds.append((x - model(x, sigmas[i])) / sigmas[i])
        if len(ds) > order:
            ds.pop(0)
        cur = min(i + 1, order)
        x = x + sum(kdiffusion_coeff(cur, sigmas, i, j) * d for j, d in zip(range(cur), reversed(ds)))
    return x


def emulate(plan, model, x):
    """The fused row formula in float64 PyTorch over a plan's rows, the history rotating as the sampling loop's."""
    buffers = [torch.zeros_like(x) for _ in range(plan.history)]
    for i in range(plan.steps):
        r = plan.table[i].tolist()
        d = model(x, plan.row_sigma[i])
        hs = [buffers[(i - j) % len(buffers)] for j in range(1, len(buffers) + 1)] if buffers else []
        out = r[coefs.A] * x + r[coefs.B] * d
        for slot, h in zip((coefs.C, coefs.C2, coefs.C3), hs):
            out = out + r[slot] * h
        if buffers:
            buffers[i % len(buffers)] = r[coefs.E] * x + r[coefs.F] * d
        x = out
    return x


SCHEDULES = [schedules.karras(9, 0.1, 10.0), schedules.karras(6, 0.05, 5.0)[:-1], schedules.loglinear(3, 0.2, 8.0),
             torch.tensor([4.0, 0.0], dtype=F64), torch.tensor([4.0, 1.0, 0.5], dtype=F64)]


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("sigmas", SCHEDULES, ids=[str(i) for i in range(len(SCHEDULES))])
def test_rows_and_sampler_are_kdiffusion_lms(order, sigmas):
    """The rows (emulated in float64) and the sampler (reference backend) are k-diffusion's loop to the float64 floor;
    ending at 0 or above it, with fewer steps than the order."""
    gmm, x = gmm3(), make_tensor((5, 2), F64, seed=3) * 8.0
    sig = sigmas.tolist()
    want = kdiffusion_lms(gmm.denoise, x, sig, order)
    plan = coef_tables_lms.lms(sig, order=order)
    assert plan.history == min(order, len(sig) - 1) - 1
    assert_matches_reference(emulate(plan, gmm.denoise, x), want, want, f"rows {sig} order {order}")
    assert_matches_reference(sample(gmm, x, sigmas, "lms", order=order, backend=REF), want, want,
                             f"sampler {sig} order {order}")


def test_weights_are_exact_integrals():
    """The closed form against numpy's exact polynomial integration (a power basis in tau, centred for conditioning):
    agree to rounding, and the weights of one step sum to its length (they integrate the constant 1 exactly)."""
    sig = schedules.karras(12, 0.02, 30.0).tolist()
    for i in range(12):
        for q in range(1, min(i + 1, 4) + 1):
            got = coef_tables_lms.weights(sig, i, q)
            nodes = [sig[i - k] for k in range(q)]
            for j in range(q):
                others = [n - sig[i] for k, n in enumerate(nodes) if k != j]
                poly = np.polynomial.Polynomial.fromroots(others) if others else np.polynomial.Polynomial([1.0])
                poly = poly / np.prod([nodes[j] - sig[i] - o for o in others])
                want = poly.integ()(sig[i + 1] - sig[i]) - poly.integ()(0.0)
                assert math.isclose(got[j], want, rel_tol=1e-12, abs_tol=1e-14 * abs(got[0])), (i, q, j, got, want)
            assert math.isclose(math.fsum(got), sig[i + 1] - sig[i], rel_tol=1e-13)
    assert coef_tables_lms.weights([3.0, 2.0, 2.0], 1, 1) == [0.0]  # a step of length 0
    with pytest.raises(ValueError, match="sigmas: a step of order 2 needs distinct sigmas"):
        coef_tables_lms.weights([3.0, 3.0, 1.0], 1, 2)


def test_plan_structure():
    plan = coef_tables_lms.lms(schedules.karras(6, 0.1, 10.0).tolist())
    assert plan.history == 3 and plan.corrector == [False] * 6 and plan.steps == 6
    depth = [(plan.table[:, k] != 0).tolist() for k in (coefs.C, coefs.C2, coefs.C3)]
    assert depth == [[False] + [True] * 5, [False] * 2 + [True] * 4, [False] * 3 + [True] * 3]
    assert coef_tables_lms.lms([5.0, 0.0]).history == 0  # one step: Euler to 0, the jump to D, no history
    single = coef_tables_lms.lms([5.0, 0.0]).table[0]
    assert single[coefs.A] == 0 and single[coefs.B] == 1


def test_convergence_order():
    """Against a 1024-step order-4 run (every order solves the same ODE): order q converges at about q on log-linear
    sigmas. Measured slopes (32 -> 64 -> 128 steps): 1.06, 1.11; 1.90, 1.96; 2.75, 2.87; 3.57, 3.69."""
    gmm = gmm3()
    x = torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(3)) * 20.0

    def run(n, order):
        return sample(gmm, x, schedules.loglinear(n + 1, 0.1, 20.0)[:-1], "lms", order=order, backend=REF)

    fine = run(1024, 4)
    for order in (1, 2, 3, 4):
        errs = [float((run(n, order) - fine).abs().max()) for n in (32, 64, 128)]
        slopes = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
        assert all(order - 0.5 < s < order + 0.3 for s in slopes), (order, errs, slopes)


def test_every_backend_matches_reference(cpu_backend):
    """float32 on each CPU backend within the project rule of the float64 reference run (order 4 reads history3;
    an odd batch and dimension); float64 at its floor."""
    gen = torch.Generator().manual_seed(4)
    gmm = analytic.GaussianMixture([1.0, 2.0], torch.randn(2, 5, generator=gen, dtype=F64), [0.6, 0.8])
    x = make_tensor((3, 5), F64, seed=7) * 5.0
    sig = schedules.karras(7, 0.05, 5.0)
    for order in (4, 3):
        ref64 = sample(gmm, x, sig, "lms", order=order, backend=REF)
        eager = sample(gmm, x.float(), sig, "lms", order=order, backend=REF)
        got = sample(gmm, x.float(), sig, "lms", order=order, backend=cpu_backend)
        assert_matches_reference(got, ref64, eager, f"order {order} [{cpu_backend}]")
        assert_matches_reference(sample(gmm, x, sig, "lms", order=order, backend=cpu_backend), ref64, ref64,
                                 f"order {order} [{cpu_backend}] float64")


def test_sampler_refuses_bad_knobs():
    gmm, x, sig = gmm3(), torch.randn(2, 2, dtype=F64), schedules.karras(4, 0.1, 10.0)
    for order in (0, 5, 2.0, True, "4"):
        with pytest.raises(ValueError, match="order: expected an int 1, 2, 3 or 4"):
            sample(gmm, x, sig, "lms", order=order)
    with pytest.raises(TypeError, match="lms: unknown knob"):
        sample(gmm, x, sig, "lms", eta=1.0)
    with pytest.raises(ValueError, match="sigmas"):
        sample(gmm, x, [1.0, 2.0, 0.0], "lms")

#----------------------------------------------------------------------------
# Level 1: step by step against diffusers.

CASES = [  # (config, step kwargs (steps, order), begin)
    ({"timestep_spacing": "trailing"}, {"steps": 1}, 0), ({}, {"steps": 2}, 0), ({}, {"steps": 3}, 0),
    ({}, {"steps": 4}, 0), ({}, {"steps": 9}, 0),
    (SD, {"steps": 12}, 0), ({}, {"steps": 7, "order": 2}, 0), ({}, {"steps": 6, "order": 1}, 0),
    ({}, {"steps": 8, "order": 3}, 0),
    ({"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, {"steps": 10}, 0),
    ({"prediction_type": "sample", "beta_schedule": "squaredcos_cap_v2"}, {"steps": 6}, 0),
    ({"use_karras_sigmas": True}, {"steps": 10}, 0),
    ({"use_karras_sigmas": True, "timestep_spacing": "trailing"}, {"steps": 1}, 0),
    (dict(SD, use_exponential_sigmas=True, prediction_type="v_prediction"), {"steps": 8}, 0),
    ({"use_beta_sigmas": True}, {"steps": 7}, 0),
    ({"num_train_timesteps": 999, "trained_betas": torch.linspace(1e-4, 0.03, 999).tolist()}, {"steps": 9}, 0),
    ({"timestep_spacing": "leading", "steps_offset": 250}, {"steps": 10, "order": 1}, 0),  # a repeated sigma
    # set_begin_index: diffusers' derivative list restarts, its weights keep the whole schedule's nodes
    (SD, {"steps": 8}, 1), (SD, {"steps": 8}, 2), ({}, {"steps": 9}, 5), ({"use_karras_sigmas": True}, {"steps": 7}, 3),
    ({}, {"steps": 8, "order": 3}, 4),
]


@pytest.mark.parametrize("config, kw, begin", CASES, ids=[str(i) for i in range(len(CASES))])
def test_steps_match_diffusers(config, kw, begin):
    check_parity(NAME, config, kw, begin=begin)


def test_every_backend(cpu_backend):
    """Each CPU backend: order 4 reads three history buffers and writes over the oldest; a loop from step 3 too."""
    check_parity(NAME, SD, {"steps": 9}, backend=cpu_backend)
    check_parity(NAME, {"prediction_type": "v_prediction"}, {"steps": 7}, backend=cpu_backend, begin=3)


@pytest.mark.parametrize("orders, begin", [([4, 4, 2, 2, 4, 1, 3, 4, 4, 2], 0), ([1, 2, 3, 4, 1, 1, 1, 4, 4, 4], 0),
                                           ([2, 4, 4, 3, 1, 4, 2], 3)])
def test_order_changes_mid_loop_as_diffusers(orders, begin):
    """diffusers' derivative list drops one entry per call at most: after a lower order the next higher-order calls
    weight the derivatives it kept (fewer than their nodes at first). Every call checked by the project rule."""
    steps = len(orders) + begin
    with diffusers_float64(MODULE):
        truth = diffusers.LMSDiscreteScheduler(**SD)
        truth.set_timesteps(steps)
    eager = diffusers.LMSDiscreteScheduler(**SD)
    ours = dd.LMSDiscreteScheduler(**SD)
    for s in (eager, ours):
        s.set_timesteps(steps)
    for s in (truth, eager, ours):
        s.set_begin_index(begin)
    x = make_tensor(SHAPE, F64, seed=11) * float(truth.init_noise_sigma)
    for k, order in zip(range(begin, steps), orders):
        m = make_tensor(SHAPE, F64, seed=100 + k)
        with diffusers_float64(MODULE):
            ref = _call(truth, m, truth.timesteps[k], x, {"order": order}, None)
        out = _call(eager, m.float(), eager.timesteps[k], x.float(), {"order": order}, None)
        got = _call(ours, m.float(), ours.timesteps[k], x.float(), {"order": order}, None)
        for what in ("prev_sample", "pred_original_sample"):
            assert_matches_reference(getattr(got, what), getattr(ref, what), getattr(out, what),
                                     f"call {k} order {order} {what}")
        x = ref.prev_sample


@pytest.mark.parametrize("config, steps, begin", [(SD, 12, 0), ({"prediction_type": "v_prediction"}, 9, 0),
                                                  ({"use_karras_sigmas": True, "prediction_type": "sample"}, 8, 2)])
def test_float64_steps_match_diffusers(config, steps, begin):
    """Ours in float64 on diffusers' sigmas (its float32-rounded schedule) is diffusers in float64 to rounding: the
    float64 floor at every step (its quadrature of a cubic is exact but for rounding)."""
    with diffusers_float64(MODULE):
        truth = diffusers.LMSDiscreteScheduler(**config)
        truth.set_timesteps(steps)
    ours = dd.LMSDiscreteScheduler(**config)
    ours.set_timesteps(steps)
    ours.sigmas_host = truth.sigmas.tolist()  # the same sigmas: no table is built before the first step
    for s in (truth, ours):
        s.set_begin_index(begin)
    x = make_tensor((3, 1, 5), F64, seed=1)
    for k in range(begin, steps):
        m = make_tensor((3, 1, 5), F64, seed=50 + k)
        with diffusers_float64(MODULE):
            ref = truth.step(m, truth.timesteps[k], x)
        got = ours.step(m, ours.timesteps[k], x)
        assert got.prev_sample.dtype == F64
        assert_matches_reference(got.prev_sample, ref.prev_sample, ref.prev_sample, f"{config} step {k}")
        assert_matches_reference(got.pred_original_sample, ref.pred_original_sample, ref.pred_original_sample,
                                 f"{config} step {k} x0")
        x = ref.prev_sample


@pytest.mark.parametrize("state, model", [(torch.float16, torch.float16), (torch.float32, torch.bfloat16)], ids=str)
def test_low_precision_steps(state, model):
    """diffusers computes in the promoted dtype of sample and model output (no float32 upcast) and returns it; ours
    too, within the project rule of that dtype against diffusers in float64."""
    with diffusers_float64(MODULE):
        truth = diffusers.LMSDiscreteScheduler(**SD)
        truth.set_timesteps(6)
    eager, ours = diffusers.LMSDiscreteScheduler(**SD), dd.LMSDiscreteScheduler(**SD)
    for s in (eager, ours):
        s.set_timesteps(6)
    x = make_tensor(SHAPE, F64, seed=11) * float(truth.init_noise_sigma)
    for k in range(6):
        m = make_tensor(SHAPE, F64, seed=100 + k)
        with diffusers_float64(MODULE):
            ref = truth.step(m, truth.timesteps[k], x)
        out = eager.step(m.to(model), eager.timesteps[k], x.to(state))
        got = ours.step(m.to(model), ours.timesteps[k], x.to(state))
        assert got.prev_sample.dtype == out.prev_sample.dtype == torch.promote_types(state, model)
        assert_matches_reference(got.prev_sample, ref.prev_sample, out.prev_sample, f"step {k} {state} {model}")
        x = ref.prev_sample


def _fuzz_case(k):
    """Config, step kwargs and begin index number ``k`` (seeded): every config key of diffusers' class."""
    rng = random.Random(f"lms/{k}")
    T = rng.choice([1000, 1000, 999, 500])
    config = {"num_train_timesteps": T, "prediction_type": rng.choice(["epsilon", "v_prediction", "sample"]),
              "timestep_spacing": rng.choice(["linspace", "leading", "trailing"]),
              "steps_offset": rng.choice([0, 1, 3])}
    betas = rng.choice(["linear", "scaled_linear", "squaredcos_cap_v2", "trained"])
    if betas == "trained":
        config["trained_betas"] = np.linspace(rng.uniform(1e-5, 1e-3), rng.uniform(0.01, 0.03), T).tolist()
    else:
        config.update(beta_schedule=betas, beta_start=rng.uniform(5e-5, 1e-3), beta_end=rng.uniform(0.01, 0.03))
    conversion = rng.choice([None, None, "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"])
    if conversion:
        config[conversion] = True
    steps = rng.choice([1, 2, 3, 4, 5, 8, 13, 21])
    if steps == 1:  # linspace and leading put the single step near t = 0, where diffusers' float32 table is off by
        config["timestep_spacing"] = "trailing"  # ~1e-4 (check_parity's init_noise_sigma check allows 1e-5)
    begin = rng.choice([0, 0, 0, 1, 3]) if steps > 3 else 0
    return config, {"steps": steps, "order": rng.choice([4, 4, 4, 1, 2, 3])}, begin


@pytest.mark.parametrize("k", range(24))
def test_fuzzed_config_matches_diffusers(k):
    config, kw, begin = _fuzz_case(k)
    check_parity(NAME, config, kw, begin=begin)


def test_sigma_bounds_of_a_foreign_config_as_diffusers():
    """A config loaded from Euler's keeps its sigma_min/sigma_max: diffusers' LMS reads them for exponential and beta
    sigmas but not for Karras sigmas (between the schedule's own ends). Tolerance: diffusers' float32 training table is
    off by ~1e-4 relative at t = 0 (Karras' lower end)."""
    euler = diffusers.EulerDiscreteScheduler(sigma_min=0.3, sigma_max=40.0).config
    for conversion in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
        theirs = diffusers.LMSDiscreteScheduler.from_config(euler, **{conversion: True})
        ours = dd.LMSDiscreteScheduler.from_config(euler, **{conversion: True})
        for s in (theirs, ours):
            s.set_timesteps(6)
        torch.testing.assert_close(ours.sigmas, theirs.sigmas, rtol=2e-4, atol=0)
        torch.testing.assert_close(ours.timesteps, theirs.timesteps, rtol=0, atol=1e-2)
        ends = (float(ours.sigmas[0]), float(ours.sigmas[-2]))
        assert (ends == pytest.approx((40.0, 0.3))) == (conversion != "use_karras_sigmas"), (conversion, ends)


def test_coefficients_sigmas_noise_and_scaling_as_diffusers():
    theirs, ours = diffusers.LMSDiscreteScheduler(**SD), dd.LMSDiscreteScheduler(**SD)
    assert math.isclose(float(ours.init_noise_sigma), float(theirs.init_noise_sigma), rel_tol=1e-6)
    for s in (theirs, ours):
        s.set_timesteps(10)
    torch.testing.assert_close(ours.sigmas, theirs.sigmas, rtol=2e-4, atol=0)  # diffusers' float32 table near t = 0
    x0, noise = make_tensor(SHAPE, seed=3), make_tensor(SHAPE, seed=4)
    t = theirs.timesteps[[0, 3]]
    torch.testing.assert_close(ours.add_noise(x0[:2], noise[:2], t), theirs.add_noise(x0[:2], noise[:2], t),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.scale_model_input(x0, t[0]), theirs.scale_model_input(x0, t[0]))
    # the weights on diffusers' own sigmas: its float32 arithmetic is good to ~1e-7 of the step's largest weight
    ours.sigmas_host = theirs.sigmas.tolist()
    for t, q, j in ((0, 1, 0), (3, 4, 0), (3, 4, 3), (9, 4, 1), (6, 2, 1)):
        scale = abs(ours.get_lms_coefficient(q, t, 0))
        assert abs(ours.get_lms_coefficient(q, t, j) - theirs.get_lms_coefficient(q, t, j)) < 1e-6 * scale
    assert ours.order == theirs.order == 1


def test_refusals_name_the_argument():
    with pytest.raises(ValueError, match="prediction_type='original_sample'"):
        dd.LMSDiscreteScheduler(prediction_type="original_sample")  # diffusers raises at step()
    with pytest.raises(ValueError, match="only one of use_karras_sigmas"):
        dd.LMSDiscreteScheduler(use_karras_sigmas=True, use_beta_sigmas=True)
    with pytest.raises(ValueError, match="beta_schedule='sigmoid'"):
        dd.LMSDiscreteScheduler(beta_schedule="sigmoid")
    with pytest.raises(ValueError, match="timestep_spacing='leading'"):
        dd.LMSDiscreteScheduler(timestep_spacing="leading").set_timesteps(1001)
    sched = dd.LMSDiscreteScheduler()
    x = make_tensor(SHAPE)
    sched.set_timesteps(5)
    for order in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match="order: expected an int from 1 to 4"):
            sched.step(x, sched.timesteps[0], x, order=order)
    with pytest.raises(ValueError, match="timestep: expected 999"):
        sched.step(x, 500.0, x)
    sched.step(x, sched.timesteps[0], x)
    with pytest.raises(ValueError, match="sample: shape"):
        sched.step(x[:1], sched.timesteps[1], x[:1])
    clamped = dd.LMSDiscreteScheduler(timestep_spacing="leading", steps_offset=250)  # two timesteps past T - 1
    clamped.set_timesteps(10)
    for t in clamped.timesteps[:1]:
        clamped.step(x, t, x)
    with pytest.raises(ValueError, match="steps_offset=250"):  # order 2 over two equal sigmas: diffusers' 0/0
        clamped.step(x, clamped.timesteps[1], x)
