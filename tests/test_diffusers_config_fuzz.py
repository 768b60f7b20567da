"""Differential fuzzing of the diffusers drop-in schedulers against diffusers itself, over the configs users load.

Users write ``pipe.scheduler = diffkern.diffusers.X.from_config(pipe.scheduler.config)`` with any config from the hub,
so every config key the diffusers class accepts is drawn here (seeded, deterministic): beta schedules and trained
betas, odd ``num_train_timesteps``, spacings and offsets, prediction types, clipping, final sigmas, Karras /
exponential / beta sigmas, ``sigma_min``/``sigma_max``, solver knobs, variance types, zero terminal SNR, plus keys
that only a compatible class takes (``from_config`` keeps them) and odd step counts, begin indices and step knobs.

For each draw, one of:

- diffusers refuses the config (at construction or ``set_timesteps``): ours must refuse it too, with a ValueError;
- the config holds a key/value diffkern documents as unsupported (:func:`refusals`): ours must raise a ValueError
  naming ``key=value`` at ``from_config``/``set_timesteps`` (never a silent change of the maths);
- otherwise ``set_timesteps`` (timesteps, sigmas, init_noise_sigma), ``scale_model_input`` and every step's
  prev_sample / pred_original_sample must match diffusers under the project's rule
  (:func:`diffkern.testing.assert_matches_reference`: at most twice diffusers' own float32 error against diffusers
  run in float64, plus 2e-6 relative; the truth and its justification are those of test_diffusers_schedulers.py).

A quarter of the accepted configs also go through ``save_pretrained``/``from_pretrained`` (ours and diffusers').
Draws that fail the rule only through a documented numerical limitation of the fused rows (:func:`known_numerics`)
are expected failures; each bug the fuzzing found is also pinned by a fixed config (``REGRESSIONS``).
"""
import contextlib
import inspect
import math
import random

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.ops import coefs  # noqa: E402
from diffkern.testing import make_tensor  # noqa: E402
from dropin_fuzz import (BETA_RANGES, SCHEDULE_CHOICES, check, draw_keys, init_keys, refusal_outcome,  # noqa: E402
                         refuses, round_trip, trained_betas, undrawn_keys)
from test_diffusers_schedulers import diffusers_float64, scheduler_module  # noqa: E402

NAMES = ("DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
         "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
         "KDPM2AncestralDiscreteScheduler")
DRAWS = 80  # configs per class
SHAPE = (2, 3, 4, 4)
INF = float("inf")
X0_PREDICTIONS = ("sample", "original_sample")

#----------------------------------------------------------------------------
# The config space.

CHOICES = {
    **SCHEDULE_CHOICES,
    "clip_sample": [True, False],
    "clip_sample_range": [0.5, 1.0, 3.0],
    "set_alpha_to_one": [True, False],
    "final_sigmas_type": ["zero", "sigma_min"],
    "use_karras_sigmas": [True, False],
    "use_exponential_sigmas": [True, False],
    "sigma_min": [None, 0.03, 0.3],
    "sigma_max": [None, 5.0, 80.0],
    "timestep_type": ["discrete", "continuous"],
    "interpolation_type": ["linear", "log_linear"],
    "lower_order_final": [True, False],
    "euler_at_final": [True, False],
    "solver_order": [1, 2, 2, 3],
    "algorithm_type": ["dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver", "deis"],
    "solver_type": ["midpoint", "heun", "logrho"],
    "flow_shift": [1.0, 3.0],
    "lambda_min_clipped": [-INF, -5.1],
    "dynamic_thresholding_ratio": [0.9, 0.995],
    "sample_max_value": [1.0, 2.0],
}
VARIANCE_TYPES = {"DDPMScheduler": ["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log",
                                    "learned_range", None],
                  "DPMSolverMultistepScheduler": [None, "learned_range", "fixed_small", "fixed_large"]}
# Keys whose non-default value is rare on the hub: drawn less often, so most draws reach the step comparison.
RARE = {"thresholding": [True], "rescale_betas_zero_snr": [True], "use_beta_sigmas": [True], "use_lu_lambdas": [True],
        "use_flow_sigmas": [True], "use_dynamic_shifting": [True]}
FOREIGN = {"sigma_min": [0.03, 0.3], "sigma_max": [5.0, 80.0], "clip_sample": [True], "use_karras_sigmas": [True],
           "final_sigmas_type": ["sigma_min"], "set_alpha_to_one": [False], "timestep_type": ["continuous"]}


def draw_case(name, k):
    """Draw (config, steps, begin, step_kw) number ``k`` of class ``name`` (deterministic)."""
    rng = random.Random(f"{name}/{k}")
    keys = init_keys(name)
    choices = dict(CHOICES, variance_type=VARIANCE_TYPES[name]) if "variance_type" in keys else CHOICES
    config = draw_keys(rng, keys, choices, RARE, 0.1)
    if rng.random() < 0.4:
        config["beta_start"], config["beta_end"] = rng.choice(BETA_RANGES)
    if rng.random() < 0.05:  # schedules only some diffusers classes define
        config["beta_schedule"] = rng.choice(["sigmoid", "laplace", "exp"])
    T = config.get("num_train_timesteps", keys["num_train_timesteps"])
    if rng.random() < 0.1:  # a trained table (increasing, as the real ones)
        lo, hi = rng.choice(BETA_RANGES)
        config["trained_betas"] = trained_betas(lo, hi, T)
    if rng.random() < 0.15:  # a key only a compatible class takes: from_config keeps it
        key = rng.choice(sorted(set(FOREIGN) - set(keys)) or ["sigma_min"])
        config[key] = rng.choice(FOREIGN[key])
    steps = rng.choice([1, 2, 3, 5, 7, 10, 16, T if T <= 100 else 25, T + 13 if T <= 100 else 50])
    order2 = name.startswith(("Heun", "KDPM2"))
    calls = 2 * steps - 1 if order2 else steps
    begin = 0
    if rng.random() < 0.25 and calls > 1:
        begin = rng.randrange(calls)
        begin -= begin % 2 if order2 else 0  # pipelines start at t_start * order
    step_kw = {}
    if name == "DDIMScheduler":
        step_kw = {"eta": rng.choice([0.0, 0.0, 0.3, 1.0]), "use_clipped_model_output": rng.random() < 0.3}
    elif name == "EulerDiscreteScheduler" and rng.random() < 0.4:
        step_kw = {"s_churn": rng.choice([0.5, 3.0]), "s_tmin": rng.choice([0.0, 0.3]),
                   "s_tmax": rng.choice([INF, 5.0]), "s_noise": rng.choice([1.0, 1.003])}
    return config, steps, begin, step_kw


def refusals(name, cfg, timesteps, steps):
    """(key, value) pairs of ``cfg`` (a full config) that diffkern documents as unsupported for ``name``, with
    ``steps`` inference steps (diffusers' ``timesteps``)."""
    out = []

    def no(key, bad):
        if key in cfg and bad(cfg[key]):
            out.append((key, cfg[key]))

    no("thresholding", bool)
    no("use_beta_sigmas", bool)
    no("beta_schedule", lambda v: v not in ("linear", "scaled_linear", "squaredcos_cap_v2")
       and cfg["trained_betas"] is None)
    if name == "DDPMScheduler":
        no("variance_type", lambda v: v in ("fixed_large_log", "learned", "learned_range"))
    if name in ("DDIMScheduler", "DDPMScheduler"):  # diffusers indexes alpha-bar past its end at the first step
        no("steps_offset", lambda v: int(timesteps.max()) >= cfg["num_train_timesteps"])
    if name in ("DDIMScheduler", "DDPMScheduler") and cfg["prediction_type"] == "epsilon":
        # alpha-bar(T-1) = 0: diffusers divides by 0 at that timestep
        no("rescale_betas_zero_snr", lambda v: v and cfg["num_train_timesteps"] - 1 in timesteps.tolist())
    if name == "DPMSolverMultistepScheduler":
        no("algorithm_type", lambda v: v in ("dpmsolver", "sde-dpmsolver"))
        for key in ("use_lu_lambdas", "use_flow_sigmas", "use_dynamic_shifting"):
            no(key, bool)
        no("lambda_min_clipped", lambda v: v != -INF and cfg["timestep_spacing"] == "trailing")
        # N = T: "linspace"/"leading" repeat a timestep (diffusers returns NaN or raises at a step)
        plain = not cfg["use_karras_sigmas"] and not cfg["use_exponential_sigmas"]
        no("timestep_spacing", lambda v: plain and (steps > cfg["num_train_timesteps"]
                                                    or v != "trailing" and steps == cfg["num_train_timesteps"]
                                                    or len(set(timesteps.tolist())) < len(timesteps)))
        # "leading" + steps_offset past T - 1 to repeated (clamped) sigmas: diffusers divides by 0
        no("steps_offset", lambda v: cfg["timestep_spacing"] == "leading" and not cfg["use_karras_sigmas"]
           and not cfg["use_exponential_sigmas"] and int((timesteps >= cfg["num_train_timesteps"] - 1).sum()) > 1)
    if name.startswith(("Euler", "Heun", "KDPM2")):  # N > T: "leading"/"trailing" repeat timesteps
        no("timestep_spacing", lambda v: v != "linspace" and steps > cfg["num_train_timesteps"])
    if name.startswith("KDPM2"):  # diffusers raises NotImplementedError for them at the first step
        no("prediction_type", lambda v: v in ("sample", "original_sample"))
    if name == "EulerDiscreteScheduler":
        no("interpolation_type", lambda v: v != "linear")
    return out

#----------------------------------------------------------------------------
# Running one draw.


@contextlib.contextmanager
def _no_schedule_at_init(cls):
    """diffusers' Heun/KDPM2 constructors run ``set_timesteps(num_train_timesteps)`` (KDPM2: ~2 s of Python loops
    for T = 1000); every scheduler here gets its own ``set_timesteps`` right after, so that one makes 2 steps."""
    if "set_timesteps" not in cls.__dict__ or cls.__module__.startswith("diffkern"):
        yield
        return
    real = cls.__dict__["set_timesteps"]
    cls.set_timesteps = lambda self, steps, *args, **kwargs: real(self, min(steps, 2), *args, **kwargs)
    try:
        yield
    finally:
        cls.set_timesteps = real


def _scheduler(cls, config, steps, float64_module=None):
    with contextlib.ExitStack() as stack:
        if float64_module is not None:
            stack.enter_context(diffusers_float64(float64_module))
        with _no_schedule_at_init(cls):
            sched = cls.from_config(config)
        sched.set_timesteps(steps)
    return sched


def _step(sched, m, t, x, kw, generator):
    kw = dict(kw)
    if "generator" in inspect.signature(sched.step).parameters:
        kw["generator"] = generator
    return sched.step(m, t, x, **kw)


def _check_schedule(name, ours, truth, eager, what):
    assert ours.timesteps.dtype == eager.timesteps.dtype, f"{what}: timesteps dtype"
    expected, expected32 = truth.timesteps.cpu().double(), eager.timesteps.cpu().double()
    n = len(ours.timesteps)
    if name in ("DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler") and len(expected) > n:
        # diffusers' float arange(T, 0, -T/N) ("trailing") can yield N+1 values, the last t = -1: not a timestep
        assert (expected[n:] < 0).all() and len(expected) == n + 1, f"{what}: timesteps {expected} vs {ours.timesteps}"
        expected, expected32 = expected[:n], expected32[:n]
    # compared in their own dtype (integer ones in float64): float32 timesteps get the float32 floor
    dtype = ours.timesteps.dtype if ours.timesteps.is_floating_point() else torch.float64
    check(ours.timesteps.cpu().to(dtype), expected, expected32.to(dtype), f"{what} timesteps")
    assert math.isclose(float(ours.init_noise_sigma), float(truth.init_noise_sigma), rel_tol=2e-6), \
        f"{what}: init_noise_sigma {float(ours.init_noise_sigma)} vs {float(truth.init_noise_sigma)}"
    if hasattr(eager, "sigmas") and name != "DDIMScheduler" and len(expected) == len(truth.timesteps):
        assert ours.sigmas.shape == eager.sigmas.shape, f"{what}: sigmas {ours.sigmas.shape} vs {eager.sigmas.shape}"
        check(ours.sigmas, truth.sigmas.double(), eager.sigmas, f"{what} sigmas")
    for attr in ("sigmas_interpol", "sigmas_up", "sigmas_down"):
        if hasattr(eager, attr):
            check(getattr(ours, attr), getattr(truth, attr).double(), getattr(eager, attr), f"{what} {attr}")
    return n


def run_case(name, config, steps, begin, step_kw, tmp_path=None):
    cls, ours_cls, module = getattr(diffusers, name), getattr(dd, name), scheduler_module(name)
    what = f"{name} {config} steps={steps} begin={begin} {step_kw}"
    ours_config = config
    if config.get("algorithm_type") == "deis" and config.get("final_sigmas_type", "zero") == "zero":
        # diffusers maps "deis" to "dpmsolver++" but checks final_sigmas_type against the unmapped name and raises
        # (a DEIS config cannot load into its DPM-Solver): ours loads it; compare with the mapped config
        config = dict(config, algorithm_type="dpmsolver++")
    x0_via_eps = name == "EulerAncestralDiscreteScheduler" and config.get("prediction_type") in X0_PREDICTIONS
    if x0_via_eps:
        # diffusers' Euler-ancestral raises for x0 predictions at the first step, ours takes them: the oracle is its
        # epsilon mode fed eps = (x - x0)/sigma, the same step
        config = dict(config, prediction_type="epsilon")
    their_error, eager = refuses(lambda: _scheduler(cls, config, steps))
    source = eager.config if eager is not None else config
    if ours_config is not config:
        source = dict(source, **{k: ours_config[k] for k in ("algorithm_type", "prediction_type") if k in ours_config})
    our_error, ours = refuses(lambda: _scheduler(ours_cls, source, steps))
    outcome = refusal_outcome(what, their_error, our_error, lambda: refusals(
        name, dict(init_keys(name), **dict(eager.config)), eager.timesteps, steps))
    if outcome is not None:
        return outcome
    truth = _scheduler(cls, config, steps, module)
    n = _check_schedule(name, ours, truth, eager, what)
    for s in (truth, eager, ours):
        if hasattr(s, "set_begin_index"):  # diffusers' DDIM/DDPM read the timestep value instead
            s.set_begin_index(begin)
    gens = [torch.Generator().manual_seed(5) for _ in range(3)]
    x = make_tensor(SHAPE, torch.float64, seed=1) * float(truth.init_noise_sigma)
    for k in range(begin, n):
        t64, t32, t = truth.timesteps[k], eager.timesteps[k], ours.timesteps[k]
        m = make_tensor(SHAPE, torch.float64, seed=100 + k)
        x32, m32 = x.float(), m.float()
        at = f"{what} call {k} (t={float(t):g})"
        with diffusers_float64(module):
            check(ours.scale_model_input(x32, t), truth.scale_model_input(x, t64), eager.scale_model_input(x32, t32),
                  f"{at} scale_model_input")
            sigma = truth.sigmas[truth.step_index] if x0_via_eps else None
            ref = _step(truth, (x - m) / sigma if x0_via_eps else m, t64, x, step_kw, gens[0])
        eps32 = (x32 - m32) / eager.sigmas[eager.step_index] if x0_via_eps else m32
        out = _step(eager, eps32, t32, x32, step_kw, gens[1])
        got = _step(ours, m32, t, x32, step_kw, gens[2])
        check(got.prev_sample, ref.prev_sample, out.prev_sample, f"{at} prev_sample")
        if getattr(out, "pred_original_sample", None) is not None:
            check(got.pred_original_sample, ref.pred_original_sample, out.pred_original_sample,
                  f"{at} pred_original_sample")
        x = ref.prev_sample
    if tmp_path is not None:
        round_trip(what, ours_cls, cls, ours, tmp_path, loading=_no_schedule_at_init(cls))
    return "compared"

#----------------------------------------------------------------------------
# Known numerical limitations: a draw in one of these classes may fail the rule (it is then an expected failure
# carrying the measured errors); every other draw must pass.

GAIN = 20.0  # corrector amplification above which the fused two-call rows lose to diffusers' rounding
CONVERSION_GAIN = 5.0  # 1/sqrt(alpha_bar) above which the fused eps conversion loses to diffusers' (clipped x0)


def known_numerics(name, config, steps):
    """Why this draw may fail the rule for a documented numerical reason of the fused rows, or None.

    - Heun / KDPM2 second calls: the row ``x' = (1 + k) x2 - k D2 + c H`` (diffkern.coef_tables) eliminates the
      first call's input through the stored slope; when sigma_mid << sigma (k = (target - sigma)/sigma_mid large)
      the float32 products (1 + k) x2 and k D2 are |k| times larger than x', where diffusers forms x2 - D2 first.
    - KDPM2-ancestral: diffusers' sigma_down = sqrt(s_next^2 - s_up^2) cancels (s/s_next)^2-fold, so its float64
      run (the truth) loses that many digits: beyond 2**52/2e6 the truth is not accurate to the float32 floor.
    - DDIM/DDPM epsilon prediction with clipping: the fused conversion D = P x + Q m with P = 1/sqrt(alpha_bar) rounds
      two products P times larger than the clipped x0 (diffusers rounds x - sqrt(1 - alpha_bar) m first).
    """
    try:
        ours = getattr(dd, name).from_config(config)
        ours.set_timesteps(steps)
    except ValueError:
        return None
    if name.startswith(("Heun", "KDPM2")):
        _, plan = ours._plan(("heun",) if name.startswith("Heun") else ours._key)
        n = len(ours.sigmas_host) - 1
        gain = float(plan.table[plan.corrector_row:plan.corrector_row + n, coefs.A].abs().max())
        if gain > GAIN:
            return f"two-call corrector amplification {gain:.3g} > {GAIN}"
    if name == "KDPM2AncestralDiscreteScheduler":
        s = [v for v in ours.sigmas_host if v > 0]
        kappa = max((a / b) ** 2 for a, b in zip(s[:-1], s[1:])) if len(s) > 1 else 1.0
        if kappa * 2.0 ** -52 > 2e-6:
            return f"diffusers' float64 sigma_down cancels {kappa:.3g}-fold"
    if name in ("DDIMScheduler", "DDPMScheduler") and ours.config.clip_sample \
            and ours.config.prediction_type == "epsilon":
        gain = max(float(ours.alphas_cumprod[int(t)]) ** -0.5 for t in ours.timesteps)
        if gain > CONVERSION_GAIN:
            return f"eps conversion gain {gain:.3g} > {CONVERSION_GAIN} with clipping"
    return None

#----------------------------------------------------------------------------
# Tests.

CASES = [(name, k) for name in NAMES for k in range(DRAWS)]


@pytest.mark.parametrize("name, k", CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_fuzzed_config_matches_diffusers(name, k, tmp_path):
    config, steps, begin, step_kw = draw_case(name, k)
    try:
        run_case(name, config, steps, begin, step_kw, tmp_path / "sched" if k % 4 == 0 else None)
    except AssertionError as exc:
        why = known_numerics(name, config, steps)
        if why is None:
            raise
        pytest.xfail(f"known numerical limitation ({why}): {exc}")


def test_draws_cover_every_key():
    """Every key of every diffusers class is drawn with a non-default value somewhere (keys not drawn are listed)."""
    for name in NAMES:
        missing = undrawn_keys(name, (draw_case(name, k)[0] for k in range(DRAWS)), exempt=("time_shift_type",))
        assert not missing, f"{name}: keys never drawn: {missing}"
