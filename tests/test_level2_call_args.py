"""Call-argument conformance of Level 2 (``diffkern.diffusers.accelerate``): every argument of a wrapped pipeline's
``__call__`` is honoured (the stock pipeline's images) or refused by name, never silently dropped.

Structure (all handlers, no model runs): each stock parameter is a parameter of its handler or refused when given,
each handler parameter is read by the handler (a parameter it takes and never reads would be a silently ignored
argument), and each handler hands its leftover keywords to the refusal. Behaviour (the cheapest pipelines, few steps):
``StableDiffusionPipeline`` arguments that no other test compares with the stock pipeline (user latents, lists of
generators with ``num_images_per_prompt``, ``clip_skip``, given embeddings, non-default and partial sizes,
``cross_attention_kwargs`` reaching a custom attention processor, output types and ``return_dict``), the input
checks the stock pipeline makes, its refusals, and ``DDIMPipeline``'s ``use_clipped_model_output``.

Oracle: the stock pipeline; the project rule (``diffkern.testing.assert_matches_reference``: the float64 pipeline is
the truth, the stock float32 run the yardstick), via ``test_diffusers_pipelines.three_runs``.
"""
import ast
import importlib
import inspect
import textwrap

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.testing import assert_matches_reference  # noqa: E402
from test_diffusers_pipelines import three_runs, tiny_sd, tiny_unet, unconditional  # noqa: E402, F401

from diffusers.models.attention_processor import AttnProcessor  # noqa: E402

PROMPTS = ["a cat", "a dog"]
STEPS = 3
EULER = ("EulerDiscreteScheduler", {"beta_start": 0.0002, "beta_end": 0.015})

#----------------------------------------------------------------------------
# 1. Structure: every stock argument is a handler's (read by it) or refused.

_ACC = importlib.import_module("diffkern.diffusers.accelerate")  # the module (the package exports the function)


def _handlers():
    """(stock pipeline class name, handler function) of every Level 2 pipeline kind."""
    from diffkern.diffusers import (accelerate_controlnet as cn, accelerate_flow_img2img as fi, accelerate_flux as fx,
                                    accelerate_img2img as i2i, accelerate_inpaint as inp, accelerate_pixart as px,
                                    accelerate_sd3 as sd3, accelerate_sdxl_controlnet as xcn,
                                    accelerate_sdxl_img2img as xi2i, accelerate_sdxl_inpaint as xinp,
                                    accelerate_text2img as t2i)
    uncond = _ACC.AcceleratedPipeline._call_unconditional
    return [("DDPMPipeline", uncond), ("DDIMPipeline", uncond), ("StableDiffusionPipeline", t2i.call_sd),
            ("LatentConsistencyModelPipeline", t2i.call_lcm), ("StableDiffusionXLPipeline", t2i.call_sdxl),
            ("StableDiffusionImg2ImgPipeline", i2i.call_sd_img2img),
            ("StableDiffusionInpaintPipeline", inp.call_sd_inpaint),
            ("StableDiffusionControlNetPipeline", cn.call_sd_controlnet),
            ("StableDiffusionXLControlNetPipeline", xcn.call_sdxl_controlnet),
            ("StableDiffusionXLImg2ImgPipeline", xi2i.call_sdxl_img2img),
            ("StableDiffusionXLInpaintPipeline", xinp.call_sdxl_inpaint), ("StableDiffusion3Pipeline", sd3.call_sd3),
            ("FluxPipeline", fx.call_flux), ("StableDiffusion3Img2ImgPipeline", fi.call_sd3_img2img),
            ("FluxImg2ImgPipeline", fi.call_flux_img2img), ("PixArtAlphaPipeline", px.call_pixart),
            ("PixArtSigmaPipeline", px.call_pixart)]


# Handler parameters that are read by no code, each for a reason: PixArt-alpha's mask_feature is a deprecated no-op
# in the pipeline too.
_NO_OPS = {"mask_feature"}


def _reads(handler) -> set:
    """The names a handler reads; its parameters all, when it passes ``locals()`` on (SD3's prompt arguments)."""
    source = textwrap.dedent(inspect.getsource(handler))
    body = ast.parse(source).body[0]
    names = {n.id for n in ast.walk(body) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    if "locals" in names:
        from diffkern.diffusers.accelerate_sd3 import SD3_PROMPTS
        names |= set(SD3_PROMPTS)
    return names


@pytest.mark.parametrize("name, handler", _handlers(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_stock_argument_is_honoured_or_refused(name, handler):
    stock = inspect.signature(getattr(diffusers, name).__call__).parameters.values()
    ours = inspect.signature(handler).parameters
    given = [p.name for p in stock if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    missing = [a for a in given if a not in ours and a not in _ACC._REFUSED_IF_GIVEN]
    assert not missing, f"{name}: {handler.__name__} neither takes nor refuses {missing}"
    assert "unsupported" in ours, f"{handler.__name__}: no **unsupported to refuse the other arguments"
    reads = _reads(handler)
    unread = sorted(a for a in ours if a not in reads and a not in _NO_OPS | {"acc", "self"})
    assert not unread, f"{handler.__name__} takes {unread} and never reads them (silently ignored)"
    for a in given:  # a stock default that differs from the handler's would change a call that leaves it out
        p, q = inspect.signature(getattr(diffusers, name).__call__).parameters[a], ours.get(a)
        if q is not None and q.default is not None and q.default is not inspect.Parameter.empty:
            assert q.default == p.default, f"{handler.__name__}: {a} defaults to {q.default!r}, stock {p.default!r}"

#----------------------------------------------------------------------------
# 2. StableDiffusionPipeline: arguments against the stock pipeline.


class GainProcessor(AttnProcessor):
    """Plain attention whose output is multiplied by ``gain``: a ``cross_attention_kwargs`` key only this processor
    takes (diffusers drops keys a processor's signature lacks, so the images show whether it arrived)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, gain=1.0):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb) * gain


def _gains(make):
    def build(scheduler):
        pipe = make(scheduler)
        pipe.unet.set_attn_processor(GainProcessor())
        return pipe
    return build


def _images(out):
    out = out.images
    return out if isinstance(out, torch.Tensor) else torch.as_tensor(np.asarray(out))


def sd_call(pipe, generator, **kw):
    """Two prompts with CFG (one negative prompt) and ``kw``: the images as a tensor. Keys starting with "make_"
    build the argument from the pipeline being called (its dtype, its text encoder)."""
    kw = dict(kw)
    if kw.pop("make_latents", False):
        kw["latents"] = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9)).to(pipe.unet.dtype)
    if kw.pop("make_generators", False):  # fresh ones at each run, one per image
        generator = [torch.Generator().manual_seed(s) for s in (3, 4, 5, 6)]
    prompt, negative = PROMPTS, ["blurry", ""]
    if kw.pop("make_embeds", False):
        embeds, negative_embeds = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative)
        kw.update(prompt_embeds=embeds, negative_prompt_embeds=negative_embeds)
        prompt, negative = None, None
    return _images(pipe(prompt, generator=generator, num_inference_steps=STEPS, guidance_scale=4.0,
                        negative_prompt=negative, output_type="pt", **kw))


SD_CASES = [
    {"make_latents": True},
    {"make_generators": True, "num_images_per_prompt": 2},
    {"make_embeds": True},
    {"height": 24, "width": 32},
    {"height": 24},  # the stock pipeline drops a lone size: both take the UNet's default
    {"cross_attention_kwargs": {"gain": 0.5}},
    {"callback_on_step_end_tensor_inputs": ["latents"]},  # the tensors a callback would get: none given, no effect
]


@pytest.mark.parametrize("kw", SD_CASES, ids=lambda kw: "-".join(kw))
def test_sd_arguments_match_the_stock_pipeline(tiny_sd, kw):
    make = _gains(tiny_sd) if "cross_attention_kwargs" in kw else tiny_sd
    ours, truth, eager = three_runs(make, *EULER, sd_call, 2, **kw)
    assert_matches_reference(ours, truth, eager, f"StableDiffusionPipeline {kw}")


def test_sd_clip_skip_reaches_the_text_encoder(tiny_sd):
    """clip_skip goes to the pipeline's encode_prompt: the stock images, or (where diffusers' clip_skip path does not
    run with the installed transformers: CLIPTextModel without ``text_model``) the stock pipeline's own error."""
    pipe = tiny_sd(getattr(diffusers, EULER[0])(**EULER[1]))
    try:
        sd_call(pipe, torch.Generator().manual_seed(5), clip_skip=1)
    except AttributeError as stock:
        with pytest.raises(AttributeError) as ours:
            sd_call(dd.accelerate(pipe), torch.Generator().manual_seed(5), clip_skip=1)
        assert str(ours.value) == str(stock)
        return
    ours, truth, eager = three_runs(tiny_sd, *EULER, sd_call, 2, clip_skip=1)
    assert_matches_reference(ours, truth, eager, "StableDiffusionPipeline clip_skip=1")


def test_sd_cross_attention_kwargs_change_the_images(tiny_sd):
    """The gain reaches the processor (the comparison above would also pass if neither pipeline applied it)."""
    fast = dd.accelerate(_gains(tiny_sd)(getattr(diffusers, EULER[0])(**EULER[1])))
    plain = sd_call(fast, torch.Generator().manual_seed(5))
    gained = sd_call(fast, torch.Generator().manual_seed(5), cross_attention_kwargs={"gain": 0.5})
    assert (plain - gained).abs().max() > 1e-3


def _check_outputs(ours: dict, stock: dict, what: str) -> None:
    """``ours``/``stock``: output_type -> the images of a return_dict=False call. The stock types; "np" the "pt"
    images as NHWC arrays and "pil" those arrays as PIL images, exactly (the values against the float64 pipeline are
    the other tests'); "latent" of the stock shape."""
    for output_type in ours:
        assert type(ours[output_type]) is type(stock[output_type]), f"{what} {output_type}"
    pt, arrays = ours["pt"], ours["np"]
    assert np.array_equal(arrays, pt.permute(0, 2, 3, 1).float().numpy()), f"{what}: np != pt"
    assert [np.asarray(im).tolist() for im in ours["pil"]] == \
        [np.asarray(im).tolist() for im in diffusers.utils.numpy_to_pil(arrays)], f"{what}: pil != np"
    if "latent" in ours:
        assert ours["latent"].shape == stock["latent"].shape, what


def test_sd_output_types_and_return_dict(tiny_sd):
    """return_dict=False: the stock pipeline's tuple (images, nsfw flags), each output_type's images."""
    pipe = tiny_sd(getattr(diffusers, EULER[0])(**EULER[1]))
    fast = dd.accelerate(pipe)

    def call(p, output_type):
        out = p(PROMPTS, generator=torch.Generator().manual_seed(5), num_inference_steps=STEPS, guidance_scale=4.0,
                output_type=output_type, return_dict=False)
        assert isinstance(out, tuple) and len(out) == 2 and out[1] is None
        return out[0]
    kinds = ("pt", "np", "pil", "latent")
    _check_outputs({k: call(fast, k) for k in kinds}, {k: call(pipe, k) for k in kinds}, "StableDiffusionPipeline")


#----------------------------------------------------------------------------
# 3. StableDiffusionPipeline: the stock input checks and the refusals.


@pytest.mark.parametrize("kw", [
    {"height": 20, "width": 16},  # not divisible by 8
    {"prompt_embeds": torch.zeros(2, 8, 32)},  # with a prompt too
    {"negative_prompt": ["x", "y"], "negative_prompt_embeds": torch.zeros(2, 8, 32)},
], ids=lambda kw: "-".join(kw))
def test_sd_input_checks_raise_as_the_stock_pipeline(tiny_sd, kw):
    pipe = tiny_sd(getattr(diffusers, EULER[0])(**EULER[1]))
    with pytest.raises(ValueError) as stock:
        pipe(PROMPTS, num_inference_steps=STEPS, output_type="pt", **kw)
    with pytest.raises(ValueError) as ours:
        dd.accelerate(pipe)(PROMPTS, num_inference_steps=STEPS, output_type="pt", **kw)
    assert str(ours.value) == str(stock.value)


@pytest.mark.parametrize("kw", [
    {"timesteps": [999, 500]}, {"sigmas": [14.0, 1.0]}, {"ip_adapter_image": np.zeros((16, 16, 3), np.uint8)},
    {"ip_adapter_image_embeds": [torch.zeros(2, 1, 8)]}, {"callback_on_step_end": lambda *a: {}},
], ids=lambda kw: next(iter(kw)))
def test_sd_refusals_name_the_argument(tiny_sd, kw):
    fast = dd.accelerate(tiny_sd(getattr(diffusers, EULER[0])(**EULER[1])))
    with pytest.raises(TypeError, match=next(iter(kw))):
        fast(PROMPTS, num_inference_steps=STEPS, output_type="pt", **kw)

#----------------------------------------------------------------------------
# 4. DDIMPipeline: use_clipped_model_output and output types.


def _ddim(scheduler):
    return diffusers.DDIMPipeline(unet=tiny_unet(), scheduler=scheduler)


def test_ddim_use_clipped_model_output_matches_the_stock_pipeline():
    """Without clip_sample the re-derived noise is the model's own (with it: tests/test_level2_clip18.py)."""
    ours, truth, eager = three_runs(_ddim, "DDIMScheduler", {"clip_sample": False}, unconditional, 2, eta=0.0,
                                    use_clipped_model_output=True)
    assert_matches_reference(ours, truth, eager, "DDIMPipeline use_clipped_model_output=True")


def test_unconditional_output_types_and_return_dict():
    pipe = _ddim(diffusers.DDIMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    fast = dd.accelerate(pipe)

    def call(p, **kw):
        return p(batch_size=2, generator=torch.Generator().manual_seed(5), num_inference_steps=STEPS, **kw)
    kinds = ("pt", "np", "pil")
    ours, stock = ({k: call(p, output_type=k) for k in kinds} for p in (fast, pipe))
    for k in kinds:
        assert type(ours[k]) is type(stock[k]), k
    _check_outputs({k: v.images for k, v in ours.items()}, {k: v.images for k, v in stock.items()}, "DDIMPipeline")
    ours, stock = call(fast, output_type="np", return_dict=False), call(pipe, output_type="np", return_dict=False)
    assert isinstance(ours, tuple) and len(ours) == len(stock) == 1 and type(ours[0]) is type(stock[0])

#----------------------------------------------------------------------------
# 5. Output types and return_dict of the transformer pipelines' own output code (SD3, PixArt).


def _sd3_pipe():
    from test_diffusers_flow import tiny_sd3
    return tiny_sd3(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))


def _sd3_call(p, output_type):
    g = torch.Generator().manual_seed(0)
    e = [torch.randn(shape, generator=g) for shape in ((2, 7, 32), (2, 64)) * 2]
    return p(prompt_embeds=e[0], pooled_prompt_embeds=e[1], negative_prompt_embeds=e[2],
             negative_pooled_prompt_embeds=e[3], guidance_scale=3.0, num_inference_steps=2, height=16, width=16,
             generator=torch.Generator().manual_seed(1), output_type=output_type, return_dict=False)


def _pixart_pipe():
    from test_diffusers_pixart import tiny_pixart
    return tiny_pixart("sigma", diffusers.DPMSolverMultistepScheduler())


def _pixart_call(p, output_type):
    return p(PROMPTS, negative_prompt=["blurry", ""], num_inference_steps=2, max_sequence_length=6, height=16,
             width=16, use_resolution_binning=False, clean_caption=False, generator=torch.Generator().manual_seed(1),
             output_type=output_type, return_dict=False)


@pytest.mark.parametrize("make, call", [(_sd3_pipe, _sd3_call), (_pixart_pipe, _pixart_call)], ids=["sd3", "pixart"])
def test_transformer_output_types_and_return_dict(make, call):
    pipe = make()
    fast = dd.accelerate(pipe)
    kinds = ("pt", "np", "pil", "latent")
    ours, stock = ({k: call(p, k) for k in kinds} for p in (fast, pipe))
    for k in kinds:
        assert isinstance(ours[k], tuple) and len(ours[k]) == len(stock[k]) == 1, k
    _check_outputs({k: v[0] for k, v in ours.items()}, {k: v[0] for k, v in stock.items()}, type(pipe).__name__)


def test_deprecated_pipeline_keeps_a_lone_size(tiny_sd):
    """StableDiffusionModelEditingPipeline (deprecated) defaults each missing size on its own, where
    StableDiffusionPipeline drops a lone one: the fused loop follows the pipeline it wraps."""
    cls = getattr(diffusers, "StableDiffusionModelEditingPipeline", None)
    if cls is None:
        pytest.skip("this diffusers has no StableDiffusionModelEditingPipeline")
    parts = tiny_sd(getattr(diffusers, EULER[0])(**EULER[1])).components
    pipe = cls(**{k: v for k, v in parts.items() if k != "image_encoder"}, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    from test_diffusers_level2_controlnet import three_runs as runs

    ours, truth, eager = runs(pipe, sd_call, height=24)
    assert ours.shape == eager.shape == (2, 3, 24, 16)
    assert_matches_reference(ours, truth, eager, "StableDiffusionModelEditingPipeline height=24")
