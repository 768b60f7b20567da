// Torch bindings of the HOLD CUDA kernels (csrc/cuda/hold.cu): TORCH_LIBRARY_IMPL(diffkern, CUDA, m) for
// hold_transition and hold_perturb (schemas: diffkern/ops/_lib.py). Validates the arguments with the
// checks the CPU binding uses (csrc/common/hold_checks.h), then calls the pure launchers on torch's
// current stream. Compiled by the host compiler, and only in CUDA builds.
#ifdef DIFFKERN_WITH_CUDA

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/hold.h"
#include "common/hold_checks.h"
#include "cuda/kernels.h"

namespace dk {
namespace gpu {
namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return static_cast<int>(DType::kHalf);
    case at::kBFloat16: return static_cast<int>(DType::kBFloat16);
    case at::kFloat: return static_cast<int>(DType::kFloat);
    default: return static_cast<int>(DType::kDouble);  // the checks admit floating dtypes only
  }
}

const void* ptr_or_null(const OptTensor& t) { return get_if(t) ? get_if(t)->data_ptr() : nullptr; }

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

void hold_transition_cuda(const at::Tensor& z, const at::Tensor& eps_hat, const OptTensor& noise,
                          const at::Tensor& coef, int64_t step, const at::Tensor& seed, const at::Tensor& out) {
  check_hold_transition(z, eps_hat, noise, coef, step, seed, out);
  TORCH_CHECK(z.is_cuda(), "z: expected a CUDA tensor for the CUDA kernel, got ", z.device());
  if (z.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(z.device());
  HoldTransitionParams p{};
  p.n = static_cast<int>(coef.size(1));
  p.z = z.data_ptr();
  p.eps_hat = eps_hat.data_ptr();
  p.noise = ptr_or_null(noise);
  p.coef = coef.data_ptr<double>();
  p.seed = reinterpret_cast<const long long*>(seed.data_ptr<int64_t>());
  p.out = out.data_ptr();
  p.batch = z.size(0);
  p.per_component = z.numel() / (p.batch * p.n);
  p.num_seeds = seed.numel();
  p.step = step;
  p.state_dtype = dtype_code(z);
  p.model_dtype = dtype_code(eps_hat);
  check_launch(hold_transition_launch(p, c10::cuda::getCurrentCUDAStream().stream()), "hold_transition");
}

void hold_perturb_cuda(const at::Tensor& z0, const at::Tensor& mean_mat, const at::Tensor& chol,
                       const OptTensor& noise, int64_t step, const at::Tensor& seed, const at::Tensor& out,
                       const OptTensor& eps_out) {
  check_hold_perturb(z0, mean_mat, chol, noise, step, seed, out, eps_out);
  TORCH_CHECK(z0.is_cuda(), "z0: expected a CUDA tensor for the CUDA kernel, got ", z0.device());
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(z0.device());
  HoldPerturbParams p{};
  p.n = static_cast<int>(mean_mat.size(1));
  p.m = static_cast<int>(mean_mat.size(2));
  p.z0 = z0.data_ptr();
  p.mean_mat = mean_mat.data_ptr<double>();
  p.chol = chol.data_ptr<double>();
  p.noise = ptr_or_null(noise);
  p.seed = reinterpret_cast<const long long*>(seed.data_ptr<int64_t>());
  p.out = out.data_ptr();
  p.eps_out = const_cast<void*>(ptr_or_null(eps_out));
  p.batch = z0.size(0);
  p.per_component = out.numel() / (p.batch * p.n);
  p.num_seeds = seed.numel();
  p.step = step;
  p.state_dtype = dtype_code(z0);
  check_launch(hold_perturb_launch(p, c10::cuda::getCurrentCUDAStream().stream()), "hold_perturb");
}

}  // namespace
}  // namespace gpu
}  // namespace dk

TORCH_LIBRARY_IMPL(diffkern, CUDA, m) {
  m.impl("hold_transition", &dk::gpu::hold_transition_cuda);
  m.impl("hold_perturb", &dk::gpu::hold_perturb_cuda);
}

#endif  // DIFFKERN_WITH_CUDA
