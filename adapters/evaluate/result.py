"""The record of one evaluation run, written as the evaluation JSON (schema ``geoprobe.evaluation``), and
of several test sets evaluated in one call."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from geoprobe.profile import Record

__all__ = ["EvalResult", "SetsResult"]


@dataclass(frozen=True)
class EvalResult(Record):
    """Scores of one evaluation run.

    ``accuracy`` is the fraction correct; ``metrics`` holds ``accuracy`` and, where GLUE asks for
    them, ``f1`` (MRPC) and ``mcc`` (CoLA), plus ``accuracy/<task>`` when several tasks were mixed.
    ``predictions`` holds one ``{prompt_id, generated, extracted, gold, correct, task}`` per example
    (a classifier's: ``{prompt_id, extracted, gold, correct, task, class_id, gold_id, logits}``), in
    input order; ``n_unparsed`` counts answers the rule could not read (0 for a classifier).
    ``protocol`` is ``generation`` or ``classification``.
    """

    task: str
    n: int
    accuracy: float
    predictions: list[dict[str, Any]]
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    n_unparsed: int = 0
    protocol: str = "generation"


@dataclass(frozen=True)
class SetsResult(Record):
    """Scores of several test sets evaluated in one call (:func:`evaluate_sets`).

    ``names`` label the sets (the file each came from, for the command line) and ``results`` hold one
    :class:`EvalResult` per set, in the same order, each exactly what :func:`evaluate` gives for that
    set alone (its ``seconds`` are its share of the generation time, by example count). ``n``,
    ``n_correct``, ``accuracy`` and ``n_unparsed`` are over all examples pooled; ``seconds`` is the
    wall time of the whole call.
    """

    names: list[str]
    results: list[EvalResult]
    n: int
    n_correct: int
    accuracy: float
    n_unparsed: int
    seconds: float
