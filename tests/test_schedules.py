"""Schedules against diffusers' schedulers, smalldiffusion and closed forms."""
import bisect
import importlib.util
import math
import sys
import types

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from diffkern import schedules as S

F64 = torch.float64
# diffusers' EulerDiscreteScheduler calls np.array on a tensor in a way numpy 2 deprecates
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _smalldiffusion():
    """smalldiffusion's ``diffusion.py`` alone: its package imports torchvision and the module imports accelerate,
    neither of which the schedules need (a stub stands in for accelerate while the module loads)."""
    spec = importlib.util.find_spec("smalldiffusion")
    if spec is None:
        pytest.skip("smalldiffusion is not installed")
    path = spec.submodule_search_locations[0] + "/diffusion.py"
    saved = sys.modules.get("accelerate")
    sys.modules["accelerate"] = types.SimpleNamespace(Accelerator=object)
    try:
        mod_spec = importlib.util.spec_from_file_location("_smalldiffusion_diffusion", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    finally:
        if saved is None:
            del sys.modules["accelerate"]
        else:
            sys.modules["accelerate"] = saved
    return module


def _is_schedule(s: torch.Tensor, n: int, last_zero: bool = True):
    assert s.dtype == F64 and s.device.type == "cpu" and s.shape == (n + 1,)
    assert (s[1:] < s[:-1]).all()
    assert (s[-1] == 0) == last_zero

#----------------------------------------------------------------------------
# VE schedules.


@pytest.mark.parametrize("n", [1, 2, 7, 40])
def test_karras_closed_form_and_shape(n):
    s = S.karras(n, 0.002, 80.0, rho=7.0)
    _is_schedule(s, n)
    i = torch.arange(n, dtype=F64)
    ramp = i / max(n - 1, 1)
    want = (80.0 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    torch.testing.assert_close(s[:-1], want, rtol=1e-14, atol=0)
    torch.testing.assert_close(s[0], torch.tensor(80.0, dtype=F64))
    if n > 1:
        torch.testing.assert_close(s[-2], torch.tensor(0.002, dtype=F64))
    assert torch.equal(S.edm(n), s)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_karras_matches_diffusers_euler(spacing):
    sch = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                 use_karras_sigmas=True, timestep_spacing=spacing)
    sch.set_timesteps(12)
    table = S.alpha_bar_to_sigma(sch.alphas_cumprod.double())
    # diffusers takes sigma_min/max from the training sigmas at the spacing's first and last timesteps
    first, last = (999, 0) if spacing == "linspace" else S.timesteps(12, 1000, spacing)[[0, -1]].tolist()
    lo, hi = float(table[last]), float(table[first])
    torch.testing.assert_close(S.karras(12, lo, hi).float(), sch.sigmas)


def test_loglinear_is_geometric():
    s = S.loglinear(9, 0.02, 10.0)
    _is_schedule(s, 9)
    ratio = s[1:-1] / s[:-2]
    torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio), rtol=1e-13, atol=0)
    torch.testing.assert_close(s[[0, -2]], torch.tensor([10.0, 0.02], dtype=F64), rtol=1e-14, atol=0)
    sch = EulerDiscreteScheduler(use_exponential_sigmas=True, sigma_min=0.02, sigma_max=10.0)
    sch.set_timesteps(9)
    torch.testing.assert_close(s.float(), sch.sigmas)


@pytest.mark.parametrize("steps", [1, 5, 10, 33])
def test_sample_sigmas_matches_smalldiffusion(steps):
    sd = _smalldiffusion()
    for sched in (sd.ScheduleLogLinear(200, sigma_min=0.01, sigma_max=20), sd.ScheduleDDPM(1000)):
        want = sched.sample_sigmas(steps)
        got = S.sample_sigmas(sched.sigmas, steps)
        assert got.shape == (steps + 1,) and got.dtype == F64
        torch.testing.assert_close(got, want.double(), rtol=0, atol=0)

#----------------------------------------------------------------------------
# VP tables.


@pytest.mark.parametrize("schedule", S.BETA_SCHEDULES)
def test_betas_match_diffusers(schedule):
    sch = DDIMScheduler(beta_schedule=schedule, beta_start=0.00085, beta_end=0.012)
    b = S.betas(1000, 0.00085, 0.012, schedule)
    assert b.dtype == F64 and b.shape == (1000,)
    torch.testing.assert_close(b.float(), sch.betas)  # diffusers builds its betas in float32
    # cumprod in float64 of diffusers' own betas: our product is exact up to the betas' float32 rounding
    want = torch.cumprod(1 - sch.betas.double(), 0)
    torch.testing.assert_close(S.alphas_cumprod(sch.betas), want, rtol=1e-15, atol=0)


def test_cosine_alphas_cumprod_closed_form():
    ab = S.alphas_cumprod(S.betas(1000, schedule="squaredcos_cap_v2"))
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    want = torch.tensor([f((t + 1) / 1000) / f(0) for t in range(1000)], dtype=F64)
    # the 0.999 cap only binds on the very last beta
    torch.testing.assert_close(ab[:-1], want[:-1], rtol=1e-11, atol=1e-16)


@pytest.mark.parametrize("spacing", S.SPACINGS)
@pytest.mark.parametrize("T", [1000, 999, 37])
def test_timesteps_match_ddim(spacing, T):
    # n = 27, T = 1000: a 499.5 tie that torch.linspace computes as 499.50000000000006 (regression)
    for n in sorted({1, 2, 3, 7, 10, 13, 27, 48, 50, T // 3, T // 2, T - 1, T} & set(range(1, T + 1))):
        for offset in ((0, 1) if spacing == "leading" else (0,)):
            sch = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
            sch.set_timesteps(n)
            if offset and int(sch.timesteps[0]) >= T:
                with pytest.raises(ValueError, match="steps_offset"):
                    S.timesteps(n, T, spacing, offset)
                continue
            got = S.timesteps(n, T, spacing, offset)
            assert got.dtype == torch.int64 and got.shape == (n,)
            # diffusers' float arange can give n+1 "trailing" timesteps; the first n agree
            assert torch.equal(got, sch.timesteps[:n]), (spacing, T, n, offset)


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_vp_sigmas_match_ddim_alphas(set_alpha_to_one):
    sch = DDIMScheduler(set_alpha_to_one=set_alpha_to_one, steps_offset=1)
    sch.set_timesteps(20)
    ts = S.timesteps(20, 1000, "leading", 1)
    s = S.vp_sigmas(sch.alphas_cumprod, ts, final="zero" if set_alpha_to_one else "sigma_min")
    _is_schedule(s, 20, last_zero=set_alpha_to_one)
    # DDIM's (t, t_prev) pairs in VE coordinates: sigma(t) then sigma(t - T//N) or the final alpha
    ab = sch.alphas_cumprod.double()
    want = [math.sqrt((1 - ab[t]) / ab[t]) for t in sch.timesteps.tolist()]
    fin = float(sch.final_alpha_cumprod)
    want.append(math.sqrt((1 - fin) / fin))
    torch.testing.assert_close(s, torch.tensor(want, dtype=F64), rtol=1e-14, atol=0)


@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_vp_sigmas_match_euler(final, spacing):
    sch = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                 timestep_spacing=spacing, final_sigmas_type=final)
    sch.set_timesteps(25)
    s = S.vp_sigmas(sch.alphas_cumprod, S.timesteps(25, 1000, spacing), final=final)
    torch.testing.assert_close(s.float(), sch.sigmas)


def _ge_reference(n, table, start, end):
    """GEScheduler 'Linear' as specified in math-samplers.md 2.5 (factor = 0), written with bisect."""
    T = len(table)
    linear_end = table[min(T // n, T - 1)]
    geo = [math.exp(math.log(start) + k * (math.log(linear_end) - math.log(start)) / (n - 1)) for k in range(1, n - 1)]
    geo = [start] + geo + [linear_end] if n > 1 else [start]
    ts = [min(bisect.bisect_left(table, g), T - 1) for g in geo] + [0]
    return [table[t] for t in ts], ts


@pytest.mark.parametrize("n", [1, 5, 10, 50])
def test_ge_schedule(n):
    ab = S.alphas_cumprod(S.betas(1000))
    table = S.alpha_bar_to_sigma(ab).tolist()
    sig, ts = S.ge_schedule(n, ab, start=40.0, end=0.02, return_timesteps=True)
    want_sig, want_ts = _ge_reference(n, table, 40.0, 0.02)
    assert ts.tolist() == want_ts
    torch.testing.assert_close(sig, torch.tensor(want_sig, dtype=F64), rtol=0, atol=0)
    assert sig.shape == (n + 1,) and ts[-1] == 0
    torch.testing.assert_close(sig[-1], torch.tensor(0.0100, dtype=F64), rtol=0, atol=5e-5)  # sigma(0), linear betas
    if n == 10:  # math-samplers.md 2.5: the geometric part ends at sigma(T//N) = sigma(100) ~ 0.342
        torch.testing.assert_close(sig[-2], torch.tensor(0.342, dtype=F64), rtol=0, atol=1e-3)
    assert torch.equal(S.ge_schedule(n, ab, start=40.0, end=0.02), sig)


def test_ge_schedule_styles():
    ab = S.alphas_cumprod(S.betas(1000))
    table = S.alpha_bar_to_sigma(ab)
    _, ts = S.ge_schedule(10, ab, start=157.0, end=0.002, style="ddim", return_timesteps=True)
    t0, t1 = int(torch.searchsorted(table, torch.tensor(157.0, dtype=F64))), 0
    assert ts.tolist() == [int(t0 + k * (t1 - t0) / 10) for k in range(11)]
    sig, ts = S.ge_schedule(10, ab, start=80.0, end=0.002, style="edm", return_timesteps=True)
    assert ts.shape == (11,) and (sig >= S.karras(11, 0.002, 80.0)[:-1] - 1e-12).all()
    with pytest.raises(ValueError, match="unknown style"):
        S.ge_schedule(10, ab, style="foo")


def test_iadb_alphas_and_conversions():
    a = S.iadb_alphas(8)
    assert a.shape == (9,) and a.dtype == F64 and a[0] == 0 and a[-1] == 1
    torch.testing.assert_close(a[1:] - a[:-1], torch.full((8,), 0.125, dtype=F64))
    sigma = torch.tensor([0.0, 0.01, 0.5, 1.0, 14.6, 157.0], dtype=F64)
    ab = S.sigma_to_alpha_bar(sigma)
    alpha = S.sigma_to_iadb_alpha(sigma)
    t = S.sigma_to_flow_t(sigma)
    torch.testing.assert_close(S.alpha_bar_to_sigma(ab), sigma, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(S.iadb_alpha_to_sigma(alpha), sigma, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(S.flow_t_to_sigma(t), sigma, rtol=1e-12, atol=1e-15)
    # math-samplers.md section 0: ab = alpha^2/(alpha^2 + (1-alpha)^2) and t_FM = 1 - alpha
    torch.testing.assert_close(ab, alpha ** 2 / (alpha ** 2 + (1 - alpha) ** 2), rtol=1e-14, atol=0)
    torch.testing.assert_close(t, 1 - alpha, rtol=1e-14, atol=1e-16)
    assert isinstance(S.sigma_to_alpha_bar(1.0), float) and S.sigma_to_alpha_bar(1.0) == 0.5
    assert S.iadb_alpha_to_sigma(0.25) == 3.0 and S.flow_t_to_sigma(0.5) == 1.0
    with pytest.raises(TypeError, match="sigma_to_flow_t"):
        S.sigma_to_flow_t("1.0")

def test_python_lists_are_read_in_float64():
    # torch.as_tensor alone would round lists of Python floats through float32 (0.1 -> 0.10000000149)
    assert S.sample_sigmas([0.1, 0.3, 1.7, 10.0], 2).tolist() == [10.0, 0.3, 0.1]
    assert S.alphas_cumprod([0.1, 0.2]).tolist() == [0.9, 0.9 * 0.8]
    ab = [0.9, 0.5]
    assert S.vp_sigmas(ab, torch.tensor([1, 0])).tolist() == S.vp_sigmas(torch.tensor(ab, dtype=F64),
                                                                        torch.tensor([1, 0])).tolist()
    table = S.alphas_cumprod(S.betas(50))
    torch.testing.assert_close(S.ge_schedule(4, table.tolist()), S.ge_schedule(4, table), rtol=0, atol=0)
    for bad in ("abc", [0.1, "a"], None):  # not numbers: a TypeError naming the argument
        with pytest.raises(TypeError, match="^beta: expected a tensor or a sequence of numbers"):
            S.alphas_cumprod(bad)
    with pytest.raises(TypeError, match="^train_sigmas: expected a tensor or a sequence of numbers, got dict"):
        S.sample_sigmas({"a": 1}, 2)

#----------------------------------------------------------------------------
# Validation.


def test_check_sigmas_accepts_and_copies():
    s = S.karras(5, 0.1, 10.0).float()
    out = S.check_sigmas(s, steps=5)
    assert out.dtype == F64 and out.data_ptr() != s.data_ptr()
    assert S.check_sigmas([3.0, 2.0, 2.0, 0.0], strict=False).shape == (4,)


@pytest.mark.parametrize("bad, match", [
    ([1.0, 2.0, 0.0], r"strictly decreasing, but sigmas\[1\] = 2 >= sigmas\[0\] = 1"),
    ([2.0, 1.0, 1.0], "strictly decreasing"),
    ([2.0, float("nan"), 0.0], "NaN at index 1"),
    ([float("inf"), 1.0, 0.0], "inf at index 0"),
    ([1.0, 0.5, -0.1], "negative value at index 2"),
    ([[1.0, 0.0]], "1-D schedule"),
    ([1.0], "length >= 2"),
])
def test_check_sigmas_rejects(bad, match):
    with pytest.raises(ValueError, match=match):
        S.check_sigmas(torch.tensor(bad))


def test_check_sigmas_other_errors():
    with pytest.raises(ValueError, match="expected length steps\\+1 = 4, got 3"):
        S.check_sigmas([2.0, 1.0, 0.0], steps=3)
    with pytest.raises(ValueError, match=r"sigmas\[2\] = 2 > sigmas\[1\] = 1"):
        S.check_sigmas([3.0, 1.0, 2.0], strict=False)
    with pytest.raises(TypeError, match="sigmas"):
        S.check_sigmas("abc")
    with pytest.raises(TypeError, match="real tensor"):
        S.check_sigmas(torch.tensor([True, False]))


def test_polyexponential_and_vp_closed_forms():
    """k-diffusion's get_sigmas_polyexponential / get_sigmas_vp, written out here in float64."""
    for rho in (0.5, 1.0, 3.0):
        s = S.polyexponential(7, 0.03, 14.0, rho)
        _is_schedule(s, 7)
        ramp = torch.linspace(1, 0, 7, dtype=F64) ** rho
        want = torch.exp(ramp * (math.log(14.0) - math.log(0.03)) + math.log(0.03))
        torch.testing.assert_close(s[:-1], want, rtol=1e-15, atol=0)
    torch.testing.assert_close(S.polyexponential(9, 0.02, 10.0), S.loglinear(9, 0.02, 10.0), rtol=1e-14, atol=0)
    s = S.vp(6)
    _is_schedule(s, 6)
    t = torch.linspace(1, 1e-3, 6, dtype=F64)
    torch.testing.assert_close(s[:-1], torch.sqrt(torch.expm1(19.9 * t ** 2 / 2 + 0.1 * t)), rtol=1e-15, atol=0)
    # k-diffusion writes exp(.) - 1, which loses ~3e-13 relative at t = eps_s
    torch.testing.assert_close(s[:-1], torch.sqrt(torch.exp(19.9 * t ** 2 / 2 + 0.1 * t) - 1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("call, match", [
    (lambda: S.polyexponential(5, 0.1, 1.0, rho=0.0), "polyexponential: rho"),
    (lambda: S.vp(5, eps_s=1.0), "vp: eps_s"),
    (lambda: S.vp(5, beta_min=-0.1), "vp: beta_min"),
    (lambda: S.vp(0), "vp: n"),
    (lambda: S.karras(0, 0.1, 1.0), "karras: n"),
    (lambda: S.karras(5, 1.0, 0.1), "sigma_min .* must be <= sigma_max"),
    (lambda: S.loglinear(5, 0.0, 1.0), "loglinear: sigma_min"),
    (lambda: S.betas(10, schedule="quadratic"), "unknown schedule"),
    (lambda: S.timesteps(11, 10), "must be <= num_train_timesteps"),
    (lambda: S.timesteps(5, 10, "uniform"), "unknown spacing"),
    (lambda: S.vp_sigmas(torch.tensor([0.9, 0.5]), torch.tensor([2])), r"timesteps must lie in \[0, 2\)"),
    (lambda: S.vp_sigmas(torch.tensor([0.9, 0.5]), torch.tensor([1]), final="one"), "final must be"),
    (lambda: S.alphas_cumprod(torch.tensor([0.1, 1.0])), r"in \[0, 1\)"),
    (lambda: S.sample_sigmas(torch.ones(3), 4), "steps .* must be <="),
    (lambda: S.iadb_alphas(0), "iadb_alphas: n"),
])
def test_schedule_argument_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
