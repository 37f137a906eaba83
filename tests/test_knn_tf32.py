"""The 3xTF32 selection of geoprobe.backends.knn_certified: the hi/lo split against an arithmetic oracle, the
error bound of the split product against float64 Gram matrices (the product emulated on the CPU with
the same exactly-TF32 operands), the exact neighbours it selects against brute force, the fallback
tiers, the matmul-precision context, and on CUDA (tests marked ``gpu``) the real tensor-core product
and the neighbours against the float32 selection and brute force.

Data are drawn from a fresh seed on every run (printed in failure messages)."""
from __future__ import annotations

import logging
import math
import os

import numpy as np
import pytest
import torch

from geoprobe.errors import InputDataError
from geoprobe.probes.intrinsic_dim import intrinsic_dimension, twonn_linear_fit, twonn_mle
from geoprobe.backends import knn_certified as knn
from geoprobe.backends.knn_certified import distances_at_ranks, knn_distances, tf32_split, tf32_truncate

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs CUDA (run on the GPU machine: pytest -m gpu)")


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def _tf32_oracle(v: np.ndarray) -> np.ndarray:
    """TF32 truncation towards zero by arithmetic (float64): keep 11 significant bits of a normal
    float32 number, and multiples of 2⁻¹³⁶ (the lowest kept bit) of a subnormal one."""
    a = np.abs(v.astype(np.float64))
    _, e = np.frexp(a)  # a = f·2^e, f in [0.5, 1)
    q = np.maximum(np.ldexp(1.0, e - 11), 2.0 ** -136)
    return np.copysign(np.floor(a / q) * q, v.astype(np.float64))


def _awkward_floats(rng: np.random.Generator, n: int) -> np.ndarray:
    """float32 values over the whole exponent range, both signs, with zeros, exact TF32 numbers,
    subnormals and the extremes."""
    v = np.ldexp(rng.uniform(1.0, 2.0, n), rng.integers(-149, 127, n)) * rng.choice([-1.0, 1.0], n)
    v = v.astype(np.float32)
    special = np.array([0.0, -0.0, 1.0, -1.5, 2.0 ** -149, -(2.0 ** -140), 2.0 ** -126,
                        np.finfo(np.float32).max, -np.finfo(np.float32).max, 1.0 + 2.0 ** -10,
                        1.0 + 2.0 ** -11, 1.0 + 2.0 ** -23, 3.0 * 2.0 ** -130], dtype=np.float32)
    return np.concatenate([v, special, _tf32_oracle(v[:50]).astype(np.float32)])


def _scaled32(x: np.ndarray) -> np.ndarray:
    """The selection's input: centred, divided by the largest norm, rounded to float32."""
    c = x - x.mean(axis=0)
    return (c / np.linalg.norm(c, axis=1).max()).astype(np.float32)


def _gram_constant(dim: int) -> float:
    """|G̃ − a·b| ≤ this × Σ|a_k||b_k| for the 3xTF32 Gram (geoprobe.backends.knn_certified docstring)."""
    return (2 * dim + dim / 128 + 41.2) * 2.0 ** -23


def _adversarial(rng: np.random.Generator) -> dict[str, np.ndarray]:
    n = int(rng.integers(500, 800))
    base = rng.standard_normal((n, 48))
    lattice = np.stack(np.meshgrid(*[np.arange(7.0)] * 3, indexing="ij"), -1).reshape(-1, 3)
    return {
        "offset": rng.standard_normal((n, 300)) * 1e-3 + 50.0,  # common offset ≫ spread
        "near_duplicates": np.concatenate([base, base[:60] + 1e-9 * rng.standard_normal((60, 48)),
                                           base[60:80]]),
        "ties": lattice + 1e4,
        "column_scales": rng.standard_normal((n, 7)) * np.logspace(-3, 3, 7),
        "outlier_rows": np.concatenate([rng.standard_normal((n, 64)),
                                        1e3 * rng.standard_normal((3, 64))]),
    }


# --------------------------------------------------------------------------- the split
def test_tf32_split_matches_arithmetic_oracle():
    seed = _seed()
    v = _awkward_floats(np.random.default_rng(seed), 20000)
    x = torch.from_numpy(v)
    hi, lo = tf32_split(x)
    for part in (hi, lo):  # exactly representable in TF32: the 13 low mantissa bits are zero
        assert int((part.view(torch.int32) & 0x1FFF).abs().sum()) == 0, seed
    h, lo64, v64 = hi.double().numpy(), lo.double().numpy(), v.astype(np.float64)
    np.testing.assert_array_equal(h, _tf32_oracle(v), err_msg=f"seed {seed}")
    assert np.all(np.abs(h) <= np.abs(v64)) and np.all((h == 0) | (np.sign(h) == np.sign(v64)))
    # x − hi is exact in float32, and lo is its TF32 truncation
    resid = (x - hi).double().numpy()
    np.testing.assert_array_equal(resid, v64 - h, err_msg=f"seed {seed}")
    np.testing.assert_array_equal(lo64, _tf32_oracle((x - hi).numpy()), err_msg=f"seed {seed}")
    normal = np.abs(v64) >= 2.0 ** -100  # the residuals of these are normal numbers too
    assert np.all(np.abs(resid[normal]) < 2.0 ** -10 * np.abs(v64[normal])), seed
    assert np.all(np.abs((v64 - h - lo64)[normal]) < 2.0 ** -20 * np.abs(v64[normal])), seed
    assert np.all(np.abs(v64 - h - lo64) < 2.0 ** -20 * np.abs(v64) + 2.0 ** -135), seed
    # exact TF32 numbers split into themselves and zero
    t = tf32_truncate(x)
    hi_t, lo_t = tf32_split(t)
    assert torch.equal(hi_t, t) and not bool(lo_t.any())


def test_tf32_truncate_rejects_other_dtypes():
    with pytest.raises(InputDataError, match="float32"):
        tf32_truncate(torch.zeros(3, dtype=torch.float64))


# --------------------------------------------------------------------------- the bound (CPU emulation)
@pytest.mark.parametrize("kind", ["gauss", "offset", "near_duplicates", "ties", "column_scales",
                                  "outlier_rows"])
def test_emulated_3xtf32_gram_within_bound(kind):
    """hi·hiᵀ + hi·loᵀ + lo·hiᵀ in float32 (every operand exactly TF32, so each product is exact as
    on the tensor cores) against the float64 Gram of the same float32 data; the missing-term variants
    (plain TF32, one cross term) must break the bound, or it would not be testing anything."""
    seed = _seed()
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((int(rng.integers(300, 700)), 256)) if kind == "gauss"
         else _adversarial(rng)[kind])
    xs = _scaled32(x)
    dim = xs.shape[1]
    t = torch.from_numpy(xs)
    hi, lo = tf32_split(t)
    exact = xs.astype(np.float64) @ xs.astype(np.float64).T  # float32 products are exact in float64
    scale = np.abs(xs).astype(np.float64) @ np.abs(xs).astype(np.float64).T
    bound = _gram_constant(dim) * scale + 1e-30
    three = (hi @ hi.T + (hi @ lo.T + lo @ hi.T)).double().numpy()
    assert np.all(np.abs(three - exact) <= bound), f"seed {seed}"
    gram = knn._Gram(t.double(), "3xtf32")
    n = xs.shape[0]
    out = torch.empty((n - 5, n - 3), dtype=torch.float32)
    block = gram.product(slice(5, n), slice(3, None), out=out).double().numpy()
    assert np.all(np.abs(block - exact[5:, 3:]) <= bound[5:, 3:]), f"seed {seed}"
    if kind != "ties":  # lattice coordinates are exact in TF32: nothing to lose there
        plain = (hi @ hi.T).double().numpy()
        one_cross = (hi @ hi.T + hi @ lo.T).double().numpy()
        assert np.any(np.abs(plain - exact) > bound), f"seed {seed}"
        assert np.any(np.abs(one_cross - exact) > bound), f"seed {seed}"


@pytest.mark.parametrize("kind", ["offset", "near_duplicates", "ties", "column_scales",
                                  "outlier_rows"])
def test_3xtf32_selection_distance_bound(kind):
    """The certificate's bound |d̃² − d²| ≤ c (n_i + n_j)² + t for the 3xTF32 selection (CPU
    emulation) against float64 distances."""
    seed = _seed()
    x = _adversarial(np.random.default_rng(seed))[kind]
    t = torch.from_numpy(x)
    sel = knn._select(t, 12, 97, "3xtf32")
    assert sel.kind == "3xtf32"
    cand = sel.cand.numpy()
    exact = np.linalg.norm(x[cand] - x[:, None, :], axis=2) / sel.radius
    err = np.abs(sel.approx.numpy() - exact ** 2)
    sn = sel.snorm.numpy()
    assert np.all(err <= sel.c * (sn[:, None] + sn[cand]) ** 2 + sel.tiny), f"seed {seed}"


# --------------------------------------------------------------------------- exact neighbours (CPU)
@pytest.mark.parametrize("k,chunk", [(1, 61), (2, None), (7, 250), (40, 333)])
def test_3xtf32_knn_matches_brute_force_and_float32(k, chunk):
    seed = _seed()
    rng = np.random.default_rng(seed)
    n, dim = int(rng.integers(600, 1100)), int(rng.integers(5, 90))
    x = rng.standard_normal((n, dim)) * rng.uniform(0.3, 3.0, dim) + rng.uniform(-20, 20)
    dist, idx = knn_distances(x, k, chunk=chunk, selection_dtype="3xtf32")
    tx = torch.from_numpy(x)
    full = torch.cdist(tx, tx, compute_mode="donot_use_mm_for_euclid_dist")
    full.fill_diagonal_(math.inf)
    ref_d, ref_i = torch.sort(full, dim=1, stable=True)
    np.testing.assert_array_equal(idx.numpy(), ref_i[:, :k].numpy(), err_msg=f"seed {seed}")
    np.testing.assert_allclose(dist.numpy(), ref_d[:, :k].numpy(), rtol=1e-13, atol=0)
    d32, i32 = knn_distances(x, k, chunk=chunk, selection_dtype=torch.float32)
    assert torch.equal(dist, d32) and torch.equal(idx, i32), seed
    ranks = sorted({1, max(1, k // 2), k})
    got, near = distances_at_ranks(tx, ranks, tau=1e-3, selection_dtype="3xtf32")
    got32, near32 = distances_at_ranks(tx, ranks, tau=1e-3, selection_dtype="float32")
    assert torch.equal(got, got32) and torch.equal(near, near32), seed
    np.testing.assert_allclose(got.numpy(), ref_d[:, np.array(ranks) - 1].numpy(), rtol=1e-13)


def test_3xtf32_falls_back_to_float32_then_exact(caplog):
    """A point whose neighbours' squared distances are spaced by δ with c₃₂ < 3δ/R² < c₃ₓ: the
    3xTF32 bound cannot certify its list, the float32 tier must (and the answer stays exact)."""
    seed = _seed()
    rng = np.random.default_rng(seed)
    dim, n_sphere, delta = 64, 300, 3e-6
    u = rng.standard_normal((n_sphere, dim))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    radii = np.sqrt(1.0 + delta * rng.permutation(n_sphere))
    x = np.concatenate([np.zeros((1, dim)), u * radii[:, None]]) + 7.0
    with caplog.at_level(logging.DEBUG, logger="geoprobe.backends.knn_certified"):
        dist, idx = knn_distances(x, 2, selection_dtype="3xtf32")
    assert "redone with a float32 selection" in caplog.text, seed
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="geoprobe.backends.knn_certified"):
        d32, i32 = knn_distances(x, 2, selection_dtype="float32")
    assert "redone" not in caplog.text, seed
    assert torch.equal(idx, i32), seed
    np.testing.assert_allclose(dist.numpy(), d32.numpy(), rtol=1e-15)
    tx = torch.from_numpy(x)
    full = torch.cdist(tx, tx, compute_mode="donot_use_mm_for_euclid_dist")
    full.fill_diagonal_(math.inf)
    np.testing.assert_array_equal(idx[0].numpy(), torch.sort(full[0], stable=True).indices[:2])


def test_selection_names_and_defaults():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert knn._resolve_kind(None, cpu, 4096) == "float32"
    assert knn._resolve_kind(None, cuda, 4096) == "3xtf32"
    assert knn._resolve_kind(None, cuda, 41297) == "3xtf32"
    assert knn._resolve_kind(None, cuda, 41298) == "float32"  # its bound would pass 1e-2
    assert knn._resolve_kind("3xTF32", cpu, 10) == "3xtf32"
    assert knn._resolve_kind(torch.float32, cuda, 10) == "float32"
    assert knn._resolve_kind("float32", cuda, 200_000) == "float64"
    for bad in ("tf32", torch.float16, 32, "bf16x3"):
        with pytest.raises(InputDataError, match="selection_dtype"):
            knn_distances(np.random.default_rng(0).standard_normal((20, 3)), 2, selection_dtype=bad)
    with pytest.raises(InputDataError, match="selection_dtype"):
        intrinsic_dimension(np.random.default_rng(0).standard_normal((50, 3)), selection_dtype="x")


def test_matmul_precision_context_restores_settings():
    """The context switches TF32 on (or off) and puts back every setting it found, including the
    per-backend ones of the newer precision API."""
    cuda = torch.device("cuda")
    backends = [b for b in ("cuda.matmul", "mkldnn.matmul") if knn._backend(b) is not None
                and hasattr(knn._backend(b), "fp32_precision")]

    def state():
        return (torch.get_float32_matmul_precision(),
                tuple(knn._backend(b).fp32_precision for b in backends))

    before = state()
    try:
        for start in ("highest", "medium", "high"):
            torch.set_float32_matmul_precision(start)
            saved = state()
            with knn._matmul_precision(cuda, tf32=True):
                assert torch.get_float32_matmul_precision() == "high"
            assert state() == saved
            with knn._matmul_precision(cuda, tf32=False):
                assert torch.get_float32_matmul_precision() == "highest"
            assert state() == saved
        with pytest.raises(RuntimeError, match="boom"):
            with knn._matmul_precision(cuda, tf32=True):
                raise RuntimeError("boom")
        assert state() == saved
    finally:
        torch.set_float32_matmul_precision(before[0])
        for b, v in zip(backends, before[1]):
            knn._backend(b).fp32_precision = v
    assert state() == before


def test_fixed_order_sum_of_squares_is_exact_on_integers_and_shape_independent():
    """The pairwise sum is exact where every partial sum is (small integers) and gives each row the
    same bits whatever rows it is computed with."""
    rng = np.random.default_rng(_seed())
    for dim in (1, 2, 3, 7, 64, 577):
        a = torch.from_numpy(rng.integers(-50, 50, (40, dim)).astype(np.float64))
        assert torch.equal(knn._sum_squares_fixed_order(a), (a * a).sum(dim=1))
        b = torch.from_numpy(rng.standard_normal((40, dim)))
        whole = knn._sum_squares_fixed_order(b)
        parts = torch.cat([knn._sum_squares_fixed_order(b[s:s + 7]) for s in range(0, 40, 7)])
        assert torch.equal(whole, parts)
        np.testing.assert_allclose(whole.numpy(), (b.numpy() ** 2).sum(axis=1), rtol=1e-14)


# --------------------------------------------------------------------------- CUDA
def _gpu_brute(x: torch.Tensor) -> torch.Tensor:
    """All pair distances on the GPU with the same direct formula as the kNN (diagonal inf)."""
    n = x.shape[0]
    rows = torch.arange(n, device=x.device)
    d = knn._pair_distances(x, rows.repeat_interleave(n), rows.repeat(n)).view(n, n)
    d.fill_diagonal_(math.inf)
    return d


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["gauss", "offset", "near_duplicates", "column_scales",
                                  "outlier_rows"])
def test_gpu_3xtf32_gram_and_distances_within_bound(kind):
    seed = _seed()
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((int(rng.integers(1000, 3000)), 512)) if kind == "gauss"
         else _adversarial(rng)[kind])
    xs = _scaled32(x)
    dim = xs.shape[1]
    t = torch.from_numpy(xs.astype(np.float64)).cuda()
    gram = knn._Gram(t, "3xtf32")
    n = xs.shape[0]
    out = torch.empty((n - 9, n - 4), dtype=torch.float32, device="cuda")
    with knn._matmul_precision(t.device, tf32=True):
        got = gram.product(slice(9, n), slice(4, None), out=out).double().cpu().numpy()
        plain = (gram.hi @ gram.hi.T).double().cpu().numpy()
        tf32_xs = (t.float() @ t.float().T).double().cpu().numpy()
    exact = xs.astype(np.float64) @ xs.astype(np.float64).T
    scale = np.abs(xs).astype(np.float64) @ np.abs(xs).astype(np.float64).T
    bound = _gram_constant(dim) * scale + 1e-30
    err = np.abs(got - exact[9:, 4:])
    assert np.all(err <= bound[9:, 4:]), f"seed {seed}: worst {np.max(err / bound[9:, 4:]):.3g}"
    assert np.any(np.abs(plain - exact) > bound), f"seed {seed}"  # the bound has teeth
    # TF32 really was on inside the context: a plain product of the float32 data errs by far more
    # than float32 round-off (its terms lose up to 2⁻¹¹ each)
    if kind in ("gauss", "offset", "column_scales"):  # dense random mantissas (the structured sets
        # can hold values whose low bits are zero, which TF32 keeps exactly)
        assert np.max(np.abs(tf32_xs - exact) / (scale + 1e-30)) > 2.0 ** -18, f"seed {seed}"
    sel = knn._select(torch.from_numpy(x).cuda(), 12, 1000, None)
    assert sel.kind == "3xtf32"
    cand = sel.cand.cpu().numpy()
    ex = np.linalg.norm(x[cand] - x[:, None, :], axis=2) / sel.radius
    derr = np.abs(sel.approx.cpu().numpy() - ex ** 2)
    sn = sel.snorm.cpu().numpy()
    assert np.all(derr <= sel.c * (sn[:, None] + sn[cand]) ** 2 + sel.tiny), f"seed {seed}"


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("k,chunk", [(1, None), (2, 777), (9, 1000), (33, None)])
def test_gpu_knn_3xtf32_exact(k, chunk):
    """CUDA kNN with the default (3xTF32) selection: the indices of float64 brute force, the very
    distances of a brute force computed with the same direct formula, and the float32 selection's
    answer bit for bit; n is not a multiple of the chunk."""
    seed = _seed()
    rng = np.random.default_rng(seed)
    n, dim = int(rng.integers(2500, 5000)), int(rng.integers(20, 700))
    x = rng.standard_normal((n, dim)) * rng.uniform(0.3, 3.0, dim) + rng.uniform(-30, 30)
    t = torch.from_numpy(x).cuda()
    dist, idx = knn_distances(t, k, chunk=chunk)
    d32, i32 = knn_distances(t, k, chunk=chunk, selection_dtype=torch.float32)
    assert torch.equal(dist, d32) and torch.equal(idx, i32), seed
    ref_d, ref_i = torch.sort(_gpu_brute(t), dim=1, stable=True)
    assert torch.equal(idx, ref_i[:, :k]), seed
    assert torch.equal(dist, ref_d[:, :k]), seed
    cpu_d, cpu_i = knn_distances(x, k, chunk=chunk)
    assert torch.equal(idx.cpu(), cpu_i), seed
    np.testing.assert_allclose(dist.cpu().numpy(), cpu_d.numpy(), rtol=1e-14, atol=0)
    ranks = sorted({1, 2, k})
    got, near = distances_at_ranks(t, ranks, tau=1e-6)
    assert torch.equal(got, ref_d[:, np.array(ranks) - 1]) and not bool(near.any()), seed


@pytest.mark.gpu
@needs_cuda
def test_gpu_intrinsic_dimension_exact_against_brute_force():
    """TwoNN on CUDA equals the estimate from brute-force exact distances (same direct formula),
    with either selection, and the CPU answer to rounding."""
    seed = _seed()
    rng = np.random.default_rng(seed)
    n, dim = int(rng.integers(3000, 6000)), 300
    z = rng.standard_normal((n, 6))
    x = np.tanh(z @ rng.standard_normal((6, dim))) + 0.01 * rng.standard_normal((n, dim)) + 3.0
    t = torch.from_numpy(x).cuda()
    res = intrinsic_dimension(t)
    res32 = intrinsic_dimension(t, selection_dtype=torch.float32)
    assert res.n_points == n and res.backend == "cuda"
    assert (res.dimension, res.error, res.linear_fit_dimension) == \
        (res32.dimension, res32.error, res32.linear_fit_dimension), seed
    d = torch.sort(_gpu_brute(t), dim=1).values[:, :2].cpu().numpy()
    mu = d[:, 1] / d[:, 0]
    assert res.mle_dimension == twonn_mle(mu)[0], seed
    assert res.dimension == res.linear_fit_dimension == pytest.approx(twonn_linear_fit(mu), rel=1e-12), seed
    cpu = intrinsic_dimension(x)
    assert res.dimension == pytest.approx(cpu.dimension, rel=1e-12)
