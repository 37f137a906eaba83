"""The records every part of geoprobe exchanges: probe results, the :class:`GeometryProfile`,
adapter plans and fine-tune results.

This module is the contract of the data flow (DESIGN.md): probes write these records, ``adapters``
writes fine-tune results in this format and ``geoprobe.report`` reads nothing else. Every record is a
frozen dataclass with ``to_dict``/``from_dict``; the profile is saved as JSON with a schema version.
A profile's ``repr`` is a few lines of headline numbers; ``to_frame()`` and ``layers_frame()`` give
its results as pandas tables (the optional extra ``geoprobe[pandas]``).
"""
from __future__ import annotations

import dataclasses
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Protocol

from .errors import ProfileError
from .records import Record, read_json, write_json
from .runtime import optional_module

if TYPE_CHECKING:
    import pandas

SCHEMA_VERSION = 2
SCHEMA_NAME = "geoprobe.profile"


# --------------------------------------------------------------------------- probe results
PROBE_METADATA = ("n_points", "dim", "seconds", "backend", "dtype", "seed")
"""What every probe result carries under the same names (:class:`PowerLawResult`,
:class:`NormFrequencyResult`, :class:`DeltaResult`, :class:`IDResult`, :class:`DeltaStat`): the
number of items measured (points, or token types/tokens for the frequency probes), their dimension
(0 for a distance matrix), seconds taken, the backend that ran ("numba-cpu", "torch-cuda", "cpu", …),
the dtype of the arithmetic, and the seed of any random draw (None when nothing was drawn).
Uncertainty is in a field named ``error`` (a standard error) and, where intervals are computed, in
``ci_low``/``ci_high``."""


class ProbeResult(Protocol):
    """The metadata protocol of :data:`PROBE_METADATA`."""

    n_points: int
    dim: int
    seconds: float
    backend: str
    dtype: str
    seed: Optional[int]


@dataclass(frozen=True)
class PowerLawResult(Record):
    """Discrete power law P(k) ∝ k^(−γ) fitted to the token *frequency distribution*
    (HypLoRA, arXiv 2410.04010 §4.1; Clauset, Shalizi & Newman 2009 for the method).

    ``error`` is γ's standard error (the name every probe result uses; ``gamma_err`` reads the same).
    ``zipf_exponent`` s = 1/(γ − 1) is the matching rank-law exponent f(r) ∝ r^(−s).
    ``count_values``/``count_multiplicities`` hold the frequency-of-frequency table (how many types
    occur k times), from which both the log-log distribution and the rank-frequency plot are drawn.
    """

    gamma: float
    error: float
    xmin: int
    zipf_exponent: float
    ks_distance: float
    n_types: int
    n_tokens: int
    n_tail_types: int
    lognormal_converged: bool = False
    lognormal_loglikelihood_ratio: Optional[float] = None
    lognormal_p: Optional[float] = None
    count_values: list[int] = field(default_factory=list)
    count_multiplicities: list[int] = field(default_factory=list)
    seconds: float = 0.0
    backend: str = "cpu"
    dtype: str = "float64"
    seed: Optional[int] = None
    dim: int = 1

    @property
    def n_points(self) -> int:
        """Items measured: the token types counted (:data:`PROBE_METADATA`)."""
        return self.n_types

    @property
    def gamma_err(self) -> float:
        """γ's standard error (the same as ``error``)."""
        return self.error

    def check(self) -> Optional[str]:
        if len(self.count_values) != len(self.count_multiplicities):
            return (f"count_values has {len(self.count_values)} entries but count_multiplicities "
                    f"{len(self.count_multiplicities)}; they must pair up")
        return None


@dataclass(frozen=True)
class NormBin(Record):
    """Tokens whose log10 frequency lies in [lo, hi): their embedding-norm statistics."""

    lo: float
    hi: float
    n: int
    mean: float
    min: float
    max: float


@dataclass(frozen=True)
class WordNorm(Record):
    """One word of a paper word group, as this model's tokenizer splits it.

    ``rule`` states how the norm was taken (e.g. "first token of ' dog'", "mean over 2 tokens").
    """

    word: str
    tokens: list[str]
    token_ids: list[int]
    norm: float
    multi_token: bool
    rule: str


@dataclass(frozen=True)
class WordGroup(Record):
    name: str
    mean_norm: float
    words: list[WordNorm]
    paper_mean_norm: Optional[float] = None


@dataclass(frozen=True)
class Density2D(Record):
    """A 2-D histogram (x = log10 frequency, y = norm) for the density plot."""

    x_edges: list[float]
    y_edges: list[float]
    counts: list[list[int]]

    def check(self) -> Optional[str]:
        nx, ny = len(self.x_edges) - 1, len(self.y_edges) - 1
        if len(self.counts) != max(nx, 0) or any(len(row) != ny for row in self.counts):
            return f"counts must be a {max(nx, 0)} × {max(ny, 0)} table (one cell per pair of bins)"
        return None


@dataclass(frozen=True)
class NormFrequencyResult(Record):
    """Embedding norm against token frequency (HypLoRA §4.1, Table 1): Spearman ρ between norm and
    log-frequency over tokens seen, log-frequency bins, and the paper's four word groups."""

    spearman_rho: float
    spearman_p: float
    n_tokens_seen: int
    mean_norm_seen: float
    mean_norm_unseen: Optional[float]
    bins: list[NormBin]
    groups: list[WordGroup]
    density: Optional[Density2D] = None
    seconds: float = 0.0
    backend: str = "cpu"
    dtype: str = "float64"
    seed: Optional[int] = None
    dim: int = 1

    @property
    def n_points(self) -> int:
        """Items measured: the tokens seen in the corpus (:data:`PROBE_METADATA`)."""
        return self.n_tokens_seen


@dataclass(frozen=True)
class DeltaResult(Record):
    """Gromov δ-hyperbolicity of a finite metric space (Khrulkov et al. 2020; Gromov 1987).

    δ_rel = 2δ / diam. ``mode`` "fixed" is the base-point value δ_w (δ_w ≤ δ ≤ 2δ_w); "exact" is the
    maximum over all base points, equal to the four-point δ.
    """

    delta: float
    diameter: float
    delta_rel: float
    n_points: int
    mode: str
    base_point: Optional[int]
    backend: str
    dtype: str
    seconds: float = 0.0
    dim: int = 0
    seed: Optional[int] = None


@dataclass(frozen=True)
class IDScale(Record):
    """GRIDE estimate at one scale (n1, n2 = 2·n1); ``radius`` is the mean distance of the points to
    their n2-th nearest neighbour, the length scale the estimate describes (scikit-dimension's
    ``radius_scales_``; None in profiles written before it was recorded). ``error`` is the bootstrap
    standard error when a bootstrap ran, else 1/sqrt(observed Fisher information); ``ci_low`` and
    ``ci_high`` bound the bootstrap percentile interval (None without a bootstrap)."""

    n1: int
    n2: int
    dimension: float
    error: float
    radius: Optional[float] = None
    ci_low: Optional[float] = None
    ci_high: Optional[float] = None

    def check(self) -> Optional[str]:
        return _error_problem(f"GRIDE (n1={self.n1})", self.error)


@dataclass(frozen=True)
class IDResult(Record):
    """Intrinsic dimension (TwoNN: Facco et al. 2017; GRIDE: Denti et al. 2022).

    TwoNN: ``dimension`` is the paper's line fit after discarding the largest 10 % of the ratios
    (scikit-dimension's and DADApy's default; equal to ``linear_fit_dimension``), ``mle_dimension``
    the unbiased maximum-likelihood estimate (N − 1)/Σ log μ_i. GRIDE: ``dimension`` is the estimate
    at the scale ``scale_n1`` (every scale in ``scales``), chosen by the rule ``scale_rule`` states.
    ``error`` is the bootstrap standard error when a bootstrap ran (``n_boot`` > 0, resampling
    ``n_groups`` groups of points), else the analytic one (:mod:`geoprobe.probes.intrinsic_dim`);
    ``ci_low``/``ci_high`` bound the bootstrap percentile interval at level ``ci_level``; TwoNN keeps
    the bootstrap replicates of ``dimension`` in ``replicates`` (6 significant digits; the same
    resampled documents in every layer, so the adapter planner can read the curve's joint spread).
    Profiles written before these fields existed read with their defaults."""

    dimension: float
    error: float
    estimator: str
    n_points: int
    n_duplicates_removed: int
    linear_fit_dimension: Optional[float] = None
    scales: list[IDScale] = field(default_factory=list)
    backend: str = "cpu"
    seconds: float = 0.0
    mle_dimension: Optional[float] = None
    ci_low: Optional[float] = None
    ci_high: Optional[float] = None
    ci_level: Optional[float] = None
    n_boot: int = 0
    n_groups: int = 0
    scale_n1: Optional[int] = None
    scale_rule: str = ""
    replicates: list[float] = field(default_factory=list)
    dim: int = 0
    dtype: str = "float64"
    seed: Optional[int] = None

    def check(self) -> Optional[str]:
        return _error_problem(self.estimator, self.error)


VERDICTS = ("below", "within", "above")
"""The verdicts a δ comparison can reach (METHODS.md §3b)."""


def _error_problem(what: str, error: Optional[float]) -> Optional[str]:
    """A standard error read from a file is a number ≥ 0 (NaN: not computed)."""
    if error is not None and error == error and error < 0:
        return f"{what} error is {error}; a standard error is never negative"
    return None


# --------------------------------------------------------------------------- profile parts
NULL_KINDS = ("own", "population", "resample")
"""The nulls a δ_rel is compared with (METHODS.md §3b; drawn by :mod:`geoprobe.probes.nulls`)."""

NULL_NAMES = {"own": "own-covariance Gaussian", "population": "population Gaussian",
              "resample": "resampled real points"}
"""Short names used in tables and sentences."""

NULL_QUESTIONS = {
    "own": "more tree-like than a Gaussian with the set's own mean and covariance?",
    "population": "more tree-like than Gaussian points with the mean and covariance of the population "
                  "the set was drawn from?",
    "resample": "more tree-like than the same number of real points drawn at random from that "
                "population (same base point)?",
}
"""The question each null answers, as the report states it."""


@dataclass(frozen=True)
class NullComparison(Record):
    """The data's δ_rel against one null, set by set (METHODS.md §3b; :mod:`geoprobe.probes.nulls`).

    ``null`` is "own" (Gaussian with the set's own mean and covariance), "population" (Gaussian with
    the population's) or "resample" (real points drawn at random); ``question`` says what it tests.
    ``values`` holds the null's δ_rel for each set (the mean over its repeats), in the order of
    :attr:`DeltaStat.values`. The paired differences d_i = data_i − null_i give ``diff_mean`` and
    ``share_below`` (the share of sets with d_i < 0); every ``*_ci_*`` pair is a percentile-bootstrap
    interval over sets at :attr:`DeltaStat.level`. ``p_value`` tests mean(d) = 0 (two-sided bootstrap
    p), ``p_adjusted`` is that p after the correction named in :attr:`DeltaStat.correction`, and
    ``verdict`` is "below" (more tree-like than this null), "above" or "within" (the interval of the
    difference holds 0, after correction).
    """

    null: str
    question: str
    values: list[float]
    mean: float
    ci_low: Optional[float] = None
    ci_high: Optional[float] = None
    diff_mean: float = 0.0
    diff_ci_low: Optional[float] = None
    diff_ci_high: Optional[float] = None
    share_below: float = 0.0
    share_ci_low: Optional[float] = None
    share_ci_high: Optional[float] = None
    p_value: Optional[float] = None
    p_adjusted: Optional[float] = None
    verdict: str = "within"

    def check(self) -> Optional[str]:
        if self.null not in NULL_KINDS:
            return f"null is {self.null!r}; expected one of {', '.join(NULL_KINDS)}"
        if self.verdict not in VERDICTS:
            return f"verdict is {self.verdict!r}; expected one of {', '.join(VERDICTS)}"
        return None


@dataclass(frozen=True)
class DeltaStat(Record):
    """δ_rel of a group of point sets beside its nulls, with bootstrap intervals.

    ``values`` are the data's δ_rel, one per set (a prompt, a token sample, a document's positions);
    ``mean`` ± ``std`` their mean and standard deviation (HypLoRA's Table 2 form) and
    ``ci_low``/``ci_high`` the bootstrap interval of the mean. ``nulls`` holds one
    :class:`NullComparison` per null. ``verdict`` is the most conservative of theirs: "below" or
    "above" only when every null agrees, otherwise "within"; ``verdict_reason`` says why.
    ``n_points`` is the median number of distinct points per set.
    """

    what: str
    mean: float
    std: float
    n_points: int
    dim: int
    n_sets: int
    mode: str
    values: list[float] = field(default_factory=list)
    ci_low: Optional[float] = None
    ci_high: Optional[float] = None
    nulls: list[NullComparison] = field(default_factory=list)
    verdict: str = "within"
    verdict_reason: str = ""
    level: float = 0.95
    n_boot: int = 0
    null_repeats: int = 1
    correction: str = "single test, no correction"
    diameter: Optional[float] = None
    backend: str = ""
    dtype: str = "float64"
    seed: Optional[int] = None
    seconds: float = 0.0

    @property
    def side_of_null(self) -> str:
        """The conservative verdict: 'below' (more tree-like than every null), 'above', or 'within'."""
        return self.verdict

    def null(self, kind: str) -> Optional[NullComparison]:
        """The comparison with null ``kind`` ("own", "population", "resample"), or None."""
        return next((c for c in self.nulls if c.null == kind), None)

    def check(self) -> Optional[str]:
        if self.verdict not in VERDICTS:
            return f"verdict is {self.verdict!r}; expected one of {', '.join(VERDICTS)}"
        if self.values and len(self.values) != self.n_sets:
            return f"n_sets is {self.n_sets} but values holds {len(self.values)}"
        for c in self.nulls:
            if self.values and c.values and len(c.values) != len(self.values):
                return (f"the {c.null!r} null holds {len(c.values)} values for {len(self.values)} sets; "
                        "they must pair up")
        return None


@dataclass(frozen=True)
class LayerGeometry(Record):
    """Geometry of one layer's hidden states (index 0 = embedding output, i = output of block i)."""

    layer: int
    n_positions: int
    n_sinks_excluded: int
    norm_median: float
    norm_max: float
    twonn: Optional[IDResult] = None
    gride: Optional[IDResult] = None
    delta: Optional[DeltaStat] = None


@dataclass(frozen=True)
class SinkReport(Record):
    """Positions with massive activations (attention sinks) left out of per-layer δ and ID.

    A position is a sink when its hidden-state norm exceeds ``factor`` × the layer's median norm in
    any layer (Sun et al. 2024, "Massive activations in large language models").
    """

    factor: float
    n_positions: int
    n_excluded: int
    excluded_by_layer: list[int]
    positions_in_sequence: list[int]
    reason: str
    norm_quantiles_by_layer: list[list[float]] = field(default_factory=list)
    quantile_levels: list[float] = field(default_factory=lambda: [0.0, 0.5, 0.9, 0.99, 1.0])


@dataclass(frozen=True)
class ModelInfo(Record):
    name: str
    source: str
    architecture: str
    model_type: str
    n_parameters: int
    vocab_size: int
    hidden_size: int
    n_layers: int
    dtype: str
    is_encoder: bool = False


@dataclass(frozen=True)
class CorpusInfo(Record):
    name: str
    sha256: str
    n_documents: int
    n_tokens: int
    n_characters: int
    field: Optional[str] = None


@dataclass(frozen=True)
class AdapterPlanRecord(Record):
    """An adapter plan as stored in a profile (written by ``adapters.plan``)."""

    method: str
    data: dict[str, Any]


@dataclass(frozen=True)
class FinetuneResult(Record):
    """A fine-tune run: settings, loss curve, evaluation (written by ``adapters.train``)."""

    method: str
    model: str
    data: str
    settings: dict[str, Any]
    seed: int
    loss_steps: list[int]
    loss_values: list[float]
    eval_metrics: dict[str, float] = field(default_factory=dict)
    trainable_parameters: int = 0
    seconds: float = 0.0
    tokens_per_second: Optional[float] = None
    versions: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class GeometryProfile(Record):
    """Everything geoprobe measured about one model on one corpus."""

    model: ModelInfo
    corpus: CorpusInfo
    frequency: Optional[PowerLawResult]
    norms: Optional[NormFrequencyResult]
    delta_prompts: Optional[DeltaStat]
    delta_tokens: Optional[DeltaStat]
    layers: list[LayerGeometry]
    sinks: Optional[SinkReport]
    settings: dict[str, Any]
    seed: int
    versions: dict[str, str]
    timings: dict[str, float]
    command: str = ""
    created: str = ""
    adapter_plan: Optional[AdapterPlanRecord] = None
    finetune: list[FinetuneResult] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["schema"] = SCHEMA_NAME
        return d

    def save(self, path: str | os.PathLike) -> Path:
        """Write the profile as JSON (atomically)."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GeometryProfile":
        """Read a profile saved by :meth:`save`; raise :class:`ProfileError` on a bad file."""
        p = Path(path)
        data = read_json(p, "profile", error=ProfileError, missing=f"profile {p} does not exist")
        return cls.from_json_dict(data, str(p))

    @classmethod
    def from_json_dict(cls, data: Any, where: str = "profile") -> "GeometryProfile":
        if not isinstance(data, dict) or data.get("schema") != SCHEMA_NAME:
            raise ProfileError(f"{where} is not a geoprobe profile (no \"schema\": \"{SCHEMA_NAME}\")")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ProfileError(
                f"{where} has schema version {version!r}; this geoprobe reads version {SCHEMA_VERSION}. "
                "Re-run `geoprobe probe` to make a new profile.")
        body = {k: v for k, v in data.items() if k != "schema"}
        try:
            return cls.from_dict(body)
        except ProfileError as exc:
            raise ProfileError(f"{where} is malformed: {exc}") from None
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise ProfileError(f"{where} is malformed: {exc}") from None

    def with_updates(self, **changes: Any) -> "GeometryProfile":
        return dataclasses.replace(self, **changes)

    def check(self) -> Optional[str]:
        indices = [layer.layer for layer in self.layers]
        if indices != list(range(len(indices))):
            return f"layers must be numbered 0, 1, 2, … in order, got {indices[:8]}"
        return None

    def __repr__(self) -> str:
        return "\n".join(summary_lines(self))

    def to_frame(self) -> "pandas.DataFrame":
        """One row per probe result (columns :data:`PROBE_COLUMNS`, rows as :func:`probe_rows`
        builds them). Needs pandas: ``pip install "geoprobe[pandas]"``."""
        return _frame(probe_rows(self), PROBE_COLUMNS, "GeometryProfile.to_frame()")

    def layers_frame(self) -> "pandas.DataFrame":
        """One row per layer with its δ and intrinsic-dimension columns (:data:`LAYER_COLUMNS`, rows
        as :func:`layer_rows` builds them). Needs pandas: ``pip install "geoprobe[pandas]"``."""
        return _frame(layer_rows(self), LAYER_COLUMNS, "GeometryProfile.layers_frame()")


# --------------------------------------------------------------------------- tables
NULL_FIELDS = (("", "mean"), ("_diff", "diff_mean"), ("_diff_ci_low", "diff_ci_low"),
               ("_diff_ci_high", "diff_ci_high"), ("_share_below", "share_below"), ("_p", "p_value"),
               ("_p_adjusted", "p_adjusted"), ("_verdict", "verdict"))
"""(column suffix, :class:`NullComparison` field) of the per-null columns of both tables."""

NULL_COLUMNS = tuple(f"null_{kind}{suffix}" for kind in NULL_KINDS for suffix, _ in NULL_FIELDS)
"""Per null kind k ("own", "population", "resample"): ``null_k`` (the null's mean δ_rel),
``null_k_diff`` with ``null_k_diff_ci_low``/``null_k_diff_ci_high`` (mean paired difference
data − null and its bootstrap interval), ``null_k_share_below`` (share of sets below their null),
``null_k_p`` and ``null_k_p_adjusted`` (bootstrap p before and after the correction across tests)
and ``null_k_verdict`` ("below", "within", "above"). Empty where that null was not computed."""

PROBE_COLUMNS = ("probe", "layer", "statistic", "value", "error", "ci_low", "ci_high", "verdict",
                 *NULL_COLUMNS, "n", "n_sets", "seconds")
"""Columns of :meth:`GeometryProfile.to_frame`, one row per probe result: the probe ("power_law",
"norm_frequency", "delta_prompts", "delta_tokens", "delta_layer", "twonn", "gride"), the layer (layer
probes only), the statistic's name and value, its error (γ's standard error, the std of δ_rel over
sets, the ID's standard error), for δ the bootstrap interval of the mean (``ci_low``, ``ci_high``),
the conservative verdict over the nulls and the :data:`NULL_COLUMNS` of each null, then the number of
items measured (token types, tokens seen, points per set, points), of sets, and seconds taken.
Compare the nulls of one row side by side, e.g. ``frame.filter(like="_verdict")``."""

LAYER_COLUMNS = ("layer", "n_positions", "n_sinks_excluded", "norm_median", "norm_max",
                 "delta_rel", "delta_rel_std", "delta_rel_ci_low", "delta_rel_ci_high",
                 "delta_verdict", "delta_sets", "delta_points", *NULL_COLUMNS, "delta_correction",
                 "twonn", "twonn_error", "twonn_ci_low", "twonn_ci_high", "twonn_linear_fit",
                 "twonn_mle", "twonn_points", "n_duplicates_removed", "gride", "gride_error",
                 "gride_ci_low", "gride_ci_high", "gride_n1", "gride_points")
"""Columns of :meth:`GeometryProfile.layers_frame`, one row per layer: :class:`LayerGeometry`'s
counts and norms; its δ_rel (mean over sets, std, bootstrap interval of the mean), the conservative
verdict over the nulls, the number of sets (documents) and median points per set, the
:data:`NULL_COLUMNS` of each null and the correction across layers behind their adjusted p-values
and verdicts; its TwoNN (line fit, error, bootstrap interval, line fit again under its own name, MLE,
points, duplicates removed) and GRIDE (dimension at the shared scale, error, bootstrap interval,
scale n1, points) estimates. NaN or None where a layer lacks the result or the value was not
computed."""


def _null_cells(stat: DeltaStat) -> dict[str, Any]:
    """The :data:`NULL_COLUMNS` of ``stat`` (nulls it lacks are left out of the row)."""
    row: dict[str, Any] = {}
    for c in stat.nulls:
        if c.null in NULL_KINDS:
            row |= {f"null_{c.null}{suffix}": getattr(c, name) for suffix, name in NULL_FIELDS}
    return row


def _delta_row(probe: str, stat: DeltaStat, layer: Optional[int] = None) -> dict[str, Any]:
    return {"probe": probe, "layer": layer, "statistic": "delta_rel", "value": stat.mean,
            "error": stat.std, "ci_low": stat.ci_low, "ci_high": stat.ci_high,
            "verdict": stat.verdict, "n": stat.n_points, "n_sets": stat.n_sets,
            "seconds": stat.seconds} | _null_cells(stat)


def _id_row(result: IDResult, layer: int) -> dict[str, Any]:
    return {"probe": result.estimator, "layer": layer, "statistic": "dimension",
            "value": result.dimension, "error": result.error, "n": result.n_points,
            "seconds": result.seconds}


def probe_rows(profile: GeometryProfile) -> list[dict[str, Any]]:
    """The rows of :meth:`GeometryProfile.to_frame`: the power law's γ, the norm–frequency Spearman ρ,
    δ_rel of the prompts and of the token samples, then per layer its δ_rel, TwoNN and GRIDE
    dimension; results the profile lacks give no row. Keys missing from a row read as empty."""
    rows: list[dict[str, Any]] = []
    if profile.frequency is not None:
        f = profile.frequency
        rows.append({"probe": "power_law", "statistic": "gamma", "value": f.gamma,
                     "error": f.error, "n": f.n_types, "seconds": f.seconds})
    if profile.norms is not None:
        rows.append({"probe": "norm_frequency", "statistic": "spearman_rho",
                     "value": profile.norms.spearman_rho, "n": profile.norms.n_tokens_seen})
    for probe, stat in (("delta_prompts", profile.delta_prompts),
                        ("delta_tokens", profile.delta_tokens)):
        if stat is not None:
            rows.append(_delta_row(probe, stat))
    for lg in profile.layers:
        if lg.delta is not None:
            rows.append(_delta_row("delta_layer", lg.delta, lg.layer))
        rows.extend(_id_row(r, lg.layer) for r in (lg.twonn, lg.gride) if r is not None)
    return rows


def layer_rows(profile: GeometryProfile) -> list[dict[str, Any]]:
    """The rows of :meth:`GeometryProfile.layers_frame`, one per :class:`LayerGeometry`."""
    rows = []
    for lg in profile.layers:
        row: dict[str, Any] = {"layer": lg.layer, "n_positions": lg.n_positions,
                               "n_sinks_excluded": lg.n_sinks_excluded,
                               "norm_median": lg.norm_median, "norm_max": lg.norm_max}
        if lg.delta is not None:
            d = lg.delta
            row |= {"delta_rel": d.mean, "delta_rel_std": d.std, "delta_rel_ci_low": d.ci_low,
                    "delta_rel_ci_high": d.ci_high, "delta_verdict": d.verdict,
                    "delta_sets": d.n_sets, "delta_points": d.n_points,
                    "delta_correction": d.correction} | _null_cells(d)
        if lg.twonn is not None:
            t = lg.twonn
            row |= {"twonn": t.dimension, "twonn_error": t.error, "twonn_ci_low": t.ci_low,
                    "twonn_ci_high": t.ci_high, "twonn_linear_fit": t.linear_fit_dimension,
                    "twonn_mle": t.mle_dimension, "twonn_points": t.n_points,
                    "n_duplicates_removed": t.n_duplicates_removed}
        if lg.gride is not None:
            g = lg.gride
            row |= {"gride": g.dimension, "gride_error": g.error, "gride_ci_low": g.ci_low,
                    "gride_ci_high": g.ci_high, "gride_n1": g.scale_n1, "gride_points": g.n_points}
        rows.append(row)
    return rows


_INTEGER_COLUMNS = ("layer", "n", "n_sets", "n_positions", "n_sinks_excluded", "delta_sets",
                    "delta_points", "twonn_points", "n_duplicates_removed", "gride_n1", "gride_points")


def _frame(rows: list[dict[str, Any]], columns: tuple[str, ...], purpose: str) -> "pandas.DataFrame":
    """``rows`` as a DataFrame with exactly ``columns``; count columns hold pandas' nullable
    integers (missing = <NA>), numbers missing from a row are NaN."""
    pd = optional_module("pandas", "pandas", purpose)
    frame = pd.DataFrame.from_records(rows, columns=list(columns))
    for name in _INTEGER_COLUMNS:
        if name in frame.columns:
            frame[name] = frame[name].astype("Int64")
    return frame


# --------------------------------------------------------------------------- summary (repr)
def _num(x: Optional[float], digits: int = 3) -> str:
    return f"{x:.{digits}g}" if isinstance(x, (int, float)) and math.isfinite(x) else "–"


_COUNT_WORDS = {1: "one", 2: "two", 3: "three"}


def _delta_lines(label: str, stat: Optional[DeltaStat]) -> list[str]:
    """Two repr lines for one δ: the mean with its interval, sets and conservative verdict; then each
    null's mean and verdict. One line ("–") when there is no δ."""
    head = f"  {'δ_rel' if label == 'prompts' else '':<11}{label:<8}"
    if stat is None:
        return [head + "–"]
    ci = f" [{_num(stat.ci_low)}, {_num(stat.ci_high)}]" if stat.ci_low is not None else ""
    n = len(stat.nulls)
    over = f"most conservative of {_COUNT_WORDS.get(n, str(n))} null{'s' if n != 1 else ''}"
    first = f"{head}{_num(stat.mean)}{ci} over {stat.n_sets:,} sets: {stat.verdict} ({over})"
    nulls = ", ".join(f"{c.null} {_num(c.mean)} {c.verdict}" for c in stat.nulls) or "none computed"
    return [first, f"{'':<13}{'':<8}nulls {_short(nulls, 90)}"]


def _layer_delta_text(layers: list[LayerGeometry]) -> str:
    """Range of the layers' δ_rel and how many get each conservative verdict (the correction across
    layers named by its method)."""
    stats = [lg.delta for lg in layers if lg.delta is not None]
    text = f"δ_rel {_range_text([d.mean for d in stats])}"
    if stats:
        counts = "/".join(str(sum(d.verdict == v for d in stats)) for v in ("below", "within", "above"))
        method = _short(stats[0].correction.split(" across ")[0], 24)
        text += f"; verdict over all nulls below/within/above {counts} ({method})"
    return text


def _range_text(values: list[float]) -> str:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return "–"
    return f"{_num(min(finite))}–{_num(max(finite))} (median {_num(statistics.median(finite))})"


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def summary_lines(profile: GeometryProfile) -> list[str]:
    """The lines of a profile's ``repr``: model, corpus, headline numbers (γ, Spearman ρ; δ_rel of
    prompts and tokens with its interval, the conservative verdict and each null's mean and verdict;
    per-layer ranges of TwoNN, GRIDE and δ_rel with the layers' verdict counts), seed, date, plan and
    fine-tune runs. Each is at most about 120 characters, whatever the profile holds."""
    m, c, ls = profile.model, profile.corpus, profile.layers
    f, nf = profile.frequency, profile.norms
    gamma = f"γ = {_num(f.gamma)} ± {_num(f.error, 2)} (x_min {f.xmin})" if f else "γ –"
    rho = f"Spearman ρ(norm, log frequency) = {_num(nf.spearman_rho)}" if nf else "ρ –"
    lines = [f"GeometryProfile of {_short(m.name)} ({_short(m.architecture, 30)}, "
             f"{m.n_parameters:,} parameters, {m.n_layers} blocks, hidden {m.hidden_size})",
             f"  corpus     {_short(c.name)}: {c.n_documents:,} documents, {c.n_tokens:,} tokens, "
             f"sha256 {c.sha256[:12]}…",
             f"  frequency  {gamma}; {rho}",
             *_delta_lines("prompts", profile.delta_prompts),
             *_delta_lines("tokens", profile.delta_tokens)]
    if ls:
        lines.append(f"  layers     {len(ls)}: TwoNN {_range_text([lg.twonn.dimension for lg in ls if lg.twonn])}, "
                     f"GRIDE {_range_text([lg.gride.dimension for lg in ls if lg.gride])}")
        lines.append(f"             {_layer_delta_text(ls)}")
    extra = [f"seed {profile.seed}", f"created {profile.created or '–'}"]
    if profile.adapter_plan is not None:
        extra.append(f"plan {_short(profile.adapter_plan.method, 20)}")
    if profile.finetune:
        extra.append(f"{len(profile.finetune)} fine-tune runs")
    lines.append("  " + ", ".join(extra))
    return lines
