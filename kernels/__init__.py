"""Triton kernels of diffkern (installed as ``diffkern.kernels``; imported only when the triton backend is used)."""
from ._interpreter_compat import apply as _apply_interpreter_compat

_apply_interpreter_compat()
