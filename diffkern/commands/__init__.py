"""Sub-commands of ``python -m diffkern``: one module per command, each with ``register(subparsers)``.

Every command keeps its heavy imports inside its handler, so ``diffkern --help`` stays fast.
"""
COMMANDS = ("demo", "sample", "trajectory", "likelihood", "bench", "train")
