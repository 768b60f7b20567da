"""Denoiser networks and the built-in digits model (:mod:`diffkern.models.builtin`).

Importing this package is cheap (torch only); the weights load on :func:`load_builtin`.
"""
from .builtin import IMAGE_SHAPE, SIGMA_MAX, SIGMA_MIN, digits, load_builtin, load_denoiser, save_denoiser
from .unet import TinyUNet

__all__ = ["IMAGE_SHAPE", "SIGMA_MAX", "SIGMA_MIN", "TinyUNet", "digits", "load_builtin", "load_denoiser",
           "save_denoiser"]
