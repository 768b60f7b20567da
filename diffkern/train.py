"""Training of the built-in digits model (``diffkern train``) and of the quality metric's classifier.

The denoiser is trained as in EDM (Karras et al. 2022, section 5 and Table 1): noise levels drawn
log-normally, ``ln(sigma) ~ N(P_mean, P_std^2)``, loss ``lambda(sigma) * |D(y + sigma*n, sigma) - y|^2``
with ``lambda = (sigma^2 + sigma_data^2) / (sigma*sigma_data)^2`` (so the network's effective target
has unit variance), AdamW, a linear learning-rate warm-up then cosine decay, and an exponential
moving average (EMA) of the weights, which is what is shipped.

Deterministic given the seed (for one torch build and thread count): the initial weights come from
``torch.manual_seed(seed)`` inside ``fork_rng`` (the caller's global RNG is untouched) and every
batch, noise level and noise draw from one ``torch.Generator`` seeded with it.
"""
from __future__ import annotations

import copy
import math
import time

import torch

from ._files import atomic_write
from .models import builtin
from .models.unet import TinyUNet
from .wrappers import KarrasDenoiser

P_MEAN, P_STD = -1.2, 1.2  # EDM's log-normal noise-level distribution (Table 1)


def _lr(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * t))


def train_denoiser(steps: int = 3000, *, batch: int = 64, lr: float = 2e-3, seed: int = 0,
                   widths: tuple[int, ...] = (16, 32, 64), ema_decay: float = 0.999, warmup: int = 100,
                   progress: bool = False) -> KarrasDenoiser:
    """Train a :class:`TinyUNet` with EDM preconditioning on the training split of the digits.

    Returns the EMA denoiser (eval mode, no gradients, float32, CPU) with an ``info`` dict: the
    settings, the parameter count, the wall and CPU time (``seconds``, ``cpu_seconds``: on a shared
    machine the wall time says more about the other jobs) and the final loss.
    """
    if steps < 1 or batch < 1:
        raise ValueError(f"steps, batch: expected >= 1, got steps={steps}, batch={batch}")
    from tqdm.auto import tqdm

    data, _ = builtin.digits("train")  # (N, 1, 16, 16)
    sigma_data = round(float(data.std()), 2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = builtin.make_denoiser(TinyUNet(channels=data.shape[1], widths=widths), sigma_data)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    t0, cpu0 = time.perf_counter(), time.process_time()
    loss_avg = None
    bar = tqdm(range(steps), desc="train", disable=not progress, unit="step")
    for step in bar:
        y = data[torch.randint(data.shape[0], (batch,), generator=gen)]  # (batch, 1, 16, 16)
        sigma = (torch.randn(batch, generator=gen) * P_STD + P_MEAN).exp()  # (batch,)
        n = torch.randn(y.shape, generator=gen) * sigma[:, None, None, None]
        weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
        loss = (weight[:, None, None, None] * (model(y + n, sigma) - y) ** 2).mean()
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr, warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        beta = min(ema_decay, (1 + step) / (10 + step))  # short EMA memory while the weights move fast
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - beta)
        value = float(loss.detach())
        loss_avg = value if loss_avg is None else 0.98 * loss_avg + 0.02 * value
        if step % 20 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss_avg:.4f}")
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    ema.eval()
    ema.info = {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "widths": list(widths),
                "ema_decay": ema_decay, "warmup": warmup, "p_mean": P_MEAN, "p_std": P_STD,
                "sigma_data": sigma_data, "params": sum(p.numel() for p in ema.parameters()),
                "train_images": data.shape[0], "seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
                "final_loss": round(loss_avg, 4),
                "threads": torch.get_num_threads(), "torch": torch.__version__}
    return ema


def train_classifier(steps: int = 600, *, batch: int = 128, lr: float = 2e-3, seed: int = 0,
                     progress: bool = False):
    """Train the quality metric's :class:`diffkern.quality.DigitClassifier` on the training split
    (cross-entropy, AdamW, light random shifts). Returns (classifier in eval mode, held-out accuracy)."""
    from tqdm.auto import tqdm

    from .quality import DigitClassifier

    x, labels = builtin.digits("train")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = DigitClassifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    for step in tqdm(range(steps), desc="classifier", disable=not progress, unit="step"):
        idx = torch.randint(x.shape[0], (batch,), generator=gen)
        # One-pixel random shifts so that features do not hinge on exact placement.
        dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
        xb = torch.roll(x[idx], shifts=(dy, dx), dims=(2, 3))
        loss = torch.nn.functional.cross_entropy(clf(xb), labels[idx])
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr, 50)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    clf.eval().requires_grad_(False)
    xh, yh = builtin.digits("heldout")
    with torch.no_grad():
        accuracy = float((clf(xh).argmax(1) == yh).float().mean())
    return clf, accuracy


def save_classifier(clf, path: str) -> None:
    """Write the classifier's weights to ``path`` (safetensors), atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in clf.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))
