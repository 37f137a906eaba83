"""Training-step time and activation memory with Liger-Kernel's fused kernels, on a Llama-3-8B-shaped
model: stock PEFT LoRA, PEFT LoRA with Liger, and geoprobe's methods through the trainer's step path
with the fast kernels on.

A LlamaForCausalLM with Llama-3-8B's shapes (hidden 4096, FFN 14336, 32 heads, 8 KV heads, vocabulary
128256; ``--layers`` of them, 32 by default), random bf16 weights, frozen, gradient checkpointing
(:func:`benchmarks.model_step.build_model`); adapters of rank ``--r`` (32) on q, k, v, up and down
projections; one step = forward + causal-LM loss over every next-token position + backward on
``--batch`` × seq random tokens, for each seq of ``--seqs`` (2048 and 512), under bf16 autocast on CUDA
(as the trainer runs); no optimizer (its cost is the same small update for every method).

Methods, interleaved within each round (order rotated from round to round), median over rounds:

* ``peft lora`` — stock PEFT LoRA, ``model(input_ids, labels=...)``: transformers' full logits and loss;
* ``peft lora + liger`` — the same with Liger-Kernel applied to its model instance the way Liger's
  documentation does for a loaded model (``apply_liger_kernel_to_llama(model=...)``: RoPE, RMSNorm, SwiGLU
  and Liger's own causal-LM forward with its fused linear cross-entropy);
* ``lora --compile``, ``hyplora --compile``, ``hydralora --compile``, ``gelora --compile`` (asked for by
  ``--methods``) — the same with the blocks compiled as the trainer's ``--compile`` does
  (:mod:`adapters.train.compiled`: Liger patches no module then and its RoPE is off, its fused loss stays;
  every adapter layer takes its plain torch formulas, one graph per block; on CUDA each block replayed as
  a CUDA graph), three
  warm-up steps for the compile and the graph records; a method the compiler cannot take is left out of
  the table with the reason (``left_out``);
* ``lora``, ``hyplora``, ``hydralora``, ``gelora`` — geoprobe's layers built by :func:`adapters.build` on a
  model patched by :func:`adapters.train.fast.apply`, the loss by
  :func:`adapters.train.loss.answer_loss_sum` with :func:`adapters.train.fast.fused_cross_entropy` (the
  trainer's step). HydraLoRA (``--heads`` heads) at the trainable-parameter count of rank-r LoRA (its
  rank from :func:`benchmarks.bench_hydralora_model.matching_rank`); GeLoRA with rank r in every block
  (the same count as LoRA).

Every method has its own modules around the same frozen base tensors (deep copies sharing every
parameter and buffer). Liger's RoPE replaces a function of transformers' Llama module that every
model calls, so the stock method runs with the original function put back. Peak memory is
``torch.cuda.max_memory_allocated`` during a step; the activation peak is that minus the memory
allocated before the step. Each row gives the median seconds per step and its ratio to ``peft lora``
and to ``peft lora + liger``. ``--profile K`` adds one profiled step per method (CUDA): its GPU kernel
time, its kernel launches and the K kernels of most GPU time, to see where one method's step differs
from another's.

Run (GPU, liger-kernel installed): python benchmarks/bench_fast_step.py
  → appends a run to benchmarks/results/fast_step.json
CPU check of the script (Liger skipped): python benchmarks/bench_fast_step.py --small --out /tmp/fast_step.json
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from adapters import build  # noqa: E402
from adapters.train import fast  # noqa: E402
from adapters.train.compiled import compile_blocks  # noqa: E402
from adapters.train.loss import answer_loss_sum, answer_targets  # noqa: E402
from benchmarks.bench_hydralora_model import lora_params, matching_rank, target_shapes  # noqa: E402
from benchmarks.model_step import build_model, chosen_methods, profile_steps, summary_rows, time_interleaved  # noqa: E402
from benchmarks.results_log import append_run, results_path  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
STOCK, STOCK_LIGER = "peft lora", "peft lora + liger"
OURS = ["lora", "hyplora", "hydralora", "gelora"]
COMPILED = ["lora --compile", "hyplora --compile", "hydralora --compile", "gelora --compile"]
METHODS = [STOCK, STOCK_LIGER, *OURS, *COMPILED]
DEFAULT_METHODS = [STOCK, STOCK_LIGER, *OURS]


def _liger_apply():
    """Liger's apply function for Llama and its RoPE function, or (None, why not)."""
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama, liger_rotary_pos_emb
    except Exception as exc:  # not installed, or Triton missing: the Liger methods are skipped
        return None, f"{type(exc).__name__}: {exc}"
    return (apply_liger_kernel_to_llama, liger_rotary_pos_emb), None


def _stock_step(model, ids, params, autocast):
    def step():
        with autocast():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        for p in params:
            p.grad = None
    return step


def _our_step(model, ids, fused, params, autocast, graphs: bool = False):
    labels = ids.clone()
    labels[:, 0] = -100  # every position but the first is an answer token: the stock loss's positions
    index, target = answer_targets(labels)
    n = index.numel()

    def step():
        if graphs:  # as the trainer does before each forward when the blocks are CUDA graphs
            torch.compiler.cudagraph_mark_step_begin()
        with autocast():
            loss = answer_loss_sum(model, {"input_ids": ids}, index, target, fused=fused) / n
        loss.backward()
        for p in params:
            p.grad = None
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqs", default="2048,512", help="comma-separated sequence lengths, each its own table")
    ap.add_argument("--r", type=int, default=32)
    ap.add_argument("--heads", type=int, default=4, help="HydraLoRA heads")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
    ap.add_argument("--steps", type=int, default=2, help="steps per method and round (each timed)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help=f"comma-separated subset of {METHODS} ({STOCK} is always timed: the reference)")
    ap.add_argument("--profile", type=int, default=0, metavar="K",
                    help="also profile one step per method (CUDA): GPU kernel time, launches and the K "
                         "kernels of most time, into the results")
    ap.add_argument("--small", action="store_true", help="tiny shapes and 2 layers (checks the script on a CPU)")
    ap.add_argument("--out", default=str(results_path("fast_step")))
    args = ap.parse_args()

    from peft import LoraConfig, get_peft_model
    from transformers.models.llama import modeling_llama

    chosen = chosen_methods(args.methods, METHODS, STOCK)
    seqs = [int(s) for s in args.seqs.split(",") if s.strip()]
    if args.small:
        args.layers, seqs, args.repeats, args.steps = min(args.layers, 2), [max(8, s // 32) for s in seqs], 2, 1
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    liger, liger_why = _liger_apply() if cuda else (None, "not on CUDA")
    methods = [m for m in METHODS if m in chosen and (m != STOCK_LIGER or liger is not None)]
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext

    torch.manual_seed(0)
    t0 = time.perf_counter()
    base, config = build_model(args.layers, dev, args.small)
    shared = {id(t): t for t in itertools.chain(base.parameters(), base.buffers())}
    twins = {m: copy.deepcopy(base, memo=dict(shared)) for m in methods[1:]}
    twins[STOCK] = base
    shapes = target_shapes(base)
    r_h = matching_rank(shapes, args.r, args.heads)
    original_rope = modeling_llama.apply_rotary_pos_emb
    models, fused_of, records = {}, {}, {}
    models[STOCK] = get_peft_model(twins[STOCK], LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS,
                                                            lora_dropout=0.0))
    if STOCK_LIGER in methods:
        apply_llama, _ = liger
        saved = dict(vars(modeling_llama))
        apply_llama(model=twins[STOCK_LIGER])  # Liger's defaults: RoPE, RMSNorm, SwiGLU, fused linear CE
        for name in ("LlamaRMSNorm", "LlamaMLP"):  # later models are built as transformers builds them
            setattr(modeling_llama, name, saved[name])
        models[STOCK_LIGER] = get_peft_model(twins[STOCK_LIGER], LoraConfig(
            r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS, lora_dropout=0.0))
    compiled_of = {}
    for name in [m for m in OURS + COMPILED if m in methods]:
        method, compiled_on = name.removesuffix(" --compile"), name.endswith(" --compile")
        rec, _ = fast.apply(twins[name], fast.decide(twins[name], device=dev, compiled_blocks=compiled_on))
        extra = {"n_heads": args.heads, "r": r_h, "alpha": 2.0 * r_h} if method == "hydralora" else {"r": args.r}
        if method == "gelora":
            extra["layer_ranks"] = [args.r] * args.layers
        models[name] = build(twins[name], method, target_modules=TARGETS, dropout=0.0, **extra)
        records[name], fused_of[name] = fast.fused_cross_entropy(rec, models[name].get_output_embeddings())
        if compiled_on:  # the trainer's --compile: the blocks compiled, as CUDA graphs on CUDA (mode auto)
            compiled_of[name], _ = compile_blocks(models[name], enabled=True)
        print(f"{name:<18} {fast.describe(records[name])}"
              + (f"; compiled blocks, mode {compiled_of[name].mode}" if name in compiled_of else ""), flush=True)
    params = {m: [p for p in model.parameters() if p.requires_grad] for m, model in models.items()}
    counts = {m: sum(p.numel() for p in ps) for m, ps in params.items()}
    build_s = time.perf_counter() - t0
    print("trainable parameters: " + ", ".join(f"{m} {c:,}" for m, c in counts.items())
          + f" (LoRA formula {lora_params(shapes, args.r):,}; hydralora r_h={r_h})", flush=True)
    if liger is None:
        print(f"{STOCK_LIGER} skipped: {liger_why}", flush=True)

    tables = []
    for seq in seqs:
        ids = torch.randint(0, config.vocab_size, (args.batch, seq), device=dev,
                            generator=torch.Generator(device=dev).manual_seed(seq))
        steps = {m: (_stock_step(models[m], ids, params[m], autocast) if m in (STOCK, STOCK_LIGER)
                     else _our_step(models[m], ids, fused_of[m], params[m], autocast,
                                    graphs=m in compiled_of and compiled_of[m].mode == "reduce-overhead"))
                 for m in methods}

        def prepare(name: str):
            # Liger's RoPE is a module-level function every Llama attention calls: off for the stock method
            # and inside compiled blocks (as the trainer's --compile: Inductor fuses the plain one)
            modeling_llama.apply_rotary_pos_emb = (original_rope if name == STOCK or liger is None
                                                   or name in compiled_of else liger[1])
            return steps[name]

        failed = {}
        for name in list(methods):  # warm-up: compilation, autotuning, the allocator
            try:
                for _ in range(3 if name in compiled_of else 1):  # compiled: the compile and the graph records
                    prepare(name)()
            except Exception as exc:  # a compiled method the compiler cannot take: reported, left out
                if name not in compiled_of:
                    raise
                first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
                failed[name] = f"{type(exc).__name__}: {first}"
                print(f"{name} left out at {seq} tokens: {failed[name]}", flush=True)
        methods_now = [m for m in methods if m not in failed]
        times, peaks = time_interleaved(methods_now, prepare, args.repeats, dev, steps=args.steps)
        profiled = (profile_steps(methods_now, prepare, dev, width=18, top=args.profile) if args.profile and cuda
                    else {})
        modeling_llama.apply_rotary_pos_emb = original_rope
        rows = summary_rows(methods_now, times, peaks, STOCK)
        liger_median = next((r["median_s_per_step"] for r in rows if r["method"] == STOCK_LIGER), None)
        for row in rows:
            row["trainable_parameters"] = counts[row["method"]]
            if liger_median is not None:
                row["relative_to_peft_lora_liger"] = row["median_s_per_step"] / liger_median
            if row["method"] in records:
                row["fast_kernels"] = records[row["method"]].to_dict()
            if row["method"] in profiled:
                row["profile"] = profiled[row["method"]]
            if row["method"] in compiled_of:
                row["compiled_blocks"] = compiled_of[row["method"]].to_dict()
        tables.append({"tokens": [args.batch, seq], "rows": rows, "left_out": failed})
        print(f"\n{args.batch} x {seq} tokens", flush=True)
        print(f"{'method':<18} {'s/step':>9} {'÷ peft':>7} {'÷ liger':>8} {'peak GiB':>9} {'act. GiB':>9}")
        for row in rows:
            vs_liger = row.get("relative_to_peft_lora_liger")
            print(f"{row['method']:<18} {row['median_s_per_step']:>9.4f} {row['relative_to_peft_lora']:>7.3f} "
                  f"{vs_liger if vs_liger is not None else float('nan'):>8.3f} "
                  f"{row.get('peak_memory_gib', float('nan')):>9.2f} {row.get('peak_over_resident_gib', float('nan')):>9.2f}",
                  flush=True)

    result = {
        "what": "training-step time and activation peak: stock PEFT LoRA, PEFT LoRA + Liger-Kernel, and "
                "geoprobe's methods with the fast kernels (Liger RoPE/RMSNorm/SwiGLU, fused linear CE)",
        "device": torch.cuda.get_device_name(dev) if cuda else platform.processor() or "cpu",
        "model": {"layers": args.layers, "hidden": config.hidden_size, "ffn": config.intermediate_size,
                  "vocab": config.vocab_size, "dtype": "bfloat16", "gradient_checkpointing": True,
                  "small": args.small},
        "adapters": {"r": args.r, "alpha": 2 * args.r, "targets": TARGETS, "hydralora_heads": args.heads,
                     "hydralora_r": r_h, "gelora_layer_ranks": "r in every block"},
        "repeats": args.repeats, "steps_per_round": args.steps, "build_s": build_s,
        "liger": records[next(iter(records))].to_dict() if records else None,
        "liger_skipped": liger_why, "tables": tables,
    }
    label = ("small" if args.small else dev.type)
    print(f"results appended to {append_run(args.out, result, label=label)}")


if __name__ == "__main__":
    main()
