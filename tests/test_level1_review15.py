"""Review of the Level-1 step cache and timestep labels (the LoopStep bound by ``step()``, diffusers' own timestep
values): a used scheduler pickles, and Euler's ``set_timesteps(sigmas=...)`` labels are diffusers' bit for bit."""
import copy
import pickle
import warnings

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402

SD15 = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
            timestep_spacing="leading")


def _model(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x) * 0.3


@pytest.mark.parametrize("name, calls", [("EulerAncestralDiscreteScheduler", 2), ("DDIMScheduler", 2),
                                         ("DPMSolverMultistepScheduler", 3), ("HeunDiscreteScheduler", 3)])
@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_used_scheduler_copies_and_continues(name, calls, how):
    """step() caches a bound LoopStep whose launch does not pickle: a scheduler (or a pipeline holding it) that has
    stepped pickled with RuntimeError. Its copy continues the loop exactly (same tables, same Philox seed)."""
    sched = getattr(dd, name)()
    sched.set_timesteps(6)
    sched.set_seed(3)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = {"eta": 0.7} if name == "DDIMScheduler" else {}
    for t in sched.timesteps[:calls]:  # Heun: 3 calls end mid-pair (the predictor of step 1 done)
        x = sched.step(_model(x), t, x, **kw).prev_sample
    twin = pickle.loads(pickle.dumps(sched)) if how == "pickle" else copy.deepcopy(sched)
    a, b = x, x.clone()
    for t in sched.timesteps[calls:]:
        a = sched.step(_model(a), t, a, **kw).prev_sample
        b = twin.step(_model(b), t, b, **kw).prev_sample
        assert torch.equal(a, b), f"{name} after {how} at t={float(t)}"


SIGMAS = [14.6, 8.0, 4.0, 2.0, 1.0, 0.5, 0.1, 0.0]


@pytest.mark.parametrize("config", [SD15, {}, dict(SD15, rescale_betas_zero_snr=True, timestep_spacing="trailing"),
                                    {"beta_schedule": "squaredcos_cap_v2"}],
                         ids=["sd15", "linear", "zero_snr", "cosine"])
@pytest.mark.parametrize("as_", ["list", "np32", "tensor64"])
def test_euler_custom_sigmas_timesteps_are_diffusers(config, as_):
    """Euler's set_timesteps(sigmas=...) labels came from the float64 table, float32 ulps off diffusers' (998.83472
    for 998.83466 at SD 1.5's 14.6): stock timesteps then missed in index_for_timestep and add_noise (IndexError)."""
    values = {"list": list(SIGMAS), "np32": np.array(SIGMAS, dtype=np.float32),
              "tensor64": torch.tensor(SIGMAS, dtype=torch.float64)}[as_]
    stock = diffusers.EulerDiscreteScheduler(**config)
    ours = dd.EulerDiscreteScheduler.from_config(stock.config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock.set_timesteps(sigmas=copy.copy(values), device="cpu")
    ours.set_timesteps(sigmas=values, device="cpu")
    assert ours.timesteps.dtype == stock.timesteps.dtype
    assert torch.equal(ours.timesteps, stock.timesteps)
    for t in stock.timesteps:
        assert ours.index_for_timestep(t) == stock.index_for_timestep(t)
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    t = stock.timesteps[[1, 4]]
    torch.testing.assert_close(ours.add_noise(x, x, t), stock.add_noise(x, x, t), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("values", [np.array([900.7, 500.0, 100.0]), torch.tensor([900.7, 500.0, 100.0]),
                                    [900.7, 500, 100.2], torch.tensor([900, 500, 100]), (900, 500, 100)],
                         ids=["np_float", "tensor_float", "list_mixed", "tensor_int", "tuple"])
def test_ddpm_custom_timesteps_any_sequence(values):
    """DDPM's custom timesteps as float arrays or tensors raised a bare TypeError (a float tensor's elements cannot
    index); diffusers truncates them to int64, and so does ours."""
    stock = diffusers.DDPMScheduler()
    stock.set_timesteps(timesteps=copy.copy(values))
    ours = dd.DDPMScheduler()
    ours.set_timesteps(timesteps=values)
    assert torch.equal(ours.timesteps, stock.timesteps)


@pytest.mark.parametrize("bad,error,message", [
    ([["a"]], TypeError, "timesteps: expected a 1-D sequence of numbers"),  # non-numbers: TypeError, as diffusers
    (["a"], TypeError, "timesteps: expected a 1-D sequence of numbers"),
    ([[900, 500]], ValueError, "timesteps: expected a 1-D sequence"), ([], ValueError, "timesteps: expected a 1-D"),
    ([500, 900], ValueError, "timesteps must be a non-empty strictly decreasing")])
def test_ddpm_bad_custom_timesteps_named(bad, error, message):
    with pytest.raises(error, match=f"DDPMScheduler: {message}"):
        dd.DDPMScheduler().set_timesteps(timesteps=bad)
