"""HypLoRA's fast paths: Triton kernels with Python autograd nodes and the entry points to the C++ nodes
of :mod:`adapters.kernels.native` (:mod:`.fused`). Each falls back to the next slower path, down to the
reference path of :mod:`adapters.hyplora.functional`. Kernels import the functional math, never the layer.
"""
from .fused import (MAX_RANK, autocast_off, fused_available, fused_unsupported_reason, hyplora_bottleneck_fused,
                    hyplora_layer_native, hyplora_linear_fused, linear_fast_path, set_fused_enabled)

__all__ = ["MAX_RANK", "autocast_off", "fused_available", "fused_unsupported_reason", "hyplora_bottleneck_fused",
           "hyplora_layer_native", "hyplora_linear_fused", "linear_fast_path", "set_fused_enabled"]
