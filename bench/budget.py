"""Estimated device time of each ``bench/gpu_suite.sh`` stage on an H100, from the benches' own case lists.

Nothing is timed: each bench's ``get_configs`` on ``cuda`` gives its cases, and the per-case costs below (reasoned
from the timing method, ``bench/timing.py``, and the device's copy bandwidth, ~3 TB/s; none measured on a GPU
yet) turn them into seconds. The estimates set gpu_suite.sh's caps; after a GPU run, compare them with the
``exit ... after Ns`` lines of stages.txt and correct the constants.

    python bench/budget.py          # the per-stage table
"""
from __future__ import annotations

import math
import os
import sys

try:
    from bench import bench_graphs, bench_hold, bench_iadb_blend, bench_sampler_step
    from bench.harness import TARGET_MIN_NUMEL
except ImportError:  # run as a script from bench/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench import bench_graphs, bench_hold, bench_iadb_blend, bench_sampler_step
    from bench.harness import TARGET_MIN_NUMEL

# Per-op sweeps. A case: its first and second calls, do_bench (~25 ms of warm-up and ~100 ms of repeats, each
# after a ~0.1 ms L2 flush: about 1000 Python iterations at small sizes), the host loop (<= 20 ms of calls or
# 10 calls) and its inputs drawn on the device.
CASE_S = 0.35
COMPILE_S = 2.5  # one static inductor compile of a pointwise step (a few Triton kernels, 16 cores)
FIRST_COMPILE_S = 15.0  # once per process: importing inductor, starting its compile workers
TRITON_JIT_S = 2.0  # one Triton specialisation of a diffkern kernel (Philox: 0.8-2.8 s, test_triton_gpu_compile)
PROCESS_S = 10.0  # python, torch, CUDA context, imports
# The end-to-end bench: milliseconds per UNet call on the GPU (batch 1, 8, 64) and on the host (diffusers' ~350
# modules and ops at ~15 us each: eager loops are host-bound until the GPU time passes it).
UNET_GPU_MS = {("cifar10", "float32"): (1.5, 2.0, 10.0), ("cifar10", "bfloat16"): (1.5, 2.0, 5.0),
               ("small", "float32"): (1.2, 1.3, 2.0), ("small", "bfloat16"): (1.2, 1.3, 2.0)}
UNET_HOST_MS = 5.0
UNET_COMPILE_S = 50.0  # inductor + CUDA-graph trees on the UNet, per (model, dtype, batch) (bench_graphs)
GRAPHED = ("floor", "graph", "compile")
BUILD_S = 150.0  # the editable build with nvcc for one arch on a fresh machine (0 when the machine is warm)


def op_sweep_s(module) -> dict:
    """Seconds of one per-op bench on CUDA: ``{"cases", "compiles", "total_s", "without_compile_s"}``."""
    configs = module.get_configs(backends=["cuda", "triton"], device="cuda")
    compiles = sum(c.impl == "compile" for c in configs)
    # one Triton specialisation per distinct (op or variant, order, dtype) of the triton cases
    jit = len({(getattr(c, "op", ""), getattr(c, "variant", ""), getattr(c, "n", 0), c.dtype)
               for c in configs if c.backend == "triton"})
    base = PROCESS_S + (len(configs) - compiles) * CASE_S + jit * TRITON_JIT_S
    first = FIRST_COMPILE_S if compiles else 0.0
    total = base + compiles * (CASE_S + COMPILE_S) + first
    # the compile cases that targets read (from TARGET_MIN_NUMEL elements) run before the others
    big = sum(c.impl == "compile" and (getattr(c, "numel", None) or c.n * math.prod(c.shape)) >= TARGET_MIN_NUMEL
              for c in configs)
    return {"cases": len(configs), "compiles": compiles, "total_s": total, "without_compile_s": base,
            "target_compiles_s": base + first + big * (CASE_S + COMPILE_S)}


def graphs_case_s(c) -> float:
    """Seconds of one bench_graphs case: its first and second calls, then 1 + 5 more calls (a call over 20 ms:
    ``timing.cuda_plan``) or 3 + 20; a compile case's first call of its (model, dtype, batch) adds the compile."""
    gpu = UNET_GPU_MS[(c.model, c.dtype)][(1, 8, 64).index(c.batch)]
    call_s = c.steps * (gpu if c.impl in GRAPHED else max(gpu, UNET_HOST_MS)) / 1e3
    return call_s * (8 if call_s > 0.02 else 25)


def graphs_s(configs) -> dict:
    """Seconds of bench_graphs over ``configs``: non-compile cases, then the compiles (one per group)."""
    plain = sum(graphs_case_s(c) for c in configs if c.impl != "compile")
    groups = {(c.model, c.dtype, c.batch) for c in configs if c.impl == "compile"}
    compiled = sum(graphs_case_s(c) for c in configs if c.impl == "compile") + len(groups) * UNET_COMPILE_S
    return {"cases": len(configs), "compiles": len(groups), "without_compile_s": PROCESS_S + plain,
            "total_s": PROCESS_S + plain + compiled}


def graphs_compile_groups_fitting(configs, deadline_s: float) -> int:
    """How many compile groups (model, dtype, batch) bench_graphs starts before ``deadline_s`` (each only with
    ``bench_graphs.COMPILE_NEED_S`` left), after its non-compile cases."""
    t = graphs_s([c for c in configs if c.impl != "compile"])["total_s"]
    groups: dict = {}
    for c in configs:
        if c.impl == "compile":
            groups.setdefault((c.model, c.dtype, c.batch), []).append(c)
    fitted = 0
    for cases in groups.values():
        if t + bench_graphs.COMPILE_NEED_S > deadline_s:
            break
        t += UNET_COMPILE_S + sum(graphs_case_s(c) for c in cases)
        fitted += 1
    return fitted


# gpu_suite.sh's caps per part (keep in step with the script).
CAPS = {"sampler_step": 150, "iadb_blend": 100, "hold": 260, "ddim": 40, "philox_normal": 90, "optimal_denoiser": 60}


def stages(budget_s: float = 560.0) -> list[dict]:
    """The stages' estimates beside their caps (gpu_suite.sh; ``budget_s``: GPU_SUITE_BUDGET_S)."""
    configs = bench_graphs.get_configs(device="cuda")
    graphs = graphs_s(configs)
    fit = graphs_compile_groups_fitting(configs, 540 - 40)  # gpu_suite.sh: its cap less its MARGIN
    rest = [c for c in configs if c.impl in ("graph", "compile")]
    rest_groups = list(dict.fromkeys((c.model, c.dtype, c.batch) for c in rest if c.impl == "compile"))[fit:]
    rest_configs = [c for c in rest if (c.model, c.dtype, c.batch) in rest_groups]
    rest = graphs_s(rest_configs)
    rest_fit = graphs_compile_groups_fitting(rest_configs, 470 - 40)
    rows = [{"stage": "first", "part": "build (cold machine; warm: 0)", "estimate_s": BUILD_S, "cap_s": 300},
            {"stage": "first", "part": "pytest_cuda (not estimated: never run)", "estimate_s": float("nan"),
             "cap_s": 240},
            {"stage": "first", "part": "memcheck (232 launches under compute-sanitizer)", "estimate_s": 60.0,
             "cap_s": 100},
            {"stage": "first", "part": "pytest_nvrtc (the rest of the budget)", "estimate_s": float("nan"),
             "cap_s": 150},
            {"stage": "second", "part": f"bench_graphs ({graphs['cases']} cases; {fit} of {graphs['compiles']} "
                                        f"compile groups before the deadline)",
             "estimate_s": graphs["without_compile_s"] + (graphs["total_s"] - graphs["without_compile_s"])
             * fit / max(graphs["compiles"], 1), "without_compile_s": graphs["without_compile_s"], "cap_s": 540},
            {"stage": "fourth", "part": f"bench_graphs_compile (the other {len(rest_groups)} groups; {rest_fit} "
                                        f"before the deadline)", "estimate_s": rest["total_s"], "cap_s": 470}]
    modules = {"sampler_step": bench_sampler_step, "iadb_blend": bench_iadb_blend, "hold": bench_hold}
    for name, module in modules.items():
        est = op_sweep_s(module)
        rows.append({"stage": "third", "part": f"bench_{name} ({est['cases']} cases, {est['compiles']} compiles)",
                     "estimate_s": est["total_s"], "without_compile_s": est["without_compile_s"],
                     "target_compiles_s": est["target_compiles_s"], "cap_s": CAPS[name]})
    return rows


def main() -> int:
    nan = float("nan")
    print("| stage | part | estimate_s | without_compile_s | with_target_compiles_s | cap_s |\n"
          "|---|---|---|---|---|---|")
    for r in stages():
        print(f"| {r['stage']} | {r['part']} | {r['estimate_s']:.0f} | {r.get('without_compile_s', nan):.0f} | "
              f"{r.get('target_compiles_s', nan):.0f} | {r['cap_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
