"""VP-space DDIM step with the semantics of diffusers' ``DDIMScheduler.step`` (``math-samplers.md`` 5).

This is a coefficient mapping onto the generic fused step, not a kernel of its own: with ``x := z``
(the VP sample) the step is ``z_prev = a*z + b*D + g*D_raw + s*xi`` where ``D_raw = p*z + q*m`` is the
x0 prediction of any prediction type and ``D`` its clipped value. For every prediction type,
``z = sqrt(ab)*x0_hat + sqrt(1-ab)*eps_hat`` holds exactly, so eps_hat is
``(z - sqrt(ab)*x0)/sqrt(1-ab)`` with x0 clipped (``use_clipped_model_output``) or not (``g`` term).
"""
from __future__ import annotations

import math
import numbers

import torch

from . import coefs
from .sampler_step import sampler_step

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def ddim_row(alpha_prod_t: float, alpha_prod_t_prev: float, *, eta: float = 0.0, prediction_type: str = "epsilon",
             clip_sample: bool = False, clip_sample_range: float = 1.0,
             use_clipped_model_output: bool = False) -> list[float]:
    """Coefficient row reproducing ``DDIMScheduler.step`` from alpha-bar ``alpha_prod_t`` to ``alpha_prod_t_prev``.

    All arithmetic in float64 on the host. ``x0_out`` of the fused step is diffusers'
    ``pred_original_sample``. ``eta < 0`` is diffusers' too: the direction term of ``|eta|`` and no noise (its
    noise is added only for eta > 0); an ``|eta| > 1`` that makes the direction's square root imaginary (diffusers'
    NaN) raises ValueError naming eta.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type: expected one of {PREDICTION_TYPES}, got {prediction_type!r}")
    for name, v in (("alpha_prod_t", alpha_prod_t), ("alpha_prod_t_prev", alpha_prod_t_prev)):
        if not (0.0 <= v <= 1.0):
            raise ValueError(f"{name}: expected a value in [0, 1], got {v}")
    if not math.isfinite(eta):
        raise ValueError(f"eta: expected a finite value, got {eta}")
    if isinstance(eta, numbers.Real):  # numpy scalars as Python floats: np.float32 arithmetic would stay float32
        eta = float(eta)
    if clip_sample and not clip_sample_range > 0:
        raise ValueError(f"clip_sample_range: expected > 0, got {clip_sample_range}")
    ab, ab_p = float(alpha_prod_t), float(alpha_prod_t_prev)
    sa, sb = math.sqrt(ab), math.sqrt(1.0 - ab)
    if sb == 0:  # the row eliminates eps_hat = (z - sqrt(ab)*x0)/sqrt(1-ab): no noise left to eliminate
        raise ValueError("alpha_prod_t: 1 (a noise-free sample) cannot be stepped from; expected a value < 1")
    if prediction_type == "epsilon":
        if sa == 0:
            raise ValueError("alpha_prod_t: 0 (zero terminal SNR) cannot be used with epsilon prediction")
        p, q = 1.0 / sa, -sb / sa
    elif prediction_type == "sample":
        p, q = 0.0, 1.0
    else:
        p, q = sa, -sb
    var = (1 - ab_p) / (1 - ab) * (1 - ab / ab_p) if ab_p > 0 else 0.0
    std = eta * math.sqrt(max(var, 0.0))  # negative for eta < 0, as diffusers' std_dev_t; squared below
    direction = 1.0 - ab_p - std * std
    if direction < 0 and eta * eta > 1:  # (|eta| <= 1 keeps it >= 0 but for rounding, which the clamp absorbs)
        raise ValueError(f"eta: {eta} makes 1 - alpha_prod_t_prev - (eta*sigma_t)^2 = {direction:.3g} < 0 on the "
                         f"step from alpha-bar {ab} to {ab_p} (diffusers takes its square root: NaN); expected "
                         f"|eta| <= {math.sqrt((1.0 - ab_p) / var):.6g} there")
    k = math.sqrt(max(direction, 0.0))  # the "direction pointing to x_t" coefficient
    eps_on_x0 = -k * sa / sb  # coefficient of x0 inside k*eps_hat
    clipped = clip_sample and use_clipped_model_output
    return coefs.row(a=k / sb, b=math.sqrt(ab_p) + (eps_on_x0 if clipped or not clip_sample else 0.0),
                     g=0.0 if clipped or not clip_sample else eps_on_x0, s=std if eta > 0 else 0.0,
                     p=p, q=q, clip=clip_sample_range if clip_sample else math.inf)


def ddim_step(sample, model_output, alpha_prod_t: float, alpha_prod_t_prev: float, *, eta: float = 0.0,
              prediction_type: str = "epsilon", clip_sample: bool = False, clip_sample_range: float = 1.0,
              use_clipped_model_output: bool = False, noise=None, seed=None, step: int = 0, out=None,
              x0_out=None, backend=None):
    """One diffusers-compatible DDIM step; returns ``(prev_sample, pred_original_sample)``.

    ``sample``, ``model_output``: ``(B, C, H, W)`` (any shape) float tensors. ``noise``: the variance
    noise (shape of sample), else Philox noise from ``seed`` at counter ``step``. For a loop, build a
    table of :func:`ddim_row` once and call :func:`sampler_step` with a row index instead.
    """
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:  # numpy ints too
        raise ValueError(f"step: expected a Python int >= 0 (the Philox step counter), got {step!r}")
    step = int(step)
    if not isinstance(sample, torch.Tensor):
        raise TypeError(f"sample: expected a tensor, got {type(sample).__name__}")
    # checked here too so that the message names this function's arguments (the fused op's are x and model_out)
    for name, t in (("model_output", model_output), ("noise", noise)):
        if isinstance(t, torch.Tensor) and t.shape != sample.shape:
            raise ValueError(f"{name}: expected shape {tuple(sample.shape)} (that of sample), got {tuple(t.shape)}")
    row = coefs.table([ddim_row(alpha_prod_t, alpha_prod_t_prev, eta=eta, prediction_type=prediction_type,
                                clip_sample=clip_sample, clip_sample_range=clip_sample_range,
                                use_clipped_model_output=use_clipped_model_output)], device=sample.device)
    # The fused op reads row ``step`` and draws at counter ``step``: one row copied to the device, repeated there.
    table = row.expand(step + 1, coefs.NCOEF)
    x0 = x0_out if x0_out is not None else torch.empty_like(sample)
    prev = sampler_step(sample, model_output, table, step, noise=noise, seed=seed, out=out, x0_out=x0,
                        backend=backend)
    return prev, x0
