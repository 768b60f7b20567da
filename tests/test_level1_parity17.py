"""Level-1 drop-ins against diffusers' class of the same name, side by side, before and around ``set_timesteps``.

What a user reads before ``set_timesteps`` (``timesteps``, ``sigmas``, ``num_inference_steps``, ``init_noise_sigma``,
``order``, ``step_index``, ``begin_index``): same dtype and shape, values under the float32 rule against diffusers run
in float64 (ours are float64-derived then rounded, diffusers' computed in float32: by design). The classes whose
diffusers ``__init__`` runs ``set_timesteps(T)`` (Heun, KDPM2, KDPM2-ancestral, LMS) step without an explicit call,
as diffusers; ours defer it to the first read (construction stays cheap). Also: flow schedulers' ``sigma_min`` /
``sigma_max``, LCM/TCD fractional custom timesteps.
"""
from __future__ import annotations

import pickle
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.testing import assert_matches_reference, make_tensor  # noqa: E402
from test_diffusers_schedulers import diffusers_class, diffusers_float64, scheduler_module  # noqa: E402

SHAPE = (2, 3, 5, 4)
TWINS = sorted(n for n in dd.SCHEDULERS if diffusers_class(n) is not None)
DEFAULT_SCHEDULE = ["HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
                    "LMSDiscreteScheduler"]
_MODULES = {"FlowMatchEulerDiscreteScheduler": "flow_match_euler_discrete", "LCMScheduler": "lcm",
            "FlowMatchHeunDiscreteScheduler": "flow_match_heun_discrete", "TCDScheduler": "tcd",
            "EDMEulerScheduler": "edm_euler", "EDMDPMSolverMultistepScheduler": "edm_dpmsolver_multistep",
            "DDIMInverseScheduler": "ddim_inverse", "IPNDMScheduler": "ipndm"}


def _module(name):
    import importlib
    if name in _MODULES:
        return importlib.import_module(f"diffusers.schedulers.scheduling_{_MODULES[name]}")
    return scheduler_module(name)


def _three(name, config=None):
    """(diffusers in float64, diffusers float32, ours), all fresh from ``config``, no set_timesteps."""
    config = config or {}
    with diffusers_float64(_module(name)):
        truth = diffusers_class(name)(**config)
    eager = diffusers_class(name)(**config)
    ours = dd.SCHEDULERS[name].from_config(eager.config)
    return truth, eager, ours


def _same_value(name, attr, got, ref, eager):
    what = f"{name}.{attr} before set_timesteps"
    if isinstance(eager, torch.Tensor):
        assert isinstance(got, torch.Tensor), what
        assert got.dtype == eager.dtype and got.shape == eager.shape and got.device == eager.device, \
            (what, got.dtype, eager.dtype, got.shape, eager.shape)
        if eager.dtype.is_floating_point:
            assert_matches_reference(got, ref.double(), eager, what)
        else:
            assert torch.equal(got, eager), what
    elif isinstance(eager, float) and not isinstance(eager, bool):
        assert type(got) is float and abs(got - eager) <= 1e-6 * max(1.0, abs(eager)), (what, got, eager)
    else:
        assert type(got) is type(eager) and got == eager, (what, got, eager)


@pytest.mark.parametrize("name", TWINS)
def test_attributes_before_set_timesteps(name):
    truth, eager, ours = _three(name)
    for attr in ("timesteps", "sigmas", "num_inference_steps", "init_noise_sigma", "order", "step_index",
                 "begin_index", "sigma_min", "sigma_max"):
        if not hasattr(eager, attr) or (attr.startswith("sigma_m") and "sigma_min" in eager.config):
            continue  # (a config key read as an attribute: deprecated in diffusers)
        assert hasattr(ours, attr), f"{name}.{attr}"
        _same_value(name, attr, getattr(ours, attr), getattr(truth, attr), getattr(eager, attr))


@pytest.mark.parametrize("name, config", [
    ("EulerDiscreteScheduler", {"timestep_type": "continuous", "prediction_type": "v_prediction"}),
    ("HeunDiscreteScheduler", {"use_karras_sigmas": True}),
    ("HeunDiscreteScheduler", {"timestep_spacing": "leading", "steps_offset": 1}),
    ("KDPM2DiscreteScheduler", {"use_exponential_sigmas": True, "beta_schedule": "scaled_linear"}),
    ("KDPM2AncestralDiscreteScheduler", {"timestep_spacing": "trailing", "num_train_timesteps": 37}),
    ("LMSDiscreteScheduler", {"use_karras_sigmas": True, "num_train_timesteps": 50}),
    ("DEISMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
    ("SASolverScheduler", {"beta_schedule": "squaredcos_cap_v2"}),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}),
    ("FlowMatchEulerDiscreteScheduler", {"use_dynamic_shifting": True, "shift": 3.0}),
    ("FlowMatchHeunDiscreteScheduler", {"shift": 1.7, "num_train_timesteps": 333}),
])
def test_attributes_before_set_timesteps_configs(name, config):
    truth, eager, ours = _three(name, config)
    for attr in ("timesteps", "sigmas", "num_inference_steps", "init_noise_sigma", "sigma_min", "sigma_max"):
        if hasattr(eager, attr) and not (attr.startswith("sigma_m") and "sigma_min" in eager.config):
            _same_value(name, attr, getattr(ours, attr), getattr(truth, attr), getattr(eager, attr))


@pytest.mark.parametrize("name", DEFAULT_SCHEDULE)
def test_steps_without_set_timesteps(name):
    """Three calls on the default schedule of T steps, as diffusers' (its __init__ ran set_timesteps(T))."""
    truth, eager, ours = _three(name, {"num_train_timesteps": 40})
    assert ours.num_inference_steps == eager.num_inference_steps == 40
    x = make_tensor(SHAPE, torch.float64, seed=3) * float(truth.init_noise_sigma)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers' LMS: "scale_model_input not called"
        for k in range(3):
            m = make_tensor(SHAPE, torch.float64, seed=10 + k)
            with diffusers_float64(_module(name)):
                ref = truth.step(m, truth.timesteps[k], x)
            out = eager.step(m.float(), eager.timesteps[k], x.float())
            got = ours.step(m.float(), ours.timesteps[k], x.float())
            assert_matches_reference(got.prev_sample, ref.prev_sample, out.prev_sample, f"{name} call {k}")
            x = ref.prev_sample
    assert ours.step_index == eager.step_index == 3


@pytest.mark.parametrize("name", DEFAULT_SCHEDULE + ["DPMSolverSDEScheduler"])
def test_default_schedule_is_deferred_and_replaced(name):
    cls = dd.SCHEDULERS[name]
    sched = cls(num_train_timesteps=30)
    assert sched.__dict__["num_inference_steps"] is None  # nothing built at construction
    sched.set_begin_index(2)
    assert sched.num_inference_steps == 30 and sched.begin_index == 2  # a begin index set before it is kept
    explicit = cls(num_train_timesteps=30)
    explicit.set_timesteps(4)  # an explicit call replaces the default before it runs (and is not overwritten)
    ref = cls(num_train_timesteps=30)
    ref.set_timesteps(30)
    ref.set_timesteps(4)
    assert explicit.num_inference_steps == 4 and torch.equal(explicit.timesteps, ref.timesteps)
    assert explicit.sigmas_host == ref.sigmas_host
    copy = pickle.loads(pickle.dumps(cls(num_train_timesteps=30)))  # the pending default survives a copy
    assert copy.num_inference_steps == 30


def test_dpm_solver_sde_default_schedule():
    """diffusers' DPMSolverSDE (needs torchsde, absent here) also runs set_timesteps(T) in __init__: ours holds the
    schedule its own set_timesteps(T) makes."""
    ours, ref = dd.DPMSolverSDEScheduler(num_train_timesteps=20), dd.DPMSolverSDEScheduler(num_train_timesteps=20)
    ref.set_timesteps(20)
    assert torch.equal(ours.timesteps, ref.timesteps) and ours.timesteps.shape == (39,)
    assert torch.equal(ours.sigmas, ref.sigmas) and ours.num_inference_steps == 20


def test_refused_default_keeps_training_schedule():
    """Where ours refuses set_timesteps(T) (ValueError), the training schedule stays and step() asks for
    set_timesteps, as before."""
    sched = dd.LMSDiscreteScheduler(num_train_timesteps=20)

    def refuse(*args, **kwargs):
        raise ValueError("refused")

    sched.set_timesteps = refuse
    assert sched.num_inference_steps is None and sched.timesteps.dtype == torch.float32
    assert sched.timesteps.tolist() == list(range(19, -1, -1))
    x = make_tensor(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(x, 19.0, x)


@pytest.mark.parametrize("name", ["LCMScheduler", "TCDScheduler"])
@pytest.mark.parametrize("given", [[999.5, 500.25, 259.0], [900.9, 400.0, 99.5, -0.5], torch.tensor([750.5, 3.2])])
def test_fractional_custom_timesteps(name, given):
    """diffusers truncates custom timesteps to integers (after its checks): the same schedule and steps."""
    eager, ours = diffusers_class(name)(), dd.SCHEDULERS[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager.set_timesteps(timesteps=given)
        ours.set_timesteps(timesteps=given)
    assert torch.equal(ours.timesteps, eager.timesteps) and ours.num_inference_steps == eager.num_inference_steps
    x = make_tensor(SHAPE, torch.float64, seed=5)
    m = make_tensor(SHAPE, torch.float64, seed=6)
    with diffusers_float64(_module(name)):
        truth = diffusers_class(name)()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            truth.set_timesteps(timesteps=given)
        ref = truth.step(m, truth.timesteps[0], x, generator=torch.Generator().manual_seed(1))
    out = eager.step(m.float(), eager.timesteps[0], x.float(), generator=torch.Generator().manual_seed(1))
    got = ours.step(m.float(), ours.timesteps[0], x.float(), generator=torch.Generator().manual_seed(1))
    field = "denoised" if name == "LCMScheduler" else "pred_noised_sample"
    assert_matches_reference(getattr(got, field), getattr(ref, field), getattr(out, field), f"{name} {field}")


@pytest.mark.parametrize("name", ["LCMScheduler", "TCDScheduler"])
def test_fractional_custom_timesteps_refusals(name):
    sched = dd.SCHEDULERS[name]()
    with pytest.raises(ValueError, match="truncate to the integers"):
        sched.set_timesteps(timesteps=[999.7, 999.2])  # both 999: diffusers starts its loop at the second
    with pytest.raises(ValueError, match="finite numbers"):
        sched.set_timesteps(timesteps=[999.0, float("nan")])
    with pytest.raises(ValueError, match="lie in"):
        sched.set_timesteps(timesteps=[999.0, -1.0])  # diffusers reads alphas_cumprod[-1] there
    with pytest.raises(ValueError, match="descending"):
        sched.set_timesteps(timesteps=[500.5, 600.0])
