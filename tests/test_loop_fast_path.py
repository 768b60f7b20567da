"""The sampling loop's bound fused op (``diffkern.ops.sampler_step_fast.LoopStep``): validated once at ``begin``, each
step checking only the model's outputs, against the checked front-end ``diffkern.ops.sampler_step`` that the loop
called before.

Oracles:
- the checked path: the same loop with ``LoopStep.step``/``launch`` replaced by the front-end call the loop made
  before (every argument validated, the backend resolved, on every call), which must agree bitwise (bit patterns,
  so -0.0 counts) and raise the same errors, type and message;
- the reference drawing its noise on every row (``skip_noise=False``), for the rows it is told draw none.
"""
import importlib
import warnings

import pytest
import torch

import diffkern
from diffkern import graphs, sampler_loop, sampler_plans, samplers, schedules
from diffkern.ops import coefs, philox, registry, sampler_step, sampler_step_fast, sampler_step_reference
from diffkern.ops.sampler_step_fast import LoopStep
from diffkern.sampling import knobs
from test_graphs import fake, fresh_cache  # noqa: F401  (fixtures: fake, autouse fresh_cache)

F32, F64 = torch.float32, torch.float64
REF = "reference"
needs_cpp = pytest.mark.skipif(diffkern.ops.available("cpu")["cpp"] is not None, reason="diffkern._C not built")
BACKENDS = [REF, pytest.param("cpp", marks=needs_cpp)]
# knobs that make a method draw noise (and churn) where its defaults do not
NOISY = {"euler": {"s_churn": 2.0}, "heun": {"s_churn": 2.0}, "dpm_2": {"s_churn": 2.0},
         "dpmsolver_3m": {"eta": 1.0}, "dpm_fast": {"eta": 1.0}, "res_multistep": {"eta": 1.0}, "ge": {"mu": 0.5}}


def denoiser(x, sigma):
    """The exact denoiser of N(0, I) data, any shape: D = x / (1 + sigma^2)."""
    return x / (1.0 + sigma.to(x.dtype).view(-1, *[1] * (x.dim() - 1)) ** 2)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def same_bits(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def checked_path(mp):
    """The loop as it ran before: every launch through the checked front-end, with the loop's table and seed."""
    def call(self, x, model_out, row, **kw):
        sampler_step(x, model_out, self.table, row, seed=self.seed, backend=self.backend, **kw)
    mp.setattr(LoopStep, "step", call)
    mp.setattr(LoopStep, "launch", call)


def both(run):
    """``run()`` on the bound op, then on the checked path."""
    fast = run()
    with pytest.MonkeyPatch.context() as mp:
        checked_path(mp)
        return fast, run()


def start(shape, dtype, sigma=10.0, seed=0):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * sigma).to(dtype)

#----------------------------------------------------------------------------
# Bitwise the checked path, every sampler.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", sorted(samplers.SAMPLERS))
def test_every_sampler_equals_the_checked_path(method, backend):
    sig = schedules.karras(5, 0.05, 10.0)
    kw = NOISY.get(method, {})
    for dtype, shape in ((F32, (3, 2, 5)), (F64, (2, 7))):
        x = start(shape, dtype)
        fast, checked = both(lambda: diffkern.sample(denoiser, x, sig, method, seed=5, backend=backend, **kw))
        assert same_bits(fast, checked), (method, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["euler", "heun", "dpmpp_3m_sde", "lms"])
def test_callback_and_trajectory_equal_the_checked_path(method, backend):
    """With a callback each step writes a fresh state and x0 (ping-pong), with a trajectory x0 goes to its rows."""
    sig, x = schedules.karras(4, 0.05, 10.0), start((3, 4), F32)
    kw = NOISY.get(method, {})

    def run():
        seen = []
        out, traj = diffkern.sample(denoiser, x, sig, method, seed=2, backend=backend, record=True,
                                    callback=lambda d: seen.append((d["x"], d["denoised"])), **kw)
        return out, traj, seen

    (a, ta, sa), (b, tb, sb) = both(run)
    assert same_bits(a, b) and all(same_bits(ta[k], tb[k]) for k in ta)
    assert len(sa) == len(sb) == 4 and all(same_bits(u, v) for p, q in zip(sa, sb) for u, v in zip(p, q))


class Guided:
    """A fused model (``diffkern.wrappers``' interface) with guidance: eps prediction, (cond, uncond) outputs."""
    guidance_scale = 2.5

    def __call__(self, x, sigma):  # D, which the loop never calls (it fuses raw's outputs and the conversion)
        raise AssertionError("the loop calls raw")

    def conversion(self, sigma):
        return 1.0, -sigma

    def raw(self, x, sigma):
        s = sigma.to(x.dtype).view(-1, *[1] * (x.dim() - 1))
        return torch.tanh(x) * s / (1 + s * s), x * s / (1 + s * s)


@pytest.mark.parametrize("backend", BACKENDS)
def test_guidance_equals_the_checked_path(backend):
    sig, x = schedules.karras(5, 0.05, 10.0), start((2, 3, 4), F32)
    for method in ("euler_ancestral", "dpmpp_2m_sde", "heun"):
        fast, checked = both(lambda: diffkern.sample(Guided(), x, sig, method, seed=9, backend=backend))
        assert same_bits(fast, checked), method


@pytest.mark.parametrize("method", sorted(samplers.SAMPLERS))
def test_triton_interpreter_equals_the_checked_path(method):
    if diffkern.ops.available("cpu")["triton"] is not None:
        pytest.skip(diffkern.ops.available("cpu")["triton"])
    sig, x = schedules.karras(4, 0.05, 10.0), start((2, 3), F32)
    kw = NOISY.get(method, {})
    fast, checked = both(lambda: diffkern.sample(denoiser, x, sig, method, seed=4, backend="triton", **kw))
    assert same_bits(fast, checked), method

#----------------------------------------------------------------------------
# What a model returns is checked at every step, with the front-end's messages.


def changing(bad, at=2):
    """A model returning ``bad(x, D)`` from its ``at``-th call on (the first is checked by the loop itself)."""
    calls = []

    def model(x, sigma):
        calls.append(1)
        d = denoiser(x, sigma)
        return bad(x, d) if len(calls) >= at else d
    return model


BAD_OUTPUTS = {
    "int dtype": (lambda x, d: d.to(torch.int64), TypeError,
                  r"^model_out: expected a floating dtype in \[.*\], got torch.int64$"),
    "shape": (lambda x, d: d[:, :1], ValueError,
              r"^model_out: expected shape \(3, 3, 2\) \(that of x\), got \(3, 1, 2\)$"),
    "device": (lambda x, d: d.to("meta"), ValueError, r"^model_out: expected device cpu \(that of x\), got meta$"),
    "not a tensor": (lambda x, d: d.tolist(), TypeError, r"^model_out: expected a torch.Tensor, got list$"),
}  # a view of the state other than itself is copied, not refused, since session 19 (test_loop_review)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(BAD_OUTPUTS))
def test_a_model_going_wrong_on_step_2_raises_as_before(case, backend):
    bad, exc, message = BAD_OUTPUTS[case]
    sig, x = schedules.karras(4, 0.05, 10.0), start((3, 3, 2), F32)
    errors = []
    for path in ("fast", "checked"):
        with pytest.MonkeyPatch.context() as mp:
            if path == "checked":
                checked_path(mp)
            with pytest.raises(exc, match=message) as info:
                diffkern.sample(changing(bad), x, sig, "dpmpp_2m", seed=1, backend=backend)
            errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_uncond_dtype_changing_on_step_2_raises_as_before(backend):
    class Drifting(Guided):
        calls = 0

        def raw(self, x, sigma):
            Drifting.calls += 1
            m, u = super().raw(x, sigma)
            return (m, u.double()) if Drifting.calls >= 2 else (m, u)

    sig, x = schedules.karras(4, 0.05, 10.0), start((2, 5), F32)
    errors = []
    for path in ("fast", "checked"):
        Drifting.calls = 0
        with pytest.MonkeyPatch.context() as mp:
            if path == "checked":
                checked_path(mp)
            with pytest.raises(TypeError, match=r"^model_out_uncond: expected dtype torch.float32 \(that of "
                                                r"model_out\), got torch.float64$") as info:
                diffkern.sample(Drifting(), x, sig, "euler", seed=1, backend=backend)
            errors.append(str(info.value))
    assert errors[0] == errors[1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["float16", "float64", "non-contiguous", "x itself"])
def test_valid_changes_on_step_2_equal_the_checked_path(case, backend):
    """Another float dtype, a non-contiguous layout, or x itself (exact in-place use) from step 2 on: run, and as
    the checked path runs them."""
    change = {"float16": lambda x, d: d.half(), "float64": lambda x, d: d.double(),
              "non-contiguous": lambda x, d: d.transpose(0, 1).contiguous().transpose(0, 1),
              "x itself": lambda x, d: x}[case]
    sig, x = schedules.karras(5, 0.05, 10.0), start((3, 3, 2), F32)
    for method in ("euler_ancestral", "dpmpp_3m_sde"):
        fast, checked = both(lambda: diffkern.sample(changing(change), x, sig, method, seed=1, backend=backend))
        assert same_bits(fast, checked), (case, method)
        assert torch.isfinite(fast).all()

#----------------------------------------------------------------------------
# Bound once: the backend and its auto fallback at begin.


def test_backend_resolved_once_per_loop_not_per_step(monkeypatch):
    counts = {"bound": 0, "front-end": 0}

    def counting(key, real):
        def f(*a, **k):
            counts[key] += 1
            return real(*a, **k)
        return f

    monkeypatch.setattr(sampler_step_fast, "resolve", counting("bound", sampler_step_fast.resolve))
    front_end = importlib.import_module("diffkern.ops.sampler_step")  # the module (the package exports the function)
    monkeypatch.setattr(front_end, "resolve", counting("front-end", front_end.resolve))
    diffkern.sample(denoiser, start((2, 3), F32), schedules.karras(6, 0.05, 10.0), "heun", s_churn=1.0, seed=0)
    assert counts == {"bound": 1, "front-end": 0}


def test_auto_fallback_warns_once_before_the_first_model_call(monkeypatch):
    monkeypatch.setattr(registry, "_extension", lambda: (None, "not built (test)"))
    monkeypatch.setattr(registry, "_warned", set())
    monkeypatch.delenv("DIFFKERN_BACKEND", raising=False)
    seen_at_first_call = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        def model(x, sigma):
            if not seen_at_first_call:
                seen_at_first_call.append(len(caught))
            return denoiser(x, sigma)
        for _ in range(2):
            diffkern.sample(model, start((2, 3), F32), schedules.karras(4, 0.05, 10.0), "euler", seed=0)
    fallbacks = [w for w in caught if "falls back to 'reference'" in str(w.message)]
    assert len(fallbacks) == 1 and seen_at_first_call == [1]
    assert "op 'sampler_step' on cpu" in str(fallbacks[0].message)

#----------------------------------------------------------------------------
# The reference skips the Philox draw of rows the host table says draw none.


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, F32, F64])
def test_skip_noise_is_bitwise_the_draw_times_zero(dtype):
    """Rows with s = 0 (with and without histories, guidance, clipping, explicit noise): skip_noise=True gives the
    bits of the masked draw, -0.0 included (-0.0 + 0.0 = +0.0 either way)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, generator=g, dtype=F64).to(dtype)
    x[0, :3] = -0.0  # a*x + b*D = -0.0 + -0.0 below
    m, u, h, h2 = (torch.randn(3, 5, generator=g, dtype=F64).to(dtype) for _ in range(4))
    m[0, :3] = -1.0
    table = coefs.table([coefs.row(a=1.0, b=0.0, q=1.0),  # D = m; out = x + 0*D: -0.0 stays -0.0 before the noise
                         coefs.row(a=0.7, b=0.3, g=0.1, c=0.2, c2=-0.1, w=2.0, clip=0.5),
                         coefs.row(a=0.9, b=0.1, e=1.0, f=-0.5, s=0.0)])
    seed = torch.tensor([11])
    for step, kw in ((0, {}), (1, {"model_out_uncond": u, "history": h, "history2": h2}), (2, {}),
                     (2, {"noise": torch.randn(3, 5, generator=g, dtype=F64).to(dtype)})):
        want = sampler_step_reference(x, m, table, step, seed=seed, **kw)
        got = sampler_step_reference(x, m, table, step, seed=seed, skip_noise=True, **kw)
        assert all(same_bits(a, b) for a, b in zip(got, want)), (dtype, step)
    assert bits(sampler_step_reference(x, m, table, 0, seed=seed, skip_noise=True)[0])[0, 0] == 0  # +0.0


def _count_draws(monkeypatch):
    draws = []
    real = philox.noise_like

    def spy(x, seed, step, dtype=None):
        draws.append(step)
        return real(x, seed, step, dtype)
    monkeypatch.setattr(philox, "noise_like", spy)
    return draws


@pytest.mark.parametrize("method", ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde"])
def test_reference_loop_draws_only_rows_with_noise(monkeypatch, method):
    sig = schedules.karras(5, 0.05, 10.0)
    kw = NOISY.get(method, {})
    loop = sampler_loop._Loop(denoiser, start((2, 3), F32), sig, None, None, True, 0, REF, None)
    plan = sampler_plans.PLANS[method](loop.sigmas, loop.conv, **{**knobs(method), **kw})
    draws = _count_draws(monkeypatch)
    sampler_loop._run(loop, plan)
    s = plan.table[:, coefs.S].tolist()
    ran = [plan.churn_row + i for i in range(plan.steps) if plan.churn[i]] + \
        [plan.step_row + i for i in range(plan.steps)] + \
        [plan.corrector_row + i for i in range(plan.steps) if plan.corrector[i]]
    assert sorted(draws) == sorted(r for r in ran if s[r] != 0)
    if method == "dpmpp_2m":
        assert draws == []


def _euler_ancestral(sigmas, eta):
    return sampler_plans.PLANS["euler_ancestral"](sigmas, sampler_loop.conversion_rows(denoiser), eta=eta,
                                                  s_noise=1.0)


def test_table_rewritten_in_place_is_read_again():
    """A table rewritten in place between runs (as a graph feed rewrites it) is re-read: a row that drew no noise
    when bound draws it after the rewrite."""
    sig, x = schedules.karras(5, 0.05, 10.0), start((2, 3), F32)
    quiet, noisy = _euler_ancestral(sig.tolist(), 0.0), _euler_ancestral(sig.tolist(), 1.0)
    assert not (quiet.table[:, coefs.S] != 0).any() and (noisy.table[:, coefs.S] != 0).any()
    loop = sampler_loop._Loop(denoiser, x, sig, None, None, True, 3, REF, None)
    loop.begin(quiet)
    loop.table.copy_(noisy.table)
    loop.x.copy_(x)
    sampler_loop.run_steps(loop, noisy)
    want = sampler_loop._run(sampler_loop._Loop(denoiser, x, sig, None, None, True, 3, REF, None), noisy)
    assert same_bits(loop.x, want)


def test_graph_captured_on_a_quiet_table_replays_a_noisy_one(fake):  # noqa: F811
    """A capture bakes in no row's zeros: captured with eta = 0 (no noise), replayed with eta = 1, as eager."""
    sig, x = schedules.karras(5, 0.05, 10.0), start((4, 2), F64)
    for eta in (0.0, 1.0, 0.0):
        y = diffkern.sample(denoiser, x, sig, "euler_ancestral", eta=eta, seed=6, backend=REF, graph=True)
        assert same_bits(y, diffkern.sample(denoiser, x, sig, "euler_ancestral", eta=eta, seed=6, backend=REF)), eta
    assert graphs.info()["captures"] == 1 and graphs.info()["replays"] == 3

#----------------------------------------------------------------------------
# What begin validates once.


def test_bound_arguments_validated_once_with_the_front_end_messages():
    x = torch.zeros(2, 3)
    table = coefs.table([coefs.row(a=1.0)])
    seed = torch.tensor([1])
    with pytest.raises(TypeError, match=r"^coef: expected dtype torch.float64, got torch.float32$"):
        LoopStep(x, table.float(), table, seed, backend=REF)
    with pytest.raises(ValueError, match=r"^seed: expected shape \(1,\) or \(B,\) with B = x.shape\[0\] = 2, "
                                         r"got \(3,\)$"):
        LoopStep(x, table, table, torch.tensor([1, 2, 3]), backend=REF)
    with pytest.raises(TypeError, match=r"^x0_out: expected dtype torch.float32 \(that of x\), got torch.float64$"):
        LoopStep(x, table, table, seed, x0_buffer=torch.zeros(4, 2, 3, dtype=F64), backend=REF)
    with pytest.raises(ValueError, match=r"^x0_out: overlaps seed, which every element reads"):
        buf = torch.zeros(4, 2, 3)
        LoopStep(x, table, table, buf.view(torch.int32)[:1, :1, :2].reshape(-1).view(torch.int64), x0_buffer=buf,
                 backend=REF)
    with pytest.raises(ValueError, match=r"^host_table: expected None or the CPU copy of coef"):
        LoopStep(x, table, table[:0], seed, backend=REF)
    with pytest.raises(IndexError, match=r"^step: 1 is out of range for a coefficient table of 1 rows$"):
        LoopStep(x, table, table, seed, backend=REF).launch(x, x, 1, out=x)
    two = coefs.table([coefs.row(a=1.0, c=0.5)])
    with pytest.raises(ValueError, match=r"^history: required, since coef\[0\] has a non-zero history coefficient c$"):
        LoopStep(x, two, two, seed, backend=REF).step(x, torch.zeros(2, 3), 0, out=x)
