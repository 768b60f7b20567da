"""Small launches of every CUDA op for ``compute-sanitizer --tool memcheck`` (``bench/gpu_suite.sh``'s memcheck).

Each op on odd sizes (vector tails), one-element tensors, views one element past an aligned start (the
kernels' unvectorised paths), per-sample and single seeds, in place and out of place, every optional input and
output, every state dtype; HOLD on orders 1 .. 8 with per-component sizes that do and do not take the
four-element kernels. Launch only: correctness is the CUDA tests' business, what memcheck checks is that no
launch reads or writes outside its tensors.

    compute-sanitizer --tool memcheck --error-exitcode 1 python bench/memcheck_ops.py
    python bench/memcheck_ops.py --device cpu --backend cpp       # the same calls on CPU (a dry run)
"""
from __future__ import annotations

import argparse
import sys

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SHAPES = ((3, 5, 7), (1, 1), (2, 1025))


def misaligned(shape, dtype, device) -> torch.Tensor:
    """A contiguous tensor of ``shape`` starting one element past an aligned allocation (no 16-byte packs)."""
    n = 1
    for s in shape:
        n *= s
    return torch.randn(n + 1, device=device).to(dtype)[1:].view(shape)


def sampler_step_calls(dops, shape, dtype, dev, backend) -> int:
    from diffkern.ops import coefs

    # row 1 reads every history, row 0 only the first (the second call gives no history2, history3)
    table = coefs.table([coefs.row(a=0.9, b=0.1, c=0.2, s=0.3, e=1.0, f=-1.0, w=2.0),
                         coefs.row(a=0.9, b=0.1, c=0.2, c2=-0.1, c3=0.05, s=0.3, e=1.0, f=-1.0, w=2.0)], device=dev)
    seeds = torch.arange(shape[0], dtype=torch.int64, device=dev)
    x = torch.randn(shape, device=dev).to(dtype)
    h, h2, h3 = (torch.randn(shape, device=dev).to(dtype) for _ in range(3))
    # in place: out is x, history_out is the oldest history; guidance, every history, x0_out, per-sample seeds
    dops.sampler_step(x, x, table, 1, model_out_uncond=x, history=h, history2=h2, history3=h3, history_out=h3,
                      seed=seeds, out=x, x0_out=torch.empty_like(x), backend=backend)
    # explicit noise, a bfloat16 model output beside any state dtype, one seed, misaligned views
    xm, nm = misaligned(shape, dtype, dev), misaligned(shape, dtype, dev)
    m = misaligned(shape, torch.bfloat16, dev)
    dops.sampler_step(xm, m, table, 0, history=h, noise=nm, out=misaligned(shape, dtype, dev), backend=backend)
    return 2


def other_calls(dops, shape, dtype, dev, backend) -> int:
    seeds = torch.arange(shape[0], dtype=torch.int64, device=dev)
    x0, x1 = torch.randn(shape, device=dev).to(dtype), torch.randn(shape, device=dev).to(dtype)
    alpha = torch.rand(shape[0], device=dev)
    dops.iadb_blend(x0, x1, alpha, out=torch.empty_like(x0), target_out=torch.empty_like(x0), backend=backend)
    dops.iadb_blend(misaligned(shape, dtype, dev), x1, alpha, out=misaligned(shape, dtype, dev), backend=backend)
    dops.randn(shape, seeds, step=3, offset=7, dtype=dtype, backend=backend)
    dops.randn(shape, seeds[:1], out=misaligned(shape, dtype, dev), backend=backend)
    return 4


def hold_calls(dops, dtype, dev, backend) -> int:
    calls = 0
    # (B, n*C, H, W) states; P = C*H*W = 70 takes the one-element kernels, 40 the four-element ones (of the order,
    # for n = 2, 3, 4), hold_perturb too
    for n, (H, W) in ((1, (5, 7)), (2, (5, 7)), (3, (5, 7)), (6, (5, 7)), (2, (4, 5)), (3, (4, 5)), (4, (4, 5)),
                      (8, (4, 5))):
        B, C = 3, 2
        z = torch.randn(B, n * C, H, W, device=dev).to(dtype)
        K, k, L = torch.rand(2, n, n), torch.rand(2, n), torch.tril(torch.rand(2, n, n))
        coef = dops.hold.transition_table(K, k, L, device=dev)
        seed = torch.arange(B, dtype=torch.int64, device=dev)
        dops.hold_transition(z, torch.randn(B, C, H, W, device=dev), coef, 1, seed=seed, out=torch.empty_like(z),
                             backend=backend)
        dops.hold_transition(z, torch.randn(B, C, H, W, device=dev), coef, 1, seed=seed[:1], out=z, backend=backend)
        dops.hold_transition(z, torch.randn(B, C, H, W, device=dev), coef, 0, noise=torch.randn_like(z), out=z,
                             backend=backend)
        mean = torch.rand(B, n, 1, dtype=torch.float64, device=dev)
        chol = torch.tril(torch.rand(B, n, n, dtype=torch.float64, device=dev))
        dops.hold_perturb(torch.randn(B, C, H, W, device=dev).to(dtype), mean, chol, seed=seed, step=2,
                          out=torch.empty(B, n * C, H, W, device=dev, dtype=dtype),
                          eps_out=torch.empty(B, C, H, W, device=dev, dtype=dtype), backend=backend)
        full = torch.rand(B, n, n, dtype=torch.float64, device=dev)  # m = n: a whole initial state
        dops.hold_perturb(torch.randn(B, n * C, H, W, device=dev).to(dtype), full, chol, seed=seed[:1], step=2,
                          backend=backend)
        calls += 5
    return calls


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--backend", default="cuda", help="cuda (default), or cpp/reference for a CPU dry run")
    args = p.parse_args(argv)
    import diffkern.ops as dops

    calls = 0
    for dtype in DTYPES:
        for shape in SHAPES:
            calls += sampler_step_calls(dops, shape, dtype, args.device, args.backend)
            calls += other_calls(dops, shape, dtype, args.device, args.backend)
        calls += hold_calls(dops, dtype, args.device, args.backend)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    print(f"memcheck launches done: {calls} calls on {args.device} ({args.backend})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
