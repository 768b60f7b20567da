"""``diffkern demo``: sample the built-in 2-D Gaussian mixture and plot it beside the true density."""
from __future__ import annotations


def _run(args) -> int:
    from ..demo import plot, sample_demo
    from . import (MAX_DEMO_POINT_STEPS, MAX_DEMO_POINTS, check_backend, check_count, check_method, check_product,
                   check_seed, check_steps)
    from .sample import _check_out, _writing_out

    for flag in ("steps", "n"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag}: expected an integer >= 1, got {getattr(args, flag)}")
    check_steps(args.steps)
    check_count(args.n, "--n", MAX_DEMO_POINTS)
    check_product({"--n": args.n, "--steps": args.steps}, MAX_DEMO_POINT_STEPS, "point-steps")
    check_backend(args.backend)
    check_method(args.method)
    check_seed(args.seed)
    _check_out(args.out)
    gmm, samples, exact, summary = sample_demo(method=args.method, steps=args.steps, n=args.n, seed=args.seed,
                                               backend=args.backend)
    with _writing_out(args.out):  # only the write: a failing sampler is not an --out error
        plot(gmm, samples, exact, args.out, summary)
    print(f"sampled {summary['n']} points of a 2-D Gaussian mixture with {summary['method']} "
          f"({summary['steps']} steps) on backend {summary['backend']} in {summary['seconds']:.3f} s")
    print(f"mean log-density: samples {summary['mean_log_density_samples']:.3f}, "
          f"exact samples {summary['mean_log_density_exact']:.3f}")
    print(f"wrote {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="sample a built-in 2-D Gaussian mixture and plot it",
                       description="Sample the built-in 2-D Gaussian mixture with its exact denoiser and plot the "
                                   "samples beside the true density (PNG).")
    p.add_argument("--out", default="out/demo.png", help="PNG to write (default: out/demo.png)")
    p.add_argument("--method", default="ge", help="sampler (default: ge)")
    p.add_argument("--steps", type=int, default=20, help="number of steps (default: 20)")
    p.add_argument("--n", type=int, default=4000, help="number of points (default: 4000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default=None,
                   help="reference | cpp | triton | cuda | auto (default: DIFFKERN_BACKEND, else auto)")
    p.set_defaults(func=_run)
