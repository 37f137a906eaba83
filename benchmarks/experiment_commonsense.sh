#!/usr/bin/env bash
# The commonsense table, HydraLoRA's heterogeneous-mixture setting: SmolLM2-135M-Instruct fine-tuned on the
# union of the available LLM-Adapters commonsense training sets (ARC-Challenge, ARC-Easy, BoolQ, OpenBookQA;
# repeated --data, visited in each seed's own fixed order) with each adapter method at the parameter budget
# of a rank-16 LoRA, three seeds, evaluated on those four test sets and on PIQA, SIQA and WinoGrande (no
# training split of these is available), through `geoprobe compare`. `auto` records the method it chose,
# how many HydraLoRA heads and why (summary.json "auto", plans/auto.json, the report). A rerun resumes.
#
#   bash benchmarks/experiment_commonsense.sh              # data from ../shared/data/llm_adapters_commonsense
#   DATA=carry/data/commonsense MODEL=~/smol.gguf DEST=... bash benchmarks/experiment_commonsense.sh
#
# MODEL (default: the embedded SmolLM2-135M-Instruct), DATA, DEST (default
# reports/experiments/commonsense-smollm2), METHODS, SEEDS, STEPS, LIMIT (training rows per set) and
# EVAL_LIMIT override the settings below; JOBS=N runs the methods in N processes side by side on one GPU
# (`geoprobe compare --jobs`). PROBE_AFTER=1 then probes every fine-tuned model beside the base
# model (--probe-after).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/llm_adapters_commonsense}
DEST=${DEST:-reports/experiments/commonsense-smollm2}
train=()
for set in ARC-Challenge ARC-Easy boolq openbookqa; do train+=(--data "$DATA/$set/train.json"); done
evals=()
for set in ARC-Challenge ARC-Easy boolq openbookqa piqa social_i_qa winogrande; do
    evals+=(--eval "$DATA/$set/test.json")
done
limit=(); [ -n "${LIMIT:-}" ] && limit=(--limit "$LIMIT")
exec "${PYTHON:-python3}" -m geoprobe compare ${MODEL:+"$MODEL"} "${train[@]}" "${limit[@]}" "${evals[@]}" \
    --methods "${METHODS:-none,lora,gelora,hyplora,hydralora,auto}" --seeds "${SEEDS:-3}" --r 16 \
    --max-steps "${STEPS:-300}" --batch-size 16 --max-length 256 --lr 2e-4 \
    --eval-limit "${EVAL_LIMIT:-200}" --out "$DEST" --quiet --jobs "${JOBS:-1}" \
    $([ "${PROBE_AFTER:-0}" = 1 ] && echo --probe-after)
