"""GeometryProfile JSON round trip and its refusal of incompatible or malformed files."""
import json
import math

import pytest

from geoprobe.errors import OutputError, ProfileError
from geoprobe.profile import (SCHEMA_VERSION, CorpusInfo, DeltaStat, Density2D, GeometryProfile,
                              IDResult, IDScale, LayerGeometry, ModelInfo, NormBin, NullComparison,
                              NormFrequencyResult, PowerLawResult, SinkReport, WordGroup, WordNorm)


def make_delta() -> DeltaStat:
    """Two sets below every null, numbers chosen by hand."""
    nulls = [NullComparison(null=k, question=f"question {k}", values=[0.12, 0.125], mean=0.1225,
                            ci_low=0.12, ci_high=0.125, diff_mean=-0.0225, diff_ci_low=-0.03,
                            diff_ci_high=-0.015, share_below=1.0, share_ci_low=1.0,
                            share_ci_high=1.0, p_value=0.001, p_adjusted=p_adj, verdict="below")
             for k, p_adj in (("own", 0.002), ("population", 0.003), ("resample", None))]
    return DeltaStat(what="prompts", mean=0.1, std=0.01, n_points=40, dim=8, n_sets=2, mode="fixed",
                     values=[0.09, 0.11], ci_low=0.09, ci_high=0.11, nulls=nulls, verdict="below",
                     verdict_reason="more tree-like than every null", level=0.95, n_boot=2000,
                     correction="Holm across 3 tests")


def make_profile(n_layers=3):
    ds = make_delta()
    layers = [LayerGeometry(layer=i, n_positions=100, n_sinks_excluded=i, norm_median=1.5,
                            norm_max=9.0,
                            twonn=IDResult(dimension=3.0 + i, error=0.2, estimator="twonn",
                                           n_points=100, n_duplicates_removed=1,
                                           linear_fit_dimension=3.1),
                            gride=IDResult(dimension=3.2, error=0.3, estimator="gride", n_points=100,
                                           n_duplicates_removed=0,
                                           scales=[IDScale(1, 2, 3.0, 0.2), IDScale(2, 4, 3.3, 0.25)]),
                            delta=ds) for i in range(n_layers)]
    return GeometryProfile(
        model=ModelInfo(name="m<script>", source="folder", architecture="LlamaForCausalLM",
                        model_type="llama", n_parameters=10, vocab_size=5, hidden_size=8,
                        n_layers=n_layers - 1, dtype="float32"),
        corpus=CorpusInfo(name="c", sha256="ab" * 32, n_documents=2, n_tokens=30, n_characters=99),
        frequency=PowerLawResult(gamma=1.9, error=0.05, xmin=2, zipf_exponent=1 / 0.9,
                                 ks_distance=0.03, n_types=5, n_tokens=30, n_tail_types=3,
                                 lognormal_converged=False, count_values=[1, 2, 5],
                                 count_multiplicities=[3, 1, 1]),
        norms=NormFrequencyResult(spearman_rho=-0.4, spearman_p=0.01, n_tokens_seen=5,
                                  mean_norm_seen=1.0, mean_norm_unseen=None,
                                  bins=[NormBin(0.0, 1.0, 5, 1.0, 0.5, 2.0)],
                                  groups=[WordGroup("function words", 0.5,
                                                    [WordNorm("to", ["Ġto"], [3], 0.5, False,
                                                              "first token")], 0.353)],
                                  density=Density2D([0, 1], [0, 1], [[5]])),
        delta_prompts=ds, delta_tokens=ds, layers=layers,
        sinks=SinkReport(factor=20.0, n_positions=100, n_excluded=2, excluded_by_layer=[0, 1, 2],
                         positions_in_sequence=[0], reason="massive", norm_quantiles_by_layer=[[1.0]]),
        settings={"seed": 0, "n": [1, 2]}, seed=0, versions={"torch": "x"}, timings={"a": 1.0})


def test_round_trip(tmp_path):
    p = make_profile()
    path = p.save(tmp_path / "p.json")
    q = GeometryProfile.load(path)
    assert q == p
    assert q.to_dict() == p.to_dict()
    assert json.loads(path.read_text())["schema_version"] == SCHEMA_VERSION


def test_nan_written_as_null_and_read_back(tmp_path):
    p = make_profile().with_updates(timings={"a": float("nan")})
    text = p.save(tmp_path / "p.json").read_text()
    assert "NaN" not in text
    assert math.isnan(GeometryProfile.load(tmp_path / "p.json").timings["a"] or math.nan)


def test_side_of_null_is_the_recorded_verdict_and_null_finds_each_kind():
    import dataclasses

    base = make_profile().delta_prompts
    assert base.side_of_null == base.verdict == "below"
    assert dataclasses.replace(base, verdict="within").side_of_null == "within"
    assert [base.null(k).null for k in ("own", "population", "resample")] == ["own", "population",
                                                                             "resample"]
    assert base.null("own") is base.nulls[0] and base.null("other") is None
    assert dataclasses.replace(base, nulls=[]).null("own") is None


def test_round_trip_keeps_every_null_field(tmp_path):
    p = make_profile()
    q = GeometryProfile.load(p.save(tmp_path / "p.json"))
    for a, b in zip(p.delta_prompts.nulls, q.delta_prompts.nulls):
        assert a == b and isinstance(b, NullComparison)
    assert q.delta_prompts.null("resample").p_adjusted is None


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(schema_version=SCHEMA_VERSION + 1), "schema version"),
    (lambda d: d.pop("schema"), "not a geoprobe profile"),
    (lambda d: d.pop("model"), "missing field 'model'"),
    (lambda d: d["frequency"].update(gamma="high"), "expected a number"),
    (lambda d: d.update(layers={"a": 1}), "expected a list"),
])
def test_incompatible_or_malformed(tmp_path, mutate, message):
    d = make_profile().to_dict()
    mutate(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ProfileError, match=message):
        GeometryProfile.load(path)


def test_not_json_and_missing(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ProfileError, match="not valid JSON"):
        GeometryProfile.load(bad)
    with pytest.raises(ProfileError, match="does not exist"):
        GeometryProfile.load(tmp_path / "missing.json")


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "p.json"
    target.write_text("old")
    import geoprobe.records as files

    def boom(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(files.os, "replace", boom)
    with pytest.raises(OutputError, match=r"cannot write .*p\.json: the disk is full"):
        make_profile().save(target)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]


# --------------------------------------------------------------------------- values the report relies on
@pytest.mark.parametrize("where,value,words", [
    (("delta_prompts", "verdict"), "sideways", "verdict is 'sideways'"),
    (("delta_prompts", "nulls", 0, "verdict"), "maybe", "verdict is 'maybe'"),
    (("delta_prompts", "nulls", 0, "null"), "uniform", "null is 'uniform'"),
    (("layers", 1, "twonn", "error"), -0.5, "never negative"),
])
def test_a_profile_with_values_the_report_cannot_show_is_refused_on_reading(tmp_path, where, value, words):
    """A verdict or null name outside the known ones, or a negative standard error, is refused when the
    profile is read (the report would otherwise fail on it, or draw a negative error bar)."""
    from profile_factory import make_profile

    path = make_profile(seed=3, n_layers=4).save(tmp_path / "p.json")
    data = json.loads(path.read_text())
    node = data
    for key in where[:-1]:
        node = node[key]
    assert where[-1] in node  # the field exists where the case says
    node[where[-1]] = value
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=words):
        GeometryProfile.load(path)
