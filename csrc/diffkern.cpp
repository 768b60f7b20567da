// Python module entry of diffkern._C. Op schemas live in diffkern/ops/_lib.py; the kernels in
// csrc/cpu/*.cpp and csrc/cuda/*.cu register their implementations with TORCH_LIBRARY_IMPL.
#include <torch/extension.h>

namespace {

bool has_cuda() {
#ifdef DIFFKERN_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "diffkern compiled kernels (C++ CPU, and CUDA when built with it)";
  m.def("has_cuda", &has_cuda, "Whether this build contains the CUDA kernels");
}
