"""Test helpers shared by the suite: input makers and the tolerance rule (``style-study.md`` 11.3).

The rule: a backend's error against the float64 reference may be at most twice the error of the
reference itself run in the low dtype (the eager error), plus a small per-dtype floor scaled by the
output's magnitude. Tolerances are never loosened to make a test pass.
"""
from __future__ import annotations

import torch

# Floors (relative to max(1, |reference|)). bfloat16 allows one ulp (2**-7): Triton's interpreter
# truncates float32 -> bfloat16 where torch rounds to nearest even.
FLOORS = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 2 ** -7}
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Awkward shapes: odd sizes, size 1, empty, a non-power-of-two last dimension, 1-D.
SHAPES = ((2, 3, 5, 7), (1, 1, 1, 1), (0, 3, 4, 4), (3, 1025), (1, 123), (4, 2, 9, 17), (5,))


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    diff = (a.double() - b.double()).abs()
    diff = torch.where(torch.isnan(a.double()) & torch.isnan(b.double()), 0.0, diff)
    return float(diff.max())


def assert_matches_reference(actual: torch.Tensor, ref64: torch.Tensor, eager: torch.Tensor, what: str = "") -> None:
    """``max|actual - ref64| <= 2*max|eager - ref64| + floor[dtype]*max(1, max|ref64|)``."""
    assert actual.shape == ref64.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    assert actual.dtype == eager.dtype, f"{what}: dtype {actual.dtype} != {eager.dtype}"
    err = max_err(actual, ref64)
    err_eager = max_err(eager, ref64)
    scale = max(1.0, float(ref64.abs().max())) if ref64.numel() else 1.0
    bound = 2 * err_eager + FLOORS[actual.dtype] * scale
    assert err <= bound, f"{what}: max error {err:.3e} > bound {bound:.3e} (eager error {err_eager:.3e}, {actual.dtype})"


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """A non-contiguous view with t's values (transposed storage), for stride tests."""
    if t.dim() < 2:
        return torch.stack([t, t], dim=-1)[..., 0]
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)

#----------------------------------------------------------------------------
# Input makers, one per op family (fresh random values from a seeded generator; never all-equal).

MIXED_DTYPES = ((torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.bfloat16, torch.float32),
                (torch.float16, torch.float32), (torch.float64, torch.float32))  # (state dtype, model dtype)


def make_tensor(shape, dtype=torch.float32, *, seed: int = 0, scale: float = 1.0, device="cpu",
                contiguous: bool = True) -> torch.Tensor:
    """Standard normals times ``scale`` drawn in float64 then cast; a non-contiguous view if asked."""
    gen = torch.Generator().manual_seed(seed)
    t = (torch.randn(tuple(shape), generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)
    return t if contiguous else noncontiguous(t)


def random_table(rows: int = 3, *, seed: int = 0, clip: float = float("inf"), scale: float = 1.5,
                 history2: bool = False, history3: bool = False, **fixed: float) -> torch.Tensor:
    """A valid float64 ``(rows, NCOEF)`` coefficient table with every slot random and non-zero.

    Slots a, b, g, c, s, p, q, e, f (and c2, c3 when ``history2``, ``history3``; else 0, so no second or third
    history is needed) are
    uniform in ``[-scale, scale]``, w in ``[0, 8]`` (CFG scales in use), clip is ``clip`` (inf: none);
    ``fixed`` pins slots (by name) to one value in every row.
    """
    from diffkern.ops import coefs

    gen = torch.Generator().manual_seed(seed)
    names = [n for n in coefs.SLOT_NAMES if (n != "c2" or history2) and (n != "c3" or history3)]
    out = []
    for _ in range(rows):
        vals = ((torch.rand(len(names), generator=gen, dtype=torch.float64) * 2 - 1) * scale).tolist()
        named = dict(zip(names, vals))
        named["w"] = (named["w"] / scale + 1) * 4
        named["clip"] = clip
        named.update(fixed)
        out.append(coefs.row(**named))
    return coefs.table(out)


def sampler_step_inputs(shape, dtype=torch.float32, *, model_dtype=None, seed: int = 0, cfg: bool = True,
                        history: bool = True, history2: bool = False, history3: bool = False, noise: str = "philox",
                        per_sample_seed: bool = False, contiguous: bool = True, clip: float = 1.0, rows: int = 3,
                        **fixed: float) -> dict:
    """Keyword arguments of :func:`diffkern.ops.sampler_step` (without outputs or backend).

    ``history2``, ``history3``: also a second (third) history tensor, with a random non-zero c2 (c3) in the table.

    ``noise``: "philox" (seed tensor, (B,) if ``per_sample_seed`` else (1,)) or "explicit" (a noise
    tensor). The step is the last row of a ``rows``-row table so a backend must index the table.
    ``clip=1.0`` clips a good fraction of D (its entries are ~N(0, 4)).
    """
    model_dtype = model_dtype or dtype

    def t(k, dt, scale=1.0):
        return make_tensor(shape, dt, seed=seed * 10 + k, scale=scale, contiguous=contiguous)

    kw = {"x": t(0, dtype), "model_out": t(1, model_dtype),
          "coef": random_table(rows, seed=seed, clip=clip, history2=history2, history3=history3, **fixed), "step": rows - 1}
    if cfg:
        kw["model_out_uncond"] = t(2, model_dtype)
    if history:
        kw["history"] = t(3, dtype)
    if history2:
        kw["history2"] = t(5, dtype)
    if history3:
        kw["history3"] = t(6, dtype)
    if noise == "explicit":
        kw["noise"] = t(4, dtype)
    else:
        batch = shape[0] if len(shape) and per_sample_seed else 1
        kw["seed"] = torch.arange(batch, dtype=torch.int64) * 7919 + 12345 + seed
    return kw


def _double(t):
    return None if t is None else t.double()


def check_sampler_step(backend: str, *, what: str = "", x0: bool = True, history_new: bool = True,
                       out=None, **kw) -> torch.Tensor:
    """Run ``sampler_step`` on ``backend`` with every output and check each against the float64 reference.

    ``kw``: the inputs (see :func:`sampler_step_inputs`). Outputs are pre-filled with NaN so an element
    a backend does not write fails. ``out``: an output buffer to use (e.g. a non-contiguous view; it is
    overwritten with NaN first), else a new one. Returns ``out``.
    """
    from diffkern.ops import sampler_step, sampler_step_reference

    x, model_out, coef, step = kw.pop("x"), kw.pop("model_out"), kw.pop("coef"), kw.pop("step")
    seed = kw.get("seed")
    ref64 = sampler_step_reference(x.double(), model_out.double(), coef, step, seed=seed,
                                   **{k: _double(v) for k, v in kw.items() if k != "seed"})
    eager = sampler_step_reference(x, model_out, coef, step, **kw)
    out = torch.full_like(x, float("nan")) if out is None else out.fill_(float("nan"))
    x0_out = torch.full_like(x, float("nan")) if x0 else None
    h_out = torch.full_like(x, float("nan")) if history_new else None
    res = sampler_step(x, model_out, coef, step, out=out, x0_out=x0_out, history_out=h_out, backend=backend, **kw)
    assert res is out, f"{what}: sampler_step must return the given out"
    for name, actual, r64, e in (("out", out, ref64[0], eager[0]), ("x0_out", x0_out, ref64[1], eager[1]),
                                 ("history_out", h_out, ref64[2], eager[2])):
        if actual is not None:
            assert_matches_reference(actual, r64, e, f"{what} [{backend}] {name}")
    return out


def check_iadb_blend(backend: str, x0: torch.Tensor, x1: torch.Tensor, alpha: torch.Tensor, *, what: str = "",
                     target: bool = True) -> torch.Tensor:
    """Run ``iadb_blend`` on ``backend`` (with ``target_out`` if asked) against the float64 reference."""
    from diffkern.ops import iadb_blend, iadb_blend_reference

    ref64 = iadb_blend_reference(x0.double(), x1.double(), alpha.double())
    eager = iadb_blend_reference(x0, x1, alpha)
    out = torch.full_like(x0, float("nan"))
    target_out = torch.full_like(x0, float("nan")) if target else None
    assert iadb_blend(x0, x1, alpha, out=out, target_out=target_out, backend=backend) is out
    assert_matches_reference(out, ref64[0], eager[0], f"{what} [{backend}] out")
    if target:
        assert_matches_reference(target_out, ref64[1], eager[1], f"{what} [{backend}] target_out")
    return out


def usable_backends(device_type: str = "cpu") -> list[str]:
    """Backends that can run on ``device_type`` in this build (same rule as ``tests/conftest.py``)."""
    from diffkern.ops import available

    return [b for b, why in available(device_type).items() if why is None]


def gpu_compile_report(script: str, cache_dir) -> dict:
    """Run ``script`` (Python that compiles Triton kernels for a GPU target and prints a JSON report) in a
    subprocess without ``TRITON_INTERPRET``, so ``@triton.jit`` gives real kernels; returns the report.

    ``cache_dir`` becomes ``TRITON_CACHE_DIR``: a cold compile, and nothing left in the user's cache. Skips
    the calling test when this Triton build has no NVIDIA backend."""
    import json
    import os
    import subprocess
    import sys

    import pytest
    import triton

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache_dir)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)
