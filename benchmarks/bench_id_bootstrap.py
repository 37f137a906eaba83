"""Block-bootstrap replicates of TwoNN (line fit and MLE) and GRIDE (five scales) on the host (numpy)
against the torch path on a CUDA device, side by side in one process, with the largest difference of
the replicates between the two (the draws are the same; the estimators agree to rounding).

The sizes are those of one layer of ``geoprobe probe``'s defaults, larger: N points in G documents,
``--n-boot`` replicates.

    python benchmarks/bench_id_bootstrap.py            # CUDA when available, else torch on the CPU
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.results_log import append_run, results_path  # noqa: E402
from geoprobe.probes.intrinsic_dim import gride_bootstrap, twonn_bootstrap  # noqa: E402


def ratios(rng: np.random.Generator, n: int, scales: tuple[int, ...]) -> dict[int, np.ndarray]:
    """Neighbour-distance ratios of n Gaussian points in 8 dimensions (exact, by torch.cdist)."""
    x = torch.from_numpy(rng.standard_normal((n, 8)))
    d = torch.cdist(x, x).sort(dim=1).values[:, 1:].numpy()
    return {n1: d[:, 2 * n1 - 1] / d[:, n1 - 1] for n1 in scales}


def best(fn, repeats: int, device: torch.device) -> tuple[object, float]:
    out, times = None, []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return out, min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--groups", type=int, default=64)
    ap.add_argument("--n-boot", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    dev = torch.device(args.device)
    rng = np.random.default_rng(0)
    mus = ratios(rng, args.n, (1, 2, 4, 8, 16))
    groups = np.arange(args.n) % args.groups
    kw = dict(n_boot=args.n_boot, seed=1)
    rows = {}
    for name, fn in (("twonn", lambda d: twonn_bootstrap(mus[1], groups, device=d, **kw)),
                     ("gride_5_scales", lambda d: gride_bootstrap(mus, groups, device=d, **kw))):
        fn(dev)  # warm the device path
        host, t_host = best(lambda: fn(None), args.repeats, torch.device("cpu"))
        on_dev, t_dev = best(lambda: fn(dev), args.repeats, dev)
        a = np.stack(list(host.values()), 1) if isinstance(host, dict) else host
        b = np.stack(list(on_dev.values()), 1) if isinstance(on_dev, dict) else on_dev
        rel = float(np.nanmax(np.abs(a - b) / np.abs(a)))
        rows[name] = {"host_numpy_s": round(t_host, 4), "device_s": round(t_dev, 4),
                      "speedup": round(t_host / t_dev, 2), "max_rel_diff": rel}
        print(f"{name}: numpy {t_host:.3f} s, torch on {dev} {t_dev:.3f} s ({t_host / t_dev:.1f}×), "
              f"max relative difference {rel:.1e}", flush=True)
    result = {"title": "ID block bootstrap: numpy on the host vs torch on the device",
              "device": str(dev), "settings": {"n_points": args.n, "n_groups": args.groups,
                                               "n_boot": args.n_boot, "repeats": args.repeats},
              "results": rows}
    if not args.no_save:
        print("appended to", append_run(results_path("id_bootstrap"), result, label=dev.type))


if __name__ == "__main__":
    main()
