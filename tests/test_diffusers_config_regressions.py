"""Regressions of the diffusers drop-in schedulers found by test_diffusers_config_fuzz.py, each pinned to a config that
shows it (the fuzzed draws may move), checked by the same harness (:func:`test_diffusers_config_fuzz.run_case`: the
project's rule against diffusers run in float64, or a ValueError naming the unsupported key and value); KDPM2's
public sigma attributes; and where an order-2 loop may start.
"""
import math
import re

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.testing import make_tensor  # noqa: E402
from test_diffusers_config_fuzz import SHAPE, _scheduler, check, run_case  # noqa: E402
from test_diffusers_schedulers import scheduler_module  # noqa: E402

_EULER_KARRAS = {"sigma_min": 0.1, "sigma_max": 10.0, "use_karras_sigmas": True}
REGRESSIONS = [
    # DPM-Solver ignored sigma_min/sigma_max that a config loaded from Euler's holds (diffusers reads them)
    ("DPMSolverMultistepScheduler", _EULER_KARRAS, 6, 0, {}),
    ("DPMSolverMultistepScheduler", dict(_EULER_KARRAS, use_karras_sigmas=False, use_exponential_sigmas=True), 6, 0,
     {}),
    # exponential sigmas were refused by DPM-Solver (timesteps truncated, not rounded, as diffusers)
    ("DPMSolverMultistepScheduler", {"use_exponential_sigmas": True, "prediction_type": "v_prediction"}, 7, 2, {}),
    # "leading" + steps_offset past T - 1 (N close to T) was refused; diffusers clamps the sigma
    ("EulerDiscreteScheduler", {"num_train_timesteps": 37, "timestep_spacing": "leading", "steps_offset": 2}, 37, 0,
     {}),
    ("HeunDiscreteScheduler", {"num_train_timesteps": 37, "timestep_spacing": "leading", "steps_offset": 2}, 37, 0, {}),
    ("KDPM2DiscreteScheduler", {"num_train_timesteps": 37, "timestep_spacing": "leading", "steps_offset": 1}, 37, 0,
     {}),
    ("DPMSolverMultistepScheduler", {"num_train_timesteps": 37, "timestep_spacing": "leading", "steps_offset": 3}, 17,
     0, {}),
    # lambda_min_clipped was refused by DPM-Solver (it cuts the spacing at the clipped log-SNR)
    ("DPMSolverMultistepScheduler", {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1}, 8, 0, {}),
    ("DPMSolverMultistepScheduler", {"lambda_min_clipped": -3.0, "timestep_spacing": "leading", "steps_offset": 1}, 8,
     0, {}),
    # N = T with "trailing" was refused by DPM-Solver
    ("DPMSolverMultistepScheduler", {"num_train_timesteps": 37, "timestep_spacing": "trailing"}, 37, 0, {}),
    # zero terminal SNR was refused everywhere (Euler/DPM floor alpha-bar(T-1) at 2**-24, DDIM/DDPM keep 0)
    ("EulerDiscreteScheduler", {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
                                "timestep_spacing": "trailing"}, 10, 0, {}),
    ("EulerAncestralDiscreteScheduler", {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
                                         "timestep_spacing": "trailing"}, 10, 0, {}),
    ("DPMSolverMultistepScheduler", {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
                                     "timestep_spacing": "trailing", "use_karras_sigmas": True}, 10, 0, {}),
    ("DDIMScheduler", {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
                       "timestep_spacing": "trailing", "clip_sample": False}, 10, 0, {"eta": 0.5}),
    ("DDPMScheduler", {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
                       "timestep_spacing": "trailing"}, 10, 0, {}),
    ("DDIMScheduler", {"rescale_betas_zero_snr": True}, 10, 0, {}),  # "leading" never reaches T-1: epsilon is fine
    # ... and with a floored alpha-bar above its neighbour, the log-sigma table is not monotonic
    ("EulerDiscreteScheduler", {"rescale_betas_zero_snr": True, "use_exponential_sigmas": True,
                                "trained_betas": np.linspace(0.0015, 0.0195, 1000).tolist()}, 10, 0, {}),
    # timestep_type="continuous" was refused (v-prediction: the network takes 0.25 ln sigma)
    ("EulerDiscreteScheduler", {"timestep_type": "continuous", "prediction_type": "v_prediction"}, 8, 0, {}),
    ("EulerDiscreteScheduler", {"timestep_type": "continuous"}, 8, 0, {}),
    # one Karras/exponential step above a sigma_min larger than the schedule's only sigma: diffusers gives sigma_max
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True, "sigma_min": 0.3}, 1, 0, {}),
    ("KDPM2AncestralDiscreteScheduler", {"use_exponential_sigmas": True, "sigma_min": 0.3}, 1, 0, {}),
    # x0 prediction in Euler-ancestral (diffusers raises NotImplementedError; checked through its epsilon mode)
    ("EulerAncestralDiscreteScheduler", {"prediction_type": "sample"}, 6, 0, {}),
]


@pytest.mark.parametrize("name, config, steps, begin, kw", REGRESSIONS,
                         ids=[f"{r[0]}-{i}" for i, r in enumerate(REGRESSIONS)])
def test_regression_matches_diffusers(name, config, steps, begin, kw):
    run_case(name, config, steps, begin, kw)


@pytest.mark.parametrize("name, config, steps, named", [
    ("DDIMScheduler", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, 10,
     "rescale_betas_zero_snr=True"),
    ("DDPMScheduler", {"rescale_betas_zero_snr": True, "timestep_spacing": "linspace"}, 10,
     "rescale_betas_zero_snr=True"),
    ("DPMSolverMultistepScheduler", {"num_train_timesteps": 37}, 37, "timestep_spacing='linspace'"),
    ("DPMSolverMultistepScheduler", {"num_train_timesteps": 37}, 40, "timestep_spacing='linspace'"),
    ("EulerDiscreteScheduler", {"num_train_timesteps": 37, "timestep_spacing": "leading"}, 40,
     "timestep_spacing='leading'"),
    ("DPMSolverMultistepScheduler", {"num_train_timesteps": 37, "timestep_spacing": "leading", "steps_offset": 2}, 36,
     "steps_offset=2"),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True, "sigma_min": 200.0}, 4, "sigma_min=200.0"),
])
def test_unsupported_schedule_raises_at_set_timesteps(name, config, steps, named):
    sched = getattr(dd, name).from_config(getattr(diffusers, name)(**config).config)
    with pytest.raises(ValueError, match=re.escape(named)):
        sched.set_timesteps(steps)

#----------------------------------------------------------------------------
# KDPM2: diffusers' public sigma attributes, and where a loop may start.


@pytest.mark.parametrize("name", ["KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"])
@pytest.mark.parametrize("config", [{}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True},
                                    {"prediction_type": "v_prediction", "timestep_spacing": "trailing"},
                                    {"beta_schedule": "scaled_linear", "timestep_spacing": "leading",
                                     "steps_offset": 1}])
@pytest.mark.parametrize("steps", [1, 2, 5, 12])
def test_kdpm2_sigma_attributes_match_diffusers(name, config, steps):
    """sigmas_interpol (and sigmas_up/sigmas_down for the ancestral class): diffusers' values and layout (float32,
    2N + 2 entries, its NaN entries included), within the rule; the midpoint calls run at sigmas_interpol."""
    eager = _scheduler(getattr(diffusers, name), config, steps)
    truth = _scheduler(getattr(diffusers, name), config, steps, scheduler_module(name))
    ours = getattr(dd, name).from_config(eager.config)
    ours.set_timesteps(steps)
    attrs = ("sigmas", "sigmas_interpol") + (("sigmas_up", "sigmas_down") if "Ancestral" in name else ())
    for attr in attrs:
        got = getattr(ours, attr)
        assert got.dtype == torch.float32 and got.shape == (2 * steps + 2,), attr
        assert torch.equal(got.isnan(), getattr(truth, attr).isnan()), f"{attr}: NaN entries"
        check(got, getattr(truth, attr).double(), getattr(eager, attr), f"{name} {config} {steps} {attr}")
    # call k = 2i + 1 is step i's midpoint call: its input scaling uses the midpoint sigma diffusers reads there,
    # sigmas_interpol[k] (sigmas_interpol[k - 1] in the ancestral class, whose entries are shifted by one)
    x = make_tensor(SHAPE, seed=3)
    shift = 1 if "Ancestral" in name else 0
    for k, t in enumerate(ours.timesteps):
        scaled = ours.scale_model_input(x, t)
        if k % 2:
            sigma = float(ours.sigmas_interpol[k - shift])
            torch.testing.assert_close(scaled, x / math.sqrt(sigma * sigma + 1), rtol=1e-6, atol=0)
        ours.step(x, t, x)


@pytest.mark.parametrize("name", ["HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
                                  "KDPM2AncestralDiscreteScheduler"])
def test_order2_begin_index_must_be_a_first_call(name):
    """An odd begin index starts a loop on a step's second call: diffusers then runs a predictor with the next
    step's sigma and the previous step's second timestep (Heun: steps of length 0, the sample comes back unchanged;
    KDPM2-ancestral: NaN at its last step).
    Ours refuses it by name; even indices (t_start * order, what pipelines pass) run as diffusers does."""
    eager = getattr(diffusers, name)()
    eager.set_timesteps(4)
    ours = getattr(dd, name)()
    ours.set_timesteps(4)
    with pytest.raises(ValueError, match="begin_index: expected an even index.*got 3"):
        ours.set_begin_index(3)
    assert ours.begin_index is None
    run_case(name, {}, 4, 2, {})


def test_accelerate_refuses_an_infinite_first_sigma():
    """Zero terminal SNR in DDIM/DDPM (alpha-bar(T-1) = 0, kept by Level 1) has no VE sigma for the fused loop."""
    from diffkern.diffusers.loop_spec import loop_spec

    for name in ("DDIMScheduler", "DDPMScheduler"):
        ours = getattr(dd, name)(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                 timestep_spacing="trailing", clip_sample=False)
        ours.set_timesteps(5)
        with pytest.raises(ValueError, match=re.escape("rescale_betas_zero_snr=True")):
            loop_spec(ours)


def test_unsupported_config_raises_at_from_config():
    config = diffusers.DPMSolverMultistepScheduler(lambda_min_clipped=-5.1, timestep_spacing="trailing").config
    with pytest.raises(ValueError, match=re.escape("lambda_min_clipped=-5.1")):
        dd.DPMSolverMultistepScheduler.from_config(config)
