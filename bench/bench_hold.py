"""Fused HOLD transition and forward perturbation vs their eager PyTorch compositions vs ``torch.compile`` of them.

Two ops (``math-hold.md`` 6.2, 9; ``diffkern.ops.hold``), on states (B, n*C, H, W) of order n = 2, 3, 6:

* ``hold_transition``: one fused-SSCS sampler step ``z <- K z + k eps_hat + C eta`` per element (a
  mid-schedule row of ``diffkern.hold_sampling.sampler_table``). Eager, what one writes without the op:
  ``einsum(K, z) + k * eps_hat + einsum(C, randn_like(z))`` (four kernels plus the normals). Bytes: read z
  (n data tensors) and eps_hat (1), write z' (n): 2n + 1 data tensors.
* ``hold_perturb``: the training perturbation ``z_t = M x0 + L_t eps`` with m = 1 (x0 only) and per-sample
  matrices ``HOLD(n).perturb_matrices(t)`` for t uniform in (0, T] (built once, untimed), writing the
  regression target eps_n to ``eps_out`` as ``HOLD.perturb`` does. Eager: ``M * x0 + bmm(L, randn)`` and the
  view ``eps[:, n-1]`` (the normals, two kernels and the add). Bytes: read x0 (1), write z_t (n) and
  eps_n (1): n + 2 data tensors.

Not counted: the transition's table row (n(2n+1) float64) and the per-sample float64 matrices of the
perturbation (B n (n+1) values, under 0.2% of the counted bytes at the smallest CUDA size), each read from
memory once and then from cache; the seed. Philox normals are computed, not read.

The fused cases are the front-end (``hold_transition`` / ``hold_perturb``, ``fused``) or the raw torch op
(``op``), writing preallocated outputs with Philox normals drawn in the kernel; ``compile`` is
``torch.compile(fullgraph=True)`` of the eager function (``--no-compile`` or ``--quick`` skips it). States
are float32 and bfloat16: the eager and compiled maths run in the state's dtype (matrices cast to it), the
fused ops compute in float32. Shapes: (2, n*3, 16, 16) under ``--quick``, (64, n*3, 64, 64) on CPU; on CUDA
(B, n*4, 64, 64) states of about 2**20 .. 2**28 elements (B picked per n; the sizes of
``harness.sweep_sizes`` that fit in memory). The yardstick is ``dst.copy_(src)`` of the state (2n data
tensors) in the same dtype, measured in the same run.

    python bench/bench_hold.py [--quick] [--out DIR] [--backends cpp] [--threads 1] [--no-compile]
"""
from __future__ import annotations

import dataclasses
import functools
import math
import sys

import torch

try:
    from bench import harness
except ImportError:  # run as a script from bench/
    import harness

ORDERS = (2, 3, 6)
OPS = ("hold_transition", "hold_perturb")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CUDA_DATA = (4, 64, 64)  # (C, H, W) of one sample's data on CUDA: 2**14 elements
# Peak bytes per state element: z, eps_hat and the eager transition's float32 temporaries (eta, two einsums, sums).
PEAK_BYTES = 8 * 4


@dataclasses.dataclass(frozen=True)
class Config:
    op: str  # "copy" | "hold_transition" | "hold_perturb"
    impl: str  # "copy" | "eager" | "compile" | "fused" (front-end) | "op" (the torch op, no front-end checks)
    backend: str  # diffkern backend of fused/op, "" otherwise
    n: int
    shape: tuple  # data shape (B, C, H, W); the state is (B, n*C, H, W)
    dtype: str
    device: str


def eager_transition(z: torch.Tensor, eps_hat: torch.Tensor, K: torch.Tensor, k: torch.Tensor, C: torch.Tensor,
                     noise: torch.Tensor | None = None):
    """The unfused composition: z (B, n*C, H, W), eps_hat (B, C, H, W), K, C (n, n), k (n,) -> z'.

    ``noise``: the normals eta shaped like z (default ``randn_like(z)``; given only to compare with the op)."""
    B, n = z.shape[0], K.shape[0]
    zr = z.view(B, n, -1)
    eta = torch.randn_like(zr) if noise is None else noise.view(B, n, -1)
    out = torch.einsum("ij,bjp->bip", K, zr) + k[:, None] * eps_hat.view(B, 1, -1)
    return (out + torch.einsum("ij,bjp->bip", C, eta)).reshape(z.shape)


def eager_perturb(x0: torch.Tensor, mean_mat: torch.Tensor, chol: torch.Tensor, noise: torch.Tensor | None = None):
    """The unfused perturbation: x0 (B, C, H, W), mean_mat (B, n, 1), chol (B, n, n) -> (z_t (B, n*C, H, W), eps_n).

    Runs in x0's dtype; ``noise``: eps shaped like z_t (default ``torch.randn``; given only to compare with the op).
    eps_n is the view ``eps[:, n-1]``, as a training loop would use it."""
    B, n = chol.shape[0], chol.shape[1]
    x = x0.reshape(B, 1, -1)
    if noise is None:
        eps = torch.randn(B, n, x.shape[2], dtype=x0.dtype, device=x0.device)
    else:
        eps = noise.reshape(B, n, -1)
    z = mean_mat.to(x0.dtype) * x + torch.bmm(chol.to(x0.dtype), eps)
    return z.reshape(B, n * x0.shape[1], *x0.shape[2:]), eps[:, n - 1].reshape(x0.shape)


def data_shapes(n: int, device: str, quick: bool = False) -> list[tuple]:
    """Data shapes (B, C, H, W) of order n: (2, 3, 16, 16) under ``quick``, (64, 3, 64, 64) on CPU, and on CUDA
    batches of CUDA_DATA whose state (n times the data) is closest to each of ``harness.sweep_sizes``."""
    if quick:
        return [(2, 3, 16, 16)]
    if not device.startswith("cuda"):
        return [(64, 3, 64, 64)]
    per_sample = n * CUDA_DATA[0] * CUDA_DATA[1] * CUDA_DATA[2]
    sizes = harness.sweep_sizes(device, False, bytes_per_element=PEAK_BYTES)
    return [(max(1, round(size / per_sample)), *CUDA_DATA) for size in sizes]


def get_configs(*, quick: bool = False, backends: list[str] | None = None, device: str = "cpu",
                compile: bool | None = None) -> list[Config]:
    """n = 2, 3, 6, each on its :func:`data_shapes`, float32 and bfloat16: one copy, then each op's cases.

    ``compile`` (default: not ``quick``) adds torch.compile of the eager compositions (minutes cold on CPU)."""
    backends = backends if backends is not None else harness.resolve_backends(None, device)
    compile = not quick if compile is None else compile
    impls = [("eager", "")] + ([("compile", "")] if compile else [])
    impls += [(kind, b) for b in backends for kind in ("fused", "op")]
    cases = [("copy", "copy", "")] + [(op, impl, b) for op in OPS for impl, b in impls]
    # The raw op ("op:") differs from the front-end by a fixed per-call cost, visible at the smallest size only:
    # on the CUDA sweep it runs there alone (390 cases -> 294, inside gpu_suite.sh's time cap).
    return harness.compile_last([Config(op, impl, b, n, shape, dt, device) for n in ORDERS
                                 for k, shape in enumerate(data_shapes(n, device, quick)) for dt in DTYPES
                                 for op, impl, b in cases if impl != "op" or k == 0],
                                numel=lambda c: c.n * math.prod(c.shape))


@functools.lru_cache(maxsize=None)  # one table per (n, device), shared by the cases of the sweep
def _step(n: int, device: str):
    """(table (1, n, 2n+1) float64, K, k, C float64) of one mid-schedule fused SSCS step of HOLD(n)."""
    from diffkern.hold import HOLD
    from diffkern.hold_sampling import sampler_table, time_grid

    proc = HOLD(n)
    table = sampler_table(proc, time_grid(proc, 100), "sscs", denoise=False)[50:51].contiguous().to(device)
    return table, table[0, :, :n], table[0, :, n], table[0, :, n + 1:]


def _perturb_matrices(n: int, B: int, device: str, gen: torch.Generator):
    """Per-sample (mean_mat (B, n, 1), chol (B, n, n)) float64 at training times t ~ U(0, T]."""
    from diffkern.hold import HOLD

    proc = HOLD(n)
    t = proc.T * (1 - torch.rand(B, generator=gen, device=device, dtype=torch.float64))
    return proc.perturb_matrices(t)


def _compiled_fn(op: str):
    return harness.compiled(eager_transition if op == "hold_transition" else eager_perturb)


def _transition_callable(config: Config, gen: torch.Generator, dtype: torch.dtype):
    import diffkern.ops as dops

    n, (B, Cc, H, W) = config.n, config.shape
    z = torch.randn(B, n * Cc, H, W, generator=gen, device=config.device).to(dtype)
    eps = torch.randn(B, Cc, H, W, generator=gen, device=config.device).to(dtype)
    table, K, k, C = _step(n, config.device)
    if config.impl in ("eager", "compile"):
        fn = eager_transition if config.impl == "eager" else _compiled_fn(config.op)
        K, k, C = K.to(dtype), k.to(dtype), C.to(dtype)
        return lambda: fn(z, eps, K, k, C)
    out, seed = torch.empty_like(z), torch.tensor([1234], dtype=torch.int64, device=config.device)
    if config.impl == "fused":
        return lambda: dops.hold_transition(z, eps, table, 0, seed=seed, out=out, backend=config.backend)
    _, launch = dops.resolve("hold_transition", z.device.type, config.backend)
    return lambda: launch(z, eps, None, table, 0, seed, out)


def _perturb_callable(config: Config, gen: torch.Generator, dtype: torch.dtype):
    import diffkern.ops as dops

    n, (B, Cc, H, W) = config.n, config.shape
    x0 = torch.randn(B, Cc, H, W, generator=gen, device=config.device).to(dtype)
    mean_mat, chol = _perturb_matrices(n, B, config.device, gen)
    if config.impl in ("eager", "compile"):
        fn = eager_perturb if config.impl == "eager" else _compiled_fn(config.op)
        return lambda: fn(x0, mean_mat, chol)
    out = torch.empty(B, n * Cc, H, W, dtype=dtype, device=config.device)
    eps_out, seed = torch.empty_like(x0), torch.tensor([1234], dtype=torch.int64, device=config.device)
    if config.impl == "fused":
        return lambda: dops.hold_perturb(x0, mean_mat, chol, seed=seed, out=out, eps_out=eps_out,
                                         backend=config.backend)
    _, launch = dops.resolve("hold_perturb", x0.device.type, config.backend)
    return lambda: launch(x0, mean_mat, chol, None, 0, seed, out, eps_out)


def _callable(config: Config):
    gen = torch.Generator(config.device).manual_seed(0)  # on the device: a CPU draw of 2**28 takes seconds
    dtype = DTYPES[config.dtype]
    if config.impl == "copy":
        n, (B, Cc, H, W) = config.n, config.shape
        z = torch.randn(B, n * Cc, H, W, generator=gen, device=config.device).to(dtype)
        out = torch.empty_like(z)
        return lambda: out.copy_(z)
    make = _transition_callable if config.op == "hold_transition" else _perturb_callable
    return make(config, gen, dtype)


TRAFFIC = {"copy": lambda n: 2 * n, "hold_transition": lambda n: 2 * n + 1, "hold_perturb": lambda n: n + 2}


def run(config: Config, *, warmup: int = 3, repeats: int = 20) -> dict:
    """Time one case; returns a result row (ratios: :func:`add_ratios`)."""
    timing = harness.time_fn(_callable(config), device=config.device, warmup=warmup, repeats=repeats)
    n, (B, Cc, H, W) = config.n, config.shape
    per_tensor = B * Cc * H * W * torch.empty(0, dtype=DTYPES[config.dtype]).element_size()  # one (B, C, H, W)
    nbytes = TRAFFIC[config.op](n) * per_tensor
    label = f"{config.impl}:{config.backend}" if config.backend else config.impl
    return {"op": config.op, "impl": label, "backend": config.backend, "dtype": config.dtype, "n": n,
            "state_shape": f"{B}x{n * Cc}x{H}x{W}", "numel": n * B * Cc * H * W, "bytes": nbytes,
            **harness.timing_columns(timing), "gbps": harness.gbps(nbytes, timing.median_s)}


def add_ratios(rows: list[dict]) -> None:
    """Speed-ups vs eager and vs compile of the same op, and the fraction of the copy bandwidth, per
    (order n, state shape, dtype)."""
    def find(r, op, impl):
        return next((o for o in rows if o["op"] == op and o["impl"] == impl and o["n"] == r["n"]
                     and o["state_shape"] == r["state_shape"] and o["dtype"] == r["dtype"]), None)

    for r in rows:
        harness.add_ratios(r, find(r, "copy", "copy"), find(r, r["op"], "eager"), find(r, r["op"], "compile"))


COLUMNS = ("op", "impl", "dtype", "n", "state_shape", "numel", "median_us", "p20_us", "p80_us", "loop_us", "gbps",
           "frac_copy_bw", "frac_peak_bw", "speedup_vs_eager", "speedup_vs_compile", "first_call_ms")


def main(argv: list[str] | None = None) -> int:
    b, rows = harness.run_sweep(__doc__.splitlines()[0], argv, sys.modules[__name__],
                                compile_help="skip torch.compile (its cold compiles take minutes on CPU)")

    def plot(rows, path):
        if len({r["state_shape"] for r in rows}) > len(ORDERS):  # the CUDA sweep: GB/s against size
            # A panel per (op, n), each with the copy of its states; the raw "op:" cases (the front-end's
            # twins) stay in the CSV only, to keep the lines readable.
            lines = [{**r, "panel": f"{op} n={r['n']}", "series": f"{r['impl']} {r['dtype']}"}
                     for op in OPS for r in rows if r["op"] in (op, "copy") and not r["impl"].startswith("op:")]
            return harness.plot_lines(lines, path, x="numel", y="gbps", series="series", panel="panel", ylog=True,
                                      ylabel="GB/s (minimal bytes read + written)",
                                      title=f"HOLD transition (2n+1 data tensors) / perturb (n+2; copy 2n) on "
                                            f"{b.prov['device_name']}\n"
                                            f"torch {b.prov['torch']}, {b.prov['git_sha'][:12]}, "
                                            f"load {b.prov['loadavg_1m']}")
        timed = [r for r in rows if r["op"] != "copy"]
        labels = [f"{r['op'][5:]} n={r['n']} {r['dtype']} {r['impl']}" for r in timed]
        return harness.plot_bars(labels, [r["median_us"] / 1e3 for r in timed], path,
                                 xlabel="median time per call (ms)",
                                 title=f"HOLD transition / perturb, {b.prov['device_name']}")
    return b.finish("hold", rows, COLUMNS, what="HOLD transition and perturbation", plot=plot)


if __name__ == "__main__":
    sys.exit(main())
