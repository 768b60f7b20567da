"""``bench/sass_path.py``, the static instruction count quoted for the CUDA kernels, on a hand-made listing in
nvdisasm's ``-c`` format (no nvcc needed): the loop, the cheapest path, the path through chosen RSQs."""
import importlib
import os

import pytest

LISTING = """\
.text._ZN2dk3gpu8probe_kernelIfEEvv:
        /*0000*/                   MOV R0, RZ ;
.L_x_0:
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/              @!P0 BRA `(.L_x_1) ;
        /*0030*/                   MUFU.RSQ R3, R2 ;
        /*0040*/                   FMUL R3, R3, R2 ;
        /*0050*/                   FMUL R3, R3, R2 ;
.L_x_1:
        /*0060*/                   STG.E desc[UR4][R6.64], R3 ;
        /*0070*/              @P1 BRA `(.L_x_0) ;
        /*0080*/                   EXIT ;
//--------------------- .text._ZN2dk3gpu5otherEv --------------------------
"""


@pytest.fixture
def sass_path(monkeypatch):
    monkeypatch.syspath_prepend(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return importlib.import_module("bench.sass_path")


def test_counts_the_cheapest_loop_path_and_the_path_through_a_draw(sass_path):
    name, ins, labels = sass_path.parse(LISTING, "probe_kernel")
    assert name == "_ZN2dk3gpu8probe_kernelIfEEvv" and len(ins) == 9 and labels == {".L_x_0": 1, ".L_x_1": 6}
    assert sass_path.hot_path(ins, labels, []) == (4, [2])  # LDG, BRA, STG, BRA: the branch skips the RSQ
    assert sass_path.hot_path(ins, labels, [0]) == (7, [2])  # ... and through RSQ and its two FMULs


def test_an_unknown_kernel_is_named(sass_path):
    with pytest.raises(SystemExit, match="--kernel: no function name contains 'nope'"):
        sass_path.parse(LISTING, "nope")


def test_straight_path_passes_every_reachable_rsq(sass_path):
    listing = LISTING.replace("@P1 BRA `(.L_x_0)", "NOP")  # no loop: entry to EXIT
    name, ins, labels = sass_path.parse(listing, "probe_kernel")
    assert sass_path.straight_path(ins, labels) == (9, 1)  # every instruction: the path through the RSQ
