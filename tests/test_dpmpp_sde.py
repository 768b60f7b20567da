"""dpmpp_sde (k-diffusion's ``sample_dpmpp_sde``) against its published loop, with a Brownian path built from
diffkern's Philox draws.

k-diffusion's loop is written below as published (VE, D = model(x, sigma)). Its noise sampler is a Brownian
motion W in sigma, returning (W(b) - W(a))/sqrt|b - a|. The test's W is built from independent increments: over
[sigma_s, sigma] the first call's Philox draw (row i), over [sigma_next, sigma_s] the second call's (row N + i),
over each later interval its own draws; the loop's two queries per step are then answered from the same path,
exactly as a Brownian tree answers them. diffkern must match that loop to the float64 floor, and obey the
project's tolerance rule in float32.
"""
import math

import pytest
import torch

from diffkern import coef_tables_dpmpp_sde, schedules
from diffkern.ops import philox
from diffkern.sampling import knobs, sample
from diffkern.testing import assert_matches_reference

from test_two_eval_samplers import DTYPES, REF, SEED, STEPS, ancestral_step, gmm2, start


class PhiloxBrownian:
    """W(sigma) along one call's steps: W(sigma_0) = 0, the increment over [sigma_s, sigma_i] is sqrt(.)*xi(row i),
    over [sigma_{i+1}, sigma_s] sqrt(.)*xi(row N + i). Answers k-diffusion's noise_sampler(a, b) queries."""

    def __init__(self, x, sigmas, r, dtype):
        seed, n = torch.tensor([SEED], dtype=torch.int64), len(sigmas) - 1
        draw = lambda row: philox.noise_like(x, seed, row, torch.float64)  # noqa: E731
        self.w, w = {sigmas[0]: torch.zeros_like(x)}, torch.zeros_like(x)
        for i, (s, sn) in enumerate(zip(sigmas[:-1], sigmas[1:])):
            if sn == 0:
                continue
            h = math.log(s / sn)
            mid = s * math.exp(-r * h)
            # the interval lengths s - mid and mid - sn, each without cancellation (exactly 0 at r = 1)
            self.w[mid] = w = w + math.sqrt(-s * math.expm1(-r * h)) * draw(i)
            self.w[sn] = w = w + math.sqrt(sn * math.expm1((1 - r) * h)) * draw(n + i)
        self.dtype = dtype

    def _at(self, sigma):
        return next(v for k, v in self.w.items() if math.isclose(k, sigma, rel_tol=1e-13))

    def __call__(self, a, b):
        return ((self._at(b) - self._at(a)) / math.sqrt(abs(b - a))).to(self.dtype)


def kdiff_dpmpp_sde(model, x, sigmas, noise_sampler, eta=1.0, s_noise=1.0, r=0.5):
    """k-diffusion's ``sample_dpmpp_sde`` as published, in Python floats for the sigmas."""
    sig = sigmas.tolist()
    call = lambda x, s: model(x, torch.full((x.shape[0],), float(s), dtype=x.dtype))  # noqa: E731
    sigma_fn, t_fn = (lambda t: math.exp(-t)), (lambda s: -math.log(s) if s > 0 else math.inf)
    for i in range(len(sig) - 1):
        denoised = call(x, sig[i])
        if sig[i + 1] == 0:
            x = x + (x - denoised) / sig[i] * (sig[i + 1] - sig[i])
            continue
        t, t_next = t_fn(sig[i]), t_fn(sig[i + 1])
        h = t_next - t
        s = t + h * r
        fac = 1 / (2 * r)
        sd, su = ancestral_step(sigma_fn(t), sigma_fn(s), eta)
        s_ = t_fn(sd)
        x_2 = (sigma_fn(s_) / sigma_fn(t)) * x - math.expm1(t - s_) * denoised
        x_2 = x_2 + noise_sampler(sigma_fn(t), sigma_fn(s)) * s_noise * su
        denoised_2 = call(x_2, sigma_fn(s))
        sd, su = ancestral_step(sigma_fn(t), sigma_fn(t_next), eta)
        t_next_ = t_fn(sd)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (sigma_fn(t_next_) / sigma_fn(t)) * x - math.expm1(t - t_next_) * denoised_d
        x = x + noise_sampler(sigma_fn(t), sigma_fn(t_next)) * s_noise * su
    return x


# eta = 1.15: the second call's sigma_down is 0 on the large steps of this schedule (k-diffusion: x' = D_d + noise),
# and > 0 on the others.
CASES = [{}, {"eta": 0.0}, {"eta": 0.5, "s_noise": 0.9}, {"r": 0.3}, {"r": 1.0, "eta": 0.7}, {"eta": 1.15}]


@pytest.mark.parametrize("final_zero", [True, False])
@pytest.mark.parametrize("kw", CASES, ids=[str(kw) for kw in CASES])
def test_matches_k_diffusion_loop(kw, final_zero):
    gmm, x = gmm2(), start()
    sig = schedules.karras(STEPS, 0.02, 20.0)
    sig = sig if final_zero else sig[:-1]
    r = kw.get("r", 0.5)
    ref = {dt: kdiff_dpmpp_sde(gmm.denoise, x.to(dt), sig, PhiloxBrownian(x, sig.tolist(), r, dt), **kw)
           for dt in DTYPES}
    ours = {dt: sample(gmm.denoise, x.to(dt), sig, "dpmpp_sde", backend=REF, seed=SEED, **kw) for dt in DTYPES}
    what = f"dpmpp_sde {kw} final_zero={final_zero}"
    assert_matches_reference(ours[torch.float64], ref[torch.float64], ref[torch.float64], f"{what} float64")
    assert_matches_reference(ours[torch.float32], ref[torch.float64], ref[torch.float32], f"{what} float32")


def test_large_eta_has_a_zero_sigma_down():
    sig = schedules.karras(STEPS, 0.02, 20.0).tolist()
    downs = [coef_tables_dpmpp_sde.ct.ancestral_step(s, sn, 1.15)[0] for s, sn in zip(sig[:-2], sig[1:-1])]
    assert any(d == 0 for d in downs) and any(d > 0 for d in downs)


def test_injected_noise_has_the_ancestral_variance():
    """With D = 0, x' is the step's noise alone: k*x2 + sqrt(1 - rho^2)*s_noise*su2*xi' must have variance
    (s_noise*su2)^2 per element, the law of k-diffusion's xi2 (its correlation with xi1 is checked by the loop test)."""
    sig = [10.0, 4.0]
    x = torch.zeros(200_000, 1, dtype=torch.float64)
    zero = lambda x, s: torch.zeros_like(x)  # noqa: E731  D = 0: x' is the noise alone
    y = sample(zero, x, sig, "dpmpp_sde", backend=REF, seed=7)
    _, su2 = ancestral_step(10.0, 4.0, 1.0)
    assert y.var().item() == pytest.approx(su2 ** 2, rel=0.02)
    assert y.mean().item() == pytest.approx(0.0, abs=0.03)


def test_eta_zero_is_deterministic_and_second_order():
    gmm, x = gmm2(), start(n=4)
    errs = []
    exact = None
    for n in (8, 16, 32):
        sig = schedules.karras(n, 0.05, 20.0)
        a = sample(gmm.denoise, x, sig, "dpmpp_sde", backend=REF, eta=0.0, seed=1)
        assert torch.equal(a, sample(gmm.denoise, x, sig, "dpmpp_sde", backend=REF, eta=0.0, seed=2))
        errs.append(a)
    exact = sample(gmm.denoise, x, schedules.karras(256, 0.05, 20.0), "dpmpp_sde", backend=REF, eta=0.0)
    e = [(a - exact).norm().item() for a in errs]
    orders = [math.log2(e[k] / e[k + 1]) for k in range(2)]
    assert all(1.7 < p < 2.6 for p in orders), orders


def test_plan_layout_and_knobs():
    sig = schedules.karras(4, 0.1, 10.0).tolist()
    plan = coef_tables_dpmpp_sde.dpmpp_sde(sig)
    assert sig[-1] == 0 and plan.corrector == [True, True, True, False] and plan.corrector_row == 4 and plan.history
    for i in range(3):
        assert plan.row_sigma[4 + i] == pytest.approx(math.sqrt(sig[i] * sig[i + 1]), rel=1e-14)
    assert knobs("dpmpp_sde") == {"eta": 1.0, "s_noise": 1.0, "r": 0.5}
    gmm, x = gmm2(), start()
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="r"):
            sample(gmm.denoise, x, sig, "dpmpp_sde", r=bad)
    with pytest.raises(ValueError, match="eta"):
        sample(gmm.denoise, x, sig, "dpmpp_sde", eta=-1.0)
