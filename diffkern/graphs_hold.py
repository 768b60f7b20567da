"""The HOLD samplers (:func:`diffkern.hold_sampling.sample`) as one CUDA graph: :func:`sample_hold`, reached as
``diffkern.graphs.sample_hold``. The capture machinery (cache, warm-up, capture, fallback) is :mod:`diffkern.graphs`.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def sample_hold(model, proc, shape, *, sampler="sscs", num_steps=500, spacing="linear", t_min=1e-3, denoise=True,
                seed=0, device=None, dtype=torch.float32, z=None, backend=None, return_state=False,
                graph=True):
    """:func:`diffkern.hold_sampling.sample` (same arguments and output) as one CUDA graph.

    The forward times reach the model as Python floats, so the time grid (``num_steps``, ``spacing``,
    ``t_min``, ``denoise``) is part of the key; the process and the sampler are table data. The prior
    draw (when ``z`` is None) is inside the graph. ``graph``: True or "auto" (False: the eager sampler).
    """
    from . import hold_sampling as hs
    from .ops.hold import hold_transition

    if z is not None:
        device, dtype = z.device, z.dtype
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":  # "cuda" and "cuda:0" are one capture and one replay queue
        device = torch.device("cuda", _index(device))

    def eager(state: bool):
        return hs.sample(model, proc, shape, sampler=sampler, num_steps=num_steps, spacing=spacing, t_min=t_min,
                         denoise=denoise, seed=seed, device=device, dtype=dtype, z=z, backend=backend,
                         return_state=state)

    if not wanted(graph, torch.empty(0, dtype=dtype, device=device) if z is None else z, name="device" if z is None
                  else "z"):
        return eager(return_state)
    hs.check_args(model, proc, shape, num_steps, denoise, return_state)
    num_steps, shape = int(num_steps), tuple(int(s) for s in shape)  # numpy ints (checked above) as Python's
    steps = num_steps - int(denoise)
    grid = hs.time_grid(proc, steps, t_min=t_min, spacing=spacing)
    times = [grid.tolist()[min(i, steps)] for i in range(num_steps)]
    state_shape = (shape[0], proc.order * shape[1], *shape[2:])
    if z is not None and tuple(z.shape) != state_shape:
        raise ValueError(f"z: expected shape {state_shape}, got {tuple(z.shape)}")
    table = hs.sampler_table(proc, grid, sampler, denoise=denoise)
    call = Call(model, torch.empty(state_shape, dtype=dtype, device="meta"), seed, backend, {})

    def build() -> Entry:
        static_z = torch.empty(state_shape, dtype=dtype, device=device)
        if z is not None:
            static_z.copy_(z)  # the warm-up runs on this call's inputs
        state = (static_z, call.static_seed(device), table.to(device))
        return Entry(state, None if z is None else static_z, state[1], [], [[state[2], table]], lambda: static_z,
                     call.keep(model))

    def body(entry: Entry) -> None:
        static_z, static_seed, dev_table = entry.state
        if entry.x is None:
            static_z.copy_(hs.prior(proc, state_shape, static_seed, dtype=dtype, backend=backend))
        for i, t in enumerate(times):
            hold_transition(static_z, model(static_z, t), dev_table, i, seed=static_seed, out=static_z, backend=backend)

    try:
        # The prior's scale 1/sqrt(L) is a constant of the captured body, so L is part of the key.
        out = run(call.key + ("hold", device, tuple(times), tuple(table.shape), z is None, float(proc.L)), build,
                  lambda e: feed(e, z, call.seed, [], [table]), body, device, f"HOLD {sampler}")
    except GraphCaptureError as exc:
        if graph is True:
            raise
        fall_back(exc)
        out = eager(True)
    if z is not None:
        out = z.copy_(out)  # the eager sampler updates a given z in place and returns it
    return out if return_state else out[:, : shape[1]]


# Imported last: diffkern.graphs imports this module at its end, so either one can be imported first.
from .graphs import Call, Entry, GraphCaptureError, _index, fall_back, feed, run, wanted  # noqa: E402
