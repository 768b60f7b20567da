"""Suite-wide set-up: Triton runs under its CPU interpreter when there is no GPU, and torch uses one
thread per test process (``./dev.sh test`` runs one pytest-xdist worker per core instead: the tensors
here are small, and two OpenMP threads per process on a 2-core machine cost more than they give).

TRITON_INTERPRET is read when a kernel is decorated, so it is set here, before any test imports
``diffkern.kernels``.
"""
import importlib
import os

import pytest
import threadpoolctl  # scikit-learn's dependency
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import diffkern.ops as dops  # noqa: E402

torch.set_num_threads(1)
# The same for numpy's and scipy's OpenBLAS, where it matters more: with two BLAS threads in each of two workers on
# a 2-core machine a 4x4 scipy.linalg.expm took 1-12 ms (the threads wait on each other), with one 10-35 us, and
# the HOLD oracles call it ~10^5 times. numpy's copy is loaded already (pytest's plugins import numpy), so it is
# limited in place; scipy's is loaded later and reads the environment (as do subprocesses).
os.environ["OPENBLAS_NUM_THREADS"] = "1"
threadpoolctl.threadpool_limits(1, user_api="blas")


def usable_backends(device_type: str = "cpu") -> list[str]:
    """Backends that can run on ``device_type`` in this build (what 'every backend' means here)."""
    return [b for b, why in dops.available(device_type).items() if why is None]


@pytest.fixture(params=usable_backends("cpu"))
def cpu_backend(request):
    return request.param


@pytest.fixture
def bench(monkeypatch):
    """``bench(name)``: the module ``bench/<name>.py`` (the benchmarks are scripts in the repository, not a package
    of diffkern)."""
    monkeypatch.syspath_prepend(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return lambda name: importlib.import_module(f"bench.{name}")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
