"""The comparison workflow: every arm trained and evaluated with every seed at an equal parameter budget,
each run stored the moment it finishes, and the summary, table and report rebuilt after each run.

Layout of OUT:

* ``comparison.json``: the settings every run shares (model and its fingerprint, its 4-bit quantization
  if any, the digests of the training and evaluation data, training settings less the seed, r, α,
  targets, dropout, heads, curvature, generation length, plan seed, how the evaluation sets are batched).
  A rerun with other settings is refused, naming the
  differences; adding methods or seeds is allowed (each run has its own file), and so is reading the
  same data from other paths (another machine).
* ``plans/<arm>.json``: the plans of ``auto`` and the GeLoRA arms, made once per comparison from a quick
  probe of the training prompts with ``plan_seed`` (so the seeds vary initialisation, dropout and data
  order, not the plan).
* ``runs/<arm>-seed<k>.json`` (``runs/none.json`` for the untrained base): one run each, written
  atomically once it has trained and been evaluated; a rerun skips it.
* ``work/<run>/``: the fine-tune folder of a run in progress, with its checkpoints; an interrupted run
  resumes from its newest checkpoint. Removed once the run's JSON is written.
* ``adapters/<run>/``: the trained adapter of every run (for probing the fine-tuned models later).
* ``predictions/<run>.json``: every generated answer (a classifier's predicted class and logits), per
  evaluation set.
* ``summary.json`` and ``report.html``: the table, the paired differences and the costs (:mod:`.stats`,
  :mod:`geoprobe.report.comparison`).
* ``probes/`` and ``after.json`` (``probe_after``): every fine-tuned model probed beside the base model and
  how each adapter moved per-prompt δ_rel and the per-layer intrinsic dimension (:mod:`.after`); the
  summary and the report include them.

Two protocols (:func:`geoprobe.workflows.check_head`): a causal LM generates its answers; an encoder on
GLUE-style data is loaded with a sequence-classification head (:func:`geoprobe.workflows.load_for_data`)
and answers by the argmax of the head's logits (PEFT ``SEQ_CLS``). The head is trained in full in every
arm, beside the adapters; it has the same d·C + C parameters in each (hidden size d, C classes), starts
from the same seeded initialisation in every run (:func:`adapters.build.unload` puts the untrained head
back after each run) and is not counted in the budget, which compares the adapters alone: a run's
``adapter_parameters`` = ``trainable_parameters`` − ``head_parameters``, and ``budget_ratio`` is
``adapter_parameters`` over the LoRA budget.

Each evaluation set is scored by its task's headline metric (:func:`adapters.evaluate.headline_metric`):
accuracy, F1 of the positive class for MRPC, Matthews' correlation for CoLA; the table, the paired
differences and the verdicts are in that metric (:data:`.stats.METRICS` names and scales it).

Several training sets (``train_sets``, the CLI's repeated ``--data``) are trained on as their union: the
examples concatenated in the order given, then visited in the trainer's per-seed permutation
(:mod:`adapters.train.order`), so every seed interleaves the sets in its own fixed order and every arm
sees the same order for the same seed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .. import runtime
from ..errors import ComparisonError, DataFormatError
from ..records import read_json, replace_folder, write_json
from . import stats
from .after import AFTER_FILE, PROBES
from .parallel import JOBS_FILE
from .arms import NONE, TOLERANCE, Arm, Budget, match_budget, target_modules_of

log = logging.getLogger(__name__)

__all__ = ["SETTINGS_FILE", "SUMMARY_FILE", "REPORT_FILE", "RUN_SCHEMA", "SUMMARY_SCHEMA", "EvalSet",
           "ComparisonResult", "compare", "check_eval_sets", "summarize", "format_table", "run_name"]

SETTINGS_FILE = "comparison.json"
EVAL_BATCHING = "all sets in one generation call"
"""How a causal LM's evaluation sets are batched (:func:`_evaluate`); a comparison folder whose runs were
evaluated otherwise does not resume under this version."""
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
RUNS, PLANS, WORK, ADAPTERS, PREDICTIONS = "runs", "plans", "work", "adapters", "predictions"
RUN_SCHEMA, SUMMARY_SCHEMA, SETTINGS_SCHEMA = "geoprobe.compare_run", "geoprobe.compare_summary", "geoprobe.compare"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class EvalSet:
    """One ``--eval`` set: its ``name`` (the file stem, made unique), ``path`` and examples."""

    name: str
    path: str
    examples: list


@dataclass(frozen=True)
class ComparisonResult:
    """What :func:`compare` did: the folder, the files written, the runs trained now and skipped, the
    summary (as written) and its plain-text table."""

    out: Path
    summary_path: Path
    report_path: Path
    trained: list[str]
    skipped: list[str]
    summary: dict[str, Any]
    table: str


def run_name(arm: Arm, seed: Optional[int]) -> str:
    """``none`` for the base model, ``<arm>-seed<k>`` otherwise."""
    return NONE if not arm.trains else f"{arm.name}-seed{seed}"


# --------------------------------------------------------------------------- checks before training
def check_eval_sets(evals: Sequence[EvalSet]) -> None:
    """Refuse an evaluation set without gold answers or whose answer format the reader does not know.

    Raises:
        DataFormatError: naming the ``--eval`` file and the example.
    """
    from adapters.evaluate import task_family

    if not evals:
        raise DataFormatError("give at least one --eval test set")
    for ev in evals:
        if not ev.examples:
            raise DataFormatError(f"--eval {ev.path} holds no examples")
        for i, ex in enumerate(ev.examples):
            if ex.label is None:
                raise DataFormatError(f"--eval {ev.path}: example {i} has no gold answer (an unlabelled split?); "
                                      "evaluate on a labelled split")
            try:
                task_family(ex.task, ex.label, ex.choices)
            except DataFormatError as exc:
                raise DataFormatError(f"--eval {ev.path}: the answer format of example {i} is not known ({exc})") \
                    from None


def check_protocol(lm: Any, train: Sequence[Any], evals: Sequence[EvalSet], *, head: str = "auto") -> str:
    """The protocol of the comparison (``generation`` or ``classification``,
    :func:`geoprobe.workflows.check_head`) after checking that ``lm`` can be trained on ``train`` and
    evaluated on every set of ``evals`` that way: a classification head learns one label set, so every
    evaluation set must have the training data's labels.

    Raises:
        AdapterError: an encoder asked to generate (training or evaluation data that needs generation,
            or ``head="generation"``); a causal LM asked for a classification head; an encoder loaded
            without a head.
        DataFormatError: ``head="classification"`` on data that needs generation; an evaluation set
            whose labels differ from the training data's.
    """
    from ..workflows import check_head, classification_labels

    protocol = check_head(lm, train, head=head, what="a comparison")
    for ev in evals:
        check_head(lm, ev.examples, head=protocol, what=f"--eval {ev.path}")
    if protocol == "classification":
        labels = classification_labels(train)
        for ev in evals:
            other = classification_labels(ev.examples)
            if other != labels:
                raise DataFormatError(f"--eval {ev.path} has the labels {', '.join(other or ())} but the "
                                      f"classification head is trained on {', '.join(labels or ())} (--data); "
                                      "evaluate a classifier on the task it is trained for")
    return protocol


def _digest(examples: Sequence[Any]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps(dataclasses.asdict(ex), sort_keys=True, default=str).encode())
    return h.hexdigest()


def _differences(stored: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """The settings that differ, one phrase each; where the files were read (``paths``) is not compared:
    the data's digests are, so a comparison moves between machines. Likewise the model's name (a file
    or folder name) counts only where the weights' fingerprints are missing or differ."""
    out = []
    skip = {"paths"}
    if not prefix and stored.get("model_fingerprint") and stored.get("model_fingerprint") == current.get(
            "model_fingerprint"):
        skip.add("model")
    for key in sorted((set(stored) | set(current)) - skip):
        a, b = stored.get(key, "(absent)"), current.get(key, "(absent)")
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(_differences(a, b, f"{prefix}{key}."))
        elif a != b:
            out.append(f"{prefix}{key}: {json.dumps(a, default=str)} stored, {json.dumps(b, default=str)} now")
    return out


def _check_out(out: Path, settings: dict[str, Any]) -> None:
    """Refuse an output folder that is a file, holds other files, or holds a comparison with other settings."""
    if out.exists() and not out.is_dir():
        raise ComparisonError(f"--out {out} is a file; give a folder")
    file = out / SETTINGS_FILE
    if file.is_file():
        stored = read_json(file, "comparison settings", error=ComparisonError)
        diff = _differences(stored.get("settings", {}), settings)
        if diff:
            raise ComparisonError(f"--out {out} holds a comparison with other settings ({'; '.join(diff)}); "
                                  "rerun with the original settings, or choose another --out")
    elif out.is_dir() and any(out.iterdir()):
        raise ComparisonError(f"--out {out} is not empty and holds no {SETTINGS_FILE}; choose a new or empty folder")


def _settings(lm: Any, train: Sequence[Any], evals: Sequence[EvalSet], train_settings: Any, *, r: int,
              alpha: float, targets: Sequence[str], dropout: float, n_heads: Optional[int],
              curvature: Optional[float], max_new_tokens: Optional[int], plan_seed: int, data_name: str,
              train_sets: Optional[dict[str, int]] = None) -> dict:
    from adapters.io import base_fingerprint
    from adapters.train.settings import NOT_COMPARED

    from ..models.quantize import quantization_of

    ts = {k: v for k, v in train_settings.to_dict().items() if k not in NOT_COMPARED and k != "seed"}
    union = {"train_sets": dict(train_sets)} if train_sets and len(train_sets) > 1 else {}
    quantized = quantization_of(lm.model)  # a 4-bit base is another base: recorded only when there is one
    if quantized is not None:
        union["quantization"] = {k: v for k, v in quantized.to_dict().items() if k != "version"}
    return json.loads(json.dumps({
        "model": lm.name, "model_fingerprint": base_fingerprint(lm.model)["embedding_sha256"],
        "paths": {"data": data_name, "evals": {ev.name: ev.path for ev in evals}},
        "data_sha256": _digest(train), "n_train": len(train),
        "evals": {ev.name: {"n": len(ev.examples), "sha256": _digest(ev.examples)} for ev in evals},
        "train": ts, "r": r, "alpha": alpha, "alpha_over_r": alpha / r, "target_modules": list(targets),
        "dropout": dropout, "n_heads": n_heads, "curvature": curvature, "max_new_tokens": max_new_tokens,
        "plan_seed": plan_seed, "budget_tolerance": TOLERANCE, "eval_batching": EVAL_BATCHING, **union,
    }, default=str))


# --------------------------------------------------------------------------- plans and budgets
def _plan(lm: Any, arm: Arm, train: Sequence[Any], out: Path, state: dict[str, Any], *, r: int, alpha: float,
          targets: Sequence[str], plan_seed: int, data_name: str, progress: bool, device: Optional[str],
          command: str) -> Any:
    """The arm's plan: read from OUT/plans when there, else planned (one quick probe shared by the arms)."""
    from adapters.plan import AdapterPlan

    from ..workflows import plan_for_training, resolve_device

    path = out / PLANS / f"{arm.name}.json"
    if path.is_file():
        return AdapterPlan.load(path)
    plan, state["profile"] = plan_for_training(lm, train, method=arm.method, r=r, alpha=alpha,
                                               target_modules=targets, profile=state.get("profile"),
                                               seed=plan_seed, data_name=data_name, progress=progress,
                                               device=resolve_device(device), command=command)
    return plan


def _budget(arm: Arm, plan: Any, modules: Sequence[tuple[int, int, int]], *, r: int, alpha: float,
            n_heads: Optional[int]) -> Budget:
    from adapters import registry
    from adapters.build import DEFAULT_HEADS

    method = plan.method if plan is not None else arm.method
    heads = None
    if registry.get(method).includes("hydralora"):
        heads = n_heads or (plan.n_heads if plan is not None else None) or DEFAULT_HEADS
    ranks = plan.layer_ranks if plan is not None else None
    return match_budget(arm, method, modules, r=r, alpha=alpha, layer_ranks=ranks, n_heads=heads)


# --------------------------------------------------------------------------- one run
def _peak_memory(device: Any) -> tuple[Optional[int], str]:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale, "cpu_peak_rss_of_process"


def _evaluate(lm: Any, model: Any, evals: Sequence[EvalSet], *, batch_size: Optional[int],
              max_new_tokens: Optional[int], max_length: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every set's scores (``metric``: its headline metric, ``score``: its value) and predictions.

    A causal LM answers every set in one generation call (:func:`..workflows.evaluate_model_sets`:
    all prompts length-sorted and batched together, each set scored on its own), so the decoding
    steps are paid once, not once per set; a set's ``seconds`` is its share of that call by example
    count. A classifier scores each set in turn."""
    from adapters.evaluate import headline_metric

    from ..workflows import evaluate_model_sets

    res = evaluate_model_sets(lm, [(ev.name, ev.examples) for ev in evals], model=model, batch_size=batch_size,
                              max_new_tokens=max_new_tokens, max_length=max_length, what="a comparison")
    scores, predictions = {}, {}
    for ev, one in zip(evals, res.results):
        correct = [bool(p["correct"]) for p in one.predictions]
        metric = headline_metric(one.task)
        metric = metric if metric in one.metrics else "accuracy"
        scores[ev.name] = {"metric": metric, "score": float(one.metrics.get(metric, one.accuracy)),
                           "protocol": one.protocol, "accuracy": float(one.accuracy), "n": one.n,
                           "n_correct": sum(correct),
                           "n_unreadable": one.n_unparsed, "seconds": round(one.seconds, 3),
                           "metrics": {k: float(v) for k, v in one.metrics.items()},
                           "correct": [int(c) for c in correct]}
        predictions[ev.name] = one.predictions
    return scores, predictions


def _loss_summary(loss: Sequence[float]) -> dict[str, Any]:
    if not loss:
        return {"steps": 0}
    tail = loss[-max(1, len(loss) // 10):]
    return {"steps": len(loss), "first": loss[0], "last": loss[-1], "min": min(loss),
            "mean_last_tenth": sum(tail) / len(tail)}


def _train(lm: Any, arm: Arm, seed: int, budget: Budget, plan: Any, train: Sequence[Any], work: Path,
           train_settings: Any, *, targets: Sequence[str], dropout: float, curvature: Optional[float],
           progress: bool, data_name: str) -> Any:
    """Fine-tune one run in ``work`` (resumed from its newest checkpoint when there is one)."""
    from adapters import registry
    from adapters.train import latest_checkpoint

    from ..workflows import finetune_model

    resume = latest_checkpoint(work) is not None
    if work.exists() and not resume:
        shutil.rmtree(work)  # a run killed before its first checkpoint: start it afresh
    kw: dict[str, Any] = {"dropout": dropout, "target_modules": list(targets)}
    if plan is None:
        kw.update(r=budget.r, alpha=budget.alpha)
    if budget.n_heads is not None:
        kw["n_heads"] = budget.n_heads
    if plan is not None and budget.layer_ranks is not None:
        kw["layer_ranks"] = budget.layer_ranks
    if arm.official:
        kw["official"] = True
    if arm.scale_matched:
        kw["scale_matched"] = True
    if curvature is not None and registry.get(budget.method).includes("hyplora"):
        kw["curvature"] = curvature
    return finetune_model(lm, train, plan if plan is not None else budget.method, out=work,
                          settings=dataclasses.replace(train_settings, seed=seed), resume=resume,
                          progress=progress, data_name=data_name, **kw)


def _one_run(lm: Any, arm: Arm, seed: Optional[int], budget: Optional[Budget], plan: Any, out: Path,
             settings: dict[str, Any], train: Sequence[Any], evals: Sequence[EvalSet], train_settings: Any, *,
             options: dict[str, Any]) -> dict[str, Any]:
    """Train (unless ``none``) and evaluate one run, write its JSON; returns the record."""
    import torch
    from adapters.build import unload

    name = run_name(arm, seed)
    device = next(lm.model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    record: dict[str, Any] = {"schema": RUN_SCHEMA, "schema_version": SCHEMA_VERSION, "run": name,
                              "method": arm.name, "seed": seed, "protocol": options["protocol"],
                              "settings": settings}
    evaluation = {"batch_size": options["eval_batch_size"], "max_new_tokens": settings["max_new_tokens"],
                  "max_length": options["max_length"]}
    head = options["head_parameters"]
    if arm.trains:
        trained = _train(lm, arm, seed, budget, plan, train, out / WORK / name, train_settings,
                         targets=settings["target_modules"], dropout=settings["dropout"],
                         curvature=settings["curvature"], progress=options["progress"],
                         data_name=settings["paths"]["data"])
        try:
            res = trained.result
            peft_trainable, _ = trained.model.get_nb_trainable_parameters()
            scores, predictions = _evaluate(lm, trained.model, evals, **evaluation)
        finally:
            unload(trained.model)  # the untrained head back in place for the next run
        adapter = int(res.trainable_parameters) - head
        record.update(
            built_method=res.method, trainable_parameters=int(res.trainable_parameters),
            peft_trainable_parameters=int(peft_trainable), head_parameters=head, adapter_parameters=adapter,
            lora_parameters=budget.lora_parameters, budget_ratio=adapter / budget.lora_parameters,
            budget=budget.to_dict(),
            plan=plan.to_dict() if plan is not None else None,
            train={**_loss_summary(res.loss_values), "loss_steps": res.loss_steps, "loss_values": res.loss_values},
            train_seconds=res.seconds, tokens_per_second=res.tokens_per_second,
            resumed_from_step=trained.resumed_from, adapter_dir=f"{ADAPTERS}/{name}")
        from adapters import registry
        if plan is not None and arm.method == registry.AUTO:
            record["auto"] = {"chosen": plan.method, "reason": plan.reasons.get("method", ""),
                              "n_heads": plan.n_heads, "heads_reason": plan.reasons.get("heads")}
    else:
        record.update(built_method=None, trainable_parameters=0, peft_trainable_parameters=0, head_parameters=0,
                      adapter_parameters=0, lora_parameters=None,
                      budget_ratio=None, budget=None, plan=None, train=None, train_seconds=0.0,
                      tokens_per_second=None, resumed_from_step=None, adapter_dir=None)
        scores, predictions = _evaluate(lm, lm.model, evals, **evaluation)
    peak, kind = _peak_memory(device)
    eval_seconds = sum(s["seconds"] for s in scores.values())
    record.update(eval=scores, eval_seconds=eval_seconds, wall_seconds=record["train_seconds"] + eval_seconds,
                  this_stretch_seconds=time.perf_counter() - t0, peak_memory_bytes=peak, peak_memory_kind=kind,
                  device=str(device), device_name=_device_name(device), versions=runtime.versions(),
                  finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write_json(out / PREDICTIONS / f"{name}.json", {"run": name, "predictions": predictions})
    (out / PROBES / f"{name}.json").unlink(missing_ok=True)  # a profile of an earlier run of this name
    write_json(out / RUNS / f"{name}.json", record)
    _tidy(out, name)
    return record


def _device_name(device: Any) -> str:
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _tidy(out: Path, name: str) -> None:
    """Move a finished run's adapter to OUT/adapters and remove its work folder (its checkpoints)."""
    work = out / WORK / name
    if (work / "adapter").is_dir():
        (out / ADAPTERS).mkdir(parents=True, exist_ok=True)
        replace_folder(work / "adapter", out / ADAPTERS / name)
    if work.exists():
        shutil.rmtree(work, ignore_errors=True)


def _stored_run(out: Path, name: str, settings: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The finished run's record, or None; a record with other settings is refused."""
    path = out / RUNS / f"{name}.json"
    if not path.is_file():
        return None
    rec = read_json(path, f"run {name}", error=ComparisonError)
    if rec.get("schema") != RUN_SCHEMA:
        raise ComparisonError(f"{path} is not a comparison run (schema {rec.get('schema')!r})")
    diff = _differences(rec.get("settings", {}), settings)
    if diff:
        raise ComparisonError(f"{path} was run with other settings ({'; '.join(diff)}); delete it or choose "
                              "another --out")
    return rec


# --------------------------------------------------------------------------- the comparison
def compare(lm: Any, train: Sequence[Any], evals: Sequence[EvalSet], *, out: str | Path, arms: Sequence[Arm],
            seeds: int, train_settings: Any, r: int = 32, alpha: Optional[float] = None,
            target_modules: Optional[Sequence[str]] = None, dropout: float = 0.05, n_heads: Optional[int] = None,
            curvature: Optional[float] = None, eval_batch_size: Optional[int] = None,
            max_new_tokens: Optional[int] = None, plan_seed: int = 0, data_name: str = "",
            train_sets: Optional[dict[str, int]] = None, head: str = "auto", probe_after: bool = False,
            progress: bool = True, device: Optional[str] = None, command: str = "",
            echo: Callable[[str], None] = print) -> ComparisonResult:
    """Compare ``arms`` on ``lm`` fine-tuned on ``train`` with seeds 0 … ``seeds``−1 and evaluated on
    ``evals``, everything under ``out`` (module docstring). ``lm`` is a causal LM, which generates its
    answers, or an encoder with a classification head for GLUE-style data (loaded by
    :func:`geoprobe.workflows.load_for_data`; ``head`` as its ``--head``). ``train_sets`` (name → number of
    examples, in the order ``train`` concatenates them) records a union of several training sets. Every
    check — arms, seeds, the model against the data, evaluation sets, the output folder, the budgets —
    comes before the first training step; finished runs are skipped, an interrupted one resumes from its
    checkpoint. ``echo`` gets one line per run started, finished or skipped. ``probe_after`` then probes
    every fine-tuned model beside the base model on the training prompts (:func:`.after.probe_after`, with
    the planner's quick probe settings and ``plan_seed``).

    Raises:
        ComparisonError: no arms, ``seeds`` < 1, a budget that cannot be matched, an output folder with
            another comparison.
        DataFormatError: an evaluation set without gold answers, of an unknown answer format, or (for a
            classifier) with other labels than the training data.
        AdapterError: an encoder asked to generate, a causal LM asked for a classification head
            (:func:`check_protocol`).
    """
    from adapters.build import head_parameter_count, resolve_targets

    started = time.perf_counter()
    out = Path(out)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ComparisonError(f"--seeds must be at least 1, got {seeds!r}")
    if not arms:
        raise ComparisonError("no methods to compare; give --methods")
    if train_settings.balance_coef > 0:
        raise ComparisonError("--balance applies to HydraLoRA only, and a comparison trains every method alike; "
                              "leave it at 0")
    check_eval_sets(evals)
    protocol = check_protocol(lm, train, evals, head=head)
    alpha = float(alpha if alpha is not None else 2 * r)
    targets = resolve_targets(lm.model, target_modules)
    settings = _settings(lm, train, evals, train_settings, r=r, alpha=alpha, targets=targets, dropout=dropout,
                         n_heads=n_heads, curvature=curvature, max_new_tokens=max_new_tokens, plan_seed=plan_seed,
                         data_name=data_name, train_sets=train_sets)
    _check_out(out, settings)
    modules = target_modules_of(lm.model, targets)
    budgets: dict[str, Budget] = {}
    for arm in arms:  # unplanned arms first: their refusals cost no probe
        if arm.trains and not arm.planned:
            budgets[arm.name] = _budget(arm, None, modules, r=r, alpha=alpha, n_heads=n_heads)
    plans, state = {}, {}
    for arm in arms:
        if arm.planned:
            plans[arm.name] = _plan(lm, arm, train, out, state, r=r, alpha=alpha, targets=targets,
                                    plan_seed=plan_seed, data_name=data_name, progress=progress, device=device,
                                    command=command)
            budgets[arm.name] = _budget(arm, plans[arm.name], modules, r=r, alpha=alpha, n_heads=n_heads)
    write_json(out / SETTINGS_FILE, {"schema": SETTINGS_SCHEMA, "schema_version": SCHEMA_VERSION,
                                     "settings": settings})
    for name, plan in plans.items():
        if not (out / PLANS / f"{name}.json").is_file():
            plan.save(out / PLANS / f"{name}.json")

    todo = [(a, None) for a in arms if not a.trains] + [(a, k) for k in range(seeds) for a in arms if a.trains]
    trained, skipped = [], []
    options = {"progress": progress, "eval_batch_size": eval_batch_size, "protocol": protocol,
               "max_length": train_settings.max_length, "head_parameters": head_parameter_count(lm.model)}
    for i, (arm, seed) in enumerate(todo, 1):
        name = run_name(arm, seed)
        if _stored_run(out, name, settings) is not None:
            _tidy(out, name)
            skipped.append(name)
            echo(f"[{i}/{len(todo)}] {name}: finished earlier, skipped ({len(todo) - i} remaining)")
            continue
        echo(f"[{i}/{len(todo)}] {name}: started ({len(todo) - i} remaining after it)")
        rec = _one_run(lm, arm, seed, budgets.get(arm.name), plans.get(arm.name), out, settings, train, evals,
                       train_settings, options=options)
        trained.append(name)
        accs = ", ".join(f"{k} {stats.metric_text(v['score'], v['metric'])}" for k, v in rec["eval"].items())
        echo(f"[{i}/{len(todo)}] {name}: finished in {rec['this_stretch_seconds']:.1f} s — {accs} "
             f"({len(todo) - i} remaining)")
        _write_summary(out, arms, seeds, budgets, plans, settings, command, started, options)
    if probe_after:
        from ..workflows import planning_texts, quick_probe_settings
        from .after import probe_after as probe_fine_tuned

        texts = planning_texts(lm, train)
        probe_fine_tuned(lm, out, texts, settings=quick_probe_settings(len(texts), plan_seed), seed=plan_seed,
                         progress=progress, device=device, command=command, echo=echo)
    summary = _write_summary(out, arms, seeds, budgets, plans, settings, command, started, options)
    return ComparisonResult(out=out, summary_path=out / SUMMARY_FILE, report_path=out / REPORT_FILE,
                            trained=trained, skipped=skipped, summary=summary, table=format_table(summary))


def _write_summary(out: Path, arms: Sequence[Arm], seeds: int, budgets: dict[str, Budget], plans: dict[str, Any],
                   settings: dict[str, Any], command: str, started: float, options: dict[str, Any]) -> dict[str, Any]:
    from ..report.comparison import render_comparison

    runs = {}
    for arm in arms:
        for seed in ([None] if not arm.trains else range(seeds)):
            path = out / RUNS / f"{run_name(arm, seed)}.json"
            if path.is_file():
                runs[run_name(arm, seed)] = read_json(path, "run", error=ComparisonError)
    summary = summarize(runs, [a.name for a in arms], seeds, settings=settings)
    summary["budgets"] = {k: v.to_dict() for k, v in budgets.items()}
    if budgets:
        summary["budget"]["lora_parameters"] = next(iter(budgets.values())).lora_parameters
    summary["protocol"] = options["protocol"]
    summary["budget"]["head_parameters"] = options["head_parameters"]
    if options["head_parameters"]:
        summary["budget"]["head_rule"] = (
            f"the classification head ({options['head_parameters']:,} parameters) is trained in full in every "
            "arm, the same size and the same initialisation in each; it is not counted in the budget, which "
            "compares the adapters alone")
    summary["plans"] = {k: p.to_dict() for k, p in plans.items()}
    summary["command"] = command
    summary["total"]["this_invocation_seconds"] = time.perf_counter() - started
    if (out / AFTER_FILE).is_file():
        summary["after"] = read_json(out / AFTER_FILE, "before-and-after probe", error=ComparisonError)
    if (out / JOBS_FILE).is_file():
        jobs = read_json(out / JOBS_FILE, "jobs record", error=ComparisonError)
        summary["jobs"] = jobs
        summary["notes"].append(
            f"Runs ran in up to {jobs.get('jobs')} processes side by side (--jobs, {JOBS_FILE}): their seconds, "
            "throughputs and peak memories are those of a shared device, not of one run alone.")
    write_json(out / SUMMARY_FILE, summary)
    render_comparison(summary, out / REPORT_FILE, command=command)
    return summary


def _question_difference(runs: dict[str, dict[str, Any]], arm: str, reference: str, ev: str,
                         seeds: Sequence[int]) -> Optional[dict[str, Any]]:
    """:func:`.stats.question_difference` of ``arm`` against ``reference`` on set ``ev`` over ``seeds``
    from the runs' per-question correctness; None where a run lacks it."""
    mine, ref = [], []
    for k in seeds:
        a = runs.get(NONE if arm == NONE else f"{arm}-seed{k}", {}).get("eval", {}).get(ev, {}).get("correct")
        b = runs.get(f"{reference}-seed{k}", {}).get("eval", {}).get(ev, {}).get("correct")
        if a is None or b is None or len(a) != len(b) or not a:
            return None
        mine.append(a)
        ref.append(b)
    return stats.question_difference(mine, ref)


def summarize(runs: dict[str, dict[str, Any]], arm_names: Sequence[str], seeds: int, *,
              settings: dict[str, Any], reference: str = "lora") -> dict[str, Any]:
    """The summary of the run records ``runs`` (run name → record): per evaluation set and arm the
    set's headline metric (``metrics``: accuracy, MRPC's F1, CoLA's MCC) by seed with mean ± std (and the
    accuracy's mean ± std beside a metric that is not accuracy), the paired difference against
    ``reference`` (LoRA) with its t interval and verdict, whether the set separates the methods, and the
    cost of every run. Records without a ``metric`` (written before it was recorded) count accuracy."""
    evals = list(settings.get("evals", {}))
    table: dict[str, dict[str, Any]] = {}
    separation = {}
    metrics = {}
    for ev in evals:
        scored = [r["eval"][ev] for r in runs.values() if ev in r.get("eval", {})]
        metric = next((e["metric"] for e in scored if e.get("metric")), "accuracy")
        metrics[ev] = stats.metric_info(metric)
        rows: dict[str, Any] = {}
        for arm in arm_names:
            values, accuracy = {}, {}
            for k in range(seeds):
                rec = runs.get(NONE if arm == NONE else f"{arm}-seed{k}")
                if rec is not None and ev in rec.get("eval", {}):
                    e = rec["eval"][ev]
                    values[k] = e.get("score", e["accuracy"]) if metric != "accuracy" else e["accuracy"]
                    accuracy[k] = e["accuracy"]
            take = (lambda v: list(v.values())[:1]) if arm == NONE else (lambda v: list(v.values()))
            rows[arm] = {"values": {str(k): v for k, v in values.items()}, **stats.mean_std(take(values))}
            if metric != "accuracy":
                rows[arm]["accuracy"] = {"values": {str(k): v for k, v in accuracy.items()},
                                         **stats.mean_std(take(accuracy))}
        if reference in arm_names:
            ref = {int(k): v for k, v in rows[reference]["values"].items()}
            for arm in arm_names:
                if arm == reference:
                    continue
                mine = {int(k): v for k, v in rows[arm]["values"].items()}
                paired = sorted(set(ref) & set(mine))
                diff = stats.paired_difference([mine[k] for k in paired], [ref[k] for k in paired])
                diff["seeds"] = paired
                if metric == "accuracy" and paired:
                    questions = _question_difference(runs, arm, reference, ev, paired)
                    if questions is not None:
                        diff["questions"] = questions
                        diff["verdict"] = stats.combined_verdict(diff)
                rows[arm]["difference"] = diff
        table[ev] = rows
        separation[ev] = stats.separation({a: rows[a]["mean"] for a in arm_names},
                                          {a: rows[a]["difference"] for a in arm_names if "difference" in rows[a]},
                                          metric=metric)
    cost = [{"run": name, "method": rec["method"], "seed": rec["seed"], "device": rec.get("device"),
             "device_name": rec.get("device_name"),
             "trainable_parameters": rec.get("trainable_parameters"),
             "adapter_parameters": rec.get("adapter_parameters", rec.get("trainable_parameters")),
             "head_parameters": rec.get("head_parameters", 0), "budget_ratio": rec.get("budget_ratio"),
             "train_seconds": rec.get("train_seconds"), "eval_seconds": rec.get("eval_seconds"),
             "wall_seconds": rec.get("wall_seconds"), "tokens_per_second": rec.get("tokens_per_second"),
             "peak_memory_bytes": rec.get("peak_memory_bytes"), "peak_memory_kind": rec.get("peak_memory_kind")}
            for name, rec in runs.items()]
    n_total = sum(1 if a == NONE else seeds for a in arm_names)
    notes = []
    if seeds < 2:
        notes.append("One seed: no interval, so no difference can be called; run at least 2 (3 or more for a "
                     "useful interval).")
    elif seeds < 5:
        notes.append(f"{seeds} seeds: the t interval uses t(0.975, {seeds - 1}) = "
                     f"{stats.paired_difference([0.0] * seeds, [0.0] * seeds)['t_quantile']:.2f}, so only large "
                     "differences can exclude 0.")
    if reference not in arm_names:
        notes.append("LoRA is not among the methods: no paired differences.")
    if any(r.get("peak_memory_kind") == "cpu_peak_rss_of_process" for r in runs.values()):
        notes.append("On the CPU, peak memory is the process's peak resident size up to the end of each run "
                     "(ru_maxrss: model loading and earlier runs included), not the run's own.")
    auto = next((r["auto"] for r in runs.values() if r.get("auto")), None)
    first = next(iter(runs.values()), {})
    return {
        "schema": SUMMARY_SCHEMA, "schema_version": SCHEMA_VERSION, "model": settings.get("model"),
        "data": settings.get("paths", {}).get("data"), "evals": evals, "methods": list(arm_names), "seeds": list(range(seeds)),
        "reference": reference, "level": stats.LEVEL, "floor": stats.FLOOR, "settings": settings,
        "budget": {"r": settings.get("r"), "tolerance": TOLERANCE,
                   "lora_parameters": next((r["lora_parameters"] for r in runs.values() if r.get("lora_parameters")),
                                           None)},
        "rules": {"interval": "Student-t interval of the mean paired per-seed difference (ddof = 1); none with "
                              "fewer than 2 paired seeds.",
                  "question_interval": "for accuracy: percentile bootstrap over the test questions of the "
                                       "per-question difference averaged over the paired seeds "
                                       f"({stats.N_BOOT} resamples): the noise of the test set's sample of "
                                       "questions, which the seed interval does not cover.",
                  "verdict": f"'{stats.BETTER}' / '{stats.WORSE}' only when the seed interval excludes 0 and, "
                             f"for accuracy, the question interval lies on the same side; '{stats.TEST_NOISE}' "
                             f"when only the seed interval does; else '{stats.NOISE}'.",
                  "separation": f"a set cannot separate the methods when every mean of its metric is below "
                                f"{stats.FLOOR:g} (accuracy and F1: {100 * stats.FLOOR:g} %; MCC: {stats.FLOOR:g}) "
                                "or when no interval against LoRA excludes 0."},
        "metrics": metrics, "table": table, "separation": separation, "runs": cost, "auto": auto, "notes": notes,
        "total": {"device_seconds": sum(c["wall_seconds"] or 0.0 for c in cost), "runs_done": len(runs),
                  "runs_total": n_total},
        "complete": len(runs) == n_total, "versions": first.get("versions", runtime.versions()),
    }


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a plain-text table: per evaluation set, each method's headline metric (mean ± std;
    accuracy and F1 in %, MCC as it is), its paired difference against LoRA with the interval
    (percentage points, or MCC units) and the verdict; then the separation reading, what ``auto`` chose
    and the notes."""
    lines = []
    for ev, rows in summary["table"].items():
        info = summary.get("metrics", {}).get(ev) or stats.metric_info("accuracy")
        k, dec = (100, 1) if info["percent"] else (1, 3)
        unit, dunit = (" %", "pp") if info["percent"] else ("", info["label"])
        lines.append(f"{ev}:")
        lines.append(f"  {'method':<20} {'seeds':>5}  {info['label'] + unit:>16}  "
                     f"{'vs LoRA, ' + dunit + ' [seeds 95 % CI] q[questions]':>48}  verdict")
        for arm, cell in rows.items():
            acc = "—" if cell["mean"] is None else (f"{k * cell['mean']:.{dec}f}" + (
                f" ± {k * cell['std']:.{dec}f}" if cell["std"] is not None else ""))
            d = cell.get("difference")
            if d is None or d.get("mean") is None:
                diff, verdict = "—", ("reference" if arm == summary["reference"] else "—")
            else:
                diff = f"{k * d['mean']:+.{dec}f}" + (f" [{k * d['low']:+.{dec}f}, {k * d['high']:+.{dec}f}]"
                                                       if d["low"] is not None else "")
                q = d.get("questions")
                if q:
                    diff += f" q[{k * q['low']:+.{dec}f}, {k * q['high']:+.{dec}f}]"
                verdict = d["verdict"]
            lines.append(f"  {arm:<20} {cell['n']:>5}  {acc:>16}  {diff:>48}  {verdict}")
        sep = summary["separation"][ev]
        lines.append(f"  {'separates the methods' if sep['separates'] else 'cannot separate the methods'}: "
                     f"{sep['reason']}")
    auto = summary.get("auto")
    if auto:
        why = auto.get("heads_reason") or "no reason recorded"
        heads = (f" HydraLoRA heads: {auto['n_heads']} ({why})." if "hydralora" in auto["chosen"]
                 else f" No HydraLoRA heads (the clustering of the training prompts: {why})."
                 if auto.get("heads_reason") else "")
        lines.append(f"auto chose {auto['chosen']}: {auto.get('reason', '')}.{heads}")
    for method, agg in (summary.get("after") or {}).get("by_method", {}).items():
        n_runs, n_layers = len(agg["runs"]), len(agg["layers"])
        moved = {k: sum(row[k]["moved"] for row in agg["layers"]) for k in ("twonn", "delta")}
        top = max(agg["layers"], key=lambda row: abs(row["twonn"]["mean"] or 0.0), default=None)
        big = (f"; largest mean ID change {top['twonn']['mean']:+.2f} at layer {top['layer']}"
               if top and top["twonn"]["mean"] is not None else "")
        lines.append(f"after fine-tuning, {method} ({n_runs} run(s) × {n_layers} layers): intrinsic dimension moved "
                     f"in {moved['twonn']}, per-prompt δ_rel in {moved['delta']} run-layers (interval excluding 0)"
                     f"{big}")
    if summary.get("budget", {}).get("head_rule"):
        lines.append(f"Budget: {summary['budget']['head_rule']}.")
    total = summary["total"]
    lines.append(f"runs: {total['runs_done']} of {total['runs_total']} done; device time "
                 f"{total['device_seconds']:.1f} s")
    lines.extend(summary.get("notes", []))
    return "\n".join(lines)
