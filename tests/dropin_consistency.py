"""The consistency models' (LCM, TCD) shared test scaffolding: their float64 truth (diffusers' module in float64, with
float32 or float64 generator draws), step-by-step parity with diffusers, the Philox loop, the zero-terminal-SNR
refusal, output dtypes and ``add_noise``, and their tiny DDPMPipeline runs (Level 1). The rule is the project's
(``diffkern.testing.assert_matches_reference``); the other drop-ins' scaffolding is :mod:`dropin_conformance`. A plain
module in ``tests/`` like that one; it holds no tests.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.testing import assert_matches_reference, make_tensor, usable_backends  # noqa: E402
from test_diffusers_pipelines import STEPS, pipeline_modules, tiny_unet  # noqa: E402
from test_diffusers_schedulers import _Torch64, diffusers_float64  # noqa: E402

F64 = torch.float64
REF = "reference"


@contextlib.contextmanager
def float64_consistency(module, float32_draws, default_dtype=None):
    """diffusers' scheduler ``module`` in float64; ``float32_draws``: its generator noise is the float32 normals of
    the same generator, upcast (as the float32 runs draw them), else float64 normals. ``default_dtype``: torch's
    default dtype meanwhile (LCM's ``c_skip``/``c_out`` come from an int64 tensor times a Python float)."""
    saved = torch.get_default_dtype()
    if default_dtype is not None:
        torch.set_default_dtype(default_dtype)
    try:
        if float32_draws:
            with diffusers_float64(module):
                yield
        else:
            module_torch, module.torch = module.torch, _Torch64()
            try:
                yield
            finally:
                module.torch = module_torch
    finally:
        torch.set_default_dtype(saved)


def consistency_parity(name, float64_context, config, kw, dtype, *, second, begin=0, backend=REF, step_kw=None,
                       shape=(2, 4, 5, 3)):
    """Ours (``dtype``) and diffusers' scheduler ``name`` after ``set_timesteps(**kw)`` (and ``set_begin_index``),
    step by step on the truth's states and fresh model outputs, with generators of one seed: the same timesteps,
    an identity ``scale_model_input``, prev_sample and the ``second`` output by the rule (float64: at the floor),
    ours at its end, and the generators advanced alike."""
    step_kw = step_kw or {}
    theirs_cls, ours_cls = getattr(diffusers, name), getattr(dd, name)

    def ready(sched):
        sched.set_timesteps(**kw)
        if begin:
            sched.set_begin_index(begin)
        return sched

    with float64_context(dtype == torch.float32):
        truth = ready(theirs_cls(**config))
    eager = ready(theirs_cls(**config))
    ours = ours_cls.from_config(eager.config)
    ours.backend = backend
    ready(ours)
    assert torch.equal(ours.timesteps, eager.timesteps) and ours.timesteps.dtype == eager.timesteps.dtype
    assert ours.num_inference_steps == eager.num_inference_steps
    gens = [torch.Generator().manual_seed(7) for _ in range(3)]
    x = make_tensor(shape, F64, seed=11)
    for k in range(begin, len(eager.timesteps)):
        t = eager.timesteps[k]
        m = make_tensor(shape, F64, seed=100 + k)
        assert torch.equal(ours.scale_model_input(x.to(dtype), t), x.to(dtype))
        with float64_context(dtype == torch.float32):
            ref = truth.step(m, t, x, generator=gens[0], **step_kw)
        what = f"{config} {kw} {step_kw} begin={begin} [{backend}] step {k} (t={int(t)})"
        got = ours.step(m.to(dtype), t, x.to(dtype), generator=gens[2], **step_kw)
        out = ref if dtype == F64 else eager.step(m.float(), t, x.float(), generator=gens[1], **step_kw)
        assert_matches_reference(got.prev_sample, ref.prev_sample, out.prev_sample, f"{what} prev")
        assert_matches_reference(getattr(got, second), getattr(ref, second), getattr(out, second), f"{what} {second}")
        x = ref.prev_sample
    assert ours.step_index == len(ours.timesteps)
    # the generators advanced identically (noise drawn on the same steps, a zero-weight draw included)
    assert torch.equal(torch.randn(3, generator=gens[0]), torch.randn(3, generator=gens[2]))


def check_philox_loop(ours_cls, shape, **step_kw):
    """Without a generator ours draws Philox noise keyed by ``set_seed``: the same seed the same float32 run, another
    seed another; every CPU backend within the rule of the float64 reference run (float64: at its floor). Returns
    the loop ``(backend, dtype, seed, **step_kw) -> final state`` for further checks."""
    def loop(backend, dtype, seed, **kw):
        sched = ours_cls()
        sched.backend = backend
        sched.set_seed(seed)
        sched.set_timesteps(4)
        x = make_tensor(shape, dtype, seed=1)
        for k, t in enumerate(sched.timesteps):
            x = sched.step(make_tensor(shape, dtype, seed=20 + k), t, x, **dict(step_kw, **kw)).prev_sample
        return x

    ref64, eager = loop(REF, F64, 5), loop(REF, torch.float32, 5)
    assert torch.equal(eager, loop(REF, torch.float32, 5))
    assert not torch.allclose(eager, loop(REF, torch.float32, 6))
    for backend in usable_backends("cpu"):
        assert_matches_reference(loop(backend, torch.float32, 5), ref64, eager, f"philox [{backend}]")
        assert_matches_reference(loop(backend, F64, 5), ref64, ref64, f"philox [{backend}] float64")
    return loop


def check_zero_snr_epsilon_refused(ours_cls, match, shape):
    """Zero terminal SNR with epsilon prediction: a schedule from t = 999 (alpha-bar 0, where diffusers divides by 0)
    is refused naming the key; one that skips it steps to finite values."""
    sched = ours_cls(rescale_betas_zero_snr=True)
    with pytest.raises(ValueError, match=match):
        sched.set_timesteps(4)  # starts at t = 999, alpha-bar 0
    sched.set_timesteps(timesteps=[979, 499])  # skips it: fine
    assert torch.isfinite(sched.step(make_tensor(shape), 979, make_tensor(shape, seed=1)).prev_sample).all()


def check_output_dtypes_and_add_noise(name, second, shape):
    """Our outputs have diffusers' type and dtypes over mixed state/model dtypes; the last step returns its second
    output as prev_sample (LCM: the denoised estimate; TCD: the noised sample at s = 0); ``add_noise`` agrees."""
    for s_dtype, m_dtype in ((torch.float32, torch.float16), (torch.float16, torch.float16),
                             (torch.bfloat16, torch.float32)):
        theirs, ours = getattr(diffusers, name)(), getattr(dd, name)()
        theirs.set_timesteps(2)
        ours.set_timesteps(2)
        x, m = make_tensor(shape, s_dtype, seed=1), make_tensor(shape, m_dtype, seed=2)
        a = theirs.step(m, theirs.timesteps[0], x, generator=torch.Generator().manual_seed(0))
        b = ours.step(m, ours.timesteps[0], x, generator=torch.Generator().manual_seed(0))
        assert type(b) is type(a) and b.prev_sample.dtype == a.prev_sample.dtype
        assert getattr(b, second).dtype == getattr(a, second).dtype
    prev, other = ours.step(m, ours.timesteps[1], x, return_dict=False)
    assert torch.equal(prev, other)
    x0, noise, t = make_tensor(shape, seed=3), make_tensor(shape, seed=4), torch.tensor([999, 19])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t))


def consistency_pipeline_runs(name, float64_context):
    """(ours, truth, stock float32, pipeline) of a DDPMPipeline with diffusers' scheduler ``name`` (LCM or TCD) and
    then ours (Level 1); ``float64_context(True)`` runs the scheduler's module in float64 with float32 draws."""
    config = {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "original_inference_steps": 20}
    theirs_cls = getattr(diffusers, name)

    def call(pipe):
        return pipe(batch_size=2, generator=torch.Generator().manual_seed(5), num_inference_steps=STEPS,
                    output_type="pt").images

    pipe = diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=theirs_cls(**config))
    pipe.set_progress_bar_config(disable=True)
    with float64_context(True), diffusers_float64(*pipeline_modules(pipe)):
        twin = diffusers.DDPMPipeline(unet=tiny_unet().double(), scheduler=theirs_cls(**config))
        twin.set_progress_bar_config(disable=True)
        truth = call(twin)
    eager = call(pipe)
    pipe.scheduler = getattr(dd, name).from_config(pipe.scheduler.config)
    return call(pipe), truth, eager, pipe
