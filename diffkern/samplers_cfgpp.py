"""CFG++ (Chung et al. 2024) on the fused step: ComfyUI's ``euler_cfg_pp``, ``euler_ancestral_cfg_pp``,
``dpmpp_2m_cfg_pp``, ``dpmpp_2s_ancestral_cfg_pp`` and ``gradient_estimation`` with ``cfg_pp``, with ComfyUI's names
and positional order and :mod:`diffkern.samplers`' common knobs (``seed``, ``backend``, ``trajectory``, ``window``).
Re-exported by :mod:`diffkern.samplers`.

CFG++ takes the guided denoised estimate ``D_cfg = D_u + w (D_c - D_u)`` for the step's target and the unconditional
``D_u`` for its direction, e.g. Euler: ``x' = D_cfg + sigma_next (x - D_u)/sigma`` (VE coordinates, which is also
ComfyUI's alpha-scaled form for a flow model run through :class:`diffkern.wrappers.FlowDenoiser`). The fused op's
bu and fu slots (:mod:`diffkern.ops.coefs`) add ``bu*D_u`` to the update and ``fu*D_u`` to the history, D_u being
the row's conversion of the wrapper's unconditional output, so every sampler here is rows of the one op, in every
backend; the op's own denoised output (callback, trajectory) is D_cfg, as ComfyUI's callback gets. With r the
step's sigma ratio:

* Euler (ancestral) CFG++: ``a = r, b = 1, bu = -r`` (r = sigma_down/sigma), ``s = s_noise*sigma_up``.
* DPM++ 2M CFG++: ``a = r, b = 1 + k, bu = -r, c = -k`` with k = (1 - r)/(2 rho), rho = h_last/h (k = 0 on the first
  step and the step to 0); history D_u (``fu = 1``).
* Gradient estimation CFG++: ``a = (sigma_next + (gamma - 1) dt)/sigma, b = 1, bu = -a, c = -(gamma - 1) dt``,
  dt = sigma_next - sigma (gamma = 1 on the first step); history the unconditional slope (x - D_u)/sigma
  (``e = 1/sigma, fu = -1/sigma``); the step to 0 is the jump x' = D_cfg.
* DPM++ 2S ancestral CFG++: first call ``x2 = r_mid (x + D - D_u) + (1 - r_mid) D`` (``a = r_mid, b = 1,
  bu = -r_mid``) writing the history ``H = x + D - D_u`` (``e = 1, f = 1, fu = -1``); second call at sigma_mid
  ``x' = r H + (1 - r) D_2 + s_noise sigma_up xi`` (``a = 0, b = 1 - r, c = r``; ComfyUI steps the second call along
  its guided D_2). r_mid = sigma_mid/sigma, sigma_mid = sqrt(sigma sigma_down), r = sigma_down/sigma.
"""
from __future__ import annotations

import math

import torch

from . import coef_tables
from . import sampler_compat
from . import sampler_plans as _plans
from .ops import coefs
from .sampler_loop import _is_fused, _Loop, _run

_UNCOND_WHY = ("CFG++ steps along the unconditional denoised prediction, which a model(x, sigma) -> denoised does not "
               "expose; pass a diffkern.wrappers wrapper with guidance_scale and uncond_<name> extra args")


def check_guided(model, extra: dict) -> float:
    """The guidance scale w of the fused wrapper ``model``; raises TypeError naming ``model`` for a plain model, and
    ValueError naming ``extra_args`` when w = 1 comes with ``uncond_<name>`` args (the wrapper then runs no
    unconditional batch, while ComfyUI's CFG++ at cfg 1 still steps along the unconditional prediction). At w = 1
    without them there is one prediction, D_u = D_c, and CFG++ is the plain sampler."""
    if not _is_fused(model):
        raise TypeError(f"model: expected a diffkern.wrappers wrapper, got {type(model).__name__}; {_UNCOND_WHY}")
    w = 1.0 if model.guidance_scale is None else float(model.guidance_scale)
    uncond = sorted(k for k in extra if k.startswith("uncond_"))
    if w == 1.0 and uncond:
        raise ValueError(f"extra_args: {uncond[0]} given with guidance_scale 1, where the wrapper runs no "
                         "unconditional batch, but CFG++ steps along the unconditional prediction at any scale; set "
                         "the wrapper's guidance_scale != 1, or drop the uncond_ args (CFG++ is then the plain sampler)")
    return w


def cfg_pp_loop(model, x, sigmas, extra_args, callback, disable, seed, backend, trajectory, *, window, method,
                noise_sampler=None) -> _Loop:
    """The sampling loop of a CFG++ sampler: a fused guided wrapper only (:func:`check_guided`); the loop's guidance
    scale is kept as ``loop.w``."""
    loop = _Loop(model, x, sigmas, extra_args, callback, disable, seed, backend, trajectory, window=window,
                 method=method, noise_sampler=noise_sampler)
    loop.w = check_guided(loop.model, loop.extra)
    return loop


def _checked_conv(conv):
    """``conv`` of a fused wrapper (its rows carry w); raises TypeError naming ``model`` for a plain model's."""
    def guided(sigma: float) -> dict:
        c = conv(sigma)
        if "w" not in c:
            raise TypeError(f"model: a plain model's conversion has no guidance scale; {_UNCOND_WHY}")
        return c
    return coef_tables._identity if conv is coef_tables._identity else guided


def cfg_pp_plan(sigmas, conv, *, eta, s_noise, guided: bool = True) -> coef_tables.Plan:
    """Euler-ancestral CFG++ rows on the host float64 schedule ``sigmas``: ``a = r``, ``b = 1``, ``bu = -r`` (r =
    sigma_down/sigma), ``s = s_noise*sigma_up`` with (sigma_down, sigma_up) k-diffusion's ancestral split (eta = 0:
    Euler CFG++). ``guided=False`` (a wrapper at guidance 1, D_u = D): the plain sampler's rows ``a = r, b = 1 - r``.
    ``conv``: the model's :func:`diffkern.sampler_loop.conversion_rows`; :func:`diffkern.coef_tables._identity`
    (no model) gives the structure only."""
    knobs, conv = _plans._ancestral_knobs(eta, s_noise), _checked_conv(conv)
    rows = []
    for s, sn in zip(sigmas[:-1], sigmas[1:]):
        down, up = coef_tables.ancestral_step(s, sn, knobs["eta"])
        r, one_minus_r = coef_tables._ratio(s, down)
        slots = {"b": 1.0, "bu": -r} if guided else {"b": one_minus_r}
        rows.append(coefs.row(a=r, s=knobs["s_noise"] * up, **slots, **conv(s)))
    return coef_tables._plan(rows, sigmas[:-1], sigmas[:-1])


def dpmpp_2m_cfg_pp_plan(sigmas, conv) -> coef_tables.Plan:
    """DPM++ 2M CFG++ rows (module docstring), history = the previous D_u."""
    conv, rows = _checked_conv(conv), []
    for i, (s, sn) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        r, one_minus_r = coef_tables._ratio(s, sn)
        k = 0.0 if i == 0 or sn == 0 else one_minus_r / (2.0 * (math.log(sigmas[i - 1] / s) / math.log(s / sn)))
        rows.append(coefs.row(a=r, b=1.0 + k, bu=-r, c=-k, fu=1.0, **conv(s)))
    return coef_tables._plan(rows, sigmas[:-1], sigmas[:-1], history=1)


def ge_cfg_pp_plan(sigmas, conv, *, gamma: float) -> coef_tables.Plan:
    """Gradient-estimation CFG++ rows (module docstring), history = the previous unconditional slope."""
    conv, rows = _checked_conv(conv), []
    for i, (s, sn) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        slope = {"e": 1.0 / s, "fu": -1.0 / s}  # history_out = (x - D_u)/sigma
        if sn == 0:
            rows.append(coefs.row(a=0.0, b=1.0, **slope, **conv(s)))
            continue
        g1, dt = (gamma - 1.0 if i else 0.0), sn - s
        a = (sn + g1 * dt) / s
        rows.append(coefs.row(a=a, b=1.0, bu=-a, c=-g1 * dt, **slope, **conv(s)))
    return coef_tables._plan(rows, sigmas[:-1], sigmas[:-1], history=1)


def dpmpp_2s_ancestral_cfg_pp_plan(sigmas, conv, *, eta, s_noise) -> coef_tables.Plan:
    """DPM++ 2S ancestral CFG++ rows (module docstring): N first-call rows, N second-call rows at sigma_mid (none
    where sigma_down = 0: the jump x' = D_cfg plus the step's noise, as ComfyUI's)."""
    knobs, conv = _plans._ancestral_knobs(eta, s_noise), _checked_conv(conv)
    pred, corr, mids = [], [], []
    for s, sn in zip(sigmas[:-1], sigmas[1:]):
        down, up = coef_tables.ancestral_step(s, sn, knobs["eta"])
        noise = knobs["s_noise"] * up if sn > 0 else 0.0
        if down == 0:
            pred.append(coefs.row(a=0.0, b=1.0, s=noise, **conv(s)))
            corr.append(coefs.row(**coef_tables._NO_MODEL))
            mids.append(math.nan)
            continue
        mid = math.sqrt(s * down)
        r_mid, r = mid / s, down / s
        pred.append(coefs.row(a=r_mid, b=1.0, bu=-r_mid, e=1.0, f=1.0, fu=-1.0, **conv(s)))
        corr.append(coefs.row(a=0.0, b=-math.expm1(math.log(r)), c=r, s=noise, **conv(mid)))
        mids.append(mid)
    return coef_tables._two_eval_plan(pred, corr, mids, sigmas[:-1])


def run_cfg_pp(loop: _Loop, eta: float, s_noise: float, noise_sampler_calls: bool) -> torch.Tensor:
    """The Euler-ancestral CFG++ plan on ``loop``; ``noise_sampler_calls``: whether its noise_sampler is called where
    ComfyUI's is (every step to sigma_next > 0 when eta > 0 and s_noise > 0, even where sigma_up = 0)."""
    plan = cfg_pp_plan(loop.sigmas, loop.conv, eta=eta, s_noise=s_noise, guided=loop.w != 1.0)
    if loop.noise_sampler is not None and noise_sampler_calls and eta > 0 and s_noise > 0:
        loop.noise_calls = {(i, True): (s, sn) for i, (s, sn) in enumerate(zip(loop.sigmas[:-1], loop.sigmas[1:]))
                            if sn > 0}
    return _run(loop, plan)


@torch.no_grad()
def sample_euler_ancestral_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                                  s_noise=1.0, noise_sampler=None, *, seed=None, backend=None, trajectory=None,
                                  window=None):
    """ComfyUI's ``euler_ancestral_cfg_pp``: ``x' = D_cfg + sigma_down (x - D_u)/sigma + s_noise sigma_up xi``
    (k-diffusion's ancestral split at ``eta``; the jump x' = D_cfg on a step to 0), one guided model call per step.
    ``model``: a :mod:`diffkern.wrappers` wrapper (its guidance batch gives D_u; :func:`check_guided`). Noise: Philox
    keyed by ``seed``, or ``noise_sampler(sigma, sigma_next)`` called where ComfyUI's is. ``sigmas`` strictly
    decreasing. x: (B, ...) float; returns the final state in x's dtype."""
    loop = cfg_pp_loop(model, x, sigmas, extra_args, callback, disable, seed, backend, trajectory, window=window,
                       method="euler_ancestral_cfg_pp", noise_sampler=noise_sampler)
    return run_cfg_pp(loop, eta, s_noise, True)


@torch.no_grad()
def sample_euler_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, *, seed=None, backend=None,
                        trajectory=None, window=None):
    """ComfyUI's ``euler_cfg_pp``: ``x' = D_cfg + sigma_next (x - D_u)/sigma`` (:func:`sample_euler_ancestral_cfg_pp`
    at eta = 0), one guided model call per step. x: (B, ...) float; returns the final state in x's dtype."""
    loop = cfg_pp_loop(model, x, sigmas, extra_args, callback, disable, seed, backend, trajectory, window=window,
                       method="euler_cfg_pp")
    return run_cfg_pp(loop, 0.0, 0.0, False)


@torch.no_grad()
def sample_dpmpp_2m_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, *, seed=None, backend=None,
                           trajectory=None, window=None):
    """ComfyUI's ``dpmpp_2m_cfg_pp``: ``x' = D_cfg + r (x - D_u) + k (D_cfg - D_u_prev)`` with r = sigma_next/sigma,
    k = (1 - r)/(2 h_last/h) (0 on the first step and the step to 0), one guided model call per step, the previous
    D_u as history. ``model``: a :mod:`diffkern.wrappers` wrapper (:func:`check_guided`); ``sigmas`` strictly
    decreasing. x: (B, ...) float; returns the final state in x's dtype."""
    loop = cfg_pp_loop(model, x, sigmas, extra_args, callback, disable, seed, backend, trajectory, window=window,
                       method="dpmpp_2m_cfg_pp")
    return _run(loop, dpmpp_2m_cfg_pp_plan(loop.sigmas, loop.conv))


@torch.no_grad()
def sample_dpmpp_2s_ancestral_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                                     s_noise=1.0, noise_sampler=None, *, seed=None, backend=None, trajectory=None,
                                     window=None):
    """ComfyUI's ``dpmpp_2s_ancestral_cfg_pp``: DPM-Solver++(2S) to sigma_down from ``x + D_cfg - D_u`` (two guided
    model calls per step, the second at sigma_mid = sqrt(sigma sigma_down)), then ``+ s_noise sigma_up xi`` on steps to
    sigma_next > 0; the jump x' = D_cfg where sigma_down = 0. Noise: Philox keyed by ``seed``, or
    ``noise_sampler(sigma, sigma_next)`` called where ComfyUI's is. x: (B, ...) float; returns the final state in
    x's dtype."""
    loop = cfg_pp_loop(model, x, sigmas, extra_args, callback, disable, seed, backend, trajectory, window=window,
                       method="dpmpp_2s_ancestral_cfg_pp", noise_sampler=noise_sampler)
    plan = dpmpp_2s_ancestral_cfg_pp_plan(loop.sigmas, loop.conv, eta=eta, s_noise=s_noise)
    if loop.noise_sampler is not None:  # where ComfyUI calls it: as its plain dpmpp_2s_ancestral
        loop.noise_calls = sampler_compat.noise_calls("dpmpp_2s_ancestral", loop.sigmas, plan)
    return _run(loop, plan)
