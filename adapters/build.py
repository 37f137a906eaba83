"""From a plan or a method name to a PEFT model.

The methods are those of :mod:`adapters.registry` (METHODS.md §5–8): ``lora``, ``dora``, ``hyplora``, ``gelora``,
``hydralora``, ``hyplora+gelora``, ``hydralora+gelora``; an :class:`~adapters.plan.AdapterPlan` (what
``auto`` means) gives the plan's method, r, α, targets, curvature, ranks and heads. Each method's
settings go into its PEFT config: LoRA's ``LoraConfig`` (DoRA's with ``use_dora=True``, the method's
registered options); GeLoRA's per-block ranks as ``rank_pattern``/
``alpha_pattern`` with α_j/r_j = α/r in every block; HypLoRA's initial curvature K (default 1, the
paper's best) in :class:`~adapters.hyplora.HypLoraConfig`; HydraLoRA's N heads (default 4, the paper's
setting) in :class:`~adapters.hydralora.HydraLoraConfig`.

α defaults to 2r for every method, so α/r — the scale of the update — is the same whichever method is
compared. Default targets are found from the model's module names: attention q, k, v and MLP up, down
(``q_proj k_proj v_proj up_proj down_proj``) in Llama-like models; ``query key value`` and the
``dense`` layers inside the encoder blocks in BERT-like encoders (the pooler's ``dense`` sits outside
the blocks and is left alone). Saving and loading are in :mod:`adapters.io`.

The PEFT task type follows the model: ``CAUSAL_LM`` for causal LMs; ``SEQ_CLS`` for a
sequence-classification model (an encoder with a classification head), whose head (``classifier`` in
BERT-style models, found as the modules beside the base model) is trained in full and saved with the
adapter through PEFT's ``modules_to_save``.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

from geoprobe.errors import AdapterError, PlanError
from geoprobe.models import head_module_names, is_causal_lm, is_sequence_classifier

from . import registry
from .io import attach, base_fingerprint, base_of, is_peft, model_name, spec_for
from .plan import AdapterPlan
from .registry import Method

log = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "LLAMA_TARGETS",
    "BERT_TARGETS",
    "Settings",
    "build",
    "check_options",
    "OPTION_FLAGS",
    "default_targets",
    "linear_module_names",
    "unload",
    "head_parameter_count",
]

METHODS = registry.names()
"""The method names (from :mod:`adapters.registry`)."""
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
BERT_TARGETS = ("query", "key", "value", "dense")
DEFAULT_HEADS = 4
DEFAULT_CURVATURE = 1.0
_BLOCK_PART = re.compile(r"^\d+$")
_PART_OPTIONS = (("curvature", "hyplora"), ("n_heads", "hydralora"), ("layer_ranks", "gelora"),
                 ("top_k", "hydralora"), ("scale_matched", "hyplora"))


# --------------------------------------------------------------------------- model inspection
def _is_linear(module: Any) -> bool:
    import torch.nn as nn

    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def linear_module_names(model: Any) -> list[str]:
    """Full names of the model's linear layers (``nn.Linear`` and GPT-2's ``Conv1D``)."""
    return [name for name, m in base_of(model).named_modules() if name and _is_linear(m)]


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


def resolve_targets(model: Any, target_modules: Union[None, str, Sequence[str]]) -> list[str]:
    if target_modules is None:
        return list(default_targets(model))
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise AdapterError(f"{_label('target_modules')} must be a non-empty list of module names, got "
                           f"{target_modules!r}")
    names = linear_module_names(model)
    missing = [t for t in targets if not any(_matches(n, t) for n in names)]
    if missing:
        raise _unknown_targets_error(model, missing)
    return list(dict.fromkeys(targets))


# --------------------------------------------------------------------------- settings
OPTION_FLAGS = {"r": "--r", "alpha": "--alpha", "dropout": "--dropout", "n_heads": "--n-heads",
                "curvature": "--curvature", "target_modules": "--target-modules"}
"""The command-line flag of each build option that has one; messages name the flag first."""


def _label(name: str) -> str:
    """``--flag (name)`` for an option with a flag, else the option's name."""
    if name not in OPTION_FLAGS:
        return name
    return f"{OPTION_FLAGS[name]} ({'rank r' if name == 'r' else name})"


def _check_number(name: str, value: Any, *, low: float, low_ok: bool = False, high: Optional[float] = None,
                  high_ok: bool = False) -> float:
    if isinstance(value, bool):
        raise AdapterError(f"{_label(name)} must be a number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise AdapterError(f"{_label(name)} must be a number, got {value!r}") from None
    ok = math.isfinite(v) and (v >= low if low_ok else v > low)
    if high is not None:
        ok = ok and (v <= high if high_ok else v < high)
    if not ok:
        rng = f"{'[' if low_ok else '('}{low:g}, {'∞' if high is None else f'{high:g}'}{']' if high_ok else ')'}"
        raise AdapterError(f"{_label(name)} = {value!r} is outside {rng}")
    return v


def _check_int(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise AdapterError(f"{_label(name)} must be an integer ≥ {low}, got {value!r}")
    return value


def check_options(method: str, *, r: Any = 32, alpha: Any = None, dropout: Any = 0.05, n_heads: Any = None,
                  curvature: Any = None) -> None:
    """Check the build options' values, and that each applies to ``method`` (any method for
    ``auto``, whose plan is not made yet), before a model is loaded; :func:`build` checks them again
    with the model. Raises AdapterError naming the flag."""
    _check_int("r", r)
    if alpha is not None:
        _check_number("alpha", alpha, low=0.0)
    _check_number("dropout", dropout, low=0.0, low_ok=True, high=1.0)
    if n_heads is not None:
        _check_int("n_heads", n_heads)
    if curvature is not None:
        _check_number("curvature", curvature, low=1e-6)
    if method != registry.AUTO:
        chosen = registry.get(method)
        for name, part in _PART_OPTIONS:
            value = {"n_heads": n_heads, "curvature": curvature}.get(name)
            if value is not None and not chosen.includes(part):
                raise AdapterError(f"{_label(name)} applies to {part} methods only, not to {chosen.name!r}; "
                                   "drop it")


def _gelora_ranks_for(model: Any, targets: Sequence[str], layer_ranks: Any, from_plan: bool) -> list[int]:
    from .gelora import target_layers

    if layer_ranks is None:
        raise AdapterError("GeLoRA needs per-block ranks: pass layer_ranks (one rank per block, e.g. from "
                           "adapters.gelora.gelora_ranks) or build from an AdapterPlan (adapters.plan_adapters)")
    if isinstance(layer_ranks, Mapping):
        return [int(layer_ranks[k]) for k in sorted(layer_ranks, key=int)]
    ranks = list(layer_ranks)
    blocks = list(target_layers(base_of(model), targets))
    if len(ranks) != len(blocks):
        msg = (f"{len(ranks)} layer ranks for a model whose targets sit in {len(blocks)} blocks; give one "
               "rank per block")
        if from_plan:
            raise PlanError(f"the plan cannot be met: {msg} (the plan was made for another model or "
                            "profile; re-plan with this model's profile)")
        raise AdapterError(msg)
    return ranks


@dataclass(frozen=True)
class Settings:
    """What :func:`build` was asked for, checked: the method, the LoRA settings every method shares and
    the options of the method's parts (None where a part is absent)."""

    method: Method
    r: int
    alpha: float
    targets: list[str]
    dropout: float
    task_type: Optional[str]
    curvature: Optional[float] = None
    curvature_pattern: dict[str, float] = field(default_factory=dict)
    official: bool = False
    scale_matched: bool = False
    n_heads: Optional[int] = None
    top_k: Optional[int] = None
    balance: bool = False
    layer_ranks: Optional[list[int]] = None
    modules_to_save: Optional[list[str]] = None


def _task(model: Any) -> tuple[Optional[str], Optional[list[str]]]:
    """PEFT's task type for ``model`` and the modules trained in full beside the adapters: the head of
    a sequence classifier (``SEQ_CLS``), nothing for a causal LM (``CAUSAL_LM``) or a bare model."""
    if is_sequence_classifier(model):
        head = head_module_names(base_of(model))
        if not head:
            raise AdapterError(f"{type(base_of(model)).__name__} is a sequence classifier without a head module "
                               "to train beside the adapters")
        return "SEQ_CLS", head
    return ("CAUSAL_LM" if is_causal_lm(model) else None), None


def _lora_config(s: Settings, model: Any):
    """LoRA's config, with GeLoRA's per-block ranks where the method includes GeLoRA."""
    from peft import LoraConfig

    kw: dict[str, Any] = {"lora_dropout": s.dropout, "task_type": s.task_type,
                          "modules_to_save": s.modules_to_save}
    if s.method.includes("gelora"):
        from .gelora import gelora_config

        return gelora_config(base_of(model), s.layer_ranks, target_modules=s.targets,
                             alpha_over_r=s.alpha / s.r, **kw)
    try:
        return LoraConfig(r=s.r, lora_alpha=s.alpha, target_modules=list(s.targets), **kw, **dict(s.method.options))
    except (TypeError, ValueError) as exc:
        raise AdapterError(f"invalid LoRA settings: {exc}") from None


def make_config(s: Settings, model: Any):
    """The PEFT config of the method (its config class, registered layers): LoRA's settings first,
    then the layer method's own options on top."""
    cfg = _lora_config(s, model)
    if s.method.includes("hyplora"):
        from .hyplora import register_hyplora

        if s.scale_matched:
            cfg.alpha_pattern = _matched_alphas(model, s)

        return register_hyplora(cfg, curvature=s.curvature, curvature_pattern=s.curvature_pattern,
                                official=s.official)
    if s.method.includes("hydralora"):
        from .hydralora import hydralora_config

        return hydralora_config(
            r=cfg.r, alpha=cfg.lora_alpha, n_heads=s.n_heads, target_modules=list(s.targets), top_k=s.top_k,
            balance=s.balance, rank_pattern=dict(cfg.rank_pattern), alpha_pattern=dict(cfg.alpha_pattern),
            exclude_modules=sorted(cfg.exclude_modules) if cfg.exclude_modules else None,
            lora_dropout=s.dropout, task_type=s.task_type, modules_to_save=s.modules_to_save)
    return cfg


def _matched_alphas(model: Any, s: Settings) -> dict[str, float]:
    """HypLoRA's scale-matched α per target (:func:`adapters.hyplora.functional.matched_alpha`): one
    entry per target name where its layers share d_in, else one per module (its full name)."""
    from .gelora import target_layers
    from .hyplora.functional import matched_alpha

    layers = [(name, d_in) for mods in target_layers(base_of(model), s.targets).values() for name, d_in, _ in mods]
    pattern: dict[str, float] = {}
    for target in s.targets:
        mine = [(name, d_in) for name, d_in in layers if name == target or name.endswith("." + target)]
        if len({d_in for _, d_in in mine}) == 1:
            pattern[target] = matched_alpha(s.alpha, mine[0][1])
        else:
            pattern.update({name: matched_alpha(s.alpha, d_in) for name, d_in in mine})
    return pattern


def _request(plan_or_method: Union[str, AdapterPlan], options: dict[str, Any]) -> tuple[Method, Optional[AdapterPlan]]:
    """The method and plan asked for; a plan's r, α, targets, curvature, heads and ranks fill the
    ``options`` not given explicitly (in place)."""
    if isinstance(plan_or_method, AdapterPlan):
        plan = plan_or_method
        options["r"], options["alpha"] = plan.r, plan.alpha
        for name, value in (("target_modules", list(plan.target_modules)), ("curvature", plan.curvature),
                            ("n_heads", plan.n_heads), ("layer_ranks", plan.layer_ranks)):
            if options.get(name) is None:
                options[name] = value
        return registry.get(plan.method), plan
    if not isinstance(plan_or_method, str):
        raise AdapterError("plan_or_method must be a method name or an AdapterPlan, got "
                           f"{type(plan_or_method).__name__}")
    if plan_or_method.strip().lower() == registry.AUTO:
        raise AdapterError("'auto' builds what a plan says: pass the AdapterPlan from "
                           "adapters.plan_adapters(profile, ...) (or AdapterPlan.load(file)) instead of 'auto'")
    try:
        method = registry.get(plan_or_method)
    except AdapterError:
        raise AdapterError(f"unknown adapter method {plan_or_method!r}; use one of "
                           f"{', '.join(METHODS)} or an AdapterPlan") from None
    for name, part in _PART_OPTIONS:
        if options.get(name) is not None and not method.includes(part):
            raise AdapterError(f"{_label(name)} applies to {part} methods only, not to {method.name!r}; drop it")
    return method, None


def _settings(model: Any, method: Method, plan: Optional[AdapterPlan], o: dict[str, Any]) -> Settings:
    """Check the options and resolve the defaults (α = 2r, targets from the module names, K = 1, N = 4)."""
    r = _check_int("r", o["r"])
    alpha = 2.0 * r if o["alpha"] is None else _check_number("alpha", o["alpha"], low=0.0)
    dropout = _check_number("dropout", o["dropout"], low=0.0, low_ok=True, high=1.0)
    targets = resolve_targets(model, o["target_modules"])
    task_type, head = _task(model)
    s = Settings(method=method, r=int(r), alpha=float(alpha), targets=list(targets), dropout=float(dropout),
                 task_type=task_type, modules_to_save=head)
    extra: dict[str, Any] = {}
    if method.includes("gelora"):
        extra["layer_ranks"] = _gelora_ranks_for(model, targets, o["layer_ranks"], from_plan=plan is not None)
    if method.includes("hyplora"):
        k0 = DEFAULT_CURVATURE if o["curvature"] is None else o["curvature"]
        extra.update(curvature=_check_number("curvature", k0, low=1e-6), official=bool(o["official"]),
                     curvature_pattern=dict(o["curvature_pattern"] or {}), scale_matched=bool(o["scale_matched"]))
        if o["scale_matched"] and method.parts != ("hyplora",):
            raise AdapterError(f"scale-matched α applies to plain hyplora only, not to {method.name!r} (its "
                               "per-block α already comes from the plan)")
    if method.includes("hydralora"):
        heads = _check_int("n_heads", DEFAULT_HEADS if o["n_heads"] is None else o["n_heads"])
        extra.update(n_heads=heads, top_k=o["top_k"], balance=bool(o["balance"]))
    return Settings(**{**s.__dict__, **extra})


def build(model: Any, plan_or_method: Union[str, AdapterPlan], *, r: int = 32, alpha: Optional[float] = None,
          target_modules: Union[None, str, Sequence[str]] = None, curvature: Optional[float] = None,
          n_heads: Optional[int] = None, layer_ranks: Union[None, Sequence[int], Mapping[int, int]] = None,
          dropout: float = 0.05, top_k: Optional[int] = None, balance: bool = False,
          official: bool = False, curvature_pattern: Optional[Mapping[str, float]] = None,
          scale_matched: bool = False, base_name: Optional[str] = None):
    """Wrap ``model`` (any causal LM or encoder; it is modified in place, as ``get_peft_model`` does)
    in a PEFT model with the adapters of ``plan_or_method``.

    Args:
        model: the base model (not a PeftModel).
        plan_or_method: a method name of :mod:`adapters.registry`, or an :class:`AdapterPlan` (``auto``):
            its method, r, alpha, target modules, curvature, layer ranks and heads are used;
            ``target_modules``, ``curvature``, ``n_heads`` and ``layer_ranks`` given here override the plan's.
        r, alpha: rank and scale numerator; α defaults to 2r for every method (equal α/r).
        target_modules: module names (dotted suffixes, PEFT's rule); default from the model's names.
        curvature: HypLoRA's initial K (default 1.0); HypLoRA methods only.
        n_heads, top_k, balance: HydraLoRA's heads (default 4), top-k gates and load balancing.
        layer_ranks: GeLoRA's one rank per block (0 leaves a block out); GeLoRA methods only.
        dropout: LoRA dropout on the adapter's input.
        official, curvature_pattern: HypLoRA's reference-code formula and per-module initial K.
        scale_matched: HypLoRA with α·√d_in per layer (``alpha_pattern``), so that its small updates
            equal LoRA's for the same A and B (:func:`adapters.hyplora.functional.matched_alpha`);
            plain ``hyplora`` only.
        base_name: name of the base model recorded in the sidecar (default: its ``name_or_path``).

    Raises:
        AdapterError: unknown method or targets, settings that do not apply to the method, a PeftModel.
        PlanError: a plan whose ranks do not fit this model.
    """
    from peft import get_peft_model

    if is_peft(model):
        raise AdapterError("the model already carries PEFT adapters; pass the base model (or "
                           "peft_model.unload() first)")
    options = dict(r=r, alpha=alpha, target_modules=target_modules, curvature=curvature, n_heads=n_heads,
                   layer_ranks=layer_ranks, dropout=dropout, top_k=top_k, balance=balance, official=official,
                   curvature_pattern=curvature_pattern, scale_matched=True if scale_matched else None)
    method, plan = _request(plan_or_method, options)
    settings = _settings(model, method, plan, options)
    config = make_config(settings, model)
    fingerprint, name = base_fingerprint(model), base_name if base_name is not None else model_name(model)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:  # PEFT's own checks (e.g. targets it cannot adapt)
        raise AdapterError(f"PEFT refused the {method.name} config: {str(exc).splitlines()[0]}") from None
    n_train = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    attach(peft_model, spec_for(method.name, config, plan=plan.to_dict() if plan is not None else None,
                                base_model=name, fingerprint=fingerprint, trainable_parameters=n_train,
                                requested=dict(r=settings.r, alpha=settings.alpha, dropout=settings.dropout,
                                               target_modules=list(settings.targets))))
    log.info("built %s adapters on %d target names (%s): %d trainable parameters", method.name,
             len(settings.targets), ", ".join(settings.targets), n_train)
    return peft_model


def unload(peft_model: Any) -> Any:
    """Remove the adapters of ``peft_model`` (built by :func:`build`) and return the base model as it was
    before: PEFT's ``unload()`` leaves the trained copy of every ``modules_to_save`` module (a sequence
    classifier's head) in place of the original, so the next adapter built on the same base model would
    start from a trained head; here the original module, which training never touched, is put back."""
    from peft.utils import ModulesToSaveWrapper

    originals = [(name, module.original_module) for name, module in peft_model.get_base_model().named_modules()
                 if isinstance(module, ModulesToSaveWrapper)]
    base = peft_model.unload()
    for name, original in originals:
        parent, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent) if parent else base, child, original)
    return base


def head_parameter_count(model: Any) -> int:
    """Parameters of the task head that :func:`build` trains in full beside the adapters (PEFT
    ``modules_to_save``: a sequence classifier's head, e.g. BERT's ``classifier``, d·C + C for C classes
    on hidden size d); 0 for a causal LM or a bare model. ``model`` is the base model or the PeftModel built
    on it (whose head holds the original and its trained copy: one of them is counted)."""
    _, head = _task(model)
    base = base_of(model)
    modules = [getattr(base, name) for name in head or ()]
    return sum(p.numel() for m in modules for p in getattr(m, "original_module", m).parameters())
