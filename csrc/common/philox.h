// Counter-based normal noise: the generator specified in diffkern/ops/philox.py, written once for
// every compiled kernel (g++ for the CPU kernels, nvcc and NVRTC for the CUDA kernels).
//
//   key     = (seed_lo, seed_hi)                     the 64-bit seed
//   counter = (idx_lo, idx_hi, step, 0)              idx = 64-bit element index, step = table row
//   (r0, r1, r2, r3) = Philox4x32-10(counter, key)   Salmon et al., SC'11; same rounds as cuRAND's
//                                                     Philox4_32_10 and Triton's tl.philox
//   u_k = C(int32(r_k) < 0 ? ~int32(r_k) : int32(r_k)) * C(4.6566127342e-10)      in [0, 1)
//   xi  = sqrt(-2 ln max(C(1e-7), u_0)) * cos(C(2 pi) * u_1)                      Box-Muller
//
// C is the compute type: float for float16/bfloat16/float32 tensors, double for float64. Each
// constant is a double literal rounded to C, as torch rounds a Python scalar, so a backend agrees
// with the float32 reference up to the last ulp of log/cos (libm vs CUDA vs Sleef).
//
// Self-contained: no torch, no standard library under NVRTC. Use:
//   dk::philox_normal<float>(seed, step, idx)           one normal
//   dk::philox_r01(seed, step, idx, r0, r1)             the two raw words (vectorisable on CPU)
//   dk::philox_uniform<C>(r), dk::box_muller<C>(u0, u1) the two halves of philox_normal
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

// Words r0, r1 of Philox4x32-10 at counter (idx_lo, idx_hi, step, 0) and key (seed_lo, seed_hi);
// r2 and r3 are never used by diffkern, so the compiler drops their last-round arithmetic.
DK_HOST_DEVICE void philox_r01(u64 seed, u32 step, u64 idx, u32& r0, u32& r1) {
  u32 c0 = static_cast<u32>(idx), c1 = static_cast<u32>(idx >> 32), c2 = step, c3 = 0u;
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
  r0 = c0;
  r1 = c1;
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
DK_HOST_DEVICE float dk_cos(float v) { return cosf(v); }
DK_HOST_DEVICE double dk_cos(double v) { return cos(v); }
DK_HOST_DEVICE float dk_sqrt(float v) { return sqrtf(v); }
DK_HOST_DEVICE double dk_sqrt(double v) { return sqrt(v); }

// Box-Muller, first output only, in the operation order of the reference.
template <class C>
DK_HOST_DEVICE C box_muller(C u0, C u1) {
  const C tiny = static_cast<C>(1e-7);
  const C u0c = u0 < tiny ? tiny : u0;
  return dk_sqrt(static_cast<C>(-2.0) * dk_log(u0c)) * dk_cos(static_cast<C>(6.283185307179586) * u1);
}

// The standard normal of element ``idx`` at table row ``step`` under ``seed``.
template <class C>
DK_HOST_DEVICE C philox_normal(u64 seed, u32 step, u64 idx) {
  u32 r0, r1;
  philox_r01(seed, step, idx, r0, r1);
  return box_muller<C>(philox_uniform<C>(r0), philox_uniform<C>(r1));
}

}  // namespace dk
