"""TwoNN intrinsic dimension on a CUDA GPU: ``intrinsic_dimension`` on CUDA tensors beside the CPU.

Data: points on a 10-dimensional curved manifold, x = tanh(z A / sqrt(10)) + 0.01 ε (as
bench_intrinsic_dim_cpu.py), float32, drawn on the GPU. For ``--n`` points (100,000 by default) in
``--dim`` = 4096 dimensions the GPU run is timed (median of ``--repeats`` after a warm-up on a subset);
for ``--check-n`` points the GPU and CPU answers are compared (both are exact float64 neighbour
distances, so the estimates agree to rounding) and the CPU is timed once.

Run: python benchmarks/bench_intrinsic_dim_gpu.py → benchmarks/results/intrinsic_dim_gpu.json
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from geoprobe.files import write_json  # noqa: E402
from geoprobe.intrinsic_dim import intrinsic_dimension  # noqa: E402


def manifold(n: int, dim: int, d: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    z = torch.randn(n, d, device="cuda", generator=g)
    a = torch.randn(d, dim, device="cuda", generator=g)
    return torch.tanh(z @ a / d ** 0.5) + 0.01 * torch.randn(n, dim, device="cuda", generator=g)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--check-n", type=int, default=10_000)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "intrinsic_dim_gpu.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    x = manifold(args.n, args.dim)
    intrinsic_dimension(x[:5000])  # warm-up: cuBLAS handles, allocator
    torch.cuda.synchronize()
    times, res = [], None
    for _ in range(args.repeats):
        t = time.perf_counter()
        res = intrinsic_dimension(x, estimator="twonn")
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    print(f"TwoNN {args.n} x {args.dim} on GPU: {statistics.median(times):.3f} s (runs {times}); "
          f"d = {res.dimension:.4f}", flush=True)
    xs = x[:args.check_n]
    gpu_small = intrinsic_dimension(xs, estimator="twonn")
    t = time.perf_counter()
    cpu_small = intrinsic_dimension(xs.cpu(), estimator="twonn")
    cpu_s = time.perf_counter() - t
    t = time.perf_counter()
    intrinsic_dimension(xs, estimator="twonn")
    torch.cuda.synchronize()
    gpu_small_s = time.perf_counter() - t
    rel = abs(gpu_small.dimension - cpu_small.dimension) / abs(cpu_small.dimension)
    print(f"TwoNN {args.check_n} x {args.dim}: GPU {gpu_small_s:.3f} s, CPU {cpu_s:.3f} s, "
          f"d {gpu_small.dimension:.6f} vs {cpu_small.dimension:.6f} (rel diff {rel:.2e})", flush=True)
    write_json(args.out, {
        "benchmark": "intrinsic_dim_gpu",
        "command": "python benchmarks/bench_intrinsic_dim_gpu.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(0),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "data": "tanh(z A / sqrt(10)) + 0.01 noise, z in R^10, float32, seed 0",
        "large": {"n": args.n, "dim": args.dim, "median_s": statistics.median(times), "times_s": times,
                  "dimension": res.dimension, "n_points_used": res.n_points,
                  "n_duplicates_removed": res.n_duplicates_removed},
        "check": {"n": args.check_n, "gpu_s": gpu_small_s, "cpu_s": cpu_s, "gpu_dimension": gpu_small.dimension,
                  "cpu_dimension": cpu_small.dimension, "rel_diff": rel, "cpu_threads": torch.get_num_threads()},
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
