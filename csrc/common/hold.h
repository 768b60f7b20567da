// The per-element arithmetic of diffkern::hold_transition and diffkern::hold_perturb, written once
// for the CPU and CUDA kernels. Specification and reference: diffkern/ops/hold.py.
//
// State layout (B, n*C, *rest), component-major: with P = C * prod(rest), component k of element
// (b, p) is at flat index b*n*P + k*P + p; the network output eps_hat is at b*P + p. The normal
// eta_k of that element is the Philox normal of the state entry's index (one stream: b*n*P + k*P + p;
// per-sample streams: k*P + p under seed[b]) at counter ``step``.
//
// hold_transition, per element and output component i (compute type C, each op rounded, common/hd.h):
//   acc = K[i][0]*z_0;  acc += K[i][j]*z_j (j = 1..n-1);  acc += k[i]*eps;  acc += L[i][j]*eta_j (j = 0..i)
// where a column j of L (the Cholesky factor C of the table) that is all zero is skipped, eta_j not drawn.
// hold_perturb, per element and component i:
//   acc = M[i][0]*z0_0;  acc += M[i][j]*z0_j (j < m);  acc += L[i][j]*eps_j (j = 0..i);  eps_out = eps_{n-1}
//
// Table row (float64): n rows of 2n+1 values, [K_i0 .. K_i(n-1), k_i, L_i0 .. L_i(n-1)].
#pragma once

#include "hd.h"

// The CUDA host launchers are declared for nvcc and for the torch binding of a CUDA build.
#if !defined(__CUDACC_RTC__) && (defined(__CUDACC__) || defined(DIFFKERN_WITH_CUDA))
#include <cuda_runtime_api.h>
#define DK_HOLD_CUDA_LAUNCHERS 1
#endif

namespace dk {

constexpr int kHoldMaxOrder = 8;  // diffkern.ops.hold.MAX_ORDER
// The order a CUDA hold_transition kernel is compiled for: n itself for the orders of the HOLD experiments
// (2, 3, 4: math-hold.md), whose packed kernels then hold their arrays at the order's size; 0 (any n up to
// kHoldMaxOrder, read at run time) otherwise. Mirrored by diffkern.ops.cuda_rtc.hold_kernel_order.
DK_HOST_DEVICE constexpr int hold_kernel_order(int n) { return n >= 2 && n <= 4 ? n : 0; }

// One hold_transition table row in the compute type; ``noise_col[j]``: eta_j is used.
template <class C>
struct HoldRow {
  int n;
  C K[kHoldMaxOrder][kHoldMaxOrder];
  C k[kHoldMaxOrder];
  C L[kHoldMaxOrder][kHoldMaxOrder];
  bool noise_col[kHoldMaxOrder];
};

// Entry t of the row (t = i*(2n+1) + j, j < 2n+1) into r's K, k or L (L above the diagonal: zero).
// One entry at a time, so a GPU block can share the loading (csrc/cuda/hold.cu).
template <class C>
DK_HOST_DEVICE void load_hold_entry(const double* row, int n, int t, HoldRow<C>& r) {
  const int width = 2 * n + 1, i = t / width, j = t - i * width;
  if (j < n) {
    r.K[i][j] = static_cast<C>(row[t]);
  } else if (j == n) {
    r.k[i] = static_cast<C>(row[t]);
  } else {
    r.L[i][j - n - 1] = j - n - 1 <= i ? static_cast<C>(row[t]) : C(0);
  }
}

// Whether eta_j is used: some L[i][j], i >= j, of the row is non-zero.
DK_HOST_DEVICE bool hold_noise_col(const double* row, int n, int j) {
  bool used = false;
  for (int i = j; i < n; ++i) used = used || row[i * (2 * n + 1) + n + 1 + j] != 0.0;
  return used;
}

template <class C>
DK_HOST_DEVICE void load_hold_row(const double* row, int n, HoldRow<C>& r) {
  r.n = n;
  for (int t = 0; t < n * (2 * n + 1); ++t) load_hold_entry(row, n, t, r);
  for (int j = 0; j < n; ++j) r.noise_col[j] = hold_noise_col(row, n, j);
}

// Any noise column used at all (EM uses one, ODE/denoise rows none).
template <class C>
DK_HOST_DEVICE bool hold_row_has_noise(const HoldRow<C>& r) {
  bool any = false;
  for (int j = 0; j < r.n; ++j) any = any || r.noise_col[j];
  return any;
}

// One element of hold_transition of order n <= NMAX: z[n], eps, eta[n] (eta_j read only where
// noise_col[j]) -> out[n]. out must not alias z (kernels pass register copies, which is what makes
// in-place launches safe). Loops run to the compile-time bound NMAX with j < n guards, so a GPU compiler
// unrolls them and keeps the per-element arrays in registers; with n a compile-time constant equal to
// NMAX the guards vanish too.
template <class C, int NMAX = kHoldMaxOrder>
DK_HOST_DEVICE void hold_transition_element(const HoldRow<C>& r, int n, const C* z, C eps, const C* eta, C* out) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < NMAX; ++i) {
    if (i >= n) continue;
    C acc = mul_rn(r.K[i][0], z[0]);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int j = 1; j < NMAX; ++j) {
      if (j < n) acc = add_rn(acc, mul_rn(r.K[i][j], z[j]));
    }
    acc = add_rn(acc, mul_rn(r.k[i], eps));
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int j = 0; j < NMAX; ++j) {
      if (j <= i && r.noise_col[j]) acc = add_rn(acc, mul_rn(r.L[i][j], eta[j]));
    }
    out[i] = acc;
  }
}

// One element of hold_perturb of order n <= NMAX with per-sample matrices M (n x m, m = 1 or n) and L
// (n x n, lower triangular) already in the compute type: z0[m], eps[n] -> out[n]. Fixed row strides NMAX
// (not m, n) and loops to NMAX with guards: every index is a compile-time constant once a GPU compiler
// unrolls them, so the matrices stay in registers (row strides read at run time put them in local memory:
// 576 B per thread in float32, reloaded per element).
template <class C, int NMAX = kHoldMaxOrder>
DK_HOST_DEVICE void hold_perturb_element(int n, int m, const C (&M)[NMAX][NMAX], const C (&L)[NMAX][NMAX],
                                         const C* z0, const C* eps, C* out) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < NMAX; ++i) {
    if (i >= n) continue;
    C acc = mul_rn(M[i][0], z0[0]);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int j = 1; j < NMAX; ++j) {
      if (j < m) acc = add_rn(acc, mul_rn(M[i][j], z0[j]));
    }
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int j = 0; j < NMAX; ++j) {
      if (j <= i) acc = add_rn(acc, mul_rn(L[i][j], eps[j]));
    }
    out[i] = acc;
  }
}

// Launch parameters shared by the CUDA kernels and their binding (plain data, no torch, no CUDA types).
struct HoldTransitionParams {
  const void* z;          // (B, n, P) dtype S
  const void* eps_hat;    // (B, P) dtype M
  const void* noise;      // (B, n, P) dtype S, or null (Philox)
  const double* coef;     // (N, n, 2n+1) float64
  const long long* seed;  // (num_seeds,) int64
  void* out;              // (B, n, P) dtype S
  long long batch, per_component;  // B, P
  long long num_seeds;             // 1 or B
  long long step;
  int n;
  int state_dtype, model_dtype;  // dk::gpu::DType values
};

struct HoldPerturbParams {
  const void* z0;         // (B, m, P) dtype S
  const double* mean_mat;  // (B, n, m) float64
  const double* chol;     // (B, n, n) float64
  const void* noise;      // (B, n, P) dtype S, or null (Philox)
  const long long* seed;
  void* out;              // (B, n, P) dtype S
  void* eps_out;          // (B, P) dtype S, or null
  long long batch, per_component;
  long long num_seeds;
  long long step;
  int n, m;
  int state_dtype;
};

#ifdef DK_HOLD_CUDA_LAUNCHERS
namespace gpu {
// Host launchers (csrc/cuda/hold.cu): validate nothing (the binding did), launch on ``stream``,
// return the launch status, never synchronise.
cudaError_t hold_transition_launch(const HoldTransitionParams& params, cudaStream_t stream);
cudaError_t hold_perturb_launch(const HoldPerturbParams& params, cudaStream_t stream);
}  // namespace gpu
#endif

}  // namespace dk
