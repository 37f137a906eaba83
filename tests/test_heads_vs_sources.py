"""benchmarks/heads_vs_sources.py: the clusters of the planner's k-means set beside the source sets.
Oracles: sets drawn apart give pure clusters and an adjusted Rand index of 1; the same labelling
scored by scikit-learn directly; the silhouettes are those of adapters.plan.choose_heads."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from adapters.plan import choose_heads

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "heads_vs_sources.py"


def _script():
    spec = importlib.util.spec_from_file_location("heads_vs_sources", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_separated_sets_give_pure_clusters_and_the_planners_choice():
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(2, 16)) * 5
    x = np.concatenate([c + rng.normal(size=(40, 16)) * 0.3 for c in centres])
    sources = ["boolq"] * 40 + ["arc"] * 40
    table = _script().cluster_table(x, sources, 2, seed=0)
    assert table["adjusted_rand"] == 1.0 and table["normalized_mutual_info"] == 1.0
    counts = sorted(tuple(sorted(c.items())) for c in table["counts"].values())
    assert counts == [(("arc", 0), ("boolq", 40)), (("arc", 40), ("boolq", 0))]
    assert choose_heads(x, seed=0)[0] == 2


def test_mixed_sets_score_as_scikit_learn_scores_them():
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(5)
    x = rng.normal(size=(60, 8))
    sources = list(rng.choice(["a", "b", "c"], size=60))
    table = _script().cluster_table(x, sources, 3, seed=2)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    labels = KMeans(n_clusters=3, n_init=4, random_state=2).fit_predict(xn)
    assert table["adjusted_rand"] == adjusted_rand_score(sources, labels)
    assert sum(sum(c.values()) for c in table["counts"].values()) == 60
