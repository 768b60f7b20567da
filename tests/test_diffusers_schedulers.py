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
