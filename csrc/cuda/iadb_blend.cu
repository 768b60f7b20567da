// diffkern::iadb_blend on CUDA: out = (1 - alpha_b)*x0 + alpha_b*x1 and, optionally, the training
// target x1 - x0 (csrc/common/iadb_blend.h), in one memory pass. Grid-stride loop over packs of
// V = 16/sizeof(S) elements, a scalar tail, 64-bit indices; alpha (B,) is read per sample.
#include "common/iadb_blend.h"
#include "cuda/device_utils.cuh"

namespace dk {
namespace gpu {

// V elements starting at flat index i (in-place safe: both inputs are loaded before any store).
template <class S, class A, int V>
__device__ __forceinline__ void blend_pack(const IadbBlendParams& p, long long i) {
  using C = typename ComputeOf<S>::type;
  const A* alpha = static_cast<const A*>(p.alpha);
  C x0[V], x1[V], out[V], target[V];
  load_pack<C, S, V>(p.x0, i, x0);
  load_pack<C, S, V>(p.x1, i, x1);
  long long sample = i / p.per_sample;
  long long idx = i - sample * p.per_sample;
  C alpha_b = to_compute<C>(alpha[sample]);  // the reference's alpha.to(cdt)
#pragma unroll
  for (int k = 0; k < V; ++k) {
    if (idx == p.per_sample) {  // crossed into the next sample
      ++sample;
      idx = 0;
      alpha_b = to_compute<C>(alpha[sample]);
    }
    iadb_blend_element<C>(alpha_b, x0[k], x1[k], out[k], target[k]);
    ++idx;
  }
  if (p.target_out != nullptr) store_pack<C, S, V>(p.target_out, i, target);
  store_pack<C, S, V>(p.out, i, out);
}

// V > 1 needs every pointer aligned to V elements; V == 1 is the fallback for misaligned views.
template <class S, class A, int V>
__global__ void __launch_bounds__(kThreads) iadb_blend_kernel(const IadbBlendParams p) {
  const long long tid = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  const long long packed = p.numel / V * V;
  for (long long i = tid * V; i < packed; i += stride * V) blend_pack<S, A, V>(p, i);
  if (V > 1 && tid < p.numel - packed) blend_pack<S, A, 1>(p, packed + tid);
}

#if !defined(__CUDACC_RTC__)

namespace {

template <class S, class A>
cudaError_t launch_typed(const IadbBlendParams& p, cudaStream_t stream) {
  constexpr int V = vec_width<S>();
  const bool packed = aligned(p.x0, V * sizeof(S)) && aligned(p.x1, V * sizeof(S)) &&
                      aligned(p.out, V * sizeof(S)) && aligned(p.target_out, V * sizeof(S));
  if (packed) {
    iadb_blend_kernel<S, A, V><<<grid_size(p.numel / V), kThreads, 0, stream>>>(p);
  } else {
    iadb_blend_kernel<S, A, 1><<<grid_size(p.numel), kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t iadb_blend_launch(const IadbBlendParams& p, cudaStream_t stream) {
  if (p.numel == 0) return cudaSuccess;
  return with_storage(p.state_dtype, [&](auto s) {
    return with_storage(p.alpha_dtype, [&](auto a) { return launch_typed<decltype(s), decltype(a)>(p, stream); });
  });
}

#endif  // !__CUDACC_RTC__

}  // namespace gpu
}  // namespace dk
