"""NumPy scalars at the public API: np.int64 (np.arange, a sweep) wherever a Python int is taken, np.float32 (a config
parsed by numpy) wherever a Python float is. The truth of each call is the same call with the equal Python scalars
(``np.float32(0.3)`` is ``0.30000001192092896``): the same host float64 arithmetic must run, so the results must be
bitwise equal (``torch.equal``), not merely close. np.bool_ is no ``numbers.Integral``/``numbers.Real`` and stays
refused where bool is; an array where a scalar belongs is refused naming the argument. The diffusers drop-ins:
``test_numpy_scalars_diffusers.py``."""
import numpy as np
import pytest
import torch

import diffkern
from diffkern import analytic, hold, hold_sampling, likelihood, schedules, wrappers
from diffkern.ops import coefs, ddim, iadb, philox, sampler_step
from diffkern.ops import hold as hold_ops
from diffkern.ops import likelihood as likelihood_ops
from diffkern.sampling import SAMPLERS, knobs, sample, sample_iadb

BACKENDS = [b for b, why in diffkern.available("cpu").items() if why is None and b in ("reference", "cpp")]
ARRAY = np.array([2, 3])  # where one scalar belongs


def py(v):
    """The equal Python value: numpy scalars as Python scalars, inside tuples and lists too."""
    if isinstance(v, np.generic):
        return v.item()
    return type(v)(py(u) for u in v) if isinstance(v, (tuple, list)) else v


def assert_same(got, want):
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want)
    elif isinstance(want, (tuple, list)):
        assert type(got) is type(want) and len(got) == len(want)
        for g, w in zip(got, want):
            assert_same(g, w)
    else:
        assert type(got) is type(want) and got == want


def check(fn, *args, **kwargs):
    """fn with numpy scalars gives bitwise what it gives with the equal Python scalars; returns the result."""
    want = fn(*py(args), **{k: py(v) for k, v in kwargs.items()})
    got = fn(*args, **kwargs)
    assert_same(got, want)
    return got

#----------------------------------------------------------------------------
# diffkern.sample: every numeric knob of every method, the seed, the window.


GMM = analytic.GaussianMixture.demo_2d()
SIGMAS = schedules.karras(4, 0.1, 10.0)
X = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10.0
FLOAT_KNOBS = {"clip_denoised": 1.5, "s_churn": 0.5, "s_tmin": 0.2, "s_tmax": 5.0, "s_noise": 0.9, "eta": 0.3, "r": 0.3, "gamma": 1.5,
               "mu": 0.3, "lam": 0.7, "tau": 0.6, "rtol": 0.08, "atol": 0.01, "h_init": 0.1, "pcoeff": 0.1,
               "icoeff": 0.9, "dcoeff": 0.05, "accept_safety": 0.8}  # the last seven: dpm_adaptive


def _run(method, **kw):
    kw.setdefault("seed", 3)
    return sample(GMM, X, SIGMAS, method, backend="reference", **kw)


def _knob_cases(method):
    for name, default in knobs(method).items():
        if isinstance(default, bool) or not isinstance(default, (int, float)):
            continue
        if method == "dpmsolver_3m" and name == "eta":  # 0 or 1 only
            yield name, [np.float32(1.0), np.int64(1)]
        elif isinstance(default, int):  # the orders: the default and the one below
            yield name, [t(v) for v in {default, max(default - 1, 1)} for t in (np.int64, np.int32, np.uint8)]
        else:
            v = FLOAT_KNOBS[name]
            yield name, [np.float32(v), np.float16(v), np.float64(v)] + ([np.int64(v)] if v == int(v) else [])


@pytest.mark.parametrize("method", sorted(SAMPLERS))
def test_sample_knobs(method):
    for name, values in _knob_cases(method):
        for v in values:
            check(_run, method, **{name: v})


def test_sample_seed_and_window():
    for seed in (np.int64(7), np.int32(-5), np.uint64(2 ** 64 - 1), np.uint8(200)):
        check(_run, "euler_ancestral", seed=seed)
    check(_run, "dpmpp_2m_sde", window=(np.int64(1), np.int64(9)))
    check(_run, "sa_solver", tau=[np.float32(0.5)] * 4)
    check(_run, "dpmsolver_single", orders=[np.int64(q) for q in (1, 2, 1, 1)])
    check(_run, "unipc", disable_corrector=(np.int64(1),))


@pytest.mark.parametrize("method, kw, exc, match", [
    ("euler_ancestral", {"eta": np.True_}, TypeError, r"^eta: expected a number"),
    ("euler_ancestral", {"s_noise": np.array([1.0, 1.0])}, TypeError, r"^s_noise: expected a number"),
    ("deis", {"order": np.True_}, ValueError, r"^order: expected 1, 2 or 3"),
    ("deis", {"order": ARRAY}, ValueError, r"^order: expected 1, 2 or 3"),
    ("euler_ancestral", {"seed": np.True_}, TypeError, r"^seed: expected an int"),
    ("euler_ancestral", {"seed": ARRAY}, TypeError, r"^seed: expected an int"),
    ("euler", {"window": (np.True_, 8)}, TypeError, r"^window: expected None or a pair of ints"),
])
def test_sample_refusals(method, kw, exc, match):
    with pytest.raises(exc, match=match):
        _run(method, **kw)

#----------------------------------------------------------------------------
# Schedules, IADB, HOLD, likelihood.


AB = schedules.alphas_cumprod(schedules.betas(100))
i64, f32 = np.int64, np.float32


@pytest.mark.parametrize("fn, args", [
    (schedules.karras, (i64(5), f32(0.1), f32(10.0), f32(5.0))),
    (schedules.edm, (np.int32(5),)),
    (schedules.loglinear, (i64(5), f32(0.1), f32(10.0))),
    (schedules.polyexponential, (i64(5), f32(0.1), f32(10.0), f32(2.0))),
    (schedules.vp, (i64(5), f32(19.9), f32(0.1), f32(1e-3))),
    (schedules.betas, (i64(10), f32(1e-4), f32(0.02), "linear")),
    (schedules.betas, (i64(10), f32(1e-4), f32(0.02), "scaled_linear")),
    (schedules.betas, (i64(10), 1e-4, 0.02, "squaredcos_cap_v2", f32(0.9))),
    (schedules.timesteps, (i64(7), np.int32(100), "leading", i64(1))),
    (schedules.timesteps, (i64(7), np.int32(100), "trailing")),
    (schedules.timesteps, (i64(27), i64(1000), "linspace")),
    (schedules.ge_schedule, (i64(5), AB, f32(8.35), f32(0.02), "linear", f32(0.3))),
    (schedules.ge_schedule, (i64(5), AB, f32(8.35), f32(0.02), "edm")),
    (schedules.sample_sigmas, (torch.linspace(0.1, 5.0, 20, dtype=torch.float64), i64(5))),
    (schedules.iadb_alphas, (i64(5),)),
    (schedules.sigma_to_alpha_bar, (f32(0.3),)),
    (schedules.alpha_bar_to_sigma, (f32(0.3),)),
    (schedules.sigma_to_iadb_alpha, (i64(2),)),
    (schedules.iadb_alpha_to_sigma, (f32(0.3),)),
    (schedules.sigma_to_flow_t, (f32(0.3),)),
    (schedules.flow_t_to_sigma, (f32(0.3),)),
], ids=lambda v: getattr(v, "__name__", None))
def test_schedules(fn, args):
    check(fn, *args)


@pytest.mark.parametrize("call, match", [
    (lambda: schedules.karras(np.True_, 0.1, 10.0), r"^karras: n: expected an int >= 1"),
    (lambda: schedules.karras(ARRAY, 0.1, 10.0), r"^karras: n: expected an int >= 1"),
    (lambda: schedules.karras(5, np.array([0.1, 0.2]), 10.0), r"^karras: sigma_min: expected a finite number"),
    (lambda: schedules.betas(np.True_), r"^betas: num_train_timesteps: expected an int"),
    (lambda: schedules.betas(10, beta_end=np.True_), r"^betas: beta_end: expected a number"),
    (lambda: schedules.timesteps(4, 100, steps_offset=np.True_), r"^timesteps: steps_offset: expected an int"),
    (lambda: schedules.vp(5, beta_min=ARRAY), r"^vp: beta_min: expected a finite number"),
])
def test_schedule_refusals(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _iadb_model(x, alpha):
    return -0.5 * x + alpha.view(-1, 1)


@pytest.mark.parametrize("variant, lam", [("euler", None), ("stochastic", f32(0.7)), ("two_head", f32(0.3)),
                                          ("stochastic", i64(1))])
def test_sample_iadb(variant, lam):
    x0 = X / 10
    model = (lambda x, a: (x, _iadb_model(x, a))) if variant == "two_head" else _iadb_model
    check(lambda steps, lam: sample_iadb(model, x0, variant=variant, steps=steps, lam=lam, seed=i64(2),
                                         backend="reference"), i64(4), lam)


def test_sample_iadb_refusals():
    x0 = X / 10
    for steps in (np.True_, ARRAY):
        with pytest.raises(ValueError, match=r"^steps: expected an int >= 1"):
            sample_iadb(_iadb_model, x0, steps=steps)
    with pytest.raises(TypeError, match=r"^alphas: .*pass steps=8"):
        sample_iadb(_iadb_model, x0, i64(8))
    with pytest.raises(TypeError, match=r"^lam: expected a number"):
        sample_iadb(_iadb_model, x0, variant="stochastic", lam=np.True_)


def _hold(order, L, alpha, T, delta, b0, b1, rate):
    proc = hold.HOLD(order, L=L, alpha=alpha, T=T, delta=delta, beta=(b0, b1), rate=rate)
    assert type(proc.order) is int and all(type(getattr(proc, k)) is float for k in ("L", "alpha", "T", "beta1"))
    return repr(proc), proc.chol(0.7), proc.transition(torch.tensor([0.2, 1.5], dtype=torch.float64))


def test_hold_process():
    check(_hold, i64(3), f32(2.0), f32(0.08), f32(5.0), f32(1e-9), f32(1.0), f32(0.3), f32(1.2))
    check(lambda m, b, g: repr(hold.HOLD.from_cld(m, gamma=g, beta=b)), f32(4.1), (f32(3.3), f32(0.7)), f32(0.05))
    check(lambda b: repr(hold.HOLD.from_cld(beta=b)), f32(3.3))
    proc = hold.HOLD(2)
    for name in ("transition", "gramian", "cov", "chol", "score_scale", "x0_coefficients"):
        check(getattr(proc, name), f32(0.7))
    for bad in (np.True_, np.array([0.5, 0.7])):  # np.bool_ was read as a time 1.0 before
        with pytest.raises(TypeError, match=r"^t: expected a real number or a tensor"):
            proc.chol(bad)
    with pytest.raises(TypeError, match=r"^order: expected a Python int"):
        hold.HOLD(np.True_)
    with pytest.raises(TypeError, match=r"^order: expected a Python int"):
        hold.HOLD(ARRAY)
    with pytest.raises(TypeError, match=r"^L: expected a real number"):
        hold.HOLD(2, L=np.True_)


def test_hold_sampling():
    proc = hold.HOLD(2)
    mix = hold_sampling.GaussianMixture(torch.tensor([0.5, 0.5]), torch.tensor([-1.0, 1.0]), torch.tensor([0.3, 0.3]))
    model = hold_sampling.GaussianMixtureScore(proc, mix)
    check(lambda shape, n, t, seed: hold_sampling.sample(model, proc, shape, num_steps=n, t_min=t, seed=seed,
                                                         backend="reference", dtype=torch.float64),
          (i64(4), np.int32(1)), i64(5), f32(1e-2), i64(3))
    check(lambda n, t: hold_sampling.time_grid(proc, n, t_min=t, spacing="quadratic"), i64(5), f32(0.01))
    for kw, match in (({"num_steps": np.True_}, r"^num_steps: expected a Python int"),
                      ({"num_steps": ARRAY}, r"^num_steps: expected a Python int"),
                      ({"t_min": np.True_}, r"^t_min: expected 0 < t_min")):
        with pytest.raises(ValueError, match=match):
            hold_sampling.sample(model, proc, (4, 1), **{"num_steps": 4, **kw})
    with pytest.raises(ValueError, match=r"^shape: expected the data shape"):
        hold_sampling.sample(model, proc, (np.True_, 1), num_steps=4)


POINTS = torch.tensor([[0.0, 2.0], [1.4, 1.4]], dtype=torch.float64)


def test_likelihood():
    check(lambda *a: likelihood.log_likelihood(GMM, POINTS, sigma_min=a[0], sigma_max=a[1], n_levels=a[2],
                                               n_samples=a[3], seed=a[4], data_mean=a[5], data_std=a[6],
                                               batch_size=a[7], backend="reference"),
          f32(0.01), f32(40.0), i64(8), np.int32(3), i64(5), f32(0.1), f32(2.0), i64(3))
    check(lambda *a: likelihood.ode_log_likelihood(GMM, POINTS, sigma_min=a[0], sigma_max=a[1], rtol=a[2], atol=a[3],
                                                   max_steps=a[4], data_mean=a[5], data_std=a[6], trace="hutchinson",
                                                   probes=a[7], seed=a[8], max_dim=a[9]),
          f32(0.05), f32(20.0), f32(1e-3), f32(1e-3), i64(500), f32(0.1), f32(2.0), i64(2), i64(3), i64(8))
    check(likelihood.gaussian_terminal, POINTS, f32(20.0), f32(0.1), f32(2.0))
    check(lambda lp, d, s: likelihood.bits_per_dim(lp, d, scale=s), f32(-3.5), i64(6), f32(2 / 255))
    levels = torch.randint(0, 256, (2, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    check(lambda s, sh, seed: likelihood.dequantize(levels, scale=s, shift=sh, seed=seed), f32(2 / 255), f32(-1.0),
          i64(7))
    for kw, match in (({"seed": np.True_}, r"^seed: expected an int"), ({"n_levels": ARRAY}, r"^n_levels: expected"),
                      ({"data_std": np.True_}, r"^data_std: expected a finite float")):
        with pytest.raises(ValueError, match=match):
            likelihood.log_likelihood(GMM, POINTS, **kw)
    with pytest.raises(ValueError, match=r"^probes: expected an int >= 1"):
        likelihood.ode_log_likelihood(GMM, POINTS, trace="hutchinson", probes=np.True_)
    with pytest.raises(ValueError, match=r"^dims: expected an int >= 1"):
        likelihood.bits_per_dim(-3.0, ARRAY)


def test_analytic():
    check(GMM.denoise, POINTS, f32(0.5))
    check(lambda n: GMM.sample(n, torch.Generator().manual_seed(0)), i64(5))
    data = torch.randn(10, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    check(lambda c, s: analytic.EmpiricalDenoiser(data, chunk_size=c).denoise(POINTS, s), i64(3), f32(0.5))
    check(lambda s, sd: wrappers.conversion("edm", s, sd), f32(0.7), f32(0.3))
    check(lambda sd, w: wrappers.KarrasDenoiser(GMM, sd, guidance_scale=w).conversion(0.7), f32(0.3), f32(2.5))
    with pytest.raises(TypeError, match=r"sigma must be a float or a tensor"):
        GMM.denoise(POINTS, np.True_)

#----------------------------------------------------------------------------
# Ops taking Python scalars: step indices and counters, blending values.


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops(backend):
    gen = torch.Generator().manual_seed(2)
    x, d = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    table = coefs.table([coefs.row(a=0.9, b=0.1, s=0.05)] * 3)
    seed = torch.tensor([7])
    check(lambda i: sampler_step(x, d, table, i, seed=seed, backend=backend), i64(2))
    check(lambda a, b: iadb.iadb_deblend(x, d, a, b, backend=backend), f32(0.3), f32(0.5))
    check(lambda b: iadb.iadb_deblend_two_head(x, d, b, backend=backend), f32(0.5))
    check(lambda a, b, e, s: ddim.ddim_step(x, d, a, b, eta=e, seed=seed, step=s, backend=backend),
          f32(0.5), f32(0.7), f32(0.5), i64(2))
    check(lambda s, o: philox.randn((3, 4), seed, step=s, offset=o, backend=backend), i64(3), np.uint32(4))
    acc = likelihood_ops.acc_dtype(x.dtype)
    sig, w = torch.full((3,), 0.5, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    check(lambda s: likelihood_ops.likelihood_accum(x, d, sig, w, torch.zeros(3, dtype=acc), step=s, seed=seed,
                                                    backend=backend), i64(3))
    proc = hold.HOLD(2)
    mean_mat, chol = proc.perturb_matrices(torch.tensor([0.5, 0.7, 1.0], dtype=torch.float64))
    check(lambda s: hold_ops.hold_perturb(x[:, :2], mean_mat, chol, seed=seed, step=s, backend=backend), i64(4))
    hold_table = hold_sampling.sampler_table(proc, hold_sampling.time_grid(proc, 4))
    check(lambda s: hold_ops.hold_transition(x, d[:, :2], hold_table, s, seed=seed, backend=backend), i64(2))
    for bad in (np.True_, ARRAY):
        with pytest.raises(TypeError, match=r"^step: expected a Python int"):
            sampler_step(x, d, table, bad, seed=seed, backend=backend)
        with pytest.raises(TypeError, match=r"^step: expected a Python int"):
            philox.randn((3, 4), seed, step=bad, backend=backend)
        with pytest.raises(ValueError, match=r"^step: expected a Python int >= 0"):
            ddim.ddim_step(x, d, 0.5, 0.7, step=bad, backend=backend)
        with pytest.raises(ValueError, match=r"^alpha: expected a finite number"):
            iadb.iadb_deblend(x, d, bad, 0.5, backend=backend)


def test_graph_cache_bound():
    from diffkern import graphs
    old = graphs._max_entries
    try:
        graphs.set_max_entries(np.int64(5))
        assert graphs._max_entries == 5 and type(graphs._max_entries) is int
        with pytest.raises(ValueError, match=r"^n: expected an int >= 1"):
            graphs.set_max_entries(np.True_)
    finally:
        graphs._max_entries = old


def test_optimal_denoiser_sigma():
    from diffkern.ops.optimal_denoiser import optimal_denoiser
    x, data = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    check(lambda s: optimal_denoiser(x, data, s, backend="reference"), f32(0.5))
    with pytest.raises(TypeError, match=r"^sigma: expected a float or a tensor"):
        optimal_denoiser(x, data, np.True_, backend="reference")
