// Host emulation of the CUDA kernels of csrc/cuda (tests/test_cuda_emulation.py builds it with g++).
//
// The kernel files are included as they are, compiled as NVRTC sees them (__CUDACC_RTC__: kernels only, no
// launchers), with the CUDA keywords mapped to host C++: a block runs as kThreads host threads meeting at a
// std::barrier for __syncthreads (a __shared__ variable is a function-local static, blocks run one after
// another), blockIdx/threadIdx are thread_local. The half/bfloat16 types and conversions are the CUDA
// headers' own host implementations, and the shared per-element code (csrc/common) takes its host path
// (libm log/sin/cos), so the emulation runs each kernel's indexing, packing, tails, sample crossings and
// in-place order exactly, on any element count and any (possibly misaligned) host pointer. Built with
// -fsanitize=alignment: a packed (16-byte) access through a misaligned pointer is reported on stderr, as a
// GPU would fault with "misaligned address".
#include <math.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

struct EmuDim {
  unsigned x = 0, y = 0, z = 0;
};
thread_local EmuDim threadIdx, blockIdx;
EmuDim blockDim{1, 1, 1}, gridDim{1, 1, 1};
static std::barrier<>* emu_barrier = nullptr;

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(n)
#define __syncthreads() emu_barrier->arrive_and_wait()
#define __ldg(p) (*(p))
#define DK_HOST_DEVICE inline
#define __CUDACC_RTC__ 1

#include "cuda/hold.cu"
#include "cuda/iadb_blend.cu"
#include "cuda/philox_normal.cu"
#include "cuda/sampler_step.cu"

namespace {

using namespace dk;
using namespace dk::gpu;

// A launch of ``grid`` blocks of kThreads threads. ``barrier``: the kernel calls __syncthreads, so each
// block's threads run concurrently; otherwise they run one after another (a valid schedule of a kernel
// without barriers, and far cheaper).
template <class K>
void emu_launch(unsigned grid, bool barrier, K kernel) {
  gridDim = EmuDim{grid, 1, 1};
  blockDim = EmuDim{static_cast<unsigned>(kThreads), 1, 1};
  for (unsigned b = 0; b < grid; ++b) {
    if (!barrier) {
      blockIdx = EmuDim{b, 0, 0};
      for (unsigned t = 0; t < blockDim.x; ++t) {
        threadIdx = EmuDim{t, 0, 0};
        kernel();
      }
      continue;
    }
    std::barrier<> bar(blockDim.x);
    emu_barrier = &bar;
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < blockDim.x; ++t) {
      threads.emplace_back([&kernel, b, t] {
        blockIdx = EmuDim{b, 0, 0};
        threadIdx = EmuDim{t, 0, 0};
        kernel();
      });
    }
    for (auto& th : threads) th.join();
    emu_barrier = nullptr;
  }
}

// Calls f with a value of the storage type of dk::gpu::DType code ``code``; -1 for an unknown code.
template <class F>
int with_type(int code, F&& f) {
  switch (code) {
    case 0: return f(__half{});
    case 1: return f(__nv_bfloat16{});
    case 2: return f(float{});
    case 3: return f(double{});
  }
  return -1;
}

// Calls f(Int<V>) for v == 1 or v == W (the kernels' two widths); -2 for another width.
template <int W, class F>
int with_width(int v, F&& f) {
  if (v == 1) return f(std::integral_constant<int, 1>{});
  if constexpr (W > 1) {
    if (v == W) return f(std::integral_constant<int, W>{});
  }
  return -2;
}

// Calls f(Int<N>) for the kernel orders hold.cu compiles (0, 2, 3, 4); -3 for another.
template <class F>
int with_order(int n, F&& f) {
  switch (n) {
    case 0: return f(std::integral_constant<int, 0>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
  }
  return -3;
}

}  // namespace

// Entry points: the kernel instantiation named by (dtype codes, V[, N]) run over ``grid`` blocks. Return 0, or
// a negative code for a combination the kernel files do not instantiate.
extern "C" {

int emu_sampler_step(const SamplerStepParams* p, int s, int m, int v, unsigned grid) {
  return with_type(s, [&](auto sv) {
    using S = decltype(sv);
    return with_type(m, [&](auto mv) {
      using M = decltype(mv);
      return with_width<vec_width<S>()>(v, [&](auto vv) {
        emu_launch(grid, false, [&] { sampler_step_kernel<S, M, decltype(vv)::value>(*p); });
        return 0;
      });
    });
  });
}

int emu_iadb_blend(const IadbBlendParams* p, int s, int a, int v, unsigned grid) {
  return with_type(s, [&](auto sv) {
    using S = decltype(sv);
    return with_type(a, [&](auto av) {
      return with_width<vec_width<S>()>(v, [&](auto vv) {
        emu_launch(grid, false, [&] { iadb_blend_kernel<S, decltype(av), decltype(vv)::value>(*p); });
        return 0;
      });
    });
  });
}

int emu_philox_normal(const PhiloxNormalParams* p, int s, int v, unsigned grid) {
  return with_type(s, [&](auto sv) {
    using S = decltype(sv);
    return with_width<vec_width<S>()>(v, [&](auto vv) {
      emu_launch(grid, false, [&] { philox_normal_kernel<S, decltype(vv)::value>(*p); });
      return 0;
    });
  });
}

int emu_hold_transition(const HoldTransitionParams* p, int s, int m, int v, int n, unsigned grid) {
  return with_type(s, [&](auto sv) {
    using S = decltype(sv);
    return with_type(m, [&](auto mv) {
      return with_width<hold_vec_width<S>()>(v, [&](auto vv) {
        return with_order(n, [&](auto nv) {
          emu_launch(grid, true, [&] {
            hold_transition_kernel<S, decltype(mv), decltype(vv)::value, decltype(nv)::value>(*p);
          });
          return 0;
        });
      });
    });
  });
}

int emu_hold_perturb(const HoldPerturbParams* p, int s, int v, int n, unsigned grid) {
  return with_type(s, [&](auto sv) {
    using S = decltype(sv);
    return with_width<hold_vec_width<S>()>(v, [&](auto vv) {
      return with_order(n, [&](auto nv) {
        emu_launch(grid, false, [&] { hold_perturb_kernel<S, decltype(vv)::value, decltype(nv)::value>(*p); });
        return 0;
      });
    });
  });
}

// The specification of the stream, element by element, with its own index arithmetic: out[i] = the normal at
// index offset + i % per_sample under seed[i / per_sample] (one seed: per_sample = numel), in the compute type
// of dtype code ``c`` (2: float, 3: double).
int emu_philox_spec(const long long* seed, long long num_seeds, long long numel, long long offset, long long step,
                    int c, void* out) {
  const long long per_sample = numel / num_seeds;
  for (long long i = 0; i < numel; ++i) {
    const u64 key = static_cast<u64>(seed[i / per_sample]);
    const u64 idx = static_cast<u64>(offset + i % per_sample);
    if (c == 2) {
      static_cast<float*>(out)[i] = philox_normal<float>(key, static_cast<u32>(step), idx);
    } else if (c == 3) {
      static_cast<double*>(out)[i] = philox_normal<double>(key, static_cast<u32>(step), idx);
    } else {
      return -1;
    }
  }
  return 0;
}

}  // extern "C"
