"""Regressions found reviewing the diffusers drop-in and the CLI as a user would use them.

- ``add_noise`` on the VE/DPM schedulers (img2img pipelines call it after ``set_begin_index``; training scripts
  call it with random timesteps), and ``sigmas``, as diffusers' classes have them.
- ``from_config`` keeps keys that only a compatible class takes (Heun's ``clip_sample`` in an Euler config, Euler's
  ``use_karras_sigmas`` in an Euler-ancestral one): diffusers' class ignores them, so ours must too.
- ``accelerate``: a DPM-Solver config whose limit depends on the step count is accepted, and a last step from
  sigma_min to itself (``final_sigmas_type="sigma_min"``) is dropped as the identity it is; callback tensor inputs
  without a callback are harmless.
- CLI: ``demo``, ``likelihood`` and ``trajectory`` bad arguments end in one line and exit code 2.

Most comparisons with diffusers' float32 schedulers use a plain tolerance: the differences are float32 roundings of
the same formulas (float64 tables on our side), orders of magnitude below the effects the bugs had. Karras
schedules, whose timesteps differ by diffusers' float32 table, use the project's rule (test_diffusers_pipelines.py).
"""
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.__main__ import main  # noqa: E402
from diffkern.testing import assert_matches_reference  # noqa: E402
from test_diffusers_pipelines import (TEXT_STEPS, text2image, three_runs, tiny_sd, tiny_unet,  # noqa: E402, F401
                                      unconditional)  # (tiny_sd: a fixture)

SHAPE = (3, 2, 4, 4)
VE_DPM = ["DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
          "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"]


def _pair(name, **config):
    theirs = getattr(diffusers, name)(**config)
    return theirs, getattr(dd, name).from_config(theirs.config)


def _close(a, b, what, rel=2e-6):
    scale = max(1.0, float(b.abs().max()))
    assert float((a - b).abs().max()) <= rel * scale, what

#----------------------------------------------------------------------------
# add_noise and sigmas.


@pytest.mark.parametrize("name", VE_DPM)
@pytest.mark.parametrize("karras", [False, True])
def test_add_noise_matches_diffusers(name, karras):
    config = {"use_karras_sigmas": True} if karras and name != "EulerAncestralDiscreteScheduler" else {}
    # Karras sigmas come from diffusers' float32 log-sigma table: ~1e-5 relative from our float64 ones
    rel = 1e-4 if config else 2e-6
    theirs, ours = _pair(name, **config)
    for s in (theirs, ours):
        s.set_timesteps(6)
    gen = torch.Generator().manual_seed(0)
    x, noise = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    # per-sample timesteps looked up in the schedule (Heun's repeated ones included), then one for the batch
    for pick in ([0, 3, -1], [2]):
        _close(ours.add_noise(x, noise, ours.timesteps[pick]), theirs.add_noise(x, noise, theirs.timesteps[pick]),
               f"{name} {config} add_noise at {pick}", rel)
    # img2img: set_begin_index, add_noise before the first step and (inpainting) after one
    for s in (theirs, ours):
        s.set_begin_index(2)
    _close(ours.add_noise(x, noise, ours.timesteps[2:3].repeat(3)),
           theirs.add_noise(x, noise, theirs.timesteps[2:3].repeat(3)), f"{name} add_noise at begin_index", rel)
    for s in (theirs, ours):
        t = s.timesteps[2]
        s.step(s.scale_model_input(x, t), t, x)
    _close(ours.add_noise(x, noise, ours.timesteps[3:4]), theirs.add_noise(x, noise, theirs.timesteps[3:4]),
           f"{name} add_noise after a step", rel)
    assert ours.add_noise(x.half(), noise.half(), ours.timesteps[:1]).dtype == torch.float16


@pytest.mark.parametrize("name", VE_DPM + ["DDIMScheduler", "DDPMScheduler"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_steps_match_diffusers(name, dtype):
    """A 16-bit UNet's loop (sample and model output in ``dtype``): prev_sample in diffusers' dtype, and within the
    project's rule of diffusers' own 16-bit step (which upcasts to float32 for the Euler and DPM families but
    rounds every operation for Heun, DDIM and DDPM) against its float64 run. Every scheduler gets the same input
    each step, so multistep histories see the same values."""
    config = {"clip_sample": False} if name.startswith("DD") else {}
    theirs, ours = _pair(name, **config)
    theirs64 = getattr(diffusers, name)(**config)
    for s in (theirs, ours, theirs64):
        s.set_timesteps(5)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4)).to(dtype)

    def step(s, out, t, k):  # the generator's draws in the output's dtype: equal up to that rounding
        gen = {} if name.startswith(("Heun", "KDPM2Discrete")) else {"generator": torch.Generator().manual_seed(k)}
        return s.step(out, t, x if out.dtype == dtype else x.double(), **gen).prev_sample

    for k, (t_theirs, t_ours) in enumerate(zip(theirs.timesteps, ours.timesteps)):
        out = (0.5 * x.float() + 0.1 * k).to(dtype)
        want, got = step(theirs, out, t_theirs, k), step(ours, out, t_ours, k)
        assert got.dtype == want.dtype == dtype, f"{name} step {k}: {got.dtype} vs diffusers' {want.dtype}"
        assert_matches_reference(got, step(theirs64, out.double(), t_theirs, k), want, f"{name} {dtype} step {k}")
        x = want


def test_add_noise_training_timesteps_and_numbers():
    gen = torch.Generator().manual_seed(1)
    x, noise = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    t = torch.tensor([0, 500, 999])
    # before set_timesteps (training): the training sigma of each integer timestep, as diffusers' Euler
    _close(dd.EulerDiscreteScheduler().add_noise(x, noise, t),
           diffusers.EulerDiscreteScheduler().add_noise(x, noise, t.float()), "Euler add_noise, training timesteps")
    _close(dd.DDPMScheduler().add_noise(x, noise, 10),
           diffusers.DDPMScheduler().add_noise(x, noise, torch.tensor(10)), "DDPM add_noise with a python int")
    iadb = dd.IADBScheduler(timestep_scale=10.0)
    alpha = torch.tensor([0.0, 0.25, 1.0]).view(-1, 1, 1, 1)
    torch.testing.assert_close(iadb.add_noise(x, noise, alpha.flatten() * 10), (1 - alpha) * noise + alpha * x)
    ge = dd.GEScheduler()
    ge.set_timesteps(4)
    torch.testing.assert_close(ge.add_noise(x, noise, ge.timesteps[1:2]), x + ge.sigmas_host[1] * noise)


@pytest.mark.parametrize("name", VE_DPM)
def test_sigmas_match_diffusers(name):
    theirs, ours = _pair(name, use_karras_sigmas=True) if name != "EulerAncestralDiscreteScheduler" else _pair(name)
    for s in (theirs, ours):
        s.set_timesteps(5)
    assert ours.sigmas.dtype == torch.float32 and ours.sigmas.shape == theirs.sigmas.shape
    torch.testing.assert_close(ours.sigmas, theirs.sigmas, rtol=1e-4, atol=0)
    with pytest.raises(AttributeError, match="sigmas"):
        dd.DDIMScheduler().sigmas


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "HeunDiscreteScheduler",
                                  "KDPM2DiscreteScheduler"])
def test_img2img_pipeline_level1(tiny_sd, name):
    """StableDiffusionImg2ImgPipeline: set_begin_index, Heun's order-2 slicing and add_noise on the VE state."""
    base = tiny_sd(getattr(diffusers, name)())
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    outs = []
    for sched in (getattr(diffusers, name)(), getattr(dd, name)()):
        pipe = diffusers.StableDiffusionImg2ImgPipeline(**base.components)
        pipe.scheduler = sched
        pipe.set_progress_bar_config(disable=True)
        outs.append(pipe("a cat", image=image, strength=0.6, num_inference_steps=2 * TEXT_STEPS, guidance_scale=3.0,
                         output_type="pt", generator=torch.Generator().manual_seed(0)).images)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)

#----------------------------------------------------------------------------
# Keys that from_config keeps for compatible classes.


def test_compatible_class_keys_are_ignored():
    gen = torch.Generator().manual_seed(2)
    x, m = torch.randn(SHAPE, generator=gen), 3 * torch.randn(SHAPE, generator=gen)
    source = diffusers.HeunDiscreteScheduler(clip_sample=True).config  # Euler's config then has clip_sample=True
    for name in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler"):
        theirs = getattr(diffusers, name).from_config(source)
        ours = getattr(dd, name).from_config(source)
        assert ours.config.get("clip_sample") is True
        for s in (theirs, ours):
            s.set_timesteps(5)
        t = ours.timesteps[0]
        got = ours.step(m, t, x * float(ours.init_noise_sigma), generator=torch.Generator().manual_seed(0))
        ref = theirs.step(m, theirs.timesteps[0], x * float(theirs.init_noise_sigma),
                          generator=torch.Generator().manual_seed(0))
        _close(got.prev_sample, ref.prev_sample, f"{name} from a clip_sample=True config (diffusers does not clip)")
        dd.accelerate(diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=theirs))  # no clip_sample refusal
    karras = diffusers.EulerDiscreteScheduler(use_karras_sigmas=True).config
    theirs = diffusers.EulerAncestralDiscreteScheduler.from_config(karras)
    ours = dd.EulerAncestralDiscreteScheduler.from_config(karras)
    for s in (theirs, ours):
        s.set_timesteps(10)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps)  # no Karras sigmas in Euler-ancestral

#----------------------------------------------------------------------------
# accelerate.


def _unconditional(pipe, steps):
    return pipe(batch_size=2, generator=torch.Generator().manual_seed(4), num_inference_steps=steps,
                output_type="pt").images


@pytest.mark.parametrize("config", [
    {"final_sigmas_type": "sigma_min", "use_karras_sigmas": True},   # identity last step, dropped
    {"final_sigmas_type": "sigma_min", "use_karras_sigmas": True, "euler_at_final": True},
])
def test_accelerate_dpm_sigma_min_karras(config):
    """The project's rule against the pipeline run in float64 (Karras timesteps differ from diffusers' float32
    ones by its table's rounding)."""
    pipe = lambda s: diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=s)  # noqa: E731
    ours, truth, eager = three_runs(pipe, "DPMSolverMultistepScheduler", config, unconditional, 2)
    assert_matches_reference(ours, truth, eager, f"accelerate DPM {config}")


def test_accelerate_dpm_sigma_min_16_steps():
    """A second-order last step to sigma_min from 15 steps on: accepted by accelerate() (10 steps cannot run)."""
    pipe = diffusers.DDPMPipeline(unet=tiny_unet(),
                                  scheduler=diffusers.DPMSolverMultistepScheduler(final_sigmas_type="sigma_min"))
    pipe.set_progress_bar_config(disable=True)
    fast = dd.accelerate(pipe)
    torch.testing.assert_close(_unconditional(fast, 16), _unconditional(pipe, 16), rtol=0, atol=1e-5)


@pytest.mark.parametrize("config, steps", [
    ({"final_sigmas_type": "sigma_min"}, 4),   # lower_order_final below 15 steps: a first-order last step
    ({"final_sigmas_type": "sigma_min", "euler_at_final": True}, 2),
    ({"final_sigmas_type": "sigma_min", "euler_at_final": True, "solver_type": "heun"}, 16),
    ({"final_sigmas_type": "sigma_min", "timestep_spacing": "trailing", "prediction_type": "v_prediction"}, 7),
])
def test_accelerate_dpm_sigma_min_first_order_last(config, steps, monkeypatch):
    """DPM-Solver++(2M) whose last step, to sigma_min, is first order in diffusers runs as ``dpmsolver_3m`` with
    ``solver_order=2`` (once refused): the pipeline's images, against the project's rule with the pipeline run in
    float64 as the truth."""
    import test_diffusers_pipelines as tdp
    from diffkern.diffusers.loop_spec import loop_spec

    ours = dd.DPMSolverMultistepScheduler(**config)
    ours.set_timesteps(steps)
    spec = loop_spec(ours)
    assert spec.method == "dpmsolver_3m" and spec.knobs["solver_order"] == 2 and spec.sigmas[-1] > 0
    monkeypatch.setattr(tdp, "STEPS", steps)
    pipe = lambda s: diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=s)  # noqa: E731
    ours, truth, eager = three_runs(pipe, "DPMSolverMultistepScheduler", config, unconditional, 2)
    assert_matches_reference(ours, truth, eager, f"accelerate DPM {config} {steps} steps")


def test_accelerate_euler_sigma_min(tiny_sd):
    pipe = tiny_sd(diffusers.EulerDiscreteScheduler(final_sigmas_type="sigma_min"))
    fast = dd.accelerate(pipe)
    # linspace ends at t = 0, whose sigma is sigma_min: the last step is the identity
    torch.testing.assert_close(text2image(fast, torch.Generator().manual_seed(0)),
                               text2image(pipe, torch.Generator().manual_seed(0)), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="single step goes from its one sigma to itself"):
        fast("a cat", num_inference_steps=1)


def test_accelerate_callback_tensor_inputs_without_callback(tiny_sd):
    fast = dd.accelerate(tiny_sd(diffusers.EulerDiscreteScheduler()))
    kw = {"num_inference_steps": 2, "output_type": "latent", "callback_on_step_end_tensor_inputs": ["latents"]}
    assert fast("a cat", **kw).images.shape == (1, 4, 8, 8)
    with pytest.raises(TypeError, match="callback_on_step_end"):
        fast("a cat", callback_on_step_end=lambda *a: {}, **kw)

def test_accelerate_refuses_pipelines_with_other_loops(tiny_sd):
    """Pipelines whose loop does more than plain sampling (inpainting, PAG) or decodes latents (LDM) are refused by
    name at accelerate(), not silently run as plain text-to-image / unconditional sampling."""
    base = tiny_sd(diffusers.EulerDiscreteScheduler())
    with pytest.raises(TypeError, match=r"StableDiffusionInpaintPipeline with a 4-channel UNet .legacy inpainting"):
        dd.accelerate(diffusers.StableDiffusionInpaintPipeline(**base.components))
    with pytest.raises(TypeError, match="StableDiffusionPAGPipeline.*pag_scale"):
        dd.accelerate(diffusers.StableDiffusionPAGPipeline(**base.components, pag_applied_layers=["mid"]))
    vqvae = diffusers.VQModel(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(8,),
                              norm_num_groups=4)
    ldm = diffusers.LDMPipeline(vqvae=vqvae, unet=tiny_unet(), scheduler=diffusers.DDIMScheduler(clip_sample=False))
    with pytest.raises(TypeError, match=r"LDMPipeline: .* also has \['vqvae'\]"):
        dd.accelerate(ldm)
    # same arguments and loop as StableDiffusionPipeline, but its output is (rgb, depth) from its own processor
    with pytest.raises(TypeError, match="StableDiffusionLDM3DPipeline: its image_processor is a VaeImageProcessorLDM3D"):
        dd.accelerate(diffusers.StableDiffusionLDM3DPipeline(**base.components))


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "HeunDiscreteScheduler", "GEScheduler"])
def test_accelerate_warns_once_when_the_pipeline_loop_skips_input_scaling(name):
    """DDPMPipeline's loop skips init_noise_sigma and scale_model_input, which VE schedulers need: the fused loop
    does both, so its images differ from that pipeline's; it says so once per scheduler class."""
    scheduler = dd.GEScheduler(clip_sample=False) if name == "GEScheduler" else getattr(diffusers, name)()
    fast = dd.accelerate(diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=scheduler))
    with pytest.warns(UserWarning, match=f"DDPMPipeline's own loop does not scale .* {name} needs"):
        fast(num_inference_steps=2, output_type="pt")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="accelerate:")
        fast(num_inference_steps=2, output_type="pt")
        dd.accelerate(diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=dd.DDPMScheduler(clip_sample=False)))(
            num_inference_steps=2, output_type="pt")  # init_noise_sigma = 1: nothing to say

#----------------------------------------------------------------------------
# CLI.


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cli_sample_16_bit(tmp_path, capsys, dtype):
    """--dtype float16/bfloat16 (the network's dtype): the noise embedding takes the float32 c_noise."""
    out = tmp_path / "grid.png"
    assert main(["sample", "--dtype", dtype, "--steps", "2", "--batch", "2", "--no-progress", "--out", str(out)]) == 0
    assert out.is_file() and "wrote" in capsys.readouterr().out
