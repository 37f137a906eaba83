"""Tests of geoprobe.probes.frequency against closed forms, mpmath and the ``powerlaw`` package."""
from __future__ import annotations

import collections
import functools
import math
import warnings

import mpmath
import numpy as np
import pytest
from scipy.special import zeta

import powerlaw
from geoprobe.errors import InputDataError
from geoprobe.probes.frequency import (discrete_mle, discrete_standard_error, fit_power_law,
                                       frequency_table, ks_distance, scan_xmin)
from geoprobe.profile import PowerLawResult

N_TYPES = 50_000
N_TOKENS = 2_000_000


def zipf_counts(s: float, seed: int) -> np.ndarray:
    """A 2M-token stream over 50k types with rank probabilities ∝ r^(−s), as per-type counts."""
    r = np.arange(1, N_TYPES + 1, dtype=np.float64)
    p = r ** -s
    p /= p.sum()
    return np.random.default_rng(seed).multinomial(N_TOKENS, p)


@functools.lru_cache(maxsize=8)
def _ccdf_table(gamma: float, xmin: int, kmax: int) -> np.ndarray:
    k = np.arange(xmin, kmax + 1, dtype=np.float64)
    return zeta(gamma, k + 1) / zeta(gamma, xmin)      # P(X > k)


def discrete_power_law_sample(gamma: float, xmin: int, n: int, seed: int,
                              kmax: int = 2_000_000) -> np.ndarray:
    """Inverse-transform sampling of P(k) = k^(−γ)/ζ(γ, xmin), k ≥ xmin (mass above kmax ≈ 0)."""
    ccdf_next = _ccdf_table(gamma, xmin, kmax)
    u = np.random.default_rng(seed).random(n)
    # smallest k with P(X > k) < u
    idx = np.searchsorted(-ccdf_next, -u, side="right")
    return (xmin + idx).astype(np.int64)


def quiet_fit(data, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return powerlaw.Fit(np.asarray(data, dtype=float), discrete=True, verbose=0, **kw)


def powerlaw_dist(gamma: float, xmin: int) -> powerlaw.Power_Law:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return powerlaw.Power_Law(xmin=xmin, discrete=True, parameters=[gamma], verbose=0)


def mpmath_mle(values, mult, xmin) -> float:
    """Exact MLE from the score equation mean(log k) = −ζ'(γ, xmin)/ζ(γ, xmin), in 30-digit mpmath."""
    v = np.asarray(values)
    m = np.asarray(mult)
    sel = v >= xmin
    mean_log = mpmath.mpf(float(np.dot(m[sel], np.log(v[sel])))) / int(m[sel].sum())
    with mpmath.workdps(30):
        def score(g):
            return mean_log + mpmath.zeta(g, xmin, 1) / mpmath.zeta(g, xmin)
        start = 1 + 1 / float(mean_log - math.log(xmin - 0.5))   # Clauset eq. 3.7 as a start
        return float(mpmath.findroot(score, start))


# --------------------------------------------------------------------------- oracle: Zipf streams
@pytest.mark.parametrize("s, expected", [(1.0, 2.00), (1.1, 1.91), (1.25, 1.80)])
def test_zipf_stream_gamma(s, expected):
    c = zipf_counts(s, seed=12345)
    res = fit_power_law(c)
    assert res.gamma == pytest.approx(expected, abs=0.05)
    assert res.zipf_exponent == pytest.approx(1.0 / (res.gamma - 1.0), rel=1e-12)
    # bookkeeping against direct counts
    assert res.n_types == int(np.sum(c > 0))
    assert res.n_tokens == N_TOKENS == int(c.sum())
    assert res.n_tail_types == int(np.sum(c >= res.xmin))
    table = collections.Counter(int(k) for k in c if k > 0)
    assert res.count_values == sorted(table)
    assert res.count_multiplicities == [table[k] for k in sorted(table)]
    assert 1 <= res.xmin <= 50
    # The lognormal does not converge on these Zipf tails; powerlaw itself flags it.
    fit = quiet_fit(c[c > 0], xmin=res.xmin, estimate_discrete=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ln = fit.lognormal
    assert res.lognormal_converged == (not ln.noise_flag)
    if not res.lognormal_converged:
        assert res.lognormal_loglikelihood_ratio is None and res.lognormal_p is None


@pytest.mark.parametrize("s", [1.0, 1.25])
def test_matches_powerlaw_at_same_xmin(s):
    c = zipf_counts(s, seed=7)
    res = fit_power_law(c, compare_lognormal=False)
    pos = c[c > 0]
    tail = pos[pos >= res.xmin].astype(float)
    fit = quiet_fit(pos, xmin=res.xmin, estimate_discrete=False)
    alpha_pl = fit.power_law.alpha
    # powerlaw maximises the same likelihood with Nelder–Mead at tol=1e-4
    assert res.gamma == pytest.approx(alpha_pl, abs=2e-4)
    # ... and ours is the exact maximum: its likelihood, computed by powerlaw, is not lower
    ll_ours = powerlaw_dist(res.gamma, res.xmin).loglikelihoods(tail).sum()
    ll_pl = powerlaw_dist(alpha_pl, res.xmin).loglikelihoods(tail).sum()
    assert ll_ours >= ll_pl - 1e-9
    # KS: powerlaw's D at its own γ equals ours at that γ, and powerlaw's D at our γ equals ours
    values, mult = frequency_table(c)
    assert ks_distance(values, mult, res.xmin, alpha_pl) == pytest.approx(fit.power_law.D, abs=1e-12)
    d = powerlaw_dist(res.gamma, res.xmin)
    d.compute_distance_metrics(tail)
    assert res.ks_distance == pytest.approx(d.D, abs=1e-12)
    # and it is the root of the score equation, solved independently in mpmath
    assert abs(res.gamma - mpmath_mle(values, mult, res.xmin)) < 1e-6


def test_mle_matches_mpmath_score_equation():
    c = zipf_counts(1.1, seed=3)
    values, mult = frequency_table(c)
    for xmin in (1, 2, 5, 17, 40):
        assert discrete_mle(values, mult, xmin) == pytest.approx(mpmath_mle(values, mult, xmin),
                                                                 abs=1e-6)


def test_xmin_search_agrees_with_powerlaw_search():
    c = zipf_counts(1.0, seed=12345)
    values, mult = frequency_table(c)
    scan = scan_xmin(values, mult, (1, 50))
    res = fit_power_law(c, compare_lognormal=False)
    assert res.xmin == int(scan.xmins[np.nanargmin(scan.ks)])
    assert res.ks_distance == pytest.approx(np.nanmin(scan.ks), abs=0)
    fit = quiet_fit(c[c > 0], xmin=(1, 50), estimate_discrete=False)
    pl = fit.xmin_fitting_results
    common, ia, ib = np.intersect1d(scan.xmins, pl["xmins"].astype(np.int64), return_indices=True)
    assert common.size >= 40
    # the whole curve γ(xmin), D(xmin) agrees to the precision of powerlaw's optimiser
    np.testing.assert_allclose(scan.gammas[ia], pl["alphas"][ib], atol=2e-4)
    np.testing.assert_allclose(scan.ks[ia], pl["distances"][ib], atol=2e-4)
    # each search's choice is optimal, within that precision, on the other's curve
    ours_at_pl = scan.ks[np.searchsorted(scan.xmins, int(fit.xmin))]
    assert ours_at_pl <= res.ks_distance + 2e-4
    pl_at_ours = pl["distances"][np.searchsorted(pl["xmins"], res.xmin)]
    assert pl_at_ours <= np.min(pl["distances"][pl["valid_fits"]]) + 2e-4


# --------------------------------------------------------------------------- oracle: known γ
def test_recovers_known_gamma_with_xmin_one():
    data = discrete_power_law_sample(2.5, 1, 20_000, seed=11)
    res = fit_power_law(data, xmin=1)
    assert res.xmin == 1
    assert abs(res.gamma - 2.5) < 3 * res.error
    assert res.n_tail_types == 20_000


def test_standard_error_is_the_spread_of_the_estimate():
    gammas, errs = [], []
    for seed in range(60):
        data = discrete_power_law_sample(2.2, 1, 3_000, seed=100 + seed, kmax=500_000)
        r = fit_power_law(data, xmin=1, compare_lognormal=False)
        gammas.append(r.gamma)
        errs.append(r.error)
    sd = float(np.std(gammas, ddof=1))
    assert np.mean(errs) == pytest.approx(sd, rel=0.25)
    assert np.mean(gammas) == pytest.approx(2.2, abs=3 * sd / math.sqrt(len(gammas)))


def test_standard_error_matches_fisher_information_in_mpmath():
    for gamma, xmin, n in ((1.37, 1, 1000), (2.0, 30, 5000), (2.8, 4, 123)):
        with mpmath.workdps(30):
            z = mpmath.zeta(gamma, xmin)
            z1 = mpmath.zeta(gamma, xmin, 1)
            z2 = mpmath.zeta(gamma, xmin, 2)
            exact = float(1 / mpmath.sqrt(n * (z2 / z - (z1 / z) ** 2)))
        assert discrete_standard_error(gamma, xmin, n) == pytest.approx(exact, rel=1e-5)
    # large xmin: the discrete and continuous (Clauset eq. 3.2) errors agree
    assert discrete_standard_error(2.0, 200, 5000) == pytest.approx(1.0 / math.sqrt(5000), rel=0.01)


def test_finds_xmin_of_a_power_law_tail_behind_a_flat_head():
    rng = np.random.default_rng(5)
    tail = discrete_power_law_sample(2.3, 10, 8_000, seed=21)
    head = rng.integers(1, 10, size=6_000)          # counts 1..9, flat: not a power law
    res = fit_power_law(np.concatenate([head, tail]), compare_lognormal=False)
    assert 8 <= res.xmin <= 14
    assert abs(res.gamma - 2.3) < 4 * res.error


def test_lognormal_comparison_on_lognormal_data():
    rng = np.random.default_rng(2)
    data = np.round(np.exp(rng.normal(2.0, 1.0, size=20_000))).astype(np.int64)
    res = fit_power_law(data, xmin=1)
    assert res.lognormal_converged
    assert res.lognormal_loglikelihood_ratio < 0 and res.lognormal_p < 0.01
    fit = quiet_fit(data[data > 0], xmin=1, estimate_discrete=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        R, p = fit.distribution_compare("power_law", "lognormal")
    # powerlaw's own comparison uses its Nelder–Mead γ; the ratio moves by O(n·Δγ²)
    assert res.lognormal_loglikelihood_ratio == pytest.approx(R, rel=1e-4, abs=1e-2)
    assert res.lognormal_p == pytest.approx(p, rel=1e-3, abs=1e-12)


def test_lognormal_off():
    res = fit_power_law(zipf_counts(1.0, seed=1), compare_lognormal=False)
    assert not res.lognormal_converged
    assert res.lognormal_loglikelihood_ratio is None and res.lognormal_p is None


# --------------------------------------------------------------------------- invariances and records
def test_zeros_and_order_do_not_matter():
    c = zipf_counts(1.1, seed=4)[:20_000]
    a = fit_power_law(c, compare_lognormal=False)
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(np.concatenate([c, np.zeros(5_000, dtype=np.int64)]))
    b = fit_power_law(shuffled.astype(np.float64), compare_lognormal=False)
    assert (a.gamma, a.xmin, a.ks_distance, a.n_types, a.n_tokens) == \
        (b.gamma, b.xmin, b.ks_distance, b.n_types, b.n_tokens)


def test_fixed_xmin_is_used_and_matches_scan():
    c = zipf_counts(1.25, seed=9)
    values, mult = frequency_table(c)
    scan = scan_xmin(values, mult, (1, 50))
    for x in (3, 12):
        r = fit_power_law(c, xmin=x, compare_lognormal=False)
        i = int(np.searchsorted(scan.xmins, x))
        assert r.xmin == x and scan.xmins[i] == x
        assert r.gamma == scan.gammas[i] and r.ks_distance == scan.ks[i]


def test_result_round_trips_through_dict():
    res = fit_power_law(zipf_counts(1.0, seed=2))
    again = PowerLawResult.from_dict(res.to_dict())
    assert again == res


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [
    [],
    [0, 0, 0],
    [3, -1, 4],
    [1.5, 2, 3],
    [1.0, float("nan"), 3.0],
    [1.0, float("inf"), 3.0],
    np.ones((3, 3), dtype=int),
    ["a", "b"],
    [5, 5, 5, 0],                 # one distinct value
    [1, 2, 1, 2, 1],              # too few types for any tail
])
def test_bad_counts_raise(bad):
    with pytest.raises(InputDataError):
        fit_power_law(bad)


def test_bad_xmin_raises():
    c = zipf_counts(1.0, seed=0)
    for xmin in (0, 2.5, -3, "ten", float("nan")):
        with pytest.raises(InputDataError):
            fit_power_law(c, xmin=xmin)
    with pytest.raises(InputDataError, match="lower xmin"):
        fit_power_law(c, xmin=int(c.max()))
    with pytest.raises(InputDataError):
        fit_power_law(c, xmin_range=(10, 2))
    with pytest.raises(InputDataError, match="xmin_range"):
        fit_power_law(c, xmin_range=(10**9, 10**10))


def test_error_is_the_one_name_of_gammas_standard_error():
    counts = np.random.default_rng(3).zipf(2.2, size=20_000)
    res = fit_power_law(np.bincount(counts))
    assert res.error == res.gamma_err == pytest.approx(discrete_standard_error(res.gamma, res.xmin, res.n_tail_types))
    assert "error" in res.to_dict() and "gamma_err" not in res.to_dict()
