"""What a HypLoRA adapter needs beyond PEFT's LoRA settings, and which LoRA settings it cannot honour.

Read by both the config (:mod:`adapters.hyplora.config`, which carries the options as fields so that
PEFT saves them) and the layer (:mod:`adapters.hyplora.layer`, which reads them off the config it is
given); it imports neither.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from peft.utils.other import get_pattern_key

from geoprobe.errors import AdapterError
from geoprobe.records import Record

from .functional import POSITIVE_FLOOR

__all__ = ["HypLoraOptions", "options_of", "check_lora_settings"]


@dataclass(frozen=True)
class HypLoraOptions(Record):
    """HypLoRA's own settings.

    curvature: initial K (> 1e-6) for every adapted layer; curvature_pattern: {regex: K} matched against
    the end of the module name like ``LoraConfig.rank_pattern`` (first match wins); official: use the
    reference code's formula (see :mod:`adapters.hyplora.functional`).
    """

    curvature: float = 1.0
    curvature_pattern: dict[str, float] = field(default_factory=dict)
    official: bool = False

    def __post_init__(self) -> None:
        for where, value in [("curvature", self.curvature), *(
                (f"curvature_pattern[{k!r}]", v) for k, v in self.curvature_pattern.items())]:
            try:
                ok = math.isfinite(float(value)) and float(value) > POSITIVE_FLOOR
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise AdapterError(f"HypLoRA {where} must be a number > {POSITIVE_FLOOR}, got {value!r}")
        for key in self.curvature_pattern:
            try:
                re.compile(key)
            except re.error as exc:
                raise AdapterError(f"HypLoRA curvature_pattern key {key!r} is not a valid regex: {exc}") from None

    def curvature_for(self, module_name: str) -> float:
        """Initial K of the module called ``module_name`` (pattern first, then the default)."""
        if self.curvature_pattern:
            key = get_pattern_key(list(self.curvature_pattern), module_name)
            if key in self.curvature_pattern:
                return float(self.curvature_pattern[key])
        return float(self.curvature)


def options_of(config: Any) -> Optional[HypLoraOptions]:
    """The HypLoRA options a config carries (its ``hyplora_*`` fields), or None for a config that is not
    HypLoRA's (a plain ``LoraConfig``)."""
    if getattr(config, "hyplora_curvature", None) is None:
        return None
    return HypLoraOptions(curvature=float(config.hyplora_curvature),
                          curvature_pattern=dict(config.hyplora_curvature_pattern or {}),
                          official=bool(config.hyplora_official))


_SUPPORTED_INITS = (True, False, "gaussian")
_UNSUPPORTED_OPTIONS = ("use_bdlora", "alora_invocation_tokens", "velora_config", "monteclora_config",
                        "kasa_config", "arrow_config", "loftq_config", "lora_ga_config")


def check_lora_settings(config: Any) -> None:
    """Refuse LoraConfig settings that HypLoRA cannot honour, instead of silently ignoring them."""
    problems = []
    if getattr(config, "use_dora", False):
        problems.append("use_dora=True (DoRA rescales W + BA, which HypLoRA does not form)")
    if getattr(config, "lora_bias", False):
        problems.append("lora_bias=True (a bias in B breaks Δ = B·(c·a))")
    init = getattr(config, "init_lora_weights", True)
    if not any(init is v or init == v for v in _SUPPORTED_INITS):
        problems.append(f"init_lora_weights={init!r} (only True, False and 'gaussian' leave W untouched "
                        "and are meaningful for a nonlinear update)")
    if getattr(config, "target_parameters", None):
        problems.append("target_parameters (HypLoRA adapts nn.Linear modules, not bare parameters)")
    for name in _UNSUPPORTED_OPTIONS:
        value = getattr(config, name, None)
        if value:
            problems.append(f"{name}={value!r}")
    if problems:
        raise AdapterError("HypLoRA cannot be combined with " + "; ".join(problems)
                           + ". Remove these options from the LoraConfig.")
