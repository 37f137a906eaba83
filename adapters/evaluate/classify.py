"""Evaluation of a sequence classifier (an encoder with a classification head): the predicted class of
each example is argmax_k z_k of the head's logits z, scored against the gold class id with GLUE's
metrics (:func:`~adapters.evaluate.metrics.task_metrics`: accuracy, F1 for MRPC, Matthews'
correlation for CoLA, computed by scikit-learn)."""
from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import numpy as np

from geoprobe.errors import DataFormatError

from ..data import Example, class_labels, collate_classification, tokenize_for_classification
from .metrics import task_metrics
from .result import EvalResult

log = logging.getLogger(__name__)

__all__ = ["classify", "PROTOCOL_GENERATION", "PROTOCOL_CLASSIFICATION"]

PROTOCOL_GENERATION = "generation"
PROTOCOL_CLASSIFICATION = "classification"


def classify(model: Any, tokenizer: Any, examples: Sequence[Example], *, batch_size: int = 32,
             max_length: int = 256, device: Any = None) -> EvalResult:
    """Predict the class of every example with a sequence classifier and score the predictions.

    Rows are tokenised as in training (:func:`~adapters.data.tokenize_for_classification`), sorted by
    length so each batch pads little, and run in evaluation mode without gradients; the prediction is
    the argmax of the logits (ties to the lower class id). Returns an
    :class:`~adapters.evaluate.EvalResult` with ``protocol="classification"``, one prediction per
    example in input order (the label word as ``extracted``, its ``class_id``, the gold word and id,
    ``correct`` and the ``logits``) and the task's metrics.

    Raises:
        DataFormatError: no examples, an unlabelled split, data without a label set (it needs
            generation), or ``batch_size`` < 1.
    """
    import torch

    t0 = time.perf_counter()
    examples = list(examples)
    if batch_size < 1:
        raise DataFormatError(f"batch_size must be >= 1, got {batch_size}")
    if not examples:
        raise DataFormatError("evaluate needs at least one example")
    labels = class_labels(examples)
    n_classes = int(getattr(getattr(model, "config", None), "num_labels", len(labels)))
    if n_classes != len(labels):
        raise DataFormatError(f"the classifier has {n_classes} classes but the data has {len(labels)} labels "
                              f"({', '.join(labels)}); evaluate on the task it was trained for")
    rows = tokenize_for_classification(examples, tokenizer, max_length=max_length)
    pad = tokenizer.pad_token_id
    if device is None:
        device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]["input_ids"]), i))
    logits: list[list[float]] = [[] for _ in rows]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                batch = collate_classification([rows[i] for i in idx], pad)
                inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
                z = model(**inputs).logits.float().cpu()
                for i, zi in zip(idx, z.tolist()):
                    logits[i] = zi
    finally:
        model.train(was_training)
    task = examples[0].task
    predictions = []
    for i, (ex, row, z) in enumerate(zip(examples, rows, logits)):
        k = int(np.argmax(z))
        gold = row["labels"][0]
        predictions.append({"prompt_id": i, "extracted": labels[k], "gold": ex.label, "correct": k == gold,
                            "task": task, "class_id": k, "gold_id": gold, "logits": z})
    metrics = task_metrics(task, [p["gold_id"] for p in predictions], [p["class_id"] for p in predictions])
    seconds = time.perf_counter() - t0
    log.info("classified %d examples of %s: accuracy %.4f in %.1f s", len(examples), task, metrics["accuracy"],
             seconds)
    return EvalResult(task=task, n=len(examples), accuracy=metrics["accuracy"], predictions=predictions,
                      seconds=seconds, metrics=metrics, n_unparsed=0, protocol=PROTOCOL_CLASSIFICATION)
