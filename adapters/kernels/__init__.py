"""Fused GPU kernels behind the adapter layers (each module falls back to the reference path when its
kernels do not apply)."""
from .hyplora_fused import fused_available, hyplora_bottleneck_fused, set_fused_enabled

__all__ = ["fused_available", "hyplora_bottleneck_fused", "set_fused_enabled"]
