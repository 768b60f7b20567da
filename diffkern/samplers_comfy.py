"""ComfyUI's and diffusers' further samplers on the fused step: RES multistep (and its ancestral form), ER-SDE,
SA-Solver and ComfyUI's gradient estimation, with :mod:`diffkern.samplers`' signature and common knobs (``seed``,
``backend``, ``trajectory``, ``window``); the settings ComfyUI passes positionally come in its order. Re-exported by
:mod:`diffkern.samplers`."""
from __future__ import annotations

import math

import torch

from . import sampler_plans as _plans
from . import samplers_cfgpp as _cfgpp
from .sampler_loop import _Loop, _run, run_noisy


@torch.no_grad()
def sample_res_multistep(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.0,
                         noise_sampler=None, *, eta=0.0, seed=None, backend=None, trajectory=None, window=None):
    """RES multistep (ComfyUI's ``res_multistep``; :mod:`diffkern.coef_tables_res`): the second-order multistep
    exponential integrator in D, one model call per step, history = the previous D; ``eta`` > 0 takes k-diffusion's
    ancestral split (Philox noise, or ``noise_sampler`` called on every step to sigma_next > 0 as ComfyUI's, eta = 0
    too). Positional settings in ComfyUI's order. x: (B, ...) float; returns the final state in x's dtype."""
    loop = _Loop(model, x, sigmas, extra_args, callback, disable, seed, backend, trajectory, window=window,
                 method="res_multistep", noise_sampler=noise_sampler)
    return run_noisy(loop, _plans._plan_res_multistep(loop.sigmas, loop.conv, eta=eta, s_noise=s_noise))


@torch.no_grad()
def sample_res_multistep_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                                   s_noise=1.0, noise_sampler=None, *, seed=None, backend=None, trajectory=None,
                                   window=None):
    """ComfyUI's ``res_multistep_ancestral``: :func:`sample_res_multistep` with ``eta=1`` by default. x: (B, ...)
    float; returns the final state in x's dtype."""
    return sample_res_multistep(model, x, sigmas, extra_args, callback, disable, s_noise, noise_sampler, eta=eta,
                                seed=seed, backend=backend, trajectory=trajectory, window=window)


@torch.no_grad()
def sample_er_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.0, noise_sampler=None,
                  noise_scaler=None, max_stage=3, *, seed=None, backend=None, trajectory=None, window=None):
    """ER-SDE-Solver-3 (Cui et al. 2023; ComfyUI's ``er_sde``, its default noise scaler;
    :mod:`diffkern.coef_tables_er_sde`): one model call per step, stages (orders) up to ``max_stage`` (1-3) from the previous two D, Philox noise scaled
    by ``s_noise`` (or ``noise_sampler``, called where ComfyUI's is: steps to sigma_next > 0 when s_noise > 0);
    ``noise_scaler`` None (ComfyUI's default) or ComfyUI's ``noise_scaler(lambda_tensor) -> tensor``, evaluated on
    float64 CPU tensors. Positional settings in ComfyUI's order. x: (B, ...) float; returns the final state in x's
    dtype."""
    loop = _Loop(model, x, sigmas, extra_args, callback, disable, seed, backend, trajectory, window=window,
                 method="er_sde", noise_sampler=noise_sampler)
    return run_noisy(loop, _plans._plan_er_sde(loop.sigmas, loop.conv, s_noise=s_noise, noise_scaler=noise_scaler,
                                            max_stage=max_stage), s_noise)


@torch.no_grad()
def sample_sa_solver(model, x, sigmas, extra_args=None, callback=None, disable=None, *, predictor_order=2,
                     corrector_order=2, tau=1.0, predict_x0=True, lower_order_final=True, seed=None, backend=None,
                     trajectory=None, window=None):
    """SA-Solver (Xue et al. 2023) as diffusers' ``SASolverScheduler`` runs it (:mod:`diffkern.coef_tables_sasolver`):
    stochastic Adams predictor (orders 1-3) and corrector (orders 1-4) with diffusers' warm-up and
    ``lower_order_final``, the corrector folded into the next step's row (one model call per step); ``tau`` the
    stochasticity, a number or one per step (0: the ODE); data (``predict_x0``) or noise prediction; Philox noise.
    x: (B, ...) float; returns the final state in x's dtype."""
    loop = _Loop(model, x, sigmas, extra_args, callback, disable, seed, backend, trajectory, window=window,
                 method="sa_solver")
    return _run(loop, _plans._plan_sa_solver(loop.sigmas, loop.conv, predictor_order=predictor_order,
                                             corrector_order=corrector_order, tau=tau, predict_x0=predict_x0,
                                             lower_order_final=lower_order_final))


@torch.no_grad()
def sample_gradient_estimation(model, x, sigmas, extra_args=None, callback=None, disable=None, ge_gamma=2.0,
                               cfg_pp=False, *, seed=None, backend=None, trajectory=None, window=None):
    """ComfyUI's ``gradient_estimation`` (Permenter & Yuan 2024): ``x' = x + dt*(ge_gamma*d + (1 - ge_gamma)*d_prev)``
    with d = (x - D)/sigma, dt = sigma_next - sigma, Euler on the first step, the jump x' = D on a step to 0; the same
    method as ``ge(gamma=ge_gamma, mu=0)``, whose fused plan it runs (one model call per step, history = previous d).
    ``cfg_pp=True`` (CFG++, a guided :mod:`diffkern.wrappers` wrapper only): d = (x - D_u)/sigma along the
    unconditional prediction, ``x' = D + sigma_next d + (ge_gamma - 1)(d - d_prev) dt``, as ComfyUI's
    (:func:`diffkern.samplers_cfgpp.ge_cfg_pp_plan`; history = previous unconditional d).
    x: (B, ...) float; returns the final state in x's dtype."""
    if not isinstance(cfg_pp, bool):
        raise TypeError(f"cfg_pp: expected a bool, got {cfg_pp!r}")
    gamma = _plans._knob(ge_gamma, "ge_gamma", -math.inf)
    if cfg_pp:
        loop = _cfgpp.cfg_pp_loop(model, x, sigmas, extra_args, callback, disable, seed, backend, trajectory,
                                  window=window, method="ge")
        if gamma == 1.0:  # Euler CFG++ (at guidance 1 without an unconditional batch, bitwise the plain Euler)
            return _cfgpp.run_cfg_pp(loop, 0.0, 0.0, False)
        return _run(loop, _cfgpp.ge_cfg_pp_plan(loop.sigmas, loop.conv, gamma=gamma))
    # method "ge": its checks (a repeated sigma is a step it takes, as ComfyUI's loop) and its name in errors
    loop = _Loop(model, x, sigmas, extra_args, callback, disable, seed, backend, trajectory, window=window,
                 method="ge")
    return _run(loop, _plans._plan_ge(loop.sigmas, loop.conv, gamma=gamma, mu=0.0))
