// Argument checks of diffkern::hold_transition and diffkern::hold_perturb shared by the CPU and CUDA
// bindings (host only, needs torch). Same rules as the Python front-ends in diffkern/ops/hold.py;
// a failed check has written nothing.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

#include "common/hold.h"
#include "common/op_checks.h"

namespace dk {

// (B, C, *rest) for a state (B, n*C, *rest).
inline std::vector<int64_t> hold_data_shape(const at::Tensor& state, int64_t n) {
  std::vector<int64_t> s(state.sizes().begin(), state.sizes().end());
  s[1] /= n;
  return s;
}

inline void check_hold_state(const at::Tensor& z, const char* name, int64_t n) {
  TORCH_CHECK(z.dim() >= 2, name, ": expected a state (B, n*C, ...) with at least 2 dims, got shape ", z.sizes());
  TORCH_CHECK(z.size(1) % n == 0, name, ": channel count ", z.size(1), " is not a multiple of the order n = ", n,
              " (layout (B, n*C, ...), component-major)");
}

inline void check_float64_table(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.defined() && t.scalar_type() == at::kDouble, name, ": expected dtype float64, got ",
              t.defined() ? c10::toString(t.scalar_type()) : "an undefined tensor");
  TORCH_CHECK(t.device() == ref.device(), name, ": expected device ", ref.device(), " (that of ", ref_name, "), got ",
              t.device());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

inline void check_hold_transition(const at::Tensor& z, const at::Tensor& eps_hat, const OptTensor& noise,
                                  const at::Tensor& coef, int64_t step, const at::Tensor& seed,
                                  const at::Tensor& out) {
  TORCH_CHECK(z.defined(), "z: expected a tensor, got an undefined tensor");
  check_float_contiguous(z, "z", z.device(), "z");
  check_float64_table(coef, "coef", z, "z");
  TORCH_CHECK(coef.dim() == 3 && coef.size(2) == 2 * coef.size(1) + 1, "coef: expected shape (N, n, 2n+1), got ",
              coef.sizes());
  const int64_t n = coef.size(1);
  TORCH_CHECK(n >= 1 && n <= kHoldMaxOrder, "coef: order n = ", n, " is outside the supported 1 <= n <= ",
              kHoldMaxOrder);
  check_hold_state(z, "z", n);
  check_float_contiguous(eps_hat, "eps_hat", z.device(), "z");
  const auto data_shape = hold_data_shape(z, n);
  TORCH_CHECK(eps_hat.sizes() == at::IntArrayRef(data_shape), "eps_hat: expected shape ", at::IntArrayRef(data_shape),
              " (the state's (B, C, ...)), got ", eps_hat.sizes());
  if (auto* t = get_if(noise)) check_like(*t, "noise", z, "z");
  check_like(out, "out", z, "z");
  TORCH_CHECK(step >= 0 && step < coef.size(0), "step: ", step, " is out of range for a coefficient table of ",
              coef.size(0), " rows");
  TORCH_CHECK(step < (int64_t{1} << 32), "step: expected < 2**32 (the Philox step counter), got ", step);
  check_seed(seed, z.size(0), z, "z");
  check_overlap({{"out", &out}}, {{"z", &z}, {"eps_hat", &eps_hat}, {"noise", get_if(noise)}},
                {{"coef", &coef}, {"seed", &seed}});
}

inline void check_hold_perturb(const at::Tensor& z0, const at::Tensor& mean_mat, const at::Tensor& chol,
                               const OptTensor& noise, int64_t step, const at::Tensor& seed, const at::Tensor& out,
                               const OptTensor& eps_out) {
  TORCH_CHECK(z0.defined(), "z0: expected a tensor, got an undefined tensor");
  check_float_contiguous(z0, "z0", z0.device(), "z0");
  TORCH_CHECK(z0.dim() >= 2, "z0: expected (B, m*C, ...) with at least 2 dims, got shape ", z0.sizes());
  check_float64_table(mean_mat, "mean_mat", z0, "z0");
  check_float64_table(chol, "chol", z0, "z0");
  const int64_t B = z0.size(0);
  TORCH_CHECK(mean_mat.dim() == 3 && mean_mat.size(0) == B, "mean_mat: expected shape (B=", B, ", n, m), got ",
              mean_mat.sizes());
  const int64_t n = mean_mat.size(1), m = mean_mat.size(2);
  TORCH_CHECK(n >= 1 && n <= kHoldMaxOrder && (m == 1 || m == n), "mean_mat: expected (B, n, m) with 1 <= n <= ",
              kHoldMaxOrder, " and m in (1, n), got ", mean_mat.sizes());
  TORCH_CHECK(chol.dim() == 3 && chol.size(0) == B && chol.size(1) == n && chol.size(2) == n,
              "chol: expected shape (", B, ", ", n, ", ", n, "), got ", chol.sizes());
  check_hold_state(z0, "z0", m);
  check_float_contiguous(out, "out", z0.device(), "z0");
  std::vector<int64_t> state_shape(z0.sizes().begin(), z0.sizes().end());
  state_shape[1] = z0.size(1) / m * n;
  // Shape, then dtype, worded as check_like and as the Python front-end.
  TORCH_CHECK(out.sizes() == at::IntArrayRef(state_shape), "out: expected shape ", at::IntArrayRef(state_shape),
              " (the state (B, n*C, ...) of z0 and mean_mat), got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == z0.scalar_type(), "out: expected dtype ", z0.scalar_type(), " (that of z0), got ",
              out.scalar_type());
  if (auto* t = get_if(noise)) check_like(*t, "noise", out, "out");
  if (auto* t = get_if(eps_out)) {
    check_float_contiguous(*t, "eps_out", z0.device(), "z0");
    const auto data_shape = hold_data_shape(out, n);
    TORCH_CHECK(t->sizes() == at::IntArrayRef(data_shape), "eps_out: expected shape ", at::IntArrayRef(data_shape),
                " (the state's (B, C, ...)), got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == z0.scalar_type(), "eps_out: expected dtype ", z0.scalar_type(),
                " (that of the state), got ", t->scalar_type());
  }
  TORCH_CHECK(step >= 0 && step < (int64_t{1} << 32), "step: expected 0 <= step < 2**32, got ", step);
  check_seed(seed, B, z0, "z0");
  check_overlap({{"out", &out}, {"eps_out", get_if(eps_out)}}, {{"z0", &z0}, {"noise", get_if(noise)}},
                {{"mean_mat", &mean_mat}, {"chol", &chol}, {"seed", &seed}});
}

}  // namespace dk
