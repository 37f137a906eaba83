"""Evaluation by generation: batched greedy decoding, answer extraction and scoring.

The protocol is that of LLM-Adapters (Hu et al., EMNLP 2023, arXiv:2304.01933; its ``evaluate.py``
and ``commonsense_evaluate.py``), which HypLoRA, GeLoRA and HydraLoRA report against: the model
answers the Alpaca-templated instruction greedily, a rule reads the short answer out of the text, and
the answer is compared with the gold label.

Extraction rules, applied to the response (:func:`response_text`: for a full decoded sequence, one
that starts with the template, the text after the first ``### Response:`` marker; cut before the next
line starting with ``###``, i.e. where a model that did not stop starts a new instruction of its own):

* numbers (:func:`extract_number`): all commas are removed, then the *last* number is taken, read by
  LLM-Adapters' pattern ``-?\\d+\\.?\\d*`` (negatives and decimals; ``5-3`` reads as 5 and -3, as there).
  With ``fractions=True`` (default) a number followed by ``/`` and a number (``3/4``, ``3 / 4``) is
  read as the fraction, 0.75, where LLM-Adapters would read 4; a zero denominator falls back to the
  LLM-Adapters reading. No number gives ``None`` (LLM-Adapters uses ``inf``; both score as wrong).
* AQuA letters (:func:`extract_choice`): first an explicit statement, ``answer is (C)``,
  ``answer: C``, ``option C``; then the first parenthesised letter ``(C)``; then the first standalone
  capital letter A–E, skipping the article "A" when a lower-case word follows it ("A train ...").
  ``rule="llm_adapters"`` reproduces LLM-Adapters exactly: the first character A–E anywhere in the
  text, even inside a word ("Because" → B), for comparison with published numbers.
* labels (:func:`extract_label`, :func:`extract_commonsense`): the first occurrence of any candidate
  label — ``true``/``false`` (BoolQ), ``solution1``/``solution2`` (PIQA), ``answer1``–``answer5``
  (ARC, OpenBookQA, SIQA), ``ending1``–``ending4`` (HellaSwag), ``option1``/``option2``
  (WinoGrande), the GLUE label words — as LLM-Adapters' ``commonsense_evaluate.py`` does with
  ``re.findall(...)[0]``, but matched case-insensitively and as whole words (``untrue`` is not
  ``true``; ``not_entailment`` is not ``entailment``; ``_`` and a space are interchangeable).

Scoring (:func:`is_correct`): numbers are right when ``|pred − gold| ≤ 0.001`` (LLM-Adapters' absolute
tolerance ``miss = 0.001``); letters and labels when equal (case-insensitively). GLUE is scored by
generating the label word (the template of :mod:`adapters.data` names the words) and reading it back,
not by comparing label-word likelihoods, so every task goes through one protocol; besides accuracy,
MRPC reports F1 of the ``equivalent`` class and CoLA Matthews' correlation (GLUE's metrics, Wang et
al. 2019). An unreadable GLUE answer is counted as the wrong class.
"""
from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from geoprobe.errors import DataFormatError
from geoprobe.profile import Record

from .data import GLUE_LABEL_WORDS, RESPONSE_MARKER, Example, format_prompt

log = logging.getLogger(__name__)

NUMBER_TASKS = frozenset({"gsm8k", "addsub", "multiarith", "svamp", "singleeq", "mawps", "math"})
LETTER_TASKS = frozenset({"aqua"})
COMMONSENSE_LABELS: dict[str, tuple[str, ...]] = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "arc_challenge": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "arc_easy": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "openbookqa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
    "winogrande": ("option1", "option2"),
}
NUMBER_TOLERANCE = 1e-3
"""LLM-Adapters' ``miss``: a number is right when ``abs(label - predict) <= 0.001``."""

_DEFAULT_NEW_TOKENS = {"number": 256, "letter": 256, "label": 32}

_PROMPT_STARTS = ("Below is an instruction", "### Instruction:", RESPONSE_MARKER)
_NEXT_SECTION = re.compile(r"(?m)^[ \t]*###")
_NUMBER = re.compile(r"-?\d+\.?\d*")
_NUMBER_OR_FRACTION = re.compile(r"-?\d+\.?\d*(?:[ \t]*/[ \t]*\d+\.?\d*)?")


# --------------------------------------------------------------------------- extraction
def response_text(text: str) -> str:
    """The response part of a generation.

    A text that starts like a templated prompt (``Below is an instruction``, ``### Instruction:`` or
    ``### Response:``, i.e. a full decoded sequence) is first cut to what follows its first
    ``### Response:`` marker; the response then ends before its first line starting with ``###``
    (where a model that did not stop begins a new instruction of its own).
    """
    head = text.lstrip()
    if head.startswith(_PROMPT_STARTS) and RESPONSE_MARKER in text:
        text = text.split(RESPONSE_MARKER, 1)[1]
    m = _NEXT_SECTION.search(text)
    return text[:m.start()] if m else text


def extract_number(text: str, *, fractions: bool = True) -> Optional[float]:
    """The last number in the response, commas removed (LLM-Adapters' rule; see the module doc).

    ``fractions=True`` reads a trailing ``a/b`` as a ÷ b; ``fractions=False`` is LLM-Adapters'
    ``re.findall(r'-?\\d+\\.?\\d*', text.replace(',', ''))[-1]`` exactly. ``None`` when there is no number.
    """
    body = response_text(text).replace(",", "")
    found = (_NUMBER_OR_FRACTION if fractions else _NUMBER).findall(body)
    if not found:
        return None
    last = found[-1]
    if "/" in last:
        num, den = (float(part.strip()) for part in last.split("/"))
        return num / den if den != 0 else den
    return float(last)


def extract_choice(text: str, letters: str = "ABCDE", *, rule: str = "patterns") -> Optional[str]:
    """The chosen option letter of a multiple-choice answer (AQuA), or ``None``.

    ``rule="patterns"``: ``answer is (C)`` / ``answer: C`` / ``option C`` first, then the first
    ``(C)``, then the first standalone capital letter (not the article "A" before a lower-case word).
    ``rule="llm_adapters"``: the first character among ``letters`` anywhere in the response.
    """
    if not letters or not all(ch.isalpha() and ch.isupper() for ch in letters):
        raise DataFormatError(f"letters must be capital letters such as 'ABCDE', got {letters!r}")
    body = response_text(text).strip()
    cls = "[" + re.escape(letters) + "]"
    if rule == "llm_adapters":
        m = re.search(cls, body)
        return m.group(0) if m else None
    if rule != "patterns":
        raise DataFormatError(f"unknown extraction rule {rule!r}; use 'patterns' or 'llm_adapters'")
    stated = re.search(r"(?i:answer|option|choice)\s*(?:(?i:is)\s*)?:?\s*\(?\s*(" + cls + r")(?![A-Za-z0-9])",
                       body)
    if stated:
        return stated.group(1)
    paren = re.search(r"\(\s*(" + cls + r")\s*\)", body)
    if paren:
        return paren.group(1)
    for m in re.finditer(r"(?<![A-Za-z0-9])(" + cls + r")(?![A-Za-z0-9'])", body):
        if m.group(1) == "A" and re.match(r"\s+[a-z]", body[m.end():]):
            continue  # the article "A"
        return m.group(1)
    return None


def extract_label(text: str, choices: Sequence[str]) -> Optional[str]:
    """The first candidate label that occurs in the response as a whole word (case-insensitive,
    ``_`` matching ``_`` or a space, the longest candidate winning at one position), returned in its
    canonical spelling from ``choices``; ``None`` when none occurs."""
    if not choices:
        raise DataFormatError("extract_label needs at least one candidate label")
    body = response_text(text)
    canon = {}
    alts = []
    for c in sorted(choices, key=len, reverse=True):
        alts.append(r"[ _]".join(re.escape(part) for part in c.split("_")))
        canon[_norm(c)] = c
    m = re.search(r"(?<![A-Za-z0-9])(" + "|".join(alts) + r")(?![A-Za-z0-9])", body, flags=re.IGNORECASE)
    return canon[_norm(m.group(1))] if m else None


def extract_commonsense(text: str, task: str) -> Optional[str]:
    """The commonsense answer label LLM-Adapters reads for ``task`` (boolq, piqa, social_i_qa,
    arc_challenge, arc_easy, openbookqa, hellaswag, winogrande); see :func:`extract_label`."""
    if task not in COMMONSENSE_LABELS:
        raise DataFormatError(f"{task!r} is not a commonsense task; use one of {', '.join(COMMONSENSE_LABELS)}")
    return extract_label(text, COMMONSENSE_LABELS[task])


def _norm(label: str) -> str:
    return label.strip().lower().replace(" ", "_")


def task_family(task: str, gold: Optional[str] = None, choices: Optional[Sequence[str]] = None) -> str:
    """``"number"``, ``"letter"`` or ``"label"``: how answers of ``task`` are read and scored."""
    if task in NUMBER_TASKS:
        return "number"
    if task in LETTER_TASKS:
        return "letter"
    if task in COMMONSENSE_LABELS or task in GLUE_LABEL_WORDS or choices:
        return "label"
    if gold is not None and _is_number(gold):
        return "number"
    raise DataFormatError(f"cannot tell how to score task {task!r}: it is not a known task, its "
                          "examples have no choices and the gold answer is not a number")


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def extract_prediction(text: str, task: str, choices: Optional[Sequence[str]] = None,
                       gold: Optional[str] = None) -> Optional[float | str]:
    """Read the answer of a ``task`` example out of generated ``text`` with the task's rule."""
    family = task_family(task, gold, choices)
    if family == "number":
        return extract_number(text)
    if family == "letter":
        return extract_choice(text, "".join(choices) if choices else "ABCDE")
    candidates = choices or COMMONSENSE_LABELS.get(task) or GLUE_LABEL_WORDS.get(task)
    return extract_label(text, candidates)


def is_correct(pred: Optional[float | str], gold: str, task: str, *, tol: float = NUMBER_TOLERANCE) -> bool:
    """Whether an extracted answer matches the gold label: ``|pred − gold| ≤ tol`` for number tasks
    (LLM-Adapters' 0.001), equality up to case (and ``_`` vs space) otherwise. ``None`` is wrong."""
    if pred is None:
        return False
    numeric = task in NUMBER_TASKS or (
        task not in LETTER_TASKS and task not in COMMONSENSE_LABELS and task not in GLUE_LABEL_WORDS
        and isinstance(pred, (int, float)) and not isinstance(pred, bool) and _is_number(str(gold)))
    if numeric:
        try:
            g = float(str(gold).replace(",", ""))
            p = float(pred)
        except (TypeError, ValueError):
            return False
        return math.isfinite(p) and abs(p - g) <= tol
    return _norm(str(pred)) == _norm(str(gold))


# --------------------------------------------------------------------------- metrics
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


# --------------------------------------------------------------------------- generation
def generate_answers(model: Any, tokenizer: Any, prompts: Sequence[str], *, batch_size: int = 8,
                     max_new_tokens: int = 256, device: Any = None) -> list[str]:
    """Greedy continuations of ``prompts``, batched with left padding; returns only the new text.

    Prompts are sorted by token length so each batch pads little, and answers come back in input
    order. The tokenizer is switched to left padding (decoder-only models must see the prompt end
    right before the first generated token) and given ``pad_token = eos_token`` when it has none,
    both restored afterwards; the attention mask keeps padding out, so batching does not change
    the greedy output. Special tokens are dropped from the decoded text.
    """
    import torch
    from transformers import GenerationConfig

    if batch_size < 1:
        raise DataFormatError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise DataFormatError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompts = list(prompts)
    if not prompts:
        return []
    if device is None:
        device = next(model.parameters()).device
    saved_side, saved_pad = tokenizer.padding_side, tokenizer.pad_token
    was_training = model.training
    try:
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise DataFormatError("the tokenizer has neither a pad_token nor an eos_token; set one "
                                      "(tokenizer.pad_token = ...) before generating")
            tokenizer.pad_token = tokenizer.eos_token
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = tokenizer.eos_token_id
        config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
        lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=True)["input_ids"]]
        order = sorted(range(len(prompts)), key=lambda i: (-lengths[i], i))
        out: list[Optional[str]] = [None] * len(prompts)
        model.eval()
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                                add_special_tokens=True)
                enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                seqs = model.generate(**enc, generation_config=config)
                new = seqs[:, enc["input_ids"].shape[1]:]
                for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True)):
                    out[i] = text
    finally:
        tokenizer.padding_side = saved_side
        tokenizer.pad_token = saved_pad
        model.train(was_training)
    return [o if o is not None else "" for o in out]


# --------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class EvalResult(Record):
    """Scores of one evaluation run.

    ``accuracy`` is the fraction correct; ``metrics`` holds ``accuracy`` and, where GLUE asks for
    them, ``f1`` (MRPC) and ``mcc`` (CoLA), plus ``accuracy/<task>`` when several tasks were mixed.
    ``predictions`` holds one ``{prompt_id, generated, extracted, gold, correct}`` per example, in
    input order; ``n_unparsed`` counts answers the rule could not read.
    """

    task: str
    n: int
    accuracy: float
    predictions: list[dict[str, Any]]
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    n_unparsed: int = 0


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
        max_new_tokens = max(_DEFAULT_NEW_TOKENS[f] for f in families)
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
        if names[0] == "mrpc":
            metrics["f1"] = f1_binary(y_true, y_pred, positive=1)
        if names[0] == "cola":
            metrics["mcc"] = matthews_corrcoef(y_true, y_pred)
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
    index = {_norm(w): k for k, w in enumerate(words)}
    y_true, y_pred = [], []
    for p in predictions:
        t = index[_norm(p["gold"])]
        y_true.append(t)
        y_pred.append(index[_norm(p["extracted"])] if p["extracted"] is not None else 1 - t)
    return y_true, y_pred
