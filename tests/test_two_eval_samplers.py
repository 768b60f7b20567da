"""The two-evaluation samplers dpm_2, dpm_2_ancestral and dpmpp_2s_ancestral against k-diffusion's published loops.

The loops below are k-diffusion's ``sample_dpm_2``, ``sample_dpm_2_ancestral`` and ``sample_dpmpp_2s_ancestral`` (VE,
D = model(x, sigma)), written here as published, fed diffkern's Philox noise of each draw: a step's noise is the
stream of the row that adds it (churn: row 2N + i; ancestral noise: the corrector row N + i, or row i where the step
is Euler). Each runs in float64 (the reference) and float32 (its own eager error) on the exact denoiser of a
Gaussian mixture; diffkern must match the float64 loop to the float64 floor, and obey the project's tolerance rule
in float32. diffusers' KDPM2DiscreteScheduler (deterministic) is a second, independent oracle on a tiny UNet.
"""
import math

import pytest
import torch

from diffkern import analytic, coef_tables, samplers, schedules
from diffkern.ops import coefs, philox
from diffkern.sampling import knobs, sample
from diffkern.testing import assert_matches_reference

REF = "reference"
STEPS = 10
SEED = 21
DTYPES = (torch.float64, torch.float32)


def gmm2():
    return analytic.GaussianMixture([1.0, 2.0], [[-1.0, 0.5], [1.0, 1.0]], [0.3, 0.5])


def start(n=6, sigma_max=20.0, seed=3):
    return torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * sigma_max


def noise_at(x, dtype):
    """row -> the standard normal diffkern draws at that row of a call with ``seed=SEED`` (in ``dtype``)."""
    seed = torch.tensor([SEED], dtype=torch.int64)
    return lambda row: philox.noise_like(x, seed, row, dtype).to(dtype)


def to_d(x, sigma, denoised):
    return (x - denoised) / sigma


def call(model, x, sigma):
    return model(x, torch.full((x.shape[0],), float(sigma), dtype=x.dtype))


def ancestral_step(sigma, sigma_next, eta):
    """k-diffusion's ``get_ancestral_step``."""
    if not eta:
        return sigma_next, 0.0
    up = min(sigma_next, eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
    return (sigma_next ** 2 - up ** 2) ** 0.5, up


def kdiff_dpm_2(model, x, sigmas, noise, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """k-diffusion's ``sample_dpm_2``; ``noise(2N + i)`` replaces step i's ``randn_like`` (the churn draw)."""
    sig, n = sigmas.tolist(), len(sigmas) - 1
    for i in range(n):
        gamma = min(s_churn / n, 2 ** 0.5 - 1) if s_tmin <= sig[i] <= s_tmax else 0.0
        sigma_hat = sig[i] * (gamma + 1)
        if gamma > 0:
            eps = noise(2 * n + i) * s_noise
            x = x + eps * (sigma_hat ** 2 - sig[i] ** 2) ** 0.5
        denoised = call(model, x, sigma_hat)
        d = to_d(x, sigma_hat, denoised)
        if sig[i + 1] == 0:
            x = x + d * (sig[i + 1] - sigma_hat)
        else:
            sigma_mid = math.exp(0.5 * (math.log(sigma_hat) + math.log(sig[i + 1])))  # log(a).lerp(log(b), 0.5)
            x_2 = x + d * (sigma_mid - sigma_hat)
            d_2 = to_d(x_2, sigma_mid, call(model, x_2, sigma_mid))
            x = x + d_2 * (sig[i + 1] - sigma_hat)
    return x


def kdiff_dpm_2_ancestral(model, x, sigmas, noise, eta=1.0, s_noise=1.0):
    """k-diffusion's ``sample_dpm_2_ancestral`` (its noise only in the DPM-Solver-2 branch); ``noise(N + i)``."""
    sig, n = sigmas.tolist(), len(sigmas) - 1
    for i in range(n):
        denoised = call(model, x, sig[i])
        sigma_down, sigma_up = ancestral_step(sig[i], sig[i + 1], eta)
        d = to_d(x, sig[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sig[i])
        else:
            sigma_mid = math.exp(0.5 * (math.log(sig[i]) + math.log(sigma_down)))
            x_2 = x + d * (sigma_mid - sig[i])
            d_2 = to_d(x_2, sigma_mid, call(model, x_2, sigma_mid))
            x = x + d_2 * (sigma_down - sig[i])
            x = x + noise(n + i) * s_noise * sigma_up
    return x


def kdiff_dpmpp_2s_ancestral(model, x, sigmas, noise, eta=1.0, s_noise=1.0):
    """k-diffusion's ``sample_dpmpp_2s_ancestral``; its noise is ``noise(N + i)``, or ``noise(i)`` on an Euler step."""
    sig, n = sigmas.tolist(), len(sigmas) - 1
    for i in range(n):
        denoised = call(model, x, sig[i])
        sigma_down, sigma_up = ancestral_step(sig[i], sig[i + 1], eta)
        if sigma_down == 0:
            x = x + to_d(x, sig[i], denoised) * (sigma_down - sig[i])
        else:
            t, t_next = -math.log(sig[i]), -math.log(sigma_down)
            h = t_next - t
            s = t + h / 2
            x_2 = (math.exp(-s) / math.exp(-t)) * x - math.expm1(-h / 2) * denoised
            denoised_2 = call(model, x_2, math.exp(-s))
            x = (math.exp(-t_next) / math.exp(-t)) * x - math.expm1(-h) * denoised_2
        if sig[i + 1] > 0:
            x = x + noise(i if sigma_down == 0 else n + i) * s_noise * sigma_up
    return x


LOOPS = {"dpm_2": kdiff_dpm_2, "dpm_2_ancestral": kdiff_dpm_2_ancestral,
         "dpmpp_2s_ancestral": kdiff_dpmpp_2s_ancestral}
# eta = 1.15: sigma_down is 0 where sigma_next/sigma <= 0.494 (steps 4..8 of the Karras schedule below, ratios 0.60
# down to 0.30), k-diffusion's Euler branch with noise (2S) and without (dpm_2_ancestral), the midpoint step before;
# s_noise != 1 checks where the noise enters.
CASES = [("dpm_2", {}), ("dpm_2", {"s_churn": 4.0, "s_tmin": 0.1, "s_tmax": 10.0, "s_noise": 1.007}),
         ("dpm_2_ancestral", {"eta": 0.0}), ("dpm_2_ancestral", {}), ("dpm_2_ancestral", {"eta": 0.5, "s_noise": 0.9}),
         ("dpm_2_ancestral", {"eta": 1.15}), ("dpmpp_2s_ancestral", {"eta": 0.0}), ("dpmpp_2s_ancestral", {}),
         ("dpmpp_2s_ancestral", {"eta": 0.5, "s_noise": 0.9}), ("dpmpp_2s_ancestral", {"eta": 1.15})]


@pytest.mark.parametrize("final_zero", [True, False])
@pytest.mark.parametrize("method,kw", CASES, ids=[f"{m}-{kw}" for m, kw in CASES])
def test_matches_k_diffusion_loop(method, kw, final_zero):
    gmm, x = gmm2(), start()
    sig = schedules.karras(STEPS, 0.02, 20.0)
    sig = sig if final_zero else sig[:-1]
    if kw.get("eta") == 1.15:
        downs = [coef_tables.ancestral_step(s, sn, 1.15)[0] for s, sn in zip(sig[:-1].tolist(), sig[1:].tolist())]
        assert downs[3] > 0 and downs[4] == 0  # both branches

    ref = {dt: LOOPS[method](gmm.denoise, x.to(dt), sig, noise_at(x, dt), **kw) for dt in DTYPES}
    ours = {dt: sample(gmm.denoise, x.to(dt), sig, method, backend=REF, seed=SEED, **kw) for dt in DTYPES}
    what = f"{method} {kw} final_zero={final_zero}"
    assert_matches_reference(ours[torch.float64], ref[torch.float64], ref[torch.float64], f"{what} float64")
    assert_matches_reference(ours[torch.float32], ref[torch.float64], ref[torch.float32], f"{what} float32")


def test_eta_zero_and_churn_free_forms_agree():
    """dpm_2_ancestral at eta = 0 is dpm_2 without churn (bitwise: the same rows); 2S at eta = 0 is deterministic."""
    gmm, x, sig = gmm2(), start(), schedules.karras(STEPS, 0.02, 20.0)
    a = sample(gmm.denoise, x, sig, "dpm_2", backend=REF)
    assert torch.equal(a, sample(gmm.denoise, x, sig, "dpm_2_ancestral", backend=REF, eta=0.0, seed=5))
    b = sample(gmm.denoise, x, sig, "dpmpp_2s_ancestral", backend=REF, eta=0.0, seed=1)
    assert torch.equal(b, sample(gmm.denoise, x, sig, "dpmpp_2s_ancestral", backend=REF, eta=0.0, seed=2))


def test_plans_call_the_model_at_the_midpoint():
    """Row layout: predictors at sigma (row i), correctors at sqrt(sigma*target) (row N + i), none on the step to 0."""
    sig = schedules.karras(4, 0.1, 10.0).tolist()
    plan = coef_tables.dpm_2(sig)
    assert plan.corrector == [True, True, True, False] and plan.corrector_row == 4 and plan.churn_row == 8
    assert plan.row_sigma[:4] == sig[:4]
    for i in range(3):
        assert plan.row_sigma[4 + i] == pytest.approx(math.sqrt(sig[i] * sig[i + 1]), rel=1e-15)
    # no churn: no churn rows (they would never run)
    assert math.isnan(plan.row_sigma[7]) and plan.history and tuple(plan.table.shape) == (8, coefs.NCOEF)
    anc = coef_tables.dpmpp_2s_ancestral(sig, eta=1.0)
    for i in range(3):  # eta = 1: sigma_down = sigma_next^2/sigma, so the midpoint is sigma_next
        assert anc.row_sigma[4 + i] == pytest.approx(sig[i + 1], rel=1e-14)
    assert tuple(anc.table.shape) == (8, coefs.NCOEF) and not any(anc.churn)


def test_callback_sees_the_first_call_and_trajectory():
    gmm, x, sig = gmm2(), start(), schedules.karras(5, 0.02, 20.0)
    seen = []
    y, traj = sample(gmm.denoise, x, sig, "dpmpp_2s_ancestral", backend=REF, record=True, seed=4,
                     callback=lambda d: seen.append((d["i"], d["sigma"], d["x"].clone(), d["denoised"].clone())))
    assert [s[0] for s in seen] == list(range(5))
    for i, sigma, xi, den in seen:
        torch.testing.assert_close(xi, traj["x"][i], rtol=0, atol=0)
        torch.testing.assert_close(den, gmm.denoise(xi, sigma), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(traj["x"][-1], y, rtol=0, atol=0)


def test_knobs_and_errors():
    assert knobs("dpm_2") == {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0}
    assert knobs("dpm_2_ancestral") == knobs("dpmpp_2s_ancestral") == {"eta": 1.0, "s_noise": 1.0, "split": "ve"}
    gmm, x, sig = gmm2(), start(), schedules.karras(3, 0.1, 10.0)
    with pytest.raises(ValueError, match="eta"):
        sample(gmm.denoise, x, sig, "dpm_2_ancestral", eta=-1.0)
    with pytest.raises(TypeError, match="s_noise"):
        samplers.sample_dpmpp_2s_ancestral(gmm.denoise, x, sig, s_noise="1")
    with pytest.raises(TypeError, match="eta"):
        sample(gmm.denoise, x, sig, "dpm_2", eta=1.0)

#----------------------------------------------------------------------------
# diffusers' KDPM2DiscreteScheduler (DPM-Solver-2, midpoint in log sigma, Euler to 0) on a tiny random UNet.


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' numpy 2 deprecations, not ours
def test_dpm_2_is_diffusers_kdpm2():
    """diffusers computes in float32 whatever the input (its sigma tables are float32), so the float64 reference is
    k-diffusion's loop through the float64 network at diffusers' sigmas; diffkern must match it to the float64 floor,
    and in float32 be within the tolerance rule of both the oracle's error and diffusers' own."""
    pytest.importorskip("diffusers")
    from diffusers import KDPM2DiscreteScheduler, UNet2DModel
    from test_sampler_parity import UNET_CONFIG

    from diffkern import wrappers

    torch.manual_seed(0)
    u32 = UNet2DModel(**UNET_CONFIG).eval()
    u64 = UNet2DModel(**UNET_CONFIG).eval()
    u64.load_state_dict(u32.state_dict())
    u64 = u64.double()
    sched = KDPM2DiscreteScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    sched.set_timesteps(STEPS)
    z = torch.randn(2, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = z * float(sched.init_noise_sigma)
    with torch.no_grad():
        theirs32 = x.float()
        for t in sched.timesteps:
            eps = u32(sched.scale_model_input(theirs32, t), t).sample
            theirs32 = sched.step(eps, t, theirs32).prev_sample
        sig = torch.unique_consecutive(sched.sigmas).double()  # [sigma_0, ..., sigma_{N-1}, 0] as diffusers holds them
        assert sig.numel() == STEPS + 1 and sig[-1] == 0
        models = {torch.float64: wrappers.DiffusersUNetDenoiser(u64, sched),
                  torch.float32: wrappers.DiffusersUNetDenoiser(u32, sched)}
        ref64 = kdiff_dpm_2(models[torch.float64], x, sig, noise=None)
    ours = {dt: sample(models[dt], x.to(dt), sig, "dpm_2", backend=REF) for dt in DTYPES}
    assert_matches_reference(ours[torch.float64], ref64, ref64, "KDPM2 float64")
    assert_matches_reference(ours[torch.float32], ref64, theirs32, "KDPM2 float32 against diffusers' error")
    assert_matches_reference(theirs32, ref64, ours[torch.float32], "diffusers KDPM2 against our float32 error")
