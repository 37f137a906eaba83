"""Host (CPU) cost of one adapter layer call: PEFT LoRA beside HypLoRA, fused and unfused (CUDA).

With few tokens per step a training step can be bound by how fast the host issues work, not by the
GPU. This measures, for one adapted linear layer (default 1024 → 1024, 64 tokens, r = 32: GPU work
negligible), the wall time per call of forward and forward + backward, issued back to back with one
synchronisation at the end (so the figure is the host's issue time), plus the issue time of the pieces
the fused path is made of (one ``torch.mm``, one Triton launch, the support check, the autocast guard).

Run: python benchmarks/bench_hyplora_host.py → appends a run to benchmarks/results/hyplora_host.json
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from adapters.hyplora import HypLoraLinear, hyplora_config  # noqa: E402
from adapters.hyplora.kernels import fused as hf  # noqa: E402
from adapters.kernels.native import native_unavailable_reason, set_native_mode  # noqa: E402
from benchmarks.results_log import append_run, results_path  # noqa: E402


def issue_cost(fn, n: int) -> dict:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    cpu = (time.perf_counter() - t) / n
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / n
    return {"issue_us": cpu * 1e6, "wall_us": wall * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--r", type=int, default=32)
    ap.add_argument("--n", type=int, default=300, help="calls per measurement")
    ap.add_argument("--out", default=str(results_path("hyplora_host")))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear

    dev = torch.device("cuda")
    d, T, r = args.d, args.tokens, args.r
    torch.manual_seed(0)
    base = nn.Linear(d, d, bias=False).to(dev, torch.bfloat16).requires_grad_(False)
    hyp = HypLoraLinear(base, "default", config=hyplora_config(r, 128, ["x"], init_lora_weights=False),
                        r=r, lora_alpha=128).to(dev)
    lora = LoraLinear(nn.Linear(d, d, bias=False).to(dev, torch.bfloat16).requires_grad_(False), "default",
                      config=LoraConfig(r=r, lora_alpha=128, init_lora_weights=False), r=r, lora_alpha=128).to(dev)
    for m in (hyp, lora):
        for p in (m.lora_A["default"].weight, m.lora_B["default"].weight):
            p.data = p.data.float()
    x = torch.randn(T, d, device=dev, dtype=torch.bfloat16, requires_grad=True)

    def fwd_bwd(mod):
        def f():
            mod(x).float().sum().backward()
        return f

    def fwd(mod):
        def f():
            with torch.no_grad():
                mod(x)
        return f

    def unfused(f):
        def g():
            previous = hf.set_fused_enabled(False)
            try:
                f()
            finally:
                hf.set_fused_enabled(previous)
        return g

    fast = HypLoraLinear._hyp_fast_adapter

    def dispatch(f):  # the fused Δ kernels reached through PEFT's per-adapter dispatch
        def g():
            HypLoraLinear._hyp_fast_adapter = lambda self, x, a, k: None
            try:
                f()
            finally:
                HypLoraLinear._hyp_fast_adapter = fast
        return g

    def python_node(f):  # the Python autograd.Function (Triton launches) instead of the native C++ node
        def g():
            previous = set_native_mode("off")
            try:
                f()
            finally:
                set_native_mode(previous)
        return g

    res = {
        "peft lora forward+backward": issue_cost(fwd_bwd(lora), args.n),
        "hyplora fused forward+backward": issue_cost(fwd_bwd(hyp), args.n),
        "hyplora fused python node forward+backward": issue_cost(python_node(fwd_bwd(hyp)), args.n),
        "hyplora fused via PEFT dispatch forward+backward": issue_cost(dispatch(fwd_bwd(hyp)), args.n),
        "hyplora unfused forward+backward": issue_cost(unfused(fwd_bwd(hyp)), args.n),
        "peft lora forward": issue_cost(fwd(lora), args.n),
        "hyplora fused forward": issue_cost(fwd(hyp), args.n),
        "hyplora fused python node forward": issue_cost(python_node(fwd(hyp)), args.n),
        "hyplora fused via PEFT dispatch forward": issue_cost(dispatch(fwd(hyp)), args.n),
    }
    xf = torch.randn(T, d, device=dev)
    A, B = hyp.lora_A["default"].weight, hyp.lora_B["default"].weight
    rk, rs = hyp.lora_hyp_k["default"], hyp.lora_hyp_s["default"]
    a = torch.mm(xf, A.t())
    G = B.t() @ B
    ca = torch.empty_like(a)
    sqq = torch.empty(2 * T, device=dev)
    rp = hf._rank_pad(r)
    bt = hf._tokens_per_program(rp)

    def launch():
        hf._fwd_kernel[(-(-T // bt),)](xf, a, G, ca, sqq, rk, rs, 4.0, 0.0, T, d, r, d, r, BT=bt, BD=256, RP=rp,
                                       CUT=1e-4, LIB=True, num_warps=4)

    y = torch.mm(a, B.t())
    res_out = torch.empty(T, d, device=dev, dtype=torch.bfloat16)
    base_out = torch.zeros(T, d, device=dev, dtype=torch.bfloat16)

    def launch_linear():
        hf._fwd_linear_kernel[(T,)](xf, y, base_out, res_out, sqq, rk, rs, 4.0, 0.0, T, d, d, d, d, d, d,
                                    BI=1024, BO=1024, CUT=1e-4, LIB=True, num_warps=4)

    def guard():
        with hf.autocast_off("cuda"):
            pass

    res["piece: torch.mm"] = issue_cost(lambda: torch.mm(xf, A.t()), args.n)
    res["piece: Triton launch (forward kernel)"] = issue_cost(launch, args.n)
    res["piece: Triton launch (layer forward kernel)"] = issue_cost(launch_linear, args.n)
    res["piece: support check"] = issue_cost(lambda: hf.fused_unsupported_reason(xf, A, B, rk, rs), args.n)
    res["piece: autocast guard"] = issue_cost(guard, args.n)
    for k, v in res.items():
        print(f"{k:<40} issue {v['issue_us']:8.1f} us  wall {v['wall_us']:8.1f} us", flush=True)
    append_run(Path(args.out), {
        "benchmark": "hyplora_host_issue_cost",
        "command": "python benchmarks/bench_hyplora_host.py " + " ".join(sys.argv[1:]),
        "shape": {"d_in": d, "d_out": d, "tokens": T, "r": r},
        "device": torch.cuda.get_device_name(dev),
        "host": platform.processor() or platform.machine(),
        "calls_per_measurement": args.n,
        "native_layers": native_unavailable_reason(dev) or "built (adapters.kernels.native)",
        "rows": res,
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "peft": __import__("peft").__version__},
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
