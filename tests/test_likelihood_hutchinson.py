"""ode_log_likelihood(trace="hutchinson"): Hutchinson's divergence estimate against exact answers.

Oracles, all independent of the estimator:
- the exact-trace ODE estimate (autograd, d VJPs) and the closed-form density of the noised model;
- for a Gaussian ``N(mu, C)`` the denoiser is linear, ``D = mu + K(sigma)(z - mu)`` with ``K = C(C + sigma^2 I)^-1``,
  so the Jacobian does not depend on z and the probe term of the logdet is exactly ``eps^T M eps`` with
  ``M = int K ds = Q diag(m) Q^T`` (``C = Q diag(lam) Q^T``, s = ln sigma)::

      m_i = (s_max - s_min) - ln((lam_i + sigma_max^2)/(lam_i + sigma_min^2))/2

  whose variance is the textbook ``2*||M||_F^2`` (Gaussian probes) or ``2*(||M||_F^2 - sum_i M_ii^2)``
  (Rademacher), divided by the number of probes: zero for Rademacher probes on a diagonal C.
Each call's rows get independent probes, so one call on R copies of a point gives R independent estimates.
"""
import math

import pytest
import torch

from diffkern import analytic
from diffkern.likelihood import ode_log_likelihood

F64 = torch.float64
SMIN, SMAX = 1e-2, 20.0
# The 2-component mixture of tests/test_likelihood_exact.py: its Jacobian is not diagonal between the modes.
MIX = analytic.GaussianMixture(torch.tensor([0.3, 0.7], dtype=F64), torch.tensor([[-1.0, 0.5], [1.2, -0.4]], dtype=F64),
                               torch.tensor([[0.4, 0.6], [0.5, 0.3]], dtype=F64))
MIX_POINTS = torch.tensor([[-0.9, 0.4], [1.0, -0.2], [0.1, 0.0]], dtype=F64)
MU = torch.tensor([0.3, -0.5, 0.2], dtype=F64)
COV = torch.tensor([[0.8, 0.3, -0.2], [0.3, 0.5, 0.1], [-0.2, 0.1, 0.4]], dtype=F64)


class LinearGaussian:
    """The exact denoiser of N(mu, cov): ``D(z, sigma) = mu + (z - mu) K^T``, K = cov (cov + sigma^2 I)^-1."""

    def __init__(self, mu, cov):
        self.mu, self.cov = mu, cov

    def __call__(self, z, sigma):
        eye = torch.eye(len(self.mu), dtype=F64)
        k = torch.linalg.solve(self.cov + sigma.to(F64)[:, None, None] ** 2 * eye, self.cov)  # = K^T (cov symmetric)
        return self.mu + torch.einsum("bi,bij->bj", z - self.mu, k)

    def log_prob(self, z, sigma):
        cov = self.cov + sigma ** 2 * torch.eye(len(self.mu), dtype=F64)
        return torch.distributions.MultivariateNormal(self.mu, cov).log_prob(z)

    def path_integral(self):
        """M = int_{ln SMIN}^{ln SMAX} K(e^s) ds, (d, d)."""
        lam, q = torch.linalg.eigh(self.cov)
        m = math.log(SMAX / SMIN) - 0.5 * torch.log((lam + SMAX ** 2) / (lam + SMIN ** 2))
        return q @ torch.diag(m) @ q.T


def _hutch(model, x, seed, copies=1, **kw):
    """(copies, B) estimates: one call on ``copies`` stacked copies of x (independent probes per row)."""
    xs = x.repeat(copies, *([1] * (x.dim() - 1)))
    out = ode_log_likelihood(model, xs, sigma_min=SMIN, sigma_max=SMAX, terminal=model.log_prob, trace="hutchinson",
                             seed=seed, **kw)
    return out.reshape(copies, x.shape[0])


@pytest.mark.parametrize("probe,copies", [("rademacher", 8), ("gaussian", 96)])
def test_mixture_average_over_seeds_matches_the_exact_trace(probe, copies):
    """Unbiased: the mean over 24 seeds (each the mean of ``copies`` rows) lies within 4 standard errors (from the
    seeds' spread) of the exact-trace estimate, which itself equals the closed-form density to 1e-4. Gaussian
    probes have ~10 nats of spread per row here (the diagonal of M is ~ln(SMAX/SMIN)), hence more copies."""
    kw = {"rtol": 1e-7, "atol": 1e-7}
    exact = ode_log_likelihood(MIX, MIX_POINTS, sigma_min=SMIN, sigma_max=SMAX, terminal=MIX.log_prob, **kw)
    torch.testing.assert_close(exact, MIX.log_prob(MIX_POINTS, SMIN), rtol=0, atol=1e-4)
    per_seed = torch.stack([_hutch(MIX, MIX_POINTS, seed, copies, probe=probe, **kw).mean(0) for seed in range(24)])
    mean, se = per_seed.mean(0), per_seed.std(0) / math.sqrt(per_seed.shape[0])
    assert (se > 0).all() and (se < 0.3).all(), se  # a real spread, small enough to mean something
    assert ((mean - exact).abs() <= 4 * se).all(), (mean - exact) / se


@pytest.mark.parametrize("probe,probes", [("gaussian", 1), ("gaussian", 3), ("rademacher", 1), ("rademacher", 2)])
def test_linear_model_variance_is_the_textbook_quadratic_form(probe, probes):
    """Constant Jacobian: the rows are ``exact - (mean_k eps_k^T M eps_k - tr M)`` up to solver error (1e-7 here,
    far below the spread). Their mean is within 4 standard errors of the closed-form density and their sample
    variance within 4 standard errors of the textbook variance; that standard error is ``sqrt((m4 - v^2)/N)``
    from the rows' own fourth central moment."""
    model = LinearGaussian(MU, COV)
    x = torch.tensor([[0.9, -0.1, 0.6]], dtype=F64)
    rows = torch.cat([_hutch(model, x, seed, 1024, probe=probe, probes=probes, rtol=1e-9, atol=1e-9)[:, 0]
                      for seed in range(2)])
    n = rows.numel()
    m = model.path_integral()
    frob2, diag2 = (m ** 2).sum(), (torch.diagonal(m) ** 2).sum()
    var_true = 2 * (frob2 if probe == "gaussian" else frob2 - diag2) / probes
    exact = model.log_prob(x, SMIN)[0]
    assert abs(rows.mean() - exact) <= 4 * math.sqrt(var_true / n), (rows.mean() - exact) / math.sqrt(var_true / n)
    centred = rows - rows.mean()
    var = (centred ** 2).mean()
    se_var = math.sqrt(((centred ** 4).mean() - var ** 2) / n)
    assert abs(var - var_true) <= 4 * se_var, (var, var_true, se_var)


def test_rademacher_on_a_diagonal_jacobian_is_exact():
    """Rademacher probes and a diagonal Jacobian: eps^T J eps = sum_i eps_i^2 J_ii = tr J for every probe, so every
    seed and row gives the exact-trace result (same field values, same steps: agreement to rounding), itself
    the closed-form density to solver error. Gaussian probes on the same model do vary (a control)."""
    model = analytic.GaussianMixture([1.0], torch.tensor([[0.2, -0.4, 0.1, 0.0]], dtype=F64),
                                     torch.tensor([[0.5, 0.9, 0.3, 1.2]], dtype=F64))
    x = torch.tensor([[0.7, -1.1, 0.0, 2.0], [0.2, -0.4, 0.1, 0.0]], dtype=F64)
    exact = ode_log_likelihood(model, x, sigma_min=SMIN, sigma_max=SMAX, terminal=model.log_prob, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(exact, model.log_prob(x, SMIN), rtol=0, atol=1e-6)
    for seed in (0, 7):
        rows = _hutch(model, x, seed, 4, probes=2, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(rows, exact.expand(4, 2), rtol=0, atol=1e-10)
    gauss = _hutch(model, x, 0, 4, probe="gaussian", rtol=1e-9, atol=1e-9)
    assert (gauss.std(0) > 0.1).all(), gauss


def test_reproducible_per_seed_and_independent_per_row():
    x = MIX_POINTS[:1].repeat(4, 1)
    kw = {"sigma_min": SMIN, "sigma_max": SMAX, "rtol": 1e-5, "atol": 1e-5, "trace": "hutchinson"}
    for probe in ("rademacher", "gaussian"):
        a = ode_log_likelihood(MIX, x, seed=3, probe=probe, **kw)
        assert torch.equal(a, ode_log_likelihood(MIX, x, seed=3, probe=probe, **kw))
        assert not torch.equal(a, ode_log_likelihood(MIX, x, seed=4, probe=probe, **kw))
        assert len(set(a.tolist())) > 1, a  # identical rows, different probes
    # the default stays the deterministic exact trace, and the probe options do not touch it
    exact = ode_log_likelihood(MIX, x, sigma_min=SMIN, sigma_max=SMAX, rtol=1e-5, atol=1e-5)
    assert torch.equal(exact, ode_log_likelihood(MIX, x, sigma_min=SMIN, sigma_max=SMAX, rtol=1e-5, atol=1e-5,
                                                 trace="exact", probes=3, probe="gaussian", seed=9))


def test_image_sized_points_run():
    """3x16x16 points (768 dims > max_dim = 64): the exact trace refuses them and names the way out; Hutchinson
    runs. With an isotropic Gaussian model (diagonal Jacobian, Rademacher probes) the result is the closed-form
    density to the solver's error (rtol 1e-8 of a ~500-nat logdet); a small float64 conv denoiser gives
    finite values."""
    x = 0.5 * torch.randn(2, 3, 16, 16, dtype=F64, generator=torch.Generator().manual_seed(0))
    iso = analytic.GaussianMixture([1.0], torch.zeros(1, 768, dtype=F64), [0.5])
    with pytest.raises(ValueError, match="hutchinson"):
        ode_log_likelihood(iso, x)
    out = ode_log_likelihood(iso, x, sigma_min=SMIN, sigma_max=SMAX, terminal=iso.log_prob, trace="hutchinson",
                             rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(out, iso.log_prob(x.reshape(2, -1), SMIN), rtol=0, atol=1e-4)

    conv = torch.nn.Conv2d(3, 3, 3, padding=1, dtype=F64)
    torch.nn.init.normal_(conv.weight, std=0.05)

    def net(z, sigma):  # a smooth denoiser-shaped map: D -> z as sigma -> 0, -> conv(tanh z) as sigma grows
        c = (1 / (1 + sigma ** 2))[:, None, None, None]
        return c * z + (1 - c) * conv(torch.tanh(z))

    with torch.no_grad():  # the field re-enables grad
        res = ode_log_likelihood(net, x, sigma_min=SMIN, sigma_max=SMAX, trace="hutchinson", probe="gaussian",
                                 probes=2, seed=1, rtol=1e-5, atol=1e-5)
    assert res.shape == (2,) and torch.isfinite(res).all(), res


@pytest.mark.parametrize("kwargs,name", [({"trace": "x"}, "trace"), ({"trace": None}, "trace"),
                                         ({"probes": 0}, "probes"), ({"probes": 1.5}, "probes"),
                                         ({"probes": True}, "probes"), ({"probe": "y"}, "probe"),
                                         ({"seed": -1}, "seed"), ({"seed": 0.5}, "seed")])
def test_bad_options_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}: expected"):
        ode_log_likelihood(MIX, MIX_POINTS, trace=kwargs.pop("trace", "hutchinson"), **kwargs)
