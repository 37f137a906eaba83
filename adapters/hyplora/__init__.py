"""HypLoRA: low-rank adaptation routed through the Lorentz model (Yang et al., "HypLoRA: Hyperbolic
Fine-Tuning for Large Language Models", arXiv 2410.04010, NeurIPS 2025).

    h = W x + (α/r)·Δ(dropout(x)),   Δ = logmap0(B A expmap0(x/s))     (learnable K and s per layer)

One home per piece: :mod:`.functional` (the pure math, imported by the layer and the kernels),
:mod:`.options` (HypLoRA's settings and the LoRA settings it refuses), :mod:`.config`
(:class:`HypLoraConfig`, a ``LoraConfig`` carrying HypLoRA's fields so PEFT saves them),
:mod:`.layer` (:class:`HypLoraLinear`, the PEFT layer) and :mod:`.kernels` (the fused Triton path and
the entry points to the C++ nodes).
"""
from .config import HypLoraConfig, hyplora_config, hyplora_options, register_hyplora
from .functional import (POSITIVE_FLOOR, REFERENCE_DEFAULT_CURVATURE, hyplora_delta, hyplora_delta_bottleneck,
                         inverse_positive, positive)
from .layer import NOT_MERGEABLE, HypLoraLinear
from .options import HypLoraOptions

__all__ = [
    "POSITIVE_FLOOR",
    "REFERENCE_DEFAULT_CURVATURE",
    "NOT_MERGEABLE",
    "positive",
    "inverse_positive",
    "hyplora_delta",
    "hyplora_delta_bottleneck",
    "HypLoraOptions",
    "HypLoraConfig",
    "HypLoraLinear",
    "register_hyplora",
    "hyplora_config",
    "hyplora_options",
]
