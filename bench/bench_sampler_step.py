"""Fused sampler step vs the unfused eager PyTorch sequence of the same maths vs ``torch.compile`` of it.

Three variants, each a mid-schedule step with eps-prediction (``math-samplers.md`` 5, 7):

* ``ddim``: one VP-DDIM step as diffusers' scheduler runs it: ``x0 = (z - sqrt(1-ab)*eps)/sqrt(ab)`` then
  ``z' = sqrt(ab')*x0 + sqrt(1-ab'-std^2)*eps [+ std*xi]``, deterministic (eta = 0) or with noise (eta = 1;
  eager and compile draw ``torch.randn_like``, the fused op draws Philox normals in the kernel, reading no
  noise tensor);
* ``cfg``: the same step (eta = 0) on the classifier-free-guided output ``u + w*(c - u)`` (two model
  outputs read);
* ``history``: a DPM-Solver++(2M) step, ``D = x0(z, eps)``, ``z' = a*z + b*D + c*D_prev``, with D kept for
  the next step (the fused op reads the history and writes it in place: ``history_out=history``).

The fused op is ``sampler_step`` with a prebuilt table, writing into a preallocated ``out`` (how a sampling
loop calls it); ``op`` is the raw torch op without the front-end's checks.

Sizes (``harness.sweep_sizes``): 2**20 .. 2**28 elements on CUDA (those that fit: 2**28 float32 is 1 GiB a
tensor), 2**16 .. 2**26 on CPU, 2**16 under ``--quick``; float32 and bfloat16. The ``cfg`` and ``history``
variants run at >= ``VARIANT_MIN_NUMEL`` elements on CUDA (the sizes of the bandwidth target; every size on
CPU), to keep the sweep inside its device time.

Bytes (:func:`traffic`): the tensors the fused kernel reads and writes for the arguments it is given, with
each tensor's own element size: z and the model output(s), the history when its coefficient is non-zero,
then ``out`` and the history written back; Philox noise is computed, not read. ``ddim``: 3 tensors, ``cfg``:
4, ``history``: 5. The eager and compiled sequences are charged the same (it is the step's minimal traffic),
so GB/s compares like with like; the yardstick is ``dst.copy_(src)`` (2 tensors) of the same size and dtype,
measured in the same run.

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
GUIDANCE = 7.5  # cfg: the guidance scale w
HISTORY = {"a": 0.8, "b": 0.3, "c": -0.1}  # history: one DPM-Solver++(2M) update z' = a z + b D + c D_prev
# Peak bytes per element of the largest case: z, eps (or c, u; or eps, D_prev) and up to 6 float32
# temporaries of the eager step.
PEAK_BYTES = 9 * 4
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
VARIANTS = ("ddim", "cfg", "history")
VARIANT_MIN_NUMEL = 2**24  # CUDA: cfg and history only from here (the bandwidth-target sizes)


@dataclasses.dataclass(frozen=True)
class Config:
    impl: str  # "copy" | "eager" | "compile" | "fused" (front-end) | "op" (the torch op, no front-end checks)
    backend: str  # diffkern backend of fused/op, "" otherwise
    numel: int
    dtype: str
    noise: bool
    device: str
    variant: str = "ddim"  # "ddim" | "cfg" | "history"


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


def eager_cfg_step(z, cond, uncond, w: float, sa: float, sb: float, sa_prev: float, k: float, std: float):
    """Guidance as a pipeline writes it (``u + w*(c - u)``), then :func:`eager_step`."""
    return eager_step(z, uncond + w * (cond - uncond), sa, sb, sa_prev, k, std)


def eager_history_step(z, eps, d_prev, sa: float, sb: float, a: float, b: float, c: float):
    """DPM-Solver++(2M) as k-diffusion writes it on an eps model: D from eps, the update, D kept for the next
    step (returned, not copied: the caller rebinds ``d_prev``); returns (z', D)."""
    d = (z - sb * eps) / sa
    return a * z + b * d + c * d_prev, d


EAGER = {"ddim": eager_step, "cfg": eager_cfg_step, "history": eager_history_step}


def table_row(variant: str, noise: bool) -> list[float]:
    """The coefficient row of the fused step of ``variant`` (eta = 1 when ``noise``)."""
    from diffkern.ops import coefs, ddim_row

    r = ddim_row(AB, AB_PREV, eta=1.0 if noise else 0.0)
    if variant == "cfg":
        r[coefs.W] = GUIDANCE
    elif variant == "history":  # D converted from eps as DDIM's x0, history_out = D
        r = coefs.row(**HISTORY, p=r[coefs.P], q=r[coefs.Q], f=1.0)
    return r


def traffic(row: list[float], *, x, model_out, model_out_uncond=None, history=None, history2=None, history3=None,
            noise=None, out, x0_out=None, history_out=None, **_) -> int:
    """Bytes read and written by the fused kernel for these arguments (``csrc/cuda/sampler_step.cu``,
    ``kernels/sampler_step.py``): x, model_out and model_out_uncond are always read; history (history2, history3)
    only when the row's c (c2, c3) is non-zero and noise only when its s is non-zero (otherwise the kernel skips the load); Philox
    noise (``noise=None``) is computed in registers; every output given is written. Each tensor counts with
    its own element size (mixed state and model dtypes); the table row and the seed (136 bytes, read from cache
    after the first block) do not."""
    from diffkern.ops import coefs

    def nbytes(t):
        return 0 if t is None else t.numel() * t.element_size()

    read = nbytes(x) + nbytes(model_out) + nbytes(model_out_uncond)
    read += nbytes(history) if row[coefs.C] != 0 else 0
    read += nbytes(history2) if row[coefs.C2] != 0 else 0
    read += nbytes(history3) if row[coefs.C3] != 0 else 0
    read += nbytes(noise) if row[coefs.S] != 0 else 0
    return read + nbytes(out) + nbytes(x0_out) + nbytes(history_out)


def fused_args(config: Config, make) -> dict:
    """The fused op's tensor arguments for ``config``, each made by ``make()`` (real or meta tensors)."""
    z, m = make(), make()
    args = {"x": z, "model_out": m, "out": make()}
    if config.variant == "cfg":
        args["model_out_uncond"] = make()
    if config.variant == "history":
        args["history"] = args["history_out"] = make()  # in place, as the multistep samplers do
    return args


def step_bytes(config: Config) -> int:
    """Bytes charged to every implementation of ``config``: 2 tensors for the copy, else :func:`traffic` of
    the fused call's arguments (meta tensors: nothing is allocated)."""
    dtype = DTYPES[config.dtype]
    if config.impl == "copy":
        return 2 * config.numel * torch.empty(0, dtype=dtype).element_size()
    args = fused_args(config, lambda: torch.empty(config.numel, dtype=dtype, device="meta"))
    return traffic(table_row(config.variant, config.noise), **args)


def _compiled_step(variant: str = "ddim"):
    return harness.compiled(EAGER[variant])


def get_configs(*, quick: bool = False, backends: list[str] | None = None, device: str = "cpu",
                compile: bool | None = None) -> list[Config]:
    """Every case of the sweep: ``harness.sweep_sizes`` (CUDA 2**20..2**28, CPU 2**16..2**26, quick 2**16),
    float32 and bfloat16; ``ddim`` at eta 0 and 1, then ``cfg`` and ``history`` (eta 0; on CUDA from
    ``VARIANT_MIN_NUMEL``); the compile cases last (:func:`harness.compile_last`).

    ``compile`` (default: not ``quick``) adds torch.compile of the eager sequence: one cold inductor
    compile of this graph took ~80 s on the 2-core CI CPU, too long for a smoke run.
    """
    backends = backends if backends is not None else harness.resolve_backends(None, device)
    compile = not quick if compile is None else compile
    sizes = harness.sweep_sizes(device, quick, bytes_per_element=PEAK_BYTES)
    impls = [("copy", ""), ("eager", "")] + ([("compile", "")] if compile else [])
    impls += [(kind, b) for b in backends for kind in ("fused", "op")]
    # The raw op ("op:") differs from the front-end by a fixed per-call cost, visible at small sizes only: on CUDA
    # it runs at the smallest size alone (40 cases -> 8, ~10 s of the sweep's device time).
    configs = [Config(impl, b, n, dt, noise, device) for k, n in enumerate(sizes) for dt in DTYPES
               for noise in (False, True) for impl, b in impls
               if not (impl == "copy" and noise) and (impl != "op" or k == 0 or not device.startswith("cuda"))]
    # cfg and history (eta = 0): the front-end only, the raw op's saving is the ddim rows' business.
    min_numel = VARIANT_MIN_NUMEL if device.startswith("cuda") else 0
    configs += [Config(impl, b, n, dt, False, device, v) for n in sizes if n >= min_numel for dt in DTYPES
                for v in VARIANTS[1:] for impl, b in impls if impl not in ("copy", "op")]
    return harness.compile_last(configs)


def _inputs(config: Config):
    # Drawn on the device: a CPU draw of 2**28 normals takes seconds, and there are dozens of cases per size.
    gen = torch.Generator(config.device).manual_seed(0)
    dtype = DTYPES[config.dtype]
    z = torch.randn(config.numel, generator=gen, device=config.device).to(dtype)
    eps = torch.randn(config.numel, generator=gen, device=config.device).to(dtype)
    return z, eps


def _eager_args(config: Config, z, eps, extra) -> tuple:
    """Positional arguments of ``EAGER[config.variant]`` on the inputs z, eps and the third tensor ``extra``."""
    c = _coefs(1.0 if config.noise else 0.0)
    if config.variant == "cfg":  # eps is the conditional output, extra the unconditional one
        return (z, eps, extra, GUIDANCE, *c.values())
    if config.variant == "history":
        return (z, eps, extra, c["sa"], c["sb"], HISTORY["a"], HISTORY["b"], HISTORY["c"])
    return (z, eps, *c.values())


def _callable(config: Config):
    import diffkern.ops as dops

    z, eps = _inputs(config)
    if config.impl == "copy":
        dst = torch.empty_like(z)
        return lambda: dst.copy_(z)
    extra = torch.randn_like(z) if config.variant != "ddim" else None
    if config.impl in ("eager", "compile"):
        fn = EAGER[config.variant] if config.impl == "eager" else _compiled_step(config.variant)
        args = _eager_args(config, z, eps, extra)
        return lambda: fn(*args)
    table = dops.coefs.table([table_row(config.variant, config.noise)], device=config.device)
    seed = torch.tensor([1234], dtype=torch.int64, device=config.device)
    made = iter([z, eps, torch.empty_like(z), extra])  # fused_args' order: x, model_out, out, then the third
    a = fused_args(config, lambda: next(made))
    if config.impl == "fused":
        return lambda: dops.sampler_step(a["x"], a["model_out"], table, 0, model_out_uncond=a.get("model_out_uncond"),
                                         history=a.get("history"), seed=seed, out=a["out"],
                                         history_out=a.get("history_out"), backend=config.backend)
    _, launch = dops.resolve("sampler_step", z.device.type, config.backend)
    return lambda: launch(a["x"], a["model_out"], a.get("model_out_uncond"), a.get("history"), None, table, 0, seed,
                          a["out"], None, a.get("history_out"))


def run(config: Config, *, warmup: int = 3, repeats: int = 20) -> dict:
    """Time one case; returns a result row (no derived ratios: see :func:`add_ratios`)."""
    timing = harness.time_fn(_callable(config), device=config.device, warmup=warmup, repeats=repeats)
    nbytes = step_bytes(config)
    label = f"{config.impl}:{config.backend}" if config.backend else config.impl
    return {"op": "sampler_step", "variant": config.variant, "impl": label, "backend": config.backend,
            "dtype": config.dtype, "numel": config.numel, "shape": str(config.numel), "noise": config.noise,
            "bytes": nbytes,
            **harness.timing_columns(timing), "gbps": harness.gbps(nbytes, timing.median_s)}


def add_ratios(rows: list[dict]) -> None:
    """Speed-ups vs eager and vs compile of the same variant, and the fraction of the copy bandwidth, per
    (numel, dtype, noise)."""
    def find(r, impl, noise, variant):
        return next((o for o in rows if o["impl"] == impl and o["numel"] == r["numel"] and o["dtype"] == r["dtype"]
                     and o["noise"] == noise and o["variant"] == variant), None)

    for r in rows:
        v = r["variant"]
        harness.add_ratios(r, find(r, "copy", False, "ddim"), find(r, "eager", r["noise"], v),
                           find(r, "compile", r["noise"], v))


COLUMNS = ("variant", "impl", "dtype", "numel", "noise", "median_us", "p20_us", "p80_us", "loop_us", "gbps",
           "frac_copy_bw", "frac_peak_bw", "speedup_vs_eager", "speedup_vs_compile", "first_call_ms")


def main(argv: list[str] | None = None) -> int:
    b, rows = harness.run_sweep(__doc__.splitlines()[0], argv, sys.modules[__name__],
                                compile_help="skip torch.compile (its cold compile takes minutes on CPU)")

    def plot(rows, path):
        # One panel per (variant, dtype), each with the copy of that dtype as the yardstick line.
        lines = [{**r, "series": r["impl"] + (" +noise" if r["noise"] else ""), "panel": f"{v} {r['dtype']}"}
                 for v in VARIANTS for r in rows if r["variant"] == v or r["impl"] == "copy"]
        return harness.plot_lines(lines, path, x="numel", y="gbps", series="series", panel="panel", ylog=True,
                                  ylabel="GB/s (ddim 3 tensors, cfg 4, history 5; copy 2)",
                                  title=f"sampler_step (VP-DDIM) on {b.prov['device_name']}\ntorch {b.prov['torch']}, "
                                        f"{b.prov['git_sha'][:12]}, load {b.prov['loadavg_1m']}")
    return b.finish("sampler_step", rows, COLUMNS, what="sampler_step", plot=plot)


if __name__ == "__main__":
    sys.exit(main())
