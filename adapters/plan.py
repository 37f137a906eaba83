"""From a GeometryProfile to an adapter plan: HypLoRA curvature, GeLoRA ranks, HydraLoRA heads.

Every choice carries its reason, and the plan saves to JSON and into the profile for the report.

Curvature (HypLoRA, arXiv 2410.04010, with Khrulkov et al. 2020 §3.2): a Poincaré ball of curvature
−c fits data of unit diameter and relative hyperbolicity δ_rel when c = (0.144/δ_rel)², 0.144 being
δ_rel of the ball itself. Scaling a metric space by λ multiplies the fitting curvature by 1/λ². HypLoRA
maps x/s into the hyperboloid of radius √K (curvature −1/K, i.e. c = 1/K), with s initialised to √d_in,
so the data it sees has diameter D = diam(prompt embeddings)/√d. Hence

    K = 1/c_D = D² · (δ_rel/0.144)²,

clamped to [K_MIN, K_MAX] (the learnable K moves from there). δ_rel is the per-prompt input-embedding
value, the quantity HypLoRA reports. When δ_rel is not below every one of its three nulls (the
conservative verdict of :class:`geoprobe.profile.DeltaStat`), the data is not shown to be more
tree-like than random points of its dimension; ``auto`` then does not choose HypLoRA.

Ranks (GeLoRA, arXiv 2412.09250): from per-layer TwoNN dimensions, block i reads layer i−1 and writes
layer i; rule ``diff``, ``max`` or ``budget`` (see :mod:`adapters.gelora`). The paper's rule uses the
difference of neighbouring layers' dimensions, r_i ∝ max(d_i − d_(i−1), 0), and differences of
estimates a few percent apart are mostly noise (METHODS.md §3b). So the dimensions are read from the
profile's block bootstrap over documents: d_i is the median of layer i's bootstrap replicates (robust
to their skew), and the curve is smoothed by a centred three-layer moving average
s_i = (d_(i−1) + d_i + d_(i+1))/3 (two layers at the ends) before the rule is applied. The smoothed
difference s_i − s_(i−1) = (d_(i+1) − d_(i−2))/3 estimates the same local slope of the ID curve as
d_i − d_(i−1), with a ninth of its variance for independent errors (2σ²/9 against 2σ²), at the cost
of spreading a change over three blocks. For the ``budget`` rule every block's score is
max(s_i − s_(i−1), 0) + σ̂ with σ̂ the median over blocks of the bootstrap standard deviation of
s_i − s_(i−1): growth below its own noise is not resolved, so a block whose curve is flat gets the
share of a block whose growth is at the noise level, not the floor (on SmolLM2 and GSM8K prompts,
σ̂ ≈ 0.06 ID units; with the fixed floor 10⁻³ the plateau's blocks swung between rank 1 and 36 from
one seed to the next). ``rank_ranges`` gives, per block, the 2.5–97.5 % range of the
ranks the same rule plans from each bootstrap replicate of the curve (replicates are resampled jointly
across layers, the same documents for every layer).

Heads (HydraLoRA, arXiv 2404.19245): N = the k of k-means (k = 2…10) with the best silhouette on the
training examples' embeddings (mean-pooled last hidden state), as the paper chose N by clustering.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from geoprobe.errors import AdapterError, PlanError
from geoprobe.records import read_json, write_json
from geoprobe.profile import AdapterPlanRecord, GeometryProfile

from . import registry
from .registry import AUTO, Method

KHRULKOV_BALL_DELTA_REL = 0.144
K_MIN, K_MAX = 0.05, 20.0
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


PLAN_SCHEMA = "geoprobe.adapter_plan"


def _is_int(v: Any, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _is_number(v: Any, positive: bool = False) -> bool:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return ok and (v > 0 if positive else True)


def _is_list(v: Any, item: Any) -> bool:
    return isinstance(v, (list, tuple)) and all(item(x) for x in v)


_PLAN_FIELDS: dict[str, tuple[Any, str]] = {
    "method": (lambda v: isinstance(v, str), "a method name"),
    "r": (lambda v: _is_int(v, 1), "an integer ≥ 1"),
    "alpha": (lambda v: _is_number(v, positive=True), "a positive number"),
    "target_modules": (lambda v: isinstance(v, (list, tuple)) and len(v) > 0
                       and all(isinstance(t, str) and t.strip() for t in v),
                       "a non-empty list of module names such as [\"q_proj\", \"v_proj\"]"),
    "curvature": (lambda v: v is None or _is_number(v, positive=True), "a positive number or null"),
    "layer_ranks": (lambda v: v is None or (_is_list(v, lambda x: _is_int(x, 0)) and len(v) > 0),
                    "null or a non-empty list of integers ≥ 0, one per block"),
    "rank_rule": (lambda v: v is None or isinstance(v, str), "null or a rule name"),
    "rank_ranges": (lambda v: v is None or _is_list(v, lambda x: _is_list(x, lambda y: _is_int(y, 0))
                                                    and len(x) == 2),
                    "null or a list of [low, high] integer pairs"),
    "id_curve": (lambda v: v is None or _is_list(v, _is_number), "null or a list of finite numbers"),
    "n_heads": (lambda v: v is None or _is_int(v, 1), "null or an integer ≥ 1"),
    "silhouettes": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and _is_number(x)
                                                          for k, x in v.items()),
                    "an object of finite numbers"),
    "reasons": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str)
                                                      for k, x in v.items()),
                "an object of sentences"),
    "model": (lambda v: isinstance(v, str), "a string"),
}


def check_plan_fields(d: dict[str, Any], where: str = "adapter plan") -> None:
    """Check the type and range of every field of a plan read from a file (finite numbers, integer
    ranks, a list where a list is expected: a string for ``target_modules`` would be split into
    letters); the first problem is a PlanError naming ``where`` and the field."""
    for name, value in d.items():
        ok, want = _PLAN_FIELDS.get(name, (lambda v: True, ""))
        if ok(value):
            continue
        got = json.dumps(value, default=str)
        got = got if len(got) <= 60 else got[:59] + "…"
        raise PlanError(f"{where}: {name} must be {want}, got {got}")
    if d.get("layer_ranks") is not None and d.get("rank_ranges") is not None \
            and len(d["rank_ranges"]) != len(d["layer_ranks"]):
        raise PlanError(f"{where}: rank_ranges has {len(d['rank_ranges'])} entries for "
                        f"{len(d['layer_ranks'])} layer_ranks; they must pair up")


@dataclass(frozen=True)
class AdapterPlan:
    """What to build and why. ``reasons`` maps each decision to a sentence."""

    method: str
    r: int = 32
    alpha: float = 64.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    curvature: Optional[float] = None
    layer_ranks: Optional[list[int]] = None
    rank_rule: Optional[str] = None
    rank_ranges: Optional[list[list[int]]] = None
    id_curve: Optional[list[float]] = None
    n_heads: Optional[int] = None
    silhouettes: dict[str, float] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    model: str = ""

    def __post_init__(self):
        _method(self.method)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "adapter plan") -> "AdapterPlan":
        """The plan a JSON object describes, every field checked (:func:`check_plan_fields`): a
        PlanError names ``where``, the field and what was expected."""
        if not isinstance(d, dict):
            raise PlanError(f"{where} is not a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names - {"schema"}
        if "method" not in d or unknown:
            raise PlanError(f"{where} is not an adapter plan (missing 'method' or unknown fields {sorted(unknown)})")
        if "schema" in d and d["schema"] != PLAN_SCHEMA:
            raise PlanError(f"{where} is not an adapter plan (schema {d['schema']!r}, expected {PLAN_SCHEMA!r})")
        d = {k: v for k, v in d.items() if k in names}
        check_plan_fields(d, where)
        if "target_modules" in d:
            targets = d["target_modules"]
            if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
                raise PlanError(f"an adapter plan's target_modules must be a list of module names, got {targets!r}")
            d["target_modules"] = tuple(targets)
        return cls(**d)

    def save(self, path: str | os.PathLike) -> Path:
        return write_json(path, {"schema": PLAN_SCHEMA, **self.to_dict()})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AdapterPlan":
        d = read_json(path, "adapter plan", error=PlanError, missing=f"plan file {path} does not exist")
        return cls.from_dict(d, f"plan {path}")

    def to_record(self) -> AdapterPlanRecord:
        return AdapterPlanRecord(method=self.method, data=self.to_dict())


def curvature_from_delta(delta_rel: float, diameter: float, dim: int) -> tuple[float, str]:
    """K = (diameter/√dim)² · (δ_rel/0.144)², clamped to [K_MIN, K_MAX]; returns (K, reason)."""
    if not (delta_rel > 0 and math.isfinite(delta_rel)):
        return 1.0, "δ_rel is 0 or undefined: K = 1 (the HypLoRA default)"
    D = diameter / math.sqrt(dim)
    raw = D * D * (delta_rel / KHRULKOV_BALL_DELTA_REL) ** 2
    k = min(max(raw, K_MIN), K_MAX)
    reason = (f"Khrulkov's c = (0.144/δ_rel)² for unit diameter with δ_rel = {delta_rel:.4f}; the inputs "
              f"HypLoRA maps (x/√d) have diameter {D:.3f}, so K = D²(δ_rel/0.144)² = {raw:.4g}")
    if k != raw:
        reason += f", clamped to {k:g}"
    return k, reason


def choose_heads(embeddings: np.ndarray, *, k_range: Sequence[int] = range(2, 11), seed: int = 0,
                 max_points: int = 2000) -> tuple[int, dict[str, float], str]:
    """N = argmax silhouette of k-means over ``k_range`` (cosine geometry: rows L2-normalised)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise PlanError("training-example embeddings must be a finite 2-D array")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if x.shape[0] > max_points:
        x = x[np.random.default_rng(seed).choice(x.shape[0], max_points, replace=False)]
    ks = [k for k in k_range if 2 <= k < x.shape[0]]
    if not ks or np.unique(x.round(8), axis=0).shape[0] < 3:
        raise PlanError(f"need at least 3 distinct training examples to choose HydraLoRA heads, got {x.shape[0]}")
    scores = {}
    for k in ks:
        labels = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(x)
        if len(set(labels)) < 2:
            continue
        scores[str(k)] = float(silhouette_score(x, labels))
    if not scores:
        raise PlanError("k-means found no cluster structure in the training examples")
    best = max(scores, key=lambda k: scores[k])
    reason = (f"k-means on {x.shape[0]} training-example embeddings: best silhouette "
              f"{scores[best]:.3f} at k = {best} (k = {ks[0]}…{ks[-1]} tried)")
    return int(best), scores, reason


def plan_adapters(profile: GeometryProfile, *, method: str = "auto", train_embeddings=None,
                  r: int = 32, alpha: Optional[float] = None, target_modules=DEFAULT_TARGETS,
                  rank_rule: str = "budget", rank_floor: int = 1, rank_cap: Optional[int] = None,
                  params_per_rank: Optional[Sequence[int]] = None,
                  seed: int = 0) -> AdapterPlan:
    """Plan adapters for ``profile``'s model.

    ``method="auto"``: HypLoRA with GeLoRA ranks when per-prompt δ_rel lies below its null (the
    data is more tree-like than random points), otherwise GeLoRA; HydraLoRA (with GeLoRA ranks)
    when training embeddings are given and k-means finds N ≥ 2 clusters with silhouette ≥ 0.1.
    ``params_per_rank`` gives, per block, the parameters one unit of rank adds (see
    :func:`adapters.gelora.params_per_rank`); without it every target is taken as hidden × hidden.
    Same α/r for every method by default (α = 2r).
    """
    from .gelora import gelora_ranks

    alpha = float(alpha if alpha is not None else 2 * r)
    reasons: dict[str, str] = {}
    curvature, hyperbolic = _curvature_evidence(profile, reasons)
    n_heads, silhouettes = None, {}
    if train_embeddings is not None:
        n_heads, silhouettes, reasons["heads"] = choose_heads(train_embeddings, seed=seed)
    ids, replicates = layer_dimensions(profile)
    if method == AUTO:
        method, reasons["method"] = _auto_method(n_heads, silhouettes, hyperbolic)
    chosen = _method(method)
    layer_ranks = rank_ranges = curve = None
    if chosen.includes("gelora"):
        n_blocks = profile.model.n_layers
        costs = (list(params_per_rank) if params_per_rank is not None else
                 [2 * profile.model.hidden_size * len(target_modules)] * n_blocks)

        eps = growth_noise(replicates)

        def rule(d: np.ndarray) -> list[int]:
            return gelora_ranks(d[:-1], d[1:], rule=rank_rule, r=r, floor=rank_floor, cap=rank_cap,
                                n_params_fn=costs, eps=eps)

        curve = smooth_ids(ids)
        layer_ranks = rule(curve)
        if replicates is not None:
            per_rep = np.asarray([rule(smooth_ids(rep)) for rep in replicates])
            lo, hi = np.quantile(per_rep, [0.025, 0.975], axis=0)
            rank_ranges = [[int(np.floor(a)), int(np.ceil(b))] for a, b in zip(lo, hi)]
        reasons["ranks"] = _ranks_reason(rank_rule, ids, layer_ranks, replicates, eps)
    if chosen.includes("hydralora") and n_heads is None:
        raise PlanError("HydraLoRA needs training data to choose its number of heads (--data)")
    if not chosen.includes("hyplora"):
        curvature = None
        reasons.pop("curvature", None)
    reasons["alpha"] = f"α/r = {alpha / r:g} for every method (fair comparison)"
    return AdapterPlan(method=chosen.name, r=r, alpha=alpha, target_modules=tuple(target_modules),
                       curvature=curvature, layer_ranks=layer_ranks,
                       rank_rule=rank_rule if layer_ranks else None, rank_ranges=rank_ranges,
                       id_curve=[round(float(v), 4) for v in curve] if curve is not None else None,
                       n_heads=n_heads,
                       silhouettes=silhouettes, reasons=reasons, model=profile.model.name)


def _method(name: str) -> Method:
    """The registry's method called ``name``, or a PlanError naming the choices."""
    try:
        return registry.get(name)
    except AdapterError:
        raise PlanError(f"unknown adapter method {name!r}; choose one of {', '.join(registry.choices())}") from None


def _curvature_evidence(profile: GeometryProfile, reasons: dict[str, str]) -> tuple[Optional[float], bool]:
    """HypLoRA's initial K from the per-prompt δ_rel (None without it) and whether δ_rel lies below
    every null (the conservative verdict); the reasons, quoting the intervals, go into ``reasons``."""
    dp = profile.delta_prompts
    if dp is None:
        return None, False
    curvature, reasons["curvature"] = curvature_from_delta(dp.mean, dp.diameter or 0.0, dp.dim)
    reasons["hyperbolic"] = delta_evidence(dp)
    return curvature, dp.verdict == "below"


def delta_evidence(dp) -> str:
    """The per-prompt δ_rel verdict in one sentence: the value with its interval, each null's paired
    difference with its interval, and the conservative verdict."""
    pct = f"{100 * dp.level:g} %"
    head = f"per-prompt δ_rel {dp.mean:.4f}"
    if dp.ci_low is not None:
        head += f" ({pct} interval {dp.ci_low:.4f}–{dp.ci_high:.4f}, {dp.n_sets} prompts)"
    parts = []
    for c in dp.nulls:
        ci = (f" [{c.diff_ci_low:+.4f}, {c.diff_ci_high:+.4f}]" if c.diff_ci_low is not None else "")
        parts.append(f"{c.null} null {c.mean:.4f}: difference {c.diff_mean:+.4f}{ci}, {c.verdict}")
    return f"{head}; " + "; ".join(parts) + f". Verdict: {dp.verdict} ({dp.verdict_reason})"


def layer_dimensions(profile: GeometryProfile) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Every layer's TwoNN dimension (embedding output and each block) — the median of its bootstrap
    replicates when the profile has them, else the estimate — and the (B × layers) replicates (None
    without a bootstrap), or a PlanError."""
    layers = profile.layers
    n_blocks = profile.model.n_layers
    if len(layers) != n_blocks + 1:
        raise PlanError(f"the profile has {len(layers)} layers of intrinsic dimensions but the model has "
                        f"{n_blocks} blocks (needs {n_blocks + 1}: embedding output and each block); "
                        "re-run `geoprobe probe` without --no-layers")
    if any(lg.twonn is None or not math.isfinite(lg.twonn.dimension) for lg in layers):
        raise PlanError("the profile lacks an intrinsic dimension for some layer; re-run `geoprobe probe`")
    estimates = np.asarray([lg.twonn.dimension for lg in layers], dtype=np.float64)
    reps = [list(lg.twonn.replicates or []) for lg in layers]
    if not (all(reps) and len({len(r) for r in reps}) == 1 and len(reps[0]) >= 2):
        return estimates, None
    rep = np.asarray(reps, dtype=np.float64).T  # B × layers
    rep = rep[np.isfinite(rep).all(axis=1)]  # replicates where some layer had no estimate
    if rep.shape[0] < 2:
        return estimates, None
    return np.median(rep, axis=0), rep


def smooth_ids(ids: Sequence[float]) -> np.ndarray:
    """The centred three-layer moving average of an ID curve (two layers at each end; module
    docstring)."""
    d = np.asarray(ids, dtype=np.float64)
    if d.size < 3:
        return d.copy()
    out = np.empty_like(d)
    out[1:-1] = (d[:-2] + d[1:-1] + d[2:]) / 3.0
    out[0] = (d[0] + d[1]) / 2.0
    out[-1] = (d[-2] + d[-1]) / 2.0
    return out


DEFAULT_GROWTH_FLOOR = 1e-3
"""The budget rule's score floor when the profile holds no bootstrap replicates."""


def growth_noise(replicates: Optional[np.ndarray]) -> float:
    """σ̂: the median over blocks of the bootstrap standard deviation of the smoothed per-block ID
    growth s_i − s_(i−1) (module docstring); :data:`DEFAULT_GROWTH_FLOOR` without replicates."""
    if replicates is None or replicates.shape[0] < 2 or replicates.shape[1] < 2:
        return DEFAULT_GROWTH_FLOOR
    growth = np.diff(np.asarray([smooth_ids(rep) for rep in replicates]), axis=1)
    return max(float(np.median(growth.std(axis=0, ddof=1))), DEFAULT_GROWTH_FLOOR)


def _ranks_reason(rank_rule: str, ids: np.ndarray, ranks: list[int],
                  replicates: Optional[np.ndarray], eps: float) -> str:
    source = (f"medians of {replicates.shape[0]} block-bootstrap replicates" if replicates is not None
              else "the profile's estimates (no bootstrap replicates stored)")
    return (f"GeLoRA rule '{rank_rule}' on TwoNN dimensions {ids.min():.1f}…{ids.max():.1f} ({source}, "
            f"three-layer moving average, growth floor {eps:.3g} = its bootstrap noise): ranks "
            f"{min(ranks)}…{max(ranks)} over {len(ranks)} blocks")


def _auto_method(n_heads: Optional[int], silhouettes: dict[str, float], hyperbolic: bool) -> tuple[str, str]:
    """``auto``'s choice and its reason: HydraLoRA when the training data clusters, HypLoRA when the
    prompts are more tree-like than the null, GeLoRA otherwise (each with GeLoRA ranks)."""
    if n_heads is not None and silhouettes.get(str(n_heads), 0.0) >= 0.1:
        return "hydralora+gelora", f"training data clusters into {n_heads} groups: HydraLoRA heads, GeLoRA ranks"
    if hyperbolic:
        return "hyplora+gelora", "prompt embeddings are more tree-like than the null: HypLoRA, GeLoRA ranks"
    return "gelora", ("prompt embeddings are not more tree-like than random points of their "
                      "dimension: no hyperbolic map; GeLoRA ranks from intrinsic dimension")
