"""Gromov δ on the CPU: ``gp.delta`` beside the reference approaches, in one run.

Compared on the same float64 distance matrices (base point 0, fixed-base δ):

* ``geoprobe`` — ``delta()`` end to end from the points (distances included), compiled pruned kernel;
  its kernel alone on the precomputed distance matrix is recorded too;
* ``khrulkov`` — the reference code of Khrulkov et al. 2020 (hyperbolic-image-embeddings,
  ``delta_hyp``): one n×n×n array, ``max(minimum(A[:, :, None], A[None]), axis=1)``; only at sizes
  where the array fits (n = 300: 216 MB);
* ``numpy_blocked`` — the same formula over blocks of rows (the plain blocked numpy approach);
* ``torch_cpu`` — the torch path of ``geoprobe.backends.delta_torch`` (float32 search, float64 rows) on
  CPU tensors, i.e. what CPU torch tensors would cost if they did not go through the compiled kernel.

Inputs: Gaussian points in 576 dimensions (SmolLM2's hidden size) and 16 dimensions, and a random
weighted tree metric (δ = 0: the least pruning, the kernel's slowest case). Every value is checked
against the others (they must agree to 1e-9 relative). Timings are medians of ``--repeats`` runs,
interleaved; the load average is recorded since this 2-core machine is shared.

Run: python benchmarks/bench_delta_cpu.py   → appends a run to benchmarks/results/delta_cpu.json
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

from benchmarks.results_log import append_run, results_path  # noqa: E402
from geoprobe.probes.hyperbolicity import _fixed_blocked_numpy, delta, euclidean_distances  # noqa: E402
from geoprobe.backends import delta_cpu, delta_torch  # noqa: E402


def khrulkov_delta(dismat: np.ndarray, p: int = 0) -> float:
    """Khrulkov et al.'s ``delta_hyp``: the whole n×n×n (max,min) product at once."""
    row = dismat[p, :][np.newaxis, :]
    col = dismat[:, p][:, np.newaxis]
    XY_p = 0.5 * (row + col - dismat)
    maxmin = np.max(np.minimum(XY_p[:, :, np.newaxis], XY_p[np.newaxis, :, :]), axis=1)
    return float(np.max(maxmin - XY_p))


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
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, times


def run_case(name: str, X, D: np.ndarray, methods: dict, repeats: int) -> dict:
    times = {m: [] for m in methods}
    values = {}
    for _ in range(repeats):  # interleaved: one run of each method per round
        for m, fn in methods.items():
            v, t = timed(fn, 1)
            times[m] += t
            values[m] = v
    ref = values["geoprobe"]
    for m, v in values.items():
        if abs(v - ref) > 1e-9 * max(abs(ref), 1e-300) and not (abs(ref) < 1e-12 and abs(v) < 1e-12):
            raise SystemExit(f"{name}: {m} gave {v!r}, geoprobe {ref!r}")
    out = {"n": int(D.shape[0]), "delta": ref, "diameter": float(D.max()),
           "delta_rel": 2 * ref / float(D.max()), "methods": {}}
    for m in methods:
        out["methods"][m] = {"median_s": statistics.median(times[m]), "times_s": times[m],
                             "value": values[m]}
    base = out["methods"]["geoprobe"]["median_s"]
    for m in methods:
        out["methods"][m]["x_slower_than_geoprobe"] = out["methods"][m]["median_s"] / base
    line = "  ".join(f"{m} {out['methods'][m]['median_s']:.3f}s" for m in methods)
    print(f"{name:28s} n={D.shape[0]:5d} δ={ref:.6g}  {line}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1500)
    ap.add_argument("--n-small", type=int, default=300, help="size for the n×n×n reference")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(results_path("delta_cpu")))
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)

    # compile (or load) the kernel before any timing
    delta(rng.standard_normal((20, 3)))

    cases = {}
    Xs = rng.standard_normal((args.n_small, 576))
    Ds = euclidean_distances(Xs)
    cases[f"gauss576_n{args.n_small}"] = run_case(
        f"gauss576 n={args.n_small}", Xs, Ds, {
            "geoprobe": lambda: delta(Xs).delta,
            "geoprobe_kernel": lambda: delta_cpu.delta_fixed(Ds, 0),
            "khrulkov": lambda: khrulkov_delta(Ds),
            "numpy_blocked": lambda: _fixed_blocked_numpy(Ds, 0),
        }, args.repeats)

    inputs = {
        "gauss576": rng.standard_normal((args.n, 576)),
        "gauss16": rng.standard_normal((args.n, 16)),
    }
    for name, X in inputs.items():
        D = euclidean_distances(X)
        Dt = torch.from_numpy(D)
        cases[f"{name}_n{args.n}"] = run_case(f"{name} n={args.n}", X, D, {
            "geoprobe": lambda X=X: delta(X).delta,
            "geoprobe_kernel": lambda D=D: delta_cpu.delta_fixed(D, 0),
            "numpy_blocked": lambda D=D: _fixed_blocked_numpy(D, 0),
            "torch_cpu": lambda Dt=Dt: delta_torch.delta_fixed_torch(Dt, 0),
        }, args.repeats)
    Dtree = tree_metric(args.n, args.seed)
    cases[f"tree_n{args.n}"] = run_case(f"tree metric n={args.n}", None, Dtree, {
        "geoprobe": lambda: delta(Dtree, distances=True).delta,
        "numpy_blocked": lambda: _fixed_blocked_numpy(Dtree, 0),
    }, args.repeats)

    # exact mode (max over every base point), ours only
    exact = {}
    for n in (100, 300):
        X = rng.standard_normal((n, 576))
        r, t = timed(lambda X=X: delta(X, mode="exact"), 1)
        exact[f"gauss576_n{n}"] = {"n": n, "delta": r.delta, "delta_rel": r.delta_rel, "seconds": t[0]}
        print(f"exact gauss576 n={n}: δ={r.delta:.6g} in {t[0]:.3f}s", flush=True)

    result = {
        "benchmark": "delta_cpu",
        "what": "fixed-base Gromov δ (base point 0), float64, same distance matrices",
        "command": "python benchmarks/bench_delta_cpu.py " + " ".join(sys.argv[1:]),
        "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "numpy": np.__version__,
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "numba": __import__("numba").__version__,
                    "load_average_at_end": list(os.getloadavg())},
        "cases": cases,
        "exact_mode": exact,
    }
    append_run(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
