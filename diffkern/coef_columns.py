"""A coefficient table assembled column by column: the table :func:`diffkern.ops.coefs.table` stacks from
``coefs.row(**named, **conv)`` rows, bitwise (the same Python floats stored in the same float64 slots), without a
Python call per row.

A diffusers drop-in builds its plan at the first ``step()`` of every loop, so per-row Python there is part of the
per-step cost (Heun's 2N rows took ~0.5 ms for N = 50 row by row, ~5 us of each of its 99 steps).
"""
from __future__ import annotations

import array
from typing import Mapping, Sequence

import numpy as np
import torch

from .ops import coefs

_INDEX = {name: k for k, name in enumerate(coefs.SLOT_NAMES)}
_DEFAULT = coefs.row()


def _floats(values, name: str) -> np.ndarray:
    """``values`` as float64 through a C double buffer (as :func:`coefs.table`: each value's ``float()``, ~5x faster
    than numpy's conversion of a list)."""
    try:
        return np.frombuffer(array.array("d", values), dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name}: expected real numbers, got a value that is not ({e})") from None


def table(n: int, columns: Mapping[str, Sequence[float]], convs: Sequence[Mapping[str, float]] = (),
          rows: Sequence[Sequence[float]] = ()) -> torch.Tensor:
    """The validated float64 ``(n + len(rows), NCOEF)`` CPU table whose row k < n is ``coefs.row(**{name:
    columns[name][k]}, **convs[k])`` and whose last rows are ``rows`` (from :func:`coefs.row`).

    ``columns``: slot name -> n numbers; ``convs``: n mappings (a row's model-output conversion: "p", "q", "w",
    "clip", ...), or empty for none. A slot named both by a column and by a row's conversion raises TypeError
    (as ``coefs.row(**named, **conv)`` would); unknown slot names and non-finite values raise ValueError."""
    unknown = set(columns).union(*convs) - _INDEX.keys()
    if unknown:
        raise ValueError(f"columns: unknown coefficient(s) {sorted(unknown)}; expected a subset of "
                         f"{coefs.SLOT_NAMES}")
    if convs and len(convs) != n:
        raise ValueError(f"convs: expected {n} conversions (one per row), got {len(convs)}")
    out = np.empty((n + len(rows), coefs.NCOEF), dtype=np.float64)
    out[:n] = _DEFAULT
    for name, values in columns.items():
        if len(values) != n:
            raise ValueError(f"columns[{name!r}]: expected {n} values, got {len(values)}")
        out[:n, _INDEX[name]] = _floats(values, f"columns[{name!r}]")
    for name in set().union(*convs):
        if name in columns:
            raise TypeError(f"convs: slot {name!r} is also given as a column")
        default = _DEFAULT[_INDEX[name]]
        out[:n, _INDEX[name]] = _floats([c.get(name, default) for c in convs], f"convs[...][{name!r}]")
    if rows:
        out[n:] = rows
    result = torch.from_numpy(out)
    coefs.validate(result)
    return result
