"""Exact k-nearest-neighbour distances from blocked matrix products (torch, CPU and CUDA).

Squared Euclidean distances are expanded as ‖a − b‖² = ‖a‖² + ‖b‖² − 2 a·b, so a block of rows against
all points is one matrix product. The expansion is computed in ``selection_dtype`` (float32 by
default) only to *select* candidates; the distances that are returned are recomputed directly as
sqrt(Σ (a_k − b_k)²) in float64 from the input, and the selection is then *verified*:

* The data are centred and divided by the largest norm R, so every row has norm n_i ≤ 1 and float32
  can neither overflow nor lose the distances to a common offset.
* For each row i the m = k + margin candidates with the smallest expanded values are kept and sorted;
  exact distances are computed for the first p = k + 2 of them, and every other point j has an
  expanded value ≥ a_i, the (p+1)-th smallest value (if the test below fails, all m candidates are
  recomputed and a_i is the m-th value).
* The rounding error of the expanded value obeys |d̃²_ij − d²_ij| ≤ c (n_i + n_j)² with
  c = 1.01 (D + 8) u (the worst-case bound γ_D ‖a‖‖b‖ on a D-term dot product, Higham 2002 §3.1,
  plus the rounding of the inputs, the norms and the sums; u = 2⁻²⁴ for float32, 2⁻⁵³ for float64).
  A point j with n_j ≥ n_i + d_k lies at distance ≥ d_k by the triangle inequality, so only points with
  n_j < n_i + d_k can displace the k-th neighbour, and the selection is exact when
  d_k² ≤ a_i − c (2 n_i + d_k)².
* Rows that fail the test are redone with a float64 expansion; rows that fail again (in practice,
  rows with many exactly tied distances) by direct float64 differences against every point.

The neighbour lists are therefore the exact float64 k nearest neighbours (ties at equal distance
broken by the smaller index), with the distances of the direct formula. The products exploit the
symmetry of the distance matrix: the strip of rows [s, e) is multiplied only with columns ≥ s, and the
part of the strip beyond its diagonal block also feeds the candidate lists of the later rows.

On CUDA the products run with float32 matmul precision set to "highest" (no TF32), which the error
bound assumes.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Optional

import numpy as np
import torch

from ..errors import InputDataError

logger = logging.getLogger(__name__)

_UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}


def as_float64_points(x: Any, device: Optional[str | torch.device] = None) -> torch.Tensor:
    """``x`` (numpy array, torch tensor or nested sequence, shape (N, D)) as a float64 tensor on
    ``device`` (default: the tensor's own device, else the CPU); raises :class:`InputDataError` for
    anything that is not a finite 2-D array of real numbers."""
    if device is None:
        device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputDataError(f"device {str(device)!r} was requested but CUDA is not available; "
                             "pass device='cpu'")
    if isinstance(x, torch.Tensor):
        t = x.detach()
        if t.is_complex():
            raise InputDataError("points must be real numbers, got a complex tensor")
        t = t.to(device=device, dtype=torch.float64)
    else:
        try:
            arr = np.asarray(x)
        except (TypeError, ValueError) as exc:
            raise InputDataError(f"points must be an (N, D) array of numbers: {exc}") from None
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise InputDataError(f"points must be an (N, D) array of numbers, got dtype {arr.dtype}")
        if np.iscomplexobj(arr):
            raise InputDataError("points must be real numbers, got a complex array")
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64)).to(device)
    if t.ndim != 2:
        raise InputDataError(f"points must be a 2-D array (N points × D coordinates), "
                             f"got shape {tuple(t.shape)}")
    if t.shape[1] == 0:
        raise InputDataError("points have no coordinates (shape (N, 0))")
    bad = ~torch.isfinite(t).all(dim=1)
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten()[:5].tolist()
        raise InputDataError(f"{int(bad.sum())} of {t.shape[0]} points contain NaN or inf "
                             f"(first rows: {rows}); remove or repair them first")
    return t.contiguous()


def knn_distances(x: Any, k: int, *, chunk: Optional[int] = None,
                  selection_dtype: Optional[torch.dtype] = None,
                  device: Optional[str | torch.device] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact distances to and indices of the ``k`` nearest neighbours of every point (self excluded).

    Args:
        x: points, shape (N, D); numpy or torch, any real dtype (used as float64).
        k: neighbours per point, 1 ≤ k ≤ N − 1.
        chunk: rows per block of the distance products (default: about 8M entries per block on the
            CPU, 128M on CUDA, at least 256 rows).
        selection_dtype: dtype of the candidate-selection products, torch.float32 (default) or
            torch.float64. The returned distances are float64 either way.
        device: where to compute (default: the tensor's device, else the CPU).

    Returns:
        ``(dist, idx)``: float64 and int64 tensors of shape (N, k) on ``device``, each row sorted by
        increasing distance, ties broken by the smaller index. Exact duplicates appear as neighbours at
        distance 0. See the module docstring for the selection, its error bound and the fallbacks.
    """
    x64 = as_float64_points(x, device)
    n = x64.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n - 1:
        raise InputDataError(f"k must be an integer between 1 and N − 1 = {n - 1}, got {k!r}")
    sel = torch.float32 if selection_dtype is None else selection_dtype
    if sel not in _UNIT_ROUNDOFF:
        raise InputDataError(f"selection_dtype must be torch.float32 or torch.float64, got {sel}")
    return knn_float64(x64, int(k), chunk=_chunk_rows(n, chunk, x64.device), selection_dtype=sel)


def knn_float64(x64: torch.Tensor, k: int, *, chunk: Optional[int] = None,
                selection_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`knn_distances` for points already checked by :func:`as_float64_points` (a finite,
    contiguous float64 (N, D) tensor) and 1 ≤ k ≤ N − 1; no further validation."""
    n, dim = x64.shape
    sel = selection_dtype
    if sel == torch.float32 and dim * _UNIT_ROUNDOFF[torch.float32] > 1e-2:
        sel = torch.float64  # the float32 bound would reject every row
    m = min(n - 1, k + max(8, k // 4))

    if m == n - 1:  # every other point is a candidate: nothing to select or verify
        ar = torch.arange(n - 1, device=x64.device)
        cand = ar[None, :] + (ar[None, :] >= torch.arange(n, device=x64.device)[:, None]).long()
        return _exact_topk(x64, torch.arange(n, device=x64.device), cand, k)

    centred = x64 - x64.mean(dim=0, keepdim=True)
    norms = torch.linalg.vector_norm(centred, dim=1)
    radius = float(norms.max())
    if radius == 0.0:  # all points identical: distance 0 to the k lowest other indices
        ar = torch.arange(k, device=x64.device)
        idx = ar[None, :] + (ar[None, :] >= torch.arange(n, device=x64.device)[:, None]).long()
        return torch.zeros((n, k), dtype=torch.float64, device=x64.device), idx
    scaled = centred / radius
    snorm = norms / radius
    chunk = chunk or _chunk_rows(n, None, x64.device)

    rows = torch.arange(n, device=x64.device)
    with _highest_matmul_precision(x64.device):
        cand, vals = _symmetric_candidates(scaled.to(sel), m, chunk)
    # Stage 1: exact distances to the p most promising candidates; every other point has an
    # expanded value ≥ vals[:, p].
    p = min(m, k + 2)
    dist, idx = _exact_topk(x64, rows, cand[:, :p], k)
    bad = _unverified(dist[:, -1] / radius, vals[:, min(p, m - 1)], snorm, dim, sel)
    if p < m and bool(bad.any()):  # stage 2: all m candidates
        redo = rows[bad]
        d2, i2 = _exact_topk(x64, redo, cand[redo], k)
        dist[redo], idx[redo] = d2, i2
        bad[redo] = _unverified(d2[:, -1] / radius, vals[redo, m - 1], snorm[redo], dim, sel)
    if sel == torch.float32 and bool(bad.any()):  # stage 3: float64 selection
        redo = rows[bad]
        logger.debug("kNN: %d of %d rows redone with a float64 selection", redo.numel(), n)
        with _highest_matmul_precision(x64.device):
            cand64, last64 = _row_candidates(scaled, redo, m, chunk)
        d2, i2 = _exact_topk(x64, redo, cand64, k)
        dist[redo], idx[redo] = d2, i2
        bad[redo] = _unverified(d2[:, -1] / radius, last64, snorm[redo], dim, torch.float64)
    if bool(bad.any()):  # stage 4: direct differences against every point
        redo = rows[bad]
        logger.debug("kNN: %d of %d rows recomputed by direct differences", redo.numel(), n)
        d3, i3 = _brute_topk(x64, redo, k)
        dist[redo], idx[redo] = d3, i3
    return dist, idx


# --------------------------------------------------------------------------- selection
def _chunk_rows(n: int, chunk: Optional[int], device: torch.device) -> int:
    if chunk is None:  # a block of about 8M (CPU) or 128M (CUDA) distances
        budget, most = ((1 << 27), 16384) if device.type == "cuda" else ((1 << 23), 4096)
        return max(1, min(n, most, max(256, budget // max(n, 1))))
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise InputDataError(f"chunk must be a positive integer, got {chunk!r}")
    return int(chunk)


class _highest_matmul_precision:
    """Run float32 CUDA products in full float32 (the error bound assumes no TF32)."""

    def __init__(self, device: torch.device):
        self.active = device.type == "cuda"

    def __enter__(self) -> None:
        if self.active:
            self.saved = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("highest")

    def __exit__(self, *exc: Any) -> None:
        if self.active:
            torch.set_float32_matmul_precision(self.saved)


def _merge(best_v: torch.Tensor, best_i: torch.Tensor, new_v: torch.Tensor, new_i: torch.Tensor,
           m: int) -> tuple[torch.Tensor, torch.Tensor]:
    v = torch.cat([best_v, new_v], dim=1)
    i = torch.cat([best_i, new_i], dim=1)
    v, pos = torch.topk(v, m, dim=1, largest=False, sorted=False)
    return v, torch.gather(i, 1, pos)


def _symmetric_candidates(xs: torch.Tensor, m: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the m smallest expanded squared distances per row and those values (float64), both
    sorted by value, using each product block for both its rows and its columns."""
    n = xs.shape[0]
    dev = xs.device
    sq = (xs * xs).sum(dim=1)
    inf = torch.tensor(math.inf, dtype=xs.dtype, device=dev)
    best_v = torch.full((n, m), math.inf, dtype=xs.dtype, device=dev)  # from earlier strips
    best_i = torch.zeros((n, m), dtype=torch.long, device=dev)
    out_i = torch.empty((n, m), dtype=torch.long, device=dev)
    out_v = torch.empty((n, m), dtype=torch.float64, device=dev)
    buf = torch.empty(min(chunk, n) * n, dtype=xs.dtype, device=dev)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        b = e - s
        d2 = buf[:b * (n - s)].view(b, n - s)
        torch.mm(xs[s:e], xs[s:].T, out=d2)
        d2.mul_(-2.0).add_(sq[s:e, None]).add_(sq[None, s:])
        diag = torch.arange(b, device=dev)
        d2[diag, diag] = inf
        t = min(m, n - s)
        rv, ri = torch.topk(d2, t, dim=1, largest=False, sorted=False)
        v, i = _merge(best_v[s:e], best_i[s:e], rv, ri + s, m)
        v, order = torch.sort(v, dim=1)
        out_i[s:e] = torch.gather(i, 1, order)
        out_v[s:e] = v
        if e < n:  # columns beyond the diagonal block: candidates of the later rows
            tail = d2[:, b:]
            t = min(m, b)
            cv, ci = torch.topk(tail, t, dim=0, largest=False, sorted=False)  # (t, n − e)
            best_v[e:], best_i[e:] = _merge(best_v[e:], best_i[e:], cv.T, ci.T + s, m)
    return out_i, out_v


def _row_candidates(xs: torch.Tensor, rows: torch.Tensor, m: int,
                    chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`_symmetric_candidates` for the given rows only, against every point."""
    sq = (xs * xs).sum(dim=1)
    out_i = torch.empty((rows.numel(), m), dtype=torch.long, device=xs.device)
    out_last = torch.empty(rows.numel(), dtype=torch.float64, device=xs.device)
    for s in range(0, rows.numel(), chunk):
        r = rows[s:s + chunk]
        d2 = torch.mm(xs[r], xs.T)
        d2.mul_(-2.0).add_(sq[r, None]).add_(sq[None, :])
        d2[torch.arange(r.numel(), device=xs.device), r] = math.inf
        v, i = torch.topk(d2, m, dim=1, largest=False, sorted=False)
        out_i[s:s + r.numel()] = i
        out_last[s:s + r.numel()] = v.max(dim=1).values.double()
    return out_i, out_last


def _unverified(dk: torch.Tensor, last: torch.Tensor, snorm: torch.Tensor, dim: int,
                dtype: torch.dtype) -> torch.Tensor:
    """Rows whose k-th exact distance ``dk`` (scaled units) is not provably below every
    non-candidate (see the module docstring)."""
    c = 1.01 * (dim + 8) * _UNIT_ROUNDOFF[dtype]
    tiny = (dim + 8) * float(torch.finfo(dtype).tiny)
    bound = c * (2.0 * snorm + dk) ** 2 + tiny
    return ~(dk * dk <= last - bound)


# --------------------------------------------------------------------------- exact distances
def _exact_topk(x64: torch.Tensor, rows: torch.Tensor, cand: torch.Tensor,
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct float64 distances from ``rows`` to their candidates; the k nearest, sorted by
    (distance, index)."""
    n_rows, m = cand.shape
    dim = x64.shape[1]
    dist = torch.empty((n_rows, m), dtype=torch.float64, device=x64.device)
    step = max(1, (1 << 18) // max(1, m * dim))  # cache-sized blocks
    for s in range(0, n_rows, step):
        diff = x64[cand[s:s + step]]
        diff.sub_(x64[rows[s:s + step], None, :])
        dist[s:s + step] = torch.linalg.vector_norm(diff, dim=2)
    return _sort_pairs(dist, cand, k)


def _sort_pairs(dist: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.argsort(idx, dim=1)
    dist, idx = torch.gather(dist, 1, order), torch.gather(idx, 1, order)
    order = torch.argsort(dist, dim=1, stable=True)[:, :k]
    return torch.gather(dist, 1, order), torch.gather(idx, 1, order)


def _brute_topk(x64: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct float64 distances from each of ``rows`` to every point; the k nearest others."""
    n, dim = x64.shape
    dev = x64.device
    out_d = torch.empty((rows.numel(), k), dtype=torch.float64, device=dev)
    out_i = torch.empty((rows.numel(), k), dtype=torch.long, device=dev)
    cols = max(1, (1 << 24) // max(1, dim))
    all_idx = torch.arange(n, device=dev)
    for s in range(rows.numel()):
        r = int(rows[s])
        d = torch.empty(n, dtype=torch.float64, device=dev)
        for c in range(0, n, cols):
            d[c:c + cols] = torch.linalg.vector_norm(x64[c:c + cols] - x64[r], dim=1)
        d[r] = math.inf
        od, oi = _sort_pairs(d[None, :], all_idx[None, :], k)
        out_d[s], out_i[s] = od[0], oi[0]
    return out_d, out_i
