"""A new user's walk through README.md: every ```python block runs as written (alone, after the block it continues,
or skipped with the reason it cannot run here), the README's method table and scheduler list agree with the code,
``import diffkern`` stays cheap, and the CLI's help and errors say what the README says.

tests/test_readme.py checks what each example computes, with stand-ins for the names a fragment assumes; this file
checks that a reader can run the blocks at all: a new block that uses a name nothing defines fails here until it
defines it or is listed in ``FRAGMENTS`` with the reason.
"""
import ast
import builtins
import math
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import NamedTuple

import pytest

import diffkern
from diffkern.__main__ import build_parser, main
from diffkern.samplers import SAMPLERS

README = Path(__file__).resolve().parent.parent / "README.md"
TEXT = README.read_text(encoding="utf-8")


class Block(NamedTuple):
    line: int  # README line of the block's first code line
    text: str

    @property
    def first(self) -> str:
        return self.text.splitlines()[0]

    def run(self, ns: dict) -> dict:
        """Executes the block in ``ns`` with README line numbers in tracebacks; returns ``ns``."""
        exec(compile("\n" * (self.line - 1) + self.text, str(README), "exec"), ns)
        return ns


def _blocks() -> list[Block]:
    return [Block(TEXT.count("\n", 0, m.start(1)) + 1, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```", TEXT, re.S | re.M)]


def _names(block: Block) -> tuple[set, set]:
    """(names the block defines, names it reads that neither it nor Python's builtins define)."""
    tree = ast.parse(block.text)
    defined, read = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else defined).add(node.id)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.add(node.name)
    return defined, read - defined - set(dir(builtins))


# Blocks that cannot run on their own here, by a distinctive line, with the reason (shown as the skip reason).
FRAGMENTS = {
    "samplers.sample_dpmpp_2m(model, x, sigmas, extra_args=": "fragment: model, x, sigmas and c are the reader's "
    "(tests/test_readme.py::test_k_diffusion_signature_with_extra_args supplies them)",
    "wrappers.DiffusersUNetDenoiser(unet, scheduler, guidance_scale=7.5)": "needs a downloaded diffusers UNet "
    "(tests/test_readme.py::test_diffusers_unet_denoiser_with_guidance runs it on a tiny random one)",
    "diffkern.sample_iadb(model, torch.randn(16, 3, 64, 64), steps=128)": "fragment: model, two_head, x0 and alphas "
    "are the reader's (tests/test_readme.py::test_sample_iadb_variants supplies them)",
    "dkd.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)": "needs a downloaded pipeline "
    "(tests/test_readme.py::test_diffusers_level1_scheduler runs it on a tiny random Stable Diffusion pipeline)",
    "fast = dkd.accelerate(pipe)": "needs a downloaded pipeline "
    "(tests/test_readme.py::test_diffusers_level2_accelerate runs it on a tiny random Stable Diffusion pipeline)",
    "DiffusersUNetDenoiser(unet, scheduler).to(\"cuda\")": "needs CUDA and a diffusers UNet "
    "(tests/test_readme.py::test_cuda_graph_sampling, marked cuda)",
}


def _plan() -> list:
    """One pytest param per block: (block, the earlier block it continues or None, skip reason or None)."""
    blocks, params = _blocks(), []
    for i, b in enumerate(blocks):
        reason = next((why for marker, why in FRAGMENTS.items() if marker in b.text), None)
        free, before = _names(b)[1], None
        if free and reason is None:  # a continuation: the nearest earlier runnable block that defines every name
            before = next((p for p in reversed(blocks[:i]) if not _names(p)[1] and free <= _names(p)[0]), None)
        params.append(pytest.param(b, before, reason, free, id=f"README.md:{b.line}"))
    return params


@pytest.mark.parametrize("block, before, reason, free", _plan())
def test_python_block_runs_as_written(block, before, reason, free, capsys):
    if reason is not None:
        pytest.skip(f"README.md:{block.line} ({block.first.strip()}): {reason}")
    assert not free or before is not None, (
        f"README.md:{block.line}: the block reads {sorted(free)}, which neither it nor an earlier block defines: "
        f"define them in the block, or list it in FRAGMENTS with the reason")
    ns = before.run({}) if before is not None else {}
    block.run(ns)


def test_every_block_is_planned():
    blocks = _blocks()
    assert len(blocks) >= 10
    unused = [m for m in FRAGMENTS if not any(m in b.text for b in blocks)]
    assert not unused, f"FRAGMENTS names blocks README.md no longer has: {unused}"


def test_likelihood_block_defines_its_points():
    block = next(b for b in _blocks() if "log_likelihood(gmm, points" in b.text)
    assert not _names(block)[1], "README.md's likelihood example reads names it does not define"
    res = block.run({})["res"]
    assert res.log_prob.shape == res.stderr.shape == block.run({})["points"].shape[:1]

#----------------------------------------------------------------------------
# The README's tables against the code.


def _knob_value(text: str):
    return eval(text.strip(), {"__builtins__": {}}, {"inf": math.inf, "True": True, "False": False, "None": None})


def test_method_table_lists_every_method_with_its_knob_defaults():
    start = TEXT.index("| method | knobs (defaults) |")
    rows = TEXT[start:TEXT.index("\n\n", start)].splitlines()[2:]
    seen = {}
    for row in rows:
        cells = row.split("|")
        names = re.findall(r"`([a-z0-9_]+)`", cells[1])
        knob_cell = cells[2].replace("`", "").strip()
        pairs = [] if knob_cell == "none" else re.findall(r"(\w+)=((?:\([^)]*\))|[^,/]+)", knob_cell)
        for which, name in enumerate(names):
            expected = {}
            for key, value in pairs:  # "eta=0 / eta=1": the first value for the first name, the second for the second
                if key not in expected or (which == 1 and list(k for k, _ in pairs).count(key) == 2):
                    expected[key] = _knob_value(value)
            seen[name] = expected
    assert set(seen) == set(SAMPLERS), (f"README lacks {sorted(set(SAMPLERS) - set(seen))}, "
                                        f"lists unknown {sorted(set(seen) - set(SAMPLERS))}")
    for name, expected in seen.items():
        assert expected == diffkern.knobs(name), f"README.md's row of {name!r}: {expected} != {diffkern.knobs(name)}"


def test_level1_scheduler_list_is_the_packages():
    pytest.importorskip("diffusers")
    import diffkern.diffusers as dkd

    section = TEXT[TEXT.index("### Level 1"):TEXT.index("### Level 2")]
    named = set(re.findall(r"`([A-Z][A-Za-z0-9]+Scheduler)`", section))
    exported = {n for n in dkd.__all__ if n.endswith("Scheduler") and n != "FusedScheduler"}  # the base class
    assert named == exported, f"README lacks {sorted(exported - named)}; names unknown {sorted(named - exported)}"


def test_help_of_sample_lists_every_method():
    doc = diffkern.sample.__doc__
    assert all(f'"{m}"' in doc for m in SAMPLERS), [m for m in SAMPLERS if f'"{m}"' not in doc]

#----------------------------------------------------------------------------
# The public surface a user reaches for.


def test_knobs_is_a_top_level_function():
    assert diffkern.knobs is diffkern.sampling.knobs
    assert "knobs" in dir(diffkern) and "knobs" in diffkern.__all__
    assert diffkern.knobs("heun")["s_churn"] == 0.0
    assert "`diffkern.knobs(method)`" in TEXT
    with pytest.raises(ValueError, match="method: unknown sampler 'Heun'"):
        diffkern.knobs("Heun")


def test_import_stays_cheap():
    """``import diffkern``, the lazy names and the CLI parser load neither Triton, diffusers, the extension nor the
    plotting and scientific stacks."""
    heavy = ("triton", "diffusers", "transformers", "matplotlib", "scipy", "diffkern._C", "diffkern.kernels")
    code = ("import sys, diffkern; diffkern.knobs, diffkern.sample, diffkern.sample_iadb; "
            "from diffkern.__main__ import build_parser; build_parser(); "
            f"print(sorted(m for m in sys.modules if m in {heavy!r} or m.split('.')[0] in {heavy!r}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]", res.stdout + res.stderr

#----------------------------------------------------------------------------
# The command line.


def _subparsers() -> dict:
    action = next(a for a in build_parser()._actions if a.dest == "command")
    return dict(action.choices)


@pytest.mark.parametrize("command", ["sample", "trajectory", "demo"])
def test_unknown_method_names_the_flag(command, capsys, tmp_path):
    assert main([command, "--method", "dpmpp2m", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"diffkern {command}: error: --method: unknown sampler 'dpmpp2m'"), err
    assert not list(tmp_path.iterdir())


def test_sample_help_lists_every_method():
    action = next(a for a in _subparsers()["sample"]._actions if a.dest == "method")
    listed = set(re.split(r"[\s|]+", action.help.split("(default")[0].strip()))
    assert listed == set(SAMPLERS), (sorted(set(SAMPLERS) - listed), sorted(listed - set(SAMPLERS)))


def test_every_command_has_a_description():
    missing = [name for name, p in _subparsers().items() if not p.description]
    assert not missing, f"`diffkern <command> --help` says nothing about {missing}"


@pytest.mark.parametrize("threads, text", [(1, "1 thread)"), (2, "2 threads)")])
def test_train_summary_counts_threads(monkeypatch, capsys, tmp_path, threads, text):
    from diffkern import train
    from diffkern.models import builtin

    info = {"params": 10, "steps": 1, "batch": 2, "seconds": 0.1, "cpu_seconds": 0.1, "threads": threads,
            "final_loss": 1.0}
    monkeypatch.setattr(train, "train_denoiser", lambda **kw: types.SimpleNamespace(info=info))
    monkeypatch.setattr(builtin, "save_denoiser", lambda model, out, info: None)
    assert main(["train", "--steps", "1", "--out", str(tmp_path / "m.safetensors"), "--no-progress"]) == 0
    assert text in capsys.readouterr().out
