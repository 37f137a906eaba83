"""PEFT model operations HydraLoRA cannot honour, refused before they change the model."""
from __future__ import annotations

import inspect

from geoprobe.errors import AdapterError

__all__ = ["refuse_weighted_combination"]

_SEARCH_DEPTH = 8  # frames between the config's __post_init__ and PEFT's add_weighted_adapter (3 today)


def refuse_weighted_combination() -> None:
    """Raise :class:`AdapterError` when PEFT's ``add_weighted_adapter`` is building a HydraLoRA config.

    ``LoraModel.add_weighted_adapter`` combines adapters by mixing their ``lora_A``/``lora_B`` matrices. A
    HydraLoRA layer holds N routed heads and a router instead of ``lora_B``, and its routed delta
    Σ_i g_i(x) B_i A x of several adapters is no single adapter's (the routers differ), so no combination is
    exact. PEFT offers no hook before it changes the model: it first copies the first adapter's config
    (``dataclasses.replace``, which runs this config's ``__post_init__``), then injects the new adapter into
    every layer and fails half way with a bare ``KeyError``. That copy is the first of our code it runs, so
    the refusal is made there, while the model is still unchanged: the ``__post_init__`` calls this, which
    looks up the calling frames for a PEFT tuner's ``add_weighted_adapter``.
    """
    from peft.tuners.tuners_utils import BaseTuner

    frame = inspect.currentframe()
    try:
        caller = frame.f_back if frame is not None else None
        for _ in range(_SEARCH_DEPTH):
            if caller is None:
                return
            if caller.f_code.co_name == "add_weighted_adapter" and isinstance(caller.f_locals.get("self"), BaseTuner):
                raise AdapterError(
                    "add_weighted_adapter cannot combine HydraLoRA adapters: each routes every token through its "
                    "own router, so no weighted mix of their matrices reproduces them; activate several "
                    "adapters at once instead (base_model.set_adapter([...]) sums their deltas exactly)"
                )
            caller = caller.f_back
    finally:
        del frame
