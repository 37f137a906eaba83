"""adapters: build PEFT adapters from geometry measurements (DESIGN.md).

    import adapters
    adapters.lorentz.expmap0(v, K); adapters.lorentz.logmap0(y, K)
    adapters.hyplora.hyplora_delta(x, A, B, K, s)
    cfg = adapters.hyplora_config(r=32, alpha=128, target_modules=[...], curvature=1.0)
    targets = adapters.default_targets(model)                         # ("q_proj", "k_proj", ...)
    costs = adapters.params_per_rank(model, targets)                  # parameters per unit of rank, per block
    plan = adapters.plan_adapters(profile, train_embeddings=..., params_per_rank=costs)   # an AdapterPlan
    peft_model = adapters.build(model, plan)                          # or a method name: "hyplora", ...
    adapters.save(peft_model, "out/adapter"); adapters.load(base_model, "out/adapter")
    run = adapters.finetune(model, tokenizer, examples, plan, out="out")

Nothing heavy is imported here: submodules (and the names listed in ``_LAZY``) are imported on first
attribute access, so ``import adapters`` costs neither torch nor peft. The one exception is the
function :func:`adapters.build.build`, bound here as ``adapters.build`` (its module imports neither): a
submodule imported later would otherwise take its name. The module itself stays importable as
``importlib.import_module("adapters.build")``; the method list is :mod:`adapters.registry`.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    "expmap0": "adapters.lorentz",
    "logmap0": "adapters.lorentz",
    "hyplora_delta": "adapters.hyplora",
    "HypLoraLinear": "adapters.hyplora",
    "HypLoraOptions": "adapters.hyplora",
    "HypLoraConfig": "adapters.hyplora",
    "hyplora_config": "adapters.hyplora",
    "register_hyplora": "adapters.hyplora",
    "load": "adapters.io",
    "save": "adapters.io",
    "plan_adapters": "adapters.plan",
    "default_targets": "adapters.build",
    "params_per_rank": "adapters.gelora",
    "AdapterPlan": "adapters.plan",
    "finetune": "adapters.train",
}

__all__ = sorted([*_LAZY, "build"])

from .build import build  # noqa: E402  (the function; see the module docstring)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
    else:
        if name.startswith("_"):
            raise AttributeError(f"module 'adapters' has no attribute {name!r}")
        target = f"{__name__}.{name}"
        try:
            value = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            if exc.name != target:
                raise
            raise AttributeError(f"module 'adapters' has no attribute {name!r}") from None
    globals()[name] = value
    return value
