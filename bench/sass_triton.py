"""Instructions per element of the Triton HOLD kernels, counted in their sm_90 SASS (no GPU needed).

Records the launch ``diffkern.kernels.hold.hold_transition_launch`` (or ``hold_perturb_launch``: m = 1,
``eps_out``) makes for a (2, n*3, 64, 64) state with per-sample seeds (the recorder and specialisation of ``tests/test_triton_gpu_compile.py``: TRITON_INTERPRET
must be unset), compiles it with ``triton.compile`` for sm_90, disassembles it with Triton's nvdisasm and counts
the cheapest entry-to-exit path through every noise draw (:func:`bench.sass_path.straight_path`), divided by
the positions each thread holds. The figures quoted in ``kernels/hold.py``:

    python bench/sass_triton.py --orders 2,3,8 --dtypes float32,bfloat16
    python bench/sass_triton.py --op perturb --orders 3

A static count: not a timing, and not a test.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def count(n: int, dtype, arch: int = 90, op: str = "transition") -> dict:
    """Launch options and the per-element count of the order-``n`` ``op`` kernel ("transition" or "perturb")
    for state ``dtype``."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import test_triton_gpu_compile as rec  # tests/ and the repo are on sys.path (main)
    from bench import sass_path
    from diffkern.kernels import hold

    z = torch.zeros(2, n * 3, 64, 64, dtype=dtype)
    coef = torch.zeros(4, n, 2 * n + 1, dtype=torch.float64)
    x = torch.zeros(2, 3, 64, 64, dtype=dtype)
    with rec.Recorder() as r:
        if op == "transition":
            hold.hold_transition_launch(z, x, None, coef, 1, torch.arange(2), z)
        else:
            mats = torch.zeros(2, n, 1, dtype=torch.float64), torch.zeros(2, n, n, dtype=torch.float64)
            hold.hold_perturb_launch(x, *mats, None, 1, torch.arange(2), z, x.clone())
    fn, args, kwargs = r.launches[0]
    signature, constexprs, attrs, options = rec.specialization(fn, args, kwargs)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                            options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([sass_path.nvdisasm(), "-c", f.name], check=True, capture_output=True, text=True).stdout
    _, ins, labels = sass_path.parse(text, f"hold_{op}")
    total, draws = sass_path.straight_path(ins, labels)
    per_thread = constexprs["BLOCK"] / (32 * options["num_warps"])
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "BLOCK": constexprs["BLOCK"],
            "num_warps": options["num_warps"], "ALIGNED": constexprs["ALIGNED"], "per_thread": per_thread,
            "rsq": draws, "local": sum("STL" in s or "LDL" in s for s in ins), "per_element": total / per_thread}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--orders", default="2,3,8")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--op", choices=("transition", "perturb"), default="transition")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: the count compiles for the GPU")
    sys.path[:0] = [REPO, os.path.join(REPO, "tests")]  # bench.sass_path and the recorder of the compile test
    import torch

    print("| n | dtype | BLOCK | warps | positions/thread | ALIGNED | RSQ | local ld/st | instructions/element |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in (int(v) for v in args.orders.split(",")):
        for d in args.dtypes.split(","):
            r = count(n, getattr(torch, d), op=args.op)
            print(f"| {r['n']} | {r['dtype']} | {r['BLOCK']} | {r['num_warps']} | {r['per_thread']:g} | {r['ALIGNED']} "
                  f"| {r['rsq']} | {r['local']} | {r['per_element']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
