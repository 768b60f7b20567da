"""End-to-end sampling time per sample: diffusers' DDIM loop vs diffkern eager vs diffkern's captured loop.

Models: diffusers ``UNet2DModel`` with random weights in the CIFAR-10 DDPM configuration (google/ddpm-cifar10-32,
35.7M parameters) and the same architecture at a quarter of the width (2.2M); batch 1, 8, 64; N = 10 and 50
deterministic DDIM steps (eta = 0, 1000 linear-beta training steps, no clipping); float32 and bfloat16 models
(the state in the model's dtype, as DDIMPipeline keeps it). Columns, each N network evaluations:

* ``diffusers``: ``DDIMPipeline.__call__``'s loop (``scheduler.set_timesteps`` with CPU timesteps as the
  pipeline does, ``unet(x, t).sample``, ``scheduler.step``) without its progress bar and final
  ``.cpu().numpy()`` conversion; ``diffkern_sched``: the same loop with ``diffkern.diffusers.DDIMScheduler``;
  ``accelerated``: ``diffkern.diffusers.accelerate(DDIMPipeline)`` called as the pipeline (it includes the
  pipeline's initial noise from a CPU generator and the ``(x / 2 + 0.5).clamp(0, 1)`` of its output, with
  ``output_type="pt"``: like the ``diffusers`` column, no copy to the host, and "np" cannot hold bfloat16);
* ``eager``: ``diffkern.sample(DiffusersUNetDenoiser(unet, scheduler), x, sigmas, "euler")`` (DDIM(0) in VE
  coordinates, the eps -> D conversion fused into the step);
* ``graph``: the same call with ``graph=True`` (first call: warm-up run and capture, reported as first_call_ms);
* ``compile``: the same per-step maths (UNet then the DDIM update) in plain PyTorch under
  ``torch.compile(mode="reduce-overhead", dynamic=False)`` (CUDA graph trees), looped in Python with
  ``cudagraph_mark_step_begin`` per step; first_call_ms includes compilation (once per model, dtype and batch:
  the N = 50 row reuses the N = 10 row's compilation, and the summary reports that set-up for both);
* ``floor``: the N UNet calls alone, captured in one CUDA graph and replayed: the time no sampler can beat.

Timing: host clock per sampling call between two synchronisations (``harness.time_fn(wall=True)``: no L2
flush, host work counted, as a caller waiting for the samples sees it); the median of 20 calls after 3
warm-up calls, or of 5 after 1 when a call takes over 20 ms. Ratios: ``vs_floor`` (time / floor time),
``speedup_vs_diffusers``, ``vs_compile`` (time / compile time), each against the row of the same model,
dtype, batch and N of the same run.
``graph``, ``compile`` and ``floor`` need CUDA; ``--quick`` runs tiny UNets on the CPU for the eager columns.

Rows record the state ``shape`` and the ``backend`` that ran the fused step (``auto`` resolved on the device).

    python bench/bench_graphs.py [--quick] [--out DIR] [--no-compile] [--models cifar10,small]
                                 [--batches 1,8,64] [--steps 10,50] [--dtypes float32,bfloat16] [--deadline-s S]
                                 [--impls graph,compile] [--name graphs]
"""
from __future__ import annotations

import dataclasses
import sys

import torch

try:
    from bench import harness
except ImportError:  # run as a script from bench/
    import harness

# diffusers: its DDIMScheduler loop; diffkern_sched: the same loop with diffkern.diffusers.DDIMScheduler
# (issue 7, level 1); accelerated: diffkern.diffusers.accelerate(DDIMPipeline) (level 2, graph on CUDA).
IMPLS = ("floor", "graph", "eager", "diffusers", "diffkern_sched", "accelerated", "compile")
CUDA_ONLY = ("floor", "graph", "compile")
DIFFKERN_IMPLS = ("graph", "eager", "diffkern_sched", "accelerated")  # the columns whose step is diffkern's fused op
# A compile case that compiles cold starts only with this much time left before the deadline: inductor on the
# UNet in one (model, dtype, batch), with its CUDA-graph trees. Dynamo and AOT tracing of the CIFAR-10 UNet took
# 5 s on the 2-core CI CPU; inductor's lowering and the Triton compiles of its ~200 kernels (16 cores) are
# estimated at 30-60 s more. A case that overruns is stopped by gpu_suite.sh's timeout (SIGTERM: the rows
# so far are written), so this is the expected cost, not a worst case that would idle the rest of the budget.
COMPILE_NEED_S = 90.0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}  # float64: test truth
# google/ddpm-cifar10-32's config.json beyond the widths: one attention head over all channels
# (attention_head_dim null; diffusers' default 8 would make 32 heads of 8 dimensions, another attention
# kernel), its time embedding and padding, GroupNorm eps.
_CIFAR_BLOCKS = dict(down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                     attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
                     norm_eps=1e-6, mid_block_scale_factor=1)
MODELS = {  # google/ddpm-cifar10-32's config; "small" at a quarter of the width
    "cifar10": dict(sample_size=32, layers_per_block=2, block_out_channels=(128, 256, 256, 256), **_CIFAR_BLOCKS),
    "small": dict(sample_size=32, layers_per_block=2, block_out_channels=(32, 64, 64, 64), **_CIFAR_BLOCKS),
    "tiny": dict(sample_size=8, layers_per_block=1, block_out_channels=(32, 32), norm_num_groups=8,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D")),
}


@dataclasses.dataclass(frozen=True)
class Config:
    impl: str
    model: str
    dtype: str
    batch: int
    steps: int
    device: str


def get_configs(*, quick: bool = False, device: str = "cpu", models=None, batches=None, steps=None, dtypes=None,
                compile: bool = True, impls=None) -> list[Config]:
    """The sweep; CUDA-only columns are left out on the CPU, and ``compile`` rows come last (slowest to set up).
    ``impls``: the columns to run (default all of ``IMPLS``); an unknown one raises."""
    unknown = sorted(set(impls or ()) - set(IMPLS))
    if unknown:
        raise ValueError(f"--impls: unknown {unknown}; expected some of {list(IMPLS)}")
    if quick:
        models, batches, steps, dtypes = models or ["tiny"], batches or [1, 2], steps or [2, 3], dtypes or ["float32"]
    models, batches = models or ["cifar10", "small"], batches or [1, 8, 64]
    steps, dtypes = steps or [10, 50], dtypes or ["float32", "bfloat16"]
    impls = [i for i in IMPLS if (device.startswith("cuda") or i not in CUDA_ONLY) and (not impls or i in impls)]
    configs = [Config(i, m, d, b, n, device) for m in models for d in dtypes for b in batches for n in steps
               for i in impls if i != "compile"]
    if compile and "compile" in impls:
        # batch-major: under a deadline the small batches, where per-step overhead matters most, come first
        configs += [Config("compile", m, d, b, n, device)
                    for b in batches for m in models for d in dtypes for n in steps]
    return configs

#----------------------------------------------------------------------------
# Models and the five loops.

_unets = {}


def unet_and_scheduler(model: str, dtype: str, device: str):
    """A randomly initialised UNet2DModel (seed 0, eval mode) and the DDIM scheduler of the runs."""
    from diffusers import DDIMScheduler, UNet2DModel

    key = (model, dtype, device)
    if key not in _unets:
        torch.manual_seed(0)
        unet = UNet2DModel(in_channels=3, out_channels=3, **MODELS[model]).to(device, DTYPES[dtype]).eval()
        _unets[key] = unet
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, set_alpha_to_one=True)
    return _unets[key], sched


def _vp_coefs(sched, steps: int):
    """Timesteps and the DDIM(0) update ``z' = a*z + b*eps`` per step (float64 on the host)."""
    sched.set_timesteps(steps)
    ab = sched.alphas_cumprod.double()
    ts = sched.timesteps.tolist()
    coefs = []
    for i, t in enumerate(ts):
        a_t = float(ab[t])
        a_p = float(ab[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        coefs.append(((a_p / a_t) ** 0.5, (1 - a_p) ** 0.5 - (a_p * (1 - a_t) / a_t) ** 0.5))
    return ts, coefs


def make_loop(config: Config):
    """A zero-argument callable running one N-step sampling call of ``config`` (its first call may set up)."""
    import diffkern
    from diffkern import graphs, schedules
    from diffkern.wrappers import DiffusersUNetDenoiser

    unet, sched = unet_and_scheduler(config.model, config.dtype, config.device)
    dtype = DTYPES[config.dtype]
    size = MODELS[config.model]["sample_size"]
    x = torch.randn(config.batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(config.device, dtype)
    if config.impl in ("diffusers", "diffkern_sched"):
        if config.impl == "diffkern_sched":
            from diffkern.diffusers import DDIMScheduler
            sched = DDIMScheduler.from_config(sched.config)

        def diffusers_loop():
            # As DDIMPipeline.__call__: timesteps on the CPU (with device= they would be CUDA scalars, and
            # DDIMScheduler.step would index its CPU alphas_cumprod with them: host syncs the pipeline lacks).
            sched.set_timesteps(config.steps)
            image = x
            for t in sched.timesteps:
                image = sched.step(unet(image, t).sample, t, image, eta=0.0).prev_sample
            return image
        return diffusers_loop
    if config.impl == "accelerated":
        from diffusers import DDIMPipeline

        from diffkern.diffusers import accelerate
        fast = accelerate(DDIMPipeline(unet=unet, scheduler=sched))
        return lambda: fast(batch_size=config.batch, num_inference_steps=config.steps, eta=0.0,
                            generator=torch.Generator().manual_seed(1), output_type="pt").images
    if config.impl in ("eager", "graph"):
        sched.set_timesteps(config.steps)
        sigmas = schedules.vp_sigmas(sched.alphas_cumprod, sched.timesteps, final="zero")
        model = DiffusersUNetDenoiser(unet, sched).to(config.device)
        x_ve = x * float((1 + sigmas[0] ** 2) ** 0.5)
        graph = config.impl == "graph"
        if graph:
            graphs.clear()  # the first timed call warms up and captures
        return lambda: diffkern.sample(model, x_ve, sigmas, "euler", seed=0, graph=graph)
    ts, coefs = _vp_coefs(sched, config.steps)
    t_dev = [torch.tensor(t, device=config.device) for t in ts]
    if config.impl == "floor":
        return _floor_loop(unet, x, t_dev)
    return _compile_loop(unet, x, t_dev, [[torch.tensor(c, device=config.device, dtype=torch.float32) for c in ab]
                                          for ab in coefs])


def _floor_loop(unet, x, t_dev):
    static_x = x.clone()

    def calls():
        for t in t_dev:
            unet(static_x, t, return_dict=False)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        calls()  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        calls()
    return graph.replay


_compiled = {}


def _compile_loop(unet, x, t_dev, coefs):
    if id(unet) not in _compiled:
        def ddim_step(x, t, a, b):
            eps = unet(x, t, return_dict=False)[0]
            return (a * x.float() + b * eps.float()).to(x.dtype)
        # dynamic=False: each batch size its own static graph (the default would recompile the second batch
        # size with a symbolic one). Every model, dtype and batch is an entry of the one code object
        # ddim_step: up to 12 (> dynamo's default limit of 8, past which it would silently run eagerly).
        harness.raise_recompile_limit()
        _compiled[id(unet)] = torch.compile(ddim_step, mode="reduce-overhead", dynamic=False)
    step = _compiled[id(unet)]

    @torch.no_grad()
    def loop():
        z = x
        for t, (a, b) in zip(t_dev, coefs):
            torch.compiler.cudagraph_mark_step_begin()
            z = step(z, t, a, b).clone()  # the next replay overwrites the graph's output buffer
        return z
    return loop

#----------------------------------------------------------------------------
# Timing, ratios, output.


def run(config: Config, *, warmup: int = 3, repeats: int = 20) -> dict:
    """Time one case; returns a result row (ratios are added by :func:`add_ratios`)."""
    with torch.no_grad():  # wall: host clock between synchronisations, no L2 flush (a whole sampling call)
        timing = harness.time_fn(make_loop(config), device=config.device, warmup=warmup, repeats=repeats, wall=True)
    from diffkern.ops import resolve

    unet, _ = unet_and_scheduler(config.model, config.dtype, config.device)
    size = MODELS[config.model]["sample_size"]
    fused = resolve("sampler_step", config.device.split(":")[0])[0] if config.impl in DIFFKERN_IMPLS else ""
    return {"op": "sampling", **dataclasses.asdict(config), "shape": f"{config.batch}x3x{size}x{size}",
            "backend": fused, "params_m": sum(p.numel() for p in unet.parameters()) / 1e6,
            **harness.timing_columns(timing), "per_sample_us": timing.median_s * 1e6 / config.batch}


def add_ratios(rows: list[dict]) -> None:
    """``vs_floor``, ``speedup_vs_diffusers`` and ``vs_compile`` against the same model, dtype, batch and N."""
    def base(r, impl):
        return next((o["median_us"] for o in rows if o["impl"] == impl and all(
            o[k] == r[k] for k in ("model", "dtype", "batch", "steps"))), float("nan"))
    for r in rows:
        r["vs_floor"] = r["median_us"] / base(r, "floor")
        r["speedup_vs_diffusers"] = base(r, "diffusers") / r["median_us"]
        r["vs_compile"] = r["median_us"] / base(r, "compile")


def summary(rows: list[dict]) -> list[dict]:
    """One row per (model, dtype, batch, N): ms per sample of each column, the issue's ratios and set-up times.

    ``compile_setup_s``: the first call of the first compile row of that model, dtype and batch (the
    compilation and CUDA-graph-tree recording; a later N replays the same graphs, and its own first call
    would report a steady-state time as the set-up). ``graph_first_s``: warm-up and capture of that N."""
    setup = {}
    for r in rows:
        if r["impl"] == "compile":
            setup.setdefault((r["model"], r["dtype"], r["batch"]), r["first_call_ms"] / 1e3)
    out = []
    for key in dict.fromkeys((r["model"], r["dtype"], r["batch"], r["steps"]) for r in rows):
        by = {r["impl"]: r for r in rows if (r["model"], r["dtype"], r["batch"], r["steps"]) == key}
        s = {"model": key[0], "dtype": key[1], "batch": key[2], "steps": key[3]}
        s.update({f"{i}_ms": by[i]["per_sample_us"] / 1e3 if i in by else float("nan") for i in IMPLS})
        t = {i: by[i]["median_us"] if i in by else float("nan") for i in IMPLS}
        s.update({"graph/floor": t["graph"] / t["floor"], "diffusers/graph": t["diffusers"] / t["graph"],
                  "compile/graph": t["compile"] / t["graph"], "eager/graph": t["eager"] / t["graph"],
                  "graph_first_s": by["graph"]["first_call_ms"] / 1e3 if "graph" in by else float("nan"),
                  "compile_setup_s": setup.get(key[:3], float("nan"))})
        out.append(s)
    return out


COLUMNS = ("model", "dtype", "batch", "steps", "impl", "backend", "median_us", "p20_us", "p80_us", "per_sample_us",
           "first_call_ms", "vs_floor", "speedup_vs_diffusers", "vs_compile")


def compiled_groups(path: str) -> set[tuple[str, str, int]]:
    """(model, dtype, batch) of the compile rows of the CSV at ``path`` (a missing file: none)."""
    import csv
    import os

    if not os.path.exists(path):
        return set()
    with open(path, newline="") as f:
        return {(r["model"], r["dtype"], int(r["batch"])) for r in csv.DictReader(f) if r["impl"] == "compile"}


def _list(arg, cast=str):
    return [cast(v) for v in arg.split(",")] if arg else None


def cli():
    """The command line: :func:`harness.parser`'s flags and the sweep's own."""
    p = harness.parser(__doc__.splitlines()[0])
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column (minutes of compilation)")
    p.add_argument("--models", default=None, help=f"comma-separated, of {sorted(MODELS)}")
    p.add_argument("--batches", default=None)
    p.add_argument("--steps", default=None)
    p.add_argument("--dtypes", default=None, help="float32,bfloat16")
    p.add_argument("--impls", default=None, help=f"comma-separated columns, of {list(IMPLS)} (default: all)")
    p.add_argument("--name", default="graphs", help="results' file stem (default graphs; e.g. graphs_compile for a "
                                                    "second run of some columns that must not replace the first)")
    p.add_argument("--skip-compiled", default=None, metavar="CSV",
                   help="leave out the (model, dtype, batch) groups that CSV (an earlier run's graphs.csv) has compile "
                        "rows for: the compile column's continuation in a later device call")
    return p


def main(argv: list[str] | None = None) -> int:
    b = harness.start(cli(), argv, quick_device="cpu")
    args = b.args
    b.name = args.name
    configs = get_configs(quick=args.quick, device=b.device, models=_list(args.models), batches=_list(args.batches, int),
                          steps=_list(args.steps, int), dtypes=_list(args.dtypes), compile=not args.no_compile,
                          impls=_list(args.impls))
    if args.skip_compiled:
        done = compiled_groups(args.skip_compiled)
        configs = [c for c in configs if (c.model, c.dtype, c.batch) not in done]
        print(f"--skip-compiled: {len(done)} groups already have compile rows; {len(configs)} cases left", flush=True)
        if not configs:
            return 0
    compiled = set()  # (model, dtype, batch) of the compile cases run: a new N reuses the compilation

    def run_one(c):
        row = run(c, warmup=b.warmup, repeats=b.repeats)
        if c.impl == "compile":
            compiled.add((c.model, c.dtype, c.batch))
        return row

    def need_s(c):
        # A torch.compile case that compiles the UNet cold with its CUDA-graph trees (1-2.5 min on an H100, an
        # estimate) starts only with COMPILE_NEED_S left before the deadline.
        return COMPILE_NEED_S if c.impl == "compile" and (c.model, c.dtype, c.batch) not in compiled else 0.0

    with b.measuring("diffusers"):
        rows = b.run_cases(configs, run_one, need_s=need_s)
    add_ratios(rows)
    summ = summary(rows)

    def plot(rows, path):
        return harness.plot_lines([{**r, "panel": f"{r['model']} {r['dtype']} N={r['steps']}"} for r in rows], path,
                                  x="batch", y="per_sample_us", series="impl", panel="panel", ylog=True,
                                  ylabel="us per sample",
                                  title=f"sampling loop on {b.prov['device_name']}, torch {b.prov['torch']}, "
                                        f"diffusers {b.prov['diffusers']}, {b.prov['git_sha'][:12]}")
    return b.finish(args.name, rows, COLUMNS, what="Sampling loop", plot=plot,
                    tables=[(f"{args.name}_summary", summ, list(summ[0]) if summ else [])])


if __name__ == "__main__":
    sys.exit(main())
