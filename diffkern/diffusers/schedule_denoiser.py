"""The UNet of a diffusers pipeline as a denoiser D(x, sigma) on the pipeline's own schedule, for the fused loop of
:mod:`diffkern.diffusers.accelerate` (and its img2img, inpainting and ControlNet handlers, which subclass it)."""
from __future__ import annotations

import math

import numpy as np
import torch

from .. import wrappers
from .schedulers_lcm import SIGMA_DATA


class ScheduleDenoiser(wrappers.DiffusersUNetDenoiser):
    """A diffusers UNet as D(x, sigma) that feeds the network the scheduler's own timestep for each schedule
    sigma (matched exactly on the device, no sync), and log-sigma interpolation for any other sigma. Given
    ``call_timesteps`` (one per model call), call k gets ``call_timesteps[k]``, counted on the device (:meth:`restart`
    before a loop): KDPM2-ancestral's midpoint sigma is the next step's, whose Karras timestep diffusers rounds for
    that step's call only, so the sigma alone cannot tell the two calls apart. Given ``timestep_scaling`` (LCM), D is
    the consistency function ``c_skip(t)*z + c_out(t)*x0`` at the call's timestep t (:meth:`conversion`)."""

    def __init__(self, unet, alphas_cumprod, prediction_type, sigmas, timesteps, guidance_scale=1.0,
                 call_timesteps=None, timestep_scaling=None):
        super().__init__(unet, alphas_cumprod=alphas_cumprod, prediction_type=prediction_type,
                         guidance_scale=guidance_scale)
        self.register_buffer("schedule_sigmas", torch.tensor(sigmas, dtype=torch.float64), persistent=False)
        self.register_buffer("schedule_t", torch.tensor(timesteps, dtype=torch.float32), persistent=False)
        self.register_buffer("call_t", torch.tensor(call_timesteps or [], dtype=torch.float32), persistent=False)
        self.register_buffer("call_k", torch.zeros(1, dtype=torch.int64), persistent=False)
        self.timestep_scaling = None if timestep_scaling is None else float(timestep_scaling)
        # host copies: the samplers build their coefficient tables from conversion(float sigma) on the host
        self._host_t, self._host_log_sigmas = dict(zip(sigmas, timesteps)), self.log_sigmas.clone().numpy()

    def restart(self) -> None:
        """The next call is the loop's first (a device write, ordered before a CUDA-graph replay)."""
        self.call_k.zero_()

    def _timestep(self, sigma, t_interp):
        """The schedule's timestep where a (B,) float64 sigma is a schedule sigma, else ``t_interp`` (float32)."""
        hit = self.schedule_sigmas[None, :] == sigma[:, None]
        return torch.where(hit.any(1), self.schedule_t[hit.int().argmax(1)], t_interp.to(torch.float32))

    def model_input(self, x, sigma):
        x_in, t_interp = super().model_input(x, sigma)
        if self.call_t.numel():
            t = self.call_t.index_select(0, self.call_k).expand(sigma.shape[0])
            self.call_k.add_(1).remainder_(self.call_t.numel())
            return x_in, t
        return x_in, self._timestep(sigma, t_interp)

    def conversion(self, sigma):
        """``(p, q)`` of ``D = p*x + q*m``; with LCM's boundary condition, in VE coordinates (z = x/sqrt(s^2 + 1)):
        ``p = c_skip/sqrt(s^2 + 1) + c_out*p_x0``, ``q = c_out*q_x0`` at the timestep the UNet gets at sigma s. A float
        sigma (table building) looks the timestep up on the host, a tensor on the device."""
        p, q = super().conversion(sigma)
        if self.timestep_scaling is None:
            return p, q
        if isinstance(sigma, torch.Tensor):
            s = sigma.to(torch.float64)
            t = self._timestep(s, self.sigma_to_t(s)).to(torch.float64)
        else:
            s = float(sigma)
            t = self._host_t.get(s)
            if t is None:  # off the schedule (another method's midpoints, churn): sigma_to_t on the host table
                log_s, ls = math.log(s) if s > 0 else -math.inf, self._host_log_sigmas
                t = float(np.interp(log_s, ls, np.arange(len(ls))))
        u, d2 = t * self.timestep_scaling, SIGMA_DATA * SIGMA_DATA
        c_skip, c_out = d2 / (u * u + d2), u / (u * u + d2) ** 0.5
        return c_skip / (s * s + 1) ** 0.5 + c_out * p, c_out * q


class AlphaUNet(torch.nn.Module):
    """An IADB UNet as ``model(x_alpha, alpha)``: the network is conditioned on ``alpha*timestep_scale``."""

    def __init__(self, unet, timestep_scale: float):
        super().__init__()
        self.unet, self.timestep_scale = unet, float(timestep_scale)

    def forward(self, x, alpha):
        return self.unet(x.to(self.unet.dtype), alpha * self.timestep_scale, return_dict=False)[0]
