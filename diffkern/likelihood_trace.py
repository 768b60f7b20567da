"""Hutchinson (Skilling-Hutchinson) divergence for the probability-flow-ODE likelihood.

:func:`diffkern.likelihood.ode_log_likelihood` needs ``tr(dD/dz)`` at every evaluation of the ODE's field.
The exact trace costs d vector-Jacobian products (VJPs); Hutchinson's estimator costs one per probe:
``tr(J) = E[eps^T J eps]`` for any probe with ``E[eps eps^T] = I`` (Rademacher: entries +-1; Gaussian: N(0, 1)),
and ``eps^T J eps = eps . (eps^T J)`` is one VJP, ``torch.autograd.grad((eps*D).sum(), z)``.

The probes are drawn once per call and kept for the whole solve (Song et al. 2021, Grathwohl et al. 2019):
the logdet integral is then ``int eps^T J(z(s), s) eps ds = eps^T M eps`` with ``M = int J ds`` along the
(probe-independent) path, an unbiased estimate of ``tr M`` whose variance is that of one quadratic form
(a probe redrawn per evaluation would make the field a random function the adaptive solver cannot
integrate). With ``S = (M + M^T)/2`` and n probes per point the variance of the logdet estimate is
``2*||S||_F^2/n`` for Gaussian probes and ``2*(||S||_F^2 - sum_i S_ii^2)/n`` for Rademacher probes:
never larger, and zero when M is diagonal.
"""
from __future__ import annotations

import numbers

import torch

TRACES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")


def check_trace_args(trace, probes, probe, seed) -> None:
    """Validates the trace options of :func:`~diffkern.likelihood.ode_log_likelihood`; raises naming the argument."""
    if trace not in TRACES:
        raise ValueError(f"trace: expected one of {TRACES}, got {trace!r}")
    if isinstance(probes, bool) or not isinstance(probes, numbers.Integral) or probes < 1:
        raise ValueError(f"probes: expected an int >= 1 (probe vectors per point), got {probes!r}")
    if probe not in PROBES:
        raise ValueError(f"probe: expected one of {PROBES}, got {probe!r}")
    check_seed(seed)


def check_seed(seed) -> None:
    """Raise unless ``seed`` is an int (Python or numpy) in [0, 2**63), the range ``torch.Generator.manual_seed``
    keeps exactly."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed: expected an int in [0, 2**63), got {seed!r}")


def draw_probes(n: int, batch: int, dim: int, probe: str, seed: int, device) -> torch.Tensor:
    """``(n, batch, dim)`` float64 probes on ``device`` with ``E[eps eps^T] = I`` per point.

    Drawn on the CPU from a generator seeded with ``seed`` and then moved, so a seed gives the same probes on
    every device; every point and probe is independent (rows of a batch are independent estimates).
    """
    gen = torch.Generator().manual_seed(int(seed))
    if probe == "rademacher":
        eps = torch.randint(0, 2, (n, batch, dim), generator=gen).to(torch.float64) * 2 - 1
    else:
        eps = torch.randn(n, batch, dim, generator=gen, dtype=torch.float64)
    return eps.to(device)


def hutchinson_trace(denoised: torch.Tensor, z: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """Mean over the probes of ``eps^T (dD/dz) eps``, (B,): one VJP per probe.

    denoised: (B, d), a differentiable function of z (B, d); probes: (n, B, d) in their dtype. As for the exact
    trace, a D that autograd cannot trace back to z raises (a detached model would otherwise read as divergence 0).
    """
    n = probes.shape[0]
    total = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    for k in range(n):
        (vjp,) = torch.autograd.grad((probes[k] * denoised).sum(), z, retain_graph=k < n - 1)
        total = total + (vjp * probes[k]).sum(1)
    return total / n
