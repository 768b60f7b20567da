// diffkern::hold_transition and diffkern::hold_perturb on CPU (spec: diffkern/ops/hold.py, arithmetic:
// common/hold.h). One pass over memory: each element's n components are read once and written once.
//
// Work is split into runs of up to kBlock consecutive positions p of one sample; a run loads its n
// component blocks (and the noise blocks) into L1-resident compute-type arrays, does the n x n
// arithmetic as vectorisable loops over the run in the order of common/hold.h, and stores. All loads
// of a run precede its stores, so out may be z (in place).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>

#include "common/cpu_philox.h"
#include "common/hold.h"
#include "common/hold_checks.h"

namespace dk {
namespace {

// Elements (positions p, each n components) per parallel_for task: about 128 KiB of float32 state at
// n = 4, and a multiple of kBlock.
constexpr int64_t kGrain = 8192;

struct NoiseSource {
  const void* noise;  // explicit (B, n, P) noise, or null: Philox
  const int64_t* seed;
  int64_t num_seeds;
  u32 step;
};

// eta (or eps) for component k, positions [p, p + len) of sample b, into dst.
template <class S, class C>
DK_HOST_DEVICE void load_noise(const NoiseSource& src, int64_t b, int64_t n, int64_t P, int64_t k, int64_t p,
                               int64_t len, C* __restrict dst) {
  const int64_t off = k * P + p;
  if (src.noise != nullptr) {
    load_block(static_cast<const S*>(src.noise) + b * n * P + off, dst, len);
  } else if (src.num_seeds == 1) {
    philox_normal_run<C>(static_cast<u64>(src.seed[0]), src.step, static_cast<u64>(b * n * P + off), len, dst);
  } else {
    philox_normal_run<C>(static_cast<u64>(src.seed[b]), src.step, static_cast<u64>(off), len, dst);
  }
}

// acc[i] = sum_j A[i][j] * x_j left to right over a run (A row-major n x m in the compute type).
template <class C>
DK_HOST_DEVICE void affine_run(int n, int m, const C* A, C (*x)[kBlock], int64_t len, C (*acc)[kBlock]) {
  for (int i = 0; i < n; ++i) {
    const C a0 = A[i * m];
    for (int64_t q = 0; q < len; ++q) acc[i][q] = mul_rn(a0, x[0][q]);
    for (int j = 1; j < m; ++j) {
      const C a = A[i * m + j];
      for (int64_t q = 0; q < len; ++q) acc[i][q] = add_rn(acc[i][q], mul_rn(a, x[j][q]));
    }
  }
}

//----------------------------------------------------------------------------
// hold_transition

template <class S, class M>
DK_CPU_CLONES void transition_range(const HoldTransitionParams& a, const HoldRow<compute_t<S>>& r,
                                    const NoiseSource& src, int64_t begin, int64_t end) {
  using C = compute_t<S>;
  alignas(64) C zb[kHoldMaxOrder][kBlock], eta[kHoldMaxOrder][kBlock], ob[kHoldMaxOrder][kBlock], eb[kBlock];
  alignas(64) C Kf[kHoldMaxOrder * kHoldMaxOrder];
  const int n = r.n;
  const int64_t P = a.per_component;
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) Kf[i * n + j] = r.K[i][j];
  const auto* z = static_cast<const S*>(a.z);
  const auto* e = static_cast<const M*>(a.eps_hat);
  auto* out = static_cast<S*>(a.out);
  for (int64_t i0 = begin; i0 < end;) {
    const int64_t b = i0 / P, p = i0 - b * P;
    const int64_t len = std::min({kBlock, end - i0, P - p});
    for (int k = 0; k < n; ++k) load_block(z + b * n * P + k * P + p, zb[k], len);
    load_block(e + b * P + p, eb, len);
    for (int k = 0; k < n; ++k) {
      if (r.noise_col[k]) load_noise<S>(src, b, n, P, k, p, len, eta[k]);
    }
    affine_run<C>(n, n, Kf, zb, len, ob);
    for (int i = 0; i < n; ++i) {
      const C ki = r.k[i];
      for (int64_t q = 0; q < len; ++q) ob[i][q] = add_rn(ob[i][q], mul_rn(ki, eb[q]));
      for (int j = 0; j <= i; ++j) {
        if (!r.noise_col[j]) continue;
        const C l = r.L[i][j];
        for (int64_t q = 0; q < len; ++q) ob[i][q] = add_rn(ob[i][q], mul_rn(l, eta[j][q]));
      }
    }
    for (int k = 0; k < n; ++k) store_block(ob[k], out + b * n * P + k * P + p, len);
    i0 += len;
  }
}

void hold_transition_cpu(const at::Tensor& z, const at::Tensor& eps_hat, const OptTensor& noise,
                         const at::Tensor& coef, int64_t step, const at::Tensor& seed, const at::Tensor& out) {
  check_hold_transition(z, eps_hat, noise, coef, step, seed, out);
  TORCH_CHECK(z.device().is_cpu(), "z: expected a CPU tensor for the CPU kernel, got ", z.device());
  if (z.numel() == 0) return;
  const int n = static_cast<int>(coef.size(1));
  HoldTransitionParams a{};
  a.z = z.data_ptr();
  a.eps_hat = eps_hat.data_ptr();
  a.out = out.data_ptr();
  a.batch = z.size(0);
  a.per_component = z.numel() / (a.batch * n);
  a.n = n;
  const NoiseSource src{get_if(noise) ? get_if(noise)->data_ptr() : nullptr, seed.data_ptr<int64_t>(), seed.numel(),
                        static_cast<u32>(step)};
  const double* row = coef.data_ptr<double>() + step * n * (2 * n + 1);
  with_storage(z.scalar_type(), [&](auto s) {
    using S = decltype(s);
    HoldRow<compute_t<S>> r;
    load_hold_row(row, n, r);
    with_storage(eps_hat.scalar_type(), [&](auto m) {
      at::parallel_for(0, a.batch * a.per_component, kGrain, [&](int64_t begin, int64_t end) {
        transition_range<S, decltype(m)>(a, r, src, begin, end);
      });
    });
  });
}

//----------------------------------------------------------------------------
// hold_perturb

template <class S>
DK_CPU_CLONES void perturb_range(const HoldPerturbParams& a, const NoiseSource& src, int64_t begin, int64_t end) {
  using C = compute_t<S>;
  alignas(64) C zb[kHoldMaxOrder][kBlock], eps[kHoldMaxOrder][kBlock], ob[kHoldMaxOrder][kBlock];
  alignas(64) C M[kHoldMaxOrder * kHoldMaxOrder], L[kHoldMaxOrder * kHoldMaxOrder];
  const int n = a.n, m = a.m;
  const int64_t P = a.per_component;
  const auto* z0 = static_cast<const S*>(a.z0);
  auto* out = static_cast<S*>(a.out);
  auto* eps_out = static_cast<S*>(a.eps_out);
  int64_t loaded = -1;  // the sample whose matrices are in M, L
  for (int64_t i0 = begin; i0 < end;) {
    const int64_t b = i0 / P, p = i0 - b * P;
    const int64_t len = std::min({kBlock, end - i0, P - p});
    if (b != loaded) {
      for (int q = 0; q < n * m; ++q) M[q] = static_cast<C>(a.mean_mat[b * n * m + q]);
      for (int q = 0; q < n * n; ++q) L[q] = static_cast<C>(a.chol[b * n * n + q]);
      loaded = b;
    }
    for (int k = 0; k < m; ++k) load_block(z0 + b * m * P + k * P + p, zb[k], len);
    for (int k = 0; k < n; ++k) load_noise<S>(src, b, n, P, k, p, len, eps[k]);
    affine_run<C>(n, m, M, zb, len, ob);
    for (int i = 0; i < n; ++i) {
      for (int j = 0; j <= i; ++j) {
        const C l = L[i * n + j];
        for (int64_t q = 0; q < len; ++q) ob[i][q] = add_rn(ob[i][q], mul_rn(l, eps[j][q]));
      }
    }
    if (eps_out != nullptr) store_block(eps[n - 1], eps_out + b * P + p, len);
    for (int k = 0; k < n; ++k) store_block(ob[k], out + b * n * P + k * P + p, len);
    i0 += len;
  }
}

void hold_perturb_cpu(const at::Tensor& z0, const at::Tensor& mean_mat, const at::Tensor& chol,
                      const OptTensor& noise, int64_t step, const at::Tensor& seed, const at::Tensor& out,
                      const OptTensor& eps_out) {
  check_hold_perturb(z0, mean_mat, chol, noise, step, seed, out, eps_out);
  TORCH_CHECK(z0.device().is_cpu(), "z0: expected a CPU tensor for the CPU kernel, got ", z0.device());
  if (out.numel() == 0) return;
  HoldPerturbParams a{};
  a.n = static_cast<int>(mean_mat.size(1));
  a.m = static_cast<int>(mean_mat.size(2));
  a.z0 = z0.data_ptr();
  a.mean_mat = mean_mat.data_ptr<double>();
  a.chol = chol.data_ptr<double>();
  a.out = out.data_ptr();
  a.eps_out = get_if(eps_out) ? get_if(eps_out)->data_ptr() : nullptr;
  a.batch = z0.size(0);
  a.per_component = out.numel() / (a.batch * a.n);
  const NoiseSource src{get_if(noise) ? get_if(noise)->data_ptr() : nullptr, seed.data_ptr<int64_t>(), seed.numel(),
                        static_cast<u32>(step)};
  with_storage(z0.scalar_type(), [&](auto s) {
    at::parallel_for(0, a.batch * a.per_component, kGrain, [&](int64_t begin, int64_t end) {
      perturb_range<decltype(s)>(a, src, begin, end);
    });
  });
}

}  // namespace
}  // namespace dk

TORCH_LIBRARY_IMPL(diffkern, CPU, m) {
  m.impl("hold_transition", &dk::hold_transition_cpu);
  m.impl("hold_perturb", &dk::hold_perturb_cpu);
}
