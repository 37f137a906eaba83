"""Token-counting throughput: ``Corpus.count_tokens`` beside the ways one would write it by hand.

Corpus: CPython's ``pydoc_data.topics`` (the default corpus) repeated until it holds at least
``--min-tokens`` tokens (default 2M); tokenizer: SmolLM2-135M-Instruct's (the embedded default model).
Methods, run interleaved in each round so machine noise hits them alike:

* ``geoprobe count_tokens`` — batches of 1000 through the Rust backend's ``encode_batch_fast``,
  ``np.fromiter`` + ``np.bincount``;
* ``transformers batch + bincount`` — ``tokenizer(batch, return_attention_mask=False)`` in batches
  of 1000, then ``np.bincount`` (the public transformers call);
* ``per-document + Counter`` — ``tokenizer(doc)`` one document at a time into a
  ``collections.Counter`` (the plain reference; its counts are the oracle the others must equal).

Reported per method: median and best wall-clock tokens/s, and tokens per CPU-second (process CPU
time over all threads), which is robust to other load on the machine. The load average before and
after is recorded; on a shared machine compare the CPU-second figures.

Run: python benchmarks/bench_token_counting.py → appends a run to benchmarks/results/token_counting.json
"""
from __future__ import annotations

import argparse
import collections
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from geoprobe.corpus import Corpus  # noqa: E402
from benchmarks.results_log import append_run, results_path  # noqa: E402
from geoprobe.models import load_tokenizer  # noqa: E402


def transformers_bincount(tokenizer, docs, batch_size=1000) -> np.ndarray:
    total = np.zeros(len(tokenizer), dtype=np.int64)
    for i in range(0, len(docs), batch_size):
        ids = tokenizer(docs[i:i + batch_size], add_special_tokens=True,
                        return_attention_mask=False)["input_ids"]
        flat = np.fromiter((t for row in ids for t in row), dtype=np.int64)
        total += np.bincount(flat, minlength=total.size)
    return total


def per_document_counter(tokenizer, docs) -> np.ndarray:
    c = collections.Counter()
    for d in docs:
        c.update(tokenizer(d, add_special_tokens=True)["input_ids"])
    out = np.zeros(len(tokenizer), dtype=np.int64)
    for k, v in c.items():
        out[k] = v
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--min-tokens", type=int, default=2_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default=None, help="model spec for the tokenizer (default: SmolLM2)")
    ap.add_argument("--out", default=str(results_path("token_counting")))
    args = ap.parse_args()

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(args.model)
    tokenizer_seconds = time.perf_counter() - t0

    base = Corpus.default()
    per_copy = base.count_tokens(tokenizer, progress=False).n_tokens
    copies = math.ceil(args.min_tokens / per_copy)
    corpus = Corpus(documents=base.documents * copies, name=f"pydoc_data.topics × {copies}")
    docs = corpus.documents

    methods = {
        "geoprobe count_tokens": lambda: corpus.count_tokens(tokenizer, progress=False).counts,
        "transformers batch + bincount": lambda: transformers_bincount(tokenizer, docs),
        "per-document + Counter": lambda: per_document_counter(tokenizer, docs),
    }
    walls: dict[str, list[float]] = {m: [] for m in methods}
    cpus: dict[str, list[float]] = {m: [] for m in methods}
    results: dict[str, np.ndarray] = {}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            c0, w0 = time.process_time(), time.perf_counter()
            counts = fn()
            walls[name].append(time.perf_counter() - w0)
            cpus[name].append(time.process_time() - c0)
            results[name] = counts
    oracle = results["per-document + Counter"]
    n_tokens = int(oracle.sum())

    rows = {}
    for name in methods:
        rows[name] = {
            "counts_equal_reference": bool(np.array_equal(results[name], oracle)),
            "seconds_median": statistics.median(walls[name]),
            "seconds_all": [round(w, 4) for w in walls[name]],
            "tokens_per_second_median": n_tokens / statistics.median(walls[name]),
            "tokens_per_second_best": n_tokens / min(walls[name]),
            "tokens_per_cpu_second": n_tokens / statistics.median(cpus[name]),
        }
    ours = rows["geoprobe count_tokens"]
    report = {
        "benchmark": "token counting throughput",
        "corpus": corpus.name, "n_documents": len(docs), "n_tokens": n_tokens,
        "n_characters": corpus.n_characters,
        "tokenizer": args.model or "SmolLM2-135M-Instruct (embedded default)",
        "tokenizer_load_seconds": round(tokenizer_seconds, 3),
        "repeats": args.repeats, "methods": rows,
        "speedup_vs_transformers_batch": (rows["transformers batch + bincount"]["seconds_median"]
                                          / ours["seconds_median"]),
        "speedup_vs_per_document": (rows["per-document + Counter"]["seconds_median"]
                                    / ours["seconds_median"]),
        "target_tokens_per_second": 1_000_000,
        "machine": {"cpu_count": os.cpu_count(),
                    "cores_available": len(os.sched_getaffinity(0))
                    if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()],
                    "platform": platform.platform(), "python": platform.python_version(),
                    "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM"),
                    "RAYON_NUM_THREADS": os.environ.get("RAYON_NUM_THREADS")},
        "versions": _versions(),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
    }
    append_run(args.out, report)
    for name, r in rows.items():
        print(f"{name:32s} {r['tokens_per_second_median']:>12,.0f} tok/s (best "
              f"{r['tokens_per_second_best']:,.0f}; {r['tokens_per_cpu_second']:,.0f} per CPU-s)"
              f"  equal={r['counts_equal_reference']}")
    print(f"{n_tokens:,} tokens, {len(docs):,} documents; wrote {args.out}")


def _versions() -> dict[str, str]:
    out = {}
    for mod in ("tokenizers", "transformers", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional module is just not reported
            pass
    return out


if __name__ == "__main__":
    main()
