"""Sub-commands of ``python -m diffkern``: one module per command, each with ``register(subparsers)``.

Every command keeps its heavy imports inside its handler, so ``diffkern --help`` stays fast.
"""
COMMANDS = ("demo", "sample", "trajectory", "likelihood", "bench", "train")


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
    if not -2 ** 63 <= seed < 2 ** 64:
        raise ValueError(f"--seed: expected an int in [-2**63, 2**64), got {seed}")
