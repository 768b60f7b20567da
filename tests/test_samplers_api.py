"""The API of ``diffkern.sample`` and the k-diffusion-style samplers, on exact Gaussian-mixture denoisers: seeds,
callback, record, progress, extra args, errors (every message names the argument), knobs and the host plan cache.
The samplers' accuracy is proven in ``test_samplers.py``.
"""
import math

import pytest
import torch

import diffkern
from diffkern import samplers, schedules
from diffkern.sampling import knobs, sample
from test_samplers import REF, _close64, gmm3, start

#----------------------------------------------------------------------------
# Seeds.


@pytest.mark.parametrize("method,kw", [("euler_ancestral", {}), ("heun", {"s_churn": 5.0}), ("sde", {"lam": 1.0})])
def test_seed_changes_noise(method, kw):
    gmm, x, sig = gmm3(), start(4, 10.0), schedules.karras(5, 0.05, 10.0)
    a = sample(gmm, x, sig, method, seed=1, backend=REF, **kw)
    assert torch.equal(a, sample(gmm, x, sig, method, seed=1, backend=REF, **kw))
    assert not torch.allclose(a, sample(gmm, x, sig, method, seed=2, backend=REF, **kw))


def test_per_sample_seeds_do_not_depend_on_the_batch():
    gmm, x, sig = gmm3(), start(4, 10.0), schedules.karras(5, 0.05, 10.0)
    seeds = torch.tensor([3, 1, 4, 1 << 40], dtype=torch.int64)
    full = sample(gmm, x, sig, "euler_ancestral", seed=seeds, backend=REF)
    part = sample(gmm, x[2:], sig, "euler_ancestral", seed=seeds[2:], backend=REF)
    _close64(full[2:], part)


def test_seed_none_follows_torch_global_rng():
    gmm, x, sig = gmm3(), start(4, 10.0), schedules.karras(5, 0.05, 10.0)
    torch.manual_seed(0)
    a = samplers.sample_euler_ancestral(gmm, x, sig, disable=True, backend=REF)
    torch.manual_seed(0)
    assert torch.equal(a, samplers.sample_euler_ancestral(gmm, x, sig, disable=True, backend=REF))

#----------------------------------------------------------------------------
# Callback, trajectories, progress, extra args.


def test_callback_and_record():
    gmm, x, sig = gmm3(), start(4, 10.0), schedules.karras(5, 0.05, 10.0)
    seen = []

    def callback(d):
        seen.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in d.items()})

    y, traj = sample(gmm, x, sig, "heun", backend=REF, callback=callback, record=True, s_churn=1.0)
    assert [d["i"] for d in seen] == list(range(5))
    assert set(seen[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"}
    # 0-d tensors, as k-diffusion's sigmas[i] (test_kdiffusion_parity, test_leftovers16)
    assert all(isinstance(d["sigma"], torch.Tensor) and d["sigma"].dim() == 0 and d["sigma_hat"] >= d["sigma"]
               for d in seen)
    assert [d["sigma"].item() for d in seen] == sig[:-1].tolist()
    assert traj["x"].shape == (6, 4, 2) and traj["denoised"].shape == (5, 4, 2)
    assert torch.equal(traj["x"][0], x) and torch.equal(traj["x"][-1], y)
    for i, d in enumerate(seen):
        torch.testing.assert_close(d["denoised"], traj["denoised"][i], rtol=0, atol=0)
        torch.testing.assert_close(d["denoised"], gmm.denoise(d["x"], d["sigma_hat"]), rtol=1e-12, atol=1e-12)
        if i > 0:  # the callback's x is the state before step i's update, after its churn
            assert not torch.equal(d["x"], traj["x"][i]) or d["sigma_hat"] == d["sigma"]
    assert torch.equal(sample(gmm, x, sig, "heun", backend=REF, s_churn=1.0), y), "callback must not change x"


def test_record_without_callback_and_input_untouched():
    gmm, x, sig = gmm3(), start(4, 10.0), schedules.karras(5, 0.05, 10.0)
    x_before = x.clone()
    y, traj = sample(gmm, x, sig, "dpmpp_2m", backend=REF, record=True)
    assert torch.equal(x, x_before)
    assert torch.equal(traj["x"][-1], y)
    # Chen et al.: the final step to 0 jumps to the last denoised estimate.
    assert torch.equal(traj["denoised"][-1], y)


def test_progress_bar(capsys):
    gmm, x, sig = gmm3(), start(2, 10.0), schedules.karras(3, 0.05, 10.0)
    sample(gmm, x, sig, "euler", backend=REF, progress=True)
    assert "3/3" in capsys.readouterr().err


def test_k_diffusion_signature_and_extra_args():
    gmm, x, sig = gmm3(), start(3, 10.0), schedules.karras(4, 0.05, 10.0)
    calls = []

    def model(x, sigma, *, scale):
        calls.append((sigma.shape, sigma.dtype, scale))
        return gmm.denoise(x, sigma) * scale

    for fn in samplers.SAMPLERS.values():
        fn(model, x, sig, {"scale": 1.0}, None, True, backend=REF, seed=0)
    assert all(c == ((3,), torch.float64, 1.0) for c in calls)
    torch.testing.assert_close(samplers.sample_euler(model, x, sig, extra_args={"scale": 1.0}, disable=True, backend=REF),
                               sample(gmm, x, sig, "euler", backend=REF), rtol=0, atol=0)

#----------------------------------------------------------------------------
# Errors: every message names the argument.


def test_errors():
    gmm, x, sig = gmm3(), start(3, 10.0), schedules.karras(4, 0.05, 10.0)
    with pytest.raises(ValueError, match="method: unknown sampler 'nope'"):
        sample(gmm, x, sig, "nope")
    with pytest.raises(TypeError, match=r"unknown knob\(s\) \['etaa'\]; valid knobs: \['clip_denoised', 'clipped_eps', 'eta', 's_noise', 'split'\]"):
        sample(gmm, x, sig, "euler_ancestral", etaa=1.0)
    with pytest.raises(ValueError, match="sigmas: must be non-increasing"):  # euler takes repeated sigmas
        sample(gmm, x, sig.flip(0), "euler", backend=REF)
    with pytest.raises(ValueError, match="sigmas: contains NaN"):
        sample(gmm, x, torch.tensor([1.0, float("nan"), 0.0]), "euler", backend=REF)
    with pytest.raises(ValueError, match="sigmas: expected length >= 2"):
        sample(gmm, x, [1.0], "euler", backend=REF)
    with pytest.raises(ValueError, match="model: output must have the shape of x"):
        sample(lambda x, s: x[:, :1], x, sig, "euler", backend=REF)
    with pytest.raises(TypeError, match="model: output must have a floating dtype"):
        sample(lambda x, s: x.long(), x, sig, "euler", backend=REF)
    with pytest.raises(TypeError, match="model: output must be a torch.Tensor"):
        sample(lambda x, s: 0.0, x, sig, "euler", backend=REF)
    with pytest.raises(ValueError, match=r"mu: expected a finite value in \[0.0, 1.0\)"):
        sample(gmm, x, sig, "ge", mu=1.0)
    with pytest.raises(ValueError, match="integrator: expected one of"):
        sample(gmm, x, sig, "sde", integrator="rk4")
    with pytest.raises(ValueError, match="solver_type: expected one of"):
        sample(gmm, x, sig, "dpmpp_2m_sde", solver_type="euler")
    with pytest.raises(ValueError, match="eta: expected a finite value in"):
        sample(gmm, x, sig, "euler_ancestral", eta=-1.0)
    for method, knob in (("euler_ancestral", "eta"), ("sde", "lam"), ("ge", "gamma"), ("euler", "s_noise")):
        with pytest.raises(ValueError, match=f"{knob}: expected a finite value in"):  # named, not a table slot
            sample(gmm, x, sig, method, **{knob: math.inf})
    with pytest.raises(TypeError, match="seed: expected an int or an int64 tensor"):
        sample(gmm, x, sig, "euler", seed=1.5)
    with pytest.raises(ValueError, match=r"seed: expected shape \(1,\) or \(3,\)"):
        sample(gmm, x, sig, "euler", seed=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="x: expected a floating tensor"):
        sample(gmm, x.long(), sig, "euler")
    with pytest.raises(diffkern.BackendUnavailable):
        sample(gmm, x, sig, "euler", backend="cuda")


def test_knobs_lists_defaults():
    assert knobs("heun") == {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0}
    assert knobs("ge") == {"gamma": 2.0, "mu": 0.0, "clip_denoised": math.inf}
    assert knobs("sde") == {"lam": 1.0, "integrator": "exponential"}
    assert knobs("dpmpp_2m_sde") == {"eta": 1.0, "s_noise": 1.0, "solver_type": "midpoint"}
    assert set(samplers.SAMPLERS) == {"euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral",
                                      "dpmpp_2s_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_sde",
                                      "dpmsolver_3m", "ge", "lcm", "sde", "unipc", "deis", "plms", "ipndm", "lms",
                                      "dpmsolver_single", "ipndm_v", "dpm_fast", "res_multistep",
                                      "res_multistep_ancestral", "er_sde", "sa_solver", "heun_flow", "dpm_adaptive"}

#----------------------------------------------------------------------------
# The host plan cache.


def test_host_plan_is_the_sampler_plan_cached():
    """``sampling.host_plan``: the plan the method builds (defaults filled in, no model conversion), built once per
    (method, knobs, sigmas); a list-valued knob is built afresh; bad input raises as ``sample`` does."""
    from diffkern import coef_tables, sampler_plans
    from diffkern.sampling import host_plan

    sig = schedules.karras(6, 0.05, 10.0).tolist()
    plan = host_plan("euler_ancestral", {"eta": 0.5}, sig)
    want = sampler_plans.PLANS["euler_ancestral"](sig, coef_tables._identity, **dict(knobs("euler_ancestral"),
                                                                                       eta=0.5))
    assert torch.equal(plan.table, want.table) and plan.row_sigma == want.row_sigma
    assert host_plan("euler_ancestral", {"eta": 0.5}, torch.tensor(sig, dtype=torch.float64)) is plan
    assert host_plan("euler_ancestral", {"eta": 0.6}, sig) is not plan
    per_step = host_plan("sa_solver", {"tau": [0.5] * 6}, sig)
    assert torch.equal(per_step.table, host_plan("sa_solver", {"tau": 0.5}, sig).table)
    with pytest.raises(ValueError, match="method: unknown sampler 'nope'"):
        host_plan("nope", {}, sig)
    with pytest.raises(ValueError, match="eta: expected"):
        host_plan("euler_ancestral", {"eta": -1.0}, sig)
