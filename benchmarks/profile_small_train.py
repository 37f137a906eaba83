"""Where a small model's training step spends its time: ``geoprobe finetune``'s loop on SmolLM2-135M-Instruct
and GSM8K, as ``bench_small_train.py`` runs it (16 examples a step on average, packed rows of about 256
tokens, LoRA r = 16 on q/k/v/up/down, bf16 autocast), under ``torch.profiler`` for a few steps after a
warm-up.

Per variant (eager; compiled blocks; compiled blocks replayed as CUDA graphs) it reports the wall time
of a step, the GPU's busy time in it (the sum of the operators' self device times, each kernel counted
once), the kernels launched per step, and the operators with the most host (self CPU) time. A step
whose GPU-busy share is small is bound by the host; the launches per step say how much a CUDA graph can
save.

Run on the GPU machine (about a minute a variant, the compiled ones longer at their first steps):
  python benchmarks/profile_small_train.py --model SmolLM2-135M-Instruct.gguf --data ../shared/data/gsm8k
      → writes benchmarks/results/profile_small_train.txt (or --out)
CPU check of the script: python benchmarks/profile_small_train.py --small --out /tmp/profile.txt
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from adapters.data import pack  # noqa: E402
from adapters.train import TrainSettings, finetune  # noqa: E402
from benchmarks.bench_finetune_gpu import choose_examples, packed_layout  # noqa: E402
from benchmarks.bench_small_train import DATA, FULL, SMALL, TARGETS, load  # noqa: E402
from geoprobe.records import write_text  # noqa: E402

VARIANTS = {"eager": (False, "default"), "compiled": (True, "default"), "graphs": (True, "reduce-overhead")}


def profile_variant(lm, rows, examples, cfg, name: str, warm: int, active: int, cuda: bool) -> str:
    compiled, mode = VARIANTS[name]
    length, per_step, _ = packed_layout(rows, cfg.steps, cfg.max_length)
    steps = warm + active
    settings = TrainSettings(lr=cfg.lr, max_steps=steps, batch_size=per_step, max_length=length, save_every=steps,
                             pack=True, warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0, seed=0,
                             log_every=1 if steps < 10 else 10, compile=compiled, compile_mode=mode)
    n_seq = len(pack(rows, length))
    from torch.profiler import ProfilerActivity, profile, schedule

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    stamps: list[float] = []
    with profile(activities=acts, schedule=schedule(wait=warm - 1, warmup=1, active=active, repeat=1)) as prof:
        def on_step(step: int, loss: float) -> None:
            if cuda:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            prof.step()

        settings = replace(settings, log_every=1)  # on_step reads every step's loss: one sync a step either way
        with tempfile.TemporaryDirectory() as out:
            run = finetune(lm.model, lm.tokenizer, examples, "lora", out=Path(out) / "run",
                           settings=settings, progress=False, r=cfg.r, alpha=2 * cfg.r, dropout=cfg.dropout,
                           target_modules=TARGETS, model_name=lm.name, on_step=on_step)
    wall = (stamps[-1] - stamps[warm - 1]) / active
    events = prof.key_averages()
    kernels = [e for e in prof.events() if getattr(e, "device_type", None) is not None
               and str(e.device_type).endswith("CUDA") and e.device_time_total > 0]
    # the operators' self device times: each kernel counted once (the table's "Self CUDA time total")
    gpu_busy = sum(e.self_device_time_total for e in events) / 1e6 / active if cuda else 0.0
    lines = [f"== {name} (compile={compiled}, mode={mode}): {per_step} rows × {length} tokens a step "
             f"({n_seq} packed rows in all), steps {warm + 1}–{steps} profiled",
             f"wall per step (under the profiler, synchronised) {wall * 1e3:.1f} ms; GPU busy per step {gpu_busy * 1e3:.1f} ms "
             f"({100 * gpu_busy / wall:.0f} %); kernels per step {len(kernels) / active:.0f}",
             f"compiled blocks: {run.result.settings['compiled_blocks']}",
             f"fast kernels: {run.result.settings['fast_kernels']}",
             "top operators by self CPU time:",
             events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)]
    if cuda:
        lines += ["top operators by device time:",
                  events.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--variants", default="eager,compiled,graphs")
    ap.add_argument("--warm", type=int, default=None, help="steps before the profiled ones (default 15; 2 with --small)")
    ap.add_argument("--active", type=int, default=5, help="profiled steps")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "profile_small_train.txt")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.small
    cfg = SMALL if args.small else FULL
    warm = args.warm or (2 if args.small else 15)
    parts = [f"profile_small_train: {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}; "
             f"command: python benchmarks/profile_small_train.py {' '.join(sys.argv[1:])}"]
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        lm = load(args.model, args.small, "cuda" if cuda else "cpu")
        examples, rows = choose_examples(args.data, lm.tokenizer, cfg)
        try:
            parts.append(profile_variant(lm, rows, examples, cfg, name, warm, args.active, cuda))
        except Exception as exc:  # one failing variant does not hide the others
            parts.append(f"== {name}: FAILED {type(exc).__name__}: {exc}")
        print(parts[-1][:1500], flush=True)
        del lm
        if cuda:
            torch.cuda.empty_cache()
    write_text(args.out, "\n\n".join(parts) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
