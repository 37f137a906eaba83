"""Classification metrics of GLUE (Wang et al. 2019): accuracy, F1 of one class (MRPC) and Matthews'
correlation (CoLA), computed by scikit-learn (``sklearn.metrics``), and :func:`task_metrics`, which
says which of them a task reports.

* accuracy = (1/n) Σ_i [ŷ_i = y_i];
* F1 of the positive class = 2·TP / (2·TP + FP + FN), 0 when that is 0/0;
* Matthews' correlation (Matthews 1975; Gorodkin 2004 for several classes)
  = (c·s − Σ_k p_k t_k) / sqrt((s² − Σ_k p_k²)(s² − Σ_k t_k²)) with c correct predictions, s samples,
  t_k / p_k the true / predicted counts of class k; 0 when the denominator is 0.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from geoprobe.errors import DataFormatError

__all__ = ["accuracy", "f1_binary", "matthews_corrcoef", "task_metrics", "headline_metric", "HEADLINE_METRICS",
           "POSITIVE_CLASS"]

POSITIVE_CLASS = 1
"""GLUE's positive class id for F1 (MRPC: ``equivalent``, the second label word)."""


def accuracy(y_true: Sequence[Any], y_pred: Sequence[Any]) -> float:
    """Fraction of positions where ``y_pred`` equals ``y_true`` (``sklearn.metrics.accuracy_score``)."""
    from sklearn.metrics import accuracy_score

    t, p = _pair(y_true, y_pred)
    return float(accuracy_score(t, p))


def f1_binary(y_true: Sequence[Any], y_pred: Sequence[Any], positive: Any = POSITIVE_CLASS) -> float:
    """F1 of the ``positive`` class, 2·TP / (2·TP + FP + FN), 0 when that is 0/0
    (``sklearn.metrics.f1_score`` with ``pos_label=positive``, ``zero_division=0``); the other labels
    together count as the negative class."""
    from sklearn.metrics import f1_score

    t, p = _pair(y_true, y_pred)
    t, p = (t == positive).astype(int), (p == positive).astype(int)
    return float(f1_score(t, p, pos_label=1, average="binary", zero_division=0.0))


def matthews_corrcoef(y_true: Sequence[Any], y_pred: Sequence[Any]) -> float:
    """Matthews' correlation (the module's formula; ``sklearn.metrics.matthews_corrcoef``), 0 when
    the denominator is 0."""
    from sklearn.metrics import matthews_corrcoef as mcc

    t, p = _pair(y_true, y_pred)
    return float(mcc(t, p))


def task_metrics(task: str, y_true: Sequence[int], y_pred: Sequence[int]) -> dict[str, float]:
    """The metrics GLUE reports for ``task`` from class ids: ``accuracy`` always, ``f1`` of class
    :data:`POSITIVE_CLASS` for MRPC, ``mcc`` for CoLA."""
    out = {"accuracy": accuracy(y_true, y_pred)}
    if task == "mrpc":
        out["f1"] = f1_binary(y_true, y_pred, positive=POSITIVE_CLASS)
    if task == "cola":
        out["mcc"] = matthews_corrcoef(y_true, y_pred)
    return out


HEADLINE_METRICS = {"mrpc": "f1", "cola": "mcc"}
"""The one metric a table reports per GLUE task where it is not accuracy (GLUE, Wang et al. 2019):
F1 of the ``equivalent`` class for MRPC, Matthews' correlation for CoLA."""


def headline_metric(task: str) -> str:
    """The key of :func:`task_metrics` a results table reports for ``task``: ``f1`` for MRPC, ``mcc``
    for CoLA, ``accuracy`` for every other task."""
    return HEADLINE_METRICS.get(task, "accuracy")


def _pair(y_true: Sequence[Any], y_pred: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    t, p = np.asarray(list(y_true)), np.asarray(list(y_pred))
    if t.shape != p.shape or t.ndim != 1:
        raise DataFormatError(f"y_true and y_pred must be equal-length 1-D sequences, got {t.shape} and {p.shape}")
    if t.size == 0:
        raise DataFormatError("metrics need at least one prediction")
    return t, p
