#!/usr/bin/env bash
# The math table: SmolLM2-135M-Instruct fine-tuned on LLM-Adapters' math_data.json with each adapter method at
# the parameter budget of a rank-16 LoRA, three seeds, evaluated on the LLM-Adapters math test sets (GSM8K,
# SVAMP, MAWPS, AddSub, SingleEq, MultiArith, AQuA), through `geoprobe compare`, HypLoRA also at the
# scale-matched α·√d_in (hyplora-matched). A rerun resumes (an arm added to a finished folder runs only its
# own runs).
#
#   bash benchmarks/experiment_math.sh                        # data from ../shared/data/llm_adapters_math
#   DATA=carry/data/math MODEL=~/smol.gguf DEST=... bash benchmarks/experiment_math.sh
#
# MODEL (default: the embedded SmolLM2-135M-Instruct), DATA, DEST (default reports/experiments/math-smollm2),
# METHODS, SEEDS, STEPS and EVAL_LIMIT override the settings below; JOBS=N runs the methods in N processes side
# by side on one GPU (`geoprobe compare --jobs`). Every fine-tuned model is then probed
# beside the base model (--probe-after: how each adapter moved per-prompt δ_rel and the per-layer intrinsic
# dimension, DEST/after.json); PROBE_AFTER=0 leaves that out.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/llm_adapters_math}
DEST=${DEST:-reports/experiments/math-smollm2}
evals=()
for set in gsm8k SVAMP mawps AddSub SingleEq MultiArith AQuA; do evals+=(--eval "$DATA/$set/test.json"); done
args=(${MODEL:+"$MODEL"} --data "$DATA/train/math_data.json" "${evals[@]}" --seeds "${SEEDS:-3}" --r 16
      --max-steps "${STEPS:-200}" --batch-size 16 --max-length 256 --lr 2e-4
      --eval-limit "${EVAL_LIMIT:-120}" --out "$DEST" --quiet)
[ "${PROBE_AFTER:-1}" = 0 ] || args+=(--probe-after)
exec "${PYTHON:-python3}" -m geoprobe compare "${args[@]}" --methods "${METHODS:-none,lora,gelora,hyplora,dora,hyplora-matched}" \
    --jobs "${JOBS:-1}"
