"""From a plan or a method name to a PEFT model; saving and loading adapters with their sidecar.

Methods (METHODS.md §5–8):

* ``lora``: stock PEFT LoRA, h = W x + (α/r)·B A x (Hu et al. 2021, arXiv 2106.09685).
* ``hyplora``: LoRA routed through the Lorentz model, h = W x + (α/r)·Δ(x) (:mod:`adapters.hyplora`,
  arXiv 2410.04010); initial curvature K (default 1, the paper's best).
* ``gelora``: stock LoRA with per-block ranks r_j from intrinsic dimensions (:mod:`adapters.gelora`,
  arXiv 2412.09250), through ``rank_pattern``/``alpha_pattern`` with α_j/r_j = α/r in every block.
* ``hydralora``: one shared A and N routed B heads, h = W x + (α/r)·Σ_i g_i(x) B_i A x
  (:mod:`adapters.hydralora`, arXiv 2404.19245); N defaults to 4, the paper's setting.
* ``hyplora+gelora`` / ``hydralora+gelora``: HypLoRA or HydraLoRA layers with GeLoRA's per-block
  ranks (the same ``rank_pattern``/``alpha_pattern`` and rank-0 exclusions).
* an :class:`~adapters.plan.AdapterPlan` (what ``auto`` means): the plan's method, r, α, targets,
  curvature, ranks and heads.

α defaults to 2r for every method, so α/r — the scale of the update — is the same whichever method is
compared. Default targets are found from the model's module names: attention q, k, v and MLP up, down
(``q_proj k_proj v_proj up_proj down_proj``) in Llama-like models; ``query key value`` and the
``dense`` layers inside the encoder blocks in BERT-like encoders (the pooler's ``dense`` sits outside
the blocks and is left alone).

Saving (:func:`save`, and ``save_pretrained`` of a model returned here) writes PEFT's own files
(``adapter_config.json``, ``adapter_model.safetensors``) plus the sidecar ``geoprobe_adapter.json``:
the method, plan, curvature, heads, ranks and a fingerprint of the base model (architecture,
model_type, hidden size, layers, vocabulary and the SHA-256 of the first rows of the input-embedding
matrix, rounded to bfloat16 so a float32 and a bfloat16 copy of one model agree). PEFT does not save
the custom-layer mapping of HypLoRA and HydraLoRA: a folder with such weights but no sidecar would
load as plain LoRA with different outputs, so :func:`load` refuses it, and refuses a folder whose
fingerprint does not match the model it is loaded onto. :func:`save` writes into a temporary folder
beside the target and renames it into place, so an interrupted save never leaves a half-written
adapter.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import types
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from geoprobe.errors import AdapterError, OutputError, PlanError
from geoprobe import runtime
from geoprobe.records import write_json
from geoprobe.profile import Record

from .plan import AdapterPlan

log = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "SIDECAR",
    "LLAMA_TARGETS",
    "BERT_TARGETS",
    "AdapterSpec",
    "build",
    "save",
    "load",
    "adapter_spec",
    "write_adapter",
    "default_targets",
    "linear_module_names",
    "base_fingerprint",
    "fingerprint_mismatch",
]

METHODS = ("lora", "hyplora", "gelora", "hydralora", "hyplora+gelora", "hydralora+gelora")
SIDECAR = "geoprobe_adapter.json"
SIDECAR_SCHEMA = "geoprobe.adapter"
SIDECAR_VERSION = 1
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
BERT_TARGETS = ("query", "key", "value", "dense")
FINGERPRINT_ROWS = 64
DEFAULT_HEADS = 4
DEFAULT_CURVATURE = 1.0
_SPEC_ATTR = "_geoprobe_adapter"
_BLOCK_PART = re.compile(r"^\d+$")


# --------------------------------------------------------------------------- the record
@dataclass(frozen=True)
class AdapterSpec(Record):
    """What was built, as written to the sidecar ``geoprobe_adapter.json``.

    ``layer_ranks`` holds one rank per block for the GeLoRA methods (None otherwise); ``curvature``
    the initial K of HypLoRA; ``n_heads``/``top_k``/``balance`` HydraLoRA's settings; ``plan`` the
    :class:`AdapterPlan` as a dict when the adapter was built from one; ``fingerprint`` identifies the
    base model (:func:`base_fingerprint`).
    """

    method: str
    r: int
    alpha: float
    target_modules: list[str]
    dropout: float
    curvature: Optional[float] = None
    curvature_pattern: dict[str, float] = field(default_factory=dict)
    official: bool = False
    n_heads: Optional[int] = None
    top_k: Optional[int] = None
    balance: bool = False
    layer_ranks: Optional[list[int]] = None
    plan: Optional[dict[str, Any]] = None
    base_model: str = ""
    fingerprint: dict[str, Any] = field(default_factory=dict)
    trainable_parameters: int = 0
    versions: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- model inspection
def _base_of(model: Any) -> Any:
    if _is_peft(model):
        return model.get_base_model()
    return model


def _is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def _is_linear(module: Any) -> bool:
    import torch.nn as nn

    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def linear_module_names(model: Any) -> list[str]:
    """Full names of the model's linear layers (``nn.Linear`` and GPT-2's ``Conv1D``)."""
    return [name for name, m in _base_of(model).named_modules() if name and _is_linear(m)]


def _matches(name: str, target: str) -> bool:
    """PEFT's rule for a list of target names: equal, or a dotted suffix."""
    return name == target or name.endswith("." + target)


def _in_block(name: str) -> bool:
    return any(_BLOCK_PART.match(part) for part in name.split("."))


def _short_names(names: Sequence[str]) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def _unknown_targets_error(model: Any, missing: Sequence[str]) -> AdapterError:
    names = linear_module_names(model)
    return AdapterError(
        f"target module(s) {list(missing)} match no linear layer of this model; its linear layers are "
        f"named {_short_names(names)} (e.g. {names[:3]}). Pass target_modules from these names.")


def _block_suffixes(target: str, inside: Sequence[str], outside: Sequence[str]) -> list[str]:
    """Shortest dotted suffixes ending in ``target`` that match every name in ``inside`` and none in
    ``outside`` (``output.dense`` and ``intermediate.dense`` for BERT's ``dense`` without the pooler)."""
    out: list[str] = []
    for name in inside:
        parts = name.split(".")
        for k in range(2, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if not any(_matches(o, suffix) for o in outside):
                break
        else:  # pragma: no cover - a full name never matches another full name
            suffix = name
        if not any(_matches(name, s) for s in out):
            out.append(suffix)
    return out


def default_targets(model: Any) -> tuple[str, ...]:
    """The default target modules found from the model's module names (see the module docstring).

    Llama-like names (q_proj, k_proj, v_proj, up_proj, down_proj) first, then BERT's (query, key,
    value, dense). A short name that also matches linear layers outside the numbered blocks (BERT's
    pooler ``dense``) is narrowed to the dotted suffixes that match only the layers inside them.

    Raises:
        AdapterError: neither family is present; the message lists the linear layer names.
    """
    names = linear_module_names(model)
    for family in (LLAMA_TARGETS, BERT_TARGETS):
        if not all(any(_matches(n, t) for n in names) for t in family):
            continue
        targets: list[str] = []
        for t in family:
            hits = [n for n in names if _matches(n, t)]
            inside = [n for n in hits if _in_block(n)]
            outside = [n for n in hits if not _in_block(n)]
            if not inside:
                continue
            targets.extend([t] if not outside else _block_suffixes(t, inside, outside))
        if targets:
            return tuple(dict.fromkeys(targets))
    raise AdapterError(
        "cannot tell which layers to adapt: this model has neither Llama-style "
        f"{list(LLAMA_TARGETS)} nor BERT-style {list(BERT_TARGETS)} linear layers; its linear layers "
        f"are named {_short_names(names)}. Pass target_modules.")


def _resolve_targets(model: Any, target_modules: Union[None, str, Sequence[str]]) -> list[str]:
    if target_modules is None:
        return list(default_targets(model))
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise AdapterError(f"target_modules must be a non-empty list of module names, got {target_modules!r}")
    names = linear_module_names(model)
    missing = [t for t in targets if not any(_matches(n, t) for n in names)]
    if missing:
        raise _unknown_targets_error(model, missing)
    return list(dict.fromkeys(targets))


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


def _is_causal(model: Any) -> bool:
    name = type(model).__name__
    return name.endswith(("ForCausalLM", "LMHeadModel"))


def base_fingerprint(model: Any) -> dict[str, Any]:
    """Identity of a base model: architecture class, model_type, hidden size, number of layers,
    vocabulary size and the SHA-256 of the first 64 rows of the input-embedding matrix rounded to
    bfloat16 (so float32 and bfloat16 copies of one checkpoint agree; a differently initialised or
    trained model of the same shape does not)."""
    import torch

    base = _base_of(model)
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


def _model_name(model: Any) -> str:
    base = _base_of(model)
    return str(getattr(base, "name_or_path", "") or getattr(base.config, "_name_or_path", "") or "")


# --------------------------------------------------------------------------- configs
def _check_number(name: str, value: Any, *, low: float, low_ok: bool = False, high: Optional[float] = None,
                  high_ok: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise AdapterError(f"{name} must be a number, got {value!r}") from None
    ok = math.isfinite(v) and (v >= low if low_ok else v > low)
    if high is not None:
        ok = ok and (v <= high if high_ok else v < high)
    if not ok:
        rng = f"{'[' if low_ok else '('}{low:g}, {'∞' if high is None else f'{high:g}'}{']' if high_ok else ')'}"
        raise AdapterError(f"{name} = {value!r} is outside {rng}")
    return v


def _gelora_ranks_for(model: Any, targets: Sequence[str], layer_ranks: Any, from_plan: bool) -> list[int]:
    from .gelora import target_layers

    if layer_ranks is None:
        raise AdapterError("GeLoRA needs per-block ranks: pass layer_ranks (one rank per block, e.g. from "
                           "adapters.gelora.gelora_ranks) or build from an AdapterPlan (adapters.plan_adapters)")
    if isinstance(layer_ranks, Mapping):
        return [int(layer_ranks[k]) for k in sorted(layer_ranks, key=int)]
    ranks = list(layer_ranks)
    blocks = list(target_layers(_base_of(model), targets))
    if len(ranks) != len(blocks):
        msg = (f"{len(ranks)} layer ranks for a model whose targets sit in {len(blocks)} blocks; give one "
               "rank per block")
        if from_plan:
            raise PlanError(f"the plan cannot be met: {msg} (the plan was made for another model or "
                            "profile; re-plan with this model's profile)")
        raise AdapterError(msg)
    return ranks


def _lora_kwargs(model: Any, dropout: float) -> dict[str, Any]:
    kw: dict[str, Any] = {"lora_dropout": dropout}
    if _is_causal(model):
        kw["task_type"] = "CAUSAL_LM"
    return kw


def _make_config(model: Any, spec: AdapterSpec):
    """The PEFT config for ``spec`` (custom layers registered)."""
    from peft import LoraConfig

    from .gelora import gelora_config
    from .hydralora import hydralora_config
    from .hyplora import register_hyplora

    method = spec.method
    kw = _lora_kwargs(model, spec.dropout)
    if "gelora" in method:
        cfg = gelora_config(_base_of(model), spec.layer_ranks, target_modules=spec.target_modules,
                            alpha_over_r=spec.alpha / spec.r, **kw)
        if method == "gelora":
            return cfg
        if method == "hyplora+gelora":
            return register_hyplora(cfg, curvature=spec.curvature, curvature_pattern=spec.curvature_pattern,
                                    official=spec.official)
        return hydralora_config(
            r=cfg.r, alpha=cfg.lora_alpha, n_heads=spec.n_heads, target_modules=list(spec.target_modules),
            top_k=spec.top_k, balance=spec.balance, rank_pattern=dict(cfg.rank_pattern),
            alpha_pattern=dict(cfg.alpha_pattern),
            exclude_modules=sorted(cfg.exclude_modules) if cfg.exclude_modules else None, **kw)
    if method == "lora":
        try:
            return LoraConfig(r=spec.r, lora_alpha=spec.alpha, target_modules=list(spec.target_modules), **kw)
        except (TypeError, ValueError) as exc:
            raise AdapterError(f"invalid LoRA settings: {exc}") from None
    if method == "hyplora":
        from .hyplora import hyplora_config

        return hyplora_config(spec.r, spec.alpha, list(spec.target_modules), spec.curvature,
                              curvature_pattern=spec.curvature_pattern, official=spec.official, **kw)
    if method == "hydralora":
        return hydralora_config(r=spec.r, alpha=spec.alpha, n_heads=spec.n_heads,
                                target_modules=list(spec.target_modules), top_k=spec.top_k,
                                balance=spec.balance, **kw)
    raise AdapterError(f"unknown adapter method {method!r}; use one of {', '.join(METHODS)}")


def build(model: Any, plan_or_method: Union[str, AdapterPlan], *, r: int = 32, alpha: Optional[float] = None,
          target_modules: Union[None, str, Sequence[str]] = None, curvature: Optional[float] = None,
          n_heads: Optional[int] = None, layer_ranks: Union[None, Sequence[int], Mapping[int, int]] = None,
          dropout: float = 0.05, top_k: Optional[int] = None, balance: bool = False,
          official: bool = False, curvature_pattern: Optional[Mapping[str, float]] = None,
          base_name: Optional[str] = None):
    """Wrap ``model`` (any causal LM or encoder; it is modified in place, as ``get_peft_model`` does)
    in a PEFT model with the adapters of ``plan_or_method``.

    Args:
        model: the base model (not a PeftModel).
        plan_or_method: one of :data:`METHODS`, or an :class:`AdapterPlan` (``auto``): its method, r,
            alpha, target modules, curvature, layer ranks and heads are used; ``target_modules``,
            ``curvature``, ``n_heads`` and ``layer_ranks`` given here override the plan's.
        r, alpha: rank and scale numerator; α defaults to 2r for every method (equal α/r).
        target_modules: module names (dotted suffixes, PEFT's rule); default from the model's names.
        curvature: HypLoRA's initial K (default 1.0); HypLoRA methods only.
        n_heads, top_k, balance: HydraLoRA's heads (default 4), top-k gates and load balancing.
        layer_ranks: GeLoRA's one rank per block (0 leaves a block out); GeLoRA methods only.
        dropout: LoRA dropout on the adapter's input.
        official, curvature_pattern: HypLoRA's reference-code formula and per-module initial K.
        base_name: name of the base model recorded in the sidecar (default: its ``name_or_path``).

    Raises:
        AdapterError: unknown method or targets, settings that do not apply to the method, a PeftModel.
        PlanError: a plan whose ranks do not fit this model.
    """
    from peft import get_peft_model

    if _is_peft(model):
        raise AdapterError("the model already carries PEFT adapters; pass the base model (or "
                           "peft_model.unload() first)")
    plan: Optional[AdapterPlan] = None
    if isinstance(plan_or_method, AdapterPlan):
        plan = plan_or_method
        method = plan.method
        r, alpha = plan.r, plan.alpha
        target_modules = target_modules if target_modules is not None else list(plan.target_modules)
        curvature = curvature if curvature is not None else plan.curvature
        n_heads = n_heads if n_heads is not None else plan.n_heads
        layer_ranks = layer_ranks if layer_ranks is not None else plan.layer_ranks
    elif isinstance(plan_or_method, str):
        method = plan_or_method.strip().lower()
        if method == "auto":
            raise AdapterError("'auto' builds what a plan says: pass the AdapterPlan from "
                               "adapters.plan_adapters(profile, ...) (or AdapterPlan.load(file)) instead of 'auto'")
        if method not in METHODS:
            raise AdapterError(f"unknown adapter method {plan_or_method!r}; use one of "
                               f"{', '.join(METHODS)} or an AdapterPlan")
        for given, name, applies in ((curvature, "curvature", "hyplora"), (n_heads, "n_heads", "hydralora"),
                                     (layer_ranks, "layer_ranks", "gelora"), (top_k, "top_k", "hydralora")):
            if given is not None and applies not in method:
                raise AdapterError(f"{name} applies to {applies} methods only, not to {method!r}; drop it")
    else:
        raise AdapterError("plan_or_method must be a method name or an AdapterPlan, got "
                           f"{type(plan_or_method).__name__}")

    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterError(f"rank r must be a positive integer, got {r!r}")
    alpha_v = 2.0 * r if alpha is None else _check_number("alpha", alpha, low=0.0)
    dropout_v = _check_number("dropout", dropout, low=0.0, low_ok=True, high=1.0)
    targets = _resolve_targets(model, target_modules)

    ranks: Optional[list[int]] = None
    if "gelora" in method:
        ranks = _gelora_ranks_for(model, targets, layer_ranks, from_plan=plan is not None)
    k0: Optional[float] = None
    if "hyplora" in method:
        k0 = _check_number("curvature", DEFAULT_CURVATURE if curvature is None else curvature, low=1e-6)
    heads: Optional[int] = None
    if "hydralora" in method:
        heads = DEFAULT_HEADS if n_heads is None else n_heads
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
            raise AdapterError(f"n_heads must be a positive integer, got {heads!r}")

    spec = AdapterSpec(
        method=method, r=int(r), alpha=float(alpha_v), target_modules=list(targets), dropout=float(dropout_v),
        curvature=k0, curvature_pattern=dict(curvature_pattern or {}) if k0 is not None else {},
        official=bool(official) if k0 is not None else False, n_heads=heads,
        top_k=top_k if heads is not None else None, balance=bool(balance) if heads is not None else False,
        layer_ranks=ranks, plan=plan.to_dict() if plan is not None else None,
        base_model=base_name if base_name is not None else _model_name(model),
        fingerprint=base_fingerprint(model), versions=runtime.versions())
    config = _make_config(model, spec)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:  # PEFT's own checks (e.g. targets it cannot adapt)
        raise AdapterError(f"PEFT refused the {method} config: {str(exc).splitlines()[0]}") from None
    n_train = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    _attach(peft_model, replace(spec, trainable_parameters=int(n_train)))
    log.info("built %s adapters on %d target names (%s): %d trainable parameters", method, len(targets),
             ", ".join(targets), n_train)
    return peft_model


# --------------------------------------------------------------------------- attach / inspect
def _attach(peft_model: Any, spec: AdapterSpec) -> None:
    """Remember the spec on the model and make its ``save_pretrained`` write the sidecar too."""
    object.__setattr__(peft_model, _SPEC_ATTR, spec)
    cls_save = type(peft_model).save_pretrained

    def save_pretrained(self, save_directory, *args: Any, **kwargs: Any) -> None:
        cls_save(self, save_directory, *args, **kwargs)
        selected = kwargs.get("selected_adapters") or (args[1] if len(args) > 1 else None)
        if selected is None or "default" in selected:
            _write_sidecar(Path(save_directory), adapter_spec(self))

    object.__setattr__(peft_model, "save_pretrained", types.MethodType(save_pretrained, peft_model))


def adapter_spec(peft_model: Any) -> AdapterSpec:
    """The :class:`AdapterSpec` of a model returned by :func:`build` or :func:`load`."""
    spec = getattr(peft_model, "__dict__", {}).get(_SPEC_ATTR)
    if spec is None:
        raise AdapterError("this model was not built by adapters.build or loaded by adapters.load, so its "
                           "method and base model are unknown; build it with adapters.build(...)")
    return spec


def _write_sidecar(folder: Path, spec: AdapterSpec) -> None:
    write_json(folder / SIDECAR, {"schema": SIDECAR_SCHEMA, "schema_version": SIDECAR_VERSION, **spec.to_dict()})


# --------------------------------------------------------------------------- save
def save(peft_model: Any, path: Union[str, os.PathLike]) -> Path:
    """Write the adapter (PEFT's files + ``geoprobe_adapter.json``) to the folder ``path`` atomically.

    The files go to a temporary folder beside ``path`` that is renamed into place; an existing
    adapter folder at ``path`` is replaced only once the new one is complete.

    Raises:
        AdapterError: the model was not built by :func:`build`/:func:`load`.
        OutputError: ``path`` is a file or cannot be written.
    """
    spec = adapter_spec(peft_model)
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise OutputError(f"cannot save the adapter to {target}: it is a file; give a folder name")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None
    try:
        write_adapter(peft_model, tmp)
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved %s adapter to %s", spec.method, target)
    return target


def write_adapter(peft_model: Any, folder: Union[str, os.PathLike]) -> Path:
    """Write PEFT's files and the sidecar of the ``default`` adapter into ``folder`` (not atomic by
    itself: :func:`save` and the training checkpoints call it on a temporary folder)."""
    spec = adapter_spec(peft_model)
    if "default" not in getattr(peft_model, "peft_config", {}):
        raise AdapterError("only the adapter named 'default' can be saved with its sidecar; this model holds "
                           f"{sorted(peft_model.peft_config)}")
    folder = Path(folder)
    type(peft_model).save_pretrained(peft_model, str(folder), selected_adapters=["default"])
    _write_sidecar(folder, spec)
    return folder


def _replace_dir(src: Path, target: Path) -> None:
    """Rename the complete folder ``src`` onto ``target``; an old ``target`` is moved aside first and
    deleted afterwards, so ``target`` is at every moment either the old or the new complete folder
    (or briefly absent), never a mixture."""
    if target.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, trash / target.name)
        os.replace(src, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, target)


# --------------------------------------------------------------------------- load
def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"cannot read {what} {path}: {exc}") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{what} {path} is not a JSON object")
    return data


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


def _kind_of_weights(keys: Sequence[str], raw_config: Mapping[str, Any]) -> Optional[str]:
    if any(".lora_hyp_" in k for k in keys):
        return "HypLoRA"
    if any(".lora_hydra_" in k for k in keys) or "hydra_heads" in raw_config:
        return "HydraLoRA"
    return None


def _spec_from_sidecar(folder: Path) -> AdapterSpec:
    raw = _read_json(folder / SIDECAR, "adapter sidecar")
    if raw.get("schema") != SIDECAR_SCHEMA:
        raise AdapterError(f"{folder / SIDECAR} is not a geoprobe adapter sidecar (no \"schema\": "
                           f"\"{SIDECAR_SCHEMA}\")")
    if raw.get("schema_version") != SIDECAR_VERSION:
        raise AdapterError(f"{folder / SIDECAR} has schema version {raw.get('schema_version')!r}; this "
                           f"geoprobe reads version {SIDECAR_VERSION}")
    body = {k: v for k, v in raw.items() if k not in ("schema", "schema_version")}
    try:
        spec = AdapterSpec.from_dict(body)
    except Exception as exc:
        raise AdapterError(f"{folder / SIDECAR} is malformed: {exc}") from None
    if spec.method not in METHODS:
        raise AdapterError(f"{folder / SIDECAR} names an unknown method {spec.method!r}")
    return spec


def load(model: Any, path: Union[str, os.PathLike], *, adapter_name: str = "default",
         is_trainable: bool = False):
    """Load an adapter folder written by :func:`save` onto the base ``model`` and return the PeftModel.

    The sidecar says which layer to register (HypLoRA, HydraLoRA or none) before
    ``PeftModel.from_pretrained(model, path, config=cfg)``; the weights restore the adapter exactly.
    A plain LoRA folder written by stock PEFT (no sidecar, no custom weights) loads as LoRA, without
    the base-model check.

    Raises:
        AdapterError: no adapter at ``path``; HypLoRA/HydraLoRA weights without the sidecar (they
            would silently load as plain LoRA); a sidecar whose base-model fingerprint differs from
            ``model``'s; weights that do not fit the model.
    """
    from peft import LoraConfig, PeftModel

    folder = Path(path)
    if _is_peft(model):
        raise AdapterError("load needs the base model, not a PeftModel (call peft_model.unload() first)")
    if not folder.is_dir():
        raise AdapterError(f"adapter folder {folder} does not exist")
    raw_cfg = _read_json(folder / "adapter_config.json", "adapter config")
    keys = _weight_keys(folder)
    kind = _kind_of_weights(keys, raw_cfg)
    if not (folder / SIDECAR).is_file():
        if kind is not None:
            raise AdapterError(
                f"{folder} holds {kind} weights but no {SIDECAR}: PEFT alone would build plain LoRA layers "
                "from it and give different outputs. Restore the sidecar (adapters.save writes it) or "
                "re-save the adapter with adapters.save")
        log.warning("%s has no %s: loading it as plain LoRA without checking the base model", folder, SIDECAR)
        spec = AdapterSpec(method="lora", r=int(raw_cfg.get("r", 0) or 0),
                           alpha=float(raw_cfg.get("lora_alpha", 0) or 0),
                           target_modules=_as_list(raw_cfg.get("target_modules")),
                           dropout=float(raw_cfg.get("lora_dropout", 0.0) or 0.0),
                           base_model=str(raw_cfg.get("base_model_name_or_path") or ""),
                           fingerprint={}, versions=runtime.versions())
        config = None
    else:
        spec = _spec_from_sidecar(folder)
        diff = fingerprint_mismatch(spec.fingerprint, base_fingerprint(model))
        if diff:
            raise AdapterError(
                f"adapter {folder} was trained on another base model ({spec.base_model or 'unnamed'}): "
                + "; ".join(diff) + ". Load it onto the model it was trained on")
        expected = "HypLoRA" if "hyplora" in spec.method else "HydraLoRA" if "hydralora" in spec.method else None
        if kind != expected:
            raise AdapterError(f"{folder}: the sidecar says {spec.method} but the weights are "
                               f"{kind or 'plain LoRA'}; the folder was altered — re-save the adapter")
        if "hydralora" in spec.method:
            from .hydralora import HydraLoraConfig

            known = {f for f in HydraLoraConfig.__dataclass_fields__ if HydraLoraConfig.__dataclass_fields__[f].init}
            try:
                config = HydraLoraConfig(**{k: v for k, v in raw_cfg.items() if k in known})
            except (TypeError, ValueError) as exc:
                raise AdapterError(f"{folder}/adapter_config.json does not fit HydraLoRA: {exc}") from None
        else:
            try:
                config = LoraConfig.from_pretrained(str(folder))
            except (TypeError, ValueError) as exc:
                raise AdapterError(f"{folder}/adapter_config.json is not a LoRA config: {exc}") from None
            if "hyplora" in spec.method:
                from .hyplora import register_hyplora

                config = register_hyplora(config, curvature=spec.curvature or DEFAULT_CURVATURE,
                                 curvature_pattern=spec.curvature_pattern, official=spec.official)
    try:
        peft_model = PeftModel.from_pretrained(model, str(folder), adapter_name=adapter_name,
                                               is_trainable=is_trainable, config=config)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise AdapterError(f"cannot load the adapter {folder} onto this model: "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    _check_all_loaded(peft_model, keys, folder, adapter_name)
    n_train = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    _attach(peft_model, replace(spec, trainable_parameters=int(n_train)))
    log.info("loaded %s adapter from %s", spec.method, folder)
    return peft_model


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else sorted(value)


def check_adapter_state(peft_model: Any, keys: Sequence[str], folder: Path, adapter_name: str = "default") -> None:
    """Raise :class:`AdapterError` unless the tensor names ``keys`` of an adapter file are exactly the
    adapter tensors of ``peft_model``."""
    _check_all_loaded(peft_model, keys, folder, adapter_name)


def _check_all_loaded(peft_model: Any, keys: Sequence[str], folder: Path, adapter_name: str) -> None:
    """Every tensor of the file has a home in the model and every adapter tensor came from the file."""
    from peft.utils import get_peft_model_state_dict

    have = set(get_peft_model_state_dict(peft_model, adapter_name=adapter_name))
    saved = set(keys)
    if have != saved:
        missing, extra = sorted(have - saved), sorted(saved - have)
        raise AdapterError(
            f"adapter {folder} does not fit this model: {len(missing)} adapter tensors have no weights in "
            f"the file (e.g. {missing[:2]}) and {len(extra)} file tensors have no place (e.g. {extra[:2]})")


# --------------------------------------------------------------------------- ``adapters.build(...)``
class _CallableModule(types.ModuleType):
    """``adapters.build`` names both this module and its :func:`build` function; importing the
    submodule rebinds the package attribute to the module, so the module itself forwards calls to
    :func:`build` and ``adapters.build(model, ...)`` works either way."""

    def __call__(self, *args: Any, **kwargs: Any):
        return build(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
