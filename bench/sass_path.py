"""Instructions per element of a CUDA kernel's hot loop, counted in its sm_90 SASS (no GPU needed).

Compiles a ``csrc/cuda/*.cu`` file with nvcc (``-O3 -cubin``), disassembles it with nvdisasm's control-flow
listing (the nvdisasm that Triton's package ships), takes the grid-stride loop (the backward branch of the
widest span) of the kernel whose mangled name contains ``--kernel``, and counts the cheapest path from the
loop head to that branch that passes through the chosen ``MUFU.RSQ`` instructions (the square roots of the
Box-Muller pairs: a path through them draws noise), each issued instruction counting 1, predicated or not; a
``CALL`` (a math slow path) ends a path. The count divided by ``--per-iter`` (elements per loop iteration)
is the figure quoted in the sources and the README, e.g.

    python bench/sass_path.py csrc/cuda/hold.cu --kernel hold_transition_kernelIffLi4ELi3E --rsq 0,1,2,3,4,5 --per-iter 4

Without ``--rsq`` it lists the loop's RSQ positions, to pick them (a draw of a Box-Muller pair is one RSQ;
alternative branches of one draw show as separate RSQs). A static count: not a timing, and not a test.
"""
from __future__ import annotations

import argparse
import heapq
import os
import re
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def nvdisasm() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")


def listing(source: str, arch: str = "sm_90") -> str:
    """nvdisasm -c of ``source`` compiled for ``arch``."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        subprocess.run([os.environ.get("NVCC", "nvcc"), "-O3", "-std=c++20", "-cubin", f"-arch={arch}",
                        "-I", os.path.join(REPO, "csrc"), "-o", cubin, source], check=True)
        return subprocess.run([nvdisasm(), "-c", cubin], check=True, capture_output=True, text=True).stdout


def parse(text: str, kernel: str) -> tuple[str, list[str], dict[str, int]]:
    """(mangled name, instructions, label -> instruction index) of the first function matching ``kernel``."""
    lines = text.splitlines()
    heads = [k for k, line in enumerate(lines) if line.startswith(".text.") and kernel in line]
    if not heads:
        raise SystemExit(f"--kernel: no function name contains {kernel!r}")
    name = lines[heads[0]][len(".text."):].rstrip(":")
    ins, labels = [], {}
    for line in lines[heads[0] + 1:]:
        if line.startswith("//----") or line.startswith(".text."):
            break
        if m := re.match(r"^(\.L_x_\d+):", line):
            labels[m.group(1)] = len(ins)
        elif m := re.match(r"\s*/\*[0-9a-f]+\*/\s+(.*?)\s*;", line):
            ins.append(m.group(1))
    return name, ins, labels


def _target(s: str) -> str | None:
    m = re.search(r"`\((\.L_x_\d+)\)", s)
    return m.group(1) if m else None


def _distances(ins, labels, src: int, stop: int) -> dict[int, int]:
    """Instructions issued from ``src`` to each reachable index, not going past ``stop`` (the back edge)."""
    dist, heap = {src: 0}, [(0, src)]
    while heap:
        d, k = heapq.heappop(heap)
        if d > dist[k] or k == stop or "CALL" in ins[k]:
            continue
        s, succ = ins[k], []
        if re.search(r"\bBRA\b", s):
            succ.append(labels[_target(s)])
            if s.startswith("@"):
                succ.append(k + 1)
        elif "EXIT" in s:
            if s.startswith("@"):
                succ.append(k + 1)
        else:
            succ.append(k + 1)
        for n in succ:
            if n < len(ins) and d + 1 < dist.get(n, float("inf")):
                dist[n] = d + 1
                heapq.heappush(heap, (d + 1, n))
    return dist


def hot_path(ins, labels, picks: list[int]) -> tuple[int, list[int]]:
    """(instructions per loop iteration through RSQs ``picks``, the loop's RSQ offsets from its head)."""
    backs = [(k - labels[_target(s)], k) for k, s in enumerate(ins)
             if re.search(r"\bBRA\b", s) and _target(s) in labels and labels[_target(s)] <= k]
    if not backs:
        raise SystemExit("no loop in this function")
    back = max(backs)[1]
    head = labels[_target(ins[back])]
    rsq = [k for k in range(head, back + 1) if "MUFU.RSQ" in ins[k]]
    chain = [head] + [rsq[p] for p in picks] + [back]
    total = sum(_distances(ins, labels, a, back).get(b, float("inf")) for a, b in zip(chain, chain[1:])) + 1
    return total, [k - head for k in rsq]


def straight_path(ins, labels) -> tuple[int, int]:
    """(instructions, RSQs passed) of the cheapest path from a loop-free kernel's entry to an EXIT that
    passes through as many of its ``MUFU.RSQ`` as it can, in order (a Triton program: every noise draw)."""
    exits = [k for k, s in enumerate(ins) if "EXIT" in s]
    cur, total, used = 0, 0, 0
    for r in (k for k, s in enumerate(ins) if "MUFU.RSQ" in s):
        d = _distances(ins, labels, cur, len(ins)).get(r)
        if d is not None:  # an RSQ of a branch not taken after the previous one (a slow path) is skipped
            total, cur, used = total + d, r, used + 1
    dist = _distances(ins, labels, cur, len(ins))
    return total + min(dist.get(e, 10**9) for e in exits) + 1, used


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", help="a csrc/cuda/*.cu file")
    p.add_argument("--kernel", required=True, help="a substring of the kernel's mangled name")
    p.add_argument("--rsq", default="", help="comma-separated indices of the loop's MUFU.RSQ to pass through")
    p.add_argument("--per-iter", type=int, default=1, help="elements per loop iteration (the pack width V)")
    p.add_argument("--arch", default="sm_90")
    args = p.parse_args(argv)
    name, ins, labels = parse(listing(args.source, args.arch), args.kernel)
    picks = [int(v) for v in args.rsq.split(",") if v]
    total, rsq = hot_path(ins, labels, picks)
    print(f"{name}\n  loop RSQ offsets: {rsq}\n  through RSQ {picks}: {total} instructions per iteration = "
          f"{total / args.per_iter:.1f} per element")
    return 0


if __name__ == "__main__":
    sys.exit(main())
