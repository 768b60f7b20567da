// Device-side building blocks of the CUDA kernels: compute types, conversions, 16-byte packed
// loads/stores, the grid-stride launch geometry and the dtype dispatch of the host launchers.
// Includes only the CUDA headers (NVRTC-compatible; the host part is skipped under NVRTC).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/kernels.h"

namespace dk {
namespace gpu {

constexpr int kThreads = 256;  // threads per block of every element-wise kernel

template <class S>
struct ComputeOf {  // math in float32, float64 for float64 storage
  using type = float;
};
template <>
struct ComputeOf<double> {
  using type = double;
};

// Storage -> compute type. float16/bfloat16 widen exactly to float32.
template <class C>
__device__ __forceinline__ C to_compute(float v) {
  return static_cast<C>(v);
}
template <class C>
__device__ __forceinline__ C to_compute(double v) {
  return static_cast<C>(v);
}
template <class C>
__device__ __forceinline__ C to_compute(__half v) {
  return static_cast<C>(__half2float(v));
}
template <class C>
__device__ __forceinline__ C to_compute(__nv_bfloat16 v) {
  return static_cast<C>(__bfloat162float(v));
}

// Compute type -> storage, round to nearest even (as torch's .to()).
__device__ __forceinline__ void from_compute(float v, float& dst) { dst = v; }
__device__ __forceinline__ void from_compute(double v, double& dst) { dst = v; }
__device__ __forceinline__ void from_compute(float v, __half& dst) { dst = __float2half_rn(v); }
__device__ __forceinline__ void from_compute(float v, __nv_bfloat16& dst) { dst = __float2bfloat16_rn(v); }

// V consecutive elements as one aligned access: 16 bytes (ld.global.v4) when V*sizeof(T) is 16,
// split into 16-byte accesses when larger (a float32 model output beside a float16 state).
template <class T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <class C, class T, int V>
__device__ __forceinline__ void load_pack(const void* base, long long i, C (&dst)[V]) {
  const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(static_cast<const T*>(base) + i);
#pragma unroll
  for (int k = 0; k < V; ++k) dst[k] = to_compute<C>(pk.v[k]);
}

template <class C, class T, int V>
__device__ __forceinline__ void store_pack(void* base, long long i, const C (&src)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int k = 0; k < V; ++k) from_compute(src[k], pk.v[k]);
  *reinterpret_cast<Pack<T, V>*>(static_cast<T*>(base) + i) = pk;
}

// Elements per thread and iteration for state dtype S: one 16-byte access of the state tensors.
template <class S>
__host__ __device__ constexpr int vec_width() {
  return 16 / static_cast<int>(sizeof(S));
}

#if !defined(__CUDACC_RTC__)

// Whether every non-null pointer is aligned to ``bytes`` (the packed kernels need it; a tensor that
// is a slice at an odd offset takes the scalar kernel).
inline bool aligned(const void* p, long long bytes) {
  return p == nullptr || reinterpret_cast<unsigned long long>(p) % static_cast<unsigned long long>(bytes) == 0;
}

// Blocks for ``work`` thread-iterations: enough to fill the device a few times over, the grid-stride
// loops take the rest (so a launch over 2**31+ elements needs no more than 2**31 threads).
inline unsigned int grid_size(long long work) {
  static int sm_count[64] = {0};  // per device; a benign race writes the same value
  int device = 0;
  cudaGetDevice(&device);
  int& sms = sm_count[device & 63];
  if (sms == 0 && cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    // Clear the error: the launcher's cudaGetLastError() would report it as a failed launch.
    (void)cudaGetLastError();
    sms = 132;
  }
  const long long wanted = (work + kThreads - 1) / kThreads;
  const long long cap = static_cast<long long>(sms) * 32;  // 32 blocks of 256 threads per SM
  return static_cast<unsigned int>(wanted < cap ? (wanted > 0 ? wanted : 1) : cap);
}

// Calls f with a value of the storage type of ``t``.
template <class F>
cudaError_t with_storage(DType t, F&& f) {
  switch (t) {
    case DType::kHalf: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    case DType::kFloat: return f(float{});
    case DType::kDouble: return f(double{});
  }
  return cudaErrorInvalidValue;
}

#endif  // !__CUDACC_RTC__

}  // namespace gpu
}  // namespace dk
