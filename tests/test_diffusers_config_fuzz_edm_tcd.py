"""Differential fuzzing of the TCD and EDM drop-ins (``TCDScheduler``, ``EDMEulerScheduler``,
``EDMDPMSolverMultistepScheduler``) against diffusers, with the harness of dropin_fuzz.py,
test_diffusers_config_fuzz.py and test_diffusers_config_fuzz_new.py (imported, not edited).

Every key of the diffusers class is drawn (seeded, deterministic), plus step counts, ``set_begin_index``, TCD's
``eta``/``strength``/custom timesteps and EDM Euler's churn knobs. For each draw, one of:

- diffusers refuses it (construction or ``set_timesteps``): ours must raise a ValueError;
- it holds what diffkern documents as unsupported (:func:`refusals`): ours must raise a ValueError naming
  ``key=value``; nowhere else may ours refuse;
- otherwise every step's outputs must match diffusers under the project's rule in float32 (diffusers in float64 the
  truth, diffusers in float32 the yardstick), and ours in float64 must match diffusers in float64 to the float64 floor
  (EDM: given the truth's sigmas, as UniPC in the sibling file; only noise-free draws, since diffusers' float64 module
  draws float32 normals and ours float64 ones).
"""
import importlib
import random

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.testing import make_tensor  # noqa: E402
from dropin_fuzz import (BETA_RANGES, SCHEDULE_CHOICES, both_accept, check, init_keys, refusal_outcome,  # noqa: E402
                         refuses, trained_betas, undrawn_keys)
from test_diffusers_config_fuzz import SHAPE  # noqa: E402
from test_diffusers_config_fuzz_new import _draw_lcm_schedule  # noqa: E402
from test_diffusers_schedulers import diffusers_float64  # noqa: E402
from test_tcd import float64_tcd  # noqa: E402

TCD, EULER, DPM = "TCDScheduler", "EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"
NAMES = (TCD, EULER, DPM)
DRAWS = 40  # configs per class
F64 = torch.float64
MODULES = {EULER: importlib.import_module("diffusers.schedulers.scheduling_edm_euler"),
           DPM: importlib.import_module("diffusers.schedulers.scheduling_edm_dpmsolver_multistep")}

CHOICES = {
    **SCHEDULE_CHOICES,
    "steps_offset": [0, 1],
    "clip_sample": [True, False],
    "clip_sample_range": [0.5, 3.0],
    "set_alpha_to_one": [False],
    "original_inference_steps": [50, 4, 20, 100],
    "timestep_scaling": [1.0, 3.5],
    "sample_max_value": [2.0],
    "dynamic_thresholding_ratio": [0.9],
    "sigma_min": [0.002, 0.03, 0.3],
    "sigma_max": [80.0, 14.6, 120.0],
    "sigma_data": [0.5, 1.0, 0.25],
    "sigma_schedule": ["karras", "exponential"],
    "rho": [7.0, 3.0, 5.0],
    "final_sigmas_type": ["zero", "sigma_min"],
    "solver_order": [1, 2, 3],
    "algorithm_type": ["dpmsolver++", "sde-dpmsolver++", "deis", "dpmsolver"],
    "solver_type": ["midpoint", "heun", "logrho"],
    "lower_order_final": [False],
    "euler_at_final": [True],
}
RARE = {"thresholding": [True], "rescale_betas_zero_snr": [True]}


def draw_case(name, k):
    """Draw (config, set_timesteps kwargs, begin, step kwargs) number ``k`` of class ``name`` (deterministic)."""
    rng = random.Random(f"edm-tcd/{name}/{k}")
    keys = init_keys(name)
    config = {key: rng.choice(RARE[key]) for key in keys if key in RARE and rng.random() < 0.08}
    for key in keys:
        if key in CHOICES and key not in config and rng.random() < 0.35:
            config[key] = rng.choice(CHOICES[key])
    if name == DPM and rng.random() < 0.3:  # the SDE, with its own refusals
        config["algorithm_type"] = "sde-dpmsolver++"
    if name == TCD and rng.random() < 0.1:
        config["rescale_betas_zero_snr"] = True
    if name != TCD and rng.random() < 0.05:  # an inverted range
        config["sigma_min"], config["sigma_max"] = 0.5, 0.2
    step_kw = {}
    if name == TCD:
        if rng.random() < 0.4:
            config["beta_start"], config["beta_end"] = rng.choice(BETA_RANGES)
        T = config.get("num_train_timesteps", keys["num_train_timesteps"])
        if rng.random() < 0.1:
            lo, hi = rng.choice(BETA_RANGES)
            config["trained_betas"] = trained_betas(lo, hi, T)
        kw = _draw_lcm_schedule(rng, config, T)
        step_kw["eta"] = rng.choice([0.0, 0.3, 0.3, 0.5, 1.0])
        n = len(kw.get("timesteps") or ()) or kw["num_inference_steps"]
    else:
        n = rng.choice([1, 2, 3, 4, 7, 10, 16, 25])
        kw = {"num_inference_steps": n}
        if name == EULER and rng.random() < 0.3:
            step_kw = {"s_churn": rng.choice([0.5, 3.0, 40.0]), "s_tmin": rng.choice([0.0, 0.3]),
                       "s_tmax": rng.choice([float("inf"), 5.0]), "s_noise": rng.choice([1.0, 1.003])}
    begin = rng.randrange(n) if rng.random() < 0.25 and n > 1 else 0
    return config, kw, begin, step_kw


def refusals(name, cfg, kw, eager):
    """(key, value) pairs of the full config ``cfg`` (and ``kw``) that diffkern documents as unsupported."""
    out = []

    def no(key, bad, source=cfg):
        if key in source and bad(source[key]):
            out.append((key, source[key]))

    if name == TCD:
        no("prediction_type", lambda v: v not in ("epsilon", "v_prediction", "sample"))
        no("rescale_betas_zero_snr", lambda v: v and cfg["prediction_type"] == "epsilon" and len(eager.timesteps) > 0
           and float(eager.alphas_cumprod[eager.timesteps].min()) == 0.0)
        no("strength", lambda v: len(eager.timesteps) == 0, kw)
        return out
    no("prediction_type", lambda v: v not in ("epsilon", "v_prediction"))
    no("sigma_max", lambda v: not cfg["sigma_min"] < v)
    if name == DPM:
        no("thresholding", bool)
        sde = cfg["algorithm_type"] == "sde-dpmsolver++"
        orders = dd.EDMDPMSolverMultistepScheduler._orders
        no("solver_order", lambda v: sde and v == 3 and 3 in orders(_Shim(cfg, eager), 0))
        no("final_sigmas_type", lambda v: sde and v == "sigma_min"
           and float(eager.sigmas[-1]) > float(eager.sigmas[-2]))
    return out


class _Shim:
    """The attributes :meth:`EDMDPMSolverMultistepScheduler._orders` reads, from diffusers' scheduler."""

    def __init__(self, cfg, eager):
        self.config = type("C", (), cfg)
        self.sigmas_host = eager.sigmas.tolist()


def _truth_context(name, float32_draws=True):
    return float64_tcd(float32_draws) if name == TCD else diffusers_float64(MODULES[name])


def _make(cls, config, kw, truth=False, float32_draws=True):
    name = cls.__name__
    if truth:
        with _truth_context(name, float32_draws):
            sched = cls.from_config(config)
            sched.set_timesteps(**kw)
        return sched
    sched = cls.from_config(config)
    sched.set_timesteps(**kw)
    return sched


def _step(name, sched, m, t, x, step_kw, gen):
    out = sched.step(m, t, x, generator=gen, **step_kw)
    return out.prev_sample, (out.pred_noised_sample if name == TCD else getattr(out, "pred_original_sample", None))


def _run_steps(name, what, truth, eager, ours, begin, step_kw, dtype):
    """Step from ``begin`` on the truth's states and fresh model outputs; ``eager`` None: float64 at the floor."""
    for s in (truth, eager, ours):
        if s is not None:
            s.set_begin_index(begin)
    gens = [torch.Generator().manual_seed(5) for _ in range(3)]
    x = make_tensor(SHAPE, F64, seed=1) * float(truth.init_noise_sigma)
    for k in range(begin, len(truth.timesteps)):
        m = make_tensor(SHAPE, F64, seed=100 + k)
        at = f"{what} call {k} [{dtype}]"
        with _truth_context(name, float32_draws=eager is not None):
            ref = _step(name, truth, m, truth.timesteps[k], x, step_kw, gens[0])
        got = _step(name, ours, m.to(dtype), ours.timesteps[k], x.to(dtype), step_kw, gens[2])
        out = ref if eager is None else _step(name, eager, m.float(), eager.timesteps[k], x.float(), step_kw, gens[1])
        check(got[0], ref[0], out[0], f"{at} prev_sample")
        if out[1] is not None:
            check(got[1].to(out[1].dtype), ref[1], out[1], f"{at} second output")
        x = ref[0]


def run_case(name, config, kw, begin, step_kw):
    """Check one draw (module docstring); returns "diffusers refuses", "refused KEY" or "compared"."""
    cls, ours_cls = getattr(diffusers, name), getattr(dd, name)
    what = f"{name} {config} {kw} begin={begin} {step_kw}"
    their_error, eager = refuses(lambda: _make(cls, config, kw))
    source = eager.config if eager is not None else config
    our_error, ours = refuses(lambda: _make(ours_cls, source, kw))
    outcome = refusal_outcome(what, their_error, our_error, lambda: refusals(
        name, dict(init_keys(name), **dict(eager.config)), kw, eager))
    if outcome is not None:
        return outcome
    truth = _make(cls, config, kw, truth=True)
    assert torch.equal(ours.timesteps.double(), eager.timesteps.double()) or name != TCD, f"{what}: timesteps"
    assert ours.timesteps.dtype == eager.timesteps.dtype and len(ours.timesteps) == len(eager.timesteps), what
    if name != TCD:
        check(ours.timesteps.double(), truth.timesteps.double(), eager.timesteps.double(), f"{what} timesteps")
        check(ours.sigmas.double(), truth.sigmas.double(), eager.sigmas.double(), f"{what} sigmas")
    _run_steps(name, what, truth, eager, ours, begin, step_kw, torch.float32)
    return "compared"


def run_float64(name, config, kw, begin, step_kw):
    """Ours in float64 against diffusers in float64 at the float64 floor (module docstring)."""
    noisy = step_kw.get("s_churn", 0) > 0 or config.get("algorithm_type") == "sde-dpmsolver++"
    pair = None if noisy else both_accept(
        lambda: _make(getattr(diffusers, name), config, kw, truth=True, float32_draws=False),
        lambda truth: _make(getattr(dd, name), truth.config, kw))
    if pair is None:
        return
    truth, ours = pair
    if name != TCD:
        ours.sigmas_host = truth.sigmas.double().tolist()  # no table is built before the first step
    _run_steps(name, f"{name} {config} {kw} begin={begin} {step_kw}", truth, None, ours, begin, step_kw, F64)

#----------------------------------------------------------------------------
# Tests.

CASES = [(name, k) for name in NAMES for k in range(DRAWS)]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name, k", CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_fuzzed_config_matches_diffusers(name, k):
    config, kw, begin, step_kw = draw_case(name, k)
    run_case(name, config, kw, begin, step_kw)
    run_float64(name, config, kw, begin, step_kw)


PINNED = [  # (name, config, set_timesteps kwargs, begin, step kwargs, outcome): the refusals' edges, pinned (the
    # fuzzing found no mismatch to pin)
    (DPM, {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}, {"num_inference_steps": 8}, 0, {},
     "refused solver_order"),
    (DPM, {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}, {"num_inference_steps": 2}, 0, {}, "compared"),
    (DPM, {"algorithm_type": "sde-dpmsolver++", "final_sigmas_type": "sigma_min"}, {"num_inference_steps": 5}, 0, {},
     "refused final_sigmas_type"),
    (EULER, {"sigma_min": 0.5, "sigma_max": 0.2}, {"num_inference_steps": 4}, 0, {}, "refused sigma_max"),
    (EULER, {"sigma_schedule": "exponential"}, {"num_inference_steps": 6}, 2, {"s_churn": 40.0}, "compared"),
    (TCD, {"rescale_betas_zero_snr": True}, {"num_inference_steps": 4}, 0, {"eta": 0.3},
     "refused rescale_betas_zero_snr"),
    (TCD, {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}, {"num_inference_steps": 4}, 1,
     {"eta": 1.0}, "compared"),
    # 0.7*t' floors differently in float32 and float64 at 700, 350, 90
    (TCD, {}, {"timesteps": [999, 700, 350, 90]}, 0, {"eta": 0.3}, "compared"),
]


@pytest.mark.parametrize("name, config, kw, begin, step_kw, outcome", PINNED,
                         ids=[f"{i}" for i in range(len(PINNED))])
def test_pinned(name, config, kw, begin, step_kw, outcome):
    assert run_case(name, config, kw, begin, step_kw) == outcome
    run_float64(name, config, kw, begin, step_kw)


def test_draws_cover_every_key():
    """Every key of each diffusers class is drawn with a non-default value somewhere."""
    for name in NAMES:
        missing = undrawn_keys(name, (draw_case(name, k)[0] for k in range(DRAWS)))
        assert not missing, f"{name}: keys never drawn: {missing}"
