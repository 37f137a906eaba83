"""TwoNN (and GRIDE) intrinsic dimension on the CPU: geoprobe against scikit-dimension, side by side.

Data: 10,000 points on a 10-dimensional curved manifold, x = tanh(z A / sqrt(10)) + 0.01 ε with
z ~ N(0, I_10), A ~ N(0, 1)^(10 × D), ε ~ N(0, I_D) (full rank, like hidden states), for D = 576 (the
SmolLM2-135M hidden size) and D = 4096. Runs alternate between the two libraries; the JSON records every
time, the medians and both answers.

    python benchmarks/bench_intrinsic_dim_cpu.py [--repeats 3] [--skip-4096] [--no-gride]

Appends a run to benchmarks/results/intrinsic_dim_cpu.json.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_log import append_run, results_path  # noqa: E402
from geoprobe.probes.intrinsic_dim import intrinsic_dimension  # noqa: E402

OUT = results_path("intrinsic_dim_cpu")


def manifold(n: int, dim: int, d: int = 10, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, d))
    a = rng.standard_normal((d, dim))
    return np.tanh(z @ a / np.sqrt(d)) + 0.01 * rng.standard_normal((n, dim))


CPU_SECONDS: dict[str, list[float]] = {}


def timed(fn, label: str = ""):
    """Run ``fn``; return its result and wall seconds, recording process CPU seconds (all threads)
    under ``label``: on a shared machine the CPU time is the steadier of the two."""
    c = time.process_time()
    t = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t
    CPU_SECONDS.setdefault(label, []).append(time.process_time() - c)
    return out, wall


def skdim_fit(est, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return est.fit(x)


def bench_twonn(x: np.ndarray, repeats: int, ours_repeats: int) -> dict:
    import skdim

    ours_t, peer_t, peer_mle_t = [], [], []
    ours = peer = peer_mle = None
    intrinsic_dimension(x[:500])  # warm-up (thread pools, allocator)
    for r in range(max(repeats, ours_repeats)):
        if r < ours_repeats:
            ours, t = timed(lambda: intrinsic_dimension(x, estimator="twonn"), f"geoprobe_{x.shape[1]}")
            ours_t.append(t)
        if r < repeats:
            peer, t = timed(lambda: skdim_fit(skdim.id.TwoNN(), x), f"skdim_{x.shape[1]}")
            peer_t.append(t)
        if r == 0:
            peer_mle, t = timed(lambda: skdim_fit(skdim.id.TwoNN(method="mle", discard_fraction=0.0), x))
            peer_mle_t.append(t)
    o, p = statistics.median(ours_t), statistics.median(peer_t)
    oc = statistics.median(CPU_SECONDS[f"geoprobe_{x.shape[1]}"])
    pc = statistics.median(CPU_SECONDS[f"skdim_{x.shape[1]}"])
    return {
        "n": int(x.shape[0]), "dim": int(x.shape[1]),
        "geoprobe_seconds": ours_t, "scikit_dimension_seconds": peer_t,
        "scikit_dimension_mle_seconds": peer_mle_t,
        "geoprobe_median_s": o, "scikit_dimension_median_s": p, "speedup": p / o,
        "geoprobe_cpu_seconds": CPU_SECONDS[f"geoprobe_{x.shape[1]}"],
        "scikit_dimension_cpu_seconds": CPU_SECONDS[f"skdim_{x.shape[1]}"],
        "cpu_time_ratio": pc / oc,
        "geoprobe_linear_fit": ours.linear_fit_dimension, "scikit_dimension_linear_fit": peer.dimension_,
        "linear_fit_rel_diff": abs(ours.linear_fit_dimension - peer.dimension_) / abs(peer.dimension_),
        "geoprobe_mle": ours.dimension, "geoprobe_mle_error": ours.error,
        "scikit_dimension_mle": peer_mle.dimension_,
        "mle_rel_diff": abs(ours.dimension - peer_mle.dimension_) / abs(peer_mle.dimension_),
        "n_duplicates_removed": ours.n_duplicates_removed,
    }


def bench_gride(x: np.ndarray) -> dict:
    import skdim

    intrinsic_dimension(x[:1000], estimator="gride")
    ours, t_ours = timed(lambda: intrinsic_dimension(x, estimator="gride"))
    peer, t_peer = timed(lambda: skdim_fit(skdim.id.GRIDE(multiscale=True, range_max=64), x))
    ours_d = [s.dimension for s in ours.scales]
    return {
        "n": int(x.shape[0]), "dim": int(x.shape[1]),
        "geoprobe_seconds": t_ours, "scikit_dimension_seconds": t_peer, "speedup": t_peer / t_ours,
        "n1": [s.n1 for s in ours.scales], "geoprobe_dimensions": ours_d,
        "scikit_dimension_dimensions": [float(v) for v in peer.dimension_scales_],
        "max_rel_diff": float(np.max(np.abs(np.array(ours_d) - peer.dimension_scales_)
                                     / np.abs(peer.dimension_scales_))),
        "geoprobe_chosen_dimension": ours.dimension,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="scikit-dimension runs per size")
    ap.add_argument("--ours-repeats", type=int, default=5, help="geoprobe runs per size")
    ap.add_argument("--skip-4096", action="store_true")
    ap.add_argument("--no-gride", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    import skdim
    import sklearn

    result = {
        "what": "TwoNN intrinsic dimension, geoprobe vs scikit-dimension, CPU, same process",
        "data": "10k points, tanh(z A / sqrt(10)) + 0.01 noise, z in R^10, seed 0",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "load_average_before": os.getloadavg()},
        "versions": {"torch": torch.__version__, "numpy": np.__version__,
                     "scikit_dimension": getattr(skdim, "__version__", "?"),
                     "scikit_learn": sklearn.__version__, "python": platform.python_version()},
        "command": "python benchmarks/bench_intrinsic_dim_cpu.py " + " ".join(sys.argv[1:]),
        "twonn": [],
    }
    sizes = [576] + ([] if args.skip_4096 else [4096])
    for dim in sizes:
        x = manifold(10_000, dim)
        reps = args.repeats if dim == 576 else max(1, args.repeats - 1)
        row = bench_twonn(x, reps, args.ours_repeats)
        result["twonn"].append(row)
        print(f"TwoNN 10k x {dim}: geoprobe {row['geoprobe_median_s']:.3f} s, scikit-dimension "
              f"{row['scikit_dimension_median_s']:.2f} s, speed-up {row['speedup']:.1f}x (CPU time "
              f"{row['cpu_time_ratio']:.1f}x); linear fit "
              f"{row['geoprobe_linear_fit']:.6f} vs {row['scikit_dimension_linear_fit']:.6f}, "
              f"MLE {row['geoprobe_mle']:.6f} vs {row['scikit_dimension_mle']:.6f}", flush=True)
    if not args.no_gride:
        g = bench_gride(manifold(10_000, 576))
        result["gride"] = g
        print(f"GRIDE 10k x 576 (n1 = {g['n1']}): geoprobe {g['geoprobe_seconds']:.3f} s, "
              f"scikit-dimension {g['scikit_dimension_seconds']:.2f} s, speed-up {g['speedup']:.1f}x, "
              f"max relative difference {g['max_rel_diff']:.2e}", flush=True)
    result["machine"]["load_average_after"] = os.getloadavg()
    append_run(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
