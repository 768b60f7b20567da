"""A small UNet F_theta for the built-in denoiser, sized for 16x16 greyscale images: three
resolutions (16, 8, 4), one residual block per level on the way down and up, two in the middle.

It is the raw network of EDM preconditioning (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", Table 1): it sees ``c_in * x`` and ``c_noise = ln(sigma)/4`` and
the denoiser is ``D = c_skip * x + c_out * F_theta`` (:class:`diffkern.wrappers.KarrasDenoiser`,
whose (c_skip, c_out) conversion runs inside the fused sampler step).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

#----------------------------------------------------------------------------
# Building blocks.


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class NoiseEmbedding(nn.Module):
    """c_noise (B,) -> (B, dim): fixed sinusoidal features (Transformer-style frequencies), then an MLP."""

    def __init__(self, dim: int, num_freqs: int = 16, max_period: float = 100.0):
        super().__init__()
        freqs = torch.exp(-math.log(max_period) * torch.arange(num_freqs, dtype=torch.float64) / num_freqs)
        self.register_buffer("freqs", (freqs * 10.0).float(), persistent=False)  # c_noise spans about [-2, 1.1]
        self.mlp = nn.Sequential(nn.Linear(2 * num_freqs, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        arg = c_noise[:, None] * self.freqs[None, :]  # (B, num_freqs)
        # c_noise arrives in float32 at least; a 16-bit network takes the features in its own dtype
        feats = torch.cat([arg.cos(), arg.sin()], dim=1).to(self.mlp[0].weight.dtype)
        return self.mlp(feats)  # (B, dim)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the noise embedding as a per-channel scale and shift."""

    def __init__(self, cin: int, cout: int, emb_dim: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity (EDM's init_zero on conv1 out)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, cout, H, W)
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        return self.skip(x) + self.conv2(h)

#----------------------------------------------------------------------------
# The network F_theta.


class TinyUNet(nn.Module):
    """UNet F_theta(x_in, c_noise) for (B, channels, H, W) images, H and W divisible by 4.

    Args:
        channels: image channels (1 for the digits).
        widths: channels per resolution level, finest first (three levels: H, H/2, H/4).
        emb_dim: width of the noise embedding.
    """

    def __init__(self, channels: int = 1, widths: tuple[int, ...] = (32, 64, 96), emb_dim: int = 128):
        super().__init__()
        self.config = {"channels": channels, "widths": list(widths), "emb_dim": emb_dim}
        self.embed = NoiseEmbedding(emb_dim)
        self.stem = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        cin = widths[0]
        for i, w in enumerate(widths):
            self.down.append(ResBlock(cin, w, emb_dim))
            cin = w
            if i + 1 < len(widths):
                self.downsample.append(nn.Conv2d(w, w, 3, stride=2, padding=1))
        self.mid = nn.ModuleList([ResBlock(cin, cin, emb_dim), ResBlock(cin, cin, emb_dim)])
        self.up = nn.ModuleList()
        for w in reversed(widths):
            self.up.append(ResBlock(cin + w, w, emb_dim))
            cin = w
        self.head = nn.Sequential(_norm(cin), nn.SiLU(), nn.Conv2d(cin, channels, 3, padding=1))

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        emb = self.embed(c_noise)  # (B, emb_dim)
        h = self.stem(x_in)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, emb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)  # (B, w, H/2, W/2)
        for block in self.mid:
            h = block(h, emb)
        for i, block in enumerate(self.up):
            if i > 0:
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.head(h)  # (B, channels, H, W)
