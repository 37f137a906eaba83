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
values and gradients stay finite and accurate at v = 0. These are the only Python sinhc/asinhc of the
package (HypLoRA's token node and its kernels use them and their one cut-off rule,
:func:`series_cutoff`).

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
    "series_cutoff",
    "sinhc_sq",
    "sinhc_sq_slope",
    "asinhc_sq",
    "asinhc_sq_slope",
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


def series_cutoff(dtype: torch.dtype) -> float:
    """Squared argument below which sinhc and asinhc take their two-term series (the one rule, shared by
    the Python forms here, HypLoRA's token node and its Triton and C++ kernels).

    In the argument u = t² the series are S(u) = 1 + u/6 (+ u²/120 …) and R(u) = 1 − u/6 (+ 3u²/40 …):
    their truncation error is ≤ 3u²/40, which at the cut-off is 7.5e-18 for float64 (cut 1e-8, below
    its unit roundoff 1.1e-16) and 7.5e-10 for float32 (cut 1e-4, below 6e-8). Above the cut-off the
    closed forms are accurate to a few ulps; their slopes lose ≈ 3ε/u to cancellation, but every use of
    a slope carries a factor u (what enters the chain rule is u·S'(u)), so the gradients stay ≈ ε.
    Half-precision arguments are computed in float32 (their own ε is far above either error)."""
    return 1e-8 if dtype == torch.float64 else 1e-4


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def as_positive(value: Curvature, like: torch.Tensor, name: str, meaning: str = "") -> torch.Tensor:
    """``value`` as a tensor of ``like``'s dtype/device; a Python number must be finite and positive
    (``name`` and ``meaning`` word the error). Tensors are not inspected (that would synchronise a GPU);
    they must be positive."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype=like.dtype, device=like.device)
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputDataError(f"{name} must be a positive number or tensor, got {value!r}") from None
    if not math.isfinite(v) or v <= 0.0:
        raise InputDataError(f"{name} must be finite and > 0{meaning}, got {value!r}")
    return torch.tensor(v, dtype=like.dtype, device=like.device)


def _as_curvature(K: Curvature, like: torch.Tensor) -> torch.Tensor:
    """K as a tensor of ``like``'s dtype/device (see :func:`as_positive`)."""
    return as_positive(K, like, "curvature K", " (the hyperboloid has radius sqrt(K))")


def _sqrt_safe(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(x2) with a finite gradient at 0: returns (sqrt(x2) where x2 > 0 else 1, x2 > 0 mask)."""
    positive = x2 > 0
    return torch.sqrt(torch.where(positive, x2, torch.ones_like(x2))), positive


def sinhc_sq(u: torch.Tensor, *, max_t: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """S(u) = sinh(min(√u, max_t))/√u (sinhc of t = √u, 1 at u = 0) and the masked √u (1 where the
    series serves), kept for :func:`sinhc_sq_slope`.

    Series 1 + u/6 below :func:`series_cutoff`; the square is the input so that the gradient is
    finite at t = 0. ``max_t``: clamp of the argument of sinh (HypLoRA's expmap0 clamps at 12)."""
    small = u < series_cutoff(u.dtype)
    t = torch.sqrt(u.masked_fill(small, 1.0))
    closed = torch.sinh(t if max_t is None else t.clamp(max=max_t)) / t
    return torch.where(small, 1.0 + u / 6.0, closed), t


def sinhc_sq_slope(u: torch.Tensor, t: torch.Tensor, *, max_t: Optional[float] = None) -> torch.Tensor:
    """S'(u) = (t cosh t − sinh t)/(2t³) inside the clamp, −sinh(max_t)/(2t³) beyond it; series
    1/6 + u/60 below :func:`series_cutoff` (t: the masked √u of :func:`sinhc_sq`)."""
    tc = t if max_t is None else t.clamp(max=max_t)
    sh = torch.sinh(tc)
    inside = tc * torch.cosh(tc) - sh
    slope = (inside if max_t is None else torch.where(t > max_t, -sh, inside)) / (2.0 * t * t * t)
    return torch.where(u < series_cutoff(u.dtype), 1.0 / 6.0 + u / 60.0, slope)


def asinhc_sq(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """R(v) = asinh(√v)/√v (asinhc of w = √v, 1 at v = 0), the masked v and asinh(√v) (kept for
    :func:`asinhc_sq_slope`). Series 1 − v/6 below :func:`series_cutoff`."""
    small = v < series_cutoff(v.dtype)
    vs = v.masked_fill(small, 1.0)
    ash = torch.asinh(torch.sqrt(vs))
    return torch.where(small, 1.0 - v / 6.0, ash * torch.rsqrt(vs)), vs, ash


def asinhc_sq_slope(v: torch.Tensor, vs: torch.Tensor, ash: torch.Tensor) -> torch.Tensor:
    """R'(v) = (w/√(1+w²) − asinh w)/(2w³), w = √v; series −1/6 + 3v/20 below :func:`series_cutoff`."""
    slope = (torch.rsqrt(1.0 + 1.0 / vs) - ash) * (0.5 * torch.rsqrt(vs) / vs)
    return torch.where(v < series_cutoff(v.dtype), -1.0 / 6.0 + 0.15 * v, slope)


def sinh_ratio(t2: torch.Tensor) -> torch.Tensor:
    """sinhc(t) = sinh(t)/t as a function of t² ≥ 0 (1 at t = 0): :func:`sinhc_sq` without a clamp.
    Half-precision arguments are computed in float32 and returned in their dtype."""
    return sinhc_sq(t2.to(_compute_dtype(t2)))[0].to(t2.dtype)


def asinh_ratio(w2: torch.Tensor) -> torch.Tensor:
    """asinhc(w) = asinh(w)/w as a function of w² ≥ 0 (1 at w = 0): :func:`asinhc_sq`. Since
    arccosh(u) = asinh(√(u²−1)), this is also arccosh(u)/√(u²−1) with w² = u² − 1 (the near-u = 1 guard
    of the logarithmic map). Half-precision arguments are computed in float32."""
    return asinhc_sq(w2.to(_compute_dtype(w2)))[0].to(w2.dtype)


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
