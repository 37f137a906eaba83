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

from adapters.hydralora import HydraLoraLinear, hydralora_config, hydralora_delta_reference  # noqa: E402
from benchmarks.results_log import append_run, results_path  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--d-in", type=int, default=None)
    ap.add_argument("--d-out", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=None, help="batch × sequence length")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
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

    x = torch.randn(tokens, d_in, device=dev, dtype=dtype, requires_grad=True)
    gout = torch.randn(tokens, d_out, device=dev, dtype=dtype)

    def step(fn, params):
        def run():
            for _ in range(args.iters):
                out = fn()
                torch.autograd.grad(out, [x, *params], gout)
        return run

    heads = lambda: Bw.view(d_out, n, r).permute(1, 0, 2)  # noqa: E731
    methods = {
        "hydralora fused": step(lambda: hydra(x), [A, Bw, Wr]),
        "hydralora reference loop": step(
            lambda: base(x) + hydralora_delta_reference(x, A, heads(), Wr, scaling=scaling), [A, Bw, Wr]),
    }
    for name, layer in peers.items():
        params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        methods[name] = step(lambda layer=layer: layer(x), params)

    with torch.no_grad():
        diff = (hydra(x) - base(x) - hydralora_delta_reference(x, A, heads(), Wr, scaling=scaling)).abs().max()

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
    ref = med[f"peft lora r={n * r}"]
    rows = [{"method": k, "median_s_per_step": med[k], "relative_to_peft_lora_r_Nr": med[k] / ref,
             "runs_s_per_step": times[k]} for k in methods]
    for row in rows:
        print(f"{row['method']:<28} {row['median_s_per_step'] * 1e3:9.3f} ms/step  "
              f"{row['relative_to_peft_lora_r_Nr']:.2f}× peft lora r={n * r}")
    result = {
        "benchmark": "hydralora_layer_forward_backward",
        "shape": {"d_in": d_in, "d_out": d_out, "tokens": tokens, "r": r, "heads": n},
        "dtype": str(dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(dev) if cuda else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "iters_per_timing": args.iters,
        "fused_vs_loop_max_abs_diff": float(diff),
        "rows": rows,
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "peft": __import__("peft").__version__},
    }
    out = Path(args.out) if args.out else results_path("hydralora")
    append_run(out, result, label="cuda" if cuda else "cpu")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
