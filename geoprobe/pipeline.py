"""``gp.probe``: run the four geometry probes on one model and one corpus, into a GeometryProfile.

Steps (each timed in ``profile.timings``):

1. token counts over the corpus → power law of the frequency distribution (:mod:`geoprobe.probes.frequency`);
2. input-embedding norms against frequency (:mod:`geoprobe.probes.norms`);
3. δ-hyperbolicity of (a) each prompt's input-token embeddings, base point = token 0 (HypLoRA,
   arXiv 2410.04010 §4.2, Table 2), (b) a seeded sample of distinct corpus tokens' embeddings, and
   (c) each layer's hidden states — every one beside a Gaussian null with the same n, dimension, mean
   and covariance (METHODS.md §3: distance concentration alone gives δ_rel ≈ 0.06–0.26);
4. intrinsic dimension (TwoNN and GRIDE) of every layer's hidden states, attention-sink positions
   (massive activations) left out and counted.
"""
from __future__ import annotations

import datetime as _dt
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .errors import CorpusError, InputDataError
from .hidden import SINK_FACTOR, hidden_states, sink_mask
from .profile import (CorpusInfo, DeltaStat, GeometryProfile, LayerGeometry, SinkReport)
from .runtime import progress, versions

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeSettings:
    """Sizes and seeds of every sampling step; stored in the profile."""

    seed: int = 0
    max_tokens: Optional[int] = None      # cap on corpus tokens counted (None = all)
    n_prompts: int = 200                  # prompts for per-prompt δ
    prompt_tokens: int = 128              # tokens per prompt (truncation)
    token_sample: int = 1000              # distinct tokens for the embedding δ
    token_repeats: int = 3                # seeded samples of those
    null_repeats: int = 3                 # Gaussian null repeats per point set
    layer_positions: int = 1200           # hidden-state positions per layer for the ID
    layer_delta_points: int = 400         # of those, used for per-layer δ
    max_length: int = 128                 # tokens per document for hidden states
    batch_size: int = 8
    sink_factor: float = SINK_FACTOR      # ‖h‖ > factor × median ‖h‖ → sink
    exclude_sinks: bool = True
    delta_mode: str = "fixed"

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class _Progress:
    """Progress bars on stderr for one probe run, or none."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def bar(self, total: int, desc: str):
        return progress(total, desc, enabled=self.enabled)


def _stat(what: str, values: list[float], null_values: list[float], n: int, dim: int, mode: str,
          diameter: Optional[float] = None) -> DeltaStat:
    v = np.asarray(values, dtype=np.float64)
    nv = np.asarray(null_values, dtype=np.float64)
    return DeltaStat(what=what, mean=float(v.mean()), std=float(v.std(ddof=1)) if v.size > 1 else 0.0,
                     null_mean=float(nv.mean()), null_std=float(nv.std(ddof=1)) if nv.size > 1 else 0.0,
                     n_points=int(n), dim=int(dim), n_sets=int(v.size), mode=mode,
                     values=[float(a) for a in v], null_values=[float(a) for a in nv],
                     diameter=diameter)


def delta_with_null(sets: list[np.ndarray], what: str, *, null_repeats: int, seed: int,
                    mode: str = "fixed", progress=None) -> DeltaStat:
    """δ_rel of each point set (base point 0) and of ``null_repeats`` matched Gaussian nulls each."""
    from .probes.hyperbolicity import delta, matched_null_delta

    values, nulls, diams = [], [], []
    for i, x in enumerate(sets):
        r = delta(x, mode=mode, base_point=0)
        values.append(r.delta_rel)
        diams.append(r.diameter)
        nulls.extend(matched_null_delta(x, n_repeats=null_repeats, seed=seed + 7919 * i, mode=mode))
        if progress is not None:
            progress.update(1)
    n = int(np.median([s.shape[0] for s in sets]))
    return _stat(what, values, nulls, n, sets[0].shape[1], mode, float(np.mean(diams)))


def probe(lm, corpus, *, settings: Optional[ProbeSettings] = None, progress: bool = True,
          device: Optional[str] = None, command: str = "", layers: bool = True) -> GeometryProfile:
    """Measure ``lm`` (a :class:`geoprobe.models.LoadedModel`) on ``corpus`` (a
    :class:`geoprobe.corpus.Corpus`) and return the :class:`GeometryProfile`."""
    s = settings or ProbeSettings()
    prog = _Progress(progress)
    timings: dict[str, float] = {}
    device = device or str(getattr(lm, "device", "cpu"))
    tok = lm.tokenizer
    if len(corpus) == 0:
        raise CorpusError("the corpus has no documents")

    from .probes.norms import norm_frequency

    counts, frequency = _frequency(corpus, tok, s, progress, timings)
    t0 = time.perf_counter()
    emb = lm.input_embeddings().double().numpy()
    norms = norm_frequency(np.linalg.norm(emb, axis=1), counts.counts, tokenizer=tok)
    timings["norms"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    delta_prompts = _delta_prompts(corpus, tok, emb, s, prog)
    timings["delta_prompts"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    delta_tokens = _delta_tokens(emb, counts.counts, s)
    timings["delta_tokens"] = time.perf_counter() - t0
    layer_results: list[LayerGeometry] = []
    sinks = None
    if layers:
        layer_results, sinks = _hidden_layers(lm, corpus, s, prog, device, timings)

    corpus_info = CorpusInfo(name=corpus.name, sha256=corpus.sha256, n_documents=len(corpus),
                             n_tokens=int(counts.n_tokens), n_characters=corpus.n_characters,
                             field=corpus.field)
    return GeometryProfile(
        model=lm.info, corpus=corpus_info, frequency=frequency, norms=norms,
        delta_prompts=delta_prompts, delta_tokens=delta_tokens, layers=layer_results, sinks=sinks,
        settings=s.to_dict() | {"device": device}, seed=s.seed, versions=versions(),
        timings={k: round(v, 4) for k, v in timings.items()}, command=command,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))


def _frequency(corpus, tok, s: ProbeSettings, progress: bool, timings: dict[str, float]):
    """Step 1: the corpus's token counts and the power law of their distribution (None, with a
    warning, when it cannot be fitted)."""
    from .probes.frequency import fit_power_law

    t0 = time.perf_counter()
    counts = corpus.count_tokens(tok, max_tokens=s.max_tokens, progress=progress)
    timings["count_tokens"] = time.perf_counter() - t0
    if counts.n_tokens == 0:
        raise CorpusError(f"corpus {corpus.name!r} produced no tokens")
    t0 = time.perf_counter()
    try:
        frequency = fit_power_law(counts.counts)
    except InputDataError as exc:
        logger.warning("power law not fitted: %s", exc)
        frequency = None
    timings["power_law"] = time.perf_counter() - t0
    return counts, frequency


def _prompt_sets(corpus, tok, emb: np.ndarray, s: ProbeSettings) -> list[np.ndarray]:
    """Input-token embeddings of up to ``n_prompts`` prompts, taken in a seeded order of the corpus,
    each truncated to ``prompt_tokens`` tokens (BOS, if the tokenizer adds one, is the base point);
    prompts with fewer than 4 distinct embedding rows are passed over."""
    order = np.random.default_rng(s.seed).permutation(len(corpus))
    prompt_sets: list[np.ndarray] = []
    for start in range(0, len(order), 256):
        texts = [corpus.documents[i] for i in order[start:start + 256]]
        enc = tok(texts, add_special_tokens=True, truncation=True, max_length=s.prompt_tokens,
                  return_attention_mask=False)["input_ids"]
        for ids in enc:
            x = emb[np.asarray(ids, dtype=np.int64)]
            if np.unique(x, axis=0).shape[0] >= 4:
                prompt_sets.append(x)
            if len(prompt_sets) >= s.n_prompts:
                return prompt_sets
    return prompt_sets


def _delta_prompts(corpus, tok, emb: np.ndarray, s: ProbeSettings, prog: _Progress) -> DeltaStat:
    """Step 3a: per-prompt δ of the input-token embeddings, one matched null each."""
    prompt_sets = _prompt_sets(corpus, tok, emb, s)
    if not prompt_sets:
        raise CorpusError(f"corpus {corpus.name!r} has no prompt with at least 4 distinct tokens")
    bar = prog.bar(len(prompt_sets), "δ per prompt")
    stat = delta_with_null(prompt_sets, "prompt input-token embeddings",
                           null_repeats=1, seed=s.seed, mode=s.delta_mode, progress=bar)
    bar.close()
    return stat


def _delta_tokens(emb: np.ndarray, counts: np.ndarray, s: ProbeSettings) -> Optional[DeltaStat]:
    """Step 3b: δ of ``token_repeats`` seeded samples of ``token_sample`` distinct corpus tokens'
    embeddings (None when fewer than 4 distinct tokens were seen)."""
    seen = np.flatnonzero(counts[: emb.shape[0]] > 0)
    m = min(s.token_sample, seen.size)
    token_sets = []
    for r in range(s.token_repeats):
        pick = np.random.default_rng(s.seed + 1000 + r).choice(seen, size=m, replace=False)
        token_sets.append(emb[np.sort(pick)])
    if m < 4:
        return None
    return delta_with_null(token_sets, "distinct corpus tokens' input embeddings",
                           null_repeats=s.null_repeats, seed=s.seed + 1, mode=s.delta_mode)


def _hidden_layers(lm, corpus, s: ProbeSettings, prog: _Progress, device: str,
                   timings: dict[str, float]) -> tuple[list[LayerGeometry], SinkReport]:
    """Step 4: hidden states of a seeded sample of positions, then each layer's sinks, δ and
    intrinsic dimension."""
    t0 = time.perf_counter()
    hs = hidden_states(lm, corpus, max_positions=s.layer_positions, max_length=s.max_length,
                       batch_size=s.batch_size, seed=s.seed, device=device, progress=prog.enabled)
    timings["hidden_states"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        return _layer_geometry(hs, s, prog)
    finally:
        hs.close()
        timings["layers"] = time.perf_counter() - t0


class _KeptRows(Sequence):
    """Layer i's hidden states without its sink rows, as float64, read when asked for (one layer in
    memory at a time)."""

    def __init__(self, hs, masks: list[np.ndarray]):
        self.hs, self.masks = hs, masks

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, li: int) -> np.ndarray:
        return self.hs.layer(li).astype(np.float64)[~self.masks[li]]


def _layer_geometry(hs, s: ProbeSettings, prog: _Progress) -> tuple[list[LayerGeometry], SinkReport]:
    """Each layer's sinks, intrinsic dimension (TwoNN and GRIDE, sinks left out) and δ beside its
    matched null, and the report of the sinks left out."""
    from .probes.intrinsic_dim import intrinsic_dimension_layers

    n_layers = hs.n_layers
    norms = [np.linalg.norm(hs.layer(li).astype(np.float64), axis=1) for li in range(n_layers)]
    masks = [_sinks(nv, s) for nv in norms]
    kept = _KeptRows(hs, masks)
    bar = prog.bar(3 * n_layers, "layers")
    # intrinsic dimension of every layer (a layer whose TwoNN fails gets no GRIDE either)
    twonns = intrinsic_dimension_layers(kept, estimator="twonn", on_error="skip", progress=bar)
    gridez = intrinsic_dimension_layers(kept, estimator="gride", on_error="skip", progress=bar)
    results = []
    for li in range(n_layers):
        keep = kept[li]
        twonn = twonns[li]
        results.append(LayerGeometry(layer=li, n_positions=int(keep.shape[0]),
                                     n_sinks_excluded=int(masks[li].sum()),
                                     norm_median=float(np.median(norms[li])),
                                     norm_max=float(norms[li].max()), twonn=twonn,
                                     gride=gridez[li] if twonn is not None else None,
                                     delta=_layer_delta(keep, li, s)))
        bar.update(1)
    bar.close()
    return results, _sink_report(hs, norms, masks, s)


def _sinks(norms: np.ndarray, s: ProbeSettings) -> np.ndarray:
    """The layer's sink rows (none when sink exclusion is switched off)."""
    return sink_mask(norms, s.sink_factor) if s.exclude_sinks else np.zeros(len(norms), bool)


def _layer_delta(keep: np.ndarray, li: int, s: ProbeSettings) -> Optional[DeltaStat]:
    """δ of a seeded subset of ``layer_delta_points`` of layer ``li``'s kept rows beside
    ``null_repeats`` matched Gaussian nulls (None for fewer than 4 rows, or when δ fails)."""
    from .probes.hyperbolicity import delta, matched_null_delta

    m = min(s.layer_delta_points, keep.shape[0])
    if m < 4:
        return None
    rng = np.random.default_rng(s.seed + 17 * li)
    sub = keep[np.sort(rng.choice(keep.shape[0], size=m, replace=False))]
    try:
        r = delta(sub, mode=s.delta_mode, base_point=0)
        nulls = matched_null_delta(sub, n_repeats=s.null_repeats, seed=s.seed + li,
                                   mode=s.delta_mode)
    except InputDataError as exc:
        logger.warning("layer %d: δ skipped: %s", li, exc)
        return None
    return _stat(f"layer {li} hidden states", [r.delta_rel], nulls, m, sub.shape[1], s.delta_mode,
                 r.diameter)


def _sink_report(hs, norms: list[np.ndarray], masks: list[np.ndarray],
                 s: ProbeSettings) -> SinkReport:
    """How many rows each layer left out as sinks, where they sit in the sequence (the ten most
    frequent positions) and the norm quantiles that justified it."""
    excluded_by_layer = [int(mask.sum()) for mask in masks]
    quantiles = [[float(q) for q in np.quantile(nv, [0.0, 0.5, 0.9, 0.99, 1.0])] for nv in norms]
    sink_positions: dict[int, int] = {}
    for mask in masks:
        for p in hs.position[mask]:
            sink_positions[int(p)] = sink_positions.get(int(p), 0) + 1
    n_excl = int(max(excluded_by_layer) if excluded_by_layer else 0)
    top_pos = sorted(sink_positions, key=lambda p: -sink_positions[p])[:10]
    reason = (f"hidden-state norm above {s.sink_factor:g}× the layer median (massive activations, "
              "Sun et al. 2024); such rows set the diameter and collapse δ_rel of data and null alike"
              if s.exclude_sinks else "sink exclusion switched off")
    return SinkReport(factor=s.sink_factor, n_positions=hs.n_positions, n_excluded=n_excl,
                      excluded_by_layer=excluded_by_layer, positions_in_sequence=top_pos,
                      reason=reason, norm_quantiles_by_layer=quantiles)
