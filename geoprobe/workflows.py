"""Workflows: probe → plan → build → fine-tune → evaluate → report as library calls.

What the ``geoprobe`` command does is available here in one call each, so a notebook can do the
same::

    import geoprobe as gp
    from geoprobe import workflows
    from adapters.data import load_examples

    lm = gp.load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    done = workflows.run(lm, load_examples("train.jsonl"), load_examples("test.jsonl"), out="runs/smol")
    done.accuracy, done.report_path

* :func:`plan_for_training`: an adapter plan for fine-tuning a model on a training set, from a given
  profile or from a quick probe of the training prompts (:func:`quick_probe_settings`).
* :func:`resolve_adapter`: the method name or the plan a fine-tune run uses (``--adapter``/``--plan``).
* :func:`load_for_data`: the model loaded for its data: an encoder on GLUE-style data gets a
  sequence-classification head (GeLoRA's own setting), a causal LM is loaded to generate; the pairings
  that cannot work (an encoder asked to generate, a classification head asked for data that needs
  generation, a causal LM asked for a classification head) are refused by :func:`check_head`.
* :func:`finetune_model` and :func:`evaluate_model`: fine-tune adapters / measure accuracy, for a
  :class:`~geoprobe.models.LoadedModel`: a causal LM by generation, an encoder with a classification
  head by its logits (PEFT ``SEQ_CLS``, the head trained beside the adapters and saved with them).

Causal LMs are not given classification heads: they learn GLUE by generating the label word (the
LLM-Adapters protocol of :mod:`adapters.evaluate`), so ``head="classification"`` with a causal LM is
refused with that advice.
* :func:`run`: all of it, ending in OUT/profile.json, OUT/report.html and a :class:`RunResult`.

This module and :mod:`geoprobe.cli` are the only parts of ``geoprobe`` that import ``adapters``; they
do so inside the functions, so ``import geoprobe`` stays light.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from .errors import AdapterError, DataFormatError, GeoprobeError, PlanError
from .profile import FinetuneResult, GeometryProfile
from .records import Record, display_path, read_json, write_json

log = logging.getLogger(__name__)

__all__ = ["HEADS", "classification_labels", "check_head", "load_for_data", "quick_probe_settings", "planning_texts", "plan_for_training", "plan_from_file", "check_plan_file", "resolve_adapter", "needs_plan",
           "build_options", "require_causal_lm", "check_out", "check_adapter_folder", "finetune_model",
           "evaluate_model", "evaluate_model_sets", "evaluation_record", "evaluation_sets_record",
           "read_evaluation", "RunResult", "run", "resolve_device", "native_device",
           "NativeBuild", "build_native", "launched_processes", "start_processes", "join_processes",
           "process_device", "resolve_adapter_together"]

PLAN_FILE = "plan.json"
PROFILE_FILE = "profile.json"
EVAL_FILE = "eval.json"
REPORT_FILE = "report.html"

PathLike = Union[str, os.PathLike]

HEADS = ("auto", "classification", "generation")
"""What a model is trained and evaluated as (``--head``): ``auto`` (a classification head for an encoder
on GLUE-style data, generation for a causal LM), ``classification`` or ``generation``."""


def resolve_device(name: Optional[str]) -> str:
    """``name`` after checking that this machine has it (:func:`geoprobe.models.check_device`), or
    ``cuda`` when a GPU is available and ``cpu`` otherwise."""
    if name:
        from .models import check_device

        return check_device(name)
    try:
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def check_quantization(quantize: Optional[str], device: Optional[str] = None) -> Optional[str]:
    """``--quantize`` checked before any load (:func:`geoprobe.models.quantize.check_quantization`: a known
    value, bitsandbytes installed, a CUDA device; ``device`` None is :func:`resolve_device`'s choice);
    the normalised value, or None for a full-precision base."""
    from .models.quantize import check_quantization as check

    return check(quantize, resolve_device(device)) if quantize is not None else None


def training_dtype(dtype: Any, quantize: Optional[str]) -> Any:
    """The dtype a model is loaded in for training or evaluation: ``dtype`` when given; else float32 (the
    trainer keeps float32 adapter weights under bfloat16 autocast), or bfloat16 for what stays unquantized
    of a 4-bit base (QLoRA's choice: the embeddings and heads in half the memory)."""
    from .models.quantize import DEFAULT_DTYPE

    if dtype is not None:
        return dtype
    return DEFAULT_DTYPE if quantize is not None else "float32"


def require_causal_lm(lm: Any, what: str) -> None:
    """Refuse an encoder: ``what`` (fine-tuning, evaluation, a run) generates answers."""
    from .models import is_causal_lm

    if not is_causal_lm(lm):
        kind = "an encoder" if lm.info.is_encoder else "not a causal language model"
        raise AdapterError(f"{what} needs a causal language model that generates answers; {lm.name} is "
                           f"{kind} ({lm.info.architecture}) and cannot generate. Encoders are fine-tuned and "
                           "evaluated with a classification head on GLUE-style TSV files (SST-2, CoLA, RTE, "
                           "MRPC); `geoprobe probe` measures any model")


def classification_labels(examples: Sequence[Any]) -> Optional[tuple[str, ...]]:
    """The label set when a classification head can learn ``examples`` (GLUE-style data: raw texts and
    one fixed label set, :func:`adapters.data.class_labels`); None when they need generation."""
    from adapters.data import class_labels

    try:
        return class_labels(examples)
    except DataFormatError:
        return None


def _check_head_name(head: str) -> None:
    if head not in HEADS:
        raise AdapterError(f"--head {head!r} is not one of {', '.join(HEADS)}")


def _task_name(examples: Sequence[Any]) -> str:
    names = sorted({getattr(ex, "task", "") or "this data" for ex in examples})
    return ", ".join(names[:3]) or "this data"


def check_head(lm: Any, examples: Sequence[Any], *, head: str = "auto", what: str = "fine-tuning") -> str:
    """Check that ``lm`` can be trained or evaluated on ``examples`` as ``head`` asks and return the
    protocol: ``classification`` (an encoder with a classification head, GLUE-style data) or
    ``generation`` (a causal LM).

    Raises:
        AdapterError: an encoder asked to generate (or for data that needs generation); a causal LM
            asked for a classification head (its GLUE route is generating the label word; on data that
            needs generation a head could not answer at all); a classifier whose number of classes
            differs from the data's label set; an encoder loaded without a head.
        DataFormatError: ``head="classification"`` on data that needs generation.
    """
    from adapters.data import class_labels

    from .models import is_causal_lm, is_sequence_classifier

    _check_head_name(head)
    task = _task_name(examples)
    labels = classification_labels(examples)
    if is_causal_lm(lm):
        if head == "classification":
            if labels is None:
                raise AdapterError(f"--head classification: {task} needs generation (its answers are written "
                                   "out, not picked from a label set), so a classification head cannot answer it; "
                                   f"drop --head classification and {lm.name} generates the answers")
            raise AdapterError(f"--head classification: {lm.name} is a causal language model; classification heads "
                               f"are trained on encoders (BERT, MiniLM). A causal LM learns {task} by generating "
                               "the label word: use --head auto or --head generation")
        return "generation"
    if head == "generation" or labels is None:
        why = "--head generation asks for generation" if head == "generation" else f"{task} needs generation"
        raise AdapterError(f"{what}: {why}, but {lm.name} is an encoder ({lm.info.architecture}) and cannot "
                           "generate answers. Encoders are fine-tuned and evaluated with a classification head "
                           "on GLUE-style TSV files (SST-2, CoLA, RTE, MRPC); use a causal LM for generation")
    if head == "classification":
        class_labels(examples, what="--data")
    if not is_sequence_classifier(lm.model):
        raise AdapterError(f"{what}: {lm.name} was loaded without a classification head; load it with "
                           f"num_labels={len(labels)} (workflows.load_for_data does)")
    n_classes = int(getattr(lm.model.config, "num_labels", 0))
    if n_classes != len(labels):
        raise AdapterError(f"{what}: the classification head of {lm.name} has {n_classes} classes but {task} has "
                           f"{len(labels)} labels ({', '.join(labels)})")
    return "classification"


def load_for_data(spec: Any, examples: Sequence[Any], *, head: str = "auto", what: str = "fine-tuning",
                  device: Optional[str] = None, dtype: Any = None, allow_pickle: bool = False,
                  trust_remote_code: bool = False, quantize: Optional[str] = None) -> Any:
    """Load the model ``spec`` (as :func:`geoprobe.load_model`) for training or evaluating on
    ``examples`` and check the pairing (:func:`check_head`) before anything is trained.

    An encoder gets a sequence-classification head with one class per label of the data when the data
    is GLUE-style (``AutoModelForSequenceClassification``; the head freshly initialised, trained beside
    the adapters); a causal LM is loaded as it is and generates. ``quantize="4bit"`` loads a QLoRA base
    (:func:`check_quantization`; every adapter method trains on it). Returns the
    :class:`~geoprobe.models.LoadedModel`.
    """
    from adapters.data import class_labels

    from .models import load_model

    _check_head_name(head)
    if head == "classification":
        class_labels(examples, what="--data")  # data that needs generation: refused before the load
    labels = classification_labels(examples) if head != "generation" else None
    lm = load_model(spec, device=resolve_device(device), dtype=dtype, allow_pickle=allow_pickle,
                    trust_remote_code=trust_remote_code, num_labels=len(labels) if labels else None,
                    quantize=quantize)
    check_head(lm, examples, head=head, what=what)
    return lm


def check_out(out: PathLike, resume: bool) -> Optional[Path]:
    """Check that a fine-tune folder may be used (see :func:`adapters.train.check_out`); the
    checkpoint to resume from, or None."""
    from adapters.train import check_out as check_train_out

    return check_train_out(out, resume)


# --------------------------------------------------------------------------- planning
def quick_probe_settings(n_prompts: int, seed: int = 0):
    """Small :class:`geoprobe.pipeline.ProbeSettings` for planning from training prompts (seconds on
    a CPU for a 135M model): ≤ 100 prompts for δ, 1,500 hidden-state positions per layer."""
    from .pipeline import ProbeSettings

    return ProbeSettings(seed=seed, n_prompts=max(2, min(100, n_prompts)), token_sample=500,
                         token_repeats=4, null_repeats=1, layer_positions=1500, max_length=128,
                         batch_size=8)


def _check_profile_matches(profile: GeometryProfile, info: Any) -> None:
    pm = profile.model
    if (pm.hidden_size, pm.n_layers, pm.vocab_size) != (info.hidden_size, info.n_layers, info.vocab_size):
        raise PlanError(
            f"the profile was measured on {pm.name} (hidden {pm.hidden_size}, {pm.n_layers} layers, "
            f"vocabulary {pm.vocab_size}), not on this model ({info.name}: hidden {info.hidden_size}, "
            f"{info.n_layers} layers, vocabulary {info.vocab_size}); probe this model")


def plan_for_training(lm: Any, examples: Sequence[Any], *, method: str = "auto", r: int = 32,
                      alpha: Optional[float] = None, target_modules: Optional[Sequence[str]] = None,
                      profile: Optional[GeometryProfile] = None, seed: int = 0, data_name: str = "training prompts",
                      progress: bool = False, device: Optional[str] = None, command: str = "",
                      max_embedded: int = 500) -> tuple[Any, GeometryProfile]:
    """Plan adapters for fine-tuning ``lm`` (a :class:`geoprobe.models.LoadedModel`) on ``examples``.

    Without ``profile``, the model is probed quickly (:func:`quick_probe_settings`) on the training
    prompts; HydraLoRA's number of heads comes from k-means on the mean-pooled last hidden states of
    up to ``max_embedded`` training prompts (:func:`geoprobe.hidden.prompt_embeddings`); GeLoRA's budget
    uses the model's parameters per rank. Returns the plan (an :class:`adapters.plan.AdapterPlan`)
    and the profile it was made from.

    Raises:
        PlanError: a profile measured on another model, or one without the model's layers.
    """
    from adapters import registry
    from adapters.build import resolve_targets
    from adapters.gelora import params_per_rank
    from adapters.plan import plan_adapters

    from .corpus import Corpus
    from .hidden import prompt_embeddings
    from .pipeline import probe

    prompts = planning_texts(lm, examples)
    if not prompts:
        raise DataFormatError("no training examples to plan from")
    if profile is None:
        corpus = Corpus.from_texts(prompts, name=data_name)
        profile = probe(lm, corpus, settings=quick_probe_settings(len(prompts), seed), progress=progress,
                        device=device, command=command, layers=True)
    else:
        _check_profile_matches(profile, lm.info)
    targets = resolve_targets(lm.model, target_modules)
    try:
        costs = params_per_rank(lm.model, targets)
    except AdapterError:
        costs = None
    emb = None
    if method == registry.AUTO or registry.get(method).includes("hydralora"):
        emb = prompt_embeddings(lm.model, lm.tokenizer, prompts, max_examples=max_embedded, seed=seed)
    plan = plan_adapters(profile, method=method, train_embeddings=emb, r=r, alpha=alpha,
                         target_modules=tuple(targets), params_per_rank=costs, seed=seed)
    log.info("adapter plan: %s (%s)", plan.method, plan.reasons.get("method", ""))
    return plan, profile


def planning_texts(lm: Any, examples: Sequence[Any]) -> list[str]:
    """The texts a planning probe of ``lm`` reads, one per example (:func:`_planning_text`); the
    before-and-after probe of a comparison reads the same."""
    return [_planning_text(ex, encoder=bool(lm.info.is_encoder)) for ex in examples]


def _planning_text(ex: Any, *, encoder: bool) -> str:
    """The text a planning probe reads for one example: the raw sentence (pair) an encoder classifies,
    else the instruction with its input."""
    if encoder and getattr(ex, "texts", ()):
        return "\n".join(ex.texts)
    return ex.prompt + (("\n" + ex.input) if ex.input else "")


def needs_plan(method: str) -> bool:
    """Whether ``method`` is planned from the model's geometry (auto and the GeLoRA methods)."""
    from adapters import registry

    return method == registry.AUTO or registry.get(method).includes("gelora")


def plan_from_file(path: PathLike, lm: Any, examples: Sequence[Any], *, method: str = "auto", r: int = 32,
                   alpha: Optional[float] = None, target_modules: Optional[Sequence[str]] = None,
                   seed: int = 0, data_name: str = "training prompts", command: str = "") -> Any:
    """An AdapterPlan from a plan JSON, or planned from a profile JSON (its own plan when it has one
    for ``method``, or for any method when ``method`` is auto)."""
    from adapters.plan import AdapterPlan

    head = read_json(path, "plan", error=PlanError, missing=f"plan file {path} does not exist")
    if head.get("schema") == "geoprobe.profile":
        profile = GeometryProfile.load(path)
        if profile.adapter_plan is not None and method in ("auto", profile.adapter_plan.method):
            return AdapterPlan.from_dict(dict(profile.adapter_plan.data), f"the adapter plan in profile {path}")
        plan, _ = plan_for_training(lm, examples, method=method, r=r, alpha=alpha, target_modules=target_modules,
                                    profile=profile, seed=seed, data_name=data_name, command=command)
        return plan
    return AdapterPlan.load(path)


def check_plan_file(path: PathLike, method: str = "auto") -> Any:
    """Read the ``--plan`` file now, before any model is loaded: an adapter plan (checked field by
    field, and against ``--adapter`` ``method``) or a profile to plan from. Returns the
    :class:`adapters.plan.AdapterPlan` or the :class:`GeometryProfile`.

    Raises:
        PlanError: a missing or malformed plan, or one for another method than ``method``.
        ProfileError: a malformed profile.
    """
    from adapters.plan import AdapterPlan

    head = read_json(path, "plan", error=PlanError, missing=f"--plan {path} does not exist")
    if head.get("schema") == "geoprobe.profile":
        return GeometryProfile.load(path)
    plan = AdapterPlan.load(path)
    if method != "auto" and plan.method != method:
        raise PlanError(f"--plan {path} plans {plan.method}, not --adapter {method}; "
                        "use --adapter auto to follow the plan")
    return plan


def resolve_adapter(lm: Any, examples: Sequence[Any], out: PathLike, *, method: str = "lora",
                    plan: Optional[PathLike] = None, resume: bool = False, r: int = 32,
                    alpha: Optional[float] = None, target_modules: Optional[Sequence[str]] = None,
                    seed: int = 0, data_name: str = "training prompts", progress: bool = False,
                    device: Optional[str] = None, command: str = "") -> Any:
    """The method name, or the AdapterPlan for auto / GeLoRA methods (from ``plan``, from
    OUT/plan.json when resuming, or from a quick probe of the training prompts). The fine-tune keeps
    the plan in OUT/plan.json once it has built an adapter from it, so a plan the model rejects is
    never kept."""
    from adapters.plan import AdapterPlan

    out = Path(out)
    if plan is not None:
        chosen = plan_from_file(plan, lm, examples, method=method, r=r, alpha=alpha,
                                target_modules=target_modules, seed=seed, data_name=data_name, command=command)
        if method != "auto" and chosen.method != method:
            raise PlanError(f"--plan {plan} plans {chosen.method}, not --adapter {method}; "
                            "use --adapter auto to follow the plan")
    elif not needs_plan(method):
        return method
    elif resume and (out / PLAN_FILE).is_file():
        chosen = AdapterPlan.load(out / PLAN_FILE)
    else:
        chosen, _ = plan_for_training(lm, examples, method=method, r=r, alpha=alpha,
                                      target_modules=target_modules, seed=seed, data_name=data_name,
                                      progress=progress, device=resolve_device(device), command=command)
    return chosen


def build_options(*, planned: bool, dropout: float = 0.05, target_modules: Optional[Sequence[str]] = None,
                  r: int = 32, alpha: Optional[float] = None, n_heads: Optional[int] = None,
                  curvature: Optional[float] = None) -> dict[str, Any]:
    """Options for :func:`adapters.build`: a plan supplies r and alpha; ``n_heads`` and
    ``curvature`` override it."""
    kw: dict[str, Any] = {"dropout": dropout}
    if target_modules:
        kw["target_modules"] = list(target_modules)
    if not planned:
        kw.update(r=r, alpha=alpha)
    if n_heads is not None:
        kw["n_heads"] = n_heads
    if curvature is not None:
        kw["curvature"] = curvature
    return kw


# --------------------------------------------------------------------------- fine-tune and evaluate
def finetune_model(lm: Any, examples: Sequence[Any], adapter: Any = "lora", *, out: PathLike,
                   settings: Any = None, resume: bool = False, progress: bool = True, data_name: str = "",
                   group: Any = None, **build_kwargs: Any) -> Any:
    """Fine-tune adapters on a loaded model (:func:`adapters.finetune` on ``lm.model`` and
    ``lm.tokenizer``, named after ``lm``); returns the :class:`adapters.train.FinetuneRun`.

    A causal LM is trained on the answers; an encoder with a classification head (from
    :func:`load_for_data`) on the class ids, its head trained beside the adapters (PEFT ``SEQ_CLS``,
    ``modules_to_save``) and saved with them in OUT/adapter. ``group``: this process's place in a run
    of several processes (:func:`join_processes`), None for one process."""
    from adapters.train import finetune

    from .models import is_sequence_classifier

    if is_sequence_classifier(lm.model):
        check_head(lm, examples, head="classification", what="fine-tuning")
    else:
        require_causal_lm(lm, "fine-tuning")
    return finetune(lm.model, lm.tokenizer, examples, adapter, out=out, settings=settings, resume=resume,
                    progress=progress, model_name=lm.name, data_name=data_name, group=group, **build_kwargs)


# --------------------------------------------------------------------------- several processes
def launched_processes() -> Optional[int]:
    """How many processes the run this process belongs to has under ``accelerate launch`` or
    ``torchrun``; None when it was started alone."""
    from adapters.train.parallel import launched_processes as count

    return count()


def start_processes(argv: Sequence[str], num_processes: int, *, device: Optional[str] = None,
                    parallel: str = "ddp") -> int:
    """Run ``geoprobe <argv>`` on ``num_processes`` processes started by Accelerate's launcher
    (:mod:`adapters.train.launch`), after checking that the machine has that many GPUs (or CPU cores
    for ``device="cpu"``) and that ``parallel`` is a known strategy; the launcher's exit code.

    Raises:
        DeviceError: more processes than GPUs or cores, a single ``cuda:N`` device, an unknown strategy.
    """
    from adapters.train.launch import check_processes, launch
    from adapters.train.parallel import check_strategy

    check_strategy(parallel)
    check_processes(num_processes, device)
    return launch(list(argv), num_processes)


def process_device(group: Any) -> str:
    """Where a process of a launched run loads the model: its own device for DDP, the CPU for FSDP
    (the shards move to the device as they are cut)."""
    return "cpu" if group.sharded else str(group.device)


def join_processes(parallel: str = "ddp", *, device: Optional[str] = None) -> Any:
    """This process's :class:`adapters.train.parallel.Group` in a run started by ``accelerate launch`` or
    ``torchrun`` (``device="cpu"`` keeps every process on the CPU).

    Raises:
        DeviceError: more processes on this machine than GPUs, one ``cuda:N`` device for several
            processes, an unknown strategy.
    """
    from adapters.train.launch import check_processes
    from adapters.train.parallel import join

    try:  # the processes on this machine (LOCAL_WORLD_SIZE; all of them on one machine)
        n = int(os.environ.get("LOCAL_WORLD_SIZE") or launched_processes() or 1)
    except ValueError:
        n = launched_processes() or 1
    check_processes(n, device, what=f"this run's {n} processes on this machine (accelerate launch / torchrun)")
    return join(parallel, cpu=(device or "").strip().lower() == "cpu")


def resolve_adapter_together(group: Any, lm: Any, examples: Sequence[Any], out: PathLike, **kwargs: Any) -> Any:
    """:func:`resolve_adapter` for the processes of one run: the main process plans (and writes
    OUT/plan.json), the others read that plan, so that every process trains the same adapter."""
    from adapters.plan import AdapterPlan

    chosen = resolve_adapter(lm, examples, out, **kwargs) if group.is_main else None
    group.barrier()
    if group.is_main:
        return chosen
    planned = kwargs.get("plan") is not None or needs_plan(kwargs.get("method", "lora"))
    return AdapterPlan.load(Path(out) / PLAN_FILE) if planned else kwargs.get("method", "lora")


def check_adapter_folder(folder: PathLike) -> Path:
    """``folder`` if it holds a saved adapter whose files all read (config, weights, sidecar); a clear
    error otherwise (pointing at an ``adapter/`` subfolder when the run folder was given)."""
    from adapters.io import SIDECAR, adapter_problems

    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        hint = " (its adapter/ subfolder?)" if (folder / "adapter" / SIDECAR).is_file() else ""
        raise GeoprobeError(f"--adapter {folder} is not an adapter folder{hint}")
    problems = adapter_problems(folder)
    if problems:
        raise AdapterError(f"--adapter {folder} cannot be used: " + "; ".join(problems))
    return folder


def _model_for_evaluation(lm: Any, examples: Sequence[Any], adapter: Optional[PathLike], model: Any,
                          what: str) -> tuple[Any, bool]:
    """The model to evaluate and whether it classifies: ``model`` when given, else the base model with
    the adapter saved in ``adapter`` (its classification head included), else the base model; the
    pairing of ``lm`` and ``examples`` is checked first (a head for a classifier, a causal LM otherwise)."""
    from .models import is_sequence_classifier

    classifier = is_sequence_classifier(lm.model)
    if classifier:
        check_head(lm, examples, head="classification", what=what)
    else:
        require_causal_lm(lm, what)
    if model is None:
        model = lm.model
        if adapter is not None:
            import adapters
            model = adapters.load(lm.model, check_adapter_folder(adapter))
    return model, classifier


def _classify_kwargs(batch_size: Optional[int], max_length: int) -> dict[str, Any]:
    """Options of :func:`adapters.evaluate.classify`: ``batch_size`` ``None`` keeps its default."""
    return {"max_length": max_length, **({"batch_size": batch_size} if batch_size is not None else {})}


def evaluate_model(lm: Any, examples: Sequence[Any], *, adapter: Optional[PathLike] = None, model: Any = None,
                   batch_size: Optional[int] = None, max_new_tokens: Optional[int] = None, max_length: int = 256,
                   what: str = "evaluation", progress: bool = False) -> Any:
    """Accuracy (and the task's metrics) of ``lm`` on ``examples``: of ``model`` when given (a trained
    PeftModel), else of the base model with the adapter saved in ``adapter`` (its classification head
    included), else of the base model. A causal LM answers by greedy generation
    (:func:`adapters.evaluate.evaluate`; ``batch_size`` ``None`` fits the batch to the device); an
    encoder with a classification head by the argmax of its logits (:func:`adapters.evaluate.classify`,
    rows cut at ``max_length`` tokens). Returns the :class:`adapters.evaluate.EvalResult`."""
    from adapters.evaluate import classify, evaluate

    model, classifier = _model_for_evaluation(lm, examples, adapter, model, what)
    if classifier:
        return classify(model, lm.tokenizer, examples, **_classify_kwargs(batch_size, max_length))
    return evaluate(model, lm.tokenizer, examples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                    progress=progress)


def evaluate_model_sets(lm: Any, sets: Sequence[tuple[str, Sequence[Any]]], *, adapter: Optional[PathLike] = None,
                        model: Any = None, batch_size: Optional[int] = None, max_new_tokens: Optional[int] = None,
                        max_length: int = 256, what: str = "evaluation", progress: bool = False) -> Any:
    """Accuracy of ``lm`` (or ``model``, or the base model with ``adapter``) on several named test
    sets: a causal LM generates for all of them in one call (:func:`adapters.evaluate.evaluate_sets`);
    an encoder with a classification head classifies each set in turn (:func:`adapters.evaluate.classify`).
    Returns the :class:`adapters.evaluate.SetsResult`."""
    import time

    from adapters.evaluate import SetsResult, classify, evaluate_sets

    if not sets:
        raise DataFormatError("evaluation needs at least one test set")
    names = [name for name, _ in sets]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise DataFormatError(f"test set {twice[0]!r} is given twice; give each set once")
    model, classifier = _model_for_evaluation(lm, [ex for _, exs in sets for ex in exs], adapter, model, what)
    if not classifier:
        return evaluate_sets(model, lm.tokenizer, sets, batch_size=batch_size, max_new_tokens=max_new_tokens,
                             progress=progress)
    t0 = time.perf_counter()
    results = [classify(model, lm.tokenizer, list(exs), **_classify_kwargs(batch_size, max_length))
               for _, exs in sets]
    n = sum(r.n for r in results)
    n_correct = sum(sum(bool(p["correct"]) for p in r.predictions) for r in results)
    return SetsResult(names=names, results=results, n=n, n_correct=n_correct, accuracy=n_correct / n,
                      n_unparsed=sum(r.n_unparsed for r in results), seconds=time.perf_counter() - t0)


def evaluation_record(res: Any, *, model: str, adapter: Optional[str], data: str) -> dict[str, Any]:
    """The evaluation JSON of one test set: schema, model, adapter, data and the :class:`EvalResult` fields."""
    return {"schema": "geoprobe.evaluation", "model": model, "adapter": adapter, "data": data, **res.to_dict()}


EVALUATION_SETS_SCHEMA = "geoprobe.evaluation-sets"
EVALUATION_SETS_VERSION = 1


def evaluation_sets_record(res: Any, *, model: str, adapter: Optional[str]) -> dict[str, Any]:
    """The evaluation JSON of several test sets (schema ``geoprobe.evaluation-sets``, version 1):
    model and adapter, ``overall`` (``n``, ``n_correct``, ``accuracy``, ``n_unparsed``, ``seconds``
    over all examples) and ``sets``, one :func:`evaluation_record` per set in the order given."""
    return {"schema": EVALUATION_SETS_SCHEMA, "schema_version": EVALUATION_SETS_VERSION, "model": model,
            "adapter": adapter,
            "overall": {"n": res.n, "n_correct": res.n_correct, "accuracy": res.accuracy,
                        "n_unparsed": res.n_unparsed, "seconds": res.seconds},
            "sets": [evaluation_record(r, model=model, adapter=adapter, data=name)
                     for name, r in zip(res.names, res.results)]}


def read_evaluation(path: PathLike) -> list[dict[str, Any]]:
    """The per-set records of an evaluation JSON written by ``geoprobe evaluate`` or ``run``: a
    one-set file (schema ``geoprobe.evaluation``) gives a list of one, a several-set file
    (``geoprobe.evaluation-sets``) its ``sets``.

    Raises:
        GeoprobeError: not an evaluation JSON, or a several-set file of a newer schema version.
    """
    data = read_json(path, "evaluation")
    schema = data.get("schema") if isinstance(data, dict) else None
    if schema == "geoprobe.evaluation":
        return [data]
    if schema == EVALUATION_SETS_SCHEMA:
        version = data.get("schema_version")
        if version != EVALUATION_SETS_VERSION:
            raise GeoprobeError(f"{path}: evaluation-sets schema version {version!r}; this geoprobe reads "
                                f"version {EVALUATION_SETS_VERSION}")
        return list(data["sets"])
    raise GeoprobeError(f"{path} is not an evaluation JSON (schema {schema!r}); write one with `geoprobe evaluate`")


# --------------------------------------------------------------------------- the whole run
@dataclass(frozen=True)
class RunResult(Record):
    """What :func:`run` wrote and measured: the files under ``out`` and the headline numbers.

    ``finetune`` is the fine-tune result record with its ``eval_metrics`` (accuracy, the task's
    metrics, ``n_eval``, ``n_unreadable``); ``accuracy``, ``n_correct``, ``n_eval`` and
    ``n_unreadable`` repeat the evaluation's headline.
    """

    out: str
    method: str
    plan_reason: str
    plan_path: str
    profile_path: str
    adapter_dir: str
    results_path: str
    eval_path: str
    report_path: str
    accuracy: float
    n_correct: int
    n_eval: int
    n_unreadable: int
    finetune: FinetuneResult
    eval_metrics: dict[str, float] = field(default_factory=dict)


def _plan_run(lm: Any, examples: Sequence[Any], out: Path, *, method: str, resume: bool,
              planning: dict[str, Any]) -> tuple[Any, GeometryProfile]:
    """The plan and profile of a run: kept from OUT when resuming, else planned (written to OUT once
    the fine-tune has built an adapter from the plan)."""
    from adapters.plan import AdapterPlan

    if resume and (out / PLAN_FILE).is_file() and (out / PROFILE_FILE).is_file():
        return AdapterPlan.load(out / PLAN_FILE), GeometryProfile.load(out / PROFILE_FILE)
    return plan_for_training(lm, examples, method=method, **planning)


def _record_evaluation(trained: Any, res: Any, *, lm: Any, out: Path, eval_name: str) -> FinetuneResult:
    """Write OUT/eval.json and the fine-tune results with their evaluation metrics."""
    write_json(out / EVAL_FILE, evaluation_record(res, model=lm.name, adapter=display_path(trained.adapter_dir),
                                                  data=eval_name))
    metrics = {k: float(v) for k, v in res.metrics.items()}
    metrics.update(n_eval=float(res.n), n_unreadable=float(res.n_unparsed))
    result = dataclasses.replace(trained.result, eval_metrics=metrics)
    write_json(trained.results_path, result.to_dict())
    return result


def run(lm: Any, examples: Sequence[Any], tests: Sequence[Any], *, out: PathLike, method: str = "auto",
        settings: Any = None, resume: bool = False, r: int = 32, alpha: Optional[float] = None,
        target_modules: Optional[Sequence[str]] = None, dropout: float = 0.05, n_heads: Optional[int] = None,
        curvature: Optional[float] = None, eval_batch_size: Optional[int] = None, max_new_tokens: Optional[int] = None,
        data_name: str = "", eval_name: str = "", progress: bool = True, device: Optional[str] = None,
        command: str = "", on_plan: Optional[Callable[[Any], None]] = None,
        on_trained: Optional[Callable[[Any], None]] = None) -> RunResult:
    """Probe, plan, build, fine-tune, evaluate and report: ``lm`` (a loaded causal LM) fine-tuned on
    ``examples`` and evaluated on ``tests``, everything written under ``out``.

    Writes OUT/plan.json and OUT/profile.json (the quick probe of the training prompts and the plan,
    :func:`plan_for_training`; kept when resuming), the adapter, checkpoints and results.json
    (:func:`adapters.finetune`), OUT/eval.json, and OUT/report.html with the profile holding the plan
    and the fine-tune result. ``on_plan`` is called with the plan before training, ``on_trained`` with
    the :class:`adapters.train.FinetuneRun` before evaluation.
    """
    from .report import render_report

    require_causal_lm(lm, "`geoprobe run`")
    out = Path(out)
    planning = dict(r=r, alpha=alpha, target_modules=target_modules, seed=getattr(settings, "seed", 0),
                    data_name=data_name, progress=progress, device=resolve_device(device), command=command)
    plan, profile = _plan_run(lm, examples, out, method=method, resume=resume, planning=planning)
    if on_plan is not None:
        on_plan(plan)
    trained = finetune_model(lm, examples, plan, out=out, settings=settings, resume=resume, progress=progress,
                             data_name=data_name, on_ready=lambda: profile.save(out / PROFILE_FILE),
                             **build_options(planned=True, dropout=dropout, target_modules=target_modules,
                                             n_heads=n_heads, curvature=curvature))
    if on_trained is not None:
        on_trained(trained)
    res = evaluate_model(lm, tests, model=trained.model, batch_size=eval_batch_size,
                         max_new_tokens=max_new_tokens, what="`geoprobe run`", progress=progress)
    result = _record_evaluation(trained, res, lm=lm, out=out, eval_name=eval_name)
    profile = profile.with_updates(adapter_plan=plan.to_record(), finetune=[result])
    profile.save(out / PROFILE_FILE)
    report = render_report([profile], out / REPORT_FILE, command=command)
    return RunResult(out=str(out), method=plan.method, plan_reason=plan.reasons.get("method", "as requested"),
                     plan_path=str(out / PLAN_FILE), profile_path=str(out / PROFILE_FILE),
                     adapter_dir=str(trained.adapter_dir), results_path=str(trained.results_path),
                     eval_path=str(out / EVAL_FILE), report_path=str(report), accuracy=float(res.accuracy),
                     n_correct=sum(bool(p["correct"]) for p in res.predictions), n_eval=res.n,
                     n_unreadable=res.n_unparsed, finetune=result, eval_metrics=dict(result.eval_metrics))


# --------------------------------------------------------------------------- native adapter layers
def native_device(cpu: bool = False) -> str:
    """``cuda`` when CUDA is present and ``cpu`` is not asked for, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() and not cpu else "cpu"


@dataclass(frozen=True)
class NativeBuild(Record):
    """The native adapter layers built (or found in the cache) for ``device``: the extension's
    ``path``, the ``seconds`` it took and the GEOPROBE_NATIVE ``mode`` in force."""

    device: str
    path: str
    seconds: float
    mode: str


def build_native(device: str) -> NativeBuild:
    """Build (or load from the cache) the C++ nodes of the adapter layers for ``device`` now rather
    than at the first training step; the CPU variant is built on request too.

    Raises:
        GeoprobeError: the extension cannot be built (the layers keep their Python nodes).
    """
    import time

    import torch

    from adapters.kernels import native

    previous = native.set_native_mode("all")  # the CPU variant is built on request too
    native_log = logging.getLogger(native.__name__)
    level = native_log.level
    native_log.setLevel(logging.ERROR)  # the caller reports the outcome itself, in one line
    try:
        start = time.perf_counter()
        module = native.native_module(torch.device(device))
        seconds = time.perf_counter() - start
        reason = native.native_unavailable_reason(torch.device(device)) if module is None else None
    finally:
        native.set_native_mode(previous)
        native_log.setLevel(level)
    if module is None:
        raise GeoprobeError(f"the native adapter layers could not be built ({reason}); the layers keep their "
                            "Python nodes")
    return NativeBuild(device=device, path=str(module.__file__), seconds=seconds, mode=native.native_mode())
