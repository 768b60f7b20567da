#!/usr/bin/env bash
# What a GPU session runs, in device calls of under 10 minutes each: build with CUDA, the CUDA tests (through the
# ahead-of-time build and through NVRTC), the benchmarks, compute-sanitizer memcheck on the CUDA ops.
#
#   bash bench/prepare_wheels.sh                         # HERE, once: wheels the image lacks, into .whl/
#   device call 1, carry [".whl"]:  bash bench/gpu_suite.sh                          # build pytest_cuda pytest_nvrtc memcheck
#   device call 2, carry [".whl"]:  GPU_SUITE_STAGES=second bash bench/gpu_suite.sh   # build bench_graphs
#   device call 3, carry [".whl"]:  GPU_SUITE_STAGES=third bash bench/gpu_suite.sh    # build, benches: sampler_step
#                                                                                     #   iadb_blend hold ddim
#   device call 4, carry [".whl"]:  GPU_SUITE_STAGES=fourth bash bench/gpu_suite.sh   # build, benches: philox_normal
#                                                                                     #   optimal_denoiser, pytest_rest
# Calls 1-3 hold what the open issues need (the CUDA proof, the end-to-end table, the per-op benchmarks of
# issue 6's ops); with a session's 30 minutes of device time (about 3 x 10 minutes held) call 4 is optional:
# its benches are not issue targets and pytest_rest repeats CI (the GPU image's versions were checked on a
# CPU twin: torch 2.11.0+cu130, Triton 3.6.0, CuPy 14.2). A bench cut short writes the cases it finished.
# Make the calls back to back: a machine idle for 30 s is given back, and a new one builds again (~2-3 min).
# The device gets the tree without .git: prefix each command with DIFFKERN_GIT_SHA=<the sha, written out here>
# so the results record the commit they measured.
#
# Results and logs go to /tmp/gpu_suite/<device>/ and, packed, to $OUT/gpu_suite-<stages>.tar.gz with stages.txt
# beside it (the device tool returns at most 8 files; the archive is made on exit, also after a timeout). Without
# $OUT they stay in bench/results/<device>/. Unpack the archive into bench/results/ to commit the results.
#
# Stages run in order of importance, each under a timeout cut from one budget (GPU_SUITE_BUDGET_S, default 560 s,
# so the device call's 600 s limit is never hit): a late stage that runs out of time is skipped, not the proof.
#   env          GPU, driver, torch, triton, diffusers, cupy, nvcc, compute-sanitizer            -> env.txt
#   build        the image's own python3 (it holds torch, Triton, CuPy; a venv made from it would not see them,
#                since that python3 is itself a venv): the wheels of .whl/, then an editable build for this GPU's
#                arch only (offline). Skipped when the same sources were built on this machine already -> build.log
#   pytest_cuda  every CUDA-marked test (over 8 xdist workers)                                  -> pytest_cuda.log
#   pytest_nvrtc the CUDA op tests again with DIFFKERN_CUDA_LOADER=nvrtc: the same kernels compiled at run time
#                by CuPy's NVRTC (diffkern/ops/cuda_rtc.py) instead of the ahead-of-time build  -> pytest_nvrtc.log
#   bench_graphs bench/bench_graphs.py, the end-to-end table (compile column last, under a deadline) -> graphs.*
#   benches      the per-op benchmarks named in GPU_SUITE_BENCHES (default: all)                -> <name>.*
#   memcheck     compute-sanitizer --tool memcheck on small launches of every CUDA op            -> memcheck.log
#   pytest_rest  the rest of the test suite (the CPU tests; CI runs them too)                    -> pytest_rest.log
# A summary of each stage's exit status goes to stages.txt (appended: a later call adds to it).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
BUDGET=${GPU_SUITE_BUDGET_S:-560}
PY=${GPU_SUITE_PYTHON:-python3}
WHEELS=${GPU_SUITE_WHEELS:-.whl}
STAGES=${GPU_SUITE_STAGES:-first}
BENCHES=${GPU_SUITE_BENCHES:-sampler_step iadb_blend hold philox_normal ddim optimal_denoiser}
case "$STAGES" in
  first) STAGES="build pytest_cuda pytest_nvrtc memcheck" ;;
  second) STAGES="build bench_graphs" ;;
  third) STAGES="build benches"; BENCHES=${GPU_SUITE_BENCHES:-sampler_step iadb_blend hold ddim} ;;
  fourth) STAGES="build benches pytest_rest"; BENCHES=${GPU_SUITE_BENCHES:-philox_normal optimal_denoiser} ;;
esac
TAG=$(echo "$STAGES" | tr ' ' '-')
STAGES=" $STAGES "
want() { [[ "$STAGES" == *" $1 "* ]]; }

gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
slug=$(echo "cuda-${gpu_name:-unknown}" | tr 'A-Z' 'a-z' | sed -E 's/[^a-z0-9]+/-/g; s/^-|-$//g')
if [ -n "${OUT:-}" ]; then DEST=/tmp/gpu_suite/$slug; else DEST=bench/results/$slug; fi
mkdir -p "$DEST"
echo "results: $DEST"
pack() {
  [ -n "${OUT:-}" ] || return 0
  cp "$DEST/stages.txt" "$OUT/" 2>/dev/null
  tar -czf "$OUT/gpu_suite-$TAG.tar.gz" -C "$(dirname "$DEST")" "$slug"
}
trap pack EXIT

left() { echo $(( BUDGET - (SECONDS - START) )); }
# stage NAME CAP_S LOG CMD...: run CMD under min(CAP_S, time left - 10 s), log to DEST/LOG, record the status.
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
  DIFFKERN_BENCH_DEADLINE_S=$(( t - 25 )) PYTHONUNBUFFERED=1 timeout --kill-after=10 "$t" "$@" > "$DEST/$log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $(( SECONDS - t0 ))s$([ $rc -eq 124 ] && echo ' (timed out)')" | tee -a "$DEST/stages.txt"
  tail -n 5 "$DEST/$log"
}
echo "-- $(date -u +%FT%TZ) stages:$STAGES" >> "$DEST/stages.txt"
# Provenance: the tree on the device has no .git. Without DIFFKERN_GIT_SHA the results would say "unknown":
# record a hash of the sources instead (bench/report.py reads the variable), and say so.
if [ -z "${DIFFKERN_GIT_SHA:-}" ] && ! git rev-parse HEAD >/dev/null 2>&1; then
  tree=$( (find setup.py csrc kernels diffkern bench -type f \( -name '*.py' -o -name '*.cu' -o -name '*.cuh' \
    -o -name '*.h' -o -name '*.cpp' -o -name '*.sh' \) | sort | xargs cat) | sha256sum | cut -c1-16)
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
want pytest_nvrtc && stage pytest_nvrtc 150 pytest_nvrtc.log env DIFFKERN_CUDA_LOADER=nvrtc \
  DIFFKERN_CACHE_DIR=/tmp/diffkern-cache "$PY" -m pytest -q -rs "${XDIST[@]}" -m cuda tests/test_cuda_rtc.py tests/test_sampler_step.py \
  tests/test_iadb.py tests/test_philox.py tests/test_hold_ops.py tests/test_ddim.py
# 4-5. Benchmarks.
want bench_graphs && stage bench_graphs 540 bench_graphs.log "$PY" bench/bench_graphs.py --out "$DEST" \
  --deadline-s $(( $(left) - 70 ))
# Caps: about 0.2-0.3 s per case (sweeps of 2**20..2**28 elements, two dtypes) plus one static torch.compile
# per size, dtype and variant (~1-3 s each; harness.compiled): sampler_step 32, iadb_blend 20, hold 60,
# philox_normal 10 (a bigger graph). The compile cases run last in each sweep, so a cap cuts them first.
for spec in sampler_step:170 iadb_blend:110 hold:180 ddim:50 philox_normal:150 optimal_denoiser:90; do
  b=${spec%%:*}
  [[ " $BENCHES " == *" $b "* ]] || continue
  want benches && [ -f "bench/bench_$b.py" ] && stage "bench_$b" "${spec##*:}" "bench_$b.log" "$PY" "bench/bench_$b.py" --out "$DEST"
done
# 6. memcheck: small launches of every CUDA op, odd sizes, per-sample seeds, every state dtype.
cat > /tmp/diffkern_memcheck.py <<'EOF'
import torch
import diffkern.ops as dops
from diffkern.ops import coefs
dev = "cuda"
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    for shape in ((3, 5, 7), (1, 1), (2, 1025)):
        x = torch.randn(shape, device=dev).to(dtype)
        table = coefs.table([coefs.row(a=0.9, b=0.1, c=0.2, s=0.3, e=1.0, f=-1.0)] * 2, device=dev)
        seed = torch.arange(shape[0], dtype=torch.int64, device=dev)
        h = torch.zeros_like(x)
        dops.sampler_step(x, x, table, 1, model_out_uncond=x, history=h, history_out=h, seed=seed, out=x,
                          x0_out=torch.empty_like(x), backend="cuda")
        dops.iadb_blend(x, x, torch.rand(shape[0], device=dev), out=torch.empty_like(x),
                        target_out=torch.empty_like(x), backend="cuda")
        dops.randn(shape, seed, step=3, offset=7, dtype=dtype, backend="cuda")
    for n, (H, W) in ((1, (5, 7)), (2, (5, 7)), (3, (5, 7)), (6, (5, 7)), (2, (4, 5)), (3, (4, 5)), (4, (4, 5)),
                      (8, (4, 5))):
        # HOLD: (B, n*C, H, W) states, per-sample seeds; P = C*H*W = 40 takes the 4-element kernel (of the
        # order for n = 2, 3, 4), hold_perturb too
        B, C = 3, 2
        z = torch.randn(B, n * C, H, W, device=dev).to(dtype)
        K, k, L = torch.rand(2, n, n), torch.rand(2, n), torch.tril(torch.rand(2, n, n))
        coef = dops.hold.transition_table(K, k, L, device=dev)
        seed = torch.arange(B, dtype=torch.int64, device=dev)
        dops.hold_transition(z, torch.randn(B, C, H, W, device=dev), coef, 1,
                             seed=seed, out=torch.empty_like(z), backend="cuda")
        dops.hold_transition(z, torch.randn(B, C, H, W, device=dev), coef, 1, seed=seed[:1], out=z, backend="cuda")
        mean = torch.rand(B, n, 1, dtype=torch.float64, device=dev)
        chol = torch.tril(torch.rand(B, n, n, dtype=torch.float64, device=dev))
        dops.hold_perturb(torch.randn(B, C, H, W, device=dev).to(dtype), mean, chol, seed=seed, step=2,
                          out=torch.empty(B, n * C, H, W, device=dev, dtype=dtype),
                          eps_out=torch.empty(B, C, H, W, device=dev, dtype=dtype), backend="cuda")
        full = torch.rand(B, n, n, dtype=torch.float64, device=dev)  # m = n: a whole initial state
        dops.hold_perturb(torch.randn(B, n * C, H, W, device=dev).to(dtype), full, chol, seed=seed[:1], step=2,
                          backend="cuda")
torch.cuda.synchronize()
print("memcheck launches done")
EOF
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if ! want memcheck; then
  :
elif [ -n "$sanitizer" ]; then
  stage memcheck 120 memcheck.log "$sanitizer" --tool memcheck --error-exitcode 1 "$PY" /tmp/diffkern_memcheck.py
else
  echo "memcheck: skipped (no compute-sanitizer)" | tee -a "$DEST/stages.txt"
fi
# 7. The rest of the suite (the CPU tests; CI runs them too).
# ~2400 CPU tests: 9 min on CI's two workers, so one worker per core here.
want pytest_rest && stage pytest_rest 300 pytest_rest.log "$PY" -m pytest -q -rs \
  $("$PY" -c 'import xdist' 2>/dev/null && echo "-n $(nproc)") -m "not cuda" tests
echo "total $(( SECONDS - START ))s" | tee -a "$DEST/stages.txt"
