"""scikit-learn-style intrinsic-dimension estimators: ``TwoNN().fit(X).dimension_``.

Thin estimators over :func:`geoprobe.probes.intrinsic_dim.intrinsic_dimension` (and, for
precomputed neighbour distances, its ratio functions :func:`twonn_mle`, :func:`twonn_linear_fit`,
:func:`gride_mle`): the formulas live there once. They follow the scikit-learn estimator protocol
(parameters stored unchanged by ``__init__``, ``get_params``/``set_params`` from
:class:`sklearn.base.BaseEstimator`, ``fit`` returns ``self``, fitted attributes end in ``_``) and
scikit-dimension's names (``skdim.id.TwoNN``, ``skdim.id.GRIDE``: ``dimension_``, ``error_``,
``scales_``, ``dimension_scales_``, ``error_scales_``, ``radius_scales_``; ``transform`` and
``fit_transform`` return the dimension), so they drop into scikit-learn pipelines, ``clone`` and
scikit-dimension code such as ``skdim.asPointwise``.

Where the conventions differ from scikit-dimension 0.5 (same data, duplicate-free):

* duplicates: points closer than ``dedup_tol`` × the data's RMS spread are merged before the
  neighbour search (:mod:`geoprobe.probes.duplicates`), with a :class:`UserWarning`; scikit-dimension
  drops the points whose nearest-neighbour distance is exactly 0, with a warning;
* ``TwoNN(method="mle")`` is the unbiased MLE (N − 1)/Σ log μ_i over every ratio (DADApy's ``ml``);
  ``discard_fraction`` applies to the linear fit only, where scikit-dimension treats the discarded
  ratios as censored. With ``discard_fraction=0`` both give the same number;
* ``GRIDE`` supports n2 = 2·n1 only (the scales of Denti et al.'s multiscale analysis);
* ``GRIDE.error_`` is 1/sqrt(I(d̂)) with the observed Fisher information of the likelihood that is
  maximised, the one with (N − 1) log d (so that n1 = 1 is the unbiased TwoNN estimate):
  I(d) = (N − 1)/d² + (n2 − n1 − 1) Σ (log μ_i / (2 sinh(d log μ_i / 2)))². DADApy and
  scikit-dimension use N/d² in the first term, the information of the unmodified likelihood. The
  (N − 1) form is the derivative of the score whose root is ``dimension_``, and at n1 = 1 it gives
  d̂/sqrt(N − 1), nearer the exact standard deviation d/sqrt(N − 2) of the unbiased estimator than
  d̂/sqrt(N); the two differ by a factor of about 1 + 1/(2N);
* ``GRIDE`` keeps every ratio; scikit-dimension (after DADApy) also drops ratios above
  q50 + 20 (q95 − q50) as overlapping points, which changes nothing on data without such outliers.

References: E. Facco, M. d'Errico, A. Rodriguez, A. Laio, Sci. Rep. 7, 12140 (2017);
F. Denti, D. Doimo, A. Laio, A. Mira, Sci. Rep. 12, 20005 (2022).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_array, check_is_fitted

from .errors import InputDataError
from .probes.intrinsic_dim import (gride_mle, intrinsic_dimension, twonn_linear_fit, twonn_mle)
from .profile import IDResult

__all__ = ["TwoNN", "GRIDE", "gride_from_distances"]

TWONN_METHODS = ("linear", "mle")


class _IDEstimator(BaseEstimator):
    """What both estimators share: input checks, ``transform``/``fit_transform`` as in
    scikit-dimension's global estimators, and the fitted result record ``result_``."""

    def __sklearn_tags__(self) -> Any:
        """scikit-learn ≥ 1.6 tags: a transformer whose ``transform`` returns the scalar ID, as
        scikit-dimension's estimators declare."""
        from sklearn.utils import TransformerTags

        tags = super().__sklearn_tags__()
        tags.transformer_tags = TransformerTags()
        return tags

    def _points(self, X: Any, min_samples: int = 3) -> Any:
        """X checked as scikit-learn does (a 2-D finite real array; ValueError otherwise) and
        ``n_features_in_`` recorded. A torch tensor is passed on as it is, so the neighbour search
        runs on its device; :func:`intrinsic_dimension` checks it."""
        if type(X).__module__.startswith("torch") and hasattr(X, "device"):
            if X.ndim != 2:
                raise InputDataError(f"X must be a 2-D tensor (n_samples, n_features), got shape {tuple(X.shape)}")
            self.n_features_in_ = int(X.shape[1])
            return X
        X = check_array(X, dtype=np.float64, ensure_min_samples=min_samples)
        if not X.flags.writeable:  # a read-only memory map: torch.from_numpy needs a writable array
            X = X.copy()
        self.n_features_in_ = int(X.shape[1])
        return X

    def _record(self, result: IDResult) -> None:
        self.result_ = result
        self.n_points_ = result.n_points
        self.n_duplicates_removed_ = result.n_duplicates_removed
        if result.n_duplicates_removed:
            warnings.warn(f"{type(self).__name__}: removed {result.n_duplicates_removed} duplicate "
                          f"points (dedup_tol={getattr(self, 'dedup_tol', None)}) before the "
                          "neighbour search", UserWarning, stacklevel=3)
        self.is_fitted_ = True

    def transform(self, X: Any = None) -> float:
        """The fitted ``dimension_`` (as scikit-dimension's estimators; X only checked)."""
        check_is_fitted(self, "is_fitted_")
        if X is not None:
            X = check_array(X)
            if X.shape[1] != self.n_features_in_:
                raise ValueError(f"X has {X.shape[1]} features, but {type(self).__name__} is "
                                 f"expecting {self.n_features_in_} features as input.")
        return self.dimension_

    def fit_transform(self, X: Any, y: Any = None) -> float:
        """``fit(X).dimension_``."""
        return self.fit(X, y).dimension_


class TwoNN(_IDEstimator):
    """TwoNN intrinsic dimension (Facco et al. 2017), as ``skdim.id.TwoNN``.

    With r1(i), r2(i) the distances of point i to its first and second nearest neighbours, the ratios
    μ_i = r2/r1 follow the Pareto law F(μ) = 1 − μ^(−d) on a d-dimensional manifold of locally
    constant density. ``method="linear"`` (default, the paper's estimate and scikit-dimension's) is
    the slope of the zero-intercept least-squares line of −log(1 − F_emp(μ)) on log μ over the
    k = ⌊N (1 − discard_fraction)⌋ smallest ratios, F_emp(μ_(i)) = i/N; ``method="mle"`` is the
    unbiased maximum-likelihood estimate (N − 1)/Σ log μ_i.

    Parameters:
        discard_fraction: fraction of the largest ratios left out of the linear fit, in [0, 1).
        dist: if True, X is an (N, 2) array of each point's distances (r1, r2), not points.
        method: "linear" or "mle".
        dedup_tol: duplicate tolerance relative to the data's RMS spread (see
            :func:`geoprobe.probes.duplicates.deduplicate`); None keeps every point and refuses
            exact copies.

    Fitted attributes:
        dimension_: the estimate of ``method``.
        error_: ``dimension_``/sqrt(N − 2): the exact standard deviation d/sqrt(N − 2) of the MLE,
            with the fitted estimate in place of d (for the line fit, whose spread has no closed
            form, it is about 10 % smaller than the spread on exact Pareto samples).
        linear_fit_dimension_, mle_dimension_: both estimates.
        n_points_, n_duplicates_removed_: points used after deduplication, and removed.
        result_: the :class:`~geoprobe.profile.IDResult` (None with ``dist=True``).
        n_features_in_: columns of X.
    """

    def __init__(self, discard_fraction: float = 0.1, dist: bool = False, method: str = "linear",
                 dedup_tol: Optional[float] = 1e-6):
        self.discard_fraction = discard_fraction
        self.dist = dist
        self.method = method
        self.dedup_tol = dedup_tol

    def fit(self, X: Any, y: Any = None) -> "TwoNN":
        """Estimate the dimension of the points X (n_samples, n_features); y is ignored."""
        if self.method not in TWONN_METHODS:
            raise InputDataError(f"method must be one of {TWONN_METHODS}, got {self.method!r}")
        if self.dist:
            r = self._points(X)
            if r.shape[1] != 2:
                raise InputDataError(f"with dist=True X holds (r1, r2) per point: 2 columns, got {r.shape[1]}")
            mu = r[:, 1] / r[:, 0]
            mle, _ = twonn_mle(mu)
            lin = twonn_linear_fit(mu, self.discard_fraction)
            n = len(mu)
            self.result_, self.n_points_, self.n_duplicates_removed_ = None, n, 0
            self.is_fitted_ = True
        else:
            res = intrinsic_dimension(self._points(X), estimator="twonn", dedup_tol=self.dedup_tol,
                                      discard_fraction=self.discard_fraction)
            mle, lin, n = res.mle_dimension, res.linear_fit_dimension, res.n_points
            self._record(res)
        self.mle_dimension_, self.linear_fit_dimension_ = mle, lin
        self.dimension_ = lin if self.method == "linear" else mle
        self.error_ = self.dimension_ / math.sqrt(n - 2)
        return self


class GRIDE(_IDEstimator):
    """GRIDE intrinsic dimension (Denti et al. 2022), as ``skdim.id.GRIDE``.

    With μ_i = r_n2(i)/r_n1(i), n2 = 2·n1, the ratio has density
    f(μ) = d (μ^d − 1)^(n2−n1−1) / (B(n2 − n1, n1) μ^((n2−1) d + 1)), μ > 1; the estimate is the root
    of the score of the log-likelihood with (N − 1) log d in place of N log d,
    s(d) = (N − 1)/d + (n2 − n1 − 1) Σ log μ_i/(1 − μ_i^(−d)) − (n2 − 1) Σ log μ_i (unbiased TwoNN at
    n1 = 1), and its error 1/sqrt(I(d̂)) with I = −s' (module docstring for the comparison with
    DADApy's N/d²).

    Parameters:
        n1: order of the nearer neighbour (integer ≥ 1).
        n2: order of the farther neighbour; None or 2·n1 (the only supported value).
        multiscale: also estimate at n1 = 1, 2, 4, … with n2 = 2·n1 ≤ min(range_max, N − 1).
        range_max: largest neighbour order of the multiscale estimates.
        dedup_tol: as for :class:`TwoNN`.

    Fitted attributes:
        dimension_, error_: the estimate at (n1, n2) and its standard error.
        scales_, dimension_scales_, error_scales_, radius_scales_ (``multiscale=True`` only): the
            n1 of every scale, its estimate, error and mean distance to the n2-th neighbour.
        n_points_, n_duplicates_removed_, result_, n_features_in_: as for :class:`TwoNN`.
    """

    def __init__(self, n1: int = 1, n2: Optional[int] = None, multiscale: bool = False,
                 range_max: int = 64, dedup_tol: Optional[float] = 1e-6):
        self.n1 = n1
        self.n2 = n2
        self.multiscale = multiscale
        self.range_max = range_max
        self.dedup_tol = dedup_tol

    def _scales(self, n: int) -> list[int]:
        """The n1 to estimate at, after checking the parameters against ``n`` samples."""
        n1, n2 = self.n1, 2 * self.n1 if self.n2 is None else self.n2
        if not (_is_int(n1) and _is_int(n2) and 1 <= n1 < n2):
            raise InputDataError(f"GRIDE needs integers 1 ≤ n1 < n2, got n1={n1!r}, n2={self.n2!r}")
        if n2 != 2 * n1:
            raise InputDataError(f"GRIDE supports n2 = 2·n1 only, got n1={n1}, n2={n2}")
        if n2 > n - 1:
            raise InputDataError(f"GRIDE scale n1={n1} needs n2 + 1 = {n2 + 1} points, got {n}")
        out = {n1}
        if self.multiscale:
            if not (_is_int(self.range_max) and self.range_max >= 2):
                raise InputDataError(f"range_max must be an integer ≥ 2, got {self.range_max!r}")
            top = min(self.range_max, n - 1)
            out |= {1 << k for k in range(int(np.log2(top)))}
        return sorted(out)

    def fit(self, X: Any, y: Any = None) -> "GRIDE":
        """Estimate the dimension of the points X (n_samples, n_features); y is ignored."""
        X = self._points(X)
        res = intrinsic_dimension(X, estimator="gride", scales=self._scales(int(X.shape[0])),
                                  dedup_tol=self.dedup_tol)
        at = {s.n1: s for s in res.scales}
        self.dimension_, self.error_ = at[self.n1].dimension, at[self.n1].error
        if self.multiscale:
            top = min(self.range_max, int(X.shape[0]) - 1)
            grid = [at[1 << k] for k in range(int(np.log2(top)))]
            self.scales_ = np.array([s.n1 for s in grid])
            self.dimension_scales_ = np.array([s.dimension for s in grid])
            self.error_scales_ = np.array([s.error for s in grid])
            self.radius_scales_ = np.array([s.radius for s in grid], dtype=np.float64)
        self._record(res)
        return self


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def gride_from_distances(dists: Any, n1: int, n2: int) -> tuple[float, float]:
    """GRIDE (d, error) from sorted neighbour distances, ``dists[:, k − 1]`` the k-th neighbour's
    (scikit-dimension's ``_gride`` signature): :func:`gride_mle` of r_n2/r_n1."""
    d = np.asarray(dists, dtype=np.float64)
    return gride_mle(d[:, n2 - 1] / d[:, n1 - 1], n1, n2)
