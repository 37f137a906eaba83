"""Intrinsic dimension (TwoNN, GRIDE), deduplication and the matmul kNN, against closed forms,
brute force and scikit-dimension."""
from __future__ import annotations

import importlib.util
import logging
import math
import warnings

import numpy as np
import pytest
import torch
from scipy import optimize, special
from scipy.spatial import cKDTree

from geoprobe.errors import InputDataError
from geoprobe.probes.intrinsic_dim import (deduplicate, duplicate_keys, gride_mle, gride_scales,
                                           intrinsic_dimension, shared_gride_scale,
                                           twonn_linear_fit, twonn_mle)
from geoprobe.backends import knn_certified as knn_module
from geoprobe.backends.knn_certified import as_float64_points, distances_at_ranks, knn_distances
from geoprobe.profile import IDResult


def peer():
    """scikit-dimension, the peer implementation (tests that need it skip without it)."""
    return pytest.importorskip("skdim")


DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else [])


def subspace(n: int, d: int, dim: int, seed: int) -> np.ndarray:
    """n Gaussian points on a random d-dimensional linear subspace of R^dim, shifted off the origin."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, d)))
    return rng.standard_normal((n, d)) @ basis.T + rng.standard_normal(dim)


def sphere(n: int, d: int, seed: int) -> np.ndarray:
    """n uniform points on the unit sphere S^d in R^(d+1)."""
    z = np.random.default_rng(seed).standard_normal((n, d + 1))
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def swiss_roll(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = 1.5 * np.pi * (1 + 2 * rng.uniform(size=n))
    return np.column_stack([t * np.cos(t), 21 * rng.uniform(size=n), t * np.sin(t)])


def brute_knn(x: np.ndarray, k: int) -> np.ndarray:
    t = torch.as_tensor(x, dtype=torch.float64)
    d = torch.cdist(t, t, compute_mode="donot_use_mm_for_euclid_dist")
    d.fill_diagonal_(math.inf)
    return torch.sort(d, dim=1).values[:, :k].numpy()


def skdim_quiet(est, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return est.fit(x)


# --------------------------------------------------------------------------- kNN
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,dim,k,chunk,offset", [(700, 40, 2, 97, 5.0), (400, 300, 9, None, 0.0),
                                                  (300, 3, 64, 64, 100.0), (60, 8, 50, 7, 0.0)])
def test_knn_matches_brute_force(device, n, dim, k, chunk, offset):
    rng = np.random.default_rng(n + dim)
    x = rng.standard_normal((n, dim)) * rng.uniform(0.5, 3.0, size=dim) + offset
    dist, idx = knn_distances(x, k, chunk=chunk, device=device)
    assert dist.device.type == device and dist.dtype == torch.float64 and idx.shape == (n, k)
    dist, idx = dist.cpu().numpy(), idx.cpu().numpy()
    ref = brute_knn(x, k)
    np.testing.assert_allclose(dist, ref, rtol=0, atol=1e-10)
    # the returned indices are at the returned distances, never the point itself
    direct = np.linalg.norm(x[idx] - x[:, None, :], axis=2)
    np.testing.assert_allclose(direct, dist, rtol=0, atol=1e-10)
    assert not np.any(idx == np.arange(n)[:, None])


def test_knn_matches_kdtree_and_float64_selection():
    x = np.random.default_rng(3).uniform(size=(3000, 4))
    tree_d, tree_i = cKDTree(x).query(x, k=6)
    for sel in (torch.float32, torch.float64):
        dist, idx = knn_distances(torch.from_numpy(x), 5, selection_dtype=sel)
        np.testing.assert_allclose(dist.numpy(), tree_d[:, 1:], rtol=0, atol=1e-10)
        np.testing.assert_array_equal(idx.numpy(), tree_i[:, 1:])


def test_knn_exact_on_ties_via_fallbacks(caplog):
    """A lattice has many exactly tied distances: the float32 selection cannot be verified there, so
    the float64 and direct fallbacks run and must still give the exact answer."""
    g = np.stack(np.meshgrid(*[np.arange(9.0)] * 3, indexing="ij"), -1).reshape(-1, 3)
    with caplog.at_level(logging.DEBUG, logger="geoprobe.backends.knn_certified"):
        dist, idx = knn_distances(g, 7)
    assert "direct differences" in caplog.text
    np.testing.assert_allclose(dist.numpy(), brute_knn(g, 7), rtol=0, atol=1e-12)
    # ties broken by the smaller index
    d, i = dist.numpy(), idx.numpy()
    same = d[:, 1:] == d[:, :-1]
    assert np.all(i[:, 1:][same] > i[:, :-1][same])


def test_knn_duplicates_and_tiny_offsets():
    """Float32 near-duplicates on a large offset: the expansion cancels catastrophically, the
    recomputed distances must not."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((500, 30)) + 1e4
    x = np.concatenate([x, x[:50] + 1e-9 * rng.standard_normal((50, 30)), x[:20]])
    dist, _ = knn_distances(x, 3)
    np.testing.assert_allclose(dist.numpy(), brute_knn(x, 3), rtol=1e-9, atol=1e-13)
    assert np.all(dist.numpy()[500:520, 0] < 1e-8) and np.all(dist.numpy()[550:, 0] == 0.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["gauss", "lattice", "near-duplicates"])
def test_distances_at_ranks_and_near_mask_match_brute_force(device, kind):
    rng = np.random.default_rng(21)
    if kind == "gauss":
        x = rng.standard_normal((700, 24)) @ rng.standard_normal((24, 64)) + 3.0
    elif kind == "lattice":  # exact ties everywhere: the certificates fail, the fallbacks answer
        x = np.stack(np.meshgrid(*[np.arange(8.0)] * 3, indexing="ij"), -1).reshape(-1, 3)
    else:
        base = rng.standard_normal((600, 10))
        x = np.concatenate([base, base[:30] + 1e-10, base[30:40] + 1e-4])
        x = x[rng.permutation(len(x))]
    ranks = [1, 2, 3, 4, 6, 8, 12, 16, 32, 64]
    t = as_float64_points(x, device)
    tau = 1e-6
    got, near = distances_at_ranks(t, ranks, tau=tau, chunk=128)
    tx = torch.from_numpy(x)
    full = torch.cdist(tx, tx, compute_mode="donot_use_mm_for_euclid_dist").numpy()
    np.fill_diagonal(full, np.inf)
    ref = np.sort(full, axis=1)[:, np.array(ranks) - 1]
    np.testing.assert_allclose(got.cpu().numpy(), ref, rtol=1e-12, atol=1e-12)
    earlier = np.array([np.any(full[i, :i] <= tau) for i in range(len(x))])
    np.testing.assert_array_equal(near.cpu().numpy(), earlier)


def test_float32_error_bound_holds():
    """The bound the certificates rest on, |d̃² − d²| ≤ c (n_i + n_j)², against float64 distances,
    on data whose float32 expansion cancels badly (large common offset, tiny spread)."""
    rng = np.random.default_rng(22)
    for x in (rng.standard_normal((800, 300)) * 1e-3 + 50.0,
              rng.standard_normal((800, 7)) * np.logspace(-3, 3, 7)):
        t = torch.from_numpy(x)
        sel = knn_module._select(t, 20, 100, torch.float32)
        cand = sel.cand.numpy()
        exact = np.linalg.norm(x[cand] - x[:, None, :], axis=2) / sel.radius
        err = np.abs(sel.approx.numpy() - exact ** 2)
        sn = sel.snorm.numpy()
        bound = sel.c * (sn[:, None] + sn[cand]) ** 2 + sel.tiny
        assert np.all(err <= bound)
        assert err.max() > 0  # the expansion is not exact: the check is not vacuous


def test_knn_bad_input():
    with pytest.raises(InputDataError, match="k must be"):
        knn_distances(np.zeros((5, 2)), 5)
    with pytest.raises(InputDataError, match="NaN or inf"):
        knn_distances(np.array([[0.0, 1.0], [np.inf, 0.0], [1.0, 1.0]]), 1)


# --------------------------------------------------------------------------- estimators on ratios
def test_twonn_mle_unbiased_and_error_matches_monte_carlo():
    rng = np.random.default_rng(5)
    d, n, reps = 7.0, 400, 2000
    est = np.array([twonn_mle(rng.uniform(size=n) ** (-1.0 / d)) for _ in range(reps)])
    # closed form: E d̂ = d, sd d̂ = d / sqrt(N − 2)
    assert abs(est[:, 0].mean() - d) < 4 * d / math.sqrt(n - 2) / math.sqrt(reps)
    assert est[:, 0].std() == pytest.approx(d / math.sqrt(n - 2), rel=0.06)
    assert est[:, 1].mean() == pytest.approx(est[:, 0].std(), rel=0.06)


@pytest.mark.parametrize("n1,d", [(1, 3.0), (2, 6.0), (4, 12.0), (16, 4.0)])
def test_gride_mle_recovers_dimension_from_exact_law(n1, d):
    """μ^d = v_n2/v_n1 for Poisson-process volumes v: μ = (1 + G2/G1)^(1/d) with G1 ~ Gamma(n1),
    G2 ~ Gamma(n2 − n1). The MLE must be consistent and its Fisher error must match its spread."""
    rng = np.random.default_rng(n1)
    n2, n, reps = 2 * n1, 500, 300
    est = []
    for _ in range(reps):
        mu = (1 + rng.gamma(n2 - n1, size=n) / rng.gamma(n1, size=n)) ** (1 / d)
        est.append(gride_mle(mu, n1, n2))
    est = np.array(est)
    assert abs(est[:, 0].mean() - d) < 0.02 * d
    assert est[:, 1].mean() == pytest.approx(est[:, 0].std(), rel=0.15)


@pytest.mark.parametrize("n1", [2, 8])
def test_gride_mle_maximises_the_likelihood(n1):
    """Independent oracle: maximise the log-likelihood written from the density directly."""
    rng = np.random.default_rng(11)
    n2, d, n = 2 * n1, 5.0, 800
    mu = (1 + rng.gamma(n2 - n1, size=n) / rng.gamma(n1, size=n)) ** (1 / d)

    def nll(t):
        return -((n - 1) * np.log(t) + np.sum((n2 - n1 - 1) * np.log(mu ** t - 1)
                                              - ((n2 - 1) * t + 1) * np.log(mu))
                 - n * special.betaln(n2 - n1, n1))

    ref = optimize.minimize_scalar(nll, bounds=(0.5, 50), method="bounded",
                                   options={"xatol": 1e-10}).x
    got, err = gride_mle(mu, n1, n2)
    assert got == pytest.approx(ref, rel=1e-7)
    h = 1e-4 * got  # observed information = second derivative of the negative log-likelihood
    info = (nll(got + h) - 2 * nll(got) + nll(got - h)) / h ** 2
    assert err == pytest.approx(1 / math.sqrt(info), rel=1e-4)


def test_linear_fit_on_exact_quantiles():
    """μ at the exact Pareto quantiles F⁻¹(i/(N+1)) lies on the line −log(1 − F) = d log μ up to the
    empirical-CDF offset; a rescaled copy of the same ratios must scale the slope inversely."""
    n, d = 5000, 4.0
    mu = (1 - np.arange(1, n + 1) / (n + 1)) ** (-1 / d)
    assert twonn_linear_fit(mu, 0.1) == pytest.approx(d, rel=2e-3)
    assert twonn_linear_fit(mu ** 2, 0.1) == pytest.approx(twonn_linear_fit(mu, 0.1) / 2, rel=1e-12)
    assert math.isfinite(twonn_linear_fit(mu, 0.0))  # the last ratio (F = 1) is left out


# --------------------------------------------------------------------------- against the truth
@pytest.mark.parametrize("d", [2, 5, 10])
def test_subspace_dimension(d):
    x = subspace(2500, d, 40, seed=d)
    r = intrinsic_dimension(x)
    assert isinstance(r, IDResult) and r.estimator == "twonn" and r.n_points == 2500
    assert r.n_duplicates_removed == 0
    assert abs(r.dimension - d) < 0.08 * d and abs(r.mle_dimension - d) < 0.08 * d
    assert r.dimension == r.linear_fit_dimension
    assert r.error == pytest.approx(r.dimension / math.sqrt(2500 - 2))  # d_lin/sqrt(N − 2)
    assert (r.ci_low, r.ci_high, r.n_boot, r.n_groups) == (None, None, 0, 0)
    g = intrinsic_dimension(x, estimator="gride")
    assert abs(g.dimension - d) < 0.08 * d
    assert [s.n1 for s in g.scales] == [1, 2, 4, 8, 16, 32]


def test_sphere_and_swiss_roll():
    s = intrinsic_dimension(sphere(3000, 2, seed=1))
    assert abs(s.dimension - 2) < 0.12 and abs(s.mle_dimension - 2) < 0.12
    r = intrinsic_dimension(swiss_roll(3000, seed=2))
    assert abs(r.dimension - 2) < 0.15
    g = intrinsic_dimension(swiss_roll(3000, seed=2), estimator="gride")
    assert abs(g.dimension - 2) < 0.15


# --------------------------------------------------------------------------- against scikit-dimension
@pytest.mark.parametrize("make", [lambda: subspace(1500, 5, 30, seed=7),
                                  lambda: subspace(1500, 10, 60, seed=8),
                                  lambda: sphere(2000, 2, seed=9),
                                  lambda: swiss_roll(2000, seed=10)])
def test_twonn_matches_scikit_dimension(make):
    x = make()
    ours = intrinsic_dimension(x)
    lin = skdim_quiet(peer().id.TwoNN(), x).dimension_  # default: line fit, 10 % discarded
    mle = skdim_quiet(peer().id.TwoNN(method="mle", discard_fraction=0.0), x).dimension_
    assert ours.dimension == ours.linear_fit_dimension == pytest.approx(lin, rel=1e-9)
    assert ours.mle_dimension == pytest.approx(mle, rel=1e-9)
    assert intrinsic_dimension(x, discard_fraction=0.25).dimension == pytest.approx(
        skdim_quiet(peer().id.TwoNN(discard_fraction=0.25), x).dimension_, rel=1e-9)


def test_gride_matches_scikit_dimension_and_reduces_to_twonn():
    x = subspace(2000, 6, 30, seed=12)
    ours = intrinsic_dimension(x, estimator="gride")
    ref = skdim_quiet(peer().id.GRIDE(multiscale=True, range_max=64), x)
    assert [s.n1 for s in ours.scales] == list(ref.scales_)
    np.testing.assert_allclose([s.dimension for s in ours.scales], ref.dimension_scales_, rtol=1e-8)
    # n1 = 1 is the TwoNN MLE, with the Fisher error d/sqrt(N − 1)
    tw = intrinsic_dimension(x)
    s1 = ours.scales[0]
    assert (s1.n1, s1.n2) == (1, 2)
    assert s1.dimension == pytest.approx(tw.mle_dimension, rel=1e-12)
    assert s1.error == pytest.approx(s1.dimension / math.sqrt(2000 - 1), rel=1e-12)
    one = intrinsic_dimension(x, estimator="gride", scales=[1])
    assert one.dimension == pytest.approx(tw.mle_dimension, rel=1e-12) and len(one.scales) == 1
    assert one.scale_n1 == 1 and "only scale" in one.scale_rule


def test_gride_scale_rule():
    assert gride_scales(10_000) == [1, 2, 4, 8, 16, 32]
    assert gride_scales(10_000, n1_max=4) == [1, 2, 4]
    assert gride_scales(100) == [1, 2, 4]  # n2 = 2·n1 ≤ N/10
    assert gride_scales(10) == [1]
    r = intrinsic_dimension(subspace(300, 3, 10, seed=13), estimator="gride", n1_max=8)
    assert [s.n1 for s in r.scales] == [1, 2, 4, 8][: len(gride_scales(300, 8))]
    at = {s.n1: s for s in r.scales}
    assert (r.dimension, r.error) == (at[r.scale_n1].dimension, at[r.scale_n1].error)
    assert (r.scale_n1, r.scale_rule) == shared_gride_scale([r])


# --------------------------------------------------------------------------- duplicates
def _with_duplicates(x: np.ndarray, seed: int) -> tuple[np.ndarray, int]:
    """27 % of the rows exact copies, plus float32 round-trips of other rows, shuffled."""
    rng = np.random.default_rng(seed)
    n = len(x)
    n_exact = int(round(0.27 * n / 0.73))
    exact = x[rng.integers(0, n, n_exact)]
    near = x[rng.choice(n, 150, replace=False)].astype(np.float32).astype(np.float64)
    out = np.concatenate([x, exact, near])
    return out[rng.permutation(len(out))], n_exact + 150


@pytest.mark.parametrize("device", DEVICES)
def test_duplicates_are_removed(device):
    x = subspace(2000, 10, 50, seed=14)
    xd, n_dup = _with_duplicates(x, seed=15)
    assert (n_dup - 150) / (len(xd) - 150) == pytest.approx(0.27, abs=0.002)
    if importlib.util.find_spec("skdim") is not None:
        naive = skdim_quiet(peer().id.TwoNN(), xd).dimension_
        assert naive < 1.0  # the failure this guards against
    clean = intrinsic_dimension(x)
    ours = intrinsic_dimension(torch.from_numpy(xd).to(device))
    assert ours.backend == device
    assert ours.n_duplicates_removed == n_dup and ours.n_points == 2000
    # the survivors are the clean points (a float32 copy may stand in for its original)
    assert ours.dimension == pytest.approx(clean.dimension, rel=1e-6)
    assert abs(ours.dimension - 10) < 1.0
    g = intrinsic_dimension(xd, estimator="gride")
    assert g.n_duplicates_removed == n_dup and abs(g.dimension - 10) < 1.0
    # exact-only deduplication leaves the float32 copies, which wreck the estimate
    exact_only = intrinsic_dimension(xd, dedup_tol=0)
    assert exact_only.n_duplicates_removed == n_dup - 150 and exact_only.dimension < 2.0
    with pytest.raises(InputDataError, match="dedup_tol"):
        intrinsic_dimension(xd, dedup_tol=None)


def test_deduplicate_matches_definition():
    """Brute-force oracle of the rule: drop i when some j < i is within tol × RMS spread."""
    rng = np.random.default_rng(16)
    base = rng.standard_normal((300, 6))
    cluster = base[7] + 1e-9 * rng.standard_normal((12, 6))  # more near copies than neighbours
    x = np.concatenate([base, cluster, base[:40], base[40:60] + 1e-4])
    x = x[rng.permutation(len(x))]
    tol = 1e-6
    uniq = np.unique(x, axis=0)
    scale = math.sqrt(np.mean(np.sum((uniq - uniq.mean(0)) ** 2, axis=1)))
    full = np.linalg.norm(x[:, None, :] - x[None, :, :], axis=2)
    keep = [i for i in range(len(x)) if not np.any(full[i, :i] <= tol * scale)]
    got, removed = deduplicate(x, tol)
    assert isinstance(got, np.ndarray) and removed == len(x) - len(keep) == 12 + 40
    np.testing.assert_array_equal(got, x[keep])
    got_t, removed_t = deduplicate(torch.from_numpy(x), tol)
    assert isinstance(got_t, torch.Tensor) and removed_t == removed
    # a coarser tolerance also merges the 1e-3 copies
    assert deduplicate(x, 1e-3)[1] == removed + 20


def test_duplicate_keys_group_equal_rows():
    x = np.array([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0 + 1e-12], [3.0, 4.0]])
    k = duplicate_keys(x)
    assert k[0] == k[2] and k[1] == k[3] and k[0] != k[1]


def test_duplicate_keys_follow_the_deduplicate_rule():
    """Brute-force oracle: a kept row gets a new label, a removed row the label of the first earlier
    row within tol × RMS spread; as many labels as rows kept by deduplicate."""
    rng = np.random.default_rng(17)
    base = rng.standard_normal((80, 5))
    x = np.concatenate([base, base[:15], base[15:25] + 1e-9, base[25:30] + 1e-4])
    x = x[rng.permutation(len(x))]
    tol = 1e-6
    uniq = np.unique(x, axis=0)
    scale = math.sqrt(np.mean(np.sum((uniq - uniq.mean(0)) ** 2, axis=1)))
    full = np.linalg.norm(x[:, None, :] - x[None, :, :], axis=2)
    want, fresh = np.empty(len(x), dtype=np.int64), 0
    for i in range(len(x)):
        near = np.flatnonzero(full[i, :i] <= tol * scale)
        if near.size:
            want[i] = want[near[0]]
        else:
            want[i], fresh = fresh, fresh + 1
    got = duplicate_keys(x, tol)
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(got)) == len(x) - deduplicate(x, tol)[1] == 80 + 5
    np.testing.assert_array_equal(duplicate_keys(torch.from_numpy(x), tol), want)


# --------------------------------------------------------------------------- determinism, bad input
def test_deterministic_and_permutation_invariant():
    x = subspace(1500, 4, 25, seed=17)
    a = intrinsic_dimension(x, estimator="gride")
    b = intrinsic_dimension(x.copy(), estimator="gride")
    assert a.to_dict() | {"seconds": 0} == b.to_dict() | {"seconds": 0}
    perm = np.random.default_rng(18).permutation(len(x))
    c = intrinsic_dimension(x[perm])
    d = intrinsic_dimension(x)
    assert c.dimension == pytest.approx(d.dimension, rel=1e-12)
    assert IDResult.from_dict(a.to_dict()) == a


@pytest.mark.parametrize("x,match", [
    (np.array([[0.0, 1.0], [np.nan, 2.0], [1.0, 1.0], [2.0, 3.0]]), "NaN or inf"),
    (np.array([[0.0, 1.0], [np.inf, 2.0], [1.0, 1.0], [2.0, 3.0]]), "NaN or inf"),
    (np.ones((50, 4)), "identical"),
    (np.array([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]), "only 2 distinct"),
    (np.zeros((2, 3)) + np.arange(2)[:, None], "only 2 distinct"),
    (np.arange(10.0), "2-D"),
    (np.array([["a", "b"], ["c", "d"]]), "numbers"),
])
def test_bad_input(x, match):
    with pytest.raises(InputDataError, match=match):
        intrinsic_dimension(x)


def test_bad_options():
    x = subspace(200, 3, 8, seed=19)
    with pytest.raises(InputDataError, match="estimator"):
        intrinsic_dimension(x, estimator="mle")
    with pytest.raises(InputDataError, match="dedup_tol"):
        intrinsic_dimension(x, dedup_tol=-1.0)
    with pytest.raises(InputDataError, match="discard_fraction"):
        intrinsic_dimension(x, discard_fraction=1.0)
    with pytest.raises(InputDataError, match="n2 \\+ 1"):
        intrinsic_dimension(x, estimator="gride", scales=[128])
    with pytest.raises(InputDataError, match="n1_max"):
        intrinsic_dimension(x, estimator="gride", n1_max=0)
    with pytest.raises(InputDataError, match="scales"):
        intrinsic_dimension(x, estimator="gride", scales=[0, 1])


@pytest.mark.parametrize("n1", [50, 64, 1000])
def test_gride_scale_beyond_the_points_names_n1_and_n(n1):
    """A scale n1 ≥ N has no neighbours of that rank: a clear InputDataError (also a ValueError)
    naming n1 and N, not an error from deep inside the neighbour search."""
    x = subspace(50, 3, 8, seed=23)
    with pytest.raises(InputDataError, match=rf"n1={n1}.*50 points") as info:
        intrinsic_dimension(x, estimator="gride", scales=[n1])
    assert isinstance(info.value, ValueError)
    with pytest.raises(InputDataError, match=rf"n1={n1}.*50 points"):
        intrinsic_dimension(x, estimator="gride", scales=[1, n1])
