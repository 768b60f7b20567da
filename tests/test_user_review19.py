"""A fresh user's review of the public API and README (session 19): what a k-diffusion / diffusers user tried and
what broke, each pinned here. Fixed: ``--knob`` values of knobs whose default is None (lcm's ``s_noise_end`` is a
number, not a list of orders). Also fixed: a model returning a view of its input other than the input
itself (``x.T``, a broadcast slice), which k-diffusion runs, failed inside the fused op with an error about ``out``,
an argument the user never passed (the loop now copies such an output before the in-place update).
"""
import argparse

import pytest
import torch

import diffkern
from diffkern import schedules, wrappers
from diffkern.__main__ import main
from diffkern.commands import knob_flags

SIGMAS = schedules.karras(3, 0.03, 10.0)


def _x(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 10


#----------------------------------------------------------------------------
# CLI: --knob NAME=VALUE is "typed by the knob's default" (README); a None default types nothing.


def _collect(method, *items):
    args = argparse.Namespace(knob=list(items))
    return knob_flags.collect(args, method, diffkern.knobs(method))


def test_knob_with_a_none_default_takes_its_own_kind():
    assert _collect("lcm", "s_noise_end=0.5")[0] == {"s_noise_end": 0.5}
    assert _collect("lcm", "s_noise_end=1")[0] == {"s_noise_end": 1.0}
    assert _collect("lcm", "s_noise_end=none")[0] == {"s_noise_end": None}
    assert _collect("dpmsolver_single", "orders=1,2,2")[0] == {"orders": (1, 2, 2)}
    with pytest.raises(ValueError, match=r"^--knob s_noise_end: expected a number, got 'x'$"):
        _collect("lcm", "s_noise_end=x")
    with pytest.raises(ValueError, match=r"^--knob orders: expected comma-separated integers, got '1,x'$"):
        _collect("dpmsolver_single", "orders=1,x")


def test_callable_knob_is_refused_by_name_not_as_a_tuple():
    assert _collect("er_sde", "noise_scaler=none")[0] == {"noise_scaler": None}
    with pytest.raises(ValueError, match=r"^--knob noise_scaler: this knob \(default None\) cannot be set from the "
                                         r"command line except to none$"):
        _collect("er_sde", "noise_scaler=1")


def test_lcm_s_noise_end_runs_from_the_command_line(capsys, tmp_path):
    out = tmp_path / "t.png"
    argv = ["trajectory", "--method", "lcm", "--knob", "s_noise_end=0.5", "--steps", "2", "--n", "4", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    assert out.is_file()

#----------------------------------------------------------------------------
# A model returning a view of its input. k-diffusion's samplers only read the model's output, so any view runs there;
# diffkern updates its state in place, which the output must then not overlap unless it is that very state.
# sampler_loop._Loop._model (diffkern/sampler_loop.py:263-281) hands the output to the fused op as is.


def _denoised_by_k_diffusion_rules(view, x, sigmas):
    """Euler as k-diffusion writes it (fresh tensors each step)."""
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = (x - view(x)) / s
        x = x + d * (s_next - s)
    return x


@pytest.mark.parametrize("view", [lambda x: x.T, lambda x: x[:, :1].expand_as(x)], ids=["transpose", "broadcast"])
def test_model_returning_a_view_of_its_input(view):
    x = _x(3, 3).double()
    out = diffkern.sample(lambda x, sigma: view(x), x, SIGMAS.tolist()[:-1], "euler")
    torch.testing.assert_close(out, _denoised_by_k_diffusion_rules(view, x.clone(), SIGMAS.tolist()[:-1]))


def test_model_returning_its_input_itself_runs():
    # the exact same view is the in-place case the op allows: the control of the test above
    x = _x(3, 3).double()
    out = diffkern.sample(lambda x, sigma: x.view_as(x), x, SIGMAS.tolist()[:-1], "euler")
    torch.testing.assert_close(out, x)


def test_wrapper_network_returning_its_input_runs():
    x = _x(2, 3).double()
    out = diffkern.sample(wrappers.VEDenoiser(lambda x, sigma: x, prediction_type="x0"), x, SIGMAS.tolist()[:-1],
                          "euler")
    torch.testing.assert_close(out, x)


def test_knob_tau_takes_one_value_per_step():
    # sa_solver's tau is a number or one per step (diffkern.sample); the CLI read only a number
    assert knob_flags._parse("tau", "0.5,0.25,0", 1.0) == (0.5, 0.25, 0.0)
    assert knob_flags._parse("tau", "0.5", 1.0) == 0.5
    with pytest.raises(ValueError, match="--knob tau: expected a number, got 'x'"):
        knob_flags._parse("tau", "0.5,x", 1.0)


@pytest.mark.parametrize("method", ["euler_ancestral", "dpmpp_2m_sde", "heun"])
def test_channels_last_input_is_sampled_contiguous(method):
    # README ("Sampling"): the state is contiguous whatever x's layout, and a layout never changes the samples
    x, seen = _x(2, 3, 5, 4).double(), []

    def model(x, sigma):
        seen.append(x.is_contiguous())
        return x * 0.3
    a = diffkern.sample(model, x, SIGMAS, method, seed=3)
    b = diffkern.sample(model, x.to(memory_format=torch.channels_last), SIGMAS, method, seed=3)
    assert all(seen) and b.is_contiguous()
    torch.testing.assert_close(b, a, rtol=0, atol=0)
