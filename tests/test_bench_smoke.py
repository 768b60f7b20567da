"""Smoke run of the benchmarks (``bench/``): each ``main(["--quick", ...])`` runs in-process and writes a CSV
with the provenance columns, a PNG and a markdown table. Nothing here asserts on a time.
"""
import csv
import importlib
import math
import os

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHES = {"bench_sampler_step": "sampler_step", "bench_ddim": "ddim"}


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(REPO)
    return lambda name: importlib.import_module(f"bench.{name}")


@pytest.mark.parametrize("name", list(BENCHES))
def test_quick_run_writes_csv_png_and_table(bench, name, tmp_path, capsys):
    if name == "bench_ddim":
        pytest.importorskip("diffusers")
    module = bench(name)
    threads = torch.get_num_threads()
    # One intra-op thread: on a loaded 2-core machine a 2-thread copy of 2**16 floats took 12 ms (OpenMP
    # barriers waiting for a descheduled thread), which would make this smoke run slow, not wrong.
    assert module.main(["--quick", "--out", str(tmp_path), "--threads", "1"]) == 0
    assert torch.get_num_threads() == threads, "main() must restore the thread count"
    from bench import harness

    with open(tmp_path / f"{BENCHES[name]}.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(module.get_configs(quick=True))
    for col in harness.PROVENANCE_COLUMNS + ("impl", "median_us", "p20_us", "p80_us", "gbps"):
        assert all(r.get(col) not in (None, "") for r in rows), f"column {col} missing or empty"
    for r in rows:
        assert math.isfinite(float(r["median_us"])) and float(r["p20_us"]) <= float(r["p80_us"])
    assert (tmp_path / f"{BENCHES[name]}.png").stat().st_size > 0
    table = capsys.readouterr().out
    assert "| impl |" in table and "copy" in table


def test_sampler_step_sweep_covers_the_issue(bench):
    """2**16 .. 2**26 elements, float32 and bfloat16, with and without noise; eager, compile and fused."""
    b = bench("bench_sampler_step")
    configs = b.get_configs(backends=["reference"])
    assert {c.numel for c in configs} >= {2**16, 2**26}
    assert {c.dtype for c in configs} == {"float32", "bfloat16"} and {c.noise for c in configs} == {False, True}
    assert {c.impl for c in configs} == {"copy", "eager", "compile", "fused", "op"}


def test_eager_baseline_is_the_ddim_maths(bench):
    """The unfused baseline computes what the fused op computes (so the speed-up compares equal work)."""
    b = bench("bench_sampler_step")
    import diffkern.ops as dops

    z, eps = torch.randn(4, 257, dtype=torch.float64), torch.randn(4, 257, dtype=torch.float64)
    eager = b.eager_step(z, eps, **b._coefs(0.0))
    table = dops.coefs.table([dops.ddim_row(b.AB, b.AB_PREV)])
    torch.testing.assert_close(dops.sampler_step(z, eps, table, 0, backend="reference"), eager)


def test_unusable_backend_is_refused(bench):
    b = bench("bench_ddim")
    with pytest.raises(ValueError, match=r"--backends: 'cuda' is not usable on cpu"):
        b.main(["--quick", "--backends", "cuda", "--device", "cpu", "--out", os.devnull])
    with pytest.raises(ValueError, match=r"--backends: unknown backend 'bogus'"):
        b.main(["--quick", "--backends", "bogus", "--device", "cpu", "--out", os.devnull])
