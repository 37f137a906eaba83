"""HypLoRA's PEFT config: ``LoraConfig`` plus HypLoRA's own fields, so that ``save_pretrained`` writes
them to ``adapter_config.json`` and :func:`adapters.io.config_from_saved` (what :func:`adapters.load` uses) reads
them back into a config that builds HypLoRA layers again.

Stock ``PeftModel.from_pretrained`` reads such a folder with PEFT's own ``LoraConfig``, which does
not know the ``hyplora_*`` fields: PEFT warns that it ignores them (naming them) and builds plain LoRA
layers. Load HypLoRA folders with :func:`adapters.load`, or pass
``config=adapters.io.config_from_saved(adapters.io.saved_method(raw), raw)``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import torch.nn as nn
from peft import LoraConfig

from geoprobe.errors import AdapterError

from ..refusals import refuse_weighted_combination
from .layer import HypLoraLinear, UnsupportedTarget
from .options import HypLoraOptions, check_lora_settings, options_of

__all__ = ["HypLoraConfig", "hyplora_config", "register_hyplora", "hyplora_options"]


@dataclass
class HypLoraConfig(LoraConfig):
    """``LoraConfig`` whose targeted ``nn.Linear`` layers become :class:`HypLoraLinear`.

    Attributes:
        hyplora_curvature: initial K (> 1e-6) of every adapted layer.
        hyplora_curvature_pattern: {regex: K} overriding it per module (``rank_pattern``'s rule).
        hyplora_official: use the reference code's formula (:mod:`adapters.hyplora.functional`).

    Targets that are not ``nn.Linear`` are refused (PEFT would otherwise silently build plain LoRA
    layers for them), and so are LoRA settings HypLoRA cannot honour (DoRA, a LoRA bias, …).
    """

    hyplora_curvature: float = field(default=1.0, metadata={"help": "initial curvature K of every layer"})
    hyplora_curvature_pattern: dict[str, float] = field(
        default_factory=dict, metadata={"help": "per-module initial K: {regex: K}, first match wins"})
    hyplora_official: bool = field(default=False, metadata={"help": "the reference code's formula"})

    def __post_init__(self) -> None:
        refuse_weighted_combination("HypLoRA", "its update is nonlinear in x and each adapter has its own "
                                    "curvature and scale, so no weighted mix of their matrices reproduces them")
        super().__post_init__()
        check_lora_settings(self)
        options_of(self)  # HypLoraOptions refuses a bad curvature or pattern
        self._register_custom_module({nn.Linear: HypLoraLinear, nn.Module: UnsupportedTarget})

    @property
    def options(self) -> HypLoraOptions:
        """The HypLoRA settings as a frozen record."""
        return HypLoraOptions(curvature=float(self.hyplora_curvature),
                              curvature_pattern=dict(self.hyplora_curvature_pattern or {}),
                              official=bool(self.hyplora_official))


def _lora_fields(config: LoraConfig) -> dict[str, Any]:
    """The init fields of a LoRA config (HypLoRA's own left out)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(LoraConfig) if f.init}


def register_hyplora(config: LoraConfig, *, curvature: float = 1.0,
                     curvature_pattern: Optional[Mapping[str, float]] = None,
                     official: bool = False) -> HypLoraConfig:
    """A :class:`HypLoraConfig` with the LoRA settings of ``config`` and the given HypLoRA options.

    Use it on a config read back with ``LoraConfig.from_pretrained`` before
    ``PeftModel.from_pretrained(model, path, config=...)``, or on a config made by another helper
    (GeLoRA's ranks). ``config`` itself is left unchanged.
    """
    if not isinstance(config, LoraConfig):
        raise AdapterError(f"register_hyplora needs a peft.LoraConfig, got {type(config).__name__}")
    check_lora_settings(config)
    try:
        return HypLoraConfig(**_lora_fields(config), hyplora_curvature=float(curvature),
                             hyplora_curvature_pattern=dict(curvature_pattern or {}),
                             hyplora_official=bool(official))
    except (TypeError, ValueError) as exc:
        raise AdapterError(f"invalid HypLoRA options: {exc}") from None


def hyplora_config(r: int, alpha: float, target_modules: Union[str, Sequence[str]], curvature: float = 1.0,
                   *, curvature_pattern: Optional[Mapping[str, float]] = None, official: bool = False,
                   **lora_kwargs: Any) -> HypLoraConfig:
    """A :class:`HypLoraConfig` for rank ``r``, scale numerator ``alpha`` and ``target_modules``.

    ``curvature`` is the initial K of every layer (``curvature_pattern`` overrides per module);
    ``lora_kwargs`` go to ``LoraConfig`` (lora_dropout, rank_pattern, alpha_pattern, use_rslora, …).
    The paper's settings: r = 32, alpha = 128, lora_dropout = 0.05, targets q,k,v,up,down.
    """
    if not isinstance(r, int) or r <= 0:
        raise AdapterError(f"HypLoRA rank r must be a positive integer, got {r!r}")
    try:
        config = LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules, **lora_kwargs)
    except (TypeError, ValueError) as exc:
        raise AdapterError(f"invalid LoraConfig options for HypLoRA: {exc}") from None
    return register_hyplora(config, curvature=curvature, curvature_pattern=curvature_pattern, official=official)


def hyplora_options(config: Any) -> Optional[HypLoraOptions]:
    """The HypLoRA options of ``config``, or None for a config that does not build HypLoRA layers."""
    return options_of(config) if isinstance(config, HypLoraConfig) else None

