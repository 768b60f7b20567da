// The counter-based normal stream (common/philox.h) over a block of flat elements, for the CPU
// kernels (host only): sampler_step's noise, philox_normal and the HOLD ops draw it through
// philox_normal_block / philox_normal_run.
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "cpu_utils.h"
#include "philox.h"

namespace dk {

// log(u) for u in [1e-7, 1], float, branch-free so that gcc vectorises it (libm's logf is a call
// per element). u = 2**e * m with m in [sqrt(1/2), sqrt(2)), f = m - 1, s = f/(2 + f), and
// log(1 + f) = f - (f*f/2 - s*(f*f/2 + R)) with R = 2z/3 + 2z^2/5 + 2z^3/7 + 2z^4/9, z = s*s (the
// atanh series; |s| <= 0.172, so the next term is below 2**-28 relative). e*ln2 is split in two,
// the high part exact for |e| <= 255. Measured over every float in [1e-7, 1): at most 0.86 ulp.
DK_HOST_DEVICE float log_unit(float u) {
  const uint32_t bits = float_bits(u);
  const bool fold = (bits & 0x007FFFFFu) > 0x003504F3u;  // mantissa of sqrt(2)
  const uint32_t m_bits = (bits & 0x007FFFFFu) | select_bits(fold, 0x3F000000u, 0x3F800000u);
  const float e = static_cast<float>(static_cast<int32_t>(bits >> 23) - 127 + static_cast<int32_t>(fold));
  const float f = float_from_bits(m_bits) - 1.0f;
  const float s = f / (2.0f + f);
  const float z = s * s;
  const float r = z * (0.6666666666666666f + z * (0.4f + z * (0.2857142857142857f + z * 0.2222222222222222f)));
  const float hfsq = 0.5f * f * f;
  const float ln2_hi = 0.693145751953125f;      // 45426 / 2**16: 16 significant bits
  const float ln2_lo = 1.4286068202862268e-06f;  // ln 2 - ln2_hi
  return e * ln2_hi - ((hfsq - (s * (hfsq + r) + e * ln2_lo)) - f);
}

// sin(v) and cos(v) for v in [0, 2 pi + 1e-6], float, branch-free: v = k*pi/2 + r with k = round(2v/pi)
// in 0..4 (pi/2 in two parts, the high part exact times k) and |r| <= pi/4, then the Taylor polynomials
// of sin and cos to r^9 and r^10 (truncation below 2**-25); quadrant q = k mod 4 picks and signs them:
// cos v = (cos r, -sin r, -cos r, sin r)[q], sin v = (sin r, cos r, -sin r, -cos r)[q].
// Measured over every float in [0, 2 pi]: absolute error at most 9.4e-8 (1.6 ulp of 1) for cos.
DK_HOST_DEVICE void sincos_turn(float v, float& sin_v, float& cos_v) {
  const int32_t k = static_cast<int32_t>(v * 0.6366197723675814f + 0.5f);
  const float kf = static_cast<float>(k);
  const float r = (v - kf * 1.57080078125f) + kf * 4.454455103442001e-06f;  // pi/2 = 1.57080078125 - 4.45e-6
  const float z = r * r;
  const float sin_r = r + r * z * (-0.16666666666666666f + z * (0.008333333333333333f +
                                   z * (-0.0001984126984126984f + z * 2.7557319223985893e-06f)));
  const float cos_r = 1.0f - 0.5f * z + z * z * (0.041666666666666664f + z * (-0.001388888888888889f +
                                   z * (2.48015873015873e-05f + z * -2.755731922398589e-07f)));
  const uint32_t q = static_cast<uint32_t>(k) & 3u;
  const bool odd = (q & 1u) != 0;
  const uint32_t cos_picked = select_bits(odd, float_bits(sin_r), float_bits(cos_r));
  const uint32_t sin_picked = select_bits(odd, float_bits(cos_r), float_bits(sin_r));
  cos_v = float_from_bits(cos_picked ^ (((q + 1u) & 2u) << 30));  // q = 1, 2: negative
  sin_v = float_from_bits(sin_picked ^ ((q & 2u) << 30));          // q = 2, 3: negative
}

// Box-Muller pairs of philox.h in float with the vectorisable log, sin and cos above; the operations
// outside them, and so their roundings, are those of box_muller_pair<float>. Measured on 2e7 uniform
// pairs: at most 1.3e-6 from the float64 evaluation of the same uniforms (|xi| < 5.7).
DK_HOST_DEVICE void box_muller_pair_cpu(float ua, float ub, float& xi_cos, float& xi_sin) {
  const float tiny = static_cast<float>(1e-7);
  // max(tiny, ua) as a bit select: with ?: gcc duplicates log_unit into a branch per case.
  const float uac = float_from_bits(select_bits(ua < tiny, float_bits(tiny), float_bits(ua)));
  const float rho = dk_sqrt(-2.0f * log_unit(uac));
  float s, c;
  sincos_turn(static_cast<float>(6.283185307179586) * ub, s, c);
  xi_cos = rho * c;
  xi_sin = rho * s;
}
DK_HOST_DEVICE void box_muller_pair_cpu(double ua, double ub, double& xi_cos, double& xi_sin) {
  box_muller_pair<double>(ua, ub, xi_cos, xi_sin);
}

// Groups of at most kBlock / 4 + 2 cover any run of kBlock indices (a run may start mid-group).
constexpr int64_t kMaxGroups = kBlock / 4 + 2;

// The uniforms of the four words of groups g0 .. g0 + m - 1 under one key, as two arrays of pairs:
// ua[2j + k], ub[2j + k] = pair k of group g0 + j ((u0, u1) for k = 0, (u2, u3) for k = 1). Portable:
// gcc vectorises this loop, but it widens each 32x32-bit product through shuffles.
template <class C>
DK_HOST_DEVICE void philox_pairs_generic(u64 seed, u32 step, u64 g0, int64_t m, C* __restrict ua,
                                         C* __restrict ub) {
  for (int64_t j = 0; j < m; ++j) {
    u32 r[4];
    philox4(seed, step, g0 + static_cast<u64>(j), r);
    ua[2 * j] = philox_uniform<C>(r[0]);
    ub[2 * j] = philox_uniform<C>(r[1]);
    ua[2 * j + 1] = philox_uniform<C>(r[2]);
    ub[2 * j + 1] = philox_uniform<C>(r[3]);
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define DK_PHILOX_AVX2 1

// The same words with AVX2 intrinsics, eight counters per vector: the even and odd 32-bit lanes are
// multiplied separately (vpmuludq) and blended back, no shuffles (the generic loop, vectorised by gcc,
// took 1.8x the time per counter). float only (double: the generic loop).
__attribute__((target("avx2"))) inline void philox_mulhilo8(__m256i c, __m256i mult, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(c, mult);                        // lanes 0, 2, 4, 6 as 64 bits
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(c, 32), mult);  // lanes 1, 3, 5, 7
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

__attribute__((target("avx2"))) inline __m256 philox_uniform8(__m256i r) {
  const __m256i folded = _mm256_xor_si256(r, _mm256_srai_epi32(r, 31));  // ~r for negative int32(r)
  return _mm256_mul_ps(_mm256_cvtepi32_ps(folded), _mm256_set1_ps(static_cast<float>(4.6566127342e-10)));
}

// Stores pair 0 (words a0, a1) and pair 1 (words a2, a3) of 8 groups interleaved as ua/ub[2j + k].
__attribute__((target("avx2"))) inline void store_pairs8(__m256 w0, __m256 w2, float* __restrict dst) {
  const __m256 lo = _mm256_unpacklo_ps(w0, w2);  // groups 0 1 | 4 5, pair-interleaved
  const __m256 hi = _mm256_unpackhi_ps(w0, w2);  // groups 2 3 | 6 7
  _mm256_storeu_ps(dst, _mm256_permute2f128_ps(lo, hi, 0x20));       // groups 0 1 2 3
  _mm256_storeu_ps(dst + 8, _mm256_permute2f128_ps(lo, hi, 0x31));   // groups 4 5 6 7
}

__attribute__((target("avx2"))) inline void philox_pairs_avx2(u64 seed, u32 step, u64 g0, int64_t m,
                                                               float* __restrict ua, float* __restrict ub) {
  const __m256i mult_a = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundA));
  const __m256i mult_b = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundB));
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const int64_t m8 = m - m % 8;
  for (int64_t j = 0; j < m8; j += 8) {
    const u64 base = g0 + static_cast<u64>(j);
    const __m256i base_lo = _mm256_set1_epi32(static_cast<int>(static_cast<u32>(base)));
    __m256i c0 = _mm256_add_epi32(base_lo, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    // A lane whose low word wrapped past 2**32 carries into the high word (unsigned c0 < base_lo).
    const __m256i wrapped = _mm256_cmpgt_epi32(_mm256_xor_si256(base_lo, sign), _mm256_xor_si256(c0, sign));
    __m256i c1 = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<u32>(base >> 32))), wrapped);
    __m256i c2 = _mm256_set1_epi32(static_cast<int>(step));
    __m256i c3 = _mm256_setzero_si256();
    u32 k0 = static_cast<u32>(seed), k1 = static_cast<u32>(seed >> 32);
    for (int round = 0; round < kPhiloxRounds; ++round) {
      __m256i hi_b, lo_b, hi_a, lo_a;
      philox_mulhilo8(c2, mult_b, hi_b, lo_b);
      philox_mulhilo8(c0, mult_a, hi_a, lo_a);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      c1 = lo_b;
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c3 = lo_a;
      k0 += kPhiloxKeyA;
      k1 += kPhiloxKeyB;
    }
    store_pairs8(philox_uniform8(c0), philox_uniform8(c2), ua + 2 * j);
    store_pairs8(philox_uniform8(c1), philox_uniform8(c3), ub + 2 * j);
  }
  philox_pairs_generic(seed, step, g0 + static_cast<u64>(m8), m - m8, ua + 2 * m8, ub + 2 * m8);
}

inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
#endif

DK_HOST_DEVICE void philox_pairs(u64 seed, u32 step, u64 g0, int64_t m, float* ua, float* ub) {
#ifdef DK_PHILOX_AVX2
  if (cpu_has_avx2()) return philox_pairs_avx2(seed, step, g0, m, ua, ub);
#endif
  philox_pairs_generic(seed, step, g0, m, ua, ub);
}
DK_HOST_DEVICE void philox_pairs(u64 seed, u32 step, u64 g0, int64_t m, double* ua, double* ub) {
  philox_pairs_generic(seed, step, g0, m, ua, ub);
}

// Normals of indices idx0 .. idx0 + n - 1 (n <= kBlock) under one key: the whole groups that cover them
// (one Philox call per four normals), then the run's slice. float: words in AVX2 (where present),
// Box-Muller vectorised by the compiler; double: libm's log, sin and cos.
template <class C>
DK_HOST_DEVICE void philox_normal_run(u64 seed, u32 step, u64 idx0, int64_t n, C* __restrict xi) {
  if (n <= 0) return;
  alignas(64) C ua[2 * kMaxGroups];
  alignas(64) C ub[2 * kMaxGroups];
  alignas(64) C all[4 * kMaxGroups];
  const u64 g0 = idx0 >> 2;
  const int64_t skip = static_cast<int64_t>(idx0 & 3u);
  const int64_t m = (skip + n + 3) / 4;
  philox_pairs(seed, step, g0, m, ua, ub);
  for (int64_t p = 0; p < 2 * m; ++p) box_muller_pair_cpu(ua[p], ub[p], all[2 * p], all[2 * p + 1]);
  for (int64_t j = 0; j < n; ++j) xi[j] = all[skip + j];
}

// Normals of flat elements [i0, i0 + n) (n <= kBlock) into xi. One stream (num_seeds == 1): element
// i has index offset + i under seed[0]. Per-sample streams: index offset + i % per_sample under
// seed[i / per_sample], so a block is cut into runs of one sample each.
template <class C>
DK_HOST_DEVICE void philox_normal_block(const int64_t* seed, int64_t num_seeds, int64_t per_sample, u32 step,
                                        u64 offset, int64_t i0, int64_t n, C* __restrict xi) {
  if (num_seeds == 1) {
    philox_normal_run<C>(static_cast<u64>(seed[0]), step, offset + static_cast<u64>(i0), n, xi);
    return;
  }
  for (int64_t j = 0; j < n;) {
    const int64_t sample = (i0 + j) / per_sample;
    const int64_t idx = i0 + j - sample * per_sample;
    const int64_t len = std::min(n - j, per_sample - idx);
    philox_normal_run<C>(static_cast<u64>(seed[sample]), step, offset + static_cast<u64>(idx), len, xi + j);
    j += len;
  }
}

}  // namespace dk
