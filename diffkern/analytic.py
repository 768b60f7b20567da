"""Exact denoisers for testing samplers: Gaussian mixtures and the optimal denoiser of a finite dataset.

Both follow the k-diffusion model contract ``model(x, sigma_batch) -> denoised`` in VE coordinates
(``x = x0 + sigma*eps``), so they can be handed straight to any sampler. All maths runs in float64
whatever the input dtype; results come back in the input's dtype and shape. ``denoise``/``score`` do
no host synchronisation (no ``.item()``, no value-dependent Python branches on device tensors), so
they can run inside a captured sampling loop on any device.

Maths: ``math-samplers.md`` section 0 (Tweedie: ``D = x + sigma^2 * score``) and section 4.4
(the optimal denoiser over a dataset is one Gaussian mean-shift step).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch

SigmaLike = Union[float, int, torch.Tensor]
_LOG_2PI = math.log(2 * math.pi)


def _as_f64(value, name: str, ndim: tuple[int, ...]) -> torch.Tensor:
    # Python sequences go straight to float64 (torch.as_tensor would round them to float32 first)
    t = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(value, dtype=torch.float64)
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name}: expected a real floating tensor, got dtype {t.dtype}")
    t = t.to(torch.float64)
    if t.dim() not in ndim:
        raise ValueError(f"{name}: expected {' or '.join(f'{d}-d' for d in ndim)}, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: values must be finite")
    return t


def _flatten(x: torch.Tensor, dim: int, who: str) -> torch.Tensor:
    """(B, D) or (B, *shape) with prod(shape) == dim -> (B, dim) float64."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who}: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{who}: x must be a floating tensor, got dtype {x.dtype}")
    if x.dim() < 2 or math.prod(x.shape[1:]) != dim:
        raise ValueError(f"{who}: x must have shape (B, {dim}) or (B, *shape) with prod(shape) == {dim}, "
                         f"got {tuple(x.shape)}")
    return x.reshape(x.shape[0], dim).to(torch.float64)


def _sigma_column(sigma: SigmaLike, batch: int, device, who: str, positive: bool = False) -> torch.Tensor:
    """sigma as a float64 (B, 1) tensor on ``device``. Python numbers are range-checked; tensors are not
    (that would be a host sync)."""
    if isinstance(sigma, torch.Tensor):
        if not (sigma.numel() == 1 or (sigma.dim() >= 1 and sigma.shape[0] == batch == sigma.numel())):
            raise ValueError(f"{who}: sigma must be a float, a 0-d tensor or a tensor of shape ({batch},), "
                             f"got shape {tuple(sigma.shape)}")
        if sigma.is_complex():
            raise TypeError(f"{who}: sigma must be real, got dtype {sigma.dtype}")
        s = sigma.detach().to(device=device, dtype=torch.float64).reshape(-1, 1)
        return s.expand(batch, 1)
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):  # numpy scalars too
        raise TypeError(f"{who}: sigma must be a float or a tensor, got {type(sigma).__name__}")
    if not math.isfinite(sigma) or sigma < 0 or (positive and sigma == 0):
        raise ValueError(f"{who}: sigma must be finite and {'> 0' if positive else '>= 0'}, got {sigma}")
    return torch.full((batch, 1), float(sigma), dtype=torch.float64, device=device)


class _DeviceCache:
    """Float64 parameter tensors mirrored once per device (no copy per call)."""

    def __init__(self, **tensors: torch.Tensor):
        self._by_device = {tensors[next(iter(tensors))].device: tensors}

    def on(self, device) -> dict:
        device = torch.device(device)
        if device not in self._by_device:
            base = next(iter(self._by_device.values()))
            self._by_device[device] = {k: v.to(device) for k, v in base.items()}
        return self._by_device[device]

#----------------------------------------------------------------------------
# Gaussian mixture.


class GaussianMixture:
    """``p0 = sum_k w_k N(mu_k, diag(s_k^2))``; every method is exact for ``p_sigma = p0 * N(0, sigma^2 I)``.

    Args:
        weights: (K,) non-negative mixture weights, not all zero (normalised here).
        means: (K, D) component means.
        stds: (K,) isotropic or (K, D) diagonal standard deviations, all > 0 (a float is used for all).
    Parameters are stored in float64 on the CPU and mirrored to the device of the inputs on first use.
    """

    def __init__(self, weights, means, stds):
        w = _as_f64(weights, "GaussianMixture: weights", (1,))
        mu = _as_f64(means, "GaussianMixture: means", (2,))
        if w.numel() == 0:
            raise ValueError("GaussianMixture: weights must have at least one component")
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError("GaussianMixture: weights must be >= 0 and not all zero")
        k, d = w.numel(), mu.shape[1]
        if mu.shape[0] != k or d == 0:
            raise ValueError(f"GaussianMixture: means must have shape ({k}, D) with D >= 1 to match weights, "
                             f"got {tuple(mu.shape)}")
        s = _as_f64(stds, "GaussianMixture: stds", (0, 1, 2))
        if s.dim() == 0:
            s = s.expand(k)
        if s.shape not in ((k,), (k, d)):
            raise ValueError(f"GaussianMixture: stds must have shape ({k},) or ({k}, {d}), got {tuple(s.shape)}")
        if (s <= 0).any():
            raise ValueError("GaussianMixture: stds must be > 0")
        self.weights = w / w.sum()
        self.means = mu
        self.stds = (s[:, None] if s.dim() == 1 else s).expand(k, d).contiguous()
        self._cache = _DeviceCache(log_w=self.weights.log(), mu=self.means, var=self.stds ** 2)

    @property
    def dim(self) -> int:
        """Data dimension D."""
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        """Number of components K."""
        return self.means.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        """(D,) float64 mean of the clean distribution p0."""
        return self.weights @ self.means

    @property
    def covariance(self) -> torch.Tensor:
        """(D, D) float64 covariance of the clean distribution p0 (add sigma^2 I for p_sigma)."""
        c = self.means - self.mean
        return torch.diag(self.weights @ self.stds ** 2) + (c.T * self.weights) @ c

    @classmethod
    def demo_2d(cls) -> "GaussianMixture":
        """9 components in 2-D: 8 on a ring of radius 2 (weights alternating 2:1, std 0.1) and a wider one
        (std 0.25, weight 3) at the centre. Unequal weights and small stds make bias visible in plots/tests."""
        angle = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
        ring = 2.0 * torch.stack([angle.cos(), angle.sin()], dim=1)
        means = torch.cat([ring, torch.zeros(1, 2, dtype=torch.float64)])
        weights = torch.tensor([2.0, 1.0] * 4 + [3.0], dtype=torch.float64)
        stds = torch.tensor([0.1] * 8 + [0.25], dtype=torch.float64)
        return cls(weights, means, stds)

    def _posterior(self, x: torch.Tensor, sigma: SigmaLike, who: str):
        """Returns x flattened (B, D), sigma^2 (B, 1), component log-densities (B, K) and
        sum_k r_k (mu_k - x)/v_k (the score, (B, D)), all float64 on x's device."""
        xf = _flatten(x, self.dim, who)
        p = self._cache.on(xf.device)
        s2 = _sigma_column(sigma, xf.shape[0], xf.device, who) ** 2
        var = p["var"][None] + s2[:, :, None]                                  # (B, K, D)
        diff = p["mu"][None] - xf[:, None, :]                                  # (B, K, D)
        log_comp = p["log_w"] - 0.5 * ((diff ** 2 / var).sum(-1) + (_LOG_2PI + var.log()).sum(-1))  # (B, K)
        resp = torch.softmax(log_comp, dim=1)
        score = torch.einsum("bk,bkd->bd", resp, diff / var)
        return xf, s2, log_comp, score

    def denoise(self, x: torch.Tensor, sigma: SigmaLike) -> torch.Tensor:
        """E[x0 | x0 + sigma*eps = x]. x: (B, D) or (B, *shape), any float dtype; sigma: float >= 0, 0-d or
        (B,) tensor. Returns x's shape and dtype; sigma = 0 returns x."""
        xf, s2, _, score = self._posterior(x, sigma, "GaussianMixture.denoise")
        return (xf + s2 * score).to(x.dtype).reshape(x.shape)

    def __call__(self, x: torch.Tensor, sigma: SigmaLike, **kwargs) -> torch.Tensor:
        """k-diffusion contract ``model(x, sigma_batch, **extra_args) -> denoised``; extra args are ignored."""
        return self.denoise(x, sigma)

    def score(self, x: torch.Tensor, sigma: SigmaLike) -> torch.Tensor:
        """grad_x log p_sigma(x) (= (denoise - x)/sigma^2 for sigma > 0). Shapes as :meth:`denoise`."""
        _, _, _, score = self._posterior(x, sigma, "GaussianMixture.score")
        return score.to(x.dtype).reshape(x.shape)

    def eps(self, x: torch.Tensor, sigma: SigmaLike) -> torch.Tensor:
        """Predicted noise (x - denoise)/sigma = -sigma*score (0 at sigma = 0). Shapes as :meth:`denoise`."""
        xf, s2, _, score = self._posterior(x, sigma, "GaussianMixture.eps")
        return (-s2.sqrt() * score).to(x.dtype).reshape(x.shape)

    def log_prob(self, x: torch.Tensor, sigma: SigmaLike = 0.0) -> torch.Tensor:
        """(B,) exact log p_sigma(x) in x's dtype (natural log, density w.r.t. Lebesgue measure on R^D)."""
        _, _, log_comp, _ = self._posterior(x, sigma, "GaussianMixture.log_prob")
        return torch.logsumexp(log_comp, dim=1).to(x.dtype)

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """n exact samples of p0: (n, D) float64 on the CPU (``generator`` must be a CPU generator)."""
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:  # numpy ints too
            raise ValueError(f"GaussianMixture.sample: n must be an int >= 0, got {n!r}")
        n = int(n)
        if n == 0:
            return torch.empty(0, self.dim, dtype=torch.float64)
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return self.means[idx] + self.stds[idx] * noise

    def __repr__(self) -> str:
        return f"GaussianMixture(num_components={self.num_components}, dim={self.dim})"

#----------------------------------------------------------------------------
# Optimal denoiser over a finite dataset (Chen et al. 4.4).


class EmpiricalDenoiser:
    """The exact denoiser of the empirical distribution of ``data``: ``D(x) = sum_i w_i y_i`` with
    ``w = softmax_i(-||x - y_i||^2 / (2 sigma^2))``, i.e. one Gaussian mean-shift step.

    Logits use the form ``(x.y_i - ||y_i||^2/2)/sigma^2`` (``||x||^2`` cancels in the softmax) and are
    reduced with a streaming logsumexp over chunks of ``chunk_size`` data points, so memory is
    O(B*chunk_size + chunk_size*D + B*D): no (B, N, D) tensor is ever formed. Logits are formed in coordinates centred
    on the data mean c (D is translation-equivariant: ``D(x) = c + D_c(x - c)``): the dot-product form
    rounds at the scale of ``|x||y|``, not of ``|x - y|^2``, so with a data offset its logits would lose
    ``ulp(|x||y|)/sigma^2`` (data at offset 1000 with unit spread: float32 weights off by ~10% at sigma = 1,
    float64 log-densities off by 2e-6 at sigma = 0.01 without the shift). The float64 path averages the
    uncentred data with those weights, so at tiny sigma it returns a data point bit for bit.

    Args:
        data: (N, D) or (N, *shape) finite tensor, N >= 1; stored flattened in float64 on its device.
        chunk_size: data points per chunk (>= 1).
        backend: None (this chunked float64 PyTorch path) or a :func:`diffkern.ops.optimal_denoiser`
            backend ("triton", "reference", "auto"): :meth:`denoise` then runs the fused kernel in the
            input's dtype (float32 accumulation), with the data cast once per device and dtype.
    """

    def __init__(self, data: torch.Tensor, chunk_size: int = 4096, backend: str | None = None):
        if not isinstance(data, torch.Tensor):
            raise TypeError(f"EmpiricalDenoiser: data must be a torch.Tensor, got {type(data).__name__}")
        if data.dim() < 2 or data.shape[0] == 0 or math.prod(data.shape[1:]) == 0:
            raise ValueError(f"EmpiricalDenoiser: data must have shape (N, D) or (N, *shape) with N, D >= 1, "
                             f"got {tuple(data.shape)}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
            raise ValueError(f"EmpiricalDenoiser: chunk_size must be an int >= 1, got {chunk_size!r}")
        chunk_size = int(chunk_size)
        y = _as_f64(data.reshape(data.shape[0], -1), "EmpiricalDenoiser: data", (2,))
        self.data = y
        self.chunk_size = chunk_size
        center = y.mean(0)
        self._cache = _DeviceCache(y=y, half_sq_c=0.5 * ((y - center) ** 2).sum(1), center=center)
        self.backend = backend
        self._fused_data: dict = {}

    @property
    def dim(self) -> int:
        """Data dimension D."""
        return self.data.shape[1]

    @property
    def num_points(self) -> int:
        """Dataset size N."""
        return self.data.shape[0]

    def _stream(self, xf: torch.Tensor, sigma: torch.Tensor):
        """Online softmax over chunks. xf (B, D), sigma (B, 1) -> (logsumexp of the logits (B,),
        softmax-weighted mean of the data (B, D)), float64.

        The running max m is of the unscaled logits ``x.y_i - ||y_i||^2/2``, in coordinates centred on the
        data mean (the logsumexp is of those); only differences (<= 0) are scaled by ``1/sigma^2`` (clamped
        finite), so a tiny sigma cannot overflow them to inf - inf = nan."""
        from .ops.optimal_denoiser import inv_sq

        p = self._cache.on(xf.device)
        batch = xf.shape[0]
        scale = inv_sq(sigma)
        m = torch.full((batch, 1), -math.inf, dtype=torch.float64, device=xf.device)
        total = torch.zeros(batch, 1, dtype=torch.float64, device=xf.device)
        acc = torch.zeros(batch, self.dim, dtype=torch.float64, device=xf.device)
        xc = xf - p["center"]
        for start in range(0, self.num_points, self.chunk_size):
            y = p["y"][start:start + self.chunk_size]
            logits = xc @ (y - p["center"]).T - p["half_sq_c"][start:start + self.chunk_size]  # (B, chunk), unscaled
            m_new = torch.maximum(m, logits.amax(dim=1, keepdim=True))
            rescale = torch.exp((m - m_new) * scale)
            w = torch.exp((logits - m_new) * scale)
            total = total * rescale + w.sum(dim=1, keepdim=True)
            acc = acc * rescale + w @ y
            m = m_new
        return (m * scale + total.log()).squeeze(1), acc / total

    def denoise(self, x: torch.Tensor, sigma: SigmaLike) -> torch.Tensor:
        """Optimal denoiser. x: (B, D) or (B, *shape), any float dtype; sigma: float >= 0, 0-d or (B,)
        tensor. Returns x's shape and dtype; sigma = 0 returns x."""
        who = "EmpiricalDenoiser.denoise"
        if self.backend is not None:
            return self._denoise_fused(x, sigma)
        xf = _flatten(x, self.dim, who)
        s = _sigma_column(sigma, xf.shape[0], xf.device, who)
        _, mean = self._stream(xf, s)
        return torch.where(s > 0, mean, xf).to(x.dtype).reshape(x.shape)

    def _denoise_fused(self, x: torch.Tensor, sigma: SigmaLike) -> torch.Tensor:
        from .ops.optimal_denoiser import half_sq_norms, optimal_denoiser

        who = "EmpiricalDenoiser.denoise"
        xf = _flatten(x, self.dim, who)
        s = _sigma_column(sigma, xf.shape[0], xf.device, who)
        key = (x.device, x.dtype)
        if key not in self._fused_data:
            p = self._cache.on(x.device)
            y = (p["y"] - p["center"]).to(x.dtype)  # centred in float64, then rounded once
            self._fused_data[key] = (y, half_sq_norms(y), p["center"])
        y, half_sq, center = self._fused_data[key]
        sig = sigma if isinstance(sigma, torch.Tensor) else s.squeeze(1)  # tensors: the op checks their device
        out = optimal_denoiser((xf - center).to(x.dtype), y, sig, data_half_sq=half_sq, backend=self.backend)
        # sigma = 0 rows return x itself, not x rounded through the shift and back
        return torch.where(s > 0, out.to(torch.float64) + center, xf).to(x.dtype).reshape(x.shape)

    def __call__(self, x: torch.Tensor, sigma: SigmaLike, **kwargs) -> torch.Tensor:
        """k-diffusion contract ``model(x, sigma_batch, **extra_args) -> denoised``; extra args are ignored."""
        return self.denoise(x, sigma)

    def score(self, x: torch.Tensor, sigma: SigmaLike) -> torch.Tensor:
        """grad log of the KDE at bandwidth sigma, (denoise - x)/sigma^2. Needs sigma > 0 (a float 0 raises,
        a tensor 0 gives nan). Shapes as :meth:`denoise`."""
        who = "EmpiricalDenoiser.score"
        xf = _flatten(x, self.dim, who)
        s = _sigma_column(sigma, xf.shape[0], xf.device, who, positive=True)
        _, mean = self._stream(xf, s)
        return ((mean - xf) / s ** 2).to(x.dtype).reshape(x.shape)

    def eps(self, x: torch.Tensor, sigma: SigmaLike) -> torch.Tensor:
        """Predicted noise (x - denoise)/sigma; needs sigma > 0 as :meth:`score`."""
        who = "EmpiricalDenoiser.eps"
        xf = _flatten(x, self.dim, who)
        s = _sigma_column(sigma, xf.shape[0], xf.device, who, positive=True)
        _, mean = self._stream(xf, s)
        return ((xf - mean) / s).to(x.dtype).reshape(x.shape)

    def log_prob(self, x: torch.Tensor, sigma: SigmaLike) -> torch.Tensor:
        """(B,) log of the KDE ``(1/N) sum_i N(x; y_i, sigma^2 I)`` in x's dtype; needs sigma > 0."""
        who = "EmpiricalDenoiser.log_prob"
        xf = _flatten(x, self.dim, who)
        s = _sigma_column(sigma, xf.shape[0], xf.device, who, positive=True)
        lse, _ = self._stream(xf, s)
        s = s.squeeze(1)
        xc = xf - self._cache.on(xf.device)["center"]  # the logits' centred coordinates
        out = (lse - 0.5 * (xc ** 2).sum(1) / s ** 2 - math.log(self.num_points)
               - 0.5 * self.dim * (_LOG_2PI + 2 * s.log()))
        return out.to(x.dtype)

    def __repr__(self) -> str:
        return f"EmpiricalDenoiser(num_points={self.num_points}, dim={self.dim}, chunk_size={self.chunk_size})"
