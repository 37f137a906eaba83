"""Which base layers an adapter node may compute itself.

A layer node that forms W x (+ b) inside its own autograd function (HydraLoRA's and HypLoRA's one-node
paths) must see exactly what ``base_layer(x)`` would compute and must not need W's gradient: a plain
``nn.Linear`` with no hooks that the call would skip (proved by
:func:`adapters.kernels._internals.unhooked_plain_linear`), frozen weight and bias, x in the weight's
dtype.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ._internals import unhooked_plain_linear

__all__ = ["frozen_plain_linear"]


def frozen_plain_linear(base: nn.Module, x: torch.Tensor) -> bool:
    """True when ``base(x)`` is plain ``F.linear(x, W, b)`` with W and b frozen and x of W's dtype."""
    if not unhooked_plain_linear(base):
        return False
    weight, bias = base.weight, base.bias
    return not (weight.requires_grad or x.dtype != weight.dtype or (bias is not None and bias.requires_grad))
