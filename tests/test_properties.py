"""Property tests (hypothesis): laws the measurements and the files must obey for every input.

* Gromov δ (METHODS.md §3): invariant under a permutation of the points (the base point moving with
  its point) and under isometries (rotation + translation), linear under scaling (δ_rel invariant),
  and the base-point value bounds the four-point value, δ_w ≤ δ ≤ 2δ_w for every base point w, with
  δ itself checked against the brute-force four-point definition.
* Intrinsic dimension (TwoNN, GRIDE): invariant under scaling and rotation (every scale of GRIDE,
  its radii scaling with the data).
* The power-law fit: the same whatever the order of the corpus's documents (token counting batched
  anywhere) and whatever the order of the vocabulary ids.
* Profiles and adapter plans, built field by field from their type hints: saved and loaded back
  they are equal, and saving the loaded copy gives the same bytes.
* The HTML escaper: any Unicode text, escaped into an element and an attribute, parses back (stdlib
  HTML parser) to exactly that text with control characters made visible, and a report whose model
  name, corpus, command and tokens are arbitrary text has the same element structure as a report of
  plain names. (The browser check of hostile names is in tests/test_report_browser.py.)

Example counts are modest (the whole file runs in well under a minute on two cores).
"""
from __future__ import annotations

import dataclasses
import html.parser
import itertools
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings, strategies as st
from hypothesis.extra import numpy as hnp
from scipy.spatial.distance import cdist
from scipy.stats import special_ortho_group

import geoprobe as gp
from geoprobe.profile import NULL_KINDS, SCHEMA_VERSION, VERDICTS, GeometryProfile
from geoprobe.records import Record
from geoprobe.report.markup import esc
from profile_factory import HOSTILE_FRAGMENTS, visible_text

MANY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=15, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------- δ-hyperbolicity
COORD = st.floats(-100, 100, allow_nan=False, allow_infinity=False, allow_subnormal=False)


@st.composite
def point_sets(draw, n_min: int = 4, n_max: int = 10, d_max: int = 4) -> np.ndarray:
    """n × d float64 points with a spread well above rounding (ties and repeated points allowed)."""
    n = draw(st.integers(n_min, n_max))
    d = draw(st.integers(1, d_max))
    x = draw(hnp.arrays(np.float64, (n, d), elements=COORD))
    assume(cdist(x, x).max() > 1e-3)
    return x


def tol(x: np.ndarray) -> float:
    """Absolute tolerance for δ of ``x``: the distances are float64 (relative error a few ulps of the
    coordinates), and δ is a combination of six distances with weights ½."""
    return 1e-9 * (1.0 + float(np.abs(x).max()))


def four_point(x: np.ndarray) -> float:
    """The definition: max over quadruples of (S1 − S2)/2, S1 ≥ S2 ≥ S3 the three pair sums
    (distances from scipy, independent of geoprobe's)."""
    D = cdist(x, x)
    best = 0.0
    for a, b, c, e in itertools.combinations(range(len(x)), 4):
        s = sorted((D[a, b] + D[c, e], D[a, c] + D[b, e], D[a, e] + D[b, c]))
        best = max(best, (s[2] - s[1]) / 2)
    return best


@MANY
@given(x=point_sets(), data=st.data())
def test_delta_invariant_under_permutation(x, data):
    """δ_w(π X) = δ_w(X) with the base point w following its point; the four-point δ is unchanged."""
    perm = np.array(data.draw(st.permutations(range(len(x)))))
    y = x[perm]
    w = int(data.draw(st.integers(0, len(x) - 1)))
    w_in_y = int(np.flatnonzero(perm == w)[0])
    assert gp.delta(y, base_point=w_in_y).delta == pytest.approx(gp.delta(x, base_point=w).delta,
                                                                   abs=tol(x))
    assert gp.delta(y, mode="exact").delta == pytest.approx(gp.delta(x, mode="exact").delta, abs=tol(x))


@MANY
@given(x=point_sets(), seed=st.integers(0, 2**32 - 1),
       shift=st.lists(COORD, min_size=4, max_size=4))
def test_delta_invariant_under_isometry(x, seed, shift):
    """Rotating (a random rotation of SO(d)) and translating the points leaves δ and δ_rel alone."""
    d = x.shape[1]
    q = special_ortho_group.rvs(d, random_state=seed) if d > 1 else np.ones((1, 1))
    y = x @ q + np.asarray(shift[:d])
    for mode in ("fixed", "exact"):
        a, b = gp.delta(x, mode=mode), gp.delta(y, mode=mode)
        t = tol(x) + tol(y)
        assert b.delta == pytest.approx(a.delta, abs=t)
        assert b.diameter == pytest.approx(a.diameter, abs=t)


@MANY
@given(x=point_sets(), c=st.floats(1e-3, 1e3))
def test_delta_linear_under_scaling(x, c):
    """δ(cX) = c δ(X) and diam(cX) = c diam(X), so δ_rel = 2δ/diam is scale-invariant."""
    for mode in ("fixed", "exact"):
        a, b = gp.delta(x, mode=mode), gp.delta(c * x, mode=mode)
        assert b.delta == pytest.approx(c * a.delta, abs=c * tol(x))
        assert b.diameter == pytest.approx(c * a.diameter, rel=1e-12)
        assert b.delta_rel == pytest.approx(a.delta_rel, abs=1e-9)


@MANY
@given(x=point_sets(n_max=9))
def test_base_point_delta_brackets_four_point_delta(x):
    """δ_w ≤ δ ≤ 2δ_w for every base point w, δ the four-point value (brute force).

    In geoprobe's terms (METHODS.md §3) δ_w is the Gromov-product hyperbolicity at the base point w,
    δ_w = max_{x,y,z} [min((x|z)_w, (z|y)_w) − (x|y)_w], and δ the four-point value
    max (S1 − S2)/2. Writing the Gromov products out, min((x|z)_w, (z|y)_w) − (x|y)_w =
    ½[(d(x,y) + d(z,w)) − max(d(x,z) + d(y,w), d(x,w) + d(y,z))], which is at most (S1 − S2)/2 of the
    quadruple {x, y, z, w} and equals it for the right labelling; so δ = max_w δ_w, which gives the
    left inequality (and ``mode="exact"`` must equal the brute force). The right one is Gromov's
    change of base point: hyperbolicity δ_w at one base point implies 2δ_w at every other
    (Ghys & de la Harpe 1990, Prop. 2.2; Bridson & Haefliger III.H 1.22), hence δ ≤ 2δ_w. The relation
    as the documentation states it therefore holds as written, for every w.
    """
    delta = four_point(x)
    t = tol(x)
    exact = gp.delta(x, mode="exact")
    assert exact.delta == pytest.approx(delta, abs=t)
    values = [gp.delta(x, base_point=w).delta for w in range(len(x))]
    assert max(values) == pytest.approx(delta, abs=t)
    for dw in values:
        assert dw <= delta + t
        assert delta <= 2 * dw + t
    assert 0.0 <= exact.delta_rel <= 1.0 + 1e-12


# --------------------------------------------------------------------------- intrinsic dimension
@st.composite
def manifold_points(draw) -> np.ndarray:
    """Points on a random k-dimensional linear or curved patch in R^D (seeded Gaussian draws)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = draw(st.integers(60, 160))
    k = draw(st.integers(1, 4))
    D = draw(st.integers(k + 1, 8))
    z = rng.standard_normal((n, k))
    x = z @ rng.standard_normal((k, D))
    if draw(st.booleans()):
        x = x + np.sin(z @ rng.standard_normal((k, D)))
    return x


def _id_fields(r) -> dict[str, Any]:
    return {"n_points": r.n_points, "n_duplicates_removed": r.n_duplicates_removed,
            "scale_n1": r.scale_n1, "n1s": [s.n1 for s in r.scales]}


def _id_numbers(r) -> list[float]:
    vals = [r.dimension, r.error, r.linear_fit_dimension or 0.0, r.mle_dimension or 0.0]
    for s in r.scales:
        vals += [s.dimension, s.error]
    return vals


@SLOW
@given(x=manifold_points(), c=st.floats(1e-3, 1e3), seed=st.integers(0, 2**32 - 1),
       estimator=st.sampled_from(["twonn", "gride"]))
def test_intrinsic_dimension_invariant_under_scaling_and_rotation(x, c, seed, estimator):
    """The estimators read ratios of neighbour distances, so c·X·Q (c > 0, Q a rotation) gives the
    same dimensions, errors, scales and duplicate counts; GRIDE's radii (lengths) scale by c."""
    q = special_ortho_group.rvs(x.shape[1], random_state=seed)
    base = gp.intrinsic_dimension(x, estimator=estimator)
    for y, factor in ((c * x, c), (x @ q, 1.0), (c * x @ q, c)):
        r = gp.intrinsic_dimension(y, estimator=estimator)
        assert _id_fields(r) == _id_fields(base)
        assert np.allclose(_id_numbers(r), _id_numbers(base), rtol=1e-9, atol=0)
        for s, s0 in zip(r.scales, base.scales):
            assert s.radius == pytest.approx(factor * s0.radius, rel=1e-9)


# --------------------------------------------------------------------------- power law
@pytest.fixture(scope="module")
def paragraphs() -> list[str]:
    from geoprobe.corpus import split_paragraphs

    return [p for d in gp.Corpus.default().documents for p in split_paragraphs(d)][:400]


def _fit_fields(r) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(r).items() if k != "seconds"}


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_power_law_invariant_under_shuffling(paragraphs, bpe_tokenizer, data):
    """Shuffling the corpus's documents (counted in batches of any size) gives the same token counts
    and the same fit, field for field; so does relabelling the vocabulary ids of the counts."""
    order = data.draw(st.permutations(range(len(paragraphs))))
    batch = data.draw(st.integers(1, 64))
    ref = gp.Corpus.from_texts(paragraphs).count_tokens(bpe_tokenizer, progress=False)
    shuffled = gp.Corpus.from_texts([paragraphs[i] for i in order])
    counts = shuffled.count_tokens(bpe_tokenizer, progress=False, batch_size=batch)
    assert np.array_equal(counts.counts, ref.counts)
    fit = _fit_fields(gp.fit_power_law(ref.counts))
    assert _fit_fields(gp.fit_power_law(counts.counts)) == fit
    ids = np.array(data.draw(st.permutations(range(ref.counts.size))))
    assert _fit_fields(gp.fit_power_law(ref.counts[ids])) == fit


# --------------------------------------------------------------------------- JSON round trips
TEXT = st.text(st.characters(exclude_categories=()), max_size=12) | st.sampled_from(["\ud800", "a\udcff b"])
FLOATS = st.floats(allow_nan=False, allow_infinity=False)
INTS = st.integers(-2**63, 2**63)
JSON = st.recursive(st.none() | st.booleans() | INTS | FLOATS | TEXT,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                    max_leaves=8)


def strategy_for(tp: Any, overrides: dict[str, st.SearchStrategy] | None = None) -> st.SearchStrategy:
    """A strategy for values of the annotation ``tp`` as the records declare them (finite floats: the
    files write NaN as null on purpose; any text, lone surrogates included, such as a file name that
    was not UTF-8 decodes to)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(st.none() if a is type(None) else strategy_for(a) for a in args))
    if origin is list:
        return st.lists(strategy_for(args[0]), max_size=2)
    if origin is tuple:
        return st.lists(strategy_for(args[0]), max_size=3).map(tuple)
    if origin is dict:
        return st.dictionaries(TEXT, strategy_for(args[1]), max_size=3)
    if dataclasses.is_dataclass(tp):
        return record_strategy(tp, overrides)
    return {float: FLOATS, int: INTS, str: TEXT, bool: st.booleans(), Any: JSON}[tp]


# fields whose values a record's check() restricts: drawn from what it accepts
_BY_NAME: dict[str, st.SearchStrategy] = {
    "verdict": st.sampled_from(VERDICTS), "null": st.sampled_from(NULL_KINDS),
    "error": st.floats(min_value=0.0, max_value=1e12, allow_nan=False, allow_infinity=False)}


def record_strategy(cls: type, overrides: dict[str, st.SearchStrategy] | None = None) -> st.SearchStrategy:
    """``cls`` built from a strategy per field (``overrides`` by field name where a value is fixed)."""
    overrides = overrides or {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: overrides[f.name] if f.name in overrides
              else _BY_NAME[f.name] if f.name in _BY_NAME and hints[f.name] in (str, float)
              else strategy_for(hints[f.name])
              for f in dataclasses.fields(cls) if f.init}
    built = st.builds(cls, **fields)
    if callable(getattr(cls, "check", None)):  # records with cross-field rules: only consistent ones
        built = built.filter(lambda rec: rec.check() is None)
    return built


def _numbered(layers: list) -> list:
    """Layers numbered 0, 1, 2, … as a profile requires."""
    return [dataclasses.replace(layer, layer=i) for i, layer in enumerate(layers)]


def _profile_strategy() -> st.SearchStrategy:
    from geoprobe.profile import LayerGeometry

    return record_strategy(GeometryProfile, {
        "schema_version": st.just(SCHEMA_VERSION),
        "layers": st.lists(record_strategy(LayerGeometry), max_size=2).map(_numbered)})


PROFILES = _profile_strategy()


@SLOW
@given(profile=PROFILES)
def test_profile_json_round_trips_exactly(profile, tmp_path_factory):
    """save → load gives an equal profile (every float to the last bit, 64-bit ints, any Unicode
    text, nested settings), and saving the loaded profile writes the same bytes."""
    folder = tmp_path_factory.mktemp("profile")
    first = profile.save(folder / "a.json")
    loaded = GeometryProfile.load(first)
    assert loaded == profile
    second = loaded.save(folder / "b.json")
    assert second.read_bytes() == first.read_bytes()
    assert json.loads(first.read_text(encoding="utf-8"))["schema"] == "geoprobe.profile"


def _plans():
    from adapters import registry
    from adapters.plan import AdapterPlan

    name = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=8).filter(str.strip)
    positive = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False)
    nonneg = st.integers(min_value=0, max_value=4096)
    return record_strategy(AdapterPlan, {
        "method": st.sampled_from(registry.names()),
        "r": st.integers(min_value=1, max_value=4096),
        "alpha": positive,
        "target_modules": st.lists(name, min_size=1, max_size=3).map(tuple),
        "curvature": st.none() | positive,
        "layer_ranks": st.none() | st.lists(nonneg, min_size=1, max_size=4),
        "rank_ranges": st.none(),
        "n_heads": st.none() | st.integers(min_value=1, max_value=64),
    })


@FAST
@given(data=st.data())
def test_plan_json_round_trips_exactly(data, tmp_path_factory):
    """An adapter plan saved and loaded is equal to itself, by itself and inside a profile."""
    from adapters.plan import AdapterPlan

    plan = data.draw(_plans())
    folder = tmp_path_factory.mktemp("plan")
    path = plan.save(folder / "plan.json")
    assert AdapterPlan.load(path) == plan
    assert AdapterPlan.load(AdapterPlan.load(path).save(folder / "again.json")) == plan
    assert Path(folder / "again.json").read_bytes() == path.read_bytes()
    profile = data.draw(PROFILES)
    saved = dataclasses.replace(profile, adapter_plan=plan.to_record()).save(folder / "profile.json")
    record = GeometryProfile.load(saved).adapter_plan
    assert record is not None and AdapterPlan.from_dict(dict(record.data)) == plan


# --------------------------------------------------------------------------- HTML escaping
class _Page(html.parser.HTMLParser):
    """Start tags (name, attribute names in order, and whether inside an ``svg``), attribute values
    and text of a page, as the standard-library parser reads them (character references resolved)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, tuple[str, ...], bool]] = []
        self.values: list[str] = []
        self.text: list[str] = []
        self.other: list[str] = []
        self._svg = 0

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, tuple(k for k, _ in attrs), self._svg > 0))
        self.values.extend(v or "" for _, v in attrs)
        self._svg += tag == "svg"

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, tuple(k for k, _ in attrs), self._svg > 0))
        self.values.extend(v or "" for _, v in attrs)

    def handle_endtag(self, tag):
        self._svg -= tag == "svg"

    def handle_data(self, data):
        self.text.append(data)

    def handle_comment(self, data):
        self.other.append("comment")

    def handle_decl(self, decl):
        self.other.append("decl")

    def handle_pi(self, data):
        self.other.append("pi")

    def unknown_decl(self, data):
        self.other.append("cdata")


def parse(page: str) -> _Page:
    p = _Page()
    p.feed(page)
    p.close()
    return p


UNICODE = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
HOSTILE_TEXT = st.lists(st.sampled_from(HOSTILE_FRAGMENTS) | UNICODE, min_size=1, max_size=4).map("".join)
SHOWN_TEXT = HOSTILE_TEXT.filter(bool)  # an empty command or name is left out of the page, not shown


@settings(max_examples=200, deadline=None)
@given(text=UNICODE | HOSTILE_TEXT)
def test_escaped_text_parses_back_to_itself(text):
    """Escaped into an element and into a double-quoted attribute, any text is one text node and one
    attribute value that read back as the text itself (controls made visible): no tag, comment or
    declaration can start inside it."""
    e = esc(text)
    assert not set(e) & set("<>\"'")
    page = parse(f'<td title="{e}">{e}</td>')
    assert page.tags == [("td", ("title",), False)]
    assert page.values == [visible_text(text)]
    assert "".join(page.text) == visible_text(text)
    assert page.other == []


@pytest.fixture(scope="module")
def plain_report_structure() -> list[tuple[str, tuple[str, ...]]]:
    from profile_factory import make_profile

    from geoprobe.report.html import render_html

    profile = make_profile("model", n_layers=3, corpus="corpus", command="geoprobe probe model",
                           token_strings=["tok0", "tok1", "tok2"], adapter_plan=True, finetune=True)
    return _outside_svg(parse(render_html([profile], command="geoprobe report")))


def _outside_svg(page: _Page) -> list[tuple[str, tuple[str, ...]]]:
    """The tags that are not inside a plot (a plot's text lay-out may depend on the text's length);
    ``svg`` itself is kept, so a plot added or lost still shows."""
    return [(name, attrs if name != "svg" else ()) for name, attrs, inside in page.tags if not inside]


@pytest.mark.filterwarnings("ignore:Glyph .* missing from font")
@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(name=SHOWN_TEXT, corpus=SHOWN_TEXT, command=SHOWN_TEXT,
       tokens=st.lists(SHOWN_TEXT, min_size=3, max_size=3))
@example(name=HOSTILE_FRAGMENTS[1], corpus=HOSTILE_FRAGMENTS[0], command="</title><!--",
         tokens=list(HOSTILE_FRAGMENTS[:3]))
def test_report_structure_ignores_the_text_it_shows(plain_report_structure, name, corpus, command,
                                                   tokens):
    """A report of a model whose name, corpus, command and token strings are arbitrary text has
    exactly the elements and attributes (outside the plots) of the same report with plain names, and
    shows every one of those strings as text."""
    from profile_factory import make_profile

    from geoprobe.report.html import render_html

    profile = make_profile(name, n_layers=3, corpus=corpus, command=command, token_strings=tokens,
                           adapter_plan=True, finetune=True)
    page = parse(render_html([profile], command=command))
    assert _outside_svg(page) == plain_report_structure
    assert not any(tag == "script" or any(a.lower().startswith("on") for a in attrs)
                   for tag, attrs, _ in page.tags)
    shown = "".join(page.text)
    for s in (name, corpus, *tokens):
        assert visible_text(s) in shown
