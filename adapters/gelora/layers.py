"""The model side of GeLoRA: which linear layers of which numbered block a target list adapts, what one unit
of rank costs per block, and the parameter count of per-block ranks (Σ_blocks Σ_targets r_j (d_in + d_out))."""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

from geoprobe.errors import AdapterError

__all__ = ["target_layers", "params_per_rank", "lora_parameter_count", "rank_map"]

_BLOCK_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")

Ranks = Union[Mapping[int, int], Sequence[int]]


def _in_out(module: Any) -> Optional[tuple[int, int]]:
    import torch.nn as nn

    if isinstance(module, nn.Linear):
        return int(module.in_features), int(module.out_features)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # GPT-2 style, weight (in, out)
        w = module.weight
        return int(w.shape[0]), int(w.shape[1])
    return None


def _check_model_and_targets(model: Any, target_modules: Sequence[str]) -> None:
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        raise AdapterError("gelora_config needs the base model; pass model.get_base_model() of an "
                           "unadapted model, not a PeftModel")
    if isinstance(target_modules, str) or not target_modules:
        raise AdapterError("target_modules must be a non-empty list of module names, e.g. ['up_proj']")


def _block_of(name: str, module: Any, target: str) -> tuple[int, int, int]:
    """(block index, d_in, d_out) of a targeted module, refused unless a linear layer inside a numbered block."""
    dims = _in_out(module)
    if dims is None:
        raise AdapterError(
            f"module {name} ({type(module).__name__}) matches target {target!r} but is not a "
            "linear layer; GeLoRA targets Linear layers only"
        )
    m = _BLOCK_INDEX.search(name)
    if m is None:
        raise AdapterError(
            f"module {name} matches target {target!r} but belongs to no numbered block; "
            "target per-block layers only (e.g. 'up_proj', not 'lm_head')"
        )
    return int(m.group(1)), dims[0], dims[1]


def target_layers(model: Any, target_modules: Sequence[str]) -> dict[int, list[tuple[str, int, int]]]:
    """Map block index → [(full module name, d_in, d_out)] for the targeted linear layers.

    A module is targeted when its name equals a target or ends with ``"." + target`` (PEFT's rule for
    a list of names). The block index is the first all-digit component of the name
    (``model.layers.3.mlp.up_proj`` → 3).

    Raises:
        AdapterError: a PeftModel was passed, a target matches no linear layer, or a matched layer
            sits outside the numbered blocks.
    """
    _check_model_and_targets(model, target_modules)
    found: dict[int, list[tuple[str, int, int]]] = {}
    hits = {t: 0 for t in target_modules}
    for name, module in model.named_modules():
        matched = [t for t in target_modules if name == t or name.endswith("." + t)]
        if not matched:
            continue
        block, d_in, d_out = _block_of(name, module, matched[0])
        for t in matched:
            hits[t] += 1
        found.setdefault(block, []).append((name, d_in, d_out))
    missing = [t for t, k in hits.items() if k == 0]
    if missing:
        sample = sorted({n.rsplit(".", 1)[-1] for n, mod in model.named_modules() if _in_out(mod)})
        raise AdapterError(
            f"target module(s) {missing} match no linear layer of this model; "
            f"linear layer names here: {sample}"
        )
    return dict(sorted(found.items()))


def params_per_rank(model: Any, target_modules: Sequence[str]) -> list[int]:
    """Per block j, the parameters one unit of LoRA rank adds: Σ_targets (d_in + d_out).

    Suitable as ``n_params_fn`` for :func:`adapters.gelora.gelora_ranks`. Blocks are numbered 0 … L−1 and
    must all hold targets.
    """
    layers = target_layers(model, target_modules)
    idx = list(layers)
    if idx != list(range(len(idx))):
        raise AdapterError(f"targeted blocks are {idx}; expected 0 … {len(idx) - 1} without gaps")
    return [sum(i + o for _, i, o in layers[j]) for j in idx]


def lora_parameter_count(model: Any, layer_ranks: Ranks, target_modules: Sequence[str]) -> int:
    """Σ_blocks Σ_targets r_j (d_in + d_out): the adapter parameters of these per-block ranks."""
    layers = target_layers(model, target_modules)
    ranks = rank_map(layers, layer_ranks)
    return sum(ranks[j] * (i + o) for j, mods in layers.items() for _, i, o in mods)


def rank_map(layers: Mapping[int, Any], layer_ranks: Ranks) -> dict[int, int]:
    """Block index → rank for every targeted block of ``layers``, from a dict or a list indexed by block;
    refused unless every targeted block gets a non-negative integer and no other block is named."""
    blocks = list(layers)
    if isinstance(layer_ranks, Mapping):
        ranks = {int(k): v for k, v in layer_ranks.items()}
        unknown = sorted(set(ranks) - set(blocks))
        if unknown:
            raise AdapterError(f"layer_ranks names block(s) {unknown} that hold no target module; "
                               f"targeted blocks are {blocks}")
        missing = [j for j in blocks if j not in ranks]
        if missing:
            raise AdapterError(f"layer_ranks has no rank for block(s) {missing}; give 0 to leave a block out")
    else:
        seq = list(layer_ranks)
        if len(seq) != len(blocks) or blocks != list(range(len(blocks))):
            raise AdapterError(
                f"layer_ranks lists {len(seq)} ranks but the targets sit in blocks {blocks}; "
                "give one rank per block (index = block number) or a dict block → rank"
            )
        ranks = dict(enumerate(seq))
    for j, v in ranks.items():
        if isinstance(v, bool) or int(v) != v or v < 0:
            raise AdapterError(f"rank {v!r} for block {j} is not a non-negative integer")
        ranks[j] = int(v)
    return ranks
