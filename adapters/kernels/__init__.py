"""Fused kernels behind the adapter layers: Triton kernels with Python autograd nodes (hyplora_fused), the
layers' C++ autograd nodes with CUDA and CPU kernels (native, built on first use), and the check for base
layers a node may compute itself (frozen_linear). Each falls back to the next slower path, down to the
reference path, where its kernels do not apply."""
from .hyplora_fused import fused_available, hyplora_bottleneck_fused, set_fused_enabled

__all__ = ["fused_available", "hyplora_bottleneck_fused", "set_fused_enabled"]
