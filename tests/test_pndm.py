"""PNDM (Liu et al. 2022): the ``plms`` sampler (:mod:`diffkern.coef_tables_plms`, depth-3 eps history, Heun first
step) and ``diffkern.diffusers.PNDMScheduler`` (Level 1, PLMS and the Runge-Kutta start) / ``accelerate`` (Level 2)
against diffusers' own ``PNDMScheduler``.

Oracles and tolerances. Level 1 float32: diffusers run in float64 is the truth and the project's rule applies (at most
twice diffusers' own float32 error, + the float32 floor; ``test_diffusers_schedulers.check_parity``). Float64: ours
against diffusers in float64 on the same inputs: the same mathematics, the float64 floor. The sampler: diffusers' PNDM
loop in float64 driven by an exact analytic denoiser on its own schedule, and a textbook float64 PLMS loop written
here on other schedules (float64 floor); every CPU backend against the float64 reference run (``test_samplers``
EVERY); its empirical convergence order. Pipelines: the stock pipeline in float64 is the truth (``three_runs``).
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern import coef_tables_plms, schedules  # noqa: E402
from diffkern.diffusers.loop_spec import loop_spec, tail_spec  # noqa: E402
from diffkern.diffusers.schedulers_pndm import pndm_calls  # noqa: E402
from diffkern.ops import coefs  # noqa: E402
from diffkern.sampling import sample  # noqa: E402
from diffkern.testing import assert_matches_reference, make_tensor  # noqa: E402
from dropin_conformance import (UniPCPipeline, check_add_noise_and_scale_model_input, check_pipeline,  # noqa: E402
                                check_saved_pipeline, check_saved_scheduler, float64_parity, gmm3)
from test_diffusers_pipelines import text2image, tiny_sd, tiny_unet, unconditional  # noqa: E402, F401
from test_diffusers_schedulers import check_parity, diffusers_float64  # noqa: E402

NAME = "PNDMScheduler"
MODULE = importlib.import_module("diffusers.schedulers.scheduling_pndm")
REF = "reference"
F64 = torch.float64
PLMS = {"skip_prk_steps": True}
SD = dict(PLMS, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)  # SD 1.x's

#----------------------------------------------------------------------------
# Level 1: step by step against diffusers.

CASES = [  # (config, steps, begin)
    (PLMS, 1, 0), (PLMS, 2, 0), (PLMS, 3, 0), (PLMS, 5, 0), (SD, 12, 0), (dict(SD, set_alpha_to_one=True), 4, 0),
    (dict(PLMS, prediction_type="v_prediction", timestep_spacing="trailing"), 7, 0),
    (dict(PLMS, timestep_spacing="linspace", beta_schedule="squaredcos_cap_v2"), 6, 0),
    (dict(PLMS, num_train_timesteps=999, trained_betas=torch.linspace(1e-4, 0.03, 999).tolist()), 9, 0),
    ({}, 4, 0), ({}, 9, 0), ({"prediction_type": "v_prediction", "timestep_spacing": "linspace"}, 6, 0),
    ({"timestep_spacing": "trailing", "set_alpha_to_one": True, "num_train_timesteps": 999}, 7, 0),
    ({"steps_offset": 1, "beta_schedule": "scaled_linear"}, 5, 0),
    (SD, 8, 1), (SD, 8, 3), ({}, 7, 2), ({}, 7, 13), ({"prediction_type": "v_prediction"}, 6, 12),
]


@pytest.mark.parametrize("config, steps, begin", CASES, ids=[str(i) for i in range(len(CASES))])
def test_steps_match_diffusers(config, steps, begin):
    """Every call (Runge-Kutta, PLMS, the restarts) and set_begin_index (diffusers' counter restarts there)."""
    check_parity(NAME, config, {"steps": steps}, begin=begin)


def test_every_backend(cpu_backend):
    """Each CPU backend (odd sizes): the Runge-Kutta calls read three buffers, PLMS writes over one it reads."""
    for config, steps in (({}, 5), (SD, 6)):
        check_parity(NAME, config, {"steps": steps}, backend=cpu_backend)


@pytest.mark.parametrize("config, steps, begin", [(SD, 9, 0), ({"prediction_type": "v_prediction"}, 6, 0),
                                                  ({"timestep_spacing": "linspace"}, 5, 2)])
def test_float64_steps_match_diffusers(config, steps, begin):
    """Ours in float64 is diffusers in float64 to rounding (the float64 floor) at every call."""
    with diffusers_float64(MODULE):
        truth = diffusers.PNDMScheduler(**config)
        truth.set_timesteps(steps)
    ours = dd.PNDMScheduler(**config)
    ours.set_timesteps(steps)
    ours.set_begin_index(begin)
    float64_parity(truth, ours, MODULE, f"{config}", shape=(3, 1, 5), begin=begin, label="call")
    assert ours.counter == len(truth.timesteps) - begin == truth.counter


@pytest.mark.parametrize("skip", [True, False])
def test_schedule_and_buffers(skip):
    """diffusers' timesteps and PRK/PLMS lists; PLMS keeps 3 model outputs, the Runge-Kutta start 5 (the 3 steps'
    first outputs for PLMS, plus the second and third of the current step); every read is of a kept output."""
    for steps in (4, 5, 10):
        theirs, ours = diffusers.PNDMScheduler(skip_prk_steps=skip), dd.PNDMScheduler(skip_prk_steps=skip)
        for s in (theirs, ours):
            s.set_timesteps(steps)
        assert ours.timesteps.tolist() == theirs.timesteps.tolist() and ours.timesteps.dtype == torch.int64
        assert ours.prk_timesteps.tolist() == theirs.prk_timesteps.tolist()
        assert ours.plms_timesteps.tolist() == theirs.plms_timesteps.tolist()
        _, (routes, count) = ours._build(("pndm", 0))
        assert count == (3 if skip else 5)
        table = ours._build(("pndm", 0))[0]
        for k, (reads, write) in enumerate(routes):
            for slot, buf in zip((coefs.C, coefs.C2, coefs.C3), reads):
                assert table[k, slot] == 0 or buf is not None


def test_calls_replay_diffusers_control_flow():
    """PLMS: Euler, the restart with the mean of two outputs, then AB2, AB3, AB4 on the first-call outputs."""
    calls = pndm_calls([800, 600, 600, 400, 200, 0], [], 200, True)
    assert [(c.t, c.prev, c.restart) for c in calls] == [(800, 600, False), (800, 600, True), (600, 400, False),
                                                        (400, 200, False), (200, 0, False), (0, -200, False)]
    assert calls[1].combo == {1: 0.5, 0: 0.5} and calls[2].combo == {2: 1.5, 0: -0.5}
    assert calls[3].combo == {3: 23 / 12, 2: -16 / 12, 0: 5 / 12}
    assert calls[4].combo == {4: 55 / 24, 3: -59 / 24, 2: 37 / 24, 0: -9 / 24}
    assert calls[5].combo == {5: 55 / 24, 4: -59 / 24, 3: 37 / 24, 2: -9 / 24}

#----------------------------------------------------------------------------
# The sampler.


def _diffusers_loop(gmm, x, config, steps):
    """diffusers' PNDM (PLMS) loop in float64 on its own schedule, fed the exact denoiser's eps; returns (VE final
    state, the VE sigmas of its N distinct timesteps plus the final one)."""
    with diffusers_float64(MODULE):
        sched = diffusers.PNDMScheduler(skip_prk_steps=True, **config)
        sched.set_timesteps(steps)
        ab = sched.alphas_cumprod
        ts = sched.timesteps.tolist()
        ts = ts[:1] + ts[2:]
        last = ts[-1] - sched.config.num_train_timesteps // steps
        ab_end = float(ab[last]) if last >= 0 else float(sched.final_alpha_cumprod)
        sig = [math.sqrt((1 - float(ab[t])) / float(ab[t])) for t in ts] + [math.sqrt((1 - ab_end) / ab_end)]
        z = x / math.sqrt(sig[0] ** 2 + 1)
        for t in sched.timesteps:
            a = float(ab[int(t)])
            s, v = math.sqrt((1 - a) / a), z / math.sqrt(a)
            z = sched.step((v - gmm.denoise(v, s)) / s, t, z).prev_sample
    return z * math.sqrt(sig[-1] ** 2 + 1), sig


@pytest.mark.parametrize("config, steps", [({"steps_offset": 1}, 1), ({}, 2), ({}, 3), ({"set_alpha_to_one": True}, 10),
                                           ({"steps_offset": 1, "beta_schedule": "scaled_linear"}, 7)])
def test_sampler_is_diffusers_pndm_in_float64(config, steps):
    """``plms`` on the VE sigmas of diffusers' schedule is its PNDM loop (float64 floor); N = 1 to sigma > 0 is
    diffusers' single Euler call (no corrector), ``euler``. A last step from t = 0 to alpha-bar(0) is the identity
    there and is left out (as Level 2 does)."""
    gmm, x = gmm3(), make_tensor((6, 2), F64, seed=2) * 10.0
    want, sig = _diffusers_loop(gmm, x, config, steps)
    if sig[-1] == sig[-2]:
        sig = sig[:-1]
    method = "euler" if steps == 1 and sig[-1] > 0 else "plms"
    assert_matches_reference(sample(gmm, x, sig, method, backend=REF), want, want, f"{config} {steps}")


def _textbook(gmm, x, sigmas):
    """PLMS written out: Heun in eps on the first step, then Euler with Adams-Bashforth eps of order <= 4."""
    eps = [(x - gmm.denoise(x, sigmas[0])) / sigmas[0]]
    x1 = x + (sigmas[1] - sigmas[0]) * eps[0]
    if sigmas[1] > 0:
        x1 = x + (sigmas[1] - sigmas[0]) * (eps[0] + (x1 - gmm.denoise(x1, sigmas[1])) / sigmas[1]) / 2
    x = x1
    for i in range(1, len(sigmas) - 1):
        eps.append((x - gmm.denoise(x, sigmas[i])) / sigmas[i])
        w = {2: (3, -1), 3: (23, -16, 5), 4: (55, -59, 37, -9)}[min(len(eps), 4)]
        d = sum(wj * e for wj, e in zip(w, reversed(eps))) / {2: 2, 3: 12, 4: 24}[len(w)]
        x = x + (sigmas[i + 1] - sigmas[i]) * d
    return x


@pytest.mark.parametrize("sigmas", [schedules.karras(9, 0.1, 10.0), schedules.karras(6, 0.05, 5.0)[:-1],
                                    schedules.loglinear(3, 0.2, 8.0)])
def test_sampler_is_textbook_plms(sigmas):
    gmm, x = gmm3(), make_tensor((5, 2), F64, seed=3) * 8.0
    want = _textbook(gmm, x, sigmas.tolist())
    assert_matches_reference(sample(gmm, x, sigmas, "plms", backend=REF), want, want, f"{sigmas.tolist()}")


def test_plan_structure():
    plan = coef_tables_plms.plms(schedules.karras(6, 0.1, 10.0).tolist())
    assert plan.history == 3 and plan.corrector == [True] + [False] * 5 and plan.corrector_row == 6
    depth = [(plan.table[:6, k] != 0).tolist() for k in (coefs.C, coefs.C2, coefs.C3)]
    assert depth == [[False] + [True] * 5, [False] * 2 + [True] * 4, [False] * 3 + [True] * 3]
    assert plan.table[6, coefs.C] != 0  # the corrector reads step 0's own eps
    single = coef_tables_plms.plms([5.0, 0.0])  # one step to 0: Euler to 0, the jump to D
    assert single.corrector == [False] and single.table[0, coefs.A] == 0 and single.table[0, coefs.B] == 1


def test_convergence_order():
    """Against a fine run: order 2 on a log-linear schedule (equal-step AB weights on unequal sigma steps cost the
    higher orders: see the module docstring of coef_tables_plms), above 3 on steps equal in sigma, where PLMS is the
    Adams-Bashforth method in sigma. Measured slopes 2.2, 1.96 and 3.1, 3.5 (n = 16 -> 32 -> 64)."""
    gmm = gmm3()
    x = torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(3)) * 5.0
    for make, lo, hi in ((lambda n: schedules.loglinear(n + 1, 0.1, 5.0)[:-1], 1.8, 2.4),
                         (lambda n: torch.linspace(5.0, 1.0, n + 1, dtype=F64), 2.9, 4.3)):
        fine = sample(gmm, x, make(512), "plms", backend=REF)
        errs = [float((sample(gmm, x, make(n), "plms", backend=REF) - fine).abs().max()) for n in (16, 32, 64)]
        slopes = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
        assert all(lo < s < hi for s in slopes), (errs, slopes)


def test_sampler_refuses_knobs_and_bad_sigmas():
    gmm, x = gmm3(), torch.randn(2, 2, dtype=F64)
    with pytest.raises(TypeError, match="plms: unknown knob"):
        sample(gmm, x, schedules.karras(4, 0.1, 10.0), "plms", eta=1.0)
    with pytest.raises(ValueError, match="sigmas"):
        sample(gmm, x, [1.0, 2.0, 0.0], "plms")

#----------------------------------------------------------------------------
# Pipelines (Level 1 and 2), Level 2 specs, persistence, refusals.


@pytest.mark.parametrize("config, level", [(PLMS, 1), (PLMS, 2), (dict(PLMS, set_alpha_to_one=True), 2),
                                           ({}, 1), ({"prediction_type": "v_prediction"}, 1)])
def test_unconditional_pipeline(config, level):
    check_pipeline(lambda s: UniPCPipeline(unet=tiny_unet(), scheduler=s), NAME, config, unconditional, level,
                   f"{config} level {level}")


@pytest.mark.parametrize("config, level", [(SD, 1), (SD, 2), (dict(SD, skip_prk_steps=False), 1)])
def test_text2image_pipeline_with_cfg(tiny_sd, config, level):
    """Stable Diffusion 1.x's scheduler in its pipeline (which forces steps_offset=1), CFG in the fused step."""
    check_pipeline(tiny_sd, NAME, config, text2image, level, f"text2image {config} level {level}")


def test_level2_spec():
    sched = dd.PNDMScheduler(**SD)
    sched.set_timesteps(5)
    spec = loop_spec(sched)
    assert spec.method == "plms" and spec.vp and spec.timesteps == [801, 601, 401, 201, 1]
    assert spec.sigmas == sched.train_sigmas[[801, 601, 401, 201, 1, 0]].tolist()  # ends at alpha-bar(0)
    sched = dd.PNDMScheduler(**PLMS)
    sched.set_timesteps(4)  # ends at t = 0 -> alpha-bar(0): the identity last step is dropped
    assert loop_spec(sched).timesteps == [750, 500, 250]
    sched.set_timesteps(1)  # its single step, from t = 0 to alpha-bar(0), is the identity: nothing to run
    with pytest.raises(ValueError, match="set_alpha_to_one=False"):
        loop_spec(sched)
    one = dd.PNDMScheduler(**SD)
    one.set_timesteps(1)
    assert loop_spec(one).method == "euler"  # diffusers' single call is Euler (no corrector)
    sched = dd.PNDMScheduler(**SD)
    sched.set_timesteps(6)
    assert tail_spec(sched, loop_spec(sched), 0) == loop_spec(sched)
    with pytest.raises(ValueError, match="strength"):
        tail_spec(sched, loop_spec(sched), 3)  # img2img: see test_img2img


@pytest.mark.parametrize("config, key", [({}, "skip_prk_steps=False"),
                                         (dict(PLMS, prediction_type="v_prediction"), "prediction_type='v_prediction'"),
                                         (dict(PLMS, timestep_spacing="linspace"), "timestep_spacing='linspace'")])
def test_level2_refusals_name_the_key(config, key):
    sched = dd.PNDMScheduler(**config)
    sched.set_timesteps(7)
    with pytest.raises(ValueError, match=key):
        loop_spec(sched)
    with pytest.raises(ValueError, match=key):
        dd.accelerate(UniPCPipeline(unet=tiny_unet(), scheduler=diffusers.PNDMScheduler(**config)))


def test_save_and_load(tmp_path):
    sched = dd.PNDMScheduler(**SD)
    check_saved_scheduler(sched, tmp_path / "s", SD)
    check_saved_pipeline(UniPCPipeline, sched, tmp_path / "p")


def test_add_noise_and_scale_model_input_match_diffusers():
    check_add_noise_and_scale_model_input(diffusers.PNDMScheduler(**SD), dd.PNDMScheduler(**SD))


@pytest.mark.parametrize("config, key", [({"prediction_type": "sample"}, "prediction_type='sample'"),
                                         ({"timestep_spacing": "karras"}, "timestep_spacing"),
                                         ({"beta_schedule": "sigmoid"}, "beta_schedule='sigmoid'")])
def test_refused_options_name_the_key(config, key):
    with pytest.raises(ValueError, match=key):
        dd.PNDMScheduler(**config)


def test_refused_at_set_timesteps_and_step():
    with pytest.raises(ValueError, match="skip_prk_steps=False"):
        dd.PNDMScheduler().set_timesteps(3)  # the Runge-Kutta start needs 4 steps (diffusers fails too)
    with pytest.raises(ValueError, match="steps_offset=300"):
        dd.PNDMScheduler(steps_offset=300).set_timesteps(5)
    with pytest.raises(ValueError, match="num_inference_steps"):
        dd.PNDMScheduler().set_timesteps(0)
    sched = dd.PNDMScheduler(**PLMS)
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(torch.zeros(1, 2), 1, torch.zeros(1, 2))
    sched.set_timesteps(5)
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="timestep: expected 800"):
        sched.step(x, 700, x)  # not in the schedule: the loop starts at timesteps[0]
    sched.step(x, 800, x)
    with pytest.raises(ValueError, match="sample: shape"):
        sched.step(torch.zeros(2, 2), 600, torch.zeros(2, 2))


def test_img2img(tiny_sd, monkeypatch):
    """Level 1 runs the stock pipeline's loop as diffusers' PNDM does: the call list [t0, t1, t1, t2, ...] sliced at the
    begin index, the counter restarting there (so the third call gets a sample at t3 with the timestep t4: diffusers'
    own quirk); the truth is the stock pipeline in float64 (as test_diffusers_img2img_level2). Level 2 runs strength 1
    and refuses a partial schedule, which is no plms loop."""
    import diffusers.models.autoencoders.vae as vae_module
    from test_diffusers_img2img_level2 import _call, _img2img, _three_runs
    from test_diffusers_pipelines import float64_copy, pipeline_modules
    from test_diffusers_schedulers import _randn32

    ours, truth, eager = _three_runs(tiny_sd, monkeypatch, NAME, SD, strength=1.0, steps=4, w=1.0)
    assert_matches_reference(ours, truth, eager, "img2img level 2, strength 1")
    stock = _img2img(tiny_sd, diffusers.PNDMScheduler(**SD))
    config = {k: v for k, v in stock.scheduler.config.items() if not k.startswith("_")}
    for strength in (0.5, 0.8):
        with diffusers_float64(MODULE, *pipeline_modules(stock)), monkeypatch.context() as m:
            m.setattr(vae_module, "randn_tensor", _randn32(vae_module.randn_tensor))  # the encoder's posterior draw
            truth = _call(float64_copy(stock, diffusers.PNDMScheduler(**config)), torch.Generator().manual_seed(5),
                          strength, steps=6)
        eager = _call(stock, torch.Generator().manual_seed(5), strength, steps=6)
        stock.scheduler = dd.PNDMScheduler(**config)
        ours = _call(stock, torch.Generator().manual_seed(5), strength, steps=6)
        assert_matches_reference(ours, truth, eager, f"img2img level 1, strength {strength}")
        with pytest.raises(ValueError, match="strength < 1"):
            _call(dd.accelerate(stock), torch.Generator().manual_seed(5), strength, steps=6)
        stock.scheduler = diffusers.PNDMScheduler(**config)
