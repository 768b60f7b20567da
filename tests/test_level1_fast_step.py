"""Level 1's bound fused step: ``FusedScheduler._fused`` runs ``LoopStep.fresh`` on a ``LoopStep`` bound per (table,
device, dtype, shape), which checks the scheduler's table, seed and backend once and only the caller's tensors per
call, against the checked front-end ``diffkern.ops.sampler_step`` that ``step()`` called on every call before.

Oracle: the checked path, the same loop with ``LoopStep._clear`` answering False, so that every call runs the front-end
on the same arguments (every argument validated, the backend resolved); both must agree bitwise (bit patterns, so -0.0
counts) and raise the same errors, type and message. Each test also asserts that the fast path really ran (no
front-end call) where it should, so that the comparison is not of the front-end with itself.
"""
import inspect

import pytest
import torch

from conftest import usable_backends
from diffkern import diffusers as dd
from diffkern.ops import sampler_step_fast
from diffkern.ops.sampler_step_fast import LoopStep

SHAPE = (2, 3, 4, 4)  # H == W: a transpose is a same-shape view with other strides
STEPS = 5
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
BACKENDS = usable_backends("cpu")
CPP = pytest.mark.skipif("cpp" not in BACKENDS, reason="diffkern._C not built")
# (class, config, step() knobs): one-call, two-call (Heun, KDPM2), multistep (histories rotate), noisy (Philox seed,
# generator, explicit variance_noise) and in-place history (GE) schedulers
CASES = [
    ("EulerDiscreteScheduler", {}, {}),
    ("EulerDiscreteScheduler", {}, {"s_churn": 1.0, "generator": 3}),
    ("EulerAncestralDiscreteScheduler", {}, {}),
    ("HeunDiscreteScheduler", {"prediction_type": "v_prediction"}, {}),
    ("KDPM2DiscreteScheduler", {}, {}),
    ("KDPM2AncestralDiscreteScheduler", {}, {"generator": 3}),
    ("DDIMScheduler", {}, {}),
    ("DDIMScheduler", {"clip_sample": True}, {"eta": 0.5, "variance_noise": True}),
    ("DDPMScheduler", {}, {}),
    ("LCMScheduler", {}, {}),
    ("DPMSolverMultistepScheduler", {}, {}),
    ("UniPCMultistepScheduler", {"solver_order": 3}, {}),
    ("LMSDiscreteScheduler", {}, {}),
    ("GEScheduler", {}, {}),
]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def same_bits(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


class FrontEndCalls:
    """Counts the front-end calls ``LoopStep.fresh`` falls back to."""

    def __init__(self, mp):
        self.n = 0
        real = sampler_step_fast.sampler_step

        def spy(*args, **kw):
            self.n += 1
            return real(*args, **kw)
        mp.setattr(sampler_step_fast, "sampler_step", spy)


def make(name, config, backend, steps=STEPS):
    s = getattr(dd, name)(**config)
    s.backend = backend
    s.set_timesteps(steps)
    s.set_seed(7)
    return s


def loop(name, config, knobs, backend, dtype, *, sample_dtype=None, strided=False, hook=None):
    """Every output of a short loop (model output ``0.3*scaled sample + 0.01*k``); ``hook(s, k, x, m)`` may replace
    the sample and model output of call k."""
    s = make(name, config, backend)
    knobs = dict(knobs)
    gen = torch.Generator().manual_seed(knobs.pop("generator")) if "generator" in knobs else None
    if gen is not None:
        assert "generator" in inspect.signature(s.step).parameters
        knobs["generator"] = gen
    noise_gen = torch.Generator().manual_seed(11) if knobs.pop("variance_noise", False) else None
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x.to(sample_dtype or dtype) * float(getattr(s, "init_noise_sigma", 1.0))
    outs = []
    for k, t in enumerate(s.timesteps):
        m = (s.scale_model_input(x, t).double() * 0.3 + 0.01 * k).to(dtype)
        if strided:  # both step() inputs in another layout (the front-end makes them contiguous)
            m, x = (v.transpose(2, 3).contiguous().transpose(2, 3) for v in (m, x))
        if hook is not None:
            x, m = hook(s, k, x, m)
        if noise_gen is not None:
            knobs["variance_noise"] = torch.randn(SHAPE, generator=noise_gen, dtype=torch.float64).to(dtype)
        o = s.step(m, t, x, **knobs)
        outs += [v for v in o.values()]
        x = o.prev_sample
    return outs


def both(run, *, fast_calls=0):
    """``run()`` on the bound step, then on the checked path; asserts how many front-end calls the first made."""
    with pytest.MonkeyPatch.context() as mp:
        calls = FrontEndCalls(mp)
        fast = run()
        if fast_calls is not None:
            assert calls.n == fast_calls
        mp.setattr(LoopStep, "_clear", lambda self, *args: False)
        checked = run()
        assert calls.n > 0
    return fast, checked


def assert_same(fast, checked):
    assert len(fast) == len(checked)
    for k, (a, b) in enumerate(zip(fast, checked)):
        assert same_bits(a, b), f"output {k} differs"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name, config, knobs", CASES, ids=lambda v: v if isinstance(v, str) else "")
def test_bound_step_is_bitwise_the_checked_front_end(name, config, knobs, backend, dtype):
    if backend == "triton" and dtype != torch.float32:
        pytest.skip("triton (CPU interpreter): float32 only, for time")
    assert_same(*both(lambda: loop(name, config, knobs, backend, dtype)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "HeunDiscreteScheduler", "DDIMScheduler",
                                  "DPMSolverMultistepScheduler"])
def test_mixed_dtypes_and_strided_inputs(name, backend):
    # a float16 model output on a float32 sample (promoted or cast as diffusers does); non-contiguous inputs take the
    # front-end (which makes them contiguous) on every call, with the same results
    assert_same(*both(lambda: loop(name, {}, {}, backend, torch.float16, sample_dtype=torch.float32)))
    assert_same(*both(lambda: loop(name, {}, {}, backend, torch.float32, strided=True), fast_calls=None))


def bad_inputs():
    """(what, model_output, sample, exception, message start) from a good pair (m, x)."""
    return [
        ("model_output not a tensor", lambda m, x: (m.tolist(), x), TypeError, "model_output: expected a tensor"),
        ("sample not a tensor", lambda m, x: (m, 1.0), TypeError, "sample: expected a tensor"),
        ("integer model_output", lambda m, x: (m.long(), x), TypeError, "model_output: expected a floating"),
        ("float8 model_output", lambda m, x: (m.to(torch.float8_e4m3fn), x), TypeError,
         "model_output: expected a floating"),
        ("float8 sample", lambda m, x: (m, x.to(torch.float8_e4m3fn)), TypeError, "sample: expected a real"),
        ("complex sample", lambda m, x: (m, x.to(torch.complex64)), TypeError, "sample: expected a real"),
        ("model_output of another shape", lambda m, x: (m[:1], x), ValueError, "model_output: expected the shape"),
        ("model_output on another device", lambda m, x: (m.to("meta"), x), ValueError,
         "model_output: expected sample's device"),
    ]


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "HeunDiscreteScheduler", "DDIMScheduler",
                                  "DPMSolverMultistepScheduler", "LCMScheduler"])
@pytest.mark.parametrize("what, bad, exc, message", bad_inputs(), ids=lambda v: v if isinstance(v, str) else "")
def test_a_bad_input_on_a_later_call_raises_as_on_the_first(name, what, bad, exc, message):
    x = torch.randn(SHAPE)

    def error(s, k):
        m, sample = bad(x * 0.1, x)
        with pytest.raises(exc) as info:
            s.step(m, s.timesteps[k], sample)
        return str(info.value)

    first = error(make(name, {}, None), 0)
    assert first.startswith(message)
    s = make(name, {}, None)
    good = [s.step(x * 0.1, t, x).prev_sample for t in s.timesteps[:2]]
    assert error(s, 2) == first  # the bound step is cached by now: the same check, the same message
    # the bad call wrote nothing and moved nothing: the loop goes on as one that never made it
    rest = [s.step(x * 0.1, t, x).prev_sample for t in s.timesteps[2:]]
    ref = make(name, {}, None)
    want = [ref.step(x * 0.1, t, x).prev_sample for t in ref.timesteps]
    assert all(same_bits(a, b) for a, b in zip(good + rest, want))


def test_bad_variance_noise_raises_as_the_front_end():
    s = make("DDIMScheduler", {}, None)
    x = torch.randn(SHAPE)
    s.step(x * 0.1, s.timesteps[0], x, eta=0.5, variance_noise=torch.randn(SHAPE))
    with pytest.raises(ValueError, match=r"^noise: expected shape \(2, 3, 4, 4\)"):
        s.step(x * 0.1, s.timesteps[1], x, eta=0.5, variance_noise=torch.randn(1, 3, 4, 4))


@pytest.mark.parametrize("backend", BACKENDS[:2])
@pytest.mark.parametrize("name", ["HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "DPMSolverMultistepScheduler",
                                  "UniPCMultistepScheduler", "GEScheduler"])
def test_sample_that_is_a_history_buffer_or_model_output_a_view_of_sample(name, backend):
    cfg = {"solver_order": 3} if name == "UniPCMultistepScheduler" else {}

    def history_as_sample(s, k, x, m):  # the scheduler's own buffer (read and maybe written in place by this call)
        h = s.__dict__.get("_history")
        return (h.copy_(x) if h is not None and k >= 2 else x), m

    def view_of_sample(s, k, x, m):  # the model output is the sample itself, or a transposed view of it
        return x, (x if k % 2 else x.transpose(2, 3))

    for hook in (history_as_sample, view_of_sample):
        fast, checked = both(lambda: loop(name, cfg, {}, backend, torch.float32, hook=hook), fast_calls=None)
        assert_same(fast, checked)


def test_model_output_partly_overlapping_the_history_written_raises_as_before():
    # Heun's predictor writes its slope into the history buffer: a model output that is a transposed view of that
    # buffer overlaps the output without being it, which the front-end refuses; the bound step falls back to it
    for clear in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            if not clear:
                mp.setattr(LoopStep, "_clear", lambda self, *args: False)
            s = make("HeunDiscreteScheduler", {}, None)
            x = torch.randn(SHAPE)
            for t in s.timesteps[:2]:
                x = s.step(x * 0.1, t, x).prev_sample
            with pytest.raises(ValueError, match="^history_out: overlaps model_out without being the same view"):
                s.step(s._history.transpose(2, 3), s.timesteps[2], x)


@CPP
def test_set_seed_and_backend_changes_reach_the_bound_step(monkeypatch):
    def run(s, seed, backends, env=False):
        s.set_seed(seed)
        s.set_timesteps(STEPS)
        x, outs = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)), []
        for t, b in zip(s.timesteps, backends):
            if env:
                s.backend = None
                monkeypatch.setenv("DIFFKERN_BACKEND", b)
            else:
                s.backend = b
            x = s.step(x * 0.1, t, x).prev_sample
            outs.append(x)
        return outs

    s = dd.EulerAncestralDiscreteScheduler()
    a, b, c = (run(s, seed, ["cpp"] * STEPS) for seed in (1, 2, 1))
    assert not same_bits(a[0], b[0])  # a new seed is a new stream (the seeded step is bound again)
    assert_same(a, c)
    # a backend switched mid-loop, by the attribute or (backend None) by DIFFKERN_BACKEND, is the one that runs
    mixed = ["cpp", "reference", "reference", "cpp", "reference"]
    bound = []
    real = LoopStep.__init__

    def spy(self, *args, **kw):
        real(self, *args, **kw)
        bound.append(self.backend)
    monkeypatch.setattr(LoopStep, "__init__", spy)
    for env in (False, True):
        bound.clear()
        assert_same(*both(lambda: run(s, 1, mixed, env)))
        assert bound[:4] == ["cpp", "cpp", "reference", "reference"]  # (a plain and a seeded step per backend)
