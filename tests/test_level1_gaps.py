"""Level-1 drop-in gaps closed against diffusers' own classes: custom ``set_timesteps(timesteps=/sigmas=/mu=)``,
``index_for_timestep``, ``previous_timestep``, ``init_noise_sigma``'s type, ``add_noise`` off the schedule, the
second call of the two-call schedulers, ``step()`` input errors and the ``num_inference_steps`` check.

Numerical parity uses the project rule of tests/test_diffusers_schedulers.py: diffusers run in float64 is the truth,
and ours must be within ``2*max|diffusers32 - truth| + 2e-6*max(1, max|truth|)`` of it at every call
(:func:`diffkern.testing.assert_matches_reference`).
"""

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.testing import assert_matches_reference  # noqa: E402
from test_diffusers_schedulers import check_calls, diffusers_class, diffusers_float64, scheduler_module  # noqa: E402


def check_custom_parity(name, config, set_kw, kw=None):
    """check_parity of test_diffusers_schedulers with ``set_timesteps(**set_kw)`` (a custom schedule) on all three
    schedulers: timesteps, sigmas and every call's outputs against the float64 truth."""
    kw = kw or {}
    with diffusers_float64(scheduler_module(name)):
        truth = getattr(diffusers, name)(**config)
        truth.set_timesteps(**set_kw)
    eager = getattr(diffusers, name)(**config)
    eager.set_timesteps(**set_kw)
    ours = getattr(dd, name).from_config(eager.config)
    ours.set_timesteps(**set_kw)
    assert ours.num_inference_steps == eager.num_inference_steps
    assert ours.timesteps.dtype == eager.timesteps.dtype and ours.timesteps.shape == eager.timesteps.shape
    assert_matches_reference(ours.timesteps.double(), truth.timesteps.double(), eager.timesteps.double(),
                             f"{name} {set_kw} timesteps")
    assert_matches_reference(ours.sigmas.double(), truth.sigmas.double(), eager.sigmas.double(),
                             f"{name} {set_kw} sigmas")
    check_calls(name, truth, eager, ours, kw, f"{name} {config} {set_kw}")


#----------------------------------------------------------------------------
# 1. Custom schedules.

TS_FRAC = [961.5, 800.0, 612.25, 401.0, 250.5, 99.0, 20.0, 3.5]
TS_INT = [951, 800, 615, 400, 251, 99, 20, 3]
SIGMAS = [14.6, 9.1, 4.2, 2.0, 0.9, 0.31, 0.1, 0.03, 0.0]

CUSTOM = [
    ("EulerDiscreteScheduler", {}, {"timesteps": TS_FRAC}),
    ("EulerDiscreteScheduler", {"prediction_type": "v_prediction", "final_sigmas_type": "sigma_min"},
     {"timesteps": TS_INT}),
    ("EulerDiscreteScheduler", {}, {"sigmas": SIGMAS}),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, {"sigmas": SIGMAS[:-1] + [0.02]}),  # custom sigmas win
    ("EulerDiscreteScheduler", {"timestep_type": "continuous", "prediction_type": "v_prediction"},
     {"sigmas": np.array(SIGMAS)}),
    ("EulerDiscreteScheduler", {"prediction_type": "sample"}, {"sigmas": torch.tensor(SIGMAS[3:])}),
    ("HeunDiscreteScheduler", {}, {"timesteps": TS_FRAC}),
    ("HeunDiscreteScheduler", {"prediction_type": "v_prediction"}, {"timesteps": TS_INT[:3]}),
    ("HeunDiscreteScheduler", {"prediction_type": "sample", "clip_sample": True}, {"timesteps": [500]}),
    ("DPMSolverMultistepScheduler", {}, {"timesteps": TS_INT}),
    ("DPMSolverMultistepScheduler", {"solver_order": 3, "prediction_type": "v_prediction"}, {"timesteps": TS_INT}),
    ("DPMSolverMultistepScheduler", {"final_sigmas_type": "sigma_min", "solver_type": "heun"},
     {"timesteps": [990.7, 500.2, 100.9, 7.0]}),  # float timesteps truncate to ints, as diffusers casts them
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {"timesteps": TS_INT[:5]}),
]


@pytest.mark.parametrize("name, config, set_kw", CUSTOM, ids=[f"{c[0]}-{i}" for i, c in enumerate(CUSTOM)])
def test_custom_schedule_matches_diffusers(name, config, set_kw):
    check_custom_parity(name, config, set_kw)


def _stock_error(name, config, kwargs):
    try:
        getattr(diffusers, name)(**config).set_timesteps(**kwargs)
    except Exception as e:  # noqa: BLE001 (the oracle's own exception, whatever it is)
        return e
    return None


@pytest.mark.parametrize("name, config, kwargs", [
    ("EulerDiscreteScheduler", {}, {"timesteps": TS_FRAC, "sigmas": SIGMAS}),
    ("EulerDiscreteScheduler", {}, {}),
    ("EulerDiscreteScheduler", {}, {"num_inference_steps": 4, "timesteps": TS_FRAC}),
    ("EulerDiscreteScheduler", {}, {"num_inference_steps": 4, "sigmas": SIGMAS}),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, {"timesteps": TS_FRAC}),
    ("EulerDiscreteScheduler", {"use_exponential_sigmas": True}, {"timesteps": TS_FRAC}),
    ("EulerDiscreteScheduler", {"timestep_type": "continuous", "prediction_type": "v_prediction"},
     {"timesteps": TS_FRAC}),
    ("HeunDiscreteScheduler", {}, {}),
    ("HeunDiscreteScheduler", {}, {"num_inference_steps": 4, "timesteps": TS_FRAC}),
    ("HeunDiscreteScheduler", {"use_karras_sigmas": True}, {"timesteps": TS_FRAC}),
    ("HeunDiscreteScheduler", {"use_exponential_sigmas": True}, {"timesteps": TS_FRAC}),
    ("DPMSolverMultistepScheduler", {}, {}),
    ("DPMSolverMultistepScheduler", {}, {"num_inference_steps": 4, "timesteps": TS_INT}),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, {"timesteps": TS_INT}),
    ("DPMSolverMultistepScheduler", {"use_exponential_sigmas": True}, {"timesteps": TS_INT}),
])
def test_bad_combinations_raise_as_diffusers(name, config, kwargs):
    want = _stock_error(name, config, kwargs)
    assert isinstance(want, ValueError)
    with pytest.raises(ValueError) as got:
        getattr(dd, name)(**config).set_timesteps(**kwargs)
    assert str(got.value) == str(want)


@pytest.mark.parametrize("name, kwargs, match", [
    ("EulerDiscreteScheduler", {"timesteps": [100.0, 500.0]}, r"EulerDiscreteScheduler: timesteps: expected a "
     r"schedule whose sigmas strictly decrease"),
    ("EulerDiscreteScheduler", {"sigmas": [1.0, 2.0, 0.0]}, r"sigmas: expected a schedule whose sigmas strictly"),
    ("EulerDiscreteScheduler", {"sigmas": [1.0]}, r"sigmas: expected a 1-D sequence of at least 2 finite"),
    ("EulerDiscreteScheduler", {"sigmas": [[1.0, 0.0]]}, r"sigmas: expected a 1-D sequence"),
    ("EulerDiscreteScheduler", {"timesteps": [500.0, float("nan")]}, r"timesteps: expected a 1-D sequence"),
    ("HeunDiscreteScheduler", {"timesteps": [999, 999, 10]}, r"timesteps: expected a schedule whose sigmas strictly"),
    ("HeunDiscreteScheduler", {"timesteps": []}, r"timesteps: expected a 1-D sequence of at least 1 finite"),
    ("DPMSolverMultistepScheduler", {"timesteps": [500.2, 500.7, 3]}, r"timesteps: expected a schedule whose"),
    ("DPMSolverMultistepScheduler", {"timesteps": ["a"]}, r"timesteps: expected a 1-D sequence of numbers"),
])
def test_custom_schedules_the_fused_tables_cannot_run_are_refused_by_name(name, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        getattr(dd, name)().set_timesteps(**kwargs)


def test_dpm_mu_and_heun_num_train_timesteps():
    """Stock DPM-Solver asserts use_dynamic_shifting for mu (a bare AssertionError); ours, which does not implement
    dynamic shifting, refuses mu by name as its DEIS/UniPC/singlestep siblings do. Heun's num_train_timesteps: the
    config's value is accepted (it changes nothing), another is refused by name, as our KDPM2's."""
    with pytest.raises(AssertionError):
        diffusers.DPMSolverMultistepScheduler().set_timesteps(4, mu=0.5)
    with pytest.raises(ValueError, match=r"mu: needs use_dynamic_shifting=True"):
        dd.DPMSolverMultistepScheduler().set_timesteps(4, mu=0.5)
    ours, theirs = dd.HeunDiscreteScheduler(), diffusers.HeunDiscreteScheduler()
    ours.set_timesteps(5, num_train_timesteps=1000)
    theirs.set_timesteps(5, num_train_timesteps=1000)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    with pytest.raises(ValueError, match=r"num_train_timesteps"):
        ours.set_timesteps(5, num_train_timesteps=500)


def test_level1_classes_take_the_custom_arguments_stock_takes():
    """Every custom-schedule argument (timesteps, sigmas, mu) of a stock set_timesteps is a parameter of ours."""
    import inspect
    for name, cls in dd.SCHEDULERS.items():
        stock = diffusers_class(name)
        if stock is None:
            continue
        theirs = set(inspect.signature(stock.set_timesteps).parameters) & {"timesteps", "sigmas", "mu"}
        assert theirs <= set(inspect.signature(cls.set_timesteps).parameters), name
