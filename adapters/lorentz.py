"""Exponential and logarithmic maps at the origin of the Lorentz (hyperboloid) model.

The hyperboloid of radius √K (sectional curvature −1/K, K > 0) is

    H = {y = (y0, y_s) ∈ R^(1+d) : −y0² + ‖y_s‖² = −K, y0 > 0},   origin o = (√K, 0).

A tangent vector at o has zero time part, so it is handed over as its d space coordinates v.
With t = ‖v‖/√K (Nickel & Kiela 2018, "Learning Continuous Hierarchies in the Lorentz Model";
Chami et al. 2019, "Hyperbolic Graph Convolutional Neural Networks"; same conventions as geoopt):

    expmap0(v)  = (√K cosh t,  √K sinh t · v/‖v‖) = (√K cosh t,  sinhc(t) · v)
    logmap0(y)  = √K arccosh(y0/√K) · y_s/‖y_s‖  = asinhc(w) · y_s,   w = sqrt((y0/√K)² − 1)

where sinhc(t) = sinh(t)/t and asinhc(w) = asinh(w)/w; the second forms use arccosh(u) = asinh(√(u²−1))
and ‖y_s‖ = √K·w on H. They have no division by ‖v‖ or ‖y_s‖, so the origin needs no special case, and
both ratios are evaluated from the *square* of their argument with a Taylor series near zero, so
values and gradients stay finite and accurate at v = 0.

Numerical guards (the reasons, not just the numbers):

* ``MAX_T = 12``: the argument of sinh/cosh is clamped at 12 as in the HypLoRA reference code.
  cosh(12) ≈ 8.1e4, so y0² ≈ 6.6e9·K, where the float32 spacing (≈ 512·K) already exceeds K: beyond
  this the hyperboloid constraint is not representable in float32, and sinh itself overflows float32
  at t ≈ 89. LLM activations reach ‖x‖ ≈ 1e4 (attention sinks), so the clamp is needed. Past the
  clamp expmap0 returns the point at distance 12·√K along v (not the exact map); pass
  ``max_t=None`` to disable it (float64 callers with moderate norms).
* Logarithmic map: y0/√K is clamped at ≥ 1 (points pushed below the vertex by rounding), and
  w² = (u − 1)(u + 1) is formed without squaring u, so it neither cancels near u = 1 nor overflows.
* Half-precision inputs are computed in float32 and returned in their own dtype; float64 stays float64.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from geoprobe.errors import InputDataError

__all__ = [
    "MAX_T",
    "Curvature",
    "sinh_ratio",
    "asinh_ratio",
    "expmap0",
    "logmap0",
    "space_expmap0",
    "logmap0_from_space",
]

MAX_T: float = 12.0
"""Clamp of the argument t = ‖v‖/√K of sinh/cosh (HypLoRA reference code uses the same value)."""

Curvature = Union[float, torch.Tensor]


def _series_cutoff(dtype: torch.dtype) -> float:
    """Below this |argument| the 3-term Taylor series is used; its truncation error (≤ 5·x⁶/112)
    is under 1e-18 for float64 at 1e-3 and under 1e-9 for float32 at 0.05."""
    return 1e-3 if dtype == torch.float64 else 0.05


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _as_curvature(K: Curvature, like: torch.Tensor) -> torch.Tensor:
    """K as a tensor of ``like``'s dtype/device; a Python number must be finite and positive.
    Tensors are not inspected (that would synchronise a GPU); they must be positive."""
    if isinstance(K, torch.Tensor):
        return K.to(dtype=like.dtype, device=like.device)
    try:
        k = float(K)
    except (TypeError, ValueError):
        raise InputDataError(f"curvature K must be a positive number or tensor, got {K!r}") from None
    if not math.isfinite(k) or k <= 0.0:
        raise InputDataError(
            f"curvature K must be finite and > 0 (the hyperboloid has radius sqrt(K)), got {K!r}")
    return torch.tensor(k, dtype=like.dtype, device=like.device)


def _sqrt_safe(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(x2) with a finite gradient at 0: returns (sqrt(x2) where x2 > 0 else 1, x2 > 0 mask)."""
    positive = x2 > 0
    return torch.sqrt(torch.where(positive, x2, torch.ones_like(x2))), positive


def sinh_ratio(t2: torch.Tensor) -> torch.Tensor:
    """sinhc(t) = sinh(t)/t as a function of t² ≥ 0 (1 at t = 0).

    Series 1 + t²/6 + t⁴/120 below the cutoff, sinh(t)/t above; the square is taken as input so that
    the gradient is finite at t = 0."""
    small = t2 < _series_cutoff(t2.dtype) ** 2
    t, _ = _sqrt_safe(torch.where(small, torch.ones_like(t2), t2))
    series = 1.0 + t2 / 6.0 + t2 * t2 / 120.0
    return torch.where(small, series, torch.sinh(t) / t)


def asinh_ratio(w2: torch.Tensor) -> torch.Tensor:
    """asinhc(w) = asinh(w)/w as a function of w² ≥ 0 (1 at w = 0).

    Series 1 − w²/6 + 3w⁴/40 below the cutoff, asinh(w)/w above. Since arccosh(u) = asinh(√(u²−1)),
    this is also arccosh(u)/√(u²−1) with w² = u² − 1 (the near-u = 1 guard of the logarithmic map)."""
    small = w2 < _series_cutoff(w2.dtype) ** 2
    w, _ = _sqrt_safe(torch.where(small, torch.ones_like(w2), w2))
    series = 1.0 - w2 / 6.0 + 3.0 * w2 * w2 / 40.0
    return torch.where(small, series, torch.asinh(w) / w)


def _space_factor(sq_norm: torch.Tensor, k: torch.Tensor, max_t: Optional[float]) -> tuple[
        torch.Tensor, torch.Tensor]:
    """For a tangent vector with ‖v‖² = sq_norm: returns (f, t_c) with y_s = f·v and t_c the clamped
    t = ‖v‖/√K, i.e. f = sinhc(t) for t ≤ max_t and sinh(max_t)/t beyond."""
    t2 = sq_norm / k
    t_in, positive = _sqrt_safe(t2)
    t = torch.where(positive, t_in, torch.zeros_like(t2))
    if max_t is None:
        return sinh_ratio(t2), t
    over = t2 > max_t * max_t
    t_over = torch.where(over, t_in, torch.ones_like(t2))
    inside = sinh_ratio(torch.where(over, torch.zeros_like(t2), t2))
    factor = torch.where(over, math.sinh(max_t) / t_over, inside)
    return factor, torch.where(over, torch.full_like(t2, max_t), t)


def space_expmap0(v: torch.Tensor, K: Curvature, *, max_t: Optional[float] = MAX_T) -> torch.Tensor:
    """Space part of expmap0: y_s = √K sinh(min(t, max_t)) v/‖v‖ = sinhc(t)·v (t = ‖v‖/√K ≤ max_t).

    ``v``: (..., d) tangent vectors at the origin; ``K``: float or tensor broadcastable to v[..., :1].
    Returns (..., d) in v's dtype. The time part is y0 = sqrt(‖y_s‖² + K)."""
    dtype = _compute_dtype(v)
    x = v.to(dtype)
    k = _as_curvature(K, x)
    factor, _ = _space_factor((x * x).sum(-1, keepdim=True), k, max_t)
    return (factor * x).to(v.dtype)


def expmap0(v: torch.Tensor, K: Curvature, *, max_t: Optional[float] = MAX_T) -> torch.Tensor:
    """Exponential map at the origin o = (√K, 0) of the hyperboloid −y0² + ‖y_s‖² = −K.

    y0 = √K cosh(t), y_s = √K sinh(t) v/‖v‖ = sinhc(t)·v, t = min(‖v‖/√K, max_t).
    ``v``: (..., d) space coordinates of a tangent vector at o. Returns (..., d + 1) points."""
    dtype = _compute_dtype(v)
    x = v.to(dtype)
    k = _as_curvature(K, x)
    factor, t_c = _space_factor((x * x).sum(-1, keepdim=True), k, max_t)
    y0 = torch.sqrt(k) * torch.cosh(t_c)
    return torch.cat([y0, factor * x], dim=-1).to(v.dtype)


def logmap0(y: torch.Tensor, K: Curvature) -> torch.Tensor:
    """Logarithmic map at the origin: v = √K arccosh(y0/√K) y_s/‖y_s‖ = asinhc(w)·y_s.

    w² = (u − 1)(u + 1), u = max(y0/√K, 1). ``y``: (..., d + 1) points on the hyperboloid of radius √K.
    Returns (..., d) tangent vectors (space coordinates). Exact inverse of :func:`expmap0` for
    ‖v‖ ≤ MAX_T·√K."""
    if y.shape[-1] < 2:
        raise InputDataError(
            f"logmap0 needs points with a time and at least one space coordinate, got shape {tuple(y.shape)}")
    dtype = _compute_dtype(y)
    p = y.to(dtype)
    k = _as_curvature(K, p)
    u = torch.clamp(p[..., :1] / torch.sqrt(k), min=1.0)
    w2 = (u - 1.0) * (u + 1.0)
    return (asinh_ratio(w2) * p[..., 1:]).to(y.dtype)


def logmap0_from_space(y_s: torch.Tensor, K: Curvature) -> torch.Tensor:
    """logmap0 of the point whose space part is y_s and whose time part is the consistent
    y0 = sqrt(‖y_s‖² + K): v = √K arccosh(y0/√K) y_s/‖y_s‖ = asinhc(‖y_s‖/√K)·y_s.

    (arccosh(sqrt(1 + r²)) = asinh(r), so no time coordinate is formed and nothing cancels near
    the origin.) ``y_s``: (..., d); returns (..., d) in y_s's dtype."""
    dtype = _compute_dtype(y_s)
    p = y_s.to(dtype)
    k = _as_curvature(K, p)
    return (asinh_ratio((p * p).sum(-1, keepdim=True) / k) * p).to(y_s.dtype)
