// The noise of a pack of V consecutive flat elements on a GPU, shared by the sampler_step and
// philox_normal kernels. Element i of a sample-major layout has stream index offset + (i mod
// per_sample) under key seed[i / per_sample] (one stream: num_seeds == 1, per_sample = numel).
#pragma once

#include "common/philox.h"

namespace dk {
namespace gpu {

// Normals of flat elements i .. i + V - 1, i a multiple of V. One Philox call gives the four normals
// of a group (indices 4g .. 4g + 3): a pack of whole groups draws them together, a quarter of the
// Philox rounds and half the log/sincos of the per-element path (sm_90 SASS of the float32 step:
// 91 instructions per element against 186). The groups are whole when V % 4 == 0, offset % 4 == 0
// and there is one stream or per_sample % 4 == 0; the test is uniform over a launch (no divergence).
// Other shapes draw per element: right for any index and bitwise the same values.
template <class C, int V>
__device__ __forceinline__ void philox_pack(const long long* seed, long long num_seeds, long long per_sample,
                                            long long offset, long long step, long long i, C (&xi)[V]) {
  long long sample = num_seeds == 1 ? 0 : i / per_sample;
  long long idx = i - sample * per_sample;
  const u32 row = static_cast<u32>(step);
  if constexpr (V % 4 == 0) {
    if (offset % 4 == 0 && (num_seeds == 1 || per_sample % 4 == 0)) {
#pragma unroll
      for (int k = 0; k < V; k += 4) {
        if (idx == per_sample) {  // the second group of a V = 8 pack may start the next sample
          ++sample;
          idx = 0;
        }
        C g[4];
        philox_normal4<C>(static_cast<u64>(seed[sample]), row, static_cast<u64>(offset + idx) >> 2, g);
#pragma unroll
        for (int l = 0; l < 4; ++l) xi[k + l] = g[l];
        idx += 4;
      }
      return;
    }
  }
#pragma unroll
  for (int k = 0; k < V; ++k) {
    if (idx == per_sample) {  // crossed into the next sample
      ++sample;
      idx = 0;
    }
    xi[k] = philox_normal<C>(static_cast<u64>(seed[sample]), row, static_cast<u64>(offset + idx));
    ++idx;
  }
}

}  // namespace gpu
}  // namespace dk
