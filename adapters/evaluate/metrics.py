"""Classification metrics of GLUE (Wang et al. 2019): accuracy, F1 of one class (MRPC) and
Matthews' correlation (CoLA), as scikit-learn computes them."""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from geoprobe.errors import DataFormatError

__all__ = ["accuracy", "f1_binary", "matthews_corrcoef"]


def accuracy(y_true: Sequence[Any], y_pred: Sequence[Any]) -> float:
    """Fraction of positions where ``y_pred`` equals ``y_true``."""
    t, p = _pair(y_true, y_pred)
    return float(np.mean(t == p))


def f1_binary(y_true: Sequence[Any], y_pred: Sequence[Any], positive: Any = 1) -> float:
    """F1 of the ``positive`` class: 2·TP / (2·TP + FP + FN); 0 when that is 0/0 (as scikit-learn)."""
    t, p = _pair(y_true, y_pred)
    tp = int(np.sum((t == positive) & (p == positive)))
    fp = int(np.sum((t != positive) & (p == positive)))
    fn = int(np.sum((t == positive) & (p != positive)))
    den = 2 * tp + fp + fn
    return 2.0 * tp / den if den else 0.0


def matthews_corrcoef(y_true: Sequence[Any], y_pred: Sequence[Any]) -> float:
    """Matthews' correlation (Gorodkin's multi-class form, binary MCC for two classes):
    ``(c·s − Σ p_k t_k) / sqrt((s² − Σ p_k²)(s² − Σ t_k²))`` with ``c`` correct predictions, ``s``
    samples, ``t_k``/``p_k`` true/predicted counts of class k; 0 when the denominator is 0."""
    t, p = _pair(y_true, y_pred)
    classes, inv = np.unique(np.concatenate([t, p]), return_inverse=True)
    ti, pi = inv[: len(t)], inv[len(t):]
    k = len(classes)
    conf = np.zeros((k, k), dtype=np.float64)
    np.add.at(conf, (ti, pi), 1.0)
    tk, pk = conf.sum(axis=1), conf.sum(axis=0)
    c, s = np.trace(conf), conf.sum()
    den = (s * s - pk @ pk) * (s * s - tk @ tk)
    return float((c * s - tk @ pk) / math.sqrt(den)) if den > 0 else 0.0


def _pair(y_true: Sequence[Any], y_pred: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    t, p = np.asarray(list(y_true)), np.asarray(list(y_pred))
    if t.shape != p.shape or t.ndim != 1:
        raise DataFormatError(f"y_true and y_pred must be equal-length 1-D sequences, got {t.shape} and {p.shape}")
    if t.size == 0:
        raise DataFormatError("metrics need at least one prediction")
    return t, p
