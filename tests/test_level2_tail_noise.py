"""Stochastic img2img tails draw the Level-1 noise: ``sample(..., window=(begin, total))`` and its use at Level 2.

A Level-1 drop-in scheduler after ``set_begin_index(k)`` runs the rows of its whole-schedule table from row k on, and
the fused op keys each Philox draw by its row (csrc/common/philox.h: counter ``(element, step = row)``). A Level-2
tail is its own shorter loop; ``window`` lays its rows out where the whole loop has them, so it draws the same noise.

Oracles:
- the window itself: a textbook float64 Euler-ancestral loop whose noise is ``philox.noise_like(x, seed, k + i)``
  (the whole loop's rows), and the Level-1 schedulers (EulerAncestral, KDPM2-ancestral with its noise on the
  second-call rows, DPM-Solver SDE with two draws per step) stepped by hand after ``set_begin_index(k)``;
- Level 2: the stock pipeline driven by diffkern's Level-1 scheduler keyed by the seed Level 2 draws (``set_seed``;
  the pipeline's generator then only draws the start latents, as in the fused path), in float64 as the truth and in
  float32 as the yardstick (``assert_matches_reference``); tiny random models only.
"""
import copy
import dataclasses
import importlib

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import diffkern  # noqa: E402
import diffkern.diffusers as dd  # noqa: E402
from diffkern import analytic, coef_tables, graphs, sampler_loop, sampler_plans, schedules  # noqa: E402
from diffkern.diffusers import accelerate_sd3  # noqa: E402
from diffkern.ops import philox  # noqa: E402
from diffkern.testing import assert_matches_reference  # noqa: E402
from test_diffusers_img2img_level2 import SD, _call, _img2img  # noqa: E402
from test_diffusers_level2_sdxl_inpaint import inpaint_call, inpaint_pipe, sdxl_call, sdxl_img2img  # noqa: E402
from test_diffusers_pipelines import pipeline_modules, tiny_sd  # noqa: E402, F401  (tiny_sd: a fixture)
from test_diffusers_schedulers import _randn32, diffusers_float64  # noqa: E402
from test_diffusers_sdxl import SDXL_SCHEDULER, tiny_sdxl  # noqa: E402, F401  (tiny_sdxl: a fixture)
from test_graphs import fresh_cache  # noqa: E402, F401  (autouse)
from test_level2_gpu_readiness import strict  # noqa: E402, F401  (a fixture)

GMM = analytic.GaussianMixture.demo_2d()
accelerate_module = importlib.import_module("diffkern.diffusers.accelerate")  # the package exports the function

#----------------------------------------------------------------------------
# sample(..., window=...)


def _start(batch=64, sigma=10.0):
    return torch.randn(batch, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * sigma


def test_window_is_the_whole_loops_noise():
    """Euler-ancestral from step k of an N-step schedule draws row k + i's noise at its step i (textbook loop)."""
    n, k, seed = 8, 3, 11
    whole = schedules.karras(n, 0.05, 10.0).tolist()
    tail = whole[k:]
    x = _start(sigma=tail[0])
    want = x.clone()
    key = torch.tensor([seed])
    for i, (s, sn) in enumerate(zip(tail[:-1], tail[1:])):
        d = GMM(want, torch.full((x.shape[0],), s, dtype=torch.float64))
        down, up = coef_tables.ancestral_step(s, sn, 1.0)
        want = want + (down - s) * (want - d) / s + up * philox.noise_like(want, key, k + i, torch.float64)
    got = diffkern.sample(GMM, x, tail, "euler_ancestral", seed=seed, window=(k, n), backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    alone = diffkern.sample(GMM, x, tail, "euler_ancestral", seed=seed, backend="reference")
    assert float((alone - want).abs().max()) > 0.1  # the loop on its own draws other noise


def _level1_by_hand(sched, gmm, x, begin, seed):
    """``sched`` (a VE-state Level-1 scheduler: the state is x itself) stepped on the exact denoiser from step
    ``begin`` after ``set_begin_index`` (``order`` calls per step); eps = (x - D)/sigma at each call's sigma."""
    order = sched.order
    sched.set_seed(seed)
    sched.set_begin_index(begin * order)
    for k, t in enumerate(sched.timesteps[begin * order:], start=begin * order):
        sigma = sched._mids[k // 2] if order == 2 and k % 2 else sched.sigmas_host[k // order]  # this call's sigma
        eps = (x - gmm(x, torch.full((x.shape[0],), sigma, dtype=torch.float64))) / sigma
        x = sched.step(eps, t, x).prev_sample
    return x


@pytest.mark.parametrize("name, method, knobs", [
    ("EulerAncestralDiscreteScheduler", "euler_ancestral", {"eta": 1.0}),
    ("KDPM2AncestralDiscreteScheduler", "dpm_2_ancestral", {"eta": 1.0}),  # noise on the second-call rows
    ("DPMSolverSDEScheduler", "dpmpp_sde", {"eta": 1.0, "s_noise": 1.0, "r": 0.5}),  # two draws per step
])
@pytest.mark.parametrize("begin", [0, 2, 4])
def test_window_is_the_level1_scheduler_after_set_begin_index(name, method, knobs, begin):
    n, seed = 6, 5
    sched = getattr(dd, name)()
    sched.set_timesteps(n)
    sig = sched.sigmas_host
    x = _start(sigma=sig[begin])
    want = _level1_by_hand(sched, GMM, x.clone(), begin, seed)
    got = diffkern.sample(GMM, x, sig[begin:], method, seed=seed, window=(begin, n), backend="reference", **knobs)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("method", ["dpm_2_ancestral", "dpmpp_sde", "lcm"])
def test_window_same_on_every_backend(backend, method):
    if diffkern.available("cpu").get(backend) is not None:
        pytest.skip(f"{backend}: {diffkern.available('cpu')[backend]}")
    sig = schedules.karras(7, 0.05, 10.0).tolist()[2:]
    x = _start(16, sig[0]).float()
    ref = diffkern.sample(GMM, x.double(), sig, method, seed=3, window=(2, 7), backend="reference")
    ref32 = diffkern.sample(GMM, x, sig, method, seed=3, window=(2, 7), backend="reference")
    got = diffkern.sample(GMM, x, sig, method, seed=3, window=(2, 7), backend=backend)
    assert_matches_reference(got, ref, ref32, f"{method} window on {backend}")


def test_window_zero_and_none_are_the_loop_on_its_own_bitwise():
    sig = schedules.karras(6, 0.05, 10.0)
    x = _start(8, 10.0)
    for method in ("euler_ancestral", "dpm_2_ancestral", "dpmpp_sde", "sa_solver", "heun"):
        alone = diffkern.sample(GMM, x, sig, method, seed=2)
        assert torch.equal(diffkern.sample(GMM, x, sig, method, seed=2, window=None), alone)
        assert torch.equal(diffkern.sample(GMM, x, sig, method, seed=2, window=(0, 6)), alone)
        assert torch.equal(diffkern.sample(GMM, x, sig, method, seed=2, window=[0, 6]), alone)
    # a loop that draws no noise is the same in any window
    assert torch.equal(diffkern.sample(GMM, x, sig, "heun", window=(3, 20)), diffkern.sample(GMM, x, sig, "heun"))


def test_window_with_record_and_callback():
    sig = schedules.karras(5, 0.05, 10.0).tolist()
    x = _start(8, sig[0])
    seen = []
    out, traj = diffkern.sample(GMM, x, sig, "euler_ancestral", seed=1, window=(2, 7), record=True,
                                callback=lambda d: seen.append(d["i"]))
    assert seen == list(range(5)) and torch.equal(traj["x"][-1], out)
    assert torch.equal(out, diffkern.sample(GMM, x, sig, "euler_ancestral", seed=1, window=(2, 7)))


@pytest.mark.parametrize("window, err, match", [
    ((1,), TypeError, "window: expected None or a pair of ints"),
    ((1.0, 8), TypeError, "window: expected None or a pair of ints"),
    ((True, 8), TypeError, "window: expected None or a pair of ints"),
    ("ab", TypeError, "window: expected None or a pair of ints"),
    ((-1, 8), ValueError, r"window: expected 0 <= begin and begin \+ 5"),
    ((4, 8), ValueError, r"window: expected 0 <= begin and begin \+ 5 .* <= total, got \(begin, total\) = \(4, 8\)"),
])
def test_window_bad_input_is_named(window, err, match):
    with pytest.raises(err, match=match):
        diffkern.sample(GMM, _start(4), schedules.karras(5, 0.05, 10.0), "euler_ancestral", window=window)


def test_windowed_plan_layout_and_graph_key():
    """Each block of N rows becomes ``total`` rows with the plan's at offset ``begin``: step, corrector and churn
    rows land where a ``total``-step plan has them; the launch structure (the graph cache key) differs."""
    sig = schedules.karras(4, 0.05, 10.0).tolist()
    plan = sampler_plans.PLANS["dpm_2_ancestral"](sig, coef_tables._identity, eta=1.0, s_noise=1.0)
    win = sampler_loop.windowed(plan, (3, 9))
    assert win.table.shape[0] == 2 * 9 and win.step_row == 3 and win.corrector_row == 9 + 3
    assert torch.equal(win.table[3:7], plan.table[:4]) and torch.equal(win.table[12:16], plan.table[4:8])
    assert win.row_sigma[12:16] == plan.row_sigma[4:8]
    assert graphs.plan_structure(win) != graphs.plan_structure(plan)
    assert graphs.plan_structure(sampler_loop.windowed(plan, (2, 9))) != graphs.plan_structure(win)
    churn = sampler_plans.PLANS["euler"](sig, coef_tables._identity, s_churn=2.0, s_tmin=0.0, s_tmax=1e9, s_noise=1.0)
    win = sampler_loop.windowed(churn, (1, 6))
    assert win.step_row == 1 and win.churn_row == 6 + 1 and torch.equal(win.table[7:11], churn.table[4:8])
    with pytest.raises(ValueError, match="window: the plan is already a window"):
        sampler_loop.windowed(win, (1, 6))

#----------------------------------------------------------------------------
# Level 2 against the stock pipeline with the Level-1 scheduler on the same seed.


def _twin64(pipe):
    twin = copy.deepcopy(pipe)
    for module in twin.components.values():
        if isinstance(module, torch.nn.Module):
            module.double()
    if "force_upcast" in getattr(twin.vae, "config", {}):  # SDXL casts the image to float32 for such a VAE
        twin.vae.register_to_config(force_upcast=False)
    return twin


def level1_runs(pipe, call, monkeypatch, **kw):
    """(Level 2, Level 1 float64, Level 1 float32) of ``call(pipe, generator, **kw)``: Level 1 is the stock pipeline
    with diffkern's Level-1 scheduler of ``pipe.scheduler``'s class and config keyed (``set_seed``) by the seed
    Level 2 draws; the pipeline's generator goes to its start latents only (``prepare_extra_step_kwargs`` gets
    None), so the steps draw Philox noise."""
    import diffusers.models.autoencoders.vae as vae_module

    seeds, real = [], accelerate_module._seed

    def keep(generator, batch):
        seeds.append(real(generator, batch))
        return seeds[-1]
    with monkeypatch.context() as m:
        m.setattr(accelerate_module, "_seed", keep)
        m.setattr(accelerate_sd3, "_seed", keep)
        ours = call(dd.accelerate(pipe), torch.Generator().manual_seed(5), **kw)
    assert len(seeds) == 1, "the loop drew no seed: not a stochastic loop"
    cls = getattr(dd, type(pipe.scheduler).__name__)

    def level1(p):
        # the pipeline's effective config (StableDiffusionPipeline forces clip_sample=False after construction; plain
        # from_config would reset a key listed in _use_default_values to its default), as accelerate reads it
        p.scheduler = cls.from_config({k: v for k, v in pipe.scheduler.config.items() if k != "_use_default_values"})
        p.scheduler.set_seed(seeds[0])
        with monkeypatch.context() as m:
            extra = getattr(type(p), "prepare_extra_step_kwargs", None)
            if extra is not None:
                m.setattr(type(p), "prepare_extra_step_kwargs", lambda self, generator, eta: extra(self, None, eta))
            return call(p, torch.Generator().manual_seed(5), **kw)
    with diffusers_float64(*pipeline_modules(pipe)), monkeypatch.context() as m:
        m.setattr(vae_module, "randn_tensor", _randn32(vae_module.randn_tensor))  # the encoder's posterior draw
        truth = level1(_twin64(pipe))
    eager = level1(copy.deepcopy(pipe))
    assert 0.05 < float(((eager > 0) & (eager < 1)).float().mean()) or kw.get("output_type") == "latent", \
        "images saturated: the comparison would be void"
    return ours, truth.to(torch.float64), eager


DPM_SDE = {"algorithm_type": "sde-dpmsolver++"}
SD_TAILS = [  # (diffkern scheduler, config, call kwargs): every stochastic scheduler of the img2img loop
    ("EulerAncestralDiscreteScheduler", SD, {"strength": 0.6}),
    ("DDPMScheduler", dict(SD, clip_sample=False), {"strength": 0.6}),
    ("DDIMScheduler", dict(SD, clip_sample=False), {"strength": 0.8, "eta": 0.7, "steps": 5}),
    ("DPMSolverMultistepScheduler", dict(SD, **DPM_SDE), {"strength": 0.6}),  # dpmpp_2m_sde
    ("DPMSolverMultistepScheduler", dict(DPM_SDE, solver_order=3), {"strength": 0.7, "steps": 7}),  # dpmsolver_3m
    ("DPMSolverMultistepScheduler", dict(DPM_SDE, solver_order=1), {"strength": 0.5}),  # sde(lam=1)
    ("DPMSolverSinglestepScheduler", dict(DPM_SDE, solver_order=1), {"strength": 0.7, "steps": 6}),  # sde(lam=1)
    ("KDPM2AncestralDiscreteScheduler", SD, {"strength": 0.6}),  # noise on the second calls' rows
    ("DPMSolverSDEScheduler", {}, {"strength": 0.6}),  # two draws per step
    ("LCMScheduler", {"timestep_scaling": 0.002}, {"strength": 0.6}),
    ("SASolverScheduler", {}, {"strength": 0.6, "steps": 6}),  # tau 1 inside t in [200, 800]
    ("GEScheduler", dict(SD, mu=0.5), {"strength": 0.6}),  # clip_sample left at its default: the pipeline's False
    ("GEScheduler", dict(SD, mu=0.3, clip_sample=False), {"strength": 1.0}),
]


@pytest.mark.parametrize("name, config, kw", SD_TAILS, ids=lambda v: str(v)[:40])
def test_sd_img2img_tail_is_level1(tiny_sd, monkeypatch, name, config, kw):
    pipe = _img2img(tiny_sd, getattr(dd, name).from_config(config))
    ours, truth, eager = level1_runs(pipe, _call, monkeypatch, **kw)
    assert_matches_reference(ours, truth, eager, f"img2img {name} {config} {kw}: level 2 vs level 1")


def test_tail_without_window_would_differ(tiny_sd, monkeypatch):
    """The comparison discriminates: the tail run as a loop of its own (no window) is far from Level 1."""
    from diffkern.diffusers import accelerate_img2img, loop_spec

    pipe = _img2img(tiny_sd, dd.EulerAncestralDiscreteScheduler.from_config(SD))
    _, truth, eager = level1_runs(pipe, _call, monkeypatch, strength=0.6)
    with monkeypatch.context() as m:
        m.setattr(accelerate_img2img, "tail_spec",
                  lambda *a: dataclasses.replace(loop_spec.tail_spec(*a), window=None))
        alone = _call(dd.accelerate(pipe), torch.Generator().manual_seed(5), strength=0.6)
    assert float((alone - truth).abs().max()) > 100 * float((eager - truth).abs().max()) + 1e-3


INPAINT_TAILS = [("EulerAncestralDiscreteScheduler", SD), ("KDPM2AncestralDiscreteScheduler", SD),
                 ("DPMSolverSDEScheduler", {})]


@pytest.mark.parametrize("name, config", INPAINT_TAILS, ids=[n for n, _ in INPAINT_TAILS])
def test_sd_inpaint_tail_is_level1(tiny_sd, monkeypatch, name, config):
    pipe = inpaint_pipe(tiny_sd, getattr(dd, name).from_config(config))
    ours, truth, eager = level1_runs(pipe, inpaint_call, monkeypatch, strength=0.6)
    assert_matches_reference(ours, truth, eager, f"inpaint {name}: level 2 vs level 1")


SDXL_TAILS = [  # the img2img window: from strength's begin step, and with a denoising_end head
    ("EulerAncestralDiscreteScheduler", SDXL_SCHEDULER, {"strength": 0.6}),
    ("EulerAncestralDiscreteScheduler", SDXL_SCHEDULER, {"strength": 0.8, "steps": 6, "denoising_end": 0.6,
                                                          "output_type": "latent"}),
    ("KDPM2AncestralDiscreteScheduler", SDXL_SCHEDULER, {"strength": 0.6}),
    ("DPMSolverMultistepScheduler", dict(SDXL_SCHEDULER, **DPM_SDE), {"strength": 0.7, "steps": 5}),
]


@pytest.mark.parametrize("name, config, kw", SDXL_TAILS, ids=lambda v: str(v)[:40])
def test_sdxl_img2img_tail_is_level1(tiny_sdxl, monkeypatch, name, config, kw):
    pipe = sdxl_img2img(tiny_sdxl, getattr(dd, name).from_config(config))
    ours, truth, eager = level1_runs(pipe, sdxl_call, monkeypatch, **kw)
    assert_matches_reference(ours, truth, eager, f"SDXL img2img {name} {kw}: level 2 vs level 1")


def test_window_in_a_captured_loop(strict, monkeypatch):
    """With ``graph=True`` (the strict CPU stand-in of a CUDA capture: no host syncs, no host data per call) a
    window's loop is bitwise the eager one, replays, and another window is another capture."""
    captures = []
    record = graphs._record
    monkeypatch.setattr(graphs, "_record", lambda body, device: captures.append(1) or record(body, device))
    sig = schedules.karras(5, 0.05, 10.0).tolist()
    x = _start(8, sig[0]).float()
    for window in ((2, 7), (2, 7), (1, 7), (2, 7)):
        for method in ("dpm_2_ancestral", "euler_ancestral"):
            eager = diffkern.sample(GMM, x, sig, method, seed=3, window=window)
            assert torch.equal(diffkern.sample(GMM, x, sig, method, seed=3, window=window, graph=True), eager)
    assert len(captures) == 4  # two windows, two methods
