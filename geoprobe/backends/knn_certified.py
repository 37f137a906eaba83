"""Exact k-nearest-neighbour distances from blocked matrix products (torch, CPU and CUDA).

Squared Euclidean distances are expanded as ‖a − b‖² = ‖a‖² + ‖b‖² − 2 a·b, so a block of rows against
all points is one matrix product. The expansion is computed in a *selection* precision (below) only to
*select* candidates; the distances that are returned are recomputed directly as sqrt(Σ (a_k − b_k)²) in
float64 from the input, and the selection is then *verified*:

* The data are centred and divided by the largest norm R, so every row has norm n_i ≤ 1 and float32
  can neither overflow nor lose the distances to a common offset.
* For each row i the m = k + max(4, k//4) candidates with the smallest expanded values are kept and sorted;
  exact distances are computed for the first p = k + 2 of them, and every other point j has an
  expanded value ≥ a_i, the (p+1)-th smallest value (if the test below fails, all m candidates are
  recomputed and a_i is the m-th value).
* The rounding error of the expanded value obeys |d̃²_ij − d²_ij| ≤ c (n_i + n_j)² + t, with the
  constant c of the selection (below) and t an allowance for underflow (≤ 16 (D + 8)·2⁻¹²⁶, negligible).
  A point j with n_j ≥ n_i + d_k lies at distance ≥ d_k by the triangle inequality, so only points with
  n_j < n_i + d_k can displace the k-th neighbour, and the selection is exact when
  d_k² ≤ a_i − c (2 n_i + d_k)² − t.
* Rows that fail the test are redone against every point with the float32 and then the float64
  selection (those of the two whose c is smaller than the failed selection's), and rows that fail
  again (in practice, rows with many exactly tied distances) by direct float64 differences.

The neighbour lists are therefore the exact float64 k nearest neighbours (ties at equal distance
broken by the smaller index), with the distances of the direct formula. The products exploit the
symmetry of the distance matrix: the strip of rows [s, e) is multiplied only with columns ≥ s, and the
part of the strip beyond its diagonal block also feeds the candidate lists of the later rows.

Selections (``selection_dtype``) and their constants (u = 2⁻²⁴, the float32 unit roundoff):

* ``torch.float32``: one float32 product, c = 1.01 (D + 8) u — the worst-case bound γ_D ‖a‖‖b‖ on a
  D-term dot product with round-to-nearest (Higham 2002 §3.1) plus the rounding of the inputs, the
  norms and the sums. On CUDA it runs with TF32 off (float32 matmul precision "highest").
* ``torch.float64``: the same with u = 2⁻⁵³.
* ``"3xtf32"``: float32 accuracy from TF32 tensor cores, c = 1.01 (2.01 D + 48)·2⁻²³ ≈ 4.1 × the
  float32 constant (derivation below). Its three D-term TF32 products take about 40 % of the time of
  one float32 product on the SIMT cores of an H100/H200 (peak 495 against 67 TFLOP/s).

Default: ``"3xtf32"`` on CUDA when its c ≤ 10⁻² (D ≤ 41,297), else float32; float32 on the CPU.
Float32 gives way to float64 when D u > 10⁻², where its bound would reject every row. An explicit
``"3xtf32"`` on the CPU runs the same split with float32 products (whose error is within the same
bound), which lets the CPU check the code path.

3xTF32 and its error bound. Let xs be the scaled points rounded to float32, a and b two rows.

* Split: hi = xs with its 13 low mantissa bits zeroed (bit mask on the int32 view), so hi has the 11
  significant bits of TF32, the same sign and |hi| ≤ |xs|; l = xs − hi is exact in float32 (Sterbenz)
  with |l| < 2⁻¹⁰ |xs|; lo = l with its 13 low bits zeroed, |r| = |l − lo| < 2⁻¹⁰ |l| < 2⁻²⁰ |xs|.
  hi and lo are exactly representable in TF32, so the hardware's float32 → TF32 conversion (rounding or
  truncating) leaves them unchanged and every product of two of them (11 × 11 significant bits) is
  exact in float32.
* Products, with TF32 allowed: G̃ = [hi, lo]·[lo, hi]ᵀ (one product with K = 2D: the cross terms
  hi_a lo_b + lo_a hi_b), then G̃ += hi·hiᵀ (addmm, K = D, added in the product's epilogue).
  Per term, with a = hi_a + lo_a + r_a:
  |a_k b_k − (hi_a hi_b + hi_a lo_b + lo_a hi_b)| = |hi_a r_b + r_a hi_b + lo_a lo_b + lo_a r_b + r_a lo_b
  + r_a r_b| < (3·2⁻²⁰ + 2⁻²⁹ + 2⁻⁴⁰) |a_k||b_k| < 3.01·2⁻²⁰ |a_k||b_k|.
* Accumulation. Hardware assumption: the tensor cores multiply TF32 numbers exactly and add in at
  least float32 with truncation (round toward zero), as Fasi, Higham, Mikaitis and Pranesh measured
  on V100, T4 and A100 ("Numerical behavior of NVIDIA tensor cores", PeerJ Comput. Sci. 7:e330,
  2021). One addition then errs by < 2⁻²³ of its result, and recursive summation of K terms in any
  order by ≤ γ_K(2⁻²³) Σ|terms| (Higham 2002 §4.2). Their multi-operand adders align q ≥ 2 products
  and the accumulator to the largest exponent, truncating, so one step loses < (q + 2)·2⁻²³ of its
  operands' magnitudes — at most (1 + 2/q) ≤ 2 times the sequential bound. We use the sequential bound
  doubled, with 8 extra additions for split-K reductions: 2 (K + 8)·2⁻²³ Σ|terms|.
  hi·hiᵀ: 2 (D + 8)·2⁻²³ Σ|a_k||b_k| (|hi| ≤ |xs|); cross terms (|hi lo| < 2⁻¹⁰ |a_k||b_k| each):
  2 (2D + 8)·2⁻²³ · 2⁻⁹ (1 + 2⁻¹⁰) Σ|a_k||b_k|; the epilogue's one addition 2⁻²³ (1 + 2⁻⁸) Σ|a_k||b_k|.
  With the split, |G̃ − a·b| ≤ (2D + D/128 + 41.2)·2⁻²³ Σ|a_k||b_k| and Σ|a_k||b_k| ≤ ‖a‖‖b‖.
* Distance. The squared norms are float32 sums (γ_D(2⁻²⁴) ‖a‖², below the product's constant), the
  two float32 additions and the rounding of the inputs add 4·2⁻²⁴ (n_i + n_j)², so
  |d̃² − d²| ≤ c (n_i + n_j)² with c = 1.01 (2.01 D + 48)·2⁻²³ (the factor 1.01 and the rounded-up
  coefficients cover the second-order terms). Products of subnormal numbers, which the hardware may
  flush to zero, are covered by t = 16 (D + 8)·2⁻¹²⁶.
  One TF32 product of xs (error up to 2⁻¹⁰ relative per term) is never used: that bound would reject
  almost every row.

Exact distances. On CUDA every direct float64 distance (candidates, fallbacks, scans) sums its
squares in one fixed pairwise order by element-wise additions of halves, not by a reduction kernel
(those pick their order from the tensor's shape), so a pair's distance is the same number whatever
else is computed alongside, and a CUDA answer does not depend on the selection, the chunk size or the
batch of layers it was computed with. On the CPU the candidates' distances are numpy dot products of
the difference rows (one per pair) and the direct fallback uses torch's norm.

:func:`distances_at_ranks` serves the estimators, which need the exact distances at a few ranks only
(r1, r2 for TwoNN; r_n1, r_2n1 for GRIDE): from the same candidates and bound it recomputes only the
candidates that could sit at a requested rank, which keeps the direct float64 work near one distance
per rank and point instead of k + 2 per point. :func:`distances_at_ranks_queued` is its variant
without host synchronisation, for many point sets queued on one GPU: it recomputes all m candidates
and returns, beside the distances, a device flag that says whether every row was certified.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from ..errors import InputDataError
from .arrays import real_float64
from .spread import share

logger = logging.getLogger(__name__)

_UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}

#: Selection kinds accepted by ``selection_dtype`` (besides torch.float32 / torch.float64).
SELECTIONS = ("float32", "float64", "3xtf32")
_KIND_OF_DTYPE = {torch.float32: "float32", torch.float64: "float64"}
_TF32_LOW_BITS = 0x1FFF  # the 13 float32 mantissa bits that TF32 does not have

Selection = Union[torch.dtype, str, None]


def as_float64_points(x: Any, device: Optional[str | torch.device] = None, *,
                      check_finite: bool = True) -> torch.Tensor:
    """``x`` (numpy array, torch tensor or nested sequence, shape (N, D)) as a float64 tensor on
    ``device`` (default: the tensor's own device, else the CPU); raises :class:`InputDataError` for
    anything that is not a finite 2-D array of real numbers (``check_finite=False`` leaves the
    NaN/inf check, which synchronises with the device, to the caller)."""
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
        t = torch.from_numpy(real_float64(x, "points", "an (N, D) array")).to(device)
    if t.ndim != 2:
        raise InputDataError(f"points must be a 2-D array (N points × D coordinates), "
                             f"got shape {tuple(t.shape)}")
    if t.shape[1] == 0:
        raise InputDataError("points have no coordinates (shape (N, 0))")
    if check_finite:
        bad = ~torch.isfinite(t.sum(dim=1))  # a NaN or inf entry makes its row's sum NaN or inf
        if bool(bad.any()):
            bad[bad.clone()] = ~torch.isfinite(t[bad]).all(dim=1)  # sums that merely overflowed
        if bool(bad.any()):
            rows = torch.nonzero(bad).flatten()[:5].tolist()
            raise InputDataError(f"{int(bad.sum())} of {t.shape[0]} points contain NaN or inf "
                                 f"(first rows: {rows}); remove or repair them first")
    return t.contiguous()


def knn_distances(x: Any, k: int, *, chunk: Optional[int] = None,
                  selection_dtype: Selection = None,
                  device: Optional[str | torch.device] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact distances to and indices of the ``k`` nearest neighbours of every point (self excluded).

    Args:
        x: points, shape (N, D); numpy or torch, any real dtype (used as float64).
        k: neighbours per point, 1 ≤ k ≤ N − 1.
        chunk: rows per block of the distance products (default: 2048 rows on the CPU, 16384 on
            CUDA, fewer for large N so that a block holds at most 64M (CPU) or 256M (CUDA) entries).
        selection_dtype: precision of the candidate-selection products: torch.float32 / "float32",
            torch.float64 / "float64" or "3xtf32" (default: "3xtf32" on CUDA, float32 on the CPU;
            module docstring). The returned distances are exact float64 either way.
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
    check_selection(selection_dtype)
    return knn_float64(x64, int(k), chunk=_chunk_rows(n, chunk, x64.device),
                       selection_dtype=selection_dtype)


def knn_float64(x64: torch.Tensor, k: int, *, chunk: Optional[int] = None,
                selection_dtype: Selection = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`knn_distances` for points already checked by :func:`as_float64_points` (a finite,
    contiguous float64 (N, D) tensor) and 1 ≤ k ≤ N − 1; no further validation."""
    n = x64.shape[0]
    m = _n_candidates(n, k)
    if m == n - 1:  # every other point is a candidate: nothing to select or verify
        return _all_pairs_topk(x64, k)
    sel = _select(x64, m, chunk, selection_dtype)
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
                       chunk: Optional[int] = None, selection_dtype: Selection = None
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
    m = _n_candidates(n, k)
    sel = None if m == n - 1 else _select(x64, m, chunk, selection_dtype)
    if sel is None:  # small input or identical points: exact lists for every row
        dist, idx = knn_float64(x64, k, chunk=chunk, selection_dtype=selection_dtype)
        return dist[:, ranks_t - 1], (None if tau is None else _near_from_lists(x64, dist, idx, tau))
    return _ranks_with_fallback(x64, sel, ranks, tau)


def distances_at_ranks_spread(x64: torch.Tensor, ranks: list[int], spread: Any, *, tau: Optional[float] = None,
                              chunk: Optional[int] = None, selection_dtype: Selection = None
                              ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """:func:`distances_at_ranks` with its work spread over the parts of ``spread`` (a
    :class:`geoprobe.backends.spread.Spread`: several devices, or the processes of a group), the same
    answer on its home device.

    1. The strips of the candidate products (:func:`_symmetric_candidates`) are dealt to the parts,
       balanced by their cost (b·(N − s) products for the strip [s, s + b)); each part forms the lists
       of the pairs its strips cover, and :func:`merge_candidates` joins them: the lists one device
       would have formed (the same products, in the selection precision the home device uses).
    2. The query rows are cut into contiguous runs, one per part; each part places its rows' ranks
       from their candidates and recomputes what the bound cannot certify, exactly as one device does.

    Every distance returned is a direct float64 distance of one pair and every decision is made per
    row, so the result does not depend on the split. Small inputs (every point a candidate) and
    identical points are computed on the home device alone.
    """
    n, dim = x64.shape
    k = int(max(ranks))
    m = _n_candidates(n, k)
    home = spread.home
    xh = x64.to(home)
    if m == n - 1 or float(_scaled_points(xh)[2]) == 0.0:
        return distances_at_ranks(xh, ranks, tau=tau, chunk=chunk, selection_dtype=selection_dtype)
    kind = _resolve_kind(selection_dtype, home, dim)
    chunk = chunk or _chunk_rows(n, None, home)
    owned = _deal_strips(n, chunk, spread.parts)
    copies: dict[torch.device, torch.Tensor] = {home: xh, x64.device: x64}

    def local(dev: torch.device) -> torch.Tensor:
        if dev not in copies:
            copies[dev] = x64.to(dev)
        return copies[dev]

    def lists(part: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        scaled, _, _ = _scaled_points(local(dev))
        return _symmetric_candidates(_Gram(scaled, kind), m, chunk, owned[part])

    def rows_of(part: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        x = local(dev)
        span = share(n, spread.parts, part)
        rows = torch.arange(span.start, span.stop, device=dev)
        if rows.numel() == 0:
            return torch.empty((0, len(ranks)), dtype=torch.float64, device=dev), torch.zeros(0, dtype=torch.bool, device=dev)
        scaled, snorm, radius = _scaled_points(x)
        sel = _Selection(cand[span].to(dev), approx[span].to(dev), scaled, snorm, float(radius), kind, chunk, rows=rows)
        out, near = _ranks_with_fallback(x, sel, ranks, tau)
        return out, (near if near is not None else torch.zeros(rows.numel(), dtype=torch.bool, device=dev))

    # the precision is set once for every thread (a part must not restore it under another's products)
    any_cuda = torch.device("cuda") if any(d.type == "cuda" for d in spread.devices) else home
    with _matmul_precision(any_cuda, tf32=kind == "3xtf32"):
        cand, approx = merge_candidates(spread.map(lists), m)
    with _matmul_precision(any_cuda, tf32=False):
        parts = spread.map(rows_of)
    out = torch.cat([p[0] for p in parts])
    near = torch.cat([p[1] for p in parts]) if tau is not None else None
    return out, near


def _deal_strips(n: int, chunk: int, parts: int) -> list[list[int]]:
    """The strip starts of each part: the strips [s, s + b) by decreasing cost b·(N − s), each to the
    part with the least cost so far (longest-processing-time-first)."""
    starts = sorted(range(0, n, chunk), key=lambda s: -(min(n, s + chunk) - s) * (n - s))
    load = [0] * parts
    owned: list[list[int]] = [[] for _ in range(parts)]
    for s in starts:
        j = min(range(parts), key=lambda p: (load[p], p))
        owned[j].append(s)
        load[j] += (min(n, s + chunk) - s) * (n - s)
    return [sorted(o) for o in owned]


def _ranks_with_fallback(x64: torch.Tensor, sel: "_Selection", ranks: list[int], tau: Optional[float]
                         ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The distances at ``ranks`` (and the near mask) of the selection's rows: from the candidates
    where the bound certifies them, from exact lists (:func:`_rows_exact`) elsewhere."""
    ranks_t = torch.as_tensor(ranks, dtype=torch.long, device=x64.device)
    out, near, ok = _ranks_from_selection(x64, sel, ranks, tau)
    redo = torch.nonzero(~ok).flatten()
    if redo.numel():
        logger.debug("kNN ranks: %d of %d rows need the exact lists", redo.numel(), sel.rows.numel())
        rows = sel.rows[redo]
        dist, idx = _rows_exact(x64, sel, rows, int(max(ranks)))
        out[redo] = dist[:, ranks_t - 1]
        if near is not None:
            near[redo] = _near_from_lists(x64, dist, idx, tau, rows)
    return out, near


def _ranks_from_selection(x64: torch.Tensor, sel: "_Selection", ranks: list[int],
                          tau: Optional[float]
                          ) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    n, m = sel.cand.shape
    dev = x64.device
    rows = sel.rows
    ranks_t = torch.as_tensor(ranks, dtype=torch.long, device=dev)
    approx, cand = sel.approx, sel.cand
    err = sel.c * (sel.qnorm[:, None] + sel.snorm[cand]) ** 2 + sel.tiny
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
    exact[pr, pc] = _pair_distances(x64, rows[pr], cand[pr, pc])
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
            near[i] = _earlier_within(x64, int(rows[i]), tau)
    return out, near, ok


def distances_at_ranks_queued(x64: torch.Tensor, ranks: list[int], *,
                              min_distance: Optional[float | torch.Tensor] = None,
                              chunk: Optional[int] = None, selection_dtype: Selection = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`distances_at_ranks` without any host synchronisation, for queueing many point sets.

    Returns ``(dist, ok)``: dist (N, len(ranks)) float64 and ok, a 0-d boolean tensor on the device.
    The exact distances to all m candidates of every row are computed and sorted; ok is True when
    every row is certified from its m-th expanded value (module docstring) and, when ``min_distance``
    (a float or 0-d tensor) is given, every point's nearest neighbour lies farther than it. When ok
    is True, dist equals :func:`distances_at_ranks`' answer exactly (the same pair distances, see
    the module docstring); when it is False, dist must be discarded and the caller falls back to
    :func:`distances_at_ranks` (identical points, for instance, only make ok False).
    """
    n, dim = x64.shape
    dev = x64.device
    k = int(max(ranks))
    m = _n_candidates(n, k)
    if m == n - 1:
        dist, _ = _all_pairs_topk(x64, k)
        ok = torch.ones((), dtype=torch.bool, device=dev)
    else:
        kind = _resolve_kind(selection_dtype, dev, dim)
        scaled, snorm, radius = _scaled_points(x64)
        chunk = chunk or _chunk_rows(n, None, dev)
        gram = _Gram(scaled, kind)
        with _matmul_precision(dev, tf32=kind == "3xtf32"):
            cand, approx = _symmetric_candidates(gram, m, chunk)
        del gram
        rows = torch.arange(n, device=dev)
        exact = _pair_distances(x64, rows[:, None].expand(n, m).reshape(-1), cand.reshape(-1))
        dist = torch.sort(exact.view(n, m), dim=1).values
        c, tiny = _bound_constants(dim, kind)
        d = dist[:, k - 1] / radius
        ok = (d * d <= approx[:, m - 1] - c * (2.0 * snorm + d) ** 2 - tiny).all()
    if min_distance is not None:
        ok = ok & (dist[:, 0] > min_distance).all()
    # columns by views and one stack: an index tensor built from ``ranks`` would be a host → device
    # copy, which waits for the queued work
    return torch.stack([dist[:, r - 1] for r in ranks], dim=1), ok


# --------------------------------------------------------------------------- selection
def check_selection(selection: Selection) -> Optional[str]:
    """The selection kind named by ``selection`` (None for the default); raises
    :class:`InputDataError` for anything else."""
    if selection is None:
        return None
    if isinstance(selection, torch.dtype) and selection in _KIND_OF_DTYPE:
        return _KIND_OF_DTYPE[selection]
    if isinstance(selection, str) and selection.lower() in SELECTIONS:
        return selection.lower()
    raise InputDataError("selection_dtype must be torch.float32 / 'float32', torch.float64 / "
                         f"'float64' or '3xtf32' (or None for the default), got {selection!r}")


def _resolve_kind(requested: Selection, device: torch.device, dim: int) -> str:
    """The selection that runs: the requested (or default) kind, made more precise where its bound
    would reject every row (module docstring)."""
    kind = check_selection(requested)
    if kind is None:
        kind = "3xtf32" if device.type == "cuda" else "float32"
    if kind == "3xtf32" and _bound_constants(dim, "3xtf32")[0] > 1e-2:
        kind = "float32"
    if kind == "float32" and dim * _UNIT_ROUNDOFF[torch.float32] > 1e-2:
        kind = "float64"  # the float32 bound would reject every row
    return kind


def _n_candidates(n: int, k: int) -> int:
    return min(n - 1, k + max(4, k // 4))


def _chunk_rows(n: int, chunk: Optional[int], device: torch.device) -> int:
    if chunk is None:  # up to 2048 (CPU) or 16384 (CUDA) rows, 64M (CPU) or 256M (CUDA) distances
        budget, most = ((1 << 28), 16384) if device.type == "cuda" else ((1 << 26), 2048)
        return max(1, min(n, most, max(256, budget // max(n, 1))))
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise InputDataError(f"chunk must be a positive integer, got {chunk!r}")
    return int(chunk)


class _matmul_precision:
    """Float32 CUDA products with TF32 tensor cores allowed (``tf32=True``, float32 matmul precision
    "high") or not ("highest", which the float32 bound assumes); restores the previous settings,
    including those of the per-backend precision API of recent torch versions."""

    _BACKENDS = ("cuda.matmul", "mkldnn.matmul")

    def __init__(self, device: torch.device, tf32: bool = False):
        self.active = device.type == "cuda"
        self.tf32 = tf32

    def __enter__(self) -> None:
        if not self.active:
            return
        self.saved = torch.get_float32_matmul_precision()
        self.saved_backends = {}
        for name in self._BACKENDS:
            obj = _backend(name)
            if obj is not None and hasattr(obj, "fp32_precision"):
                self.saved_backends[name] = obj.fp32_precision
        torch.set_float32_matmul_precision("high" if self.tf32 else "highest")

    def __exit__(self, *exc: Any) -> None:
        if not self.active:
            return
        torch.set_float32_matmul_precision(self.saved)
        for name, value in self.saved_backends.items():
            _backend(name).fp32_precision = value


def _backend(name: str) -> Any:
    obj: Any = torch.backends
    for part in name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _bound_constants(dim: int, kind: Selection) -> tuple[float, float]:
    """(c, t) of the error bound |d̃² − d²| ≤ c (n_i + n_j)² + t (scaled units; module docstring)."""
    kind = check_selection(kind) or "float32"
    if kind == "3xtf32":
        tiny = float(torch.finfo(torch.float32).tiny)
        return 1.01 * (2.01 * dim + 48) * 2.0 ** -23, 16 * (dim + 8) * tiny
    dtype = torch.float32 if kind == "float32" else torch.float64
    return 1.01 * (dim + 8) * _UNIT_ROUNDOFF[dtype], (dim + 8) * float(torch.finfo(dtype).tiny)


def tf32_truncate(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) with the 13 low mantissa bits zeroed: the TF32 number nearest to it towards
    zero, exactly representable in TF32 (and in float32)."""
    if x.dtype != torch.float32:
        raise InputDataError(f"tf32_truncate needs a float32 tensor, got {x.dtype}")
    return (x.contiguous().view(torch.int32) & ~_TF32_LOW_BITS).view(torch.float32)


def tf32_split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) of the 3xTF32 product: hi = TF32 truncation of x, lo = TF32 truncation of x − hi
    (x − hi is exact in float32), so both parts are exact TF32 numbers and |x − hi − lo| < 2⁻²⁰ |x|
    (where x − hi is a normal number; below that, < 2⁻¹³⁶)."""
    hi = tf32_truncate(x)
    return hi, tf32_truncate(x - hi)


class _Gram:
    """Products of the scaled points (rows against columns) in one selection kind, and their squared
    norms in the same working precision (float32 for "3xtf32")."""

    def __init__(self, scaled: torch.Tensor, kind: str):
        self.kind = kind
        self.dim = scaled.shape[1]
        if kind == "3xtf32":
            xs = scaled.to(torch.float32)
            self.sq = (xs * xs).sum(dim=1)
            hi, lo = tf32_split(xs)
            del xs
            self.left = torch.cat([hi, lo], dim=1)   # [hi, lo]
            self.right = torch.cat([lo, hi], dim=1)  # [lo, hi]
            self.hi = self.left[:, :self.dim]
            self.dtype = torch.float32
        else:
            self.dtype = torch.float32 if kind == "float32" else torch.float64
            self.x = scaled.to(self.dtype)
            self.sq = (self.x * self.x).sum(dim=1)

    @property
    def n(self) -> int:
        return int(self.sq.shape[0])

    def product(self, rows: slice, cols: slice, out: torch.Tensor) -> torch.Tensor:
        """``out`` = the Gram block rows × cols (a · b), as the module docstring describes."""
        if self.kind == "3xtf32":
            torch.mm(self.left[rows], self.right[cols].T, out=out)  # hi·loᵀ + lo·hiᵀ
            return out.addmm_(self.hi[rows], self.hi[cols].T)  # + hi·hiᵀ
        return torch.mm(self.x[rows], self.x[cols].T, out=out)


class _Selection:
    """Candidates of the rows ``rows`` (default: every row) from the expanded products, sorted by
    expanded value, with what the error bound needs. ``approx`` is in scaled units (data centred and
    divided by ``radius``); ``cand`` and ``approx`` hold one line per row of ``rows``, ``scaled`` and
    ``snorm`` every point."""

    def __init__(self, cand: torch.Tensor, approx: torch.Tensor, scaled: torch.Tensor,
                 snorm: torch.Tensor, radius: float, kind: str, chunk: int,
                 rows: Optional[torch.Tensor] = None):
        self.cand, self.approx, self.scaled, self.snorm = cand, approx, scaled, snorm
        self.radius, self.kind, self.chunk = radius, kind, chunk
        self.c, self.tiny = _bound_constants(scaled.shape[1], kind)
        self.rows = torch.arange(cand.shape[0], device=cand.device) if rows is None else rows
        self.qnorm = snorm if rows is None else snorm[rows]  # the norms of the rows the lists belong to

    @property
    def m(self) -> int:
        return self.cand.shape[1]

    def unverified(self, dk: torch.Tensor, threshold: torch.Tensor,
                   rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rows whose k-th exact distance ``dk`` (input units) is not provably below every point with
        an expanded value ≥ ``threshold`` (module docstring)."""
        sn = self.qnorm if rows is None else self.qnorm[rows]
        d = dk / self.radius
        return ~(d * d <= threshold - self.c * (2.0 * sn + d) ** 2 - self.tiny)

    def certified(self, v: torch.Tensor) -> torch.Tensor:
        """Rows whose non-candidates provably lie at squared scaled distance ≥ ``v``."""
        a = self.approx[:, -1]
        return a - self.c * (2.0 * self.qnorm + torch.sqrt(v)) ** 2 - self.tiny >= v


def _scaled_points(x64: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scaled, scaled norms, radius): the points centred and divided by their largest norm R (a
    0-d tensor on the device; no host synchronisation)."""
    scaled = x64 - x64.mean(dim=0, keepdim=True)
    norms = torch.linalg.vector_norm(scaled, dim=1)
    radius = norms.max()
    scaled.div_(radius)
    return scaled, norms / radius, radius


def _select(x64: torch.Tensor, m: int, chunk: Optional[int],
            selection: Selection) -> Optional[_Selection]:
    """Candidate lists from the symmetric blocked products; None when all points are identical."""
    n, dim = x64.shape
    kind = _resolve_kind(selection, x64.device, dim)
    scaled, snorm, radius_t = _scaled_points(x64)
    radius = float(radius_t)
    if radius == 0.0:
        return None
    chunk = chunk or _chunk_rows(n, None, x64.device)
    gram = _Gram(scaled, kind)
    with _matmul_precision(x64.device, tf32=kind == "3xtf32"):
        cand, approx = _symmetric_candidates(gram, m, chunk)
    return _Selection(cand, approx, scaled, snorm, radius, kind, chunk)


def _symmetric_candidates(gram: _Gram, m: int, chunk: int, starts: Optional[Sequence[int]] = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the m smallest expanded squared distances per row and those values (float64), both
    sorted by value, using each product block for both its rows and its columns.

    The strips [s, s + chunk) × [s, N) are formed for s in ``starts`` (default: every multiple of
    ``chunk``); a strip covers every pair whose smaller index lies in it, so the strips of all starts
    cover each pair once. With a subset of the starts the lists hold the m smallest values among the
    pairs those strips cover (:func:`merge_candidates` joins the lists of disjoint subsets)."""
    n = gram.n
    sq = gram.sq
    dev = sq.device
    best_v = torch.full((n, m), math.inf, dtype=gram.dtype, device=dev)  # from earlier strips
    best_i = torch.zeros((n, m), dtype=torch.long, device=dev)
    out_i = torch.zeros((n, m), dtype=torch.long, device=dev)
    out_v = torch.full((n, m), math.inf, dtype=torch.float64, device=dev)
    buf = torch.empty(min(chunk, n) * n, dtype=gram.dtype, device=dev)
    done = 0  # rows below this are final in out_v / out_i
    for s in (range(0, n, chunk) if starts is None else sorted(starts)):
        e = min(n, s + chunk)
        b = e - s
        if done < s:  # rows no strip of this subset owns: the column-side lists so far are final
            _finish(best_v, best_i, out_v, out_i, done, s)
        d2 = buf[:b * (n - s)].view(b, n - s)
        gram.product(slice(s, e), slice(s, None), out=d2)
        d2.mul_(-2.0).add_(sq[s:e, None]).add_(sq[None, s:])
        d2.diagonal().fill_(math.inf)  # the points themselves: (i, i) of the leading b × b block
        rv, ri = torch.topk(d2, min(m, n - s), dim=1, largest=False, sorted=False)
        v, i = _merge(best_v[s:e], best_i[s:e], rv, ri + s, m)
        v, order = torch.sort(v, dim=1)
        out_i[s:e] = torch.gather(i, 1, order)
        out_v[s:e] = v
        done = e
        if e < n:  # columns beyond the diagonal block: candidates of the later rows
            cv, ci = torch.topk(d2[:, b:], min(m, b), dim=0, largest=False, sorted=False)
            best_v[e:], best_i[e:] = _merge(best_v[e:], best_i[e:], cv.T, ci.T + s, m)
    if done < n:
        _finish(best_v, best_i, out_v, out_i, done, n)
    return out_i, out_v


def _finish(best_v: torch.Tensor, best_i: torch.Tensor, out_v: torch.Tensor, out_i: torch.Tensor,
            a: int, b: int) -> None:
    """Rows [a, b): their lists so far, sorted, into ``out_v`` / ``out_i``."""
    v, order = torch.sort(best_v[a:b], dim=1)
    out_i[a:b] = torch.gather(best_i[a:b], 1, order)
    out_v[a:b] = v


def merge_candidates(parts: Sequence[tuple[torch.Tensor, torch.Tensor]], m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, values) of the m smallest values per row over candidate lists of disjoint sets of
    pairs (:func:`_symmetric_candidates` on disjoint start subsets), sorted by value."""
    i = torch.cat([p[0] for p in parts], dim=1)
    v = torch.cat([p[1] for p in parts], dim=1)
    v, pos = torch.topk(v, m, dim=1, largest=False, sorted=True)
    return torch.gather(i, 1, pos), v


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
def _sum_squares_fixed_order(diff: torch.Tensor) -> torch.Tensor:
    """Σ_k diff_k² per row, added in a fixed pairwise order by element-wise operations only (halves
    added to halves; an odd last column joins the first): each row's result is independent of how
    many rows are computed together, unlike a reduction kernel, whose order follows the shape."""
    s = diff * diff
    while s.shape[1] > 1:
        w = s.shape[1]
        h = w // 2
        t = s[:, :h] + s[:, h:2 * h]
        if w % 2:
            t[:, 0].add_(s[:, 2 * h])
        s = t
    return s[:, 0]


def _norms_of(diff: torch.Tensor) -> torch.Tensor:
    """Row norms of a float64 difference block, CUDA in the fixed order of
    :func:`_sum_squares_fixed_order`, CPU by torch."""
    if diff.device.type == "cuda":
        return torch.sqrt(_sum_squares_fixed_order(diff))
    return torch.linalg.vector_norm(diff, dim=1)


def _pair_distances(x64: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Direct float64 distances ‖x_a − x_b‖ for index vectors ``a`` and ``b`` of equal length.

    On the CPU this runs through numpy in cache-sized blocks: many small gathers are cheaper there
    than through the thread pool of torch's element-wise kernels. On CUDA the squares are summed in
    the fixed order of :func:`_sum_squares_fixed_order`."""
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
        out[s:s + step] = _norms_of(x64[a[s:s + step]] - x64[b[s:s + step]])
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
    against every point in float32 and then float64 (those with a smaller constant c than ``sel``),
    then direct differences against every point for what still fails."""
    dev = x64.device
    dist = torch.empty((rows.numel(), k), dtype=torch.float64, device=dev)
    idx = torch.empty((rows.numel(), k), dtype=torch.long, device=dev)
    todo = torch.arange(rows.numel(), device=dev)
    tiers = [t for t in (torch.float32, torch.float64)
             if _bound_constants(x64.shape[1], t)[0] < sel.c]
    for dtype in tiers:
        if todo.numel() == 0:
            break
        r = rows[todo]
        logger.debug("kNN: %d of %d rows redone with a %s selection", r.numel(), x64.shape[0],
                     str(dtype).replace("torch.", ""))
        with _matmul_precision(dev, tf32=False):
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


def first_earlier_within(x64: torch.Tensor, i: int, tau: float) -> Optional[int]:
    """The smallest j < i whose row lies within ``tau`` of row i (direct float64 differences), or
    None when there is none."""
    step = max(1, (1 << 22) // x64.shape[1])
    for s in range(0, i, step):
        hit = torch.nonzero(_norms_of(x64[s:min(i, s + step)] - x64[i]) <= tau).flatten()
        if hit.numel():
            return s + int(hit[0])
    return None


def _earlier_within(x64: torch.Tensor, i: int, tau: float) -> bool:
    """Whether some row j < i lies within ``tau`` of row i (direct differences)."""
    return first_earlier_within(x64, i, tau) is not None


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
            d[c:c + cols] = _norms_of(x64[c:c + cols] - x64[r])
        d[r] = math.inf
        od, oi = _sort_pairs(d[None, :], all_idx[None, :], k)
        out_d[s], out_i[s] = od[0], oi[0]
    return out_d, out_i
