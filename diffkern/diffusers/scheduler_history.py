"""The history buffers of the fused multistep schedulers (:class:`HistoryBuffers`, a base of
:class:`~diffkern.diffusers.schedulers.FusedScheduler`): the earlier steps' values a multistep row reads, zeros at a
loop's first step, rotating with the step index as the sampling loop's (moved from :mod:`.schedulers`)."""
from __future__ import annotations

import torch

from .. import coef_tables


class HistoryBuffers:
    """Mixin of :class:`~diffkern.diffusers.schedulers.FusedScheduler`: the buffers live on the scheduler
    (``_history``, reset to None with each loop, and ``_history_group``)."""

    def _history_for(self, x: torch.Tensor, first: bool) -> torch.Tensor:
        """The history buffer of a multistep scheduler (zeros at the first step; same shape all loop)."""
        h = self._history
        if first or h is None:
            self._history = torch.zeros_like(x, memory_format=torch.contiguous_format)
        elif h.shape != x.shape or h.dtype != x.dtype or h.device != x.device:
            raise ValueError(f"sample: shape/dtype/device changed during the loop (now {tuple(x.shape)} {x.dtype} "
                             f"{x.device}, was {tuple(h.shape)} {h.dtype} {h.device}); call set_timesteps again")
        return self._history

    def _history_slots(self, x: torch.Tensor, i: int, first: bool, depth: int):
        """(history, history2, history3, history_out) of step ``i`` for a multistep scheduler of history ``depth``
        (1 to 4: rows read at most three; a fourth keeps D_{i-3} alive): the buffers rotate with i
        (:func:`~diffkern.coef_tables.history_slots`, as the sampling loop does), all starting at zero (0 * garbage
        may be NaN)."""
        buffers = [self._history_for(x, first=first)]
        if depth > 1:
            group = self.__dict__.get("_history_group")
            # a new loop's buffers (set_timesteps drops H), or another depth
            if first or group is None or group[0] is not buffers[0] or len(group) != depth:
                group = self._history_group = (buffers[0],) + tuple(torch.zeros_like(buffers[0])
                                                                    for _ in range(depth - 1))
            buffers = list(group)
        return coef_tables.history_slots(buffers, i)
