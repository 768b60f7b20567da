"""Level-1 attributes beyond the default configs of ``test_level1_attrs18``: the DPM family's ``alpha_t``/``sigma_t``/
``lambda_t`` and KDPM2's ``log_sigmas`` over beta schedules and zero terminal SNR; ``final_alpha_cumprod`` /
``initial_alpha_cumprod`` (diffusers' 0-d float32 tensors; the steps keep the float64 value); GEScheduler's
``init_noise_sigma`` before ``set_timesteps``; EDM-DPM-Solver before ``set_timesteps``, against diffusers'.
"""
from __future__ import annotations

import inspect
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.testing import make_tensor  # noqa: E402
from test_diffusers_schedulers import diffusers_class, diffusers_float64  # noqa: E402
from test_level1_attrs18 import _same  # noqa: E402
from test_level1_parity17 import _module  # noqa: E402

LOG_SNR = ("DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "DEISMultistepScheduler",
           "UniPCMultistepScheduler", "SASolverScheduler")
KDPM2 = ("KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler")
CONFIGS = ({}, {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
           {"beta_schedule": "squaredcos_cap_v2"}, {"rescale_betas_zero_snr": True}, {"num_train_timesteps": 50})


def _three(name, cfg):
    """(diffusers in float64, diffusers float32, ours) from ``cfg``; skips a key diffusers' class does not take."""
    cls = diffusers_class(name)
    if any(k not in inspect.signature(cls.__init__).parameters for k in cfg):
        pytest.skip(f"diffusers' {name} takes no {sorted(cfg)}")
    with diffusers_float64(_module(name)):
        truth = cls(**cfg)
    eager = cls(**cfg)
    return truth, eager, dd.SCHEDULERS[name].from_config(eager.config)


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("name", LOG_SNR + KDPM2)
def test_tables_match_stock(name, cfg):
    """Same dtype, shape and device as diffusers', values within the float32 rule of its float64 run, before and after
    ``set_timesteps`` (which leaves them as they are)."""
    if name in KDPM2 and "rescale_betas_zero_snr" in cfg:
        pytest.skip("KDPM2 takes no rescale_betas_zero_snr")
    truth, eager, ours = _three(name, cfg)
    attrs = ("log_sigmas",) if name in KDPM2 else ("alpha_t", "sigma_t", "lambda_t")
    for stage in ("init", "set_timesteps"):
        if stage == "set_timesteps":
            with diffusers_float64(_module(name)):
                truth.set_timesteps(8)
            eager.set_timesteps(8)
            ours.set_timesteps(8)
        for attr in attrs:
            got = getattr(ours, attr)
            assert torch.isfinite(got).all(), (name, attr)
            _same(f"{name}.{attr} ({stage})", got, getattr(truth, attr), getattr(eager, attr))


@pytest.mark.parametrize("set_alpha_to_one", (True, False))
@pytest.mark.parametrize("name, attr", [("DDIMScheduler", "final_alpha_cumprod"),
                                        ("PNDMScheduler", "final_alpha_cumprod"),
                                        ("LCMScheduler", "final_alpha_cumprod"),
                                        ("TCDScheduler", "final_alpha_cumprod"),
                                        ("DDIMInverseScheduler", "initial_alpha_cumprod")])
def test_alpha_bar_ends_match_stock(name, attr, set_alpha_to_one):
    """diffusers' type (a 0-d float32 CPU tensor) and value; read-only (the steps use the float64 value the config
    fixes, so an assignment that they would ignore raises instead); the float64 value is alpha-bar_0 or 1."""
    cfg = {"set_alpha_to_one": set_alpha_to_one, "beta_schedule": "scaled_linear"}
    truth, eager, ours = _three(name, cfg)
    _same(f"{name}.{attr}", getattr(ours, attr), getattr(truth, attr), getattr(eager, attr))
    with pytest.raises(AttributeError):
        setattr(ours, attr, torch.tensor(0.5))
    private = getattr(ours, "_" + attr)
    assert type(private) is float and private == (1.0 if set_alpha_to_one else float(ours.alphas_cumprod[0]))


@pytest.mark.parametrize("style", ("Linear", "DDIM", "EDM"))
@pytest.mark.parametrize("cfg", ({}, {"start": 14.6}, {"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                                        "beta_end": 0.012, "factor": 0.5}), ids=str)
def test_ge_init_noise_sigma_before_set_timesteps(style, cfg):
    """``1/sqrt(ab(t_0))`` with t_0 the config's ``start`` snapped to the training table: the value that every
    ``set_timesteps(N)`` gives, read before any (the official class gives sigma(T - 1) there, a different quantity
    from its own post-set_timesteps value)."""
    before = dd.GEScheduler(style=style, **cfg).init_noise_sigma
    assert type(before) is float
    ours = dd.GEScheduler(style=style, **cfg)
    for n in (1, 2, 7, 50):
        ours.set_timesteps(n)
        assert ours.init_noise_sigma == before, (n, ours.init_noise_sigma, before)
    t0 = int(ours.timesteps[0])
    assert before == pytest.approx(1 / math.sqrt(float(ours.alphas_cumprod[t0])), rel=1e-14)


@pytest.mark.parametrize("cfg", ({}, {"sigma_schedule": "exponential"}, {"num_train_timesteps": 10}), ids=str)
def test_edm_dpm_before_set_timesteps(cfg):
    """As diffusers' class: the training schedule; ``scale_model_input`` (which starts the step index) and
    ``add_noise`` run on it, with and without ``set_begin_index``; ``step`` raises ValueError."""
    name = "EDMDPMSolverMultistepScheduler"
    _, eager, ours = _three(name, cfg)
    x = make_tensor((2, 3, 4, 4), torch.float32, seed=3) * 80
    for attr in ("timesteps", "sigmas", "init_noise_sigma", "num_inference_steps", "step_index", "begin_index"):
        _same(f"{name}.{attr}", getattr(ours, attr), getattr(eager, attr), getattr(eager, attr))
    noise = make_tensor(x.shape, torch.float32, seed=4)
    t = eager.timesteps[3:5]
    torch.testing.assert_close(ours.add_noise(x, noise, t), eager.add_noise(x, noise, t))
    for sched in (eager, ours):
        y = sched.scale_model_input(x, sched.timesteps[3])
    assert (ours.step_index, ours.is_scale_input_called) == (eager.step_index, eager.is_scale_input_called) == (3, True)
    torch.testing.assert_close(y, eager.scale_model_input(x, eager.timesteps[3]))
    for sched in (eager, ours):
        with pytest.raises(ValueError, match="set_timesteps"):
            sched.step(noise, sched.timesteps[3], x)
        sched.set_begin_index(2)
    torch.testing.assert_close(ours.add_noise(x, noise, t), eager.add_noise(x, noise, t))
    for sched in (eager, ours):
        sched.set_timesteps(5)
    assert (ours.step_index, ours.begin_index) == (eager.step_index, eager.begin_index) == (None, None)
