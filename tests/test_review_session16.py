"""Review of dpm_adaptive, ComfyUI's positional samplers and the table-build changes (session 16).

dpm_adaptive: k-diffusion's controller shrinks h without bound when the error cannot meet rtol/atol in the state's
precision (its loop then never ends, or ends after ~1/h attempts while x no longer moves); diffkern raises, naming
rtol/atol, once h falls below what x's dtype resolves. An ``accept_safety`` at or above 1 + pi/2 can accept no attempt
(the limited factor stays below it). Runs that meet their tolerance are unchanged: the float64 loop still matches the
textbook one (test_kdiff_adaptive's) to the float64 floor.

Tables: ``coefs.validate``'s numpy fast path accepts exactly what its rule (and the torch checks) accept, on views
too; Level-1 Euler with s_churn whose s_tmin/s_tmax window churns on some steps, or none (no churn rows), is
diffusers'.
"""
import math
import signal

import pytest
import torch

from diffkern import coef_tables
from diffkern.__main__ import main
from diffkern.coef_tables_dpm_adaptive import ACCEPT_MAX, check_knobs
from diffkern.ops import coefs
from diffkern.samplers_adaptive import sample_dpm_adaptive
from diffkern.testing import assert_matches_reference
from test_kdiff_adaptive import gmm, kdiff_adaptive, start

F64 = torch.float64
REF = "reference"


@pytest.fixture
def deadline():
    """Fail (instead of hanging the suite) if a call runs past 20 s: the bug under test is an endless loop."""
    def expired(*_):
        raise TimeoutError("dpm_adaptive did not return within 20 s")
    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("dtype, kw", [
    (F64, {"rtol": 1e-17, "atol": 0.0}),  # k-diffusion: h underflows t's ulp, zero-length attempts forever
    (F64, {"rtol": 1e-17, "atol": 0.0, "order": 2, "eta": 0.5}),
    (torch.float32, {"rtol": 1e-9, "atol": 0.0}),  # k-diffusion: ~1e9 attempts of steps x cannot resolve
    (torch.float16, {"rtol": 1e-5, "atol": 1e-5}),
], ids=["f64", "f64-o2-eta", "f32", "f16"])
def test_tolerance_beyond_the_dtype_raises(deadline, dtype, kw):
    seen = []
    with pytest.raises(RuntimeError, match=rf"^dpm_adaptive: the step length h = .* fell below what x's dtype "
                                           rf"{dtype} resolves .* raise rtol or atol$"):
        sample_dpm_adaptive(gmm(), start(dtype=dtype), 0.02, 12.0, None, seen.append, True, backend=REF, **kw)
    assert 0 < len(seen) < 200


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64])
def test_default_tolerances_still_run_in_every_dtype(deadline, dtype):
    out, info = sample_dpm_adaptive(gmm(), start(dtype=dtype), 0.02, 12.0, disable=True, backend=REF,
                                    return_info=True)
    assert out.dtype == dtype and bool(torch.isfinite(out).all()) and info["n_accept"] > 3


@pytest.mark.parametrize("kw", [{"rtol": 1e-4, "atol": 1e-4}, {"rtol": 2e-3, "atol": 0.0, "order": 2}])
def test_tight_but_reachable_tolerance_is_kdiffusions_loop(deadline, kw):
    want, want_info, _ = kdiff_adaptive(gmm(), start(), 0.02, 12.0, **kw)
    got, info = sample_dpm_adaptive(gmm(), start(), 0.02, 12.0, disable=True, backend=REF, return_info=True, **kw)
    assert info == want_info and info["n_accept"] > 15
    assert_matches_reference(got, want, want, f"{kw}")


def test_accept_safety_that_accepts_nothing_is_refused():
    knobs = (3, 0.05, 0.0078, 0.05, 0.0, 1.0, 0.0)
    assert ACCEPT_MAX == 1.0 + math.pi / 2.0
    # the limiter's supremum: factor = 1 + atan(f - 1) < 1 + pi/2; with the default knobs f <= (1/1e-8)**(1/3) (the
    # controller's eps bounds 1/error), so no factor reaches even 2.57
    assert 1.0 + math.atan(1e8 ** (1 / 3) - 1.0) < 2.57 < ACCEPT_MAX
    assert check_knobs(*knobs, 2.5)["accept_safety"] == 2.5
    for bad in (ACCEPT_MAX, 2.6, 100.0):
        with pytest.raises(ValueError, match=r"^accept_safety: expected a value below 2\.57"):
            check_knobs(*knobs, bad)
    with pytest.raises(ValueError, match=r"^accept_safety: expected a value below"):
        sample_dpm_adaptive(gmm(), start(), 0.02, 12.0, disable=True, accept_safety=3.0)


def test_cli_names_the_accept_safety_knob(capsys):
    rc = main(["sample", "--method", "dpm_adaptive", "--knob", "accept_safety=3", "--no-progress"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("diffkern sample: error: --knob accept_safety:"), err

#----------------------------------------------------------------------------
# coefs.validate: the numpy fast path against the rule, on awkward views.

_SPECIALS = [0.0, -0.0, 1.0, -1.0, math.inf, -math.inf, math.nan, 5e-324, -5e-324]


def _rule(t: torch.Tensor) -> bool:
    """Every slot but clip finite, clip > 0 (inf allowed; -0, NaN refused), the reserved slots 0."""
    v = t.detach().cpu().resolve_neg()
    body = torch.cat([v[:, :coefs.CLIP], v[:, coefs.CLIP + 1:]], 1)
    return bool(torch.isfinite(body).all() and (v[:, coefs.CLIP] > 0).all()
                and (v[:, len(coefs.SLOT_NAMES):] == 0).all())


def _accepted(t: torch.Tensor) -> bool:
    try:
        coefs.validate(t)
    except ValueError as e:
        assert str(e).startswith("coef["), e
        return False
    return True


def test_validate_fast_path_is_the_rule_on_views():
    gen = torch.Generator().manual_seed(0)
    cases = 0
    for slot in range(coefs.NCOEF):
        for value in _SPECIALS:
            t = coefs.table([coefs.row(a=1.0, b=0.5)] * 3)
            t[int(torch.randint(3, (1,), generator=gen))][slot] = value
            views = [t, torch.cat([t, t], 1)[:, coefs.NCOEF:], t.t().contiguous().t(), torch._neg_view(-t)]
            for v in views:
                assert _accepted(v) == _rule(v), (slot, value, v.stride(), v.is_neg())
                cases += 1
    assert cases == coefs.NCOEF * len(_SPECIALS) * 4
    assert _accepted(coefs.table([coefs.row(clip=math.inf)])) and not _accepted(coefs.table([coefs.row(clip=1.0)]) * -1)

#----------------------------------------------------------------------------
# Churn rows built only when some step churns: Level-1 Euler with churn on some steps, or none.


def test_level1_euler_churn_windows_are_diffusers():
    """Churn on some steps (the s_tmin/s_tmax window), or on none although s_churn > 0 (no churn rows)."""
    from test_diffusers_schedulers import check_parity
    sig = [14.0, 7.0, 3.0, 1.5, 0.7, 0.0]
    for step_kw in ({"s_churn": 3.0, "s_tmin": 1.0, "s_tmax": 5.0}, {"s_churn": 3.0, "s_tmin": 100.0, "s_tmax": 200.0}):
        check_parity("EulerDiscreteScheduler", {}, step_kw, backend="cpp", steps=6)
        plan = coef_tables.euler(sig, **step_kw)
        on = [step_kw["s_tmin"] <= s <= step_kw["s_tmax"] for s in sig[:-1]]
        assert plan.churn == on and plan.table.shape[0] == (2 if any(on) else 1) * 5
