"""Level 2 on Stable Diffusion 3: ``accelerate(StableDiffusion3Pipeline)`` runs the flow-matching loop in diffkern.

Tiny random models, no downloads: the 1-layer SD3Transformer2DModel and AutoencoderKL of ``test_diffusers_flow.py``
(16x16 images, 8x8 latents), with two tiny CLIP text encoders on the handwritten vocabulary of
``test_diffusers_pipelines.py`` (no T5: the pipeline then uses zeros for its embeddings), or with no text encoder
at all and pre-computed embeddings.

Tolerance: the project rule on whole pipelines. The truth is the stock pipeline (diffusers'
FlowMatchEulerDiscreteScheduler) run in float64 (modules in float64, scheduler and pipeline module under
``diffusers_float64``), the yardstick its float32 run; Level 2 must be at most twice as far from the truth, plus the
float32 floor.
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
from test_diffusers_pipelines import MAX_TOKENS, write_clip_vocab  # noqa: E402

THEIRS = diffusers.FlowMatchEulerDiscreteScheduler
MODULES = (importlib.import_module(THEIRS.__module__),
           importlib.import_module(diffusers.StableDiffusion3Pipeline.__module__))
SD3 = {"shift": 3.0}  # stabilityai/stable-diffusion-3-medium's scheduler
DYNAMIC = {"use_dynamic_shifting": True, "base_image_seq_len": 16, "max_image_seq_len": 256}
TEXT = ("text_encoder", "text_encoder_2")


@pytest.fixture
def tiny_sd3_text(tmp_path, monkeypatch):
    """A factory ``scheduler -> StableDiffusion3Pipeline`` with tiny_sd3's transformer and VAE and two CLIP text
    encoders with projection (width 16 each: 32 = the transformer's joint_attention_dim; pooled 32 + 32 = 64)."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # everything here is local
    tokenizer = transformers.CLIPTokenizer.from_pretrained(write_clip_vocab(tmp_path), model_max_length=MAX_TOKENS)

    def make(scheduler):
        base = tiny_sd3(scheduler)
        torch.manual_seed(3)
        config = transformers.CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=32)
        encoders = [transformers.CLIPTextModelWithProjection(config).eval() for _ in TEXT]
        pipe = diffusers.StableDiffusion3Pipeline(**dict(
            base.components, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tokenizer,
            tokenizer_2=tokenizer))
        pipe.set_progress_bar_config(disable=True)
        return pipe
    return make


def text2image(pipe, generator, output_type="pt", **kw):
    """Two prompts with CFG, one with a negative prompt; the images (or latents) as a tensor ("np": NHWC)."""
    kw = {"guidance_scale": 4.0, "negative_prompt": ["blurry", ""], "num_inference_steps": 4, **kw}
    out = pipe(["a cat", "a dog"], generator=generator, output_type=output_type, height=16, width=16, **kw).images
    return out if isinstance(out, torch.Tensor) else torch.as_tensor(out)


def embeds_call(pipe, generator, output_type="pt", **kw):
    """Pre-computed (pooled) prompt embeddings, for the pipeline without text encoders."""
    g = torch.Generator().manual_seed(0)
    dtype = pipe.transformer.dtype
    e = [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for shape in ((2, 7, 32), (2, 64)) * 2]
    kw = {"guidance_scale": 3.0, "num_inference_steps": 3, **kw}
    return pipe(prompt_embeds=e[0], pooled_prompt_embeds=e[1], negative_prompt_embeds=e[2],
                negative_pooled_prompt_embeds=e[3], height=16, width=16, generator=generator,
                output_type=output_type, **kw).images


def runs(make, config, call=text2image, ours_cls=THEIRS, **kw):
    """(Level 2, truth, stock float32) of ``call``; Level 2's pipeline holds ``ours_cls`` (diffusers' or
    diffkern's FlowMatchEulerDiscreteScheduler)."""
    return flow_runs(make(THEIRS(**config)), config, MODULES, call, ours_cls, **kw)


LEVEL2 = [  # (scheduler config, output type, call kwargs)
    (SD3, "pt", {}),
    (SD3, "np", {"guidance_scale": 1.0, "negative_prompt": None}),
    (SD3, "latent", {"num_images_per_prompt": 2}),
    (SD3, "pt", {"num_inference_steps": 1, "prompt_2": ["blurry dog", "cat"], "negative_prompt_2": ["dog", "a"]}),
    (SD3, "pt", {"num_inference_steps": 2, "prompt_3": ["a", "b"], "joint_attention_kwargs": {"scale": 1.0}}),
    ({}, "pt", {"num_inference_steps": 3, "num_images_per_prompt": 2, "negative_prompt": None}),
    (DYNAMIC, "pt", {}),
    (DYNAMIC, "pt", {"num_inference_steps": 2, "mu": 0.3}),
    (dict(SD3, use_karras_sigmas=True, shift_terminal=0.05), "pt", {"num_inference_steps": 3}),
    (dict(SD3, use_exponential_sigmas=True), "latent", {"num_inference_steps": 3}),  # starts below t = 1
    (SD3, "pt", {"sigmas": [1.0, 0.7, 0.3]}),  # custom sigmas (shifted by the scheduler) give the step count
    (DYNAMIC, "pt", {"sigmas": [1.0, 0.5], "num_inference_steps": 9}),
]


@pytest.mark.parametrize("config, output_type, kw", LEVEL2, ids=lambda v: str(v)[:30])
def test_level2_matches_the_pipeline(tiny_sd3_text, config, output_type, kw):
    ours, truth, eager = runs(tiny_sd3_text, config, output_type=output_type, **kw)
    check_level2_images(ours, truth, eager, output_type, kw, (4, 8, 8), f"SD3 level 2 {config} {output_type} {kw}")


@pytest.mark.parametrize("config", [SD3, DYNAMIC])
def test_level2_with_diffkern_scheduler_and_embeddings(config):
    """diffkern's scheduler in the pipeline, pre-computed embeddings and no text encoders."""
    ours, truth, eager = runs(tiny_sd3, config, call=embeds_call, ours_cls=dd.FlowMatchEulerDiscreteScheduler)
    assert_matches_reference(ours, truth, eager, f"SD3 level 2 embeddings {config}")


def test_first_sigma_is_the_finite_stand_in_for_t_equal_one(tiny_sd3_text):
    fast = dd.accelerate(tiny_sd3_text(THEIRS(**SD3)))
    _, spec = fast._schedule(4)
    assert spec.method == "euler" and spec.sigmas[0] == FLOW_TOP and spec.sigmas[-1] == 0.0
    assert 1.0 + FLOW_TOP == FLOW_TOP and spec.timesteps[0] == 1000.0


def test_first_step_from_t_equal_one_is_exact_in_float64():
    """One step from t = 1 to 0 in float64 (D = x_t - v, from the state 2^70*x_t) is the pipeline's, bitwise."""
    check_one_step_from_t_one_is_exact(lambda: tiny_sd3(THEIRS(**SD3)), MODULES, embeds_call)


def test_stochastic_sampling_is_reproducible_per_seed(tiny_sd3_text):
    """stochastic_sampling is lcm on the VE sigmas with Philox noise keyed by a seed from the generator (diffusers
    draws from torch's global generator): the same generator gives the same images, another one others."""
    fast = dd.accelerate(tiny_sd3_text(THEIRS(shift=3.0, stochastic_sampling=True)))
    assert fast._schedule(4)[1].method == "lcm"
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))

    def run(seed, steps=3):
        return text2image(fast, torch.Generator().manual_seed(seed), latents=latents, num_inference_steps=steps)
    a = run(1)
    torch.testing.assert_close(run(1), a, rtol=0, atol=0)
    assert not torch.allclose(run(2), a)
    # one step from t = 1 to 0 draws nothing: the pipeline's image
    truth = text2image(fast.pipe, None, latents=latents, num_inference_steps=1)
    torch.testing.assert_close(run(1, steps=1), truth, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["dpmpp_2m", "euler_ancestral", "unipc", "dpmpp_2s_ancestral"])
def test_other_methods_run_from_t_equal_one(tiny_sd3_text, method):
    fast = dd.accelerate(tiny_sd3_text(THEIRS(**SD3)), method=method)
    out = text2image(fast, torch.Generator().manual_seed(0), num_inference_steps=3)
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()


@pytest.mark.parametrize("kw, match", [
    ({"skip_guidance_layers": [0]}, "skip_guidance_layers"),
    ({"skip_layer_guidance_scale": 3.5}, "skip_layer_guidance_scale"),
    ({"joint_attention_kwargs": {"ip_adapter_image_embeds": None}}, "joint_attention_kwargs"),
    ({"callback_on_step_end": lambda *a: {}}, "callback_on_step_end"),
])
def test_refused_arguments_name_themselves(tiny_sd3_text, kw, match):
    fast = dd.accelerate(tiny_sd3_text(THEIRS(**SD3)))
    with pytest.raises(TypeError, match=match):
        text2image(fast, torch.Generator().manual_seed(0), **kw)


def test_heun_refuses_custom_sigmas_as_the_pipeline(tiny_sd3_text):
    """FlowMatchHeun's set_timesteps takes no sigmas: the stock pipeline raises, and so does the fused loop."""
    pipe = tiny_sd3_text(diffusers.FlowMatchHeunDiscreteScheduler(**SD3))
    with pytest.raises(ValueError):
        text2image(pipe, torch.Generator().manual_seed(0), sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="sigmas"):
        text2image(dd.accelerate(pipe), torch.Generator().manual_seed(0), sigmas=[1.0, 0.5])


def test_refused_method_and_schedulers(tiny_sd3_text):
    pipe = tiny_sd3_text(THEIRS(**SD3))
    with pytest.raises(ValueError, match="method: 'heun' cannot start at flow time t = 1"):
        text2image(dd.accelerate(pipe, method="heun"), torch.Generator().manual_seed(0))
    pipe.scheduler = THEIRS(shift=2.0, invert_sigmas=True)
    with pytest.raises(ValueError, match="invert_sigmas"):
        dd.accelerate(pipe)
    pipe.scheduler = diffusers.EulerDiscreteScheduler()
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler only"):
        dd.accelerate(pipe)


def test_flow_scheduler_in_a_unet_pipeline_is_refused():
    from test_diffusers_pipelines import tiny_unet

    pipe = diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=diffusers.DDPMScheduler())
    pipe.scheduler = THEIRS(**SD3)
    with pytest.raises(ValueError, match="flow-matching transformer pipelines only"):
        dd.accelerate(pipe)

