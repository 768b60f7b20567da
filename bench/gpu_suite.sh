#!/usr/bin/env bash
# Everything a GPU session runs, in ONE call of under 10 minutes: build with CUDA, the CUDA tests, the
# benchmarks, the rest of the test suite, compute-sanitizer memcheck on the CUDA ops.
#
#   bash bench/gpu_suite.sh            # results and logs under $OUT/results/<device>/ (else bench/results/<device>/)
#   GPU_SUITE_STAGES="build benches pytest_rest" bash bench/gpu_suite.sh   # a second call for what did not fit
#
# Stages run in order of importance, each under a timeout cut from one budget (GPU_SUITE_BUDGET_S, default 560 s,
# so the device call's 600 s limit is never hit): a late stage that runs out of time is skipped, not the proof.
#   1. environment report (GPU, driver, torch, triton, diffusers, nvcc, compute-sanitizer)   -> env.txt
#   2. the image's own python3 (it holds torch, Triton, CuPy; a venv made from it would not see them, since
#      that python3 is itself a venv): the packages the image lacks from the wheelhouse .whl/ (made here by
#      bench/prepare_wheels.sh, carried to the machine), then an editable build for this GPU's arch only
#      (offline: pip never reaches an index)                                                 -> build.log
#   3. every CUDA-marked test (tests/test_graphs.py first)                                  -> pytest_cuda.log
#   3b. the CUDA op tests again with DIFFKERN_CUDA_LOADER=nvrtc: the same kernels compiled at run time by
#       CuPy's NVRTC (diffkern/ops/cuda_rtc.py) instead of the ahead-of-time build            -> pytest_nvrtc.log
#   4. bench/bench_graphs.py (the end-to-end table; compile column last, under a deadline)   -> graphs.*
#   5. the other benchmarks present (sampler_step, hold, optimal_denoiser)                   -> <name>.*
#   6. compute-sanitizer --tool memcheck on small launches of every CUDA op                -> memcheck.log
#   7. the rest of the test suite (CPU tests, also run by CI)                              -> pytest_rest.log
# A summary of each stage's exit status goes to stages.txt (appended: a second call adds to it). On a warm
# machine the build stage is quick (ninja rebuilds only what changed).
#
# The device call:  bash bench/prepare_wheels.sh   (here, once), then run with carry [".whl"] the command
#                   bash bench/gpu_suite.sh
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
BUDGET=${GPU_SUITE_BUDGET_S:-560}
PY=${GPU_SUITE_PYTHON:-python3}
WHEELS=${GPU_SUITE_WHEELS:-.whl}
STAGES=" ${GPU_SUITE_STAGES:-build pytest_cuda pytest_nvrtc bench_graphs benches memcheck pytest_rest} "
want() { [[ "$STAGES" == *" $1 "* ]]; }

gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
slug=$(echo "cuda-${gpu_name:-unknown}" | tr 'A-Z' 'a-z' | sed -E 's/[^a-z0-9]+/-/g; s/^-|-$//g')
DEST=${OUT:-bench}/results/$slug
mkdir -p "$DEST"
echo "results: $DEST"

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
  timeout --kill-after=10 "$t" "$@" > "$DEST/$log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $(( SECONDS - t0 ))s$([ $rc -eq 124 ] && echo ' (timed out)')" | tee -a "$DEST/stages.txt"
  tail -n 5 "$DEST/$log"
}
echo "-- $(date -u +%FT%TZ) stages:$STAGES" >> "$DEST/stages.txt"

# 1. Environment.
{
  nvidia-smi || true
  python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' || true
  for m in triton diffusers scipy hypothesis pytest tqdm safetensors matplotlib ninja smalldiffusion cupy transformers; do
    python3 -c "import $m; print('$m', getattr($m, '__version__', '?'))" 2>/dev/null || echo "$m MISSING"
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
want build && stage build 300 build.log bash -c "
  if ls $WHEELS/*.whl >/dev/null 2>&1; then \"$PY\" -m pip install -q --no-deps $WHEELS/*.whl || exit 1; fi
  \"$PY\" -m pip install -q --no-build-isolation --no-deps -e . || exit 1
  \"$PY\" -m pip check || echo '(pip check: the image has inconsistencies; informational only)'"
"$PY" -c 'import diffkern._C as C, torch; print("extension has CUDA:", C.has_cuda(), "| torch", torch.__version__)' \
  | tee -a "$DEST/stages.txt"

# 3. CUDA tests (the GPU proof of the graph runner first).
want pytest_cuda && stage pytest_cuda 240 pytest_cuda.log "$PY" -m pytest -q -rs -m cuda tests/test_graphs.py tests
want pytest_nvrtc && stage pytest_nvrtc 150 pytest_nvrtc.log env DIFFKERN_CUDA_LOADER=nvrtc \
  DIFFKERN_CACHE_DIR=/tmp/diffkern-cache "$PY" -m pytest -q -rs -m cuda tests/test_cuda_rtc.py tests/test_sampler_step.py \
  tests/test_iadb.py tests/test_philox.py tests/test_hold_ops.py tests/test_ddim.py
# 4-5. Benchmarks.
want bench_graphs && stage bench_graphs 200 bench_graphs.log "$PY" bench/bench_graphs.py --out "$DEST" --deadline-s 150
for b in sampler_step hold optimal_denoiser; do
  want benches && [ -f "bench/bench_$b.py" ] && stage "bench_$b" 90 "bench_$b.log" "$PY" "bench/bench_$b.py" --out "$DEST"
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
want pytest_rest && stage pytest_rest 300 pytest_rest.log "$PY" -m pytest -q -rs -m "not cuda" tests
echo "total $(( SECONDS - START ))s" | tee -a "$DEST/stages.txt"
