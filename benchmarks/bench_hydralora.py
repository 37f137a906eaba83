"""HydraLoRA layer speed: the fused ``HydraLoraLinear`` beside the per-head reference loop and PEFT LoRA.

One adapted linear layer (default: Llama-3-8B FFN shape 4096 → 14336 on CUDA, 1024 → 2816 on CPU),
forward + backward (gradients for the input and every adapter parameter), in one run:

* ``hydralora fused`` — :class:`adapters.hydralora.HydraLoraLinear`: [A; W_router] x as one product,
  the N heads combined through one (N·r)-wide product;
* ``hydralora reference loop`` — the same weights through :func:`hydralora_delta_reference`
  (A x recomputed per head, as in the released HydraLoRA code);
* ``peft lora r=N·r`` and ``peft lora r=r`` — stock ``peft.tuners.lora.Linear`` (the peer).

Timings are medians over ``--repeats`` rounds; within a round the methods run interleaved, so
machine noise hits them alike. The fused and loop outputs are compared (max abs difference).

Run: python benchmarks/bench_hydralora.py [--device cuda]
  → appends a run (label cpu or cuda) to benchmarks/results/hydralora.json
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from adapters.hydralora import HydraLoraLinear, hydralora_config, hydralora_delta_reference  # noqa: E402
from benchmarks.layer_timing import (grad_step, layer_arguments, layer_result, relative_rows,  # noqa: E402
                                     time_interleaved)
from benchmarks.results_log import append_run, results_path  # noqa: E402


def main() -> None:
    args, sh = layer_arguments(__doc__.split("\n")[0], r=8,
                               extra=lambda ap: ap.add_argument("--heads", type=int, default=4))
    dev, dtype, d_in, d_out = sh.device, sh.dtype, sh.d_in, sh.d_out
    torch.manual_seed(0)

    base = nn.Linear(d_in, d_out, bias=False).to(dev, dtype).requires_grad_(False)
    n, r = args.heads, args.r
    hydra = HydraLoraLinear(base, "default", config=hydralora_config(r, 32, n, ["x"]), r=r, lora_alpha=32)
    hydra.to(dev, dtype)
    with torch.no_grad():
        hydra.lora_hydra_B["default"].weight.normal_(std=0.02)
    A = hydra.lora_A["default"].weight
    Bw = hydra.lora_hydra_B["default"].weight
    Wr = hydra.lora_hydra_router["default"].weight
    scaling = hydra.scaling["default"]

    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear

    peers = {}
    for rank in (n * r, r):
        layer = LoraLinear(nn.Linear(d_in, d_out, bias=False).to(dev, dtype).requires_grad_(False), "default",
                           config=LoraConfig(r=rank, lora_alpha=32, init_lora_weights=False), r=rank, lora_alpha=32)
        peers[f"peft lora r={rank}"] = layer.to(dev, dtype)

    x = torch.randn(sh.tokens, d_in, device=dev, dtype=dtype, requires_grad=True)
    gout = torch.randn(sh.tokens, d_out, device=dev, dtype=dtype)
    heads = lambda: Bw.view(d_out, n, r).permute(1, 0, 2)  # noqa: E731
    methods = {
        "hydralora fused": grad_step(lambda: hydra(x), [x, A, Bw, Wr], gout, args.iters),
        "hydralora reference loop": grad_step(
            lambda: base(x) + hydralora_delta_reference(x, A, heads(), Wr, scaling=scaling), [x, A, Bw, Wr], gout,
            args.iters),
    }
    for name, layer in peers.items():
        params = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        methods[name] = grad_step(lambda layer=layer: layer(x), params, gout, args.iters)

    with torch.no_grad():
        diff = (hydra(x) - base(x) - hydralora_delta_reference(x, A, heads(), Wr, scaling=scaling)).abs().max()

    times = time_interleaved(methods, repeats=args.repeats, iters=args.iters, cuda=sh.cuda)
    rows = relative_rows(times, f"peft lora r={n * r}", "relative_to_peft_lora_r_Nr")
    for row in rows:
        print(f"{row['method']:<28} {row['median_s_per_step'] * 1e3:9.3f} ms/step  "
              f"{row['relative_to_peft_lora_r_Nr']:.2f}× peft lora r={n * r}")
    result = layer_result("hydralora_layer_forward_backward", sh, args, rows, shape={"heads": n},
                          fused_vs_loop_max_abs_diff=float(diff))
    out = Path(args.out) if args.out else results_path("hydralora")
    append_run(out, result, label="cuda" if sh.cuda else "cpu")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
