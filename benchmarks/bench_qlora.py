"""QLoRA: training-step time and peak GPU memory of every adapter method on one 4-bit (NF4) Llama-3-8B
base, beside PEFT's own QLoRA.

The base is a LlamaForCausalLM with Llama-3-8B's shapes (hidden 4096, FFN 14336, 32 heads, 8 KV heads,
vocabulary 128256; ``--layers`` of them, 32 by default), built on the meta device
(:func:`benchmarks.model_step.build_model`) and materialised one module at a time on the GPU: every
linear layer of the decoder blocks is drawn as a random bf16 matrix (N(0, 0.02²)) and quantized at once
to bitsandbytes NF4 with double quantization and bf16 compute
(:func:`geoprobe.models.quantize.linear_4bit`, the loader's own routine), so neither the host nor the GPU
ever holds the bf16 model. Embeddings, norms and the LM head stay bf16, as ``--quantize 4bit`` leaves
them. Gradient checkpointing (non-reentrant), bf16 autocast as the trainer uses on a GPU; one step =
forward + causal-LM loss + backward on ``--batch`` × ``--seq`` random tokens (4 × 2048 by default; no
optimizer: its cost is the same small update for every method). The loss (``--loss``) is by default the
fine-tuning loop's: the mean next-token cross-entropy through :func:`adapters.train.loss.answer_loss_sum`,
with Liger's fused linear cross-entropy when liger-kernel is installed (``geoprobe[fast]``), as a
``--quantize 4bit`` run computes it, so the 128,256-wide logits are never held whole; ``--loss hf``
takes transformers' loss from ``labels=ids`` (the full logits, the loss in float32), as a plain PEFT
QLoRA script does. Every method of a run uses the same loss.

Methods, each a PEFT wrapper around its own copy of the decoder modules sharing the one set of 4-bit
tensors (``copy.deepcopy`` with every parameter and buffer in the memo), interleaved within each round
(order rotated from round to round), median over rounds:

* ``peft qlora`` — ``get_peft_model(base, LoraConfig(r=32, lora_alpha=64, target_modules=q,k,v,up,down))``
  on the NF4 base: PEFT's ``lora.bnb.Linear4bit`` (the peer; ratios are to it);
* ``lora`` — :func:`adapters.build` ``"lora"`` (r = 32, α = 2r, the same PEFT layers, through geoprobe's build);
* ``hyplora`` — HypLoRA (r = 32): the base product by the bitsandbytes module, Δ added by the fused node;
* ``hydralora`` — HydraLoRA with ``--heads`` heads and the rank r_h whose trainable parameters are closest
  to LoRA's (:func:`benchmarks.bench_hydralora_model.matching_rank`);
* ``gelora`` — LoRA with per-block ranks rising linearly from r/2 to 3r/2 over the blocks (GeLoRA's
  ranks come from a profile; this pattern keeps LoRA's total rank).

Peak memory is ``torch.cuda.max_memory_allocated`` during a step (GiB, and its excess over what was held
before the step); the target is ≤ 24 GiB for the whole 8B step.

Run (GPU): python benchmarks/bench_qlora.py            → appends a run to benchmarks/results/qlora.json
CPU check of the script (seconds): python benchmarks/bench_qlora.py --small --out /tmp/qlora.json
"""
from __future__ import annotations

import argparse
import copy
import itertools
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import adapters  # noqa: E402
from adapters.train import fast  # noqa: E402
from adapters.train.loss import answer_loss_sum, answer_targets  # noqa: E402
from adapters.kernels.frozen_linear import is_4bit_linear  # noqa: E402
from benchmarks.bench_hydralora_model import hydra_params, lora_params, matching_rank  # noqa: E402
from benchmarks.model_step import build_model, chosen_methods, summary_rows, time_interleaved  # noqa: E402
from benchmarks.results_log import append_run, results_path  # noqa: E402
from geoprobe.models.quantize import linear_4bit, require_bitsandbytes  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
METHODS = ["peft qlora", "lora", "hyplora", "hydralora", "gelora"]
MEMORY_TARGET_GIB = 24.0
INIT_STD = 0.02


def _normal_(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return t.normal_(0.0, INIT_STD, generator=gen)


def materialise_quantized(model: nn.Module, config, dev: torch.device) -> int:
    """Give the meta-device ``model`` real tensors on ``dev`` one module at a time: each decoder linear layer
    drawn in bf16 and quantized to NF4 at once, the embeddings and LM head drawn in bf16, the norms set to
    one, the rotary frequencies recomputed. Returns the number of 4-bit layers."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    gen = torch.Generator(device=dev).manual_seed(0)
    n = 0
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    dense = nn.Linear(child.in_features, child.out_features, bias=False, device=dev,
                                      dtype=torch.bfloat16)
                    with torch.no_grad():
                        _normal_(dense.weight, gen)
                    setattr(parent, name, linear_4bit(dense, device=dev, compute_dtype=torch.bfloat16))
                    del dense
                    n += 1
    for module in (model.model.embed_tokens, model.lm_head):
        module.to_empty(device=dev)
        with torch.no_grad():
            _normal_(module.weight, gen)
    for name, module in model.named_modules():
        if "norm" in type(module).__name__.lower():
            module.to_empty(device=dev)
            with torch.no_grad():
                module.weight.fill_(1.0)
    with torch.device(dev):
        model.model.rotary_emb = LlamaRotaryEmbedding(config)
    left = [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left:
        raise SystemExit(f"tensors left on the meta device: {left[:5]}")
    model.requires_grad_(False)
    model.is_loaded_in_4bit = True  # PEFT dispatches LoRA to its bnb Linear4bit layer by this flag
    return n


def gelora_ranks(layers: int, r: int) -> list[int]:
    """Per-block ranks rising linearly from r/2 to 3r/2 (their mean is r)."""
    if layers == 1:
        return [r]
    return [max(1, round(r * (0.5 + i / (layers - 1)))) for i in range(layers)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=None, help="decoder blocks (default 32; 2 with --small)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default 4; 2 with --small)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048; 64 with --small)")
    ap.add_argument("--r", type=int, default=32, help="LoRA rank")
    ap.add_argument("--heads", type=int, default=4, help="HydraLoRA heads N")
    ap.add_argument("--dropout", type=float, default=0.0, help="adapter dropout of every method")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 7; 2 with --small)")
    ap.add_argument("--steps", type=int, default=None, help="steps per method and round (default 2; 1 with --small)")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma-separated subset (peft qlora is always timed: it is the reference)")
    ap.add_argument("--loss", choices=("trainer", "hf"), default="trainer",
                    help="trainer: the fine-tuning loop's answer loss, with Liger's fused linear cross-entropy when "
                         "installed (default); hf: transformers' loss from labels=ids (full logits)")
    ap.add_argument("--small", action="store_true", help="tiny shapes (checks the script on a CPU in seconds)")
    ap.add_argument("--out", default=str(results_path("qlora")))
    args = ap.parse_args()
    small = args.small
    layers = args.layers or (2 if small else 32)
    batch, seq = args.batch or (2 if small else 4), args.seq or (64 if small else 2048)
    repeats, steps = args.repeats or (2 if small else 7), args.steps or (1 if small else 2)

    from peft import LoraConfig, get_peft_model

    bnb = require_bitsandbytes("bench_qlora.py")
    methods = chosen_methods(args.methods, METHODS, "peft qlora")

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    t0 = time.perf_counter()
    base, config = build_model(layers, torch.device("meta"), small)
    n_quantized = materialise_quantized(base, config, dev)
    if cuda:
        torch.cuda.synchronize(dev)
    base_gib = torch.cuda.memory_allocated(dev) / 2 ** 30 if cuda else None
    shared = {id(t): t for t in itertools.chain(base.parameters(), base.buffers())}
    shapes = [(m.in_features, m.out_features) for name, m in base.named_modules()
              if is_4bit_linear(m) and name.rsplit(".", 1)[-1] in TARGETS]
    r_h = matching_rank(shapes, args.r, args.heads)
    ranks = gelora_ranks(layers, args.r)
    counts = {"peft qlora": lora_params(shapes, args.r), "lora": lora_params(shapes, args.r),
              "hyplora": lora_params(shapes, args.r) + 2 * len(shapes),  # + raw K and s per layer
              "hydralora": hydra_params(shapes, r_h, args.heads)}
    per_block = len(shapes) // layers
    counts["gelora"] = sum(rk * (d_in + d_out) for i, rk in enumerate(ranks)
                           for d_in, d_out in shapes[i * per_block:(i + 1) * per_block])

    twins = {name: base if name == "peft qlora" else copy.deepcopy(base, memo=dict(shared)) for name in methods}
    models = {}
    for name in methods:  # PEFT wraps its model in place: every copy is taken before the first wrapper
        twin = twins[name]
        if name == "peft qlora":
            models[name] = get_peft_model(twin, LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=args.dropout,
                                                           target_modules=TARGETS, init_lora_weights=False))
            continue
        options = dict(r=args.r, dropout=args.dropout, target_modules=TARGETS)
        if name == "hydralora":
            options.update(r=r_h, alpha=2.0 * args.r * r_h / args.r, n_heads=args.heads)
        elif name == "gelora":
            options.update(layer_ranks=ranks)
        models[name] = adapters.build(twin, name, **options)
    build_s = time.perf_counter() - t0
    params = {name: [p for p in m.parameters() if p.requires_grad] for name, m in models.items()}
    print(f"NF4 base: {layers} blocks, {n_quantized} 4-bit linear layers"
          + (f", {base_gib:.2f} GiB on the GPU" if cuda else "") + f"; built in {build_s:.1f} s", flush=True)

    ids = torch.randint(0, config.vocab_size, (batch, seq), device=dev,
                        generator=torch.Generator(device=dev).manual_seed(1))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    # the loss: the trainer's (answer_loss_sum over every next-token target, with Liger's fused linear
    # cross-entropy where it applies, so the logits are never held whole) or transformers' (labels=ids)
    index, target = (t.to(dev) for t in answer_targets(ids.cpu()))
    record = fast.decide(base, device=dev) if args.loss == "trainer" else None
    fused_loss = {name: (fast.fused_cross_entropy(record, models[name].get_output_embeddings())[1]
                         if record is not None else None) for name in methods}
    loss_note = ("transformers' causal-LM loss (labels=ids): the full logits in bf16, the loss in float32"
                 if record is None else
                 "the trainer's answer loss over every next-token target (adapters.train.loss.answer_loss_sum) "
                 + ("with Liger's fused linear cross-entropy" if fused_loss[methods[0]] is not None
                    else "with plain logits (the fused loss does not apply here: "
                         f"{record.reason or 'not a plain head'})"))

    def loss_of(name: str) -> torch.Tensor:
        with autocast:
            if args.loss == "hf":
                return models[name](input_ids=ids, labels=ids).loss
            return answer_loss_sum(models[name], {"input_ids": ids}, index, target,
                                   fused=fused_loss[name]) / index.numel()

    def step(name: str) -> float:
        loss = loss_of(name)
        loss.backward()
        for p in params[name]:
            p.grad = None
        return float(loss.detach())

    trainable, losses = {}, {}
    for name in methods:  # warm-up (allocator, cuBLAS handles, native builds) and the counts
        loss = loss_of(name)
        loss.backward()
        trainable[name] = sum(p.numel() for p in params[name] if p.grad is not None)
        losses[name] = float(loss.detach())
        for p in params[name]:
            p.grad = None
        step(name)
    wrong = {m: (trainable[m], counts[m]) for m in methods if trainable[m] != counts[m]}
    if wrong:
        raise SystemExit(f"parameters with a gradient differ from the closed-form counts: {wrong}")

    times, peaks = time_interleaved(methods, lambda name: (lambda: step(name)), repeats, dev, steps)
    rows = summary_rows(methods, times, peaks, "peft qlora")
    for row in rows:
        name = row["method"]
        row.update(loss_at_warmup=losses[name], trainable_parameters=trainable[name])
        mem = ""
        if peaks[name]:
            row["within_memory_target"] = row["peak_memory_gib"] <= MEMORY_TARGET_GIB
            mem = f"  peak {row['peak_memory_gib']:.2f} GiB (+{row['peak_over_resident_gib']:.2f})"
        print(f"{name:<11} {row['median_s_per_step'] * 1e3:9.1f} ms/step  {row['relative_to_peft_qlora']:.3f}× "
              f"peft qlora{mem}  loss {losses[name]:.4f}  trainable {trainable[name]:,}", flush=True)
    result = {
        "benchmark": "qlora_training_step",
        "command": "python benchmarks/bench_qlora.py " + " ".join(sys.argv[1:]),
        "model": {"shape": "Llama-3-8B" if not small else "tiny", "layers": layers, "hidden": config.hidden_size,
                  "intermediate": config.intermediate_size, "vocab": config.vocab_size,
                  "weights": "random, decoder linear layers NF4 (double quantization, bf16 compute), the rest bf16",
                  "quantized_layers": n_quantized, "gradient_checkpointing": True,
                  "base_gpu_gib": base_gib},
        "adapters": {"targets": TARGETS, "adapter_dtype": "float32", "r": args.r, "alpha": 2 * args.r,
                     "dropout": args.dropout, "hydralora": {"heads": args.heads, "r": r_h},
                     "gelora_ranks": ranks, "parameters": counts},
        "tokens": {"batch": batch, "seq": seq},
        "step": "bf16 autocast forward + loss + backward (no optimizer)" if cuda else "forward + loss + backward",
        "loss": {"kind": args.loss, "what": loss_note},
        "repeats": repeats,
        "steps_per_round": steps,
        "memory_target_gib": MEMORY_TARGET_GIB,
        "build_s": build_s,
        "device": torch.cuda.get_device_name(dev) if cuda else platform.processor() or platform.machine(),
        "rows": rows,
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "peft": __import__("peft").__version__, "bitsandbytes": bnb.__version__,
                     "transformers": __import__("transformers").__version__},
    }
    append_run(Path(args.out), result, label="small" if small else dev.type)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
