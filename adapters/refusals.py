"""PEFT model operations an adapter method cannot honour, refused before they change the model.

``LoraModel.add_weighted_adapter`` combines adapters by mixing their ``lora_A``/``lora_B`` matrices. Neither
custom layer can be combined that way:

* HypLoRA: Δ = s·B(c(x)·A x) with a curvature- and input-dependent factor c(x) (arXiv 2410.04010); the
  factor is nonlinear in A x, PEFT folds α/r into A, and the per-adapter curvature K and scale s have no
  counterpart in the mix, so not even one adapter at weight 1.0 is reproduced;
* HydraLoRA: Σ_i g_i(x) B_i A x with a router per adapter (arXiv 2404.19245); the routers differ, so no
  weighted mix of the matrices is any adapter's delta.

PEFT offers no hook before it changes the model: it first copies the first adapter's config
(``dataclasses.replace``, which runs the config's ``__post_init__``), then injects the new adapter into every
layer. That copy is the first of our code it runs, so the refusal is made there, while the model is still
unchanged: the config's ``__post_init__`` calls :func:`refuse_weighted_combination`, which looks up the
calling frames for a PEFT tuner's ``add_weighted_adapter``. Several active adapters at once
(``base_model.set_adapter([...])``) sum each adapter's own delta exactly and are the supported way to combine
them.
"""
from __future__ import annotations

import inspect

from geoprobe.errors import AdapterError

__all__ = ["refuse_weighted_combination"]

_SEARCH_DEPTH = 8  # frames between the config's __post_init__ and PEFT's add_weighted_adapter (3 today)


def refuse_weighted_combination(method: str, why: str) -> None:
    """Raise :class:`AdapterError` naming ``method`` and ``why`` when PEFT's ``add_weighted_adapter`` is
    building a config of that method; return silently otherwise."""
    from peft.tuners.tuners_utils import BaseTuner

    frame = inspect.currentframe()
    try:
        caller = frame.f_back if frame is not None else None
        for _ in range(_SEARCH_DEPTH):
            if caller is None:
                return
            if caller.f_code.co_name == "add_weighted_adapter" and isinstance(caller.f_locals.get("self"), BaseTuner):
                raise AdapterError(
                    f"add_weighted_adapter cannot combine {method} adapters: {why}; activate several adapters at "
                    "once instead (base_model.set_adapter([...]) sums their deltas exactly)")
            caller = caller.f_back
    finally:
        del frame
