"""Turn eps-, v-, x0- or flow-prediction networks into the denoiser ``D(x, sigma)`` (k-diffusion convention).

Every wrapper works in VE coordinates (``x = x0 + sigma*eps``) and splits the denoiser into three parts so a
sampler can fuse the last two into its step kernel (``diffkern.ops.coefs`` slots W, P, Q):

- ``raw(x, sigma, **extra) -> (out, out_uncond or None)``: the network output(s); with classifier-free
  guidance both come from ONE batched network call on ``[uncond; cond]``.
- the guidance combine ``m = u + guidance_scale*(out - u)`` (diffusers convention: 1 means none);
- ``conversion(sigma) -> (p, q)``: the affine map ``D = p*x + q*m`` of the prediction type
  (``math-samplers.md`` section 0): epsilon ``(1, -sigma)``, sample ``(0, 1)``, v_prediction
  ``(1/(1+sigma^2), -sigma/sqrt(1+sigma^2))``, flow ``(1/(1+sigma), -sigma/(1+sigma))``, EDM
  ``(c_skip, c_out)``.

``wrapper(x, sigma, **extra)`` returns D computed from the same pieces in PyTorch (float32 math for low-precision
``x``, float64 for float64 ``x``, as the fused kernel does). ``sigma`` is a float, a 0-d or a (B,) tensor; no
wrapper reads a device value on the host, so they run inside captured sampling loops.

Classifier-free guidance: pass the unconditional inputs as ``uncond_<name>`` next to ``<name>`` in the extra
args (for example ``encoder_hidden_states`` and ``uncond_encoder_hidden_states``).
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Union

import torch
from torch import nn

from . import schedules

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow", "edm")
_ALIASES = {"eps": "epsilon", "epsilon": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction",
            "x0": "sample", "sample": "sample", "original_sample": "sample", "flow": "flow", "edm": "edm"}
SigmaLike = Union[float, torch.Tensor]


def canonical_prediction_type(name: str) -> str:
    """Canonical prediction type for a name or alias (eps, x0, v, original_sample, ...); raises on unknown names."""
    if name not in _ALIASES:
        raise ValueError(f"prediction_type: unknown {name!r}; expected one of {PREDICTION_TYPES} "
                         f"(aliases {sorted(set(_ALIASES) - set(PREDICTION_TYPES))})")
    return _ALIASES[name]


def conversion(prediction_type: str, sigma: SigmaLike, sigma_data: float = 1.0):
    """``(p, q)`` with ``D = p*x + q*model_output`` in VE coordinates. sigma: float (returns floats) or tensor
    (returns float64 tensors of its shape and device). ``sigma_data`` is used by "edm" only."""
    kind = canonical_prediction_type(prediction_type)
    if isinstance(sigma, torch.Tensor):
        s, sqrt = sigma.to(torch.float64), torch.sqrt
    else:
        s, sqrt = float(sigma), math.sqrt
    if kind == "epsilon":
        return 1.0 + 0.0 * s, -s
    if kind == "sample":
        return 0.0 * s, 1.0 + 0.0 * s
    if kind == "v_prediction":
        return 1 / (1 + s * s), -s / sqrt(1 + s * s)
    if kind == "flow":
        return 1 / (1 + s), -s / (1 + s)
    if isinstance(sigma_data, numbers.Real):  # numpy scalars as Python floats (np.float32 arithmetic stays float32)
        sigma_data = float(sigma_data)
    sd2 = sigma_data * sigma_data
    return sd2 / (s * s + sd2), s * sigma_data / sqrt(s * s + sd2)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _same(u, c) -> bool:
    try:
        return u is c or bool(u == c)
    except (RuntimeError, TypeError, ValueError):  # e.g. an ambiguous comparison involving tensors
        return False


def _pair(u, c, name: str):
    """Stack unconditional and conditional inputs along the batch: tensors, dicts and sequences of them, or
    equal values (one value reaches both halves of the batch, so an unconditional value that differs from
    its conditional one would be dropped silently: refused)."""
    if isinstance(c, torch.Tensor):
        if not isinstance(u, torch.Tensor) or u.shape != c.shape:
            got = tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__
            raise ValueError(f"uncond_{name}: expected a tensor of shape {tuple(c.shape)} like {name}, got {got}")
        return torch.cat([u, c])
    if isinstance(c, dict):
        if not isinstance(u, dict) or set(u) != set(c):
            raise ValueError(f"uncond_{name}: expected a dict with the keys of {name} {list(c)}")
        return {k: _pair(u[k], c[k], f"{name}[{k!r}]") for k in c}
    if type(c) in (list, tuple):  # plain sequences only (a namedtuple cannot be rebuilt from a generator)
        if not isinstance(u, (list, tuple)) or len(u) != len(c):
            raise ValueError(f"uncond_{name}: expected a sequence of {len(c)} items like {name}")
        return type(c)(_pair(v, w, f"{name}[{i}]") for i, (v, w) in enumerate(zip(u, c)))
    if not _same(u, c):
        raise ValueError(f"uncond_{name}: {u!r} differs from {name} = {c!r}, but a non-tensor value reaches both "
                         "halves of the guidance batch; pass both as tensors of one shape")
    return c


def _dup(v, batch: int):
    if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch:
        return torch.cat([v, v])
    if isinstance(v, dict):
        return {k: _dup(w, batch) for k, w in v.items()}
    if type(v) in (list, tuple):
        return type(v)(_dup(w, batch) for w in v)
    return v

#----------------------------------------------------------------------------
# Base class.


class ModelWrapper(nn.Module):
    """Base of all wrappers. Subclasses define ``model_input(x, sigma) -> (x_in, t)`` (sigma a (B,) float64
    tensor) and set ``prediction_type``; they may override ``call_model`` and ``conversion``.

    Attributes:
        model: the wrapped network, called as ``model(x_in, t, **extra)``.
        prediction_type: one of :data:`PREDICTION_TYPES`.
        guidance_scale: CFG weight w of ``u + w*(c - u)`` (1.0: no guidance, uncond inputs are ignored).
    """

    prediction_type = "epsilon"
    sigma_data = 1.0

    def __init__(self, model: Callable, guidance_scale: float = 1.0):
        super().__init__()
        if not callable(model):
            raise TypeError(f"{type(self).__name__}: model must be callable, got {type(model).__name__}")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real) \
                or not math.isfinite(guidance_scale):
            raise ValueError(f"{type(self).__name__}: guidance_scale must be a finite float, got {guidance_scale!r}")
        self.model = model
        self.guidance_scale = float(guidance_scale)

    # -- pieces a subclass provides ------------------------------------------------------------------

    def model_input(self, x: torch.Tensor, sigma: torch.Tensor):
        """(x_in, t): the network's input and time conditioning for VE state x (B, ...) at sigma (B,) float64."""
        raise NotImplementedError

    def call_model(self, x_in: torch.Tensor, t: torch.Tensor, **extra) -> torch.Tensor:
        """One network evaluation; returns a tensor shaped like x_in."""
        return self.model(x_in, t, **extra)

    def conversion(self, sigma: SigmaLike):
        """``(p, q)`` of ``D = p*x + q*m``: floats for a float sigma, float64 tensors for a tensor sigma."""
        return conversion(self.prediction_type, sigma, self.sigma_data)

    # -- shared machinery ----------------------------------------------------------------------------

    def _sigma(self, x: torch.Tensor, sigma: SigmaLike) -> torch.Tensor:
        who = type(self).__name__
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
            raise TypeError(f"{who}: x must be a floating tensor of shape (B, ...), got "
                            f"{type(x).__name__ if not isinstance(x, torch.Tensor) else (x.dtype, tuple(x.shape))}")
        batch = x.shape[0]
        if isinstance(sigma, torch.Tensor):
            if not (sigma.numel() == 1 or (sigma.dim() >= 1 and sigma.shape[0] == batch == sigma.numel())):
                raise ValueError(f"{who}: sigma must be a float, a 0-d tensor or a ({batch},) tensor, "
                                 f"got shape {tuple(sigma.shape)}")
            return sigma.detach().to(device=x.device, dtype=torch.float64).reshape(-1).expand(batch)
        if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not math.isfinite(sigma) or sigma < 0:
            raise ValueError(f"{who}: sigma must be a finite float >= 0 or a tensor, got {sigma!r}")
        return torch.full((batch,), float(sigma), dtype=torch.float64, device=x.device)

    def _checked(self, out, shape: torch.Size) -> torch.Tensor:
        if not isinstance(out, torch.Tensor) or out.shape != shape or not out.is_floating_point():
            got = (out.dtype, tuple(out.shape)) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"{type(self).__name__}: the model must return a floating tensor of shape "
                             f"{tuple(shape)}, got {got}")
        return out

    def raw(self, x: torch.Tensor, sigma: SigmaLike, **extra):
        """Network output(s) at VE state x (B, ...) and sigma (float, 0-d or (B,) tensor).

        Returns ``(out, out_uncond)``; ``out_uncond`` is None unless ``guidance_scale != 1``, in which case
        every ``uncond_<name>`` extra arg is stacked with ``<name>`` and the network runs once on 2B samples.
        Outputs are in the network's dtype, shaped like x.
        """
        s = self._sigma(x, sigma)
        x_in, t = self.model_input(x, s)
        uncond = {k[len("uncond_"):]: v for k, v in extra.items() if k.startswith("uncond_")}
        cond = {k: v for k, v in extra.items() if not k.startswith("uncond_")}
        if self.guidance_scale == 1.0:
            return self._checked(self.call_model(x_in, t, **cond), x_in.shape), None
        if not uncond:
            raise ValueError(f"{type(self).__name__}: guidance_scale={self.guidance_scale} needs the unconditional "
                             "inputs as uncond_<name> extra args (e.g. uncond_encoder_hidden_states)")
        missing = sorted(set(uncond) - set(cond))
        if missing:
            raise ValueError(f"{type(self).__name__}: uncond_{missing[0]} given without its conditional {missing[0]}")
        batch = x.shape[0]
        both = {k: (_pair(uncond[k], v, k) if k in uncond else _dup(v, batch)) for k, v in cond.items()}
        out = self.call_model(torch.cat([x_in, x_in]), torch.cat([t, t]), **both)
        out = self._checked(out, torch.Size([2 * batch, *x_in.shape[1:]]))
        out_uncond, out_cond = out.chunk(2)
        return out_cond, out_uncond

    def forward(self, x: torch.Tensor, sigma: SigmaLike, **extra) -> torch.Tensor:
        """Denoised estimate ``D = p*x + q*(u + w*(c - u))``; shape and dtype of x."""
        out, out_uncond = self.raw(x, sigma, **extra)
        cdt = _compute_dtype(x)
        m = out.to(cdt)
        if out_uncond is not None:
            u = out_uncond.to(cdt)
            m = u + self.guidance_scale * (m - u)
        p, q = self.conversion(self._sigma(x, sigma))
        view = (-1,) + (1,) * (x.dim() - 1)
        return (p.to(cdt).view(view) * x.to(cdt) + q.to(cdt).view(view) * m).to(x.dtype)

    def extra_repr(self) -> str:
        return f"prediction_type={self.prediction_type!r}, guidance_scale={self.guidance_scale}"


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view((-1,) + (1,) * (x.dim() - 1))


def _scale_input(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    cdt = _compute_dtype(x)
    return (x.to(cdt) * _bcast(c, x).to(cdt)).to(x.dtype)

#----------------------------------------------------------------------------
# VP, discrete time (DDPM-trained networks; k-diffusion DiscreteEpsDDPMDenoiser / DiscreteVDDPMDenoiser).


class VPDiscreteDenoiser(ModelWrapper):
    """Network trained on T discrete VP timesteps, called as ``model(x*c_in, t, **extra)``.

    ``c_in = 1/sqrt(sigma^2 + 1)`` (so the network sees the VP state) and t is sigma's position in the table
    ``sigma_t = sqrt((1 - ab_t)/ab_t)``, interpolated linearly in log sigma between neighbouring entries
    (float32 t), or rounded to the nearest entry with ``quantize=True`` (int64 t). A float32 sigma (what samplers
    pass for float32 states) lands ~1e-5 off the integer t it was built from: use ``quantize=True`` for exact parity
    with integer-timestep schedulers (DDIM/DDPM). Move the wrapper with ``.to(device)`` so the table lives
    on the model's device (otherwise it is copied there on every call).

    Args:
        model: the network.
        alphas_cumprod: (T,) alpha-bar table, any float dtype (use the scheduler's own for exact parity).
        prediction_type: "epsilon", "v_prediction" or "sample" (aliases accepted).
        quantize: snap t to integers.
        guidance_scale: CFG weight (1: none).
    """

    def __init__(self, model: Callable, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon",
                 quantize: bool = False, guidance_scale: float = 1.0):
        super().__init__(model, guidance_scale)
        kind = canonical_prediction_type(prediction_type)
        if kind not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"{type(self).__name__}: prediction_type must be epsilon, v_prediction or sample, "
                             f"got {prediction_type!r}")
        ab = schedules.host_float64(alphas_cumprod, "alphas_cumprod")
        if ab.dim() != 1 or ab.numel() < 2 or not ((ab > 0) & (ab < 1)).all():
            raise ValueError(f"{type(self).__name__}: alphas_cumprod must be a 1-D tensor of length >= 2 with "
                             "values in (0, 1)")
        sig = schedules.alpha_bar_to_sigma(ab)
        if not (sig[1:] > sig[:-1]).all():
            raise ValueError(f"{type(self).__name__}: alphas_cumprod must be strictly decreasing")
        self.prediction_type = kind
        self.quantize = bool(quantize)
        self.register_buffer("sigmas", sig, persistent=False)
        self.register_buffer("log_sigmas", sig.log(), persistent=False)

    @property
    def sigma_min(self) -> float:
        """Smallest table sigma, sigma(t=0)."""
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        """Largest table sigma, sigma(t=T-1)."""
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor, quantize: Optional[bool] = None) -> torch.Tensor:
        """Fractional timestep of sigma (any shape, float64 result; int64 when quantized), clamped to [0, T-1]."""
        quantize = self.quantize if quantize is None else quantize
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_s = sigma.to(torch.float64).log()
        low = (torch.searchsorted(log_sigmas, log_s.reshape(-1), right=True) - 1).clamp(0, log_sigmas.numel() - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((log_s.reshape(-1) - lo) / (hi - lo)).clamp(0, 1)
        if quantize:
            return (low + (w > 0.5).long()).reshape(sigma.shape)
        return (low + w).reshape(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`sigma_to_t`: sigma at fractional t (log-linear), float64. t is clamped to [0, T-1], as
        :meth:`sigma_to_t` clamps: past the table's ends there is no sigma to interpolate, only a guess."""
        log_sigmas = self.log_sigmas.to(t.device)
        t = t.to(torch.float64).clamp(0, log_sigmas.numel() - 1)
        low = t.floor().long().clamp(0, log_sigmas.numel() - 2)
        w = t - low
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp()

    def model_input(self, x, sigma):
        t = self.sigma_to_t(sigma)
        return _scale_input(x, 1 / torch.sqrt(sigma * sigma + 1)), (t if self.quantize else t.to(torch.float32))


class DiffusersUNetDenoiser(VPDiscreteDenoiser):
    """A diffusers ``UNet2DModel``/``UNet2DConditionModel`` (any module called as ``unet(sample, timestep, **extra,
    return_dict=False)[0]``) as D(x, sigma).

    alphas_cumprod and prediction_type come from ``scheduler`` (any diffusers DDPM-family scheduler) unless given.
    Conditioning goes through the extra args (``encoder_hidden_states``, ``class_labels``, ...) and CFG through
    ``uncond_<name>`` (one batched UNet call). The input is cast to the UNet's dtype. A UNet with learned variance
    (2x output channels) has its variance half dropped.
    """

    def __init__(self, unet: nn.Module, scheduler=None, *, alphas_cumprod: Optional[torch.Tensor] = None,
                 prediction_type: Optional[str] = None, quantize: bool = False, guidance_scale: float = 1.0):
        if scheduler is None and (alphas_cumprod is None or prediction_type is None):
            raise ValueError("DiffusersUNetDenoiser: pass a scheduler, or both alphas_cumprod and prediction_type")
        if alphas_cumprod is None:
            alphas_cumprod = scheduler.alphas_cumprod
        if prediction_type is None:
            prediction_type = scheduler.config.prediction_type
        super().__init__(unet, alphas_cumprod, prediction_type, quantize, guidance_scale)

    def call_model(self, x_in, t, **extra):
        dtype = getattr(self.model, "dtype", x_in.dtype)
        out = self.model(x_in.to(dtype), t, **extra, return_dict=False)[0]
        if out.dim() >= 2 and out.shape[1] == 2 * x_in.shape[1]:
            out = out[:, :x_in.shape[1]]  # learned variance: keep the mean prediction
        return out


# The continuous-time wrappers (their networks take a float time or sigma, not a training-table timestep), served
# from their module on first access (PEP 562): an import at the end of this file made importing
# diffkern.wrappers_continuous first a circular import.
_CONTINUOUS = ("FlowDenoiser", "KarrasDenoiser", "VEDenoiser", "VPContinuousDenoiser")


def __getattr__(name):
    if name in _CONTINUOUS:
        from . import wrappers_continuous
        return getattr(wrappers_continuous, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_CONTINUOUS))
