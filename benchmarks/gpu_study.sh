#!/usr/bin/env bash
# Gamma-study rows side by side on a lent GPU: one process per (setting, seed), all at once. Each run is a small,
# launch-bound network, so the GPU and its 16 cores take them together, where this 2-core machine runs two at a
# time. WORK/MODEL holds the study model's base and data, carried from here, so that the rows convert the base that
# runs here from the same WORK convert (a base trained there would differ by the machine's numerics).
#
#   benchmarks/gpu_study.sh OUT WORK MODEL SEEDS 'TAG::OVERRIDES_JSON' ...
#   python benchmarks/gamma_study.py --work W --record R --merge R study.json   # back here (OUT/study.json: every run)
#
# Environment: N (Monte-Carlo samples, 10000), LIMIT (seconds one run may take, 500: a run past it is lost, the
# others are kept).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
out="${1:?usage: gpu_study.sh OUT WORK MODEL SEEDS TAG::JSON ...}" work="$2" model="$3" seeds="$4"
shift 4
n="${N:-10000}" python="${PYTHON:-python3}"
mkdir -p "$out"
# the base's certification, once: the runs would otherwise each write the file the others read
"$python" -c "import sys; from pathlib import Path; from benchmarks.gamma_study import base_record, prepare
work = Path(sys.argv[1]); base_record(sys.argv[2], prepare(sys.argv[2], work), work, int(sys.argv[3]))" \
    "$work" "$model" "$n" > "$out/base.log" 2>&1 || { tail -n 5 "$out/base.log"; exit 1; }
for setting in "$@"; do
    tag="${setting%%::*}" overrides="${setting#*::}"
    for seed in ${seeds//,/ }; do
        name="$(echo "$tag" | tr -c 'A-Za-z0-9.\n' '_')-seed$seed"
        timeout "${LIMIT:-500}" "$python" benchmarks/gamma_study.py --work "$work" --record "$out/$name.json" \
            --models "$model" --seeds "$seed" --n "$n" --overrides "$overrides" --tag "$tag" \
            > "$out/$name.log" 2>&1 &
    done
done
wait
for log in "$out"/*seed*.log; do echo "$log: $(tail -c 120 "$log" | tail -n 1)"; done
# one record of every finished run (a lent machine sends back a few files only)
"$python" benchmarks/gamma_study.py --work "$work" --record "$out/study.json" --merge "$out"/*seed*.json
