"""Sub-commands of ``python -m diffkern``: one module per command, each with ``register(subparsers)``.

Every command keeps its heavy imports (the samplers, the models, matplotlib) inside its handler, so building
the parser adds little; ``diffkern --help`` still imports torch, because ``diffkern/__init__`` imports
``diffkern.ops`` (which registers ``torch.ops.diffkern``) before any command module can load.
"""
COMMANDS = ("demo", "sample", "trajectory", "likelihood", "bench", "train")

# Upper bound of --steps. The host builds every per-step float64 table in Python before sampling (O(steps):
# ~1 s at 10000 steps for the slowest plan, sa_solver), so 10**8 steps would hang there. 10000 is 500 times the
# default (20): far past the step counts of convergence studies (hundreds), so no real use is refused.
MAX_STEPS = 10000

# Upper bound of train --steps. The default (3000) takes a few minutes on a CPU (~0.05 s a step), where the loss has
# long flattened; 100000 steps (33 times that) are hours already, so only a typo (10**9: years) is refused.
MAX_TRAIN_STEPS = 100000

# Upper bounds of likelihood --levels and --samples. Each level is one model call over every row (point x sample) in
# a Python loop, and the estimator builds its float64 grid of sigmas and control-variate weights, (levels, rows) each,
# before the first call. --levels: 10000 is 156 times the default (64) and far past where the stratified grid's
# standard error stops shrinking with levels. --samples: 100000 is 390 times the default (256), a standard error 20
# times smaller. Their product with the number of points is bounded too (MAX_NOISED_POINTS): 2**27 level-rows are
# a 2 GiB grid and ~6 minutes (~2.7 us each on the 2-core CI CPU); 10**6 levels x 10**6 samples would never start.
MAX_LEVELS = 10000
MAX_SAMPLES = 100000
MAX_NOISED_POINTS = 2 ** 27

# Upper bound of train --batch. One denoiser step holds ~0.9 MB of activations per image (4096 images: 3.6 GB peak and
# ~30 s a step on one CPU thread), and batches are drawn with replacement from the 1497 training images, so a batch
# past them only repeats images; 2048 (32 times the default, 64) covers them all in ~1.8 GB.
MAX_TRAIN_BATCH = 2048

# Upper bound of demo --n. The exact denoiser, the exact samples and the scatter plot are all O(n) in memory: 10**6
# points (250 times the default, 4000) already take ~1 GB and ~1 minute for 20 steps on the 2-core CI CPU.
MAX_DEMO_POINTS = 10 ** 6

# Upper bound of demo --n x --steps: the loop's work is one model call per point and step (~1.2 us each, measured with
# ge on the cpp backend on one CI CPU thread: 10**5 points x 200 steps in 24 s), so 10**8 point-steps is ~2 minutes.
# It admits the default 4000 points at the most --steps (MAX_STEPS: 4 x 10**7) and the most points at 100 steps;
# 10**6 points x 10**4 steps (~3 hours) is refused.
MAX_DEMO_POINT_STEPS = 10 ** 8

# Upper bounds of sample --batch and of --batch x --steps. The built-in denoiser holds ~0.25 MB per image while
# sampling (measured: 1024 images peak at 0.5 GB RSS) and the grid PNG grows with the batch (4096 images: 7200 pixels
# square at the default scale); 4096 is 64 times the default (64). Each image-step is one network call, ~1 ms on one
# CI CPU thread (1024 images x 2 steps: 2.8 s), so 10**6 image-steps is ~15 minutes there (seconds on a GPU): it admits
# the default batch at the most --steps (6.4 x 10**5) and the most images at 244 steps.
MAX_SAMPLE_BATCH = 4096
MAX_IMAGE_STEPS = 10 ** 6

# Upper bound of trajectory --n. Both trajectories of every point are recorded, (steps+1, n, 2) float64 each, and each
# point is one line on two panels (matplotlib draws them one by one): 1024 trajectories of the most --steps (10000)
# take ~26 s and 1.3 GB (measured: 18 s sampling, 8 s plotting), 64 times the default (16) and far past a readable plot.
MAX_TRAJECTORIES = 1024


def check_common(args) -> None:
    """Checks shared by the sampling commands: --sigma-min/--sigma-max (and --rho if present), --backend.

    Raises ValueError naming the flag; ``__main__`` turns it into one line on stderr and exit code 2.
    """
    import math

    for flag in ("sigma_min", "sigma_max", "rho"):
        value = getattr(args, flag, None)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"--{flag.replace('_', '-')}: expected a finite number > 0, got {value}")
    if args.sigma_min >= args.sigma_max:
        raise ValueError(f"--sigma-min ({args.sigma_min}) must be below --sigma-max ({args.sigma_max})")
    check_backend(args.backend)


def check_method(method: str) -> dict:
    """--method: the knobs of a :func:`diffkern.sample` method; raises ValueError naming the flag when unknown."""
    from ..sampling import knobs

    try:
        return knobs(method)
    except ValueError as exc:  # name the flag, not the Python argument
        raise ValueError(f"--{exc}") from None


def check_backend(backend) -> None:
    """--backend: None (the default), "auto" or a backend name; raises ValueError naming the flag."""
    from .. import ops

    if backend is not None and backend not in ops.BACKENDS + ("auto",):
        raise ValueError(f"--backend: expected one of {', '.join(ops.BACKENDS + ('auto',))}, got {backend!r}")


def check_seed(seed: int) -> None:
    """--seed: an int in [-2**63, 2**64) (the range of torch's generators and of the Philox key, 64 bits);
    raises ValueError naming the flag (torch would fail later with 'Overflow when unpacking long long')."""
    from ..sampler_loop import check_seed_range

    check_seed_range(seed, "--seed")


def check_steps(steps: int, flag: str = "--steps") -> None:
    """--steps: an int in [1, MAX_STEPS]; raises ValueError naming ``flag`` before any schedule is built."""
    check_count(steps, flag, MAX_STEPS)


def check_product(counts: dict, most: int, what: str) -> None:
    """The product of int flags ``counts`` ({flag: value}, each already checked) at most ``most`` (work that grows with
    all of them); raises ValueError naming the flags, their product and ``what`` it counts. Call it before any work."""
    import math

    total = math.prod(counts.values())
    if total > most:
        raise ValueError(f"{' x '.join(counts)}: {' x '.join(str(v) for v in counts.values())} = {total} {what}, over "
                         f"the {most} allowed; use fewer {' or '.join(counts)}")


def check_count(value: int, flag: str, most: int, least: int = 1) -> None:
    """An int flag in [least, most] (a count bounded so that a typo cannot hang the command); raises ValueError
    naming ``flag``. Call it before any work."""
    if not least <= value <= most:
        raise ValueError(f"{flag}: expected an integer in [{least}, {most}], got {value}")
