"""The coefficient-table layout helpers: row defaults, validation, and the once-per-version check."""
import math

import pytest
import torch

import diffkern.ops as dops
from diffkern.ops import coefs


def test_row_defaults_and_unknown_name():
    r = coefs.row(a=0.5)
    assert len(r) == coefs.NCOEF
    assert r[coefs.A] == 0.5 and r[coefs.Q] == 1.0 and r[coefs.W] == 1.0 and r[coefs.CLIP] == math.inf
    with pytest.raises(ValueError, match="unknown coefficient"):
        coefs.row(zeta=1.0)


def test_table_rejects_non_finite_and_bad_clip():
    with pytest.raises(ValueError, match=r"^coef\[1\]: non-finite coefficient in slot b"):
        coefs.table([coefs.row(), coefs.row(b=math.nan)])
    with pytest.raises(ValueError, match=r"^coef\[0\]: clip slot must be > 0"):
        coefs.table([coefs.row(clip=0.0)])


def test_in_place_write_after_a_call_is_checked_again():
    """A table validated by one call is re-validated after an in-place write, before anything is written."""
    x = torch.randn(2, 5)
    table = coefs.table([coefs.row(a=1.0, b=0.5)] * 2)
    dops.sampler_step(x, x, table, 0, backend="reference")
    table[1, coefs.A] = math.inf
    out = torch.zeros_like(x)
    with pytest.raises(ValueError, match=r"^coef\[1\]: non-finite"):
        dops.sampler_step(x, x, table, 0, out=out, backend="reference")
    assert torch.count_nonzero(out) == 0
    table[1, coefs.A] = 1.0
    dops.sampler_step(x, x, table, 1, out=out, backend="reference")
    torch.testing.assert_close(out, 1.5 * x)


def test_missing_history_with_nonzero_c_is_an_error():
    x = torch.randn(2, 5)
    table = coefs.table([coefs.row(a=1.0, c=0.5)])
    out = torch.zeros_like(x)
    with pytest.raises(ValueError, match=r"^history: required"):
        dops.sampler_step(x, x, table, 0, out=out, backend="reference")
    assert torch.count_nonzero(out) == 0


def test_randn_seed_error_names_the_shape():
    with pytest.raises(ValueError, match=r"B = shape\[0\] = 4"):
        dops.randn((4, 3), torch.zeros(3, dtype=torch.int64), backend="reference")
