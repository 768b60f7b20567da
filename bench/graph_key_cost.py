"""Host cost of the CUDA-graph cache key (:func:`diffkern.graph_keys.model_key`) per sampling call.

Every graphed call recomputes the key of what a captured replay bakes in (the state of every submodule, the
parameters' addresses, hooks): host time paid once per call, before any replay. Models, random weights, on
the CPU (the key is host work; the device only changes the addresses): diffusers' ``UNet2DModel`` in
google/ddpm-cifar10-32's configuration and at a quarter of the width (``bench_graphs.py``'s builders), and a
tiny Stable Diffusion ``UNet2DConditionModel``. Columns: modules, parameters, tensors (parameters and
buffers), then the min and median microseconds of one ``model_key`` call over ``--repeats`` calls (each
timed alone; the garbage collector off while timing), the min of one ``hash`` of the key (``graphs.run``
looks it up in its caches a few times per call), and of ``math_mode()`` (the global flags, the same for
every model). ``--baseline REV`` also times ``diffkern/graph_keys.py`` as it was at git revision ``REV``
(read with ``git show``, nothing checked out), in the same process: before/after in one run.

    python bench/graph_key_cost.py [--repeats 2000] [--baseline HEAD] [--models cifar10,small,sd_tiny]
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import statistics
import subprocess
import sys
import time

import torch

try:
    from bench import bench_graphs
except ImportError:  # run as a script from bench/
    import bench_graphs

from diffkern import graph_keys

# diffusers' own tiny SD test UNet (hf-internal-testing/tiny-stable-diffusion-pipe's unet config)
_SD_TINY = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32)


def build(name: str) -> torch.nn.Module:
    """A randomly initialised model (seed 0, eval mode, float32, CPU)."""
    if name == "sd_tiny":
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        return UNet2DConditionModel(**_SD_TINY).eval()
    return bench_graphs.unet_and_scheduler(name, "float32", "cpu")[0]


def baseline_module(rev: str):
    """``diffkern.graph_keys`` as of git revision ``rev``, loaded beside the current one."""
    src = subprocess.run(["git", "show", f"{rev}:diffkern/graph_keys.py"], capture_output=True, text=True,
                         check=True, cwd=bench_graphs.harness.REPO).stdout
    spec = importlib.util.spec_from_loader("diffkern._graph_keys_baseline", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "diffkern"
    exec(compile(src, f"{rev}:diffkern/graph_keys.py", "exec"), module.__dict__)
    return module


def time_us(fn, repeats: int) -> tuple[float, float]:
    """(min, median) microseconds of one call of ``fn`` over ``repeats`` calls after 20 warm-up calls."""
    for _ in range(20):
        fn()
    samples = []
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            t0 = time.perf_counter_ns()
            fn()
            samples.append(time.perf_counter_ns() - t0)
    finally:
        if enabled:
            gc.enable()
    return min(samples) / 1e3, statistics.median(samples) / 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=2000)
    p.add_argument("--baseline", default=None, help="git revision of diffkern/graph_keys.py to time beside it")
    p.add_argument("--models", default="cifar10,small,sd_tiny")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the key is single-threaded)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    impls = [("current", graph_keys)]
    if args.baseline:
        impls.insert(0, (f"baseline {args.baseline}", baseline_module(args.baseline)))
    print("| model | modules | parameters | tensors | impl | key min µs | key median µs | hash min µs |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model = build(name)
        modules = sum(1 for _ in model.modules())
        params = sum(p.numel() for p in model.parameters())
        tensors = sum(1 for _ in model.parameters()) + sum(1 for _ in model.buffers())
        for label, module in impls:
            assert module.model_key(model) == module.model_key(model), f"{label}: key not stable"
            lo, med = time_us(lambda: module.model_key(model), args.repeats)
            key = module.model_key(model)
            hashed = time_us(lambda: hash(key), args.repeats)[0]
            print(f"| {name} | {modules} | {params / 1e6:.2f}M | {tensors} | {label} | {lo:.1f} | {med:.1f} "
                  f"| {hashed:.1f} |")
    for label, module in impls:
        lo, med = time_us(module.math_mode, args.repeats)
        print(f"| math_mode() | | | | {label} | {lo:.1f} | {med:.1f} | |")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
