"""The shared harness of the config fuzzers (``test_diffusers_config_fuzz*.py``, ``test_pndm_fuzz.py``): drawing
configs over the keys of a diffusers scheduler class, judging a draw that diffusers or diffkern refuses, the rule on
one output, and the save/load round trip of an accepted config.

Every fuzzer draws seeded, deterministic configs; for each one either diffusers refuses it (ours must raise a
ValueError too), or it holds what diffkern documents as unsupported (ours must raise a ValueError naming
``key=value``), or both accept it and the fuzzer compares the schedules and steps (:func:`refusal_outcome` decides
which). A plain module in ``tests/`` like :mod:`dropin_conformance`; it holds no tests.
"""
from __future__ import annotations

import contextlib
import inspect

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffkern.testing import assert_matches_reference  # noqa: E402

BETA_RANGES = [(0.0001, 0.02), (0.00085, 0.012), (0.0015, 0.0195)]
# The schedule keys every fuzzer draws from the same values (a fuzzer adds its class's own keys).
SCHEDULE_CHOICES = {
    "num_train_timesteps": [1000, 1000, 999, 37, 100],
    "beta_schedule": ["linear", "scaled_linear", "squaredcos_cap_v2"],
    "prediction_type": ["epsilon", "v_prediction", "sample"],
    "timestep_spacing": ["leading", "trailing", "linspace"],
    "steps_offset": [0, 1, 2],
}
# Keys set together (the beta range), as a table, or by the step counts drawn: no "never drawn" complaint for them.
NOT_DRAWN_ALONE = frozenset({"beta_start", "beta_end", "trained_betas", "num_train_timesteps"})


def init_keys(name):
    """The ``__init__`` keys of diffusers' class ``name`` with their defaults."""
    return {k: p.default for k, p in inspect.signature(getattr(diffusers, name).__init__).parameters.items()
            if k != "self"}


def trained_betas(lo, hi, T):
    """A trained beta table of ``T`` float32 values from ``lo`` to ``hi`` (increasing, as the real ones), a list."""
    return np.linspace(lo ** 0.5, hi ** 0.5, T).__pow__(2).astype(np.float32).tolist()


def draw_keys(rng, keys, choices, rare, p_rare):
    """A config drawing each of ``keys`` in turn: a value of ``rare`` with probability ``p_rare``, else one of
    ``choices`` with probability 0.35 (the rest keep their defaults)."""
    config = {}
    for key in keys:
        if key in rare and rng.random() < p_rare:
            config[key] = rng.choice(rare[key])
        elif key in choices and rng.random() < 0.35:
            config[key] = rng.choice(choices[key])
    return config


def undrawn_keys(name, configs, exempt=()):
    """The keys of diffusers' class ``name`` that no config of ``configs`` sets to a non-default value (sorted; the
    keys of :data:`NOT_DRAWN_ALONE` and ``exempt`` left out)."""
    keys = init_keys(name)
    seen = set()
    for config in configs:
        seen |= {key for key, v in config.items() if key in keys and v != keys[key]}
    return sorted(set(keys) - seen - NOT_DRAWN_ALONE - set(exempt))


def refuses(make):
    """The exception ``make()`` raises, or None (and its result)."""
    try:
        return None, make()
    except Exception as exc:  # noqa: BLE001  (diffusers raises many kinds; we compare kinds below)
        return exc, None


def both_accept(make_truth, make_ours):
    """(truth, ours) from ``make_truth()`` and ``make_ours(truth)``, or None where either raises (a refusal, which
    the fuzzer's float32 comparison judges)."""
    error, truth = refuses(make_truth)
    if error is not None:
        return None
    error, ours = refuses(lambda: make_ours(truth))
    return None if error is not None else (truth, ours)


def refusal_outcome(what, their_error, our_error, refusals, on_refused=None):
    """Judge a draw from what diffusers and ours raised (:func:`refuses`): ours may raise only a ValueError; where
    diffusers refuses, ours must too ("diffusers refuses"); where ``refusals()`` (called only when diffusers accepts)
    lists documented unsupported (key, value) pairs, ours must refuse naming one of them as ``key=value`` ("refused
    KEY", after ``on_refused(pairs)``); otherwise ours must accept and None is returned: compare the two."""
    if our_error is not None and not isinstance(our_error, ValueError):
        raise AssertionError(f"{what}: ours raised {our_error!r}, expected a ValueError") from our_error
    if their_error is not None:
        assert our_error is not None, f"{what}: diffusers refuses it ({their_error!r}) but ours accepts it"
        return "diffusers refuses"
    refused = refusals()
    if refused:
        assert our_error is not None, f"{what}: ours accepts unsupported {refused}"
        named = [f"{k}={v!r}" for k, v in refused]
        assert any(n in str(our_error) for n in named), f"{what}: {our_error} names none of {named}"
        if on_refused is not None:
            on_refused(refused)
        return "refused " + refused[0][0]
    if our_error is not None:
        raise AssertionError(f"{what}: ours refuses a supported config: {our_error}") from our_error
    return None


def check(actual, truth, eager, what):
    """The project's rule; where diffusers' float32 run is not finite but its float64 run is (its float32
    arithmetic broke down), only the floor bounds ours there."""
    eager = torch.where(torch.isfinite(eager) | ~torch.isfinite(truth), eager, truth.to(eager.dtype))
    assert_matches_reference(actual, truth, eager, what)


def round_trip(what, ours_cls, cls, ours, path, loading=contextlib.nullcontext()):
    """``ours`` saved to ``path`` loads (ours, within ``loading``) with the same public config, and ours made from
    diffusers' ``cls`` loading it has it too."""
    ours.save_pretrained(path)
    with loading:
        loaded, theirs = ours_cls.from_pretrained(path), cls.from_pretrained(path)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(ours.config), f"{what}: save/load round trip"
    assert public(ours_cls.from_config(theirs.config).config) == public(ours.config), f"{what}: via diffusers"
