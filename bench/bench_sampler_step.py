"""Fused sampler step vs the unfused eager PyTorch sequence of the same maths vs ``torch.compile`` of it.

The maths is one VP-DDIM step with eps-prediction (``math-samplers.md`` 5), as diffusers' scheduler runs
it: ``x0 = (z - sqrt(1-ab)*eps)/sqrt(ab)`` then ``z' = sqrt(ab')*x0 + sqrt(1-ab'-std^2)*eps [+ std*xi]``,
deterministic (eta = 0) or with noise (eta = 1; eager and compile draw ``torch.randn_like``, the fused
op draws Philox normals in the kernel). The fused op is ``sampler_step`` with the ``ddim_row`` table,
writing into a preallocated ``out`` (how a sampling loop calls it).

Sizes (``harness.sweep_sizes``): 2**20 .. 2**28 elements on CUDA (those that fit: 2**28 float32 is 1 GiB a
tensor), 2**16 .. 2**26 on CPU, 2**16 under ``--quick``; float32 and bfloat16.

Bytes: every implementation is charged the minimal traffic of the step, reading z and eps and writing
z' (3 tensors), so GB/s compares like with like; the yardstick is ``dst.copy_(src)`` (2 tensors) of the
same size, measured in the same run.

    python bench/bench_sampler_step.py [--quick] [--out DIR] [--backends cpp,reference] [--no-compile]
"""
from __future__ import annotations

import dataclasses
import math
import sys

import torch

try:
    from bench import harness
except ImportError:  # run as a script from bench/
    import harness

AB, AB_PREV = 0.5, 0.6  # one mid-schedule DDIM step; the cost does not depend on the values
# Peak bytes per element of the largest case: z, eps and up to 6 float32 temporaries of the eager noisy step.
PEAK_BYTES = 8 * 4
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class Config:
    impl: str  # "copy" | "eager" | "compile" | "fused" (front-end) | "op" (the torch op, no front-end checks)
    backend: str  # diffkern backend of fused/op, "" otherwise
    numel: int
    dtype: str
    noise: bool
    device: str


def _coefs(eta: float) -> dict:
    var = (1 - AB_PREV) / (1 - AB) * (1 - AB / AB_PREV)
    std = eta * math.sqrt(var)
    return {"sa": math.sqrt(AB), "sb": math.sqrt(1 - AB), "sa_prev": math.sqrt(AB_PREV),
            "k": math.sqrt(1 - AB_PREV - std * std), "std": std}


def eager_step(z: torch.Tensor, eps: torch.Tensor, sa: float, sb: float, sa_prev: float, k: float, std: float):
    """The unfused sequence (separate ops, like ``DDIMScheduler.step``); returns z'."""
    x0 = (z - sb * eps) / sa
    prev = sa_prev * x0 + k * eps
    if std > 0:
        prev = prev + std * torch.randn_like(z)
    return prev


def _compiled_step():
    return harness.compiled(eager_step)


def get_configs(*, quick: bool = False, backends: list[str] | None = None, device: str = "cpu",
                compile: bool | None = None) -> list[Config]:
    """Every case of the sweep: ``harness.sweep_sizes`` (CUDA 2**20..2**28, CPU 2**16..2**26, quick 2**16),
    float32 and bfloat16, eta 0 and 1.

    ``compile`` (default: not ``quick``) adds torch.compile of the eager sequence: one cold inductor
    compile of this graph took ~80 s on the 2-core CI CPU, too long for a smoke run.
    """
    backends = backends if backends is not None else harness.resolve_backends(None, device)
    compile = not quick if compile is None else compile
    sizes = harness.sweep_sizes(device, quick, bytes_per_element=PEAK_BYTES)
    impls = [("copy", ""), ("eager", "")] + ([("compile", "")] if compile else [])
    impls += [(kind, b) for b in backends for kind in ("fused", "op")]
    return [Config(impl, b, n, dt, noise, device) for n in sizes for dt in DTYPES for noise in (False, True)
            for impl, b in impls if not (impl == "copy" and noise)]


def _inputs(config: Config):
    # Drawn on the device: a CPU draw of 2**28 normals takes seconds, and there are dozens of cases per size.
    gen = torch.Generator(config.device).manual_seed(0)
    dtype = DTYPES[config.dtype]
    z = torch.randn(config.numel, generator=gen, device=config.device).to(dtype)
    eps = torch.randn(config.numel, generator=gen, device=config.device).to(dtype)
    return z, eps


def _callable(config: Config):
    import diffkern.ops as dops

    z, eps = _inputs(config)
    c = _coefs(1.0 if config.noise else 0.0)
    if config.impl == "copy":
        dst = torch.empty_like(z)
        return lambda: dst.copy_(z)
    if config.impl == "eager":
        return lambda: eager_step(z, eps, **c)
    if config.impl == "compile":
        fn = _compiled_step()
        return lambda: fn(z, eps, **c)
    table = dops.coefs.table([dops.ddim_row(AB, AB_PREV, eta=1.0 if config.noise else 0.0)], device=config.device)
    seed = torch.tensor([1234], dtype=torch.int64, device=config.device)
    out = torch.empty_like(z)
    if config.impl == "fused":
        return lambda: dops.sampler_step(z, eps, table, 0, seed=seed, out=out, backend=config.backend)
    _, launch = dops.resolve("sampler_step", z.device.type, config.backend)
    return lambda: launch(z, eps, None, None, None, table, 0, seed, out, None, None)


def run(config: Config, *, warmup: int = 3, repeats: int = 20) -> dict:
    """Time one case; returns a result row (no derived ratios: see :func:`add_ratios`)."""
    timing = harness.time_fn(_callable(config), device=config.device, warmup=warmup, repeats=repeats)
    esize = torch.empty(0, dtype=DTYPES[config.dtype]).element_size()
    nbytes = (2 if config.impl == "copy" else 3) * config.numel * esize
    label = f"{config.impl}:{config.backend}" if config.backend else config.impl
    return {"op": "sampler_step", "impl": label, "backend": config.backend, "dtype": config.dtype,
            "numel": config.numel, "noise": config.noise, "bytes": nbytes, **harness.timing_columns(timing),
            "gbps": harness.gbps(nbytes, timing.median_s)}


def add_ratios(rows: list[dict]) -> None:
    """Speed-ups vs eager and vs compile, and the fraction of the copy bandwidth, per (numel, dtype, noise)."""
    def find(r, impl, noise):
        return next((o for o in rows if o["impl"] == impl and o["numel"] == r["numel"] and o["dtype"] == r["dtype"]
                     and o["noise"] == noise), None)

    for r in rows:
        copy, eager, comp = find(r, "copy", False), find(r, "eager", r["noise"]), find(r, "compile", r["noise"])
        harness.add_ratios(r, copy, eager, comp)


COLUMNS = ("impl", "dtype", "numel", "noise", "median_us", "p20_us", "p80_us", "loop_us", "gbps", "frac_copy_bw",
           "speedup_vs_eager", "speedup_vs_compile", "first_call_ms")


def main(argv: list[str] | None = None) -> int:
    b, rows = harness.run_sweep(__doc__.splitlines()[0], argv, sys.modules[__name__],
                                compile_help="skip torch.compile (its cold compile takes minutes on CPU)")

    def plot(rows, path):
        return harness.plot_lines([{**r, "series": r["impl"] + (" +noise" if r["noise"] else "")} for r in rows], path,
                                  x="numel", y="gbps", series="series", panel="dtype", ylog=True,
                                  ylabel="GB/s (3 tensors of traffic; copy: 2)",
                                  title=f"sampler_step (VP-DDIM) on {b.prov['device_name']}\ntorch {b.prov['torch']}, "
                                        f"{b.prov['git_sha'][:12]}, load {b.prov['loadavg_1m']}")
    return b.finish("sampler_step", rows, COLUMNS, what="sampler_step", plot=plot)


if __name__ == "__main__":
    sys.exit(main())
