"""Fused HOLD transition vs the eager PyTorch composition of the same maths (einsum + randn + adds).

One fused-SSCS step of order n (``math-hold.md`` 6.2, ``diffkern.hold_sampling``):
``z <- K z + k eps_hat + C eta`` per element, on a float32 state, n = 2, 3, 6: (64, n*3, 64, 64) on CPU
(quick: (2, n*3, 16, 16)); on CUDA (B, n*4, 64, 64) states of about 2**20 .. 2**28 elements (B picked per n;
the sizes of ``harness.sweep_sizes`` that fit in memory).
The eager baseline is what one writes without the op:
``einsum(K, z) + k * eps_hat + einsum(C, randn_like(z))`` (four kernels plus the normals); the fused
op is ``hold_transition`` (front-end, ``fused``) or the raw torch op (``op``), writing a preallocated
output with Philox normals drawn in the kernel.

Bytes: every implementation is charged the minimal traffic of the step, reading z (n components) and
eps_hat (1) and writing z' (n): (2n + 1) data tensors; the yardstick is ``dst.copy_(src)`` of the
state (2n data tensors), measured in the same run.

    python bench/bench_hold.py [--quick] [--out DIR] [--backends cpp] [--threads 1]
"""
from __future__ import annotations

import dataclasses
import functools
import sys

import torch

try:
    from bench import harness
except ImportError:  # run as a script from bench/
    import harness

ORDERS = (2, 3, 6)
CUDA_DATA = (4, 64, 64)  # (C, H, W) of one sample's data on CUDA: 2**14 elements
# Peak bytes per state element: z, eps_hat and the eager composition's float32 temporaries (eta, two einsums, sums).
PEAK_BYTES = 8 * 4


@dataclasses.dataclass(frozen=True)
class Config:
    impl: str  # "copy" | "eager" | "fused" (front-end) | "op" (the torch op, no front-end checks)
    backend: str  # diffkern backend of fused/op, "" otherwise
    n: int
    shape: tuple  # data shape (B, C, H, W); the state is (B, n*C, H, W)
    device: str


def eager_transition(z: torch.Tensor, eps_hat: torch.Tensor, K: torch.Tensor, k: torch.Tensor, C: torch.Tensor):
    """The unfused composition: z (B, n*C, H, W), eps_hat (B, C, H, W), K, C (n, n), k (n,) -> z'."""
    B, n = z.shape[0], K.shape[0]
    zr = z.view(B, n, -1)
    eta = torch.randn_like(zr)
    out = torch.einsum("ij,bjp->bip", K, zr) + k[:, None] * eps_hat.view(B, 1, -1)
    return (out + torch.einsum("ij,bjp->bip", C, eta)).reshape(z.shape)


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


def get_configs(*, quick: bool = False, backends: list[str] | None = None, device: str = "cpu") -> list[Config]:
    """n = 2, 3, 6, each on its :func:`data_shapes`; float32."""
    backends = backends if backends is not None else harness.resolve_backends(None, device)
    impls = [("copy", ""), ("eager", "")] + [(kind, b) for b in backends for kind in ("fused", "op")]
    return [Config(impl, b, n, shape, device) for n in ORDERS for shape in data_shapes(n, device, quick)
            for impl, b in impls]


@functools.lru_cache(maxsize=None)  # one table per (n, device), shared by the cases of the sweep
def _step(n: int, device: str):
    """(table (1, n, 2n+1) float64, K, k, C float32) of one mid-schedule fused SSCS step of HOLD(n)."""
    from diffkern.hold import HOLD
    from diffkern.hold_sampling import sampler_table, time_grid

    proc = HOLD(n)
    table = sampler_table(proc, time_grid(proc, 100), "sscs", denoise=False)[50:51].contiguous().to(device)
    K, k, C = table[0, :, :n], table[0, :, n], table[0, :, n + 1:]
    return table, K.float(), k.float(), C.float()


def _callable(config: Config):
    import diffkern.ops as dops

    n, (B, Cc, H, W) = config.n, config.shape
    gen = torch.Generator(config.device).manual_seed(0)  # on the device: a CPU draw of 2**28 takes seconds
    z = torch.randn(B, n * Cc, H, W, generator=gen, device=config.device)
    eps = torch.randn(B, Cc, H, W, generator=gen, device=config.device)
    table, K, k, C = _step(n, config.device)
    out = torch.empty_like(z)
    if config.impl == "copy":
        return lambda: out.copy_(z)
    if config.impl == "eager":
        return lambda: eager_transition(z, eps, K, k, C)
    seed = torch.tensor([1234], dtype=torch.int64, device=config.device)
    if config.impl == "fused":
        return lambda: dops.hold_transition(z, eps, table, 0, seed=seed, out=out, backend=config.backend)
    _, launch = dops.resolve("hold_transition", z.device.type, config.backend)
    return lambda: launch(z, eps, None, table, 0, seed, out)


def run(config: Config, *, warmup: int = 3, repeats: int = 20) -> dict:
    """Time one case; returns a result row (ratios: :func:`add_ratios`)."""
    timing = harness.time_fn(_callable(config), device=config.device, warmup=warmup, repeats=repeats)
    n, (B, Cc, H, W) = config.n, config.shape
    per_tensor = B * Cc * H * W * 4  # one data tensor (B, C, H, W) of float32
    nbytes = (2 * n if config.impl == "copy" else 2 * n + 1) * per_tensor
    label = f"{config.impl}:{config.backend}" if config.backend else config.impl
    return {"op": "hold_transition", "impl": label, "backend": config.backend, "n": n,
            "state_shape": f"{B}x{n * Cc}x{H}x{W}", "numel": n * B * Cc * H * W, "bytes": nbytes,
            **harness.timing_columns(timing), "gbps": harness.gbps(nbytes, timing.median_s)}


def add_ratios(rows: list[dict]) -> None:
    """Speed-up vs eager and fraction of the copy bandwidth, per order n and state shape."""
    def find(r, impl):
        return next((o for o in rows if o["impl"] == impl and o["state_shape"] == r["state_shape"]), None)

    for r in rows:
        copy, eager = find(r, "copy"), find(r, "eager")
        r["frac_copy_bw"] = r["gbps"] / copy["gbps"] if copy else float("nan")
        r["speedup_vs_eager"] = eager["median_us"] / r["median_us"] if eager else float("nan")


COLUMNS = ("impl", "n", "state_shape", "numel", "median_us", "p20_us", "p80_us", "gbps", "frac_copy_bw",
           "speedup_vs_eager", "first_call_ms")


def main(argv: list[str] | None = None) -> int:
    b = harness.start(harness.parser(__doc__.splitlines()[0]), argv)
    configs = get_configs(quick=b.args.quick, backends=b.backends(), device=b.device)
    with b.measuring():
        rows = [run(c, warmup=b.warmup, repeats=b.repeats) for c in configs]
    add_ratios(rows)

    def plot(rows, path):
        if len({r["state_shape"] for r in rows}) > len(ORDERS):  # the CUDA sweep: GB/s against size, a panel per n
            return harness.plot_lines([{**r, "panel": f"n={r['n']}"} for r in rows], path, x="numel", y="gbps",
                                      series="impl", panel="panel", ylog=True,
                                      ylabel="GB/s ((2n+1) data tensors of traffic; copy: 2n)",
                                      title=f"HOLD transition float32 on {b.prov['device_name']}\n"
                                            f"{b.prov['git_sha'][:12]}, load {b.prov['loadavg_1m']}")
        timed = [r for r in rows if r["impl"] != "copy"]
        return harness.plot_bars([f"n={r['n']} {r['impl']}" for r in timed], [r["median_us"] / 1e3 for r in timed],
                                 path, xlabel="median time per step (ms)",
                                 title=f"HOLD transition, {b.prov['device_name']}")
    return b.finish("hold", rows, COLUMNS, what="HOLD transition", plot=plot)


if __name__ == "__main__":
    sys.exit(main())
