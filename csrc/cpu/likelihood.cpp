// CPU kernel of diffkern::likelihood_accum (spec and reference: diffkern/ops/likelihood.py).
//
// Per sample b (B = y.size(0), P = y.numel() / B elements each):
//   e_i     = (y_i - D_i) / sigma + eps_i            (eps_hat; eps from `noise` or the Philox stream)
//   acc[b] += weight * sum_i [e_i (e_i - 2 eps_i) + (1 - c) eps_i^2]
//           (= weight * sum_i [(eps_i - eps_hat_i)^2 - c eps_i^2], c the control-variate coefficient)
// The element math runs in the compute type C (float, double for float64 points) like the
// reference; the per-sample sum is kept in double in kLanes independent lanes (a likelihood
// evaluation is dominated by the model, so the exact-er reduction costs nothing that matters).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "common/op_checks.h"
#include "common/philox.h"

namespace {

constexpr int64_t kLanes = 8;

void check_inputs(const at::Tensor& y, const at::Tensor& denoised, const c10::optional<at::Tensor>& noise,
                  const at::Tensor& sigma, const at::Tensor& weight, const at::Tensor& cv, int64_t step,
                  const at::Tensor& seed, const at::Tensor& acc) {
  TORCH_CHECK(y.dim() >= 1, "likelihood_accum: y: expected a batched tensor (B, ...), got a 0-d tensor");
  TORCH_CHECK(y.is_contiguous(), "likelihood_accum: y: expected a contiguous tensor");
  TORCH_CHECK(denoised.sizes() == y.sizes() && denoised.scalar_type() == y.scalar_type() &&
                  denoised.is_contiguous(),
              "likelihood_accum: denoised: expected a contiguous tensor with the shape and dtype of y");
  if (noise.has_value()) {
    TORCH_CHECK(noise->sizes() == y.sizes() && noise->scalar_type() == y.scalar_type() && noise->is_contiguous(),
                "likelihood_accum: noise: expected a contiguous tensor with the shape and dtype of y");
  }
  const int64_t batch = y.size(0);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"sigma", sigma}, {"weight", weight},
                              {"cv", cv}}) {
    TORCH_CHECK(t.scalar_type() == at::kDouble && t.is_contiguous() && (t.numel() == 1 || t.numel() == batch),
                "likelihood_accum: ", name, ": expected a contiguous float64 tensor of 1 or B = ", batch,
                " elements");
  }
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.is_contiguous() && (seed.numel() == 1 || seed.numel() == batch),
              "likelihood_accum: seed: expected a contiguous int64 tensor of 1 or B = ", batch, " elements");
  TORCH_CHECK(step >= 0 && step < (int64_t{1} << 32), "likelihood_accum: step: expected 0 <= step < 2**32, got ",
              step);
  const auto acc_type = y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(acc.dim() == 1 && acc.size(0) == batch && acc.scalar_type() == acc_type && acc.is_contiguous(),
              "likelihood_accum: acc: expected a contiguous (B,) tensor of dtype ", acc_type, ", B = ", batch);
  for (const auto* t : {&y, &denoised, &sigma, &weight, &cv, &seed, &acc}) {
    TORCH_CHECK(t->device().is_cpu(), "likelihood_accum: expected CPU tensors (this is the CPU kernel)");
  }
  TORCH_CHECK(!noise.has_value() || noise->device().is_cpu(),
              "likelihood_accum: noise: expected a CPU tensor (this is the CPU kernel), got ", noise->device());
  // The op can be called directly, past the front-end's overlap check: each sample's task writes acc[b]
  // while the others read y, denoised, noise and the per-sample scalars, so acc may be exactly one of
  // the point tensors but overlap nothing else.
  dk::check_overlap({{"acc", &acc}}, {{"y", &y}, {"denoised", &denoised}, {"noise", dk::get_if(noise)}},
                    {{"sigma", &sigma}, {"weight", &weight}, {"cv", &cv}, {"seed", &seed}});
}

template <class S, class C>
void accumulate(const S* y, const S* denoised, const S* noise, const double* sigma, bool per_sample_sigma,
                const double* weight, bool per_sample_weight, const double* cv, bool per_sample_cv,
                const int64_t* seed, bool per_sample_seed, dk::u32 step, int64_t batch, int64_t per_sample,
                C* acc) {
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const C s = static_cast<C>(sigma[per_sample_sigma ? b : 0]);
      const C w = static_cast<C>(weight[per_sample_weight ? b : 0]);
      const C one_minus_c = static_cast<C>(1) - static_cast<C>(cv[per_sample_cv ? b : 0]);
      const auto key = static_cast<dk::u64>(seed[per_sample_seed ? b : 0]);
      const int64_t base = b * per_sample;
      double lanes[kLanes] = {0.0};
      for (int64_t i = 0; i < per_sample; ++i) {
        C eps;
        if (noise != nullptr) {
          eps = static_cast<C>(noise[base + i]);
        } else {
          // Per-sample seeds index inside the sample; one shared seed indexes the flat tensor.
          const auto idx = static_cast<dk::u64>(per_sample_seed ? i : base + i);
          eps = dk::philox_normal<C>(key, step, idx);
        }
        const C e = (static_cast<C>(y[base + i]) - static_cast<C>(denoised[base + i])) / s + eps;
        lanes[i % kLanes] += static_cast<double>(e * (e - static_cast<C>(2) * eps) + one_minus_c * eps * eps);
      }
      double total = 0.0;
      for (double lane : lanes) {
        total += lane;
      }
      acc[b] = static_cast<C>(static_cast<C>(acc[b]) + w * static_cast<C>(total));
    }
  });
}

void likelihood_accum_cpu(const at::Tensor& y, const at::Tensor& denoised, const c10::optional<at::Tensor>& noise,
                          const at::Tensor& sigma, const at::Tensor& weight, const at::Tensor& cv, int64_t step,
                          const at::Tensor& seed, const at::Tensor& acc) {
  check_inputs(y, denoised, noise, sigma, weight, cv, step, seed, acc);
  const int64_t batch = y.size(0);
  if (batch == 0) {
    return;
  }
  const int64_t per_sample = y.numel() / batch;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "likelihood_accum_cpu", [&] {
    using C = at::opmath_type<scalar_t>;
    accumulate<scalar_t, C>(y.data_ptr<scalar_t>(), denoised.data_ptr<scalar_t>(),
                            noise.has_value() ? noise->data_ptr<scalar_t>() : nullptr, sigma.data_ptr<double>(),
                            sigma.numel() > 1, weight.data_ptr<double>(), weight.numel() > 1, cv.data_ptr<double>(),
                            cv.numel() > 1, seed.data_ptr<int64_t>(), seed.numel() > 1, static_cast<dk::u32>(step),
                            batch, per_sample, acc.data_ptr<C>());
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(diffkern, CPU, m) {
  m.impl("likelihood_accum", &likelihood_accum_cpu);
}
