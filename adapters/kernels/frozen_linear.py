"""Which base layers an adapter node may compute itself.

A layer node that forms W x (+ b) inside its own autograd function (HydraLoRA's and HypLoRA's one-node
paths) must see exactly what ``base_layer(x)`` would compute and must not need W's gradient: a plain
``nn.Linear`` with no hooks that the call would skip (proved by
:func:`adapters.kernels._internals.unhooked_plain_linear`), frozen weight and bias, x in the weight's
dtype.

A 4-bit base (bitsandbytes ``Linear4bit``, QLoRA) is never such a layer: its weight holds NF4 codes, and
``base_layer(x) = x · dequantize_4bit(W)ᵀ (+ b)`` in its compute dtype. The layers then keep the base
product outside their node: ``base_layer(x)`` is computed by the bitsandbytes module and the adapter's
update is added to it (the path every layer takes where :func:`frozen_plain_linear` is False), as PEFT's
own ``lora.bnb.Linear4bit`` does for LoRA and DoRA.
"""
from __future__ import annotations

import sys

import torch
import torch.nn as nn

from ._internals import unhooked_plain_linear

__all__ = ["frozen_plain_linear", "is_4bit_linear"]


def is_4bit_linear(module: nn.Module) -> bool:
    """True when ``module`` is a bitsandbytes ``Linear4bit`` (a QLoRA base). Checked without importing
    bitsandbytes: a module of that class exists only once the package has been imported."""
    bnb = sys.modules.get("bitsandbytes")
    cls = getattr(getattr(bnb, "nn", None), "Linear4bit", None)
    return cls is not None and isinstance(module, cls)


def frozen_plain_linear(base: nn.Module, x: torch.Tensor) -> bool:
    """True when ``base(x)`` is plain ``F.linear(x, W, b)`` with W and b frozen and x of W's dtype (never
    for a 4-bit base, :func:`is_4bit_linear`)."""
    if is_4bit_linear(base) or not unhooked_plain_linear(base):
        return False
    weight, bias = base.weight, base.bias
    return not (weight.requires_grad or x.dtype != weight.dtype or (bias is not None and bias.requires_grad))
