"""Activation checkpointing of the transformer blocks (``--gradient-checkpointing``).

A block's activations are held from its forward pass until its backward pass; with checkpointing only
each block's input is held, and the block's forward runs again inside the backward pass to rebuild the
rest (Chen et al., 2016, "Training Deep Nets with Sublinear Memory Cost": O(√L) memory for one extra
forward pass). It changes which tensors are kept, not the arithmetic, so the losses and the trained
adapter equal the plain run's to rounding (``tests/test_train_checkpointing.py``). For a Llama-3-8B
shape at 4 × 2048 tokens it is what makes a 24 GB GPU enough (BENCHMARKS.md, QLoRA; the benchmarks
train with it).

The blocks are checkpointed by transformers' own ``activation_checkpointing_enable``
(``gradient_checkpointing_enable`` in the 5.x releases before it) with non-reentrant
``torch.utils.checkpoint``, which needs no input that requires a gradient and so serves frozen bases,
on the model's decoder or encoder layers; a model whose class does not support it is refused before any
training, naming the flag. With ``--compile`` the compiled blocks keep the checkpoint inside the compiled
function (:func:`adapters.train.compiled.compile_blocks`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from geoprobe.errors import AdapterError
from geoprobe.profile import Record

__all__ = ["ActivationCheckpointing", "enable"]

FLAG = "--gradient-checkpointing"


@dataclass(frozen=True)
class ActivationCheckpointing(Record):
    """Whether the run's blocks are checkpointed: ``applied``, ``reason`` (why not, or "" when applied)
    and the model class."""

    applied: bool
    reason: str = ""
    model_class: Optional[str] = None


def enable(model: Any, *, enabled: bool) -> tuple[ActivationCheckpointing, Optional[Callable[[], None]]]:
    """Switch on non-reentrant activation checkpointing of ``model``'s blocks (a PEFT model through its base
    model) when ``enabled``: (the record, a function that switches it off again), or (the record saying
    why not, None). A model already checkpointed stays so and is handed back as it came. Raises
    :class:`AdapterError` naming ``--gradient-checkpointing`` when the model does not support it."""
    if not enabled:
        return ActivationCheckpointing(applied=False, reason="off (--gradient-checkpointing not given)"), None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(base).__name__
    # recent transformers names it activation checkpointing; earlier 5.x releases, gradient checkpointing
    on, off, state = (("activation_checkpointing_enable", "activation_checkpointing_disable", "is_activation_checkpointing")
                      if hasattr(base, "activation_checkpointing_enable") else
                      ("gradient_checkpointing_enable", "gradient_checkpointing_disable", "is_gradient_checkpointing"))
    if not getattr(base, "supports_gradient_checkpointing", False) or not hasattr(base, on):
        raise AdapterError(f"{FLAG}: {name} does not support activation checkpointing (transformers' "
                           "supports_gradient_checkpointing is off for it); train without the flag")
    if getattr(base, state, False):
        return ActivationCheckpointing(applied=True, reason="the model came checkpointed", model_class=name), None
    getattr(base, on)({"use_reentrant": False})
    return ActivationCheckpointing(applied=True, model_class=name), getattr(base, off)
