"""diffkern: fused-kernel sampling engine for diffusion models.

``import diffkern`` is cheap: it needs neither the compiled extension, nor a GPU, nor Triton.
"""
from . import ops
from .ops import BackendUnavailable, available

__version__ = "0.1.0"
__all__ = ["BackendUnavailable", "available", "ops", "__version__"]
