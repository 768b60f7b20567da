"""``diffkern.sample_iadb``: IADB (Heitz et al. 2023) in its own coordinates (``math-samplers.md`` section 1).

The network of the tests is exact: the posterior means of a Gaussian mixture mapped to IADB coordinates
(``x_alpha = alpha*x_VE``, ``sigma = (1-alpha)/alpha``; at alpha = 0 the data mean and the noise itself).
"""
import pytest
import torch
from scipy import stats

from diffkern import analytic, schedules
from diffkern.sampling import sample, sample_iadb
from diffkern.testing import assert_matches_reference, usable_backends

REF = "reference"


def gmm3():
    return analytic.GaussianMixture([1.0, 2.0, 1.5], [[-1.0, 0.5], [1.0, 1.0], [0.3, -1.2]], [0.3, 0.5, 0.4])


def posterior_means(gmm, x, alpha):
    """(x0_bar, x1_bar) = (E[noise | x_alpha], E[data | x_alpha]) for x_alpha = (1-alpha)*noise + alpha*data."""
    a = alpha.to(torch.float64)[:, None]
    safe = torch.where(a > 0, a, torch.ones_like(a))
    x64 = x.double()
    x1 = torch.where(a > 0, gmm.denoise(x64 / safe, ((1 - safe) / safe)[:, 0]), gmm.mean.expand_as(x64))
    x0 = (x64 - a * x1) / (1 - a)
    return x0.to(x.dtype), x1.to(x.dtype)


def d_model(gmm):
    def model(x, alpha):
        x0, x1 = posterior_means(gmm, x, alpha)
        return x1 - x0
    return model


def two_head_model(gmm):
    return lambda x, alpha: posterior_means(gmm, x, alpha)


def noise(n, seed=0, dim=2):
    return torch.randn(n, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _close64(a, b):
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

#----------------------------------------------------------------------------
# Section 1.5 / 7 identities (float64): IADB steps are DDIM / lambda-family steps on sigma = (1-alpha)/alpha.

ALPHAS = torch.tensor([0.05, 0.1, 0.18, 0.3, 0.45, 0.6, 0.75, 0.87, 0.95, 1.0], dtype=torch.float64)


def test_iadb_euler_is_ddim():
    gmm, x_alpha = gmm3(), noise(16) * ALPHAS[0]
    y = sample_iadb(d_model(gmm), x_alpha, ALPHAS, backend=REF)
    sigmas = schedules.iadb_alpha_to_sigma(ALPHAS)
    _close64(y, sample(gmm, x_alpha / ALPHAS[0], sigmas, "euler", backend=REF))  # x_VE = x_alpha at alpha = 1


@pytest.mark.parametrize("lam", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("variant", ["stochastic", "two_head"])
def test_stochastic_iadb_is_lambda_exponential_integrator(variant, lam):
    """x' = alpha'*x1_bar + (1-alpha')*(k*x0_bar + sqrt(1-k^2)*xi) is the sde exponential step (same xi)."""
    gmm, x_alpha = gmm3(), noise(16) * ALPHAS[0]
    model = d_model(gmm) if variant == "stochastic" else two_head_model(gmm)
    y = sample_iadb(model, x_alpha, ALPHAS, variant=variant, lam=lam, backend=REF, seed=6)
    sigmas = schedules.iadb_alpha_to_sigma(ALPHAS)
    _close64(y, sample(gmm, x_alpha / ALPHAS[0], sigmas, "sde", lam=lam, backend=REF, seed=6))


def test_two_head_equals_euler_for_consistent_heads():
    """With x = (1-alpha)*x0_bar + alpha*x1_bar (true posterior means) variant (a) is variant (b)."""
    gmm, x0 = gmm3(), noise(16)
    _close64(sample_iadb(two_head_model(gmm), x0, variant="two_head", steps=20, backend=REF),
             sample_iadb(d_model(gmm), x0, steps=20, backend=REF))

#----------------------------------------------------------------------------
# From pure noise (alpha = 0, uniform alphas) to the mixture.


@pytest.mark.parametrize("variant,lam,steps", [("euler", None, 128), ("stochastic", 1.0, 100),
                                               ("two_head", 0.5, 100)])
def test_iadb_reproduces_mixture(variant, lam, steps):
    gmm, n = gmm3(), 2000
    gen = torch.Generator().manual_seed(1)
    exact = gmm.sample(n, generator=gen)
    model = two_head_model(gmm) if variant == "two_head" else d_model(gmm)
    y = sample_iadb(model, noise(n, seed=2), variant=variant, lam=lam, steps=steps, backend=REF, seed=3)
    dirs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    for d in dirs / dirs.norm(dim=1, keepdim=True):
        p = stats.ks_2samp((y @ d).numpy(), (exact @ d).numpy()).pvalue
        assert p > 1e-3, f"{variant}: KS p-value {p:.2e} on projection {d.tolist()}"
    # 5 standard errors of the mean of n samples.
    assert ((y.mean(0) - gmm.mean).abs() <= 5 * (gmm.covariance.diag() / n).sqrt()).all()

#----------------------------------------------------------------------------
# Backends, trajectories, errors.

VARIANTS = [("euler", None), ("two_head", 0.0), ("two_head", 0.8), ("stochastic", 1.0)]


@pytest.mark.parametrize("backend", usable_backends("cpu"))
@pytest.mark.parametrize("variant,lam", VARIANTS)
def test_every_backend_matches_reference(backend, variant, lam):
    gmm, x0 = gmm3(), noise(3, seed=5)
    model = two_head_model(gmm) if variant == "two_head" else d_model(gmm)
    kw = dict(variant=variant, lam=lam, steps=6, seed=9)
    ref64 = sample_iadb(model, x0, backend=REF, **kw)
    eager = sample_iadb(model, x0.float(), backend=REF, **kw)
    assert_matches_reference(sample_iadb(model, x0.float(), backend=backend, **kw), ref64, eager,
                             f"iadb {variant} lam={lam} [{backend}]")
    assert_matches_reference(sample_iadb(model, x0, backend=backend, **kw), ref64, ref64,
                             f"iadb {variant} lam={lam} [{backend}] float64")


@pytest.mark.parametrize("variant", ["euler", "two_head"])
def test_record_and_callback(variant):
    gmm, x0 = gmm3(), noise(4)
    model = two_head_model(gmm) if variant == "two_head" else d_model(gmm)
    seen = []
    y, traj = sample_iadb(model, x0, variant=variant, steps=5, backend=REF, record=True,
                          callback=lambda d: seen.append({k: (v.clone() if torch.is_tensor(v) else v)
                                                          for k, v in d.items()}))
    assert traj["x"].shape == (6, 4, 2) and traj["denoised"].shape == (5, 4, 2)
    assert torch.equal(traj["x"][0], x0) and torch.equal(traj["x"][-1], y)
    assert [d["i"] for d in seen] == list(range(5))
    assert [(d["alpha"], d["alpha_next"]) for d in seen] == [(k / 5, (k + 1) / 5) for k in range(5)]
    for i, d in enumerate(seen):
        torch.testing.assert_close(d["x"], traj["x"][i], rtol=0, atol=0)
        x1 = posterior_means(gmm, d["x"], torch.full((4,), d["alpha"], dtype=torch.float64))[1]
        _close64(traj["denoised"][i], x1)  # the data estimate x1_bar: Chen et al.'s denoising trajectory
        _close64(d["denoised"], x1)
    _close64(traj["denoised"][-1], y)  # the last step (alpha' = 1) lands on x1_bar


def test_default_schedule_is_uniform_and_input_untouched():
    gmm, x0 = gmm3(), noise(4)
    before = x0.clone()
    y = sample_iadb(d_model(gmm), x0, steps=7, backend=REF)
    assert torch.equal(x0, before)
    _close64(y, sample_iadb(d_model(gmm), x0, schedules.iadb_alphas(7), backend=REF))


def test_list_alphas_are_read_in_float64():
    # a Python list must not be rounded through torch's float32 default dtype (0.99999999 -> 1.0 broke monotonicity)
    from diffkern.sampling import iadb_alphas
    assert iadb_alphas([0.0, 0.1, 0.99999999, 1.0], None) == [0.0, 0.1, 0.99999999, 1.0]


def test_errors():
    gmm, x0 = gmm3(), noise(3)
    with pytest.raises(ValueError, match="variant: expected one of"):
        sample_iadb(d_model(gmm), x0, variant="rk2")
    with pytest.raises(ValueError, match="lam: the euler variant is deterministic"):
        sample_iadb(d_model(gmm), x0, lam=1.0)
    with pytest.raises(ValueError, match="alphas: must be strictly increasing"):
        sample_iadb(d_model(gmm), x0, [0.0, 0.5, 0.5, 1.0])
    with pytest.raises(ValueError, match=r"alphas: values must be finite and in \[0, 1\]"):
        sample_iadb(d_model(gmm), x0, [0.0, 1.5])
    with pytest.raises(ValueError, match="steps: expected an int >= 1"):
        sample_iadb(d_model(gmm), x0, steps=0)
    with pytest.raises(TypeError, match=r"model: the two_head variant expects the model to return \(x0_bar, x1_bar\)"):
        sample_iadb(d_model(gmm), x0, variant="two_head", backend=REF)
    with pytest.raises(ValueError, match="model: output must have the shape of x"):
        sample_iadb(lambda x, a: x[:, :1], x0, backend=REF)
    with pytest.raises(ValueError, match=r"lam: expected a finite value in \[0.0, inf\]"):
        sample_iadb(d_model(gmm), x0, variant="stochastic", lam=-1.0)
