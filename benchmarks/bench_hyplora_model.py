"""HypLoRA on a Llama-3-8B-shaped model: training-step time and peak memory beside PEFT LoRA.

A LlamaForCausalLM with Llama-3-8B's shapes (hidden 4096, FFN 14336, 32 heads, 8 KV heads, vocabulary
128256; ``--layers`` of them, 32 by default) and random bf16 weights, frozen; adapters of rank r on
q, k, v, up and down projections (float32 adapter weights, as PEFT's autocast_adapter_dtype keeps
them); gradient checkpointing; one step = forward + causal-LM loss + backward on ``--batch`` ×
``--seq`` random tokens (no optimizer: its cost is the same small update for every method).

Methods, all on the same model and adapter weights, interleaved within each round (order rotated
from round to round), median over rounds:

* ``peft lora`` — stock PEFT LoRA (the peer);
* ``hyplora fused`` — :class:`adapters.hyplora.HypLoraLinear` as it runs by default: base output, update
  and addition as one autograd node (:func:`adapters.hyplora.kernels.hyplora_linear_fused`);
* ``hyplora fused via dispatch`` — the same Triton kernels for Δ alone, reached through PEFT's
  per-adapter dispatch (cast, Δ, cast back, addition as separate ops);
* ``hyplora unfused`` — the same layer with the kernels switched off (torch ops, ``_TokenScale``);
* ``hyplora reference-style`` — the reference implementation's op sequence written out below (float32
  island; expmap0 over d_in, A, B, logmap0 over d_out as separate element-wise ops), swapped in for
  the layer's ``hyp_delta``.

Peak memory is ``torch.cuda.max_memory_allocated`` during a step, reported in GiB and as the excess
over the weights held before the step. The losses of the methods are reported (the three HypLoRA
variants share weights; reference-style uses the reference code's formula, so it differs slightly).

Run: python benchmarks/bench_hyplora_model.py [--layers 32]
  → appends a run to benchmarks/results/hyplora_model.json
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from adapters.hyplora import HypLoraLinear, hyplora_config  # noqa: E402
from adapters.hyplora.kernels import set_fused_enabled  # noqa: E402
from adapters.kernels.native import native_unavailable_reason, set_native_mode  # noqa: E402
from benchmarks.model_step import build_model, chosen_methods, profile_steps, summary_rows, time_interleaved  # noqa: E402
from benchmarks.results_log import append_run, results_path  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


_REFERENCE_CALLS = [0]


def reference_style_delta(module: HypLoraLinear, adapter: str, x: torch.Tensor) -> torch.Tensor:
    """(α/r)·Δ in the reference code's op sequence (HypLoRA's patched PEFT LoRA layer)."""
    _REFERENCE_CALLS[0] += 1
    x = module.lora_dropout[adapter](x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.float()
        K = module.hyp_curvature(adapter)
        s = module.hyp_scale(adapter)
        sk = torch.sqrt(K)
        xn = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp(min=1e-7)
        x_space = sk * torch.sinh(torch.clamp(xn / s / sk, max=12.0)) * (x / xn)
        y = module.lora_B[adapter](module.lora_A[adapter](x_space))
        y0 = torch.sqrt((y * y).sum(-1, keepdim=True) + 1.0 / torch.clamp(K, min=1e-6))
        yn = torch.linalg.vector_norm(y, dim=-1, keepdim=True).clamp(min=1e-7)
        theta = y0 / sk
        eps = torch.clamp(theta - 1.0, min=1e-6)
        ac = torch.where(theta < 1.01, torch.sqrt(2.0 * eps), torch.arccosh(torch.clamp(theta, min=1.0 + 1e-7)))
        return module.scaling[adapter] * (sk * ac) * (y / yn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--r", type=int, default=32)
    ap.add_argument("--alpha", type=float, default=128.0)
    ap.add_argument("--repeats", type=int, default=11, help="interleaved rounds")
    ap.add_argument("--steps", type=int, default=4, help="steps per method and round (each timed)")
    ap.add_argument("--methods", default="peft lora,hyplora fused,hyplora fused python node,hyplora fused via dispatch,"
                                         "hyplora unfused,hyplora reference-style",
                    help="comma-separated subset of the methods (peft lora is always timed: it is the reference)")
    ap.add_argument("--profile", action="store_true",
                    help="also run one step per method under torch.profiler: GPU kernel time and kernel count")
    ap.add_argument("--small", action="store_true", help="tiny shapes (checks the script, e.g. on a CPU)")
    ap.add_argument("--out", default=str(results_path("hyplora_model")))
    args = ap.parse_args()

    from peft import LoraConfig, get_peft_model

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, config = build_model(args.layers, dev, args.small)
    hyp_cfg = hyplora_config(args.r, args.alpha, TARGETS, init_lora_weights=False)
    peft_model = get_peft_model(model, hyp_cfg, adapter_name="hyp")
    peft_model.add_adapter("plain", LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=TARGETS,
                                              init_lora_weights=False))
    n_layers = sum(isinstance(m, HypLoraLinear) for m in peft_model.modules())
    build_s = time.perf_counter() - t0
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=dev,
                        generator=torch.Generator(device=dev).manual_seed(1))
    original_hyp_delta = HypLoraLinear.hyp_delta
    original_fast = HypLoraLinear._hyp_fast_adapter

    def select(name: str) -> None:
        HypLoraLinear.hyp_delta = original_hyp_delta
        HypLoraLinear._hyp_fast_adapter = original_fast
        set_fused_enabled(True)
        set_native_mode("auto")
        if name == "peft lora":
            peft_model.set_adapter("plain")
            return
        peft_model.set_adapter("hyp")
        if name == "hyplora unfused":
            set_fused_enabled(False)
        elif name == "hyplora fused python node":
            set_native_mode("off")
        elif name == "hyplora fused via dispatch":
            HypLoraLinear._hyp_fast_adapter = lambda self, x, a, k: None
        elif name == "hyplora reference-style":  # through PEFT's dispatch, which calls hyp_delta
            HypLoraLinear._hyp_fast_adapter = lambda self, x, a, k: None
            HypLoraLinear.hyp_delta = reference_style_delta

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    def step() -> float:
        out = peft_model(input_ids=ids, labels=ids)
        out.loss.backward()
        for p in peft_model.parameters():
            p.grad = None
        return float(out.loss.detach())

    known = ["peft lora", "hyplora fused", "hyplora fused python node", "hyplora fused via dispatch", "hyplora unfused", "hyplora reference-style"]
    methods = chosen_methods(args.methods, known, "peft lora")
    trainable = {}
    losses = {}
    for name in methods:  # warm-up (compilation, cuBLAS handles) and the loss of each method
        select(name)
        trainable[name] = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        calls = _REFERENCE_CALLS[0]
        losses[name] = step()
        if name == "hyplora reference-style" and _REFERENCE_CALLS[0] == calls:
            raise SystemExit("the reference-style method did not reach reference_style_delta")
        step()
    sync()

    def prepare(name: str):
        select(name)
        return step

    times, peaks = time_interleaved(methods, prepare, args.repeats, dev, args.steps)
    profiled = profile_steps(methods, prepare, dev, width=26) if args.profile and cuda else {}
    select("hyplora fused")
    rows = summary_rows(methods, times, peaks, "peft lora")
    for row in rows:
        name, med = row["method"], row["median_s_per_step"]
        row.update(loss_at_warmup=losses[name], trainable_parameters=trainable[name])
        if name in profiled:
            row["profiled_step"] = profiled[name]
        mem = f"  peak {row['peak_memory_gib']:.2f} GiB (+{row['peak_over_resident_gib']:.2f})" if peaks[name] else ""
        print(f"{name:<26} {med * 1e3:9.1f} ms/step  {row['relative_to_peft_lora']:.3f}× peft lora{mem}  loss {losses[name]:.4f}",
              flush=True)
    result = {
        "benchmark": "hyplora_model_training_step",
        "command": "python benchmarks/bench_hyplora_model.py " + " ".join(sys.argv[1:]),
        "model": {"shape": "Llama-3-8B" if not args.small else "tiny", "layers": args.layers,
                  "hidden": config.hidden_size, "intermediate": config.intermediate_size,
                  "vocab": config.vocab_size, "weights": "random bf16, frozen",
                  "gradient_checkpointing": True},
        "adapters": {"targets": TARGETS, "r": args.r, "alpha": args.alpha, "adapted_layers": n_layers,
                     "adapter_dtype": "float32"},
        "tokens": {"batch": args.batch, "seq": args.seq},
        "step": "forward + loss + backward (no optimizer)",
        "native_layers": native_unavailable_reason(dev) or "built (adapters.kernels.native)",
        "repeats": args.repeats,
        "steps_per_round": args.steps,
        "build_s": build_s,
        "device": torch.cuda.get_device_name(dev) if cuda else platform.processor() or platform.machine(),
        "rows": rows,
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "peft": __import__("peft").__version__,
                     "transformers": __import__("transformers").__version__},
    }
    append_run(Path(args.out), result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
