"""Follow-ups of the awkward-input review (tests/test_input_review18.py): values that were silently misread are
refused by name: a numpy schedule of complex or bool dtype (a float64 cast dropped the imaginary part, read 0/1),
a backend of 0 / False (read as "unset": DIFFKERN_BACKEND, then auto) or of another type than str, a NaN knob (a
ValueError now: it is a number, not the wrong type), and a non-bool ``record`` ("no" recorded)."""
import numpy as np
import pytest
import torch

import diffkern
from diffkern import analytic, samplers, schedules

GMM = analytic.GaussianMixture.demo_2d()
SIGMAS = [2.0, 1.0, 0.0]


def start():
    return torch.randn(3, 2, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("bad,dtype", [(np.array([2.0 + 0j, 1.0, 0.0]), "complex128"),
                                       (np.array([True, False]), "bool")])
def test_complex_or_bool_numpy_schedules_are_refused(bad, dtype):
    with pytest.raises(TypeError, match=f"^sigmas: expected a real array, got dtype {dtype}"):
        diffkern.sample(GMM, start(), bad, "euler")
    with pytest.raises(TypeError, match=f"^sigmas: expected a real array, got dtype {dtype}"):
        samplers.sample_euler(GMM, start(), bad)
    with pytest.raises(TypeError, match=f"^alphas: expected a real array, got dtype {dtype}"):
        diffkern.sample_iadb(lambda x, a: x, start(), bad)
    with pytest.raises(TypeError, match="^betas: expected a real array"):
        schedules.host_float64(bad, "betas")


def test_real_numpy_schedules_still_read_exactly():
    s = np.array(SIGMAS, dtype=np.float64)
    assert torch.equal(diffkern.sample(GMM, start(), s, "euler"), diffkern.sample(GMM, start(), SIGMAS, "euler"))


@pytest.mark.parametrize("backend", [0, False, 3, b"cpp"])
def test_backend_must_be_none_or_a_name(backend, monkeypatch):
    """("" means "not given", as None: tests/test_registry.py.)"""
    monkeypatch.setenv("DIFFKERN_BACKEND", "reference")  # 0 and False used to fall through to it silently
    x = start()
    keep = x.clone()
    with pytest.raises(TypeError, match="^backend: expected None or a backend name"):
        diffkern.sample(GMM, x, SIGMAS, "euler", backend=backend)
    assert torch.equal(x, keep)


@pytest.mark.parametrize("knob", ["eta", "s_noise"])
def test_nan_knob_is_a_value_error(knob):
    with pytest.raises(ValueError, match=f"^{knob}: expected a finite value"):
        diffkern.sample(GMM, start(), SIGMAS, "euler_ancestral", **{knob: float("nan")})
    with pytest.raises(TypeError, match=f"^{knob}: expected a number"):
        diffkern.sample(GMM, start(), SIGMAS, "euler_ancestral", **{knob: "0.5"})


@pytest.mark.parametrize("record", ["no", 1, None, torch.tensor(True)])
def test_record_must_be_a_bool(record):
    with pytest.raises(TypeError, match="^record: expected a bool"):
        diffkern.sample(GMM, start(), SIGMAS, "euler", record=record)
    with pytest.raises(TypeError, match="^record: expected a bool"):
        diffkern.sample_iadb(lambda x, a: x, start(), 4, record=record)
