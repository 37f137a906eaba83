"""Gromov δ on a CUDA GPU: ``gp.delta`` on CUDA tensors beside the float64-only torch blocks and the
CPU kernel, in one run (needs a CUDA device).

For each size: Gaussian points in 576 dimensions (SmolLM2's hidden size), fixed base point 0.

* ``cuda`` — ``delta()`` on a CUDA float32 tensor: float64 distances on the GPU, float32 search, float64
  recomputation of the candidate rows (the default path);
* ``cuda_float64_only`` — the same blocks in float64 throughout (``search_float32=False``);
* ``cpu`` — ``delta()`` on the same points as a numpy array (compiled CPU kernel, this machine's cores).

A tree metric (δ = 0, every row a float64 candidate) shows the worst case of the float32 search; exact
mode (max over every base point) is timed at small sizes. All values are checked against each other
(1e-9 relative). Timings: median of ``--repeats`` after one warm-up, with ``torch.cuda.synchronize``.

Run: python benchmarks/bench_delta_gpu.py   → benchmarks/results/delta_gpu.json
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from geoprobe.files import write_json  # noqa: E402
from geoprobe.hyperbolicity import delta  # noqa: E402
from geoprobe.kernels import delta_torch  # noqa: E402


def tree_metric(n: int, seed: int) -> np.ndarray:
    """Shortest-path distances of a random labelled tree with uniform(0.1, 2) edge weights."""
    import networkx as nx

    rng = np.random.default_rng(seed)
    T = nx.random_labeled_tree(n, seed=seed)
    for u, v in T.edges:
        T[u][v]["weight"] = float(rng.uniform(0.1, 2.0))
    lengths = dict(nx.all_pairs_dijkstra_path_length(T))
    D = np.triu(np.array([[lengths[i][j] for j in range(n)] for i in range(n)]), k=1)
    return D + D.T


def timed(fn, repeats: int):
    fn()
    torch.cuda.synchronize()
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times), times


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b)) or max(abs(a), abs(b)) < 1e-12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1500,4000,10000")
    ap.add_argument("--cpu-max", type=int, default=4000, help="largest n also timed on the CPU")
    ap.add_argument("--exact-sizes", default="256,512")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results" / "delta_gpu.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    rng = np.random.default_rng(0)
    fixed = {}
    for n in [int(s) for s in args.sizes.split(",")]:
        X = rng.standard_normal((n, 576))
        Xg = torch.from_numpy(X).float().cuda()
        X32 = Xg.double().cpu().numpy()
        Dg = delta_torch.euclidean_distances_torch(Xg)
        row = {"n": n}
        r, t, ts = timed(lambda: delta(Xg), args.repeats)
        row["cuda"] = {"median_s": t, "times_s": ts, "delta": r.delta, "delta_rel": r.delta_rel}
        v, t, ts = timed(lambda: delta_torch.delta_fixed_torch(Dg, 0, search_float32=False),
                         args.repeats)
        row["cuda_float64_only"] = {"median_s": t, "times_s": ts, "delta": v}
        assert close(v, r.delta), (n, v, r.delta)
        if n <= args.cpu_max:
            rc, t, ts = timed(lambda: delta(X32), args.repeats)
            row["cpu"] = {"median_s": t, "times_s": ts, "delta": rc.delta}
            assert close(rc.delta, r.delta), (n, rc.delta, r.delta)
        print(n, {k: v["median_s"] for k, v in row.items() if isinstance(v, dict)}, flush=True)
        fixed[f"gauss576_n{n}"] = row

    # worst case for the float32 search: a tree metric, δ = 0, every row tied
    n = 2000
    D = tree_metric(n, 0)
    Dt = torch.from_numpy(D).cuda()
    r, t, ts = timed(lambda: delta(Dt, distances=True), args.repeats)
    fixed[f"tree_n{n}"] = {"n": n, "cuda": {"median_s": t, "times_s": ts, "delta": r.delta}}
    print("tree", n, t, r.delta, flush=True)

    exact = {}
    for n in [int(s) for s in args.exact_sizes.split(",")]:
        X = torch.from_numpy(rng.standard_normal((n, 576))).cuda()
        r, t, ts = timed(lambda: delta(X, mode="exact"), 1)
        rc, tc, _ = timed(lambda: delta(X.cpu().numpy(), mode="exact"), 1)
        assert close(r.delta, rc.delta)
        exact[f"gauss576_n{n}"] = {"n": n, "cuda_s": t, "cpu_s": tc, "delta": r.delta}
        print("exact", n, t, tc, flush=True)

    write_json(args.out, {
        "benchmark": "delta_gpu",
        "command": "python benchmarks/bench_delta_gpu.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(0),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__, "numpy": np.__version__},
        "fixed": fixed, "exact": exact})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
