"""DEIS (Zhang & Chen 2023): the ``deis`` sampler (:mod:`diffkern.coef_tables_deis`, one fused op per model call) and
``diffkern.diffusers.DEISMultistepScheduler`` (Level 1) / ``accelerate`` (Level 2) against diffusers' own
``DEISMultistepScheduler``.

Oracles and tolerances. Level 1 float32: diffusers run in float64 is the truth and the project's rule applies (at most
twice diffusers' own float32 error, + the float32 floor; ``test_diffusers_schedulers``). The truth gets its sigmas
upcast after ``set_timesteps`` (diffusers makes them float32 even in a float64 module, and its coefficients subtract
two antiderivative values: left in float32 the truth would carry diffusers32's own cancellation). Float64: ours on
diffusers' very sigmas against diffusers in float64: only rounding separates them, the float64 floor applies.
The coefficient weights against diffusers' closed form evaluated in 50-digit arithmetic (mpmath). The sampler:
diffusers' loop in float64 driven by an exact analytic denoiser on the sampler's own VE schedule; every CPU backend
against the float64 reference run; its empirical convergence order.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern import coef_tables_deis, schedules  # noqa: E402
from diffkern.diffusers.loop_spec import loop_spec, tail_spec  # noqa: E402
from diffkern.sampling import sample  # noqa: E402
from diffkern.testing import assert_matches_reference, make_tensor  # noqa: E402
from dropin_conformance import (UniPCPipeline, check_add_noise_and_scale_model_input, check_pipeline,  # noqa: E402
                                check_sampler_every_backend, check_sampler_knob_errors, check_saved_pipeline,
                                check_saved_scheduler, diffusers_vp_loop, float64_parity, float64_schedulers, gmm3,
                                step_parity, three_schedulers)
from test_diffusers_pipelines import text2image, tiny_sd, tiny_unet, unconditional  # noqa: E402, F401
from test_diffusers_schedulers import SHAPE  # noqa: E402

NAME = "DEISMultistepScheduler"
MODULE = importlib.import_module("diffusers.schedulers.scheduling_deis_multistep")
REF = "reference"
F64 = torch.float64
O3 = {"solver_order": 3}
FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}


def _ve_sigmas(sched) -> list:
    """diffusers' ``sigmas`` as VE sigmas (flow sigmas t: t/(1 - t))."""
    s = sched.sigmas.double()
    return (s / (1 - s) if sched.config.use_flow_sigmas else s).tolist()

#----------------------------------------------------------------------------
# Level 1: step by step against diffusers.


def check_steps(config, steps, begin=0, shape=SHAPE, backend=None):
    """diffusers float64 (truth), diffusers float32 and ours on the same inputs at every step (the truth's state,
    fresh model outputs); the project rule on prev_sample. The schedule: timesteps by the rule (diffusers truncates
    fractional exponential/beta timesteps from its float32 table: one off at times), sigmas to float32 rounding of
    the truth's; then the truth steps on our float64 sigmas (diffusers rounds its own to float32, which flow sigmas
    near t = 1 amplify ~1/(1 - t)-fold in sigma_t/alpha_t: its rounding, not the step's)."""
    truth, eager, ours = three_schedulers(NAME, MODULE, config, {"num_inference_steps": steps})
    ours.backend = backend
    if begin:
        for sched in (truth, eager, ours):
            sched.set_begin_index(begin)
    step_parity(truth, eager, ours, MODULE, f"{config} [{backend}]", begin=begin, shape=shape)


CASES = [  # (config, steps)
    ({}, 1), ({}, 2), ({}, 7), ({}, 16), (O3, 1), (O3, 2), (O3, 3), (O3, 8), (O3, 15), (O3, 20),
    ({"solver_order": 1}, 5), (dict(O3, lower_order_final=False), 6),
    (dict(O3, prediction_type="v_prediction", timestep_spacing="trailing"), 10),
    (dict(O3, prediction_type="sample", timestep_spacing="leading", steps_offset=1), 8),
    (dict(O3, use_karras_sigmas=True, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), 10),
    (dict(O3, use_karras_sigmas=True, lower_order_final=False), 9), ({"use_exponential_sigmas": True}, 8),
    (dict(O3, use_beta_sigmas=True, beta_schedule="scaled_linear"), 7),
    ({"algorithm_type": "dpmsolver++", "solver_type": "midpoint", "timestep_spacing": "trailing"}, 13),
    (dict(O3, **FLOW, flow_shift=3.0), 10), (dict(FLOW, prediction_type="epsilon"), 6),
]


@pytest.mark.parametrize("config, steps", CASES, ids=[str(i) for i in range(len(CASES))])
def test_steps_match_diffusers(config, steps):
    check_steps(config, steps)


@pytest.mark.parametrize("config, begin", [(O3, 3), ({}, 1), (dict(O3, use_karras_sigmas=True), 5)])
def test_set_begin_index(config, begin):
    check_steps(config, 8, begin=begin)


def test_awkward_shapes_every_backend(cpu_backend):
    check_steps(dict(O3, prediction_type="v_prediction"), 5, shape=(3, 1, 7, 5), backend=cpu_backend)
    check_steps(O3, 4, shape=(1, 13), backend=cpu_backend)


FLOAT64_CASES = [({}, 16), (O3, 20), ({"solver_order": 1, "prediction_type": "sample"}, 6),
                 (dict(O3, prediction_type="v_prediction", lower_order_final=False), 12),
                 (dict(O3, prediction_type="sample", use_karras_sigmas=True), 16),
                 (dict(O3, use_exponential_sigmas=True), 10), (dict(O3, **FLOW), 9),
                 (dict(FLOW, prediction_type="v_prediction"), 6),
                 (dict(FLOW, solver_order=3, prediction_type="sample"), 16)]


@pytest.mark.parametrize("config, steps", FLOAT64_CASES, ids=[str(i) for i in range(len(FLOAT64_CASES))])
def test_float64_steps_match_diffusers(config, steps):
    """Ours in float64 on diffusers' sigmas (its float32-rounded schedule) is diffusers in float64 to rounding: the
    float64 floor (1e-12 relative) at every step, on diffusers' state and fresh model outputs."""
    truth, ours = float64_schedulers(NAME, MODULE, config, steps)
    ours.sigmas_host = _ve_sigmas(truth)  # the same sigmas: no table is built before the first step
    float64_parity(truth, ours, MODULE, f"{config}")


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8, 14, 15, 16])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_orders_are_diffusers(order, steps):
    """The order diffusers' step picks (recorded from its update methods), for a loop from 0 and from a begin index."""
    sched = diffusers.DEISMultistepScheduler(solver_order=order)
    names = {"deis_first_order_update": 1, "multistep_deis_second_order_update": 2,
             "multistep_deis_third_order_update": 3}
    seen = []
    for name, k in names.items():
        update = getattr(sched, name)
        setattr(sched, name, lambda *a, _u=update, _k=k, **kw: (seen.append(_k), _u(*a, **kw))[1])
    for begin in sorted({0, steps // 2}):
        for low in (True, False):
            sched.register_to_config(lower_order_final=low)
            sched.set_timesteps(steps)
            sched.set_begin_index(begin)
            seen.clear()
            x = torch.zeros(1, 2)
            for t in sched.timesteps[begin:]:
                x = sched.step(torch.ones(1, 2), t, x).prev_sample
            assert seen == coef_tables_deis.deis_orders(steps, order=order, lower_order_final=low,
                                                        begin=begin)[begin:], (begin, low)


def _ind(t, nodes):
    """diffusers' ``ind_fn`` (second and third order) at rho = t for the basis of ``nodes[0]``, in mpmath."""
    mp = pytest.importorskip("mpmath")
    L = mp.log
    if len(nodes) == 2:
        b, c = nodes
        return t * (-L(c) + L(t) - 1) / (L(b) - L(c))
    b, c, d = nodes
    num = t * (L(c) * (L(d) - L(t) + 1) - L(d) * L(t) + L(d) + L(t) ** 2 - 2 * L(t) + 2)
    return num / ((L(b) - L(c)) * (L(b) - L(d)))


@pytest.mark.parametrize("sigmas", [[14.6, 5.0, 2.0, 0.7], [80.0, 40.0, 1.0, 0.9], [1.03, 1.02, 1.01, 1.009],
                                    [2e-3, 1.9e-3, 1.5e-3, 1e-4], [1.0, 0.5, 0.25, 0.2499]])
def test_weights_are_diffusers_closed_form(sigmas):
    """w_j against diffusers' coef_j = ind_fn(rho_t) - ind_fn(rho_s0) in 50-digit arithmetic: 1e-13 relative, also
    where a short step makes diffusers' own float64 evaluation of that difference lose digits."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 50
    s2, s1, s0, t = (mp.mpf(v) for v in sigmas)
    for order, nodes in ((2, [s0, s1]), (3, [s0, s1, s2])):
        exact = [_ind(t, nodes[j:] + nodes[:j]) - _ind(s0, nodes[j:] + nodes[:j]) for j in range(order)]
        delta, earlier = coef_tables_deis.weights(sigmas, 2, order)
        w0 = float(s0) * (math.expm1(math.log(sigmas[3] / sigmas[2])) + delta)
        for got, want in zip([w0] + earlier, exact):
            assert abs(got - float(want)) <= 1e-13 * abs(float(want)), (order, got, float(want))


@pytest.mark.parametrize("y", [-1e-9, -0.3, -0.999, -1.0, -1.7, -25.0, 0.0, 0.6, 2.5])
def test_moments_are_exact(y):
    """I_d(y) = int_0^y u^d e^u du against 40-digit quadrature, on both sides of the series/recursion switch."""
    mp = pytest.importorskip("mpmath")
    with mp.workdps(40):
        exact = [float(mp.quad(lambda u, d=d: u ** d * mp.e ** u, [0, y])) for d in range(3)]
    for got, want in zip(coef_tables_deis.moments(y), exact):
        assert abs(got - want) <= 1e-15 * abs(want), (y, got, want)


def test_first_rows_read_no_history():
    for begin in range(4):
        sched = dd.DEISMultistepScheduler(solver_order=3)
        sched.set_timesteps(10)
        table = sched._plan(("deis", begin))[0]
        assert table[begin, 3] == 0 and table[begin, 11] == 0 and table[begin + 1, 11] == 0  # c, c2

#----------------------------------------------------------------------------
# The sampler.


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("low", [True, False])
def test_sampler_is_diffusers_loop_in_float64(order, low):
    gmm, x = gmm3(), make_tensor((6, 2), F64, seed=2) * 10.0
    sig = schedules.karras(8, 0.1, 10.0)[:-1].tolist()
    want = diffusers_vp_loop(NAME, MODULE, gmm, x, sig, {"solver_order": order, "lower_order_final": low})
    got = sample(gmm, x, sig, "deis", backend=REF, order=order, lower_order_final=low)
    assert_matches_reference(got, want, want, f"order {order} lower_order_final {low}")


def test_step_to_zero_is_the_jump():
    """Ending at 0: the last step returns the denoised estimate whatever its order (17 steps: third order there)."""
    gmm, x = gmm3(), make_tensor((5, 2), F64, seed=3) * 10.0
    sig = schedules.karras(17, 0.1, 10.0)
    plan = coef_tables_deis.plan(sig.tolist(), order=3)
    assert plan.table[-1, 0] == 0 and plan.table[-1, 1] == 1 and plan.table[-1, 3] == plan.table[-1, 11] == 0
    seen = []
    got = sample(gmm, x, sig, "deis", backend=REF, callback=lambda d: seen.append((d["x"].clone(), d["sigma"])))
    torch.testing.assert_close(got, gmm.denoise(*seen[-1]), rtol=0, atol=1e-13)


def test_convergence_order():
    """Against a 2048-step run, lower_order_final off: DEIS-q converges at order q. Measured slopes (32 -> 64 -> 128
    steps): 1.01/1.01, 1.93/1.97, 2.74/2.93."""
    gmm = gmm3()
    x = torch.randn(16, 2, dtype=F64, generator=torch.Generator().manual_seed(3)) * 20.0

    def run(n, order):
        return sample(gmm, x, schedules.loglinear(n + 1, 0.1, 20.0)[:-1], "deis", backend=REF, order=order,
                      lower_order_final=False)

    fine = run(2048, 3)
    for order in (1, 2, 3):
        errs = [float((run(n, order) - fine).abs().max()) for n in (32, 64, 128)]
        slopes = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
        assert all(order - 0.3 < s < order + 0.3 for s in slopes), (order, errs, slopes)


def test_every_backend_matches_reference(cpu_backend):
    check_sampler_every_backend("deis", ({}, {"order": 2, "lower_order_final": False}, {"order": 1}), cpu_backend)


def test_sampler_knobs_are_checked():
    check_sampler_knob_errors("deis", (({"order": 4}, ValueError, "order: expected 1, 2 or 3"),
                                       ({"order": True}, ValueError, "order"), ({"order": 2.5}, ValueError, "order"),
                                       ({"lower_order_final": 1}, TypeError, "lower_order_final"),
                                       ({"solver_type": "logrho"}, TypeError, "solver_type")))
    with pytest.raises(ValueError, match="sigmas"):
        coef_tables_deis.deis([2.0, 1.0, 1.0, 0.5], [1, 2, 2])

#----------------------------------------------------------------------------
# Pipelines (Level 1 and 2), persistence, refusals.

PIPELINE_CASES = [({}, 1), ({}, 2), (O3, 1), (O3, 2),
                  (dict(O3, prediction_type="v_prediction", use_karras_sigmas=True, lower_order_final=False), 1),
                  (dict(O3, prediction_type="v_prediction", use_karras_sigmas=True, lower_order_final=False), 2),
                  ({"solver_order": 1, "timestep_spacing": "trailing"}, 2)]


@pytest.mark.parametrize("config, level", PIPELINE_CASES, ids=[str(i) for i in range(len(PIPELINE_CASES))])
def test_ddpm_pipeline(config, level):
    check_pipeline(lambda s: UniPCPipeline(unet=tiny_unet(), scheduler=s), NAME, config, unconditional, level,
                   f"{config} level {level}")


@pytest.mark.parametrize("config, level", [(O3, 1), (O3, 2), ({"prediction_type": "v_prediction"}, 2)])
def test_text2image_pipeline_with_cfg(tiny_sd, config, level):
    config = dict(config, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    check_pipeline(tiny_sd, NAME, config, text2image, level, f"text2image {config} level {level}")


@pytest.mark.parametrize("config, kw", [(O3, {"strength": 0.7, "steps": 7}), ({}, {"strength": 0.6}),
                                        (O3, {"strength": 0.5, "steps": 16, "w": 1.0})])
def test_img2img_level2_matches_stock_pipeline(tiny_sd, monkeypatch, config, kw):
    """The tail of the schedule restarts first order, with diffusers' final orders of the whole schedule (16 steps:
    no lowering, which the 8-step tail must not get either)."""
    from test_diffusers_img2img_level2 import _three_runs

    ours, truth, eager = _three_runs(tiny_sd, monkeypatch, NAME, config, **kw)
    assert_matches_reference(ours, truth, eager, f"img2img {config} {kw}")


def test_level2_spec():
    sched = dd.DEISMultistepScheduler(solver_order=3, lower_order_final=False)
    sched.set_timesteps(8)
    spec = loop_spec(sched)
    assert spec.method == "deis" and spec.vp and spec.sigmas == sched.sigmas_host and spec.timesteps == \
        sched.timesteps.tolist() and spec.knobs == {"order": 3, "lower_order_final": False}
    karras = dd.DEISMultistepScheduler(solver_order=2, use_karras_sigmas=True)
    karras.set_timesteps(8)  # the identity last step is dropped; the kept 7 keep diffusers' orders [1, 2, ..., 2]
    spec = loop_spec(karras)
    assert spec.sigmas == karras.sigmas_host[:-1] and spec.knobs == {"order": 2, "lower_order_final": False}
    tail = tail_spec(sched, loop_spec(sched), 3)
    assert tail.sigmas == sched.sigmas_host[3:] and tail.knobs["lower_order_final"] is False
    for config, steps, key in ((dict(O3, use_karras_sigmas=True), 8, "use_karras_sigmas=True"),
                               (FLOW, 8, "use_flow_sigmas=True"), ({"use_exponential_sigmas": True}, 1,
                                                                  "use_exponential_sigmas=True")):
        sched = dd.DEISMultistepScheduler(**config)
        sched.set_timesteps(steps)
        with pytest.raises(ValueError, match=key):
            loop_spec(sched)


def test_save_load_and_foreign_configs(tmp_path):
    config = dict(O3, use_karras_sigmas=True, prediction_type="v_prediction", lower_order_final=False)
    sched = dd.DEISMultistepScheduler(**config)
    check_saved_scheduler(sched, tmp_path / "s", config)
    for cls in (diffusers.DPMSolverMultistepScheduler, diffusers.UniPCMultistepScheduler,
                diffusers.EulerDiscreteScheduler):  # DPM-Solver/UniPC types load as deis/logrho, as diffusers
        foreign = cls(solver_order=3) if cls is not diffusers.EulerDiscreteScheduler else cls(use_karras_sigmas=True)
        ours, want = (c.from_config(foreign.config)
                      for c in (dd.DEISMultistepScheduler, diffusers.DEISMultistepScheduler))
        assert (ours.config.algorithm_type, ours.config.solver_type) == ("deis", "logrho")
        for s in (ours, want):
            s.set_timesteps(6)
        assert ours.timesteps.tolist() == want.timesteps.tolist()
    check_saved_pipeline(UniPCPipeline, sched, tmp_path / "p")


@pytest.mark.parametrize("config", [{}, FLOW])
def test_add_noise_and_scale_model_input_match_diffusers(config):
    check_add_noise_and_scale_model_input(diffusers.DEISMultistepScheduler(**config),
                                          dd.DEISMultistepScheduler(**config), begin_index=True)


def test_dynamic_shift_mu_matches_diffusers():
    config = dict(FLOW, use_dynamic_shifting=True)
    theirs, ours = diffusers.DEISMultistepScheduler(**config), dd.DEISMultistepScheduler(**config)
    for s in (theirs, ours):
        s.set_timesteps(7, mu=0.8)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    torch.testing.assert_close(ours.sigmas, theirs.sigmas, rtol=2e-6, atol=0)
    for s in (theirs, ours):
        s.set_timesteps(7)  # as diffusers, the shift of the last mu stays
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    with pytest.raises(ValueError, match="mu"):
        dd.DEISMultistepScheduler().set_timesteps(4, mu=0.5)


@pytest.mark.parametrize("config, key", [
    ({"thresholding": True}, "thresholding=True"), ({"solver_order": 4}, "solver_order=4"),
    ({"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"), ({"solver_type": "bh3"}, "solver_type='bh3'"),
    ({"prediction_type": "flow_prediction"}, "prediction_type='flow_prediction'"),
    ({"prediction_type": "x0"}, "prediction_type"), ({"timestep_spacing": "uniform"}, "timestep_spacing"),
    ({"use_flow_sigmas": True, "use_karras_sigmas": True}, "use_flow_sigmas=True"),
    ({"use_karras_sigmas": True, "use_beta_sigmas": True}, "only one of"),
    ({"beta_schedule": "sigmoid"}, "beta_schedule")])
def test_refused_options_name_the_key(config, key):
    with pytest.raises(ValueError, match=key):
        dd.DEISMultistepScheduler(**config)


def test_refused_at_set_timesteps():
    dd.DEISMultistepScheduler(solver_order=1).set_timesteps(1200)  # repeated sigmas: first order, finite
    for config, steps, key in (({}, 1200, "timestep_spacing"),
                               ({"timestep_spacing": "leading", "steps_offset": 600}, 4, "steps_offset"),
                               ({}, 0, "num_inference_steps"), ({}, 2.0, "num_inference_steps")):
        with pytest.raises(ValueError, match=key):
            dd.DEISMultistepScheduler(**config).set_timesteps(steps)
