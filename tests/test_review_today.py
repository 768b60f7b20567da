"""Review of the day's additions (ControlNet Level 2, SA-Solver, DPM-Solver++(2) as dpmsolver_3m): independent
checks that the existing tests do not make.

- ControlNet: the (timestep, conditioning scale, batch) of every ControlNet call of the fused loop is the stock
  pipeline's, call by call, for samplers with two model calls per step (Heun, KDPM2-ancestral with its per-call
  timesteps) and stochastic ones (whose results cannot be compared with the stock pipeline's torch noise); one
  AcceleratedPipeline run with different step counts and windows on the CPU graph stand-in replays bitwise its eager
  loop (the on-device call counter restarts with every run and table length).
- SA-Solver: the weights of :mod:`diffkern.coef_tables_sasolver` against the exact integrals (mpmath, 50 digits) on
  the clustered sigmas of a beta-sigma schedule, where steps are short: there diffusers' own float64 closed form
  cancels (relative error ~7e-9 measured), so the float64 comparison with diffusers is no truth; ours is at the
  float64 floor.
- DPM-Solver++ order 2 with a first-order last step to sigma_min (now ``dpmsolver_3m(solver_order=2)``): the SDE
  variant's Level 2 loop is its Level 1 loop with the same Philox noise (both solver types).
"""
from __future__ import annotations

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern import coef_tables_sasolver  # noqa: E402
from diffkern.testing import FLOORS  # noqa: E402
from test_diffusers_level2_controlnet import SD, control_call, controlnet_pipe, graphed  # noqa: E402
from test_diffusers_pipelines import tiny_sd  # noqa: E402, F401
from test_diffusers_pipelines import test_stochastic_level2_matches_level1_philox as level2_is_level1  # noqa: E402
from test_graphs import fake, fresh_cache  # noqa: E402, F401  (fresh_cache: autouse)

WINDOW = {"control_guidance_start": 0.2, "control_guidance_end": 0.7}

#----------------------------------------------------------------------------
# ControlNet: the per-call scale table and its on-device counter.


def _log_calls(monkeypatch, net, log: list) -> None:
    """Record (timestep, conditioning scale, batch) of each call of ``net``."""
    forward = net.forward

    def logged(sample, timestep, *args, conditioning_scale=1.0, **kwargs):
        t = timestep.reshape(-1)[0] if isinstance(timestep, torch.Tensor) else timestep
        log.append((round(float(t), 2), float(conditioning_scale), sample.shape[0]))
        return forward(sample, timestep, *args, conditioning_scale=conditioning_scale, **kwargs)
    monkeypatch.setattr(net, "forward", logged)


@pytest.mark.parametrize("name, config, kw", [
    ("KDPM2AncestralDiscreteScheduler", SD, dict(WINDOW, steps=5)),
    ("EulerAncestralDiscreteScheduler", SD, dict(WINDOW, steps=5, controlnet_conditioning_scale=0.75)),
    ("HeunDiscreteScheduler", SD, dict(WINDOW, steps=4, guess_mode=True)),
    ("DDPMScheduler", SD, dict(WINDOW, steps=5)),
], ids=lambda v: str(v)[:40])
def test_controlnet_calls_are_the_pipelines(tiny_sd, monkeypatch, name, config, kw):
    pipe = controlnet_pipe(tiny_sd, getattr(diffusers, name)(**config))
    fast = dd.accelerate(pipe, graph=False)
    stock, ours = [], []
    with monkeypatch.context() as m:
        _log_calls(m, pipe.controlnet, stock)
        control_call(pipe, torch.Generator().manual_seed(0), output_type="latent", **kw)
    with monkeypatch.context() as m:
        _log_calls(m, pipe.controlnet, ours)
        control_call(fast, torch.Generator().manual_seed(0), output_type="latent", **kw)
    assert len(stock) == len(pipe.scheduler.timesteps)
    assert {c for _, c, _ in stock} == {0.0, kw.get("controlnet_conditioning_scale", 1.0)}  # the window acts
    assert ours == stock


def test_controlnet_graph_replays_across_step_counts(tiny_sd, fake):
    """Heun (two calls per step): 4, 3, 4 and 2 steps with and without windows; each replay is its eager loop."""
    pipe = controlnet_pipe(tiny_sd, diffusers.HeunDiscreteScheduler(**SD))
    fast, eager = graphed(pipe), dd.accelerate(pipe, graph=False)
    for steps, kw in ((4, WINDOW), (3, WINDOW), (4, {"control_guidance_start": 0.5}), (3, {}), (4, WINDOW),
                      (2, {"control_guidance_end": 0.4})):
        want = control_call(eager, torch.Generator().manual_seed(1), steps=steps, output_type="latent", **kw)
        got = control_call(fast, torch.Generator().manual_seed(1), steps=steps, output_type="latent", **kw)
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=str((steps, kw)))

#----------------------------------------------------------------------------
# SA-Solver: the weights against exact integrals.

# the first five sigmas of diffusers' SA-Solver with use_beta_sigmas at 16 steps (steps of h ~ 0.02-0.09)
BETA_SIGMAS = [157.40728759765625, 154.22174072265625, 147.4060821533203, 138.0597381591797, 126.7829818725586]


def _exact(mp, lam, nodes, a, b, k):
    """int_{lam_a}^{lam_b} e^{k (l - lam_b)} L_j(l) dl for the Lagrange basis of ``nodes`` (mpmath)."""
    out = []
    for j in nodes:
        others = [o for o in nodes if o != j]

        def f(x, j=j, others=others):
            return mp.exp(k * (x - lam[b])) * mp.fprod([(x - lam[o]) / (lam[j] - lam[o]) for o in others])
        out.append(mp.quad(f, [lam[a], lam[b]]))
    return out


@pytest.mark.parametrize("tau", [0.0, 1.0, 0.4])
@pytest.mark.parametrize("predict_x0", [True, False])
def test_sasolver_weights_are_exact_on_short_steps(tau, predict_x0):
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(50):
        _check_sasolver_weights(mpmath.mp, tau, predict_x0)


def _check_sasolver_weights(mp, tau, predict_x0):
    alpha = [1.0 / math.sqrt(s * s + 1.0) for s in BETA_SIGMAS]
    sigma = [s / math.sqrt(s * s + 1.0) for s in BETA_SIGMAS]
    lam = [math.log(a) - math.log(s) for a, s in zip(alpha, sigma)]
    mlam = [-mp.log(mp.mpf(s)) for s in BETA_SIGMAS]  # lambda = log(alpha/sigma) = -log(VE sigma)
    k = 1.0 + tau * tau
    for i, order in ((3, 4), (2, 3), (4, 3), (1, 2)):
        nodes = [i - j for j in range(order)]
        got = coef_tables_sasolver.corrector(lam, alpha, sigma, i, order, tau, predict_x0)
        # the corrector's order-2 adjustment is diffusers' addition, not part of the integral
        if predict_x0:
            want = [k * alpha[i] * float(v) for v in _exact(mp, mlam, nodes, i - 1, i, k)]
        else:
            want = [-k * sigma[i] * float(v) for v in _exact(mp, mlam, nodes, i - 1, i, -1.0)]
        if predict_x0 and order == 2:
            h = lam[i] - lam[i - 1]
            d = k * alpha[i] * (h * h / 2 - (k * h + math.expm1(-k * h)) / (k * k)) / h
            want = [want[0] + d, want[1] - d]
        scale = max(abs(v) for v in want)
        err = max(abs(g - w) for g, w in zip(got, want)) / scale
        assert err <= FLOORS[torch.float64], f"step {i} order {order} tau {tau}: relative error {err:.3g}"

#----------------------------------------------------------------------------
# DPM-Solver++(2) SDE with a first-order last step to sigma_min: Level 2 (dpmsolver_3m(solver_order=2)) = Level 1.


@pytest.mark.parametrize("config", [
    {"final_sigmas_type": "sigma_min"},
    {"final_sigmas_type": "sigma_min", "solver_type": "heun"},
    {"final_sigmas_type": "sigma_min", "euler_at_final": True, "lower_order_final": False, "solver_type": "heun"},
    {"final_sigmas_type": "sigma_min", "use_karras_sigmas": True}], ids=str)
def test_sde_second_order_level2_is_level1(config):
    level2_is_level1(
        "DPMSolverMultistepScheduler", dict(config, algorithm_type="sde-dpmsolver++", solver_order=2))
