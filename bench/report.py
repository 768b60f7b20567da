"""What a benchmark run records and writes: its provenance (device, versions, commit, date, load) and the
writers (markdown table, CSV, PNG). ``bench/harness.py`` re-exports these for the bench scripts.
Importing this module has no side effects (matplotlib is imported by the plot writers).
"""
from __future__ import annotations

import csv
import datetime
import importlib
import math
import os
import platform
import re
import subprocess
from typing import Iterable, Sequence

import torch

from diffkern._host import cpu_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROVENANCE_COLUMNS = ("device_name", "cpu_model", "torch", "triton", "cuda", "cudnn", "python", "cuda_loader",
                      "git_sha", "timestamp", "threads", "loadavg_1m")

#----------------------------------------------------------------------------
# Provenance: where and on what the numbers were taken.


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({cpu_model()}, {os.cpu_count()} cores)"


def git_sha() -> str:
    """HEAD of the checkout (with ``-dirty`` when tracked files differ from it), else ``DIFFKERN_GIT_SHA`` (a
    copy of the tree without ``.git``, as on a lent GPU machine), else ``unknown``."""
    if os.environ.get("DIFFKERN_GIT_SHA"):
        return os.environ["DIFFKERN_GIT_SHA"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff-index", "--quiet", "HEAD", "--"], cwd=REPO, capture_output=True)
        return sha + ("-dirty" if dirty.returncode else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _version(package: str) -> str:
    try:
        return importlib.import_module(package).__version__
    except ImportError:
        return "none"


def cuda_loader(device: str) -> str:
    """Where the ``cuda`` backend's kernels came from on ``device``: ``aot`` (built into ``diffkern._C``),
    ``nvrtc`` (compiled at run time), else ``none`` (also on CPU, where nothing is probed)."""
    if not device.startswith("cuda"):
        return "none"
    from diffkern.ops import cuda_loader as loader

    return loader()[0] or "none"


def provenance(device: str, *packages: str) -> dict:
    """The provenance columns (``PROVENANCE_COLUMNS``) for a run on ``device``, then the version of each of
    ``packages`` (``none`` when it is not installed) under the package's name."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"device_name": device_name(device), "cpu_model": cpu_model(), "torch": torch.__version__,
            "triton": _version("triton"), "cuda": torch.version.cuda or "none", "cudnn": str(cudnn or "none"),
            "python": platform.python_version(), "cuda_loader": cuda_loader(device), "git_sha": git_sha(),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "threads": torch.get_num_threads(), "loadavg_1m": round(os.getloadavg()[0], 2),
            **{p: _version(p) for p in packages}}


def heading(what: str, prov: dict) -> str:
    """``# <what> on <device> (versions, threads, load, commit, time)``: the line above a printed table."""
    packages = [k for k in prov if k not in PROVENANCE_COLUMNS]  # the ones provenance() was asked for
    versions = [f"torch {prov['torch']}"] + [f"{k} {prov[k]}" for k in ("triton", *packages, "cuda", "cudnn")
                                             if prov[k] != "none"]
    if prov.get("cuda_loader", "none") != "none":
        versions.append(f"diffkern cuda kernels: {prov['cuda_loader']}")
    return (f"# {what} on {prov['device_name']} ({', '.join(versions)}, {prov['threads']} threads, "
            f"load average {prov['loadavg_1m']}, {prov['git_sha'][:12]}, {prov['timestamp']})")


def device_slug(device: str) -> str:
    """A folder name for the device: ``cpu-amd-epyc``, ``cuda-nvidia-h100-80gb-hbm3``."""
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else cpu_model()
    return re.sub(r"[^a-z0-9]+", "-", f"{device.split(':')[0]}-{name}".lower()).strip("-")

#----------------------------------------------------------------------------
# Writers.


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def to_markdown(rows: Iterable[dict], columns: Sequence[str]) -> str:
    """A GitHub markdown table of ``columns`` (floats to 3 significant digits)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(rows: Sequence[dict], path: str) -> str:
    """One row per result, every column of every row (provenance included); returns ``path``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot_lines(rows: Sequence[dict], path: str, *, x: str, y: str, series: str, panel: str, title: str,
               xlog: bool = True, ylog: bool = False, ylabel: str | None = None) -> str:
    """One panel per value of ``panel``, one line per value of ``series``; a PNG at ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys(r[panel] for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, p in zip(axes[0], panels):
        sub = [r for r in rows if r[panel] == p]
        for k, s in enumerate(dict.fromkeys(r[series] for r in sub)):
            pts = sorted((r[x], r[y]) for r in sub if r[series] == s)
            # matplotlib cycles 10 colours: past them, another line style and marker keeps every series distinct
            ax.plot([a for a, _ in pts], [b for _, b in pts], color=f"C{k % 10}", marker="os^"[k // 10 % 3],
                    linestyle=("-", "--", ":")[k // 10 % 3], label=str(s))
        if xlog:
            ax.set_xscale("log", base=2)
        if ylog:
            ax.set_yscale("log")
        ax.set_title(str(p))
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel or y)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_bars(labels: Sequence[str], values: Sequence[float], path: str, *, xlabel: str, title: str) -> str:
    """Horizontal bars (e.g. time in units of one tensor copy); a PNG at ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.5 * len(labels) + 1.2))
    ax.barh(list(labels), list(values))
    for i, v in enumerate(values):
        ax.annotate(f"{v:.3g}", (v, i), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
    if min(values) > 0 and max(values) / min(values) > 20:  # several orders of magnitude: log axis
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.invert_yaxis()
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def _save(fig, path: str) -> str:
    """Lay out ``fig``, write it as a PNG at ``path`` (folders made), close it; returns ``path``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
