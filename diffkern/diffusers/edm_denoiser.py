"""The UNet of a diffusers pipeline with an EDM scheduler (``EDMEulerScheduler``, ``EDMDPMSolverMultistepScheduler``:
Playground v2.5, CosXL) as a denoiser D(x, sigma) for the fused loop of :mod:`diffkern.diffusers.accelerate`.

diffusers' EDM schedulers precondition as Karras et al. (2022): the pipeline's state is the VE sample x itself
(``init_noise_sigma`` scales the initial noise, no VP rewrite), ``scale_model_input`` feeds the UNet
``c_in*x`` with ``c_in = 1/sqrt(sigma^2 + sigma_data^2)``, the UNet's timestep is the scheduler's own
``timesteps[i] = c_noise = log(sigma_i)/4`` (float32), and ``precondition_outputs`` turns the UNet output m into
``D = c_skip*x + c_out*m``, ``c_skip = sigma_data^2/(sigma^2 + sigma_data^2)``,
``c_out = +-sigma*sigma_data/sqrt(sigma^2 + sigma_data^2)`` (minus for v_prediction). That affine map is the
fused op's conversion pair (p, q): table data built on the host in float64, so nothing is synchronised in the loop.
:func:`edm_spec` maps the scheduler to the loop (:class:`~.loop_spec.LoopSpec` with ``edm=sigma_data``).
"""
from __future__ import annotations

import dataclasses
import math
import numbers

import torch

from .. import wrappers
from .accelerate_text2img import RescaledCFGDenoiser
from .loop_spec import LoopSpec, _drop_identity_end, _dpm_multistep_spec, _unsupported


def edm_spec(ours) -> LoopSpec:
    """An EDM scheduler after ``set_timesteps`` as a loop on its VE sigmas (state x itself: ``vp=False``), with its
    ``sigma_data`` for :class:`EDMScheduleDenoiser`. EDMEuler is ``euler`` (deterministic: diffusers' pipelines
    pass no ``s_churn``), a last step from sigma_min to itself (``final_sigmas_type="sigma_min"``) dropped as the
    identity it is; EDMDPMSolverMultistep maps as DPMSolverMultistepScheduler does (its updates in log-sigma are
    the same): ``dpmpp_2m``, ``dpmpp_2m_sde``, ``dpmsolver_3m``, ``euler`` or ``sde``."""
    name, cfg = type(ours).__name__, ours.config
    sig, ts = list(ours.sigmas_host), list(ours._host_timesteps)
    if name == "EDMEulerScheduler":
        sig, ts = _drop_identity_end(name, sig, ts)
        return LoopSpec("euler", sig, ts, {}, vp=False, edm=float(cfg.sigma_data))
    if name != "EDMDPMSolverMultistepScheduler":
        raise ValueError(f"accelerate: unsupported scheduler {name}")
    if sig[-1] > sig[-2]:  # diffusers' DPM schedule ends at its float32 Karras/exponential end, just below sigma_min
        raise _unsupported(name, "final_sigmas_type", "sigma_min", f"its last step rises from sigma {sig[-2]!r} (the "
                           f"schedule's float32 end) to sigma_min={cfg.sigma_min!r}; the fused loop needs strictly "
                           "decreasing sigmas")
    return dataclasses.replace(_dpm_multistep_spec(ours, vp=False), edm=float(cfg.sigma_data))


class EDMScheduleDenoiser(wrappers.ModelWrapper):
    """A diffusers UNet (called as ``unet(sample, timestep, **extra, return_dict=False)[0]``) under EDM
    preconditioning as D(x, sigma), on an EDM scheduler's schedule.

    Args:
        unet: the pipeline's UNet (its input is cast to the UNet's dtype).
        sigma_data: the scheduler's ``sigma_data`` (> 0).
        prediction_type: "epsilon" or "v_prediction" (the sign of c_out).
        sigmas: the schedule's sigmas (N,) as floats (float64 on the host), without the final one.
        timesteps: the scheduler's timesteps (N,) at those sigmas (its float32 c_noise values).
        guidance_scale: CFG weight (1: none; table data, set by the accelerated pipeline before each loop).
        call_timesteps, timestep_scaling: :class:`~.schedule_denoiser.ScheduleDenoiser`'s signature; an EDM loop
            has neither (each call's timestep is a function of its sigma, and no boundary condition), so both must
            be None.

    A (B,) float64 sigma that is a schedule sigma gets that step's timestep (matched exactly on the device, as
    :class:`~.schedule_denoiser.ScheduleDenoiser` matches them); any other sigma (another method's midpoints, churn)
    gets ``log(sigma)/4`` computed in float64 and rounded to float32.
    """

    def __init__(self, unet, sigma_data, prediction_type, sigmas, timesteps, guidance_scale=1.0, call_timesteps=None,
                 timestep_scaling=None):
        super().__init__(unet, guidance_scale)
        who = type(self).__name__
        if not (isinstance(sigma_data, numbers.Real) and math.isfinite(sigma_data) and sigma_data > 0):  # numpy too
            raise ValueError(f"{who}: sigma_data must be a finite float > 0, got {sigma_data!r}")
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"{who}: prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
        if len(sigmas) != len(timesteps):
            raise ValueError(f"{who}: sigmas ({len(sigmas)}) and timesteps ({len(timesteps)}) must have one entry "
                             "per schedule step")
        if call_timesteps is not None or timestep_scaling is not None:
            raise ValueError(f"{who}: call_timesteps and timestep_scaling must be None (an EDM loop has neither)")
        self.sigma_data = float(sigma_data)
        self.prediction_type = prediction_type
        self.register_buffer("schedule_sigmas", torch.tensor(sigmas, dtype=torch.float64), persistent=False)
        self.register_buffer("schedule_t", torch.tensor(timesteps, dtype=torch.float32), persistent=False)

    def restart(self) -> None:
        """Nothing is counted per call (the accelerated pipeline calls this before every loop)."""

    def model_input(self, x, sigma):
        """``(c_in*x, timestep)``: x (B, ...) in its dtype (c_in taken in float64, applied in x's compute dtype, as
        the scheduler's ``scale_model_input``), the timestep (B,) float32."""
        c_in = 1 / torch.sqrt(sigma * sigma + self.sigma_data ** 2)
        hit = self.schedule_sigmas[None, :] == sigma[:, None]
        c_noise = (0.25 * sigma.log()).to(torch.float32)
        t = torch.where(hit.any(1), self.schedule_t[hit.int().argmax(1)], c_noise)
        return wrappers._scale_input(x, c_in), t

    def call_model(self, x_in, t, **extra):
        dtype = getattr(self.model, "dtype", x_in.dtype)
        return self.model(x_in.to(dtype), t, **extra, return_dict=False)[0]

    def conversion(self, sigma):
        """``(c_skip, c_out)`` of ``D = c_skip*x + c_out*m`` (c_out negated for v_prediction): floats for a float
        sigma, float64 tensors for a tensor sigma."""
        p, q = wrappers.conversion("edm", sigma, self.sigma_data)
        return (p, -q) if self.prediction_type == "v_prediction" else (p, q)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sigma_data={self.sigma_data}"


class RescaledEDMDenoiser(EDMScheduleDenoiser):
    """:class:`EDMScheduleDenoiser` with the pipelines' ``guidance_rescale``: the pipeline rescales the guided UNet
    output before its scheduler preconditions it, whatever the scheduler, so the raw outputs are combined exactly as
    :class:`~.accelerate_text2img.RescaledCFGDenoiser` combines them (its :meth:`raw` and :meth:`set_guidance`)."""

    raw = RescaledCFGDenoiser.raw
    set_guidance = RescaledCFGDenoiser.set_guidance

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # w, phi and 1 - phi, as RescaledCFGDenoiser keeps them
        self.register_buffer("cfg_rescale", torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64), persistent=False)


def edm_denoiser(pipeline: str, scheduler: str, denoiser, rescale: bool):
    """The denoiser class of an EDM loop (:meth:`AcceleratedPipeline._run`): :class:`RescaledEDMDenoiser` with
    ``guidance_rescale``, else :class:`EDMScheduleDenoiser`. A pipeline handler's own denoiser (``denoiser``: the
    inpainting UNet's input channels, ControlNet) is built on the training-table wrapper, so it is refused."""
    if denoiser is not None:
        raise ValueError(f"accelerate: {scheduler} in {pipeline} is not supported by the fused loop (this pipeline's "
                         "UNet wrapper feeds the training-table inputs, not EDM's c_in*x and c_noise); run the "
                         f"pipeline with diffkern.diffusers.{scheduler} as its scheduler instead")
    return RescaledEDMDenoiser if rescale else EDMScheduleDenoiser
