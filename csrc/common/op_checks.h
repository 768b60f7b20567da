// Argument checks shared by the CPU and CUDA bindings of the diffkern ops (host only, needs torch).
//
// The ops can be called directly through torch.ops.diffkern.*, bypassing the Python front-ends, so
// each binding validates everything before touching memory: a failed check has written nothing,
// and every message names the argument and what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "sampler_step.h"

namespace dk {

using OptTensor = std::optional<at::Tensor>;

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

inline const at::Tensor* get_if(const OptTensor& t) { return t.has_value() && t->defined() ? &*t : nullptr; }

// A floating tensor (float16/bfloat16/float32/float64), contiguous, on ``device``.
inline void check_float_contiguous(const at::Tensor& t, const char* name, const at::Device& device,
                                   const char* device_of) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor, got an undefined tensor");
  TORCH_CHECK(is_float_dtype(t.scalar_type()), name,
              ": expected dtype float16, bfloat16, float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.device() == device, name, ": expected device ", device, " (that of ", device_of, "), got ",
              t.device());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor, got sizes ", t.sizes(), " and strides ",
              t.strides());
}

// ``t`` must be a contiguous tensor with the shape of ``ref`` on its device (and its dtype if asked).
inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name,
                       bool same_dtype = true) {
  check_float_contiguous(t, name, ref.device(), ref_name);
  TORCH_CHECK(t.sizes() == ref.sizes(), name, ": expected shape ", ref.sizes(), " (that of ", ref_name, "), got ",
              t.sizes());
  TORCH_CHECK(!same_dtype || t.scalar_type() == ref.scalar_type(), name, ": expected dtype ", ref.scalar_type(),
              " (that of ", ref_name, "), got ", t.scalar_type());
}

// int64 seed with 1 element (one stream) or ``batch`` elements (one stream per sample).
inline void check_seed(const at::Tensor& seed, int64_t batch, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(seed.defined(), "seed: expected a tensor, got an undefined tensor");
  TORCH_CHECK(seed.scalar_type() == at::kLong, "seed: expected dtype int64, got ", seed.scalar_type());
  TORCH_CHECK(seed.device() == ref.device(), "seed: expected device ", ref.device(), " (that of ", ref_name,
              "), got ", seed.device());
  TORCH_CHECK(seed.is_contiguous(), "seed: expected a contiguous tensor");
  TORCH_CHECK(seed.numel() == 1 || (seed.dim() == 1 && seed.numel() == batch),
              "seed: expected shape (1,) or (B,) with B = ", ref_name, ".shape[0] = ", batch, ", got ",
              seed.sizes());
}

// The batch size B of a (B, ...) tensor; a 0-d tensor is one sample.
inline int64_t batch_of(const at::Tensor& t) { return t.dim() > 0 ? t.size(0) : 1; }

using Named = std::pair<const char*, const at::Tensor*>;

inline bool bytes_overlap(const at::Tensor& a, const at::Tensor& b) {
  const auto* pa = static_cast<const char*>(a.data_ptr());
  const auto* pb = static_cast<const char*>(b.data_ptr());
  return pa < pb + b.nbytes() && pb < pa + a.nbytes();
}

// Outputs may be exactly an input (same memory, shape and dtype: in-place use, correct because every
// element is read before it is written) but may not overlap an input otherwise, nor each other, nor at
// all a ``shared`` input: one that many elements read (a table, seeds, per-sample matrices), which a
// parallel kernel writing the output would change under other readers.
// All tensors are contiguous here, so each is one byte range.
inline void check_overlap(const std::vector<Named>& outputs, const std::vector<Named>& inputs,
                          const std::vector<Named>& shared = {}) {
  for (size_t i = 0; i < outputs.size(); ++i) {
    const auto& [oname, o] = outputs[i];
    if (o == nullptr || o->numel() == 0) continue;
    for (const auto& [sname, t] : shared) {
      TORCH_CHECK(t == nullptr || t->numel() == 0 || !bytes_overlap(*o, *t), oname, ": overlaps ", sname,
                  ", which every element reads; pass an output of its own");
    }
    for (const auto& [iname, t] : inputs) {
      if (t == nullptr || t->numel() == 0 || !bytes_overlap(*o, *t)) continue;
      const bool same = o->data_ptr() == t->data_ptr() && o->nbytes() == t->nbytes() &&
                        o->scalar_type() == t->scalar_type();
      TORCH_CHECK(same, oname, ": overlaps ", iname,
                  " without being the same tensor; only exact in-place use is allowed");
    }
    for (size_t k = i + 1; k < outputs.size(); ++k) {
      const auto& [kname, other] = outputs[k];
      if (other == nullptr || other->numel() == 0) continue;
      TORCH_CHECK(!bytes_overlap(*o, *other), oname, ": overlaps ", kname, "; outputs must be distinct");
    }
  }
}

// Checks of diffkern::sampler_step shared by the CPU and CUDA bindings. history2 and history3 are the schema's
// last arguments (appended, so positional callers written before them keep working).
inline void check_sampler_step(const at::Tensor& x, const at::Tensor& model_out, const OptTensor& model_out_uncond,
                               const OptTensor& history, const OptTensor& noise, const at::Tensor& coef,
                               int64_t step, const at::Tensor& seed, const at::Tensor& out,
                               const OptTensor& x0_out, const OptTensor& history_out,
                               const OptTensor& history2 = std::nullopt,
                               const OptTensor& history3 = std::nullopt) {
  TORCH_CHECK(x.defined(), "x: expected a tensor, got an undefined tensor");
  check_float_contiguous(x, "x", x.device(), "x");
  check_like(model_out, "model_out", x, "x", /*same_dtype=*/false);
  if (auto* u = get_if(model_out_uncond)) check_like(*u, "model_out_uncond", model_out, "model_out");
  const std::pair<const char*, const OptTensor*> like_x[] = {
      {"history", &history}, {"history2", &history2}, {"history3", &history3}, {"noise", &noise},
      {"x0_out", &x0_out}, {"history_out", &history_out}};
  for (const auto& [name, t] : like_x) {
    if (auto* p = get_if(*t)) check_like(*p, name, x, "x");
  }
  check_like(out, "out", x, "x");
  TORCH_CHECK(coef.defined() && coef.scalar_type() == at::kDouble, "coef: expected dtype float64, got ",
              coef.defined() ? c10::toString(coef.scalar_type()) : "an undefined tensor");
  TORCH_CHECK(coef.dim() == 2 && coef.size(1) == kNumCoef, "coef: expected shape (N, ", kNumCoef, "), got ",
              coef.sizes());
  TORCH_CHECK(coef.device() == x.device(), "coef: expected device ", x.device(), " (that of x), got ",
              coef.device());
  TORCH_CHECK(coef.is_contiguous(), "coef: expected a contiguous tensor");
  TORCH_CHECK(step >= 0 && step < coef.size(0), "step: ", step, " is out of range for a coefficient table of ",
              coef.size(0), " rows");
  TORCH_CHECK(step < (int64_t{1} << 32), "step: expected < 2**32 (the Philox step counter), got ", step);
  check_seed(seed, batch_of(x), x, "x");
  check_overlap({{"out", &out}, {"x0_out", get_if(x0_out)}, {"history_out", get_if(history_out)}},
                {{"x", &x}, {"model_out", &model_out}, {"model_out_uncond", get_if(model_out_uncond)},
                 {"history", get_if(history)}, {"history2", get_if(history2)}, {"history3", get_if(history3)},
                 {"noise", get_if(noise)}},
                {{"coef", &coef}, {"seed", &seed}});
}

// Checks of diffkern::iadb_blend shared by the CPU and CUDA bindings.
inline void check_iadb_blend(const at::Tensor& x0, const at::Tensor& x1, const at::Tensor& alpha,
                             const at::Tensor& out, const OptTensor& target_out) {
  TORCH_CHECK(x0.defined(), "x0: expected a tensor, got an undefined tensor");
  check_float_contiguous(x0, "x0", x0.device(), "x0");
  TORCH_CHECK(x0.dim() >= 1, "x0: expected a batched tensor (B, ...), got a 0-d tensor");
  check_like(x1, "x1", x0, "x0");
  check_float_contiguous(alpha, "alpha", x0.device(), "x0");
  TORCH_CHECK(alpha.dim() == 1 && alpha.size(0) == x0.size(0), "alpha: expected shape (", x0.size(0),
              ",) (one per sample of x0), got ", alpha.sizes());
  check_like(out, "out", x0, "x0");
  if (auto* t = get_if(target_out)) check_like(*t, "target_out", x0, "x0");
  check_overlap({{"out", &out}, {"target_out", get_if(target_out)}},
                {{"x0", &x0}, {"x1", &x1}, {"alpha", &alpha}});
}

// Checks of diffkern::philox_normal shared by the CPU and CUDA bindings.
inline void check_philox_normal(const at::Tensor& seed, int64_t step, int64_t offset, const at::Tensor& out) {
  TORCH_CHECK(out.defined(), "out: expected a tensor, got an undefined tensor");
  check_float_contiguous(out, "out", out.device(), "out");
  check_seed(seed, batch_of(out), out, "out");
  TORCH_CHECK(step >= 0 && step < (int64_t{1} << 32), "step: expected 0 <= step < 2**32, got ", step);
  const int64_t last = INT64_MAX - std::max<int64_t>(out.numel(), 1);  // offset + numel - 1 < 2**63 - 1
  TORCH_CHECK(offset >= 0 && offset <= last, "offset: expected 0 <= offset < 2**63 - numel, got ", offset);
  check_overlap({{"out", &out}}, {}, {{"seed", &seed}});
}

}  // namespace dk
