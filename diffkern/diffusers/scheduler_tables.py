"""diffusers' float32 per-timestep tables and alpha-bar end points, as read-only views of the float64 state ours
keeps.

diffusers' DPM-Solver family (multistep, singlestep, DEIS, UniPC, SA-Solver) holds ``alpha_t``, ``sigma_t`` and
``lambda_t``, its KDPM2 classes ``log_sigmas``, and its DDIM/PNDM/LCM/TCD (DDIM-inverse) classes a 0-d float32
``final_alpha_cumprod`` (``initial_alpha_cumprod``). Only diffusers' own ``step()`` reads the tables; ours build
their coefficient rows from the float64 ``alphas_cumprod`` in ``set_timesteps``, so these properties are computed on
read (nothing reads them per step) and rounded once to float32: values within float32 rounding of the float64
truth, where diffusers' own are computed in float32 throughout.
"""
from __future__ import annotations

import torch


class LogSNRTables:
    """Mixin of the DPM-Solver family: diffusers' VP tables over the training timesteps, each (T,) float32 on the
    CPU, as diffusers' ``__init__`` makes them (its ``set_timesteps`` leaves them there)."""

    def _log_snr(self) -> torch.Tensor:
        """diffusers' ``lambda_t = ln(alpha_t) - ln(sigma_t)`` (T,), in float64."""
        ab = self.alphas_cumprod
        return 0.5 * (ab.log() - (1.0 - ab).log())

    @property
    def alpha_t(self) -> torch.Tensor:
        """``sqrt(alpha-bar_t)`` (T,) float32, CPU."""
        return self.alphas_cumprod.sqrt().float()

    @property
    def sigma_t(self) -> torch.Tensor:
        """``sqrt(1 - alpha-bar_t)`` (T,) float32, CPU."""
        return (1.0 - self.alphas_cumprod).sqrt().float()

    @property
    def lambda_t(self) -> torch.Tensor:
        """The log-SNR ``ln(alpha_t) - ln(sigma_t)`` (T,) float32, CPU."""
        return self._log_snr().float()


class LogSigmaTable:
    """Mixin of the KDPM2 classes: diffusers' ``log_sigmas``, the log VE sigma of each training timestep, (T,)
    float32 on the device of ``timesteps`` (diffusers' ``set_timesteps`` moves it there)."""

    @property
    def log_sigmas(self) -> torch.Tensor:
        """``ln(sqrt((1 - alpha-bar_t)/alpha-bar_t))`` (T,) float32."""
        return self.train_sigmas.log().float().to(self.timesteps.device)


def _alpha_bar_end(private: str, doc: str) -> property:
    def get(self) -> torch.Tensor:
        return torch.tensor(getattr(self, private), dtype=torch.float32)
    return property(get, doc=doc)


# The float64 values live in the private names (Python floats): the step rows and loop specs read those
final_alpha_cumprod = _alpha_bar_end(
    "_final_alpha_cumprod", "diffusers' ``final_alpha_cumprod``: the alpha-bar a step to a timestep before 0 ends at "
    "(1, or alpha-bar_0 without ``set_alpha_to_one``), a 0-d float32 CPU tensor. Read-only: the steps use the "
    "float64 value fixed by the config.")
initial_alpha_cumprod = _alpha_bar_end(
    "_initial_alpha_cumprod", "diffusers' ``initial_alpha_cumprod``: the alpha-bar the first inversion step starts "
    "from (1, or alpha-bar_0 without ``set_alpha_to_one``), a 0-d float32 CPU tensor. Read-only: the steps use the "
    "float64 value fixed by the config.")
