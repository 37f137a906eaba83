"""HypLoRA: low-rank adaptation routed through the Lorentz model (Yang et al., "HypLoRA: Hyperbolic
Fine-Tuning for Large Language Models", arXiv 2410.04010, NeurIPS 2025).

For an input row x (d_in), learnable curvature K > 0 (hyperboloid of radius √K, curvature −1/K) and
learnable scale s > 0:

    n   = ‖x‖/s
    x_s = √K sinh(min(n/√K, 12)) x/‖x‖              space part of expmap0(x/s)
    y   = B A x_s                                     low-rank map of the space part
    y0  = sqrt(‖y‖² + K)                              time part that puts (y0, y) on the hyperboloid
    Δ   = √K arccosh(y0/√K) y/‖y‖ = √K asinh(‖y‖/√K) y/‖y‖     logmap0 back to the tangent space
    h   = W x + (α/r) Δ(dropout(x))

Δ has exactly the direction of B A x; only its per-token length is changed (log-compressed). Because
x_s is a per-token multiple of x, everything runs in the rank-r bottleneck:

    a = A x,  q = aᵀ(BᵀB)a,  ‖y‖² = c1(x)²·q,  Δ = B (c1(x)·c2(‖y‖²)·a)

(:func:`hyplora_delta_bottleneck`, used by the layer; :func:`hyplora_delta` is the literal map chain
it is tested against). The update is nonlinear in x, so it cannot be merged into W:
:meth:`HypLoraLinear.merge` refuses.

``official=True`` reproduces the reference implementation (a patched PEFT 0.15.2 LoRA layer): its
time part is sqrt(‖y‖² + 1/K) — consistent with the hyperboloid only at K = 1 — its arccosh guard is
``where(θ < 1.01, sqrt(2·max(θ − 1, 1e-6)), arccosh(max(θ, 1 + 1e-7)))`` with θ = y0/√K, and its
norms are clamped at 1e-7. For K > 1 that gives θ < 1 whenever ‖y‖² < K − 1/K, where ‖Δ‖ is pinned
at √K·sqrt(2e-6) whatever y is: at the reference default (raw curvature 1, K = softplus(1) + 1e-6
≈ 1.313) ‖Δ‖ ≈ 1.6e-3 for all ‖y‖ < 0.74. The layer in official mode also clips the gradient of the
raw curvature to ±0.01 as the reference does.

PEFT integration: :class:`HypLoraLinear` subclasses ``peft.tuners.lora.Linear`` and is plugged in with
``LoraConfig._register_custom_module({nn.Linear: HypLoraLinear})`` (done by :func:`hyplora_config` /
:func:`register_hyplora`). The mapping and the options (initial curvature, official flag) are *not*
saved by ``save_pretrained``: re-register them before ``PeftModel.from_pretrained(..., config=cfg)``.
"""
from __future__ import annotations

import contextlib
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraVariant
from peft.tuners.tuners_utils import check_adapters_to_merge
from peft.utils.other import get_pattern_key

from geoprobe.errors import AdapterError, InputDataError
from geoprobe.profile import Record

from .lorentz import MAX_T, logmap0, space_expmap0
from .kernels.hyplora_fused import (hyplora_bottleneck_fused, hyplora_layer_native, hyplora_linear_fused,
                                    linear_fast_path)

logger = logging.getLogger(__name__)

__all__ = [
    "POSITIVE_FLOOR",
    "REFERENCE_DEFAULT_CURVATURE",
    "positive",
    "inverse_positive",
    "hyplora_delta",
    "hyplora_delta_bottleneck",
    "HypLoraOptions",
    "HypLoraLinear",
    "register_hyplora",
    "hyplora_config",
    "hyplora_options",
    "NOT_MERGEABLE",
]

POSITIVE_FLOOR = 1e-6
"""positive(raw) = softplus(raw) + POSITIVE_FLOOR for the curvature (as the reference) and the scale."""

REFERENCE_DEFAULT_CURVATURE = math.log1p(math.e) + POSITIVE_FLOOR
"""K of the reference code at its default raw curvature 1.0: softplus(1) + 1e-6 ≈ 1.3133."""

NOT_MERGEABLE = "HypLoRA is not mergeable: its update is nonlinear in x"

# Reference-code constants (official mode only).
_REF_NORM_MIN = 1e-7
_REF_K_MIN = 1e-6
_REF_ACOSH_SWITCH = 1.01
_REF_EPS_MIN = 1e-6
_REF_ACOSH_MIN = 1.0 + 1e-7
_REF_K_GRAD_CLIP = 0.01

Scalar = Union[float, torch.Tensor]


# --------------------------------------------------------------------------- parametrisation
def positive(raw: torch.Tensor) -> torch.Tensor:
    """softplus(raw) + 1e-6: the reference's curvature parametrisation, also used for the scale s."""
    return F.softplus(raw) + POSITIVE_FLOOR


def inverse_positive(value: float) -> float:
    """raw with positive(raw) = value (value > 1e-6), computed without overflow for large values."""
    v = float(value) - POSITIVE_FLOOR
    if not math.isfinite(v) or v <= 0.0:
        raise AdapterError(f"a positive HypLoRA parameter must be finite and > {POSITIVE_FLOOR}, got {value!r}")
    # softplus^-1(v) = log(expm1(v)) = v + log(1 - exp(-v))
    return v + math.log(-math.expm1(-v))


# --------------------------------------------------------------------------- the pure map
def _check_shapes(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> None:
    if A.dim() != 2 or B.dim() != 2:
        raise InputDataError(f"A must be (r, d_in) and B (d_out, r); got A {tuple(A.shape)}, B {tuple(B.shape)}")
    if x.shape[-1] != A.shape[1] or A.shape[0] != B.shape[1]:
        raise InputDataError(
            f"shapes do not chain: x (..., {x.shape[-1]}), A {tuple(A.shape)}, B {tuple(B.shape)}; "
            "expected x (..., d_in), A (r, d_in), B (d_out, r)")


def _as_positive(value: Scalar, like: torch.Tensor, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(dtype=like.dtype, device=like.device)
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputDataError(f"{name} must be a positive number or tensor, got {value!r}") from None
    if not math.isfinite(v) or v <= 0.0:
        raise InputDataError(f"{name} must be finite and > 0, got {value!r}")
    return torch.tensor(v, dtype=like.dtype, device=like.device)


def _prepare(x, A, B, K, s):
    _check_shapes(x, A, B)
    dtype = torch.float64 if torch.float64 in (x.dtype, A.dtype, B.dtype) else torch.float32
    xd, Ad, Bd = x.to(dtype), A.to(dtype), B.to(dtype)
    return xd, Ad, Bd, _as_positive(K, xd, "curvature K"), _as_positive(s, xd, "scale s")


def _guarded_norm(sq: torch.Tensor, floor: float) -> torch.Tensor:
    """max(sqrt(sq), floor) with a finite (zero) gradient where sq ≤ floor² — the reference's
    ``norm(...).clamp(min=floor)`` written so that sqrt is never differentiated at 0."""
    big = sq > floor * floor
    return torch.where(big, torch.sqrt(torch.where(big, sq, torch.ones_like(sq))), torch.full_like(sq, floor))


def _reference_acosh(theta: torch.Tensor) -> torch.Tensor:
    eps = torch.clamp(theta - 1.0, min=_REF_EPS_MIN)
    return torch.where(theta < _REF_ACOSH_SWITCH, torch.sqrt(2.0 * eps),
                       torch.arccosh(torch.clamp(theta, min=_REF_ACOSH_MIN)))


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
    xd, Ad, Bd, k, sc = _prepare(x, A, B, K, s)
    if official:
        sk = torch.sqrt(k)
        xn = torch.linalg.vector_norm(xd, dim=-1, keepdim=True).clamp(min=_REF_NORM_MIN)
        x_space = sk * torch.sinh(torch.clamp(xn / sc / sk, max=MAX_T)) * (xd / xn)
        y = x_space @ Ad.T @ Bd.T
        y0 = ((y * y).sum(-1, keepdim=True) + 1.0 / torch.clamp(k, min=_REF_K_MIN)).sqrt()
        yn = torch.linalg.vector_norm(y, dim=-1, keepdim=True).clamp(min=_REF_NORM_MIN)
        delta = sk * _reference_acosh(y0 / sk) * y / yn
    else:
        x_s = space_expmap0(xd / sc, k, max_t=MAX_T)
        y = x_s @ Ad.T @ Bd.T
        y0 = torch.sqrt((y * y).sum(-1, keepdim=True) + k)
        delta = logmap0(torch.cat([y0, y], dim=-1), k)
    return delta.to(x.dtype)


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
    xd, Ad, Bd, k, sc = _prepare(x, A, B, K, s)
    return _bottleneck(xd, Ad, Bd, k, sc, official=official).to(x.dtype)


def _fused_cutoff(dtype: torch.dtype) -> float:
    """Below this squared argument the two-term series replaces the closed forms (whose 0/0 it avoids).

    Truncation error ≤ u²/120 (value) — below 1e-17 in float64 at 1e-8 and 1e-10 in float32 at 1e-4.
    The closed-form derivatives lose ≈ ε/u to cancellation near the cutoff, but every use of S'(u) and
    R'(v) in the chain rule carries a factor u or v (the derivative of c with respect to log u or log v
    is what enters), so their effect on the gradients stays ≈ ε."""
    return 1e-8 if dtype == torch.float64 else 1e-4


def _sinhc_u(u: torch.Tensor, cut: float) -> tuple[torch.Tensor, torch.Tensor]:
    """S(u) = sinh(min(√u, 12))/√u (the clamped sinhc of HypLoRA's expmap0) and the masked √u."""
    small = u < cut
    t = torch.sqrt(u.masked_fill(small, 1.0))
    return torch.where(small, 1.0 + u / 6.0, torch.sinh(t.clamp(max=MAX_T)) / t), t


def _sinhc_u_slope(u: torch.Tensor, t: torch.Tensor, cut: float) -> torch.Tensor:
    """S'(u): (t cosh t − sinh t)/(2t³) inside the clamp, −sinh(12)/(2t³) beyond it."""
    tc = t.clamp(max=MAX_T)
    sh = torch.sinh(tc)
    slope = torch.where(t > MAX_T, -sh, tc * torch.cosh(tc) - sh) / (2.0 * t * t * t)
    return torch.where(u < cut, 1.0 / 6.0 + u / 60.0, slope)


def _asinhc_v(v: torch.Tensor, cut: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """R(v) = asinh(√v)/√v, the masked v and asinh(√v) (kept for the slope)."""
    small = v < cut
    vs = v.masked_fill(small, 1.0)
    ash = torch.asinh(torch.sqrt(vs))
    return torch.where(small, 1.0 - v / 6.0, ash * torch.rsqrt(vs)), vs, ash


def _asinhc_v_slope(v: torch.Tensor, vs: torch.Tensor, ash: torch.Tensor, cut: float) -> torch.Tensor:
    """R'(v) = (w/√(1+w²) − asinh w)/(2w³), w = √v."""
    slope = (torch.rsqrt(1.0 + 1.0 / vs) - ash) * (0.5 * torch.rsqrt(vs) / vs)
    return torch.where(v < cut, -1.0 / 6.0 + 0.15 * v, slope)


class _TokenScale(torch.autograd.Function):
    """c = α·c1·c2 per token, with analytic derivatives (consistent map).

    c1 = S(u)/s, u = ‖x‖²/(s²K);  y2 = c1²·q with q = aᵀ(BᵀB)a;  c2 = R(y2/K).
    Forward and backward are a few element-wise passes over the (tokens, 1) scalars instead of the
    ~100 tiny kernels autograd records for the same formulas (METHODS §10); the derivatives are
    formed only in backward."""

    @staticmethod
    def forward(ctx, sq, q, k, s, alpha: float):
        cut = _fused_cutoff(sq.dtype)
        u = sq / (s * s * k)
        S, t = _sinhc_u(u, cut)
        c1 = S / s
        v = c1 * c1 * q / k
        R, vs, ash = _asinhc_v(v, cut)
        ctx.alpha = alpha
        ctx.save_for_backward(u, t, q, k, s, S, c1, v, vs, ash, R)
        return (alpha * c1) * R

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        u, t, q, k, s, S, c1, v, vs, ash, R = ctx.saved_tensors
        cut = _fused_cutoff(u.dtype)
        dS = _sinhc_u_slope(u, t, cut)
        dR = _asinhc_v_slope(v, vs, ash, cut)
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


def _bottleneck(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, k: torch.Tensor, s: torch.Tensor, *,
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


# --------------------------------------------------------------------------- options
@dataclass(frozen=True)
class HypLoraOptions(Record):
    """What a HypLoRA adapter needs beyond ``LoraConfig`` (not saved by PEFT: keep it in a sidecar).

    curvature: initial K (> 1e-6) for every adapted layer; curvature_pattern: {regex: K} matched against
    the end of the module name like ``LoraConfig.rank_pattern`` (first match wins); official: use the
    reference code's formula (see module docstring).
    """

    curvature: float = 1.0
    curvature_pattern: dict[str, float] = field(default_factory=dict)
    official: bool = False

    def __post_init__(self) -> None:
        for where, value in [("curvature", self.curvature), *(
                (f"curvature_pattern[{k!r}]", v) for k, v in self.curvature_pattern.items())]:
            try:
                ok = math.isfinite(float(value)) and float(value) > POSITIVE_FLOOR
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise AdapterError(f"HypLoRA {where} must be a number > {POSITIVE_FLOOR}, got {value!r}")
        for key in self.curvature_pattern:
            try:
                re.compile(key)
            except re.error as exc:
                raise AdapterError(f"HypLoRA curvature_pattern key {key!r} is not a valid regex: {exc}") from None

    def curvature_for(self, module_name: str) -> float:
        """Initial K of the module called ``module_name`` (pattern first, then the default)."""
        if self.curvature_pattern:
            key = get_pattern_key(list(self.curvature_pattern), module_name)
            if key in self.curvature_pattern:
                return float(self.curvature_pattern[key])
        return float(self.curvature)


_OPTIONS_ATTR = "_hyplora_options"


def hyplora_options(config: LoraConfig) -> Optional[HypLoraOptions]:
    """The HypLoRA options attached to ``config``, or None when HypLoraLinear is not registered on it."""
    modules = getattr(config, "_custom_modules", None) or {}
    if not any(isinstance(cls, type) and issubclass(cls, HypLoraLinear) for cls in modules.values()):
        return None
    return getattr(config, _OPTIONS_ATTR, None) or HypLoraOptions()


_SUPPORTED_INITS = (True, False, "gaussian")


def _check_config(config: LoraConfig) -> None:
    """Refuse LoraConfig settings that HypLoRA cannot honour, instead of silently ignoring them."""
    problems = []
    if getattr(config, "use_dora", False):
        problems.append("use_dora=True (DoRA rescales W + BA, which HypLoRA does not form)")
    if getattr(config, "lora_bias", False):
        problems.append("lora_bias=True (a bias in B breaks Δ = B·(c·a))")
    init = getattr(config, "init_lora_weights", True)
    if not any(init is v or init == v for v in _SUPPORTED_INITS):
        problems.append(f"init_lora_weights={init!r} (only True, False and 'gaussian' leave W untouched "
                        "and are meaningful for a nonlinear update)")
    if getattr(config, "target_parameters", None):
        problems.append("target_parameters (HypLoRA adapts nn.Linear modules, not bare parameters)")
    for name in ("use_bdlora", "alora_invocation_tokens", "velora_config", "monteclora_config",
                 "kasa_config", "arrow_config", "loftq_config", "lora_ga_config"):
        value = getattr(config, name, None)
        if value:
            problems.append(f"{name}={value!r}")
    if problems:
        raise AdapterError("HypLoRA cannot be combined with " + "; ".join(problems)
                           + ". Remove these options from the LoraConfig.")


def register_hyplora(config: LoraConfig, *, curvature: float = 1.0,
                     curvature_pattern: Optional[Mapping[str, float]] = None,
                     official: bool = False) -> LoraConfig:
    """Make ``config`` build HypLoRA layers for every targeted ``nn.Linear`` and attach the options.

    Mutates and returns ``config``. Call it again on a config read back with
    ``LoraConfig.from_pretrained`` before ``PeftModel.from_pretrained(model, path, config=config)``:
    PEFT does not save the custom-module mapping. Targets that are not ``nn.Linear`` are refused
    (PEFT would otherwise silently build plain LoRA layers for them).
    """
    if not isinstance(config, LoraConfig):
        raise AdapterError(f"register_hyplora needs a peft.LoraConfig, got {type(config).__name__}")
    _check_config(config)
    options = HypLoraOptions(curvature=float(curvature), curvature_pattern=dict(curvature_pattern or {}),
                             official=bool(official))
    config._register_custom_module({nn.Linear: HypLoraLinear, nn.Module: _UnsupportedTarget})
    setattr(config, _OPTIONS_ATTR, options)
    return config


def hyplora_config(r: int, alpha: float, target_modules: Union[str, Sequence[str]], curvature: float = 1.0,
                   *, curvature_pattern: Optional[Mapping[str, float]] = None, official: bool = False,
                   **lora_kwargs: Any) -> LoraConfig:
    """A ``LoraConfig`` whose targeted ``nn.Linear`` layers become :class:`HypLoraLinear`.

    ``curvature`` is the initial K of every layer (``curvature_pattern`` overrides per module);
    ``lora_kwargs`` go to ``LoraConfig`` (lora_dropout, rank_pattern, alpha_pattern, use_rslora, …).
    The paper's settings: r = 32, alpha = 128, lora_dropout = 0.05, targets q,k,v,up,down.
    """
    if not isinstance(r, int) or r <= 0:
        raise AdapterError(f"HypLoRA rank r must be a positive integer, got {r!r}")
    try:
        config = LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules, **lora_kwargs)
    except (TypeError, ValueError) as exc:
        raise AdapterError(f"invalid LoraConfig options for HypLoRA: {exc}") from None
    return register_hyplora(config, curvature=curvature, curvature_pattern=curvature_pattern, official=official)


# --------------------------------------------------------------------------- the PEFT layer
class _ClipGrad(torch.autograd.Function):
    """Identity whose backward clamps the incoming gradient to [−c, c] (the reference's hook on the
    raw curvature, written without tensor hooks so the module stays copyable)."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, bound: float) -> torch.Tensor:
        ctx.bound = bound
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.clamp(-ctx.bound, ctx.bound), None


def _no_autocast(device_type: str):
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except (RuntimeError, ValueError):
        return contextlib.nullcontext()


def _not_mergeable(names: Sequence[str]) -> AdapterError:
    return AdapterError(
        f"{NOT_MERGEABLE} (adapter {', '.join(map(repr, names))}): Δ = √K·asinh(‖BAx_s‖/√K)·BAx_s/‖BAx_s‖ "
        "changes length with every token, so no weight matrix W + ΔW reproduces it. Keep the adapter "
        "unmerged (run the PeftModel), or train plain LoRA if a merged checkpoint is required.")


class _HypLoraVariant(LoraVariant):
    """Hooks HypLoRA into PEFT's per-adapter dispatch (regular and mixed-batch forward, merge)."""

    def supports_lora_conversion(self) -> bool:
        return False

    @staticmethod
    def init(module, adapter_name: str, **kwargs: Any) -> None:
        return None

    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        raise _not_mergeable([active_adapter])

    @staticmethod
    def merge_unsafe(module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        raise _not_mergeable([active_adapter])

    @staticmethod
    def unmerge(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        raise _not_mergeable([active_adapter])

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return result + module.hyp_delta(active_adapter, x).to(result.dtype)


class HypLoraLinear(LoraLinear):
    """PEFT LoRA ``Linear`` whose update is HypLoRA's: h = W x + (α/r)·Δ(dropout(x)).

    Per adapter, besides ``lora_A``/``lora_B``: ``lora_hyp_k`` (raw curvature, K = softplus(raw) + 1e-6,
    initialised to the configured K) and ``lora_hyp_s`` (raw scale, s = softplus(raw) + 1e-6,
    initialised to √d_in). Δ is computed by :func:`hyplora_delta_bottleneck` in float32 under any
    autocast/bf16 setting and cast back. Adapters added to the same layer with a config that does not
    register HypLoRA stay plain LoRA. Merging a HypLoRA adapter raises :class:`AdapterError`.
    """

    adapter_layer_names = LoraLinear.adapter_layer_names + ("lora_hyp_k", "lora_hyp_s")
    other_param_names = LoraLinear.other_param_names + ("hyp_official",)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: LoraConfig, **kwargs: Any) -> None:
        if not hasattr(self, "lora_hyp_k"):
            self.lora_hyp_k = nn.ParameterDict({})
            self.lora_hyp_s = nn.ParameterDict({})
            self.hyp_official: dict[str, bool] = {}
        options = hyplora_options(config)
        if options is None:  # a plain LoRA adapter added next to a HypLoRA one
            super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
            return
        _check_config(config)
        if self.resolve_lora_variant(config=config) is not None:
            raise AdapterError("HypLoRA cannot be combined with another LoRA variant requested by the LoraConfig "
                               f"({type(self.resolve_lora_variant(config=config)).__name__}); remove that option.")
        if self.in_features is None or self.out_features is None:
            raise AdapterError(f"HypLoRA needs a layer with in_features/out_features, got {type(self.base_layer)}")
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        curvature = options.curvature_for(kwargs.get("target_name", "") or "")
        device = self.lora_A[adapter_name].weight.device
        self.lora_hyp_k[adapter_name] = nn.Parameter(
            torch.tensor(inverse_positive(curvature), dtype=torch.float32, device=device))
        self.lora_hyp_s[adapter_name] = nn.Parameter(
            torch.tensor(inverse_positive(math.sqrt(self.in_features)), dtype=torch.float32, device=device))
        self.hyp_official[adapter_name] = options.official
        self.lora_variant[adapter_name] = _HypLoraVariant()
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)
        logger.debug("HypLoRA adapter %r on %s: r=%d, K0=%.4g, s0=%.4g, official=%s", adapter_name,
                     kwargs.get("target_name", "?"), r, curvature, math.sqrt(self.in_features), options.official)

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """W x + (α/r)·Δ(dropout(x)). With one active, unmerged, consistent-map HypLoRA adapter and the
        fused kernels available, the update and the addition are one autograd node
        (:func:`adapters.kernels.hyplora_fused.hyplora_linear_fused`); everything else (several
        adapters, mixed batches, the official map, CPU) goes through PEFT's dispatch."""
        name = self._hyp_fast_adapter(x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        raw_k, raw_s = self.lora_hyp_k[name], self.lora_hyp_s[name]
        dropout = self.lora_dropout[name]
        identity = type(dropout) is nn.Identity or not dropout.training
        if identity:  # base product inside the node where the native layer serves the base layer
            out = hyplora_layer_native(x, self.base_layer, A, B, raw_k, raw_s, self.scaling[name])
            if out is not None:
                return out
        result = self.base_layer(x)
        xd = x if identity else dropout(x)
        return hyplora_linear_fused(xd, result, A, B, raw_k, raw_s, self.scaling[name])

    def _hyp_fast_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict) -> Optional[str]:
        if args or kwargs or self.disable_adapters or self.merged:
            return None
        active = self.active_adapters
        if len(active) != 1:
            return None
        name = active[0]
        if name not in self.lora_hyp_k or self.hyp_official.get(name, False):
            return None
        if not linear_fast_path(x, self.lora_A[name].weight, self.lora_B[name].weight):
            return None
        return name

    # -- parameters -------------------------------------------------------------------------------
    def is_hyplora(self, adapter_name: str) -> bool:
        return adapter_name in self.lora_hyp_k

    def hyp_curvature(self, adapter_name: str) -> torch.Tensor:
        """Current K of ``adapter_name`` (float32 scalar tensor, differentiable)."""
        return positive(self.lora_hyp_k[adapter_name].float())

    def hyp_scale(self, adapter_name: str) -> torch.Tensor:
        """Current s of ``adapter_name`` (float32 scalar tensor, differentiable)."""
        return positive(self.lora_hyp_s[adapter_name].float())

    def hyp_delta(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """(α/r)·Δ(dropout(x)) for one adapter, in float32."""
        x = self.lora_dropout[adapter_name](x)
        official = self.hyp_official.get(adapter_name, False)
        if not official:  # fused CUDA kernels, float32 under any autocast; _bottleneck elsewhere
            return hyplora_bottleneck_fused(
                x.float(), self.lora_A[adapter_name].weight.float(), self.lora_B[adapter_name].weight.float(),
                self.lora_hyp_k[adapter_name].float(), self.lora_hyp_s[adapter_name].float(),
                self.scaling[adapter_name])
        with _no_autocast(x.device.type):
            raw_k = _ClipGrad.apply(self.lora_hyp_k[adapter_name].float(), _REF_K_GRAD_CLIP)
            return _bottleneck(x.float(), self.lora_A[adapter_name].weight.float(),
                               self.lora_B[adapter_name].weight.float(), positive(raw_k),
                               self.hyp_scale(adapter_name), official=official,
                               out_scale=self.scaling[adapter_name])

    # -- merging is refused -----------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        names = check_adapters_to_merge(self, adapter_names)
        hyp = [n for n in names if self.is_hyplora(n)]
        if hyp:
            raise _not_mergeable(hyp)
        super().merge(safe_merge=safe_merge, adapter_names=names)

    def unmerge(self) -> None:
        if not self.merged and len(self.lora_hyp_k) > 0:
            raise _not_mergeable(list(self.lora_hyp_k.keys()))
        super().unmerge()

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        if self.is_hyplora(adapter):
            raise _not_mergeable([adapter])
        return super().get_delta_weight(adapter)

    def __repr__(self) -> str:
        return nn.Module.__repr__(self)


class _UnsupportedTarget(nn.Module):
    """Registered for every module type other than nn.Linear: refuses instead of letting PEFT fall back
    to plain LoRA silently."""

    def __new__(cls, target: nn.Module, adapter_name: str, **kwargs: Any):
        base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
        raise AdapterError(
            f"HypLoRA supports nn.Linear targets only; {kwargs.get('target_name', adapter_name)!r} is a "
            f"{type(base).__name__}. Remove it from target_modules.")
