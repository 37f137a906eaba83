"""GeLoRA's rank rules: per-block LoRA ranks from the intrinsic dimensions of the blocks' hidden states.

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
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Optional, Union

from geoprobe.errors import InputDataError, PlanError

log = logging.getLogger(__name__)

RULES = ("diff", "max", "budget")
_CEIL_TOL = 1e-9  # an ID difference of 2.0000000001 from float round-off is rank 2, not 3

__all__ = ["RULES", "gelora_ranks"]

CostsArg = Union[Callable[[int], int], Sequence[int], None]


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


def _costs(n_params_fn: CostsArg, n: int) -> list[int]:
    """Per block, the parameters one unit of rank adds (default 1), checked positive integers."""
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


def _closed_form_ranks(rule: str, din: list[float], dout: list[float], cap: Optional[int]) -> list[int]:
    """The ``diff`` rule max(⌈d_out − d_in⌉, 0) or the ``max`` rule ⌈max(d_in, d_out)⌉, clipped at ``cap``."""
    if rule == "diff":
        ranks = [max(_ceil(o - i), 0) for i, o in zip(din, dout)]
    else:
        ranks = [_ceil(max(i, o)) for i, o in zip(din, dout)]
    return [min(x, cap) for x in ranks] if cap is not None else ranks


def _check_budget_args(r: int, floor: int, cap: Optional[int], eps: float) -> None:
    """Refuse arguments the ``budget`` rule cannot honour."""
    if r < 1:
        raise PlanError(f"r = {r}: the plain-LoRA rank that sets the budget must be at least 1")
    if floor < 0:
        raise PlanError(f"floor = {floor} is negative; use 0 (blocks may be left out) or more")
    if cap is not None and cap < floor:
        raise PlanError(f"cap = {cap} is below floor = {floor}; raise the cap or lower the floor")
    if not eps > 0:
        raise PlanError(f"eps = {eps} must be positive so every block has a non-zero score")


def _budget(r: int, floor: int, costs: list[int]) -> int:
    """The parameter budget r·Σ c_j of a plain rank-r LoRA; refused when the floor alone exceeds it."""
    budget = r * sum(costs)
    need = floor * sum(costs)
    if need > budget:
        raise PlanError(
            f"budget of a rank-{r} LoRA is {budget} parameters but rank {floor} (the floor) in all "
            f"{len(costs)} blocks already needs {need}; lower the floor or raise r"
        )
    return budget


def _continuous_ranks(scores: list[float], costs: list[int], floor: int, cap: Optional[int],
                      budget: int) -> list[float]:
    """Ranks clip(t·s_j, floor, cap) with the largest common factor t whose spend Σ c_j·rank_j fits the budget
    (bisection: the spend is continuous and non-decreasing in t)."""
    hi = float(cap) if cap is not None else math.inf

    def spend(t: float) -> float:
        return sum(c * min(max(t * s, floor), hi) for c, s in zip(costs, scores))

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
    return [min(max(t_lo * s, floor), hi) for s in scores]


def _integer_ranks(cont: list[float], scores: list[float], costs: list[int], floor: int, cap: Optional[int],
                   budget: int) -> list[int]:
    """``cont`` rounded down (not below ``floor``, not above ``cap``), then topped up by whole rank steps,
    largest shortfall against ``cont`` first, until no block below its cap fits in what is left of the budget."""
    n = len(cont)
    ranks = [max(int(math.floor(x + _CEIL_TOL)), floor) for x in cont]
    if cap is not None:
        ranks = [min(x, cap) for x in ranks]
    used = sum(c * x for c, x in zip(costs, ranks))
    while used > budget:  # round-off guard; cannot go below the floor since floor·Σc <= budget
        j = max((k for k in range(n) if ranks[k] > floor), key=lambda k: ranks[k] - cont[k])
        ranks[j] -= 1
        used -= costs[j]
    while True:
        fits = [k for k in range(n) if (cap is None or ranks[k] < cap) and used + costs[k] <= budget]
        if not fits:
            break
        j = max(fits, key=lambda k: (cont[k] - ranks[k], scores[k], -k))
        ranks[j] += 1
        used += costs[j]
    log.debug("GeLoRA budget: %d of %d parameters used, ranks %s", used, budget, ranks)
    return ranks


def gelora_ranks(
    ids_in: Sequence[float],
    ids_out: Sequence[float],
    *,
    rule: str = "diff",
    r: int = 8,
    floor: int = 1,
    cap: Optional[int] = None,
    n_params_fn: CostsArg = None,
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
            :func:`adapters.gelora.params_per_rank` computes it from a model.
        eps: score added to every block in ``budget`` mode.

    Returns:
        One integer rank per block.

    Raises:
        InputDataError: mismatched lengths, NaN or negative IDs.
        PlanError: unknown rule, bad floor/cap/r, or a budget below ``floor`` in every block.
    """
    din, dout = _check_ids(ids_in, ids_out)
    if rule not in RULES:
        raise PlanError(f"unknown GeLoRA rule {rule!r}; use one of {', '.join(RULES)}")
    if cap is not None and cap < 0:
        raise PlanError(f"cap = {cap} is negative; give a positive cap or None")
    if rule != "budget":
        return _closed_form_ranks(rule, din, dout, cap)
    _check_budget_args(r, floor, cap, eps)
    costs = _costs(n_params_fn, len(din))
    budget = _budget(r, floor, costs)
    scores = [max(o - i, 0.0) + eps for i, o in zip(din, dout)]
    cont = _continuous_ranks(scores, costs, floor, cap, budget)
    return _integer_ranks(cont, scores, costs, floor, cap, budget)
