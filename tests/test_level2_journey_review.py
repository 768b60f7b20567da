"""User-journey review of Level 2 (``diffkern.diffusers.accelerate``): what a diffusers user does with the returned
pipeline beyond one plain call.

Regressions:
- a bfloat16 unconditional pipeline with ``output_type`` "np"/"pil" (numpy has no bfloat16; the other handlers'
  outputs go through diffusers' ``VaeImageProcessor``, which casts, and are checked in bfloat16 elsewhere);
- ``fast.scheduler = ...`` was kept on the wrapper while the loop read the pipeline's scheduler (silently the old
  schedule): attributes set on the wrapper now go to the pipeline, as reads do;
- ``copy.copy``/``copy.deepcopy`` of an accelerated pipeline raised KeyError;
- positional arguments bind as the pipeline binds them (``DDPMPipeline``'s first is ``batch_size``, which was
  refused as a prompt);
- a ``torch.compile``d UNet or transformer (``pipe.unet = torch.compile(pipe.unet)``) was refused as "unsupported
  pipeline ... with a OptimizedModule";
- ``accelerate`` of an accelerated pipeline is refused by name (it half-passed the checks through forwarding);
- the unconditional handler frees the model hooks after its call, as the pipeline does.
Journeys no other test covers: a guidance scale below 1 (no CFG batch), repeated and interleaved calls leaving the
pipeline's scheduler untouched, ``pipe.to(torch.float64)`` after ``accelerate``.

Oracles: the stock pipeline (the project rule, ``diffkern.testing.assert_matches_reference``: the float64 pipeline
is the truth, the stock run in the same dtype the yardstick); a fresh ``accelerate`` of the same pipeline, bitwise.
Tiny random models only (the fixtures of test_diffusers_pipelines, _sd3, _flux, _pixart).
"""
import copy

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.testing import assert_matches_reference  # noqa: E402
from test_diffusers_pipelines import three_runs, tiny_sd, tiny_unet  # noqa: E402, F401  (tiny_sd: a fixture)
from test_level2_review import _bf16_runs, _float64_scheduler  # noqa: E402

PROMPTS = ["a cat", "a dog"]
EULER = ("EulerDiscreteScheduler", {"beta_start": 0.0002, "beta_end": 0.015})


def _ddim_pipe():
    pipe = diffusers.DDIMPipeline(unet=tiny_unet(), scheduler=diffusers.DDIMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _uncond(pipe, seed=5, **kw):
    kw = {"batch_size": 2, "num_inference_steps": 3, "output_type": "pt", **kw}
    return pipe(generator=torch.Generator().manual_seed(seed), **kw).images


def _sd(pipe, generator=None, **kw):
    kw = {"num_inference_steps": 3, "guidance_scale": 4.0, "negative_prompt": ["blurry", ""], "output_type": "pt",
          **kw}
    generator = torch.Generator().manual_seed(5) if generator is None else generator
    return pipe(PROMPTS, generator=generator, **kw).images

#----------------------------------------------------------------------------
# 1. 16-bit unconditional pipelines: numpy and PIL outputs.


def test_bfloat16_unconditional_outputs():
    """"pt" matches the stock bfloat16 pipeline by the rule; "np" is those images as float32 NHWC arrays (exact:
    float32 holds every bfloat16) and "pil" those arrays as PIL images, where the stock pipeline raises."""
    pipe = _ddim_pipe()
    ours, truth, eager = _bf16_runs(pipe, _uncond, _float64_scheduler(pipe.scheduler))
    assert ours.dtype == eager.dtype == torch.bfloat16
    assert_matches_reference(ours, truth, eager, "DDIMPipeline bfloat16")
    with pytest.raises(TypeError, match="BFloat16"):  # the stock pipeline's own failure, which the fix avoids
        _uncond(pipe, output_type="np")
    fast = dd.accelerate(pipe)
    arrays = _uncond(fast, output_type="np")
    assert arrays.dtype == np.float32
    assert np.array_equal(arrays, ours.float().permute(0, 2, 3, 1).numpy())
    images = fast(batch_size=2, generator=torch.Generator().manual_seed(5), num_inference_steps=3,
                  output_type="pil", return_dict=False)[0]
    assert [np.asarray(im).tolist() for im in images] == [np.asarray(im).tolist() for im in pipe.numpy_to_pil(arrays)]


def test_float16_unconditional_numpy_keeps_the_stock_dtype():
    """numpy has float16: the arrays keep the stock pipeline's dtype, as before the bfloat16 fix."""
    pipe = _ddim_pipe().to(torch.float16)
    stock = _uncond(pipe, batch_size=1, num_inference_steps=1, output_type="np")
    ours = _uncond(dd.accelerate(pipe), batch_size=1, num_inference_steps=1, output_type="np")
    assert ours.dtype == stock.dtype == np.float16 and ours.shape == stock.shape

#----------------------------------------------------------------------------
# 2. The wrapper as an object: attributes, copies, positional arguments, compiled networks, double wrapping.


def test_setting_the_scheduler_on_the_accelerated_pipeline():
    """``fast.scheduler = X`` is the pipeline's scheduler (the loop's): the images of a fresh accelerate with X."""
    pipe = _ddim_pipe()
    fast = dd.accelerate(pipe)
    before = _uncond(fast)
    fast.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    assert pipe.scheduler is fast.scheduler and "scheduler" not in fast.__dict__
    after = _uncond(fast)
    assert not torch.equal(before, after)
    assert torch.equal(after, _uncond(dd.accelerate(pipe)))
    fast.graph = False  # its own settings stay its own
    assert fast.__dict__["graph"] is False and not hasattr(pipe, "graph")


def test_copies_of_an_accelerated_pipeline():
    """copy and deepcopy work; a deep copy runs its own modules (same images) and keeps no model wrappers (their
    cache keys hold the identity of the original's networks)."""
    fast = dd.accelerate(_ddim_pipe())
    images = _uncond(fast)
    shallow = copy.copy(fast)
    assert shallow.pipe is fast.pipe and "_models" not in shallow.__dict__
    deep = copy.deepcopy(fast)
    assert deep.pipe is not fast.pipe and deep.unet is not fast.unet and "_models" not in deep.__dict__
    assert torch.equal(_uncond(deep), images) and torch.equal(_uncond(shallow), images)


def test_positional_arguments_bind_as_the_pipelines():
    pipe = _ddim_pipe()
    fast = dd.accelerate(pipe)
    # DDIMPipeline.__call__(batch_size, generator, eta, num_inference_steps, ...)
    ours = fast(2, torch.Generator().manual_seed(5), 0.0, 3, output_type="pt").images
    assert torch.equal(ours, _uncond(fast))
    assert ours.shape == pipe(2, torch.Generator().manual_seed(5), 0.0, 3, output_type="pt").images.shape
    with pytest.raises(TypeError, match=r"\['batch_size'\] given both by position and by name"):
        fast(2, batch_size=2)
    with pytest.raises(TypeError, match="at most 7 positional"):
        fast(*range(8))
    with pytest.raises(TypeError, match="prompt: this is an unconditional pipeline"):
        fast(prompt="a cat")


def test_sd_positional_sizes(tiny_sd):
    """StableDiffusionPipeline.__call__(prompt, height, width, ...)."""
    fast = dd.accelerate(tiny_sd(getattr(diffusers, EULER[0])(**EULER[1])))
    gen = torch.Generator().manual_seed(5)
    ours = fast(PROMPTS, 24, 16, 2, output_type="pt", generator=gen).images
    assert ours.shape == (2, 3, 24, 16)
    assert torch.equal(ours, fast(PROMPTS, height=24, width=16, num_inference_steps=2, output_type="pt",
                                  generator=torch.Generator().manual_seed(5)).images)


def test_pixart_positional_negative_prompt():
    """PixArtSigmaPipeline.__call__(prompt, negative_prompt, num_inference_steps, ...): the transformer
    pipelines' handlers bind positionals the same way."""
    from test_diffusers_pixart import T5_LEN, tiny_pixart

    fast = dd.accelerate(tiny_pixart("sigma", diffusers.DPMSolverMultistepScheduler()))
    kw = {"max_sequence_length": T5_LEN, "use_resolution_binning": False, "height": 16, "width": 16,
          "clean_caption": False, "output_type": "pt"}
    ours = fast(PROMPTS, ["blurry", ""], 2, generator=torch.Generator().manual_seed(5), **kw).images
    assert torch.equal(ours, fast(PROMPTS, negative_prompt=["blurry", ""], num_inference_steps=2,
                                  generator=torch.Generator().manual_seed(5), **kw).images)


def test_compiled_unet_runs():
    """``pipe.unet = torch.compile(pipe.unet)`` is accepted and its loop runs through the compiled module's
    forwarding (config, dtype, call). Dynamo is switched off for the run: tracing the UNet costs seconds and tests
    torch, not the fused loop (with it on, the images are the same bitwise on this CPU)."""
    import torch._dynamo

    pipe = _ddim_pipe()
    plain = _uncond(dd.accelerate(pipe), batch_size=1, num_inference_steps=2)
    pipe.unet = torch.compile(pipe.unet, backend="eager")
    fast = dd.accelerate(pipe)
    assert fast.kind == "unconditional"
    with torch._dynamo.config.patch(disable=True):
        assert torch.equal(_uncond(fast, batch_size=1, num_inference_steps=2), plain)


def test_compiled_transformers_are_accepted():
    from test_diffusers_flux import DEV, tiny_flux
    from test_diffusers_pixart import tiny_pixart
    from test_diffusers_sd3 import THEIRS
    from test_level2_call_args import _sd3_pipe

    pipes = {"sd3": _sd3_pipe(), "flux": tiny_flux(THEIRS(**DEV)),
             "pixart_sigma": tiny_pixart("sigma", diffusers.DPMSolverMultistepScheduler())}
    for kind, pipe in pipes.items():
        pipe.transformer = torch.compile(pipe.transformer, backend="eager")
        assert dd.accelerate(pipe).kind == kind


def test_accelerating_an_accelerated_pipeline_is_refused():
    fast = dd.accelerate(_ddim_pipe())
    with pytest.raises(TypeError, match=r"pipe: already an AcceleratedPipeline.*\.pipe"):
        dd.accelerate(fast)


def test_unconditional_call_frees_the_model_hooks(monkeypatch):
    """As DDPMPipeline/DDIMPipeline: ``maybe_free_model_hooks`` once per call (offloaded models go back)."""
    pipe = _ddim_pipe()
    freed = []
    monkeypatch.setattr(type(pipe), "maybe_free_model_hooks", lambda self: freed.append(self))
    _uncond(pipe, num_inference_steps=1)
    _uncond(dd.accelerate(pipe), num_inference_steps=1)
    assert freed == [pipe, pipe]

#----------------------------------------------------------------------------
# 3. Journeys: no CFG batch below 1, repeated and interleaved calls, a float64 cast after accelerate.


@pytest.mark.parametrize("scheduler", [EULER, ("DPMSolverMultistepScheduler", {"beta_start": 0.0002,
                                                                                "beta_end": 0.015})],
                         ids=lambda s: s[0])
def test_guidance_scale_below_one_matches_the_stock_pipeline(tiny_sd, scheduler):
    """The stock pipeline's rule: CFG only for guidance_scale > 1 (0.5 runs the conditional UNet alone)."""
    ours, truth, eager = three_runs(tiny_sd, *scheduler, _sd, 2, guidance_scale=0.5)
    assert_matches_reference(ours, truth, eager, f"{scheduler[0]} guidance_scale=0.5")


def test_repeated_and_interleaved_calls_leave_the_pipeline_alone(tiny_sd):
    """Calls of the accelerated pipeline with other step counts in between repeat bitwise, and leave the
    pipeline's scheduler (object, config, timesteps, step and begin index) and its own images as they were."""
    pipe = tiny_sd(diffusers.DPMSolverMultistepScheduler(beta_start=0.0002, beta_end=0.015))
    scheduler, config = pipe.scheduler, dict(pipe.scheduler.config)
    stock = _sd(pipe)
    state = (scheduler.timesteps.clone(), scheduler.step_index, scheduler.begin_index)
    fast = dd.accelerate(pipe)
    first = _sd(fast)
    _sd(fast, num_inference_steps=5, guidance_scale=1.0)
    assert torch.equal(_sd(fast), first)
    assert pipe.scheduler is scheduler and dict(scheduler.config) == config
    assert torch.equal(scheduler.timesteps, state[0]) and (scheduler.step_index, scheduler.begin_index) == state[1:]
    assert torch.equal(_sd(pipe), stock)


def test_float64_cast_after_accelerate(tiny_sd):
    """``fast.to(torch.float64)`` after a float32 call: float64 images, bitwise those of a fresh accelerate of
    the cast pipeline (no wrapper built for the float32 UNet carries over)."""
    pipe = tiny_sd(getattr(diffusers, EULER[0])(**EULER[1]))
    fast = dd.accelerate(pipe)
    _sd(fast)
    ours = _sd(fast.to(torch.float64))
    assert ours.dtype == torch.float64
    assert torch.equal(ours, _sd(dd.accelerate(pipe)))


@pytest.mark.parametrize("steps", [0, -2, True, 2.5])
def test_bad_step_counts_are_refused_by_name(tiny_sd, steps):
    """0 steps used to read as 'not given' and run the default count (stock raises or returns undenoised latents)."""
    fast = dd.accelerate(tiny_sd(getattr(diffusers, EULER[0])(**EULER[1])))
    with pytest.raises(ValueError, match=r"num_inference_steps: expected an int >= 1, got"):
        _sd(fast, num_inference_steps=steps)
    with pytest.raises(ValueError, match=r"num_inference_steps: expected an int >= 1, got"):
        _uncond(dd.accelerate(_ddim_pipe()), num_inference_steps=steps)
