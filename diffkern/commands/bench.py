"""``diffkern bench``: run the benchmark suite in ``bench/`` (or one named part) and print its tables.

Each ``bench/bench_<name>.py`` exposes ``main(argv) -> int | None``; arguments after the name go to it
(``diffkern bench sampler_step --quick``). The suite lives in the source checkout, not in the installed
package, so this command needs the repository (it looks beside the package, or in ``DIFFKERN_BENCH_DIR``).
"""
from __future__ import annotations

import argparse
import os

# Where a --quick run writes when no --out is given (relative to the working directory, beside out/digits.png).
# The scripts' own default is bench/results/<device>/, the committed measurements README.md quotes: a smoke run
# there would overwrite them with smoke numbers.
QUICK_OUT = os.path.join("out", "bench-quick")


def bench_dir() -> str:
    """The ``bench/`` folder: $DIFFKERN_BENCH_DIR, else the one beside the ``diffkern`` package."""
    here = os.environ.get("DIFFKERN_BENCH_DIR") or os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench")
    if not os.path.isdir(here):
        raise FileNotFoundError(f"no bench/ folder at {here!r}: run from a source checkout of diffkern "
                                "or set DIFFKERN_BENCH_DIR")
    return here


def available() -> list[str]:
    """Names of the benchmark parts (``bench_<name>.py`` files)."""
    return sorted(f[len("bench_"):-3] for f in os.listdir(bench_dir()) if f.startswith("bench_") and f.endswith(".py"))


def load(name: str):
    """Import ``bench/bench_<name>.py`` as a module (with ``bench/`` on sys.path for its harness)."""
    import importlib
    import sys

    folder = bench_dir()
    names = available()
    if name not in names:
        raise ValueError(f"bench: unknown part {name!r}; available: {', '.join(names) or 'none'}")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    parent = os.path.dirname(folder)
    if parent not in sys.path:  # so that `import bench.harness` also works
        sys.path.insert(1, parent)
    module = importlib.import_module(f"bench_{name}")
    if not callable(getattr(module, "main", None)):
        raise ValueError(f"bench: bench_{name}.py has no main(argv)")
    return module


def part_argv(quick: bool, rest) -> list[str]:
    """The argv of each part: ``--quick`` (flag before or after the name) and the rest; a quick run without
    ``--out`` writes to :data:`QUICK_OUT`, never over the committed results."""
    argv = (["--quick"] if quick else []) + list(rest)
    if "--quick" in argv and not any(a == "--out" or a.startswith("--out=") for a in argv):
        argv += ["--out", QUICK_OUT]
    return argv


def _run(args) -> int:
    if args.list:
        print("\n".join(available()))
        return 0
    names = [args.name] if args.name else available()
    if args.name is None and args.args:
        raise ValueError(f"bench: arguments {args.args} need a part name (see `diffkern bench --list`)")
    modules = [load(n) for n in names]  # every name is checked before anything runs
    argv = part_argv(args.quick, args.args)
    status = 0
    for name, module in zip(names, modules):
        if len(names) > 1:
            print(f"\n## bench {name}\n", flush=True)
        status = max(status, int(module.main(argv) or 0))
    return status


def register(sub) -> None:
    p = sub.add_parser("bench", help="run the bench/ suite or one part of it and print its tables",
                       description="Run bench/bench_<name>.py (all of them without a name).")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument("--list", action="store_true", help="list the parts and exit")
    try:  # listed in the help too, not only by --list; without a checkout, the error comes when the command runs
        parts = ", ".join(available())
    except FileNotFoundError:
        parts = "none found (no bench/ folder)"
    p.add_argument("name", nargs="?", help=f"part to run (default: all); the parts: {parts}")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for that part's main(argv)")
    p.set_defaults(func=_run)
