"""The whole N-step sampling loop as one CUDA graph: ``graph=True``/``"auto"`` of :func:`diffkern.sample` and
:func:`diffkern.sample_iadb` (built in :mod:`diffkern.sampling`), and :func:`sample_hold`. Guide: the README's
section "The whole sampling loop as one CUDA graph".

A new key: the eager loop runs once on a side stream (warm-up: that stream's cuBLAS/cuDNN handles, Triton and
torch.compile compilation), then the same loop (every model call, the guidance batch included, and every fused
update) is captured on that stream, on buffers allocated before (state, history, trajectories, seed, coefficient and
sigma tables, copies of the tensor extra args). Every call copies x and the extra tensors in, writes the seed
(``fill_``/``copy_``: no host sync), rewrites the tables in place if the schedule or a knob changed (the fused ops
read their row from the device table, so the captured launches stay valid), replays on the current stream and
returns clones of the outputs. The key is what a replay bakes in: model identity, its submodules' training flags,
hooks, parameter and buffer addresses and public attributes, and for a wrapper its guidance batch and settings;
x's shape, dtype and device; method and plan launch structure (N, churn and corrector steps, history); seed kind
(one stream or per-sample); record; backend; the extra args' structure, tensor shapes and other values (host
tensors beside a CUDA x by value); the numerics flags. Static buffers are made outside ``torch.inference_mode`` (a
later call outside it writes into them). Memory: one graph pool and side stream per device shared by all captures
(so replays are serialised, whatever the caller's stream; an evicted capture's pool memory is reused by later
captures and returned to the device by :func:`clear` only), at most ``info()["max_entries"]`` captures (default 8,
env ``DIFFKERN_GRAPH_CACHE``), least recently used evicted first, :func:`clear` to drop them. A failed capture
raises :class:`GraphCaptureError`, caches nothing (stream, device, pool and generators as before it) and is
remembered for its key; ``graph="auto"`` then runs eager and warns once.
The keys and a call's static inputs are built in :mod:`diffkern.graph_keys`.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import numbers
import os
import threading
import warnings
import weakref
from typing import Any, Callable

import torch

# Call and plan_structure serve diffkern.sampling; the key functions stay reachable as diffkern.graphs.*.
from .graph_keys import Call, flatten, model_key, plan_structure, write_seed  # noqa: F401

DEFAULT_MAX_ENTRIES = 8
WARMUP_RUNS = 1  # one eager run of all N steps: every model call and launch of the capture runs once before it


class GraphCaptureError(RuntimeError):
    """The sampling loop could not be captured as a CUDA graph (see the message for the cause).

    ``remembered``: False when this call attempted the capture, True when an earlier call did (same key).
    """

    def __init__(self, message: str, remembered: bool = False):
        super().__init__(message)
        self.remembered = remembered


class GraphFallbackWarning(RuntimeWarning):
    """``graph="auto"`` ran the eager loop; emitted once per reason."""


_lock = threading.RLock()
_cache: "collections.OrderedDict[tuple, Entry]" = collections.OrderedDict()
_failed: dict[tuple, tuple] = {}  # key -> (message, a reference to the model: its id must not be reused)
_warned: set[str] = set()
_pools: dict[int, Any] = {}
_streams: dict[int, Any] = {}
_last_replay: dict[Any, Any] = {}  # device -> CUDA event recorded after its last replay


def _env_max_entries() -> int:
    """``DIFFKERN_GRAPH_CACHE`` (default 8): an int >= 1 (0 would evict each capture before its first replay)."""
    raw = os.environ.get("DIFFKERN_GRAPH_CACHE", "").strip()
    if not raw:
        return DEFAULT_MAX_ENTRIES
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"DIFFKERN_GRAPH_CACHE: expected an int >= 1, got {raw!r}")
    return int(raw)


_max_entries: int | None = None  # read from the environment at first use (a bad value fails there, not at import)


def _limit() -> int:
    global _max_entries
    if _max_entries is None:
        _max_entries = _env_max_entries()
    return _max_entries
_counts = collections.Counter()

#----------------------------------------------------------------------------
# Mode resolution.


def wanted(graph, x, callback=None, progress=False, name: str = "x", noise_sampler=None) -> bool:
    """Whether a call runs as a graph: ``graph`` False (never), True (always; raises when it cannot),
    "auto" (when it can; else eager with one :class:`GraphFallbackWarning`). ``name``: the argument x came from,
    which a wrong device is reported against."""
    if graph is False:
        return False
    if graph is not True and graph != "auto":
        raise ValueError(f"graph: expected False, True or 'auto', got {graph!r}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return False  # the eager path raises its own error about x
    for arg, why in _obstacles(x, callback, progress, name, noise_sampler):
        if graph is True:
            raise ValueError(f"{arg}: {why} (graph=True); use graph=False or graph='auto'")
        warn_once(f"graph='auto' runs eager: {why}", stacklevel=4)
        return False
    return True


def _device_ok(x: torch.Tensor) -> bool:
    return x.device.type == "cuda"


def _obstacles(x, callback, progress, name="x", noise_sampler=None):
    if not _device_ok(x):
        yield name, f"CUDA graphs need a CUDA device, got {x.device}"  # one text: 'auto' says it once
    if callback is not None:
        yield "callback", ("a per-step callback cannot run inside a CUDA graph replay; pass record=True to get "
                           "the trajectories (kept on the device)")
    if noise_sampler is not None:
        yield "noise_sampler", "a Python noise_sampler cannot run inside a CUDA graph replay; use seed= (Philox noise)"
    if progress:
        yield "progress", "a progress bar cannot advance inside a CUDA graph replay"
    if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        yield "graph", "the caller is capturing a CUDA graph already (capture the eager loop instead)"
    if torch.is_autocast_enabled(x.device.type):
        # A capture under autocast would read the weight casts cached by the warm-up, freed when the autocast
        # region exits (torch.cuda.make_graphed_callables refuses it for the same reason).
        yield "autocast", ("torch.autocast is active: cast the model to its dtype instead (model.to(torch.bfloat16)) "
                           "or run the eager loop (graph=False)")


def fall_back(exc: GraphCaptureError, stacklevel: int = 3) -> None:
    """``graph="auto"`` after a failed capture: warn with the cause once per key (when it was attempted)."""
    if not exc.remembered:
        warnings.warn(f"diffkern: graph='auto' runs eager: {exc}", GraphFallbackWarning, stacklevel=stacklevel)


def warn_once(message: str, stacklevel: int = 3) -> None:
    """Emit ``message`` as a :class:`GraphFallbackWarning` unless it was emitted before (until :func:`clear`)."""
    with _lock:
        if message in _warned:
            return
        _warned.add(message)
    warnings.warn(f"diffkern: {message}", GraphFallbackWarning, stacklevel=stacklevel)

#----------------------------------------------------------------------------
# The cache.


@dataclasses.dataclass(eq=False)
class Entry:
    """One capture: the static buffers its graph reads and writes."""
    state: Any  # the loop object owning the buffers
    x: torch.Tensor | None  # static input state (None: drawn inside the graph)
    seed: torch.Tensor
    extras: list  # static copies of the tensor extra args
    tables: list  # [device table, the host float64 table last written to it]
    outputs: Callable[[], Any]  # the static outputs (cloned for the caller)
    keep: tuple  # the model and its tensors: the graph reads their memory
    graph: Any = None


def set_max_entries(n: int) -> None:
    """Bound the cache to ``n >= 1`` captures, evicting the least recently used ones now if needed."""
    global _max_entries
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:  # numpy ints too
        raise ValueError(f"n: expected an int >= 1, got {n!r}")
    with _lock:
        _max_entries = int(n)
        _drain()
        _evict()


def _drain() -> None:
    """Wait for every replay before captures are dropped outside a capture (which synchronises already): their
    static buffers go back to the allocator on the stream they were made on, while a replay may still be using them
    on another stream."""
    if _last_replay and torch.cuda.is_available() and torch.cuda.is_initialized():
        for event in _last_replay.values():
            event.synchronize()


def _evict() -> None:
    while len(_cache) > _limit():
        _cache.popitem(last=False)
        _counts["evictions"] += 1


def clear(model=None) -> None:
    """Drop every capture (``model`` given: only that model's) and the remembered capture failures; without
    ``model`` also the warnings already given and the :func:`info` counters. Frees the graph memory (without
    ``model``; the captures of one model share the pool of the others, which reuse its memory). Waits for the
    replays in flight (a host sync: not for sampling loops)."""
    with _lock:
        _drain()  # the events of the last replays are kept: order_after_last_replay still orders after them
        if model is None:
            _cache.clear()
            _failed.clear()
            _warned.clear()
            _pools.clear()
            _counts.clear()
        else:
            for key in [k for k in _cache if k[0][0] == id(model)]:
                del _cache[key]
            for key in [k for k in _failed if k[0][0] == id(model)]:
                del _failed[key]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def order_after_last_replay(device) -> None:
    """Make the current stream of ``device`` wait for the last replay there (an event wait: no host sync). For
    callers that write a captured loop's device state before calling it (a wrapper's call counter, per-call scale
    tables): :func:`run` orders its own input writes after that replay, whatever the caller's stream, but not writes
    made before it. A no-op off CUDA and before any replay."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    with _lock:
        event = _last_replay.get(torch.device("cuda", _index(device)))
    if event is not None:
        torch.cuda.current_stream(device).wait_event(event)


def info() -> dict:
    """Cache statistics: ``entries``, ``max_entries``, and since the last ``clear()``: ``captures``, ``replays``,
    ``table_writes`` (in-place table rewrites), ``evictions``, ``failures`` (failed captures)."""
    with _lock:
        return {"entries": len(_cache), "max_entries": _limit(), **{k: _counts[k] for k in
                ("captures", "replays", "table_writes", "evictions", "failures")}}

#----------------------------------------------------------------------------
# Capture and replay.


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _side_stream(device: torch.device):
    """The device's warm-up and capture stream (shared: a pool is reused best by captures on one stream)."""
    idx = _index(device)
    with torch.cuda.device(idx):
        if idx not in _streams:
            _streams[idx] = torch.cuda.Stream()
        if idx not in _pools:
            _pools[idx] = torch.cuda.graph_pool_handle()
    return _streams[idx], _pools[idx]


def _warm_up(body: Callable[[], None], device: torch.device) -> None:
    """Run the loop eagerly, on the capture stream for CUDA (its cuBLAS handle and workspace are then made)."""
    if device.type != "cuda":
        for _ in range(WARMUP_RUNS):
            body()
        return
    stream, _ = _side_stream(device)
    caller = torch.cuda.current_stream(device)
    stream.wait_stream(caller)
    try:
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_RUNS):
                body()
    finally:
        # Also when the model raised: the buffers of the dropped entry were allocated on the caller's stream, so the
        # allocator may hand them out there again while the side stream's launches still use them.
        caller.wait_stream(stream)


def _record(body: Callable[[], None], device: torch.device):
    """Capture ``body`` into a CUDA graph (shared pool, the warm-up stream); returns the graph."""
    graph = torch.cuda.CUDAGraph()
    stream, pool = _side_stream(device)
    before = torch.cuda.current_stream(device), torch.cuda.current_device()
    try:
        # thread_local: an unsafe call in this thread (a sync) fails the capture; other threads keep working.
        with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            body()
    except BaseException:
        _abandon(graph, device, pool, before)
        raise
    return graph


def _abandon(graph, device: torch.device, pool, before) -> None:
    """Undo what a failed capture leaves behind. When the body invalidated the capture, torch's
    ``CUDAGraph.capture_end`` raises at ``cudaStreamEndCapture``, before it ends the pool's allocation and
    before ``torch.cuda.graph`` restores the stream: the pool would refuse every later capture ("already
    recording") and the thread would stay on the side stream (and on x's device: ``set_stream`` switches to the
    stream's device, so the caller's current device is restored after it). ``before``: (stream, device index)."""
    torch.cuda.set_stream(before[0])
    torch.cuda.set_device(before[1])
    idx = _index(device)
    with contextlib.suppress(RuntimeError):  # raises where capture_end got as far as ending it
        torch._C._cuda_endAllocateToPool(idx, pool)
    graph.reset()  # the generators' capture state of this capture goes with it
    _pools.pop(idx, None)  # the next capture starts a fresh pool


_HINT = ("Inside a CUDA graph the model may not synchronise with the host (.item(), .cpu(), .tolist(), printing a "
         "tensor, Python control flow on tensor values), produce data-dependent shapes (nonzero, boolean indexing), "
         "copy from CPU memory (move the model, and wrappers with their tables, to the device first) or be compiled "
         "with CUDA graphs of its own (torch.compile mode='reduce-overhead'/'max-autotune': use mode='default' or "
         "'max-autotune-no-cudagraphs'). Use graph=False for the eager loop, or graph='auto' to fall back to it.")


def run(key, build: Callable[[], Entry], write_inputs: Callable[[Entry], None], body: Callable[[Entry], None],
        device: torch.device, what: str):
    """Replay the capture of ``key`` after ``write_inputs``, capturing ``body`` into a new :class:`Entry` from
    ``build`` first if needed; returns clones of the entry's outputs."""
    with _lock:
        if key in _failed and _failed[key][1]() is not None:
            raise GraphCaptureError(_failed[key][0], remembered=True)
        entry = _cache.get(key)
        if entry is None:
            _limit()  # a bad DIFFKERN_GRAPH_CACHE fails before the work of a capture
            with torch.inference_mode(False):  # static buffers that later calls outside inference_mode can write
                entry = build()
            _warm_up(lambda: body(entry), device)  # the model's own errors propagate unchanged
            try:
                entry.graph = _record(lambda: body(entry), device)
            except Exception as exc:
                message = f"capturing the {what} loop as a CUDA graph failed: {_describe(exc)}. {_HINT}"
                _failed[key] = message, _ref(entry.keep[0])
                _counts["failures"] += 1
                raise GraphCaptureError(message) from exc
            _counts["captures"] += 1
            _failed.pop(key, None)  # a failure of a model that no longer exists (its id is reused)
            for stale in [k for k in _cache if k[0][0] == key[0][0] and k[0][2] != key[0][2]]:
                del _cache[stale]  # the same model moved or cast: its old captures read dead weights
            _cache[key] = entry
            _evict()
        _cache.move_to_end(key)
        if device.type == "cuda" and device in _last_replay:  # captures share buffers and a pool: one at a time,
            torch.cuda.current_stream(device).wait_event(_last_replay[device])  # whichever stream the caller uses
        write_inputs(entry)
        entry.graph.replay()
        outputs = _clone(entry.outputs())
        if device.type == "cuda":
            _last_replay[device] = torch.cuda.Event()
            _last_replay[device].record(torch.cuda.current_stream(device))
        _counts["replays"] += 1
        return outputs


def _ref(model):
    try:
        return weakref.ref(model)
    except TypeError:  # no weak references to it: keep it (the failure is then never forgotten by accident)
        return lambda: model


def _describe(exc: BaseException) -> str:
    """The exception and what it was raised while handling (a failed capture often fails again on its end)."""
    parts = []
    while exc is not None and len(parts) < 3:
        parts.append(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
        exc = exc.__context__
    return " (raised while handling ".join(parts) + ")" * (len(parts) - 1)


def _clone(out):
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, dict):
        return {k: _clone(v) for k, v in out.items()}
    return tuple(_clone(v) for v in out)


def _write_tables(entry: Entry, hosts: list) -> None:
    """Rewrite a device table only when its float64 host values changed (compared bitwise, NaN included)."""
    for pair, host in zip(entry.tables, hosts):
        if not torch.equal(pair[1].view(torch.int64), host.view(torch.int64)):
            # Pageable host memory is staged before cudaMemcpyAsync returns, so this copy needs no sync.
            pair[0].copy_(host.to(pair[0].dtype), non_blocking=True)
            pair[1] = host
            _counts["table_writes"] += 1


def feed(entry: Entry, x, seed_v, extras: list, hosts: list) -> None:
    """Write one call's inputs into the capture's buffers (on the current stream, without a host sync)."""
    if entry.x is not None and x is not None:
        entry.x.copy_(x)
    write_seed(entry.seed, seed_v)
    for static, t in zip(entry.extras, extras):
        static.copy_(t)
    _write_tables(entry, hosts)


# The HOLD runner lives beside its sampler-specific body; imported last, as it uses the machinery above.
from .graphs_hold import sample_hold  # noqa: E402,F401
