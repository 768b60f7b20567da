"""Full pipelines with tiny random models (no downloads): Level 1 (diffkern schedulers inside diffusers pipelines)
and Level 2 (``diffkern.diffusers.accelerate``) against the same pipelines with diffusers' own schedulers. The
text-to-image pipeline is diffusers' own ``StableDiffusionPipeline`` with a random CLIP text encoder and a CLIP
tokenizer on a handwritten vocabulary.

Tolerance: the project rule of ``test_diffusers_schedulers.py``, on whole pipelines. The truth is the pipeline run
in float64 (UNet/VAE/text encoder in float64, diffusers' scheduler in float64 via ``diffusers_float64``, the same
float32 random draws upcast); diffusers32 is the stock float32 run, and ours must be within twice its distance to the
truth (+ the 2e-6 relative floor). Rounding differences early in the loop propagate through the UNet in both runs
alike, so the yardstick scales with the real conditioning of each pipeline. Deterministic schedulers compare images;
stochastic ones compare Level 1 with the generator's noise (drawn as diffusers draws it), and Level 2 (Philox noise)
with the same loop driven step by step through diffkern's scheduler and the same Philox stream.
"""
import contextlib
import copy
import importlib
import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.testing import assert_matches_reference  # noqa: E402
from test_diffusers_schedulers import diffusers_float64, scheduler_module  # noqa: E402

from diffusers import AutoencoderKL, DDIMPipeline, DDPMPipeline, UNet2DConditionModel, UNet2DModel  # noqa: E402
from diffusers.models.unets.unet_2d import UNet2DOutput  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

STEPS = 6
TEXT_STEPS = 4
MAX_TOKENS = 8  # the tokenizer's model_max_length = the text encoder's positions
WORDS = ("a", "cat", "dog", "blurry")  # the words of the prompts below, each one BPE token


#----------------------------------------------------------------------------
# Tiny models.


class NoiseLikeUNet(UNet2DModel):
    """A random UNet2DModel whose eps prediction is the input plus a random network's output: x0 estimates stay
    O(1), so images are not all clipped to 0/1 and the image comparison means something."""

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        out = sample + 0.3 * super().forward(sample, timestep, class_labels, return_dict=False)[0]
        return UNet2DOutput(sample=out) if return_dict else (out,)


def tiny_unet(cls=NoiseLikeUNet):
    torch.manual_seed(0)
    return cls(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
               down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
               norm_num_groups=4, attention_head_dim=4).eval()


def write_clip_vocab(folder):
    """``vocab.json`` and ``merges.txt`` of a CLIP byte-level BPE in ``folder``: the two special tokens, the letters
    of WORDS (inner and word-final ``</w>`` forms), and merges building each word left to right into one token."""
    letters = sorted(set("".join(WORDS)))
    vocab = ["<|startoftext|>", "<|endoftext|>"] + letters + [c + "</w>" for c in letters]
    merges = []
    for word in WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            merges.append(f"{symbols[0]} {symbols[1]}")
            symbols = [symbols[0] + symbols[1]] + symbols[2:]
            vocab.append(symbols[0])
    vocab = list(dict.fromkeys(vocab))
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return folder


@pytest.fixture
def tiny_sd(tmp_path, monkeypatch):
    """A factory ``scheduler -> StableDiffusionPipeline`` of tiny random models (the same weights at each call):
    a 16x16-pixel, 8x8-latent UNet2DConditionModel and AutoencoderKL, a 2-layer CLIPTextModel of width 32."""
    transformers = pytest.importorskip("transformers")
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # everything here is local
    tokenizer = transformers.CLIPTokenizer.from_pretrained(write_clip_vocab(tmp_path), model_max_length=MAX_TOKENS)

    def make(scheduler):
        torch.manual_seed(1)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, norm_num_groups=4,
            attention_head_dim=2).eval()
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                            norm_num_groups=4, sample_size=16).eval()
        text_config = transformers.CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        text_encoder = transformers.CLIPTextModel(text_config).eval()
        pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                                 scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    return make


def float64_copy(pipe, scheduler):
    """The same pipeline with float64 modules and ``scheduler`` (built inside ``diffusers_float64``)."""
    twin = copy.deepcopy(pipe)
    for name in ("unet", "transformer", "vae", "text_encoder"):
        if hasattr(twin, name):
            getattr(twin, name).double()
    twin.scheduler = scheduler
    return twin


def pipeline_modules(pipe):
    """diffusers' pipeline module: its randn_tensor draws the initial latents (float32 draws, upcast in float64)."""
    module = importlib.import_module(type(pipe).__module__)
    return [module] if module.__name__.startswith("diffusers.") else []

#----------------------------------------------------------------------------
# Runs.


def three_runs(make_pipe, name, config, call, level, **call_kw):
    """(ours, truth, diffusers32) outputs of ``call(pipe, generator)`` for a diffusers ``name`` scheduler."""
    eager_sched = getattr(diffusers, name)(**config)
    pipe = make_pipe(eager_sched)
    pipe.scheduler = eager_sched  # DDIMPipeline converts its scheduler at construction: assign afterwards
    # the truth runs the config the pipeline runs: StableDiffusionPipeline rewrites steps_offset (and DDIM's
    # clip_sample) of the scheduler it is given
    run_config = {key: value for key, value in eager_sched.config.items() if not key.startswith("_")}
    with diffusers_float64(scheduler_module(name), *pipeline_modules(pipe)):
        twin = float64_copy(pipe, getattr(diffusers, name)(**run_config))
        truth = call(twin, torch.Generator().manual_seed(5), **call_kw)
    eager = call(pipe, torch.Generator().manual_seed(5), **call_kw)
    if level == 1:
        pipe.scheduler = getattr(dd, name).from_config(eager_sched.config)
        ours = call(pipe, torch.Generator().manual_seed(5), **call_kw)
    else:
        ours = call(dd.accelerate(pipe), torch.Generator().manual_seed(5), **call_kw)
    return ours, truth, eager


def unconditional(pipe, generator, **kw):
    return pipe(batch_size=2, generator=generator, num_inference_steps=STEPS, output_type="pt", **kw).images


def text2image(pipe, generator, output_type="pt", **kw):
    """Two prompts with CFG, one with a negative prompt; the images (or latents) as a tensor ("np": NHWC)."""
    out = pipe(["a cat", "a dog"], generator=generator, num_inference_steps=TEXT_STEPS, guidance_scale=4.0,
               negative_prompt=["blurry", ""], output_type=output_type, **kw).images
    return out if isinstance(out, torch.Tensor) else torch.as_tensor(out)


UNCONDITIONAL = [  # (pipeline, scheduler, config, call kwargs, levels)
    (DDPMPipeline, "DDPMScheduler", {}, {}, (1,)),
    (DDPMPipeline, "DDPMScheduler", {"prediction_type": "v_prediction", "variance_type": "fixed_large",
                                     "timestep_spacing": "trailing"}, {}, (1,)),
    (DDIMPipeline, "DDIMScheduler", {"clip_sample": False}, {}, (1, 2)),
    (DDIMPipeline, "DDIMScheduler", {"prediction_type": "v_prediction", "set_alpha_to_one": False},
     {"eta": 0.6, "use_clipped_model_output": True}, (1,)),
    (DDPMPipeline, "DPMSolverMultistepScheduler", {"timestep_spacing": "trailing"}, {}, (1, 2)),
    (DDPMPipeline, "DPMSolverMultistepScheduler", {"solver_type": "heun"}, {}, (1, 2)),
    # ends at t=0 -> alpha_bar[0]: an identity last step that accelerate drops
    (DDIMPipeline, "DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False}, {}, (2,)),
]


@pytest.mark.parametrize("pipe_cls, name, config, kw, level",
                         [(p, n, c, k, lv) for p, n, c, k, levels in UNCONDITIONAL for lv in levels],
                         ids=lambda v: getattr(v, "__name__", str(v))[:24])
def test_unconditional_pipelines(pipe_cls, name, config, kw, level):
    ours, truth, eager = three_runs(lambda s: pipe_cls(unet=tiny_unet(), scheduler=s), name, config, unconditional,
                                    level, **kw)
    assert 0.1 < float(((eager > 0) & (eager < 1)).float().mean()), "images saturated: the comparison would be void"
    assert_matches_reference(ours, truth, eager, f"{pipe_cls.__name__} {name} {config} {kw} level {level}")


TEXT2IMAGE = [  # (scheduler, config, output type, levels)
    ("EulerDiscreteScheduler", {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                                "timestep_spacing": "leading", "steps_offset": 1}, "pt", (1, 2)),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "prediction_type": "v_prediction"}, "np", (1, 2)),
    ("HeunDiscreteScheduler", {}, "pt", (1, 2)),
    ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
                       "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}, "np", (1, 2)),
    ("EulerAncestralDiscreteScheduler", {"prediction_type": "v_prediction"}, "pt", (1,)),
    ("KDPM2DiscreteScheduler", {"beta_schedule": "scaled_linear", "use_karras_sigmas": True}, "pt", (1, 2)),
    ("KDPM2DiscreteScheduler", {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, "np", (1, 2)),
    ("KDPM2AncestralDiscreteScheduler", {"timestep_spacing": "leading", "steps_offset": 1}, "pt", (1,)),
    # steps_offset left at 0: the pipeline sets it to 1, which accelerate must follow. Level 1 is left out: the
    # from_config idiom resets keys left unset at construction to the defaults (diffusers' classes alike).
    ("DDIMScheduler", {"clip_sample": False}, "pt", (2,)),
]


@pytest.mark.parametrize("name, config, output_type, level",
                         [(n, c, o, lv) for n, c, o, levels in TEXT2IMAGE for lv in levels], ids=lambda v: str(v)[:24])
def test_text2image_pipelines_with_cfg(tiny_sd, name, config, output_type, level):
    ours, truth, eager = three_runs(tiny_sd, name, config, text2image, level, output_type=output_type)
    assert ours.shape == ((2, 3, 16, 16) if output_type == "pt" else (2, 16, 16, 3))
    assert 0.1 < float(((eager > 0) & (eager < 1)).float().mean()), "images saturated: the comparison would be void"
    assert_matches_reference(ours, truth, eager, f"text2image {name} {config} {output_type} level {level}")


def test_tiny_sd_tokenizes_and_conditions(tiny_sd):
    """The handwritten vocabulary splits the test prompts into their words (no unknown tokens), and the prompts
    give different embeddings: CFG in the tests above mixes two different UNet outputs."""
    pipe = tiny_sd(diffusers.EulerDiscreteScheduler())
    tok, vocab = pipe.tokenizer, pipe.tokenizer.get_vocab()
    bos, eos = tok.bos_token_id, tok.eos_token_id
    ids = tok(["a cat", "blurry dog", ""], padding="max_length", max_length=MAX_TOKENS).input_ids
    assert ids[0][:4] == [bos, vocab["a</w>"], vocab["cat</w>"], eos]
    assert ids[1][:4] == [bos, vocab["blurry</w>"], vocab["dog</w>"], eos]
    assert ids[2] == [bos] + [eos] * (MAX_TOKENS - 1)
    cond, uncond = pipe.encode_prompt(["a cat", "a dog"], "cpu", 1, True, ["blurry", ""])
    assert cond.shape == uncond.shape == (2, MAX_TOKENS, 32)
    assert not torch.allclose(cond[0], cond[1]) and not torch.allclose(cond, uncond)


def test_ge_level2_matches_level1(tiny_sd):
    """GE has no diffusers counterpart (its step is checked against the spec in test_diffusers_schedulers.py):
    accelerate's loop against diffkern's own GEScheduler driving the pipeline, with a list of generators."""
    pipe = tiny_sd(dd.GEScheduler(clip_sample=False, beta_schedule="scaled_linear", beta_start=0.00085,
                                  beta_end=0.012))

    def run(p):
        return text2image(p, [torch.Generator().manual_seed(k) for k in (4, 9)])

    eager = run(pipe)
    with diffusers_float64(*pipeline_modules(pipe)):
        truth = run(float64_copy(pipe, dd.GEScheduler.from_config(pipe.scheduler.config)))
    assert_matches_reference(run(dd.accelerate(pipe)), truth, eager, "GE level 2")

#----------------------------------------------------------------------------
# Stochastic loops in Level 2: Philox noise, checked against diffkern's Level-1 scheduler on the same stream.


def _level1_philox_loop(unet, name, config, seed, generator, dtype):
    """DDPMPipeline's loop, step by step, with diffkern's scheduler drawing Philox noise keyed by ``seed``; with the
    initial noise scaled by ``init_noise_sigma`` and the UNet input by ``scale_model_input``, as the fused loop does
    (both the identity for the VP schedulers, which DDPMPipeline's own loop assumes)."""
    sched = getattr(dd, name)(**config)
    sched.set_seed(seed)
    sched.set_timesteps(STEPS)
    unet = unet.to(dtype)
    image = randn_tensor((2, 3, 8, 8), generator=generator, dtype=torch.float32).to(dtype) * sched.init_noise_sigma
    for t in sched.timesteps:
        image = sched.step(unet(sched.scale_model_input(image, t), t).sample, t, image).prev_sample
    return (image / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("name, config", [("DDPMScheduler", {"clip_sample": False}),
                                          ("DDIMScheduler", {"clip_sample": False}),
                                          ("IADBScheduler", {"variant": "stochastic", "lam": 0.7}),
                                          ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
                                          ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                                           "solver_type": "heun", "solver_order": 1}),
                                          ("KDPM2AncestralDiscreteScheduler", {"prediction_type": "v_prediction",
                                                                               "use_karras_sigmas": True})])
@pytest.mark.filterwarnings("ignore:accelerate. DDPMPipeline's own loop does not scale:UserWarning")
def test_stochastic_level2_matches_level1_philox(name, config):
    # DDIM's eta is a DDIMPipeline argument (DDPMPipeline takes none); both run the same unconditional loop
    pipe = (DDIMPipeline if name == "DDIMScheduler" else DDPMPipeline)(unet=tiny_unet(),
                                                                       scheduler=getattr(dd, name)(**config))
    pipe.scheduler = getattr(dd, name)(**config)  # (DDIMPipeline converts a scheduler given at construction)
    pipe.set_progress_bar_config(disable=True)
    eta = {"eta": 0.8} if name == "DDIMScheduler" else {}
    fast = dd.accelerate(pipe)
    ours = fast(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=STEPS,
                output_type="pt", **eta).images
    again = fast(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=STEPS,
                 output_type="pt", **eta).images
    torch.testing.assert_close(again, ours, rtol=0, atol=0)
    # the seed accelerate keys Philox with: drawn from the generator right after the initial latents
    gen = torch.Generator().manual_seed(3)
    randn_tensor((2, 3, 8, 8), generator=gen)
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen))

    def level1(dtype):
        gen = torch.Generator().manual_seed(3)
        if name == "DDIMScheduler":  # the Level-1 DDIM step takes eta as an argument
            return _ddim_eta_loop(tiny_unet(), seed, gen, dtype, eta["eta"])
        return _level1_philox_loop(tiny_unet(), name, config, seed, gen, dtype)

    assert_matches_reference(ours, level1(torch.float64), level1(torch.float32), f"{name} level 2 vs level 1")


def _ddim_eta_loop(unet, seed, generator, dtype, eta):
    sched = dd.DDIMScheduler(clip_sample=False)
    sched.set_seed(seed)
    sched.set_timesteps(STEPS)
    unet = unet.to(dtype)
    image = randn_tensor((2, 3, 8, 8), generator=generator, dtype=torch.float32).to(dtype)
    for t in sched.timesteps:
        image = sched.step(unet(image, t).sample, t, image, eta=eta).prev_sample
    return (image / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("name, config", [("KDPM2DiscreteScheduler", {}),
                                          ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
                                          ("KDPM2AncestralDiscreteScheduler", {})])
@pytest.mark.filterwarnings("ignore:accelerate. DDPMPipeline's own loop does not scale:UserWarning")
def test_kdpm2_level2_feeds_the_unet_level1_timesteps(name, config):
    """Every UNet call of the fused loop gets the timestep diffusers' scheduler feeds at that call, midpoints
    included (KDPM2-ancestral's midpoint sigma is the next step's sigma, whose Karras timestep is rounded for the
    next step's call only), and a second call of the same accelerated pipeline gets them again."""
    unet = tiny_unet()
    seen = []
    forward = unet.forward

    def spy(sample, timestep, *args, **kwargs):
        seen.append(torch.as_tensor(timestep).reshape(-1)[0].float())
        return forward(sample, timestep, *args, **kwargs)

    unet.forward = spy
    theirs = getattr(diffusers, name)(**config)
    theirs.set_timesteps(STEPS)
    ours = getattr(dd, name).from_config(theirs.config)
    ours.set_timesteps(STEPS)
    fast = dd.accelerate(DDPMPipeline(unet=unet, scheduler=theirs))
    for _ in range(2):
        seen.clear()
        fast(batch_size=1, num_inference_steps=STEPS, output_type="pt", generator=torch.Generator().manual_seed(0))
        assert len(seen) == 2 * STEPS - 1
        # Level 1's timesteps exactly (as the UNet's float32 time embedding reads them); diffusers' up to its float32
        # log-sigma table (Level 1's own difference, ~1e-3 timesteps near t = 0)
        torch.testing.assert_close(torch.stack(seen), ours.timesteps.float(), rtol=0, atol=0)
        torch.testing.assert_close(torch.stack(seen), theirs.timesteps.float(), rtol=0, atol=2e-3)


def test_iadb_level1_and_level2():
    pipe = DDPMPipeline(unet=tiny_unet(), scheduler=dd.IADBScheduler())
    pipe.set_progress_bar_config(disable=True)

    def run(p, dtype=torch.float32):
        p.unet.to(dtype)
        with diffusers_float64(*pipeline_modules(p)) if dtype == torch.float64 else contextlib.nullcontext():
            return unconditional(p, torch.Generator().manual_seed(2))

    truth, eager = run(pipe, torch.float64), run(pipe)
    assert_matches_reference(run(dd.accelerate(pipe)), truth, eager, "IADB level 2")
