"""The compiled extension ``diffkern._C`` against the schemas of ``diffkern/ops/_lib.py``.

A C++ kernel whose signature does not match its Python schema makes the dispatcher throw while the
extension's static registrations run, which aborts the process at ``import diffkern._C`` instead of raising.
So the import runs in a subprocess, which reports what the dispatcher then holds.
"""
import importlib.util
import json
import subprocess
import sys

import pytest

from diffkern.ops import _lib

pytestmark = pytest.mark.skipif(importlib.util.find_spec("diffkern._C") is None,
                                reason="diffkern._C is not built")

# csrc/cpu has no optimal_denoiser kernel: that op is Triton-only (diffkern.kernels.optimal_denoiser).
NO_CPU_KERNEL = {"optimal_denoiser"}
# csrc/cuda has neither likelihood_accum (Triton on CUDA) nor optimal_denoiser.
NO_CUDA_KERNEL = {"likelihood_accum", "optimal_denoiser"}

_PROBE = """
import json, torch
import diffkern._C as C
from diffkern.ops import _lib

def has(op, key):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"diffkern::{op}", key)

print(json.dumps({
    "has_cuda": bool(C.has_cuda()),
    "cpu": {n: has(n, "CPU") for n in _lib.SCHEMAS},
    "cuda": {n: has(n, "CUDA") for n in _lib.SCHEMAS},
    "schemas": {op: str(torch._C._dispatch_find_schema_or_throw(f"diffkern::{op}", "").schema())
                for n in _lib.SCHEMAS for op in (n, n + "_triton")},
}))
"""


@pytest.fixture(scope="module")
def probe():
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (f"`import diffkern._C` exited with {proc.returncode} (a negative code is a "
                                  f"signal: a schema mismatch aborts):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_exits_cleanly(probe):
    assert set(probe["cpu"]) == set(_lib.SCHEMAS)


def test_every_op_has_its_cpu_kernel(probe):
    expected = {n for n in _lib.SCHEMAS if n not in NO_CPU_KERNEL}
    assert {n for n, ok in probe["cpu"].items() if ok} == expected


def test_every_op_has_its_cuda_kernel(probe):
    if not probe["has_cuda"]:
        pytest.skip("diffkern._C was built without CUDA")
    expected = {n for n in _lib.SCHEMAS if n not in NO_CUDA_KERNEL}
    assert {n for n, ok in probe["cuda"].items() if ok} == expected


def test_every_op_has_its_triton_twin(probe):
    """``<name>_triton`` exists beside ``<name>``, with the same arguments (its launcher binds on first use)."""
    for name in _lib.SCHEMAS:
        op, twin = probe["schemas"][name], probe["schemas"][name + "_triton"]
        assert op.startswith(f"diffkern::{name}(") and twin.startswith(f"diffkern::{name}_triton("), (op, twin)
        assert op.split("(", 1)[1] == twin.split("(", 1)[1], name
