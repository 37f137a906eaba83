"""The report's figures, drawn with matplotlib (no pyplot, Agg canvas), as ``Figure`` objects for
notebooks and as inline SVG for the report.

Each figure has two functions taking the same profile records: ``<name>_figure`` draws it and returns
the :class:`matplotlib.figure.Figure` (shown by Jupyter, saved with ``fig.savefig``), and ``<name>``
returns that figure as the text of one ``<svg>`` element (XML prolog, DOCTYPE and metadata removed,
no fixed size: it scales to its container through its viewBox); both give ``None`` when the records
hold nothing to draw. :func:`profile_figures` draws every figure of one profile at once. Text is written as SVG ``<text>``
(``svg.fonttype = 'none'``), which matplotlib escapes; labels taken from models additionally pass
through :func:`label` so that ``$`` cannot start mathtext and control characters are dropped.

What is drawn (HypLoRA, arXiv 2410.04010 §4; Clauset, Shalizi & Newman 2009; Khrulkov et al. 2020;
Facco et al. 2017; Denti et al. 2022):

* frequency distribution P(k) = m_k / Σ m — the share of token types seen k times — with the fitted
  discrete power law above x_min, P(k) = (n_tail / n_types) · k^(−γ) / ζ(γ, x_min);
* rank-frequency f(r) with the matching Zipf line f(r) = x_min · (r / n_tail)^(−s), s = 1/(γ − 1),
  from inverting the tail count N(≥k) ≈ n_tail · (k / x_min)^(1−γ);
* norm against log10 frequency as a 2-D histogram with the per-bin mean norms;
* δ_rel = 2δ/diam histograms of the data against its three nulls, and per layer the means with
  their bootstrap intervals;
* TwoNN/GRIDE intrinsic dimension per layer and GRIDE over neighbourhood scales n1.
"""
from __future__ import annotations

import io
import math
import os
import re
from typing import TYPE_CHECKING, Any, Iterable, NamedTuple, Optional, Sequence

import numpy as np

from ..profile import NULL_KINDS, NULL_NAMES, GeometryProfile
from .markup import superscript

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Quantile levels behind SinkReport.norm_quantiles_by_layer as geoprobe.pipeline records them.
SINK_QUANTILE_LEVELS = (0.0, 0.5, 0.9, 0.99, 1.0)

# Okabe–Ito colours: distinguishable with the common colour-vision deficiencies.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
NULL_COLOUR = "#6b6b6b"
_RC = {
    "svg.fonttype": "none",
    "svg.hashsalt": "geoprobe-report",
    "font.family": "sans-serif",
    "font.size": 9.0,
    "axes.titlesize": 10.0,
    "axes.labelsize": 9.0,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "grid.linewidth": 0.6,
    "legend.frameon": False,
    "legend.fontsize": 8.0,
    "figure.dpi": 100,
}
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class Series(NamedTuple):
    """One model's record in an overlay: legend label, colour, record."""

    label: str
    colour: str
    value: Any


def label(text: Any, limit: int = 40) -> str:
    """A model-provided string made safe as a matplotlib label: control characters removed,
    ``$`` escaped (no mathtext), shortened to ``limit`` characters."""
    s = _CONTROL.sub("", str(text))
    if len(s) > limit:
        s = s[: limit - 1] + "…"
    return s.replace("$", r"\$")


# --------------------------------------------------------------------------- figure → SVG
SMALL = (5.0, 3.3)     # inches; shown at about half the page width
WIDE = (8.0, 3.6)      # shown across the page


def _figure(width: float = SMALL[0], height: float = SMALL[1], *, left: float = 0.72,
            bottom: float = 0.5, right: float = 0.15, top: float = 0.12):
    """A figure with one axes and fixed margins in inches (fast: no layout engine pass)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(width, height))
        FigureCanvasAgg(fig)
        fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height,
                            top=1 - top / height)
        axes = [fig.add_subplot(1, 1, 1)]
    return fig, axes


_PROLOG = re.compile(r"^.*?(?=<svg[\s>])", re.S)
_METADATA = re.compile(r"\s*<metadata>.*?</metadata>", re.S)
_SIZE = re.compile(r'\s(?:width|height)="[^"]*"')


def to_svg(fig) -> str:
    """Serialise ``fig`` as an inline-ready ``<svg>`` element (deterministic output)."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context(_RC):
        fig.savefig(buf, format="svg", dpi=150, metadata={"Date": None})
    text = buf.getvalue()
    text = _PROLOG.sub("", text, count=1)
    text = _METADATA.sub("", text, count=1)
    head_end = text.index(">")
    head = _SIZE.sub("", text[:head_end])
    body = _GEOMETRY.sub(_round_attr, text[head_end:])
    body = re.sub(r"\n[ \t]+<", "\n<", body)            # indentation between elements
    return head + body.rstrip() + "\n"


# Coordinates in points: two decimals (1/7200 inch) are far below a pixel; text is not touched.
_GEOMETRY = re.compile(r'(\s(?:d|x|y|x1|x2|y1|y2|cx|cy|r|width|height|transform|points)=")([^"]*)(")')
_DECIMAL = re.compile(r"-?\d+\.\d{3,}")


def _round_attr(m: re.Match) -> str:
    value = _DECIMAL.sub(lambda n: f"{float(n.group(0)):.2f}".rstrip("0").rstrip("."), m.group(2))
    value = re.sub(r"\s*\n\s*", " ", value).strip()    # path data on one line
    return m.group(1) + value + m.group(3)


def prefix_ids(svg: str, prefix: str) -> str:
    """Prefix every referenced ``id`` in ``svg`` (and each ``#id`` reference) so several figures
    can share one HTML document without clashing clip paths or markers; ids nothing refers to
    (matplotlib names every group) are dropped."""
    ids = set(re.findall(r'\sid="([^"]+)"', svg))
    if not ids:
        return svg
    used = {m.group(1) or m.group(2)
            for m in re.finditer(r'url\(#([^)]+)\)|href="#([^"]+)"', svg)} & ids

    def ref(m: re.Match) -> str:
        name = m.group(2)
        return f"{m.group(1)}{prefix}{name}" if name in used else m.group(0)

    svg = re.sub(r'\sid="([^"]+)"',
                 lambda m: f' id="{prefix}{m.group(1)}"' if m.group(1) in used else "", svg)
    svg = re.sub(r'(url\(#)([^)]+)(?=\))', ref, svg)
    return re.sub(r'((?:xlink:)?href="#)([^"]+)(?=")', ref, svg)


def _done(fig: "Figure", ax_list: Sequence, legend: bool = True) -> "Figure":
    """``fig`` with a legend on each axes that has labelled artists (when ``legend``)."""
    if legend:
        for ax in ax_list:
            handles, labels = ax.get_legend_handles_labels()
            if handles:
                ax.legend(loc="best")
    return fig


def _svg(fig: Optional["Figure"]) -> Optional[str]:
    """:func:`to_svg` of ``fig``, or None for no figure."""
    return None if fig is None else to_svg(fig)


def _decade_label(x: float, _pos: Any = None) -> str:
    """Plain-text tick label for a power of ten (no mathtext): 0.1, 1, 10, 100, 1000, 10⁴, …"""
    if not x > 0:
        return ""
    e = math.log10(x)
    if abs(e - round(e)) > 1e-6:
        return ""
    e = int(round(e))
    if -2 <= e <= 3:
        return f"{10.0 ** e:g}"
    return "10" + superscript(e)


def _log(ax, axis: str = "both") -> None:
    """Log scale with plain-text decade labels and unlabelled minor ticks."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    for name in ("x", "y") if axis == "both" else (axis,):
        getattr(ax, f"set_{name}scale")("log")
        a = getattr(ax, f"{name}axis")
        a.set_major_locator(LogLocator(base=10, numticks=12))
        a.set_major_formatter(FuncFormatter(_decade_label))
        a.set_minor_formatter(NullFormatter())


def _arr(values: Iterable[Any]) -> np.ndarray:
    return np.asarray([float(v) if v is not None else math.nan for v in values], dtype=np.float64)


# --------------------------------------------------------------------------- frequency
def _count_table(pl) -> tuple[np.ndarray, np.ndarray]:
    k = np.asarray(pl.count_values, dtype=np.float64)
    m = np.asarray(pl.count_multiplicities, dtype=np.float64)
    if k.size == 0 or k.size != m.size:
        return np.empty(0), np.empty(0)
    keep = (k > 0) & (m > 0) & np.isfinite(k) & np.isfinite(m)
    k, m = k[keep], m[keep]
    order = np.argsort(k)
    return k[order], m[order]


def power_law_pmf(k: np.ndarray, gamma: float, xmin: float, tail_fraction: float) -> np.ndarray:
    """tail_fraction · k^(−γ) / ζ(γ, x_min): the fitted discrete power law as a share of all types."""
    from scipy.special import zeta

    return tail_fraction * np.power(k, -gamma) / zeta(gamma, xmin)


def log_binned(k: np.ndarray, m: np.ndarray, n_edges: int = 28
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Log-binned P(k): for integer bins [a, b) with log-spaced edges, (Σ m_k over the bin) /
    (b − a) / Σ m, placed at the geometric middle √(a·(b − 1)). Returns (x, P, bin widths), so that
    Σ P·width = 1."""
    edges = np.unique(np.floor(np.logspace(0, math.log10(k.max() + 1), n_edges)))
    if edges[-1] <= k.max():
        edges = np.append(edges, k.max() + 1)
    idx = np.searchsorted(edges, k, side="right") - 1
    total = m.sum()
    xs, ps, widths = [], [], []
    for b in range(len(edges) - 1):
        sel = idx == b
        if sel.any():
            width = edges[b + 1] - edges[b]
            xs.append(math.sqrt(edges[b] * (edges[b + 1] - 1)))
            ps.append(m[sel].sum() / width / total)
            widths.append(width)
    return np.asarray(xs), np.asarray(ps), np.asarray(widths)


def rank_curve(k: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rank-frequency steps from the count table: the m_k types seen k times hold ranks
    (types seen more often) + 1 … + m_k; one horizontal step (two points) per distinct k."""
    order = np.argsort(k)[::-1]                       # most frequent first
    k, m = k[order], m[order]
    end = np.cumsum(m)
    start = end - m + 1
    return np.column_stack([start, end]).ravel().astype(np.float64), np.repeat(k, 2).astype(
        np.float64)


def _with_counts(series: Sequence[Series]) -> list[Series]:
    """The series whose power-law result holds a frequency-of-frequency table."""
    return [s for s in series if _count_table(s.value)[0].size]


def _count_plot(series: Sequence[Series]) -> Optional[tuple[Any, Any, list[tuple[Series, Any, Any, Any]]]]:
    """(figure, axes, [(series, power-law result, k, m)]) for the series that hold a count table (k: times
    a type occurs, m: how many types occur k times), or None when none does."""
    usable = _with_counts(series)
    if not usable:
        return None
    fig, (ax,) = _figure()
    return fig, ax, [(s, s.value, *_count_table(s.value)) for s in usable]


def frequency_distribution_figure(series: Sequence[Series]) -> Optional["Figure"]:
    """Log-log P(k) (share of token types seen k times), log-binned means, fitted power law."""
    made = _count_plot(series)
    if made is None:
        return None
    fig, ax, usable = made
    for s, pl, k, m in usable:
        total = m.sum()
        ax.scatter(k, m / total, s=6, color=s.colour, alpha=0.25, linewidths=0, rasterized=False)
        binned_x, binned_y, _ = log_binned(k, m)
        ax.plot(binned_x, binned_y, "o", color=s.colour, markersize=4, markeredgecolor="white",
                markeredgewidth=0.5, label=label(s.label) if len(usable) > 1 else "log-binned")
        gamma, xmin = pl.gamma, pl.xmin
        if _ok(gamma) and gamma > 1 and _ok(xmin) and xmin >= 1 and k.max() > xmin:
            tail = (pl.n_tail_types / pl.n_types if pl.n_types and pl.n_tail_types
                    else m[k >= xmin].sum() / total)
            xs = np.unique(np.geomspace(xmin, k.max(), 120))
            ax.plot(xs, power_law_pmf(xs, gamma, xmin, tail), "-", color=s.colour, linewidth=1.6,
                    label=f"power law γ = {gamma:.2f}".replace("-", "−"))
            ax.axvline(xmin, color=s.colour, linestyle=":", linewidth=0.9)
    _log(ax)
    ax.set_xlabel("k: times a token type occurs in the corpus")
    ax.set_ylabel("P(k): share of token types")
    ax.legend(loc="upper right")
    return _done(fig, [ax], legend=False)


def frequency_distribution(series: Sequence[Series]) -> Optional[str]:
    """:func:`frequency_distribution_figure` as an inline ``<svg>`` element (None: nothing to draw)."""
    return _svg(frequency_distribution_figure(series))


def rank_frequency_figure(series: Sequence[Series]) -> Optional["Figure"]:
    """Frequency against rank (log-log), with the Zipf line f(r) = x_min·(r/n_tail)^(−s)."""
    made = _count_plot(series)
    if made is None:
        return None
    fig, ax, usable = made
    for s, pl, k, m in usable:
        xs, ys = rank_curve(k, m)
        ax.plot(xs, ys, "-", color=s.colour, linewidth=1.4,
                label=label(s.label) if len(usable) > 1 else "observed")
        zipf, xmin = pl.zipf_exponent, pl.xmin
        n_tail = (pl.n_tail_types or int(m[k >= xmin].sum())) if _ok(xmin) else 0
        if _ok(zipf) and zipf > 0 and _ok(xmin) and xmin >= 1 and n_tail and n_tail > 1:
            r = np.geomspace(1, n_tail, 100)
            ax.plot(r, xmin * (r / n_tail) ** (-zipf), "--", color=s.colour, linewidth=1.0,
                    alpha=0.8, label=f"Zipf s = {zipf:.2f}")
    _log(ax)
    ax.set_xlabel("rank r of the token type")
    ax.set_ylabel("occurrences f(r)")
    return _done(fig, [ax])


def rank_frequency(series: Sequence[Series]) -> Optional[str]:
    """:func:`rank_frequency_figure` as an inline ``<svg>`` element (None: nothing to draw)."""
    return _svg(rank_frequency_figure(series))


def _ok(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# --------------------------------------------------------------------------- norms
def _density_grid(density) -> Optional[np.ndarray]:
    """counts as an (x bins, y bins) array, or None when the shape does not fit the edges."""
    if density is None:
        return None
    c = np.asarray(density.counts, dtype=np.float64)
    nx, ny = len(density.x_edges) - 1, len(density.y_edges) - 1
    if nx < 1 or ny < 1 or c.ndim != 2:
        return None
    if c.shape == (nx, ny):
        return c
    if c.shape == (ny, nx):
        return c.T
    return None


def norm_density_figure(norms, colour: str) -> Optional["Figure"]:
    """2-D histogram of embedding norm against log10 frequency, with per-bin mean norms."""
    from matplotlib.colors import LogNorm

    grid = _density_grid(norms.density)
    bins = [b for b in norms.bins if b.n > 0 and _ok(b.mean)]
    if grid is None and not bins:
        return None
    fig, (ax,) = _figure(right=1.0 if grid is not None else 0.15)
    if grid is not None and grid.max() > 0:
        masked = np.ma.masked_less_equal(grid.T, 0)
        mesh = ax.pcolormesh(_arr(norms.density.x_edges), _arr(norms.density.y_edges), masked,
                             cmap="viridis", norm=LogNorm(vmin=1, vmax=max(grid.max(), 2)),
                             rasterized=True, shading="flat")
        from matplotlib.ticker import FuncFormatter, NullFormatter

        w, h = SMALL
        cax = fig.add_axes((1 - 0.85 / w, 0.5 / h, 0.14 / w, 1 - 0.62 / h))
        bar = fig.colorbar(mesh, cax=cax, label="tokens")
        bar.ax.yaxis.set_major_formatter(FuncFormatter(_decade_label))
        bar.ax.yaxis.set_minor_formatter(NullFormatter())
    if bins:
        mid = [(b.lo + b.hi) / 2 for b in bins]
        means = [b.mean for b in bins]
        lo = [max(b.mean - b.min, 0) if _ok(b.min) else 0 for b in bins]
        hi = [max(b.max - b.mean, 0) if _ok(b.max) else 0 for b in bins]
        ax.errorbar(mid, means, yerr=[lo, hi] if grid is None else None, fmt="o-",
                    color="white" if grid is not None else colour, markersize=4,
                    markeredgecolor=colour, markeredgewidth=1.2, linewidth=1.2,
                    ecolor=colour, capsize=2, label="mean norm per frequency bin")
    ax.grid(False)
    ax.set_xlabel("log10 frequency (occurrences in the corpus)")
    ax.set_ylabel("input-embedding L2 norm")
    return _done(fig, [ax])


def norm_density(norms, colour: str) -> Optional[str]:
    """:func:`norm_density_figure` as an inline ``<svg>`` element (None: nothing to draw)."""
    return _svg(norm_density_figure(norms, colour))


# --------------------------------------------------------------------------- hyperbolicity
NULL_STYLES = {"own": ("--", "s", "dashed, squares"), "population": (":", "^", "dotted, triangles"),
               "resample": ("-.", "D", "dash-dot, diamonds")}
"""Line style, marker and their description of each null in every δ figure (the colour stays the
model's, so nulls and models can be told apart in an overlay and in grey)."""


def _null_style(kind: str) -> tuple[str, str, str]:
    return NULL_STYLES.get(kind, ("-", "x", "solid, crosses"))


def dot_plot(stat) -> bool:
    """True when :func:`delta_histogram` draws dots (fewer than 10 sets)."""
    return len(stat.values) < 10


def delta_histogram_figure(stat, colour: str) -> Optional["Figure"]:
    """The per-set δ_rel of the data (filled histogram) against each null's per-set δ_rel (one
    outline per null, in the line style of :data:`NULL_STYLES`), with vertical lines at the means;
    with fewer than 10 sets, one row of dots per series (data on top) and a bar at each mean."""
    vals = _arr(stat.values)
    vals = vals[np.isfinite(vals)]
    nulls = [(c.null, _arr(c.values)) for c in stat.nulls]
    nulls = [(k, v[np.isfinite(v)]) for k, v in nulls]
    nulls = [(k, v) for k, v in nulls if v.size]
    if vals.size == 0 or vals.size + sum(v.size for _, v in nulls) < 3:
        return None
    from matplotlib.ticker import MaxNLocator

    dots = dot_plot(stat)
    fig, (ax,) = _figure(SMALL[0] + (0.0 if dots else 1.95),
                         SMALL[1] if not dots else 1.2 + 0.45 * len(nulls),
                         left=1.75 if dots else 0.72, right=0.15 if dots else 2.4)
    ax.xaxis.set_major_locator(MaxNLocator(6))
    if dots:
        jitter = np.random.default_rng(0)
        rows = [("data", vals, "o", "-")] + [(NULL_NAMES.get(k, k), v, _null_style(k)[1],
                                              _null_style(k)[0]) for k, v in nulls]
        for i, (name, v, marker, style) in enumerate(rows):
            y = len(rows) - 1 - i
            filled = i == 0
            ax.scatter(v, y + jitter.uniform(-0.12, 0.12, v.size), s=26, marker=marker,
                       color=colour if filled else "none", edgecolors=colour, linewidths=1.0,
                       alpha=0.9, label=f"{name} ({v.size} sets)")
            ax.plot([v.mean(), v.mean()], [y - 0.3, y + 0.3], style, color=colour, linewidth=2.0)
        ax.set_yticks(range(len(rows)), [label(r[0], 30) for r in rows][::-1])
        ax.set_ylim(-0.6, len(rows) - 0.4)
        ax.grid(axis="y", visible=False)
        ax.set_xlabel("δ_rel = 2δ / diam (bars: means)")
        return _done(fig, [ax], legend=False)
    both = np.concatenate([vals] + [v for _, v in nulls])
    lo, hi = float(both.min()), float(both.max())
    if hi <= lo:
        hi = lo + max(abs(lo) * 0.01, 1e-6)
    edges = np.linspace(lo, hi, 31)
    ax.hist(vals, bins=edges, color=colour, alpha=0.55, label=f"data ({vals.size} sets)")
    ax.axvline(float(vals.mean()), color=colour, linewidth=1.8)
    for kind, v in nulls:
        style = _null_style(kind)[0]
        ax.hist(v, bins=edges, histtype="step", color=NULL_COLOUR, linewidth=1.4, linestyle=style,
                label=NULL_NAMES.get(kind, kind))
        ax.axvline(float(v.mean()), color=NULL_COLOUR, linewidth=1.4, linestyle=style)
    ax.set_xlabel("δ_rel = 2δ / diam")
    ax.set_ylabel("point sets")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _done(fig, [ax], legend=False)


def delta_histogram(stat, colour: str) -> Optional[str]:
    """:func:`delta_histogram_figure` as an inline ``<svg>`` element (None: nothing to draw)."""
    return _svg(delta_histogram_figure(stat, colour))


def delta_histogram_caption(stat, unit: str = "sets") -> str:
    """What :func:`delta_histogram_figure` draws for ``stat``, in words (no final full stop)."""
    names = [(NULL_NAMES.get(c.null, c.null), _null_style(c.null)) for c in stat.nulls]
    if dot_plot(stat):
        rows = ", ".join(f"{n} ({s[2].split(', ')[1]})" for n, s in names)
        return (f"one dot per {unit[:-1] if unit.endswith('s') else unit}: the data (filled circles) "
                f"on the top row, below it the same sets' δ_rel under each null ({rows}); "
                "bars: means")
    outlines = ", ".join(f"{n} ({s[2].split(', ')[0]})" for n, s in names)
    return (f"histogram over the {unit} of the data's δ_rel (filled) and of each null's δ_rel for "
            f"the same {unit} (grey outlines: {outlines}); vertical lines: means")


def layer_axis(series: Sequence[Series]) -> tuple[bool, str]:
    """(relative, axis label): layers are put on a 0–1 depth axis when the models differ in depth."""
    depths = {max((lg.layer for lg in s.value), default=0) for s in series}
    if len(depths) > 1:
        return True, "relative depth (layer / last layer)"
    return False, "layer (0 = embedding output)"


def _layer_x(layers, relative: bool) -> np.ndarray:
    x = np.asarray([lg.layer for lg in layers], dtype=np.float64)
    if relative:
        top = max(x.max(), 1.0)
        x = x / top
    return x


def _ci_arrays(items) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Means and interval ends of records with ``mean``, ``ci_low``, ``ci_high`` (NaN if missing)."""
    return (_arr(x.mean for x in items), _arr(x.ci_low for x in items),
            _arr(x.ci_high for x in items))


def delta_per_layer_figure(series: Sequence[Series]) -> Optional["Figure"]:
    """Per layer, the data's mean δ_rel over the layer's sets (circles joined by a solid line; error
    bars: the bootstrap interval of the mean, ``ci_low`` to ``ci_high``) and each null's mean δ_rel
    (line style and marker of :data:`NULL_STYLES`; shaded band: its interval), in the model's colour;
    the legend names the models, the data and each null."""
    from matplotlib.lines import Line2D

    usable = [s for s in series if any(lg.delta is not None for lg in s.value)]
    if not usable:
        return None
    relative, xlabel = layer_axis(usable)
    fig, (ax,) = _figure(WIDE[0] + 1.2, WIDE[1], right=2.7)
    kinds: list[str] = []
    for s in usable:
        layers = [lg for lg in s.value if lg.delta is not None]
        x = _layer_x(layers, relative)
        mean, lo, hi = _ci_arrays([lg.delta for lg in layers])
        ax.plot(x, mean, "o-", color=s.colour, markersize=3.5, linewidth=1.4, label=label(s.label))
        ok = np.isfinite(mean) & np.isfinite(lo) & np.isfinite(hi)
        if ok.any():
            ax.errorbar(x[ok], mean[ok], yerr=[np.maximum(mean[ok] - lo[ok], 0.0), np.maximum(hi[ok] - mean[ok], 0.0)],
                        fmt="none",
                        ecolor=s.colour, elinewidth=1.1, capsize=2)
        for kind in [k for k in NULL_KINDS if any(lg.delta.null(k) for lg in layers)]:
            kinds += [kind] if kind not in kinds else []
            have = [(xi, lg.delta.null(kind)) for xi, lg in zip(x, layers) if lg.delta.null(kind)]
            xs = np.asarray([h[0] for h in have])
            nm, nlo, nhi = _ci_arrays([h[1] for h in have])
            style, marker, _ = _null_style(kind)
            ax.plot(xs, nm, linestyle=style, marker=marker, color=s.colour, markersize=3.0,
                    markerfacecolor="none", linewidth=1.1, alpha=0.9)
            band = np.isfinite(nlo) & np.isfinite(nhi)
            if band.any():
                ax.fill_between(xs, nlo, nhi, where=band, color=s.colour, alpha=0.09, linewidth=0)
    level = next((lg.delta.level for s in usable for lg in s.value if lg.delta is not None), 0.95)
    handles, labels = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], color=NULL_COLOUR, marker="o", markersize=3.5, linestyle="-"))
    labels.append(f"data (bars: {100 * level:g} % interval)")
    for kind in kinds:
        style, marker, _ = _null_style(kind)
        handles.append(Line2D([], [], color=NULL_COLOUR, linestyle=style, marker=marker,
                              markersize=3.0, markerfacecolor="none"))
        labels.append(NULL_NAMES.get(kind, kind))
    ax.legend(handles, labels, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("δ_rel = 2δ / diam")
    ax.set_ylim(bottom=0)
    return _done(fig, [ax], legend=False)


def delta_per_layer(series: Sequence[Series]) -> Optional[str]:
    """:func:`delta_per_layer_figure` as an inline ``<svg>`` element (None: nothing to draw)."""
    return _svg(delta_per_layer_figure(series))


def delta_per_layer_caption(series: Sequence[Series]) -> str:
    """What :func:`delta_per_layer_figure` draws for ``series``, in words."""
    stats = [lg.delta for s in series for lg in s.value if lg.delta is not None]
    levels = ", ".join(f"{100 * v:g} %" for v in sorted({d.level for d in stats})) or "95 %"
    kinds = [k for k in NULL_KINDS if any(d.null(k) for d in stats)]
    nulls = "; ".join(f"{NULL_NAMES.get(k, k)}: {_null_style(k)[2]}" for k in kinds)
    colour = " in each model's colour" if len(series) > 1 else ""
    return (f"Mean δ_rel over each layer's sets (one set per document; circles on a solid line, "
            f"error bars: the {levels} bootstrap interval of the mean, documents resampled) and, "
            f"for the same documents, each null's mean δ_rel ({nulls}; shaded bands: their "
            f"{levels} intervals){colour}; attention-sink positions excluded.")


def sink_norms_figure(layers, sinks, colour: str) -> Optional["Figure"]:
    """Per-layer hidden-state norm quantiles (log scale) and the sink threshold factor × median."""
    q = [list(row) for row in (sinks.norm_quantiles_by_layer if sinks is not None else [])]
    fig, (ax,) = _figure(*WIDE, right=2.6)
    drawn = False
    if q and all(len(row) == len(q[0]) for row in q) and len(q[0]) > 0:
        arr = _arr(v for row in q for v in row).reshape(len(q), len(q[0]))
        x = np.arange(len(q))
        if len(layers) == len(q):
            x = np.asarray([lg.layer for lg in layers], dtype=np.float64)
        levels = SINK_QUANTILE_LEVELS if arr.shape[1] == len(SINK_QUANTILE_LEVELS) else None
        styles = [":", "-", "-", "-", "--"]
        for j in range(arr.shape[1]):
            if levels is not None:
                lv = levels[j]
                name = "min" if lv == 0 else "max" if lv == 1 else f"{lv * 100:g}th percentile"
                style = styles[j]
                width = 2.0 if lv == 0.5 else 1.1
            else:
                name, style, width = f"recorded quantile {j + 1} of {arr.shape[1]}", "-", 1.1
            shade = 0.35 + 0.65 * (j + 1) / arr.shape[1]
            ax.plot(x, arr[:, j], style, color=colour, alpha=shade, linewidth=width, label=name)
        drawn = True
    elif layers:
        x = np.asarray([lg.layer for lg in layers], dtype=np.float64)
        ax.plot(x, _arr(lg.norm_median for lg in layers), "-", color=colour, linewidth=2.0,
                label="median")
        ax.plot(x, _arr(lg.norm_max for lg in layers), "--", color=colour, linewidth=1.1,
                label="max")
        drawn = True
    if not drawn:
        return None
    if sinks is not None and layers and _ok(sinks.factor):
        lx = np.asarray([lg.layer for lg in layers], dtype=np.float64)
        ax.plot(lx, sinks.factor * _arr(lg.norm_median for lg in layers), "-.", color="#c0392b",
                linewidth=1.2, label=f"threshold {sinks.factor:g} × median")
    _log(ax, "y")
    ax.set_xlabel("layer (0 = embedding output)")
    ax.set_ylabel("hidden-state L2 norm")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _done(fig, [ax], legend=False)


def sink_norms(layers, sinks, colour: str) -> Optional[str]:
    """:func:`sink_norms_figure` as an inline ``<svg>`` element (None: nothing to draw)."""
    return _svg(sink_norms_figure(layers, sinks, colour))


# --------------------------------------------------------------------------- intrinsic dimension
def _id_bars(results: Sequence[Any]) -> np.ndarray:
    """(2 × n) error-bar lengths below and above each estimate: its bootstrap interval when one was
    computed, else ± its standard error."""
    dim = _arr(r.dimension for r in results)
    lo = _arr(r.ci_low if r.ci_low is not None else r.dimension - r.error for r in results)
    hi = _arr(r.ci_high if r.ci_high is not None else r.dimension + r.error for r in results)
    return np.nan_to_num(np.vstack([np.maximum(dim - lo, 0.0), np.maximum(hi - dim, 0.0)]))


def id_bars_text(results: Sequence[Any]) -> str:
    """What :func:`id_per_layer_figure`'s bars show for ``results``, in words."""
    boot = [r for r in results if r is not None and r.ci_low is not None]
    if not boot:
        return "bars: ± one standard error"
    level = f"{100 * (boot[0].ci_level or 0.95):g} %"
    return (f"bars: {level} block-bootstrap interval over documents ({boot[0].n_boot:,} resamples "
            f"of {boot[0].n_groups} documents)")


def id_per_layer_figure(series: Sequence[Series]) -> Optional["Figure"]:
    """TwoNN (Facco's line fit; solid, circles) and GRIDE at the scale n1 shared by the layers
    (dashed, squares) per layer, with their bootstrap intervals (± one standard error where no
    bootstrap ran)."""
    from matplotlib.lines import Line2D

    usable = [s for s in series if any(lg.twonn or lg.gride for lg in s.value)]
    if not usable:
        return None
    relative, xlabel = layer_axis(usable)
    fig, (ax,) = _figure(*WIDE)
    n1s = set()
    for s in usable:
        for attr, fmt, mk in (("twonn", "-", "o"), ("gride", "--", "s")):
            layers = [lg for lg in s.value if getattr(lg, attr) is not None
                      and _ok(getattr(lg, attr).dimension)]
            if not layers:
                continue
            results = [getattr(lg, attr) for lg in layers]
            if attr == "gride":
                n1s |= {r.scale_n1 for r in results if r.scale_n1}
            ax.errorbar(_layer_x(layers, relative), _arr(r.dimension for r in results),
                        yerr=_id_bars(results), fmt=fmt, marker=mk, color=s.colour, markersize=3.5,
                        linewidth=1.3, capsize=2,
                        label=label(s.label) if attr == "twonn" or not any(
                            lg.twonn for lg in s.value) else None)
    handles, labels = ax.get_legend_handles_labels()
    handles += [Line2D([], [], color=NULL_COLOUR, linestyle="-", marker="o", markersize=3.5),
                Line2D([], [], color=NULL_COLOUR, linestyle="--", marker="s", markersize=3.5)]
    gride = (f"GRIDE at n1 = {next(iter(n1s))}" if len(n1s) == 1 else
             "GRIDE at each model's shared n1" if n1s else "GRIDE")
    labels += ["TwoNN (line fit)", gride]
    ax.legend(handles, labels, loc="best")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("intrinsic dimension")
    ax.set_ylim(bottom=0)
    return _done(fig, [ax], legend=False)


def id_per_layer(series: Sequence[Series]) -> Optional[str]:
    """:func:`id_per_layer_figure` as an inline ``<svg>`` element (None: nothing to draw)."""
    return _svg(id_per_layer_figure(series))


def pick_layers(layers, count: int = 4) -> list:
    """Up to ``count`` layers with GRIDE scales, evenly spread from first to last."""
    with_scales = [lg for lg in layers if lg.gride is not None and len(lg.gride.scales) > 1]
    if len(with_scales) <= count:
        return with_scales
    idx = np.unique(np.round(np.linspace(0, len(with_scales) - 1, count)).astype(int))
    return [with_scales[i] for i in idx]


def gride_scales_figure(layers) -> Optional["Figure"]:
    """GRIDE dimension against neighbourhood scale n1 (n2 = 2·n1) for a few layers, with the scale
    shared by all layers (the headline's) marked by a dotted vertical line."""
    from matplotlib import colormaps

    chosen = pick_layers(layers)
    if not chosen:
        return None
    cmap = colormaps["viridis"]
    fig, (ax,) = _figure()
    for i, lg in enumerate(chosen):
        sc = [s for s in lg.gride.scales if _ok(s.dimension) and s.n1 > 0]
        ax.errorbar([s.n1 for s in sc], [s.dimension for s in sc],
                    yerr=np.maximum(np.nan_to_num(_arr(s.error for s in sc)), 0.0), fmt="o-",
                    color=cmap(0.1 + 0.8 * i / max(len(chosen) - 1, 1)), markersize=3.5,
                    capsize=2, linewidth=1.3, label=f"layer {lg.layer}")
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.set_xscale("log", base=2)
    n1s = sorted({s.n1 for lg in chosen for s in lg.gride.scales if s.n1 > 0})
    shared = chosen[0].gride.scale_n1
    if shared:
        ax.axvline(shared, color=NULL_COLOUR, linestyle=":", linewidth=1.2,
                   label=f"shared scale n1 = {shared}")
        ax.legend(loc="best")
    ax.xaxis.set_major_locator(FixedLocator(n1s))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _p: f"{x:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("scale n1 (neighbours; n2 = 2·n1)")
    ax.set_ylabel("GRIDE dimension")
    ax.set_ylim(bottom=0)
    return _done(fig, [ax])


def gride_scales(layers) -> Optional[str]:
    """:func:`gride_scales_figure` as an inline ``<svg>`` element (None: nothing to draw)."""
    return _svg(gride_scales_figure(layers))


# --------------------------------------------------------------------------- adapters
def loss_curves_figure(series: Sequence[Series]) -> Optional["Figure"]:
    """Training loss against step for each fine-tune run."""
    usable = [s for s in series if len(s.value.loss_steps) and
              len(s.value.loss_steps) == len(s.value.loss_values)]
    if not usable:
        return None
    fig, (ax,) = _figure()
    for s in usable:
        ax.plot(s.value.loss_steps, _arr(s.value.loss_values), "-", color=s.colour, linewidth=1.4,
                label=label(s.label, 40))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    return _done(fig, [ax])


def loss_curves(series: Sequence[Series]) -> Optional[str]:
    """:func:`loss_curves_figure` as an inline ``<svg>`` element (None: nothing to draw)."""
    return _svg(loss_curves_figure(series))


def short_names(names: Sequence[Any]) -> tuple[list[str], str]:
    """Drop the prefix and suffix all ``names`` share (cut at a separator, never inside a word or
    number): ``model.layers.3.mlp.down_proj`` → ``3``. Returns the short names and a pattern with
    ``*`` standing for the varying part ("" when nothing is shared)."""
    texts = [str(n) for n in names]
    if len(set(texts)) < 2:
        return texts, ""

    def shared(items: list[str]) -> int:
        common = os.path.commonprefix(items)
        cut = max((i + 1 for i, ch in enumerate(common) if not ch.isalnum()), default=0)
        return cut

    pre = shared(texts)
    rest = [t[pre:] for t in texts]
    suf = shared([t[::-1] for t in rest])
    short = [t[: len(t) - suf] if suf else t for t in rest]
    if any(not t for t in short) or (pre == 0 and suf == 0):
        return texts, ""
    return short, texts[0][:pre] + "*" + (texts[0][len(texts[0]) - suf:] if suf else "")


def value_bars_figure(names: Sequence[Any], values: Sequence[float], colour: str,
               ylabel: str) -> Optional["Figure"]:
    """A bar chart of numbers keyed by names (plan entries such as per-layer ranks)."""
    vals = _arr(values)
    if vals.size < 2 or not np.isfinite(vals).any():
        return None
    short, pattern = short_names(names)
    longest = max(len(n) for n in short)
    rotate = longest > 3
    fig, (ax,) = _figure(*WIDE, bottom=1.5 if rotate and vals.size <= 40 else 0.55)
    x = np.arange(vals.size)
    ax.bar(x, np.nan_to_num(vals), color=colour, width=0.75)
    if vals.size <= 40:
        ax.set_xticks(x, [label(n, 22) for n in short], rotation=60 if rotate else 0,
                      ha="right" if rotate else "center", rotation_mode="anchor",
                      fontsize=7 if rotate else 8)
    if pattern:
        ax.set_xlabel(label(pattern, 80))
    elif vals.size > 40:
        ax.set_xlabel("entry (in the order of the plan)")
    ax.set_ylabel(label(ylabel, 40))
    ax.grid(axis="x", visible=False)
    return _done(fig, [ax], legend=False)


def value_bars(names: Sequence[Any], values: Sequence[float], colour: str,
               ylabel: str) -> Optional[str]:
    """:func:`value_bars_figure` as an inline ``<svg>`` element (None: nothing to draw)."""
    return _svg(value_bars_figure(names, values, colour, ylabel))


# --------------------------------------------------------------------------- one profile
def profile_figures(profile: GeometryProfile, colour: str = PALETTE[0]) -> dict[str, "Figure"]:
    """Every figure of ``profile`` that its records can draw, keyed by name in report order:
    ``frequency_distribution``, ``rank_frequency``, ``norm_density``, ``delta_prompts``,
    ``delta_tokens`` (:func:`delta_histogram_figure`), ``delta_per_layer``, ``sink_norms``,
    ``id_per_layer``, ``gride_scales`` and ``loss_curves`` (one line per fine-tune run)."""
    series = [Series(profile.model.name, colour, profile.layers)]
    freq = [Series(profile.model.name, colour, profile.frequency)] if profile.frequency else []
    runs = [Series(f"{r.method} (seed {r.seed})", PALETTE[i % len(PALETTE)], r)
            for i, r in enumerate(profile.finetune)]
    drawn = {
        "frequency_distribution": lambda: frequency_distribution_figure(freq),
        "rank_frequency": lambda: rank_frequency_figure(freq),
        "norm_density": lambda: norm_density_figure(profile.norms, colour) if profile.norms else None,
        "delta_prompts": lambda: (delta_histogram_figure(profile.delta_prompts, colour)
                                  if profile.delta_prompts else None),
        "delta_tokens": lambda: (delta_histogram_figure(profile.delta_tokens, colour)
                                 if profile.delta_tokens else None),
        "delta_per_layer": lambda: delta_per_layer_figure(series),
        "sink_norms": lambda: sink_norms_figure(profile.layers, profile.sinks, colour),
        "id_per_layer": lambda: id_per_layer_figure(series),
        "gride_scales": lambda: gride_scales_figure(profile.layers),
        "loss_curves": lambda: loss_curves_figure(runs),
    }
    figures = {name: draw() for name, draw in drawn.items()}
    return {name: fig for name, fig in figures.items() if fig is not None}
