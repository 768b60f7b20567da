#!/usr/bin/env bash
# What a GPU session runs, in device calls of under 10 minutes each: build with CUDA, the CUDA tests (through the
# ahead-of-time build and through NVRTC), compute-sanitizer memcheck on the CUDA ops, the benchmarks, and
# bench/targets.py's verdicts on the issues' targets (targets.md).
#
#   bash bench/prepare_wheels.sh                         # HERE, once: wheels the image lacks, into .whl/
#   device call 1, carry [".whl"]:  bash bench/gpu_suite.sh                          # build pytest_cuda memcheck
#                                                                                     #   pytest_nvrtc
#   device call 2, carry [".whl"]:  GPU_SUITE_STAGES=second bash bench/gpu_suite.sh   # build bench_graphs
#   device call 3, carry [".whl"]:  GPU_SUITE_STAGES=third bash bench/gpu_suite.sh    # build, benches: sampler_step
#                                                                                     #   iadb_blend hold
#   device call 4, carry [".whl"]:  GPU_SUITE_STAGES=fourth bash bench/gpu_suite.sh   # build, bench_graphs_compile
#                                                              # (the compile column the second call had no time for),
#                                                        # benches ddim philox_normal optimal_denoiser, pytest_rest
# Prefix each command with DIFFKERN_GIT_SHA=<sha> (the device gets the tree without .git; write the sha out, with
# -dirty when `git diff-index --quiet HEAD --` fails here: the tree sent is the working tree) and, when the
# session's device time left (status: budget_left_s) is under ~11 minutes, GPU_SUITE_BUDGET_S=<that - 90> (a
# machine's start costs a minute or more): the device tool kills a command at its limit, and only what is
# under $OUT then comes back. Each call's results are re-packed into $OUT after every stage and every 30 s,
# so a kill loses at most the stage in progress (whose bench also checkpoints <name>.partial.csv per case).
# Calls 1-3 hold what the open issues need; 30 minutes of device time is about 3 full calls and a start, so
# call 4 is optional. Make the calls back to back: a machine idle for 30 s is given back, and a new one builds
# again (estimated 2-3 min, taken from the next stage's time).
#
# Estimated time on an H100 (16 cores), from the benches' case lists (`python bench/budget.py`; bench/README.md,
# "GPU time budget"; not yet checked against a GPU run):
#   first   build ~150 s cold (0 warm) | pytest_cuda cap 240 | memcheck ~60 s, cap 100 | pytest_nvrtc the rest
#   second  bench_graphs: 144 non-compile cases ~170 s, then cold compiles of the UNet (~50 s per model, dtype and
#           batch, batch 1 first) until the deadline: ~5 of 12 groups
#   third   sampler_step ~145 s (cap 150) | iadb_blend ~94 s (cap 100) | hold ~222 s (cap 260), each with its
#           compile rows from 2**24 elements; those below 2**24 (no target reads them) come last and are cut
#   fourth  bench_graphs_compile: the ~7 groups left, ~390 s (cap 470) | ddim ~30 s (cap 40); philox_normal
#           (~80 s), optimal_denoiser (~40 s) and pytest_rest get what is left, likely nothing: a fifth call
#           GPU_SUITE_STAGES="build benches pytest_rest" GPU_SUITE_BENCHES="philox_normal optimal_denoiser" runs them
# The GPU image's versions were checked on a CPU twin: torch 2.11.0+cu130, Triton 3.6.0, CuPy 14.2.
#
# Results and logs go to /tmp/gpu_suite/<device>/ (GPU_SUITE_DEST_ROOT) and, packed, to
# $OUT/gpu_suite-<stages>.tar.gz with stages.txt beside it (the device tool returns at most 8 files). Without
# $OUT they stay in bench/results/<device>/. Unpack
# the archive into bench/results/ to commit the results (a later call's bench_graphs_compile reads graphs.csv
# from /tmp/gpu_suite/<device>/ on a warm machine, else from bench/results/<device>/ of the tree sent).
#
# Stages run in order of importance, each under a timeout cut from one budget (GPU_SUITE_BUDGET_S, default 560 s,
# so the device call's 600 s limit is never hit): a late stage that runs out of time is skipped, not the proof.
#   env          GPU, driver, torch, triton, diffusers, cupy, nvcc, compute-sanitizer            -> env.txt
#   build        the image's own python3 (it holds torch, Triton, CuPy; a venv made from it would not see them,
#                since that python3 is itself a venv): the wheels of .whl/, then an editable build for this GPU's
#                arch only (offline). Skipped when the same sources were built on this machine already -> build.log
#   pytest_cuda  every CUDA-marked test (over 8 xdist workers)                                  -> pytest_cuda.log
#   memcheck     compute-sanitizer --tool memcheck on bench/memcheck_ops.py's launches of every CUDA op
#                                                                                               -> memcheck.log
#   pytest_nvrtc the CUDA op tests again with DIFFKERN_CUDA_LOADER=nvrtc: the same kernels compiled at run time
#                by CuPy's NVRTC (diffkern/ops/cuda_rtc.py) instead of the ahead-of-time build  -> pytest_nvrtc.log
#   bench_graphs bench/bench_graphs.py, the end-to-end table (compile column last, under a deadline) -> graphs.*
#   bench_graphs_compile  its compile column (with the graph column, for same-run ratios) for the groups that
#                graphs.csv lacks                                                        -> graphs_compile.*
#   benches      the per-op benchmarks named in GPU_SUITE_BENCHES                                -> <name>.*
#   pytest_rest  the rest of the test suite (the CPU tests; CI runs them too)                    -> pytest_rest.log
#   targets      bench/targets.py after any bench: the issues' targets and missing rows  -> targets.md, targets.csv
# A summary of each stage's exit status goes to stages.txt (appended: a later call adds to it).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
BUDGET=${GPU_SUITE_BUDGET_S:-560}
PY=${GPU_SUITE_PYTHON:-python3}
WHEELS=${GPU_SUITE_WHEELS:-.whl}
STAGES=${GPU_SUITE_STAGES:-first}
BENCHES=${GPU_SUITE_BENCHES:-sampler_step iadb_blend hold ddim philox_normal optimal_denoiser}
case "$STAGES" in
  first) STAGES="build pytest_cuda memcheck pytest_nvrtc" ;;
  second) STAGES="build bench_graphs" ;;
  third) STAGES="build benches"; BENCHES=${GPU_SUITE_BENCHES:-sampler_step iadb_blend hold} ;;
  fourth) STAGES="build bench_graphs_compile benches pytest_rest"
          BENCHES=${GPU_SUITE_BENCHES:-ddim philox_normal optimal_denoiser} ;;
esac
TAG=$(echo "$STAGES" | tr ' ' '-')
STAGES=" $STAGES "
want() { [[ "$STAGES" == *" $1 "* ]]; }

gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
slug=$(echo "cuda-${gpu_name:-unknown}" | tr 'A-Z' 'a-z' | sed -E 's/[^a-z0-9]+/-/g; s/^-|-$//g')
if [ -n "${OUT:-}" ]; then DEST=${GPU_SUITE_DEST_ROOT:-/tmp/gpu_suite}/$slug; else DEST=bench/results/$slug; fi
mkdir -p "$DEST"
echo "results: $DEST"
# pack: the results so far into $OUT, written under a temporary name and renamed (a kill mid-write leaves the
# previous archive whole). Run after the environment, after every stage, every 30 s in the background, and at exit.
pack() {
  [ -n "${OUT:-}" ] || return 0
  cp "$DEST/stages.txt" "$OUT/stages.txt.$BASHPID" 2>/dev/null && mv -f "$OUT/stages.txt.$BASHPID" "$OUT/stages.txt"
  tar -czf "$OUT/gpu_suite-$TAG.tar.gz.$BASHPID" -C "$(dirname "$DEST")" "$slug" 2>/dev/null \
    && mv -f "$OUT/gpu_suite-$TAG.tar.gz.$BASHPID" "$OUT/gpu_suite-$TAG.tar.gz"
}
packer=""
if [ -n "${OUT:-}" ]; then  # its sleep is killed with it: no orphan keeps the command's output open
  ( trap 'kill "$s" 2>/dev/null; exit 0' TERM; while :; do sleep 30 & s=$!; wait "$s"; pack; done ) >/dev/null 2>&1 &
  packer=$!
fi
trap '[ -n "$packer" ] && kill "$packer" 2>/dev/null; pack' EXIT

left() { echo $(( BUDGET - (SECONDS - START) )); }
# stage NAME CAP_S LOG CMD...: run CMD under min(CAP_S, time left - 10 s), log to DEST/LOG, record the status.
# A bench's deadline (DIFFKERN_BENCH_DEADLINE_S) is that timeout less MARGIN (default 25 s; set it for the stage:
# `MARGIN=40 stage ...`): the last case started and the writing of the results fit in it.
stage() {
  local name=$1 cap=$2 log=$3; shift 3
  local t; t=$(left); t=$(( t - 10 < cap ? t - 10 : cap ))
  if [ "$t" -lt 20 ]; then
    echo "$name: skipped (budget spent)" | tee -a "$DEST/stages.txt"; return
  fi
  echo "== $name (timeout ${t}s, log $log)"
  local t0=$SECONDS
  # A bench starts no case after the deadline and, on timeout's SIGTERM, writes the cases it finished
  # (bench/harness.py; exit status 2 = partial results); unbuffered, the log shows each case as it ends.
  DIFFKERN_BENCH_DEADLINE_S=$(( t - ${MARGIN:-25} )) PYTHONUNBUFFERED=1 timeout --kill-after=10 "$t" "$@" \
    > "$DEST/$log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $(( SECONDS - t0 ))s$([ $rc -eq 124 ] && echo ' (timed out)')" | tee -a "$DEST/stages.txt"
  tail -n 5 "$DEST/$log"
  pack
}
# targets: the issues' verdicts and missing rows from whatever CSVs DEST holds (pure CSV reading, a second).
targets() {
  "$PY" bench/targets.py "$DEST" > "$DEST/targets.log" 2>&1 \
    && grep -E '^(graph_|bw_90pct|## Missing)' "$DEST/targets.log" | tee -a "$DEST/stages.txt"
}
echo "-- $(date -u +%FT%TZ) stages:$STAGES" >> "$DEST/stages.txt"
# Provenance: the tree on the device has no .git. Without DIFFKERN_GIT_SHA the results would say "unknown":
# record a hash of the sources instead (bench/report.py reads the variable), and say so. The hash goes to
# stages.txt in any case: it tells which tree a given sha with uncommitted changes was.
tree=$( (find setup.py csrc kernels diffkern bench -type f \( -name '*.py' -o -name '*.cu' -o -name '*.cuh' \
  -o -name '*.h' -o -name '*.cpp' -o -name '*.sh' \) | sort | xargs cat) | sha256sum | cut -c1-16)
echo "tree hash $tree, DIFFKERN_GIT_SHA=${DIFFKERN_GIT_SHA:-}" >> "$DEST/stages.txt"
if [ -z "${DIFFKERN_GIT_SHA:-}" ] && ! git rev-parse HEAD >/dev/null 2>&1; then
  export DIFFKERN_GIT_SHA="unknown-commit-tree-$tree"
  echo "WARNING: DIFFKERN_GIT_SHA not set and no .git: results record $DIFFKERN_GIT_SHA" | tee -a "$DEST/stages.txt"
fi

# 1. Environment.
{
  nvidia-smi || true
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' || true
  for m in triton diffusers scipy hypothesis pytest tqdm safetensors matplotlib ninja smalldiffusion cupy transformers; do
    "$PY" -c "import $m; print('$m', getattr($m, '__version__', '?'))" 2>/dev/null || echo "$m MISSING"
  done
  command -v nvcc && nvcc --version | tail -2
  command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null || echo "compute-sanitizer MISSING"
  nproc; free -g | head -2
} > "$DEST/env.txt" 2>&1
cat "$DEST/env.txt"
pack

# 2. Build. sm_XY of this GPU only (halves nvcc time); pip offline so a missing package fails at once.
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '.')
export DIFFKERN_CUDA_ARCHS=${DIFFKERN_CUDA_ARCHS:-${arch:-90}}
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# torch finds the toolkit from `which nvcc` unless CUDA_HOME is set, and an nvcc on PATH can be a wrapper script
# outside the toolkit (the development machine has one): name the standard toolkit when there is one.
[ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda
stamp=$( (cat setup.py; find csrc -type f | sort | xargs cat; echo "$DIFFKERN_CUDA_ARCHS") | sha256sum | cut -d' ' -f1)
if want build && [ "$(cat /tmp/diffkern-build-stamp 2>/dev/null)" = "$stamp" ] \
    && "$PY" -c 'import diffkern._C as C; assert C.has_cuda()' 2>/dev/null; then
  echo "build: skipped (these sources are built on this machine already)" | tee -a "$DEST/stages.txt"
elif want build; then stage build 300 build.log bash -c "
  if ls $WHEELS/*.whl >/dev/null 2>&1; then \"$PY\" -m pip install -q --no-deps $WHEELS/*.whl || exit 1; fi
  \"$PY\" -m pip install -q --no-build-isolation --no-deps -e . || exit 1
  \"$PY\" -m pip check || echo '(pip check: the image has inconsistencies; informational only)'
  echo $stamp > /tmp/diffkern-build-stamp"
fi
"$PY" -c 'import diffkern._C as C, torch; print("extension has CUDA:", C.has_cuda(), "| torch", torch.__version__)' \
  | tee -a "$DEST/stages.txt"

# 3. CUDA tests (the GPU proof of the graph runner first).
# pytest-xdist (on the image): Triton compiles each kernel specialisation a test needs on first use, single-threaded,
# 0.8-2.8 s each (tests/test_triton_gpu_compile.py; ~100 for the launchers alone, 96 for test_hold_ops.py's Triton
# cases, ~150 s in one process): tests, not files, are spread over 8 of the 16 cores (worksteal evens out the
# slow ones; Triton's disk cache is shared between the workers). A machine without xdist runs one process.
XDIST=()
if "$PY" -c 'import sys, xdist; sys.exit(tuple(map(int, xdist.__version__.split(".")[:2])) < (3, 2))' 2>/dev/null; then
  XDIST=(-n "${GPU_SUITE_WORKERS:-8}" --dist worksteal)
elif "$PY" -c 'import xdist' 2>/dev/null; then
  XDIST=(-n "${GPU_SUITE_WORKERS:-8}" --dist load)
fi
want pytest_cuda && stage pytest_cuda 240 pytest_cuda.log "$PY" -m pytest -q -rs "${XDIST[@]}" -m cuda tests
# 4. memcheck: small launches of every CUDA op (bench/memcheck_ops.py: odd sizes, misaligned views, per-sample
# seeds, every optional input and output, every state dtype, HOLD orders 1-8). Before pytest_nvrtc: it is
# issue 6's proof, the NVRTC run repeats tests that already passed through the other loader.
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if ! want memcheck; then
  :
elif [ -n "$sanitizer" ]; then
  stage memcheck 100 memcheck.log "$sanitizer" --tool memcheck --error-exitcode 1 "$PY" bench/memcheck_ops.py
else
  echo "memcheck: skipped (no compute-sanitizer)" | tee -a "$DEST/stages.txt"
fi
# Files in order of importance (a timeout cuts the last): the loader's own tests first.
want pytest_nvrtc && stage pytest_nvrtc 150 pytest_nvrtc.log env DIFFKERN_CUDA_LOADER=nvrtc \
  DIFFKERN_CACHE_DIR=/tmp/diffkern-cache "$PY" -m pytest -q -rs "${XDIST[@]}" -m cuda tests/test_cuda_rtc.py \
  tests/test_sampler_step.py tests/test_hold_ops.py tests/test_iadb.py tests/test_philox.py tests/test_ddim.py
# 5. Benchmarks.
# A graphs case takes up to ~10 s (batch 64, N = 50, 8 calls); a compile case starts only with
# bench_graphs.COMPILE_NEED_S left before the deadline.
want bench_graphs && MARGIN=40 stage bench_graphs 540 bench_graphs.log "$PY" bench/bench_graphs.py --out "$DEST"
# The compile column for the (model, dtype, batch) groups that an earlier call's graphs.csv has no compile rows
# for, with the graph column again (each compile/graph ratio from one run).
if want bench_graphs_compile; then
  prev=""
  for f in "$DEST/graphs.csv" "$DEST/graphs.partial.csv" "bench/results/$slug/graphs.csv"; do
    [ -f "$f" ] && prev=$f && break
  done
  MARGIN=40 stage bench_graphs_compile 470 bench_graphs_compile.log "$PY" bench/bench_graphs.py --out "$DEST" \
    --impls graph,compile --name graphs_compile ${prev:+--skip-compiled "$prev"}
fi
# Caps from the estimates in the header (bench/README.md, "GPU time budget"). The compile cases run last in each
# sweep, those under 2**24 elements (which no target reads) last of all, so a cap cuts them first.
for spec in sampler_step:150 iadb_blend:100 hold:260 ddim:40 philox_normal:90 optimal_denoiser:60; do
  b=${spec%%:*}
  [[ " $BENCHES " == *" $b "* ]] || continue
  want benches && [ -f "bench/bench_$b.py" ] && stage "bench_$b" "${spec##*:}" "bench_$b.log" "$PY" "bench/bench_$b.py" --out "$DEST"
done
if want bench_graphs || want bench_graphs_compile || want benches; then targets; fi
# 7. The rest of the suite (the CPU tests; CI runs them too).
# ~2400 CPU tests: 9 min on CI's two workers, so one worker per core here.
want pytest_rest && stage pytest_rest 300 pytest_rest.log "$PY" -m pytest -q -rs \
  $("$PY" -c 'import xdist' 2>/dev/null && echo "-n $(nproc)") -m "not cuda" tests
echo "total $(( SECONDS - START ))s" | tee -a "$DEST/stages.txt"
