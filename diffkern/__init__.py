"""diffkern: fused-kernel sampling engine for diffusion models.

``import diffkern`` is cheap: it needs neither the compiled extension, nor a GPU, nor Triton.
"""
import importlib

from . import ops
from .ops import BackendUnavailable, available

__version__ = "0.1.0"

# Public names loaded on first access (module __getattr__, PEP 562) so the import above stays cheap.
_LAZY_FUNCTIONS = {"sample": "sampling", "sample_iadb": "sampling", "knobs": "sampling", "log_likelihood": "likelihood"}
_LAZY_MODULES = ("analytic", "coef_tables", "graphs", "likelihood", "samplers", "sampling", "schedules", "wrappers")


def __getattr__(name):
    if name in _LAZY_FUNCTIONS:
        return getattr(importlib.import_module(f".{_LAZY_FUNCTIONS[name]}", __name__), name)
    if name in _LAZY_MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY_FUNCTIONS) + list(_LAZY_MODULES))


__all__ = ["BackendUnavailable", "available", "ops", "__version__", *_LAZY_FUNCTIONS, *_LAZY_MODULES]
