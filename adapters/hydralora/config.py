"""HydraLoRA's PEFT config: ``LoraConfig`` plus the number of heads, top-k and load balancing.

PEFT hands the config to every layer it builds (``update_layer(..., config=...)``), so the layer reads the
settings from there, per adapter, with no global state, and ``save_pretrained`` writes them to
``adapter_config.json``. The custom-module mapping (``nn.Linear`` → :class:`HydraLoraLinear`) is registered
on every instance but not saved, so a folder is loaded through :func:`config_from_saved` (or
:func:`adapters.hydralora.hydralora_from_pretrained`).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

import torch.nn as nn
from peft import LoraConfig

from geoprobe.errors import AdapterError
from .layer import HydraLoraLinear
from ..refusals import refuse_weighted_combination

log = logging.getLogger(__name__)

__all__ = ["HydraLoraConfig", "hydralora_config", "config_from_saved"]

_ALLOWED_INIT = (True, False, "gaussian")


@dataclass
class HydraLoraConfig(LoraConfig):
    """``LoraConfig`` plus the HydraLoRA settings each :class:`HydraLoraLinear` reads.

    Attributes:
        hydra_heads: number N of B heads per layer.
        hydra_top_k: keep the k largest gates per token (renormalised; top-1 a straight-through one-hot, see
            :func:`adapters.hydralora.functional.router_gates`); None = dense softmax.
        hydra_balance: record the Switch load-balancing loss in every forward pass.
    """

    hydra_heads: int = field(default=4, metadata={"help": "number of routed B heads (HydraLoRA N)"})
    hydra_top_k: Optional[int] = field(default=None, metadata={"help": "top-k gates per token, None = all"})
    hydra_balance: bool = field(default=False, metadata={"help": "record the load-balancing loss"})

    def __post_init__(self) -> None:
        refuse_weighted_combination("HydraLoRA", "each routes every token through its own router, so no "
                                    "weighted mix of their matrices reproduces them")
        super().__post_init__()
        _check_settings(self)
        self._register_custom_module({nn.Linear: HydraLoraLinear})


def _check_settings(cfg: HydraLoraConfig) -> None:
    """Refuse settings HydraLoRA cannot honour, each with what to do instead."""
    if isinstance(cfg.hydra_heads, bool) or not isinstance(cfg.hydra_heads, int) or cfg.hydra_heads < 1:
        raise AdapterError(f"hydra_heads = {cfg.hydra_heads!r}; give a positive integer number of heads")
    if cfg.hydra_top_k is not None and (
        isinstance(cfg.hydra_top_k, bool) or not isinstance(cfg.hydra_top_k, int)
        or not 1 <= cfg.hydra_top_k <= cfg.hydra_heads
    ):
        raise AdapterError(
            f"hydra_top_k = {cfg.hydra_top_k!r} must be an integer in 1 … {cfg.hydra_heads} (n_heads) or None"
        )
    if cfg.use_dora or cfg.lora_bias:
        raise AdapterError("HydraLoRA supports neither use_dora nor lora_bias; switch them off")
    if cfg.init_lora_weights not in _ALLOWED_INIT:
        raise AdapterError(
            f"init_lora_weights = {cfg.init_lora_weights!r} is not supported by HydraLoRA; use "
            "True (Kaiming A, zero B heads), 'gaussian' or False"
        )


def hydralora_config(
    r: int,
    alpha: float,
    n_heads: int,
    target_modules: Union[Sequence[str], str],
    top_k: Optional[int] = None,
    balance: bool = False,
    **kw: Any,
) -> HydraLoraConfig:
    """A :class:`HydraLoraConfig` with :class:`HydraLoraLinear` registered for ``nn.Linear``.

    ``kw`` goes to ``LoraConfig`` (``lora_dropout``, ``task_type``, ``rank_pattern``, …). The paper's
    setting: FFN targets (gate_proj, up_proj, down_proj), r = 4–8, alpha = 32, N = 4.
    """
    targets = list(target_modules) if not isinstance(target_modules, str) else target_modules
    return HydraLoraConfig(r=r, lora_alpha=alpha, target_modules=targets, hydra_heads=n_heads,
                           hydra_top_k=top_k, hydra_balance=balance, **kw)


def config_from_saved(raw: Mapping[str, Any], where: str) -> HydraLoraConfig:
    """The :class:`HydraLoraConfig` of a saved ``adapter_config.json`` (``raw``, read from ``where``).

    Keys unknown to this PEFT version are dropped with one warning (a newer PEFT may have written them).

    Raises:
        AdapterError: the folder holds no HydraLoRA settings (plain LoRA would be built from it), or the
            settings do not fit HydraLoRA.
    """
    if "hydra_heads" not in raw:
        raise AdapterError(
            f"{where} holds no HydraLoRA settings (hydra_heads missing in adapter_config.json); it is not a "
            "HydraLoRA adapter — load it with stock PEFT instead"
        )
    known = {f.name for f in fields(HydraLoraConfig) if f.init}
    dropped = sorted(set(raw) - known)
    if dropped:
        log.warning("ignoring adapter_config.json keys unknown to this PEFT version: %s", dropped)
    try:
        return HydraLoraConfig(**{k: v for k, v in raw.items() if k in known})
    except (TypeError, ValueError) as exc:
        raise AdapterError(f"{where}/adapter_config.json does not fit HydraLoRA: {exc}") from None
