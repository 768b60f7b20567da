"""The command line, in-process through ``diffkern.__main__.main``: sample, train, bench, and the error
paths (one clear line on stderr, exit code 2, nothing written)."""
import os

import pytest
import torch

pytest.importorskip("sklearn")

from diffkern.__main__ import main  # noqa: E402
from diffkern.models import builtin  # noqa: E402


def _png_size(path):
    from PIL import Image
    with Image.open(path) as im:
        return im.size, im.mode


def _run(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err

#----------------------------------------------------------------------------
# sample


@pytest.mark.parametrize("method,knobs", [("ge", ["--gamma", "2"]), ("euler", ["--s-churn", "0.5"]),
                                          ("heun", []), ("dpmpp_2m", []), ("euler_ancestral", ["--eta", "0.5"]),
                                          ("sde", ["--lam", "0.5"])])
def test_sample_writes_a_grid(tmp_path, capsys, method, knobs):
    out = tmp_path / "grid.png"
    rc, stdout, err = _run(["sample", "--method", method, "--steps", "3", "--batch", "4", "--out", str(out),
                            "--no-progress", *knobs], capsys)
    assert rc == 0, err
    # 2x2 grid of 16x16 images at 4x scale with 1-pixel gutters.
    assert _png_size(out) == ((2 * 65 + 1, 2 * 65 + 1), "L")
    assert "ms per image" in stdout and "backend" in stdout and method in stdout
    assert sorted(os.listdir(tmp_path)) == ["grid.png"]


def test_sample_progress_score_and_reference_backend(tmp_path, capsys):
    out = tmp_path / "sub" / "dir" / "g.png"
    rc, stdout, err = _run(["sample", "--steps", "2", "--batch", "6", "--nrow", "3", "--out", str(out),
                            "--backend", "reference", "--score", "--seed", "3"], capsys)
    assert rc == 0, err
    assert _png_size(out)[0] == (3 * 65 + 1, 2 * 65 + 1)
    assert "backend reference" in stdout and "MMD^2 pixels" in stdout
    assert "2/2" in err  # the tqdm bar


def test_sample_same_seed_same_grid(tmp_path, capsys):
    paths = [tmp_path / f"{k}.png" for k in range(3)]
    for path, seed in zip(paths, (5, 5, 6)):
        assert _run(["sample", "--steps", "2", "--batch", "2", "--seed", str(seed), "--out", str(path),
                     "--no-progress", "--method", "sde"], capsys)[0] == 0
    data = [p.read_bytes() for p in paths]
    assert data[0] == data[1] and data[0] != data[2]


def test_sample_optimal_model_memorises(tmp_path, capsys):
    data = builtin.digits("train")[0][:50]
    torch.save(data.clone(), tmp_path / "d.pt")
    out = tmp_path / "o.png"
    rc, stdout, err = _run(["sample", "--model", "optimal", "--data", str(tmp_path / "d.pt"), "--steps", "8",
                            "--batch", "4", "--out", str(out), "--no-progress", "--score"], capsys)
    assert rc == 0, err
    assert "optimal" in stdout and out.exists()
    assert "nearest training image 0.000" in stdout  # the exact denoiser of a data set returns its points


def test_sample_trained_weights_file(tmp_path, capsys):
    weights = tmp_path / "w.safetensors"
    rc, stdout, err = _run(["train", "--steps", "2", "--batch", "4", "--out", str(weights), "--no-progress"], capsys)
    assert rc == 0, err
    assert "wrote" in stdout and builtin.load_denoiser(str(weights)).info["steps"] == 2
    rc, stdout, err = _run(["sample", "--model", str(weights), "--steps", "2", "--batch", "2",
                            "--out", str(tmp_path / "g.png"), "--no-progress"], capsys)
    assert rc == 0, err


def test_train_classifier(tmp_path, capsys):
    out = tmp_path / "c.safetensors"
    rc, stdout, err = _run(["train", "--target", "classifier", "--steps", "2", "--batch", "8", "--out", str(out),
                            "--no-progress"], capsys)
    assert rc == 0, err
    assert "accuracy" in stdout
    from diffkern.quality import load_classifier
    assert load_classifier(str(out))(torch.zeros(1, 1, 16, 16)).shape == (1, 10)


@pytest.mark.parametrize("argv,message", [
    (["sample", "--steps", "0"], "--steps"),
    (["sample", "--batch", "0"], "--batch"),
    (["sample", "--nrow", "0"], "--nrow"),
    (["sample", "--method", "nope"], "method"),
    (["sample", "--method", "euler", "--gamma", "2"], "--gamma"),
    (["sample", "--method", "ge", "--mu", "1.5"], "mu"),
    (["sample", "--sigma-min", "2", "--sigma-max", "1"], "--sigma-min"),
    (["sample", "--sigma-max", "nan"], "--sigma-max"),
    (["sample", "--backend", "warp"], "backend"),
    (["sample", "--model", "missing.safetensors"], "weights"),
    (["sample", "--model", "optimal", "--data", "missing.pt"], "--data"),
    (["sample", "--out", "grid.jpg"], "--out"),
    (["train", "--steps", "0"], "--steps"),
    (["train", "--out", "w.pt"], "--out"),
    (["bench", "no_such_part"], "unknown part"),
    (["demo", "--n", "0"], "--n"),
    (["demo", "--steps", "0"], "--steps"),
    (["demo", "--out", "demo.jpg"], "--out"),
    (["demo", "--backend", "warp"], "--backend"),
    (["likelihood", "--points", "1,2", "--backend", "warp"], "--backend"),
])
def test_bad_arguments_one_line_exit_2(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    rc, stdout, err = _run(argv + ["--no-progress"] if argv[0] in ("sample", "train") else argv, capsys)
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"diffkern {argv[0]}: error:") and message in lines[0], err
    assert os.listdir(tmp_path) == []  # nothing written


@pytest.mark.parametrize("argv", [["sample", "--no-progress"], ["trajectory"]])
def test_unwritable_out(tmp_path, capsys, argv):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, _, err = _run(argv + ["--out", str(blocker / "g.png")], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"diffkern {argv[0]}: error:")
    assert "not a directory" in err
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--steps", "many"])
    assert exc.value.code == 2
    assert "--steps" in capsys.readouterr().err


def test_failed_sampling_writes_nothing(tmp_path, capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("model exploded")
    monkeypatch.setattr(builtin, "generate", boom)
    out = tmp_path / "g.png"
    rc, _, err = _run(["sample", "--out", str(out), "--no-progress"], capsys)
    assert rc == 2 and "model exploded" in err and not out.exists()

#----------------------------------------------------------------------------
# bench


def test_bench_list_and_quality_part(tmp_path, capsys):
    rc, stdout, _ = _run(["bench", "--list"], capsys)
    assert rc == 0 and "quality" in stdout.split()
    rc, stdout, err = _run(["bench", "quality", "--methods", "ge", "--steps", "3", "--n", "20", "--threads", "1",
                            "--out", str(tmp_path)], capsys)
    assert rc == 0, err
    assert "| ge | gamma=2 | 3 | 3 |" in stdout and "[train images]" in stdout
    assert (tmp_path / "quality.csv").read_text().count("\n") == 1 + 3 + 1  # header, 3 reference rows, ge
    assert (tmp_path / "quality.png").exists()
