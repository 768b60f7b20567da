"""README.md's checkable claims that tests/test_readme.py (what the examples compute) and tests/test_readme_journey.py
(the blocks run; the method table's knob defaults; the Level 1 class list) do not cover: the files and tests it cites,
the environment switches (who reads them, their defaults), the op families and their backends, the signatures it
quotes, the command lines it shows, the layout and the two commands, and the measured numbers it quotes from the
committed CPU results (bench/results/cpu-amd-epyc/*.csv). Nothing here runs a sampler: each check reads a file or
inspects the code.
"""
import csv
import inspect
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import diffkern
from diffkern.__main__ import build_parser
from diffkern.samplers import SAMPLERS

ROOT = Path(__file__).resolve().parent.parent
TEXT = (ROOT / "README.md").read_text(encoding="utf-8")
RESULTS = ROOT / "bench" / "results" / "cpu-amd-epyc"


def _section(start: str, end: str = "\n## ") -> str:
    """The README text from the first ``start`` to the next ``end`` after it."""
    at = TEXT.index(start)
    stop = TEXT.find(end, at + len(start))
    return TEXT[at:stop if stop >= 0 else len(TEXT)]


def _table(header: str) -> list[list[str]]:
    """The body rows of the markdown table whose header line starts with ``header``, as stripped cells."""
    at = TEXT.index(header)
    lines = TEXT[at:TEXT.index("\n\n", at)].splitlines()[2:]
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]


def _close(text: str, value: float) -> bool:
    """Whether ``value`` rounds to the number ``text`` writes (to its own number of decimals)."""
    decimals = len(text.split(".")[1]) if "." in text else 0
    return abs(value - float(text)) <= 0.5 * 10 ** -decimals + 1e-12


def _rows(name: str) -> list[dict]:
    with open(RESULTS / name, newline="") as f:
        return list(csv.DictReader(f))

#----------------------------------------------------------------------------
# Files and tests the README cites.

_REPO_PATH = re.compile(r"`((?:diffkern|bench|csrc|kernels|tests|scripts|docs)/[\w./*-]*)`")


def test_cited_repository_paths_exist():
    missing = []
    for path in sorted(set(_REPO_PATH.findall(TEXT)) | set(re.findall(r"\]\((docs/[\w./-]+)\)", TEXT))):
        ref = path.split("::")[0].rstrip(".")
        if not (list(ROOT.glob(ref)) if "*" in ref else (ROOT / ref).exists()):
            missing.append(path)
    assert not missing, f"README.md cites paths the repository lacks: {missing}"


def test_cited_file_names_exist():
    """Bare file names (`test_sixteen_bit.py`, `accelerate_inpaint.py`, `digits.json`): somewhere in the tree."""
    names = set(re.findall(r"`([\w-]+\.(?:py|sh|cu|cpp|safetensors|json|csv))`", TEXT))
    tree = {p.name for sub in ("diffkern", "bench", "csrc", "kernels", "tests", "scripts") for p in
            (ROOT / sub).rglob("*") if p.is_file()} | {p.name for p in ROOT.iterdir()}
    missing = sorted(names - tree)
    assert not missing, f"README.md names files the repository lacks: {missing}"


def test_layout_table_paths_exist():
    for cells in _table("| Path | What |"):
        for path in re.findall(r"`([^`]+)`", cells[0]):
            assert (ROOT / path).exists(), f"README.md's layout names {path!r}, which does not exist"

#----------------------------------------------------------------------------
# Environment switches.


def _reader_files(cell: str) -> list[Path]:
    """The files a "Read by" cell names: a file, a module (`diffkern.ops`: the package), `diffkern bench`,
    `dev.sh test`, `bench/` scripts."""
    name = cell.strip("`").split("`")[0]
    if name == "diffkern bench":
        return [ROOT / "diffkern" / "commands" / "bench.py"]
    if name.startswith("dev.sh"):
        return [ROOT / "dev.sh"]
    if name == "bench/":
        return sorted((ROOT / "bench").glob("*.py")) + sorted((ROOT / "bench").glob("*.sh"))
    if "/" in name or name.endswith(".py"):
        return [ROOT / name]
    as_path = ROOT / name.replace(".", "/")
    return sorted(as_path.rglob("*.py")) if as_path.is_dir() else [as_path.with_suffix(".py")]


def test_environment_switches_are_read_where_the_table_says():
    checked = 0
    for cells in _table("| Variable | Read by | Effect |"):
        if cells[1] == "Triton":  # Triton's own variable
            continue
        files = _reader_files(cells[1])
        assert files and all(f.exists() for f in files), (cells[0], cells[1], files)
        source = "\n".join(f.read_text(encoding="utf-8") for f in files)
        for var in re.findall(r"`([A-Z][A-Z0-9_]+)(?:=\w+)?`", cells[0]):
            assert var in source, f"README.md: {var} is read by {cells[1]}, whose source never names it"
            checked += 1
    assert checked >= 15


_READS = (r"environ\.get\(\s*\"(DIFFKERN_\w+)\"", r"environ\[\"(DIFFKERN_\w+)\"\]", r"_flag\(\"(DIFFKERN_\w+)\"\)",
          r"\$\{(DIFFKERN_\w+)[:}]", r"\"(DIFFKERN_\w+)\" in os\.environ")


def test_every_variable_the_code_reads_is_in_the_table():
    table = "\n".join(c[0] for c in _table("| Variable | Read by | Effect |"))
    read = set()
    for sub in ("diffkern", "bench", "kernels"):
        for f in (ROOT / sub).rglob("*"):
            if f.suffix in (".py", ".sh") and "__pycache__" not in f.parts:
                source = f.read_text(encoding="utf-8")
                read.update(v for pattern in _READS for v in re.findall(pattern, source))
    for f in ("setup.py", "dev.sh"):
        source = (ROOT / f).read_text(encoding="utf-8")
        read.update(v for pattern in _READS for v in re.findall(pattern, source))
    assert {"DIFFKERN_BACKEND", "DIFFKERN_GRAPH_CACHE", "DIFFKERN_VENV"} <= read, read  # the patterns still match
    missing = sorted(v for v in read if f"`{v}`" not in table and f"`{v}=" not in table)
    assert not missing, f"the code reads {missing}, which README.md's environment table does not list"


@pytest.mark.parametrize("var, phrase, path, pattern", [
    ("DIFFKERN_CUDA_ARCHS", "(default `80;90`)", "setup.py", r'environ\.get\("DIFFKERN_CUDA_ARCHS", "80;90"\)'),
    ("NVCC_THREADS", "(default 2)", "setup.py", r'environ\.get\("NVCC_THREADS", "2"\)'),
    ("DIFFKERN_TEST_WORKERS", "(default 2;", "dev.sh", r"\$\{DIFFKERN_TEST_WORKERS:-2\}"),
    ("DIFFKERN_TEST_WORKERS", "`--dist worksteal`", "dev.sh", r"--dist worksteal"),
    ("PYTHON", "(default `python3`)", "dev.sh", r"\$\{PYTHON:-python3\}"),
    ("DIFFKERN_VENV", "(default `.venv`)", "dev.sh", r"\$\{DIFFKERN_VENV:-\.venv\}"),
    ("GPU_SUITE_BUDGET_S", "(default 560 s)", "bench/gpu_suite.sh", r"\$\{GPU_SUITE_BUDGET_S:-560\}"),
    ("GPU_SUITE_WHEELS", "(default `.whl`", "bench/gpu_suite.sh", r"\$\{GPU_SUITE_WHEELS:-\.whl\}"),
    ("GPU_SUITE_PYTHON", "(default the image's `python3`)", "bench/gpu_suite.sh", r"\$\{GPU_SUITE_PYTHON:-python3\}"),
    ("GPU_SUITE_WORKERS", "(default 8)", "bench/gpu_suite.sh", r"\$\{GPU_SUITE_WORKERS:-8\}"),
    ("GPU_SUITE_DEST_ROOT", "(default `/tmp/gpu_suite`)", "bench/gpu_suite.sh",
     r"\$\{GPU_SUITE_DEST_ROOT:-/tmp/gpu_suite\}"),
])
def test_environment_defaults(var, phrase, path, pattern):
    row = next(c for c in _table("| Variable | Read by | Effect |") if f"`{var}" in c[0])
    assert phrase in row[2], f"README.md's row of {var} no longer says {phrase!r}: update this test with it"
    assert re.search(pattern, (ROOT / path).read_text(encoding="utf-8")), f"{path}: {var}'s default is not {phrase}"


def test_graph_cache_default_and_bad_value():
    """`DIFFKERN_GRAPH_CACHE`: default 8 ("at most 8 captures are kept"); a bad value raises naming it."""
    row = next(c for c in _table("| Variable | Read by | Effect |") if "DIFFKERN_GRAPH_CACHE" in c[0])
    assert "default 8" in row[2], row
    assert "at most 8 captures" in TEXT
    env = {k: v for k, v in os.environ.items() if k != "DIFFKERN_GRAPH_CACHE"}
    code = "from diffkern import graphs; print(graphs.info()['max_entries'])"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert res.stdout.strip() == "8"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**env, "DIFFKERN_GRAPH_CACHE": "0"})
    assert res.returncode != 0 and "DIFFKERN_GRAPH_CACHE: expected an int >= 1" in res.stderr, res.stderr

#----------------------------------------------------------------------------
# Op families and backends.


def test_op_table_is_the_registry_and_its_backends():
    from diffkern.ops import registry

    named = set()
    for cells in _table("| op family | what one launch does |"):
        named.update(re.findall(r"`(\w+)`", cells[0]))
    assert named == set(registry.ops()), (sorted(set(registry.ops()) - named), sorted(named - set(registry.ops())))
    # "Every op has a pure-PyTorch reference ..., a fake ..., and C++, Triton and CUDA implementations
    # (`likelihood_accum`: C++ and Triton; `optimal_denoiser`: Triton only)"
    assert "(`likelihood_accum`: C++ and Triton;\n`optimal_denoiser`: Triton only)" in TEXT
    exceptions = {"likelihood_accum": {"reference", "cpp", "triton"}, "optimal_denoiser": {"reference", "triton"}}
    for op in registry.ops():
        spec = registry._OPS[op]  # the loaders are the op's backends
        assert set(spec.loaders) == exceptions.get(op, set(registry.BACKENDS)), (op, sorted(spec.loaders))
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"diffkern::{op}", "Meta"), f"{op}: no fake"
    assert "Backends: reference, cpp, triton." in _section("### The log-likelihood of a point")


def test_available_lists_the_four_backends():
    assert list(diffkern.available("cpu")) == ["reference", "cpp", "triton", "cuda"]

#----------------------------------------------------------------------------
# Signatures the README quotes.


def _quoted_signature(prefix: str) -> inspect.Signature:
    """The signature README.md writes as ``prefix(...)`` (parameters parsed as Python)."""
    at = TEXT.index(prefix + "(")
    depth, i = 0, at + len(prefix)
    while True:
        depth += {"(": 1, ")": -1}.get(TEXT[i], 0)
        i += 1
        if depth == 0:
            break
    params = " ".join(TEXT[at + len(prefix) + 1:i - 1].split())
    ns = {}
    exec(f"def f({params}): pass", {}, ns)
    return inspect.signature(ns["f"])


def _same(quoted: inspect.Signature, real: inspect.Signature, what: str):
    got = [(p.name, p.kind, p.default) for p in real.parameters.values()]
    want = [(p.name, p.kind, p.default) for p in quoted.parameters.values()]
    assert got == want, f"README.md quotes {what}{quoted}, the code has {real}"


def test_hold_signature():
    from diffkern.hold import HOLD

    _same(_quoted_signature("`HOLD"), inspect.signature(HOLD), "HOLD")


def test_accelerate_signature():
    pytest.importorskip("diffusers")
    import diffkern.diffusers as dkd

    _same(_quoted_signature("`accelerate"), inspect.signature(dkd.accelerate), "accelerate")


@pytest.mark.parametrize("name, positional", [
    ("sample_dpm_fast", ["model", "x", "sigma_min", "sigma_max", "n"]),
    ("sample_dpm_adaptive", ["model", "x", "sigma_min", "sigma_max"]),
])
def test_kdiffusion_signatures_of_the_adaptive_samplers(name, positional):
    from diffkern import samplers

    assert f"`samplers.{name}({', '.join(positional)}, ...)`" in TEXT
    assert list(inspect.signature(getattr(samplers, name)).parameters)[:len(positional)] == positional

#----------------------------------------------------------------------------
# Command lines.


def _command_lines() -> list[str]:
    """Every `diffkern ...` / `./dev.sh demo ...` command the README shows, in ```bash blocks or inline."""
    lines = []
    for m in re.finditer(r"^```bash\n(.*?)^```", TEXT, re.S | re.M):
        lines += [line.split("  #")[0].strip() for line in m.group(1).splitlines() if line.strip()]
    lines += re.findall(r"`((?:\.venv/bin/)?diffkern (?:sample|demo|trajectory|likelihood|bench|train)[^`]*)`", TEXT)
    lines += re.findall(r"`(\./dev\.sh demo[^`]*)`", TEXT)
    return lines


def test_every_command_line_parses():
    from diffkern.commands.bench import available

    parser, checked = build_parser(), 0
    for line in _command_lines():
        argv = shlex.split(line)
        if argv[0] == "./dev.sh":
            assert argv[1] in ("demo", "test"), line
            if argv[1] == "test":
                continue
            argv = ["sample"] + argv[2:]  # dev.sh demo: `python -m diffkern sample "$@"`
        else:
            argv = argv[1:]
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"README.md's command does not parse: {line}")
        if getattr(args, "method", None) is not None:
            assert args.method in SAMPLERS, line
        if args.command == "bench" and args.name:
            assert args.name in available(), line
        checked += 1
    assert checked >= 12


def _options(command: str) -> set[str]:
    action = next(a for a in build_parser()._actions if a.dest == "command")
    return {o for a in action.choices[command]._actions for o in a.option_strings}


def test_flags_the_prose_lists_exist():
    sample = _section("`diffkern sample` prints the backend", "\n\n")
    flags = set(re.findall(r"(--[a-z][a-z-]*)", sample.replace("--sigma-min/--sigma-max/--rho",
                                                                "--sigma-min --sigma-max --rho")))
    assert len(flags) >= 20 and not flags - _options("sample"), sorted(flags - _options("sample"))
    likelihood = (_section("The points can also come from a file", "\n\n")
                  + _section("On the command line, `--bpd", "\n"))
    flags = set(re.findall(r"(--[a-z][a-z-]*)", likelihood))
    assert len(flags) >= 8 and not flags - _options("likelihood"), sorted(flags - _options("likelihood"))
    assert "--threads" in _options("train") and "--steps" in _options("train")


def test_eta_flag_lists_every_method_with_an_eta_knob():
    """"`--eta` (the ancestral and SDE samplers, dpm_fast, ...)": every method with an eta knob, the ancestral and
    SDE ones by their names."""
    said = _section("`diffkern sample` prints the backend", "\n\n")
    listed = said[said.index("`--eta` ("):].split(")")[0]
    for method in SAMPLERS:
        if "eta" in diffkern.knobs(method) and "ancestral" not in method and "sde" not in method:
            assert method in listed, f"--eta works with {method}, which README.md's list leaves out"

#----------------------------------------------------------------------------
# The two commands.


def test_two_commands_are_dev_sh_and_ci():
    dev = (ROOT / "dev.sh").read_text(encoding="utf-8")
    assert re.search(r"^\s*demo\).*-m diffkern sample \"\$@\"", dev, re.M), "./dev.sh demo runs `diffkern sample`"
    assert re.search(r"^\s*test\).*-m pytest", dev, re.M)
    assert "--system-site-packages" in dev and 'pip install -q "torch==2.13.0"' in dev
    assert "v < (2, 6)" in dev  # "torch >= 2.6 (installed as torch==2.13.0 when none, or only an older one, ...)"
    ci = [line for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
          if line.strip() and not line.startswith("#")]
    assert ci[-1].strip() == "./dev.sh test", ci

#----------------------------------------------------------------------------
# Measured numbers quoted from the committed CPU results.

_REFERENCE_ROWS = {"*training images (the floor)*": "[train images]", "*training images blurred by 1.5 px*":
                   "[blurred images]", "*standard normal noise*": "[noise images]"}


def test_quality_table_is_the_committed_csv():
    """Each README row is one sampler's row of quality.csv (features / pixels, at 5, 10 and 20 steps), and every
    sampler of the CSV has a row."""
    by_sampler = {}
    for r in _rows("quality.csv"):
        by_sampler.setdefault(r["sampler"], {})[r["steps"]] = (float(r["mmd2_features"]), float(r["mmd2_pixels"]))
    matched = set()
    for cells in _table("| images | 5 steps | 10 steps | 20 steps |"):
        label, scores = cells[0], [c for c in cells[1:] if c]
        pairs = [tuple(s.strip() for s in c.split("/")) for c in scores]
        if label in _REFERENCE_ROWS:
            candidates = [_REFERENCE_ROWS[label]]
            steps = [""]
        else:
            candidates, steps = [s for s in by_sampler if not s.startswith("[")], ["5", "10", "20"]
        hits = [s for s in candidates if all(_close(f, by_sampler[s][n][0]) and _close(p, by_sampler[s][n][1])
                                             for n, (f, p) in zip(steps, pairs))]
        assert hits, f"README.md's quality row {label!r} {pairs} is no sampler's row of quality.csv"
        matched.update(hits)
    assert matched == set(by_sampler), f"quality.csv rows README.md does not show: {sorted(set(by_sampler) - matched)}"


def test_sampler_step_table_is_the_committed_csv():
    rows = {r["impl"]: r for r in _rows("sampler_step.csv")
            if r["dtype"] == "float32" and r["numel"] == str(2 ** 24) and r["noise"] == "False"}
    impls = {"tensor copy": "copy", "eager PyTorch": "eager", "`torch.compile`": "compile", "fused `cpp`": "fused:cpp"}
    columns = ("median_us", "gbps", "frac_copy_bw", "speedup_vs_eager", "speedup_vs_compile")
    for cells in _table("| implementation | median | GB/s |"):
        impl = next(v for k, v in impls.items() if cells[0].startswith(k))
        for text, column in zip(cells[1:], columns):
            if not text:
                continue
            number = re.match(r"[\d.]+", text).group(0)
            value = float(rows[impl][column]) / (1000 if column == "median_us" else 1)  # the README's ms
            assert _close(number, value), f"README.md: {impl} {column} {text}, sampler_step.csv {rows[impl][column]}"
    noisy = {r["impl"]: r for r in _rows("sampler_step.csv")
             if r["dtype"] == "float32" and r["numel"] == str(2 ** 24) and r["noise"] == "True"}["fused:cpp"]
    m = re.search(r"the fused step takes ([\d.]+) ms: ([\d.]+)x the eager sequence and ([\d.]+)x", TEXT)
    for text, value in zip(m.groups(), (float(noisy["median_us"]) / 1000, float(noisy["speedup_vs_eager"]),
                                        float(noisy["speedup_vs_compile"]))):
        assert _close(text, value), (m.group(0), noisy)


def test_ddim_and_hold_speedups_are_the_committed_csv():
    ddim = {(r["impl"], float(r["eta"])): r for r in _rows("ddim.csv")}
    m = re.search(r"float32 took (\d+)x \(eta 0\) and (\d+)x \(eta 1\) the time of one tensor copy, the fused DDIM "
                  r"step \(`out`\s+preallocated\) ([\d.]+)x and ([\d.]+)x: (\d+)x and ([\d.]+)x faster", TEXT)
    assert m, "README.md's DDIM sentence changed: update this test with it"
    columns = (("diffusers", "x_copy"), ("fused:cpp", "x_copy"), ("fused:cpp", "speedup_vs_diffusers"))
    want = [float(ddim[(impl, eta)][column]) for impl, column in columns for eta in (0.0, 1.0)]
    assert all(_close(t, v) for t, v in zip(m.groups(), want)), (m.groups(), want)
    hold = {r["n"]: r for r in _rows("hold.csv")
            if r["op"] == "hold_transition" and r["impl"] == "fused:cpp" and r["dtype"] == "float32"}
    for sentence in (r"the C\+\+ transition ([\d.]+)x / ([\d.]+)x /\s+([\d.]+)x faster than eager in float32 for "
                     r"n = 2 / 3 / 6 and (\d+)x / (\d+)x / (\d+)x faster than `torch.compile`",
                     r"is ([\d.]+)x, ([\d.]+)x and ([\d.]+)x faster than the eager\s+PyTorch composition for "
                     r"n = 2, 3, 6, and (\d+)x, (\d+)x and (\d+)x faster"):
        m = re.search(sentence, TEXT)
        assert m, f"README.md's HOLD sentence changed: update this test ({sentence[:40]}...)"
        want = [float(hold[n][column]) for column in ("speedup_vs_eager", "speedup_vs_compile") for n in "236"]
        assert all(_close(t, v) for t, v in zip(m.groups(), want)), (m.groups(), want)
