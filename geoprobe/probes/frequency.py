"""Power law of the token frequency distribution (HypLoRA, arXiv 2410.04010 §4.1).

The measured object is the *frequency distribution*: with ``counts[t]`` the number of times token type
``t`` occurs in a corpus, the per-type counts are the samples and the model is the discrete power law

    P(k) = k^(−γ) / ζ(γ, k_min),   k ≥ k_min,

ζ(γ, q) = Σ_{j≥0} (q + j)^(−γ) being the Hurwitz zeta function (Clauset, Shalizi & Newman 2009,
"Power-law distributions in empirical data", SIAM Review 51, eq. 2.4). A Zipf rank law
f(r) ∝ r^(−s) gives γ = 1 + 1/s, so ``zipf_exponent`` s = 1/(γ − 1).

Method (Clauset et al. 2009 §3):

* γ is the exact discrete maximum-likelihood estimate: it minimises the per-sample negative
  log-likelihood  γ·mean(log k) + log ζ(γ, k_min)  over the tail k ≥ k_min (a convex function of γ,
  solved by bounded Brent search on scipy's Hurwitz zeta). No large-k_min approximation is used.
* The standard error is the discrete Fisher-information value (Clauset et al. eq. 3.6):
  σ = 1 / sqrt(n · d²/dγ² log ζ(γ, k_min)).
* k_min is the value, among the distinct counts inside ``xmin_range``, whose fit has the smallest
  Kolmogorov–Smirnov distance D between the tail's empirical CDF and the fitted CDF. D is computed as
  the ``powerlaw`` package (Alstott et al. 2014) computes it — both CDFs are taken as P(X < k) at the
  distinct tail values — so it equals that package's ``D`` at the same γ and k_min.
* Everything runs on the frequency-of-frequency table (distinct counts and their multiplicities), so a
  50k-type vocabulary costs milliseconds per candidate k_min.
* Optionally the power law is compared with a lognormal on the same tail: the lognormal is fitted by
  ``powerlaw`` (discrete, same k_min) and the log-likelihood ratio R (> 0 favours the power law) with
  its p-value (Vuong's test, Clauset et al. §5.1) is reported only when that fit converged.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import zeta

from ..errors import InputDataError
from ..profile import PowerLawResult

logger = logging.getLogger(__name__)

#: Smallest tail (number of types with count ≥ k_min) a fit is attempted on.
MIN_TAIL_TYPES = 10
#: Search interval for γ. A tail steeper than this is not treated as a power law.
GAMMA_BOUNDS = (1.0 + 1e-9, 30.0)


@dataclass(frozen=True)
class XminScan:
    """The fits tried during the k_min search: one entry per candidate k_min."""

    xmins: np.ndarray
    gammas: np.ndarray
    ks: np.ndarray
    n_tail: np.ndarray


# --------------------------------------------------------------------------- input handling
def validate_counts(counts: Any) -> np.ndarray:
    """Return ``counts`` as a 1-D int64 array after checking it is a usable count vector.

    Raises :class:`InputDataError` for empty input, more than one dimension, NaN/inf, negative or
    non-integer entries, and for a vector with no positive entry.
    """
    if hasattr(counts, "detach"):  # torch tensor
        counts = counts.detach().cpu().numpy()
    try:
        arr = np.asarray(counts)
    except (TypeError, ValueError) as exc:
        raise InputDataError(f"counts must be a 1-D array of non-negative integers ({exc})") from None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise InputDataError(f"counts must be numeric, got dtype {arr.dtype}; pass one count per "
                             "token type")
    if np.iscomplexobj(arr):
        raise InputDataError("counts must be real numbers, got complex values")
    if arr.ndim != 1:
        raise InputDataError(f"counts must be a 1-D vector (one count per token type), got shape "
                             f"{arr.shape}; flatten it or pass one vector per corpus")
    if arr.size == 0:
        raise InputDataError("counts is empty; count the tokens of a non-empty corpus first")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise InputDataError("counts contain NaN or infinite values; pass finite token counts")
        if np.any(arr != np.round(arr)):
            raise InputDataError("counts contain non-integer values; pass raw occurrence counts, "
                                 "not frequencies or probabilities")
    if np.any(arr < 0):
        raise InputDataError("counts contain negative values; pass raw occurrence counts (≥ 0)")
    out = arr.astype(np.int64)
    if not np.any(out > 0):
        raise InputDataError("all counts are zero; the corpus produced no tokens of this vocabulary")
    return out


def frequency_table(counts: Any) -> tuple[np.ndarray, np.ndarray]:
    """Distinct positive counts k and how many types occur exactly k times (zeros dropped)."""
    c = validate_counts(counts)
    values, mult = np.unique(c[c > 0], return_counts=True)
    return values.astype(np.int64), mult.astype(np.int64)


# --------------------------------------------------------------------------- the discrete fit
def _tail(values: np.ndarray, mult: np.ndarray, xmin: float) -> tuple[np.ndarray, np.ndarray]:
    sel = values >= xmin
    return values[sel], mult[sel]


def discrete_mle(values: np.ndarray, mult: np.ndarray, xmin: float) -> float:
    """Exact discrete power-law MLE of γ on the tail ``values ≥ xmin`` of a frequency table.

    Minimises  γ·mean(log k) + log ζ(γ, xmin)  (Clauset et al. 2009, eq. 3.5). Returns NaN when the
    tail has fewer than two distinct values (no finite maximum) or the optimum lies on the upper
    bound of :data:`GAMMA_BOUNDS`.
    """
    v, m = _tail(np.asarray(values), np.asarray(mult), xmin)
    if v.size < 2:
        return math.nan
    n = float(m.sum())
    mean_log = float(np.dot(m, np.log(v.astype(np.float64)))) / n

    def nll(g: float) -> float:
        return g * mean_log + math.log(zeta(g, xmin))

    res = minimize_scalar(nll, bounds=GAMMA_BOUNDS, method="bounded",
                          options={"xatol": 1e-11, "maxiter": 500})
    g = float(res.x)
    if not math.isfinite(g) or g > GAMMA_BOUNDS[1] - 1e-6:
        return math.nan
    return g


def ks_distance(values: np.ndarray, mult: np.ndarray, xmin: float, gamma: float) -> float:
    """Kolmogorov–Smirnov distance between the tail's empirical CDF and the fitted power law.

    Both CDFs are evaluated as P(X < k) at each distinct tail value k, the way the ``powerlaw``
    package does: empirical (Σ_{k' < k} m_k') / n, model (ζ(γ, xmin) − ζ(γ, k)) / ζ(γ, xmin).
    """
    v, m = _tail(np.asarray(values), np.asarray(mult), xmin)
    n = float(m.sum())
    emp = (np.cumsum(m) - m) / n
    z0 = zeta(gamma, xmin)
    model = (z0 - zeta(gamma, v.astype(np.float64))) / z0
    return float(np.max(np.abs(model - emp)))


def discrete_standard_error(gamma: float, xmin: float, n: int) -> float:
    """σ(γ̂) = 1 / sqrt(n · d²/dγ² log ζ(γ, xmin)) (Clauset et al. 2009, eq. 3.6).

    The second derivative (the variance of log X under the fitted law) is taken by a central
    difference of log ζ, accurate to about 1e-7 relative.
    """
    h = min(1e-4, (gamma - 1.0) / 4.0)

    def lz(g: float) -> float:
        return math.log(zeta(g, xmin))

    second = (lz(gamma + h) - 2.0 * lz(gamma) + lz(gamma - h)) / (h * h)
    if not (second > 0 and math.isfinite(second)):
        return math.nan
    return 1.0 / math.sqrt(n * second)


def scan_xmin(values: np.ndarray, mult: np.ndarray,
              xmin_range: tuple[float, float] = (1, 50)) -> XminScan:
    """Fit every candidate k_min: the distinct counts k with lo ≤ k ≤ hi whose tail holds at least
    :data:`MIN_TAIL_TYPES` types and two distinct values. Returns γ̂ and D for each."""
    values = np.asarray(values)
    mult = np.asarray(mult)
    lo, hi = xmin_range
    tail_sizes = np.cumsum(mult[::-1])[::-1]           # types with count ≥ values[i]
    n_distinct_above = np.arange(values.size, 0, -1)   # distinct values ≥ values[i]
    ok = ((values >= lo) & (values <= hi) & (tail_sizes >= MIN_TAIL_TYPES)
          & (n_distinct_above >= 2))
    cands = values[ok]
    gammas = np.empty(cands.size)
    ks = np.empty(cands.size)
    for i, x in enumerate(cands):
        g = discrete_mle(values, mult, float(x))
        gammas[i] = g
        ks[i] = ks_distance(values, mult, float(x), g) if math.isfinite(g) else math.nan
    return XminScan(xmins=cands.astype(np.int64), gammas=gammas, ks=ks, n_tail=tail_sizes[ok])


# --------------------------------------------------------------------------- lognormal comparison
def _compare_lognormal(values: np.ndarray, mult: np.ndarray, xmin: int,
                       gamma: float) -> tuple[bool, Optional[float], Optional[float]]:
    """Fit a discrete lognormal to the tail with ``powerlaw`` and return (converged, R, p).

    R = Σ log p_PL(k_i) − Σ log p_LN(k_i) over the tail (p_PL at our exact γ̂) and p is the two-sided
    Vuong p-value, both from ``powerlaw.loglikelihood_ratio``. ``powerlaw`` warns instead of raising
    when the lognormal optimiser fails; its warnings are captured and logged, and the fit counts as
    converged only when it raised no failure flag and gave finite parameters with σ > 0.
    """
    import powerlaw

    v, m = _tail(values, mult, xmin)
    tail = np.repeat(v.astype(np.float64), m)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fit = powerlaw.Fit(tail, discrete=True, xmin=xmin, estimate_discrete=False, verbose=0)
            ln = fit.lognormal
            mu, sigma = float(ln.mu), float(ln.sigma)
            ll_ln = np.asarray(ln.loglikelihoods(tail), dtype=np.float64)
            failed = bool(getattr(ln, "noise_flag", False))
        except (ValueError, FloatingPointError, ZeroDivisionError, OverflowError) as exc:
            logger.info("lognormal fit raised %s: %s", type(exc).__name__, exc)
            return False, None, None
    for w in caught:
        logger.debug("powerlaw: %s", w.message)
    converged = (not failed and math.isfinite(mu) and math.isfinite(sigma) and sigma > 0
                 and bool(np.all(np.isfinite(ll_ln))))
    if not converged:
        logger.info("lognormal fit did not converge (mu=%s, sigma=%s); comparison not reported",
                    mu, sigma)
        return False, None, None
    ll_pl = -gamma * np.log(tail) - math.log(zeta(gamma, xmin))
    R, p = powerlaw.loglikelihood_ratio(ll_pl.copy(), ll_ln.copy())
    return True, float(R), float(p)


def _fit_at_xmin(values: np.ndarray, mult: np.ndarray, xmin: Any) -> tuple[int, float, float]:
    """(k_min, γ̂, D) of the fit at the given ``xmin``, after checking it is a positive integer
    leaving a tail of at least :data:`MIN_TAIL_TYPES` types and two distinct counts."""
    try:
        ok = not isinstance(xmin, bool) and float(xmin).is_integer() and xmin >= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InputDataError(f"xmin must be a positive integer, got {xmin!r}")
    x = int(xmin)
    v_tail, m_tail = _tail(values, mult, x)
    if v_tail.size < 2 or m_tail.sum() < MIN_TAIL_TYPES:
        raise InputDataError(
            f"xmin={x} leaves {int(m_tail.sum())} token types with {v_tail.size} distinct count(s); "
            f"a fit needs at least {MIN_TAIL_TYPES} types and 2 distinct counts — lower xmin")
    gamma = discrete_mle(values, mult, x)
    if not math.isfinite(gamma):
        raise InputDataError(f"the tail above xmin={x} is steeper than γ = {GAMMA_BOUNDS[1]:g}; "
                             "it does not follow a power law — lower xmin")
    return x, gamma, ks_distance(values, mult, x, gamma)


def _fit_best_xmin(values: np.ndarray, mult: np.ndarray,
                   xmin_range: tuple[float, float]) -> tuple[int, float, float]:
    """(k_min, γ̂, D) of the candidate k_min in ``xmin_range`` with the smallest KS distance D
    (Clauset et al. 2009 §3.3); the first such candidate on ties."""
    lo, hi = xmin_range
    if not (1 <= lo <= hi):
        raise InputDataError(f"xmin_range must be (lo, hi) with 1 ≤ lo ≤ hi, got {xmin_range!r}")
    scan = scan_xmin(values, mult, (lo, hi))
    good = np.isfinite(scan.ks)
    if not np.any(good):
        raise InputDataError(
            f"no candidate xmin in {tuple(xmin_range)} leaves at least {MIN_TAIL_TYPES} token types "
            "with 2 distinct counts and a finite fit; widen xmin_range or use a larger corpus")
    i = int(np.flatnonzero(good)[np.argmin(scan.ks[good])])
    return int(scan.xmins[i]), float(scan.gammas[i]), float(scan.ks[i])


# --------------------------------------------------------------------------- public entry point
def fit_power_law(counts: Any, *, xmin: Optional[int] = None,
                  xmin_range: tuple[float, float] = (1, 50),
                  compare_lognormal: bool = True) -> PowerLawResult:
    """Fit P(k) ∝ k^(−γ) to the token frequency distribution (HypLoRA, arXiv 2410.04010 §4.1).

    ``counts`` holds one occurrence count per token type of a vocabulary; zeros (types never seen)
    are dropped, so the samples are the positive per-type counts. γ is the exact discrete MLE
    (Hurwitz zeta), ``error`` its Fisher-information standard error, ``zipf_exponent`` =
    1/(γ − 1). With ``xmin=None`` k_min minimises the KS distance over the distinct counts in
    ``xmin_range`` (inclusive; Clauset et al. 2009 §3.3); a given ``xmin`` is used as is.

    With ``compare_lognormal`` a discrete lognormal is fitted to the same tail with ``powerlaw``;
    R (> 0 favours the power law) and p are reported only if that fit converged, else
    ``lognormal_converged`` is False and both are None (also when the comparison is switched off).

    Raises :class:`InputDataError` for empty, all-zero, negative, non-integer or NaN counts, and when
    too few distinct counts remain to fit a tail.
    """
    t0 = time.perf_counter()
    values, mult = frequency_table(counts)
    n_types = int(mult.sum())
    n_tokens = int(np.dot(values, mult))
    if values.size < 2:
        raise InputDataError(
            f"all {n_types} seen token types occur exactly {int(values[0])} time(s); a power law needs "
            "at least two distinct counts — use a larger corpus")

    if xmin is not None:
        x, gamma, ks = _fit_at_xmin(values, mult, xmin)
    else:
        x, gamma, ks = _fit_best_xmin(values, mult, xmin_range)

    v_tail, m_tail = _tail(values, mult, x)
    n_tail = int(m_tail.sum())
    gamma_err = discrete_standard_error(gamma, x, n_tail)

    converged, R, p = (False, None, None)
    if compare_lognormal:
        converged, R, p = _compare_lognormal(values, mult, x, gamma)

    seconds = time.perf_counter() - t0
    logger.info("power law: γ = %.4f ± %.4f, xmin = %d, D = %.4f, %d of %d types in the tail (%.2f s)",
                gamma, gamma_err, x, ks, n_tail, n_types, seconds)
    return PowerLawResult(
        gamma=gamma, error=gamma_err, xmin=x, zipf_exponent=1.0 / (gamma - 1.0),
        ks_distance=ks, n_types=n_types, n_tokens=n_tokens, n_tail_types=n_tail,
        lognormal_converged=converged, lognormal_loglikelihood_ratio=R, lognormal_p=p,
        count_values=[int(k) for k in values], count_multiplicities=[int(k) for k in mult],
        seconds=seconds)
