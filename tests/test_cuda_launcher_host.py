"""Host code of the CUDA launchers (csrc/cuda/device_utils.cuh) run against a stubbed CUDA runtime, no GPU."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from diffkern.ops import cuda_rtc
from diffkern.ops.cuda_toolchain import RtcUnavailable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def host_toolchain():
    """(g++, the CUDA include directory) for compiling CUDA sources on the host; skips the test without either."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found")
    try:
        return cxx, cuda_rtc.cuda_include_dir()
    except RtcUnavailable as exc:
        pytest.skip(str(exc))


_GRID_SIZE = r"""
#include <cuda_runtime_api.h>
static cudaError_t last = cudaSuccess;
extern "C" {
cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
cudaError_t cudaDeviceGetAttribute(int*, cudaDeviceAttr, int) { last = cudaErrorInvalidDevice; return last; }
cudaError_t cudaGetLastError() { cudaError_t e = last; last = cudaSuccess; return e; }
}
#include "cuda/device_utils.cuh"
int main() {
  const unsigned blocks = dk::gpu::grid_size(1LL << 40);
  return cudaGetLastError() == cudaSuccess && blocks == 132 * 32 ? 0 : 1;
}
"""


def test_failed_sm_count_query_is_not_reported_as_a_failed_launch(tmp_path):
    """grid_size falls back to 132 SMs when the attribute query fails, and clears that error: the launchers'
    cudaGetLastError() after the launch would otherwise fail a good launch (stubbed CUDA runtime, g++)."""
    cxx, inc = host_toolchain()
    if not (inc / "cuda_runtime_api.h").is_file():
        pytest.skip(f"no cuda_runtime_api.h in {inc}")
    (tmp_path / "grid.cpp").write_text(_GRID_SIZE)
    res = subprocess.run([cxx, "-std=c++20", "-Wno-unknown-pragmas", f"-I{os.path.join(ROOT, 'csrc')}", f"-I{inc}",
                          str(tmp_path / "grid.cpp"), "-o", str(tmp_path / "grid")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert subprocess.run([str(tmp_path / "grid")]).returncode == 0
