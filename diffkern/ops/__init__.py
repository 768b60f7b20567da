"""Fused per-step ops (``torch.ops.diffkern.*``) and the backend registry.

Importing this package defines the op schemas and registers each family; it imports neither Triton
nor the compiled extension (those load on first use of their backend).
"""
from . import coefs, philox
from .philox import randn
from .ddim import ddim_row, ddim_step
from . import hold
from .hold import hold_perturb, hold_transition
from .iadb import iadb_blend, iadb_blend_reference, iadb_deblend, iadb_deblend_two_head
from .likelihood import likelihood_accum, likelihood_accum_reference
from .optimal_denoiser import optimal_denoiser, optimal_denoiser_reference
from .registry import BACKENDS, BackendUnavailable, available, backend_status, cuda_loader, ops, resolve
from .sampler_step import sampler_step, sampler_step_reference

__all__ = ["BACKENDS", "BackendUnavailable", "available", "backend_status", "coefs", "cuda_loader", "ddim_row", "ddim_step",
           "hold", "hold_perturb", "hold_transition",
           "iadb_blend", "iadb_blend_reference", "iadb_deblend", "iadb_deblend_two_head",
           "likelihood_accum", "likelihood_accum_reference", "ops", "optimal_denoiser",
           "optimal_denoiser_reference", "philox",
           "randn", "resolve", "sampler_step", "sampler_step_reference"]
