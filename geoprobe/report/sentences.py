"""Plain-language readings of the headline numbers, each set against its baseline.

The δ-hyperbolicity verdicts follow :attr:`geoprobe.profile.DeltaStat.side_of_null`: a value more
than two null standard deviations below the matched Gaussian null is "more tree-like than random
points of the same size and dimension" (METHODS.md §3: distance concentration alone gives
δ_rel ≈ 0.06–0.26, so a bare δ_rel says nothing). Frequency and norm readings compare with the
HypLoRA paper (arXiv 2410.04010 §4.1: γ ≈ 1.9 on GSM8K prompts; frequent tokens near the origin,
word-group means rising from function words to specific words).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

from .markup import finite, num, pm, pvalue

PAPER_GAMMA = 1.87
# HypLoRA Table 1 (LLaMA3-8B): function words, question words, categories, specific words.
PAPER_GROUP_ORDER = ("function", "question", "categor", "specific")

VERDICT = {
    "below": "more tree-like than random points of this size and dimension",
    "within": "no more tree-like than random points of this size and dimension",
    "above": "less tree-like than random points of this size and dimension",
}
VERDICT_SHORT = {"below": "below null", "within": "within null", "above": "above null"}


def null_distance(stat) -> float:
    """(mean − null mean) in units of the null's standard deviation (NaN when it is zero)."""
    if not (finite(stat.mean) and finite(stat.null_mean) and finite(stat.null_std)):
        return math.nan
    if stat.null_std <= 0:
        return math.nan
    return (stat.mean - stat.null_mean) / stat.null_std


def delta_sentence(stat, subject: str) -> str:
    """'δ_rel 0.12 ± 0.02 against 0.09 ± 0.01 for matched Gaussian points: less tree-like …'."""
    if not (finite(stat.mean) and finite(stat.null_mean)):
        return f"δ_rel of {subject} could not be compared with its null (a value is missing)."
    side = stat.side_of_null
    z = null_distance(stat)
    how_far = ""
    if side != "within" and finite(z):
        how_far = f" ({num(abs(z), 2)} null standard deviations {'below' if z < 0 else 'above'})"
    sets = f"{stat.n_sets} point set{'s' if stat.n_sets != 1 else ''} of about {stat.n_points} points"
    return (f"δ_rel of {subject} is {pm(stat.mean, stat.std)} against "
            f"{pm(stat.null_mean, stat.null_std)} for matched Gaussian points "
            f"({sets} in {stat.dim} dimensions): {VERDICT[side]}{how_far}.")


def power_law_sentence(pl) -> str:
    """What γ, x_min and s say, beside the paper's γ ≈ 1.9."""
    if not finite(pl.gamma):
        return "No power law could be fitted to the token frequency distribution."
    text = (f"Above k = {pl.xmin} occurrences, the share of token types seen k times falls as "
            f"k^−{num(pl.gamma, 3)}")
    if finite(pl.gamma_err) and pl.gamma_err > 0:
        text += f" (± {num(pl.gamma_err, 2)})"
    text += (f"; {num(pl.n_tail_types)} of {num(pl.n_types)} token types lie in that tail. "
             f"The paper reports γ ≈ {PAPER_GAMMA:g} on GSM8K prompts; γ = 2 would be Zipf's law "
             f"with s = 1.")
    if finite(pl.zipf_exponent):
        text += (f" Equivalently the r-th most frequent token occurs about r^−"
                 f"{num(pl.zipf_exponent, 3)} times as often as the first (s = 1/(γ − 1)).")
    return text


def lognormal_sentence(pl) -> Optional[str]:
    """Power law against lognormal, only when the lognormal fit converged."""
    if not pl.lognormal_converged or not finite(pl.lognormal_loglikelihood_ratio):
        return None
    r, p = pl.lognormal_loglikelihood_ratio, pl.lognormal_p
    if finite(p) and p < 0.1:
        better = "the power law" if r > 0 else "a lognormal"
        return (f"Against a lognormal tail, {better} fits better (log-likelihood ratio "
                f"R = {num(r, 3)}, p {_p_text(p)}).")
    return (f"A lognormal tail fits about as well (log-likelihood ratio R = {num(r, 3)}, "
            f"p {_p_text(p)}): the data cannot tell the two apart.")


def _p_text(p: float) -> str:
    text = pvalue(p)
    return text if text.startswith("<") else f"= {text}"


def _strength(rho: float) -> str:
    a = abs(rho)
    if a < 0.1:
        return "no"
    if a < 0.3:
        return "a weak"
    if a < 0.5:
        return "a moderate"
    return "a strong"


def spearman_sentence(norms) -> str:
    """Reading of Spearman ρ between embedding norm and log-frequency."""
    rho = norms.spearman_rho
    if not finite(rho):
        return "The rank correlation of norm and frequency could not be computed."
    strength = _strength(rho)
    p = f", p {_p_text(norms.spearman_p)}" if finite(norms.spearman_p) else ""
    head = (f"Spearman ρ = {num(rho, 2)} between embedding norm and log-frequency over "
            f"{num(norms.n_tokens_seen)} tokens seen{p}: ")
    if strength == "no":
        return head + ("no monotone relation — frequency does not set a token's distance from "
                       "the origin here, contrary to the paper's claim.")
    if rho < 0:
        return head + (f"{strength} tendency for frequent tokens to sit nearer the origin "
                       "(smaller norm), as the paper claims.")
    return head + (f"{strength} tendency for frequent tokens to sit farther from the origin, "
                   "the opposite of the paper's claim.")


def _group_rank(name: str) -> Optional[int]:
    low = name.lower()
    for i, key in enumerate(PAPER_GROUP_ORDER):
        if key in low:
            return i
    return None


def groups_order_sentence(groups: Sequence) -> Optional[str]:
    """Whether the word-group means rise in the paper's order (function → specific words)."""
    ranked = [(r, g) for g in groups if (r := _group_rank(g.name)) is not None and finite(g.mean_norm)]
    if len(ranked) < 2:
        return None
    ranked.sort(key=lambda t: t[0])
    means = [g.mean_norm for _, g in ranked]
    names = " < ".join(g.name for _, g in ranked)
    if all(a < b for a, b in zip(means, means[1:])):
        return f"The word-group means rise in the paper's order ({names})."
    return (f"The word-group means do not follow the paper's order ({names}): "
            + ", ".join(f"{g.name} {num(g.mean_norm, 3)}" for _, g in ranked) + ".")


def layers_delta_sentence(layers: Sequence) -> Optional[str]:
    """How many layers fall below, within and above their null."""
    stats = [lg.delta for lg in layers if lg.delta is not None and finite(lg.delta.mean)]
    if not stats:
        return None
    counts = {k: sum(1 for s in stats if s.side_of_null == k) for k in ("below", "within", "above")}
    parts = [f"{counts['below']} below (more tree-like than random)",
             f"{counts['within']} within 2 null standard deviations",
             f"{counts['above']} above (less tree-like)"]
    return f"Of {len(stats)} layers with δ measured, " + ", ".join(parts) + "."


def id_range(layers: Sequence, attr: str = "twonn") -> Optional[tuple[float, int, float, int]]:
    """(lowest dimension, its layer, highest dimension, its layer) over layers."""
    pts = [(getattr(lg, attr).dimension, lg.layer) for lg in layers
           if getattr(lg, attr) is not None and finite(getattr(lg, attr).dimension)]
    if not pts:
        return None
    lo = min(pts)
    hi = max(pts)
    return lo[0], lo[1], hi[0], hi[1]


def id_sentence(layers: Sequence, hidden_size: int) -> Optional[str]:
    """Range of the TwoNN (else GRIDE) dimension over layers against the ambient dimension."""
    for attr, name in (("twonn", "TwoNN"), ("gride", "GRIDE")):
        rng = id_range(layers, attr)
        if rng is not None:
            lo, llo, hi, lhi = rng
            return (f"{name} intrinsic dimension runs from {num(lo, 3)} (layer {llo}) to "
                    f"{num(hi, 3)} (layer {lhi}) in a {hidden_size}-dimensional space: the hidden "
                    "states lie near a set of far lower dimension than the model width.")
    return None


def sink_sentence(sinks) -> str:
    """How many positions were left out of per-layer δ and ID, and why."""
    if sinks.n_excluded == 0:
        return (f"No attention-sink position was found among {num(sinks.n_positions)} positions "
                f"(threshold: norm above {sinks.factor:g} × the layer median); nothing was "
                "left out.")
    layers_hit = sum(1 for n in sinks.excluded_by_layer if n > 0)
    where = ""
    if sinks.positions_in_sequence:
        pos = ", ".join(str(p) for p in sinks.positions_in_sequence[:10])
        where = f" They sit at sequence position{'s' if len(sinks.positions_in_sequence) > 1 else ''} {pos}."
    return (f"Up to {num(sinks.n_excluded)} of {num(sinks.n_positions)} positions per layer "
            f"({layers_hit} of {len(sinks.excluded_by_layer)} layers affected) were left out of "
            f"per-layer δ and intrinsic dimension as attention sinks.{where}")
