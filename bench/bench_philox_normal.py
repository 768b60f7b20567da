"""diffkern's counter-based normals (``philox_normal``) vs ``torch.randn`` vs ``torch.compile`` of the reference stream.

The op fills a preallocated tensor with the Philox4x32-10 / Box-Muller stream of ``diffkern.ops.philox``
(``diffkern.ops.randn`` with ``out``: ``fused``; the raw torch op: ``op``). Baselines:

* ``eager``: ``torch.randn(numel, out=buf)``, torch's own generator (also Philox on CUDA, a different
  stream). It is already one kernel, so unlike the other ops' eager sequences there is no fusion to win:
  expect a speed-up near 1, the point being that the reproducible, seed-in-device-memory stream costs no
  more than torch's.
* ``compile``: ``torch.compile(fullgraph=True)`` of the pure-PyTorch reference
  (``philox.philox_normal_reference``: the 10 rounds in int64 arithmetic on int64 tensors). It compiles:
  on CPU inductor fuses it into one C++ loop that matches the op to float32 rounding (about 20 s per cold
  compile on the 2-core CI CPU). Should a compile fail on another inductor, that row keeps the error in its
  ``error`` column and the run goes on. The uncompiled reference is the ``reference`` backend
  (``--backends reference``; slow: ~0.5 s per 1e6 draws on CPU, and ~30 GB of int64 temporaries at 2**28).

Sizes: ``harness.sweep_sizes`` (CUDA 2**20 .. 2**28 elements where memory allows, CPU 2**16 .. 2**26,
quick 2**16); float32 and bfloat16. Bytes: the minimal traffic is the output alone (1 tensor written; the
seed is 8 bytes); the yardstick is ``dst.copy_(src)`` (2 tensors) of the same size and dtype, measured in
the same run.

    python bench/bench_philox_normal.py [--quick] [--out DIR] [--backends cpp,reference] [--no-compile]
"""
from __future__ import annotations

import dataclasses
import sys

import torch

try:
    from bench import harness
except ImportError:  # run as a script from bench/
    import harness

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SEED = 1234
# Peak bytes per element of the largest case with the default backends: the copy's source and destination.
PEAK_BYTES = 4 * 4


@dataclasses.dataclass(frozen=True)
class Config:
    impl: str  # "copy" | "eager" | "compile" | "fused" (front-end) | "op" (the torch op, no front-end checks)
    backend: str  # diffkern backend of fused/op, "" otherwise
    numel: int
    dtype: str
    device: str


def reference_stream(seed: torch.Tensor, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """The reference stream of ``numel`` normals at step 0, offset 0 (what ``compile`` compiles)."""
    from diffkern.ops import philox

    return philox.philox_normal_reference(seed, 0, 0, (numel,), dtype)


_COMPILE_ERROR: list[str] = []  # the first failed compile's message, for the later compile cases


def _compiled_stream():
    return harness.compiled(reference_stream)


def get_configs(*, quick: bool = False, backends: list[str] | None = None, device: str = "cpu",
                compile: bool | None = None) -> list[Config]:
    """Every case: ``harness.sweep_sizes`` x float32, bfloat16 x (copy, eager, compile, fused and op per backend).

    ``compile`` (default: not ``quick``) adds torch.compile of the reference (~20 s a cold compile on CPU).
    """
    backends = backends if backends is not None else harness.resolve_backends(None, device)
    compile = not quick if compile is None else compile
    impls = [("copy", ""), ("eager", "")] + ([("compile", "")] if compile else [])
    impls += [(kind, b) for b in backends for kind in ("fused", "op")]
    sizes = harness.sweep_sizes(device, quick, bytes_per_element=PEAK_BYTES)
    return harness.compile_last([Config(impl, b, n, dt, device) for n in sizes for dt in DTYPES for impl, b in impls])


def _callable(config: Config):
    import diffkern.ops as dops

    dtype = DTYPES[config.dtype]
    out = torch.empty(config.numel, dtype=dtype, device=config.device)
    seed = torch.tensor([SEED], dtype=torch.int64, device=config.device)
    if config.impl == "copy":
        src = torch.randn(config.numel, device=config.device).to(dtype)
        return lambda: out.copy_(src)
    if config.impl == "eager":
        return lambda: torch.randn(config.numel, out=out)
    if config.impl == "compile":
        fn = _compiled_stream()
        return lambda: fn(seed, config.numel, dtype)
    if config.impl == "fused":
        return lambda: dops.randn(out.shape, seed, out=out, backend=config.backend)
    _, launch = dops.resolve("philox_normal", out.device.type, config.backend)
    return lambda: launch(seed, 0, 0, out)


def run(config: Config, *, warmup: int = 3, repeats: int = 20) -> dict:
    """Time one case; returns a result row (no derived ratios: see :func:`add_ratios`)."""
    esize = torch.empty(0, dtype=DTYPES[config.dtype]).element_size()
    nbytes = (2 if config.impl == "copy" else 1) * config.numel * esize
    label = f"{config.impl}:{config.backend}" if config.backend else config.impl
    row = {"op": "philox_normal", "impl": label, "backend": config.backend, "dtype": config.dtype,
           "numel": config.numel, "shape": str(config.numel), "bytes": nbytes}
    nan = float("nan")
    failed = {"median_us": nan, "p20_us": nan, "p80_us": nan, "first_call_ms": nan, "repeats": 0, "gbps": nan}
    if config.impl == "compile" and _COMPILE_ERROR:  # dynamo does not cache a failure: it would retry per case
        return {**row, **failed, "error": _COMPILE_ERROR[0]}
    try:
        timing = harness.time_fn(_callable(config), device=config.device, warmup=warmup, repeats=repeats)
    except Exception as e:  # a failed compile is recorded and the run goes on; any other failure ends it
        if config.impl != "compile":
            raise
        _COMPILE_ERROR.append(f"{type(e).__name__}: {e}".splitlines()[0][:300])
        return {**row, **failed, "error": _COMPILE_ERROR[0]}
    return {**row, **harness.timing_columns(timing), "gbps": harness.gbps(nbytes, timing.median_s)}


def add_ratios(rows: list[dict]) -> None:
    """Speed-ups vs torch.randn and vs the compiled reference, and the fraction of the copy bandwidth, per
    (numel, dtype)."""
    def find(r, impl):
        return next((o for o in rows if o["impl"] == impl and o["numel"] == r["numel"] and o["dtype"] == r["dtype"]),
                    None)

    for r in rows:
        copy = find(r, "copy")
        eager, comp = (None, None) if r is copy else (find(r, "eager"), find(r, "compile"))
        harness.add_ratios(r, copy, eager, comp)


COLUMNS = ("impl", "dtype", "numel", "median_us", "p20_us", "p80_us", "loop_us", "gbps", "frac_copy_bw", "frac_peak_bw",
           "speedup_vs_eager", "speedup_vs_compile", "first_call_ms")


def main(argv: list[str] | None = None) -> int:
    b, rows = harness.run_sweep(__doc__.splitlines()[0], argv, sys.modules[__name__],
                                compile_help="skip torch.compile of the reference (~20 s a cold compile on CPU)")
    errors = sorted({f"{r['impl']}: {r['error']}" for r in rows if r.get("error")})

    def plot(rows, path):
        return harness.plot_lines(rows, path, x="numel", y="gbps", series="impl", panel="dtype", ylog=True,
                                  ylabel="GB/s (1 tensor written; copy: 2)",
                                  title=f"philox_normal on {b.prov['device_name']}\ntorch {b.prov['torch']}, "
                                        f"{b.prov['git_sha'][:12]}, load {b.prov['loadavg_1m']}")
    return b.finish("philox_normal", rows, COLUMNS, what="philox_normal", plot=plot,
                    note="\n".join(f"failed: {e}" for e in errors))


if __name__ == "__main__":
    sys.exit(main())
