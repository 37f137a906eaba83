"""Check that a refused operation left the model as it was.

:func:`install` wraps PEFT's model-level merge entry points (``merge_adapter``, ``merge_and_unload``
and LoRA's ``add_weighted_adapter``). Around each call it snapshots the tuner's state dict and adapter
names; when the call raises our ``AdapterError``, the differences (changed or added tensors, a
half-built adapter) are attached to the exception as :data:`CHANGES_ATTR`, for :mod:`verdict` to
read. Other exceptions and successful calls pass through untouched.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch

__all__ = ["CHANGES_ATTR", "changes", "guard", "install", "snapshot"]

CHANGES_ATTR = "geoprobe_refusal_changes"
_WRAPPED = "_geoprobe_untouched"


def snapshot(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], frozenset[str]]:
    """A copy of ``model``'s state dict and the names of its adapters."""
    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    return state, frozenset(getattr(model, "peft_config", None) or {})


def changes(before: tuple[dict[str, torch.Tensor], frozenset[str]], model: torch.nn.Module) -> list[str]:
    """What differs between the snapshot ``before`` and ``model`` now (empty when nothing does)."""
    (old, old_names), (new, new_names) = before, snapshot(model)
    found = [f"adapter {name!r} added" for name in sorted(new_names - old_names)]
    found += [f"adapter {name!r} removed" for name in sorted(old_names - new_names)]
    found += [f"tensor {key} added" for key in sorted(new.keys() - old.keys())]
    found += [f"tensor {key} removed" for key in sorted(old.keys() - new.keys())]
    found += [f"tensor {key} changed" for key in sorted(old.keys() & new.keys())
              if old[key].shape != new[key].shape or not torch.equal(old[key], new[key])]
    return found


def guard(method: Callable[..., Any], error_type: type) -> Callable[..., Any]:
    """``method`` that, when it raises ``error_type``, records on the exception what it changed."""

    @functools.wraps(method)
    def guarded(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        before = snapshot(self)
        try:
            return method(self, *args, **kwargs)
        except error_type as exc:
            setattr(exc, CHANGES_ATTR, changes(before, self))
            raise

    setattr(guarded, _WRAPPED, True)
    return guarded


def install(error_type: type) -> None:
    """Wrap the merge entry points of PEFT's tuners (once per process)."""
    from peft.tuners.lora.model import LoraModel
    from peft.tuners.tuners_utils import BaseTuner

    for owner, name in ((BaseTuner, "merge_adapter"), (BaseTuner, "merge_and_unload"),
                        (LoraModel, "add_weighted_adapter")):
        method = owner.__dict__[name]
        if not getattr(method, _WRAPPED, False):
            setattr(owner, name, guard(method, error_type))
