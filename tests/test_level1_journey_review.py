"""Level-1 drop-in schedulers in a user's own loop (not a pipeline's), against diffusers' scheduler of the same name.

One journey (:func:`_journey`) does what hand-written loops do: ``set_timesteps`` twice (the first loop abandoned),
``scale_model_input`` then ``step`` with the timestep as a tensor, a Python number, a NumPy scalar or a fresh 0-d
tensor, ``return_dict`` both ways, a 5-D non-contiguous (video) sample and model output, one generator per batch
element, and a ``copy.deepcopy`` mid-loop whose two copies then run interleaved to the end on different model
outputs (they must share no state). The model is a fixed function of its input, so each run follows its own chain.
Truth: diffusers' module run in float64 (``test_diffusers_schedulers.diffusers_float64``); the rule
``assert_matches_reference`` holds ours to at most twice diffusers' own float32 (or 16-bit) error.

Regressions found here:
- UniPC and SA-Solver returned the promoted dtype (float32) for a 16-bit sample with a float32 model output;
  diffusers returns the sample's dtype (``x_t.to(x.dtype)``).
- ``get_velocity`` (the v-prediction training target) was missing on DDIM, DDPM, LCM and TCD.
- ``step()`` silently detached its output where diffusers' step is differentiable: it now warns once.
"""
import copy
import importlib
import inspect
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.testing import assert_matches_reference, make_tensor, noncontiguous  # noqa: E402
from test_diffusers_schedulers import diffusers_class, diffusers_float64  # noqa: E402

# DPMSolverSDE draws diffusers' noise from a torchsde Brownian tree, ours the same law from Philox (different draws);
# it is compared with diffusers at s_noise = 0 in tests/test_dpmsolver_sde_scheduler.py
NAMES = sorted(n for n in dd.SCHEDULERS if diffusers_class(n) is not None and n != "DPMSolverSDEScheduler")
SHAPE = (2, 2, 3, 4, 5)  # (B, C, F, H, W): video latents


def _module(name):
    return importlib.import_module(diffusers_class(name).__module__)


def _timestep(t, k):
    """Step k's timestep as the k-th kind a loop may pass: the schedule's own tensor, a Python number, a NumPy
    scalar, a 0-d tensor that is not a view of the schedule."""
    return (t, t.item(), t.numpy()[()], t.clone())[k % 4]


def _model(x_in, k, branch, dtype):
    """A fixed 'network': affine in its input, computed in float64, returned in ``dtype``, non-contiguous."""
    z = make_tensor(x_in.shape, torch.float64, seed=1000 * branch + k)
    return noncontiguous((0.5 * x_in.double() + 0.3 * z).to(dtype))


def _journey(sched, scaled: bool, x_dtype, m_dtype, steps=6, copy_at=3):
    """Run the journey on ``sched`` (ours, diffusers', or diffusers' in float64 with float64 dtypes); returns the
    final samples of both copies and the last step's second output (x0 estimate) where the class gives one."""
    stochastic = "generator" in inspect.signature(sched.step).parameters

    def call(s, x, t, k, branch):
        x_in = s.scale_model_input(x, t) if scaled else x
        kw = {"generator": [torch.Generator().manual_seed(100 * k + b) for b in range(x.shape[0])]} \
            if stochastic else {}
        as_dict = k % 2 == 0
        out = s.step(_model(x_in, k, branch, m_dtype), t, x, return_dict=as_dict, **kw)
        return tuple(out.values()) if as_dict else out

    sched.set_timesteps(9)  # a first loop, abandoned after two calls
    x = make_tensor(SHAPE, torch.float64, seed=1).to(x_dtype)
    for k, t in enumerate(sched.timesteps[:2]):
        call(sched, x, _timestep(t, k), k, 7)
    sched.set_timesteps(steps)
    x = noncontiguous(make_tensor(SHAPE, torch.float64, seed=2) * float(getattr(sched, "init_noise_sigma", 1.0)))
    x = x.to(x_dtype)
    ts = list(sched.timesteps)
    for k, t in enumerate(ts[:copy_at]):
        x = call(sched, x, _timestep(t, k), k, 0)[0]
    twin, y = copy.deepcopy(sched), x.clone()
    for k, t in enumerate(ts[copy_at:], copy_at):
        out = call(sched, x, _timestep(t, k), k, 0)
        x, y = out[0], call(twin, y, _timestep(t, k + 1), k, 1)[0]
    if hasattr(type(sched), "step_index"):  # (diffusers' DDIM, DDPM and PNDM have none)
        assert sched.step_index == twin.step_index == len(ts)
    return x, y, (out[1] if len(out) > 1 else None)


def _three_runs(name, x_dtype=torch.float32, m_dtype=torch.float32):
    """(truth, diffusers, ours) journeys; the truth in float64."""
    theirs = diffusers_class(name)()
    scaled = hasattr(theirs, "scale_model_input")
    ours = getattr(dd, name).from_config(theirs.config)
    with diffusers_float64(_module(name)):
        truth = _journey(diffusers_class(name)(), scaled, torch.float64, torch.float64)
    return truth, _journey(theirs, scaled, x_dtype, m_dtype), _journey(ours, scaled, x_dtype, m_dtype)


def _check(truth, eager, got, what):
    for i, part in enumerate(("copy", "twin", "x0 estimate")):
        if eager[i] is None:
            assert got[i] is None, f"{what}: diffusers gives no {part}"
            continue
        assert_matches_reference(got[i], truth[i], eager[i], f"{what} {part}")


@pytest.mark.parametrize("name", NAMES)
def test_hand_written_loop_matches_diffusers(name):
    truth, eager, got = _three_runs(name)
    _check(truth, eager, got, name)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16])
def test_sixteen_bit_sample_with_float32_model_output(name, x_dtype):
    """A 16-bit latent with a float32 network output (an upcast head, autocast): prev_sample in diffusers' dtype
    (UniPC and SA-Solver gave float32), within the rule of diffusers' own run."""
    truth, eager, got = _three_runs(name, x_dtype, torch.float32)
    _check(truth, eager, got, f"{name} {x_dtype} sample, float32 model output")


@pytest.mark.parametrize("name", ["UniPCMultistepScheduler", "SASolverScheduler"])
def test_multistep_output_dtype_is_the_samples(name):
    """The promoted dtype is kept for the computation, the sample's returned: float32 sample and float64 model
    output give float32, as diffusers."""
    for s in (theirs := diffusers_class(name)(), ours := getattr(dd, name)()):
        s.set_timesteps(3)
    x, m = make_tensor((2, 3, 4)), make_tensor((2, 3, 4), torch.float64, seed=1)
    gen = {"generator": torch.Generator().manual_seed(0)} if name.startswith("SA") else {}
    for t_theirs, t_ours in zip(theirs.timesteps, ours.timesteps):
        want = theirs.step(m, t_theirs, x, **copy.deepcopy(gen)).prev_sample
        got = ours.step(m, t_ours, x, **copy.deepcopy(gen)).prev_sample
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        x = want

#----------------------------------------------------------------------------
# get_velocity (training scripts' v-prediction target).


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler", "LCMScheduler", "TCDScheduler"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_get_velocity_matches_diffusers(name, dtype):
    config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    with diffusers_float64(_module(name)):
        truth = diffusers_class(name)(**config)
    theirs = diffusers_class(name)(**config)
    ours = getattr(dd, name).from_config(theirs.config)
    x, noise = make_tensor((3, 2, 4, 4), dtype, seed=1), make_tensor((3, 2, 4, 4), dtype, seed=2)
    for t in (torch.tensor([0, 411, 999]), torch.tensor([523]), torch.tensor(7)):
        with diffusers_float64(_module(name)):
            ref = truth.get_velocity(x.double(), noise.double(), t)
        want = theirs.get_velocity(x, noise, t)
        for given in (t, t.to(torch.int32), int(t.reshape(-1)[0]) if t.numel() == 1 else t):
            assert_matches_reference(ours.get_velocity(x, noise, given), ref, want, f"{name} {dtype} t={t.tolist()}")
    # a float32 noise with a 16-bit sample promotes, as diffusers' arithmetic does
    assert ours.get_velocity(x, noise.float(), 5).dtype == theirs.get_velocity(x, noise.float(),
                                                                               torch.tensor(5)).dtype

#----------------------------------------------------------------------------
# Autograd: the fused step has no backward.


@pytest.mark.parametrize("name", ["DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler",
                                  "DPMSolverSinglestepScheduler", "FlowMatchEulerDiscreteScheduler"])
def test_step_warns_once_when_gradients_would_be_lost(name):
    def run(grad: bool):
        sched = getattr(dd, name)()
        sched.set_timesteps(3)
        x, outs = make_tensor((2, 3, 4)), []
        with warnings.catch_warnings(record=True) as seen, torch.set_grad_enabled(grad):
            warnings.simplefilter("always")
            for k, t in enumerate(sched.timesteps):
                m = make_tensor((2, 3, 4), seed=k).requires_grad_()
                x = sched.step(m, t, x).prev_sample
                outs.append(x)
        return outs, [w for w in seen if "not differentiable" in str(w.message)]

    quiet, none = run(grad=False)
    loud, once = run(grad=True)
    assert not none and len(once) == 1 and "torch.no_grad()" in str(once[0].message)
    for a, b in zip(loud, quiet):  # same values either way
        torch.testing.assert_close(a, b, rtol=0, atol=0)

#----------------------------------------------------------------------------
# torch.compile of a function that calls step().


@pytest.mark.parametrize("name, seeded", [("UniPCMultistepScheduler", False),
                                          ("EulerAncestralDiscreteScheduler", True)])
def test_compiled_step_equals_eager(name, seeded):
    """Not fullgraph (the host step index is Python state): it must neither crash nor change a number. The
    ancestral scheduler draws its Philox noise from a seed (no generator)."""
    def run(compiled: bool):
        torch._dynamo.reset()
        sched = getattr(dd, name)()
        if seeded:
            sched.set_seed(3)
        sched.set_timesteps(4)

        def step(m, t, x):
            return sched.step(m, t, x, return_dict=False)[0]

        fn = torch.compile(step, backend="aot_eager") if compiled else step
        x = make_tensor((1, 2, 3, 3))
        for k, t in enumerate(sched.timesteps):
            x = fn(make_tensor((1, 2, 3, 3), seed=k), t, sched.scale_model_input(x, t))
        return x

    torch.testing.assert_close(run(True), run(False), rtol=0, atol=0)
