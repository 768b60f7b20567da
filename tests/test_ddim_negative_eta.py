"""DDIM with eta < 0, as diffusers 0.42.1 runs it: ``DDIMPipeline`` only warns, and ``DDIMScheduler.step`` takes
``std_dev_t = eta*sqrt(variance)`` (negative), whose square sets the direction term, and adds noise only for
eta > 0, so the step is the deterministic part of DDIM(|eta|) and the generator is not drawn from. Where
``1 - alpha_prod_t_prev - std_dev_t^2 < 0`` (|eta| > 1 on some step) diffusers returns NaN; ours raises ValueError
naming eta, at Level 1 (``step``) and at Level 2 (``accelerate``).

Numerical parity: the project rule of tests/test_diffusers_schedulers.py (diffusers run in float64 is the truth;
ours within ``2*max|diffusers32 - truth| + 2e-6*max(1, max|truth|)`` of it), per call and on whole pipelines.
"""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.ops import ddim_row  # noqa: E402
from test_diffusers_pipelines import three_runs, tiny_unet, unconditional  # noqa: E402
from test_diffusers_schedulers import check_calls, diffusers_float64, scheduler_module  # noqa: E402

from diffusers import DDIMPipeline  # noqa: E402

STEPS = 5
CONFIGS = [{}, {"clip_sample": False}, {"prediction_type": "v_prediction", "set_alpha_to_one": False},
           {"prediction_type": "sample", "timestep_spacing": "trailing", "clip_sample": False}]


def three_schedulers(config, steps=STEPS):
    """(truth, eager, ours) DDIM schedulers of ``config`` after set_timesteps(steps)."""
    with diffusers_float64(scheduler_module("DDIMScheduler")):
        truth = diffusers.DDIMScheduler(**config)
        truth.set_timesteps(steps)
    eager = diffusers.DDIMScheduler(**config)
    eager.set_timesteps(steps)
    ours = dd.DDIMScheduler.from_config(eager.config)
    ours.set_timesteps(steps)
    return truth, eager, ours


@pytest.mark.parametrize("eta", [-0.5, -1.0, -0.05])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("clipped", [False, True])
def test_step_matches_diffusers(config, eta, clipped):
    truth, eager, ours = three_schedulers(config)
    kw = {"eta": eta, "use_clipped_model_output": clipped}
    check_calls("DDIMScheduler", truth, eager, ours, kw, f"DDIM {config} {kw}")


def test_step_draws_no_noise():
    """diffusers draws nothing from the generator for eta < 0: ours neither, and the result does not depend on it."""
    x, m = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    fresh = torch.Generator().manual_seed(3).get_state()
    outs = []
    for seed, which in ((3, 1), (3, 2), (4, 2)):
        sched = three_schedulers({"clip_sample": False})[which]
        gen = torch.Generator().manual_seed(seed)
        before = gen.get_state()
        outs.append(sched.step(m, sched.timesteps[0], x, eta=-0.7, generator=gen).prev_sample)
        assert torch.equal(gen.get_state(), before)
    assert torch.equal(before, torch.Generator().manual_seed(4).get_state()) and not torch.equal(before, fresh)
    assert torch.equal(outs[1], outs[2])
    assert (outs[1] - outs[0]).abs().max() <= 1e-5 * max(1.0, float(outs[0].abs().max()))


def test_step_equals_deterministic_part_of_abs_eta():
    """The direction term is that of |eta|: eta < 0 is DDIM(|eta|) with its noise set to zero."""
    _, _, neg = three_schedulers({"clip_sample": False})
    _, _, pos = three_schedulers({"clip_sample": False})
    x, m = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    t = neg.timesteps[1]
    for s in (neg, pos):
        s.set_begin_index(1)
    a = neg.step(m, t, x, eta=-0.8).prev_sample
    b = pos.step(m, t, x, eta=0.8, variance_noise=torch.zeros_like(x)).prev_sample
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("eta", [-3.0, 1.5])
def test_nan_in_diffusers_raises(eta):
    """Where diffusers' direction term is the root of a negative number (NaN), ours names eta."""
    _, eager, ours = three_schedulers({"clip_sample": False})
    x, m = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    t = eager.timesteps[0]
    assert eager.step(m, t, x, eta=eta).prev_sample.isnan().all()
    with pytest.raises(ValueError, match=rf"^eta: {eta} makes 1 - alpha_prod_t_prev - \(eta\*sigma_t\)\^2 = .* < 0"):
        ours.step(m, t, x, eta=eta)
    assert ours.step_index == 0  # not advanced: the loop goes on with a valid eta
    ours.step(m, t, x, eta=-1.0)
    assert ours.step_index == 1


def test_row_bounds():
    """|eta| <= 1 never raises (the direction's radicand is >= 0 up to rounding, clamped); the bound named in the
    message is where the radicand reaches 0."""
    for ab, ab_prev in ((0.01, 0.02), (0.5, 0.6), (0.9, 1.0), (0.2, 0.2)):
        for eta in (-1.0, -0.3, 1.0):
            ddim_row(ab, ab_prev, eta=eta)
    var = (1 - 0.6) / (1 - 0.5) * (1 - 0.5 / 0.6)
    bound = ((1 - 0.6) / var) ** 0.5
    ddim_row(0.5, 0.6, eta=-bound * (1 - 1e-9))
    with pytest.raises(ValueError, match=f"expected \\|eta\\| <= {bound:.6g}"):
        ddim_row(0.5, 0.6, eta=-bound * (1 + 1e-9))


@pytest.mark.parametrize("level", [1, 2])
@pytest.mark.parametrize("eta", [-0.5, -1.0])
def test_pipeline(eta, level):
    config = {"clip_sample": False}  # (Level 2 refuses clip_sample)
    ours, truth, eager = three_runs(lambda s: DDIMPipeline(unet=tiny_unet(), scheduler=s), "DDIMScheduler", config,
                                    unconditional, level, eta=eta)
    assert 0.1 < float(((eager > 0) & (eager < 1)).float().mean()), "images saturated: the comparison would be void"
    from diffkern.testing import assert_matches_reference
    assert_matches_reference(ours, truth, eager, f"DDIMPipeline eta={eta} level {level}")


@pytest.mark.parametrize("level", [1, 2])
def test_pipeline_nan_raises(level):
    pipe = DDIMPipeline(unet=tiny_unet(), scheduler=diffusers.DDIMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    stock = pipe(batch_size=1, generator=gen, num_inference_steps=STEPS, eta=-3.0, output_type="pt").images
    assert stock.isnan().any()
    if level == 1:
        pipe.scheduler = dd.DDIMScheduler.from_config(pipe.scheduler.config)
    run = pipe if level == 1 else dd.accelerate(pipe)
    with pytest.raises(ValueError, match=r"^eta: -3\.0 makes"):
        run(batch_size=1, generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS, eta=-3.0,
            output_type="pt")
