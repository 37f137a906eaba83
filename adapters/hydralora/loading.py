"""HydraLoRA's loading entry point: :func:`adapters.io.load` asked for a HydraLoRA folder."""
from __future__ import annotations

import os
from typing import Any, Union

import torch.nn as nn

__all__ = ["hydralora_from_pretrained"]


def hydralora_from_pretrained(model: nn.Module, path: Union[str, os.PathLike], adapter_name: str = "default",
                              is_trainable: bool = False) -> Any:
    """Load a HydraLoRA adapter saved with ``save_pretrained`` or :func:`adapters.save` onto the base
    ``model``, frozen gates included. The one loader, :func:`adapters.io.load`, does the work; this asks it
    for HydraLoRA, so a folder of another method, or one whose ``adapter_config.json`` lacks the ``hydra_*``
    fields (plain LoRA would be built from it), is refused with an :class:`AdapterError`."""
    from adapters.io import load

    return load(model, path, adapter_name=adapter_name, is_trainable=is_trainable, expect="hydralora")
