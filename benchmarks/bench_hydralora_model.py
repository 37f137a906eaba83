"""HydraLoRA on a Llama-3-8B-shaped model: training-step time and peak memory beside PEFT LoRA at equal
trainable parameters.

A LlamaForCausalLM with Llama-3-8B's shapes (hidden 4096, FFN 14336, 32 heads, 8 KV heads, vocabulary
128256; ``--layers`` of them, 32 by default) and random bf16 weights, frozen; adapters on q, k, v, up and
down projections (float32 adapter weights, as PEFT's autocast_adapter_dtype keeps them); gradient
checkpointing; one step = forward + causal-LM loss + backward on ``--batch`` × ``--seq`` random tokens
(no optimizer: its cost is the same small update for every method).

Equal trainable parameters. PEFT LoRA of rank r holds Σ_layers r·(d_in + d_out) parameters. HydraLoRA
with N heads and a shared A of rank r_h holds, per adapted layer, A (r_h·d_in), the N heads
(N·r_h·d_out) and the router (N·d_in): Σ_layers r_h·(d_in + N·d_out) + N·d_in. r_h is the positive integer
that brings this closest to the LoRA count, computed from the shapes of the layers actually adapted
(``--hydra-r`` overrides it); both counts and their ratio are printed and recorded, and each row also
records the parameters that received a gradient in its step. HydraLoRA's α is α_LoRA·r_h/r so both
scale the update by the same α/r.

Methods, interleaved within each round (order rotated from round to round), median over rounds:

* ``peft lora`` — stock PEFT LoRA of rank ``--r`` (the peer);
* ``hydralora`` — :class:`adapters.hydralora.HydraLoraLinear` (its single-function path);
* ``hydralora module path`` — the same layer with ``use_lean_path = False`` (module-by-module ops);
* ``hydralora reference-style`` — the released HydraLoRA code's op sequence (Clin0212/HydraLoRA,
  ``peft/tuners/lora.py``), written out below and swapped in for the layer's forward: a separate router
  ``Linear``, softmax in float32 cast back to the activation dtype, then a loop over N separate ``lora_B``
  heads, each adding g_i·B_i(A x)·α/r with A x recomputed per head. Its heads are N separate float32
  leaf tensors holding the same values as the wide ``lora_hydra_B``.

The PEFT LoRA model and the HydraLoRA model are two wrappers around the same frozen base tensors
(the second base is a deep copy sharing every parameter and buffer). Peak memory is
``torch.cuda.max_memory_allocated`` during a step, in GiB and as the excess over what was allocated
before the step.

Operation counts. A ``TorchDispatchMode`` counts the ATen operations each method issues (after autograd,
so backward and recomputation included) on whatever device the run uses: per adapted layer (the middle
decoder layer's ``up_proj`` called on its own, forward and backward separately; the backward count
includes the AccumulateGrad of its input and of each parameter) and per whole training step. ``non_view``
leaves out views and other metadata-only operations (``t``, ``view``, ``split``, ``detach``, …): roughly
the operations that launch a kernel. On a GPU host each such operation costs some microseconds of Python
and dispatch, which at 4 × 512 tokens is a visible part of the step.

Run: python benchmarks/bench_hydralora_model.py [--layers 32]
  → appends a run to benchmarks/results/hydralora_model.json
CPU check of the script: python benchmarks/bench_hydralora_model.py --small --layers 2 --repeats 2 --out /tmp/x.json
"""
from __future__ import annotations

import argparse
import collections
import copy
import itertools
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from adapters.hydralora import HydraLoraLinear, hydralora_config  # noqa: E402
from adapters.kernels.native import native_unavailable_reason, set_native_mode  # noqa: E402
from benchmarks.model_step import build_model, chosen_methods, profile_steps, summary_rows, time_interleaved  # noqa: E402
from benchmarks.results_log import append_run, results_path  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
RANK_RULE = "integer r_h ≥ 1 minimising |Σ(r_h·d_in + N·r_h·d_out + N·d_in) − Σ r·(d_in + d_out)|"
METHODS = ["peft lora", "hydralora", "hydralora python node", "hydralora module path", "hydralora reference-style"]
_REF_HEADS: dict[int, list[torch.Tensor]] = {}  # id(layer) → N separate float32 heads (reference-style)
_METADATA_OPS = {"_unsafe_view", "_reshape_alias", "as_strided", "expand", "slice", "select", "unsqueeze",
                 "squeeze", "permute", "transpose", "t", "view", "split", "split_with_sizes", "detach", "alias"}


class OpCounter(TorchDispatchMode):
    """Counts the ATen operations dispatched while active: all, and those that are not views/metadata."""

    def __init__(self) -> None:
        super().__init__()
        self.by_op: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.by_op[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def summary(self) -> dict:
        total = sum(self.by_op.values())
        views = sum(c for name, c in self.by_op.items() if name in _METADATA_OPS)
        return {"total": total, "non_view": total - views, "by_op": dict(sorted(self.by_op.items()))}


def reference_style_forward(self: HydraLoraLinear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The released HydraLoRA layer's forward (separate router, softmax, loop over N separate B heads with
    A x recomputed per head), with PEFT's cast of x to the float32 adapter weights."""
    adapter = self.active_adapters[0]
    result = self.base_layer(x, *args, **kwargs)
    torch_result_dtype = result.dtype
    lora_A = self.lora_A[adapter]
    dropout = self.lora_dropout[adapter]
    scaling = self.scaling[adapter]
    x = x.to(lora_A.weight.dtype)
    route_weight = F.softmax(self.lora_hydra_router[adapter](x), dim=-1, dtype=torch.float32).to(result.dtype)
    for i, head in enumerate(_REF_HEADS[id(self)]):
        result = result + torch.unsqueeze(route_weight[..., i], -1) * F.linear(lora_A(dropout(x)), head) * scaling
    return result.to(torch_result_dtype)


def target_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """(d_in, d_out) of every linear layer the adapters will wrap."""
    return [(m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS]


def lora_params(shapes: list[tuple[int, int]], r: int) -> int:
    return sum(r * (d_in + d_out) for d_in, d_out in shapes)


def hydra_params(shapes: list[tuple[int, int]], r_h: int, n: int) -> int:
    """A (r_h × d_in) + N heads (d_out × r_h) + router (N × d_in), summed over the adapted layers."""
    return sum(r_h * d_in + n * r_h * d_out + n * d_in for d_in, d_out in shapes)


def matching_rank(shapes: list[tuple[int, int]], r: int, n: int) -> int:
    """The positive integer r_h whose HydraLoRA parameter count is closest to PEFT LoRA's at rank r."""
    target = lora_params(shapes, r)
    per_rank = sum(d_in + n * d_out for d_in, d_out in shapes)
    fixed = n * sum(d_in for d_in, _ in shapes)
    guess = max(1, math.floor((target - fixed) / per_rank))
    return min((c for c in (guess, guess + 1) if c >= 1),
               key=lambda c: (abs(hydra_params(shapes, c, n) - target), c))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--r", type=int, default=32, help="PEFT LoRA rank (the peer)")
    ap.add_argument("--alpha", type=float, default=128.0, help="PEFT LoRA alpha")
    ap.add_argument("--heads", type=int, default=4, help="HydraLoRA heads N")
    ap.add_argument("--hydra-r", type=int, default=None,
                    help="HydraLoRA rank r_h (default: the rank matching PEFT LoRA's trainable parameters)")
    ap.add_argument("--repeats", type=int, default=11, help="interleaved rounds")
    ap.add_argument("--steps", type=int, default=4, help="steps per method and round (each timed)")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma-separated subset of the methods (peft lora is always timed: it is the reference)")
    ap.add_argument("--no-op-counts", action="store_true", help="skip counting operations")
    ap.add_argument("--profile", action="store_true",
                    help="also run one step per method under torch.profiler: GPU kernel time and kernel count")
    ap.add_argument("--small", action="store_true", help="tiny shapes (checks the script, e.g. on a CPU)")
    ap.add_argument("--out", default=str(results_path("hydralora_model")))
    args = ap.parse_args()

    from peft import LoraConfig, get_peft_model

    methods = chosen_methods(args.methods, METHODS, "peft lora")

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    t0 = time.perf_counter()
    base, config = build_model(args.layers, dev, args.small)
    shared = {id(t): t for t in itertools.chain(base.parameters(), base.buffers())}
    twin = copy.deepcopy(base, memo=shared)  # same frozen tensors, separate modules
    shapes = target_shapes(base)
    n = args.heads
    r_h = args.hydra_r or matching_rank(shapes, args.r, n)
    count_lora, count_hydra = lora_params(shapes, args.r), hydra_params(shapes, r_h, n)

    lora_model = get_peft_model(base, LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=TARGETS,
                                                 init_lora_weights=False))
    hydra_model = get_peft_model(twin, hydralora_config(r_h, args.alpha * r_h / args.r, n, TARGETS,
                                                        init_lora_weights=False))
    hydra_layers = [m for m in hydra_model.modules() if isinstance(m, HydraLoraLinear)]
    for layer in hydra_layers:  # reference-style: N separate heads with the wide B's values
        wide = layer.lora_hydra_B["default"].weight.detach()
        _REF_HEADS[id(layer)] = [wide[:, i * r_h:(i + 1) * r_h].clone().requires_grad_(True) for i in range(n)]
    ref_heads = [h for heads in _REF_HEADS.values() for h in heads]
    build_s = time.perf_counter() - t0
    print(f"trainable parameters: peft lora r={args.r}: {count_lora:,}; hydralora N={n} r_h={r_h}: "
          f"{count_hydra:,} (ratio {count_hydra / count_lora:.4f}); {len(hydra_layers)} adapted layers", flush=True)

    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=dev,
                        generator=torch.Generator(device=dev).manual_seed(1))
    original_forward = HydraLoraLinear.forward
    trainable_of = {
        "peft lora": [p for p in lora_model.parameters() if p.requires_grad],
        "hydra": [p for p in hydra_model.parameters() if p.requires_grad] + ref_heads,
    }

    def select(name: str):
        HydraLoraLinear.forward = original_forward
        HydraLoraLinear.use_lean_path = True
        set_native_mode("auto")
        if name == "peft lora":
            return lora_model, trainable_of["peft lora"]
        if name == "hydralora module path":
            HydraLoraLinear.use_lean_path = False
        elif name == "hydralora python node":
            set_native_mode("off")
        elif name == "hydralora reference-style":
            HydraLoraLinear.forward = reference_style_forward
        return hydra_model, trainable_of["hydra"]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    def step(model, params) -> float:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        for p in params:
            p.grad = None
        return float(out.loss.detach())

    trainable, losses = {}, {}
    for name in methods:  # warm-up (cuBLAS handles, allocator) and the loss of each method
        model, params = select(name)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        trainable[name] = sum(p.numel() for p in params if p.grad is not None)
        losses[name] = float(out.loss.detach())
        for p in params:
            p.grad = None
        step(model, params)
    sync()
    expected = {"peft lora": count_lora, "hydralora": count_hydra, "hydralora python node": count_hydra,
                "hydralora module path": count_hydra,
                "hydralora reference-style": count_hydra}
    wrong = {m: (trainable[m], expected[m]) for m in methods if trainable[m] != expected[m]}
    if wrong:
        raise SystemExit(f"parameters with a gradient differ from the closed-form counts: {wrong}")

    op_counts = {}
    if not args.no_op_counts:
        mid = args.layers // 2
        probe = {"peft lora": lora_model.base_model.model.model.layers[mid].mlp.up_proj,
                 "hydra": hydra_model.base_model.model.model.layers[mid].mlp.up_proj}
        g = torch.Generator(device=dev).manual_seed(2)
        x = torch.randn(args.batch, args.seq, config.hidden_size, device=dev, dtype=torch.bfloat16, generator=g)
        for name in methods:
            model, params = select(name)
            layer = probe["peft lora" if name == "peft lora" else "hydra"]
            counts = {}
            for attempt in range(2):  # the first call creates cached constants; count the second
                xl = x.detach().requires_grad_(True)
                with OpCounter() as fwd:
                    y = layer(xl)
                gy = torch.ones_like(y)
                with OpCounter() as bwd:
                    y.backward(gy)
                for p in params:
                    p.grad = None
                counts = {"layer_forward": fwd.summary(), "layer_backward": bwd.summary(),
                          "layer_output_grad_fn": type(y.grad_fn).__name__}
            with OpCounter() as whole:
                step(model, params)
            counts["step"] = whole.summary()
            op_counts[name] = counts
            lf, lb = counts["layer_forward"], counts["layer_backward"]
            print(f"{name:<27} ops per adapted layer: forward {lf['non_view']} ({lf['total']} with views), "
                  f"backward {lb['non_view']} ({lb['total']}); whole step {counts['step']['non_view']} "
                  f"({counts['step']['total']})", flush=True)
        sync()

    def prepare(name: str):
        model, params = select(name)
        return lambda: step(model, params)

    times, peaks = time_interleaved(methods, prepare, args.repeats, dev, args.steps)
    profiled = profile_steps(methods, prepare, dev) if args.profile and cuda else {}
    select("hydralora")

    rows = summary_rows(methods, times, peaks, "peft lora")
    for row in rows:
        name = row["method"]
        row.update(loss_at_warmup=losses[name], trainable_parameters=trainable[name])
        if name in op_counts:
            row["op_counts"] = op_counts[name]
        if name in profiled:
            row["profiled_step"] = profiled[name]
        mem = f"  peak {row['peak_memory_gib']:.2f} GiB (+{row['peak_over_resident_gib']:.2f})" if peaks[name] else ""
        print(f"{name:<27} {row['median_s_per_step'] * 1e3:9.1f} ms/step  {row['relative_to_peft_lora']:.3f}× peft lora{mem}  loss {losses[name]:.4f}  "
              f"trainable {trainable[name]:,}", flush=True)
    result = {
        "benchmark": "hydralora_model_training_step",
        "command": "python benchmarks/bench_hydralora_model.py " + " ".join(sys.argv[1:]),
        "model": {"shape": "Llama-3-8B" if not args.small else "tiny", "layers": args.layers,
                  "hidden": config.hidden_size, "intermediate": config.intermediate_size,
                  "vocab": config.vocab_size, "weights": "random bf16, frozen",
                  "gradient_checkpointing": True},
        "adapters": {
            "targets": TARGETS, "adapted_layers": len(hydra_layers), "adapter_dtype": "float32",
            "peft_lora": {"r": args.r, "alpha": args.alpha, "parameters": count_lora},
            "hydralora": {"heads": n, "r": r_h, "alpha": args.alpha * r_h / args.r, "parameters": count_hydra,
                          "rank_rule": "given by --hydra-r" if args.hydra_r else RANK_RULE},
            "parameter_ratio_hydralora_to_lora": count_hydra / count_lora,
        },
        "tokens": {"batch": args.batch, "seq": args.seq},
        "step": "forward + loss + backward (no optimizer)",
        "native_layers": native_unavailable_reason(dev) or "built (adapters.kernels.native)",
        "repeats": args.repeats,
        "steps_per_round": args.steps,
        "build_s": build_s,
        "loss_diff_hydralora_vs_module_path": (abs(losses["hydralora"] - losses["hydralora module path"])
                                               if {"hydralora", "hydralora module path"} <= set(losses) else None),
        "op_counts_note": ("ATen operations seen by a TorchDispatchMode; layer counts for the middle decoder "
                           "layer's up_proj called alone (backward includes AccumulateGrad of its input and "
                           "parameters); non_view leaves out views/metadata operations"),
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
