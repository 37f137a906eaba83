"""Intrinsic dimension of a point cloud: TwoNN (Facco et al. 2017) and GRIDE (Denti et al. 2022).

TwoNN (E. Facco, M. d'Errico, A. Rodriguez, A. Laio, "Estimating the intrinsic dimension of datasets
by a minimal neighborhood information", Sci. Rep. 7, 12140, 2017). With r1(i), r2(i) the distances from
point i to its first and second nearest neighbours, μ_i = r2/r1 follows the Pareto law
F(μ) = 1 − μ^(−d), μ ≥ 1, when the density is locally constant on a d-dimensional manifold. Then
log μ_i ~ Exponential(d) and S = Σ log μ_i ~ Gamma(N, d), so

* the estimate of the paper, reported as ``dimension`` (and, for older readers, as
  ``linear_fit_dimension``), is the slope of the zero-intercept least-squares line of
  −log(1 − F_emp(μ)) against log μ, after discarding the largest ``discard_fraction`` (default 10 %)
  of the ratios: with the ratios sorted, the k = min(⌊N (1 − f)⌋, N − 1) smallest are kept and
  F_emp(μ_(i)) = i/N — scikit-dimension's ``TwoNN`` and DADApy's default, so published TwoNN values
  compare with it (the MLE below differs by up to ~20 % on real embeddings, METHODS.md §3b);
* the maximum-likelihood estimate, in its unbiased form, ``mle_dimension``, is
  d̂ = (N − 1) / Σ log μ_i; its standard deviation is exactly d/sqrt(N − 2) (the inverse of a Gamma
  variable).

``error`` is the block-bootstrap standard error of the line fit when a bootstrap ran (below), else
d_lin/sqrt(N − 2): the MLE's exact standard deviation with the line fit's value in place of d. The
line fit has no closed-form variance; on exact Pareto samples (N = 300 … 4000, d = 3 and 10) its
standard deviation is about 1.07–1.13 times this value, and on real data neighbouring points share
neighbours and documents, which only the grouped bootstrap accounts for.

GRIDE (F. Denti, D. Doimo, A. Laio, A. Mira, "The generalized ratios intrinsic dimension estimator",
Sci. Rep. 12, 20005, 2022). With μ_i = r_n2(i)/r_n1(i) and n2 = 2·n1 the ratio has density

    f(μ) = d (μ^d − 1)^(n2−n1−1) / (B(n2 − n1, n1) μ^((n2−1) d + 1)),   μ > 1,

whose log-likelihood, with (N − 1) log d in place of N log d so that n1 = 1 gives the unbiased TwoNN
estimate exactly (the DADApy convention), has the score

    s(d) = (N − 1)/d + (n2 − n1 − 1) Σ log μ_i / (1 − μ_i^(−d)) − (n2 − 1) Σ log μ_i,

strictly decreasing from +∞ to −n1 Σ log μ_i < 0, so it has one root; it is found in float64 by a
Newton iteration safeguarded by bisection. The error is 1/sqrt(I(d̂)) with the observed Fisher
information I(d) = −s'(d) = (N − 1)/d² + (n2 − n1 − 1) Σ (log μ_i / (2 sinh(d log μ_i / 2)))² of
the likelihood that is maximised (DADApy and scikit-dimension put N/d² in the first term, the
information of the unmodified likelihood; at n1 = 1 ours gives d̂/sqrt(N − 1), nearer the exact
standard deviation d/sqrt(N − 2), and the two differ by a factor of about 1 + 1/(2N)).
Ratios equal to 1 (tied distances, impossible under the model when n2 − n1 > 1) are left out of the
GRIDE likelihood and logged. Larger n1 probe larger neighbourhoods, which averages out noise at the
smallest scale.

Scales and the reported GRIDE dimension. By default the scales are n1 = 1, 2, 4, … with
n1 ≤ ``n1_max`` (default 32, so n2 ≤ 64 as in scikit-dimension's ``range_max``) and n2 = 2·n1 ≤ N/10
(each n2-neighbourhood holds at most a tenth of the points, so it stays local); n1 = 1 is always
included. Every scale is listed in ``scales``, with its ``radius``, the mean distance to the n2-th
neighbour. Denti et al. read the dimension where the ID-versus-scale curve is flat, and layers are
compared at one common scale, never at a scale chosen per layer (METHODS.md §3b):
:func:`shared_gride_scale` picks the n1 where the pooled curves of all layers change least
(the median over layers of |d(n1) − d(previous n1)|/d(n1), smallest; ties to the smaller n1), and
:func:`at_scale` headlines a result there (``dimension``, ``error``, interval, ``scale_n1``,
``scale_rule``). :func:`intrinsic_dimension` applies the rule to its one curve;
:func:`intrinsic_dimension_layers` to all the layers it is given.

Bootstrap (:mod:`geoprobe.probes.id_bootstrap`). With ``n_boot`` > 0 the points are resampled in
whole groups (``groups``: one integer label per row, e.g. the document of each hidden-state position;
None: every point its own group) with replacement, and each replicate recomputes the estimators from
the full sample's per-point ratios of the drawn points (TwoNN: line fit and MLE; GRIDE: the MLE at
every scale). ``ci_low``/``ci_high`` are the percentile interval at ``level`` and ``error`` the
replicates' standard deviation. Duplicates are removed before, and a kept row keeps its label;
the two points of a mutual first-neighbour pair, whose ratios share r1, are resampled together.

Duplicates. Repeated points (BOS and padding positions, repeated tokens) give r1 = 0, or r1 ≈ 1e-8
after round-off, and drive TwoNN towards 0 (27 % duplicated rows turn a dimension of 10 into 0.1).
Points are therefore deduplicated first by the rule of :mod:`geoprobe.probes.duplicates`
(:func:`deduplicate`, re-exported here) and the neighbour distances recomputed exactly in float64
(:mod:`geoprobe.backends.knn_certified`: a float32 (CPU) or 3xTF32 (CUDA) matrix-product selection,
certified by a rounding-error bound, then direct float64 differences); ``n_points`` is the number of
points left and ``n_duplicates_removed`` the number removed.

Many point sets at once. :func:`intrinsic_dimension_layers` takes every layer's hidden states (a
sequence of (N_l, D) arrays or one (L, N, D) tensor) and returns the list of results, equal to calling
:func:`intrinsic_dimension` per layer (all fields but ``seconds``). On the CPU it is that loop. On CUDA
it keeps the layers on the GPU and queues each group of layers' work without waiting for the device:
finiteness and exact-duplicate hashes of every layer, one host synchronisation, then every layer's
selection products, candidate distances and certificates
(:func:`geoprobe.backends.knn_certified.distances_at_ranks_queued`), one copy of all the distances to
the host, and the estimates (the bootstrap runs on the host on those distances). A layer whose
certificate fails, that has near-duplicates or that is otherwise unusual is recomputed by
:func:`intrinsic_dimension` itself, so the answers stay the same. GRIDE results are then put at the
shared scale of all the layers given.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from ..errors import InputDataError
from ..backends.knn_certified import (Selection, as_float64_points, check_selection, distances_at_ranks,
                                      distances_at_ranks_queued, distances_at_ranks_spread, knn_distances)
from ..profile import IDResult, IDScale
from .id_bootstrap import (Groups, check_bootstrap, default_seed, gride_replicates, group_codes,
                           interval, twonn_replicates)
from .uncertainty import seed_record
from .duplicates import (check_tol, dedup_with_distances, deduplicate, duplicate_keys,
                         exact_first_occurrences, row_hashes, usable_ranks)

logger = logging.getLogger(__name__)

__all__ = ["intrinsic_dimension", "intrinsic_dimension_layers", "deduplicate", "duplicate_keys",
           "knn_distances",
           "twonn_mle", "twonn_linear_fit", "gride_mle", "gride_scales", "shared_gride_scale",
           "at_scale", "at_shared_scale", "twonn_bootstrap", "gride_bootstrap"]

ESTIMATORS = ("twonn", "gride")


# --------------------------------------------------------------------------- estimators on ratios
def _log_ratios(mu: Any, what: str) -> np.ndarray:
    m = np.asarray(mu, dtype=np.float64).ravel()
    if m.size == 0 or not np.all(np.isfinite(m)) or np.any(m < 1.0):
        raise InputDataError(f"{what}: the distance ratios must be finite and ≥ 1 "
                             "(duplicate points left in? deduplicate them first)")
    return np.log(m)


def twonn_mle(mu: Any) -> tuple[float, float]:
    """TwoNN maximum-likelihood dimension from the ratios μ_i = r2/r1 (Facco et al. 2017).

    Returns ``(d, error)`` with d = (N − 1)/Σ log μ_i (unbiased under the Pareto law) and
    error = d/sqrt(N − 2), the exact standard deviation of that estimator with d̂ plugged in.
    """
    x = _log_ratios(mu, "TwoNN")
    n = x.size
    total = float(x.sum())
    if n < 3:
        raise InputDataError(f"TwoNN needs at least 3 ratios, got {n}")
    if total <= 0.0:
        raise InputDataError("TwoNN: every point is as far from its second neighbour as from its "
                             "first (all ratios are 1); the dimension is undefined")
    d = (n - 1) / total
    return d, d / math.sqrt(n - 2)


def twonn_linear_fit(mu: Any, discard_fraction: float = 0.1) -> float:
    """Slope of the zero-intercept least-squares line of −log(1 − F_emp(μ)) on log μ (Facco et al.
    2017), after discarding the largest ``discard_fraction`` of the ratios; F_emp(μ_(i)) = i/N for the
    i-th smallest ratio, i ≤ ⌊N (1 − discard_fraction)⌋ (as scikit-dimension's TwoNN); the largest
    ratio is always left out, its −log(1 − N/N) being infinite."""
    _check_fraction(discard_fraction)
    x = np.sort(_log_ratios(mu, "TwoNN"))
    n = x.size
    keep = min(int(n * (1.0 - discard_fraction)), n - 1)  # −log(1 − N/N) is infinite
    if keep < 2:
        raise InputDataError(f"TwoNN line fit: only {keep} ratios left after discarding "
                             f"{discard_fraction:.0%} of {n}; give more points")
    x = x[:keep]
    y = -np.log1p(-np.arange(1, keep + 1, dtype=np.float64) / n)
    sxx = float(np.dot(x, x))
    if sxx == 0.0:
        raise InputDataError("TwoNN line fit: all kept ratios are 1; the dimension is undefined")
    return float(np.dot(x, y)) / sxx


def _gride_score(x: np.ndarray, n1: int, n2: int) -> tuple[Callable[[float], float],
                                                            Callable[[float], float]]:
    n = x.size
    sx = float(x.sum())
    a = n2 - n1 - 1

    def score(d: float) -> float:
        s = (n - 1) / d - (n2 - 1) * sx
        if a:
            s += a * float(np.sum(x / -np.expm1(-d * x)))
        return s

    def info(d: float) -> float:
        i = (n - 1) / d ** 2
        if a:
            with np.errstate(over="ignore"):
                i += a * float(np.sum((x / (2.0 * np.sinh(0.5 * d * x))) ** 2))
        return i

    return score, info


def gride_mle(mu: Any, n1: int, n2: Optional[int] = None) -> tuple[float, float]:
    """GRIDE maximum-likelihood dimension from the ratios μ_i = r_n2/r_n1 (Denti et al. 2022).

    Solves the score equation (module docstring) by a bisection-safeguarded Newton iteration in
    float64. Returns ``(d, error)`` with error = 1/sqrt(observed Fisher information at d).
    For n1 = 1, n2 = 2 this is exactly :func:`twonn_mle`'s d, with error d/sqrt(N − 1).
    """
    n2 = 2 * n1 if n2 is None else n2
    if not (_is_int(n1) and _is_int(n2) and 1 <= n1 < n2):
        raise InputDataError(f"GRIDE needs integers 1 ≤ n1 < n2, got n1={n1!r}, n2={n2!r}")
    x = _log_ratios(mu, f"GRIDE (n1={n1})")
    ties = int(np.sum(x == 0.0))
    if ties:
        logger.info("GRIDE (n1=%d, n2=%d): %d tied distances (ratio 1) left out", n1, n2, ties)
        x = x[x > 0.0]
    if x.size < 3:
        raise InputDataError(f"GRIDE (n1={n1}): fewer than 3 usable ratios")
    score, info = _gride_score(x, n1, n2)
    lo, hi = 1.0, 1.0
    while score(hi) > 0.0:
        lo, hi = hi, hi * 2.0
        if hi > 1e12:
            raise InputDataError(f"GRIDE (n1={n1}): the likelihood has no finite maximum")
    while score(lo) < 0.0:
        lo, hi = lo * 0.5, lo
        if lo < 1e-12:
            raise InputDataError(f"GRIDE (n1={n1}): the likelihood has no positive maximum")
    d = 0.5 * (lo + hi)
    for _ in range(200):
        s = score(d)
        if s > 0.0:
            lo = d
        elif s < 0.0:
            hi = d
        else:
            break
        step = s / info(d)
        new = d + step
        if not lo < new < hi:
            new = 0.5 * (lo + hi)
        if abs(new - d) <= 1e-14 * d or hi - lo <= 1e-14 * hi:
            d = new
            break
        d = new
    return d, 1.0 / math.sqrt(info(d))


def twonn_bootstrap(mu: Any, groups: Any = None, *, n_boot: int, seed: Any = None,
                    discard_fraction: float = 0.1, device: Optional[str | torch.device] = None) -> np.ndarray:
    """Block-bootstrap replicates of the TwoNN estimates from the full sample's ratios μ_i = r2/r1
    (Facco et al. 2017; rule in :mod:`geoprobe.probes.id_bootstrap`): whole groups drawn with
    replacement, each replicate's line fit (:func:`twonn_linear_fit`) and MLE (:func:`twonn_mle`)
    computed on the drawn points' ratios, repeated as often as their group was drawn.

    Args:
        mu: the N ratios, finite and ≥ 1.
        groups: one integer label per ratio (e.g. the document of each position); None makes every
            point its own group.
        n_boot: number of replicates, 2 … 100,000.
        seed: seed of ``numpy.random.default_rng`` (integer ≥ 0, ``SeedSequence`` or None).
        discard_fraction: fraction of the largest ratios left out of the line fit, in [0, 1).
        device: where the replicates run: None (numpy on the host) or a torch device such as
            'cuda' (float64 torch; the same draws, equal to rounding).

    Returns:
        (n_boot, 2) float64 array: column 0 the line fit, column 1 the MLE of every replicate (NaN
        where undefined, e.g. fewer than 3 points drawn).
    """
    _check_fraction(discard_fraction)
    check_bootstrap(n_boot, seed, 0.95)
    x = _log_ratios(mu, "TwoNN bootstrap")
    return twonn_replicates(x, group_codes(groups, x.size), n_boot, seed, discard_fraction, device=device)


def gride_bootstrap(mus: Mapping[int, Any], groups: Any = None, *, n_boot: int,
                    seed: Any = None, device: Optional[str | torch.device] = None) -> dict[int, np.ndarray]:
    """Block-bootstrap replicates of the GRIDE estimate at every scale (Denti et al. 2022), the same
    drawn groups at every scale; each replicate is :func:`gride_mle` of the drawn points' ratios.

    Args:
        mus: for each scale n1 (n2 = 2·n1), the ratios μ_i = r_n2(i)/r_n1(i) of the same N points.
        groups, n_boot, seed, device: as for :func:`twonn_bootstrap`.

    Returns:
        {n1: (n_boot,) float64 replicate estimates (NaN where undefined)}.
    """
    check_bootstrap(n_boot, seed, 0.95)
    if not mus or not all(_is_int(n1) and n1 >= 1 for n1 in mus):
        raise InputDataError(f"gride_bootstrap needs ratios keyed by scales n1 ≥ 1, got {list(mus)!r}")
    xs = {int(n1): _log_ratios(mu, f"GRIDE bootstrap (n1={n1})") for n1, mu in mus.items()}
    starts = {int(n1): gride_mle(mu, int(n1), 2 * int(n1))[0] for n1, mu in mus.items()}
    size = next(iter(xs.values())).size
    return gride_replicates(xs, group_codes(groups, size), n_boot, seed, starts, device=device)


def gride_scales(n_points: int, n1_max: Optional[int] = None) -> list[int]:
    """Default GRIDE scales: n1 = 1, 2, 4, … with n1 ≤ n1_max (default 32) and 2·n1 ≤ N/10;
    n1 = 1 is always included (it needs N ≥ 3)."""
    cap = 32 if n1_max is None else n1_max
    if not _is_int(cap) or cap < 1:
        raise InputDataError(f"n1_max must be a positive integer, got {n1_max!r}")
    out, n1 = [1], 2
    while n1 <= cap and 2 * n1 * 10 <= n_points:
        out.append(n1)
        n1 *= 2
    return out


def shared_gride_scale(results: Sequence[Optional[IDResult]]) -> tuple[int, str]:
    """One GRIDE scale n1 for every result of a model (its layers), by the flatness of the pooled
    ID-versus-scale curves.

    Denti et al. (2022) read the intrinsic dimension where the estimate stops changing with the
    scale: at small n1 noise and duplicates pull it around, at large n1 the curvature of the data
    does; a plateau between them is the dimension. Comparing layers needs one common scale
    (METHODS.md §3b), so the rule pools the curves. Over the scales every result has, sorted
    n1_1 < n1_2 < …, the relative change of a curve at n1_k (k ≥ 2) is
    |d(n1_k) − d(n1_(k−1))| / d(n1_k); the chosen n1 is the one minimising the median of that change
    over the results (the flattest point of the pooled curves), the smaller n1 on ties. When the
    results share a single scale (few points: only n1 = 1 fits n2 = 2·n1 ≤ N/10), that scale is used.

    Args:
        results: GRIDE results (``scales`` filled); None entries (failed layers) are ignored.

    Returns:
        ``(n1, reason)``, the reason one sentence quoting the pooled relative change.

    Raises:
        InputDataError: no GRIDE result, or a result without scales.
    """
    curves = [r for r in results if r is not None]
    if not curves:
        raise InputDataError("no GRIDE results to choose a scale from")
    if any(r.estimator != "gride" or not r.scales for r in curves):
        raise InputDataError("every result must be a GRIDE estimate with its scale curve (scales)")
    common = sorted(set.intersection(*({sc.n1 for sc in r.scales} for r in curves)))
    what = "its GRIDE scale curve" if len(curves) == 1 else f"the GRIDE scale curves of {len(curves)} layers"
    if not common:
        raise InputDataError("the GRIDE results have no scale n1 in common; estimate them at the same scales")
    if len(common) == 1:
        return common[0], (f"n1 = {common[0]}: the only scale of {what} (too few points for "
                           "n2 = 2·n1 ≤ N/10 at larger scales)")
    best: Optional[tuple[float, int, int]] = None
    for prev, n1 in zip(common, common[1:]):
        changes = []
        for r in curves:
            at = {sc.n1: sc.dimension for sc in r.scales}
            changes.append(abs(at[n1] - at[prev]) / at[n1])
        med = float(np.median(changes))
        if best is None or med < best[0]:
            best = (med, n1, prev)
    assert best is not None
    med, n1, prev = best
    return n1, (f"n1 = {n1}: the flattest point of {what} (median relative change "
                f"{med:.1%} from n1 = {prev}, the smallest over the common scales "
                f"{', '.join(map(str, common))})")


def at_scale(result: IDResult, n1: int, reason: str) -> IDResult:
    """``result`` with ``dimension``, ``error`` and the interval taken from its GRIDE scale ``n1``,
    and ``scale_n1``/``scale_rule`` recording the choice (``reason``)."""
    at = {sc.n1: sc for sc in result.scales}
    if n1 not in at:
        raise InputDataError(f"this GRIDE result has no scale n1={n1} (its scales: "
                             f"{sorted(at) or 'none'})")
    sc = at[n1]
    return dataclasses.replace(result, dimension=sc.dimension, error=sc.error, ci_low=sc.ci_low,
                               ci_high=sc.ci_high, scale_n1=n1, scale_rule=reason)


def at_shared_scale(results: Sequence[Optional[IDResult]]) -> list[Optional[IDResult]]:
    """Every GRIDE result at the one scale :func:`shared_gride_scale` picks for all of them (None
    entries stay None)."""
    n1, reason = shared_gride_scale(results)
    return [None if r is None else at_scale(r, n1, reason) for r in results]


# --------------------------------------------------------------------------- preparing the distances
class _Prepared:
    """Points left after deduplication and their exact distances to the neighbours of the requested
    ranks (float64 numpy, one column per rank)."""

    def __init__(self, points: torch.Tensor, ranks: list[int], dist: np.ndarray, n_input: int,
                 kept: np.ndarray):
        self.points = points
        self.column = {r: j for j, r in enumerate(ranks)}
        self.dist = dist
        self.n_input = n_input
        self.kept = kept  # the input rows of ``points``

    def r(self, rank: int) -> np.ndarray:
        """Distances of every point to its ``rank``-th nearest neighbour."""
        return self.dist[:, self.column[rank]]

    @property
    def n_points(self) -> int:
        return int(self.points.shape[0])

    @property
    def n_removed(self) -> int:
        return self.n_input - self.n_points


def _prepare(x64: torch.Tensor, ranks_for: Callable[[int], list[int]],
             tol: Optional[float], selection: Selection = None, spread: Any = None) -> _Prepared:
    n = x64.shape[0]
    if tol is None:
        if n < 3:
            raise InputDataError(f"need at least 3 points, got {n}")
        ranks = usable_ranks(ranks_for(n), n)
        if spread is None:
            dist, _ = distances_at_ranks(x64, ranks, selection_dtype=selection)
        else:
            dist, _ = distances_at_ranks_spread(x64, ranks, spread, selection_dtype=selection)
        zero = int((dist[:, 0] == 0.0).sum())
        if zero:
            raise InputDataError(f"{zero} points have an exact duplicate; pass dedup_tol (e.g. 1e-6) "
                                 "to remove duplicates first")
        return _Prepared(x64, ranks, dist.cpu().numpy(), n, np.arange(n))
    check_tol(tol)
    xu, ranks, dist, kept = dedup_with_distances(x64, tol, ranks_for, min_points=3,
                                                 selection=selection, spread=spread)
    assert dist is not None
    return _Prepared(xu, ranks, dist.cpu().numpy(), n, kept.cpu().numpy())


def mutual_pairs(prep: _Prepared) -> np.ndarray:
    """(P, 2) indices of the mutual first-neighbour pairs among the prepared points: two points
    whose exact first-neighbour distances r1 are equal, shared by no third point, and whose own
    distance is that r1 (each is the other's nearest neighbour). Their TwoNN ratios share r1, so
    the bootstrap keeps them in one block (module docstring). Values of r1 shared by three or more
    points (lattices, quantised data) are left unpaired."""
    r1 = prep.r(1)
    order = np.argsort(r1, kind="stable")
    v = r1[order]
    start = np.flatnonzero(np.r_[True, v[1:] != v[:-1]])
    size = np.diff(np.r_[start, v.size])
    two = start[size == 2]
    if two.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.stack([order[two], order[two + 1]], axis=1)
    idx = torch.from_numpy(pairs).to(prep.points.device)
    between = torch.linalg.vector_norm(prep.points[idx[:, 0]] - prep.points[idx[:, 1]], dim=1)
    ok = np.abs(between.cpu().numpy() - v[two]) <= 1e-12 * v[two]
    return pairs[ok]


# --------------------------------------------------------------------------- the probe
class _Options:
    """Validated options of one estimate, shared by the per-layer and all-layers entry points."""

    def __init__(self, estimator: str, n1_max: Optional[int], scales: Optional[Sequence[int]],
                 dedup_tol: Optional[float], discard_fraction: float, selection: Selection,
                 n_boot: int = 0, seed: Any = None, level: float = 0.95):
        if estimator not in ESTIMATORS:
            raise InputDataError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        _check_fraction(discard_fraction)
        check_selection(selection)
        check_bootstrap(n_boot, seed, level)
        self.n_boot, self.seed, self.level = int(n_boot), seed, float(level)
        self.explicit = None
        if estimator == "gride":
            if scales is not None:
                self.explicit = [int(v) for v in _check_scales(scales)]
            else:
                gride_scales(3, n1_max)  # validates n1_max before any work
        self.estimator, self.n1_max, self.scales = estimator, n1_max, scales
        self.dedup_tol, self.discard_fraction, self.selection = dedup_tol, discard_fraction, selection

    def fits(self, n: int) -> bool:
        """Whether ``n`` points can hold every explicit GRIDE scale (n2 = 2·n1 ≤ n − 1)."""
        return self.explicit is None or 2 * max(self.explicit) <= n - 1

    def check_fits(self, n: int) -> None:
        """Raise a clear error when an explicit GRIDE scale needs more neighbours than ``n`` points
        have (checked before the neighbour search, which cannot find a rank ≥ N)."""
        if not self.fits(n):
            n1 = max(self.explicit or [0])
            raise InputDataError(f"GRIDE scale n1={n1} needs n2 + 1 = {2 * n1 + 1} points (its "
                                 f"n2 = {2 * n1}-th neighbour), but only {n} points were given; "
                                 f"use scales n1 ≤ {max(1, (n - 1) // 2)}")

    def gride_use(self, n: int) -> list[int]:
        return self.explicit if self.explicit is not None else gride_scales(n, self.n1_max)

    def ranks_for(self, n: int) -> list[int]:
        if self.estimator == "twonn":
            return [1, 2]
        ranks = [r for n1 in self.gride_use(n) for r in (n1, 2 * n1)]
        if self.n_boot and 1 not in ranks:  # the bootstrap pairs mutual first neighbours (r1)
            ranks.insert(0, 1)
        return ranks

    def kwargs(self) -> dict[str, Any]:
        return dict(estimator=self.estimator, n1_max=self.n1_max, scales=self.scales,
                    dedup_tol=self.dedup_tol, discard_fraction=self.discard_fraction,
                    selection_dtype=self.selection, n_boot=self.n_boot, seed=self.seed,
                    level=self.level)


def _boot_device(prep: _Prepared) -> Optional[torch.device]:
    """Where the bootstrap replicates run: the CUDA device the neighbour search ran on, else the host
    (numpy)."""
    return prep.points.device if prep.points.device.type == "cuda" else None


def _estimate(prep: _Prepared, opts: _Options, backend: str, seconds: float,
              groups: Optional[Groups]) -> IDResult:
    """The estimate of ``opts.estimator`` from the prepared exact distances, with the block
    bootstrap over ``groups`` (the input rows' group codes; None: every point its own group) when
    ``opts.n_boot`` > 0; ``seconds`` (the time spent before) plus the time taken here."""
    t0 = time.perf_counter() - seconds
    boot = None
    if opts.n_boot:
        boot = (groups.take(prep.kept) if groups is not None
                else group_codes(None, prep.n_points)).with_pairs(mutual_pairs(prep))
    n_groups = boot.n_groups if boot is not None else 0
    level = opts.level if boot is not None else None
    if opts.estimator == "twonn":
        return _twonn(prep, opts, boot, backend, t0)
    n = prep.n_points
    use = opts.gride_use(n)
    if 2 * max(use) > n - 1:
        raise InputDataError(f"GRIDE scale n1={max(use)} needs n2 + 1 = {2 * max(use) + 1} points, "
                             f"only {n} distinct points are left; use smaller scales")
    mus = {n1: prep.r(2 * n1) / prep.r(n1) for n1 in use}
    fits = {n1: gride_mle(mus[n1], n1, 2 * n1) for n1 in use}
    reps = (gride_replicates({n1: np.log(mu) for n1, mu in mus.items()}, boot, opts.n_boot,
                             opts.seed, {n1: f[0] for n1, f in fits.items()}, device=_boot_device(prep))
            if boot is not None else {})
    results = []
    for n1 in use:
        d, err = fits[n1]
        lo = hi = None
        if boot is not None:
            err, lo, hi = interval(reps[n1], opts.level, f"GRIDE (n1={n1})")
        results.append(IDScale(n1=n1, n2=2 * n1, dimension=d, error=err,
                               radius=float(prep.r(2 * n1).mean()), ci_low=lo, ci_high=hi))
    base = IDResult(dimension=results[0].dimension, error=results[0].error, estimator="gride",
                    n_points=n, n_duplicates_removed=prep.n_removed, linear_fit_dimension=None,
                    scales=results, backend=backend, seconds=time.perf_counter() - t0, ci_level=level,
                    n_boot=opts.n_boot, n_groups=n_groups, dim=int(prep.points.shape[1]),
                    seed=seed_record(opts.seed) if boot is not None else None)
    n1, reason = shared_gride_scale([base])
    return at_scale(base, n1, reason)


def _twonn(prep: _Prepared, opts: _Options, boot: Optional[Groups], backend: str,
           t0: float) -> IDResult:
    """TwoNN: the line fit as ``dimension``, the MLE beside it, and the error and interval of the
    line fit (bootstrap, or the MLE's d/sqrt(N − 2) scaled to the line fit); ``t0`` the start time."""
    mu = prep.r(2) / prep.r(1)
    mle, _ = twonn_mle(mu)
    lin = twonn_linear_fit(mu, opts.discard_fraction)
    err, lo, hi = lin / math.sqrt(mu.size - 2), None, None
    kept: list[float] = []
    if boot is not None:
        reps = twonn_replicates(np.log(mu), boot, opts.n_boot, opts.seed, opts.discard_fraction,
                                device=_boot_device(prep))
        err, lo, hi = interval(reps[:, 0], opts.level, "TwoNN")
        kept = [float(f"{v:.6g}") for v in reps[:, 0]]
    return IDResult(dimension=lin, error=err, estimator="twonn", n_points=prep.n_points,
                    n_duplicates_removed=prep.n_removed, linear_fit_dimension=lin, scales=[],
                    backend=backend, seconds=time.perf_counter() - t0, mle_dimension=mle,
                    ci_low=lo, ci_high=hi,
                    ci_level=opts.level if boot is not None else None, n_boot=opts.n_boot,
                    n_groups=boot.n_groups if boot is not None else 0, replicates=kept,
                    dim=int(prep.points.shape[1]),
                    seed=seed_record(opts.seed) if boot is not None else None)


def intrinsic_dimension(x: Any, *, estimator: str = "twonn", n1_max: Optional[int] = None,
                        scales: Optional[Sequence[int]] = None, dedup_tol: Optional[float] = 1e-6,
                        discard_fraction: float = 0.1, selection_dtype: Selection = None,
                        device: Optional[str | torch.device] = None, groups: Any = None,
                        n_boot: int = 0, seed: Any = None, level: float = 0.95,
                        devices: Optional[Sequence[Any]] = None, process_group: Any = None) -> IDResult:
    """Intrinsic dimension of the points ``x`` (N × D) by TwoNN or GRIDE (module docstring).

    Args:
        x: points, numpy array or torch tensor, shape (N, D), finite.
        estimator: "twonn" (Facco et al. 2017) or "gride" (Denti et al. 2022).
        n1_max: largest GRIDE scale n1 of the default scale list (default 32).
        scales: explicit GRIDE scales n1 (n2 = 2·n1 each); overrides the default list.
        dedup_tol: duplicate tolerance relative to the data's RMS spread (see :func:`deduplicate`);
            0 removes exact copies only; None removes nothing and refuses data with exact copies.
        discard_fraction: fraction of the largest TwoNN ratios left out of the line fit.
        selection_dtype: precision of the neighbour-selection products (torch.float32, torch.float64
            or "3xtf32"; default "3xtf32" on CUDA, float32 on the CPU; see
            :mod:`geoprobe.backends.knn_certified`). The neighbour distances, hence the answer, do not depend on it.
        device: where the neighbour search runs (default: the tensor's device, else the CPU).
        groups: one integer label per row of ``x`` (e.g. the document index of each hidden-state
            position), the blocks of the bootstrap; None makes every point its own block.
        n_boot: bootstrap replicates (0: none, the analytic error only; else 2 … 100,000).
        seed: seed of the bootstrap's ``numpy.random.default_rng`` (integer, ``SeedSequence`` or
            None for fresh entropy).
        level: confidence level of the bootstrap percentile interval.
        devices: several devices (``["cuda:0", "cuda:1"]``) that share the neighbour search, one
            thread each: the candidate products' strips, then the query rows
            (:func:`~geoprobe.backends.knn_certified.distances_at_ranks_spread`); the points are copied
            to each, the estimate is formed on the first. ``device``, if given, must be the first.
        process_group: ``True`` (the default group) or a ``torch.distributed`` group whose processes
            share the neighbour search in the same way, each on the device of its ``x`` (or ``device``);
            every process passes the same points and gets the same result.

    Returns:
        :class:`IDResult`. TwoNN: ``dimension`` and ``linear_fit_dimension`` the paper's line fit,
        ``mle_dimension`` the unbiased MLE, ``scales`` empty. GRIDE: ``scales`` holds every
        (n1, n2, d, error, radius, interval) and ``dimension``/``error``/interval are those of the
        flattest scale of the curve (:func:`shared_gride_scale` on this one result), recorded in
        ``scale_n1`` and ``scale_rule``. ``error`` is the bootstrap standard error when
        ``n_boot`` > 0 (then ``ci_low``, ``ci_high``, ``ci_level``, ``n_boot``, ``n_groups`` are set),
        else the analytic one. ``n_points`` counts the points used after deduplication.

    Raises:
        InputDataError: NaN/inf, not 2-D, fewer than 3 distinct points, all points identical,
            groups of the wrong shape, fewer than 2 groups with a bootstrap, or invalid options.
        DeviceError: a device this machine does not have, both ``devices`` and ``process_group``, a
            ``device`` other than the first of ``devices``, or points that differ between the processes.

    The result is the same with ``devices`` or ``process_group`` as on one device (the first, or
    each process's own): every neighbour distance is a direct float64 distance of one pair.
    """
    t0 = time.perf_counter()
    opts = _Options(estimator, n1_max, scales, dedup_tol, discard_fraction, selection_dtype,
                    n_boot, seed, level)
    spread = _spread(x, device, devices, process_group)
    try:
        x64 = as_float64_points(x, device if spread is None else spread.home)
        n = int(x64.shape[0])
        grp = group_codes(groups, n) if groups is not None else None
        opts.check_fits(n)
        if hasattr(spread, "check_same"):
            spread.check_same(x64, "points")
        prep = _prepare(x64, opts.ranks_for, dedup_tol, selection_dtype, spread)
    except torch.OutOfMemoryError:
        raise InputDataError(gpu_memory_message(tuple(getattr(x, "shape", ())), device, x)) from None
    backend = x64.device.type if spread is None else f"{x64.device.type} ({spread.describe()})"
    return _estimate(prep, opts, backend, time.perf_counter() - t0, grp)


def _spread(x: Any, device: Optional[str | torch.device], devices: Optional[Sequence[Any]],
            process_group: Any) -> Any:
    """The spread of the neighbour search (:mod:`geoprobe.backends.spread`), None for one device."""
    from ..backends.spread import spread_for
    from ..errors import DeviceError

    home = torch.device(device) if device is not None else (x.device if isinstance(x, torch.Tensor) else None)
    spread = spread_for(devices, process_group, home)
    if spread is not None and devices is not None and device is not None and torch.device(device) != spread.home:
        raise DeviceError(f"device={device!r} is not the first of devices={list(devices)!r}; the points are "
                          "gathered on the first device (leave device out)")
    return spread


GPU_BYTES_PER_ENTRY = 40
"""GPU memory of the neighbour search per input entry: the float64 copy, the centred float32 copy with
its TF32 hi/lo split and the deduplication temporaries (the row-block products are extra, a few GiB)."""


def gpu_memory_message(shape: tuple, device: Any = None, x: Any = None) -> str:
    """The error for a point set whose neighbour search ran out of GPU memory: its size, the memory it
    needs and the largest number of points of that width that fits in what is free now."""
    n, d = (int(shape[0]), int(shape[1])) if len(shape) == 2 else (0, 0)
    need = n * d * GPU_BYTES_PER_ENTRY
    free = None
    dev = device if device is not None else getattr(x, "device", None)
    if torch.cuda.is_available() and dev is not None and torch.device(dev).type == "cuda":
        from ..runtime import cuda_free_bytes

        free = cuda_free_bytes(dev)
    text = f"intrinsic dimension of {n:,} points × {d:,} coordinates ran out of GPU memory (about {need / 2 ** 30:.1f} GiB needed"
    if free is not None and d > 0:
        text += f", {free / 2 ** 30:.1f} GiB free: about {free // (d * GPU_BYTES_PER_ENTRY):,} points of this width fit"
    return text + "); subsample the points or pass a CPU array (device='cpu')"


ON_ERROR = ("raise", "skip")
_GROUP_ELEMENTS = 1 << 29  # float64 entries of the layers held on the device at once (4 GiB)


def intrinsic_dimension_layers(layers: Any, *, estimator: str = "twonn",
                               n1_max: Optional[int] = None, scales: Optional[Sequence[int]] = None,
                               dedup_tol: Optional[float] = 1e-6, discard_fraction: float = 0.1,
                               selection_dtype: Selection = None,
                               device: Optional[str | torch.device] = None, on_error: str = "raise",
                               progress: Any = None, groups: Any = None, n_boot: int = 0,
                               seed: Any = None, level: float = 0.95) -> list[Optional[IDResult]]:
    """Intrinsic dimension of every layer in one call: ``[intrinsic_dimension(x, ...) for x in
    layers]`` with equal results (every field but ``seconds``), faster on CUDA (module docstring);
    for GRIDE every layer is then headlined at the one scale :func:`shared_gride_scale` picks from
    all layers' curves (:func:`at_shared_scale` of that list).

    Args:
        layers: a sequence of (N_l, D_l) point sets (numpy arrays or torch tensors; read one at a time
            on the CPU) or one (L, N, D) array or tensor.
        estimator, n1_max, scales, dedup_tol, discard_fraction, selection_dtype, n_boot, level: as
            for :func:`intrinsic_dimension`, the same for every layer.
        groups: the bootstrap's blocks: one integer label per row shared by every layer (a 1-D
            array, when all layers hold the same rows), or one such array per layer (a sequence of
            1-D arrays, or a 2-D (L, N) array); None makes every point its own block.
        seed: the bootstrap's seed, the same for every layer, so that layers with the same groups
            resample the same groups in every replicate (paired replicates); None draws one fresh
            ``SeedSequence`` for the call.
        device: where to compute. Default: the layers' CUDA device when every layer is a tensor on
            it, else each layer where :func:`intrinsic_dimension` would put it (the CPU for arrays).
            On CUDA the layers are copied to the GPU in groups of at most 2²⁹ float64 entries.
        on_error: "raise" raises the :class:`InputDataError` of the first unusable layer, its message
            prefixed with "layer i: "; "skip" logs a warning and gives None for that layer.
        progress: optional object with an ``update(n)`` method, called as layers are finished.

    Returns:
        One :class:`IDResult` (or None, with ``on_error="skip"``) per layer, in order. On CUDA a
        layer on the queued path reports as ``seconds`` its group's time divided by the number of
        such layers; a layer recomputed on its own reports that call's time.
    """
    opts = _Options(estimator, n1_max, scales, dedup_tol, discard_fraction, selection_dtype,
                    n_boot, default_seed(seed) if n_boot else seed, level)
    if dedup_tol is not None:
        check_tol(dedup_tol)
    if on_error not in ON_ERROR:
        raise InputDataError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    items = _layer_items(layers)
    per_layer = _layer_groups(groups, items)
    dev = _layers_device(items, device)
    if dev is None or dev.type != "cuda":
        out: list[Optional[IDResult]] = []
        for i in range(len(items)):
            try:
                out.append(intrinsic_dimension(items[i], device=device, groups=per_layer[i],
                                               **opts.kwargs()))
            except InputDataError as exc:
                out.append(_layer_failed(i, exc, opts, on_error))
            if progress is not None:
                progress.update(1)
        return _shared(out, opts)
    try:
        return _shared(_layers_batched(items, dev, opts, on_error, progress, per_layer), opts)
    except torch.OutOfMemoryError:
        shapes = [tuple(getattr(t, "shape", ())) for t in items]
        largest = max(shapes, key=lambda sh: sh[0] * sh[1] if len(sh) == 2 else 0)
        raise InputDataError(gpu_memory_message(largest, dev)) from None


def _shared(results: list[Optional[IDResult]], opts: _Options) -> list[Optional[IDResult]]:
    """GRIDE results at one shared scale; TwoNN results (and an all-failed list) unchanged."""
    if opts.estimator != "gride" or all(r is None for r in results):
        return results
    return at_shared_scale(results)


def _layer_groups(groups: Any, items: Sequence[Any]) -> list[Any]:
    """Each layer's group labels (None for none), checked against its number of rows."""
    n_layers = len(items)
    if groups is None:
        return [None] * n_layers
    per: Sequence[Any]
    if isinstance(groups, (list, tuple)) and groups and np.ndim(groups[0]) == 1:
        per = groups
    else:
        arr = np.asarray(groups)
        if arr.ndim == 2:
            per = list(arr)
        elif arr.ndim == 1:
            per = [arr] * n_layers
        else:
            raise InputDataError("groups must be one 1-D array of labels shared by every layer or "
                                 f"one per layer, got an array of shape {arr.shape}")
    if len(per) != n_layers:
        raise InputDataError(f"groups holds labels for {len(per)} layers, but {n_layers} layers were given")
    for i, (g, x) in enumerate(zip(per, items)):
        n = int(getattr(x, "shape", (len(x),))[0])
        try:
            group_codes(g, n)
        except InputDataError as exc:
            raise InputDataError(f"layer {i}: {exc}") from exc
    return list(per)


def _layer_items(layers: Any) -> Sequence[Any]:
    if isinstance(layers, (torch.Tensor, np.ndarray)):
        if layers.ndim != 3:
            raise InputDataError("layers must be a sequence of (N, D) point sets or one (L, N, D) "
                                 f"array, got an array of shape {tuple(layers.shape)}")
        items: Sequence[Any] = [layers[i] for i in range(layers.shape[0])]
    elif isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise InputDataError("layers must be a sequence of (N, D) point sets or one (L, N, D) array, "
                             f"got {type(layers).__name__}")
    else:
        items = layers if isinstance(layers, Sequence) else list(layers)
    if len(items) == 0:
        raise InputDataError("no layers given")
    return items


def _layers_device(items: Sequence[Any], device: Optional[str | torch.device]
                   ) -> Optional[torch.device]:
    """The device of the batched path (a CUDA device), or what the per-layer loop was given."""
    if device is not None:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise InputDataError(f"device {str(dev)!r} was requested but CUDA is not available; "
                                 "pass device='cpu'")
        return dev
    first = items[0]
    if not (isinstance(first, torch.Tensor) and first.is_cuda):
        return None
    if all(isinstance(t, torch.Tensor) and t.device == first.device for t in items):
        return first.device
    return None


def _layer_failed(i: int, exc: InputDataError, opts: _Options, on_error: str) -> None:
    if on_error == "raise":
        raise InputDataError(f"layer {i}: {exc}") from exc
    logger.warning("layer %d: %s skipped: %s", i, opts.estimator, exc)
    return None


def _layers_batched(items: Sequence[Any], dev: torch.device, opts: _Options, on_error: str,
                    progress: Any, groups: Optional[Sequence[Any]] = None) -> list[Optional[IDResult]]:
    """The CUDA path of :func:`intrinsic_dimension_layers`, in groups of layers (device-agnostic
    code: it runs on the CPU too, where it gives the same answers as the loop)."""
    out: list[Optional[IDResult]] = [None] * len(items)
    i = 0
    while i < len(items):
        group: list[tuple[int, Optional[torch.Tensor], Any]] = []
        size = 0
        while i < len(items) and (not group or size < _GROUP_ELEMENTS):
            try:
                x64 = as_float64_points(items[i], dev, check_finite=False)
                size += x64.numel()
                group.append((i, x64, None))
            except InputDataError as exc:
                group.append((i, None, exc))
            i += 1
        for j, res in _group_results(group, dev, opts, groups):
            if isinstance(res, InputDataError):
                res = _layer_failed(j, res, opts, on_error)
            out[j] = res
        if progress is not None:
            progress.update(len(group))
    return out


def _group_results(group: list[tuple[int, Optional[torch.Tensor], Any]], dev: torch.device,
                   opts: _Options, groups: Optional[Sequence[Any]]) -> list[tuple[int, Any]]:
    """(layer index, IDResult or InputDataError) for one group; two host synchronisations for the
    layers on the fast path, :func:`intrinsic_dimension` for the others."""
    t0 = time.perf_counter()
    done: dict[int, Any] = {j: err for j, _, err in group if err is not None}
    live = [(j, x) for j, x, err in group if x is not None]
    queued, slow = _queue_distances(live, _screen(live, dev, opts.dedup_tol), opts)
    fast, failed = _certified(queued)
    slow.extend(failed)
    share = (time.perf_counter() - t0) / max(1, len(fast))
    labels = (lambda j: None) if groups is None else (lambda j: groups[j])
    for j, prep in fast:
        try:
            g = labels(j)
            grp = group_codes(g, prep.n_input) if g is not None else None
            done[j] = _estimate(prep, opts, dev.type, share, grp)
        except InputDataError as exc:
            done[j] = exc
    xs = dict(live)
    for j in slow:
        logger.debug("layer %d: recomputed on its own", j)
        try:
            done[j] = intrinsic_dimension(xs[j], device=dev, groups=labels(j), **opts.kwargs())
        except InputDataError as exc:
            done[j] = exc
    return sorted(done.items())


def _screen(live: list[tuple[int, torch.Tensor]], dev: torch.device,
            tol: Optional[float]) -> np.ndarray:
    """(finite, has exact duplicates) of every layer: queued on the device, read in one host
    synchronisation. The duplicate flag is a repeated row hash (False when nothing is removed)."""
    flags = []
    for _, x in live:
        finite = torch.isfinite(x).all()
        clash = torch.zeros((), dtype=torch.bool, device=dev)
        if tol is not None and x.shape[0] > 1:
            h = torch.sort(row_hashes(x)).values
            clash = (h[1:] == h[:-1]).any()
        flags.append(torch.stack([finite, clash]))
    return torch.stack(flags).cpu().numpy() if flags else np.zeros((0, 2), bool)


def _queue_distances(live: list[tuple[int, torch.Tensor]], host: np.ndarray, opts: _Options
                     ) -> tuple[list[tuple], list[int]]:
    """Queue the selection, candidate distances and certificate of every usable layer (exact copies
    removed first); the others (not finite, fewer than 3 distinct rows) go to the slow list.
    Returns (queued (j, points, n input rows, ranks, distances, certificate, kept input rows or None
    for all), slow layer indices)."""
    queued, slow = [], []
    for (j, x), (finite, clash) in zip(live, host):
        n = x.shape[0]
        if not finite or n < 3 or not opts.fits(n):
            slow.append(j)
            continue
        xu, kept = x, None
        if clash:
            first = exact_first_occurrences(x)
            if first.numel() < 3:
                slow.append(j)
                continue
            if first.numel() < n:
                xu, kept = x[first], first
        nu = xu.shape[0]
        ranks = usable_ranks(opts.ranks_for(nu), nu)
        tau: float | torch.Tensor = 0.0
        if opts.dedup_tol is not None:
            tau = opts.dedup_tol * torch.sqrt(xu.var(dim=0, correction=0).sum())
        dist, ok = distances_at_ranks_queued(xu, ranks, min_distance=tau,
                                             selection_dtype=opts.selection)
        queued.append((j, xu, n, ranks, dist, ok, kept))
    return queued, slow


def _certified(queued: list[tuple]) -> tuple[list[tuple[int, _Prepared]], list[int]]:
    """Every certificate and every layer's distances copied to the host in one copy each (the second
    synchronisation); the layers whose certificate holds, prepared, and those whose does not."""
    if not queued:
        return [], []
    oks = torch.stack([q[5] for q in queued]).cpu().numpy()
    flat = torch.cat([q[4].reshape(-1) for q in queued]).cpu().numpy()
    pos = 0
    fast, failed = [], []
    for (j, xu, n, ranks, dist, _, kept), ok in zip(queued, oks):
        size = dist.numel()
        if ok:
            rows = np.arange(n) if kept is None else kept.cpu().numpy()
            fast.append((j, _Prepared(xu, ranks, flat[pos:pos + size].reshape(dist.shape), n, rows)))
        else:
            failed.append(j)
        pos += size
    return fast, failed


# --------------------------------------------------------------------------- validation
def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _check_fraction(f: Any) -> None:
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f < 1.0:
        raise InputDataError(f"discard_fraction must be a number in [0, 1), got {f!r}")


def _check_scales(scales: Sequence[int]) -> list[int]:
    try:
        vals = list(scales)
    except TypeError:
        raise InputDataError(f"scales must be a sequence of integers n1 ≥ 1, got {scales!r}") from None
    if not vals or not all(_is_int(v) and v >= 1 for v in vals):
        raise InputDataError(f"scales must be a non-empty sequence of integers n1 ≥ 1, got {scales!r}")
    return sorted(set(int(v) for v in vals))
