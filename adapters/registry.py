"""The adapter methods, one :class:`Method` record each: what the CLI offers, what the planner may
choose, and what :func:`adapters.build` and :func:`adapters.load` build.

* ``lora``: stock PEFT LoRA, h = W x + (α/r)·B A x (Hu et al. 2021, arXiv 2106.09685).
* ``dora``: PEFT's DoRA (``LoraConfig(use_dora=True)``), W' = m ⊙ (W + (α/r)·B A)/‖W + (α/r)·B A‖_c with a
  learnable magnitude m per output feature (Liu et al. 2024, arXiv 2402.09353); HypLoRA's second baseline.
* ``hyplora``: LoRA routed through the Lorentz model, h = W x + (α/r)·Δ(x) (arXiv 2410.04010).
* ``gelora``: LoRA with per-block ranks from intrinsic dimensions (arXiv 2412.09250).
* ``hydralora``: one shared A and N routed B heads (arXiv 2404.19245).
* ``hyplora+gelora`` / ``hydralora+gelora``: HypLoRA or HydraLoRA layers with GeLoRA's per-block ranks.

``auto`` is not a method: it is the planner's choice (:func:`adapters.plan_adapters`), offered by
:func:`choices`. Config and layer classes are named by import path and imported on first use, so
reading the registry costs neither torch nor peft.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Optional

from geoprobe.errors import AdapterError

__all__ = ["AUTO", "Method", "METHODS", "get", "names", "choices", "for_config"]

AUTO = "auto"
"""The planner's choice (not a :class:`Method`)."""


def _resolve(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Method:
    """One adapter method.

    name: what users type; parts: the single methods it is made of (``("hyplora", "gelora")`` for
    ``hyplora+gelora``); config: import path of its PEFT config class; layer: import path of its layer
    class (None: PEFT's own LoRA layer); combines_with: the methods it can be joined with
    (``"<this>+<other>"``); mergeable: whether its update can be merged into the base weights;
    description: one line for help texts and reports; loader: import path of the function
    ``(raw adapter_config.json dict, where) -> config`` that reads its config class back (None: the
    class is built from the saved fields it declares, :func:`adapters.io.config_from_saved`). Methods of
    one config class share its loader; weights: a fragment of the tensor names that only its own
    layer saves (how a folder's weights tell which layer they belong to; None for LoRA layers);
    options: config fields, as (name, value) pairs, that select this method within a config class it
    shares with others (DoRA: ``use_dora=True`` on PEFT's ``LoraConfig``); :func:`adapters.build` sets
    them, :func:`for_config` and :func:`adapters.io.saved_method` read them back.
    """

    name: str
    parts: tuple[str, ...]
    config: str
    layer: Optional[str]
    combines_with: tuple[str, ...]
    mergeable: bool
    description: str
    loader: Optional[str] = None
    weights: Optional[str] = None
    options: tuple[tuple[str, Any], ...] = ()

    def includes(self, part: str) -> bool:
        """True when ``part`` (a single method) is one of this method's parts."""
        return part in self.parts

    def matches_options(self, config: Any) -> bool:
        """Whether ``config`` (a config object or a saved ``adapter_config.json`` dict) holds every one of
        this method's :attr:`options`; a method without options matches when the config sets none of
        the options that select another method of its config class."""
        def value(name: str) -> Any:
            return config.get(name) if isinstance(config, dict) else getattr(config, name, None)

        if self.options:
            return all(value(k) == v for k, v in self.options)
        rivals = [o for m in METHODS if m.config == self.config and m is not self for o in m.options]
        return not any(value(k) == v for k, v in rivals)

    @property
    def config_class(self) -> type:
        """The PEFT config class (imported on first use)."""
        return _resolve(self.config)

    @property
    def config_loader(self) -> Optional[Any]:
        """The config class's own loader (None where the generic one serves)."""
        return None if self.loader is None else _resolve(self.loader)

    @property
    def layer_class(self) -> Optional[type]:
        """The layer class, or None where PEFT's LoRA layer serves (imported on first use)."""
        return None if self.layer is None else _resolve(self.layer)


_LORA_CONFIG = "peft:LoraConfig"
_HYP_CONFIG, _HYP_LAYER = "adapters.hyplora.config:HypLoraConfig", "adapters.hyplora.layer:HypLoraLinear"
_HYDRA_CONFIG, _HYDRA_LAYER = "adapters.hydralora:HydraLoraConfig", "adapters.hydralora:HydraLoraLinear"
_HYDRA_LOADER = "adapters.hydralora.config:config_from_saved"

METHODS: tuple[Method, ...] = (
    Method("lora", ("lora",), _LORA_CONFIG, None, (), True, "stock PEFT LoRA: h = W x + (α/r)·B A x"),
    Method("dora", ("dora",), _LORA_CONFIG, None, (), True,
           "PEFT's DoRA: LoRA direction with a learnable magnitude per output feature (use_dora=True)",
           options=(("use_dora", True),)),
    Method("hyplora", ("hyplora",), _HYP_CONFIG, _HYP_LAYER, ("gelora",), False,
           "LoRA routed through the Lorentz model, learnable curvature (HypLoRA)", None, ".lora_hyp_"),
    Method("gelora", ("gelora",), _LORA_CONFIG, None, ("hyplora", "hydralora"), True,
           "LoRA with per-block ranks from intrinsic dimensions (GeLoRA)"),
    Method("hydralora", ("hydralora",), _HYDRA_CONFIG, _HYDRA_LAYER, ("gelora",), False,
           "one shared A and N routed B heads (HydraLoRA)", _HYDRA_LOADER, ".lora_hydra_"),
    Method("hyplora+gelora", ("hyplora", "gelora"), _HYP_CONFIG, _HYP_LAYER, (), False,
           "HypLoRA layers with GeLoRA's per-block ranks", None, ".lora_hyp_"),
    Method("hydralora+gelora", ("hydralora", "gelora"), _HYDRA_CONFIG, _HYDRA_LAYER, (), False,
           "HydraLoRA layers with GeLoRA's per-block ranks", _HYDRA_LOADER, ".lora_hydra_"),
)
"""Every method, in the order help texts list them."""

_BY_NAME = {m.name: m for m in METHODS}


def names() -> tuple[str, ...]:
    """The method names, in registry order."""
    return tuple(_BY_NAME)


def choices(include_auto: bool = True) -> tuple[str, ...]:
    """What a user may ask for: every method name, and ``auto`` (the planner's choice) first if asked."""
    return ((AUTO,) if include_auto else ()) + names()


def get(name: str) -> Method:
    """The :class:`Method` called ``name`` (case and surrounding blanks ignored).

    Raises:
        AdapterError: no such method (``auto`` included: it names the planner's choice).
    """
    if not isinstance(name, str):
        raise AdapterError(f"an adapter method is named by a string, got {name!r}; use one of {', '.join(names())}")
    key = name.strip().lower()
    method = _BY_NAME.get(key)
    if method is None:
        hint = " ('auto' is the planner's choice: plan first)" if key == AUTO else ""
        raise AdapterError(f"unknown adapter method {name!r}{hint}; use one of {', '.join(names())}")
    return method


def for_config(config: Any) -> Method:
    """The single method whose config class is exactly ``type(config)`` and whose :attr:`Method.options`
    the config holds (``lora`` for a plain ``LoraConfig``, ``dora`` for one with ``use_dora=True``;
    GeLoRA's per-block ranks are LoRA settings, not another config class).

    Raises:
        AdapterError: a config class no method builds.
    """
    for method in METHODS:
        if len(method.parts) == 1 and type(config) is method.config_class and method.matches_options(config):
            return method
    raise AdapterError(f"no adapter method builds {type(config).__name__} configs; known: "
                       + ", ".join(sorted({m.config.rsplit(':', 1)[-1] for m in METHODS})))
