"""Level 2 on Flux: ``accelerate(FluxPipeline)`` runs the flow-matching loop in diffkern.

Tiny random models, no downloads: a 1+1-layer FluxTransformer2DModel (16 packed channels, 2x2 patches of the 4
latent channels), the tiny AutoencoderKL of ``test_diffusers_flow.py`` (16x16 images, 8x8 latents, 16 tokens), a tiny
CLIP text encoder (pooled 16) on the handwritten vocabulary of ``test_diffusers_pipelines.py`` and a tiny T5 encoder
(32 wide) with a T5 tokenizer built from a word list; or no text encoder at all and pre-computed embeddings.

Tolerance: the project rule on whole pipelines (as ``test_diffusers_sd3.py``): the truth is the stock pipeline run
in float64 (modules in float64, scheduler and pipeline module under ``diffusers_float64``), the yardstick its
float32 run; Level 2 must be at most twice as far from the truth, plus the float32 floor.
"""
import importlib

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.diffusers.loop_spec import FLOW_TOP  # noqa: E402
from diffkern.testing import assert_matches_reference  # noqa: E402
from dropin_conformance import check_level2_images, check_one_step_from_t_one_is_exact, flow_runs  # noqa: E402
from test_diffusers_flow import tiny_sd3  # noqa: E402
from test_diffusers_pipelines import MAX_TOKENS, WORDS, write_clip_vocab  # noqa: E402

THEIRS = diffusers.FlowMatchEulerDiscreteScheduler
MODULES = (importlib.import_module(THEIRS.__module__), importlib.import_module(diffusers.FluxPipeline.__module__))
DEV = {"use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5,
       "max_shift": 1.15, "shift": 3.0}  # FLUX.1-dev's scheduler (at 16 tokens mu = 0.46)
SCHNELL = {"shift": 1.0}  # FLUX.1-schnell's
T5_LEN = 6  # max_sequence_length of the calls: T5 pads every prompt to it


def tiny_flux(scheduler, guidance_embeds=True, text_encoders=None):
    """A FluxPipeline with a random 1+1-layer transformer and tiny_sd3's VAE; ``text_encoders``: the components
    ``text_encoder``, ``tokenizer``, ``text_encoder_2``, ``tokenizer_2`` (default None: pre-computed embeddings)."""
    torch.manual_seed(0)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
        guidance_embeds=guidance_embeds).eval()
    text = text_encoders or dict.fromkeys(("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))
    pipe = diffusers.FluxPipeline(scheduler=scheduler, vae=tiny_sd3(THEIRS()).vae, transformer=transformer, **text)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def t5_tokenizer():
    """A T5 (Unigram) tokenizer built offline from the words of ``test_diffusers_pipelines.WORDS``, their letters
    and the word-start mark."""
    letters = sorted(set("".join(WORDS)))
    return transformers.T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
                                    + [("\u2581" + w, -1.0) for w in WORDS] + [(c, -5.0) for c in letters],
                                    extra_ids=0)


@pytest.fixture
def flux_text(tmp_path, monkeypatch):
    """A factory ``(scheduler, guidance_embeds) -> FluxPipeline`` with a tiny CLIP (hidden 16 = the pooled
    projection) and a tiny T5 encoder (d_model 32 = joint_attention_dim) and their tokenizers, built offline."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # everything here is local
    clip_tok = transformers.CLIPTokenizer.from_pretrained(write_clip_vocab(tmp_path), model_max_length=MAX_TOKENS)
    t5_tok = t5_tokenizer()

    def make(scheduler, guidance_embeds=True):
        torch.manual_seed(3)
        clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=16, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id)).eval()
        t5 = transformers.T5EncoderModel(transformers.T5Config(
            vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
            relative_attention_num_buckets=8, pad_token_id=t5_tok.pad_token_id)).eval()
        return tiny_flux(scheduler, guidance_embeds, dict(text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                                                          tokenizer_2=t5_tok))
    return make


def text2image(pipe, generator, output_type="pt", **kw):
    """Two prompts at 16x16; the images (or packed latents) as a tensor ("np": NHWC)."""
    kw = {"guidance_scale": 3.5, "num_inference_steps": 4, "max_sequence_length": T5_LEN, **kw}
    out = pipe(["a cat", "a dog"], generator=generator, output_type=output_type, height=16, width=16, **kw).images
    return out if isinstance(out, torch.Tensor) else torch.as_tensor(out)


def embeds_call(pipe, generator, output_type="pt", **kw):
    """Pre-computed (pooled) prompt embeddings and negatives, for the pipeline without text encoders."""
    g = torch.Generator().manual_seed(0)
    dtype = pipe.transformer.dtype
    e = [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for shape in ((2, 5, 32), (2, 16)) * 2]
    kw = {"guidance_scale": 4.0, "num_inference_steps": 3, **kw}
    return pipe(prompt_embeds=e[0], pooled_prompt_embeds=e[1], negative_prompt_embeds=e[2],
                negative_pooled_prompt_embeds=e[3], height=16, width=16, generator=generator,
                output_type=output_type, **kw).images


def runs(make, config, call=text2image, ours_cls=THEIRS, guidance_embeds=True, **kw):
    """(Level 2, truth, stock float32) of ``call``; Level 2's pipeline holds ``ours_cls`` (diffusers' or
    diffkern's FlowMatchEulerDiscreteScheduler)."""
    return flow_runs(make(THEIRS(**config), guidance_embeds), config, MODULES, call, ours_cls, **kw)


NEGATIVE = {"negative_prompt": ["blurry", ""]}
LEVEL2 = [  # (guidance_embeds, scheduler config, output type, call kwargs)
    (True, DEV, "pt", {}),
    (False, SCHNELL, "np", {"num_inference_steps": 1}),
    (True, DEV, "latent", {"num_images_per_prompt": 2, "num_inference_steps": 2}),
    (False, DEV, "pt", {"true_cfg_scale": 3.0, "num_inference_steps": 3, **NEGATIVE}),
    (True, DEV, "pt", {"true_cfg_scale": 2.0, "num_images_per_prompt": 2, "prompt_2": ["dog", "blurry cat"],
                       "negative_prompt_2": ["a", "dog"], **NEGATIVE}),
    (True, DEV, "pt", {"true_cfg_scale": 1.0, "sigmas": [1.0, 0.6, 0.25], **NEGATIVE}),  # no true CFG
    (True, SCHNELL, "pt", {"num_inference_steps": 2, "joint_attention_kwargs": {"scale": 1.0}}),
]


@pytest.mark.parametrize("guidance_embeds, config, output_type, kw", LEVEL2, ids=lambda v: str(v)[:30])
def test_level2_matches_the_pipeline(flux_text, guidance_embeds, config, output_type, kw):
    ours, truth, eager = runs(flux_text, config, guidance_embeds=guidance_embeds, output_type=output_type, **kw)
    check_level2_images(ours, truth, eager, output_type, kw, (16, 16),
                        f"Flux level 2 {guidance_embeds} {config} {output_type} {kw}")


@pytest.mark.parametrize("guidance_embeds, kw", [(True, {}), (False, {"true_cfg_scale": 2.5})])
def test_level2_with_diffkern_scheduler_and_embeddings(guidance_embeds, kw):
    """diffkern's scheduler in the pipeline, pre-computed embeddings (and negatives) and no text encoders."""
    ours, truth, eager = runs(tiny_flux, DEV, call=embeds_call, ours_cls=dd.FlowMatchEulerDiscreteScheduler,
                              guidance_embeds=guidance_embeds, **kw)
    assert_matches_reference(ours, truth, eager, f"Flux level 2 embeddings {guidance_embeds} {kw}")


def test_a_new_guidance_scale_reuses_the_loop():
    """The distilled guidance is a tensor extra arg, not part of the model wrapper: calls with other scales reuse
    one wrapper (and so one CUDA-graph capture, whose replay copies the new tensor in) and match the pipeline."""
    pipe = tiny_flux(THEIRS(**DEV))
    fast = dd.accelerate(pipe)
    for w in (3.5, 7.0):
        truth = embeds_call(pipe, torch.Generator().manual_seed(1), "latent", guidance_scale=w)
        ours = embeds_call(fast, torch.Generator().manual_seed(1), "latent", guidance_scale=w)
        torch.testing.assert_close(ours, truth, rtol=1e-4, atol=1e-5)
    assert len(fast._models) == 1


def test_schedule_is_the_pipelines():
    """Flux passes linspace(1, 1/N, N) and mu to set_timesteps; t = 1 runs at FLOW_TOP with timestep 1000."""
    fast = dd.accelerate(tiny_flux(THEIRS(**DEV)))
    _, spec = fast._schedule(4, mu=0.7)
    theirs = THEIRS(**DEV)
    theirs.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=0.7)
    assert spec.method == "euler" and spec.sigmas[0] == FLOW_TOP and spec.sigmas[-1] == 0.0
    torch.testing.assert_close(torch.tensor(spec.timesteps), theirs.timesteps, rtol=1e-6, atol=0)


def test_first_step_from_t_equal_one_is_exact_in_float64():
    """One step from t = 1 to 0 in float64 (D = x_t - v, from the state 2^70*x_t) is the pipeline's, bitwise."""
    check_one_step_from_t_one_is_exact(lambda: tiny_flux(THEIRS(**SCHNELL)), MODULES, embeds_call)


def test_stochastic_sampling_is_reproducible_per_seed():
    """stochastic_sampling is lcm with Philox noise keyed by a seed from the generator: the same generator gives
    the same images, another one others; one step from t = 1 to 0 draws nothing: the pipeline's image."""
    fast = dd.accelerate(tiny_flux(THEIRS(**DEV, stochastic_sampling=True)))
    assert fast._schedule(4)[1].method == "lcm"
    latents = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(7))

    def run(seed, steps=3):
        return embeds_call(fast, torch.Generator().manual_seed(seed), latents=latents, num_inference_steps=steps)
    a = run(1)
    torch.testing.assert_close(run(1), a, rtol=0, atol=0)
    assert not torch.allclose(run(2), a)
    truth = embeds_call(fast.pipe, None, latents=latents, num_inference_steps=1)
    torch.testing.assert_close(run(1, steps=1), truth, rtol=1e-5, atol=1e-5)


def test_other_methods_run_from_t_equal_one():
    fast = dd.accelerate(tiny_flux(THEIRS(**DEV)), method="dpmpp_2m")
    out = embeds_call(fast, torch.Generator().manual_seed(0), true_cfg_scale=2.0)
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="method: 'heun' cannot start at flow time t = 1"):
        embeds_call(dd.accelerate(fast.pipe, method="heun"), torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kw, match", [
    ({"ip_adapter_image_embeds": [torch.zeros(2, 1, 4)]}, "ip_adapter_image_embeds"),
    ({"negative_ip_adapter_image_embeds": [torch.zeros(2, 1, 4)]}, "negative_ip_adapter_image_embeds"),
    ({"joint_attention_kwargs": {"scale": 1.0, "attention_mask": None}}, "joint_attention_kwargs"),
    ({"callback_on_step_end": lambda *a: {}}, "callback_on_step_end"),
])
def test_refused_arguments_name_themselves(kw, match):
    fast = dd.accelerate(tiny_flux(THEIRS(**DEV)))
    with pytest.raises(TypeError, match=match):
        embeds_call(fast, torch.Generator().manual_seed(0), **kw)


def test_true_cfg_needs_one_shape_for_both_halves():
    pipe = tiny_flux(THEIRS(**DEV))
    e = [torch.randn(shape) for shape in ((1, 5, 32), (1, 16), (1, 7, 32), (1, 16))]
    with pytest.raises(ValueError, match="true_cfg_scale: the negative prompt embeddings"):
        dd.accelerate(pipe)(prompt_embeds=e[0], pooled_prompt_embeds=e[1], negative_prompt_embeds=e[2],
                            negative_pooled_prompt_embeds=e[3], true_cfg_scale=2.0, height=16, width=16)


def test_other_flux_pipelines_and_schedulers_are_refused():
    pipe = tiny_flux(THEIRS(**DEV))
    inpaint = diffusers.FluxInpaintPipeline(**pipe.components)  # img2img runs: test_diffusers_flow_img2img.py
    with pytest.raises(TypeError, match="FluxInpaintPipeline.*'mask_image'"):
        dd.accelerate(inpaint)
    pipe.scheduler = diffusers.EulerDiscreteScheduler()
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler only"):
        dd.accelerate(pipe)
