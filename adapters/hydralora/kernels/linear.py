"""The HydraLoRA layer as one autograd node.

Written module by module, the layer issues about a dozen small tensor operations per call in forward and
again in backward, each with its own autograd node; at a few thousand tokens per step a Llama-sized model is
then partly bound by the host's launch rate, not by arithmetic. :class:`HydraLinearFn` computes the whole
layer

    y = W x (+ b) + (α/r)·[B_1 … B_N](g ⊗ a),   [a; l] = [A; W_router] x,   g = softmax(l)

(HydraLoRA, Tian et al. 2024, arXiv 2404.19245, dense routing) as one ``torch.autograd.Function`` with the
base product inside it and a hand-written backward. With G = dL/dy and dz = (α/r)·G·[B_1 … B_N] split into
N blocks dz_i of width r:

    da = Σ_i g_i dz_i,   dg_i = ⟨dz_i, a⟩,   dl = g ⊙ (dg − ⟨g, dg⟩),
    d[B_1 … B_N] = (α/r)·Gᵀ(g ⊗ a),   d[A; W_router] = [da, dl]ᵀ x,
    dx = G W + [da, dl]·[A; W_router]   (the second product added in place to the first).

Per layer that is 8 kernel-launching operations forward and 11 backward with float32 adapter weights on a
bfloat16 base, against 7 and 10 for PEFT LoRA and 10 and 16 for the module path (one autograd node instead
of about ten; benchmarks/bench_hydralora_model.py counts them). Where the C++ extension of
:mod:`adapters.kernels.native` is built (by default on CUDA) the same node runs as a C++ autograd function
whose backward never enters Python, with the softmax, the outer product g ⊗ a and their backward (two
batched products, the softmax backward and a concatenation) as one kernel each way: 7 launches forward and
8 backward; :class:`HydraLinearFn` is then the fallback and the functorch path. The precision is the module
path's: x is cast to the adapter weights' dtype (PEFT's convention), and (α/r)·Δ is added to W x in that
dtype before the sum is rounded to the base dtype. Under ``torch.autocast`` only the C++ node serves
(:func:`native_serves`): its products then take 16-bit operands as the module path's do under autocast,
with the gates and their backward kept in the adapter dtype. Its backward cannot be differentiated again.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch.autograd.function import once_differentiable

from ...kernels._internals import function_apply, transforms_active, unsafe_view
from ...kernels.native import native_module

__all__ = ["HydraLinearFn", "hydra_linear", "hydra_update", "native_serves"]

_ZEROS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _zero(like: torch.Tensor) -> torch.Tensor:
    """A cached 0-dim zero of ``like``'s dtype and device: the ignored ``input`` of addmm(…, beta=0, alpha=s),
    which applies the scale s inside the product instead of as a separate op."""
    key = (like.device, like.dtype)
    zero = _ZEROS.get(key)
    if zero is None:
        zero = _ZEROS[key] = torch.zeros((), dtype=like.dtype, device=like.device)
    return zero


class HydraLinearFn(torch.autograd.Function):
    """y = x Wᵀ (+ b) + s·z Bᵀ with z = g ⊗ a, [a, logits] = x [A; W_router]ᵀ, g = softmax(logits).

    Inputs: x (…, d_in) in the base dtype; the frozen base ``weight`` (d_out, d_in) and ``bias``; A (r, d_in),
    R = W_router (N, d_in) and B = [B_1 … B_N] (d_out, N·r) in the adapter dtype; s = α/r. Returns y (…, d_out)
    and the gates g (…, N) (differentiable, for the load-balancing loss). The adapter products run in the
    adapter dtype (x cast to it, as PEFT does); W x is computed in the base dtype and s·z Bᵀ is added to it in
    the adapter dtype before the result is rounded to the base dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, R, B, scaling, r):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xc = x2 if x2.dtype == A.dtype else x2.to(A.dtype)
        wc = torch.cat((A, R))
        a, logits = torch.mm(xc, wc.t()).split((r, R.shape[0]), 1)
        p = torch.softmax(logits, 1)
        z = torch.mul(p.unsqueeze(2), a.unsqueeze(1)).view(x2.shape[0], -1)  # g ⊗ a, (T, N·r)
        out = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias, x2, weight.t())
        if out.dtype == B.dtype:
            out.addmm_(z, B.t(), alpha=scaling)
        else:  # W x + s·Δ summed in the adapter dtype, rounded once to the base dtype
            out.add_(torch.mm(z, B.t()), alpha=scaling)
        ctx.save_for_backward(xc, weight, wc, B, a, p, z)
        ctx.scaling = scaling
        ctx.x_shape = shape
        ctx.set_materialize_grads(False)
        return unsafe_view(out, (*shape[:-1], out.shape[1])), unsafe_view(p, (*shape[:-1], p.shape[1]))

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, gp):
        xc, weight, wc, B, a, p, z = ctx.saved_tensors
        need_x, _, _, need_A, need_R, need_B = ctx.needs_input_grad[:6]
        tokens, n = p.shape
        r = a.shape[1]
        g2 = None if gy is None else gy.reshape(tokens, gy.shape[-1])
        dB, da, dp = _adapter_grads(g2, B, z, p, a, ctx.scaling, need_B, need_x or need_A or need_R)
        if gp is not None:  # the gates' own gradient (load-balancing loss)
            gp2 = gp.reshape(tokens, n)
            dp = gp2 if dp is None else dp + gp2
        dA = dR = dh = None
        if dp is not None and (need_x or need_A or need_R):
            dl = torch._softmax_backward_data(dp, p, 1, p.dtype)
            if da is None:
                da = dl.new_zeros(tokens, r)
            dh = torch.cat((da, dl), 1)  # gradient of [a, logits]
            if need_A or need_R:
                dA, dR = torch.mm(dh.t(), xc).split((r, n))
        dx = _input_grad(g2, dh, weight, wc, ctx.x_shape) if need_x else None
        return dx, None, None, dA, dR, dB, None, None


def _adapter_grads(g2: Optional[torch.Tensor], B: torch.Tensor, z: torch.Tensor, p: torch.Tensor, a: torch.Tensor,
                   s: float, need_B: bool, need_h: bool) -> tuple[Any, Any, Any]:
    """s·Gᵀ(g ⊗ a) for B and, through dz = s·G B split per head, da = Σ_i g_i dz_i and dg_i = ⟨dz_i, a⟩."""
    if g2 is None:
        return None, None, None
    tokens, n = p.shape
    r = a.shape[1]
    gc = g2 if g2.dtype == B.dtype else g2.to(B.dtype)
    zero = _zero(gc)
    dB = torch.addmm(zero, gc.t(), z, beta=0, alpha=s) if need_B else None
    if not need_h:
        return dB, None, None
    dz = torch.addmm(zero, gc, B, beta=0, alpha=s).view(tokens, n, r)  # s·G B, per head
    da = torch.bmm(p.unsqueeze(1), dz).view(tokens, r)  # Σ_i g_i dz_i
    dp = torch.bmm(dz, a.unsqueeze(2)).view(tokens, n)  # ⟨dz_i, a⟩
    return dB, da, dp


def _input_grad(g2: Optional[torch.Tensor], dh: Optional[torch.Tensor], weight: torch.Tensor, wc: torch.Tensor,
                x_shape: torch.Size) -> Optional[torch.Tensor]:
    """dx = G W + [da, dl]·[A; W_router], the second product added in place where the dtypes agree."""
    if g2 is None and dh is None:
        return None
    if g2 is None:
        dx2 = torch.mm(dh, wc).to(weight.dtype)
    else:
        dx2 = torch.mm(g2, weight)
        if dh is not None:
            if dx2.dtype == wc.dtype:
                dx2.addmm_(dh, wc)
            else:
                dx2.add_(torch.mm(dh, wc))
    return dx2.view(x_shape)


_APPLY = function_apply(HydraLinearFn)


def hydra_update(xd: torch.Tensor, result: torch.Tensor, A: torch.Tensor, R: torch.Tensor, B: torch.Tensor,
                 scaling: float, r: int, router_x: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(result + s·z Bᵀ, g) with a = xd Aᵀ, logits = x_r W_routerᵀ, g = softmax(logits), z = g ⊗ a: the layer's
    update onto a base output computed outside the node (a hooked, trainable or 4-bit base), as one C++
    autograd node (``hydra_update`` in ``adapters/kernels/native/layers.cpp``); only where
    :func:`native_serves`. ``router_x``: the router's input when A reads another one (A reads dropout(x),
    the router the clean x, as the module path); by default the router reads ``xd``."""
    module = native_module(xd.device)
    if module is None or transforms_active():
        raise RuntimeError("hydra_update needs the native C++ layers (native_serves)")
    return module.hydra_update(xd, result, A, R, B, router_x, float(scaling), int(r))


def native_serves(x: torch.Tensor) -> bool:
    """Whether the C++ nodes serve ``x`` (built for its device, no functorch transform active). Only they
    take a call under ``torch.autocast`` (their products then take their operands in the autocast dtype, as
    the module path's do; :class:`HydraLinearFn` computes in the adapter dtype), and :func:`hydra_update`
    has no Python twin."""
    return not transforms_active() and native_module(x.device) is not None


def hydra_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], A: torch.Tensor,
                 R: torch.Tensor, B: torch.Tensor, scaling: float, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's output y and router gates g through one node: :class:`HydraLinearFn` under functorch
    transforms, else the C++ node where :mod:`adapters.kernels.native` serves x's device, else
    :class:`HydraLinearFn` applied directly (see :func:`adapters.kernels._internals.function_apply`)."""
    if transforms_active():
        return HydraLinearFn.apply(x, weight, bias, A, R, B, scaling, r)
    module = native_module(x.device)
    if module is not None:
        return module.hydra_linear(x, weight, bias, A, R, B, float(scaling), int(r))
    return _APPLY(x, weight, bias, A, R, B, float(scaling), int(r))
