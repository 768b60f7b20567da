"""Level-1 drop-ins against diffusers' class of the same name: every public instance attribute, side by side.

For each class with a stock counterpart, built from the same config: the names in stock's ``__dict__`` that do not
start with '_' plus the documented properties, after construction, after ``set_timesteps(N)`` and after one and two
``step()`` calls on the same inputs (scale_model_input first, as a pipeline). Names present, same type; tensors of the
same dtype, device and shape, values within the float32 rule against diffusers run in float64
(``assert_matches_reference``: ours at most twice as far from the truth as diffusers' float32 run). The differences we
keep on purpose are listed below with a reason each; everything else must match.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.testing import assert_matches_reference, make_tensor  # noqa: E402
from test_diffusers_schedulers import diffusers_class, diffusers_float64  # noqa: E402
from test_level1_parity17 import _module  # noqa: E402

SHAPE = (2, 3, 5, 4)
STEPS = 6
TWINS = sorted(n for n in dd.SCHEDULERS if diffusers_class(n) is not None)
PROPERTIES = ("init_noise_sigma", "step_index", "begin_index", "timesteps", "sigmas", "alphas_cumprod", "betas",
              "order")

# Solver history that diffusers keeps as Python lists of past outputs: the fused step keeps it in device buffers
# (combinations the rows read, not stock's list), and mirroring the lists would cost a copy per step. Pipelines that
# rewrite them (LEDITS++ and ChronoEdit edit DPM-Solver's model_outputs) need diffusers' own class.
_HISTORY = "fused history lives in device buffers; stock's lists would cost a copy per step"
ALLOWED = {
    **{("*", a): _HISTORY for a in ("model_outputs", "lower_order_nums", "timestep_list", "last_sample", "this_order",
                                    "ets", "cur_sample", "cur_model_output", "last_noise", "this_predictor_order",
                                    "this_corrector_order")},
    ("DPMSolverSinglestepScheduler", "sample"): _HISTORY + " (the sample of the step's first stage)",
    ("DPMSolverSDEScheduler", "noise_sampler"): "stock's BrownianTree sampler object (torchsde); ours draws the "
                                                "Brownian increments inside the fused step (generator or Philox)",
    ("DPMSolverSDEScheduler", "mid_point_sigma"): "a per-call value of stock's step(); ours is in its coefficient rows",
    ("DPMSolverSinglestepScheduler", "order_list@init"):
        "before set_timesteps: stock's __init__ builds the order list of T steps; ours is built by set_timesteps",
}
# Same value, another dtype or type, on purpose (compared as float64 values)
VALUE_ONLY = {
    "alphas_cumprod": "float64 training table, where diffusers keeps float32 (README, 'Outputs match diffusers')",
}


def _allowed(name, attr, stage):
    return ALLOWED.get((name, attr)) or ALLOWED.get(("*", attr)) or (
        stage == "init" and ALLOWED.get((name, attr + "@init")))


def _names(stock):
    return sorted({k for k in stock.__dict__ if not k.startswith("_")} | {p for p in PROPERTIES if hasattr(stock, p)})


def _same(what, got, ref, eager, value_only=False):
    if isinstance(eager, torch.Tensor) and not (value_only and not isinstance(got, torch.Tensor)):
        assert isinstance(got, torch.Tensor), (what, type(got))
        if value_only:
            got, eager = got.double(), eager.double()
        assert (got.dtype, got.shape, got.device) == (eager.dtype, eager.shape, eager.device), \
            (what, got.dtype, eager.dtype, got.shape, eager.shape, got.device, eager.device)
        if eager.dtype.is_floating_point:
            assert_matches_reference(got, ref.double(), eager, what)
        else:
            assert torch.equal(got, eager), what
    elif isinstance(eager, np.ndarray):  # PNDM's prk_timesteps / plms_timesteps (host integers)
        assert isinstance(got, np.ndarray) and got.dtype == eager.dtype and np.array_equal(got, eager), \
            (what, got, eager)
    elif value_only:
        assert abs(float(got) - float(ref)) <= 2 * abs(float(eager) - float(ref)) + 1e-7, (what, got, eager)
    elif isinstance(eager, (list, tuple)):
        assert type(got) is type(eager) and len(got) == len(eager), (what, got, eager)
        for k, (g, r, e) in enumerate(zip(got, ref, eager)):
            _same(f"{what}[{k}]", g, r, e)
    elif isinstance(eager, float):
        assert type(got) is float and abs(got - float(ref)) <= 2 * abs(eager - float(ref)) + 1e-6 * max(1, abs(eager)), \
            (what, got, eager)
    elif callable(eager) and not isinstance(eager, type):  # SA-Solver's tau_func: the same function of t
        for t in (0.0, 150.0, 199.0, 200.0, 500.0, 799.0, 800.0, 999.0):
            assert got(t) == eager(t), (what, t)
    else:
        assert type(got) is type(eager) and got == eager, (what, got, eager)


def _compare(name, stage, truth, eager, ours, seen):
    for attr in _names(eager):
        if _allowed(name, attr, stage):
            seen.update((attr, attr + "@init"))
            continue
        what = f"{name}.{attr} ({stage})"
        assert hasattr(ours, attr), f"{what}: missing"
        ref = getattr(truth, attr) if hasattr(truth, attr) else getattr(eager, attr)
        _same(what, getattr(ours, attr), ref, getattr(eager, attr), value_only=attr in VALUE_ONLY)


def _kwargs(scheduler, seed):
    import inspect
    params = inspect.signature(scheduler.step).parameters
    return {"generator": torch.Generator().manual_seed(seed)} if "generator" in params else {}


@pytest.mark.parametrize("name", TWINS)
def test_public_attributes_match_stock(name):
    mod = _module(name)
    with diffusers_float64(mod):
        truth = diffusers_class(name)()
    eager = diffusers_class(name)()
    ours = dd.SCHEDULERS[name].from_config(eager.config)
    seen = set()
    _compare(name, "init", truth, eager, ours, seen)
    with diffusers_float64(mod):
        truth.set_timesteps(STEPS)
    eager.set_timesteps(STEPS)
    ours.set_timesteps(STEPS)
    _compare(name, "set_timesteps", truth, eager, ours, seen)
    x = make_tensor(SHAPE, torch.float64, seed=5) * float(getattr(truth, "init_noise_sigma", 1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stock LMS/Euler: "scale_model_input not called" (we call it)
        for k in range(2):
            m = make_tensor(SHAPE, torch.float64, seed=20 + k)
            outs = []
            for sched, dtype, ctx in ((truth, torch.float64, True), (eager, torch.float32, False),
                                      (ours, torch.float32, False)):
                t = sched.timesteps[k]
                with diffusers_float64(mod) if ctx else warnings.catch_warnings():
                    if hasattr(sched, "scale_model_input"):
                        sched.scale_model_input(x.to(dtype), t)
                    outs.append(sched.step(m.to(dtype), t, x.to(dtype), **_kwargs(sched, 7 + k)))
            _compare(name, f"step {k + 1}", truth, eager, ours, seen)
            x = outs[0].prev_sample
    stale = {a for (n, a) in ALLOWED if n in ("*", name)} - seen - {a for (n, a) in ALLOWED if n == "*"}
    assert not stale, f"{name}: allow-list entries that no longer apply: {stale}"


@pytest.mark.parametrize("name", ["HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"])
def test_odd_begin_index_refused(name):
    """diffusers' two-call classes count model calls in step_index; at an odd begin index its predictor runs with the
    next step's sigma (Heun: dt = 0 at every step from there, so the loop returns its input unchanged; KDPM2-ancestral:
    NaN at the last step). Ours refuses the index, naming it, rather than match that."""
    ours = dd.SCHEDULERS[name]()
    ours.set_timesteps(STEPS)
    with pytest.raises(ValueError, match="begin_index: expected an even index"):
        ours.set_begin_index(3)
    if name == "HeunDiscreteScheduler":
        stock = diffusers_class(name)()
        stock.set_timesteps(STEPS)
        stock.set_begin_index(3)
        x = make_tensor(SHAPE, torch.float32, seed=1)
        y = x
        for k in range(3, len(stock.timesteps)):
            y = stock.step(make_tensor(SHAPE, torch.float32, seed=k), stock.timesteps[k], y).prev_sample
        assert torch.equal(y, x)  # what matching it would give: no denoising at all


def test_lms_derivatives_follow_order_changes():
    """``derivatives`` keeps diffusers' length when ``order`` changes during a loop (4 buffers hold D_{i-3}..D_i)."""
    name = "LMSDiscreteScheduler"
    mod = _module(name)
    with diffusers_float64(mod):
        truth = diffusers_class(name)()
        truth.set_timesteps(10)
    eager, ours = diffusers_class(name)(), dd.LMSDiscreteScheduler()
    eager.set_timesteps(10)
    ours.set_timesteps(10)
    x = make_tensor(SHAPE, torch.float64, seed=2) * float(truth.init_noise_sigma)
    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k, order in enumerate((4, 4, 4, 4, 4, 2, 3, 4, 1)):
            m = make_tensor(SHAPE, torch.float64, seed=40 + k)
            with diffusers_float64(mod):
                ref = truth.step(m, truth.timesteps[k], x, order=order)
            eager.step(m.float(), eager.timesteps[k], x.float(), order=order)
            ours.step(m.float(), ours.timesteps[k], x.float(), order=order)
            got = ours.derivatives
            assert len(got) == len(eager.derivatives) == len(truth.derivatives), (k, len(got))
            # the newest slope (x - D)/sigma, written by the fused row as x/sigma - D/sigma: a difference quotient,
            # each of its float32 roundings (D, both products, the sum) off by up to 2**-24 * max|x| / sigma
            sigma = float(truth.sigmas[k])
            err = (got[-1].double() - truth.derivatives[-1]).abs().max().item()
            assert err <= 4 * 2.0 ** -24 * x.abs().max().item() / sigma, (k, err)
            written.append(got[-1].clone())
            for j, d in enumerate(got):  # older ones: the values written at their own step, untouched since
                assert torch.equal(d, written[len(written) - len(got) + j]), (k, j)
            x = ref.prev_sample
