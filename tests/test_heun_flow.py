"""``heun_flow``: Heun's method in flow time t = sigma/(1 + sigma) (diffusers' ``FlowMatchHeunDiscreteScheduler``
without churn), against the textbook flow-time Heun loop written below in float64 on the flow state
``x_t = x/(1 + sigma)`` with the velocity ``v = (x_t - D)/t`` of a Gaussian mixture's exact denoiser. diffkern must
match it to the float64 floor (also from t = 1, the finite stand-in FLOW_TOP), obey the project's tolerance rule in
float32 on every CPU backend and awkward shapes, and converge with order 2.
"""
import math

import pytest
import torch

from diffkern import analytic, coef_tables_flow, schedules
from diffkern.diffusers.loop_spec import FLOW_TOP
from diffkern.sampling import knobs, sample
from diffkern.testing import assert_matches_reference
from sampler_checks import AWKWARD, AWKWARD_IDS, check_awkward_shape, check_backend

F64 = torch.float64
REF = "reference"


def gmm(dim=2, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return analytic.GaussianMixture([1.0, 1.8, 0.6], torch.randn(3, dim, generator=gen, dtype=F64), [0.5, 0.9, 0.3])


def noise(shape=(6, 2), seed=1):
    return torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


def textbook_flow_heun(model, x_t, ts):
    """Heun in flow time on the flow state: ``x_t' = x_t + (t' - t)*(v1 + v2)/2``, Euler on a step to t' = 0; the
    model is the VE denoiser, called at ``x = x_t/(1 - t)``, ``sigma = t/(1 - t)`` (t < 1)."""
    def velocity(y, t):
        s = t / (1.0 - t)
        return (y - model(y / (1.0 - t), torch.full((y.shape[0],), s, dtype=F64))) / t
    for t, tn in zip(ts[:-1], ts[1:]):
        v1 = velocity(x_t, t)
        euler = x_t + (tn - t) * v1
        x_t = euler if tn == 0 else x_t + (tn - t) * (v1 + velocity(euler, tn)) / 2
    return x_t


def flow_sigmas(ts):
    return [FLOW_TOP if t == 1.0 else t / (1.0 - t) for t in ts]


def run(model, x_t, ts, backend=REF, dtype=F64):
    """heun_flow from the flow state ``x_t`` at ``ts[0]``; the flow state at ``ts[-1]``."""
    sig = flow_sigmas(ts)
    out = sample(model, (x_t * (1.0 + sig[0])).to(dtype), sig, "heun_flow", backend=backend)
    return out / (1.0 + sig[-1])


@pytest.mark.parametrize("n", [1, 2, 3, 7, 28])
def test_matches_the_textbook_loop_in_float64(n):
    model = gmm()
    ts = [0.97 * (1 - i / n) ** 1.5 for i in range(n + 1)]  # uneven steps, ending at t = 0
    x_t = noise() * ts[0]
    assert_matches_reference(run(model, x_t, ts), textbook_flow_heun(model.denoise, x_t, ts),
                             textbook_flow_heun(model.denoise, x_t, ts), f"heun_flow n={n}")


def test_matches_the_textbook_loop_ending_above_zero():
    model, ts = gmm(), [0.9, 0.6, 0.35, 0.2, 0.05]
    x_t = noise(seed=4) * 0.9
    ref = textbook_flow_heun(model.denoise, x_t, ts)
    assert_matches_reference(run(model, x_t, ts), ref, ref, "heun_flow to t = 0.05")


class FlowGaussian:
    """The exact denoiser of data N(mu, diag(var)) written on the flow state: E[x0 | x_t] at flow time t is
    ``mu + (1 - t)*var/((1 - t)^2*var + t^2)*(x_t - (1 - t)*mu)``, finite at t = 1 (the mean). As a VE model it is
    called at ``x_t = x/(1 + sigma)``, ``t = sigma/(1 + sigma)``: at FLOW_TOP both are exact in float64 (x_t bitwise,
    t = 1), where a VE-coordinate mixture would lose its component weights to the 2^140 scale of x^2."""

    def __init__(self, dim=2):
        gen = torch.Generator().manual_seed(8)
        self.mu = torch.randn(dim, generator=gen, dtype=F64)
        self.var = torch.rand(dim, generator=gen, dtype=F64) + 0.3

    def flow(self, x_t, t):
        return self.mu + (1 - t) * self.var / ((1 - t) ** 2 * self.var + t * t) * (x_t - (1 - t) * self.mu)

    def __call__(self, x, sigma):
        s = sigma.to(F64).view(-1, *([1] * (x.dim() - 1)))
        return self.flow(x / (1 + s), s / (1 + s))


def test_from_t_equal_one_is_the_flow_heun_step():
    """From t = 1 (FLOW_TOP) the predictor's stored velocity is x_t - D exactly: the loop is the textbook one whose
    first velocity is v = x_t - mean."""
    model = FlowGaussian()

    def velocity(y, t):
        return (y - model.flow(y, t)) / t

    for n in (1, 2, 5):
        ts = [1.0 - i / n for i in range(n + 1)]
        x_t = noise(seed=n)
        ref = x_t
        for t, tn in zip(ts[:-1], ts[1:]):
            v1 = velocity(ref, t)
            euler = ref + (tn - t) * v1
            ref = euler if tn == 0 else ref + (tn - t) * (v1 + velocity(euler, tn)) / 2
        assert_matches_reference(run(model, x_t, ts), ref, ref, f"heun_flow from t = 1, n={n}")


def test_differs_from_ve_heun():
    """Heun is not invariant under t -> sigma = t/(1 - t): the VE ``heun`` sampler is another method."""
    model, ts = gmm(), [0.9, 0.5, 0.1, 0.0]
    sig = flow_sigmas(ts)
    x = noise() * 0.9 * (1 + sig[0])
    a, b = (sample(model, x, sig, m, backend=REF) for m in ("heun_flow", "heun"))
    assert float((a - b).abs().max()) > 1e-3


def test_table_rows_are_the_derivation():
    """Predictor e = 1/sigma, f = -(1 + sigma)/sigma; corrector K = (1 + sigma')*(t' - t)/2, a = 1 + K/sigma',
    b = -K*(1 + sigma')/sigma', c = -K; no corrector on the step to 0; FLOW_TOP gives e = 2^-70, f = -1, K = -1/2."""
    from diffkern.ops import coefs
    sig = [FLOW_TOP, 3.0, 0.5, 0.0]
    plan = coef_tables_flow.heun_flow(sig)
    t = [s / (1 + s) for s in sig]
    assert plan.corrector == [True, True, False] and plan.history == 1
    for i, (s, sn) in enumerate(zip(sig[:-1], sig[1:])):
        row = plan.table[i]
        assert math.isclose(row[coefs.E], 1 / s, rel_tol=1e-15) and math.isclose(row[coefs.F], -(1 + s) / s,
                                                                                  rel_tol=1e-15)
        if sn > 0:
            k = (1 + sn) * (t[i + 1] - t[i]) / 2
            corr = plan.table[3 + i]
            for slot, want in ((coefs.A, 1 + k / sn), (coefs.B, -k * (1 + sn) / sn), (coefs.C, -k)):
                assert math.isclose(corr[slot], want, rel_tol=1e-12), (i, slot)
    assert plan.table[0, coefs.E] == 2.0 ** -70 and plan.table[0, coefs.F] == -1.0
    assert plan.table[3, coefs.C] == 0.5


def test_convergence_order():
    """Second order in flow time (measured slopes 2.00, 2.00 at 16 -> 32 -> 64 steps against 1024, t from 0.95 to
    0.05 on equal flow-time steps)."""
    model, x_t = gmm(4, seed=11), noise((16, 4), seed=3) * 0.95

    def final(n):
        return run(model, x_t, [0.95 - 0.9 * i / n for i in range(n + 1)])

    fine = final(1024)
    errs = [float((final(m) - fine).abs().max()) for m in (16, 32, 64)]
    slopes = [math.log(a / b, 2) for a, b in zip(errs, errs[1:])]
    assert all(1.8 < s < 2.3 for s in slopes), (errs, slopes)


def test_every_backend_matches_reference(cpu_backend):
    check_backend(gmm(), noise((5, 2)) * 10.0, schedules.karras(8, 0.05, 10.0), "heun_flow", cpu_backend)


@pytest.mark.parametrize("shape, contiguous", AWKWARD, ids=AWKWARD_IDS)
def test_awkward_shapes(cpu_backend, shape, contiguous):
    check_awkward_shape(lambda dim: gmm(dim, seed=9), shape, contiguous, schedules.karras(5, 0.05, 10.0),
                        "heun_flow", cpu_backend)


def test_no_knobs_and_bad_input():
    assert knobs("heun_flow") == {}
    with pytest.raises(TypeError, match="s_churn"):
        sample(gmm(), noise(), schedules.karras(4, 0.05, 10.0), "heun_flow", backend=REF, s_churn=1.0)
    for bad in ([1.0], [1.0, 2.0], [1.0, 0.0, 0.0], [math.nan, 0.0]):  # a repeat above 0: test_kdiff_comfy_parity
        with pytest.raises(ValueError, match="sigmas"):
            coef_tables_flow.heun_flow(bad)
