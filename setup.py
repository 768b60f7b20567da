"""Build diffkern and its extension ``diffkern._C`` (C++ CPU kernels always, CUDA kernels when possible).

Environment switches (also in README.md):
  DIFFKERN_SKIP_CUDA_BUILD=1   never compile csrc/cuda, even where torch has CUDA and nvcc exists
  DIFFKERN_CUDA_ARCHS="80;90"  CUDA architectures to compile for (default: sm_80 and sm_90)
  DIFFKERN_DEBUG=1             -O0 -g builds
  MAX_JOBS                     ninja parallelism (default: capped by free memory, 2 GB per job)
"""
import glob
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _cap_jobs():
    if "MAX_JOBS" in os.environ:
        return
    try:
        free_gb = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError):
        return
    os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(free_gb // 2))))


def nvcc_flags(archs):
    """Device flags of the CUDA build (tests/test_cuda_hazards.py compiles with them)."""
    archs = [a for a in archs if a]
    # No --use_fast_math (nor -ftz, -prec-div/-prec-sqrt=false): the kernels are memory-bound, and it would
    # swap the Philox noise's logf/cosf for approximations and flush float32 denormals to zero.
    flags = ["-std=c++20", "-lineinfo", "--expt-relaxed-constexpr"]
    flags += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    # Plus the PTX of the newest architecture: a newer GPU (sm_100, sm_120) JIT-compiles it instead of failing
    # every launch with "no kernel image is available for execution on the device".
    if archs:
        newest = max(archs, key=lambda a: int("".join(c for c in a if c.isdigit())))
        flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    return flags


def get_extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    debug = _flag("DIFFKERN_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # -ffp-contract=off: no fused multiply-add, so every ISA clone of the CPU kernels rounds like the
    # eager reference (csrc/common/hd.h). -fno-math-errno: sqrt becomes one vector instruction.
    # c++20: what torch's own headers are written for.
    cxx = opt + ["-std=c++20", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
    with_cuda = (torch.version.cuda is not None and CUDA_HOME is not None and not _flag("DIFFKERN_SKIP_CUDA_BUILD")
                 and bool(glob.glob(os.path.join("csrc", "cuda", "*.cu"))))
    include = [os.path.join(ROOT, "csrc")]
    if not with_cuda:
        return [CppExtension("diffkern._C", sources, include_dirs=include,
                             extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]
    archs = os.environ.get("DIFFKERN_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
    nvcc = opt + nvcc_flags(archs) + ["--threads", os.environ.get("NVCC_THREADS", "2")]
    # csrc/cuda: pure kernels (*.cu, no torch headers) and their torch bindings (*.cpp, host compiler).
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    return [CUDAExtension("diffkern._C", sources, include_dirs=include, define_macros=[("DIFFKERN_WITH_CUDA", "1")],
                          extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"])]


class BuildPyWithKernelSources(build_py):
    """Also install the CUDA kernel sources as ``diffkern/_csrc``: the run-time loader
    (diffkern/ops/cuda_rtc.py) compiles them with NVRTC when the extension was built without CUDA."""

    def run(self):
        super().run()
        for pattern in ("common/*.h", "cuda/*.cu", "cuda/*.cuh", "cuda/*.h"):
            for src in glob.glob(os.path.join(ROOT, "csrc", pattern)):
                rel = os.path.relpath(src, os.path.join(ROOT, "csrc"))
                dst = os.path.join(self.build_lib, "diffkern", "_csrc", rel)
                self.mkpath(os.path.dirname(dst))
                self.copy_file(src, dst)


def main():
    from torch.utils.cpp_extension import BuildExtension

    _cap_jobs()
    setup(
        name="diffkern",
        version="0.1.0",
        description="Fused-kernel accelerated sampling engine for diffusion models",
        python_requires=">=3.11",
        packages=find_packages(include=["diffkern", "diffkern.*"]) + ["diffkern.kernels"],
        package_dir={"diffkern": "diffkern", "diffkern.kernels": "kernels"},
        package_data={"diffkern": ["data/*"]},
        ext_modules=get_extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True), "build_py": BuildPyWithKernelSources},
        install_requires=["torch>=2.6", "numpy", "tqdm", "safetensors", "matplotlib",
                          "triton; platform_system == 'Linux' and platform_machine == 'x86_64'"],
        entry_points={"console_scripts": ["diffkern = diffkern.__main__:main"]},
    )


if __name__ == "__main__":
    main()
