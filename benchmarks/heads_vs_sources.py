"""Why `auto` chose its number of HydraLoRA heads on a union of training sets: the planner's k-means
clusters of the training-example embeddings set beside the set each example came from.

The planner (geoprobe.workflows.plan_for_training → adapters.plan.choose_heads) embeds a seeded sample of
500 training prompts (geoprobe.hidden.prompt_embeddings: the mean-pooled last hidden state), normalises
the rows and takes the k of k-means (k = 2 … 10) with the best silhouette as the number of heads. This
script repeats those steps on the same prompts, in the same order and with the same seed, so its
silhouettes equal the plan's, and adds what the plan does not record: for the chosen k and for k = the
number of sets, the table of clusters against source sets and the adjusted Rand index and normalised
mutual information between them (scikit-learn). Writes one JSON record.

    python benchmarks/heads_vs_sources.py --data ../shared/data/llm_adapters_commonsense/{ARC-Challenge,ARC-Easy,boolq,openbookqa}/train.json \
        --out reports/experiments/commonsense-smollm2-heads.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adapters.data import load_examples  # noqa: E402
from adapters.plan import choose_heads  # noqa: E402
from geoprobe.hidden import embedding_sample, prompt_embeddings  # noqa: E402
from geoprobe.models import load_model  # noqa: E402
from geoprobe.records import write_json  # noqa: E402
from geoprobe.workflows import planning_texts  # noqa: E402


def cluster_table(x: np.ndarray, sources: list[str], k: int, seed: int) -> dict:
    """k-means (the planner's: rows L2-normalised, n_init 4, random_state seed) on x; the count of each
    source set in each cluster, and ARI / NMI of clusters against sources."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    labels = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(xn)
    names = sorted(set(sources))
    table = {f"cluster {c}": {s: int(sum(1 for lab, src in zip(labels, sources) if lab == c and src == s))
                              for s in names} for c in range(k)}
    return {"k": k, "counts": table, "adjusted_rand": float(adjusted_rand_score(sources, labels)),
            "normalized_mutual_info": float(normalized_mutual_info_score(sources, labels))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model spec (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--data", nargs="+", required=True, help="the training sets, in the order given to compare")
    ap.add_argument("--seed", type=int, default=0, help="the comparison's --plan-seed")
    ap.add_argument("--max-embedded", type=int, default=500)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    lm = load_model(args.model, device="cpu")
    examples, sources = [], []
    for path in args.data:
        part = load_examples(path)
        examples.extend(part)
        sources.extend([Path(path).parent.name] * len(part))
    texts = planning_texts(lm, examples)
    t0 = time.perf_counter()
    emb = prompt_embeddings(lm.model, lm.tokenizer, texts, max_examples=args.max_embedded, seed=args.seed)
    idx = embedding_sample(len(texts), args.max_embedded, args.seed)  # the sample's rows
    picked = [sources[i] for i in idx]
    best, silhouettes, reason = choose_heads(emb, seed=args.seed)
    n_sets = len(set(sources))
    record = {
        "schema": "geoprobe.heads_vs_sources", "schema_version": 1,
        "model": args.model or "default (SmolLM2-135M-Instruct)",
        "data": [f"{Path(p).parent.name}/{Path(p).name}" for p in args.data],
        "train_sizes": {s: sources.count(s) for s in dict.fromkeys(sources)},
        "sample_sizes": {s: picked.count(s) for s in dict.fromkeys(sources)},
        "seed": args.seed, "chosen_heads": best, "silhouettes": silhouettes, "reason": reason,
        "clusters": [cluster_table(emb, picked, k, args.seed) for k in sorted({best, n_sets})],
        "seconds": round(time.perf_counter() - t0, 1),
        "command": "python benchmarks/heads_vs_sources.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, record)
    print(reason)
    for c in record["clusters"]:
        print(f"k = {c['k']}: ARI {c['adjusted_rand']:.3f}, NMI {c['normalized_mutual_info']:.3f}")
        for name, counts in c["counts"].items():
            print(f"  {name}: {counts}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
