"""McAllester's likelihood of a point (``math-samplers.md`` 3.3).

The fused accumulation op on every usable backend against its float64 reference (the project's
tolerance rule), then the estimator against exact Gaussian-mixture log-densities (to within its
reported standard error) and against the probability-flow-ODE estimate, then the CLI.
"""
import math

import pytest
import torch

import diffkern.ops as dops
from diffkern import analytic
from diffkern.__main__ import main
from diffkern.likelihood import log_likelihood, ode_log_likelihood
from diffkern.ops.likelihood import acc_dtype, likelihood_accum_reference
from diffkern.testing import DTYPES, SHAPES, assert_matches_reference, make_tensor

F64 = torch.float64


def _id(v):
    return str(v).replace("torch.", "")

#----------------------------------------------------------------------------
# The fused op.


def _inputs(shape, dtype, *, noise="philox", per_sample=True, seed=0, contiguous=True):
    """(y, denoised, sigma, weight, acc0, keyword arguments) with every per-sample scalar random."""
    batch = shape[0]
    n = batch if per_sample and batch > 0 else 1
    gen = torch.Generator().manual_seed(seed)
    y = make_tensor(shape, dtype, seed=seed, contiguous=contiguous)
    denoised = make_tensor(shape, dtype, seed=seed + 1, scale=0.7, contiguous=contiguous)
    sigma = 0.2 + 2 * torch.rand(n, generator=gen, dtype=F64)
    weight = 0.1 + torch.rand(n, generator=gen, dtype=F64)
    kw = {"cv": torch.rand(n, generator=gen, dtype=F64), "step": 3}
    if noise == "explicit":
        kw["noise"] = make_tensor(shape, dtype, seed=seed + 2, contiguous=contiguous)
    else:
        kw["seed"] = torch.arange(n, dtype=torch.int64) * 7919 + 17 + seed
    acc0 = make_tensor((batch,), acc_dtype(dtype), seed=seed + 3)
    return y, denoised, sigma, weight, acc0, kw


def _check(backend, y, denoised, sigma, weight, acc0, what="", acc=None, **kw):
    """Run the op on ``backend`` into a copy of acc0 (or ``acc``) and compare with the reference."""
    noise = kw.get("noise")
    ref64 = likelihood_accum_reference(y.double(), denoised.double(), sigma, weight, kw.get("step", 0),
                                       cv=kw.get("cv"), noise=None if noise is None else noise.double(),
                                       seed=kw.get("seed"), acc=acc0.double())
    eager = likelihood_accum_reference(y, denoised, sigma, weight, kw.get("step", 0), cv=kw.get("cv"), noise=noise,
                                       seed=kw.get("seed"), acc=acc0)
    acc = acc0.clone() if acc is None else acc.copy_(acc0)
    assert dops.likelihood_accum(y, denoised, sigma, weight, acc, backend=backend, **kw) is acc
    assert_matches_reference(acc, ref64, eager, f"{what} [{backend}]")
    return acc


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_accum_matches_reference(cpu_backend, dtype, shape):
    *args, kw = _inputs(shape, dtype)
    _check(cpu_backend, *args, what=f"{shape} {dtype}", **kw)


@pytest.mark.parametrize("noise", ["philox", "explicit"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
def test_accum_feature_combinations(cpu_backend, noise, per_sample, dtype):
    *args, kw = _inputs((3, 2, 7, 5), dtype, noise=noise, per_sample=per_sample, seed=5)
    _check(cpu_backend, *args, what=f"noise={noise} per_sample={per_sample}", **kw)


def test_accum_noncontiguous_inputs_and_accumulator(cpu_backend):
    *args, kw = _inputs((4, 3, 9), torch.float32, contiguous=False, seed=2)
    buf = torch.full((8,), float("nan"))
    acc = _check(cpu_backend, *args, what="non-contiguous", acc=buf[::2], **kw)
    assert torch.isnan(buf[1::2]).all()  # only the view's elements were written
    assert acc.data_ptr() == buf.data_ptr()


def test_accum_is_the_eps_form_of_the_spec(cpu_backend):
    """With c = 1 the op adds ``w*sum((eps - eps_hat)^2 - eps^2)``, ``eps_hat = (y + sigma*eps - D)/sigma``:
    the spec's formula, evaluated here literally in float64."""
    y, denoised, sigma, weight, _, kw = _inputs((3, 40), F64, noise="explicit", seed=7)
    eps = kw["noise"]
    acc = dops.likelihood_accum(y, denoised, sigma, weight, torch.zeros(3, dtype=F64), noise=eps, backend=cpu_backend)
    eps_hat = (y + sigma[:, None] * eps - denoised) / sigma[:, None]
    expected = weight * ((eps - eps_hat) ** 2 - eps ** 2).sum(1)
    torch.testing.assert_close(acc, expected, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
def test_accum_draws_the_stream_of_randn(cpu_backend, per_sample):
    """Without ``noise`` the op redraws eps in-kernel: exactly ``diffkern.ops.randn(y.shape, seed, step)``."""
    y, denoised, sigma, weight, acc0, kw = _inputs((3, 5, 7), torch.float32, per_sample=per_sample, seed=3)
    eps = dops.randn(y.shape, kw["seed"], step=kw["step"], backend=cpu_backend)
    from_stream = dops.likelihood_accum(y, denoised, sigma, weight, acc0.clone(), backend=cpu_backend, **kw)
    kw_noise = {"cv": kw["cv"], "step": kw["step"], "noise": eps}
    explicit = dops.likelihood_accum(y, denoised, sigma, weight, acc0.clone(), backend=cpu_backend, **kw_noise)
    torch.testing.assert_close(from_stream, explicit)


def test_accum_per_sample_seed_independent_of_batch(cpu_backend):
    y, denoised, sigma, weight, acc0, kw = _inputs((4, 33), torch.float32, seed=4)
    full = dops.likelihood_accum(y, denoised, sigma, weight, acc0.clone(), backend=cpu_backend, **kw)
    one = dops.likelihood_accum(y[2:3], denoised[2:3], sigma[2:3], weight[2:3], acc0[2:3].clone(), cv=kw["cv"][2:3],
                                step=kw["step"], seed=kw["seed"][2:3], backend=cpu_backend)
    torch.testing.assert_close(full[2:3], one)


def _bad_cases():
    def base(**over):
        y, d, sigma, weight, acc, kw = _inputs((2, 5), torch.float32, seed=9)
        args = {"y": y, "denoised": d, "sigma": sigma, "weight": weight, "acc": acc, **kw}
        args.update(over)
        return args
    return {
        "y-0d": (lambda: base(y=torch.tensor(1.0)), "y"),
        "y-int": (lambda: base(y=torch.ones(2, 5, dtype=torch.int64)), "y"),
        "denoised-shape": (lambda: base(denoised=torch.zeros(2, 4)), "denoised"),
        "denoised-dtype": (lambda: base(denoised=torch.zeros(2, 5, dtype=F64)), "denoised"),
        "noise-shape": (lambda: base(noise=torch.zeros(2, 6)), "noise"),
        "sigma-dtype": (lambda: base(sigma=torch.ones(2)), "sigma"),
        "sigma-shape": (lambda: base(sigma=torch.ones(3, dtype=F64)), "sigma"),
        "weight-shape": (lambda: base(weight=torch.ones(2, 2, dtype=F64)), "weight"),
        "cv-dtype": (lambda: base(cv=torch.ones(1)), "cv"),
        "acc-dtype": (lambda: base(acc=torch.zeros(2, dtype=F64)), "acc"),
        "acc-shape": (lambda: base(acc=torch.zeros(3)), "acc"),
        "step-negative": (lambda: base(step=-1), "step"),
        "step-float": (lambda: base(step=1.0), "step"),
        "seed-dtype": (lambda: base(seed=torch.ones(1)), "seed"),
        "seed-shape": (lambda: base(seed=torch.ones(3, dtype=torch.int64)), "seed"),
    }


@pytest.mark.parametrize("case", sorted(_bad_cases()))
def test_accum_bad_input_raises_and_writes_nothing(cpu_backend, case):
    make, name = _bad_cases()[case]
    args = make()
    acc = args.pop("acc")
    before = acc.clone()
    with pytest.raises((TypeError, ValueError, IndexError), match=name):
        dops.likelihood_accum(args.pop("y"), args.pop("denoised"), args.pop("sigma"), args.pop("weight"), acc,
                              backend=cpu_backend, **args)
    torch.testing.assert_close(acc, before, equal_nan=True)

#----------------------------------------------------------------------------
# The estimator against exact log-densities and the probability-flow ODE.

GMM = analytic.GaussianMixture.demo_2d()
DATA_STD = math.sqrt(float(GMM.covariance.trace()) / 2)
# On two modes (std 0.1), near the wide centre component, between modes, and in the tail.
POINTS = torch.tensor([[2.0, 0.0], [1.4, 1.45], [0.0, -0.3], [1.0, 0.5], [-2.6, 0.4]])
SE_MAX = 0.1  # nats: the estimate must be sharp enough to mean something


def _assert_within(est, se, target, what, slack=0.0):
    assert (se > 0).all() and (se <= SE_MAX).all(), f"{what}: standard errors {se.tolist()}"
    z = (est - target).abs() / se
    assert ((est - target).abs() <= 4 * se + slack).all(), f"{what}: |error|/SE = {z.tolist()}"


@pytest.fixture(scope="module")
def mcallester():
    return log_likelihood(GMM, POINTS, n_levels=64, n_samples=800, seed=1, data_std=DATA_STD)


def test_estimate_matches_exact_mixture_density(mcallester):
    assert mcallester.log_prob.shape == mcallester.stderr.shape == (5,)
    assert mcallester.repeats.shape == (800, 5)
    _assert_within(mcallester.log_prob, mcallester.stderr, GMM.log_prob(POINTS.double()), "random grid")


def test_estimate_agrees_with_probability_flow_ode(mcallester):
    ode = ode_log_likelihood(GMM, POINTS, terminal=GMM.log_prob)
    # The ODE carries x to sigma_max, so it gives the density of the data noised at sigma_min (3e-5 at
    # rtol = atol = 1e-6; that density differs from ln p by 2.5e-3 at the tail point).
    torch.testing.assert_close(ode, GMM.log_prob(POINTS.double(), 1e-3), rtol=0, atol=1e-4)
    _assert_within(mcallester.log_prob, mcallester.stderr, ode, "McAllester vs ODE")


def test_fixed_grid_and_exact_terminal():
    exact = GMM.log_prob(POINTS.double())
    fixed = log_likelihood(GMM, POINTS, grid="fixed", n_levels=64, n_samples=800, seed=2, data_std=DATA_STD)
    _assert_within(fixed.log_prob, fixed.stderr, exact, "fixed grid", slack=0.01)  # midpoint-rule bias
    # sigma_max = 4 is far too small for the Gaussian terminal term; the exact one still gives ln p.
    short = log_likelihood(GMM, POINTS, sigma_max=4.0, n_levels=48, n_samples=800, seed=3, data_std=DATA_STD,
                           terminal=GMM.log_prob)
    _assert_within(short.log_prob, short.stderr, exact, "exact terminal, sigma_max = 4")


def test_estimate_measures_the_model_not_the_data():
    """A mixture with its means moved by 15%: the estimate follows the model's density and lands many
    standard errors away from the true one (so the standard errors are small enough to matter)."""
    moved = analytic.GaussianMixture(GMM.weights, GMM.means * 1.15, GMM.stds)
    pts = POINTS[:2]
    res = log_likelihood(moved, pts, n_levels=64, n_samples=800, seed=4, data_std=DATA_STD)
    _assert_within(res.log_prob, res.stderr, moved.log_prob(pts.double()), "moved mixture")
    assert ((res.log_prob - GMM.log_prob(pts.double())).abs() > 10 * res.stderr).all()


def test_image_shaped_points_in_six_dimensions():
    gen = torch.Generator().manual_seed(0)
    gmm = analytic.GaussianMixture(torch.tensor([1.0, 2.0, 1.5]), torch.randn(3, 6, generator=gen, dtype=F64),
                                   0.3 + torch.rand(3, 6, generator=gen, dtype=F64))
    pts = gmm.sample(3, generator=gen).reshape(3, 2, 3)
    res = log_likelihood(gmm, pts.float(), n_levels=64, n_samples=600, seed=5, data_std=1.2)
    _assert_within(res.log_prob, res.stderr, gmm.log_prob(pts), "6-D, (B, 2, 3) points")


def test_backends_agree_and_seed_reproduces(cpu_backend):
    kw = {"n_levels": 4, "n_samples": 3, "seed": 11, "data_std": DATA_STD}
    ref = log_likelihood(GMM, POINTS[:2], backend="reference", **kw)
    res = log_likelihood(GMM, POINTS[:2], backend=cpu_backend, **kw)
    ref64 = log_likelihood(GMM, POINTS[:2].double(), backend="reference", **kw)  # float64 arithmetic throughout
    assert_matches_reference(res.repeats, ref64.repeats, ref.repeats, f"likelihood repeats [{cpu_backend}]")
    other = log_likelihood(GMM, POINTS[:2], backend="reference", **{**kw, "seed": 12})
    assert not torch.allclose(other.repeats, ref.repeats)
    chunked = log_likelihood(GMM, POINTS[:2], backend="reference", batch_size=4, **kw)
    torch.testing.assert_close(chunked.repeats, ref.repeats)  # per-row streams: chunking changes nothing


@pytest.mark.parametrize("kwargs,name", [
    ({"sigma_min": 0.0}, "sigma_min"), ({"sigma_max": 1e-4}, "sigma_max"), ({"n_levels": 0}, "n_levels"),
    ({"n_samples": 1}, "n_samples"), ({"grid": "sobol"}, "grid"), ({"seed": -1}, "seed"),
    ({"data_std": -1.0}, "data_std"), ({"terminal": 3}, "terminal"), ({"batch_size": 0}, "batch_size"),
])
def test_estimator_bad_arguments(kwargs, name):
    with pytest.raises((TypeError, ValueError), match=name):
        log_likelihood(GMM, POINTS, **kwargs)


def test_estimator_bad_points_and_model():
    with pytest.raises(ValueError, match="x"):
        log_likelihood(GMM, torch.zeros(3))
    with pytest.raises(TypeError, match="x"):
        log_likelihood(GMM, torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="model"):
        log_likelihood("gmm", POINTS)
    with pytest.raises(ValueError, match="dimensions"):
        ode_log_likelihood(GMM, torch.zeros(2, 65))


def test_ode_converging_on_its_last_allowed_step_and_empty_batch():
    """Regression: a run that reached sigma_max on step max_steps raised 'no convergence', and an
    empty batch failed in reshape (log_likelihood returns empty results for it)."""
    calls = []

    def counted(x, sigma):
        calls.append(1)
        return GMM(x, sigma)

    loose = {"rtol": 1e3, "atol": 1e3}  # every step accepted: the step count is deterministic
    first = ode_log_likelihood(counted, POINTS[:1], **loose)
    steps = (len(calls) - 1) // 6  # one first-stage call, then six per step (FSAL)
    torch.testing.assert_close(ode_log_likelihood(GMM, POINTS[:1], max_steps=steps, **loose), first)
    with pytest.raises(RuntimeError, match="max_steps"):
        ode_log_likelihood(GMM, POINTS[:1], max_steps=steps - 1, **loose)
    assert ode_log_likelihood(GMM, POINTS[:0]).shape == (0,)

#----------------------------------------------------------------------------
# The command line.


def test_cli_points(capsys):
    assert main(["likelihood", "--points", "2,0; 0,-0.3", "--samples", "64", "--levels", "32"]) == 0
    out = capsys.readouterr().out
    assert out.count("+-") == 2 and "exact" in out and "(2, 0)" in out


@pytest.mark.parametrize("suffix", [".npy", ".csv", ".pt"])
def test_cli_reads_point_files(tmp_path, capsys, suffix):
    import numpy as np

    pts = np.array([[2.0, 0.0], [0.5, 0.5], [-1.0, 1.0]])
    path = tmp_path / f"points{suffix}"
    if suffix == ".npy":
        np.save(path, pts)
    elif suffix == ".csv":
        np.savetxt(path, pts, delimiter=",")
    else:
        torch.save(torch.from_numpy(pts), path)
    assert main(["likelihood", "--file", str(path), "--samples", "16", "--levels", "8", "--ode"]) == 0
    out = capsys.readouterr().out
    assert out.count("+-") == 3 and "ode" in out


@pytest.mark.parametrize("argv,needle", [
    (["likelihood"], "one of them"),
    (["likelihood", "--points", "1,2;3"], "--points"),
    (["likelihood", "--points", "a,b"], "--points"),
    (["likelihood", "--points", "1,2", "--samples", "1"], "--samples"),
    (["likelihood", "--points", "1,2", "--levels", "0"], "--levels"),
    (["likelihood", "--points", "1,2,3"], "2-D"),
    (["likelihood", "--file", "/nonexistent/points.npy"], "points.npy"),
    (["likelihood", "--points", "1,2", "--grid", "sobol"], "--grid"),
    (["likelihood", "--points", "1,2", "--file", "x.npy"], "one of them"),
])
def test_cli_bad_arguments(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
