"""Checks every fused sampler's test file runs the same way: each CPU backend against the float64 reference loop
(the project's tolerance rule in float32, the float64 floor in float64), and awkward shapes (batch 1 with an odd
size, an odd 4-D shape, a non-contiguous input) on a Gaussian mixture of the shape's dimension; and k-diffusion's
ancestral split for the textbook loops the tests write."""
import math

import torch

from diffkern.sampling import sample
from diffkern.testing import assert_matches_reference, noncontiguous

REF = "reference"
AWKWARD = [((1, 13), True), ((3, 1, 7, 5), True), ((5, 3), False)]
AWKWARD_IDS = ["batch1-odd", "odd-4d", "noncontiguous"]


def check_backend(model, x, sigmas, method: str, backend: str, **kw) -> None:
    """``method`` on ``backend`` against the reference backend: float32 by the tolerance rule (float32 reference run
    as the yardstick), float64 to the float64 floor; ``x`` is float64."""
    ref64 = sample(model, x, sigmas, method, backend=REF, **kw)
    eager = sample(model, x.float(), sigmas, method, backend=REF, **kw)
    got = sample(model, x.float(), sigmas, method, backend=backend, **kw)
    assert_matches_reference(got, ref64, eager, f"{method} {kw} [{backend}]")
    got64 = sample(model, x, sigmas, method, backend=backend, **kw)
    assert_matches_reference(got64, ref64, ref64, f"{method} {kw} [{backend}] float64")


def check_awkward_shape(make_model, shape, contiguous: bool, sigmas, method: str, backend: str, x_seed: int = 2,
                        **kw) -> None:
    """``method`` on a float32 state of ``shape`` (a non-contiguous view unless ``contiguous``) against the float64
    reference, with ``make_model(dim)`` the denoiser for states of ``dim`` elements per sample and the state drawn
    with ``x_seed``; the output is contiguous and of the state's shape. ``kw``: sampler arguments."""
    model = make_model(math.prod(shape[1:]))
    x64 = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(x_seed)) * 10.0
    x32 = x64.float() if contiguous else noncontiguous(x64.float())
    ref64 = sample(model, x64, sigmas, method, backend=REF, **kw)
    eager = sample(model, x64.float(), sigmas, method, backend=REF, **kw)
    got = sample(model, x32, sigmas, method, backend=backend, **kw)
    assert got.shape == x64.shape and got.is_contiguous()
    assert_matches_reference(got, ref64, eager, f"{method} {shape} [{backend}]")


def ancestral_step(sigma, sigma_next, eta):
    """k-diffusion's ``get_ancestral_step``."""
    if not eta:
        return sigma_next, 0.0
    up = min(sigma_next, eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
    return (sigma_next ** 2 - up ** 2) ** 0.5, up
