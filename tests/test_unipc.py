"""UniPC (Zhao et al. 2023): the ``unipc`` sampler (:mod:`diffkern.coef_tables_unipc`, one fused op per model call, the
corrector folded into the next row) and ``diffkern.diffusers.UniPCMultistepScheduler`` (Level 1) / ``accelerate``
(Level 2) against diffusers' own ``UniPCMultistepScheduler``.

Oracles and tolerances. Level 1 float32: diffusers run in float64 is the truth and the project's rule applies (at most
twice diffusers' own float32 error, + the float32 floor; ``test_diffusers_schedulers``). Float64: diffusers in float64
on the very sigmas it uses (its float32-rounded schedule, upcast) against ours in float64 on the same sigmas: the same
mathematics, so only rounding separates them and the float64 floor of ``diffkern.testing`` (1e-12 relative) applies.
The sampler: diffusers' loop in float64 driven by an exact analytic denoiser on the sampler's own VE schedule; every
CPU backend against the float64 reference run (project rule); and its empirical convergence order.
"""
from __future__ import annotations

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern import coef_tables_unipc, schedules  # noqa: E402
from diffkern.diffusers.loop_spec import loop_spec  # noqa: E402
from diffkern.ops import coefs  # noqa: E402
from diffkern.sampling import sample  # noqa: E402
from diffkern.testing import assert_matches_reference, make_tensor  # noqa: E402
from dropin_conformance import (UniPCPipeline, check_add_noise_and_scale_model_input, check_pipeline,  # noqa: E402
                                check_sampler_every_backend, check_sampler_knob_errors, check_saved_pipeline,
                                check_saved_scheduler, diffusers_vp_loop, float64_parity, float64_schedulers, gmm3)
from test_diffusers_pipelines import tiny_unet, unconditional  # noqa: E402
from test_diffusers_schedulers import check_parity, scheduler_module  # noqa: E402

NAME = "UniPCMultistepScheduler"
MODULE = scheduler_module(NAME)
REF = "reference"
F64 = torch.float64
SIGMA_MIN = {"final_sigmas_type": "sigma_min"}  # bh1, predict_x0=False, lower_order_final=False need it (below)

#----------------------------------------------------------------------------
# Level 1: step by step against diffusers.

CASES = [  # (config, steps)
    ({}, 1), ({}, 2), ({}, 3), ({}, 7), ({}, 16),
    ({"solver_order": 1}, 1), ({"solver_order": 1}, 6), ({"solver_order": 1, "disable_corrector": [0, 2]}, 5),
    ({"disable_corrector": [0]}, 4), ({"disable_corrector": [1, 3, 4]}, 9),
    (dict(SIGMA_MIN, solver_type="bh1"), 1), (dict(SIGMA_MIN, solver_type="bh1"), 8),
    (dict(SIGMA_MIN, solver_type="bh1", solver_order=1, prediction_type="v_prediction"), 5),
    (dict(SIGMA_MIN, lower_order_final=False), 2), (dict(SIGMA_MIN, lower_order_final=False), 11),
    (dict(SIGMA_MIN, lower_order_final=False, solver_type="bh1", prediction_type="sample"), 6),
    (dict(SIGMA_MIN, predict_x0=False), 1), (dict(SIGMA_MIN, predict_x0=False), 7),
    (dict(SIGMA_MIN, predict_x0=False, solver_type="bh1", prediction_type="v_prediction"), 12),
    (dict(SIGMA_MIN, predict_x0=False, prediction_type="sample", disable_corrector=[2]), 5),
    ({"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 10),
    ({"prediction_type": "sample", "timestep_spacing": "leading", "steps_offset": 1}, 8),
    ({"use_karras_sigmas": True}, 10), ({"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 20.0}, 6),
    (dict(SIGMA_MIN, use_karras_sigmas=True, prediction_type="v_prediction"), 7),
    (dict(SIGMA_MIN, use_karras_sigmas=True, lower_order_final=False), 9),
    ({"use_exponential_sigmas": True, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}, 8),
    ({"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 6),
    ({"beta_schedule": "squaredcos_cap_v2", "solver_type": "midpoint"}, 5),  # midpoint loads as bh2, as diffusers
    # order 3: UniC-3 reads the model value of three steps back (history3)
    ({"solver_order": 3}, 1), ({"solver_order": 3}, 3), ({"solver_order": 3}, 4), ({"solver_order": 3}, 12),
    ({"solver_order": 3, "disable_corrector": [2, 5]}, 9),
    (dict(SIGMA_MIN, solver_order=3, solver_type="bh1", prediction_type="v_prediction"), 10),
    (dict(SIGMA_MIN, solver_order=3, lower_order_final=False), 8),
    (dict(SIGMA_MIN, solver_order=3, predict_x0=False, prediction_type="sample"), 7),
    ({"solver_order": 3, "use_karras_sigmas": True}, 10),
    ({"solver_order": 3, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
      "timestep_spacing": "trailing"}, 6),
]


@pytest.mark.parametrize("config, steps", CASES, ids=[str(i) for i in range(len(CASES))])
def test_steps_match_diffusers(config, steps):
    check_parity(NAME, config, {"steps": steps})


@pytest.mark.parametrize("config, begin", [({}, 3), (dict(SIGMA_MIN, solver_type="bh1"), 1),
                                           ({"solver_order": 1, "disable_corrector": [4]}, 2),
                                           ({"solver_order": 3}, 2)])
def test_set_begin_index(config, begin):
    check_parity(NAME, config, {"steps": 8}, begin=begin)


FLOAT64_CASES = [({}, 16), (dict(SIGMA_MIN, solver_type="bh1", lower_order_final=False), 16),
                 (dict(SIGMA_MIN, predict_x0=False, prediction_type="v_prediction"), 9),
                 ({"solver_order": 1, "prediction_type": "sample", "disable_corrector": [1]}, 6),
                 (dict(SIGMA_MIN, use_karras_sigmas=True, solver_type="bh1"), 12),
                 ({"solver_order": 3}, 16), (dict(SIGMA_MIN, solver_order=3, predict_x0=False, solver_type="bh1"), 11)]


@pytest.mark.parametrize("config, steps", FLOAT64_CASES, ids=[str(i) for i in range(len(FLOAT64_CASES))])
def test_float64_steps_match_diffusers(config, steps):
    """Ours in float64 on diffusers' sigmas (its float32-rounded schedule) is diffusers in float64 to rounding: the
    float64 floor (1e-12 relative) at every step, the inputs being diffusers' state and fresh model outputs."""
    truth, ours = float64_schedulers(NAME, MODULE, config, steps)
    assert ours.timesteps.tolist() == truth.timesteps.tolist()
    ours.sigmas_host = truth.sigmas.tolist()  # the same sigmas: no table is built before the first step
    float64_parity(truth, ours, MODULE, f"{config}")


def test_orders_and_correctors_are_diffusers():
    orders, correctors = coef_tables_unipc.unipc_orders, coef_tables_unipc.unipc_correctors
    assert orders(1) == [1] and orders(2) == [1, 1] and orders(5) == [1, 2, 2, 2, 1]
    assert orders(20) == [1] + [2] * 18 + [1]  # no 15-step threshold, unlike DPM-Solver's lower_order_final
    assert orders(5, lower_order_final=False) == [1, 2, 2, 2, 2] and orders(4, order=1) == [1] * 4
    assert orders(8, begin=3)[3:] == [1, 2, 2, 2, 1]
    assert correctors(4) == [False, True, True, True]
    assert correctors(5, [0, 2]) == [False, False, True, False, True]  # i - 1 listed: step i does not correct
    assert correctors(6, begin=2)[2:] == [False, True, True, True]


@pytest.mark.parametrize("begin", range(4))
def test_loop_first_rows_read_no_history(begin):
    sched = dd.UniPCMultistepScheduler()
    sched.set_timesteps(10)
    table = sched._plan(sched._key(begin))[0]
    assert table[begin, coefs.C] == 0 and table[begin, coefs.C2] == 0 and table[begin + 1, coefs.C2] == 0

#----------------------------------------------------------------------------
# The sampler.


SAMPLER_CASES = [({}, {}), ({"solver_order": 1}, {"order": 1}),
                 ({"disable_corrector": [1, 4]}, {"disable_corrector": (1, 4)}),
                 ({"solver_type": "bh1"}, {"solver_type": "bh1"}),
                 ({"lower_order_final": False}, {"lower_order_final": False}),
                 ({"predict_x0": False, "solver_type": "bh1"}, {"predict_x0": False, "solver_type": "bh1"}),
                 ({"solver_order": 3}, {"order": 3}),
                 ({"solver_order": 3, "lower_order_final": False, "disable_corrector": [3]},
                  {"order": 3, "lower_order_final": False, "disable_corrector": (3,)})]


@pytest.mark.parametrize("config, knobs", SAMPLER_CASES, ids=[str(i) for i in range(len(SAMPLER_CASES))])
def test_sampler_is_diffusers_loop_in_float64(config, knobs):
    """The ``unipc`` sampler on a Karras schedule ending above 0 is diffusers' loop on the same sigmas (float64 floor);
    ending at 0 (bh2, data prediction: diffusers' only finite ending there) too."""
    gmm, x = gmm3(), make_tensor((6, 2), F64, seed=2) * 10.0
    sig = schedules.karras(7, 0.1, 10.0)[:-1].tolist()
    want = diffusers_vp_loop(NAME, MODULE, gmm, x, sig, config)
    got = sample(gmm, x, sig, "unipc", backend=REF, **knobs)
    assert_matches_reference(got, want, want, f"{config}")
    if config.get("solver_type") != "bh1" and config.get("predict_x0", True) and config.get("lower_order_final", 1):
        sig0 = schedules.karras(7, 0.1, 10.0).tolist()
        want = diffusers_vp_loop(NAME, MODULE, gmm, x, sig0, config)
        assert_matches_reference(sample(gmm, x, sig0, "unipc", backend=REF, **knobs), want, want, f"{config} to 0")


def test_convergence_order():
    """Against a 2048-step run: order 3 for UniPC-2 (UniP-2 and UniC, the paper's p + 1), order 2 for UniP-2 alone
    and for UniPC-1, order 1 for UniP-1 alone (DDIM); lower_order_final off, so that no first-order last step caps it.
    Measured slopes (16 -> 32 -> 64 -> 128 steps): about 2.9-3.0, 2.0, 2.0, 1.0."""
    gmm = gmm3()
    x = torch.randn(16, 2, dtype=F64, generator=torch.Generator().manual_seed(3)) * 20.0

    def run(n, **kw):
        return sample(gmm, x, schedules.loglinear(n + 1, 0.1, 20.0)[:-1], "unipc", backend=REF,
                      lower_order_final=False, **kw)

    fine = run(2048)
    off = {"disable_corrector": range(2048)}
    for kw, order in (({}, 3), ({"predict_x0": False, "solver_type": "bh1"}, 3), (off, 2), ({"order": 1}, 2),
                      (dict(off, order=1), 1)):
        errs = [float((run(n, **kw) - fine).abs().max()) for n in (32, 64, 128)]
        slopes = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
        assert all(order - 0.25 < s < order + 0.4 for s in slopes), (kw, errs, slopes)


def test_convergence_order_three():
    """UniPC-3 (UniP-3 and UniC-3, whose correction reads M three steps back) converges at order 4, the paper's p + 1,
    and UniP-3 alone at order 3. Measured slopes (64 -> 128 -> 256 steps, against 2048): 3.8, 3.9 and 3.2, 3.3."""
    gmm = gmm3()
    x = torch.randn(16, 2, dtype=F64, generator=torch.Generator().manual_seed(3)) * 20.0

    def run(n, **kw):
        return sample(gmm, x, schedules.loglinear(n + 1, 0.1, 20.0)[:-1], "unipc", backend=REF, order=3,
                      lower_order_final=False, **kw)

    fine = run(2048)
    for kw, lo, hi in (({}, 3.6, 4.4), ({"disable_corrector": range(2048)}, 2.9, 3.5)):
        errs = [float((run(n, **kw) - fine).abs().max()) for n in (64, 128, 256)]
        slopes = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
        assert all(lo < s < hi for s in slopes), (kw, errs, slopes)


def test_every_backend_matches_reference(cpu_backend):
    """float32 on each CPU backend within the project rule of the float64 reference run; float64 at its floor."""
    check_sampler_every_backend("unipc", ({}, {"order": 1, "solver_type": "bh1"},
                                          {"predict_x0": False, "disable_corrector": (2,)}, {"order": 3}), cpu_backend)


def test_sampler_knobs_are_checked():
    check_sampler_knob_errors("unipc", (({"order": 4}, ValueError, "order: expected 1, 2 or 3"),
                                        ({"solver_type": "midpoint"}, ValueError, "solver_type"),
                                        ({"lower_order_final": 1}, TypeError, "lower_order_final"),
                                        ({"predict_x0": "yes"}, TypeError, "predict_x0"),
                                        ({"disable_corrector": 3}, TypeError, "disable_corrector"),
                                        ({"disable_corrector": [-1]}, ValueError, "disable_corrector")))

#----------------------------------------------------------------------------
# Level 2, pipelines, persistence, refusals.


def test_level2_spec():
    sched = dd.UniPCMultistepScheduler(solver_type="bh1", final_sigmas_type="sigma_min", disable_corrector=[3, 1])
    sched.set_timesteps(8)
    spec = loop_spec(sched)
    assert spec.method == "unipc" and spec.vp and spec.sigmas == sched.sigmas_host
    assert spec.knobs == {"order": 2, "solver_type": "bh1", "lower_order_final": True, "predict_x0": True,
                          "disable_corrector": (1, 3)}
    karras = dd.UniPCMultistepScheduler(use_karras_sigmas=True, final_sigmas_type="sigma_min")
    karras.set_timesteps(8)
    with pytest.raises(ValueError, match="final_sigmas_type='sigma_min'"):
        loop_spec(karras)


PIPELINE_CASES = [({}, 1), ({}, 2), ({"prediction_type": "v_prediction", "use_karras_sigmas": True}, 2),
                  (dict(SIGMA_MIN, solver_type="bh1", lower_order_final=False, timestep_spacing="trailing"), 1),
                  (dict(SIGMA_MIN, solver_type="bh1", lower_order_final=False, timestep_spacing="trailing"), 2),
                  (dict(SIGMA_MIN, predict_x0=False, solver_order=1, disable_corrector=[1]), 2),
                  ({"solver_order": 3}, 1), ({"solver_order": 3, "disable_corrector": [1]}, 2)]


@pytest.mark.parametrize("config, level", PIPELINE_CASES, ids=[str(i) for i in range(len(PIPELINE_CASES))])
def test_ddpm_pipeline(config, level):
    check_pipeline(lambda s: UniPCPipeline(unet=tiny_unet(), scheduler=s), NAME, config, unconditional, level,
                   f"{config} level {level}")


def test_save_and_load(tmp_path):
    config = dict(SIGMA_MIN, solver_type="bh1", disable_corrector=[2], use_karras_sigmas=True, sigma_min=0.05)
    sched = dd.UniPCMultistepScheduler(**config)
    check_saved_scheduler(sched, tmp_path / "s", {k: sched.config[k] for k in config})
    check_saved_pipeline(UniPCPipeline, sched, tmp_path / "p")


def test_add_noise_and_scale_model_input_match_diffusers():
    check_add_noise_and_scale_model_input(diffusers.UniPCMultistepScheduler(), dd.UniPCMultistepScheduler())


@pytest.mark.parametrize("config, key", [
    ({"solver_order": 4}, "solver_order=4"), ({"thresholding": True}, "thresholding=True"),
    ({"solver_p": diffusers.DDIMScheduler()}, "solver_p="), ({"use_beta_sigmas": True}, "use_beta_sigmas=True"),
    ({"use_flow_sigmas": True}, "use_flow_sigmas=True"), ({"prediction_type": "flow_prediction"}, "prediction_type"),
    ({"use_dynamic_shifting": True}, "use_dynamic_shifting=True"), ({"predict_x0": False}, "predict_x0=False"),
    ({"solver_type": "bh1"}, "solver_type='bh1'"), ({"solver_type": "bh3"}, "solver_type='bh3'"),
    ({"final_sigmas_type": "one"}, "final_sigmas_type")])
def test_refused_options_name_the_key(config, key):
    with pytest.raises(ValueError, match=key.replace("(", r"\(")):
        dd.UniPCMultistepScheduler(**config)


def test_refused_at_set_timesteps():
    sched = dd.UniPCMultistepScheduler(lower_order_final=False)
    sched.set_timesteps(1)  # one step is first order: finite in diffusers
    with pytest.raises(ValueError, match="lower_order_final=False"):
        sched.set_timesteps(2)
    with pytest.raises(ValueError, match="sigmas"):
        dd.UniPCMultistepScheduler().set_timesteps(sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="steps_offset"):
        dd.UniPCMultistepScheduler(timestep_spacing="leading", steps_offset=600).set_timesteps(4)
