"""k-diffusion-style samplers on the fused step (``math-samplers.md`` sections 2, 3, 6, 7).

Every sampler has k-diffusion's signature ``sample_<name>(model, x, sigmas, extra_args=None,
callback=None, disable=None, **knobs)`` with ``model(x, sigma_batch, **extra_args) -> denoised``,
``x`` already scaled by ``sigmas[0]`` and ``sigmas`` decreasing (length N+1, usually ending in 0).

How a call runs: the branches (first step, last step to 0, churn window, eta) are resolved on the
host copy of the float64 schedule into a coefficient table (:mod:`diffkern.coef_tables`), moved to
the device once; then each step is one model call and one :func:`diffkern.ops.sampler_step` that
updates ``x`` (and one or two history buffers for multistep samplers) in place. Nothing in the loop reads a
device value on the host: the model's sigma is a device scalar ``sig_dev[row].expand(B)`` and the
noise is the counter-based Philox stream keyed by a seed tensor in device memory.

Common knobs: ``seed`` (int, or int64 tensor (1,)/(B,); None draws one from torch's global CPU
generator, so ``torch.manual_seed`` makes k-diffusion-style calls reproducible), ``backend``
(``diffkern.ops`` backend name; None: ``DIFFKERN_BACKEND`` then auto), ``trajectory``
(a :class:`Trajectory` to fill, see :func:`diffkern.sample`), ``window`` (None, or ``(begin, total)``: the N steps
are steps ``begin .. begin + N - 1`` of a ``total``-step loop and draw its Philox noise there, same coefficients:
:func:`diffkern.sampler_loop.windowed`; None and ``(0, N)`` are the loop on its own).
"""
from __future__ import annotations

import math

import torch

from . import coef_tables_dpm_fast as _dpm_fast
from . import sampler_plans as _plans
from . import samplers_adaptive as _adaptive
from .sampler_compat import DpmFastReport
from .sampler_loop import (Trajectory, _check_output, _is_fused, _Loop, _run, check_call, check_state,  # noqa: F401
                           conversion_rows, host_sigmas, make_seed, run_noisy, run_steps, seed_value)
from .samplers_adaptive import sample_dpm_adaptive  # noqa: F401  (k-diffusion's signature, beside sample_dpm_fast)
from .samplers_comfy import (sample_er_sde, sample_gradient_estimation, sample_res_multistep,  # noqa: F401
                             sample_res_multistep_ancestral, sample_sa_solver)
from .samplers_cfgpp import (sample_dpmpp_2m_cfg_pp, sample_dpmpp_2s_ancestral_cfg_pp,  # noqa: F401  (CFG++: not
                              sample_euler_ancestral_cfg_pp, sample_euler_cfg_pp)  # noqa: F401  diffkern.sample names)

#----------------------------------------------------------------------------
# Public samplers.


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=math.inf, s_noise=1.0, *, seed=None, backend=None, trajectory=None, window=None):
    """Euler on the PF-ODE ``dx/dsigma = (x - D)/sigma`` (= deterministic DDIM), with Karras et al.
    (2022) Algorithm 2 churn. x: (B, ...) float; returns the final state in x's dtype."""
    loop = _Loop(model, x, sigmas, extra_args, callback, disable, seed, backend, trajectory, window=window,
                 method="euler")
    plan = _plans._plan_euler(loop.sigmas, loop.conv, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
                              s_noise=s_noise)
    return _run(loop, plan)


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                           s_noise=1.0, noise_sampler=None, *, clip_denoised=math.inf, clipped_eps=True, split="ve",
                           seed=None, backend=None, trajectory=None, window=None):
    """Euler-ancestral (= DDIM(eta) in VE coordinates; eta = 1 is the DDPM posterior step). ``noise_sampler``: None
    (Philox noise keyed by ``seed``) or k-diffusion's ``noise_sampler(sigma, sigma_next)``
    (:mod:`diffkern.sampler_compat`), as in every sampler that takes one. ``clip_denoised``: D clamped to
    [-clip_denoised, clip_denoised] (inf: none), diffusers' clipped x0 of DDPM and DDIM; ``clipped_eps`` False:
    the step's direction ``(x - D)/sigma`` keeps the unclipped D (DDIM without use_clipped_model_output).
    ``split``: the ancestral split, "ve" (k-diffusion's, in sigma) or "rf" (ComfyUI's ``_RF`` variant, which
    ComfyUI runs for a flow (CONST) model; :mod:`diffkern.coef_tables_flow`). sigma is always diffkern's VE sigma and x
    the VE state: for a flow model ``x = z/(1 - t)`` at ``sigma = t/(1 - t)``, where ComfyUI's flow sigma is t and its
    state ``z = (1 - t) x0 + t eps`` (:class:`~diffkern.wrappers.FlowDenoiser`); "rf" splits in t = sigma/(1 + sigma),
    and on a schedule ending at 0 returns ComfyUI's z. At eta = 0 both are the deterministic step. "rf" refuses an eta
    > 1 that puts t_down <= 0. x: (B, ...) float; returns the final state in x's dtype."""
    loop = _Loop(model, x, sigmas, extra_args, callback, disable, seed, backend, trajectory, window=window,
                 method="euler_ancestral", noise_sampler=noise_sampler)
    plan = _plans._plan_euler_ancestral(loop.sigmas, loop.conv, eta=eta, s_noise=s_noise, clip_denoised=clip_denoised,
                                        clipped_eps=clipped_eps, split=split)
    return _run(loop, plan) if split == "rf" and eta == 0 else run_noisy(loop, plan)  # ComfyUI's _RF: no draw at 0


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                s_tmax=math.inf, s_noise=1.0, *, seed=None, backend=None, trajectory=None, window=None):
    """Heun's second-order method, Karras et al. (2022) Algorithm 2 (2 model calls per step but the last)."""
    loop = _Loop(model, x, sigmas, extra_args, callback, disable, seed, backend, trajectory, window=window,
                 method="heun")
    plan = _plans._plan_heun(loop.sigmas, loop.conv, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
                             s_noise=s_noise)
    return _run(loop, plan)


@torch.no_grad()
def sample_heun_flow(model, x, sigmas, extra_args=None, callback=None, disable=None, *, seed=None, backend=None,
                     trajectory=None, window=None):
    """Heun's method in flow time t = sigma/(1 + sigma) (diffusers' ``FlowMatchHeunDiscreteScheduler`` without
    churn; :mod:`diffkern.coef_tables_flow`): Euler to sigma_next, then the average of the flow velocities
    ``v = (x/(1 + sigma) - D)/t`` at both ends (2 model calls per step but the last, which is Euler to 0). Unlike
    ``heun`` (EDM, the average of VE slopes) it is the flow-matching integrator. x: (B, ...) float, the VE state;
    sigmas: (N+1,) decreasing; returns the final state in x's dtype."""
    loop = _Loop(model, x, sigmas, extra_args, callback, disable, seed, backend, trajectory, window=window,
                 method="heun_flow")
    return _run(loop, _plans._plan_heun_flow(loop.sigmas, loop.conv))


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=math.inf, s_noise=1.0, *, seed=None, backend=None, trajectory=None, window=None):
    """k-diffusion's DPM-Solver-2 (KDPM2): Euler to the log-midpoint sigma, then the full step with the
    midpoint's slope, with EDM churn (2 model calls per step but the last, which is Euler to 0)."""
    loop = _Loop(model, x, sigmas, extra_args, callback, disable, seed, backend, trajectory, window=window,
                 method="dpm_2")
    plan = _plans._plan_dpm_2(loop.sigmas, loop.conv, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
                              s_noise=s_noise)
    return _run(loop, plan)


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                           s_noise=1.0, noise_sampler=None, *, split="ve", seed=None, backend=None, trajectory=None,
                           window=None):
    """k-diffusion's DPM-Solver-2 ancestral: the DPM-Solver-2 step to sigma_down, then s_noise*sigma_up noise.
    ``split``: "ve" (k-diffusion's) or "rf" (ComfyUI's ``sample_dpm_2_ancestral_RF``: its split, and the DPM-Solver-2
    step in flow time t = sigma/(1 + sigma), midpoint geometric in t, slope the flow velocity), sigma and x in VE
    coordinates as :func:`sample_euler_ancestral`'s.
    x: (B, ...) float; returns the final state in x's dtype."""
    loop = _Loop(model, x, sigmas, extra_args, callback, disable, seed, backend, trajectory, window=window,
                 method="dpm_2_ancestral", noise_sampler=noise_sampler)
    return run_noisy(loop, _plans._plan_dpm_2_ancestral(loop.sigmas, loop.conv, eta=eta, s_noise=s_noise, split=split))


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                              s_noise=1.0, noise_sampler=None, *, split="ve", seed=None, backend=None, trajectory=None,
                              window=None):
    """DPM-Solver++(2S) ancestral (k-diffusion's ``sample_dpmpp_2s_ancestral``): the single-step second-order
    DPM-Solver++ to sigma_down (intermediate call at its log-midpoint), then s_noise*sigma_up noise.
    ``split``: "ve" (k-diffusion's) or "rf" (ComfyUI's ``sample_dpmpp_2s_ancestral_RF``: its split, the second call
    at t = 0.9999 on a step from t = sigma/(1 + sigma) = 1), sigma and x in VE coordinates as
    :func:`sample_euler_ancestral`'s.
    x: (B, ...) float; returns the final state in x's dtype."""
    loop = _Loop(model, x, sigmas, extra_args, callback, disable, seed, backend, trajectory, window=window,
                 method="dpmpp_2s_ancestral", noise_sampler=noise_sampler)
    plan = _plans._plan_dpmpp_2s_ancestral(loop.sigmas, loop.conv, eta=eta, s_noise=s_noise, split=split)
    return _run(loop, plan) if split == "rf" and eta == 0 else run_noisy(loop, plan)  # ComfyUI's _RF: no draw at 0


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, *, seed=None, backend=None,
                    trajectory=None, window=None):
    """DPM-Solver++(2M), Lu et al. (2022), multistep on the previous denoised estimate."""
    loop = _Loop(model, x, sigmas, extra_args, callback, disable, seed, backend, trajectory, window=window,
                 method="dpmpp_2m")
    return _run(loop, _plans._plan_dpmpp_2m(loop.sigmas, loop.conv))


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        noise_sampler=None, solver_type="midpoint", *, seed=None, backend=None, trajectory=None,
                        window=None):
    """DPM-Solver++(2M) SDE (k-diffusion's ``sample_dpmpp_2m_sde``), noise from the Philox stream (k-diffusion
    draws it from a Brownian tree): eta scales the injected noise (eta = 0: DPM-Solver++(2M)), ``solver_type``
    "midpoint" or "heun" the second-order correction."""
    loop = _Loop(model, x, sigmas, extra_args, callback, disable, seed, backend, trajectory, window=window,
                 method="dpmpp_2m_sde", noise_sampler=noise_sampler)
    return run_noisy(loop, _plans._plan_dpmpp_2m_sde(loop.sigmas, loop.conv, eta=eta, s_noise=s_noise,
                                                  solver_type=solver_type), eta)


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        noise_sampler=None, *, seed=None, backend=None, trajectory=None, window=None):
    """DPM-Solver++(3M) SDE (k-diffusion's ``sample_dpmpp_3m_sde``), noise from the Philox stream (k-diffusion draws
    it from a Brownian tree): third-order multistep on the two previous denoised estimates (two history buffers
    that swap roles, no copies); eta = 0 is the deterministic DPM-Solver++(3M)."""
    loop = _Loop(model, x, sigmas, extra_args, callback, disable, seed, backend, trajectory, window=window,
                 method="dpmpp_3m_sde", noise_sampler=noise_sampler)
    return run_noisy(loop, _plans._plan_dpmpp_3m_sde(loop.sigmas, loop.conv, eta=eta, s_noise=s_noise), eta)


@torch.no_grad()
def sample_dpmsolver_3m(model, x, sigmas, extra_args=None, callback=None, disable=None, *, eta=0.0, solver_order=3,
                        solver_type="midpoint", lower_order_final=True, euler_at_final=False, seed=None, backend=None,
                        trajectory=None, window=None):
    """diffusers' ``DPMSolverMultistepScheduler`` (:func:`~diffkern.coef_tables_3m.dpmsolver_multistep`, its
    lower-order rules included; ``solver_order`` 1-3, default 3): eta = 0 "dpmsolver++", 1 "sde-dpmsolver++"
    (Philox noise)."""
    loop = _Loop(model, x, sigmas, extra_args, callback, disable, seed, backend, trajectory, window=window,
                 method="dpmsolver_3m")
    return _run(loop, _plans._plan_dpmsolver_3m(loop.sigmas, loop.conv, eta=eta, solver_order=solver_order,
                                                solver_type=solver_type, lower_order_final=lower_order_final,
                                                euler_at_final=euler_at_final))


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                     noise_sampler=None, r=0.5, *, seed=None, backend=None, trajectory=None, window=None):
    """DPM-Solver++ stochastic (k-diffusion's ``sample_dpmpp_sde``): two calls per step, the second at
    sigma*(sigma_next/sigma)^r, ancestral noise on both; its two noises per step have the joint law of
    k-diffusion's Brownian-tree draws (built from two Philox draws, :mod:`diffkern.coef_tables_dpmpp_sde`). A
    ``noise_sampler`` is called twice per step, at (sigma, sigma_s) and (sigma, sigma_next), as k-diffusion's."""
    loop = _Loop(model, x, sigmas, extra_args, callback, disable, seed, backend, trajectory, window=window,
                 method="dpmpp_sde", noise_sampler=noise_sampler)
    return run_noisy(loop, _plans._plan_dpmpp_sde(loop.sigmas, loop.conv, eta=eta, s_noise=s_noise, r=r,
                                               explicit_noise=noise_sampler is not None))


@torch.no_grad()
def sample_ge(model, x, sigmas, extra_args=None, callback=None, disable=None, *, gamma=2.0, mu=0.0,
              clip_denoised=math.inf, seed=None, backend=None, trajectory=None, window=None):
    """Permenter & Yuan (2024) gradient-estimation family: gamma=2, mu=0 their sampler; gamma=1, mu=0 DDIM;
    gamma=1, mu=0.5 DDPM (smalldiffusion's ``samples(gam, mu)``). ``clip_denoised``: D (and so the eps it
    gives) clamped to [-clip_denoised, clip_denoised] (inf: none), as GEScheduler's clip_sample."""
    loop = _Loop(model, x, sigmas, extra_args, callback, disable, seed, backend, trajectory, window=window,
                 method="ge")
    return _run(loop, _plans._plan_ge(loop.sigmas, loop.conv, gamma=gamma, mu=mu, clip_denoised=clip_denoised))


@torch.no_grad()
def sample_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, *, lam=1.0, integrator="exponential",
               seed=None, backend=None, trajectory=None, window=None):
    """McAllester's reverse-SDE family at noise level lam (lam = 0: the PF-ODE, lam = 1: Anderson's
    reverse SDE); integrator "exponential" (exact linear part) or "euler_maruyama"."""
    loop = _Loop(model, x, sigmas, extra_args, callback, disable, seed, backend, trajectory, window=window,
                 method="sde")
    return _run(loop, _plans._plan_sde(loop.sigmas, loop.conv, lam=lam, integrator=integrator))


@torch.no_grad()
def sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, s_noise=1.0,
               s_noise_end=None, *, seed=None, backend=None, trajectory=None, window=None):
    """Latent consistency multistep sampling (Luo et al. 2023; k-diffusion's and ComfyUI's ``sample_lcm``): each
    step jumps to the model's denoised estimate and re-noises it to the next sigma, ``x' = D + s_i*sigma_next*xi``
    (the step to sigma = 0 returns D), ``s_i`` going linearly from ``s_noise`` at step 0 to ``s_noise_end`` (None:
    ``s_noise``) at step N - 1, as ComfyUI's; its settings positional in ComfyUI's order (no ``noise_clip_std``).
    For a consistency model D is its consistency function (boundary condition included). x: (B, ...) float;
    returns the final state in x's dtype."""
    loop = _Loop(model, x, sigmas, extra_args, callback, disable, seed, backend, trajectory, window=window,
                 method="lcm", noise_sampler=noise_sampler)
    return run_noisy(loop, _plans._plan_lcm(loop.sigmas, loop.conv, s_noise=s_noise, s_noise_end=s_noise_end))


@torch.no_grad()
def sample_unipc(model, x, sigmas, extra_args=None, callback=None, disable=None, *, order=2, solver_type="bh2",
                 lower_order_final=True, disable_corrector=(), predict_x0=True, seed=None, backend=None,
                 trajectory=None, window=None):
    """UniPC (Zhao et al. 2023) as diffusers' ``UniPCMultistepScheduler`` runs it (:mod:`diffkern.coef_tables_unipc`):
    UniP-``order`` (1 to 3) predictor, UniC corrector folded into the next step's row (none after the last call, nor
    on steps i with i - 1 in ``disable_corrector``); ``solver_type`` "bh1"/"bh2"; ``predict_x0`` False: noise form.
    A final step to 0 is the jump to the denoised estimate (its noise-form limit with ``predict_x0=False``)."""
    loop = _Loop(model, x, sigmas, extra_args, callback, disable, seed, backend, trajectory, window=window,
                 method="unipc")
    return _run(loop, _plans._plan_unipc(loop.sigmas, loop.conv, order=order, solver_type=solver_type,
                                         lower_order_final=lower_order_final, disable_corrector=disable_corrector,
                                         predict_x0=predict_x0))


@torch.no_grad()
def sample_deis(model, x, sigmas, extra_args=None, callback=None, disable=None, order=3, *, lower_order_final=True,
                seed=None, backend=None, trajectory=None, window=None):
    """DEIS (Zhang & Chen 2023, "logrho" multistep) as diffusers' ``DEISMultistepScheduler`` runs it
    (:mod:`diffkern.coef_tables_deis`): each step integrates the PF-ODE exactly over the polynomial in log sigma
    through this and the ``order - 1`` previous noise estimates (two history buffers at order 3). ``order`` 1, 2 or 3;
    diffusers' lowering: first order on the first step, at most second on the second, and with
    ``lower_order_final`` below 15 steps first and second order on the last two. x: (B, ...) float; returns the
    final state in x's dtype. A final step to 0 is the jump to the denoised estimate. Not ComfyUI's ``deis``
    (``max_order``, ``deis_mode``): that is zju-pi's tAB-DEIS, a polynomial in the time of a VP schedule fitted to
    EDM's sigma range, another method; hence no ``max_order`` alias, and ``deis_mode`` is refused."""
    loop = _Loop(model, x, sigmas, extra_args, callback, disable, seed, backend, trajectory, window=window,
                 method="deis")
    return _run(loop, _plans._plan_deis(loop.sigmas, loop.conv, order=order, lower_order_final=lower_order_final))


@torch.no_grad()
def sample_plms(model, x, sigmas, extra_args=None, callback=None, disable=None, *, seed=None, backend=None,
                trajectory=None, window=None):
    """PLMS, PNDM's pseudo linear multistep method (Liu et al. 2022), as diffusers' ``PNDMScheduler`` with
    ``skip_prk_steps=True`` runs it (:mod:`diffkern.coef_tables_plms`): Euler in eps = (x - D)/sigma with eps
    extrapolated by Adams-Bashforth (equal-step weights, order up to 4) over the three previous steps' eps (three
    history buffers); the first step is Heun's (2 model calls). x: (B, ...) float; returns the final state in x's
    dtype."""
    loop = _Loop(model, x, sigmas, extra_args, callback, disable, seed, backend, trajectory, window=window,
                 method="plms")
    return _run(loop, _plans._plan_plms(loop.sigmas, loop.conv))


@torch.no_grad()
def sample_ipndm(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4, *, seed=None,
                 backend=None, trajectory=None, window=None):
    """iPNDM (Zhang & Chen 2023; ComfyUI's ``ipndm``): Euler in eps = (x - D)/sigma with eps extrapolated by
    Adams-Bashforth of equal-step weights, of order min(i + 1, ``max_order``) at step i (1 to 4): PLMS without its
    Heun start, one model call per step, up to three history buffers. x: (B, ...) float; returns the final state in
    x's dtype. A final step to 0 is the jump to the denoised estimate, as ComfyUI."""
    loop = _Loop(model, x, sigmas, extra_args, callback, disable, seed, backend, trajectory, window=window,
                 method="ipndm")
    return _run(loop, _plans._plan_ipndm(loop.sigmas, loop.conv, max_order=max_order))


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4, *, seed=None, backend=None,
               trajectory=None, window=None):
    """Linear multistep, k-diffusion's ``sample_lms`` and diffusers' ``LMSDiscreteScheduler``
    (:mod:`diffkern.coef_tables_lms`): each step integrates dx/dsigma = (x - D)/sigma exactly over the polynomial in
    sigma through this and the ``order - 1`` previous slopes (``order`` 1 to 4; the first steps have fewer; up to three
    history buffers). x: (B, ...) float; returns the final state in x's dtype. A final step to 0 is the same formula
    (no jump)."""
    loop = _Loop(model, x, sigmas, extra_args, callback, disable, seed, backend, trajectory, window=window,
                 method="lms")
    return _run(loop, _plans._plan_lms(loop.sigmas, loop.conv, order=order))


@torch.no_grad()
def sample_dpmsolver_single(model, x, sigmas, extra_args=None, callback=None, disable=None, *, order=2,
                            solver_type="midpoint", lower_order_final=True, predict_x0=True, orders=None, seed=None,
                            backend=None, trajectory=None, window=None):
    """Singlestep DPM-Solver++ (``predict_x0``) or DPM-Solver as diffusers' ``DPMSolverSinglestepScheduler`` runs it
    (:mod:`diffkern.coef_tables_singlestep`): groups of 1 to ``order`` model calls, each call of a group updating from
    the group's first state ("midpoint"/"heun" at orders 2-3), one fused op per call (two history buffers at order 3).
    Groups as diffusers' ``get_order_list`` (``lower_order_final``: a shorter last group; a step to 0 first order), or
    the explicit per-step ``orders``. x: (B, ...) float; returns the final state in x's dtype."""
    loop = _Loop(model, x, sigmas, extra_args, callback, disable, seed, backend, trajectory, window=window,
                 method="dpmsolver_single")
    return _run(loop, _plans._plan_dpmsolver_single(loop.sigmas, loop.conv, order=order, solver_type=solver_type,
                                                    lower_order_final=lower_order_final, predict_x0=predict_x0,
                                                    orders=orders))


@torch.no_grad()
def sample_ipndm_v(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4, *, seed=None,
                   backend=None, trajectory=None, window=None):
    """iPNDM-v (ComfyUI's ``ipndm_v``, from zju-pi's diff-sampler): :func:`sample_ipndm` with its Adams-Bashforth
    weights recomputed from the schedule's own steps (:func:`~diffkern.coef_tables_plms.ipndm_v_weights`: exact
    variable-step AB2; at orders 3 and 4 ComfyUI's formula, exact on equal steps only). A final step to 0 is the jump
    to the denoised estimate, as ComfyUI. x: (B, ...) float; returns the final state in x's dtype."""
    loop = _Loop(model, x, sigmas, extra_args, callback, disable, seed, backend, trajectory, window=window,
                 method="ipndm_v")
    return _run(loop, _plans._plan_ipndm_v(loop.sigmas, loop.conv, max_order=max_order))


@torch.no_grad()
def sample_dpm_fast_sigmas(model, x, sigmas, extra_args=None, callback=None, disable=None, *, eta=0.0, s_noise=1.0,
                           noise_sampler=None, seed=None, backend=None, trajectory=None, window=None):
    """DPM-Solver-fast on a schedule, as ComfyUI's ``dpm_fast`` calls k-diffusion's (``diffkern.sample``'s
    "dpm_fast"): N = len(sigmas) - 1 model calls from sigmas[0] to the last non-zero sigma, on k-diffusion's own grid
    (:mod:`diffkern.coef_tables_dpm_fast`; the other sigmas are not used). It ends at that sigma, with no jump to 0.
    ``eta`` > 0: k-diffusion's ancestral variant (Philox noise, or ``noise_sampler`` once per grid step). The callback
    and the noise_sampler get what k-diffusion's ``sample_dpm_fast`` hands them (:class:`~diffkern.sampler_compat.
    DpmFastReport`): the callback once per step of the grid, after its first model call (``x`` the step's start,
    ``i`` the grid step, ``sigma``, ``sigma_hat``, ``t``, ``t_up``, ``denoised``), the sigmas 0-d tensors on x's
    device in the default dtype whatever the schedule's. x: (B, ...) float; returns the final state in x's dtype."""
    loop = _Loop(model, x, sigmas, extra_args, callback, disable, seed, backend, trajectory, window=window,
                 method="dpm_fast", noise_sampler=noise_sampler)
    return _run_dpm_fast(loop, eta, s_noise)


def _run_dpm_fast(loop, eta: float, s_noise: float) -> torch.Tensor:
    """:func:`sample_dpm_fast_sigmas`' loop on ``loop.sigmas``: its plan, its noise_sampler's calls and what it
    reports (k-diffusion's grid)."""
    plan = _plans._plan_dpm_fast(loop.sigmas, loop.conv, eta=eta, s_noise=s_noise)
    loop.report = DpmFastReport(loop.sigmas, loop.x)
    return run_noisy(loop, plan)


@torch.no_grad()
def sample_dpm_fast(model, x, sigma_min, sigma_max, n, extra_args=None, callback=None, disable=None, eta=0.0,
                    s_noise=1.0, noise_sampler=None, *, seed=None, backend=None, trajectory=None, window=None):
    """k-diffusion's ``sample_dpm_fast`` signature (``noise_sampler`` None: Philox noise): ``n`` model calls (an int
    >= 1) from sigma_max down to sigma_min (numbers or one-element tensors, 0 < sigma_min < sigma_max), as
    :func:`sample_dpm_fast_sigmas` on the log-linear schedule of n + 1 sigmas between them. ``trajectory``: n steps;
    ``window``: of the n calls. The callback (once per step of k-diffusion's grid) and the noise_sampler get
    k-diffusion's values: 0-d tensors on x's device in the default dtype (its grid is ``torch.linspace(t_start, t_end,
    m + 1, device=x.device)``, whatever the limits' dtype or device), diffkern's float64 values rounded once
    (k-diffusion's own are computed in that dtype, so they may differ from these in the last place; the steps
    themselves use the float64 values; :class:`~diffkern.sampler_compat.DpmFastReport`)."""
    _dpm_fast.orders(n)  # checks n
    sigmas = _dpm_fast.grid(*_dpm_fast.check_range(sigma_min, sigma_max), int(n))
    loop = _Loop(model, x, sigmas, extra_args, callback, disable, seed, backend, trajectory, window=window,
                 method="dpm_fast", noise_sampler=noise_sampler)
    return _run_dpm_fast(loop, eta, s_noise)


SAMPLERS = {"euler": sample_euler, "euler_ancestral": sample_euler_ancestral, "heun": sample_heun,
            "dpm_2": sample_dpm_2, "dpm_2_ancestral": sample_dpm_2_ancestral,
            "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral, "dpmpp_2m": sample_dpmpp_2m,
            "dpmpp_2m_sde": sample_dpmpp_2m_sde, "dpmpp_3m_sde": sample_dpmpp_3m_sde,
            "dpmsolver_3m": sample_dpmsolver_3m, "dpmpp_sde": sample_dpmpp_sde,
            "lcm": sample_lcm, "ge": sample_ge, "sde": sample_sde, "unipc": sample_unipc,
            "deis": sample_deis, "plms": sample_plms, "ipndm": sample_ipndm, "lms": sample_lms,
            "dpmsolver_single": sample_dpmsolver_single, "ipndm_v": sample_ipndm_v, "dpm_fast": sample_dpm_fast_sigmas,
            "res_multistep": sample_res_multistep, "res_multistep_ancestral": sample_res_multistep_ancestral,
            "er_sde": sample_er_sde, "sa_solver": sample_sa_solver, "heun_flow": sample_heun_flow,
            "dpm_adaptive": _adaptive.sample_dpm_adaptive_sigmas}
