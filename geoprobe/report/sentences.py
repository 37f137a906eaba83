"""Plain-language readings of the headline numbers, each set against its baseline.

δ-hyperbolicity is read against three nulls (METHODS.md §3b; :class:`geoprobe.profile.DeltaStat`):
a Gaussian with the set's own mean and covariance, a Gaussian with the population's, and real points
resampled from the population. Each null gets its own reading — the mean paired difference data − null
with its bootstrap interval, the share of sets below the null, the p-value (adjusted across layers
where several were tested) and that null's verdict — and every sentence names the null it uses. The
headline is the most conservative verdict: "below" or "above" only when every null agrees
(:attr:`DeltaStat.verdict`, explained by :attr:`DeltaStat.verdict_reason`). Distance concentration
alone gives δ_rel ≈ 0.06–0.26 (METHODS.md §3), so a bare δ_rel says nothing. Frequency and norm
readings compare with the HypLoRA paper (arXiv 2410.04010 §4.1: γ ≈ 1.9 on GSM8K prompts; frequent
tokens near the origin, word-group means rising from function words to specific words).
"""
from __future__ import annotations

from typing import Optional, Sequence

from ..profile import NULL_KINDS, NULL_NAMES, NULL_QUESTIONS
from .markup import finite, interval, num, pvalue, share

PAPER_GAMMA = 1.87
# HypLoRA Table 1 (LLaMA3-8B): function words, question words, categories, specific words.
PAPER_GROUP_ORDER = ("function", "question", "categor", "specific")

NULL_VERDICT = {
    "below": "more tree-like than the {null}",
    "within": "within noise of the {null} (the interval of the difference holds 0)",
    "above": "less tree-like than the {null}",
}
"""One null's verdict in words; ``{null}`` is its name (:data:`geoprobe.profile.NULL_NAMES`)."""

HEADLINE = {
    "below": "more tree-like than every null",
    "within": "no direction claimed",
    "above": "less tree-like than every null",
}
"""The conservative verdict over all nulls in words."""

_COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}


def null_name(kind: str) -> str:
    """The name of null ``kind`` ("own" → "own-covariance Gaussian")."""
    return NULL_NAMES.get(kind, kind)


def null_question(comparison) -> str:
    """The question a :class:`~geoprobe.profile.NullComparison` answers, as a question about the set."""
    q = comparison.question or NULL_QUESTIONS.get(comparison.null, "")
    return f"Is the set {q}" if q else "(no question recorded)"


def conservative_phrase(stat) -> str:
    """'most conservative of three nulls' (the count is the number of nulls in ``stat``)."""
    n = len(stat.nulls)
    if n == 1:
        return f"the only null computed ({null_name(stat.nulls[0].null)})"
    return f"most conservative of {_COUNT_WORDS.get(n, str(n))} nulls"


def headline_badge(stat) -> str:
    """The text of the headline badge: the conservative verdict and the rule behind it."""
    return f"{stat.verdict} · {conservative_phrase(stat)}"


def null_badge(comparison) -> str:
    """The text of one null's badge: its verdict and its name."""
    return f"{comparison.verdict} · {null_name(comparison.null)}"


def how_tested(stat, unit: str) -> str:
    """What was tested and how: '200 prompts, 2,000 bootstrap resamples, 95 % intervals'."""
    parts = [f"{num(stat.n_sets)} {unit}"]
    if stat.n_boot:
        parts.append(f"{num(stat.n_boot)} bootstrap resamples")
        parts.append(f"{100 * stat.level:g} % intervals")
    else:
        parts.append("no bootstrap (too few sets for an interval)")
    if stat.null_repeats > 1:
        parts.append(f"{stat.null_repeats} draws of each null per set")
    return ", ".join(parts)


def _comparable(stat) -> bool:
    return finite(stat.mean) and bool(stat.nulls) and any(finite(c.mean) for c in stat.nulls)


def delta_sentence(stat, subject: str) -> str:
    """The headline reading: δ_rel with its interval, the sets measured, and the conservative
    verdict over the nulls with its reason (each null named)."""
    if not _comparable(stat):
        return f"δ_rel of {subject} could not be compared with its nulls (a value is missing)."
    value = (interval(stat.mean, stat.ci_low, stat.ci_high)
             if finite(stat.ci_low) and finite(stat.ci_high) else num(stat.mean, 3))
    level = f"{100 * stat.level:g} % interval; " if finite(stat.ci_low) and finite(stat.ci_high) else ""
    sets = f"{num(stat.n_sets)} point set{'s' if stat.n_sets != 1 else ''} of about {num(stat.n_points)} points"
    reason = stat.verdict_reason or HEADLINE[stat.verdict]
    return (f"δ_rel of {subject} is {value} ({level}{sets} in {stat.dim} dimensions). "
            f"Verdict, {conservative_phrase(stat)}: {stat.verdict} — {reason}.")


def null_sentence(comparison, unit: str = "sets") -> str:
    """One null's reading: its mean δ_rel, the paired difference, the share of ``unit`` below it,
    the p-value (adjusted when corrected) and its verdict, the null named throughout."""
    c = comparison
    name = null_name(c.null)
    if not finite(c.mean):
        return f"The {name} could not be compared (a value is missing)."
    p = f"p = {pvalue(c.p_value)}" if finite(c.p_value) else "no p-value"
    if finite(c.p_adjusted):
        p += f", adjusted {pvalue(c.p_adjusted)}"
    return (f"Against the {name} ({interval(c.mean, c.ci_low, c.ci_high)}): difference data − null "
            f"{interval(c.diff_mean, c.diff_ci_low, c.diff_ci_high, signed=True)}, "
            f"{share(c.share_below, c.share_ci_low, c.share_ci_high)} of the {unit} below it, {p}: "
            f"{NULL_VERDICT[c.verdict].format(null=name)}.")


def layers_delta_sentence(layers: Sequence) -> Optional[str]:
    """How many layers fall below, within and above each null (after the correction across layers)
    and under the conservative verdict."""
    stats = [lg.delta for lg in layers if lg.delta is not None and finite(lg.delta.mean)]
    if not stats:
        return None

    def counts(verdicts: list[str]) -> str:
        return ", ".join(f"{verdicts.count(v)} {v}" for v in ("below", "within", "above"))

    parts = []
    for kind in NULL_KINDS:
        verdicts = [c.verdict for s in stats for c in s.nulls if c.null == kind]
        if verdicts:
            parts.append(f"against the {null_name(kind)} {counts(verdicts)}")
    corrections = sorted({s.correction for s in stats})
    return (f"Of {len(stats)} layers with δ measured ({'; '.join(corrections)}): "
            + "; ".join(parts) + f". Most conservative of the nulls: {counts([s.verdict for s in stats])}.")


def power_law_sentence(pl) -> str:
    """What γ, x_min and s say, beside the paper's γ ≈ 1.9."""
    if not finite(pl.gamma):
        return "No power law could be fitted to the token frequency distribution."
    text = (f"Above k = {pl.xmin} occurrences, the share of token types seen k times falls as "
            f"k^−{num(pl.gamma, 3)}")
    if finite(pl.error) and pl.error > 0:
        text += f" (± {num(pl.error, 2)})"
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
