"""``diffkern trajectory``: Chen et al.'s sampling and denoising trajectories on the 2-D demo mixture."""
import pytest
import torch

from diffkern.__main__ import main
from diffkern.commands.trajectory import trajectories

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def euler():
    return trajectories("euler", 12, 10, seed=3)


def test_recorded_shapes_and_end_points(euler):
    assert euler["x"].shape == (13, 10, 2) and euler["denoised"].shape == (12, 10, 2)
    gen = torch.Generator().manual_seed(3)
    x0 = (torch.randn(10, 2, generator=gen, dtype=torch.float64) * 80.0).float().double()
    torch.testing.assert_close(euler["x"][0], x0)  # the trajectory starts at the initial noise
    # The last Euler step goes to sigma = 0, where it lands on the denoised estimate.
    torch.testing.assert_close(euler["x"][-1], euler["denoised"][-1], rtol=0, atol=1e-5)


def test_chen_observations_hold_for_the_exact_denoiser(euler):
    """4.5: the sampling trajectory is almost straight, and the denoising trajectory is closer to the end
    point than the sampling trajectory at every step."""
    assert float(euler["deviation"].max() / euler["chord_length"]) < 0.01
    assert (euler["dist_denoised"] <= euler["dist_x"][:-1]).all()


def test_ode_jump_is_the_denoised_estimate():
    res = trajectories("euler", 8, 4, seed=1, jump=5)
    torch.testing.assert_close(res["jump_samples"], res["denoised"][5])
    last = trajectories("euler", 8, 4, seed=1, jump=7)  # jumping at the last step is plain sampling
    torch.testing.assert_close(last["jump_samples"], last["x"][-1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("jump", [-1, 8, 2.0, True])
def test_bad_jump_raises(jump):
    """Regression: jump = -1 returned denoised[-1] labelled with sigmas[-1] = 0 (not its sigma)."""
    with pytest.raises(ValueError, match="jump"):
        trajectories("euler", 8, 2, seed=1, jump=jump)


def test_stochastic_sampler_with_knobs():
    res = trajectories("sde", 6, 5, seed=2, lam=1.0)
    assert torch.isfinite(res["x"]).all() and torch.isfinite(res["denoised"]).all()
    again = trajectories("sde", 6, 5, seed=2, lam=1.0)
    torch.testing.assert_close(res["x"], again["x"])  # the seed keys the sampler's noise too


def test_cli_writes_png(tmp_path, capsys):
    out = tmp_path / "sub" / "traj.png"
    assert main(["trajectory", "--method", "ge", "--gamma", "2", "--steps", "8", "--n", "6", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    text = capsys.readouterr().out
    assert "ODE-jump at step 6" in text and f"wrote {out}" in text


@pytest.mark.parametrize("argv,needle", [
    (["--steps", "0"], "--steps"),
    (["--n", "0"], "--n"),
    (["--steps", "5", "--jump", "5"], "--jump"),
    (["--out", "traj.jpg"], "--out"),
    (["--method", "nope"], "nope"),
    (["--method", "euler", "--gamma", "2"], "--gamma"),
    (["--sigma-min", "5", "--sigma-max", "1"], "--sigma-min"),
    (["--sigma-max", "inf"], "--sigma-max"),
    (["--backend", "bogus"], "--backend"),
])
def test_cli_bad_arguments(tmp_path, capsys, argv, needle):
    out = tmp_path / "t.png"
    argv = ["trajectory", *argv] + ([] if "--out" in argv else ["--out", str(out)])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []
