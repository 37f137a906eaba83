"""HydraLoRA: one shared LoRA ``A`` and N routed ``B`` heads per adapted linear layer.

HydraLoRA (Tian et al., "HydraLoRA: An Asymmetric LoRA Architecture for Efficient Fine-Tuning",
NeurIPS 2024, arXiv 2404.19245)::

    h = W x + (α/r) · Σ_i g_i(x) · B_i A x,      g(x) = softmax(W_router x)   (per token, N heads)

The package, one idea per module:

* :mod:`.config`: :class:`HydraLoraConfig` (PEFT's ``LoraConfig`` plus heads, top-k, balance),
  :func:`hydralora_config`, :func:`config_from_saved`;
* :mod:`.functional`: the pure math (gates and top-k, the load-balancing loss, the merged delta,
  :func:`hydralora_delta_reference`);
* :mod:`.layer`: :class:`HydraLoraLinear`, the PEFT layer;
* :mod:`.kernels`: the whole layer as one autograd node (Python, or the C++ node of
  :mod:`adapters.kernels.native`);
* :mod:`.routing`: model-level helpers (:func:`hydra_layers`, :func:`hydra_aux_loss`,
  :func:`record_routing`, :func:`freeze_routing`, :func:`unfreeze_routing`);
* :mod:`.loading`: :func:`hydralora_from_pretrained`;

Stock PEFT loading of a HydraLoRA folder without ``config=`` builds plain LoRA (the custom-module mapping is
not saved), which is why :func:`hydralora_from_pretrained` exists and refuses folders without ``hydra_*``
fields.
"""
from .config import HydraLoraConfig, config_from_saved, hydralora_config
from .functional import hydralora_delta_reference
from .kernels import HydraLinearFn
from .layer import HydraLoraLinear
from .loading import hydralora_from_pretrained
from .routing import RoutingRecord, freeze_routing, hydra_aux_loss, hydra_layers, record_routing, unfreeze_routing

_HydraLinearFn = HydraLinearFn  # the name the one-node function had before the package split

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
    "config_from_saved",
]
