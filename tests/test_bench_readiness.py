"""GPU readiness of ``bench/`` without a GPU: what a lent GPU's scarce minutes will run, checked on CPU.

1. Matrix: the CUDA sweeps (``get_configs(device="cuda")``) run through each bench's own ``run`` and
   ``add_ratios`` with the launch and the timing replaced, then ``bench/targets.py`` reads the CSVs: every row the
   issues' targets need is there, and every target gets a verdict.
2. The end-to-end bench's columns, its CUDA-only ones included (CUDA graphs and torch.compile replaced by CPU
   stand-ins), compute the samples of diffusers' own DDIM loop (float64 truth, the project's tolerance rule).

Sections 3 (robustness of a run) and 4 (time budget) are in ``test_bench_robustness.py``.
"""
import contextlib
import csv
import os
import warnings

import pytest
import torch

from diffkern.testing import assert_matches_reference


def _fake_timing(monkeypatch, harness, median_s=lambda: 1e-3):
    fake = lambda fn, **kw: harness.Timing(median_s(), median_s(), median_s(), 2.0, 20, 1e-3)  # noqa: E731
    monkeypatch.setattr(harness, "time_fn", fake)

#----------------------------------------------------------------------------
# 1. The matrix of the CUDA sweeps reaches every target.


def _simulate_op_sweep(module, harness, monkeypatch, folder, name):
    """The CUDA sweep of ``module`` through its run/add_ratios/add_peak, nothing launched; written as <name>.csv."""
    monkeypatch.setattr(module, "_callable", lambda config: (lambda: None))
    configs = module.get_configs(backends=["cuda", "triton"], device="cuda")
    rows = [module.run(c) for c in configs]
    module.add_ratios(rows)
    harness.add_peak(rows)
    harness.write_csv([{**r, "device_name": "simulated"} for r in rows], os.path.join(folder, f"{name}.csv"))
    return configs, rows


def test_cuda_sweeps_give_every_issue_6_target_a_verdict(bench, monkeypatch, tmp_path):
    harness, targets = bench("harness"), bench("targets")
    _fake_timing(monkeypatch, harness)
    for name in ("sampler_step", "iadb_blend", "hold"):
        configs, rows = _simulate_op_sweep(bench(f"bench_{name}"), harness, monkeypatch, tmp_path, name)
        assert len(rows) == len(configs) and all(r["bytes"] > 0 for r in rows), name
        assert all(r.get("shape") or r.get("state_shape") for r in rows) and all(r["dtype"] for r in rows), name
    ops, missing = targets.op_targets(str(tmp_path))
    assert missing == []
    labels = {r["op"] for r in ops}
    assert labels == {"sampler_step/ddim", "sampler_step/ddim+noise", "sampler_step/cfg", "sampler_step/history",
                      "iadb_blend", "iadb_deblend"} | {f"{op} n={n}" for op in ("hold_transition", "hold_perturb")
                                                       for n in (2, 3, 6)}
    for r in ops:  # every target row judged (pass or FAIL: the fake times are equal), none n/a for a missing row
        verdicts = {r["bw_90pct"], r["eager_5x"], r["no_slower_than_compile"]}
        assert verdicts <= ({"pass", "FAIL"} if r["numel"] >= targets.TARGET_MIN_NUMEL else {""}), r
    assert {(r["dtype"], r["numel"]) for r in ops if r["op"] == "iadb_blend"} == \
        {(d, n) for d in ("float32", "bfloat16") for n in targets.SIZES}


@pytest.mark.parametrize("name", ["sampler_step", "iadb_blend", "hold", "ddim", "philox_normal"])
def test_ratios_survive_rows_a_failed_case_left_out(bench, monkeypatch, name):
    """A failed case is recorded and left out: the derived columns of the others become NaN, never a crash that
    would lose every row of the run."""
    harness, module = bench("harness"), bench(f"bench_{name}")
    _fake_timing(monkeypatch, harness)
    monkeypatch.setattr(module, "_callable", lambda config: (lambda: None))
    rows = [module.run(c) for c in module.get_configs(backends=["cuda", "triton"], device="cuda")]
    for left_out in ("copy", "eager", "compile", "diffusers"):
        kept = [dict(r) for r in rows if r["impl"] != left_out]
        module.add_ratios(kept)
        harness.add_peak(kept)


def test_cuda_end_to_end_sweep_gives_every_issue_5_target_a_verdict(bench, monkeypatch, tmp_path):
    harness, g, targets = bench("harness"), bench("bench_graphs"), bench("targets")
    _fake_timing(monkeypatch, harness)
    monkeypatch.setattr(g, "make_loop", lambda config: (lambda: None))
    monkeypatch.setattr(g, "unet_and_scheduler", lambda *a: (torch.nn.Linear(2, 2), None))
    configs = g.get_configs(device="cuda")
    with warnings.catch_warnings():  # without a GPU, resolving the fused step's backend for "cuda" falls back
        warnings.simplefilter("ignore", RuntimeWarning)
        rows = [g.run(c) for c in configs]
    g.add_ratios(rows)
    harness.write_csv(rows, os.path.join(tmp_path, "graphs.csv"))
    out, missing = targets.graph_targets([targets.read(str(tmp_path), "graphs")])
    assert missing == [] and len(out) == 2 * 2 * 3 * 2
    for r in out:
        assert r["graph_within_3pct_of_floor"] == r["graph_no_slower_than_compile"] == "pass"
        assert r["graph_2x_diffusers_at_batch_1"] == ("FAIL" if r["batch"] == 1 else "")  # equal fake times
        assert r["compile_setup_s"] == pytest.approx(2.0)  # the fake first call, seconds
    assert {r["shape"] for r in rows} >= {"1x3x32x32", "64x3x32x32"}


def test_targets_read_each_ratio_from_one_run(bench, tmp_path):
    """A compile row of a later run (graphs_compile.csv) is compared with that run's graph row, not the first's;
    the verdicts follow the issue's thresholds; a cell without its rows is n/a and listed as missing."""
    targets = bench("targets")
    key = {"model": "cifar10", "dtype": "float32", "steps": 10}

    def row(impl, batch, us, first=1.0):
        return {**key, "batch": batch, "impl": impl, "median_us": us, "per_sample_us": us / batch,
                "first_call_ms": first}
    first = [row("floor", 1, 100.0), row("graph", 1, 102.9), row("diffusers", 1, 210.0),
             row("floor", 8, 100.0), row("graph", 8, 103.1), row("diffusers", 8, 150.0)]
    later = [row("graph", 8, 200.0), row("compile", 8, 199.0, first=6e4)]
    for name, rows in (("graphs", first), ("graphs_compile", later)):
        with open(tmp_path / f"{name}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    out, missing = targets.graph_targets([targets.read(str(tmp_path), n) for n in ("graphs", "graphs_compile")])
    b1, b8 = (next(r for r in out if (r["model"], r["dtype"], r["batch"], r["steps"]) == ("cifar10", "float32", b, 10))
              for b in (1, 8))
    assert (b1["graph_within_3pct_of_floor"], b1["graph_2x_diffusers_at_batch_1"]) == ("pass", "pass")
    assert b1["graph_no_slower_than_compile"] == "n/a" and "graphs cifar10/float32/1/10 compile" in missing
    assert (b8["graph_within_3pct_of_floor"], b8["graph_2x_diffusers_at_batch_1"]) == ("FAIL", "")
    assert b8["compile/graph"] == pytest.approx(199 / 200) and b8["graph_no_slower_than_compile"] == "FAIL"
    assert b8["compile_setup_s"] == pytest.approx(60.0)
    text, flat = targets.report(str(tmp_path))
    assert "## Missing rows" in text and any(f["verdict"] == "missing" for f in flat)
    assert targets.main([str(tmp_path)]) == 0 and (tmp_path / "targets.md").exists()

def test_what_the_byte_counts_leave_out_is_negligible(bench):
    """The tables, seeds, per-sample alphas and HOLD's per-sample matrices, which no count includes, are under
    0.1% of the bytes counted at the smallest CUDA size (0.2% for HOLD's perturbation at n = 6: 11 samples'
    float64 matrices against 2**20-element states); each is read from DRAM once, then from cache."""
    harness = bench("harness")
    s = bench("bench_sampler_step")
    small = min(harness.sweep_sizes("cuda", False))
    table_and_seed = 16 * 8 + 8  # one float64 row of coefs.NCOEF slots, one int64 seed
    for variant in s.VARIANTS:
        config = s.Config("fused", "cuda", small, "bfloat16", False, "cuda", variant)
        assert table_and_seed < 1e-3 * s.step_bytes(config), variant
    iadb = bench("bench_iadb_blend")
    assert iadb.BATCH * 4 < 1e-3 * 3 * small * 2  # alpha (B,) float32 against the deblend's 3 bfloat16 tensors
    hold = bench("bench_hold")
    for n in hold.ORDERS:
        B, C, H, W = hold.data_shapes(n, "cuda")[0]
        data = B * C * H * W * 2  # one bfloat16 (B, C, H, W) tensor
        assert n * (2 * n + 1) * 8 + 8 < 1e-3 * (2 * n + 1) * data, n  # the transition's table row
        assert B * n * (n + 1) * 8 + 8 * B < 2e-3 * (n + 2) * data, n  # perturb: mean (B, n, 1), chol (B, n, n)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_kernels_skip_the_tensors_the_byte_count_leaves_out(backend):
    """History with c = 0 and noise with s = 0 are not counted, so not read (NaN there cannot reach the output);
    the Triton kernel too (tests/test_bench_method.py checks the C++ one, which shares the CUDA kernel's code)."""
    import diffkern.ops as dops
    from diffkern.ops import coefs

    if dops.available("cpu")[backend] is not None:
        pytest.skip(f"{backend}: {dops.available('cpu')[backend]}")
    x, m = torch.randn(4, 64), torch.randn(4, 64)
    nan = torch.full_like(x, float("nan"))
    seed = torch.zeros(1, dtype=torch.int64)

    def finite(row, **kw):
        out = dops.sampler_step(x, m, coefs.table([row]), 0, seed=seed, backend=backend, **kw)
        return bool(torch.isfinite(out).all())
    assert finite(coefs.row(a=1.0, b=0.5, f=1.0), history=nan, history_out=torch.empty_like(x))
    assert finite(coefs.row(a=1.0, b=0.5), noise=nan)
    assert not finite(coefs.row(a=1.0, b=0.5, c=0.1), history=nan)

#----------------------------------------------------------------------------
# 2. The end-to-end columns compute diffusers' samples (CUDA-only ones under CPU stand-ins).


@pytest.fixture
def cpu_stand_ins(bench, monkeypatch):
    """CUDA graphs -> tests/test_graphs.py's RecordedGraph (diffkern's runner and the floor's torch.cuda.graph),
    torch.compile -> the function itself (the compile column's maths, not inductor's)."""
    import test_graphs as tg

    from diffkern import graphs

    monkeypatch.setattr(graphs, "_device_ok", lambda x: True)
    monkeypatch.setattr(graphs, "_record", lambda body, device: tg.RecordedGraph(body))

    class Stream:
        def wait_stream(self, other):
            pass

    class Graph:
        def __init__(self):
            self.ops = []

        @torch.inference_mode()
        def replay(self):
            for func, args, kwargs, out in self.ops:
                tg._into(out, func(*args, **kwargs))

    @contextlib.contextmanager
    def graph(g, **kw):
        with tg._Recorder(g.ops):
            yield
    for name, value in (("Stream", Stream), ("stream", lambda s: contextlib.nullcontext()),
                        ("current_stream", lambda *a: Stream()), ("CUDAGraph", Graph), ("graph", graph)):
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    g = bench("bench_graphs")
    monkeypatch.setattr(g, "_compiled", {})
    graphs.clear()
    yield g
    graphs.clear()


def test_every_column_samples_what_diffusers_samples(cpu_stand_ins):
    g = cpu_stand_ins
    pytest.importorskip("diffusers")

    def sample(impl, dtype):
        with torch.no_grad():
            return g.make_loop(g.Config(impl, "tiny", dtype, 2, 3, "cpu"))()
    ref64, eager = sample("diffusers", "float64"), sample("diffusers", "float32")
    for impl in ("diffkern_sched", "eager", "graph", "compile"):
        assert_matches_reference(sample(impl, "float32"), ref64, eager, impl)

    def image(x):  # the accelerated pipeline's output: (x0 / 2 + 0.5).clamp(0, 1)
        return (x / 2 + 0.5).clamp(0, 1)
    assert_matches_reference(sample("accelerated", "float32"), image(ref64), image(eager), "accelerated")


def test_floor_replays_n_unet_calls(cpu_stand_ins, monkeypatch):
    g = cpu_stand_ins
    pytest.importorskip("diffusers")
    unet, _ = g.unet_and_scheduler("tiny", "float32", "cpu")
    seen = []
    hook = unet.register_forward_pre_hook(lambda m, args: seen.append(args[1]))  # int() would read the device
    try:
        with torch.no_grad():
            replay = g.make_loop(g.Config("floor", "tiny", "float32", 2, 3, "cpu"))
    finally:
        hook.remove()
    _, sched = g.unet_and_scheduler("tiny", "float32", "cpu")
    ts, _ = g._vp_coefs(sched, 3)
    # warm-up on the side stream, then the capture: N calls each, in the loop's order, timesteps on the device
    assert [int(t) for t in seen] == ts + ts and all(isinstance(t, torch.Tensor) for t in seen)
    import test_graphs as tg

    one, x, t = [], torch.zeros(2, 3, 8, 8), torch.tensor(ts[0])
    with torch.no_grad(), tg._Recorder(one):
        unet(x, t)
    assert len(replay.__self__.ops) == 3 * len(one)
    replay()  # runs the recorded ops again, without the Python


def test_accelerated_column_runs_in_bfloat16(bench):
    """It crashed there: output_type="np" cannot hold bfloat16 (the first bfloat16 case ended the whole run)."""
    pytest.importorskip("diffusers")
    g = bench("bench_graphs")
    with torch.no_grad():
        out = g.make_loop(g.Config("accelerated", "tiny", "bfloat16", 1, 2, "cpu"))()
    assert out.dtype == torch.bfloat16 and out.shape == (1, 3, 8, 8) and bool(torch.isfinite(out).all())


def test_skip_compiled_leaves_out_the_groups_done(bench, tmp_path):
    pytest.importorskip("diffusers")
    g = bench("bench_graphs")
    done = tmp_path / "graphs.csv"
    done.write_text("model,dtype,batch,steps,impl\ntiny,float32,1,2,compile\ntiny,float32,2,2,eager\n")
    assert g.compiled_groups(str(done)) == {("tiny", "float32", 1)}
    assert g.compiled_groups(str(tmp_path / "none.csv")) == set()
    out = tmp_path / "out"
    assert g.main(["--quick", "--impls", "eager", "--skip-compiled", str(done), "--out", str(out),
                   "--name", "graphs_compile", "--threads", "1"]) == 0
    with open(out / "graphs_compile.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["impl"], r["batch"]) for r in rows} == {("eager", "2")}
    with pytest.raises(ValueError, match="--impls: unknown"):
        g.get_configs(impls=["eagr"])
