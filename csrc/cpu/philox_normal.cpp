// diffkern::philox_normal on CPU: flat element i of out gets the normal at index offset + i of the
// counter-based stream (common/philox.h); with per-sample seeds (B,), index offset + i % per_sample
// under key seed[i / per_sample]. The same stream sampler_step draws, as an op of its own.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>

#include "common/cpu_philox.h"
#include "common/op_checks.h"

namespace dk {
namespace {

// Elements per parallel_for task; a Philox normal costs ~10x a memory-bound element, so tasks are
// smaller than the element-wise ops' 32K.
constexpr int64_t kGrain = 8192;

struct NormalArgs {
  const int64_t* seed;
  int64_t num_seeds;
  int64_t per_sample;
  u64 offset;
  u32 step;
  void* out;
};

template <class S>
DK_CPU_CLONES void normal_range(const NormalArgs& a, int64_t begin, int64_t end) {
  using C = compute_t<S>;
  alignas(64) C xi[kBlock];
  auto* out = static_cast<S*>(a.out);
  for (int64_t i0 = begin; i0 < end; i0 += kBlock) {
    const int64_t n = std::min(kBlock, end - i0);
    philox_normal_block(a.seed, a.num_seeds, a.per_sample, a.step, a.offset, i0, n, xi);
    store_block(xi, out + i0, n);
  }
}

void philox_normal_cpu(const at::Tensor& seed, int64_t step, int64_t offset, const at::Tensor& out) {
  check_philox_normal(seed, step, offset, out);
  TORCH_CHECK(out.device().is_cpu(), "out: expected a CPU tensor for the CPU kernel, got ", out.device());
  const int64_t numel = out.numel();
  if (numel == 0) return;
  NormalArgs a{};
  a.seed = seed.data_ptr<int64_t>();
  a.num_seeds = seed.numel();
  a.per_sample = numel / a.num_seeds;
  a.offset = static_cast<u64>(offset);
  a.step = static_cast<u32>(step);
  a.out = out.data_ptr();
  with_storage(out.scalar_type(), [&](auto s) {
    at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
      normal_range<decltype(s)>(a, begin, end);
    });
  });
}

}  // namespace
}  // namespace dk

TORCH_LIBRARY_IMPL(diffkern, CPU, m) { m.impl("philox_normal", &dk::philox_normal_cpu); }
