"""GPU readiness of ``bench/`` without a GPU, continued from ``test_bench_readiness.py`` (sections 1 and 2):

3. Robustness: a failing case is recorded and the sweep goes on; rows are checkpointed after every case;
   ``bench/memcheck_ops.py``'s launches run on CPU; gpu_suite.sh is valid bash and calls what exists.
4. Time budget: the estimates of ``bench/budget.py`` fit gpu_suite.sh's caps (a plan check: nothing is timed).
"""
import csv
import math
import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(REPO, "bench", "gpu_suite.sh")

#----------------------------------------------------------------------------
# 3. Robustness of a run.


def test_a_failing_case_is_recorded_and_the_sweep_goes_on(bench, tmp_path, capsys):
    harness = bench("harness")
    s = harness.Session(harness.parser("t").parse_args(["--out", str(tmp_path)]), "cpu", name="x")

    def run(c):
        if c == 2:
            raise ValueError("bad case")
        return {"impl": "a", "c": c, "median_us": 1.0}
    with s.measuring():
        rows = s.run_cases([1, 2, 3], run)
    assert [r["c"] for r in rows] == [1, 3] and s.incomplete and len(s.errors) == 1
    assert s.finish("x", rows, ("impl", "c"), what="x", plot=lambda r, p: p) == 2
    with open(tmp_path / "x_errors.csv") as f:
        assert list(csv.DictReader(f))[0]["error"] == "ValueError: bad case"
    assert "FAILED 2: ValueError: bad case" in (tmp_path / "x.md").read_text()
    assert not (tmp_path / "x.partial.csv").exists(), "the final CSV supersedes the checkpoint"
    # an error that leaves the CUDA context unusable stops the sweep (every later case would fail)
    s = harness.Session(harness.parser("t").parse_args(["--out", str(tmp_path)]), "cpu")

    def sticky(c):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    assert s.run_cases([1, 2, 3], sticky) == [] and len(s.errors) == 1
    assert "2 of 3 cases not run" in capsys.readouterr().out


def test_rows_are_checkpointed_after_every_case(bench, tmp_path):
    """What a SIGKILL (the device tool's limit) leaves: <name>.partial.csv with the rows so far."""
    harness = bench("harness")
    s = harness.Session(harness.parser("t").parse_args(["--out", str(tmp_path)]), "cpu", name="x")
    seen = []

    def run(c):
        path = tmp_path / "x.partial.csv"
        if path.exists():
            with open(path) as f:
                seen.append([r["c"] for r in csv.DictReader(f)])
        return {"c": c}
    with s.measuring():
        s.run_cases([1, 2, 3], run)
    assert seen == [["1"], ["1", "2"]]
    with open(tmp_path / "x.partial.csv") as f:
        assert all(r["git_sha"] and r["device_name"] for r in csv.DictReader(f)), "provenance in the checkpoint"


def test_compile_cases_below_the_target_sizes_come_last(bench):
    harness = bench("harness")
    configs = bench("bench_iadb_blend").get_configs(backends=["cuda"], device="cuda")
    kinds = [(c.impl == "compile", c.impl == "compile" and c.numel < harness.TARGET_MIN_NUMEL) for c in configs]
    assert kinds == sorted(kinds) and kinds[-1] == (True, True)
    hold = bench("bench_hold").get_configs(backends=["cuda"], device="cuda")
    big = [c.impl == "compile" and c.n * math.prod(c.shape) >= harness.TARGET_MIN_NUMEL for c in hold]
    first_small = next(k for k, c in enumerate(hold) if c.impl == "compile" and not big[k])
    assert all(big[k] or hold[k].impl != "compile" for k in range(first_small)) and not any(big[first_small:])


def test_memcheck_launches_run_on_cpu(bench, capsys):
    """The same calls as under compute-sanitizer on the GPU, through the C++ kernels: no argument error."""
    assert bench("memcheck_ops").main(["--device", "cpu", "--backend", "cpp"]) == 0
    assert "memcheck launches done: 232 calls" in capsys.readouterr().out


def test_provenance_has_the_versions_and_the_kernels_origin(bench):
    report = bench("report")
    prov = report.provenance("cpu", "diffusers")
    assert {"cudnn", "python", "cuda_loader", "git_sha", "timestamp", "device_name"} <= set(prov)
    assert prov["cuda_loader"] == "none" and prov["python"].count(".") == 2


def test_gpu_suite_is_valid_bash_and_calls_what_exists(bench):
    assert subprocess.run(["bash", "-n", SUITE]).returncode == 0
    text = open(SUITE).read()
    for script in set(re.findall(r"bench/([a-z_]+\.py)", text)) | {f"bench_{b}.py" for b in re.findall(
            r"([a-z_]+):\d+", re.search(r"for spec in ([^;]+);", text).group(1))}:
        assert os.path.exists(os.path.join(REPO, "bench", script)), script
    # what the script passes bench_graphs.py parses
    args = bench("bench_graphs").cli().parse_args(["--out", "d", "--impls", "graph,compile", "--name", "graphs_compile",
                                                   "--skip-compiled", "g.csv", "--deadline-s", "400"])
    assert (args.impls, args.name, args.skip_compiled, args.deadline_s) == ("graph,compile", "graphs_compile", "g.csv",
                                                                            400.0)
    assert "first) STAGES=\"build pytest_cuda memcheck pytest_nvrtc\"" in text, "memcheck (issue 6) before NVRTC"
    caps = dict((b, int(c)) for b, c in re.findall(r"([a-z_]+):(\d+)", re.search(r"for spec in ([^;]+);", text)
                                                                       .group(1)))
    assert caps == bench("budget").CAPS, "bench/budget.py's caps are gpu_suite.sh's"


def test_gpu_suite_runs_a_bench_stage_and_packs_it_into_out(tmp_path):
    """The shell plumbing on CPU: a stage, bench/targets.py, and the archive in $OUT (the bench in --quick mode
    through a wrapper interpreter; no nvidia-smi here, so the device folder is cuda-unknown)."""
    import sys

    if subprocess.run(["bash", "-c", "command -v tar timeout"], capture_output=True).returncode:
        pytest.skip("needs bash, tar and timeout")
    wrapper = tmp_path / "py"
    wrapper.write_text(f'#!/bin/bash\nif [[ "$1" == bench/bench_*.py ]]; then exec {sys.executable} "$@" --quick '
                       f'--threads 1; fi\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OUT": str(out), "GPU_SUITE_PYTHON": str(wrapper), "GPU_SUITE_STAGES": "benches",
           "GPU_SUITE_BENCHES": "iadb_blend", "DIFFKERN_GIT_SHA": "0123abc",
           "GPU_SUITE_DEST_ROOT": str(tmp_path / "dest")}
    run = subprocess.run(["bash", SUITE], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_suite-benches.tar.gz", "stages.txt"], "no temporary left"
    names = subprocess.run(["tar", "-tzf", str(out / "gpu_suite-benches.tar.gz")], capture_output=True,
                           text=True).stdout.split()
    for f in ("iadb_blend.csv", "iadb_blend.md", "targets.md", "env.txt", "bench_iadb_blend.log"):
        assert f"cuda-unknown/{f}" in names, f
    stages = (out / "stages.txt").read_text()
    assert "bench_iadb_blend: exit 0" in stages and "DIFFKERN_GIT_SHA=0123abc" in stages and "bw_90pct" in stages


#----------------------------------------------------------------------------
# 4. The time budget (estimates, not timings).


def test_estimates_fit_the_caps(bench):
    budget = bench("budget")
    rows = {r["part"].split(" (")[0]: r for r in budget.stages()}
    for name in ("bench_sampler_step", "bench_iadb_blend", "bench_hold"):
        # the rows every target reads fit the cap; the compile rows below 2**24 may be cut
        assert rows[name]["target_compiles_s"] <= rows[name]["cap_s"], name
    third = sum(budget.CAPS[b] for b in ("sampler_step", "iadb_blend", "hold"))
    assert third + 3 * 10 + 10 <= 560, "the third call's caps, the stage margins and env fit its budget"
    assert rows["bench_graphs"]["without_compile_s"] <= 540 - 40 - budget.bench_graphs.COMPILE_NEED_S
    assert rows["bench_graphs_compile"]["estimate_s"] <= rows["bench_graphs_compile"]["cap_s"] - 40
    assert re.search(r"the other (\d+) groups; \1 before", rows["bench_graphs_compile"]["part"]), "it ends the column"
