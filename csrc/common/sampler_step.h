// The per-element arithmetic of diffkern::sampler_step, written once for the CPU and CUDA kernels.
// Specification: diffkern/ops/coefs.py (slots, order of operations); reference:
// sampler_step_reference in diffkern/ops/sampler_step.py. With C the compute type (float for
// float16/bfloat16/float32 state, double for float64), per element:
//
//   m     = u + w*(m - u)                   only with an unconditional output (guidance)
//   d_raw = p*x + q*m                       denoised estimate of any prediction type
//   d     = clamp(d_raw, -clip, clip)       NaN stays NaN, as torch.maximum/minimum
//   d_u   = p*x + q*u                       u = m (before guidance) without an unconditional output; unclipped
//   out   = ((a*x + b*d) + g*d_raw) [+ c*h] [+ c2*h2] [+ c3*h3] [+ s*xi] [+ bu*d_u]
//   x0    = d,   h_new = e*x + f*d [+ fu*d_u]
//
// Every product and sum is rounded separately (common/hd.h), so the CPU kernels, the CUDA kernels
// and torch's eager float32 reference round identically, on every ISA clone and thread count. h, h2 and h3
// are the previous one, two and three history values (h2: third-order multistep samplers, h3: fourth-order
// ones such as LMS and PLMS).
#pragma once

#include "hd.h"

namespace dk {

// Slots of a coefficient-table row (diffkern/ops/coefs.py); a row is kNumCoef float64 values (128 bytes;
// slot 15 is reserved and must be 0).
enum CoefSlot {
  kSlotA = 0, kSlotB, kSlotG, kSlotC, kSlotS, kSlotP, kSlotQ, kSlotW, kSlotE, kSlotF, kSlotClip, kSlotC2, kSlotC3,
  kSlotBu, kSlotFu
};
constexpr int kNumCoef = 16;

// One table row rounded to the compute type (the reference's coef[step].to(cdt)).
template <class C>
struct StepRow {
  C a, b, g, c, s, p, q, w, e, f, clip, c2, c3, bu, fu;
};

template <class C>
DK_HOST_DEVICE StepRow<C> load_step_row(const double* row) {
  StepRow<C> r;
  r.a = static_cast<C>(row[kSlotA]);
  r.b = static_cast<C>(row[kSlotB]);
  r.g = static_cast<C>(row[kSlotG]);
  r.c = static_cast<C>(row[kSlotC]);
  r.s = static_cast<C>(row[kSlotS]);
  r.p = static_cast<C>(row[kSlotP]);
  r.q = static_cast<C>(row[kSlotQ]);
  r.w = static_cast<C>(row[kSlotW]);
  r.e = static_cast<C>(row[kSlotE]);
  r.f = static_cast<C>(row[kSlotF]);
  r.clip = static_cast<C>(row[kSlotClip]);
  r.c2 = static_cast<C>(row[kSlotC2]);
  r.c3 = static_cast<C>(row[kSlotC3]);
  r.bu = static_cast<C>(row[kSlotBu]);
  r.fu = static_cast<C>(row[kSlotFu]);
  return r;
}

// clamp(v, -clip, clip) written so that a NaN v stays NaN (torch.maximum/minimum propagate it).
template <class C>
DK_HOST_DEVICE C clamp_sym(C v, C clip) {
  v = v < -clip ? -clip : v;
  return v > clip ? clip : v;
}

// One element of the fused step: out and x0 (= d). The flags are uniform over a launch: compile-time
// constants in the CPU kernels (so each loop is branch-free), a warp-uniform branch in the CUDA
// kernels. use_hist, use_hist2, use_hist3 and use_noise must be false when c, c2, c3 or s is exactly 0 (the
// term is skipped, its input is not read).
template <class C>
DK_HOST_DEVICE void sampler_step_element(const StepRow<C>& r, bool has_uncond, bool use_hist, bool use_hist2,
                                         bool use_hist3, bool use_noise, C x, C m, C u, C h, C h2, C h3, C xi,
                                         C& out, C& x0) {
  if (has_uncond) m = add_rn(u, mul_rn(r.w, sub_rn(m, u)));
  const C d_raw = add_rn(mul_rn(r.p, x), mul_rn(r.q, m));
  const C d = clamp_sym(d_raw, r.clip);
  C acc = add_rn(mul_rn(r.a, x), mul_rn(r.b, d));
  acc = add_rn(acc, mul_rn(r.g, d_raw));
  if (use_hist) acc = add_rn(acc, mul_rn(r.c, h));
  if (use_hist2) acc = add_rn(acc, mul_rn(r.c2, h2));
  if (use_hist3) acc = add_rn(acc, mul_rn(r.c3, h3));
  if (use_noise) acc = add_rn(acc, mul_rn(r.s, xi));
  out = acc;
  x0 = d;
}

// The new history h_new = e*x + f*d of one element (computed only where history_out is written).
template <class C>
DK_HOST_DEVICE C history_element(const StepRow<C>& r, C x, C d) {
  return add_rn(mul_rn(r.e, x), mul_rn(r.f, d));
}

// The CFG++ terms of one element, added last: out += bu*d_u where use_bu, h_new += fu*d_u where use_fu, with
// d_u = p*x + q*u (u: the unconditional output, or the model output before guidance without one). The flags are
// uniform over a launch and false when bu (fu) is exactly 0, so a table without them gives the same bits as before.
template <class C>
DK_HOST_DEVICE void uncond_terms(const StepRow<C>& r, bool use_bu, bool use_fu, C x, C u, C& out, C& h_new) {
  if (!use_bu && !use_fu) return;
  const C d_u = add_rn(mul_rn(r.p, x), mul_rn(r.q, u));
  if (use_bu) out = add_rn(out, mul_rn(r.bu, d_u));
  if (use_fu) h_new = add_rn(h_new, mul_rn(r.fu, d_u));
}

}  // namespace dk
