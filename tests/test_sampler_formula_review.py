"""Independent review of the core samplers' per-step formulas (``math-samplers.md`` 2.4, 3.2, 5, 6).

Each method is rebuilt here as a textbook float64 loop, written from the papers (Karras et al. 2022 Algorithm 2,
Song et al.'s DDIM and Ho et al.'s DDPM posterior in VP coordinates, Lu et al.'s DPM-Solver++(2M) and its SDE
variant, Permenter & Yuan's / smalldiffusion's ``samples(gam, mu)``, McAllester's lam-family), sharing nothing
with diffkern but the Philox noise the fused op draws (``philox.noise_like`` at the row of each draw), and run
against ``diffkern.sample(..., backend="reference")`` with exact Gaussian-mixture denoisers:

* (i) the same trajectory to 1e-12 relative in float64, noise included;
* (ii) and knob validation: tests/test_sampler_formula_orders.py.
"""
import math

import pytest
import torch

from diffkern import analytic, schedules, wrappers
from diffkern.ops import philox
from diffkern.ops.ddim import ddim_step
from diffkern.sampling import sample

F64 = torch.float64
SEED = 11
REF = "reference"


def _xi(x, row):
    """The normals the fused op draws for state x at table row ``row`` (its Philox step counter)."""
    return philox.noise_like(x, torch.tensor([SEED], dtype=torch.int64), row, F64)


def _close(actual, expected, rtol=1e-12):
    err = float((actual - expected).abs().max())
    scale = float(expected.abs().max())
    assert err <= rtol * scale, f"max error {err:.3e} > {rtol:g} * {scale:.3e}"


def _gmm():
    return analytic.GaussianMixture([1.0, 2.0, 1.5], [[-1.0, 0.5], [1.0, 1.0], [0.3, -1.2]], [0.3, 0.5, 0.4])


def _start(sigma_max, n=24):
    gen = torch.Generator().manual_seed(3)
    return torch.randn(n, 2, generator=gen, dtype=F64) * sigma_max


def _den(gmm, x, s):
    return gmm.denoise(x, torch.full((x.shape[0],), float(s), dtype=F64))


SCHEDULES = {"karras_to0": lambda: schedules.karras(9, 0.02, 30.0).tolist(),
             "loglinear_tomin": lambda: schedules.loglinear(9, 0.05, 20.0).tolist()[:-1],
             # step ratios far from constant: the multistep ratio r = h_prev/h ranges over 0.01..100
             "irregular_to0": lambda: [25.0, 24.0, 9.0, 8.5, 1.1, 0.9, 0.05, 0.049, 0.0]}

#----------------------------------------------------------------------------
# Karras et al. 2022, Algorithm 2 (Euler = its step without the correction; Heun with it).


def _karras_alg2(gmm, x, t, s_churn, s_tmin, s_tmax, s_noise, heun):
    """Algorithm 2 as printed: gamma_i = min(S_churn/N, sqrt2-1) if t_i in [S_tmin, S_tmax], t_hat = t_i(1+gamma),
    x_hat = x + sqrt(t_hat^2 - t^2) S_noise eps, Euler step, second-order correction unless t_{i+1} = 0. The churn
    noise of step i is drawn at row N + i (Euler: after the N step rows) or 2N + i (Heun: after the correctors)."""
    n = len(t) - 1
    for i in range(n):
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= t[i] <= s_tmax else 0.0
        t_hat = t[i] + gamma * t[i]
        if gamma > 0:
            x = x + math.sqrt(t_hat ** 2 - t[i] ** 2) * s_noise * _xi(x, (2 if heun else 1) * n + i)
        d = (x - _den(gmm, x, t_hat)) / t_hat
        x_next = x + (t[i + 1] - t_hat) * d
        if heun and t[i + 1] != 0:
            d2 = (x_next - _den(gmm, x_next, t[i + 1])) / t[i + 1]
            x_next = x + (t[i + 1] - t_hat) * (0.5 * d + 0.5 * d2)
        x = x_next
    return x


@pytest.mark.parametrize("sched", list(SCHEDULES))
@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("churn", [(0.0, 0.0, math.inf, 1.0), (4.0, 0.1, 5.0, 1.007), (40.0, 0.0, math.inf, 0.9)],
                         ids=["nochurn", "window", "capped"])
def test_euler_heun_are_karras_algorithm_2(method, sched, churn):
    gmm, sig = _gmm(), SCHEDULES[sched]()
    x = _start(sig[0])
    s_churn, s_tmin, s_tmax, s_noise = churn
    out = sample(gmm, x, sig, method, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise,
                 backend=REF, seed=SEED)
    _close(out, _karras_alg2(gmm, x, sig, s_churn, s_tmin, s_tmax, s_noise, method == "heun"))

#----------------------------------------------------------------------------
# DDIM (Song et al. 2021, eq. 12) in VP coordinates, every prediction type converted, and the DDPM posterior.


def _vp_net(gmm, kind):
    """A network of the VP state z = x/sqrt(1+sigma^2), conditioned on t = sigma, predicting ``kind`` exactly."""
    def net(z, sigma):
        s = sigma.reshape(-1, 1)
        ab = 1 / (1 + s * s)
        x = z / ab.sqrt()
        x0 = _den_batch(gmm, x, sigma)
        eps = (z - ab.sqrt() * x0) / (1 - ab).sqrt()
        return {"epsilon": eps, "sample": x0, "v_prediction": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[kind]
    return net


def _flow_net(gmm):
    """A velocity network of z = (1-t) x0 + t eps (v = eps - x0), given z and t."""
    def net(z, t):
        tt = t.reshape(-1, 1)
        sigma = t / (1 - t)
        x = z / (1 - tt)
        x0 = _den_batch(gmm, x, sigma)
        eps = (z - (1 - tt) * x0) / tt
        return eps - x0
    return net


def _den_batch(gmm, x, sigma):
    return gmm.denoise(x, sigma.to(F64))


def _ddim_textbook(net, kind, z, alphas, stds, eta, conds):
    """Generalised DDIM in coordinates z = alpha x0 + std eps: x0 and eps from the model output by the
    prediction type, ``z' = alpha' x0 + sqrt(std'^2 - s^2) eps + s xi`` with the DDIM noise
    ``s = eta std' sqrt(1 - (std' alpha / (alpha' std))^2)`` (VP: Song et al.'s sigma_t(eta)); xi of step i at
    row i. Returns the final z."""
    for i in range(len(alphas) - 1):
        a, sd, a2, sd2 = alphas[i], stds[i], alphas[i + 1], stds[i + 1]
        m = net(z, torch.full((z.shape[0],), conds[i], dtype=F64))
        if kind == "epsilon":
            eps = m
            x0 = (z - sd * eps) / a
        elif kind == "sample":
            x0 = m
            eps = (z - a * x0) / sd
        elif kind == "v_prediction":
            x0 = a * z - sd * m
            eps = a * m + sd * z
        else:  # flow: v = eps - x0 with a = 1 - t, sd = t
            x0 = z - sd * m
            eps = z + a * m
        s = eta * sd2 * math.sqrt(max(1 - (sd2 * a / (a2 * sd)) ** 2, 0.0))
        z = a2 * x0 + math.sqrt(max(sd2 ** 2 - s ** 2, 0.0)) * eps + s * _xi(z, i)
    return z


@pytest.mark.parametrize("sched", list(SCHEDULES))
@pytest.mark.parametrize("eta", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction", "flow"])
def test_ddim_vp_every_prediction_type(kind, eta, sched):
    gmm, sig = _gmm(), SCHEDULES[sched]()
    x = _start(sig[0])
    if kind == "flow":
        model = wrappers.FlowDenoiser(_flow_net(gmm))
        alphas = [1 / (1 + s) for s in sig]
        stds = [s / (1 + s) for s in sig]
        conds = stds
    else:
        model = wrappers.VPContinuousDenoiser(_vp_net(gmm, kind), kind, time=lambda s: s)
        alphas = [1 / math.sqrt(1 + s * s) for s in sig]
        stds = [s / math.sqrt(1 + s * s) for s in sig]
        conds = sig
    out = sample(model, x, sig, "euler_ancestral", eta=eta, backend=REF, seed=SEED)
    ref = _ddim_textbook(model.model, kind, x * alphas[0], alphas, stds, eta, conds)
    _close(out * alphas[-1], ref)


def _diffusers_ddim(net, kind, z, ab, eta, clip, use_clipped):
    """Song et al.'s step as diffusers states it, with clipping: x0 and eps from the raw output, x0 clamped to
    [-clip, clip], eps recomputed from the clamped x0 only with ``use_clipped``; xi of step i at row i."""
    for i in range(len(ab) - 1):
        a, a2 = ab[i], ab[i + 1]
        m = net(z, torch.full((z.shape[0],), math.sqrt((1 - a) / a), dtype=F64))
        if kind == "epsilon":
            x0, eps = (z - math.sqrt(1 - a) * m) / math.sqrt(a), m
        elif kind == "sample":
            x0, eps = m, (z - math.sqrt(a) * m) / math.sqrt(1 - a)
        else:
            x0, eps = math.sqrt(a) * z - math.sqrt(1 - a) * m, math.sqrt(a) * m + math.sqrt(1 - a) * z
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
            if use_clipped:
                eps = (z - math.sqrt(a) * x0) / math.sqrt(1 - a)
        std = eta * math.sqrt((1 - a2) / (1 - a) * (1 - a / a2))
        z = math.sqrt(a2) * x0 + math.sqrt(1 - a2 - std ** 2) * eps + std * _xi(z, i)
    return z


@pytest.mark.parametrize("clip,use_clipped", [(None, False), (1.0, False), (1.0, True)], ids=["noclip", "clip",
                                                                                            "clipped_eps"])
@pytest.mark.parametrize("eta", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction"])
def test_ddim_row_op_is_diffusers_ddim(kind, eta, clip, use_clipped):
    """The VP-space op (``ops.ddim_step``, one table row per step) against the textbook step, to ab_prev = 1."""
    gmm, sig = _gmm(), SCHEDULES["karras_to0"]()
    ab = [1 / (1 + s * s) for s in sig]
    net = _vp_net(gmm, kind)
    z = _start(sig[0]) * math.sqrt(ab[0])
    ref = _diffusers_ddim(net, kind, z, ab, eta, clip, use_clipped)
    seed = torch.tensor([SEED], dtype=torch.int64)
    for i in range(len(ab) - 1):
        m = net(z, torch.full((z.shape[0],), sig[i], dtype=F64))
        z, _ = ddim_step(z, m, ab[i], ab[i + 1], eta=eta, prediction_type=kind, clip_sample=clip is not None,
                         clip_sample_range=clip or 1.0, use_clipped_model_output=use_clipped, seed=seed, step=i,
                         backend=REF)
    _close(z, ref)


@pytest.mark.parametrize("sched", list(SCHEDULES))
def test_ddim_eta_one_is_the_ddpm_posterior(sched):
    """Ho et al. 2020 eq. 7 between the schedule's points (alpha_t := ab_t/ab_prev): mean
    ``sqrt(ab_p) beta_t/(1-ab_t) x0 + sqrt(alpha_t)(1-ab_p)/(1-ab_t) z``, variance ``(1-ab_p)/(1-ab_t) beta_t``."""
    gmm, sig = _gmm(), SCHEDULES[sched]()
    x = _start(sig[0])
    ab = [1 / (1 + s * s) for s in sig]
    z = x * math.sqrt(ab[0])
    for i in range(len(sig) - 1):
        x0 = _den(gmm, z / math.sqrt(ab[i]), sig[i])
        alpha_t = ab[i] / ab[i + 1]
        beta_t = 1 - alpha_t
        mean = (math.sqrt(ab[i + 1]) * beta_t / (1 - ab[i]) * x0
                + math.sqrt(alpha_t) * (1 - ab[i + 1]) / (1 - ab[i]) * z)
        z = mean + math.sqrt((1 - ab[i + 1]) / (1 - ab[i]) * beta_t) * _xi(z, i)
    out = sample(gmm, x, sig, "euler_ancestral", eta=1.0, backend=REF, seed=SEED)
    _close(out * math.sqrt(ab[-1]), z)


@pytest.mark.parametrize("eta,s_noise", [(0.5, 1.0), (1.0, 0.7), (1.6, 1.0)])
def test_euler_ancestral_is_k_diffusion_form(eta, s_noise):
    """sigma_up = min(sigma', eta sqrt(sigma'^2 (sigma^2 - sigma'^2)/sigma^2)), sigma_down = sqrt(sigma'^2 - up^2);
    Euler to sigma_down, then s_noise sigma_up xi (none on the step to 0). eta > 1 hits the min."""
    gmm, sig = _gmm(), SCHEDULES["karras_to0"]()
    x = _start(sig[0])
    y = x.clone()
    for i, (s, sn) in enumerate(zip(sig[:-1], sig[1:])):
        up = min(sn, eta * math.sqrt(sn ** 2 * (s ** 2 - sn ** 2) / s ** 2))
        down = math.sqrt(sn ** 2 - up ** 2)
        y = y + (down - s) * (y - _den(gmm, y, s)) / s
        if sn > 0:
            y = y + s_noise * up * _xi(y, i)
    _close(sample(gmm, x, sig, "euler_ancestral", eta=eta, s_noise=s_noise, backend=REF, seed=SEED), y)

#----------------------------------------------------------------------------
# DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2, alpha = 1 in VE) and its SDE variant.


def _dpmpp_2m(gmm, x, sig):
    """lambda = -log sigma, h_i = lambda_{i+1} - lambda_i; first step (and the step to 0) first order:
    x' = (sigma'/sigma) x - (e^{-h} - 1) D; else D_bar = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}, r = h_{i-1}/h_i."""
    prev = h_prev = None
    for i in range(len(sig) - 1):
        d = _den(gmm, x, sig[i])
        if sig[i + 1] == 0:
            x = d
            continue
        h = math.log(sig[i]) - math.log(sig[i + 1])
        d_bar = d if prev is None else (1 + 1 / (2 * h_prev / h)) * d - 1 / (2 * h_prev / h) * prev
        x = sig[i + 1] / sig[i] * x - (math.exp(-h) - 1) * d_bar
        prev, h_prev = d, h
    return x


def _dpmpp_2m_sde(gmm, x, sig, eta, s_noise, solver_type):
    """The SDE (Lu et al. 2022, DPM-Solver++(2M) SDE; k-diffusion's eta generalisation): with H = (1 + eta) h,
    x' = (sigma'/sigma) e^{-eta h} x + (1 - e^{-H}) D + k (D - D_prev)/r + s_noise sigma' sqrt(1 - e^{-2 eta h}) xi,
    k = (1 - e^{-H})/2 (midpoint) or (1 - e^{-H})/(-H) + 1 (heun); step to 0: x' = D."""
    prev = h_prev = None
    for i in range(len(sig) - 1):
        d = _den(gmm, x, sig[i])
        if sig[i + 1] == 0:
            x, prev = d, d
            continue
        h = math.log(sig[i] / sig[i + 1])
        big = (1 + eta) * h
        x = sig[i + 1] / sig[i] * math.exp(-eta * h) * x + (1 - math.exp(-big)) * d
        if prev is not None:
            k = 0.5 * (1 - math.exp(-big)) if solver_type == "midpoint" else (1 - math.exp(-big)) / (-big) + 1
            x = x + k / (h_prev / h) * (d - prev)
        if eta > 0:
            x = x + s_noise * sig[i + 1] * math.sqrt(1 - math.exp(-2 * eta * h)) * _xi(x, i)
        prev, h_prev = d, h
    return x


@pytest.mark.parametrize("sched", list(SCHEDULES))
def test_dpmpp_2m_is_lu_et_al(sched):
    gmm, sig = _gmm(), SCHEDULES[sched]()
    x = _start(sig[0])
    _close(sample(gmm, x, sig, "dpmpp_2m", backend=REF), _dpmpp_2m(gmm, x, sig))


@pytest.mark.parametrize("sched", list(SCHEDULES))
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("eta,s_noise", [(0.0, 1.0), (1.0, 1.0), (0.35, 0.8)])
def test_dpmpp_2m_sde(sched, solver_type, eta, s_noise):
    gmm, sig = _gmm(), SCHEDULES[sched]()
    x = _start(sig[0])
    out = sample(gmm, x, sig, "dpmpp_2m_sde", eta=eta, s_noise=s_noise, solver_type=solver_type, backend=REF,
                 seed=SEED)
    _close(out, _dpmpp_2m_sde(gmm, x, sig, eta, s_noise, solver_type))

#----------------------------------------------------------------------------
# Permenter & Yuan (smalldiffusion samples(gam, mu)) and McAllester's lam-family.


def _ge(gmm, x, sig, gam, mu):
    """eps_av = eps on step 0, else gam eps + (1 - gam) eps_prev; sigma_p = (sigma'/sigma^mu)^(1/(1-mu));
    x' = x - (sigma - sigma_p) eps_av + sqrt(sigma'^2 - sigma_p^2) xi. A step to 0 is the jump x' = D (ComfyUI's
    convention; smalldiffusion ends at sigma_min > 0)."""
    eps_prev = None
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        d = _den(gmm, x, s)
        eps = (x - d) / s
        if sn == 0:
            x = d
            continue
        eps_av = eps if i == 0 else gam * eps + (1 - gam) * eps_prev
        sig_p = (sn / s ** mu) ** (1 / (1 - mu))
        x = x - (s - sig_p) * eps_av + math.sqrt(max(sn ** 2 - sig_p ** 2, 0.0)) * _xi(x, i)
        eps_prev = eps
    return x


@pytest.mark.parametrize("sched", list(SCHEDULES))
@pytest.mark.parametrize("gam,mu", [(2.0, 0.0), (1.0, 0.5), (2.4, 0.3), (-0.5, 0.0), (1.0, 0.9)])
def test_ge_is_smalldiffusion_samples(sched, gam, mu):
    gmm, sig = _gmm(), SCHEDULES[sched]()
    x = _start(sig[0])
    _close(sample(gmm, x, sig, "ge", gamma=gam, mu=mu, backend=REF, seed=SEED), _ge(gmm, x, sig, gam, mu))


def test_ge_first_step_is_ddim():
    """Step 0 has no eps_prev: any gamma gives the DDIM step there."""
    gmm, sig = _gmm(), SCHEDULES["loglinear_tomin"]()[:2]
    x = _start(sig[0])
    ddim = x + (sig[1] - sig[0]) * (x - _den(gmm, x, sig[0])) / sig[0]
    for gam in (0.0, 2.0, 3.0):
        _close(sample(gmm, x, sig, "ge", gamma=gam, backend=REF), ddim)


def _mcallester(gmm, x, sig, lam, integrator):
    """dz = ((1+lam^2)/2) grad log p_t dtau + lam dW (t = sigma^2, tau = -t), score (D - z)/t.
    exponential: D frozen, linear part and noise integrated exactly:
      z' = D + (t'/t)^{(1+lam^2)/2} (z - D) + sqrt(int_{t'}^{t} lam^2 (t'/u)^{1+lam^2} du) xi,
      the integral being t' (1 - (t'/t)^{lam^2});
    euler_maruyama: z' = z + ((1+lam^2)/2) ((t - t')/t) (D - z) + lam sqrt(t - t') xi. Step to 0: z' = D."""
    for i in range(len(sig) - 1):
        t, t2 = sig[i] ** 2, sig[i + 1] ** 2
        d = _den(gmm, x, sig[i])
        if t2 == 0:
            x = d
        elif integrator == "exponential":
            std = math.sqrt(t2 * (1 - (t2 / t) ** (lam ** 2)))
            x = d + (t2 / t) ** ((1 + lam ** 2) / 2) * (x - d) + std * _xi(x, i)
        else:
            x = x + (1 + lam ** 2) / 2 * (t - t2) / t * (d - x) + lam * math.sqrt(t - t2) * _xi(x, i)
    return x


@pytest.mark.parametrize("sched", list(SCHEDULES))
@pytest.mark.parametrize("integrator", ["exponential", "euler_maruyama"])
@pytest.mark.parametrize("lam", [0.0, 0.6, 1.0, 2.5])
def test_sde_family_is_mcallester(sched, integrator, lam):
    gmm, sig = _gmm(), SCHEDULES[sched]()
    x = _start(sig[0])
    out = sample(gmm, x, sig, "sde", lam=lam, integrator=integrator, backend=REF, seed=SEED)
    _close(out, _mcallester(gmm, x, sig, lam, integrator))


#----------------------------------------------------------------------------
# The fused conversion path: a raw eps or v network (wrappers) through the same rows, history included.


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("method,knobs,textbook", [
    ("heun", {"s_churn": 4.0, "s_tmin": 0.1, "s_tmax": 5.0},
     lambda g, x, t: _karras_alg2(g, x, t, 4.0, 0.1, 5.0, 1.0, True)),
    ("dpmpp_2m", {}, _dpmpp_2m),
    ("dpmpp_2m_sde", {"eta": 0.7, "solver_type": "heun"}, lambda g, x, t: _dpmpp_2m_sde(g, x, t, 0.7, 1.0, "heun")),
    ("ge", {"gamma": 2.0, "mu": 0.2}, lambda g, x, t: _ge(g, x, t, 2.0, 0.2)),
    ("sde", {"lam": 0.8}, lambda g, x, t: _mcallester(g, x, t, 0.8, "exponential"))],
    ids=["heun", "dpmpp_2m", "dpmpp_2m_sde", "ge", "sde"])
def test_fused_network_conversion_keeps_the_formulas(kind, method, knobs, textbook):
    gmm, sig = _gmm(), SCHEDULES["karras_to0"]()
    x = _start(sig[0])
    model = wrappers.VPContinuousDenoiser(_vp_net(gmm, kind), kind, time=lambda s: s)
    out = sample(model, x, sig, method, backend=REF, seed=SEED, **knobs)
    _close(out, textbook(gmm, x, sig))
