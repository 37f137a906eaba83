"""The three null point sets every δ-hyperbolicity value is compared with (METHODS.md §3b).

Random points with no hierarchy already give small δ_rel (distance concentration), so a δ_rel means
something only beside a null with the same number of points and dimension. Each null answers one
question about a point set X (n points in R^d) drawn from some population P:

* ``own`` — a Gaussian with X's own mean and sample covariance: "is X more tree-like than a Gaussian
  cloud of the same shape?" With n ≪ d its samples lie in X's own (n − 1)-dimensional affine span,
  where distances concentrate far less than in R^d, so this null is lenient (it calls n i.i.d.
  Gaussian points of R^d "tree-like").
* ``population`` — a Gaussian with the mean and covariance of P (the whole input-embedding matrix for
  prompts and token samples; all collected positions of the layer for hidden states): "are these
  points more tree-like than random points of this model's distribution?"
* ``resample`` — the same number of real points drawn at random from P (tokens from the corpus's token
  distribution; positions of other documents), with X's base point kept as the base point: the same
  question without a Gaussian assumption.

Sampling. A Gaussian N(μ, Σ) is sampled as μ + Z F with Z standard normal and F a factor with
FᵀF = Σ: F = (X − μ)/√(n − 1) for the own null (exact sample covariance, valid for n < d). For the
population F is the Cholesky factor of a shrunk covariance. The plain sample covariance S of N points
in d dimensions spreads the eigenvalues (Marchenko–Pastur: by (1 ± √(d/N))² for isotropic data), and
a Gaussian with that spread is less concentrated than the population: for N = 2,000 i.i.d. Gaussian
points in 512 dimensions it puts the null's δ_rel 0.007 above the data's, a false "below". Ledoit–Wolf
shrinkage errs the other way on anisotropic data (0.011 below, a false "above", at N = 1,200,
d = 576). Distances between Gaussian points depend on Σ through tr Σ (E‖x − y‖² = 2 tr Σ) and tr Σ²
(Var ‖x − y‖² = 8 tr Σ²), so the null matches those two: Σ̂ = (1 − ρ) S + ρ (tr S/d) I keeps tr Σ̂ =
tr S and picks ρ so that tr Σ̂² equals the unbiased estimate of tr Σ² (Bai & Saranadasa 1996;
Chen, Zhang & Zhong 2010),

    tr Σ² ≈ (N − 1)² / ((N − 2)(N + 1)) · (tr S² − (tr S)² / (N − 1)),

(clipped to [(tr S)²/d, tr S²], the range the shrinkage can reach). Tested on Gaussian data, where
every null must come out "within". A population of more than :data:`MAX_POPULATION_ROWS` rows
estimates Σ from that many seeded rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import GeoprobeError, InputDataError
from ..profile import NULL_KINDS, NULL_NAMES, NULL_QUESTIONS  # the wording lives in the contract

__all__ = ["MAX_POPULATION_ROWS", "NULL_KINDS", "NULL_NAMES", "NULL_QUESTIONS", "NullError",
           "PopulationGaussian", "ResamplePool", "check_kinds", "moment_matched_covariance",
           "own_gaussian"]

MAX_POPULATION_ROWS = 16384


class NullError(GeoprobeError, ValueError):
    """A null that cannot be built from what was given (too few points, unknown kind)."""


def check_kinds(kinds: object) -> tuple[str, ...]:
    """The requested null kinds, checked against :data:`NULL_KINDS` (order kept, no repeats)."""
    if isinstance(kinds, str):
        kinds = (kinds,)
    try:
        out = tuple(dict.fromkeys(kinds))  # type: ignore[arg-type]
    except TypeError:
        raise NullError(f"nulls must be a sequence of {NULL_KINDS}, got {kinds!r}") from None
    bad = [k for k in out if k not in NULL_KINDS]
    if bad or not out:
        raise NullError(f"unknown null {bad[0]!r}; choose from {', '.join(NULL_KINDS)}" if bad else
                        f"at least one null is needed; choose from {', '.join(NULL_KINDS)}")
    return out


def own_gaussian(x: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """m points of N(x̄, S), S the sample covariance of the rows of ``x`` (n ≥ 2): x̄ + Z (x − x̄)/√(n − 1)
    with Z an (m × n) standard normal matrix, exact for any n and d."""
    n = x.shape[0]
    if n < 2:
        raise NullError(f"the own-covariance null needs at least 2 points, got {n}")
    mu = x.mean(axis=0)
    return mu + rng.standard_normal((m, n)) @ ((x - mu) / np.sqrt(n - 1))


def moment_matched_covariance(centred: np.ndarray) -> np.ndarray:
    """Σ̂ = (1 − ρ) S + ρ (tr S / d) I with ρ ∈ [0, 1] chosen so that tr Σ̂² equals the unbiased
    estimate of tr Σ² (module docstring); ``centred`` holds the N × d centred rows, N ≥ 4."""
    n, d = centred.shape
    C = centred / np.sqrt(n - 1)
    S = C.T @ C
    tr = float(np.trace(S))
    a = float(np.einsum("ij,ij->", S, S))             # tr S²
    b = tr * tr / d                                    # tr S² of the isotropic target
    t = (n - 1) ** 2 / ((n - 2) * (n + 1)) * (a - tr * tr / (n - 1)) if n > 3 else a
    rho = 0.0 if a - b <= 1e-15 * a else 1.0 - np.sqrt(min(max((t - b) / (a - b), 0.0), 1.0))
    out = (1.0 - rho) * S
    out[np.diag_indices(d)] += rho * tr / d
    return out


@dataclass(frozen=True, eq=False)
class PopulationGaussian:
    """N(μ, Σ) of a population, held as its mean and a factor F (k × d) with FᵀF = Σ."""

    mean: np.ndarray
    factor: np.ndarray
    n_population: int
    rows_used: int

    @classmethod
    def fit(cls, points: np.ndarray, rng: Optional[np.random.Generator] = None,
            max_rows: int = MAX_POPULATION_ROWS) -> "PopulationGaussian":
        """The Gaussian of ``points`` (N × d, N ≥ 2); more than ``max_rows`` rows are subsampled
        with ``rng`` (seeded) before the covariance is estimated."""
        X = np.asarray(points)
        if X.ndim != 2 or X.shape[0] < 2:
            raise NullError(f"the population null needs a population of at least 2 points, got "
                            f"shape {X.shape}")
        if not all(np.isfinite(X[i:i + 8192]).all() for i in range(0, X.shape[0], 8192)):
            raise InputDataError("the population holds NaN or inf values; repair or drop those rows")
        n_pop = X.shape[0]
        if n_pop > max_rows:  # subsampled before the float64 copy: a 128k × 4096 table is never upcast whole
            gen = rng if rng is not None else np.random.default_rng(0)
            X = X[np.sort(gen.choice(n_pop, size=max_rows, replace=False))]
        X = np.asarray(X, dtype=np.float64)
        mu = X.mean(axis=0)
        cov = moment_matched_covariance(X - mu)
        try:
            factor = np.linalg.cholesky(cov).T
        except np.linalg.LinAlgError:  # singular (no shrinkage and rank-deficient): eigen factor
            lam, V = np.linalg.eigh(cov)
            factor = np.sqrt(np.maximum(lam, 0.0))[:, None] * V.T
        return cls(mu, factor, n_pop, X.shape[0])

    def sample(self, m: int, rng: np.random.Generator) -> np.ndarray:
        """m independent points of N(μ, Σ)."""
        return self.mean + rng.standard_normal((m, self.factor.shape[0])) @ self.factor


@dataclass(frozen=True, eq=False)
class ResamplePool:
    """Real points to draw resampling nulls from.

    ``weights`` (optional, ≥ 0) make a row's draw probability proportional to it (corpus counts of
    tokens); rows of weight 0 are never drawn. ``groups`` (optional, one label per row) keep a set of
    group g from drawing rows of its own group ("positions of other documents")."""

    points: np.ndarray
    weights: Optional[np.ndarray] = None
    groups: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        n = np.asarray(self.points).shape[0]
        for name in ("weights", "groups"):
            v = getattr(self, name)
            if v is not None and np.asarray(v).shape != (n,):
                raise NullError(f"ResamplePool.{name} must hold one value per row ({n}), got shape "
                                f"{np.asarray(v).shape}")
        if self.weights is not None:
            w = np.asarray(self.weights, dtype=np.float64)
            if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
                raise NullError("ResamplePool.weights must be finite, ≥ 0 and not all 0")

    def candidates(self, exclude_group: object = None) -> np.ndarray:
        """Indices of the rows a set may draw (weight > 0, not of ``exclude_group``)."""
        ok = np.ones(np.asarray(self.points).shape[0], dtype=bool)
        if self.weights is not None:
            ok &= np.asarray(self.weights) > 0
        if self.groups is not None and exclude_group is not None:
            ok &= np.asarray(self.groups) != exclude_group
        return np.flatnonzero(ok)

    def draw(self, base: np.ndarray, m: int, rng: np.random.Generator,
             exclude_group: object = None) -> np.ndarray:
        """``base`` (the set's base point) followed by m − 1 distinct rows, none equal to ``base``,
        drawn without replacement (probability ∝ weight when weights are given). Rows that repeat
        one already drawn (a token seen in two documents) are skipped and replaced by new draws."""
        cand = self.candidates(exclude_group)
        points = np.asarray(self.points)
        weights = None if self.weights is None else np.asarray(self.weights, dtype=np.float64)
        need = m - 1
        if cand.size < need:
            where = " outside the set's own group" if self.groups is not None else ""
            raise NullError(f"the resampling null needs {need} real points{where} to draw from, but "
                            f"the pool has {cand.size}; give a larger pool (more documents or tokens)")
        rows = np.empty((0, points.shape[1]))
        base = np.asarray(base, dtype=np.float64)
        seen = {base.tobytes()}
        while rows.shape[0] < need:
            if cand.size == 0:
                raise NullError(f"the resampling null needs {need} distinct real points to draw from, "
                                f"the pool holds only {rows.shape[0]} besides the base point")
            p = None
            if weights is not None:
                w = weights[cand]
                p = w / w.sum()
            k = min(need - rows.shape[0], cand.size)
            pick = rng.choice(cand.size, size=k, replace=False, p=p)
            new = []
            for r in np.asarray(points[cand[pick]], dtype=np.float64):
                key = r.tobytes()
                if key not in seen:
                    seen.add(key)
                    new.append(r)
            if new:
                rows = np.vstack([rows, np.asarray(new)])
            cand = np.delete(cand, pick)
        return np.vstack([base[None, :], rows])
