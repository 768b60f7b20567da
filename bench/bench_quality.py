"""Sample quality of the built-in digits model per sampler and step count.

For each (method, steps) it draws ``--n`` images (same initial noise and seed for every row) and
scores them against the 300 held-out digits with :class:`diffkern.quality.Scorer`: unbiased MMD^2
on pixels and on classifier features (lower is better, 0 is the floor in expectation) and the mean
classifier confidence. Reference rows: training images (what a perfect generator scores), blurred
training images and pure noise.

    python bench/bench_quality.py [--quick] [--methods ge,euler] [--steps 10,20] [--n 300] [--out DIR]
    diffkern bench quality --quick

Outputs (``harness``): the markdown table on stdout, ``quality.csv`` (with provenance columns) and
``quality.png`` (MMD^2 against steps per sampler) in ``--out`` (default ``bench/results/<device>/``).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

try:
    from bench import harness
except ImportError:  # run as a script from bench/
    import harness

# One row per sampler setting: (name, method, knobs). euler_ancestral (eta=1), sde (lam=1) and ge with
# gamma=1, mu=0.5 are one update (math-samplers.md 2.4, 3.2): with one seed they give the same images.
SETTINGS = {
    "euler": ("euler", {}),
    "heun": ("heun", {}),
    "dpmpp_2m": ("dpmpp_2m", {}),
    "ge": ("ge", {"gamma": 2.0}),
    "euler_ancestral": ("euler_ancestral", {}),
    "sde": ("sde", {"lam": 1.0}),
    "dpm_2": ("dpm_2", {}),
    "dpm_2_ancestral": ("dpm_2_ancestral", {}),
    "dpmpp_2s_ancestral": ("dpmpp_2s_ancestral", {}),
    "dpmpp_sde": ("dpmpp_sde", {}),
    "dpmpp_2m_sde": ("dpmpp_2m_sde", {}),
    "dpmpp_3m_sde": ("dpmpp_3m_sde", {}),
    "unipc": ("unipc", {}),
    "dpmsolver_3m": ("dpmsolver_3m", {}),
    "deis": ("deis", {}),
    "lms": ("lms", {}),
    "plms": ("plms", {}),
    "ipndm": ("ipndm", {}),
    "ipndm_v": ("ipndm_v", {}),
    "res_multistep": ("res_multistep", {}),
    "dpmsolver_single": ("dpmsolver_single", {}),
    "dpm_fast": ("dpm_fast", {}),
    "er_sde": ("er_sde", {}),
    "sa_solver": ("sa_solver", {}),
}
STEPS = (5, 10, 20)
QUICK = {"settings": ("euler", "ge"), "steps": (5,), "n": 100}


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    method: str
    knobs: tuple
    steps: int


@dataclasses.dataclass(frozen=True)
class Result:
    name: str
    knobs: str
    steps: int
    nfe: int
    mmd2_pixels: float
    mmd2_features: float
    confidence: float
    wall_ms_per_image: float


def get_configs(settings=tuple(SETTINGS), steps=STEPS) -> list[Config]:
    """One config per (setting, step count); settings are keys of ``SETTINGS``."""
    out = []
    for name in settings:
        if name not in SETTINGS:
            raise ValueError(f"--methods: unknown setting {name!r}; expected some of {sorted(SETTINGS)}")
        method, knobs = SETTINGS[name]
        out += [Config(name, method, tuple(sorted(knobs.items())), s) for s in steps]
    return out


def _knob_text(knobs) -> str:
    return ",".join(f"{k}={v:g}" for k, v in knobs) or "-"


def run(config: Config, model, scorer, *, n: int, seed: int, backend, device) -> Result:
    """Sample ``n`` images with ``config`` (counting network calls) and score them."""
    from diffkern.models import builtin

    calls = [0]
    hook = model.model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        t0 = time.perf_counter()
        images = builtin.generate(model, n, config.method, config.steps, seed=seed, backend=backend,
                                  device=device, **dict(config.knobs))
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    finally:
        hook.remove()
    s = scorer(images)
    return Result(config.name, _knob_text(config.knobs), config.steps, calls[0], s["mmd_pixels"],
                  s["mmd_features"], s["confidence"], 1e3 * seconds / n)


def reference_rows(scorer, n: int, seed: int) -> list[Result]:
    """Scores of the reference image sets of :func:`diffkern.quality.baselines`."""
    from diffkern.quality import baselines

    rows = []
    for name, images in baselines(n, seed).items():
        s = scorer(images)
        rows.append(Result(f"[{name} images]", "-", 0, 0, s["mmd_pixels"], s["mmd_features"], s["confidence"],
                           float("nan")))
    return rows


def floor_spread(scorer, n: int, draws: int = 5) -> dict:
    """Mean and std of the [train images] scores over ``draws`` random subsets: the metric's noise level."""
    from diffkern.quality import baselines

    scores = [scorer(baselines(n, seed=1000 + k)["train"]) for k in range(draws)]
    out = {}
    for key in ("mmd_pixels", "mmd_features"):
        v = torch.tensor([s[key] for s in scores], dtype=torch.float64)
        out[key] = (float(v.mean()), float(v.std()))
    return out


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


COLUMNS = ("sampler", "knobs", "steps", "nfe", "mmd2_pixels", "mmd2_features", "confidence", "wall_ms_per_image")


def main(argv=None) -> int:
    p = harness.parser(__doc__.splitlines()[0])
    p.add_argument("--methods", default=None, help=f"comma-separated settings from {','.join(SETTINGS)}")
    p.add_argument("--steps", type=_ints, default=None, help="comma-separated step counts (default 5,10,20)")
    p.add_argument("--n", type=int, default=None, help="images per row (default 300, the held-out size; quick 100)")
    p.add_argument("--seed", type=int, default=0)
    b = harness.start(p, argv)
    args = b.args

    from diffkern.models import builtin
    from diffkern.quality import Scorer

    if args.methods:
        settings = tuple(args.methods.split(","))
    else:
        settings = QUICK["settings"] if args.quick else tuple(SETTINGS)
    steps = args.steps or (QUICK["steps"] if args.quick else STEPS)
    n = args.n or (QUICK["n"] if args.quick else 300)
    if n < 2:
        p.error(f"--n: expected an integer >= 2, got {n}")
    configs = get_configs(settings, steps)
    device = torch.device(b.device)
    backends = b.backends()
    if len(backends) != 1:
        p.error(f"--backends: this benchmark samples with one backend, got {backends}")
    backend = backends[0]
    with b.measuring():
        model = builtin.load_builtin(device=device)
        scorer = Scorer()
        results = reference_rows(scorer, n, args.seed)
        for c in configs:
            results.append(run(c, model, scorer, n=n, seed=args.seed, backend=backend, device=device))
        spread = floor_spread(scorer, n)
    rows = [{**dataclasses.asdict(r), "sampler": r.name, "backend": backend, "n": n, "seed": args.seed}
            for r in results]
    for r in rows:
        r.pop("name")
        if not r["steps"]:  # reference rows: no sampler
            r["steps"] = r["nfe"] = ""

    def plot(rows, path):
        curves = [{**r, "series": r["sampler"] + ("" if r["knobs"] == "-" else f" {r['knobs']}"), "metric": metric,
                   "mmd2": r[key]}
                  for r in rows if r["steps"] for metric, key in (("pixels", "mmd2_pixels"),
                                                                  ("features", "mmd2_features"))]
        return harness.plot_lines(curves, path, x="steps", y="mmd2", series="series", panel="metric",
                                  ylabel="MMD^2 vs held-out digits (lower is better)",
                                  title=f"built-in digits model, {n} images per point, {b.prov['device_name']}, "
                                        f"backend {backend}, {b.prov['git_sha'][:12]}")
    note = (f"MMD^2: lower is better; the [train images] row is the floor (a perfect generator), "
            f"[blurred images] and [noise images] are failures. Noise level of the floor over 5 other draws of {n}: "
            f"pixels {spread['mmd_pixels'][0]:.2g} +- {spread['mmd_pixels'][1]:.2g}, features "
            f"{spread['mmd_features'][0]:.2g} +- {spread['mmd_features'][1]:.2g}; smaller differences are noise.")
    return b.finish("quality", rows, COLUMNS, plot=plot, note=note,
                    what=f"sample quality of the built-in digits model ({n} images per row vs the 300 held-out "
                         f"digits, backend {backend}, seed {args.seed})")


if __name__ == "__main__":
    sys.exit(main())
