"""iPNDM (``ipndm``): the fused loop against the textbook loop written below in float64, every CPU backend within
the project's tolerance rule, the knob check, and the measured convergence order."""
from __future__ import annotations

import math

import pytest
import torch

from diffkern import analytic, coef_tables_plms, schedules
from diffkern.sampling import sample
from diffkern.testing import assert_matches_reference

F64 = torch.float64
REF = "reference"
AB = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def textbook_ipndm(model, x, sigmas, max_order=4):
    """iPNDM as the DEIS paper states it: eps-Euler with eps extrapolated by Adams-Bashforth (equal-step weights);
    a step to sigma 0 returns the denoised estimate (ComfyUI's "denoising step")."""
    slopes = []
    for i in range(len(sigmas) - 1):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, torch.full((x.shape[0],), s, dtype=x.dtype))
        if sn == 0:
            return denoised
        slopes.append((x - denoised) / s)
        w = AB[min(i + 1, max_order)]
        x = x + (sn - s) * sum(wj * dj for wj, dj in zip(w, reversed(slopes[-len(w):])))
    return x


def gmm():
    gen = torch.Generator().manual_seed(11)
    return analytic.GaussianMixture([1.0, 1.5, 0.8], torch.randn(3, 5, generator=gen, dtype=F64), [0.3, 0.5, 0.2])


@pytest.mark.parametrize("max_order", [1, 2, 3, 4])
@pytest.mark.parametrize("steps", [1, 2, 5, 9])
def test_is_the_textbook_loop_in_float64(max_order, steps):
    x = torch.randn(7, 5, dtype=F64, generator=torch.Generator().manual_seed(steps)) * 10.0
    for sig in (schedules.karras(steps, 0.1, 10.0), schedules.karras(steps + 1, 0.1, 10.0)[:-1]):
        want = textbook_ipndm(gmm(), x, sig, max_order)
        got = sample(gmm(), x, sig, "ipndm", backend=REF, max_order=max_order)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_every_backend_matches_reference(cpu_backend):
    x = torch.randn(3, 5, dtype=F64, generator=torch.Generator().manual_seed(4)) * 5.0
    sig = schedules.karras(8, 0.05, 5.0)
    ref64 = sample(gmm(), x, sig, "ipndm", backend=REF)
    eager = sample(gmm(), x.float(), sig, "ipndm", backend=REF)
    assert_matches_reference(sample(gmm(), x.float(), sig, "ipndm", backend=cpu_backend), ref64, eager, cpu_backend)
    assert_matches_reference(sample(gmm(), x, sig, "ipndm", backend=cpu_backend), ref64, ref64, "float64")


def test_history_depth_follows_the_order_and_the_steps():
    assert coef_tables_plms.ipndm([3.0, 2.0, 1.0, 0.5, 0.0]).history == 3
    assert coef_tables_plms.ipndm([3.0, 2.0, 0.0]).history == 1  # two steps read at most one earlier slope
    assert coef_tables_plms.ipndm([3.0, 2.0, 1.0, 0.0], max_order=1).history == 0


@pytest.mark.parametrize("bad", [0, 5, 2.0, True, "4"])
def test_max_order_is_checked(bad):
    with pytest.raises(ValueError, match="max_order: expected 1, 2, 3 or 4"):
        sample(gmm(), torch.zeros(2, 5, dtype=F64), schedules.karras(4, 0.1, 10.0), "ipndm", backend=REF,
               max_order=bad)


def test_convergence_order():
    """Equal-step Adams-Bashforth weights on log-linear sigmas: order 2 whatever max_order >= 2 (as plms), order 1
    for max_order=1 (Euler in eps). Measured slopes (64 -> 128 -> 256 steps, against 2048): 1.06, 1.03 (order 1),
    1.94, 1.97 (order 2), 1.88, 1.98 (order 4)."""
    x = torch.randn(16, 5, dtype=F64, generator=torch.Generator().manual_seed(3)) * 10.0

    def run(n, **kw):
        return sample(gmm(), x, schedules.loglinear(n + 1, 0.1, 10.0)[:-1], "ipndm", backend=REF, **kw)

    fine = run(2048)
    for kw, order in (({"max_order": 1}, 1), ({"max_order": 2}, 2), ({}, 2)):
        errs = [float((run(n, **kw) - fine).abs().max()) for n in (64, 128, 256)]
        slopes = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
        assert all(order - 0.25 < s < order + 0.4 for s in slopes), (kw, errs, slopes)
