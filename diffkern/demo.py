"""The built-in demo: sample a 2-D Gaussian mixture with the fused kernels and plot it beside the
true density (``python -m diffkern demo``).

The denoiser is the exact one of the mixture (``diffkern.analytic``), so what the picture shows is the
sampler alone: no training, no download.
"""
from __future__ import annotations

import time

import torch

from ._files import atomic_write


def run(out: str = "out/demo.png", *, method: str = "ge", steps: int = 20, n: int = 4000, seed: int = 0,
        backend: str = "auto") -> dict:
    """Sample ``n`` points with ``method`` over ``steps`` Karras steps and write a PNG to ``out``.

    Returns a summary dict (backend, seconds, sample mean log-density vs that of exact samples).
    """
    gmm, samples, exact, summary = sample_demo(method=method, steps=steps, n=n, seed=seed, backend=backend)
    plot(gmm, samples, exact, out, summary)
    return summary


def sample_demo(*, method: str = "ge", steps: int = 20, n: int = 4000, seed: int = 0, backend: str = "auto"):
    """The sampling half of :func:`run`: ``(gmm, samples (n, 2) float32, exact (n, 2) float64, summary)``, so that
    a caller can tell a failing write (:func:`plot`) from a failing sampler."""
    from . import analytic, ops, schedules
    from .sampling import sample

    gmm = analytic.GaussianMixture.demo_2d()
    sigmas = schedules.karras(steps, 0.002, 80.0)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=gen, dtype=torch.float64).float() * float(sigmas[0])
    used, _ = ops.resolve("sampler_step", "cpu", backend)
    t0 = time.perf_counter()
    samples = sample(gmm, x, sigmas, method, backend=backend, seed=seed)
    seconds = time.perf_counter() - t0
    exact = gmm.sample(n, generator=gen)
    summary = {"method": method, "steps": steps, "n": n, "backend": used, "seconds": seconds,
               "mean_log_density_samples": float(gmm.log_prob(samples.double()).mean()),
               "mean_log_density_exact": float(gmm.log_prob(exact).mean())}
    return gmm, samples, exact, summary


def plot(gmm, samples, exact, out: str, summary: dict) -> None:
    """Write the PNG of :func:`run` to ``out``: the mixture's density beside ``samples`` (atomically)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lim = float(exact.abs().max()) * 1.15
    grid = torch.linspace(-lim, lim, 300, dtype=torch.float64)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    dens = gmm.log_prob(torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)).exp().reshape(gx.shape)
    fig, axes = plt.subplots(1, 2, figsize=(10, 5), sharex=True, sharey=True)
    axes[0].imshow(dens.numpy(), extent=(-lim, lim, -lim, lim), origin="lower", cmap="magma")
    axes[0].set_title("true density")
    pts = samples.detach().double().cpu().numpy()
    axes[1].scatter(pts[:, 0], pts[:, 1], s=1.5, alpha=0.5, color="tab:blue")
    axes[1].set_title(f"{summary['method']}, {summary['steps']} steps, backend {summary['backend']}")
    for ax in axes:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
    fig.tight_layout()
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
