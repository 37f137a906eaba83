"""Small-model fine-tuning throughput: ``geoprobe finetune``'s loop (LoRA, HypLoRA) beside
``transformers.Trainer`` + PEFT LoRA, with and without Liger-Kernel, on SmolLM2-135M-Instruct and GSM8K
at 16 examples × up to 256 tokens a step, over several seeds, each (row, seed) in a fresh process.

The same training data for every row: the first ``steps × batch`` GSM8K training examples whose
answer-masked sequence (``adapters.data.tokenize_for_training``: prompt labelled −100, answer + EOS
trained) fits ``max_length`` tokens, so nothing is cut; one epoch of exactly ``steps`` optimizer steps;
LoRA r = 16, α = 32, dropout 0.05 on q/k/v/up/down projections; AdamW, lr 3e-4 with linear decay and no
warm-up, no weight decay, gradient clipping at 1; bf16 autocast on CUDA over the loaded weights
(float32 on the CPU); the seed sets the adapter initialisation, the dropout and the data order.

Rows:

* ``peer`` — ``transformers.Trainer`` + stock PEFT LoRA on those answer-masked rows, ``batch`` examples
  a step padded to the longest (``DataCollatorForSeq2Seq``, labels −100 on the padding, multiple of 8),
  ``bf16=True``, its default fused AdamW; the loss is the mean over the answer tokens of the batch;
* ``peer-liger`` — the same with ``use_liger_kernel=True`` (only where ``liger_kernel`` imports);
* ``lora``, ``hyplora`` — ``adapters.train.finetune`` (what ``geoprobe finetune`` runs) with packed
  sequences of ``max_length`` tokens, as many rows a step as make the one epoch exactly ``steps`` steps,
  so a step carries the same examples on average as a peer step;
* ``lora-compiled`` — ``lora`` with the transformer blocks compiled in torch.compile's default mode
  (``--compile-mode default``, :mod:`adapters.train.compiled`); the compile happens in the warm-up
  steps, outside the timing (every step has one batch shape, so nothing recompiles later);
* ``lora-graphs``, ``hyplora-graphs`` — ``--compile`` as it runs on CUDA (mode ``reduce-overhead``):
  each compiled block's forward and backward also replayed as a CUDA graph;
* ``lora-padded`` — ours unpacked, ``batch`` examples a step padded to the longest (like for like).

Per row and seed: tokens per second over the steps after ``warmup`` (a global optimizer-step hook stamps
every step; CUDA is synchronised at the end of the warm-up and at the last step), counting for every row
the same tokens: the non-padding tokens of the sequences processed; the final loss, the mean per-step
training loss over the last ``window`` steps. Across seeds: mean and standard deviation of both, and for
each row the difference of its mean final loss from the peer's with a 95 % Welch t interval: an
interval that holds 0 means "within seed noise".

Run on the GPU machine (about 15 fresh processes of a minute each):
  python benchmarks/bench_small_train.py --model SmolLM2-135M-Instruct.Q4_1.gguf --data ../shared/data/gsm8k
      → appends a run to benchmarks/results/small_train.json
  (``--runs-dir DIR`` keeps each finished row and seed in DIR, and a rerun with the same settings resumes)
Check on the CPU (a tiny random Llama with SmolLM2's tokenizer, a few steps, two seeds, one process):
  python benchmarks/bench_small_train.py --small
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from adapters.data import pack  # noqa: E402
from adapters.train import TrainSettings, data_digest, finetune  # noqa: E402
from benchmarks.bench_finetune_gpu import (StepClock, _reset_memory, _row, _versions, choose_examples,  # noqa: E402
                                           packed_layout, tokens_per_step, train_peer)
from benchmarks.results_log import append_run, results_path  # noqa: E402
from geoprobe.records import write_json  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "gsm8k"
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
ROWS = ("peer", "peer-liger", "lora", "lora-compiled", "lora-graphs", "hyplora", "hyplora-graphs", "lora-padded")
NAMES = {"peer": "transformers.Trainer + PEFT LoRA", "peer-liger": "transformers.Trainer + PEFT LoRA + Liger",
         "lora": "geoprobe finetune lora (packed)", "hyplora": "geoprobe finetune hyplora (packed)",
         "lora-compiled": "geoprobe finetune lora --compile-mode default (packed, compiled blocks)",
         "lora-graphs": "geoprobe finetune lora --compile (packed, blocks as CUDA graphs)",
         "hyplora-graphs": "geoprobe finetune hyplora --compile (packed, blocks as CUDA graphs)",
         "lora-padded": "geoprobe finetune lora, padded batches"}


@dataclass(frozen=True)
class Config:
    steps: int = 150
    warmup: int = 20
    batch: int = 16
    max_length: int = 256
    log_every: int = 10
    window: int = 50
    r: int = 16
    lr: float = 3e-4
    dropout: float = 0.05

    @property
    def n_examples(self) -> int:
        return self.steps * self.batch


FULL = Config()
SMALL = Config(steps=4, warmup=1, batch=2, log_every=2, window=2)


def liger_available() -> bool:
    try:
        import liger_kernel  # noqa: F401
    except Exception:
        return False
    return True


# --------------------------------------------------------------------------- one row, one seed
def load(spec: Optional[str], small: bool, device: str) -> Any:
    """The model and tokenizer: the project's loader (``spec`` or the embedded SmolLM2), or for
    ``small`` a random 2-layer Llama (hidden 16) with SmolLM2's tokenizer."""
    from geoprobe.models import load_model, load_tokenizer

    if not small:
        return load_model(spec, device=device)
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(spec)
    torch.manual_seed(1234)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=None)
    return SimpleNamespace(model=LlamaForCausalLM(cfg).to(device).eval(), tokenizer=tok, name="tiny-llama")


def run_peer(lm: Any, rows: list[dict], cfg: Config, seed: int, cuda: bool, row: str, liger: bool) -> dict:
    peer = train_peer(lm, rows, cfg, cuda, seed=seed, liger=liger)
    return _row(row, cfg, peer["clock"], peer["real"], peer["padded"], peer["losses"], cuda, batch_rows=cfg.batch,
                row_length="longest in batch, multiple of 8", optimizer=peer["optimizer"])


def run_ours(lm: Any, rows: list[dict], examples: list, cfg: Config, seed: int, row: str, method: str,
             packed: bool, cuda: bool, compiled: bool = False, mode: str = "default") -> dict:
    if packed:
        length, per_step, _ = packed_layout(rows, cfg.steps, cfg.max_length)
        seqs = pack(rows, length)
    else:
        length, per_step, seqs = cfg.max_length, cfg.batch, rows
    settings = TrainSettings(lr=cfg.lr, max_steps=cfg.steps, batch_size=per_step, max_length=length,
                             save_every=cfg.steps, pack=packed, warmup_ratio=0.0, weight_decay=0.0,
                             max_grad_norm=1.0, seed=seed, log_every=cfg.log_every, compile=compiled,
                             compile_mode=mode)
    _reset_memory(cuda)
    with tempfile.TemporaryDirectory() as out:
        with StepClock(cfg.warmup, cfg.steps, cuda) as clock:
            run = finetune(lm.model, lm.tokenizer, examples, method, out=Path(out) / "run", settings=settings,
                           progress=False, r=cfg.r, alpha=2 * cfg.r, dropout=cfg.dropout, target_modules=TARGETS,
                           model_name=lm.name)
    res = run.result
    if res.settings["data_sha256"] != data_digest(seqs) or res.settings["n_dropped_too_long"]:
        raise RuntimeError(f"ours {method}: the loop trained on other sequences than the ones counted here")
    real, padded = tokens_per_step(seqs, per_step, seed, cfg.steps)
    losses = [statistics.fmean(res.loss_values[i:i + cfg.log_every]) for i in range(0, cfg.steps, cfg.log_every)]
    return _row(row, cfg, clock, real, padded, losses, cuda, batch_rows=per_step, row_length=length,
                optimizer=res.settings["optimizer"], per_step_losses=res.loss_values) | {
        "compiled_blocks": res.settings.get("compiled_blocks"), "fast_kernels": res.settings.get("fast_kernels")}


def run_row(row: str, seed: int, args: argparse.Namespace, cfg: Config) -> dict:
    """Load the model, choose the data and train one row with one seed."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    lm = load(args.model, args.small, device)
    examples, rows = choose_examples(args.data, lm.tokenizer, cfg)
    if row in ("peer", "peer-liger"):
        out = run_peer(lm, rows, cfg, seed, cuda, row, liger=row == "peer-liger")
    else:
        method = row.removesuffix("-padded").removesuffix("-compiled").removesuffix("-graphs")
        out = run_ours(lm, rows, examples, cfg, seed, row, method, not row.endswith("-padded"), cuda,
                       compiled=row.endswith(("-compiled", "-graphs")),
                       mode="reduce-overhead" if row.endswith("-graphs") else "default")  # explicit modes
    return {"row": row, "name": NAMES[row], "seed": seed, "model": lm.name,
            "device": torch.cuda.get_device_name() if cuda else "cpu", **out}


# --------------------------------------------------------------------------- across seeds
def welch_interval(a: list[float], b: list[float], level: float = 0.95) -> Optional[tuple[float, float, float]]:
    """(mean(a) − mean(b), low, high): the Welch t interval for a difference of means."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = statistics.fmean(a) - statistics.fmean(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, diff, diff
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = float(stats.t.ppf(0.5 + level / 2, df)) * se
    return diff, diff - half, diff + half


def summarise(runs: list[dict]) -> list[dict]:
    by_row: dict[str, list[dict]] = {}
    for r in runs:
        if "error" not in r:
            by_row.setdefault(r["row"], []).append(r)
    peer = by_row.get("peer", [])
    out = []
    for row, rs in by_row.items():
        tps = [r["tokens_per_second"] for r in rs]
        loss = [r["final_loss"] for r in rs]
        s = {"row": row, "name": NAMES[row], "seeds": [r["seed"] for r in rs],
             "tokens_per_second_mean": statistics.fmean(tps),
             "tokens_per_second_sd": statistics.stdev(tps) if len(tps) > 1 else None,
             "final_loss_mean": statistics.fmean(loss), "final_loss_sd": statistics.stdev(loss) if len(loss) > 1 else None}
        if peer:
            s["tokens_per_second_vs_peer"] = s["tokens_per_second_mean"] / statistics.fmean(
                r["tokens_per_second"] for r in peer)
            w = welch_interval(loss, [r["final_loss"] for r in peer]) if row != "peer" else None
            if w is not None:
                s["final_loss_minus_peer"] = {"mean": w[0], "welch_95_low": w[1], "welch_95_high": w[2],
                                              "within_seed_noise": bool(w[1] <= 0.0 <= w[2])}
        out.append(s)
    return out


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="GGUF file / model folder (default: the embedded SmolLM2)")
    p.add_argument("--data", type=Path, default=DATA, help="GSM8K folder (train.jsonl) or file")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--small", action="store_true", help="tiny random model, a few steps (CPU check)")
    p.add_argument("--rows", default=None, help=f"comma-separated rows out of {','.join(ROWS)} (default: all; "
                   "peer-liger only where liger_kernel imports; --small: peer,lora,hyplora)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; --small 0,1)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per row")
    p.add_argument("--warmup", type=int, default=None, help="steps left out of the timing")
    p.add_argument("--window", type=int, default=None, help="last steps whose mean loss is the final loss")
    p.add_argument("--in-process", action="store_true",
                   help="run every row in this process (default for --small) instead of a fresh one each")
    p.add_argument("--fresh", action="store_true", help="a fresh process per row and seed with --small too")
    p.add_argument("--out", type=Path, default=None, help="results file (default benchmarks/results/small_train.json)")
    p.add_argument("--runs-dir", type=Path, default=None,
                   help="keep each finished (row, seed) here as ROW-SEED.json and reuse those already there, so an "
                        "interrupted run resumes where it stopped (the settings must match)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def config(args: argparse.Namespace) -> Config:
    cfg = replace(SMALL if args.small else FULL, **{k: v for k, v in {
        "steps": args.steps, "warmup": args.warmup, "window": args.window}.items() if v is not None})
    if not (1 <= cfg.warmup < cfg.steps) or cfg.steps % cfg.log_every or cfg.window % cfg.log_every \
            or cfg.window > cfg.steps:
        raise SystemExit(f"--steps {cfg.steps} must be a multiple of {cfg.log_every}, with 1 ≤ --warmup < --steps "
                         f"and --window ({cfg.window}) a multiple of {cfg.log_every} within the steps")
    return cfg


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    cfg = config(args)
    if args.child:  # one row, one seed, in this fresh process
        write_json(args.child_out, run_row(args.child, args.seed, args, cfg))
        return
    if not args.data.exists():
        raise SystemExit(f"--data {args.data}: no such file or folder")
    rows = [r.strip() for r in (args.rows or ("peer,lora,hyplora" if args.small else ",".join(ROWS))).split(",")
            if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    if "peer-liger" in rows and not liger_available():
        print("liger_kernel does not import here: the peer-liger row is left out")
        rows.remove("peer-liger")
    seeds = [int(s) for s in (args.seeds or ("0,1" if args.small else "0,1,2")).split(",")]
    in_process = args.in_process or (args.small and not args.fresh)
    t0 = time.perf_counter()
    runs: list[dict] = []
    settings_key = {**asdict(cfg), "model": args.model, "data": str(args.data), "small": args.small,
                    "device": args.device}
    if args.runs_dir:
        args.runs_dir.mkdir(parents=True, exist_ok=True)
    for k, seed in enumerate(seeds):
        for row in rows[k % len(rows):] + rows[:k % len(rows)]:  # the order rotates from seed to seed
            kept = args.runs_dir / f"{row}-{seed}.json" if args.runs_dir else None
            if kept is not None and kept.exists():
                res = json.loads(kept.read_text(encoding="utf-8"))
                if res.get("settings_key") != settings_key:
                    raise SystemExit(f"--runs-dir {args.runs_dir}: {kept.name} was run with other settings")
                runs.append(res)
                print(f"seed {seed} {row:<12} kept from {kept}")
                continue
            try:
                if in_process:
                    res = run_row(row, seed, args, cfg)
                else:
                    with tempfile.TemporaryDirectory() as tmp:
                        child_out = Path(tmp) / "row.json"
                        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", row, "--seed", str(seed),
                               "--child-out", str(child_out), "--data", str(args.data),
                               "--steps", str(cfg.steps), "--warmup", str(cfg.warmup), "--window", str(cfg.window)]
                        cmd += (["--model", args.model] if args.model else []) + \
                            (["--device", args.device] if args.device else []) + (["--small"] if args.small else [])
                        subprocess.run(cmd, check=True)
                        res = json.loads(child_out.read_text(encoding="utf-8"))
            except Exception as exc:  # a row that fails does not hide the others
                res = {"row": row, "seed": seed, "error": f"{type(exc).__name__}: {exc}"}
            runs.append(res)
            if kept is not None and "error" not in res:
                write_json(kept, {**res, "settings_key": settings_key})
            if "error" in res:
                print(f"seed {seed} {row:<12} FAILED: {res['error']}")
            else:
                print(f"seed {seed} {row:<12} {res['tokens_per_second']:10.0f} tok/s  "
                      f"{res['seconds_per_step'] * 1e3:8.1f} ms/step  final loss {res['final_loss']:.4f}")
    summary = summarise(runs)
    for s in summary:
        d = s.get("final_loss_minus_peer")
        noise = (f"  loss − peer {d['mean']:+.4f} [{d['welch_95_low']:+.4f}, {d['welch_95_high']:+.4f}]"
                 if d else "")
        print(f"{s['row']:<12} {s['tokens_per_second_mean']:10.0f} tok/s  ×{s.get('tokens_per_second_vs_peer', 0):.2f}"
              f" vs peer  loss {s['final_loss_mean']:.4f}{noise}")
    out = args.out or results_path("small_train")
    append_run(out, {
        "benchmark": "small-model fine-tuning throughput, SmolLM2-135M-Instruct, GSM8K, 16 × 256: "
                     "geoprobe finetune vs transformers.Trainer + PEFT LoRA (± Liger-Kernel)",
        "versions": _versions() | {"liger_kernel": "present" if liger_available() else "absent"},
        "model": args.model or ("tiny random Llama, SmolLM2 tokenizer" if args.small else "embedded default"),
        "data": str(args.data),
        "settings": {**asdict(cfg), "seeds": seeds, "rows": rows, "fresh_process_per_run": not in_process,
                     "targets": TARGETS, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                     "platform": platform.platform()},
        "tokens_counted": "non-padding tokens of the sequences processed, steps after the warm-up",
        "final_loss_definition": f"mean per-step training loss over the last {cfg.window} steps; "
                                 "difference from the peer with a 95 % Welch t interval over seeds",
        "seconds_total": time.perf_counter() - t0,
        "summary": summary, "runs": runs,
    }, label="small" if args.small else "cuda")
    print(f"written {out}")


if __name__ == "__main__":
    main()
