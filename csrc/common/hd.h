// Shared by the compiled kernels: the host/device qualifier and arithmetic that is never contracted.
//
// The kernels round every product and sum separately, in the reference's order: the CPU build passes
// -ffp-contract=off (setup.py) and device code uses the _rn intrinsics, which nvcc never fuses into
// an FMA. So CPU kernels, CUDA kernels and torch's eager reference round alike on every ISA clone.
#pragma once

#ifndef DK_HOST_DEVICE
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define DK_HOST_DEVICE __host__ __device__ __forceinline__
#else
// always_inline: the CPU kernels are multiversioned (target_clones), and an inlined helper is
// compiled for each clone's ISA.
#define DK_HOST_DEVICE inline __attribute__((always_inline))
#endif
#endif

namespace dk {

DK_HOST_DEVICE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
DK_HOST_DEVICE double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
DK_HOST_DEVICE float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
DK_HOST_DEVICE double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
DK_HOST_DEVICE float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
DK_HOST_DEVICE double sub_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}

}  // namespace dk
