"""diffusers' ``DEISMultistepScheduler`` and ``SASolverScheduler`` as fused loops (:func:`_deis_spec`,
:func:`_sasolver_spec`): VP multistep solvers on the scheduler's own sigmas, and the schedules of theirs the fused
loop refuses; split from :mod:`.loop_spec`, whose :func:`~.loop_spec.loop_spec` calls them."""
from __future__ import annotations

import math

from .. import coef_tables_deis
from .loop_spec import LoopSpec, _check_unipc_decreasing, _drop_identity_end, _unsupported


def _deis_spec(ours) -> LoopSpec:
    """DEIS as the ``deis`` sampler on its VP sigmas. A last step from sigma_min to itself (Karras/exponential/beta
    sigmas, or timesteps ending at t = 0) is the identity in diffusers at any order, and is dropped; the kept steps
    must then keep diffusers' orders, which its lower_order_final (a step count below 15) can shift."""
    name, cfg = type(ours).__name__, ours.config
    if cfg.use_flow_sigmas:
        raise _unsupported(name, "use_flow_sigmas", True, "the UNet pipelines' loop runs VP schedules; the flow "
                           "pipelines' loop runs a FlowMatchEulerDiscreteScheduler")
    ts, sig = list(ours._host_timesteps), list(ours.sigmas_host)
    key = next((k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if cfg[k]),
               "timestep_spacing")
    if len(ts) == 1 and math.isclose(sig[0], sig[1], rel_tol=1e-9):
        raise _unsupported(name, key, cfg[key], "its single step goes from its one sigma to itself")
    sig, kept = _drop_identity_end(name, sig, ts)
    _check_unipc_decreasing(name, cfg, sig, len(ts))
    order = int(cfg.solver_order)
    want = coef_tables_deis.deis_orders(len(ts), order=order, lower_order_final=cfg.lower_order_final)[:len(kept)]
    for low in (bool(cfg.lower_order_final), not cfg.lower_order_final):
        if coef_tables_deis.deis_orders(len(kept), order=order, lower_order_final=low) == want:
            return LoopSpec("deis", sig, kept, {"order": order, "lower_order_final": low}, vp=True)
    raise _unsupported(name, key, cfg[key], f"with solver_order={order} and {len(ts)} steps its last step goes from "
                       f"sigma_min to itself and diffusers' orders of the others, {want}, are not those of a "
                       f"{len(kept)}-step deis loop; use lower_order_final=False, or 15 steps or more")


def _sasolver_spec(ours) -> LoopSpec:
    """SA-Solver as ``sa_solver`` on its VE sigmas (ending at the table's smallest, no jump to 0) with the taus of its
    ``tau_func`` at each timestep. A Karras/exponential/beta schedule's last step goes from sigma_min to itself and
    still carries the corrector of the step before, which a loop of strictly decreasing sigmas cannot express."""
    name, cfg = type(ours).__name__, ours.config
    if cfg.use_flow_sigmas:
        raise _unsupported(name, "use_flow_sigmas", True, "the UNet pipelines' loop runs VP schedules")
    key = next((k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if cfg[k]), None)
    if key:
        raise _unsupported(name, key, True, "its last step goes from sigma_min to itself, where diffusers still "
                           "applies the previous step's corrector; the fused loop needs strictly decreasing sigmas")
    sig, ts = list(ours.sigmas_host), list(ours._host_timesteps)
    _check_unipc_decreasing(name, cfg, sig, len(ts))
    knobs = {"predictor_order": int(cfg.predictor_order), "corrector_order": int(cfg.corrector_order),
             "tau": tuple(ours._taus), "predict_x0": bool(ours.predict_x0),
             "lower_order_final": bool(cfg.lower_order_final)}
    return LoopSpec("sa_solver", sig, ts, knobs, vp=True)
