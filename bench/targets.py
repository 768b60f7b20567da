"""The open issues' GPU targets and benchmark matrices, read off a results folder's CSVs (no GPU, no torch).

    python bench/targets.py bench/results/cuda-nvidia-h100-80gb-hbm3     # writes targets.md and targets.csv there

Issue 5 (``graphs.csv``, and ``graphs_compile.csv`` from a later run of the compile column): per model, dtype,
batch and N, (c) graph within 3% of (e) floor, (c) at least 2x faster than (a) diffusers at batch 1, (c) no
slower than (d) compile (each ratio from one run: a compile row is compared with the graph row of its own run),
and (c)'s warm-up beside (d)'s compile time. Issue 7: the same table's diffusers, diffkern_sched and
accelerated columns. Issue 6 (``sampler_step.csv``, ``iadb_blend.csv``, ``hold.csv``): per op, dtype and size
from ``TARGET_MIN_NUMEL``, the faster of ``fused:cuda`` and ``fused:triton`` reaches 90% of the copy bandwidth of
the same size and dtype, is at least 5x faster than the eager sequence and no slower than ``torch.compile``.
Every expected row that no CSV holds is listed as missing: a matrix with holes cannot close an issue.
A target is ``pass``, ``FAIL`` or ``n/a`` (a row it needs is missing).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys

TARGET_MIN_NUMEL = 2**24  # bench.harness.TARGET_MIN_NUMEL (not imported: this module needs no torch)
SIZES = [2**p for p in range(20, 29, 2)]  # issue 6: 2**20 .. 2**28 elements
DTYPES = ("float32", "bfloat16")
GRAPH_MODELS, GRAPH_BATCHES, GRAPH_STEPS = ("cifar10", "small"), (1, 8, 64), (10, 50)
GRAPH_IMPLS = ("floor", "graph", "eager", "diffusers", "diffkern_sched", "accelerated", "compile")
FUSED = ("fused:cuda", "fused:triton")
# Issue 6's rival implementations per op, beside the fused front-ends and the copy yardstick.
OP_IMPLS = ("eager", "compile") + FUSED
PROV = ("device_name", "torch", "triton", "cuda", "cudnn", "cuda_loader", "diffusers", "git_sha", "timestamp")


def read(folder: str, name: str) -> list[dict]:
    """Rows of ``<name>.csv`` in ``folder``, else of ``<name>.partial.csv`` (a run cut short), else []."""
    for stem in (name, f"{name}.partial"):
        path = os.path.join(folder, f"{stem}.csv")
        if os.path.exists(path):
            with open(path, newline="") as f:
                return list(csv.DictReader(f))
    return []


def num(row: dict | None, key: str) -> float:
    try:
        return float(row[key]) if row is not None and row.get(key) not in (None, "") else math.nan
    except ValueError:
        return math.nan


def verdict(value: float, ok) -> str:
    return "n/a" if math.isnan(value) else ("pass" if ok(value) else "FAIL")

#----------------------------------------------------------------------------
# Issue 5 and 7: the end-to-end table.


def graph_targets(runs: list[list[dict]]) -> tuple[list[dict], list[str]]:
    """One row per (model, dtype, batch, N) with the issue's ratios and verdicts; and the missing cells.
    ``runs``: the rows of each CSV (ratios never mix two runs)."""
    def cell(rows, key):
        return {r["impl"]: r for r in rows if (r["model"], r["dtype"], int(r["batch"]), int(r["steps"])) == key}

    out, missing = [], []
    for key in [(m, d, b, n) for m in GRAPH_MODELS for d in DTYPES for b in GRAPH_BATCHES for n in GRAPH_STEPS]:
        cells = [cell(rows, key) for rows in runs]
        main = next((c for c in cells if "graph" in c), cells[0] if cells else {})
        comp = next((c for c in cells if "compile" in c and "graph" in c), {})
        missing += [f"graphs {'/'.join(map(str, key))} {i}" for i in GRAPH_IMPLS
                    if not any(i in c for c in cells)]
        t = {i: num(main.get(i), "median_us") for i in GRAPH_IMPLS}
        graph_floor = t["graph"] / t["floor"]
        diffusers_graph = t["diffusers"] / t["graph"]
        compile_graph = num(comp.get("compile"), "median_us") / num(comp.get("graph"), "median_us")
        # the compile happens in the first compile row of (model, dtype, batch), whichever N: a later N reuses it
        setup = [num(r, "first_call_ms") for rows in runs for r in rows if r["impl"] == "compile"
                 and (r["model"], r["dtype"], int(r["batch"])) == key[:3]]
        out.append({
            "model": key[0], "dtype": key[1], "batch": key[2], "steps": key[3],
            **{f"{i}_ms_per_sample": num(main.get(i), "per_sample_us") / 1e3 for i in GRAPH_IMPLS},
            "graph/floor": graph_floor, "graph_within_3pct_of_floor": verdict(graph_floor, lambda v: v <= 1.03),
            "diffusers/graph": diffusers_graph,
            "graph_2x_diffusers_at_batch_1": verdict(diffusers_graph, lambda v: v >= 2.0) if key[2] == 1 else "",
            "compile/graph": compile_graph, "graph_no_slower_than_compile": verdict(compile_graph, lambda v: v >= 1.0),
            "graph_warmup_s": num(main.get("graph"), "first_call_ms") / 1e3,
            "compile_setup_s": max(setup, default=math.nan) / 1e3,
            # issue 7: (a) the original loop, (b) diffkern's schedulers in it, (c) the accelerated pipeline
            "diffkern_sched/diffusers": t["diffkern_sched"] / t["diffusers"],
            "accelerated/diffusers": t["accelerated"] / t["diffusers"],
        })
    return out, missing

#----------------------------------------------------------------------------
# Issue 6: the per-op bandwidth sweeps.


def op_groups(folder: str) -> dict[str, list[dict]]:
    """Rows per op label (``sampler_step/ddim``, ``sampler_step/ddim+noise``, ``iadb_blend``,
    ``hold_transition n=3``, ...), each with its copy rows, and ``numel`` as an int."""
    groups: dict[str, list[dict]] = {}

    def add(label, row):
        groups.setdefault(label, []).append({**row, "numel": int(row["numel"])})

    for r in read(folder, "sampler_step"):
        if r["impl"] == "copy":
            for v in ("ddim", "ddim+noise", "cfg", "history"):
                add(f"sampler_step/{v}", r)
        else:
            add(f"sampler_step/{r['variant']}{'+noise' if r['noise'] == 'True' else ''}", r)
    for r in read(folder, "iadb_blend"):
        for op in (("iadb_blend", "iadb_deblend") if r["op"] == "copy" else (r["op"],)):
            add(op, r)
    for r in read(folder, "hold"):
        for op in (("hold_transition", "hold_perturb") if r["op"] == "copy" else (r["op"],)):
            add(f"{op} n={r['n']}", r)
    return groups


def nearest_size(numel: int) -> int:
    """The sweep size a row stands for (HOLD's states are within 5% of one: B is rounded per order)."""
    return min(SIZES, key=lambda s: abs(math.log2(numel / s)))


def op_targets(folder: str) -> tuple[list[dict], list[str]]:
    """One row per (op, dtype, size) with the best fused implementation and the verdicts; and the missing rows."""
    out, missing = [], []
    for label, rows in op_groups(folder).items():
        # cfg and history run from TARGET_MIN_NUMEL only (bench_sampler_step.VARIANT_MIN_NUMEL), by design
        sizes = SIZES if label.split("/")[-1] in ("ddim", "ddim+noise") or "/" not in label else \
            [s for s in SIZES if s >= TARGET_MIN_NUMEL]
        for dtype in DTYPES:
            for size in sizes:
                here = [r for r in rows if r["dtype"] == dtype and nearest_size(r["numel"]) == size]
                by = {r["impl"]: r for r in here}
                missing += [f"{label} {dtype} 2**{int(math.log2(size))} {i}" for i in ("copy",) + OP_IMPLS
                            if i not in by]
                fused = [by[i] for i in FUSED if i in by and not math.isnan(num(by[i], "gbps"))]
                best = max(fused, key=lambda r: num(r, "gbps"), default=None)
                frac, eager, comp = num(best, "frac_copy_bw"), num(best, "speedup_vs_eager"), \
                    num(best, "speedup_vs_compile")
                target = size >= TARGET_MIN_NUMEL
                out.append({"op": label, "dtype": dtype, "numel": size, "best": best["impl"] if best else "",
                            "gbps": num(best, "gbps"), "copy_gbps": num(best, "copy_gbps"),
                            "frac_copy_bw": frac, "frac_peak_bw": num(best, "frac_peak_bw"),
                            "speedup_vs_eager": eager, "speedup_vs_compile": comp,
                            "bw_90pct": verdict(frac, lambda v: v >= 0.9) if target else "",
                            "eager_5x": verdict(eager, lambda v: v >= 5.0) if target else "",
                            "no_slower_than_compile": verdict(comp, lambda v: v >= 1.0) if target else ""})
    return out, missing

#----------------------------------------------------------------------------
# Output.


def provenance(folder: str, names) -> list[dict]:
    """The provenance of each CSV's first row (one line per distinct set)."""
    seen = {}
    for name in names:
        rows = read(folder, name)
        if rows:
            prov = tuple((k, rows[0].get(k, "")) for k in PROV if rows[0].get(k, "") != "")
            seen.setdefault(prov, []).append(name)
    return [{"csv": ", ".join(v), **dict(k)} for k, v in seen.items()]


def markdown(rows: list[dict], columns=None) -> str:
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return "" if math.isnan(v) else (f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}")
        return str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    return "\n".join(lines + ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows])


def summarize(rows: list[dict], keys: list[str]) -> str:
    counts = {k: {v: sum(r.get(k) == v for r in rows) for v in ("pass", "FAIL", "n/a")} for k in keys}
    return "; ".join(f"{k}: {c['pass']} pass, {c['FAIL']} FAIL, {c['n/a']} n/a" for k, c in counts.items())


def report(folder: str) -> tuple[str, list[dict]]:
    """The markdown report of ``folder`` and the flat verdict rows (for targets.csv)."""
    runs = [rows for rows in (read(folder, "graphs"), read(folder, "graphs_compile")) if rows]
    graphs, graphs_missing = graph_targets(runs)
    ops, ops_missing = op_targets(folder)
    g_keys = ["graph_within_3pct_of_floor", "graph_2x_diffusers_at_batch_1", "graph_no_slower_than_compile"]
    o_keys = ["bw_90pct", "eager_5x", "no_slower_than_compile"]
    parts = ["# GPU targets of issues 5, 6 and 7", markdown(provenance(
        folder, ("graphs", "graphs_compile", "sampler_step", "iadb_blend", "hold", "ddim", "philox_normal"))),
        "## Issue 5 (and 7): the end-to-end sampling loop", summarize(graphs, g_keys), markdown(graphs),
        "## Issue 6: per-op bandwidth (the faster of fused:cuda and fused:triton; targets from 2**24 elements)",
        summarize([r for r in ops if r["numel"] >= TARGET_MIN_NUMEL], o_keys), markdown(ops),
        "The VP-DDIM step's row is `sampler_step/ddim` (`ddim.csv` times it against diffusers' scheduler, "
        "float32 only); `philox_normal.csv` is no issue 6 op (its eager rival, torch.randn, is one kernel)."]
    missing = graphs_missing + ops_missing
    parts.append(f"## Missing rows ({len(missing)})\n" + ("\n".join(f"- {m}" for m in missing) or "none"))
    flat = [{"issue": 5, "case": f"{r['model']} {r['dtype']} b{r['batch']} N{r['steps']}", "target": k,
             "verdict": r[k]} for r in graphs for k in g_keys if r[k]]
    flat += [{"issue": 6, "case": f"{r['op']} {r['dtype']} {r['numel']}", "target": k, "verdict": r[k]}
             for r in ops for k in o_keys if r[k]]
    flat += [{"issue": "5/6", "case": m, "target": "present", "verdict": "missing"} for m in missing]
    return "\n\n".join(parts) + "\n", flat


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", help="a results folder (bench/results/<device>/)")
    p.add_argument("--out", default=None, help="where targets.md and targets.csv go (default: the folder)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.folder):
        raise SystemExit(f"folder: {args.folder!r} is not a directory")
    text, flat = report(args.folder)
    out = args.out or args.folder
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "targets.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "targets.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["issue", "case", "target", "verdict"])
        w.writeheader()
        w.writerows(flat)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
