"""GPU-only hazards of the Triton kernels that the interpreter (numpy int64, exact division) cannot show.

A subprocess with TRITON_INTERPRET unset records the launchers' calls on meta tensors of more than 2**31
elements (nothing is allocated: the recorder of ``test_triton_gpu_compile.py`` launches nothing), compiles
a few of them for sm_90 with Triton's real backend and reports facts of their TTIR:

* HOLD: a sample of n components of P < 2**31 positions may hold >= 2**31 entries; the component offset
  ``j * P`` (and the noise index built from it) must be int64, i.e. every use of the i32 argument P is
  its sign extension.
* likelihood: the loop over a sample runs on an int64 counter (an i32 one wraps past a per_sample within
  BLOCK of 2**31), and ``(y - D) / sigma`` is IEEE division (Triton's float32 ``/`` is ``div.full.f32``).
* sampler_step: with per-sample seeds and 2**32 elements in all, every tensor of pointers is offset in i64.
* ``step`` is not specialised: steps 1, 2 and 16 of one kernel are one compilation.

Run as a script it prints the JSON report the tests read.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def _hazard_launches(step: int = 3):
    """``(name, call)`` of the launches whose TTIR the report inspects (meta tensors, >= 2**31 elements)."""
    from diffkern.kernels import hold, likelihood, sampler_step

    side = 2**14  # P = 2 * 2**28 = 2**29 positions per component: i32, but 6 * P >= 2**31
    z = _meta(2, 12, side, side)
    seeds = torch.arange(2)
    coef = torch.zeros(4, 6, 13, dtype=torch.float64)
    yield "hold_transition", lambda: hold.hold_transition_launch(z, _meta(2, 2, side, side), None, coef, step, seeds, z)
    mean, chol = torch.zeros(2, 6, 2, dtype=torch.float64), torch.zeros(2, 6, 6, dtype=torch.float64)
    yield "hold_perturb", lambda: hold.hold_perturb_launch(_meta(2, 4, side, side), mean, chol, None, step, seeds, z,
                                                           _meta(2, 2, side, side))
    y = _meta(1, 2**31 - 100)  # per_sample an i32 within BLOCK of 2**31
    ones = torch.ones(1, dtype=torch.float64)
    yield "likelihood_accum", lambda: likelihood.likelihood_accum_launch(
        y, y, None, ones, ones, ones, step, torch.arange(1), torch.zeros(1))
    x = _meta(4, 2**30)
    yield "sampler_step", lambda: sampler_step.sampler_step_launch(
        x, x, None, None, None, torch.zeros(8, 12, dtype=torch.float64), step, torch.arange(4), x, None, None)


def _record(call):
    import test_triton_gpu_compile as rec

    with rec.Recorder() as r:
        call()
    assert len(r.launches) == 1
    fn, args, kwargs = r.launches[0]
    return fn, rec.specialization(fn, args, kwargs)


def report() -> dict:
    """Compile each hazard launch for sm_90; returns per launch its signature and TTIR facts, and per
    kernel with a ``step`` the number of distinct specialisations over steps 1, 2 and 16."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import test_triton_gpu_compile as rec

    out = {"launches": {}, "step_variants": {}}
    for name, call in _hazard_launches():
        fn, spec = _record(call)
        kernel = triton.compile(ASTSource(fn, *spec[:3]), target=GPUTarget("cuda", 90, 32), options=dict(spec[3]))
        ttir = kernel.asm["ttir"]
        out["launches"][name] = {
            "signature": spec[0],
            # every line using the argument %P (not %P_1, ...), and the tensor addptrs' offset types
            "p_uses": sorted({re.sub(r"^\s*%\S+ = ", "", line.split(" loc(")[0]).strip()
                              for line in ttir.splitlines() if re.search(r"%P\b(?!_)", line)
                              and not line.lstrip().startswith("tt.func")}),
            # offset types of the addptrs on blocks of state pointers (float32; the tables are float64)
            "tensor_addptr_offsets": sorted(set(re.findall(r"tt\.addptr [^:]*: tensor<[0-9x]*!tt\.ptr<f32>>, "
                                                           r"tensor<[0-9x]*(i\d+)>", ttir))),
            "for_types": re.findall(r"scf\.for .*: (i\d+)\s*\{?$", ttir, flags=re.M),  # loop counter types
            "precise_div": "tt.precise_divf" in ttir,
            "plain_divf": "arith.divf" in ttir,
        }
    for name, _ in _hazard_launches():
        keys = {rec.spec_key(*_record(dict(_hazard_launches(step))[name])) for step in (1, 2, 16)}
        out["step_variants"][name] = len(keys)
    return out


@pytest.fixture(scope="module")
def hazards(tmp_path_factory):
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, text=True, capture_output=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("name", ["hold_transition", "hold_perturb"])
def test_hold_component_offsets_are_int64(hazards, name):
    got = hazards["launches"][name]
    assert got["signature"]["P"] == "i32"  # the case where j * P would have been 32-bit
    assert got["p_uses"] == ["arith.extsi %P : i32 to i64"], got["p_uses"]
    assert got["tensor_addptr_offsets"] == ["i64"], got["tensor_addptr_offsets"]


def test_likelihood_loop_counter_and_division(hazards):
    got = hazards["launches"]["likelihood_accum"]
    assert got["signature"]["per_sample"] == "i32"
    assert got["for_types"] == ["i64"], got["for_types"]
    assert got["precise_div"] and not got["plain_divf"]
    assert got["tensor_addptr_offsets"] == ["i64"]


def test_sampler_step_offsets_are_int64(hazards):
    got = hazards["launches"]["sampler_step"]
    assert got["signature"]["per_sample"] == "i32"
    assert got["tensor_addptr_offsets"] == ["i64"], got["tensor_addptr_offsets"]


def test_step_is_not_specialised(hazards):
    assert hazards["step_variants"] == {name: 1 for name in hazards["launches"]}

#----------------------------------------------------------------------------
# Launcher guards (CPU: meta tensors, under the interpreter's configuration; nothing is launched).


@pytest.mark.parametrize("dim,cfg", [(2**24, None), (2**23, {"BLOCK_N": 256})], ids=["combine-grid", "tile-offsets"])
def test_optimal_denoiser_rejects_rows_beyond_32bit_offsets(dim, cfg):
    from diffkern.kernels import optimal_denoiser

    x = _meta(2, dim)
    with pytest.raises(ValueError, match="x: expected at most"):
        optimal_denoiser.optimal_denoiser_launch(x, _meta(16, dim), _meta(16), _meta(2), x, cfg)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: the report compiles for the GPU")
    sys.path[:0] = [HERE]
    json.dump(report(), sys.stdout)
