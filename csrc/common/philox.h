// Counter-based normal noise: the generator specified in diffkern/ops/philox.py, written once for
// every compiled kernel (g++ for the CPU kernels, nvcc and NVRTC for the CUDA kernels).
//
//   key     = (seed_lo, seed_hi)                     the 64-bit seed
//   g, l    = idx >> 2, idx & 3                      group and lane of the 64-bit element index
//   counter = (g_lo, g_hi, step, 0)                  step = table row
//   (r0, r1, r2, r3) = Philox4x32-10(counter, key)   Salmon et al., SC'11; same rounds as cuRAND's
//                                                     Philox4_32_10 and Triton's tl.philox
//   u_k = C(int32(r_k) < 0 ? ~int32(r_k) : int32(r_k)) * C(4.6566127342e-10)      in [0, 1)
//   (ua, ub) = (u0, u1) for lanes 0, 1, (u2, u3) for lanes 2, 3
//   rho = sqrt(-2 ln max(C(1e-7), ua)), theta = C(2 pi) * ub                     Box-Muller
//   xi  = rho * cos(theta) for lanes 0, 2, rho * sin(theta) for lanes 1, 3
//
// C is the compute type: float for float16/bfloat16/float32 tensors, double for float64. Each
// constant is a double literal rounded to C, as torch rounds a Python scalar, so a backend agrees
// with the float32 reference up to the last ulp of log/cos/sin (libm vs CUDA vs Sleef).
//
// Self-contained: no torch, no standard library under NVRTC. Use:
//   dk::philox_normal<float>(seed, step, idx)           one normal (any index)
//   dk::philox_normal4<float>(seed, step, g, xi)        the four normals of group g (indices 4g .. 4g+3)
//   dk::philox4(seed, step, g, r)                       the four raw words (vectorisable on CPU)
//   dk::philox_uniform<C>(r), dk::box_muller_pair<C>    the two halves of philox_normal4
// On a GPU, philox_normal and philox_normal4 give bitwise the same values (same functions, same
// order of operations), so a kernel may take either path for any element.
#pragma once

#ifndef DK_HOST_DEVICE
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define DK_HOST_DEVICE __host__ __device__ __forceinline__
#else
// always_inline: the CPU kernels are multiversioned (target_clones); inlined helpers are compiled
// for each clone's ISA, an out-of-line call would run the baseline SSE2 code.
#define DK_HOST_DEVICE inline __attribute__((always_inline))
#endif
#endif

#if !defined(__CUDACC_RTC__)
#include <math.h>
#endif

namespace dk {

typedef unsigned int u32;        // 32 bits with g++, nvcc and NVRTC alike
typedef unsigned long long u64;  // 64 bits likewise
static_assert(sizeof(u32) == 4 && sizeof(u64) == 8, "philox.h needs 32- and 64-bit unsigned types");

// Philox4x32 constants (Salmon et al. 2011, table 2: multipliers; Weyl key increments).
constexpr u32 kPhiloxRoundA = 0xD2511F53u;
constexpr u32 kPhiloxRoundB = 0xCD9E8D57u;
constexpr u32 kPhiloxKeyA = 0x9E3779B9u;
constexpr u32 kPhiloxKeyB = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

DK_HOST_DEVICE u32 mulhi32(u32 a, u32 b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<u32>((static_cast<u64>(a) * b) >> 32);
#endif
}

// The four words of Philox4x32-10 at counter (g_lo, g_hi, step, 0) and key (seed_lo, seed_hi).
DK_HOST_DEVICE void philox4(u64 seed, u32 step, u64 group, u32 (&r)[4]) {
  u32 c0 = static_cast<u32>(group), c1 = static_cast<u32>(group >> 32), c2 = step, c3 = 0u;
  u32 k0 = static_cast<u32>(seed), k1 = static_cast<u32>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const u32 hi_b = mulhi32(kPhiloxRoundB, c2), lo_b = kPhiloxRoundB * c2;
    const u32 hi_a = mulhi32(kPhiloxRoundA, c0), lo_a = kPhiloxRoundA * c0;
    c0 = hi_b ^ c1 ^ k0;
    c1 = lo_b;
    c2 = hi_a ^ c3 ^ k1;
    c3 = lo_a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  r[0] = c0;
  r[1] = c1;
  r[2] = c2;
  r[3] = c3;
}

// A word as a uniform in [0, 1): the int32 reading folded onto [0, 2**31) (~r for negative r), scaled.
// The scale rounds below 2**-31 in float too, so u < 1 even where int -> float rounds up to 2**31.
template <class C>
DK_HOST_DEVICE C philox_uniform(u32 r) {
  const int s = static_cast<int>(r);
  const int folded = s < 0 ? ~s : s;
  return static_cast<C>(folded) * static_cast<C>(4.6566127342e-10);
}

DK_HOST_DEVICE float dk_log(float v) { return logf(v); }
DK_HOST_DEVICE double dk_log(double v) { return log(v); }
DK_HOST_DEVICE float dk_sqrt(float v) { return sqrtf(v); }
DK_HOST_DEVICE double dk_sqrt(double v) { return sqrt(v); }
// sin and cos of one angle: one range reduction on a GPU (sincosf), libm's sin and cos on a host.
DK_HOST_DEVICE void dk_sincos(float v, float& s, float& c) {
#if defined(__CUDA_ARCH__)
  sincosf(v, &s, &c);
#else
  s = sinf(v);
  c = cosf(v);
#endif
}
DK_HOST_DEVICE void dk_sincos(double v, double& s, double& c) {
#if defined(__CUDA_ARCH__)
  sincos(v, &s, &c);
#else
  s = sin(v);
  c = cos(v);
#endif
}

// Box-Muller on one pair of uniforms, in the operation order of the reference: (rho cos, rho sin).
template <class C>
DK_HOST_DEVICE void box_muller_pair(C ua, C ub, C& xi_cos, C& xi_sin) {
  const C tiny = static_cast<C>(1e-7);
  const C uac = ua < tiny ? tiny : ua;
  const C rho = dk_sqrt(static_cast<C>(-2.0) * dk_log(uac));
  C s, c;
  dk_sincos(static_cast<C>(6.283185307179586) * ub, s, c);
  xi_cos = rho * c;
  xi_sin = rho * s;
}

// The four normals of group ``group`` (indices 4*group .. 4*group + 3) at table row ``step``.
template <class C>
DK_HOST_DEVICE void philox_normal4(u64 seed, u32 step, u64 group, C (&xi)[4]) {
  u32 r[4];
  philox4(seed, step, group, r);
  box_muller_pair<C>(philox_uniform<C>(r[0]), philox_uniform<C>(r[1]), xi[0], xi[1]);
  box_muller_pair<C>(philox_uniform<C>(r[2]), philox_uniform<C>(r[3]), xi[2], xi[3]);
}

// The standard normal of element ``idx`` at table row ``step`` under ``seed``: one pair of its group.
template <class C>
DK_HOST_DEVICE C philox_normal(u64 seed, u32 step, u64 idx) {
  u32 r[4];
  philox4(seed, step, idx >> 2, r);
  const bool first = (idx & 2u) == 0;
  C xi_cos, xi_sin;
  box_muller_pair<C>(philox_uniform<C>(first ? r[0] : r[2]), philox_uniform<C>(first ? r[1] : r[3]), xi_cos,
                     xi_sin);
  return (idx & 1u) == 0 ? xi_cos : xi_sin;
}

}  // namespace dk
