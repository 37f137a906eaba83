"""How much smaller HypLoRA's update is than LoRA's for the same A and B, measured on a real model's
activations: the reason HypLoRA under-fits at LoRA's learning rate and α/r in the math table
(reports/experiments/math-smollm2).

HypLoRA (arXiv 2410.04010, Eq. 6–8; adapters.hyplora.functional) feeds the low-rank map the space part of
the exponential map of x/s instead of x:

    x_s = √K sinh(min(n/√K, 12)) x/‖x‖,   n = ‖x‖/s,   s initialised to √d_in,

so A and B see x_s = ρ(x)·x with ρ(x) = ‖x_s‖/‖x‖ = sinhc(n/√K)/s, where sinhc(t) = sinh(t)/t ≥ 1. The
logarithmic map back only shortens the result (asinh(z)/z ≤ 1), so for the same A and B the update
(α/r)·Δ(x) is at most ρ(x) times LoRA's (α/r)·B A x, and exactly that where ‖B A x_s‖ ≪ √K. Under Adam the
parameter steps do not depend on that factor, so at equal learning rate and α/r HypLoRA moves the
model's outputs about ρ as far per step as LoRA does. For n ≪ √K, ρ ≈ 1/s = 1/√d_in.

This script runs the base model over training prompts, collects the input x of every targeted linear
layer, and reports per module kind the distribution of n and ρ (x_s computed by
adapters.lorentz.space_expmap0, the formula the layers use), beside the closed form 1/√d_in. Writes one
JSON record (default reports/experiments/math-smollm2/hyplora_input_scale.json).

    python benchmarks/hyplora_input_scale.py \
        --data ../shared/data/llm_adapters_math/train/math_data.json --prompts 32
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adapters.data import format_prompt, load_examples  # noqa: E402
from adapters.lorentz import MAX_T, space_expmap0  # noqa: E402
from geoprobe.models import load_model  # noqa: E402
from geoprobe.records import write_json  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


def _quantiles(values: np.ndarray) -> dict[str, float]:
    q = np.quantile(values, [0.05, 0.5, 0.95])
    return {"p05": float(q[0]), "median": float(q[1]), "p95": float(q[2]), "mean": float(values.mean())}


def measure(model: torch.nn.Module, tokenizer, prompts: list[str], *, curvature: float,
            max_length: int) -> dict[str, dict]:
    """Per target kind: d_in, s0 = √d_in, and quantiles of n = ‖x‖/s0 and ρ = ‖x_s‖/‖x‖ over all tokens
    of all prompts and all layers (float64)."""
    norms: dict[str, list[torch.Tensor]] = {t: [] for t in TARGETS}
    dims: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        kind = name.rsplit(".", 1)[-1]
        if kind in TARGETS and isinstance(module, torch.nn.Linear):
            dims[kind] = module.in_features

            def hook(mod, args, kind=kind):
                x = args[0].detach().to(torch.float64).reshape(-1, args[0].shape[-1])
                norms[kind].append(x)
            hooks.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for text in prompts:
                ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
                model(input_ids=ids["input_ids"])
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for kind in TARGETS:
        if not norms[kind]:
            continue
        x = torch.cat(norms[kind])
        s0 = math.sqrt(dims[kind])
        xn = x.norm(dim=-1)
        keep = xn > 0
        x, xn = x[keep], xn[keep]
        xs = space_expmap0(x / s0, curvature, max_t=MAX_T)
        rho = (xs.norm(dim=-1) / xn).numpy()
        out[kind] = {"d_in": dims[kind], "s0": s0, "one_over_s0": 1.0 / s0, "tokens": int(x.shape[0]),
                     "n": _quantiles((xn / s0).numpy()), "rho": _quantiles(rho)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model spec (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--data", default=str(REPO.parent / "shared/data/llm_adapters_math/train/math_data.json"))
    ap.add_argument("--prompts", type=int, default=32, help="training prompts (the first N)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--curvature", type=float, default=1.0, help="K (the adapters' initial curvature)")
    ap.add_argument("--out", default=str(REPO / "reports/experiments/math-smollm2/hyplora_input_scale.json"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    loaded = load_model(args.model, device="cpu", dtype="float32")
    examples = load_examples(args.data)[: args.prompts]
    prompts = [format_prompt(e) + (e.answer or "") for e in examples]
    t0 = time.perf_counter()
    kinds = measure(loaded.model.eval(), loaded.tokenizer, prompts, curvature=args.curvature,
                    max_length=args.max_length)
    record = {
        "schema": "geoprobe.hyplora_input_scale", "schema_version": 1,
        "model": args.model or "default (SmolLM2-135M-Instruct)", "data": Path(args.data).name,
        "prompts": len(prompts), "max_length": args.max_length, "curvature": args.curvature,
        "formula": "rho = ||x_s||/||x|| = sinhc(n/sqrt(K))/s0, n = ||x||/s0, s0 = sqrt(d_in)",
        "kinds": kinds, "seconds": round(time.perf_counter() - t0, 2),
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "command": "python benchmarks/hyplora_input_scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, record)
    for kind, rec in kinds.items():
        print(f"{kind:10s} d_in={rec['d_in']:5d}  n median {rec['n']['median']:.3f} "
              f"[{rec['n']['p05']:.3f}, {rec['n']['p95']:.3f}]  rho median {rec['rho']['median']:.4f} "
              f"[{rec['rho']['p05']:.4f}, {rec['rho']['p95']:.4f}]  1/sqrt(d_in) {rec['one_over_s0']:.4f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
