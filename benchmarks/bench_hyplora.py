"""HypLoRA layer speed: the rank-r bottleneck form beside the map chain over d_out and PEFT LoRA.

One adapted linear layer (default: Llama-3-8B FFN shape 4096 → 14336, 4 × 512 tokens on CUDA;
1024 → 2816, 512 tokens on CPU), forward + backward (gradients for the input and every adapter
parameter: A, B, raw curvature, raw scale), in one run:

* ``hyplora bottleneck`` — :class:`adapters.hyplora.HypLoraLinear` (Δ = B·(c·A x), per-token scalars
  from ‖x‖ and aᵀ(BᵀB)a; float32 island; on CUDA the fused Triton kernels of
  :mod:`adapters.hyplora.kernels.fused`);
* ``hyplora bottleneck unfused`` — the same layer with those kernels switched off (torch ops);
* ``hyplora map chain`` — the same weights through :func:`adapters.hyplora.hyplora_delta`
  (expmap0 → B A → time part → logmap0, element-wise over d_out; float32 island);
* ``hyplora reference chain`` — the same with ``official=True`` (the reference code's op sequence);
* ``peft lora`` — stock ``peft.tuners.lora.Linear`` of the same rank (the peer).

Timings are medians over ``--repeats`` rounds; within a round the methods run interleaved, so
machine noise hits them alike. The bottleneck and chain outputs are compared (max abs difference).

Run: python benchmarks/bench_hyplora.py [--device cuda]
  → appends a run (label cpu or cuda) to benchmarks/results/hyplora.json
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from adapters.hyplora import HypLoraLinear, hyplora_config, hyplora_delta  # noqa: E402
from adapters.hyplora.kernels import set_fused_enabled  # noqa: E402
from benchmarks.layer_timing import (grad_step, layer_arguments, layer_result, relative_rows,  # noqa: E402
                                     time_interleaved)
from benchmarks.results_log import append_run, results_path  # noqa: E402


def main() -> None:
    args, sh = layer_arguments(__doc__.split("\n")[0], r=32)
    dev, dtype, d_in, d_out, r = sh.device, sh.dtype, sh.d_in, sh.d_out, args.r
    torch.manual_seed(0)

    base = nn.Linear(d_in, d_out, bias=False).to(dev, dtype).requires_grad_(False)
    hyp = HypLoraLinear(base, "default", config=hyplora_config(r, 128, ["x"], init_lora_weights=False),
                        r=r, lora_alpha=128)
    hyp.to(dev)  # adapter parameters stay float32 (PEFT's autocast_adapter_dtype does the same)
    for p in (hyp.lora_A["default"].weight, hyp.lora_B["default"].weight):
        p.data = p.data.float()
    A = hyp.lora_A["default"].weight
    Bw = hyp.lora_B["default"].weight
    raw_k = hyp.lora_hyp_k["default"]  # shape (1,): the parameters the layer reads
    raw_s = hyp.lora_hyp_s["default"]
    scaling = hyp.scaling["default"]

    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear

    lora = LoraLinear(nn.Linear(d_in, d_out, bias=False).to(dev, dtype).requires_grad_(False), "default",
                      config=LoraConfig(r=r, lora_alpha=128, init_lora_weights=False), r=r, lora_alpha=128)
    lora.to(dev)
    lora_params = [lora.lora_A["default"].weight, lora.lora_B["default"].weight]
    for p in lora_params:
        p.data = p.data.float()

    x = torch.randn(sh.tokens, d_in, device=dev, dtype=dtype, requires_grad=True)
    gout = torch.randn(sh.tokens, d_out, device=dev, dtype=dtype)
    params = [x, A, Bw, raw_k, raw_s]

    def chain(official: bool):
        def fwd():
            delta = hyplora_delta(x.float(), A, Bw, hyp.hyp_curvature("default"), hyp.hyp_scale("default"),
                                  official=official)
            return base(x) + (scaling * delta).to(dtype)
        return fwd

    def unfused():
        previous = set_fused_enabled(False)
        try:
            return hyp(x)
        finally:
            set_fused_enabled(previous)

    methods = {
        "hyplora bottleneck": grad_step(lambda: hyp(x), params, gout, args.iters),
        "hyplora bottleneck unfused": grad_step(unfused, params, gout, args.iters),
        "hyplora map chain": grad_step(chain(False), params, gout, args.iters),
        "hyplora reference chain": grad_step(chain(True), params, gout, args.iters),
        "peft lora": grad_step(lambda: lora(x), [x, *lora_params], gout, args.iters),
    }
    with torch.no_grad():
        diff = (hyp(x).float() - chain(False)().float()).abs().max()
        diff_unfused = (hyp(x).float() - unfused().float()).abs().max()

    times = time_interleaved(methods, repeats=args.repeats, iters=args.iters, cuda=sh.cuda)
    rows = relative_rows(times, "peft lora", "relative_to_peft_lora")
    for row in rows:
        print(f"{row['method']:<26} {row['median_s_per_step'] * 1e3:9.3f} ms/step  "
              f"{row['relative_to_peft_lora']:.2f}× peft lora r={r}")
    result = layer_result("hyplora_layer_forward_backward", sh, args, rows,
                          bottleneck_vs_chain_max_abs_diff=float(diff),
                          bottleneck_vs_unfused_max_abs_diff=float(diff_unfused))
    out = Path(args.out) if args.out else results_path("hyplora")
    append_run(out, result, label="cuda" if sh.cuda else "cpu")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
