"""Command line: ``python -m diffkern <command>`` (also installed as ``diffkern``).

Bad arguments or bad input end with one clear line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .commands import COMMANDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffkern", description="Fused-kernel diffusion sampling.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"diffkern.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"diffkern.commands.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, KeyError, RuntimeError, OSError) as exc:  # OSError: files that cannot be written
        print(f"diffkern {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
