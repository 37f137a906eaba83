#!/usr/bin/env bash
# The GPU checks of a change to the adapter layers or the probes' fast paths, in one command on a CUDA
# machine: every gpu-marked test, then the HypLoRA and HydraLoRA model benchmarks on this tree and, when
# BASELINE names a checkout of an earlier commit, on that tree too, interleaved in the same run so the two
# are compared on one card.
#
#   OUT=/some/folder BASELINE=/path/to/old/checkout [ROUNDS=2] bash benchmarks/gpu_checks.sh
#
# ROUNDS (default 2) is how many times the trees alternate.
#
# Writes $OUT/gpu_tests.txt and $OUT/{hyplora,hydralora}_model{,_baseline}.json; exits non-zero when a test
# fails.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1

"${PYTHON:-python3}" -m pytest -m gpu tests -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt"
tests_rc=${PIPESTATUS[0]}

run_models() {  # $1: tree, $2: suffix of the result files
    (cd "$1" && PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python3}" benchmarks/bench_hyplora_model.py \
        --methods "peft lora,hyplora fused" --repeats 5 --steps 4 --out "$OUT/hyplora_model$2.json" &&
     PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python3}" benchmarks/bench_hydralora_model.py \
        --methods "peft lora,hydralora" --repeats 5 --steps 4 --out "$OUT/hydralora_model$2.json")
}
for round in $(seq 1 "${ROUNDS:-2}"); do  # alternate the trees so that drift of the host affects both alike
    run_models "$PWD" "_round$round" || tests_rc=1
    if [ -n "${BASELINE:-}" ]; then
        run_models "$BASELINE" "_baseline_round$round" || tests_rc=1
    fi
done
exit "$tests_rc"
