"""diffkern.diffusers.IPNDMScheduler against diffusers' IPNDMScheduler: step by step, in float64 (the truth: diffusers
run with float64 as torch's default dtype, so its linspace/sin/atan2 schedule is float64) and float32 (the project's
rule, diffkern.testing.assert_matches_reference), across step counts, starts and shapes; plus the API (config,
save/load, from_config of other configs, refusals) and a float64 textbook loop as a second oracle."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.testing import SHAPES, assert_matches_reference, make_tensor  # noqa: E402

NAME = "IPNDMScheduler"


@contextlib.contextmanager
def float64_default():
    """diffusers' IPNDM builds its schedule with torch.linspace/torch.tensor: the default dtype makes it float64."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _schedulers(steps, begin=None, backend=None):
    with float64_default():
        truth = diffusers.IPNDMScheduler()
        truth.set_timesteps(steps)
    eager = diffusers.IPNDMScheduler()
    eager.set_timesteps(steps)
    ours = dd.IPNDMScheduler.from_config(eager.config)
    ours.backend = backend
    ours.set_timesteps(steps)
    if begin is not None:
        for s in (truth, eager, ours):
            s.set_begin_index(begin)
    return truth, eager, ours


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 12, 50])
@pytest.mark.parametrize("begin", [None, 2])
def test_matches_diffusers_step_by_step(steps, begin):
    if begin is not None and begin >= steps:
        pytest.skip("start past the schedule")
    truth, eager, ours = _schedulers(steps, begin)
    # float32 timesteps: ours are the float64 schedule rounded once, diffusers' float32 arithmetic is off by ulps
    assert ours.timesteps.dtype == eager.timesteps.dtype == torch.float32
    assert_matches_reference(ours.timesteps.double(), truth.timesteps, eager.timesteps.double(), "IPNDM timesteps")
    x = make_tensor((2, 3, 5, 7), torch.float64, seed=1)
    start = begin or 0
    for k in range(start, steps):
        m = make_tensor((2, 3, 5, 7), torch.float64, seed=100 + k)
        with float64_default():
            ref = truth.step(m, truth.timesteps[k], x).prev_sample
        out = eager.step(m.float(), eager.timesteps[k], x.float()).prev_sample
        got = ours.step(m.float(), ours.timesteps[k], x.float()).prev_sample
        assert_matches_reference(got, ref, out, f"IPNDM steps={steps} begin={begin} step {k}")
        x = ref
    assert ours.step_index == steps


def _textbook(steps, x, models):
    """iPNDM written out in float64 from the formulas (module docstring of diffkern.diffusers.schedulers_ipndm)."""
    u = [1.0 - k / steps for k in range(steps)] + [0.0]
    beta = [math.sin(v * math.pi / 2) ** 2 for v in u]
    alpha = [math.sqrt(1.0 - b * b) for b in beta]
    weights = {1: (1,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
    ets = []
    for k in range(steps):
        ets.append(beta[k] * x + alpha[k] * models[k](x))
        w = weights[min(len(ets), 4)]
        e = sum(wj * ets[-1 - j] for j, wj in enumerate(w))
        x = alpha[k + 1] * (x - beta[k] * e) / max(alpha[k], 1e-8) + beta[k + 1] * e
    return x


@pytest.mark.parametrize("steps", [1, 4, 9])
def test_float64_run_is_the_textbook_loop(cpu_backend, steps):
    """The whole loop in float64 on every CPU backend, the model a fixed nonlinear map, against the formulas."""
    ours = dd.IPNDMScheduler()
    ours.backend = cpu_backend
    ours.set_timesteps(steps)
    models = [lambda z, k=k: torch.tanh(z * (0.5 + 0.1 * k)) for k in range(steps)]
    x0 = make_tensor((3, 4, 5), torch.float64, seed=2)
    x = x0
    for k, t in enumerate(ours.timesteps):
        x = ours.step(models[k](x), t, x).prev_sample
    torch.testing.assert_close(x, _textbook(steps, x0, models), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_awkward_shapes_and_non_contiguous(shape):
    truth, eager, ours = _schedulers(6)
    x = make_tensor(shape, torch.float64, seed=3)
    for k in range(6):
        m = make_tensor(shape, torch.float64, seed=10 + k)
        with float64_default():
            ref = truth.step(m, truth.timesteps[k], x).prev_sample
        out = eager.step(m.float(), eager.timesteps[k], x.float()).prev_sample
        m32 = m.float()
        if m32.dim() >= 2 and m32.shape[-1] > 1:  # a non-contiguous view of the same values
            m32 = m32.transpose(-1, -2).contiguous().transpose(-1, -2)
        got = ours.step(m32, ours.timesteps[k], x.float()).prev_sample
        assert got.shape == ref.shape
        assert_matches_reference(got, ref, out, f"IPNDM shape {shape} step {k}")
        x = ref


def test_config_save_load_and_from_config(tmp_path):
    ours = dd.IPNDMScheduler(num_train_timesteps=500)
    ours.save_pretrained(tmp_path)
    back = dd.IPNDMScheduler.from_pretrained(tmp_path)
    theirs = diffusers.IPNDMScheduler.from_pretrained(tmp_path)
    assert type(back) is dd.IPNDMScheduler
    assert back.config.num_train_timesteps == 500 == theirs.config.num_train_timesteps
    assert dd.SCHEDULERS[NAME] is dd.IPNDMScheduler and NAME in dd.__all__
    assert len(back.timesteps) == 500 and back.init_noise_sigma == 1.0 and back.order == 1
    sd = diffusers.PNDMScheduler(beta_schedule="scaled_linear").config  # keys it does not take are ignored
    assert dd.IPNDMScheduler.from_config(sd).config.num_train_timesteps == 1000


def test_refusals_name_the_argument():
    with pytest.raises(ValueError, match="trained_betas"):
        dd.IPNDMScheduler(trained_betas=[0.1] * 11)
    with pytest.raises(ValueError, match="num_inference_steps: expected an int >= 1"):
        dd.IPNDMScheduler().set_timesteps(0)
    sched = dd.IPNDMScheduler()
    sched.set_timesteps(3)
    x = torch.zeros(2, 3)
    with pytest.raises(NotImplementedError, match="add_noise"):
        sched.add_noise(x, x, sched.timesteps[:1])
    with pytest.raises(ValueError, match="timestep: expected"):
        sched.step(x, sched.timesteps[0], x)
        sched.step(x, sched.timesteps[0], x)  # out of order


def test_accelerate_refuses_by_name():
    pipe = diffusers.DDPMPipeline(unet=diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3,
                                                            block_out_channels=(8, 8), layers_per_block=1,
                                                            norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                                                            up_block_types=("UpBlock2D",) * 2),
                                  scheduler=diffusers.IPNDMScheduler())
    with pytest.raises(ValueError, match="IPNDMScheduler is not supported by the fused loop"):
        dd.accelerate(pipe)
