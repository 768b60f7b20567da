"""User-journey review of IADB (``diffkern.sample_iadb``, ``iadb_blend``/deblend, the Level-1 ``IADBScheduler``).

Oracles are written here in float64 from Heitz et al. 2023: ``x_alpha = (1-alpha)*x0 + alpha*x1`` (x0 noise, x1
data) and ``x' = x + (alpha' - alpha)*D(x, alpha)`` with the exact deblending direction
``D = E[x1 - x0 | x_alpha]``: a softmax over a finite data set, or affine in x for Gaussian data. The HOLD half of
the review is ``test_hold_journey_review.py``.
"""
import math
import warnings

import pytest
import torch

from diffkern import graphs
from diffkern.diffusers import IADBScheduler
from diffkern.ops import iadb_blend, iadb_deblend, iadb_deblend_two_head, philox
from diffkern.sampling import sample_iadb
from diffkern.testing import assert_matches_reference, noncontiguous, usable_backends

F64 = torch.float64
REF = "reference"
PTS = torch.tensor([[-2.0, 0.5], [1.0, 1.5], [0.5, -1.0]], dtype=F64)
WEIGHTS = torch.tensor([0.2, 0.3, 0.5], dtype=F64)


def finite_d(points=PTS, weights=WEIGHTS):
    """Exact D(x, alpha) for x0 ~ N(0, I) and x1 uniform-weighted on ``points`` (K, d), any sample shape with
    prod(shape[1:]) = d: E[x1 | x_alpha] is a softmax over the points (log w_k - |x - a p_k|^2 / (2 (1-a)^2))."""
    def model(x, alpha):
        a = alpha.to(F64).reshape(-1, 1)
        xf = x.to(F64).reshape(x.shape[0], -1)
        d2 = ((xf[:, None, :] - a[:, :, None] * points[None]) ** 2).sum(-1)
        x1 = torch.softmax(weights.log()[None] - 0.5 * d2 / (1 - a) ** 2, 1) @ points
        return ((x1 - xf) / (1 - a)).reshape(x.shape).to(x.dtype)
    return model


def two_heads(d_model):
    """(x0_bar, x1_bar) = (x - alpha D, x + (1-alpha) D): the posterior means behind an exact D."""
    def model(x, alpha):
        a = alpha.to(F64).reshape(-1, *([1] * (x.dim() - 1)))
        d = d_model(x, alpha).to(F64)
        return (x - a * d).to(x.dtype), (x + (1 - a) * d).to(x.dtype)
    return model


def paper_loop(model, x0, alphas, variant="euler", lam=0.0, seed=None):
    """The IADB loop in float64: Euler (the paper's algorithm 2), or the stochastic re-blend
    x' = a' x1_bar + (1-a') (k x0_bar + sqrt(1-k^2) xi), k = (sigma'/sigma)^(lam^2), sigma = (1-a)/a, with xi the
    Philox normals the fused op draws at step i."""
    x = x0.to(F64).clone()
    for i, (a, an) in enumerate(zip(alphas[:-1], alphas[1:])):
        d = model(x, torch.full((x.shape[0],), a, dtype=F64)).to(F64)
        if variant == "euler":
            x = x + (an - a) * d
            continue
        x1b, x0b = x + (1 - a) * d, x - a * d
        if lam == 0:
            k = 1.0
        else:
            k = 0.0 if a == 0 else ((1 - an) / an / ((1 - a) / a)) ** (lam * lam)
        xi = philox.noise_like(x, seed, i, F64)
        x = an * x1b + (1 - an) * (k * x0b + math.sqrt(max(0.0, 1 - k * k)) * xi)
    return x


def gen_noise(shape, seed, dtype=F64):
    return torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(seed)).to(dtype)


ALPHAS = [0.0, 0.07, 0.2, 0.33, 0.5, 0.71, 0.85, 0.96, 1.0]

#----------------------------------------------------------------------------
# sample_iadb against the paper's loop, and where it lands.


@pytest.mark.parametrize("shape", [(6, 2), (1, 2), (2, 1, 3, 5)], ids=str)
def test_sample_iadb_is_the_paper_loop(shape):
    """Euler, two_head (from the two posterior means) and stochastic (lam 0.7) against the float64 loop written
    here, on a finite data set; odd sample shapes use points of matching size."""
    d = math.prod(shape[1:])
    pts = PTS if d == 2 else gen_noise((3, d), 7)
    model, x0 = finite_d(pts), gen_noise(shape, 1)
    want = paper_loop(model, x0, ALPHAS)
    torch.testing.assert_close(sample_iadb(model, x0, ALPHAS, backend=REF), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sample_iadb(two_heads(model), x0, ALPHAS, "two_head"), want, rtol=1e-12, atol=1e-12)
    seed = torch.tensor([5])
    got = sample_iadb(model, x0, ALPHAS, "stochastic", lam=0.7, seed=5)
    torch.testing.assert_close(got, paper_loop(model, x0, ALPHAS, "stochastic", 0.7, seed), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", ["euler", "stochastic"])
def test_exact_d_lands_on_the_data(variant):
    """From N(0, I) noise with the exact D, 128 uniform steps (the paper's count): every sample ends on a data point
    and the point masses are the weights within 5 binomial standard errors plus the O(1/N) discretisation bias
    (measured 0.003 at N = 128, 0.014 at N = 8; 1/N allowed)."""
    n, steps = 20000, 128
    y = sample_iadb(finite_d(), gen_noise((n, 2), 2), steps=steps, variant=variant, seed=3)
    dist = torch.cdist(y, PTS)
    assert float(dist.min(1).values.max()) <= 1e-9
    mass = dist.argmin(1).bincount(minlength=3).to(F64) / n
    tol = 5 * (WEIGHTS * (1 - WEIGHTS) / n).sqrt() + 1.0 / steps
    assert ((mass - WEIGHTS).abs() <= tol).all(), (mass, WEIGHTS)


def test_posterior_mean_limits_through_the_callback():
    """x1_bar = x + (1-alpha) D reaches the callback and trajectory: at alpha = 0 it is the data mean for any x
    (E[x1 | x_0] = E[x1]), and the last step (alpha' = 1) returns it."""
    seen = []
    y, traj = sample_iadb(finite_d(), gen_noise((5, 2), 4), steps=6, record=True,
                          callback=lambda info: seen.append(info["denoised"]))
    torch.testing.assert_close(seen[0], (WEIGHTS @ PTS).expand(5, 2), rtol=1e-12, atol=1e-12)
    assert torch.equal(traj["denoised"][-1], y) and torch.equal(seen[-1], y)


def _gaussian_d(mu, s):
    """Exact D for x1 ~ N(mu, s^2) per element: D = mu + (a s^2 - (1-a)) / V (x - a mu), V = (1-a)^2 + a^2 s^2."""
    def model(x, alpha):
        a = alpha.to(F64).reshape(-1, *([1] * (x.dim() - 1)))
        v = (1 - a) ** 2 + a * a * s * s
        return (mu + (a * s * s - (1 - a)) / v * (x.to(F64) - a * mu)).to(x.dtype)
    return model


def _gaussian_law(mu, s, alphas, lam=None):
    """(mean, var) of the output from x0 ~ N(0, 1): Euler (lam None) or the stochastic step, both affine in x."""
    m, var = 0.0, 1.0
    for a, an in zip(alphas[:-1], alphas[1:]):
        c = (a * s * s - (1 - a)) / ((1 - a) ** 2 + a * a * s * s)  # D = c x + e
        e = mu - c * a * mu
        if lam is None:
            gain, shift, noise = 1 + (an - a) * c, (an - a) * e, 0.0
        else:
            k = 0.0 if a == 0 else ((1 - an) / an / ((1 - a) / a)) ** (lam * lam)
            # x' = an (x + (1-a) D) + (1-an) k (x - a D) + (1-an) sqrt(1-k^2) xi
            ca, cd = an + (1 - an) * k, an * (1 - a) - (1 - an) * k * a
            gain, shift, noise = ca + cd * c, cd * e, (1 - an) ** 2 * (1 - k * k)
        m, var = gain * m + shift, gain * gain * var + noise
    return m, var


def test_gaussian_data_exact_law_and_its_limit():
    """Gaussian data: Euler is affine, so its output law is exact (read off sample_iadb at x0 = 0 and 1 in float64)
    and must equal the recursion written here; it tends to N(mu, s^2) at first order. The stochastic variant's
    Monte Carlo moments match its exact law within 5 standard errors."""
    mu, s = 0.7, 0.3
    model, errs = _gaussian_d(mu, s), []
    for steps in (16, 64):
        alphas = [k / steps for k in range(steps + 1)]
        out = sample_iadb(model, torch.tensor([[0.0], [1.0]], dtype=F64), steps=steps)
        q, p = float(out[0]), float(out[1] - out[0])
        m, var = _gaussian_law(mu, s, alphas)
        assert abs(q - m) <= 1e-12 and abs(p * p - var) <= 1e-12
        errs.append(abs(m - mu) + abs(math.sqrt(var) - s))
    assert errs[1] <= errs[0] / 3 and errs[1] <= 0.01, errs
    n, steps = 40000, 32
    y = sample_iadb(model, gen_noise((n, 1), 8), steps=steps, variant="stochastic", lam=1.0, seed=9)
    m, var = _gaussian_law(mu, s, [k / steps for k in range(steps + 1)], lam=1.0)
    assert abs(float(y.mean()) - m) <= 5 * math.sqrt(var / n)
    assert abs(float(y.var()) - var) <= 5 * var * math.sqrt(2 / n)

#----------------------------------------------------------------------------
# Blend / deblend ops: round trips.


@pytest.mark.parametrize("backend", usable_backends("cpu"))
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=str)
def test_blend_then_deblend_round_trips(backend, dtype):
    """x_alpha = iadb_blend(x0, x1, alpha) with target D = x1 - x0; one Euler deblend to alpha' (forwards, to 1,
    back to 0) is iadb_blend at alpha'; the two-head step from (x0, x1) is too. float64 truth, dtype rule."""
    x0, x1 = gen_noise((3, 5, 7), 10, dtype), gen_noise((3, 5, 7), 11, dtype)
    d = torch.empty_like(x0)
    a = 0.3
    xa = iadb_blend(x0, x1, torch.full((3,), a, dtype=F64), target_out=d, backend=backend)
    for an in (0.8, 1.0, 0.0):
        want = iadb_blend(x0.to(F64), x1.to(F64), torch.full((3,), an, dtype=F64))
        eager = iadb_blend(x0, x1, torch.full((3,), an, dtype=F64), backend=REF)
        assert_matches_reference(iadb_deblend(xa, d, a, an, backend=backend), want, eager, f"deblend to {an}")
        assert_matches_reference(iadb_deblend_two_head(x0, x1, an, backend=backend), want, eager, f"two-head {an}")


def test_single_point_trajectory_is_the_blend():
    """Data a single point x1: D = x1 - x0 along the straight line, so the recorded states are iadb_blend(x0, x1, a_k)
    and the output is x1 (float64, any schedule)."""
    x1, x0 = gen_noise((1, 4), 12)[0], gen_noise((3, 4), 13)
    model = finite_d(x1[None], torch.ones(1, dtype=F64))
    y, traj = sample_iadb(model, x0, ALPHAS, record=True)
    for k, a in enumerate(ALPHAS):
        want = iadb_blend(x0, x1.expand(3, 4), torch.full((3,), a, dtype=F64))
        torch.testing.assert_close(traj["x"][k], want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, x1.expand(3, 4), rtol=1e-12, atol=1e-12)


def test_deblend_errors_name_the_argument():
    x, d = torch.zeros(2, 3), torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"d: expected shape \(2, 3\) \(that of x\)"):
        iadb_deblend(x, d[:, :2], 0.2, 0.5)
    with pytest.raises(ValueError, match="alpha_next: expected a finite number"):
        iadb_deblend(x, d, 0.2, float("nan"))
    with pytest.raises(ValueError, match="alpha: expected a finite number"):
        iadb_deblend(x, d, None, 0.5)
    with pytest.raises(ValueError, match=r"x0_bar: expected shape \(2, 3\) \(that of x1_bar\)"):
        iadb_deblend_two_head(torch.zeros(2, 2), x, 0.5)
    with pytest.raises(TypeError, match="x0_bar: expected dtype torch.float32 .that of x1_bar."):
        iadb_deblend_two_head(x.double(), x, 0.5)

#----------------------------------------------------------------------------
# dtypes, shapes, seeds, graph mode on the CPU.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("variant,lam", [("euler", None), ("stochastic", 1.0), ("two_head", 0.5)])
def test_dtypes_on_an_awkward_batch_of_one(dtype, variant, lam):
    """(1, 3, 5, 7) non-contiguous noise: the output keeps x0's dtype and shape, the model sees alpha in float32 at
    least, and the fused result is within the dtype rule of the float64 run (eager: reference backend at dtype)."""
    shape = (1, 3, 5, 7)
    d_model = finite_d(gen_noise((3, 105), 14))
    model = two_heads(d_model) if variant == "two_head" else d_model
    alpha_dtypes = []

    def spy(x, alpha):
        alpha_dtypes.append(alpha.dtype)
        return model(x, alpha)
    x0 = noncontiguous(gen_noise(shape, 15, dtype))
    kw = dict(steps=5, variant=variant, lam=lam, seed=2)
    got = sample_iadb(spy, x0, **kw)
    assert got.shape == shape and got.dtype == dtype
    assert set(alpha_dtypes) == {torch.float32}
    ref = sample_iadb(model, x0.to(F64), **kw, backend=REF)
    assert_matches_reference(got, ref, sample_iadb(model, x0, **kw, backend=REF), f"{variant} {dtype}")


def test_seeds():
    """Same seed, same output; per-sample seeds do not depend on the rest of the batch; seed=None follows torch's
    global generator; different seeds differ."""
    model, x0 = finite_d(), gen_noise((6, 2), 16)
    kw = dict(steps=6, variant="stochastic")
    assert torch.equal(sample_iadb(model, x0, **kw, seed=4), sample_iadb(model, x0, **kw, seed=4))
    assert not torch.equal(sample_iadb(model, x0, **kw, seed=4), sample_iadb(model, x0, **kw, seed=5))
    per = torch.arange(10, 16)
    assert torch.equal(sample_iadb(model, x0, **kw, seed=per)[2:4], sample_iadb(model, x0[2:4], **kw, seed=per[2:4]))
    torch.manual_seed(0)
    a = sample_iadb(model, x0, **kw, seed=None)
    torch.manual_seed(0)
    assert torch.equal(a, sample_iadb(model, x0, **kw, seed=None))


def test_graph_mode_on_cpu():
    """graph=True refuses a CPU x0 naming CUDA; "auto" warns once (GraphFallbackWarning) and runs the eager loop."""
    model, x0 = finite_d(), gen_noise((3, 2), 17)
    with pytest.raises(ValueError, match=r"^x0: CUDA graphs need a CUDA device, got cpu \(graph=True\)"):
        sample_iadb(model, x0, steps=4, graph=True)
    graphs.clear()  # forgets earlier fallback warnings of this process
    with pytest.warns(graphs.GraphFallbackWarning, match="runs eager"):
        got = sample_iadb(model, x0, steps=4, variant="stochastic", seed=1, graph="auto")
    assert torch.equal(got, sample_iadb(model, x0, steps=4, variant="stochastic", seed=1))

#----------------------------------------------------------------------------
# Level 1: the diffusers-style IADBScheduler in a diffusers loop.


@pytest.mark.parametrize("variant", ["euler", "stochastic"])
def test_scheduler_loop_is_the_paper_loop(variant):
    """set_timesteps / step() as a diffusers pipeline runs them (timesteps alpha * 1000 in float32, noise from a
    torch generator): the same states as the paper's loop fed the same float32 alphas and diffusers' draws;
    pred_original_sample = x + (1 - alpha) D."""
    steps, scale, lam = 10, 1000.0, 0.6
    sched = IADBScheduler(variant=variant, lam=lam, timestep_scale=scale)
    sched.set_timesteps(steps)
    assert len(sched) == steps and sched.timesteps.dtype == torch.float32 and sched.init_noise_sigma == 1.0
    model, x0 = finite_d(), gen_noise((5, 2), 18)
    x, ref, gen, gen_ref = x0.clone(), x0.clone(), torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for i, t in enumerate(sched.timesteps):
        alpha = (t.to(F64) / scale).expand(5)
        d = model(sched.scale_model_input(x, t), alpha)
        out = sched.step(d, t, x, generator=gen)
        torch.testing.assert_close(out.pred_original_sample, x + (1 - alpha[:, None]) * d, rtol=1e-13, atol=1e-13)
        x = out.prev_sample
        a, an = float(alpha[0]), (i + 1) / steps
        dr = model(ref, alpha)
        if variant == "euler":
            ref = ref + (an - a) * dr
        else:
            k = 0.0 if a == 0 else ((1 - an) / an / ((1 - a) / a)) ** (lam * lam)
            xi = torch.randn(ref.shape, generator=gen_ref, dtype=F64)
            ref = an * (ref + (1 - a) * dr) + (1 - an) * (k * (ref - a * dr) + math.sqrt(1 - k * k) * xi)
        torch.testing.assert_close(x, ref, rtol=1e-12, atol=1e-12)


def test_scheduler_errors_name_the_argument():
    with pytest.raises(ValueError, match="num_inference_steps: expected an int >= 1, got 0"):
        IADBScheduler().set_timesteps(0)
    with pytest.raises(ValueError, match="variant"):
        IADBScheduler(variant="two_head")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # add_noise before set_timesteps needs no schedule
        x1, x0 = gen_noise((2, 3), 19), gen_noise((2, 3), 20)
        got = IADBScheduler(timestep_scale=1000.0).add_noise(x1, x0, torch.tensor([250.0, 1000.0]))
    torch.testing.assert_close(got, torch.stack([0.75 * x0[0] + 0.25 * x1[0], x1[1]]), rtol=1e-15, atol=1e-15)
