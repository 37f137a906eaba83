"""HydraLoRA's pure math: router gates, the load-balancing loss, the merged delta and the per-head reference.

HydraLoRA (Tian et al., "HydraLoRA: An Asymmetric LoRA Architecture for Efficient Fine-Tuning",
NeurIPS 2024, arXiv 2404.19245)::

    h = W x + (α/r) · Σ_i g_i(x) · B_i A x,      g(x) = softmax(W_router x)   (per token, N heads)

On a 4-bit base (QLoRA) W is the dequantized NF4 weight, W x = dequantize_4bit(W_nf4) x, computed by the
bitsandbytes layer; the update term is unchanged.

Everything here is a function of tensors; the layer (:mod:`adapters.hydralora.layer`) and the one-node path
(:mod:`adapters.hydralora.kernels`) import from here, never the reverse.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch

__all__ = ["router_gates", "balance_loss", "outer_bottleneck", "frozen_delta_weight", "hydralora_delta_reference"]


def _top_k_mask(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """1 at the ``top_k`` largest entries of the last axis, 0 elsewhere (ties broken as ``torch.topk`` does)."""
    return torch.zeros_like(probs).scatter_(-1, probs.topk(top_k, dim=-1).indices, 1.0)


def router_gates(logits: torch.Tensor, top_k: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's softmax p = softmax(logits) and the gates g the heads are weighted with.

    * dense (``top_k`` None or N): g = p;
    * 1 < k < N: the k largest gates renormalised, g_i = p_i·m_i / Σ_j p_j m_j with m the top-k mask (GShard's
      top-2 gate, Lepikhin et al. 2021, arXiv 2006.16668; Mixtral, arXiv 2401.04088);
    * k = 1: renormalising gives g = m, a constant, so the router would get no gradient at all. The gate is the
      straight-through one-hot g = m + (p − sg(p)) (sg = stop-gradient; Bengio et al. 2013, arXiv 1308.3432):
      its value is exactly m, as before, and its gradient is that of p, dg_j/dl_k = p_j(δ_jk − p_k). The
      HydraLoRA reference code forms the same estimator for its top-1 router (``expert_choice = y_hard −
      routing.detach() + routing`` in MLLM-HydraLoRA/moe.py). Switch Transformer (Fedus et al. 2022, JMLR,
      arXiv 2101.03961, §2.1) instead scales the kept head by p_i, which changes the layer's outputs; the
      straight-through gate keeps them.

    Both are in the logits' dtype (PyTorch's softmax accumulates half-precision inputs in float32 internally).
    """
    probs = torch.softmax(logits, dim=-1)
    n = probs.shape[-1]
    if top_k is None or top_k >= n:
        return probs, probs
    keep = _top_k_mask(probs, top_k)
    if top_k == 1:
        return probs, keep + (probs - probs.detach())
    kept = probs * keep
    return probs, kept / kept.sum(dim=-1, keepdim=True)


def balance_loss(probs: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load-balancing loss L_aux = N · Σ_i f_i P_i over all tokens (Fedus et al. 2022, eq. 4).

    ``probs`` (…, N): f_i is the fraction of tokens whose largest gate is head i (argmax, no gradient), P_i the
    mean router probability of head i (differentiable). L_aux = 1 under uniform routing and N when every token
    goes to one head. Half-precision gates are summed in float32.
    """
    n = probs.shape[-1]
    flat = probs.reshape(-1, n)
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    f = torch.bincount(flat.argmax(dim=-1), minlength=n).to(flat.dtype) / flat.shape[0]
    return n * (f * flat.mean(dim=0)).sum()


def outer_bottleneck(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """z = g ⊗ a flattened to (…, N·r): the input of the wide head matrix [B_1 … B_N], so that
    [B_1 … B_N] z = Σ_i g_i B_i a (METHODS.md §7)."""
    n, r = g.shape[-1], a.shape[-1]
    return (g.unsqueeze(-1) * a.unsqueeze(-2)).reshape(*a.shape[:-1], n * r)


def frozen_delta_weight(A: torch.Tensor, B: torch.Tensor, frozen: torch.Tensor, scaling: float) -> torch.Tensor:
    """ΔW = (α/r) · Σ_i g_i B_i A for constant gates g (frozen routing), shape (d_out, d_in).

    ``A`` (r, d_in), ``B`` = [B_1 … B_N] (d_out, N·r), ``frozen`` (N,). Computed in B's dtype.
    """
    g = frozen.to(device=B.device, dtype=B.dtype)
    b_mix = (B.view(B.shape[0], g.numel(), -1) * g[:, None]).sum(dim=1)  # Σ_i g_i B_i, (d_out, r)
    return b_mix @ A * scaling


def hydralora_delta_reference(
    x: torch.Tensor,
    A: torch.Tensor,
    Bs: Union[torch.Tensor, Sequence[torch.Tensor]],
    Wr: torch.Tensor,
    *,
    scaling: float = 1.0,
    top_k: Optional[int] = None,
    gates: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Plain HydraLoRA delta (α/r)·Σ_i g_i(x)·B_i A x, one head at a time.

    The oracle for :class:`~adapters.hydralora.HydraLoraLinear`: A x is recomputed for every head, as in the
    released reference code. ``A`` (r, d_in), ``Bs`` (N, d_out, r) or N tensors (d_out, r), ``Wr`` (N, d_in);
    ``gates`` (N,) replaces the router with constants (frozen routing). Top-k keeps the k largest gates per
    token and renormalises them; top-1 is the straight-through one-hot of :func:`router_gates` (value 1 on the kept
    head, the softmax's gradient), written out here without the shared helper.
    """
    heads = list(Bs)
    n = len(heads)
    if gates is None:
        probs = torch.softmax(x @ Wr.T, dim=-1)
        if top_k is not None and top_k < n:
            kth = probs.topk(top_k, dim=-1).values[..., -1:]
            keep = (probs >= kth).to(probs.dtype)
            if top_k == 1:
                probs = keep + (probs - probs.detach())
            else:
                probs = probs * keep
                probs = probs / probs.sum(dim=-1, keepdim=True)
        g = probs
    else:
        g = gates.expand(*x.shape[:-1], n)
    out = torch.zeros(*x.shape[:-1], heads[0].shape[0], dtype=x.dtype, device=x.device)
    for i in range(n):
        out = out + g[..., i : i + 1] * ((x @ A.T) @ heads[i].T)
    return scaling * out
