"""`geoprobe probe` on the embedded default model and corpus: cold (empty model cache, the GGUF is
dequantized) and warm (cached safetensors copy), end to end through the command line.

Run: python benchmarks/bench_probe.py   → appends a run (label cpu) to benchmarks/results/probe.json
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.results_log import append_run, results_path  # noqa: E402


def run(cache: str, out: str) -> float:
    env = dict(os.environ, GEOPROBE_CACHE=cache, HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "geoprobe", "probe", "--quiet", "--out", out],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as outdir:
        out = os.path.join(outdir, "p.json")
        cold = run(cache, out)
        warm = [run(cache, out) for _ in range(2)]
        timings = json.loads(Path(out).read_text())["timings"]
    result = {"benchmark": "geoprobe probe (default model, default corpus)",
              "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "cold_s": round(cold, 2), "warm_s": [round(w, 2) for w in warm],
              "stage_seconds_last_run": timings,
              "command": "python benchmarks/bench_probe.py"}
    append_run(results_path("probe"), result, label="cpu")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
