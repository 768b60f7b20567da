"""dpm_adaptive (k-diffusion's ``sample_dpm_adaptive``: DPM-Solver-12/23 with a PID step-size controller) against
k-diffusion's ``DPMSolver.dpm_solver_adaptive`` written below in float64 (k-diffusion is not installed), driven by the
exact denoiser of a Gaussian mixture.

diffkern must match the float64 loop to the float64 floor, with the same accepted and rejected attempts (info, the
callback's error and h), and obey the project's tolerance rule in float32 on every CPU backend. Noise (eta > 0) is a
shared noise_sampler, or diffkern's Philox stream at the accepted step's index.
"""
import math

import pytest
import torch

from diffkern import analytic, graphs, schedules, wrappers
from diffkern.ops import philox
from diffkern.sampling import knobs, sample
from diffkern.samplers_adaptive import sample_dpm_adaptive
from diffkern.testing import assert_matches_reference, noncontiguous
from sampler_checks import AWKWARD, AWKWARD_IDS, ancestral_step

F64 = torch.float64
REF = "reference"
SEED = 5


def gmm(dim=2, seed=4):
    gen = torch.Generator().manual_seed(seed)
    return analytic.GaussianMixture([1.0, 2.0, 0.7], torch.randn(3, dim, generator=gen, dtype=F64), [0.6, 0.8, 0.3])


def start(shape=(6, 2), sigma=10.0, seed=3, dtype=F64):
    return (torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(seed)) * sigma).to(dtype)


class Draws:
    """A noise_sampler handing out float64 normals in call order (cast to the state's dtype), recording the pairs."""

    def __init__(self, like, n=256, seed=9):
        self.noise = torch.randn((n, *like.shape), dtype=F64, generator=torch.Generator().manual_seed(seed))
        self.dtype, self.calls = like.dtype, []

    def __call__(self, sigma, sigma_next):
        self.calls.append((float(sigma), float(sigma_next)))
        return self.noise[len(self.calls) - 1].to(self.dtype)


class PID:
    """k-diffusion's ``PIDStepSizeController``."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order, accept_safety, eps=1e-8):
        self.h, self.accept_safety, self.eps, self.errs = h, accept_safety, eps, []
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order

    def propose_step(self, error):
        inv_error = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2] = self.errs[1]
            self.errs[1] = self.errs[0]
        self.h *= factor
        return accept


def kdiff_adaptive(model, x, sigma_min, sigma_max, order=3, rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0,
                   icoeff=1.0, dcoeff=0.0, accept_safety=0.81, eta=0.0, s_noise=1.0, noise_sampler=None, seed=SEED):
    """k-diffusion's ``dpm_solver_adaptive`` as published, t as Python floats; with no noise_sampler the noise of
    accepted step k is diffkern's Philox stream at step counter k. Returns (x, info, per-attempt log)."""
    sigma_fn = lambda t: math.exp(-t)  # noqa: E731
    t_fn = lambda s: -math.log(s) if s > 0 else math.inf  # noqa: E731

    def eps(cache, key, x, t):
        if key not in cache:
            cache[key] = (x - model(x, torch.full((x.shape[0],), sigma_fn(t), dtype=x.dtype))) / sigma_fn(t)
        return cache[key]

    def step1(x, t, tn, cache):
        return x - sigma_fn(tn) * math.expm1(tn - t) * eps(cache, "eps", x, t)

    def step2(x, t, tn, cache, r1=1 / 2):
        h = tn - t
        e = eps(cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - sigma_fn(s1) * math.expm1(r1 * h) * e
        e1 = eps(cache, "eps_r1", u1, s1)
        return x - sigma_fn(tn) * math.expm1(h) * e - sigma_fn(tn) / (2 * r1) * math.expm1(h) * (e1 - e)

    def step3(x, t, tn, cache, r1=1 / 3, r2=2 / 3):
        h = tn - t
        e = eps(cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - sigma_fn(s1) * math.expm1(r1 * h) * e
        e1 = eps(cache, "eps_r1", u1, s1)
        u2 = (x - sigma_fn(s2) * math.expm1(r2 * h) * e
              - sigma_fn(s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (e1 - e))
        e2 = eps(cache, "eps_r2", u2, s2)
        return x - sigma_fn(tn) * math.expm1(h) * e - sigma_fn(tn) / r2 * (math.expm1(h) / h - 1) * (e2 - e)

    t_start, t_end = t_fn(sigma_max), t_fn(sigma_min)
    forward = t_end > t_start
    h_init = abs(h_init) * (1 if forward else -1)
    s, x_prev, log = t_start, x, []
    pid = PID(h_init, pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    info = {"steps": 0, "nfe": 0, "n_accept": 0, "n_reject": 0}
    while s < t_end - 1e-5 if forward else s > t_end + 1e-5:
        cache = {}
        t = min(t_end, s + pid.h) if forward else max(t_end, s + pid.h)
        if eta:
            sd, su = ancestral_step(sigma_fn(s), sigma_fn(t), eta)
            t_ = min(t_end, t_fn(sd))
            su = (sigma_fn(t) ** 2 - sigma_fn(t_) ** 2) ** 0.5
        else:
            t_, su = t, 0.0
        if order == 2:
            x_low, x_high = step1(x, s, t_, cache), step2(x, s, t_, cache)
        else:
            x_low, x_high = step2(x, s, t_, cache, r1=1 / 3), step3(x, s, t_, cache)
        dt = torch.promote_types(x.dtype, torch.float32)
        delta = torch.clamp_min(rtol * torch.maximum(x_low.to(dt).abs(), x_prev.to(dt).abs()), atol)
        error = float(torch.linalg.vector_norm((x_low.to(dt) - x_high.to(dt)) / delta)) / x.numel() ** 0.5
        accept = pid.propose_step(error)
        if accept:
            x_prev = x_low
            if noise_sampler is not None:
                xi = noise_sampler(sigma_fn(s), sigma_fn(t))
            else:
                xi = philox.noise_like(x, torch.tensor([seed]), info["n_accept"], F64).to(x.dtype)
            x = x_high + su * s_noise * xi
            s = t
            info["n_accept"] += 1
        else:
            info["n_reject"] += 1
        info["nfe"] += order
        info["steps"] += 1
        log.append((sigma_fn(s), error, pid.h, accept))
    return x, info, log


CASES = [{}, {"order": 2}, {"eta": 0.5, "s_noise": 0.8}, {"order": 2, "eta": 1.0},
         {"pcoeff": 0.2, "icoeff": 0.6, "dcoeff": 0.1, "rtol": 0.02, "h_init": 0.3},
         {"accept_safety": 0.95, "atol": 0.02, "rtol": 0.0}]


def _run(dtype, kw, noise=True, backend=REF, x=None, model=None):
    x = start(dtype=dtype) if x is None else x
    seen = []
    ns = Draws(x) if noise else None
    # float64 0-d limits: the callback's and noise_sampler's sigmas are then float64 too, as k-diffusion's
    lo, hi = torch.tensor(0.02, dtype=F64), torch.tensor(12.0, dtype=F64)
    out, info = sample_dpm_adaptive(model or gmm(), x, lo, hi, None, seen.append, True, noise_sampler=ns,
                                    return_info=True, seed=SEED, backend=backend, **kw)
    return out, info, seen, ns


@pytest.mark.parametrize("kw", CASES, ids=[str(c) for c in CASES])
def test_is_kdiffusion_loop_in_float64(kw):
    want, want_info, log = kdiff_adaptive(gmm(), start(), 0.02, 12.0, noise_sampler=Draws(start()), **kw)
    got, info, seen, ns = _run(F64, kw)
    assert info == want_info and info["nfe"] == info["steps"] * kw.get("order", 3)
    assert info["n_accept"] > 3 and (info["n_reject"] > 0) == (kw != CASES[0])  # rejections exercised
    assert_matches_reference(got, want, want, f"{kw}")
    assert [d["i"] for d in seen] == list(range(info["steps"]))
    got_log = [(float(d["sigma"]), float(d["error"]), d["h"]) for d in seen]
    # the error is a difference of two solutions (cancellation): relative agreement 1e-9, not the state's 1e-15
    torch.testing.assert_close(torch.tensor(got_log, dtype=F64), torch.tensor([r[:3] for r in log], dtype=F64),
                               rtol=1e-9, atol=1e-12)
    # the noise_sampler is called on every accepted step (eta = 0 too), at (sigma(s), sigma(t)) as k-diffusion's
    ref_ns = Draws(start())
    kdiff_adaptive(gmm(), start(), 0.02, 12.0, noise_sampler=ref_ns, **kw)
    assert len(ns.calls) == info["n_accept"]
    torch.testing.assert_close(torch.tensor(ns.calls, dtype=F64), torch.tensor(ref_ns.calls, dtype=F64), rtol=1e-9,
                               atol=0)  # sigma(t) moves with h, hence with the error


@pytest.mark.parametrize("kw", [{"eta": 1.0}, {"order": 2, "eta": 0.6, "s_noise": 1.3}], ids=["o3", "o2"])
def test_philox_noise_is_the_accepted_steps_stream(kw):
    want, want_info, _ = kdiff_adaptive(gmm(), start(), 0.02, 12.0, **kw)
    got, info = sample_dpm_adaptive(gmm(), start(), 0.02, 12.0, disable=True, seed=SEED, backend=REF,
                                    return_info=True, **kw)
    assert info == want_info
    assert_matches_reference(got, want, want, f"philox {kw}")
    other = sample_dpm_adaptive(gmm(), start(), 0.02, 12.0, disable=True, seed=SEED + 1, backend=REF, **kw)
    assert not torch.equal(other, got)
    ode = [sample_dpm_adaptive(gmm(), start(), 0.02, 12.0, disable=True, seed=s, backend=REF) for s in (1, 2)]
    assert torch.equal(*ode)  # eta = 0: no noise


@pytest.mark.parametrize("kw", [CASES[0], CASES[3]], ids=["ode", "eta"])
def test_every_backend_matches_reference(cpu_backend, kw):
    ref64, info64, _, _ = _run(F64, kw)
    eager, info_eager, _, _ = _run(torch.float32, kw)
    got, info, _, _ = _run(torch.float32, kw, backend=cpu_backend)
    assert info == info_eager == info64
    assert_matches_reference(got, ref64, eager, f"{kw} [{cpu_backend}]")
    got64, _, _, _ = _run(F64, kw, backend=cpu_backend)
    assert_matches_reference(got64, ref64, ref64, f"{kw} [{cpu_backend}] float64")


@pytest.mark.parametrize("shape, contiguous", AWKWARD, ids=AWKWARD_IDS)
def test_awkward_shapes(cpu_backend, shape, contiguous):
    model = gmm(math.prod(shape[1:]), seed=9)
    x64 = start(shape, seed=2)
    x32 = x64.float() if contiguous else noncontiguous(x64.float())
    ref64, _, _, _ = _run(F64, {"eta": 0.7}, x=x64, model=model)
    eager, _, _, _ = _run(torch.float32, {"eta": 0.7}, x=x64.float(), model=model)
    got, _, _, _ = _run(torch.float32, {"eta": 0.7}, backend=cpu_backend, x=x32, model=model)
    assert got.shape == x64.shape and got.is_contiguous()
    assert_matches_reference(got, ref64, eager, f"{shape} [{cpu_backend}]")


def test_empty_batch_runs_with_zero_error():
    x = torch.zeros((0, 2), dtype=F64)
    out, info = sample_dpm_adaptive(gmm(), x, 0.02, 12.0, disable=True, backend=REF, return_info=True)
    assert out.shape == (0, 2) and info["n_reject"] == 0 and info["n_accept"] > 0


def test_reverse_ode_is_kdiffusions():
    """sigma_min > sigma_max integrates the ODE backwards (k-diffusion's reverse branch; eta must be 0)."""
    x = start(sigma=0.5)
    want, want_info, _ = kdiff_adaptive(gmm(), x, 8.0, 0.1)
    got, info = sample_dpm_adaptive(gmm(), x, 8.0, 0.1, disable=True, backend=REF, return_info=True)
    assert info == want_info and info["n_accept"] > 0
    assert_matches_reference(got, want, want, "reverse")
    with pytest.raises(ValueError, match=r"^eta: must be 0 for reverse sampling"):
        sample_dpm_adaptive(gmm(), x, 8.0, 0.1, eta=0.5, disable=True)


def test_fused_wrapper_matches_plain_denoiser():
    model = gmm()
    wrapped = wrappers.VEDenoiser(lambda x, s: model.eps(x, s))
    plain, info = sample_dpm_adaptive(model, start(), 0.02, 12.0, disable=True, backend=REF, return_info=True)
    got, info_w = sample_dpm_adaptive(wrapped, start(), 0.02, 12.0, disable=True, backend=REF, return_info=True)
    assert info_w == info
    assert_matches_reference(got, plain, plain, "VEDenoiser")


def test_schedule_form_is_comfyuis_mapping():
    """diffkern.sample(..., "dpm_adaptive") runs from sigmas[0] to the last non-zero sigma, as ComfyUI's."""
    assert knobs("dpm_adaptive") == {"order": 3, "rtol": 0.05, "atol": 0.0078, "h_init": 0.05, "pcoeff": 0.0,
                                     "icoeff": 1.0, "dcoeff": 0.0, "accept_safety": 0.81, "eta": 0.0, "s_noise": 1.0}
    calls = []

    def spy(x, sigma):
        calls.append(float(sigma[0]))
        return gmm()(x, sigma)

    for sig in (schedules.karras(7, 0.02, 12.0), [12.0, 3.0, 0.02]):
        lo = float(sig[-1]) or float(sig[-2])
        want = sample_dpm_adaptive(gmm(), start(), lo, float(sig[0]), disable=True, backend=REF, seed=SEED, eta=0.5)
        got = sample(spy, start(), sig, "dpm_adaptive", backend=REF, seed=SEED, eta=0.5)
        assert torch.equal(got, want)
    assert max(calls) == 12.0 and min(calls) > 0.02
    # [sigma, 0]: sigma_min = sigma_max, no step (k-diffusion's loop does not run); eta > 0 is its reverse error
    assert torch.equal(sample(gmm(), start(), [3.0, 0.0], "dpm_adaptive", backend=REF), start())
    with pytest.raises(ValueError, match=r"^eta: must be 0 for reverse sampling"):
        sample(gmm(), start(), [3.0, 0.0], "dpm_adaptive", backend=REF, eta=1.0)
    ns = Draws(start())
    sample(gmm(), start(), [12.0, 0.02], "dpm_adaptive", backend=REF, noise_sampler=ns, eta=1.0)
    assert len(ns.calls) > 0


def test_eager_only():
    with pytest.raises(ValueError, match=r"^graph: dpm_adaptive accepts or rejects each step .* \(graph=True\)"):
        sample(gmm(), start(), [12.0, 0.02], "dpm_adaptive", graph=True)
    with pytest.raises(ValueError, match=r"^trajectory: dpm_adaptive decides its number of steps"):
        sample(gmm(), start(), [12.0, 0.02], "dpm_adaptive", record=True)
    with pytest.raises(ValueError, match=r"^window: dpm_adaptive runs no fixed schedule"):
        sample(gmm(), start(), [12.0, 0.02], "dpm_adaptive", window=(0, 1))
    with pytest.warns(graphs.GraphFallbackWarning, match="graph='auto' runs eager: dpm_adaptive"):
        got = sample(gmm(), start(), [12.0, 0.02], "dpm_adaptive", graph="auto", backend=REF)
    assert torch.equal(got, sample(gmm(), start(), [12.0, 0.02], "dpm_adaptive", backend=REF))


def test_callback_dict_is_kdiffusions():
    _, info, seen, _ = _run(F64, {})
    assert set(seen[0]) == {"sigma", "sigma_hat", "x", "i", "t", "t_up", "denoised", "error", "h", "steps", "nfe",
                            "n_accept", "n_reject"}
    assert seen[-1]["steps"] == info["steps"] and seen[-1]["n_accept"] == info["n_accept"]
    # fresh tensors: what a callback keeps is never overwritten later
    assert len({d["x"].data_ptr() for d in seen}) == len(seen)
    torch.testing.assert_close(seen[0]["denoised"], gmm()(start(), torch.full((6,), 12.0, dtype=F64)))


@pytest.mark.parametrize("kw, err, match", [
    ({"order": 1}, ValueError, "order: expected 2 or 3"), ({"order": True}, ValueError, "order: expected 2 or 3"),
    ({"rtol": -0.1}, ValueError, "rtol: expected a finite number >= 0"),
    ({"atol": math.nan}, ValueError, "atol: expected a finite number >= 0"),
    ({"rtol": 0.0, "atol": 0.0}, ValueError, "atol: rtol and atol are both 0"),
    ({"h_init": 0.0}, ValueError, "h_init: expected a non-zero"), ({"h_init": "x"}, TypeError, "h_init: expected"),
    ({"pcoeff": torch.tensor(0.1)}, TypeError, r"pcoeff: expected a number \(a tensor"),
    ({"accept_safety": math.inf}, ValueError, "accept_safety: expected a finite number"),
    ({"eta": -1.0}, ValueError, "eta: expected"), ({"s_noise": -1.0}, ValueError, "s_noise: expected"),
    ({"sigma_min": 0.0}, ValueError, "sigma_min: expected a finite number > 0"),
    ({"sigma_max": math.inf}, ValueError, "sigma_max: expected a finite number > 0"),
    ({"return_info": 1}, TypeError, "return_info: expected a bool"),
    ({"noise_sampler": 3}, TypeError, "noise_sampler: expected None or a callable"),
])
def test_bad_inputs(kw, err, match):
    args = {"sigma_min": 0.02, "sigma_max": 12.0, **kw}
    with pytest.raises(err, match=f"^{match}"):
        sample_dpm_adaptive(gmm(), start(), disable=True, **args)


def test_non_finite_error_raises():
    with pytest.raises(RuntimeError, match=r"^dpm_adaptive: the error estimate of attempt 0 .* is nan"):
        sample_dpm_adaptive(lambda x, s: x * math.nan, start(), 0.02, 12.0, disable=True, backend=REF)
