"""diffkern.diffusers.FlowMatchEulerDiscreteScheduler against diffusers' own, step by step and in a pipeline.

Oracle and tolerance: those of test_diffusers_schedulers.py. The truth is diffusers' scheduler run in float64
(``diffusers_float64``: its torch.float32 is float64, its noise the same float32 draws upcast); at every step the
three schedulers get the truth's state, and ``assert_matches_reference`` requires ours to be at most twice as far from
the truth as diffusers' float32 (or bfloat16) run, plus the dtype's floor. In float64 ours must equal the truth to the
float64 floor, except where diffusers' own code rounds the schedule to float32 (custom sigmas/timesteps go through
numpy float32), which these float64 checks skip.

Configs are drawn (seeded) over every key of diffusers' class; a config diffusers refuses, or for which it produces
non-finite sigmas, must raise a ValueError in ours.
"""
import importlib
import math
import random

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.testing import FLOORS, assert_matches_reference, make_tensor  # noqa: E402
from test_diffusers_schedulers import diffusers_float64  # noqa: E402

MODULE = importlib.import_module("diffusers.schedulers.scheduling_flow_match_euler_discrete")
THEIRS = diffusers.FlowMatchEulerDiscreteScheduler
OURS = dd.FlowMatchEulerDiscreteScheduler
SHAPE = (2, 3, 4, 5)
CONVERSIONS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")

#----------------------------------------------------------------------------
# The config space.


def draw_case(rng: random.Random):
    """(config, set_timesteps kwargs, begin index): every key of diffusers' class, values within their domains."""
    T = rng.choice([1000, 1000, 999, 37])
    conversion = rng.choice([None, None, None, *CONVERSIONS])
    two = rng.random() < 0.1  # two conversions at once: diffusers refuses
    dynamic = rng.random() < 0.4
    kind = rng.choice(["exponential", "linear"])
    config = {"num_train_timesteps": T, "shift": rng.choice([1.0, 3.0, round(rng.uniform(0.3, 6.0), 3)]),
              "use_dynamic_shifting": dynamic, "base_shift": round(rng.uniform(0.3, 0.8), 3),
              "max_shift": round(rng.uniform(0.9, 3.0), 3), "base_image_seq_len": rng.choice([256, 64]),
              "max_image_seq_len": rng.choice([4096, 1024]), "invert_sigmas": rng.random() < 0.2,
              "shift_terminal": rng.choice([None, None, 0.0, round(rng.uniform(0.02, 0.5), 3)]),
              "time_shift_type": kind, "stochastic_sampling": rng.random() < 0.3,
              **{name: name == conversion or (two and name == "use_beta_sigmas") for name in CONVERSIONS}}
    n = rng.choice([1, 2, 3, 7, 13])
    how = rng.choice(["n", "n", "sigmas", "timesteps", "both"])
    kw = {"num_inference_steps": n} if how == "n" or rng.random() < 0.4 else {}
    if how in ("sigmas", "both"):
        sig = sorted((rng.uniform(0.02, 1.0) for _ in range(n)), reverse=True)
        kw["sigmas"] = sig[:-1] + [0.0] if n > 1 and rng.random() < 0.35 else sig  # (log-spacing refuses 0)
    if how in ("timesteps", "both"):
        kw["timesteps"] = sorted((round(rng.uniform(1.0, T), 3) for _ in range(n)), reverse=True)
    if dynamic or rng.random() < 0.2:  # (ignored without dynamic shifting, as diffusers)
        kw["mu"] = round(rng.uniform(-0.5, 2.0) if kind == "exponential" else rng.uniform(0.2, 3.0), 3)
    return config, kw, rng.choice([0, 0, rng.randrange(n)])


def _refused(config, kw) -> bool:
    """diffusers refuses the case, or its schedule is not finite (a division by 0 it does not check)."""
    try:
        sched = THEIRS(**config)
        sched.set_timesteps(**kw)
    except Exception:
        return True
    return not bool(torch.isfinite(sched.sigmas).all())


def _stretch_limit(config, kw) -> bool:
    """True if ours maps a schedule of sigma 1 only (one step from the top) to shift_terminal, where diffusers'
    stretch divides 0 by 0 (NaN; it gives shift_terminal when its float32 sigma is a hair below 1)."""
    if not config.get("shift_terminal"):
        return False
    try:
        ours = _set(OURS(**config), kw)
    except ValueError:
        return False
    st = config["shift_terminal"]
    want = [1 - st, 1.0] if config.get("invert_sigmas") else [st, 0.0]
    torch.testing.assert_close(ours.sigmas, torch.tensor(want), rtol=FLOORS[torch.float32], atol=0)
    return True


def _set(sched, kw, device="cpu"):
    sched.set_timesteps(device=device, **kw)
    return sched

#----------------------------------------------------------------------------
# Step-by-step parity.


def run_case(config, kw, begin=0, dtype=torch.float32, model_dtype=None, backend=None, device="cpu"):
    """Truth (diffusers float64), diffusers in ``dtype`` (model output in ``model_dtype``, default ``dtype``) and
    ours on the truth's states, every step from ``begin``; plus ours in float64 where the truth is exact."""
    model_dtype = model_dtype or dtype
    if _refused(config, kw):
        if _stretch_limit(config, kw):
            return
        with pytest.raises(ValueError):
            _set(OURS(**config), kw)
        return
    with diffusers_float64(MODULE):
        truth = _set(THEIRS(**config), kw, device)
    eager = _set(THEIRS(**config), kw, device)
    ours = OURS.from_config(eager.config)
    ours.backend = backend
    _set(ours, kw, device)
    exact64 = "sigmas" not in kw and "timesteps" not in kw
    ours64 = _set(OURS.from_config(eager.config), kw, device) if exact64 else None
    what = f"{config} {kw} begin={begin} [{backend}]"
    assert ours.timesteps.dtype == eager.timesteps.dtype == torch.float32
    assert ours.sigmas.dtype == torch.float32 and ours.sigmas.shape == eager.sigmas.shape
    assert_matches_reference(ours.timesteps.cpu(), truth.timesteps.cpu(), eager.timesteps.cpu(), what + " timesteps")
    assert_matches_reference(ours.sigmas.cpu(), truth.sigmas.cpu(), eager.sigmas.cpu(), what + " sigmas")
    scheds = (truth, eager, ours) + ((ours64,) if exact64 else ())
    for sched in scheds:
        sched.set_begin_index(begin)
    gens = [torch.Generator().manual_seed(7) for _ in scheds]
    x = make_tensor(SHAPE, torch.float64, seed=11, device=device)
    for k in range(begin, len(eager.timesteps)):
        m = make_tensor(SHAPE, torch.float64, seed=100 + k, device=device)
        with diffusers_float64(MODULE):
            ref = truth.step(m, truth.timesteps[k], x, generator=gens[0]).prev_sample
        xs, ms = x.to(dtype), m.to(model_dtype)
        out = eager.step(ms, eager.timesteps[k], xs, generator=gens[1]).prev_sample
        got = ours.step(ms, ours.timesteps[k], xs, generator=gens[2]).prev_sample
        assert_matches_reference(got, ref, out, f"{what} step {k} prev_sample")
        if exact64:
            got64 = ours64.step(m, ours64.timesteps[k], x, generator=gens[3]).prev_sample
            assert_matches_reference(got64, ref, ref, f"{what} step {k} float64 prev_sample")
        x = ref
    assert ours.step_index == len(ours.timesteps)


CASES = [
    ({}, {"num_inference_steps": 7}, 0),
    ({"shift": 3.0}, {"num_inference_steps": 28}, 0),  # SD3
    ({"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}, {"num_inference_steps": 5, "mu": 1.1}, 0),
    ({"use_dynamic_shifting": True, "time_shift_type": "linear", "shift_terminal": 0.1},
     {"num_inference_steps": 6, "mu": 2.05}, 2),  # LTX
    ({"invert_sigmas": True, "shift": 2.0}, {"num_inference_steps": 4}, 0),  # Mochi
    ({"use_karras_sigmas": True, "shift": 3.0}, {"num_inference_steps": 6}, 1),
    ({"use_exponential_sigmas": True}, {"num_inference_steps": 6}, 0),
    ({"use_beta_sigmas": True, "shift": 3.0}, {"num_inference_steps": 6}, 0),
    ({"stochastic_sampling": True, "shift": 3.0}, {"num_inference_steps": 6}, 0),
    ({"shift": 3.0}, {"num_inference_steps": 1}, 0),
    ({"shift": 3.0}, {"sigmas": [1.0, 0.7, 0.4, 0.1]}, 0),
    ({}, {"timesteps": [1000.0, 750.5, 400.0, 20.0]}, 1),
    ({"use_dynamic_shifting": True}, {"sigmas": [1.0, 0.5, 0.25], "timesteps": [900.0, 500.0, 200.0], "mu": 0.7}, 0),
    # refused by diffusers (raises, or non-finite sigmas): ours raises a ValueError
    ({"use_karras_sigmas": True, "use_exponential_sigmas": True}, {"num_inference_steps": 3}, 0),
    ({"use_dynamic_shifting": True}, {"num_inference_steps": 3}, 0),
    ({"use_exponential_sigmas": True}, {"sigmas": [1.0, 0.5, 0.0]}, 0),
    ({"shift_terminal": 0.2}, {"sigmas": [0.5, 1.0]}, 0),
]


@pytest.mark.parametrize("config, kw, begin", CASES, ids=[str(i) for i in range(len(CASES))])
def test_matches_diffusers(config, kw, begin):
    run_case(config, kw, begin)


@pytest.mark.parametrize("draw", range(60))
def test_fuzz_float32(draw):
    run_case(*draw_case(random.Random(1000 + draw)))


@pytest.mark.parametrize("dtype, model_dtype", [(torch.bfloat16, None), (torch.float16, None),
                                                (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("draw", range(8))
def test_fuzz_sixteen_bit(draw, dtype, model_dtype):
    """16-bit states and mixed dtypes: output in the model output's dtype, computed in float32 as diffusers does."""
    run_case(*draw_case(random.Random(2000 + draw)), dtype=dtype, model_dtype=model_dtype)


def test_every_backend(cpu_backend):
    for config, kw, begin in (CASES[2], CASES[8], CASES[11]):
        run_case(config, kw, begin, backend=cpu_backend)

#----------------------------------------------------------------------------
# Noise without a generator.


def _philox_loop(backend, seed, dtype=torch.float32, steps=4):
    sched = OURS(stochastic_sampling=True, shift=3.0)
    sched.backend = backend
    sched.set_seed(seed)
    sched.set_timesteps(steps)
    x = make_tensor(SHAPE, dtype, seed=1)
    for k, t in enumerate(sched.timesteps):
        x = sched.step(make_tensor(SHAPE, dtype, seed=20 + k), t, x).prev_sample
    return x


def test_philox_noise_is_seeded_and_backend_independent(cpu_backend):
    a = _philox_loop(cpu_backend, 5)
    torch.testing.assert_close(_philox_loop(cpu_backend, 5), a, rtol=0, atol=0)
    assert not torch.equal(_philox_loop(cpu_backend, 6), a)
    assert_matches_reference(a, _philox_loop("reference", 5, torch.float64), _philox_loop("reference", 5),
                             f"{cpu_backend} vs the reference backend")
    torch.manual_seed(0)
    b = _philox_loop(cpu_backend, None)
    torch.manual_seed(0)
    torch.testing.assert_close(_philox_loop(cpu_backend, None), b, rtol=0, atol=0)


def test_philox_noise_is_standard_normal():
    sched = OURS(stochastic_sampling=True)
    sched.set_seed(3)
    sched.set_timesteps(3)
    x, m = make_tensor((64, 256), torch.float64, seed=1), make_tensor((64, 256), torch.float64, seed=2)
    sigma, nxt = sched.sigmas_host[0], sched.sigmas_host[1]
    prev = sched.step(m, sched.timesteps[0], x).prev_sample
    xi = (prev - (1 - nxt) * (x - sigma * m)) / nxt
    n = xi.numel()
    assert abs(float(xi.mean())) < 5 / math.sqrt(n) and abs(float(xi.var()) - 1) < 5 * math.sqrt(2 / n)

#----------------------------------------------------------------------------
# API contract.


def test_outputs_and_dtypes():
    sched = OURS(shift=3.0)
    sched.set_timesteps(3)
    x = make_tensor(SHAPE, seed=1)
    res = sched.step(x, sched.timesteps[0], x)
    assert type(res).__name__ == "FlowMatchEulerDiscreteSchedulerOutput" and res.prev_sample.dtype == torch.float32
    out = sched.step(x.bfloat16(), sched.timesteps[1], x, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1 and out[0].dtype == torch.bfloat16
    assert sched.step(x.double(), sched.timesteps[2], x.half()).prev_sample.dtype == torch.float64
    assert OURS.order == 1 and OURS._compatibles == [] == THEIRS._compatibles
    assert len(sched) == 1000 and sched.shift == 3.0
    sched.set_shift(5.0)
    theirs = THEIRS(shift=3.0)
    theirs.set_shift(5.0)
    sched.set_timesteps(4)
    theirs.set_timesteps(4)
    assert sched.shift == theirs.shift == 5.0
    torch.testing.assert_close(sched.sigmas, theirs.sigmas, rtol=FLOORS[torch.float32], atol=0)
    assert math.isclose(sched.sigma_min, theirs.sigma_min, rel_tol=1e-6) and sched.sigma_max == theirs.sigma_max


@pytest.mark.parametrize("call, match", [
    (lambda s, x, t: s.step(x, t, x, per_token_timesteps=torch.ones(2, 20)), "per_token_timesteps"),
    (lambda s, x, t: s.step(x, t, x, s_churn=0.5), "s_churn=0.5"),
    (lambda s, x, t: s.step(x, t, x, s_noise=1.1), "s_noise=1.1"),
    (lambda s, x, t: s.step(x, 1000, x), "timestep: .*integer"),
    (lambda s, x, t: s.step(x, torch.tensor(1000), x), "timestep: .*integer"),
    (lambda s, x, t: s.step(x, t * 0.5, x), "timestep: expected 1000"),
    (lambda s, x, t: s.scale_noise(x, t), "noise: required"),
])
def test_refused_arguments_name_themselves(call, match):
    sched = OURS()
    sched.set_timesteps(3)
    with pytest.raises(ValueError, match=match):
        call(sched, make_tensor(SHAPE, seed=1), sched.timesteps[0])


@pytest.mark.parametrize("config, kw, match", [
    ({"use_karras_sigmas": True, "use_beta_sigmas": True}, None, "only one of"),
    ({"time_shift_type": "cubic"}, None, "time_shift_type"),
    ({"shift": 0.0}, None, "shift"),
    ({"num_train_timesteps": 0}, None, "num_train_timesteps"),
    ({"use_dynamic_shifting": True}, {"num_inference_steps": 4}, "mu: required"),
    ({}, {}, "num_inference_steps: required"),
    ({}, {"num_inference_steps": 3, "sigmas": [1.0, 0.5]}, "sigmas must have num_inference_steps=3"),
    ({}, {"sigmas": [1.0, 0.5], "timesteps": [1000.0]}, "same length"),
    ({"shift_terminal": 0.2}, {"sigmas": [0.5, 1.0]}, "shift_terminal=0.2"),
    ({"use_exponential_sigmas": True}, {"sigmas": [1.0, 0.5, 0.0]}, "use_exponential_sigmas=True"),
])
def test_refused_configs_name_the_option(config, kw, match):
    with pytest.raises(ValueError, match=match):
        _set(OURS(**config), kw) if kw is not None else OURS(**config)


def test_scale_noise_matches_diffusers():
    x, noise = make_tensor(SHAPE, seed=1), make_tensor(SHAPE, seed=2)
    ours, theirs = OURS(shift=3.0), THEIRS(shift=3.0)
    t = torch.tensor([1000.0, 500.0])  # before set_timesteps: the training schedule
    torch.testing.assert_close(ours.scale_noise(x, ours.timesteps[[0, 500]], noise),
                               theirs.scale_noise(x, theirs.timesteps[[0, 500]], noise))
    for sched in (ours, theirs):
        sched.set_timesteps(8)
    for idx in ([0, 3], [7, 7]):
        torch.testing.assert_close(ours.scale_noise(x, ours.timesteps[idx], noise),
                                   theirs.scale_noise(x, theirs.timesteps[idx], noise))
    for sched in (ours, theirs):  # img2img: set_begin_index, then the noise of that step for every sample
        sched.set_begin_index(3)
    torch.testing.assert_close(ours.scale_noise(x, t, noise), theirs.scale_noise(x, t, noise))
    torch.testing.assert_close(ours.add_noise(x, noise, t), ours.scale_noise(x, t, noise))


def _public(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}


@pytest.mark.parametrize("draw", range(4))
def test_save_and_load(tmp_path, draw):
    config = draw_case(random.Random(3000 + draw))[0]
    ours = OURS(**config)
    ours.save_pretrained(tmp_path / "ours")
    loaded = OURS.from_pretrained(tmp_path / "ours")
    assert type(loaded) is OURS and _public(loaded.config) == _public(ours.config) == config
    theirs = THEIRS.from_pretrained(tmp_path / "ours")  # diffusers loads ours, and we load theirs
    assert _public(theirs.config) == config and _public(OURS.from_config(theirs.config).config) == config
    assert dd.SCHEDULERS["FlowMatchEulerDiscreteScheduler"] is OURS and OURS.__module__ == "diffkern.diffusers"

#----------------------------------------------------------------------------
# A full pipeline: StableDiffusion3Pipeline with tiny random components (no downloads).


def tiny_sd3(scheduler):
    """SD3 with a 1-layer SD3Transformer2DModel and a tiny AutoencoderKL (16x16 images, 8x8 latents). The text
    encoders are left out (None): the prompts come in as random embeddings, which the pipeline takes as it is."""
    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4).eval()
    vae = diffusers.AutoencoderKL(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(4, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
        norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
        scaling_factor=1.5035).eval()
    pipe = diffusers.StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                              text_encoder=None, tokenizer=None, text_encoder_2=None,
                                              tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sd3_call(pipe, dtype):
    g = torch.Generator().manual_seed(0)
    embeds = [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for shape in ((2, 7, 32), (2, 64)) * 2]
    pipe.transformer.to(dtype)
    pipe.vae.to(dtype)
    return pipe(prompt_embeds=embeds[0], pooled_prompt_embeds=embeds[1], negative_prompt_embeds=embeds[2],
                negative_pooled_prompt_embeds=embeds[3], guidance_scale=3.0, num_inference_steps=5, height=16,
                width=16, generator=torch.Generator().manual_seed(1), output_type="pt").images


@pytest.mark.parametrize("config", [{"shift": 3.0}, {"use_dynamic_shifting": True, "base_image_seq_len": 16,
                                                      "max_image_seq_len": 256},
                                    {"shift": 3.0, "use_karras_sigmas": True, "shift_terminal": 0.05}])
def test_sd3_pipeline_matches_diffusers(config):
    pipeline_module = importlib.import_module(diffusers.StableDiffusion3Pipeline.__module__)
    with diffusers_float64(MODULE, pipeline_module):
        truth = _sd3_call(tiny_sd3(THEIRS(**config)), torch.float64)
    eager = _sd3_call(tiny_sd3(THEIRS(**config)), torch.float32)
    ours = _sd3_call(tiny_sd3(OURS(**config)), torch.float32)
    assert ours.shape == (2, 3, 16, 16) and float(ours.std()) > 0.01
    assert_matches_reference(ours, truth, eager, f"SD3 pipeline {config}")


def test_sd3_pipeline_stochastic_is_seeded():
    """SD3 calls step() without its generator: diffusers then draws from torch's global generator, we from the
    Philox stream keyed by set_seed (or a seed drawn from torch's global generator): a seed fixes the images."""
    sched = OURS(shift=3.0, stochastic_sampling=True)
    pipe = tiny_sd3(sched)
    sched.set_seed(4)
    a = _sd3_call(pipe, torch.float32)
    torch.testing.assert_close(_sd3_call(pipe, torch.float32), a, rtol=0, atol=0)
    sched.set_seed(5)
    assert not torch.equal(_sd3_call(pipe, torch.float32), a)


@pytest.mark.parametrize("conversion", CONVERSIONS)
def test_conversion_bounds_of_a_foreign_config_are_read(conversion):
    """A config loaded from Euler's keeps its sigma_min/sigma_max, which diffusers' conversions then use."""
    config = dict(_public(diffusers.EulerDiscreteScheduler(sigma_min=0.05, sigma_max=0.9).config), shift=2.0,
                  **{conversion: True})
    theirs, ours = THEIRS.from_config(config), OURS.from_config(config)
    theirs.set_timesteps(6)
    ours.set_timesteps(6)
    assert math.isclose(float(ours.sigmas[0]), 0.9, rel_tol=1e-7)
    torch.testing.assert_close(ours.sigmas, theirs.sigmas, rtol=FLOORS[torch.float32], atol=0)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps, rtol=FLOORS[torch.float32], atol=0)


def test_stretch_of_a_lone_top_sigma_is_its_limit():
    """One step from sigma 1 with shift_terminal: 1 in float64, where diffusers' float64 stretch is 0/0, but a hair
    below 1 in its float32 run, which gives the stretch's limit, shift_terminal; ours gives that limit."""
    config = {"shift": 4.996, "invert_sigmas": True, "shift_terminal": 0.232}
    theirs, ours = _set(THEIRS(**config), {"num_inference_steps": 1}), _set(OURS(**config), {"num_inference_steps": 1})
    torch.testing.assert_close(ours.sigmas, theirs.sigmas, rtol=FLOORS[torch.float32], atol=0)
    torch.testing.assert_close(ours.sigmas, torch.tensor([1 - 0.232, 1.0]), rtol=FLOORS[torch.float32], atol=0)
