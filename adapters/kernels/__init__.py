"""Shared pieces of the adapter layers' fast paths: the one guarded home of private torch and Triton
entry points (``_internals``), the check for base layers a node may compute itself (``frozen_linear``)
and the layers' C++ autograd nodes with CUDA and CPU kernels (``native``, built on first use).

Importing this package loads neither Triton nor the native extension (HydraLoRA and CPU users import
it). HypLoRA's Triton kernels live with the method, in :mod:`adapters.hyplora.kernels`.
"""
