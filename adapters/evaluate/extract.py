"""Reading answers out of generated text and scoring them (the rules of LLM-Adapters, Hu et al.,
EMNLP 2023, arXiv:2304.01933).

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
tolerance ``miss = 0.001``); letters and labels when equal (case-insensitively).
"""
from __future__ import annotations

import math
import re
from typing import Optional, Sequence

from geoprobe.errors import DataFormatError

from ..data import GLUE_LABEL_WORDS, RESPONSE_MARKER, is_number

__all__ = ["NUMBER_TASKS", "LETTER_TASKS", "COMMONSENSE_LABELS", "NUMBER_TOLERANCE", "DEFAULT_NEW_TOKENS",
           "response_text", "extract_number", "extract_choice", "extract_label", "extract_commonsense",
           "task_family", "extract_prediction", "is_correct", "norm_label"]

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

DEFAULT_NEW_TOKENS = {"number": 256, "letter": 256, "label": 32}

_PROMPT_STARTS = ("Below is an instruction", "### Instruction:", RESPONSE_MARKER)
_NEXT_SECTION = re.compile(r"(?m)^[ \t]*###")
_NUMBER = re.compile(r"-?\d+\.?\d*")
_NUMBER_OR_FRACTION = re.compile(r"-?\d+\.?\d*(?:[ \t]*/[ \t]*\d+\.?\d*)?")


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
        canon[norm_label(c)] = c
    m = re.search(r"(?<![A-Za-z0-9])(" + "|".join(alts) + r")(?![A-Za-z0-9])", body, flags=re.IGNORECASE)
    return canon[norm_label(m.group(1))] if m else None


def extract_commonsense(text: str, task: str) -> Optional[str]:
    """The commonsense answer label LLM-Adapters reads for ``task`` (boolq, piqa, social_i_qa,
    arc_challenge, arc_easy, openbookqa, hellaswag, winogrande); see :func:`extract_label`."""
    if task not in COMMONSENSE_LABELS:
        raise DataFormatError(f"{task!r} is not a commonsense task; use one of {', '.join(COMMONSENSE_LABELS)}")
    return extract_label(text, COMMONSENSE_LABELS[task])


def norm_label(label: str) -> str:
    """A label compared case-insensitively, with a space and `_` the same: stripped, lower case, `_` for spaces."""
    return label.strip().lower().replace(" ", "_")


def task_family(task: str, gold: Optional[str] = None, choices: Optional[Sequence[str]] = None) -> str:
    """``"number"``, ``"letter"`` or ``"label"``: how answers of ``task`` are read and scored."""
    if task in NUMBER_TASKS:
        return "number"
    if task in LETTER_TASKS:
        return "letter"
    if task in COMMONSENSE_LABELS or task in GLUE_LABEL_WORDS or choices:
        return "label"
    if gold is not None and is_number(gold):
        return "number"
    raise DataFormatError(f"cannot tell how to score task {task!r}: it is not a known task, its "
                          "examples have no choices and the gold answer is not a number")


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
        and isinstance(pred, (int, float)) and not isinstance(pred, bool) and is_number(str(gold)))
    if numeric:
        try:
            g = float(str(gold).replace(",", ""))
            p = float(pred)
        except (TypeError, ValueError):
            return False
        return math.isfinite(p) and abs(p - g) <= tol
    return norm_label(str(pred)) == norm_label(str(gold))
