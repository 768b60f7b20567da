// diffkern::philox_normal on CUDA: out[i] = the normal at index offset + i of the counter-based
// stream (csrc/common/philox.h); per-sample seeds (B,): index offset + i % per_sample under key
// seed[i / per_sample]. Grid-stride loop over packs of V = 16/sizeof(S) outputs, 64-bit indices.
#include "cuda/device_utils.cuh"
#include "cuda/philox_pack.cuh"

namespace dk {
namespace gpu {

template <class S, int V>
__device__ __forceinline__ void normal_pack(const PhiloxNormalParams& p, long long i) {
  using C = typename ComputeOf<S>::type;
  C xi[V];
  philox_pack<C, V>(p.seed, p.num_seeds, p.per_sample, p.offset, p.step, i, xi);
  store_pack<C, S, V>(p.out, i, xi);
}

// V > 1 needs out aligned to V elements; V == 1 is the fallback for a misaligned view.
template <class S, int V>
__global__ void __launch_bounds__(kThreads) philox_normal_kernel(const PhiloxNormalParams p) {
  const long long tid = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  const long long packed = p.numel / V * V;
  for (long long i = tid * V; i < packed; i += stride * V) normal_pack<S, V>(p, i);
  if (V > 1 && tid < p.numel - packed) normal_pack<S, 1>(p, packed + tid);
}

#if !defined(__CUDACC_RTC__)

cudaError_t philox_normal_launch(const PhiloxNormalParams& p, cudaStream_t stream) {
  if (p.numel == 0) return cudaSuccess;
  return with_storage(p.out_dtype, [&](auto s) {
    using S = decltype(s);
    constexpr int V = vec_width<S>();
    if (aligned(p.out, V * sizeof(S))) {
      philox_normal_kernel<S, V><<<grid_size(p.numel / V), kThreads, 0, stream>>>(p);
    } else {
      philox_normal_kernel<S, 1><<<grid_size(p.numel), kThreads, 0, stream>>>(p);
    }
    return cudaGetLastError();
  });
}

#endif  // !__CUDACC_RTC__

}  // namespace gpu
}  // namespace dk
