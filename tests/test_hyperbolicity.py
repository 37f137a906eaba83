"""Gromov δ-hyperbolicity against closed forms and brute force (METHODS.md §3).

Oracles: weighted trees → 0; cycles C_n → ⌊n/4⌋ − ½·[n ≡ 1 mod 4]; corners of a unit square → √2 − 1;
a regular simplex → 0; the four-point definition by brute force over all quadruples; δ_w ≤ δ ≤ 2δ_w;
scale and permutation behaviour. Every fast path (compiled CPU kernel, torch blocks, blocked numpy) is
compared with the plain float64 formula on fresh random inputs.
"""
from __future__ import annotations

import itertools
import math

import networkx as nx
import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from geoprobe.errors import GeoprobeError, InputDataError
from geoprobe.probes.hyperbolicity import (DeltaOptionError, _delta_reference, _fixed_blocked_numpy,
                                           delta, euclidean_distances, gaussian_null,
                                           gromov_product, matched_null_delta)
from geoprobe.backends import delta_cpu, delta_torch
from geoprobe.profile import DeltaResult

RTOL = 1e-9


def four_point_delta(D: np.ndarray) -> float:
    """max over quadruples of (S1 − S2)/2, S1 ≥ S2 ≥ S3 the three pair sums (the definition)."""
    n = D.shape[0]
    quads = np.array(list(itertools.combinations(range(n), 4)))
    x, y, z, t = quads.T
    sums = np.stack([D[x, y] + D[z, t], D[x, z] + D[y, t], D[x, t] + D[y, z]], axis=1)
    sums.sort(axis=1)
    return float(((sums[:, 2] - sums[:, 1]) / 2).max())


def tree_distances(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    maker = getattr(nx, "random_labeled_tree", None) or nx.random_tree
    T = maker(n, seed=seed)
    for u, v in T.edges:
        T[u][v]["weight"] = float(rng.uniform(0.1, 2.0))
    lengths = dict(nx.all_pairs_dijkstra_path_length(T))
    D = np.triu(np.array([[lengths[i][j] for j in range(n)] for i in range(n)]), k=1)
    return D + D.T   # exactly symmetric (the two Dijkstra runs may differ in the last bit)


def cycle_distances(n: int) -> np.ndarray:
    i = np.arange(n)
    d = np.abs(i[:, None] - i[None, :])
    return np.minimum(d, n - d).astype(np.float64)


def random_cases(seed: int):
    """Fresh random inputs of several kinds, as (name, distance matrix)."""
    rng = np.random.default_rng(seed)
    yield "gauss-high-dim", euclidean_distances(rng.standard_normal((160, 300)))
    yield "gauss-low-dim", euclidean_distances(rng.standard_normal((170, 2)))
    yield "gauss-threaded", euclidean_distances(rng.standard_normal((260, 40)))  # > SERIAL_MAX_N
    yield "anisotropic", euclidean_distances(rng.standard_normal((150, 20)) * np.geomspace(1, 1e-3, 20))
    yield "duplicates", euclidean_distances(np.repeat(rng.standard_normal((40, 8)), 4, axis=0))
    yield "integer-grid", euclidean_distances(rng.integers(0, 4, size=(140, 3)).astype(float))
    yield "line", euclidean_distances(np.sort(rng.standard_normal((150, 1)), axis=0))
    yield "tree", tree_distances(120, seed)
    M = rng.random((130, 130))
    M = M + M.T
    np.fill_diagonal(M, 0.0)
    yield "non-metric", M


# --------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_tree_is_zero(seed):
    D = tree_distances(60, seed)
    for mode in ("fixed", "exact"):
        r = delta(D, distances=True, mode=mode, base_point=seed)
        assert r.delta == pytest.approx(0.0, abs=1e-12 * r.diameter)
        assert r.delta_rel == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("n,expected", [(4, 1.0), (5, 0.5), (8, 2.0), (9, 1.5), (12, 3.0)])
def test_cycle_graph(n, expected):
    assert expected == n // 4 - (0.5 if n % 4 == 1 else 0.0)
    D = cycle_distances(n)
    r = delta(D, distances=True, mode="exact")
    assert r.delta == pytest.approx(expected, abs=1e-12)
    assert r.diameter == n // 2
    assert r.delta_rel == pytest.approx(2 * expected / (n // 2))
    assert r.base_point is None and r.mode == "exact"


def test_unit_square_corners():
    X = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    r = delta(X, mode="exact")
    assert r.delta == pytest.approx(math.sqrt(2) - 1, rel=1e-12)
    assert r.diameter == pytest.approx(math.sqrt(2), rel=1e-12)
    assert r.delta_rel == pytest.approx(2 * (math.sqrt(2) - 1) / math.sqrt(2), rel=1e-12)


def test_regular_simplex_is_zero():
    X = np.eye(12) * 3.0
    for mode in ("fixed", "exact"):
        r = delta(X, mode=mode)
        assert r.delta == pytest.approx(0.0, abs=1e-12)
        assert r.diameter == pytest.approx(3.0 * math.sqrt(2), rel=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_exact_mode_equals_four_point_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(6, 26))
    X = rng.standard_normal((n, int(rng.integers(1, 10))))
    r = delta(X, mode="exact")
    expected = four_point_delta(euclidean_distances(X))
    assert expected > 0
    assert r.delta == pytest.approx(expected, rel=RTOL, abs=1e-12)


def test_fixed_base_brackets_exact():
    rng = np.random.default_rng(7)
    X = rng.standard_normal((24, 5))
    exact = delta(X, mode="exact").delta
    fixed = [delta(X, base_point=w).delta for w in range(24)]
    assert max(fixed) == pytest.approx(exact, rel=RTOL)
    for d_w in fixed:
        assert d_w <= exact * (1 + RTOL)
        assert exact <= 2 * d_w * (1 + RTOL)


def test_scale_and_permutation():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((90, 7))
    base = delta(X, base_point=5)
    scaled = delta(X * 37.5, base_point=5)
    assert scaled.delta == pytest.approx(37.5 * base.delta, rel=RTOL)
    assert scaled.diameter == pytest.approx(37.5 * base.diameter, rel=RTOL)
    assert scaled.delta_rel == pytest.approx(base.delta_rel, rel=RTOL)
    perm = rng.permutation(90)
    moved = delta(X[perm], base_point=int(np.flatnonzero(perm == 5)[0]))
    assert moved.delta == pytest.approx(base.delta, rel=RTOL)
    Xs = X[:30]
    p30 = rng.permutation(30)
    assert delta(Xs[p30], mode="exact").delta == pytest.approx(delta(Xs, mode="exact").delta, rel=RTOL)
    assert delta(Xs + 1e3, mode="exact").delta == pytest.approx(delta(Xs, mode="exact").delta, rel=1e-7)


# --------------------------------------------------------------------------- fast paths vs reference
@pytest.mark.parametrize("seed", [11, 12])
def test_cpu_kernel_equals_reference(seed):
    for name, D in random_cases(seed):
        w = int(np.random.default_rng(seed).integers(0, D.shape[0]))
        r = delta(D, distances=True, base_point=w)
        assert r.backend == "numba-cpu"
        assert r.delta == pytest.approx(_delta_reference(D, "fixed", w), rel=RTOL, abs=1e-300), name


@pytest.mark.parametrize("switch", [1.0, 4.0, 1e12])
def test_cpu_kernel_both_phases(switch):
    """Force the sorted phase only (switch 1), the default, and the contiguous phase only."""
    for name, D in random_cases(21):
        for w in (0, D.shape[0] - 1):
            A = delta_cpu.gromov_product_matrix(D, w)
            np.testing.assert_array_equal(A, gromov_product(D, w))
            got = delta_cpu.fixed_base_delta(A, w, 0.0, switch, 3)
            assert got == pytest.approx(_delta_reference(D, "fixed", w), rel=RTOL, abs=1e-300), name


def test_base_point_term_of_a_non_metric_matrix():
    """z = w gives min(0, 0) − A_xy = −A_xy, the whole answer when A_xy < 0 (hand-computed: with
    d(w, ·) = 0.1 and d(x, y) = 1 otherwise, A_xy = ½(0.2 − 1) = −0.4, so δ_w = 0.4)."""
    D = np.ones((6, 6))
    D[0, :] = D[:, 0] = 0.1
    np.fill_diagonal(D, 0.0)
    assert _delta_reference(D, "fixed", 0) == pytest.approx(0.4, rel=1e-12)
    assert delta(D, distances=True, base_point=0).delta == pytest.approx(0.4, rel=1e-12)
    assert delta_cpu.delta_fixed(D, 0) == _delta_reference(D, "fixed", 0)
    assert delta_torch.delta_fixed_torch(torch.from_numpy(D), 0) == _delta_reference(D, "fixed", 0)


def test_cpu_kernel_lower_bound_is_respected():
    D = euclidean_distances(np.random.default_rng(5).standard_normal((50, 4)))
    ref = _delta_reference(D, "fixed", 0)
    assert delta_cpu.delta_fixed(D, 0, best0=ref * 0.5) == pytest.approx(ref, rel=RTOL)
    assert delta_cpu.delta_fixed(D, 0, best0=ref * 2.0) == ref * 2.0


def test_exact_mode_equals_reference_on_random_inputs():
    rng = np.random.default_rng(31)
    cases = [euclidean_distances(rng.standard_normal((35, 3))), tree_distances(30, 4),
             cycle_distances(30), euclidean_distances(rng.integers(0, 3, size=(32, 2)).astype(float))]
    M = rng.random((30, 30))
    M = M + M.T
    np.fill_diagonal(M, 0.0)
    cases.append(M)
    for D in cases:
        ref = _delta_reference(D, "exact")
        assert delta(D, distances=True, mode="exact").delta == pytest.approx(ref, rel=RTOL, abs=1e-300)
        bases = np.arange(D.shape[0])
        assert delta_cpu.delta_bases_parallel(D, bases, 0.0, delta_cpu.SWITCH, 2) == pytest.approx(
            ref, rel=RTOL, abs=1e-300)
        t = torch.from_numpy(D)
        assert delta_torch.delta_exact_torch(t, block=7) == pytest.approx(ref, rel=RTOL, abs=1e-300)


def test_exact_mode_threaded_path():
    """n > SERIAL_MAX_N / 2: the first base alone, then the others spread over threads."""
    n = delta_cpu.SERIAL_MAX_N // 2 + 8
    D = euclidean_distances(np.random.default_rng(32).standard_normal((n, 3)))
    assert delta(D, distances=True, mode="exact", base_point=n - 1).delta == pytest.approx(
        _delta_reference(D, "exact"), rel=RTOL)


@pytest.mark.parametrize("block", [None, 1, 13])
def test_torch_blocks_equal_reference(block):
    """The CUDA code path (float32 search + float64 rows), run here on CPU tensors."""
    for name, D in random_cases(41):
        w = 3
        ref = _delta_reference(D, "fixed", w)
        got = delta_torch.delta_fixed_torch(torch.from_numpy(D), w, block=block)
        assert got == pytest.approx(ref, rel=RTOL, abs=1e-300), name
        plain = delta_torch.delta_fixed_torch(torch.from_numpy(D), w, block=block, search_float32=False)
        assert plain == pytest.approx(ref, rel=RTOL, abs=1e-300), name


def test_blocked_numpy_equals_reference():
    for name, D in random_cases(51):
        ref = _delta_reference(D, "fixed", 2)
        assert _fixed_blocked_numpy(D, 2, block=17) == pytest.approx(ref, rel=RTOL, abs=1e-300), name


def test_euclidean_distances_match_scipy():
    rng = np.random.default_rng(61)
    X = rng.standard_normal((120, 50))
    X[60:] = X[:60] + 1e-7 * rng.standard_normal((60, 50))   # near-duplicates
    X += 1e4                                                  # large common offset
    D = euclidean_distances(X)
    ref = cdist(X, X)
    np.testing.assert_allclose(D, ref, rtol=1e-10, atol=0)
    assert np.array_equal(D, D.T) and not np.diagonal(D).any()
    t = delta_torch.euclidean_distances_torch(torch.from_numpy(X))
    np.testing.assert_allclose(t.numpy(), ref, rtol=1e-10, atol=0)


def test_torch_cpu_tensor_equals_numpy():
    rng = np.random.default_rng(71)
    X = rng.standard_normal((80, 16))
    ref = delta(X, base_point=4)
    t64 = delta(torch.from_numpy(X), base_point=4)
    assert t64.delta == ref.delta and t64.diameter == ref.diameter
    X32 = torch.from_numpy(X).float()
    t32 = delta(X32, base_point=4)
    assert t32.delta == delta(X32.numpy().astype(np.float64), base_point=4).delta
    assert t32.delta == pytest.approx(ref.delta, rel=1e-5)
    D = torch.from_numpy(euclidean_distances(X))
    assert delta(D, distances=True, mode="exact").delta == pytest.approx(
        delta(X, mode="exact").delta, rel=RTOL)


def test_result_record():
    r = delta(np.random.default_rng(0).standard_normal((20, 3)), base_point=2)
    assert isinstance(r, DeltaResult)
    assert r.n_points == 20 and r.mode == "fixed" and r.base_point == 2 and r.dtype == "float64"
    assert 0 < r.delta_rel <= 1 and r.seconds >= 0
    assert DeltaResult.from_dict(r.to_dict()) == r


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_equals_reference():
    rng = np.random.default_rng(81)
    X = rng.standard_normal((700, 64))
    D = euclidean_distances(X)
    ref = _delta_reference(D, "fixed", 0)
    for dtype in (torch.float64, torch.float32):
        r = delta(torch.from_numpy(X).to("cuda", dtype), base_point=0)
        assert r.backend == "torch-cuda"
        if dtype == torch.float64:
            assert r.delta == pytest.approx(ref, rel=RTOL)
        else:
            x32 = torch.from_numpy(X).float().double().numpy()
            assert r.delta == pytest.approx(_delta_reference(euclidean_distances(x32), "fixed", 0),
                                            rel=RTOL)
    Dt = torch.from_numpy(tree_distances(200, 1)).cuda()
    assert delta(Dt, distances=True).delta == pytest.approx(0.0, abs=1e-12 * float(Dt.max()))
    small = D[:30, :30]
    assert delta(torch.from_numpy(small).cuda(), distances=True, mode="exact").delta == pytest.approx(
        _delta_reference(small, "exact"), rel=RTOL)


# --------------------------------------------------------------------------- Gaussian null
def test_gaussian_null_matches_mean_and_covariance():
    rng = np.random.default_rng(91)
    X = rng.standard_normal((40, 6)) @ rng.standard_normal((6, 6)) + np.arange(6.0)
    (big,) = gaussian_null(X, n_repeats=1, seed=5, n_points=200_000)
    np.testing.assert_allclose(big.mean(axis=0), X.mean(axis=0), atol=0.02)
    cov_x = np.cov(X, rowvar=False)
    np.testing.assert_allclose(np.cov(big, rowvar=False), cov_x, atol=0.02 * np.abs(cov_x).max())


def test_gaussian_null_low_rank_and_seeded():
    rng = np.random.default_rng(92)
    X = rng.standard_normal((10, 50))          # n < d: covariance of rank 9
    a = gaussian_null(X, n_repeats=3, seed=1)
    b = gaussian_null(X, n_repeats=3, seed=1)
    c = gaussian_null(X, n_repeats=3, seed=2)
    assert len(a) == 3 and all(s.shape == X.shape for s in a)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[0], a[1])
    centred = np.vstack(a) - X.mean(axis=0)   # samples stay in the data's affine span
    assert np.linalg.matrix_rank(centred, tol=1e-8 * np.abs(centred).max()) == 9


def test_matched_null_delta_seeded():
    rng = np.random.default_rng(93)
    X = rng.standard_normal((60, 30))
    v = matched_null_delta(X, n_repeats=4, seed=3)
    assert len(v) == 4 and all(0 < a <= 1 for a in v)
    assert v == matched_null_delta(X, n_repeats=4, seed=3)
    assert v != matched_null_delta(X, n_repeats=4, seed=4)
    sample = gaussian_null(X, n_repeats=1, seed=3)[0]
    assert v[0] == delta(sample).delta_rel
    ve = matched_null_delta(torch.from_numpy(X), n_repeats=2, seed=3, mode="exact")
    assert ve[0] >= v[0]


# --------------------------------------------------------------------------- bad input
def square(n=6):
    return euclidean_distances(np.random.default_rng(0).standard_normal((n, 2)))


@pytest.mark.parametrize("bad,kwargs,match", [
    (np.array([[0.0, 1.0], [np.nan, 2.0], [1.0, 1.0], [3.0, 0.0]]), {}, "NaN or inf"),
    (np.array([[0.0, 1.0], [np.inf, 2.0], [1.0, 1.0], [3.0, 0.0]]), {}, "NaN or inf"),
    (np.random.default_rng(0).standard_normal((3, 4)), {}, "at least 4 points"),
    (np.ones((10, 3)), {}, "identical"),
    (np.zeros((5, 5)), {"distances": True}, "identical"),
    (np.arange(10.0), {}, "shape"),
    (np.zeros((5, 0)), {}, "no coordinates"),
    (np.ones((4, 5)), {"distances": True}, "square"),
    (np.array([["a", "b"]] * 4), {}, "numbers"),
    (np.ones((4, 2)) * 1j, {}, "real"),
    (torch.ones(4, 2, dtype=torch.complex64), {}, "real"),
])
def test_bad_points(bad, kwargs, match):
    with pytest.raises(InputDataError, match=match):
        delta(bad, **kwargs)


def test_bad_distance_matrices():
    D = square()
    asym = D.copy()
    asym[0, 1] += 0.1
    neg = D.copy()
    neg[0, 1] = neg[1, 0] = -0.5
    diag = D.copy()
    diag[2, 2] = 0.3
    nan = D.copy()
    nan[1, 2] = nan[2, 1] = np.nan
    for bad, match in [(asym, "symmetric"), (neg, "negative"), (diag, "diagonal"), (nan, "NaN")]:
        with pytest.raises(InputDataError, match=match):
            delta(bad, distances=True)
    tiny = D.copy()
    tiny[0, 1] += 1e-14           # inside the tolerance: accepted and symmetrised
    assert delta(tiny, distances=True).delta == pytest.approx(delta(D, distances=True).delta, rel=1e-9)


@pytest.mark.parametrize("kwargs", [{"mode": "four-point"}, {"mode": None}, {"base_point": 6},
                                    {"base_point": -1}, {"base_point": 1.0}, {"base_point": True},
                                    {"block": 0}, {"block": 2.5}])
def test_bad_options(kwargs):
    with pytest.raises(DeltaOptionError) as info:
        delta(square(), distances=True, **kwargs)
    assert isinstance(info.value, GeoprobeError) and isinstance(info.value, ValueError)


def test_bad_null_options():
    X = np.random.default_rng(0).standard_normal((10, 3))
    with pytest.raises(DeltaOptionError):
        matched_null_delta(X, mode="wrong")
    with pytest.raises(DeltaOptionError):
        gaussian_null(X, n_repeats=0)
    with pytest.raises(InputDataError, match="NaN"):
        gaussian_null(np.full((5, 2), np.nan))


def test_cuda_memory_message_names_need_and_largest_fitting_size():
    from geoprobe.probes.hyperbolicity import CUDA_BYTES_PER_PAIR, cuda_memory_message

    free = 10 * 2 ** 30 + 12345
    msg = cuda_memory_message(100_000, free)
    fits = int(msg.split("largest set that fits is about ")[1].split(" points")[0].replace(",", ""))
    assert fits ** 2 * CUDA_BYTES_PER_PAIR <= free < (fits + 1) ** 2 * CUDA_BYTES_PER_PAIR
    need = float(msg.split("needs about ")[1].split(" GiB")[0])
    assert abs(need - 100_000 ** 2 * CUDA_BYTES_PER_PAIR / 2 ** 30) < 0.05
    assert "100,000 points" in msg and "subsample" in msg
