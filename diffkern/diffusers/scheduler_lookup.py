"""diffusers' timestep look-ups on the fused schedulers: ``index_for_timestep``, the sigma ``add_noise`` picks,
``previous_timestep`` (DDPM, LCM, TCD), and the checks that make a bad ``step()`` input name ``step()``'s own
arguments (``model_output``, ``timestep``, ``sample``) rather than the fused op's."""
from __future__ import annotations

import numbers

import torch

from ..ops._checks import FLOAT_DTYPES
from .scheduler_utils import match_schedule


def check_step_args(model_output, sample) -> None:
    """Raise, naming the argument, unless ``model_output`` and ``sample`` are tensors of one shape on one device and
    ``model_output`` is floating point (``sample`` may be any real dtype: it is promoted, as diffusers does)."""
    for name, value in (("model_output", model_output), ("sample", sample)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(value).__name__}")
    if model_output.dtype not in FLOAT_DTYPES:  # (float8 is floating point too, but no kernel takes it)
        raise TypeError(f"model_output: expected a floating-point tensor (float16, bfloat16, float32 or float64), "
                        f"got {model_output.dtype}")
    if sample.is_complex() or sample.dtype == torch.bool or (sample.is_floating_point()
                                                             and sample.dtype not in FLOAT_DTYPES):
        raise TypeError(f"sample: expected a real tensor (an integer one, float16, bfloat16, float32 or float64), "
                        f"got {sample.dtype}")
    if model_output.shape != sample.shape:
        raise ValueError(f"model_output: expected the shape of sample {tuple(sample.shape)}, "
                         f"got {tuple(model_output.shape)}")
    if model_output.device != sample.device:
        raise ValueError(f"model_output: expected sample's device {sample.device}, got {model_output.device}")


def check_timestep(timestep) -> None:
    """Raise TypeError naming ``timestep`` unless it is None, a real number or a tensor."""
    if timestep is not None and (isinstance(timestep, bool) or not isinstance(timestep, (torch.Tensor, numbers.Real))):
        raise TypeError(f"timestep: expected a number or a tensor, got {type(timestep).__name__}")


class TimestepLookup:
    """Mixin of :class:`~diffkern.diffusers.schedulers.FusedScheduler`: where a timestep lies in the schedule, as the
    diffusers classes find it (``index_for_timestep``), and the per-sample sigma of ``add_noise``."""

    # A timestep not in the schedule: the last timestep's position (diffusers' DPM-Solver family: DPM-Solver
    # multistep and singlestep, DEIS, UniPC, SA-Solver), else IndexError (Euler, Heun, KDPM2, LMS, LCM, TCD, ...).
    _missing_is_last = False

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        """Position of ``timestep`` (a number or a 1-element tensor) in ``schedule_timesteps`` (default
        ``timesteps``): the second of several equal ones (so that a loop started mid-schedule skips no sigma), as
        diffusers. Not found: ``len(timesteps) - 1`` for the DPM-Solver family, else IndexError, as diffusers. The
        answer is a host int: for a device schedule this reads the device (as diffusers does)."""
        schedule = self.timesteps if schedule_timesteps is None else torch.as_tensor(schedule_timesteps)
        t = timestep.to(schedule.device) if isinstance(timestep, torch.Tensor) else timestep
        hits = (schedule == t).nonzero()
        if len(hits) == 0:
            if self._missing_is_last:
                return len(self.timesteps) - 1
            shown = t.tolist() if isinstance(t, torch.Tensor) else t
            raise IndexError(f"timestep: {shown} is not in the schedule (scheduler.timesteps), where "
                             f"{type(self).__name__}.index_for_timestep looks it up (diffusers raises IndexError "
                             "too)")
        return int(hits[1 if len(hits) > 1 else 0, 0])

    def _noise_schedule(self) -> tuple[list, list]:
        """(host timesteps, the VE sigma at each) that ``add_noise`` matches against: the schedule after
        ``set_timesteps``, before it the training schedule T-1, ..., 0 (diffusers' classes hold it then)."""
        if self._host_timesteps is not None:
            host = self._host_timesteps
            return host, [self._sigma_at(k) for k in range(len(host))]
        return list(range(len(self.train_sigmas) - 1, -1, -1)), self.train_sigmas.flip(0).tolist()

    def _noise_sigma(self, original_samples: torch.Tensor, timesteps) -> torch.Tensor:
        """Per-sample VE sigma (float64, shaped to broadcast against ``original_samples``, on its device) for
        ``add_noise``, chosen as diffusers chooses it: after ``set_begin_index``, the sigma of the current step
        (``step_index``, else ``begin_index``) for every sample; otherwise the sigma of each timestep's position
        in the schedule (:meth:`_noise_schedule`; the second position where it occurs twice). A timestep not in the
        schedule: the sigma of the last timestep (DPM-Solver family), else IndexError, as diffusers. The matching
        runs on the device; only the not-found check of the classes that raise reads it back (a synchronisation
        for device timesteps, as diffusers' own look-up; pipelines that call ``set_begin_index`` never get here)."""
        dev = original_samples.device
        t = torch.as_tensor(timesteps).to(dev).reshape(-1)
        view = (-1,) + (1,) * (original_samples.dim() - 1)
        if self._host_timesteps is not None and self._begin_index is not None:
            k = self._step_index if self._step_index is not None else self._begin_index
            return torch.full(t.shape, self._sigma_at(k), dtype=torch.float64, device=dev).view(view)
        host, sig = self._noise_schedule()
        t = t.to(torch.float64)
        sigma = match_schedule(t, host, sig, torch.full(t.shape, sig[-1], dtype=torch.float64, device=dev))
        if not self._missing_is_last:
            found = (torch.tensor(host, dtype=torch.float64, device=dev)[None, :] == t[:, None]).any(1)
            if not bool(found.all()):
                missing = t[~found].tolist()
                raise IndexError(f"timesteps: {missing} not in the schedule (scheduler.timesteps); "
                                 f"{type(self).__name__}.add_noise takes the sigma of a scheduled timestep, as "
                                 "diffusers (which raises IndexError too); set_begin_index(k) noises to "
                                 "timesteps[k]")
        return sigma.view(view)


def previous_timestep(self, timestep):
    """diffusers' ``previous_timestep`` (DDPM, LCM, TCD): after ``set_timesteps`` the timestep that follows
    ``timestep`` in ``timesteps`` (a 0-d tensor; ``tensor(-1)`` after the last; IndexError when ``timestep`` is not
    in it, as diffusers), before it ``timestep - 1``. Reads the device for a device schedule, as diffusers."""
    if self._host_timesteps is None:
        return timestep - 1
    t = timestep.to(self.timesteps.device) if isinstance(timestep, torch.Tensor) else timestep
    index = (self.timesteps == t).nonzero(as_tuple=True)[0]
    if len(index) == 0:
        raise IndexError(f"timestep: {timestep} is not in the schedule (scheduler.timesteps) "
                         "(diffusers raises IndexError too)")
    index = int(index[0])
    return torch.tensor(-1) if index == len(self.timesteps) - 1 else self.timesteps[index + 1]
