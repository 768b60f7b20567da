"""The schedule a scheduler holds before ``set_timesteps``, where diffusers' class of the same name already holds one.

diffusers' Heun, KDPM2, KDPM2-ancestral, LMS and DPMSolverSDE classes call ``set_timesteps(num_train_timesteps)``
in their ``__init__``: before any explicit call they report ``num_inference_steps = T``, the interleaved schedule
(2T - 1 timesteps for the two-call classes), and ``step()`` runs on it. Ours run the same ``set_timesteps(T)``, but
only when something first reads the schedule (:class:`DeferredSchedule`): for the two-call classes it builds a
coefficient table of T steps (~80 ms at T = 1000, measured on the shared 2-core CPU), which a scheduler that a
pipeline immediately re-schedules should not pay at construction (ours stays ~0.3 ms).

The other classes' training-schedule attributes (``timesteps`` dtypes, the DPM-Solver family's ``sigmas``) are set
where they are built (:mod:`.schedulers`).
"""
from __future__ import annotations

import functools


class _ScheduleAttr:
    """Data descriptor over the instance's own ``__dict__`` entry of the same name (so pickling, copying and
    direct ``__dict__`` access see the plain value) that first runs a pending default ``set_timesteps``."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        d = obj.__dict__
        if d.get("_default_pending", False):
            obj._run_default_schedule()
        try:
            return d[self.name]
        except KeyError:
            raise AttributeError(self.name) from None

    def __set__(self, obj, value) -> None:
        d = obj.__dict__
        if d.get("_default_pending", False):  # diffusers' default ran before this assignment: it must not undo it
            obj._run_default_schedule()
        d[self.name] = value


def _cancelling(set_timesteps):
    """``set_timesteps`` that first cancels a pending default schedule (no warning is raised below it, so the extra
    frame shifts no ``stacklevel``)."""
    @functools.wraps(set_timesteps)
    def wrapper(self, *args, **kwargs):
        self.__dict__["_default_pending"] = False
        return set_timesteps(self, *args, **kwargs)
    return wrapper


class DeferredSchedule:
    """Mixin (listed before the scheduler's base) of the classes whose diffusers counterpart calls
    ``set_timesteps(num_train_timesteps)`` in ``__init__``; their ``__init__`` ends with
    :meth:`_defer_default_schedule`. The attributes below hold (or are derived from) the schedule: reading any of
    them first runs the pending ``set_timesteps(T)``; an explicit ``set_timesteps`` cancels it on entry (its own
    reads of these attributes, before it writes them, must not run the default one inside it)."""

    timesteps = _ScheduleAttr("timesteps")
    num_inference_steps = _ScheduleAttr("num_inference_steps")
    _host_timesteps = _ScheduleAttr("_host_timesteps")
    sigmas_host = _ScheduleAttr("sigmas_host")
    _mids = _ScheduleAttr("_mids")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "set_timesteps" in cls.__dict__:
            cls.set_timesteps = _cancelling(cls.__dict__["set_timesteps"])

    def _defer_default_schedule(self) -> None:
        """Schedule ``set_timesteps(num_train_timesteps)`` for the first read of the schedule (module docstring)."""
        self.__dict__["_default_pending"] = True

    def _run_default_schedule(self) -> None:
        """Run the pending ``set_timesteps(T)``, keeping a ``set_begin_index`` made before it (diffusers' ran in
        ``__init__``, before any such call). A configuration that ours refuses at T steps (``set_timesteps`` raises
        ValueError) keeps the training schedule, as before: ``step()`` then asks for ``set_timesteps``, whose
        explicit call reports the refusal."""
        self.__dict__["_default_pending"] = False
        begin = self.__dict__.get("_begin_index")
        try:
            self.set_timesteps(self.config.num_train_timesteps)
        except ValueError:
            return
        self._begin_index = begin

    @property
    def sigmas(self):
        """As the base class's ``sigmas``, on the default schedule when no ``set_timesteps`` ran yet."""
        if self.__dict__.get("_default_pending", False):
            self._run_default_schedule()
        return super().sigmas
