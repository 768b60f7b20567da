"""Bits per dimension of discrete 8-bit data from a continuous log-density, and uniform dequantisation.

Image likelihoods are reported in bits per dimension (bpd) of the discrete data ``k in {0..255}^D``. A
diffusion model (and :func:`diffkern.likelihood.log_likelihood`) gives a continuous density ``p_x`` of the
scaled data ``x = scale*k + shift`` (``k/127.5 - 1``: scale = 2/255, shift = -1). Uniform dequantisation
(Theis et al. 2016; Song et al. 2021, Score SDE) turns it into a bound on the discrete probability: the raw
values ``y = k + u`` (u uniform on one bin of width 1) have density ``p_y(y) = p_x(scale*y + shift) * scale^D``,
and by Jensen ``ln P(k) = ln int_bin p_y >= E_u ln p_y(k + u)``, so

    bpd(k) = -log2 P(k) / D  <=  E_u[ -(ln p_x(x_u) + D ln scale) ] / (D ln 2),   x_u = scale*(k + u) + shift.

:func:`dequantize` draws ``x_u``; :func:`bits_per_dim` applies the conversion to ``ln p_x(x_u)`` (average it
over dequantisations, or over a test set, which averages over u as well). The shift drops out; the scale
does not: the same data in [0, 1] (scale 1/255) and in [-1, 1] (scale 2/255) have log-densities that differ
by exactly ``D ln 2`` nats (1 bit per dimension), and give the same bpd.

Conventions: Song et al.'s code dequantises ``(k + u)/256`` on [0, 1) (mapped to [-1, 1) when centred), i.e.
scale = 1/256 or 2/256 with u in [0, 1): their "+8 or +7 bits" offset is ``-log2(scale)``. diffusers and Ho
et al. map ``k/127.5 - 1`` (scale = 2/255); Ho et al. 2020 report bpd with a discrete decoder (a Gaussian
integrated over each bin, the outer bins extended to +-inf) instead of dequantisation, which this module does
not compute: numbers from the two routes are comparable only as bounds of the same discrete NLL.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch

from .likelihood_trace import check_seed

LEVELS = 256  # 8-bit data
_FLOATS = (torch.float32, torch.float64)  # a 16-bit float near +-1 resolves 1/16 (float16) to 1/2 (bfloat16) of a bin


def _check_scale(scale, name: str = "scale") -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{name}: expected a finite float > 0 (one quantisation step in the model's units, "
                         f"e.g. 2/255), got {scale!r}")
    return float(scale)


def bits_per_dim(log_prob: Union[float, torch.Tensor], dims: int, *, scale: float = 2 / 255):
    """Bits per dimension of discrete data from ``ln p_x`` in nats, the continuous density of the scaled data.

    Args:
        log_prob: ``ln p_x(x)`` per point: a float, or a tensor of any shape and device (e.g. the (B,)
            ``LogLikelihood.log_prob``, or ``ode_log_likelihood``'s result); at dequantised points for
            discrete data (:func:`dequantize`), where the result bounds the discrete bpd from above.
        dims: D, the dimensions of one point (3*32*32 for a CIFAR-10 image), an int >= 1.
        scale: one quantisation step in x's units, ``x = scale*k + shift``. 2/255: ``k/127.5 - 1``
            (diffusers, Ho et al.); 2/256: Song et al.'s ``2*(k + u)/256 - 1``; 1/255 or 1/256 for [0, 1]
            data; 1: no change of units (``-ln p/(D ln 2)``, bits per dimension of the density itself).

    Returns:
        ``-(log_prob + D*ln(scale)) / (D*ln 2)``: a float64 tensor of log_prob's shape on its device (a
        float for a float). A standard error converts without the offset: ``stderr / (D*ln 2)``.
    """
    if isinstance(dims, bool) or not isinstance(dims, numbers.Integral) or dims < 1:
        raise ValueError(f"dims: expected an int >= 1 (dimensions of one point, e.g. 3*32*32), got {dims!r}")
    dims = int(dims)
    scale = _check_scale(scale)
    if isinstance(log_prob, torch.Tensor):
        if not (log_prob.is_floating_point() or log_prob.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"log_prob: expected a real tensor of log-densities in nats, got dtype {log_prob.dtype}")
        log_prob = log_prob.to(torch.float64)
    elif isinstance(log_prob, bool) or not isinstance(log_prob, numbers.Real):
        raise TypeError(f"log_prob: expected a float or a tensor of log-densities in nats, got "
                        f"{type(log_prob).__name__}")
    else:
        log_prob = float(log_prob)  # a float for a float, numpy scalars included
    return -(log_prob / dims + math.log(scale)) / math.log(2)


def _grid_index(x: torch.Tensor, scale: float, shift: float) -> torch.Tensor:
    """The integer levels k (float64) of x: raw integers, or floats on the grid ``scale*k + shift``."""
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"x: expected integer levels (uint8) or a float tensor on the grid, got dtype {x.dtype}")
    if not x.is_floating_point():
        k = x.to(torch.float64)
        what = "integer levels"
    else:
        if x.dtype not in _FLOATS:
            raise TypeError(f"x: a {x.dtype} tensor cannot hold the 256 levels to a fraction of a bin: pass the "
                            f"uint8 levels or float32/float64 values")
        k = ((x.to(torch.float64) - shift) / scale).round()
        # Rounding slack of the caller's own mapping (k/127.5 - 1 vs 2*k/255 - 1): a few ulps of the range.
        tol = 8 * torch.finfo(x.dtype).eps * (abs(shift) + (LEVELS - 1) * scale)
        off = (x.to(torch.float64) - (scale * k + shift)).abs()
        if off.numel() and not bool(off.max() <= tol):
            raise ValueError(f"x: expected values on the grid scale*k + shift (scale={scale:.6g}, shift={shift:g}, "
                             f"k integer), but one is {float(off.max()) / scale:.3g} bins off it (already "
                             f"dequantised, or a different scale/shift?)")
        what = f"levels (x - shift)/scale (scale={scale:.6g}, shift={shift:g})"
    if k.numel() and not (bool(k.min() >= 0) and bool(k.max() <= LEVELS - 1)):
        raise ValueError(f"x: expected {what} in [0, {LEVELS - 1}], got [{float(k.min()):g}, {float(k.max()):g}]")
    return k


def dequantize(x: torch.Tensor, *, scale: float = 2 / 255, shift: float = -1.0, seed: Optional[int] = None,
               generator: Optional[torch.Generator] = None, centred: bool = True,
               dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Uniform dequantisation of 8-bit data: ``x_u = scale*(k + u) + shift``, u uniform on one bin.

    Args:
        x: integer levels k in [0, 255] (a uint8 image tensor), or a float32/float64 tensor already on the
            grid ``scale*k + shift`` (``k/127.5 - 1`` with the defaults); any shape and device.
        scale, shift: the affine map of the levels to the model's units (default: [-1, 1], diffusers').
        seed: int in [0, 2**63): the noise is ``torch.rand`` of the CPU generator seeded with it, so the
            same seed gives the same x_u on every device.
        generator: a ``torch.Generator`` to draw from instead (on its own device); neither: torch's global one.
        centred: u in [-1/2, 1/2), the bin centred on the grid point the model was trained on (default);
            False: u in [0, 1), Song et al.'s ``(k + u)/256`` (with scale 1/256 or 2/256).
        dtype: float32 or float64 of the result; None: x's dtype if floating, else float32.

    Returns:
        A tensor of x's shape and device: every element lies in its own bin, ``[scale*(k + lo) + shift,
        scale*(k + lo + 1) + shift)`` with lo = -1/2 (centred) or 0, up to the rounding of ``dtype``. For any
        continuous density, ``bits_per_dim`` of ``ln p_x(x_u)`` averaged over u bounds the discrete bpd of k.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor of 8-bit levels or grid values, got {type(x).__name__}")
    scale = _check_scale(scale)
    if isinstance(shift, bool) or not isinstance(shift, numbers.Real) or not math.isfinite(shift):
        raise ValueError(f"shift: expected a finite float (the value of level 0), got {shift!r}")
    shift = float(shift)
    if not isinstance(centred, bool):
        raise TypeError(f"centred: expected a bool, got {type(centred).__name__}")
    k = _grid_index(x, scale, float(shift))
    if dtype is None:
        dtype = x.dtype if x.is_floating_point() else torch.float32
    if dtype not in _FLOATS:
        raise TypeError(f"dtype: expected torch.float32 or torch.float64, got {dtype}")
    if seed is not None and generator is not None:
        raise ValueError("seed: give seed or generator, not both")
    if seed is not None:
        check_seed(seed)
        generator = torch.Generator().manual_seed(int(seed))
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    noise_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(x.shape, generator=generator, dtype=torch.float64, device=noise_device).to(k.device)
    if centred:
        u = u - 0.5
    return (scale * (k + u) + shift).to(dtype)
