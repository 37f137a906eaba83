"""HydraLoRA's PEFT layer: one shared LoRA ``A`` and N routed ``B`` heads per adapted linear layer.

HydraLoRA (Tian et al., "HydraLoRA: An Asymmetric LoRA Architecture for Efficient Fine-Tuning",
NeurIPS 2024, arXiv 2404.19245)::

    h = W x + (α/r) · Σ_i g_i(x) · B_i A x,      g(x) = softmax(W_router x)   (per token, N heads)

with one shared ``A`` (r × d_in, Kaiming-uniform as PEFT LoRA's ``A``), N zero-initialised heads ``B_i``
(d_out × r) and a router ``W_router`` (N × d_in) in every adapted layer. Optional top-k keeps the k largest
gates of each token (:func:`~adapters.hydralora.functional.router_gates`).

Fused computation (METHODS.md §7). With a = A x computed once, Σ_i g_i B_i a = [B_1 … B_N] · (g ⊗ a): the
heads are held as one ``nn.Linear`` of width N·r (``lora_hydra_B``, weight d_out × N·r, columns
i·r … (i+1)·r − 1 are B_i) and the combination is a single product through an N·r-wide bottleneck. ``A`` and
the router read the same x, so without dropout [A; W_router] x is one product too.
:func:`~adapters.hydralora.functional.hydralora_delta_reference` is the plain per-head loop the layer is
tested against.

One-node path (the default): :func:`~adapters.hydralora.kernels.hydra_linear` computes the whole layer as one
autograd node. It serves one active adapter with dense live routing (no top-k, no frozen gates) and no active
dropout, on a frozen plain ``nn.Linear`` base without hooks; under ``torch.autocast`` only where the C++ node
serves (:func:`~adapters.hydralora.kernels.native_serves`: its products then take their operands in
the autocast dtype, as the module path's do). Where the C++ nodes are built, a call with active dropout or
any other base (hooked, trainable, 4-bit) keeps the base's own module for W x and
:func:`~adapters.hydralora.kernels.hydra_update` adds the routed update onto its output in one node (A reads
dropout(x), the router the clean x, as in the module path). Every other call takes the module path
(``HydraLoraLinear.use_lean_path = False`` forces it).

Router initialisation. ``lora_hydra_router`` starts Kaiming-uniform (a = √5, the ``nn.Linear`` default), not
zero: with B_i = 0 and a zero router every head receives the same gradient (g_i = 1/N for every token) and the
router's gradient vanishes, so the heads would stay identical for ever and the layer would train as plain
LoRA. Small random logits break that symmetry.

Load balancing (optional, ``balance=True``): the Switch-Transformer loss of
:func:`~adapters.hydralora.functional.balance_loss` per layer and forward pass; every position of the batch
counts (the layer does not see the attention mask). :func:`~adapters.hydralora.routing.hydra_aux_loss` sums
the layers' latest values. (The released reference code computes a balancing loss that is always zero; this
one is not, see the tests.)

Frozen routing and merging. The delta is input-dependent through g(x), so it merges into W only when the
gates are frozen to constants (:func:`~adapters.hydralora.routing.freeze_routing`), after which
ΔW = (α/r) · Σ_i g_i B_i A. Merging with live routing raises :class:`AdapterError`. Frozen gates are adapter
state: a buffer ``lora_hydra_gates.<adapter>`` that PEFT saves with the weights and restores on load.

A 4-bit base (QLoRA: a bitsandbytes ``Linear4bit``, :func:`~adapters.kernels.frozen_linear.is_4bit_linear`)
never takes the whole-layer node: ``base_layer(x) = x · dequantize_4bit(W)ᵀ`` is computed by the bitsandbytes
module and the routed update is added to it (by the update node where the C++ nodes are built, else by the
module path's :func:`~adapters.hydralora.functional.outer_bottleneck`), so the formula is the same with W the
dequantized NF4 weight. Merging into NF4 codes is refused (it would round
ΔW to the 4-bit grid); merge on the full-precision base.

PEFT integration (METHODS.md §8). :class:`HydraLoraLinear` subclasses ``peft.tuners.lora.Linear`` and is
registered by :class:`~adapters.hydralora.config.HydraLoraConfig`. Its extra tensors are named ``lora_hydra_*``
and listed in ``adapter_layer_names``/``other_param_names``, so PEFT's trainability, disable/enable/delete,
several active adapters, mixed batches and save/load handle them. PEFT's ``add_weighted_adapter`` is refused
(:mod:`adapters.refusals`).
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge

from geoprobe.errors import AdapterError
from ..kernels._internals import compiling
from ..kernels.frozen_linear import frozen_plain_linear, is_4bit_linear
from .functional import balance_loss, frozen_delta_weight, outer_bottleneck, router_gates
from .kernels import hydra_linear, hydra_update, native_serves

log = logging.getLogger(__name__)

__all__ = ["HydraLoraLinear", "GateBuffers"]

GATES = "lora_hydra_gates"


class GateBuffers(BufferDict):
    """Frozen gates per adapter name, as persistent buffers (saved by PEFT with the adapter's weights), with
    the ``get``/``pop(key, default)`` of a dict."""

    def __init__(self) -> None:
        super().__init__(persistent=True)

    def get(self, key: str, default: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        return self[key] if key in self else default

    def pop(self, key: str, *default: Any) -> Any:  # type: ignore[override]
        if key not in self and default:
            return default[0]
        return super().pop(key)


class HydraLoraLinear(LoraLinear):
    """PEFT LoRA ``Linear`` with HydraLoRA's routed B heads (see the module docstring).

    Per adapter: ``lora_A`` (shared A, PEFT's own, Kaiming-uniform), ``lora_hydra_B`` (one
    ``nn.Linear(N·r, d_out)``, zero-initialised), ``lora_hydra_router`` (``nn.Linear(d_in, N)``,
    Kaiming-uniform) and, once routing is frozen, ``lora_hydra_gates`` (N constant gates). PEFT's plain
    ``lora_B`` is not used and is removed.
    """

    #: take the one-node path wherever it serves the call (see the module docstring)
    use_lean_path: bool = True

    adapter_layer_names = LoraLinear.adapter_layer_names + ("lora_hydra_B", "lora_hydra_router")
    other_param_names = LoraLinear.other_param_names + (
        "hydra_heads", "hydra_top_k", "hydra_balance", GATES, "hydra_last_aux", "hydra_gate_sums",
    )

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: Any, **kwargs: Any) -> None:
        if not hasattr(config, "hydra_heads"):
            raise AdapterError(
                f"adapter {adapter_name!r} uses a plain LoraConfig on a HydraLoRA layer; build it with "
                "hydralora_config(...) (a layer holds HydraLoRA adapters only)"
            )
        if not hasattr(self, "lora_hydra_B"):
            self._init_hydra_state()
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

    def _init_hydra_state(self) -> None:
        self.lora_hydra_B = nn.ModuleDict({})
        self.lora_hydra_router = nn.ModuleDict({})
        self.lora_hydra_gates = GateBuffers()
        self.hydra_heads: dict[str, int] = {}
        self.hydra_top_k: dict[str, Optional[int]] = {}
        self.hydra_balance: dict[str, bool] = {}
        self.hydra_last_aux: dict[str, torch.Tensor] = {}
        self.hydra_gate_sums: dict[str, list] = {}  # filled only inside record_routing(...)
        self.hydra_recording = False

    @property
    def hydra_frozen_gates(self) -> GateBuffers:
        """Adapter name → its N frozen gates (adapters routing live are absent)."""
        return self.lora_hydra_gates

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """Restore frozen gates saved with the adapter (a buffer exists only while routing is frozen, so a fresh
        layer has none to load into).

        A key ``<prefix>lora_hydra_gates.<adapter>`` (PEFT versions that insert the adapter name into every
        checkpoint key, or a full model state dict) gets a buffer for the child to load into. A bare
        ``<prefix>lora_hydra_gates`` (PEFT versions that map checkpoint keys onto the model's existing keys,
        which cannot name a buffer that does not exist yet) belongs to the adapter PEFT is loading, the one it
        added last, and is passed on under that adapter's name."""
        head = f"{prefix}{GATES}"
        for key, value in list(state_dict.items()):
            if key == head and self.lora_hydra_B:
                key = f"{head}.{list(self.lora_hydra_B)[-1]}"
                state_dict[key] = value
            if key.startswith(head + "."):
                adapter = key[len(head) + 1:]
                if adapter in self.lora_hydra_B and adapter not in self.lora_hydra_gates:
                    router = self.lora_hydra_router[adapter].weight
                    self.lora_hydra_gates[adapter] = torch.zeros(value.shape, dtype=value.dtype, device=router.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

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
        frozen = self.lora_hydra_gates.get(adapter)
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
            probs, g = router_gates(logits, self.hydra_top_k[adapter])
        if record:
            self._record(adapter, probs, g)
        return outer_bottleneck(g, a)

    def _record(self, adapter: str, probs: Optional[torch.Tensor], g: torch.Tensor) -> None:
        """Store the load-balancing loss (from the full softmax ``probs``; None with frozen gates) and, inside
        :func:`~adapters.hydralora.routing.record_routing`, accumulate the gates ``g``."""
        if probs is not None and self.hydra_balance[adapter]:
            self.hydra_last_aux[adapter] = balance_loss(probs)
        else:
            self.hydra_last_aux.pop(adapter, None)
        if self.hydra_recording:
            n = g.shape[-1]
            flat = g.detach().reshape(-1, n).double()
            acc = self.hydra_gate_sums.setdefault(adapter, [torch.zeros(n, dtype=torch.float64), 0])
            acc[0] = acc[0] + flat.sum(dim=0).cpu()
            acc[1] += flat.shape[0]

    def _lean_route(self, x: torch.Tensor) -> Optional[tuple[str, bool, bool]]:
        """(the one active adapter, whether only the update node can serve, whether dropout is active) when a
        one-node path serves this call, else None (a block being compiled, several or no active adapters,
        top-k, frozen gates, mismatched dtypes, autocast without the C++ nodes, and active dropout or a base
        layer other than a frozen plain ``nn.Linear`` without hooks without them)."""
        if not self.use_lean_path or self.merged or self.disable_adapters or compiling():
            return None  # under torch.compile the module path's plain torch ops, which Inductor fuses
        adapter = self.active_adapter
        if not isinstance(adapter, str):
            if len(adapter) != 1:
                return None
            adapter = adapter[0]
        if adapter not in self.lora_hydra_B or adapter in self.lora_hydra_gates:
            return None
        top_k = self.hydra_top_k[adapter]
        if top_k is not None and top_k < self.hydra_heads[adapter]:
            return None
        A = self.lora_A[adapter].weight
        if not (A.dtype == self.lora_hydra_router[adapter].weight.dtype == self.lora_hydra_B[adapter].weight.dtype):
            return None
        dropout = self.lora_dropout[adapter]
        dropping = dropout.training and type(dropout) is not nn.Identity
        update = dropping or not frozen_plain_linear(self.base_layer, x)
        # autocast and the update node need the C++ nodes; the whole-layer node has a Python twin
        if (update or torch.is_autocast_enabled(x.device.type)) and not native_serves(x):
            return None
        return adapter, update, dropping

    def _lean_forward(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The whole layer through one node, or None where that path does not serve the call."""
        route = self._lean_route(x)
        if route is None:
            return None
        adapter, update, dropping = route
        base = self.base_layer
        A, R, B = (self.lora_A[adapter].weight, self.lora_hydra_router[adapter].weight,
                   self.lora_hydra_B[adapter].weight)
        s, r = self.scaling[adapter], self.r[adapter]
        if not update:  # the base product inside the node
            y, probs = hydra_linear(x, base.weight, base.bias, A, R, B, s, r)
        else:  # W x from the base module (hooked, trainable, 4-bit), the update onto it in one node
            result = base(x)
            xa = x if torch.is_autocast_enabled(x.device.type) else self._cast_input_dtype(x, A.dtype)
            if dropping:  # A reads dropout(x), the router the clean x
                y, probs = hydra_update(self.lora_dropout[adapter](xa), result, A, R, B, s, r, router_x=xa)
            else:
                y, probs = hydra_update(xa, result, A, R, B, s, r)
        self._record(adapter, probs, probs)
        return y

    def _hydra_delta(self, x: torch.Tensor, adapter: str, record: bool = True) -> torch.Tensor:
        """(α/r) · Σ_i g_i(x) B_i A x."""
        return self.lora_hydra_B[adapter](self._bottleneck(x, adapter, record)) * self.scaling[adapter]

    # ---- PEFT entry points
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """W x + Σ over the active adapters of (α/r)·Σ_i g_i(x) B_i A x (several active adapters add up)."""
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

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str],
                             **kwargs: Any) -> torch.Tensor:
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
        gates = self.lora_hydra_gates.get(adapter)
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
        delta = frozen_delta_weight(A, B, gates, self.scaling[adapter])
        if self.fan_in_fan_out:
            delta = delta.T
        return delta.to(dtype) if upcast else delta

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add ΔW of frozen-routing adapters to W; refuses (weights unchanged) if any named adapter routes live."""
        names = check_adapters_to_merge(self, adapter_names)
        if is_4bit_linear(self.get_base_layer()) and any(a in self.lora_hydra_B for a in names):
            raise AdapterError(
                "cannot merge HydraLoRA into a 4-bit base: its NF4 codes would round ΔW away; load the base "
                "without --quantize (in bfloat16 or float32) and merge the saved adapter there")
        live = [a for a in names if a in self.lora_hydra_B and a not in self.lora_hydra_gates]
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
        """Subtract the merged adapters' ΔW again; with nothing merged only warn, as PEFT LoRA does."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
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
