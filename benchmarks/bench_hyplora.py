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

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from adapters.hyplora import HypLoraLinear, hyplora_config, hyplora_delta  # noqa: E402
from adapters.hyplora.kernels import set_fused_enabled  # noqa: E402
from benchmarks.results_log import append_run, results_path  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--d-in", type=int, default=None)
    ap.add_argument("--d-out", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=None, help="batch × sequence length")
    ap.add_argument("--r", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--iters", type=int, default=10, help="forward+backward passes per timing")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    cuda = args.device.startswith("cuda")
    d_in = args.d_in or (4096 if cuda else 1024)
    d_out = args.d_out or (14336 if cuda else 2816)
    tokens = args.tokens or (4 * 512 if cuda else 512)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    dev = torch.device(args.device)
    r = args.r
    torch.manual_seed(0)

    base = nn.Linear(d_in, d_out, bias=False).to(dev, dtype).requires_grad_(False)
    hyp = HypLoraLinear(base, "default", config=hyplora_config(r, 128, ["x"], init_lora_weights=False),
                        r=r, lora_alpha=128)
    hyp.to(dev)  # adapter parameters stay float32 (PEFT's autocast_adapter_dtype does the same)
    for p in (hyp.lora_A["default"].weight, hyp.lora_B["default"].weight):
        p.data = p.data.float()
    A = hyp.lora_A["default"].weight
    Bw = hyp.lora_B["default"].weight
    raw_k = hyp.lora_hyp_k["default"].view(())
    raw_s = hyp.lora_hyp_s["default"].view(())
    scaling = hyp.scaling["default"]
    params = [A, Bw, raw_k, raw_s]

    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear

    lora = LoraLinear(nn.Linear(d_in, d_out, bias=False).to(dev, dtype).requires_grad_(False), "default",
                      config=LoraConfig(r=r, lora_alpha=128, init_lora_weights=False), r=r, lora_alpha=128)
    lora.to(dev)
    lora_params = [lora.lora_A["default"].weight, lora.lora_B["default"].weight]
    for p in lora_params:
        p.data = p.data.float()

    x = torch.randn(tokens, d_in, device=dev, dtype=dtype, requires_grad=True)
    gout = torch.randn(tokens, d_out, device=dev, dtype=dtype)

    def chain(official: bool):
        def fwd():
            delta = hyplora_delta(x.float(), A, Bw, hyp.hyp_curvature("default"), hyp.hyp_scale("default"),
                                  official=official)
            return base(x) + (scaling * delta).to(dtype)
        return fwd

    def step(fn, ps):
        def run():
            for _ in range(args.iters):
                out = fn()
                torch.autograd.grad(out, [x, *ps], gout)
        return run

    def unfused():
        previous = set_fused_enabled(False)
        try:
            return hyp(x)
        finally:
            set_fused_enabled(previous)

    methods = {
        "hyplora bottleneck": step(lambda: hyp(x), params),
        "hyplora bottleneck unfused": step(unfused, params),
        "hyplora map chain": step(chain(False), params),
        "hyplora reference chain": step(chain(True), params),
        "peft lora": step(lambda: lora(x), lora_params),
    }
    with torch.no_grad():
        diff = (hyp(x).float() - chain(False)().float()).abs().max()
        diff_unfused = (hyp(x).float() - unfused().float()).abs().max()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for fn in methods.values():  # warm-up
        fn()
    sync()
    times = {k: [] for k in methods}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - t0) / args.iters)
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = med["peft lora"]
    rows = [{"method": k, "median_s_per_step": med[k], "relative_to_peft_lora": med[k] / ref,
             "runs_s_per_step": times[k]} for k in methods]
    for row in rows:
        print(f"{row['method']:<26} {row['median_s_per_step'] * 1e3:9.3f} ms/step  "
              f"{row['relative_to_peft_lora']:.2f}× peft lora r={r}")
    result = {
        "benchmark": "hyplora_layer_forward_backward",
        "shape": {"d_in": d_in, "d_out": d_out, "tokens": tokens, "r": r},
        "dtype": str(dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(dev) if cuda else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "iters_per_timing": args.iters,
        "bottleneck_vs_chain_max_abs_diff": float(diff),
        "bottleneck_vs_unfused_max_abs_diff": float(diff_unfused),
        "rows": rows,
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "peft": __import__("peft").__version__},
    }
    out = Path(args.out) if args.out else results_path("hyplora")
    append_run(out, result, label="cuda" if cuda else "cpu")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
