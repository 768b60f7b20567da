"""An output may be exactly an element-wise input (in-place use) but may not overlap, at all, an input that many
elements read: a coefficient table, the seeds, per-sample matrices, a dataset, per-sample scalars. A kernel
that writes the output in parallel would change them under the other elements' reads. Every op refuses it,
before writing anything, in its front-end and (for the compiled backends) in the C++ binding.
"""
import re

import pytest
import torch

import diffkern.ops as dops
from diffkern.ops import coefs
from diffkern.ops.hold import hold_perturb, hold_transition, transition_table

F64 = torch.float64


def _sharing(shape, dtype, shared_shape, shared_dtype):
    """An output of (shape, dtype) and a (shared_shape, shared_dtype) tensor over the same bytes."""
    nbytes = max(torch.Size(shape).numel() * dtype.itemsize, torch.Size(shared_shape).numel() * shared_dtype.itemsize)
    base = torch.zeros(nbytes, dtype=torch.uint8)
    out = base[: torch.Size(shape).numel() * dtype.itemsize].view(dtype).view(shape)
    shared = base[: torch.Size(shared_shape).numel() * shared_dtype.itemsize].view(shared_dtype).view(shared_shape)
    return out, shared


def _refused(call, out, name):
    before = out.clone()
    with pytest.raises(ValueError, match=re.escape(f"out: overlaps {name}, which every element reads")):
        call()
    assert torch.equal(out, before), "a refused call wrote its output"


def test_sampler_step_table_and_seed(cpu_backend):
    x = torch.randn(3, 8, dtype=F64)
    out, coef = _sharing((3, 8), F64, (2, coefs.NCOEF), F64)
    coef.copy_(coefs.table([coefs.row(a=1.0, s=0.5)] * 2))
    _refused(lambda: dops.sampler_step(x, x, coef, 1, out=out, backend=cpu_backend), out, "coef")
    out, seed = _sharing((3, 8), torch.float32, (3,), torch.int64)
    x = torch.randn(3, 8)
    table = coefs.table([coefs.row(a=1.0, s=0.5)] * 2)
    _refused(lambda: dops.sampler_step(x, x, table, 1, seed=seed, out=out, backend=cpu_backend), out, "seed")


def test_randn_seed(cpu_backend):
    out, seed = _sharing((4, 2), torch.float32, (4,), torch.int64)
    _refused(lambda: dops.randn(None, seed, out=out, backend=cpu_backend), out, "seed")


def test_hold_transition_table(cpu_backend):
    n = 2
    K, k, C = torch.rand(3, n, n, dtype=F64), torch.rand(3, n, dtype=F64), torch.tril(torch.rand(3, n, n, dtype=F64))
    table = transition_table(K, k, C)
    out, coef = _sharing((2, n * 3, 5), F64, tuple(table.shape), F64)
    coef.copy_(table)
    z, eps = torch.randn(2, n * 3, 5, dtype=F64), torch.randn(2, 3, 5, dtype=F64)
    _refused(lambda: hold_transition(z, eps, coef, 1, out=out, backend=cpu_backend), out, "coef")


def test_hold_perturb_matrices(cpu_backend):
    n, m = 2, 1
    z0 = torch.randn(2, m, 1, dtype=F64)  # C = P = 1: out (2, n, 1) has the shape and dtype of mean_mat (2, n, m)
    chol = torch.tril(torch.rand(2, n, n, dtype=F64))
    mean_mat = torch.rand(2, n, m, dtype=F64)
    _refused(lambda: hold_perturb(z0, mean_mat, chol, out=mean_mat, backend=cpu_backend), mean_mat, "mean_mat")


def test_likelihood_per_sample_scalars(cpu_backend):
    y = torch.randn(3, 4, dtype=F64)
    acc, sigma = _sharing((3,), F64, (3,), F64)
    sigma.fill_(0.5)
    call = lambda: dops.likelihood_accum(y, y, sigma, torch.ones(1, dtype=F64), acc, backend=cpu_backend)  # noqa: E731
    before = acc.clone()
    with pytest.raises(ValueError, match=re.escape("acc: overlaps sigma, which every element reads")):
        call()
    assert torch.equal(acc, before)


def test_optimal_denoiser_dataset():
    data = torch.randn(4, 3, dtype=F64)
    _refused(lambda: dops.optimal_denoiser(torch.randn(4, 3, dtype=F64), data, 0.5, out=data, backend="reference"),
             data, "data")
