"""Sample quality, measured: a kernel two-sample statistic between generated and held-out images.

The statistic is the unbiased squared maximum mean discrepancy (Gretton et al. 2012, JMLR 13,
"A Kernel Two-Sample Test", eq. 3) with a Gaussian kernel ``k(a, b) = exp(-|a - b|^2 / (2 h^2))``.
It is 0 in expectation when both sets come from the same distribution and can dip slightly below 0
by chance. It is computed in two spaces:

- ``mmd_pixels``: on the raw 16x16 pixels;
- ``mmd_features``: on the 64-d penultimate layer of a small digit classifier trained on the
  training split (``diffkern/data/digits_classifier.safetensors``), a KID-like "perceptual" space.

The bandwidth ``h`` is the median pairwise distance within the reference set (the median heuristic,
Gretton et al. section 8), fixed by the reference alone so that scores of different samplers are
on one scale. ``confidence`` (mean top-class probability of the classifier) says how recognisable
the samples are as digits.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .models import builtin

CLASSIFIER = os.path.join(builtin.DATA_DIR, "digits_classifier.safetensors")

#----------------------------------------------------------------------------
# The statistic.


def pairwise_sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D), (M, D) -> (N, M) squared Euclidean distances, float64."""
    a, b = a.double(), b.double()
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return d.clamp_min(0)


def median_bandwidth(ref: torch.Tensor) -> float:
    """Median pairwise distance between distinct rows of ``ref`` (N, D), N >= 2."""
    if ref.dim() != 2 or ref.shape[0] < 2:
        raise ValueError(f"ref: expected shape (N >= 2, D), got {tuple(ref.shape)}")
    d2 = pairwise_sq_dists(ref, ref)
    i, j = torch.triu_indices(ref.shape[0], ref.shape[0], offset=1)
    return float(d2[i, j].median().sqrt())


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> float:
    """Unbiased MMD^2 between samples x (N, D) and y (M, D), N, M >= 2, Gaussian kernel of width ``bandwidth``."""
    for name, t in (("x", x), ("y", y)):
        if t.dim() != 2 or t.shape[0] < 2:
            raise ValueError(f"{name}: expected shape (N >= 2, D), got {tuple(t.shape)}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"y: expected {x.shape[1]} features like x, got {y.shape[1]}")
    if not bandwidth > 0:
        raise ValueError(f"bandwidth: expected > 0, got {bandwidth}")
    n, m = x.shape[0], y.shape[0]
    g = -0.5 / bandwidth ** 2
    kxx = (pairwise_sq_dists(x, x) * g).exp()
    kyy = (pairwise_sq_dists(y, y) * g).exp()
    kxy = (pairwise_sq_dists(x, y) * g).exp()
    xx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    yy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(xx + yy - 2 * kxy.mean())

#----------------------------------------------------------------------------
# The feature extractor: a small CNN digit classifier.


class DigitClassifier(nn.Module):
    """(B, 1, 16, 16) images in [-1, 1] -> (B, 10) logits; ``features`` gives the (B, 64) penultimate layer."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 16, 8, 8)
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, 4, 4)
            nn.Flatten(), nn.Linear(512, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_classifier(path: str | None = None) -> DigitClassifier:
    """The shipped feature classifier (or one written by ``diffkern.train.train_classifier``), CPU, eval."""
    from safetensors.torch import load_file

    path = CLASSIFIER if path is None else path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"classifier: no such file {path!r}")
    clf = DigitClassifier()
    clf.load_state_dict(load_file(path))
    return clf.eval().requires_grad_(False)

#----------------------------------------------------------------------------
# The score.


class Scorer:
    """Scores image sets against a fixed reference set (default: the held-out digits).

    ``Scorer()(samples)`` -> dict with ``mmd_pixels``, ``mmd_features``, ``confidence``; samples are
    (N, 1, 16, 16), N >= 2, any float dtype and device; they are clamped to [-1, 1] (as displayed) and
    scored on the CPU, distances in float64.
    """

    def __init__(self, reference: torch.Tensor | None = None, classifier: DigitClassifier | None = None):
        self.reference = builtin.digits("heldout")[0] if reference is None else reference.detach().float().cpu()
        self.classifier = load_classifier() if classifier is None else classifier
        self.ref_pixels = self.reference.flatten(1)
        self.ref_features = self._features(self.reference)
        self.h_pixels = median_bandwidth(self.ref_pixels)
        self.h_features = median_bandwidth(self.ref_features)

    @torch.no_grad()
    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images)

    @torch.no_grad()
    def __call__(self, samples: torch.Tensor) -> dict:
        if samples.dim() != 4 or tuple(samples.shape[1:]) != tuple(self.reference.shape[1:]):
            raise ValueError(f"samples: expected shape (N, {', '.join(map(str, self.reference.shape[1:]))}), "
                             f"got {tuple(samples.shape)}")
        if samples.shape[0] < 2:  # the unbiased MMD needs two samples
            raise ValueError(f"samples: expected N >= 2 images (the unbiased MMD needs two), got {samples.shape[0]}")
        x = samples.detach().float().cpu()
        if not torch.isfinite(x).all():
            raise ValueError("samples: values must be finite")
        x = x.clamp(-1, 1)  # scored as the images they are shown as
        feats = self._features(x)
        probs = self.classifier.head(feats).softmax(1)
        return {"mmd_pixels": mmd2(x.flatten(1), self.ref_pixels, self.h_pixels),
                "mmd_features": mmd2(feats, self.ref_features, self.h_features),
                "confidence": float(probs.max(1).values.mean())}


def baselines(n: int, seed: int = 0) -> dict:
    """Reference image sets (n, 1, 16, 16) for reading scores: ``train`` (n training images: the floor a
    perfect generator reaches), ``blurred`` (those images blurred by a Gaussian of 1.5 pixels: right
    layout, no strokes), ``noise`` (standard normal pixels)."""
    from torch.nn import functional as F

    gen = torch.Generator().manual_seed(seed)
    train = builtin.digits("train")[0]
    pick = train[torch.randperm(train.shape[0], generator=gen)[:n]]
    r = torch.arange(-3, 4, dtype=torch.float32)
    k = torch.exp(-r ** 2 / (2 * 1.5 ** 2))
    k = (k[:, None] * k[None, :] / k.sum() ** 2)[None, None]  # (1, 1, 7, 7), sums to 1
    blurred = F.conv2d(F.pad(pick, (3, 3, 3, 3), mode="replicate"), k)
    noise = torch.randn(pick.shape, generator=gen)
    return {"train": pick, "blurred": blurred, "noise": noise}


def nearest_train_distance(images: torch.Tensor) -> float:
    """Mean over ``images`` (N, 1, 16, 16) of the RMS pixel distance to the nearest training image
    (clamped to [-1, 1] first): 0 for copies of the training set. The held-out digits score 0.18 and
    100 samples of the built-in model (GE, 20 steps) 0.21: it generalises, where the optimal
    denoiser copies (Chen et al. 4.4)."""
    train = builtin.digits("train")[0].flatten(1)
    x = images.detach().float().cpu().clamp(-1, 1).flatten(1)
    if x.shape[1] != train.shape[1]:
        raise ValueError(f"images: expected {train.shape[1]} pixels per image, got {x.shape[1]}")
    d2 = pairwise_sq_dists(x, train).min(1).values  # (N,)
    return float((d2 / x.shape[1]).sqrt().mean())
