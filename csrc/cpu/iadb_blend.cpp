// diffkern::iadb_blend on CPU: out = (1 - alpha_b)*x0 + alpha_b*x1 and, optionally, the IADB training
// target x1 - x0, in one pass; alpha is per sample (B,), x0 and x1 are (B, ...).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>

#include "common/cpu_utils.h"
#include "common/iadb_blend.h"
#include "common/op_checks.h"

namespace dk {
namespace {

constexpr int64_t kGrain = 32768;  // elements per parallel_for task

struct BlendArgs {
  const void* x0;
  const void* x1;
  const void* alpha;  // (B,), dtype A
  void* out;
  void* target_out;  // may be null
  int64_t per_sample;
};

// Elements [begin, end) for storage S and alpha dtype A. Both inputs of a block are loaded before its
// outputs are stored: out may be x0 or x1.
template <class S, class A>
DK_CPU_CLONES void blend_range(const BlendArgs& a, int64_t begin, int64_t end) {
  using C = compute_t<S>;
  alignas(64) C ab[kBlock], x0b[kBlock], x1b[kBlock], ob[kBlock], tb[kBlock];
  const auto* x0 = static_cast<const S*>(a.x0);
  const auto* x1 = static_cast<const S*>(a.x1);
  const auto* alpha = static_cast<const A*>(a.alpha);
  auto* out = static_cast<S*>(a.out);
  auto* target = static_cast<S*>(a.target_out);
  for (int64_t i0 = begin; i0 < end; i0 += kBlock) {
    const int64_t n = std::min(kBlock, end - i0);
    for (int64_t j = 0; j < n;) {  // alpha per element, one run per sample (the reference's alpha.to(cdt))
      const int64_t sample = (i0 + j) / a.per_sample;
      const int64_t run_end = std::min(n, (sample + 1) * a.per_sample - i0);
      const C alpha_b = to_compute<C>(alpha[sample]);
      for (; j < run_end; ++j) ab[j] = alpha_b;
    }
    load_block(x0 + i0, x0b, n);
    load_block(x1 + i0, x1b, n);
    for (int64_t j = 0; j < n; ++j) iadb_blend_element<C>(ab[j], x0b[j], x1b[j], ob[j], tb[j]);
    if (target != nullptr) store_block(tb, target + i0, n);
    store_block(ob, out + i0, n);
  }
}

void iadb_blend_cpu(const at::Tensor& x0, const at::Tensor& x1, const at::Tensor& alpha, const at::Tensor& out,
                    const OptTensor& target_out) {
  check_iadb_blend(x0, x1, alpha, out, target_out);
  TORCH_CHECK(x0.device().is_cpu(), "x0: expected a CPU tensor for the CPU kernel, got ", x0.device());
  const int64_t numel = x0.numel();
  if (numel == 0) return;
  BlendArgs a{};
  a.x0 = x0.data_ptr();
  a.x1 = x1.data_ptr();
  a.alpha = alpha.data_ptr();
  a.out = out.data_ptr();
  a.target_out = get_if(target_out) ? get_if(target_out)->data_ptr() : nullptr;
  a.per_sample = numel / x0.size(0);
  with_storage(x0.scalar_type(), [&](auto s) {
    with_storage(alpha.scalar_type(), [&](auto al) {
      at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
        blend_range<decltype(s), decltype(al)>(a, begin, end);
      });
    });
  });
}

}  // namespace
}  // namespace dk

TORCH_LIBRARY_IMPL(diffkern, CPU, m) { m.impl("iadb_blend", &dk::iadb_blend_cpu); }
