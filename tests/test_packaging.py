"""What a non-editable install (``pip install .``, a wheel) puts on ``sys.path``, checked without compiling.

The suite otherwise runs from the source checkout (an editable install), where ``kernels/`` and ``csrc/`` sit
beside ``diffkern/``. An installed copy has neither: the Triton kernels must be the subpackage
``diffkern.kernels`` (never a top-level ``kernels`` module) and the CUDA sources the run-time loader compiles
must travel as ``diffkern/_csrc``. ``setup.py build_py`` lays out exactly the pure-Python part of a wheel, so
the tests build that into a temporary folder and import diffkern from there, in a subprocess started
elsewhere (so the checkout cannot be imported by accident).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def build_lib(tmp_path_factory) -> Path:
    lib = tmp_path_factory.mktemp("wheel") / "lib"
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(lib)], cwd=ROOT, check=True,
                   capture_output=True, text=True)
    return lib


def _run_installed(lib: Path, code: str, tmp_path: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(lib), DIFFKERN_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_build_py_installs_the_kernels_as_a_subpackage(build_lib):
    kernels = {p.name for p in (ROOT / "kernels").glob("*.py")}
    assert kernels and kernels <= {p.name for p in (build_lib / "diffkern" / "kernels").glob("*.py")}
    assert not (build_lib / "kernels").exists(), "a top-level 'kernels' package would shadow users' own"
    data = {p.name for p in (ROOT / "diffkern" / "data").iterdir() if p.is_file()}
    assert data <= {p.name for p in (build_lib / "diffkern" / "data").iterdir()}


def test_build_py_installs_every_cuda_source(build_lib):
    wanted = {str(p.relative_to(ROOT / "csrc")) for pattern in ("common/*.h", "cuda/*.cu", "cuda/*.cuh", "cuda/*.h")
              for p in (ROOT / "csrc").glob(pattern)}
    shipped = {str(p.relative_to(build_lib / "diffkern" / "_csrc"))
               for p in (build_lib / "diffkern" / "_csrc").rglob("*") if p.is_file()}
    assert wanted and wanted == shipped
    # Every file the kernels include is shipped (the loader compiles with _csrc as the include root).
    for rel in shipped:
        for line in (build_lib / "diffkern" / "_csrc" / rel).read_text().splitlines():
            if line.startswith('#include "'):
                inc = line.split('"')[1]
                assert inc in shipped or (Path(rel).parent / inc).as_posix() in shipped, (rel, inc)


def test_the_installed_copy_imports_and_finds_its_sources(build_lib, tmp_path):
    code = """
import json, sys, importlib.util
import diffkern, diffkern.kernels
from diffkern.ops import cuda_rtc
print(json.dumps({"diffkern": diffkern.__file__, "kernels": diffkern.kernels.__file__,
                  "csrc": str(cuda_rtc.csrc_dir()), "top_level_kernels": importlib.util.find_spec("kernels") is not None}))
"""
    got = _run_installed(build_lib, code, tmp_path)
    for key in ("diffkern", "kernels", "csrc"):
        assert Path(got[key]).resolve().is_relative_to(build_lib.resolve()), (key, got[key])
    assert Path(got["csrc"]).name == "_csrc"
    assert not got["top_level_kernels"]


def test_nvrtc_compiles_from_the_installed_sources(build_lib, tmp_path):
    pytest.importorskip("cupy")
    from diffkern.ops import cuda_rtc
    try:
        cuda_rtc._nvrtc()
    except cuda_rtc.RtcUnavailable as exc:
        pytest.skip(str(exc))
    code = """
import json, torch
from diffkern.ops import cuda_rtc
names = cuda_rtc.instantiations("philox_normal", (torch.float32,))
cubin, lowered = cuda_rtc.compile_cubin(cuda_rtc.SOURCES["philox_normal"], names, "90")
print(json.dumps({"cubin": len(cubin), "lowered": len(lowered), "csrc": str(cuda_rtc.csrc_dir())}))
"""
    got = _run_installed(build_lib, code, tmp_path)
    assert got["cubin"] > 0 and got["lowered"] > 0
    assert Path(got["csrc"]).resolve().is_relative_to(build_lib.resolve())
