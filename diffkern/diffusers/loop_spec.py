"""A diffusers scheduler as diffkern's fused loop runs it: the sampler method, VE sigma schedule, network timesteps
and knobs (:class:`LoopSpec`) of a scheduler after ``set_timesteps``, for :func:`diffkern.diffusers.accelerate`.

Equivalences used (``math-samplers.md`` 5-7): DDIM(eta) = Euler-ancestral(eta) in VE coordinates (eta = 0:
Euler), DDPM ("fixed_small") = DDIM(eta = 1), DPM-Solver++(2M) = k-diffusion's ``dpmpp_2m``, diffusers' third-order
DPM-Solver++ = diffkern's ``dpmsolver_3m`` (not k-diffusion's 3M: other second-order and SDE rows), UniPC =
diffkern's ``unipc`` (its corrector folded into the next row), DEIS = ``deis``, LMS = ``lms``, LCM = ``lcm`` on
the boundary-conditioned denoiser. Scheduler configurations the fused loop cannot reproduce raise ValueError naming
the option.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from .. import coef_tables_3m, coef_tables_deis, schedules
from .schedulers import FusedScheduler
from .schedulers_ge import IADBScheduler


@dataclasses.dataclass
class LoopSpec:
    """A scheduler's loop as diffkern runs it: ``method`` on the VE schedule ``sigmas`` (IADB: alphas) with
    ``knobs``; ``timesteps[i]`` is the network timestep at ``sigmas[i]``; ``vp``: the pipeline's state is the VP
    ``z = x/sqrt(sigma^2 + 1)`` (DDIM/DDPM/DPM) rather than x itself; ``call_timesteps``: the network timestep of
    each of ``method``'s model calls in order, where they are not a function of the call's sigma (else None);
    ``boundary``: LCM's ``timestep_scaling``, whose boundary condition the denoiser applies (else None); ``flow``: a
    flow-matching scheduler, whose state is ``x_t = x/(1 + sigma)`` and network a velocity (:func:`flow_spec`);
    ``edm``: an EDM scheduler's ``sigma_data``, whose preconditioning the denoiser applies (:mod:`.edm_denoiser`;
    else None); ``window``: ``(begin, total)`` where the loop is steps ``begin ..`` of the whole ``total``-step
    loop (img2img, ``denoising_end``), whose Philox noise it draws there (:func:`diffkern.sampling.sample`'s
    ``window``), as the Level-1 scheduler does; None: the whole loop."""

    method: str
    sigmas: list
    timesteps: list
    knobs: dict
    vp: bool
    call_timesteps: Optional[list] = None
    boundary: Optional[float] = None
    flow: bool = False
    edm: Optional[float] = None
    window: Optional[tuple] = None


def _unsupported(name: str, option: str, value, why: str) -> ValueError:
    return ValueError(f"accelerate: {name} with {option}={value!r} is not supported by the fused loop ({why}); "
                      f"run the pipeline with diffkern.diffusers.{name} as its scheduler instead")


def _drop_identity_end(name: str, sigmas: list, timesteps: list) -> tuple[list, list]:
    """Drop a last step from a sigma to the same sigma (``final_sigmas_type="sigma_min"`` on a schedule that
    already ends at the table's smallest sigma; Karras' end point can differ from it in the last bits): it is the
    identity in diffusers, and the sampler needs strictly decreasing sigmas."""
    if math.isclose(sigmas[-1], sigmas[-2], rel_tol=1e-9):
        if len(sigmas) == 2:
            raise _unsupported(name, "final_sigmas_type", "sigma_min",
                               "its single step goes from its one sigma to itself")
        return sigmas[:-1], timesteps[:-1]
    return sigmas, timesteps


def _check_unipc_decreasing(name: str, cfg, sig: list, n: int) -> None:
    """Raise unless the sigmas strictly decrease. Level 1 UniPC runs schedules whose sigma repeats (solver_order=1 with
    N >= T steps, "leading" timesteps clamped to T - 1 by steps_offset) or rises over the first step (zero terminal
    SNR floors alpha-bar(T-1) at 2^-24, above alpha-bar(T-2) on steep tables); the fused sampler cannot."""
    for i, (a, b) in enumerate(zip(sig[:-1], sig[1:])):
        if b >= a:
            if b > a and cfg.get("rescale_betas_zero_snr"):
                key = "rescale_betas_zero_snr"
            elif cfg.timestep_spacing == "leading" and n < cfg.num_train_timesteps:
                key = "steps_offset"
            else:
                key = "timestep_spacing"
            raise _unsupported(name, key, cfg[key], f"with {n} steps over num_train_timesteps="
                               f"{cfg.num_train_timesteps} step {i} goes from sigma {a:.6g} to {b:.6g}; the fused loop "
                               "needs strictly decreasing sigmas")


def _multistep_knobs(name: str, cfg, steps: int, kept: int, sde: bool) -> dict:
    """``dpmsolver_3m``'s knobs for a DPM-Solver config of ``steps`` steps run as ``kept`` (one fewer when an
    identity last step is dropped: then the knobs must give the kept steps diffusers' orders, which the 15-step
    threshold of lower_order_final can shift)."""
    order = int(cfg.solver_order)
    knobs = {"eta": 1.0 if sde else 0.0, "solver_order": order, "solver_type": cfg.solver_type}
    want = coef_tables_3m.dpmsolver_orders(steps, solver_order=order, lower_order_final=cfg.lower_order_final,
                                           euler_at_final=cfg.euler_at_final)[:kept]
    for low, euler in ((cfg.lower_order_final, cfg.euler_at_final), (False, False), (True, False)):
        if coef_tables_3m.dpmsolver_orders(kept, solver_order=order, lower_order_final=low,
                                           euler_at_final=euler) == want:
            return dict(knobs, lower_order_final=bool(low), euler_at_final=bool(euler))
    raise _unsupported(name, "final_sigmas_type", "sigma_min",
                       f"with solver_order={order} and {steps} steps its last step goes from sigma_min to itself and "
                       f"the step before is of order {want[-1]}, which the fused loop without that step cannot give")


def _dpm_multistep_spec(ours, vp: bool) -> LoopSpec:
    """DPM-Solver++ multistep (ODE or SDE, orders 1-3) on the scheduler's VE sigmas: DPMSolverMultistepScheduler
    (``vp``: its state is the VP sample) or EDMDPMSolverMultistepScheduler (the VE sample itself), whose updates
    in log-sigma are the same."""
    name, cfg, ts = type(ours).__name__, ours.config, list(ours._host_timesteps)
    # diffusers' last step is first order with euler_at_final, or lower_order_final below 15 steps; dpmpp_2m's
    # is second order unless it ends at 0, so such a second-order loop runs as dpmsolver_3m, which takes
    # diffusers' order rules. An identity last step (dropped) makes the question moot.
    first_order_last = cfg.euler_at_final or (cfg.lower_order_final and len(ts) < 15)
    sig, kept = _drop_identity_end(name, list(ours.sigmas_host), ts)
    sde = cfg.algorithm_type == "sde-dpmsolver++"
    if cfg.solver_order == 3 or (cfg.solver_order == 2 and first_order_last and sig[-1] > 0 and kept == ts):
        return LoopSpec("dpmsolver_3m", sig, kept, _multistep_knobs(name, cfg, len(ts), len(kept), sde), vp=vp)
    if cfg.solver_order == 1:  # first order every step: DDIM, or for the SDE the lam = 1 exponential step
        return LoopSpec("sde", sig, kept, {"lam": 1.0}, vp=vp) if sde else LoopSpec("euler", sig, kept, {}, vp=vp)
    if not sde and cfg.solver_type == "midpoint":
        return LoopSpec("dpmpp_2m", sig, kept, {}, vp=vp)
    return LoopSpec("dpmpp_2m_sde", sig, kept, {"eta": 1.0 if sde else 0.0, "solver_type": cfg.solver_type}, vp=vp)


# The VE sigma of flow time t = 1 (pure noise; t/(1 - t) is infinite). In float64 1 + 2^70 == 2^70, so the state
# x = 2^70*x_t and the network input x/(1 + sigma) = x_t are exact, and the flow conversion (1/(1+s), -s/(1+s)) is
# exactly (2^-70, -1): D = x_t - v, the limit t -> 1. Euler from there to sigma' gives x' = D + sigma'*x_t, i.e.
# x_t' = (1 - t')*(x_t - v) + t'*x_t = x_t + (t' - 1)*v: the flow Euler step from t = 1, to float64 rounding.
FLOW_TOP = 2.0 ** 70


def flow_spec(ours) -> LoopSpec:
    """A ``FlowMatchEulerDiscreteScheduler`` as a VE loop. Its state ``x_t = (1 - t)*x0 + t*n`` is the VE state
    ``x = x_t/(1 - t)`` at ``sigma = t/(1 - t)``, its velocity ``v = n - x0`` gives ``D = x_t - t*v`` (the "flow"
    conversion); then the flow Euler step ``x_t + (t' - t)*v`` is ``euler`` on those sigmas, and
    ``stochastic_sampling``'s ``(1 - t')*x0 + t'*xi`` is ``lcm`` (``x' = D + sigma'*xi``). t = 1 maps to
    :data:`FLOW_TOP`."""
    name, cfg = type(ours).__name__, ours.config
    if cfg.invert_sigmas:
        raise _unsupported(name, "invert_sigmas", True, "its sigmas rise to 1 (Mochi's reversed time)")
    ts = list(ours.sigmas_host)
    bad = [t for t in ts if not 0.0 <= t <= 1.0]
    if bad or any(b >= a for a, b in zip(ts[:-1], ts[1:])):
        raise _unsupported(name, "sigmas", ts, "the fused loop needs flow sigmas in [0, 1] that decrease strictly"
                           + (f"; {bad[0]} is outside" if bad else ""))
    sigmas = [FLOW_TOP if t == 1.0 else t / (1.0 - t) for t in ts]
    method = "lcm" if cfg.stochastic_sampling else "euler"
    return LoopSpec(method, sigmas, list(ours._host_timesteps), {}, vp=False, flow=True)


def diffkern_scheduler(scheduler) -> FusedScheduler:
    """A fresh diffkern scheduler equivalent to ``scheduler`` (a diffusers or diffkern scheduler)."""
    from . import SCHEDULERS

    cls = SCHEDULERS.get(type(scheduler).__name__)
    if cls is None:
        raise ValueError(f"accelerate: unsupported scheduler {type(scheduler).__name__}; supported: "
                         f"{', '.join(sorted(n for n in SCHEDULERS if n != 'DDIMInverseScheduler'))}")
    if cls.__name__ == "DDIMInverseScheduler":  # refused before set_timesteps, whose own refusals would mislead
        raise ValueError("accelerate: DDIMInverseScheduler is not supported: an inverse scheduler maps data to noise "
                         "(DDIM inversion), it is not a sampling loop; run the inversion loop with "
                         "diffkern.diffusers.DDIMInverseScheduler as a Level 1 scheduler and accelerate the pipeline "
                         "with a sampling scheduler")
    # the effective config: from_config resets keys left unset at construction (_use_default_values) to defaults,
    # but the pipeline may have changed them since (StableDiffusionPipeline forces steps_offset=1) and runs those
    config = {key: value for key, value in scheduler.config.items() if key != "_use_default_values"}
    return cls.from_config(config)


def _clip_knobs(ours, name: str, clipped: bool) -> dict:
    """The ``clip_denoised`` (and for DDIM ``clipped_eps``) knobs of a DDIM, DDPM or GE ``clip_sample`` config: in
    VE coordinates diffusers' clipped x0 is the clamped D; DDPM's posterior mean and GE's eps use the clipped D,
    DDIM's direction the model's own unless ``use_clipped_model_output`` (``clipped``). {}: no clipping."""
    if not ours._option("clip_sample", False):
        return {}
    if name not in ("DDIMScheduler", "DDPMScheduler", "GEScheduler"):
        raise _unsupported(name, "clip_sample", True, "the fused loop clips x0 for DDIM, DDPM and GE only")
    r = float(ours.config.clip_sample_range)
    if not r > 0:
        raise _unsupported(name, "clip_sample_range", r, "expected > 0")
    return {"clip_denoised": r, **({"clipped_eps": bool(clipped)} if name == "DDIMScheduler" else {})}


def loop_spec(ours: FusedScheduler, eta: float = 0.0, use_clipped_model_output: bool = False) -> LoopSpec:
    """Translate a diffkern scheduler after ``set_timesteps`` into a :class:`LoopSpec`; ``eta`` and
    ``use_clipped_model_output``: DDIMPipeline's arguments to DDIM's step."""
    name, cfg = type(ours).__name__, ours.config
    ts = list(ours._host_timesteps)
    if isinstance(ours, IADBScheduler):
        knobs = {"variant": cfg.variant, "lam": cfg.lam if cfg.variant == "stochastic" else 0.0}
        return LoopSpec("iadb", list(ours.alphas_host), ts, knobs, vp=False)
    if name == "IPNDMScheduler":  # diffusers' Dance Diffusion scheduler: timesteps in [0, 1], no VE sigmas
        raise ValueError("accelerate: IPNDMScheduler is not supported by the fused loop (its pipeline is Dance "
                         "Diffusion's 1-D audio UNet); run the pipeline with diffkern.diffusers.IPNDMScheduler as its "
                         "scheduler instead")
    if name == "TCDScheduler":  # in VE coordinates an ancestral step whose sigma_down is sigma(floor((1-eta)*t'))
        raise ValueError("accelerate: TCDScheduler is not supported by the fused loop (its step is ancestral Euler "
                         "down to the sigma of s = floor((1 - eta)*t_prev), a per-step sigma_down that no diffkern "
                         "sampler's knobs give); run the pipeline with diffkern.diffusers.TCDScheduler as its "
                         "scheduler instead")
    if name == "SASolverScheduler":
        from .loop_spec_multistep import _sasolver_spec
        return _sasolver_spec(ours)
    if name.startswith("EDM"):
        from .edm_denoiser import edm_spec
        return edm_spec(ours)
    clip = _clip_knobs(ours, name, use_clipped_model_output)
    if name in ("DDIMScheduler", "DDPMScheduler"):
        for i in range(len(ts) - 1):
            if ours._prev[i] != ts[i + 1]:
                raise _unsupported(name, "timestep_spacing", cfg.timestep_spacing,
                                   f"with {len(ts)} steps, step {i} goes from t={ts[i]} to t={ours._prev[i]}, which is "
                                   f"not the next timestep {ts[i + 1]}: the schedule is not continuous")
        last = ours._prev[-1]
        final = ours._final_alpha_cumprod if name == "DDIMScheduler" else 1.0
        ab_final = float(ours.alphas_cumprod[last]) if last >= 0 else final
        sigmas = ours.train_sigmas[ts].tolist() + [schedules.alpha_bar_to_sigma(ab_final)]
        if math.isinf(sigmas[0]):
            raise _unsupported(name, "rescale_betas_zero_snr", True, f"its first timestep {ts[0]} has alpha-bar 0, "
                               "an infinite VE sigma")
        if ab_final == float(ours.alphas_cumprod[ts[-1]]):
            # set_alpha_to_one=False ending at t=0: the last step, alpha_bar[0] to itself, is the identity in
            # diffusers (zero variance); dropped, as the sampler's sigmas must strictly decrease
            if len(ts) == 1 or clip.get("clipped_eps") is False:  # (clipped: x' = D_clip + x - D, no identity)
                raise _unsupported(name, "set_alpha_to_one", False, "its last step goes from t=0 to itself" + (
                    ", which with clip_sample moves x by clip(x0) - x0" if len(ts) > 1 else ""))
            sigmas, ts = sigmas[:-1], ts[:-1]
        if name == "DDPMScheduler":
            if cfg.variance_type == "fixed_large":
                raise _unsupported(name, "variance_type", "fixed_large", "only the posterior variance = DDIM(eta=1)")
            eta = 1.0
        if eta == 0 and not clip:
            return LoopSpec("euler", sigmas, ts, {}, vp=True)
        if name == "DDIMScheduler" and eta * eta > 1:  # Level 1's ValueError where diffusers' step gives NaN
            ours._build(("ddim", float(eta), False))
        if eta < 0:  # diffusers' DDIM adds noise only for eta > 0: the direction term of |eta|, no noise
            return LoopSpec("euler_ancestral", sigmas, ts, {"eta": -float(eta), "s_noise": 0.0, **clip}, vp=True)
        return LoopSpec("euler_ancestral", sigmas, ts, {"eta": float(eta), **clip}, vp=True)
    if name == "DPMSolverMultistepScheduler":
        if cfg.variance_type in ("learned", "learned_range"):
            raise _unsupported(name, "variance_type", cfg.variance_type, "the fused loop takes the model output as "
                               "the prediction, with no channels to drop")
        return _dpm_multistep_spec(ours, vp=True)
    if name == "UniPCMultistepScheduler":
        sig = list(ours.sigmas_host)
        if math.isclose(sig[-1], sig[-2], rel_tol=1e-9):  # its output is the last correction: the step is not idle
            raise _unsupported(name, "final_sigmas_type", "sigma_min", "its last step goes from sigma_min to itself, "
                               "returning the last corrected sample; the fused loop needs strictly decreasing sigmas")
        _check_unipc_decreasing(name, cfg, sig, len(ts))
        return LoopSpec("unipc", sig, ts, ours.loop_knobs(), vp=True)
    if name == "DEISMultistepScheduler":
        from .loop_spec_multistep import _deis_spec
        return _deis_spec(ours)
    if name == "DPMSolverSinglestepScheduler":
        return ours.loop_spec()
    if name == "PNDMScheduler":
        from .loop_spec_pndm import pndm_spec
        return pndm_spec(ours)
    if name == "LCMScheduler":
        # z' = sqrt(ab')*D + sqrt(1-ab')*xi with D = c_skip(t)*z + c_out(t)*x0 is, in VE coordinates (x = z/sqrt(ab)),
        # x' = D + sigma'*xi: sample_lcm on the denoiser with the boundary condition folded into its per-timestep
        # conversion (ScheduleDenoiser's timestep_scaling). Step num_inference_steps - 1 (the last) returns D: sigma 0.
        sig = ours.train_sigmas[ts].tolist() + [0.0]
        if math.isinf(sig[0]):
            raise _unsupported(name, "rescale_betas_zero_snr", True, f"its first timestep {ts[0]} has alpha-bar 0, "
                               "an infinite VE sigma")
        return LoopSpec("lcm", sig, ts, {}, vp=True, boundary=float(cfg.timestep_scaling))
    if name == "FlowMatchEulerDiscreteScheduler":
        return flow_spec(ours)
    if name == "FlowMatchHeunDiscreteScheduler":  # Heun in flow time: heun_flow (churn is no pipeline knob)
        return ours.loop_spec()
    sig = list(ours.sigmas_host)
    if name == "HeunDiscreteScheduler":
        ts = ts[:1] + ts[1::2]
    elif name.startswith("KDPM2") or name == "DPMSolverSDEScheduler":
        ts = ts[::2]  # of [t_0, tm_0, t_1, ...]: the midpoint calls' timesteps go in call_timesteps
    sig, ts = _drop_identity_end(name, sig, ts)
    if name == "EulerDiscreteScheduler":
        return LoopSpec("euler", sig, ts, {}, vp=False)
    if name == "EulerAncestralDiscreteScheduler":
        return LoopSpec("euler_ancestral", sig, ts, {"eta": 1.0}, vp=False)
    if name == "HeunDiscreteScheduler":
        return LoopSpec("heun", sig, ts, {}, vp=False)
    if name == "KDPM2DiscreteScheduler":
        return LoopSpec("dpm_2", sig, ts, {}, vp=False, call_timesteps=list(ours._host_timesteps))
    if name == "KDPM2AncestralDiscreteScheduler":
        return LoopSpec("dpm_2_ancestral", sig, ts, {"eta": 1.0}, vp=False, call_timesteps=list(ours._host_timesteps))
    if name == "DPMSolverSDEScheduler":  # its noise seed: AcceleratedPipeline._run (noise_sampler_seed)
        return LoopSpec("dpmpp_sde", sig, ts, {"eta": 1.0, "s_noise": 1.0, "r": 0.5}, vp=False,
                        call_timesteps=list(ours._host_timesteps))
    if name == "GEScheduler":
        return LoopSpec("ge", sig, ts, {"gamma": float(cfg.gamma), "mu": float(cfg.mu), **clip}, vp=False)
    if name == "LMSDiscreteScheduler":  # pipelines call its step() with the default order=4
        _check_unipc_decreasing(name, cfg, sig, len(ts))
        return LoopSpec("lms", sig, ts, {"order": 4}, vp=False)
    raise ValueError(f"accelerate: unsupported scheduler {name}")


def tail_spec(ours: FusedScheduler, spec: LoopSpec, begin: int) -> LoopSpec:
    """``spec`` from step ``begin`` on: the loop an img2img pipeline runs after ``set_begin_index`` (strength < 1).
    Multistep methods start over (first order first, as diffusers' history starts empty); what depends on absolute
    step indices follows diffusers: UniPC's ``disable_corrector`` shifts by ``begin``, third-order DPM-Solver's
    final orders count the whole schedule's steps, and the noise is the whole loop's (``window``)."""
    if begin == 0:
        return spec
    name, n = type(ours).__name__, len(spec.timesteps)
    if name == "PNDMScheduler":
        from .loop_spec_pndm import refuse_tail
        refuse_tail(ours, begin)
    if name == "LMSDiscreteScheduler":
        raise ValueError(f"accelerate: LMSDiscreteScheduler with strength < 1 (the loop starting at "
                         f"timesteps[{begin}]) is not supported by the fused loop (diffusers weights the first three "
                         "derivatives of a partial loop with the Lagrange weights of nodes before its start, which no "
                         "lms loop on the partial schedule gives); run the pipeline with "
                         "diffkern.diffusers.LMSDiscreteScheduler as its scheduler instead")
    if n <= begin < len(ours._host_timesteps) // ours.order:  # only the identity steps the spec dropped are left
        raise ValueError(f"strength: the partial schedule starts at step {begin}, where only identity steps are left "
                         f"(a last step from a sigma to itself, which the fused loop drops); use a larger strength, "
                         f"or the pipeline with diffkern.diffusers.{name} as its scheduler")
    if not 0 < begin < n:
        raise ValueError(f"strength: the partial schedule starts at step {begin} of {n}; expected 0 <= begin < {n}")
    if name == "DPMSolverSinglestepScheduler":  # diffusers' orders from the begin step (a group restarts there)
        return dataclasses.replace(ours.loop_spec(begin), window=(begin, n))
    knobs = dict(spec.knobs)
    if spec.method == "unipc":
        knobs["disable_corrector"] = tuple(k - begin for k in knobs["disable_corrector"] if k >= begin)
    elif spec.method == "dpmsolver_3m":
        cfg, order = ours.config, knobs["solver_order"]
        want = coef_tables_3m.dpmsolver_orders(len(ours._host_timesteps), solver_order=order,
                                               lower_order_final=cfg.lower_order_final,
                                               euler_at_final=cfg.euler_at_final, begin=begin)[begin:n]
        options = ((low, euler) for low in (False, True) for euler in (False, True)
                   if coef_tables_3m.dpmsolver_orders(n - begin, solver_order=order, lower_order_final=low,
                                                      euler_at_final=euler) == want)
        low_euler = next(options, None)
        if low_euler is None:
            raise _unsupported(name, "solver_order", order, f"from step {begin} of {n} (img2img strength) diffusers' "
                               f"orders {want} are not those of a {n - begin}-step dpmsolver_3m loop")
        knobs.update(lower_order_final=low_euler[0], euler_at_final=low_euler[1])
    elif spec.method == "sa_solver":  # diffusers' orders restart at the begin step, as the sampler's
        knobs["tau"] = tuple(knobs["tau"])[begin:]
    elif spec.method == "deis":
        cfg = ours.config
        want = coef_tables_deis.deis_orders(len(ours._host_timesteps), order=int(cfg.solver_order),
                                            lower_order_final=cfg.lower_order_final, begin=begin)[begin:n]
        low = next((low for low in (False, True) if coef_tables_deis.deis_orders(
            n - begin, order=int(cfg.solver_order), lower_order_final=low) == want), None)
        if low is None:
            raise _unsupported(name, "solver_order", cfg.solver_order, f"from step {begin} of {n} (img2img strength) "
                               f"diffusers' orders {want} are not those of a {n - begin}-step deis loop")
        knobs["lower_order_final"] = low
    calls = spec.call_timesteps
    if calls is not None:  # two model calls per step (KDPM2): the midpoint calls follow their step's
        calls = calls[2 * begin:]
    return dataclasses.replace(spec, sigmas=spec.sigmas[begin:], timesteps=spec.timesteps[begin:], knobs=knobs,
                               call_timesteps=calls, window=(begin, n))

def decreasing_prefix(alphas_cumprod) -> torch.Tensor:
    """The longest prefix of an alpha-bar table that strictly decreases (float64). Zero terminal SNR floors
    alpha-bar(T-1) at 2^-24 (diffusers' UniPC, DPM-Solver, Euler), above alpha-bar(T-2): the wrapper would refuse the
    whole table. It matches the schedule's own sigmas exactly (the floored one too) and interpolates other sigmas
    (another method's midpoints) in this prefix."""
    ab = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
    rises = (ab[1:] >= ab[:-1]).nonzero()
    return ab if rises.numel() == 0 else ab[: int(rises[0, 0]) + 1]
