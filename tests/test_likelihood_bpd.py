"""Bits per dimension and uniform dequantisation (``diffkern.likelihood_bpd``) against closed forms.

For 8-bit levels k, scaled data ``x = scale*k + shift`` and dequantised ``x_u = scale*(k + u) + shift``:
the raw values ``y = k + u`` have density ``p_y = p_x * scale^D``, so bpd = ``-(ln p_x + D ln scale)/(D ln 2)``.
The expected numbers are computed here another way: in raw units with scipy (the model's density written for
y directly), from the uniform density on the 256 bins, and from the discrete probability of a bin (normal CDF).
"""
import math
import re

import numpy as np
import pytest
import torch
from scipy import stats

from diffkern import analytic
from diffkern.__main__ import main
from diffkern.likelihood import bits_per_dim, dequantize, log_likelihood
from diffkern.likelihood_bpd import LEVELS

F64 = torch.float64
LN2 = math.log(2)
# (scale, shift, centred): diffusers' k/127.5 - 1, Song et al.'s 2(k + u)/256 - 1 and (k + u)/256, [0, 1], raw.
CONVENTIONS = [(2 / 255, -1.0, True), (2 / 256, -1.0, False), (1 / 256, 0.0, False), (1 / 255, 0.0, True),
               (1.0, 0.0, True)]


def _levels(shape, seed=0):
    return torch.randint(0, LEVELS, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _normal(mu, sd):
    """A float64 normal law (Python floats would give float32 parameters)."""
    return torch.distributions.Normal(torch.tensor(mu, dtype=F64), torch.tensor(sd, dtype=F64))


def _bin(x_u, k, scale, shift, centred):
    """The position of x_u in its bin, in bins: (x_u - shift)/scale - k - lo, in [0, 1) when inside."""
    return (x_u.to(F64) - shift) / scale - k.to(F64) - (-0.5 if centred else 0.0)


@pytest.mark.parametrize("scale,shift,centred", CONVENTIONS)
def test_uniform_data_under_its_dequantised_density_is_8_bits(scale, shift, centred):
    """The continuous model equal to the dequantised uniform law: density 1/(256 scale) per dimension."""
    k = _levels((5, 3, 4, 2))
    x_u = dequantize(k, scale=scale, shift=shift, seed=1, centred=centred, dtype=F64)
    lo = shift + scale * (-0.5 if centred else 0.0)
    model = torch.distributions.Uniform(torch.tensor(lo, dtype=F64), torch.tensor(lo + LEVELS * scale, dtype=F64),
                                        validate_args=True)  # raises if a dequantised point left the 256 bins
    log_p = model.log_prob(x_u).flatten(1).sum(1)
    dims = 3 * 4 * 2
    assert torch.allclose(log_p, torch.full((5,), -dims * math.log(LEVELS * scale), dtype=F64), rtol=1e-14, atol=0)
    assert torch.allclose(bits_per_dim(log_p, dims, scale=scale), torch.full((5,), 8.0, dtype=F64),
                          rtol=0, atol=1e-12)


def test_hand_values():
    # A density of 1 per unit of x: the bits come from the bin volume alone. Song et al.'s offsets: 7 and 8.
    assert bits_per_dim(0.0, 1, scale=2 / 256) == pytest.approx(7.0, abs=1e-14)
    assert bits_per_dim(0.0, 5, scale=1 / 256) == pytest.approx(8.0, abs=1e-14)
    assert bits_per_dim(0.0, 3, scale=2 / 255) == pytest.approx(6.994353436858858, abs=1e-14)  # log2(127.5)
    assert bits_per_dim(-3 * LN2, 3, scale=1.0) == pytest.approx(1.0, abs=1e-14)
    assert isinstance(bits_per_dim(0.0, 1), float)


@pytest.mark.parametrize("scale,shift,centred", CONVENTIONS)
def test_gaussian_density_matches_raw_units(scale, shift, centred):
    """ln N(x_u; mu, s^2) per dimension in x units, converted, equals -log2 of N in raw units, per dim."""
    mu, sd = shift + 100.5 * scale, 40.0 * scale  # a Gaussian over the levels, in x units
    k = _levels((6, 3, 8, 8), seed=2)
    x_u = dequantize(k, scale=scale, shift=shift, seed=3, centred=centred, dtype=F64)
    log_p = _normal(mu, sd).log_prob(x_u).flatten(1).sum(1)
    y = ((x_u - shift) / scale).flatten(1).numpy()  # the dequantised raw values k + u
    expected = -stats.norm(loc=100.5, scale=40.0).logpdf(y).sum(1) / (y.shape[1] * LN2)
    got = bits_per_dim(log_p, y.shape[1], scale=scale)
    assert got.dtype == F64 and got.shape == (6,)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=0)


def test_scale_rule_zero_one_vs_minus_one_one():
    """x' = 2x - 1 divides the density by 2^D: ln p' = ln p - D ln 2 (1 bit per dimension), same discrete bpd."""
    k = _levels((4, 48), seed=4)
    x01 = dequantize(k, scale=1 / 255, shift=0.0, seed=5, dtype=F64)
    x11 = dequantize(k, scale=2 / 255, shift=-1.0, seed=5, dtype=F64)
    assert torch.allclose(x11, 2 * x01 - 1, rtol=0, atol=1e-15)  # same seed: the same u, mapped
    mu, sd = 0.45, 0.2
    lp01 = _normal(mu, sd).log_prob(x01).sum(1)
    lp11 = _normal(2 * mu - 1, 2 * sd).log_prob(x11).sum(1)  # the same law in [-1, 1] units
    dims = 48
    assert torch.allclose(lp11, lp01 - dims * LN2, rtol=0, atol=1e-11)
    assert torch.allclose(bits_per_dim(lp01, dims, scale=1 / 255), bits_per_dim(lp11, dims, scale=2 / 255),
                          rtol=0, atol=1e-13)
    # Without the bin volume (scale 1) the two continuous densities differ by exactly 1 bit per dimension.
    assert torch.allclose(bits_per_dim(lp11, dims, scale=1.0) - bits_per_dim(lp01, dims, scale=1.0),
                          torch.ones(4, dtype=F64), rtol=0, atol=1e-13)


@pytest.mark.parametrize("centred", [True, False])
def test_dequantised_bpd_bounds_the_discrete_bpd(centred):
    """E_u of the converted Gaussian NLL (closed form, and Monte Carlo through dequantize) >= the discrete NLL.

    Per dimension, u uniform on [lo, lo + 1): E(x_u - mu)^2 = (x_k + s(lo + 1/2) - mu)^2 + s^2/12, and the
    discrete probability is P = Phi((b - mu)/sd) - Phi((a - mu)/sd) over the bin [a, b). The gap is
    ``s^2 (m - mu)^2/(24 sd^4) + O((s/sd)^4)`` nats, m the bin's centre (Taylor expansion of ln P).
    """
    scale, shift, mu, sd = 2 / 255, -1.0, 0.1, 0.5
    lo = -0.5 if centred else 0.0
    k = torch.arange(0, LEVELS, 5, dtype=torch.uint8)             # 52 levels over the whole range
    centre = (scale * (k.to(F64) + lo + 0.5) + shift).numpy()
    expected_nll = 0.5 * math.log(2 * math.pi * sd * sd) + ((centre - mu) ** 2 + scale * scale / 12) / (2 * sd * sd)
    a, b = centre - scale / 2, centre + scale / 2
    discrete_nll = -np.log(stats.norm.cdf((b - mu) / sd) - stats.norm.cdf((a - mu) / sd))
    gap = expected_nll - math.log(scale) - discrete_nll               # nats per dimension, each level
    assert (gap >= 0).all()
    lead = scale * scale * (centre - mu) ** 2 / (24 * sd ** 4)
    np.testing.assert_allclose(gap, lead, rtol=0, atol=(scale / sd) ** 4)
    dims = k.numel()
    closed = float(bits_per_dim(float(-expected_nll.sum()), dims, scale=scale))
    assert closed >= float(discrete_nll.sum() / (dims * LN2))

    n = 4000
    x_u = dequantize(k.expand(n, dims), scale=scale, shift=shift, seed=6, centred=centred, dtype=F64)
    per_row = bits_per_dim(_normal(mu, sd).log_prob(x_u).sum(1), dims, scale=scale)
    stderr = float(per_row.std()) / math.sqrt(n)
    assert abs(float(per_row.mean()) - closed) < 4 * stderr


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("centred", [True, False])
def test_noise_stays_in_its_bin_and_is_uniform(dtype, centred):
    scale, shift = 2 / 255, -1.0
    k = torch.arange(LEVELS, dtype=torch.uint8).repeat(200).reshape(50, 4, 256)
    x_u = dequantize(k, scale=scale, shift=shift, seed=7, centred=centred, dtype=dtype)
    assert x_u.dtype == dtype and x_u.shape == k.shape
    pos = _bin(x_u, k, scale, shift, centred)
    slack = 2 * torch.finfo(dtype).eps / scale  # the rounding of a value near 1 to dtype, in bins
    assert float(pos.min()) >= -slack and float(pos.max()) < 1 + slack
    if dtype == F64:
        assert float(pos.min()) >= 0 and float(pos.max()) < 1
    # Uniform on the bin: Kolmogorov-Smirnov against U[0, 1) (a fixed seed: a deterministic check).
    assert stats.kstest(pos.flatten().numpy(), "uniform").pvalue > 1e-3


def test_float_grid_input_and_reproducibility():
    k = _levels((3, 7, 5), seed=8)
    grid = (k.to(torch.float32) / 127.5 - 1)  # the diffusers mapping, float32
    from_levels = dequantize(k, seed=9)
    from_grid = dequantize(grid, seed=9)
    assert from_levels.dtype == from_grid.dtype == torch.float32
    assert torch.equal(from_levels, from_grid)
    assert torch.equal(dequantize(k, seed=9), from_levels)  # same seed, same noise
    assert not torch.equal(dequantize(k, seed=10), from_levels)
    assert torch.equal(dequantize(k, generator=torch.Generator().manual_seed(9)), from_levels)
    also = (2 * (k.to(torch.float32) / 255) - 1)  # another rounding of the same grid is accepted too
    assert torch.equal(dequantize(also, seed=9), from_levels)
    empty = dequantize(torch.empty(0, 3, dtype=torch.uint8), seed=0)
    assert empty.shape == (0, 3) and empty.dtype == torch.float32
    if torch.cuda.is_available():  # the noise is drawn on the CPU: the same points on the GPU
        on_gpu = dequantize(k.cuda(), seed=9, dtype=F64)
        assert on_gpu.device.type == "cuda"
        assert torch.allclose(on_gpu.cpu(), dequantize(k, seed=9, dtype=F64), rtol=0, atol=1e-15)


def test_composes_with_the_estimator():
    """log_likelihood at dequantised points, converted, agrees with the exact density converted the same way.

    The estimator targets ``ln p_{sigma_min}``: for N(mu, s^2) data that moves ln p by at most
    ``sigma_min^2 (1/(2 s^2) + |x - mu|^2/(2 s^4))`` per dimension (|x - mu| <= 1.1 here), i.e. 3e-6 bits."""
    mu, s, sigma_min = 0.1, 0.5, 1e-3
    gmm = analytic.GaussianMixture([1.0], torch.full((1, 4), mu, dtype=F64), [s])
    x_u = dequantize(_levels((3, 4), seed=11), seed=12, dtype=F64)
    res = log_likelihood(gmm, x_u, sigma_min=sigma_min, n_levels=32, n_samples=64, seed=0, data_mean=mu, data_std=s)
    got, exact = bits_per_dim(res.log_prob, 4), bits_per_dim(gmm.log_prob(x_u), 4)
    stderr = res.stderr / (4 * LN2)
    bias = sigma_min ** 2 * (1 / (2 * s ** 2) + 1.1 ** 2 / (2 * s ** 4)) / LN2
    assert got.shape == (3,) and ((got - exact).abs() < 4 * stderr + bias).all(), (got, exact, stderr)


@pytest.mark.parametrize("call,exc,name", [
    (lambda: bits_per_dim(0.0, 0), ValueError, "dims"),
    (lambda: bits_per_dim(0.0, 2.5), ValueError, "dims"),
    (lambda: bits_per_dim(0.0, True), ValueError, "dims"),
    (lambda: bits_per_dim(0.0, 3, scale=0.0), ValueError, "scale"),
    (lambda: bits_per_dim(0.0, 3, scale=-2 / 255), ValueError, "scale"),
    (lambda: bits_per_dim(0.0, 3, scale=float("nan")), ValueError, "scale"),
    (lambda: bits_per_dim(0.0, 3, scale=float("inf")), ValueError, "scale"),
    (lambda: bits_per_dim("1.0", 3), TypeError, "log_prob"),
    (lambda: bits_per_dim(None, 3), TypeError, "log_prob"),
    (lambda: bits_per_dim(torch.ones(2, dtype=torch.bool), 3), TypeError, "log_prob"),
    (lambda: bits_per_dim(torch.ones(2, dtype=torch.complex64), 3), TypeError, "log_prob"),
    (lambda: dequantize([1, 2, 3], seed=0), TypeError, "x"),
    (lambda: dequantize(torch.tensor([0, 256]), seed=0), ValueError, "x"),
    (lambda: dequantize(torch.tensor([-1, 3]), seed=0), ValueError, "x"),
    (lambda: dequantize(torch.tensor([True]), seed=0), TypeError, "x"),
    (lambda: dequantize(torch.zeros(3, dtype=torch.float16), seed=0), TypeError, "x"),
    (lambda: dequantize(dequantize(torch.tensor([0, 9]), seed=0), seed=0), ValueError, "x"),      # twice
    (lambda: dequantize(torch.tensor([0.5, 0.25]), seed=0), ValueError, "x"),                      # [0, 1] data
    (lambda: dequantize(torch.tensor([1.0 + 2 / 255]), seed=0), ValueError, "x"),                  # level 256
    (lambda: dequantize(torch.tensor([3]), scale=0, seed=0), ValueError, "scale"),
    (lambda: dequantize(torch.tensor([3]), shift=float("nan"), seed=0), ValueError, "shift"),
    (lambda: dequantize(torch.tensor([3]), seed=0, generator=torch.Generator()), ValueError, "seed"),
    (lambda: dequantize(torch.tensor([3]), seed=-1), ValueError, "seed"),
    (lambda: dequantize(torch.tensor([3]), seed=1.5), ValueError, "seed"),
    (lambda: dequantize(torch.tensor([3]), generator="g"), TypeError, "generator"),
    (lambda: dequantize(torch.tensor([3]), seed=0, dtype=torch.bfloat16), TypeError, "dtype"),
    (lambda: dequantize(torch.tensor([3]), seed=0, centred="yes"), TypeError, "centred"),
])
def test_bad_input_names_the_argument(call, exc, name):
    with pytest.raises(exc, match=rf"^{name}:"):
        call()

#----------------------------------------------------------------------------
# CLI: diffkern likelihood --bpd [WIDTH]


def _table(out):
    """{point: [numbers]} of the printed table (estimate, s.e., exact[, ode])."""
    rows = {}
    for line in out.splitlines()[2:]:
        point, rest = line.rsplit(")", 1)
        rows[point.strip() + ")"] = [float(v) for v in re.findall(r"-?\d+\.\d+", rest)]
    return rows


@pytest.mark.parametrize("width,value", [(None, 1.0), ("2/255", 2 / 255), ("0.5", 0.5)])
def test_cli_bpd_converts_every_column(capsys, width, value):
    argv = ["likelihood", "--points", "2,0; 0,-0.3; 1,0.5", "--samples", "8", "--levels", "16", "--ode"]
    assert main(argv) == 0
    nats = capsys.readouterr().out
    assert nats.startswith("log-likelihood (nats) under the 2-D demo mixture")  # the default is unchanged
    assert main(argv + ["--bpd"] + ([width] if width else [])) == 0
    bpd = capsys.readouterr().out
    assert bpd.startswith(f"bits per dimension (bin width {value:g};")
    assert bpd.splitlines()[1] == nats.splitlines()[1]
    nat_rows, bpd_rows = _table(nats), _table(bpd)
    assert list(nat_rows) == list(bpd_rows) and len(nat_rows) == 3
    for point, (est, se, exact, ode) in nat_rows.items():
        b_est, b_se, b_exact, b_ode = bpd_rows[point]
        tol = 0.5e-4 / (2 * LN2) + 0.5e-4 + 1e-9  # both sides printed to 4 decimals
        for nat, bit in ((est, b_est), (exact, b_exact), (ode, b_ode)):
            assert abs(bit - (-(nat / 2 + math.log(value)) / LN2)) <= tol, (point, nat, bit)
        assert abs(b_se - se / (2 * LN2)) <= tol


@pytest.mark.parametrize("width", ["0", "-1", "x", "1/0", "inf", "nan", "2/255/3"])
def test_cli_bad_bpd_width(capsys, width):
    with pytest.raises(SystemExit) as exc:
        main(["likelihood", "--points", "2,0", "--bpd", width])
    assert exc.value.code == 2
    assert "--bpd" in capsys.readouterr().err
