"""The benchmarks' method, checked without timing anything: the bytes charged per op against a hand count
(and against what a backend actually reads), how a CUDA case is timed, static torch.compile baselines,
compile cases last, the copy-bandwidth peak, and the end-to-end bench's baselines (``bench/``).
"""
import csv
import math
import types

import pytest
import torch

N = 1000  # elements of a hand-counted case


def _meta(dtype=torch.float32, n=N):
    return torch.empty(n, dtype=dtype, device="meta")


#----------------------------------------------------------------------------
# Bytes per op.


def test_sampler_step_traffic_is_a_hand_count(bench):
    """ddim reads z, eps and writes z' (3 tensors; the noisy step reads no noise tensor), cfg reads two model
    outputs (4), history reads and writes D_prev (5); a history or noise tensor whose coefficient is 0 is not
    read; mixed dtypes count each tensor's own element size."""
    b = bench("bench_sampler_step")
    for variant, noise, tensors in (("ddim", False, 3), ("ddim", True, 3), ("cfg", False, 4), ("history", False, 5)):
        for dtype, size in (("float32", 4), ("bfloat16", 2)):
            config = b.Config("fused", "cuda", N, dtype, noise, "cuda", variant)
            assert b.step_bytes(config) == tensors * N * size, (variant, noise, dtype)
    assert b.step_bytes(b.Config("copy", "", N, "float32", False, "cuda")) == 2 * N * 4
    from diffkern.ops import coefs

    x, h = _meta(), _meta()
    no_hist = coefs.row(a=1.0, b=0.5, f=1.0)  # c = 0: the history is not read, history_out still written
    assert b.traffic(no_hist, x=x, model_out=_meta(), history=h, history_out=h, out=_meta()) == 4 * N * 4
    explicit_noise = coefs.row(a=1.0, s=0.1)  # an explicit noise tensor is read only when s != 0
    assert b.traffic(explicit_noise, x=x, model_out=_meta(), noise=_meta(), out=_meta()) == 4 * N * 4
    assert b.traffic(coefs.row(a=1.0), x=x, model_out=_meta(), noise=_meta(), out=_meta()) == 3 * N * 4
    # a third-order multistep row reads both histories and writes one of them back: 6 tensors, and 5 when c2 = 0
    three = dict(x=x, model_out=_meta(), history=_meta(), history2=h, history_out=h, out=_meta())
    assert b.traffic(coefs.row(a=1.0, c=0.2, c2=-0.1, f=1.0), **three) == 6 * N * 4
    assert b.traffic(coefs.row(a=1.0, c=0.2, f=1.0), **three) == 5 * N * 4
    # a fourth-order row (LMS, PLMS) reads three histories: 7 tensors, and 6 when c3 = 0
    four = dict(three, history2=_meta(), history3=h)
    assert b.traffic(coefs.row(a=1.0, c=0.2, c2=-0.1, c3=0.05, f=1.0), **four) == 7 * N * 4
    assert b.traffic(coefs.row(a=1.0, c=0.2, c2=-0.1, f=1.0), **four) == 6 * N * 4
    # float32 state, bfloat16 model outputs (cond and uncond), x0_out written: 4 + 2 + 2 + 4 + 4 bytes/element
    assert b.traffic(coefs.row(a=1.0, w=3.0), x=x, model_out=_meta(torch.bfloat16),
                     model_out_uncond=_meta(torch.bfloat16), out=_meta(), x0_out=_meta()) == 16 * N


def test_what_traffic_leaves_out_the_kernel_does_not_read(bench):
    """NaN in a tensor the formula leaves out (history with c = 0, noise with s = 0) does not reach the output;
    NaN in one it counts (the unconditional output, history with c != 0) does: the C++ kernel, which shares
    the per-element code and the skip rules with the CUDA kernel (csrc/common/sampler_step.h)."""
    import diffkern.ops as dops
    from diffkern.ops import coefs

    x, m = torch.randn(4, 64), torch.randn(4, 64)
    nan = torch.full_like(x, float("nan"))
    seed = torch.zeros(1, dtype=torch.int64)

    def finite(row, **kw):
        out = dops.sampler_step(x, m, coefs.table([row]), 0, seed=seed, backend="cpp", **kw)
        return bool(torch.isfinite(out).all())

    assert finite(coefs.row(a=1.0, b=0.5), history=nan)
    assert finite(coefs.row(a=1.0, b=0.5), noise=nan)
    assert not finite(coefs.row(a=1.0, b=0.5, c=0.1), history=nan)
    assert not finite(coefs.row(a=1.0, b=0.5, s=0.1), noise=nan)
    assert not finite(coefs.row(a=1.0, b=0.5, w=2.0), model_out_uncond=nan)


def _row(monkeypatch, b, config):
    """``b.run(config)`` with the timing replaced by a constant: the row's byte count, nothing timed."""
    from bench import harness

    fake = harness.Timing(1e-3, 1e-3, 1e-3, 1e-3, 1)
    monkeypatch.setattr(harness, "time_fn", lambda fn, **kw: fake)
    return b.run(config)


def test_other_ops_bytes_are_hand_counts(bench, monkeypatch):
    """iadb_blend: read x0, x1, write x_alpha and the target (4 tensors); deblend: read x, D, write x' (3);
    HOLD transition: z (n), eps_hat (1) read, z' (n) written; perturb: x0 read, z_t (n) and eps_n written;
    philox_normal: the output alone; DDIM: 3 float32 tensors."""
    iadb = bench("bench_iadb_blend")
    for op, tensors in (("iadb_blend", 4), ("iadb_deblend", 3), ("copy", 2)):
        impl = "copy" if op == "copy" else "fused"
        row = _row(monkeypatch, iadb, iadb.Config(op, impl, "cpp" if op != "copy" else "", 64 * 16, "bfloat16", "cpu"))
        assert row["bytes"] == tensors * 64 * 16 * 2, op
    hold = bench("bench_hold")
    for n in (2, 3, 6):
        shape = (2, 3, 4, 4)
        per = 2 * 3 * 4 * 4 * 4  # one (B, C, H, W) float32 tensor
        for op, tensors in (("hold_transition", 2 * n + 1), ("hold_perturb", n + 2), ("copy", 2 * n)):
            impl, backend = ("copy", "") if op == "copy" else ("fused", "cpp")
            row = _row(monkeypatch, hold, hold.Config(op, impl, backend, n, shape, "float32", "cpu"))
            assert row["bytes"] == tensors * per and row["numel"] == n * 2 * 3 * 4 * 4, (op, n)
    philox = bench("bench_philox_normal")
    assert _row(monkeypatch, philox, philox.Config("fused", "cpp", N, "bfloat16", "cpu"))["bytes"] == N * 2
    assert _row(monkeypatch, philox, philox.Config("copy", "", N, "float32", "cpu"))["bytes"] == 2 * N * 4
    pytest.importorskip("diffusers")
    ddim = bench("bench_ddim")
    assert _row(monkeypatch, ddim, ddim.Config("fused", "cpp", 0.0, (2, 3, 4, 5), "cpu"))["bytes"] == 3 * 120 * 4


def test_variant_baselines_are_the_fused_maths(bench):
    """The eager cfg and history steps compute what the fused step computes with the bench's table rows."""
    b = bench("bench_sampler_step")
    import diffkern.ops as dops

    z, eps, extra = (torch.randn(4, 257, dtype=torch.float64) for _ in range(3))
    c = b._coefs(0.0)
    cfg = b.eager_cfg_step(z, eps, extra, b.GUIDANCE, *c.values())
    table = dops.coefs.table([b.table_row("cfg", False)])
    torch.testing.assert_close(dops.sampler_step(z, eps, table, 0, model_out_uncond=extra, backend="reference"), cfg)
    new, d = b.eager_history_step(z, eps, extra, c["sa"], c["sb"], *b.HISTORY.values())
    h = extra.clone()
    table = dops.coefs.table([b.table_row("history", False)])
    out = dops.sampler_step(z, eps, table, 0, history=h, history_out=h, backend="reference")
    torch.testing.assert_close(out, new)
    torch.testing.assert_close(h, d)


#----------------------------------------------------------------------------
# Timing.


def test_cuda_method_is_chosen_on_a_steady_call(bench, monkeypatch):
    """A first call that compiles (seconds) must not send a microsecond kernel to the few-sample, unflushed
    event path: the second call decides."""
    harness, timing = bench("harness"), bench("timing")
    now = [0.0]
    clock = types.SimpleNamespace(perf_counter=lambda: now[0])
    monkeypatch.setattr(timing, "time", clock)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    seen = {}
    monkeypatch.setattr(timing, "_time_cuda", lambda fn, first, steady, w, r: seen.update(first=first, steady=steady))
    calls = []

    def fn():
        now[0] += 5.0 if not calls else 1e-5  # the first call compiles
        calls.append(1)
    timing.time_fn(fn, device="cuda")
    assert seen == {"first": 5.0, "steady": pytest.approx(1e-5)}
    assert harness.cuda_plan(seen["steady"], 3, 20, True) == ("do_bench", 3, 20)
    assert harness.cuda_plan(0.5, 3, 20, True) == ("events", 1, harness.LONG_REPEATS)
    assert harness.cuda_plan(1e-5, 3, 20, False) == ("events", 3, 20)


def test_compile_baselines_are_static_and_never_fall_back(bench, monkeypatch):
    harness = bench("harness")
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.update(kw) or fn)

    def step(x):
        return x + 1
    harness.compiled(step)
    assert seen == {"fullgraph": True, "dynamic": False}
    cfg = torch._dynamo.config
    assert getattr(cfg, "recompile_limit", getattr(cfg, "cache_size_limit", 0)) >= harness.RECOMPILE_LIMIT
    # the most static entries one compiled function gets in a CUDA sweep stays under the raised limit
    hold = bench("bench_hold")
    configs = [c for c in hold.get_configs(backends=["cuda"], device="cuda") if c.impl == "compile"]
    per_fn = max(sum(c.op == op for c in configs) for op in hold.OPS)
    assert per_fn <= harness.RECOMPILE_LIMIT


@pytest.mark.parametrize("name", ["bench_sampler_step", "bench_iadb_blend", "bench_hold", "bench_philox_normal"])
def test_compile_cases_run_last(bench, name):
    """A deadline that cuts a sweep short drops torch.compile rows (seconds each), not fused or eager rows."""
    impls = [c.impl for c in bench(name).get_configs(backends=["cuda", "triton"], device="cuda")]
    first = impls.index("compile")
    assert "compile" in impls and set(impls[first:]) == {"compile"}


def test_sampler_step_variants_on_cuda(bench):
    b = bench("bench_sampler_step")
    configs = b.get_configs(backends=["cuda", "triton"], device="cuda")
    for v in ("cfg", "history"):
        sizes = {c.numel for c in configs if c.variant == v}
        assert sizes and min(sizes) >= b.VARIANT_MIN_NUMEL, v
        assert {c.impl for c in configs if c.variant == v} == {"eager", "compile", "fused"}, v


def test_peak_is_the_best_copy_of_the_run(bench):
    harness = bench("harness")
    rows = [{"impl": "copy", "gbps": 100.0}, {"impl": "copy", "gbps": 80.0}, {"impl": "fused", "gbps": 90.0},
            {"impl": "copy", "gbps": float("nan")}]
    harness.add_peak(rows)
    assert all(r["peak_copy_gbps"] == 100.0 for r in rows)
    assert rows[2]["frac_peak_bw"] == pytest.approx(0.9)
    copy = {"impl": "copy", "median_us": 1.0, "gbps": 1.0}
    harness.add_ratios(copy, copy, {"median_us": 10.0}, None)
    assert math.isnan(copy["speedup_vs_eager"]), "the copy is the yardstick, not a rival of the eager sequence"


def test_results_are_written_without_matplotlib(bench, tmp_path, capsys):
    harness = bench("harness")
    s = harness.Session(harness.parser("t").parse_args(["--out", str(tmp_path)]), "cpu")

    def plot(rows, path):
        raise ImportError("No module named 'matplotlib'")
    with s.measuring():
        pass
    assert s.finish("x", [{"impl": "a", "median_us": 1.0}], ("impl", "median_us"), what="x", plot=plot) == 0
    with open(tmp_path / "x.csv") as f:
        assert list(csv.DictReader(f))[0]["impl"] == "a"
    assert "no PNG" in capsys.readouterr().out


#----------------------------------------------------------------------------
# The end-to-end bench (issue 5).


def test_graphs_models_are_the_issue_sizes(bench):
    """google/ddpm-cifar10-32's architecture (35.7M parameters, one attention head) and a ~2M one."""
    diffusers = pytest.importorskip("diffusers")
    g = bench("bench_graphs")
    for name, millions in (("cifar10", 35.7), ("small", 2.2)):
        unet = diffusers.UNet2DModel(in_channels=3, out_channels=3, **g.MODELS[name])
        assert sum(p.numel() for p in unet.parameters()) / 1e6 == pytest.approx(millions, abs=0.1), name
        assert unet.down_blocks[1].attentions[0].heads == 1, name


def test_graphs_diffusers_loop_keeps_the_pipelines_cpu_timesteps(bench, monkeypatch):
    """DDIMPipeline calls set_timesteps(N) (CPU timesteps); device ones would add host syncs in step()."""
    diffusers = pytest.importorskip("diffusers")
    g = bench("bench_graphs")
    real, devices = diffusers.DDIMScheduler.set_timesteps, []

    def spy(self, num_inference_steps, device=None, **kw):
        devices.append(device)
        return real(self, num_inference_steps, device=device, **kw)
    monkeypatch.setattr(diffusers.DDIMScheduler, "set_timesteps", spy)
    with torch.no_grad():
        g.make_loop(g.Config("diffusers", "tiny", "float32", 1, 2, "cpu"))()
    assert devices and all(d is None for d in devices)


def test_graphs_are_timed_on_the_wall_clock_and_compiled_statically(bench, monkeypatch):
    pytest.importorskip("diffusers")
    g = bench("bench_graphs")
    from bench import harness

    seen = {}
    monkeypatch.setattr(harness, "time_fn", lambda fn, **kw: seen.update(kw) or harness.Timing(1, 1, 1, 1, 1))
    g.run(g.Config("eager", "tiny", "float32", 1, 2, "cpu"))
    assert seen["wall"] is True, "no L2 flush, host work counted: a whole sampling call"
    compiled = {}
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.update(kw) or fn)
    g._compile_loop(object(), torch.zeros(1), [], [])
    assert compiled == {"mode": "reduce-overhead", "dynamic": False}


def test_optimal_denoiser_yardstick_runs_without_tf32(bench, monkeypatch, tmp_path):
    b = bench("bench_optimal_denoiser")
    flags, real = [], b.run

    def run(config, **kw):
        flags.append(torch.backends.cuda.matmul.allow_tf32)
        return real(config, **kw)
    monkeypatch.setattr(b, "run", run)
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        assert b.main(["--quick", "--out", str(tmp_path), "--threads", "1"]) == 0
        assert flags and not any(flags)
        assert torch.backends.cuda.matmul.allow_tf32, "restored after the run"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_graphs_summary_reports_the_compile_set_up_for_every_n(bench):
    """The N = 50 compile row replays the graphs the N = 10 row compiled and recorded: both summary rows
    report that first compile as the set-up time, beside steady-state ratios from the same run."""
    g = bench("bench_graphs")
    key = {"model": "small", "dtype": "float32", "batch": 1}
    rows = [{**key, "steps": n, "impl": i, "median_us": t, "per_sample_us": t, "first_call_ms": f}
            for n, i, t, f in ((10, "graph", 100.0, 500.0), (10, "floor", 98.0, 1.0), (10, "compile", 110.0, 9e4),
                               (50, "graph", 500.0, 900.0), (50, "compile", 520.0, 2.0))]
    s = g.summary(rows)
    assert [r["compile_setup_s"] for r in s] == [90.0, 90.0]
    assert s[0]["graph/floor"] == pytest.approx(100 / 98) and s[1]["compile/graph"] == pytest.approx(520 / 500)
    assert [r["graph_first_s"] for r in s] == [0.5, 0.9] and math.isnan(s[1]["graph/floor"])
