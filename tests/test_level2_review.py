"""Review of Level 2 (``diffkern.diffusers.accelerate``) on SDXL, SD3, LCM, UniPC and ``guidance_rescale``: the loop as
a captured graph (CPU stand-in of ``test_graphs.py``: whatever a replay bakes in is baked in, a host read fails the
capture), bfloat16 pipelines against the stock ones, lists of generators and user latents, and the schedules that
Level 1 UniPC accepts (zero terminal SNR, repeated timesteps, "trailing" spacing with N + 1 timesteps).

Oracles: the project rule (``diffkern.testing.assert_matches_reference``: the float64 pipeline is the truth, the
stock run in the same dtype the yardstick); graph replays bitwise against the eager fused loop.
"""
import copy
import importlib

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern import graphs  # noqa: E402
from diffkern.testing import assert_matches_reference  # noqa: E402
from test_diffusers_pipelines import pipeline_modules, tiny_sd, tiny_unet  # noqa: E402, F401
from test_diffusers_schedulers import diffusers_float64  # noqa: E402
from test_diffusers_sd3 import tiny_sd3_text  # noqa: E402, F401
from test_diffusers_sdxl import SDXL_SCHEDULER, tiny_sdxl  # noqa: E402, F401
from test_graphs import fake, fresh_cache  # noqa: E402, F401  (fresh_cache: autouse)
from test_lcm_pipeline import lcm_call, tiny_lcm  # noqa: E402, F401
from test_unipc import UniPCPipeline  # noqa: E402

PROMPTS = ["a cat", "a dog"]


def graphed(pipe, **kw):
    """``accelerate(pipe)`` whose loop is captured (graph=True) on CPU tensors: with the ``fake`` fixture the capture
    is a RecordedGraph (``accelerate`` itself refuses graph=True without CUDA, so the mode is set afterwards)."""
    acc = dd.accelerate(pipe, graph=False, **kw)
    acc.__dict__["graph"] = True
    return acc


def images(out):
    out = out.images
    return out if isinstance(out, torch.Tensor) else torch.as_tensor(out)


def sdxl_call(pipe, seed=0, **kw):
    kw = {"guidance_scale": 4.0, "negative_prompt": ["blurry", ""], "num_inference_steps": 3, "output_type": "pt",
          **kw}
    return images(pipe(PROMPTS, generator=torch.Generator().manual_seed(seed), **kw))


def sd3_call(pipe, seed=0, **kw):
    kw = {"guidance_scale": 4.0, "negative_prompt": ["blurry", ""], "num_inference_steps": 3, "output_type": "pt",
          "height": 16, "width": 16, **kw}
    return images(pipe(PROMPTS, generator=torch.Generator().manual_seed(seed), **kw))

#----------------------------------------------------------------------------
# 1. The loop as a captured graph: what a later call changes is data, or a new key.


def test_graph_sdxl_rescale_guidance_and_time_ids_replay(tiny_sdxl, fake):
    """guidance_scale, guidance_rescale (a device buffer), add_time_ids and prompts change between replays of one
    capture (two: plain CFG and rescaled CFG); each replay equals the eager fused loop bitwise."""
    pipe = tiny_sdxl(diffusers.DPMSolverMultistepScheduler.from_config(SDXL_SCHEDULER))
    fast, eager = graphed(pipe), dd.accelerate(pipe, graph=False)
    for kw in ({}, {"guidance_scale": 6.0, "original_size": (8, 8)}, {"guidance_rescale": 0.5},
               {"guidance_rescale": 0.8, "guidance_scale": 2.5, "negative_prompt": ["dog", "cat"]},
               {"guidance_rescale": 0.5}):
        torch.testing.assert_close(sdxl_call(fast, **kw), sdxl_call(eager, **kw), rtol=0, atol=0, msg=str(kw))
    assert graphs.info()["captures"] == 2 and graphs.info()["replays"] == 5


@pytest.mark.parametrize("name", ["KDPM2AncestralDiscreteScheduler", "UniPCMultistepScheduler"])
def test_graph_sdxl_call_counter_and_history_replay(tiny_sdxl, fake, name):
    """KDPM2's per-call timesteps come from a device counter that the warm-up advances (it must wrap to 0 before the
    first replay); UniPC keeps two history buffers: replays equal the eager loop, call after call."""
    pipe = tiny_sdxl(getattr(diffusers, name).from_config(SDXL_SCHEDULER))
    fast, eager = graphed(pipe), dd.accelerate(pipe, graph=False)
    for seed in (0, 1, 0):
        torch.testing.assert_close(sdxl_call(fast, seed), sdxl_call(eager, seed), rtol=0, atol=0, msg=str(seed))
    assert graphs.info()["captures"] == 1


def test_graph_lcm_guidance_embedding_and_boundary_replay(tiny_lcm, fake):
    """LCM: a new guidance scale (timestep_cond) and a new seed replay one capture; a new step count is a new
    schedule (a new wrapper, a new capture)."""
    pipe = tiny_lcm(diffusers.LCMScheduler(timestep_scaling=0.002))
    fast, eager = graphed(pipe), dd.accelerate(pipe, graph=False)
    for w, seed, steps in ((3.0, 0, 3), (7.0, 1, 3), (1.5, 2, 3), (3.0, 0, 2)):
        want = lcm_call(eager, torch.Generator().manual_seed(seed), steps, guidance_scale=w)
        got = lcm_call(fast, torch.Generator().manual_seed(seed), steps, guidance_scale=w)
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"w={w} seed={seed} steps={steps}")
    assert graphs.info()["captures"] == 2


def test_graph_sd3_guidance_and_shift_replay(tiny_sd3_text, fake):
    """SD3: a new guidance scale and prompt replay; a new mu (dynamic shift) is a new schedule and capture."""
    pipe = tiny_sd3_text(diffusers.FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256))
    fast, eager = graphed(pipe), dd.accelerate(pipe, graph=False)
    for kw in ({}, {"guidance_scale": 7.0, "negative_prompt": ["x", "y"]}, {"mu": 0.3}, {}):
        torch.testing.assert_close(sd3_call(fast, **kw), sd3_call(eager, **kw), rtol=0, atol=0, msg=str(kw))
    assert graphs.info()["captures"] == 2

#----------------------------------------------------------------------------
# 2. bfloat16 pipelines (CPU runs bfloat16) against the stock pipeline in bfloat16, the truth in float64.


def _bf16_runs(pipe, call, truth_context, **kw):
    """(Level 2, float64 truth, stock bfloat16) of ``call`` on ``pipe`` (float32 modules on entry); the truth runs
    inside ``truth_context``."""
    scheduler = copy.deepcopy(pipe.scheduler)
    twin = copy.deepcopy(pipe)
    for module in twin.components.values():
        if isinstance(module, torch.nn.Module):
            module.double()
    with truth_context, diffusers_float64(*pipeline_modules(pipe)):
        twin.scheduler = type(scheduler).from_config(scheduler.config)
        truth = call(twin, **kw)
    pipe.to(torch.bfloat16)
    eager = call(pipe, **kw)
    ours = call(dd.accelerate(pipe), **kw)
    return ours, truth.to(torch.float64), eager


def _float64_scheduler(scheduler):
    return diffusers_float64(importlib.import_module(type(scheduler).__module__))


@pytest.mark.parametrize("kw", [{}, {"guidance_rescale": 0.6, "num_images_per_prompt": 2}])
def test_bfloat16_sdxl_matches_the_stock_pipeline(tiny_sdxl, kw):
    pipe = tiny_sdxl(diffusers.EulerDiscreteScheduler.from_config(SDXL_SCHEDULER))
    ours, truth, eager = _bf16_runs(pipe, sdxl_call, _float64_scheduler(pipe.scheduler), **kw)
    assert ours.dtype == eager.dtype == torch.bfloat16
    assert_matches_reference(ours, truth, eager, f"SDXL bfloat16 {kw}")


def test_bfloat16_sd3_matches_the_stock_pipeline(tiny_sd3_text):
    pipe = tiny_sd3_text(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    ours, truth, eager = _bf16_runs(pipe, sd3_call, _float64_scheduler(pipe.scheduler))
    assert ours.dtype == eager.dtype == torch.bfloat16
    assert_matches_reference(ours, truth, eager, "SD3 bfloat16")


def test_bfloat16_lcm_one_step_matches_the_stock_pipeline(tiny_lcm):
    """One LCM step draws no step noise: the stock pipeline is the reference."""
    from test_lcm import float64_lcm

    pipe = tiny_lcm(diffusers.LCMScheduler(timestep_scaling=0.002))

    def call(p):
        return lcm_call(p, torch.Generator().manual_seed(5), 1)
    ours, truth, eager = _bf16_runs(pipe, call, float64_lcm(True))
    assert ours.dtype == eager.dtype == torch.bfloat16
    assert_matches_reference(ours, truth, eager, "LCM bfloat16")

#----------------------------------------------------------------------------
# 3. UniPC (and the other VP schedulers) on the schedules Level 1 accepts: parity with diffusers or a clear refusal.

ZERO_SNR = {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}


def _unconditional(pipe, generator, steps):
    return pipe(batch_size=2, generator=generator, num_inference_steps=steps, output_type="pt").images


@pytest.mark.parametrize("name, config, steps", [
    # zero terminal SNR floors alpha-bar(999) at 2^-24, above alpha-bar(998): the wrapper refused the table
    ("UniPCMultistepScheduler", ZERO_SNR, 6), ("DPMSolverMultistepScheduler", ZERO_SNR, 6),
    # diffusers' float "trailing" arange makes N + 1 timesteps, the last t = -1
    ("UniPCMultistepScheduler", {"timestep_spacing": "trailing"}, 13),
    ("UniPCMultistepScheduler", {"timestep_spacing": "trailing", "num_train_timesteps": 999}, 13)])
def test_unipc_level2_matches_diffusers_on_new_schedules(name, config, steps):
    from test_diffusers_pipelines import three_runs

    ours, truth, eager = three_runs(lambda s: UniPCPipeline(unet=tiny_unet(), scheduler=s), name, config,
                                    lambda p, g: _unconditional(p, g, steps), 2)
    assert_matches_reference(ours, truth, eager, f"{name} {config} {steps} steps, level 2")


@pytest.mark.parametrize("config, steps, key", [
    ({"solver_order": 1, "num_train_timesteps": 100}, 113, "timestep_spacing='linspace'"),
    ({"solver_order": 1, "num_train_timesteps": 100, "timestep_spacing": "trailing"}, 113,
     "timestep_spacing='trailing'"),
    ({"solver_order": 1, "num_train_timesteps": 37, "timestep_spacing": "leading", "steps_offset": 2}, 36,
     "steps_offset=2"),
    ({"num_train_timesteps": 37, "trained_betas": [0.5] * 37, "rescale_betas_zero_snr": True,
      "timestep_spacing": "trailing"}, 10, "rescale_betas_zero_snr=True")])
def test_unipc_level2_refuses_sigmas_that_do_not_decrease(config, steps, key):
    """Level 1 runs these (a repeated sigma, or one that rises over the first step); Level 2 names the option."""
    theirs = diffusers.UniPCMultistepScheduler(**config)
    pipe = UniPCPipeline(unet=tiny_unet(), scheduler=theirs)
    pipe.scheduler = theirs
    with pytest.raises(ValueError, match=f"UniPCMultistepScheduler with {key.replace('[', '.')}.*strictly decreasing"):
        _unconditional(dd.accelerate(pipe), torch.Generator().manual_seed(0), steps)


#----------------------------------------------------------------------------
# 4. A list of generators (one per image) and user latents.


def _gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_generator_lists_and_latents_sdxl_sd3(tiny_sdxl, tiny_sd3_text):
    """Deterministic schedulers: the stock pipeline's images for a list of generators (its initial latents) and for
    given latents."""
    cases = [(tiny_sdxl(diffusers.EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)), sdxl_call),
             (tiny_sd3_text(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)), sd3_call)]
    for pipe, call in cases:
        fast = dd.accelerate(pipe)
        latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))
        for kw in ({"num_images_per_prompt": 2}, {"latents": latents}):
            def run(p):
                gens = _gens(3, 4, 5, 6)[:2 * kw.get("num_images_per_prompt", 1)]  # fresh ones for each run
                return images(p(PROMPTS, generator=gens, guidance_scale=3.0, num_inference_steps=3, output_type="pt",
                                height=16, width=16, **kw))
            torch.testing.assert_close(run(fast), run(pipe), rtol=1e-4, atol=1e-4, msg=f"{type(pipe).__name__}")
        with pytest.raises(ValueError, match="generator"):
            fast(PROMPTS, generator=_gens(1), num_inference_steps=2, height=16, width=16)


def test_lcm_generator_list_gives_per_image_noise(tiny_lcm):
    """LCM re-noises every step from Philox streams keyed per image by the list's generators: an image depends on its
    own generator only (the stock pipeline draws per image too), and a list of the wrong length raises."""
    fast = dd.accelerate(tiny_lcm(diffusers.LCMScheduler(timestep_scaling=0.002)))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    a = lcm_call(fast, _gens(1, 2), 3, latents=latents)
    b = lcm_call(fast, _gens(1, 3), 3, latents=latents)
    torch.testing.assert_close(b[0], a[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(b[1], a[1], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(lcm_call(fast, _gens(1, 2), 3, latents=latents), a, rtol=0, atol=0)
    with pytest.raises(ValueError, match="generator: a list of 3 generators"):
        lcm_call(fast, _gens(1, 2, 3), 3)
