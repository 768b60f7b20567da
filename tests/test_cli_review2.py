"""Second review of the command line: --steps bounded before any work, --out refused up front where no file can be
created (root passes os.access everywhere), likelihood points too far out for the float32 estimator refused (and
never nan with exit 0), the likelihood --seed range explained, --model naming a directory, the bench parts in
``bench --help``, and building the parser importing no sampler, model or plotting module."""
import argparse
import errno
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

from diffkern.__main__ import build_parser
from diffkern.commands import MAX_STEPS, bench, check_steps
from diffkern.commands import likelihood as likelihood_cmd
from diffkern.models import builtin
from test_cli_review import _one_error_line, _run


def _boom(*args, **kwargs):
    raise AssertionError("work started before the arguments were checked")

#----------------------------------------------------------------------------
# 1. --steps has an upper bound, checked before any schedule is built.


@pytest.mark.parametrize("command", ["sample", "trajectory", "demo"])
def test_huge_steps_refused_before_any_work(tmp_path, capsys, monkeypatch, command):
    from diffkern import schedules

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(builtin, "schedule", _boom)
    monkeypatch.setattr(schedules, "karras", _boom)
    rc, _, err = _run([command, "--steps", "100000000"], capsys)
    assert rc == 2
    _one_error_line(err, command, f"--steps: expected an integer in [1, {MAX_STEPS}], got 100000000")
    assert os.listdir(tmp_path) == []


def test_steps_bound_is_inclusive():
    check_steps(1)
    check_steps(MAX_STEPS)
    for bad in (0, MAX_STEPS + 1):
        with pytest.raises(ValueError, match="--steps"):
            check_steps(bad)

#----------------------------------------------------------------------------
# 2. --out where no file can be created: named, before sampling.


def _proc_refuses_files() -> bool:
    try:
        fd, path = tempfile.mkstemp(dir="/proc")
    except OSError:
        return True
    os.close(fd)
    os.remove(path)
    return False


@pytest.mark.skipif(not os.path.isdir("/proc") or not _proc_refuses_files(), reason="needs a /proc refusing files")
@pytest.mark.parametrize("command,out", [("sample", "/proc/a.png"), ("trajectory", "/proc/a.png"),
                                         ("demo", "/proc/sub/a.png"), ("train", "/proc/a.safetensors")])
def test_out_where_no_file_can_be_created_is_named_up_front(capsys, monkeypatch, command, out):
    from diffkern import demo, train

    monkeypatch.setattr(builtin, "generate", _boom)
    monkeypatch.setattr(builtin, "load_builtin", _boom)
    monkeypatch.setattr(demo, "run", _boom)
    monkeypatch.setattr(demo, "sample_demo", _boom)  # (the command samples through it, then writes)
    monkeypatch.setattr(train, "train_denoiser", _boom)
    rc, _, err = _run([command, "--out", out, "--steps", "1"], capsys)
    assert rc == 2
    _one_error_line(err, command, "--out: cannot create files in '/proc'")
    assert ".tmp" not in err


def test_out_failing_at_the_final_write_is_named(tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(builtin, "save_grid", full)
    out = tmp_path / "g.png"
    rc, _, err = _run(["sample", "--steps", "1", "--batch", "1", "--no-progress", "--backend", "reference",
                       "--out", str(out)], capsys)
    assert rc == 2
    _one_error_line(err, "sample", f"--out: cannot write {str(out)!r} (No space left on device)")
    assert os.listdir(tmp_path) == []  # the up-front probe left nothing behind


def test_out_probe_leaves_nothing_behind(tmp_path, capsys):
    out = tmp_path / "new" / "t.png"
    rc, _, err = _run(["trajectory", "--steps", "2", "--n", "2", "--out", str(out)], capsys)
    assert rc == 0, err
    assert os.listdir(tmp_path) == ["new"] and os.listdir(tmp_path / "new") == ["t.png"]

#----------------------------------------------------------------------------
# 3. likelihood: points beyond the float32 estimator's range are refused; its output is never nan with exit 0.


def test_far_points_refused_naming_the_source(tmp_path, capsys):
    rc, out, err = _run(["likelihood", "--points", "0,0; 1e19,0"], capsys)
    assert rc == 2 and out == ""
    _one_error_line(err, "likelihood", "--points: point 1 (1e+19, 0) is too far out for the float32 estimator")
    path = tmp_path / "p.npy"
    np.save(path, np.array([[0.0, 0.0], [0.0, -1e20]]))
    rc, out, err = _run(["likelihood", "--file", str(path)], capsys)
    assert rc == 2 and out == ""
    _one_error_line(err, "likelihood", "--file: point 1")


def test_largest_accepted_point_is_estimated_in_float32(capsys):
    """Just inside the bound the float32 estimate is finite and agrees with the float64 exact log-density
    within 5 standard errors, also for one fixed level (the largest single term, the worst case for overflow)."""
    from diffkern import analytic
    from diffkern.likelihood import log_likelihood

    gmm = analytic.GaussianMixture.demo_2d()
    x = 3.4e17
    exact = float(gmm.log_prob(torch.tensor([[x, 0.0]], dtype=torch.float64)))
    assert -likelihood_cmd.MAX_ABS_LOG_P < exact < -0.9 * likelihood_cmd.MAX_ABS_LOG_P
    rc, out, err = _run(["likelihood", "--points", f"{x!r},0", "--samples", "8", "--levels", "16"], capsys)
    assert rc == 0 and "nan" not in out and "inf" not in out, err
    for levels, grid in ((16, "random"), (1, "fixed")):
        res = log_likelihood(gmm, torch.tensor([[x, 0.0]]), n_levels=levels, grid=grid, n_samples=8, seed=0,
                             data_std=1.0)
        assert torch.isfinite(res.log_prob).all() and torch.isfinite(res.stderr).all()
        if grid == "random":
            assert abs(float(res.log_prob[0]) - exact) <= 5 * float(res.stderr[0])


def test_non_finite_estimate_is_an_error_not_output(capsys, monkeypatch):
    import diffkern.likelihood as lk

    def nan_estimate(model, x, **kwargs):
        nan = torch.full((x.shape[0],), float("nan"), dtype=torch.float64)
        return lk.LogLikelihood(nan, nan, nan[None].expand(2, -1))
    monkeypatch.setattr(lk, "log_likelihood", nan_estimate)
    rc, out, err = _run(["likelihood", "--points", "0,0"], capsys)
    assert rc == 2 and "nan" not in out
    _one_error_line(err, "likelihood", "not finite")

#----------------------------------------------------------------------------
# 4. likelihood --seed: the estimator's own range, with the reason.


def test_likelihood_seed_range_is_the_estimators_and_explained(capsys):
    from diffkern import analytic
    from diffkern.likelihood import log_likelihood

    with pytest.raises(ValueError, match=r"\[0, 2\*\*31\)"):  # the library's limit, which the command repeats
        log_likelihood(analytic.GaussianMixture.demo_2d(), torch.zeros(1, 2), seed=2 ** 31)
    for seed in (-1, 2 ** 31):
        rc, out, err = _run(["likelihood", "--points", "0,0", "--seed", str(seed)], capsys)
        assert rc == 2 and out == ""
        _one_error_line(err, "likelihood", "--seed: expected an int in [0, 2**31) (the estimator keys")
    rc, out, err = _run(["likelihood", "--points", "0,0", "--seed", str(2 ** 31 - 1), "--samples", "2",
                         "--levels", "2"], capsys)
    assert rc == 0, err

#----------------------------------------------------------------------------
# 5. --model naming a directory.


def test_model_directory_is_named_as_such(tmp_path, capsys):
    rc, _, err = _run(["sample", "--model", str(tmp_path), "--steps", "1", "--batch", "1", "--no-progress",
                       "--out", str(tmp_path / "g.png")], capsys)
    assert rc == 2
    _one_error_line(err, "sample", "(a directory)")
    assert os.listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="is a directory"):
        builtin.load_denoiser(str(tmp_path))

#----------------------------------------------------------------------------
# 6. Building the parser imports no sampler, model or plotting module (torch itself comes with diffkern.ops).


def test_parser_imports_nothing_heavy():
    code = ("import sys, diffkern.__main__ as m; m.build_parser(); "
            "print(','.join(k for k in sys.modules if k.split('.')[0] in ('matplotlib', 'diffusers', 'PIL', "
            "'safetensors', 'sklearn', 'scipy') or k in ('diffkern.sampling', 'diffkern.samplers', "
            "'diffkern.models', 'diffkern.analytic', 'diffkern.likelihood')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "", done.stdout

#----------------------------------------------------------------------------
# 7. bench --help lists the parts.


def test_bench_help_lists_every_part():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    text = " ".join(sub.choices["bench"].format_help().split())
    parts = bench.available()
    assert parts and all(name in text for name in parts)
