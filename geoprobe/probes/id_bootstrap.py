"""Block bootstrap of the TwoNN and GRIDE intrinsic-dimension estimates over groups of points.

Hidden-state positions of one document are correlated, so the points are resampled in whole groups
(documents), as METHODS.md §3b asks: with G groups, one replicate draws G groups uniformly with
replacement, every point of a drawn group enters the replicate once per draw, and the estimator is
recomputed on the per-point ratios of the replicate. The neighbour distances, hence the ratios
μ_i = r_n2(i)/r_n1(i), are those of the full sample and are not recomputed (the bootstrap of Facco
et al. 2017's and Denti et al. 2022's estimators as functions of the ratios; recomputing neighbours
inside a resample with repeated points would give zero distances). A point drawn w times weighs w:

* TwoNN MLE: d = (M − 1)/Σ w_i log μ_i with M = Σ w_i the replicate's size;
* TwoNN line fit (Facco et al. 2017, discarding the largest fraction f): the replicate's ratios
  sorted, the k = min(⌊M (1 − f)⌋, M − 1) smallest kept, F_emp = j/M at the j-th; a point filling
  sorted positions a+1 … b (capped at k) adds log μ_i · Σ_(j=a+1..b) −log(1 − j/M)
  = log μ_i · ((b − a) log M + lnΓ(M − b) − lnΓ(M − a)) to Σ x y and (b − a) (log μ_i)² to Σ x²;
* GRIDE at (n1, n2): the root of the weighted score
  s(d) = (M − 1)/d + (n2 − n1 − 1) Σ w_i log μ_i/(1 − μ_i^(−d)) − (n2 − 1) Σ w_i log μ_i
  (ratios equal to 1 left out, as in the full-sample estimate), by a Newton iteration safeguarded by
  bisection, vectorised over the replicates.

Mutual first neighbours. Two points that are each other's nearest neighbour share r1, so their
ratios are positively correlated; about 55–60 % of the points of uniform samples are in such pairs,
and the variance of the mean log-ratio is then about 1.6 times what independent ratios would give
(flat 2- to 8-dimensional tori, N = 1000). Resampling groups that split such pairs understates the
spread: on the flat 3-torus (N = 1000, 50 arbitrary groups of 20) the nominal 95 % interval of the
TwoNN line fit covered the dimension in 83 % of 200 samples. The blocks are therefore the given groups
with both points of every mutual pair put in the group of the pair's smaller group code
(:func:`geoprobe.probes.intrinsic_dim.mutual_pairs` finds the pairs from the exact distances);
the same samples then gave 94 %. For GRIDE at n1 ≥ 4 the n2-neighbourhoods of nearby points overlap
more widely than pairs; there the bootstrap standard error was 10–30 % below the spread over
independent samples (same torus, n1 = 4 … 16), so read those intervals as somewhat narrow.

Each replicate equals the full-sample estimator applied to the replicate's ratios with repetitions
(the tests check this by brute force). The interval is the percentile interval at ``level``
(the (1 − level)/2 and (1 + level)/2 quantiles of the replicate estimates, numpy's linear
interpolation) and the standard error their standard deviation (ddof = 1); replicates whose
estimate is undefined (fewer than 3 points, all ratios 1) are left out and logged.

Randomness comes from ``numpy.random.default_rng(seed)`` (an integer, a ``SeedSequence`` or None).
The draws depend only on the seed and the number of groups, so two point sets with the same groups
and seed (the layers of one model) get the same documents in every replicate: their replicate
estimates are paired. Memory stays bounded whatever ``n_boot``: the draws are made in chunks of at
most 2²² group counts and the point weights in chunks of at most 2²² entries (32 MiB of float64).

Where the replicates run. With ``device`` a CUDA device (the device the neighbour search ran on), the
group counts are still drawn on the host by the same generator, so the draws do not depend on the
device, and the weights and the estimators run in float64 on that device (torch). The CPU keeps the
numpy path. The two agree to rounding (the tests compare them on the CPU through the torch path too).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Mapping, Optional, Union

import numpy as np
import torch
from scipy.special import gammaln

from ..errors import InputDataError
from .uncertainty import MAX_BOOT, check_level, check_n_boot, percentile_interval

logger = logging.getLogger(__name__)

__all__ = ["MAX_BOOT", "Groups", "check_bootstrap", "group_codes", "twonn_replicates",
           "gride_replicates", "interval", "default_seed"]

"""Largest ``n_boot``: memory does not grow with it (chunks of 32 MiB), time does linearly."""
_DRAW_ENTRIES = 1 << 22    # group counts drawn at once (depends on the number of groups only)
_WEIGHT_ENTRIES = 1 << 22  # replicate × point weights held at once


class Groups:
    """Points' group codes 0 … G − 1 (G = the number of distinct labels given, including groups
    none of whose points are used) and G."""

    def __init__(self, codes: np.ndarray, n_groups: int):
        self.codes = codes
        self.n_groups = n_groups

    def take(self, rows: np.ndarray) -> "Groups":
        """The codes of the rows ``rows`` (the points kept after deduplication); G unchanged."""
        return Groups(self.codes[rows], self.n_groups)

    def with_pairs(self, pairs: np.ndarray) -> "Groups":
        """The codes with both points of every pair (rows of a (P, 2) index array) in the group of
        the pair's smaller code; G unchanged."""
        codes = self.codes.copy()
        if pairs.size:
            low = np.minimum(codes[pairs[:, 0]], codes[pairs[:, 1]])
            codes[pairs[:, 0]] = low
            codes[pairs[:, 1]] = low
        return Groups(codes, self.n_groups)

    @property
    def n_used(self) -> int:
        """Groups holding at least one point."""
        return int(np.unique(self.codes).size)


def group_codes(groups: Any, n: int) -> Groups:
    """Validate one integer label per row (``n`` rows) and code the labels 0 … G − 1 in sorted order;
    ``None`` makes every row its own group."""
    if groups is None:
        return Groups(np.arange(n, dtype=np.int64), n)
    g = np.asarray(groups)
    if g.ndim != 1 or g.shape[0] != n:
        raise InputDataError(f"groups must hold one integer label per row: a 1-D array of {n} labels, "
                             f"got shape {g.shape}")
    if not (np.issubdtype(g.dtype, np.integer) or g.dtype == np.bool_):
        raise InputDataError(f"groups must be integer labels (e.g. the document index of each row), "
                             f"got dtype {g.dtype}")
    labels, codes = np.unique(g, return_inverse=True)
    return Groups(codes.reshape(-1).astype(np.int64), int(labels.size))


def check_bootstrap(n_boot: Any, seed: Any, level: Any) -> None:
    """Refuse an ``n_boot`` that is not 0 or 2 … :data:`MAX_BOOT` (the replicates run in chunks of
    32 MiB whatever ``n_boot``, so time, not memory, is the limit), a seed that is not None, an
    integer ≥ 0 or a ``numpy.random.SeedSequence``, and a level outside (0, 1)."""
    if not (isinstance(n_boot, (int, np.integer)) and not isinstance(n_boot, bool) and n_boot == 0):
        check_n_boot(n_boot)
    ok_int = isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and seed >= 0
    if not (seed is None or ok_int or isinstance(seed, np.random.SeedSequence)):
        raise InputDataError(f"seed must be None, an integer ≥ 0 or a numpy.random.SeedSequence, "
                             f"got {seed!r}")
    check_level(level)


def _check_groups_usable(groups: Groups) -> None:
    if groups.n_groups < 2:
        raise InputDataError(f"the block bootstrap needs at least 2 groups, got {groups.n_groups}; "
                             "give at least 2 distinct labels in groups (e.g. 2 documents) or n_boot=0")
    if groups.n_used < 2:
        raise InputDataError(f"the points left after deduplication lie in {groups.n_used} group of "
                             f"{groups.n_groups}; the block bootstrap needs points in at least 2 "
                             "groups (or n_boot=0)")


Device = Optional[Union[str, torch.device]]


def _torch_device(device: Device) -> Optional[torch.device]:
    """The torch device the replicates run on, or None for the numpy path (None or a CPU device
    given as a string keeps numpy; ``torch.device('cpu')`` selects the torch path on the CPU)."""
    if device is None or (isinstance(device, str) and torch.device(device).type == "cpu"):
        return None
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputDataError(f"device {str(dev)!r} was requested for the bootstrap but CUDA is not "
                             "available; pass device=None")
    return dev


def _weights(groups: Groups, n_boot: int, rng: np.random.Generator, dev: Optional[torch.device] = None
             ) -> Iterator[Any]:
    """(b, N) float64 multiplicities of the points in consecutive replicates, n_boot rows in all
    (numpy arrays, or torch tensors on ``dev``). Replicate r draws G group indices uniformly with
    replacement; a point weighs the number of times its group was drawn. The draws depend on
    (rng, G, n_boot) only, never on the device."""
    g, n = groups.n_groups, groups.codes.size
    per_draw = max(1, _DRAW_ENTRIES // g)
    per_weight = max(1, _WEIGHT_ENTRIES // max(1, n))
    codes = torch.from_numpy(groups.codes).to(dev) if dev is not None else groups.codes
    done = 0
    while done < n_boot:
        b = min(per_draw, n_boot - done)
        draws = rng.integers(0, g, size=(b, g))
        counts = np.bincount((draws + g * np.arange(b)[:, None]).ravel(), minlength=b * g)
        counts = counts.reshape(b, g).astype(np.float64)
        if dev is not None:
            counts = torch.from_numpy(counts).to(dev)
        for s in range(0, b, per_weight):
            yield counts[s:s + per_weight][:, codes]
        done += b


def _run(groups: Groups, n_boot: int, seed: Any, stat: Callable[[Any], Any],
         dev: Optional[torch.device] = None) -> np.ndarray:
    check_bootstrap(n_boot, seed, 0.5)
    if n_boot == 0:
        raise InputDataError("n_boot must be at least 2 for a bootstrap")
    _check_groups_usable(groups)
    rng = np.random.default_rng(seed)
    parts = [stat(w) for w in _weights(groups, n_boot, rng, dev)]
    if dev is not None:
        return torch.cat(parts, dim=0).cpu().numpy()
    return np.concatenate(parts, axis=0)


# --------------------------------------------------------------------------- TwoNN
def _twonn_stats(x_sorted: np.ndarray, discard_fraction: float) -> Callable[[np.ndarray], np.ndarray]:
    """Replicate (line fit, MLE) from the weights of the points, ``x_sorted`` their log-ratios in
    increasing order (weights given in the same order)."""

    def stat(w: np.ndarray) -> np.ndarray:
        m = w.sum(axis=1)
        total = w @ x_sorted
        with np.errstate(divide="ignore", invalid="ignore"):
            mle = np.where((m >= 3) & (total > 0), (m - 1.0) / total, np.nan)
            keep = np.minimum(np.floor(m * (1.0 - discard_fraction)), m - 1.0)[:, None]
            c = np.cumsum(w, axis=1)
            hi = np.minimum(c, keep)
            lo = np.minimum(c - w, keep)
            mm = m[:, None]
            ysum = (hi - lo) * np.log(mm) + gammaln(np.maximum(mm - hi, 1.0)) \
                - gammaln(np.maximum(mm - lo, 1.0))
            sxy = (ysum * x_sorted).sum(axis=1)
            sxx = ((hi - lo) * x_sorted ** 2).sum(axis=1)
            lin = np.where((keep[:, 0] >= 2) & (sxx > 0), sxy / sxx, np.nan)
        return np.stack([lin, mle], axis=1)

    return stat


def _twonn_stats_torch(x_sorted: torch.Tensor, discard_fraction: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`_twonn_stats` in torch (float64, on the device of ``x_sorted``); the same formulas."""
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=x_sorted.device)

    def stat(w: torch.Tensor) -> torch.Tensor:
        m = w.sum(dim=1)
        total = w @ x_sorted
        mle = torch.where((m >= 3) & (total > 0), (m - 1.0) / total, nan)
        keep = torch.minimum(torch.floor(m * (1.0 - discard_fraction)), m - 1.0)[:, None]
        c = torch.cumsum(w, dim=1)
        hi = torch.minimum(c, keep)
        lo = torch.minimum(c - w, keep)
        mm = m[:, None]
        ysum = (hi - lo) * torch.log(mm) + torch.lgamma(torch.clamp(mm - hi, min=1.0)) \
            - torch.lgamma(torch.clamp(mm - lo, min=1.0))
        sxy = (ysum * x_sorted).sum(dim=1)
        sxx = ((hi - lo) * x_sorted ** 2).sum(dim=1)
        lin = torch.where((keep[:, 0] >= 2) & (sxx > 0), sxy / sxx, nan)
        return torch.stack([lin, mle], dim=1)

    return stat


def twonn_replicates(x: np.ndarray, grp: Groups, n_boot: int, seed: Any,
                     discard_fraction: float, device: Device = None) -> np.ndarray:
    """(n_boot, 2) replicate (line fit, MLE) of TwoNN from the log-ratios ``x`` = log μ_i (checked
    by the caller: finite, ≥ 0) of points coded ``grp``; NaN where a replicate's estimate is
    undefined. ``device``: where the replicates run (module docstring; None: numpy on the host)."""
    if grp.codes.size != x.size:
        raise InputDataError(f"groups label {grp.codes.size} points but there are {x.size} ratios")
    dev = _torch_device(device)
    order = np.argsort(x, kind="stable")
    sorted_groups = Groups(grp.codes[order], grp.n_groups)
    if dev is not None:
        stat = _twonn_stats_torch(torch.from_numpy(np.ascontiguousarray(x[order], dtype=np.float64)).to(dev),
                                  discard_fraction)
        return _run(sorted_groups, n_boot, seed, stat, dev)
    return _run(sorted_groups, n_boot, seed, _twonn_stats(x[order], discard_fraction))


# --------------------------------------------------------------------------- GRIDE
def _gride_solve(w: np.ndarray, x: np.ndarray, n1: int, n2: int, start: float) -> np.ndarray:
    """Root of the weighted GRIDE score for every row of weights ``w`` (log-ratios ``x`` > 0)."""
    a = n2 - n1 - 1
    m = w.sum(axis=1)
    sx = w @ x
    out = np.full(m.shape, np.nan)
    ok = (m >= 3) & (sx > 0)
    if a == 0:
        out[ok] = (m[ok] - 1.0) / ((n2 - 1) * sx[ok])
        return out
    w, m, sx = w[ok], m[ok], sx[ok]

    def score(d: np.ndarray) -> np.ndarray:
        return (m - 1.0) / d - (n2 - 1) * sx + a * (w * (x / -np.expm1(-d[:, None] * x))).sum(axis=1)

    def info(d: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            t = (x / (2.0 * np.sinh(0.5 * d[:, None] * x))) ** 2
        return (m - 1.0) / d ** 2 + a * (w * t).sum(axis=1)

    lo = np.full(m.shape, start)
    hi = lo.copy()
    for _ in range(60):
        up = score(hi) > 0.0
        if not up.any():
            break
        lo[up], hi[up] = hi[up], hi[up] * 2.0
    for _ in range(60):
        down = score(lo) < 0.0
        if not down.any():
            break
        hi[down], lo[down] = lo[down], lo[down] * 0.5
    d = 0.5 * (lo + hi)
    for _ in range(200):
        s = score(d)
        lo = np.where(s > 0.0, d, lo)
        hi = np.where(s < 0.0, d, hi)
        new = d + s / info(d)
        bad = ~((lo < new) & (new < hi))
        new[bad] = 0.5 * (lo[bad] + hi[bad])
        done = (np.abs(new - d) <= 1e-14 * d) | (hi - lo <= 1e-14 * hi) | (s == 0.0)
        d = np.where(s == 0.0, d, new)
        if done.all():
            break
    out[ok] = d
    return out


def _gride_solve_torch(w: torch.Tensor, x: torch.Tensor, n1: int, n2: int, start: float) -> torch.Tensor:
    """:func:`_gride_solve` in torch (float64, on the device of ``x``): the same safeguarded Newton
    iteration; the convergence test reads one flag back per iteration."""
    a = n2 - n1 - 1
    m = w.sum(dim=1)
    sx = w @ x
    out = torch.full_like(m, float("nan"))
    ok = (m >= 3) & (sx > 0)
    if a == 0:
        out[ok] = (m[ok] - 1.0) / ((n2 - 1) * sx[ok])
        return out
    w, m, sx = w[ok], m[ok], sx[ok]

    def score(d: torch.Tensor) -> torch.Tensor:
        return (m - 1.0) / d - (n2 - 1) * sx + a * (w * (x / -torch.expm1(-d[:, None] * x))).sum(dim=1)

    def info(d: torch.Tensor) -> torch.Tensor:
        t = (x / (2.0 * torch.sinh(0.5 * d[:, None] * x))) ** 2
        return (m - 1.0) / d ** 2 + a * (w * t).sum(dim=1)

    lo = torch.full_like(m, float(start))
    hi = lo.clone()
    for _ in range(60):
        up = score(hi) > 0.0
        if not bool(up.any()):
            break
        lo, hi = torch.where(up, hi, lo), torch.where(up, hi * 2.0, hi)
    for _ in range(60):
        down = score(lo) < 0.0
        if not bool(down.any()):
            break
        hi, lo = torch.where(down, lo, hi), torch.where(down, lo * 0.5, lo)
    d = 0.5 * (lo + hi)
    for _ in range(200):
        s = score(d)
        lo = torch.where(s > 0.0, d, lo)
        hi = torch.where(s < 0.0, d, hi)
        new = d + s / info(d)
        bad = ~((lo < new) & (new < hi))
        new = torch.where(bad, 0.5 * (lo + hi), new)
        done = (torch.abs(new - d) <= 1e-14 * d) | (hi - lo <= 1e-14 * hi) | (s == 0.0)
        d = torch.where(s == 0.0, d, new)
        if bool(done.all()):
            break
    out[ok] = d
    return out


def gride_replicates(xs: Mapping[int, np.ndarray], grp: Groups, n_boot: int, seed: Any,
                     starts: Mapping[int, float], device: Device = None) -> dict[int, np.ndarray]:
    """{n1: (n_boot,) replicate GRIDE estimates at (n1, 2·n1)} from each scale's log-ratios
    ``xs[n1]`` (checked by the caller) of the same points, coded ``grp``, the same resampled groups at
    every scale; ``starts[n1]`` starts the root search (the full-sample estimate). ``device``: where
    the replicates run (module docstring; None: numpy on the host)."""
    sizes = {x.size for x in xs.values()} | {grp.codes.size}
    if len(sizes) != 1:
        raise InputDataError("the ratios of every scale and the groups must belong to the same "
                             f"points; got sizes {sorted(sizes)}")
    start = {n1: float(starts[n1]) for n1 in xs}
    scales = sorted(xs)

    dev = _torch_device(device)
    if dev is not None:
        used = {n1: torch.from_numpy(np.flatnonzero(xs[n1] > 0.0)).to(dev) for n1 in scales}
        xt = {n1: torch.from_numpy(np.ascontiguousarray(xs[n1][xs[n1] > 0.0], dtype=np.float64)).to(dev)
              for n1 in scales}

        def stat_torch(w: torch.Tensor) -> torch.Tensor:
            return torch.stack([_gride_solve_torch(w[:, used[n1]], xt[n1], n1, 2 * n1, start[n1])
                                for n1 in scales], dim=1)

        reps = _run(grp, n_boot, seed, stat_torch, dev)
        return {n1: reps[:, j] for j, n1 in enumerate(scales)}

    def stat(w: np.ndarray) -> np.ndarray:
        cols = []
        for n1 in scales:
            x = xs[n1]
            use = x > 0.0  # ties (ratio 1) are left out of the likelihood
            cols.append(_gride_solve(w[:, use], x[use], n1, 2 * n1, start[n1]))
        return np.stack(cols, axis=1)

    reps = _run(grp, n_boot, seed, stat)
    return {n1: reps[:, j] for j, n1 in enumerate(scales)}


# --------------------------------------------------------------------------- summaries
def interval(reps: np.ndarray, level: float, what: str) -> tuple[float, float, float]:
    """(standard error, low, high) of the replicate estimates: their standard deviation (ddof = 1)
    and the percentile interval at ``level``; undefined replicates are left out and logged."""
    r = np.asarray(reps, dtype=np.float64)
    good = r[np.isfinite(r)]
    if good.size < r.size:
        logger.warning("%s: %d of %d bootstrap replicates undefined (too few points drawn), left out",
                       what, r.size - good.size, r.size)
    if good.size < 2:
        raise InputDataError(f"{what}: fewer than 2 bootstrap replicates are defined; give more "
                             "points per group or more groups")
    lo, hi = percentile_interval(good, level)
    return float(np.std(good, ddof=1)), lo, hi


def default_seed(seed: Any) -> Any:
    """``seed``, or a fresh ``SeedSequence`` when it is None (so one call's layers share draws)."""
    return np.random.SeedSequence() if seed is None else seed


