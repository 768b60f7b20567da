"""Level 2 (``diffkern.diffusers.accelerate``) with ``clip_sample=True``, the default of DDPMScheduler, DDIMScheduler
and GEScheduler and of the standard unconditional checkpoints' configs (google/ddpm-cifar10-32).

In VE coordinates diffusers' ``pred_original_sample`` is the denoised D, so clipping x0 to [-r, r] clamps D (the
fused op's CLIP slot): DDPM's posterior mean is euler_ancestral(eta=1) on the clipped D; DDIM(eta) is
``x' = D_clip + (sigma_down/sigma)*(x - D) + sigma_up*xi`` with the model's own D in the direction, or the clipped
one with ``use_clipped_model_output`` (``clip_denoised`` and ``clipped_eps`` of euler_ancestral).

Oracles: deterministic configs (DDIM eta <= 0) against the stock pipeline run in float64 (``three_runs``), stochastic
ones (DDPM, DDIM eta > 0, GE mu > 0) against the stock pipeline driven by diffkern's Level-1 scheduler keyed by the
seed Level 2 draws (the method of test_level2_tail_noise's ``level1_runs``), in float64 and float32, both under ``assert_matches_reference``; the plan rows
against diffusers' DDIM row (:func:`diffkern.ops.ddim.ddim_row`, itself tested against DDIMScheduler.step).
"""
import importlib
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import diffkern  # noqa: E402
import diffkern.diffusers as dd  # noqa: E402
from diffkern import sampler_plans, coef_tables, schedules  # noqa: E402
from diffkern.diffusers.loop_spec import loop_spec  # noqa: E402
from diffkern.ops import coefs  # noqa: E402
from diffkern.ops.ddim import ddim_row  # noqa: E402
from diffkern.testing import assert_matches_reference  # noqa: E402
from test_diffusers_pipelines import float64_copy, pipeline_modules, three_runs, tiny_unet  # noqa: E402
from test_diffusers_schedulers import diffusers_float64  # noqa: E402

accelerate_module = importlib.import_module("diffkern.diffusers.accelerate")  # the package exports the function


def _pipe(cls, scheduler):
    pipe = cls(unet=tiny_unet(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _uncond(pipe, generator, num_inference_steps=4, **kw):
    return pipe(batch_size=2, generator=generator, num_inference_steps=num_inference_steps, output_type="pt",
                **kw).images


def _level1_runs(pipe, monkeypatch, **kw):
    """(Level 2, Level 1 float64, Level 1 float32): Level 1 is the stock pipeline with ``pipe.scheduler`` (a diffkern
    scheduler) keyed by the seed Level 2 draws, its steps given no generator (so they draw that Philox noise)."""
    seeds, real = [], accelerate_module._seed
    with monkeypatch.context() as m:
        m.setattr(accelerate_module, "_seed", lambda g, b: seeds.append(real(g, b)) or seeds[-1])
        ours = _uncond(dd.accelerate(pipe), torch.Generator().manual_seed(5), **kw)
    assert len(seeds) == 1, "the loop drew no seed: not a stochastic loop"

    def level1(p):
        sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
        sched.set_seed(seeds[0])
        step = sched.step
        sched.step = lambda *a, generator=None, **k: step(*a, **k)
        p.scheduler = sched
        return _uncond(p, torch.Generator().manual_seed(5), **kw)
    with diffusers_float64(*pipeline_modules(pipe)):
        truth = level1(float64_copy(pipe, None))
    return ours, truth, level1(pipe)


@pytest.mark.parametrize("config, kw", [
    ({}, {}),  # diffusers' defaults: clip_sample=True, range 1, eta 0
    ({"clip_sample_range": 0.5}, {"eta": 0.0}),
    ({"clip_sample_range": 0.5}, {"eta": 0.0, "use_clipped_model_output": True}),
    ({"clip_sample_range": 0.5}, {"eta": -0.4}),
    ({"prediction_type": "v_prediction", "clip_sample_range": 0.5}, {"eta": 0.0}),
], ids=str)
def test_ddim_clip_sample_matches_the_stock_pipeline(config, kw):
    ours, truth, eager = three_runs(lambda s: _pipe(diffusers.DDIMPipeline, s), "DDIMScheduler", config, _uncond, 2,
                                    **kw)
    assert (truth.abs() > 0).any()
    assert_matches_reference(ours, truth, eager, f"DDIMPipeline clip_sample {config} {kw}")


def test_the_clip_matters_here():
    """The comparisons above are not void: on this tiny UNet clipping changes the images."""
    runs = [_uncond(dd.accelerate(_pipe(diffusers.DDIMPipeline, diffusers.DDIMScheduler(clip_sample=c,
                                                                                       clip_sample_range=0.5))),
                    torch.Generator().manual_seed(5)) for c in (True, False)]
    assert (runs[0] - runs[1]).abs().max() > 1e-2


@pytest.mark.parametrize("cls, name, config, kw", [
    (diffusers.DDPMPipeline, "DDPMScheduler", {}, {}),
    (diffusers.DDPMPipeline, "DDPMScheduler", {"clip_sample_range": 0.5}, {}),
    (diffusers.DDIMPipeline, "DDIMScheduler", {"clip_sample_range": 0.5}, {"eta": 0.6}),
    (diffusers.DDIMPipeline, "DDIMScheduler", {}, {"eta": 1.0, "use_clipped_model_output": True}),
], ids=str)
def test_stochastic_clip_sample_is_level1(monkeypatch, cls, name, config, kw):
    pipe = _pipe(cls, getattr(dd, name).from_config(config))
    pipe.scheduler = getattr(dd, name).from_config(config)  # (DDIMPipeline converts at construction)
    ours, truth, eager = _level1_runs(pipe, monkeypatch, **kw)
    assert_matches_reference(ours, truth, eager, f"{cls.__name__} {name} clip_sample {config} {kw}: vs level 1")


@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_ge_clip_rows_are_ge_schedulers(mu):
    """GE with clip_denoised builds GEScheduler's clip_sample table (its conversion clamps D on every row)."""
    ours = dd.GEScheduler(clip_sample_range=0.5, mu=mu)
    ours.set_timesteps(5)
    want = ours._build(("ge", 0))[0]
    got = sampler_plans.PLANS["ge"](ours.sigmas_host, lambda s: {"p": 1.0, "q": -s}, gamma=ours.config.gamma,
                                    mu=mu, clip_denoised=0.5).table
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert loop_spec(ours).knobs == {"gamma": ours.config.gamma, "mu": mu, "clip_denoised": 0.5}


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clipped", [False, True])
def test_ve_rows_are_diffusers_ddim_rows(eta, clipped):
    """The plan's VE row equals the VP ddim_row conjugated by the state scaling x = z/sqrt(ab): a, b, g, s, clip."""
    ab_t, ab_p = 0.3, 0.6
    s, sn = schedules.alpha_bar_to_sigma(ab_t), schedules.alpha_bar_to_sigma(ab_p)
    plan = sampler_plans.PLANS["euler_ancestral"]([s, sn], coef_tables._identity, eta=eta, s_noise=1.0,
                                                  clip_denoised=0.5, clipped_eps=clipped)
    ve = plan.table[0]
    vp = ddim_row(ab_t, ab_p, eta=eta, clip_sample=True, clip_sample_range=0.5, use_clipped_model_output=clipped)
    # VP: z' = a z + b D + g D_raw + s xi with z = sqrt(ab) x; in VE: x' = (a sqrt(ab)/sqrt(ab')) x + (b, g, s)/sqrt(ab')
    k_t, k_p = math.sqrt(ab_t), math.sqrt(ab_p)
    want = {coefs.A: vp[coefs.A] * k_t / k_p, coefs.B: vp[coefs.B] / k_p, coefs.G: vp[coefs.G] / k_p,
            coefs.S: vp[coefs.S] / k_p, coefs.CLIP: 0.5}
    for slot, value in want.items():
        assert math.isclose(float(ve[slot]), value, rel_tol=1e-12, abs_tol=1e-14), (coefs.SLOT_NAMES[slot], ve, want)


def test_loop_spec_maps_clip_sample_and_refuses_the_rest():
    ddim = dd.DDIMScheduler(clip_sample_range=0.7)
    ddim.set_timesteps(5)
    spec = loop_spec(ddim, 0.0)
    assert spec.method == "euler_ancestral" and spec.knobs == {"eta": 0.0, "clip_denoised": 0.7, "clipped_eps": False}
    assert loop_spec(ddim, 0.3, True).knobs["clipped_eps"] is True
    ddpm = dd.DDPMScheduler()
    ddpm.set_timesteps(5)
    assert loop_spec(ddpm).knobs == {"eta": 1.0, "clip_denoised": 1.0}
    off = dd.DDIMScheduler(clip_sample=False)
    off.set_timesteps(5)
    assert loop_spec(off).method == "euler" and loop_spec(off).knobs == {}
    last = dd.DDIMScheduler(clip_sample_range=0.5, set_alpha_to_one=False)  # ends at t = 0: not an identity step
    last.set_timesteps(5)
    with pytest.raises(ValueError, match=r"set_alpha_to_one=False .*moves x by clip\(x0\) - x0"):
        loop_spec(last)
    with pytest.raises(ValueError, match="set_alpha_to_one=False"):  # refused when the pipeline is accelerated
        dd.accelerate(_pipe(diffusers.DDPMPipeline, diffusers.DDIMScheduler(set_alpha_to_one=False)))


def test_an_explicit_method_that_would_drop_the_clip_is_refused():
    pipe = _pipe(diffusers.DDPMPipeline, diffusers.DDPMScheduler())
    with pytest.raises(ValueError, match=r"^method: 'heun' does not clip x0"):
        _uncond(dd.accelerate(pipe, method="heun"), torch.Generator().manual_seed(5))
    ours = _uncond(dd.accelerate(pipe, method="euler_ancestral", clip_denoised=1.0, eta=0.5),
                   torch.Generator().manual_seed(5))
    assert torch.isfinite(ours).all()


@pytest.mark.parametrize("bad, exc, match", [
    (0.0, ValueError, r"^clip_denoised: expected a value in \(0, inf\]"),
    (-1.0, ValueError, r"^clip_denoised: expected"),
    (torch.tensor(1.0), TypeError, r"^clip_denoised: expected a number"),
])
def test_clip_denoised_is_validated(bad, exc, match):
    sig = schedules.karras(4, 0.1, 10.0)
    x = torch.randn(2, 3) * 10
    for method in ("euler_ancestral", "ge"):
        with pytest.raises(exc, match=match):
            diffkern.sample(lambda x, s: x * 0, x, sig, method, clip_denoised=bad, backend="reference")
    with pytest.raises(TypeError, match=r"^clipped_eps: expected a bool"):
        diffkern.sample(lambda x, s: x * 0, x, sig, "euler_ancestral", clip_denoised=1.0, clipped_eps=1,
                        backend="reference")
