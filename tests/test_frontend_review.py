"""Review of the front-end modules: wrappers (prediction types against hand-derived float64 formulas, CFG),
``diffkern.sample``/``sample_iadb`` argument handling, and the CUDA-graph cache keys on the CPU stand-in of
``test_graphs.py`` (every knob and schedule change with one key must replay what eager computes)."""
import pytest
import torch

from diffkern import graphs, hold, hold_sampling, schedules, wrappers
from diffkern.sampling import sample, sample_iadb
from test_graphs import REF, fake, fresh_cache, gmm3, start  # noqa: F401  (fixtures: fake, autouse fresh_cache)

KNOB_SWEEPS = {
    "euler": [{}, {"s_churn": 2.0}, {"s_churn": 2.0, "s_noise": 0.5}, {"s_churn": 2.0, "s_tmin": 0.1, "s_tmax": 5.0}],
    "euler_ancestral": [{"eta": 1.0}, {"eta": 0.0}, {"eta": 0.5, "s_noise": 0.3}],
    "heun": [{}, {"s_churn": 1.0}, {"s_churn": 1.0, "s_noise": 0.2}],
    "dpmpp_2m": [{}],
    "ge": [{}, {"gamma": 1.0}, {"gamma": 1.0, "mu": 0.5}, {"mu": 0.3}],
    "sde": [{"lam": 1.0}, {"lam": 0.0}, {"lam": 0.5, "integrator": "euler_maruyama"}, {"integrator": "euler_maruyama"}],
}


@pytest.mark.parametrize("method", sorted(KNOB_SWEEPS))
def test_graph_replays_equal_eager_across_knobs_and_schedules(fake, method):
    gmm, x = gmm3(), start(4)
    scheds = [schedules.karras(5, 0.05, 10.0), schedules.loglinear(5, 0.1, 8.0), schedules.karras(5, 0.2, 4.0, rho=3)]
    for sig in scheds:
        for kw in KNOB_SWEEPS[method]:
            y = sample(gmm, x, sig, method, backend=REF, seed=3, graph=True, **kw)
            assert torch.equal(y, sample(gmm, x, sig, method, backend=REF, seed=3, **kw)), (sig, kw)


@pytest.mark.parametrize("variant", ["euler", "two_head", "stochastic"])
def test_iadb_graph_replays_equal_eager_across_lam_and_schedules(fake, variant):
    from test_graphs_iadb_hold import _iadb_models

    model, x0 = _iadb_models()[variant], start(4, sigma_max=1.0)
    for alphas in ([0.0, 0.1, 0.3, 0.55, 0.8, 0.95], [0.05, 0.2, 0.4, 0.6, 0.85, 1.0]):
        for lam in ([None] if variant == "euler" else [0.0, 0.5, 1.0]):
            g = sample_iadb(model, x0, alphas, variant, lam=lam, backend=REF, seed=2, graph=True)
            assert torch.equal(g, sample_iadb(model, x0, alphas, variant, lam=lam, backend=REF, seed=2))
    assert graphs.info()["captures"] == 1


def test_hold_graph_replays_equal_eager_across_processes_and_samplers(fake):
    def model(z, t):
        return torch.tanh(z[:, :1] * (0.5 + t)) - 0.1 * z[:, 1:2]

    procs = (hold.HOLD(order=2), hold.HOLD(order=2, alpha=0.3), hold.HOLD(order=2, beta=(0.5, 0.3)),
             hold.HOLD(order=2, hsm=False))
    for proc in procs:  # same L and T: one capture, the tables rewritten
        for sampler in ("sscs", "em", "ode", "ode_exp", "ode_flow"):
            g = graphs.sample_hold(model, proc, (3, 1, 4), sampler=sampler, num_steps=6, seed=1)
            assert torch.equal(g, hold_sampling.sample(model, proc, (3, 1, 4), sampler=sampler, num_steps=6, seed=1))
    assert graphs.info()["captures"] == 1

#----------------------------------------------------------------------------
# Graph keys: what a capture bakes in beyond the wrapper object itself.


def test_inner_network_train_eval_is_part_of_the_key(fake):
    gmm = gmm3()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, x, t):  # an eps network for the cosine time map, plus dropout noise in train mode
            sigma = torch.tan(t.to(torch.float64) * (torch.pi / 2))
            return gmm.eps(x * torch.sqrt(1 + sigma * sigma)[:, None], sigma) + 1e-2 * self.drop(x)

    net = Net()  # a fresh module trains: the user wraps it, then calls net.eval() (the wrapper's flag stays)
    model, x, sig = wrappers.VPContinuousDenoiser(net, "eps", time="cosine"), start(4), schedules.karras(4, 0.05, 10.0)
    sample(model, x, sig, "euler", backend=REF, graph=True)
    net.eval()
    assert model.training
    assert torch.equal(sample(model, x, sig, "euler", backend=REF, graph=True), sample(model, x, sig, "euler",
                                                                                         backend=REF))
    assert graphs.info()["captures"] == 2


def test_wrapper_settings_are_part_of_the_key(fake):
    def net(x_in, c_noise):
        return 0.3 * x_in + c_noise.to(x_in.dtype)[:, None]

    model, x, sig = wrappers.KarrasDenoiser(net, c_noise="sigma"), start(4), schedules.karras(4, 0.05, 10.0)
    for sigma_data in (0.5, 1.0):  # c_in = 1/sqrt(sigma^2 + sigma_data^2) is computed inside the capture
        model.sigma_data = sigma_data
        y = sample(model, x, sig, "euler", backend=REF, graph=True)
        assert torch.equal(y, sample(model, x, sig, "euler", backend=REF))
    flow = wrappers.FlowDenoiser(lambda x_in, t: x_in * t[:, None].to(x_in.dtype))
    for t_scale in (1.0, 1000.0):
        flow.t_scale = t_scale
        y = sample(flow, x, sig, "euler", backend=REF, graph=True)
        assert torch.equal(y, sample(flow, x, sig, "euler", backend=REF))
    assert graphs.info()["captures"] == 4


def test_math_mode_is_part_of_the_key(fake):
    """TF32 / matmul precision and cuDNN's algorithm flags pick the kernels a capture replays: a change recaptures."""
    gmm, x, sig = gmm3(), start(4), schedules.karras(4, 0.05, 10.0)
    precision, benchmark = torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark
    try:
        sample(gmm, x, sig, "euler", backend=REF, graph=True)
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on an Ampere+ GPU
        sample(gmm, x, sig, "euler", backend=REF, graph=True)
        torch.backends.cudnn.benchmark = not benchmark
        sample(gmm, x, sig, "euler", backend=REF, graph=True)
        sample(gmm, x, sig, "euler", backend=REF, graph=True)  # unchanged: a hit
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cudnn.benchmark = benchmark
    assert graphs.info()["captures"] == 3 and graphs.info()["replays"] == 4


def test_graph_cache_size_from_the_environment(monkeypatch):
    for raw, want in (("", graphs.DEFAULT_MAX_ENTRIES), (" 3", 3)):
        monkeypatch.setenv("DIFFKERN_GRAPH_CACHE", raw)
        assert graphs._env_max_entries() == want
    for raw in ("0", "-2", "many"):  # 0 evicted each capture before its replay (KeyError)
        monkeypatch.setenv("DIFFKERN_GRAPH_CACHE", raw)
        with pytest.raises(ValueError, match=f"DIFFKERN_GRAPH_CACHE: expected an int >= 1, got '{raw}'"):
            graphs._env_max_entries()

#----------------------------------------------------------------------------
# sample / sample_iadb argument checks.


def test_bad_x_and_callback_name_the_argument():
    gmm, x, sig = gmm3(), start(3), schedules.karras(3, 0.05, 10.0)
    with pytest.raises(TypeError, match=r"x: expected a floating tensor"):
        sample(gmm, x.tolist(), sig, "euler", record=True)
    calls = []

    def model(x, s):
        calls.append(1)
        return gmm(x, s)

    with pytest.raises(TypeError, match="callback: expected a callable or None, got int"):
        sample(model, x, sig, "euler", callback=5)
    with pytest.raises(TypeError, match="callback: expected a callable or None, got str"):
        sample_iadb(model, x, steps=3, callback="x")
    assert not calls, "checked before the first model call"


def test_per_sample_seeds_are_independent_of_the_batch():
    gmm, x, sig = gmm3(), start(6), schedules.karras(4, 0.05, 10.0)
    seeds = torch.tensor([11, 22, 33, 44, 55, 66])
    for method, kw in (("euler", {"s_churn": 2.0}), ("euler_ancestral", {}), ("ge", {"mu": 0.3}), ("sde", {})):
        full = sample(gmm, x, sig, method, seed=seeds, backend=REF, **kw)
        assert torch.equal(full[[4, 1]], sample(gmm, x[[4, 1]], sig, method, seed=seeds[[4, 1]], backend=REF, **kw))
    full = sample_iadb(lambda a, t: 0.3 - a, x, steps=4, variant="stochastic", seed=seeds, backend=REF)
    assert torch.equal(full[[4, 1]], sample_iadb(lambda a, t: 0.3 - a, x[[4, 1]], steps=4, variant="stochastic",
                                                 seed=seeds[[4, 1]], backend=REF))

#----------------------------------------------------------------------------
# Wrappers.


def test_prediction_types_against_hand_derived_formulas():
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 4, generator=gen, dtype=torch.float64), torch.randn(3, 2, 4, generator=gen,
                                                                                     dtype=torch.float64)
    sigma = torch.tensor([0.1, 1.7, 30.0], dtype=torch.float64)
    s = sigma[:, None, None]
    x = x0 + s * eps  # VE state
    alpha, sig_vp = 1 / torch.sqrt(1 + s * s), s / torch.sqrt(1 + s * s)  # VP: x_vp = alpha*x0 + sig_vp*eps
    outs = {"eps": eps, "v": alpha * eps - sig_vp * x0, "x0": x0}
    for kind, out in outs.items():
        model = wrappers.VPContinuousDenoiser(lambda x_in, t, out=out: out, kind, time="cosine")
        torch.testing.assert_close(model(x, sigma), x0, rtol=0, atol=1e-13)
    t = s / (1 + s)  # rectified flow: x_t = (1-t)*x0 + t*eps = (1-t)*x, v = eps - x0
    def velocity(x_in, tt):
        torch.testing.assert_close(x_in, (1 - t) * x0 + t * eps, rtol=0, atol=1e-13)
        torch.testing.assert_close(tt, t.reshape(-1), rtol=0, atol=1e-15)
        return eps - x0

    torch.testing.assert_close(wrappers.FlowDenoiser(velocity)(x, sigma), x0, rtol=0, atol=1e-13)


def test_cfg_non_tensor_uncond_values_must_equal_the_conditional_ones():
    seen = []

    def net(x_in, t, label=None, pairs=None):
        seen.append((x_in.shape[0], label, pairs))
        return x_in * 0.5 + (0.0 if pairs is None else pairs[0][:, None])

    model = wrappers.FlowDenoiser(net, guidance_scale=3.0)
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="uncond_label: 0 differs from label = 5"):  # was dropped: CFG a no-op
        model(x, 0.5, label=5, uncond_label=0)
    model(x, 0.5, label=5, uncond_label=5)
    assert seen[-1][:2] == (4, 5)
    c, u = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    d = model(x, 0.5, pairs=(c,), uncond_pairs=(u,))  # sequences of tensors pair element-wise (was: uncond dropped)
    assert torch.equal(seen[-1][2][0], torch.cat([u, c]))
    m_c, m_u = x * (2 / 3) * 0.5 + c[:, None], x * (2 / 3) * 0.5
    torch.testing.assert_close(d, (2 / 3) * x - (1 / 3) * (m_u + 3.0 * (m_c - m_u)), rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match=r"uncond_kw: expected a dict with the keys of kw \['a'\]"):
        model(x, 0.5, kw={"a": c}, uncond_kw={"b": u})
    with pytest.raises(ValueError, match=r"uncond_pairs\[0\]: expected a tensor of shape \(2,\) like pairs\[0\]"):
        model(x, 0.5, pairs=(c,), uncond_pairs=(u[:1],))
