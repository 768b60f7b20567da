"""Retrain the shipped built-in model and rewrite its model card.

    .venv/bin/python scripts/train_builtin.py [--steps 3000] [--threads 2] [--skip-classifier]

Writes ``diffkern/data/digits.safetensors`` (the denoiser), ``diffkern/data/digits_classifier.safetensors``
(the quality metric's feature classifier) and ``diffkern/data/digits.json`` (the model card: settings,
wall time, scores). ``diffkern train`` retrains only the denoiser, to a path of your choice.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from diffkern import train  # noqa: E402
from diffkern._host import cpu_model  # noqa: E402
from diffkern.models import builtin  # noqa: E402
from diffkern.quality import CLASSIFIER, Scorer, baselines  # noqa: E402

CARD = os.path.join(builtin.DATA_DIR, "digits.json")
SCORED = (("ge", 10, {"gamma": 2.0}), ("ge", 20, {"gamma": 2.0}), ("euler", 20, {}), ("heun", 10, {}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--skip-classifier", action="store_true", help="keep the shipped classifier")
    p.add_argument("--n", type=int, default=300, help="images scored per row of the card")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    card = {"data": "sklearn.datasets.load_digits, bilinear 8x8 -> 16x16, [-1, 1]; held out: index % 6 == 0 "
                    "(300 images), trained on the other 1,497",
            "cpu": cpu_model(), "threads": torch.get_num_threads()}
    if not args.skip_classifier:
        t0 = time.perf_counter()
        clf, accuracy = train.train_classifier(seed=args.seed, progress=True)
        train.save_classifier(clf, CLASSIFIER)
        card["classifier"] = {"heldout_accuracy": round(accuracy, 4), "seconds": round(time.perf_counter() - t0, 1)}
    elif os.path.exists(CARD):
        with open(CARD) as f:
            card["classifier"] = json.load(f).get("classifier")

    model = train.train_denoiser(args.steps, seed=args.seed, progress=True)
    card["load_average_1_5_15min_after_training"] = [round(v, 2) for v in os.getloadavg()]
    builtin.save_denoiser(model, builtin.WEIGHTS, model.info)
    card["denoiser"] = model.info
    card["weights_bytes"] = os.path.getsize(builtin.WEIGHTS)

    scorer = Scorer()
    scores = {f"[{k} images]": _round(scorer(v)) for k, v in baselines(args.n, args.seed).items()}
    for method, steps, knobs in SCORED:
        images = builtin.generate(model, args.n, method, steps, seed=args.seed, **knobs)
        key = f"{method}{''.join(f' {k}={v:g}' for k, v in knobs.items())}, {steps} karras steps"
        scores[key] = _round(scorer(images))
    card["scores"] = {"what": f"{args.n} images vs the 300 held-out digits (diffkern.quality.Scorer), "
                              f"seed {args.seed}; MMD^2 lower is better", **scores}
    builtin.atomic_write(CARD, lambda tmp: _write_text(tmp, json.dumps(card, indent=2) + "\n"))
    print(json.dumps(card, indent=2))
    return 0


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _round(score: dict) -> dict:
    return {k: round(v, 5) for k, v in score.items()}


if __name__ == "__main__":
    sys.exit(main())
