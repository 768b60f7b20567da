"""A sampling loop run as a window of a longer one (:func:`windowed`): its rows draw the longer loop's Philox counters,
so the steps ``begin .. begin + N - 1`` of a ``total``-step loop draw the noise the whole loop draws there (split
from :mod:`diffkern.sampler_loop`, which applies it and re-exports both functions)."""
from __future__ import annotations

import dataclasses
import math
import numbers

from . import coef_tables
from .ops import coefs

_MAX_WINDOW = 2 ** 16  # diffusers' schedules have at most num_train_timesteps (1000) steps


def check_window(window, steps: int):
    """``window`` validated for a loop of ``steps`` steps: None, or ``(begin, total)`` ints with ``0 <= begin`` and
    ``begin + steps <= total`` (the loop is steps ``begin .. begin + steps - 1`` of a ``total``-step loop); returns
    it as a tuple (or None)."""
    if window is None:
        return None
    if not isinstance(window, (tuple, list)) or len(window) != 2 or any(
            isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in window):
        raise TypeError(f"window: expected None or a pair of ints (begin, total), got {window!r}")
    begin, total = (int(v) for v in window)
    if begin < 0 or begin + steps > total:
        raise ValueError(f"window: expected 0 <= begin and begin + {steps} (the steps of this loop) <= total, got "
                         f"(begin, total) = ({begin}, {total})")
    if total > _MAX_WINDOW:  # the windowed table holds total rows per block (128 bytes each), all uploaded
        raise ValueError(f"window: total must be at most {_MAX_WINDOW} steps, got {total}")
    return begin, total


def windowed(plan: coef_tables.Plan, window) -> coef_tables.Plan:
    """``plan`` (N steps) as steps ``begin .. begin + N - 1`` of a ``total``-step loop (``window = (begin, total)``,
    checked by :func:`check_window`): the same coefficients, each on the row (hence the Philox counter) that step has
    in the ``total``-step layout, so the noise is the one the whole loop draws there (as diffkern's Level-1 schedulers
    after ``set_begin_index(begin)``). Every plan lays its rows out in blocks of N (step rows, then corrector and
    churn rows): each block becomes ``total`` rows, the plan's own at offset ``begin``, identity rows (never run) around
    them. A plan that draws no noise, or the window (0, N), is returned as it is."""
    window = check_window(window, plan.steps)
    n = plan.steps
    if plan.step_row:
        raise ValueError(f"window: the plan is already a window of a longer loop (step_row {plan.step_row})")
    if window is None or window == (0, n) or not bool((plan.table[:, coefs.S] != 0).any()):
        return plan
    begin, total = window
    rows = plan.table.shape[0]
    for name, base in (("rows", rows), ("churn_row", plan.churn_row), ("corrector_row", plan.corrector_row)):
        if base % n:  # every builder's layout; a new one that breaks it must not run with shifted counters
            raise ValueError(f"window: the plan's {name} ({base}) is not a multiple of its {n} steps; its rows "
                             "cannot be laid out as a window of a longer loop")

    def moved(r: int) -> int:  # row r of block r // n
        return (r // n) * total + begin + r % n
    # the rows around the plan's are never run; the identity x' = x (a valid row: clip = inf) all the same
    table = coefs.table([coefs.row(a=1.0, p=0.0, q=0.0)] * (rows // n * total))
    row_sigma = [math.nan] * table.shape[0]
    for r in range(rows):
        table[moved(r)] = plan.table[r]
        row_sigma[moved(r)] = plan.row_sigma[r]
    return dataclasses.replace(plan, table=table, row_sigma=row_sigma, step_row=moved(plan.step_row),
                               churn_row=moved(plan.churn_row), corrector_row=moved(plan.corrector_row))
