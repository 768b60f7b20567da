// Building blocks of the C++ CPU kernels (host only): storage types and the dtype dispatch,
// branch-free conversions, block loads/stores, and the function-multiversioning attribute.
//
// The CPU kernels work in blocks of kBlock elements: every input of a block is converted into an
// L1-resident array of the compute type C, one branch-free loop does the arithmetic, the results are
// converted back and stored. Each loop is simple enough for gcc to vectorise, whatever the mix of
// storage dtypes, and an output may be exactly an input (in-place) because a block's inputs are all
// read before any of its outputs is written.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "hd.h"

// The build has no -march flag (one binary for every x86-64 machine), so the hot loops are compiled
// for x86-64-v4 (AVX-512), x86-64-v3 (AVX2) and the SSE2 baseline, and the loader picks the best
// clone (GNU ifunc). Written and measured with gcc 12; other compilers build the baseline only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && \
    !defined(DIFFKERN_NO_TARGET_CLONES)
#define DK_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DK_CPU_CLONES
#endif

namespace dk {

constexpr int64_t kBlock = 256;  // elements per block: 8 float64 buffers of a block fit in 16 KiB of L1

struct half_t {  // storage of torch.float16 (IEEE binary16)
  uint16_t bits;
};
struct bf16_t {  // storage of torch.bfloat16
  uint16_t bits;
};

template <class S>
struct ComputeOf {  // math in float32, float64 for float64 storage
  using type = float;
};
template <>
struct ComputeOf<double> {
  using type = double;
};
template <class S>
using compute_t = typename ComputeOf<S>::type;

DK_HOST_DEVICE float float_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

DK_HOST_DEVICE uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// cond ? a : b as bit operations. gcc keeps a plain ?: between floating-point results as a branch
// (-ftrapping-math forbids evaluating both sides), and a branch stops the vectoriser.
DK_HOST_DEVICE uint32_t select_bits(bool cond, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(cond);
  return (a & mask) | (b & ~mask);
}

// float16 -> float32, exact. Branch-free: c10::Half's converter keeps a branch and gcc 12 does not
// vectorise _Float16 conversions, either would leave the loop scalar.
DK_HOST_DEVICE float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu;
  const uint32_t mantissa = h & 0x3FFu;
  const uint32_t normal = ((exponent + 112u) << 23) | (mantissa << 13);  // rebias 15 -> 127
  const uint32_t special = 0x7F800000u | (mantissa << 13);                // inf, NaN (payload kept)
  const uint32_t subnormal = float_bits(static_cast<float>(static_cast<int32_t>(mantissa)) * 0x1p-24f);
  const uint32_t nonzero_exponent = select_bits(exponent == 31, special, normal);
  const uint32_t magnitude = select_bits(exponent == 0, subnormal, nonzero_exponent);
  return float_from_bits(sign | magnitude);
}

// float32 -> float16, round to nearest even (as torch's .to(torch.float16)); NaN -> 0x7E00.
DK_HOST_DEVICE uint16_t float_to_half(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t magnitude = u & 0x7FFFFFFFu;
  // Normal results: rebias the exponent (127 -> 15) and round away the 13 low mantissa bits to
  // nearest even; a carry moves into the exponent, and from 65520 up the result reaches or passes
  // 0x7C00 (inf) and is capped there. Wraps for tiny inputs, which take the subnormal path.
  const uint32_t rebiased = magnitude - 0x38000000u;
  uint32_t normal = (rebiased + 0xFFFu + ((rebiased >> 13) & 1u)) >> 13;
  normal = normal < 0x7C00u ? normal : 0x7C00u;
  // Results below 2**-14: the float32 sum |f| + 0.5 rounds |f| to the 2**-24 grid of float16
  // subnormals (the ulp of 0.5 is 2**-24), to nearest even; its low mantissa bits are the payload.
  const uint32_t subnormal = float_bits(float_from_bits(magnitude) + 0.5f) - 0x3F000000u;
  const uint32_t finite = select_bits(magnitude < 0x38800000u, subnormal, normal);
  const uint32_t h = select_bits(magnitude > 0x7F800000u, 0x7E00u, finite);
  return static_cast<uint16_t>(sign | h);
}

DK_HOST_DEVICE float bf16_to_float(uint16_t b) { return float_from_bits(static_cast<uint32_t>(b) << 16); }

// float32 -> bfloat16, round to nearest even (as torch's .to(torch.bfloat16)); NaN -> 0x7FC0.
DK_HOST_DEVICE uint16_t float_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
}

// Storage -> compute type.
template <class C>
DK_HOST_DEVICE C to_compute(float v) {
  return static_cast<C>(v);
}
template <class C>
DK_HOST_DEVICE C to_compute(double v) {
  return static_cast<C>(v);
}
template <class C>
DK_HOST_DEVICE C to_compute(half_t v) {
  return static_cast<C>(half_to_float(v.bits));
}
template <class C>
DK_HOST_DEVICE C to_compute(bf16_t v) {
  return static_cast<C>(bf16_to_float(v.bits));
}

// Compute type -> storage (the compute type is float for every storage but double).
DK_HOST_DEVICE void from_compute(float v, float& dst) { dst = v; }
DK_HOST_DEVICE void from_compute(double v, double& dst) { dst = v; }
DK_HOST_DEVICE void from_compute(float v, half_t& dst) { dst.bits = float_to_half(v); }
DK_HOST_DEVICE void from_compute(float v, bf16_t& dst) { dst.bits = float_to_bf16(v); }

template <class C, class T>
DK_HOST_DEVICE void load_block_generic(const T* __restrict src, C* __restrict dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = to_compute<C>(src[j]);
}

template <class C, class T>
DK_HOST_DEVICE void store_block_generic(const C* __restrict src, T* __restrict dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) from_compute(src[j], dst[j]);
}

#if defined(__x86_64__) && defined(__GNUC__)
#define DK_HALF_F16C 1

// float16 <-> float32 with the F16C instructions (vcvtph2ps / vcvtps2ph, round to nearest even, as
// torch's own vectorised conversions): a float16 DDIM step takes 1.2 ns/element on one thread, 3.6
// with the bit-level conversions above, which remain for CPUs without F16C and for the tails.
__attribute__((target("avx2,f16c"))) inline void load_half_f16c(const half_t* __restrict src,
                                                                  float* __restrict dst, int64_t n) {
  const int64_t n8 = n - n % 8;
  for (int64_t j = 0; j < n8; j += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j));
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(h));
  }
  load_block_generic(src + n8, dst + n8, n - n8);
}

__attribute__((target("avx2,f16c"))) inline void store_half_f16c(const float* __restrict src,
                                                                   half_t* __restrict dst, int64_t n) {
  const int64_t n8 = n - n % 8;
  for (int64_t j = 0; j < n8; j += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j), h);
  }
  store_block_generic(src + n8, dst + n8, n - n8);
}

inline bool cpu_has_f16c() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return has;
}
#endif

// Block loads and stores between storage and compute type (n <= kBlock in the kernels, any n here).
template <class C, class T>
DK_HOST_DEVICE void load_block(const T* __restrict src, C* __restrict dst, int64_t n) {
#ifdef DK_HALF_F16C
  if constexpr (std::is_same_v<T, half_t> && std::is_same_v<C, float>) {
    if (cpu_has_f16c()) return load_half_f16c(src, dst, n);
  }
#endif
  load_block_generic(src, dst, n);
}

template <class C, class T>
DK_HOST_DEVICE void store_block(const C* __restrict src, T* __restrict dst, int64_t n) {
#ifdef DK_HALF_F16C
  if constexpr (std::is_same_v<T, half_t> && std::is_same_v<C, float>) {
    if (cpu_has_f16c()) return store_half_f16c(src, dst, n);
  }
#endif
  store_block_generic(src, dst, n);
}

// The block [src, src + n) in the compute type: src itself when it is stored as C (no copy), else
// converted into buf.
template <class C, class T>
DK_HOST_DEVICE const C* load_view(const T* src, C* __restrict buf, int64_t n) {
  if constexpr (std::is_same_v<T, C>) {
    return src;
  } else {
    load_block(src, buf, n);
    return buf;
  }
}

// Calls f with a value of the storage type of dtype t (a floating dtype, checked by the caller).
template <class F>
void with_storage(c10::ScalarType t, F&& f) {
  switch (t) {
    case c10::ScalarType::Half: return f(half_t{});
    case c10::ScalarType::BFloat16: return f(bf16_t{});
    case c10::ScalarType::Float: return f(float{});
    default: return f(double{});
  }
}

}  // namespace dk
