"""Block bootstrap of TwoNN/GRIDE and the shared GRIDE scale: replicates against brute-force
recomputation on the resampled ratios, coverage on a flat torus, groups carried through
deduplication, the CPU/batched paths, and the scale rule against a brute-force reading of the curves."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from geoprobe.errors import InputDataError
from geoprobe.probes import id_bootstrap as ib
from geoprobe.probes.intrinsic_dim import (_layers_batched, _Options, at_scale, at_shared_scale,
                                           gride_bootstrap, gride_mle, intrinsic_dimension,
                                           intrinsic_dimension_layers, shared_gride_scale,
                                           twonn_bootstrap, twonn_linear_fit, twonn_mle)
from geoprobe.profile import IDResult, IDScale


def torus(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """Uniform points on the flat k-torus in R^2k: (cos θ1, sin θ1, …, cos θk, sin θk)."""
    th = rng.uniform(0.0, 2.0 * np.pi, (n, k))
    return np.concatenate([np.cos(th), np.sin(th)], axis=1)


def _bare(r):
    return None if r is None else dataclasses.replace(r, seconds=0.0)


# --------------------------------------------------------------------------- replicates, brute force
def test_weighted_twonn_equals_estimators_on_repeated_ratios():
    rng = np.random.default_rng(1)
    mu = np.exp(rng.exponential(1 / 4.0, 300))
    mu[:5] = 1.0  # ties at 1 are allowed in TwoNN
    x = np.log(mu)
    order = np.argsort(x, kind="stable")
    w = rng.integers(0, 4, size=(40, mu.size)).astype(np.float64)
    got = ib._twonn_stats(x[order], 0.1)(w[:, order])
    for b in range(w.shape[0]):
        rep = np.repeat(mu, w[b].astype(int))
        assert got[b, 0] == pytest.approx(twonn_linear_fit(rep, 0.1), rel=1e-10)
        assert got[b, 1] == pytest.approx(twonn_mle(rep)[0], rel=1e-12)


@pytest.mark.parametrize("n1", [1, 2, 8])
def test_weighted_gride_equals_gride_mle_on_repeated_ratios(n1):
    rng = np.random.default_rng(n1)
    n2 = 2 * n1
    mu = (1 + rng.gamma(n2 - n1, size=250) / rng.gamma(n1, size=250)) ** (1 / 5.0)
    w = rng.integers(0, 3, size=(20, mu.size)).astype(np.float64)
    got = ib._gride_solve(w, np.log(mu), n1, n2, gride_mle(mu, n1, n2)[0])
    for b in range(w.shape[0]):
        assert got[b] == pytest.approx(gride_mle(np.repeat(mu, w[b].astype(int)), n1, n2)[0], rel=1e-10)


def test_draws_resample_whole_groups_and_pair_across_point_sets():
    codes = np.repeat(np.arange(7), [3, 1, 5, 2, 2, 4, 3])
    g = ib.Groups(codes, 7)
    w = np.concatenate(list(ib._weights(g, 500, np.random.default_rng(3))))
    assert w.shape == (500, codes.size)
    for b in range(500):  # every point weighs its group's draw count; G groups drawn in all
        counts = np.array([w[b, codes == c][0] for c in range(7)])
        assert np.all(w[b] == counts[codes]) and counts.sum() == 7
    # the same seed and number of groups give the same draws for a different set of points
    other = ib.Groups(np.array([6, 0, 0, 3]), 7)
    w2 = np.concatenate(list(ib._weights(other, 500, np.random.default_rng(3))))
    np.testing.assert_array_equal(w2, w[:, [np.flatnonzero(codes == c)[0] for c in (6, 0, 0, 3)]])
    # the mean draw count of a group is 1
    assert w.mean() == pytest.approx(1.0, abs=0.05)


def test_bootstrap_functions_on_ratios():
    rng = np.random.default_rng(4)
    mu = np.exp(rng.exponential(1 / 3.0, 600))
    groups = np.repeat(np.arange(30), 20)
    a = twonn_bootstrap(mu, groups, n_boot=200, seed=9)
    assert a.shape == (200, 2) and np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, twonn_bootstrap(mu, groups, n_boot=200, seed=9))
    assert abs(np.median(a[:, 0]) - twonn_linear_fit(mu)) < 3 * a[:, 0].std()
    g = gride_bootstrap({1: mu}, groups, n_boot=200, seed=9)
    np.testing.assert_allclose(g[1], a[:, 1], rtol=1e-12)  # GRIDE n1 = 1 is the TwoNN MLE
    np.testing.assert_array_equal(a, twonn_bootstrap(mu, groups, n_boot=200,
                                                     seed=np.random.SeedSequence(9)))
    assert not np.array_equal(a, twonn_bootstrap(mu, groups, n_boot=200, seed=10))


# --------------------------------------------------------------------------- the probe
def test_result_fields_and_analytic_error_without_bootstrap():
    x = torus(np.random.default_rng(5), 800, 2)
    r = intrinsic_dimension(x)
    assert r.error == pytest.approx(r.dimension / math.sqrt(800 - 2), rel=1e-15)
    b = intrinsic_dimension(x, groups=np.arange(800) // 16, n_boot=300, seed=2, level=0.9)
    assert (b.dimension, b.mle_dimension) == (r.dimension, r.mle_dimension)
    assert (b.n_boot, b.n_groups, b.ci_level) == (300, 50, 0.9)
    assert b.ci_low < b.dimension < b.ci_high and b.error > 0
    assert _bare(b) == _bare(intrinsic_dimension(x, groups=np.arange(800) // 16, n_boot=300,
                                                 seed=2, level=0.9))
    g = intrinsic_dimension(x, estimator="gride", groups=np.arange(800) // 16, n_boot=100, seed=2)
    assert all(s.ci_low < s.dimension < s.ci_high for s in g.scales)
    at = {s.n1: s for s in g.scales}[g.scale_n1]
    assert (g.ci_low, g.ci_high, g.error) == (at.ci_low, at.ci_high, at.error)
    assert IDResult.from_dict(g.to_dict()) == g


def test_interval_covers_the_torus_dimension():
    """50 independent samples of 1,000 points on the flat 3-torus, 50 groups of 20: the 95 %
    interval covers k = 3 in at least 90 % of them (about 12 s). Without the mutual-pair blocks
    (treating each ratio as independent) the coverage is about 83 %."""
    k, n = 3, 1000
    covered = 0
    for ss in np.random.SeedSequence(20240611).spawn(50):
        x = torus(np.random.default_rng(ss), n, k)
        r = intrinsic_dimension(x, groups=np.arange(n) // 20, n_boot=500, seed=ss)
        covered += r.ci_low <= k <= r.ci_high
    assert covered >= 45, covered


def test_groups_of_near_copies_widen_the_interval():
    """Each group: 20 jittered copies of one point of a 3-dimensional manifold, jittered in a
    subspace of its own dimension (1 … 6). Rows of a group share their geometry, so resampling whole
    groups must give a wider interval than resampling rows."""
    rng = np.random.default_rng(6)
    centres = torus(rng, 60, 3)
    rows, labels = [], []
    for g, c in enumerate(centres):
        dim = 1 + g % 6
        basis = np.linalg.qr(rng.standard_normal((6, 6)))[0][:, :dim]
        rows.append(c + 1e-3 * rng.standard_normal((20, dim)) @ basis.T)
        labels.append(np.full(20, g))
    x, groups = np.concatenate(rows), np.concatenate(labels)
    blocks = intrinsic_dimension(x, groups=groups, n_boot=400, seed=1)
    single = intrinsic_dimension(x, n_boot=400, seed=1)
    assert blocks.dimension == single.dimension
    assert blocks.ci_high - blocks.ci_low > 1.5 * (single.ci_high - single.ci_low)
    assert blocks.n_groups == 60 and single.n_groups == single.n_points  # every point its own group


def test_groups_follow_the_rows_kept_by_deduplication():
    rng = np.random.default_rng(7)
    x = torus(rng, 400, 2)
    groups = np.arange(400) // 10
    dup = rng.choice(400, 60, replace=False)
    xd = np.concatenate([x, x[dup]])
    gd = np.concatenate([groups, groups[dup]])
    perm = rng.permutation(xd.shape[0])
    xd, gd = xd[perm], gd[perm]
    _, first = np.unique(xd, axis=0, return_index=True)
    kept = np.sort(first)
    got = intrinsic_dimension(xd, groups=gd, n_boot=200, seed=4)
    ref = intrinsic_dimension(xd[kept], groups=gd[kept], n_boot=200, seed=4)
    assert got.n_duplicates_removed == 60
    assert _bare(got) == dataclasses.replace(_bare(ref), n_duplicates_removed=60)


def test_mutual_pairs_are_mutual_first_neighbours():
    from scipy.spatial import cKDTree

    from geoprobe.probes.intrinsic_dim import _prepare, mutual_pairs

    x = torus(np.random.default_rng(8), 500, 3)
    prep = _prepare(torch.from_numpy(x), lambda n: [1, 2], 1e-6)
    _, idx = cKDTree(x).query(x, 2)
    nn = idx[:, 1]
    want = {tuple(sorted((i, int(nn[i])))) for i in range(500) if nn[nn[i]] == i}
    assert {tuple(sorted(p)) for p in mutual_pairs(prep).tolist()} == want


def test_layers_bootstrap_equals_per_layer_calls_on_both_paths():
    rng = np.random.default_rng(9)
    layers = [torus(rng, n, 3) @ rng.standard_normal((6, 10)) for n in (300, 340, 300)]
    layers[1] = np.concatenate([layers[1], layers[1][:20]])  # exact duplicates
    groups = [np.arange(x.shape[0]) // 10 for x in layers]
    for est in ("twonn", "gride"):
        kw = dict(estimator=est, n_boot=60, seed=11)
        ref = [_bare(intrinsic_dimension(x, groups=g, **kw)) for x, g in zip(layers, groups)]
        opts = _Options(est, None, None, 1e-6, 0.1, None, 60, 11)
        batched = _layers_batched(layers, torch.device("cpu"), opts, "raise", None, groups)
        assert [_bare(r) for r in batched] == ref
        loop = intrinsic_dimension_layers(layers, groups=groups, **kw)
        assert [_bare(r) for r in loop] == ([_bare(r) for r in at_shared_scale(ref)]
                                            if est == "gride" else ref)
    same = intrinsic_dimension_layers(np.stack([layers[0], layers[2]]), groups=groups[0],
                                      n_boot=30, seed=np.random.SeedSequence(1))
    assert all(r.n_boot == 30 and r.n_groups == 30 for r in same)


@pytest.mark.parametrize("kw,match", [
    (dict(n_boot=1), "n_boot"), (dict(n_boot=-2), "n_boot"), (dict(n_boot=100_001), "n_boot"),
    (dict(n_boot=True), "n_boot"), (dict(n_boot=10, seed=-1), "seed"),
    (dict(n_boot=10, seed="a"), "seed"), (dict(n_boot=10, level=1.0), "level"),
    (dict(n_boot=10, groups=np.zeros(100, dtype=int)), "at least 2 groups, got 1"),
    (dict(n_boot=10, groups=np.zeros(99, dtype=int)), "one integer label per row"),
    (dict(n_boot=10, groups=np.zeros(100)), "integer labels"),
])
def test_bad_bootstrap_options(kw, match):
    x = torus(np.random.default_rng(10), 100, 2)
    with pytest.raises(InputDataError, match=match):
        intrinsic_dimension(x, **kw)


def test_bad_layer_groups():
    layers = [torus(np.random.default_rng(i), 100, 2) for i in range(2)]
    with pytest.raises(InputDataError, match="labels for 3 layers"):
        intrinsic_dimension_layers(layers, groups=[np.arange(100)] * 3, n_boot=10)
    with pytest.raises(InputDataError, match="^layer 1: groups"):
        intrinsic_dimension_layers(layers, groups=[np.arange(100), np.arange(90)], n_boot=10)


# --------------------------------------------------------------------------- the shared GRIDE scale
def _gride(curve: dict[int, float]) -> IDResult:
    scales = [IDScale(n1=n1, n2=2 * n1, dimension=d, error=0.01 * n1, ci_low=d - 1, ci_high=d + 1)
              for n1, d in sorted(curve.items())]
    return IDResult(dimension=scales[0].dimension, error=scales[0].error, estimator="gride",
                    n_points=1000, n_duplicates_removed=0, scales=scales)


def _brute_force_scale(curves: list[dict[int, float]]) -> int:
    common = sorted(set.intersection(*(set(c) for c in curves)))
    if len(common) == 1:
        return common[0]
    med = {b: float(np.median([abs(c[b] - c[a]) / c[b] for c in curves]))
           for a, b in zip(common, common[1:])}
    return min(med, key=lambda n1: (med[n1], n1))


def test_shared_scale_rule_against_brute_force():
    rng = np.random.default_rng(12)
    for _ in range(200):
        n_layers = int(rng.integers(1, 6))
        curves = []
        for _ in range(n_layers):
            top = int(rng.integers(1, 7))
            curves.append({1 << j: float(rng.choice([5.0, 6.0, 7.0, rng.uniform(2, 9)]))
                           for j in range(top)})
        n1, reason = shared_gride_scale([_gride(c) for c in curves])
        assert n1 == _brute_force_scale(curves)
        assert reason.startswith(f"n1 = {n1}:")


def test_shared_scale_ties_single_scale_and_errors():
    flat = {1: 5.0, 2: 4.0, 4: 4.0, 8: 4.0}  # zero change at n1 = 4 and 8: the smaller wins
    n1, reason = shared_gride_scale([_gride(flat), None])
    assert n1 == 4 and "median relative change 0.0% from n1 = 2" in reason
    assert shared_gride_scale([_gride({1: 3.0, 2: 3.1}), _gride({1: 4.0})])[0] == 1
    assert "only scale" in shared_gride_scale([_gride({1: 4.0})])[1]
    with pytest.raises(InputDataError, match="no GRIDE results"):
        shared_gride_scale([None])
    with pytest.raises(InputDataError, match="in common"):
        shared_gride_scale([_gride({2: 3.0}), _gride({4: 3.0})])
    tw = dataclasses.replace(_gride({1: 3.0}), estimator="twonn", scales=[])
    with pytest.raises(InputDataError, match="GRIDE"):
        shared_gride_scale([tw])
    with pytest.raises(InputDataError, match="no scale n1=16"):
        at_scale(_gride(flat), 16, "")


def test_every_layer_shares_the_scale():
    rng = np.random.default_rng(13)
    layers = [torus(rng, 1200, k) @ rng.standard_normal((2 * k, 12)) for k in (2, 3, 4, 3)]
    res = [intrinsic_dimension(x, estimator="gride") for x in layers]
    shared = at_shared_scale(res)
    n1, reason = shared_gride_scale(res)
    for r, s in zip(res, shared):
        at = {sc.n1: sc for sc in r.scales}[n1]
        assert (s.scale_n1, s.scale_rule, s.dimension, s.error) == (n1, reason, at.dimension, at.error)
        assert s.scales == r.scales
    assert [_bare(r) for r in intrinsic_dimension_layers(layers, estimator="gride")] == \
        [_bare(r) for r in shared]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the GPU machine: pytest -m gpu)")
@pytest.mark.parametrize("estimator", ["twonn", "gride"])
def test_gpu_layers_bootstrap_equals_per_layer_gpu_calls(estimator):
    rng = np.random.default_rng(14)
    layers = [torus(rng, 600, 3) @ rng.standard_normal((6, 64)) for _ in range(3)]
    layers[1] = np.concatenate([layers[1], layers[1][:30]])  # exact duplicates: kept rows' groups
    groups = [np.arange(x.shape[0]) % 40 for x in layers]
    cuda = [torch.from_numpy(x).cuda() for x in layers]
    kw = dict(estimator=estimator, n_boot=100, seed=5)
    ref = [intrinsic_dimension(x, groups=g, **kw) for x, g in zip(cuda, groups)]
    if estimator == "gride":
        ref = at_shared_scale(ref)
    got = intrinsic_dimension_layers(cuda, groups=groups, **kw)
    assert [_bare(r) for r in got] == [_bare(r) for r in ref]
    assert all(r.backend == "cuda" and r.n_boot == 100 for r in got)


# --------------------------------------------------------------------------- torch path (GPU)
BOOT_DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else [])


def _ratios(rng: np.random.Generator, n: int, k: int, scales=(1, 2, 4, 8)) -> dict[int, np.ndarray]:
    """Exact GRIDE ratios μ = r_2n1/r_n1 of points on the flat k-torus (brute-force distances)."""
    x = torus(rng, n, k)
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    r = np.sort(d, axis=1)[:, 1:]
    return {n1: r[:, 2 * n1 - 1] / r[:, n1 - 1] for n1 in scales}


@pytest.mark.parametrize("device", BOOT_DEVICES)
def test_torch_replicates_equal_numpy(device):
    """The torch path (float64, same host draws) gives the numpy path's replicates to rounding."""
    rng = np.random.default_rng(21)
    mus = _ratios(rng, 500, 3)
    groups = rng.integers(0, 37, 500)
    ref = twonn_bootstrap(mus[1], groups, n_boot=300, seed=9)
    got = twonn_bootstrap(mus[1], groups, n_boot=300, seed=9, device=torch.device(device))
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=0)
    gref = gride_bootstrap(mus, groups, n_boot=200, seed=4)
    ggot = gride_bootstrap(mus, groups, n_boot=200, seed=4, device=torch.device(device))
    assert sorted(ggot) == sorted(gref)
    for n1 in gref:
        np.testing.assert_allclose(ggot[n1], gref[n1], rtol=1e-9, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the GPU machine: pytest -m gpu)")
@pytest.mark.parametrize("estimator", ["twonn", "gride"])
def test_gpu_estimate_bootstraps_on_the_gpu_and_matches_the_host(estimator, monkeypatch):
    """A CUDA estimate runs its replicates on the GPU, and its interval equals the CPU estimate's."""
    rng = np.random.default_rng(22)
    x = torus(rng, 800, 3) @ rng.standard_normal((6, 32))
    groups = np.arange(800) % 50
    seen = []
    real = ib._run
    monkeypatch.setattr(ib, "_run", lambda *a, **k: seen.append(a[4] if len(a) > 4 else k.get("dev")) or real(*a, **k))
    gpu = intrinsic_dimension(torch.from_numpy(x).cuda(), groups=groups, estimator=estimator, n_boot=200, seed=3)
    assert seen and all(d is not None and d.type == "cuda" for d in seen)
    cpu = intrinsic_dimension(x, groups=groups, estimator=estimator, n_boot=200, seed=3)
    for a, b in ((gpu.ci_low, cpu.ci_low), (gpu.ci_high, cpu.ci_high), (gpu.error, cpu.error)):
        assert a == pytest.approx(b, rel=1e-8)
