"""geoprobe: the geometry of language-model embeddings and hidden states.

Public API (DESIGN.md)::

    import geoprobe as gp
    lm = gp.load_model(spec)            # hub id, folder, .gguf; no argument = embedded default
    plan = gp.plan_load(spec, device="cuda")   # whole, streamed or embeddings only, with an estimate
    lm = gp.load_planned(plan)          # a LoadedModel, StreamedModel or EmbeddingModel for gp.probe
    E = gp.load_embeddings(spec)        # the input-embedding table alone (one tensor of one shard)
    corpus = gp.Corpus.default()        # or gp.Corpus.from_path(path, field=...)
    gp.fit_power_law(counts); gp.norm_frequency(norms, counts)
    gp.delta(x); gp.intrinsic_dimension(x)
    gp.delta_vs_null(sets, population=..., resample=...)   # δ_rel beside three nulls, intervals
    gp.intrinsic_dimension_layers([layer0, layer1, ...])   # every layer in one call (one GPU pass)
    hs = gp.hidden_states(lm, corpus); hs.layer(i)          # per-layer states of sampled positions
    streams = gp.seed_streams(seed)     # the SeedSequence children gp.probe draws from, by step name
    profile = gp.probe(lm, corpus); profile.save("profile.json")
    profile.to_frame(); profile.layers_frame()              # pandas tables (geoprobe[pandas])

Heavy modules (torch, transformers) are imported on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_model": "geoprobe.models",
    "load_embeddings": "geoprobe.models",
    "LoadedModel": "geoprobe.models",
    "plan_load": "geoprobe.models",
    "load_planned": "geoprobe.models",
    "Corpus": "geoprobe.corpus",
    "TokenCounts": "geoprobe.corpus",
    "fit_power_law": "geoprobe.probes.frequency",
    "norm_frequency": "geoprobe.probes.norms",
    "delta": "geoprobe.probes.hyperbolicity",
    "delta_vs_null": "geoprobe.probes.delta_stats",
    "intrinsic_dimension": "geoprobe.probes.intrinsic_dim",
    "intrinsic_dimension_layers": "geoprobe.probes.intrinsic_dim",
    "hidden_states": "geoprobe.hidden",
    "HiddenStates": "geoprobe.hidden",
    "probe": "geoprobe.pipeline",
    "ProbeSettings": "geoprobe.pipeline",
    "seed_streams": "geoprobe.pipeline",
    "GeometryProfile": "geoprobe.profile",
    "PowerLawResult": "geoprobe.profile",
    "NormFrequencyResult": "geoprobe.profile",
    "DeltaResult": "geoprobe.profile",
    "DeltaStat": "geoprobe.profile",
    "IDResult": "geoprobe.profile",
    "NullComparison": "geoprobe.profile",
    "GeoprobeError": "geoprobe.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'geoprobe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
