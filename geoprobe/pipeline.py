"""``gp.probe``: run the four geometry probes on one model and one corpus, into a GeometryProfile.

Steps (each timed in ``profile.timings``):

1. token counts over the corpus → power law of the frequency distribution (:mod:`geoprobe.probes.frequency`);
2. input-embedding norms against frequency (:mod:`geoprobe.probes.norms`);
3. δ-hyperbolicity of (a) each prompt's input-token embeddings, base point = token 0 (HypLoRA,
   arXiv 2410.04010 §4.2, Table 2), (b) seeded sets of distinct corpus tokens' embeddings, and
   (c) each layer's hidden states, one set per document — every set beside the three nulls of
   :mod:`geoprobe.probes.nulls` (own-covariance Gaussian, population Gaussian, resampled real
   points; METHODS.md §3b: distance concentration alone gives δ_rel ≈ 0.06–0.26), with bootstrap
   intervals and verdicts from :func:`geoprobe.probes.delta_stats.delta_vs_null`, the layers'
   corrected across layers (Holm by default);
4. intrinsic dimension (TwoNN and GRIDE) of every layer's hidden states, attention-sink positions
   (massive activations) left out and counted.

Seeds: ``ProbeSettings.seed`` roots a ``numpy.random.SeedSequence`` whose spawned children drive the
prompt order, the token sets, the hidden-state sample, each null and each bootstrap.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .errors import CorpusError, InputDataError
from .hidden import SINK_FACTOR, hidden_states, sink_mask
from .probes.delta_stats import correct_across, delta_vs_null, distinct_rows
from .probes.nulls import NULL_KINDS, NullError, PopulationGaussian, ResamplePool
from .profile import CorpusInfo, DeltaStat, GeometryProfile, LayerGeometry, SinkReport
from .runtime import progress, versions

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeSettings:
    """Sizes, seeds and statistics of every sampling step; stored in the profile.

    Invalid values raise :class:`ProbeOptionError` when the settings are made, before any model is
    loaded. ``seed`` is the root of a ``numpy.random.SeedSequence``; every step draws from its own
    spawned child (no two draws share a stream)."""

    seed: int = 0
    max_tokens: Optional[int] = None      # cap on corpus tokens counted (None = all)
    n_prompts: int = 200                  # prompts for per-prompt δ
    prompt_tokens: int = 128              # tokens per prompt (truncation)
    token_sample: int = 1000              # distinct tokens per embedding-δ set
    token_repeats: int = 8                # seeded token sets
    null_repeats: int = 1                 # draws of each null per set
    layer_positions: int = 1200           # hidden-state positions per layer
    layer_sets: int = 8                   # fewest documents (δ sets) per layer
    n_boot: int = 2000                    # bootstrap resamples of every δ interval and test
    id_boot: int = 500                    # block-bootstrap resamples of each layer's intrinsic dimension
    level: float = 0.95                   # confidence level of every interval
    correction: str = "holm"              # across layers: "holm", "bh" or "none"
    max_length: int = 128                 # tokens per document for hidden states
    batch_size: int = 8
    sink_factor: float = SINK_FACTOR      # ‖h‖ > factor × median ‖h‖ → sink
    exclude_sinks: bool = True
    delta_mode: str = "fixed"

    def __post_init__(self) -> None:
        check_settings(self)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class ProbeOptionError(InputDataError):
    """A probe setting outside its allowed range (raised before any work starts)."""


def _int_at_least(name: str, value: object, low: int, high: Optional[int] = None,
                  flag: Optional[str] = None) -> None:
    label = flag or name
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ProbeOptionError(f"{label} must be an integer, got {value!r}")
    if value < low:
        raise ProbeOptionError(f"{label} = {value}: it must be at least {low}")
    if high is not None and value > high:
        raise ProbeOptionError(f"{label} = {value:,}: at most {high:,} is accepted")


def check_settings(s: "ProbeSettings") -> None:
    """Refuse settings no probe can honour, naming the CLI flag of each (see :class:`ProbeSettings`)."""
    from .probes.delta_stats import MAX_NULL_REPEATS
    from .probes.hyperbolicity import MODES
    from .probes.uncertainty import CORRECTIONS, MAX_BOOT

    if isinstance(s.seed, bool) or not isinstance(s.seed, (int, np.integer)) or not 0 <= s.seed < 2 ** 64:
        raise ProbeOptionError(f"--seed must be an integer from 0 to 2^64 − 1, got {s.seed!r}")
    if s.max_tokens is not None:
        _int_at_least("max_tokens", s.max_tokens, 1, flag="--max-tokens")
    _int_at_least("n_prompts", s.n_prompts, 2, flag="--n-prompts")
    _int_at_least("prompt_tokens", s.prompt_tokens, 4)
    _int_at_least("token_sample", s.token_sample, 4)
    _int_at_least("token_repeats", s.token_repeats, 2, 10_000, flag="--token-sets")
    _int_at_least("null_repeats", s.null_repeats, 1, MAX_NULL_REPEATS, flag="--null-repeats")
    _int_at_least("layer_positions", s.layer_positions, 16, flag="--layer-positions")
    _int_at_least("layer_sets", s.layer_sets, 2, 10_000, flag="--layer-sets")
    _int_at_least("n_boot", s.n_boot, 2, MAX_BOOT, flag="--bootstrap")
    if s.id_boot != 0:
        _int_at_least("id_boot", s.id_boot, 2, MAX_BOOT, flag="--id-bootstrap")
    _int_at_least("max_length", s.max_length, 2)
    _int_at_least("batch_size", s.batch_size, 1)
    if isinstance(s.level, bool) or not isinstance(s.level, (int, float)) or not 0.5 <= s.level < 1:
        raise ProbeOptionError(f"--level must be a confidence level in [0.5, 1), got {s.level!r}")
    if s.correction not in CORRECTIONS:
        raise ProbeOptionError(f"--correction must be one of {', '.join(CORRECTIONS)}, got {s.correction!r}")
    if s.delta_mode not in MODES:
        raise ProbeOptionError(f"delta_mode must be one of {MODES}, got {s.delta_mode!r}")
    if not (isinstance(s.sink_factor, (int, float)) and s.sink_factor > 1):
        raise ProbeOptionError(f"sink_factor must be a number above 1, got {s.sink_factor!r}")


def seed_streams(seed: int) -> dict[str, np.random.SeedSequence]:
    """The independent seed streams of one probe run (``gp.seed_streams``), spawned from
    ``SeedSequence(seed)`` and keyed by step:

    * "prompt_order": the order in which prompts are taken from the corpus;
    * "prompt_delta" / "token_delta": the ``seed`` of :func:`~geoprobe.probes.delta_stats.delta_vs_null`
      for per-prompt δ and for the token sets;
    * "token_choice": spawned once into ``token_repeats`` children, one ``default_rng`` per token set;
    * "hidden": the ``seed`` of :func:`geoprobe.hidden.hidden_states` (documents and positions);
    * "layers": spawned once into two children, the block bootstrap of every layer's intrinsic
      dimension (the same stream for TwoNN and for GRIDE at the shared scale, so their replicates
      draw the same documents) and the per-layer δ, itself spawned once into one child per layer;
    * "population": ``default_rng`` of :meth:`~geoprobe.probes.nulls.PopulationGaussian.fit` on the
      input-embedding matrix.

    ``SeedSequence.spawn`` advances its parent, so call this afresh for each run: code that draws from
    a fresh set of streams as above reproduces :func:`probe`'s samples number for number."""
    names = ("prompt_order", "prompt_delta", "token_choice", "token_delta", "hidden", "layers",
             "population")
    return dict(zip(names, np.random.SeedSequence(seed).spawn(len(names))))


class _Progress:
    """Progress bars on stderr for one probe run, or none."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def bar(self, total: int, desc: str):
        return progress(total, desc, enabled=self.enabled)


def probe(lm, corpus, *, settings: Optional[ProbeSettings] = None, progress: bool = True,
          device: Optional[str] = None, command: str = "", layers: bool = True) -> GeometryProfile:
    """Measure ``lm`` on ``corpus`` (a :class:`geoprobe.corpus.Corpus`) and return the
    :class:`GeometryProfile`.

    ``lm`` is a :class:`geoprobe.models.LoadedModel`, a :class:`~geoprobe.models.StreamedModel`
    (hidden states read one layer at a time from the shards) or, with ``layers=False``, an
    :class:`~geoprobe.models.EmbeddingModel` (the input-embedding table alone); :func:`geoprobe.plan_load`
    and :func:`geoprobe.load_planned` choose and open one. The profile records the model's compute
    dtype (``model.dtype``) and how the hidden states were read (``settings["hidden_states"]``:
    "model", "streamed" or "none")."""
    s = settings or ProbeSettings()
    if layers and not getattr(lm, "has_hidden_states", True):
        raise InputDataError(f"{lm.name} was opened for its input embeddings only and has no hidden states; "
                             "probe it with layers=False (--embeddings-only), or load the model")
    prog = _Progress(progress)
    timings: dict[str, float] = {}
    device = device or str(getattr(lm, "device", "cpu"))
    tok = lm.tokenizer
    if len(corpus) == 0:
        raise CorpusError("the corpus has no documents")
    if layers and len(corpus) < s.layer_sets:
        raise CorpusError(f"per-layer δ needs at least {s.layer_sets} documents (one δ set each) and "
                          f"corpus {corpus.name!r} has {len(corpus)}; give a larger corpus or lower "
                          "--layer-sets")

    from .probes.norms import norm_frequency

    counts, frequency = _frequency(corpus, tok, s, progress, timings)
    t0 = time.perf_counter()
    emb = lm.input_embeddings().float().numpy()  # float32; rows enter float64 arithmetic a set at a time
    norms = norm_frequency(row_norms(emb), counts.counts, tokenizer=tok)
    timings["norms"] = time.perf_counter() - t0
    streams = seed_streams(s.seed)
    t0 = time.perf_counter()
    population = PopulationGaussian.fit(emb, np.random.default_rng(streams["population"]))
    timings["population_null"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    delta_prompts = _delta_prompts(corpus, tok, emb, counts.counts, population, s, streams, prog)
    timings["delta_prompts"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    delta_tokens = _delta_tokens(emb, counts.counts, population, s, streams)
    timings["delta_tokens"] = time.perf_counter() - t0
    del emb, population  # the table is not needed by the layers; a streamed model reads its own
    layer_results: list[LayerGeometry] = []
    sinks = None
    if layers:
        layer_results, sinks = _hidden_layers(lm, corpus, s, prog, device, timings, streams)

    corpus_info = CorpusInfo(name=corpus.name, sha256=corpus.sha256, n_documents=len(corpus),
                             n_tokens=int(counts.n_tokens), n_characters=corpus.n_characters,
                             field=corpus.field)
    return GeometryProfile(
        model=lm.info, corpus=corpus_info, frequency=frequency, norms=norms,
        delta_prompts=delta_prompts, delta_tokens=delta_tokens, layers=layer_results, sinks=sinks,
        settings=s.to_dict() | {"device": device, "hidden_states": hidden_mode(lm, layers)}, seed=s.seed, versions=versions(),
        timings={k: round(v, 4) for k, v in timings.items()}, command=command,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))


def hidden_mode(lm, layers: bool) -> str:
    """How the profile's hidden states were read: "model" (the whole model on the device), "streamed"
    (one layer at a time from the shards) or "none"."""
    if not layers:
        return "none"
    return "streamed" if getattr(lm, "streamed", False) else "model"


def row_norms(x: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """‖x_i‖₂ of every row, accumulated in float64 a block of ``chunk`` rows at a time (the matrix
    itself is never upcast whole)."""
    out = np.empty(x.shape[0], dtype=np.float64)
    for start in range(0, x.shape[0], chunk):
        out[start:start + chunk] = np.linalg.norm(np.asarray(x[start:start + chunk], dtype=np.float64), axis=1)
    return out


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


def _prompt_sets(corpus, tok, emb: np.ndarray, s: ProbeSettings,
                 order_seed: np.random.SeedSequence) -> list[np.ndarray]:
    """Input-token embeddings of up to ``n_prompts`` prompts, taken in a seeded order of the corpus,
    each truncated to ``prompt_tokens`` tokens (BOS, if the tokenizer adds one, is the base point);
    prompts with fewer than 4 distinct embedding rows are passed over."""
    order = np.random.default_rng(order_seed).permutation(len(corpus))
    prompt_sets: list[np.ndarray] = []
    for start in range(0, len(order), 256):
        texts = [corpus.documents[i] for i in order[start:start + 256]]
        enc = tok(texts, add_special_tokens=True, truncation=True, max_length=s.prompt_tokens,
                  return_attention_mask=False)["input_ids"]
        for ids in enc:
            x = emb[np.asarray(ids, dtype=np.int64)].astype(np.float64)
            if np.unique(x, axis=0).shape[0] >= 4:
                prompt_sets.append(x)
            if len(prompt_sets) >= s.n_prompts:
                return prompt_sets
    return prompt_sets


def _delta_prompts(corpus, tok, emb: np.ndarray, counts: np.ndarray, population: PopulationGaussian,
                   s: ProbeSettings, streams: dict, prog: _Progress) -> DeltaStat:
    """Step 3a: per-prompt δ of the input-token embeddings against the three nulls: own-covariance
    Gaussian, the Gaussian of the whole input-embedding matrix, and as many tokens drawn from the
    corpus's token distribution (the prompt's first token kept as base point)."""
    prompt_sets = _prompt_sets(corpus, tok, emb, s, streams["prompt_order"])
    if len(prompt_sets) < 2:
        raise CorpusError(f"corpus {corpus.name!r} has {len(prompt_sets)} prompt(s) with at least 4 "
                          "distinct tokens; per-prompt δ and its interval need at least 2")
    bar = prog.bar(len(prompt_sets), "δ per prompt")
    pool = ResamplePool(emb, weights=_weights(counts, emb.shape[0]))
    stat = delta_vs_null(prompt_sets, population=population, resample=pool,
                         null_repeats=s.null_repeats, n_boot=s.n_boot, level=s.level,
                         seed=streams["prompt_delta"], mode=s.delta_mode,
                         what="prompt input-token embeddings", progress=bar)
    bar.close()
    return dataclasses.replace(stat, seed=s.seed)


def _weights(counts: np.ndarray, vocab: int) -> np.ndarray:
    """Corpus counts of the first ``vocab`` token ids (0 for ids the corpus never produced)."""
    w = np.zeros(vocab, dtype=np.float64)
    k = min(vocab, counts.shape[0])
    w[:k] = counts[:k]
    return w


def _delta_tokens(emb: np.ndarray, counts: np.ndarray, population: PopulationGaussian,
                  s: ProbeSettings, streams: dict) -> Optional[DeltaStat]:
    """Step 3b: δ of ``token_repeats`` seeded sets of ``token_sample`` distinct corpus tokens'
    embeddings, against the own-covariance and population Gaussians and as many distinct tokens
    drawn uniformly from the whole vocabulary (None when fewer than 4 distinct tokens were seen)."""
    seen = np.flatnonzero(counts[: emb.shape[0]] > 0)
    m = min(s.token_sample, seen.size)
    if m < 4:
        return None
    rngs = [np.random.default_rng(c) for c in streams["token_choice"].spawn(s.token_repeats)]
    token_sets = [emb[np.sort(r.choice(seen, size=m, replace=False))].astype(np.float64) for r in rngs]
    if m >= emb.shape[0]:
        logger.warning("the token sample covers the whole vocabulary: no population or resampling null")
        nulls: tuple[str, ...] = ("own",)
    else:
        nulls = NULL_KINDS
    stat = delta_vs_null(token_sets, population=population, resample=ResamplePool(emb), nulls=nulls,
                         null_repeats=s.null_repeats, n_boot=s.n_boot, level=s.level,
                         seed=streams["token_delta"], mode=s.delta_mode,
                         what="distinct corpus tokens' input embeddings")
    return dataclasses.replace(stat, seed=s.seed)


def _hidden_layers(lm, corpus, s: ProbeSettings, prog: _Progress, device: str,
                   timings: dict[str, float], streams: dict) -> tuple[list[LayerGeometry], SinkReport]:
    """Step 4: hidden states of a seeded sample of positions, then each layer's sinks, δ and
    intrinsic dimension."""
    t0 = time.perf_counter()
    hs = hidden_states(lm, corpus, max_positions=s.layer_positions, max_length=s.max_length,
                       batch_size=s.batch_size, seed=streams["hidden"], device=device,
                       progress=prog.enabled, min_documents=s.layer_sets)
    timings["hidden_states"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        return _layer_geometry(hs, s, prog, streams["layers"])
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


def _layer_geometry(hs, s: ProbeSettings, prog: _Progress,
                    seeds: np.random.SeedSequence) -> tuple[list[LayerGeometry], SinkReport]:
    """Each layer's sinks, intrinsic dimension (TwoNN and GRIDE, sinks left out) and δ per document
    against the three nulls (corrected across layers), and the report of the sinks left out."""
    from .probes.intrinsic_dim import intrinsic_dimension_layers

    n_layers = hs.n_layers
    n_docs = len(np.unique(hs.doc_index))
    if n_docs < s.layer_sets:
        raise CorpusError(
            f"per-layer δ needs at least {s.layer_sets} documents (one δ set each) and the hidden-state "
            f"sample holds {n_docs}; use a corpus with more documents, raise --layer-positions, or "
            "lower --layer-sets")
    norms = [np.linalg.norm(hs.layer(li).astype(np.float64), axis=1) for li in range(n_layers)]
    masks = [_sinks(nv, s) for nv in norms]
    kept = _KeptRows(hs, masks)
    bar = prog.bar(3 * n_layers, "layers")
    # intrinsic dimension of every layer with a block bootstrap over documents, the same resampled
    # documents in every layer (a layer whose TwoNN fails gets no GRIDE either)
    docs = [hs.doc_index[~m] for m in masks]
    s_id, s_delta = seeds.spawn(2)
    boot = dict(groups=docs, n_boot=s.id_boot, seed=s_id, level=s.level)
    twonns = intrinsic_dimension_layers(kept, estimator="twonn", on_error="skip", progress=bar, **boot)
    gridez = _gride_layers(kept, bar, boot)
    deltas = []
    for li, ss in zip(range(n_layers), s_delta.spawn(n_layers)):
        deltas.append(_layer_delta(kept[li], hs.doc_index[~masks[li]], li, s, ss))
        bar.update(1)
    bar.close()
    deltas = correct_across(deltas, s.correction)
    results = []
    for li in range(n_layers):
        twonn = twonns[li]
        results.append(LayerGeometry(layer=li, n_positions=int((~masks[li]).sum()),
                                     n_sinks_excluded=int(masks[li].sum()),
                                     norm_median=float(np.median(norms[li])),
                                     norm_max=float(norms[li].max()), twonn=twonn,
                                     gride=gridez[li] if twonn is not None else None,
                                     delta=deltas[li]))
    return results, _sink_report(hs, norms, masks, s)


def _gride_layers(kept: Sequence[np.ndarray], bar, boot: dict) -> list:
    """GRIDE of every layer: the scale curves and the one scale n1 shared by all layers
    (:func:`~geoprobe.probes.intrinsic_dim.shared_gride_scale`), then the block bootstrap at that
    scale only (the other scales keep their analytic errors; bootstrapping every scale of every layer
    would cost five times as much for intervals the report does not show)."""
    from .probes.intrinsic_dim import at_scale, intrinsic_dimension_layers

    curves = intrinsic_dimension_layers(kept, estimator="gride", on_error="skip", progress=bar)
    first = next((r for r in curves if r is not None), None)
    if first is None or not boot["n_boot"]:
        return curves
    n1, reason = int(first.scale_n1), first.scale_rule
    at_n1 = intrinsic_dimension_layers(kept, estimator="gride", scales=[n1], on_error="skip", **boot)
    out = []
    for curve, b in zip(curves, at_n1):
        if curve is None or b is None:
            out.append(curve)
            continue
        sb = b.scales[0]
        scales = [dataclasses.replace(sc, error=sb.error, ci_low=sb.ci_low, ci_high=sb.ci_high)
                  if sc.n1 == n1 else sc for sc in curve.scales]
        out.append(at_scale(dataclasses.replace(curve, scales=scales, n_boot=b.n_boot,
                                                n_groups=b.n_groups, ci_level=b.ci_level,
                                                seconds=curve.seconds + b.seconds), n1, reason))
    return out


def _sinks(norms: np.ndarray, s: ProbeSettings) -> np.ndarray:
    """The layer's sink rows (none when sink exclusion is switched off)."""
    return sink_mask(norms, s.sink_factor) if s.exclude_sinks else np.zeros(len(norms), bool)


def _layer_delta(keep: np.ndarray, docs: np.ndarray, li: int, s: ProbeSettings,
                 seed: np.random.SeedSequence) -> Optional[DeltaStat]:
    """δ of each document's kept rows of layer ``li`` against the own-covariance Gaussian, the
    Gaussian of all the layer's kept rows, and as many rows of other documents (None, with a
    warning, when δ cannot be computed for the layer)."""
    usable = _documents_with_points(keep, docs)
    if usable.size < s.layer_sets:
        logger.warning("layer %d: δ skipped: %d documents have 4 or more distinct positions, "
                       "--layer-sets asks for %d", li, usable.size, s.layer_sets)
        return None
    rows = np.isin(docs, usable)
    try:
        stat = delta_vs_null(keep[rows], groups=docs[rows], population=distinct_rows(keep),
                             resample=ResamplePool(keep, groups=docs), null_repeats=s.null_repeats,
                             n_boot=s.n_boot, level=s.level, seed=seed, mode=s.delta_mode,
                             what=f"layer {li} hidden states, one set per document")
    except (InputDataError, NullError) as exc:
        logger.warning("layer %d: δ skipped: %s", li, exc)
        return None
    return dataclasses.replace(stat, seed=s.seed)


def _documents_with_points(keep: np.ndarray, docs: np.ndarray, least: int = 4) -> np.ndarray:
    """The documents (in order of first appearance) with at least ``least`` distinct kept rows."""
    out = []
    for d in dict.fromkeys(docs.tolist()):
        rows = keep[docs == d]
        if rows.shape[0] >= least and np.unique(rows, axis=0).shape[0] >= least:
            out.append(d)
    return np.asarray(out, dtype=docs.dtype)


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
