"""Review of the third-history work (``history3``, depth-3 plans, lms/plms/deis, UniPC order 3 and their drop-ins):
regressions of the bugs it found, each against diffusers' own classes (float64 truth, float32 yardstick: the project's
rule of ``test_diffusers_schedulers.check_parity``).

1. K-schedulers (LMS, and the Euler/Heun/KDPM2 family whose schedule it shares) with Karras, exponential or beta sigmas
   on "trailing" timesteps where diffusers' float ``arange(T, 0, -T/N)`` overshoots to N + 1 values (T = 1000:
   N = 61, 103, 121, 122; T = 999: N = 13, ...): the conversion starts from diffusers' ``in_sigmas[-1]``, the sigma of
   that dropped last timestep t = -1 (the table's first, where the interpolation clamps), not the sigma of the last
   kept one: the whole tail of the schedule was another one (sigma_min 0.13 instead of 0.0064 at T = 999, N = 13).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.testing import assert_matches_reference  # noqa: E402
from test_diffusers_schedulers import check_parity, diffusers_float64, scheduler_module  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:The `scale_model_input` function should be called")

#----------------------------------------------------------------------------
# 1. The trailing overshoot under a sigma conversion.

TRAILING = {"timestep_spacing": "trailing"}


def test_the_overshoot_cases_are_real():
    """The (T, N) pairs used below are ones where diffusers' float arange yields N + 1 timesteps."""
    for T, N in ((999, 13), (1000, 61)):
        assert len(np.arange(T, 0, -T / N)) == N + 1


@pytest.mark.parametrize("name, config, steps", [
    ("LMSDiscreteScheduler", dict(TRAILING, num_train_timesteps=999, use_karras_sigmas=True), 13),
    ("LMSDiscreteScheduler", dict(TRAILING, use_exponential_sigmas=True, beta_schedule="scaled_linear",
                                  beta_start=0.00085, beta_end=0.012), 61),
    ("LMSDiscreteScheduler", dict(TRAILING, num_train_timesteps=999, use_beta_sigmas=True), 13),
    ("EulerDiscreteScheduler", dict(TRAILING, use_karras_sigmas=True), 61),
    ("HeunDiscreteScheduler", dict(TRAILING, num_train_timesteps=999, use_exponential_sigmas=True), 13),
], ids=lambda v: str(v)[:40])
def test_sigma_conversion_after_trailing_overshoot_matches_diffusers(name, config, steps):
    check_parity(name, config, {"steps": steps})


@pytest.mark.parametrize("name", ["KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"])
def test_kdpm2_sigmas_after_trailing_overshoot_match_diffusers(name):
    """KDPM2's schedule (sigmas and interpolated midpoints) comes from the same conversion."""
    config = dict(TRAILING, num_train_timesteps=999, use_karras_sigmas=True)
    with diffusers_float64(scheduler_module(name)):
        truth = getattr(diffusers, name)(**config)
        truth.set_timesteps(13)
    eager, ours = getattr(diffusers, name)(**config), getattr(dd, name)(**config)
    for sched in (eager, ours):
        sched.set_timesteps(13)
    assert_matches_reference(ours.sigmas.double(), truth.sigmas.double(), eager.sigmas.double(), f"{name} sigmas")
    assert_matches_reference(ours.timesteps.double(), truth.timesteps.double(), eager.timesteps.double(),
                             f"{name} timesteps")
    torch.testing.assert_close(ours.sigmas[-2], eager.sigmas[-2], rtol=1e-4, atol=0)  # the table's first sigma


@pytest.mark.parametrize("method,knob", [("deis", "order"), ("unipc", "order"), ("dpmsolver_single", "order"),
                                         ("lms", "order"), ("ipndm", "max_order")])
def test_order_knobs_take_integers_only(method, knob):
    """A float order (2.0) is refused by every multistep sampler, as lms always did; numpy ints are integers."""
    from diffkern import analytic, schedules
    from diffkern.sampling import sample
    gmm = analytic.GaussianMixture([1.0], [[0.5, -0.5]], [0.7])
    x, sig = torch.randn(2, 2, dtype=torch.float64), schedules.karras(4, 0.1, 10.0)
    with pytest.raises(ValueError, match=rf"{knob}: expected"):
        sample(gmm, x, sig, method, backend="reference", **{knob: 2.0})
    sample(gmm, x, sig, method, backend="reference", **{knob: np.int64(2)})
