"""Fused HypLoRA bottleneck update: two Triton kernels for the per-token scalar work (CUDA).

The layer's update (:func:`adapters.hyplora.functional.hyplora_delta_bottleneck`, arXiv 2410.04010 Eq. 6–8,
METHODS §10) is

    a = A x,  sq = ‖x‖²,  q = aᵀ G a with G = BᵀB,  K = sp(k̃), s = sp(s̃)  (sp(v) = softplus(v) + 1e-6)
    u = sq/(s²K),  c1 = S(u)/s with S(u) = sinh(min(√u, 12))/√u
    v = c1² q / K,  c2 = R(v) = asinh(√v)/√v
    out = α · B (c·a),  c = c1·c2

Per token everything but the two d-wide products is scalar work over r-vectors. Plain autograd runs it
as ~120 small kernels per forward + backward; here it is

* forward: ``a = x Aᵀ`` and ``G = BᵀB`` (cuBLAS), one Triton kernel that reads x once for sq, forms
  q = aᵀGa, c (softplus of the raw parameters included) and writes c·a, then ``(c·a) Bᵀ`` (cuBLAS);
* backward: ``g B`` and ``gᵀ(c·a)`` (cuBLAS), one Triton kernel that forms ∂/∂a, ∂/∂sq and, per block
  of tokens, the partial sums of ∂/∂G = Σ_t g_q,t a_t a_tᵀ and of the raw-parameter gradients, one
  reduction of those partial sums, and the products ∂x = (∂a) A + 2 (∂sq) x, ∂A = (∂a)ᵀ x,
  ∂B = gᵀ(c·a) + 2 B ∂G.

Measured on an H200 (benchmarks/bench_hyplora_model.py): GPU time per training step matches PEFT LoRA;
at a few thousand tokens per step the remaining cost is host-side, which is why the layer's node
(:func:`hyplora_linear_fused`, :func:`hyplora_layer_native`) runs as C++ where :mod:`adapters.kernels.native`
is built, with CUDA kernels doing the same per-token work as the Triton kernels here; the Python nodes
below serve where it is not (and under functorch transforms).

The formulas, series cut-offs and clamps are those of :mod:`adapters.hyplora.functional` (its token
node, with sinhc/asinhc and the cut-off of :mod:`adapters.lorentz`; softplus as
``torch.nn.functional.softplus``: x itself above 20). Inputs the kernels do not cover (no CUDA device
or no Triton, dtypes other than float32/float64, rank > 64, per-token K or s, no tokens) go through the
reference path :func:`adapters.hyplora.functional.reference_path`; the reason is logged once per
process. Private torch and Triton entry points (direct autograd apply, the functorch check, direct
kernel launches) go through :mod:`adapters.kernels._internals`. With ``TRITON_INTERPRET=1`` the kernels also run on CPU tensors (Triton's
interpreter; sinh/cosh/asinh/log1p are then formed from exp and log, accurate to ≈ ε/√u instead of ε).
"""
from __future__ import annotations

import contextlib
import logging
import os
import struct
from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ...kernels import _internals
from ...kernels.frozen_linear import frozen_plain_linear
from ...kernels.native import native_module
from ..functional import fused_cutoff, reference_path

logger = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except Exception as _exc:  # ImportError, or a Triton that fails to initialise
    triton = None
    _TRITON_ERROR: Optional[str] = f"{type(_exc).__name__}: {_exc}"
else:
    _TRITON_ERROR = None

__all__ = ["MAX_RANK", "fused_available", "fused_unsupported_reason", "hyplora_bottleneck_fused",
           "hyplora_layer_native", "hyplora_linear_fused", "linear_fast_path", "set_fused_enabled"]

MAX_RANK = 64
"""Largest rank r the kernels hold in registers (the r × r Gram matrix per program)."""

_ENABLED = True
_REPORTED: set[str] = set()


def set_fused_enabled(enabled: bool) -> bool:
    """Switch the fused kernels on or off for this process (off: always the reference path).
    Returns the previous setting."""
    global _ENABLED
    previous, _ENABLED = _ENABLED, bool(enabled)
    return previous


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_INTERPRETING = _interpreting()
"""Triton's interpreter is on (read once: Triton itself reads TRITON_INTERPRET when it starts)."""


def fused_available(device: torch.device | str) -> bool:
    """True when the fused kernels can run on ``device`` (CUDA with Triton, or CPU under the Triton
    interpreter)."""
    device = torch.device(device)
    if triton is None or not _ENABLED:
        return False
    return device.type == "cuda" or (device.type == "cpu" and _INTERPRETING)


def fused_unsupported_reason(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, raw_k: torch.Tensor,
                             raw_s: torch.Tensor) -> Optional[str]:
    """Why the fused kernels cannot take these inputs (None when they can)."""
    tensors = (x, A, B, raw_k, raw_s)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return "K and s must be given as tensors of the raw parameters"
    if x.dtype not in (torch.float32, torch.float64) or A.dtype != x.dtype or B.dtype != x.dtype:
        return f"dtypes x {x.dtype}, A {A.dtype}, B {B.dtype} (needs one of float32/float64 for all three)"
    if raw_k.dtype not in (torch.float32, torch.float64) or raw_s.dtype not in (torch.float32, torch.float64):
        return "raw curvature/scale must be float32 or float64"
    if A.dim() != 2 or B.dim() != 2 or x.dim() < 1 or x.shape[-1] != A.shape[1] or A.shape[0] != B.shape[1]:
        return "shapes do not chain (the reference path reports the details)"
    if A.shape[0] > MAX_RANK:
        return f"rank {A.shape[0]} > {MAX_RANK}"
    if raw_k.numel() != 1 or raw_s.numel() != 1:
        return "per-token curvature or scale (the kernels take one K and one s)"
    if x.numel() == 0:
        return "no tokens"
    if len({t.device for t in tensors}) != 1:
        return "inputs on different devices"
    if not _ENABLED:
        return "fused kernels switched off (set_fused_enabled(False))"
    if triton is None:
        return f"Triton is not importable ({_TRITON_ERROR})"
    if not fused_available(x.device):
        return f"device {x.device.type!r} (the kernels run on CUDA)"
    return None


def _report(reason: str) -> None:
    if reason not in _REPORTED:
        _REPORTED.add(reason)
        logger.info("HypLoRA fused kernels not used (%s); running the reference path", reason)


def hyplora_bottleneck_fused(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, raw_k: torch.Tensor,
                             raw_s: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """scale·Δ(x) of HypLoRA (consistent map) with K = softplus(raw_k) + 1e-6, s = softplus(raw_s) + 1e-6.

    x: (..., d_in); A: (r, d_in); B: (d_out, r); raw_k, raw_s: one-element tensors (the layer's raw
    parameters). Differentiable once in x, A, B, raw_k, raw_s. Returns (..., d_out) in the compute dtype
    (float64 if any of x, A, B is float64, else float32), like
:func:`adapters.hyplora.functional.reference_path`;
    autocast is switched off inside.
    Falls back to that reference path (logging the reason once) where the kernels do not apply, and
    takes it silently while ``torch.compile`` traces the call (Inductor then fuses its elementwise work).
    """
    if torch.is_autocast_enabled(x.device.type):  # the update is computed in float32/float64
        with autocast_off(x.device.type):
            return hyplora_bottleneck_fused(x, A, B, raw_k, raw_s, scale)
    if _internals.compiling():  # torch.compile fuses the plain formulas; a kernel launch would break the graph
        return reference_path(x, A, B, raw_k, raw_s, scale)
    reason = fused_unsupported_reason(x, A, B, raw_k, raw_s)
    if reason is not None:
        _report(reason)
        return reference_path(x, A, B, raw_k, raw_s, scale)
    if x.dim() == 2 and x.is_contiguous():
        return _DELTA_APPLY(x, A, B, raw_k, raw_s, float(scale))
    out = _DELTA_APPLY(x.reshape(-1, x.shape[-1]).contiguous(), A, B, raw_k, raw_s, float(scale))
    return out.view(*x.shape[:-1], B.shape[0])


def linear_fast_path(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> bool:
    """True when :func:`hyplora_linear_fused` may take this call: fused kernels on (the native C++ node of
    :mod:`adapters.kernels.native`, or Triton on CUDA or under the interpreter on CPU), adapter weights
    float32/float64 of one dtype, rank ≤ MAX_RANK, a floating input with at least one token on the
    weights' device (the native node alone only where :func:`adapters.kernels._internals.transforms_active`
is False). Cheap enough to ask on every forward; every other case (autocast off or on) goes
    through PEFT's dispatch and :func:`hyplora_bottleneck_fused`."""
    if not _ENABLED:
        return False
    dt = A.dtype
    if dt is not B.dtype or (dt is not torch.float32 and dt is not torch.float64) or A.shape[0] > MAX_RANK:
        return False
    dev = x.device
    if dev != A.device or not x.is_floating_point() or x.numel() == 0:
        return False
    if triton is not None and (dev.type == "cuda" or (dev.type == "cpu" and _INTERPRETING)):
        return True
    # the native node alone (no Triton for this device) serves only where no functorch transform may be
    # active (with private entry points off that cannot be ruled out)
    return native_module(dev) is not None and not _internals.transforms_active()


def hyplora_linear_fused(x: torch.Tensor, result: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                         raw_k: torch.Tensor, raw_s: torch.Tensor, scale: float) -> torch.Tensor:
    """``result + scale·Δ(x)`` of a HypLoRA layer in ``result``'s dtype, as one autograd node.

    x: (..., d_in) in any floating dtype (cast to the adapter weights' dtype, as PEFT casts LoRA's
    input); result: the base layer's output (..., d_out); A (r, d_in), B (d_out, r) float32 or float64;
    raw_k, raw_s: the layer's one-element raw parameters. Callers check :func:`linear_fast_path` first.

    Where :mod:`adapters.kernels.native` is built for the device this is its C++ node, whose backward
    never enters Python: a = x Aᵀ and G = BᵀB, one kernel per token forming ‖x‖², q = aᵀGa, c and c·a,
    then result + (c·a) Bᵀ as one matrix product onto the result. With a 16-bit result that product, and
    in backward the products of the 16-bit incoming gradient with B and with c·a, run in the result's
    dtype with float32 accumulation (as PEFT LoRA's products under autocast), so no tokens × d_out
    float32 tensor is formed. Under autocast a 16-bit x is read as it came, never copied to float32:
    a = x Aᵀ and ∂A = daᵀ x take A and ∂L/∂a as three 16-bit parts each (float32's 24 significant bits,
    float32 accumulation: the float32 products to float32 rounding), and the adapter's share of ∂x is
    formed in x's dtype; the per-token work stays in the adapter dtype. Otherwise the
    Python node below: a = x Aᵀ, y = a Bᵀ (cuBLAS), then one Triton kernel per token that forms ‖x‖²,
    q = ‖y‖² (= aᵀBᵀBa), the scalar c of :func:`hyplora_bottleneck_fused` and writes result + c·y
    (the update in the adapter dtype). Backward: the kernels of :func:`hyplora_bottleneck_fused` with
    G = BᵀB. Against PEFT LoRA's
    ``result + lora_B(lora_A(x)) * scaling`` this issues one kernel in place of the scaling and the
    addition, and one autograd node in place of five, so a training step that is bound by the host's
    launch rate pays little for the hyperbolic maps. The autocast state does not matter: the node's
    dtypes are those of its inputs and weights as stated above.
    """
    module = native_module(x.device)
    if module is not None and raw_k.dtype is raw_s.dtype and not _internals.transforms_active():
        if result.stride(-1) != 1:
            result = result.contiguous()
        return module.hyplora_linear(x, result, A, B, raw_k, raw_s, float(scale), _cut(A.dtype))
    with autocast_off(x.device.type):
        return _LINEAR_APPLY(x, result, A, B, raw_k, raw_s, float(scale))


def hyplora_layer_native(x: torch.Tensor, base: torch.nn.Module, A: torch.Tensor, B: torch.Tensor,
                         raw_k: torch.Tensor, raw_s: torch.Tensor, scale: float) -> Optional[torch.Tensor]:
    """``base(x) + scale·Δ(x)`` as one C++ node that also forms the base product, or None where that node
    does not serve the call: the native extension not built for x's device, a base other than a frozen
    plain ``nn.Linear`` of x's dtype (:func:`adapters.kernels.frozen_linear.frozen_plain_linear`), raw
    curvature and scale of different dtypes, a functorch transform, or autocast to a dtype other than the
    base weight's (``base(x)`` would then run in the autocast dtype). Callers check
    :func:`linear_fast_path` first and pass x after dropout only when dropout is the identity.

    Against ``hyplora_linear_fused(x, base(x), …)`` this saves the base layer's module call and autograd
    node, and in backward the separate base product's node, the cast of the adapter's ∂L/∂x and the sum
    of the two: ∂L/∂x = g W + (the adapter's share) is one product and one in-place addition."""
    module = native_module(x.device)
    if module is None or raw_k.dtype is not raw_s.dtype or not frozen_plain_linear(base, x):
        return None
    if _internals.transforms_active():
        return None
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and base.weight.dtype != torch.get_autocast_dtype(dev):
        return None
    return module.hyplora_layer(x, base.weight, base.bias, A, B, raw_k, raw_s, float(scale), _cut(A.dtype))


# --------------------------------------------------------------------------- launch configuration
def _rank_pad(r: int) -> int:
    return max(16, 1 << (r - 1).bit_length())


def _tokens_per_program(rp: int) -> int:
    return max(2, 8192 // (rp * rp))


def _split(value: float) -> tuple[float, float]:
    """value = hi + lo with hi, lo float32 (Triton passes Python floats as float32)."""
    hi = struct.unpack("f", struct.pack("f", value))[0]
    return hi, value - hi


_CUTS: dict[torch.dtype, float] = {}


def _cut(dtype: torch.dtype) -> float:
    cut = _CUTS.get(dtype)
    if cut is None:
        cut = _CUTS[dtype] = fused_cutoff(dtype)
    return cut


def autocast_off(device_type: str):
    """A context with autocast off on ``device_type`` (a no-op context where it is off already, or where
    the device has no autocast). The HypLoRA update is computed in the adapter weights' dtype: the
    fused nodes' forward and backward (the engine hands the caller's autocast state to the backward,
    so one run under autocast would cast its products) and the layer's reference path enter it."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.autocast(device_type=device_type, enabled=False)
    except (RuntimeError, ValueError):  # a device type without autocast (meta)
        pass
    return contextlib.nullcontext()


class _FusedDelta(torch.autograd.Function):
    """x (T, d_in) contiguous → scale·B(c·a). Host work is kept to the few ops the update needs (on a
    training step most adapter layers are bound by the host's launch rate, not by the GPU)."""

    @staticmethod
    def forward(ctx, x, A, B, raw_k, raw_s, scale: float):
        dt = x.dtype
        T, d_in = x.shape
        r = A.shape[0]
        rp = _rank_pad(r)
        a = F.linear(x, A)
        G = torch.mm(B.t(), B)
        ca = torch.empty_like(a)
        sqq = torch.empty(2 * T, dtype=dt, device=x.device)  # ‖x‖² then aᵀGa, per token
        hi, lo = _split(scale)
        bt = _tokens_per_program(rp)
        _FWD(triton.cdiv(T, bt), (
            x, a, G, ca, sqq, raw_k, raw_s, hi, lo, T, d_in, r, x.stride(0), a.stride(0)),
            BT=bt, BD=256 if d_in >= 256 else max(16, 1 << (d_in - 1).bit_length()), RP=rp, CUT=_cut(dt),
            LIB=not _INTERPRETING, num_warps=4)
        ctx.save_for_backward(x, A, B, a, ca, G, sqq, raw_k, raw_s)
        ctx.scale = scale
        return F.linear(ca, B)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        with autocast_off(g.device.type):
            return _FusedDelta._backward(ctx, g)

    @staticmethod
    def _backward(ctx, g):
        x, A, B, a, ca, G, sqq, raw_k, raw_s = ctx.saved_tensors
        dt = x.dtype
        T = x.shape[0]
        r = A.shape[0]
        rp = _rank_pad(r)
        bt = _tokens_per_program(rp)
        nb = triton.cdiv(T, bt)
        if g.dtype != dt:
            g = g.to(dt)
        gca = torch.mm(g, B)
        da = torch.empty_like(a)
        gsq2 = torch.empty(T, 1, dtype=dt, device=x.device)  # 2·∂L/∂‖x‖²
        part = torch.empty(nb, r * r + 2, dtype=dt, device=x.device)  # per block: ∂G, ∂k̃, ∂s̃
        hi, lo = _split(ctx.scale)
        _BWD(nb, (
            gca, a, G, sqq, raw_k, raw_s, da, gsq2, part, da, hi, lo, T, r, gca.stride(0), a.stride(0)),
            BT=bt, RP=rp, CUT=_cut(dt), LIB=not _INTERPRETING, WRITE_CA=False, num_warps=4)
        gx, gA, gB, gk, gs = _parameter_grads(x, A, B, g, ca, da, gsq2, part, raw_k, raw_s,
                                              ctx.needs_input_grad[:5])
        return gx, gA, gB, gk, gs, None


class _FusedLinear(torch.autograd.Function):
    """(x, result) → result + scale·B(c·a); see :func:`hyplora_linear_fused`."""

    @staticmethod
    def forward(ctx, x, result, A, B, raw_k, raw_s, scale: float):
        dt = A.dtype
        d_in, d_out = A.shape[1], B.shape[0]
        xf = x.reshape(-1, d_in)
        if xf.dtype is not dt:
            xf = xf.to(dt)
        if not xf.is_contiguous():
            xf = xf.contiguous()
        a = torch.mm(xf, A.t())
        y = torch.mm(a, B.t())
        res = result.reshape(-1, d_out)
        out = torch.empty(res.shape, dtype=res.dtype, device=res.device)
        T = xf.shape[0]
        sqq = torch.empty(2 * T, dtype=dt, device=xf.device)  # ‖x‖² then ‖y‖², per token
        hi, lo = _split(scale)
        _FWD_LINEAR(T, (
            xf, y, res, out, sqq, raw_k, raw_s, hi, lo, T, d_in, d_out, xf.stride(0), y.stride(0),
            res.stride(0), out.stride(0)), BI=_block(d_in, 1024), BO=_block(d_out, 1024), CUT=_cut(dt),
            LIB=not _INTERPRETING, num_warps=4)
        ctx.save_for_backward(xf, A, B, a, sqq, raw_k, raw_s)
        ctx.scale = scale
        ctx.x_shape = x.shape
        return out.view(result.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        with autocast_off(g.device.type):
            return _FusedLinear._backward(ctx, g)

    @staticmethod
    def _backward(ctx, g):
        xf, A, B, a, sqq, raw_k, raw_s = ctx.saved_tensors
        need_x, need_res, need_A, need_B, need_k, need_s, _ = ctx.needs_input_grad
        dt = A.dtype
        T, r = a.shape
        rp = _rank_pad(r)
        bt = _tokens_per_program(rp)
        nb = triton.cdiv(T, bt)
        gf = g.reshape(T, -1)
        if gf.dtype is not dt:
            gf = gf.to(dt)
        if not gf.is_contiguous():
            gf = gf.contiguous()
        gca = torch.mm(gf, B)
        G = torch.mm(B.t(), B)
        dca = torch.empty(2, T, r, dtype=dt, device=a.device)  # ∂L/∂a, then c·a
        gsq2 = torch.empty(T, 1, dtype=dt, device=a.device)  # 2·∂L/∂‖x‖²
        part = torch.empty(nb, r * r + 2, dtype=dt, device=a.device)  # per block: ∂G, ∂k̃, ∂s̃
        da, ca = dca[0], dca[1]
        hi, lo = _split(ctx.scale)
        _BWD(nb, (
            gca, a, G, sqq, raw_k, raw_s, da, gsq2, part, ca, hi, lo, T, r, gca.stride(0), a.stride(0)),
            BT=bt, RP=rp, CUT=_cut(dt), LIB=not _INTERPRETING, WRITE_CA=True, num_warps=4)
        gx, gA, gB, gk, gs = _parameter_grads(xf, A, B, gf, ca, da, gsq2, part, raw_k, raw_s,
                                              (need_x, need_A, need_B, need_k, need_s))
        if gx is not None:
            gx = gx.view(ctx.x_shape)  # the engine casts it to x's dtype
        return gx, (g if need_res else None), gA, gB, gk, gs, None


def _parameter_grads(x, A, B, g, ca, da, gsq2, part, raw_k, raw_s, needs):
    """After the backward kernel: ∂x = (∂a) A + 2(∂‖x‖²) x, ∂A = (∂a)ᵀ x, ∂B = gᵀ(c·a) + 2 B ∂G and
    the raw curvature/scale gradients from the per-block partial sums (None where not needed)."""
    need_x, need_A, need_B, need_k, need_s = needs
    r = A.shape[0]
    gx = gA = gB = gk = gs = None
    if need_x:
        gx = torch.mm(da, A)
        gx.addcmul_(x, gsq2)
    if need_A:
        gA = torch.mm(da.t(), x)
    if need_B or need_k or need_s:
        tot = part.sum(dim=0)
        if need_B:
            gB = torch.mm(g.t(), ca)
            gB.addmm_(B, tot[:r * r].view(r, r), alpha=2.0)
        if need_k:
            gk = _as_grad(tot[r * r], raw_k)
        if need_s:
            gs = _as_grad(tot[r * r + 1], raw_s)
    return gx, gA, gB, gk, gs


def _block(d: int, most: int) -> int:
    return min(most, max(16, 1 << (d - 1).bit_length()))


def _as_grad(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if value.dtype != like.dtype:
        value = value.to(like.dtype)
    return value if like.dim() == 0 else value.reshape(like.shape)


# --------------------------------------------------------------------------- Triton kernels
if triton is not None:

    @triton.jit
    def _sinh(t, LIB: tl.constexpr):
        if LIB:
            return libdevice.sinh(t)
        else:
            e = tl.exp(t)
            return 0.5 * (e - 1.0 / e)

    @triton.jit
    def _cosh(t, LIB: tl.constexpr):
        if LIB:
            return libdevice.cosh(t)
        else:
            e = tl.exp(t)
            return 0.5 * (e + 1.0 / e)

    @triton.jit
    def _asinh(w, LIB: tl.constexpr):
        if LIB:
            return libdevice.asinh(w)
        else:
            return tl.log(w + tl.sqrt(w * w + 1.0))

    @triton.jit
    def _log1p(v, LIB: tl.constexpr):
        if LIB:
            return libdevice.log1p(v)
        else:
            return tl.log(1.0 + v)

    @triton.jit
    def _positive(raw, LIB: tl.constexpr):
        """softplus(raw) + 1e-6 as torch (threshold 20) and its derivative."""
        e = tl.exp(tl.minimum(raw, 20.0))
        value = tl.where(raw > 20.0, raw, _log1p(e, LIB)) + 1e-6
        slope = tl.where(raw > 20.0, 1.0, e / (e + 1.0))
        return value, slope

    @triton.jit
    def _scalars(sq, q, K, s, CUT: tl.constexpr, LIB: tl.constexpr):
        """u, t, min(t, 12), S(u), c1, v, masked v, asinh(√v), R(v) (as _TokenScale.forward)."""
        u = sq / (s * s * K)
        small_u = u < CUT
        t = tl.sqrt(tl.where(small_u, 1.0, u))
        tc = tl.minimum(t, 12.0)
        S = tl.where(small_u, 1.0 + u / 6.0, _sinh(tc, LIB) / t)
        c1 = S / s
        v = c1 * c1 * q / K
        small_v = v < CUT
        vs = tl.where(small_v, 1.0, v)
        w = tl.sqrt(vs)
        ash = _asinh(w, LIB)
        Rv = tl.where(small_v, 1.0 - v / 6.0, ash / w)
        return u, t, tc, S, c1, v, vs, ash, Rv

    @triton.jit
    def _fwd_kernel(X, Aa, G, CA, SQ, RK, RS, scale_hi, scale_lo, T, D, R, stride_x, stride_a,
                    BT: tl.constexpr, BD: tl.constexpr, RP: tl.constexpr, CUT: tl.constexpr,
                    LIB: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BT + tl.arange(0, BT)
        rmask = rows < T
        rows64 = rows.to(tl.int64)
        cols = tl.arange(0, BD)
        acc = tl.zeros([BT, BD], dtype=X.dtype.element_ty)
        for d0 in range(0, D, BD):
            m = rmask[:, None] & ((d0 + cols) < D)[None, :]
            xv = tl.load(X + rows64[:, None] * stride_x + (d0 + cols)[None, :], mask=m, other=0.0)
            acc += xv * xv
        sq = tl.sum(acc, axis=1)
        ri = tl.arange(0, RP)
        am = rmask[:, None] & (ri < R)[None, :]
        a = tl.load(Aa + rows64[:, None] * stride_a + ri[None, :], mask=am, other=0.0)
        gm = (ri < R)[:, None] & (ri < R)[None, :]
        Gm = tl.load(G + ri[:, None] * R + ri[None, :], mask=gm, other=0.0)
        aG = tl.sum(a[:, :, None] * Gm[None, :, :], axis=1)
        q_raw = tl.sum(aG * a, axis=1)
        q = tl.maximum(q_raw, 0.0)
        K, _ = _positive(tl.load(RK), LIB)  # in the raw parameters' dtype, as positive() does
        s, _ = _positive(tl.load(RS), LIB)
        K = K.to(X.dtype.element_ty)
        s = s.to(X.dtype.element_ty)
        u, t, tc, S, c1, v, vs, ash, Rv = _scalars(sq, q, K, s, CUT, LIB)
        scale = tl.cast(scale_hi, X.dtype.element_ty) + tl.cast(scale_lo, X.dtype.element_ty)
        c = (scale * c1) * Rv
        tl.store(CA + rows64[:, None] * stride_a + ri[None, :], a * c[:, None], mask=am)
        tl.store(SQ + rows, sq, mask=rmask)
        tl.store(SQ + T + rows, q_raw, mask=rmask)

    @triton.jit
    def _bwd_kernel(GCA, Aa, G, SQ, RK, RS, DA, GSQ2, PART, CA, scale_hi, scale_lo, T, R, stride_g,
                    stride_a, BT: tl.constexpr, RP: tl.constexpr, CUT: tl.constexpr, LIB: tl.constexpr,
                    WRITE_CA: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BT + tl.arange(0, BT)
        rmask = rows < T
        rows64 = rows.to(tl.int64)
        ri = tl.arange(0, RP)
        am = rmask[:, None] & (ri < R)[None, :]
        a = tl.load(Aa + rows64[:, None] * stride_a + ri[None, :], mask=am, other=0.0)
        gca = tl.load(GCA + rows64[:, None] * stride_g + ri[None, :], mask=am, other=0.0)
        sq = tl.load(SQ + rows, mask=rmask, other=0.0)
        q_raw = tl.load(SQ + T + rows, mask=rmask, other=0.0)
        q = tl.maximum(q_raw, 0.0)
        K, dK_draw = _positive(tl.load(RK), LIB)
        s, ds_draw = _positive(tl.load(RS), LIB)
        K = K.to(Aa.dtype.element_ty)
        s = s.to(Aa.dtype.element_ty)
        dK_draw = dK_draw.to(Aa.dtype.element_ty)
        ds_draw = ds_draw.to(Aa.dtype.element_ty)
        u, t, tc, S, c1, v, vs, ash, Rv = _scalars(sq, q, K, s, CUT, LIB)
        scale = tl.cast(scale_hi, Aa.dtype.element_ty) + tl.cast(scale_lo, Aa.dtype.element_ty)
        c = (scale * c1) * Rv
        # slopes S'(u), R'(v) (as _sinhc_u_slope, _asinhc_v_slope)
        sh = _sinh(tc, LIB)
        dS = tl.where(t > 12.0, -sh, tc * _cosh(tc, LIB) - sh) / (2.0 * t * t * t)
        dS = tl.where(u < CUT, 1.0 / 6.0 + u / 60.0, dS)
        rvs = tl.sqrt(vs)
        dR = (1.0 / tl.sqrt(1.0 + 1.0 / vs) - ash) * (0.5 / (rvs * vs))
        dR = tl.where(v < CUT, -1.0 / 6.0 + 0.15 * v, dR)
        # chain rule (as _TokenScale.backward) with dc = Σ_j gca_j a_j
        ga = tl.sum(gca * a, axis=1) * scale
        g_c1 = ga * (Rv + 2.0 * v * dR)
        g_u = g_c1 * dS / s
        g_sq = g_u / (s * s * K)
        gr = ga * c1 * dR
        g_q = tl.where((q_raw >= 0.0) & rmask, gr * (c1 * c1 / K), 0.0)
        g_k = tl.where(rmask, -(gr * v + g_u * u) / K, 0.0)
        g_s = tl.where(rmask, -(g_c1 * S / s + 2.0 * g_u * u) / s, 0.0)
        gm = (ri < R)[:, None] & (ri < R)[None, :]
        Gm = tl.load(G + ri[:, None] * R + ri[None, :], mask=gm, other=0.0)
        aG = tl.sum(a[:, :, None] * Gm[None, :, :], axis=1)  # (a G)_j = Σ_i a_i G_ij
        Ga = tl.sum(Gm[None, :, :] * a[:, None, :], axis=2)  # (G a)_i = Σ_j G_ij a_j
        da = c[:, None] * gca + g_q[:, None] * (aG + Ga)
        tl.store(DA + rows64[:, None] * stride_a + ri[None, :], da, mask=am)
        if WRITE_CA:  # c·a for ∂B (the layer path does not keep it from the forward)
            tl.store(CA + rows64[:, None] * stride_a + ri[None, :], a * c[:, None], mask=am)
        tl.store(GSQ2 + rows, 2.0 * g_sq, mask=rmask)
        wa = a * g_q[:, None]
        dG = tl.sum(wa[:, :, None] * a[:, None, :], axis=0)
        base = PART + pid.to(tl.int64) * (R * R + 2)
        tl.store(base + ri[:, None] * R + ri[None, :], dG, mask=gm)
        tl.store(base + R * R, tl.sum(g_k, axis=0) * dK_draw)
        tl.store(base + R * R + 1, tl.sum(g_s, axis=0) * ds_draw)

    @triton.jit
    def _fwd_linear_kernel(X, Y, RES, OUT, SQ, RK, RS, scale_hi, scale_lo, T, D_IN, D_OUT, stride_x,
                           stride_y, stride_r, stride_o, BI: tl.constexpr, BO: tl.constexpr,
                           CUT: tl.constexpr, LIB: tl.constexpr):
        """One token per program: ‖x‖², q = ‖y‖², c, then out = result + c·y (in result's dtype)."""
        row = tl.program_id(0).to(tl.int64)
        ct = Y.dtype.element_ty
        ci = tl.arange(0, BI)
        acc = tl.zeros([BI], dtype=ct)
        for d0 in range(0, D_IN, BI):
            xv = tl.load(X + row * stride_x + d0 + ci, mask=(d0 + ci) < D_IN, other=0.0).to(ct)
            acc += xv * xv
        sq = tl.sum(acc, axis=0)
        co = tl.arange(0, BO)
        accq = tl.zeros([BO], dtype=ct)
        for d0 in range(0, D_OUT, BO):
            yv = tl.load(Y + row * stride_y + d0 + co, mask=(d0 + co) < D_OUT, other=0.0)
            accq += yv * yv
        q = tl.sum(accq, axis=0)
        K, _ = _positive(tl.load(RK), LIB)
        s, _ = _positive(tl.load(RS), LIB)
        K = K.to(ct)
        s = s.to(ct)
        u, t, tc, S, c1, v, vs, ash, Rv = _scalars(sq, q, K, s, CUT, LIB)
        scale = tl.cast(scale_hi, ct) + tl.cast(scale_lo, ct)
        c = (scale * c1) * Rv
        for d0 in range(0, D_OUT, BO):
            m = (d0 + co) < D_OUT
            yv = tl.load(Y + row * stride_y + d0 + co, mask=m, other=0.0)
            rv = tl.load(RES + row * stride_r + d0 + co, mask=m, other=0.0).to(ct)
            tl.store(OUT + row * stride_o + d0 + co, (rv + c * yv).to(OUT.dtype.element_ty), mask=m)
        tl.store(SQ + row, sq)
        tl.store(SQ + T + row, q)


    _FWD = _internals.DirectLauncher(_fwd_kernel, interpreting=_INTERPRETING)
    _BWD = _internals.DirectLauncher(_bwd_kernel, interpreting=_INTERPRETING)
    _FWD_LINEAR = _internals.DirectLauncher(_fwd_linear_kernel, interpreting=_INTERPRETING)

_DELTA_APPLY = _internals.function_apply(_FusedDelta)
_LINEAR_APPLY = _internals.function_apply(_FusedLinear)
"""``apply`` of the two nodes: without the per-call Python checks of ``torch.autograd.Function.apply``
where :mod:`adapters.kernels._internals` allows it (no functorch transform active, checked per call)."""
