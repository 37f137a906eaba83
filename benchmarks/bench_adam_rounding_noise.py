"""How far bfloat16 rounding alone moves a fine-tuned adapter under Adam: the noise floor against which a
GPU check compares two runs that should be equal (one process against FSDP), and how far a real fault
moves it. Why rounding can move an element by up to 2·lr a step: `tests/bf16_noise.py`.

The tiny Llama of the test suite is fine-tuned on the CPU with the settings of
`tests/test_train_parallel.py`'s GPU check (HypLoRA r = 4, lr 5e-3, 6 steps of 2 × 3 sequences). Every
linear layer's products (forward, and both of backward) run as bfloat16 operands summed in float32 and
rounded once to bfloat16 (`bf16_noise.Bf16Linear`); the reference sums the inner dimension in one piece,
each perturbed run in parts added in another order (a split-K kernel). A control run repeats the
reference (bit-identical), and a fault run loses the gradient of half of every adapter tensor's rows (a
shard whose gradient is never reduced). For every run it reports the share of adapter elements outside
the GPU check's tolerance (rtol 2e-3, atol 2e-4), the largest difference against Adam's reach
2·lr·steps, and whether `bf16_noise.adapter_mismatches` passes it.

    python benchmarks/bench_adam_rounding_noise.py   # about a minute on 2 cores
      → appends a run (label cpu) to benchmarks/results/adam_rounding_noise.json
    python benchmarks/bench_adam_rounding_noise.py --device cuda   # on a GPU: label cuda
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from adapters.data import load_examples  # noqa: E402
from adapters.train import TrainSettings, finetune  # noqa: E402
from benchmarks.results_log import append_run, results_path  # noqa: E402

from bf16_noise import adapter_mismatches, bf16_products, gaps, lose_half_the_rows  # noqa: E402
from finetune_helpers import write_problems  # noqa: E402
from tiny_models import bpe_tokenizer, tiny_llama  # noqa: E402

SETTINGS = dict(lr=5e-3, max_steps=6, batch_size=3, grad_accum=2, max_length=160, save_every=100, seed=3)
RTOL, ATOL = 2e-3, 2e-4  # the one-GPU FSDP check's element tolerance


def _run(examples: list, out: Path, parts: Optional[list[int]], fault: bool = False,
         device: str = "cpu") -> tuple[dict, list]:
    model = tiny_llama().to(device)
    with bf16_products(parts):
        done = finetune(model, bpe_tokenizer(), examples, "hyplora", out=out, settings=TrainSettings(**SETTINGS),
                        progress=False, r=4, dropout=0.0,
                        on_ready=(lambda: lose_half_the_rows(model)) if fault else None)
    adapter = {n: p.detach().double().clone() for n, p in done.model.named_parameters() if p.requires_grad}
    return adapter, list(done.result.loss_values)


def _compare(got: dict, want: dict, reach: float) -> dict:
    tensors = {}
    for name, (diff, off) in gaps(got, want, rtol=RTOL, atol=ATOL).items():
        tensors[name.replace("base_model.model.model.", "")] = {
            "elements": off.numel(), "outside": int(off.sum()), "share_outside": float(off.float().mean()),
            "max_abs_diff": float(diff.max()), "within_reach": bool(diff.max() <= reach)}
    shares = [t["share_outside"] for t in tensors.values()]
    outside, total = sum(t["outside"] for t in tensors.values()), sum(t["elements"] for t in tensors.values())
    return {"share_outside": outside / total, "max_share_outside": max(shares),
            "criterion": adapter_mismatches(got, want, rtol=RTOL, atol=ATOL, reach=reach) or "passes",
            "tensors_with_any_outside": sum(s > 0 for s in shares),
            "tensors": len(shares), "max_abs_diff": max(t["max_abs_diff"] for t in tensors.values()),
            "all_within_reach": all(t["within_reach"] for t in tensors.values()), "per_tensor": tensors}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None,
                    help="results file (default: benchmarks/results/adam_rounding_noise.json)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: the reference runs the GPU's own bfloat16 GEMMs (the trainer's autocast), the "
                         "perturbed runs the emulated products; the run is labelled with the device")
    ap.add_argument("--splits", default="50;25,50,75;10;90;33,66",
                    help="perturbed runs: each ';'-separated item splits the inner dimension at these percents")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        examples = load_examples(write_problems(tmp_path / "train.jsonl", 22))
        dev = args.device
        ref, ref_loss = _run(examples, tmp_path / "ref", None, device=dev)
        again, again_loss = _run(examples, tmp_path / "again", None, device=dev)
        reach = 2 * SETTINGS["lr"] * SETTINGS["max_steps"]
        runs = {"control (the reference again)": (again, again_loss)}
        for item in args.splits.split(";"):
            parts = [int(p) for p in item.split(",")]
            runs[f"split-K at {item} %"] = _run(examples, tmp_path / f"split{len(runs)}", parts, device=dev)
        runs["fault: half of each adapter tensor's rows get no gradient"] = _run(examples, tmp_path / "fault", None,
                                                                                 fault=True, device=dev)
        results = {}
        for name, (adapter, losses) in runs.items():
            rec = _compare(adapter, ref, reach)
            rec["max_loss_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_loss))
            results[name] = rec
            print(f"{name:<58} outside: {100 * rec['share_outside']:5.2f} % of all elements, "
                  f"{rec['tensors_with_any_outside']:>2}/{rec['tensors']} tensors, "
                  f"at most {100 * rec['max_share_outside']:6.2f} % of one; max |Δ| {rec['max_abs_diff']:.3g} "
                  f"(reach {reach:g}), loss rel Δ {rec['max_loss_rel_diff']:.2g}; criterion "
                  f"{'passes' if rec['criterion'] == 'passes' else 'fails'}")
    result = {"what": "bfloat16 rounding against a lost gradient, after Adam steps, adapter elements outside "
                      "the one-GPU FSDP check's tolerance",
              "settings": {**SETTINGS, "method": "hyplora", "r": 4, "rtol": RTOL, "atol": ATOL, "splits": args.splits},
              "adam_reach": reach, "reference_losses": ref_loss, "runs_compared": results,
              "seconds": time.perf_counter() - t0, "device": dev, "threads": torch.get_num_threads()}
    out = append_run(args.out or results_path("adam_rounding_noise"), result, label=dev)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
