"""diffusers' ``DDIMScheduler.step`` (eta 0 and 1) vs the fused VP-DDIM step, with one tensor copy as the yardstick.

Workload: a (16, 3, 256, 256) float32 latent on CPU (quick: (2, 3, 32, 32)); on CUDA, (B, 4, 128, 128) latents
of 2**20 .. 2**28 elements (B = 16 .. 4096, those that fit in memory); eps-prediction, 50 inference
steps, one mid-schedule step. diffusers draws its eta = 1 noise with ``torch.randn``; the fused op draws
Philox normals in the kernel. Fused cases:

* ``fused``: ``sampler_step`` with a prebuilt ``ddim_row`` table and a preallocated ``out`` (a sampling loop);
* ``ddim_step``: the convenience front-end, which builds the one-row table on every call;
* ``op``: the torch op itself, without the front-end's argument checks.

Every time is also given in units of one ``dst.copy_(src)`` of the latent (``x_copy``).

    python bench/bench_ddim.py [--quick] [--out DIR] [--backends cpp,reference]
"""
from __future__ import annotations

import dataclasses
import sys

import torch

try:
    from bench import harness
except ImportError:  # run as a script from bench/
    import harness

SHAPE, QUICK_SHAPE = (16, 3, 256, 256), (2, 3, 32, 32)
LATENT = (4, 128, 128)  # one CUDA sample: 2**16 elements
# Peak bytes per element of the largest case: z, eps and diffusers' float32 temporaries of the eta = 1 step.
PEAK_BYTES = 10 * 4
N_STEPS, STEP_INDEX = 50, 25


@dataclasses.dataclass(frozen=True)
class Config:
    impl: str  # "copy" | "diffusers" | "fused" | "ddim_step" | "op"
    backend: str  # diffkern backend, "" for copy and diffusers
    eta: float
    shape: tuple
    device: str


def shapes(device: str, quick: bool = False) -> list[tuple]:
    """The latents: QUICK_SHAPE under ``quick``, else SHAPE on CPU and the ``harness.sweep_sizes`` of CUDA as
    batches of LATENT."""
    if quick:
        return [QUICK_SHAPE]
    if not device.startswith("cuda"):
        return [SHAPE]
    per_sample = LATENT[0] * LATENT[1] * LATENT[2]
    return [(n // per_sample, *LATENT) for n in harness.sweep_sizes(device, False, bytes_per_element=PEAK_BYTES)]


def get_configs(*, quick: bool = False, backends: list[str] | None = None, device: str = "cpu") -> list[Config]:
    backends = backends if backends is not None else harness.resolve_backends(None, device)
    configs = []
    for shape in shapes(device, quick):
        configs.append(Config("copy", "", 0.0, shape, device))
        for eta in (0.0, 1.0):
            configs.append(Config("diffusers", "", eta, shape, device))
            configs += [Config(impl, b, eta, shape, device) for b in backends for impl in ("fused", "ddim_step", "op")]
    return configs


def _scheduler():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False,
                          prediction_type="epsilon")
    sched.set_timesteps(N_STEPS)
    t = int(sched.timesteps[STEP_INDEX])
    t_prev = t - sched.config.num_train_timesteps // N_STEPS
    return sched, t, float(sched.alphas_cumprod[t]), float(sched.alphas_cumprod[t_prev])


def _callable(config: Config):
    import diffkern.ops as dops

    gen = torch.Generator(config.device).manual_seed(0)  # on the device: a CPU draw of 2**28 takes seconds
    z = torch.randn(config.shape, generator=gen, device=config.device)
    eps = torch.randn(config.shape, generator=gen, device=config.device)
    if config.impl == "copy":
        dst = torch.empty_like(z)
        return lambda: dst.copy_(z)
    sched, t, ab, ab_prev = _scheduler()
    if config.impl == "diffusers":
        return lambda: sched.step(eps, t, z, eta=config.eta)
    seed = torch.tensor([1234], dtype=torch.int64, device=config.device)
    out = torch.empty_like(z)
    if config.impl == "ddim_step":
        return lambda: dops.ddim_step(z, eps, ab, ab_prev, eta=config.eta, seed=seed, out=out, backend=config.backend)
    table = dops.coefs.table([dops.ddim_row(ab, ab_prev, eta=config.eta)], device=config.device)
    if config.impl == "fused":
        return lambda: dops.sampler_step(z, eps, table, 0, seed=seed, out=out, backend=config.backend)
    _, launch = dops.resolve("sampler_step", z.device.type, config.backend)
    return lambda: launch(z, eps, None, None, None, table, 0, seed, out, None, None)


def run(config: Config, *, warmup: int = 3, repeats: int = 20) -> dict:
    """Time one case; returns a result row (``x_copy`` is added by :func:`add_ratios`)."""
    timing = harness.time_fn(_callable(config), device=config.device, warmup=warmup, repeats=repeats)
    numel = 1
    for s in config.shape:
        numel *= s
    nbytes = (2 if config.impl == "copy" else 3) * numel * 4
    label = f"{config.impl}:{config.backend}" if config.backend else config.impl
    return {"op": "ddim_step", "impl": label, "backend": config.backend, "eta": config.eta, "dtype": "float32",
            "shape": "x".join(map(str, config.shape)), "numel": numel, "bytes": nbytes,
            **harness.timing_columns(timing), "gbps": harness.gbps(nbytes, timing.median_s)}


def add_ratios(rows: list[dict]) -> None:
    """``x_copy``: time in units of the copy of the same latent; ``speedup_vs_diffusers`` at the same shape, eta."""
    for r in rows:  # a copy row can be missing (its case failed): NaN, never a crash that loses the other rows
        copy = next((o for o in rows if o["impl"] == "copy" and o["shape"] == r["shape"]), None)
        r["x_copy"] = r["median_us"] / copy["median_us"] if copy else float("nan")
        ref = next((o for o in rows if o["impl"] == "diffusers" and o["eta"] == r["eta"] and o["shape"] == r["shape"]),
                   None)
        r["speedup_vs_diffusers"] = ref["median_us"] / r["median_us"] if ref and r["impl"] != "copy" else float("nan")


COLUMNS = ("impl", "eta", "shape", "median_us", "p20_us", "p80_us", "loop_us", "x_copy", "speedup_vs_diffusers", "gbps",
           "frac_peak_bw", "first_call_ms")


def main(argv: list[str] | None = None) -> int:
    b, rows = harness.run_sweep(__doc__.splitlines()[0], argv, sys.modules[__name__], packages=("diffusers",))

    def plot(rows, path):
        if len({r["shape"] for r in rows}) > 1:  # the CUDA sweep: GB/s against size, one panel per eta
            lines = [{**r, "panel": f"eta={eta:g}"} for eta in (0.0, 1.0) for r in rows
                     if r["eta"] == eta or r["impl"] == "copy"]
            return harness.plot_lines(lines, path, x="numel", y="gbps", series="impl", panel="panel", ylog=True,
                                      ylabel="GB/s (3 tensors of traffic; copy: 2)",
                                      title=f"DDIM step float32 on {b.prov['device_name']}\n"
                                            f"{b.prov['git_sha'][:12]}, load {b.prov['loadavg_1m']}")
        return harness.plot_bars([f"{r['impl']} eta={r['eta']:g}" for r in rows], [r["x_copy"] for r in rows], path,
                                 xlabel="time / one tensor copy",
                                 title=f"DDIM step {rows[0]['shape']} float32 on {b.prov['device_name']}\n"
                                       f"{b.prov['git_sha'][:12]}, {b.prov['threads']} threads, "
                                       f"load {b.prov['loadavg_1m']}")
    return b.finish("ddim", rows, COLUMNS, what="DDIM step", plot=plot)


if __name__ == "__main__":
    sys.exit(main())
