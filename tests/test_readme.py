"""README.md's Python examples, run as written: each test finds its ```python block by a distinctive line (and fails
naming that line when the README no longer has it), executes it with ``exec`` in a namespace that supplies what the
surrounding prose assumes (a model, ``x``, ``sigmas``, a pipeline, ...), then checks the result: shapes and dtypes the
comments state, finiteness, in-place writes, and that the output is what the example says it computes.

Code objects are compiled with README.md as their file name and the block's README line numbers, so a traceback
points at the README line that broke.
"""
import re
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

import diffkern
from diffkern import analytic

try:  # the diffusers blocks reuse the tiny pipeline of the pipeline tests; without diffusers only they skip
    from test_diffusers_pipelines import tiny_sd, tiny_unet  # noqa: F401  (tiny_sd: fixture)
except pytest.skip.Exception as exc:
    _why_no_diffusers = str(exc)

    @pytest.fixture
    def tiny_sd():
        pytest.skip(_why_no_diffusers)

README = Path(__file__).resolve().parent.parent / "README.md"


class Block(NamedTuple):
    line: int  # README line of the block's first code line
    text: str

    def run(self, ns: dict) -> dict:
        """Executes the block in ``ns`` (README line numbers in tracebacks); returns ``ns``."""
        exec(compile("\n" * (self.line - 1) + self.text, str(README), "exec"), ns)
        return ns

    def split(self, marker: str) -> tuple["Block", "Block"]:
        """The lines before the first line containing ``marker``, and the rest."""
        lines = self.text.splitlines(keepends=True)
        at = next((i for i, line in enumerate(lines) if marker in line), None)
        assert at is not None, f"README.md block at line {self.line}: no line contains {marker!r}"
        return Block(self.line, "".join(lines[:at])), Block(self.line + at, "".join(lines[at:]))


def _located() -> list[Block]:
    text = README.read_text(encoding="utf-8")
    found = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        found.append(Block(text.count("\n", 0, m.start(1)) + 1, m.group(1)))
    return found


def blocks() -> list[str]:
    """The text of every ```python fenced block of README.md, in order."""
    return [b.text for b in _located()]


def block(marker: str) -> Block:
    """The README block with a line containing ``marker``; fails naming ``marker`` unless exactly one has it."""
    found = [b for b in _located() if any(marker in line for line in b.text.splitlines())]
    assert len(found) == 1, (f"README.md: expected exactly one ```python block with a line containing {marker!r}, "
                             f"found {len(found)} (the example changed: update tests/test_readme.py with it)")
    return found[0]


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())

#----------------------------------------------------------------------------
# Ops and sampling on the analytic mixture.


def test_blocks_are_found():
    assert len(blocks()) >= 11 and all(text.strip() for text in blocks())


def test_ops_sampler_step_cpp_in_place(capsys):
    head, step = block('out=x, backend="cpp")').split("sampler_step(x, d, table")
    ns = head.run({})
    x, before = ns["x"], ns["x"].clone()
    assert ns["table"].dtype == torch.float64  # "float64 rows, built once on the host"
    step.run(ns)
    printed = capsys.readouterr().out  # the comment's {'reference': None, 'cpp': None, ...}
    assert "'reference': None" in printed and "'cpp': None" in printed, printed
    assert ns["x"] is x, "sampler_step(..., out=x) returns x itself"
    assert not torch.equal(x, before), "the in-place step wrote nothing into x"
    # a = 0.9, b = 0.1, s = 0.05 with Philox noise of seed 7: the float64-capable reference computes the same step
    ref = ns["sampler_step"](before, ns["d"], ns["table"], 0, seed=torch.tensor([7]), backend="reference")
    torch.testing.assert_close(x, ref)
    noise = (x - 0.9 * before - 0.1 * ns["d"]) / 0.05
    assert 0.9 < float(noise.std()) < 1.1 and abs(float(noise.mean())) < 0.05


def _run_gmm_heun() -> dict:
    return block('samples = diffkern.sample(gmm, x, sigmas, "heun", seed=0)').run({})


def test_sample_heun_on_the_demo_mixture():
    ns = _run_gmm_heun()
    gmm, sigmas, x, samples = ns["gmm"], ns["sigmas"], ns["x"], ns["samples"]
    assert sigmas.shape == (21,) and sigmas.dtype == torch.float64 and float(sigmas[-1]) == 0.0
    assert 60 < float(x.std()) < 100, "diffkern.sample must not modify its initial state"
    assert samples.shape == x.shape == (4000, 2) and samples.dtype == x.dtype and _finite(samples)
    # 4000 exact-denoiser Heun samples: the mean is the mixture's within a few standard errors (about 0.02)
    torch.testing.assert_close(samples.double().mean(0), gmm.mean, rtol=0, atol=0.1)
    on_ring = float((samples.norm(dim=1) - 2).abs().lt(0.5).double().mean())  # the 8 modes of radius 2, std 0.1
    assert abs(on_ring - float(gmm.weights[:8].sum())) < 0.03, on_ring


def test_trajectories_and_callback(capsys):
    ns = _run_gmm_heun()
    start, n = ns["x"], len(ns["sigmas"]) - 1
    block('samples, traj = diffkern.sample(gmm, x, sigmas, "euler", record=True)').run(ns)
    traj, x = ns["traj"], ns["samples"]
    assert torch.equal(ns["x"], start)  # the callback run below starts from the same noise
    assert traj["x"].shape == (n + 1, *x.shape) and traj["denoised"].shape == (n, *x.shape)
    assert torch.equal(traj["x"][0], start) and torch.equal(traj["x"][-1], x)
    assert _finite(traj["x"]) and _finite(traj["denoised"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == n and lines[0] == f"0 {float(ns['sigmas'][0])}", lines[:2]


def test_k_diffusion_signature_with_extra_args():
    gmm = analytic.GaussianMixture.demo_2d()

    def model(x, sigma, cond):  # the mixture shifted by the condition: shows that extra_args reach the model
        return gmm(x - cond, sigma) + cond

    sigmas = diffkern.schedules.karras(20, 0.002, 80.0)
    # float64: the comparison below is then exact to rounding, which float32 at sigma = 80 is not
    x = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigmas[0]
    c = torch.tensor([10.0, -5.0], dtype=torch.float64).expand(2000, 2)
    ns = block('samplers.sample_dpmpp_2m(model, x, sigmas, extra_args={"cond": c}').run(
        {"model": model, "x": x, "sigmas": sigmas, "c": c})
    x0 = ns["x0"]
    assert x0.shape == x.shape and x0.dtype == x.dtype and _finite(x0)
    # the ODE of the shifted mixture is the mixture's ODE shifted, and DPM-Solver++(2M) is exact for constant D:
    # the run equals the unconditioned run from x - c, shifted by c (which it would not if cond were dropped)
    plain = ns["samplers"].sample_dpmpp_2m(gmm, x - c, sigmas, disable=True, seed=0)
    torch.testing.assert_close(x0, plain + c, rtol=0, atol=1e-8)

#----------------------------------------------------------------------------
# IADB.

DATA = 0.5  # the IADB examples' data: a point mass, whose exact deblending means every variant must end on


def _iadb_point_mass(x, alpha):
    a = alpha.to(x.dtype).view(-1, *[1] * (x.dim() - 1))
    x0_bar = (x - a * DATA) / (1 - a)  # the model is never called at alpha = 1
    return x0_bar, torch.full_like(x, DATA)


def test_sample_iadb_variants():
    def model(x, alpha):
        x0_bar, x1_bar = _iadb_point_mass(x, alpha)
        return x1_bar - x0_bar

    x0 = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    alphas = [0.0, 0.1, 0.3, 0.55, 0.8, 0.95, 1.0]
    head, rest = block("diffkern.sample_iadb(model, torch.randn(16, 3, 64, 64), steps=128)").split("two_head")
    ns = head.run({"diffkern": diffkern, "torch": torch, "model": model})
    assert ns["x1"].shape == (16, 3, 64, 64) and _finite(ns["x1"])
    torch.testing.assert_close(ns["x1"], torch.full_like(ns["x1"], DATA), rtol=0, atol=1e-4)
    two_head, stochastic = rest.split('variant="stochastic"')
    for part in (two_head, stochastic):
        ns = part.run({"diffkern": diffkern, "torch": torch, "model": model, "two_head": _iadb_point_mass,
                       "x0": x0, "alphas": alphas})
        x1 = ns["x1"]
        assert x1.shape == x0.shape and x1.dtype == x0.dtype
        torch.testing.assert_close(x1, torch.full_like(x1, DATA), rtol=0, atol=1e-4)

#----------------------------------------------------------------------------
# HOLD and the likelihood.


def test_hold_sscs_on_the_eight_mode_mixture():
    ns = block('x = sample(model, proc, (20_000, 2), sampler="sscs", num_steps=200, seed=0)').run({})
    x, mix = ns["x"], ns["mix"]
    assert x.shape == (20000, 2) and _finite(x)
    # each sample's nearest mode: the masses come out near the weights 1/36 .. 8/36 (README: within 0.006; one
    # standard error is about 0.003 here)
    nearest = torch.cdist(x.double(), mix.means).argmin(1)
    masses = torch.bincount(nearest, minlength=8).double() / len(x)
    torch.testing.assert_close(masses, mix.weights, rtol=0, atol=0.015)


def test_log_likelihood_of_points():
    points = torch.tensor([[2.0, 0.0], [0.0, -0.3], [1.0, 0.5]])
    ns = block("res = log_likelihood(gmm, points").run({"points": points})
    res, gmm = ns["res"], ns["gmm"]
    assert res.log_prob.shape == res.stderr.shape == (3,) and _finite(res.log_prob) and bool((res.stderr > 0).all())
    exact = gmm.log_prob(points.double())
    assert bool(((res.log_prob - exact).abs() < 5 * res.stderr + 0.05).all()), (res.log_prob, res.stderr, exact)

#----------------------------------------------------------------------------
# diffusers: the tiny random Stable Diffusion pipeline of test_diffusers_pipelines.py.


def _sd_pipe(tiny_sd):
    import diffusers

    # the scheduler a Stable Diffusion v1 checkpoint ships (PNDM), whose config the README's from_config reads
    return tiny_sd(diffusers.PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                           skip_prk_steps=True, steps_offset=1))


def _assert_image(image, size=16):
    from PIL import Image

    if isinstance(image, Image.Image):
        assert image.size == (size, size) and image.mode == "RGB"
    else:
        assert isinstance(image, torch.Tensor) and image.shape[-2:] == (size, size) and _finite(image)


def test_diffusers_level1_scheduler(tiny_sd):
    # "a red fox" runs as written: the tiny vocabulary lacks "e", "f" and "x", which the CLIP tokenizer maps to its
    # unknown token (here <|endoftext|>), so the prompt still encodes to valid ids
    pipe = _sd_pipe(tiny_sd)
    ns = block("dkd.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)").run(
        {"torch": torch, "pipe": pipe})
    assert type(pipe.scheduler) is ns["dkd"].DPMSolverMultistepScheduler
    _assert_image(ns["image"])


def test_diffusers_level2_accelerate(tiny_sd):
    # in the README's order: the pipeline already runs level 1's scheduler
    ns = block("dkd.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)").run(
        {"torch": torch, "pipe": _sd_pipe(tiny_sd)})
    pipe = ns["pipe"]
    block("fast = dkd.accelerate(pipe)").run(ns)
    assert ns["fast"].unet is pipe.unet  # other attributes forward to the pipeline
    _assert_image(ns["image"])


def test_diffusers_unet_denoiser_with_guidance(tiny_sd):
    pipe = _sd_pipe(tiny_sd)
    unet, scheduler = pipe.unet, pipe.scheduler
    sigmas = diffkern.schedules.karras(4, 0.03, 14.6)  # inside the scaled-linear schedule's sigma range
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=gen) * sigmas[0]
    tokens = pipe.tokenizer.model_max_length
    c, u = (torch.randn(2, tokens, unet.config.cross_attention_dim, generator=gen) for _ in range(2))
    code = block("wrappers.DiffusersUNetDenoiser(unet, scheduler, guidance_scale=7.5)")
    names = {"diffkern": diffkern, "unet": unet, "scheduler": scheduler, "sigmas": sigmas}
    out = code.run({**names, "x": x, "c": c, "u": u})["x"]
    assert out.shape == x.shape and out.dtype == x.dtype and _finite(out)
    same = code.run({**names, "x": x, "c": u, "u": u})["x"]
    assert not torch.allclose(out, same), "the condition and the guidance do not reach the UNet"

#----------------------------------------------------------------------------
# CUDA graphs.


@pytest.mark.cuda
def test_cuda_graph_sampling():
    diffusers = pytest.importorskip("diffusers")  # before tiny_unet, which exists only with diffusers
    from diffkern import graphs

    graphs.clear()
    unet, scheduler = tiny_unet().cuda(), diffusers.DDIMScheduler()
    head, rest = block('y = diffkern.sample(model, x, sigmas, "dpmpp_2m", seed=0, graph=True)').split("seed=0, graph")
    try:
        ns = head.run({"unet": unet, "scheduler": scheduler})
        x = ns["x"]
        rest.run(ns)
        y = ns["y"]
        assert y.shape == x.shape == (8, 3, 32, 32) and y.is_cuda and _finite(y)
        assert graphs.info()["captures"] == 1 and graphs.info()["replays"] == 2  # capture + replay, then replay
        eager = diffkern.sample(ns["model"], x, ns["sigmas"], "dpmpp_2m", seed=1)
        assert torch.equal(y, eager), "the replay must be bitwise the eager loop"
    finally:
        graphs.clear()  # the capture keeps the UNet alive
