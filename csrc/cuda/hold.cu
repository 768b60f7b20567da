// diffkern::hold_transition and diffkern::hold_perturb on CUDA (spec: diffkern/ops/hold.py, arithmetic:
// common/hold.h). One thread per data element (b, p): it loads the element's n components (strided by
// P, so each component's load is coalesced across a warp), does the n x n update in registers and
// stores n outputs: every component is read once and written once, which makes out == z safe.
// Grid-stride loops, 64-bit indices. The table row is staged in shared memory once per block and
// read on the device (no host sync; a captured launch follows in-place rewrites of the table).
#include "common/hold.h"
#include "common/philox.h"
#include "cuda/device_utils.cuh"

namespace dk {
namespace gpu {

template <class C, class T>
__device__ __forceinline__ C load_one(const void* base, long long i) {
  return to_compute<C>(static_cast<const T*>(base)[i]);
}

template <class C, class T>
__device__ __forceinline__ void store_one(void* base, long long i, C v) {
  from_compute(v, static_cast<T*>(base)[i]);
}

// Normal of the state entry at offset ``off`` = k*P + p inside sample b (explicit noise or Philox).
template <class S, class C>
__device__ __forceinline__ C entry_noise(const void* noise, const long long* seed, long long num_seeds, u32 step,
                                         long long b, long long n, long long P, long long off) {
  if (noise != nullptr) return load_one<C, S>(noise, b * n * P + off);
  if (num_seeds == 1) return philox_normal<C>(static_cast<u64>(seed[0]), step, static_cast<u64>(b * n * P + off));
  return philox_normal<C>(static_cast<u64>(seed[b]), step, static_cast<u64>(off));
}

template <class S, class M>
__global__ void __launch_bounds__(kThreads) hold_transition_kernel(const HoldTransitionParams p) {
  using C = typename ComputeOf<S>::type;
  __shared__ HoldRow<C> row;
  const int n = p.n;
  if (threadIdx.x == 0) load_hold_row(p.coef + p.step * n * (2 * n + 1), n, row);
  __syncthreads();
  const long long P = p.per_component, total = p.batch * P;
  const u32 step = static_cast<u32>(p.step);
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long e = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const long long b = e / P, pos = e - b * P;
    const long long base = b * n * P + pos;
    C z[kHoldMaxOrder], eta[kHoldMaxOrder], out[kHoldMaxOrder];
#pragma unroll
    for (int k = 0; k < kHoldMaxOrder; ++k) {
      z[k] = k < n ? load_one<C, S>(p.z, base + k * P) : C(0);
      eta[k] = k < n && row.noise_col[k]
                   ? entry_noise<S, C>(p.noise, p.seed, p.num_seeds, step, b, n, P, k * P + pos)
                   : C(0);
    }
    hold_transition_element<C>(row, z, load_one<C, M>(p.eps_hat, b * P + pos), eta, out);
#pragma unroll
    for (int k = 0; k < kHoldMaxOrder; ++k) {
      if (k < n) store_one<C, S>(p.out, base + k * P, out[k]);
    }
  }
}

template <class S>
__global__ void __launch_bounds__(kThreads) hold_perturb_kernel(const HoldPerturbParams p) {
  using C = typename ComputeOf<S>::type;
  const int n = p.n, m = p.m;
  const long long P = p.per_component, total = p.batch * P;
  const u32 step = static_cast<u32>(p.step);
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long e = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const long long b = e / P, pos = e - b * P;
    C Mb[kHoldMaxOrder * kHoldMaxOrder], Lb[kHoldMaxOrder * kHoldMaxOrder];  // this sample's matrices
#pragma unroll
    for (int q = 0; q < kHoldMaxOrder * kHoldMaxOrder; ++q) {
      Mb[q] = q < n * m ? static_cast<C>(__ldg(p.mean_mat + b * n * m + q)) : C(0);
      Lb[q] = q < n * n ? static_cast<C>(__ldg(p.chol + b * n * n + q)) : C(0);
    }
    C z0[kHoldMaxOrder], eps[kHoldMaxOrder], out[kHoldMaxOrder];
#pragma unroll
    for (int k = 0; k < kHoldMaxOrder; ++k) {
      z0[k] = k < m ? load_one<C, S>(p.z0, b * m * P + k * P + pos) : C(0);
      eps[k] = k < n ? entry_noise<S, C>(p.noise, p.seed, p.num_seeds, step, b, n, P, k * P + pos) : C(0);
    }
    hold_perturb_element<C>(n, m, Mb, Lb, z0, eps, out);
#pragma unroll
    for (int k = 0; k < kHoldMaxOrder; ++k) {
      if (k < n) store_one<C, S>(p.out, b * n * P + k * P + pos, out[k]);
    }
    if (p.eps_out != nullptr) store_one<C, S>(p.eps_out, b * P + pos, eps[n - 1]);
  }
}

#if !defined(__CUDACC_RTC__)

cudaError_t hold_transition_launch(const HoldTransitionParams& p, cudaStream_t stream) {
  const long long total = p.batch * p.per_component;
  if (total == 0) return cudaSuccess;
  return with_storage(static_cast<DType>(p.state_dtype), [&](auto s) {
    return with_storage(static_cast<DType>(p.model_dtype), [&](auto m) {
      hold_transition_kernel<decltype(s), decltype(m)><<<grid_size(total), kThreads, 0, stream>>>(p);
      return cudaGetLastError();
    });
  });
}

cudaError_t hold_perturb_launch(const HoldPerturbParams& p, cudaStream_t stream) {
  const long long total = p.batch * p.per_component;
  if (total == 0) return cudaSuccess;
  return with_storage(static_cast<DType>(p.state_dtype), [&](auto s) {
    hold_perturb_kernel<decltype(s)><<<grid_size(total), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

#endif  // !__CUDACC_RTC__

}  // namespace gpu
}  // namespace dk
