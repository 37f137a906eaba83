"""Exact k-nearest-neighbour distances from blocked matrix products (torch, CPU and CUDA).

Squared Euclidean distances are expanded as ‖a − b‖² = ‖a‖² + ‖b‖² − 2 a·b, so a block of rows against
all points is one matrix product. The expansion is computed in ``selection_dtype`` (float32 by
default) only to *select* candidates; the distances that are returned are recomputed directly as
sqrt(Σ (a_k − b_k)²) in float64 from the input, and the selection is then *verified*:

* The data are centred and divided by the largest norm R, so every row has norm n_i ≤ 1 and float32
  can neither overflow nor lose the distances to a common offset.
* For each row i the m = k + max(4, k//4) candidates with the smallest expanded values are kept and sorted;
  exact distances are computed for the first p = k + 2 of them, and every other point j has an
  expanded value ≥ a_i, the (p+1)-th smallest value (if the test below fails, all m candidates are
  recomputed and a_i is the m-th value).
* The rounding error of the expanded value obeys |d̃²_ij − d²_ij| ≤ c (n_i + n_j)² with
  c = 1.01 (D + 8) u (the worst-case bound γ_D ‖a‖‖b‖ on a D-term dot product, Higham 2002 §3.1,
  plus the rounding of the inputs, the norms and the sums; u = 2⁻²⁴ for float32, 2⁻⁵³ for float64).
  A point j with n_j ≥ n_i + d_k lies at distance ≥ d_k by the triangle inequality, so only points with
  n_j < n_i + d_k can displace the k-th neighbour, and the selection is exact when
  d_k² ≤ a_i − c (2 n_i + d_k)².
* Rows that fail the test are redone with a float64 expansion against every point; rows that fail
  again (in practice, rows with many exactly tied distances) by direct float64 differences.

The neighbour lists are therefore the exact float64 k nearest neighbours (ties at equal distance
broken by the smaller index), with the distances of the direct formula. The products exploit the
symmetry of the distance matrix: the strip of rows [s, e) is multiplied only with columns ≥ s, and the
part of the strip beyond its diagonal block also feeds the candidate lists of the later rows.

:func:`distances_at_ranks` serves the estimators, which need the exact distances at a few ranks only
(r1, r2 for TwoNN; r_n1, r_2n1 for GRIDE): from the same candidates and bound it recomputes only the
candidates that could sit at a requested rank, which keeps the direct float64 work near one distance
per rank and point instead of k + 2 per point.

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
    bad = ~torch.isfinite(t.sum(dim=1))  # a NaN or inf entry makes its row's sum NaN or inf
    if bool(bad.any()):
        bad[bad.clone()] = ~torch.isfinite(t[bad]).all(dim=1)  # sums that merely overflowed
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
        chunk: rows per block of the distance products (default: 2048 rows on the CPU, 16384 on
            CUDA, fewer for large N so that a block holds at most 64M (CPU) or 256M (CUDA) entries).
        selection_dtype: dtype of the candidate-selection products, torch.float32 (default) or
            torch.float64. The returned distances are exact float64 either way.
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
    if selection_dtype is not None and selection_dtype not in _UNIT_ROUNDOFF:
        raise InputDataError("selection_dtype must be torch.float32 (default) or torch.float64, "
                             f"got {selection_dtype}")
    return knn_float64(x64, int(k), chunk=_chunk_rows(n, chunk, x64.device),
                       selection_dtype=selection_dtype)


def knn_float64(x64: torch.Tensor, k: int, *, chunk: Optional[int] = None,
                selection_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`knn_distances` for points already checked by :func:`as_float64_points` (a finite,
    contiguous float64 (N, D) tensor) and 1 ≤ k ≤ N − 1; no further validation."""
    n = x64.shape[0]
    dtype = _selection_dtype(selection_dtype)
    m = _n_candidates(n, k)
    if m == n - 1:  # every other point is a candidate: nothing to select or verify
        return _all_pairs_topk(x64, k)
    sel = _select(x64, m, chunk, dtype)
    if sel is None:
        return _identical_topk(x64, k)
    dist, idx, bad = _lists_from_selection(x64, sel, k)
    if bool(bad.any()):
        redo = torch.nonzero(bad).flatten()
        dist[redo], idx[redo] = _rows_exact(x64, sel, redo, k)
    return dist, idx


def _lists_from_selection(x64: torch.Tensor, sel: "_Selection",
                          k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact k-nearest lists from the candidates, and the rows the error bound cannot certify."""
    n, m = sel.cand.shape
    rows = torch.arange(n, device=x64.device)
    # Stage 1: exact distances to the p most promising candidates; every other point has an
    # expanded value ≥ approx[:, p].
    p = min(m, k + 2)
    dist, idx = _exact_topk(x64, rows, sel.cand[:, :p], k)
    bad = sel.unverified(dist[:, -1], sel.approx[:, min(p, m - 1)])
    if p < m and bool(bad.any()):  # stage 2: all m candidates
        redo = rows[bad]
        d2, i2 = _exact_topk(x64, redo, sel.cand[redo], k)
        dist[redo], idx[redo] = d2, i2
        bad[redo] = sel.unverified(d2[:, -1], sel.approx[redo, m - 1], redo)
    return dist, idx, bad


def distances_at_ranks(x64: torch.Tensor, ranks: list[int], *, tau: Optional[float] = None,
                       chunk: Optional[int] = None, selection_dtype: Optional[torch.dtype] = None
                       ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Exact float64 distances from every point to its r-th nearest neighbour for each r in
    ``ranks`` (1-based, max(ranks) ≤ N − 1), shape (N, len(ranks)); and, when ``tau`` is given, a
    boolean mask of the points having an earlier point (smaller index) within distance ``tau``.

    Only the candidates that the error bound cannot place on one side of a requested rank are
    recomputed exactly: with the interval [d̃² − E, d̃² + E] around each candidate's expanded value,
    L_r and U_r the r-th smallest lower and upper ends, candidates entirely below L_r are certainly
    nearer and those entirely above U_r certainly farther than the r-th neighbour, whose distance is
    then the (r − #nearer)-th smallest exact distance among the overlapping candidates. Points outside
    the candidate list are certified to lie beyond U_max as in :func:`knn_distances`; rows where that
    fails use :func:`knn_distances`' fallbacks.
    """
    n = x64.shape[0]
    ranks_t = torch.as_tensor(ranks, dtype=torch.long, device=x64.device)
    k = int(max(ranks))
    dtype = _selection_dtype(selection_dtype)
    m = _n_candidates(n, k)
    sel = None if m == n - 1 else _select(x64, m, chunk, dtype)
    if sel is None:  # small input or identical points: exact lists for every row
        dist, idx = knn_float64(x64, k, chunk=chunk, selection_dtype=dtype)
        return dist[:, ranks_t - 1], (None if tau is None else _near_from_lists(x64, dist, idx, tau))
    out, near, ok = _ranks_from_selection(x64, sel, ranks, tau)
    redo = torch.nonzero(~ok).flatten()
    if redo.numel():
        logger.debug("kNN ranks: %d of %d rows need the exact lists", redo.numel(), n)
        dist, idx = _rows_exact(x64, sel, redo, k)
        out[redo] = dist[:, ranks_t - 1]
        if near is not None:
            near[redo] = _near_from_lists(x64, dist, idx, tau, redo)
    return out, near


def _ranks_from_selection(x64: torch.Tensor, sel: "_Selection", ranks: list[int],
                          tau: Optional[float]
                          ) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    n, m = sel.cand.shape
    dev = x64.device
    rows = torch.arange(n, device=dev)
    ranks_t = torch.as_tensor(ranks, dtype=torch.long, device=dev)
    approx, cand = sel.approx, sel.cand
    err = sel.c * (sel.snorm[:, None] + sel.snorm[cand]) ** 2 + sel.tiny
    lo, hi = approx - err, approx + err
    lower = torch.sort(lo, dim=1).values[:, ranks_t - 1]  # (N, R): L_r
    upper = torch.sort(hi, dim=1).values[:, ranks_t - 1]  # (N, R): U_r
    overlaps = [(hi >= lower[:, j, None]) & (lo <= upper[:, j, None]) for j in range(len(ranks))]
    need = torch.stack(overlaps).any(dim=0)
    u_max = upper.max(dim=1).values.clamp_min(0.0)
    ok = sel.certified(u_max)
    if tau is not None:
        t2 = (tau / sel.radius) ** 2
        need |= lo <= t2
        unsure = ok & ((lo[:, m - 1] <= t2) | ~sel.certified(torch.full_like(u_max, t2)))
    need &= ok[:, None]

    exact = torch.full((n, m), math.inf, dtype=torch.float64, device=dev)
    pr, pc = torch.nonzero(need, as_tuple=True)
    exact[pr, pc] = _pair_distances(x64, pr, cand[pr, pc])
    out = torch.empty((n, len(ranks)), dtype=torch.float64, device=dev)
    for j, r in enumerate(ranks):
        below = (hi < lower[:, j, None]).sum(dim=1)
        vals = torch.sort(torch.where(overlaps[j], exact, math.inf), dim=1).values
        pos = (r - 1 - below).clamp(0, m - 1)
        out[:, j] = torch.gather(vals, 1, pos[:, None])[:, 0]
    near = None
    if tau is not None:
        near = ((exact <= tau) & (cand < rows[:, None])).any(dim=1)
        for i in torch.nonzero(unsure & ~near).flatten().tolist():
            near[i] = _earlier_within(x64, i, tau)
    return out, near, ok


# --------------------------------------------------------------------------- selection
def _selection_dtype(requested: Optional[torch.dtype]) -> torch.dtype:
    return torch.float32 if requested is None else requested


def _n_candidates(n: int, k: int) -> int:
    return min(n - 1, k + max(4, k // 4))


def _chunk_rows(n: int, chunk: Optional[int], device: torch.device) -> int:
    if chunk is None:  # up to 2048 (CPU) or 16384 (CUDA) rows, 64M (CPU) or 256M (CUDA) distances
        budget, most = ((1 << 28), 16384) if device.type == "cuda" else ((1 << 26), 2048)
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


def _bound_constants(dim: int, dtype: torch.dtype) -> tuple[float, float]:
    """(c, tiny) of the error bound |d̃² − d²| ≤ c (n_i + n_j)² + tiny (scaled units)."""
    return 1.01 * (dim + 8) * _UNIT_ROUNDOFF[dtype], (dim + 8) * float(torch.finfo(dtype).tiny)


class _Selection:
    """Candidates of every row from the expanded products, sorted by expanded value, with what the
    error bound needs. ``approx`` is in scaled units (data centred and divided by ``radius``)."""

    def __init__(self, cand: torch.Tensor, approx: torch.Tensor, scaled: torch.Tensor,
                 snorm: torch.Tensor, radius: float, dtype: torch.dtype, chunk: int):
        self.cand, self.approx, self.scaled, self.snorm = cand, approx, scaled, snorm
        self.radius, self.dtype, self.chunk = radius, dtype, chunk
        self.c, self.tiny = _bound_constants(scaled.shape[1], dtype)

    @property
    def m(self) -> int:
        return self.cand.shape[1]

    def unverified(self, dk: torch.Tensor, threshold: torch.Tensor,
                   rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rows whose k-th exact distance ``dk`` (input units) is not provably below every point with
        an expanded value ≥ ``threshold`` (module docstring)."""
        sn = self.snorm if rows is None else self.snorm[rows]
        d = dk / self.radius
        return ~(d * d <= threshold - self.c * (2.0 * sn + d) ** 2 - self.tiny)

    def certified(self, v: torch.Tensor) -> torch.Tensor:
        """Rows whose non-candidates provably lie at squared scaled distance ≥ ``v``."""
        a = self.approx[:, -1]
        return a - self.c * (2.0 * self.snorm + torch.sqrt(v)) ** 2 - self.tiny >= v


def _select(x64: torch.Tensor, m: int, chunk: Optional[int],
            dtype: torch.dtype) -> Optional[_Selection]:
    """Candidate lists from the symmetric blocked products; None when all points are identical."""
    n, dim = x64.shape
    if dtype == torch.float32 and dim * _UNIT_ROUNDOFF[torch.float32] > 1e-2:
        dtype = torch.float64  # the float32 bound would reject every row
    scaled = x64 - x64.mean(dim=0, keepdim=True)
    norms = torch.linalg.vector_norm(scaled, dim=1)
    radius = float(norms.max())
    if radius == 0.0:
        return None
    scaled.div_(radius)
    chunk = chunk or _chunk_rows(n, None, x64.device)
    with _highest_matmul_precision(x64.device):
        cand, approx = _symmetric_candidates(scaled.to(dtype), m, chunk)
    return _Selection(cand, approx, scaled, norms / radius, radius, dtype, chunk)


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
        rv, ri = torch.topk(d2, min(m, n - s), dim=1, largest=False, sorted=False)
        v, i = _merge(best_v[s:e], best_i[s:e], rv, ri + s, m)
        v, order = torch.sort(v, dim=1)
        out_i[s:e] = torch.gather(i, 1, order)
        out_v[s:e] = v
        if e < n:  # columns beyond the diagonal block: candidates of the later rows
            cv, ci = torch.topk(d2[:, b:], min(m, b), dim=0, largest=False, sorted=False)
            best_v[e:], best_i[e:] = _merge(best_v[e:], best_i[e:], cv.T, ci.T + s, m)
    return out_i, out_v


def _merge(best_v: torch.Tensor, best_i: torch.Tensor, new_v: torch.Tensor, new_i: torch.Tensor,
           m: int) -> tuple[torch.Tensor, torch.Tensor]:
    v = torch.cat([best_v, new_v], dim=1)
    i = torch.cat([best_i, new_i], dim=1)
    v, pos = torch.topk(v, m, dim=1, largest=False, sorted=False)
    return v, torch.gather(i, 1, pos)


def _row_candidates(xs: torch.Tensor, rows: torch.Tensor, m: int,
                    chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The given rows' m candidates against every point and the largest of their expanded values."""
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


# --------------------------------------------------------------------------- exact distances
def _pair_distances(x64: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Direct float64 distances ‖x_a − x_b‖ for index vectors ``a`` and ``b`` of equal length.

    On the CPU this runs through numpy in cache-sized blocks: many small gathers are cheaper there
    than through the thread pool of torch's element-wise kernels."""
    dim = x64.shape[1]
    step = max(1, (1 << 18) // dim)
    if x64.device.type == "cpu":
        xn, an, bn = x64.numpy(), a.numpy(), b.numpy()
        out = np.empty(an.shape[0], dtype=np.float64)
        for s in range(0, an.shape[0], step):
            g = np.take(xn, an[s:s + step], axis=0)
            g -= np.take(xn, bn[s:s + step], axis=0)
            out[s:s + step] = np.sqrt(np.einsum("ij,ij->i", g, g))
        return torch.from_numpy(out)
    out = torch.empty(a.shape[0], dtype=torch.float64, device=x64.device)
    step *= 64
    for s in range(0, a.shape[0], step):
        out[s:s + step] = torch.linalg.vector_norm(x64[a[s:s + step]] - x64[b[s:s + step]], dim=1)
    return out


def _exact_topk(x64: torch.Tensor, rows: torch.Tensor, cand: torch.Tensor,
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct float64 distances from ``rows`` to their candidates; the k nearest, sorted by
    (distance, index)."""
    n_rows, m = cand.shape
    dist = _pair_distances(x64, rows[:, None].expand(n_rows, m).reshape(-1), cand.reshape(-1))
    return _sort_pairs(dist.view(n_rows, m), cand, k)


def _sort_pairs(dist: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.argsort(idx, dim=1)
    dist, idx = torch.gather(dist, 1, order), torch.gather(idx, 1, order)
    order = torch.argsort(dist, dim=1, stable=True)[:, :k]
    return torch.gather(dist, 1, order), torch.gather(idx, 1, order)


def _rows_exact(x64: torch.Tensor, sel: _Selection, rows: torch.Tensor,
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours of ``rows`` whose candidates could not be verified: selections
    against every point in float32 and then float64 (those more precise than ``sel``), then direct
    differences against every point for what still fails."""
    dev = x64.device
    dist = torch.empty((rows.numel(), k), dtype=torch.float64, device=dev)
    idx = torch.empty((rows.numel(), k), dtype=torch.long, device=dev)
    todo = torch.arange(rows.numel(), device=dev)
    tiers = [t for t in (torch.float32, torch.float64)
             if _UNIT_ROUNDOFF[t] < _UNIT_ROUNDOFF[sel.dtype]]
    for dtype in tiers:
        if todo.numel() == 0:
            break
        r = rows[todo]
        logger.debug("kNN: %d of %d rows redone with a %s selection", r.numel(), x64.shape[0],
                     str(dtype).replace("torch.", ""))
        with _highest_matmul_precision(dev):
            cand, last = _row_candidates(sel.scaled.to(dtype), r, sel.m, sel.chunk)
        d, i = _exact_topk(x64, r, cand, k)
        dist[todo], idx[todo] = d, i
        c, tiny = _bound_constants(x64.shape[1], dtype)
        dk = d[:, -1] / sel.radius
        todo = todo[~(dk * dk <= last - c * (2.0 * sel.snorm[r] + dk) ** 2 - tiny)]
    if todo.numel():
        logger.debug("kNN: %d of %d rows recomputed by direct differences", todo.numel(),
                     x64.shape[0])
        dist[todo], idx[todo] = _brute_topk(x64, rows[todo], k)
    return dist, idx


def _all_pairs_topk(x64: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = x64.shape[0]
    ar = torch.arange(n - 1, device=x64.device)
    cand = ar[None, :] + (ar[None, :] >= torch.arange(n, device=x64.device)[:, None]).long()
    return _exact_topk(x64, torch.arange(n, device=x64.device), cand, k)


def _identical_topk(x64: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All points identical: distance 0 to the k lowest other indices."""
    n = x64.shape[0]
    ar = torch.arange(k, device=x64.device)
    idx = ar[None, :] + (ar[None, :] >= torch.arange(n, device=x64.device)[:, None]).long()
    return torch.zeros((n, k), dtype=torch.float64, device=x64.device), idx


def _earlier_within(x64: torch.Tensor, i: int, tau: float) -> bool:
    """Whether some row j < i lies within ``tau`` of row i (direct differences)."""
    step = max(1, (1 << 22) // x64.shape[1])
    for s in range(0, i, step):
        d = torch.linalg.vector_norm(x64[s:min(i, s + step)] - x64[i], dim=1)
        if bool((d <= tau).any()):
            return True
    return False


def _near_from_lists(x64: torch.Tensor, dist: torch.Tensor, idx: torch.Tensor, tau: float,
                     rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows with an earlier row within ``tau``, from their exact neighbour lists; rows whose whole
    list lies within ``tau`` are scanned directly."""
    if rows is None:
        rows = torch.arange(dist.shape[0], device=dist.device)
    within = dist <= tau
    near = (within & (idx < rows[:, None])).any(dim=1)
    for j in torch.nonzero(~near & within[:, -1]).flatten().tolist():
        near[j] = _earlier_within(x64, int(rows[j]), tau)
    return near


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
