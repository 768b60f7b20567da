"""The backend registry (``diffkern/ops/registry.py``): explicit selection, no silent fallbacks.

Resolution order: the ``backend=`` argument, then ``DIFFKERN_BACKEND``, then ``auto``. A requested backend
that cannot run raises ``BackendUnavailable`` with the reason; only ``auto`` falls back, warning once.
"""
import subprocess
import sys
import warnings

import pytest
import torch

import diffkern.ops as dops
from diffkern.ops import registry
from diffkern.ops.registry import BackendUnavailable

NOT_BUILT = "diffkern._C is not built (simulated by the test)"


@pytest.fixture
def no_extension(monkeypatch):
    """The registry as it is on a machine where ``diffkern._C`` failed to build."""
    monkeypatch.setattr(registry, "_extension", lambda: (None, NOT_BUILT))
    monkeypatch.setattr(registry, "_warned", set())


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("DIFFKERN_BACKEND", raising=False)
    monkeypatch.setattr(registry, "_warned", set())


def _usable(device_type="cpu"):
    return [b for b, why in dops.available(device_type).items() if why is None]


def test_families_are_registered():
    assert {"sampler_step", "iadb_blend", "philox_normal"} <= set(dops.ops())


@pytest.mark.parametrize("backend", _usable("cpu"))
def test_argument_wins_over_environment(clean_env, monkeypatch, backend):
    other = next(b for b in ("reference", "cpp", "triton") if b != backend)
    monkeypatch.setenv("DIFFKERN_BACKEND", other)
    name, launch = dops.resolve("sampler_step", "cpu", backend)
    assert name == backend and callable(launch)


@pytest.mark.parametrize("backend", _usable("cpu"))
def test_environment_wins_over_auto(clean_env, monkeypatch, backend):
    monkeypatch.setenv("DIFFKERN_BACKEND", backend)
    assert dops.resolve("iadb_blend", "cpu")[0] == backend
    assert dops.resolve("iadb_blend", "cpu", None)[0] == backend


def test_environment_applies_to_front_ends(clean_env, monkeypatch):
    monkeypatch.setenv("DIFFKERN_BACKEND", "cuda")
    with pytest.raises(BackendUnavailable, match=r"backend 'cuda' requested for op 'philox_normal' on cpu"):
        dops.randn((2, 3), torch.zeros(1, dtype=torch.int64))


def test_auto_prefers_cpp_on_cpu(clean_env):
    expected = "cpp" if "cpp" in _usable("cpu") else "reference"
    for op in ("sampler_step", "iadb_blend", "philox_normal"):
        assert dops.resolve(op, "cpu")[0] == expected
        assert dops.resolve(op, "cpu", "auto")[0] == expected


def test_auto_never_picks_the_triton_interpreter(clean_env):
    assert "triton" not in registry.AUTO_ORDER["cpu"]
    assert dops.resolve("sampler_step", "cpu")[0] != "triton"


def test_requested_backend_unavailable_raises_with_reason(clean_env, no_extension):
    with pytest.raises(BackendUnavailable, match=r"backend 'cpp' requested for op 'sampler_step' on cpu but "
                                                 r"unavailable: diffkern._C is not built \(simulated"):
        dops.resolve("sampler_step", "cpu", "cpp")
    x = torch.zeros(2, 3)
    out = torch.full_like(x, 7.0)
    with pytest.raises(BackendUnavailable, match=r"unavailable: diffkern._C is not built"):
        dops.sampler_step(x, x, dops.coefs.table([dops.coefs.row()]), 0, out=out, backend="cpp")
    assert (out == 7.0).all()


def test_backend_on_the_wrong_device_raises(clean_env):
    with pytest.raises(BackendUnavailable, match=r"backend 'cuda' .* runs on \['cuda'\] tensors, not 'cpu'"):
        dops.resolve("sampler_step", "cpu", "cuda")
    with pytest.raises(BackendUnavailable, match=r"backend 'cpp' .* runs on \['cpu'\] tensors, not 'cuda'"):
        dops.resolve("sampler_step", "cuda", "cpp")


def test_triton_on_cpu_needs_the_interpreter(clean_env, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, why = dops.backend_status("triton", "cpu")
    if registry._triton_status()[0]:
        assert not ok and "TRITON_INTERPRET=1" in why
    with pytest.raises(BackendUnavailable, match=r"backend 'triton'"):
        dops.resolve("iadb_blend", "cpu", "triton")


def test_auto_falls_back_and_warns_once(clean_env, no_extension):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert dops.resolve("sampler_step", "cpu")[0] == "reference"
        assert dops.resolve("iadb_blend", "cpu")[0] == "reference"
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len([m for m in messages if "'sampler_step'" in m]) == 1, messages
    assert len([m for m in messages if "'iadb_blend'" in m]) == 1, messages
    assert "falls back to 'reference'" in messages[0] and NOT_BUILT in messages[0]


def test_auto_does_not_warn_when_the_first_choice_runs(clean_env):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dops.resolve("sampler_step", "cpu")


def test_front_end_auto_fallback_warns_from_the_caller(clean_env, no_extension):
    x = torch.zeros(2, 3)
    with pytest.warns(RuntimeWarning, match="falls back to 'reference'") as record:
        dops.iadb_blend(x, x, torch.zeros(2))
    assert record[0].filename == __file__


def test_available_explains_missing_backends(no_extension):
    status = dops.available()
    assert set(status) == set(registry.BACKENDS)
    assert status["reference"] is None
    assert status["cpp"] == NOT_BUILT
    assert status["cuda"] == (NOT_BUILT if torch.cuda.is_available() else "torch reports no CUDA device")
    cpu = dops.available("cpu")
    assert "runs on ['cuda'] tensors" in cpu["cuda"]


def test_available_on_a_cpu_machine_probes_no_cuda_loader(monkeypatch):
    def probe():
        raise AssertionError("a CUDA loader was probed on a machine without a CUDA device")
    monkeypatch.setattr(registry, "_cuda_available", lambda: False)
    monkeypatch.setattr(registry, "cuda_loader", probe)
    monkeypatch.setattr(registry, "_rtc_status", probe)
    assert dops.available()["cuda"] == "torch reports no CUDA device"
    assert dops.available("cuda")["cuda"] == "torch reports no CUDA device"


def test_available_reports_cuda_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    why = dops.available()["cuda"]
    assert why is not None and ("CUDA" in why or "cuda" in why)


@pytest.mark.parametrize("name", ["bogus", "CPP", "gpu", ""])
def test_unknown_backend_raises(clean_env, name):
    if name == "":  # empty means "not given": the environment, then auto
        assert dops.resolve("sampler_step", "cpu", name)[0] in registry.BACKENDS
        return
    with pytest.raises(BackendUnavailable, match=rf"^backend: op 'sampler_step' has no {name!r} implementation"):
        dops.resolve("sampler_step", "cpu", name)
    with pytest.raises(ValueError, match=rf"^backend: unknown backend {name!r}"):
        dops.backend_status(name)


def test_unknown_backend_from_environment_raises(clean_env, monkeypatch):
    monkeypatch.setenv("DIFFKERN_BACKEND", "bogus")
    x = torch.zeros(2, 3)
    with pytest.raises(BackendUnavailable, match=r"^DIFFKERN_BACKEND: op 'iadb_blend' has no 'bogus' implementation"):
        dops.iadb_blend(x, x, torch.zeros(2))


def test_unknown_op_raises():
    with pytest.raises(KeyError, match=r"op: unknown op family 'nope'"):
        dops.resolve("nope", "cpu")


def test_import_is_cheap():
    """``import diffkern`` (and ``diffkern.ops``) loads neither Triton nor the extension."""
    code = ("import sys, diffkern, diffkern.ops; "
            "print(sorted(m for m in ('triton', 'diffkern._C', 'diffkern.kernels') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]", res.stdout + res.stderr


def test_excluded_backends(clean_env, monkeypatch):
    """A call may exclude backends (HOLD above the fused order): named, it raises with the reason; auto skips it and
    warns once per excluded set, apart from the ordinary fallback warning."""
    why = {"cpp": "cannot run this call (test reason)"}
    with pytest.raises(BackendUnavailable, match=r"^backend: 'cpp' cannot run this call \(test reason\)$"):
        dops.resolve("sampler_step", "cpu", "cpp", why)
    monkeypatch.setenv("DIFFKERN_BACKEND", "cpp")
    with pytest.raises(BackendUnavailable, match=r"^DIFFKERN_BACKEND: 'cpp' cannot run"):
        dops.resolve("sampler_step", "cpu", excluded=why)
    monkeypatch.delenv("DIFFKERN_BACKEND")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert dops.resolve("sampler_step", "cpu")[0] == "cpp"
        for _ in range(2):
            assert dops.resolve("sampler_step", "cpu", excluded=why)[0] == "reference"
        assert dops.resolve("sampler_step", "cpu", excluded={})[0] == "cpp"
    messages = [str(w.message) for w in caught]
    assert messages == ["diffkern: op 'sampler_step' on cpu falls back to 'reference' (cpp: cannot run this call "
                        "(test reason))"], messages
    assert dops.resolve("sampler_step", "cpu", "reference", why)[0] == "reference"
