// Interface of the pure CUDA kernels (csrc/cuda/*.cu) to their torch binding (csrc/cuda/ops.cpp).
//
// No torch here: the kernel files include only the CUDA runtime, the CUDA half/bfloat16 headers and
// csrc/common, so NVRTC (e.g. CuPy's RawModule, with -I csrc) can compile them as they are; the
// parameter structs are then passed by value to the templated __global__ functions. The host
// launchers below are compiled by nvcc only (not under NVRTC).
//
// Every launcher validates nothing (the binding did), launches on ``stream``, returns the launch
// status, and never synchronises.
#pragma once

#if !defined(__CUDACC_RTC__)
#include <cuda_runtime_api.h>
#endif

namespace dk {
namespace gpu {

// Storage dtype of a tensor argument.
enum class DType : int { kHalf = 0, kBFloat16 = 1, kFloat = 2, kDouble = 3 };

// diffkern::sampler_step. All pointers are device pointers to contiguous memory; optional ones are null
// when absent. The coefficient row and the seed are read inside the kernel (no host sync, and a
// captured launch stays valid when the table or the seed is rewritten in place).
struct SamplerStepParams {
  const void* x;                 // (numel,) dtype S
  const void* model_out;         // (numel,) dtype M
  const void* model_out_uncond;  // (numel,) dtype M, or null (no guidance)
  const void* history;           // (numel,) dtype S, or null
  const void* history2;          // (numel,) dtype S, or null (the second history of third-order samplers)
  const void* history3;          // (numel,) dtype S, or null (the third history of fourth-order samplers)
  const void* noise;             // (numel,) dtype S, or null (Philox noise)
  const double* coef;            // (N, kNumCoef) float64 table
  const long long* seed;         // (num_seeds,) int64
  void* out;                     // (numel,) dtype S
  void* x0_out;                  // (numel,) dtype S, or null
  void* history_out;             // (numel,) dtype S, or null
  long long numel;
  long long num_seeds;   // 1 (one stream) or B (per-sample streams)
  long long per_sample;  // numel / num_seeds
  long long step;        // table row and Philox step counter
  DType state_dtype;     // S
  DType model_dtype;     // M
};

// diffkern::iadb_blend: out = (1 - alpha_b)*x0 + alpha_b*x1, target_out = x1 - x0.
struct IadbBlendParams {
  const void* x0;     // (numel,) dtype S
  const void* x1;     // (numel,) dtype S
  const void* alpha;  // (B,) dtype A
  void* out;          // (numel,) dtype S
  void* target_out;   // (numel,) dtype S, or null
  long long numel;
  long long per_sample;  // numel / B
  DType state_dtype;     // S
  DType alpha_dtype;     // A
};

// diffkern::philox_normal: out[i] = normal at index offset + i (per-sample: offset + i % per_sample
// under seed[i / per_sample]) and counter step.
struct PhiloxNormalParams {
  const long long* seed;  // (num_seeds,) int64
  void* out;              // (numel,) dtype S
  long long numel;
  long long num_seeds;
  long long per_sample;
  long long step;
  long long offset;
  DType out_dtype;
};

#if !defined(__CUDACC_RTC__)
cudaError_t sampler_step_launch(const SamplerStepParams& params, cudaStream_t stream);
cudaError_t iadb_blend_launch(const IadbBlendParams& params, cudaStream_t stream);
cudaError_t philox_normal_launch(const PhiloxNormalParams& params, cudaStream_t stream);
#endif

}  // namespace gpu
}  // namespace dk
