"""The three δ nulls, the bootstrap statistics and the verdicts built on them.

Oracles: closed forms (a Gaussian's mean and covariance, the unbiased estimate of tr Σ²), brute-force
definitions of Holm's and Benjamini–Hochberg's adjustments (and SciPy's ``false_discovery_control``),
coverage of the bootstrap interval on data whose mean is known, and point sets whose answer is known:
points of a tree metric (below every null), Gaussian data with more points than dimensions (within
every null), and i.i.d. Gaussian "token embeddings" of an untrained model (within the conservative
null although the own-covariance Gaussian calls them tree-like).
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.stats

import geoprobe as gp
from geoprobe.errors import InputDataError
from geoprobe.pipeline import ProbeOptionError, ProbeSettings
from geoprobe.probes.delta_stats import correct_across, delta_vs_null, distinct_rows, headline
from geoprobe.probes.nulls import (NullError, PopulationGaussian, ResamplePool,
                                   moment_matched_covariance, own_gaussian)
from geoprobe.probes.uncertainty import (BootstrapOptionError, adjust_p_values, expanded_level,
                                         paired_bootstrap)


# --------------------------------------------------------------------------- corrections
def _holm_brute(p):
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def test_holm_matches_its_definition_and_bh_matches_scipy():
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = rng.uniform(0, 0.2, size=rng.integers(1, 12)).tolist()
        assert np.allclose(adjust_p_values(p, "holm"), _holm_brute(p))
        assert np.allclose(adjust_p_values(p, "bh"), scipy.stats.false_discovery_control(p, method="bh"))
        assert adjust_p_values(p, "none") == p


def test_holm_rejects_exactly_the_step_down_set():
    # Holm's procedure: reject p_(1) ≤ α/m, p_(2) ≤ α/(m−1), … until the first failure
    rng = np.random.default_rng(1)
    for _ in range(30):
        p = rng.uniform(0, 0.06, size=6)
        alpha, m = 0.05, 6
        rejected = set()
        for k, i in enumerate(np.argsort(p)):
            if p[i] > alpha / (m - k):
                break
            rejected.add(int(i))
        adj = adjust_p_values(p.tolist(), "holm")
        assert {i for i in range(m) if adj[i] < alpha} | {i for i in range(m) if adj[i] == alpha} >= rejected
        assert {i for i in range(m) if adj[i] <= alpha} == rejected


def test_nan_p_values_stay_out_of_the_family():
    adj = adjust_p_values([0.01, float("nan"), 0.02], "holm")
    assert np.isnan(adj[1]) and np.allclose([adj[0], adj[2]], _holm_brute([0.01, 0.02]))
    with pytest.raises(BootstrapOptionError, match="holm"):
        adjust_p_values([0.1], "bonferonni")


# --------------------------------------------------------------------------- bootstrap
def test_bootstrap_t_p_value_is_students_paired_test():
    # the bootstrap standard error with the √(n/(n−1)) factor is s/√n up to resampling noise, so the
    # p-value is SciPy's one-sample t-test on the differences
    rng = np.random.default_rng(2)
    for n, shift in ((10, 0.3), (10, 0.05), (40, 0.1), (200, 0.02)):
        a = rng.normal(shift, 0.3, size=n)
        b = rng.normal(0.0, 0.1, size=n)
        res = paired_bootstrap(a, b, n_boot=20_000, level=0.95, rng=rng)
        ref = scipy.stats.ttest_1samp(a - b, 0.0).pvalue
        assert res.p_value == pytest.approx(ref, rel=0.15, abs=1e-4)


def test_expanded_interval_has_students_width_for_few_units():
    rng = np.random.default_rng(20)
    d = rng.normal(size=10)
    res = paired_bootstrap(d, np.zeros(10), n_boot=50_000, level=0.95, rng=rng)
    half = scipy.stats.t.ppf(0.975, 9) * d.std(ddof=1) / np.sqrt(10)
    width = res.ci_diff[1] - res.ci_diff[0]
    assert width == pytest.approx(2 * half, rel=0.12)
    assert expanded_level(0.95, 10) > 0.98 and expanded_level(0.95, 10_000) == pytest.approx(0.95, abs=1e-3)


def test_paired_bootstrap_interval_covers_the_true_mean_difference():
    # 200 seeded repeats of 10 pairs whose true mean difference is 0.3: the expanded 95 % interval
    # covers it in at least 90 % of them for normal differences, and in at least 85 % for skewed
    # (exponential) ones, where every percentile interval under-covers at n = 10
    for draw, least in ((lambda r: r.normal(0.3, 0.3, size=10), 180),
                        (lambda r: r.exponential(0.3, size=10), 170)):
        hits = 0
        for ss in np.random.SeedSequence(11).spawn(200):
            rng = np.random.default_rng(ss)
            res = paired_bootstrap(1.0 + draw(rng), np.full(10, 1.0), n_boot=2000, level=0.95, rng=rng)
            hits += res.ci_diff[0] <= 0.3 <= res.ci_diff[1]
        assert hits >= least


def test_paired_bootstrap_fields_are_the_sample_statistics():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=30), rng.normal(size=30)
    res = paired_bootstrap(a, b, n_boot=500, level=0.9, rng=rng)
    assert res.mean_a == pytest.approx(a.mean()) and res.mean_b == pytest.approx(b.mean())
    assert res.diff_mean == pytest.approx((a - b).mean())
    assert res.share_below == pytest.approx((a < b).mean())
    for lo, hi, v in ((*res.ci_a, res.mean_a), (*res.ci_diff, res.diff_mean), (*res.ci_share, res.share_below)):
        assert lo <= v <= hi
    assert paired_bootstrap([1.0], [0.5], n_boot=10, level=0.9, rng=rng) is None


# --------------------------------------------------------------------------- nulls
def test_own_gaussian_has_the_sets_mean_and_covariance():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(30, 5)) @ rng.normal(size=(5, 5)) + 3.0
    Y = own_gaussian(X, 200_000, rng)
    assert np.allclose(Y.mean(0), X.mean(0), atol=0.05)
    assert np.allclose(np.cov(Y.T), np.cov(X.T), atol=0.1 * np.abs(np.cov(X.T)).max())


def test_moment_matched_covariance_keeps_the_trace_and_matches_the_unbiased_second_moment():
    rng = np.random.default_rng(5)
    n, d = 400, 60
    Sigma_sqrt = np.diag(np.linspace(0.3, 2.0, d))
    X = rng.normal(size=(n, d)) @ Sigma_sqrt
    C = X - X.mean(0)
    S = C.T @ C / (n - 1)
    est = moment_matched_covariance(C)
    assert np.trace(est) == pytest.approx(np.trace(S))
    tr, a = np.trace(S), np.sum(S * S)
    unbiased = (n - 1) ** 2 / ((n - 2) * (n + 1)) * (a - tr * tr / (n - 1))
    assert np.sum(est * est) == pytest.approx(unbiased, rel=1e-9)


def test_unbiased_second_moment_estimate_is_unbiased():
    # closed form: for Σ = diag(λ), tr Σ² = Σ λ²; the average of the estimate over 400 samples of
    # n = 20 points lies within 3 standard errors of it, while the plain tr S² is biased upward
    rng = np.random.default_rng(6)
    lam = np.linspace(0.5, 1.5, 15)
    truth = float((lam ** 2).sum())
    est, plain = [], []
    for _ in range(400):
        X = rng.normal(size=(20, 15)) * np.sqrt(lam)
        C = X - X.mean(0)
        S = C.T @ C / 19
        tr, a = np.trace(S), np.sum(S * S)
        est.append(19 ** 2 / (18 * 21) * (a - tr * tr / 19))
        plain.append(a)
    est = np.asarray(est)
    assert abs(est.mean() - truth) < 3 * est.std() / np.sqrt(est.size)
    assert np.mean(plain) > truth + 3 * np.std(plain) / np.sqrt(len(plain))


def test_population_gaussian_samples_have_the_fitted_moments():
    rng = np.random.default_rng(7)
    X = rng.normal(size=(3000, 8)) * np.arange(1, 9) + 1.0
    g = PopulationGaussian.fit(X, rng)
    Y = g.sample(100_000, rng)
    C = X - X.mean(0)
    assert np.allclose(Y.mean(0), X.mean(0), atol=0.06)
    assert np.allclose(np.cov(Y.T), moment_matched_covariance(C), atol=0.03 * 64)


def test_resample_pool_draws_distinct_rows_of_other_groups_by_weight():
    rng = np.random.default_rng(8)
    pts = np.repeat(rng.normal(size=(50, 3)), 2, axis=0)  # every row twice
    groups = (np.arange(100) // 2) % 5  # a row and its copy share a group
    pool = ResamplePool(pts, groups=groups)
    base = pts[0]
    for _ in range(20):
        out = pool.draw(base, 12, rng, exclude_group=0)
        assert out.shape == (12, 3) and np.array_equal(out[0], base)
        assert np.unique(out, axis=0).shape[0] == 12
        own = {r.tobytes() for r in pts[groups == 0]}
        assert not any(r.tobytes() in own for r in out[1:] if not np.array_equal(r, base))
    weights = np.zeros(100)
    weights[10:20] = 1.0
    wpool = ResamplePool(pts, weights=weights)
    allowed = {r.tobytes() for r in pts[10:20]}
    out = wpool.draw(pts[0], 5, rng)
    assert all(r.tobytes() in allowed for r in out[1:])
    with pytest.raises(NullError, match="distinct"):
        wpool.draw(pts[0], 8, rng)  # rows 10..19 hold 5 distinct points


# --------------------------------------------------------------------------- verdicts on known answers
def _tree_leaves(depth: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Leaves of a binary tree whose edges at level ℓ are random vectors of length ∝ 2^−ℓ: a
    hierarchical point set (a noisy tree metric)."""
    pts = [np.zeros(dim)]
    for level in range(depth):
        pts = [p + rng.normal(size=dim) * 0.5 ** level for p in pts for _ in range(2)]
    return np.asarray(pts)


def test_tree_metric_points_are_below_every_null():
    rng = np.random.default_rng(9)
    sets = [_tree_leaves(6, 128, rng) for _ in range(10)]
    stat = delta_vs_null(sets, n_boot=1000, seed=1)
    assert {c.null for c in stat.nulls} == {"own", "population", "resample"}
    assert all(c.verdict == "below" and c.diff_ci_high < 0 for c in stat.nulls)
    assert stat.verdict == "below"


def test_gaussian_data_is_within_every_null():
    # Gaussian data with more points than dimensions (so the own-covariance Gaussian is fair too),
    # 16 sets of 100 points, 30 seeded repeats: each null's false "below"/"above" rate stays near
    # the 5 % the test allows (≤ 4 of 30), and the conservative verdict is "within" in ≥ 28
    rejected = {"own": 0, "population": 0, "resample": 0}
    within = 0
    for ss in np.random.SeedSequence(99).spawn(30):
        rng = np.random.default_rng(ss)
        X = rng.normal(size=(1600, 12)) * np.linspace(0.5, 2, 12)
        stat = delta_vs_null(X, groups=np.repeat(np.arange(16), 100), n_boot=500, seed=ss)
        within += stat.verdict == "within"
        for c in stat.nulls:
            rejected[c.null] += c.verdict != "within"
    assert within >= 28
    assert all(v <= 4 for v in rejected.values()), rejected


def test_iid_gaussian_token_sets_in_high_dimension_are_not_called_tree_like():
    # an untrained model's prompts: sets of ~60 i.i.d. Gaussian rows of a 512-dimensional embedding
    # matrix. The own-covariance Gaussian (in the sets' 59-dimensional span) calls them tree-like;
    # the population and resampling nulls do not, so the conservative verdict is "within".
    rng = np.random.default_rng(13)
    emb = rng.normal(0, 0.02, size=(5000, 512))
    sets = [emb[rng.choice(5000, size=60, replace=False)] for _ in range(40)]
    stat = delta_vs_null(sets, population=emb, resample=ResamplePool(emb), n_boot=2000, seed=2)
    assert stat.null("own").verdict == "below"
    assert stat.null("population").verdict == "within"
    assert stat.null("resample").verdict == "within"
    assert stat.verdict == "within" and "disagree" in stat.verdict_reason


def test_headline_is_the_most_conservative_verdict():
    from geoprobe.profile import NullComparison

    def comp(kind, v):
        return NullComparison(null=kind, question="", values=[], mean=0.0, verdict=v)

    for sides in itertools.product(("below", "above", "within"), repeat=3):
        verdict, _ = headline([comp(k, v) for k, v in zip(("own", "population", "resample"), sides)])
        expected = sides[0] if len(set(sides)) == 1 else "within"
        assert verdict == expected


# --------------------------------------------------------------------------- seeds and corrections
def test_seeded_and_independent_draws():
    rng = np.random.default_rng(14)
    X = rng.normal(size=(800, 20))
    g = np.repeat(np.arange(8), 100)
    a = delta_vs_null(X, groups=g, n_boot=200, seed=5)
    b = delta_vs_null(X, groups=g, n_boot=200, seed=5)
    c = delta_vs_null(X, groups=g, n_boot=200, seed=6)
    assert a.to_dict() | {"seconds": 0} == b.to_dict() | {"seconds": 0}
    assert a.values == c.values  # the data's δ does not depend on the seed
    assert a.null("own").values != c.null("own").values
    # nulls of different kinds and sets never share a stream
    own, pop = a.null("own").values, a.null("population").values
    assert len(set(own)) == len(own) and not set(own) & set(pop)


def test_correct_across_adjusts_each_null_family():
    rng = np.random.default_rng(15)
    stats = []
    for i in range(4):
        X = rng.normal(size=(600, 10))
        stats.append(delta_vs_null(X, groups=np.repeat(np.arange(6), 100), n_boot=300, seed=i))
    out = correct_across(stats + [None], "holm")
    assert out[-1] is None
    for kind in ("own", "population", "resample"):
        raw = [s.null(kind).p_value for s in stats]
        assert [s.null(kind).p_adjusted for s in out[:-1]] == pytest.approx(adjust_p_values(raw, "holm"))
    assert all(s.correction == "Holm across 4 tests" for s in out[:-1])


def test_delta_vs_null_is_public_and_splits_one_cloud():
    rng = np.random.default_rng(16)
    X = rng.normal(size=(500, 6))
    stat = gp.delta_vs_null(X, n_sets=8, set_size=50, n_boot=200, seed=0)
    assert stat.n_sets == 8 and stat.n_points == 50 and stat.dim == 6
    assert [c.null for c in stat.nulls] == ["own", "population"]  # resampling one cloud is the data
    assert stat.ci_low <= stat.mean <= stat.ci_high
    assert stat.seed == 0 and stat.backend and stat.seconds > 0


def test_sets_are_deduplicated_before_delta():
    rng = np.random.default_rng(17)
    base = [rng.normal(size=(30, 8)) for _ in range(4)]
    doubled = [np.vstack([x, x[:10]]) for x in base]
    a = delta_vs_null(base, n_boot=100, seed=3, nulls=("own",))
    b = delta_vs_null(doubled, n_boot=100, seed=3, nulls=("own",))
    assert a.values == b.values and a.null("own").values == b.null("own").values
    assert np.array_equal(distinct_rows(doubled[0]), base[0])


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,match", [
    (dict(n_boot=1), "at least 2 resamples"),
    (dict(n_boot=10 ** 6), "100,000"),
    (dict(null_repeats=0), "null_repeats"),
    (dict(nulls=("own", "bogus")), "bogus"),
    (dict(level=1.5), "level"),
])
def test_bad_options_are_clear_value_errors(kwargs, match):
    X = np.random.default_rng(0).normal(size=(200, 4))
    with pytest.raises(ValueError, match=match):
        delta_vs_null(X, **kwargs)


def test_nulls_that_cannot_be_built_say_which_and_why():
    rng = np.random.default_rng(18)
    sets = [rng.normal(size=(40, 5)) for _ in range(3)]
    with pytest.raises(NullError, match="population null needs a population larger than each set"):
        delta_vs_null(sets, population=rng.normal(size=(30, 5)))
    with pytest.raises(NullError, match="resampling null needs"):
        delta_vs_null(sets, resample=ResamplePool(rng.normal(size=(20, 5))))
    with pytest.raises(InputDataError, match="at least 2 sets"):
        delta_vs_null([sets[0]])
    with pytest.raises(InputDataError, match="fewer than 4 distinct"):
        delta_vs_null([sets[0], np.ones((6, 5))])


@pytest.mark.parametrize("field,value,flag", [
    ("n_boot", 1, "--bootstrap"), ("n_boot", 10 ** 7, "--bootstrap"), ("null_repeats", 0, "--null-repeats"),
    ("layer_sets", 1, "--layer-sets"), ("token_repeats", 1, "--token-sets"), ("seed", -1, "--seed"),
    ("seed", 2 ** 64, "--seed"), ("level", 1.0, "--level"), ("correction", "x", "--correction"),
    ("id_boot", 1, "--id-bootstrap"),
])
def test_probe_settings_refuse_bad_values_naming_the_flag(field, value, flag):
    with pytest.raises(ProbeOptionError, match=flag):
        ProbeSettings(**{field: value})
