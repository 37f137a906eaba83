"""The records every part of geoprobe exchanges: probe results, the :class:`GeometryProfile`,
adapter plans and fine-tune results.

This module is the contract of the data flow (DESIGN.md): probes write these records, ``adapters``
writes fine-tune results in this format and ``geoprobe.report`` reads nothing else. Every record is a
frozen dataclass with ``to_dict``/``from_dict``; the profile is saved as JSON with a schema version.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import ProfileError
from .records import Record, read_json, write_json

SCHEMA_VERSION = 1
SCHEMA_NAME = "geoprobe.profile"


# --------------------------------------------------------------------------- probe results
@dataclass(frozen=True)
class PowerLawResult(Record):
    """Discrete power law P(k) ∝ k^(−γ) fitted to the token *frequency distribution*
    (HypLoRA, arXiv 2410.04010 §4.1; Clauset, Shalizi & Newman 2009 for the method).

    ``zipf_exponent`` s = 1/(γ − 1) is the matching rank-law exponent f(r) ∝ r^(−s).
    ``count_values``/``count_multiplicities`` hold the frequency-of-frequency table (how many types
    occur k times), from which both the log-log distribution and the rank-frequency plot are drawn.
    """

    gamma: float
    gamma_err: float
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


@dataclass(frozen=True)
class IDScale(Record):
    """GRIDE estimate at one scale (n1, n2 = 2·n1); ``radius`` is the mean distance of the points to
    their n2-th nearest neighbour, the length scale the estimate describes (scikit-dimension's
    ``radius_scales_``; None in profiles written before it was recorded)."""

    n1: int
    n2: int
    dimension: float
    error: float
    radius: Optional[float] = None


@dataclass(frozen=True)
class IDResult(Record):
    """Intrinsic dimension (TwoNN: Facco et al. 2017; GRIDE: Denti et al. 2022)."""

    dimension: float
    error: float
    estimator: str
    n_points: int
    n_duplicates_removed: int
    linear_fit_dimension: Optional[float] = None
    scales: list[IDScale] = field(default_factory=list)
    backend: str = "cpu"
    seconds: float = 0.0


# --------------------------------------------------------------------------- profile parts
@dataclass(frozen=True)
class DeltaStat(Record):
    """δ_rel of a set of point clouds beside a matched Gaussian null.

    ``values`` are the data's δ_rel (one per prompt, or one per seeded sample); ``null_values`` the
    null's (same n and dimension, Gaussian with the data's mean and covariance, seeded repeats).
    """

    what: str
    mean: float
    std: float
    null_mean: float
    null_std: float
    n_points: int
    dim: int
    n_sets: int
    mode: str
    values: list[float] = field(default_factory=list)
    null_values: list[float] = field(default_factory=list)
    diameter: Optional[float] = None

    @property
    def side_of_null(self) -> str:
        """'below' (more tree-like than random), 'above', or 'within' (inside 2 null std)."""
        spread = 2.0 * max(self.null_std, 1e-12)
        if self.mean < self.null_mean - spread:
            return "below"
        if self.mean > self.null_mean + spread:
            return "above"
        return "within"


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
