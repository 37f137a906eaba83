"""Which base layers an adapter node may compute itself.

A layer node that forms W x (+ b) inside its own autograd function (HydraLoRA's and HypLoRA's one-node
paths) must see exactly what ``base_layer(x)`` would compute and must not need W's gradient: a plain
``nn.Linear`` (not a subclass, no instance ``forward``), frozen weight and bias, x in the weight's dtype,
and no module or global hooks that the call would skip.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.modules import module as _nn_module

__all__ = ["frozen_plain_linear"]


def frozen_plain_linear(base: nn.Module, x: torch.Tensor) -> bool:
    """True when ``base(x)`` is plain ``F.linear(x, W, b)`` with W and b frozen and x of W's dtype."""
    if (type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks or base._backward_hooks
            or base._backward_pre_hooks or "forward" in base.__dict__ or _nn_module._global_forward_hooks
            or _nn_module._global_forward_pre_hooks or _nn_module._global_backward_hooks
            or _nn_module._global_backward_pre_hooks):
        return False
    weight, bias = base.weight, base.bias
    return not (weight.requires_grad or x.dtype != weight.dtype or (bias is not None and bias.requires_grad))
