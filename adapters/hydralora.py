"""HydraLoRA: one shared LoRA ``A`` and N routed ``B`` heads per adapted linear layer.

HydraLoRA (Tian et al., "HydraLoRA: An Asymmetric LoRA Architecture for Efficient Fine-Tuning",
NeurIPS 2024, arXiv 2404.19245)::

    h = W x + (α/r) · Σ_i g_i(x) · B_i A x,      g(x) = softmax(W_router x)   (per token, N heads)

with one shared ``A`` (r × d_in, Kaiming-uniform as PEFT LoRA's ``A``), N zero-initialised heads
``B_i`` (d_out × r) and a router ``W_router`` (N × d_in) in every adapted layer. Optional top-k keeps
the k largest gates of each token and renormalises them to sum 1.

Fused computation (METHODS.md §7). With a = A x computed once,
Σ_i g_i B_i a = [B_1 … B_N] · (g ⊗ a): the heads are held as one ``nn.Linear`` of width N·r
(``lora_hydra_B``, weight d_out × N·r, columns i·r … (i+1)·r − 1 are B_i) and the combination is a
single product through an N·r-wide bottleneck. ``A`` and the router read the same x, so without
dropout [A; W_router] x is one product too. :func:`hydralora_delta_reference` is the plain per-head
loop (A x recomputed per head, as the reference code does) the fused layer is tested against.

Single-function path (the default). Written module by module, the layer issues about a dozen small
tensor operations per call in forward and again in backward, each with its own autograd node; at a few
thousand tokens per step a Llama-sized model is then partly bound by the host's launch rate, not by
arithmetic. :class:`_HydraLinearFn` computes the whole layer

    y = W x (+ b) + (α/r)·[B_1 … B_N](g ⊗ a),   [a; l] = [A; W_router] x,   g = softmax(l)

as one ``torch.autograd.Function`` with the base product inside it and a hand-written backward. With
G = dL/dy and dz = (α/r)·G·[B_1 … B_N] split into N blocks dz_i of width r:

    da = Σ_i g_i dz_i,   dg_i = ⟨dz_i, a⟩,   dl = g ⊙ (dg − ⟨g, dg⟩),
    d[B_1 … B_N] = (α/r)·Gᵀ(g ⊗ a),   d[A; W_router] = [da, dl]ᵀ x,
    dx = G W + [da, dl]·[A; W_router]   (the second product added in place to the first).

Per layer that is 8 kernel-launching operations forward and 11 backward with float32 adapter weights on
a bfloat16 base, against 7 and 10 for PEFT LoRA and 10 and 16 for the module path (one autograd node
instead of about ten; benchmarks/bench_hydralora_model.py counts them). Where the C++ extension of
:mod:`adapters.kernels.native` is built (by default on CUDA) the same node runs as a C++ autograd function
whose backward never enters Python, with the softmax, the outer product g ⊗ a and their backward
(two batched products, the softmax backward and a concatenation) as one kernel each way: 7 launches
forward and 8 backward; :class:`_HydraLinearFn` is then the fallback and the functorch path. The precision is the module
path's: x is cast to the adapter weights' dtype (PEFT's convention), and (α/r)·Δ is added to W x in that
dtype before the sum is rounded to the base dtype. The path serves one active adapter with dense
live routing (no top-k, no frozen gates) and no active dropout, on a frozen plain ``nn.Linear`` base
without hooks, outside ``torch.autocast``; every other call takes the module path
(``HydraLoraLinear.use_lean_path = False`` forces it). Its backward cannot be differentiated again.

Router initialisation. ``lora_hydra_router`` starts Kaiming-uniform (a = √5, the ``nn.Linear``
default), not zero: with B_i = 0 and a zero router every head receives the same gradient
(g_i = 1/N for every token) and the router's gradient vanishes, so the heads would stay identical
for ever and the layer would train as plain LoRA. Small random logits break that symmetry.

Load balancing (optional, ``balance=True``). Per layer and forward pass the Switch-Transformer loss
L_aux = N · Σ_i f_i P_i, f_i the fraction of tokens whose largest gate is head i (argmax, no
gradient) and P_i the mean router probability of head i (full softmax, differentiable). It equals 1
under uniform routing and grows as routing concentrates. Every position of the batch counts (the
layer does not see the attention mask). :func:`hydra_aux_loss` sums the layers' latest values;
add ``coef · hydra_aux_loss(model)`` to the training loss. (The released reference code computes a
balancing loss that is always zero; this one is not, see the tests.)

Merging. The delta is input-dependent through g(x), so it merges into W only when the gates are
frozen to constants: :func:`freeze_routing` sets them, after which
ΔW = (α/r) · Σ_i g_i B_i A = (α/r) · [g_1 B_1 … g_N B_N] A. Merging with live routing raises
:class:`AdapterError`.

PEFT integration (METHODS.md §8). :class:`HydraLoraLinear` subclasses ``peft.tuners.lora.Linear``
and is registered with ``LoraConfig._register_custom_module({nn.Linear: HydraLoraLinear})``. Its
extra parameters are named ``lora_hydra_*`` and listed in ``adapter_layer_names``, so PEFT's
trainability, disable/enable/delete and save/load machinery handle them. The number of heads, top-k
and balance switch travel in :class:`HydraLoraConfig`, a ``LoraConfig`` subclass with three extra
fields: PEFT hands the config to every layer it builds (``update_layer(..., config=...)``), so the
layer reads them from there — per adapter, with no global state — and they are saved in
``adapter_config.json``. The custom-module mapping itself is not saved; load with
:func:`hydralora_from_pretrained` (or re-create the config and pass ``config=`` to
``PeftModel.from_pretrained``). Stock PEFT loading of such a folder drops the ``hydra_*`` fields and
silently builds plain LoRA, which is why :func:`hydralora_from_pretrained` refuses folders that lack
them.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch.autograd.function import once_differentiable

from geoprobe.errors import AdapterError
from .kernels.frozen_linear import frozen_plain_linear
from .kernels.native import native_module

log = logging.getLogger(__name__)

__all__ = [
    "HydraLoraConfig",
    "HydraLoraLinear",
    "hydralora_config",
    "hydralora_from_pretrained",
    "hydralora_delta_reference",
    "hydra_aux_loss",
    "record_routing",
    "RoutingRecord",
    "freeze_routing",
    "unfreeze_routing",
    "hydra_layers",
]

_ALLOWED_INIT = (True, False, "gaussian")


@dataclass
class HydraLoraConfig(LoraConfig):
    """``LoraConfig`` plus the HydraLoRA settings each :class:`HydraLoraLinear` reads.

    Attributes:
        hydra_heads: number N of B heads per layer.
        hydra_top_k: keep the k largest gates per token (renormalised); None = dense softmax.
        hydra_balance: record the Switch load-balancing loss in every forward pass.
    """

    hydra_heads: int = field(default=4, metadata={"help": "number of routed B heads (HydraLoRA N)"})
    hydra_top_k: Optional[int] = field(default=None, metadata={"help": "top-k gates per token, None = all"})
    hydra_balance: bool = field(default=False, metadata={"help": "record the load-balancing loss"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.hydra_heads, bool) or not isinstance(self.hydra_heads, int) or self.hydra_heads < 1:
            raise AdapterError(f"hydra_heads = {self.hydra_heads!r}; give a positive integer number of heads")
        if self.hydra_top_k is not None and (
            isinstance(self.hydra_top_k, bool) or not isinstance(self.hydra_top_k, int)
            or not 1 <= self.hydra_top_k <= self.hydra_heads
        ):
            raise AdapterError(
                f"hydra_top_k = {self.hydra_top_k!r} must be an integer in 1 … {self.hydra_heads} (n_heads) or None"
            )
        if self.use_dora or self.lora_bias:
            raise AdapterError("HydraLoRA supports neither use_dora nor lora_bias; switch them off")
        if self.init_lora_weights not in _ALLOWED_INIT:
            raise AdapterError(
                f"init_lora_weights = {self.init_lora_weights!r} is not supported by HydraLoRA; use "
                "True (Kaiming A, zero B heads), 'gaussian' or False"
            )
        self._register_custom_module({nn.Linear: HydraLoraLinear})


def hydralora_config(
    r: int,
    alpha: float,
    n_heads: int,
    target_modules: Union[Sequence[str], str],
    top_k: Optional[int] = None,
    balance: bool = False,
    **kw: Any,
) -> HydraLoraConfig:
    """A :class:`HydraLoraConfig` with :class:`HydraLoraLinear` registered for ``nn.Linear``.

    ``kw`` goes to ``LoraConfig`` (``lora_dropout``, ``task_type``, ``rank_pattern``, …). The paper's
    setting: FFN targets (gate_proj, up_proj, down_proj), r = 4–8, alpha = 32, N = 4.
    """
    targets = list(target_modules) if not isinstance(target_modules, str) else target_modules
    return HydraLoraConfig(r=r, lora_alpha=alpha, target_modules=targets, hydra_heads=n_heads,
                           hydra_top_k=top_k, hydra_balance=balance, **kw)


# --------------------------------------------------------------------------- math
def _gates(logits: torch.Tensor, top_k: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax gates and the gates after top-k renormalisation, in the logits' dtype (PyTorch's
    softmax accumulates half-precision inputs in float32 internally)."""
    probs = torch.softmax(logits, dim=-1)
    if top_k is None or top_k >= probs.shape[-1]:
        return probs, probs
    keep = torch.zeros_like(probs).scatter_(-1, probs.topk(top_k, dim=-1).indices, 1.0)
    kept = probs * keep
    return probs, kept / kept.sum(dim=-1, keepdim=True)


def _balance_loss(probs: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer loss N · Σ_i f_i P_i over all tokens (probs: (..., N))."""
    n = probs.shape[-1]
    flat = probs.reshape(-1, n)
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    f = torch.bincount(flat.argmax(dim=-1), minlength=n).to(flat.dtype) / flat.shape[0]
    return n * (f * flat.mean(dim=0)).sum()


_unsafe_view = torch.ops.aten._unsafe_view.default  # a reshape whose result autograd does not treat as a view
_ZEROS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _zero(like: torch.Tensor) -> torch.Tensor:
    """A cached 0-dim zero of ``like``'s dtype and device: the ignored ``input`` of addmm(…, beta=0, alpha=s),
    which applies the scale s inside the product instead of as a separate op."""
    key = (like.device, like.dtype)
    zero = _ZEROS.get(key)
    if zero is None:
        zero = _ZEROS[key] = torch.zeros((), dtype=like.dtype, device=like.device)
    return zero


class _HydraLinearFn(torch.autograd.Function):
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
        return _unsafe_view(out, (*shape[:-1], out.shape[1])), _unsafe_view(p, (*shape[:-1], p.shape[1]))

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, gp):
        xc, weight, wc, B, a, p, z = ctx.saved_tensors
        s = ctx.scaling
        need_x, _, _, need_A, need_R, need_B = ctx.needs_input_grad[:6]
        tokens, n = p.shape
        r = a.shape[1]
        dx = dA = dR = dB = None
        da = dp = None
        g2 = None
        if gy is not None:
            g2 = gy.reshape(tokens, gy.shape[-1])
            gc = g2 if g2.dtype == B.dtype else g2.to(B.dtype)
            zero = _zero(gc)
            if need_B:
                dB = torch.addmm(zero, gc.t(), z, beta=0, alpha=s)  # s·Gᵀ(g ⊗ a)
            if need_x or need_A or need_R:
                dz = torch.addmm(zero, gc, B, beta=0, alpha=s).view(tokens, n, r)  # s·G B, per head
                da = torch.bmm(p.unsqueeze(1), dz).view(tokens, r)  # Σ_i g_i dz_i
                dp = torch.bmm(dz, a.unsqueeze(2)).view(tokens, n)  # ⟨dz_i, a⟩
        if gp is not None:  # the gates' own gradient (load-balancing loss)
            gp2 = gp.reshape(tokens, n)
            dp = gp2 if dp is None else dp + gp2
        dh = None
        if dp is not None and (need_x or need_A or need_R):
            dl = torch._softmax_backward_data(dp, p, 1, p.dtype)
            if da is None:
                da = dl.new_zeros(tokens, r)
            dh = torch.cat((da, dl), 1)  # gradient of [a, logits]
            if need_A or need_R:
                dA, dR = torch.mm(dh.t(), xc).split((r, n))
        if need_x and (g2 is not None or dh is not None):
            if g2 is None:
                dx2 = torch.mm(dh, wc).to(weight.dtype)
            else:
                dx2 = torch.mm(g2, weight)
                if dh is not None:
                    if dx2.dtype == wc.dtype:
                        dx2.addmm_(dh, wc)
                    else:
                        dx2.add_(torch.mm(dh, wc))
            dx = dx2.view(ctx.x_shape)
        return dx, None, None, dA, dR, dB, None, None


_HYDRA_APPLY = super(torch.autograd.Function, _HydraLinearFn).apply
"""The C ``apply`` of :class:`_HydraLinearFn`: ``torch.autograd.Function.apply`` adds a pytree pass over the
arguments (for functorch's dead wrappers) and a ``setup_context`` check on every call; neither applies when no
functorch transform is active (checked per call)."""


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

    The oracle for :class:`HydraLoraLinear`: A x is recomputed for every head, as in the released
    reference code. ``A`` (r, d_in), ``Bs`` (N, d_out, r) or N tensors (d_out, r), ``Wr`` (N, d_in);
    ``gates`` (N,) replaces the router with constants (frozen routing). Top-k keeps the k largest
    gates per token and renormalises them.
    """
    heads = list(Bs)
    n = len(heads)
    if gates is None:
        probs = torch.softmax(x @ Wr.T, dim=-1)
        if top_k is not None and top_k < n:
            kth = probs.topk(top_k, dim=-1).values[..., -1:]
            probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
            probs = probs / probs.sum(dim=-1, keepdim=True)
        g = probs
    else:
        g = gates.expand(*x.shape[:-1], n)
    out = torch.zeros(*x.shape[:-1], heads[0].shape[0], dtype=x.dtype, device=x.device)
    for i in range(n):
        out = out + g[..., i : i + 1] * ((x @ A.T) @ heads[i].T)
    return scaling * out


# --------------------------------------------------------------------------- the layer
class HydraLoraLinear(LoraLinear):
    """PEFT LoRA ``Linear`` with HydraLoRA's routed B heads (see the module docstring).

    Per adapter: ``lora_A`` (shared A, PEFT's own, Kaiming-uniform), ``lora_hydra_B`` (one
    ``nn.Linear(N·r, d_out)``, zero-initialised), ``lora_hydra_router`` (``nn.Linear(d_in, N)``,
    Kaiming-uniform). PEFT's plain ``lora_B`` is not used and is removed.
    """

    #: take :class:`_HydraLinearFn` wherever it serves the call (see the module docstring)
    use_lean_path: bool = True

    adapter_layer_names = LoraLinear.adapter_layer_names + ("lora_hydra_B", "lora_hydra_router")
    other_param_names = LoraLinear.other_param_names + (
        "hydra_heads", "hydra_top_k", "hydra_balance", "hydra_frozen_gates", "hydra_last_aux",
        "hydra_gate_sums",
    )

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: LoraConfig, **kwargs: Any) -> None:
        if not isinstance(config, HydraLoraConfig):
            raise AdapterError(
                f"adapter {adapter_name!r} uses a plain LoraConfig on a HydraLoRA layer; build it with "
                "hydralora_config(...) (a layer holds HydraLoRA adapters only)"
            )
        if not hasattr(self, "lora_hydra_B"):
            self.lora_hydra_B = nn.ModuleDict({})
            self.lora_hydra_router = nn.ModuleDict({})
            self.hydra_heads: dict[str, int] = {}
            self.hydra_top_k: dict[str, Optional[int]] = {}
            self.hydra_balance: dict[str, bool] = {}
            self.hydra_frozen_gates: dict[str, torch.Tensor] = {}
            self.hydra_last_aux: dict[str, torch.Tensor] = {}
            self.hydra_gate_sums: dict[str, list] = {}  # filled only inside record_routing(...)
            self.hydra_recording = False
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        del self.lora_B[adapter_name]  # replaced by the N-head lora_hydra_B
        n = config.hydra_heads
        self.hydra_heads[adapter_name] = n
        self.hydra_top_k[adapter_name] = config.hydra_top_k
        self.hydra_balance[adapter_name] = bool(config.hydra_balance)
        self.lora_hydra_B[adapter_name] = nn.Linear(n * r, self.out_features, bias=False)
        self.lora_hydra_router[adapter_name] = nn.Linear(self.in_features, n, bias=False)
        if config.init_lora_weights is not False:
            nn.init.zeros_(self.lora_hydra_B[adapter_name].weight)
        nn.init.kaiming_uniform_(self.lora_hydra_router[adapter_name].weight, a=math.sqrt(5))
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    # ---- helpers
    def heads(self, adapter: str) -> torch.Tensor:
        """The B heads as a (N, d_out, r) view of ``lora_hydra_B``'s weight."""
        w = self.lora_hydra_B[adapter].weight
        n = self.hydra_heads[adapter]
        return w.view(w.shape[0], n, -1).permute(1, 0, 2)

    def _bottleneck(self, x: torch.Tensor, adapter: str, record: bool = True) -> torch.Tensor:
        """z = g(x) ⊗ (A x), the (…, N·r) input of ``lora_hydra_B``; records the balance loss."""
        A = self.lora_A[adapter].weight
        router = self.lora_hydra_router[adapter].weight
        dropout = self.lora_dropout[adapter]
        n, r = self.hydra_heads[adapter], self.r[adapter]
        frozen = self.hydra_frozen_gates.get(adapter)
        no_dropout = isinstance(dropout, nn.Identity) or not dropout.training
        if frozen is not None:
            a = F.linear(dropout(x), A)
            g = frozen.to(device=a.device, dtype=a.dtype).expand(*a.shape[:-1], n)
            probs = None
        else:
            if no_dropout:  # [A; W_router] x as one product
                a, logits = F.linear(x, torch.cat([A, router], dim=0)).split([r, n], dim=-1)
            else:  # dropout on A's input only; the router sees the clean input
                a, logits = F.linear(dropout(x), A), F.linear(x, router)
            probs, g = _gates(logits, self.hydra_top_k[adapter])
        if record:
            self._record(adapter, probs, g)
        return (g.unsqueeze(-1) * a.unsqueeze(-2)).reshape(*a.shape[:-1], n * r)  # g ⊗ a

    def _record(self, adapter: str, probs: Optional[torch.Tensor], g: torch.Tensor) -> None:
        """Store the load-balancing loss (from the full softmax ``probs``; None with frozen gates) and, inside
        :func:`record_routing`, accumulate the gates ``g``."""
        if probs is not None and self.hydra_balance[adapter]:
            self.hydra_last_aux[adapter] = _balance_loss(probs)
        else:
            self.hydra_last_aux.pop(adapter, None)
        if self.hydra_recording:
            n = g.shape[-1]
            flat = g.detach().reshape(-1, n).double()
            acc = self.hydra_gate_sums.setdefault(adapter, [torch.zeros(n, dtype=torch.float64), 0])
            acc[0] = acc[0] + flat.sum(dim=0).cpu()
            acc[1] += flat.shape[0]

    def _lean_forward(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The whole layer through :class:`_HydraLinearFn`, or None where that path does not serve the call
        (several or no active adapters, top-k, frozen gates, active dropout, a base layer other than a frozen
        plain ``nn.Linear`` without hooks, mismatched dtypes, autocast)."""
        if not self.use_lean_path or self.merged or self.disable_adapters:
            return None
        adapter = self.active_adapter
        if not isinstance(adapter, str):
            if len(adapter) != 1:
                return None
            adapter = adapter[0]
        if adapter not in self.lora_hydra_B or adapter in self.hydra_frozen_gates:
            return None
        top_k = self.hydra_top_k[adapter]
        if top_k is not None and top_k < self.hydra_heads[adapter]:
            return None
        dropout = self.lora_dropout[adapter]
        if dropout.training and type(dropout) is not nn.Identity:
            return None
        base = self.base_layer
        if not frozen_plain_linear(base, x):
            return None
        weight, bias = base.weight, base.bias
        A = self.lora_A[adapter].weight
        R = self.lora_hydra_router[adapter].weight
        B = self.lora_hydra_B[adapter].weight
        if not (A.dtype == R.dtype == B.dtype) or torch.is_autocast_enabled(x.device.type):
            return None
        if torch._C._are_functorch_transforms_active():
            y, probs = _HydraLinearFn.apply(x, weight, bias, A, R, B, self.scaling[adapter], self.r[adapter])
        else:
            module = native_module(x.device)
            apply = _HYDRA_APPLY if module is None else module.hydra_linear
            y, probs = apply(x, weight, bias, A, R, B, float(self.scaling[adapter]), int(self.r[adapter]))
        self._record(adapter, probs, probs)
        return y

    def _hydra_delta(self, x: torch.Tensor, adapter: str, record: bool = True) -> torch.Tensor:
        """(α/r) · Σ_i g_i(x) B_i A x."""
        return self.lora_hydra_B[adapter](self._bottleneck(x, adapter, record)) * self.scaling[adapter]

    # ---- PEFT entry points
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not args and not kwargs:
            y = self._lean_forward(x)
            if y is not None:
                return y
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            for name in self.active_adapters:
                self.hydra_last_aux.pop(name, None)
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        out_dtype = result.dtype
        for adapter in self.active_adapters:
            if adapter not in self.lora_hydra_B:
                continue
            xa = self._cast_input_dtype(x, self.lora_A[adapter].weight.dtype)
            z = self._bottleneck(xa, adapter)
            w = self.lora_hydra_B[adapter].weight
            if z.dtype == result.dtype and result.is_contiguous():
                # W x + (α/r)·[B_1 … B_N](g ⊗ a) as one GEMM with the scale and the sum in its epilogue
                flat = torch.addmm(result.reshape(-1, w.shape[0]), z.reshape(-1, w.shape[1]), w.t(),
                                   alpha=self.scaling[adapter])
                result = flat.view(result.shape)
            else:  # adapter weights kept in another dtype than the base (PEFT's dtype autocast)
                result = result + F.linear(z, w) * self.scaling[adapter]
        return result.to(out_dtype)

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for adapter in set(adapter_names):
            if adapter == "__base__" or adapter not in self.lora_hydra_B:
                continue
            idx = [i for i, a in enumerate(adapter_names) if a == adapter]
            sub = self._cast_input_dtype(x[idx], self.lora_A[adapter].weight.dtype)
            result[idx] += self._hydra_delta(sub, adapter, record=False).to(out_dtype)
        return result

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """ΔW = (α/r) · Σ_i g_i B_i A for frozen gates g; raises :class:`AdapterError` otherwise."""
        gates = self.hydra_frozen_gates.get(adapter)
        if gates is None:
            raise AdapterError(
                f"HydraLoRA adapter {adapter!r} routes each token differently, so it has no single weight "
                "delta; call freeze_routing(model, weights) first to merge with constant gates"
            )
        A = self.lora_A[adapter].weight
        B = self.lora_hydra_B[adapter].weight
        dtype = B.dtype
        upcast = B.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
        if upcast:
            A, B = A.float(), B.float()
        g = gates.to(device=B.device, dtype=B.dtype)
        b_mix = (B.view(B.shape[0], g.numel(), -1) * g[:, None]).sum(dim=1)  # Σ_i g_i B_i, (d_out, r)
        delta = b_mix @ A * self.scaling[adapter]
        if self.fan_in_fan_out:
            delta = delta.T
        return delta.to(dtype) if upcast else delta

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        names = check_adapters_to_merge(self, adapter_names)
        live = [a for a in names if a in self.lora_hydra_B and a not in self.hydra_frozen_gates]
        if live:
            raise AdapterError(
                f"cannot merge HydraLoRA adapter(s) {live}: routing is per token; freeze it to constant "
                "gates with freeze_routing(model, weights) (e.g. the mean gates from record_routing) first"
            )
        base = self.get_base_layer()
        for adapter in names:
            if adapter not in self.lora_hydra_B:
                continue
            delta = self.get_delta_weight(adapter)
            if safe_merge:
                merged = base.weight.data.clone() + delta.to(base.weight.dtype)
                if not torch.isfinite(merged).all():
                    raise AdapterError(f"merging HydraLoRA adapter {adapter!r} gives non-finite weights")
                base.weight.data = merged
            else:
                base.weight.data += delta.to(base.weight.dtype)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            log.warning("HydraLoRA layer is not merged; nothing to unmerge")
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.lora_hydra_B:
                weight.data -= self.get_delta_weight(adapter).to(weight.dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False

    def __repr__(self) -> str:
        return "hydralora." + super().__repr__()


# --------------------------------------------------------------------------- model-level helpers
def hydra_layers(model: nn.Module) -> list[tuple[str, HydraLoraLinear]]:
    """All HydraLoRA layers of ``model`` with their module names."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, HydraLoraLinear)]


def _require_layers(model: nn.Module) -> list[tuple[str, HydraLoraLinear]]:
    layers = hydra_layers(model)
    if not layers:
        raise AdapterError("the model holds no HydraLoRA layer; build it with get_peft_model(model, hydralora_config(...))")
    return layers


def hydra_aux_loss(model: nn.Module) -> torch.Tensor:
    """Σ over HydraLoRA layers (and their active adapters with ``balance=True``) of the load-balancing
    loss recorded in the latest forward pass; differentiable with respect to the routers.

    Raises:
        AdapterError: no layer has balancing switched on, or no forward pass has recorded one yet.
    """
    total: Optional[torch.Tensor] = None
    enabled = 0
    for name, layer in _require_layers(model):
        for adapter in layer.active_adapters:
            if not layer.hydra_balance.get(adapter, False) or adapter in layer.hydra_frozen_gates:
                continue
            enabled += 1
            loss = layer.hydra_last_aux.get(adapter)
            if loss is None:
                raise AdapterError(
                    f"layer {name} has no load-balancing loss recorded for adapter {adapter!r}; run a "
                    "forward pass with the adapter enabled before calling hydra_aux_loss"
                )
            total = loss if total is None else total + loss.to(total.device)
    if total is None:
        raise AdapterError("no active HydraLoRA adapter records a load-balancing loss; build the config with "
                           "balance=True (and leave routing unfrozen)")
    return total


class RoutingRecord:
    """Gate sums collected by :func:`record_routing`; :meth:`mean_gates` gives per-layer averages."""

    def __init__(self, layers: list[tuple[str, HydraLoraLinear]], adapter_name: Optional[str]) -> None:
        self._layers = layers
        self._adapter = adapter_name

    def mean_gates(self) -> dict[str, list[float]]:
        """Per layer (module name → N floats), the gate vector averaged over every token recorded,
        rescaled to sum exactly 1 (bfloat16 gates sum to 1 only within about 1e-3)."""
        out: dict[str, list[float]] = {}
        for name, layer in self._layers:
            adapter = self._adapter or layer.active_adapters[0]
            acc = layer.hydra_gate_sums.get(adapter)
            if acc is None or acc[1] == 0:
                raise AdapterError(f"layer {name} recorded no tokens for adapter {adapter!r}; run forward "
                                   "passes inside the record_routing(model) block")
            mean = acc[0] / acc[1]
            out[name] = [float(v) for v in mean / mean.sum()]  # exact sum 1 despite half-precision gates
        return out


@contextlib.contextmanager
def record_routing(model: nn.Module, adapter_name: Optional[str] = None) -> Iterator[RoutingRecord]:
    """Average each HydraLoRA layer's gates over the forward passes run inside the block::

        with record_routing(model) as rec:
            for batch in calibration:
                model(**batch)
        freeze_routing(model, rec.mean_gates())

    Outside the block nothing is recorded (no cost in training).
    """
    layers = _require_layers(model)
    for _, layer in layers:
        layer.hydra_gate_sums.clear()
        layer.hydra_recording = True
    try:
        yield RoutingRecord(layers, adapter_name)
    finally:
        for _, layer in layers:
            layer.hydra_recording = False


def _gate_vector(weights: Any, n: int, where: str) -> torch.Tensor:
    g = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
    if g.numel() != n:
        raise AdapterError(f"{where}: {g.numel()} routing weights for {n} heads; give one weight per head")
    if not torch.isfinite(g).all() or (g < 0).any() or abs(float(g.sum()) - 1.0) > 1e-3:
        raise AdapterError(f"{where}: routing weights {g.tolist()} must be non-negative and sum to 1, "
                           "like the router's softmax")
    return g.float()


def freeze_routing(
    model: nn.Module,
    weights: Union[Sequence[float], torch.Tensor, Mapping[str, Any]],
    adapter_name: Optional[str] = None,
) -> None:
    """Replace the router by constant gates so the adapter can be merged.

    ``weights``: one vector of N gates for every layer, or a mapping from module name (full name or a
    dotted suffix of it) to that layer's gates, covering every HydraLoRA layer. Gates must be
    non-negative and sum to 1 (within 1e-3; they are used as given). ``adapter_name`` defaults to
    every adapter of each layer.
    """
    layers = _require_layers(model)
    if isinstance(weights, Mapping):
        used: set[str] = set()
        per_layer = {}
        for name, _ in layers:
            keys = [k for k in weights if name == k or name.endswith("." + k)]
            if len(keys) != 1:
                raise AdapterError(
                    f"routing weights name {len(keys)} entries for layer {name}; give exactly one per HydraLoRA layer"
                )
            used.add(keys[0])
            per_layer[name] = weights[keys[0]]
        extra = sorted(set(weights) - used)
        if extra:
            raise AdapterError(f"routing weights given for unknown layer(s) {extra[:5]}")
    else:
        per_layer = {name: weights for name, _ in layers}
    for name, layer in layers:
        adapters = [adapter_name] if adapter_name else list(layer.lora_hydra_B)
        for adapter in adapters:
            if adapter not in layer.lora_hydra_B:
                raise AdapterError(f"layer {name} has no HydraLoRA adapter {adapter!r}")
            if adapter in layer.merged_adapters:
                raise AdapterError(f"adapter {adapter!r} is merged in {name}; unmerge before changing its routing")
            layer.hydra_frozen_gates[adapter] = _gate_vector(per_layer[name], layer.hydra_heads[adapter], name)
            layer.hydra_last_aux.pop(adapter, None)


def unfreeze_routing(model: nn.Module, adapter_name: Optional[str] = None) -> None:
    """Return to per-token routing; refuses while the adapter is merged."""
    for name, layer in _require_layers(model):
        adapters = [adapter_name] if adapter_name else list(layer.hydra_frozen_gates)
        for adapter in adapters:
            if adapter in layer.merged_adapters:
                raise AdapterError(f"adapter {adapter!r} is merged in {name}; unmerge it before unfreezing routing")
            layer.hydra_frozen_gates.pop(adapter, None)


def hydralora_from_pretrained(model: nn.Module, path: Union[str, os.PathLike], adapter_name: str = "default",
                              is_trainable: bool = False):
    """Load a HydraLoRA adapter saved with ``save_pretrained``: rebuild the config from
    ``adapter_config.json`` (refusing a folder without the ``hydra_*`` fields), register the custom
    layer and hand it to ``PeftModel.from_pretrained``."""
    from peft import PeftModel

    cfg_file = Path(path) / "adapter_config.json"
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{cfg_file} does not exist; point to a folder written by save_pretrained") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterError(f"cannot read {cfg_file}: {exc}") from None
    if "hydra_heads" not in raw:
        raise AdapterError(
            f"{path} holds no HydraLoRA settings (hydra_heads missing in adapter_config.json); it is not a "
            "HydraLoRA adapter — load it with stock PEFT instead"
        )
    known = {f.name for f in fields(HydraLoraConfig) if f.init}
    dropped = sorted(set(raw) - known)
    if dropped:
        log.warning("ignoring adapter_config.json keys unknown to this PEFT version: %s", dropped)
    cfg = HydraLoraConfig(**{k: v for k, v in raw.items() if k in known})
    return PeftModel.from_pretrained(model, str(path), adapter_name=adapter_name, config=cfg,
                                     is_trainable=is_trainable)
