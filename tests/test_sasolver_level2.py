"""SA-Solver through the fused loop: the ``sa_solver`` sampler and ``accelerate()`` with a ``SASolverScheduler``.

Deterministic configs (``tau_func`` 0) give the stock pipeline's images by the project's rule (diffusers run in
float64 as the truth); stochastic ones (diffusers' default tau: 1 for 200 <= t <= 800) draw Philox noise and equal
diffkern's Level 1 scheduler fed the same stream; an img2img window restarts the orders as diffusers does.
"""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern import schedules  # noqa: E402
from diffkern.diffusers.loop_spec import loop_spec  # noqa: E402
from diffkern.sampling import knobs, sample  # noqa: E402
from diffkern.testing import assert_matches_reference  # noqa: E402
from test_diffusers_pipelines import test_stochastic_level2_matches_level1_philox as level2_is_level1  # noqa: E402
from test_diffusers_pipelines import DDPMPipeline, three_runs, tiny_unet, unconditional  # noqa: E402
from test_graphs import gmm3, start  # noqa: E402

NAME = "SASolverScheduler"


def no_noise(t):
    return 0


DETERMINISTIC = [{}, {"predictor_order": 3, "corrector_order": 4}, {"predictor_order": 1, "corrector_order": 3},
                 {"predictor_order": 2, "corrector_order": 1, "lower_order_final": False},
                 {"prediction_type": "v_prediction", "timestep_spacing": "trailing"},
                 {"prediction_type": "sample", "timestep_spacing": "leading", "steps_offset": 1}]


@pytest.mark.parametrize("config", DETERMINISTIC, ids=[str(c) for c in DETERMINISTIC])
def test_deterministic_level2_is_the_stock_pipeline(config):
    ours, truth, eager = three_runs(lambda s: DDPMPipeline(unet=tiny_unet(), scheduler=s), NAME,
                                    dict(config, tau_func=no_noise), unconditional, 2)
    assert 0.1 < float(((eager > 0) & (eager < 1)).float().mean()), "images saturated: the comparison would be void"
    assert_matches_reference(ours, truth, eager, f"SA-Solver level 2 {config}")


@pytest.mark.parametrize("config", [{}, {"algorithm_type": "noise_prediction", "predictor_order": 3}],
                         ids=["data", "noise"])
def test_stochastic_level2_is_level1_with_philox(config):
    level2_is_level1(NAME, config)


@pytest.mark.parametrize("config", [{}, {"algorithm_type": "noise_prediction", "predictor_order": 3,
                                      "corrector_order": 4}, {"predictor_order": 1, "lower_order_final": False}],
                         ids=["data", "noise-3-4", "p1"])
def test_sampler_is_the_level1_scheduler_in_float64(config):
    """``sa_solver`` with the knobs of accelerate's loop spec is the scheduler's own run (VP state z = alpha x,
    float64, the same Philox draws): tau 0, tau 1, and diffusers' default tau (1 inside t in [200, 800]), from the
    start and from step 3 (img2img: the orders restart there and the taus are sliced), on a Gaussian mixture's exact
    denoiser (eps from D)."""
    from diffkern.diffusers.loop_spec import tail_spec

    gmm = gmm3()
    for tau_func, begin in ((lambda t: 0, 0), (lambda t: 1, 0), (None, 0), (lambda t: 0, 3)):
        sched = dd.SASolverScheduler(tau_func=tau_func, **config)
        sched.set_timesteps(9)
        spec = tail_spec(sched, loop_spec(sched), begin)
        sched.set_seed(5)
        sched.set_begin_index(begin)
        sig = sched.sigmas_host
        x = start(6)
        z = x / (1 + sig[begin] ** 2) ** 0.5
        for i, t in enumerate(sched.timesteps[begin:], start=begin):
            s = sig[i]
            xv = z * (1 + s * s) ** 0.5
            eps = (xv - gmm(xv, torch.full((6,), s, dtype=torch.float64))) / s
            z = sched.step(eps, t, z).prev_sample
        want = z * (1 + sig[-1] ** 2) ** 0.5
        assert spec.sigmas == sig[begin:] and len(spec.knobs["tau"]) == 9 - begin
        got = sample(gmm, x, spec.sigmas, "sa_solver", backend="reference", seed=5, **spec.knobs)
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)


def test_spec_and_refusals():
    ours = dd.SASolverScheduler(predictor_order=3, corrector_order=4)
    ours.set_timesteps(8)
    spec = loop_spec(ours)
    assert spec.method == "sa_solver" and spec.vp and len(spec.sigmas) == 9 and spec.sigmas[-1] > 0
    assert spec.knobs["tau"] == tuple(1.0 if 200 <= t <= 800 else 0.0 for t in ours.timesteps.tolist())
    from diffkern.diffusers.loop_spec import tail_spec
    tail = tail_spec(ours, spec, 3)  # img2img from step 3: the taus of the steps it runs
    assert tail.knobs["tau"] == spec.knobs["tau"][3:] and tail.sigmas == spec.sigmas[3:]
    for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
        sched = dd.SASolverScheduler(**{key: True})
        sched.set_timesteps(6)
        with pytest.raises(ValueError, match=f"{key}=True is not supported by the fused loop"):
            loop_spec(sched)
    sched = dd.SASolverScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")
    sched.set_timesteps(6)
    with pytest.raises(ValueError, match="use_flow_sigmas=True is not supported by the fused loop"):
        loop_spec(sched)


def test_sampler_knobs_and_bad_input():
    assert knobs("sa_solver") == {"predictor_order": 2, "corrector_order": 2, "tau": 1.0, "predict_x0": True,
                                  "lower_order_final": True}
    x, sig = start(4), schedules.karras(6, 0.05, 10.0)
    per_step = sample(gmm3(), x, sig, "sa_solver", backend="reference", seed=2, tau=[0.5] * 6)
    assert torch.equal(per_step, sample(gmm3(), x, sig, "sa_solver", backend="reference", seed=2, tau=0.5))
    assert torch.equal(sample(gmm3(), x, sig, "sa_solver", backend="reference", seed=1, tau=0.0),
                       sample(gmm3(), x, sig, "sa_solver", backend="reference", seed=2, tau=0.0))
    for kw, err, match in [({"predictor_order": 4}, ValueError, "predictor_order: expected an int in 1..3"),
                           ({"corrector_order": 0}, ValueError, "corrector_order: expected an int in 1..4"),
                           ({"predictor_order": 2.0}, ValueError, "predictor_order"),
                           ({"tau": -1.0}, ValueError, "tau: expected a finite number >= 0"),
                           ({"tau": [1.0] * 5}, ValueError, "one per step \\(6\\)"),
                           ({"tau": torch.tensor(1.0)}, TypeError, "tau: expected a number"),
                           ({"predict_x0": 1}, TypeError, "predict_x0: expected a bool")]:
        with pytest.raises(err, match=match):
            sample(gmm3(), x, sig, "sa_solver", backend="reference", **kw)


def test_final_jump_to_zero():
    """A schedule ending at 0 (k-diffusion's): the last step returns the denoised estimate of its state."""
    x, sig = start(4), schedules.karras(5, 0.05, 10.0)
    out, traj = sample(gmm3(), x, sig, "sa_solver", backend="reference", seed=3, record=True)
    torch.testing.assert_close(out, traj["denoised"][-1], rtol=0, atol=0)


@pytest.mark.parametrize("method, kw, noisy", [("er_sde", {}, True), ("sa_solver", {}, True),
                                               ("sa_solver", {"tau": 0.0}, False), ("res_multistep_ancestral", {}, True),
                                               ("dpm_fast", {"eta": 1.0}, True), ("lcm", {}, True), ("euler", {}, False)])
def test_method_noise_is_keyed_by_the_generator(method, kw, noisy, monkeypatch):
    """Whether a loop draws noise is read from its plan: a method whose noise knob is not called eta (er_sde's
    s_noise, sa_solver's tau) takes its Philox seed from the pipeline's generator, as the others do (it used to run
    with seed 0 whatever the generator); a noise-free loop leaves the generator alone."""
    import diffkern.sampling as sampling

    seeds, real = [], sampling.sample
    monkeypatch.setattr(sampling, "sample", lambda *a, **k: seeds.append(k["seed"]) or real(*a, **k))
    pipe = DDPMPipeline(unet=tiny_unet(), scheduler=diffusers.DDPMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    fast = dd.accelerate(pipe, method=method, **kw)
    for seed in (3, 3, 4):
        fast(batch_size=2, generator=torch.Generator().manual_seed(seed), num_inference_steps=5, output_type="pt")
    if noisy:
        assert seeds[0] == seeds[1] != seeds[2] and seeds[0] != 0, seeds
    else:
        assert seeds == [0, 0, 0]


def test_denoising_end_head_keeps_diffusers_orders():
    """SDXL's denoising_end keeps the first steps of the loop: their taus, and diffusers' orders of the whole
    schedule (lower_order_final lowers only its last steps, so the head runs without it), or a refusal by name."""
    from diffkern import coef_tables_sasolver as cs
    from diffkern.diffusers.accelerate_sdxl_img2img import head_spec

    ours = dd.SASolverScheduler(predictor_order=3, corrector_order=3)
    ours.set_timesteps(10)
    spec = loop_spec(ours)
    head = head_spec(ours, spec, 6, 0.6)
    assert head.knobs["tau"] == spec.knobs["tau"][:6] and head.sigmas == spec.sigmas[:7]
    assert cs.orders(6, 3, 3, head.knobs["lower_order_final"]) == cs.orders(10, 3, 3, True)[:6]
    assert head.knobs["lower_order_final"] is False
    with pytest.raises(ValueError, match="denoising_end=0.9 is not supported"):
        head_spec(ours, spec, 9, 0.9)  # diffusers lowers step 8 (of 10) already: no 9-step loop does
