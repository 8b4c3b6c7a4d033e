#!/usr/bin/env bash
# The GPU variant of the benchmark suite, in well under 5 minutes on one GPU:
#   training images/s and the RobustTrainer / plain-loop overhead ratio (section "overhead"),
#   time to 99.0% test accuracy on the built-in 5k sample vs the classic PyTorch MNIST recipe ("tta").
# Writes one JSON file, bench/results/gpu.json (or the --out given after the device).
#
#   bench/gpu.sh                 # on CUDA
#   bench/gpu.sh cpu --quick     # the same code path on the CPU, tiny: what CI runs so that it cannot rot
set -euo pipefail
cd "$(dirname "$0")/.."
device="${1:-cuda}"
[ $# -gt 0 ] && shift
python="${PYTHON:-.venv/bin/python}"
exec "$python" bench/suite.py --device "$device" --only overhead,tta --out bench/results/gpu.json "$@"
