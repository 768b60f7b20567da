"""VP-DDIM (``math-samplers.md`` section 5): ``ddim_step`` against diffusers' ``DDIMScheduler.step``, and the
DDIM row as a coefficient mapping onto the fused ``sampler_step`` (it has no kernel of its own).

diffusers is an independent oracle here (test-only dependency); nothing of its code is used by diffkern.
"""
import math

import pytest
import torch

import diffkern.ops as dops
from diffkern.ops import coefs
from diffkern.testing import assert_matches_reference, make_tensor

diffusers = pytest.importorskip("diffusers")

SHAPE = (2, 3, 8, 8)
N_STEPS = 10  # 'leading' spacing, 1000 train steps: timesteps 900, 800, ..., 0; t_prev = t - 100


def _schedulers(**config):
    """diffusers' scheduler in float32 (as shipped) and the same one with float64 alpha-bars (the oracle).

    The float64 copy holds the float32 alpha-bars converted exactly, so both see the same schedule and
    differ only in the arithmetic precision of ``step``.
    """
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, **config)
    sched.set_timesteps(N_STEPS)
    sched64 = diffusers.DDIMScheduler(num_train_timesteps=1000, **config)
    sched64.set_timesteps(N_STEPS)
    sched64.alphas_cumprod = sched.alphas_cumprod.double()
    sched64.final_alpha_cumprod = torch.as_tensor(sched.final_alpha_cumprod).double()
    return sched, sched64


def _alpha_bars(sched, t):
    t_prev = t - sched.config.num_train_timesteps // sched.num_inference_steps
    ab_prev = sched.alphas_cumprod[t_prev] if t_prev >= 0 else sched.final_alpha_cumprod
    return float(sched.alphas_cumprod[t]), float(ab_prev)


def _compare_with_diffusers(backend, t, eta, use_clipped_model_output, **config):
    """diffusers float64 (truth), diffusers float32 (eager), ours float32 (fused, through ``backend``).

    Tolerance: the project rule ``max|ours - truth| <= 2*max|diffusers32 - truth| + 2e-6*max(1, |truth|)``.
    diffusers' own float32 error is the yardstick: each float32 operation rounds with relative error
    <= 2**-24, and at high noise the x0 conversion divides by sqrt(ab) (about 0.2 at t=900), which
    amplifies those roundings in both implementations alike; so the bound scales with the real
    conditioning of each case instead of a hand-picked atol. By the triangle inequality it also bounds
    ``max|ours - diffusers32|`` by 3x diffusers' error plus the floor.
    """
    sched, sched64 = _schedulers(**config)
    z, m = make_tensor(SHAPE, seed=1), make_tensor(SHAPE, seed=2)
    noise = make_tensor(SHAPE, seed=3)
    kw = {"eta": eta, "use_clipped_model_output": use_clipped_model_output}
    eager = sched.step(m, t, z, variance_noise=noise, **kw)
    truth = sched64.step(m.double(), t, z.double(), variance_noise=noise.double(), **kw)
    ab, ab_prev = _alpha_bars(sched, t)
    prev, x0 = dops.ddim_step(z, m, ab, ab_prev, eta=eta, prediction_type=sched.config.prediction_type,
                              clip_sample=sched.config.clip_sample, clip_sample_range=sched.config.clip_sample_range,
                              use_clipped_model_output=use_clipped_model_output, noise=noise, backend=backend)
    what = f"[{backend}] t={t} eta={eta} clipped_out={use_clipped_model_output} {config}"
    eager_prev, eager_x0 = eager.prev_sample, eager.pred_original_sample
    if not torch.isfinite(eager_prev).all():
        # diffusers' float32 step is NaN at alpha-bar = 0 with eta = 1: 1 - ab' - std^2 is 0 exactly and
        # rounds below 0 before its sqrt. The yardstick is then our float32 reference (the rule's eager).
        eager_prev, eager_x0 = dops.ddim_step(z, m, ab, ab_prev, eta=eta, noise=noise, backend="reference",
                                              prediction_type=sched.config.prediction_type,
                                              clip_sample=sched.config.clip_sample,
                                              clip_sample_range=sched.config.clip_sample_range,
                                              use_clipped_model_output=use_clipped_model_output)
    assert_matches_reference(prev, truth.prev_sample, eager_prev, what + " prev_sample")
    assert_matches_reference(x0, truth.pred_original_sample, eager_x0, what + " pred_original_sample")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip_sample", [False, True], ids=["noclip", "clip"])
@pytest.mark.parametrize("use_clipped_model_output", [False, True], ids=["rawout", "clippedout"])
def test_matches_diffusers(cpu_backend, prediction_type, eta, clip_sample, use_clipped_model_output):
    for t in (900, 500, 0):  # high noise, middle, last step (alpha-bar prev = final_alpha_cumprod = 1)
        _compare_with_diffusers(cpu_backend, t, eta, use_clipped_model_output, prediction_type=prediction_type,
                                clip_sample=clip_sample, clip_sample_range=1.0)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_matches_diffusers_zero_terminal_snr(cpu_backend, eta):
    """v-prediction from alpha-bar = 0 (rescale_betas_zero_snr, 'trailing': first timestep 999)."""
    _compare_with_diffusers(cpu_backend, 999, eta, False, prediction_type="v_prediction", clip_sample=False,
                            rescale_betas_zero_snr=True, timestep_spacing="trailing")


def test_matches_diffusers_clip_range(cpu_backend):
    _compare_with_diffusers(cpu_backend, 500, 0.5, True, prediction_type="epsilon", clip_sample=True,
                            clip_sample_range=0.5)

#----------------------------------------------------------------------------
# The row as a coefficient mapping: closed forms of section 5, then ddim_step == sampler_step with the row.


def _x0_eps_maps(prediction_type, ab):
    """(P, Q, Pe, Qe): ``x0_hat = P*z + Q*m`` and ``eps_hat = Pe*z + Qe*m`` (section 5, per prediction type)."""
    sa, sb = math.sqrt(ab), math.sqrt(1 - ab)
    return {"epsilon": (1 / sa, -sb / sa, 0.0, 1.0), "sample": (0.0, 1.0, 1 / sb, -sa / sb),
            "v_prediction": (sa, -sb, sb, sa)}[prediction_type]


ALPHA_BARS = [(0.05, 0.2), (0.5, 0.6), (0.9, 0.99), (0.99, 1.0)]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("ab,ab_prev", ALPHA_BARS)
def test_row_closed_form_without_clipping(prediction_type, eta, ab, ab_prev):
    """``z' = sqrt(ab')*x0_hat + sqrt(1-ab'-std^2)*eps_hat + std*xi``, collapsed onto (z, m)."""
    r = dict(zip(coefs.SLOT_NAMES, dops.ddim_row(ab, ab_prev, eta=eta, prediction_type=prediction_type)))
    P, Q, Pe, Qe = _x0_eps_maps(prediction_type, ab)
    std = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
    k = math.sqrt(1 - ab_prev - std * std)
    on_z = r["a"] + (r["b"] + r["g"]) * r["p"]
    on_m = (r["b"] + r["g"]) * r["q"]
    assert on_z == pytest.approx(math.sqrt(ab_prev) * P + k * Pe, rel=1e-12, abs=1e-12)
    assert on_m == pytest.approx(math.sqrt(ab_prev) * Q + k * Qe, rel=1e-12, abs=1e-12)
    assert (r["p"], r["q"]) == pytest.approx((P, Q), rel=1e-12), "x0_out must be diffusers' pred_original_sample"
    assert r["s"] == pytest.approx(std, rel=1e-12, abs=0) and (eta > 0 or r["s"] == 0.0)
    assert r["c"] == 0.0 and math.isinf(r["clip"])
    if prediction_type == "epsilon":  # section 5's element-wise collapse (A, B) for eps-prediction
        assert on_z == pytest.approx(math.sqrt(ab_prev / ab), rel=1e-12)
        assert on_m == pytest.approx(k - math.sqrt(ab_prev) * math.sqrt(1 - ab) / math.sqrt(ab), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("use_clipped_model_output", [False, True], ids=["rawout", "clippedout"])
@pytest.mark.parametrize("ab,ab_prev", ALPHA_BARS[:3])
def test_row_closed_form_with_clipping(prediction_type, use_clipped_model_output, ab, ab_prev):
    """Clipped x0 is D; eps_hat is rebuilt from D (use_clipped_model_output) or from the raw output."""
    r = dict(zip(coefs.SLOT_NAMES, dops.ddim_row(ab, ab_prev, eta=0.5, prediction_type=prediction_type,
                                                  clip_sample=True, clip_sample_range=2.0,
                                                  use_clipped_model_output=use_clipped_model_output)))
    sa, sb = math.sqrt(ab), math.sqrt(1 - ab)
    std = 0.5 * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
    k = math.sqrt(1 - ab_prev - std * std)
    assert r["clip"] == 2.0
    if use_clipped_model_output:  # z' = sqrt(ab')*D + k*(z - sa*D)/sb
        assert (r["a"], r["b"], r["g"]) == pytest.approx((k / sb, math.sqrt(ab_prev) - k * sa / sb, 0.0), rel=1e-12)
    else:  # z' = sqrt(ab')*D + k*eps_hat(z, m)
        P, Q, Pe, Qe = _x0_eps_maps(prediction_type, ab)
        assert r["b"] == pytest.approx(math.sqrt(ab_prev), rel=1e-12)
        assert r["a"] + r["g"] * r["p"] == pytest.approx(k * Pe, rel=1e-12, abs=1e-12)
        assert r["g"] * r["q"] == pytest.approx(k * Qe, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("noise", ["explicit", "philox"])
def test_ddim_step_is_sampler_step_with_the_row(cpu_backend, noise):
    """ddim_step adds nothing to the fused step: same outputs, bit for bit, on the same backend."""
    z, m = make_tensor(SHAPE, seed=4), make_tensor(SHAPE, seed=5)
    row_kw = {"eta": 1.0, "prediction_type": "v_prediction", "clip_sample": True, "use_clipped_model_output": False}
    kw = {"noise": make_tensor(SHAPE, seed=6)} if noise == "explicit" else {"seed": torch.tensor([7], dtype=torch.int64)}
    prev, x0 = dops.ddim_step(z, m, 0.3, 0.45, step=3, backend=cpu_backend, **row_kw, **kw)
    table = coefs.table([dops.ddim_row(0.3, 0.45, **row_kw)] * 4)
    x0_fused = torch.empty_like(z)
    prev_fused = dops.sampler_step(z, m, table, 3, x0_out=x0_fused, backend=cpu_backend, **kw)
    torch.testing.assert_close(prev, prev_fused, rtol=0, atol=0)
    torch.testing.assert_close(x0, x0_fused, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,match", [
    ({"prediction_type": "x0"}, r"^prediction_type: expected one of"),
    ({"alpha_prod_t": 1.5}, r"^alpha_prod_t: expected a value in \[0, 1\]"),
    ({"alpha_prod_t_prev": -0.1}, r"^alpha_prod_t_prev: expected a value in \[0, 1\]"),
    ({"alpha_prod_t": float("nan")}, r"^alpha_prod_t: expected a value in \[0, 1\]"),
    ({"eta": -3.0}, r"^eta: -3\.0 makes 1 - alpha_prod_t_prev - \(eta\*sigma_t\)\^2 = .* < 0"),
    ({"eta": 3.0}, r"^eta: 3\.0 makes 1 - alpha_prod_t_prev"),
    ({"eta": float("inf")}, r"^eta: expected a finite value"),
    ({"alpha_prod_t": 0.0}, r"^alpha_prod_t: 0 \(zero terminal SNR\)"),
    ({"clip_sample": True, "clip_sample_range": 0.0}, r"^clip_sample_range: expected > 0"),
], ids=str)
def test_row_bad_input(kwargs, match):
    args = {"alpha_prod_t": 0.5, "alpha_prod_t_prev": 0.6, **kwargs}
    with pytest.raises(ValueError, match=match):
        dops.ddim_row(args.pop("alpha_prod_t"), args.pop("alpha_prod_t_prev"), **args)


def test_ddim_step_bad_input_writes_nothing(cpu_backend):
    z, m = make_tensor(SHAPE, seed=8), make_tensor(SHAPE, seed=9)
    out, x0_out = torch.full(SHAPE, 7.0), torch.full(SHAPE, 7.0)
    with pytest.raises(ValueError, match=r"^model_output: expected shape .* \(that of sample\)"):
        dops.ddim_step(z, m[:1], 0.5, 0.6, out=out, x0_out=x0_out, backend=cpu_backend)
    with pytest.raises(ValueError, match=r"^noise: expected shape .* \(that of sample\)"):
        dops.ddim_step(z, m, 0.5, 0.6, eta=1.0, noise=m[:1], out=out, x0_out=x0_out, backend=cpu_backend)
    with pytest.raises(TypeError, match=r"^sample: expected a tensor"):
        dops.ddim_step(z.tolist(), m, 0.5, 0.6, out=out, x0_out=x0_out, backend=cpu_backend)
    with pytest.raises(ValueError, match=r"^eta: -3\.0 makes"):
        dops.ddim_step(z, m, 0.5, 0.6, eta=-3.0, out=out, x0_out=x0_out, backend=cpu_backend)
    for step in (-1, 2.0, True):
        with pytest.raises(ValueError, match=r"^step: expected a Python int >= 0"):
            dops.ddim_step(z, m, 0.5, 0.6, step=step, out=out, x0_out=x0_out, backend=cpu_backend)
    assert (out == 7.0).all() and (x0_out == 7.0).all()
