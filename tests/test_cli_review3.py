"""Command-line review 3: train --steps, likelihood --levels/--samples (and their product with the points) are bounded
and refused before any work, naming the flag; demo's failing final write names --out (a failing sampler does not);
--seed's range is sampler_loop's own check under the flag's name."""
import errno
import os

import pytest

from diffkern import demo, sampler_loop, train
from diffkern import likelihood as lk
from diffkern.commands import (MAX_LEVELS, MAX_NOISED_POINTS, MAX_SAMPLES, MAX_TRAIN_STEPS, check_count,
                               check_seed)
from test_cli_review import _one_error_line, _run


def _boom(*args, **kwargs):
    raise AssertionError("work started before the arguments were checked")

#----------------------------------------------------------------------------
# 1. Upper bounds, checked before any work.


@pytest.mark.parametrize("target,work", [("denoiser", "train_denoiser"), ("classifier", "train_classifier")])
def test_train_huge_steps_refused_before_any_work(tmp_path, capsys, monkeypatch, target, work):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train, work, _boom)
    rc, out, err = _run(["train", "--target", target, "--steps", "1000000000", "--no-progress"], capsys)
    assert rc == 2 and out == ""
    _one_error_line(err, "train", f"--steps: expected an integer in [1, {MAX_TRAIN_STEPS}], got 1000000000")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv,message", [
    (["--levels", "100000000"], f"--levels: expected an integer in [1, {MAX_LEVELS}], got 100000000"),
    (["--levels", "0"], f"--levels: expected an integer in [1, {MAX_LEVELS}], got 0"),
    (["--samples", "100000000"], f"--samples: expected an integer in [2, {MAX_SAMPLES}], got 100000000"),
    (["--samples", "1"], "--samples: expected an int >= 2 (the standard error needs two repeats), got 1"),
    # each flag within its bound, their product with the 3 points past the grid's
    ([f"--levels={MAX_LEVELS}", f"--samples={MAX_SAMPLES}"],
     f"--levels x --samples x points: {MAX_LEVELS} x {MAX_SAMPLES} x 3 = {MAX_LEVELS * MAX_SAMPLES * 3} noised "
     f"points, over the {MAX_NOISED_POINTS}"),
])
def test_likelihood_huge_counts_refused_before_any_work(capsys, monkeypatch, argv, message):
    monkeypatch.setattr(lk, "log_likelihood", _boom)
    monkeypatch.setattr(lk, "ode_log_likelihood", _boom)
    rc, out, err = _run(["likelihood", "--points", "0,2; 1.4,1.4; 0,0", *argv], capsys)
    assert rc == 2 and out == ""
    _one_error_line(err, "likelihood", message)


def test_likelihood_product_bound_is_inclusive(capsys, monkeypatch):
    """levels x samples x points == MAX_NOISED_POINTS reaches the estimator; one point more does not."""
    calls = []

    def fake(model, x, **kw):  # the estimator's answer for the points: the command only prints it
        import torch
        calls.append((x.shape[0], kw["n_levels"], kw["n_samples"]))
        zero = torch.zeros(x.shape[0], dtype=torch.float64)
        return lk.LogLikelihood(zero, zero, zero[None].expand(2, -1))
    monkeypatch.setattr(lk, "log_likelihood", fake)
    levels, samples = 2 ** 12, 2 ** 15  # 2**27 with one point, each within its own bound
    assert levels <= MAX_LEVELS and samples <= MAX_SAMPLES and levels * samples == MAX_NOISED_POINTS
    rc, _, err = _run(["likelihood", "--points", "0,0", "--levels", str(levels), "--samples", str(samples)], capsys)
    assert rc == 0 and calls == [(1, levels, samples)], err
    rc, _, err = _run(["likelihood", "--points", "0,0; 1,1", "--levels", str(levels), "--samples", str(samples)],
                      capsys)
    assert rc == 2 and len(calls) == 1
    _one_error_line(err, "likelihood", "--levels x --samples x points")


def test_check_count_bounds_are_inclusive():
    check_count(1, "--x", 5)
    check_count(5, "--x", 5)
    check_count(2, "--x", 5, least=2)
    for bad, least in ((0, 1), (6, 1), (1, 2)):
        with pytest.raises(ValueError, match=rf"^--x: expected an integer in \[{least}, 5\], got {bad}$"):
            check_count(bad, "--x", 5, least=least)

#----------------------------------------------------------------------------
# 2. demo: the final write names --out; a failure while sampling is not an --out error.


def test_demo_failing_final_write_names_out(tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(demo, "atomic_write", full)
    out = tmp_path / "d.png"
    rc, _, err = _run(["demo", "--steps", "2", "--n", "8", "--backend", "reference", "--out", str(out)], capsys)
    assert rc == 2
    _one_error_line(err, "demo", f"--out: cannot write {str(out)!r} (No space left on device)")
    assert os.listdir(tmp_path) == []  # the up-front probe left nothing behind


def test_demo_sampler_failure_is_not_blamed_on_out(tmp_path, capsys, monkeypatch):
    def broken(**kwargs):
        raise OSError(errno.EACCES, "kernel cache not writable")
    monkeypatch.setattr(demo, "sample_demo", broken)
    monkeypatch.setattr(demo, "plot", _boom)
    rc, _, err = _run(["demo", "--steps", "2", "--n", "8", "--out", str(tmp_path / "d.png")], capsys)
    assert rc == 2
    _one_error_line(err, "demo", "kernel cache not writable")
    assert "--out" not in err


def test_demo_run_still_samples_and_writes(tmp_path):
    """diffkern.demo.run (the library entry) is sample_demo then plot: one PNG, the summary of the samples."""
    out = tmp_path / "d.png"
    summary = demo.run(str(out), method="euler", steps=3, n=16, seed=1, backend="reference")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and summary["n"] == 16 and summary["steps"] == 3

#----------------------------------------------------------------------------
# 3. --seed: sampler_loop's range check, named as the flag.


@pytest.mark.parametrize("seed", [-2 ** 63, 0, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1])
def test_seed_range_accepted_by_both(seed):
    check_seed(seed)
    sampler_loop.seed_value(seed, 1)


@pytest.mark.parametrize("seed", [-2 ** 63 - 1, 2 ** 64, 2 ** 70])
def test_seed_range_refused_by_both_with_their_names(seed):
    text = rf"expected an int in \[-2\*\*63, 2\*\*64\), got {seed}$"
    with pytest.raises(ValueError, match=rf"^--seed: {text}"):
        check_seed(seed)
    with pytest.raises(ValueError, match=rf"^seed: {text}"):
        sampler_loop.seed_value(seed, 1)


def test_sample_dpm_adaptive_reports_its_range_not_a_step_count(tmp_path, capsys):
    """dpm_adaptive reads only the schedule's range and picks its own steps: the summary says so."""
    out_png = tmp_path / "a.png"
    rc, out, err = _run(["sample", "--method", "dpm_adaptive", "--batch", "2", "--out", str(out_png), "--no-progress"],
                        capsys)
    assert rc == 0, err
    assert "with dpm_adaptive, adaptive steps from sigma 80 to 0.002, on cpu" in out and "karras steps" not in out
    assert out_png.exists()
