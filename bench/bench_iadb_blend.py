"""Fused IADB blend (+ training target) and deblend step vs the eager PyTorch sequence vs ``torch.compile`` of it.

IADB's x0 is the noise and x1 the data (``math-samplers.md`` 1). Two ops, on (64, numel/64) tensors:

* ``iadb_blend``: ``x_alpha = (1-alpha) x0 + alpha x1`` with one alpha per sample, and the training target
  ``x1 - x0`` in the same pass. Eager, as a training loop writes it: ``(1 - a) * x0 + a * x1`` and
  ``x1 - x0`` with ``a = alpha.view(B, 1)`` (four full-size kernels); the fused op is ``iadb_blend`` with
  preallocated ``out`` and ``target_out`` (``fused``), or the raw torch op (``op``). Bytes: read x0 and x1,
  write x_alpha and the target: 4 tensors.
* ``iadb_deblend``: the IADB Euler step ``x' = x + (alpha_next - alpha) D``. It has no op of its own: it is
  a coefficient row of the fused step (``diffkern.ops.iadb.euler_row``), so the fused cases are
  ``sampler_step`` with a prebuilt one-row table and a preallocated ``out`` (``fused``; ``iadb_deblend`` is
  the same call plus a table built per call) and the raw ``sampler_step`` op (``op``). Eager:
  ``x + (alpha_next - alpha) * d`` (two kernels). Bytes: read x and D, write x': 3 tensors.

Not counted: the per-sample alphas (64 float32) and the deblend's table row and seed (136 bytes).

``compile`` is ``torch.compile(fullgraph=True)`` of the eager function (one fused inductor kernel, the
fair rival of the fused op). Sizes: ``harness.sweep_sizes`` (CUDA 2**20 .. 2**28 elements where memory
allows, CPU 2**16 .. 2**26, quick 2**16); float32 and bfloat16; the eager and compiled maths run in the
input dtype, the fused ops compute in float32. The yardstick is ``dst.copy_(src)`` (2 tensors) of the
same size and dtype, measured in the same run.

    python bench/bench_iadb_blend.py [--quick] [--out DIR] [--backends cpp,reference] [--no-compile]
"""
from __future__ import annotations

import dataclasses
import sys

import torch

try:
    from bench import harness
except ImportError:  # run as a script from bench/
    import harness

BATCH = 64  # samples, one alpha each
ALPHA, ALPHA_NEXT = 0.4, 0.45  # one mid-trajectory deblend step; the cost does not depend on the values
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
OPS = ("iadb_blend", "iadb_deblend")
TRAFFIC = {"copy": 2, "iadb_blend": 4, "iadb_deblend": 3}  # tensors read + written
# Peak bytes per element of the largest case: x0, x1 and up to 5 float32 temporaries of the eager blend.
PEAK_BYTES = 8 * 4


@dataclasses.dataclass(frozen=True)
class Config:
    op: str  # "copy" | "iadb_blend" | "iadb_deblend"
    impl: str  # "copy" | "eager" | "compile" | "fused" (front-end) | "op" (the torch op, no front-end checks)
    backend: str  # diffkern backend of fused/op, "" otherwise
    numel: int
    dtype: str
    device: str


def eager_blend(x0: torch.Tensor, x1: torch.Tensor, alpha: torch.Tensor):
    """The unfused blend and target (separate ops, in the input dtype); returns (x_alpha, x1 - x0)."""
    a = alpha.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return (1 - a) * x0 + a * x1, x1 - x0


def eager_deblend(x: torch.Tensor, d: torch.Tensor, alpha: float, alpha_next: float):
    """The unfused IADB Euler step ``x + (alpha_next - alpha) * d``."""
    return x + (alpha_next - alpha) * d


def _compiled_fn(op: str):
    return harness.compiled(eager_blend if op == "iadb_blend" else eager_deblend)


def get_configs(*, quick: bool = False, backends: list[str] | None = None, device: str = "cpu",
                compile: bool | None = None) -> list[Config]:
    """Every case: ``harness.sweep_sizes`` x float32, bfloat16 x (one copy, then each op's implementations).

    ``compile`` (default: not ``quick``) adds torch.compile of the eager functions (minutes cold on CPU).
    """
    backends = backends if backends is not None else harness.resolve_backends(None, device)
    compile = not quick if compile is None else compile
    impls = [("eager", "")] + ([("compile", "")] if compile else [])
    impls += [(kind, b) for b in backends for kind in ("fused", "op")]
    sizes = harness.sweep_sizes(device, quick, bytes_per_element=PEAK_BYTES)
    cases = [("copy", "copy", "")] + [(op, impl, b) for op in OPS for impl, b in impls]
    # The raw op ("op:") differs from the front-end by a fixed per-call cost, visible at small sizes only: on CUDA
    # it runs at the smallest size alone (40 cases -> 8).
    return harness.compile_last([Config(op, impl, b, n, dt, device) for k, n in enumerate(sizes) for dt in DTYPES
                                 for op, impl, b in cases
                                 if impl != "op" or k == 0 or not device.startswith("cuda")])


def _inputs(config: Config):
    # Drawn on the device: a CPU draw of 2**28 normals takes seconds, and there are dozens of cases per size.
    gen = torch.Generator(config.device).manual_seed(0)
    dtype = DTYPES[config.dtype]
    shape = (BATCH, config.numel // BATCH)
    x0 = torch.randn(shape, generator=gen, device=config.device).to(dtype)
    x1 = torch.randn(shape, generator=gen, device=config.device).to(dtype)
    alpha = torch.rand(BATCH, generator=gen, device=config.device)
    return x0, x1, alpha


def _callable(config: Config):
    import diffkern.ops as dops

    x0, x1, alpha = _inputs(config)
    out = torch.empty_like(x0)
    if config.impl == "copy":
        return lambda: out.copy_(x0)
    if config.op == "iadb_blend":
        if config.impl in ("eager", "compile"):
            fn = eager_blend if config.impl == "eager" else _compiled_fn(config.op)
            return lambda: fn(x0, x1, alpha)
        target = torch.empty_like(x0)
        if config.impl == "fused":
            return lambda: dops.iadb_blend(x0, x1, alpha, out=out, target_out=target, backend=config.backend)
        _, launch = dops.resolve("iadb_blend", x0.device.type, config.backend)
        return lambda: launch(x0, x1, alpha, out, target)
    x, d = x0, x1  # the deblend step's state and the network's direction D
    if config.impl in ("eager", "compile"):
        fn = eager_deblend if config.impl == "eager" else _compiled_fn(config.op)
        return lambda: fn(x, d, ALPHA, ALPHA_NEXT)
    table = dops.coefs.table([dops.iadb.euler_row(ALPHA, ALPHA_NEXT)], device=config.device)
    seed = torch.zeros(1, dtype=torch.int64, device=config.device)
    if config.impl == "fused":
        return lambda: dops.sampler_step(x, d, table, 0, seed=seed, out=out, backend=config.backend)
    _, launch = dops.resolve("sampler_step", x.device.type, config.backend)
    return lambda: launch(x, d, None, None, None, table, 0, seed, out, None, None)


def run(config: Config, *, warmup: int = 3, repeats: int = 20) -> dict:
    """Time one case; returns a result row (no derived ratios: see :func:`add_ratios`)."""
    timing = harness.time_fn(_callable(config), device=config.device, warmup=warmup, repeats=repeats)
    esize = torch.empty(0, dtype=DTYPES[config.dtype]).element_size()
    nbytes = TRAFFIC[config.op] * config.numel * esize
    label = f"{config.impl}:{config.backend}" if config.backend else config.impl
    return {"op": config.op, "impl": label, "backend": config.backend, "dtype": config.dtype, "numel": config.numel,
            "shape": f"{BATCH}x{config.numel // BATCH}", "bytes": nbytes, **harness.timing_columns(timing), "gbps": harness.gbps(nbytes, timing.median_s)}


def add_ratios(rows: list[dict]) -> None:
    """Speed-ups vs eager and vs compile of the same op, and the fraction of the copy bandwidth, per
    (numel, dtype)."""
    def find(r, op, impl):
        return next((o for o in rows if o["op"] == op and o["impl"] == impl and o["numel"] == r["numel"]
                     and o["dtype"] == r["dtype"]), None)

    for r in rows:
        copy, eager, comp = find(r, "copy", "copy"), find(r, r["op"], "eager"), find(r, r["op"], "compile")
        harness.add_ratios(r, copy, eager, comp)


COLUMNS = ("op", "impl", "dtype", "numel", "median_us", "p20_us", "p80_us", "loop_us", "gbps", "frac_copy_bw",
           "frac_peak_bw", "speedup_vs_eager", "speedup_vs_compile", "first_call_ms")


def main(argv: list[str] | None = None) -> int:
    b, rows = harness.run_sweep(__doc__.splitlines()[0], argv, sys.modules[__name__],
                                compile_help="skip torch.compile (its cold compiles take minutes on CPU)")

    def plot(rows, path):
        # One panel per (op, dtype), each with the copy of that dtype as the yardstick line.
        lines = [{**r, "panel": f"{op} {r['dtype']}"} for op in OPS for r in rows if r["op"] in (op, "copy")]
        return harness.plot_lines(lines, path, x="numel", y="gbps", series="impl", panel="panel", ylog=True,
                                  ylabel="GB/s (blend 4 tensors, deblend 3, copy 2)",
                                  title=f"IADB blend / deblend on {b.prov['device_name']}\ntorch {b.prov['torch']}, "
                                        f"{b.prov['git_sha'][:12]}, load {b.prov['loadavg_1m']}")
    return b.finish("iadb_blend", rows, COLUMNS, what="IADB blend and deblend", plot=plot)


if __name__ == "__main__":
    sys.exit(main())
