"""The arms of a comparison and their equal parameter budgets.

An arm is what ``--methods`` names: ``none`` (the base model, not trained), every method of
:mod:`adapters.registry`, ``hyplora-official`` (HypLoRA with the reference code's formula,
``HypLoraConfig.hyplora_official``), ``hyplora-matched`` (HypLoRA with α·√d_in per layer, whose small
updates equal LoRA's for the same A and B: :func:`adapters.hyplora.functional.matched_alpha`; the one arm
whose α/r differs from the others', on purpose) and ``auto`` (the planner's choice).

Budgets. A plain LoRA of rank r on the targets sets the budget B = Σ_modules r·(d_in + d_out). Every
arm's trainable parameters are counted from the shapes of the adapted layers:

* LoRA at rank ρ: ρ·(d_in + d_out) per module;
* DoRA adds one magnitude per output feature: + d_out per module;
* HypLoRA adds its learnable curvature and scale: + 2 per module;
* HydraLoRA with N heads: ρ·d_in (shared A) + N·ρ·d_out (B heads) + N·d_in (router) per module;
* GeLoRA: the per-block ranks of its ``budget`` rule, which never exceed B (:mod:`adapters.gelora`).

An arm keeps rank r (or its plan's ranks) when its count lies within ±5 % of B. Otherwise its ranks are
scaled by one common factor (for uniform ranks: the rank ρ closest to the budget) to the integer ranks
whose count is nearest to B, with α = (α/r)·ρ so that α/r stays the same; when even those miss B by more
than 5 %, the comparison is refused, naming the arm and the closest budget it can reach.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import ComparisonError
from ..records import Record

__all__ = ["NONE", "OFFICIAL", "MATCHED", "TOLERANCE", "Arm", "Budget", "arms", "choices", "parse_methods",
           "target_modules_of", "parameter_count", "match_budget"]

NONE = "none"
"""The base model evaluated without training (seed-independent: run once)."""
OFFICIAL = "hyplora-official"
"""HypLoRA with the reference code's formula (``hyplora_official=True``)."""
MATCHED = "hyplora-matched"
"""HypLoRA with the scale-matched α·√d_in per layer (``adapters.build(..., scale_matched=True)``)."""
TOLERANCE = 0.05
"""Every arm's trainable parameters lie within ±5 % of the LoRA budget."""


@dataclass(frozen=True)
class Arm:
    """One ``--methods`` entry: ``name`` as typed, ``method`` the registry method it builds (``auto`` for
    the planner's choice, None for the untrained base model), ``official`` HypLoRA's reference formula,
    ``scale_matched`` HypLoRA's α·√d_in per layer."""

    name: str
    method: Optional[str]
    description: str
    official: bool = False
    scale_matched: bool = False

    @property
    def trains(self) -> bool:
        """Whether the arm fine-tunes adapters (all but ``none``)."""
        return self.method is not None

    @property
    def planned(self) -> bool:
        """Whether the arm needs a plan from the model's geometry (``auto`` and the GeLoRA methods)."""
        from adapters import registry

        return self.method == registry.AUTO or (self.method is not None
                                                and registry.get(self.method).includes("gelora"))


def arms() -> tuple[Arm, ...]:
    """Every arm, in the order help texts list them: none, the registry's methods (with
    ``hyplora-official`` and ``hyplora-matched`` after ``hyplora``), auto. Reads the registry only, so
    that help texts cost neither torch nor PEFT."""
    from adapters import registry

    out = [Arm(NONE, None, "the base model, evaluated without training (run once)")]
    for m in registry.METHODS:
        out.append(Arm(m.name, m.name, m.description))
        if m.parts == ("hyplora",):
            out.append(Arm(OFFICIAL, m.name, "HypLoRA with the reference code's formula (hyplora_official)",
                           official=True))
            out.append(Arm(MATCHED, m.name, "HypLoRA with α·√d_in per layer, so that its small updates equal "
                                            "LoRA's for the same A and B (scale-matched)", scale_matched=True))
    out.append(Arm(registry.AUTO, registry.AUTO, "the planner's choice from the model's geometry and the "
                                                 "training data (recorded with its reason)"))
    return tuple(out)


def choices() -> tuple[str, ...]:
    """The names ``--methods`` accepts."""
    return tuple(a.name for a in arms())


def parse_methods(text: str | Sequence[str]) -> list[Arm]:
    """The arms of a ``--methods`` value (comma-separated names, case and blanks ignored).

    Raises:
        ComparisonError: an empty list, an unknown name (the choices listed) or a name given twice.
    """
    names = [t.strip().lower() for t in (text.split(",") if isinstance(text, str) else text)]
    names = [n for n in names if n]
    if not names:
        raise ComparisonError(f"--methods is empty; choose from {', '.join(choices())}")
    by_name = {a.name: a for a in arms()}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ComparisonError(f"--methods: unknown method(s) {', '.join(unknown)}; choose from "
                              f"{', '.join(choices())}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ComparisonError(f"--methods names {', '.join(twice)} more than once")
    return [by_name[n] for n in names]


# --------------------------------------------------------------------------- counting
@dataclass(frozen=True)
class Budget(Record):
    """How an arm meets the budget: the method built, its rank ``r`` (uniform ranks) or ``layer_ranks``
    (one per block), α, HydraLoRA's ``n_heads``, the predicted trainable ``parameters``, the LoRA budget
    and their ``ratio``, and the ``rule`` that set them, in one sentence."""

    arm: str
    method: str
    r: int
    alpha: float
    parameters: int
    lora_parameters: int
    ratio: float
    rule: str
    n_heads: Optional[int] = None
    layer_ranks: Optional[list[int]] = None
    rank_changed: bool = False
    extras: dict[str, Any] = field(default_factory=dict)


def target_modules_of(model: Any, targets: Sequence[str]) -> list[tuple[int, int, int]]:
    """(block, d_in, d_out) of every targeted linear layer of ``model`` (a base model)."""
    from adapters.gelora import target_layers

    return [(j, i, o) for j, mods in target_layers(model, list(targets)).items() for _, i, o in mods]


def parameter_count(method: str, modules: Sequence[tuple[int, int, int]], ranks: Sequence[int],
                    n_heads: Optional[int] = None) -> int:
    """Trainable parameters of ``method`` (a registry name) on ``modules`` with ``ranks[block]`` (0 leaves
    a block out); see the module docstring for the per-module formulas."""
    from adapters import registry

    m = registry.get(method)
    total = 0
    for j, d_in, d_out in modules:
        rho = int(ranks[j])
        if rho <= 0:
            continue
        if m.includes("hydralora"):
            total += rho * d_in + n_heads * rho * d_out + n_heads * d_in
        else:
            total += rho * (d_in + d_out)
        if m.includes("hyplora"):
            total += 2
        if dict(m.options).get("use_dora"):
            total += d_out
    return total


def _scaled(ranks: Sequence[int], t: float) -> list[int]:
    """``ranks`` times ``t``, rounded, at least 1 where the rank was positive."""
    return [max(1, int(round(t * r))) if r > 0 else 0 for r in ranks]


def _nearest(method: str, modules, ranks: Sequence[int], n_heads: Optional[int], budget: int) -> list[int]:
    """The ranks ``ranks`` scaled by one common factor whose parameter count is nearest to ``budget``."""
    top = max(ranks)
    candidates = {tuple(_scaled(ranks, t)) for t in np.linspace(1.0 / top, 4.0, 4000)}
    candidates.add(tuple(ranks))
    return list(min(candidates, key=lambda rk: (abs(parameter_count(method, modules, rk, n_heads) - budget),
                                                 rk != tuple(ranks))))


def match_budget(arm: Arm, method: str, modules: Sequence[tuple[int, int, int]], *, r: int, alpha: float,
                 layer_ranks: Optional[Sequence[int]] = None, n_heads: Optional[int] = None,
                 tolerance: float = TOLERANCE) -> Budget:
    """The ranks with which ``arm`` (building registry ``method``) meets the budget of a rank-``r`` LoRA
    on ``modules`` within ``tolerance``, α scaled with the rank (module docstring).

    Raises:
        ComparisonError: no common scaling of the ranks comes within ``tolerance`` of the budget.
    """
    n_blocks = max(j for j, _, _ in modules) + 1
    lora = parameter_count("lora", modules, [r] * n_blocks)
    ranks = list(layer_ranks) if layer_ranks is not None else [r] * n_blocks
    first = parameter_count(method, modules, ranks, n_heads)
    chosen, changed = ranks, False
    if abs(first / lora - 1) > tolerance:
        chosen = _nearest(method, modules, ranks, n_heads, lora)
        changed = chosen != ranks
    count = parameter_count(method, modules, chosen, n_heads)
    ratio = count / lora
    uniform = layer_ranks is None
    what = f"rank {chosen[0]}" if uniform else f"per-block ranks {min(chosen)}…{max(chosen)}"
    if abs(ratio - 1) > tolerance:
        raise ComparisonError(
            f"--methods {arm.name}: its trainable parameters cannot be matched to the LoRA budget of "
            f"{lora:,} (rank {r}) within ±{100 * tolerance:g} %: the closest is {count:,} ({what}, "
            f"{100 * (ratio - 1):+.1f} %); choose another --r or leave {arm.name} out")
    rule = (f"{what} gives {count:,} trainable parameters, {100 * (ratio - 1):+.2f} % against LoRA rank {r} "
            f"({lora:,})")
    if changed:
        before = f"rank {r}" if uniform else "the plan's ranks"
        rule += (f"; {before} would give {first:,} ({100 * (first / lora - 1):+.1f} %), outside ±"
                 f"{100 * tolerance:g} %, so the ranks were scaled to the nearest budget")
    if arm.scale_matched:
        rule += "; α·√d_in per layer (scale-matched), the parameters unchanged"
    rho = chosen[0] if uniform else r
    return Budget(arm=arm.name, method=method, r=int(rho), alpha=float(alpha) * rho / r if uniform else float(alpha),
                  parameters=int(count), lora_parameters=int(lora), ratio=float(ratio), rule=rule,
                  n_heads=n_heads, layer_ranks=None if uniform else [int(x) for x in chosen], rank_changed=changed)
