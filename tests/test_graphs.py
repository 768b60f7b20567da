"""The CUDA-graph runner (``diffkern.graphs``): the graph=True/"auto" paths of ``sample``, ``sample_iadb`` and
``graphs.sample_hold``.

CPU: mode resolution and its messages, cache keys, eviction, ``clear``, and the whole runner driven by
:class:`RecordedGraph`, a CPU stand-in for a CUDA graph that records the aten ops the loop runs (scalars by
value, tensors by identity) and replays exactly those ops on the same tensors without running the Python
again: so whatever a real replay would bake in (a Python float, a launch structure) is baked in here too, and
a host read inside the loop fails the "capture". CUDA (``@pytest.mark.cuda``): real graphs, bitwise against eager.
"""
import traceback
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffkern import analytic, graphs, hold, schedules
from diffkern.graphs import GraphCaptureError, GraphFallbackWarning
from diffkern.sampling import sample, sample_iadb

REF = "reference"
EVERY = [("euler", {}), ("euler", {"s_churn": 2.0}), ("euler_ancestral", {"eta": 0.7}), ("heun", {}),
         ("heun", {"s_churn": 1.0, "s_tmin": 0.1}), ("dpmpp_2m", {}), ("ge", {}), ("sde", {"lam": 0.8}),
         ("sde", {"integrator": "euler_maruyama"}), ("dpmpp_2m_sde", {"solver_type": "heun"}),
         ("dpm_2", {"s_churn": 1.0}), ("dpm_2_ancestral", {"eta": 0.8}), ("dpmpp_2s_ancestral", {}),
         ("dpmpp_sde", {"r": 0.4}), ("dpmpp_3m_sde", {"eta": 0.6}), ("dpmsolver_3m", {"eta": 1.0}),
         ("lcm", {}), ("unipc", {}), ("unipc", {"order": 1, "solver_type": "bh1", "predict_x0": False}),
         ("deis", {}), ("plms", {}), ("ipndm", {}), ("lms", {}), ("unipc", {"order": 3}),
         ("dpmsolver_single", {"order": 3}), ("ipndm_v", {}), ("dpm_fast", {}), ("dpm_fast", {"eta": 1.0}),
         ("res_multistep", {}), ("res_multistep_ancestral", {}), ("er_sde", {}),
         ("sa_solver", {}), ("sa_solver", {"predictor_order": 3, "corrector_order": 4, "tau": 0.5}),
         ("heun_flow", {})]


def gmm3():
    return analytic.GaussianMixture([1.0, 2.0, 1.5], [[-1.0, 0.5], [1.0, 1.0], [0.3, -1.2]], [0.3, 0.5, 0.4])


def start(n, sigma_max=10.0, seed=0, dim=2, dtype=torch.float64, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, dim, generator=gen, dtype=torch.float64) * sigma_max).to(dtype).to(device)


@pytest.fixture(autouse=True)
def fresh_cache():
    graphs.clear()
    yield
    graphs.clear()

#----------------------------------------------------------------------------
# A CPU stand-in for a CUDA graph.

_SYNCS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
          torch.ops.aten.masked_select.default}


class _Recorder(TorchDispatchMode):
    def __init__(self, ops):
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SYNCS and not _validating_cpu_table():
            raise RuntimeError(f"operation not permitted when stream is capturing ({func} reads the device)")
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


def _validating_cpu_table() -> bool:
    # The op front-ends validate CPU tables on every call (they skip device tables); on a GPU that read is absent.
    return any(f.name in ("validate", "validate_table") for f in traceback.extract_stack())


def _into(captured, result):
    if isinstance(captured, torch.Tensor):
        same = (result.data_ptr() == captured.data_ptr() and result.shape == captured.shape
                and result.stride() == captured.stride())
        if not same:  # a later in-place metadata op (matmul's squeeze_) may have reshaped the captured tensor
            (captured if captured.shape == result.shape else captured.view(result.shape)).copy_(result)
    elif isinstance(captured, (tuple, list)):
        for c, r in zip(captured, result):
            _into(c, r)


class RecordedGraph:
    def __init__(self, body):
        self.ops = []
        with _Recorder(self.ops):
            body()

    @torch.inference_mode()  # no autograd, as a CUDA replay; writes into temporaries the capture made under either mode
    def replay(self):
        for func, args, kwargs, out in self.ops:
            _into(out, func(*args, **kwargs))


@pytest.fixture
def fake(monkeypatch):
    """CPU tensors count as CUDA tensors and captures are RecordedGraphs."""
    monkeypatch.setattr(graphs, "_device_ok", lambda x: True)
    monkeypatch.setattr(graphs, "_record", lambda body, device: RecordedGraph(body))


def counting(model):
    calls = []

    def f(x, sigma, **kw):
        calls.append(1)
        return model(x, sigma, **kw)
    f.calls = calls
    return f

#----------------------------------------------------------------------------
# Mode resolution (real paths, no stand-in).


def test_graph_true_on_cpu_raises():
    gmm, x, sig = gmm3(), start(3), schedules.karras(4, 0.05, 10.0)
    with pytest.raises(ValueError, match=r"x: CUDA graphs need a CUDA device, got cpu \(graph=True\); "
                                         r"use graph=False or graph='auto'"):
        sample(gmm, x, sig, "euler", graph=True)
    with pytest.raises(ValueError, match="x0: CUDA graphs need a CUDA device, got cpu"):
        sample_iadb(lambda x, a: x, x, steps=3, graph=True)
    with pytest.raises(ValueError, match="device: CUDA graphs need a CUDA device, got cpu"):
        graphs.sample_hold(lambda z, t: z[:, :1], hold.HOLD(order=2), (2, 1), num_steps=4)
    assert graphs.info()["entries"] == 0


def test_graph_auto_on_cpu_runs_eager_and_says_so_once():
    gmm, x, sig = gmm3(), start(3), schedules.karras(4, 0.05, 10.0)
    eager = sample(gmm, x, sig, "euler_ancestral", backend=REF, seed=3)
    with pytest.warns(GraphFallbackWarning, match="graph='auto' runs eager: CUDA graphs need a CUDA device, got cpu"):
        y = sample(gmm, x, sig, "euler_ancestral", backend=REF, seed=3, graph="auto")
    assert torch.equal(y, eager)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(sample(gmm, x, sig, "euler_ancestral", backend=REF, seed=3, graph="auto"), eager)
        sample_iadb(lambda x, a: x, x, steps=3, graph="auto", backend=REF)
    assert graphs.info()["entries"] == 0


def test_graph_argument_is_checked():
    gmm, x, sig = gmm3(), start(3), schedules.karras(4, 0.05, 10.0)
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match=r"graph: expected False, True or 'auto', got"):
            sample(gmm, x, sig, "euler", graph=bad)


def test_callback_and_progress_are_refused(fake):
    gmm, x, sig = gmm3(), start(3), schedules.karras(4, 0.05, 10.0)
    with pytest.raises(ValueError, match=r"callback: a per-step callback cannot run inside a CUDA graph replay; "
                                         r"pass record=True"):
        sample(gmm, x, sig, "euler", graph=True, callback=lambda d: None)
    with pytest.raises(ValueError, match="progress: a progress bar cannot advance inside a CUDA graph replay"):
        sample_iadb(lambda x, a: x, x, steps=3, graph=True, progress=True)
    seen = []
    with pytest.warns(GraphFallbackWarning, match="per-step callback"):
        sample(gmm, x, sig, "euler", graph="auto", backend=REF, callback=seen.append)
    assert len(seen) == 4 and graphs.info()["entries"] == 0

def test_autocast_is_refused(fake):
    gmm, x, sig = gmm3(), start(3), schedules.karras(4, 0.05, 10.0)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        with pytest.raises(ValueError, match=r"autocast: torch.autocast is active: cast the model to its dtype"):
            sample(gmm, x, sig, "euler", graph=True)
        with pytest.warns(GraphFallbackWarning, match="autocast is active"):
            sample(gmm, x, sig, "euler", graph="auto", backend=REF)
    assert graphs.info()["entries"] == 0

#----------------------------------------------------------------------------
# The runner on the stand-in: output, seeds, tables, keys.


@pytest.mark.parametrize("method,kw", EVERY, ids=[f"{m}-{kw}" for m, kw in EVERY])
def test_graph_equals_eager_for_every_sampler(fake, method, kw):
    gmm, sig = gmm3(), schedules.karras(5, 0.05, 10.0)
    for i, seed in enumerate((1, 2)):  # the first call captures, the second replays with a new x and seed
        x = start(4, seed=i)
        y, traj = sample(gmm, x, sig, method, backend=REF, seed=seed, record=True, graph=True, **kw)
        y_eager, traj_eager = sample(gmm, x, sig, method, backend=REF, seed=seed, record=True, **kw)
        assert torch.equal(y, y_eager) and all(torch.equal(traj[k], traj_eager[k]) for k in traj)
    assert graphs.info()["captures"] == 1 and graphs.info()["replays"] == 2


def test_every_backend(fake, cpu_backend):
    gmm, x, sig = gmm3(), start(4, dtype=torch.float32), schedules.karras(5, 0.05, 10.0)
    for seed in (5, 6):
        y = sample(gmm, x, sig, "heun", backend=cpu_backend, seed=seed, s_churn=1.0, graph=True)
        assert torch.equal(y, sample(gmm, x, sig, "heun", backend=cpu_backend, seed=seed, s_churn=1.0))


def test_seeds(fake):
    gmm, x, sig = gmm3(), start(4), schedules.karras(5, 0.05, 10.0)
    a = sample(gmm, x, sig, "euler_ancestral", backend=REF, seed=1, graph=True)
    assert not torch.equal(a, sample(gmm, x, sig, "euler_ancestral", backend=REF, seed=2, graph=True))
    assert torch.equal(a, sample(gmm, x, sig, "euler_ancestral", backend=REF, seed=1, graph=True))
    big = 2 ** 64 - 5  # two's complement int64, as in eager
    assert torch.equal(sample(gmm, x, sig, "euler_ancestral", backend=REF, seed=big, graph=True),
                       sample(gmm, x, sig, "euler_ancestral", backend=REF, seed=big))
    assert not torch.equal(sample(gmm, x, sig, "euler_ancestral", backend=REF, seed=None, graph=True),
                           sample(gmm, x, sig, "euler_ancestral", backend=REF, seed=None, graph=True))
    torch.manual_seed(7)
    fresh = sample(gmm, x, sig, "euler_ancestral", backend=REF, seed=None, graph=True)
    torch.manual_seed(7)
    assert torch.equal(fresh, sample(gmm, x, sig, "euler_ancestral", backend=REF, seed=None))
    assert graphs.info()["captures"] == 1


def test_per_sample_seeds(fake):
    gmm, x, sig = gmm3(), start(4), schedules.karras(5, 0.05, 10.0)
    seeds = torch.tensor([3, 1, 4, 1 << 40], dtype=torch.int64)
    full = sample(gmm, x, sig, "euler_ancestral", backend=REF, seed=seeds, graph=True)
    assert torch.equal(full, sample(gmm, x, sig, "euler_ancestral", backend=REF, seed=seeds))
    part = sample(gmm, x[2:], sig, "euler_ancestral", backend=REF, seed=seeds[2:], graph=True)
    torch.testing.assert_close(full[2:], part, rtol=1e-12, atol=1e-12)
    # a (B,) seed tensor is a different capture than one stream
    sample(gmm, x, sig, "euler_ancestral", backend=REF, seed=1, graph=True)
    assert graphs.info()["captures"] == 3


def test_schedule_and_knob_changes_rewrite_tables_without_recapture(fake):
    model, x = counting(gmm3()), start(4)
    sig_a, sig_b = schedules.karras(6, 0.05, 10.0), schedules.loglinear(6, 0.1, 8.0)
    sample(model, x, sig_a, "euler_ancestral", backend=REF, seed=1, eta=0.5, graph=True)
    calls = len(model.calls)
    for sig, eta in ((sig_b, 0.5), (sig_b, 1.0), (sig_a, 0.5)):
        y = sample(model, x, sig, "euler_ancestral", backend=REF, seed=1, eta=eta, graph=True)
        assert torch.equal(y, sample(gmm3(), x, sig, "euler_ancestral", backend=REF, seed=1, eta=eta))
    assert len(model.calls) == calls, "a replay must not run the model's Python"
    info = graphs.info()
    assert info["captures"] == 1 and info["replays"] == 4 and info["table_writes"] == 5  # 2 + 1 (eta) + 2


def test_launch_structure_is_part_of_the_key(fake):
    gmm, x = gmm3(), start(4)
    sig = schedules.karras(6, 0.05, 10.0)
    sample(gmm, x, sig, "heun", backend=REF, s_churn=3.0, s_tmin=1.0, graph=True)
    y = sample(gmm, x, sig, "heun", backend=REF, s_churn=3.0, s_tmin=0.01, graph=True)  # more churn steps
    assert torch.equal(y, sample(gmm, x, sig, "heun", backend=REF, s_churn=3.0, s_tmin=0.01))
    y = sample(gmm, x, sig[:-1], "heun", backend=REF, graph=True)  # no final 0: a corrector on the last step
    assert torch.equal(y, sample(gmm, x, sig[:-1], "heun", backend=REF))
    assert graphs.info()["captures"] == 3


def test_keys_separate_what_a_capture_bakes_in(fake):
    gmm, sig = gmm3(), schedules.karras(4, 0.05, 10.0)
    x = start(4)
    base = dict(backend=REF, seed=1, graph=True)
    sample(gmm, x, sig, "euler", **base)
    sample(gmm, x, sig, "euler", **base)  # hit
    sample(gmm, start(5), sig, "euler", **base)  # shape
    sample(gmm, x.float(), sig, "euler", **base)  # dtype
    sample(gmm, x, schedules.karras(5, 0.05, 10.0), "euler", **base)  # N
    sample(gmm, x, sig, "euler", record=True, **base)  # record
    sample(gmm, x, sig, "dpmpp_2m", **base)  # method
    sample(gmm3(), x, sig, "euler", **base)  # model
    assert graphs.info()["captures"] == 7 and graphs.info()["entries"] == 7


def test_outputs_are_clones(fake):
    gmm, sig = gmm3(), schedules.karras(4, 0.05, 10.0)
    x = start(4)
    y1, t1 = sample(gmm, x, sig, "euler_ancestral", backend=REF, seed=1, record=True, graph=True)
    kept = y1.clone(), t1["x"].clone()
    y2, t2 = sample(gmm, start(4, seed=9), sig, "euler_ancestral", backend=REF, seed=2, record=True, graph=True)
    assert torch.equal(y1, kept[0]) and torch.equal(t1["x"], kept[1]) and not torch.equal(y1, y2)
    entry = next(iter(graphs._cache.values()))
    statics = {entry.x.data_ptr(), entry.state.trajectory.x.data_ptr(), entry.state.trajectory.denoised.data_ptr()}
    assert statics.isdisjoint({y2.data_ptr(), t2["x"].data_ptr(), t2["denoised"].data_ptr()})
    assert torch.equal(x, start(4)), "the input must not be modified"


def test_extra_args_are_static_copies(fake):
    gmm, x, sig = gmm3(), start(4), schedules.karras(4, 0.05, 10.0)

    def model(x, sigma, shift, scale=1.0):
        return gmm.denoise(x, sigma) * scale + shift

    for shift in (torch.zeros(4, 2), torch.full((4, 2), 0.25)):
        for scale in (1.0, 0.5):
            extra = {"shift": shift, "scale": scale}
            y = sample(model, x, sig, "euler", backend=REF, extra_args=extra, graph=True)
            assert torch.equal(y, sample(model, x, sig, "euler", backend=REF, extra_args=extra))
    assert graphs.info()["captures"] == 2  # one per value of the float; the tensor is copied in


def test_fused_wrapper_guidance(fake):
    class EpsCFG(torch.nn.Module):
        guidance_scale = 1.0

        def __init__(self):
            super().__init__()
            self.cond, self.uncond = gmm3(), analytic.GaussianMixture([1.0], [[0.5, 0.0]], [1.0])

        def raw(self, x, sigma):
            c = self.cond.eps(x, sigma)
            return (c, None) if self.guidance_scale == 1.0 else (c, self.uncond.eps(x, sigma))

        def conversion(self, sigma):
            return 1.0, -sigma

    model, x, sig = EpsCFG(), start(4), schedules.karras(5, 0.05, 10.0)
    for w in (1.0, 3.0, 5.0):
        model.guidance_scale = w
        y = sample(model, x, sig, "dpmpp_2m", backend=REF, graph=True)
        assert torch.equal(y, sample(model, x, sig, "dpmpp_2m", backend=REF))
    assert graphs.info()["captures"] == 2  # with and without the guidance batch; 3 -> 5 is table data


def test_diffusers_unet_with_guidance_batch(fake):
    diffusers = pytest.importorskip("diffusers")
    from diffkern.wrappers import DiffusersUNetDenoiser

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=2, out_channels=2, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                 num_class_embeds=5).eval()
    model = DiffusersUNetDenoiser(unet, diffusers.DDIMScheduler(num_train_timesteps=1000), guidance_scale=2.5)
    x, sig = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(0)) * 10, schedules.karras(3, 0.1, 10.0)
    for labels in ([1, 2], [3, 0]):
        extra = {"class_labels": torch.tensor(labels), "uncond_class_labels": torch.tensor([4, 4])}
        y = sample(model, x, sig, "euler_ancestral", extra_args=extra, seed=labels[0], graph=True)
        assert torch.equal(y, sample(model, x, sig, "euler_ancestral", extra_args=extra, seed=labels[0]))
    assert graphs.info()["captures"] == 1


def test_model_moved_is_recaptured_and_old_capture_dropped(fake):
    gmm = gmm3()
    net = torch.nn.Linear(2, 2, dtype=torch.float64)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = net

        def forward(self, x, sigma):
            return gmm.denoise(x, sigma) + 1e-3 * self.lin(x)

    model, x, sig = Net(), start(4), schedules.karras(4, 0.05, 10.0)
    sample(model, x, sig, "euler", backend=REF, graph=True)
    with torch.no_grad():
        net.weight.mul_(2)  # in place: the capture sees it
    for _ in range(2):
        y = sample(model, x, sig, "euler", backend=REF, graph=True)
        assert torch.equal(y, sample(model, x, sig, "euler", backend=REF))
        model.to(torch.float32).to(torch.float64)  # new parameter tensors
    assert graphs.info()["captures"] == 2 and graphs.info()["entries"] == 1

def test_plain_module_attributes_are_part_of_the_key(fake):
    """A forward reading a plain attribute (here a submodule's float and bool) bakes its value into the capture: a
    new value re-captures, and the graph's output stays the eager one."""
    gmm = gmm3()

    class Shift(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.amount, self.on = 0.0, True

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.shift = Shift()

        def forward(self, x, sigma):
            return gmm.denoise(x, sigma) + (self.shift.amount if self.shift.on else -1.0)

    model, x, sig = Net(), start(4), schedules.karras(4, 0.05, 10.0)
    for amount, on in ((0.0, True), (0.25, True), (0.25, False), (0.0, True)):
        model.shift.amount, model.shift.on = amount, on
        y = sample(model, x, sig, "euler", backend=REF, graph=True)
        assert torch.equal(y, sample(model, x, sig, "euler", backend=REF)), (amount, on)
    assert graphs.info()["captures"] == 3

#----------------------------------------------------------------------------
# Memory policy.


def test_lru_eviction_and_clear(fake):
    gmm, x, sig = gmm3(), start(4), schedules.karras(4, 0.05, 10.0)
    graphs.set_max_entries(2)
    try:
        for n in (3, 4, 5):
            sample(gmm, start(n), sig, "euler", backend=REF, graph=True)
        assert graphs.info()["entries"] == 2 and graphs.info()["evictions"] == 1
        sample(gmm, start(4), sig, "euler", backend=REF, graph=True)  # still cached
        assert graphs.info()["captures"] == 3
        sample(gmm, start(3), sig, "euler", backend=REF, graph=True)  # evicted: captured again, evicts n = 5
        sample(gmm, start(4), sig, "euler", backend=REF, graph=True)  # n = 4 was used last: kept
        assert graphs.info()["captures"] == 4
        graphs.set_max_entries(1)
        assert graphs.info()["entries"] == 1
    finally:
        graphs.set_max_entries(graphs.DEFAULT_MAX_ENTRIES)
    other = gmm3()
    sample(other, x, sig, "euler", backend=REF, graph=True)
    graphs.clear(other)
    assert graphs.info()["entries"] == 1
    graphs.clear()
    assert graphs.info()["entries"] == 0
    with pytest.raises(ValueError, match="n: expected an int >= 1"):
        graphs.set_max_entries(0)

#----------------------------------------------------------------------------
# Capture failures.


def test_host_sync_in_model_fails_cleanly(fake):
    gmm, x, sig = gmm3(), start(4), schedules.karras(4, 0.05, 10.0)
    model = counting(lambda x, s: gmm.denoise(x, s) * (1.0 if float(s[0]) > 0 else 2.0))  # .item() inside
    with pytest.raises(GraphCaptureError, match=r"capturing the euler sampling loop as a CUDA graph failed: "
                                                r"RuntimeError: .*may not synchronise with the host"):
        sample(model, x, sig, "euler", backend=REF, graph=True)
    assert graphs.info()["entries"] == 0 and graphs.info()["failures"] == 1
    calls = len(model.calls)
    with pytest.raises(GraphCaptureError):  # remembered: no second warm-up
        sample(model, x, sig, "euler", backend=REF, graph=True)
    assert len(model.calls) == calls
    eager = sample(model, x, sig, "euler", backend=REF)
    graphs.clear()
    with pytest.warns(GraphFallbackWarning, match="graph='auto' runs eager: capturing the euler sampling loop"):
        assert torch.equal(sample(model, x, sig, "euler", backend=REF, graph="auto"), eager)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(sample(model, x, sig, "euler", backend=REF, graph="auto"), eager)


def test_dynamic_shape_in_model_fails_cleanly(fake):
    gmm, x, sig = gmm3(), start(4), schedules.karras(4, 0.05, 10.0)

    def model(x, s):
        d = gmm.denoise(x, s)
        far = torch.nonzero(d.abs() > 100)  # a data-dependent shape (boolean-mask indexing calls it on CUDA)
        return d.index_put((far[:, 0], far[:, 1]), torch.zeros((), dtype=d.dtype))

    with pytest.raises(GraphCaptureError, match="data-dependent shapes"):
        sample(model, x, sig, "euler", backend=REF, graph=True)
    assert graphs.info()["entries"] == 0


def test_model_error_in_warm_up_propagates(fake):
    x, sig = start(4), schedules.karras(4, 0.05, 10.0)
    with pytest.raises(ValueError, match="model: output must have the shape of x"):
        sample(lambda x, s: x[:, :1], x, sig, "euler", backend=REF, graph=True)
    with pytest.raises(ValueError, match="model: output must have the shape of x"):
        sample(lambda x, s: x[:, :1], x, sig, "euler", backend=REF, graph="auto")
    assert graphs.info()["entries"] == 0 and graphs.info()["failures"] == 0


def test_order_after_last_replay_is_a_no_op_off_cuda():
    """accelerate orders its per-call device writes after the last replay with it; off CUDA there is nothing to
    wait for (CUDA: test_diffusers_pipelines.py::test_accelerate_cuda_graph_calls_from_two_streams)."""
    for device in ("cpu", torch.device("cpu"), "meta"):
        graphs.order_after_last_replay(device)
