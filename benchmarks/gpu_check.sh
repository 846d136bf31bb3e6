#!/usr/bin/env bash
# GPU readiness check (benchmarks/gpu_check.py): step ratios, peak memory, certification and JPEG decode throughput
# for resnet50 / convnext_base / vit_base_patch16_224 at 224 px, random weights, offline, in under 4 minutes.
#
#   benchmarks/gpu_check.sh [--json PATH]   # on a GPU machine; the record goes to $OUT/gpu_check.json by default
#   benchmarks/gpu_check.sh --dry-run       # tiny sizes on the CPU (< 1 minute): checks the script
#
# Needs torch, torchvision, timm, accelerate and Pillow; not `datasets`. PYTHON picks the interpreter (python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
