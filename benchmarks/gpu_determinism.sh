#!/usr/bin/env bash
# Twin conversions with and without --deterministic (benchmarks/determinism.py) on a lent GPU: one process per
# model, all at once (each model's four runs still follow one another, so its time ratio compares runs that shared
# the machine alike), joined into one record, $OUT/determinism.json.
#
#   benchmarks/gpu_determinism.sh [MODEL ...]    # default: resnet50 convnext_base vit_base_patch16_224
#   DRY_RUN=1 benchmarks/gpu_determinism.sh resnet10t vit_tiny_patch16_224    # tiny sizes on the CPU
#   EVALUATE=1 benchmarks/gpu_determinism.sh resnet50    # twin evaluations instead: $OUT/determinism-evaluate.json
#
# LIMIT: seconds each model's process may take (500); one stopped keeps the runs it finished (the record is written
# after every run). Each run is a fresh process: on an H200 one took 68-93 s, of which 13-17 s converting.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
out="${OUT:-.}" python="${PYTHON:-python3}"
models=("${@:-resnet50 convnext_base vit_base_patch16_224}")
models=(${models[*]})
mkdir -p "$out"
for model in "${models[@]}"; do
    timeout "${LIMIT:-500}" "$python" benchmarks/determinism.py --models "$model" --json "$out/part-$model.json" ${DRY_RUN:+--dry-run} ${EVALUATE:+--evaluate} > "$out/part-$model.log" 2>&1 &
done
wait
for model in "${models[@]}"; do echo "$model: $(tail -c 400 "$out/part-$model.log")"; done
parts=()
for model in "${models[@]}"; do [ -s "$out/part-$model.json" ] && parts+=("$out/part-$model.json"); done
"$python" benchmarks/determinism.py --json "$out/determinism${EVALUATE:+-evaluate}.json" --merge "${parts[@]}" \
    --note "the ${#models[@]} models ran at once, one process each, on one machine" && rm -f "$out"/part-*.json
