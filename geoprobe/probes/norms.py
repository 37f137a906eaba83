"""Input-embedding norm against token frequency (HypLoRA, arXiv 2410.04010 §4.1, Table 1).

HypLoRA reports the mean input-embedding L2 norm of four hand-picked word groups (function words,
question words, categories, specific words; LLaMA3-8B means 0.353, 0.456, 0.499, 0.569) and reads
the rising order as "frequent, abstract tokens sit near the origin". Four group means are a thin basis
for that claim, so this module measures the relation over every token the corpus contains:

* Spearman's ρ between the norm ‖e_t‖ and log10 count_t over the tokens with count_t > 0;
* equal-width bins of log10 count with the norm's n, mean, min and max in each bin;
* the mean norm of seen and of unseen tokens, and a 2-D histogram (log10 count × norm);
* the paper's word groups, tokenized by the model's own tokenizer, for comparison.

Tokenization rule for the word groups: each word is tokenized with a leading space (" dog"), as it
appears mid-sentence — byte-level BPE vocabularies hold " dog" and "dog" as different tokens — with
no special tokens. Tokens that decode to pure whitespace (the bare " " a byte-level tokenizer emits
before digits: " 380" → " ", "3", "8", "0") are skipped. A word that still spans several tokens gets
the mean of their norms and ``multi_token=True``. Tokenizers that drop the leading space (WordPiece)
are detected and say so in :attr:`WordNorm.rule`.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
from scipy import stats

from ..errors import InputDataError
from .frequency import validate_counts
from ..profile import Density2D, NormBin, NormFrequencyResult, WordGroup, WordNorm

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupSpec:
    """A named word group and, when it comes from a paper, the mean norm reported there."""

    name: str
    words: tuple[str, ...]
    paper_mean_norm: Optional[float] = None


#: HypLoRA Table 1 word groups with the paper's LLaMA3-8B mean norms.
PAPER_GROUPS: tuple[GroupSpec, ...] = (
    GroupSpec("function words", ("to", "in", "have", "that", "and", "is", "for"), 0.353),
    GroupSpec("question words", ("how", "much", "many", "time", "cost"), 0.456),
    GroupSpec("categories", ("animal", "fruit", "number", "color", "size"), 0.499),
    GroupSpec("specific", ("dog", "cow", "apple", "banana", "380", "480", "purple", "red", "medium",
                           "small", "large"), 0.569),
)

Groups = Union[Sequence[GroupSpec], Mapping[str, Sequence[str]]]


# --------------------------------------------------------------------------- input handling
def _validate_norms(norms: Any) -> np.ndarray:
    if hasattr(norms, "detach"):  # torch tensor
        norms = norms.detach().cpu().double().numpy()
    try:
        arr = np.asarray(norms, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputDataError(f"norms must be a 1-D numeric vector, one L2 norm per token id ({exc})") \
            from None
    if arr.ndim != 1:
        raise InputDataError(f"norms must be a 1-D vector (one L2 norm per token id), got shape "
                             f"{arr.shape}; take np.linalg.norm(embeddings, axis=1) first")
    if arr.size == 0:
        raise InputDataError("norms is empty; pass one embedding norm per token id")
    if not np.all(np.isfinite(arr)):
        raise InputDataError(f"norms contain {int(np.sum(~np.isfinite(arr)))} NaN/inf values; check "
                             "the embedding matrix (a failed dequantization or overflow in fp16)")
    if np.any(arr < 0):
        raise InputDataError("norms contain negative values; an L2 norm is ≥ 0 — pass the norms, "
                             "not the embeddings themselves")
    return arr


def _group_specs(groups: Groups) -> list[GroupSpec]:
    if isinstance(groups, Mapping):
        return [GroupSpec(str(k), tuple(str(w) for w in v)) for k, v in groups.items()]
    out = []
    for g in groups:
        if not isinstance(g, GroupSpec):
            raise InputDataError(f"groups must be GroupSpec entries or a mapping name → words, got "
                                 f"{type(g).__name__}")
        out.append(g)
    return out


# --------------------------------------------------------------------------- word groups
def _ids(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], (list, tuple)):
        ids = ids[0]
    return [int(i) for i in ids]


def word_norm(tokenizer: Any, word: str, norms: np.ndarray) -> Optional[WordNorm]:
    """Norm of ``word`` under the module's tokenization rule (see the module docstring).

    Returns None (and logs) when the word yields no non-whitespace token.
    """
    text = " " + word
    ids = _ids(tokenizer, text)
    bare = _ids(tokenizer, word)
    kept: list[int] = []
    skipped: list[int] = []
    for i in ids:
        (skipped if tokenizer.decode([i]).strip() == "" else kept).append(i)
    if not kept:
        logger.warning("word %r gives no non-whitespace token; left out of its group", word)
        return None
    if max(kept) >= norms.size:
        raise InputDataError(
            f"the tokenizer maps {text!r} to id {max(kept)} but norms has only {norms.size} entries; "
            "pass the tokenizer of the model the norms come from")
    tokens = [str(t) for t in tokenizer.convert_ids_to_tokens(kept)]
    value = float(np.mean(norms[kept]))
    parts = [f"{text!r} tokenized with a leading space, no special tokens"]
    if ids == bare:
        parts.append("this tokenizer ignores the leading space")
    if skipped:
        sk = [str(t) for t in tokenizer.convert_ids_to_tokens(skipped)]
        parts.append(f"{len(skipped)} pure-whitespace token(s) {sk} skipped")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in kept:
        parts.append("contains the unknown token")
    parts.append("norm of its single token" if len(kept) == 1
                 else f"norm = mean over its {len(kept)} tokens")
    return WordNorm(word=word, tokens=tokens, token_ids=kept, norm=value, multi_token=len(kept) > 1,
                    rule="; ".join(parts))


def word_groups(tokenizer: Any, norms: np.ndarray, groups: Groups = PAPER_GROUPS) -> list[WordGroup]:
    """Each group's words as :class:`WordNorm` and the group's mean norm (words weighted equally)."""
    out = []
    for spec in _group_specs(groups):
        words = [w for w in (word_norm(tokenizer, word, norms) for word in spec.words) if w is not None]
        mean = float(np.mean([w.norm for w in words])) if words else math.nan
        out.append(WordGroup(name=spec.name, mean_norm=mean, words=words,
                             paper_mean_norm=spec.paper_mean_norm))
    return out


# --------------------------------------------------------------------------- bins and density
def log_frequency_bins(log_counts: np.ndarray, values: np.ndarray, n_bins: int) -> list[NormBin]:
    """Equal-width bins of ``log_counts`` spanning [min, max]; each bin is [lo, hi) except the last,
    which is [lo, hi]. Empty bins have n = 0 and NaN statistics. A constant ``log_counts`` gives one
    bin [v, v]."""
    lo_all, hi_all = float(log_counts.min()), float(log_counts.max())
    if hi_all == lo_all:
        return [NormBin(lo=lo_all, hi=hi_all, n=int(values.size), mean=float(values.mean()),
                        min=float(values.min()), max=float(values.max()))]
    edges = np.linspace(lo_all, hi_all, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, log_counts, side="right") - 1, 0, n_bins - 1)
    n = np.bincount(idx, minlength=n_bins)
    sums = np.bincount(idx, weights=values, minlength=n_bins)
    mins = np.full(n_bins, np.inf)
    maxs = np.full(n_bins, -np.inf)
    np.minimum.at(mins, idx, values)
    np.maximum.at(maxs, idx, values)
    bins = []
    for b in range(n_bins):
        if n[b]:
            bins.append(NormBin(lo=float(edges[b]), hi=float(edges[b + 1]), n=int(n[b]),
                                mean=float(sums[b] / n[b]), min=float(mins[b]), max=float(maxs[b])))
        else:
            bins.append(NormBin(lo=float(edges[b]), hi=float(edges[b + 1]), n=0, mean=math.nan,
                                min=math.nan, max=math.nan))
    return bins


def density_2d(x: np.ndarray, y: np.ndarray, n_bins: int = 40) -> Density2D:
    """2-D histogram, ``counts[i][j]`` = points with x in x-bin i and y in y-bin j."""
    h, xe, ye = np.histogram2d(x, y, bins=n_bins)
    return Density2D(x_edges=[float(v) for v in xe], y_edges=[float(v) for v in ye],
                     counts=[[int(c) for c in row] for row in h])


# --------------------------------------------------------------------------- public entry point
def norm_frequency(norms: Any, counts: Any, *, tokenizer: Any = None, n_bins: int = 10,
                   groups: Groups = PAPER_GROUPS, density_bins: int = 40) -> NormFrequencyResult:
    """Embedding norm against token frequency (HypLoRA, arXiv 2410.04010 §4.1, Table 1).

    ``norms[t]`` is the L2 norm of the input embedding of token id t, ``counts[t]`` its corpus count.
    If the two lengths differ (embedding matrices are often padded past the tokenizer's vocabulary,
    or a tokenizer adds tokens the matrix lacks) both are cut to the common length min(len) and the
    ids beyond it are left out of every statistic except the word groups, which read ``norms`` in
    full; dropping positive counts is logged as a warning.

    Returns Spearman's ρ (and its p-value) between norm and log10 count over tokens with count > 0
    (NaN when either is constant), ``n_bins`` equal-width log10-count bins, the mean norm of seen and
    unseen tokens (None if every token was seen), a ``density_bins``² histogram of (log10 count,
    norm) and, when a Hugging Face ``tokenizer`` is given, the word ``groups`` under the rule in the
    module docstring (without a tokenizer ``groups`` is empty).

    Raises :class:`InputDataError` for empty or NaN/negative norms, bad counts, and when no token in
    the common range has a positive count.
    """
    t0 = time.perf_counter()
    nv = _validate_norms(norms)
    cv = validate_counts(counts)
    if not (isinstance(n_bins, (int, np.integer)) and n_bins >= 1):
        raise InputDataError(f"n_bins must be a positive integer, got {n_bins!r}")
    if not (isinstance(density_bins, (int, np.integer)) and density_bins >= 1):
        raise InputDataError(f"density_bins must be a positive integer, got {density_bins!r}")

    length = min(nv.size, cv.size)
    if nv.size != cv.size:
        dropped = int(np.sum(cv[length:] > 0))
        log = logger.warning if dropped else logger.info
        log("norms has %d entries and counts %d; using the first %d token ids%s", nv.size, cv.size,
            length, f" ({dropped} ids with positive counts dropped)" if dropped else "")
    n_common = nv[:length]
    c_common = cv[:length]
    seen = c_common > 0
    n_seen = int(seen.sum())
    if n_seen == 0:
        raise InputDataError(
            f"no token among the first {length} ids has a positive count; the counts do not belong to "
            "this model's tokenizer or the corpus is empty")

    y = n_common[seen]
    x = np.log10(c_common[seen].astype(np.float64))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rho, p = stats.spearmanr(y, x)
    rho, p = float(rho), float(p)
    for w in caught:
        logger.warning("Spearman ρ: %s", w.message)

    unseen = ~seen
    mean_unseen = float(n_common[unseen].mean()) if unseen.any() else None
    group_list = word_groups(tokenizer, nv, groups) if tokenizer is not None else []

    return NormFrequencyResult(
        spearman_rho=rho, spearman_p=p, n_tokens_seen=n_seen, mean_norm_seen=float(y.mean()),
        mean_norm_unseen=mean_unseen, bins=log_frequency_bins(x, y, int(n_bins)), groups=group_list,
        density=density_2d(x, y, int(density_bins)), seconds=time.perf_counter() - t0)
