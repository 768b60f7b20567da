"""The built-in digits model: data split, shipped weights, training determinism, the quality metric,
and that samples from the shipped weights are measurably digits."""
import os

import pytest
import torch

pytest.importorskip("sklearn")

from diffkern import quality, train  # noqa: E402
from diffkern.models import builtin  # noqa: E402
from diffkern.models.unet import TinyUNet  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return builtin.load_builtin()


@pytest.fixture(scope="module")
def scorer():
    return quality.Scorer()

#----------------------------------------------------------------------------
# Data.


def test_digits_split_is_fixed_and_disjoint():
    xt, yt = builtin.digits("train")
    xh, yh = builtin.digits("heldout")
    xa, _ = builtin.digits("all")
    assert xt.shape == (1497, 1, 16, 16) and xh.shape == (300, 1, 16, 16) and xa.shape == (1797, 1, 16, 16)
    assert xt.dtype == torch.float32 and yt.dtype == torch.int64
    assert float(xa.min()) >= -1 and float(xa.max()) <= 1
    torch.testing.assert_close(xh, xa[::6])
    torch.testing.assert_close(xt, xa[torch.arange(1797) % 6 != 0])
    assert set(yh.tolist()) == set(range(10)) and set(yt.tolist()) == set(range(10))


def test_digits_bad_split():
    with pytest.raises(ValueError, match="split"):
        builtin.digits("test")

#----------------------------------------------------------------------------
# Shipped weights.


def test_shipped_files_are_small():
    for path in (builtin.WEIGHTS, quality.CLASSIFIER):
        assert os.path.isfile(path), path
        assert os.path.getsize(path) < 4 * 2 ** 20


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_builtin_denoiser_shape_dtype(dtype):
    model = builtin.load_builtin(dtype=dtype)
    x = torch.randn(3, *builtin.IMAGE_SHAPE, dtype=dtype)
    for sigma in (0.5, torch.tensor([0.1, 1.0, 10.0], dtype=dtype), torch.tensor(2.0)):
        d = model(x, sigma)
        assert d.shape == x.shape and d.dtype == dtype
        assert torch.isfinite(d).all()
    assert model.info["steps"] >= 1 and model.sigma_data > 0


def test_builtin_denoiser_denoises(model):
    # At every noise level the trained D beats the best constant guesses: the noisy input itself
    # (error sigma^2 per pixel) and the data mean (error = the data variance).
    y, _ = builtin.digits("heldout")
    gen = torch.Generator().manual_seed(0)
    var = float(y.var())
    for sigma in (0.05, 0.3, 1.0, 5.0):
        noisy = y + sigma * torch.randn(y.shape, generator=gen)
        mse = float((model(noisy, sigma) - y).square().mean())
        assert mse < 0.5 * min(sigma ** 2, var), (sigma, mse)


def test_save_load_roundtrip(tmp_path, model):
    path = str(tmp_path / "w.safetensors")
    builtin.save_denoiser(model, path, {"note": "copy"})
    again = builtin.load_denoiser(path)
    x = torch.randn(2, *builtin.IMAGE_SHAPE)
    torch.testing.assert_close(again(x, 0.7), model(x, 0.7), rtol=0, atol=0)
    assert again.info == {"note": "copy"}
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights"):
        builtin.load_denoiser(str(tmp_path / "missing.safetensors"))
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="config"):
        builtin.load_denoiser(str(tmp_path / "plain.safetensors"))

#----------------------------------------------------------------------------
# Training.


def _state(model):
    return {k: v.clone() for k, v in model.model.state_dict().items()}


def test_training_is_deterministic_given_the_seed():
    kw = dict(batch=8, widths=(8, 16, 16), warmup=1)
    a = _state(train.train_denoiser(3, seed=1, **kw))
    before = torch.random.get_rng_state()
    b = _state(train.train_denoiser(3, seed=1, **kw))
    assert torch.equal(before, torch.random.get_rng_state())  # the caller's global RNG is untouched
    c = _state(train.train_denoiser(3, seed=2, **kw))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def _heldout_errors(model):
    y, _ = builtin.digits("heldout")
    gen = torch.Generator().manual_seed(0)
    errs = []
    for sigma in (0.2, 1.0, 5.0):
        noisy = y + sigma * torch.randn(y.shape, generator=gen)
        errs.append(float((model(noisy, sigma) - y).square().mean()))
    return errs


def test_training_reduces_the_heldout_error():
    kw = dict(batch=16, widths=(8, 16, 16), warmup=5, lr=3e-3)
    before = _heldout_errors(train.train_denoiser(1, **kw))
    after = _heldout_errors(train.train_denoiser(20, **kw))
    # Measured 0.44x, 0.34x, 0.63x at sigma 0.2, 1, 5 (tiny net, 20 steps of 16 images).
    for b, a in zip(before, after):
        assert a < 0.75 * b, (before, after)


def test_unet_takes_any_channels_and_size():
    net = TinyUNet(channels=3, widths=(8, 16, 16), emb_dim=32)
    out = net(torch.randn(2, 3, 8, 12), torch.zeros(2))
    assert out.shape == (2, 3, 8, 12)


@pytest.mark.parametrize("steps,batch", [(0, 4), (4, 0)])
def test_train_bad_arguments(steps, batch):
    with pytest.raises(ValueError, match="steps, batch"):
        train.train_denoiser(steps, batch=batch)

#----------------------------------------------------------------------------
# The metric.


def _mmd2_loops(x, y, h):
    """Gretton et al. (2012) eq. 3 written out term by term, float64."""
    x, y = x.double(), y.double()

    def k(a, b):
        return float(torch.exp(-((a - b) ** 2).sum() / (2 * h * h)))

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def test_mmd2_matches_the_definition():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 5, generator=gen), torch.randn(9, 5, generator=gen) + 0.5
    h = quality.median_bandwidth(torch.cat([x, y]))
    torch.testing.assert_close(quality.mmd2(x, y, h), _mmd2_loops(x, y, h), rtol=1e-12, atol=1e-12)
    d = torch.cdist(x.double(), x.double())
    i, j = torch.triu_indices(7, 7, 1)
    assert quality.median_bandwidth(x) == pytest.approx(float(d[i, j].median()), rel=1e-12)


def test_mmd2_errors():
    with pytest.raises(ValueError, match="x"):
        quality.mmd2(torch.zeros(1, 3), torch.zeros(4, 3), 1.0)
    with pytest.raises(ValueError, match="features"):
        quality.mmd2(torch.zeros(3, 3), torch.zeros(4, 2), 1.0)
    with pytest.raises(ValueError, match="bandwidth"):
        quality.mmd2(torch.zeros(3, 3), torch.zeros(4, 3), 0.0)


def test_classifier_recognises_heldout_digits():
    clf = quality.load_classifier()
    x, y = builtin.digits("heldout")
    with torch.no_grad():
        assert float((clf(x).argmax(1) == y).float().mean()) > 0.95


def test_scorer_orders_the_baselines(scorer):
    base = {k: scorer(v) for k, v in quality.baselines(200).items()}
    for key in ("mmd_pixels", "mmd_features"):
        assert abs(base["train"][key]) < 0.2 * base["blurred"][key] < 0.2 * base["noise"][key]
    assert base["train"]["confidence"] > 0.9
    with pytest.raises(ValueError, match="samples"):
        scorer(torch.zeros(4, 1, 8, 8))

def test_nearest_train_distance():
    train, held = builtin.digits("train")[0], builtin.digits("heldout")[0]
    assert quality.nearest_train_distance(train[:20]) == pytest.approx(0.0, abs=1e-3)
    assert quality.nearest_train_distance(held) > 0.1

#----------------------------------------------------------------------------
# Acceptance: samples at 20 GE steps are digits, measured.


def test_ge_samples_score_close_to_heldout(model, scorer):
    images = builtin.generate(model, 200, "ge", 20, seed=0, gamma=2.0)
    assert images.shape == (200, *builtin.IMAGE_SHAPE) and torch.isfinite(images).all()
    s = scorer(images)
    base = {k: scorer(v) for k, v in quality.baselines(200).items()}
    for key in ("mmd_pixels", "mmd_features"):
        # Closer to the held-out digits than blurred digits or noise by a clear margin.
        assert s[key] < 0.25 * base["blurred"][key], (key, s[key], base["blurred"][key])
        assert s[key] < 0.05 * base["noise"][key], (key, s[key], base["noise"][key])
    assert s["confidence"] > 0.8
    # Not copies of the training set: about as far from it as the held-out digits are.
    assert quality.nearest_train_distance(images) > 0.7 * quality.nearest_train_distance(builtin.digits("heldout")[0])
