"""Stable Diffusion XL with diffkern's diffusers drop-in: Level 1 (every class of ``diffkern.diffusers.SCHEDULERS``
driving diffusers' own ``StableDiffusionXLPipeline``) and Level 2 (``accelerate`` on that pipeline: two text
encoders, pooled embeddings and ``add_time_ids`` as ``added_cond_kwargs``), with tiny random models and no
downloads (the tokenizer of ``test_diffusers_pipelines.py`` on a handwritten vocabulary, for both encoders).

Tolerance: the project rule on whole pipelines (``test_diffusers_pipelines.py``): the truth is the pipeline run in
float64 (every module in float64, diffusers' scheduler and pipeline module under ``diffusers_float64``), the yardstick
the stock float32 run. GE, which diffusers lacks, takes diffkern's own Level-1 scheduler as the oracle (float64 and
float32) and the comparison is Level 2's; IADB runs at Level 1 only (Level 2 refuses it with conditioning), and a
flow-matching class is skipped: diffusers' SDXL pipeline cannot run one.
"""
import copy
import importlib

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.testing import assert_matches_reference  # noqa: E402
from test_diffusers_pipelines import (MAX_TOKENS, pipeline_modules, three_runs, tiny_sd,  # noqa: E402, F401
                                      write_clip_vocab)  # (tiny_sd: a fixture)
from test_diffusers_pipelines import text2image as sd_text2image  # noqa: E402
from test_diffusers_schedulers import diffusers_class, diffusers_float64  # noqa: E402

STEPS = 4
# stabilityai/stable-diffusion-xl-base-1.0's scheduler_config.json (an EulerDiscreteScheduler), which every class
# loads with from_config, as a user swapping SDXL's scheduler does
SDXL_SCHEDULER = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                  "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
                  "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                  "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}
MODULES = ("unet", "vae", "text_encoder", "text_encoder_2")

#----------------------------------------------------------------------------
# A tiny SDXL.


@pytest.fixture
def tiny_sdxl(tmp_path, monkeypatch):
    """A factory ``scheduler -> StableDiffusionXLPipeline`` of tiny random models (the same weights at each call):
    a 16x16-pixel, 8x8-latent UNet2DConditionModel with ``addition_embed_type="text_time"``, an AutoencoderKL, a
    CLIPTextModel and a CLIPTextModelWithProjection of width 16 (cross-attention width 32, pooled width 8)."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # everything here is local
    tokenizer = transformers.CLIPTokenizer.from_pretrained(write_clip_vocab(tmp_path), model_max_length=MAX_TOKENS)

    def text_config(**kw):
        return transformers.CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **kw)

    def make(scheduler, vae_dtype=torch.float32, **unet_kw):
        torch.manual_seed(2)
        unet = diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, norm_num_groups=4,
            attention_head_dim=2, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 8, **unet_kw).eval()
        vae = diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
            norm_num_groups=4, sample_size=16).eval().to(vae_dtype)
        text_encoder = transformers.CLIPTextModel(text_config()).eval()
        text_encoder_2 = transformers.CLIPTextModelWithProjection(text_config(projection_dim=8)).eval()
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    return make


def float64_copy(pipe, scheduler):
    twin = copy.deepcopy(pipe)
    for name in MODULES:
        getattr(twin, name).double()
    twin.scheduler = scheduler
    return twin


def text2image(pipe, generator, output_type="pt", **kw):
    """Two prompts with CFG, one with a negative prompt; the images (or latents) as a tensor ("np": NHWC)."""
    kw = {"guidance_scale": 4.0, "negative_prompt": ["blurry", ""], **kw}
    out = pipe(["a cat", "a dog"], generator=generator, num_inference_steps=STEPS, output_type=output_type,
               **kw).images
    return out if isinstance(out, torch.Tensor) else torch.as_tensor(out)


def runs(make_pipe, name, levels, config=None, call=text2image, **call_kw):
    """{"truth", "eager", 1, 2}: ``call`` on the float64 pipeline with diffusers' ``name`` scheduler (or, for a
    class diffusers lacks, diffkern's), on the float32 one, and through diffkern's Level 1 / Level 2 (``levels``)."""
    config = SDXL_SCHEDULER if config is None else config
    theirs = diffusers_class(name) or getattr(dd, name)
    pipe = make_pipe(theirs.from_config(config))
    modules = [importlib.import_module(theirs.__module__)] if theirs.__module__.startswith("diffusers.") else []
    with diffusers_float64(*modules, *pipeline_modules(pipe)):
        truth = call(float64_copy(pipe, theirs.from_config(config)), torch.Generator().manual_seed(5), **call_kw)
    out = {"truth": truth, "eager": call(pipe, torch.Generator().manual_seed(5), **call_kw)}
    if 1 in levels:
        pipe.scheduler = getattr(dd, name).from_config(config)
        out[1] = call(pipe, torch.Generator().manual_seed(5), **call_kw)
        pipe.scheduler = theirs.from_config(config)
    if 2 in levels:
        out[2] = call(dd.accelerate(pipe), torch.Generator().manual_seed(5), **call_kw)
    return out

#----------------------------------------------------------------------------
# Level 1: every diffkern scheduler in SDXL against diffusers' own.


@pytest.mark.parametrize("name", sorted(dd.SCHEDULERS))
def test_level1_every_scheduler(tiny_sdxl, name):
    if not hasattr((diffusers_class(name) or dd.SCHEDULERS[name])(), "init_noise_sigma"):
        pytest.skip(f"diffusers' SDXL pipeline cannot run a {name} (no init_noise_sigma: a flow-matching scheduler)")
    if diffusers_class(name) is not None:
        out = runs(tiny_sdxl, name, (1,))
        assert 0.1 < float(((out["eager"] > 0) & (out["eager"] < 1)).float().mean()), "images saturated"
        assert_matches_reference(out[1], out["truth"], out["eager"], f"SDXL level 1 {name}")
    elif name == "IADBScheduler":  # Level 1 only: the fused IADB loop takes no conditioning (refused, below)
        pipe = tiny_sdxl(dd.IADBScheduler())
        assert torch.isfinite(text2image(pipe, torch.Generator().manual_seed(5))).all()
        with pytest.raises(ValueError, match="IADBScheduler in the text-to-image StableDiffusionXLPipeline"):
            text2image(dd.accelerate(pipe), torch.Generator().manual_seed(5))
    else:  # no diffusers counterpart: diffkern's scheduler is the oracle, Level 2 the subject
        # (DPMSolverSDE's Philox noise: keyed by noise_sampler_seed at both levels)
        seeded = dict(SDXL_SCHEDULER, noise_sampler_seed=11) if name == "DPMSolverSDEScheduler" else None
        out = runs(tiny_sdxl, name, (2,), seeded)
        assert_matches_reference(out[2], out["truth"], out["eager"], f"SDXL level 2 {name} vs level 1")


KARRAS = dict(SDXL_SCHEDULER, use_karras_sigmas=True)
ZERO_SNR = dict(SDXL_SCHEDULER, timestep_spacing="trailing", rescale_betas_zero_snr=True,
                prediction_type="v_prediction")


@pytest.mark.parametrize("name, config", [  # popular SDXL set-ups: "DPM++ 2M SDE Karras", zero-terminal-SNR v models
    ("DPMSolverMultistepScheduler", dict(KARRAS, algorithm_type="sde-dpmsolver++")),
    ("EulerDiscreteScheduler", ZERO_SNR), ("DDIMScheduler", ZERO_SNR)], ids=lambda v: str(v)[:20])
def test_level1_popular_configs(tiny_sdxl, name, config):
    out = runs(tiny_sdxl, name, (1,), config)
    assert_matches_reference(out[1], out["truth"], out["eager"], f"SDXL level 1 {name} {config}")

#----------------------------------------------------------------------------
# Level 2: accelerate(StableDiffusionXLPipeline).

LEVEL2 = [  # (scheduler, config, output type, call kwargs)
    ("EulerDiscreteScheduler", SDXL_SCHEDULER, "pt", {}),
    ("EulerDiscreteScheduler", SDXL_SCHEDULER, "np", {"guidance_scale": 1.0, "negative_prompt": None}),
    ("DPMSolverMultistepScheduler", KARRAS, "np", {"num_images_per_prompt": 2}),
    ("DDIMScheduler", SDXL_SCHEDULER, "latent", {"num_images_per_prompt": 2, "negative_original_size": (12, 20),
                                                 "negative_crops_coords_top_left": (2, 3),
                                                 "negative_target_size": (16, 8)}),
    ("HeunDiscreteScheduler", SDXL_SCHEDULER, "pt", {"negative_prompt": None, "prompt_2": ["blurry dog", "cat"],
                                                     "original_size": (32, 24), "crops_coords_top_left": (4, 0)}),
    ("KDPM2DiscreteScheduler", KARRAS, "pt", {"guidance_rescale": 0.7, "negative_prompt_2": ["dog", "a"]}),
    ("DPMSolverMultistepScheduler", dict(SDXL_SCHEDULER, prediction_type="v_prediction"), "pt",
     {"guidance_rescale": 0.5, "num_images_per_prompt": 2}),
]


@pytest.mark.parametrize("name, config, output_type, kw", LEVEL2, ids=lambda v: str(v)[:20])
def test_level2_matches_the_pipeline(tiny_sdxl, name, config, output_type, kw):
    out = runs(tiny_sdxl, name, (2,), config, output_type=output_type, **kw)
    n = 2 * kw.get("num_images_per_prompt", 1)
    shape = {"pt": (n, 3, 16, 16), "np": (n, 16, 16, 3), "latent": (n, 4, 8, 8)}[output_type]
    assert out[2].shape == shape and out[2].dtype == out["eager"].dtype
    if output_type != "latent":
        assert 0.1 < float(((out["eager"] > 0) & (out["eager"] < 1)).float().mean()), "images saturated"
    assert_matches_reference(out[2], out["truth"], out["eager"], f"SDXL level 2 {name} {output_type} {kw}")


def test_level2_guidance_rescale_in_stable_diffusion(tiny_sd):
    """The same rescaled guidance serves StableDiffusionPipeline's guidance_rescale."""
    ours, truth, eager = three_runs(tiny_sd, "EulerDiscreteScheduler", {}, sd_text2image, 2, guidance_rescale=0.7)
    assert_matches_reference(ours, truth, eager, "SD level 2 guidance_rescale")


def test_level2_conditioning_reaches_the_unet(tiny_sdxl):
    """Each option changes the image (so the parity above tests it): the pooled embeddings and the time ids reach
    the UNet through added_cond_kwargs, the negative ones its unconditional half."""
    fast = dd.accelerate(tiny_sdxl(diffusers.EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)))
    base = text2image(fast, torch.Generator().manual_seed(0), output_type="latent")
    for kw in ({"original_size": (8, 8)}, {"crops_coords_top_left": (1, 0)}, {"target_size": (24, 16)},
               {"negative_original_size": (8, 8), "negative_target_size": (16, 16)}, {"prompt_2": ["blurry", "cat"]},
               {"negative_prompt_2": ["cat", "cat"]}, {"guidance_rescale": 0.5}, {"guidance_scale": 1.0}):
        other = text2image(fast, torch.Generator().manual_seed(0), output_type="latent", **kw)
        assert not torch.allclose(other, base, rtol=1e-4, atol=1e-5), kw
    again = text2image(fast, torch.Generator().manual_seed(0), output_type="latent")
    torch.testing.assert_close(again, base, rtol=0, atol=0)


def test_level2_stochastic_scheduler_is_reproducible_per_seed(tiny_sdxl):
    """Euler-ancestral's noise is Philox keyed by a seed from the generator (not diffusers' draws, so not the
    pipeline's images): the same generator gives the same images, another one (same initial latents) others."""
    fast = dd.accelerate(tiny_sdxl(diffusers.EulerAncestralDiscreteScheduler.from_config(SDXL_SCHEDULER)))
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    a, b, c = (text2image(fast, torch.Generator().manual_seed(k), num_images_per_prompt=2, latents=latents)
               for k in (0, 0, 1))
    assert a.shape == (4, 3, 16, 16) and torch.isfinite(a).all()
    torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert not torch.allclose(c, a)


def test_level2_embeddings_and_return_tuple(tiny_sdxl):
    """Precomputed (pooled) embeddings give the prompt's images; return_dict=False returns the pipeline's tuple."""
    pipe = tiny_sdxl(diffusers.EulerDiscreteScheduler.from_config(SDXL_SCHEDULER))
    fast = dd.accelerate(pipe)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(["a cat"], negative_prompt=["blurry"])
    kw = {"num_inference_steps": 2, "output_type": "pt", "guidance_scale": 3.0}
    a = fast(["a cat"], negative_prompt=["blurry"], generator=torch.Generator().manual_seed(1), **kw).images
    b = fast(prompt_embeds=embeds, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
             negative_pooled_prompt_embeds=negative_pooled, generator=torch.Generator().manual_seed(1),
             return_dict=False, **kw)
    assert isinstance(b, tuple) and len(b) == 1
    torch.testing.assert_close(b[0], a, rtol=0, atol=0)
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):  # the pipeline's own check_inputs
        fast(prompt_embeds=embeds, **kw)


def test_level2_float16_vae_is_upcast_as_the_pipeline_does(tiny_sdxl):
    """A float16 VAE with force_upcast decodes in float32 and goes back to float16, as in the pipeline."""
    pipe = tiny_sdxl(diffusers.EulerDiscreteScheduler.from_config(SDXL_SCHEDULER), vae_dtype=torch.float16)
    assert pipe.vae.config.force_upcast
    expected = text2image(pipe, torch.Generator().manual_seed(0))
    ours = text2image(dd.accelerate(pipe), torch.Generator().manual_seed(0))
    assert pipe.vae.dtype == torch.float16
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_level2_refusals(tiny_sdxl):
    pipe = tiny_sdxl(diffusers.EulerDiscreteScheduler.from_config(SDXL_SCHEDULER))
    fast = dd.accelerate(pipe)
    assert fast.kind == "sdxl"
    for kw in ({"timesteps": [999, 500]}, {"sigmas": [14.0, 1.0]},
               {"callback_on_step_end": lambda *a: {}}, {"ip_adapter_image_embeds": [torch.zeros(1, 1, 8)]}):
        with pytest.raises(TypeError, match=next(iter(kw))):
            fast("a cat", num_inference_steps=2, **kw)
    # pipelines with SDXL's UNet but another loop, and other added conditioning, stay refused by name
    with pytest.raises(TypeError, match=r"StableDiffusionXLInpaintPipeline with a 4-channel UNet .legacy"):
        dd.accelerate(diffusers.StableDiffusionXLInpaintPipeline(**pipe.components))
    with pytest.raises(TypeError, match="StableDiffusionXLPAGPipeline.*pag_scale"):
        dd.accelerate(diffusers.StableDiffusionXLPAGPipeline(**pipe.components, pag_applied_layers=["mid"]))
    sd = {k: pipe.components[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    with pytest.raises(TypeError, match="StableDiffusionPipeline: its UNet has addition_embed_type='text_time'"):
        dd.accelerate(diffusers.StableDiffusionPipeline(**sd, safety_checker=None, feature_extractor=None,
                                                        requires_safety_checker=False))
    with pytest.raises(TypeError, match="StableDiffusionXLPipeline: its UNet has class_embed_type='timestep'"):
        dd.accelerate(tiny_sdxl(diffusers.EulerDiscreteScheduler(), class_embed_type="timestep"))


@pytest.mark.cuda
def test_level2_cuda_graph_matches_eager(tiny_sdxl):
    """The added conditioning is data of the captured loop: new prompts and sizes replay the same capture."""
    import diffkern.graphs

    pipe = tiny_sdxl(diffusers.DPMSolverMultistepScheduler.from_config(SDXL_SCHEDULER)).to("cuda")
    fast = dd.accelerate(pipe, graph=True)
    diffkern.graphs.clear()
    for kw in ({}, {"original_size": (8, 8), "negative_prompt": ["dog", "cat"]}, {"guidance_rescale": 0.5}):
        eager = text2image(dd.accelerate(pipe, graph=False), torch.Generator("cuda").manual_seed(0), **kw)
        for _ in range(2):
            graph = text2image(fast, torch.Generator("cuda").manual_seed(0), **kw)
            torch.testing.assert_close(graph, eager, rtol=0, atol=0)
    assert diffkern.graphs.info()["captures"] <= 2  # plain CFG and rescaled CFG
