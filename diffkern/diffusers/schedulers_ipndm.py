"""Fused iPNDM as diffusers' ``IPNDMScheduler`` (the scheduler of its Dance Diffusion pipeline): one fused op per step.

diffusers' schedule on N steps: ``u_k = 1 - k/N`` (k = 0..N-1), ``u_N = 0``; ``beta_k = sin(pi u_k / 2)^2``,
``alpha_k = sqrt(1 - beta_k^2)``; timesteps ``atan2(beta_k, alpha_k) * 2/pi`` (float32, in [0, 1]). Step k forms
``ets_k = beta_k x + alpha_k m`` from the sample x and the model output m, the Adams-Bashforth combination ``E`` of
the last ``min(count, 4)`` ets (orders 1-4 by how many steps ran since ``set_timesteps``), and returns

    x' = alpha_{k+1} (x - beta_k E) / max(alpha_k, 1e-8) + beta_{k+1} E.

That is linear in x, m and the previous ets, so each (step, order) is one row of the fused op: ``D = m``,
``history_out = ets_k`` (slots e = beta_k, f = alpha_k), the previous three ets in the history buffers (rotated
without copies, as the other multistep drop-ins). The x coefficient is taken in the form
``(alpha'/alpha~)(1 - w0 beta^2) + beta' w0 beta``, exact where diffusers' first step (u = 1: beta = 1, alpha = 0,
alpha~ = 1e-8) cancels ``1e8``-sized terms to ``x' = beta' x``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config

from ..ops import coefs
from .config_checks import unsupported
from .schedulers import FusedScheduler
from .scheduler_utils import check_steps

_WHO = "IPNDMScheduler"
_KEY = ("ipndm",)
# Adams-Bashforth weights, newest ets first, of orders 1-4 (diffusers' rule: the order is the number of ets held)
_AB = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def _ipndm_row(beta: float, alpha: float, beta_next: float, alpha_next: float, order: int) -> list[float]:
    """The fused row of one iPNDM step of ``order`` (1-4) from (beta, alpha) to (beta_next, alpha_next)."""
    w = _AB[order]
    alpha_safe = max(alpha, 1e-8)  # diffusers' guard at alpha = 0 (the first step)
    k = beta_next - alpha_next * beta / alpha_safe  # the weight of E in x'
    slots = dict(zip(("c", "c2", "c3"), (k * wj for wj in w[1:])))
    return coefs.row(a=alpha_next / alpha_safe * (1.0 - w[0] * beta * beta) + beta_next * w[0] * beta,
                     b=k * w[0] * alpha, p=0.0, q=1.0, e=beta, f=alpha, **slots)


class IPNDMScheduler(FusedScheduler):
    """Drop-in for ``diffusers.IPNDMScheduler`` (config ``num_train_timesteps``; its timesteps are floats in
    [0, 1]); ``step()`` is one fused op with no host synchronisation, returning ``prev_sample`` only, as diffusers'.

    Unsupported: ``trained_betas`` (diffusers takes it as the per-step table of one step count, which then
    ``set_timesteps`` must match). No ``add_noise``, as diffusers' class; no Level 2 (its pipeline is Dance
    Diffusion's 1-D audio UNet, which ``accelerate`` does not run).
    """

    order = 1
    _locate_start = True  # diffusers finds the first step's index from its timestep

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, trained_betas=None):
        if trained_betas is not None:
            raise unsupported(_WHO, "trained_betas", "<array>", "diffusers reads it as the betas of the steps of one "
                              "set_timesteps call rather than of the training schedule")
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) \
                or num_train_timesteps < 1:
            raise ValueError(f"{_WHO}: num_train_timesteps must be an int >= 1, got {num_train_timesteps!r}")
        self._init_state()
        self.init_noise_sigma = 1.0
        self.pndm_order = 4
        self._count = 0
        self.set_timesteps(num_train_timesteps)

    def set_timesteps(self, num_inference_steps: int, device=None):
        """N steps: timesteps ``atan2(beta_k, alpha_k)*2/pi`` (float32, decreasing from 1), as diffusers makes them;
        ``betas``/``alphas`` (N+1, float32) as its attributes. Tables are float64."""
        n = num_inference_steps
        check_steps(_WHO, n)
        u = np.append(1.0 - np.arange(n) / n, 0.0)
        beta = np.sin(u * math.pi / 2) ** 2
        alpha = np.sqrt(1.0 - beta ** 2)
        self._betas, self._alphas = beta.tolist(), alpha.tolist()
        # the attributes and timesteps as diffusers makes them, in float32 throughout (bit for bit: a user may pass
        # its timesteps to ours); the tables above come from the float64 values
        u32 = torch.cat([torch.linspace(1, 0, n + 1)[:-1], torch.zeros(1)])
        self.betas = torch.sin(u32 * math.pi / 2) ** 2
        self.alphas = (1.0 - self.betas ** 2) ** 0.5
        timesteps = (torch.atan2(self.betas, self.alphas) / math.pi * 2)[:-1]
        self._set_schedule(timesteps, device, n)
        self._warm(device, _KEY)

    def _build(self, key):
        b, a = self._betas, self._alphas
        rows = [_ipndm_row(b[i], a[i], b[i + 1], a[i + 1], q) for i in range(len(b) - 1) for q in (1, 2, 3, 4)]
        return coefs.table(rows), None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One iPNDM step; returns ``(prev_sample,)`` or a ``SchedulerOutput``. model_output, sample: (B, ...) float
        tensors of one shape (computed in their promoted dtype, as diffusers)."""
        i = self._index(timestep)
        first = i == self._loop_start
        count = 0 if first else self._count
        order = min(count + 1, 4)
        x = self._state_in(sample, model_output)
        h, h2, h3, h_out = self._history_slots(x, i, first, 3)
        prev, _ = self._fused(_KEY, 4 * i + order - 1, x, model_output, history=h, history2=h2, history3=h3,
                              history_out=h_out, x0=False)
        self._count = count + 1
        self._advance()
        return self._output_prev_only(return_dict, prev)

    def add_noise(self, original_samples, noise, timesteps):
        """Not defined for iPNDM (diffusers' class has none): raises."""
        raise NotImplementedError(f"{_WHO}: add_noise is not defined (diffusers' IPNDMScheduler has none)")
