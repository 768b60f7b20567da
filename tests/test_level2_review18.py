"""Adversarial-user review (session 18) of Level 2 (``diffkern.diffusers.accelerate``): a diffusers user swaps
``pipe`` for ``accelerate(pipe)`` in existing code and calls it as before. Each call either gives the stock
pipeline's images (the project rule, ``diffkern.testing.assert_matches_reference``: the float64 pipeline is the
truth, the stock float32 run the yardstick) or raises an error naming the argument.

Regressions:
- ``DDIMPipeline`` given ``eta`` with a scheduler whose ``step`` takes none (``pipe.scheduler =
  DPMSolverMultistepScheduler...``): the stock loop raises TypeError, the fused loop ran the scheduler without eta
  (``eta=0.5`` silently gave the deterministic images); it now raises naming eta;
- user ``latents`` of the wrong batch, channel count, rank or dtype failed deep in the UNet or the VAE (the stock
  pipeline does too, with e.g. "The size of tensor a (32) must match ..."); they now raise naming latents.
Journeys pinned: unconditional pipelines with one generator, a list, or None (the global generator) at several
batch sizes and step counts; DDIM's eta (negative: diffusers' noise-free direction term; > 1 where diffusers gives
NaN: refused); DDPM's Philox noise per generator; Stable Diffusion prompt/negative/num_images_per_prompt forms,
guidance 1 and 0 (no CFG batch), guidance_rescale, output_type "latent", one step, given embeddings without
negatives; a scheduler swapped after ``accelerate`` (on the pipeline or on the wrapper); one accelerated object
called with other step counts and batch sizes in turn; the legacy ``callback``/``callback_steps`` refused.

Tiny random models only (the fixtures of test_diffusers_pipelines).
"""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.testing import assert_matches_reference  # noqa: E402
import test_diffusers_pipelines as pipelines  # noqa: E402
from test_diffusers_pipelines import three_runs, tiny_unet  # noqa: E402

tiny_sd = pipelines.tiny_sd  # the fixture

PROMPTS = ["a cat", "a dog"]
EULER = ("EulerDiscreteScheduler", {"beta_start": 0.0002, "beta_end": 0.015})
DDIM = ("DDIMScheduler", {"clip_sample": False})


def _gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]

#----------------------------------------------------------------------------
# 1. Unconditional pipelines.


def _uncond_pipe(cls, scheduler):
    pipe = cls(unet=tiny_unet(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _uncond(pipe, generator, gen="one", batch_size=2, num_inference_steps=3, **kw):
    """``gen``: "one" the generator given, "list" one per sample, "none" the global generator (seeded here)."""
    if gen == "list":
        generator = _gens(*range(3, 3 + batch_size))
    elif gen == "none":
        torch.manual_seed(11)
        generator = None
    return pipe(batch_size=batch_size, generator=generator, num_inference_steps=num_inference_steps,
                output_type="pt", **kw).images


@pytest.mark.parametrize("cls", [diffusers.DDIMPipeline, diffusers.DDPMPipeline], ids=lambda c: c.__name__)
@pytest.mark.parametrize("gen", ["one", "list", "none"])
@pytest.mark.parametrize("batch_size, steps", [(1, 2), (3, 4)])
def test_unconditional_generators_batches_and_steps(cls, gen, batch_size, steps):
    ours, truth, eager = three_runs(lambda s: _uncond_pipe(cls, s), *DDIM, _uncond, 2, gen=gen,
                                    batch_size=batch_size, num_inference_steps=steps)
    assert ours.shape == (batch_size, 3, 8, 8)
    assert_matches_reference(ours, truth, eager, f"{cls.__name__} generator={gen} batch={batch_size} steps={steps}")


def test_ddim_negative_eta_matches_the_stock_pipeline():
    """diffusers' DDIM adds noise only for eta > 0: a negative eta keeps the direction term of |eta| alone."""
    ours, truth, eager = three_runs(lambda s: _uncond_pipe(diffusers.DDIMPipeline, s), *DDIM, _uncond, 2, eta=-0.3)
    assert_matches_reference(ours, truth, eager, "DDIMPipeline eta=-0.3")


def test_ddim_eta_is_stochastic_reproducible_and_bounded():
    """eta > 0: Philox noise keyed by the generator (same seed, same images; another eta, other images); an eta
    whose DDIM variance goes negative (diffusers takes its square root: NaN) raises naming eta."""
    fast = dd.accelerate(_uncond_pipe(diffusers.DDIMPipeline, diffusers.DDIMScheduler(clip_sample=False)))
    run = lambda eta: _uncond(fast, torch.Generator().manual_seed(1), eta=eta)  # noqa: E731
    assert torch.equal(run(0.5), run(0.5))
    assert (run(0.5) - run(0.0)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="eta"):
        run(1.5)


def test_ddim_pipeline_eta_with_a_scheduler_without_eta_is_refused():
    """DDIMPipeline passes eta to ``scheduler.step``; with a DPM-Solver there (assigned after construction, which
    converts to DDIM) the stock call raises, and the fused loop used to drop eta silently. Without eta it runs
    DPM-Solver as DDPMPipeline's loop does."""
    pipe = _uncond_pipe(diffusers.DDIMPipeline, diffusers.DDIMScheduler(clip_sample=False))
    fast = dd.accelerate(pipe)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler()
    with pytest.raises(TypeError, match="eta"):
        _uncond(pipe, torch.Generator().manual_seed(1), eta=0.5)
    for eta in (0.5, 0.0):
        with pytest.raises(TypeError, match=r"eta: DPMSolverMultistepScheduler.step\(\) takes no eta"):
            _uncond(fast, torch.Generator().manual_seed(1), eta=eta)
    # (the stock loop raises for any call here: it always hands step() its default eta = 0.0)
    with pytest.raises(TypeError, match=r"^use_clipped_model_output: DPMSolverMultistepScheduler.step\(\) takes no"):
        _uncond(fast, torch.Generator().manual_seed(1), use_clipped_model_output=True)
    ours = _uncond(fast, torch.Generator().manual_seed(5))
    _, truth, eager = three_runs(lambda s: _uncond_pipe(diffusers.DDPMPipeline, s), "DPMSolverMultistepScheduler",
                                 {}, _uncond, 2)
    assert_matches_reference(ours, truth, eager, "DDIMPipeline with a DPMSolverMultistepScheduler, no eta")


def test_ddpm_noise_follows_each_samples_generator():
    """DDPM (stochastic): one Philox seed per generator of a list, so a sample depends on its own generator only
    (float32 rounding of the batched UNet aside); one generator or the seeded global one repeats its images."""
    fast = dd.accelerate(_uncond_pipe(diffusers.DDPMPipeline, diffusers.DDPMScheduler(clip_sample=False)))

    def run(generator, batch_size):
        return fast(batch_size=batch_size, generator=generator, num_inference_steps=4, output_type="pt").images
    pair, alone, triple = run(_gens(1, 2), 2), run(_gens(2), 1), run(_gens(7, 2, 1), 3)
    torch.testing.assert_close(pair[1], alone[0])
    torch.testing.assert_close(pair[1], triple[1])
    torch.testing.assert_close(pair[0], triple[2])
    assert (pair[0] - pair[1]).abs().max() > 1e-3
    assert torch.equal(run(torch.Generator().manual_seed(1), 2), run(torch.Generator().manual_seed(1), 2))
    torch.manual_seed(0)
    first = run(None, 2)
    torch.manual_seed(0)
    assert torch.equal(run(None, 2), first)

#----------------------------------------------------------------------------
# 2. StableDiffusionPipeline: call forms against the stock pipeline.


def _sd(pipe, generator, prompt=PROMPTS, embeds_only=False, latents_size=None, **kw):
    """The images (or latents) as a tensor; ``embeds_only``: the prompts as ``prompt_embeds``, no negatives;
    ``latents_size``: (h, w) of given latents, in the pipeline's dtype."""
    kw = {"num_inference_steps": 3, "output_type": "pt", **kw}
    if latents_size is not None:
        kw["latents"] = torch.randn(2, 4, *latents_size, generator=torch.Generator().manual_seed(9)).to(pipe.unet.dtype)
    if embeds_only:
        kw["prompt_embeds"] = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
        prompt = None
    return pipe(prompt, generator=generator, **kw).images


SD_CASES = [
    {"prompt": "a cat", "negative_prompt": "blurry", "num_images_per_prompt": 2, "guidance_scale": 4.0},
    {"negative_prompt": ["blurry", ""], "num_images_per_prompt": 3, "guidance_scale": 4.0},
    {"guidance_scale": 1.0},
    {"guidance_scale": 0.0},
    {"guidance_scale": 5.0, "guidance_rescale": 0.7},
    {"guidance_scale": 1.0, "guidance_rescale": 0.7},  # rescale only with CFG, as the pipeline
    {"guidance_scale": 3.0, "output_type": "latent"},
    {"num_inference_steps": 1, "guidance_scale": 3.0},
    {"embeds_only": True, "guidance_scale": 4.0},  # the pipeline encodes "" as the negative
    {"height": 8, "width": 40, "guidance_scale": 2.0},
]


@pytest.mark.parametrize("kw", SD_CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_sd_call_forms_match_the_stock_pipeline(tiny_sd, kw):
    ours, truth, eager = three_runs(tiny_sd, *EULER, _sd, 2, **kw)
    assert_matches_reference(ours, truth, eager, f"StableDiffusionPipeline {kw}")


def test_sd_legacy_callback_is_refused_by_name(tiny_sd):
    fast = dd.accelerate(tiny_sd(getattr(diffusers, EULER[0])(**EULER[1])))
    with pytest.raises(TypeError, match=r"\['callback', 'callback_steps'\]"):
        _sd(fast, torch.Generator().manual_seed(5), callback=lambda i, t, latents: None, callback_steps=1)


@pytest.mark.parametrize("latents, why", [
    (torch.randn(1, 4, 8, 8), "batch"), (torch.randn(2, 3, 8, 8), "channels"), (torch.randn(4, 8, 8), "rank"),
    (torch.randn(2, 4, 8, 8, dtype=torch.float64), "dtype"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_sd_bad_latents_are_refused_by_name(tiny_sd, latents, why):
    """The stock pipeline fails in the UNet (RuntimeError of a matmul or conv); the fused loop names latents."""
    pipe = tiny_sd(getattr(diffusers, EULER[0])(**EULER[1]))
    with pytest.raises(RuntimeError):
        _sd(pipe, torch.Generator().manual_seed(5), latents=latents, guidance_scale=4.0)
    with pytest.raises(ValueError, match=r"latents: expected (shape|dtype)"):
        _sd(dd.accelerate(pipe), torch.Generator().manual_seed(5), latents=latents, guidance_scale=4.0)


def test_sd_latents_of_another_size_match_the_stock_pipeline(tiny_sd):
    """Latents set the image size (height/width are not read), in both pipelines."""
    ours, truth, eager = three_runs(tiny_sd, *EULER, _sd, 2, latents_size=(6, 10), guidance_scale=4.0)
    assert ours.shape == (2, 3, 12, 20)
    assert_matches_reference(ours, truth, eager, "StableDiffusionPipeline 6x10 latents")

#----------------------------------------------------------------------------
# 3. One accelerated object across calls: schedulers swapped, step counts and batch sizes changed.


SWAPS = [
    ("DPMSolverSinglestepScheduler", {}), ("KDPM2DiscreteScheduler", {}), ("UniPCMultistepScheduler", {}),
    ("LMSDiscreteScheduler", {}), ("DEISMultistepScheduler", {}), ("HeunDiscreteScheduler", {}),
    ("DDIMScheduler", {"clip_sample": False}), ("PNDMScheduler", {"skip_prk_steps": True}),
]


@pytest.mark.parametrize("on", ["pipe", "wrapper"])
@pytest.mark.parametrize("name, extra", SWAPS, ids=lambda v: v if isinstance(v, str) else "")
def test_scheduler_swapped_after_accelerate(tiny_sd, name, extra, on):
    """``X.from_config(pipe.scheduler.config)`` assigned after a first call (on the pipeline or on the wrapper,
    which forwards it): the next call runs X, as the stock pipeline with X."""
    pipe = tiny_sd(getattr(diffusers, EULER[0])(**EULER[1]))
    fast = dd.accelerate(pipe)
    _sd(fast, torch.Generator().manual_seed(5), guidance_scale=3.0)
    # steps_offset=1: the stock pipeline rewrites another at construction (the truth's), not at assignment
    new = getattr(diffusers, name).from_config(pipe.scheduler.config, steps_offset=1, **extra)
    setattr(pipe if on == "pipe" else fast, "scheduler", new)
    assert pipe.scheduler is new
    ours = _sd(fast, torch.Generator().manual_seed(5), guidance_scale=3.0, num_inference_steps=4)
    config = {k: v for k, v in new.config.items() if not k.startswith("_")}
    _, truth, eager = three_runs(tiny_sd, name, config, _sd, 2, guidance_scale=3.0, num_inference_steps=4)
    assert_matches_reference(ours, truth, eager, f"{name} swapped in after accelerate")


@pytest.mark.parametrize("name, match", [("TCDScheduler", "TCDScheduler"),
                                         ("FlowMatchEulerDiscreteScheduler", "flow-matching")])
def test_unsupported_scheduler_swapped_in_raises_by_name(tiny_sd, name, match):
    """TCD and flow matching have no fused loop in a UNet pipeline (DDIM's default clip_sample=True, which a DDIM
    swapped in from an Euler config takes, runs since session 18: tests/test_level2_clip18.py)."""
    pipe = tiny_sd(getattr(diffusers, EULER[0])(**EULER[1]))
    fast = dd.accelerate(pipe)
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match=match):
        _sd(fast, torch.Generator().manual_seed(5))


def test_one_object_across_step_counts_and_batch_sizes(tiny_sd):
    """Calls with other step counts and prompt batches in turn, each the stock pipeline's images."""
    fast = dd.accelerate(tiny_sd(getattr(diffusers, "DPMSolverMultistepScheduler")(**EULER[1])))
    calls = [{"num_inference_steps": 3}, {"prompt": ["a cat"] * 3, "num_inference_steps": 5},
             {"prompt": "a dog", "num_images_per_prompt": 2, "num_inference_steps": 2}, {"num_inference_steps": 3}]
    for kw in calls:
        kw = {"guidance_scale": 3.0, **kw}
        ours = _sd(fast, torch.Generator().manual_seed(5), **kw)
        _, truth, eager = three_runs(tiny_sd, "DPMSolverMultistepScheduler", EULER[1], _sd, 2, **kw)
        assert_matches_reference(ours, truth, eager, f"DPMSolverMultistep {kw} after other calls")
