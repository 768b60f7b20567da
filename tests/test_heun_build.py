"""coef_tables.heun built column by column (diffkern.coef_columns) against the row-by-row construction written here
(each row a coefs.row of the textbook EDM Algorithm 2 coefficients): bitwise the same table and plan facts; the
column builder's bad-input errors; and the Level-1 HeunDiscreteScheduler's reuse of its tables when a loop repeats
the last one's schedule and conversion (bitwise the outputs of a fresh scheduler, and a rebuild on any change)."""
import math

import pytest
import torch

from diffkern import coef_columns, coef_tables, wrappers
from diffkern.ops import coefs

diffusers = pytest.importorskip("diffusers")
import diffkern.diffusers as dd  # noqa: E402

F64 = torch.float64
NO_MODEL = {"p": 0.0, "q": 0.0}


def row_by_row_heun(sigmas, conv, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """Rows of Karras et al.'s Algorithm 2 one at a time: predictor i ``x' = r x_hat + (1 - r) D`` (r = sigma_next /
    sigma_hat, 1 - r = -expm1(ln r)) storing the slope (x_hat - D)/sigma_hat; corrector i (sigma_next > 0)
    ``(1 + k) x~ - k D~ - dt/2 d``, k = dt/(2 sigma_next), dt = sigma_next - sigma_hat, else a row that reads nothing;
    churn rows ``x + s_noise sqrt(sigma_hat^2 - sigma^2) xi`` when a step churns."""
    n = len(sigmas) - 1
    gamma = min(s_churn / n, math.sqrt(2.0) - 1.0)
    hat = [s * (1.0 + gamma) if gamma > 0 and s_tmin <= s <= s_tmax else s for s in sigmas[:-1]]
    pred, corr = [], []
    for sh, sn in zip(hat, sigmas[1:]):
        r, m = (0.0, 1.0) if sn == 0 else (sn / sh, -math.expm1(math.log(sn / sh)))
        pred.append(coefs.row(a=r, b=m, e=1.0 / sh, f=-1.0 / sh, **conv(sh)))
        dt = sn - sh
        k = dt / (2.0 * sn) if sn > 0 else 0.0
        corr.append(coefs.row(a=1.0 + k, b=-k, c=-dt / 2.0, **conv(sn)) if sn > 0 else coefs.row(**NO_MODEL))
    stds = [s_noise * math.sqrt(max(sh * sh - s * s, 0.0)) for s, sh in zip(sigmas[:-1], hat)]
    churn = [sh > s and std > 0 for s, sh, std in zip(sigmas[:-1], hat, stds)]
    noise = [coefs.row(a=1.0, s=std, **NO_MODEL) for std in stds] if any(churn) else []
    seconds = [sn if sn > 0 else math.nan for sn in sigmas[1:]]
    return coefs.table(pred + corr + noise), hat + seconds + [math.nan] * len(noise), hat, churn


def eps_conv(sigma):
    p, q = wrappers.conversion("epsilon", sigma)
    return {"p": p, "q": q}


def v_clip_conv(sigma):
    p, q = wrappers.conversion("v_prediction", sigma)
    return {"p": p, "q": q, "clip": 2.0, "w": 7.5}


SCHEDULES = [[10.0, 5.0, 2.0, 0.5, 0.0], [14.6, 7.0, 3.0, 1.0, 0.3, 0.03], [3.0, 0.0], [80.0, 1e-3],
             [0.7, 0.5, 0.5, 0.2, 0.0]]  # a repeated sigma: conv called once for it, both rows get it
CHURN = [{}, {"s_churn": 1.0}, {"s_churn": 40.0, "s_tmin": 0.4, "s_tmax": 8.0, "s_noise": 1.003}]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int64), b.view(torch.int64))


@pytest.mark.parametrize("conv", [coef_tables._identity, eps_conv, v_clip_conv], ids=["D", "eps", "v-clip-cfg"])
@pytest.mark.parametrize("churn", CHURN, ids=["none", "all", "window"])
def test_heun_is_the_row_by_row_table_bitwise(conv, churn):
    for sigmas in SCHEDULES:
        plan = coef_tables.heun(sigmas, conv=conv, **churn)
        table, row_sigma, hat, on = row_by_row_heun(sigmas, conv, **churn)
        n = len(sigmas) - 1
        assert same_bits(plan.table, table), (sigmas, churn)
        assert len(plan.row_sigma) == len(row_sigma) and all(
            a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(plan.row_sigma, row_sigma))
        assert plan.sigma_hat == hat and plan.churn == on and plan.corrector == [s > 0 for s in sigmas[1:]]
        assert (plan.churn_row, plan.corrector_row, plan.history) == (2 * n, n, 1)


def test_heun_calls_conv_once_per_sigma():
    calls = []

    def conv(sigma):
        calls.append(sigma)
        return eps_conv(sigma)
    coef_tables.heun([10.0, 5.0, 2.0, 0.5, 0.0], conv=conv)
    assert sorted(calls) == [0.5, 2.0, 5.0, 10.0]


def test_columns_table_matches_rows_and_names_bad_input():
    cols = {"a": [1.0, 2], "s": [0.5, 0.25]}  # an int is read as float(), as coefs.row does
    convs = [{"p": 1.0, "q": -3.0}, {}]
    want = coefs.table([coefs.row(a=1.0, s=0.5, p=1.0, q=-3.0), coefs.row(a=2.0, s=0.25)])
    assert same_bits(coef_columns.table(2, cols, convs), want)
    extra = coefs.row(a=1.0, s=0.1, **NO_MODEL)
    assert same_bits(coef_columns.table(2, cols, convs, [extra]), coefs.table(list(want.tolist()) + [extra]))
    assert coef_columns.table(0, {}).shape == (0, coefs.NCOEF)
    with pytest.raises(ValueError, match=r"^columns: unknown coefficient\(s\) \['z'\]"):
        coef_columns.table(1, {"z": [1.0]})
    with pytest.raises(ValueError, match=r"^columns: unknown coefficient\(s\) \['zz'\]"):
        coef_columns.table(1, {}, [{"zz": 1.0}])
    with pytest.raises(ValueError, match=r"^columns\['a'\]: expected 2 values, got 1"):
        coef_columns.table(2, {"a": [1.0]})
    with pytest.raises(ValueError, match=r"^convs: expected 2 conversions \(one per row\), got 1"):
        coef_columns.table(2, {}, [{}])
    with pytest.raises(TypeError, match=r"^convs: slot 'p' is also given as a column"):
        coef_columns.table(1, {"p": [1.0]}, [{"p": 2.0}])
    with pytest.raises(TypeError, match=r"^columns\['a'\]: expected real numbers"):
        coef_columns.table(1, {"a": ["x"]})
    with pytest.raises(ValueError, match=r"non-finite coefficient in slot b"):
        coef_columns.table(1, {"b": [math.nan]})

#----------------------------------------------------------------------------
# HeunDiscreteScheduler: tables reused across loops on the same schedule.


def run_loop(sched, n, seed=0, timesteps=None):
    if timesteps is None:
        sched.set_timesteps(n)
    else:
        sched.set_timesteps(timesteps=timesteps)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 5, 7, generator=gen) * sched.init_noise_sigma
    outs = []
    for t in sched.timesteps:
        xi = sched.scale_model_input(x, t)
        eps = torch.randn(2, 3, 5, 7, generator=gen) * 0.5 + 0.1 * xi
        out = sched.step(eps, t, x)
        x = out.prev_sample
        outs += [out.prev_sample, out.pred_original_sample]
    return outs


def equal_runs(a, b) -> bool:
    return len(a) == len(b) and all(same_bits(x.double(), y.double()) for x, y in zip(a, b))


@pytest.mark.parametrize("config", [{}, {"prediction_type": "v_prediction", "use_karras_sigmas": True,
                                         "clip_sample": True}, {"prediction_type": "sample"}])
def test_scheduler_reuses_its_tables_only_on_the_same_schedule(config):
    sched = dd.HeunDiscreteScheduler(**config)
    first = run_loop(sched, 7)
    table = sched._plan(("heun",))[0]
    again = run_loop(sched, 7)
    assert equal_runs(first, again) and sched._plan(("heun",))[0] is table, "same schedule: the same tables"
    other = run_loop(sched, 4, seed=1)
    assert sched._plan(("heun",))[0] is not table
    assert equal_runs(other, run_loop(dd.HeunDiscreteScheduler(**config), 4, seed=1)), "a fresh scheduler's run"
    back = run_loop(sched, 7)
    assert equal_runs(back, first)
    if "use_karras_sigmas" not in config:
        custom = run_loop(sched, None, seed=2, timesteps=[999, 700, 300, 20])
        assert equal_runs(custom, run_loop(dd.HeunDiscreteScheduler(**config), None, seed=2,
                                           timesteps=[999, 700, 300, 20]))


def test_scheduler_rebuilds_on_a_new_conversion():
    """The same sigmas under another prediction type or clip range (a config registered anew) build anew."""
    sched = dd.HeunDiscreteScheduler(clip_sample=True, clip_sample_range=1.0)
    run_loop(sched, 5)
    table = sched._plan(("heun",))[0]
    sched.register_to_config(clip_sample_range=0.5)
    run_loop(sched, 5)
    assert sched._plan(("heun",))[0] is not table
    assert float(sched._plan(("heun",))[0][0, coefs.CLIP]) == 0.5
    assert equal_runs(run_loop(sched, 5), run_loop(dd.HeunDiscreteScheduler(clip_sample=True,
                                                                             clip_sample_range=0.5), 5))
