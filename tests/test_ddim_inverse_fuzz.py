"""Differential fuzzing of diffkern.diffusers.DDIMInverseScheduler against diffusers' class over the configs users
load (every ``__init__`` key of diffusers' class, seeded draws), with the shared harness of :mod:`dropin_fuzz`:
where diffusers refuses a draw (at ``set_timesteps`` or at a step) ours must raise a ValueError; where the draw holds
what ours documents as unsupported (:func:`refusals`) ours must raise naming ``key=value``; otherwise every step must
match under the project rule (``test_ddim_inverse.parity``: diffusers in float64 the truth, in float32 the yardstick,
ours in float64 at the floor), and a quarter of the draws also go through save/load.
"""
import random

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.testing import make_tensor  # noqa: E402
from dropin_fuzz import (BETA_RANGES, SCHEDULE_CHOICES, draw_keys, init_keys, refusal_outcome, refuses,  # noqa: E402
                         round_trip, trained_betas, undrawn_keys)
from test_ddim_inverse import parity  # noqa: E402

NAME = "DDIMInverseScheduler"
DRAWS = 60
CHOICES = {**SCHEDULE_CHOICES, "clip_sample": [True, False], "clip_sample_range": [0.5, 1.0, 3.0],
           "set_alpha_to_one": [True, False], "rescale_betas_zero_snr": [True, False]}
STEPS = [1, 2, 3, 7, 10, 25, 50, 61]  # 61 "trailing" steps over 1000: diffusers makes 62 timesteps


def draw(k):
    """(config, n) of draw ``k``."""
    rng = random.Random(1000 + k)
    config = draw_keys(rng, [key for key in init_keys(NAME) if key != "kwargs"], CHOICES, {}, 0.0)
    T = config.get("num_train_timesteps", 1000)
    lo, hi = rng.choice(BETA_RANGES)
    if rng.random() < 0.15:
        config["trained_betas"] = trained_betas(lo, hi, T)
    else:
        config.update(beta_start=lo, beta_end=hi)
    return config, min(rng.choice(STEPS), T)


def refusals(config, n):
    """The (key, value) pairs of ``config`` at ``n`` steps that ours documents as unsupported."""
    T = config.get("num_train_timesteps", 1000)
    spacing = config.get("timestep_spacing", "leading")
    offset = config.get("steps_offset", 0)
    if spacing == "trailing" and len(np.arange(T, 0, -T / n)) != n:
        return [("timestep_spacing", "trailing")]
    if spacing == "leading" and (n - 1) * (T // n) + offset >= T:
        return [("steps_offset", offset)]
    first = (offset if spacing == "leading" else int(np.round(T / n)) - 1) - T // n
    if config.get("prediction_type") == "sample" and config.get("set_alpha_to_one", True) and first < 0:
        return [("prediction_type", "sample")]
    return []


def diffusers_run(config, n):
    """diffusers' float32 loop over every step (it raises where it refuses the draw)."""
    sched = diffusers.DDIMInverseScheduler(**config)
    sched.set_timesteps(n)
    x = make_tensor((2, 3), seed=1)
    for t in sched.timesteps:
        x = sched.step(make_tensor((2, 3), seed=2), t, x).prev_sample
    return sched


@pytest.mark.parametrize("k", range(DRAWS))
def test_fuzz(k, tmp_path):
    config, n = draw(k)
    what = f"draw {k}: {config} N={n}"
    their_error, _ = refuses(lambda: diffusers_run(config, n))
    our_error, ours = refuses(lambda: dd.DDIMInverseScheduler.from_config(config))
    if our_error is None:
        our_error, _ = refuses(lambda: ours.set_timesteps(n))
    if refusal_outcome(what, their_error, our_error, lambda: refusals(config, n)) is not None:
        return
    parity(config, n, shape=(2, 3, 4), what=what)
    if k % 4 == 0:
        round_trip(what, dd.DDIMInverseScheduler, diffusers.DDIMInverseScheduler, ours, tmp_path / "s")


def test_every_key_is_drawn():
    configs = [draw(k)[0] for k in range(DRAWS)]
    assert undrawn_keys(NAME, configs, exempt=("kwargs",)) == []


def test_outcomes_cover_refusals_and_comparisons():
    kinds = {bool(refusals(*draw(k))) for k in range(DRAWS)}
    assert kinds == {True, False}
    assert any(draw(k)[0].get("timestep_spacing") == "linspace" for k in range(DRAWS))
    assert torch.tensor([draw(k)[1] for k in range(DRAWS)]).unique().numel() >= 5
