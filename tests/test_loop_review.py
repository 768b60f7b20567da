"""Review of the loop's bound fused op and of k-diffusion parity (callbacks, noise_sampler, signatures).

- After a callback's ping-pong the loop's state is a tensor allocated after an earlier model call, which the spans
  ``LoopStep`` bound at ``begin`` do not cover: a corrector step writes into it in place, so a model output
  overlapping it was refused as the checked front-end ``diffkern.ops.sampler_step`` refuses it (before that fix the
  fast path ran, and on a contiguous aliasing view returned garbage); since session 19 the loop copies such an
  output first (k-diffusion's out-of-place update reads it whole), the same on both paths.
- The samplers named after k-diffusion's take its knobs positionally in its order (oracle: the signatures as
  k-diffusion publishes them, written out here; a positional call equals the keyword call bitwise).
- A noise_sampler built like k-diffusion's BrownianTreeNoiseSampler (a deterministic function of (sigma,
  sigma_next), in x's dtype) on dpmpp_sde / dpmpp_2m_sde with batch > 1: float64 equal to k-diffusion's loop
  (test_kdiffusion_parity's oracles, float64 truth), float16/bfloat16 within the tolerance rule against those loops
  run in that dtype, and non-contiguous x, ``window=`` and ``record=True`` bitwise the plain run.
"""
import inspect
import math

import pytest
import torch

import diffkern
import test_kdiffusion_parity as parity
from diffkern import samplers, schedules
from diffkern.testing import assert_matches_reference
from test_loop_fast_path import BACKENDS, checked_path, denoiser, same_bits, start

F64 = torch.float64
REF = "reference"

#----------------------------------------------------------------------------
# A model output overlapping the state a callback's ping-pong allocated.


def _from_call(bad, at=2):
    calls = []

    def model(x, sigma):
        calls.append(1)
        return bad(x) if len(calls) >= at else denoiser(x, sigma)
    return model


ALIASES = {
    "transposed view": lambda x: x.transpose(0, 1),  # square state: x's shape, not x's view
    # contiguous, x's shape, float16 over the first half of x's float32 bytes: read while the update writes them
    "contiguous float16 view": lambda x: x.view(torch.float16).view(-1)[:x.numel()].view(x.shape),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(ALIASES))
@pytest.mark.parametrize("method", ["heun", "dpm_2"])
def test_corrector_after_callback_copies_an_overlapping_output(method, case, backend):
    # since session 19 the loop copies a model output overlapping its state (other than the state itself) before
    # the update, as k-diffusion's out-of-place update reads it: fast and checked paths equal a model that copies
    sig, x = schedules.karras(4, 0.05, 10.0), start((3, 3), torch.float32)
    runs = []
    for path in ("fast", "checked"):
        with pytest.MonkeyPatch.context() as mp:
            if path == "checked":
                checked_path(mp)
            runs.append(diffkern.sample(_from_call(ALIASES[case]), x, sig, method, backend=backend,
                                        callback=lambda d: None))
    copied = diffkern.sample(_from_call(lambda x: ALIASES[case](x).clone()), x, sig, method, backend=backend,
                             callback=lambda d: None)
    assert same_bits(runs[0], runs[1]) and same_bits(runs[0], copied)


@pytest.mark.parametrize("backend", BACKENDS)
def test_callback_with_x_itself_or_its_exact_view_runs_as_before(backend):
    """Exact in-place use stays allowed after the ping-pong: x itself, or a view with x's layout."""
    sig, x = schedules.karras(4, 0.05, 10.0), start((3, 3), torch.float32)
    for bad in (lambda x: x, lambda x: x.view_as(x), lambda x: x[:]):
        fast, checked = (lambda run: (run(), _checked(run)))(
            lambda: diffkern.sample(_from_call(bad), x, sig, "heun", backend=backend, callback=lambda d: None))
        assert same_bits(fast, checked)


def _checked(run):
    with pytest.MonkeyPatch.context() as mp:
        checked_path(mp)
        return run()

#----------------------------------------------------------------------------
# k-diffusion's signatures: the knobs after (model, x, sigmas, extra_args, callback, disable), positionally.


HEAD = ["model", "x", "sigmas", "extra_args", "callback", "disable"]
KDIFFUSION = {  # k-diffusion's k_diffusion/sampling.py (lcm: ComfyUI's, test_comfy_parity18)
    "euler": ["s_churn", "s_tmin", "s_tmax", "s_noise"],
    "heun": ["s_churn", "s_tmin", "s_tmax", "s_noise"],
    "dpm_2": ["s_churn", "s_tmin", "s_tmax", "s_noise"],
    "euler_ancestral": ["eta", "s_noise", "noise_sampler"],
    "dpm_2_ancestral": ["eta", "s_noise", "noise_sampler"],
    "dpmpp_2s_ancestral": ["eta", "s_noise", "noise_sampler"],
    "dpmpp_sde": ["eta", "s_noise", "noise_sampler", "r"],
    "dpmpp_2m_sde": ["eta", "s_noise", "noise_sampler", "solver_type"],
    "dpmpp_3m_sde": ["eta", "s_noise", "noise_sampler"],
    "lms": ["order"],
    "lcm": ["noise_sampler", "s_noise", "s_noise_end"],
    "dpmpp_2m": [],
}
VALUES = {"s_churn": 1.5, "s_tmin": 0.1, "s_tmax": 20.0, "s_noise": 0.9, "eta": 0.7, "r": 0.4,
          "solver_type": "heun", "order": 3, "s_noise_end": 0.4}


@pytest.mark.parametrize("method", sorted(KDIFFUSION))
def test_kdiffusion_knobs_are_positional_in_its_order(method):
    fn = samplers.SAMPLERS[method]
    params = list(inspect.signature(fn).parameters.values())
    names = HEAD + KDIFFUSION[method]
    assert [p.name for p in params[:len(names)]] == names
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params[:len(names)])
    assert all(p.kind is p.KEYWORD_ONLY for p in params[len(names):])  # seed, backend, ... as before
    gmm, sig, x = parity.GMM, schedules.karras(5, 0.05, 10.0), parity.start(F64, batch=3)
    draws = [parity.Draws(x), parity.Draws(x)]
    args = [VALUES.get(k) for k in KDIFFUSION[method]]
    if "noise_sampler" in KDIFFUSION[method]:
        args[KDIFFUSION[method].index("noise_sampler")] = draws[0]
    positional = fn(gmm, x, sig, None, None, True, *args, seed=3, backend=REF)
    kw = {k: (draws[1] if k == "noise_sampler" else v) for k, v in zip(KDIFFUSION[method], args)}
    assert same_bits(positional, fn(gmm, x, sig, disable=True, seed=3, backend=REF, **kw))
    assert draws[0].calls == draws[1].calls


def test_knobs_unchanged_by_positional_parameters():
    """diffkern.knobs reads the knobs after k-diffusion's six arguments, whatever their kind."""
    assert diffkern.knobs("dpmpp_sde") == {"eta": 1.0, "s_noise": 1.0, "r": 0.5}
    assert diffkern.knobs("dpmpp_2m_sde") == {"eta": 1.0, "s_noise": 1.0, "solver_type": "midpoint"}
    assert diffkern.knobs("euler") == {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0}
    assert diffkern.knobs("lcm") == {"s_noise": 1.0, "s_noise_end": None} and diffkern.knobs("lms") == {"order": 4}
    with pytest.raises(TypeError, match=r"unknown knob\(s\) \['noise_sampler_x'\]"):
        diffkern.sample(denoiser, parity.start(), parity.SIGMAS, "euler", noise_sampler_x=1)

#----------------------------------------------------------------------------
# A BrownianTreeNoiseSampler-like noise_sampler.


class TreeLike:
    """k-diffusion's ``BrownianTreeNoiseSampler`` interface: built from x, called with (sigma, sigma_next) as
    tensors, returns a tensor of x's shape, dtype and device, a deterministic function of the pair, continuous in it
    as a Brownian tree's increments are (the loops compute an intermediate sigma each their own way, 1 ulp apart):
    fixed float64 normals rotated by angles that depend smoothly on the pair, then cast."""

    def __init__(self, x, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.z = torch.randn((2, *x.shape), generator=gen, dtype=F64)
        self.dtype, self.device = x.dtype, x.device

    def __call__(self, sigma, sigma_next):
        t0, t1 = torch.as_tensor(sigma, dtype=F64), torch.as_tensor(sigma_next, dtype=F64)
        angle = 3.0 * t0.log() - 2.0 * t1.log()
        return (angle.cos() * self.z[0] + angle.sin() * self.z[1]).to(self.device, self.dtype)


def _linear(x, s):
    """The exact denoiser of N(0, I) data: smooth, so low-precision runs are compared without chaos."""
    return x / (1.0 + float(s) ** 2)


TREE_CASES = [("dpmpp_sde", {}), ("dpmpp_sde", {"r": 0.3, "eta": 0.6}), ("dpmpp_2m_sde", {}),
              ("dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.5})]


@pytest.mark.parametrize("method,kw", TREE_CASES, ids=[f"{m}-{kw}" for m, kw in TREE_CASES])
def test_tree_like_noise_sampler_is_kdiffusions_loop(method, kw, monkeypatch):
    monkeypatch.setattr(parity, "model", lambda x, s: _linear(x, s).to(x.dtype))
    gauss = lambda x, sigma: x / (1.0 + sigma.to(x.dtype).view(-1, 1, 1) ** 2)  # noqa: E731
    sig = schedules.karras(8, 0.03, 12.0)
    x64 = torch.randn(5, 3, 4, dtype=F64, generator=torch.Generator().manual_seed(2)) * 12.0
    ref64 = parity.ORACLES[method](x64, sig.tolist(), TreeLike(x64), **kw)
    ours64 = samplers.SAMPLERS[method](gauss, x64, sig, disable=True, noise_sampler=TreeLike(x64), backend=REF, **kw)
    assert_matches_reference(ours64, ref64, ref64, f"{method} float64")
    for dtype in (torch.float16, torch.bfloat16):
        x = x64.to(dtype)
        ours = samplers.SAMPLERS[method](gauss, x, sig, disable=True, noise_sampler=TreeLike(x), backend=REF, **kw)
        eager = parity.ORACLES[method](x, sig.tolist(), TreeLike(x), **kw)
        assert ours.dtype == dtype
        assert_matches_reference(ours, ref64, eager, f"{method} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["dpmpp_sde", "dpmpp_2m_sde"])
def test_tree_like_noise_sampler_layouts_window_record(method, backend):
    """Non-contiguous x (and the noise the sampler returns for it), window= and record=True: bitwise the plain run."""
    sig = schedules.karras(6, 0.05, 10.0)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(4, 6, dtype=F64, generator=torch.Generator().manual_seed(1)) * 10.0).to(dtype)
        plain = diffkern.sample(denoiser, x, sig, method, backend=backend, noise_sampler=TreeLike(x))
        strided = x.t().contiguous().t()
        assert not strided.is_contiguous()

        def strided_noise(s, sn, tree=TreeLike(x)):
            return tree(s, sn).t().contiguous().t()
        assert same_bits(diffkern.sample(denoiser, strided, sig, method, backend=backend,
                                         noise_sampler=strided_noise), plain)
        windowed = diffkern.sample(denoiser, x, sig, method, backend=backend, noise_sampler=TreeLike(x),
                                   window=(2, 11))
        assert same_bits(windowed, plain)
        out, traj = diffkern.sample(denoiser, x, sig, method, backend=backend, noise_sampler=TreeLike(x),
                                    record=True)
        assert same_bits(out, plain) and same_bits(traj["x"][-1], plain) and traj["denoised"].shape[0] == 6
