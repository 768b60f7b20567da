"""DDIM inversion (diffkern.diffusers.DDIMInverseScheduler) against oracles independent of diffusers.

- A textbook float64 inversion loop written here from the DDIM update (Song et al. 2021, eq. 12 with sigma = 0, run
  from alpha-bar(t - T/N) to alpha-bar(t), as diffusers' inverse step does), on a training table built here: ours
  in float64 must agree at the float64 floor, ours in float32 within the project rule (the same loop in float32
  arithmetic the yardstick).
- The round trip on the exact denoiser of a Gaussian mixture (``diffkern.analytic``): invert x0 with ours (the model
  called as pipelines call it, at the step's timestep t), sample back with diffkern's DDIMScheduler over the same
  levels, and the distance to x0 must shrink like 1/N (doubling N halves it: first-order DDIM).
"""
import math

import pytest
import torch

pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern import analytic  # noqa: E402
from diffkern.testing import assert_matches_reference  # noqa: E402

F64 = torch.float64
GMM = analytic.GaussianMixture([1.0, 2.0, 1.5], [[-1.0, 0.5], [1.0, 1.0], [0.3, -1.2]], [0.3, 0.5, 0.4])


def alphas_cumprod(T=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", dtype=F64):
    """alpha-bar (T,) of the linear or scaled-linear betas, computed in ``dtype``."""
    if beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, T, dtype=dtype)
    else:
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=dtype) ** 2
    return torch.cumprod(1 - betas, 0)


def model(kind, ab_t):
    """The exact network of prediction ``kind`` at a training level of alpha-bar ``ab_t``, on the VP state z."""
    a, s = math.sqrt(ab_t), math.sqrt(1 - ab_t)

    def net(z):
        z64 = z.double()
        eps = GMM.eps(z64 / a, s / a)  # VE state z/a, VE sigma s/a: the same eps as the VP state's
        if kind == "epsilon":
            out = eps
        elif kind == "v_prediction":
            out = a * eps - s * (z64 - s * eps) / a
        else:
            out = (z64 - s * eps) / a
        return out.to(z.dtype)
    return net


def textbook_inversion(x0, kind, ab, timesteps, T, n, initial):
    """DDIM inversion in ``x0``'s dtype: at each t, x0_hat and eps_hat from the network called at (z, t), then
    z <- sqrt(ab(t))*x0_hat + sqrt(1 - ab(t))*eps_hat, from alpha-bar(t - T//n) (``initial`` below 0)."""
    z = x0
    for t in timesteps:
        a_s = ab[t - T // n] if t - T // n >= 0 else torch.tensor(initial, dtype=ab.dtype)
        a_t = ab[t]
        m = model(kind, float(a_t))(z).to(z.dtype)
        if kind == "epsilon":
            x0_hat, eps = (z - (1 - a_s).sqrt() * m) / a_s.sqrt(), m
        elif kind == "v_prediction":
            x0_hat, eps = a_s.sqrt() * z - (1 - a_s).sqrt() * m, a_s.sqrt() * m + (1 - a_s).sqrt() * z
        else:
            x0_hat, eps = m, (z - a_s.sqrt() * m) / (1 - a_s).sqrt()
        z = a_t.sqrt() * x0_hat + (1 - a_t).sqrt() * eps
    return z


def ours_inversion(sched, x0, kind):
    z = x0
    ab = sched.alphas_cumprod
    for t in sched.timesteps:
        z = sched.step(model(kind, float(ab[int(t)]))(z), t, z).prev_sample
    return z


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("config", [{}, {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                                         "set_alpha_to_one": False, "steps_offset": 1}], ids=["linear", "sd"])
def test_matches_textbook_loop(kind, config):
    if kind == "sample" and config.get("set_alpha_to_one", True):
        config = dict(config, set_alpha_to_one=False)  # "sample" from alpha-bar 1 is refused (division by 0)
    betas = {k: config[k] for k in ("beta_schedule", "beta_start", "beta_end") if k in config}
    x0 = GMM.sample(16, generator=torch.Generator().manual_seed(0)).to(F64)
    for n in (1, 2, 10, 50):
        sched = dd.DDIMInverseScheduler(clip_sample=False, prediction_type=kind, **config)
        sched.set_timesteps(n)
        ts = sched.timesteps.tolist()
        assert ts == [k * (1000 // n) + config.get("steps_offset", 0) for k in range(n)]
        ab64 = alphas_cumprod(**betas)
        initial = 1.0 if config.get("set_alpha_to_one", True) else float(ab64[0])
        ref = textbook_inversion(x0, kind, ab64, ts, 1000, n, initial)
        eager = textbook_inversion(x0.float(), kind, ab64.float(), ts, 1000, n, initial)
        assert_matches_reference(ours_inversion(sched, x0, kind), ref, ref, f"{kind} {config} N={n} float64")
        sched.set_timesteps(n)
        assert_matches_reference(ours_inversion(sched, x0.float(), kind), ref, eager, f"{kind} {config} N={n}")


def round_trip_error(n, kind, config):
    """max |x0 - DDIM(DDIM-inverse(x0))| in float64 over N = n steps each way."""
    x0 = GMM.sample(256, generator=torch.Generator().manual_seed(1)).to(F64)
    inv = dd.DDIMInverseScheduler(clip_sample=False, prediction_type=kind, **config)
    ddim = dd.DDIMScheduler(clip_sample=False, prediction_type=kind, **config)
    inv.set_timesteps(n)
    ddim.set_timesteps(n)
    # the same levels both ways: ours ends at ddim's first timestep and starts at the alpha-bar ddim ends at
    assert inv.timesteps.flip(0).tolist() == ddim.timesteps.tolist()
    assert float(inv.initial_alpha_cumprod) == ddim.final_alpha_cumprod
    z = ours_inversion(inv, x0, kind)
    assert float(z.std()) > 0.9  # near the prior N(0, I): the inversion did travel to noise
    ab = ddim.alphas_cumprod
    for t in ddim.timesteps:
        z = ddim.step(model(kind, float(ab[int(t)]))(z), t, z).prev_sample
    return float((z - x0).abs().max())


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("config", [{}, {"timestep_spacing": "trailing"},
                                    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                                     "set_alpha_to_one": False, "steps_offset": 1}], ids=["linear", "trailing", "sd"])
def test_round_trip_converges_at_first_order(kind, config):
    steps = (25, 50, 100, 200)
    errors = [round_trip_error(n, kind, config) for n in steps]
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    # first order: each doubling of N divides the error by about 2 (measured 1.78 to 1.97), and N*error stays about
    # constant (measured within 1.28x over the four N)
    assert all(1.6 < r < 3.2 for r in ratios), (errors, ratios)
    constants = [n * e for n, e in zip(steps, errors)]
    assert max(constants) < 1.5 * min(constants), constants
