"""Before and after: how fine-tuning moved the geometry the adapters were planned from.

Every trained run of a comparison keeps its adapter (OUT/adapters/<run>). The fine-tuned model is the
base model with that adapter merged into its weights where the method allows (registry ``mergeable``:
LoRA, DoRA, GeLoRA; merged into a copy of the base, which stays as it was), else the base model with the
adapter in its forward pass (HypLoRA, HydraLoRA and their GeLoRA combinations; removed again afterwards).
It is probed exactly as the base model is — the same prompts (the training prompts, as the planner reads
them), settings and seed (:func:`geoprobe.pipeline.probe`) — and each quantity is compared with the base:

* **per-prompt δ_rel at every layer** (``LayerGeometry.delta``: one δ_rel per prompt, of its hidden-state
  positions): the difference of the means, tuned − base, paired by prompt (both profiles take the same
  prompts in the same seeded order), with the expanded percentile-bootstrap interval over prompts of
  :func:`geoprobe.probes.uncertainty.paired_bootstrap`. Where the two profiles kept different prompts
  (a prompt can drop out when its positions are left out as sinks), the interval resamples the two sets
  independently (``paired`` False).
* **per-prompt δ_rel of the input-token embeddings** (``delta_prompts``): no method here adapts the
  embedding table, so this does not move; it is reported as a check (a difference of exactly 0).
* **per-layer intrinsic dimension** (TwoNN): the difference tuned − base with the percentile interval of
  the paired bootstrap replicates d*_b = ID*_b(tuned) − ID*_b(base): the block bootstrap draws the same
  documents in replicate b for both models when they have the same number of groups and the same seed
  (:mod:`geoprobe.probes.id_bootstrap`). Otherwise (or without replicates) the interval is the normal one,
  difference ± z·√(SE_base² + SE_tuned²) (``paired`` False).

A difference is "moved" when its interval excludes 0. Files: OUT/probes/base.json and
OUT/probes/<run>.json (the profiles, each written as soon as it is measured; a rerun skips them) and
OUT/after.json (schema ``geoprobe.compare_after``), which the summary (``after``) and the report include.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from ..records import read_json, write_json

log = logging.getLogger(__name__)

__all__ = ["AFTER_FILE", "PROBES", "AFTER_SCHEMA", "delta_shift", "id_shift", "profile_shift", "aggregate",
           "how_probed", "tuned_model", "probe_after"]

AFTER_FILE = "after.json"
PROBES = "probes"
AFTER_SCHEMA = "geoprobe.compare_after"
SCHEMA_VERSION = 1


# --------------------------------------------------------------------------- one quantity's move
def _shift(before: float, after: float, low: Optional[float], high: Optional[float], *, level: float, n: int,
           paired: bool, how: str) -> dict[str, Any]:
    moved = low is not None and high is not None and (low > 0 or high < 0)
    return {"before": float(before), "after": float(after), "difference": float(after - before),
            "low": None if low is None else float(low), "high": None if high is None else float(high),
            "level": level, "n": int(n), "paired": paired, "moved": bool(moved), "interval": how}


def delta_shift(base: Any, tuned: Any, *, n_boot: int, level: float, seed: int) -> Optional[dict[str, Any]]:
    """How the mean δ_rel of ``tuned`` (a :class:`~geoprobe.profile.DeltaStat`) differs from ``base``'s
    (module docstring); None when either is missing or has fewer than 2 sets."""
    from ..probes.uncertainty import expanded_level, paired_bootstrap, percentile_interval

    if base is None or tuned is None or len(base.values) < 2 or len(tuned.values) < 2:
        return None
    a, b = np.asarray(tuned.values, dtype=np.float64), np.asarray(base.values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    if a.shape == b.shape:
        pb = paired_bootstrap(a, b, n_boot=n_boot, level=level, rng=rng)
        return _shift(b.mean(), a.mean(), *pb.ci_diff, level=level, n=a.size, paired=True,
                      how=f"paired bootstrap over {a.size} prompts ({n_boot} resamples, expanded percentile)")
    ia = rng.integers(0, a.size, size=(n_boot, a.size))
    ib = rng.integers(0, b.size, size=(n_boot, b.size))
    diffs = a[ia].mean(axis=1) - b[ib].mean(axis=1)
    low, high = percentile_interval(diffs, expanded_level(level, min(a.size, b.size)))
    return _shift(b.mean(), a.mean(), low, high, level=level, n=min(a.size, b.size), paired=False,
                  how=f"independent bootstrap of {b.size} and {a.size} prompts ({n_boot} resamples)")


def id_shift(base: Any, tuned: Any, *, level: float) -> Optional[dict[str, Any]]:
    """How the intrinsic dimension of ``tuned`` (an :class:`~geoprobe.profile.IDResult`) differs from
    ``base``'s (module docstring); None when either is missing."""
    from scipy.stats import norm

    from ..probes.uncertainty import percentile_interval

    if base is None or tuned is None:
        return None
    ra, rb = np.asarray(tuned.replicates, dtype=np.float64), np.asarray(base.replicates, dtype=np.float64)
    if ra.size >= 2 and ra.shape == rb.shape and tuned.n_groups == base.n_groups and tuned.seed == base.seed:
        d = ra - rb
        d = d[np.isfinite(d)]
        low, high = percentile_interval(d, level)
        return _shift(base.dimension, tuned.dimension, low, high, level=level, n=d.size, paired=True,
                      how=f"paired block-bootstrap replicates ({d.size}, the same documents in both)")
    se = float(np.hypot(base.error, tuned.error))
    half = float(norm.ppf(0.5 + level / 2)) * se
    diff = tuned.dimension - base.dimension
    return _shift(base.dimension, tuned.dimension, diff - half, diff + half, level=level, n=0, paired=False,
                  how="normal interval from the two standard errors")


def profile_shift(base: Any, tuned: Any, *, n_boot: int, level: float, seed: int) -> dict[str, Any]:
    """Every move of ``tuned`` against ``base`` (two :class:`~geoprobe.profile.GeometryProfile` of one
    model on one corpus): the input-embedding δ_rel and, per layer, the per-prompt δ_rel and the TwoNN
    intrinsic dimension."""
    layers = []
    by_layer = {lg.layer: lg for lg in tuned.layers}
    for lb in base.layers:
        lt = by_layer.get(lb.layer)
        if lt is None:
            continue
        layers.append({"layer": lb.layer,
                       "delta": delta_shift(lb.delta, lt.delta, n_boot=n_boot, level=level, seed=seed + lb.layer),
                       "twonn": id_shift(lb.twonn, lt.twonn, level=level)})
    return {"delta_prompts": delta_shift(base.delta_prompts, tuned.delta_prompts, n_boot=n_boot, level=level,
                                         seed=seed),
            "layers": layers}


def aggregate(shifts: dict[str, dict[str, Any]], methods: dict[str, str]) -> dict[str, Any]:
    """Per method (``methods``: run → method) and layer, the mean ± std over seeds of the δ_rel and ID
    differences and how many runs moved (interval excluding 0)."""
    out: dict[str, Any] = {}
    for method in dict.fromkeys(methods.values()):
        runs = [r for r, m in methods.items() if m == method and r in shifts]
        rows = []
        for i, layer in enumerate(shifts[runs[0]]["layers"] if runs else []):
            row: dict[str, Any] = {"layer": layer["layer"]}
            for key in ("delta", "twonn"):
                cells = [shifts[r]["layers"][i][key] for r in runs if shifts[r]["layers"][i][key] is not None]
                d = np.array([c["difference"] for c in cells], dtype=np.float64)
                row[key] = {"n": int(d.size), "mean": float(d.mean()) if d.size else None,
                            "std": float(d.std(ddof=1)) if d.size > 1 else None,
                            "moved": sum(bool(c["moved"]) for c in cells),
                            "before": cells[0]["before"] if cells else None}
            rows.append(row)
        out[method] = {"runs": runs, "layers": rows}
    return out


# --------------------------------------------------------------------------- the fine-tuned model
MERGED, THROUGH = "merged into the weights", "through the adapter (not mergeable)"


def how_probed(method: str) -> str:
    """How :func:`tuned_model` gives the fine-tuned model of registry ``method``: merged or through the adapter."""
    from adapters import registry

    return MERGED if registry.get(method).mergeable else THROUGH


@contextlib.contextmanager
def tuned_model(lm: Any, adapter_dir: Path, method: str) -> Iterator[Any]:
    """The fine-tuned model as a :class:`~geoprobe.models.LoadedModel`: the adapter in ``adapter_dir``
    merged into a copy of the base where registry ``method`` is mergeable, else loaded into the base's
    forward pass and removed on exit (the base model is as it was afterwards either way)."""
    import adapters
    from adapters.build import unload

    if how_probed(method) == MERGED:
        merged = adapters.load(copy.deepcopy(lm.model), adapter_dir).merge_and_unload()
        yield dataclasses.replace(lm, model=merged.eval())
        return
    peft_model = adapters.load(lm.model, adapter_dir)
    try:
        yield dataclasses.replace(lm, model=peft_model.eval())
    finally:
        unload(peft_model)


# --------------------------------------------------------------------------- the workflow
def _same_settings(stored: Any, wanted: dict[str, Any]) -> bool:
    """Whether probe settings ``stored`` hold every setting of ``wanted`` with its value (the device aside)."""
    return isinstance(stored, dict) and all(k in stored and stored[k] == v for k, v in wanted.items() if k != "device")


def _stored(path: Path, settings: dict[str, Any], corpus_sha256: str) -> Any:
    """The profile stored at ``path`` when it was measured with ``settings`` on the same corpus, else None."""
    from ..profile import GeometryProfile

    if not path.is_file():
        return None
    stored = GeometryProfile.load(path)
    if _same_settings(stored.settings, settings) and stored.corpus.sha256 == corpus_sha256:
        return stored
    log.info("%s was measured with other settings or prompts; measuring again", path)
    return None


def _earlier_shifts(out: Path, wanted: dict[str, Any], corpus_sha256: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The per-run shifts (and how each run was probed) of an OUT/after.json measured with ``wanted`` on
    the same prompts; empty when there is none or it was measured otherwise."""
    path = out / AFTER_FILE
    if not path.is_file():
        return {}, {}
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}, {}
    same = (isinstance(stored, dict) and stored.get("corpus", {}).get("sha256") == corpus_sha256
            and _same_settings(stored.get("settings"), wanted))
    return (dict(stored.get("runs") or {}), dict(stored.get("how") or {})) if same else ({}, {})


def probe_after(lm: Any, out: str | Path, texts: Sequence[str], *, settings: Any, seed: int = 0,
                progress: bool = False, device: Optional[str] = None, command: str = "",
                echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Probe the base model and every trained run of the comparison in ``out`` on ``texts`` (module
    docstring) with the :class:`~geoprobe.pipeline.ProbeSettings` ``settings``; write OUT/probes/*.json
    and OUT/after.json and return the latter's content. Runs whose profile is already in OUT/probes are
    not probed again, and need their adapter no more; a run with neither adapter nor profile keeps its
    shift from an OUT/after.json measured with the same settings on the same prompts (a folder copied
    without its adapters and profiles keeps its after.json whole)."""
    from ..corpus import Corpus
    from ..pipeline import probe

    out = Path(out)
    corpus = Corpus.from_texts(texts, name="training prompts")
    measure = lambda m: probe(m, corpus, settings=settings, progress=progress, device=device,  # noqa: E731
                              command=command, layers=True)
    t0 = time.perf_counter()
    wanted = json.loads(json.dumps(settings.to_dict(), default=str))
    base = _stored(out / PROBES / "base.json", wanted, corpus.sha256)
    if base is None:
        base = measure(lm)
        base.save(out / PROBES / "base.json")
    records = {p.stem: read_json(p, "run") for p in sorted((out / "runs").glob("*.json"))}
    trained = {name: rec for name, rec in records.items() if rec.get("adapter_dir")}
    shifts, how, methods = {}, {}, {}
    earlier, earlier_how = _earlier_shifts(out, wanted, corpus.sha256)
    for i, (name, rec) in enumerate(trained.items(), 1):
        folder = out / rec["adapter_dir"]
        path = out / PROBES / f"{name}.json"
        profile = _stored(path, wanted, corpus.sha256)
        if profile is None and not folder.is_dir():  # a stored profile serves without the adapter it came from
            if name in earlier:  # neither adapter nor profile, but after.json measured it with these settings
                shifts[name], how[name], methods[name] = earlier[name], earlier_how.get(name, ""), rec["method"]
                echo(f"[after {i}/{len(trained)}] {name}: no adapter or profile here; kept from {AFTER_FILE}")
            else:
                echo(f"[after {i}/{len(trained)}] {name}: no adapter in {folder} and no stored profile; skipped")
            continue
        measured = profile is None
        how[name] = how_probed(rec["built_method"])
        if measured:
            with tuned_model(lm, folder, rec["built_method"]) as tuned:
                profile = measure(tuned)
            profile.save(path)
        shifts[name] = profile_shift(base, profile, n_boot=settings.n_boot, level=settings.level, seed=seed)
        methods[name] = rec["method"]
        moved = sum(bool(layer["twonn"] and layer["twonn"]["moved"]) for layer in shifts[name]["layers"])
        echo(f"[after {i}/{len(trained)}] {name}: {'probed' if measured else 'probed earlier'} ({how[name]}); "
             f"intrinsic dimension moved in {moved} of {len(shifts[name]['layers'])} layers")
    result = {"schema": AFTER_SCHEMA, "schema_version": SCHEMA_VERSION, "model": base.model.name,
              "corpus": {"name": base.corpus.name, "n_documents": base.corpus.n_documents,
                         "sha256": base.corpus.sha256},
              "settings": wanted,
              "base": {"delta_prompts": None if base.delta_prompts is None else base.delta_prompts.mean,
                       "layers": [{"layer": lg.layer, "twonn": None if lg.twonn is None else lg.twonn.dimension,
                                   "delta": None if lg.delta is None else lg.delta.mean} for lg in base.layers]},
              "how": how, "runs": shifts, "by_method": aggregate(shifts, methods),
              "rules": {"moved": "a difference moved when its interval excludes 0",
                        "delta": "per-prompt δ_rel at each layer: tuned − base, paired by prompt, expanded "
                                 "percentile bootstrap over prompts",
                        "twonn": "TwoNN intrinsic dimension per layer: tuned − base, percentile interval of the "
                                 "paired block-bootstrap replicates",
                        "embeddings": "the input-embedding δ_rel does not move: no method adapts the embedding "
                                      "table"},
              "seconds": time.perf_counter() - t0}
    write_json(out / AFTER_FILE, result)
    return result
