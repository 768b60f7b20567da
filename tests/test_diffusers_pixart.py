"""Level 2 on PixArt: ``accelerate(PixArtAlphaPipeline)`` and ``accelerate(PixArtSigmaPipeline)`` run the DiT's
denoising loop in diffkern.

Tiny random models, no downloads: a 1-layer PixArtTransformer2DModel (inner width 24, a multiple of 3 for
PixArt-alpha's micro-condition embeddings; 2x2 patches of the 4 latent channels; out_channels 8 for learned sigma,
else 4), a 1-layer T5 encoder (d_model 32 = the transformer's caption_channels) with the T5 tokenizer of
``test_diffusers_flux.py``, and the tiny AutoencoderKL of ``test_diffusers_flow.py`` (16x16 images, 8x8 latents).

Tolerance: the project rule on whole pipelines (``test_diffusers_pipelines.three_runs``): the truth is the stock
pipeline run in float64 (modules in float64, scheduler and pipeline module under ``diffusers_float64``), the
yardstick its float32 run; Level 2 must be at most twice as far from the truth, plus the float32 floor.
"""
import itertools

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.testing import assert_matches_reference  # noqa: E402
from test_diffusers_flow import tiny_sd3  # noqa: E402
from test_diffusers_flux import t5_tokenizer  # noqa: E402
from test_diffusers_pipelines import three_runs  # noqa: E402
from test_graphs import fresh_cache  # noqa: E402, F401  (autouse)
from test_level2_gpu_readiness import _second_calls, _truth, strict  # noqa: E402, F401  (strict: a fixture)

PIPELINES = {"alpha": diffusers.PixArtAlphaPipeline, "sigma": diffusers.PixArtSigmaPipeline}
T5_LEN = 6  # max_sequence_length of most calls: T5 pads every prompt to it
SCHEDULERS = [  # (diffusers scheduler, config)
    ("DPMSolverMultistepScheduler", {}),  # the pipelines' default: DPM-Solver++(2M)
    ("DPMSolverMultistepScheduler", {"solver_order": 3}),
    ("DDIMScheduler", {"clip_sample": False}),
    ("EulerDiscreteScheduler", {}),
    ("UniPCMultistepScheduler", {}),
]


def tiny_pixart(kind, scheduler, learned_sigma=True, sample_size=8, patch_size=2):
    """A PixArt-alpha or -sigma pipeline (``kind``) of tiny random models, the same weights at each call."""
    torch.manual_seed(0)
    transformer = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8 if learned_sigma else 4,
        num_layers=1, cross_attention_dim=24, caption_channels=32, sample_size=sample_size,
        patch_size=patch_size).eval()
    tokenizer = t5_tokenizer()
    text_encoder = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id)).eval()
    vae = tiny_sd3(diffusers.FlowMatchEulerDiscreteScheduler()).vae
    pipe = PIPELINES[kind](tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                           scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixart_call(pipe, generator, output_type="pt", **kw):
    """Two prompts at 16x16 (no binning), one with a negative prompt, no caption cleaning (it needs bs4 and ftfy,
    else warns); the images (or latents) as a tensor."""
    kw = {"num_inference_steps": 4, "negative_prompt": ["blurry", ""], "max_sequence_length": T5_LEN,
          "use_resolution_binning": False, "height": 16, "width": 16, "clean_caption": False, **kw}
    out = pipe(["a cat", "a dog"], generator=generator, output_type=output_type, **kw).images
    return out if isinstance(out, torch.Tensor) else torch.as_tensor(out)


def runs(kind, name, config, call=pixart_call, **kw):
    """(Level 2, truth, stock float32) of ``call`` on a tiny ``kind`` pipeline with ``kw``'s model options."""
    model = {k: kw.pop(k) for k in ("learned_sigma", "sample_size", "patch_size") if k in kw}
    return three_runs(lambda scheduler: tiny_pixart(kind, scheduler, **model), name, config, call, 2, **kw)


def _one_step_without_x0(kind, name, steps) -> bool:
    """PixArt-alpha's one-step loop reads the x0 output of step(), which these schedulers lack (tested refused)."""
    return kind == "alpha" and steps == 1 and name in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler")


# Every pipeline x scheduler x step count; CFG, learned sigma and two images per prompt alternate over them.
CASES = [(kind, name, config, steps, {"guidance_scale": 4.5 if i % 2 else 1.0, "learned_sigma": i % 4 < 2,
                                      "num_images_per_prompt": 2 if i % 3 == 0 else 1})
         for i, (kind, (name, config), steps) in enumerate(itertools.product(PIPELINES, SCHEDULERS, (1, 2, 4)))
         if not _one_step_without_x0(kind, name, steps)]


@pytest.mark.parametrize("kind, name, config, steps, kw", CASES, ids=lambda v: str(v)[:40])
def test_level2_matches_the_pipeline(kind, name, config, steps, kw):
    ours, truth, eager = runs(kind, name, config, num_inference_steps=steps, **kw)
    assert ours.shape == (2 * kw["num_images_per_prompt"], 3, 16, 16) and ours.dtype == eager.dtype
    assert 0.1 < float(((eager > 0) & (eager < 1)).float().mean()), "images saturated"
    assert_matches_reference(ours, truth, eager, f"PixArt-{kind} level 2 {name} {config} {steps} {kw}")


@pytest.mark.parametrize("name, config", [
    ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False, "timestep_spacing": "trailing"}),
    ("EulerDiscreteScheduler", {"final_sigmas_type": "sigma_min", "timestep_spacing": "trailing"}),
    ("DDPMScheduler", {"clip_sample": False, "timestep_spacing": "trailing"}),
    ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}),
])
def test_alpha_one_step_returns_the_x0_estimate(name, config):
    """PixArt-alpha's one step returns step()'s x0 estimate, not its sample: the DDIM and Euler steps here end
    above sigma 0, so the two differ; the stochastic schedulers' one step to sigma 0 is deterministic (matched)."""
    ours, truth, eager = runs("alpha", name, config, num_inference_steps=1, guidance_scale=3.0, output_type="latent")
    assert_matches_reference(ours, truth, eager, f"PixArt-alpha one step {name} {config}")


@pytest.mark.parametrize("kind", PIPELINES)
def test_both_cfg_and_learned_sigma_with_latent_output(kind):
    """CFG with learned sigma, the latents themselves (output_type="latent")."""
    ours, truth, eager = runs(kind, "DPMSolverMultistepScheduler", {}, output_type="latent", guidance_scale=3.0,
                              num_images_per_prompt=2)
    assert ours.shape == (4, 4, 8, 8)
    assert_matches_reference(ours, truth, eager, f"PixArt-{kind} latents")


def test_alpha_micro_conditions():
    """A sample_size 128 transformer takes PixArt-alpha's resolution and aspect-ratio embeddings (added_cond_kwargs,
    repeated over the guidance batch); 24x16 pixels, no binning."""
    ours, truth, eager = runs("alpha", "EulerDiscreteScheduler", {}, sample_size=128, height=24, width=16,
                              guidance_scale=4.0)
    assert ours.shape == (2, 3, 24, 16)
    assert_matches_reference(ours, truth, eager, "PixArt-alpha micro-conditions")


@pytest.mark.parametrize("kind", PIPELINES)
def test_resolution_binning_and_default_sequence_length(kind):
    """use_resolution_binning (the default): 48x32 is generated at the 256-px bin's size and resized back; the
    pipeline's default max_sequence_length (120 or 300 tokens) and clean_caption. sample_size 32 (the 256-px bins),
    8x8 patches."""
    ours, truth, eager = runs(kind, "DDIMScheduler", {"clip_sample": False}, sample_size=32, patch_size=8,
                              use_resolution_binning=True, height=48, width=32, max_sequence_length=None,
                              clean_caption=True, num_inference_steps=2)
    assert ours.shape == (2, 3, 48, 32)
    assert_matches_reference(ours, truth, eager, f"PixArt-{kind} binning")


def test_diffkern_scheduler_in_the_pipeline_and_embeddings(monkeypatch):
    """diffkern's DPMSolverMultistepScheduler in the pipeline; pre-computed embeddings and masks."""
    g = torch.Generator().manual_seed(0)
    embeds = [torch.randn(2, 5, 32, generator=g) for _ in range(2)]
    masks = [torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]), torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])]

    def call(pipe, generator, **kw):
        return pipe(prompt_embeds=embeds[0], prompt_attention_mask=masks[0], negative_prompt=None,
                    negative_prompt_embeds=embeds[1],
                    negative_prompt_attention_mask=masks[1], guidance_scale=4.0, num_inference_steps=3, height=16,
                    width=16, use_resolution_binning=False, generator=generator, output_type="pt").images
    pipe = tiny_pixart("sigma", diffusers.DPMSolverMultistepScheduler())
    truth = _truth(pipe, call, monkeypatch, torch.Generator().manual_seed(5))
    eager = call(pipe, torch.Generator().manual_seed(5))
    pipe.scheduler = dd.DPMSolverMultistepScheduler()
    ours = call(dd.accelerate(pipe), torch.Generator().manual_seed(5))
    assert_matches_reference(ours, truth, eager, "diffkern scheduler, embeddings")


def test_other_method_runs():
    fast = dd.accelerate(tiny_pixart("alpha", diffusers.DPMSolverMultistepScheduler()), method="heun")
    out = pixart_call(fast, torch.Generator().manual_seed(0), num_inference_steps=3)
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()

#----------------------------------------------------------------------------
# Second calls of a captured loop (the strict CPU stand-in): bitwise the eager loop, and the stock pipeline.


@pytest.mark.parametrize("kind", PIPELINES)
def test_graph_second_calls(kind, strict, monkeypatch):
    """Prompts, negative prompts, seeds and guidance scales of later calls replay one capture per batch shape (two
    images per prompt: another); no CFG: a capture of its own."""
    pipe = tiny_pixart(kind, diffusers.DPMSolverMultistepScheduler())

    def call(p, generator, prompt=("a cat", "a dog"), **kw):
        kw = {"num_inference_steps": 3, "guidance_scale": 4.5, "max_sequence_length": T5_LEN, "height": 16,
              "width": 16, "use_resolution_binning": False, "output_type": "pt", **kw}
        return p(list(prompt), generator=generator, **kw).images
    cases = [(0, {}), (1, {"prompt": ("blurry dog", "a"), "negative_prompt": ["cat", "dog"]}),
             (2, {"guidance_scale": 2.0, "prompt": ("dog", "cat")}), (3, {"num_images_per_prompt": 2}),
             (4, {"guidance_scale": 1.0})]
    _second_calls(pipe, call, cases, monkeypatch, captures=3)

#----------------------------------------------------------------------------
# Refusals.


@pytest.mark.parametrize("kw, match", [
    ({"timesteps": [999, 500]}, "timesteps"),
    ({"sigmas": [10.0, 1.0]}, "sigmas"),
    ({"callback": lambda *a: None}, "callback"),
    ({"cross_attention_kwargs": {"scale": 1.0}}, "cross_attention_kwargs"),
])
def test_refused_arguments_name_themselves(kw, match):
    fast = dd.accelerate(tiny_pixart("alpha", diffusers.DPMSolverMultistepScheduler()))
    with pytest.raises(TypeError, match=match):
        pixart_call(fast, torch.Generator().manual_seed(0), **kw)


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_alpha_one_step_without_x0_output_is_refused(name):
    """The stock PixArt-alpha pipeline fails (IndexError) on one step of a scheduler returning no x0; so do we, by
    name. PixArt-sigma runs the one step as usual."""
    pipe = tiny_pixart("alpha", getattr(diffusers, name)())
    with pytest.raises(IndexError):
        pixart_call(pipe, torch.Generator().manual_seed(0), num_inference_steps=1)
    with pytest.raises(ValueError, match="num_inference_steps"):
        pixart_call(dd.accelerate(pipe), torch.Generator().manual_seed(0), num_inference_steps=1)


def test_binning_without_bins_is_refused():
    pipe = tiny_pixart("sigma", diffusers.DPMSolverMultistepScheduler())  # sample_size 8: no aspect-ratio table
    with pytest.raises(ValueError, match="Invalid sample size"):
        pixart_call(pipe, None, use_resolution_binning=True)
    with pytest.raises(ValueError, match="use_resolution_binning"):
        pixart_call(dd.accelerate(pipe), None, use_resolution_binning=True)


def test_refused_schedulers_and_pipelines():
    pipe = tiny_pixart("alpha", diffusers.DDIMScheduler())  # clip_sample=True by default: clipped as stock's
    assert dd.accelerate(pipe) is not None
    pipe.scheduler = diffusers.LCMScheduler(clip_sample=True)
    with pytest.raises(ValueError, match="clip_sample"):
        dd.accelerate(pipe)
    pipe.scheduler = diffusers.EDMEulerScheduler()
    fast = dd.accelerate(pipe)
    with pytest.raises(ValueError, match="EDMEulerScheduler"):
        pixart_call(fast, None)
    pag = diffusers.PixArtSigmaPAGPipeline(**tiny_pixart("sigma", diffusers.DDIMScheduler()).components)
    with pytest.raises(TypeError, match="PixArtSigmaPAGPipeline"):
        dd.accelerate(pag)


def test_kind_and_repr():
    fast = dd.accelerate(tiny_pixart("sigma", diffusers.DPMSolverMultistepScheduler()))
    assert fast.kind == "pixart_sigma" and "PixArtSigmaPipeline" in repr(fast)
