"""GeLoRA: per-layer LoRA ranks from the intrinsic dimension of hidden states.

GeLoRA (Ed-dib et al., "GeLoRA: Geometric Adaptive Ranks for Efficient LoRA Fine-tuning",
arXiv 2412.09250) bounds the rank a transformer block needs by the intrinsic dimensions (TwoNN,
Facco et al. 2017) of the block's input and output hidden states. No code was released and the
exact offsets and budget scaling are not public (METHODS.md §5), so the rule is pluggable here.

Indexing. Layer IDs come as two aligned sequences: ``ids_in[j]`` is the intrinsic dimension of
the input of block ``j`` and ``ids_out[j]`` that of its output. With Hugging Face hidden states
``h[0]`` (embedding output) … ``h[L]`` (output of the last block), block ``j`` of the model's
layer list (``model.layers.j``) reads ``h[j]`` and writes ``h[j+1]``, so ``ids_in = d[:-1]`` and
``ids_out = d[1:]`` for the per-layer IDs ``d`` (the paper's r_i = d_i − d_(i−1) for block i,
counting blocks from 1). The returned list holds one rank per block, in that order.

Rules (d_in, d_out of one block):

* ``"diff"``: r = max(⌈d_out − d_in⌉, 0), the rule as described in review of the paper; it can be
  0 (the paper reports mean ranks of 1–2 on DeBERTa/GLUE). A block with rank 0 gets no adapter.
* ``"max"``: r = ⌈max(d_in, d_out)⌉, the ID read as a lower bound on the rank of the block's map.
* ``"budget"``: the raw scores s = max(d_out − d_in, 0) + eps (the ``diff`` rule's shape, eps > 0
  so a block whose ID does not grow still gets a share; all-equal scores give every block the
  plain rank r) are scaled by one factor t, clipped to [floor, cap], rounded down and topped up
  by whole rank steps so that the parameter count Σ_i r_i·c_i, c_i = Σ_targets (d_in,t + d_out,t),
  comes as close as integers allow to — and never exceeds — that of a plain rank-r LoRA on the same
  targets, r·Σ_i c_i. Left over is less than one rank step of any block still below its cap.

``floor`` and ``cap`` bound the ``budget`` rule; ``cap`` also clips ``diff`` and ``max`` when given
(their floor is the formula's own 0 or more, so ``floor`` does not apply there).

:func:`gelora_config` turns per-block ranks into a stock PEFT ``LoraConfig`` with ``rank_pattern``
and ``alpha_pattern`` (α_i = alpha_over_r · r_i, so α_i/r_i is the same in every layer) and lists
rank-0 modules in ``exclude_modules``. PEFT matches pattern keys as regexes against the end of a
module name (``re.match(r"(.*\\.)?(KEY)$", name)``, first match wins); every key here is the full
module name with its dots escaped, so ``model.layers.1.mlp.up_proj`` never matches
``model.layers.11.mlp.up_proj`` nor any other name.
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

from geoprobe.errors import AdapterError, InputDataError, PlanError

log = logging.getLogger(__name__)

RULES = ("diff", "max", "budget")
_CEIL_TOL = 1e-9  # an ID difference of 2.0000000001 from float round-off is rank 2, not 3
_BLOCK_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")

__all__ = [
    "RULES",
    "gelora_ranks",
    "gelora_config",
    "target_layers",
    "params_per_rank",
    "lora_parameter_count",
]


def _ceil(x: float) -> int:
    return int(math.ceil(x - _CEIL_TOL))


def _check_ids(ids_in: Sequence[float], ids_out: Sequence[float]) -> tuple[list[float], list[float]]:
    din = [float(v) for v in ids_in]
    dout = [float(v) for v in ids_out]
    if len(din) != len(dout):
        raise InputDataError(
            f"ids_in has {len(din)} values and ids_out {len(dout)}; give one input and one output "
            "intrinsic dimension per block (ids_in = d[:-1], ids_out = d[1:] for per-layer IDs d)"
        )
    if not din:
        raise InputDataError("no layer IDs given; measure at least one block's input and output")
    for name, seq in (("ids_in", din), ("ids_out", dout)):
        for j, v in enumerate(seq):
            if not math.isfinite(v) or v < 0:
                raise InputDataError(
                    f"{name}[{j}] = {v} is not a finite non-negative intrinsic dimension; "
                    "re-measure that layer or drop the block"
                )
    return din, dout


def _costs(n_params_fn: Union[Callable[[int], int], Sequence[int], None], n: int) -> list[int]:
    if n_params_fn is None:
        return [1] * n
    if callable(n_params_fn):
        costs = [n_params_fn(j) for j in range(n)]
    else:
        costs = list(n_params_fn)
        if len(costs) != n:
            raise PlanError(f"n_params_fn gives {len(costs)} per-rank costs for {n} blocks; give one per block")
    out = []
    for j, c in enumerate(costs):
        if int(c) != c or c <= 0:
            raise PlanError(
                f"per-rank parameter cost of block {j} is {c}; it must be a positive integer "
                "(Σ over targets of d_in + d_out)"
            )
        out.append(int(c))
    return out


def gelora_ranks(
    ids_in: Sequence[float],
    ids_out: Sequence[float],
    *,
    rule: str = "diff",
    r: int = 8,
    floor: int = 1,
    cap: Optional[int] = None,
    n_params_fn: Union[Callable[[int], int], Sequence[int], None] = None,
    eps: float = 1e-3,
) -> list[int]:
    """Per-block LoRA ranks from block input/output intrinsic dimensions (GeLoRA, arXiv 2412.09250).

    Args:
        ids_in, ids_out: intrinsic dimension of each block's input and output (module docstring).
        rule: ``"diff"`` max(⌈d_out − d_in⌉, 0); ``"max"`` ⌈max(d_in, d_out)⌉; ``"budget"`` the diff
            scores plus ``eps`` rescaled to the parameter count of a plain rank-``r`` LoRA.
        r: the plain LoRA rank whose parameter count is the budget (``budget`` only).
        floor, cap: smallest and largest rank per block in ``budget`` mode; ``cap`` also clips the
            other rules. ``cap=None`` means no upper bound.
        n_params_fn: parameters added per unit of rank in block j, Σ_targets (d_in + d_out) — a
            callable of j or a sequence; default 1 per block (the budget is then Σ r_j = r·L).
            :func:`params_per_rank` computes it from a model.
        eps: score added to every block in ``budget`` mode.

    Returns:
        One integer rank per block.

    Raises:
        InputDataError: mismatched lengths, NaN or negative IDs.
        PlanError: unknown rule, bad floor/cap/r, or a budget below ``floor`` in every block.
    """
    din, dout = _check_ids(ids_in, ids_out)
    n = len(din)
    if rule not in RULES:
        raise PlanError(f"unknown GeLoRA rule {rule!r}; use one of {', '.join(RULES)}")
    if cap is not None and cap < 0:
        raise PlanError(f"cap = {cap} is negative; give a positive cap or None")
    if rule == "diff":
        ranks = [max(_ceil(o - i), 0) for i, o in zip(din, dout)]
        return [min(x, cap) for x in ranks] if cap is not None else ranks
    if rule == "max":
        ranks = [_ceil(max(i, o)) for i, o in zip(din, dout)]
        return [min(x, cap) for x in ranks] if cap is not None else ranks

    # ---- budget
    if r < 1:
        raise PlanError(f"r = {r}: the plain-LoRA rank that sets the budget must be at least 1")
    if floor < 0:
        raise PlanError(f"floor = {floor} is negative; use 0 (blocks may be left out) or more")
    if cap is not None and cap < floor:
        raise PlanError(f"cap = {cap} is below floor = {floor}; raise the cap or lower the floor")
    if not eps > 0:
        raise PlanError(f"eps = {eps} must be positive so every block has a non-zero score")
    costs = _costs(n_params_fn, n)
    budget = r * sum(costs)
    need = floor * sum(costs)
    if need > budget:
        raise PlanError(
            f"budget of a rank-{r} LoRA is {budget} parameters but rank {floor} (the floor) in all "
            f"{n} blocks already needs {need}; lower the floor or raise r"
        )
    hi = float(cap) if cap is not None else math.inf
    scores = [max(o - i, 0.0) + eps for i, o in zip(din, dout)]

    def spend(t: float) -> float:
        return sum(c * min(max(t * s, floor), hi) for c, s in zip(costs, scores))

    # bisection on the common factor t: spend(t) is continuous and non-decreasing
    t_lo, t_hi = 0.0, 1.0
    while spend(t_hi) < budget and t_hi < 1e300:
        if cap is not None and all(t_hi * s >= hi for s in scores):
            break
        t_hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (t_lo + t_hi)
        if spend(mid) <= budget:
            t_lo = mid
        else:
            t_hi = mid
    cont = [min(max(t_lo * s, floor), hi) for s in scores]
    ranks = [max(int(math.floor(x + _CEIL_TOL)), floor) for x in cont]
    if cap is not None:
        ranks = [min(x, cap) for x in ranks]
    used = sum(c * x for c, x in zip(costs, ranks))
    while used > budget:  # round-off guard; cannot go below the floor since need <= budget
        j = max((k for k in range(n) if ranks[k] > floor), key=lambda k: ranks[k] - cont[k])
        ranks[j] -= 1
        used -= costs[j]
    # top up by whole rank steps, largest shortfall against the continuous solution first, until no
    # block below its cap fits in what is left
    while True:
        fits = [k for k in range(n) if (cap is None or ranks[k] < cap) and used + costs[k] <= budget]
        if not fits:
            break
        j = max(fits, key=lambda k: (cont[k] - ranks[k], scores[k], -k))
        ranks[j] += 1
        used += costs[j]
    log.debug("GeLoRA budget: %d of %d parameters used, ranks %s", used, budget, ranks)
    return ranks


# --------------------------------------------------------------------------- model side
def _in_out(module: Any) -> Optional[tuple[int, int]]:
    import torch.nn as nn

    if isinstance(module, nn.Linear):
        return int(module.in_features), int(module.out_features)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # GPT-2 style, weight (in, out)
        w = module.weight
        return int(w.shape[0]), int(w.shape[1])
    return None


def target_layers(model: Any, target_modules: Sequence[str]) -> dict[int, list[tuple[str, int, int]]]:
    """Map block index → [(full module name, d_in, d_out)] for the targeted linear layers.

    A module is targeted when its name equals a target or ends with ``"." + target`` (PEFT's rule for
    a list of names). The block index is the first all-digit component of the name
    (``model.layers.3.mlp.up_proj`` → 3).

    Raises:
        AdapterError: a PeftModel was passed, a target matches no linear layer, or a matched layer
            sits outside the numbered blocks.
    """
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        raise AdapterError("gelora_config needs the base model; pass model.get_base_model() of an "
                           "unadapted model, not a PeftModel")
    if isinstance(target_modules, str) or not target_modules:
        raise AdapterError("target_modules must be a non-empty list of module names, e.g. ['up_proj']")
    found: dict[int, list[tuple[str, int, int]]] = {}
    hits = {t: 0 for t in target_modules}
    for name, module in model.named_modules():
        matched = [t for t in target_modules if name == t or name.endswith("." + t)]
        if not matched:
            continue
        dims = _in_out(module)
        if dims is None:
            raise AdapterError(
                f"module {name} ({type(module).__name__}) matches target {matched[0]!r} but is not a "
                "linear layer; GeLoRA targets Linear layers only"
            )
        m = _BLOCK_INDEX.search(name)
        if m is None:
            raise AdapterError(
                f"module {name} matches target {matched[0]!r} but belongs to no numbered block; "
                "target per-block layers only (e.g. 'up_proj', not 'lm_head')"
            )
        for t in matched:
            hits[t] += 1
        found.setdefault(int(m.group(1)), []).append((name, dims[0], dims[1]))
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

    Suitable as ``n_params_fn`` for :func:`gelora_ranks`. Blocks are numbered 0 … L−1 and must all
    hold targets.
    """
    layers = target_layers(model, target_modules)
    idx = list(layers)
    if idx != list(range(len(idx))):
        raise AdapterError(f"targeted blocks are {idx}; expected 0 … {len(idx) - 1} without gaps")
    return [sum(i + o for _, i, o in layers[j]) for j in idx]


def lora_parameter_count(model: Any, layer_ranks: Union[Mapping[int, int], Sequence[int]],
                         target_modules: Sequence[str]) -> int:
    """Σ_blocks Σ_targets r_j (d_in + d_out): the adapter parameters of these per-block ranks."""
    layers = target_layers(model, target_modules)
    ranks = _rank_map(layers, layer_ranks)
    return sum(ranks[j] * (i + o) for j, mods in layers.items() for _, i, o in mods)


def _rank_map(layers: Mapping[int, Any], layer_ranks: Union[Mapping[int, int], Sequence[int]]) -> dict[int, int]:
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


def gelora_config(
    model: Any,
    layer_ranks: Union[Mapping[int, int], Sequence[int]],
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

    clash = sorted(set(lora_kwargs) & {"r", "lora_alpha", "rank_pattern", "alpha_pattern",
                                        "target_modules", "exclude_modules"})
    if clash:
        raise AdapterError(f"gelora_config sets {clash} itself from layer_ranks; do not pass them")
    if not (alpha_over_r > 0 and math.isfinite(alpha_over_r)):
        raise AdapterError(f"alpha_over_r = {alpha_over_r} must be a positive number")
    layers = target_layers(model, target_modules)
    ranks = _rank_map(layers, layer_ranks)
    if not any(ranks[j] > 0 for j in layers):
        raise PlanError("every block has rank 0, so no module would be adapted; lower the rule's "
                        "threshold (e.g. rule='budget' or floor=1)")

    def alpha(rk: int) -> Union[int, float]:
        a = alpha_over_r * rk
        return int(a) if float(a).is_integer() else float(a)

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
                alpha_pattern[key] = alpha(ranks[j])
    base_r = max(rank_pattern.values())
    cfg = LoraConfig(
        r=base_r,
        lora_alpha=alpha(base_r),
        target_modules=list(target_modules),
        exclude_modules=excluded or None,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        **lora_kwargs,
    )
    log.info("GeLoRA config: %d modules adapted, %d left out, ranks by block %s",
             len(rank_pattern), len(excluded), [ranks[j] for j in layers])
    return cfg
