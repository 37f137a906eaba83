"""Gromov δ on a CUDA GPU: ``gp.delta`` on CUDA tensors beside the float64-only torch blocks and the
CPU kernel, in one run (needs a CUDA device).

For each size: Gaussian points in 576 dimensions (SmolLM2's hidden size), fixed base point 0.

* ``cuda`` — ``delta()`` on a CUDA float32 tensor: float64 distances on the GPU, float32 search by the
  Triton (max,min) kernel (``geoprobe.backends.delta_triton``), float64 recomputation of the candidate
  rows (the default path);
* ``cuda_torch_search`` — the same with the float32 search in torch blocks (the kernel switched off);
* ``kernel`` — the Triton kernel alone on the base-point matrix: seconds (median of CUDA-event timings),
  (min, max) pairs per second, and that rate as a fraction of the GPU's documented rate for 32-bit
  min/max (64 results per clock per multiprocessor on compute capability 9.0) at the SM clock read by
  NVML right after the timing and at the maximum SM clock;
* ``cuda_float64_only`` — the torch blocks in float64 throughout (``search_float32=False``);
* ``cpu`` — ``delta()`` on the same points as a numpy array (compiled CPU kernel, this machine's cores).

A tree metric (δ = 0, every row a float64 candidate) shows the worst case of the float32 search; exact
mode (max over every base point) is timed at small sizes. All values are checked against each other
(1e-9 relative). Timings: median of ``--repeats`` after one warm-up, with ``torch.cuda.synchronize``.

Run: python benchmarks/bench_delta_gpu.py   → appends a run to benchmarks/results/delta_gpu.json
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
from geoprobe.probes.hyperbolicity import delta  # noqa: E402
from geoprobe.probes.hyperbolicity import gromov_product  # noqa: E402
from geoprobe.backends import delta_torch, delta_triton  # noqa: E402

MINMAX_PER_CLOCK_PER_SM = 64  # CUDA C++ Programming Guide, arithmetic instruction throughput, cc 9.0


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


def sm_clocks_mhz() -> tuple[float, float]:
    """(current, maximum) SM clock of GPU 0 in MHz, through NVML (nan if unavailable)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        return (float(pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)),
                float(pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM)))
    except Exception:
        return float("nan"), float("nan")


def kernel_rate(D: torch.Tensor, repeats: int) -> dict:
    """Time delta_triton.row_max_float32 alone on the base-point matrix of D (base point 0)."""
    A = gromov_product(D, 0) if isinstance(D, np.ndarray) else delta_torch.gromov_product_torch(D, 0)
    n = A.shape[0]
    bm = delta_triton.tile_size(n)
    nt = -(-n // bm)
    pairs = nt * (nt + 1) // 2 * bm * bm * nt * bm  # (x, y) pairs in the tiles × z steps (padded)
    delta_triton.row_max_float32(A)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        delta_triton.row_max_float32(A)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    cur, mx = sm_clocks_mhz()
    t = statistics.median(times)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rate = 2.0 * pairs / t  # one min and one max per (x, y, z)
    return {"median_s": t, "times_s": times, "tile": bm, "minmax_ops_per_s": rate,
            "sm_clock_mhz_after": cur, "sm_clock_mhz_max": mx, "multiprocessors": sms,
            "fraction_of_minmax_peak_at_clock_after": rate / (sms * MINMAX_PER_CLOCK_PER_SM * cur * 1e6),
            "fraction_of_minmax_peak_at_max_clock": rate / (sms * MINMAX_PER_CLOCK_PER_SM * mx * 1e6),
            "gluon": bool(delta_triton.gluon is not None and delta_triton._USE_GLUON)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1500,4000,10000,20000")
    ap.add_argument("--cpu-max", type=int, default=4000, help="largest n also timed on the CPU")
    ap.add_argument("--torch-search-max", type=int, default=10000,
                    help="largest n also timed with the torch-block float32 search")
    ap.add_argument("--float64-max", type=int, default=4000, help="largest n timed in float64 only")
    ap.add_argument("--exact-sizes", default="256,512,1500")
    ap.add_argument("--exact-cpu-max", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(results_path("delta_gpu")))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    if not delta_triton.available("cuda"):
        print("Triton unavailable: the 'cuda' rows use the torch search", flush=True)
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
        if delta_triton.available("cuda"):
            row["kernel"] = kernel_rate(Dg, max(3, args.repeats))
        if n <= args.torch_search_max:
            previous = delta_triton.set_enabled(False)
            try:
                v, t, ts = timed(lambda: delta_torch.delta_fixed_torch(Dg, 0), 1 if n > 4000 else args.repeats)
            finally:
                delta_triton.set_enabled(previous)
            row["cuda_torch_search"] = {"median_s": t, "times_s": ts, "delta": v}
            assert close(v, r.delta), (n, v, r.delta)
        if n <= args.float64_max:
            v, t, ts = timed(lambda: delta_torch.delta_fixed_torch(Dg, 0, search_float32=False),
                             args.repeats)
            row["cuda_float64_only"] = {"median_s": t, "times_s": ts, "delta": v}
            assert close(v, r.delta), (n, v, r.delta)
        if n <= args.cpu_max:
            rc, t, ts = timed(lambda: delta(X32), args.repeats)
            row["cpu"] = {"median_s": t, "times_s": ts, "delta": rc.delta}
            assert close(rc.delta, r.delta), (n, rc.delta, r.delta)
        print(n, {k: v["median_s"] for k, v in row.items() if isinstance(v, dict)},
              "kernel fraction of min/max peak:",
              row.get("kernel", {}).get("fraction_of_minmax_peak_at_clock_after"), flush=True)
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
        row = {"n": n, "cuda_s": t, "delta": r.delta}
        if n <= args.exact_cpu_max:
            rc, tc, _ = timed(lambda: delta(X.cpu().numpy(), mode="exact"), 1)
            assert close(r.delta, rc.delta)
            row["cpu_s"] = tc
        exact[f"gauss576_n{n}"] = row
        print("exact", n, row, flush=True)

    append_run(args.out, {
        "benchmark": "delta_gpu",
        "command": "python benchmarks/bench_delta_gpu.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(0),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__, "numpy": np.__version__,
                    "triton": getattr(delta_triton.triton, "__version__", None)},
        "fixed": fixed, "exact": exact})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
