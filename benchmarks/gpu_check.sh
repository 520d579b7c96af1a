#!/usr/bin/env bash
# The one prepared device check for a lent CUDA machine (benchmarks/gpu_check.py says what it
# measures). Installs nothing; at most 8 minutes; writes OUT/gpu_check.json and prints each part.
#
#   bash benchmarks/gpu_check.sh [OUT]        (OUT: $OUT where the device tool sets it, else ./gpu-check)
#
# Before carrying the checkout there: mkdir -p benchmarks/data && cp -r ../shared/data/cifar10-5k benchmarks/data/
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_check.py --out "${1:-${OUT:-gpu-check}}"
