"""Our rows for PEFT's custom-model test matrix (``tests/test_custom_models.py`` of PEFT's sdist).

PEFT declares its rows in three module-level lists that ``pytest.mark.parametrize`` reads:

- ``TEST_CASES``: ``(test_name, model_id, config_cls, config_kwargs)``, used by ``TestPeftCustomModel``;
- ``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES``: ``(test_name, tuner_method, config_cls, kwargs_1, kwargs_2)``;
- ``MIXED_ADAPTER_TEST_CASES``: ``(test_name, config_0, config_1)``.

Our rows use PEFT's tiny ``MLP`` (``lin0``: Linear 10→20, ``lin1``: Linear 20→2): both methods adapt
``nn.Linear`` layers only, and the other tiny models (convolutions, embeddings, attention) would only
exercise the refusal of unsupported targets. The test names start with the method's name, which is
how :func:`method_of` maps a test back to its method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


__all__ = ["MethodUnderTest", "methods_under_test", "single_rows", "multi_rows", "mixed_rows", "method_of"]


@dataclass(frozen=True)
class MethodUnderTest:
    """One adapter method as PEFT's tests see it.

    name: prefix of every row name (and the word our error messages use for it); config_cls: called
    by PEFT's tests as ``config_cls(**kwargs)`` and checked with ``issubclass``; mergeable: whether
    PEFT's merge tests may merge it. Neither method is: HypLoRA's update is nonlinear in x, and
    HydraLoRA routes every token differently unless its gates are frozen, which PEFT's tests never do.
    """

    name: str
    config_cls: type
    mergeable: bool = False


_TITLES = {"hyplora": "HypLoRA", "hydralora": "HydraLoRA"}
"""How rows and our error messages name each method that brings its own layer."""


def methods_under_test() -> tuple[MethodUnderTest, ...]:
    """The methods added to PEFT's matrix: every registered single method with a layer of its own (plain
    LoRA and GeLoRA use PEFT's own LoRA layer, which PEFT's rows already cover)."""
    from adapters import registry

    own = [m for m in registry.METHODS if len(m.parts) == 1 and m.layer is not None]
    missing = [m.name for m in own if m.name not in _TITLES]
    if missing:
        raise LookupError(f"registered methods without rows in PEFT's matrix: {missing}; add them to _TITLES")
    return tuple(MethodUnderTest(_TITLES[m.name], m.config_class, m.mergeable) for m in own)


# a representative subset of PEFT's LoRA rows on the MLP (one target, both targets, modules_to_save,
# alpha and dropout), plus each method's own options; together they target lin0 and lin1 (d_out 2 < r)
_COMMON: tuple[tuple[str, dict[str, Any]], ...] = (
    ("1", {"target_modules": ["lin0"]}),
    ("2", {"target_modules": ["lin0", "lin1"]}),
    ("3", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("4", {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1}),
)
_OWN: dict[str, tuple[tuple[str, dict[str, Any]], ...]] = {
    "HypLoRA": (
        ("5 rank 4 gaussian", {"target_modules": ["lin1"], "r": 4, "init_lora_weights": "gaussian"}),
    ),
    "HydraLoRA": (
        ("5 top-1", {"target_modules": ["lin0"], "hydra_top_k": 1}),
        ("6 top-2 of 3", {"target_modules": ["lin1"], "hydra_heads": 3, "hydra_top_k": 2}),
        ("7 balance", {"target_modules": ["lin0"], "hydra_balance": True}),
    ),
}


# (test, row) pairs left out, each with the reason, which a test of ours checks:
# PEFT's "every adapter parameter moves in 3 SGD steps" on lin0+lin1 with zero-initialised B heads: lin1's router
# gets no gradient at the first step (all heads are 0), and by the second PEFT's unnormalised inputs (0 … 89,
# lr 0.5) have pushed lin1's router logits into full saturation, where the softmax's gradient is exactly 0
# (tests/test_hydralora_peft.py::test_router_of_a_saturated_layer_has_exactly_zero_gradient)
LEFT_OUT: frozenset[tuple[str, str]] = frozenset({("test_only_params_are_updated", "HydraLoRA Vanilla MLP 2")})


def single_rows(methods: tuple[MethodUnderTest, ...]) -> list[tuple[str, str, type, dict[str, Any]]]:
    """Rows for ``TEST_CASES``: ``(f"{method} Vanilla MLP {tag}", "MLP", config_cls, kwargs)``."""
    return [(f"{m.name} Vanilla MLP {tag}", "MLP", m.config_cls, dict(kwargs))
            for m in methods for tag, kwargs in (*_COMMON, *_OWN.get(m.name, ()))]


def multi_rows(methods: tuple[MethodUnderTest, ...]) -> list[tuple[str, str, type, dict, dict]]:
    """Rows for ``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES`` (two adapters, randomly initialised).

    The tuner method is ``"lora"``: both configs are ``LoraConfig`` subclasses, so PEFT's LoRA checks
    apply (its forward test also compares ``add_weighted_adapter(..., combination_type="cat")`` with
    the two adapters active together).
    """
    rows = []
    for m in methods:
        first = {"target_modules": ["lin0"], "init_lora_weights": False}
        rows.append((f"{m.name} Same", "lora", m.config_cls, first, dict(first)))
        rows.append((f"{m.name} Different", "lora", m.config_cls, first,
                     {"target_modules": ["lin1"], "init_lora_weights": False}))
    return rows


def mixed_rows(methods: tuple[MethodUnderTest, ...]) -> list[tuple[str, Any, Any]]:
    """Rows for ``MIXED_ADAPTER_TEST_CASES`` (two adapters on ``lin0`` of ranks 8 and 16)."""
    return [(f"{m.name} mixed adapter",
             m.config_cls(target_modules=["lin0"], init_lora_weights=False),
             m.config_cls(target_modules=["lin0"], r=16, init_lora_weights=False)) for m in methods]


def method_of(test_name: str, methods: tuple[MethodUnderTest, ...]) -> MethodUnderTest | None:
    """The method whose row ``test_name`` is, or None for a row that is not ours."""
    for m in methods:
        if test_name.startswith(m.name + " "):
            return m
    return None
