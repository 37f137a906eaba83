"""The training data as the loop sees it: answer-masked, packed sequences, their digest, and the
order in which micro-batches visit them.

Epoch e visits the packed sequences in the order of a permutation drawn from
``numpy.random.default_rng([seed, e])``; micro-batch m is the slice (m mod M)·B … (m mod M + 1)·B of
epoch ⌊m/M⌋'s order (M = ⌈n/B⌉ micro-batches per epoch, B the batch size), so the data position is
the micro-batch count alone and a resumed run continues exactly where it stopped.
"""
from __future__ import annotations

import hashlib
import logging
import math
from typing import Any, Sequence

import numpy as np

from geoprobe.errors import DataFormatError

from ..data import Example, format_prompt, pack, tokenize_for_classification, tokenize_for_training

log = logging.getLogger(__name__)

__all__ = ["Order", "data_digest", "tokenize_examples", "training_sequences", "classification_sequences"]


class Order:
    """Micro-batch m → indices of the packed sequences (see the module docstring)."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.bs, self.seed = n, batch_size, seed
        self.per_epoch = math.ceil(n / batch_size)
        self._cache: dict[int, np.ndarray] = {}

    def indices(self, micro: int) -> list[int]:
        """The sequence indices of micro-batch ``micro``."""
        epoch, j = divmod(micro, self.per_epoch)
        perm = self._cache.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._cache = {epoch: perm}
        return [int(i) for i in perm[j * self.bs:(j + 1) * self.bs]]


def _fits(examples: list[Example], tokenizer: Any, max_length: int, template: str) -> list[Example]:
    """The examples whose answer (with EOS and the prompt's leading special tokens, as
    :func:`~adapters.data.tokenize_for_training` keeps them) leaves room for a prompt token."""
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    prompts = tokenizer([format_prompt(ex, template) for ex in examples], add_special_tokens=True)["input_ids"]
    answers = tokenizer([ex.answer for ex in examples], add_special_tokens=False)["input_ids"]
    keep = []
    for ex, p, a in zip(examples, prompts, answers):
        lead = next((k for k, t in enumerate(p) if t not in special), len(p))
        if len(p) + len(a) + 1 <= max_length or max_length - (len(a) + 1) - lead >= 1:
            keep.append(ex)
    return keep


def tokenize_examples(examples: Sequence[Example], tokenizer: Any, max_length: int,
                      template: str) -> tuple[list[dict[str, list[int]]], int]:
    """Answer-masked token ids and the number of examples dropped: examples whose answer leaves no
    room for a prompt token within ``max_length`` are dropped — counted, logged and recorded in the
    results."""
    examples = list(examples)
    if not examples:
        raise DataFormatError("no training examples; check --data and --limit")
    for i, ex in enumerate(examples):
        if not ex.answer:
            raise DataFormatError(f"training example {i} ({ex.task}) has no answer text to train on "
                                  "(an unlabelled split?); train on a labelled split")
    keep = _fits(examples, tokenizer, max_length, template)
    dropped = len(examples) - len(keep)
    if not keep:
        raise DataFormatError(f"every training example has an answer longer than max_length={max_length} "
                              "tokens; raise --max-length")
    if dropped:
        log.warning("dropped %d of %d training examples whose answer does not fit max_length=%d",
                    dropped, len(examples), max_length)
    return tokenize_for_training(keep, tokenizer, max_length=max_length, template=template), dropped


def training_sequences(examples: Sequence[Example], tokenizer: Any, *, max_length: int, template: str,
                       packed: bool) -> tuple[list[dict[str, list[int]]], int]:
    """The sequences the loop trains on (packed unless ``packed`` is False) and the number of
    examples dropped as too long."""
    rows, dropped = tokenize_examples(examples, tokenizer, max_length, template)
    return (pack(rows, max_length) if packed else rows), dropped


def classification_sequences(examples: Sequence[Example], tokenizer: Any, *,
                             max_length: int) -> tuple[list[dict[str, list[int]]], int]:
    """The rows a sequence classifier trains on (one per example, truncated to ``max_length``, never
    packed: each example has its own [CLS] summary) and the number dropped (none)."""
    examples = list(examples)
    if not examples:
        raise DataFormatError("no training examples; check --data and --limit")
    return tokenize_for_classification(examples, tokenizer, max_length=max_length), 0


def data_digest(seqs: Sequence[dict[str, list[int]]]) -> str:
    """SHA-256 over the token ids, labels and position ids of ``seqs``: a resumed run must see the
    same data."""
    h = hashlib.sha256()
    for s in seqs:
        for key in ("input_ids", "labels", "position_ids"):
            if key in s:
                h.update(np.asarray(s[key], dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()
