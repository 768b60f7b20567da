// diffkern::sampler_step on CUDA: the fused sampler update (csrc/common/sampler_step.h) in one
// memory pass. Grid-stride loop over packs of V = 16/sizeof(S) elements (one 16-byte access per
// state tensor), a scalar tail, 64-bit indices throughout. The table row and the seed are read on
// the device; the flags derived from them (c, c2, c3, s != 0) are uniform, so their branches
// never diverge within a warp.
#include "common/sampler_step.h"
#include "cuda/device_utils.cuh"
#include "cuda/philox_pack.cuh"

namespace dk {
namespace gpu {

// V elements starting at flat index i: load every input, compute, store (in-place safe: history_out may be
// any history input, out may be x, and every load of the pack precedes its first store).
template <class S, class M, int V, class C>
__device__ __forceinline__ void step_pack(const SamplerStepParams& p, const StepRow<C>& r, bool use_hist,
                                          bool use_hist2, bool use_hist3, bool use_noise, bool use_bu, bool use_fu,
                                          long long i) {
  const bool has_uncond = p.model_out_uncond != nullptr;
  C x[V], m[V], u[V] = {}, h[V] = {}, h2[V] = {}, h3[V] = {}, xi[V] = {}, out[V], x0[V];
  load_pack<C, S, V>(p.x, i, x);
  load_pack<C, M, V>(p.model_out, i, m);
  if (has_uncond) load_pack<C, M, V>(p.model_out_uncond, i, u);
  if (use_hist) load_pack<C, S, V>(p.history, i, h);
  if (use_hist2) load_pack<C, S, V>(p.history2, i, h2);
  if (use_hist3) load_pack<C, S, V>(p.history3, i, h3);
  if (use_noise) {
    if (p.noise != nullptr) {
      load_pack<C, S, V>(p.noise, i, xi);
    } else {
      philox_pack<C, V>(p.seed, p.num_seeds, p.per_sample, 0, p.step, i, xi);
    }
  }
#pragma unroll
  for (int k = 0; k < V; ++k) {
    sampler_step_element<C>(r, has_uncond, use_hist, use_hist2, use_hist3, use_noise, x[k], m[k], u[k], h[k],
                            h2[k], h3[k], xi[k], out[k], x0[k]);
  }
  C h_new[V] = {};
  if (p.history_out != nullptr) {
#pragma unroll
    for (int k = 0; k < V; ++k) h_new[k] = history_element(r, x[k], x0[k]);
  }
#pragma unroll
  for (int k = 0; k < V; ++k) uncond_terms(r, use_bu, use_fu, x[k], has_uncond ? u[k] : m[k], out[k], h_new[k]);
  if (p.history_out != nullptr) store_pack<C, S, V>(p.history_out, i, h_new);
  if (p.x0_out != nullptr) store_pack<C, S, V>(p.x0_out, i, x0);
  store_pack<C, S, V>(p.out, i, out);
}

// V > 1 needs every pointer aligned to V elements; V == 1 is the fallback for misaligned views.
template <class S, class M, int V>
__global__ void __launch_bounds__(kThreads) sampler_step_kernel(const SamplerStepParams p) {
  using C = typename ComputeOf<S>::type;
  const StepRow<C> r = load_step_row<C>(p.coef + p.step * kNumCoef);
  const bool use_hist = p.history != nullptr && r.c != C(0);  // a zero coefficient: tensor not read
  const bool use_hist2 = p.history2 != nullptr && r.c2 != C(0);
  const bool use_hist3 = p.history3 != nullptr && r.c3 != C(0);
  const bool use_noise = r.s != C(0);
  const bool use_bu = r.bu != C(0);  // CFG++ terms (csrc/common/sampler_step.h)
  const bool use_fu = p.history_out != nullptr && r.fu != C(0);
  const long long tid = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  const long long packed = p.numel / V * V;
  for (long long i = tid * V; i < packed; i += stride * V) {
    step_pack<S, M, V>(p, r, use_hist, use_hist2, use_hist3, use_noise, use_bu, use_fu, i);
  }
  if (V > 1 && tid < p.numel - packed) {
    step_pack<S, M, 1>(p, r, use_hist, use_hist2, use_hist3, use_noise, use_bu, use_fu, packed + tid);
  }
}

#if !defined(__CUDACC_RTC__)

namespace {

template <class S, class M>
cudaError_t launch_typed(const SamplerStepParams& p, cudaStream_t stream) {
  constexpr int V = vec_width<S>();
  const void* ptrs_s[] = {p.x, p.history, p.history2, p.history3, p.noise, p.out, p.x0_out, p.history_out};
  bool packed = aligned(p.model_out, V * sizeof(M)) && aligned(p.model_out_uncond, V * sizeof(M));
  for (const void* q : ptrs_s) packed = packed && aligned(q, V * sizeof(S));
  if (packed) {
    sampler_step_kernel<S, M, V><<<grid_size(p.numel / V), kThreads, 0, stream>>>(p);
  } else {
    sampler_step_kernel<S, M, 1><<<grid_size(p.numel), kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t sampler_step_launch(const SamplerStepParams& p, cudaStream_t stream) {
  if (p.numel == 0) return cudaSuccess;
  return with_storage(p.state_dtype, [&](auto s) {
    return with_storage(p.model_dtype, [&](auto m) { return launch_typed<decltype(s), decltype(m)>(p, stream); });
  });
}

#endif  // !__CUDACC_RTC__

}  // namespace gpu
}  // namespace dk
