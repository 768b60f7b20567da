"""diffkern.diffusers schedulers (Level 1): GEScheduler and IADBScheduler against float64 loops written from the maths,
and the API contract (seeded Philox noise, no device reads in step(), errors, configs, save/load, outputs).

Split from test_diffusers_schedulers.py (its docstring gives the tolerance rule of ``assert_matches_reference``)."""
import math
import re

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.testing import assert_matches_reference, make_tensor  # noqa: E402
from test_diffusers_schedulers import SHAPE, diffusers_class  # noqa: E402

#----------------------------------------------------------------------------
# GE and IADB: float64 references written from math-samplers.md 2.5 and 1.3/1.6.


def _ge_reference(sigmas, x, model_outputs, gamma, clip):
    """The GEScheduler loop of math-samplers.md 2.5 (teacher-forced: state k from ``x[k]``); yields (x', pred)."""
    eps_prev = None
    for i, (s, sn) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        eps = model_outputs[i]
        if clip is not None:
            x0 = (x[i] - s * eps).clamp(-clip, clip)
            eps = (x[i] - x0) / s
        eps_bar = eps if eps_prev is None else gamma * eps + (1 - gamma) * eps_prev
        yield x[i] + (sn - s) * eps_bar, x[i] - s * eps_bar
        eps_prev = eps


@pytest.mark.parametrize("config", [{}, {"clip_sample": False, "gamma": 1.5, "style": "EDM"},
                                    {"style": "DDIM", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                     "beta_end": 0.012, "start": 14.0}])
def test_ge_matches_spec(config):
    steps = 6
    ours = dd.GEScheduler(**config)
    ours.set_timesteps(steps)
    cfg = ours.config
    sig = ours.sigmas_host
    assert len(ours.timesteps) == steps and len(sig) == steps + 1
    assert math.isclose(ours.init_noise_sigma, math.sqrt(sig[0] ** 2 + 1))
    states = [make_tensor(SHAPE, torch.float64, seed=50 + k) * sig[k] for k in range(steps)]
    outs = [make_tensor(SHAPE, torch.float64, seed=80 + k) for k in range(steps)]
    clip = cfg.clip_sample_range if cfg.clip_sample else None
    truth = list(_ge_reference(sig, states, outs, cfg.gamma, clip))
    eager = list(_ge_reference(sig, [s.float() for s in states], [o.float() for o in outs], cfg.gamma, clip))
    for k, t in enumerate(ours.timesteps):
        x32 = states[k].float()
        scaled = ours.scale_model_input(x32, t)
        torch.testing.assert_close(scaled, x32 / math.sqrt(sig[k] ** 2 + 1))
        got = ours.step(outs[k].float(), t, x32)
        assert_matches_reference(got.prev_sample, truth[k][0], eager[k][0], f"GE {config} step {k} prev_sample")
        assert_matches_reference(got.pred_original_sample, truth[k][1], eager[k][1], f"GE {config} step {k} pred")


def test_ge_linear_schedule_ends_at_t_over_n():
    # math-samplers.md 2.5: with factor 0 the geometric part ends at sigma(T//N) (t = 100 for N = 10), then t = 0
    ours = dd.GEScheduler(clip_sample=False)
    ours.set_timesteps(10)
    assert int(ours.timesteps[-1]) == 100
    assert ours.sigmas_host[-2] == pytest.approx(float(ours.train_sigmas[100]))
    assert ours.sigmas_host[0] == pytest.approx(8.35, rel=0.02)


def _iadb_reference(alphas, x, d, noise, variant, lam):
    for i, (a, an) in enumerate(zip(alphas[:-1], alphas[1:])):
        x1_bar = x[i] + (1 - a) * d[i]
        if variant == "euler":
            yield x[i] + (an - a) * d[i], x1_bar
            continue
        x0_bar = x[i] - a * d[i]
        k = 0.0 if a == 0 else (((1 - an) / an) / ((1 - a) / a)) ** (lam * lam)
        yield an * x1_bar + (1 - an) * (k * x0_bar + math.sqrt(1 - k * k) * noise[i]), x1_bar


@pytest.mark.parametrize("variant, lam", [("euler", 1.0), ("stochastic", 1.0), ("stochastic", 0.5)])
def test_iadb_matches_spec(variant, lam):
    steps = 5
    ours = dd.IADBScheduler(variant=variant, lam=lam, timestep_scale=999.0)
    ours.set_timesteps(steps)
    alphas = [k / steps for k in range(steps + 1)]
    torch.testing.assert_close(ours.timesteps, torch.tensor(alphas[:-1]) * 999.0)
    x = [make_tensor(SHAPE, torch.float64, seed=20 + k) for k in range(steps)]
    d = [make_tensor(SHAPE, torch.float64, seed=40 + k) for k in range(steps)]
    gen = torch.Generator().manual_seed(3)
    noise = [torch.randn(SHAPE, generator=gen).double() for _ in range(steps)] if variant != "euler" else [None] * steps
    truth = list(_iadb_reference(alphas, x, d, noise, variant, lam))
    eager = list(_iadb_reference(alphas, [v.float() for v in x], [v.float() for v in d],
                                 [None if n is None else n.float() for n in noise], variant, lam))
    gen = torch.Generator().manual_seed(3)
    for k, t in enumerate(ours.timesteps):
        got = ours.step(d[k].float(), t, x[k].float(), generator=gen)
        assert_matches_reference(got.prev_sample, truth[k][0], eager[k][0], f"IADB {variant} step {k}")
        assert_matches_reference(got.pred_original_sample, truth[k][1], eager[k][1], f"IADB {variant} step {k} x1")

#----------------------------------------------------------------------------
# Noise without a generator, host-sync rules, API contract.


def test_philox_noise_is_seeded_and_per_loop():
    sched = dd.DDPMScheduler(clip_sample=False)
    x, m = make_tensor(SHAPE, seed=1), make_tensor(SHAPE, seed=2)

    def first_step(seed):
        sched.set_seed(seed)
        sched.set_timesteps(10)
        return sched.step(m, sched.timesteps[0], x).prev_sample

    torch.testing.assert_close(first_step(5), first_step(5), rtol=0, atol=0)
    assert not torch.equal(first_step(5), first_step(6))
    torch.manual_seed(0)
    a = first_step(None)
    torch.manual_seed(0)
    torch.testing.assert_close(first_step(None), a, rtol=0, atol=0)


def test_step_does_not_read_device_timesteps():
    # a timestep that cannot be read at all (meta tensor): step() must not index anything with it
    for cls in (dd.DDIMScheduler, dd.EulerDiscreteScheduler, dd.DPMSolverMultistepScheduler, dd.HeunDiscreteScheduler,
                dd.KDPM2DiscreteScheduler, dd.KDPM2AncestralDiscreteScheduler):
        sched = cls()
        sched.set_timesteps(4)
        x = make_tensor(SHAPE, seed=1)
        for k in range(len(sched.timesteps)):
            t = torch.empty((), device="meta")
            sched.scale_model_input(x, t)
            x = sched.step(make_tensor(SHAPE, seed=k), t, x).prev_sample
        assert torch.isfinite(x).all()


def test_out_of_order_host_timestep_raises():
    sched = dd.DDIMScheduler()
    sched.set_timesteps(10)
    x = make_tensor(SHAPE, seed=1)
    sched.step(x, 900, x)
    with pytest.raises(ValueError, match="timestep: expected 800"):
        sched.step(x, 500, x)
    with pytest.raises(ValueError, match="set_timesteps"):  # Euler steps on its training schedule, as stock
        dd.DPMSolverMultistepScheduler().step(x, 1, x)
    sched.set_timesteps(1)
    sched.step(x, sched.timesteps[0], x)
    with pytest.raises(IndexError, match="past the end"):
        sched.step(x, 0, x)


@pytest.mark.parametrize("cls, option, value", [
    (dd.DDIMScheduler, "thresholding", True), (dd.DDIMScheduler, "prediction_type", "flow"),
    (dd.DPMSolverMultistepScheduler, "use_dynamic_shifting", True), (dd.DDIMScheduler, "beta_schedule", "sigmoid"),
    (dd.DDPMScheduler, "variance_type", "learned_range"), (dd.DDPMScheduler, "timestep_spacing", "karras"),
    (dd.DPMSolverMultistepScheduler, "algorithm_type", "sde-dpmsolver"),
    (dd.DPMSolverMultistepScheduler, "solver_order", 4), (dd.DPMSolverMultistepScheduler, "use_lu_lambdas", True),
    (dd.EulerDiscreteScheduler, "interpolation_type", "log_linear"),
    (dd.EulerDiscreteScheduler, "use_beta_sigmas", True),
    (dd.DPMSolverMultistepScheduler, "use_flow_sigmas", True), (dd.GEScheduler, "prediction_type", "v_prediction"),
    (dd.IADBScheduler, "variant", "two_head"), (dd.KDPM2DiscreteScheduler, "use_beta_sigmas", True),
    (dd.KDPM2DiscreteScheduler, "prediction_type", "sample"),
    (dd.KDPM2AncestralDiscreteScheduler, "prediction_type", "original_sample")])
def test_unsupported_options_raise(cls, option, value):
    with pytest.raises(ValueError, match=re.escape(f"{option}={value!r}")):
        cls(**{option: value})


def test_any_diffusers_config_loads():
    names = ["DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
             "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
             "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler", "KDPM2DiscreteScheduler",
             "DEISMultistepScheduler"]
    for source in names:
        config = getattr(diffusers, source)(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config
        for name, cls in dd.SCHEDULERS.items():
            sched = cls.from_config(config)
            assert isinstance(sched, cls)
            if "beta_schedule" in sched.config:
                assert sched.config.beta_schedule == "scaled_linear", (source, name)


def _public(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}


def test_save_and_load(tmp_path):
    for name, cls in dd.SCHEDULERS.items():
        overrides = {"timestep_spacing": "trailing"} if "timestep_spacing" in cls().config else {"lam": 0.5}
        sched = cls.from_config(dict(cls().config, **overrides))
        sched.save_pretrained(tmp_path / name)
        loaded = cls.from_pretrained(tmp_path / name)
        assert _public(loaded.config) == _public(sched.config) and type(loaded) is cls
        if diffusers_class(name) is not None:  # diffusers loads our saved config, and we load theirs
            theirs = diffusers_class(name).from_pretrained(tmp_path / name)
            assert _public(cls.from_config(theirs.config).config) == _public(sched.config)


def test_outputs_and_return_dict():
    sched = dd.EulerDiscreteScheduler()
    sched.set_timesteps(3)
    x = make_tensor(SHAPE, seed=1)
    t = sched.timesteps[0]
    out = sched.step(x, t, sched.scale_model_input(x, t), return_dict=False)
    assert isinstance(out, tuple) and len(out) == 2 and out[0].shape == x.shape
    dpm = dd.DPMSolverMultistepScheduler()
    dpm.set_timesteps(3)
    res = dpm.step(x, dpm.timesteps[0], x)
    assert isinstance(res, diffusers.schedulers.scheduling_utils.SchedulerOutput)
    assert len(dpm.step(x, dpm.timesteps[1], x, return_dict=False)) == 1
    assert dd.HeunDiscreteScheduler.order == 2 and dd.DDIMScheduler.order == 1
    assert dd.KDPM2DiscreteScheduler.order == dd.KDPM2AncestralDiscreteScheduler.order == 2
    kdpm2 = dd.KDPM2AncestralDiscreteScheduler()
    kdpm2.set_timesteps(3)
    firsts = []
    for t in kdpm2.timesteps:
        firsts.append(kdpm2.state_in_first_order)
        x = kdpm2.step(x, t, kdpm2.scale_model_input(x, t), generator=torch.Generator().manual_seed(0)).prev_sample
    assert firsts == [True, False, True, False, True] and torch.isfinite(x).all()


def test_add_noise_matches_diffusers():
    for name in ("DDIMScheduler", "DDPMScheduler"):
        theirs, ours = getattr(diffusers, name)(), getattr(dd, name)()
        x0, noise = make_tensor(SHAPE, seed=1), make_tensor(SHAPE, seed=2)
        t = torch.tensor([999, 3])
        torch.testing.assert_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t))
