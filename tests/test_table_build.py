"""Host table building at a diffusers scheduler's first step: ``coefs.table``/``coefs.row``/``coefs.validate`` keep
the values, layout and checks of the former ``torch.tensor``-on-nested-lists path bit for bit (oracle: that path,
written here), plans without churn carry no churn rows (those never ran), and DDPM's custom-timestep errors are
diffusers' types."""
import math

import diffusers
import numpy as np
import pytest
import torch

import diffkern.diffusers as dd
from diffkern import coef_tables, schedules
from diffkern.ops import coefs


def _old_row(**c):
    vals = dict(coefs._DEFAULTS, **c)
    return [float(vals[n]) for n in coefs.SLOT_NAMES] + [0.0] * (coefs.NCOEF - len(coefs.SLOT_NAMES))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int64)


def test_rows_and_table_are_the_former_values_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor(10.0, dtype=torch.float64) ** torch.randint(-300, 290, (64, 6), generator=g)
    vals = (torch.randn(64, 6, generator=g, dtype=torch.float64) * scale).tolist()
    specials = [-0.0, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, np.float32(0.1), True, 3,
                torch.tensor(0.25, dtype=torch.float64), np.float64(1 / 3)]
    rows, old = [], []
    for i, v in enumerate(vals):
        kw = dict(zip(("a", "b", "c", "e", "f", "q"), v), s=specials[i % len(specials)],
                  clip=math.inf if i % 2 else 7.5)
        rows.append(coefs.row(**kw))
        old.append(_old_row(**kw))
        assert rows[-1] == old[-1] and all(type(x) is float for x in rows[-1])
    t = coefs.table(rows)
    assert t.dtype == torch.float64 and t.shape == (64, coefs.NCOEF) and t.is_contiguous()
    assert torch.equal(_bits(t), _bits(torch.tensor(old, dtype=torch.float64)))
    # dict rows, tuple rows and tensor rows as before
    mixed = [dict(a=0.5, s=2.0), tuple(_old_row(b=0.25)), torch.tensor(_old_row(c=-1.5), dtype=torch.float64)]
    expected = torch.tensor([_old_row(a=0.5, s=2.0), _old_row(b=0.25), _old_row(c=-1.5)], dtype=torch.float64)
    assert torch.equal(_bits(coefs.table(mixed)), _bits(expected))
    assert coefs.table([]).shape == (0, coefs.NCOEF)


def test_table_is_writable_and_follows_the_device_argument():
    t = coefs.table([coefs.row(a=1.0)] * 3, device="cpu")
    t[1, coefs.A] = 2.0  # windowed plans write rows in place
    assert t[1, coefs.A] == 2.0 and t[0, coefs.A] == 1.0
    with torch.inference_mode():
        assert coefs.table([coefs.row()]).is_inference() == torch.tensor([[0.0]]).is_inference()


@pytest.mark.parametrize("rows,error,match", [
    ([[0.0] * 15], ValueError, r"^rows\[0\]: expected 16 coefficients \(a coefs.row\), got 15$"),
    ([coefs.row(), [0.0] * 17], ValueError, r"^rows\[1\]: expected 16 coefficients"),
    ([["1.5"] + [0.0] * 15], TypeError, r"^rows: expected real numbers"),
    ([[None] + [0.0] * 15], TypeError, r"^rows: expected real numbers"),
    ([[torch.ones(2)] + [0.0] * 15], TypeError, r"^rows: expected real numbers"),
    ([coefs.row(s=math.inf)], ValueError, r"^coef\[0\]: non-finite coefficient in slot s"),
    ([coefs.row(clip=-1.0)], ValueError, r"^coef\[0\]: clip slot must be > 0"),
    ([coefs.row(clip=math.nan)], ValueError, r"^coef\[0\]: clip slot must be > 0"),
    ([coefs.row()[:15] + [1.0]], ValueError, r"^coef\[0\]: reserved slot 15 must be 0"),
    ([coefs.row()[:13] + [math.nan, 0.0, 0.0]], ValueError, r"^coef\[0\]: non-finite coefficient in slot bu"),
    ([coefs.row()[:15] + [math.nan]], ValueError, r"^coef\[0\]: non-finite coefficient in slot 15"),
])
def test_bad_rows_are_named(rows, error, match):
    with pytest.raises(error, match=match):
        coefs.table(rows)


def test_validate_checks_views_and_negated_views():
    t = coefs.table([coefs.row(a=1.0), coefs.row(a=2.0, clip=3.0)])
    coefs.validate(t[1:])
    with pytest.raises(ValueError, match=r"^coef\[0\]: clip slot must be > 0"):  # negative bit: clip -inf
        coefs.validate(torch._neg_view(t))
    bad = t.t().contiguous().t()  # column-major strides
    bad[0, coefs.B] = math.inf
    with pytest.raises(ValueError, match=r"^coef\[0\]: non-finite coefficient in slot b"):
        coefs.validate(bad)

#----------------------------------------------------------------------------
# Churn rows: built only where a step churns.


@pytest.mark.parametrize("build,blocks", [(coef_tables.euler, 1), (coef_tables.heun, 2), (coef_tables.dpm_2, 2)])
def test_no_churn_no_churn_rows(build, blocks):
    sig = schedules.karras(6, 0.1, 10.0).tolist()
    plain = build(sig)
    assert plain.table.shape == (blocks * 6, coefs.NCOEF) and len(plain.row_sigma) == blocks * 6
    assert plain.churn == [False] * 6 and plain.churn_row == blocks * 6
    # churn outside every sigma (s_tmax below them) or with no noise draws nothing either
    for kw in ({"s_churn": 2.0, "s_tmax": 0.01}, {"s_churn": 2.0, "s_noise": 0.0}):
        assert build(sig, **kw).table.shape[0] == blocks * 6
    # churn on some steps: the full block of churn rows, step i's at churn_row + i, drawing sqrt(hat^2 - sigma^2)
    churned = build(sig, s_churn=2.0, s_tmin=1.0)
    n = 6
    assert churned.table.shape == ((blocks + 1) * n, coefs.NCOEF) and len(churned.row_sigma) == (blocks + 1) * n
    gamma = min(2.0 / n, math.sqrt(2) - 1)
    for i, s in enumerate(sig[:-1]):
        on = 1.0 <= s
        row = churned.table[churned.churn_row + i]
        assert churned.churn[i] == on
        std = math.sqrt(max((s * (1 + gamma)) ** 2 - s * s, 0.0)) if on else 0.0
        assert float(row[coefs.S]) == pytest.approx(std, rel=1e-15, abs=0.0)
        assert float(row[coefs.A]) == 1.0 and float(row[coefs.P]) == 0.0 and float(row[coefs.Q]) == 0.0
    # steps that do not churn keep their rows (and the corrector rows their places) whether churn rows follow or not
    calm = [i for i, s in enumerate(sig[:-1]) if s < 1.0]
    for block in range(blocks):
        rows = [block * n + i for i in calm]
        assert torch.equal(_bits(churned.table[rows]), _bits(plain.table[rows]))


def test_level1_heun_first_step_table_is_the_former_layout_prefix():
    """Level-1 Heun's table: the former 3N-row table's first 2N rows, bit for bit (the churn rows never ran)."""
    sched = dd.HeunDiscreteScheduler()
    sched.set_timesteps(10)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = sched.timesteps[0]
    sched.step(x * 0.1, t, sched.scale_model_input(x, t))
    table, plan = sched._plan(("heun",))
    assert table.shape == (20, coefs.NCOEF) and plan.churn == [False] * 10
    # the former builder: the same float64 formulas through torch.tensor on nested lists
    sig, conv = sched.sigmas_host, sched._conv
    pred, corr = [], []
    for i in range(10):
        sh, sn = sig[i], sig[i + 1]
        r, omr = (0.0, 1.0) if sn == 0 else (sn / sh, -math.expm1(math.log(sn / sh)))
        pred.append(_old_row(a=r, b=omr, e=1.0 / sh, f=-1.0 / sh, **conv(sh)))
        dt = sn - sh
        k = dt / (2.0 * sn) if sn > 0 else 0.0
        corr.append(_old_row(a=1.0 + k, b=-k, c=-dt / 2.0, **conv(sn)) if sn > 0 else _old_row(p=0.0, q=0.0))
    old = torch.tensor(pred + corr, dtype=torch.float64)
    assert torch.equal(_bits(plan.table), _bits(old))

#----------------------------------------------------------------------------
# DDPM custom timesteps: one cast with Euler/Heun/DPM-Solver's, diffusers' error types.


@pytest.mark.parametrize("bad", [["a"], [["a"]], [None, None], ["900", "500"], [[900], 500]])
def test_ddpm_non_numeric_timesteps_raise_type_error_as_diffusers(bad):
    with pytest.raises(TypeError):
        diffusers.DDPMScheduler().set_timesteps(timesteps=bad)
    with pytest.raises(TypeError, match=r"^DDPMScheduler: timesteps: expected a 1-D sequence of numbers"):
        dd.DDPMScheduler().set_timesteps(timesteps=bad)


@pytest.mark.parametrize("values", [[900, 500, 3], [900.9, 500.5, 0.2], np.array([999, 1], dtype=np.uint16),
                                    torch.tensor([900.5, 100.25], dtype=torch.bfloat16),
                                    torch.tensor([700.7, 2.0], dtype=torch.float16), [torch.tensor(900), 5]])
def test_ddpm_numeric_timesteps_truncate_as_diffusers(values):
    ours = dd.DDPMScheduler()
    ours.set_timesteps(timesteps=values)
    expected = np.array([float(v) for v in values], dtype=np.float64).astype(np.int64)  # C truncation toward 0
    assert ours.timesteps.dtype == torch.int64 and ours.timesteps.tolist() == expected.tolist()
    if not (isinstance(values, torch.Tensor) and values.dtype == torch.bfloat16):  # numpy cannot read bfloat16
        stock = diffusers.DDPMScheduler()
        stock.set_timesteps(timesteps=values)
        assert torch.equal(ours.timesteps, stock.timesteps)


@pytest.mark.parametrize("bad,match", [([], "expected a 1-D sequence"), ([[900, 500]], "expected a 1-D sequence"),
                                       ([900, math.nan], "finite"), ([500, 900], "strictly decreasing"),
                                       ([1000, 5], r"in \[0, 1000\)"), ([900, -1], r"in \[0, 1000\)")])
def test_ddpm_bad_numeric_timesteps_raise_value_error_naming_them(bad, match):
    with pytest.raises(ValueError, match=f"^DDPMScheduler: timesteps.*{match}"):
        dd.DDPMScheduler().set_timesteps(timesteps=bad)
