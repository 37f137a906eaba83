"""Training and evaluation data: readers for the instruction-tuning formats, prompt templates,
loss-masked tokenisation, sequence packing and batch collation.

Formats read by :func:`load_examples` (``kind``):

``"llm_adapters"``
    JSON array (or JSON lines) of ``{instruction, input, output, answer}`` records, the format of the
    LLM-Adapters data sets (Hu et al., EMNLP 2023, arXiv:2304.01933): the math sets (AddSub,
    MultiArith, SVAMP, SingleEq, GSM8K, MAWPS, AQuA, the math training set) and the commonsense sets
    (BoolQ, PIQA, SIQA, ARC, OpenBookQA, WinoGrande, HellaSwag). ``output`` is the training target and
    ``answer`` the gold short answer (a number, an AQuA letter, or a commonsense label such as
    ``answer3`` / ``solution1`` / ``option2`` / ``true``). A record needs ``instruction`` and at least one
    of ``output`` / ``answer``.
``"gsm8k"``
    JSON lines of ``{question, answer}`` as released by OpenAI (Cobbe et al. 2021, arXiv:2110.14168):
    the answer is a rationale with ``<<48/2=24>>`` calculator annotations and a final ``#### 72`` line.
    The training target drops the annotations and ends with ``The answer is 72.`` (the phrasing of the
    LLM-Adapters targets); the gold label is the ``####`` number with thousands commas removed.
``"mawps"``
    JSON array of ``{id, original_text, equation, ans}`` (the MAWPS split files): the target is
    ``The equation is <equation>. The answer is <ans>.``, the label ``ans``.
``"glue"``
    GLUE tab-separated files (SST-2, CoLA, RTE, MRPC; with or without header, UTF-8 BOM allowed). Each
    row becomes an instruction naming the label words; the target is ``the correct answer is <word>``
    and the label the word: SST-2 ``negative``/``positive``, CoLA ``unacceptable``/``acceptable``,
    RTE ``entailment``/``not_entailment``, MRPC ``not_equivalent``/``equivalent``. ``choices`` lists the
    words in GLUE class-id order (index = class id). Unlabelled test files give ``label=None`` and an
    empty ``answer``.

``Example.choices`` holds the candidate *labels* an answer is scored against, in order: AQuA letters
parsed from ``Answer Choices: (A) ... (E) ...``, commonsense labels parsed from the instruction's
``Answer format: answer1/answer2/...`` line, GLUE label words; ``None`` for free-form numbers.

Sequence classification (an encoder with a classification head, GeLoRA's GLUE setting) reads
``Example.texts`` and the class id ``choices.index(label)``: :func:`class_labels` gives the label set
and refuses data that needs generation, :func:`tokenize_for_classification` tokenises the sentence
(or the pair, with the tokenizer's segment ids) and :func:`collate_classification` pads a batch.

Tokenisation (:func:`tokenize_for_training`) follows the LLM-Adapters / Alpaca-LoRA recipe — loss on
the response only — but tokenises prompt and answer separately, so the label mask falls exactly on the
answer tokens (no merge across the boundary) and the training prompt is tokenised exactly as it is at
generation time. :func:`pack` concatenates examples with ``position_ids`` restarting at 0, the layout
transformers' ``DataCollatorWithFlattening`` produces and that transformers' attention masks and
flash-attention varlen kernels read as independent sequences. transformers (5.x) derives the
block-diagonal mask from ``position_ids`` only when the forward gets neither an ``attention_mask`` nor
a cache: call the model on a packed batch as ``model(**batch, use_cache=False)``.
"""
from __future__ import annotations

import bisect
import csv
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from geoprobe.errors import DataFormatError
from geoprobe.records import json_problem, parse_json

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value ignored by the cross-entropy loss (PyTorch / transformers convention)."""

KINDS = ("llm_adapters", "gsm8k", "mawps", "glue")

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_TEMPLATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PLAIN_TEMPLATE = "{instruction}\n"
PLAIN_TEMPLATE_WITH_INPUT = "{instruction}\n\n{input}\n"
RESPONSE_MARKER = "### Response:"

# Canonical task names, looked up from a file's stem or folder name (lower case, '-' -> '_').
_TASK_ALIASES = {
    "gsm8k": "gsm8k", "addsub": "addsub", "multiarith": "multiarith", "svamp": "svamp",
    "singleeq": "singleeq", "mawps": "mawps", "aqua": "aqua",
    "math_data": "math", "math_10k": "math", "math_7k": "math", "math_14k": "math", "math_50k": "math",
    "boolq": "boolq", "piqa": "piqa", "social_i_qa": "social_i_qa", "siqa": "social_i_qa",
    "arc_challenge": "arc_challenge", "arc_easy": "arc_easy", "openbookqa": "openbookqa",
    "winogrande": "winogrande", "hellaswag": "hellaswag",
    "commonsense_170k": "commonsense", "commonsense_15k": "commonsense",
    "sst_2": "sst2", "sst2": "sst2", "cola": "cola", "rte": "rte", "mrpc": "mrpc",
}

# GLUE: label words in class-id order and the instruction text.
GLUE_LABEL_WORDS: dict[str, tuple[str, ...]] = {
    "sst2": ("negative", "positive"),
    "cola": ("unacceptable", "acceptable"),
    "rte": ("entailment", "not_entailment"),
    "mrpc": ("not_equivalent", "equivalent"),
}
_GLUE_INSTRUCTIONS = {
    "sst2": "Classify the sentiment of the following sentence as negative or positive.\n\n"
            "Sentence: {a}\n\nAnswer format: negative/positive",
    "cola": "Is the following sentence grammatically acceptable?\n\n"
            "Sentence: {a}\n\nAnswer format: unacceptable/acceptable",
    "rte": "Does the premise entail the hypothesis?\n\n"
           "Premise: {a}\nHypothesis: {b}\n\nAnswer format: entailment/not_entailment",
    "mrpc": "Do the two sentences have the same meaning?\n\n"
            "Sentence 1: {a}\nSentence 2: {b}\n\nAnswer format: not_equivalent/equivalent",
}
_GLUE_HEADERS = {  # header column names: (first text, second text or None, label or None)
    "sst2": ("sentence", None, "label"),
    "cola": ("sentence", None, "label"),
    "rte": ("sentence1", "sentence2", "label"),
    "mrpc": ("#1 String", "#2 String", "Quality"),
}

_CALC_ANNOTATION = re.compile(r"<<[^<>]*>>")
_ANSWER_FORMAT = re.compile(r"Answer format:\s*([A-Za-z0-9_]+(?:/[A-Za-z0-9_]+)+)")
_ANSWER_CHOICES = re.compile(r"\(([A-Z])\)")


@dataclass(frozen=True)
class Example:
    """One instruction-tuning example.

    ``prompt`` is the instruction (untemplated; see :func:`format_prompt`), ``input`` the optional
    context the Alpaca template places under ``### Input:``, ``answer`` the text trained on, ``label``
    the gold short answer used for scoring (``None`` when the split is unlabelled), ``task`` the
    canonical task name, ``choices`` the candidate labels in order (``None`` for free-form numbers).
    ``texts`` holds the raw text fields a sequence classifier reads (GLUE: the sentence, or the
    sentence pair), empty for the instruction formats, which need generation.
    """

    prompt: str
    answer: str
    label: Optional[str]
    task: str
    choices: Optional[tuple[str, ...]] = None
    input: str = ""
    texts: tuple[str, ...] = ()


# --------------------------------------------------------------------------- loading
def load_examples(path: str | Path, *, kind: Optional[str] = None, split: Optional[str] = None,
                  limit: Optional[int] = None, task: Optional[str] = None) -> list[Example]:
    """Read a data file (or ``<folder>/<split>.{jsonl,json,tsv}``) into :class:`Example` records.

    ``kind`` is one of :data:`KINDS`; when ``None`` it is detected from the extension (``.tsv`` → GLUE)
    and the fields of the first record. ``task`` overrides the task name otherwise taken from the file
    stem or folder name (``SST-2/dev.tsv`` → ``sst2``, ``AQuA/test.json`` → ``aqua``). ``limit`` keeps
    the first ``limit`` examples. Raises :class:`DataFormatError` naming the missing field and the
    fields found when a record does not fit the format.
    """
    file = _resolve_file(Path(path), split)
    if kind is not None and kind not in KINDS:
        raise DataFormatError(f"unknown data kind {kind!r}; use one of {', '.join(KINDS)} or leave it None")
    if limit is not None and limit < 0:
        raise DataFormatError(f"limit must be >= 0, got {limit}")
    task_name = _canonical_task(task) if task else _task_from_path(file)

    if kind == "glue" or (kind is None and _looks_tabular(file)):
        examples = _read_glue(file, task_name, limit)
    else:
        records = _read_records(file)
        if not records:
            raise DataFormatError(f"{file} holds no records")
        kind = kind or _detect_kind(file, records[0])
        reader = {"llm_adapters": _from_llm_adapters, "gsm8k": _from_gsm8k, "mawps": _from_mawps}[kind]
        examples = []
        for i, rec in enumerate(records):
            if limit is not None and len(examples) >= limit:
                break
            if not isinstance(rec, dict):
                raise DataFormatError(f"{file} record {i} is a {type(rec).__name__}, expected an object")
            examples.append(reader(rec, file, i, task_name))
    log.info("read %d examples (task %s) from %s", len(examples), examples[0].task if examples else task_name, file)
    return examples


def _resolve_file(path: Path, split: Optional[str]) -> Path:
    if path.is_dir():
        if split is None:
            data = sorted(p.name for p in path.iterdir() if p.suffix in (".json", ".jsonl", ".tsv"))
            if len(data) == 1:
                return path / data[0]
            raise DataFormatError(f"{path} is a folder holding {', '.join(data) or 'no data files'}; "
                                  "pass split= (e.g. split='train') or the file itself")
        for ext in (".jsonl", ".json", ".tsv"):
            if (path / f"{split}{ext}").is_file():
                return path / f"{split}{ext}"
        present = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        raise DataFormatError(f"{path} has no {split}.jsonl / {split}.json / {split}.tsv (it holds {present})")
    if not path.exists():
        raise DataFormatError(f"data file {path} does not exist")
    if not path.is_file():
        raise DataFormatError(f"data file {path} is not a regular file (a device, pipe or socket); pass a "
                              ".jsonl, .json or .tsv file")
    if split is not None and path.stem != split:
        raise DataFormatError(f"split={split!r} was given with the file {path}; pass the folder instead, "
                              "or drop split")
    return path


def _canonical_task(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    return _TASK_ALIASES.get(key, key)


def _task_from_path(file: Path) -> str:
    for name in (file.stem, file.parent.name, file.parent.parent.name):
        key = name.lower().replace("-", "_")
        if key in _TASK_ALIASES:
            return _TASK_ALIASES[key]
    return ""  # decided from the content


def _looks_tabular(file: Path) -> bool:
    if file.suffix == ".tsv":
        return True
    if file.suffix in (".json", ".jsonl"):
        return False
    try:
        with file.open(encoding="utf-8-sig") as fh:
            first = fh.readline()
    except (OSError, UnicodeDecodeError):
        return False
    return "\t" in first


def _read_records(file: Path) -> list[Any]:
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataFormatError(f"{file} is not UTF-8 text") from None
    except OSError as exc:
        raise DataFormatError(f"cannot read {file}: {exc.strerror or exc}") from None
    if not text.strip():
        raise DataFormatError(f"{file} is empty")
    if file.suffix != ".jsonl":
        try:
            data = parse_json(text)
        except json.JSONDecodeError as exc:
            if file.suffix == ".json":
                raise DataFormatError(f"{file} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        except (ValueError, RecursionError) as exc:
            if file.suffix == ".json":
                raise DataFormatError(f"{file} is not usable JSON ({json_problem(exc)})") from None
        else:
            if isinstance(data, list):
                return data
            raise DataFormatError(f"{file} holds a JSON {type(data).__name__}; expected an array of records")
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(parse_json(line))
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"{file} line {lineno} is not valid JSON ({exc.msg})") from None
        except (ValueError, RecursionError) as exc:
            raise DataFormatError(f"{file} line {lineno} is not usable JSON ({json_problem(exc)})") from None
    return records


def _detect_kind(file: Path, first: Any) -> str:
    if not isinstance(first, dict):
        raise DataFormatError(f"{file} record 0 is a {type(first).__name__}, expected an object")
    keys = set(first)
    if "instruction" in keys:
        return "llm_adapters"
    if {"question", "answer"} <= keys:
        return "gsm8k"
    if {"original_text", "ans"} <= keys:
        return "mawps"
    raise DataFormatError(
        f"cannot tell the format of {file}: record 0 has fields {_fields(first)}; expected "
        "'instruction' + 'output'/'answer' (LLM-Adapters), 'question' + 'answer' (GSM8K) or "
        "'original_text' + 'ans' (MAWPS)")


def _fields(rec: dict) -> str:
    return ", ".join(map(str, rec)) or "none"


def _need(rec: dict, field: str, file: Path, i: int, kind: str) -> str:
    if field not in rec:
        raise DataFormatError(f"{file} record {i} lacks field {field!r} needed by the {kind} format; "
                              f"fields found: {_fields(rec)}")
    value = rec[field]
    if value is None:
        raise DataFormatError(f"{file} record {i}: field {field!r} is null")
    return value if isinstance(value, str) else str(value)


def _from_llm_adapters(rec: dict, file: Path, i: int, task: str) -> Example:
    instruction = _need(rec, "instruction", file, i, "llm_adapters")
    if "output" not in rec and "answer" not in rec:
        raise DataFormatError(f"{file} record {i} lacks field 'output' (and 'answer') needed by the "
                              f"llm_adapters format; fields found: {_fields(rec)}")
    output = "" if rec.get("output") is None else str(rec["output"])
    label = None if rec.get("answer") is None else str(rec["answer"]).strip()
    inp = "" if rec.get("input") is None else str(rec["input"])
    if not task:
        task = _task_from_content(instruction, label)
    elif task == "math" and label in tuple("ABCDE") and "Answer Choices:" in instruction:
        task = "aqua"  # the LLM-Adapters math training sets mix in AQuA-style multiple choice
    answer = output if output.strip() else (f"The answer is {label}." if label else "")
    return Example(prompt=instruction, answer=answer, label=label, task=task,
                   choices=_choices_from_instruction(instruction, task), input=inp)


def _task_from_content(instruction: str, label: Optional[str]) -> str:
    if label is not None and is_number(label):
        return "math"
    if _ANSWER_FORMAT.search(instruction):
        return "commonsense"
    if "Answer Choices:" in instruction:
        return "aqua"
    return "generic"


def _choices_from_instruction(instruction: str, task: str) -> Optional[tuple[str, ...]]:
    fmt = _ANSWER_FORMAT.findall(instruction)
    if fmt:
        return tuple(fmt[-1].split("/"))
    if "Answer Choices:" in instruction or task == "aqua":
        tail = instruction.split("Answer Choices:")[-1]
        letters = tuple(dict.fromkeys(_ANSWER_CHOICES.findall(tail)))
        return letters or tuple("ABCDE")
    return None


def is_number(text: str) -> bool:
    """Whether ``text`` reads as a number once its thousands separators (commas) are removed."""
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def _from_gsm8k(rec: dict, file: Path, i: int, task: str) -> Example:
    question = _need(rec, "question", file, i, "gsm8k")
    raw = _need(rec, "answer", file, i, "gsm8k")
    if "####" not in raw:
        raise DataFormatError(f"{file} record {i}: the GSM8K answer has no final '#### <number>' line")
    rationale, final = raw.rsplit("####", 1)
    label = final.strip().replace(",", "")
    rationale = _CALC_ANNOTATION.sub("", rationale).rstrip()
    answer = f"{rationale}\nThe answer is {label}." if rationale else f"The answer is {label}."
    return Example(prompt=question, answer=answer, label=label, task=task or "gsm8k")


def _from_mawps(rec: dict, file: Path, i: int, task: str) -> Example:
    text = _need(rec, "original_text", file, i, "mawps").strip()
    ans = rec.get("ans")
    if ans is None:
        raise DataFormatError(f"{file} record {i} lacks field 'ans' needed by the mawps format; "
                              f"fields found: {_fields(rec)}")
    label = str(ans)
    equation = str(rec.get("equation") or "").strip()
    answer = (f"The equation is {equation}. " if equation else "") + f"The answer is {label}."
    return Example(prompt=text, answer=answer, label=label, task=task or "mawps")


# --------------------------------------------------------------------------- GLUE
def _read_glue(file: Path, task: str, limit: Optional[int]) -> list[Example]:
    try:
        with file.open(encoding="utf-8-sig", newline="") as fh:
            rows = [r for r in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE) if r]
    except UnicodeDecodeError:
        raise DataFormatError(f"{file} is not UTF-8 text") from None
    except csv.Error as exc:  # e.g. a field over csv.field_size_limit() characters
        raise DataFormatError(f"{file} is not a readable tab-separated file ({exc})") from None
    except OSError as exc:
        raise DataFormatError(f"cannot read {file}: {exc.strerror or exc}") from None
    except csv.Error as exc:  # a field beyond the csv module's size limit, a NUL byte
        raise DataFormatError(f"{file} is not a readable TSV file ({exc})") from None
    if not rows:
        raise DataFormatError(f"{file} is empty")
    header = [c.strip() for c in rows[0]]
    if task and task not in GLUE_LABEL_WORDS:
        raise DataFormatError(f"{file}: task {task!r} is not a GLUE task this reader knows "
                              f"({', '.join(GLUE_LABEL_WORDS)}); pass task=")
    layout = _glue_layout(file, header, rows, task)
    task, a_col, b_col, y_col, body = layout
    words = GLUE_LABEL_WORDS[task]
    out: list[Example] = []
    for n, row in enumerate(body):
        if limit is not None and len(out) >= limit:
            break
        if len(row) <= max(c for c in (a_col, b_col, y_col) if c is not None):
            raise DataFormatError(f"{file} data row {n + 1} has {len(row)} columns; expected at least "
                                  f"{max(c for c in (a_col, b_col, y_col) if c is not None) + 1}")
        a = row[a_col].strip()
        b = row[b_col].strip() if b_col is not None else ""
        label = None
        if y_col is not None:
            label = _glue_label(row[y_col].strip(), words, file, n + 1)
        prompt = _GLUE_INSTRUCTIONS[task].format(a=a, b=b)
        answer = f"the correct answer is {label}" if label is not None else ""
        out.append(Example(prompt=prompt, answer=answer, label=label, task=task, choices=words,
                           texts=(a, b) if b_col is not None else (a,)))
    return out


def _glue_label(value: str, words: tuple[str, ...], file: Path, row: int) -> str:
    if value in words:
        return value
    if value in ("0", "1"):
        return words[int(value)]
    raise DataFormatError(f"{file} data row {row}: label {value!r} is none of 0, 1, {', '.join(words)}")


def _glue_layout(file: Path, header: list[str], rows: list[list[str]], task: str):
    """Return (task, first-text column, second-text column, label column or None, data rows)."""
    cols = set(header)
    found = None
    if {"#1 String", "#2 String"} <= cols:
        found = "mrpc"
    elif {"sentence1", "sentence2"} <= cols:
        found = "rte"
    elif "sentence" in cols:
        found = task if task in ("sst2", "cola") else "sst2"
    if found is not None:
        if task and task != found:
            raise DataFormatError(f"{file} has the columns of {found} ({', '.join(header)}), "
                                  f"not of {task}; pass task={found!r} or the right file")
        a, b, y = _GLUE_HEADERS[found]
        return (found, header.index(a), header.index(b) if b else None,
                header.index(y) if y in cols else None, rows[1:])
    first = [c.strip() for c in rows[0]]
    if len(first) == 4 and first[1] in ("0", "1") and task in ("", "cola"):
        return "cola", 3, None, 1, rows  # CoLA without header: source, label, original label, sentence
    if len(first) == 4 and first[3] in GLUE_LABEL_WORDS["rte"] and task in ("", "rte"):
        return "rte", 1, 2, 3, rows  # RTE without header: index, sentence1, sentence2, label
    want = [task] if task else list(_GLUE_HEADERS)
    raise DataFormatError(
        f"{file} does not look like a GLUE file{' for ' + task if task else ''}: its first row has the "
        f"fields {', '.join(header)}; expected a header with "
        + "; ".join(f"{t}: {', '.join(c for c in _GLUE_HEADERS[t] if c)}" for t in want)
        + " (or the headerless CoLA / RTE layouts)")


# --------------------------------------------------------------------------- prompts
def format_prompt(example: Example, template: str = "alpaca") -> str:
    """The prompt text the model sees, ending where the response starts.

    ``"alpaca"``: the Alpaca template LLM-Adapters trains and evaluates with (without the source-code
    indentation and stray ``# noqa`` that LLM-Adapters' literal strings carry into the prompt):
    ``Below is an instruction ... ### Instruction:\\n{instruction}\\n\\n### Response:\\n``, with an
    ``### Input:`` section when the example has one. ``"plain"``: the instruction (and input) followed
    by a newline. Any other string is a format string with ``{instruction}`` and optionally ``{input}``.
    """
    if template == "alpaca":
        fmt = ALPACA_TEMPLATE_WITH_INPUT if example.input else ALPACA_TEMPLATE
    elif template == "plain":
        fmt = PLAIN_TEMPLATE_WITH_INPUT if example.input else PLAIN_TEMPLATE
    elif "{instruction}" in template:
        fmt = template
    else:
        raise DataFormatError(f"unknown prompt template {template!r}; use 'alpaca', 'plain' or a format "
                              "string containing {instruction}")
    try:
        return fmt.format(instruction=example.prompt, input=example.input)
    except (KeyError, IndexError) as exc:
        raise DataFormatError(f"prompt template {template!r} has an unknown placeholder {exc}; only "
                              "{instruction} and {input} are filled") from None


# --------------------------------------------------------------------------- tokenisation
def tokenize_for_training(examples: Sequence[Example], tokenizer: Any, *, max_length: int = 256,
                          template: str = "alpaca") -> list[dict[str, list[int]]]:
    """Token ids and loss labels for causal-LM fine-tuning on the answer only.

    ``input_ids = prompt_ids + answer_ids + [eos]`` where ``prompt_ids`` is the templated prompt
    tokenised with the tokenizer's own special tokens (BOS for Llama-style tokenizers) and
    ``answer_ids`` the answer tokenised without special tokens; ``labels`` is ``-100`` on the prompt
    and equals ``input_ids`` on ``answer_ids + [eos]``. When the sequence exceeds ``max_length`` the
    prompt is cut from the left, keeping its leading special tokens; the answer is never cut (a too
    long answer raises :class:`DataFormatError`).
    """
    if max_length < 2:
        raise DataFormatError(f"max_length must be >= 2, got {max_length}")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataFormatError("the tokenizer has no eos_token; set tokenizer.eos_token before tokenising "
                              "(the answer ends with it so the model learns to stop)")
    examples = list(examples)
    for i, ex in enumerate(examples):
        if not ex.answer:
            raise DataFormatError(f"example {i} ({ex.task}) has no answer text to train on "
                                  "(an unlabelled split?); train on a labelled split")
    if not examples:
        return []
    prompts = [format_prompt(ex, template) for ex in examples]
    prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer([ex.answer for ex in examples], add_special_tokens=False)["input_ids"]
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    out = []
    n_cut = 0
    for i, (p, a) in enumerate(zip(prompt_ids, answer_ids)):
        p, a = list(p), list(a) + [eos]
        if len(p) + len(a) > max_length:
            lead = 0
            while lead < len(p) and p[lead] in special:
                lead += 1
            budget = max_length - len(a) - lead
            if budget < 1:
                raise DataFormatError(
                    f"example {i} ({examples[i].task}): the answer takes {len(a)} tokens with EOS, which "
                    f"leaves no room for the prompt within max_length={max_length}; raise max_length")
            p = p[:lead] + p[len(p) - budget:]
            n_cut += 1
        out.append({"input_ids": p + a, "labels": [IGNORE_INDEX] * len(p) + a})
    if n_cut:
        log.info("cut %d of %d prompts from the left to fit max_length=%d", n_cut, len(out), max_length)
    return out


# --------------------------------------------------------------------------- packing
def pack(tokenized: Iterable[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Pack tokenised examples into sequences of at most ``max_length`` tokens.

    Best-fit decreasing bin packing (each example, longest first, goes into the fullest sequence that
    still has room; O(n log n)), so order within the output is by packing, not by input. Each output
    holds ``input_ids``, ``labels`` and ``position_ids`` that restart at 0 for every example, the
    padding-free layout transformers reads as separate sequences when no ``attention_mask`` is passed.
    Call the model on it with ``use_cache=False`` and no ``attention_mask`` (see :func:`collate`).
    The first label of every example is ``-100``, so no token is trained to follow the previous
    example (already true for prompt-masked examples). Every token and label appears exactly once.
    """
    if max_length < 1:
        raise DataFormatError(f"max_length must be >= 1, got {max_length}")
    items = list(tokenized)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        if len(it["labels"]) != n:
            raise DataFormatError(f"example {i}: {n} input_ids but {len(it['labels'])} labels")
        if n == 0:
            raise DataFormatError(f"example {i} is empty")
        if n > max_length:
            raise DataFormatError(f"example {i} has {n} tokens, more than max_length={max_length}; "
                                  "tokenise with the same max_length first")
    order = sorted(range(len(items)), key=lambda i: (-len(items[i]["input_ids"]), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order:
        n = len(items[i]["input_ids"])
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, b = free.pop(k)
        else:
            room, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    out = []
    for members in bins:
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        for i in members:
            it = items[i]
            ids.extend(it["input_ids"])
            lab = list(it["labels"])
            lab[0] = IGNORE_INDEX
            labels.extend(lab)
            pos.extend(range(len(it["input_ids"])))
        out.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return out


# --------------------------------------------------------------------------- batching
def check_batch(batch: Sequence[dict[str, list[int]]]) -> bool:
    """Whether the sequences of ``batch`` are packed (carry ``position_ids``), after checking what a batch
    needs: at least one sequence, all packed or none, as many labels as input ids in each. Raises
    :class:`DataFormatError` otherwise."""
    if not batch:
        raise DataFormatError("cannot collate an empty batch")
    packed = ["position_ids" in b for b in batch]
    if any(packed) and not all(packed):
        raise DataFormatError("a batch mixes packed items (with position_ids) and unpacked ones")
    for r, b in enumerate(batch):
        if len(b["labels"]) != len(b["input_ids"]):
            raise DataFormatError(f"batch item {r}: {len(b['input_ids'])} input_ids but {len(b['labels'])} labels")
    return packed[0]


def collate(batch: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-pad a batch into tensors: ``input_ids`` (pad ``pad_id``), ``labels`` (pad ``-100``).

    Unpacked items also get ``attention_mask`` (1 on tokens, 0 on padding). Packed items (from
    :func:`pack`, carrying ``position_ids``) get ``position_ids`` instead, the padding continuing as
    a separate run 0, 1, ...: transformers then builds a block-diagonal causal mask from the position
    ids, which it does only when neither an ``attention_mask`` nor a cache is passed, so none is
    returned for them and the forward must be ``model(**batch, use_cache=False)``.
    """
    import torch

    packed = check_batch(batch)
    width = max(len(b["input_ids"]) for b in batch)
    n = len(batch)
    input_ids = torch.full((n, width), int(pad_id), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    pos = torch.zeros((n, width), dtype=torch.long)
    for r, b in enumerate(batch):
        k = len(b["input_ids"])
        input_ids[r, :k] = torch.as_tensor(b["input_ids"], dtype=torch.long)
        labels[r, :k] = torch.as_tensor(b["labels"], dtype=torch.long)
        mask[r, :k] = 1
        if packed:
            pos[r, :k] = torch.as_tensor(b["position_ids"], dtype=torch.long)
            pos[r, k:] = torch.arange(width - k)
    out: dict[str, Any] = {"input_ids": input_ids, "labels": labels}
    if packed:
        out["position_ids"] = pos
    else:
        out["attention_mask"] = mask
    return out


# --------------------------------------------------------------------------- sequence classification
def class_labels(examples: Sequence[Example], *, what: str = "--data") -> tuple[str, ...]:
    """The label set of data a sequence classifier can learn: the examples' ``choices`` (class id =
    index), the same for every example, with raw ``texts`` to classify.

    Raises:
        DataFormatError: no examples; examples without ``texts`` (instruction data, whose answers a
            model has to generate: GSM8K, the math and commonsense sets); mixed label sets; fewer than
            two labels; a gold label outside the set.
    """
    examples = list(examples)
    if not examples:
        raise DataFormatError(f"{what} holds no examples")
    gen = next((ex for ex in examples if not ex.texts or not ex.choices), None)
    if gen is not None:
        raise DataFormatError(f"{what} ({gen.task or 'this data'}) needs generation: its answers are written "
                              "out, not picked from a fixed label set with raw text fields; a classification "
                              "head can learn GLUE-style TSV files (SST-2, CoLA, RTE, MRPC) only")
    labels = tuple(examples[0].choices or ())
    other = next((ex for ex in examples if ex.choices != labels), None)
    if other is not None:
        raise DataFormatError(f"{what} mixes label sets ({', '.join(labels)} and {', '.join(other.choices or ())}); "
                              "train a classifier on one task at a time")
    if len(labels) < 2:
        raise DataFormatError(f"{what} has {len(labels)} label(s); a classifier needs at least two")
    for i, ex in enumerate(examples):
        if ex.label is not None and ex.label not in labels:
            raise DataFormatError(f"{what} example {i}: label {ex.label!r} is none of {', '.join(labels)}")
    return tuple(labels)


def tokenize_for_classification(examples: Sequence[Example], tokenizer: Any, *,
                                max_length: int = 256) -> list[dict[str, list[int]]]:
    """Token ids and class ids for a sequence classifier.

    Each example's ``texts`` (one sentence, or a pair given to the tokenizer as ``text, text_pair`` so
    BERT-style models get ``[CLS] a [SEP] b [SEP]`` and segment ids 0/1) is tokenised with the
    tokenizer's special tokens, truncated to ``max_length`` (a pair loses tokens from its longer
    side first, the tokenizer's ``longest_first``). ``labels`` is ``[choices.index(label)]``. Rows
    hold ``input_ids``, ``labels`` and, where the tokenizer makes them, ``token_type_ids``.

    Raises:
        DataFormatError: an example without a gold label (an unlabelled split), or without texts.
    """
    if max_length < 2:
        raise DataFormatError(f"max_length must be >= 2, got {max_length}")
    examples = list(examples)
    labels = class_labels(examples, what="the classification data")
    for i, ex in enumerate(examples):
        if ex.label is None:
            raise DataFormatError(f"example {i} ({ex.task}) has no gold label (an unlabelled split?); "
                                  "use a labelled split")
    if not examples:
        return []
    first = [ex.texts[0] for ex in examples]
    pairs = [ex.texts[1] if len(ex.texts) > 1 else None for ex in examples]
    out: list[dict[str, list[int]]] = []
    for a, b, ex in zip(first, pairs, examples):
        enc = tokenizer(a, b, truncation=True, max_length=max_length, add_special_tokens=True)
        row = {"input_ids": list(enc["input_ids"]), "labels": [labels.index(ex.label)]}
        if "token_type_ids" in enc:
            row["token_type_ids"] = list(enc["token_type_ids"])
        out.append(row)
    return out


def collate_classification(batch: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-pad classification rows into tensors: ``input_ids`` (pad ``pad_id``), ``attention_mask``
    (1 on tokens), ``token_type_ids`` (pad 0) where the rows have them, and ``labels`` of shape (B,)."""
    import torch

    if not batch:
        raise DataFormatError("cannot collate an empty batch")
    width = max(len(b["input_ids"]) for b in batch)
    n = len(batch)
    segments = all("token_type_ids" in b for b in batch)
    input_ids = torch.full((n, width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    types = torch.zeros((n, width), dtype=torch.long)
    for r, b in enumerate(batch):
        k = len(b["input_ids"])
        input_ids[r, :k] = torch.as_tensor(b["input_ids"], dtype=torch.long)
        mask[r, :k] = 1
        if segments:
            types[r, :k] = torch.as_tensor(b["token_type_ids"], dtype=torch.long)
    out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask,
                           "labels": torch.as_tensor([b["labels"][0] for b in batch], dtype=torch.long)}
    if segments:
        out["token_type_ids"] = types
    return out
