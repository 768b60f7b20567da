// diffkern::sampler_step on CPU: the fused sampler update of diffkern/ops/coefs.py in one pass over
// memory, multi-threaded with at::parallel_for and vectorised per block (common/cpu_utils.h).
//
// Reads x and model_out (plus model_out_uncond, the histories, noise when used), writes out (plus x0_out,
// history_out when given): at 2**24 float32 elements the eager PyTorch DDIM step makes 6 passes over
// memory and this kernel one.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>

#include "common/cpu_philox.h"
#include "common/op_checks.h"
#include "common/sampler_step.h"

namespace dk {
namespace {

// Elements per parallel_for task: 128 KiB of float32 per stream, enough to hide the task overhead.
constexpr int64_t kGrain = 32768;

struct StepArgs {
  const void* x;
  const void* model_out;
  const void* model_out_uncond;  // null: no guidance
  const void* history;           // null: history term unused (absent, or c == 0)
  const void* history2;          // null: second history term unused (absent, or c2 == 0)
  const void* history3;          // null: third history term unused (absent, or c3 == 0)
  const void* noise;             // null: Philox noise when use_noise
  void* out;
  void* x0_out;       // may be null
  void* history_out;  // may be null
  const int64_t* seed;
  int64_t num_seeds;   // 1, or B (per-sample streams)
  int64_t per_sample;  // numel / num_seeds
  u32 step;
  bool use_noise;      // s != 0
  bool use_bu;         // bu != 0 (CFG++: out += bu*d_u)
  bool use_fu;         // fu != 0 and history_out given (h_new += fu*d_u)
};

// The inputs of one block, converted to the compute type (u, h, h2, h3, xi: read only when their flag is set).
template <class C>
struct BlockIn {
  const C* x;
  const C* m;
  const C* u;
  const C* h;
  const C* h2;
  const C* h3;
  const C* xi;
};

// Bits of the uniform flags of a block.
enum StepFlag : int { kUncond = 16, kHist = 8, kHist2 = 4, kHist3 = 2, kNoise = 1 };

// The arithmetic of one block, with the uniform flags as compile-time constants (no branch inside).
template <class C, int FLAGS>
DK_HOST_DEVICE void step_math(const StepRow<C>& r, int64_t n, const C* __restrict x, const C* __restrict m,
                              const C* __restrict u, const C* __restrict h, const C* __restrict h2,
                              const C* __restrict h3, const C* __restrict xi, C* __restrict out,
                              C* __restrict x0) {
  constexpr bool kU = FLAGS & kUncond, kH = FLAGS & kHist, kH2 = FLAGS & kHist2, kH3 = FLAGS & kHist3;
  constexpr bool kN = FLAGS & kNoise;
  for (int64_t j = 0; j < n; ++j) {
    sampler_step_element<C>(r, kU, kH, kH2, kH3, kN, x[j], m[j], kU ? u[j] : C(0), kH ? h[j] : C(0),
                            kH2 ? h2[j] : C(0), kH3 ? h3[j] : C(0), kN ? xi[j] : C(0), out[j], x0[j]);
  }
}

// The run-time flags to the one matching step_math instantiation (a fold over all 32, no lambda: everything
// stays always_inline, so each loop is compiled for the calling clone's ISA).
template <class C, int... K>
DK_HOST_DEVICE void step_math_dispatch(int flags, std::integer_sequence<int, K...>, const StepRow<C>& r, int64_t n,
                                       const BlockIn<C>& in, C* out, C* x0) {
  static_cast<void>(
      ((flags == K ? (step_math<C, K>(r, n, in.x, in.m, in.u, in.h, in.h2, in.h3, in.xi, out, x0), true) : false) || ...));
}

// Elements [begin, end) of the step for state dtype S and model dtype M. All inputs of a block are
// read (inputs stored as C in place, others converted into buffers) before any output is stored, so
// out may be x and history_out may be any history input.
template <class S, class M>
DK_CPU_CLONES void step_range(const StepArgs& a, const StepRow<compute_t<S>>& r, int64_t begin, int64_t end) {
  using C = compute_t<S>;
  alignas(64) C xb[kBlock], mb[kBlock], ub[kBlock], hb[kBlock], h2b[kBlock], h3b[kBlock], nb[kBlock];
  alignas(64) C ob[kBlock], db[kBlock];
  const auto* x = static_cast<const S*>(a.x);
  const auto* m = static_cast<const M*>(a.model_out);
  const auto* u = static_cast<const M*>(a.model_out_uncond);
  const auto* h = static_cast<const S*>(a.history);
  const auto* h2 = static_cast<const S*>(a.history2);
  const auto* h3 = static_cast<const S*>(a.history3);
  const auto* noise = static_cast<const S*>(a.noise);
  auto* out = static_cast<S*>(a.out);
  auto* x0 = static_cast<S*>(a.x0_out);
  auto* h_out = static_cast<S*>(a.history_out);
  for (int64_t i0 = begin; i0 < end; i0 += kBlock) {
    const int64_t n = std::min(kBlock, end - i0);
    const C* xv = load_view(x + i0, xb, n);
    const C* mv = load_view(m + i0, mb, n);
    const C* uv = u != nullptr ? load_view(u + i0, ub, n) : ub;
    const C* hv = h != nullptr ? load_view(h + i0, hb, n) : hb;
    const C* h2v = h2 != nullptr ? load_view(h2 + i0, h2b, n) : h2b;
    const C* h3v = h3 != nullptr ? load_view(h3 + i0, h3b, n) : h3b;
    const C* xi = nb;
    if (a.use_noise) {
      if (noise != nullptr) {
        xi = load_view(noise + i0, nb, n);
      } else {
        philox_normal_block(a.seed, a.num_seeds, a.per_sample, a.step, 0, i0, n, nb);
      }
    }
    const int flags = (u != nullptr ? kUncond : 0) | (h != nullptr ? kHist : 0) | (h2 != nullptr ? kHist2 : 0) |
                      (h3 != nullptr ? kHist3 : 0) | (a.use_noise ? kNoise : 0);
    step_math_dispatch<C>(flags, std::make_integer_sequence<int, 32>{}, r, n,
                          BlockIn<C>{xv, mv, uv, hv, h2v, h3v, xi}, ob, db);
    if (h_out != nullptr) {  // h_new into hb: the block's histories were read above
      for (int64_t j = 0; j < n; ++j) hb[j] = history_element(r, xv[j], db[j]);
    }
    if (a.use_bu || a.use_fu) {  // CFG++ terms, last (mv is the model output before guidance)
      const C* uu = u != nullptr ? uv : mv;
      for (int64_t j = 0; j < n; ++j) {
        C h_new = a.use_fu ? hb[j] : C(0);
        uncond_terms(r, a.use_bu, a.use_fu, xv[j], uu[j], ob[j], h_new);
        if (a.use_fu) hb[j] = h_new;
      }
    }
    if (h_out != nullptr) store_block(hb, h_out + i0, n);
    if (x0 != nullptr) store_block(db, x0 + i0, n);
    store_block(ob, out + i0, n);
  }
}

template <class S, class M>
void launch(const StepArgs& a, const double* row, int64_t numel) {
  const StepRow<compute_t<S>> r = load_step_row<compute_t<S>>(row);
  StepArgs args = a;
  if (r.c == 0) args.history = nullptr;  // a zero coefficient skips its term: the tensor is not read
  if (r.c2 == 0) args.history2 = nullptr;
  if (r.c3 == 0) args.history3 = nullptr;
  args.use_noise = r.s != 0;
  args.use_bu = r.bu != 0;
  args.use_fu = r.fu != 0 && a.history_out != nullptr;
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) { step_range<S, M>(args, r, begin, end); });
}

void sampler_step_cpu(const at::Tensor& x, const at::Tensor& model_out, const OptTensor& model_out_uncond,
                      const OptTensor& history, const OptTensor& noise, const at::Tensor& coef, int64_t step,
                      const at::Tensor& seed, const at::Tensor& out, const OptTensor& x0_out,
                      const OptTensor& history_out, const OptTensor& history2, const OptTensor& history3) {
  check_sampler_step(x, model_out, model_out_uncond, history, noise, coef, step, seed, out, x0_out, history_out,
                     history2, history3);
  TORCH_CHECK(x.device().is_cpu(), "x: expected a CPU tensor for the CPU kernel, got ", x.device());
  const int64_t numel = x.numel();
  if (numel == 0) return;
  auto ptr = [](const OptTensor& t) -> const void* { return get_if(t) ? get_if(t)->data_ptr() : nullptr; };
  StepArgs a{};
  a.x = x.data_ptr();
  a.model_out = model_out.data_ptr();
  a.model_out_uncond = ptr(model_out_uncond);
  a.history = ptr(history);
  a.history2 = ptr(history2);
  a.history3 = ptr(history3);
  a.noise = ptr(noise);
  a.out = out.data_ptr();
  a.x0_out = const_cast<void*>(ptr(x0_out));
  a.history_out = const_cast<void*>(ptr(history_out));
  a.seed = seed.data_ptr<int64_t>();
  a.num_seeds = seed.numel();
  a.per_sample = numel / a.num_seeds;
  a.step = static_cast<u32>(step);
  const double* row = coef.data_ptr<double>() + step * kNumCoef;
  with_storage(x.scalar_type(), [&](auto s) {
    with_storage(model_out.scalar_type(), [&](auto m) { launch<decltype(s), decltype(m)>(a, row, numel); });
  });
}

}  // namespace
}  // namespace dk

TORCH_LIBRARY_IMPL(diffkern, CPU, m) { m.impl("sampler_step", &dk::sampler_step_cpu); }
