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
  python benchmarks/bench_small_step_profile.py --model SmolLM2-135M-Instruct.gguf --data ../shared/data/gsm8k
      → appends a run to benchmarks/results/small_step_profile.json (or --out)
CPU check of the script: python benchmarks/bench_small_step_profile.py --small --out /tmp/profile.json
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from adapters.data import pack  # noqa: E402
from adapters.train import TrainSettings, finetune  # noqa: E402
from benchmarks.bench_finetune_gpu import choose_examples, packed_layout  # noqa: E402
from benchmarks.bench_small_train import DATA, FULL, SMALL, TARGETS, load  # noqa: E402
from benchmarks.results_log import append_run, results_path  # noqa: E402

VARIANTS = {"eager": (False, "default"), "compiled": (True, "default"), "graphs": (True, "reduce-overhead")}


def profile_variant(lm, rows, examples, cfg, name: str, warm: int, active: int, cuda: bool) -> dict:
    compiled, mode = VARIANTS[name]
    length, per_step, _ = packed_layout(rows, cfg.steps, cfg.max_length)
    steps = warm + active
    settings = TrainSettings(lr=cfg.lr, max_steps=steps, batch_size=per_step, max_length=length, save_every=steps,
                             pack=True, warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0, seed=0,
                             log_every=1, compile=compiled, compile_mode=mode)  # on_step reads every loss
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
    tables = {"by_self_cpu": events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)}
    if cuda:
        tables["by_device"] = events.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60)
    return {"variant": name, "compile": compiled, "mode": mode, "rows_per_step": per_step, "row_length": length,
            "packed_rows": n_seq, "profiled_steps": [warm + 1, steps],
            "wall_ms_per_step_under_profiler": wall * 1e3, "gpu_busy_ms_per_step": gpu_busy * 1e3,
            "kernels_per_step": len(kernels) / active,
            "compiled_blocks": run.result.settings["compiled_blocks"],
            "fast_kernels": run.result.settings["fast_kernels"], "tables": tables}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--variants", default="eager,compiled,graphs")
    ap.add_argument("--warm", type=int, default=None, help="steps before the profiled ones (default 15; 2 with --small)")
    ap.add_argument("--active", type=int, default=5, help="profiled steps")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="results file (default "
                    "benchmarks/results/small_step_profile.json)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.small
    cfg = SMALL if args.small else FULL
    warm = args.warm or (2 if args.small else 15)
    variants = []
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        lm = load(args.model, args.small, "cuda" if cuda else "cpu")
        examples, rows = choose_examples(args.data, lm.tokenizer, cfg)
        try:
            v = profile_variant(lm, rows, examples, cfg, name, warm, args.active, cuda)
            print(f"{name}: {v['wall_ms_per_step_under_profiler']:.1f} ms a step under the profiler, GPU busy "
                  f"{v['gpu_busy_ms_per_step']:.1f} ms, {v['kernels_per_step']:.0f} kernels", flush=True)
        except Exception as exc:  # one failing variant does not hide the others
            v = {"variant": name, "error": f"{type(exc).__name__}: {exc}"}
            print(f"{name}: FAILED {v['error']}", flush=True)
        variants.append(v)
        del lm
        if cuda:
            torch.cuda.empty_cache()
    out = args.out or results_path("small_step_profile")
    append_run(out, {"benchmark": "where a small model's training step spends its time (torch.profiler)",
                     "device": torch.cuda.get_device_name() if cuda else "cpu",
                     "model": args.model or ("tiny random Llama" if args.small else "embedded default"),
                     "data": str(args.data), "settings": {"warm": warm, "active": args.active, **vars(cfg)},
                     "variants": variants}, label="small" if args.small else "cuda")
    print(f"written {out}")


if __name__ == "__main__":
    main()
