"""Evaluation by generation: batched greedy decoding (:mod:`.generate`), answer extraction and
scoring (:mod:`.extract`), GLUE metrics (:mod:`.metrics`); and of a sequence classifier by the argmax
of its head's logits (:mod:`.classify`). Both return an :class:`EvalResult` (``protocol`` says which).

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
from .generate import generate_answers
from .result import EvalResult
from .classify import PROTOCOL_CLASSIFICATION, PROTOCOL_GENERATION, classify
from .metrics import accuracy, f1_binary, matthews_corrcoef, task_metrics

log = logging.getLogger(__name__)

__all__ = ["EvalResult", "evaluate", "classify", "task_metrics", "PROTOCOL_GENERATION", "PROTOCOL_CLASSIFICATION",
           "generate_answers", "response_text", "extract_number", "extract_choice",
           "extract_label", "extract_commonsense", "extract_prediction", "task_family", "is_correct",
           "accuracy", "f1_binary", "matthews_corrcoef", "NUMBER_TASKS", "LETTER_TASKS",
           "COMMONSENSE_LABELS", "NUMBER_TOLERANCE"]


def evaluate(model: Any, tokenizer: Any, examples: Sequence[Example], *, task: Optional[str] = None,
             batch_size: int = 8, max_new_tokens: Optional[int] = None, template: str = "alpaca",
             device: Any = None, tol: float = NUMBER_TOLERANCE) -> EvalResult:
    """Generate an answer for each example (greedy, :func:`generate_answers`), read it with the
    task's rule and score it against ``Example.label``.

    ``task`` overrides every example's task. ``max_new_tokens`` defaults to 256 for math and AQuA
    (chain-of-thought answers) and 32 for label tasks (LLM-Adapters' commonsense setting).
    """
    t0 = time.perf_counter()
    examples = list(examples)
    if not examples:
        raise DataFormatError("evaluate needs at least one example")
    tasks = [task or ex.task for ex in examples]
    for i, ex in enumerate(examples):
        if ex.label is None:
            raise DataFormatError(f"example {i} ({tasks[i]}) has no gold label (an unlabelled test split?); "
                                  "evaluate on a labelled split")
    families = [task_family(t, ex.label, ex.choices) for t, ex in zip(tasks, examples)]
    if max_new_tokens is None:
        max_new_tokens = max(DEFAULT_NEW_TOKENS[f] for f in families)
    prompts = [format_prompt(ex, template) for ex in examples]
    generated = generate_answers(model, tokenizer, prompts, batch_size=batch_size,
                                 max_new_tokens=max_new_tokens, device=device)
    predictions = []
    for i, (ex, t, text) in enumerate(zip(examples, tasks, generated)):
        pred = extract_prediction(text, t, ex.choices, ex.label)
        predictions.append({"prompt_id": i, "generated": text, "extracted": pred, "gold": ex.label,
                            "correct": is_correct(pred, ex.label, t, tol=tol), "task": t})
    correct = [p["correct"] for p in predictions]
    acc = float(np.mean(correct))
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
    seconds = time.perf_counter() - t0
    log.info("evaluated %d examples of %s: accuracy %.4f (%d unreadable) in %.1f s",
             len(examples), ",".join(names), acc, n_unparsed, seconds)
    return EvalResult(task=names[0] if len(names) == 1 else "mixed", n=len(examples), accuracy=acc,
                      predictions=predictions, seconds=seconds, metrics=metrics, n_unparsed=n_unparsed)


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
