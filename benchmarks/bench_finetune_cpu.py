"""Fine-tuning step time on the CPU: our loop (adapters.finetune) beside the Hugging Face Trainer with
the same PEFT LoRA, on SmolLM2-135M-Instruct and GSM8K.

Rows (batch 4, max_length 256, the same 64 training examples, AdamW, lr 3e-4):

* peer: ``transformers.Trainer`` + stock PEFT LoRA, padded batches (``DataCollatorForSeq2Seq``), the
  LLM-Adapters set-up;
* ours, LoRA with padded batches (``pack=False``) — the same work as the peer;
* ours, LoRA / HypLoRA / HydraLoRA (4 heads) with packed sequences (padding-free attention).

Reported per row: median seconds per optimizer step over the steps after the first, and real (non-pad)
tokens per second; the machine's load average before and after is recorded (other jobs on the two
cores slow every row). Packed rows carry more examples per step, so compare tokens per second across
layouts and seconds per step within one layout.

Run: python benchmarks/bench_finetune_cpu.py   → appends a run to benchmarks/results/finetune_cpu.json
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from adapters.data import load_examples, pack, tokenize_for_training  # noqa: E402
from adapters.train import TrainSettings, finetune  # noqa: E402
from geoprobe.errors import DataFormatError  # noqa: E402
from benchmarks.results_log import append_run, results_path  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "gsm8k"
STEPS = 8
BATCH = 4
MAX_LENGTH = 256
N_EXAMPLES = 64
R = 16


def _median_after_first(times: list[float]) -> float:
    gaps = [b - a for a, b in zip(times, times[1:])]
    return statistics.median(gaps)


def run_ours(lm, examples, method: str, packed: bool) -> dict:
    stamps: list[float] = []
    settings = TrainSettings(lr=3e-4, max_steps=STEPS, batch_size=BATCH, max_length=MAX_LENGTH,
                             save_every=STEPS, pack=packed, warmup_ratio=0.0)
    extra = {"n_heads": 4} if method == "hydralora" else {}
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        stamps.append(t0)
        run = finetune(lm.model, lm.tokenizer, examples, method, out=Path(out) / "run", settings=settings,
                       progress=False, r=R, model_name=lm.name, on_step=lambda step, loss: stamps.append(time.perf_counter()),
                       **extra)
        run.model.unload()
    rows = tokenize_for_training(examples, lm.tokenizer, max_length=MAX_LENGTH)
    seqs = pack(rows, MAX_LENGTH) if packed else rows
    per_step = _median_after_first(stamps[1:])
    tokens_per_step = sum(len(s["input_ids"]) for s in seqs) / len(seqs) * BATCH
    return {"row": f"ours {method} {'packed' if packed else 'padded'}", "seconds_per_step": per_step,
            "tokens_per_second": tokens_per_step / per_step, "final_loss": run.result.loss_values[-1],
            "trainable_parameters": run.result.trainable_parameters}


def run_trainer(lm, examples) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    tok = lm.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    rows = tokenize_for_training(examples, tok, max_length=MAX_LENGTH)
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    torch.manual_seed(0)
    model = get_peft_model(lm.model, LoraConfig(r=R, lora_alpha=2 * R, lora_dropout=0.05, task_type="CAUSAL_LM",
                                                target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]))
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=BATCH, max_steps=STEPS,
                                 learning_rate=3e-4, lr_scheduler_type="linear", warmup_steps=0,
                                 logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                                 disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
                                 seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=rows,
                          data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
                          callbacks=[Stamp()])
        stamps.append(time.perf_counter())
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    model.unload()
    per_step = _median_after_first(stamps[1:])
    tokens_per_step = sum(len(r["input_ids"]) for r in rows) / len(rows) * BATCH
    return {"row": "peer transformers.Trainer + PEFT LoRA padded", "seconds_per_step": per_step,
            "tokens_per_second": tokens_per_step / per_step, "final_loss": losses[-1] if losses else None,
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def main() -> None:
    from geoprobe.models import load_model

    load_before = os.getloadavg()

    lm = load_model()
    examples = []  # the first N_EXAMPLES whose answer fits MAX_LENGTH, the same set for every row
    for ex in load_examples(DATA / "train.jsonl", limit=4 * N_EXAMPLES):
        try:
            tokenize_for_training([ex], lm.tokenizer, max_length=MAX_LENGTH)
        except DataFormatError:
            continue
        examples.append(ex)
        if len(examples) == N_EXAMPLES:
            break
    results = [run_trainer(lm, examples), run_ours(lm, examples, "lora", packed=False)]
    for method in ("lora", "hyplora", "hydralora"):
        results.append(run_ours(lm, examples, method, packed=True))
    for r in results:
        print(f"{r['row']:<48} {r['seconds_per_step']:7.2f} s/step {r['tokens_per_second']:8.0f} tokens/s")
    append_run(results_path("finetune_cpu"), {
        "benchmark": "fine-tuning step time, SmolLM2-135M-Instruct, GSM8K",
        "settings": {"steps": STEPS, "batch_size": BATCH, "max_length": MAX_LENGTH, "examples": N_EXAMPLES,
                     "r": R, "torch_threads": torch.get_num_threads()},
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "load_average_1_5_15min_before": list(load_before),
                    "load_average_1_5_15min_after": list(os.getloadavg())},
        "results": results,
    })


if __name__ == "__main__":
    main()
