"""Seed stability of the adapter plan: SmolLM2-135M-Instruct planned twice from the GSM8K training
prompts, as `geoprobe run` plans it (quick probe of the prompts, GeLoRA budget rule, `auto`), with two
different seeds.

Reported: the method each seed chooses, HypLoRA's curvature from each (relative difference, target
≤ 10 %), the GeLoRA ranks of both and Σ|r_a − r_b| / Σ r_a (target ≤ 0.25), the ranks the unsmoothed
single-estimate rule would give (the rule before the bootstrap, for comparison), and the rank ranges.

Run: python benchmarks/bench_plan_stability.py [--seeds 0 1] [--limit 2000]
     → appends a run to benchmarks/results/plan_stability.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.results_log import append_run, results_path  # noqa: E402

GSM8K_TRAIN = HERE.parent.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def relative_l1(a: list[int], b: list[int]) -> float:
    """Σ|a − b| / Σ a."""
    return float(np.abs(np.asarray(a) - np.asarray(b)).sum() / np.sum(a))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs=2, default=[0, 1])
    ap.add_argument("--limit", type=int, default=None, help="first N training examples")
    args = ap.parse_args()

    import geoprobe as gp
    from adapters import registry
    from adapters.data import load_examples
    from adapters.gelora import gelora_ranks
    from adapters.plan import plan_adapters
    from geoprobe.workflows import plan_for_training

    lm = gp.load_model()
    examples = load_examples(GSM8K_TRAIN)
    if args.limit:
        examples = examples[: args.limit]
    plans, raw, seconds = [], [], []
    for seed in args.seeds:
        t0 = time.perf_counter()
        plan, profile = plan_for_training(lm, examples, method=registry.AUTO, seed=seed)
        seconds.append(round(time.perf_counter() - t0, 1))
        # the same budget with the curvature method forced, for the curvature comparison
        hyp = plan_adapters(profile, method="hyplora+gelora", r=plan.r,
                            target_modules=plan.target_modules, seed=seed)
        ids = [lg.twonn.dimension for lg in profile.layers]
        costs = None
        raw.append(gelora_ranks(ids[:-1], ids[1:], rule="budget", r=plan.r, floor=1, n_params_fn=costs))
        plans.append((plan, hyp))
    (pa, ha), (pb, hb) = plans
    result = {
        "benchmark": "adapter plan seed stability (SmolLM2-135M-Instruct, GSM8K train prompts)",
        "seeds": args.seeds, "examples": len(examples), "seconds": seconds,
        "methods": [pa.method, pb.method],
        "verdict_reasons": [pa.reasons.get("hyperbolic", ""), pb.reasons.get("hyperbolic", "")],
        "curvatures": [ha.curvature, hb.curvature],
        "curvature_relative_difference": abs(ha.curvature - hb.curvature) / ha.curvature,
        "ranks": [ha.layer_ranks, hb.layer_ranks],
        "rank_ranges": [ha.rank_ranges, hb.rank_ranges],
        "ranks_relative_l1": relative_l1(ha.layer_ranks, hb.layer_ranks),
        "unsmoothed_single_estimate_ranks": raw,
        "unsmoothed_relative_l1": relative_l1(raw[0], raw[1]),
        "targets": {"curvature_relative_difference": 0.10, "ranks_relative_l1": 0.25},
    }
    path = append_run(results_path("plan_stability"), result)
    for k in ("methods", "curvatures", "curvature_relative_difference", "ranks_relative_l1",
              "unsmoothed_relative_l1", "seconds"):
        print(f"{k}: {result[k]}")
    print(f"ranks seed {args.seeds[0]}: {ha.layer_ranks}\nranks seed {args.seeds[1]}: {hb.layer_ranks}")
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
