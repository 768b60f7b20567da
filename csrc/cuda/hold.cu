// diffkern::hold_transition and diffkern::hold_perturb on CUDA (spec: diffkern/ops/hold.py, arithmetic:
// common/hold.h). A thread takes V consecutive data elements (b, p) .. (b, p + V - 1): it loads their n
// components (strided by P, so each component's load is coalesced across a warp), does the n x n update
// in registers and stores n outputs: every component is read once and written once, which makes
// out == z safe. Grid-stride loops, 64-bit indices. The table row is staged in shared memory once per
// block and read on the device (no host sync; a captured launch follows in-place rewrites of the table).
//
// hold_transition takes V = 4 elements per thread when P % 4 == 0 and every pointer is aligned to 4
// elements (and the compute type is float: four float64 positions would spill registers): then the
// Philox noise of one component of the four is one group of the stream (indices 4g .. 4g + 3), drawn
// by one philox_normal4 call instead of four scalar draws, and each component moves as one vector.
// sm_90 SASS of the any-order kernels, cheapest loop path drawing noise for three columns (n = 3), per
// element (bench/sass_path.py): float32 621 instructions with V = 1, 235.8 with V = 4 (bfloat16 626 -> 247;
// six columns 1130 -> 424). Otherwise, and for hold_perturb (per-sample matrices already hold 2 * n * n
// registers per thread), V = 1.
//
// The packed kernel is also compiled for each order N = hold_kernel_order(n) of 2, 3 and 4: its arrays then
// have N rows instead of kHoldMaxOrder and its guards fold away. ptxas -v (sm_90, float32, V = 4): 48 / 64 /
// 102 registers for N = 2 / 3 / 4 against 238 for the any-order kernel (N = 0), so 5 / 4 / 2 blocks of 256
// threads fit an SM instead of 1 (more loads in flight); instructions per element change little (n = 3:
// 233.5). N = 0 serves the other orders and the V = 1 kernel.
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

// Normals of the V entries at offsets off .. off + V - 1 inside sample b. V == 4: off % 4 == 0 and
// P % 4 == 0, so the stream indices (b*n*P + off, or off under seed[b]) are one whole group.
template <class S, class C, int V>
__device__ __forceinline__ void entry_noise_pack(const void* noise, const long long* seed, long long num_seeds,
                                                 u32 step, long long b, long long n, long long P, long long off,
                                                 C (&eta)[V]) {
  if constexpr (V == 4) {
    if (noise != nullptr) {
      load_pack<C, S, V>(noise, b * n * P + off, eta);
    } else {
      const u64 key = static_cast<u64>(num_seeds == 1 ? seed[0] : seed[b]);
      const u64 idx = static_cast<u64>(num_seeds == 1 ? b * n * P + off : off);
      philox_normal4<C>(key, step, idx >> 2, eta);
    }
  } else {
#pragma unroll
    for (int q = 0; q < V; ++q) eta[q] = entry_noise<S, C>(noise, seed, num_seeds, step, b, n, P, off + q);
  }
}

// The table row into shared memory by the whole block (load_hold_row's result): one value per thread, not
// n*(2n+1) dependent loads by thread 0 while a whole block waits (the any-order kernels take 174-238
// registers per thread, so one block fits an SM and nothing else would hide them). Ends with a barrier.
template <class C>
__device__ __forceinline__ void load_hold_row_block(const double* row, int n, HoldRow<C>& r) {
  for (int t = threadIdx.x; t < n * (2 * n + 1); t += blockDim.x) load_hold_entry(row, n, t, r);
  if (threadIdx.x < n) r.noise_col[threadIdx.x] = hold_noise_col(row, n, threadIdx.x);
  if (threadIdx.x == 0) r.n = n;
  __syncthreads();
}

// Elements per thread of the packed hold_transition kernel for state dtype S.
template <class S>
__host__ __device__ constexpr int hold_vec_width() {
  return sizeof(typename ComputeOf<S>::type) == 4 ? 4 : 1;
}

// V = 1, or 4 (P % 4 == 0, every pointer aligned to 4 elements, float compute: see the top of the file).
// N: the order, or 0 for any order up to kHoldMaxOrder (p.n).
template <class S, class M, int V, int N>
__global__ void __launch_bounds__(kThreads) hold_transition_kernel(const HoldTransitionParams p) {
  using C = typename ComputeOf<S>::type;
  constexpr int kMax = N > 0 ? N : kHoldMaxOrder;
  __shared__ HoldRow<C> row;
  const int n = N > 0 ? N : p.n;
  load_hold_row_block(p.coef + p.step * n * (2 * n + 1), n, row);
  const long long P = p.per_component, total = p.batch * P;
  const u32 step = static_cast<u32>(p.step);
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x * V;
  for (long long e = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) * V; e < total; e += stride) {
    const long long b = e / P, pos = e - b * P;  // V == 4: the four elements are in one sample
    const long long base = b * n * P + pos;
    C z[kMax][V], eta[kMax][V], eps[V];
    load_pack<C, M, V>(p.eps_hat, b * P + pos, eps);
#pragma unroll
    for (int k = 0; k < kMax; ++k) {
#pragma unroll
      for (int q = 0; q < V; ++q) z[k][q] = eta[k][q] = C(0);
      if (k < n) load_pack<C, S, V>(p.z, base + k * P, z[k]);
      if (k < n && row.noise_col[k]) {
        entry_noise_pack<S, C, V>(p.noise, p.seed, p.num_seeds, step, b, n, P, k * P + pos, eta[k]);
      }
    }
#pragma unroll
    for (int q = 0; q < V; ++q) {
      C zq[kMax], etaq[kMax], out[kMax];
#pragma unroll
      for (int k = 0; k < kMax; ++k) {
        zq[k] = z[k][q];
        etaq[k] = eta[k][q];
      }
      hold_transition_element<C, kMax>(row, n, zq, eps[q], etaq, out);
#pragma unroll
      for (int k = 0; k < kMax; ++k) z[k][q] = out[k];  // element q's inputs are spent
    }
#pragma unroll
    for (int k = 0; k < kMax; ++k) {
      if (k < n) store_pack<C, S, V>(p.out, base + k * P, z[k]);
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

namespace {

template <class S, class M>
cudaError_t launch_transition(const HoldTransitionParams& p, cudaStream_t stream) {
  constexpr int V = hold_vec_width<S>();
  const long long total = p.batch * p.per_component;
  bool packed = V > 1 && p.per_component % V == 0 && aligned(p.eps_hat, V * sizeof(M));
  const void* state_ptrs[] = {p.z, p.noise, p.out};
  for (const void* q : state_ptrs) packed = packed && aligned(q, V * sizeof(S));
  if (!packed) {
    hold_transition_kernel<S, M, 1, 0><<<grid_size(total), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  }
  if constexpr (V > 1) {
    const int blocks = grid_size(total / V);
    switch (hold_kernel_order(p.n)) {
      case 2: hold_transition_kernel<S, M, V, 2><<<blocks, kThreads, 0, stream>>>(p); break;
      case 3: hold_transition_kernel<S, M, V, 3><<<blocks, kThreads, 0, stream>>>(p); break;
      case 4: hold_transition_kernel<S, M, V, 4><<<blocks, kThreads, 0, stream>>>(p); break;
      default: hold_transition_kernel<S, M, V, 0><<<blocks, kThreads, 0, stream>>>(p);
    }
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t hold_transition_launch(const HoldTransitionParams& p, cudaStream_t stream) {
  if (p.batch * p.per_component == 0) return cudaSuccess;
  return with_storage(static_cast<DType>(p.state_dtype), [&](auto s) {
    return with_storage(static_cast<DType>(p.model_dtype),
                        [&](auto m) { return launch_transition<decltype(s), decltype(m)>(p, stream); });
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
