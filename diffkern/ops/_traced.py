"""Host-side lookups that ``torch.compile`` runs once, while it traces a front-end.

Imported only from inside a trace (so ``import diffkern`` never loads ``torch._dynamo``, nor Triton through it).
"""
from __future__ import annotations

import torch

from .registry import resolve


@torch.compiler.assume_constant_result
def backend(op: str, device_type: str, requested: str | None) -> str:
    """The backend :func:`~diffkern.ops.registry.resolve` picks (and loads) for ``op``: the lookup imports modules
    and reads the environment, which a trace cannot do, so a compiled caller keeps the backend it was traced with."""
    return resolve(op, device_type, requested)[0]
