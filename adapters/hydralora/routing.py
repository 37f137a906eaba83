"""Model-level HydraLoRA helpers: find the layers, sum their load-balancing losses, record their mean gates,
freeze routing to constant gates (so the adapter merges) and unfreeze it."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from geoprobe.errors import AdapterError
from .layer import HydraLoraLinear

__all__ = ["hydra_layers", "hydra_aux_loss", "RoutingRecord", "record_routing", "freeze_routing",
           "unfreeze_routing"]

Layers = list[tuple[str, HydraLoraLinear]]


def hydra_layers(model: nn.Module) -> Layers:
    """All HydraLoRA layers of ``model`` with their module names."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, HydraLoraLinear)]


def _require_layers(model: nn.Module) -> Layers:
    layers = hydra_layers(model)
    if not layers:
        raise AdapterError("the model holds no HydraLoRA layer; build it with "
                           "get_peft_model(model, hydralora_config(...))")
    return layers


def hydra_aux_loss(model: nn.Module) -> torch.Tensor:
    """Σ over HydraLoRA layers (and their active adapters with ``balance=True``) of the load-balancing
    loss recorded in the latest forward pass; differentiable with respect to the routers.

    Raises:
        AdapterError: no layer has balancing switched on, or no forward pass has recorded one yet.
    """
    total: Optional[torch.Tensor] = None
    for name, layer in _require_layers(model):
        for adapter in layer.active_adapters:
            if not layer.hydra_balance.get(adapter, False) or adapter in layer.hydra_frozen_gates:
                continue
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

    def __init__(self, layers: Layers, adapter_name: Optional[str]) -> None:
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
    """``weights`` as N float32 gates, refused unless non-negative and summing to 1 (within 1e-3)."""
    g = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
    if g.numel() != n:
        raise AdapterError(f"{where}: {g.numel()} routing weights for {n} heads; give one weight per head")
    if not torch.isfinite(g).all() or (g < 0).any() or abs(float(g.sum()) - 1.0) > 1e-3:
        raise AdapterError(f"{where}: routing weights {g.tolist()} must be non-negative and sum to 1, "
                           "like the router's softmax")
    return g.float()


def _layers_with(model: nn.Module, adapter_name: Optional[str]) -> list[tuple[str, HydraLoraLinear, list[str]]]:
    """The HydraLoRA layers holding ``adapter_name`` (every adapter of each layer when None) with the adapters
    to act on; refuses when no layer holds it."""
    picked = []
    for name, layer in _require_layers(model):
        adapters = list(layer.lora_hydra_B) if adapter_name is None else (
            [adapter_name] if adapter_name in layer.lora_hydra_B else [])
        if adapters:
            picked.append((name, layer, adapters))
    if not picked:
        raise AdapterError(f"no HydraLoRA layer holds an adapter {adapter_name!r}; name one of the model's adapters")
    return picked


def _per_layer_weights(weights: Any, names: Sequence[str]) -> dict[str, Any]:
    """Layer name → its gate weights: one vector for every layer, or a mapping by full name or dotted suffix
    naming each of ``names`` exactly once and nothing else."""
    if not isinstance(weights, Mapping):
        return {name: weights for name in names}
    used: set[str] = set()
    per_layer = {}
    for name in names:
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
    return per_layer


def freeze_routing(
    model: nn.Module,
    weights: Union[Sequence[float], torch.Tensor, Mapping[str, Any]],
    adapter_name: Optional[str] = None,
) -> None:
    """Replace the router by constant gates so the adapter can be merged.

    ``weights``: one vector of N gates for every layer, or a mapping from module name (full name or a
    dotted suffix of it) to that layer's gates, covering every HydraLoRA layer that holds the adapter. Gates
    must be non-negative and sum to 1 (within 1e-3; they are used as given). ``adapter_name`` defaults to
    every adapter of each layer; when given, the layers that hold it are frozen (an adapter may target fewer
    layers than another). The gates are adapter state: ``save_pretrained`` writes them and loading restores
    frozen routing.

    Raises:
        AdapterError: no layer holds ``adapter_name``, gates of the wrong length or not a distribution, a
            mapping that misses or over-names layers, or the adapter is merged.
    """
    picked = _layers_with(model, adapter_name)
    per_layer = _per_layer_weights(weights, [name for name, _, _ in picked])
    frozen = []
    for name, layer, adapters in picked:
        for adapter in adapters:
            if adapter in layer.merged_adapters:
                raise AdapterError(f"adapter {adapter!r} is merged in {name}; unmerge before changing its routing")
            gates = _gate_vector(per_layer[name], layer.hydra_heads[adapter], name)
            frozen.append((layer, adapter, gates.to(layer.lora_hydra_router[adapter].weight.device)))
    for layer, adapter, gates in frozen:  # every check passed: change the layers together
        layer.hydra_frozen_gates[adapter] = gates
        layer.hydra_last_aux.pop(adapter, None)


def unfreeze_routing(model: nn.Module, adapter_name: Optional[str] = None) -> None:
    """Return to per-token routing; refuses while the adapter is merged."""
    for name, layer in _require_layers(model):
        adapters = [adapter_name] if adapter_name else list(layer.hydra_frozen_gates)
        for adapter in adapters:
            if adapter in layer.merged_adapters:
                raise AdapterError(f"adapter {adapter!r} is merged in {name}; unmerge it before unfreezing routing")
            layer.hydra_frozen_gates.pop(adapter, None)
