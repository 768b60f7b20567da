"""Adversarial inputs to the main sampling API, as a PyTorch user would pass them: ``diffkern.sample``, the
k-diffusion-signature samplers of ``samplers.SAMPLERS`` and ``diffkern.sample_iadb``, on the CPU backends with exact
denoisers (``diffkern.analytic``).

An awkward but legitimate input gives the plain call's numbers bit for bit, a wrong one a clear error naming the
argument; the caller's tensors are never modified. Fixes pinned: IADB ``alphas`` on the meta device (was an obscure
NotImplementedError), complex (imaginary part dropped) or bool (read as 0/1), and a meta ``sigma_min``/``sigma_max``
of ``sample_dpm_fast``/``sample_dpm_adaptive`` (was ``Tensor.item()``'s error), all refused by name.
"""
import numpy as np
import pytest
import torch

import diffkern
from _kdiffusion import sampling as kdiffusion
from conftest import usable_backends
from diffkern import analytic, ops, samplers, schedules
from diffkern.sampler_compat import REPEATS_OK
from diffkern.samplers import SAMPLERS

F64 = torch.float64
GMM = analytic.GaussianMixture.demo_2d()
G12 = analytic.GaussianMixture([1.0, 2.0], [[0.5] * 12, [-0.5] * 12], [0.3, 0.6])  # for (B, 3, 2, 2) images
GAUSS = analytic.GaussianMixture([1.0], [[0.5, -1.0]], [1.5])  # linear denoiser: rounding is not amplified
SIGMAS = schedules.karras(6, 0.05, 10.0)
METHODS = sorted(SAMPLERS)
BACKENDS = usable_backends("cpu")
# Every method on the compiled CPU backends; triton (CPU only under its interpreter, 10-50x slower) on a few that
# between them run churn-free one-call, two-call, multistep and noisy rows
FAST = [b for b in BACKENDS if b in ("reference", "cpp")]
PAIRS = [(m, b) for m in METHODS for b in FAST] + [
    (m, b) for m in ("euler_ancestral", "heun", "dpmpp_3m_sde", "unipc") for b in BACKENDS if b not in FAST]


def start(shape=(5, 2), seed=1, dtype=torch.float32):
    return (torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(seed)) * 10).to(dtype)


def iadb_model(x, alpha):
    """IADB's D = E[x1 - x0 | x_alpha] for GMM data: x_alpha/alpha is the VE state at sigma = (1-alpha)/alpha."""
    a = alpha.to(F64)[:, None].clamp(min=1e-3)
    x1 = GMM.denoise(x.to(F64) / a, ((1 - a) / a)[:, 0])
    return (x1 - (x.to(F64) - a * x1) / (1 - a).clamp(min=1e-6)).to(x.dtype)

#----------------------------------------------------------------------------
# Layouts, views and repeated calls: the plain call's numbers, the caller's tensors untouched.


@pytest.mark.parametrize("method, backend", PAIRS)
def test_layouts_views_and_reruns_give_the_plain_numbers(method, backend):
    x = start()
    keep = x.clone()
    ref = diffkern.sample(GMM, x, SIGMAS, method, seed=3, backend=backend)
    big = torch.zeros(10, 2).index_copy_(0, torch.arange(0, 10, 2), x)
    big_before = big.clone()
    for variant in (x.t().contiguous().t(), big[::2], x.clone().requires_grad_(True), x):
        out = diffkern.sample(GMM, variant, SIGMAS, method, seed=3, backend=backend)
        assert torch.equal(out, ref) and out.dtype == x.dtype and not out.requires_grad
    assert torch.equal(big, big_before), "the base tensor of a strided x was written"
    assert torch.equal(x, keep), "the caller's x was modified"
    direct = SAMPLERS[method](GMM, x, SIGMAS, None, None, True, seed=3, backend=backend)
    assert torch.equal(direct, ref)


@pytest.mark.parametrize("method", METHODS)
def test_channels_last_and_5d_images(method):
    x = start((3, 3, 2, 2), seed=2)
    ref = diffkern.sample(G12, x, SIGMAS, method, seed=3)
    out = diffkern.sample(G12, x.to(memory_format=torch.channels_last), SIGMAS, method, seed=3)
    assert torch.equal(out, ref) and out.shape == x.shape
    video = diffkern.sample(G12, x.reshape(3, 3, 2, 2, 1), SIGMAS, method, seed=3)
    assert video.shape == (3, 3, 2, 2, 1) and torch.equal(video.reshape(x.shape), ref)


@pytest.mark.parametrize("method", METHODS)
def test_batch_of_one_zero_and_one_dimensional_x(method):
    x = start()
    ref = diffkern.sample(GMM, x, SIGMAS, method, seed=3)
    empty = diffkern.sample(GMM, x[:0], SIGMAS, method, seed=3)
    assert empty.shape == (0, 2) and empty.dtype == x.dtype
    one = diffkern.sample(GMM, x[:1], SIGMAS, method, seed=3)
    if method != "dpm_adaptive":  # its step sizes follow the whole batch's error estimate, as k-diffusion's
        assert torch.equal(one, ref[:1]), "sample 0 depends on the rest of the batch"
    line = analytic.GaussianMixture([1.0, 2.0], [[0.5], [-0.5]], [0.3, 0.6])
    flat = diffkern.sample(lambda z, s: line(z[:, None], s)[:, 0], x[:, 0], SIGMAS, method, seed=3)
    column = diffkern.sample(line, x[:, :1], SIGMAS, method, seed=3)
    assert flat.shape == (5,) and torch.equal(flat, column[:, 0])


@pytest.mark.parametrize("method", [m for m in METHODS if m != "dpm_adaptive"])  # its steps follow the rounding
def test_low_precision_states_round_as_their_dtype(method):
    """float16 / bfloat16 / float32 x against the float64 run on a linear denoiser: within 2 eps(dtype) of the state's
    scale (measured worst 0.51 eps over all methods), x's dtype back."""
    x = start((64, 2), dtype=F64)
    ref = diffkern.sample(GAUSS, x, SIGMAS, method, seed=3)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        out = diffkern.sample(GAUSS, x.to(dtype), SIGMAS, method, seed=3)
        assert out.dtype == dtype
        err = (out.to(F64) - ref).abs().max().item()
        assert err <= 2 * torch.finfo(dtype).eps * x.abs().max().item(), (dtype, err)

#----------------------------------------------------------------------------
# Schedules.


def test_schedule_containers_are_read_exactly():
    x = start()
    ref = diffkern.sample(GMM, x, SIGMAS, "dpmpp_2m_sde", seed=3)
    strided = torch.stack([SIGMAS, SIGMAS], 1)[:, 0]
    for form in (SIGMAS.tolist(), tuple(SIGMAS.tolist()), SIGMAS.numpy(), strided, SIGMAS.clone().requires_grad_()):
        assert torch.equal(diffkern.sample(GMM, x, form, "dpmpp_2m_sde", seed=3), ref)
    # a float32 schedule is its float32 values, read exactly (not re-rounded through some other path)
    f32 = SIGMAS.float()
    assert torch.equal(diffkern.sample(GMM, x, f32, "dpmpp_2m_sde", seed=3),
                       diffkern.sample(GMM, x, f32.double(), "dpmpp_2m_sde", seed=3))
    ints = diffkern.sample(GMM, x, [10, 5, 1, 0], "euler")
    assert torch.equal(ints, diffkern.sample(GMM, x, torch.tensor([10.0, 5.0, 1.0, 0.0], dtype=F64), "euler"))


@pytest.mark.parametrize("sigmas, error, match", [
    (torch.tensor([10.0, float("nan"), 0.0]), ValueError, "sigmas: contains NaN at index 1"),
    (torch.tensor([float("inf"), 1.0, 0.0]), ValueError, "sigmas: contains inf at index 0"),
    (torch.tensor([1.0, 0.5, -0.1]), ValueError, "sigmas: negative value at index 2"),
    (SIGMAS.flip(0), ValueError, "sigmas: must be"),
    (SIGMAS[None], ValueError, r"sigmas: expected a 1-D schedule, got shape \(1, 7\)"),
    (SIGMAS[:, None], ValueError, r"sigmas: expected a 1-D schedule, got shape \(7, 1\)"),
    (SIGMAS.to("meta"), ValueError, "sigmas: expected a schedule with values"),
    (torch.tensor([1.0]), ValueError, "sigmas: expected length >= 2"),
    (torch.tensor(10.0), ValueError, "sigmas: expected a 1-D schedule of N\\+1 values, got a scalar"),
    (torch.tensor([10.0, 1.0, 0.0, 0.0]), ValueError, "sigmas: .* step from sigma = 0"),
    (torch.tensor([True, False]), TypeError, "sigmas: expected a real tensor"),
    ("10 5 0", TypeError, "sigmas: expected a 1-D tensor or sequence of floats"),
])
def test_bad_schedules_are_refused_by_name(sigmas, error, match):
    with pytest.raises(error, match=match):
        diffkern.sample(GMM, start(), sigmas, "euler")


@pytest.mark.parametrize("method", METHODS)
def test_a_repeated_sigma_runs_where_defined_and_is_refused_by_name_elsewhere(method):
    repeated = torch.tensor([10.0, 5.0, 5.0, 1.0, 0.0], dtype=F64)
    if method in REPEATS_OK:
        out = diffkern.sample(GMM, start(dtype=F64), repeated, method, seed=3)
        assert torch.isfinite(out).all()  # k-diffusion's dpmpp_sde gives NaN here (its Brownian tree at dt = 0)
    else:
        with pytest.raises(ValueError, match=f"sigmas: must be strictly decreasing for sampler '{method}'"):
            diffkern.sample(GMM, start(dtype=F64), repeated, method, seed=3)


AWKWARD = {"no final 0": SIGMAS[:-1], "one step to 0": torch.tensor([10.0, 0.0], dtype=F64),
           "one step": torch.tensor([10.0, 2.0], dtype=F64),
           "repeated": torch.tensor([10.0, 5.0, 5.0, 1.0, 1.0, 0.0], dtype=F64)}
DETERMINISTIC = [("euler", {}), ("heun", {}), ("dpm_2", {}), ("lms", {}), ("dpmpp_2m", {}),
                 ("euler_ancestral", {"eta": 0.0}), ("dpm_2_ancestral", {"eta": 0.0}),
                 ("dpmpp_2s_ancestral", {"eta": 0.0}), ("dpmpp_2m_sde", {"eta": 0.0}), ("dpmpp_3m_sde", {"eta": 0.0})]


@pytest.mark.parametrize("name", AWKWARD)
@pytest.mark.parametrize("method, knobs", DETERMINISTIC)
def test_awkward_schedules_match_kdiffusion(method, knobs, name):
    sigmas = AWKWARD[name]
    if name == "repeated" and method not in REPEATS_OK:
        pytest.skip("refused by name (test above); k-diffusion divides by the zero step")
    if name == "one step to 0" and method in ("dpmpp_2m_sde", "dpmpp_3m_sde"):
        pytest.skip("k-diffusion 0.1.1 raises UnboundLocalError ('h') on a single step to 0")
    x = start(dtype=F64)
    model = (lambda z, s: GMM(z, s.to(z.dtype)))
    want = getattr(kdiffusion(), f"sample_{method}")(model, x.clone(), sigmas, disable=True, **knobs)
    got = diffkern.sample(model, x, sigmas, method, **knobs)
    # float64 throughout: a few roundings of the state's scale (measured at most 4.7e-15)
    assert (got - want).abs().max().item() <= 64 * torch.finfo(F64).eps * x.abs().max().item()

#----------------------------------------------------------------------------
# The model's output.


def _from_step(k, change):
    """GMM whose output goes through ``change`` from the k-th call on (the first call's output is checked)."""
    calls = [0]

    def model(x, s):
        calls[0] += 1
        d = GMM(x, s)
        return change(d) if calls[0] >= k else d
    return model


@pytest.mark.parametrize("first", [1, 3])
@pytest.mark.parametrize("change, error, match", [
    (lambda d: d[:, :1], ValueError, r"shape .*\(5, 2\).*got \(5, 1\)"),
    (lambda d: d[:1], ValueError, r"shape .*\(5, 2\).*got \(1, 2\)"),
    (lambda d: d.reshape(10), ValueError, r"shape .*\(5, 2\).*got \(10,\)"),
    (lambda d: (d,), TypeError, "torch.Tensor, got tuple"),
    (lambda d: d.long(), TypeError, "floating dtype"),
    (lambda d: d.to("meta"), ValueError, "device"),
])
@pytest.mark.parametrize("method", ["euler", "heun", "dpmpp_2m", "dpm_adaptive"])
def test_bad_model_outputs_are_refused_at_any_step(method, change, error, match, first):
    x = start()
    with pytest.raises(error, match=match):
        diffkern.sample(_from_step(first, change), x, SIGMAS, method)
    assert torch.equal(x, start())


@pytest.mark.parametrize("method, backend", PAIRS)
def test_outputs_aliasing_x_or_a_reused_buffer(method, backend):
    """A model returning x itself (D = x), a view of it, or one buffer it overwrites on every call (a CUDA-graphed
    network's static output): the numbers of a fresh tensor each call."""
    x = start()
    fresh = diffkern.sample(lambda z, s: z.clone(), x, SIGMAS, method, seed=3, backend=backend)
    assert torch.equal(diffkern.sample(lambda z, s: z, x, SIGMAS, method, seed=3, backend=backend), fresh)
    assert torch.equal(diffkern.sample(lambda z, s: z.view(z.shape), x, SIGMAS, method, seed=3, backend=backend),
                       fresh)
    buffer = torch.empty_like(x)
    ref = diffkern.sample(GMM, x, SIGMAS, method, seed=3, backend=backend)
    assert torch.equal(diffkern.sample(lambda z, s: buffer.copy_(GMM(z, s)), x, SIGMAS, method, seed=3,
                                       backend=backend), ref)


def test_output_layouts_and_dtypes():
    x = start()
    ref = diffkern.sample(GMM, x, SIGMAS, "euler_ancestral", seed=1)
    for change in (lambda d: d.t().contiguous().t(), lambda d: d.double(), lambda d: d.clone().requires_grad_()):
        out = diffkern.sample(lambda z, s: change(GMM(z, s)), x, SIGMAS, "euler_ancestral", seed=1)
        assert torch.equal(out, ref) and out.dtype == x.dtype  # GMM rounds float64 -> float32: the same values
    row = diffkern.sample(lambda z, s: GMM(z, s)[:1].expand(5, 2), x, SIGMAS, "euler")
    assert torch.equal(row, diffkern.sample(lambda z, s: GMM(z, s)[:1].repeat(5, 1), x, SIGMAS, "euler"))
    # NaN from the model is passed on, not hidden (checking it would be a host sync per step), as k-diffusion's
    assert torch.isnan(diffkern.sample(lambda z, s: GMM(z, s) * float("nan"), x, SIGMAS, "euler")).all()


def _writes(z, s):
    z.add_(1.0)
    return GMM(z, s)


@pytest.mark.parametrize("method", METHODS)
def test_a_model_writing_into_x_is_refused(method):
    x = start()
    keep = x.clone()
    with pytest.raises(RuntimeError, match="model: modified its input x in place"):
        diffkern.sample(_writes, x, SIGMAS, method)
    assert torch.equal(x, keep)


@pytest.mark.parametrize("method", ["euler", "dpmpp_2m", "heun"])
def test_a_model_writing_into_x_is_refused_under_inference_mode(method):
    """ComfyUI samples under torch.inference_mode, where a tensor made inside keeps no version counter: the loop
    makes its state outside it (sampler_loop.tracked), so the write is still seen."""
    with torch.inference_mode(), pytest.raises(RuntimeError, match="modified its input x in place"):
        diffkern.sample(_writes, start(), SIGMAS, method, callback=lambda d: None)


def test_writes_refused_under_inference_mode_in_iadb_adaptive_and_hold():
    from diffkern import hold, hold_sampling
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="modified its input x in place"):
            samplers.sample_dpm_adaptive(_writes, start(), 0.05, 10.0)
        with pytest.raises(RuntimeError, match="modified its input x in place"):
            diffkern.sample_iadb(lambda x, a: x.add_(1.0), start(), torch.linspace(0, 1, 5, dtype=torch.float64))
        proc = hold.HOLD(2)
        with pytest.raises(RuntimeError, match="modified its input z in place"):
            hold_sampling.sample(lambda z, t: z.mul_(1.0)[:, :2], proc, (3, 2), num_steps=3)


def test_under_inference_mode_the_result_is_the_plain_one():
    plain = diffkern.sample(GMM, start(), SIGMAS, "dpmpp_2m", seed=1)
    with torch.inference_mode():
        got = diffkern.sample(GMM, start(), SIGMAS, "dpmpp_2m", seed=1, callback=lambda d: None)
    assert torch.equal(got, plain)


#----------------------------------------------------------------------------
# extra_args, seeds, backends, callbacks.


def test_extra_args_reach_the_model_unchanged():
    x, cond = start(), torch.randn(5, 2)
    keep = cond.clone()
    seen = []

    def model(z, s, cond=None, scale=1.0):
        seen.append(cond)
        return GMM(z, s) + 0.01 * scale * cond
    out = diffkern.sample(model, x, SIGMAS, "heun", extra_args={"cond": cond, "scale": 2.0})
    assert all(c is cond for c in seen) and torch.equal(cond, keep) and torch.isfinite(out).all()
    with pytest.raises(TypeError, match="extra_args: expected a dict"):
        diffkern.sample(model, x, SIGMAS, "euler", extra_args=[cond])
    with pytest.raises(TypeError, match="extra_args: keys must be str"):
        diffkern.sample(model, x, SIGMAS, "euler", extra_args={1: cond})


def test_seed_forms():
    x = start()
    run = (lambda seed: diffkern.sample(GMM, x, SIGMAS, "dpmpp_2m_sde", seed=seed))
    ref = run(7)
    for same in (np.int64(7), np.int32(7), torch.tensor(7), torch.tensor([7])):
        assert torch.equal(run(same), ref)
    assert torch.equal(run(2 ** 64 - 1), run(-1)) and torch.equal(run(np.uint64(2 ** 64 - 1)), run(-1))
    assert not torch.equal(run(-7), ref) and torch.isfinite(run(-2 ** 63)).all()
    seeds = torch.arange(100, 110)[::2]  # per-sample seeds, a strided view: each row as its own single-sample run
    keep = seeds.clone()
    per_sample = run(seeds)
    rows = [diffkern.sample(GMM, x[i:i + 1], SIGMAS, "dpmpp_2m_sde", seed=int(seeds[i])) for i in range(5)]
    assert torch.equal(per_sample, torch.cat(rows)) and torch.equal(seeds, keep)
    torch.manual_seed(0)
    drawn = run(None)
    torch.manual_seed(0)
    assert torch.equal(run(None), drawn)


@pytest.mark.parametrize("seed, error, match", [
    (torch.full((3,), 7), ValueError, r"seed: expected shape \(1,\) or \(5,\)"),
    (torch.full((5, 1), 7), ValueError, r"seed: expected shape"),
    (torch.tensor([7], dtype=torch.int32), TypeError, "seed: .*int64"),
    (torch.tensor([7.0]), TypeError, "seed: .*int64"), (torch.tensor([7], device="meta"), ValueError, "seed: .*meta"),
    *[(bad, TypeError, "seed: expected an int") for bad in (7.0, True, "7", np.array([7]))],
    (2 ** 64, ValueError, r"seed: expected an int in \[-2\*\*63, 2\*\*64\)"),
    (-2 ** 63 - 1, ValueError, r"seed: expected an int in"),
])
def test_bad_seeds_are_refused_by_name(seed, error, match):
    with pytest.raises(error, match=match):
        diffkern.sample(GMM, start(), SIGMAS, "euler_ancestral", seed=seed)


@pytest.mark.parametrize("backend, match", [
    ("refernce", "backend: op 'sampler_step' has no 'refernce' implementation"),
    ("Reference", "has no 'Reference' implementation"), ("cuda", "backend 'cuda' .* unavailable"),
    ("triton", "backend 'triton' .* unavailable"),
])
def test_backend_names(backend, match):
    if backend in BACKENDS:
        pytest.skip(f"{backend} runs on CPU tensors in this environment")
    with pytest.raises(ops.BackendUnavailable, match=match):
        diffkern.sample(GMM, start(), SIGMAS, "euler", backend=backend)


@pytest.mark.parametrize("method", METHODS)
def test_a_callback_raising_mid_loop_leaves_nothing_behind(method):
    x = start()
    keep = x.clone()
    ref = diffkern.sample(GMM, x, SIGMAS, method, seed=7)
    calls = []

    def stop(d):
        calls.append(d["i"])
        if len(calls) == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        diffkern.sample(GMM, x, SIGMAS, method, seed=7, callback=stop)
    assert torch.equal(x, keep)
    assert torch.equal(diffkern.sample(GMM, x, SIGMAS, method, seed=7), ref)

    def scribble(d):  # the callback's tensors are its own: writing to them changes nothing downstream
        d["x"].zero_()
        d["denoised"].add_(100.0)
    assert torch.equal(diffkern.sample(GMM, x, SIGMAS, method, seed=7, callback=scribble), ref)

#----------------------------------------------------------------------------
# k-diffusion's sigma_min/sigma_max signatures (fixed: a meta bound failed inside Tensor.item()).


@pytest.mark.parametrize("bound", ["sigma_min", "sigma_max"])
@pytest.mark.parametrize("sampler", ["dpm_fast", "dpm_adaptive"])
def test_dpm_fast_and_adaptive_refuse_a_meta_bound_by_name(sampler, bound):
    bounds = {"sigma_min": 0.05, "sigma_max": 10.0}
    bounds[bound] = torch.tensor(bounds[bound], device="meta")
    extra = (6,) if sampler == "dpm_fast" else ()
    with pytest.raises(ValueError, match=f"{bound}: expected a finite number > 0"):
        getattr(samplers, f"sample_{sampler}")(GMM, start(), bounds["sigma_min"], bounds["sigma_max"], *extra)
    with pytest.raises(ValueError, match="karras: sigma_min: expected a finite number > 0"):
        schedules.karras(5, torch.tensor(0.05, device="meta"), 10.0)

#----------------------------------------------------------------------------
# sample_iadb.


def _two_head(x, alpha):
    d = iadb_model(x, alpha)
    return x - 0.5 * d, x + 0.5 * d


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant, model", [("euler", iadb_model), ("stochastic", iadb_model),
                                            ("two_head", _two_head)])
def test_iadb_layouts_schedules_and_batches(variant, model, backend):
    x = start() / 10
    keep = x.clone()
    run = (lambda z, alphas=None, steps=8: diffkern.sample_iadb(model, z, alphas, variant, steps=steps, seed=3,
                                                                 backend=backend))
    ref = run(x)
    big = torch.zeros(10, 2).index_copy_(0, torch.arange(0, 10, 2), x)
    big_before = big.clone()
    for variant_x in (x.t().contiguous().t(), big[::2], x.clone().requires_grad_(True), x):
        assert torch.equal(run(variant_x), ref)
    uniform = torch.linspace(0, 1, 9, dtype=F64)
    for alphas in (uniform.tolist(), uniform.numpy(), uniform):
        assert torch.equal(run(x, alphas, None), ref)
    assert torch.equal(run(x, steps=np.int64(8)), ref)
    assert torch.equal(run(x[:1]), ref[:1]) and run(x[:0]).shape == (0, 2)
    assert torch.equal(big, big_before) and torch.equal(x, keep)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        assert run(x.to(dtype)).dtype == dtype


@pytest.mark.parametrize("alphas, error, match", [
    (torch.tensor([0.0, 0.5, 1.0], device="meta"), ValueError, "alphas: expected a tensor with values"),
    (torch.tensor([0.0, 0.5, 1.0], dtype=torch.complex64), TypeError, "alphas: expected a real tensor"),
    (torch.tensor([False, True]), TypeError, "alphas: expected a real tensor"),
    ([1.0, 0.5, 0.0], ValueError, "alphas: must be strictly increasing"),
    ([0.0, 0.5, 0.5, 1.0], ValueError, "alphas: must be strictly increasing"),
    ([0.0, float("nan"), 1.0], ValueError, r"alphas: values must be finite and in \[0, 1\]"),
    ([0.0, 0.5, 1.5], ValueError, r"alphas: values must be finite and in \[0, 1\]"),
    (torch.tensor([[0.0, 0.5, 1.0]]), ValueError, "alphas: expected a 1-D schedule"),
    (8, TypeError, "alphas: expected a schedule of N\\+1 blending values, got the int 8"),
])
def test_iadb_bad_alphas_are_refused_by_name(alphas, error, match):
    with pytest.raises(error, match=match):
        diffkern.sample_iadb(iadb_model, start(), alphas)


def test_iadb_model_misbehaviour():
    x = start() / 10
    keep = x.clone()

    def writes(z, a):
        z.add_(1.0)
        return z.clone()
    with pytest.raises(RuntimeError, match="model: modified its input x in place"):
        diffkern.sample_iadb(writes, x, steps=4)
    with pytest.raises(ValueError, match=r"model: output must have the shape of x \(5, 2\), got \(5, 1\)"):
        diffkern.sample_iadb(lambda z, a: z[:, :1], x, steps=4)
    with pytest.raises(TypeError, match="two_head variant expects the model to return"):
        diffkern.sample_iadb(iadb_model, x, steps=4, variant="two_head")
    with pytest.raises(ValueError, match="x1_bar must have the shape of x"):
        diffkern.sample_iadb(lambda z, a: (z, z[:, :1]), x, steps=4, variant="two_head")
    assert torch.equal(x, keep)
    for variant, alias, fresh in [(v, lambda z, a: z, lambda z, a: z.clone()) for v in ("euler", "stochastic")] + [
            ("two_head", lambda z, a: (z, z), lambda z, a: (z.clone(), z.clone()))]:
        assert torch.equal(diffkern.sample_iadb(alias, x, variant=variant, steps=4, seed=2),
                           diffkern.sample_iadb(fresh, x, variant=variant, steps=4, seed=2))


def test_iadb_callback_raising_mid_loop():
    x = start() / 10
    keep = x.clone()
    ref = diffkern.sample_iadb(iadb_model, x, variant="stochastic", steps=6, seed=1)

    def stop(d):
        if d["i"] == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        diffkern.sample_iadb(iadb_model, x, variant="stochastic", steps=6, seed=1, callback=stop)
    assert torch.equal(x, keep)
    assert torch.equal(diffkern.sample_iadb(iadb_model, x, variant="stochastic", steps=6, seed=1), ref)
