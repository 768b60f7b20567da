#!/usr/bin/env bash
# Wheels that the lent GPU machine's image lacks, fetched HERE (that machine reaches no index) into .whl/,
# which git ignores locally and the device call carries: run this, then the device tool with
#   carry [".whl"], command "bash bench/gpu_suite.sh"
# The image (Python 3.12, torch, Triton, CuPy, transformers, pytest, hypothesis, scipy, ...) lacks diffusers
# (an oracle and benchmark baseline) and smalldiffusion (an oracle); importlib_metadata and lazy-importer are
# diffusers' needs that it lacks too; k-diffusion (an oracle: tests/_kdiffusion.py) with torchsde, trampoline and
# torchdiffeq, which its sampling module imports. --no-deps: everything else they need is on the image.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
  diffusers==0.42.1 smalldiffusion==0.5.0 importlib_metadata lazy-importer \
  k-diffusion==0.1.1.post1 torchsde==0.2.6 trampoline==0.1.2 torchdiffeq==0.2.5
ls -la .whl
