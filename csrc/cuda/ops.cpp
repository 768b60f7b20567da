// Torch bindings of the CUDA kernels: TORCH_LIBRARY_IMPL(diffkern, CUDA, m) for sampler_step,
// iadb_blend and philox_normal (schemas: diffkern/ops/_lib.py). Validates the arguments (shared
// checks, csrc/common/op_checks.h), then calls the pure launchers of csrc/cuda/*.cu on the current
// torch stream of the tensors' device. Compiled by the host compiler, and only in CUDA builds.
#ifdef DIFFKERN_WITH_CUDA

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/op_checks.h"
#include "cuda/kernels.h"

namespace dk {
namespace gpu {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat;
    default: return DType::kDouble;  // the checks admit floating dtypes only
  }
}

const void* ptr_or_null(const OptTensor& t) { return get_if(t) ? get_if(t)->data_ptr() : nullptr; }

// The stream every launch goes to: torch's current stream of the device (what CUDA-graph capture
// records). c10::cuda::getCurrentCUDAStream is the function at::cuda re-exports; its header needs no
// cuBLAS/cuSPARSE headers, unlike ATen/cuda/CUDAContext.h.
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

void sampler_step_cuda(const at::Tensor& x, const at::Tensor& model_out, const OptTensor& model_out_uncond,
                       const OptTensor& history, const OptTensor& noise, const at::Tensor& coef, int64_t step,
                       const at::Tensor& seed, const at::Tensor& out, const OptTensor& x0_out,
                       const OptTensor& history_out, const OptTensor& history2, const OptTensor& history3) {
  check_sampler_step(x, model_out, model_out_uncond, history, noise, coef, step, seed, out, x0_out, history_out,
                     history2, history3);
  TORCH_CHECK(x.is_cuda(), "x: expected a CUDA tensor for the CUDA kernel, got ", x.device());
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  SamplerStepParams p{};
  p.x = x.data_ptr();
  p.model_out = model_out.data_ptr();
  p.model_out_uncond = ptr_or_null(model_out_uncond);
  p.history = ptr_or_null(history);
  p.history2 = ptr_or_null(history2);
  p.history3 = ptr_or_null(history3);
  p.noise = ptr_or_null(noise);
  p.coef = coef.data_ptr<double>();
  p.seed = reinterpret_cast<const long long*>(seed.data_ptr<int64_t>());
  p.out = out.data_ptr();
  p.x0_out = const_cast<void*>(ptr_or_null(x0_out));
  p.history_out = const_cast<void*>(ptr_or_null(history_out));
  p.numel = x.numel();
  p.num_seeds = seed.numel();
  p.per_sample = p.numel / p.num_seeds;
  p.step = step;
  p.state_dtype = dtype_of(x);
  p.model_dtype = dtype_of(model_out);
  check_launch(sampler_step_launch(p, current_stream()), "sampler_step");
}

void iadb_blend_cuda(const at::Tensor& x0, const at::Tensor& x1, const at::Tensor& alpha, const at::Tensor& out,
                     const OptTensor& target_out) {
  check_iadb_blend(x0, x1, alpha, out, target_out);
  TORCH_CHECK(x0.is_cuda(), "x0: expected a CUDA tensor for the CUDA kernel, got ", x0.device());
  if (x0.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x0.device());
  IadbBlendParams p{};
  p.x0 = x0.data_ptr();
  p.x1 = x1.data_ptr();
  p.alpha = alpha.data_ptr();
  p.out = out.data_ptr();
  p.target_out = const_cast<void*>(ptr_or_null(target_out));
  p.numel = x0.numel();
  p.per_sample = p.numel / x0.size(0);
  p.state_dtype = dtype_of(x0);
  p.alpha_dtype = dtype_of(alpha);
  check_launch(iadb_blend_launch(p, current_stream()), "iadb_blend");
}

void philox_normal_cuda(const at::Tensor& seed, int64_t step, int64_t offset, const at::Tensor& out) {
  check_philox_normal(seed, step, offset, out);
  TORCH_CHECK(out.is_cuda(), "out: expected a CUDA tensor for the CUDA kernel, got ", out.device());
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  PhiloxNormalParams p{};
  p.seed = reinterpret_cast<const long long*>(seed.data_ptr<int64_t>());
  p.out = out.data_ptr();
  p.numel = out.numel();
  p.num_seeds = seed.numel();
  p.per_sample = p.numel / p.num_seeds;
  p.step = step;
  p.offset = offset;
  p.out_dtype = dtype_of(out);
  check_launch(philox_normal_launch(p, current_stream()), "philox_normal");
}

}  // namespace
}  // namespace gpu
}  // namespace dk

TORCH_LIBRARY_IMPL(diffkern, CUDA, m) {
  m.impl("sampler_step", &dk::gpu::sampler_step_cuda);
  m.impl("iadb_blend", &dk::gpu::iadb_blend_cuda);
  m.impl("philox_normal", &dk::gpu::philox_normal_cuda);
}

#endif  // DIFFKERN_WITH_CUDA
