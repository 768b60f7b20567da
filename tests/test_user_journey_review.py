"""A PyTorch researcher's journey from k-diffusion, smalldiffusion and EDM code into diffkern, pinned here:

- the k-diffusion callback dict (``x``, ``i``, ``sigma``, ``sigma_hat``, ``denoised``) of every sampler holds fresh
  tensors each step that a callback may keep (they were rotating working buffers: a list of them came out wrong),
  with the values of k-diffusion's textbook loops, churn's ``sigma_hat`` included; ``sample_iadb`` likewise;
- a model that writes into its input (the sampler's state) is refused instead of silently corrupting the run;
- the plain ``samplers.sample_*`` functions check ``callback`` before any work, and ``diffkern sample --model``
  with a missing file names the flag;
- smalldiffusion's own networks (``TimeInputMLP``, ``ConditionalMLP`` with CFG) on its DDPM, cosine, LDM and
  log-linear schedules through ``wrappers.VEDenoiser`` give its ``samples(gam, mu)``;
- EDM's Algorithm 2 (``edm_sampler`` of its generate.py, S_churn/S_min/S_max/S_noise) with ``EDMPrecond``, written
  out here in float64, is ``heun`` through ``wrappers.KarrasDenoiser`` on ``schedules.edm``;
- x's layout (channels_last, a strided view, 5-D video), ``requires_grad``, and the caller's ``inference_mode`` or
  CPU ``autocast`` leave the samples bitwise as they are.

Oracles are written in float64 (k-diffusion is not installed); float32 runs obey the project's tolerance rule.
"""
import importlib.util
import math
import os
import sys
import types
import warnings

import pytest
import torch

import diffkern
from diffkern import analytic, schedules, wrappers
from diffkern import samplers as K
from diffkern.__main__ import main
from diffkern.ops import philox
from diffkern.samplers import SAMPLERS
from diffkern.testing import assert_matches_reference

REF = "reference"
GMM = analytic.GaussianMixture.demo_2d()
SIGMAS = schedules.karras(5, 0.02, 20.0)


def _x(shape=(6, 2), scale=20.0, seed=0, dtype=torch.float64):
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).mul(scale).to(dtype)

#----------------------------------------------------------------------------
# Callbacks: k-diffusion's dict, with tensors the caller may keep.


# dpm_adaptive has no record (test_kdiff_adaptive); dpm_fast reports once per step of its own grid, not per model
# call, as k-diffusion (kept tensors: test_kdiff_callbacks18)
@pytest.mark.parametrize("method", sorted(set(SAMPLERS) - {"dpm_adaptive", "dpm_fast"}))
def test_callback_tensors_can_be_kept(method):
    """A callback that appends the dicts as given (no clone) holds each step's own values afterwards: the same as
    the recorded trajectories of the same run (``x`` the state before the step, ``denoised`` its estimate)."""
    x = _x()
    kept = []
    out = diffkern.sample(GMM, x, SIGMAS, method, callback=kept.append, backend=REF)
    ref, traj = diffkern.sample(GMM, x, SIGMAS, method, record=True, backend=REF)
    assert torch.equal(out, ref)
    assert [d["i"] for d in kept] == list(range(len(SIGMAS) - 1))
    for i, d in enumerate(kept):
        assert torch.equal(d["x"], traj["x"][i]), f"{method}: callback x of step {i} was overwritten"
        assert torch.equal(d["denoised"], traj["denoised"][i]), f"{method}: callback denoised of step {i}"
    ptrs = [d[k].data_ptr() for d in kept for k in ("x", "denoised")] + [out.data_ptr()]
    assert len(set(ptrs)) == len(ptrs), "no two kept tensors (nor the result) share memory"


def _kdiff_churn_loop(model, x, sigmas, kind, s_churn, s_tmin, s_tmax, callback):
    """k-diffusion's sample_euler / sample_heun / sample_dpm_2 as published, with s_noise = 0 (churn then moves
    sigma to sigma_hat without noise, so the run is deterministic), float64."""
    s_in = x.new_ones([x.shape[0]])
    n = len(sigmas) - 1
    for i in range(n):
        gamma = min(s_churn / n, 2 ** 0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
        sigma_hat = sigmas[i] * (gamma + 1)
        denoised = model(x, sigma_hat * s_in)
        d = (x - denoised) / sigma_hat
        callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
        if sigmas[i + 1] == 0 or kind == "euler":
            x = x + d * (sigmas[i + 1] - sigma_hat)
        elif kind == "heun":
            x_2 = x + d * (sigmas[i + 1] - sigma_hat)
            d_2 = (x_2 - model(x_2, sigmas[i + 1] * s_in)) / sigmas[i + 1]
            x = x + (d + d_2) / 2 * (sigmas[i + 1] - sigma_hat)
        else:
            sigma_mid = sigma_hat.log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigma_hat)
            d_2 = (x_2 - model(x_2, sigma_mid * s_in)) / sigma_mid
            x = x + d_2 * (sigmas[i + 1] - sigma_hat)
    return x


@pytest.mark.parametrize("kind", ["euler", "heun", "dpm_2"])
@pytest.mark.parametrize("s_churn", [0.0, 3.0])
def test_callback_values_are_k_diffusions(kind, s_churn):
    """The k-diffusion drop-in's callback: one call per step (not per model call), churn's sigma_hat, and the values
    of k-diffusion's loop, with the kept tensors compared after the run."""
    sig, x = schedules.karras(6, 0.01, 20.0), _x((8, 2))
    knobs = dict(s_churn=s_churn, s_tmin=0.05, s_tmax=10.0)
    theirs, ours = [], []
    ref = _kdiff_churn_loop(GMM, x, sig, kind, callback=theirs.append, **knobs)
    out = getattr(K, f"sample_{kind}")(GMM, x, sig, callback=ours.append, disable=True, s_noise=0.0, backend=REF,
                                       **knobs)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert len(ours) == len(theirs) == 6
    for a, b in zip(ours, theirs):
        assert a["i"] == b["i"] and a["sigma"].dim() == 0 and a["sigma_hat"].dim() == 0  # 0-d tensors
        assert a["sigma"] == pytest.approx(float(b["sigma"]), rel=1e-15)
        assert a["sigma_hat"] == pytest.approx(float(b["sigma_hat"]), rel=1e-14)
        torch.testing.assert_close(a["x"], b["x"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a["denoised"], b["denoised"], rtol=1e-12, atol=1e-12)
    assert s_churn == 0 or any(a["sigma_hat"] > a["sigma"] for a in ours), "the churn window was reached"


@pytest.mark.parametrize("variant", ["euler", "two_head", "stochastic"])
def test_iadb_callback_tensors_can_be_kept(variant):
    def model(x, alpha):
        a = alpha.view(-1, 1).to(x.dtype)
        return (0.3 * x * (1 - a), 0.7 * x + a) if variant == "two_head" else -0.5 * x + a

    x0, kept = _x((5, 3), scale=1.0), []
    out = diffkern.sample_iadb(model, x0, steps=4, variant=variant, seed=3, callback=kept.append, backend=REF)
    ref, traj = diffkern.sample_iadb(model, x0, steps=4, variant=variant, seed=3, record=True, backend=REF)
    assert torch.equal(out, ref)
    for i, d in enumerate(kept):
        assert torch.equal(d["x"], traj["x"][i]) and torch.equal(d["denoised"], traj["denoised"][i]), i


def test_plain_sampler_checks_its_callback_before_any_work():
    calls = []

    def model(x, s):
        calls.append(1)
        return GMM(x, s)

    with pytest.raises(TypeError, match="callback: expected a callable or None, got int"):
        K.sample_heun(model, _x(), SIGMAS, callback=1, disable=True)
    assert not calls

#----------------------------------------------------------------------------
# A model that writes into its input would corrupt the sampler's state: refused.


def _writes_into_x(x, sigma):
    out = GMM(x, sigma)
    x.mul_(0.5)  # e.g. an in-place input normalisation
    return out


@pytest.mark.parametrize("method", ["euler", "heun", "dpmpp_2m", "euler_ancestral"])
def test_model_writing_into_its_input_is_refused(method):
    with pytest.raises(RuntimeError, match="model: modified its input x in place"):
        diffkern.sample(_writes_into_x, _x(), SIGMAS, method)


def test_wrapped_and_iadb_models_writing_into_their_input_are_refused():
    def eps(x, sigma):
        x[:, 0] += 0.0  # a write through a view counts too
        return x / (1 + sigma.view(-1, 1) ** 2)

    with pytest.raises(RuntimeError, match="model: modified its input x in place"):
        diffkern.sample(wrappers.VEDenoiser(eps), _x(), SIGMAS, "dpmpp_2m")
    with pytest.raises(RuntimeError, match="model: modified its input x in place"):
        diffkern.sample_iadb(lambda x, a: x.add_(0.0), _x(scale=1.0), steps=2)


def test_a_model_writing_into_its_sigma_is_refused():
    """sigma is a view of the loop's device table: at batch 1 an in-place write would change later steps' levels."""
    def model(x, sigma):
        sigma.mul_(1.0)
        return GMM(x, sigma)

    with pytest.raises(RuntimeError, match="model: modified its input sigma in place; sigma is a view of the loop's"):
        diffkern.sample(model, _x()[:1], SIGMAS, "euler")


def test_a_model_writing_into_its_own_copy_is_fine():
    def model(x, sigma):
        y = x.clone()
        y.mul_(1.0)
        return GMM(y, sigma)

    torch.testing.assert_close(diffkern.sample(model, _x(), SIGMAS, "heun"), diffkern.sample(GMM, _x(), SIGMAS, "heun"),
                               rtol=0, atol=0)

#----------------------------------------------------------------------------
# x's layout and the caller's autograd / autocast context change nothing.


def _analytic(x, sigma):
    """D of N(0, 0.5^2 I) data for any x shape (elementwise: no op that autocast would run in 16 bits)."""
    s = sigma.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return x * (0.25 / (0.25 + s * s))


@pytest.mark.parametrize("method", ["dpmpp_2m_sde", "heun"])
def test_layouts_and_contexts_give_the_same_samples(method):
    x = _x((2, 3, 4, 5), dtype=torch.float32)
    ref = diffkern.sample(_analytic, x, SIGMAS, method, seed=4)
    for variant in (x.to(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3),
                    x.clone().requires_grad_(True)):
        out = diffkern.sample(_analytic, variant, SIGMAS, method, seed=4)
        assert torch.equal(out, ref) and not out.requires_grad
    with torch.inference_mode():
        assert torch.equal(diffkern.sample(_analytic, x, SIGMAS, method, seed=4, callback=lambda d: None), ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(diffkern.sample(_analytic, x, SIGMAS, method, seed=4), ref)
    video = x.reshape(2, 3, 2, 2, 5)  # (B, C, T, H, W): the same numbers, another shape
    assert torch.equal(diffkern.sample(_analytic, video, SIGMAS, method, seed=4).reshape(x.shape), ref)

#----------------------------------------------------------------------------
# smalldiffusion's networks and schedules against its own samples(gam, mu). Its package imports accelerate,
# torchvision and einops, which the networks used here do not need: its two modules load from their files.


@pytest.fixture(scope="module")
def sd():
    spec = importlib.util.find_spec("smalldiffusion")
    if spec is None or spec.origin is None:
        raise RuntimeError("smalldiffusion is a test dependency: pip install --no-deps smalldiffusion")
    stubs = {"accelerate": types.ModuleType("accelerate"), "einops": types.ModuleType("einops")}
    stubs["accelerate"].Accelerator = type("Accelerator", (), {"device": torch.device("cpu")})
    stubs["einops"].rearrange = stubs["einops"].repeat = None
    saved = {k: sys.modules.get(k) for k in stubs}
    mods = {}
    try:
        for k, stub in stubs.items():
            sys.modules[k] = saved[k] or stub
        for name in ("diffusion", "model"):
            path = os.path.join(os.path.dirname(spec.origin), f"{name}.py")
            mod_spec = importlib.util.spec_from_file_location(f"_smalldiffusion_{name}_journey", path)
            mods[name] = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(mods[name])
    finally:
        for k in stubs:
            if saved[k] is None:
                del sys.modules[k]
    return types.SimpleNamespace(**{**vars(mods["model"]), **vars(mods["diffusion"])})


class _Queued:
    """smalldiffusion's model protocol around a network, its noise (``rand_input``) from a queue of diffkern's."""

    def __init__(self, net, queue):
        self.net, self.queue = net, queue

    def eval(self):
        return self

    def predict_eps_cfg(self, x, sigma, cond, cfg_scale):
        return self.net.predict_eps(x, sigma)

    def rand_input(self, batch):
        return self.queue.pop(0)


SEED = 21


@pytest.mark.parametrize("schedule", ["ScheduleDDPM", "ScheduleCosine", "ScheduleLDM", "ScheduleLogLinear"])
@pytest.mark.parametrize("gam,mu", [(1.0, 0.0), (2.0, 0.0), (1.0, 0.5)])
def test_smalldiffusion_network_and_schedule(sd, schedule, gam, mu):
    sched = getattr(sd, schedule)(200, 0.02, 10.0) if schedule == "ScheduleLogLinear" else getattr(sd, schedule)()
    sig = sched.sample_sigmas(10)  # float32, trailing, ends at sigma_min (no final 0)
    torch.manual_seed(0)
    nets = {torch.float32: sd.TimeInputMLP(dim=2, hidden_dims=(16, 32, 16)).eval()}
    nets[torch.float64] = sd.TimeInputMLP(dim=2, hidden_dims=(16, 32, 16)).double().eval()
    nets[torch.float64].load_state_dict(nets[torch.float32].state_dict())
    x = _x((16, 2), scale=float(sig[0]), seed=1)
    ref, ours = {}, {}
    for dt, net in nets.items():
        queue = [philox.noise_like(x, torch.tensor([SEED]), i, dt) for i in range(10)]
        *_, ref[dt] = sd.samples(_Queued(net, queue), sig.to(dt), gam=gam, mu=mu, xt=x.to(dt))
        ours[dt] = diffkern.sample(wrappers.VEDenoiser(net.predict_eps), x.to(dt), sig, "ge", gamma=gam, mu=mu,
                                   seed=SEED, backend=REF)
    assert_matches_reference(ours[torch.float64], ref[torch.float64], ref[torch.float64], f"{schedule} float64")
    assert_matches_reference(ours[torch.float32], ref[torch.float64], ref[torch.float32], f"{schedule} float32")


@pytest.mark.parametrize("cfg", [0.0, 1.5, 4.0])
def test_smalldiffusion_conditional_cfg(sd, cfg):
    """smalldiffusion's ``eps_c + cfg*(eps_c - eps_u)`` is VEDenoiser's guidance ``1 + cfg`` with the null label as
    the ``uncond_cond`` extra arg, one batched network call fused into the step."""
    torch.manual_seed(0)
    net = sd.ConditionalMLP(dim=2, hidden_dims=(16, 32, 16), cond_dim=4, num_classes=3).double().eval()
    sig = sd.ScheduleDDPM().sample_sigmas(12).double()
    x, labels = _x((6, 2), scale=float(sig[0]), seed=1), torch.tensor([0, 1, 2, 0, 1, 2])
    *_, ref = sd.samples(net, sig, gam=2.0, cfg_scale=cfg, xt=x.clone(), cond=labels)
    den = wrappers.VEDenoiser(net.predict_eps, guidance_scale=1 + cfg)
    null = torch.full_like(labels, net.cond_embed.null_cond)
    out = diffkern.sample(den, x, sig, "ge", gamma=2.0, extra_args={"cond": labels, "uncond_cond": null}, backend=REF)
    assert_matches_reference(out, ref, ref, f"cfg={cfg}")

#----------------------------------------------------------------------------
# EDM (Karras et al. 2022): Algorithm 2 as its generate.py runs it, with EDMPrecond, against heun + KarrasDenoiser.


class _F(torch.nn.Module):
    """A tiny EDM network F(c_in x, c_noise)."""

    def __init__(self):
        super().__init__()
        self.conv, self.emb = torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.Linear(1, 3)

    def forward(self, x, c_noise):
        scale = torch.tanh(self.emb(c_noise[:, None].to(x.dtype)))[:, :, None, None]
        return self.conv(x) * scale + 0.1 * x


def _edm_sampler(net, latents, n, s_churn, s_min, s_max, s_noise, seed, sigma_data=0.5):
    """EDM's ``edm_sampler`` (rho = 7, sigma in [0.002, 80]) with EDMPrecond written out, in latents' dtype; the
    churn noise of step i is diffkern's Philox draw at that step's churn row (heun's rows: 2n + i)."""
    dt = latents.dtype
    idx = torch.arange(n, dtype=dt)
    t = (80 ** (1 / 7) + idx / (n - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    t = torch.cat([t, torch.zeros(1, dtype=dt)])

    def denoise(x, sigma):
        c_skip, c_out = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2), sigma * sigma_data / (
            sigma ** 2 + sigma_data ** 2).sqrt()
        c_in, c_noise = 1 / (sigma_data ** 2 + sigma ** 2).sqrt(), sigma.log() / 4
        return c_skip * x + c_out * net(c_in * x, c_noise.reshape(1).expand(x.shape[0]))

    x_next = latents * t[0]
    for i, (t_cur, t_next) in enumerate(zip(t[:-1], t[1:])):
        x_cur = x_next
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_min <= t_cur <= s_max else 0
        t_hat = t_cur + gamma * t_cur
        xi = philox.noise_like(x_cur, torch.tensor([seed]), 2 * n + i, dt)
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * s_noise * xi
        d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < n - 1:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


@pytest.mark.parametrize("n,s_churn,s_min,s_max,s_noise", [(18, 0.0, 0.0, math.inf, 1.0),
                                                           (10, 40.0, 0.05, 50.0, 1.003),
                                                           (7, 80.0, 0.0, math.inf, 1.007)])
def test_edm_algorithm_2_is_heun_on_karras_denoiser(n, s_churn, s_min, s_max, s_noise):
    torch.manual_seed(0)
    nets = {torch.float32: _F().eval()}
    nets[torch.float64] = _F().double().eval()
    nets[torch.float64].load_state_dict(nets[torch.float32].state_dict())
    latents = _x((2, 3, 6, 5), scale=1.0, seed=1)
    sig = schedules.edm(n)
    ref, ours = {}, {}
    with torch.no_grad():
        for dt, net in nets.items():
            ref[dt] = _edm_sampler(net, latents.to(dt), n, s_churn, s_min, s_max, s_noise, seed=5)
            ours[dt] = diffkern.sample(wrappers.KarrasDenoiser(net, sigma_data=0.5), latents.to(dt) * float(sig[0]),
                                       sig, "heun", s_churn=s_churn, s_tmin=s_min, s_tmax=s_max, s_noise=s_noise,
                                       seed=5)
    assert_matches_reference(ours[torch.float64], ref[torch.float64], ref[torch.float64], "EDM float64")
    assert_matches_reference(ours[torch.float32], ref[torch.float64], ref[torch.float32], "EDM float32")

#----------------------------------------------------------------------------
# CLI.


def test_cli_sample_missing_model_names_the_flag(capsys, tmp_path):
    out = tmp_path / "g.png"
    assert main(["sample", "--model", "bultin", "--steps", "1", "--batch", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffkern sample: error: --model: expected builtin, optimal or a weights file"), err
    assert "'bultin' (no such file)" in err and len(err.splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("modifier", ["Scaled", "PredX0", "PredV"])
def test_smalldiffusion_modifiers_with_the_readme_recipe(sd, modifier):
    """The README's recipe for smalldiffusion models, ``VEDenoiser(lambda x, s: net.predict_eps(x, s[0]))``: its
    modifiers broadcast sigma against x, so they take the 0-d sigma of smalldiffusion's own sampler, not a (B,) one."""
    sig = sd.ScheduleLogLinear(200, 0.02, 10.0).sample_sigmas(8)
    torch.manual_seed(0)
    net = getattr(sd, modifier)(sd.TimeInputMLP)(dim=2, hidden_dims=(16, 16)).double().eval()
    x = _x((5, 2), scale=float(sig[0]), seed=3).double()
    queue = [philox.noise_like(x, torch.tensor([SEED]), i, torch.float64) for i in range(8)]
    *_, ref = sd.samples(_Queued(net, queue), sig.double(), gam=2.0, xt=x)
    den = wrappers.VEDenoiser(lambda x, s: net.predict_eps(x, s[0]))
    ours = diffkern.sample(den, x, sig, "ge", gamma=2.0, seed=SEED, backend=REF)
    assert_matches_reference(ours, ref, ref, f"{modifier} float64")


def test_compiled_wrapper_warns_once_and_compiled_network_does_not(monkeypatch):
    """torch.compile(wrapper) would run uncompiled (the loop calls the wrapper's .raw): say so once, naming the fix;
    the recommended form, the network compiled inside the wrapper, gives the same samples without a warning."""
    from diffkern import sampler_loop
    monkeypatch.setattr(sampler_loop, "_warned_compiled", False)
    net = torch.nn.Linear(3, 3).double()
    x = _x((4, 3), scale=10.0, seed=2).double()
    sig = schedules.karras(4, 0.1, 10.0)
    eager = diffkern.sample(wrappers.VEDenoiser(lambda x, s: net(x)), x, sig, "euler", backend=REF)
    compiled = torch.compile(wrappers.VEDenoiser(lambda x, s: net(x)), backend="eager")
    with pytest.warns(UserWarning, match=r"torch.compile of a diffkern wrapper \(VEDenoiser\).*VEDenoiser\(torch.com"):
        out = diffkern.sample(compiled, x, sig, "euler", backend=REF)
    assert torch.equal(out, eager)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        diffkern.sample(compiled, x, sig, "euler", backend=REF)  # once
        inner = wrappers.VEDenoiser(torch.compile(lambda x, s: net(x), backend="eager"))
        torch.testing.assert_close(diffkern.sample(inner, x, sig, "euler", backend=REF), eager, rtol=0, atol=1e-12)
