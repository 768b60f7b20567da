"""Plans of the k-diffusion-style samplers: knobs validated, branches resolved on the host into a
:class:`diffkern.coef_tables.Plan` (shared by :mod:`diffkern.samplers` and the graph runner of
:mod:`diffkern.sampling`). ``PLANS[method](host_sigmas, conv, **knobs)``; every knob is passed (the defaults
live in the samplers' signatures, listed by :func:`diffkern.sampling.knobs`)."""
from __future__ import annotations

import dataclasses
import math
import numbers

import torch

from . import (coef_tables, coef_tables_3m, coef_tables_deis, coef_tables_dpm_fast, coef_tables_dpmpp_sde,
               coef_tables_er_sde, coef_tables_flow, coef_tables_lms, coef_tables_plms, coef_tables_res, coef_tables_sasolver,
               coef_tables_singlestep, coef_tables_unipc)
from .ops import coefs


def _knob(value, name: str, lo: float = 0.0, hi: float = math.inf, hi_open: bool = False,
          finite: bool = True) -> float:
    """``value`` as a float in [lo, hi] (or [lo, hi)); infinite only where ``finite`` is False (the churn
    window and strength, whose k-diffusion defaults and limits are infinite)."""
    # numbers.Real: Python and numpy scalars (np.float32(0.5) is no float subclass); tensors are refused
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        hint = " (a tensor: pass .item())" if isinstance(value, torch.Tensor) else ""
        raise TypeError(f"{name}: expected a number{hint}, got {value!r}")
    if math.isnan(value) or value < lo or value > hi or (hi_open and value == hi) or (finite and math.isinf(value)):
        raise ValueError(f"{name}: expected a {'finite ' if finite else ''}value in [{lo}, {hi}"
                         f"{')' if hi_open else ']'}, got {value}")
    return float(value)


def _solver_type(value) -> str:
    if value not in coef_tables.SOLVER_TYPES:
        raise ValueError(f"solver_type: expected one of {coef_tables.SOLVER_TYPES}, got {value!r}")
    return value


def _churn_knobs(s_churn, s_tmin, s_tmax, s_noise) -> dict:
    return {"s_churn": _knob(s_churn, "s_churn", finite=False), "s_tmin": _knob(s_tmin, "s_tmin", finite=False),
            "s_tmax": _knob(s_tmax, "s_tmax", finite=False), "s_noise": _knob(s_noise, "s_noise")}


def _ancestral_knobs(eta, s_noise) -> dict:
    return {"eta": _knob(eta, "eta"), "s_noise": _knob(s_noise, "s_noise")}


SPLITS = ("ve", "rf")
"""The ancestral splits: "ve" k-diffusion's in sigma, "rf" ComfyUI's ``_RF`` one in flow time t = sigma/(1 + sigma)."""


def _ancestral_builder(split, ve, rf):
    """``ve`` or ``rf`` (a plan builder) by ``split``, which must be one of :data:`SPLITS`."""
    if not isinstance(split, str) or split not in SPLITS:
        raise ValueError(f"split: expected 've' (k-diffusion's ancestral split in sigma) or 'rf' (ComfyUI's _RF split "
                         f"in flow time t = sigma/(1 + sigma)), got {split!r}")
    return rf if split == "rf" else ve


def _plan_euler(sigmas, conv, *, s_churn, s_tmin, s_tmax, s_noise):
    return coef_tables.euler(sigmas, conv=conv, **_churn_knobs(s_churn, s_tmin, s_tmax, s_noise))


def _clip_denoised(plan, clip_denoised, clipped_eps: bool = True):
    """``plan`` with D clamped to [-clip_denoised, clip_denoised] (diffusers' clipped x0, ``math-samplers.md`` 5)
    on every row. ``clipped_eps`` False (euler_ancestral only): the direction ``eps = (x - D)/sigma`` keeps the
    model's own D, as diffusers' DDIM without use_clipped_model_output: the row ``x' = a*x + b*D`` (a + b = 1)
    becomes ``x' = D_clip + a*(x - D_raw)``, i.e. b = 1 on the clipped D and g = -a on the raw one."""
    r = _knob(clip_denoised, "clip_denoised", finite=False)
    if r == 0:  # the op's CLIP slot must be > 0
        raise ValueError("clip_denoised: expected a value in (0, inf] (inf: no clipping), got 0.0")
    if not isinstance(clipped_eps, bool):
        raise TypeError(f"clipped_eps: expected a bool, got {clipped_eps!r}")
    if math.isinf(r):
        return plan
    table = plan.table.clone()
    table[:, coefs.CLIP] = r
    if not clipped_eps:
        table[:, coefs.G] = -table[:, coefs.A]
        table[:, coefs.B] = 1.0
    return dataclasses.replace(plan, table=table)


def _plan_euler_ancestral(sigmas, conv, *, eta, s_noise, clip_denoised=math.inf, clipped_eps=True, split="ve"):
    build = _ancestral_builder(split, coef_tables.euler_ancestral, coef_tables_flow.euler_ancestral_rf)
    plan = build(sigmas, conv=conv, **_ancestral_knobs(eta, s_noise))
    return _clip_denoised(plan, clip_denoised, clipped_eps)


def _plan_heun(sigmas, conv, *, s_churn, s_tmin, s_tmax, s_noise):
    return coef_tables.fold_second_calls(coef_tables.heun(sigmas, conv=conv,
                                                            **_churn_knobs(s_churn, s_tmin, s_tmax, s_noise)))


def _plan_heun_flow(sigmas, conv):
    return coef_tables.fold_second_calls(coef_tables_flow.heun_flow(sigmas, conv=conv))


def _plan_dpm_2(sigmas, conv, *, s_churn, s_tmin, s_tmax, s_noise):
    return coef_tables.fold_second_calls(coef_tables.dpm_2(sigmas, conv=conv,
                                                            **_churn_knobs(s_churn, s_tmin, s_tmax, s_noise)))


def _plan_dpm_2_ancestral(sigmas, conv, *, eta, s_noise, split="ve"):
    build = _ancestral_builder(split, coef_tables.dpm_2_ancestral, coef_tables_flow.dpm_2_ancestral_rf)
    plan = build(sigmas, conv=conv, **_ancestral_knobs(eta, s_noise))
    return coef_tables.fold_second_calls(plan)


def _plan_dpmpp_2s_ancestral(sigmas, conv, *, eta, s_noise, split="ve"):
    build = _ancestral_builder(split, coef_tables.dpmpp_2s_ancestral, coef_tables_flow.dpmpp_2s_ancestral_rf)
    plan = build(sigmas, conv=conv, **_ancestral_knobs(eta, s_noise))
    return coef_tables.fold_second_calls(plan)


def _plan_dpmpp_2m(sigmas, conv):
    return coef_tables.dpmpp_2m(sigmas, conv=conv)


def _plan_dpmpp_2m_sde(sigmas, conv, *, eta, s_noise, solver_type):
    return coef_tables.dpmpp_2m_sde(sigmas, eta=_knob(eta, "eta"), s_noise=_knob(s_noise, "s_noise"),
                                    solver_type=_solver_type(solver_type), conv=conv)


def _plan_dpmpp_3m_sde(sigmas, conv, *, eta, s_noise):
    return coef_tables_3m.dpmpp_3m_sde(sigmas, conv=conv, **_ancestral_knobs(eta, s_noise))


def _plan_dpmsolver_3m(sigmas, conv, *, eta, solver_order, solver_type, lower_order_final, euler_at_final):
    if eta not in (0, 1) or isinstance(eta, bool):
        raise ValueError(f"eta: expected 0 (diffusers' 'dpmsolver++') or 1 ('sde-dpmsolver++'), got {eta!r}")
    if isinstance(solver_order, bool) or not isinstance(solver_order, numbers.Integral) \
            or solver_order not in (1, 2, 3):
        raise ValueError(f"solver_order: expected 1, 2 or 3, got {solver_order!r}")
    for name, value in (("lower_order_final", lower_order_final), ("euler_at_final", euler_at_final)):
        if not isinstance(value, bool):
            raise TypeError(f"{name}: expected a bool, got {value!r}")
    orders = coef_tables_3m.dpmsolver_orders(len(sigmas) - 1, solver_order=int(solver_order),
                                             lower_order_final=lower_order_final, euler_at_final=euler_at_final)
    return coef_tables_3m.dpmsolver_multistep(sigmas, orders, sde=eta == 1, solver_type=_solver_type(solver_type),
                                              conv=conv)


def _plan_dpmpp_sde(sigmas, conv, *, eta, s_noise, r, explicit_noise=False):
    r = _knob(r, "r", hi=1.0)
    if r == 0:  # r = 0 puts the second call at sigma itself: fac = 1/(2r) is infinite
        raise ValueError("r: expected a value in (0, 1], got 0.0")
    return coef_tables.fold_second_calls(coef_tables_dpmpp_sde.dpmpp_sde(sigmas, conv=conv, r=r,
                                                                        explicit_noise=explicit_noise,
                                                                        **_ancestral_knobs(eta, s_noise)))


def _plan_ge(sigmas, conv, *, gamma, mu, clip_denoised=math.inf):
    plan = coef_tables.ge(sigmas, gamma=_knob(gamma, "gamma", -math.inf), mu=_knob(mu, "mu", 0.0, 1.0, True),
                          conv=conv)
    return _clip_denoised(plan, clip_denoised)  # eps = (x - D)/sigma of the clipped D, as GEScheduler's


def _plan_sde(sigmas, conv, *, lam, integrator):
    if integrator not in coef_tables.INTEGRATORS:
        raise ValueError(f"integrator: expected one of {coef_tables.INTEGRATORS}, got {integrator!r}")
    return coef_tables.sde(sigmas, lam=_knob(lam, "lam"), integrator=integrator, conv=conv)


def _plan_lcm(sigmas, conv, *, s_noise, s_noise_end=None):
    """Latent consistency sampling (k-diffusion's and ComfyUI's ``sample_lcm``): ``x' = D + s_i*sigma_next*xi``,
    no noise on a step to 0; ``s_i = s_noise + (s_noise_end - s_noise)*i/(N - 1)`` (ComfyUI's ramp; 0 for N = 1)."""
    s_noise = _knob(s_noise, "s_noise")
    end = s_noise if s_noise_end is None else _knob(s_noise_end, "s_noise_end")
    n = len(sigmas) - 1
    ramp = [s_noise + (end - s_noise) * (i / (n - 1) if n > 1 else 0.0) for i in range(n)]
    rows = [coef_tables._conv_row(conv, s, b=1.0, s=si * sn) for s, sn, si in zip(sigmas[:-1], sigmas[1:], ramp)]
    return coef_tables._plan(rows, sigmas[:-1], sigmas[:-1])


def _plan_unipc(sigmas, conv, *, order, solver_type, lower_order_final, disable_corrector, predict_x0):
    return coef_tables_unipc.plan(sigmas, conv, order=order, solver_type=solver_type,
                                  lower_order_final=lower_order_final, disable_corrector=disable_corrector,
                                  predict_x0=predict_x0)


def _plan_deis(sigmas, conv, *, order, lower_order_final):
    return coef_tables_deis.plan(sigmas, conv, order=order, lower_order_final=lower_order_final)


def _plan_plms(sigmas, conv):
    return coef_tables.fold_second_calls(coef_tables_plms.plms(sigmas, conv=conv))


def _plan_ipndm(sigmas, conv, *, max_order):
    return coef_tables_plms.ipndm(sigmas, max_order=max_order, conv=conv)


def _plan_ipndm_v(sigmas, conv, *, max_order):
    return coef_tables_plms.ipndm_v(sigmas, max_order=max_order, conv=conv)


def _plan_dpm_fast(sigmas, conv, *, eta, s_noise):
    """dpm_fast on a schedule as ComfyUI runs it: N model calls from sigmas[0] to the last non-zero sigma."""
    knobs = _ancestral_knobs(eta, s_noise)
    return coef_tables_dpm_fast.dpm_fast(*coef_tables_dpm_fast.from_sigmas(sigmas), conv=conv, **knobs)


def _plan_res_multistep(sigmas, conv, *, eta, s_noise):
    return coef_tables_res.res_multistep(sigmas, conv=conv, **_ancestral_knobs(eta, s_noise))


def _plan_er_sde(sigmas, conv, *, s_noise, noise_scaler, max_stage):
    return coef_tables_er_sde.er_sde(sigmas, s_noise=_knob(s_noise, "s_noise"), max_stage=max_stage, conv=conv,
                                     noise_scaler=noise_scaler)


def _plan_sa_solver(sigmas, conv, *, predictor_order, corrector_order, tau, predict_x0, lower_order_final):
    for name, value, top in (("predictor_order", predictor_order, 3), ("corrector_order", corrector_order, 4)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= top:
            raise ValueError(f"{name}: expected an int in 1..{top}, got {value!r}")
    for name, value in (("predict_x0", predict_x0), ("lower_order_final", lower_order_final)):
        if not isinstance(value, bool):
            raise TypeError(f"{name}: expected a bool, got {value!r}")
    if isinstance(tau, torch.Tensor):
        raise TypeError(f"tau: expected a number or a sequence of numbers (a tensor: pass .tolist()), got {tau!r}")
    return coef_tables_sasolver.plan(sigmas, conv, predictor_order=int(predictor_order),
                                     corrector_order=int(corrector_order), tau=tau, predict_x0=predict_x0,
                                     lower_order_final=lower_order_final)


def _plan_lms(sigmas, conv, *, order):
    return coef_tables_lms.lms(sigmas, order=order, conv=conv)


def _plan_dpmsolver_single(sigmas, conv, *, order, solver_type, lower_order_final, predict_x0, orders):
    return coef_tables_singlestep.plan(sigmas, conv, order=order, solver_type=solver_type,
                                       lower_order_final=lower_order_final, predict_x0=predict_x0, orders=orders)


PLANS = {"euler": _plan_euler, "euler_ancestral": _plan_euler_ancestral, "heun": _plan_heun,
         "dpm_2": _plan_dpm_2, "dpm_2_ancestral": _plan_dpm_2_ancestral,
         "dpmpp_2s_ancestral": _plan_dpmpp_2s_ancestral, "dpmpp_2m": _plan_dpmpp_2m,
         "dpmpp_2m_sde": _plan_dpmpp_2m_sde, "dpmpp_3m_sde": _plan_dpmpp_3m_sde, "dpmsolver_3m": _plan_dpmsolver_3m,
         "dpmpp_sde": _plan_dpmpp_sde,
         "lcm": _plan_lcm, "ge": _plan_ge, "sde": _plan_sde, "unipc": _plan_unipc,
         "deis": _plan_deis, "plms": _plan_plms, "ipndm": _plan_ipndm, "lms": _plan_lms,
         "dpmsolver_single": _plan_dpmsolver_single, "ipndm_v": _plan_ipndm_v, "dpm_fast": _plan_dpm_fast,
         "res_multistep": _plan_res_multistep, "res_multistep_ancestral": _plan_res_multistep,
         "er_sde": _plan_er_sde, "sa_solver": _plan_sa_solver, "heun_flow": _plan_heun_flow}
"""method -> ``plan(host_sigmas, conv, **knobs)``; every knob is passed (the defaults live in the samplers'
signatures, listed by :func:`diffkern.sampling.knobs`)."""
