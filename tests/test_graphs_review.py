"""Review of the CUDA-graph runner (``diffkern.graphs``) before its first GPU run: what a real capture would
bake in that the key missed, static buffers under ``torch.inference_mode``, and the stream, device and memory
bookkeeping around a capture and a failed one.

CPU: the capture stand-in of ``test_graphs.py`` (:class:`test_graphs.RecordedGraph`, a replay that does not run
the Python again) for the keys, with the eager loop as the oracle (bitwise); fakes of ``torch.cuda``'s stream and
graph calls for the bookkeeping. CUDA (``@pytest.mark.cuda``): the same on real graphs.
"""
import collections
import contextlib

import pytest
import torch

from diffkern import graph_keys, graphs, schedules
from diffkern.graphs import GraphCaptureError
from diffkern.sampling import sample
from test_graphs import REF, fake, fresh_cache, gmm3, start  # noqa: F401  (fixtures: fake, autouse fresh_cache)


def _both(model, x, sig, method="euler", **kw):
    """The graph call and its eager twin, asserted bitwise equal; returns the graph output."""
    y = sample(model, x, sig, method, backend=REF, graph=True, **kw)
    assert torch.equal(y, sample(model, x, sig, method, backend=REF, **kw))
    return y

#----------------------------------------------------------------------------
# Static buffers under torch.inference_mode.


def test_inference_mode_then_outside_and_back(fake):
    """Buffers made by a capture under inference_mode were inference tensors: the next call outside it could not
    write x into them ("Inplace update to inference tensor outside InferenceMode")."""
    gmm, x, sig = gmm3(), start(4), schedules.karras(4, 0.05, 10.0)
    with torch.inference_mode():
        first = sample(gmm, x, sig, "euler_ancestral", backend=REF, seed=1, graph=True)
    for seed, mode in ((2, False), (1, True), (3, False)):
        with torch.inference_mode(mode):
            y = sample(gmm, x, sig, "euler_ancestral", backend=REF, seed=seed, graph=True)
        assert torch.equal(y, sample(gmm, x, sig, "euler_ancestral", backend=REF, seed=seed))
    assert torch.equal(first, sample(gmm, x, sig, "euler_ancestral", backend=REF, seed=1))
    assert graphs.info()["captures"] == 1

#----------------------------------------------------------------------------
# Extra args: host tensors, scalars in containers, container types.


def test_host_tensors_beside_a_device_x_are_keyed_by_value():
    """A CPU tensor beside a CUDA x is read on the host by the ops taking it (a 0-dim one is a kernel argument), so
    the capture bakes its values in: its values are part of the key. Tensors on x's device are data (copied in)."""
    x, model = torch.empty(2, 3, device="meta"), gmm3()

    def key(extra):
        return graph_keys.Call(model, x, 0, None, extra).key

    cpu = {"scale": torch.tensor(0.5), "w": torch.tensor([1.0, float("nan")])}
    assert key(cpu) == key({"scale": torch.tensor(0.5), "w": torch.tensor([1.0, float("nan")])})
    assert key(cpu) != key(dict(cpu, scale=torch.tensor(0.25)))
    assert key(cpu) != key(dict(cpu, w=torch.tensor([1.0, 2.0])))
    assert key({"e": torch.zeros(0)}) == key({"e": torch.zeros(0)})
    on_x = {"scale": torch.tensor(0.5, device="meta")}
    assert key(on_x) == key({"scale": torch.tensor(0.25, device="meta")})


Cond = collections.namedtuple("Cond", "shift scale")


def test_scalars_and_tensors_inside_containers(fake):
    """A float inside a dict, a list or a named tuple of the extra args is baked in (a new value captures again);
    tensors inside them are static copies (a new value replays); containers keep their type for the model."""
    gmm, x, sig = gmm3(), start(4), schedules.karras(4, 0.05, 10.0)
    seen = []

    def model(x, sigma, cond, kw, terms):
        seen.append((type(cond), type(kw), type(terms)))
        return gmm.denoise(x, sigma) * cond.scale * kw["gain"] + cond.shift + terms[0] * terms[1]

    def extra(shift, scale, gain, term):
        return {"cond": Cond(torch.full((4, 2), shift, dtype=torch.float64), scale),
                "kw": collections.OrderedDict(gain=gain), "terms": [torch.full((4, 2), term, dtype=torch.float64), 2.0]}

    cases = [(0.0, 1.0, 1.0, 0.0), (0.25, 1.0, 1.0, 0.5),  # tensors only: a replay
             (0.25, 0.5, 1.0, 0.5), (0.25, 0.5, 0.75, 0.5), (0.1, 1.0, 1.0, 0.3)]  # floats: captures
    for case in cases:
        _both(model, x, sig, extra_args=extra(*case))
    assert graphs.info()["captures"] == 3 and graphs.info()["replays"] == 5
    assert set(seen) == {(Cond, collections.OrderedDict, list)}

#----------------------------------------------------------------------------
# The model: what a forward reads besides its parameters' values.


class _Scale:
    """A plain object a forward calls (as diffusers' attention processors)."""

    def __init__(self, factor=1.0):
        self.factor = factor

    def __call__(self, h):
        return h * self.factor


class _Shift(_Scale):
    def __call__(self, h):
        return h + self.factor


class Net(torch.nn.Module):
    """A denoiser whose forward reads a processor object, a dict of floats (peft's LoRA ``scaling``) and a second
    parameter and a buffer (not the first parameter, whose address was keyed already)."""

    def __init__(self):
        super().__init__()
        self.gmm = gmm3()
        self.first = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.lin = torch.nn.Linear(2, 2, dtype=torch.float64)
        self.register_buffer("offset", torch.zeros(2, dtype=torch.float64))
        self.processor = _Scale()
        self.scaling = {"default": 1.0}

    def forward(self, x, sigma):
        h = 1e-3 * self.lin(x) * self.scaling["default"] + self.offset + self.first
        return self.gmm.denoise(x, sigma) + self.processor(h)


def test_module_changes_a_replay_would_miss_capture_again(fake):
    model, x, sig = Net(), start(4), schedules.karras(4, 0.05, 10.0)
    _both(model, x, sig)
    _both(model, x, sig)  # nothing changed: a replay
    assert graphs.info()["captures"] == 1

    def change(mutate, new=1):
        before = graphs.info()["captures"]
        mutate()
        _both(model, x, sig)
        assert graphs.info()["captures"] == before + new, mutate

    change(lambda: setattr(model, "processor", _Shift(0.5)))  # a processor of another class
    change(lambda: setattr(model.processor, "factor", 0.25))  # the processor's own number
    change(lambda: model.scaling.__setitem__("default", 0.5))  # a float inside a dict attribute, in place
    change(lambda: setattr(model.lin, "weight", torch.nn.Parameter(torch.ones(2, 2, dtype=torch.float64))))
    change(lambda: setattr(model, "offset", torch.full((2,), 0.5, dtype=torch.float64)))  # a buffer reassigned
    handle = model.lin.register_forward_hook(lambda mod, args, out: out * 2)
    change(lambda: None)  # the hook registered above: its Python runs in the capture only
    change(handle.remove, new=0)  # back to the state of the capture before the hook, still cached: a replay
    glob = torch.nn.modules.module.register_module_forward_hook(lambda mod, args, out: out)
    try:
        change(lambda: None)
    finally:
        glob.remove()
    with torch.no_grad():
        model.lin.weight.mul_(3.0)  # in place: the capture reads it, no new capture
    before = graphs.info()["captures"]
    _both(model, x, sig)
    assert graphs.info()["captures"] == before


def test_model_key_is_stable_and_hashable():
    """The key of an unchanged model is equal call after call (no capture per call), for diffusers' UNet with its
    attention processors, and changes when its processors are swapped (``set_attn_processor``)."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                          block_out_channels=(8, 16), cross_attention_dim=8, norm_num_groups=4,
                                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2)
    key = graph_keys.model_key(unet)
    hash(key)
    assert graph_keys.model_key(unet) == key
    unet.set_attn_processor(AttnProcessor())
    swapped = graph_keys.model_key(unet)
    assert swapped != key
    unet.set_attn_processor(AttnProcessor2_0())
    assert graph_keys.model_key(unet) == key  # processors of the same class and settings: the same capture


def test_attention_backend_flags_are_part_of_the_math_mode():
    """sdpa_kernel picks scaled_dot_product_attention's kernels as TF32 flags pick matmul's."""
    before = graph_keys.math_mode()
    flash = torch.backends.cuda.flash_sdp_enabled()
    torch.backends.cuda.enable_flash_sdp(not flash)
    try:
        assert graph_keys.math_mode() != before
    finally:
        torch.backends.cuda.enable_flash_sdp(flash)
    assert graph_keys.math_mode() == before

#----------------------------------------------------------------------------
# Stream, device and memory bookkeeping (fakes of torch.cuda's calls: what a first GPU run would do).


class _Stream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(f"{self.name} waits {other.name}")

    def __repr__(self):
        return self.name


@pytest.fixture
def cuda_calls(monkeypatch):
    """torch.cuda's stream and device calls, logged: a caller stream on device 0 and the side stream."""
    log, state = [], {"device": 0}
    caller, side = _Stream("caller", log), _Stream("side", log)
    state["stream"] = caller

    @contextlib.contextmanager
    def stream(s):
        prev, state["stream"] = state["stream"], s
        log.append(f"on {s.name}")
        try:
            yield
        finally:
            state["stream"] = prev

    def set_stream(s):
        state["stream"] = s
        log.append(f"set_stream {s.name}")

    def set_device(i):
        state["device"] = i
        log.append(f"set_device {i}")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: state["stream"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["device"])
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "set_stream", set_stream)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(graphs, "_side_stream", lambda device: (side, ("pool", 1)))
    return log, state, caller, side


def test_warm_up_rejoins_the_caller_stream_when_the_model_raises(cuda_calls):
    """The caller's stream waits for the side stream even when the warm-up raised: the dropped entry's buffers,
    made on the caller's stream, are otherwise handed out there again while the side stream still uses them."""
    log, state, caller, side = cuda_calls

    def body():
        raise ValueError("model: bad output")

    with pytest.raises(ValueError, match="bad output"):
        graphs._warm_up(body, torch.device("cuda", 0))
    assert log == ["side waits caller", "on side", "caller waits side"]
    assert state["stream"] is caller
    log.clear()
    graphs._warm_up(lambda: None, torch.device("cuda", 0))
    assert log == ["side waits caller", "on side", "caller waits side"]


def test_failed_capture_restores_stream_device_and_pool(cuda_calls, monkeypatch):
    """A capture whose end fails (the body made it invalid) leaves torch.cuda.graph's stream context entered and
    the pool recording; _record puts back the caller's stream and device (set_stream switched to x's device),
    ends the pool's allocation and drops the pool."""
    log, state, caller, side = cuda_calls
    resets, ended = [], []

    class Graph:
        def reset(self):
            resets.append(True)

    class FailingCapture:
        def __init__(self, graph, pool, stream, capture_error_mode):
            assert capture_error_mode == "thread_local" and stream is side and pool == ("pool", 1)

        def __enter__(self):
            state["stream"], state["device"] = side, 1  # x on cuda:1 while the caller's device is 0

        def __exit__(self, *exc):
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", FailingCapture)
    monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", lambda idx, pool: ended.append((idx, pool)))
    graphs._pools[1] = ("pool", 1)

    def body():
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    with pytest.raises(RuntimeError, match="previous error during capture"):
        graphs._record(body, torch.device("cuda", 1))
    assert state["stream"] is caller and state["device"] == 0
    assert ended == [(1, ("pool", 1))] and resets == [True] and 1 not in graphs._pools


def test_clear_waits_for_replays_and_keeps_their_events(monkeypatch):
    """clear() drops captures whose buffers a replay on another stream may still be reading (it waits for them) and
    keeps the last replay's event, so order_after_last_replay still orders a later device write after it."""
    synced = []

    class Event:
        def synchronize(self):
            synced.append(True)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    event = Event()
    monkeypatch.setitem(graphs._last_replay, torch.device("cuda", 0), event)
    graphs.clear()
    assert synced == [True] and graphs._last_replay[torch.device("cuda", 0)] is event
    graphs.set_max_entries(graphs.DEFAULT_MAX_ENTRIES)
    assert synced == [True, True]

#----------------------------------------------------------------------------
# The same on a GPU.


@pytest.mark.cuda
def test_cuda_host_scalar_tensor_extra_arg():
    """A 0-dim CPU tensor beside CUDA tensors is a kernel argument: each value is its own capture, never a
    replay of the value captured first."""
    gmm, sig = gmm3(), schedules.karras(4, 0.05, 10.0)
    x = start(16, dtype=torch.float32, device="cuda")

    def model(x, sigma, gain):
        return gmm.denoise(x, sigma) * gain

    outs = []
    for gain in (1.0, 0.5, 1.0):
        extra = {"gain": torch.tensor(gain, dtype=torch.float32)}
        y = sample(model, x, sig, "euler", extra_args=extra, graph=True)
        assert torch.equal(y, sample(model, x, sig, "euler", extra_args=extra))
        outs.append(y)
    assert not torch.equal(outs[0], outs[1]) and graphs.info()["captures"] == 2


@pytest.mark.cuda
def test_cuda_inference_mode_and_failed_warm_up():
    gmm, sig = gmm3(), schedules.karras(4, 0.05, 10.0)
    x = start(16, dtype=torch.float32, device="cuda")
    with torch.inference_mode():
        sample(gmm, x, sig, "euler_ancestral", seed=1, graph=True)
    y = sample(gmm, x, sig, "euler_ancestral", seed=2, graph=True)
    assert torch.equal(y, sample(gmm, x, sig, "euler_ancestral", seed=2))
    with pytest.raises(ValueError, match="model: output must have the shape of x"):
        sample(lambda x, s: x[:, :1], x, sig, "euler", graph=True)
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    with pytest.raises(GraphCaptureError):
        sample(lambda x, s: gmm.denoise(x, s) * float(s[0]), x, sig, "euler", graph=True)
    assert torch.cuda.current_stream() == torch.cuda.default_stream() and torch.cuda.current_device() == 0
