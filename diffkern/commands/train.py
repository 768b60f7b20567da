"""``diffkern train``: retrain the built-in digits denoiser (or the quality metric's classifier)."""
from __future__ import annotations

from . import MAX_TRAIN_BATCH, MAX_TRAIN_STEPS, check_count, check_seed
from .sample import _check_out, _writing_out


def _run(args) -> int:
    import torch

    from .. import train
    from ..models import builtin

    for flag in ("steps", "batch"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag}: expected an integer >= 1, got {getattr(args, flag)}")
    if args.steps is not None:
        check_count(args.steps, "--steps", MAX_TRAIN_STEPS)
    if args.batch is not None:
        check_count(args.batch, "--batch", MAX_TRAIN_BATCH)
    if not args.lr > 0:
        raise ValueError(f"--lr: expected a number > 0, got {args.lr}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads: expected an integer >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    check_seed(args.seed)
    _check_out(args.out, ".safetensors")
    settings = {k: getattr(args, k) for k in ("steps", "batch") if getattr(args, k) is not None}
    if args.target == "classifier":
        clf, accuracy = train.train_classifier(**settings, lr=args.lr, seed=args.seed, progress=not args.no_progress)
        with _writing_out(args.out):
            train.save_classifier(clf, args.out)
        print(f"classifier held-out accuracy {accuracy:.4f}; wrote {args.out}")
        return 0
    model = train.train_denoiser(**settings, lr=args.lr, seed=args.seed, progress=not args.no_progress)
    with _writing_out(args.out):
        builtin.save_denoiser(model, args.out, model.info)
    info = model.info
    print(f"trained {info['params']:,} parameters for {info['steps']} steps of {info['batch']} images in "
          f"{info['seconds']:.1f} s ({info['cpu_seconds']:.1f} s of CPU time, {info['threads']} "
          f"thread{'' if info['threads'] == 1 else 's'}); "
          f"final loss {info['final_loss']:.4f}")
    print(f"wrote {args.out}; sample it with: diffkern sample --model {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="retrain the built-in digits denoiser (a few minutes on a CPU)",
                       description="Retrain the built-in digits model (EDM preconditioning and loss) on the CPU.")
    p.add_argument("--target", default="denoiser", choices=("denoiser", "classifier"),
                   help="denoiser (default) or the quality metric's feature classifier")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default 3000; classifier 600)")
    p.add_argument("--batch", type=int, default=None, help="images per step (default 64; classifier 128)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (default 2e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights, batches and noise")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--out", default="out/digits.safetensors", help="weights file to write")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
