"""Smoke run of the benchmarks (``bench/``): each ``main(["--quick", ...])`` runs in-process and writes a CSV
with the provenance columns, a PNG and a markdown table. Nothing here asserts on a time.
"""
import csv
import math
import os

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHES = {"bench_sampler_step": "sampler_step", "bench_ddim": "ddim", "bench_hold": "hold",
           "bench_iadb_blend": "iadb_blend", "bench_philox_normal": "philox_normal"}
ISSUE_SIZES = [2**20, 2**22, 2**24, 2**26, 2**28]  # issue 6: the CUDA sweep


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
        assert r.get("dtype") and (r.get("shape") or r.get("state_shape")), "every row says its dtype and shape"
    assert (tmp_path / f"{BENCHES[name]}.png").stat().st_size > 0
    table = capsys.readouterr().out
    assert "| impl |" in table and "copy" in table


def test_sampler_step_sweep_covers_the_issue(bench):
    """2**16 .. 2**26 elements on CPU, the issue's sizes on CUDA, float32 and bfloat16, with and without noise;
    eager, compile and fused."""
    b = bench("bench_sampler_step")
    configs = b.get_configs(backends=["reference"])
    assert {c.numel for c in configs} >= {2**16, 2**26}
    assert {c.dtype for c in configs} == {"float32", "bfloat16"} and {c.noise for c in configs} == {False, True}
    assert {c.impl for c in configs} == {"copy", "eager", "compile", "fused", "op"}


def test_cuda_sweeps_reach_2_28_elements(bench):
    """On CUDA every sweep runs 2**20 .. 2**28 elements (less only where the GPU's memory is too small); nothing
    here touches a GPU: get_configs only lists cases."""
    from bench import harness

    assert harness.sweep_sizes("cuda", False) == ISSUE_SIZES and harness.sweep_sizes("cuda", True) == [2**16]
    for name in ("bench_sampler_step", "bench_iadb_blend", "bench_philox_normal"):
        b = bench(name)
        configs = b.get_configs(backends=["cuda", "triton"], device="cuda")
        assert [n for n in ISSUE_SIZES if any(c.numel == n for c in configs)] == \
            harness.sweep_sizes("cuda", False, bytes_per_element=b.PEAK_BYTES), name
        assert {c.dtype for c in configs} == {"float32", "bfloat16"}, name
        assert {c.impl for c in configs} == {"copy", "eager", "compile", "fused", "op"}, name
        assert {c.backend for c in configs} == {"", "cuda", "triton"}, name
    ddim = bench("bench_ddim")
    assert [math.prod(s) for s in ddim.shapes("cuda")] == harness.sweep_sizes("cuda", False,
                                                                               bytes_per_element=ddim.PEAK_BYTES)
    hold = bench("bench_hold")
    for n in hold.ORDERS:  # state sizes within 5% of the sweep's (B is rounded per order)
        states = [n * math.prod(s) for s in hold.data_shapes(n, "cuda")]
        want = harness.sweep_sizes("cuda", False, bytes_per_element=hold.PEAK_BYTES)
        assert len(states) == len(want) and all(abs(s / w - 1) < 0.05 for s, w in zip(states, want)), n
    configs = hold.get_configs(backends=["cuda", "triton"], device="cuda")
    assert {c.op for c in configs} == {"copy", "hold_transition", "hold_perturb"}
    assert {c.dtype for c in configs} == {"float32", "bfloat16"}
    assert {c.impl for c in configs} == {"copy", "eager", "compile", "fused", "op"}


def test_iadb_eager_baselines_are_the_ops_maths(bench):
    """The eager blend + target and deblend compute what the fused ops compute."""
    b = bench("bench_iadb_blend")
    import diffkern.ops as dops

    x0, x1 = torch.randn(4, 257, dtype=torch.float64), torch.randn(4, 257, dtype=torch.float64)
    alpha = torch.rand(4, dtype=torch.float64)
    target = torch.empty_like(x0)
    blend = dops.iadb_blend(x0, x1, alpha, target_out=target, backend="reference")
    eager_blend, eager_target = b.eager_blend(x0, x1, alpha)
    torch.testing.assert_close(blend, eager_blend)
    torch.testing.assert_close(target, eager_target)
    table = dops.coefs.table([dops.iadb.euler_row(b.ALPHA, b.ALPHA_NEXT)])
    torch.testing.assert_close(dops.sampler_step(x0, x1, table, 0, backend="reference"),
                               b.eager_deblend(x0, x1, b.ALPHA, b.ALPHA_NEXT))


def test_hold_eager_baselines_are_the_ops_maths(bench):
    """The eager HOLD transition and perturbation compute what the fused ops compute, given the same normals."""
    b = bench("bench_hold")
    import diffkern.ops as dops

    gen = torch.Generator().manual_seed(3)
    for n in (2, 3):
        z = torch.randn(2, n * 3, 5, 7, generator=gen, dtype=torch.float64)
        eps_hat, eta = torch.randn(2, 3, 5, 7, generator=gen, dtype=torch.float64), torch.randn_like(z)
        table, K, k, C = b._step(n, "cpu")
        torch.testing.assert_close(b.eager_transition(z, eps_hat, K, k, C, noise=eta),
                                   dops.hold_transition(z, eps_hat, table, 0, noise=eta, backend="reference"))
        x0, eps = z[:, :3], torch.randn_like(z)
        mean_mat, chol = b._perturb_matrices(n, 2, "cpu", gen)
        eps_n = torch.empty_like(x0)
        z_t = dops.hold_perturb(x0, mean_mat, chol, noise=eps, eps_out=eps_n, backend="reference")
        eager_z, eager_eps = b.eager_perturb(x0, mean_mat, chol, noise=eps)
        torch.testing.assert_close(eager_z, z_t)
        torch.testing.assert_close(eager_eps, eps_n)


def test_philox_compiled_baseline_is_the_ops_stream(bench):
    """What the compile case compiles is the op's stream (torch.randn, the eager case, is another stream)."""
    b = bench("bench_philox_normal")
    import diffkern.ops as dops

    seed = torch.tensor([b.SEED])
    for dtype in (torch.float32, torch.bfloat16):
        torch.testing.assert_close(b.reference_stream(seed, 1000, dtype),
                                   dops.randn((1000,), seed, dtype=dtype, backend="cpp"))


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


def test_a_deadline_before_any_case_writes_nothing(bench, tmp_path):
    module = bench("bench_iadb_blend")
    assert module.main(["--quick", "--out", str(tmp_path), "--threads", "1", "--deadline-s", "0"]) == 1
    assert not list(tmp_path.iterdir())


def test_sigterm_writes_the_cases_already_run(bench, tmp_path, monkeypatch):
    """What ``timeout`` in bench/gpu_suite.sh sends: the case in progress ends, the finished ones are written."""
    import signal

    module = bench("bench_iadb_blend")
    real, calls = module.run, []

    def run(config, **kw):
        calls.append(config)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # handled at the next bytecode: this case does not finish
        return real(config, **kw)
    monkeypatch.setattr(module, "run", run)
    before = signal.getsignal(signal.SIGTERM)
    assert module.main(["--quick", "--out", str(tmp_path), "--threads", "1"]) == 2
    assert signal.getsignal(signal.SIGTERM) is before, "the handler is restored after the cases"
    with open(tmp_path / "iadb_blend.csv") as f:
        assert len(list(csv.DictReader(f))) == 2


def test_cases_that_need_more_time_than_is_left_are_skipped(bench):
    from bench import harness

    s = harness.Session(harness.parser("t").parse_args(["--deadline-s", "60"]), "cpu")
    rows = s.run_cases([1, 2, 3, 4], lambda c: {"c": c}, need_s=lambda c: 1e6 if c % 2 else 0.0)
    assert rows == [{"c": 2}, {"c": 4}] and s.incomplete
    s = harness.Session(harness.parser("t").parse_args([]), "cpu")
    assert s.run_cases([1, 2], lambda c: {"c": c}, need_s=lambda c: 1e6) == [{"c": 1}, {"c": 2}]
    assert not s.incomplete


def test_git_sha_falls_back_to_the_environment(bench, monkeypatch):
    from bench import harness

    monkeypatch.setenv("DIFFKERN_GIT_SHA", "0123abc")
    assert harness.git_sha() == "0123abc"


def test_bench_graphs_quick(bench, tmp_path, capsys):
    """The end-to-end bench's CPU smoke run (its graph, compile and floor columns need CUDA)."""
    pytest.importorskip("diffusers")
    bench = bench("bench_graphs")
    assert bench.main(["--quick", "--out", str(tmp_path), "--threads", "1"]) == 0
    with open(tmp_path / "graphs.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["impl"] for r in rows} == {"diffusers", "diffkern_sched", "accelerated", "eager"}
    assert len(rows) == len(bench.get_configs(quick=True))
    assert all(float(r["per_sample_us"]) > 0 and r["device_name"] and r["git_sha"] for r in rows)
    assert (tmp_path / "graphs.png").stat().st_size > 0 and (tmp_path / "graphs_summary.csv").exists()
    assert "| model | dtype | batch | steps |" in capsys.readouterr().out
    full = bench.get_configs(device="cuda")
    assert {c.impl for c in full} == set(bench.IMPLS) and {c.batch for c in full} == {1, 8, 64}
    assert {c.steps for c in full} == {10, 50} and {c.dtype for c in full} == {"float32", "bfloat16"}
    assert [c.impl for c in full][-1] == "compile"  # the slowest set-up last: a deadline drops it first


def test_quick_run_never_writes_over_the_committed_results(bench):
    """--quick without --out goes to out/bench-quick/; only a measuring run defaults to bench/results/<device>/."""
    harness = bench("harness")
    assert harness.out_dir(None, "cpu", quick=True) == os.path.join("out", "bench-quick")
    assert harness.out_dir(None, "cpu").startswith(os.path.join(REPO, "bench", "results", ""))
    assert harness.out_dir("/tmp/x", "cpu", quick=True) == "/tmp/x"
