"""GeLoRA's PEFT config: a stock ``LoraConfig`` whose ``rank_pattern`` gives each block its own rank.

PEFT matches pattern keys as regexes against the end of a module name (``re.match(r"(.*\\.)?(KEY)$", name)``,
first match wins); every key here is the full module name with its dots escaped, so
``model.layers.1.mlp.up_proj`` never matches ``model.layers.11.mlp.up_proj`` nor any other name.
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Union

from geoprobe.errors import AdapterError, PlanError
from .layers import Ranks, rank_map, target_layers

log = logging.getLogger(__name__)

__all__ = ["gelora_config"]

_SET_HERE = {"r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules", "exclude_modules"}


def _alpha(alpha_over_r: float, rank: int) -> Union[int, float]:
    """α = alpha_over_r · rank, as an int when whole (as PEFT writes it)."""
    a = alpha_over_r * rank
    return int(a) if float(a).is_integer() else float(a)


def _patterns(layers: Mapping[int, list[tuple[str, int, int]]], ranks: Mapping[int, int],
              alpha_over_r: float) -> tuple[dict[str, int], dict[str, Union[int, float]], list[str]]:
    """``rank_pattern`` and ``alpha_pattern`` keyed by escaped full module names, and the modules of rank-0
    blocks (left out)."""
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, Union[int, float]] = {}
    excluded: list[str] = []
    for j, mods in layers.items():
        for name, _, _ in mods:
            if ranks[j] == 0:
                excluded.append(name)
            else:
                key = re.escape(name)
                rank_pattern[key] = ranks[j]
                alpha_pattern[key] = _alpha(alpha_over_r, ranks[j])
    return rank_pattern, alpha_pattern, excluded


def gelora_config(
    model: Any,
    layer_ranks: Ranks,
    *,
    target_modules: Sequence[str],
    alpha_over_r: float = 2.0,
    **lora_kwargs: Any,
):
    """A stock PEFT ``LoraConfig`` giving block j's targeted modules rank ``layer_ranks[j]``.

    ``rank_pattern``/``alpha_pattern`` hold one entry per adapted module, keyed by the escaped full
    module name (``re.escape("model.layers.3.mlp.up_proj")``); α_j = alpha_over_r · r_j keeps the
    LoRA scaling α/r equal in every layer. Blocks of rank 0 are listed by full name in
    ``exclude_modules`` (PEFT rejects rank 0 in ``rank_pattern``). ``lora_kwargs`` go to
    ``LoraConfig`` unchanged (dropout, task_type, …) and may not set r, lora_alpha, rank_pattern,
    alpha_pattern, target_modules or exclude_modules.

    Raises:
        AdapterError: unknown targets, ranks that do not fit the model's blocks, conflicting kwargs.
        PlanError: every block has rank 0 (nothing would be adapted).
    """
    from peft import LoraConfig

    clash = sorted(set(lora_kwargs) & _SET_HERE)
    if clash:
        raise AdapterError(f"gelora_config sets {clash} itself from layer_ranks; do not pass them")
    if not (alpha_over_r > 0 and math.isfinite(alpha_over_r)):
        raise AdapterError(f"alpha_over_r = {alpha_over_r} must be a positive number")
    layers = target_layers(model, target_modules)
    ranks = rank_map(layers, layer_ranks)
    if not any(ranks[j] > 0 for j in layers):
        raise PlanError("every block has rank 0, so no module would be adapted; lower the rule's "
                        "threshold (e.g. rule='budget' or floor=1)")
    rank_pattern, alpha_pattern, excluded = _patterns(layers, ranks, alpha_over_r)
    base_r = max(rank_pattern.values())
    cfg = LoraConfig(
        r=base_r,
        lora_alpha=_alpha(alpha_over_r, base_r),
        target_modules=list(target_modules),
        exclude_modules=excluded or None,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        **lora_kwargs,
    )
    log.info("GeLoRA config: %d modules adapted, %d left out, ranks by block %s",
             len(rank_pattern), len(excluded), [ranks[j] for j in layers])
    return cfg
