"""δ_rel of point sets against the three nulls, with bootstrap intervals and verdicts.

:func:`delta_vs_null` (``gp.delta_vs_null``) is the statistic behind every δ verdict of a profile:

1. the data come as sets — prompts, token samples, one document's hidden states — or as one cloud
   that is split into sets (one per ``groups`` label, or ``n_sets`` seeded random subsets);
2. every set X_i gets its own draws of each null (:mod:`geoprobe.probes.nulls`: own-covariance
   Gaussian, population Gaussian, resampled real points), with X_i's size and dimension, base point 0;
3. per null, the paired differences d_i = δ_rel(X_i) − δ_rel(null_i) are summarised by their mean with
   a percentile-bootstrap interval over sets, the share of sets below their null with its interval,
   and the bootstrap p-value of mean(d) = 0 (:mod:`geoprobe.probes.uncertainty`);
4. a null's verdict is "below" / "above" when p < α = 1 − level (after the correction across tests,
   :func:`correct_across`), else "within"; the headline verdict is the most conservative one: a
   direction only when every null agrees.

Rows repeated within a set (a token that occurs twice in a prompt) are one point of the metric space;
each set is deduplicated (first occurrences kept, in order) before δ, so the nulls match the number
of distinct points.

Seeds: ``numpy.random.SeedSequence(seed).spawn`` gives every set, every null kind, the split into
sets, the population fit and the bootstrap their own independent stream.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from ..errors import InputDataError
from ..profile import DeltaStat, NullComparison
from .nulls import (NULL_KINDS, NULL_NAMES, NULL_QUESTIONS, NullError, PopulationGaussian,
                    ResamplePool, check_kinds, own_gaussian)
from .uncertainty import (adjust_p_values, check_level, check_n_boot, correction_text,
                          paired_bootstrap, seed_record)

DEFAULT_N_BOOT = 2000
MAX_NULL_REPEATS = 1000


def distinct_rows(x: np.ndarray) -> np.ndarray:
    """The distinct rows of ``x``, first occurrences in their original order."""
    _, first = np.unique(x, axis=0, return_index=True)
    return x[np.sort(first)]


def _check_repeats(null_repeats: Any) -> int:
    if isinstance(null_repeats, bool) or not isinstance(null_repeats, (int, np.integer)):
        raise NullError(f"null_repeats must be an integer, got {null_repeats!r}")
    if not 1 <= null_repeats <= MAX_NULL_REPEATS:
        raise NullError(f"null_repeats = {null_repeats}: use 1 to {MAX_NULL_REPEATS} null draws per set")
    return int(null_repeats)


def _as_points(x: Any, what: str) -> np.ndarray:
    from .hyperbolicity import _as_float64_array

    arr = _as_float64_array(x, what)
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise InputDataError(f"{what} must be an (n, d) array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise InputDataError(f"{what} hold NaN or inf values; repair or drop those rows first")
    return arr


def split_sets(points: np.ndarray, *, groups: Optional[Sequence[Any]], n_sets: int,
               set_size: Optional[int], rng: np.random.Generator) -> tuple[list[np.ndarray], list[Any]]:
    """One cloud as sets: the rows of each ``groups`` label (labels in first-seen order), or
    ``n_sets`` seeded random subsets of ``set_size`` rows (default min(400, n // 2)). Returns the sets
    and their group labels (None without groups)."""
    n = points.shape[0]
    if groups is not None:
        g = np.asarray(groups)
        if g.shape != (n,):
            raise InputDataError(f"groups must hold one label per point ({n}), got shape {g.shape}")
        labels = list(dict.fromkeys(g.tolist()))
        return [points[g == lab] for lab in labels], labels
    if isinstance(n_sets, bool) or not isinstance(n_sets, (int, np.integer)) or n_sets < 2:
        raise InputDataError(f"n_sets must be an integer ≥ 2 (an interval needs several sets), got {n_sets!r}")
    m = min(400, n // 2) if set_size is None else int(set_size)
    if m < 4 or m > n:
        raise InputDataError(f"set_size must lie in [4, {n}] for {n} points, got {m}")
    return [points[np.sort(rng.choice(n, size=m, replace=False))] for _ in range(int(n_sets))], \
        [None] * int(n_sets)


def _null_sets(kind: str, x: np.ndarray, label: Any, repeats: int, rng: np.random.Generator,
               population: Optional[PopulationGaussian], pool: Optional[ResamplePool]) -> list[np.ndarray]:
    m = x.shape[0]
    if kind == "own":
        return [own_gaussian(x, m, rng) for _ in range(repeats)]
    if kind == "population":
        assert population is not None
        return [population.sample(m, rng) for _ in range(repeats)]
    assert pool is not None
    return [pool.draw(x[0], m, rng, exclude_group=label) for _ in range(repeats)]


def _verdict(p: Optional[float], diff: float, alpha: float) -> str:
    if p is None or not np.isfinite(p) or p >= alpha:
        return "within"
    return "below" if diff < 0 else "above"


def headline(nulls: Sequence[NullComparison]) -> tuple[str, str]:
    """The most conservative verdict over ``nulls`` and the sentence that explains it."""
    if not nulls:
        return "within", "no null was computed"
    sides = {c.null: c.verdict for c in nulls}
    names = [NULL_NAMES.get(k, k) for k in sides]
    if len(set(sides.values())) == 1:
        side = next(iter(sides.values()))
        if side == "within":
            return "within", f"within noise of every null ({', '.join(names)})"
        more = "more" if side == "below" else "less"
        return side, f"{more} tree-like than every null ({', '.join(names)})"
    parts = [f"{v} the {NULL_NAMES.get(k, k)}" if v != "within" else f"within noise of the {NULL_NAMES.get(k, k)}"
             for k, v in sides.items()]
    return "within", "the nulls disagree (" + "; ".join(parts) + "), so no direction is claimed"


def _compare(kind: str, values: np.ndarray, null_values: np.ndarray, n_boot: int, level: float,
             rng: np.random.Generator) -> NullComparison:
    boot = paired_bootstrap(values, null_values, n_boot=n_boot, level=level, rng=rng)
    base = dict(null=kind, question=NULL_QUESTIONS[kind], values=[float(v) for v in null_values],
                mean=float(null_values.mean()), diff_mean=float((values - null_values).mean()),
                share_below=float((values < null_values).mean()))
    if boot is None:
        return NullComparison(**base)
    return NullComparison(**base, ci_low=boot.ci_b[0], ci_high=boot.ci_b[1],
                          diff_ci_low=boot.ci_diff[0], diff_ci_high=boot.ci_diff[1],
                          share_ci_low=boot.ci_share[0], share_ci_high=boot.ci_share[1],
                          p_value=boot.p_value,
                          verdict=_verdict(boot.p_value, boot.diff_mean, 1.0 - level))


def delta_vs_null(points: Any, *, population: Any = None, resample: Any = None,
                  groups: Optional[Sequence[Any]] = None, nulls: Sequence[str] = NULL_KINDS,
                  n_sets: int = 8, set_size: Optional[int] = None, null_repeats: int = 1,
                  n_boot: int = DEFAULT_N_BOOT, level: float = 0.95, seed: Any = 0,
                  mode: str = "fixed", what: str = "points", progress: Any = None) -> DeltaStat:
    """δ_rel of point sets beside the own-covariance, population and resampling nulls.

    Args:
        points: a list of (n_i, d) point sets, or one (n, d) cloud split into sets by ``groups``
            (one label per row: one set per label, e.g. per document) or into ``n_sets`` seeded
            random subsets of ``set_size`` rows.
        population: the points the sets were drawn from, for the population Gaussian (an (N, d)
            array or a fitted :class:`~geoprobe.probes.nulls.PopulationGaussian`). Default: all the
            points given.
        resample: a :class:`~geoprobe.probes.nulls.ResamplePool` of real points to draw the
            resampling null from. Default, with groups or a list of sets: the points of the other
            sets; for random subsets of one cloud the resampling null would be the data itself, so
            it is left out unless a pool is given.
        nulls: which of "own", "population", "resample" to compute.
        null_repeats: null draws per set and null (their mean δ_rel is paired with the set's).
        n_boot, level: bootstrap resamples and confidence level of every interval.
        seed: an int or a ``numpy.random.SeedSequence``; all draws derive from it.
        mode: δ mode, "fixed" (base point 0) or "exact".
        what: a description of the sets, stored in the result.
        progress: optional object with ``update(n)``, called once per set.

    Returns:
        :class:`geoprobe.profile.DeltaStat` with per-set values, intervals and one
        :class:`geoprobe.profile.NullComparison` per null (no correction for multiple tests; see
        :func:`correct_across`).

    Raises:
        InputDataError: malformed points, fewer than 2 sets, a set with fewer than 4 distinct points.
        NullError: a null that cannot be built (e.g. a resampling pool smaller than a set).
        BootstrapOptionError: ``n_boot`` below 2 or above 100,000, or a bad ``level``.
    """
    from .hyperbolicity import MODES, DeltaOptionError, delta

    t0 = time.perf_counter()
    kinds = check_kinds(nulls)
    n_boot = check_n_boot(n_boot)
    level = check_level(level)
    repeats = _check_repeats(null_repeats)
    if mode not in MODES:
        raise DeltaOptionError(f"mode must be one of {MODES}, got {mode!r}")
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(_seed_int(seed))
    s_split, s_pop, s_boot, s_sets = ss.spawn(4)
    sets, labels, pooled, pooled_groups = _sets_from(points, groups, n_sets, set_size,
                                                     np.random.default_rng(s_split))
    sets = [distinct_rows(x) for x in sets]
    small = [i for i, x in enumerate(sets) if x.shape[0] < 4]
    if small:
        raise InputDataError(f"{len(small)} of {len(sets)} sets have fewer than 4 distinct points "
                             f"(first: set {small[0]}); δ needs at least 4")
    if len(sets) < 2:
        raise InputDataError(f"δ against a null needs at least 2 sets for an interval, got {len(sets)}")
    gauss = _population(kinds, population, pooled, max(x.shape[0] for x in sets), s_pop)
    pool = _pool(kinds, resample, pooled, pooled_groups, labels, points, groups)
    if pool is None:
        kinds = tuple(k for k in kinds if k != "resample")
    values, diams = [], []
    null_vals: dict[str, list[float]] = {k: [] for k in kinds}
    for i, (x, ss_i) in enumerate(zip(sets, s_sets.spawn(len(sets)))):
        r = delta(x, mode=mode, base_point=0)
        values.append(r.delta_rel)
        diams.append(r.diameter)
        for kind, ss_k in zip(kinds, ss_i.spawn(len(NULL_KINDS))):
            draws = _null_sets(kind, x, labels[i], repeats, np.random.default_rng(ss_k), gauss, pool)
            null_vals[kind].append(float(np.mean([delta(d, mode=mode, base_point=0).delta_rel
                                                  for d in draws])))
        if progress is not None:
            progress.update(1)
    v = np.asarray(values)
    boot_rng = np.random.default_rng(s_boot)
    comps = [_compare(k, v, np.asarray(null_vals[k]), n_boot, level, boot_rng) for k in kinds]
    mean_ci = paired_bootstrap(v, v, n_boot=n_boot, level=level, rng=boot_rng)
    verdict, reason = headline(comps)
    return DeltaStat(what=what, mean=float(v.mean()), std=float(v.std(ddof=1)),
                     n_points=int(np.median([x.shape[0] for x in sets])), dim=int(sets[0].shape[1]),
                     n_sets=len(sets), mode=mode, values=[float(a) for a in v],
                     ci_low=mean_ci.ci_a[0] if mean_ci else None,
                     ci_high=mean_ci.ci_a[1] if mean_ci else None, nulls=comps, verdict=verdict,
                     verdict_reason=reason, level=level, n_boot=n_boot, null_repeats=repeats,
                     correction=correction_text("none", 1), diameter=float(np.mean(diams)),
                     backend=r.backend, dtype="float64", seed=seed_record(seed),
                     seconds=time.perf_counter() - t0)


def _seed_int(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputDataError(f"seed must be a non-negative integer or a numpy SeedSequence, got {seed!r}")
    return int(seed)


def _sets_from(points: Any, groups: Optional[Sequence[Any]], n_sets: int, set_size: Optional[int],
               rng: np.random.Generator) -> tuple[list[np.ndarray], list[Any], np.ndarray, Optional[np.ndarray]]:
    """The sets, their labels, the pooled points and the pooled points' labels."""
    if isinstance(points, (list, tuple)):
        if groups is not None:
            raise InputDataError("groups applies to one (n, d) cloud; a list of point sets is already split")
        sets = [_as_points(x, f"point set {i}") for i, x in enumerate(points)]
        if len({x.shape[1] for x in sets}) > 1:
            raise InputDataError("every point set must have the same dimension, got "
                                 f"{sorted({x.shape[1] for x in sets})}")
        if not sets:
            raise InputDataError("no point sets given")
        labels = list(range(len(sets)))
        pooled = np.concatenate(sets)
        return sets, labels, pooled, np.repeat(np.arange(len(sets)), [x.shape[0] for x in sets])
    cloud = _as_points(points, "points")
    sets, labels = split_sets(cloud, groups=groups, n_sets=n_sets, set_size=set_size, rng=rng)
    return sets, labels, cloud, (np.asarray(groups) if groups is not None else None)


def _population(kinds: tuple[str, ...], population: Any, pooled: np.ndarray, largest: int,
                ss: np.random.SeedSequence) -> Optional[PopulationGaussian]:
    if "population" not in kinds:
        return None
    if isinstance(population, PopulationGaussian):
        return population
    pop = pooled if population is None else _as_points(population, "population")
    if pop.shape[1] != pooled.shape[1]:
        raise NullError(f"the population has dimension {pop.shape[1]}, the sets {pooled.shape[1]}")
    if pop.shape[0] <= largest:
        raise NullError(f"the population null needs a population larger than each set: it has "
                        f"{pop.shape[0]} points, the largest set {largest}")
    return PopulationGaussian.fit(pop, np.random.default_rng(ss))


def _pool(kinds: tuple[str, ...], resample: Any, pooled: np.ndarray, pooled_groups: Optional[np.ndarray],
          labels: list[Any], points: Any, groups: Any) -> Optional[ResamplePool]:
    if "resample" not in kinds:
        return None
    if isinstance(resample, ResamplePool):
        return resample
    if resample is not None:
        raise NullError(f"resample must be a ResamplePool, got {type(resample).__name__}")
    if pooled_groups is None:
        return None  # random subsets of one cloud: resampling it again is the data itself
    return ResamplePool(pooled, groups=pooled_groups)


def correct_across(stats: Sequence[Optional[DeltaStat]], method: str = "holm") -> list[Optional[DeltaStat]]:
    """``stats`` (e.g. one per layer) with each null's p-values adjusted across the family
    (``method`` "holm", "bh" or "none"; one family per null kind) and the verdicts redrawn from the
    adjusted p-values. None entries stay None and are not counted."""
    present = [s for s in stats if s is not None]
    m = len(present)
    text = correction_text(method, m)
    adjusted: dict[tuple[int, str], float] = {}
    for kind in NULL_KINDS:
        items = [(i, s.null(kind)) for i, s in enumerate(stats) if s is not None and s.null(kind)]
        ps = [c.p_value if c.p_value is not None else np.nan for _, c in items]
        for (i, _), p in zip(items, adjust_p_values(ps, method)):
            adjusted[(i, kind)] = p
    out: list[Optional[DeltaStat]] = []
    for i, s in enumerate(stats):
        if s is None:
            out.append(None)
            continue
        comps = []
        for c in s.nulls:
            p = adjusted.get((i, c.null), np.nan)
            p_adj = float(p) if np.isfinite(p) else None
            comps.append(dataclasses.replace(c, p_adjusted=p_adj,
                                             verdict=_verdict(p_adj, c.diff_mean, 1.0 - s.level)))
        verdict, reason = headline(comps)
        out.append(dataclasses.replace(s, nulls=comps, verdict=verdict, verdict_reason=reason,
                                       correction=text))
    return out
