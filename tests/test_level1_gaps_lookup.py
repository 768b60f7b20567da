"""Level-1 drop-in gaps, part 2 (see tests/test_level1_gaps.py): ``index_for_timestep``, ``previous_timestep``,
``init_noise_sigma``'s type, ``add_noise`` off the schedule, the second call of Heun/KDPM2 given another sample,
``step()`` input errors naming step()'s arguments, the one ``num_inference_steps`` check, and DDPMPipeline's
refusal of ``eta`` under ``accelerate``. diffusers' own classes are the oracle; numerical parity uses the project
rule (:func:`diffkern.testing.assert_matches_reference` against diffusers run in float64)."""
import inspect

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.testing import assert_matches_reference, make_tensor  # noqa: E402
from test_diffusers_schedulers import diffusers_class, diffusers_float64, scheduler_module  # noqa: E402

NAMES = sorted(n for n in dd.SCHEDULERS if diffusers_class(n) is not None)
LOOKUP = [n for n in NAMES if hasattr(diffusers_class(n), "index_for_timestep")]


def _pair(name, steps=6):
    theirs = diffusers_class(name)()
    ours = getattr(dd, name).from_config(theirs.config)
    if steps:
        theirs.set_timesteps(steps)
        ours.set_timesteps(steps)
    return theirs, ours


def _outcome(fn):
    try:
        return fn()
    except IndexError:
        return IndexError


#----------------------------------------------------------------------------
# 2. index_for_timestep, previous_timestep.

def test_public_lookups_exist_where_diffusers_has_them():
    for name in NAMES:
        for method in ("index_for_timestep", "previous_timestep"):
            if hasattr(diffusers_class(name), method):
                assert callable(getattr(getattr(dd, name), method, None)), f"{name}.{method}"


@pytest.mark.parametrize("name", LOOKUP)
def test_index_for_timestep_matches_diffusers(name):
    """Each scheduler probed with its own timesteps (fractional ones may differ in their last float32 bit)."""
    theirs, ours = _pair(name)
    for probe in (lambda ts: ts[0], lambda ts: ts[1], lambda ts: ts[2], lambda ts: ts[-1],
                  lambda ts: ts[-1] + 0.25, lambda ts: -5, lambda ts: float(ts[2])):
        want = _outcome(lambda: theirs.index_for_timestep(probe(theirs.timesteps)))
        assert _outcome(lambda: ours.index_for_timestep(probe(ours.timesteps))) == want, name
    custom = torch.tensor([5.0, 3.0, 3.0, 1.0])  # an explicit schedule, a repeated value: the second one
    assert ours.index_for_timestep(3.0, custom) == theirs.index_for_timestep(3.0, custom) == 2


@pytest.mark.parametrize("name", ["DDPMScheduler", "LCMScheduler", "TCDScheduler"])
def test_previous_timestep_matches_diffusers(name):
    theirs, ours = _pair(name, steps=0)
    assert ours.previous_timestep(500) == theirs.previous_timestep(500) == 499  # before set_timesteps: t - 1
    for kw in ({"num_inference_steps": 4},) + (({"timesteps": [900, 500, 20]},) if name == "DDPMScheduler" else ()):
        theirs.set_timesteps(**kw)
        ours.set_timesteps(**kw)
        for t in ours.timesteps:
            got, want = ours.previous_timestep(t), theirs.previous_timestep(t)
            assert isinstance(got, torch.Tensor) and got.dim() == 0 and int(got) == int(want), (name, kw, t)
        with pytest.raises(IndexError):
            theirs.previous_timestep(ours.timesteps[0] + 1)
        with pytest.raises(IndexError, match="timestep"):
            ours.previous_timestep(ours.timesteps[0] + 1)


#----------------------------------------------------------------------------
# 3. init_noise_sigma.

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("spacing", ["linspace", "leading"])
def test_init_noise_sigma_has_diffusers_type(name, spacing):
    try:
        theirs = diffusers_class(name)(timestep_spacing=spacing)
        theirs.set_timesteps(5)
    except (TypeError, ValueError):  # (a config without timestep_spacing, or without this spacing)
        theirs = diffusers_class(name)()
        theirs.set_timesteps(5)
    if not hasattr(theirs, "init_noise_sigma"):
        return
    ours = getattr(dd, name).from_config(theirs.config)
    ours.set_timesteps(5)
    want, got = theirs.init_noise_sigma, ours.init_noise_sigma
    assert type(got) is type(want), name
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape and got.device == want.device
    np.testing.assert_allclose(float(got), float(want), rtol=2e-6)


#----------------------------------------------------------------------------
# 4. add_noise, on and off the schedule.

ADD_NOISE = [n for n in LOOKUP if n not in ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler",
                                            "EDMEulerScheduler", "EDMDPMSolverMultistepScheduler",
                                            "LCMScheduler", "TCDScheduler", "SASolverScheduler")
            and hasattr(diffusers_class(n), "add_noise")]


@pytest.mark.parametrize("name", ADD_NOISE)
def test_add_noise_picks_the_sigma_diffusers_picks(name):
    """On the schedule: each timestep's sigma (second of two equal ones). Off it: the last timestep's sigma for the
    DPM-Solver family, IndexError for the others, as diffusers. After set_begin_index: the begin step's."""
    theirs, ours = _pair(name)
    x0, noise = make_tensor((4, 3, 2), torch.float64, seed=1), make_tensor((4, 3, 2), torch.float64, seed=2)
    ts = ours.timesteps  # (even positions: no KDPM2 midpoint timesteps, which may differ in their last float32 bit)
    off = ts[2] + (0.5 if ts.dtype.is_floating_point else 1)
    for t in (ts[[0, 2, 4, -1]], torch.stack([ts[2], off, ts[0], ts[-1]])):
        with diffusers_float64(scheduler_module(name)):
            truth = diffusers_class(name)()
            truth.set_timesteps(6)
            want = _outcome(lambda: truth.add_noise(x0, noise, t.to(truth.timesteps.dtype)))
        eager = _outcome(lambda: theirs.add_noise(x0.float(), noise.float(), t))
        got = _outcome(lambda: ours.add_noise(x0.float(), noise.float(), t))
        if want is IndexError:
            assert got is IndexError and eager is IndexError, name
            with pytest.raises(IndexError, match=r"timesteps: \[.*\] not in the schedule"):
                ours.add_noise(x0.float(), noise.float(), t)
        else:
            assert_matches_reference(got, want, eager, f"{name} add_noise {t.tolist()}")
    theirs.set_begin_index(2)
    ours.set_begin_index(2)
    t = torch.stack([off, ts[0]])
    assert torch.allclose(ours.add_noise(x0[:2].float(), noise[:2].float(), t),
                          theirs.add_noise(x0[:2].float(), noise[:2].float(), t), rtol=1e-6, atol=1e-6)


#----------------------------------------------------------------------------
# 5. The second call of Heun / KDPM2 starts from the first call's sample, whatever sample it is given.

@pytest.mark.parametrize("name, config", [
    ("HeunDiscreteScheduler", {}), ("HeunDiscreteScheduler", {"prediction_type": "v_prediction"}),
    ("HeunDiscreteScheduler", {"prediction_type": "sample", "use_karras_sigmas": True}),
    ("KDPM2DiscreteScheduler", {}), ("KDPM2DiscreteScheduler", {"prediction_type": "v_prediction"}),
    ("KDPM2AncestralDiscreteScheduler", {})])
def test_second_call_with_another_sample_matches_diffusers(name, config):
    """The second call gets a sample unrelated to the first call's output (a guidance hook, an inpainting blend):
    diffusers builds the update from its stored first-call sample and uses the given one only in the slope."""
    with diffusers_float64(scheduler_module(name)):
        truth = getattr(diffusers, name)(**config)
        truth.set_timesteps(4)
    eager = getattr(diffusers, name)(**config)
    eager.set_timesteps(4)
    ours = getattr(dd, name).from_config(eager.config)
    ours.set_timesteps(4)
    x = make_tensor((2, 3, 4, 5), torch.float64, seed=3) * float(truth.init_noise_sigma)
    gens = [torch.Generator().manual_seed(5) for _ in range(3)]
    for k in range(len(ours.timesteps)):
        m = make_tensor(x.shape, torch.float64, seed=50 + k)
        if k % 2:  # another sample than the first call returned
            x = x + make_tensor(x.shape, torch.float64, seed=70 + k)
        kw = [{"generator": g} if "generator" in inspect.signature(eager.step).parameters else {} for g in gens]
        with diffusers_float64(scheduler_module(name)):
            ref = truth.step(m, truth.timesteps[k], x, **kw[0])
        out = eager.step(m.float(), eager.timesteps[k], x.float(), **kw[1])
        got = ours.step(m.float(), ours.timesteps[k], x.float(), **kw[2])
        assert_matches_reference(got.prev_sample, ref.prev_sample, out.prev_sample, f"{name} {config} call {k}")
        assert_matches_reference(got.pred_original_sample, ref.pred_original_sample, out.pred_original_sample,
                                 f"{name} {config} call {k} x0")
        x = ref.prev_sample


#----------------------------------------------------------------------------
# 6. step() input errors name step()'s arguments; 7. one num_inference_steps check.

X = torch.zeros(2, 3, 4, 4)


@pytest.mark.parametrize("name", sorted(dd.SCHEDULERS))
@pytest.mark.parametrize("args, error, match", [
    ((torch.zeros(2, 3, 4, 5), None, X), ValueError, r"^model_output: expected the shape of sample \(2, 3, 4, 4\)"),
    ((torch.zeros(2, 3, 4, 4, dtype=torch.int64), None, X), TypeError, r"^model_output: expected a floating-point"),
    (([0.0], None, X), TypeError, r"^model_output: expected a tensor, got list"),
    ((X, None, 1.5), TypeError, r"^sample: expected a tensor, got float"),
    ((X, None, X.bool()), TypeError, r"^sample: expected a real tensor"),
    ((X, "t", X), TypeError, r"^timestep: expected a number or a tensor, got str"),
])
def test_step_errors_name_step_arguments(name, args, error, match):
    sched = dd.SCHEDULERS[name]()
    sched.set_timesteps(4)
    model_output, timestep, sample = args
    with pytest.raises(error, match=match):
        sched.step(model_output, sched.timesteps[0] if timestep is None else timestep, sample)


@pytest.mark.parametrize("name", sorted(dd.SCHEDULERS))
@pytest.mark.parametrize("bad", [0, -1, 2.5, True, np.True_, "4"])
def test_num_inference_steps_check_is_one_wording(name, bad):
    with pytest.raises(ValueError, match=rf"^{name}: num_inference_steps: expected an int (>= 1|in \[1, num_train_"
                       rf"timesteps=1000\]), got "):
        dd.SCHEDULERS[name]().set_timesteps(bad)


#----------------------------------------------------------------------------
# 8. DDPMPipeline takes no eta / use_clipped_model_output: accelerate refuses them as the stock call does.

def test_accelerated_ddpm_pipeline_refuses_eta_as_diffusers():
    from diffusers import UNet2DModel
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    fast = dd.accelerate(pipe)
    for kw in ({"eta": 0.5}, {"use_clipped_model_output": True}):
        with pytest.raises(TypeError) as want:
            pipe(num_inference_steps=2, output_type="pt", **kw)
        with pytest.raises(TypeError) as got:
            fast(num_inference_steps=2, output_type="pt", **kw)
        assert str(got.value) == str(want.value)
