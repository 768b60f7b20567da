"""The one benchmark harness: the command line, a run's control flow and the derived columns; the timing
(``bench/timing.py``), the provenance and the writers (markdown table, CSV, PNG; ``bench/report.py``) are
re-exported here.

A run can stop early and still write what it measured: ``--deadline-s`` (default: the
``DIFFKERN_BENCH_DEADLINE_S`` environment variable) starts no case after that many seconds, and SIGTERM
(what ``timeout`` sends) ends the case in progress and writes the finished ones. A case that raises is
recorded (``<name>_errors.csv``) and the sweep goes on, unless the error leaves the CUDA context unusable;
after every case the rows so far are rewritten to ``<name>.partial.csv`` (removed once the final CSV is
written), so even a SIGKILL leaves what was measured. A GPU run is scarce: one bad case must not cost the rest.
Importing this module has no side effects (:meth:`Session.run_cases` handles SIGTERM while it runs).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import os
import signal
import time
import traceback
from typing import Callable, Sequence

import torch

try:
    from bench.report import (PROVENANCE_COLUMNS, REPO, device_name, device_slug, git_sha, heading,  # noqa: F401
                              plot_bars, plot_lines, provenance, to_markdown, write_csv)
    from bench.timing import LONG_CALL_S, LONG_REPEATS, Timing, cuda_plan, time_fn  # noqa: F401
except ImportError:  # run as a script from bench/
    from report import (PROVENANCE_COLUMNS, REPO, device_name, device_slug, git_sha, heading,  # noqa: F401
                        plot_bars, plot_lines, provenance, to_markdown, write_csv)
    from timing import LONG_CALL_S, LONG_REPEATS, Timing, cuda_plan, time_fn  # noqa: F401


# Messages of CUDA errors after which the context is unusable: every later case would fail the same way.
STICKY_CUDA_ERRORS = ("illegal memory access", "device-side assert", "unspecified launch failure",
                      "misaligned address", "illegal instruction", "CUDA error: an illegal", "uncorrectable ECC")


class Stopped(BaseException):
    """SIGTERM arrived: the run stops and writes the cases it finished. A BaseException, so that the
    ``except Exception`` around a case that may fail (a compile, an out-of-memory) does not swallow it."""


def _raise_stopped(signum, frame):
    raise Stopped(f"signal {signum}")


@contextlib.contextmanager
def _stop_on_sigterm():
    """SIGTERM raises :class:`Stopped` inside the block (main thread only), the previous handler after it."""
    try:
        before = signal.signal(signal.SIGTERM, _raise_stopped)
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


#----------------------------------------------------------------------------
# Bandwidth yardstick and derived columns.


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def timing_columns(t: Timing) -> dict:
    """Units in the names: microseconds for the band, milliseconds for the first call."""
    return {"median_us": t.median_s * 1e6, "p20_us": t.p20_s * 1e6, "p80_us": t.p80_s * 1e6,
            "first_call_ms": t.first_s * 1e3, "repeats": t.repeats, "loop_us": t.loop_s * 1e6}


def add_ratios(row: dict, copy: dict | None, eager: dict | None, compiled_row: dict | None) -> None:
    """The comparison columns of ``row`` against the copy, the eager sequence and torch.compile of the same case
    (NaN where a baseline was not run, and for the copy itself: it is the yardstick, not a rival)."""
    nan = float("nan")
    if row.get("impl") == "copy":
        eager = compiled_row = None
    row["copy_gbps"] = copy["gbps"] if copy else nan
    row["frac_copy_bw"] = row["gbps"] / copy["gbps"] if copy else nan
    row["speedup_vs_eager"] = eager["median_us"] / row["median_us"] if eager else nan
    row["speedup_vs_compile"] = compiled_row["median_us"] / row["median_us"] if compiled_row else nan


def add_peak(rows: list[dict]) -> None:
    """``peak_copy_gbps``: the highest copy bandwidth of the run (any size and dtype: the device's measured
    peak), and ``frac_peak_bw``: each row's share of it. ``frac_copy_bw`` compares with the copy of the same
    size, which at small sizes is itself far from the peak (launch, ramp-up and tail of a short kernel)."""
    peak = max((r["gbps"] for r in rows if r.get("impl") == "copy" and math.isfinite(r.get("gbps", math.nan))),
               default=math.nan)
    for r in rows:
        r["peak_copy_gbps"] = peak
        r["frac_peak_bw"] = r["gbps"] / peak if "gbps" in r else math.nan


# Issue 6's bandwidth, eager and compile targets are read at this many elements and above (bench/targets.py).
TARGET_MIN_NUMEL = 2**24


def compile_last(configs: list, numel: Callable[[object], int | None] = lambda c: getattr(c, "numel", None)) -> list:
    """``configs`` with the ``torch.compile`` cases moved to the end (order kept otherwise), those at the target
    sizes (``numel(c) >= TARGET_MIN_NUMEL``, or unknown) before the smaller ones: each compiles for seconds, so a
    deadline that cuts the sweep short drops the compile baselines that no target reads first, then the other
    compile baselines, never the fused and eager rows."""
    def tier(c) -> int:
        if c.impl != "compile":
            return 0
        n = numel(c)
        return 1 if n is None or n >= TARGET_MIN_NUMEL else 2
    return sorted(configs, key=tier)


def sweep_sizes(device: str, quick: bool, *, bytes_per_element: int = 0) -> list[int]:
    """Element counts of a bandwidth sweep: 2**16 under ``quick``; on CUDA 2**20 .. 2**28 (step 4x; 2**28
    float32 is 1 GiB a tensor), keeping the sizes whose peak footprint (``bytes_per_element`` times the count,
    inputs and every eager temporary together) fits in 80% of the GPU's memory; on CPU 2**16 .. 2**26."""
    if quick:
        return [2**16]
    if not device.startswith("cuda"):
        return [2**p for p in range(16, 27, 2)]
    sizes = [2**p for p in range(20, 29, 2)]
    if bytes_per_element and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        sizes = [n for n in sizes if n * bytes_per_element <= 0.8 * total] or sizes[:1]
    return sizes


RECOMPILE_LIMIT = 64


def raise_recompile_limit(limit: int = RECOMPILE_LIMIT) -> None:
    """Raise dynamo's per-function recompile limit (8 by default) to at least ``limit``: past it dynamo runs
    the function eagerly, and a sweep's later ``compile`` rows would time eager code under that label."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"  # older torch's name
    setattr(cfg, name, max(getattr(cfg, name), limit))


@functools.lru_cache(maxsize=None)
def compiled(fn: Callable, **options) -> Callable:
    """``torch.compile(fn, fullgraph=True, dynamic=False, **options)``, made once per ``fn`` and options, with
    :func:`raise_recompile_limit`. ``dynamic=False``: every size and dtype of a sweep gets its own static
    compile (in the first call of the case, which is excluded from its timing), as a sampling loop of one
    shape gets; dynamo's default would recompile the second size with a symbolic one and time that kernel
    (which may not assume sizes divisible by 16 or 32-bit indices) at every later size. A sweep of S sizes,
    D dtypes and V variants makes S*D*V cache entries per function (at most 30 here)."""
    raise_recompile_limit()
    return torch.compile(fn, **{"fullgraph": True, "dynamic": False, **options})

#----------------------------------------------------------------------------
# Command line shared by the bench scripts.


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parser(description: str) -> argparse.ArgumentParser:
    """``--quick``, ``--out DIR``, ``--backends a,b``, ``--device``, ``--repeats``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (CI smoke run)")
    p.add_argument("--out", default=None, help="output folder (default: bench/results/<device-slug>/)")
    p.add_argument("--backends", default=None,
                   help="comma-separated diffkern backends to time (default: the fast ones usable on the device: "
                        "cpp on CPU, cuda and triton on CUDA; the Triton CPU interpreter only when named)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--repeats", type=int, default=None, help="timing samples per case (default 20, quick 3)")
    deadline = os.environ.get("DIFFKERN_BENCH_DEADLINE_S")
    p.add_argument("--deadline-s", type=float, default=float(deadline) if deadline else None,
                   help="start no case after this many seconds; the finished cases are written (default: "
                        "$DIFFKERN_BENCH_DEADLINE_S, else none)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for the run (default: torch's, i.e. every core); on a shared, "
                        "loaded CPU use 1: a 2-thread copy of 2**16 floats took 12 ms there instead of 10 us, "
                        "waiting at OpenMP barriers for a descheduled thread")
    return p


@contextlib.contextmanager
def threads(n: int | None):
    """Run with ``n`` torch intra-op threads (None: unchanged), restoring the previous count after."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_backends(arg: str | None, device: str) -> list[str]:
    """Backends to time: the named ones (each must be usable: no silent skips), else the fast defaults."""
    from diffkern.ops import available

    status = available(device.split(":")[0])
    if arg:
        names = [b.strip() for b in arg.split(",") if b.strip()]
        for b in names:
            if b not in status:
                raise ValueError(f"--backends: unknown backend {b!r}; expected some of {sorted(status)}")
            if status[b] is not None:
                raise ValueError(f"--backends: {b!r} is not usable on {device}: {status[b]}")
        return names
    fast = ("cuda", "triton") if device.startswith("cuda") else ("cpp",)
    names = [b for b in fast if status.get(b) is None]
    return names or ["reference"]


def out_dir(arg: str | None, device: str, quick: bool = False) -> str:
    """``--out``, else the committed results folder ``bench/results/<device>/``; a ``--quick`` smoke run without
    ``--out`` writes to ``out/bench-quick/`` (git-ignored, as the CLI's), never over the measured results."""
    if arg:
        return arg
    return os.path.join("out", "bench-quick") if quick else os.path.join(REPO, "bench", "results", device_slug(device))

#----------------------------------------------------------------------------
# One command-line run of a bench script: its set-up (start), the timed part (measuring), the outputs (finish).


@dataclasses.dataclass
class Session:
    """A bench script's run: parsed arguments, device, timing settings; ``prov`` is set by :meth:`measuring`."""
    args: argparse.Namespace
    device: str
    prov: dict = dataclasses.field(default_factory=dict)
    t0: float = dataclasses.field(default_factory=time.monotonic)
    incomplete: bool = False  # the deadline or SIGTERM left cases unrun, or a case failed: finish() returns 2
    name: str = ""  # the results' file stem (``<name>.csv``); with it, run_cases checkpoints <name>.partial.csv
    errors: list = dataclasses.field(default_factory=list)  # {"case", "error"} of each case that raised

    def past_deadline(self, need_s: float = 0.0) -> bool:
        """Whether ``--deadline-s`` leaves less than ``need_s`` seconds for the next case."""
        d = getattr(self.args, "deadline_s", None)
        return d is not None and time.monotonic() - self.t0 + need_s > d

    def run_cases(self, configs: Sequence, run: Callable[[object], dict], *,
                  need_s: Callable[[object], float] = lambda c: 0.0) -> list[dict]:
        """``[run(c) for c in configs]`` with a progress line per case, skipping a case that ``--deadline-s``
        leaves less than ``need_s(c)`` seconds for, and stopping at SIGTERM; either sets ``incomplete``. A case
        that raises is recorded in ``errors`` (traceback on stderr) and the sweep goes on, but for an error that
        leaves the CUDA context unusable (every later case would fail): then it stops. After each case the rows
        so far go to ``<name>.partial.csv`` (with ``name``)."""
        rows, skipped = [], 0
        with _stop_on_sigterm():
            for k, c in enumerate(configs):
                if self.past_deadline(need_s(c)):
                    skipped += 1
                    continue
                try:
                    rows.append(run(c))
                except Stopped as exc:
                    skipped += len(configs) - k
                    print(f"stopped by {exc}", flush=True)
                    break
                except Exception as exc:  # noqa: BLE001 (recorded, printed, and the sweep goes on)
                    if self._failed(c, exc):
                        skipped += len(configs) - k - 1
                        print("stopping: the CUDA context is unusable after this error", flush=True)
                        break
                    continue
                print(f"[{k + 1}/{len(configs)} {time.monotonic() - self.t0:.0f}s] {c}", flush=True)
                self._checkpoint(rows)
        if skipped:
            self.incomplete = True
            print(f"{skipped} of {len(configs)} cases not run (deadline, signal or a CUDA error)", flush=True)
        return rows

    def _failed(self, case, exc: Exception) -> bool:
        """Record a case that raised; returns whether the error is sticky (the CUDA context is lost)."""
        message = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        first = all(e["error"] != message for e in self.errors)
        self.errors.append({"case": str(case), "error": message})
        self.incomplete = True
        print(f"FAILED {case}: {message}", flush=True)
        if first:  # the whole traceback once per distinct error, one line for its repeats
            traceback.print_exc()
        if torch.cuda.is_available() and isinstance(exc, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
            return False
        return any(s in str(exc) for s in STICKY_CUDA_ERRORS)

    def _checkpoint(self, rows: list[dict]) -> None:
        """Rewrite ``<name>.partial.csv`` with the rows so far (provenance included); nothing without ``name``."""
        if self.name:
            out = out_dir(self.args.out, self.device, getattr(self.args, "quick", False))
            write_csv([{**r, **self.prov} for r in rows], os.path.join(out, f"{self.name}.partial.csv"))

    @property
    def warmup(self) -> int:
        return 1 if self.args.quick else 3

    @property
    def repeats(self) -> int:
        return self.args.repeats or (3 if self.args.quick else 20)

    def backends(self) -> list[str]:
        """``--backends`` checked on the device, else the fast defaults (:func:`resolve_backends`)."""
        return resolve_backends(self.args.backends, self.device)

    @contextlib.contextmanager
    def measuring(self, *packages: str):
        """The timed part: ``--threads`` torch threads, and ``prov`` taken on entry (so it records that count)
        with the versions of ``packages`` (see :func:`provenance`)."""
        with threads(self.args.threads):
            self.prov = provenance(self.device, *packages)
            yield self

    def finish(self, name: str, rows: list[dict], columns: Sequence[str], *, what: str,
               plot: Callable[[list[dict], str], str], tables: Sequence[tuple] = (), note: str = "") -> int:
        """Write ``<name>.csv`` (``rows`` with the provenance columns), ``<name>.png`` (``plot(rows, path)``) and
        ``<name>.md`` (heading, tables, note) in ``--out``, ``<stem>.csv`` for each extra ``(stem, rows, columns)``
        of ``tables``, and ``<name>_errors.csv`` when cases failed; print the markdown. Returns 0, or 2 when the
        run stopped early or a case failed (``incomplete``), or 1 when no case finished (only the errors, if
        any, are written)."""
        out = out_dir(self.args.out, self.device, getattr(self.args, "quick", False))
        if self.errors:
            write_csv([{**e, **self.prov} for e in self.errors], os.path.join(out, f"{name}_errors.csv"))
            note = "\n".join([note] * bool(note) + [f"FAILED {e['case']}: {e['error']}" for e in self.errors])
        if not rows:
            print(f"{name}: no case finished, nothing written", flush=True)
            return 1
        rows = [{**r, **self.prov} for r in rows]
        csv_path = write_csv(rows, os.path.join(out, f"{name}.csv"))
        partial = os.path.join(out, f"{name}.partial.csv")
        if os.path.exists(partial):  # superseded by the final CSV
            os.remove(partial)
        try:
            png_path = plot(rows, os.path.join(out, f"{name}.png"))
        except Exception as e:  # noqa: BLE001 (no matplotlib on the image, or a plot that fails: the CSV and
            png_path = f"no PNG ({type(e).__name__}: {e})"  # the tables are the results)
        parts = [heading(what, self.prov)]
        for stem, extra, extra_columns in tables:
            write_csv([{**r, **self.prov} for r in extra], os.path.join(out, f"{stem}.csv"))
            parts.append(to_markdown(extra, extra_columns))
        parts.append(to_markdown(rows, columns))
        if note:
            parts.append(note)
        text = "\n\n".join(parts) + "\n"
        with open(os.path.join(out, f"{name}.md"), "w") as f:
            f.write(text)
        print(text)
        print(f"wrote {csv_path}, {name}.md and {png_path}")
        return 2 if self.incomplete else 0


def start(p: argparse.ArgumentParser, argv: list[str] | None = None, *, quick_device: str | None = None,
          name: str = "") -> Session:
    """Parse ``argv`` with ``p`` (:func:`parser` plus the script's own flags) and pick the device: ``--device``,
    else ``quick_device`` under ``--quick`` when given, else :func:`default_device`. ``name``: the results'
    file stem (``Session.name``: checkpoints)."""
    args = p.parse_args(argv)
    device = args.device or (args.quick and quick_device) or default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():  # every case would fail the same way
        raise SystemExit(f"--device: {device!r} asked for, but torch reports no CUDA device")
    return Session(args, device, name=name)


def run_sweep(description: str, argv, module, *, compile_help: str | None = None, packages: tuple = ()):
    """The shared body of a sweep script's ``main``: parse (with ``--no-compile`` when ``compile_help`` is given),
    run every case of ``module.get_configs`` through ``module.run`` while measuring, then ``module.add_ratios``.
    Returns the :class:`Session` and the rows."""
    p = parser(description)
    if compile_help is not None:
        p.add_argument("--no-compile", action="store_true", help=compile_help)
    # the file stem (run as a script, the module is __main__): bench_sampler_step.py -> sampler_step
    b = start(p, argv, name=os.path.splitext(os.path.basename(module.__file__))[0].removeprefix("bench_"))
    kw = {"compile": False if b.args.no_compile else None} if compile_help is not None else {}
    configs = module.get_configs(quick=b.args.quick, backends=b.backends(), device=b.device, **kw)
    with b.measuring(*packages):
        rows = b.run_cases(configs, lambda c: module.run(c, warmup=b.warmup, repeats=b.repeats))
    module.add_ratios(rows)
    add_peak(rows)
    return b, rows
