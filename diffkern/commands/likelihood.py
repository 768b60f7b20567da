"""``diffkern likelihood``: the log-likelihood of given points with McAllester's estimator and its
standard error (``diffkern.likelihood``), under the built-in 2-D demo mixture.

Points come from ``--points "x,y; x,y"`` or a file (.npy, .csv, .pt) holding an (N, 2) array. The
mixture's exact log-density is printed beside the estimate, and with ``--ode`` the
probability-flow-ODE estimate too. With ``--bpd [WIDTH]`` every column is in bits per dimension
(``diffkern.likelihood.bits_per_dim``) of points quantised to bins of WIDTH (default 1: the density's own
``-log2 p / D``).
"""
from __future__ import annotations

import os

FILE_TYPES = (".npy", ".csv", ".pt")
GRIDS = ("random", "fixed")
# Largest |ln p(x)| accepted. The estimator accumulates per point a sum of the size of |ln p| (the integral of
# ||eps - eps_hat||^2) in float32 (max 3.4e38), and with few levels one term can exceed it several-fold (--levels 1
# --grid fixed: 5.5x measured), so 1e36 keeps a margin of ~60; the demo mixture reaches it at |x| ~ 3.5e17
# (ln p ~ -8 |x|^2 far out). Before this bound, 1e19 printed -inf +- nan with exit code 0.
MAX_ABS_LOG_P = 1e36


def parse_points(text: str):
    """``"x,y; x,y"`` -> float64 tensor (N, D); raises ValueError naming --points."""
    import torch

    rows = [r for r in (part.strip() for part in text.split(";")) if r]
    if not rows:
        raise ValueError("--points: expected points as 'x,y; x,y', got an empty string")
    try:
        values = [[float(v) for v in row.split(",")] for row in rows]
    except ValueError:
        raise ValueError(f"--points: expected comma-separated numbers per point, got {text!r}") from None
    if len({len(v) for v in values}) != 1:
        raise ValueError(f"--points: every point needs the same number of coordinates, got {text!r}")
    return torch.tensor(values, dtype=torch.float64)


def load_points(path: str):
    """An (N, D) float64 tensor from a .npy, .csv or .pt file; raises naming --file."""
    import pickle

    import numpy as np
    import torch

    suffix = os.path.splitext(path)[1].lower()
    if suffix not in FILE_TYPES:
        raise ValueError(f"--file: expected a {', '.join(FILE_TYPES)} file, got {path!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--file: no such file {path!r}")
    try:
        if suffix == ".npy":
            data = torch.from_numpy(np.load(path, allow_pickle=False))
        elif suffix == ".csv":
            data = torch.from_numpy(np.loadtxt(path, delimiter=",", ndmin=2))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except (ValueError, TypeError, pickle.UnpicklingError) as exc:  # not numbers, or not the format its suffix says
        raise ValueError(f"--file: cannot read {path!r} as an (N, D) array of numbers "
                         f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if not isinstance(data, torch.Tensor):  # a .pt holding a dict, a list, ...
        raise ValueError(f"--file: expected a saved tensor in {path!r}, got {type(data).__name__}")
    if data.dim() == 1:
        data = data[None]
    if data.dim() != 2 or not (data.is_floating_point() or data.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"--file: expected an (N, D) array of numbers, got shape {tuple(data.shape)} "
                         f"and dtype {data.dtype}")
    return data.to(torch.float64)


def parse_width(text: str) -> float:
    """``--bpd`` WIDTH: a float or a fraction ``a/b`` (``2/255``), > 0 and finite; raises naming --bpd."""
    import argparse

    try:
        parts = [float(v) for v in text.split("/")]
        if len(parts) > 2:
            raise ValueError
        value = parts[0] / parts[1] if len(parts) == 2 else parts[0]
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a bin width as a number or a fraction like 2/255, "
                                         f"got {text!r}") from None
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a bin width > 0, got {text!r}")
    return value


def _run(args) -> int:
    import math

    import torch

    from .. import analytic
    from ..likelihood import bits_per_dim, log_likelihood, ode_log_likelihood
    from . import MAX_LEVELS, MAX_NOISED_POINTS, MAX_SAMPLES, check_common, check_count

    check_common(args)  # --sigma-min/--sigma-max/--backend, named as flags
    if not 0 <= args.seed < 2 ** 31:  # unlike the sampling commands' 64-bit seeds: see the message
        raise ValueError(f"--seed: expected an int in [0, 2**31) (the estimator keys each row's noise by "
                         f"seed * 2**32 + row in 64 bits), got {args.seed}")
    if args.samples < 2:
        raise ValueError(f"--samples: expected an int >= 2 (the standard error needs two repeats), got {args.samples}")
    check_count(args.samples, "--samples", MAX_SAMPLES, least=2)
    check_count(args.levels, "--levels", MAX_LEVELS)
    if args.grid not in GRIDS:
        raise ValueError(f"--grid: expected one of {', '.join(GRIDS)}, got {args.grid!r}")
    if (args.points is None) == (args.file is None):
        raise ValueError("likelihood: give the points with --points 'x,y; x,y' or --file PATH (one of them)")
    points = parse_points(args.points) if args.points is not None else load_points(args.file)
    gmm = analytic.GaussianMixture.demo_2d()
    source = "--points" if args.points is not None else "--file"
    if points.shape[1] != gmm.dim:
        raise ValueError(f"{source}: the demo mixture is {gmm.dim}-D, got points with {points.shape[1]} coordinates")
    if not torch.isfinite(points.float()).all():  # the estimator runs in float32: 1e39 would become inf there
        raise ValueError(f"{source}: the points must be finite and within float32 range (|x| < 3.4e38)")
    noised = args.levels * args.samples * points.shape[0]  # the estimator's grid holds them all: see MAX_NOISED_POINTS
    if noised > MAX_NOISED_POINTS:
        raise ValueError(f"--levels x --samples x points: {args.levels} x {args.samples} x {points.shape[0]} = "
                         f"{noised} noised points, over the {MAX_NOISED_POINTS} whose grid is built before the first "
                         f"model call (2 GiB); use fewer --levels or --samples")
    exact = gmm.log_prob(points)  # float64: tells how large the float32 accumulator's sums will be
    far = (exact.abs() > MAX_ABS_LOG_P).nonzero().flatten().tolist()
    if far:
        i = far[0]
        raise ValueError(f"{source}: point {i} ({', '.join(f'{v:.4g}' for v in points[i].tolist())}) is too far out "
                         f"for the float32 estimator: exact log-density {float(exact[i]):.3g}, beyond "
                         f"-{MAX_ABS_LOG_P:g} (|x| up to ~3e17 for this mixture)")
    data_std = math.sqrt(float(gmm.covariance.trace()) / gmm.dim)
    res = log_likelihood(gmm, points.float(), sigma_min=args.sigma_min, sigma_max=args.sigma_max,
                         n_levels=args.levels, grid=args.grid, n_samples=args.samples, seed=args.seed,
                         data_std=data_std, backend=args.backend)
    if not (torch.isfinite(res.log_prob).all() and torch.isfinite(res.stderr).all()):  # never print nan, exit 0
        raise RuntimeError(f"the estimate is not finite (float32 overflow); try a smaller --sigma-max "
                           f"or points nearer the mixture in {source}")
    ode = ode_log_likelihood(gmm, points, sigma_min=args.sigma_min, sigma_max=args.sigma_max,
                             terminal=gmm.log_prob) if args.ode else None
    log_prob, stderr = res.log_prob, res.stderr
    unit = "log-likelihood (nats)"
    if args.bpd is not None:  # every column in bits per dimension of points quantised to bins of width args.bpd
        dims = points.shape[1]
        log_prob, stderr = bits_per_dim(log_prob, dims, scale=args.bpd), stderr / (dims * math.log(2))
        exact = bits_per_dim(exact, dims, scale=args.bpd)
        ode = bits_per_dim(ode, dims, scale=args.bpd) if ode is not None else None
        unit = f"bits per dimension (bin width {args.bpd:g}; lower is more likely)"
    print(f"{unit} under the 2-D demo mixture: McAllester's estimator, {args.grid} grid, "
          f"{args.levels} levels x {args.samples} samples, sigma in [{args.sigma_min:g}, {args.sigma_max:g}]")
    header = f"{'point':>24}  {'estimate':>9}    {'s.e.':<7} {'exact':>9}"
    print(header + (f" {'ode':>9}" if ode is not None else ""))
    for i, p in enumerate(points.tolist()):
        point = "(" + ", ".join(f"{v:.4g}" for v in p) + ")"
        line = f"{point:>24}  {float(log_prob[i]):9.4f} +- {float(stderr[i]):<7.4f} {float(exact[i]):9.4f}"
        print(line + (f" {float(ode[i]):9.4f}" if ode is not None else ""))
    return 0


def register(sub) -> None:
    p = sub.add_parser("likelihood", help="log-likelihood of points (McAllester's estimator, with standard errors)",
                       description="Log-likelihood of 2-D points under the demo mixture: McAllester's estimator "
                                   "with standard errors, beside the exact log-density.")
    p.add_argument("--points", help="points as 'x,y; x,y'")
    p.add_argument("--file", help="points in a .npy, .csv or .pt file holding an (N, 2) array")
    p.add_argument("--levels", type=int, default=64, help="noise levels per sample (default: 64)")
    p.add_argument("--samples", type=int, default=256, help="independent repeats for the standard error (default: 256)")
    p.add_argument("--grid", default="random", help="random (stratified, unbiased) | fixed (default: random)")
    p.add_argument("--sigma-min", type=float, default=1e-3, help="lower end of the sigma integral (default: 1e-3)")
    p.add_argument("--sigma-max", type=float, default=80.0, help="upper end of the sigma integral (default: 80)")
    p.add_argument("--ode", action="store_true", help="also print the probability-flow-ODE estimate")
    p.add_argument("--bpd", nargs="?", const=1.0, type=parse_width, metavar="WIDTH",
                   help="print bits per dimension instead of nats, for points quantised to bins of WIDTH "
                        "(a number or a fraction like 2/255; default 1: -log2 p / D)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default=None, help="reference | cpp | triton | cuda | auto")
    p.set_defaults(func=_run)
