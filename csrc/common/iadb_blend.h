// The per-element arithmetic of diffkern::iadb_blend (reference: iadb_blend_reference in
// diffkern/ops/iadb.py), for the CPU and CUDA kernels. IADB's x0 is the noise, x1 the data.
#pragma once

#include "hd.h"

namespace dk {

// IADB blend (diffkern/ops/iadb.py): out = (1 - alpha)*x0 + alpha*x1 and target = x1 - x0.
template <class C>
DK_HOST_DEVICE void iadb_blend_element(C alpha, C x0, C x1, C& out, C& target) {
  out = add_rn(mul_rn(sub_rn(static_cast<C>(1), alpha), x0), mul_rn(alpha, x1));
  target = sub_rn(x1, x0);
}

}  // namespace dk
