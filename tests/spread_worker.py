"""One process of the process-group probe test (tests/test_spread.py), started by torchrun:
``python -m torch.distributed.run --standalone --nproc-per-node 2 -m spread_worker POINTS.npy OUT.json``.

Every process joins the gloo group, loads the same points and computes with ``process_group=True``:
the exact δ of the first 120 points and of their distance matrix, TwoNN and GRIDE with a block
bootstrap, and the neighbour distances at ranks 1, 2, 5 with the duplicate mask. Each process writes
its results to OUT.json.<rank> (every process must return the same numbers)."""
from __future__ import annotations

import json
import sys

import numpy as np
import torch
import torch.distributed as dist

import geoprobe as gp
from geoprobe.backends.knn_certified import as_float64_points, distances_at_ranks_spread
from geoprobe.backends.spread import spread_for
from geoprobe.probes.hyperbolicity import euclidean_distances


def main(points: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    x = np.load(points)
    small = x[:120]
    ex = gp.delta(small, mode="exact", process_group=True, base_point=3)
    ex_d = gp.delta(euclidean_distances(small), distances=True, mode="exact", process_group=True)
    ids = {est: gp.intrinsic_dimension(x, estimator=est, n_boot=40, seed=5, process_group=True).to_dict()
           for est in ("twonn", "gride")}
    spread = spread_for(None, True, torch.device("cpu"))
    d, near = distances_at_ranks_spread(as_float64_points(x), [1, 2, 5], spread, tau=1e-9, chunk=128)
    result = {"rank": dist.get_rank(), "delta": ex.to_dict(), "delta_matrix": ex_d.to_dict(), "id": ids,
              "ranks": d.tolist(), "near": near.tolist()}
    with open(f"{out}.{dist.get_rank()}", "w") as fh:
        json.dump(result, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
