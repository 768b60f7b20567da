"""The shared setup of the CUDA no-sync tests (tests/test_leftovers16*.py): the schedule and state on the GPU, a
denoiser with no host read of its own, and the sync-debug mode switched to "error" from inside the loop (the host read
of the schedule comes before it) and back to "default" afterwards, whatever happens."""
import contextlib

import torch


def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x / (1 + sigma^2) per sample: x (B, D), sigma (B,); no host read."""
    return x / (1 + sigma[:, None] ** 2)


def on_cuda(sigmas: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas, x) copied to the current GPU."""
    dev = torch.device("cuda")
    return sigmas.to(dev), x.to(dev)


def forbid_syncs() -> None:
    """From here on a host synchronisation raises; call it from the loop's first callback or noise_sampler call."""
    torch.cuda.set_sync_debug_mode("error")


@contextlib.contextmanager
def syncs_restored():
    """Runs the body, then puts the sync-debug mode back to "default" (also when the body raises)."""
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
