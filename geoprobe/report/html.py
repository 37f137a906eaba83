"""One self-contained HTML report from one or more :class:`~geoprobe.profile.GeometryProfile`.

The page holds its CSS inline and its plots as inline SVG; it has no script and makes no request
of any kind (a Content-Security-Policy of ``default-src 'none'`` says so to the browser as well).
Every model-provided string is escaped through :mod:`geoprobe.report.markup`. Sections: summary,
token frequency, embedding norm and frequency, δ-hyperbolicity (each δ beside three nulls with
bootstrap intervals, the headline the most conservative verdict; the attention-sink exclusion),
intrinsic dimension, adapter plan and fine-tune results (only when a profile carries them), and
reproducibility. With several profiles, per-layer curves are overlaid (one colour per model) and the
headline numbers are set side by side.

Methods behind the numbers: HypLoRA (arXiv 2410.04010 §4), Clauset, Shalizi & Newman (2009),
Khrulkov et al. (2020), Facco et al. (2017), Denti et al. (2022), Sun et al. (2024).
"""
from __future__ import annotations

import logging
import os
import re
import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from .. import __version__
from ..errors import OutputError, ProfileError
from ..records import write_text
from ..profile import (NULL_KINDS, NULL_QUESTIONS, DeltaStat, FinetuneResult, GeometryProfile,
                       LayerGeometry, NullComparison)
from . import plots
from . import sentences as say
from .markup import (DASH, Markup, el, esc, finite, interval, join, kv_table, num, pm, pvalue, raw,
                     seconds, share, table, value_text)

logger = logging.getLogger(__name__)

PALETTE = plots.PALETTE

SECTIONS = {
    "summary": "Summary",
    "frequency": "Token frequency",
    "norms": "Embedding norm and frequency",
    "hyperbolicity": "δ-hyperbolicity",
    "intrinsic-dimension": "Intrinsic dimension",
    "adapter-plan": "Adapter plan",
    "finetune": "Fine-tune results",
    "reproducibility": "Reproducibility",
}


@dataclass(frozen=True)
class _Model:
    profile: GeometryProfile
    label: str
    colour: str

    def series(self, value: Any) -> plots.Series:
        return plots.Series(self.label, self.colour, value)


class _Figures:
    """Numbers the figures of one document so their SVG ids never clash."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, svg: Optional[str], caption: str, alt: str, *,
                 wide: bool = False) -> Optional[Markup]:
        if svg is None:
            return None
        self.count += 1
        body = plots.prefix_ids(svg, f"f{self.count}-")
        body = body.replace("<svg", f'<svg role="img" aria-label="{esc(alt)}"', 1)
        return el("figure", raw(body), el("figcaption", caption),
                  class_="plot wide" if wide else "plot", id=f"figure-{self.count}")


# --------------------------------------------------------------------------- public API
def render_html(profiles: Sequence[GeometryProfile] | GeometryProfile, *, title: Optional[str] = None,
                command: Optional[str] = None) -> str:
    """The report for ``profiles`` as one HTML document (a string).

    ``title`` defaults to "Geometry of <model>" (or "<A> vs <B>"); ``command`` is the command line
    that made the report, shown under Reproducibility. Raises :class:`ProfileError` when
    ``profiles`` is empty or holds something other than a ``GeometryProfile``.
    """
    models = _models(profiles)
    figs = _Figures()
    if title is None:
        title = "Geometry of " + " vs ".join(m.label for m in models)
    sections: list[tuple[str, Markup]] = []
    builders = [
        ("summary", lambda: _summary(models)),
        ("frequency", lambda: _frequency(models, figs)),
        ("norms", lambda: _norms(models, figs)),
        ("hyperbolicity", lambda: _hyperbolicity(models, figs)),
        ("intrinsic-dimension", lambda: _intrinsic(models, figs)),
        ("adapter-plan", lambda: _adapter_plan(models, figs)),
        ("finetune", lambda: _finetune(models, figs)),
        ("reproducibility", lambda: _reproducibility(models, command)),
    ]
    for key, build in builders:
        content = build()
        if content is not None:
            sections.append((key, el("section", el("h2", SECTIONS[key]), content,
                                     id=key, class_="report-section")))
    toc = el("ol", [el("li", el("a", SECTIONS[k], href=f"#{k}")) for k, _ in sections])
    corpora = sorted({m.profile.corpus.name for m in models})
    subtitle = join([
        "Corpus: ", ", ".join(corpora), " · ",
        f"{len(models)} model{'s' if len(models) > 1 else ''} · geoprobe {__version__}"])
    footer = join([f"Written by geoprobe {__version__}. Self-contained: styles and figures are "
                   "inline; the page loads nothing."])
    template = string.Template(_template("report.html"))
    return template.substitute(
        title=esc(title), subtitle=subtitle, generator=esc(f"geoprobe {__version__}"),
        css=raw(_template("report.css")), toc=toc,
        body=Markup("\n").join(s for _, s in sections), footer=footer)


def render_report(profiles: Sequence[GeometryProfile] | GeometryProfile, path: str | os.PathLike, *,
                  title: Optional[str] = None, command: Optional[str] = None) -> Path:
    """Render ``profiles`` (see :func:`render_html`) and write the HTML to ``path`` atomically.

    Raises :class:`OutputError` when ``path`` cannot be written (a folder, a parent that is a file,
    no permission); nothing is left behind in that case.
    """
    target = Path(path)
    if target.is_dir():
        raise OutputError(f"cannot write the report to {target}: it is a folder; give a file name "
                          "such as report.html")
    text = render_html(profiles, title=title, command=command)
    try:
        write_text(target, text)
    except OutputError:
        raise
    except OSError as exc:
        raise OutputError(f"cannot write the report to {target}: {exc.strerror or exc}; choose "
                          "a writable path") from None
    logger.info("report written to %s (%d bytes)", target, len(text.encode("utf-8")))
    return target


def default_report_path(profiles: Sequence[GeometryProfile] | GeometryProfile,
                        folder: str | os.PathLike = "reports") -> Path:
    """``reports/<model-slug>.html``; for several models ``reports/<slugA>-vs-<slugB>.html``."""
    models = _as_list(profiles)
    slugs: list[str] = []
    for p in models:
        slug = model_slug(p.model.name)
        slugs.append(slug)
    unique = list(dict.fromkeys(slugs))
    if len(unique) < len(slugs):            # same model on several corpora
        unique = [f"{s}-{model_slug(p.corpus.name, 24)}" for s, p in zip(slugs, models)]
        unique = list(dict.fromkeys(unique))
    name = "-vs-".join(unique)
    if len(name) > 150:
        name = name[:150].rstrip("-")
    return Path(folder) / f"{name}.html"


_GENERIC_PARTS = {"model", "models", "weights", "checkpoint", "checkpoints", "snapshots", "main",
                  "hf", "transformers", "pytorch", "safetensors", "gguf", "final", "latest"}


def model_slug(name: str, limit: int = 60) -> str:
    """Lower-case file-name slug of a model name: its last meaningful path part (generic folder
    names such as ``model`` or a commit hash skipped), file extension dropped."""
    parts = [p for p in re.split(r"[/\\]", str(name).strip()) if p.strip(". ")]
    parts = [re.sub(r"\.(gguf|safetensors|bin|pt|pth|onnx)$", "", p, flags=re.I) for p in parts]
    named = [p for p in parts if p.lower() not in _GENERIC_PARTS
             and not re.fullmatch(r"[0-9a-f]{40}", p.lower())]
    text = (named or parts or [""])[-1]
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:limit].rstrip("-") or "model"


# --------------------------------------------------------------------------- input checks
def _as_list(profiles: Any) -> list[GeometryProfile]:
    if isinstance(profiles, GeometryProfile):
        return [profiles]
    if isinstance(profiles, (str, bytes, os.PathLike)) or not isinstance(profiles, Iterable):
        raise ProfileError(f"a report needs GeometryProfile objects, got {type(profiles).__name__}; "
                           "load saved profiles with GeometryProfile.load(path)")
    items = list(profiles)
    if not items:
        raise ProfileError("a report needs at least one GeometryProfile; none was given")
    for i, p in enumerate(items):
        if not isinstance(p, GeometryProfile):
            raise ProfileError(f"item {i} of the report's profiles is a {type(p).__name__}, not a "
                               "GeometryProfile; load saved profiles with GeometryProfile.load(path)")
    return items


def _models(profiles: Any) -> list[_Model]:
    items = _as_list(profiles)
    labels = [p.model.name or "unnamed model" for p in items]
    if len(set(labels)) < len(labels):
        labels = [f"{lab} · {p.corpus.name}" for lab, p in zip(labels, items)]
    if len(set(labels)) < len(labels):
        labels = [f"{lab} #{i + 1}" for i, lab in enumerate(labels)]
    return [_Model(p, lab, PALETTE[i % len(PALETTE)]) for i, (p, lab) in enumerate(zip(items, labels))]


def _template(name: str) -> str:
    return resources.files("geoprobe.report").joinpath("templates", name).read_text(encoding="utf-8")


# --------------------------------------------------------------------------- small pieces
def _swatch(m: _Model) -> Markup:
    return el("span", "", class_="swatch", style=f"background:{m.colour}", aria_hidden="true")


def _model_name(m: _Model) -> Markup:
    return el("span", _swatch(m), el("span", m.label, class_="model-name"))


def _note(*text: Any) -> Markup:
    return el("p", *text, class_="note")


def _reading(text: Optional[str]) -> Optional[Markup]:
    return el("p", text, class_="reading") if text else None


def _badge(stat: Optional[DeltaStat]) -> Optional[Markup]:
    """The headline badge: the most conservative verdict over the nulls."""
    if stat is None or not finite(stat.mean) or not stat.nulls:
        return None
    return el("span", say.headline_badge(stat), class_=f"badge {stat.verdict}",
              title=stat.verdict_reason or say.HEADLINE[stat.verdict])


def _null_badge(c: NullComparison) -> Optional[Markup]:
    """One null's badge: its verdict and its name."""
    if not finite(c.mean):
        return None
    return el("span", say.null_badge(c), class_=f"badge {c.verdict}",
              title=say.NULL_VERDICT[c.verdict].format(null=say.null_name(c.null)))


def _block(m: _Model, multi: bool, *content: Any) -> Markup:
    """A per-model block, headed by the model's name when the report compares several."""
    head = el("h3", _model_name(m)) if multi else None
    return el("div", head, *content, class_="model-block")


def _figures(*figs: Optional[Markup]) -> Optional[Markup]:
    present = [f for f in figs if f is not None]
    return el("div", present, class_="figures") if present else None


def _tokens(tokens: Sequence[str]) -> Markup:
    return join([el("code", t, class_="tok") for t in tokens]) if tokens else Markup(DASH)


def _id_text(r) -> str:
    """An estimate with its bootstrap interval, or ± its standard error without one."""
    if r is None:
        return DASH
    if r.ci_low is not None and r.ci_high is not None:
        return interval(r.dimension, r.ci_low, r.ci_high)
    return pm(r.dimension, r.error)


def _gride_scale(layers: Sequence[LayerGeometry]) -> Optional[tuple[int, str]]:
    """The GRIDE scale n1 shared by the layers and the rule's reason (None without GRIDE)."""
    g = next((lg.gride for lg in layers if lg.gride is not None and lg.gride.scale_n1), None)
    return (int(g.scale_n1), g.scale_rule) if g is not None else None


def _delta_cell(stat: Optional[DeltaStat]) -> Markup:
    """δ_rel with its interval and the headline badge."""
    if stat is None:
        return Markup(DASH)
    return join([interval(stat.mean, stat.ci_low, stat.ci_high), " ", _badge(stat)])


def _diff_cell(stat: Optional[DeltaStat], kind: str) -> Markup:
    """The paired difference data − null ``kind`` with its interval and that null's badge."""
    c = stat.null(kind) if stat is not None else None
    if c is None:
        return Markup(DASH)
    return join([interval(c.diff_mean, c.diff_ci_low, c.diff_ci_high, signed=True), " ",
                 _null_badge(c)])


# --------------------------------------------------------------------------- summary
def _tile(label: str, value: Any, small: Any, text: Optional[str], badge: Any = None) -> Markup:
    return el("div",
              el("div", label, class_="label"),
              el("div", value, class_="value"),
              el("div", small, " " if badge is not None else None, badge, class_="sub"),
              el("p", text) if text else None,
              class_="tile")


def _id_range_text(layers: Sequence[LayerGeometry], attr: str) -> str:
    rng = say.id_range(layers, attr)
    if rng is None:
        return DASH
    return f"{num(rng[0], 3)} – {num(rng[2], 3)}"


def _model_line(p: GeometryProfile) -> Markup:
    mi, c = p.model, p.corpus
    bits = [mi.architecture or mi.model_type,
            f"{num(mi.n_parameters / 1e6, 4)} M parameters" if mi.n_parameters else None,
            f"hidden size {mi.hidden_size}", f"{mi.n_layers} layers", f"vocabulary {num(mi.vocab_size)}",
            mi.dtype or None, "encoder" if mi.is_encoder else None]
    text = " · ".join(b for b in bits if b)
    corpus = (f"Corpus {c.name}: {num(c.n_documents)} documents, {num(c.n_tokens)} tokens"
              + (f" (field {c.field})" if c.field else ""))
    return el("p", text, el("br"), corpus, class_="subtitle")


def _summary_tiles(m: _Model) -> Markup:
    p = m.profile
    tiles = []
    pl = p.frequency
    if pl is not None:
        tiles.append(_tile("Power-law exponent γ", num(pl.gamma, 3),
                           f"± {num(pl.error, 2)} · x_min {pl.xmin}",
                           f"Above {pl.xmin} occurrences the share of token types seen k times falls "
                           f"as k^−{num(pl.gamma, 3)} (the paper reports ≈ {say.PAPER_GAMMA:g} on "
                           "GSM8K prompts)."))
        tiles.append(_tile("Zipf exponent s", num(pl.zipf_exponent, 3), "s = 1/(γ − 1)",
                           f"The r-th most frequent token occurs about r^−{num(pl.zipf_exponent, 3)} "
                           "times as often as the most frequent one; s = 1 is Zipf's law."))
    else:
        tiles.append(_tile("Power-law exponent γ", DASH, "not measured",
                           "This profile holds no token-frequency fit."))
    if p.norms is not None:
        tiles.append(_tile("Spearman ρ, norm vs log-frequency", num(p.norms.spearman_rho, 2),
                           f"{num(p.norms.n_tokens_seen)} tokens", say.spearman_sentence(p.norms)))
    else:
        tiles.append(_tile("Spearman ρ, norm vs log-frequency", DASH, "not measured",
                           "This profile holds no norm measurement."))
    for stat, name, subject, unit in (
            (p.delta_prompts, "δ_rel per prompt", "each prompt's input-token embeddings", "prompts"),
            (p.delta_tokens, "δ_rel of a token sample", "samples of distinct corpus tokens' "
             "embeddings", "token sets")):
        if stat is None:
            tiles.append(_tile(name, DASH, "not measured", "This profile holds no such δ."))
        else:
            tiles.append(_tile(name, interval(stat.mean, stat.ci_low, stat.ci_high),
                               say.how_tested(stat, unit), say.delta_sentence(stat, subject),
                               _badge(stat)))
    if not p.layers:
        return join([el("div", tiles, class_="tiles"), _note(EMBEDDINGS_ONLY)])
    id_text = say.id_sentence(p.layers, p.model.hidden_size)
    scale = _gride_scale(p.layers)
    tiles.append(_tile("Intrinsic dimension over layers", _id_range_text(p.layers, "twonn"),
                       f"TwoNN (line fit) · GRIDE{f' at n1 = {scale[0]}' if scale else ''} "
                       f"{_id_range_text(p.layers, 'gride')}",
                       id_text or "No layer was measured."))
    return el("div", tiles, class_="tiles")


EMBEDDINGS_ONLY = ("No hidden states were read for this profile (input embeddings only, as with "
                   "--embeddings-only): per-layer δ, intrinsic dimension and attention sinks are not part of it.")


def _with_layers(models: list[_Model]) -> bool:
    """Whether any profile holds per-layer results (the hidden-state sections are left out otherwise)."""
    return any(m.profile.layers for m in models)


_HEADLINES = (
    ("Parameters", lambda p: num(p.model.n_parameters)),
    ("Hidden size · layers", lambda p: f"{p.model.hidden_size} · {p.model.n_layers}"),
    ("Corpus tokens", lambda p: num(p.corpus.n_tokens)),
    ("γ (frequency power law)", lambda p: pm(p.frequency.gamma, p.frequency.error)
     if p.frequency else DASH),
    ("x_min", lambda p: str(p.frequency.xmin) if p.frequency else DASH),
    ("Zipf s", lambda p: num(p.frequency.zipf_exponent, 3) if p.frequency else DASH),
    ("Spearman ρ, norm vs log-frequency", lambda p: num(p.norms.spearman_rho, 2) if p.norms else DASH),
    ("δ_rel per prompt [interval]", lambda p: _delta_cell(p.delta_prompts)),
    *((f"per prompt: δ_rel − {say.null_name(k)}", lambda p, k=k: _diff_cell(p.delta_prompts, k))
      for k in NULL_KINDS),
    ("δ_rel token sample [interval]", lambda p: _delta_cell(p.delta_tokens)),
    *((f"token sample: δ_rel − {say.null_name(k)}", lambda p, k=k: _diff_cell(p.delta_tokens, k))
      for k in NULL_KINDS),
    ("TwoNN ID range over layers", lambda p: _id_range_text(p.layers, "twonn")),
    ("GRIDE ID range over layers", lambda p: _id_range_text(p.layers, "gride")),
    ("Sink positions excluded", lambda p: f"{num(p.sinks.n_excluded)} of {num(p.sinks.n_positions)}"
     if p.sinks else DASH),
)


_LAYER_HEADLINES = frozenset({"TwoNN ID range over layers", "GRIDE ID range over layers", "Sink positions excluded"})


def _summary(models: list[_Model]) -> Markup:
    if len(models) == 1:
        m = models[0]
        return join([_model_line(m.profile), _summary_tiles(m)])
    header = [""] + [_model_name(m) for m in models]
    layered = _with_layers(models)
    rows = [[name] + [fn(m.profile) for m in models] for name, fn in _HEADLINES
            if layered or name not in _LAYER_HEADLINES]
    compare = el("div", el("table", el("thead", el("tr", [el("th", h, scope="col") for h in header])),
                           el("tbody", [el("tr", el("th", r[0], scope="row"),
                                           [el("td", c) for c in r[1:]]) for r in rows]),
                           class_="compare"), class_="table-wrap")
    readings = []
    for m in models:
        p = m.profile
        items = [say.power_law_sentence(p.frequency) if p.frequency else "No token-frequency fit.",
                 say.spearman_sentence(p.norms) if p.norms else "No norm measurement.",
                 say.delta_sentence(p.delta_prompts, "each prompt's input-token embeddings")
                 if p.delta_prompts else "No per-prompt δ.",
                 say.delta_sentence(p.delta_tokens, "samples of distinct corpus tokens' embeddings")
                 if p.delta_tokens else "No token-sample δ.",
                 (say.id_sentence(p.layers, p.model.hidden_size) or "No layer was measured.")
                 if p.layers else EMBEDDINGS_ONLY]
        readings.append(el("div", el("h4", _model_name(m)), _model_line(p),
                           el("ul", [el("li", t) for t in items], class_="readings"),
                           class_="model-block"))
    return join([compare, readings])


# --------------------------------------------------------------------------- frequency
def _frequency(models: list[_Model], figs: _Figures) -> Markup:
    have = [m for m in models if m.profile.frequency is not None]
    parts: list[Any] = [el("p", "How often each token type occurs in the corpus. HypLoRA fits a "
                                "power law to the frequency distribution P(k) ∝ k^−γ (how many "
                                "types occur k times; Clauset, Shalizi & Newman 2009); the "
                                "rank-frequency (Zipf) exponent s follows as s = 1/(γ − 1).")]
    for m in models:
        if m.profile.frequency is None:
            parts.append(_note(_model_name(m) if len(models) > 1 else None,
                               " " if len(models) > 1 else None,
                               "No token-frequency fit in this profile (the fit failed or was not "
                               "run), so this part is left out."))
    if not have:
        return join(parts)
    series = [m.series(m.profile.frequency) for m in have]
    parts.append(_figures(
        figs(plots.frequency_distribution(series),
             "Frequency distribution: share of token types seen k times (faint dots), log-binned "
             "(circles), fitted discrete power law above x_min (line; dotted: x_min).",
             "log-log frequency distribution with the fitted power law"),
        figs(plots.rank_frequency(series),
             "Rank-frequency: occurrences of the r-th most frequent token type; dashed: the Zipf "
             "line f(r) = x_min·(r/n_tail)^−s implied by γ.",
             "rank-frequency plot")))
    if any(not m.profile.frequency.count_values for m in have):
        parts.append(_note("Profiles without a frequency-of-frequency table are missing from the "
                           "plots; their fitted numbers are in the table."))
    header = (["Model"] if len(have) > 1 else []) + [
        "γ", "x_min", "Zipf s", "KS distance", "types", "tokens", "tail types", "lognormal", "fit time"]
    rows = []
    for m in have:
        pl = m.profile.frequency
        if pl.lognormal_converged and finite(pl.lognormal_loglikelihood_ratio):
            logn = f"R = {num(pl.lognormal_loglikelihood_ratio, 3)}, p = {pvalue(pl.lognormal_p)}"
        else:
            logn = "fit did not converge"
        row = [pm(pl.gamma, pl.error), str(pl.xmin), num(pl.zipf_exponent, 3),
               num(pl.ks_distance, 3), num(pl.n_types), num(pl.n_tokens), num(pl.n_tail_types),
               logn, seconds(pl.seconds)]
        rows.append(([_model_name(m)] if len(have) > 1 else []) + row)
    off = 1 if len(have) > 1 else 0
    parts.append(table(header, rows, numeric={off + i for i in (0, 1, 2, 3, 4, 5, 6)}))
    for m in have:
        pl = m.profile.frequency
        lead = [el("strong", _model_name(m)), ": "] if len(have) > 1 else []
        parts.append(el("p", lead, say.power_law_sentence(pl), " ",
                        say.lognormal_sentence(pl) or "", class_="reading"))
    return join(parts)


# --------------------------------------------------------------------------- norms
def _norms(models: list[_Model], figs: _Figures) -> Markup:
    multi = len(models) > 1
    parts: list[Any] = [el("p", "L2 norm of each token's input embedding against how often the "
                                "token occurs. HypLoRA (§4.1, Table 1) claims frequent, abstract "
                                "tokens sit near the origin; Spearman ρ over all tokens seen tests "
                                "that claim directly, and the paper's four word groups are shown "
                                "beside its LLaMA3-8B means (a different model, so compare the "
                                "order, not the values).")]
    for m in models:
        nf = m.profile.norms
        if nf is None:
            parts.append(_block(m, multi, _note("No norm measurement in this profile, so this part "
                                                "is left out.")))
            continue
        content: list[Any] = [_reading(say.spearman_sentence(nf))]
        unseen = (f"; tokens never seen in the corpus: {num(nf.mean_norm_unseen, 3)}"
                  if finite(nf.mean_norm_unseen) else "")
        content.append(el("p", f"Mean norm of the {num(nf.n_tokens_seen)} tokens seen: "
                               f"{num(nf.mean_norm_seen, 3)}{unseen}."))
        fig = figs(plots.norm_density(nf, m.colour),
                   "Embedding norm against log10 frequency: token counts per cell (colour, log "
                   "scale) and the mean norm of each frequency bin (circles).",
                   "density of embedding norm against log frequency")
        if fig is None:
            content.append(_note("Neither a density grid nor frequency bins were recorded; no plot."))
        elif nf.density is None:
            content.append(_note("No density grid was recorded; the plot shows the bin means "
                                 "(bars: min to max)."))
        content.append(_figures(fig))
        content.append(_groups(nf))
        if nf.bins:
            rows = [[f"[{num(b.lo, 3)}, {num(b.hi, 3)})", num(b.n), num(b.mean, 3), num(b.min, 3),
                     num(b.max, 3)] for b in nf.bins]
            content.append(el("details", el("summary", f"Norm by log10-frequency bin "
                                                       f"({len(nf.bins)} bins)"),
                              table(["log10 frequency", "tokens", "mean norm", "min", "max"], rows,
                                    numeric={1, 2, 3, 4}), open=not multi))
        parts.append(_block(m, multi, content))
    return join(parts)


def _groups(nf) -> Optional[Markup]:
    if not nf.groups:
        return _note("No word groups were recorded.")
    order = say.groups_order_sentence(nf.groups)
    summary = table(["Word group", "mean norm (this model)", "paper mean (LLaMA3-8B)", "words"],
                    [[g.name, num(g.mean_norm, 3), num(g.paper_mean_norm, 3), str(len(g.words))]
                     for g in nf.groups], numeric={1, 2, 3})
    body = []
    for g in nf.groups:
        for i, w in enumerate(g.words):
            group_cell = (el("th", g.name, scope="rowgroup", rowspan=str(len(g.words)))
                          if i == 0 else None)
            body.append(el("tr", group_cell, el("td", w.word, class_="mono"),
                           el("td", _tokens(w.tokens)),
                           el("td", ", ".join(str(t) for t in w.token_ids) or DASH),
                           el("td", num(w.norm, 3), class_="num"), el("td", w.rule)))
    head = el("thead", el("tr", [el("th", h, scope="col", class_="num" if h == "norm" else None)
                                 for h in ("group", "word", "tokens", "token ids", "norm",
                                           "tokenization rule")]))
    words = el("details", el("summary", "Each word: its tokens and how its norm was taken"),
               el("div", el("table", head, el("tbody", body), class_="data words"),
                  class_="table-wrap"))
    return join([_reading(order), summary, words])


# --------------------------------------------------------------------------- hyperbolicity
_DELTA_SUBJECTS = (
    ("delta_prompts", "Per prompt: input-token embeddings", "each prompt's input-token embeddings",
     "prompts"),
    ("delta_tokens", "Token sample: distinct corpus tokens",
     "samples of distinct corpus tokens' embeddings", "token sets"))


def _hyperbolicity(models: list[_Model], figs: _Figures) -> Markup:
    parts: list[Any] = [
        el("p", "Gromov δ of the Euclidean point cloud, relative to its diameter: δ_rel = 2δ/diam, "
                "0 for a tree metric (Khrulkov et al. 2020). Distance concentration alone makes "
                "random high-dimensional points look hyperbolic, so every set's δ_rel stands beside "
                "three nulls with the set's number of points, dimension and base point, each "
                "answering its own question:"),
        el("ul", [el("li", el("strong", say.null_name(k)), ": is the set ", NULL_QUESTIONS[k])
                  for k in NULL_KINDS], class_="readings"),
        el("p", "For each null the report gives the paired difference data − null averaged over "
                "the sets, the share of sets below their null, and percentile-bootstrap intervals "
                "of both (sets resampled; for hidden states one set per document, so whole "
                "documents are resampled). A null's verdict is below or above when its bootstrap "
                "p-value is under 1 − the interval level — after Holm's or Benjamini–Hochberg's "
                "correction across layers for the per-layer tests — and within otherwise. The "
                "headline verdict is the most conservative of the nulls: a direction only when "
                "every null agrees.")]
    for key, heading, subject, unit in _DELTA_SUBJECTS:
        parts.append(el("h3", heading))
        parts.extend(_delta_embeddings(models, figs, key, subject, unit))
    if not _with_layers(models):
        return join(parts)
    parts.append(el("h3", "Per layer: hidden states"))
    parts.extend(_delta_layers(models, figs))
    parts.append(el("h3", "Attention sinks left out"))
    parts.append(el("p", "Positions with massive activations (Sun et al. 2024) have hidden-state "
                         "norms orders of magnitude above the rest; a handful of them set the "
                         "diameter and collapse δ_rel of data and null alike, so they are left "
                         "out of per-layer δ and intrinsic dimension."))
    multi = len(models) > 1
    for m in models:
        parts.append(_block(m, multi, _sinks(m, figs)))
    return join(parts)


def _null_table(stat: DeltaStat, unit: str) -> Markup:
    """One row per null: its question, mean δ_rel, the paired difference, the share of ``unit``
    below it (each with its interval), the p-values and its verdict."""
    adjusted = any(finite(c.p_adjusted) for c in stat.nulls)
    header = ["null: the question it answers", "null δ_rel [interval]", "data − null [interval]",
              f"{unit} below the null [interval]", "p"] + (["p adjusted"] if adjusted else []) + [
              "verdict"]
    rows = []
    for c in stat.nulls:
        row = [join([el("strong", say.null_name(c.null)), ": ", say.null_question(c)]),
               interval(c.mean, c.ci_low, c.ci_high),
               interval(c.diff_mean, c.diff_ci_low, c.diff_ci_high, signed=True),
               share(c.share_below, c.share_ci_low, c.share_ci_high), pvalue(c.p_value)]
        rows.append(row + ([pvalue(c.p_adjusted)] if adjusted else []) + [_null_badge(c)])
    caption = (f"δ_rel of the data: {interval(stat.mean, stat.ci_low, stat.ci_high)} "
               f"(std {num(stat.std, 2)}) over {say.how_tested(stat, unit)}; {stat.correction}.")
    return table(header, rows, caption=caption, cls="data nulls",
                 numeric={1, 2, 3, 4} | ({5} if adjusted else set()))


def _delta_embeddings(models: list[_Model], figs: _Figures, key: str, subject: str,
                      unit: str) -> list[Any]:
    """Each model's headline reading, its table of the three nulls, one reading per null and the
    histogram of the per-set δ_rel (``key`` of the profile)."""
    multi = len(models) > 1
    parts: list[Any] = []
    row_figs = []
    for m in models:
        stat = getattr(m.profile, key)
        lead = [el("strong", _model_name(m)), ": "] if multi else []
        if stat is None:
            parts.append(_note(*lead, "not measured in this profile; left out."))
            continue
        parts.append(el("p", lead, say.delta_sentence(stat, subject), " ", _badge(stat),
                        class_="reading"))
        if stat.nulls:
            parts.append(_null_table(stat, unit))
            parts.append(el("ul", [el("li", say.null_sentence(c, unit)) for c in stat.nulls],
                            class_="readings"))
        fig = figs(plots.delta_histogram(stat, m.colour),
                   (f"{m.label}: " if multi else "") + f"δ_rel of {subject}: "
                   + plots.delta_histogram_caption(stat, unit) + ".",
                   f"histogram of delta_rel against its nulls for {m.label}")
        if fig is None:
            parts.append(_note(*lead, "the per-set values were not recorded (or fewer than "
                                      "two); no histogram."))
        row_figs.append(fig)
    parts.append(_figures(*row_figs))
    return parts


def _layer_nulls(layers: Sequence[LayerGeometry]) -> list[str]:
    """The null kinds any layer's δ was compared with, in the order of :data:`NULL_KINDS`."""
    have = {c.null for lg in layers if lg.delta is not None for c in lg.delta.nulls}
    return [k for k in NULL_KINDS if k in have]


def _layer_table(m: _Model) -> Markup:
    """Per layer: documents, points, δ_rel [interval], each null's difference [interval] and
    verdict after the correction, and the conservative verdict."""
    layers = [lg for lg in m.profile.layers if lg.delta is not None]
    kinds = _layer_nulls(layers)
    header = ["layer", "documents", "points per document", "δ_rel [interval]"]
    for k in kinds:
        header += [f"data − {say.null_name(k)} [interval]", f"{say.null_name(k)}: verdict (p adjusted)"]
    header.append("every null")
    rows = []
    for lg in layers:
        d = lg.delta
        row: list[Any] = [str(lg.layer), num(d.n_sets), num(d.n_points),
                          interval(d.mean, d.ci_low, d.ci_high)]
        for k in kinds:
            c = d.null(k)
            if c is None:
                row += [DASH, DASH]
                continue
            p = c.p_adjusted if finite(c.p_adjusted) else c.p_value
            row += [interval(c.diff_mean, c.diff_ci_low, c.diff_ci_high, signed=True),
                    join([_null_badge(c), f" ({pvalue(p)})"])]
        rows.append(row + [_badge(d)])
    corrections = "; ".join(sorted({lg.delta.correction for lg in layers}))
    levels = sorted({lg.delta.level for lg in layers})
    caption = (f"Intervals: {', '.join(f'{100 * v:g} %' for v in levels)} percentile bootstrap over the "
               f"layer's documents. Verdicts and adjusted p-values after {corrections}; "
               "“every null” is the most conservative of the nulls.")
    return table(header, rows, caption=caption, cls="data layer-delta",
                 numeric={0, 1, 2, 3} | {4 + 2 * i for i in range(len(kinds))})


def _delta_layers(models: list[_Model], figs: _Figures) -> list[Any]:
    """The per-layer δ_rel figure, one reading per model and the per-layer tables."""
    multi = len(models) > 1
    with_layers = [m for m in models if any(lg.delta is not None for lg in m.profile.layers)]
    if not with_layers:
        return [_note("No per-layer δ in these profiles; left out.")]
    series = [m.series(m.profile.layers) for m in with_layers]
    relative, _ = plots.layer_axis(series)
    parts: list[Any] = [_figures(figs(
        plots.delta_per_layer(series),
        plots.delta_per_layer_caption(series)
        + (" The models differ in depth, so layers are placed on a 0–1 relative depth axis."
           if relative else ""),
        "delta_rel per layer against its nulls", wide=True))]
    for m in models:
        lead = [el("strong", _model_name(m)), ": "] if multi else []
        text = say.layers_delta_sentence(m.profile.layers)
        parts.append(el("p", lead, text or "no per-layer δ in this profile.", class_="reading"))
    for m in with_layers:
        parts.append(el("details", el("summary", "Per-layer δ_rel table: each null's difference "
                                                 "and verdict", f" — {m.label}" if multi else ""),
                        _layer_table(m)))
    return parts


def _sinks(m: _Model, figs: _Figures) -> Markup:
    p = m.profile
    s = p.sinks
    if s is None:
        if not p.layers:
            return _note("No hidden states were measured; nothing to exclude.")
        return _note("This profile records no attention-sink check; per-layer numbers include "
                     "every position.")
    content: list[Any] = [_reading(say.sink_sentence(s)),
                          el("p", "Rule recorded with the profile: ", el("em", s.reason))]
    content.append(_figures(figs(
        plots.sink_norms(p.layers, s, m.colour),
        "Hidden-state norm quantiles per layer (log scale) and the sink threshold "
        f"({s.factor:g} × the layer median) — the distribution that justified the exclusion.",
        f"hidden-state norm quantiles per layer for {m.label}", wide=True)))
    q = s.norm_quantiles_by_layer
    width = len(q[0]) if q else 0
    if width == len(plots.SINK_QUANTILE_LEVELS):
        qnames = [{0.0: "min", 0.5: "median", 1.0: "max"}.get(lv, f"q{lv:g}")
                  for lv in plots.SINK_QUANTILE_LEVELS]
    else:
        qnames = [f"quantile {j + 1}" for j in range(width)]
    rows = []
    n = max(len(p.layers), len(q), len(s.excluded_by_layer))
    for i in range(n):
        lg = p.layers[i] if i < len(p.layers) else None
        excl = s.excluded_by_layer[i] if i < len(s.excluded_by_layer) else None
        quant = q[i] if i < len(q) else []
        rows.append([str(lg.layer) if lg else str(i), num(lg.n_positions) if lg else DASH,
                     num(excl) if excl is not None else DASH]
                    + [num(v, 3) for v in quant] + [DASH] * (width - len(quant)))
    content.append(el("details", el("summary", "Per-layer norm quantiles and exclusions"),
                      table(["layer", "positions kept", "excluded"] + qnames, rows,
                            numeric=set(range(3 + width)))))
    return join(content)


# --------------------------------------------------------------------------- intrinsic dimension
def _intrinsic(models: list[_Model], figs: _Figures) -> Optional[Markup]:
    if not _with_layers(models):
        return None
    multi = len(models) > 1
    parts: list[Any] = [el("p", "Intrinsic dimension of each layer's hidden states (attention-sink "
                                "positions and duplicate rows removed). TwoNN uses the ratio of the "
                                "second to the first neighbour distance (Facco et al. 2017); its "
                                "headline is the paper's line fit with the largest 10 % of ratios "
                                "discarded, as scikit-dimension and DADApy report it, with the "
                                "maximum-likelihood estimate beside it in the table. GRIDE "
                                "generalises it to neighbours n1 and n2 = 2·n1, which probes larger "
                                "scales and is less sensitive to noise (Denti et al. 2022); every "
                                "layer is read at one scale n1 shared by the model's layers. "
                                "Intervals come from a block bootstrap over documents (positions of "
                                "one document are not independent).")]
    with_id = [m for m in models if any(lg.twonn or lg.gride for lg in m.profile.layers)]
    if not with_id:
        parts.append(_note("No intrinsic dimension in these profiles; left out."))
        return join(parts)
    relative, _ = plots.layer_axis([m.series(m.profile.layers) for m in with_id])
    parts.append(_figures(figs(
        plots.id_per_layer([m.series(m.profile.layers) for m in with_id]),
        "TwoNN line fit (solid, circles) and GRIDE at the shared scale"
        + _scale_words(with_id) + " (dashed, squares) per layer; "
        + plots.id_bars_text([lg.twonn for m in with_id for lg in m.profile.layers]) + "."
        + (" Layers on a 0–1 relative depth axis (the models differ in depth)." if relative else ""),
        "intrinsic dimension per layer", wide=True)))
    for m in models:
        p = m.profile
        lead = [el("strong", _model_name(m)), ": "] if multi else []
        text = say.id_sentence(p.layers, p.model.hidden_size)
        parts.append(el("p", lead, text or "no intrinsic dimension in this profile.",
                        class_="reading"))
    scale_figs = []
    for m in with_id:
        chosen = plots.pick_layers(m.profile.layers)
        scale_figs.append(figs(
            plots.gride_scales(m.profile.layers),
            (f"{m.label}: " if multi else "") + "GRIDE dimension across neighbourhood scales for "
            "layers " + ", ".join(str(lg.layer) for lg in chosen) + " (a flat curve means a "
            "dimension that does not depend on scale; bars: ± one standard error"
            + (", the bootstrap's at the shared scale" if any(
                lg.gride.ci_low is not None for lg in chosen) else "") + ")."
            + (f" Dotted: the scale n1 = {_gride_scale(m.profile.layers)[0]} shared by all layers — "
               f"{_gride_scale(m.profile.layers)[1]}." if _gride_scale(m.profile.layers) else ""),
            f"GRIDE dimension across scales for {m.label}"))
    if any(f is not None for f in scale_figs):
        parts.append(el("h3", "GRIDE across scales"))
        parts.append(_figures(*scale_figs))
    else:
        parts.append(_note("No GRIDE scales were recorded; no multiscale plot."))
    for m in with_id:
        rows = []
        for lg in m.profile.layers:
            ref = lg.twonn or lg.gride
            rows.append([str(lg.layer), num(lg.n_positions),
                         num(ref.n_groups) if ref and ref.n_groups else DASH,
                         num(ref.n_duplicates_removed) if ref else DASH,
                         _id_text(lg.twonn),
                         num(lg.twonn.mle_dimension, 3) if lg.twonn else DASH,
                         _id_text(lg.gride)])
        scale = _gride_scale(m.profile.layers)
        gride_head = f"GRIDE at n1 = {scale[0]} [interval]" if scale else "GRIDE"
        parts.append(el("details", el("summary", "Per-layer intrinsic dimension table",
                                      f" — {m.label}" if multi else ""),
                        table(["layer", "positions", "documents", "duplicates removed",
                               "TwoNN line fit [interval]", "TwoNN MLE", gride_head], rows,
                              numeric={0, 1, 2, 3, 4, 5, 6})))
    return join(parts)


def _scale_words(models: list[_Model]) -> str:
    """" n1 = k" when every model shares one GRIDE scale k, else " of each model"."""
    scales = {s[0] for m in models if (s := _gride_scale(m.profile.layers)) is not None}
    if len(scales) == 1:
        return f" n1 = {next(iter(scales))}"
    return " of each model" if scales else ""


# --------------------------------------------------------------------------- adapters
def _adapter_plan(models: list[_Model], figs: _Figures) -> Optional[Markup]:
    have = [m for m in models if m.profile.adapter_plan is not None]
    if not have:
        return None
    multi = len(models) > 1
    parts: list[Any] = [el("p", "The adapter plan derived from these measurements (written by "
                                "adapters.plan), as stored in the profile.")]
    for m in have:
        plan = m.profile.adapter_plan
        charts: list[Optional[Markup]] = []
        body = _plan_value(plan.data, m, figs, charts, depth=0)
        parts.append(_block(m, multi, el("p", "Method: ", el("strong", plan.method)), body,
                            _figures(*charts[:4])))
    return join(parts)


def _numeric_items(value: Any) -> Optional[tuple[list[str], list[float]]]:
    if isinstance(value, Mapping) and len(value) >= 2 and all(
            finite(v) for v in value.values()):
        return [str(k) for k in value], [float(v) for v in value.values()]
    if isinstance(value, (list, tuple)) and len(value) >= 3 and all(finite(v) for v in value):
        return [str(i) for i in range(len(value))], [float(v) for v in value]
    return None


def _plan_value(value: Any, m: _Model, figs: _Figures, charts: list, depth: int,
                key: str = "") -> Markup:
    """Render plan data: scalars as text, mappings as key/value tables (nested), lists of records
    as tables, numeric mappings/lists also as a bar chart."""
    numeric = _numeric_items(value)
    if numeric is not None and len(charts) < 4:
        charts.append(figs(plots.value_bars(numeric[0], numeric[1], m.colour, key or "value"),
                           f"{key or 'values'} ({len(numeric[1])} entries)",
                           f"bar chart of {key or 'values'}", wide=True))
    if isinstance(value, Mapping):
        if depth >= 3 or not value:
            return el("code", value_text(value))
        if numeric is not None and len(value) > 12:
            return el("details", el("summary", f"{len(value)} entries"),
                      kv_table([(k, value_text(v)) for k, v in value.items()]))
        return kv_table([(k, _plan_value(v, m, figs, charts, depth + 1, str(k)))
                         for k, v in value.items()])
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, Mapping) for v in value) and depth < 3:
            cols: list[str] = []
            for v in value:
                for k in v:
                    if str(k) not in cols:
                        cols.append(str(k))
            keyed = [{str(k): x for k, x in v.items()} for v in value]
            rows = [[value_text(row[c]) if c in row else DASH for c in cols] for row in keyed]
            return table(cols, rows)
        if value and all(isinstance(v, str) for v in value) and any(" " in v for v in value):
            return el("ul", [el("li", v) for v in value], class_="readings")
        text = value_text(list(value))
        if len(text) > 200:
            return el("details", el("summary", f"{len(value)} items"), el("code", text))
        return el("code", text)
    return Markup(esc(value_text(value)))


def _finetune(models: list[_Model], figs: _Figures) -> Optional[Markup]:
    runs: list[tuple[_Model, FinetuneResult]] = [(m, r) for m in models for r in m.profile.finetune]
    if not runs:
        return None
    multi = len(models) > 1
    metric_names: list[str] = []
    for _, r in runs:
        for k in r.eval_metrics:
            if k not in metric_names:
                metric_names.append(k)
    header = (["Profile"] if multi else []) + ["Method", "Model", "Data", "Seed",
                                               "Trainable parameters", "Final loss", "Time",
                                               "Tokens/s"] + metric_names
    off = 1 if multi else 0
    rows = []
    for m, r in runs:
        final = r.loss_values[-1] if r.loss_values else None
        row = [r.method, r.model, r.data, str(r.seed), num(r.trainable_parameters), num(final, 4),
               seconds(r.seconds), num(r.tokens_per_second, 4)]
        row += [num(r.eval_metrics.get(k), 4) if k in r.eval_metrics else DASH for k in metric_names]
        rows.append(([_model_name(m)] if multi else []) + row)
    parts: list[Any] = [
        el("p", "Fine-tune runs recorded with the profile (written by adapters.train): settings, "
                "loss curve and evaluation."),
        table(header, rows, numeric={off + i for i in (3, 4, 5, 6, 7)} | {
            off + 8 + i for i in range(len(metric_names))})]
    colours = list(PALETTE)
    series = [plots.Series(f"{r.method} (seed {r.seed})" + (f" · {m.label}" if multi else ""),
                           colours[i % len(colours)], r) for i, (m, r) in enumerate(runs)]
    parts.append(_figures(figs(plots.loss_curves(series), "Training loss per step for each run.",
                               "training loss curves")))
    for m, r in runs:
        settings = kv_table([(k, value_text(v)) for k, v in r.settings.items()]) if r.settings \
            else _note("No settings recorded.")
        versions = kv_table(list(r.versions.items())) if r.versions else None
        parts.append(el("details", el("summary", f"Settings: {r.method} (seed {r.seed})",
                                      f" — {m.label}" if multi else ""),
                        el("div", settings, versions, class_="kv-grid")))
    return join(parts)


# --------------------------------------------------------------------------- reproducibility
def _reproducibility(models: list[_Model], command: Optional[str]) -> Markup:
    multi = len(models) > 1
    parts: list[Any] = []
    parts.append(el("p", f"Report written by geoprobe {__version__}."
                         + (" Command:" if command else "")))
    if command:
        parts.append(el("code", command, class_="cmd"))
    for m in models:
        p = m.profile
        mi, c = p.model, p.corpus
        measured = kv_table([
            ("command", el("code", p.command, class_="cmd") if p.command else DASH),
            ("created", p.created or DASH),
            ("seed", str(p.seed)),
            ("schema version", str(p.schema_version)),
        ], caption="Measurement")
        model = kv_table([
            ("name", mi.name), ("source", mi.source), ("architecture", mi.architecture),
            ("model type", mi.model_type), ("parameters", num(mi.n_parameters)),
            ("vocabulary", num(mi.vocab_size)), ("hidden size", str(mi.hidden_size)),
            ("layers", str(mi.n_layers)), ("dtype", mi.dtype),
            ("encoder", "yes" if mi.is_encoder else "no")], caption="Model")
        corpus = kv_table([
            ("name", c.name), ("sha256", el("code", c.sha256)), ("documents", num(c.n_documents)),
            ("tokens", num(c.n_tokens)), ("characters", num(c.n_characters)),
            ("field", c.field or DASH)], caption="Corpus")
        versions = (kv_table(sorted(p.versions.items()), caption="Versions") if p.versions
                    else _note("No versions recorded."))
        settings = (kv_table([(k, value_text(v)) for k, v in p.settings.items()],
                             caption="Settings") if p.settings else _note("No settings recorded."))
        total = sum(v for v in p.timings.values() if finite(v))
        timings = (kv_table([(k, seconds(v)) for k, v in sorted(
            p.timings.items(), key=lambda kv: -kv[1] if finite(kv[1]) else 0)]
            + [("total", seconds(total))], caption="Timings") if p.timings
            else _note("No timings recorded."))
        parts.append(_block(m, multi, el("div", measured, model, corpus, versions, settings,
                                         timings, class_="kv-grid")))
    return join(parts)
