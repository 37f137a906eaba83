"""TwoNN/GRIDE intrinsic dimension on a CUDA GPU: the float32 and 3xTF32 selections side by side, the
all-layers call against a per-layer loop, and the CPU (and scikit-dimension, when installed) beside.

Data: points on a 10-dimensional curved manifold, x = tanh(z A / sqrt(10)) + 0.01 ε (as
bench_intrinsic_dim_cpu.py), float32, drawn on the device.

1. ``--n`` × ``--dim`` points (100,000 × 4096 by default): TwoNN with the float32 selection (TF32 off,
   the former default) and with the 3xTF32 selection (the CUDA default), alternating, median of
   ``--repeats`` after a warm-up; both must give the same exact neighbour distances r1, r2 (compared
   bit for bit) and the same estimates.
2. ``--layers`` × ``--layer-n`` × ``--layer-dim`` (30 × 1200 × 576, SmolLM2-like probe sizes):
   ``intrinsic_dimension_layers`` against a loop of ``intrinsic_dimension`` calls, TwoNN and GRIDE,
   with equal answers required.
3. ``--check-n`` points of set 1: the GPU answer beside the CPU's (exact float64 neighbours both, so
   the estimates agree to rounding), and scikit-dimension's TwoNN on ``--skdim-n`` of them.

``--small`` runs tiny shapes, and on a machine without CUDA runs everything on the CPU with the 3xTF32
rows skipped (a check of the script, not a measurement).

Run: python benchmarks/bench_intrinsic_dim_gpu.py
  → appends a run to benchmarks/results/intrinsic_dim_gpu.json
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_log import append_run, results_path  # noqa: E402
from geoprobe.probes.intrinsic_dim import intrinsic_dimension, intrinsic_dimension_layers  # noqa: E402
from geoprobe.backends.knn_certified import (_Gram, _matmul_precision,  # noqa: E402
                                             _scaled_points, as_float64_points,
                                             distances_at_ranks)


def manifold(shape: tuple[int, ...], dim: int, device: torch.device, d: int = 10,
             seed: int = 0) -> torch.Tensor:
    """Points of shape (*shape, dim) on a d-dimensional manifold per leading index."""
    g = torch.Generator(device=device).manual_seed(seed)
    lead = shape[:-1]
    z = torch.randn(*shape, d, device=device, generator=g)
    a = torch.randn(*lead, d, dim, device=device, generator=g)
    noise = torch.randn(*shape, dim, device=device, generator=g)
    return torch.tanh(z @ a / d ** 0.5) + 0.01 * noise


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def bare(r: Any) -> Any:
    return None if r is None else dataclasses.replace(r, seconds=0.0)


def summary(r: Any) -> dict:
    return {"dimension": r.dimension, "error": r.error, "linear_fit_dimension": r.linear_fit_dimension,
            "n_points": r.n_points, "n_duplicates_removed": r.n_duplicates_removed}


def bench_selections(x: torch.Tensor, device: torch.device, repeats: int) -> dict:
    kinds = ["float32", "3xtf32"] if device.type == "cuda" else ["float32"]
    dtype = {"float32": torch.float32, "3xtf32": "3xtf32"}
    for kind in kinds:  # warm-up: cuBLAS handles and kernels of both paths, allocator
        intrinsic_dimension(x[: min(5000, x.shape[0])], selection_dtype=dtype[kind])
    times: dict[str, list[float]] = {k: [] for k in kinds}
    res: dict[str, Any] = {}
    for _ in range(repeats):
        for kind in kinds:
            res[kind], t = timed(lambda: intrinsic_dimension(x, selection_dtype=dtype[kind]), device)
            times[kind].append(t)
    out: dict[str, Any] = {"n": x.shape[0], "dim": x.shape[1], "repeats": repeats}
    for kind in kinds:
        med = statistics.median(times[kind])
        out[kind] = {"median_s": med, "times_s": times[kind], **summary(res[kind])}
        print(f"TwoNN {x.shape[0]} x {x.shape[1]} on {device.type}, {kind} selection: {med:.3f} s "
              f"(runs {[round(t, 3) for t in times[kind]]}); d = {res[kind].dimension:.6f}", flush=True)
    if "3xtf32" not in kinds:
        out["3xtf32"] = {"skipped": "3xTF32 needs CUDA tensor cores"}
        return out
    x64 = as_float64_points(x)
    (d32, _), t32 = timed(lambda: distances_at_ranks(x64, [1, 2], selection_dtype=torch.float32), device)
    (d3x, _), t3x = timed(lambda: distances_at_ranks(x64, [1, 2], selection_dtype="3xtf32"), device)
    same_dist = bool(torch.equal(d32, d3x))
    same_est = bare(res["float32"]) == bare(res["3xtf32"])
    out["identical_distances_r1_r2"] = same_dist
    out["identical_estimates"] = same_est
    out["distances_at_ranks_s"] = {"float32": t32, "3xtf32": t3x}
    out["speedup_3xtf32_vs_float32"] = out["float32"]["median_s"] / out["3xtf32"]["median_s"]
    print(f"3xTF32 vs float32: {out['speedup_3xtf32_vs_float32']:.2f}x faster; identical r1, r2: "
          f"{same_dist}; identical estimates: {same_est}", flush=True)
    if not (same_dist and same_est):
        raise SystemExit("the two selections disagree: the exactness guarantee is broken")
    return out


def gram_error(x: torch.Tensor, device: torch.device, rows: int) -> dict:
    """Observed error of the Gram products on ``rows`` scaled points against float64, as
    max |G̃ − G| / Σ|a_k||b_k| in units of 2⁻²³, beside the 3xTF32 bound's constant (knn docstring)."""
    if device.type != "cuda":
        return {"skipped": "the TF32 products need CUDA tensor cores"}
    xs64 = _scaled_points(as_float64_points(x[:rows]))[0]
    dim = xs64.shape[1]
    xs = xs64.float()
    exact = xs.double() @ xs.double().T  # float32 products are exact in float64
    scale = xs.double().abs() @ xs.double().abs().T
    out = torch.empty((xs.shape[0], xs.shape[0]), dtype=torch.float32, device=device)
    units = {}
    with _matmul_precision(device, tf32=True):
        _Gram(xs64, "3xtf32").product(slice(0, None), slice(0, None), out=out)
        units["3xtf32"] = out.double()
        units["tf32_plain"] = (xs @ xs.T).double()
    with _matmul_precision(device, tf32=False):
        units["float32"] = (xs @ xs.T).double()
    res = {k: float(((v - exact).abs() / scale).max()) / 2.0 ** -23 for k, v in units.items()}
    res["bound_3xtf32"] = 2 * dim + dim / 128 + 41.2
    res["rows"], res["dim"] = xs.shape[0], dim
    print(f"Gram error / (2^-23 sum|a||b|) on {xs.shape[0]} x {dim}: 3xTF32 {res['3xtf32']:.3g} "
          f"(bound {res['bound_3xtf32']:.4g}), float32 {res['float32']:.3g}, plain TF32 "
          f"{res['tf32_plain']:.3g}", flush=True)
    if res["3xtf32"] > res["bound_3xtf32"]:
        raise SystemExit("the 3xTF32 product broke its error bound: the certificates are unsafe")
    return res


def bench_layers(layers: torch.Tensor, device: torch.device, repeats: int) -> dict:
    out: dict[str, Any] = {"layers": layers.shape[0], "n": layers.shape[1], "dim": layers.shape[2]}
    items = [layers[i] for i in range(layers.shape[0])]
    for estimator in ("twonn", "gride"):
        intrinsic_dimension_layers(items[:2], estimator=estimator)  # warm-up
        loop_t, call_t = [], []
        loop = call = None
        for _ in range(repeats):
            loop, t = timed(lambda: [intrinsic_dimension(x, estimator=estimator) for x in items], device)
            loop_t.append(t)
            call, t = timed(lambda: intrinsic_dimension_layers(items, estimator=estimator), device)
            call_t.append(t)
        same = [bare(r) for r in loop] == [bare(r) for r in call]
        lm, cm = statistics.median(loop_t), statistics.median(call_t)
        out[estimator] = {"loop_median_s": lm, "loop_times_s": loop_t, "layers_call_median_s": cm,
                          "layers_call_times_s": call_t, "speedup": lm / cm, "identical": same,
                          "dimensions": [r.dimension for r in call]}
        print(f"{estimator} on {layers.shape[0]} layers x {layers.shape[1]} x {layers.shape[2]} "
              f"({device.type}): per-layer loop {lm:.3f} s, intrinsic_dimension_layers {cm:.3f} s "
              f"({lm / cm:.2f}x); identical: {same}", flush=True)
        if not same:
            raise SystemExit("intrinsic_dimension_layers disagrees with the per-layer loop")
    return out


def bench_check(x: torch.Tensor, device: torch.device, skdim_n: int) -> dict:
    intrinsic_dimension(x)  # warm-up at this size
    dev_res, dev_s = timed(lambda: intrinsic_dimension(x), device)
    cpu_res, cpu_s = timed(lambda: intrinsic_dimension(x.cpu()), torch.device("cpu"))
    rel = abs(dev_res.dimension - cpu_res.dimension) / abs(cpu_res.dimension)
    out: dict[str, Any] = {"n": x.shape[0], "dim": x.shape[1], "device_s": dev_s, "cpu_s": cpu_s,
                           "device_dimension": dev_res.dimension, "cpu_dimension": cpu_res.dimension,
                           "rel_diff": rel, "cpu_threads": torch.get_num_threads()}
    print(f"TwoNN {x.shape[0]} x {x.shape[1]}: {device.type} {dev_s:.3f} s, CPU {cpu_s:.3f} s, "
          f"d {dev_res.dimension:.6f} vs {cpu_res.dimension:.6f} (rel diff {rel:.2e})", flush=True)
    if importlib.util.find_spec("skdim") is None:
        out["skdim"] = {"skipped": "scikit-dimension is not installed"}
        return out
    import skdim

    xs = x[:skdim_n].cpu().numpy().astype(np.float64)
    ours = intrinsic_dimension(xs, discard_fraction=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer, peer_s = timed(lambda: skdim.id.TwoNN().fit(xs), torch.device("cpu"))
    out["skdim"] = {"n": xs.shape[0], "skdim_s": peer_s, "skdim_dimension": float(peer.dimension_),
                    "ours_linear_fit_dimension": ours.linear_fit_dimension,
                    "ours_dimension": ours.dimension}
    print(f"scikit-dimension TwoNN on {xs.shape[0]} points: {peer_s:.3f} s, d = {peer.dimension_:.4f}; "
          f"ours (line fit, as skdim) {ours.linear_fit_dimension:.4f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--layer-n", type=int, default=1200)
    ap.add_argument("--layer-dim", type=int, default=576)
    ap.add_argument("--layer-repeats", type=int, default=3)
    ap.add_argument("--check-n", type=int, default=10_000)
    ap.add_argument("--skdim-n", type=int, default=4000)
    ap.add_argument("--small", action="store_true",
                    help="tiny shapes; without CUDA, runs on the CPU with the 3xTF32 rows skipped")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.small:
        raise SystemExit("no CUDA device (use --small for a CPU check of the script)")
    device = torch.device("cuda" if cuda else "cpu")
    if args.small:
        args.n, args.dim, args.repeats = 3000, 256, 1
        args.layers, args.layer_n, args.layer_dim, args.layer_repeats = 4, 300, 64, 1
        args.check_n, args.skdim_n = 1500, 800
    if args.out is None:
        args.out = results_path("intrinsic_dim_gpu")

    x = manifold((args.n,), args.dim, device)
    large = bench_selections(x, device, args.repeats)
    large["gram_error"] = gram_error(x, device, rows=min(args.n, 4096))
    check = bench_check(x[: args.check_n], device, args.skdim_n)
    del x
    layers = manifold((args.layers, args.layer_n), args.layer_dim, device, d=8, seed=1)
    per_layers = bench_layers(layers, device, args.layer_repeats)

    append_run(args.out, {
        "benchmark": "intrinsic_dim_gpu",
        "command": "python benchmarks/bench_intrinsic_dim_gpu.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (no CUDA)",
        "small": args.small,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "cuda": torch.version.cuda, "numpy": np.__version__},
        "data": "tanh(z A / sqrt(d)) + 0.01 noise, z in R^d (d = 10; 8 for the layers), float32, "
                "seeds 0 and 1",
        "large": large,
        "layers": per_layers,
        "check": check,
        "ratios": {"selection_3xtf32_vs_float32": large.get("speedup_3xtf32_vs_float32"),
                   "layers_call_vs_loop_twonn": per_layers["twonn"]["speedup"],
                   "layers_call_vs_loop_gride": per_layers["gride"]["speedup"],
                   "cpu_vs_device_check": check["cpu_s"] / check["device_s"],
                   "gram_error_3xtf32_over_bound": (large["gram_error"]["3xtf32"]
                                                    / large["gram_error"]["bound_3xtf32"]
                                                    if "3xtf32" in large["gram_error"] else None)},
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
