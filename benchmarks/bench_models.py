"""Model-loading times: the embedded SmolLM2 GGUF converted by transformers (first load) beside the
cached safetensors copy (every later load), the embedding-only reads, and how fast an unknown hub id
fails without network.

Steps, in one run, with a fresh cache folder (``GEOPROBE_CACHE`` pointed at a temporary folder):

* ``first load`` — ``load_model()``: GGUF dequantised by transformers, then cached;
* ``cached load`` — ``load_model()`` again (median of ``--repeats``); logits compared with the first;
* ``load_embeddings (cached copy)`` and ``load_embeddings (GGUF, gguf.quants)`` — E only;
* ``hub id, HF_HUB_OFFLINE=1`` and ``hub id, hub unreachable`` — time to ModelNotFoundError.

Run: python benchmarks/bench_models.py → appends a run to benchmarks/results/models.json
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from geoprobe import models as gm  # noqa: E402
from geoprobe.errors import ModelNotFoundError  # noqa: E402
from benchmarks.results_log import append_run, results_path  # noqa: E402


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def hub_failure_seconds(offline: bool) -> dict:
    old = os.environ.get("HF_HUB_OFFLINE")
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    else:
        os.environ.pop("HF_HUB_OFFLINE", None)
    try:
        t0 = time.perf_counter()
        try:
            gm.load_model("HuggingFaceTB/SmolLM2-135M", cache_dir=tempfile.mkdtemp())
            message = "loaded (the hub was reachable)"
        except ModelNotFoundError as exc:
            message = str(exc)
        return {"seconds": time.perf_counter() - t0, "message": message}
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(results_path("models")))
    args = ap.parse_args()

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="geoprobe-bench-cache-") as cache:
        os.environ["GEOPROBE_CACHE"] = cache
        gguf = gm.default_gguf_path()
        first, t_first = timed(gm.load_model)
        cached = []
        for _ in range(args.repeats):
            second, t = timed(gm.load_model)
            cached.append(t)
        ids = first.tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
        with torch.no_grad():
            same = bool(torch.equal(first.model(ids).logits, second.model(ids).logits))
        emb_cached, t_emb_cached = timed(gm.load_embeddings)
        emb_gguf, t_emb_gguf = timed(lambda: gm.gguf.gguf_embeddings(gguf))
        emb_equal = bool(torch.equal(emb_cached, first.input_embeddings())
                         and torch.equal(emb_gguf, first.input_embeddings()))
        cache_bytes = sum(f.stat().st_size for f in gm.gguf_cache_dir(gguf).iterdir())
    report = {
        "benchmark": "model loading",
        "model": first.name, "gguf": str(gguf), "gguf_bytes": gguf.stat().st_size,
        "cache_bytes": cache_bytes,
        "first_load_seconds": t_first,
        "cached_load_seconds_median": statistics.median(cached),
        "cached_load_seconds_all": [round(t, 3) for t in cached],
        "speedup_cached": t_first / statistics.median(cached),
        "logits_identical": same,
        "load_embeddings_cached_seconds": t_emb_cached,
        "load_embeddings_gguf_seconds": t_emb_gguf,
        "embeddings_identical": emb_equal,
        "hub_offline_env": hub_failure_seconds(offline=True),
        "hub_unreachable": hub_failure_seconds(offline=False),
        "machine": {"cpu_count": os.cpu_count(),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()],
                    "platform": platform.platform(), "python": platform.python_version()},
        "command": " ".join([Path(sys.executable).name] + sys.argv),
    }
    append_run(args.out, report)
    print(f"first load {t_first:.1f} s, cached load {statistics.median(cached):.2f} s "
          f"(×{report['speedup_cached']:.0f}), logits identical: {same}")
    print(f"load_embeddings: cached {t_emb_cached:.2f} s, GGUF {t_emb_gguf:.2f} s, equal: {emb_equal}")
    print(f"hub id offline: {report['hub_offline_env']['seconds']:.2f} s; unreachable: "
          f"{report['hub_unreachable']['seconds']:.2f} s")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
