"""CFG++ (Chung et al. 2024) on the fused step: ComfyUI's ``euler_cfg_pp`` and ``euler_ancestral_cfg_pp``, with
ComfyUI's names and positional order and :mod:`diffkern.samplers`' common knobs (``seed``, ``backend``,
``trajectory``, ``window``). Re-exported by :mod:`diffkern.samplers`.

CFG++ takes the guided denoised estimate ``D_cfg = D_u + w (D_c - D_u)`` for the step's target and the unconditional
``D_u`` for its direction: ``x' = D_cfg + sigma_down (x - D_u)/sigma + s_noise sigma_up xi`` (VE coordinates, which
is also ComfyUI's alpha-scaled form for a flow model run through :class:`diffkern.wrappers.FlowDenoiser`). With
``r = sigma_down/sigma`` the update is ``r x + D_cfg - r D_u = r x + (1 - r) D_w'``, D at the guidance scale
``w' = w/(1 - r)`` (both sides weigh D_c by w and D_u by 1 - w - r): the plain Euler-ancestral row with its W slot
set to w', so the fused op runs it unchanged, in every backend. The op's denoised output is then that D_w', not
D_cfg: the callback and the trajectory get D_cfg, computed from the same model outputs where they ask for it.

The fused op carries the model outputs into the state and the history through ONE combination of the conditional
and unconditional outputs per call, so CFG++ samplers that also keep an unconditional history (ComfyUI's
``dpmpp_2m_cfg_pp``, ``dpmpp_2s_ancestral_cfg_pp``, ``res_multistep_cfg_pp``, ``gradient_estimation`` with
``cfg_pp`` at ``ge_gamma != 1``) are not expressible as its rows and are not offered.
"""
from __future__ import annotations

import torch

from . import coef_tables
from . import sampler_plans as _plans
from .ops import coefs
from .sampler_loop import _Loop, _run

_UNCOND_WHY = ("CFG++ steps along the unconditional denoised prediction, which a model(x, sigma) -> denoised does not "
               "expose; pass a diffkern.wrappers wrapper with guidance_scale and uncond_<name> extra args")


def check_guided(model, extra: dict) -> float:
    """The guidance scale w of the fused wrapper ``model``; raises TypeError naming ``model`` for a plain model, and
    ValueError naming ``extra_args`` when w = 1 comes with ``uncond_<name>`` args (the wrapper then runs no
    unconditional batch, while ComfyUI's CFG++ at cfg 1 still steps along the unconditional prediction). At w = 1
    without them there is one prediction, D_u = D_c, and CFG++ is the plain sampler."""
    if not all(hasattr(model, k) for k in ("raw", "conversion", "guidance_scale")):
        raise TypeError(f"model: expected a diffkern.wrappers wrapper, got {type(model).__name__}; {_UNCOND_WHY}")
    w = 1.0 if model.guidance_scale is None else float(model.guidance_scale)
    uncond = sorted(k for k in extra if k.startswith("uncond_"))
    if w == 1.0 and uncond:
        raise ValueError(f"extra_args: {uncond[0]} given with guidance_scale 1, where the wrapper runs no "
                         "unconditional batch, but CFG++ steps along the unconditional prediction at any scale; set "
                         "the wrapper's guidance_scale != 1, or drop the uncond_ args (CFG++ is then the plain sampler)")
    return w


def cfg_pp_plan(sigmas, conv, *, eta, s_noise) -> coef_tables.Plan:
    """Euler-ancestral CFG++ rows on the host float64 schedule ``sigmas`` (strictly decreasing: at r = 1, a
    zero-length step, w' is infinite): ``a = r``, ``b = 1 - r``, ``w = w_model/(1 - r)``, ``s = s_noise*sigma_up``
    with (sigma_down, sigma_up) k-diffusion's ancestral split (eta = 0: Euler CFG++). ``conv``: the model's
    :func:`diffkern.sampler_loop.conversion_rows`; :func:`diffkern.coef_tables._identity` (no model) gives the
    structure only."""
    knobs = _plans._ancestral_knobs(eta, s_noise)
    rows = []
    for s, sn in zip(sigmas[:-1], sigmas[1:]):
        down, up = coef_tables.ancestral_step(s, sn, knobs["eta"])
        r, one_minus_r = coef_tables._ratio(s, down)
        c = dict(conv(s))
        if "w" not in c and conv is not coef_tables._identity:
            raise TypeError(f"model: a plain model's conversion has no guidance scale; {_UNCOND_WHY}")
        c["w"] = c.get("w", 1.0) / one_minus_r
        rows.append(coefs.row(a=r, b=one_minus_r, s=knobs["s_noise"] * up, **c))
    return coef_tables._plan(rows, sigmas[:-1], sigmas[:-1])


def guided_denoised(x: torch.Tensor, out, out_uncond, row: torch.Tensor, w: float) -> torch.Tensor:
    """``D_cfg = P x + Q (u + w (c - u))`` of one model call (c = ``out``, u = ``out_uncond`` or None) with the P, Q
    slots of the device table row ``row``, computed as the fused op computes its D (float32 math for 16/32-bit x,
    float64 for float64 x; no clipping: the CFG++ plans clip nothing). Shape and dtype of x; no host sync."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    r = row.to(cdt)
    m = out.to(cdt)
    if out_uncond is not None:
        u = out_uncond.to(cdt)
        m = u + w * (m - u)
    return (r[coefs.P] * x.to(cdt) + r[coefs.Q] * m).to(x.dtype)


class CfgPPLoop(_Loop):
    """:class:`diffkern.sampler_loop._Loop` of a CFG++ plan: a fused guided wrapper only (:func:`check_guided`), and
    the callback's and trajectory's denoised is D_cfg (the op's own D is the step's D_w'), computed only when one of
    them asks for it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.w = check_guided(self.model, self.extra)
        self.guided, self.user_callback = None, self.callback
        if self.callback is not None:
            self.callback = self._report

    def _model(self, row: int):
        out, out_uncond = super()._model(row)
        if self.trajectory is not None or self.user_callback is not None:  # before the update overwrites x
            self.guided = guided_denoised(self.x, out, out_uncond, self.table[row], self.w)
        return out, out_uncond

    def _report(self, info: dict) -> None:
        info["denoised"].copy_(self.guided)
        self.user_callback(info)

    def end(self, i: int) -> None:
        if self.trajectory is not None:
            self.trajectory.denoised[i].copy_(self.guided)
        super().end(i)


def run_cfg_pp(loop: CfgPPLoop, eta: float, s_noise: float, noise_sampler_calls: bool) -> torch.Tensor:
    """The CFG++ plan on ``loop``; ``noise_sampler_calls``: whether its noise_sampler is called where ComfyUI's is
    (every step to sigma_next > 0 when eta > 0 and s_noise > 0, even where sigma_up = 0)."""
    plan = cfg_pp_plan(loop.sigmas, loop.conv, eta=eta, s_noise=s_noise)
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
    loop = CfgPPLoop(model, x, sigmas, extra_args, callback, disable, seed, backend, trajectory, window=window,
                     method="euler_ancestral_cfg_pp", noise_sampler=noise_sampler)
    return run_cfg_pp(loop, eta, s_noise, True)


@torch.no_grad()
def sample_euler_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, *, seed=None, backend=None,
                        trajectory=None, window=None):
    """ComfyUI's ``euler_cfg_pp``: ``x' = D_cfg + sigma_next (x - D_u)/sigma`` (:func:`sample_euler_ancestral_cfg_pp`
    at eta = 0), one guided model call per step. x: (B, ...) float; returns the final state in x's dtype."""
    loop = CfgPPLoop(model, x, sigmas, extra_args, callback, disable, seed, backend, trajectory, window=window,
                     method="euler_cfg_pp")
    return run_cfg_pp(loop, 0.0, 0.0, False)
