"""Evaluation speed: our generation (`adapters.evaluate.generate_answers`: a batch fitted to the
device, length-sorted, early-stopping greedy decoding) beside plain `model.generate` at batch 8, on
the GSM8K test set with SmolLM2-135M-Instruct, side by side in one process.

Both generate greedily from the same Alpaca-templated prompts with the same ``max_new_tokens``; the
plain loop takes the prompts in file order, eight at a time, left-padded. Reported: the wall time of
each, the speed-up, how many answers are identical (and the GSM8K accuracy each reaches), the batch
size ours chose, and on CUDA the peak GPU memory. ``--static-cache`` (CUDA only) also times ours
with the compiled static cache, compile time included.

The issue's targets, on one H200: ≥ 5× faster than the plain loop and ≤ 60 s for all 1,319 questions.

GPU (the data must travel in a git-ignored folder such as ``carry/``)::

    mkdir -p carry && cp ../shared/data/gsm8k/test.jsonl carry/
    python benchmarks/bench_eval_gpu.py --data carry/test.jsonl --static-cache --plain-seconds 90

(``--plain-seconds`` bounds the plain loop, which takes minutes for the whole set: both loops are then
compared on the questions it reached, and ours also runs on all 1,319.)

A quick check that it runs: ``--device cpu --limit 16 --no-save``. CPU figure (what BENCHMARKS.md
reports for the 2-core machine)::

    python benchmarks/bench_eval_gpu.py --device cpu --limit 64

Each run is appended to benchmarks/results/eval_gpu.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from adapters.data import format_prompt, load_examples  # noqa: E402
from adapters.evaluate import auto_batch_size, extract_number, generate_answers, is_correct  # noqa: E402
from benchmarks.results_log import append_run, results_path  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"


def plain_generate(model: Any, tokenizer: Any, prompts: list[str], *, batch_size: int,
                   max_new_tokens: int, seconds: Optional[float] = None, echo: bool = False) -> list[str]:
    """The plain loop: prompts in input order, ``batch_size`` at a time, left-padded, through
    ``model.generate(do_sample=False)``; the new text of each, special tokens dropped. With
    ``seconds``, no batch starts once that much time has passed (at least one runs), so the answers
    cover the first prompts only; ``echo`` prints the count and the time after every batch."""
    from transformers import GenerationConfig

    eos = model.generation_config.eos_token_id
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
    out: list[str] = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            if out and seconds is not None and time.perf_counter() - t0 >= seconds:
                break
            enc = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True)
            enc = {k: v.to(model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            seqs = model.generate(**enc, generation_config=config)
            out += tokenizer.batch_decode(seqs[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            if echo:
                print(f"  plain: {len(out)} answers in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def timed(fn, device: torch.device) -> tuple[Any, float]:
    """``fn()`` and its wall time in seconds (the GPU synchronised before and after)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    value = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return value, time.perf_counter() - t0


def accuracy(answers: list[str], labels: list[str]) -> float:
    return sum(is_correct(extract_number(a), g, "gsm8k") for a, g in zip(answers, labels)) / len(labels)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="GSM8K test.jsonl (default: ../shared/data/gsm8k)")
    p.add_argument("--model", default=None, help="model spec (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--limit", type=int, default=None, help="the first N questions (default: all 1,319)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--plain-batch", type=int, default=8, help="batch of the plain loop (default 8)")
    p.add_argument("--plain-seconds", type=float, default=None,
                   help="stop the plain loop after the batch that passes this many seconds (its questions "
                        "are then the ones both loops are compared on)")
    p.add_argument("--plain-limit", type=int, default=None,
                   help="run the plain loop on the first N questions only; ours is then timed on those N "
                        "(the speed-up and the identity check) and on all of them (default: all)")
    p.add_argument("--batch-size", type=int, default=None, help="our batch (default: fitted to the device)")
    p.add_argument("--static-cache", action="store_true", help="also time ours with the compiled static cache (CUDA)")
    p.add_argument("--label", default=None, help="run label in the results file (default: the device type)")
    p.add_argument("--no-save", action="store_true", help="print only; append nothing to the results file")
    args = p.parse_args(argv)
    for flag in ("limit", "max_new_tokens", "plain_batch", "batch_size", "plain_limit", "plain_seconds"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be ≥ 1")
    if not Path(args.data).is_file():
        p.error(f"--data {args.data} is not a file; copy GSM8K's test.jsonl into a git-ignored folder and pass it")
    return args


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    from geoprobe import load_model
    from geoprobe.workflows import resolve_device

    device = torch.device(resolve_device(args.device))
    if args.static_cache and device.type != "cuda":
        raise SystemExit("--static-cache needs a CUDA device")
    lm = load_model(args.model, device=str(device))
    model, tok = lm.model.eval(), lm.tokenizer
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    examples = load_examples(args.data, limit=args.limit)
    prompts = [format_prompt(ex) for ex in examples]
    labels = [ex.label for ex in examples]
    longest = max(len(ids) for ids in tok(prompts)["input_ids"])
    chosen = args.batch_size or auto_batch_size(model, longest, args.max_new_tokens, device, n_prompts=len(prompts))
    print(f"{len(prompts)} questions on {device}; ours at batch {chosen}, plain at batch {args.plain_batch}",
          flush=True)

    # warm both paths once (kernels, allocator), outside the timings
    plain_generate(model, tok, prompts[:2], batch_size=2, max_new_tokens=4)
    generate_answers(model, tok, prompts[:2], batch_size=2, max_new_tokens=4)

    n_plain = min(args.plain_limit or len(prompts), len(prompts))
    plain, t_plain = timed(lambda: plain_generate(model, tok, prompts[:n_plain], batch_size=args.plain_batch,
                                                  max_new_tokens=args.max_new_tokens, seconds=args.plain_seconds,
                                                  echo=True), device)
    n_plain = len(plain)
    print(f"plain model.generate on {n_plain} questions: {t_plain:.1f} s", flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if n_plain < len(prompts):
        same, t_same = timed(lambda: generate_answers(model, tok, prompts[:n_plain], batch_size=args.batch_size,
                                                      max_new_tokens=args.max_new_tokens), device)
        print(f"ours on the same {n_plain}: {t_same:.1f} s ({t_plain / t_same:.1f}× faster)", flush=True)
    ours, t_ours = timed(lambda: generate_answers(model, tok, prompts, batch_size=args.batch_size,
                                                  max_new_tokens=args.max_new_tokens), device)
    if n_plain == len(prompts):
        same, t_same = ours, t_ours
    print(f"ours on all {len(prompts)}: {t_ours:.1f} s", flush=True)
    diff = [i for i, (a, b) in enumerate(zip(same, plain)) if a != b]
    result: dict[str, Any] = {
        "benchmark": "GSM8K test-set generation: ours (fitted batch, length-sorted, early stops) vs plain "
                     "model.generate at a fixed batch",
        "device": str(device), "model": lm.name, "dtype": str(next(model.parameters()).dtype),
        "data": Path(args.data).name,
        "settings": {"n_questions": len(prompts), "n_plain": n_plain, "plain_time_box_seconds": args.plain_seconds, "max_new_tokens": args.max_new_tokens,
                     "plain_batch": args.plain_batch, "our_batch": chosen, "longest_prompt_tokens": longest},
        "plain_seconds": round(t_plain, 3), "ours_same_seconds": round(t_same, 3),
        "ours_seconds": round(t_ours, 3), "speedup": round(t_plain / t_same, 2),
        "plain_projected_all_seconds": round(t_plain * len(prompts) / n_plain, 1),
        "n_compared": n_plain, "n_identical": n_plain - len(diff), "all_identical": not diff,
        "first_differing": diff[:10],
        "accuracy_plain": accuracy(plain, labels[:n_plain]), "accuracy_ours_same": accuracy(same, labels[:n_plain]),
        "accuracy_ours": accuracy(ours, labels),
    }
    if device.type == "cuda":
        result["ours_peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if args.static_cache:
        static, t_static = timed(lambda: generate_answers(model, tok, prompts[:n_plain], batch_size=args.batch_size,
                                                          max_new_tokens=args.max_new_tokens, static_cache=True),
                                 device)
        print(f"ours, static cache compiled: {t_static:.1f} s (compile included)", flush=True)
        result.update(static_seconds=round(t_static, 3), static_speedup=round(t_plain / t_static, 2),
                      static_n_identical=sum(a == b for a, b in zip(static, plain)))
    print(f"identical answers: {result['n_identical']}/{n_plain}; accuracy plain "
          f"{result['accuracy_plain']:.4f}, ours {result['accuracy_ours_same']:.4f} on the same questions")
    print(json.dumps(result))
    if not args.no_save:
        path = append_run(results_path("eval_gpu"), result, label=args.label or device.type)
        print(f"appended to {path}")
    return result


if __name__ == "__main__":
    main()
