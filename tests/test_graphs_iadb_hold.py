"""The CUDA-graph runner for IADB (``sample_iadb(..., graph=True)``) and HOLD (``graphs.sample_hold``) on the
CPU stand-in of ``test_graphs.py`` (:class:`RecordedGraph`): graph output equal to eager, what is baked into a
capture (times, single-head alphas, the prior's scale) and what is table data.
"""
import pytest
import torch

from diffkern import graphs, hold, hold_sampling
from diffkern.sampling import sample_iadb
from test_graphs import REF, fake, fresh_cache, gmm3, start  # noqa: F401  (fixtures: fake, autouse fresh_cache)



def _iadb_models(device="cpu"):
    gmm = gmm3()
    mean = gmm.mean.to(device)  # moved once: a host-to-device copy inside the model would break its capture

    def means(x, alpha):
        a = alpha.to(torch.float64)[:, None]
        safe = torch.where(a > 0, a, torch.ones_like(a))
        x1 = torch.where(a > 0, gmm.denoise(x / safe, ((1 - safe) / safe)[:, 0]), mean.expand_as(x))
        return (x - a * x1) / (1 - a), x1

    def d(x, alpha):
        x0, x1 = means(x, alpha)
        return x1 - x0

    return {"euler": d, "stochastic": d, "two_head": means}


@pytest.mark.parametrize("variant", ["euler", "two_head", "stochastic"])
def test_iadb_graph_equals_eager(fake, variant):
    model = _iadb_models()[variant]
    x0 = start(4, sigma_max=1.0)
    alphas = [0.0, 0.1, 0.3, 0.55, 0.8, 0.95]
    for seed, record in ((1, False), (2, False), (3, True)):
        g = sample_iadb(model, x0, alphas, variant, backend=REF, seed=seed, record=record, graph=True)
        e = sample_iadb(model, x0, alphas, variant, backend=REF, seed=seed, record=record)
        g, e = (g, e) if record else ((g, {}), (e, {}))
        assert torch.equal(g[0], e[0]) and all(torch.equal(g[1][k], e[1][k]) for k in e[1])
    new = [0.0, 0.2, 0.4, 0.6, 0.85, 0.97]
    for record in (False, True):
        g = sample_iadb(model, x0, new, variant, backend=REF, seed=4, record=record, graph=True)
        e = sample_iadb(model, x0, new, variant, backend=REF, seed=4, record=record)
        assert torch.equal(g[0] if record else g, e[0] if record else e)
    # record with a single head bakes alpha into x1_bar = x + (1 - alpha)*D: a new schedule is a new capture
    assert graphs.info()["captures"] == (2 if variant == "two_head" else 3)


def test_hold_graph_equals_eager(fake):
    proc = hold.HOLD(order=2)

    def model(z, t):
        return torch.tanh(z[:, :1] * (0.5 + t)) - 0.1 * z[:, 1:]

    for sampler, seed in (("sscs", 1), ("em", 2), ("ode", 3)):
        g = graphs.sample_hold(model, proc, (3, 1, 4), sampler=sampler, num_steps=6, seed=seed)
        e = hold_sampling.sample(model, proc, (3, 1, 4), sampler=sampler, num_steps=6, seed=seed)
        assert torch.equal(g, e)
    z = torch.randn(3, 2, 4, dtype=torch.float32)
    g = graphs.sample_hold(model, proc, (3, 1, 4), num_steps=6, seed=4, z=z.clone(), return_state=True)
    assert torch.equal(g, hold_sampling.sample(model, proc, (3, 1, 4), num_steps=6, seed=4, z=z.clone(),
                                               return_state=True))
    assert graphs.info()["captures"] == 2  # samplers are table data; a given z is another capture
    graphs.sample_hold(model, proc, (3, 1, 4), num_steps=6, seed=1, spacing="quadratic")  # new times: new capture
    assert graphs.info()["captures"] == 3
    other = hold.HOLD(order=2, L=5.0)  # the prior's scale 1/sqrt(L) is captured: another L, another capture
    g = graphs.sample_hold(model, other, (3, 1, 4), num_steps=6, seed=1)
    assert torch.equal(g, hold_sampling.sample(model, other, (3, 1, 4), num_steps=6, seed=1))
    assert graphs.info()["captures"] == 4



@pytest.mark.parametrize("shape", [(3,), (3, 1.0, 4), (3, -1, 4), (True, 1)])
def test_hold_graph_checks_shape_as_eager(fake, shape):
    """The graph path refuses a bad data shape with the eager sampler's message (it built the state shape from it)."""
    proc = hold.HOLD(order=2)
    with pytest.raises(ValueError, match="shape: expected the data shape"):
        graphs.sample_hold(lambda z, t: z[:, :1], proc, shape, num_steps=4)
    with pytest.raises(ValueError, match="shape: expected the data shape"):
        hold_sampling.sample(lambda z, t: z[:, :1], proc, shape, num_steps=4)
