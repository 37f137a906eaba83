"""HypLoRA's pure math: the update Δ(x) as a chain of Lorentz maps and in the rank-r bottleneck, the
positive parametrisation of curvature and scale, and the per-token autograd node (Yang et al.,
"HypLoRA: Hyperbolic Fine-Tuning for Large Language Models", arXiv 2410.04010, NeurIPS 2025).

For an input row x (d_in), curvature K > 0 (hyperboloid of radius √K, curvature −1/K) and scale s > 0:

    n   = ‖x‖/s
    x_s = √K sinh(min(n/√K, 12)) x/‖x‖              space part of expmap0(x/s)
    y   = B A x_s                                     low-rank map of the space part
    y0  = sqrt(‖y‖² + K)                              time part that puts (y0, y) on the hyperboloid
    Δ   = √K arccosh(y0/√K) y/‖y‖ = √K asinh(‖y‖/√K) y/‖y‖     logmap0 back to the tangent space

The layer's output is h = W x + (α/r)·Δ(x); on a 4-bit base (QLoRA) W is the dequantized NF4 weight,
W x = dequantize_4bit(W_nf4) x computed by the bitsandbytes layer, and Δ is unchanged.

Δ has exactly the direction of B A x; only its per-token length is changed (log-compressed). Because
x_s is a per-token multiple of x, everything runs in the rank-r bottleneck (METHODS §10):

    a = A x,  q = aᵀ(BᵀB)a,  ‖y‖² = c1(x)²·q,  Δ = B (c1(x)·c2(‖y‖²)·a)

``official=True`` (the reference formula) reproduces the reference implementation (a patched PEFT
0.15.2 LoRA layer): time part sqrt(‖y‖² + 1/K) — consistent with the hyperboloid only at K = 1 —
arccosh guard ``where(θ < 1.01, sqrt(2·max(θ − 1, 1e-6)), arccosh(max(θ, 1 + 1e-7)))`` with θ = y0/√K,
norms clamped at 1e-7. For K > 1 that gives θ < 1 whenever ‖y‖² < K − 1/K, where ‖Δ‖ is pinned at
√K·sqrt(2e-6) whatever y is: at the reference default (raw curvature 1, K = softplus(1) + 1e-6
≈ 1.313) ‖Δ‖ ≈ 1.6e-3 for all ‖y‖ < 0.74.

sinhc/asinhc, their slopes and the series cut-off are those of :mod:`adapters.lorentz` (the one home
of these formulas); this module is imported by both the layer and the kernels.
"""
from __future__ import annotations

import math
from typing import Union

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from geoprobe.errors import AdapterError, InputDataError

from ..lorentz import (MAX_T, as_positive, asinhc_sq, asinhc_sq_slope, logmap0, series_cutoff, sinhc_sq,
                       sinhc_sq_slope, space_expmap0)

__all__ = [
    "POSITIVE_FLOOR",
    "REFERENCE_DEFAULT_CURVATURE",
    "REF_K_GRAD_CLIP",
    "positive",
    "inverse_positive",
    "initial_scale",
    "matched_alpha",
    "prepare",
    "bottleneck",
    "fused_cutoff",
    "hyplora_delta",
    "hyplora_delta_bottleneck",
    "reference_path",
]

POSITIVE_FLOOR = 1e-6
"""positive(raw) = softplus(raw) + POSITIVE_FLOOR for the curvature (as the reference) and the scale."""

REFERENCE_DEFAULT_CURVATURE = math.log1p(math.e) + POSITIVE_FLOOR
"""K of the reference code at its default raw curvature 1.0: softplus(1) + 1e-6 ≈ 1.3133."""

# Reference-code constants (official mode only).
_REF_NORM_MIN = 1e-7
_REF_K_MIN = 1e-6
_REF_ACOSH_SWITCH = 1.01
_REF_EPS_MIN = 1e-6
_REF_ACOSH_MIN = 1.0 + 1e-7
REF_K_GRAD_CLIP = 0.01
"""The reference clips the gradient of the raw curvature to ±0.01 (official mode)."""

Scalar = Union[float, torch.Tensor]


# --------------------------------------------------------------------------- parametrisation
def positive(raw: torch.Tensor) -> torch.Tensor:
    """softplus(raw) + 1e-6: the reference's curvature parametrisation, also used for the scale s."""
    return F.softplus(raw) + POSITIVE_FLOOR


def initial_scale(d_in: int) -> float:
    """s₀ = √d_in: the initial scale s of the exponential map's argument x/s (the reference code's init)."""
    return math.sqrt(d_in)


def matched_alpha(alpha: float, d_in: int) -> float:
    """α·s₀ = α·√d_in: the α at which HypLoRA's update of a layer with d_in inputs equals LoRA's
    (α/r)·B A x to first order, for the same A and B.

    Where ‖x‖/s ≪ √K, x_s = sinhc(‖x‖/(s√K))·x/s ≈ x/s and the logarithmic map is ≈ the identity, so
    (α/r)·Δ(x) ≈ (α/(r·s₀))·B A x: at LoRA's α HypLoRA's update is 1/√d_in of LoRA's, and under Adam, whose
    steps do not depend on that factor, it moves the model that much less per step (measured on
    SmolLM2's activations by ``benchmarks/hyplora_input_scale.py``: 1/24 to 1/39). Multiplying α by s₀
    matches the two steps in function space; the maps then act only where ‖B A x‖/s₀ reaches √K. This
    scale matching is ours, not the HypLoRA paper's (arXiv 2410.04010 uses α = 128 against LoRA's 64)."""
    return float(alpha) * initial_scale(d_in)


def inverse_positive(value: float) -> float:
    """raw with positive(raw) = value (value > 1e-6), computed without overflow for large values:
    softplus⁻¹(v) = log(expm1(v)) = v + log(1 − exp(−v))."""
    v = float(value) - POSITIVE_FLOOR
    if not math.isfinite(v) or v <= 0.0:
        raise AdapterError(f"a positive HypLoRA parameter must be finite and > {POSITIVE_FLOOR}, got {value!r}")
    return v + math.log(-math.expm1(-v))


# --------------------------------------------------------------------------- inputs
def _check_shapes(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> None:
    if A.dim() != 2 or B.dim() != 2:
        raise InputDataError(f"A must be (r, d_in) and B (d_out, r); got A {tuple(A.shape)}, B {tuple(B.shape)}")
    if x.shape[-1] != A.shape[1] or A.shape[0] != B.shape[1]:
        raise InputDataError(
            f"shapes do not chain: x (..., {x.shape[-1]}), A {tuple(A.shape)}, B {tuple(B.shape)}; "
            "expected x (..., d_in), A (r, d_in), B (d_out, r)")


def prepare(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, K: Scalar, s: Scalar) -> tuple[torch.Tensor, ...]:
    """x, A, B in one compute dtype (float64 if any is float64, else float32) and K, s as tensors of it;
    refuses shapes that do not chain and non-positive K or s."""
    _check_shapes(x, A, B)
    dtype = torch.float64 if torch.float64 in (x.dtype, A.dtype, B.dtype) else torch.float32
    xd, Ad, Bd = x.to(dtype), A.to(dtype), B.to(dtype)
    return xd, Ad, Bd, as_positive(K, xd, "curvature K"), as_positive(s, xd, "scale s")


def fused_cutoff(dtype: torch.dtype) -> float:
    """The series cut-off on the squared arguments u and v (:func:`adapters.lorentz.series_cutoff`),
    passed to the Triton and C++ kernels so that they switch where the Python node does."""
    return series_cutoff(dtype)


# --------------------------------------------------------------------------- the reference formula
def _guarded_norm(sq: torch.Tensor, floor: float) -> torch.Tensor:
    """max(sqrt(sq), floor) with a finite (zero) gradient where sq ≤ floor² — the reference's
    ``norm(...).clamp(min=floor)`` written so that sqrt is never differentiated at 0."""
    big = sq > floor * floor
    return torch.where(big, torch.sqrt(torch.where(big, sq, torch.ones_like(sq))), torch.full_like(sq, floor))


def _reference_acosh(theta: torch.Tensor) -> torch.Tensor:
    eps = torch.clamp(theta - 1.0, min=_REF_EPS_MIN)
    return torch.where(theta < _REF_ACOSH_SWITCH, torch.sqrt(2.0 * eps),
                       torch.arccosh(torch.clamp(theta, min=_REF_ACOSH_MIN)))


def _official_chain(xd, Ad, Bd, k, sc) -> torch.Tensor:
    sk = torch.sqrt(k)
    xn = torch.linalg.vector_norm(xd, dim=-1, keepdim=True).clamp(min=_REF_NORM_MIN)
    x_space = sk * torch.sinh(torch.clamp(xn / sc / sk, max=MAX_T)) * (xd / xn)
    y = x_space @ Ad.T @ Bd.T
    y0 = ((y * y).sum(-1, keepdim=True) + 1.0 / torch.clamp(k, min=_REF_K_MIN)).sqrt()
    yn = torch.linalg.vector_norm(y, dim=-1, keepdim=True).clamp(min=_REF_NORM_MIN)
    return sk * _reference_acosh(y0 / sk) * y / yn


# --------------------------------------------------------------------------- the map chain
def hyplora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, K: Scalar, s: Scalar, *,
                  official: bool = False) -> torch.Tensor:
    """HypLoRA update Δ(x) written as the literal chain of maps (arXiv 2410.04010, Eq. 6–8).

    x_s = space part of expmap0(x/s) with the argument of sinh clamped at 12; y = B A x_s;
    y0 = sqrt(‖y‖² + K); Δ = logmap0((y0, y)) = √K arccosh(y0/√K) y/‖y‖ (series near y0 = √K).
    ``official=True``: the reference code's formula (time part sqrt(‖y‖² + 1/K), its clamps).

    x: (..., d_in); A: (r, d_in); B: (d_out, r); K, s: positive floats or tensors broadcastable to
    x[..., :1]. Computed in float64 if any of x, A, B is float64, else float32; returned in x's dtype.
    Excludes the α/r scaling.
    """
    xd, Ad, Bd, k, sc = prepare(x, A, B, K, s)
    if official:
        return _official_chain(xd, Ad, Bd, k, sc).to(x.dtype)
    x_s = space_expmap0(xd / sc, k, max_t=MAX_T)
    y = x_s @ Ad.T @ Bd.T
    y0 = torch.sqrt((y * y).sum(-1, keepdim=True) + k)
    return logmap0(torch.cat([y0, y], dim=-1), k).to(x.dtype)


def hyplora_delta_bottleneck(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, K: Scalar, s: Scalar, *,
                             official: bool = False) -> torch.Tensor:
    """Same Δ as :func:`hyplora_delta`, computed in the rank-r bottleneck (METHODS §10).

    x_s = c1·x with one scalar per token, so A x_s = c1·a with a = A x; ‖y‖² = c1²·q with
    q = aᵀ G a, G = BᵀB (r × r); Δ = B (c·a) with c = c1·c2. Only two d-wide products (A x and B ·)
    remain; the map itself is per-token scalar work, done by one autograd node with analytic
    derivatives. c1 = sinhc(t)/s (t = ‖x‖/(s√K) ≤ 12, else √K sinh 12/‖x‖) and
    c2 = asinh(‖y‖/√K)·√K/‖y‖; official mode uses the reference's c1, c2 (see module docstring).

    Accuracy note: q from the Gram form carries an absolute error ≈ ε‖G‖‖a‖²; c2 depends on it only
    through asinhc (slope ≤ 1/6), so Δ keeps the working precision except in official mode inside its
    dead zone, where ‖Δ‖ ∝ 1/‖y‖ amplifies it (still a relative error, not a blow-up).
    Differentiable once (a second derivative raises).
    """
    xd, Ad, Bd, k, sc = prepare(x, A, B, K, s)
    return bottleneck(xd, Ad, Bd, k, sc, official=official).to(x.dtype)


# --------------------------------------------------------------------------- the bottleneck node
class _TokenScale(torch.autograd.Function):
    """c = α·c1·c2 per token, with analytic derivatives (consistent map).

    c1 = S(u)/s, u = ‖x‖²/(s²K);  y2 = c1²·q with q = aᵀ(BᵀB)a;  c2 = R(y2/K), with S and R the
    sinhc/asinhc of :mod:`adapters.lorentz` in their squared arguments. Forward and backward are a few
    element-wise passes over the (tokens, 1) scalars instead of the ~100 tiny kernels autograd records
    for the same formulas (METHODS §10); the derivatives are formed only in backward."""

    @staticmethod
    def forward(ctx, sq, q, k, s, alpha: float):
        u = sq / (s * s * k)
        S, t = sinhc_sq(u, max_t=MAX_T)
        c1 = S / s
        v = c1 * c1 * q / k
        R, vs, ash = asinhc_sq(v)
        ctx.alpha = alpha
        ctx.save_for_backward(u, t, q, k, s, S, c1, v, vs, ash, R)
        return (alpha * c1) * R

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        u, t, q, k, s, S, c1, v, vs, ash, R = ctx.saved_tensors
        dS = sinhc_sq_slope(u, t, max_t=MAX_T)
        dR = asinhc_sq_slope(v, vs, ash)
        ga = grad * ctx.alpha
        g_c1 = ga * (R + 2.0 * v * dR)  # through c1 directly and through v = c1²q/K
        g_u = g_c1 * dS / s
        g_sq = g_u / (s * s * k)
        gr = ga * c1 * dR
        g_q = gr * (c1 * c1 / k)
        g_k = -(gr * v + g_u * u) / k
        g_s = -(g_c1 * S / s + 2.0 * g_u * u) / s
        return g_sq, g_q, _sum_to(g_k, k), _sum_to(g_s, s), None


def _sum_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return grad.sum() if like.dim() == 0 else grad.sum_to_size(like.shape)


def bottleneck(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, k: torch.Tensor, s: torch.Tensor, *,
               official: bool, out_scale: float = 1.0) -> torch.Tensor:
    """out_scale·Δ in the bottleneck form for prepared tensors (one dtype, K and s as tensors).

    Two d-wide products (A x, then B ·), one r × r Gram matrix, and per-token scalar work: in the
    consistent map that scalar work is one autograd node (:class:`_TokenScale`); the official map
    keeps the reference's formulas under plain autograd."""
    a = x @ A.T
    sq = (x * x).sum(-1, keepdim=True)
    q = ((a @ (B.T @ B)) * a).sum(-1, keepdim=True).clamp(min=0.0)  # aᵀ G a
    if not official:
        c = _TokenScale.apply(sq, q, k, s, float(out_scale))
        return (c * a) @ B.T
    sk = torch.sqrt(k)
    xn = _guarded_norm(sq, _REF_NORM_MIN)
    c1 = sk * torch.sinh(torch.clamp(xn / s / sk, max=MAX_T)) / xn
    y2 = c1 * c1 * q
    y0 = torch.sqrt(y2 + 1.0 / torch.clamp(k, min=_REF_K_MIN))
    c2 = sk * _reference_acosh(y0 / sk) / _guarded_norm(y2, _REF_NORM_MIN)
    return ((c1 * (c2 * out_scale)) * a) @ B.T


def reference_path(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, raw_k: torch.Tensor, raw_s: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """scale·Δ(x) (consistent map) from the raw parameters, K = positive(raw_k), s = positive(raw_s):
    the path every fast path falls back to."""
    xd, Ad, Bd, k, s = prepare(x, A, B, positive(raw_k), positive(raw_s))
    return bottleneck(xd, Ad, Bd, k, s, official=False, out_scale=float(scale))
