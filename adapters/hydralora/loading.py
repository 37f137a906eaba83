"""HydraLoRA's loading step: a saved folder onto a base model with the HydraLoRA layer registered."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import torch.nn as nn

from geoprobe.errors import AdapterError
from geoprobe.records import read_json
from .config import HydraLoraConfig, config_from_saved

__all__ = ["hydralora_from_pretrained"]


def hydralora_from_pretrained(model: nn.Module, path: Union[str, os.PathLike], adapter_name: str = "default",
                              is_trainable: bool = False, *, config: Optional[HydraLoraConfig] = None) -> Any:
    """Load a HydraLoRA adapter saved with ``save_pretrained`` onto the base ``model``: the config
    (``config``, or rebuilt from ``adapter_config.json`` by :func:`config_from_saved`, which refuses a folder
    without the ``hydra_*`` fields) registers the custom layer, and ``PeftModel.from_pretrained`` restores the
    weights, frozen gates included."""
    from peft import PeftModel

    if config is None:
        cfg_file = Path(path) / "adapter_config.json"
        raw = read_json(cfg_file, "adapter config", error=AdapterError,
                        missing=f"{cfg_file} does not exist; point to a folder written by save_pretrained")
        config = config_from_saved(raw, str(path))
    return PeftModel.from_pretrained(model, str(path), adapter_name=adapter_name, config=config,
                                     is_trainable=is_trainable)
