"""Triton kernels of diffkern (installed as ``diffkern.kernels``; imported only when the triton backend is used)."""
