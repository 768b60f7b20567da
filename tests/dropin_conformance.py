"""Shared scaffolding of the diffusers drop-in tests: the checks the per-scheduler test files all make, written once,
each asserting one property under the project's rule (``diffkern.testing.assert_matches_reference``: diffusers in
float64 the truth, diffusers in float32 the yardstick; float64 runs at the float64 floor). Level 1 step parity
(:func:`three_schedulers`, :func:`step_parity`, :func:`float64_schedulers`, :func:`float64_parity`), persistence
and the small API, pipelines with tiny random models (Level 1 and 2, flow-matching transformers too) and the samplers'
shared checks. The consistency models' (LCM, TCD) own pieces are in :mod:`dropin_consistency`, the config fuzzers'
harness in :mod:`dropin_fuzz`. All three are plain modules in ``tests/`` (pytest puts that folder on ``sys.path``, as
for the ``test_*`` modules the files import from one another); they hold no tests.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern import analytic, schedules  # noqa: E402
from diffkern.sampling import sample  # noqa: E402
from diffkern.testing import assert_matches_reference, make_tensor  # noqa: E402
from diffusers import DDPMPipeline  # noqa: E402
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402
from test_diffusers_pipelines import three_runs, tiny_unet, unconditional  # noqa: E402
from test_diffusers_schedulers import SHAPE, diffusers_float64  # noqa: E402

F64 = torch.float64
REF = "reference"

#----------------------------------------------------------------------------
# Level 1: step by step against diffusers.


def three_schedulers(name, module, config, kw):
    """(truth, eager, ours) of scheduler class ``name`` after ``set_timesteps(**kw)``: diffusers in float64 (in
    ``module``), diffusers in float32, ours from the latter's config. Ours' timesteps are int64, as many and by the
    rule; its sigmas are the truth's to float32 rounding; then the truth gets our float64 sigmas (diffusers rounds its
    own to float32, which the coefficient formulas and flow sigmas near t = 1 amplify: its rounding, not the step's)."""
    theirs_cls, ours_cls = getattr(diffusers, name), getattr(dd, name)
    with diffusers_float64(module):
        truth = theirs_cls(**config)
        truth.set_timesteps(**kw)
    eager = theirs_cls(**config)
    eager.set_timesteps(**kw)
    ours = ours_cls.from_config(eager.config)
    ours.set_timesteps(**kw)
    assert ours.timesteps.dtype == torch.int64 and ours.num_inference_steps == eager.num_inference_steps
    assert_matches_reference(ours.timesteps.double(), truth.timesteps.double(), eager.timesteps.double(),
                             f"{config} timesteps")
    torch.testing.assert_close(ours.sigmas, truth.sigmas.float(), rtol=3e-7, atol=0)
    s = torch.tensor(ours.sigmas_host, dtype=F64)
    truth.sigmas = s / (1 + s) if ours.config.use_flow_sigmas else s
    return truth, eager, ours


def step_parity(truth, eager, ours, module, what, *, begin=0, shape=SHAPE, model_shape=None,
                model_dtype=torch.float32, generators=False):
    """Step the three from ``begin`` on the truth's states (``shape``) and fresh model outputs (``model_shape``,
    default ``shape``; ``model_dtype`` for the float32 runs): the rule on prev_sample at every step, and ours at its
    end after the last. ``generators``: every step is given a generator of one seed (the SDEs draw from it)."""
    gens = [{"generator": torch.Generator().manual_seed(7)} if generators else {} for _ in range(3)]
    x = make_tensor(shape, F64, seed=11)
    for k in range(begin, len(eager.timesteps)):
        m = make_tensor(model_shape or shape, F64, seed=100 + k)
        with diffusers_float64(module):
            ref = truth.step(m, truth.timesteps[k], x, **gens[0]).prev_sample
        m32 = m.to(model_dtype)
        out = eager.step(m32, eager.timesteps[k], x.float(), **gens[1]).prev_sample
        got = ours.step(m32, ours.timesteps[k], x.float(), **gens[2]).prev_sample
        assert_matches_reference(got, ref, out, f"{what} step {k}")
        x = ref
    assert ours.step_index == len(ours.timesteps)


def float64_schedulers(name, module, config, steps):
    """(truth, ours) of ``config`` after ``set_timesteps(steps)``: diffusers in float64 with its sigmas (float32-rounded
    by its ``set_timesteps``) upcast, so that its coefficients are float64 arithmetic on them; ours as it comes."""
    with diffusers_float64(module):
        truth = getattr(diffusers, name)(**config)
        truth.set_timesteps(steps)
        truth.sigmas = truth.sigmas.double()
    ours = getattr(dd, name)(**config)
    ours.set_timesteps(steps)
    return truth, ours


def float64_parity(truth, ours, module, what, *, shape=SHAPE, begin=0, label="step"):
    """Ours in float64 against the float64 truth (the same sigmas) on the truth's states and fresh model outputs,
    the calls from ``timesteps[begin]`` on: float64 out, the float64 floor (1e-12 relative) at every call."""
    x = make_tensor(shape, F64, seed=1)
    for k, t in enumerate(truth.timesteps[begin:]):
        m = make_tensor(shape, F64, seed=50 + k)
        with diffusers_float64(module):
            ref = truth.step(m, t, x).prev_sample
        got = ours.step(m, t, x).prev_sample
        assert got.dtype == F64
        assert_matches_reference(got, ref, ref, f"{what} {label} {k}")
        x = ref

#----------------------------------------------------------------------------
# Persistence and the small API.


def check_saved_scheduler(sched, path, expected):
    """``save_pretrained`` then ours' and diffusers' ``from_pretrained`` (the config is diffusers' too): ours loaded,
    diffusers' and ours made from diffusers' config all hold ``expected`` (a dict of config values); the class is
    exported and registered. Returns diffusers' loaded scheduler."""
    ours_cls = type(sched)
    name = ours_cls.__name__
    sched.save_pretrained(path)
    loaded = ours_cls.from_pretrained(path)
    theirs = getattr(diffusers, name).from_pretrained(path)
    assert type(loaded) is ours_cls
    for other in (loaded, theirs, ours_cls.from_config(theirs.config)):
        assert {k: other.config[k] for k in expected} == expected, type(other)
    assert dd.SCHEDULERS[name] is ours_cls and name in dd.__all__
    return theirs


def check_saved_pipeline(pipe_cls, sched, path):
    """A ``pipe_cls`` holding ``sched`` saved and loaded again keeps our class and makes the same images, bitwise."""
    pipe = pipe_cls(unet=tiny_unet(diffusers.UNet2DModel), scheduler=sched)
    pipe.save_pretrained(path)
    again = pipe_cls.from_pretrained(path)
    assert type(again.scheduler) is type(sched)
    a, b = (unconditional(p, torch.Generator().manual_seed(0)) for p in (pipe, again))
    torch.testing.assert_close(b, a, rtol=0, atol=0)


def check_add_noise_and_scale_model_input(theirs, ours, begin_index=False):
    """diffusers' and our schedulers (same config) after ``set_timesteps(10)``: ``add_noise`` agrees to float32
    (per-sample timesteps; with ``begin_index`` also after ``set_begin_index(4)``, one timestep for the batch) and
    ``scale_model_input`` is the identity."""
    for s in (theirs, ours):
        s.set_timesteps(10)
    x0, noise = make_tensor(SHAPE, seed=3), make_tensor(SHAPE, seed=4)
    t = theirs.timesteps[[0, 3]]
    torch.testing.assert_close(ours.add_noise(x0[:2], noise[:2], t), theirs.add_noise(x0[:2], noise[:2], t),
                               rtol=1e-5, atol=1e-5)
    if begin_index:
        for s in (theirs, ours):
            s.set_begin_index(4)
        torch.testing.assert_close(ours.add_noise(x0, noise, t[:1]), theirs.add_noise(x0, noise, t[:1]), rtol=1e-5,
                                   atol=1e-5)
    assert torch.equal(ours.scale_model_input(x0, t[0]), x0)

#----------------------------------------------------------------------------
# Pipelines with tiny random models (Level 1 and 2).


class UniPCPipeline(DDPMPipeline):
    """``DDPMPipeline``'s loop without the ``generator`` argument of ``step()``, which diffusers' UniPC does not take
    (the stock pipeline cannot run it; ``accelerate`` replaces the loop and runs either). The initial noise is drawn
    in float32 and cast, so the float64 truth starts from the same numbers."""

    k_scaling = False  # KPipeline: the noise times init_noise_sigma, the UNet input through scale_model_input

    @torch.no_grad()
    def __call__(self, batch_size=1, generator=None, num_inference_steps=1000, output_type="pt", return_dict=True):
        size = self.unet.config.sample_size
        image = randn_tensor((batch_size, self.unet.config.in_channels, size, size), generator=generator,
                             dtype=torch.float32).to(self.unet.dtype)
        self.scheduler.set_timesteps(num_inference_steps)
        if self.k_scaling:
            image = image * self.scheduler.init_noise_sigma
        for t in self.scheduler.timesteps:
            unet_input = self.scheduler.scale_model_input(image, t) if self.k_scaling else image
            image = self.scheduler.step(self.unet(unet_input, t).sample, t, image).prev_sample
        return ImagePipelineOutput(images=(image / 2 + 0.5).clamp(0, 1))


class KPipeline(UniPCPipeline):
    """``DDPMPipeline``'s loop as a K-scheduler needs it: the initial noise times ``init_noise_sigma``, the UNet input
    through ``scale_model_input``, no ``generator`` in ``step()``. The noise is drawn in float32 and cast, so the
    float64 truth starts from the same numbers (and ``accelerate``'s loop too)."""

    k_scaling = True


def check_pipeline(make_pipe, name, config, call, level, what):
    """``three_runs`` of test_diffusers_pipelines (ours at ``level``, the float64 truth, the stock float32 run): the
    stock images are not saturated (else the comparison would be void) and ours is within the rule."""
    ours, truth, eager = three_runs(make_pipe, name, config, call, level)
    assert 0.1 < float(((eager > 0) & (eager < 1)).float().mean()), "images saturated: the comparison would be void"
    assert_matches_reference(ours, truth, eager, what)


def flow_runs(pipe, config, modules, call, ours_cls, **kw):
    """(Level 2, truth, stock float32) of ``call`` on a flow-matching transformer ``pipe`` built with diffusers'
    scheduler of ``config``: the truth is a float64 copy run with ``modules`` in float64; Level 2's pipeline holds
    ``ours_cls(**config)`` (diffusers' or diffkern's class)."""
    theirs_cls = type(pipe.scheduler)
    with diffusers_float64(*modules):
        twin = copy.deepcopy(pipe)
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
            if getattr(twin, name) is not None:
                getattr(twin, name).double()
        twin.scheduler = theirs_cls(**config)
        truth = call(twin, torch.Generator().manual_seed(5), **kw)
    eager = call(pipe, torch.Generator().manual_seed(5), **kw)
    pipe.scheduler = ours_cls(**config)
    ours = call(dd.accelerate(pipe), torch.Generator().manual_seed(5), **kw)
    return ours, truth, eager


def check_level2_images(ours, truth, eager, output_type, kw, latent_shape, what):
    """Two prompts' outputs (``num_images_per_prompt`` each) of ``output_type`` at 16x16 ("latent": ``latent_shape``
    per image): shape and dtype, unsaturated stock images, and the rule."""
    n = 2 * kw.get("num_images_per_prompt", 1)
    shape = {"pt": (n, 3, 16, 16), "np": (n, 16, 16, 3), "latent": (n,) + tuple(latent_shape)}[output_type]
    assert ours.shape == shape and ours.dtype == eager.dtype
    if output_type != "latent":
        assert 0.1 < float(((eager > 0) & (eager < 1)).float().mean()), "images saturated"
    assert_matches_reference(ours, truth, eager, what)


def check_one_step_from_t_one_is_exact(make_pipe, modules, call):
    """One step from t = 1 to 0 in float64 (D = x_t - v, from the state 2^70*x_t) is the pipeline's, bitwise:
    ``make_pipe()`` builds it (inside ``modules`` in float64); ``call(pipe, generator, output_type, **kw)`` runs it."""
    out = []
    for level in (1, 2):
        with diffusers_float64(*modules):
            pipe = make_pipe().to(torch.float64)
            pipe = dd.accelerate(pipe) if level == 2 else pipe
            out.append(call(pipe, torch.Generator().manual_seed(5), "latent", num_inference_steps=1))
    assert out[0].dtype == torch.float64
    torch.testing.assert_close(out[1], out[0], rtol=0, atol=0)

#----------------------------------------------------------------------------
# The samplers.


def gmm3():
    return analytic.GaussianMixture([1.0, 2.0, 1.5], [[-1.0, 0.5], [1.0, 1.0], [0.3, -1.2]], [0.3, 0.5, 0.4])


def diffusers_vp_loop(name, module, gmm, x, sigmas, config):
    """diffusers' ``name`` loop in float64 on the VE schedule ``sigmas`` (its own sigmas replaced), the exact denoiser
    as a "sample"-prediction model on the VP state; returns the VE state."""
    with diffusers_float64(module):
        sched = getattr(diffusers, name)(prediction_type="sample", **config)
        sched.set_timesteps(len(sigmas) - 1)
        sched.sigmas = torch.tensor(sigmas, dtype=F64)
        z = x / math.sqrt(sigmas[0] ** 2 + 1)
        for k, t in enumerate(sched.timesteps):
            s = sigmas[k]
            z = sched.step(gmm.denoise(z * math.sqrt(s * s + 1), s), t, z).prev_sample
    return z * math.sqrt(sigmas[-1] ** 2 + 1)


def check_sampler_every_backend(method, knob_sets, backend):
    """``method`` in float32 on ``backend`` within the rule of the float64 reference run, and in float64 at its
    floor, for each dict of ``knob_sets``."""
    gen = torch.Generator().manual_seed(4)
    gmm = analytic.GaussianMixture([1.0, 2.0], torch.randn(2, 5, generator=gen, dtype=F64), [0.6, 0.8])
    x = make_tensor((3, 5), F64, seed=7) * 5.0
    for knobs in knob_sets:
        sig = schedules.karras(6, 0.05, 5.0)
        ref64 = sample(gmm, x, sig, method, backend=REF, **knobs)
        eager = sample(gmm, x.float(), sig, method, backend=REF, **knobs)
        got = sample(gmm, x.float(), sig, method, backend=backend, **knobs)
        assert_matches_reference(got, ref64, eager, f"{knobs} [{backend}]")
        assert_matches_reference(sample(gmm, x, sig, method, backend=backend, **knobs), ref64, ref64,
                                 f"{knobs} [{backend}] float64")


def check_sampler_knob_errors(method, cases):
    """Each (knobs, error type, match) of ``cases`` raises that error naming the knob."""
    gmm, x, sig = gmm3(), torch.randn(2, 2, dtype=F64), schedules.karras(4, 0.1, 10.0)
    for knobs, error, match in cases:
        with pytest.raises(error, match=match):
            sample(gmm, x, sig, method, backend=REF, **knobs)
