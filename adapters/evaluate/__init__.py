"""Evaluation by generation: batched greedy decoding (:mod:`.generate`), answer extraction and
scoring (:mod:`.extract`), GLUE metrics (:mod:`.metrics`); and of a sequence classifier by the argmax
of its head's logits (:mod:`.classify`). Both return an :class:`EvalResult` (``protocol`` says which).
:func:`evaluate` scores one test set by generation, :func:`evaluate_sets` several in one generation
call (one progress bar, one result per set, a :class:`SetsResult`).

The protocol is that of LLM-Adapters (Hu et al., EMNLP 2023, arXiv:2304.01933; its ``evaluate.py``
and ``commonsense_evaluate.py``), which HypLoRA, GeLoRA and HydraLoRA report against: the model
answers the Alpaca-templated instruction greedily, a rule reads the short answer out of the text, and
the answer is compared with the gold label.

The extraction rules (numbers, AQuA letters, commonsense and GLUE labels) are stated in :mod:`.extract`.

Scoring (:func:`is_correct`): numbers are right when ``|pred − gold| ≤ 0.001`` (LLM-Adapters' absolute
tolerance ``miss = 0.001``); letters and labels when equal (case-insensitively). GLUE is scored by
generating the label word (the template of :mod:`adapters.data` names the words) and reading it back,
not by comparing label-word likelihoods, so every task goes through one protocol; besides accuracy,
MRPC reports F1 of the ``equivalent`` class and CoLA Matthews' correlation (GLUE's metrics, Wang et
al. 2019). An unreadable GLUE answer is counted as the wrong class.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Optional, Sequence

import numpy as np

from geoprobe.errors import DataFormatError

from ..data import GLUE_LABEL_WORDS, Example, format_prompt
from .extract import (COMMONSENSE_LABELS, DEFAULT_NEW_TOKENS, LETTER_TASKS, NUMBER_TASKS, NUMBER_TOLERANCE,
                      extract_choice, extract_commonsense, extract_label, extract_number, extract_prediction,
                      is_correct, norm_label, response_text, task_family)
from .generate import auto_batch_size, end_token_ids, generate_answers, kv_cache_bytes_per_token
from .result import EvalResult, SetsResult
from .classify import PROTOCOL_CLASSIFICATION, PROTOCOL_GENERATION, classify
from .metrics import accuracy, f1_binary, headline_metric, matthews_corrcoef, task_metrics

log = logging.getLogger(__name__)

__all__ = ["EvalResult", "SetsResult", "evaluate", "evaluate_sets", "answer_end_ids", "check_examples", "classify", "task_metrics", "headline_metric",
           "PROTOCOL_GENERATION", "PROTOCOL_CLASSIFICATION", "generate_answers",
           "auto_batch_size", "kv_cache_bytes_per_token", "response_text", "extract_number", "extract_choice",
           "extract_label", "extract_commonsense", "extract_prediction", "task_family", "is_correct",
           "accuracy", "f1_binary", "matthews_corrcoef", "NUMBER_TASKS", "LETTER_TASKS",
           "COMMONSENSE_LABELS", "NUMBER_TOLERANCE"]


def check_examples(examples: Sequence[Example], task: Optional[str] = None,
                   where: str = "") -> tuple[list[str], list[str]]:
    """The task and the answer family (``number``, ``letter``, ``label``) of every example, checked
    before anything is generated.

    Raises:
        DataFormatError: no examples, an example without a gold label, or a task whose answers no
            rule can read (``where`` names the set in the message).
    """
    prefix = f"{where}: " if where else ""
    if not examples:
        raise DataFormatError(f"{prefix}evaluation needs at least one example")
    tasks = [task or ex.task for ex in examples]
    families = []
    for i, (t, ex) in enumerate(zip(tasks, examples)):
        if ex.label is None:
            raise DataFormatError(f"{prefix}example {i} ({t}) has no gold label (an unlabelled test split?); "
                                  "evaluate on a labelled split")
        try:
            families.append(task_family(t, ex.label, ex.choices))
        except DataFormatError as exc:
            raise DataFormatError(f"{prefix}example {i}: {exc}") from None
    return tasks, families


def answer_end_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokenizer's end token, to stop on beside the end tokens of the model's generation config.

    Fine-tuning ends every answer with ``tokenizer.eos_token_id``
    (:func:`adapters.data.tokenize_for_training`), so an evaluated model stops there too. Where a
    model's generation config names other end tokens (some converted checkpoints), generation would
    otherwise run past the answer into text the model learned to write after that token, and the
    answer readers would see it; the mismatch is logged once per pair."""
    own = getattr(tokenizer, "eos_token_id", None)
    if own is None:
        return []
    cfg_ids = end_token_ids(model, tokenizer)
    if int(own) not in cfg_ids and (int(own), tuple(cfg_ids)) not in _REPORTED_ENDS:
        _REPORTED_ENDS.add((int(own), tuple(cfg_ids)))
        log.warning("the tokenizer's end token %d (%r) is not among the generation config's %s; answers "
                    "also end at %d, the token fine-tuning ends them with", int(own),
                    getattr(tokenizer, "eos_token", None), cfg_ids, int(own))
    return [int(own)]


_REPORTED_ENDS: set[tuple[int, tuple[int, ...]]] = set()


def _score(examples: Sequence[Example], tasks: Sequence[str], generated: Sequence[str], *, tol: float,
           seconds: float) -> EvalResult:
    """Read every answer with its task's rule and score the set against the gold labels."""
    predictions = []
    for i, (ex, t, text) in enumerate(zip(examples, tasks, generated)):
        pred = extract_prediction(text, t, ex.choices, ex.label)
        predictions.append({"prompt_id": i, "generated": text, "extracted": pred, "gold": ex.label,
                            "correct": is_correct(pred, ex.label, t, tol=tol), "task": t})
    acc = float(np.mean([p["correct"] for p in predictions]))
    metrics: dict[str, float] = {"accuracy": acc}
    names = sorted(set(tasks))
    if len(names) == 1 and names[0] in GLUE_LABEL_WORDS:
        words = examples[0].choices or GLUE_LABEL_WORDS[names[0]]
        y_true, y_pred = _glue_classes(predictions, words)
        metrics.update({k: v for k, v in task_metrics(names[0], y_true, y_pred).items() if k != "accuracy"})
    if len(names) > 1:
        for name in names:
            metrics[f"accuracy/{name}"] = float(np.mean([p["correct"] for p in predictions if p["task"] == name]))
    n_unparsed = sum(p["extracted"] is None for p in predictions)
    return EvalResult(task=names[0] if len(names) == 1 else "mixed", n=len(examples), accuracy=acc,
                      predictions=predictions, seconds=seconds, metrics=metrics, n_unparsed=n_unparsed)


def evaluate(model: Any, tokenizer: Any, examples: Sequence[Example], *, task: Optional[str] = None,
             batch_size: Optional[int] = None, max_new_tokens: Optional[int] = None, template: str = "alpaca",
             device: Any = None, tol: float = NUMBER_TOLERANCE, static_cache: bool = False,
             progress: bool = False) -> EvalResult:
    """Generate an answer for each example (greedy, :func:`generate_answers`), read it with the
    task's rule and score it against ``Example.label``.

    ``task`` overrides every example's task. ``max_new_tokens`` defaults to 256 for math and AQuA
    (chain-of-thought answers) and 32 for label tasks (LLM-Adapters' commonsense setting).
    ``batch_size`` ``None`` fits the batch to the device (:func:`auto_batch_size`).
    """
    t0 = time.perf_counter()
    examples = list(examples)
    tasks, families = check_examples(examples, task)
    if max_new_tokens is None:
        max_new_tokens = max(DEFAULT_NEW_TOKENS[f] for f in families)
    prompts = [format_prompt(ex, template) for ex in examples]
    generated = generate_answers(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                 device=device, static_cache=static_cache, progress=progress,
                                 stop_ids=answer_end_ids(model, tokenizer))
    res = _score(examples, tasks, generated, tol=tol, seconds=time.perf_counter() - t0)
    log.info("evaluated %d examples of %s: accuracy %.4f (%d unreadable) in %.1f s",
             res.n, res.task, res.accuracy, res.n_unparsed, res.seconds)
    return res


def evaluate_sets(model: Any, tokenizer: Any, sets: Sequence[tuple[str, Sequence[Example]]], *,
                  batch_size: Optional[int] = None, max_new_tokens: Optional[int] = None, template: str = "alpaca",
                  device: Any = None, tol: float = NUMBER_TOLERANCE, static_cache: bool = False,
                  progress: bool = False) -> SetsResult:
    """Evaluate several named test sets in one generation call: every set is checked before
    anything is generated, all prompts are sorted and batched together (one progress bar), and
    each set is scored on its own, as :func:`evaluate` would score it.

    ``max_new_tokens`` ``None`` gives each set its own default (256 for math and AQuA, 32 for
    labels); the sets are then generated in groups of equal length, still under one bar.

    Raises:
        DataFormatError: no sets, two sets of one name, or a set :func:`check_examples` refuses.
    """
    t0 = time.perf_counter()
    if not sets:
        raise DataFormatError("evaluate_sets needs at least one test set")
    names = [name for name, _ in sets]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise DataFormatError(f"test set {twice[0]!r} is given twice; give each set once")
    checked = []
    for name, examples in sets:
        examples = list(examples)
        tasks, families = check_examples(examples, where=name)
        budget = max_new_tokens or max(DEFAULT_NEW_TOKENS[f] for f in families)
        checked.append((examples, tasks, budget))
    generated: list[list[str]] = [[] for _ in sets]
    total = sum(len(ex) for ex, _, _ in checked)
    from geoprobe.runtime import progress as progress_bar

    stop_ids = answer_end_ids(model, tokenizer)
    with progress_bar(total, "evaluating", enabled=progress, unit="answer") as bar:
        for budget in sorted({b for _, _, b in checked}):
            members = [k for k, (_, _, b) in enumerate(checked) if b == budget]
            prompts = [format_prompt(ex, template) for k in members for ex in checked[k][0]]
            texts = generate_answers(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=budget,
                                     device=device, static_cache=static_cache, bar=bar, stop_ids=stop_ids)
            for k in members:
                generated[k], texts = texts[:len(checked[k][0])], texts[len(checked[k][0]):]
    seconds = time.perf_counter() - t0
    results = [_score(ex, tasks, generated[k], tol=tol, seconds=seconds * len(ex) / total)
               for k, (ex, tasks, _) in enumerate(checked)]
    n_correct = sum(sum(bool(p["correct"]) for p in r.predictions) for r in results)
    out = SetsResult(names=names, results=results, n=total, n_correct=n_correct, accuracy=n_correct / total,
                     n_unparsed=sum(r.n_unparsed for r in results), seconds=seconds)
    for name, r in zip(names, results):
        log.info("%s: accuracy %.4f (%d examples, %d unreadable)", name, r.accuracy, r.n, r.n_unparsed)
    log.info("evaluated %d sets, %d examples: accuracy %.4f in %.1f s", len(names), total, out.accuracy, seconds)
    return out


def _glue_classes(predictions: list[dict[str, Any]], words: Sequence[str]) -> tuple[list[int], list[int]]:
    """Class ids (index in ``words``) of gold and prediction; an unreadable prediction becomes the
    other class of the binary task, so it always counts as an error."""
    index = {norm_label(w): k for k, w in enumerate(words)}
    y_true, y_pred = [], []
    for p in predictions:
        t = index[norm_label(p["gold"])]
        y_true.append(t)
        y_pred.append(index[norm_label(p["extracted"])] if p["extracted"] is not None else 1 - t)
    return y_true, y_pred
