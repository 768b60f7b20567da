"""Repeated sigmas (zero-length steps): k-diffusion runs them; diffkern takes them with the samplers whose step is
defined at sigma_next = sigma (``sampler_compat.REPEATS_OK``), checked against k-diffusion's loops written out in
float64 (those of ``test_kdiffusion_parity`` for the ancestral/SDE ones, fed the same noise), and refuses them by
name elsewhere. diffkern's own schedule builders never return a repeated sigma: they raise instead.
"""
import math

import pytest
import torch

import diffkern
from diffkern import sampler_compat, samplers, schedules
from diffkern.testing import assert_matches_reference
from test_kdiff_comfy_parity import ZERO_STEP_TEXTBOOK
from test_kdiffusion_parity import GMM, ORACLES, Draws, model, start

F64 = torch.float64
REF = "reference"
REPEATS = torch.tensor([12.0, 6.0, 6.0, 2.0, 1.0, 1.0, 0.3, 0.3, 0.0], dtype=F64)


def kd_euler(x, sig, ns=None):
    for s, sn in zip(sig[:-1], sig[1:]):
        x = x + (x - model(x, s)) / s * (sn - s)
    return x


def kd_heun(x, sig, ns=None):
    for s, sn in zip(sig[:-1], sig[1:]):
        d, dt = (x - model(x, s)) / s, sn - s
        if sn == 0:
            x = x + d * dt
        else:
            x2 = x + d * dt
            x = x + (d + (x2 - model(x2, sn)) / sn) / 2 * dt
    return x


def kd_dpm_2(x, sig, ns=None):
    for s, sn in zip(sig[:-1], sig[1:]):
        d = (x - model(x, s)) / s
        if sn == 0:
            x = x + d * (sn - s)
        else:
            mid = math.exp(0.5 * (math.log(s) + math.log(sn)))
            x2 = x + d * (mid - s)
            x = x + (x2 - model(x2, mid)) / mid * (sn - s)
    return x


def ge(x, sig, ns=None, gamma=2.0):
    """smalldiffusion's ``samples(gam, mu=0)``, ending with the jump to D as diffkern's ge."""
    eps_prev = None
    for i, (s, sn) in enumerate(zip(sig[:-1], sig[1:])):
        den = model(x, s)
        eps = (x - den) / s
        if sn == 0:
            x = den
        else:
            g = 1.0 if i == 0 else gamma
            x = x + (sn - s) * (g * eps + (1 - g) * (eps_prev if eps_prev is not None else eps))
        eps_prev = eps
    return x


TEXTBOOK = {"euler": kd_euler, "sde": kd_euler, "heun": kd_heun, "dpm_2": kd_dpm_2, "ge": ge, **ZERO_STEP_TEXTBOOK,
            **{m: ORACLES[m] for m in ("euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "lcm")}}
KNOBS = {"sde": {"lam": 0.0}}  # lam = 0: the exponential integrator of the PF-ODE, which is Euler in VE coordinates


def test_repeats_ok_is_what_is_tested():
    assert set(TEXTBOOK) == sampler_compat.REPEATS_OK


@pytest.mark.parametrize("method", sorted(sampler_compat.REPEATS_OK))
def test_zero_length_steps_are_kdiffusion_loop(method):
    sig = REPEATS.tolist()
    outs = {}
    for dtype in (F64, torch.float32):
        kw = dict(KNOBS.get(method, {}))
        if method in sampler_compat.NOISE_SAMPLERS:
            kw["noise_sampler"] = Draws(start())
        outs[dtype] = (samplers.SAMPLERS[method](GMM, start(dtype), REPEATS, disable=True, backend=REF, **kw),
                       TEXTBOOK[method](start(dtype), sig, Draws(start())))
    (ours64, ref64), (ours32, ref32) = outs[F64], outs[torch.float32]
    assert torch.isfinite(ours64).all()
    assert_matches_reference(ours64, ref64, ref64, f"{method} float64")
    assert_matches_reference(ours32, ref64, ref32, f"{method} float32")


def test_zero_length_step_is_the_identity_for_the_ode_samplers():
    """A schedule [s, s] is one step of length 0: Euler, Heun and the others leave x as it is."""
    x = start()
    for method in ("euler", "heun", "dpm_2", "sde"):
        got = diffkern.sample(GMM, x, [3.0, 3.0], method, backend=REF, **KNOBS.get(method, {}))
        torch.testing.assert_close(got, x, rtol=0, atol=1e-15)


@pytest.mark.parametrize("method", sorted(set(samplers.SAMPLERS) - sampler_compat.REPEATS_OK))
def test_repeated_sigma_refused_by_name(method):
    with pytest.raises(ValueError, match=rf"^sigmas: must be strictly decreasing for sampler "
                                         rf"'{method.replace('_ancestral', '')}[a-z_]*', which cannot take a "
                                         r"zero-length step .*, but sigmas\[1\] = sigmas\[2\] = 6\.0 is repeated"):
        diffkern.sample(GMM, start(), REPEATS, method, backend=REF)


def test_direct_sampler_calls_refuse_too():
    with pytest.raises(ValueError, match=r"^sigmas: must be strictly decreasing for sampler 'dpmpp_2m', which cannot"):
        samplers.sample_dpmpp_2m(GMM, start(), REPEATS, disable=True)
    with pytest.raises(ValueError, match=r"^sigmas: sigmas\[2\] = sigmas\[3\] = 0 is a step from sigma = 0"):
        samplers.sample_euler(GMM, start(), [3.0, 1.0, 0.0, 0.0], disable=True)
    with pytest.raises(ValueError, match=r"^sigmas: must be non-increasing, but sigmas\[2\] = 2 > sigmas\[1\] = 1"):
        samplers.sample_euler(GMM, start(), [3.0, 1.0, 2.0, 0.0], disable=True)


def test_smalldiffusion_schedules_with_repeats_run_with_ge():
    """sample_sigmas and ge_schedule repeat their last values by design (as the originals); ge takes them."""
    table = schedules.alpha_bar_to_sigma(schedules.alphas_cumprod(schedules.betas(50)))  # increasing, as theirs
    sig = schedules.sample_sigmas(table, 45)
    assert (sig[1:] == sig[:-1]).any()
    out = diffkern.sample(GMM, start() * float(sig[0]) / 12.0, sig, "ge", backend=REF)
    assert torch.isfinite(out).all()

#----------------------------------------------------------------------------
# The schedule builders never return a repeated sigma.


def test_polyexponential_is_kdiffusions_and_ends_at_sigma_min():
    for rho in (0.5, 1.0, 3.0, 7.0):
        s = schedules.polyexponential(9, 0.002, 80.0, rho)
        ramp = torch.linspace(1, 0, 9, dtype=F64) ** rho
        want = torch.exp(ramp * (math.log(80.0) - math.log(0.002)) + math.log(0.002))
        torch.testing.assert_close(s[:-1], want, rtol=1e-15, atol=0)
        assert s[-2].item() == 0.002 and s[-1].item() == 0.0


@pytest.mark.parametrize("build,match", [
    (lambda: schedules.polyexponential(10, 0.1, 10.0, 100.0), r"^polyexponential: sigmas\[\d+\] and sigmas\[\d+\] "
                                                              r"are the same float64 value .*rho = 100 is too large"),
    (lambda: schedules.polyexponential(20, 0.002, 80.0, 50.0), r"^polyexponential: .*use a smaller rho"),
    (lambda: schedules.karras(3, 1.0, 1.0), r"^karras: sigmas\[0\] and sigmas\[1\] .*sigma_min == sigma_max"),
    (lambda: schedules.loglinear(3, 2.0, 2.0), r"^loglinear: .*sigma_min == sigma_max"),
    (lambda: schedules.polyexponential(2, 0.5, 0.5), r"^polyexponential: .*sigma_min == sigma_max"),
    (lambda: schedules.karras(400000, 1.0, 1.0 + 1e-12), r"^karras: .*n = 400000 is too large for the range"),
])
def test_builders_refuse_what_would_repeat(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_builders_return_only_schedules_every_sampler_takes():
    """Over a sweep of steps and shapes each builder either raises or returns a strictly decreasing schedule, which
    every sampler's host check accepts."""
    for n in (1, 2, 5, 20, 100, 400):
        assert schedules.karras(1, 1.0, 1.0).tolist() == [1.0, 0.0]  # one value: nothing to repeat
        for rho in (0.5, 1.0, 3.0, 7.0, 10.0, 20.0, 40.0):
            for build in (lambda: schedules.polyexponential(n, 0.002, 80.0, rho),
                          lambda: schedules.karras(n, 0.002, 80.0, rho)):
                try:
                    s = build()
                except ValueError as exc:
                    assert "same float64 value" in str(exc)
                    continue
                assert (s[1:] < s[:-1]).all()
                for method in samplers.SAMPLERS:
                    sampler_compat.check_repeats(s.tolist(), method)
        for s in (schedules.loglinear(n, 0.002, 80.0), schedules.vp(n)):
            assert (s[1:] < s[:-1]).all()
