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


def check_count(value: int, flag: str, most: int, least: int = 1) -> None:
    """An int flag in [least, most] (a count bounded so that a typo cannot hang the command); raises ValueError
    naming ``flag``. Call it before any work."""
    if not least <= value <= most:
        raise ValueError(f"{flag}: expected an integer in [{least}, {most}], got {value}")
