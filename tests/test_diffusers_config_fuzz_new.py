"""Differential fuzzing of the UniPC and LCM drop-ins against diffusers, over the configs users load (the harness of
dropin_fuzz.py and test_diffusers_config_fuzz.py, whose helpers this file imports).

Every key of diffusers 0.42.1's ``UniPCMultistepScheduler`` / ``LCMScheduler`` is drawn (seeded, deterministic):
beta schedules and trained betas, odd ``num_train_timesteps``, spacings and offsets, prediction types, Karras /
exponential sigmas with ``sigma_min``/``sigma_max``, ``final_sigmas_type``, zero terminal SNR, UniPC's orders, solver
types (DPM-Solver names load as bh2), ``predict_x0``, ``lower_order_final`` and ``disable_corrector`` lists, LCM's
``original_inference_steps``, ``timestep_scaling``, ``strength`` and custom timesteps, plus step counts from 1 to
N = T and ``set_begin_index``. For each draw, one of:

- diffusers refuses it (at construction or ``set_timesteps``): ours must refuse it too, with a ValueError;
- it holds what diffkern documents as unsupported (:func:`refusals`, the classes' docstrings): ours must raise a
  ValueError naming ``key=value``; nowhere else may ours refuse;
- otherwise the schedule and every step's outputs (UniPC: prev_sample; LCM: prev_sample and denoised) must match
  diffusers under the project's rule in float32 (diffusers in float64 the truth, diffusers in float32 the yardstick),
  and ours in float64 must match diffusers in float64 on the same inputs to the float64 floor.

The float64 truths. UniPC: diffusers computes its step coefficients (lambda, h, B(h), the rho's) from its ``sigmas``
tensor, which its ``set_timesteps`` makes float32 even in a float64 module; the truth therefore gets those sigmas
upcast (the same float32-rounded values, then float64 arithmetic). In float32 its ``h_phi_k/hh - 1`` recursion cancels
~1/h-fold per order, so a truth left in float32 would be as wrong as diffusers32. Our float64 run is given those same
rounded sigmas (``sigmas_host``), so only rounding separates it from the truth. LCM: as test_lcm.py
(:func:`test_lcm.float64_lcm`: default dtype float64 too, so that ``c_skip``/``c_out`` are float64).
"""
import importlib
import math
import random

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.testing import make_tensor  # noqa: E402
from dropin_fuzz import (BETA_RANGES, both_accept, check, draw_keys, init_keys, refusal_outcome, refuses,  # noqa: E402
                         round_trip, trained_betas, undrawn_keys)
from test_diffusers_config_fuzz import CHOICES, SHAPE, _check_schedule, _step  # noqa: E402
from test_diffusers_schedulers import diffusers_float64, scheduler_module  # noqa: E402
from test_lcm import float64_lcm  # noqa: E402

NAMES = ("UniPCMultistepScheduler", "LCMScheduler")
DRAWS = 120  # configs per class
LCM_MODULE = importlib.import_module("diffusers.schedulers.scheduling_lcm")
F64 = torch.float64
UNIPC = "UniPCMultistepScheduler"
SIGMA_MIN = {"final_sigmas_type": "sigma_min"}

#----------------------------------------------------------------------------
# The config space.

NEW_CHOICES = dict(
    {k: v for k, v in CHOICES.items() if k != "clip_sample"},  # LCM refuses clipping: a rare key here
    prediction_type=["epsilon", "v_prediction", "sample"],
    solver_order=[1, 2, 2, 2, 3],
    rescale_betas_zero_snr=[False, True],
    solver_type=["bh1", "bh1", "bh2", "midpoint", "heun", "logrho"],
    predict_x0=[True, False],
    disable_corrector=[[], [0], [1, 3], [0, 2, 4, 6, 8], list(range(40))],
    original_inference_steps=[50, 4, 20, 100, 1000],
    timestep_scaling=[10.0, 1.0, 3.5],
    sigma_min=[None, 0.03, 0.3],
    sigma_max=[None, 5.0, 80.0],
)
RARE = {"thresholding": [True], "use_beta_sigmas": [True],
        "use_flow_sigmas": [True], "use_dynamic_shifting": [True], "clip_sample": [True],
        "shift_terminal": [0.2], "solver_p": ["ddim"], "prediction_type": ["flow_prediction"]}
FOREIGN = {"use_karras_sigmas": [True], "final_sigmas_type": ["sigma_min"], "clip_sample": [True],
           "solver_order": [3], "timestep_type": ["continuous"]}


def draw_case(name, k):
    """Draw (config, set_timesteps kwargs, begin) number ``k`` of class ``name`` (deterministic)."""
    rng = random.Random(f"new/{name}/{k}")
    keys = init_keys(name)
    config = draw_keys(rng, keys, NEW_CHOICES, RARE, 0.04)
    if (config.get("predict_x0") is False or config.get("solver_type") == "bh1"
            or config.get("lower_order_final") is False) and rng.random() < 0.75:
        config["final_sigmas_type"] = "sigma_min"  # where diffusers' samples are finite (refusals)
    if config.get("solver_p") == "ddim":
        config["solver_p"] = diffusers.DDIMScheduler()
    if rng.random() < 0.4:
        config["beta_start"], config["beta_end"] = rng.choice(BETA_RANGES)
    if rng.random() < 0.04:  # schedules no diffusers class here defines
        config["beta_schedule"] = rng.choice(["sigmoid", "laplace"])
    T = config.get("num_train_timesteps", keys["num_train_timesteps"])
    if rng.random() < 0.1:  # a trained table (increasing, as the real ones)
        lo, hi = rng.choice(BETA_RANGES)
        config["trained_betas"] = trained_betas(lo, hi, T)
    if rng.random() < 0.1:  # a key only a compatible class takes: from_config keeps it
        key = rng.choice(sorted(set(FOREIGN) - set(keys)))
        config[key] = rng.choice(FOREIGN[key])
    if name == "LCMScheduler":
        kw = _draw_lcm_schedule(rng, config, T)
        n = len(kw.get("timesteps") or ()) or kw["num_inference_steps"]
    else:
        # 13, 29, 61: diffusers' "trailing" arange overshoots to N + 1 timesteps for T = 999, 100, 1000
        n = rng.choice([1, 2, 3, 4, 7, 10, 13, 16, 25, 29, 61, T - 1 if T <= 100 else 250, T, T + 13])
        if T > 100 and n >= T - 1 and rng.random() < 0.7:  # N ~ T = 1000 is slow: a few draws only
            n = rng.choice([2, 5, 8])
        kw = {"num_inference_steps": n}
    begin = rng.randrange(n) if rng.random() < 0.25 and n > 1 else 0
    return config, kw, begin


def _draw_lcm_schedule(rng, config, T):
    original = config.get("original_inference_steps", 50)
    kw = {}
    if rng.random() < 0.3:
        original = kw["original_inference_steps"] = rng.choice([4, 10, 50, 37, T])
    strength = kw["strength"] = rng.choice([1.0, 1.0, 1.0, 0.6, 0.25])
    if rng.random() < 0.2:  # custom timesteps: decreasing, mostly on the skipping-step schedule
        step = max(T // max(original, 1), 1)
        start = T - 1 if rng.random() < 0.8 else rng.randrange(T // 2, T)
        count = rng.choice([1, 2, 3, 5, 8])
        values = sorted({start} | {rng.randrange(1, max(original, 2)) * step - 1 for _ in range(count - 1)}
                        | ({0} if rng.random() < 0.2 else set()), reverse=True)
        kw["timesteps"] = [v for v in values if 0 <= v <= start]
    else:
        top = max(int(original * strength), 1)
        kw["num_inference_steps"] = rng.choice([1, 2, 3, 4, 6, 8, top, top + 1])
    return kw


def refusals(name, cfg, kw, timesteps, alphas_cumprod):
    """(key, value) pairs of ``cfg`` (a full config, after diffusers' own mapping) and of the ``set_timesteps``
    arguments ``kw`` that diffkern documents as unsupported for ``name``; diffusers made ``timesteps`` of them."""
    out = []

    def no(key, bad, source=cfg):
        if key in source and bad(source[key]):
            out.append((key, source[key]))

    no("thresholding", bool)
    no("beta_schedule", lambda v: v not in ("linear", "scaled_linear", "squaredcos_cap_v2")
       and cfg["trained_betas"] is None)
    if name == "LCMScheduler":
        no("clip_sample", bool)
        no("prediction_type", lambda v: v not in ("epsilon", "v_prediction", "sample"))
        # alpha-bar(T-1) = 0: the epsilon conversion divides by 0
        no("rescale_betas_zero_snr", lambda v: v and cfg["prediction_type"] == "epsilon" and len(timesteps) > 0
           and float(alphas_cumprod[timesteps].min()) == 0.0)
        no("strength", lambda v: len(timesteps) == 0, kw)  # a custom schedule cut to nothing
        return out
    n, T, zero = len(timesteps), cfg["num_train_timesteps"], cfg["final_sigmas_type"] == "zero"
    no("solver_order", lambda v: v not in (1, 2, 3))
    no("prediction_type", lambda v: v == "flow_prediction")
    for key in ("solver_p", "use_beta_sigmas", "use_flow_sigmas", "use_dynamic_shifting", "shift_terminal"):
        no(key, bool)
    # with a last step to sigma = 0, diffusers' samples are NaN / inf there
    no("predict_x0", lambda v: not v and zero)
    no("solver_type", lambda v: v == "bh1" and zero)
    no("lower_order_final", lambda v: not v and zero and cfg["solver_order"] >= 2 and n >= 2)
    # a repeated sigma (N >= T, or "leading" offsets clamped to T - 1): diffusers' multistep step after that step
    # of length 0 divides by 0
    ts = timesteps.tolist()
    repeats = len(set(ts)) < n or sum(t >= T - 1 for t in ts) > 1
    if not cfg["use_karras_sigmas"] and not cfg["use_exponential_sigmas"] and cfg["solver_order"] >= 2 and repeats:
        leading = cfg["timestep_spacing"] == "leading" and kw["num_inference_steps"] < T
        out.append(("steps_offset", cfg["steps_offset"]) if leading else ("timestep_spacing", cfg["timestep_spacing"]))
    return out

#----------------------------------------------------------------------------
# Running one draw.


def _module(name):
    return LCM_MODULE if name == "LCMScheduler" else scheduler_module(name)


def _make(cls, config, kw, truth=False):
    """A scheduler of ``cls`` with ``set_timesteps(**kw)``; ``truth``: diffusers' class in float64."""
    name = cls.__name__
    if truth and name == "LCMScheduler":
        with float64_lcm(float32_draws=True):
            sched = cls.from_config(config)
            sched.set_timesteps(**kw)
        return sched
    if truth:
        with diffusers_float64(_module(name)):
            sched = cls.from_config(config)
            sched.set_timesteps(**kw)
        sched.sigmas = sched.sigmas.double()  # float64 step coefficients (module docstring)
        return sched
    sched = cls.from_config(config)
    sched.set_timesteps(**kw)
    return sched


def _truth_context(name, float32_draws=True):
    return float64_lcm(float32_draws) if name == "LCMScheduler" else diffusers_float64(_module(name))


def run_case(name, config, kw, begin, tmp_path=None):
    """Check one draw (module docstring); returns what happened: "diffusers refuses", "refused KEY" or
    "compared"."""
    cls, ours_cls = getattr(diffusers, name), getattr(dd, name)
    what = f"{name} {config} {kw} begin={begin}"
    their_error, eager = refuses(lambda: _make(cls, config, kw))
    source = eager.config if eager is not None else config
    our_error, ours = refuses(lambda: _make(ours_cls, source, kw))

    def nonfinite_in_diffusers(refused):
        if {k for k, _ in refused} <= NONFINITE and len(eager.timesteps) <= 100:
            assert not _finite_loop(eager), f"{what}: refused {refused}, but diffusers' samples are finite"

    outcome = refusal_outcome(what, their_error, our_error, lambda: refusals(
        name, dict(init_keys(name), **dict(eager.config)), kw, eager.timesteps, eager.alphas_cumprod),
        on_refused=nonfinite_in_diffusers)
    if outcome is not None:
        return outcome
    truth = _make(cls, config, kw, truth=True)
    assert ours.num_inference_steps == eager.num_inference_steps, f"{what}: num_inference_steps"
    n = _check_schedule(name, ours, truth, eager, what)
    _run_steps(name, what, truth, eager, ours, n, begin, torch.float32)
    if tmp_path is not None:
        round_trip(what, ours_cls, cls, ours, tmp_path)
    return "compared"


# refusals documented as "diffusers' samples are not finite there": checked on diffusers' float32 loop
NONFINITE = {"predict_x0", "solver_type", "lower_order_final", "timestep_spacing", "steps_offset",
             "rescale_betas_zero_snr"}


def _finite_loop(sched):
    """Whether diffusers' loop (``sched``, after ``set_timesteps``) keeps finite samples on random inputs."""
    sched.set_begin_index(0)  # repeated timesteps: diffusers would start at the second occurrence
    x = make_tensor(SHAPE, seed=1)
    for k, t in enumerate(sched.timesteps):
        x = _step(sched, make_tensor(SHAPE, seed=100 + k), t, x, {}, torch.Generator().manual_seed(5)).prev_sample
    return bool(torch.isfinite(x).all())


def _run_steps(name, what, truth, eager, ours, n, begin, dtype):
    """Step the three schedulers from ``begin`` on the truth's states and fresh model outputs; ours in ``dtype``
    (float64: ``eager`` is None and the truth is the yardstick too)."""
    for s in (truth, eager, ours):
        if s is not None:
            s.set_begin_index(begin)
    gens = [torch.Generator().manual_seed(5) for _ in range(3)]
    x = make_tensor(SHAPE, F64, seed=1)
    for k in range(begin, n):
        t64, t = truth.timesteps[k], ours.timesteps[k]
        m = make_tensor(SHAPE, F64, seed=100 + k)
        at = f"{what} call {k} (t={float(t):g}) [{dtype}]"
        with _truth_context(name, float32_draws=eager is not None):
            ref = _step(truth, m, t64, x, {}, gens[0])
        got = _step(ours, m.to(dtype), t, x.to(dtype), {}, gens[2])
        if eager is None:
            out = ref
        else:
            out = _step(eager, m.float(), eager.timesteps[k], x.float(), {}, gens[1])
        check(got.prev_sample, ref.prev_sample, out.prev_sample, f"{at} prev_sample")
        if getattr(out, "denoised", None) is not None:
            check(got.denoised, ref.denoised, out.denoised, f"{at} denoised")
        x = ref.prev_sample


def run_float64(name, config, kw, begin):
    """Ours in float64 against diffusers in float64 (its own sigmas for ours too, see the module docstring), at the
    float64 floor; nothing when the config is refused (:func:`run_case` checks that)."""
    cls, ours_cls = getattr(diffusers, name), getattr(dd, name)
    make_truth = _make_lcm64 if name == "LCMScheduler" else lambda *a: _make(*a, truth=True)
    pair = both_accept(lambda: make_truth(cls, config, kw), lambda truth: _make(ours_cls, truth.config, kw))
    if pair is None:
        return
    truth, ours = pair
    if name != "LCMScheduler":
        ours.sigmas_host = truth.sigmas.tolist()  # no table is built before the first step
    _run_steps(name, f"{name} {config} {kw} begin={begin}", truth, None, ours, len(ours.timesteps), begin, F64)


def _make_lcm64(cls, config, kw):
    with float64_lcm(float32_draws=False):
        sched = cls.from_config(config)
        sched.set_timesteps(**kw)
    return sched

#----------------------------------------------------------------------------
# Known limit: where diffusers' float64 run is not accurate to the float64 floor, the float64 comparison may fail (an
# expected failure carrying the measured errors; the float32 comparison still applies).

TRUTH_FLOOR = 1e-12  # the float64 floor of diffkern.testing


def truth_limit(name, config, kw):
    """Why diffusers' float64 UniPC may be off by more than the float64 floor on this draw, or None.

    Its noise-prediction step (``predict_x0=False``) is ``alpha_t/alpha_s*x - sigma_t*expm1(h)*eps``, whose two terms
    are alpha_t/alpha_s times larger than their difference once eps is formed from x (v or x0 predictions); its
    e^h comes from float64 log-alphas and log-sigmas, |lambda| ulps off. Zero terminal SNR (sigma 4096, alpha 2.4e-4)
    makes that 4096*13*2**-53 = 6e-12 relative: diffusers' float64 step is then 1.3e-11 from an mpmath evaluation,
    ours 3.6e-13 (:func:`test_float64_truth_limit_is_diffusers_own_error`).
    """
    if name != UNIPC:
        return None
    error, ours = refuses(lambda: _make(dd.UniPCMultistepScheduler, config, kw))
    if error is not None or ours.config.predict_x0:
        return None
    s = ours.sigmas_host
    gain = max((math.sqrt((a * a + 1) / (b * b + 1)) * (abs(math.log(a)) + abs(math.log(b)))
                for a, b in zip(s[:-1], s[1:]) if b > 0), default=0.0)
    if gain * 2.0 ** -53 <= TRUTH_FLOOR:
        return None
    return f"noise-prediction cancellation alpha_t/alpha_s*|lambda| = {gain:.3g} > {TRUTH_FLOOR * 2 ** 53:.3g}"


def test_float64_truth_limit_is_diffusers_own_error():
    """The draw class :func:`truth_limit` excuses: against an mpmath evaluation (60 digits) of diffusers' first
    step, on its own float32-rounded sigmas, ours in float64 is within the float64 floor and diffusers' float64 is
    not (measured: 3.6e-13 and 1.3e-11 at sigma 4096)."""
    mpmath = pytest.importorskip("mpmath")
    config = {"num_train_timesteps": 37, "use_exponential_sigmas": True, "final_sigmas_type": "sigma_min",
              "rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "predict_x0": False}
    kw = {"num_inference_steps": 2}
    assert truth_limit(UNIPC, config, kw) is not None
    truth = _make(diffusers.UniPCMultistepScheduler, config, kw, truth=True)
    ours = _make(dd.UniPCMultistepScheduler, truth.config, kw)
    ours.sigmas_host = truth.sigmas.tolist()
    x, m = make_tensor(SHAPE, F64, seed=1), make_tensor(SHAPE, F64, seed=100)
    with _truth_context(UNIPC):
        ref = truth.step(m, truth.timesteps[0], x).prev_sample
    got = ours.step(m, ours.timesteps[0], x).prev_sample
    with mpmath.workdps(60):
        s0, s1 = (mpmath.mpf(v) for v in truth.sigmas.tolist()[:2])
        a0, a1 = 1 / mpmath.sqrt(s0 * s0 + 1), 1 / mpmath.sqrt(s1 * s1 + 1)
        e_h = s0 / s1  # e^h, h = lambda_1 - lambda_0, lambda = log(alpha/sigma_vp) = -log(s)
        exact = [float(a1 / a0 * xv - s1 * a1 * (e_h - 1) * (a0 * mv + s0 * a0 * xv))
                 for xv, mv in zip(map(mpmath.mpf, x.flatten().tolist()), map(mpmath.mpf, m.flatten().tolist()))]
    exact = torch.tensor(exact, dtype=F64).view_as(x)
    floor = TRUTH_FLOOR * float(exact.abs().max())
    assert float((got - exact).abs().max()) <= floor
    assert float((ref - exact).abs().max()) > floor

#----------------------------------------------------------------------------
# Tests.

CASES = [(name, k) for name in NAMES for k in range(DRAWS)]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name, k", CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_fuzzed_config_matches_diffusers(name, k, tmp_path):
    config, kw, begin = draw_case(name, k)
    run_case(name, config, kw, begin, tmp_path / "sched" if k % 4 == 0 else None)
    try:
        run_float64(name, config, kw, begin)
    except AssertionError as exc:
        why = truth_limit(name, config, kw)
        if why is None:
            raise
        pytest.xfail(f"known limit of the float64 truth ({why}): {exc}")


REGRESSIONS = [  # (name, config, set_timesteps kwargs, begin, outcome): the bugs the fuzzing found, pinned
    # 1. predict_x0=False fed an epsilon model at large sigma: the rows formed x - sigma*eps in the kernel, then
    #    (x - D)/sigma, in float32 (error 77 where diffusers32's is 0.58, at sigma(999) ~ 6e3)
    (UNIPC, dict(SIGMA_MIN, beta_schedule="squaredcos_cap_v2", predict_x0=False, lower_order_final=False),
     {"num_inference_steps": 2}, 0, "compared"),
    (UNIPC, dict(SIGMA_MIN, num_train_timesteps=999, beta_schedule="squaredcos_cap_v2", predict_x0=False,
                 sigma_min=0.03), {"num_inference_steps": 4}, 0, "compared"),
    (UNIPC, dict(SIGMA_MIN, beta_schedule="squaredcos_cap_v2", predict_x0=False, timestep_spacing="trailing"),
     {"num_inference_steps": 25}, 0, "compared"),
    # 2. zero terminal SNR floors alpha-bar(T-1) at 2**-24, above alpha-bar(T-2) for steep tables: sigma rises
    #    over the first step; refused as "steps_offset=0" (a sigma that is not strictly decreasing)
    (UNIPC, {"num_train_timesteps": 37, "trained_betas": [0.5] * 37, "rescale_betas_zero_snr": True,
             "timestep_spacing": "trailing"}, {"num_inference_steps": 10}, 0, "compared"),
    # 3. solver_order=1 on repeated timesteps (steps of length 0: the identity in diffusers, finite): refused
    (UNIPC, {"solver_order": 1, "num_train_timesteps": 100}, {"num_inference_steps": 113}, 0, "compared"),
    (UNIPC, {"solver_order": 1, "num_train_timesteps": 100, "timestep_spacing": "trailing"},
     {"num_inference_steps": 113}, 3, "compared"),
    (UNIPC, {"solver_order": 1, "num_train_timesteps": 37, "timestep_spacing": "leading", "steps_offset": 2},
     {"num_inference_steps": 36}, 0, "compared"),
    (UNIPC, {"num_train_timesteps": 100}, {"num_inference_steps": 100}, 0, "refused timestep_spacing"),  # order 2
    # 4. lower_order_final=False with solver_order=1 and a last step to sigma = 0 (first order: finite): refused
    (UNIPC, {"solver_order": 1, "lower_order_final": False}, {"num_inference_steps": 5}, 0, "compared"),
    # 5. "trailing" where diffusers' float arange overshoots: N + 1 timesteps, the last t = -1 (ours made N)
    (UNIPC, {"timestep_spacing": "trailing"}, {"num_inference_steps": 61}, 0, "compared"),
    (UNIPC, dict(SIGMA_MIN, timestep_spacing="trailing", num_train_timesteps=100, solver_type="bh1"),
     {"num_inference_steps": 29}, 2, "compared"),
]


@pytest.mark.parametrize("name, config, kw, begin, outcome", REGRESSIONS,
                         ids=[f"{i}" for i in range(len(REGRESSIONS))])
def test_regression(name, config, kw, begin, outcome):
    assert run_case(name, config, kw, begin) == outcome
    run_float64(name, config, kw, begin)


def test_draws_cover_every_key():
    """Every key of both diffusers classes is drawn with a non-default value somewhere, and the step counts reach 1
    and N = T, LCM's custom timesteps and strength, and begin indices."""
    for name in NAMES:
        draws = [draw_case(name, k) for k in range(DRAWS)]
        missing = undrawn_keys(name, (config for config, _, _ in draws), exempt=("time_shift_type",))
        assert not missing, f"{name}: keys never drawn: {missing}"
        seen = {f"kw:{key}" for _, kw, _ in draws for key, v in kw.items() if key != "strength" or v != 1.0}
        counts = {kw.get("num_inference_steps") for _, kw, _ in draws}
        assert any(begin for _, _, begin in draws) and 1 in counts, name
        if name == "LCMScheduler":
            assert {"kw:timesteps", "kw:strength", "kw:original_inference_steps"} <= seen
        else:
            assert 1000 in counts or 999 in counts
