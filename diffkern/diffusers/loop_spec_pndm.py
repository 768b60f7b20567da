"""diffusers' ``PNDMScheduler`` as a fused loop (:func:`pndm_spec`), and its img2img tails, which are refused
(:func:`refuse_tail`); split from :mod:`.loop_spec`, whose :func:`~.loop_spec.loop_spec` and
:func:`~.loop_spec.tail_spec` call them."""
from __future__ import annotations

from .. import schedules
from .loop_spec import LoopSpec, _unsupported


def pndm_spec(ours) -> LoopSpec:
    """diffusers' PNDM with ``skip_prk_steps=True`` as ``plms`` on the VE sigmas of its N distinct timesteps (calls
    [t0, t1, t1, t2, ...]: the second is step 0's corrector, at sigma_1, so no call_timesteps are needed), N = 1 as
    ``euler`` (its single call). Each step goes from t to t - T//N, which must be the next timestep; a last step
    from alpha-bar(0) to itself (``set_alpha_to_one=False`` ending at t = 0) is the identity and is dropped."""
    name, cfg = type(ours).__name__, ours.config
    if not cfg.skip_prk_steps:
        raise _unsupported(name, "skip_prk_steps", False, "its Runge-Kutta steps (four calls at half steps, restarted "
                           "from the step's first sample) are no diffkern sampler")
    if cfg.prediction_type != "epsilon":
        raise _unsupported(name, "prediction_type", cfg.prediction_type, "diffusers' PLMS extrapolates the raw model "
                           "outputs (v), where the plms sampler extrapolates eps")
    ts = ours.plms_timesteps.tolist()
    ts = ts[:1] + ts[2:]  # the N distinct timesteps
    ratio = ours._ratio
    for i in range(len(ts) - 1):
        if ts[i] - ratio != ts[i + 1]:
            raise _unsupported(name, "timestep_spacing", cfg.timestep_spacing, f"with {len(ts)} steps, step {i} goes "
                               f"from t={ts[i]} to t={ts[i] - ratio}, which is not the next timestep {ts[i + 1]}: the "
                               "schedule is not continuous")
    ab_final = ours._alpha_bar(ts[-1] - ratio)
    sigmas = ours.train_sigmas[ts].tolist() + [schedules.alpha_bar_to_sigma(ab_final)]
    if len(ts) == 1:
        if ab_final == float(ours.alphas_cumprod[ts[0]]):
            raise _unsupported(name, "set_alpha_to_one", False, "its single step goes from t=0 to itself")
        return LoopSpec("euler", sigmas, ts, {}, vp=True)
    if ab_final == float(ours.alphas_cumprod[ts[-1]]):
        sigmas, ts = sigmas[:-1], ts[:-1]
    return LoopSpec("plms", sigmas, ts, {}, vp=True)


def refuse_tail(ours, begin: int):
    """An img2img pipeline's PNDM loop over ``timesteps[begin:]`` (begin > 0) is no plms loop: diffusers restarts its
    counter there, and the call list [t0, t1, t1, t2, ...] sliced past its repeated t1 feeds the third call a sample at
    t_{k+1} with the timestep t_{k+2} (from begin = 1: the second call restarts from t0 with a sample at t1)."""
    raise ValueError(f"accelerate: PNDMScheduler with strength < 1 (the loop starting at timesteps[{begin}]) is not "
                     "supported by the fused loop (diffusers' PNDM restarts its counter there and steps a sample from "
                     "one timestep as if it were at the next); run the pipeline with diffkern.diffusers.PNDMScheduler "
                     "as its scheduler instead")
