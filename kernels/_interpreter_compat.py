"""A fix for Triton's CPU interpreter (``TRITON_INTERPRET=1``) of Triton releases before 3.7 under NumPy >= 2.4.

The interpreter passes a runtime int argument to a kernel as a tensor holding a NumPy array of shape (1,), and
converts it back when it is a loop bound (``for start in range(0, n, BLOCK)``) with ``int(array)``. NumPy 2.4
refuses ``int`` of an array of more than zero dimensions ("only 0-dimensional arrays can be converted to Python
scalars"), so every kernel with a runtime loop bound (likelihood, optimal_denoiser) failed there. Later Triton
releases convert the one element itself; :func:`apply` makes the older ones do the same. Compiled (GPU) kernels
never run this code.
"""
from __future__ import annotations

import inspect

BROKEN = "int(self.handle.data)"  # the conversion of the affected releases, as their source spells it


def _index(self) -> int:
    return int(self.handle.data.item())


def apply() -> bool:
    """Replace the interpreter's tensor ``__index__`` where it is the affected one; returns whether it was replaced.

    Idempotent, and a no-op where Triton, its interpreter or the affected conversion is absent.
    """
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "diffkern_fixed", False):
        return False
    try:
        if BROKEN not in inspect.getsource(original):
            return False
    except (OSError, TypeError):  # no source to read: leave the interpreter as it is
        return False

    def patch_lang_tensor(tensor, *scope):
        original(tensor, *scope)
        if scope:  # releases that restore the patched attributes after each launch pass a scope
            scope[0].set_attr(tensor, "__index__", _index)
        else:
            tensor.__index__ = _index

    patch_lang_tensor.diffkern_fixed = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
