"""Layout of the per-step coefficient table read by the fused sampler step.

Every backend of ``diffkern::sampler_step`` computes, per element and in this order
(math in float32 for float16/bfloat16/float32 storage, in float64 for float64):

    m    = model_out                          if there is no unconditional output
         = u + W*(model_out - u)              classifier-free guidance, diffusers convention
    Draw = P*x + Q*m                          denoised estimate from any prediction type (affine)
    D    = clamp(Draw, -CLIP, CLIP)           CLIP = +inf: no clipping
    Du   = P*x + Q*u                          the unconditional denoised (u = model_out without one), unclipped
    out  = ((A*x + B*D) + G*Draw) [+ C*H] [+ C2*H2] [+ C3*H3] [+ S*xi] [+ BU*Du]
    x0_out      = D
    history_out = E*x + F*D [+ FU*Du]         (D itself, or eps = (x - D)/sigma)

H, H2 and H3 are the previous one, two and three values of a multistep sampler's history (third-order samplers
need H2, fourth-order ones such as LMS and PLMS H3). A bracketed term whose coefficient is exactly 0 is skipped: its tensor is not read, so an
uninitialised history buffer on the first steps cannot inject NaN. BU and FU are CFG++'s (Chung et al. 2024): a step
(and a history) along the unconditional prediction while x0_out is the guided one; with both 0 (every table written
before they existed) the result is bitwise that without them. xi is the counter-based normal of
``diffkern.ops.philox`` keyed by (seed, step, element), or an explicit noise tensor.

The table is float64, shape (N, NCOEF), on the device of the state; row ``step`` is read inside the
kernel, so a launch captured in a CUDA graph stays valid when the table is rewritten in place.
"""
from __future__ import annotations

import array
import collections
import itertools
import math
import weakref
from collections.abc import Mapping
from typing import Iterable

import numpy as np
import torch

# Slot indices (one row per step). A row is 16 float64 (128 bytes, a multiple of the 32-byte sector); slot 15 is
# reserved and must be 0, so a later slot reads 0 from every table written before it (as bu and fu did).
A, B, G, C, S, P, Q, W, E, F, CLIP, C2, C3, BU, FU = range(15)
NCOEF = 16

SLOT_NAMES = ("a", "b", "g", "c", "s", "p", "q", "w", "e", "f", "clip", "c2", "c3", "bu", "fu")
_DEFAULTS = {"a": 0.0, "b": 0.0, "g": 0.0, "c": 0.0, "s": 0.0, "p": 0.0, "q": 1.0, "w": 1.0,
             "e": 0.0, "f": 0.0, "clip": math.inf, "c2": 0.0, "c3": 0.0, "bu": 0.0, "fu": 0.0}
_SLOT_SET = frozenset(SLOT_NAMES)
_DEFAULT_ITEMS = tuple((n, _DEFAULTS[n]) for n in SLOT_NAMES)
_RESERVED = [0.0] * (NCOEF - len(SLOT_NAMES))


def row(**coefs: float) -> list[float]:
    """One table row from named coefficients; unnamed slots take neutral defaults.

    Defaults: ``q=1`` (the model output is the denoised estimate), ``w=1`` (no guidance),
    ``clip=inf`` (no clipping), every other slot 0.
    """
    if not _SLOT_SET.issuperset(coefs):
        unknown = set(coefs) - _SLOT_SET
        raise ValueError(f"coefs.row: unknown coefficient(s) {sorted(unknown)}; expected a subset of {SLOT_NAMES}")
    get = coefs.get  # (tables are built row by row at a scheduler's first step: this is on its host path)
    return [float(get(n, d)) for n, d in _DEFAULT_ITEMS] + _RESERVED


def validate(table: torch.Tensor, name: str = "coef") -> None:
    """Raise ValueError unless ``table`` is a well-formed float64 (N, NCOEF) table with finite values.

    Reads the values, so call it on host tables (it is called by :func:`table`), never inside a loop.
    """
    if not isinstance(table, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(table).__name__}")
    if table.dim() != 2 or table.shape[1] != NCOEF:
        raise ValueError(f"{name}: expected shape (N, {NCOEF}), got {tuple(table.shape)}")
    if table.dtype != torch.float64:
        raise ValueError(f"{name}: expected dtype torch.float64, got {table.dtype}")
    vals = table.detach().cpu()
    v = vals.resolve_neg().numpy()  # one pass over a valid table (numpy: ~3x less than the torch checks below)
    if np.isfinite(v[:, :CLIP]).all() and np.isfinite(v[:, CLIP + 1:]).all() and (v[:, CLIP] > 0).all() \
            and not v[:, len(SLOT_NAMES):].any():
        return
    body = vals.clone()
    body[:, CLIP] = 1.0
    bad = (~torch.isfinite(body)).nonzero()
    if bad.numel():
        r, slot = bad[0].tolist()
        raise ValueError(f"{name}[{r}]: non-finite coefficient in slot {SLOT_NAMES[slot] if slot < len(SLOT_NAMES) else slot}"
                         " (every slot but clip must be finite)")
    bad_clip = (torch.isnan(vals[:, CLIP]) | (vals[:, CLIP] <= 0)).nonzero()
    if bad_clip.numel():
        raise ValueError(f"{name}[{bad_clip[0, 0].item()}]: clip slot must be > 0 (use inf for no clipping)")
    reserved = (vals[:, len(SLOT_NAMES):] != 0).nonzero()
    if reserved.numel():
        r, slot = reserved[0].tolist()
        raise ValueError(f"{name}[{r}]: reserved slot {slot + len(SLOT_NAMES)} must be 0")


_seen: "collections.OrderedDict[int, tuple]" = collections.OrderedDict()


def validate_once(table: torch.Tensor, name: str = "coef") -> list[tuple[bool, bool, bool]]:
    """:func:`validate` a CPU table once per version: re-checked only after an in-place write.

    Remembers (weak reference, torch's version counter) per table object, so a loop calling an op 50
    times on one table pays for one check (a per-call check cost ~0.3 ms on the 2-core CI CPU) and any
    in-place write (through any view: views share the counter) triggers a new check. Returns, per row,
    whether the history coefficients c, c2 and c3 are non-zero (a host list: callers check it without reading
    the tensor, so the check is also safe inside a captured region).
    """
    if table.is_inference():  # no version counter (torch.inference_mode): nothing to key a cached check on
        validate(table, name)
        return list(zip(*((table[:, k] != 0).tolist() for k in (C, C2, C3))))
    entry = _seen.get(id(table))
    if entry is not None and entry[0]() is table and entry[1] == table._version:
        _seen.move_to_end(id(table))
        return entry[2]
    validate(table, name)
    uses_history = list(zip(*((table[:, k] != 0).tolist() for k in (C, C2, C3))))
    _seen[id(table)] = (weakref.ref(table), table._version, uses_history)
    if len(_seen) > 256:
        _seen.popitem(last=False)
    return uses_history


def table(rows: Iterable[list[float] | Mapping[str, float]], device=None) -> torch.Tensor:
    """Stack rows (from :func:`row` or dicts of named coefficients) into a validated float64 table.

    Returns a contiguous ``(N, NCOEF)`` float64 tensor on ``device`` (default CPU).
    """
    rows = [r if isinstance(r, list) else row(**r) if isinstance(r, Mapping) else list(r) for r in rows]
    for k, r in enumerate(rows):
        if len(r) != NCOEF:
            raise ValueError(f"rows[{k}]: expected {NCOEF} coefficients (a coefs.row), got {len(r)}")
    # through a flat C double buffer: ~3x faster than torch.tensor on nested lists (a scheduler builds its tables at
    # its first step), and as strict (a value must be a real number), with the same float64 values
    try:
        flat = array.array("d", itertools.chain.from_iterable(rows))
    except (TypeError, ValueError) as e:
        raise TypeError(f"rows: expected real numbers, got a value that is not ({e})") from None
    t = torch.from_numpy(np.frombuffer(flat, dtype=np.float64)).reshape(len(rows), NCOEF)
    validate(t)
    return t.to(device) if device is not None else t
