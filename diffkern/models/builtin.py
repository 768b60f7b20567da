"""The built-in model: a small UNet denoiser trained on scikit-learn's 8x8 handwritten digits,
upscaled to 16x16, with its weights shipped in the package (``diffkern/data/digits.safetensors``).

Data: ``sklearn.datasets.load_digits`` (1,797 images, 0..16 grey levels, bundled with scikit-learn,
so nothing is downloaded), bilinearly upscaled to 16x16 and mapped to [-1, 1]. The split is fixed:
every sixth image (index % 6 == 0, 300 images) is held out for measuring sample quality; the other
1,497 train the model.
"""
from __future__ import annotations

import functools
import json
import math
import numbers
import os

import torch

from .._files import atomic_write
from ..wrappers import KarrasDenoiser
from .unet import TinyUNet

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
WEIGHTS = os.path.join(DATA_DIR, "digits.safetensors")
IMAGE_SHAPE = (1, 16, 16)
HELDOUT_EVERY = 6
# Sampling range for the built-in model: EDM's defaults (Karras et al. 2022, section 5).
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0

#----------------------------------------------------------------------------
# Data.


@functools.lru_cache(maxsize=None)
def _digits(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise RuntimeError("the digits data set needs scikit-learn (pip install scikit-learn)") from exc
    from torch.nn import functional as F

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8) in [0, 1]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 2 - 1).contiguous(), torch.tensor(bunch.target, dtype=torch.int64)


def digits(split: str = "train", size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as (images, labels): images float32 (N, 1, size, size) in [-1, 1], labels int64 (N,).

    ``split``: "train" (1,497 images), "heldout" (300: every sixth image) or "all" (1,797).
    """
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split: expected 'train', 'heldout' or 'all', got {split!r}")
    x, y = _digits(size)
    if split == "all":
        return x.clone(), y.clone()  # the cached copy stays pristine
    held = torch.arange(x.shape[0]) % HELDOUT_EVERY == 0
    keep = held if split == "heldout" else ~held
    return x[keep], y[keep]

#----------------------------------------------------------------------------
# Weights.


def make_denoiser(net: TinyUNet, sigma_data: float) -> KarrasDenoiser:
    """``D(x, sigma) = c_skip*x + c_out*net(c_in*x, ln(sigma)/4)`` (EDM preconditioning, Karras et al. 2022)."""
    return KarrasDenoiser(net, sigma_data=sigma_data, c_noise="edm")


def save_denoiser(model: KarrasDenoiser, path: str, info: dict | None = None) -> None:
    """Write the weights and config of ``model`` (from :func:`make_denoiser`) to a safetensors file, atomically."""
    from safetensors.torch import save_file

    meta = {"config": json.dumps(model.model.config), "sigma_data": repr(model.sigma_data),
            "info": json.dumps(info or {})}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_denoiser(path: str | None = None, *, device="cpu", dtype: torch.dtype = torch.float32) -> KarrasDenoiser:
    """Load a denoiser written by :func:`save_denoiser` (default: the shipped built-in weights).

    Returns a :class:`diffkern.wrappers.KarrasDenoiser` in eval mode without gradients: ``D(x, sigma)``
    with x of shape (B, 1, 16, 16) in ``dtype`` (the network's) and sigma a float or (B,) tensor.
    Its ``info`` dict holds the training record stored in the weights file.
    """
    from safetensors import SafetensorError, safe_open

    path = WEIGHTS if path is None else path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights: {path!r} is a directory, not a weights file" if os.path.isdir(path)
                                else f"weights: no such file {path!r}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as exc:  # not an Exception the CLI reports: name the file instead of a traceback
        raise ValueError(f"weights: {path!r} is not a safetensors file ({exc})") from None
    if "config" not in meta or "sigma_data" not in meta:
        raise ValueError(f"weights: {path!r} has no diffkern model config in its metadata")
    net = TinyUNet(**json.loads(meta["config"]))
    net.load_state_dict(tensors)
    model = make_denoiser(net, float(meta["sigma_data"])).to(device=device, dtype=dtype).eval().requires_grad_(False)
    model.info = json.loads(meta.get("info", "{}"))
    return model


def load_builtin(device="cpu", dtype: torch.dtype = torch.float32) -> KarrasDenoiser:
    """The shipped digits denoiser (see :mod:`diffkern.models.builtin`); sample it over
    ``[SIGMA_MIN, SIGMA_MAX]`` with inputs of shape (B, *IMAGE_SHAPE)."""
    return load_denoiser(None, device=device, dtype=dtype)


#----------------------------------------------------------------------------
# Sampling and pictures.


def schedule(steps: int, kind: str = "karras", sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
             rho: float = 7.0) -> torch.Tensor:
    """The sampling schedule: ``steps`` decreasing sigmas then 0, (steps+1,) float64 CPU.
    ``kind``: "karras" (rho) or "loglinear"."""
    from .. import schedules

    if kind == "karras":
        return schedules.karras(steps, sigma_min, sigma_max, rho)
    if kind == "loglinear":
        return schedules.loglinear(steps, sigma_min, sigma_max)
    raise ValueError(f"schedule: expected 'karras' or 'loglinear', got {kind!r}")


def generate(model, n: int, method: str = "ge", steps: int = 20, *, shape: tuple = IMAGE_SHAPE, seed: int = 0,
             backend: str | None = None, device="cpu", dtype: torch.dtype = torch.float32, sigmas=None,
             progress: bool = False, **knobs) -> torch.Tensor:
    """``n`` samples of ``model`` (``D(x, sigma)``) with ``method`` over ``steps`` steps of
    :func:`schedule` (or the given ``sigmas``). The initial noise comes from a CPU generator seeded
    with ``seed`` (same images on every device up to rounding); the sampler's noise from the Philox
    stream keyed by ``seed``. ``backend`` None means $DIFFKERN_BACKEND, else auto. Returns (n, *shape)
    in ``dtype`` on ``device``."""
    from ..sampling import sample

    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:  # numpy ints too
        raise ValueError(f"n: expected an int >= 1, got {n!r}")
    n = int(n)
    sigmas = schedule(steps) if sigmas is None else sigmas
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        from ..sampler_loop import seed_value

        seed_value(seed, n)  # out of range: name it here, not torch's 'Overflow when unpacking long long'
    # torch.Generator.manual_seed refuses numpy ints; sample() below validates the seed itself
    gen = torch.Generator().manual_seed(int(seed) if isinstance(seed, numbers.Integral) else seed)
    x = torch.randn((n, *shape), generator=gen, dtype=torch.float64) * float(sigmas[0])
    return sample(model, x.to(device=device, dtype=dtype), sigmas, method, backend=backend, seed=seed,
                  progress=progress, **knobs)


def save_grid(images: torch.Tensor, path: str, *, nrow: int | None = None, scale: int = 4, pad: int = 1) -> None:
    """Write images (B, C, H, W) with values in [-1, 1] (clamped), C = 1 or 3, as one PNG grid:
    ``nrow`` per row (default ceil(sqrt(B))), each pixel a ``scale`` x ``scale`` block, ``pad``-pixel
    grey gutters. Written to a temporary file and renamed onto ``path``."""
    from PIL import Image

    if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[0] < 1:
        raise ValueError(f"images: expected shape (B >= 1, 1 or 3, H, W), got {tuple(images.shape)}")
    b, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = -(-b // nrow)
    px = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    px = px.repeat_interleave(scale, 2).repeat_interleave(scale, 3)  # (B, C, H*scale, W*scale)
    hs, ws = h * scale + pad, w * scale + pad
    canvas = torch.full((c, rows * hs + pad, nrow * ws + pad), 96, dtype=torch.uint8)
    for k in range(b):
        r, q = divmod(k, nrow)
        canvas[:, pad + r * hs:pad + r * hs + h * scale, pad + q * ws:pad + q * ws + w * scale] = px[k]
    arr = canvas[0].numpy() if c == 1 else canvas.permute(1, 2, 0).contiguous().numpy()
    atomic_write(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))
