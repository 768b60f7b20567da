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


def check_steps(steps: int, flag: str = "--steps") -> None:
    """--steps: an int in [1, MAX_STEPS]; raises ValueError naming ``flag`` before any schedule is built."""
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"{flag}: expected an integer in [1, {MAX_STEPS}], got {steps}")
