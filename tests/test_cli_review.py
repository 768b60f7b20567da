"""User-journey review of the command line: bad input names its flag (one line, exit code 2, nothing written),
seeds out of range, unreadable files, and every sampler knob reachable as ``--knob NAME=VALUE`` with the value
``diffkern.sample`` would get from Python."""
import argparse
import math
import os

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from diffkern.__main__ import build_parser, main  # noqa: E402
from diffkern.commands import knob_flags  # noqa: E402
from diffkern.models import builtin  # noqa: E402
from diffkern.sampling import knobs  # noqa: E402
from diffkern.samplers import SAMPLERS  # noqa: E402


def _run(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error_line(err, command, message):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"diffkern {command}: error:") and message in lines[0], err


#----------------------------------------------------------------------------
# Bad input: one line naming the flag, exit code 2, nothing written (no traceback).

_BIG = str(2 ** 70)


@pytest.mark.parametrize("argv,message", [
    (["sample", "--seed", _BIG, "--steps", "1", "--batch", "1", "--no-progress"], "--seed"),
    (["demo", "--seed", _BIG, "--steps", "1", "--n", "2"], "--seed"),
    (["trajectory", "--seed", _BIG, "--steps", "1"], "--seed"),
    (["train", "--seed", _BIG, "--steps", "1", "--batch", "2", "--no-progress"], "--seed"),
    (["sample", "--score", "--batch", "1", "--steps", "1", "--no-progress"], "--score"),
    (["sample", "--method", "euler_ancestral", "--eta", "-1", "--no-progress"], "--eta: expected"),
    (["sample", "--method", "ge", "--mu", "1.5", "--no-progress"], "--mu: expected"),
    (["trajectory", "--method", "sde", "--lam", "-1"], "--lam: expected"),
    (["sample", "--method", "dpmpp_2m_sde", "--knob", "solver_type=nope", "--no-progress"], "--knob solver_type"),
    (["sample", "--method", "unipc", "--knob", "order=2.5", "--no-progress"], "--knob order: expected an integer"),
    (["sample", "--method", "unipc", "--knob", "predict_x0=maybe", "--no-progress"], "--knob predict_x0"),
    (["sample", "--method", "euler", "--knob", "nope=1", "--no-progress"], "no knob 'nope'"),
    (["sample", "--method", "euler", "--knob", "s_noise", "--no-progress"], "NAME=VALUE"),
    (["sample", "--method", "euler", "--knob", "s_churn=1", "--s-churn", "1", "--no-progress"], "already set"),
    (["trajectory", "--method", "dpmpp_sde", "--knob", "r=abc"], "--knob r: expected a number"),
    (["likelihood", "--points", "1e39,0"], "--points"),
])
def test_bad_values_name_the_flag(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    rc, _, err = _run(argv, capsys)
    assert rc == 2
    _one_error_line(err, argv[0], message)
    assert os.listdir(tmp_path) == []


def test_knob_values_checked_before_the_model_loads(tmp_path, capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the model was loaded before the knobs were checked")
    monkeypatch.setattr(builtin, "load_builtin", boom)
    rc, _, err = _run(["sample", "--method", "euler_ancestral", "--eta", "-1", "--no-progress",
                       "--out", str(tmp_path / "g.png")], capsys)
    assert rc == 2 and "--eta" in err


def test_unreadable_files_name_the_flag(tmp_path, capsys):
    garbage_pt, garbage_npy, strings_npy = tmp_path / "g.pt", tmp_path / "g.npy", tmp_path / "s.npy"
    garbage_pt.write_text("not a torch file")
    garbage_npy.write_bytes(b"\x93NUMPYgarbage")
    np.save(strings_npy, np.array(["a", "b"]))
    complex_pt = tmp_path / "c.pt"
    torch.save(torch.zeros(3, 1, 16, 16, dtype=torch.complex64), complex_pt)
    bad_csv = tmp_path / "p.csv"
    bad_csv.write_text("1,2\n3,x\n")
    not_weights = tmp_path / "w.safetensors"
    not_weights.write_text("1,2\n")
    out = tmp_path / "o.png"
    cases = [(["sample", "--model", "optimal", "--data", str(p)], "--data")
             for p in (garbage_pt, garbage_npy, strings_npy, complex_pt)]
    cases += [(["sample", "--model", str(not_weights)], "weights")]
    cases += [(["likelihood", "--file", str(p)], "--file") for p in (garbage_pt, garbage_npy, strings_npy, bad_csv)]
    for argv, message in cases:
        extra = ["--steps", "1", "--batch", "2", "--no-progress", "--out", str(out)] if argv[0] == "sample" else []
        rc, _, err = _run(argv + extra, capsys)
        assert rc == 2, argv
        _one_error_line(err, argv[0], message)
        assert not out.exists()


def test_generate_names_a_seed_out_of_range():
    model = builtin.load_builtin()
    with pytest.raises(ValueError, match="seed"):
        builtin.generate(model, 1, "euler", 1, seed=2 ** 70)

#----------------------------------------------------------------------------
# Every knob of every sampler is reachable, typed by its default.


def _as_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return repr(value) if isinstance(value, float) else str(value)


@pytest.mark.parametrize("method", sorted(SAMPLERS))
def test_every_knob_parses_back_to_its_default(method):
    valid = knobs(method)
    args = argparse.Namespace(knob=[f"{name}={_as_text(value)}" for name, value in valid.items()])
    chosen, labels = knob_flags.collect(args, method, valid)
    assert set(chosen) == set(valid) and all(labels[k] == f"--knob {k}" for k in valid)
    for name, value in valid.items():
        got = chosen[name]
        if isinstance(value, (tuple, list)):
            assert tuple(got) == tuple(value)
        else:
            assert type(got) is type(value) and (got == value or (math.isinf(value) and math.isinf(got))), name
    knob_flags.check(method, chosen, labels, builtin.schedule(4))  # the defaults are a valid plan


def test_sample_help_lists_every_sampler_and_the_knob_flag():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("sample", "trajectory"):
        text = sub.choices[command].format_help()
        assert "--knob NAME=VALUE" in text
    method_help = next(a.help for a in sub.choices["sample"]._actions if a.dest == "method")
    assert set(SAMPLERS) <= {w.strip(" ()") for w in method_help.replace("|", " ").split()}


def test_knob_flag_samples_what_the_library_samples(tmp_path, capsys):
    out = tmp_path / "cli.png"
    rc, stdout, err = _run(["sample", "--method", "unipc", "--knob", "solver_type=bh1", "--knob", "order=3",
                            "--knob", "disable_corrector=1", "--knob", "lower_order_final=false", "--steps", "4",
                            "--batch", "2", "--seed", "7", "--no-progress", "--backend", "reference",
                            "--out", str(out)], capsys)
    assert rc == 0, err
    assert "solver_type=bh1" in stdout and "disable_corrector=(1,)" in stdout
    images = builtin.generate(builtin.load_builtin(), 2, "unipc", 4, seed=7, backend="reference",
                              solver_type="bh1", order=3, disable_corrector=(1,), lower_order_final=False)
    builtin.save_grid(images, str(tmp_path / "lib.png"))
    assert out.read_bytes() == (tmp_path / "lib.png").read_bytes()
    default = tmp_path / "default.png"
    assert _run(["sample", "--method", "unipc", "--steps", "4", "--batch", "2", "--seed", "7", "--no-progress",
                 "--backend", "reference", "--out", str(default)], capsys)[0] == 0
    assert default.read_bytes() != out.read_bytes()  # the knobs reached the sampler


def test_trajectory_knob_flag(tmp_path, capsys, monkeypatch):
    from diffkern.commands import trajectory

    seen = {}
    original = trajectory.trajectories

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)
    monkeypatch.setattr(trajectory, "trajectories", spy)
    out = tmp_path / "t.png"
    rc, _, err = _run(["trajectory", "--method", "dpmpp_sde", "--knob", "r=0.3", "--eta", "0.5", "--steps", "3",
                       "--n", "4", "--out", str(out)], capsys)
    assert rc == 0 and out.exists(), err
    assert seen["r"] == 0.3 and seen["eta"] == 0.5
