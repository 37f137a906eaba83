"""adapters.lorentz against closed forms evaluated in 50-digit arithmetic (mpmath)."""
from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch

from adapters.lorentz import (MAX_T, asinh_ratio, expmap0, logmap0, logmap0_from_space, sinh_ratio,
                              space_expmap0)
from geoprobe.errors import InputDataError

mpmath.mp.dps = 50


def _mp_expmap0(v: np.ndarray, K: float) -> np.ndarray:
    """Closed form y0 = √K cosh(t), y_s = √K sinh(t) v/‖v‖, t = ‖v‖/√K (no clamp)."""
    sk = mpmath.sqrt(mpmath.mpf(K))
    vm = [mpmath.mpf(float(c)) for c in v]
    nv = mpmath.sqrt(sum(c * c for c in vm))
    t = nv / sk
    y0 = sk * mpmath.cosh(t)
    ys = [sk * mpmath.sinh(t) * c / nv if nv != 0 else mpmath.mpf(0) for c in vm]
    return np.array([float(y0)] + [float(c) for c in ys])


def _mp_logmap0(y: np.ndarray, K: float) -> np.ndarray:
    """Closed form v = √K arccosh(y0/√K) y_s/‖y_s‖."""
    sk = mpmath.sqrt(mpmath.mpf(K))
    ym = [mpmath.mpf(float(c)) for c in y]
    ns = mpmath.sqrt(sum(c * c for c in ym[1:]))
    d = sk * mpmath.acosh(ym[0] / sk)
    return np.array([float(d * c / ns) if ns != 0 else 0.0 for c in ym[1:]])


def _mp_logmap0_space(ys: np.ndarray, K: float) -> np.ndarray:
    """Closed form with the time part formed in 50 digits: y0 = sqrt(‖y_s‖² + K), then logmap0."""
    sk = mpmath.sqrt(mpmath.mpf(K))
    ym = [mpmath.mpf(float(c)) for c in ys]
    ns = mpmath.sqrt(sum(c * c for c in ym))
    y0 = mpmath.sqrt(ns * ns + mpmath.mpf(K))
    d = sk * mpmath.acosh(y0 / sk)
    return np.array([float(d * c / ns) for c in ym])


def _random_tangent(rng: np.random.Generator, norms, dim: int = 5) -> np.ndarray:
    d = rng.standard_normal((len(norms), dim))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return d * np.asarray(norms, dtype=float)[:, None]


NORMS = [0.0, 1e-9, 1e-5, 3e-3, 0.049, 0.051, 0.3, 1.0, 2.7, 7.5, 11.9]


@pytest.mark.parametrize("K", [0.25, 1.0, 3.7])
def test_expmap0_matches_closed_form_float64(K):
    rng = np.random.default_rng(1)
    v = _random_tangent(rng, np.array(NORMS) * math.sqrt(K))
    got = expmap0(torch.from_numpy(v), K).numpy()
    want = np.stack([_mp_expmap0(row, K) for row in v])
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-300)


@pytest.mark.parametrize("K", [0.25, 1.0, 3.7])
def test_logmap0_matches_closed_form_float64(K):
    rng = np.random.default_rng(2)
    v = _random_tangent(rng, np.array(NORMS[1:]) * math.sqrt(K))
    # exact points, built in 50-digit arithmetic, then rounded once to float64
    y = np.stack([_mp_expmap0(row, K) for row in v])
    got = logmap0(torch.from_numpy(y), K).numpy()
    # against the true preimage: near the origin the literal arccosh(y0/√K) is ill-conditioned
    # (y0 rounds to √K for ‖v‖ < 1e-8), the asinhc(w)·y_s form is not
    np.testing.assert_allclose(got, v, rtol=1e-13, atol=0)
    # against the closed form applied to the float64 point, where that form is well-conditioned
    far = np.linalg.norm(v, axis=1) / math.sqrt(K) > 0.01
    want = np.stack([_mp_logmap0(row, K) for row in y[far]])
    np.testing.assert_allclose(got[far], want, rtol=1e-11, atol=0)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-13), (torch.float32, 2e-6)])
def test_round_trip_and_on_hyperboloid(dtype, rtol):
    rng = np.random.default_rng(3)
    for K in (0.5, 1.0, 2.0):
        norms = np.concatenate([[0.0], np.logspace(-8, math.log10(11.9), 40)]) * math.sqrt(K)
        v = torch.from_numpy(_random_tangent(rng, norms, dim=16)).to(dtype)
        y = expmap0(v, K)
        assert y.dtype == dtype and y.shape == (len(norms), 17)
        back = logmap0(y, K)
        err = (back - v).norm(dim=-1) / v.norm(dim=-1).clamp_min(1e-30)
        assert float(err[1:].max()) < 4 * rtol, float(err.max())
        assert torch.equal(back[0], torch.zeros(16, dtype=dtype))
        # Minkowski constraint −y0² + ‖y_s‖² = −K, relative to the size of the terms
        y64 = y.double()
        mink = -y64[:, 0] ** 2 + (y64[:, 1:] ** 2).sum(-1)
        scale = y64[:, 0] ** 2
        assert float(((mink + K) / scale).abs().max()) < 8 * rtol
        assert bool((y64[:, 0] > 0).all())
        # space-only pair
        back_s = logmap0_from_space(space_expmap0(v, K), K)
        err_s = (back_s - v).norm(dim=-1) / v.norm(dim=-1).clamp_min(1e-30)
        assert float(err_s[1:].max()) < 4 * rtol


def test_space_part_matches_full_map_and_consistent_time_part():
    rng = np.random.default_rng(4)
    v = torch.from_numpy(_random_tangent(rng, np.logspace(-6, 1, 12), dim=7))
    K = 1.7
    y = expmap0(v, K)
    ys = space_expmap0(v, K)
    torch.testing.assert_close(ys, y[:, 1:], rtol=1e-15, atol=0)
    y0 = torch.sqrt((ys ** 2).sum(-1) + K)
    torch.testing.assert_close(y0, y[:, 0], rtol=1e-14, atol=0)
    # logmap0_from_space is logmap0 of (sqrt(‖y_s‖² + K), y_s)
    rand = torch.from_numpy(rng.standard_normal((9, 7)) * np.logspace(-7, 3, 9)[:, None])
    want = np.stack([_mp_logmap0_space(row, K) for row in rand.numpy()])
    np.testing.assert_allclose(logmap0_from_space(rand, K).numpy(), want, rtol=1e-13, atol=0)


def test_ratios_against_mpmath_on_both_sides_of_the_series_cutoff():
    for dtype, cut, rtol in [(torch.float64, 1e-3, 2e-16), (torch.float32, 0.05, 1.2e-7)]:
        ts = np.array([0.0, 1e-12, 1e-6, cut * 0.999, cut * 1.001, 0.7, 5.0, 40.0])
        t2 = torch.tensor(ts ** 2, dtype=dtype)
        got_s = sinh_ratio(t2).double().numpy()
        got_a = asinh_ratio(t2).double().numpy()
        want_s = np.array([1.0 if t == 0 else float(mpmath.sinh(mpmath.mpf(t)) / mpmath.mpf(t)) for t in ts])
        want_a = np.array([1.0 if t == 0 else float(mpmath.asinh(mpmath.mpf(t)) / mpmath.mpf(t)) for t in ts])
        np.testing.assert_allclose(got_s, want_s, rtol=4 * rtol)
        np.testing.assert_allclose(got_a, want_a, rtol=4 * rtol)


def test_gradients_finite_and_exact_at_origin():
    for dtype in (torch.float32, torch.float64):
        v = torch.zeros(6, dtype=dtype, requires_grad=True)
        jac = torch.autograd.functional.jacobian(lambda u: space_expmap0(u, 1.3), v)
        torch.testing.assert_close(jac, torch.eye(6, dtype=dtype))  # d(sinhc(t) v)/dv = I at 0
        jac_full = torch.autograd.functional.jacobian(lambda u: expmap0(u, 1.3), v)
        assert torch.isfinite(jac_full).all()
        torch.testing.assert_close(jac_full[0], torch.zeros(6, dtype=dtype))  # y0 is flat at the origin
        ys = torch.zeros(6, dtype=dtype)
        jac_log = torch.autograd.functional.jacobian(lambda u: logmap0_from_space(u, 1.3), ys)
        torch.testing.assert_close(jac_log, torch.eye(6, dtype=dtype))
        origin = torch.cat([torch.tensor([math.sqrt(1.3)], dtype=dtype), ys])
        jac_log_full = torch.autograd.functional.jacobian(lambda u: logmap0(u, 1.3), origin)
        assert torch.isfinite(jac_log_full).all()
        # gradient with respect to K at v = 0 and elsewhere
        k = torch.tensor(0.8, dtype=dtype, requires_grad=True)
        out = expmap0(torch.zeros(3, dtype=dtype), k).sum() + logmap0_from_space(torch.zeros(3, dtype=dtype), k).sum()
        (gk,) = torch.autograd.grad(out, k)
        torch.testing.assert_close(gk, torch.tensor(0.5 / math.sqrt(0.8), dtype=dtype))  # d√K/dK


def test_gradcheck_float64_across_the_series_cutoff():
    rng = np.random.default_rng(5)
    for norm in (1e-4, 9.9e-4, 1.01e-3, 0.2, 3.0, 13.0):  # 13 > MAX_T: the clamped branch
        v = torch.from_numpy(_random_tangent(rng, [norm], dim=4)[0]).requires_grad_(True)
        k = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a, b: expmap0(a, b), (v, k))
        assert torch.autograd.gradcheck(lambda a, b: logmap0_from_space(a, b), (v, k))
        if 0.1 < norm < MAX_T:  # closer to the vertex a finite difference of y0 leaves the hyperboloid's domain
            y = expmap0(v.detach(), 1.0).requires_grad_(True)
            assert torch.autograd.gradcheck(lambda a, b: logmap0(a, b), (y, k))


def test_float32_no_overflow_up_to_1e5_and_clamp_documented():
    norms = np.concatenate([[0.0], np.logspace(-10, 5, 200)])
    rng = np.random.default_rng(6)
    for K in (1e-3, 1.0, 30.0):
        v = torch.from_numpy(_random_tangent(rng, norms, dim=32)).float().requires_grad_(True)
        y = expmap0(v, K)
        ys = space_expmap0(v, K)
        back = logmap0(y, K)
        back_s = logmap0_from_space(ys, K)
        for out in (y, ys, back, back_s):
            assert torch.isfinite(out).all()
        (back.sum() + back_s.sum() + y.sum()).backward()
        assert torch.isfinite(v.grad).all()
        # beyond the clamp the point sits at distance MAX_T·√K along v
        big = v.detach().norm(dim=-1) / math.sqrt(K) > MAX_T * 1.01
        assert bool(big.any())
        y0_cap = math.sqrt(K) * math.cosh(MAX_T)
        torch.testing.assert_close(y[big, 0], torch.full_like(y[big, 0], y0_cap), rtol=1e-6, atol=0)
        dist = back.detach()[big].norm(dim=-1)
        torch.testing.assert_close(dist, torch.full_like(dist, MAX_T * math.sqrt(K)), rtol=1e-5, atol=0)
        cos = torch.nn.functional.cosine_similarity(back.detach()[big], v.detach()[big], dim=-1)
        assert float((1 - cos).abs().max()) < 1e-6


def test_no_clamp_when_disabled_in_float64():
    v = torch.tensor([[20.0, 0.0, 0.0]], dtype=torch.float64)
    y = expmap0(v, 1.0, max_t=None)
    assert y[0, 0].item() == pytest.approx(math.cosh(20.0), rel=1e-14)
    torch.testing.assert_close(logmap0(y, 1.0), v, rtol=1e-12, atol=0)


def test_curvature_as_tensor_and_per_row():
    rng = np.random.default_rng(7)
    v = torch.from_numpy(_random_tangent(rng, [0.1, 1.0, 4.0], dim=3))
    ks = torch.tensor([[0.5], [1.0], [2.0]], dtype=torch.float64)
    y = expmap0(v, ks)
    for i, k in enumerate(ks[:, 0].tolist()):
        torch.testing.assert_close(y[i], expmap0(v[i], k), rtol=0, atol=0)
        torch.testing.assert_close(y[i], expmap0(v[i], torch.tensor(k, dtype=torch.float64)), rtol=0, atol=0)
    torch.testing.assert_close(logmap0(y, ks), v, rtol=1e-12, atol=0)


def test_half_precision_inputs_are_computed_in_float32():
    rng = np.random.default_rng(8)
    v64 = torch.from_numpy(_random_tangent(rng, np.logspace(-3, 1, 10), dim=8))
    vb = v64.to(torch.bfloat16)
    y = expmap0(vb, 1.0)
    assert y.dtype == torch.bfloat16
    ref = expmap0(vb.double(), 1.0)
    torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "one"])
def test_bad_curvature_is_refused(bad):
    with pytest.raises(InputDataError, match="curvature"):
        expmap0(torch.zeros(3), bad)
    with pytest.raises(InputDataError, match="curvature"):
        logmap0_from_space(torch.zeros(3), bad)


def test_logmap0_needs_time_and_space():
    with pytest.raises(InputDataError, match="time and at least one space"):
        logmap0(torch.ones(4, 1), 1.0)


# ============================================================================ the one cut-off rule
def _mp_sinhc_sq(u: float) -> tuple[float, float]:
    """S(u) = sinh(√u)/√u and u·S'(u) in 50 digits (series at u = 0)."""
    um = mpmath.mpf(u)
    if um == 0:
        return 1.0, 0.0
    t = mpmath.sqrt(um)
    return float(mpmath.sinh(t) / t), float(um * (t * mpmath.cosh(t) - mpmath.sinh(t)) / (2 * t ** 3))


def _mp_asinhc_sq(v: float) -> tuple[float, float]:
    """R(v) = asinh(√v)/√v and v·R'(v) in 50 digits."""
    vm = mpmath.mpf(v)
    if vm == 0:
        return 1.0, 0.0
    w = mpmath.sqrt(vm)
    return float(mpmath.asinh(w) / w), float(vm * (w / mpmath.sqrt(1 + w * w) - mpmath.asinh(w)) / (2 * w ** 3))


_UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_one_series_cutoff_is_accurate_at_around_and_far_from_the_switch(dtype):
    """sinhc and asinhc (values, and u·slope — what enters every chain rule) against 50-digit values at the
    switch of lorentz.series_cutoff, just below and above it, a decade either side, at 0 and far out: every
    error within a few units of the dtype's roundoff (bfloat16 arguments are computed in float32 and
    rounded once to bfloat16)."""
    from adapters.lorentz import asinhc_sq, asinhc_sq_slope, series_cutoff, sinhc_sq, sinhc_sq_slope

    compute = torch.float64 if dtype == torch.float64 else torch.float32
    cut = series_cutoff(compute)
    assert series_cutoff(dtype) == cut  # half precision shares float32's rule
    points = [0.0, cut * 1e-3, cut * 0.1, cut * (1 - 1e-3), cut, cut * (1 + 1e-3), cut * 10.0, 1e-2, 0.5, 3.0, 50.0]
    u = torch.tensor(points, dtype=torch.float64).to(dtype)
    used = u.double().tolist()  # the arguments as the dtype holds them
    eps = _UNIT_ROUNDOFF[dtype]
    uc = u.to(compute)
    S, t = sinhc_sq(uc)
    R, vs, ash = asinhc_sq(uc)
    got = {"sinhc": sinh_ratio(u).double(), "asinhc": asinh_ratio(u).double(),
           "u·S'": (uc * sinhc_sq_slope(uc, t)).double(), "v·R'": (uc * asinhc_sq_slope(uc, vs, ash)).double()}
    assert torch.equal(S.to(dtype).double(), got["sinhc"]) and torch.equal(R.to(dtype).double(), got["asinhc"])
    want = {"sinhc": [_mp_sinhc_sq(x)[0] for x in used], "asinhc": [_mp_asinhc_sq(x)[0] for x in used],
            "u·S'": [_mp_sinhc_sq(x)[1] for x in used], "v·R'": [_mp_asinhc_sq(x)[1] for x in used]}
    for name in got:
        ref = np.array(want[name])
        # values relative to themselves; u·slope relative to the value it corrects (S or R, ≈ 1 near the switch)
        scale = np.abs(ref) if name in ("sinhc", "asinhc") else np.maximum(np.abs(ref), np.array(want[
            "sinhc" if name == "u·S'" else "asinhc"]))
        err = np.abs(got[name].numpy() - ref) / scale
        bound = (4.0 if dtype != torch.float32 or name in ("sinhc", "asinhc") else 8.0) * eps
        if dtype == torch.bfloat16 and name in ("u·S'", "v·R'"):
            bound = 8.0 * _UNIT_ROUNDOFF[torch.float32]  # slopes are formed in float32 from the rounded u
        assert err.max() <= bound, (name, dict(zip(points, err.tolist())))


def test_series_switch_is_continuous_in_value_and_slope():
    """Either side of the switch the series and the closed forms agree to working precision."""
    from adapters.lorentz import asinhc_sq, series_cutoff, sinhc_sq

    for dtype in (torch.float64, torch.float32):
        cut = series_cutoff(dtype)
        below = torch.tensor(cut, dtype=torch.float64).nextafter(torch.tensor(0.0, dtype=torch.float64))
        pair = torch.stack([below, torch.tensor(cut, dtype=torch.float64)]).to(dtype)
        for fn in (lambda v: sinhc_sq(v)[0], lambda v: asinhc_sq(v)[0]):
            out = fn(pair).double()
            assert abs(float(out[1] - out[0])) <= 2 * _UNIT_ROUNDOFF[dtype]
