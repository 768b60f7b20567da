"""The empirical optimal denoiser (Chen et al. 4.4): the fused Triton kernel vs eager PyTorch vs the chunked
float64 ``EmpiricalDenoiser``, in TFLOP/s against the device's matmul peak measured in the same run.

Work: ``D(x) = softmax((x Y^T - ||y||^2/2)/sigma^2) Y`` is two (B, N, D) GEMMs, 4*B*N*D flops, charged
to every implementation. The yardstick is ``torch.matmul`` of two square matrices of the same dtype
(float32 without TF32, since the kernel's float32 dots are IEEE), so ``frac_peak`` is the fraction of
what the device's own GEMM reaches here (the run turns TF32 off, whatever the process had set).
``eager`` is the op's reference (``optimal_denoiser_reference``: the (B, N) logits materialised, then
softmax and a GEMM; it computes in float32 for bfloat16 inputs, casting the dataset on every call, so its
bfloat16 row is float32 work and no bfloat16 GEMM rival), ``chunked`` the streaming float64 PyTorch
version in ``diffkern.analytic``.

Default sizes: CIFAR-10 scale on CUDA (B = 256, N = 50,000, D = 3,072); ``--quick`` runs small sizes
on CPU (B = 8, N = 300, D = 48). ``--sweep`` adds the Triton block configurations of
``kernels/optimal_denoiser.py`` (SWEEP_CONFIGS), timed through the launcher.

    python bench/bench_optimal_denoiser.py [--quick] [--sweep] [--out DIR] [--backends triton]
"""
from __future__ import annotations

import dataclasses
import sys

import torch

try:
    from bench import harness
except ImportError:  # run as a script from bench/
    import harness

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
SIGMA = 20.0  # a mid-schedule noise level for data of std 0.5 in 3,072 dimensions; the cost does not depend on it


@dataclasses.dataclass(frozen=True)
class Config:
    impl: str  # "matmul" (yardstick) | "eager" | "chunked" | "reference" | "triton" | "triton[<blocks>]"
    dtype: str
    batch: int
    n: int
    dim: int
    device: str
    blocks: tuple = ()  # (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) for a sweep entry


def _sizes(quick: bool, device: str) -> tuple[int, int, int]:
    if quick:
        return 8, 300, 48
    return (256, 50_000, 3072) if device.startswith("cuda") else (32, 5_000, 3072)


def matmul_size(quick: bool, device: str) -> int:
    return 256 if quick else (8192 if device.startswith("cuda") else 1024)


def get_configs(*, quick: bool = False, backends: list[str] | None = None, device: str = "cpu",
                sweep: bool = False) -> list[Config]:
    """The cases: per dtype the matmul yardstick, eager, each backend (and the sweep), plus chunked float64."""
    batch, n, dim = _sizes(quick, device)
    if backends is None:
        backends = ["triton"] if device.startswith("cuda") else ["reference"]
    dtypes = ("bfloat16", "float32")
    configs = []
    for dt in dtypes:
        configs += [Config("matmul", dt, batch, n, dim, device), Config("eager", dt, batch, n, dim, device)]
        configs += [Config(b, dt, batch, n, dim, device) for b in backends if b != "reference" or dt == "float32"]
        if sweep and "triton" in backends:
            from diffkern.kernels.optimal_denoiser import SWEEP_CONFIGS

            for c in SWEEP_CONFIGS:
                blocks = (c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_D"], c["num_warps"], c["num_stages"])
                label = "triton[{}x{}x{} w{} s{}]".format(*blocks)
                configs.append(Config(label, dt, batch, n, dim, device, blocks))
    configs += [Config("matmul", "float64", batch, n, dim, device), Config("chunked", "float64", batch, n, dim, device)]
    return configs


def _inputs(config: Config):
    gen = torch.Generator().manual_seed(0)
    dtype = DTYPES[config.dtype]
    data = (torch.randn(config.n, config.dim, generator=gen) * 0.5).to(dtype).to(config.device)
    idx = torch.randint(0, config.n, (config.batch,), generator=gen)
    noise = torch.randn(config.batch, config.dim, generator=gen).to(config.device)
    x = (data[idx.to(config.device)].float() + SIGMA * 0.05 * noise).to(dtype)
    sigma = torch.full((config.batch,), SIGMA, device=config.device,
                       dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return x, data, sigma


def _callable(config: Config, quick: bool):
    import diffkern.ops as dops
    from diffkern import analytic
    from diffkern.ops.optimal_denoiser import half_sq_norms, optimal_denoiser_reference

    if config.impl == "matmul":
        size = matmul_size(quick, config.device)
        a = torch.randn(size, size, device=config.device).to(DTYPES[config.dtype])
        b = torch.randn(size, size, device=config.device).to(DTYPES[config.dtype])
        return lambda: torch.matmul(a, b)
    x, data, sigma = _inputs(config)
    if config.impl == "eager":
        return lambda: optimal_denoiser_reference(x, data, sigma)
    if config.impl == "chunked":
        model = analytic.EmpiricalDenoiser(data, chunk_size=4096)
        return lambda: model.denoise(x, sigma)
    half_sq = half_sq_norms(data)  # per dataset, computed once (as EmpiricalDenoiser caches it)
    out = torch.empty_like(x)
    if config.blocks:
        from diffkern.kernels.optimal_denoiser import optimal_denoiser_launch

        keys = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "num_warps", "num_stages")
        cfg = dict(zip(keys, config.blocks))
        return lambda: optimal_denoiser_launch(x, data, half_sq, sigma, out, cfg)
    return lambda: dops.optimal_denoiser(x, data, sigma, data_half_sq=half_sq, out=out, backend=config.impl)


def flops(config: Config, quick: bool) -> float:
    if config.impl == "matmul":
        return 2.0 * matmul_size(quick, config.device) ** 3
    return 4.0 * config.batch * config.n * config.dim


def run(config: Config, *, quick: bool = False, warmup: int = 3, repeats: int = 20) -> dict:
    """Time one case; returns a result row (``frac_peak`` is added by :func:`add_ratios`)."""
    timing = harness.time_fn(_callable(config, quick), device=config.device, warmup=warmup, repeats=repeats)
    work = flops(config, quick)
    return {"op": "optimal_denoiser", "impl": config.impl, "dtype": config.dtype, "batch": config.batch,
            "n": config.n, "dim": config.dim, "flop": work, **harness.timing_columns(timing),
            "tflops": work / timing.median_s / 1e12}


def add_ratios(rows: list[dict]) -> None:
    """``peak_tflops``: the matmul row of the same dtype; ``frac_peak``: the case's share of it."""
    peaks = {r["dtype"]: r["tflops"] for r in rows if r["impl"] == "matmul"}
    for r in rows:
        r["peak_tflops"] = peaks.get(r["dtype"], float("nan"))
        r["frac_peak"] = r["tflops"] / r["peak_tflops"]


def check_outputs(configs: list[Config], quick: bool) -> dict:
    """Max |impl - eager| per timed denoiser case (what is timed is also what is verified)."""
    from diffkern.ops.optimal_denoiser import optimal_denoiser_reference

    errors = {}
    for c in configs:
        if c.impl == "matmul":
            continue
        x, data, sigma = _inputs(c)
        expected = optimal_denoiser_reference(x.double(), data.double(), sigma.double())
        errors[c] = float((_callable(c, quick)().double() - expected).abs().max())
    return errors


COLUMNS = ("impl", "dtype", "batch", "n", "dim", "median_us", "p20_us", "p80_us", "tflops", "peak_tflops",
           "frac_peak", "max_err_vs_f64", "first_call_ms")


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__.splitlines()[0])
    p.add_argument("--sweep", action="store_true", help="also time the Triton block configurations (SWEEP_CONFIGS)")
    b = harness.start(p, argv, name="optimal_denoiser")
    backends = b.backends() if b.args.backends else None
    unknown = [name for name in backends or () if name not in ("reference", "triton")]
    if unknown:
        raise ValueError(f"--backends: optimal_denoiser has reference and triton backends, not {unknown}")
    configs = get_configs(quick=b.args.quick, backends=backends, device=b.device, sweep=b.args.sweep)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 yardstick and eager GEMMs in IEEE float32
    try:
        with b.measuring():
            # each case checked where it is timed: a case whose check or launch fails is recorded, the others run
            rows = b.run_cases(configs, lambda c: {**run(c, quick=b.args.quick, warmup=b.warmup, repeats=b.repeats),
                                                   "max_err_vs_f64": check_outputs([c], b.args.quick).get(
                                                       c, float("nan"))})
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    add_ratios(rows)

    def plot(rows, path):
        return harness.plot_bars([f"{r['impl']} {r['dtype']}" for r in rows], [r["tflops"] for r in rows], path,
                                 xlabel="TFLOP/s (4*B*N*D per call)",
                                 title=f"optimal denoiser B={rows[0]['batch']} N={rows[0]['n']} D={rows[0]['dim']} "
                                       f"on {b.prov['device_name']}, {b.prov['git_sha'][:12]}")
    return b.finish("optimal_denoiser", rows, COLUMNS, what="optimal_denoiser", plot=plot)


if __name__ == "__main__":
    sys.exit(main())
