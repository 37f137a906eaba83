"""Fine-tuning throughput on a GPU: our loop (``adapters.train.finetune``) beside a plain Hugging Face
``Trainer`` + PEFT LoRA script, on SmolLM2-135M-Instruct and GSM8K, in one run.

Every row trains on the same examples (the first ``steps × batch`` GSM8K training examples whose
prompt + answer fit ``max_length`` tokens, so nothing is cut), for one epoch of exactly ``steps``
optimizer steps, with the same LoRA set-up (r, α = 2r, dropout 0.05, q/k/v/up/down projections), AdamW
at the same learning rate with linear decay and no warm-up, gradient clipping at 1, seed 0, bf16
autocast on CUDA over float32 weights (float32 on the CPU):

* peer — ``transformers.Trainer`` + stock PEFT LoRA, ``batch`` examples per step, padded to the longest
  in the batch (``DataCollatorForSeq2Seq``, ``pad_to_multiple_of=8`` as LLM-Adapters does),
  ``bf16=True``, the Trainer's default optimizer (fused AdamW), ``use_cache`` off, logging every
  ``log_every`` steps; no grouping by length, no packing;
* ours LoRA padded — ``finetune(pack=False)``, the same padded batches of ``batch`` examples: the
  like-for-like row;
* ours LoRA / HypLoRA / HydraLoRA (4 heads) packed — the same examples packed into rows of about
  ``max_length`` tokens (padding-free attention), as many rows per step as make one epoch exactly
  ``steps`` steps, so every step carries the same real tokens on average as a peer step. The packed
  row length is the length nearest ``max_length`` (never below the longest example) for which such a
  whole number of rows per step exists.

Timing: a global optimizer-step hook stamps every step of every row (ours and the Trainer alike),
synchronising CUDA at the end of the warm-up steps and at the last step. Reported per row over the
steady-state steps (after ``warmup``): seconds per step, real (non-pad) tokens per second — the tokens
are counted per step (from the Trainer's collated batches, from our loop's batch order) — tokens per
second relative to the peer, tokens processed per step including padding, peak GPU memory, and the
final training loss: the mean of the per-step losses over the last ``window`` steps (the peer logs
means over ``log_every`` steps; ours reads its losses just as often), next to the loss of every
logging interval.

Batch size. The default peer batch is 64 × up to 512 tokens (about 12k real, 23k padded tokens a
step). A 135M model at 16 examples a step keeps an H200 waiting on kernel launches for both loops, so
that setting measures Python overhead rather than training throughput; ``--batch-size 16`` runs it.

Run on the GPU machine:
  python benchmarks/bench_finetune_gpu.py --model SmolLM2-135M-Instruct.Q4_1.gguf --data gsm8k/
      → appends a run to benchmarks/results/finetune_gpu.json
Check on the CPU end to end (tiny subset, few steps; times mean nothing there):
  python benchmarks/bench_finetune_gpu.py --small   → the same file, a run labelled small
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from adapters.data import load_examples, pack, tokenize_for_training  # noqa: E402
from adapters.train import Order as _Order, TrainSettings, data_digest as _data_digest, finetune  # noqa: E402
from benchmarks.results_log import append_run, results_path  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "gsm8k"
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
PEER = "peer transformers.Trainer + PEFT LoRA, padded"


@dataclass(frozen=True)
class Config:
    steps: int
    warmup: int
    batch: int
    max_length: int
    log_every: int
    window: int
    r: int = 16
    lr: float = 3e-4
    seed: int = 0
    dropout: float = 0.05
    hydra_heads: int = 4

    @property
    def n_examples(self) -> int:
        return self.steps * self.batch


FULL = Config(steps=80, warmup=10, batch=64, max_length=512, log_every=10, window=20)
SMALL = Config(steps=4, warmup=1, batch=4, max_length=256, log_every=2, window=2)


# --------------------------------------------------------------------------- data
def choose_examples(path: Path, tokenizer: Any, cfg: Config) -> tuple[list, list[dict[str, list[int]]]]:
    """The first ``cfg.n_examples`` training examples whose whole sequence fits ``max_length``, and
    their answer-masked token rows (identical for every row of the benchmark: nothing is cut)."""
    source = path / "train.jsonl" if path.is_dir() else path
    pool = load_examples(source, limit=2 * cfg.n_examples + 100)
    rows = tokenize_for_training(pool, tokenizer, max_length=10 ** 6)
    keep = [i for i, r in enumerate(rows) if len(r["input_ids"]) <= cfg.max_length][:cfg.n_examples]
    if len(keep) < cfg.n_examples:
        raise SystemExit(f"{source} has only {len(keep)} examples within {cfg.max_length} tokens among the "
                         f"first {len(pool)}; {cfg.n_examples} are needed (lower --steps or --batch-size)")
    return [pool[i] for i in keep], [rows[i] for i in keep]


def packed_layout(rows: list[dict[str, list[int]]], steps: int, length: int) -> tuple[int, int, int]:
    """(row length L, rows per step, number of packed rows P) such that one epoch of P rows in
    batches of that size takes exactly ``steps`` steps; L is the length nearest ``length`` (at least
    the longest example, at most 1.25·length) that allows it."""
    longest = max(len(r["input_ids"]) for r in rows)
    low, high = max(longest, 2), max(longest, length + length // 4)
    start = min(max(length, low), high)
    for delta in range(high - low + 1):
        for cand in dict.fromkeys((start - delta, start + delta)):
            if low <= cand <= high:
                n = len(pack(rows, cand))
                per_step = math.ceil(n / steps)
                if (steps - 1) * per_step < n:
                    return cand, per_step, n
    raise SystemExit(f"no packed row length in [{low}, {high}] splits these examples into exactly {steps} "
                     "steps; change --steps")


def tokens_per_step(seqs: list[dict[str, list[int]]], batch: int, seed: int, steps: int) -> tuple[list[int], list[int]]:
    """Real tokens and tokens including padding (rows × longest row) of each step of our loop,
    from its batch order (one micro-batch per step)."""
    order = _Order(len(seqs), batch, seed)
    real, padded = [], []
    for m in range(steps):
        lengths = [len(seqs[i]["input_ids"]) for i in order.indices(m)]
        real.append(sum(lengths))
        padded.append(len(lengths) * max(lengths))
    return real, padded


# --------------------------------------------------------------------------- timing
class StepClock:
    """Stamps every optimizer step (any torch optimizer, through the global step post-hook),
    synchronising CUDA at the end of the warm-up and at the last step so that the steady-state
    interval measures finished GPU work."""

    def __init__(self, warmup: int, steps: int, cuda: bool) -> None:
        self.warmup, self.steps, self.cuda = warmup, steps, cuda
        self.stamps: list[float] = []

    def _hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        n = len(self.stamps) + 1
        if self.cuda and n in (self.warmup, self.steps):
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())

    def __enter__(self) -> "StepClock":
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self._handle = register_optimizer_step_post_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()

    def steady(self) -> tuple[float, list[float]]:
        """(seconds from the end of the warm-up to the end of the last step, unsynchronised gaps)."""
        if len(self.stamps) != self.steps:
            raise RuntimeError(f"counted {len(self.stamps)} optimizer steps, expected {self.steps}")
        gaps = [b - a for a, b in zip(self.stamps[self.warmup - 1:], self.stamps[self.warmup:])]
        return self.stamps[-1] - self.stamps[self.warmup - 1], gaps


def _reset_memory(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _row(name: str, cfg: Config, clock: StepClock, real: list[int], padded: list[int], losses: list[float],
         cuda: bool, **extra: Any) -> dict:
    seconds, gaps = clock.steady()
    steady_real = sum(real[cfg.warmup:cfg.steps])
    return {"row": name, "steps": cfg.steps, "steady_steps": cfg.steps - cfg.warmup,
            "seconds_per_step": seconds / (cfg.steps - cfg.warmup),
            "median_unsynchronised_step_gap_s": statistics.median(gaps),
            "tokens_per_second": steady_real / seconds,
            "real_tokens_per_step": steady_real / (cfg.steps - cfg.warmup),
            "processed_tokens_per_step": sum(padded[cfg.warmup:cfg.steps]) / (cfg.steps - cfg.warmup),
            "real_tokens_all_steps": sum(real),
            "final_loss": statistics.fmean(losses[-(cfg.window // cfg.log_every):]),
            "loss_by_log_interval": losses,
            "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
            **extra}


# --------------------------------------------------------------------------- the rows
def train_peer(lm: Any, rows: list[dict[str, list[int]]], cfg: Any, cuda: bool, *, seed: int,
               liger: bool = False) -> dict[str, Any]:
    """The peer: ``transformers.Trainer`` + PEFT LoRA (r, α = 2r, dropout and targets of ``cfg``) on the
    answer-masked ``rows``, batches of ``cfg.batch`` padded to the longest (a multiple of 8), linear
    decay from ``cfg.lr``, bf16 on CUDA, Liger-Kernel through ``use_liger_kernel`` when ``liger``; the
    model's adapters are removed again afterwards. Returns the step clock, the real and padded tokens
    of every batch, the loss of every ``cfg.log_every`` steps, the trainable parameters and the
    optimizer's name."""
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tok = lm.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    collator = DataCollatorForSeq2Seq(tok, padding=True, pad_to_multiple_of=8, label_pad_token_id=-100,
                                      return_tensors="pt")
    real: list[int] = []
    padded: list[int] = []

    def counting_collator(features: list[dict]) -> dict:
        batch = collator(features)
        real.append(int(batch["attention_mask"].sum()))
        padded.append(int(batch["input_ids"].numel()))
        return batch

    _reset_memory(cuda)
    use_cache = lm.model.config.use_cache
    lm.model.config.use_cache = False
    torch.manual_seed(seed)
    model = get_peft_model(lm.model, LoraConfig(r=cfg.r, lora_alpha=2 * cfg.r, lora_dropout=cfg.dropout,
                                                task_type="CAUSAL_LM", target_modules=TARGETS))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    try:
        with tempfile.TemporaryDirectory() as out:
            args = TrainingArguments(
                output_dir=out, per_device_train_batch_size=cfg.batch, max_steps=cfg.steps,
                learning_rate=cfg.lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
                max_grad_norm=1.0, logging_steps=cfg.log_every, save_strategy="no", report_to=[],
                bf16=cuda, use_cpu=not cuda, disable_tqdm=True, dataloader_num_workers=0,
                remove_unused_columns=False, label_names=["labels"], seed=seed, data_seed=seed,
                use_liger_kernel=liger)
            trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=counting_collator)
            with StepClock(cfg.warmup, cfg.steps, cuda) as clock:
                trainer.train()
            log = [h for h in trainer.state.log_history if "loss" in h]
            optimizer = type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                             else trainer.optimizer).__name__
            fused = any(g.get("fused") for g in trainer.optimizer.param_groups)
            del trainer
    finally:
        model.unload()
        lm.model.config.use_cache = use_cache
    if [h["step"] for h in log] != list(range(cfg.log_every, cfg.steps + 1, cfg.log_every)):
        raise RuntimeError(f"the Trainer logged at steps {[h['step'] for h in log]}")
    return {"clock": clock, "real": real[:cfg.steps], "padded": padded[:cfg.steps],
            "losses": [float(h["loss"]) for h in log], "trainable": trainable,
            "optimizer": f"{optimizer}{' fused' if fused else ''}"}


def run_peer(lm: Any, rows: list[dict[str, list[int]]], cfg: Config, cuda: bool) -> dict:
    peer = train_peer(lm, rows, cfg, cuda, seed=cfg.seed)
    return _row(PEER, cfg, peer["clock"], peer["real"], peer["padded"], peer["losses"], cuda, batch_rows=cfg.batch,
                row_length="longest in batch, multiple of 8", trainable_parameters=peer["trainable"],
                optimizer=peer["optimizer"])


def run_ours(lm: Any, rows: list[dict[str, list[int]]], examples: list, cfg: Config, method: str, packed: bool,
             layout: Optional[tuple[int, int, int]], cuda: bool) -> dict:
    length, per_step = (layout[0], layout[1]) if packed else (cfg.max_length, cfg.batch)
    seqs = pack(rows, length) if packed else rows
    settings = TrainSettings(lr=cfg.lr, max_steps=cfg.steps, batch_size=per_step, max_length=length,
                             save_every=cfg.steps, pack=packed, warmup_ratio=0.0, weight_decay=0.0,
                             max_grad_norm=1.0, seed=cfg.seed, log_every=cfg.log_every)
    extra = {"n_heads": cfg.hydra_heads} if method == "hydralora" else {}
    name = f"ours {method} {'packed' if packed else 'padded'}"
    _reset_memory(cuda)
    with tempfile.TemporaryDirectory() as out:
        with StepClock(cfg.warmup, cfg.steps, cuda) as clock:
            run = finetune(lm.model, lm.tokenizer, examples, method, out=Path(out) / "run", settings=settings,
                           progress=False, r=cfg.r, alpha=2 * cfg.r, dropout=cfg.dropout, target_modules=TARGETS,
                           model_name=lm.name, **extra)
        run.model.unload()
    res = run.result
    if res.settings["data_sha256"] != _data_digest(seqs) or res.settings["n_dropped_too_long"]:
        raise RuntimeError(f"{name}: the loop trained on other sequences than the ones counted here")
    if res.loss_steps != list(range(1, cfg.steps + 1)):
        raise RuntimeError(f"{name}: recorded steps {res.loss_steps}")
    real, padded = tokens_per_step(seqs, per_step, cfg.seed, cfg.steps)
    losses = [statistics.fmean(res.loss_values[i:i + cfg.log_every]) for i in range(0, cfg.steps, cfg.log_every)]
    return _row(name, cfg, clock, real, padded, losses, cuda, batch_rows=per_step, row_length=length,
                trainable_parameters=res.trainable_parameters, optimizer=res.settings["optimizer"],
                per_step_losses=res.loss_values)


# --------------------------------------------------------------------------- main
def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda or "none"}
    for dist in ("transformers", "peft", "accelerate", "triton"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "absent"
    return out


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="GGUF file / model folder (default: the embedded SmolLM2)")
    p.add_argument("--data", type=Path, default=DATA, help="GSM8K folder (train.jsonl) or file")
    p.add_argument("--out", type=Path, default=None,
                   help="results file to append the run to (default: benchmarks/results/finetune_gpu.json)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--small", action="store_true", help="tiny subset, a few steps (CPU check)")
    p.add_argument("--batch-size", type=int, default=None, help="peer examples per step")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per row")
    p.add_argument("--warmup", type=int, default=None, help="steps left out of the timing")
    p.add_argument("--max-length", type=int, default=None, help="longest example / packed row length")
    p.add_argument("--skip", default="", help="comma-separated rows to leave out: hyplora, hydralora, padded")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    from geoprobe.models import load_model

    args = parse_args(argv)
    base = SMALL if args.small else FULL
    cfg = Config(**{**asdict(base), **{k: v for k, v in {
        "batch": args.batch_size, "steps": args.steps, "warmup": args.warmup,
        "max_length": args.max_length}.items() if v is not None}})
    if not (1 <= cfg.warmup < cfg.steps) or cfg.steps % cfg.log_every or cfg.window % cfg.log_every \
            or cfg.window > cfg.steps:
        raise SystemExit(f"steps {cfg.steps} must be a multiple of {cfg.log_every}, with 1 ≤ warm-up < steps "
                         f"and the loss window ({cfg.window}) within them")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    out = args.out or results_path("finetune_gpu")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    t_start = time.perf_counter()
    lm = load_model(args.model, device=device)
    examples, rows = choose_examples(args.data, lm.tokenizer, cfg)
    layout = packed_layout(rows, cfg.steps, cfg.max_length)
    load_seconds = time.perf_counter() - t_start

    results = [run_peer(lm, rows, cfg, cuda)]
    plan = ([] if "padded" in skip else [("lora", False)]) + [("lora", True)] + \
        [(m, True) for m in ("hyplora", "hydralora") if m not in skip]
    failed = []
    for method, packed in plan:
        try:
            results.append(run_ours(lm, rows, examples, cfg, method, packed, layout, cuda))
        except Exception as exc:  # an adapter method that fails does not hide the other rows
            if method == "lora":
                raise
            failed.append({"row": f"ours {method} packed", "error": f"{type(exc).__name__}: {exc}"})
            print(f"ours {method} packed FAILED: {type(exc).__name__}: {exc}")
    peer = results[0]
    for r in results:
        r["tokens_per_second_vs_peer"] = r["tokens_per_second"] / peer["tokens_per_second"]
        r["final_loss_minus_peer"] = r["final_loss"] - peer["final_loss"]
    for r in results:
        print(f"{r['row']:<48} {r['tokens_per_second']:10.0f} tok/s  {r['seconds_per_step']:8.4f} s/step  "
              f"loss {r['final_loss']:.4f}  ×{r['tokens_per_second_vs_peer']:.2f} vs peer")
    lora_packed = next(r for r in results if r["row"] == "ours lora packed")
    steps_losses = lora_packed["per_step_losses"][-cfg.window:]
    noise = statistics.stdev(steps_losses) / math.sqrt(len(steps_losses)) if len(steps_losses) > 1 else None
    total_real = sum(len(r["input_ids"]) for r in rows)
    append_run(out, {
        "benchmark": "fine-tuning throughput, SmolLM2-135M-Instruct, GSM8K: adapters.train.finetune vs "
                     "transformers.Trainer + PEFT LoRA",
        "command": "python " + " ".join(shlex.quote(a) for a in ([sys.argv[0]] + (argv if argv is not None
                                                                                  else sys.argv[1:]))),
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "versions": _versions(),
        "model": {"spec": args.model or "embedded default", "name": lm.name},
        "data": str(args.data),
        "settings": {**asdict(cfg), "examples": cfg.n_examples, "real_tokens_per_epoch": total_real,
                     "answer_tokens_per_epoch": sum(sum(t != -100 for t in r["labels"]) for r in rows),
                     "longest_example": max(len(r["input_ids"]) for r in rows),
                     "packed_row_length": layout[0], "packed_rows_per_step": layout[1],
                     "packed_rows": layout[2], "compute": "bf16 autocast, float32 weights" if cuda else "float32",
                     "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()},
        "final_loss": {"definition": f"mean per-step training loss over the last {cfg.window} steps",
                       "standard_error_ours_lora_packed": noise,
                       "standard_error_of_a_difference": noise * math.sqrt(2) if noise is not None else None},
        "seconds_loading": load_seconds,
        "seconds_total": time.perf_counter() - t_start,
        "results": results,
        "failed_rows": failed,
    }, label="small" if args.small else "default")
    print(f"written {out}")


if __name__ == "__main__":
    main()
