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
// six columns 1130 -> 424). Otherwise V = 1.
//
// The packed kernel is also compiled for each order N = hold_kernel_order(n) of 2, 3 and 4: its arrays then
// have N rows instead of kHoldMaxOrder and its guards fold away. ptxas -v (sm_90, float32, V = 4): 48 / 64 /
// 102 registers for N = 2 / 3 / 4 against 238 for the any-order kernel (N = 0), so 5 / 4 / 2 blocks of 256
// threads fit an SM instead of 1 (more loads in flight); instructions per element change little (n = 3:
// 233.5). N = 0 serves the other orders and the V = 1 kernel.
//
// hold_perturb launches the same way (V = 4 and the per-order kernels under the same conditions, through
// launch_hold), and keeps its per-sample matrices in registers, loaded once per V elements. sm_90 SASS,
// float32, n = 3, m = 1, three noise columns drawn, per element: 266.8 instructions (bfloat16 265.8), 88.5
// with explicit noise; the previous one-element kernel indexed the matrices at run time (576 B of local
// memory per thread, stored and reloaded per element): 2327 with noise, 1856 without. 64 registers (was 126).
#include "common/hold.h"
#include "common/philox.h"
#include "cuda/device_utils.cuh"

#if !defined(__CUDACC_RTC__)
#include <initializer_list>
#include <type_traits>
#endif

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
  const int tid = static_cast<int>(threadIdx.x), threads = static_cast<int>(blockDim.x);
  for (int t = tid; t < n * (2 * n + 1); t += threads) load_hold_entry(row, n, t, r);
  if (tid < n) r.noise_col[tid] = hold_noise_col(row, n, tid);
  if (tid == 0) r.n = n;
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

// hold_perturb: V and N as hold_transition's (packed when P % 4 == 0 and z0, noise, out, eps_out are aligned
// to 4 elements); m = 1 or n. The per-sample matrices are loaded once per V elements (warp-uniform reads:
// consecutive threads share a sample), into registers (hold_perturb_element's fixed strides).
template <class S, int V, int N>
__global__ void __launch_bounds__(kThreads) hold_perturb_kernel(const HoldPerturbParams p) {
  using C = typename ComputeOf<S>::type;
  constexpr int kMax = N > 0 ? N : kHoldMaxOrder;
  const int n = N > 0 ? N : p.n, m = p.m;
  const long long P = p.per_component, total = p.batch * P;
  const u32 step = static_cast<u32>(p.step);
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x * V;
  for (long long e = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) * V; e < total; e += stride) {
    const long long b = e / P, pos = e - b * P;  // V == 4: the four elements are in one sample
    C Mb[kMax][kMax], Lb[kMax][kMax];             // this sample's matrices
#pragma unroll
    for (int i = 0; i < kMax; ++i) {
#pragma unroll
      for (int j = 0; j < kMax; ++j) {
        Mb[i][j] = i < n && j < m ? static_cast<C>(__ldg(p.mean_mat + (b * n + i) * m + j)) : C(0);
        Lb[i][j] = i < n && j <= i ? static_cast<C>(__ldg(p.chol + (b * n + i) * n + j)) : C(0);
      }
    }
    C z0[kMax][V], eps[kMax][V];
#pragma unroll
    for (int k = 0; k < kMax; ++k) {
#pragma unroll
      for (int q = 0; q < V; ++q) z0[k][q] = eps[k][q] = C(0);
      if (k < m) load_pack<C, S, V>(p.z0, (b * m + k) * P + pos, z0[k]);
      if (k < n) entry_noise_pack<S, C, V>(p.noise, p.seed, p.num_seeds, step, b, n, P, k * P + pos, eps[k]);
    }
    C out[kMax][V];
#pragma unroll
    for (int q = 0; q < V; ++q) {
      C z0q[kMax], epsq[kMax], outq[kMax];
#pragma unroll
      for (int k = 0; k < kMax; ++k) {
        z0q[k] = z0[k][q];
        epsq[k] = eps[k][q];
      }
      hold_perturb_element<C, kMax>(n, m, Mb, Lb, z0q, epsq, outq);
#pragma unroll
      for (int k = 0; k < kMax; ++k) out[k][q] = outq[k];
    }
#pragma unroll
    for (int k = 0; k < kMax; ++k) {
      if (k < n) store_pack<C, S, V>(p.out, (b * n + k) * P + pos, out[k]);
      if (k == n - 1 && p.eps_out != nullptr) store_pack<C, S, V>(p.eps_out, b * P + pos, eps[k]);
    }
  }
}

#if !defined(__CUDACC_RTC__)

namespace {

template <int K>
using Int = std::integral_constant<int, K>;

// Both ops launch as one: V elements per thread with the kernel of order hold_kernel_order(n) when
// ``packed``, else one element per thread and the any-order kernel. launch(Int<V>, Int<N>, blocks).
template <int V, class Launch>
cudaError_t launch_hold(bool packed, int n, long long total, Launch launch) {
  if (!packed) {
    launch(Int<1>{}, Int<0>{}, grid_size(total));
  } else if constexpr (V > 1) {
    const int blocks = grid_size(total / V);
    switch (hold_kernel_order(n)) {
      case 2: launch(Int<V>{}, Int<2>{}, blocks); break;
      case 3: launch(Int<V>{}, Int<3>{}, blocks); break;
      case 4: launch(Int<V>{}, Int<4>{}, blocks); break;
      default: launch(Int<V>{}, Int<0>{}, blocks);
    }
  }
  return cudaGetLastError();
}

// The packed kernels' condition: V > 1, P % V == 0, and every pointer aligned to V of its elements.
template <class S>
bool hold_packed(long long per_component, std::initializer_list<const void*> state_ptrs, const void* model_ptr = nullptr,
                 size_t model_size = 0) {
  constexpr int V = hold_vec_width<S>();
  bool packed = V > 1 && per_component % V == 0 && aligned(model_ptr, V * model_size);
  for (const void* q : state_ptrs) packed = packed && aligned(q, V * sizeof(S));
  return packed;
}

}  // namespace

cudaError_t hold_transition_launch(const HoldTransitionParams& p, cudaStream_t stream) {
  const long long total = p.batch * p.per_component;
  if (total == 0) return cudaSuccess;
  return with_storage(static_cast<DType>(p.state_dtype), [&](auto s) {
    return with_storage(static_cast<DType>(p.model_dtype), [&](auto m) {
      using S = decltype(s);
      using M = decltype(m);
      const bool packed = hold_packed<S>(p.per_component, {p.z, p.noise, p.out}, p.eps_hat, sizeof(M));
      return launch_hold<hold_vec_width<S>()>(packed, p.n, total, [&](auto v, auto k, int blocks) {
        hold_transition_kernel<S, M, decltype(v)::value, decltype(k)::value><<<blocks, kThreads, 0, stream>>>(p);
      });
    });
  });
}

cudaError_t hold_perturb_launch(const HoldPerturbParams& p, cudaStream_t stream) {
  const long long total = p.batch * p.per_component;
  if (total == 0) return cudaSuccess;
  return with_storage(static_cast<DType>(p.state_dtype), [&](auto s) {
    using S = decltype(s);
    const bool packed = hold_packed<S>(p.per_component, {p.z0, p.noise, p.out, p.eps_out});
    return launch_hold<hold_vec_width<S>()>(packed, p.n, total, [&](auto v, auto k, int blocks) {
      hold_perturb_kernel<S, decltype(v)::value, decltype(k)::value><<<blocks, kThreads, 0, stream>>>(p);
    });
  });
}

#endif  // !__CUDACC_RTC__

}  // namespace gpu
}  // namespace dk
