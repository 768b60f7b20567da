"""diffkern.diffusers schedulers (Level 1) against diffusers' own schedulers, step by step.

Oracle and tolerance. diffusers holds its training table in float32 and computes each step in float32 (Euler-type
schedulers upcast to float32 and back); diffkern builds float64 tables and runs one fused op with float32 math. The
truth is diffusers' own algorithm run in float64 (:func:`diffusers_float64`: the scheduler module sees
``torch.float32`` as float64, so its betas, alpha-bars and step arithmetic are float64; its noise draws stay the
float32 normals of the same generator). At every step the three schedulers get the same inputs (the truth's state,
cast to float32 for the float32 runs) and ``diffkern.testing.assert_matches_reference`` checks
``max|ours - truth| <= 2*max|diffusers32 - truth| + 2e-6*max(1, max|truth|)``: we must be at most twice as far from
the truth as diffusers itself. Why this bound is reachable: every coefficient we use is the float64 value of the
truth's (same formula, same table) rounded once to float32, and the fused step rounds each product and sum once in
float32, i.e. relative errors of a few 2**-24 = 6e-8 per term; diffusers32 has at least those roundings plus its
float32 table (alpha-bars off by up to ~1e-6 relative after the 1000-term cumprod). The truth's own sigmas pass
through numpy float32 in diffusers' code, a 6e-8 relative perturbation, far below the 2e-6 relative floor. By the
triangle inequality ours is then within 3x diffusers' float32 error (+ floor) of diffusers32 itself.
"""
import contextlib
import math
import re
import types

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.testing import assert_matches_reference, make_tensor  # noqa: E402

SHAPE = (2, 3, 5, 7)


#----------------------------------------------------------------------------
# diffusers in float64.


class _Torch64(types.ModuleType):
    """``torch`` for a diffusers module, except that ``torch.float32`` is float64 (and, with ``wide_numpy``,
    ``torch.from_numpy`` makes float32 arrays float64 tensors)."""

    def __init__(self, wide_numpy=False):
        super().__init__("torch")
        self.wide_numpy = wide_numpy

    def __getattr__(self, name):
        if name == "from_numpy" and self.wide_numpy:
            return _from_numpy64
        return torch.float64 if name == "float32" else getattr(torch, name)


def _from_numpy64(array):
    t = torch.from_numpy(array)
    return t.double() if t.dtype == torch.float32 else t


# Modules whose float32 numpy sigmas (6e-8 relative, harmless as such) feed torch arithmetic that amplifies their
# rounding: KDPM2-ancestral's sigma_down = sqrt(sigma_next^2 - sigma_up^2) cancels ~40x at 6 steps (5e-6 relative,
# above the floor). Their truth does that arithmetic in float64 on the float32 sigmas (both KDPM2 modules, alike). LMS
# evaluates its Lagrange weights on its sigmas tensor, in float32 arithmetic unless upcast (1e-7 relative); SA-Solver
# likewise its log-SNRs and Adams weights. DPMSolverSDE's sigma_down cancels as KDPM2-ancestral's does.
_WIDE_NUMPY = ("scheduling_k_dpm_2_discrete", "scheduling_k_dpm_2_ancestral_discrete", "scheduling_lms_discrete",
               "scheduling_sasolver", "scheduling_dpmsolver_sde")


def _randn32(randn):
    def draw(shape, generator=None, device=None, dtype=None, layout=None):
        wide = dtype == torch.float64
        out = randn(shape, generator=generator, device=device, dtype=torch.float32 if wide else dtype, layout=layout)
        return out.double() if wide else out
    return draw


@contextlib.contextmanager
def diffusers_float64(*modules):
    """Run diffusers ``modules`` (scheduler or pipeline modules) in float64: see the module docstring."""
    saved = [(m, m.torch, getattr(m, "randn_tensor", None)) for m in modules]
    for m, _, randn in saved:
        m.torch = _Torch64(wide_numpy=m.__name__.rsplit(".", 1)[-1] in _WIDE_NUMPY)
        if randn is not None:
            m.randn_tensor = _randn32(randn)
    try:
        yield
    finally:
        for m, t, randn in saved:
            m.torch = t
            if randn is not None:
                m.randn_tensor = randn


def diffusers_class(name: str):
    """diffusers' class ``name``; None where diffusers lacks it or exports a placeholder for a missing optional
    backend (DPMSolverSDEScheduler without torchsde), which raises when used."""
    from diffusers.utils.import_utils import DummyObject

    cls = getattr(diffusers, name, None)
    return None if cls is None or isinstance(cls, DummyObject) else cls


def scheduler_module(name: str):
    import importlib
    files = {"DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "DPMSolverMultistepScheduler": "dpmsolver_multistep",
             "EulerDiscreteScheduler": "euler_discrete", "EulerAncestralDiscreteScheduler": "euler_ancestral_discrete",
             "HeunDiscreteScheduler": "heun_discrete", "KDPM2DiscreteScheduler": "k_dpm_2_discrete",
             "KDPM2AncestralDiscreteScheduler": "k_dpm_2_ancestral_discrete",
             "UniPCMultistepScheduler": "unipc_multistep", "DEISMultistepScheduler": "deis_multistep",
             "PNDMScheduler": "pndm", "LMSDiscreteScheduler": "lms_discrete",
             "DPMSolverSinglestepScheduler": "dpmsolver_singlestep", "SASolverScheduler": "sasolver",
             "DPMSolverSDEScheduler": "dpmsolver_sde"}
    return importlib.import_module(f"diffusers.schedulers.scheduling_{files[name]}")

#----------------------------------------------------------------------------
# Step-by-step parity.

CASES = [
    ("DDIMScheduler", {"clip_sample": False}, {}),
    ("DDIMScheduler", {"prediction_type": "v_prediction", "timestep_spacing": "trailing", "set_alpha_to_one": False},
     {"eta": 0.5, "use_clipped_model_output": True}),
    ("DDIMScheduler", {"prediction_type": "sample", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                       "beta_end": 0.012, "steps_offset": 1}, {"eta": 1.0}),
    ("DDPMScheduler", {}, {}),
    ("DDPMScheduler", {"prediction_type": "v_prediction", "variance_type": "fixed_large", "clip_sample": False,
                       "timestep_spacing": "trailing"}, {}),
    ("DDPMScheduler", {"prediction_type": "sample", "variance_type": "fixed_small_log",
                       "beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "linspace"}, {}),
    ("DPMSolverMultistepScheduler", {}, {}),
    ("DPMSolverMultistepScheduler", {"prediction_type": "v_prediction", "use_karras_sigmas": True,
                                     "final_sigmas_type": "sigma_min", "beta_schedule": "scaled_linear",
                                     "beta_start": 0.00085, "beta_end": 0.012}, {}),
    ("DPMSolverMultistepScheduler", {"prediction_type": "sample", "solver_order": 1, "timestep_spacing": "leading",
                                     "steps_offset": 1}, {}),
    ("DPMSolverMultistepScheduler", {"final_sigmas_type": "sigma_min", "timestep_spacing": "trailing"}, {"steps": 16}),
    ("DPMSolverMultistepScheduler", {"solver_type": "heun", "prediction_type": "v_prediction"}, {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}),
    # (with final_sigmas_type="sigma_min" diffusers' heun SDE step from sigma_min to itself is 0/0: NaN)
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun",
                                     "use_karras_sigmas": True, "timestep_spacing": "trailing"}, {"steps": 16}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 1}, {}),
    ("EulerDiscreteScheduler", {}, {}),
    ("EulerDiscreteScheduler", {"prediction_type": "v_prediction", "timestep_spacing": "leading", "steps_offset": 1},
     {"s_churn": 2.0, "s_tmin": 0.5, "s_tmax": 40.0}),
    ("EulerDiscreteScheduler", {"prediction_type": "sample", "use_karras_sigmas": True,
                                "final_sigmas_type": "sigma_min", "timestep_spacing": "trailing"}, {}),
    ("EulerDiscreteScheduler", {"use_exponential_sigmas": True, "sigma_min": 0.05, "sigma_max": 20.0},
     {"s_churn": 1.0}),
    ("EulerAncestralDiscreteScheduler", {}, {}),
    ("EulerAncestralDiscreteScheduler", {"prediction_type": "v_prediction", "timestep_spacing": "leading"}, {}),
    ("HeunDiscreteScheduler", {}, {}),
    ("HeunDiscreteScheduler", {"prediction_type": "v_prediction", "use_karras_sigmas": True, "clip_sample": True,
                               "clip_sample_range": 2.0}, {}),
    ("HeunDiscreteScheduler", {"prediction_type": "sample", "timestep_spacing": "trailing"}, {}),
    ("KDPM2DiscreteScheduler", {}, {}),
    ("KDPM2DiscreteScheduler", {"prediction_type": "v_prediction", "use_karras_sigmas": True,
                                "beta_schedule": "scaled_linear"}, {}),
    ("KDPM2DiscreteScheduler", {"use_exponential_sigmas": True, "timestep_spacing": "trailing"}, {"steps": 5}),
    ("KDPM2DiscreteScheduler", {"timestep_spacing": "leading", "steps_offset": 1}, {"steps": 1}),
    ("KDPM2AncestralDiscreteScheduler", {}, {}),
    ("KDPM2AncestralDiscreteScheduler", {"prediction_type": "v_prediction", "timestep_spacing": "trailing",
                                         "use_karras_sigmas": True}, {}),
    ("KDPM2AncestralDiscreteScheduler", {"timestep_spacing": "leading", "steps_offset": 1,
                                         "beta_schedule": "squaredcos_cap_v2"}, {"steps": 2}),
]
IDS = [f"{n}-{i}" for i, (n, _, _) in enumerate(CASES)]


def _call(sched, model_output, t, sample, kw, generator):
    step_kw = {k: v for k, v in kw.items() if k != "steps"}
    if "generator" in sched.step.__code__.co_varnames:
        step_kw["generator"] = generator
    return sched.step(model_output, t, sample, **step_kw)


def check_parity(name, config, kw, backend=None, steps=7, begin=0, device="cpu"):
    """Run diffusers float64 (truth), diffusers float32 and ours on the same per-step inputs (the truth's state,
    fresh random model outputs); assert the rule on prev_sample and pred_original_sample at every call."""
    steps = kw.get("steps", steps)
    with diffusers_float64(scheduler_module(name)):
        truth = getattr(diffusers, name)(**config)
        truth.set_timesteps(steps, device=device)
    eager = getattr(diffusers, name)(**config)
    eager.set_timesteps(steps, device=device)
    ours = getattr(dd, name).from_config(eager.config)
    ours.backend = backend
    ours.set_timesteps(steps, device=device)
    for sched in (truth, eager, ours):
        if hasattr(sched, "set_begin_index"):  # diffusers' DDIM/DDPM read the timestep value instead
            sched.set_begin_index(begin)
    # Integer timesteps agree exactly; the fractional ones of Karras/exponential sigmas come from the (float32 in
    # diffusers) log-sigma table, where diffusers is off by up to ~5e-3 timesteps near t = 0: same rule.
    assert ours.timesteps.dtype == eager.timesteps.dtype
    assert_matches_reference(ours.timesteps.cpu().double(), truth.timesteps.cpu().double(),
                             eager.timesteps.cpu().double(), f"{name} {config} timesteps")
    assert math.isclose(float(ours.init_noise_sigma), float(eager.init_noise_sigma), rel_tol=1e-5)
    check_calls(name, truth, eager, ours, kw, f"{name} {config} {kw} [{backend}]", begin=begin, device=device)
    assert ours.step_index == len(ours.timesteps)


def check_calls(name, truth, eager, ours, kw, what, begin=0, device="cpu"):
    """Every call from ``begin`` on the same per-step inputs (the truth's state, fresh random model outputs):
    ``scale_model_input``, ``prev_sample`` and ``pred_original_sample`` of ``ours`` under the rule against diffusers
    in float64 (``truth``) and float32 (``eager``), each scheduler with its own timestep values."""
    gens = [torch.Generator().manual_seed(7) for _ in range(3)]
    x = make_tensor(SHAPE, torch.float64, seed=11, device=device) * float(truth.init_noise_sigma)
    for k in range(begin, len(eager.timesteps)):
        t64, t32, t = truth.timesteps[k], eager.timesteps[k], ours.timesteps[k]
        m = make_tensor(SHAPE, torch.float64, seed=100 + k, device=device)
        x32, m32 = x.float(), m.float()
        with diffusers_float64(scheduler_module(name)):
            assert_matches_reference(ours.scale_model_input(x32, t), truth.scale_model_input(x, t64),
                                     eager.scale_model_input(x32, t32), f"{name} scale_model_input {k}")
            ref = _call(truth, m, t64, x, kw, gens[0])
        out = _call(eager, m32, t32, x32, kw, gens[1])
        got = _call(ours, m32, t, x32, kw, gens[2])
        at = f"{what} call {k} (t={float(t):g})"
        assert_matches_reference(got.prev_sample, ref.prev_sample, out.prev_sample, at + " prev_sample")
        if getattr(out, "pred_original_sample", None) is not None:
            assert_matches_reference(got.pred_original_sample, ref.pred_original_sample, out.pred_original_sample,
                                     at + " pred_original_sample")
        x = ref.prev_sample


@pytest.mark.parametrize("name, config, kw", CASES, ids=IDS)
def test_matches_diffusers(name, config, kw):
    check_parity(name, config, kw)


@pytest.mark.parametrize("name", sorted({c[0] for c in CASES}))
def test_matches_diffusers_every_backend(cpu_backend, name):
    config, kw = next((c, k) for n, c, k in CASES if n == name)
    check_parity(name, config, kw, backend=cpu_backend, steps=3)


@pytest.mark.parametrize("name, config, begin", [
    ("DPMSolverMultistepScheduler", {}, 3), ("EulerDiscreteScheduler", {}, 2), ("HeunDiscreteScheduler", {}, 4),
    ("DDIMScheduler", {"clip_sample": False}, 5), ("KDPM2DiscreteScheduler", {}, 4),
    ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}, 2)])
def test_set_begin_index(name, config, begin):
    check_parity(name, config, {}, begin=begin)


def test_timesteps_match_diffusers():
    """Bitwise the timesteps of diffusers' float32 scheduler, Karras ones included (rounded from its float32
    log-sigma table, whose arithmetic diffkern.diffusers.timestep_labels repeats; the full grid is in
    tests/test_level1_timestep_bits.py)."""
    for name in ("DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
                 "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler"):
        for spacing in ("leading", "trailing", "linspace"):
            for steps in (1, 4, 25, 26, 27, 50, 333, 998):  # 26, 27: .5 ties of 'linspace' (regression)
                config = {"timestep_spacing": spacing, "steps_offset": 1 if spacing == "leading" else 0}
                karras = name == "DPMSolverMultistepScheduler" and steps in (25, 998)
                if karras:
                    config["use_karras_sigmas"] = True
                theirs = getattr(diffusers, name)(**config)
                theirs.set_timesteps(steps)
                ours = getattr(dd, name)(**config)
                ours.set_timesteps(steps)
                expected = theirs.timesteps
                if spacing == "trailing" and len(expected) > len(ours.timesteps):
                    # diffusers' float arange(T, 0, -T/N) yields N+1 values here, the last one t = -1 (invalid)
                    assert (expected[len(ours.timesteps):] < 0).all()
                    expected = expected[:len(ours.timesteps)]
                assert torch.equal(ours.timesteps, expected), f"{name} {config} steps={steps}"


def test_karras_bounds_of_a_foreign_config_are_read():
    """Heun's and KDPM2's Karras/exponential sigmas use sigma_min/sigma_max whenever the config holds them (an Euler
    config loaded into them), as diffusers' classes do."""
    config = diffusers.EulerDiscreteScheduler(sigma_min=0.1, sigma_max=10.0, use_karras_sigmas=True).config
    for name in ("HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"):
        theirs, ours = getattr(diffusers, name).from_config(config), getattr(dd, name).from_config(config)
        for s in (theirs, ours):
            s.set_timesteps(4)
        torch.testing.assert_close(ours.sigmas, theirs.sigmas, rtol=1e-5, atol=0)
        assert float(ours.sigmas[0]) == pytest.approx(10.0)


def test_kdpm2_timesteps_match_diffusers():
    """KDPM2's timesteps are bitwise diffusers' float32 ones: the schedule's own (even positions) and the midpoint
    calls' fractional ones (odd positions, diffusers' float32 arithmetic repeated by timestep_labels)."""
    for name in ("KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"):
        for spacing in ("leading", "trailing", "linspace"):
            for steps in (1, 4, 26, 27, 50, 333):
                config = {"timestep_spacing": spacing, "steps_offset": 1 if spacing == "leading" else 0}
                theirs = getattr(diffusers, name)(**config)
                ours = getattr(dd, name)(**config)
                for s in (theirs, ours):
                    s.set_timesteps(steps)
                assert ours.timesteps.shape == theirs.timesteps.shape == (2 * steps - 1,)
                assert torch.equal(ours.timesteps[::2], theirs.timesteps[::2]), f"{name} {config} steps={steps}"
                assert torch.equal(ours.timesteps, theirs.timesteps), f"{name} {config} steps={steps} midpoints"


#----------------------------------------------------------------------------
# GE and IADB: float64 references written from math-samplers.md 2.5 and 1.3/1.6.


def _ge_reference(sigmas, x, model_outputs, gamma, clip):
    """The GEScheduler loop of math-samplers.md 2.5 (teacher-forced: state k from ``x[k]``); yields (x', pred)."""
    eps_prev = None
    for i, (s, sn) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        eps = model_outputs[i]
        if clip is not None:
            x0 = (x[i] - s * eps).clamp(-clip, clip)
            eps = (x[i] - x0) / s
        eps_bar = eps if eps_prev is None else gamma * eps + (1 - gamma) * eps_prev
        yield x[i] + (sn - s) * eps_bar, x[i] - s * eps_bar
        eps_prev = eps


@pytest.mark.parametrize("config", [{}, {"clip_sample": False, "gamma": 1.5, "style": "EDM"},
                                    {"style": "DDIM", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                     "beta_end": 0.012, "start": 14.0}])
def test_ge_matches_spec(config):
    steps = 6
    ours = dd.GEScheduler(**config)
    ours.set_timesteps(steps)
    cfg = ours.config
    sig = ours.sigmas_host
    assert len(ours.timesteps) == steps and len(sig) == steps + 1
    assert math.isclose(ours.init_noise_sigma, math.sqrt(sig[0] ** 2 + 1))
    states = [make_tensor(SHAPE, torch.float64, seed=50 + k) * sig[k] for k in range(steps)]
    outs = [make_tensor(SHAPE, torch.float64, seed=80 + k) for k in range(steps)]
    clip = cfg.clip_sample_range if cfg.clip_sample else None
    truth = list(_ge_reference(sig, states, outs, cfg.gamma, clip))
    eager = list(_ge_reference(sig, [s.float() for s in states], [o.float() for o in outs], cfg.gamma, clip))
    for k, t in enumerate(ours.timesteps):
        x32 = states[k].float()
        scaled = ours.scale_model_input(x32, t)
        torch.testing.assert_close(scaled, x32 / math.sqrt(sig[k] ** 2 + 1))
        got = ours.step(outs[k].float(), t, x32)
        assert_matches_reference(got.prev_sample, truth[k][0], eager[k][0], f"GE {config} step {k} prev_sample")
        assert_matches_reference(got.pred_original_sample, truth[k][1], eager[k][1], f"GE {config} step {k} pred")


def test_ge_linear_schedule_ends_at_t_over_n():
    # math-samplers.md 2.5: with factor 0 the geometric part ends at sigma(T//N) (t = 100 for N = 10), then t = 0
    ours = dd.GEScheduler(clip_sample=False)
    ours.set_timesteps(10)
    assert int(ours.timesteps[-1]) == 100
    assert ours.sigmas_host[-2] == pytest.approx(float(ours.train_sigmas[100]))
    assert ours.sigmas_host[0] == pytest.approx(8.35, rel=0.02)


def _iadb_reference(alphas, x, d, noise, variant, lam):
    for i, (a, an) in enumerate(zip(alphas[:-1], alphas[1:])):
        x1_bar = x[i] + (1 - a) * d[i]
        if variant == "euler":
            yield x[i] + (an - a) * d[i], x1_bar
            continue
        x0_bar = x[i] - a * d[i]
        k = 0.0 if a == 0 else (((1 - an) / an) / ((1 - a) / a)) ** (lam * lam)
        yield an * x1_bar + (1 - an) * (k * x0_bar + math.sqrt(1 - k * k) * noise[i]), x1_bar


@pytest.mark.parametrize("variant, lam", [("euler", 1.0), ("stochastic", 1.0), ("stochastic", 0.5)])
def test_iadb_matches_spec(variant, lam):
    steps = 5
    ours = dd.IADBScheduler(variant=variant, lam=lam, timestep_scale=999.0)
    ours.set_timesteps(steps)
    alphas = [k / steps for k in range(steps + 1)]
    torch.testing.assert_close(ours.timesteps, torch.tensor(alphas[:-1]) * 999.0)
    x = [make_tensor(SHAPE, torch.float64, seed=20 + k) for k in range(steps)]
    d = [make_tensor(SHAPE, torch.float64, seed=40 + k) for k in range(steps)]
    gen = torch.Generator().manual_seed(3)
    noise = [torch.randn(SHAPE, generator=gen).double() for _ in range(steps)] if variant != "euler" else [None] * steps
    truth = list(_iadb_reference(alphas, x, d, noise, variant, lam))
    eager = list(_iadb_reference(alphas, [v.float() for v in x], [v.float() for v in d],
                                 [None if n is None else n.float() for n in noise], variant, lam))
    gen = torch.Generator().manual_seed(3)
    for k, t in enumerate(ours.timesteps):
        got = ours.step(d[k].float(), t, x[k].float(), generator=gen)
        assert_matches_reference(got.prev_sample, truth[k][0], eager[k][0], f"IADB {variant} step {k}")
        assert_matches_reference(got.pred_original_sample, truth[k][1], eager[k][1], f"IADB {variant} step {k} x1")

#----------------------------------------------------------------------------
# Noise without a generator, host-sync rules, API contract.


def test_philox_noise_is_seeded_and_per_loop():
    sched = dd.DDPMScheduler(clip_sample=False)
    x, m = make_tensor(SHAPE, seed=1), make_tensor(SHAPE, seed=2)

    def first_step(seed):
        sched.set_seed(seed)
        sched.set_timesteps(10)
        return sched.step(m, sched.timesteps[0], x).prev_sample

    torch.testing.assert_close(first_step(5), first_step(5), rtol=0, atol=0)
    assert not torch.equal(first_step(5), first_step(6))
    torch.manual_seed(0)
    a = first_step(None)
    torch.manual_seed(0)
    torch.testing.assert_close(first_step(None), a, rtol=0, atol=0)


def test_step_does_not_read_device_timesteps():
    # a timestep that cannot be read at all (meta tensor): step() must not index anything with it
    for cls in (dd.DDIMScheduler, dd.EulerDiscreteScheduler, dd.DPMSolverMultistepScheduler, dd.HeunDiscreteScheduler,
                dd.KDPM2DiscreteScheduler, dd.KDPM2AncestralDiscreteScheduler):
        sched = cls()
        sched.set_timesteps(4)
        x = make_tensor(SHAPE, seed=1)
        for k in range(len(sched.timesteps)):
            t = torch.empty((), device="meta")
            sched.scale_model_input(x, t)
            x = sched.step(make_tensor(SHAPE, seed=k), t, x).prev_sample
        assert torch.isfinite(x).all()


def test_out_of_order_host_timestep_raises():
    sched = dd.DDIMScheduler()
    sched.set_timesteps(10)
    x = make_tensor(SHAPE, seed=1)
    sched.step(x, 900, x)
    with pytest.raises(ValueError, match="timestep: expected 800"):
        sched.step(x, 500, x)
    with pytest.raises(ValueError, match="set_timesteps"):
        dd.EulerDiscreteScheduler().step(x, 1.0, x)
    sched.set_timesteps(1)
    sched.step(x, sched.timesteps[0], x)
    with pytest.raises(IndexError, match="past the end"):
        sched.step(x, 0, x)


@pytest.mark.parametrize("cls, option, value", [
    (dd.DDIMScheduler, "thresholding", True), (dd.DDIMScheduler, "prediction_type", "flow"),
    (dd.DPMSolverMultistepScheduler, "use_dynamic_shifting", True), (dd.DDIMScheduler, "beta_schedule", "sigmoid"),
    (dd.DDPMScheduler, "variance_type", "learned_range"), (dd.DDPMScheduler, "timestep_spacing", "karras"),
    (dd.DPMSolverMultistepScheduler, "algorithm_type", "sde-dpmsolver"),
    (dd.DPMSolverMultistepScheduler, "solver_order", 4), (dd.DPMSolverMultistepScheduler, "use_lu_lambdas", True),
    (dd.EulerDiscreteScheduler, "interpolation_type", "log_linear"),
    (dd.EulerDiscreteScheduler, "use_beta_sigmas", True),
    (dd.DPMSolverMultistepScheduler, "use_flow_sigmas", True), (dd.GEScheduler, "prediction_type", "v_prediction"),
    (dd.IADBScheduler, "variant", "two_head"), (dd.KDPM2DiscreteScheduler, "use_beta_sigmas", True),
    (dd.KDPM2DiscreteScheduler, "prediction_type", "sample"),
    (dd.KDPM2AncestralDiscreteScheduler, "prediction_type", "original_sample")])
def test_unsupported_options_raise(cls, option, value):
    with pytest.raises(ValueError, match=re.escape(f"{option}={value!r}")):
        cls(**{option: value})


def test_any_diffusers_config_loads():
    names = ["DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
             "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
             "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler", "KDPM2DiscreteScheduler",
             "DEISMultistepScheduler"]
    for source in names:
        config = getattr(diffusers, source)(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config
        for name, cls in dd.SCHEDULERS.items():
            sched = cls.from_config(config)
            assert isinstance(sched, cls)
            if "beta_schedule" in sched.config:
                assert sched.config.beta_schedule == "scaled_linear", (source, name)


def _public(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}


def test_save_and_load(tmp_path):
    for name, cls in dd.SCHEDULERS.items():
        overrides = {"timestep_spacing": "trailing"} if "timestep_spacing" in cls().config else {"lam": 0.5}
        sched = cls.from_config(dict(cls().config, **overrides))
        sched.save_pretrained(tmp_path / name)
        loaded = cls.from_pretrained(tmp_path / name)
        assert _public(loaded.config) == _public(sched.config) and type(loaded) is cls
        if diffusers_class(name) is not None:  # diffusers loads our saved config, and we load theirs
            theirs = diffusers_class(name).from_pretrained(tmp_path / name)
            assert _public(cls.from_config(theirs.config).config) == _public(sched.config)


def test_outputs_and_return_dict():
    sched = dd.EulerDiscreteScheduler()
    sched.set_timesteps(3)
    x = make_tensor(SHAPE, seed=1)
    t = sched.timesteps[0]
    out = sched.step(x, t, sched.scale_model_input(x, t), return_dict=False)
    assert isinstance(out, tuple) and len(out) == 2 and out[0].shape == x.shape
    dpm = dd.DPMSolverMultistepScheduler()
    dpm.set_timesteps(3)
    res = dpm.step(x, dpm.timesteps[0], x)
    assert isinstance(res, diffusers.schedulers.scheduling_utils.SchedulerOutput)
    assert len(dpm.step(x, dpm.timesteps[1], x, return_dict=False)) == 1
    assert dd.HeunDiscreteScheduler.order == 2 and dd.DDIMScheduler.order == 1
    assert dd.KDPM2DiscreteScheduler.order == dd.KDPM2AncestralDiscreteScheduler.order == 2
    kdpm2 = dd.KDPM2AncestralDiscreteScheduler()
    kdpm2.set_timesteps(3)
    firsts = []
    for t in kdpm2.timesteps:
        firsts.append(kdpm2.state_in_first_order)
        x = kdpm2.step(x, t, kdpm2.scale_model_input(x, t), generator=torch.Generator().manual_seed(0)).prev_sample
    assert firsts == [True, False, True, False, True] and torch.isfinite(x).all()


def test_add_noise_matches_diffusers():
    for name in ("DDIMScheduler", "DDPMScheduler"):
        theirs, ours = getattr(diffusers, name)(), getattr(dd, name)()
        x0, noise = make_tensor(SHAPE, seed=1), make_tensor(SHAPE, seed=2)
        t = torch.tensor([999, 3])
        torch.testing.assert_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t))


@pytest.mark.cuda
def test_step_loop_never_synchronises():
    dev = torch.device("cuda")
    for name, cls in dd.SCHEDULERS.items():
        sched = cls()
        sched.set_timesteps(6, device=dev)
        x = torch.randn(SHAPE, device=dev)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for t in sched.timesteps:
                m = torch.randn_like(sched.scale_model_input(x, t))
                x = sched.step(m, t, x).prev_sample
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.isfinite(x).all(), name


@pytest.mark.cuda
@pytest.mark.parametrize("name, config, kw", CASES, ids=IDS)
def test_matches_diffusers_on_cuda(name, config, kw):
    check_parity(name, config, kw, device="cuda")
