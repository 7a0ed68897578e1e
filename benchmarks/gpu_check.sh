#!/usr/bin/env bash
# The GPU check in one command, from the repo root on the GPU machine (see benchmarks/README.md, "GPU check"):
#   bash benchmarks/gpu_check.sh --out "$OUT"               # install the carried wheels, run every step
#   bash benchmarks/gpu_check.sh --stage-part .gpu/part1    # first call: stage half of the GGUF
#   bash benchmarks/gpu_check.sh --dry-run                  # on the CPU machine: resolve and check, run nothing
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu/check.py "$@"
