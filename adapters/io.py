"""Saving and loading adapters: PEFT's own files plus a small sidecar, and the record of what was built.

A folder written by :func:`save` holds PEFT's ``adapter_config.json`` and ``adapter_model.safetensors``
and the sidecar ``geoprobe_adapter.json``. Each method's settings live in its PEFT config (HypLoRA's
curvature and formula in :class:`~adapters.hyplora.HypLoraConfig`, HydraLoRA's heads in
:class:`~adapters.hydralora.HydraLoraConfig`, GeLoRA's ranks in ``rank_pattern``), so PEFT saves them;
the sidecar keeps only the method name, the plan the adapter was built from, and a fingerprint of the
base model (architecture, model_type, hidden size, layers, vocabulary and the SHA-256 of the first
rows of the input-embedding matrix, rounded to bfloat16 so a float32 and a bfloat16 copy of one model
agree). :func:`load` refuses a folder whose fingerprint does not match the model it is loaded onto,
builds the config through the method's config class (:mod:`adapters.registry`: one loader for every
config class), and reads sidecars of the first version (which also held the method's settings).
:func:`save` writes into a temporary folder beside the target and renames it into place, so an
interrupted save never leaves a half-written adapter.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from geoprobe import runtime
from geoprobe.errors import AdapterError
from geoprobe.records import Record, atomic_folder, read_json, write_json

from . import registry
from .registry import Method

log = logging.getLogger(__name__)

__all__ = ["SIDECAR", "AdapterSpec", "adapter_spec", "attach", "save", "write_adapter", "load", "adapter_problems",
           "check_adapter_state", "base_fingerprint", "fingerprint_mismatch", "config_from_saved", "saved_method"]

SIDECAR = "geoprobe_adapter.json"
SIDECAR_SCHEMA = "geoprobe.adapter"
SIDECAR_VERSION = 2
_READABLE_VERSIONS = (1, 2)
FINGERPRINT_ROWS = 64
_SPEC_ATTR = "_geoprobe_adapter"
_SIDECAR_FIELDS = ("method", "plan", "base_model", "fingerprint", "versions")


# --------------------------------------------------------------------------- the record
@dataclass(frozen=True)
class AdapterSpec(Record):
    """What was built: the method, the LoRA settings every method shares, the plan (as a dict) when
    the adapter was built from one, and the base model's name and fingerprint. Method-specific
    settings are in the PEFT config (``peft_model.peft_config["default"]``)."""

    method: str
    r: int
    alpha: float
    target_modules: list[str]
    dropout: float
    plan: Optional[dict[str, Any]] = None
    base_model: str = ""
    fingerprint: dict[str, Any] = field(default_factory=dict)
    trainable_parameters: int = 0
    versions: dict[str, str] = field(default_factory=dict)


def spec_for(method: str, config: Any, *, plan: Optional[dict[str, Any]] = None, base_model: str = "",
             fingerprint: Optional[dict[str, Any]] = None, trainable_parameters: int = 0,
             requested: Optional[Mapping[str, Any]] = None) -> AdapterSpec:
    """The :class:`AdapterSpec` of an adapter of ``method`` built from the PEFT ``config``: r, α,
    targets and dropout as ``requested`` (what :func:`adapters.build` was asked for) or else as the
    config holds them (for GeLoRA the config's r and α are those of its largest block)."""
    targets = config.target_modules
    shared = {"r": int(config.r), "alpha": float(config.lora_alpha), "dropout": float(config.lora_dropout),
              "target_modules": [targets] if isinstance(targets, str) else sorted(targets or [])}
    shared.update(requested or {})
    return AdapterSpec(method=method, **shared, plan=plan, base_model=base_model,
                       fingerprint=dict(fingerprint or {}), trainable_parameters=int(trainable_parameters),
                       versions=runtime.versions())


def attach(peft_model: Any, spec: AdapterSpec) -> None:
    """Remember what was built on the model (read back by :func:`adapter_spec`)."""
    object.__setattr__(peft_model, _SPEC_ATTR, spec)


def adapter_spec(peft_model: Any) -> AdapterSpec:
    """The :class:`AdapterSpec` of a model returned by :func:`adapters.build` or :func:`load`."""
    spec = getattr(peft_model, "__dict__", {}).get(_SPEC_ATTR)
    if spec is None:
        raise AdapterError("this model was not built by adapters.build or loaded by adapters.load, so its "
                           "method and base model are unknown; build it with adapters.build(...)")
    return spec


# --------------------------------------------------------------------------- the base model
def is_peft(model: Any) -> bool:
    """True for a ``peft.PeftModel``."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def base_of(model: Any) -> Any:
    """The base model under a PeftModel (the model itself otherwise)."""
    return model.get_base_model() if is_peft(model) else model


def _n_layers(config: Any) -> int:
    sources = [config]
    if hasattr(config, "get_text_config"):
        with contextlib.suppress(Exception):
            sources.insert(0, config.get_text_config())
    for src in sources:
        for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
            v = getattr(src, key, None)
            if isinstance(v, int):
                return v
    return 0


def base_fingerprint(model: Any) -> dict[str, Any]:
    """Identity of a base model: architecture class, model_type, hidden size, number of layers,
    vocabulary size and the SHA-256 of the first 64 rows of the input-embedding matrix rounded to
    bfloat16 (so float32 and bfloat16 copies of one checkpoint agree; a differently initialised or
    trained model of the same shape does not)."""
    import torch

    base = base_of(model)
    emb = base.get_input_embeddings()
    if emb is None or not hasattr(emb, "weight"):
        raise AdapterError(f"{type(base).__name__} has no input-embedding matrix to fingerprint")
    weight = emb.weight
    rows = weight[:FINGERPRINT_ROWS].detach().to(device="cpu", dtype=torch.bfloat16).contiguous()
    digest = hashlib.sha256(rows.view(torch.int16).numpy().tobytes()).hexdigest()
    config = base.config
    return {
        "architecture": type(base).__name__,
        "model_type": str(getattr(config, "model_type", "")),
        "hidden_size": int(weight.shape[1]),
        "n_layers": int(_n_layers(config)),
        "vocab_size": int(weight.shape[0]),
        "embedding_rows": int(min(FINGERPRINT_ROWS, weight.shape[0])),
        "embedding_sha256": digest,
    }


def fingerprint_mismatch(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprints (empty when they agree)."""
    out = []
    for key in ("architecture", "model_type", "hidden_size", "n_layers", "vocab_size",
                "embedding_rows", "embedding_sha256"):
        if key in saved and saved.get(key) != current.get(key):
            a, b = saved.get(key), current.get(key)
            if key == "embedding_sha256":
                a, b = str(a)[:12] + "…", str(b)[:12] + "…"
            out.append(f"{key} {a} (adapter) vs {b} (this model)")
    return out


def model_name(model: Any) -> str:
    """The base model's ``name_or_path`` (empty when unknown)."""
    base = base_of(model)
    return str(getattr(base, "name_or_path", "") or getattr(base.config, "_name_or_path", "") or "")


# --------------------------------------------------------------------------- save
def _write_sidecar(folder: Path, spec: AdapterSpec) -> None:
    body = {k: v for k, v in spec.to_dict().items() if k in _SIDECAR_FIELDS}
    write_json(folder / SIDECAR, {"schema": SIDECAR_SCHEMA, "schema_version": SIDECAR_VERSION, **body})


def save(peft_model: Any, path: Union[str, os.PathLike], *, state_dict: Optional[Mapping[str, Any]] = None) -> Path:
    """Write the adapter (PEFT's files + ``geoprobe_adapter.json``) to the folder ``path`` atomically.

    The files go to a temporary folder beside ``path`` that is renamed into place; an existing
    adapter folder at ``path`` is replaced only once the new one is complete. ``state_dict``: the
    adapter's tensors whole, keyed by parameter name, for a model whose own parameters are shards
    (FSDP); PEFT picks the adapter's tensors from it as from the model's state dict.

    Raises:
        AdapterError: the model was not built by :func:`adapters.build`/:func:`load`.
        OutputError: ``path`` is a file or cannot be written.
    """
    spec = adapter_spec(peft_model)
    target = Path(path)
    with atomic_folder(target, what="the adapter folder") as tmp:
        write_adapter(peft_model, tmp, state_dict=state_dict)
    log.info("saved %s adapter to %s", spec.method, target)
    return target


def write_adapter(peft_model: Any, folder: Union[str, os.PathLike], *,
                  state_dict: Optional[Mapping[str, Any]] = None) -> Path:
    """Write PEFT's files and the sidecar of the ``default`` adapter into ``folder`` (not atomic by
    itself: :func:`save` and the training checkpoints call it on a temporary folder); ``state_dict`` as
    in :func:`save`."""
    spec = adapter_spec(peft_model)
    if "default" not in getattr(peft_model, "peft_config", {}):
        raise AdapterError("only the adapter named 'default' can be saved with its sidecar; this model holds "
                           f"{sorted(peft_model.peft_config)}")
    folder = Path(folder)
    extra = {} if state_dict is None else {"state_dict": dict(state_dict)}
    peft_model.save_pretrained(str(folder), selected_adapters=["default"], **extra)
    _write_sidecar(folder, spec)
    return folder


# --------------------------------------------------------------------------- load
def _weight_keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    file = folder / "adapter_model.safetensors"
    if not file.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise AdapterError(f"{folder} holds pickle weights (adapter_model.bin), which can run code when "
                               "read; re-save the adapter with safetensors")
        raise AdapterError(f"{folder} has no adapter_model.safetensors; point to a folder written by "
                           "adapters.save or save_pretrained")
    try:
        with safe_open(str(file), framework="pt") as fh:
            return list(fh.keys())
    except Exception as exc:  # safetensors raises its own error type
        raise AdapterError(f"{file} is corrupt or truncated: {exc}") from None


def adapter_problems(folder: Union[str, os.PathLike]) -> list[str]:
    """What is wrong with the files of a saved adapter folder, one sentence per broken file (empty when
    ``adapter_config.json``, ``adapter_model.safetensors`` and the sidecar, if present, all read): cheap,
    no model needed."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder.name}/ is missing"]
    problems = []
    for check in (lambda: read_json(folder / "adapter_config.json", "adapter config", error=AdapterError),
                  lambda: _weight_keys(folder),
                  lambda: _read_sidecar(folder) if (folder / SIDECAR).exists() else None):
        try:
            check()
        except AdapterError as exc:
            problems.append(str(exc))
    return problems


def _layer_kind(keys: Sequence[str]) -> Optional[str]:
    """The single method whose own layer tensors the file holds (None: plain LoRA tensors)."""
    return next((m.name for m in registry.METHODS if len(m.parts) == 1 and m.weights is not None
                 and any(m.weights in k for k in keys)), None)


def _layer_part(method: Method) -> Optional[str]:
    """The part of ``method`` that brings its own layer (None for LoRA layers)."""
    return next((p for p in method.parts if registry.get(p).layer is not None), None)


def _read_sidecar(folder: Path) -> dict[str, Any]:
    raw = read_json(folder / SIDECAR, f"cannot read the adapter sidecar {folder / SIDECAR}", error=AdapterError)
    if raw.get("schema") != SIDECAR_SCHEMA:
        raise AdapterError(f"{folder / SIDECAR} is not a geoprobe adapter sidecar (no \"schema\": "
                           f"\"{SIDECAR_SCHEMA}\")")
    if raw.get("schema_version") not in _READABLE_VERSIONS:
        raise AdapterError(f"{folder / SIDECAR} has schema version {raw.get('schema_version')!r}; this "
                           f"geoprobe reads versions {', '.join(map(str, _READABLE_VERSIONS))}")
    try:
        registry.get(str(raw.get("method")))
    except AdapterError:
        raise AdapterError(f"{folder / SIDECAR} names an unknown method {raw.get('method')!r}") from None
    for key, kind in (("fingerprint", dict), ("plan", dict), ("versions", dict), ("base_model", str)):
        if raw.get(key) is not None and not isinstance(raw[key], kind):
            want = "an object" if kind is dict else "a string"
            raise AdapterError(f"{folder / SIDECAR}: \"{key}\" must be {want} or null, got {raw[key]!r:.80}; "
                               "the sidecar was altered — re-save the adapter")
    return raw


def _legacy_fields(method: Method, sidecar: Mapping[str, Any]) -> dict[str, Any]:
    """Config fields that sidecars of version 1 held instead of the config (HypLoRA's options)."""
    if not method.includes("hyplora") or sidecar.get("schema_version") != 1:
        return {}
    curvature, pattern = sidecar.get("curvature") or 1.0, sidecar.get("curvature_pattern") or {}
    if isinstance(curvature, bool) or not isinstance(curvature, (int, float)) or not isinstance(pattern, dict):
        raise AdapterError(f"the {SIDECAR} of version 1 holds a curvature {curvature!r:.40} or curvature_pattern "
                           f"{pattern!r:.40} that is not a number and an object; re-save the adapter")
    return {"hyplora_curvature": float(curvature), "hyplora_curvature_pattern": dict(pattern),
            "hyplora_official": bool(sidecar.get("official", False))}


def config_from_saved(method: Method, raw: Mapping[str, Any], legacy: Optional[Mapping[str, Any]] = None,
                      where: str = "adapter_config.json") -> Any:
    """The PEFT config of ``method`` from a saved ``adapter_config.json`` (``raw``), through the registry:
    the config class's own loader where it has one, else the class built from the fields it declares
    (keys of newer PEFT versions are dropped, as PEFT does). ``legacy`` fields fill in what older
    folders kept elsewhere."""
    data = {**raw, **{k: v for k, v in (legacy or {}).items() if k not in raw}}
    loader = method.config_loader
    if loader is not None:
        return loader(data, where)
    cls = method.config_class
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    try:
        return cls(**{k: v for k, v in data.items() if k in known})
    except (TypeError, ValueError) as exc:
        raise AdapterError(f"{where} does not fit {method.name}: {exc}") from None


def saved_method(raw_cfg: Mapping[str, Any]) -> Method:
    """The method a saved ``adapter_config.json`` (``raw_cfg``) belongs to, from the fields its config
    class adds to ``LoraConfig`` (``hyplora_*``, ``hydra_*``) or the options that select it within
    ``LoraConfig`` (DoRA's ``use_dora``); ``lora`` when it holds none. With it, stock
    PEFT loads such a folder as its method: ``PeftModel.from_pretrained(model, folder,
    config=config_from_saved(saved_method(raw), raw))`` (what :func:`load` does)."""
    own = {f.name for f in dataclasses.fields(registry.get("lora").config_class)}
    for method in registry.METHODS:
        extra = {f.name for f in dataclasses.fields(method.config_class)} - own
        if len(method.parts) == 1 and extra and extra <= set(raw_cfg):
            return method
    for method in registry.METHODS:  # methods that share LoraConfig, told apart by their options
        if len(method.parts) == 1 and method.options and method.matches_options(dict(raw_cfg)):
            return method
    return registry.get("lora")


def _unchecked_method(folder: Path, raw_cfg: Mapping[str, Any], kind: Optional[str]) -> Method:
    """The method of a folder without a sidecar, from its config's own fields; refuses custom layer
    weights whose config does not say which layer they belong to (folders of older versions)."""
    method = saved_method(raw_cfg)
    if kind is not None and _layer_part(method) != kind:
        raise AdapterError(
            f"{folder} holds {kind} weights but no {SIDECAR} and a config that does not name the method: PEFT "
            "alone would build plain LoRA layers from it and give different outputs. Restore the sidecar "
            "(adapters.save writes it) or re-save the adapter with adapters.save")
    log.warning("%s has no %s: loading it as %s without checking the base model", folder, SIDECAR, method.name)
    return method


def _checked_method(folder: Path, sidecar: Mapping[str, Any], model: Any, kind: Optional[str]) -> Method:
    """The sidecar's method, after checking the base model's fingerprint and the weights' layer kind."""
    method = registry.get(sidecar["method"])
    diff = fingerprint_mismatch(sidecar.get("fingerprint") or {}, base_fingerprint(model))
    if diff:
        raise AdapterError(
            f"adapter {folder} was trained on another base model ({sidecar.get('base_model') or 'unnamed'}): "
            + "; ".join(diff) + ". Load it onto the model it was trained on")
    if kind != _layer_part(method):
        raise AdapterError(f"{folder}: the sidecar says {method.name} but the weights are "
                           f"{kind or 'plain LoRA'}; the folder was altered — re-save the adapter")
    return method


def load(model: Any, path: Union[str, os.PathLike], *, adapter_name: str = "default",
         is_trainable: bool = False, expect: Optional[str] = None):
    """Load an adapter folder written by :func:`save` onto the base ``model`` and return the PeftModel.

    The method (from the sidecar, else from the config's own fields) names the config class, which
    builds the right layers; the weights restore the adapter exactly. Without a sidecar the base
    model is not checked (a warning says so).

    ``expect`` names the method the caller needs (``"hydralora"``): a folder of another method is refused,
    and a folder without a sidecar is read with that method's config loader, which refuses a config that
    lacks the method's fields.

    Raises:
        AdapterError: no adapter at ``path``; a folder of another method than ``expect``; custom-layer weights whose folder does not say which
            layer they belong to; a sidecar whose base-model fingerprint differs from ``model``'s;
            weights that do not fit the model.
    """
    from peft import PeftModel

    folder = Path(path)
    if is_peft(model):
        raise AdapterError("load needs the base model, not a PeftModel (call peft_model.unload() first)")
    if not folder.is_dir():
        raise AdapterError(f"adapter folder {folder} does not exist")
    raw_cfg = read_json(folder / "adapter_config.json", "adapter config", error=AdapterError)
    if raw_cfg.get("megatron_config"):  # PEFT would import the module that megatron_core names
        raise AdapterError(f"{folder / 'adapter_config.json'} sets megatron_config, which makes PEFT import the "
                           "module named by megatron_core; geoprobe's adapters never use Megatron-LM and do not "
                           "import modules named by a file — remove it or re-save the adapter")
    keys = _weight_keys(folder)
    kind = _layer_kind(keys)
    sidecar = _read_sidecar(folder) if (folder / SIDECAR).is_file() else {}
    if sidecar:
        method = _checked_method(folder, sidecar, model, kind)
    else:
        method = registry.get(expect) if expect is not None else _unchecked_method(folder, raw_cfg, kind)
    if expect is not None and not method.includes(expect):
        raise AdapterError(f"{folder} holds a {method.name} adapter, not {expect}")
    config = config_from_saved(method, raw_cfg, _legacy_fields(method, sidecar), str(folder / "adapter_config.json"))
    try:  # PEFT reads the config's values here: a value of the wrong type fails inside it
        peft_model = PeftModel.from_pretrained(model, str(folder), adapter_name=adapter_name,
                                               is_trainable=is_trainable, config=config)
        check_adapter_state(peft_model, keys, folder, adapter_name)
        n_train = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
        spec = spec_for(method.name, config, plan=sidecar.get("plan"),
                        base_model=str(sidecar.get("base_model") or raw_cfg.get("base_model_name_or_path") or ""),
                        fingerprint=sidecar.get("fingerprint"), trainable_parameters=n_train)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise AdapterError(f"cannot load the adapter {folder} onto this model: "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    except (TypeError, AttributeError, IndexError) as exc:
        raise AdapterError(f"{folder / 'adapter_config.json'} holds a value of the wrong type for "
                           f"{method.name} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                           "re-save the adapter") from None
    except ImportError as exc:
        raise AdapterError(f"{folder / 'adapter_config.json'} asks for a package that is not installed ({exc}); "
                           "geoprobe's adapters do not use it — re-save the adapter") from None
    attach(peft_model, spec)
    log.info("loaded %s adapter from %s", method.name, folder)
    return peft_model


def check_adapter_state(peft_model: Any, keys: Sequence[str], folder: Path, adapter_name: str = "default") -> None:
    """Raise :class:`AdapterError` unless the tensor names ``keys`` of an adapter file are exactly the
    adapter tensors of ``peft_model`` (every file tensor has a home, every adapter tensor came from it)."""
    from peft.utils import get_peft_model_state_dict

    have = set(get_peft_model_state_dict(peft_model, adapter_name=adapter_name))
    saved = set(keys)
    if have != saved:
        missing, extra = sorted(have - saved), sorted(saved - have)
        raise AdapterError(
            f"adapter {folder} does not fit this model: {len(missing)} adapter tensors have no weights in "
            f"the file (e.g. {missing[:2]}) and {len(extra)} file tensors have no place (e.g. {extra[:2]})")
