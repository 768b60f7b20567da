"""Every ``torch.ops.diffkern`` schema, defined in one place (Python, so the namespace, the fakes and
the reference path exist even when ``diffkern._C`` was not built).

Each family ``<name>`` gets two ops with the same schema:
  ``diffkern::<name>``         implemented by ``diffkern._C`` (CPU: C++ kernels; CUDA: CUDA kernels)
  ``diffkern::<name>_triton``  implemented by the Triton launcher in ``diffkern.kernels.<name>``
All ops write into caller-provided, contiguous outputs (``Tensor(a!)``) and return nothing, so
in-place use (``out`` is ``x``) needs no copy and a captured launch reuses the same buffers.
"""
from __future__ import annotations

from typing import Callable

import torch

LIB = torch.library.Library("diffkern", "FRAGMENT")

SCHEMAS = {
    # history2 and history3 (the earlier histories of third- and fourth-order samplers) came last, so calls written
    # before them still bind.
    "sampler_step": (
        "(Tensor x, Tensor model_out, Tensor? model_out_uncond, Tensor? history, Tensor? noise, "
        "Tensor coef, int step, Tensor seed, Tensor(a!) out, Tensor(b!)? x0_out, Tensor(c!)? history_out, "
        "Tensor? history2=None, Tensor? history3=None) -> ()"
    ),
    "iadb_blend": "(Tensor x0, Tensor x1, Tensor alpha, Tensor(a!) out, Tensor(b!)? target_out) -> ()",
    "philox_normal": "(Tensor seed, int step, int offset, Tensor(a!) out) -> ()",
    "likelihood_accum": (
        "(Tensor y, Tensor denoised, Tensor? noise, Tensor sigma, Tensor weight, Tensor cv, int step, "
        "Tensor seed, Tensor(a!) acc) -> ()"
    ),
    "optimal_denoiser": "(Tensor x, Tensor data, Tensor data_half_sq, Tensor sigma, Tensor(a!) out) -> ()",
    "hold_transition": "(Tensor z, Tensor eps_hat, Tensor? noise, Tensor coef, int step, Tensor seed, Tensor(a!) out) -> ()",
    "hold_perturb": (
        "(Tensor z0, Tensor mean_mat, Tensor chol, Tensor? noise, int step, Tensor seed, Tensor(a!) out, "
        "Tensor(b!)? eps_out) -> ()"
    ),
}

for _name, _sig in SCHEMAS.items():
    LIB.define(_name + _sig)
    LIB.define(_name + "_triton" + _sig)


def register_fake(name: str, fn: Callable) -> None:
    """Register one fake (meta) implementation for ``name`` and ``name_triton``."""
    for op in (name, name + "_triton"):
        torch.library.register_fake(f"diffkern::{op}", fn, lib=LIB)


_triton_loaded: dict[str, Callable] = {}


def triton_op(name: str, launch: Callable) -> Callable:
    """Bind the Triton launcher ``launch`` as the CPU (interpreter) and CUDA impl of ``name_triton``.

    Returns the op handle ``torch.ops.diffkern.<name>_triton``; binding happens once per process.
    """
    if name not in _triton_loaded:
        for key in ("CPU", "CUDA"):
            LIB.impl(name + "_triton", launch, key)
        _triton_loaded[name] = getattr(torch.ops.diffkern, name + "_triton")
    return _triton_loaded[name]
