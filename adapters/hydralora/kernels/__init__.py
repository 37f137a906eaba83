"""HydraLoRA's one-node path: the whole layer as one autograd function (:mod:`.linear`), run as the C++ node
of :mod:`adapters.kernels.native` where that is built and as a Python ``torch.autograd.Function`` otherwise.
Kernels never import the layer."""
from .linear import HydraLinearFn, hydra_linear, hydra_update, native_serves

__all__ = ["HydraLinearFn", "hydra_linear", "hydra_update", "native_serves"]
