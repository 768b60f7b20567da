"""Differential fuzzing of the ``PNDMScheduler`` drop-in against diffusers over every config key it takes.

Each seeded draw sets any of ``num_train_timesteps`` (odd ones too), the beta range and schedule (a foreign one now
and then), ``trained_betas``, ``skip_prk_steps``, ``set_alpha_to_one``, ``prediction_type`` (``sample`` now and then),
``timestep_spacing``, ``steps_offset`` (past the table now and then), a step count from 1 to T and a begin index.
Then one of:

- diffusers refuses it (construction, ``set_timesteps``, or a ``step``, where it indexes past its table or rejects
  the prediction type): ours must raise a ValueError by ``set_timesteps``;
- diffusers' float "trailing" arange overshoots to N + 1 timesteps, the last t = -1 (a documented deviation: ours has
  N, as the DDIM drop-in): ours must have diffusers' first N;
- otherwise every call matches diffusers under the project's rule in float32 (diffusers in float64 the truth,
  diffusers in float32 the yardstick) and ours in float64 matches diffusers in float64 to the float64 floor.
"""
import importlib
import random

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.testing import assert_matches_reference, make_tensor  # noqa: E402
from dropin_fuzz import trained_betas  # noqa: E402
from test_diffusers_schedulers import diffusers_float64  # noqa: E402

MODULE = importlib.import_module("diffusers.schedulers.scheduling_pndm")
DRAWS = 40
SHAPE = (2, 3, 5)


def draw_case(k):
    """(config, steps, begin) number ``k`` (deterministic)."""
    rng = random.Random(f"pndm/{k}")
    T = rng.choice([1000, 1000, 999, 100, 50])
    config = {"num_train_timesteps": T, "skip_prk_steps": rng.random() < 0.6,
              "set_alpha_to_one": rng.random() < 0.3,
              "prediction_type": rng.choice(["epsilon", "epsilon", "v_prediction"] + ["sample"] * (rng.random() < 0.1)),
              "timestep_spacing": rng.choice(["leading", "leading", "trailing", "linspace"]),
              "steps_offset": rng.choice([0, 0, 1, 3]) if rng.random() > 0.05 else T // 2}
    if rng.random() < 0.5:
        config["beta_start"], config["beta_end"] = rng.choice([(0.00085, 0.012), (1e-4, 0.02), (0.001, 0.04)])
    config["beta_schedule"] = rng.choice(["linear", "scaled_linear", "squaredcos_cap_v2"] if rng.random() > 0.05
                                         else ["sigmoid"])
    if rng.random() < 0.1:
        config["trained_betas"] = trained_betas(1e-4, 0.02, T)
    steps = rng.choice([1, 2, 3, 4, 5, 7, 10, 13, 29, 61] + [T] * (T <= 100))
    calls = steps + 1 if config["skip_prk_steps"] else steps + 9
    begin = rng.randrange(calls) if rng.random() < 0.25 and calls > 1 else 0
    return config, min(steps, T), begin


def _diffusers_run(config, steps, begin, dtype):
    """diffusers' schedule and outputs on the shared inputs (float64: in a float64 module), or the exception."""
    import contextlib

    ctx = diffusers_float64(MODULE) if dtype == torch.float64 else contextlib.nullcontext()
    try:
        with ctx:
            sched = diffusers.PNDMScheduler(**config)
            sched.set_timesteps(steps)
            outs = []
            x = make_tensor(SHAPE, dtype, seed=1)
            for k, t in enumerate(sched.timesteps[begin:]):
                x = sched.step(make_tensor(SHAPE, dtype, seed=100 + k), t, x).prev_sample
                outs.append(x)
    except (ValueError, IndexError, NotImplementedError, RuntimeError) as exc:
        return None, exc
    return sched.timesteps.tolist(), outs


def _ours_run(config, steps, begin, dtype, truth_outs):
    """Ours on the truth's states (the previous call's output, as a pipeline passes it), cast to ``dtype``."""
    sched = dd.PNDMScheduler(**config)
    sched.set_timesteps(steps)
    sched.set_begin_index(begin)
    outs, x = [], make_tensor(SHAPE, dtype, seed=1)
    for k, t in enumerate(sched.timesteps[begin:]):
        outs.append(sched.step(make_tensor(SHAPE, dtype, seed=100 + k), t, x).prev_sample)
        x = truth_outs[k].to(dtype)
    return sched.timesteps.tolist(), outs


@pytest.mark.parametrize("k", range(DRAWS))
def test_config_draw(k):
    config, steps, begin = draw_case(k)
    shown = dict(config, trained_betas="<table>") if "trained_betas" in config else config
    what = f"{shown} steps={steps} begin={begin}"
    truth_ts, truth = _diffusers_run(config, steps, begin, torch.float64)
    if truth_ts is None:
        with pytest.raises(ValueError):
            dd.PNDMScheduler(**config).set_timesteps(steps)
        return
    ours_ts = dd.PNDMScheduler(**config)
    ours_ts.set_timesteps(steps)
    if -1 in truth_ts:  # the "trailing" overshoot: ours keeps diffusers' first N timesteps
        assert config["timestep_spacing"] == "trailing" and truth_ts[-1] == -1, what
        assert ours_ts.timesteps.tolist() == truth_ts[:-1], what
        return
    assert ours_ts.timesteps.tolist() == truth_ts, what
    # float32: each call from the truth's previous state (the same inputs for all three)
    _, ours = _ours_run(config, steps, begin, torch.float32, truth)
    sched32 = diffusers.PNDMScheduler(**config)
    sched32.set_timesteps(steps)
    x = make_tensor(SHAPE, torch.float32, seed=1)
    for i, t in enumerate(sched32.timesteps[begin:]):
        out32 = sched32.step(make_tensor(SHAPE, torch.float32, seed=100 + i), t, x).prev_sample
        assert_matches_reference(ours[i], truth[i], out32, f"{what} call {i}")
        x = truth[i].float()
    _, ours64 = _ours_run(config, steps, begin, torch.float64, truth)
    for i, (got, ref) in enumerate(zip(ours64, truth)):
        assert_matches_reference(got, ref, ref, f"{what} float64 call {i}")
