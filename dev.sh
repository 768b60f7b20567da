#!/usr/bin/env bash
# One entry point for set-up and the two jobs of README.md.
#   ./dev.sh demo   set up (idempotent), then run the main job (`diffkern sample`: a grid of digits
#                   from the built-in model, written to out/digits.png)
#   ./dev.sh test   set up (idempotent), then run the whole test suite
#   ./dev.sh setup  set up only
# Set-up: a virtual environment .venv that sees the system's site-packages (so a preinstalled torch,
# Triton or CuPy is reused, never replaced), the Python dependencies, and an editable build of the
# package with its extension, rebuilt only when csrc/ or setup.py changed.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${DIFFKERN_VENV:-.venv}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv --system-site-packages "$VENV"
  fi
  local py="$VENV/bin/python"
  if ! "$py" -c 'import torch, sys; v = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(v < (2, 6))' 2>/dev/null; then
    "$py" -m pip install -q "torch==2.13.0"
  fi
  local req_stamp="$VENV/.diffkern-requirements"
  local req_hash
  req_hash=$(cat requirements.txt requirements-test.txt requirements-nodeps.txt | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$req_stamp" 2>/dev/null)" != "$req_hash" ]; then
    "$py" -m pip install -q -r requirements.txt -r requirements-test.txt
    "$py" -m pip install -q --no-deps -r requirements-nodeps.txt
    echo "$req_hash" > "$req_stamp"
  fi
  local build_stamp="$VENV/.diffkern-build"
  local build_hash
  build_hash=$( (cat setup.py pyproject.toml; find csrc -type f | sort | xargs cat; env | grep '^DIFFKERN_\(SKIP_CUDA_BUILD\|CUDA_ARCHS\|DEBUG\)=' || true) | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$build_stamp" 2>/dev/null)" != "$build_hash" ] || ! "$py" -c 'import diffkern._C' 2>/dev/null; then
    "$py" -m pip install -q --no-build-isolation --no-deps -e .
    echo "$build_hash" > "$build_stamp"
  fi
}

case "${1:-}" in
  setup) setup ;;
  demo) setup; shift; exec "$VENV/bin/python" -m diffkern sample "$@" ;;
  # worksteal: a worker that runs out takes half of the other's queue, so the run does not end with one worker
  # idle while the other still works through the tests it was handed (17-36 s of a 2-core run with --dist load).
  test) setup; shift; exec "$VENV/bin/python" -m pytest -q -n "${DIFFKERN_TEST_WORKERS:-2}" --dist worksteal "$@" ;;
  *) echo "usage: ./dev.sh {demo|test|setup} [args...]" >&2; exit 2 ;;
esac
