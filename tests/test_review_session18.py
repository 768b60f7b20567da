"""Review of session 18's committed changes (git diff cfde892 HEAD): regressions found, one test each."""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from test_diffusers_schedulers import diffusers_class  # noqa: E402


@pytest.mark.parametrize("n", [1, 2, 3])
def test_dpmsolver_sde_sample_after_last_call(n):
    """DPMSolverSDE's ``sample`` as stock's through a whole loop: the predictor's sample between a step's two calls,
    None after its last call (an Euler step to sigma = 0 with no second call, where stock stores nothing)."""
    cls = diffusers_class("DPMSolverSDEScheduler")
    if cls is None:
        pytest.skip("diffusers' DPMSolverSDEScheduler needs torchsde")
    stock, ours = cls(), dd.DPMSolverSDEScheduler()
    stock.set_timesteps(n)
    ours.set_timesteps(n)
    x = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    xs = xo = x
    for k in range(len(stock.timesteps)):
        m = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(k + 1))
        xs_in, xo_in = xs, xo
        xs = stock.step(m, stock.timesteps[k], xs).prev_sample
        xo = ours.step(m, ours.timesteps[k], xo).prev_sample
        assert (stock.sample is None) == (ours.sample is None), (k, stock.sample is None)
        if stock.sample is not None:
            assert stock.sample is xs_in and ours.sample is xo_in, k  # a reference to the call's sample, as stock
    assert ours.sample is None


def test_graph_paths_run_under_no_grad():
    """The CUDA-graph paths are decorated with torch.no_grad (5bd5abf once moved the decorator onto a check that
    was inserted above _sample_graph): a captured step must record no autograd graph."""
    from diffkern import sampling
    for fn in (sampling._sample_graph, sampling._sample_iadb_graph):
        assert getattr(fn, "__wrapped__", None) is not None, fn.__name__
    assert getattr(sampling._check_record, "__wrapped__", None) is None


@pytest.mark.parametrize("n", [1, 2, 3])
def test_dpmsolver_sde_state_in_first_order_after_last_call(n):
    """diffusers' DPMSolverSDE reads state_in_first_order as ``sample is None``: True again after the loop's last
    call (an Euler step to 0); ours counted calls and said False there."""
    import warnings
    import diffusers
    seen = []
    for sched in (diffusers.DPMSolverSDEScheduler(), dd.DPMSolverSDEScheduler()):
        sched.set_timesteps(n)
        x = torch.randn(1, 2, 2, 2, generator=torch.Generator().manual_seed(0))
        states = []
        with warnings.catch_warnings():  # torchsde's end-point rounding warnings in the stock class
            warnings.simplefilter("ignore", UserWarning)
            for t in sched.timesteps:
                x = sched.step(x * 0.5, t, x).prev_sample
                states.append(sched.state_in_first_order)
        seen.append(states)
    assert seen[0] == seen[1]
