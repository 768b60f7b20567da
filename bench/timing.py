"""Timing of one benchmark case (re-exported by ``bench/harness.py``).

The median and the p20/p80 band over repeats, after warm-up; the first call (lazy initialisation, Triton
JIT, compilation, graph capture) is timed on its own. On CPU: ``time.perf_counter``. On CUDA a second call
(steady state) picks the method: ``triton.testing.do_bench`` (CUDA events around each call after an L2
flush) when Triton is installed, else CUDA events; a call longer than ``LONG_CALL_S`` (a whole sampling
run) is timed with CUDA events over a few repeats. ``wall=True`` (the end-to-end sampling loops) times each
call on the host clock between two synchronisations instead: no L2 flush, and whatever the call does on
the host or on other streams is counted. ``loop_us`` (CUDA) is the host-clock time per call of
back-to-back calls: do_bench's GPU time hides a host cost (Python, the launch) shorter than its cache
flush, and a sampling loop pays whichever is longer (no flush there: at sizes that fit in L2, a GPU-bound
case can run faster in the loop than in do_bench).
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable, Sequence

import torch

# A CPU sample lasts at least this long (several calls when one is shorter): perf_counter and the
# Python loop then add < 1% to the median of a 2**16-element step (~20 us on the 2-core CI CPU).
MIN_SAMPLE_S = 2e-3
# do_bench times one call of a call this long (it sizes its repeats to ~100 ms): CUDA events over
# LONG_REPEATS calls give a spread instead, for a fraction of the time.
LONG_CALL_S, LONG_REPEATS = 20e-3, 5


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call: median and the p20/p80 band over ``repeats`` samples; ``first_s``: the first call."""
    median_s: float
    p20_s: float
    p80_s: float
    first_s: float
    repeats: int
    loop_s: float = float("nan")  # CUDA: per call of back-to-back calls timed on the host (see _host_loop)


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    return statistics.quantiles(sorted_vals, n=100, method="inclusive")[round(q * 100) - 1]


def time_fn(fn: Callable[[], object], *, device: str = "cpu", warmup: int = 3, repeats: int = 20,
            wall: bool = False) -> Timing:
    """Time ``fn()`` (which must synchronise nothing itself, except under ``wall``); see the module docstring
    for the method."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    if device.startswith("cuda"):
        # The second call decides the method: the first includes Triton JIT / torch.compile / cuBLAS set-up,
        # and deciding on it would time every freshly compiled case without the L2 flush and one call a sample.
        t0 = time.perf_counter()
        fn()
        sync()
        steady = time.perf_counter() - t0
        if wall:
            return _time_wall(fn, first, steady, warmup, repeats)
        return _time_cuda(fn, first, steady, warmup, repeats)
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    fn()
    inner = max(1, math.ceil(MIN_SAMPLE_S / max(time.perf_counter() - t0, 1e-9)))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner)
    samples.sort()
    return Timing(statistics.median(samples), _quantile(samples, 0.2), _quantile(samples, 0.8), first, repeats)


def _host_loop(fn, gpu_s: float) -> float:
    """Seconds per call of back-to-back calls, host clock, synchronised once at each end: what a loop of
    them costs when the host (Python, the launch) is slower than the kernel. do_bench flushes the L2 cache
    (~0.1 ms of GPU work) before each timed call, which hides a host cost shorter than that."""
    k = max(10, min(1000, math.ceil(20e-3 / max(gpu_s, 1e-6))))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(k):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / k


def cuda_plan(steady_s: float, warmup: int, repeats: int, have_do_bench: bool) -> tuple[str, int, int]:
    """How a CUDA case is timed, from the duration of one steady-state call: ``("do_bench", ...)`` (L2
    flushed before each call, its own counts), or ``("events", warmup, repeats)`` (a call longer than
    ``LONG_CALL_S``: ``LONG_REPEATS`` samples after one warm-up call; or no Triton)."""
    if steady_s > LONG_CALL_S:
        return "events", 1, min(repeats, LONG_REPEATS)
    return ("do_bench" if have_do_bench else "events"), warmup, repeats


def _time_wall(fn, first: float, steady: float, warmup: int, repeats: int) -> Timing:
    """Host clock per call, synchronised before and after each: what a caller waiting for the result sees."""
    _, warmup, repeats = cuda_plan(steady, warmup, repeats, False)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return Timing(statistics.median(samples), _quantile(samples, 0.2), _quantile(samples, 0.8), first, repeats)


def _time_cuda(fn, first: float, steady: float, warmup: int, repeats: int) -> Timing:
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    how, warmup, repeats = cuda_plan(steady, warmup, repeats, do_bench is not None)
    if how == "events":
        do_bench = None
    if do_bench is not None:
        med, p20, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return Timing(med / 1e3, p20 / 1e3, p80 / 1e3, first, -1, _host_loop(fn, med / 1e3))  # do_bench: own count
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    samples.sort()
    return Timing(statistics.median(samples), _quantile(samples, 0.2), _quantile(samples, 0.8), first, repeats)
