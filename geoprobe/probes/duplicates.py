"""Duplicate points: the one rule that decides which rows of a point set are copies of earlier rows.

Point i is a duplicate when some earlier point j < i lies within ``tol × s``, where
s = sqrt(mean_i ‖x_i − x̄‖²) is the root-mean-square distance of the bitwise-distinct points from
their mean (translation invariant and, unlike nearest-neighbour distances, not shrunk by the
duplicates themselves). Exact copies are found first by hashing the rows' bit patterns; near copies
from the exact float64 nearest-neighbour distances of :mod:`geoprobe.backends.knn_certified`.

Why it matters (METHODS.md §3, §4b): LLM hidden states repeat (BOS and padding positions, repeated
tokens at layer 0), and repeated points give r1 = 0, or r1 ≈ 1e-8 after round-off, which drives
TwoNN towards 0 (27 % duplicated rows turn a dimension of 10 into 0.1).

* :func:`deduplicate` returns the kept rows and how many were removed;
* :func:`duplicate_keys` labels every row with the kept row it is a copy of;
* :func:`dedup_with_distances` is the same rule for the estimators of
  :mod:`geoprobe.probes.intrinsic_dim`, returning the kept rows' neighbour distances as well.
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..backends.knn_certified import (Selection, as_float64_points, distances_at_ranks,
                                      distances_at_ranks_spread, first_earlier_within)
from ..errors import InputDataError

logger = logging.getLogger(__name__)

__all__ = ["deduplicate", "duplicate_keys", "dedup_with_distances", "exact_first_occurrences",
           "row_hashes", "data_scale", "check_tol", "usable_ranks"]


def exact_first_occurrences(x64: torch.Tensor) -> torch.Tensor:
    """Sorted indices of the first occurrence of every bitwise-distinct row (on the rows' device).

    Rows are hashed by a random odd-weighted sum of their 64-bit patterns (wrapping integer
    arithmetic, so equal rows hash equally); only rows whose hash repeats are compared byte by byte.
    Rows equal in value but not in bits (−0.0 against +0.0) are left to the tolerance step, where
    their distance 0 makes them duplicates too."""
    n = x64.shape[0]
    h = row_hashes(x64)
    _, inverse, counts = torch.unique(h, return_inverse=True, return_counts=True)
    keep = torch.ones(n, dtype=torch.bool, device=x64.device)
    clash = torch.nonzero(counts[inverse] > 1).flatten()
    if clash.numel():
        rows = x64[clash].cpu().numpy()
        seen: dict[bytes, int] = {}
        same = [seen.setdefault(rows[j].tobytes(), j) != j for j in range(rows.shape[0])]
        keep[clash[torch.tensor(same, dtype=torch.bool, device=x64.device)]] = False
    return torch.nonzero(keep).flatten()


def row_hashes(x64: torch.Tensor) -> torch.Tensor:
    """A 64-bit hash of every row's bit pattern (int64 tensor on the rows' device): equal rows hash
    equally. No host synchronisation on CUDA."""
    n, dim = x64.shape
    weights = _hash_weights(dim)
    step = max(1, (1 << 20) // dim)
    if x64.device.type == "cpu":  # numpy's unsigned arithmetic wraps by definition
        bits = x64.contiguous().numpy().view(np.uint64)
        hn = np.empty(n, dtype=np.uint64)
        for s in range(0, n, step):
            hn[s:s + step] = (bits[s:s + step] * weights).sum(axis=1)
        return torch.from_numpy(hn.view(np.int64))
    bits = x64.contiguous().view(torch.int64)
    w = _device_hash_weights(dim, x64.device)
    h = torch.empty(n, dtype=torch.int64, device=x64.device)
    for s in range(0, n, 64 * step):
        h[s:s + 64 * step] = (bits[s:s + 64 * step] * w).sum(dim=1)
    return h


@functools.lru_cache(maxsize=16)
def _hash_weights(dim: int) -> np.ndarray:
    """Random odd 64-bit weights of the row hash (fixed seed)."""
    w = np.random.default_rng(0x5EED).integers(0, 2 ** 62, size=dim, dtype=np.uint64) * 2 + 1
    w.setflags(write=False)
    return w


@functools.lru_cache(maxsize=16)
def _device_hash_weights(dim: int, device: torch.device) -> torch.Tensor:
    """The weights as an int64 tensor on ``device``, kept: a host → device copy waits for the work
    queued before it."""
    return torch.from_numpy(_hash_weights(dim).view(np.int64).copy()).to(device)


def data_scale(x64: torch.Tensor) -> float:
    """Root-mean-square distance of the points from their mean, sqrt(mean_i ‖x_i − x̄‖²)."""
    return float(torch.sqrt(x64.var(dim=0, correction=0).sum()))


def check_tol(tol: Any) -> None:
    """Refuse a duplicate tolerance that is not a finite number ≥ 0."""
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise InputDataError(f"dedup_tol must be a finite number ≥ 0 or None, got {tol!r}")


def usable_ranks(ranks: list[int], n: int) -> list[int]:
    """The distinct neighbour ranks that ``n`` points have (r ≤ n − 1), sorted."""
    return sorted(r for r in set(ranks) if r <= n - 1)


def dedup_with_distances(x64: torch.Tensor, tol: float, ranks_for: Callable[[int], list[int]],
           min_points: int, selection: Selection = None, spread: Any = None
           ) -> tuple[torch.Tensor, list[int], Optional[torch.Tensor], torch.Tensor]:
    """Rows kept by the duplicate rule of :func:`deduplicate`, the usable ranks, the kept rows'
    exact distances at those ranks (None when fewer than two rows are kept) and the kept rows'
    indices in ``x64`` (increasing, an int64 tensor on the rows' device). ``spread``: the neighbour
    searches run on its parts (:func:`~geoprobe.backends.knn_certified.distances_at_ranks_spread`),
    with the same result."""
    n = x64.shape[0]
    at_ranks = distances_at_ranks if spread is None else functools.partial(distances_at_ranks_spread,
                                                                          spread=spread)
    first = exact_first_occurrences(x64)
    n_unique = first.numel()
    if n_unique < min_points:
        if n_unique == 1:
            raise InputDataError(f"all {n} points are identical; the intrinsic dimension is undefined")
        raise InputDataError(f"only {n_unique} distinct points among {n}; need at least {min_points}")
    xu = x64 if n_unique == n else x64[first]
    if n_unique == 1:
        return xu, [], None, first
    tau = tol * data_scale(xu)
    ranks = usable_ranks(ranks_for(n_unique), n_unique)
    dist, near = at_ranks(xu, ranks, tau=tau, selection_dtype=selection)
    assert near is not None
    if bool(near.any()):
        xu = xu[~near]
        first = first[~near.to(first.device)]
        if xu.shape[0] < min_points:
            raise InputDataError(f"only {xu.shape[0]} points among {n} are more than "
                                 f"dedup_tol × scale = {tau:.3g} apart; need at least {min_points}")
        dist = None
        if xu.shape[0] >= 2:
            ranks = usable_ranks(ranks_for(xu.shape[0]), xu.shape[0])
            dist, _ = at_ranks(xu, ranks, selection_dtype=selection)
    if n > xu.shape[0]:
        logger.info("removed %d duplicate points of %d (%d exact, %d within %.3g)", n - xu.shape[0],
                    n, n - n_unique, n_unique - xu.shape[0], tau)
    return xu, ranks, dist, first


def deduplicate(x: Any, tol: float = 1e-6, *,
                device: Optional[str | torch.device] = None) -> tuple[Any, int]:
    """Remove duplicate and near-duplicate points.

    Point i is a duplicate when some earlier point j < i lies within ``tol × s``, where
    s = sqrt(mean_i ‖x_i − x̄‖²) is the root-mean-square distance of the distinct points from their
    mean (translation invariant and, unlike nearest-neighbour distances, not shrunk by the duplicates
    themselves). The default 1e-6 merges float32 copies of float64 points (they differ by about
    6e-8 of each coordinate) and leaves genuinely distinct points alone. Exact copies are found by
    hashing the rows; near copies from the exact float64 nearest-neighbour distances.

    Returns ``(points, n_removed)``: the kept rows in their original order (a float64 numpy array for
    numpy input, a float64 tensor for tensor input) and how many rows were removed.
    """
    x64 = as_float64_points(x, device)
    if x64.shape[0] == 0:
        raise InputDataError("no points given")
    check_tol(tol)
    kept, _, _, _ = dedup_with_distances(x64, tol, lambda n: [1], min_points=1)
    n_removed = x64.shape[0] - kept.shape[0]
    return (kept if isinstance(x, torch.Tensor) else kept.cpu().numpy()), n_removed


def duplicate_keys(x: Any, tol: float = 1e-6, *,
                   device: Optional[str | torch.device] = None) -> np.ndarray:
    """Group labels of the rows under the duplicate rule of :func:`deduplicate`.

    A row that :func:`deduplicate` keeps gets a new label (0, 1, 2, … in order of appearance); a row it
    removes gets the label of the first earlier row within ``tol × s`` of it (of its first exact copy
    when it has one). So rows with one label are duplicates of one kept row, and the number of
    distinct labels is the number of rows :func:`deduplicate` keeps (repeated tokens at layer 0).

    Returns an int64 array with one label per row.
    """
    x64 = as_float64_points(x, device)
    n = x64.shape[0]
    if n == 0:
        raise InputDataError("no points given")
    check_tol(tol)
    rows = np.ascontiguousarray(x64.cpu().numpy())
    _, first_at, inverse = np.unique(rows.view(np.dtype((np.void, rows.itemsize * rows.shape[1]))),
                                     return_index=True, return_inverse=True)
    first = np.sort(first_at)                       # bitwise-distinct rows, in order
    slot = np.searchsorted(first, first_at[inverse.reshape(-1)])  # each row's distinct row
    xu = x64[torch.from_numpy(first).to(x64.device)]
    near = np.zeros(first.size, dtype=bool)
    tau = 0.0
    if first.size > 1:
        tau = tol * data_scale(xu)
        _, near_t = distances_at_ranks(xu, [1], tau=tau)
        near = near_t.cpu().numpy()
    labels = np.empty(first.size, dtype=np.int64)
    fresh = 0
    for u in range(first.size):
        if near[u]:
            j = first_earlier_within(xu, u, tau)
            assert j is not None
            labels[u] = labels[j]
        else:
            labels[u], fresh = fresh, fresh + 1
    return labels[slot]
