"""A fresh user's review of the non-k-diffusion methods (session 19b): IADB, GE / the lam-SDE family, the
likelihood, Chen et al.'s optimal denoiser and HOLD, tried with awkward inputs and checked against closed forms.

Found: under DSM (``HOLD(n, hsm=False)``) the process is two different processes. ``perturb``, ``cov``, ``chol``,
``predict_x0`` and the ``"ode_flow"`` sampler take the auxiliaries to start at 0 (z_0 = (x0, 0, ..)), while
``GaussianMixtureScore`` (the exact stand-in for a trained network) and ``math-hold.md`` 4.1 / 10.2 sample them,
N(0, alpha/L) ("the joint target that HSM and DSM both model"). So a network trained by ``perturb`` under DSM
learns another score than the "exact" model, and ``"ode_flow"`` with the exact model is not exact for a point
(README: "With data a single point it is exact at every step count"). Which convention DSM should follow is a
design decision, so both are pinned as strict xfails; the HSM cases pass.

Fixed: ``HOLD(hsm=...)`` took any value by truthiness (``hsm="False"`` ran HSM); it now raises for a non-bool, as do
``hold_sampling.sample``'s ``denoise`` and ``return_state``; ``sample`` also names a bad ``z`` or ``dtype``.
Fixed: ``HOLD.perturb(x0, t)`` without a seed keyed its noise with 0, so a training loop got the same eps at
every call; seed None now draws a seed from torch's global generator, and an int seed is accepted.
Also fixed: ``diffkern.commands.trajectory.trajectories`` (Chen et al.'s trajectories and ODE-jump) refused numpy ints:
``jump=np.int64(3)`` raised "expected an int step", ``steps=np.int64(6)`` raised the same naming ``jump``, an
argument the caller never passed (the default was computed as a numpy int), and ``seed=np.int64(2)`` failed inside
``torch.Generator.manual_seed`` with "an integer is required", naming nothing.
"""
import numpy as np
import pytest
import torch

from diffkern import hold_sampling as HS
from diffkern.commands.trajectory import trajectories
from diffkern.hold import HOLD

F64 = torch.float64


def _point(value: float = 0.7, std: float = 1e-6) -> HS.GaussianMixture:
    return HS.GaussianMixture(torch.tensor([1.0], dtype=F64), torch.tensor([[value]], dtype=F64),
                              torch.tensor([std], dtype=F64))


def _dsm_xfail(hsm: bool):
    reason = ("HOLD(hsm=False): perturb/cov/predict_x0/ode_flow start the auxiliaries at 0, GaussianMixtureScore "
              "(and math-hold 4.1, 10.2) samples them from N(0, alpha/L): two different DSM processes")
    return pytest.param(hsm, marks=() if hsm else pytest.mark.xfail(strict=True, reason=reason), id=f"hsm={hsm}")


@pytest.mark.parametrize("hsm", [_dsm_xfail(True), _dsm_xfail(False)])
@pytest.mark.parametrize("t", [0.01, 0.5])
def test_perturb_law_is_the_law_the_exact_model_scores(hsm, t):
    """Given x0, ``perturb``'s z_t is N(E(t) e_1 x0, L_t L_t^T): its covariance must be the one the exact score
    model assumes for the same data point (``GaussianMixtureScore.marginal`` minus the data's own spread), else a
    network trained by ``perturb`` learns another score than the exact model's. Exact matrices, no Monte Carlo."""
    proc = HOLD(3, hsm=hsm)
    std = 1e-3
    _, lt = proc.perturb_matrices(torch.tensor([t], dtype=F64))
    a, V = HS.GaussianMixtureScore(proc, _point(std=std)).marginal(t)
    given_x0 = V[0] - std ** 2 * torch.outer(a, a) + proc.delta * torch.eye(3, dtype=F64)
    torch.testing.assert_close(lt[0] @ lt[0].T, given_x0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("hsm", [_dsm_xfail(True), _dsm_xfail(False)])
@pytest.mark.parametrize("steps", [5, 40])
def test_ode_flow_is_exact_for_a_point_with_the_exact_model(hsm, steps):
    """README: with data a single point ``"ode_flow"`` is exact at every step count. With the project's own exact
    model the output is the point to the data's spread (1e-6 here, times the x0 weights' growth: measured standard
    deviation 3.2e-5, largest error 1.1e-4 for HSM) under HSM; under DSM the standard deviation is 0.035 (5 steps) and
    0.015 (40 steps), the largest error 0.14 and 0.066."""
    proc = HOLD(3, hsm=hsm)
    model = HS.GaussianMixtureScore(proc, _point())
    x = HS.sample(model, proc, (512, 1), sampler="ode_flow", num_steps=steps, dtype=F64, backend="reference")
    assert float((x - 0.7).abs().max()) < 1e-3


@pytest.mark.parametrize("kw", [dict(jump=np.int64(3)), dict(steps=np.int64(6)), dict(seed=np.int64(2))],
                         ids=["jump", "steps", "seed"])
def test_trajectories_take_numpy_ints(kw):
    """Each numpy int gives exactly what the Python int gives (the package accepts numpy ints everywhere)."""
    args = dict(steps=6, n=3, seed=2)
    got = trajectories("euler", **{**args, **kw})
    want = trajectories("euler", **{**args, **{k: int(v) for k, v in kw.items()}})
    assert isinstance(got["jump"], int) and got["jump"] == want["jump"]
    assert torch.equal(got["x"], want["x"]) and torch.equal(got["jump_samples"], want["jump_samples"])


def test_trajectories_jump_is_the_denoised_estimate_at_that_step():
    """ODE-jump (Chen et al. 4.6): the jump sample is D(x_jump, sigma_jump), the recorded denoised estimate, and the
    last denoised estimate (the step to sigma = 0) is the final sample itself."""
    res = trajectories("euler", steps=8, n=5, jump=5)
    assert torch.equal(res["jump_samples"], res["denoised"][5])
    assert torch.equal(res["denoised"][-1], res["x"][-1])


@pytest.mark.parametrize("hsm", ["False", "no", None, 2])
def test_hold_hsm_must_be_a_bool(hsm):
    """``bool("False")`` is True: a config string silently picked hybrid score matching (and None picked DSM)."""
    with pytest.raises(TypeError, match="^hsm: expected a bool"):
        HOLD(2, hsm=hsm)


def test_hold_hsm_takes_bool_like_values():
    assert HOLD(2, hsm=np.bool_(False)).hsm is False and HOLD(2, hsm=1).hsm is True


def _eps_zero(z, t):
    return torch.zeros(z.shape[0], 1, dtype=z.dtype)


@pytest.mark.parametrize("kw, name", [(dict(denoise="False"), "denoise"), (dict(denoise=None), "denoise"),
                                      (dict(denoise=2), "denoise"), (dict(denoise=1.5), "denoise"),
                                      (dict(return_state="no"), "return_state")])
def test_hold_sample_flags_must_be_bools(kw, name):
    """``denoise="False"`` raised about ``int()``, ``denoise=2`` an IndexError about a table row, ``denoise=1.5`` ran
    as True, and ``return_state="no"`` returned the whole state: each now raises naming the flag."""
    with pytest.raises(TypeError, match=f"^{name}: expected a bool"):
        HS.sample(_eps_zero, HOLD(2), (2, 1), num_steps=4, **kw)


def test_hold_sample_bool_flags_still_run():
    x = HS.sample(_eps_zero, HOLD(2), (2, 1), num_steps=4, denoise=np.bool_(False), return_state=0)
    assert x.shape == (2, 1)


@pytest.mark.parametrize("kw, match", [(dict(z=np.zeros((2, 2), dtype=np.float32)), "^z: expected a torch.Tensor"),
                                       (dict(z=torch.zeros(2, 2, dtype=torch.int64)), "^z: expected a floating dtype"),
                                       (dict(dtype=torch.int64), "^dtype: expected one of"),
                                       (dict(dtype="float32"), "^dtype: expected one of")])
def test_hold_sample_names_a_bad_state_or_dtype(kw, match):
    """A numpy z failed with AttributeError ('is_inference'); dtype=torch.int64 raised about ``out``, an argument
    the caller never passed."""
    with pytest.raises(TypeError, match=match):
        HS.sample(_eps_zero, HOLD(2), (2, 1), num_steps=3, **kw)


def test_hold_perturb_draws_fresh_noise_per_call():
    """``proc.perturb(x0, t)`` in a training loop (README) drew the same eps at every call: seed None keyed the
    Philox stream with 0. It now draws a seed from torch's global generator (``torch.manual_seed`` reproduces it),
    as ``diffkern.sample(seed=None)`` does; an int seed is accepted as an int64 tensor of it is."""
    proc = HOLD(3)
    x0 = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.1, 0.5, 1.0, 2.0])
    first, eps_first = proc.perturb(x0, t)
    second, eps_second = proc.perturb(x0, t)
    assert not torch.equal(eps_first, eps_second) and not torch.equal(first, second)
    torch.manual_seed(5)
    again, _ = proc.perturb(x0, t)
    torch.manual_seed(5)
    assert torch.equal(proc.perturb(x0, t)[0], again)
    assert torch.equal(proc.perturb(x0, t, seed=3)[0], proc.perturb(x0, t, seed=torch.tensor([3]))[0])
    with pytest.raises(TypeError, match="^seed: expected an int or an int64 tensor"):
        proc.perturb(x0, t, seed=1.5)


def test_more_flags_must_be_bools():
    # the same class as hsm: a truthy string ran the True branch silently
    proc = HOLD(2)
    with pytest.raises(TypeError, match="jitter: expected a bool, got 'no'"):
        proc.cov(torch.tensor([0.5], dtype=F64), jitter="no")
    with pytest.raises(TypeError, match="denoise: expected a bool, got 'False'"):
        HS.sampler_table(proc, torch.tensor([1.0, 0.5], dtype=F64), "em", denoise="False")
    with pytest.raises(TypeError, match="elementwise: expected a bool, got 'yes'"):
        HS.GaussianMixtureScore(proc, _point(), elementwise="yes")
    assert HS.GaussianMixtureScore(proc, _point(), elementwise=True).elementwise is True


def test_the_gradient_estimation_alias_lists_its_knob():
    import diffkern
    assert diffkern.knobs("gradient_estimation") == {"ge_gamma": 2.0}
