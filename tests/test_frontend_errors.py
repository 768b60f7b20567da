"""Front-end errors a user walkthrough found: ``sample``'s docstring names every knob, ``available`` refuses a
device type torch does not know and reports every GPU backend unusable on a machine without CUDA, meta-device
seeds/states/schedules are refused naming the argument, and a scalar ``sigmas`` points to the schedule builders."""
import re

import pytest
import torch

import diffkern
from diffkern import sampler_loop, schedules
from diffkern.ops import registry
from diffkern.sampling import SAMPLERS, knobs, sample, sample_iadb

GPU_BACKENDS = ("triton", "cuda")


def _model(x, sigma):
    return x / (1.0 + sigma.view(-1, *([1] * (x.dim() - 1))) ** 2)


def _knob_paragraph() -> str:
    doc = sample.__doc__
    start = doc.index("**knob_values:")
    return doc[start:doc.index("Returns:", start)]


def test_sample_docstring_names_every_knob_of_every_method():
    text = _knob_paragraph()
    missing = {m: [k for k in knobs(m) if not re.search(rf"\b{re.escape(k)}\b", text)] for m in SAMPLERS}
    assert not {m: ks for m, ks in missing.items() if ks}, missing


def test_sample_docstring_knob_paragraph_names_only_real_methods():
    # the paragraph says which methods take a knob: a renamed or removed method must not linger in it
    words = set(re.findall(r"\b[a-z][a-z0-9]*(?:_[a-z0-9]+)*\b", _knob_paragraph()))
    all_knobs = set().union(*(knobs(m) for m in SAMPLERS))
    named = {w for w in words if w in SAMPLERS or "_" in w} - all_knobs - {"knob_values"}
    assert named <= set(SAMPLERS), sorted(named - set(SAMPLERS))

#----------------------------------------------------------------------------
# registry.available


@pytest.mark.parametrize("bad", ["gpu", "CUDA", "", "cuda:x"])
def test_available_refuses_an_unknown_device_type(bad):
    with pytest.raises(ValueError, match=rf"^device_type: {re.escape(repr(bad))} is not a torch device") as info:
        diffkern.available(bad)
    if bad in ("gpu", "CUDA"):  # torch's own list of the device types it accepts
        assert "cpu, cuda" in str(info.value)


def test_available_refuses_a_non_string_device_type():
    with pytest.raises(TypeError, match=r"^device_type: expected a torch device string"):
        diffkern.available(0)


def test_available_takes_device_strings_with_an_index_and_torch_devices():
    assert diffkern.available("cuda:0") == diffkern.available("cuda")
    assert diffkern.available(torch.device("cpu")) == diffkern.available("cpu")


def test_available_on_cuda_without_cuda_reports_every_gpu_backend(monkeypatch):
    monkeypatch.setattr(registry, "_cuda_available", lambda: False)
    status = diffkern.available("cuda")
    assert status["reference"] is None
    for name in GPU_BACKENDS:
        assert status[name] is not None, name
    # triton's reason is the missing device (or triton itself missing, or the interpreter in the way)
    assert status["triton"] in ("torch reports no CUDA device", registry._triton_status()[1],
                                "TRITON_INTERPRET=1 is set, so triton cannot launch on CUDA tensors")
    with pytest.raises(registry.BackendUnavailable, match="unavailable"):
        registry.resolve("sampler_step", "cuda", "triton")


def test_available_on_this_machine_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    status = diffkern.available("cuda")
    assert all(status[name] is not None for name in GPU_BACKENDS), status


def test_available_on_meta_reports_triton_unusable():
    status = diffkern.available("meta")
    assert status["triton"] is not None and "'meta'" in status["triton"]
    assert status["cuda"] is not None and status["cpp"] is not None

#----------------------------------------------------------------------------
# meta tensors


def test_seed_on_meta_is_refused_naming_seed():
    meta = torch.tensor([3], dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match=r"^seed: .*meta device"):
        sampler_loop.seed_value(meta, 2)
    with pytest.raises(ValueError, match=r"^seed: .*meta device"):
        sampler_loop.make_seed(meta, torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"^seed: .*meta device"):
        sample(_model, torch.randn(2, 3), schedules.karras(3, 0.1, 5.0), "euler_ancestral", seed=meta)


def test_make_seed_for_a_meta_state_still_builds_a_meta_seed():
    # the drop-in schedulers stage a seed on set_timesteps(device=...), which may be meta; an int has values
    seed = sampler_loop.make_seed(5, torch.empty(2, device="meta"))
    assert seed.is_meta and seed.dtype == torch.int64 and seed.shape == (1,)


def test_x_on_meta_is_refused_naming_x():
    x = torch.empty(2, 3, device="meta")
    with pytest.raises(ValueError, match=r"^x: .*meta device"):
        sample(_model, x, schedules.karras(3, 0.1, 5.0), "euler")
    with pytest.raises(ValueError, match=r"^x: .*meta device"):
        SAMPLERS["euler"](_model, x, schedules.karras(3, 0.1, 5.0))
    with pytest.raises(ValueError, match=r"^x0: .*meta device"):
        sample_iadb(lambda x, a: torch.zeros_like(x), x, steps=3)


def test_sigmas_on_meta_is_refused_naming_sigmas():
    with pytest.raises(ValueError, match=r"^sigmas: .*meta device"):
        sample(_model, torch.randn(2, 3), torch.empty(4, device="meta"), "euler")

#----------------------------------------------------------------------------
# a scalar schedule


@pytest.mark.parametrize("sigmas", [10, 10.0, torch.tensor(10), torch.tensor(2.5, dtype=torch.float64)])
def test_scalar_sigmas_points_to_the_schedule_builders(sigmas):
    with pytest.raises(ValueError, match=r"^sigmas: expected a 1-D schedule of N\+1 values, got a scalar") as info:
        sample(_model, torch.randn(2, 3), sigmas, "euler")
    assert "diffkern.schedules.karras(n, sigma_min, sigma_max)" in str(info.value)
    for builder in ("edm", "loglinear", "polyexponential", "vp"):  # the hint names real builders
        assert builder in str(info.value) and callable(getattr(schedules, builder))


def test_two_dimensional_sigmas_keeps_its_shape_message():
    with pytest.raises(ValueError, match=r"^sigmas: expected a 1-D schedule, got shape \(1, 2\)"):
        sample(_model, torch.randn(2, 3), [[1.0, 0.0]], "euler")
