"""Bootstrap intervals, bootstrap tests and corrections for many tests.

Every interval geoprobe reports is a seeded percentile bootstrap (Efron & Tibshirani 1993, ch. 13):
resample the independent units (point sets, documents) B times with replacement, recompute the
statistic on each resample θ*_1 … θ*_B, and report quantiles of the θ*. Few units (a layer has about
ten documents) make the plain percentile interval too narrow: it behaves like a z interval with the
divisor n instead of n − 1. The intervals are therefore *expanded* (Hesterberg 2015, "What teachers
should know about the bootstrap", §4.2): at n units the quantiles are taken at α'/2 and 1 − α'/2 with

    α'/2 = Φ(−√(n/(n − 1)) · t_{1−α/2, n−1}),

so the interval has the width of Student's t interval for normal data and the percentile interval's
shape otherwise; α' → α as n grows (n = 10: a 95 % interval uses the 0.85 % and 99.15 % quantiles).

The test of "mean paired difference = 0" uses the bootstrap standard error with the same small-sample
factor, SE = sd(d̄*) · √(n/(n − 1)), and Student's t with n − 1 degrees of freedom:
p = 2 · P(T_{n−1} > |d̄| / SE). It agrees with the expanded interval (p < α exactly when the normal-
theory interval excludes 0) and, unlike a p-value counted from B resamples (≥ 2/(B + 1)), it can be
small enough to survive a correction over 30 layers.

Several tests (one per layer) are corrected by Holm's step-down method (Holm 1979; controls the
family-wise error rate) or by Benjamini & Hochberg's step-up method (1995; controls the false
discovery rate), both as adjusted p-values:

    Holm: p̃_(i) = max_{j ≤ i} min(1, (m − j + 1) p_(j));
    BH:   p̃_(i) = min_{j ≥ i} min(1, m p_(j) / j),

for the sorted p_(1) ≤ … ≤ p_(m).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..errors import InputDataError

CORRECTIONS = ("holm", "bh", "none")
MAX_BOOT = 100_000
"""Largest bootstrap size accepted: B × (number of units) indices are drawn at once in blocks, and
more than 10⁵ resamples do not change a 95 % percentile interval at the precision reported."""


class BootstrapOptionError(InputDataError):
    """A bootstrap size, level or correction outside its allowed range (also a ValueError)."""


def check_n_boot(n_boot: object, what: str = "n_boot") -> int:
    """``n_boot`` as an int in [2, :data:`MAX_BOOT`], or a clear error naming ``what``."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)):
        raise BootstrapOptionError(f"{what} must be an integer, got {n_boot!r}")
    if n_boot < 2:
        raise BootstrapOptionError(f"{what} = {n_boot}: a bootstrap needs at least 2 resamples "
                                   "(1,000–10,000 is usual)")
    if n_boot > MAX_BOOT:
        raise BootstrapOptionError(f"{what} = {n_boot:,} is more than {MAX_BOOT:,} resamples; "
                                   "a 95 % interval is stable at a few thousand")
    return int(n_boot)


def check_level(level: object) -> float:
    """The confidence level as a float strictly between 0 and 1."""
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 < float(level) < 1.0:
        raise BootstrapOptionError(f"level must be a number strictly between 0 and 1 (e.g. 0.95), "
                                   f"got {level!r}")
    return float(level)


def seed_record(seed: object) -> Optional[int]:
    """The seed as a result stores it: an integer seed, else None (a ``SeedSequence`` or fresh
    entropy, which have no short record)."""
    ok = isinstance(seed, (int, np.integer)) and not isinstance(seed, bool)
    return int(seed) if ok else None


def resample_indices(n_units: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot × n_units) indices of units drawn with replacement, one row per resample."""
    return rng.integers(0, n_units, size=(n_boot, n_units))


def expanded_level(level: float, n: int) -> float:
    """The percentile level 1 − α' of Hesterberg's expanded interval for ``n`` units (module
    docstring); ``level`` itself for n < 2."""
    from scipy.stats import norm, t

    if n < 2:
        return level
    alpha = 1.0 - level
    return float(1.0 - 2.0 * norm.cdf(-np.sqrt(n / (n - 1.0)) * t.ppf(1.0 - alpha / 2.0, n - 1)))


def percentile_interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    """The (α/2, 1 − α/2) quantiles of the bootstrap ``samples`` (α = 1 − level; linear
    interpolation between order statistics, numpy's default)."""
    a = 1.0 - level
    lo, hi = np.quantile(np.asarray(samples, dtype=np.float64), [a / 2.0, 1.0 - a / 2.0])
    return float(lo), float(hi)


def bootstrap_t_p_value(observed: float, samples: np.ndarray, n: int) -> float:
    """Two-sided p of "the mean is 0": |observed| / SE against Student's t with n − 1 degrees of
    freedom, SE the bootstrap standard error times √(n/(n − 1)) (module docstring)."""
    from scipy.stats import t

    se = float(np.std(np.asarray(samples, dtype=np.float64), ddof=1)) * np.sqrt(n / (n - 1.0))
    if not se > 0:
        return 1.0 if observed == 0 else 0.0
    return float(min(1.0, 2.0 * t.sf(abs(observed) / se, n - 1)))


@dataclass(frozen=True)
class PairedBootstrap:
    """Bootstrap summary of paired values (data a_i, null b_i) over independent units i."""

    mean_a: float
    ci_a: tuple[float, float]
    mean_b: float
    ci_b: tuple[float, float]
    diff_mean: float
    ci_diff: tuple[float, float]
    share_below: float
    ci_share: tuple[float, float]
    p_value: float


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, n_boot: int, level: float,
                     rng: np.random.Generator) -> Optional[PairedBootstrap]:
    """Means of ``a`` and ``b``, of the differences a − b and the share of units with a < b, each
    with an expanded percentile interval over ``n_boot`` resamples of the units (the same resamples
    for all four), and the bootstrap-t p-value of mean(a − b) = 0 (module docstring). None for fewer
    than 2 units (no interval can be formed)."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired values must be two 1-D sequences of one length, got {x.shape} and {y.shape}")
    n = x.size
    if n < 2:
        return None
    d = x - y
    below = (d < 0).astype(np.float64)
    boots = {k: np.empty(n_boot) for k in ("a", "b", "d", "s")}
    step = max(1, (1 << 22) // n)
    for s in range(0, n_boot, step):
        idx = resample_indices(n, min(step, n_boot - s), rng)
        sl = slice(s, s + idx.shape[0])
        boots["a"][sl] = x[idx].mean(axis=1)
        boots["b"][sl] = y[idx].mean(axis=1)
        boots["d"][sl] = d[idx].mean(axis=1)
        boots["s"][sl] = below[idx].mean(axis=1)
    wide = expanded_level(level, n)
    return PairedBootstrap(mean_a=float(x.mean()), ci_a=percentile_interval(boots["a"], wide),
                           mean_b=float(y.mean()), ci_b=percentile_interval(boots["b"], wide),
                           diff_mean=float(d.mean()), ci_diff=percentile_interval(boots["d"], wide),
                           share_below=float(below.mean()), ci_share=percentile_interval(boots["s"], wide),
                           p_value=bootstrap_t_p_value(float(d.mean()), boots["d"], n))


def adjust_p_values(p: Sequence[float], method: str = "holm") -> list[float]:
    """Adjusted p-values of ``p`` for ``method`` "holm", "bh" (Benjamini–Hochberg) or "none"
    (module docstring); NaN entries are left out of the family and stay NaN."""
    if method not in CORRECTIONS:
        raise BootstrapOptionError(f"correction must be one of {CORRECTIONS}, got {method!r}")
    arr = np.asarray(p, dtype=np.float64)
    out = np.full(arr.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(arr))
    if ok.size == 0:
        return out.tolist()
    if method == "none":
        out[ok] = arr[ok]
        return out.tolist()
    m = ok.size
    order = ok[np.argsort(arr[ok], kind="stable")]
    ps = arr[order]
    ranks = np.arange(1, m + 1)
    if method == "holm":
        adj = np.maximum.accumulate(np.minimum(1.0, (m - ranks + 1) * ps))
    else:
        adj = np.minimum.accumulate(np.minimum(1.0, m * ps / ranks)[::-1])[::-1]
    out[order] = adj
    return out.tolist()


def correction_text(method: str, m: int) -> str:
    """How a family of ``m`` tests was corrected, in words."""
    if method == "none" or m <= 1:
        return "single test, no correction" if m <= 1 else "no correction for multiple tests"
    name = "Holm" if method == "holm" else "Benjamini–Hochberg"
    return f"{name} across {m} tests"
