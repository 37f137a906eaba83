"""Two GPUs against one: fine-tuning throughput with DDP and FSDP, and the probes spread over devices.

Fine-tuning. A LlamaForCausalLM with Llama-3-8B's shapes (``benchmarks/model_step.build_model``: hidden
4096, FFN 14336, 32 heads, 8 KV heads, vocabulary 128256, ``--layers`` layers, random bf16 weights,
frozen, gradient checkpointing), adapters of ``--method`` (HypLoRA by default) of rank r on q, k, v, up
and down, trained by ``adapters.train`` (AdamW, bf16 autocast, dropout 0) on packed sequences of
``--seq`` tokens of synthetic arithmetic word problems (a byte-level BPE tokenizer trained on them).
Every run takes the same global step, 2·B sequences (B = ``--batch``):

* ``1 GPU`` — B sequences per micro-batch, two micro-batches per step (gradient accumulation);
* ``2 GPUs DDP`` / ``2 GPUs FSDP`` — ``accelerate launch --num_processes 2`` (Accelerate's launcher, as
  ``geoprobe finetune --num-processes 2`` uses it): one micro-batch of 2·B sequences per step, B per GPU.

Each run takes ``--steps`` steps (20); tokens/s is measured over the steps after ``--warmup`` and
before the last (which writes the checkpoint), every step synchronised. The adapters after the last
step are compared with the one-GPU adapter (largest absolute difference, and relative to the largest
weight): the same data order and global batch, so only rounding separates them.

Probes. Exact δ of ``--delta-n`` Gaussian points in 4096 dimensions (every base point; the points'
distance matrix on the first GPU) and TwoNN of ``--id-n`` × 4096 Gaussian points (neighbour search:
the candidate products' strips, then the query rows, dealt to the GPUs), on ``devices=["cuda:0"]``
against ``["cuda:0", "cuda:1"]``; the answers must be equal.

``--small``: a dry run with tiny shapes that checks the script on one GPU or on the CPU. Its "two GPUs"
are two entries of one device for the probes, and for fine-tuning two CPU processes (gloo) unless the
machine has two GPUs; it prints its results and writes them to a temporary file, not to
benchmarks/results.

NCCL runs with NVLink multicast off (``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``,
``NVSHMEM_DISABLE_NVLS=1``; ``adapters.train.launch.MULTICAST_OFF``).

Run: python benchmarks/bench_multigpu.py   (two GPUs)   → appends a run to benchmarks/results/multigpu.json
     python benchmarks/bench_multigpu.py --small   (dry run on one GPU or the CPU)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from adapters.train.launch import MULTICAST_OFF, launch_command, launch_environment  # noqa: E402

for _key, _value in MULTICAST_OFF.items():  # before torch starts any NCCL communicator
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402

from benchmarks.model_step import build_model  # noqa: E402
from benchmarks.results_log import append_run, results_path  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
RUNS = ("1 GPU", "2 GPUs DDP", "2 GPUs FSDP")


# --------------------------------------------------------------------------- data
def problems(n: int, seed: int = 0) -> list:
    """``n`` synthetic arithmetic word problems of a few sentences (answers with a worked rationale)."""
    from adapters.data import Example

    rng = random.Random(seed)
    names = ["Tom", "Ana", "Wei", "Sara", "Omar", "Lena", "Ravi", "Mia"]
    things = ["apples", "books", "coins", "stamps", "marbles", "pencils", "tickets", "shells"]
    out = []
    for _ in range(n):
        who, what = rng.choice(names), rng.choice(things)
        a, b, c, d = (rng.randint(2, 90) for _ in range(4))
        prompt = (f"{who} has {a} {what}. A friend gives {who} {b} more {what}, and later {who} buys {c} "
                  f"packs with {d} {what} in each pack. {who} then gives away half of the packs' {what}. "
                  f"How many {what} does {who} have now?")
        total = a + b + c * d - (c * d) // 2
        answer = (f"{who} starts with {a} {what} and receives {b}, so {a} + {b} = {a + b}. The packs hold "
                  f"{c} × {d} = {c * d} {what}; half of them is {(c * d) // 2}, so {c * d} − {(c * d) // 2} = "
                  f"{c * d - (c * d) // 2} stay. Altogether {a + b} + {c * d - (c * d) // 2} = {total}.\n#### {total}")
        out.append(Example(prompt=prompt, answer=answer, label=str(total), task="arithmetic"))
    return out


def tokenizer_for(examples: list, vocab: int = 2000):
    """A byte-level BPE tokenizer (BOS prepended, EOS defined, ``vocab`` tokens) trained on the examples."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([ex.prompt + " " + ex.answer for ex in examples[:2000]], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


# --------------------------------------------------------------------------- one fine-tune run (worker)
def worker(args: argparse.Namespace) -> None:
    """One run of :data:`RUNS` in this process (one of the launched processes, or alone)."""
    from adapters.train import Trainer, TrainSettings
    from adapters.train.parallel import join

    cfg = json.loads(args.worker)
    launched = "WORLD_SIZE" in os.environ
    group = join(cfg["strategy"], cpu=cfg["device"] == "cpu") if launched else None
    dev = group.device if group is not None else torch.device(cfg["device"])
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    else:  # the cores shared evenly among the processes
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // (group.world if group is not None else 1)))
    torch.manual_seed(0)
    model, config = build_model(cfg["layers"], dev, cfg["small"])
    examples = problems(cfg["n_examples"])
    tok = tokenizer_for(examples, vocab=min(2000, config.vocab_size))
    settings = TrainSettings(lr=2e-4, max_steps=cfg["steps"], batch_size=cfg["batch_size"],
                             grad_accum=cfg["grad_accum"], max_length=cfg["seq"], warmup_ratio=0.0,
                             save_every=cfg["steps"], log_every=cfg["steps"], seed=0)
    trainer = Trainer(model, tok, examples, cfg["method"], out=cfg["out"], settings=settings, group=group,
                      build_kwargs={"r": cfg["r"], "alpha": 2.0 * cfg["r"], "dropout": 0.0,
                                    "target_modules": TARGETS})
    trainer.setup()
    trainer.start(progress=False)
    marks = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    while not trainer.done:
        trainer.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        marks.append((time.perf_counter(), trainer.tokens_seen))
    run = trainer.finish()
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
    peaks = group.gather_objects(peak) if group is not None else [peak]
    w = cfg["warmup"]
    (t0, n0), (t1, n1) = marks[w - 1], marks[-2]
    step_s = [b[0] - a[0] for a, b in zip(marks[w - 1:-2], marks[w:-1])]
    if group is None or group.is_main:
        Path(cfg["out"], "bench.json").write_text(json.dumps({
            "tokens_per_second": (n1 - n0) / (t1 - t0), "median_step_s": statistics.median(step_s),
            "timed_steps": len(step_s), "tokens_per_step": marks[-1][1] // len(marks),
            "peak_memory_gib_per_process": [p / 2 ** 30 for p in peaks],
            "loss_values": run.result.loss_values, "n_sequences": len(trainer.seqs),
            "processes": 1 if group is None else group.world, "device": str(dev)}))
    if group is not None:
        group.close()


def run_training(args: argparse.Namespace, root: Path, device: str) -> dict:
    """The three runs of :data:`RUNS`, each in fresh processes; their measurements and the adapters'
    differences from the one-GPU adapter."""
    from safetensors.torch import load_file

    base = {"method": args.method, "layers": args.layers, "small": args.small, "seq": args.seq, "r": args.r,
            "steps": args.steps, "warmup": args.warmup, "device": device,
            "n_examples": args.examples}
    plans = {"1 GPU": dict(base, strategy="ddp", batch_size=args.batch, grad_accum=2),
             "2 GPUs DDP": dict(base, strategy="ddp", batch_size=2 * args.batch, grad_accum=1),
             "2 GPUs FSDP": dict(base, strategy="fsdp", batch_size=2 * args.batch, grad_accum=1)}
    env = launch_environment()
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    out = {}
    for name, cfg in plans.items():
        cfg["out"] = str(root / name.replace(" ", "_"))
        argv = ["--worker", json.dumps(cfg)]
        cmd = ([sys.executable, str(Path(__file__).resolve()), *argv] if name == "1 GPU"
               else launch_command(argv, 2, script=str(Path(__file__).resolve())))
        t = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{name} failed:\n{done.stderr[-4000:]}")
        out[name] = json.loads(Path(cfg["out"], "bench.json").read_text())
        out[name]["wall_s"] = time.perf_counter() - t
        print(f"{name:<12} {out[name]['tokens_per_second']:10,.0f} tokens/s  median step "
              f"{out[name]['median_step_s'] * 1e3:8.1f} ms  peak "
              f"{max(out[name]['peak_memory_gib_per_process']):6.2f} GiB", flush=True)
    ref = load_file(str(Path(plans["1 GPU"]["out"], "adapter", "adapter_model.safetensors")))
    scale = max(float(v.abs().max()) for v in ref.values())
    for name in RUNS[1:]:
        got = load_file(str(Path(plans[name]["out"], "adapter", "adapter_model.safetensors")))
        diff = max(float((got[k].float() - ref[k].float()).abs().max()) for k in ref)
        out[name].update(adapter_max_abs_diff=diff, adapter_max_rel_diff=diff / scale,
                         speedup=out[name]["tokens_per_second"] / out["1 GPU"]["tokens_per_second"],
                         loss_max_rel_diff=max(abs(a - b) / abs(b) for a, b in zip(out[name]["loss_values"],
                                                                                  out["1 GPU"]["loss_values"])))
        print(f"{name:<12} speedup {out[name]['speedup']:.2f}×  adapter max |Δ| {diff:.3g} "
              f"({diff / scale:.3g} of the largest weight)", flush=True)
    return out


# --------------------------------------------------------------------------- probes
def _timed(fn, repeats: int) -> tuple[float, object]:
    times, res = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        res = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), res


def run_probes(args: argparse.Namespace, one: list[str], two: list[str]) -> dict:
    """Exact δ and TwoNN on ``one`` device against ``two``: seconds and the answers."""
    import geoprobe as gp

    g = torch.Generator().manual_seed(0)
    dim = 64 if args.small else 4096
    out = {}
    pts = torch.randn(args.delta_n, dim, generator=g).to(one[0])
    gp.delta(pts[:64], mode="exact", devices=one)  # compiles the kernels
    for label, devices in (("one", one), ("two", two)):
        s, res = _timed(lambda: gp.delta(pts, mode="exact", devices=devices), 1)
        out[f"delta_exact_{label}"] = {"devices": devices, "seconds": s, "delta": res.delta,
                                       "backend": res.backend}
    x = torch.randn(args.id_n, dim, generator=g).to(one[0])
    gp.intrinsic_dimension(x[:2000], devices=one)  # warm-up
    for label, devices in (("one", one), ("two", two)):
        s, res = _timed(lambda: gp.intrinsic_dimension(x, devices=devices), args.repeats)
        out[f"twonn_{label}"] = {"devices": devices, "seconds": s, "dimension": res.dimension,
                                 "error": res.error, "backend": res.backend}
    out["delta_equal"] = out["delta_exact_one"]["delta"] == out["delta_exact_two"]["delta"]
    out["twonn_equal"] = (out["twonn_one"]["dimension"], out["twonn_one"]["error"]) == \
        (out["twonn_two"]["dimension"], out["twonn_two"]["error"])
    out["delta_speedup"] = out["delta_exact_one"]["seconds"] / out["delta_exact_two"]["seconds"]
    out["twonn_speedup"] = out["twonn_one"]["seconds"] / out["twonn_two"]["seconds"]
    print(f"exact δ, n={args.delta_n}: {out['delta_exact_one']['seconds']:.2f} s on {one}, "
          f"{out['delta_exact_two']['seconds']:.2f} s on {two} ({out['delta_speedup']:.2f}×), "
          f"equal: {out['delta_equal']}", flush=True)
    print(f"TwoNN, {args.id_n} × {dim}: {out['twonn_one']['seconds']:.2f} s on {one}, "
          f"{out['twonn_two']['seconds']:.2f} s on {two} ({out['twonn_speedup']:.2f}×), "
          f"equal: {out['twonn_equal']}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="hyplora", help="adapter method (adapters.registry names)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4, help="sequences per GPU per step (B)")
    ap.add_argument("--seq", type=int, default=2048, help="tokens per packed sequence")
    ap.add_argument("--r", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3, help="steps before the timing starts")
    ap.add_argument("--examples", type=int, default=None, help="synthetic problems (default: enough for --steps)")
    ap.add_argument("--delta-n", type=int, default=4000)
    ap.add_argument("--id-n", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=3, help="timings of each TwoNN (median)")
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out: training, probes")
    ap.add_argument("--small", action="store_true", help="dry run with tiny shapes, on one GPU or the CPU")
    ap.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/multigpu.json; "
                                                "a temporary file with --small)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        worker(args)
        return
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.small:
        args.layers, args.seq, args.r = min(args.layers, 2), min(args.seq, 256), min(args.r, 8)
        args.steps, args.warmup = min(args.steps, 6), min(args.warmup, 2)
        args.delta_n, args.id_n = min(args.delta_n, 160), min(args.id_n, 3000)
    elif gpus < 2:
        raise SystemExit(f"this benchmark compares 2 GPUs with 1 and this machine has {gpus}; "
                         "--small runs a dry run on one GPU or the CPU")
    if args.steps <= args.warmup + 1:
        raise SystemExit("--steps must exceed --warmup + 1 (the last step writes the checkpoint)")
    tokens_per_example = 95  # about, with the 2,000-token BPE vocabulary
    args.examples = args.examples or int(1.3 * args.steps * 2 * args.batch * args.seq / tokens_per_example) + 64
    one = ["cuda:0"] if gpus else ["cpu"]
    two = ["cuda:0", "cuda:1"] if gpus >= 2 else one * 2
    train_device = "cuda" if gpus >= 2 else "cpu"
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    result: dict = {"benchmark": "multigpu",
                    "command": "python benchmarks/bench_multigpu.py " + " ".join(sys.argv[1:]),
                    "label": ("small-" if args.small else "") + ("cuda" if gpus else "cpu"),
                    "device": torch.cuda.get_device_name(0) if gpus else platform.processor() or platform.machine(),
                    "settings": {"method": args.method, "layers": args.layers, "batch_per_gpu": args.batch,
                                 "seq": args.seq, "r": args.r, "steps": args.steps, "warmup": args.warmup,
                                 "examples": args.examples, "delta_n": args.delta_n, "id_n": args.id_n,
                                 "gpus": gpus, "training_device": train_device, "probe_devices": [one, two],
                                 "model": "Llama-3-8B shape" if not args.small else "tiny",
                                 "multicast": MULTICAST_OFF}}
    if "probes" not in skip:
        result["probes"] = run_probes(args, one, two)
    if "training" not in skip:
        with tempfile.TemporaryDirectory(prefix="bench-multigpu-") as root:
            result["training"] = run_training(args, Path(root), train_device)
    out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) / "bench_multigpu_small.json"
                                           if args.small else results_path("multigpu"))
    append_run(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
