"""Sampler knobs on the command line (``diffkern sample`` and ``diffkern trajectory``).

The common knobs have their own flags (``--gamma --mu --lam --eta --s-churn``); every other knob of
:func:`diffkern.knobs` is set with ``--knob NAME=VALUE`` (repeatable), parsed by the type of the knob's default:
a number, a word (``solver_type=heun``), ``true``/``false``, or comma-separated step indices or orders for the
sequence-valued ones (``disable_corrector=0,1``, ``orders=1,2,2,1``; an empty value is the empty sequence, ``none``
is None), comma-separated numbers for a per-step number (sa_solver's ``tau=0.5,0.3,0``). Knob values are checked on the host schedule before any model is loaded, and errors name the flag.
"""
from __future__ import annotations

import numbers

# dedicated flag (argparse dest) -> sampler keyword
KNOB_FLAGS = {"gamma": "gamma", "mu": "mu", "lam": "lam", "eta": "eta", "s_churn": "s_churn"}
_BOOLS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
# Knobs whose default None types nothing: a value of the kind given here (lcm's s_noise_end is a number, not a
# sequence). A None-default knob not listed (er_sde's noise_scaler, a callable) takes only "none" here.
_NONE_KINDS = {"s_noise_end": 0.0, "orders": ()}
# Number knobs that also take one value per step (sa_solver's tau): comma-separated numbers.
_PER_STEP = {"tau"}


def add_knob_argument(parser) -> None:
    """Add ``--knob NAME=VALUE`` (repeatable) to ``parser``."""
    parser.add_argument("--knob", action="append", default=[], metavar="NAME=VALUE",
                        help="any other knob of the method (diffkern.knobs(method)), repeatable: "
                             "--knob solver_type=heun --knob s_noise=0.9 --knob orders=1,2,2,1")


def _parse(name: str, text: str, default):
    """``text`` as a value of the knob ``name`` whose default is ``default``; raises ValueError naming --knob."""
    label = f"--knob {name}"
    if default is None and name in _NONE_KINDS and text.strip().lower() != "none":
        return _parse(name, text, _NONE_KINDS[name])
    if name in _PER_STEP and "," in text:
        return tuple(_parse(name, v, default) for v in text.split(","))
    try:
        if isinstance(default, bool):
            if text.strip().lower() not in _BOOLS:
                raise ValueError
            return _BOOLS[text.strip().lower()]
        if isinstance(default, numbers.Integral):
            return int(text)
        if isinstance(default, numbers.Real):
            return float(text)
        if isinstance(default, str):
            return text
        if default is None and text.strip().lower() == "none":
            return None
        if isinstance(default, (tuple, list)):
            return tuple(int(v) for v in text.split(",")) if text.strip() else ()
    except ValueError:
        kind = ("true or false" if isinstance(default, bool) else "an integer" if isinstance(default, numbers.Integral)
                else "a number" if isinstance(default, numbers.Real) else "comma-separated integers")
        raise ValueError(f"{label}: expected {kind}, got {text!r}") from None
    only = " except to none" if default is None else ""
    raise ValueError(f"{label}: this knob (default {default!r}) cannot be set from the command line{only}")


def collect(args, method: str, valid: dict) -> tuple[dict, dict]:
    """The knobs chosen on the command line for ``method`` (``valid``: its :func:`diffkern.knobs`), as
    ``(knobs, labels)``: keyword -> value, and keyword -> the flag that set it (for error messages).
    A flag or --knob name the method does not take raises ValueError naming it."""
    chosen, labels = {}, {}
    for flag, kw in KNOB_FLAGS.items():
        if getattr(args, flag, None) is None:
            continue
        chosen[kw], labels[kw] = getattr(args, flag), f"--{flag.replace('_', '-')}"
        if kw not in valid:
            raise ValueError(f"{labels[kw]}: method {method!r} has no knob {kw!r} "
                             f"(its knobs: {', '.join(sorted(valid)) or 'none'})")
    for item in getattr(args, "knob", None) or ():
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"--knob: expected NAME=VALUE, got {item!r}")
        if name in labels:
            raise ValueError(f"--knob {name}: already set by {labels[name]}")
        if name not in valid:
            raise ValueError(f"--knob: method {method!r} has no knob {name!r} "
                             f"(its knobs: {', '.join(sorted(valid)) or 'none'})")
        chosen[name], labels[name] = _parse(name, text, valid[name]), f"--knob {name}"
    return chosen, labels


def check(method: str, chosen: dict, labels: dict, sigmas) -> None:
    """Build ``method``'s host plan on ``sigmas`` with ``chosen`` so that a bad value fails now, before any model
    is loaded, with the flag that set it named (the samplers name the keyword: ``eta: expected ...``)."""
    from ..samplers_adaptive import EAGER_ONLY, check_sample_knobs
    from ..sampling import host_plan

    try:
        if method in EAGER_ONLY:  # no plan: its steps are decided as it runs
            check_sample_knobs(chosen)
        else:
            host_plan(method, chosen, sigmas)
    except (ValueError, TypeError) as exc:
        name, sep, rest = str(exc).partition(":")
        if sep and name in labels:
            raise ValueError(f"{labels[name]}:{rest}") from None
        raise
