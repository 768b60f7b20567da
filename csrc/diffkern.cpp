// Python module entry of diffkern._C. Op schemas live in diffkern/ops/_lib.py; the kernels in
// csrc/cpu/*.cpp and csrc/cuda/*.cu register their implementations with TORCH_LIBRARY_IMPL.
//
// The argument checks of the bindings are exported too: the run-time CUDA backend
// (diffkern/ops/cuda_rtc.py, NVRTC through CuPy) validates with exactly the same code before it
// launches the same kernels.
#include <torch/extension.h>

#include "common/hold_checks.h"
#include "common/op_checks.h"

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
  m.def("check_sampler_step", &dk::check_sampler_step, "Validate diffkern::sampler_step arguments (raises)",
        py::arg("x"), py::arg("model_out"), py::arg("model_out_uncond"), py::arg("history"), py::arg("noise"),
        py::arg("coef"), py::arg("step"), py::arg("seed"), py::arg("out"), py::arg("x0_out"), py::arg("history_out"),
        py::arg("history2") = py::none(), py::arg("history3") = py::none());
  m.def("check_iadb_blend", &dk::check_iadb_blend, "Validate diffkern::iadb_blend arguments (raises)");
  m.def("check_philox_normal", &dk::check_philox_normal, "Validate diffkern::philox_normal arguments (raises)");
  m.def("check_hold_transition", &dk::check_hold_transition, "Validate diffkern::hold_transition arguments");
  m.def("check_hold_perturb", &dk::check_hold_perturb, "Validate diffkern::hold_perturb arguments (raises)");
}
