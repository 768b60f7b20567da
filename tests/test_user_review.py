"""Rough edges a new user hit on day one (k-diffusion / smalldiffusion habits), each fixed and pinned here:
the backend switch ``DIFFKERN_BACKEND`` honoured by ``diffkern.sample``, arguments checked and named before any
work, numpy and 0-d tensor scalars accepted where k-diffusion code passes them, and CLI errors that name the flag.
"""
import numpy as np
import pytest
import torch

import diffkern
from diffkern import analytic, samplers, schedules, wrappers
from diffkern.__main__ import main
from diffkern.ops import BackendUnavailable

GMM = analytic.GaussianMixture.demo_2d()
SIGMAS = schedules.karras(4, 0.002, 80.0)


def _x(batch=4):
    return torch.randn(batch, 2, generator=torch.Generator().manual_seed(0)) * 80


@pytest.mark.parametrize("run", [
    lambda: diffkern.sample(GMM, _x(), SIGMAS, "euler"),
    lambda: diffkern.sample_iadb(lambda x, a: -x, _x(), steps=2),
], ids=["sample", "sample_iadb"])
def test_default_backend_follows_the_environment(monkeypatch, run):
    # README: DIFFKERN_BACKEND is the backend "when a call passes none"; sample() used to pass "auto" itself.
    monkeypatch.setenv("DIFFKERN_BACKEND", "no_such_backend")
    with pytest.raises(BackendUnavailable, match="no_such_backend"):
        run()
    monkeypatch.setenv("DIFFKERN_BACKEND", "reference")
    assert torch.isfinite(run()).all()


def test_explicit_auto_still_overrides_the_environment(monkeypatch):
    monkeypatch.setenv("DIFFKERN_BACKEND", "no_such_backend")
    assert diffkern.sample(GMM, _x(), SIGMAS, "euler", backend="auto").shape == (4, 2)


@pytest.mark.parametrize("call", [
    lambda model, extra: diffkern.sample(model, _x(), SIGMAS, "euler", extra_args=extra),
    lambda model, extra: samplers.sample_heun(model, _x(), SIGMAS, extra_args=extra),
    lambda model, extra: diffkern.sample_iadb(model, _x(), steps=2, extra_args=extra),
], ids=["sample", "sample_heun", "sample_iadb"])
def test_model_and_extra_args_are_checked_up_front(call):
    with pytest.raises(TypeError, match=r"model: expected a callable model\(x, sigma, \*\*extra_args\), got str"):
        call("gmm", None)
    with pytest.raises(TypeError, match="extra_args: expected a dict of keyword arguments for the model or None, "
                                        "got list"):
        call(GMM, [torch.ones(4)])
    with pytest.raises(TypeError, match=r"extra_args: keys must be str \(the model's keyword names\), got 1"):
        call(GMM, {1: torch.ones(4)})


@pytest.mark.parametrize("seed", [np.int64(3), np.uint32(3), torch.tensor(3), torch.tensor([3])])
def test_numpy_and_0d_seeds_are_the_int_seed(seed):
    ref = diffkern.sample(GMM, _x(), SIGMAS, "euler_ancestral", seed=3)
    assert torch.equal(diffkern.sample(GMM, _x(), SIGMAS, "euler_ancestral", seed=seed), ref)


def test_seed_still_refuses_floats_and_int32():
    with pytest.raises(TypeError, match="seed: expected an int or an int64 tensor, got float"):
        diffkern.sample(GMM, _x(), SIGMAS, "euler_ancestral", seed=1.5)
    with pytest.raises(TypeError, match="got a tensor of dtype torch.int32"):
        diffkern.sample(GMM, _x(), SIGMAS, "euler_ancestral", seed=torch.tensor([3], dtype=torch.int32))


def test_numpy_knobs_are_numbers():
    ref = diffkern.sample(GMM, _x(), SIGMAS, "euler_ancestral", eta=0.5)
    assert torch.equal(diffkern.sample(GMM, _x(), SIGMAS, "euler_ancestral", eta=np.float32(0.5)), ref)
    ref = diffkern.sample(GMM, _x(), SIGMAS, "ge", gamma=1.5)
    assert torch.equal(diffkern.sample(GMM, _x(), SIGMAS, "ge", gamma=np.float64(1.5)), ref)
    with pytest.raises(TypeError, match=r"eta: expected a number \(a tensor: pass .item\(\)\), got tensor"):
        diffkern.sample(GMM, _x(), SIGMAS, "euler_ancestral", eta=torch.tensor(0.5))
    with pytest.raises(TypeError, match="eta: expected a number, got 'x'"):
        diffkern.sample(GMM, _x(), SIGMAS, "euler_ancestral", eta="x")


def test_wrappers_take_numpy_scalars():
    net = lambda x, t: 0.5 * x  # noqa: E731
    a = wrappers.KarrasDenoiser(net, sigma_data=np.float32(0.5), guidance_scale=np.float64(1.0))
    b = wrappers.KarrasDenoiser(net, sigma_data=0.5)
    x = _x()
    assert torch.equal(a(x, np.float32(2.0)), b(x, 2.0))
    assert isinstance(a.sigma_data, float) and isinstance(a.guidance_scale, float)


def test_schedules_take_tensor_and_numpy_bounds():
    # k-diffusion style: get_sigmas_karras(n, model.sigma_min, model.sigma_max) with 0-d tensor bounds
    ref = schedules.karras(10, 0.002, 80.0)
    assert torch.equal(schedules.karras(10, torch.tensor(0.002, dtype=torch.float64), torch.tensor(80.0)), ref)
    assert torch.equal(schedules.loglinear(5, np.float64(0.02), np.float64(10.0)), schedules.loglinear(5, 0.02, 10.0))
    with pytest.raises(ValueError, match=r"karras: sigma_min: expected a finite number > 0, got 0.0"):
        schedules.karras(10, torch.tensor(0.0), 80.0)
    with pytest.raises(ValueError, match="karras: sigma_max: expected a finite number > 0"):
        schedules.karras(10, 0.002, torch.ones(2))


def test_sample_iadb_with_an_int_schedule_points_to_steps():
    with pytest.raises(TypeError, match="alphas: expected a schedule of N\\+1 blending values, got the int 8; "
                                        "for 8 uniform steps pass steps=8"):
        diffkern.sample_iadb(lambda x, a: -x, _x(), 8)
    with pytest.raises(ValueError, match="steps: give either alphas .* or steps .*, not both"):
        diffkern.sample_iadb(lambda x, a: -x, _x(), [0.0, 0.5, 1.0], steps=2)
    assert diffkern.sample_iadb(lambda x, a: -x, _x(), steps=3).shape == _x().shape


def test_scorer_names_samples_when_given_one_image():
    from diffkern.quality import Scorer

    with pytest.raises(ValueError, match=r"samples: expected N >= 2 images \(the unbiased MMD needs two\), got 1"):
        Scorer()(torch.zeros(1, 1, 16, 16))


def test_ode_log_likelihood_refuses_inference_mode():
    from diffkern.likelihood import ode_log_likelihood

    pts = torch.tensor([[0.0, 2.0]], dtype=torch.float64)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="outside inference_mode"):
        ode_log_likelihood(GMM, pts)
    with torch.no_grad():  # no_grad stays fine: the field re-enables grad
        assert torch.isfinite(ode_log_likelihood(GMM, pts, rtol=1e-4, atol=1e-4)).all()


def test_ode_log_likelihood_names_the_float64_requirement():
    from diffkern.likelihood import ode_log_likelihood

    net = torch.nn.Linear(2, 2)  # float32 weights: the float64 input fails inside the user's network

    with pytest.raises(RuntimeError) as info:
        ode_log_likelihood(lambda x, sigma: net(x), torch.zeros(1, 2))
    assert "a float32 network needs model.double()" in "\n".join(getattr(info.value, "__notes__", []))


@pytest.mark.parametrize("argv, message", [
    (["demo", "--method", "foo"], "diffkern demo: error: --method: unknown sampler 'foo'"),
    (["likelihood", "--points", "0,0", "--sigma-min", "1", "--sigma-max", "0.5"],
     r"diffkern likelihood: error: --sigma-min \(1.0\) must be below --sigma-max \(0.5\)"),
    (["likelihood", "--points", "0,0", "--seed", "-1"],
     r"diffkern likelihood: error: --seed: expected an int in \[0, 2\*\*31\) \(.*\), got -1"),
])
def test_cli_errors_name_the_flag(capsys, argv, message):
    import re

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert len(err.strip().splitlines()) == 1


def test_cli_demo_backend_defaults_to_the_environment(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("DIFFKERN_BACKEND", "reference")
    assert main(["demo", "--steps", "2", "--n", "50", "--out", str(tmp_path / "d.png")]) == 0
    assert "on backend reference" in capsys.readouterr().out


@pytest.mark.parametrize("argv, expected", [
    (["bench", "sampler_step", "--quick"], ["--quick", "--out", "out/bench-quick"]),
    (["bench", "--quick", "sampler_step"], ["--quick", "--out", "out/bench-quick"]),
    (["bench", "--quick", "sampler_step", "--out", "elsewhere"], ["--quick", "--out", "elsewhere"]),
    (["bench", "sampler_step", "--quick", "--out=elsewhere"], ["--quick", "--out=elsewhere"]),
    (["bench", "sampler_step"], []),  # a full run measures: the committed results folder is its default
])
def test_cli_bench_quick_never_writes_over_the_committed_results(monkeypatch, argv, expected):
    # `diffkern bench sampler_step --quick` (README) used to overwrite bench/results/<device>/ with smoke numbers.
    from diffkern.commands import bench

    seen = []

    class Part:
        @staticmethod
        def main(args):
            seen.append(args)
            return 0

    monkeypatch.setattr(bench, "load", lambda name: Part)
    assert main(argv) == 0
    assert seen == [[a.replace("out/bench-quick", bench.QUICK_OUT) for a in expected]]


def test_hold_seed_none_draws_like_sample():
    """hold_sampling.sample / graphs.sample_hold: default seed 0 (repeatable), None drawn from torch's global
    generator (so torch.manual_seed makes it repeatable), as diffkern.sample."""
    from diffkern import graphs, hold, hold_sampling

    proc = hold.HOLD(order=2)

    def net(z, t):
        return torch.zeros(z.shape[0], 1, *z.shape[2:], dtype=z.dtype)

    run = dict(sampler="em", num_steps=3)
    base = hold_sampling.sample(net, proc, (2, 1, 3), **run)
    assert torch.equal(base, hold_sampling.sample(net, proc, (2, 1, 3), seed=0, **run))
    torch.manual_seed(5)
    drawn = hold_sampling.sample(net, proc, (2, 1, 3), seed=None, **run)
    torch.manual_seed(5)
    assert torch.equal(drawn, graphs.sample_hold(net, proc, (2, 1, 3), seed=None, graph=False, **run))
    assert not torch.equal(drawn, base)
    with pytest.raises(TypeError, match="seed"):
        hold_sampling.sample(net, proc, (2, 1, 3), seed=1.5, **run)
