#!/usr/bin/env bash
# Everything a lent GPU machine should measure, in one call of a few minutes (offline; torch, timm, accelerate):
#   1. benchmarks/gpu_check.sh: step ratios, CUDA peak memory, certification and JPEG decode throughput
#   2. scripts/record_demo.py: the product end to end (`certify-zoo demo`: train, convert, certify, PGD audit)
#   3. benchmarks/conversion_safety.py --defaults-only: the real EfficientNet-Lite2 converted with its recipe's
#      defaults (20 steps, seeds 0-7), when WORK holds its folder (efficientnet_lite2/) and the photos (photos/),
#      carried from here
#
#   benchmarks/gpu_session.sh OUT_DIR [WORK]
#   python benchmarks/gpu_record.py --from OUT_DIR --code "commit ..." --out docs/records/gpu.json   # back here
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${1:?usage: gpu_session.sh OUT_DIR [WORK]}" work="${2:-}"
python="${PYTHON:-python3}"
mkdir -p "$out"
status=0
"$python" benchmarks/gpu_check.py --json "$out/gpu_check.json" > "$out/gpu_check.log" 2>&1 || status=1
"$python" scripts/record_demo.py --out "$out/gpu_demo.json" > "$out/gpu_demo.log" 2>&1 || status=1
if [[ -n "$work" && -f "$work/efficientnet_lite2/config.json" ]]; then
    "$python" benchmarks/conversion_safety.py --work "$work" --record "$out/gpu_conversion_safety.json" \
        --defaults-only --seeds 0,1,2,3,4,5,6,7 > "$out/gpu_conversion_safety.log" 2>&1 || status=1
fi
tail -n 3 "$out"/*.log
exit $status
